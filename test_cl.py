"""Tests for common.py (vocabulary, the precomputed layout, the toy world) and cl_captioning.py: each
equation against an independent numpy or brute-force computation, the command line end to end on a
tiny toy world, then the same on 2 processes."""
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

import cl_captioning as cl
from common import (BOS, CATEGORIES, EOS, PAD, UNK, DataError, Vocab, load_checkpoint, load_split, make_toy_world,
                    nonfinite_images, save_checkpoint, tokenize, wrap_ddp)

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


def test_vocab_min_count_order_round_trip_and_json(tmp_path):
    texts = ["a dog on the grass", "a dog in a field", "a cat"]
    vocab = Vocab.build((tokenize(t) for t in texts), min_count=2)
    assert vocab.itos == ["<pad>", "<bos>", "<eos>", "<unk>", "a", "dog"]  # a: 4, dog: 2; the rest once
    ids = vocab.encode(tokenize("a dog on a cat"), max_len=8)
    assert ids == [4, 5, UNK, 4, UNK, EOS, PAD, PAD]
    assert vocab.decode(ids) == "a dog <unk> a <unk>"
    assert vocab.decode([4, 5, EOS, 4, 4]) == "a dog"  # decoding stops at <eos>
    assert vocab.encode(tokenize("a dog a dog a dog"), max_len=4) == [4, 5, 4, EOS]  # cut, <eos> kept
    vocab.save(tmp_path / "vocab.json")
    assert Vocab.load(tmp_path / "vocab.json").itos == vocab.itos
    again = Vocab.build((tokenize(t) for t in reversed(texts)), min_count=1)
    assert again.itos == Vocab.build((tokenize(t) for t in texts), min_count=1).itos  # order-independent ids


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
    main_nouns = [set(CATEGORIES[s["objects"][0]["category"]]) for s in scenes]
    for line, caption in enumerate(captions):  # every caption names its own image's main object
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


