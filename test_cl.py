"""Tests for common.py (vocabulary, the precomputed layout, the toy world) and cl_captioning.py: each
equation against an independent numpy or brute-force computation, the command line end to end on a
tiny toy world, then the same on 2 processes."""
import functools
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

import cl_captioning as cl
from conftest import NO_JAVA, Hostile
from common import (BOS, CATEGORIES, EOS, KIND, PAD, PLACES, UNK, DataError, Vocab, caption_content, load_split,
                    make_toy_world, nonfinite_images, tokenize)
from cl_captioning import load_checkpoint
import common

HERE = Path(__file__).resolve().parent
VOCAB_SIZE, FEAT_DIM, REGIONS = 12, 6, 4
torch.set_num_threads(1)  # tiny models: threads only add overhead, and the CI machine is shared


def tiny_model(kind, seed=0, eos_bias=1.0):
    torch.manual_seed(seed)
    model = cl.CAPTIONERS[kind](VOCAB_SIZE, FEAT_DIM, rnn_size=8, emb_size=8, dropout=0.5)
    for p in model.parameters():  # larger weights than the default init: peaked, image-dependent outputs
        torch.nn.init.uniform_(p, -1.0, 1.0)
    classifier = model.classifier if kind == "showtell" else model.W_p
    with torch.no_grad():
        classifier.bias[EOS] += eos_bias  # higher: captions end sooner
    return model.eval()


def tiny_feats(n, seed=1):
    return torch.rand(n, REGIONS, FEAT_DIM, generator=torch.Generator().manual_seed(seed))


def step_by_step_log_prob(model, feats, caption):
    """Brute force: one image, one word at a time through model.step, up to and including <eos>."""
    memory = model.encode(feats[None])
    state = model.init_state(memory)
    word, total = torch.tensor([BOS]), 0.0
    for token in caption:
        log_probs, state = model.step(memory, word, state)
        total += log_probs[0, token].item()
        if token == EOS:
            break
        word = torch.tensor([token])
    return total


# --- common.py: vocabulary, the precomputed layout, the toy world ------------------------------------

def test_tokenize_keeps_lowercase_alphabetic_words_only():
    assert tokenize("A Dog, 2 cats & the U.S.-made car!") == ["a", "dog", "cats", "the", "u", "s", "made", "car"]


def test_vocab_min_count_order_and_round_trip():
    texts = ["a dog on the grass", "a dog in a field", "a cat"]
    vocab = Vocab.build((tokenize(t) for t in texts), min_count=2)
    assert vocab.itos == ["<pad>", "<bos>", "<eos>", "<unk>", "a", "dog"]  # a: 4, dog: 2; the rest once
    ids = vocab.encode(tokenize("a dog on a cat"), max_len=8)
    assert ids == [4, 5, UNK, 4, UNK, EOS, PAD, PAD]
    assert vocab.decode(ids) == "a dog <unk> a <unk>"
    assert vocab.decode([4, 5, EOS, 4, 4]) == "a dog"  # decoding stops at <eos>
    assert vocab.encode(tokenize("a dog a dog a dog"), max_len=4) == [4, 5, 4, EOS]  # cut, <eos> kept
    assert Vocab(vocab.itos) == vocab  # what a checkpoint keeps: the list of words
    again = Vocab.build((tokenize(t) for t in reversed(texts)), min_count=1)
    assert again.itos == Vocab.build((tokenize(t) for t in texts), min_count=1).itos  # order-independent ids
    with pytest.raises(DataError, match="no word occurs 2 times in the training captions"):
        Vocab.build((tokenize(t) for t in ["一只狗", "2 + 2", "一只猫", "a dog"]), min_count=2)  # nothing to caption with


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    make_toy_world(root, seed=3, n_train=40, n_dev=6, n_test=6, regions=5, dim=12)
    return root


def test_load_split_memory_maps_features_and_groups_five_captions(small_world):
    features, captions = load_split(small_world, "train")
    assert isinstance(features, np.memmap) and features.dtype == np.float32 and features.shape == (40, 5, 12)
    assert len(captions) == 200
    scenes = json.loads((small_world / "train_scenes.json").read_text())
    main_nouns = [{*CATEGORIES[s["objects"][0]["category"]], KIND[s["objects"][0]["category"]]} for s in scenes]
    for line, caption in enumerate(captions):  # every caption names its own image's main object, or its kind
        assert main_nouns[line // 5] & set(tokenize(caption)), (line, caption)


def copy_split(src, dst, split="train"):
    dst.mkdir()
    for suffix in ("_ims.npy", "_caps.txt"):
        shutil.copy(src / f"{split}{suffix}", dst / f"{split}{suffix}")
    return dst


def test_load_split_rejects_bad_input_with_one_clear_sentence(small_world, tmp_path):
    with pytest.raises(DataError, match=r"test_ims\.npy not found; use --dataset toy, or download"):
        load_split(tmp_path, "test")
    short = copy_split(small_world, tmp_path / "short")
    lines = (short / "train_caps.txt").read_text().splitlines()
    (short / "train_caps.txt").write_text("\n".join(lines[:-1]) + "\n")  # the last image has 4 captions
    with pytest.raises(DataError, match="199 captions for 40 images.*exactly 5 per image"):
        load_split(short, "train")
    flat = copy_split(small_world, tmp_path / "flat")
    np.save(flat / "train_ims.npy", np.zeros((40, 12), dtype=np.float32))
    with pytest.raises(DataError, match=r"shaped \(images, regions, dim\), got float32 \(40, 12\)"):
        load_split(flat, "train")
    (flat / "train_ims.npy").write_text("not numpy")
    with pytest.raises(DataError, match="not a readable .npy"):
        load_split(flat, "train")


def caption_file_with(small_world, tmp_path, damage):
    broken = copy_split(small_world, tmp_path / "broken")
    data = (broken / "train_caps.txt").read_bytes()
    (broken / "train_caps.txt").write_bytes(damage(data))
    return broken


@pytest.mark.parametrize("damage, message", [
    (lambda data: data.replace(b"\n", b"\n\n", 1), r"line 2 of .*train_caps\.txt is empty \(image 0\); every image "
                                                   r"needs 5 non-empty captions"),
    (lambda data: b"a dog\n   \n" + data.split(b"\n", 2)[2], r"line 2 of .*train_caps\.txt is empty"),
    (lambda data: data[:100] + b"\xff" + data[100:], r"train_caps\.txt is not UTF-8 text \(byte 0xff on line 2\); "
                                                     r"save it as UTF-8"),
], ids=["empty line", "blank line", "non-utf8"])
def test_damaged_caption_file_is_a_one_line_error(small_world, tmp_path, damage, message):
    with pytest.raises(DataError, match=message):
        load_split(caption_file_with(small_world, tmp_path, damage), "train")


def test_blank_lines_at_the_end_of_a_caption_file_are_ignored(small_world, tmp_path):
    padded = caption_file_with(small_world, tmp_path, lambda data: data + b"\n  \n")
    assert load_split(padded, "train")[1] == load_split(small_world, "train")[1]


def test_nonfinite_images_finds_nan_and_inf_rows_chunk_by_chunk(tmp_path):
    features = np.ones((10, 3, 4), dtype=np.float32)
    features[2, 1, 3], features[7, 0, 0], features[9, 2, 1] = np.nan, np.inf, -np.inf
    np.save(tmp_path / "x.npy", features)
    for chunk in (1, 3, 64):
        assert nonfinite_images(np.load(tmp_path / "x.npy", mmap_mode="r"), chunk).tolist() == [2, 7, 9]


def test_toy_world_is_deterministic_for_a_seed(tmp_path):
    digests = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        make_toy_world(tmp_path / name, seed=seed, n_train=30, n_dev=5, n_test=5, regions=4, dim=8)
        digests.append(hashlib.sha256(b"".join((tmp_path / name / f).read_bytes() for f in sorted(
            p.name for p in (tmp_path / name).iterdir()))).hexdigest())
    assert digests[0] == digests[1] != digests[2]


@pytest.fixture(scope="module")
def default_train_split(tmp_path_factory):
    """The default-sized training split (3000 images): the proportions below are measured on it."""
    root = tmp_path_factory.mktemp("default")
    make_toy_world(root, n_dev=1, n_test=1)
    return load_split(root, "train")[1], json.loads((root / "train_scenes.json").read_text())


def test_toy_captions_of_one_image_differ_in_specificity(default_train_split):
    captions, scenes = default_train_split
    length = defaultdict(list)
    for i, scene in enumerate(scenes):
        assert sorted(scene["levels"]) == [0, 0, 1, 2, 3]
        for k, level in enumerate(scene["levels"]):
            length[level].append(len(tokenize(captions[5 * i + k])))
    mean = [np.mean(length[level]) for level in range(4)]
    assert mean[0] < mean[1] < mean[2] < mean[3] and mean[3] > mean[0] + 4  # more words, more detail
    assert max(max(v) for v in length.values()) <= 16  # fits the papers' 16-word limit


def test_toy_generic_content_is_shared_but_captions_rarely_repeat_word_for_word(default_train_split):
    captions, scenes = default_train_split
    images_of, images_saying = defaultdict(set), defaultdict(set)
    for line, caption in enumerate(captions):
        images_of[" ".join(tokenize(caption))].add(line // 5)
        images_saying[caption_content(caption)].add(line // 5)
    exact, content = defaultdict(list), defaultdict(list)
    for i, scene in enumerate(scenes):
        for k, level in enumerate(scene["levels"]):
            exact[level].append(len(images_of[" ".join(tokenize(captions[5 * i + k]))]) > 1)
            content[level].append(len(images_saying[caption_content(captions[5 * i + k])]) > 1)
    content = {level: np.mean(v) for level, v in content.items()}
    assert content[0] > 0.95 and content[3] < 0.2  # measured: 1.0 and 0.085
    assert content[0] > content[1] > content[2] > content[3]
    duplicated = np.mean([len(images_of[" ".join(tokenize(c))]) > 1 for c in captions])
    assert duplicated < 0.05 and np.mean(exact[0]) < 0.1  # measured: 0.029 and 0.069 (COCO 5K: 0.013)


def test_toy_objects_depend_on_the_place_and_on_the_main_object(default_train_split):
    _, scenes = default_train_split
    counts = np.bincount([obj["category"] for s in scenes for obj in s["objects"]], minlength=len(CATEGORIES))
    assert np.sort(counts)[::-1][:3].sum() > 0.3 * counts.sum() and counts.max() > 10 * counts.min()  # skewed

    def holding(name, scenes):
        return np.mean([any(CATEGORIES[obj["category"]][0] == name for obj in s["objects"]) for s in scenes])
    at = {i: [s for s in scenes if s["place"] == i] for i in range(len(PLACES))}
    assert holding("surfboard", at[0]) > 0.3 and holding("surfboard", at[1]) == 0  # beach, kitchen; measured: 0.44
    assert holding("stove", at[1]) > 0.15 and holding("stove", scenes) < 0.05  # measured: 0.22 and 0.03
    main = lambda s: CATEGORIES[s["objects"][0]["category"]][0]
    with_dog, with_people = [s for s in at[3] if main(s) == "dog"], [s for s in at[3] if main(s) in ("man", "child")]
    assert holding("frisbee", with_dog) > 2 * holding("frisbee", with_people)  # in a park, a dog brings its frisbee
    # measured: 0.30 against 0.08


def test_toy_scenes_hold_distinct_objects_and_weak_ones_are_faint_in_the_features():
    """A scene never holds a category twice; a weak context object gives one faint box (strength 0.35), the others
    1-2 full ones: measured as each object's best region projection on its category direction."""
    rng = np.random.default_rng(0)
    unit = lambda n: (lambda r: r / np.linalg.norm(r, axis=1, keepdims=True))(rng.standard_normal((n, 128)))
    directions = {"category": unit(len(CATEGORIES)), "colour": unit(9), "size": unit(2), "position": unit(3),
                  "place": unit(len(PLACES))}
    best = {"main": [], "strong": [], "weak": []}
    for _ in range(1000):
        scene = common._scene(rng)
        categories = [obj["category"] for obj in scene["objects"]]
        assert len(set(categories)) == len(categories)
        features = common._regions(scene, directions, rng, 12, 128)
        for k, obj in enumerate(scene["objects"]):
            kind = "main" if k == 0 else "weak" if obj["weak"] else "strong"
            best[kind].append((features @ directions["category"][obj["category"]]).max())
    assert np.percentile(best["weak"], 90) < np.percentile(best["strong"], 10)  # measured: 0.24 against 0.36
    assert np.mean(best["strong"]) < np.mean(best["main"])  # the main object is the salient one


def test_toy_main_object_is_named_in_about_four_of_five_captions(default_train_split):
    captions, scenes = default_train_split
    named = [sum(bool(set(CATEGORIES[s["objects"][0]["category"]]) & set(tokenize(c))) for c in captions[5 * i:5 * i + 5])
             for i, s in enumerate(scenes)]
    assert 3.9 < np.mean(named) < 4.5  # measured: 4.23 (COCO and Flickr30K's most frequent word: 4.1-4.3)


# --- Contrastive loss (Eq. 7-10) -------------------------------------------------------------------

def numpy_cl_loss(tp, rp, tn, rn, nu, terms="both"):
    """-J of Eq. 10 written as in the paper: r_nu(z) = 1 / (1 + nu exp(-z)), sums over t and k."""
    r = lambda z: 1.0 / (1.0 + nu * np.exp(-z))
    K, T_m = tn.shape[0], tp.shape[0]
    J = 0.0
    for k in range(K):
        L = 0.0
        if terms in ("both", "pos"):
            L += sum(np.log(r(tp[t] - rp[t])) for t in range(T_m))
        if terms in ("both", "neg"):
            L += sum(np.log(1 - r(tn[k, t] - rn[k, t])) for t in range(T_m))
        J += L
    return -J / (K * T_m)


CASE = dict(tp=np.array([-3.0, -5.0, -2.5]), rp=np.array([-3.5, -4.0, -2.5]),
            tn=np.array([[-9.0, -7.0, -6.0], [-8.0, -6.5, -4.0]]), rn=np.array([[-8.0, -7.5, -6.0], [-9.0, -6.0, -5.0]]))


def cl_loss_of(case, nu=1.0, terms="both"):
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in case.items()}
    return cl.cl_loss(t["tp"], t["rp"], t["tn"], t["rn"], nu=nu, terms=terms).item()


def test_cl_loss_matches_numpy_hand_computation():
    assert cl_loss_of(CASE) == pytest.approx(numpy_cl_loss(**CASE, nu=1.0), abs=1e-12)


def test_cl_loss_with_nu_other_than_one():
    for nu in (0.25, 3.0):
        assert cl_loss_of(CASE, nu=nu) == pytest.approx(numpy_cl_loss(**CASE, nu=nu), abs=1e-12)
    assert cl_loss_of(CASE, nu=3.0) != pytest.approx(cl_loss_of(CASE, nu=1.0))


def test_cl_terms_pos_and_neg_drop_the_other_term():
    pos, neg, both = (cl_loss_of(CASE, terms=t) for t in ("pos", "neg", "both"))
    assert pos == pytest.approx(numpy_cl_loss(**CASE, nu=1.0, terms="pos"), abs=1e-12)
    assert neg == pytest.approx(numpy_cl_loss(**CASE, nu=1.0, terms="neg"), abs=1e-12)
    assert pos + neg == pytest.approx(both, abs=1e-12)
    changed = dict(CASE, tn=CASE["tn"] - 5.0)  # negatives do not enter CL(P); positives not CL(N)
    assert cl_loss_of(changed, terms="pos") == pos
    assert cl_loss_of(dict(CASE, tp=CASE["tp"] + 5.0), terms="neg") == neg


def test_cl_gradient_is_not_zero_when_target_equals_reference():
    """Sec. 4.3, point 1: at G = 0, dJ/dlog p_m = 1/2 per positive and -1/2 per negative (/ T_m, / K T_m)."""
    tp = torch.tensor(CASE["tp"], requires_grad=True)
    tn = torch.tensor(CASE["tn"], requires_grad=True)
    cl.cl_loss(tp, tp.detach(), tn, tn.detach()).backward()
    K, T_m = tn.shape[0], tp.shape[0]
    assert torch.allclose(tp.grad, torch.full_like(tp, -0.5 / T_m))
    assert torch.allclose(tn.grad, torch.full_like(tn, 0.5 / (K * T_m)))
    # and through real models: a target identical to its reference still moves
    target, reference = tiny_model("showtell"), tiny_model("showtell")
    feats, pos = tiny_feats(2), torch.randint(4, VOCAB_SIZE, (10, 5))
    neg = torch.randint(4, VOCAB_SIZE, (3, 10, 5))
    cl.cl_loss(*cl.contrastive_log_probs(target, reference, feats, pos, neg)).backward()
    assert sum(p.grad.abs().sum() for p in target.parameters()) > 0
    assert all(p.grad is None for p in reference.parameters())


def test_cl_loss_is_finite_for_very_small_log_probs():
    tp = torch.tensor([-1e4, -2.0], requires_grad=True)
    tn = torch.tensor([[-2.0, -1e4]], requires_grad=True)
    loss = cl.cl_loss(tp, torch.tensor([-1.0, -1e4]), tn, torch.tensor([[-1e4, -1.0]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(tp.grad).all() and torch.isfinite(tn.grad).all()
    # G_pos = (-9999, 9998), G_neg = (9998, -9999); -log sigmoid(-x) = x for large x, ~0 for -x
    assert loss.item() == pytest.approx((9999 + 0) / 2 + (9998 + 0) / 2, rel=1e-6)


def test_contrastive_log_probs_are_the_per_pair_log_probs():
    """The one batched forward pairs caption i of image b (and its K negatives) with image b."""
    target, reference = tiny_model("adaatt", 0), tiny_model("showtell", 1)  # different architectures
    feats = tiny_feats(2)
    pos = torch.randint(4, VOCAB_SIZE, (10, 6))
    pos[:, 3] = EOS
    neg = torch.randint(4, VOCAB_SIZE, (2, 10, 6))
    tp, rp, tn, rn = cl.contrastive_log_probs(target, reference, feats, pos, neg)
    for i in range(10):
        image = feats[i // 5]
        assert tp[i].item() == pytest.approx(step_by_step_log_prob(target, image, pos[i].tolist()), abs=1e-4)
        assert rp[i].item() == pytest.approx(step_by_step_log_prob(reference, image, pos[i].tolist()), abs=1e-4)
        for k in range(2):
            assert tn[k, i].item() == pytest.approx(step_by_step_log_prob(target, image, neg[k, i].tolist()), abs=1e-4)
            assert rn[k, i].item() == pytest.approx(step_by_step_log_prob(reference, image, neg[k, i].tolist()), abs=1e-4)
    assert not rp.requires_grad and tp.requires_grad


# --- Captioners: log p(c|I) and decoding ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["showtell", "adaatt"])
def test_log_prob_is_sum_of_word_log_probs_including_eos(kind):
    model, feats = tiny_model(kind), tiny_feats(3)
    captions = torch.tensor([[5, 6, 7, EOS, PAD, PAD], [8, EOS, PAD, PAD, PAD, PAD], [4, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        got = model(feats, captions)
    for i in range(3):
        expected = step_by_step_log_prob(model, feats[i], captions[i].tolist())
        assert got[i].item() == pytest.approx(expected, abs=1e-4)
    without_eos = step_by_step_log_prob(model, feats[0], [5, 6, 7])
    assert got[0].item() < without_eos - 1e-3  # <eos> contributes its (negative) log-prob


SWEEP = [(seed, eos_bias) for seed in range(3) for eos_bias in (0.5, 1.5, 2.5)]  # short, long, unfinished


@pytest.mark.parametrize("kind", ["showtell", "adaatt"])
def test_log_prob_equals_the_log_prob_accumulated_by_greedy_decoding(kind):
    lengths = set()
    for seed, eos_bias in SWEEP:
        model, feats = tiny_model(kind, seed, eos_bias), tiny_feats(6, seed)
        with torch.no_grad():
            captions, accumulated = model.greedy(feats, max_len=8)
            assert torch.allclose(model(feats, captions), accumulated, atol=1e-4)
        lengths |= set(cl.caption_mask(captions).sum(1).tolist())
    assert len(lengths) >= 3 and 8 in lengths  # the sweep has finished captions of several lengths and unfinished ones


@pytest.mark.parametrize("kind", ["showtell", "adaatt"])
def test_padding_after_eos_changes_nothing(kind):
    model, feats = tiny_model(kind), tiny_feats(2)
    captions = torch.tensor([[5, 6, EOS, PAD, PAD], [7, EOS, PAD, PAD, PAD]])
    garbage = torch.tensor([[5, 6, EOS, 9, 4, 11, 3], [7, EOS, 8, 8, 8, 8, 8]])
    with torch.no_grad():
        assert torch.allclose(model(feats, captions), model(feats, garbage), atol=1e-6)
        assert torch.allclose(model(feats, captions), model(feats, captions[:, :3]), atol=1e-6)


@pytest.mark.parametrize("kind", ["showtell", "adaatt"])
def test_beam_size_one_equals_greedy(kind):
    for seed, eos_bias in SWEEP:
        model, feats = tiny_model(kind, seed, eos_bias), tiny_feats(6, seed)
        with torch.no_grad():
            greedy, greedy_scores = model.greedy(feats, max_len=8)
            beam, beam_scores = model.beam_search(feats, beam_size=1, max_len=8)
        assert torch.equal(greedy, beam)
        assert torch.allclose(greedy_scores, beam_scores, atol=1e-5)


@pytest.mark.parametrize("kind", ["showtell", "adaatt"])
def test_larger_beam_never_scores_below_greedy(kind):
    better = 0
    for seed, eos_bias in SWEEP:
        model, feats = tiny_model(kind, seed, eos_bias), tiny_feats(6, seed)
        with torch.no_grad():
            _, greedy_scores = model.greedy(feats, max_len=8)
            for k in (2, 4):
                captions, scores = model.beam_search(feats, beam_size=k, max_len=8)
                assert (scores >= greedy_scores - 1e-5).all()
                assert torch.allclose(model(feats, captions), scores, atol=1e-4)
                assert not ((captions == PAD) | (captions == BOS))[:, 0].any()
                better += int((scores > greedy_scores + 1e-3).sum())
    assert better > 0  # the beam does find better captions somewhere in the sweep


# --- Negatives and self-retrieval -----------------------------------------------------------------

def test_negative_sampling_never_returns_the_same_image():
    rng = np.random.default_rng(0)
    image_ids = np.array([0, 3, 4, 6])
    negatives = cl.sample_negatives(image_ids, n_images=7, K=500, rng=rng)
    assert negatives.shape == (500, 4)
    assert (negatives != image_ids[None]).all()
    assert ((negatives >= 0) & (negatives < 7)).all()
    for b, image in enumerate(image_ids):  # every other image of the split can be drawn
        assert set(negatives[:, b]) == set(range(7)) - {image}
    assert (cl.sample_negatives(np.array([0, 1]), 2, 5, rng) == np.array([1, 0])).all()


def test_self_retrieval_recall_on_known_ranks():
    # caption t's own image (the diagonal) is beaten by exactly t other images: ranks 0, 1, 2, 3
    logp = np.array([[0.0, -1.0, -2.0, -3.0],
                     [0.5, 0.0, -2.0, -3.0],
                     [0.5, 0.6, 0.0, -3.0],
                     [0.1, 0.2, 0.3, 0.0]])
    recall = cl.self_retrieval_recall(logp, ks=(1, 2, 3, 500))
    assert recall == {"R@1": 25.0, "R@2": 50.0, "R@3": 75.0, "R@500": 100.0}


def test_self_retrieval_ties_count_against_the_query():
    assert cl.self_retrieval_recall(np.zeros((4, 4)), ks=(1, 3, 4)) == {"R@1": 0.0, "R@3": 0.0, "R@4": 100.0}
    logp = np.array([[0.0, 0.0, 0.0, -1.0],  # own image tied with two others at the top
                     [-1.0, 0.0, -2.0, -3.0],
                     [-1.0, -1.0, 0.0, -1.0],
                     [-1.0, -1.0, -1.0, 0.0]])
    recall = cl.self_retrieval_recall(logp, ks=(1, 2, 3))
    assert recall == {"R@1": 75.0, "R@2": 75.0, "R@3": 100.0}  # caption 0: a miss at R@1 and R@2, a hit at R@3


def test_self_retrieval_nan_is_a_miss():
    logp = np.array([[np.nan, -1.0, -2.0], [-1.0, 0.0, np.nan], [0.0, 0.0, 0.0]])
    # caption 0: its own score is NaN; caption 1: a NaN rival is not below it; caption 2: tied
    assert cl.self_retrieval_recall(logp, ks=(1, 2, 3)) == pytest.approx({"R@1": 0.0, "R@2": 100 / 3, "R@3": 200 / 3})


def test_self_retrieval_recall_equals_a_brute_force_loop():
    rng = np.random.default_rng(0)
    logp = rng.integers(-3, 1, size=(40, 40)).astype(float)  # many ties
    logp[rng.random((40, 40)) < 0.05] = np.nan
    ks = (1, 2, 5, 10, 40, 50)
    hits = {k: 0 for k in ks}
    for t in range(40):
        own = logp[t, t]
        rank = 40 if np.isnan(own) else sum(1 for j in range(40) if j != t and not logp[t, j] < own)
        for k in ks:
            hits[k] += rank < min(k, 40)
    assert cl.self_retrieval_recall(logp, ks) == pytest.approx({f"R@{k}": 100 * hits[k] / 40 for k in ks})


def test_image_blind_captioner_scores_zero_self_retrieval():
    model = tiny_model("showtell")
    with torch.no_grad():
        model.image_embed.weight.zero_()  # every image looks the same: p(c|I_j) equal for all j
    feats = tiny_feats(6)
    captions = model.greedy(feats, 5)[0]
    logp = cl.retrieval_log_probs(model, feats.numpy(), np.arange(6), captions, "cpu", pairs_per_forward=12)
    assert (logp == logp[:, :1]).all()
    assert cl.self_retrieval_recall(logp, ks=(1, 5)) == {"R@1": 0.0, "R@5": 0.0}


@pytest.mark.parametrize("pairs_per_forward", [3, 7, 100])
def test_retrieval_log_probs_match_one_pair_at_a_time(pairs_per_forward):
    model, feats = tiny_model("adaatt"), tiny_feats(5)
    captions = torch.tensor([[5, 6, EOS, PAD], [7, 8, 9, EOS], [4, EOS, PAD, PAD], [6, 6, EOS, PAD], [9, EOS, PAD, PAD]])
    pairs, widths = [], []
    score = model.log_prob_encoded
    model.log_prob_encoded = lambda memory, c, index: pairs.append(len(c)) or widths.append(c.shape[1]) or \
        score(memory, c, index)
    logp = cl.retrieval_log_probs(model, feats.numpy(), np.arange(5), captions, "cpu", pairs_per_forward)
    assert max(pairs) <= pairs_per_forward and sum(pairs) == 25  # memory bounded: never more pairs at once
    if pairs_per_forward == 3:  # one caption against 3, then 2 images: cut to its own length, <eos> included
        assert widths == [3, 3, 4, 4, 2, 2, 3, 3, 2, 2]
    for t in range(5):
        for j in range(5):
            assert logp[t, j].item() == pytest.approx(step_by_step_log_prob(model, feats[j], captions[t].tolist()), abs=1e-4)


def real_coco_check():
    """Candidate: the first human caption of each real COCO image; references: the other four."""
    images = [REAL_COCO_CAPTIONS[5 * i:5 * i + 5] for i in range(len(REAL_COCO_ROWS))]
    return [caps[1:] for caps in images], [caps[0] for caps in images], REAL_COCO_ROWS


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer and METEOR need java (CI has it)")
def test_caption_metrics_equal_coco_eval_cap_without_spice_on_real_captions(monkeypatch):
    import pycocoevalcap.eval
    from pycocotools.coco import COCO
    references, candidates, image_ids = real_coco_check()
    coco = COCO()  # the official evaluation's input, built here by hand
    coco.dataset = {"images": [{"id": i} for i in image_ids],
                    "annotations": [{"id": 10 * i + k, "image_id": i, "caption": c}
                                    for i, refs in zip(image_ids, references) for k, c in enumerate(refs)]}
    coco.createIndex()
    results = [{"image_id": i, "caption": c} for i, c in zip(image_ids, candidates)]  # the COCO results format
    coco_res = coco.loadRes(results)

    class NoSpice:  # SPICE downloads Stanford models at run time: COCOEvalCap's other scorers run unchanged
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(pycocoevalcap.eval, "Spice", NoSpice)
    monkeypatch.setattr(pycocoevalcap.eval, "Meteor", cl.meteor_scorer)  # the same jar: one java start (~10 s), not two
    official = pycocoevalcap.eval.COCOEvalCap(coco, coco_res)
    official.evaluate()
    got = cl.caption_metrics(references, image_ids, results)
    names = {"BLEU-1": "Bleu_1", "BLEU-2": "Bleu_2", "BLEU-3": "Bleu_3", "BLEU-4": "Bleu_4", "METEOR": "METEOR",
             "ROUGE-L": "ROUGE_L", "CIDEr": "CIDEr"}
    assert set(got) == set(names)
    for ours, theirs in names.items():
        assert got[ours] == pytest.approx(official.eval[theirs], abs=1e-9, rel=0), ours
    monkeypatch.setattr(cl, "ptb_available", lambda: False)  # the [a-z]+ fallback is not the official score
    az = cl.caption_metrics(references, image_ids, results)
    assert abs(az["CIDEr"] - official.eval["CIDEr"]) > 1e-3


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs java (CI has it)")
def test_ctrl_c_during_meteor_leaves_no_lock_that_would_hang_the_exit(monkeypatch):
    from pycocoevalcap.meteor.meteor import Meteor
    scorer = cl.meteor_scorer()

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(Meteor, "_stat", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cl.meteor({1: ["a dog"]}, {1: ["a dog"]})
    assert not scorer.lock.locked() and scorer.meteor_p.wait(timeout=10) is not None  # __del__ would not block
    assert cl.meteor_scorer() is not scorer  # the next score starts a fresh METEOR


def test_caption_metrics_without_java_use_az_tokens_and_say_so(monkeypatch, capsys):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    monkeypatch.setattr(cl, "ptb_available", lambda: False)
    cl.warn_no_java.cache_clear()
    references = [["A dog on the grass.", "a puppy in a field"], ["A red bus on the street", "a bus on a road"],
                  ["A man in blue near a kite", "a guy with a kite on the beach"]]
    candidates = ["a dog on the grass", "a bus, on the road", "a man on the beach"]
    results = [{"image_id": i, "caption": c} for i, c in zip([7, 3, 5], candidates)]
    got = cl.caption_metrics(references, [7, 3, 5], results)
    assert "java not found" in capsys.readouterr().err and "METEOR" not in got
    gts = {7: ["a dog on the grass", "a puppy in a field"], 3: ["a red bus on the street", "a bus on a road"],
           5: ["a man in blue near a kite", "a guy with a kite on the beach"]}
    res = {7: ["a dog on the grass"], 3: ["a bus on the road"], 5: ["a man on the beach"]}
    assert [got[f"BLEU-{n}"] for n in range(1, 5)] == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0])
    assert got["ROUGE-L"] == pytest.approx(Rouge().compute_score(gts, res)[0])
    assert got["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0])


def test_image_ids_come_from_scan_ids_file_per_image_or_per_caption(tmp_path):
    assert cl.load_image_ids(tmp_path, "testall", 3) == [0, 1, 2]  # no file: the row index
    (tmp_path / "testall_ids.txt").write_text("391895\n522418\n184613\n")
    assert cl.load_image_ids(tmp_path, "testall", 3) == [391895, 522418, 184613]
    (tmp_path / "testall_ids.txt").write_text("".join(f"{i}\n" * 5 for i in (391895, 522418, 184613)))
    assert cl.load_image_ids(tmp_path, "testall", 3) == [391895, 522418, 184613]
    (tmp_path / "testall_ids.txt").write_text("1\n2\n")
    with pytest.raises(DataError, match="must hold 3 distinct image ids"):
        cl.load_image_ids(tmp_path, "testall", 3)
    (tmp_path / "testall_ids.txt").write_text("1\nCOCO_2\n3\n")
    with pytest.raises(DataError, match="one integer image id a line"):
        cl.load_image_ids(tmp_path, "testall", 3)


# --- Configuration ---------------------------------------------------------------------------------

def test_toy_overrides_apply_only_where_the_user_gave_no_flag():
    assert (cl.parse_args(["--dataset", "coco"]).rnn_size, cl.parse_args(["--dataset", "coco"]).lr) == (512, 4e-4)
    assert cl.parse_args(["--dataset", "coco", "--ref", "x.pt"]).lr == 1e-6  # the paper's CL rate
    toy = cl.parse_args([])
    assert (toy.rnn_size, toy.lr) == (cl.TOY_OVERRIDES["mle"]["rnn_size"], cl.TOY_OVERRIDES["mle"]["lr"])
    assert cl.parse_args(["--rnn-size", "64"]).rnn_size == 64
    assert cl.parse_args(["--ref=x.pt", "--lr=1e-6"]).lr == 1e-6
    assert cl.parse_args(["--ref", "x.pt"]).lr == cl.TOY_OVERRIDES["cl"]["lr"]


@pytest.mark.parametrize("flag, refused, accepted", [  # each numeric flag at the edge of what can work, by hand
    ("--batch-images", 0, 1), ("--K", 0, 1), ("--epochs", 0, 1), ("--max-steps", -1, 0), ("--save-every", -1, 0),
    ("--rnn-size", 0, 1), ("--emb-size", 0, 1), ("--max-words", 0, 1), ("--min-count", 0, 1), ("--beam-size", 0, 1),
    ("--val-images", 0, 1), ("--retrieval-images", -1, 0), ("--pairs-per-forward", 0, 1),
    ("--replace-ref-every", -1, 0), ("--threads", -1, 0), ("--examples", -1, 0), ("--seed", -1, 0),
    ("--lr", 1.01, 1.0), ("--lr", 0.0, 1e-9), ("--nu", 0.0, 1e-9), ("--grad-clip", 0.0, 1e-9), ("--dropout", 1.0, 0.99),
    ("--dropout", -0.01, 0.0), ("--beta1", 1.0, 0.99), ("--target-dropout", 1.0, 0.0)])
def test_each_bound_refuses_the_first_value_outside_and_takes_the_last_inside(flag, refused, accepted):
    with pytest.raises(DataError, match=f"^{flag} "):
        cl.parse_args([flag, str(refused)])
    assert getattr(cl.parse_args([flag, str(accepted)]), flag[2:].replace("-", "_")) == accepted


def test_real_captions_are_cut_at_the_papers_18_words_and_the_toy_grammar_at_its_16():
    for dataset in ("coco", "flickr30k"):  # Sec. 5.1: "truncated to have at most 18 words"
        assert cl.parse_args(["--dataset", dataset]).max_words == cl.parse_args(["--dataset", dataset, "--ref", "x"]).max_words == 18
    assert cl.parse_args([]).max_words == cl.parse_args(["--ref", "x"]).max_words == 16
    assert cl.parse_args(["--max-words", "20"]).max_words == 20


# --- End to end on a tiny toy world ----------------------------------------------------------------

TINY = ["--rnn-size", "16", "--emb-size", "16", "--batch-images", "5",
        "--retrieval-images", "10", "--examples", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    make_toy_world(root, n_train=60, n_dev=10, n_test=10, regions=4, dim=16)
    return root


@pytest.fixture(scope="module")
def mle_checkpoint(world):
    out = world.parent / "mle"
    cl.main(["--data-root", str(world), "--out-dir", str(out), "--epochs", "8", "--lr", "1e-2"] + TINY)
    return out / "best.pt"


def train_nll(path, world):
    """Per-word negative log-likelihood (Eq. 1) of the training captions, dropout off."""
    features, text = load_split(world, "train")
    vocab = Vocab.build((tokenize(c) for c in text), 5)
    model, _ = cl.load_captioner(path, vocab, features.shape[2], "cpu", "toy")
    captions = torch.from_numpy(cl.encode_captions(vocab, text, 16).reshape(len(text), -1))
    with torch.no_grad():
        log_probs = model.eval().log_prob_encoded(model.encode(torch.from_numpy(np.array(features))), captions,
                                                  torch.arange(len(features)).repeat_interleave(5))
    return cl.mle_loss(log_probs, captions).item(), len(vocab)


def test_mle_training_lowers_the_loss(mle_checkpoint, world):
    nll, vocab_size = train_nll(mle_checkpoint, world)
    assert nll < 0.7 * np.log(vocab_size)  # an untrained model sits near ln V per word
    ckpt = load_checkpoint(mle_checkpoint)
    assert ckpt["model"]["kwargs"]["rnn_size"] == 16 and ckpt["stage"] == "mle" and ckpt["vocab"][0] == "<pad>"


def test_cl_run_loads_reference_trains_evaluates_and_keeps_reference_frozen(mle_checkpoint, world, capsys):
    out = world.parent / "cl"
    result = cl.main(["--data-root", str(world), "--ref", str(mle_checkpoint), "--out-dir", str(out),
                      "--epochs", "1", "--K", "2", "--lr", "1e-3"] + TINY)
    printed = capsys.readouterr().out
    assert "reference" in printed and "CL target" in printed and "R@1" in printed
    assert set(result) == {"reference", "target"} and "CIDEr" in result["target"] and "R@5" in result["reference"]
    reference, last = load_checkpoint(mle_checkpoint), load_checkpoint(out / "last.pt")
    assert last["stage"] == "cl" and last["step"] == 12
    for name, value in reference["model"]["state"].items():
        assert torch.equal(last["reference"]["state"][name], value), name  # bit-identical after CL
    assert any(not torch.equal(last["model"]["state"][n], v) for n, v in reference["model"]["state"].items())


def test_replace_ref_every_epoch_makes_the_best_target_the_reference(mle_checkpoint, world):
    out = world.parent / "replaced"
    cl.main(TINY + ["--data-root", str(world), "--ref", str(mle_checkpoint), "--out-dir", str(out), "--epochs", "1",
                    "--K", "2", "--lr", "1e-3", "--replace-ref-every", "1", "--retrieval-images", "0"])
    best, last = load_checkpoint(out / "best.pt"), load_checkpoint(out / "last.pt")
    for name, value in best["model"]["state"].items():
        assert torch.equal(last["reference"]["state"][name], value), name


def test_replace_ref_every_2_replaces_after_the_second_epoch_only(mle_checkpoint, world, capsys):
    out = world.parent / "replaced-2"
    cl.main(TINY + ["--data-root", str(world), "--ref", str(mle_checkpoint), "--out-dir", str(out), "--epochs", "2",
                    "--K", "2", "--lr", "1e-3", "--replace-ref-every", "2", "--retrieval-images", "0"])
    printed = capsys.readouterr().out
    assert printed.count("reference replaced") == 1
    assert printed.index("epoch 2: dev CIDEr") < printed.index("reference replaced")  # not after epoch 1


def test_the_reference_scores_every_cl_step_in_eval_mode_with_dropout_off(mle_checkpoint, world, monkeypatch):
    modes, original = [], cl.contrastive_log_probs
    def watched(target, reference, *rest):
        if not modes:  # a hook inside the reference's own forward: whatever sets its mode before, it sees
            reference.register_forward_pre_hook(lambda module, inputs: modes.append(module.training))
            assert reference.dropout.p > 0  # the MLE checkpoint's 0.5: train mode would draw masks
        return original(target, reference, *rest)
    monkeypatch.setattr(cl, "contrastive_log_probs", watched)
    cl.main(TINY + ["--data-root", str(world), "--ref", str(mle_checkpoint), "--out-dir", str(world.parent / "eval-ref"),
                    "--epochs", "1", "--K", "2", "--lr", "1e-3", "--retrieval-images", "0"])
    assert len(modes) == 12 and not any(modes)  # every step of the epoch


def test_resume_continues_an_interrupted_run_from_its_step(mle_checkpoint, world):
    common = TINY + ["--data-root", str(world), "--ref", str(mle_checkpoint), "--K", "2", "--lr", "1e-3",
                     "--epochs", "1", "--retrieval-images", "0"]
    straight, interrupted = world.parent / "straight", world.parent / "interrupted"
    cl.main(common + ["--out-dir", str(straight), "--max-steps", "5"])
    cl.main(common + ["--out-dir", str(interrupted), "--max-steps", "2"])
    assert load_checkpoint(interrupted / "last.pt")["step"] == 2
    cl.main(common + ["--out-dir", str(interrupted), "--max-steps", "5", "--resume"])
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(interrupted / "last.pt")
    assert b["step"] == 5
    for name, value in a["model"]["state"].items():
        assert torch.allclose(b["model"]["state"][name], value, atol=1e-6), name


def assert_same_leaves(a, b, where="last.pt"):
    """Every leaf of two checkpoints equal (tensors bit for bit), but the flags (--resume, --out-dir differ)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a.keys() - {"args"}:
            assert_same_leaves(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_leaves(x, y, f"{where}/{i}")
    else:
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, where


def signal_on_call(monkeypatch, owner, name, call, *signals):
    """owner.name sends `signals` to this process on its `call`th call (before doing its work)."""
    original, calls = getattr(owner, name), []
    def signalling(*args, **kwargs):
        calls.append(1)
        for signum in signals if len(calls) == call else ():
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, signalling)


SIGNAL_MOMENTS = {  # (what is patched, its call that signals, the signals, the step last.pt keeps, the exit status)
    "SIGINT in step 13": (lambda: cl, "cl_loss", 13, [signal.SIGINT], 13, 130),
    "SIGTERM in epoch 1's validation": (lambda: cl, "validate", 1, [signal.SIGTERM], 12, 143),
    "SIGHUP, then SIGTERM, in the save of step 10": (lambda: torch, "save", 2, [signal.SIGHUP, signal.SIGTERM], 10, 129)}


@pytest.mark.parametrize("moment", SIGNAL_MOMENTS)
def test_a_signal_at_any_moment_saves_a_consistent_last_pt_and_resume_is_bit_identical(moment, mle_checkpoint, world,
                                                                                      monkeypatch, capfd):
    """2 CL epochs of 12 steps, the reference replaced after each, last.pt every 5 steps. A signal mid-step, during the
    epoch's end or during a save leaves last.pt at that step (an epoch's end whole: best.pt agrees); resumed, the run
    ends with every leaf of last.pt and best.pt bit-identical to a run never interrupted, reference included."""
    common = TINY + ["--data-root", str(world), "--ref", str(mle_checkpoint), "--K", "2", "--lr", "1e-3", "--epochs",
                     "2", "--retrieval-images", "0", "--replace-ref-every", "1", "--save-every", "5"]
    straight, interrupted = world.parent / "straight-signals", world.parent / f"signalled-{moment.split()[0]}"
    if not (straight / "last.pt").exists():
        cl.main(common + ["--out-dir", str(straight)])
    owner, name, call, signals, step, code = SIGNAL_MOMENTS[moment]
    with monkeypatch.context() as patch:
        signal_on_call(patch, owner(), name, call, *signals)
        with pytest.raises(SystemExit) as exit_:
            cl.main(common + ["--out-dir", str(interrupted)])
    printed = capfd.readouterr()
    assert exit_.value.code == code and load_checkpoint(interrupted / "last.pt")["step"] == step
    assert f"interrupted by {signals[0].name} at step {step}; {interrupted / 'last.pt'} keeps step {step}; continue " \
           f"with the same command plus --resume" in printed.out
    assert ("still saving" in printed.err) == (len(signals) > 1)
    if step == 12:  # the epoch's end finished: best.pt and last.pt's best agree
        assert load_checkpoint(interrupted / "best.pt")["best_score"] == load_checkpoint(interrupted / "last.pt")["best_score"]
    cl.main(common + ["--out-dir", str(interrupted), "--resume"])
    for name in ("last.pt", "best.pt"):
        assert_same_leaves(load_checkpoint(straight / name), load_checkpoint(interrupted / name), name)


def test_mismatched_checkpoint_is_a_one_line_error(mle_checkpoint, world):
    other = world.parent / "other"
    make_toy_world(other, n_train=60, n_dev=10, n_test=10, regions=4, dim=8)  # 8-dim features, not 16
    run = subprocess.run([sys.executable, str(HERE / "cl_captioning.py"), "--data-root", str(other),
                          "--eval", str(mle_checkpoint)], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert run.stderr.strip().startswith("error: ") and "Traceback" not in run.stderr
    assert "16-dimensional region features" in run.stderr and "8" in run.stderr
    with pytest.raises(cl.DataError, match="vocabulary"):
        cl.load_captioner(mle_checkpoint, Vocab(["<pad>", "<bos>", "<eos>", "<unk>", "dog"]), 16, "cpu", "toy")


@pytest.mark.parametrize("flags, message", [
    (["--K", "0"], r"^--K must be at least 1, got 0$"),
    (["--batch-images", "0"], r"^--batch-images must be at least 1, got 0$"),
    (["--nu", "0"], r"^--nu must be positive and finite, got 0.0$"),
    (["--out-dir", "{file}/run"], r"^cannot write checkpoints to .*file/run \(Not a directory\); pass --out-dir with a "
                                  r"writable folder$"),
], ids=["K 0", "batch-images 0", "nu 0", "unwritable out-dir"])
def test_nonsense_arguments_are_one_line_errors(world, tmp_path, flags, message):
    (tmp_path / "file").write_text("")
    argv = TINY + ["--data-root", str(world), "--out-dir", str(tmp_path / "run")]
    with pytest.raises(DataError, match=message):
        cl.main(argv + [flag.format(file=tmp_path / "file") for flag in flags])


def world_with_nonfinite(world, root, split, images):
    """A copy of `world` whose `split` images hold a NaN (even positions) or an inf (odd) somewhere."""
    shutil.copytree(world, root)
    features = np.load(root / f"{split}_ims.npy")
    for n, image in enumerate(images):
        features[image, n % 4, 3] = np.inf if n % 2 else np.nan
    np.save(root / f"{split}_ims.npy", features)
    return root


def test_nan_training_image_stops_the_run_before_anything_is_saved(world, tmp_path, capsys):
    root = world_with_nonfinite(world, tmp_path / "nan", "train", [7, 23])
    run = tmp_path / "run"
    with pytest.raises(DataError, match=r"^train images 7, 23 hold NaN or inf region features \(2 of 60\); repair "
                                        r"train_ims\.npy or pass --skip-nonfinite$"):
        cl.main(TINY + ["--data-root", str(root), "--out-dir", str(run), "--epochs", "1"])
    assert not list(run.glob("*.pt"))
    cl.main(TINY + ["--data-root", str(root), "--out-dir", str(run), "--epochs", "1", "--skip-nonfinite"])
    assert "--skip-nonfinite: left out 2 of 60 train images (7, 23)" in capsys.readouterr().out
    last = load_checkpoint(run / "last.pt")
    assert last["step"] == 12 and all(torch.isfinite(v).all() for v in last["model"]["state"].values())


@pytest.mark.parametrize("split", ["dev", "test"])
def test_nan_dev_or_test_image_is_refused_before_training_and_evaluation(world, mle_checkpoint, tmp_path, split):
    root = world_with_nonfinite(world, tmp_path / "nan", split, [3])
    refused = rf"^{split} images 3 hold NaN or inf region features \(1 of 10\); repair {split}_ims\.npy$"
    with pytest.raises(DataError, match=refused):
        cl.main(TINY + ["--data-root", str(root), "--out-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("*.pt"))
    if split == "test":
        with pytest.raises(DataError, match=refused):
            cl.main(TINY + ["--data-root", str(root), "--eval", str(mle_checkpoint)])


def test_nonfinite_loss_stops_with_its_step_and_leaves_last_pt_from_before(world, tmp_path, monkeypatch):
    mle_loss, calls = cl.mle_loss, []

    def nan_at_step_7(log_probs, captions):
        calls.append(1)
        return mle_loss(log_probs, captions) * (math.nan if len(calls) == 7 else 1.0)

    monkeypatch.setattr(cl, "mle_loss", nan_at_step_7)
    run = tmp_path / "run"
    with pytest.raises(DataError, match=r"^the loss became non-finite at step 7 \(MLE loss \(Eq. 1\) nan\); stopped, "
                                        r".*last\.pt keeps step 6; try a lower --lr, or check the data$"):
        cl.main(TINY + ["--data-root", str(world), "--out-dir", str(run), "--epochs", "1", "--save-every", "3"])
    last = load_checkpoint(run / "last.pt")
    assert last["step"] == 6 and all(torch.isfinite(v).all() for v in last["model"]["state"].values())
    assert not (run / "best.pt").exists()


@pytest.mark.parametrize("stage", ["mle", "cl"])
def test_kill_9_at_a_random_step_then_resume_is_bit_identical(stage, world, mle_checkpoint, tmp_path, run_killed):
    """SIGKILL lands anywhere (mid-step, mid-save) after a random mid-epoch checkpoint; --resume then
    replays the lost steps with the same batches, negatives and dropout masks."""
    argv = TINY + ["--data-root", str(world), "--batch-images", "2", "--save-every", "4", "--lr", "1e-2"] + \
        (["--epochs", "3"] if stage == "mle" else ["--ref", str(mle_checkpoint), "--K", "2", "--epochs", "2"])
    steps = 30 * (3 if stage == "mle" else 2)  # 60 images, 2 a step
    straight = cl.main(argv + ["--out-dir", str(tmp_path / "straight")])
    killed = tmp_path / "killed"
    target, saved, _ = run_killed([sys.executable, HERE / "cl_captioning.py", *argv, "--out-dir", killed],
                                  killed / "last.pt", lambda ckpt: ckpt["step"], range(1, 2 * steps // 3))
    # the next save (saved + 4) never completed: fewer than 4 steps were lost and are replayed
    print(f"{stage}: killed after last.pt reached step {target}; it held step {saved} of {steps}")
    resumed = cl.main(argv + ["--out-dir", str(killed), "--resume"])
    after, before = (resumed, straight) if stage == "mle" else (resumed["target"], straight["target"])
    print(f"{stage}: test CIDEr {after['CIDEr']!r}, R@1 {after['R@1']!r} after the kill and resume; "
          f"{before['CIDEr']!r}, {before['R@1']!r} uninterrupted")
    assert resumed == straight
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(tmp_path / "straight" / name), load_checkpoint(killed / name)
        assert a["step"] == b["step"]
        for key, value in a["model"]["state"].items():
            assert torch.equal(b["model"]["state"][key], value), (name, key)


SAVE_FOREVER = """
import sys, torch
from cl_captioning import save_checkpoint
step = 0
while True:
    step += 1
    save_checkpoint({"step": step, "weights": torch.full((1_000_000,), float(step))}, sys.argv[1])
"""


def test_kill_9_during_saves_never_leaves_a_broken_checkpoint(tmp_path):
    path, rng, mid_save = tmp_path / "last.pt", np.random.default_rng(), 0
    for _ in range(5):
        before = path.stat().st_mtime_ns if path.exists() else None
        process = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(path)], cwd=HERE)
        try:
            while not path.exists() or path.stat().st_mtime_ns == before:  # this process has saved once
                assert process.poll() is None
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.2))
        finally:
            process.kill()
            process.wait()
        mid_save += (tmp_path / ".last.pt.tmp").exists()
        ckpt = load_checkpoint(path)
        assert torch.equal(ckpt["weights"], torch.full((1_000_000,), float(ckpt["step"])))
        assert {p.name for p in tmp_path.iterdir()} <= {"last.pt", ".last.pt.tmp"}
    print(f"{mid_save} of 5 kills landed during a save")


def test_eval_on_coco_scores_testall_and_writes_a_coco_results_file(mle_checkpoint, world, tmp_path, capsys):
    coco = tmp_path / "coco"
    coco.mkdir()
    for split in ("train", "dev"):
        for suffix in ("_ims.npy", "_caps.txt"):
            shutil.copy(world / f"{split}{suffix}", coco / f"{split}{suffix}")
    features, captions = load_split(world, "test")
    np.save(coco / "testall_ims.npy", features)  # 10 images; SCAN's test holds only the first of them
    (coco / "testall_caps.txt").write_text("\n".join(captions) + "\n")
    np.save(coco / "test_ims.npy", features[:4])
    (coco / "test_caps.txt").write_text("\n".join(captions[:20]) + "\n")
    image_ids = [391895 + 7 * i for i in range(10)]
    (coco / "testall_ids.txt").write_text("".join(f"{i}\n" * 5 for i in image_ids))  # SCAN: one line per caption
    scores = cl.main(["--dataset", "coco", "--data-root", str(coco), "--eval", str(mle_checkpoint), "--threads", "1"])
    printed = capsys.readouterr().out
    assert "testall split of coco (10 images; self-retrieval among 10" in printed
    results_file = mle_checkpoint.parent / "captions_testall_best_results.json"
    assert str(results_file) in printed
    results = json.loads(results_file.read_text())
    assert [r["image_id"] for r in results] == image_ids and all(isinstance(r["caption"], str) for r in results)
    assert set(results[0]) == {"image_id", "caption"}
    references = [captions[5 * i:5 * i + 5] for i in range(10)]
    assert {k: v for k, v in scores.items() if not k.startswith("R@")} == \
        cl.caption_metrics(references, image_ids, results)  # the file is what was scored
    assert cl.captioning_test_split("flickr30k") == "test" and cl.captioning_test_split("toy") == "test"


# --- Hardening: whatever a user or a file gets wrong ends in one line, never a traceback or a wrong table ---

def refused_in_one_line(main, script, cases, expect):
    """Each (argv, message fragment) case raises DataError with that message, in-process (fast); the first one
    also runs as a subprocess, to see a DataError end the script with exit status 1, one `error:` line and no
    traceback (no-java PATH: the test evaluation's java would only add seconds)."""
    for argv, fragment in cases:
        with pytest.raises(DataError, match=re.escape(fragment)):
            main([str(a) for a in argv])
    expect([sys.executable, script, *cases[0][0]], cases[0][1], env=NO_JAVA)


def test_nonsense_values_are_one_line_errors(world, mle_checkpoint, tmp_path, expect_one_error_line):
    cl_run = ["--data-root", world, "--out-dir", tmp_path / "run", *TINY]
    refused_in_one_line(cl.main, HERE / "cl_captioning.py", [(cl_run + flags, message) for flags, message in [
        (["--lr", "nan"], "--lr must be positive and finite, got nan"),
        (["--lr", "inf"], "--lr must be positive and finite, got inf"),
        (["--lr", "1e23"], "--lr must be at most 1, got 1e+23"),
        (["--grad-clip", "-1"], "--grad-clip must be positive and finite, got -1.0"),
        (["--dropout", "nan"], "--dropout must be in [0, 1), got nan"),
        (["--seed", "-1"], "--seed must be at least 0, got -1"),
        (["--seed", "1e23"], "argument --seed: invalid int value: '1e23'; see --help"),
        (["--threads", "99999999999"], "--threads must be at most 1024, got 99999999999"),
        (["--val-images", "0"], "--val-images must be at least 1"),
        (["--epochs", "0"], "--epochs must be at least 1"),  # never an earlier run's checkpoint reported as this one's
        (["--ref", mle_checkpoint, "--K", "1000000"], "a step's word log-probs (5 images x 5 captions x 1000001) would "
                                                      "need"),
        (["--pairs-per-forward", "999999999"], "--pairs-per-forward 999999999 would need"),
        (["--model", "gpt"], "argument --model: invalid choice: 'gpt'")]], expect_one_error_line)


def damaged(world, root, split, damage):
    shutil.copytree(world, root)
    damage(root / f"{split}_ims.npy")
    return root


def test_damaged_data_is_a_one_line_error(world, tmp_path, expect_one_error_line):
    cl_run = ["--out-dir", tmp_path / "run", *TINY, "--data-root"]
    (tmp_path / "a-file").write_text("")
    huge = lambda path: np.save(path, np.load(path).astype(np.float64) * np.where(np.arange(60) == 3, 1e300, 1)[:, None, None])
    refused_in_one_line(cl.main, HERE / "cl_captioning.py", [
        (cl_run + [damaged(world, tmp_path / "empty", "train", lambda path: path.write_bytes(b""))],
         "train_ims.npy is not a readable .npy file"),
        (cl_run + [damaged(world, tmp_path / "none", "train", lambda path: np.save(path, np.zeros((0, 4, 16))))],
         "must hold float region features shaped (images, regions, dim), got float64 (0, 4, 16)"),
        (cl_run + [damaged(world, tmp_path / "dim", "dev", lambda path: np.save(path, np.load(path)[..., :8]))],
         "dev region features are 8-dimensional, train's 16"),
        (cl_run + [damaged(world, tmp_path / "float64", "train", huge)],  # finite in float64, inf in float32
         "train images 3 hold NaN or inf region features in float32 (1 of 60)"),
        (cl_run + [tmp_path / "a-file" / "toy"], "cannot build the toy world in")], expect_one_error_line)


def test_hostile_or_foreign_checkpoints_are_refused_on_every_loading_path(world, mle_checkpoint, tmp_path,
                                                                         expect_one_error_line):
    marker, hostile, resumed = tmp_path / "ran", tmp_path / "hostile.pt", tmp_path / "resumed"
    torch.save({"model": Hostile(marker), "vocab": []}, hostile)
    resumed.mkdir()
    shutil.copy(hostile, resumed / "last.pt")
    foreign = {"dict": {"foo": 1}, "tensor": torch.ones(3), "list": [1, 2],
               "kind": {"model": {"kind": "gpt", "kwargs": {}, "state": {}}, "vocab": []}}
    for name, obj in foreign.items():
        torch.save(obj, tmp_path / f"{name}.pt")
    nan, shuffled = load_checkpoint(mle_checkpoint), load_checkpoint(mle_checkpoint)
    nan["model"]["state"]["classifier.bias"][5] = math.nan
    shuffled["vocab"] = shuffled["vocab"][:4] + shuffled["vocab"][4:][::-1]
    torch.save(nan, tmp_path / "nan.pt")
    torch.save(shuffled, tmp_path / "shuffled.pt")
    cl_run = ["--data-root", world, *TINY, "--epochs", "1"]
    unsafe = "is not a checkpoint this script can read safely (UnpicklingError)"
    refused_in_one_line(cl.main, HERE / "cl_captioning.py", [
        (cl_run + ["--eval", hostile], unsafe), (cl_run + ["--ref", hostile], unsafe),
        (cl_run + ["--ref", mle_checkpoint, "--init", hostile, "--out-dir", tmp_path / "init"], unsafe),
        (cl_run + ["--resume", "--out-dir", resumed], unsafe),
        *[(cl_run + ["--eval", tmp_path / f"{name}.pt"], "is not a checkpoint written by cl_captioning.py")
          for name in foreign],
        (cl_run + ["--eval", tmp_path / "nan.pt"], "nan.pt holds NaN or inf weights"),
        (cl_run + ["--ref", tmp_path / "nan.pt", "--init", mle_checkpoint], "nan.pt holds NaN or inf weights"),
        (cl_run + ["--ref", tmp_path / "shuffled.pt"], f"was trained with another vocabulary ({len(shuffled['vocab'])} "
                                                       f"words) than the toy train split gives ({len(shuffled['vocab'])} words)"),
        (cl_run + ["--eval", tmp_path], "is not a file")], expect_one_error_line)
    assert not marker.exists()  # nothing the files named was run
    torch.save({"model": {}, "stage": "mle"}, resumed / "last.pt")
    with pytest.raises(DataError, match="is not a last.pt written by cl_captioning.py"):
        cl.main([str(a) for a in cl_run + ["--resume", "--out-dir", resumed]])


def test_a_full_disk_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    cl.save_checkpoint({"step": 1, "weights": torch.ones(1000)}, path)

    def disk_full(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(DataError, match=r"^cannot write .*last\.pt \(\[enforce fail .*\); it needs about 0 MB in "
                                        r".*; free some space or pass another --out-dir$"):
        cl.save_checkpoint({"step": 2, "weights": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1 and {p.name for p in tmp_path.iterdir()} == {"last.pt"}


@pytest.fixture(scope="module")
def mle_run(world):
    """An MLE run of 3 steps (last.pt), and the flags that made it."""
    argv = [str(a) for a in TINY + ["--data-root", world, "--out-dir", world.parent / "fingerprinted", "--max-steps", "3"]]
    cl.main(argv)
    return argv, world.parent / "fingerprinted" / "last.pt"


def world_like(world, root, seed=None, rename=None):
    """A toy world of the same size: another draw (seed), or the same with one word renamed everywhere."""
    if seed is not None:
        make_toy_world(root, seed=seed, n_train=60, n_dev=10, n_test=10, regions=4, dim=16)
        return root
    shutil.copytree(world, root)
    for split in ("train", "dev"):
        path = root / f"{split}_caps.txt"
        path.write_text(re.sub(rf"\b{rename[0]}\b", rename[1], path.read_text()))
    return root


def test_resume_refuses_another_run_naming_what_changed_before_anything_is_written(mle_run, world, tmp_path,
                                                                                   expect_one_error_line):
    argv, last = mle_run
    before = last.read_bytes()
    common_word = Counter(w for c in load_split(world, "train")[1] for w in tokenize(c)).most_common(12)[-1][0]
    other_run = "is another run: {} was {}, now {}; resume with the same data and flags, or pass another --out-dir"
    refused_in_one_line(cl.main, HERE / "cl_captioning.py", [
        (argv + ["--resume", "--lr", "1e-3"], other_run.format("--lr", 0.002, 0.001)),
        (argv + ["--resume", "--seed", "1"], other_run.format("--seed", 0, 1)),
        (argv + ["--resume", "--batch-images", "4"], other_run.format("--batch-images", 5, 4)),
        (argv + ["--resume", "--dropout", "0.1"], other_run.format("--dropout", 0.5, 0.1)),
        (argv + ["--resume", "--max-words", "12"], other_run.format("--max-words", 16, 12)),
        (argv + ["--resume", "--model", "adaatt"], other_run.format("--model", "showtell", "adaatt")),
        (argv + ["--resume", "--data-root", world_like(world, tmp_path / "seed-1", seed=1)], "is another run: vocabulary"),
        (argv + ["--resume", "--data-root", world_like(world, tmp_path / "renamed", rename=(common_word, "zebu"))],
         "is another run: vocabulary was"),  # as many words, one of them other
        ], expect_one_error_line)
    assert last.read_bytes() == before  # nothing trained or written
    old = load_checkpoint(last)
    del old["fingerprint"]
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "last.pt")
    with pytest.raises(DataError, match="last.pt has no run fingerprint .*: it cannot be verified as this run; pass "
                                        "another --out-dir$"):
        cl.main(argv[:-4] + ["--out-dir", str(tmp_path / "old"), "--resume"])
    cl.main(argv[:-2] + ["--max-steps", "4", "--resume", "--epochs", "3", "--save-every", "7"])  # what may change
    assert load_checkpoint(last)["step"] == 4


def damage(ckpt, how):
    state = ckpt["model"]["state"]
    if how == "a tensor of another shape":
        state["classifier.bias"] = state["classifier.bias"][:3].clone()
    elif how == "an extra key":
        state["extra"] = torch.zeros(1)
    elif how == "an empty list of RNG states":
        ckpt["rng"] = []
    elif how == "an optimizer state of another shape":
        ckpt["optimizer"]["state"][0]["exp_avg"] = torch.zeros(2)
    return ckpt


def test_a_damaged_last_pt_is_refused_in_one_line(mle_run, tmp_path, expect_one_error_line):
    argv, last = mle_run
    cases = {"a tensor of another shape": "last.pt/model/state/classifier.bias is a torch.float32 tensor [3], not a "
                                          "torch.float32 tensor [",
             "an extra key": "last.pt/model/state has an unexpected key extra",
             "an empty list of RNG states": "last.pt/rng has 0 entries, not 1",
             "an optimizer state of another shape": "last.pt/optimizer/state/0/exp_avg is a torch.float32 tensor [2], not"}
    runs = []
    for how, message in cases.items():
        folder = tmp_path / how.replace(" ", "-")
        folder.mkdir()
        torch.save(damage(load_checkpoint(last), how), folder / "last.pt")
        runs.append((argv[:-4] + ["--out-dir", folder, "--max-steps", "3", "--resume"],
                     f"{folder / 'last.pt'} is damaged: {message}"))
    refused_in_one_line(cl.main, HERE / "cl_captioning.py", runs, expect_one_error_line)


def test_a_stage_never_overwrites_the_checkpoints_it_reads(mle_checkpoint, world, tmp_path, expect_one_error_line):
    shutil.copy(mle_checkpoint, tmp_path / "last.pt")
    cl_run = TINY + ["--data-root", world, "--epochs", "1", "--out-dir", mle_checkpoint.parent]
    before = mle_checkpoint.read_bytes()
    refused_in_one_line(cl.main, HERE / "cl_captioning.py", [
        (cl_run + ["--ref", mle_checkpoint], f"--out-dir {mle_checkpoint.parent} holds the --ref checkpoint "
                                             f"{mle_checkpoint}, which this run would overwrite; pass another --out-dir"),
        (TINY + ["--data-root", world, "--ref", mle_checkpoint, "--init", tmp_path / "last.pt", "--out-dir", tmp_path],
         f"holds the --init checkpoint {tmp_path / 'last.pt'}, which this run would overwrite")], expect_one_error_line)
    assert mle_checkpoint.read_bytes() == before


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a whole number"),
    ({"RANK": "1"}, "RANK or LOCAL_RANK without WORLD_SIZE"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR missing; MASTER_PORT missing"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK 2 not below WORLD_SIZE 2"),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK='-1' is not a whole number"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "the other processes did not join within 2 s"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1"}, "rank 1: the other processes did not join within")],
    ids=["not a number", "rank alone", "no master", "rank too high", "negative rank", "rank 0 alone", "rank 1 alone"])
def test_an_incomplete_launch_environment_or_a_missing_peer_is_one_line(env, message, monkeypatch, world, tmp_path,
                                                                        expect_one_error_line):
    """torchrun's variables checked before anything runs; a rendezvous no peer joins ends after RENDEZVOUS_S (2 s)."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    env = env | ({"MASTER_PORT": str(free_port())} if "MASTER_ADDR" in env and "MASTER_PORT" not in env else {})
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(cl, "RENDEZVOUS_S", 2)
    started = time.perf_counter()
    with pytest.raises(DataError, match=re.escape(message)):
        cl.setup_ddp()
    assert time.perf_counter() - started < 30 and not torch.distributed.is_initialized()
    if "MASTER_ADDR" not in env:  # the whole script, as a user starts it
        expect_one_error_line([sys.executable, HERE / "cl_captioning.py", "--data-root", world, *TINY, "--out-dir",
                               tmp_path / "run"], message, env=NO_JAVA | env)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_full_disk_while_writing_the_results_leaves_no_empty_file(mle_checkpoint, world, tmp_path, monkeypatch):
    checkpoint = tmp_path / "best.pt"
    shutil.copy(mle_checkpoint, checkpoint)
    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(DataError, match=r"^cannot write .*captions_test_best_results\.json \(No space left on device\); "
                                        r"it needs about 0 MB in .*; free some space there$"):
        cl.main([str(a) for a in TINY + ["--data-root", world, "--eval", checkpoint]])
    assert {p.name for p in tmp_path.iterdir()} == {"best.pt"}


def start_of(pid):
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def test_the_lock_respects_a_live_run_and_takes_over_a_stale_one(world, tmp_path, monkeypatch):
    """A live run of this host (pid and start time match) or any run of another host holds the folder; an empty,
    unreadable or malformed lock, a dead pid, a pid reused by another process, an overflowing pid are taken over."""
    other, host = subprocess.Popen(["sleep", "60"]), socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    cases = {"live": (f"{host} {other.pid} {start_of(other.pid)}", f"another run (pid {other.pid} on host {host}, started "),
             "another host": ("elsewhere 1 1", "another run (pid 1 on host elsewhere, started "),
             "dead": (f"{host} {dead.pid} 1", None), "reused pid": (f"{host} {other.pid} 1", None), "empty": ("", None),
             "malformed": ("12 x", None), "overflowing pid": (f"{host} 99999999999999999999999 1", None),
             "not text": (b"\xff\xfe", None)}
    try:
        for name, (content, refused) in cases.items():
            folder = tmp_path / name.replace(" ", "-")
            folder.mkdir()
            (folder / ".lock").write_bytes(content if isinstance(content, bytes) else content.encode())
            if refused:
                with pytest.raises(DataError, match=re.escape(refused) + r".* is using .*; wait for it, or pass another "
                                   r"--out-dir \(if no run is using it, delete .*\.lock\)$"):
                    cl.main([str(a) for a in ("--data-root", world, *TINY, "--out-dir", folder)])
                continue
            release = cl.lock(folder)
            assert (folder / ".lock").read_text() == f"{host} {os.getpid()} {start_of(os.getpid())}", name
            release()
            assert not (folder / ".lock").exists() and {p.name for p in folder.iterdir()} == set(), name
    finally:
        other.kill()
        other.wait()
    def disk_full(self, *args, **kwargs):  # the lock's content cannot be written: one line, no empty .lock behind
        open(self, "w").close()
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(DataError, match=r"^cannot write checkpoints to .*full \(No space left on device\); pass "
                                        r"--out-dir with a writable folder$"):
        cl.lock(tmp_path / "full")
    assert list((tmp_path / "full").iterdir()) == []


def run_signalled(command, signum, when):
    """Starts a training command, sends `signum` when `when()` holds; returns (exit status, stdout, stderr)."""
    process = subprocess.Popen([str(part) for part in command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=NO_JAVA,  # the signals' default actions even when the suite runs in the
                               preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in cl.SIGNALS])  # background
    while not when():
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.01)
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err


@pytest.mark.parametrize("signum, moment", [(signal.SIGINT, "training"), (signal.SIGTERM, "training"),
                                            (signal.SIGHUP, "training"), (signal.SIGINT, "import"),
                                            (signal.SIGTERM, "import")])
def test_a_signal_ends_the_run_in_one_line_with_its_status_and_no_traceback(world, tmp_path, signum, moment):
    """In training: last.pt of that step, the resume command, 128 + the signal (130, 143, 129); in the first second
    (Python importing torch): one line `interrupted`, the same status."""
    last, started = tmp_path / "run" / "last.pt", time.perf_counter()
    when = last.exists if moment == "training" else lambda: time.perf_counter() > started + 0.3
    code, out, err = run_signalled([sys.executable, HERE / "cl_captioning.py", "--data-root", world, *TINY, "--out-dir",
                                    tmp_path / "run", "--epochs", "50", "--batch-images", "1", "--save-every", "5"],
                                   signum, when)
    assert code == 128 + signum and "Traceback" not in err, err[-2000:]
    if moment == "import":
        assert err.strip() == "interrupted" and not last.exists(), err[-2000:]
    else:
        step = load_checkpoint(last)["step"]
        assert step >= 5 and f"interrupted by {signum.name} at step {step}; {last} keeps step {step}; continue with " \
                              f"the same command plus --resume" in out


# --- The paper's configuration: departures printed; the GPU path rehearsed ------------------------------------

def test_a_run_prints_its_departures_under_the_configuration_line_and_the_papers_flag_removes_one(world, tmp_path,
                                                                                                   capsys):
    argv = [str(a) for a in TINY + ["--data-root", world, "--max-steps", "1", "--retrieval-images", "0"]]
    for extra, standardised in (([], True), (["--raw-features"], False)):
        cl.main(argv + ["--out-dir", str(tmp_path / f"run{len(extra)}")] + extra)
        lines = capsys.readouterr().out.splitlines()
        config = next(i for i, line in enumerate(lines) if line.startswith("MLE on toy"))
        printed = [line[len("  departure: "):] for line in lines[config + 1:] if line.startswith("  departure: ")]
        assert printed == cl.departures(cl.parse_args(argv + extra)) and len(printed) == 2 + standardised
        assert all(re.fullmatch(r"[a-z][^:;]*: [^;]+; the paper('s)?: .+", line) for line in printed), printed
        assert any(line.startswith("features standardised") for line in printed) == standardised
        assert printed[-1] == "toy world: epochs 12, lr 0.002, max-words 16, chosen on its dev split; the paper's: " \
                              "--dataset coco"  # the overrides in force: TINY gives the others
        mean = load_checkpoint(tmp_path / f"run{len(extra)}" / "last.pt")["model"]["state"]["feat_mean"]
        assert bool(mean.abs().sum() > 0) == standardised  # the flag does what it says
    coco = cl.departures(cl.parse_args(["--dataset", "coco", "--raw-features"]))
    assert len(coco) == 1 and coco[0].startswith("region features")  # no toy line on real data
    assert not any("standardised" in line for line in cl.departures(cl.parse_args(["--ref", "x.pt"])))


def test_training_under_bf16_autocast_keeps_finite_losses_and_stores_float32(world, mle_checkpoint, tmp_path,
                                                                             monkeypatch):
    """The dtypes CUDA sees, on the CPU: a few MLE and CL steps under bf16 autocast."""
    monkeypatch.setattr(cl, "mixed_precision", functools.partial(cl.mixed_precision, on_cpu=True))
    seen = []
    for name in ("mle_loss", "cl_loss"):
        def recorded(*args, original=getattr(cl, name), **kwargs):
            loss = original(*args, **kwargs)
            seen.append((args[0].dtype, loss.item()))
            return loss
        monkeypatch.setattr(cl, name, recorded)
    common = TINY + ["--data-root", str(world), "--max-steps", "3", "--retrieval-images", "0"]
    cl.main(common + ["--out-dir", str(tmp_path / "mle")])
    cl.main(common + ["--out-dir", str(tmp_path / "cl"), "--ref", str(mle_checkpoint), "--K", "2"])
    assert len(seen) == 6 and all(dtype == torch.bfloat16 and math.isfinite(loss) for dtype, loss in seen), seen
    for run in ("mle", "cl"):
        ckpt = load_checkpoint(tmp_path / run / "last.pt")
        stored = [v for record in ("model", "reference") if ckpt[record] for v in ckpt[record]["state"].values()]
        stored += [v for state in ckpt["optimizer"]["state"].values() for k, v in state.items() if k != "step"]
        assert stored and all(v.dtype == torch.float32 for v in stored if v.is_floating_point()), run


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: python -m pytest -q -s -k cuda")


@cuda
def test_cuda_default_toy_run_mle_then_cl(tmp_path):
    """The default toy world, shortened: MLE 2 epochs, then CL 1 epoch against it, on the GPU (bf16, pinned memory)."""
    for argv in (["--out-dir", tmp_path / "mle", "--epochs", "2"],
                 ["--out-dir", tmp_path / "cl", "--ref", tmp_path / "mle" / "best.pt", "--epochs", "1"]):
        run = subprocess.run([sys.executable, HERE / "cl_captioning.py", *map(str, argv)], capture_output=True, text=True,
                             timeout=1200, cwd=HERE)
        assert run.returncode == 0 and "cuda:0" in run.stdout, run.stderr[-3000:]
        print("\n".join(line for line in run.stdout.splitlines() if line.startswith(("MLE on", "CL on", "trained"))))
    assert load_checkpoint(tmp_path / "cl" / "last.pt")["stage"] == "cl"


@cuda
@pytest.mark.parametrize("kind", ["showtell", "adaatt"])
def test_cuda_real_shape_cl_step_in_bf16(kind, monkeypatch):
    """CL steps at COCO's shapes (a 10,000-word vocabulary, 36 regions of 2,048 dimensions, 20 images x 5 captions, K 5,
    18 words + <eos>) under bf16 autocast, batches through pinned memory: finite losses, float32 weights, speed, memory."""
    device, rng, n_images, vocab_size = torch.device("cuda"), np.random.default_rng(0), 200, 10_000
    pinned = []
    pin_memory = torch.Tensor.pin_memory
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pinned.append(1) or pin_memory(self, *a))
    features = rng.standard_normal((n_images, 36, 2048), dtype=np.float32)
    captions = rng.integers(4, vocab_size, (n_images, 5, 19))
    captions[..., 18] = EOS
    target = cl.CAPTIONERS[kind](vocab_size, 2048).to(device)
    reference = cl.CAPTIONERS[kind](vocab_size, 2048).to(device).eval().requires_grad_(False)
    reference.load_state_dict(target.state_dict())
    optimizer = torch.optim.Adam(target.parameters(), lr=1e-6, betas=(0.8, 0.999))
    torch.cuda.reset_peak_memory_stats()
    for step in range(12):
        if step == 2:  # the first steps warm the kernels up
            torch.cuda.synchronize()
            started = time.perf_counter()
        ids = np.sort(rng.choice(n_images, 20, replace=False))
        feats = common.image_batch(features, ids, device)
        neg = captions[cl.sample_negatives(ids, n_images, 5, rng)].reshape(5, 100, -1)
        pos, neg = cl.on_device(device, captions[ids].reshape(100, -1), neg)
        with cl.mixed_precision(device):
            loss = cl.cl_loss(*cl.contrastive_log_probs(target, reference, feats, pos, neg))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_value_(target.parameters(), 0.1)
        optimizer.step()
        assert math.isfinite(loss.item())
    torch.cuda.synchronize()
    print(f"\n{kind}: {10 / (time.perf_counter() - started):.1f} CL steps/s (20 images, K 5), peak "
          f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    assert len(pinned) == 12 and all(p.dtype == torch.float32 for p in target.parameters())


# --- Several processes (torchrun / DDP, gloo on the CPU) -------------------------------------------

def test_each_rank_trains_on_its_own_share_of_every_epoch():
    n_images, batch_images, world_size = 23, 4, 3
    order = cl.epoch_order(n_images, seed=0, epoch=1, world_size=world_size)
    assert len(order) == 24 and set(order) == set(range(23))  # padded by one image, as DistributedSampler
    assert np.array_equal(order, cl.epoch_order(n_images, seed=0, epoch=1, world_size=world_size))  # every rank
    assert not np.array_equal(order, cl.epoch_order(n_images, seed=0, epoch=2, world_size=world_size))  # reshuffled
    assert np.array_equal(cl.epoch_order(n_images, 0, 1), order[:23])  # one process: the same order, unpadded
    seen = []
    for i in range(0, len(order), batch_images * world_size):
        global_ids = np.sort(order[i:i + batch_images * world_size])
        shares = [global_ids[cl.rank_share(global_ids, r, world_size)] for r in range(world_size)]
        assert all(len(share) == batch_images for share in shares)
        seen += [int(image) for share in shares for image in share]
    assert sorted(seen) == sorted(order.tolist())  # the ranks' shares are disjoint and cover the epoch


def contrastive_gradient(target, reference, feats, pos, neg):
    target.zero_grad()
    cl.cl_loss(*cl.contrastive_log_probs(target, reference, feats, pos, neg)).backward()


def cl_gradient_rank(rank, out):
    """One of 2 ranks of a DDP step on its share of a fixed global batch of 4 images."""
    target, reference = tiny_model("showtell", 0), tiny_model("adaatt", 1)  # in eval mode: no dropout
    feats, pos, neg = global_cl_batch()
    mine = cl.rank_share(np.arange(4), rank, 2)
    captions = (torch.arange(20).reshape(4, 5)[mine]).reshape(-1)
    ddp = torch.nn.parallel.DistributedDataParallel(target)
    contrastive_gradient(ddp, reference, feats[mine], pos[captions], neg[:, captions])
    torch.save({n: p.grad for n, p in target.named_parameters()}, out / f"grad{rank}.pt")


def global_cl_batch():
    g = torch.Generator().manual_seed(5)
    pos = torch.randint(4, VOCAB_SIZE, (20, 6), generator=g)
    neg = torch.randint(4, VOCAB_SIZE, (3, 20, 6), generator=g)
    pos[:, 4], neg[..., 3] = EOS, EOS
    return tiny_feats(4), pos, neg


def test_two_ranks_with_batch_b_give_the_gradient_of_one_process_with_batch_2b(run_ranks, tmp_path):
    """Eq. 10 is a mean over captions and rounds with equal shares per rank, and DDP averages the ranks'
    gradients: the 2-process step is the 1-process step on the global batch. (MLE's per-word mean is
    per rank: equal only when the shares hold as many words; dropout is off here to compare exactly.)"""
    run_ranks(cl_gradient_rank, tmp_path)
    target, reference = tiny_model("showtell", 0), tiny_model("adaatt", 1)
    contrastive_gradient(target, reference, *global_cl_batch())
    grads = [torch.load(tmp_path / f"grad{r}.pt") for r in range(2)]
    for name, p in target.named_parameters():
        assert torch.equal(grads[0][name], grads[1][name]), name  # all-reduced: the same on both ranks
        assert torch.allclose(grads[0][name], p.grad, atol=1e-6), name
    assert sum(p.grad.abs().sum() for p in target.parameters()) > 0


def cl_train_rank(rank, root, ref, out):
    args = cl.parse_args(TINY + ["--data-root", str(root), "--ref", str(ref), "--out-dir", str(out), "--epochs", "1",
                                 "--K", "2", "--lr", "1e-3", "--replace-ref-every", "1", "--batch-images", "4"])
    features, text = load_split(root, "train")
    vocab = Vocab.build((tokenize(c) for c in text), args.min_count)
    reference = cl.load_captioner(ref, vocab, features.shape[2], "cpu", "toy")[0].eval().requires_grad_(False)
    target = cl.load_captioner(ref, vocab, features.shape[2], "cpu", "toy")[0]
    cl.train(args, target, reference, (features, cl.encode_captions(vocab, text, args.max_words)),
             load_split(root, "dev"), vocab, Path(out), np.arange(len(features)))
    torch.save({"target": target.state_dict(), "reference": reference.state_dict()}, Path(out) / f"rank{rank}.pt")


def cl_first_step(rank, root, ref, out, batch_images):
    """train() for one CL step of a global batch of 8 images: 2 ranks of 4, or 1 process of 8."""
    args = cl.parse_args(TINY + ["--data-root", str(root), "--ref", str(ref), "--out-dir", str(out), "--K", "3",
                                 "--lr", "1e-3", "--batch-images", str(batch_images), "--max-steps", "1"])
    features, text = load_split(root, "train")
    vocab = Vocab.build((tokenize(c) for c in text), args.min_count)
    target, reference = cl.captioners(args, vocab, features, torch.device("cpu"))  # the toy's target dropout 0
    cl.train(args, target, reference, (features, cl.encode_captions(vocab, text, args.max_words)),
             load_split(root, "dev"), vocab, Path(out), np.arange(len(features)))


def test_each_rank_trains_on_its_own_images_and_their_own_negatives(run_ranks, mle_checkpoint, world):
    """The global negative draw is the same on every rank; each takes its own images' columns: 2 ranks of 4 images
    take the step 1 process of 8 takes (Adam's first step is lr x sign(g): any other negatives flip many signs)."""
    two, one = world.parent / "step-2-ranks", world.parent / "step-1-process"
    run_ranks(cl_first_step, world, mle_checkpoint, two, 4)
    cl_first_step(0, world, mle_checkpoint, one, 8)
    start, a, b = (load_checkpoint(p)["model"]["state"] for p in (mle_checkpoint, two / "last.pt", one / "last.pt"))
    for name in start:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    assert any(not torch.equal(a[n], start[n]) for n in start)  # the step moved the target


def test_two_rank_cl_training_keeps_target_and_reference_identical_on_both_ranks(run_ranks, mle_checkpoint, world):
    out = world.parent / "ddp-cl"
    run_ranks(cl_train_rank, world, mle_checkpoint, out)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    last, start = load_checkpoint(out / "last.pt"), load_checkpoint(mle_checkpoint)
    assert last["step"] == 8 and last["world_size"] == 2  # 60 images (+4 padding) / (4 images x 2 ranks)
    for name, value in ranks[0]["target"].items():
        assert torch.equal(ranks[1]["target"][name], value), name
        assert torch.equal(last["model"]["state"][name], value), name  # rank 0 saved what both hold
        assert torch.equal(ranks[0]["reference"][name], ranks[1]["reference"][name]), name
    # --replace-ref-every 1: after the epoch both ranks took the (only, hence best) target as reference
    assert all(torch.equal(ranks[1]["reference"][n], v) for n, v in ranks[1]["target"].items())
    assert any(not torch.equal(ranks[0]["target"][n], v) for n, v in start["model"]["state"].items())


def test_torchrun_runs_mle_and_cl_with_two_processes(mle_checkpoint, world):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(HERE / "cl_captioning.py"), "--data-root", str(world)] + TINY
    out = world.parent / "torchrun"
    for extra in (["--out-dir", str(out / "mle"), "--epochs", "1"],
                  ["--out-dir", str(out / "cl"), "--ref", str(mle_checkpoint), "--max-steps", "3", "--K", "2"],
                  ["--out-dir", str(out / "cl"), "--ref", str(mle_checkpoint), "--max-steps", "5", "--K", "2",
                   "--resume"]):
        run = subprocess.run(torchrun + extra, capture_output=True, text=True, timeout=300, env=NO_JAVA)
        assert run.returncode == 0, run.stderr[-2000:]
    assert "over 2 processes" in run.stdout and run.stdout.count("resuming") == 1
    assert load_checkpoint(out / "mle" / "last.pt")["step"] == 6  # 60 images / (5 images x 2 ranks)
    assert load_checkpoint(out / "cl" / "last.pt")["step"] == 5


# --- Real COCO captions: 300 lines of SCAN's coco_precomp/testall_caps.txt (the Karpathy test split) -----------
# Images REAL_COCO_ROWS of that file, five lines each; in 45 of the 60 some caption tokenises differently
# under PTB and [a-z]+ (apostrophes, hyphens, digits, slashes), in 30 the first caption does.
REAL_COCO_ROWS = [
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20, 32, 40, 50, 51, 61, 66, 75, 85, 109, 112,
    114, 149, 172, 205, 206, 210, 212, 312, 386, 523, 544, 550, 650, 712, 748, 768, 848, 909, 951, 989, 1002,
    1011, 1024, 1110, 1142, 1218, 1256, 1281, 1289, 1294, 1302, 1319]
REAL_COCO_CAPTIONS = """\
A man with a red helmet on a small moped on a dirt road .
Man riding a motor bike on a dirt road on the countryside .
A man riding on the back of a motorcycle .
A dirt path with a young person on a motor bike rests to the foreground of a verdant area with a bridge and a background of cloud-wreathed mountains .
A man in a red shirt and a red hat is on a motorcycle on a hill side .
A young girl inhales with the intent of blowing out a candle .
A young girl is preparing to blow out her candle .
A kid is to blow out the single candle in a bowl of birthday goodness .
Girl blowing out the candle on an ice-cream
A little girl is getting ready to blow out a candle on a small dessert .
A man on a bicycle riding next to a train
A person is riding a bicycle but there is a train in the background .
a red and white train and a man riding a bicycle
a guy that is riding his bike next to a train
A man riding a bike past a train traveling along tracks .
A kitchen is shown with a variety of items on the counters .
A kitchen has the windows open and plaid curtains .
A kitchen with two windows and two metal sinks .
An older kitchen with cluttered counter tops but empty sink .
Glasses and bottles are placed near a kitchen sink .
A wooden ball on top of a wooden stick .
The table is full of wooden spoons and utensils .
A wood table holding an assortment of wood cooking utensils .
A selection of wooden kitchen tools on a counter .
Wooden spoons are lined up on a table
Multiple wooden spoons are shown on a table top .
A table surrounded by chairs and filled with cooking utensils .
Wooden spoons laid out across a kitchen table .
Wooden spoons and forks are all over a table .
A table and chairs with wooden kitchen tools on top .
A bathroom that has a broken wall in the shower .
A bathroom looks clean but is missing tile at the shower stall .
A view of a bathroom that needs to be fixed up .
a shower toilet and sink in a basement bathroom
A very big whit rest room with a shabby looking shower .
A bathroom with an enclosed shower next to a sink and a toilet .
A clean , spacious bathroom with a large shower stall .
There are a toilet , a sink , and a shower stall in a large bathroom .
A bathroom featuring a walk in shower , mirror , sink and toilet .
Bathroom with a shower , sink , and toilet in it .
people on bicycles ride down a busy street
A group of people are riding bikes down the street in a bike lane
bike riders passing Burger King in city street
A group of bicyclists are riding in the bike lane .
Bicyclists on a city street , most not using the bike lane
The bathroom is clean and ready to be used .
a small bathroom with a sink and a toilet .
A toilet , sink and mirror in the bathroom
Doorway view into bathroom with a sink and toilet .
A white toilet sitting next to a sink .
A clean bathroom is seen in this image .
A bathroom with a white toilet and large shelf full of stuff .
some shelves filled with a bunch of different items in the bathroom
A shelving unit is between a toilet and a bathroom sink .
A shelf with hygiene products in a bathroom .
A young man wearing black attire and a flowered tie is standing and smiling .
A man with glasses and his eyes closed dressed in a black shirt and a necktie .
A man in a green tie with his eyes closed .
Smiling man wearing black shirt and pale green tie .
A person that is dressed up very nicely .
Black and white photograph of two men on motorcycles .
Two people riding a motorcycle with hats and backpack down a street .
Two men are at an intersection on motorcycles .
The man are driving side by side on their motorcycles .
Two men on motorcycles at a stop light
A row of motorcycles parked in front of a building .
A bunch of motorcycles parked on the side of the road
a back ally neighborhood with motor bikes in a row
A number of motorbikes parked on an alley
a bunch of motorcycles parked along the side of the street
A fluffy white chair that faces away fro a television .
A pillow covered reading chair in the corner of the living room
The living room is empty with the television on .
White ornate seat in nicely decorated room with television .
A white chair , books and shelves and a tv on in this room .
A painting of a table with fruit on top of it .
Painting of oranges , a bowl , candle , and a pitcher
a painting of fruit and a candle with a vase
A painting of a candlestick holder with a candle , several pieces of fruit and a vase , with a gold frame around the painting .
A painting that has a gold frame on it .
Vegetables are displayed in a wooden barrel outdoors .
A bunch of bananas are sitting on the stand .
The cart has bananas or plantains piled on it .
a box of green bananas and a box of ripe bananas
A large number of green and yellow bananas in wooden containers .
A small blue plane sitting on top of a field .
an E2 airplane painted blue with black and white stripes
An old warplane is on display in a field .
a blue small plane standing at the airstrip
Model airplane with an American insignia and stripes on wings .
A tall massive clock tower towering over a city .
A couple of street signs hanging on a pole
An old black and white photo of Pennsylvania Avenue .
A large stately building is adorned with steeple and a tower .
The large ornate building with the clock tower and cupolas sits on the Pennsylvania Avenue and 11th St .
a cat that is eating some kind of banana
A person feeding a cat with a banana
A house cat is taking a bite from a banana .
A cat eating a banana from someone 's hand
A cat feeding on a banana with a person feeding it to it .
A woman embracing a child carrying a bag of luggage .
Woman hugging a small girl with green and blue luggage .
A woman hugging a girl who is holding a suitcase .
A woman with her arms around a girl who 's holding a suitcase .
An adult and child standing with a suitcase .
A pinup-style photo of a woman sitting on a luggage trunk .
A women is waiting while sitting on a large trunk
a woman shades her eyes while sitting on a chest
A woman sits on a luggage case on a sidewalk .
A woman sitting on a trunk wearing a polka dot dress with a red belt .
An antilope is eating grass in between two zebra .
Several zebras eat the green grass in the pasture .
Two zebras and another animal grazing in the grass .
Three zebra in the middle of a field with a body of water in the distance .
Three Zebra 's eating grass as they walk .
A man in black leading an all white horse
Mythical character with white horse standing on grooved surface .
A white horse with blue haunches stands next to an elegantly dressed , black-haired man holding a sword .
A person with a horse and a sword .
a couple of small figures of a man and a horse
A girl is skateboarding down the Hollywood walk of fame .
A woman who is skateboarding down the street .
A woman with glasses and a scarf skateboards along Hollywood 's Walk of Fame .
lady in front of a store standing on a pink skateboard
A woman is riding her skate board down the sidewalk .
A table with a coffee and a salad on it .
A deli lunch for two on a table with drinks
A sandwich wrapped in a bag , a to-go coffee cup and a drink sits on top of a white table .
A sandwich and two coffees sitting on a table .
In-flight meal of a bagged sandwich and drinks
A dark skinned child getting ready to be pushed on a swing .
A girl getting pushed in a child 's swing .
A man pushes a brightly smiling little girl on a swing .
a young girl on a swing being pushed by her dad
A man pushing a girl on a swing .
A baseball player holding a bat while standing in a field .
The men are playing a game of baseball on the field .
A baseball player taking a swing at a ball
The batter 's waiting to see if the ball is fair or foul .
Two baseball players and an umpire are standing on the field .
A man holding a baseball bat while standing next to home plate .
There is a baseball game going on the player is waiting to hit the ball , the umpire is at base .
There is dust coming out of the catcher 's glove as a boy prepares to bat .
A catcher catches a baseball after a young kid swings and misses .
The batter , catcher , and plate umpire are fixed on the pitcher .
A couple riding a motorcycle down a street .
A couple is riding a motorcycle that is pulling a cart behind it .
two people riding a motorcycle with a car on the back of it
A couple riding a motorcycle over a bridge at a freeway entrance ramp .
Two people on a motorcycle that 's got a cooler attached to it .
a giraffe checking out the bark on a tree
A giraffe in an enclosure reaching for food .
A giraffe and zebra inside of a zoo enclosure
A giraffe with it 's mouth set on a pole .
A giraffe and a zebra eating together in a park .
Three zebras and other wild animals out in a semi-green field .
Three zebras and two other animals grazing .
Wildlife standing near water area in natural setting .
Three zebras near the shore line of a body of water .
A group of animals stand next to a watering hole .
There 's a field of brown grass with zebras in it
A group of zebras relax and play together in a large field
A herd of zebras stand on a pathway near brown grass .
A herd of zebras standing together in the field
A group of zebras are on some grass with trees and bushes behind them .
A close-up of a waffle shaped cone with a banana in it .
The golden waffle has a banana in it .
A banana sticking out of what looks like a waffle .
A peeled banana wrapped up in a waffle .
holding a waffle cone with a banana inside
A woman that is standing on ski 's in the snow .
a lady snow skiing on flat ground
Two people on skis in snowy area surrounded by trees .
A woman riding skis up the side of a ski slope .
A person using skis and poles in the snow .
A group of elephants with one elephant raising it 's trunk and dust and dirt coming up behind it .
Three elephants kick up dust as they walk through the flat by the bushes .
A heard of elephants with one 's trunk raised .
Elephants walk together through the grass kicking up dust .
Elephants in a national park blowing dust around
A picture of children 's toy reading story .
A collection of stuffed animals and a doll that is holding a book .
A doll sitting in front of a book on a couch .
Stuffed doll reading story to assorted stuffed animals .
Stuffed toys propped up as if they are reading and listening to a book
A woman 's hand holding a glass of wine .
A person holds up a champagne glass to make a toast .
This person is holding a whine glass with a drink in it .
A woman holding up a glass of liquid .
A person holds up their champagne glass for a toast .
A giraffe stands with several birds resting on it 's neck .
A giraffe that has some birds perched on it .
this is a close up picture of a giraffe that is standing
A giraffe with a couple birds holding onto his neck .
Several birds perched on a giraffe 's neck eating bugs .
A train traveling past a factory with tons of smoke pouring out of it 's stacks .
Two trains moves past a factory emitting smoke .
an image of a smoke filled building with a train passing
A factory near a train track letting out smoke .
A building at a railroad crossing billows smoke .
A large and over-sized stuffed teddy bear sitting in a chair .
A stuffed bear is sitting outside an eatery .
A very large teddy bear that is sitting in a chair .
A bear that is sitting in front of a door .
Large stuffed bear sitting outside of a building .
A piece of partially-eaten cake sits on a paper plate .
A desert topped with gummy bears sits on a yellow and orange plate .
a close up of a plate of food with a fork
A slice of chocolate cake with dark chocolate glaze .
A slice of chocolate cake with dark chocolate icing .
A plate of partially-eaten pizza is seen on a restaurant table .
A pizza sitting on a table near a pitcher of soda .
A restaurant table with partially eaten pizza and soda .
The pizza is next to a pitcher of soda in a restaurant .
A pan on a table with lots of pizza .
A person holding a cell phone with a picture of grazing cows on it 's display .
Reality and fantasy meet in this phone image of grazing cattle unaware of What Lies Above .
Someone displaying a silly image on a smartphone
The YouTube video is shown on the mobile phone .
a hand is holding a small video player
3 dogs sitting in front of a fruit and veggie stand .
There are three dogs sitting Together under a umbrella
Three dogs sitting side by side in the street .
A group of dogs in front of a wooden crate
Three dogs standing in front of a counter at a shop wearing leashes .
A bathroom sink sitting underneath a mirror mounted on it 's wall .
A BATHROOM WITH A MIRROR AND A SINK
A pink and green dated bathroom still has flair .
A bathroom with a pink sink and blue tiles .
A bathroom scene with focus on the sink .
A group of zebra 's playing and grazing in a field .
A grassy field with various zebras standing next to each other .
A large group of zebra standing in the grass .
A large group of zebras graze in the grasslands of africa
a bunch of zebras out in a grassy field
Young boy with T-ball and bat pointing at ball .
A his holding a baseball bat by a t ball
Child with bat and a ball on a tee .
A small child using a baseball bat and a pole to practice hitting a ball .
A child points to ball waiting on the tee ball stand .
A young boy holding a teddy bear by it 's ears .
A child is holding up a large teddy bear .
A young child holding a teddy bear around his friends .
A child with his teddy bear that is carrying a backpack .
A boy plays with the ears of a teddy bear .
This men 's bathroom has two urinals and a sinks .
a public males restroom with two urinals that are based on the floor
An empty restroom with two urinals and a sink .
A public bathroom with a sink and two urinals .
The public rest rooms are clean and ready for customers to use .
Traffic sign on W 28 St with photo of bicycle in the top .
A street sign that has a no bicycle sign .
A traffic light with a bike signal on a pole .
a yellow colored traffic light and a street sign
A stop sign is next to a tall apartment building .
A girl in a park area flies a multi-colored kite .
A girl flying a kit in the sky .
A young woman flying a rainbow colored kite .
a person in a large field flying a kite in the sky
A woman looks up at her colorful sailing kite .
there 's and airplane in the sky flying over some trees
a large plane is flying over a crowd of trees
A aeroplane soaring high in the sky above the trees .
A passenger plane flies in the sky over a forest .
An airplane is seen flying over several trees .
Advertising photograph of a surf-themed birthday cake from a bakery
A birthday cake with a island design and theme .
a birthday cake decorated to look like an island with surfboards
The birthday cake has dark and light blue frosting .
A blue cake features a small island on top and sharks swimming on the bottom of the cake .
A young man standing next to a race car with the red sox logo on it 's hood .
A young boy standing in front of a sponsored car .
A man standing near a red sox nascar
A young boy standing by a Red Sox car wearing Red Sox shirt and visor
A young man standing next to a racecar on a display lot .
A cat sleeping in a person 's lap ; the cat is also on this person 's laptop .
A cat laying in front of a laptop .
Close-up of a cat 's face as he sleeps on a laptop .
Close up of cat sleeping in front of a laptop
A sleeping cat lying next to a laptop on a desk .
A couple of bags of someone 's belongings that were left unattended .
Luggage hidden behind a fence while a man makes a cell phone call
A piece of luggage sitting up against a gray wall .
A person with a backpack is standing next to a doorway with luggage on the other side .
A man on the phone near luggage by a gate .
A couple of pony 's standing in the middle of a forest .
Two horses are standing beside a baby horse .
a couple of horses are standing in a field
Two horses standing a field of grass next to a young horse .
two ponies and a calf enjoying the weather
A woman that is standing on ski 's in the snow .
A woman riding skis on top of a snow covered slope .
Skier on a snowy mountain carrying a backpack .
this is a man skiing down a hill
A person wearing a blue coat in ski gear .
A bloody arm with iv 's inserted into an injury victim 's arm are depicted in this graphic shot .
A person has various wounds on his arm and body .
A person has blood splatters due to an injury
An image of someone 's bloodied and injured arm .
A person with a wounded arm covered in blood
""".splitlines()