def test_toy_generic_captions_are_shared_and_detailed_ones_identify_the_image(default_train_split):
    captions, scenes = default_train_split
    images_of = defaultdict(set)
    for line, caption in enumerate(captions):
        images_of[" ".join(tokenize(caption))].add(line // 5)
    shared = defaultdict(list)
    for i, scene in enumerate(scenes):
        for k, level in enumerate(scene["levels"]):
            shared[level].append(len(images_of[" ".join(tokenize(captions[5 * i + k]))]) > 1)
    fraction = {level: np.mean(v) for level, v in shared.items()}
    assert fraction[0] > 0.9 and fraction[3] < 0.01  # measured: 0.968 and 0.003
    assert fraction[0] > fraction[1] > fraction[2] > fraction[3]
    categories = [obj["category"] for s in scenes for obj in s["objects"]]
    counts = np.bincount(categories, minlength=24)
    assert counts[0] > 3 * counts[12] and counts[:3].sum() > 0.3 * counts.sum()  # Zipf-skewed objects


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
        got = model.log_prob(feats, captions)
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
            assert torch.allclose(model.log_prob(feats, captions), accumulated, atol=1e-4)
        lengths |= set(cl.caption_mask(captions).sum(1).tolist())
    assert len(lengths) >= 3 and 8 in lengths  # the sweep has finished captions of several lengths and unfinished ones


@pytest.mark.parametrize("kind", ["showtell", "adaatt"])
def test_padding_after_eos_changes_nothing(kind):
    model, feats = tiny_model(kind), tiny_feats(2)
    captions = torch.tensor([[5, 6, EOS, PAD, PAD], [7, EOS, PAD, PAD, PAD]])
    garbage = torch.tensor([[5, 6, EOS, 9, 4, 11, 3], [7, EOS, 8, 8, 8, 8, 8]])
    with torch.no_grad():
        assert torch.allclose(model.log_prob(feats, captions), model.log_prob(feats, garbage), atol=1e-6)
        assert torch.allclose(model.log_prob(feats, captions), model.log_prob(feats, captions[:, :3]), atol=1e-6)


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
                assert torch.allclose(model.log_prob(feats, captions), scores, atol=1e-4)
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


def test_retrieval_log_probs_match_one_pair_at_a_time():
    model, feats = tiny_model("adaatt"), tiny_feats(5)
    captions = torch.tensor([[5, 6, EOS, PAD], [7, 8, 9, EOS], [4, EOS, PAD, PAD], [6, 6, EOS, PAD], [9, EOS, PAD, PAD]])
    logp = cl.retrieval_log_probs(model, feats.numpy(), np.arange(5), captions, "cpu", pairs_per_forward=7)
    for t in range(5):
        for j in range(5):
            assert logp[t, j].item() == pytest.approx(step_by_step_log_prob(model, feats[j], captions[t].tolist()), abs=1e-4)


def test_caption_metrics_equal_pycocoevalcap_called_by_hand():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    references = [["a dog on the grass", "a puppy in a field"], ["a red bus on the street", "a bus on a road"],
                  ["a man in blue near a kite", "a guy with a kite on the beach"]]
    candidates = ["a dog on the grass", "a bus on the road", "a man on the beach"]
    gts = {0: references[0], 1: references[1], 2: references[2]}
    res = {0: [candidates[0]], 1: [candidates[1]], 2: [candidates[2]]}
    got = cl.caption_metrics(references, candidates, meteor=shutil.which("java") is not None)
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    assert [got[f"BLEU-{n}"] for n in range(1, 5)] == pytest.approx(bleu)
    assert got["ROUGE-L"] == pytest.approx(Rouge().compute_score(gts, res)[0])
    assert got["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0])
    if shutil.which("java"):
        from pycocoevalcap.meteor.meteor import Meteor
        assert got["METEOR"] == pytest.approx(Meteor().compute_score(gts, res)[0])


# --- Configuration ---------------------------------------------------------------------------------

def test_toy_overrides_apply_only_where_the_user_gave_no_flag():
    assert (cl.parse_args(["--dataset", "coco"]).rnn_size, cl.parse_args(["--dataset", "coco"]).lr) == (512, 4e-4)
    assert cl.parse_args(["--dataset", "coco", "--ref", "x.pt"]).lr == 1e-6  # the paper's CL rate
    toy = cl.parse_args([])
    assert (toy.rnn_size, toy.lr) == (cl.TOY_OVERRIDES["mle"]["rnn_size"], cl.TOY_OVERRIDES["mle"]["lr"])
    assert cl.parse_args(["--rnn-size", "64"]).rnn_size == 64
    assert cl.parse_args(["--ref=x.pt", "--lr=1e-6"]).lr == 1e-6
    assert cl.parse_args(["--ref", "x.pt"]).lr == cl.TOY_OVERRIDES["cl"]["lr"]


# --- End to end on a tiny toy world ----------------------------------------------------------------

TINY = ["--rnn-size", "16", "--emb-size", "16", "--batch-images", "5", "--val-retrieval-images", "0",
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
    assert ckpt["model"]["kwargs"]["rnn_size"] == 16 and ckpt["stage"] == "mle" and ckpt["vocab"]["itos"][0] == "<pad>"


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
    (["--nu", "0"], r"^--nu must be positive, got 0.0$"),
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
    with pytest.raises(DataError, match=r"^train images 7, 23 hold NaN or inf region features; stopped, nothing saved "
                                        r"yet in .*; repair train_ims\.npy or pass --skip-nonfinite$"):
        cl.main(TINY + ["--data-root", str(root), "--out-dir", str(run), "--epochs", "1"])
    assert not list(run.glob("*.pt"))
    cl.main(TINY + ["--data-root", str(root), "--out-dir", str(run), "--epochs", "1", "--skip-nonfinite"])
    assert "--skip-nonfinite: left out 2 of 60 training images with NaN or inf features (7, 23)" in capsys.readouterr().out
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
from common import save_checkpoint
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
    ddp = wrap_ddp(target, rank)
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
             load_split(root, "dev"), vocab, torch.device("cpu"), Path(out))
    torch.save({"target": target.state_dict(), "reference": reference.state_dict()}, Path(out) / f"rank{rank}.pt")


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
        run = subprocess.run(torchrun + extra, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
    assert "over 2 processes" in run.stdout and run.stdout.count("resuming") == 1
    assert load_checkpoint(out / "mle" / "last.pt")["step"] == 6  # 60 images / (5 images x 2 ranks)
    assert load_checkpoint(out / "cl" / "last.pt")["step"] == 5
