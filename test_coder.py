"""Specification of coder_retrieval.py: each equation against an independent numpy loop, the SCAN
protocol against a brute-force ranking, and a tiny end-to-end run (tiny random BERT, no download)."""
import copy
import json
import math
import os
import shutil
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import coder_retrieval as cr
from conftest import Hostile, interrupt_after_first_save
from test_cl import damaged, refused_in_one_line
from common import (CATEGORIES, _caption, DataError, caption_content, make_toy_world, oracle_recall, sayable, tokenize)
from coder_retrieval import load_checkpoint, save_checkpoint


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def numpy_diversity(S, eps, negatives):
    div = []
    for n in range(S.shape[0]):
        neg = [S[n, q] for q in range(S.shape[1]) if negatives[n, q]]
        div.append(1 / sigmoid(eps / np.std(neg)))
    return np.array(div) / max(div)


def numpy_dcl(S, mu, gamma, div, negatives):
    total = 0.0
    for n in range(S.shape[0]):
        inner = sum(math.exp((S[n, q] - gamma) / (mu * div[n])) for q in range(S.shape[1]) if negatives[n, q])
        total += math.log(inner + 1) - math.log(S[n, n] + 1)
    return mu / S.shape[0] * total


def numpy_dcl_hal(S, mu, gamma, div, negatives):
    """HAL's loss (its official code) with CODER's names, mu = 1/alpha and gamma = eps, and Eq. 5's div:
    per anchor (1/alpha) log(1 + sum_k exp(alpha (S_nk - eps))) - log(1 + S_nn), the positive not divided by
    alpha (HAL's relu on S_nn left out, as the paper prints)."""
    total = 0.0
    for n in range(S.shape[0]):
        inner = sum(math.exp((S[n, q] - gamma) / (mu * div[n])) for q in range(S.shape[1]) if negatives[n, q])
        total += mu * math.log(1 + inner) - math.log(1 + S[n, n])
    return total / S.shape[0]


@pytest.fixture
def sim():
    rng = np.random.default_rng(0)
    return np.tanh(rng.normal(0, 0.6, (6, 9)))


# --- Eq. 3-5 ---

def test_diversity_matches_numpy_loop(sim):
    square = sim[:, :6]
    expected = numpy_diversity(square, 0.1, ~np.eye(6, dtype=bool))
    assert np.allclose(cr.diversity(torch.tensor(square), 0.1).numpy(), expected, atol=1e-6)
    mask = np.random.default_rng(1).random(sim.shape) > 0.3
    got = cr.diversity(torch.tensor(sim), 0.1, torch.tensor(mask)).numpy()
    assert np.allclose(got, numpy_diversity(sim, 0.1, mask), atol=1e-6)
    assert got.max() == pytest.approx(1.0)


def test_diversity_is_a_weight_without_gradient(sim):
    S = torch.tensor(sim[:, :6], requires_grad=True)
    assert not cr.diversity(S).requires_grad


def test_dcl_loss_eq4_matches_numpy_loop(sim):
    square = sim[:, :6]
    got = cr.dcl_loss(torch.tensor(square), mu=0.1, gamma=0.3).item()  # the default: HAL's form, no relu
    assert got == pytest.approx(numpy_dcl_hal(square, 0.1, 0.3, np.ones(6), ~np.eye(6, dtype=bool)), rel=1e-6)
    got = cr.dcl_loss(torch.tensor(square), mu=0.1, gamma=0.3, positive="printed").item()
    assert got == pytest.approx(numpy_dcl(square, 0.1, 0.3, np.ones(6), ~np.eye(6, dtype=bool)), rel=1e-6)


def test_dcl_loss_eq5_matches_numpy_loop_with_div_and_bank_mask(sim):
    mask = np.random.default_rng(2).random(sim.shape) > 0.3
    np.fill_diagonal(mask, False)
    div = np.array([1.0, 0.7, 0.55, 0.9, 0.6, 0.8])
    got = cr.dcl_loss(torch.tensor(sim), 0.1, 0.3, torch.tensor(div), torch.tensor(mask)).item()
    assert got == pytest.approx(numpy_dcl_hal(sim, 0.1, 0.3, div, mask), rel=1e-6)


def test_dcl_positive_readings_match_numpy_loops(sim):
    mask = np.random.default_rng(3).random(sim.shape) > 0.3
    np.fill_diagonal(mask, False)
    div = np.array([1.0, 0.7, 0.55, 0.9, 0.6, 0.8])
    args = (torch.tensor(sim), 0.1, 0.3, torch.tensor(div), torch.tensor(mask))
    assert cr.dcl_loss(*args, positive="unscaled").item() == pytest.approx(
        numpy_dcl_hal(sim, 0.1, 0.3, div, mask), rel=1e-6)
    assert cr.dcl_loss(*args, positive="printed").item() == pytest.approx(numpy_dcl(sim, 0.1, 0.3, div, mask), rel=1e-6)


def test_printed_eq5_rewards_a_constant_similarity():
    """The concept-branch collapse: at S = s for every pair, Eq. 5 as printed has a minimum in s at
    mu / (1 + s) = (N - 1) e / (1 + (N - 1) e), e = exp((s - gamma) / mu) (here s* ~ -0.35 for N = 128), so an
    embedding that says the same for every input is a stationary point."""
    N, mu, gamma = 128, 0.1, 0.3
    grid = np.linspace(-0.6, 0.0, 601)
    e = np.exp((grid - gamma) / mu)
    by_hand = grid[np.argmin(np.abs(mu / (1 + grid) - (N - 1) * e / (1 + (N - 1) * e)))]
    losses = [cr.dcl_loss(torch.full((N, N), s, dtype=torch.float64), mu, gamma, positive="printed").item() for s in grid]
    assert grid[int(np.argmin(losses))] == pytest.approx(by_hand, abs=1e-3) and by_hand == pytest.approx(-0.35, abs=0.01)


def test_unscaled_positive_keeps_a_constant_stationary_point():
    """The default positive (mu only on the negative term) still rewards an embedding that says the
    same for every input: at S = s everywhere the loss is minimal where (N - 1) e / (1 + (N - 1) e) =
    1 / (1 + s), e = exp((s - gamma) / mu), s* ~ 0.075 for N = 128; a concept branch whose attention is the
    same for every input settles there (without --query-norm, README)."""
    N, mu, gamma = 128, 0.1, 0.3
    grid = np.linspace(-0.3, 0.4, 701)
    e = np.exp((grid - gamma) / mu)
    by_hand = grid[np.argmin(np.abs(1 / (1 + grid) - (N - 1) * e / (1 + (N - 1) * e)))]
    losses = [cr.dcl_loss(torch.full((N, N), s, dtype=torch.float64), mu, gamma, positive="unscaled").item()
              for s in grid]
    assert grid[int(np.argmin(losses))] == pytest.approx(by_hand, abs=1e-3) and by_hand == pytest.approx(0.075, abs=0.005)


def test_eq4_equals_eq5_when_div_is_one(sim):
    S = torch.tensor(sim[:, :6])
    assert cr.dcl_loss(S, 0.1, 0.3, torch.ones(6, dtype=S.dtype)).item() == pytest.approx(cr.dcl_loss(S, 0.1, 0.3).item(), rel=1e-9)
    assert cr.dcl_loss(S, 0.1, 0.3, torch.full((6,), 0.5)).item() != pytest.approx(cr.dcl_loss(S, 0.1, 0.3).item())


def test_dcl_loss_is_stable_for_confident_similarities():
    S = torch.tensor([[0.99, -0.99], [0.99, 0.99]], dtype=torch.float32)
    assert torch.isfinite(cr.dcl_loss(S, mu=0.01, gamma=0.3, div=torch.tensor([0.5, 1.0])))


def test_triplet_matches_numpy_loop(sim):
    square = sim[:, :6]
    hinge = sum(max(0, 0.2 + max(square[n, q] for q in range(6) if q != n) - square[n, n]) for n in range(6))
    assert cr.triplet_loss(torch.tensor(square), 0.2).item() == pytest.approx(hinge)


# --- SCAN protocol ---

def brute_force_ranks(S):
    n = S.shape[0]
    i2t, t2i = [], []
    for i in range(n):  # ties: a negative goes before a ground truth of the same score
        order = sorted(range(5 * n), key=lambda j: (-S[i, j], j // 5 == i))
        i2t.append(min(order.index(j) for j in range(5 * i, 5 * i + 5)))
    for j in range(5 * n):
        order = sorted(range(n), key=lambda i: (-S[i, j], i == j // 5))
        t2i.append(order.index(j // 5))
    return np.array(i2t), np.array(t2i)


def test_recall_at_k_matches_brute_force_ranking_with_ties():
    rng = np.random.default_rng(3)
    S = rng.integers(0, 6, (13, 65)).astype(np.float32)  # few distinct values: many ties
    i2t, t2i = brute_force_ranks(S)
    got = cr.recall_at_k(torch.tensor(S))
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            assert got[f"{name}_r{k}"] == pytest.approx(100 * np.mean(ranks < k))
        assert got[f"{name}_medr"] == np.floor(np.median(ranks)) + 1
    assert got["rsum"] == pytest.approx(sum(got[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))


def test_recall_uses_best_of_five_captions_and_constant_scores_get_nothing():
    n = 4
    S = np.zeros((n, 5 * n), dtype=np.float32)
    for i in range(n):
        S[i, 5 * i + 3] = 1.0  # only one of the five captions matches well: enough for i2t R@1
    got = cr.recall_at_k(torch.tensor(S))
    assert got["i2t_r1"] == 100.0
    assert got["t2i_r1"] == pytest.approx(100 * 1 / 5)
    assert cr.recall_at_k(torch.zeros(n, 5 * n))["i2t_r1"] == 0.0


def test_coco_reports_1k_as_the_mean_of_5_folds_of_testall_and_5k_on_all_of_it():
    assert cr.test_splits("coco") == [("COCO 1K", "testall", 5), ("COCO 5K", "testall", 1)]
    assert cr.test_splits("flickr30k") == cr.test_splits("toy") == [("test", "test", 1)]


def test_five_fold_split_scores_each_fold_alone():
    n = 10  # 5 folds of 2 images; a caption of another fold outscores every ground truth
    S = np.zeros((n, 5 * n), dtype=np.float32)
    for i in range(n):
        S[i, 5 * i:5 * i + 5] = 1.0
        S[i, (5 * i + 10) % (5 * n)] = 2.0
    assert cr.fold_recall(torch.tensor(S), 5)["i2t_r1"] == 100.0
    assert cr.fold_recall(torch.tensor(S), 1)["i2t_r1"] == 0.0


# --- Coupled memory banks ---

def test_momentum_update_formula():
    torch.manual_seed(0)
    online, key = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.detach().clone() for p in key.parameters()]
    cr.momentum_update(online, key, 0.9)
    for p_k, p_old, p_q in zip(key.parameters(), before, online.parameters()):
        assert torch.allclose(p_k, 0.9 * p_old + 0.1 * p_q)


def test_queue_wraps_around():
    bank = cr.MemoryBank(5, 2)
    assert (bank.ids == -1).all()
    bank.enqueue(torch.ones(3, 2), torch.tensor([10, 11, 12]))
    bank.enqueue(2 * torch.ones(3, 2), torch.tensor([20, 21, 22]))
    assert bank.ids.tolist() == [22, 11, 12, 20, 21] and int(bank.ptr) == 1
    assert bank.feats[0].tolist() == [2.0, 2.0] and bank.feats[1].tolist() == [1.0, 1.0]
    bank.enqueue(torch.zeros(7, 2), torch.arange(7))  # more than the bank holds: the newest 5 stay
    assert sorted(bank.ids.tolist()) == [2, 3, 4, 5, 6]


def test_same_image_and_empty_slots_are_not_negatives():
    anchors = torch.tensor([0, 1])
    keys = torch.tensor([0, 1, 1, 0, -1, 7])  # [own batch keys; queue]
    assert cr.bank_negatives(anchors, keys).tolist() == [[False, True, True, False, False, True],
                                                         [True, False, False, True, False, True]]
    sim = torch.rand(2, 6)
    changed = sim.clone()
    changed[0, 3] = 0.99  # a queued caption of image 0: must not change image 0's loss
    mask = cr.bank_negatives(anchors, keys)
    assert cr.dcl_loss(sim, negatives=mask).item() == pytest.approx(cr.dcl_loss(changed, negatives=mask).item())


# --- Concept graph and branch ---

def test_concept_vocabulary_and_cooccurrence():
    captions = ["a dog on the grass", "a dog and a cat", "the cat on a mat", "a dog"]
    concepts = cr.concept_vocabulary(captions, 3)
    assert concepts == ["dog", "cat", "grass"]
    counts, nums = cr.cooccurrence(captions, concepts)
    assert nums.tolist() == [3, 2, 1]
    assert counts.tolist() == [[0, 1, 1], [1, 0, 0], [1, 0, 0]]


def test_adjacency_on_hand_made_table():
    counts = np.array([[0, 8, 1], [8, 0, 4], [1, 4, 0]], dtype=float)
    nums = np.array([10, 20, 5], dtype=float)
    g = 3
    A = np.zeros((g, g))
    for i in range(g):
        for j in range(g):
            A[i, j] = 1.0 if counts[i, j] / nums[i] >= 0.3 else 0.0  # P(j|i), binarised
    col = A.sum(0)
    for i in range(g):
        for j in range(g):
            A[i, j] = A[i, j] * 0.25 / (col[j] + 1e-6) + (i == j)
    d = A.sum(1)
    expected = np.array([[A[j, i] / math.sqrt(d[i] * d[j]) for j in range(g)] for i in range(g)])
    got = cr.concept_adjacency(counts, nums, 0.3, 0.25)
    assert np.allclose(got, expected, atol=1e-6)
    # P(1|0) = 0.8 and P(2|1) = 0.2: the edge 0->1 survives the threshold, 1->2 does not
    assert got[1, 0] > 0 and got[2, 1] == 0 and got[1, 2] > 0


def test_concept_inputs_are_the_mean_of_word_pieces():
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(cr.MINILM, local_files_only=True)  # on disk
    E = torch.randn(tokenizer.vocab_size, 3)
    X = cr.concept_inputs(["frisbee", "dog"], tokenizer, E)
    pieces = [tokenizer.convert_tokens_to_ids(p) for p in ("fr", "##is", "##bee")]
    assert torch.allclose(X, torch.stack([E[pieces].mean(0), E[tokenizer.convert_tokens_to_ids("dog")]]))


@pytest.mark.parametrize("scaled", [False, True])
def test_concept_attention_matches_numpy(scaled):
    rng = np.random.default_rng(4)
    q, W, Y = rng.normal(size=(2, 4)), rng.normal(size=(4, 4)), rng.normal(size=(5, 4))
    Yn = Y / np.linalg.norm(Y, axis=1, keepdims=True)
    expected = []
    for row in q:
        query = row @ W / (np.linalg.norm(row @ W) / 2 if scaled else 1.0)  # scaled: unit norm times sqrt(F = 4)
        scores = np.array([10 * query @ y for y in Yn])
        a = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        v = sum(a_i * y for a_i, y in zip(a, Yn))
        expected.append(v / np.linalg.norm(v))
    Y_t = torch.tensor(Yn)
    got = cr.concept_embedding(cr.concept_scores(torch.tensor(q), torch.tensor(W), Y_t, 10.0, scaled), Y_t)
    assert np.allclose(got.numpy(), np.array(expected), atol=1e-6)


# --- PGC ---

def test_kmeans_recovers_separated_blobs_and_is_seeded():
    rng = np.random.default_rng(5)
    centres = rng.normal(0, 10, (4, 3))
    truth = np.repeat(np.arange(4), 30)
    x = torch.tensor(centres[truth] + rng.normal(0, 0.3, (120, 3)), dtype=torch.float32)
    cents, labels = cr.kmeans(x, 4, iters=10, seed=0)
    pairs = set(zip(truth.tolist(), labels.tolist()))
    assert len(pairs) == 4 and len({p[1] for p in pairs}) == 4  # a bijection blob <-> cluster
    assert torch.equal(cr.kmeans(x, 4, iters=10, seed=0)[1], labels)
    assert torch.equal(cr.kmeans(x + 0.01, 4, iters=3, init=cents)[1], labels)  # warm start keeps ids


def test_online_clustering_keeps_prototype_ids_from_one_epoch_to_the_next():
    """Sec. 3.4's labels are class ids for P^C: the warm start keeps them, whatever the next epoch's seed."""
    rng = np.random.default_rng(2)
    blobs = np.repeat(rng.normal(0, 10, (3, 4)), 10, axis=0) + rng.normal(0, 0.5, (30, 4))
    pgc = cr.OnlineClustering(40, 4, torch.device("cpu"))
    pgc.store(torch.arange(30), torch.tensor(blobs).half())
    pgc.cluster(3, 5, seed=0, rank=0)
    first = pgc.labels.clone()
    assert (first[30:] == -1).all() and len(set(first[:30].tolist())) == 3  # pairs never stored: no label
    for seed in range(1, 6):  # k-means++ from scratch would number the blobs anew
        pgc.cluster(3, 5, seed=seed, rank=0)
        assert torch.equal(pgc.labels, first)


def test_an_empty_cluster_keeps_its_centroid():
    x = torch.tensor([[0.0, 0], [1, 0], [0, 1]])
    centroids, labels = cr.kmeans(x, 2, iters=3, init=torch.tensor([[0.0, 0], [100, 100]]))
    assert labels.tolist() == [0, 0, 0] and centroids[1].tolist() == [100, 100]  # not 0 / 0


def test_pgc_loss_is_cross_entropy_over_known_labels():
    torch.manual_seed(0)
    P = nn.Linear(4, 3, bias=False)
    v, w = torch.randn(3, 4), torch.randn(3, 4)
    z = torch.tensor([2, -1, 0])
    expected = 0.0
    for emb in (v, w):
        logits = (emb @ P.weight.t()).detach().numpy()
        for n in (0, 2):
            expected += (-logits[n, z[n]] + np.log(np.exp(logits[n]).sum())) / 2
    assert cr.pgc_loss(P, v, w, z).item() == pytest.approx(expected, rel=1e-5)
    assert cr.pgc_loss(P, v, w, torch.full((3,), -1)).item() == 0.0


# --- The toy world's ceiling (common.oracle_recall) ---

def test_caption_content_drops_synonyms_prefixes_verbs_and_the_place_wording():
    assert caption_content("a photo of a beach with a puppy sitting today") == ("dog", "<place0>")
    assert caption_content("on the sand, the pup is laying") == ("dog", "<place0>")
    assert caption_content("a big gentleman in red riding a blue surfboard and a dog by the ocean") == \
        caption_content("a large man wearing red carrying a blue surfboard and a pup on the beach in the sun") == \
        ("large", "man", "red", "blue", "surfboard", "dog", "<place0>")
    assert caption_content("a person in red on a city street") == ("person", "red", "<place2>")
    assert caption_content("an umbrella in a park") == caption_content("an umbrella on the grass")


def toy_split(scenes, seed=0):
    rng = np.random.default_rng(seed)
    return [_caption(scene, level, rng) for scene in scenes for level in scene["levels"]]


def test_oracle_recall_of_twin_scenes_by_hand():
    """Images 0 and 1 have the same scene, image 2 another: each caption of 0 or 1 is one of 2 equally
    likely images (t2i R@1 1/2); image 0 finds its 5 captions tied with 1's 5 (i2t R@1 5/10, R@5
    1 - C(5,5)/C(10,5) = 1 - 1/252); image 2 is unique (100 everywhere)."""
    twin = {"objects": [{"category": 1, "colour": 2, "size": 0, "position": 1},
                        {"category": 4, "colour": 5, "size": 1, "position": 0}], "place": 3, "levels": [0, 0, 1, 2, 3]}
    other = {"objects": [{"category": 7, "colour": 2, "size": 0, "position": 1}], "place": 5, "levels": [3, 0, 2, 0, 1]}
    scenes = [twin, twin, other]
    got = oracle_recall(scenes, toy_split(scenes))
    assert got["t2i"] == pytest.approx([(10 * 50 + 5 * 100) / 15, 100, 100])
    assert got["i2t"] == pytest.approx([(50 + 50 + 100) / 3, (2 * 100 * (1 - 1 / 252) + 100) / 3, 100])


def test_oracle_recall_matches_random_tie_breaking(tmp_path):
    """The closed form against ranking by P(image | caption) with random tie-breaks, 4,000 draws."""
    make_toy_world(tmp_path, seed=3, n_train=1, n_dev=1, n_test=40)
    scenes = json.loads((tmp_path / "test_scenes.json").read_text())
    captions = (tmp_path / "test_caps.txt").read_text().splitlines()
    got = oracle_recall(scenes, captions)
    rng = np.random.default_rng(0)
    says = [sayable(s) for s in scenes]
    consistent = np.array([[caption_content(c) in say for say in says] for c in captions], dtype=float)
    own = np.repeat(np.arange(40), 5)
    posterior = consistent / consistent.sum(1, keepdims=True)  # P(image | caption)
    hits = np.zeros((2, 3))
    for _ in range(4000):
        noisy = posterior + 1e-9 * rng.random(posterior.shape)
        t2i_rank = (noisy > noisy[np.arange(200), own][:, None]).sum(1)
        i2t_rank = np.array([(noisy[:, i] > noisy[own == i, i].max()).sum() for i in range(40)])
        hits += [[np.mean(i2t_rank < k) for k in (1, 5, 10)], [np.mean(t2i_rank < k) for k in (1, 5, 10)]]
    assert got["i2t"] == pytest.approx(list(100 * hits[0] / 4000), abs=1.0)
    assert got["t2i"] == pytest.approx(list(100 * hits[1] / 4000), abs=1.0)
    assert got["t2i"][0] < 95  # the test can fail: this world has ties


@pytest.fixture(scope="module")
def default_toy_train(tmp_path_factory):
    """The default-sized toy training split (3000 images), its captions and scenes."""
    root = tmp_path_factory.mktemp("default-toy")
    make_toy_world(root, n_dev=1, n_test=1)
    captions = (root / "train_caps.txt").read_text().splitlines()
    return captions, json.loads((root / "train_scenes.json").read_text())


def test_toy_cooccurrence_graph_is_as_dense_as_the_real_ones(default_toy_train):
    """COCO and Flickr30K's 400 concepts hold 0.65-1.12 edges per concept at P(j|i) >= 0.3, CVSE's 300
    0.60-1.06; the toy's edges are what its places and objects imply (objects point to their place)."""
    captions, _ = default_toy_train
    concepts = cr.concept_vocabulary(captions, 400)
    counts, nums = cr.cooccurrence(captions, concepts)
    edges = counts / np.maximum(nums[:, None], 1) >= 0.3
    assert 0.4 <= edges.sum() / len(concepts) <= 1.5  # measured: 90 edges among 103 concepts
    index = {w: i for i, w in enumerate(concepts)}
    for i, j in [("surfboard", "beach"), ("sheep", "field"), ("bus", "street"), ("stove", "kitchen")]:
        assert edges[index[i], index[j]], (i, j)
    A = cr.concept_adjacency(counts, nums)
    assert A[index["beach"], index["surfboard"]] > 0  # the edge reaches the graph CODER propagates over


def test_toy_captions_name_objects_whose_features_are_weak(default_toy_train):
    captions, scenes = default_toy_train
    context = [obj for s in scenes for obj in s["objects"][1:]]
    assert 0.3 < np.mean([obj["weak"] for obj in context]) < 0.5  # measured: 0.39
    assert not any(s["objects"][0]["weak"] for s in scenes)
    naming = [any(obj["weak"] and set(CATEGORIES[obj["category"]]) & set(tokenize(c)) for obj in s["objects"][1:])
              for i, s in enumerate(scenes) for c in captions[5 * i:5 * i + 5]]
    assert np.mean(naming) > 0.1  # measured: 0.14 of all captions


# --- Cases where a wrong fold, centroid update, activation or weight changes the answer ---

def fold_brute_force(S, folds):
    """Independent SCAN recall of each consecutive fold (brute_force_ranks), averaged over the folds."""
    size, per_fold = S.shape[0] // folds, []
    for f in range(folds):
        i2t, t2i = brute_force_ranks(S[f * size:(f + 1) * size, 5 * f * size:5 * (f + 1) * size])
        m = {f"{d}_r{k}": 100 * np.mean(r < k) for d, r in (("i2t", i2t), ("t2i", t2i)) for k in (1, 5, 10)}
        m.update(i2t_medr=np.floor(np.median(i2t)) + 1, t2i_medr=np.floor(np.median(t2i)) + 1, rsum=sum(m.values()))
        per_fold.append(m)
    return {key: np.mean([m[key] for m in per_fold]) for key in per_fold[0]}


def uneven_folds():
    """10 images, 5 folds of 2: ties everywhere, and each fold ranks differently."""
    S = np.random.default_rng(7).integers(0, 4, (10, 50)).astype(np.float32)
    S[4:6, 20:30] = 0.0  # fold 2 constant: ties go against every query, R@1 = 0 there
    return S


def test_fold_recall_averages_every_fold_not_just_the_first():
    S = uneven_folds()
    want5, want1, fold0 = fold_brute_force(S, 5), fold_brute_force(S, 1), fold_brute_force(S[:2, :10], 1)
    assert want5["rsum"] != pytest.approx(want1["rsum"]) and want5["rsum"] != pytest.approx(fold0["rsum"])
    got = cr.fold_recall(torch.tensor(S), 5)
    assert got.keys() == want5.keys()
    for key in want5:
        assert got[key] == pytest.approx(want5[key]), key


class LookupEncoders(nn.Module):
    """Stand-in encoder pair: an image's single region is its embedding; caption id j looks up row j."""
    def __init__(self, captions):
        super().__init__()
        self.table = nn.Parameter(captions, requires_grad=False)

    def encode_images(self, regions):
        return regions[:, 0], None

    def encode_texts(self, ids, mask):
        assert mask.all()
        return self.table[ids[:, 0]], None


def test_evaluate_scores_the_folds_it_is_given():
    S = uneven_folds()  # image i = one-hot e_i, caption j = column j of S: then v_I @ w_I^T = S
    features, tokens = np.eye(10, dtype=np.float32)[:, None, :], np.arange(50, dtype=np.int32)[:, None]
    got = cr.evaluate(LookupEncoders(torch.tensor(S.T)), features, tokens, -1, torch.device("cpu"), 0.5,
                      folds=5, batch_size=4)
    want = fold_brute_force(S, 5)
    assert want["rsum"] != pytest.approx(fold_brute_force(S, 1)["rsum"])
    for key in want:
        assert got[key] == pytest.approx(want[key]), key
    assert got["images"] == 10


@pytest.mark.parametrize("iters,centroids,labels", [
    (0, [[-1, 0], [7, 0]], [0, 1, 1, 1]),  # one assignment from the poor init, then one update
    (1, [[0, 0], [10, 0]], [0, 0, 1, 1]),  # the update pulled centroid 1 over to blob B
    (5, [[0, 0], [10, 0]], [0, 0, 1, 1])])
def test_kmeans_moves_poor_initial_centroids_to_the_blob_means(iters, centroids, labels):
    x = torch.tensor([[-1.0, 0], [1, 0], [9, 0], [11, 0]])  # blobs A = {-1, 1}, B = {9, 11}
    got_c, got_l = cr.kmeans(x, 2, iters=iters, init=torch.tensor([[-2.0, 0], [0.5, 0]]))  # both by blob A
    assert torch.allclose(got_c, torch.tensor(centroids, dtype=torch.float32))
    assert got_l.tolist() == labels


def test_gcn_is_two_graph_convolutions_with_leaky_relu_then_l2_norm():
    rng = np.random.default_rng(11)
    X, W1, W2 = rng.normal(size=(4, 3)), rng.normal(size=(3, 5)), rng.normal(size=(5, 2))
    A = rng.uniform(0, 1, (4, 4))
    A = (A + A.T) / 2
    H = A @ X @ W1
    assert (H < 0).sum() > 3  # LeakyReLU and ReLU disagree here
    Y = A @ np.where(H > 0, H, 0.2 * H) @ W2
    want = Y / np.linalg.norm(Y, axis=1, keepdims=True)
    got = cr.gcn(*(torch.tensor(a) for a in (X, A, W1, W2)))
    assert np.allclose(got.numpy(), want, atol=1e-10)

def test_eq8_weighs_the_instance_term_by_lambda_and_adds_the_others():
    """L = lambda L^I + L^I_M-DCL + L^C + L_PGC, each DCL term summed over both directions: checked on
    random embeddings against numpy loops of Eq. 5 (diversity by hand) and a hand cross-entropy."""
    g = torch.Generator().manual_seed(3)
    unit = lambda n: cr.l2norm(torch.randn(n, 6, generator=g))
    v_I, w_I, v_C, w_C, keys = unit(4), unit(4), unit(4), unit(4), unit(7)
    image_ids, z = torch.arange(4), torch.tensor([1, -1, 0, 2])
    key_ids = torch.tensor([0, 1, 2, 3, 9, 2, -1])  # the batch's own keys, a queued key, one of image 2, an empty slot
    prototypes = nn.Linear(6, 3, bias=False)
    args = cr.parse_args(["--lambda-inst", "2.5", "--dcl-positive", "printed"])
    loss, terms = cr.coder_loss(v_I, w_I, v_C, w_C, image_ids, z, args, (keys, key_ids, keys, key_ids), prototypes)

    def eq5(S, negatives, div=None):
        S = S.double().numpy()
        div = numpy_diversity(S, args.eps, negatives) if div is None else div
        return numpy_dcl(S, args.mu, args.gamma, div, negatives)

    eye = np.eye(4, dtype=bool)
    neg_bank = (key_ids[None, :] != image_ids[:, None]).numpy() & (key_ids >= 0).numpy()[None, :]
    S_I, S_C, S_vB, S_wB = v_I @ w_I.T, v_C @ w_C.T, v_I @ keys.T, w_I @ keys.T
    div_v = (numpy_diversity(S_I.double().numpy(), args.eps, ~eye) + numpy_diversity(S_vB.double().numpy(), args.eps,
                                                                                     neg_bank)) / 2
    div_w = (numpy_diversity(S_I.T.double().numpy(), args.eps, ~eye) + numpy_diversity(S_wB.double().numpy(), args.eps,
                                                                                       neg_bank)) / 2
    L_I = eq5(S_I, ~eye, div_v) + eq5(S_I.T, ~eye, div_w)
    L_M = eq5(S_vB, neg_bank, div_v) + eq5(S_wB, neg_bank, div_w)
    L_C = eq5(S_C, ~eye) + eq5(S_C.T, ~eye)
    P = prototypes.weight.detach().double().numpy()
    ce = lambda x, k: -np.log(np.exp(P @ x)[k] / np.exp(P @ x).sum())
    L_PGC = sum(ce(v_C[n].double().numpy(), z[n]) + ce(w_C[n].double().numpy(), z[n]) for n in range(4) if z[n] >= 0) / 3
    close = lambda want: pytest.approx(want, rel=1e-5)
    assert terms["I"].item() == close(2.5 * L_I) and terms["M-DCL"].item() == close(L_M)
    assert terms["C"].item() == close(L_C) and terms["PGC"].item() == close(L_PGC)
    assert loss.item() == close(2.5 * L_I + L_M + L_C + L_PGC)



# --- End to end on a tiny world with a tiny random BERT ---

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizerFast
    root = tmp_path_factory.mktemp("coder")
    make_toy_world(root / "toy", n_train=60, n_dev=20, n_test=20, regions=4, dim=16)
    words = sorted({w for split in ("train", "dev", "test")
                    for line in (root / "toy" / f"{split}_caps.txt").read_text().splitlines() for w in tokenize(line)})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})  # transformers >= 5
    if len(tokenizer) != len(vocab):
        tokenizer = BertTokenizerFast(vocab_file=str(root / "vocab.txt"))  # transformers 4
    assert len(tokenizer) == len(vocab) and tokenizer.unk_token_id not in tokenizer("a dog")["input_ids"]
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    return root


def step_loss(net, model, regions, ids, mask, image_ids, z, args):
    """The training step's forward, as train_step computes it: queries, MoCo keys, then Eq. 8."""
    v_I, w_I, v_C, w_C = net(regions, ids, mask)
    keys = bank = None
    if model.bank_size:
        with torch.no_grad():
            cr.momentum_update(model.image_encoder, model.image_encoder_m, args.momentum)
            cr.momentum_update(model.text_encoder, model.text_encoder_m, args.momentum)
            keys = (cr.l2norm(cr.aggregate(model.image_encoder_m(regions))),
                    cr.l2norm(cr.aggregate(model.text_encoder_m(ids, mask), mask)))
        bank = (torch.cat([keys[1], model.text_queue.feats]), torch.cat([image_ids, model.text_queue.ids]),
                torch.cat([keys[0], model.image_queue.feats]), torch.cat([image_ids, model.image_queue.ids]))
    return (*cr.coder_loss(v_I, w_I, v_C, w_C, image_ids, z, args, bank, model.prototypes), keys)


def test_frozen_lower_layers_have_no_dropout_no_gradient_and_stay_equal_in_the_momentum_encoder():
    config = dict(model_type="bert", vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.5,
                  attention_probs_dropout_prob=0.5)
    torch.manual_seed(0)
    model = cr.CODER(8, 16, config, bank_size=4)
    cr.freeze_lower_layers(model, 0)  # the paper's default: nothing frozen, every dropout kept
    assert all(p.requires_grad for p in model.text_encoder.bert.embeddings.parameters())
    assert all(m.p == 0.5 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    cr.freeze_lower_layers(model, 2)
    model.train()
    ids, mask = torch.randint(5, 50, (3, 7)), torch.ones(3, 7, dtype=torch.bool)
    mask[0, 4:], mask[2, 2:] = False, False
    states = [model.text_encoder.bert(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
              for _ in range(2)]
    assert torch.equal(states[0][2], states[1][2]) and not torch.equal(states[0][3], states[1][3])  # dropout above only
    model.text_encoder(ids, mask).sum().backward()
    layers = model.text_encoder.bert.encoder.layer
    assert all(p.grad is None for layer in layers[:2] for p in layer.parameters())
    assert all(p.grad is not None for layer in layers[2:] for p in layer.parameters())
    with torch.no_grad():
        for p in (p for p in model.text_encoder.parameters() if p.requires_grad):
            p.add_(1.0)  # a step of the optimizer
    cr.momentum_update(model.text_encoder, model.text_encoder_m, 0.995)
    for (name, p_q), p_k in zip(model.text_encoder.named_parameters(), model.text_encoder_m.parameters()):
        assert torch.equal(p_q, p_k) == (not p_q.requires_grad), name  # the frozen ones were not moved, and stay equal


def tiny_args(tiny, *extra):
    return ["--data-root", str(tiny / "toy"), "--text-encoder", str(tiny / "bert"), "--embed-size", "32",
            "--batch-size", "16", "--bank-size", "40", "--n-concepts", "12", "--n-prototypes", "4",
            "--freeze-text-layers", "0", "--val-images", "20", "--out-dir", str(tiny / "runs"), *extra]


def test_a_few_steps_lower_the_loss_and_checkpoint_reloads_identically(tiny, tmp_path):
    args = cr.parse_args(tiny_args(tiny, "--lr", "1e-3"))
    tokenizer, text_model = cr.load_text_model(args.text_encoder)
    feats, tokens, caps = cr.load_retrieval_split(tiny / "toy", "train", tokenizer, args.max_len)
    torch.manual_seed(0)
    model, model_args, _ = cr.build_model(args, feats.shape[2], text_model, tokenizer, caps)
    optimizer = cr.make_optimizer(model, args)
    idx = np.arange(0, 80, 5) + np.arange(16) % 5  # 16 captions of 16 different images
    regions = cr.image_batch(feats, idx // 5, torch.device("cpu"))
    ids, mask = cr.text_batch(tokens, idx, tokenizer.pad_token_id, torch.device("cpu"))
    image_ids, z = torch.from_numpy(idx // 5), torch.from_numpy(idx % 4)

    def instance_loss():
        with torch.no_grad():
            v_I, w_I, _, _ = model(regions, ids, mask)
            return cr.dcl_loss(v_I @ w_I.t()).item() + cr.dcl_loss(w_I @ v_I.t()).item()

    before = instance_loss()
    for _ in range(8):
        loss, terms, keys = step_loss(model, model, regions, ids, mask, image_ids, z, args)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.image_queue.enqueue(keys[0], image_ids)
        model.text_queue.enqueue(keys[1], image_ids)
    assert set(terms) == {"I", "M-DCL", "C", "PGC"}
    assert instance_loss() < before
    with torch.no_grad():  # the training forward gives v^I, w^I, v^C, w^C in that order, as evaluation encodes them
        (v_I, v_C), (w_I, w_C) = model.encode_images(regions), model.encode_texts(ids, mask)
        for got, want in zip(model(regions, ids, mask), (v_I, w_I, v_C, w_C)):
            assert torch.equal(got, want)

    save_checkpoint({"model": model.state_dict(), "model_args": model_args}, tmp_path / "m.pt")
    reloaded = cr.model_from_checkpoint(load_checkpoint(tmp_path / "m.pt"))
    model.eval(), reloaded.eval()
    with torch.no_grad():
        for a, b in zip(model.encode_images(regions) + model.encode_texts(ids, mask),
                        reloaded.encode_images(regions) + reloaded.encode_texts(ids, mask)):
            assert torch.equal(a, b)
    assert torch.equal(model.text_queue.feats, reloaded.text_queue.feats)


def test_one_training_step_matches_numpy_loops_of_eq6_to_8_and_moco_order(tiny):
    """train_step on 4 pairs, two of one image, with queues of known ids, against loops by hand: same-image captions
    and empty slots are never negatives, image anchors meet the text queue and captions the image queue, the key
    encoders move before they encode, and the keys enqueue with their image ids (not caption indices)."""
    args = cr.parse_args(tiny_args(tiny, "--batch-size", "4", "--bank-size", "8", "--n-prototypes", "3",
                                   "--momentum", "0.5", "--lambda-inst", "2"))
    tokenizer, text_model = cr.load_text_model(args.text_encoder)
    feats, tokens, caps = cr.load_retrieval_split(tiny / "toy", "train", tokenizer, args.max_len)
    torch.manual_seed(0)
    model = cr.build_model(args, feats.shape[2], text_model, tokenizer, caps)[0].train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in [*model.image_encoder_m.parameters(), *model.text_encoder_m.parameters()]:
            p.add_(0.1 * torch.randn(p.shape, generator=g))  # key encoders != query encoders: the order shows
        for queue, ids, ptr in ((model.image_queue, [3, 0, 7, 1, 2, 9, -1, -1], 6),
                                (model.text_queue, [4, 1, 0, 8, 5, 6, 2, -1], 0)):
            queue.feats.copy_(cr.l2norm(torch.randn(8, 32, generator=g))), queue.ids.copy_(torch.tensor(ids))
            queue.ptr.fill_(ptr)
    caption_idx = torch.tensor([0, 1, 5, 10])  # images 0, 0, 1, 2
    image_ids = [0, 0, 1, 2]
    pgc = cr.OnlineClustering(len(tokens), 32, torch.device("cpu"))
    pgc.labels[caption_idx] = torch.tensor([1, -1, 0, 2])
    regions = cr.image_batch(feats, caption_idx.numpy() // 5, torch.device("cpu"))
    ids, mask = cr.text_batch(tokens, caption_idx.numpy(), tokenizer.pad_token_id, torch.device("cpu"))
    before = copy.deepcopy(model)
    old_queues = [(q.feats.clone(), q.ids.tolist()) for q in (model.image_queue, model.text_queue)]
    with torch.no_grad():  # what the step should compute, from a copy
        v_I, w_I, v_C, w_C = (x.double().numpy() for x in before(regions, ids, mask))
        for online, key in ((before.image_encoder, before.image_encoder_m), (before.text_encoder, before.text_encoder_m)):
            for p_q, p_k in zip(online.parameters(), key.parameters()):  # a frozen p_q: p_k stays equal to it
                p_k.copy_(0.5 * p_k + 0.5 * p_q if p_q.requires_grad else p_k)  # theta_k <- m theta_k + (1 - m) theta_q
        v_k = cr.l2norm(cr.aggregate(before.image_encoder_m(regions)))
        w_k = cr.l2norm(cr.aggregate(before.text_encoder_m(ids, mask), mask))
    terms = cr.train_step(model, model, cr.make_optimizer(model, args), pgc, regions, ids, mask, caption_idx, args)

    def loss(S, negative, div):  # Eq. 5, one direction, the positive not scaled by mu (the default)
        return numpy_dcl_hal(S, args.mu, args.gamma, div, negative)
    batch_negative = np.array([[image_ids[q] != image_ids[n] for q in range(4)] for n in range(4)])
    text_keys = np.concatenate([w_k.double().numpy(), old_queues[1][0].double().numpy()])
    image_keys = np.concatenate([v_k.double().numpy(), old_queues[0][0].double().numpy()])
    text_key_ids, image_key_ids = image_ids + old_queues[1][1], image_ids + old_queues[0][1]
    bank_negative = lambda key_ids: np.array([[key_ids[j] != image_ids[n] and key_ids[j] >= 0
                                               for j in range(len(key_ids))] for n in range(4)])
    S_I, S_C, S_vB, S_wB = v_I @ w_I.T, v_C @ w_C.T, v_I @ text_keys.T, w_I @ image_keys.T
    neg_v, neg_w = bank_negative(text_key_ids), bank_negative(image_key_ids)
    div_v = (numpy_diversity(S_I, args.eps, batch_negative) + numpy_diversity(S_vB, args.eps, neg_v)) / 2
    div_w = (numpy_diversity(S_I.T, args.eps, batch_negative.T) + numpy_diversity(S_wB, args.eps, neg_w)) / 2
    P = before.prototypes.weight.detach().double().numpy()  # P^C before Adam's step
    ce = lambda x, k: -np.log(np.exp(P @ x)[k] / np.exp(P @ x).sum())
    want = {"I": 2 * (loss(S_I, batch_negative, div_v) + loss(S_I.T, batch_negative.T, div_w)),
            "M-DCL": loss(S_vB, neg_v, div_v) + loss(S_wB, neg_w, div_w),
            "C": loss(S_C, batch_negative, numpy_diversity(S_C, args.eps, batch_negative))
                 + loss(S_C.T, batch_negative.T, numpy_diversity(S_C.T, args.eps, batch_negative.T)),
            "PGC": sum(ce(v_C[n], k) + ce(w_C[n], k) for n, k in ((0, 1), (2, 0), (3, 2))) / 3}
    assert {k: v.item() for k, v in terms.items()} == pytest.approx(want, rel=1e-4)
    for queue, keys, slots in ((model.image_queue, v_k, [6, 7, 0, 1]), (model.text_queue, w_k, [0, 1, 2, 3])):
        assert torch.allclose(queue.feats[slots], keys, atol=1e-6) and queue.ids[slots].tolist() == image_ids
    assert (model.image_queue.ptr.item(), model.text_queue.ptr.item()) == (2, 4)
    for a, b in zip(model.text_encoder_m.parameters(), before.text_encoder_m.parameters()):
        assert torch.equal(a, b)  # moved once, by m
    assert torch.allclose(pgc.feats[caption_idx].float(), torch.from_numpy(v_I + w_I).float(), atol=2e-3)
    assert pgc.seen.sum() == 4


def concept_usage_after_training(tiny, *flags):
    args = cr.parse_args(tiny_args(tiny, "--epochs", "6", "--lr", "1e-3", "--no-bank", "--no-pgc", *flags))
    torch.manual_seed(0)
    model, _, _ = cr.train(args, tiny / "toy")
    tokenizer, _ = cr.load_text_model(args.text_encoder)
    feats, tokens, _ = cr.load_retrieval_split(tiny / "toy", "dev", tokenizer, args.max_len)
    model.eval()
    with torch.no_grad():  # Eq. 2's scores a^v, a^w of every dev image and caption
        Y, cpu = model.concepts.basis(), torch.device("cpu")
        a_v = model.concepts.image_scores(cr.image_batch(feats, np.arange(len(feats)), cpu), Y)
        ids, mask = cr.text_batch(tokens, np.arange(len(tokens)), tokenizer.pad_token_id, cpu)
        a_w = model.concepts.text_scores(model.text_encoder.hidden(ids, mask), mask, Y)
        S_C = cr.concept_embedding(a_v, Y) @ cr.concept_embedding(a_w, Y).t()
    return {"argmax_images": int(a_v.argmax(1).unique().numel()),
            "argmax_captions": int(a_w.argmax(1).unique().numel()), "S_C_sd": float(S_C.std())}


def test_concept_branch_does_not_collapse_under_the_default_loss_and_does_without_query_norm(tiny):
    """Under the default loss a constant S_C is a stationary point (test above). With plain queries every
    image attends the same concept from the start and the branch stays there (measured: 1/12 images, S_C sd
    0.015); standardised queries keep several concepts in use (7/12, 11/12) and S_C spread."""
    fixed, plain = concept_usage_after_training(tiny), concept_usage_after_training(tiny, "--no-query-norm")
    assert plain["argmax_images"] <= 2 and plain["S_C_sd"] < 0.05
    assert fixed["argmax_images"] >= 4 and fixed["argmax_captions"] >= 4 and fixed["S_C_sd"] > 0.15


def test_concept_losses_do_not_reach_the_instance_image_encoder(tiny):
    """Eq. 2's queries aggregate the raw regions o_l and the transformer's e_t through the concept branch's
    own aggregators, so L^C and L_PGC send no gradient into the instance image encoder (the text side
    shares the transformer)."""
    args, model, batch = fresh_model_and_batch(tiny, np.arange(0, 80, 5) + np.arange(16) % 5)
    _, terms, _ = step_loss(model, model, *batch, args)
    (terms["C"] + terms["PGC"]).backward()
    image_grad = sum(float(p.grad.abs().sum()) for p in model.image_encoder.parameters() if p.grad is not None)
    query_grad = sum(float(p.grad.abs().sum()) for p in model.concepts.query_v.parameters())
    assert query_grad > 0 and float(model.text_encoder.bert.encoder.layer[-1].output.dense.weight.grad.abs().sum()) > 0
    assert image_grad == 0
    assert model.concepts.query_v.fc.in_features == batch[0].shape[2]  # o_l, not the projected features
    assert model.concepts.query_w.in_features == model.text_encoder.bert.config.hidden_size  # e_t


def test_cli_trains_evaluates_resumes_and_reports_errors(tiny, capsys):
    rows = cr.main(tiny_args(tiny, "--epochs", "2"))  # 2 epochs: PGC gets K-means labels once
    (name, metrics), = rows
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "rsum",
                "encode_s", "sim_pairs_per_s", "pairs_per_s"):
        assert np.isfinite(metrics[key])
    last = load_checkpoint(tiny / "runs" / "last.pt")
    assert last["epoch"] == 2 and (last["pgc_labels"] >= 0).any()
    assert last["model_args"]["text_config"]["hidden_size"] == 32 and isinstance(last["args"], dict)

    again = cr.main(tiny_args(tiny, "--eval", str(tiny / "runs" / "best.pt")))
    assert again[0][1]["rsum"] == metrics["rsum"]
    # --beta at evaluation overrides the checkpoint's: 1 ranks by the instance score alone
    instance_only = cr.main(tiny_args(tiny, "--eval", str(tiny / "runs" / "best.pt"), "--beta", "1"))[0][1]
    ckpt = load_checkpoint(tiny / "runs" / "best.pt")
    tokenizer, _ = cr.load_text_model(ckpt["text_encoder"])
    feats, tokens, _ = cr.load_retrieval_split(tiny / "toy", "test", tokenizer, ckpt["args"]["max_len"])
    emb, _ = cr.encode_split(cr.model_from_checkpoint(ckpt), feats, tokens, tokenizer.pad_token_id, torch.device("cpu"))
    assert instance_only["rsum"] == cr.recall_at_k(emb["v_I"] @ emb["w_I"].t())["rsum"]
    capsys.readouterr()
    cr.main(tiny_args(tiny, "--epochs", "3", "--resume"))
    out = capsys.readouterr().out
    assert "epoch 3:" in out and "epoch 1:" not in out and "epoch 2:" not in out
    assert load_checkpoint(tiny / "runs" / "last.pt")["epoch"] == 3

    make_toy_world(tiny / "other", n_train=10, n_dev=5, n_test=5, regions=4, dim=8)
    with pytest.raises(DataError, match="16-d region features"):
        cr.main(tiny_args(tiny, "--data-root", str(tiny / "other"), "--eval", str(tiny / "runs" / "best.pt")))
    (tiny / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(DataError):
        cr.main(tiny_args(tiny, "--eval", str(tiny / "junk.pt")))
    with pytest.raises(DataError, match="text encoder"):
        cr.main(tiny_args(tiny, "--text-encoder", str(tiny / "missing")))


def test_the_lr_drops_tenfold_from_the_epoch_lr_update_on(tiny, monkeypatch):
    lrs, original = [], cr.train_step
    def watched(model, net, optimizer, *rest):
        lrs.append([group["lr"] for group in optimizer.param_groups])
        return original(model, net, optimizer, *rest)
    monkeypatch.setattr(cr, "train_step", watched)
    cr.train(cr.parse_args(tiny_args(tiny, "--epochs", "3", "--lr-update", "1", "--lr", "1e-3", "--no-concepts",
                                     "--no-bank", "--out-dir", str(tiny / "lr-drop"))), tiny / "toy")
    assert len(lrs) == 3 * 18  # 300 pairs, 16 a step
    assert np.allclose(lrs[:18], [[1e-3, 1e-4]] * 18, rtol=1e-9, atol=0)  # the text encoder at --text-lr-scale 0.1
    assert np.allclose(lrs[18:], [[1e-4, 1e-5]] * 36, rtol=1e-9, atol=0)  # epochs 2 and 3 (indices 1, 2)


def test_lr_drops_at_half_the_epochs_on_real_data_and_not_on_the_toy_world():
    """The paper: 2e-4 for 15 epochs, 2e-5 for the next 15; the 2 toy epochs keep 2e-4 throughout."""
    assert cr.parse_args(["--dataset", "flickr30k"]).lr_update == 15
    assert cr.parse_args(["--dataset", "coco", "--epochs", "9"]).lr_update == 4
    assert cr.parse_args([]).lr_update == cr.parse_args([]).epochs == 2
    assert cr.parse_args(["--epochs", "6"]).lr_update == 6
    assert cr.parse_args(["--epochs", "6", "--lr-update", "3"]).lr_update == 3


# --- The paper's configuration on real data (Sec. 4.2), the departures each run prints ---

def test_real_datasets_resolve_to_the_papers_configuration_and_the_toy_world_to_minilm():
    """Sec. 4.2, by hand: BERT-base, F = 1024, g = 400, banks of 4096, m = 0.995, K = 10000 / 20000, mu = 0.1,
    gamma = 0.3, Adam at 2e-4 for 15 epochs then 2e-5 for 15, batch 128, lambda = 3, beta = 0.9."""
    paper = dict(text_encoder="bert-base-uncased", embed_size=1024, n_concepts=400, bank_size=4096, momentum=0.995,
                 mu=0.1, gamma=0.3, lr=2e-4, lr_update=15, epochs=30, batch_size=128, lambda_inst=3.0, beta=0.9,
                 glove=None, freeze_text_layers=0)
    for dataset, k in (("flickr30k", 10000), ("coco", 20000)):
        args = vars(cr.parse_args(["--dataset", dataset]))
        assert {key: args[key] for key in paper} == paper and args["n_prototypes"] == k
    assert cr.parse_args([]).text_encoder == cr.MINILM and os.path.isdir(cr.MINILM)  # offline, in requirements.txt


def test_each_departure_is_printed_and_the_papers_flags_remove_it(tiny, monkeypatch, capsys):
    lines = cr.departures(cr.parse_args([]))
    for fragment in ("toy world: embed_size 256, epochs 2", "text_encoder all-MiniLM-L6-v2", "--glove glove.6B.300d.txt",
                     "--dcl-positive printed", "--no-query-norm", "--text-lr-scale 1", "--grad-clip 0"):
        assert sum(fragment in line for line in lines) == 1, (fragment, lines)
    paper = ["--dataset", "flickr30k", "--glove", "g.txt", "--dcl-positive", "printed", "--no-query-norm",
             "--text-lr-scale", "1", "--grad-clip", "0"]
    assert cr.departures(cr.parse_args(paper)) == []
    assert len(cr.departures(cr.parse_args(paper[:-2]))) == 1  # each flag removes its own line only

    class Stop(Exception):
        pass
    monkeypatch.setattr(cr, "train", lambda *args: (_ for _ in ()).throw(Stop()))
    with pytest.raises(Stop):
        cr.main(tiny_args(tiny, "--out-dir", str(tiny / "departures")))
    out = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(out) if line.startswith("CODER on toy"))
    assert out[at + 1:at + 8] == cr.departures(cr.parse_args(tiny_args(tiny)))


def test_glove_text_file_gives_the_concepts_their_vectors_in_frequency_order(tiny, tmp_path):
    """The most frequent content words of the training captions that the GloVe file knows, each with its own row;
    a multi-word token (glove.840B has a few) and unknown words are passed over."""
    args = cr.parse_args(tiny_args(tiny, "--n-concepts", "5"))
    tokenizer, text_model = cr.load_text_model(args.text_encoder)
    _, _, caps = cr.load_retrieval_split(tiny / "toy", "train", tokenizer, args.max_len)
    counts = {}
    for caption in caps:
        for w in tokenize(caption):
            if w not in cr.STOP_WORDS and len(w) > 1:
                counts[w] = counts.get(w, 0) + 1
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    known = ranked[1:9:2] + ranked[10:14]  # the most frequent word is not in the file
    rng = np.random.default_rng(0)
    rows = {w: rng.normal(size=6).astype(np.float32) for w in known}
    lines = ["zzz " + " ".join(["0.5"] * 6), f"{ranked[0]} {ranked[2]} " + " ".join(["1"] * 6)]  # a 2-word token
    lines += [w + " " + " ".join(f"{x:.6f}" for x in v) for w, v in rows.items()]
    (tmp_path / "glove.txt").write_text("\n".join(lines) + "\n")
    args.glove = str(tmp_path / "glove.txt")
    model, model_args, concepts = cr.build_model(args, 16, text_model, tokenizer, caps)
    assert concepts == known[:5] and model_args["concept_dim"] == 6
    assert np.allclose(model.concepts.X.numpy(), np.stack([rows[w] for w in known[:5]]), atol=1e-6)
    for text, message in (("a b c\nnot numbers here\n", "line 1 is not a word and 2 finite numbers"),
                          (f"{known[0]} 1 nan\n", "is not a word and 2 finite numbers"), ("", "holds no vector")):
        (tmp_path / "bad.txt").write_text(text.replace("a b c", f"{known[0]} 1 2").replace("not", known[1]))
        with pytest.raises(DataError, match=message.replace("line 1", "line 2")):
            cr.read_glove(tmp_path / "bad.txt", set(known))


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}], ids=["offline", "no hub"])
def test_a_hub_name_not_cached_and_unreachable_ends_fast_in_one_line(tiny, tmp_path, env, expect_one_error_line):
    root = tmp_path / "f30k"
    make_toy_world(root, n_train=10, n_dev=5, n_test=5, regions=4, dim=8)
    env = dict(os.environ, HF_HOME=str(tmp_path / "empty-cache"), **env)
    env.pop("HF_HUB_OFFLINE", None) if "HF_ENDPOINT" in env else None
    started = time.perf_counter()
    expect_one_error_line([sys.executable, cr.__file__, "--dataset", "flickr30k", "--data-root", root, "--out-dir",
                           tmp_path / "runs"], "pass --text-encoder FOLDER", env=env)
    assert time.perf_counter() - started < 60


def test_broken_text_encoders_are_one_line_errors(tiny, tmp_path):
    for name in ("truncated", "no-pad"):
        shutil.copytree(tiny / "bert", tmp_path / name)
    weights = tmp_path / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    config = json.loads((tmp_path / "no-pad" / "tokenizer_config.json").read_text())
    (tmp_path / "no-pad" / "tokenizer_config.json").write_text(json.dumps(dict(config, pad_token=None)))
    with pytest.raises(DataError, match="cannot load text encoder .*truncated.* pass --text-encoder"):
        cr.load_text_model(str(tmp_path / "truncated"))
    with pytest.raises(DataError, match="has no pad token"):
        cr.load_text_model(str(tmp_path / "no-pad"))
    for name in ("/bert", "~/model", "./bert", "a/b/c"):  # a folder that is not here
        with pytest.raises(DataError, match=f"^text encoder folder {re.escape(name)} not found"):
            cr.load_text_model(name)
    for name in ("my model", "a--b", "x" * 200):  # not a hub name either: one line, whether the hub answers or not
        with pytest.raises(DataError, match=f"^(cannot load )?text encoder '{re.escape(name)}' "):
            cr.load_text_model(name)


def test_training_steps_under_bf16_autocast_keep_finite_losses_and_float32_state(tiny, monkeypatch):
    """The dtypes a CUDA run sees, on the CPU: bf16 activations, float32 weights, queues and checkpoints, a float16
    PGC store."""
    seen, original = [], cr.coder_loss
    def watched(v_I, *rest):
        seen.append(v_I.dtype)
        return original(v_I, *rest)
    monkeypatch.setattr(cr, "coder_loss", watched)
    monkeypatch.setattr(cr, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    out = tiny / "bf16"
    cr.train(cr.parse_args(tiny_args(tiny, "--epochs", "2", "--out-dir", str(out))), tiny / "toy")
    assert seen and set(seen) == {torch.bfloat16}
    last = load_checkpoint(out / "last.pt")
    assert all(v.dtype == torch.float32 for v in last["model"].values() if v.is_floating_point())
    assert last["model"]["text_queue.feats"].abs().sum() > 0 and last["pgc_store"].dtype == torch.float16
    assert (last["pgc_labels"] >= 0).any() and all(np.isfinite(v) for v in [last["best_rsum"]])
    states = [s for group in last["optimizer"]["state"].values() for s in group.values() if torch.is_tensor(s)]
    assert all(s.dtype == torch.float32 for s in states if s.is_floating_point())


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], r"^--batch-size must be at least 2, got 0$"),
    (["--bank-size", "8"], r"^--bank-size 8 is smaller than the global batch of 16 pairs \(--batch-size x processes\); "
                           r"a memory bank must hold at least one batch \(or pass --no-bank\)$"),
    (["--out-dir", "{file}/runs"], r"^cannot write checkpoints to .*file/runs \(Not a directory\); pass --out-dir "
                                   r"with a writable folder$"),
], ids=["batch-size 0", "bank smaller than batch", "unwritable out-dir"])
def test_nonsense_arguments_are_one_line_errors(tiny, tmp_path, flags, message):
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match=message):
        cr.main(tiny_args(tiny, *[flag.format(file=tmp_path / "file") for flag in flags]))


def with_nonfinite(tiny, root, split, image):
    shutil.copytree(tiny / "toy", root)
    features = np.load(root / f"{split}_ims.npy")
    features[image, 1, 2] = np.nan
    np.save(root / f"{split}_ims.npy", features)
    return root


def test_nan_image_stops_training_before_any_checkpoint_and_evaluation_refuses(tiny, tmp_path):
    runs = tmp_path / "runs"
    nan_train = with_nonfinite(tiny, tmp_path / "nan-train", "train", 5)
    with pytest.raises(DataError, match=r"^train images 5 hold NaN or inf region features \(1 of 60\); repair "
                                        r"train_ims\.npy or pass --skip-nonfinite$"):
        cr.main(tiny_args(tiny, "--data-root", str(nan_train), "--epochs", "1", "--out-dir", str(runs)))
    assert not list(runs.glob("*.pt"))
    cr.main(tiny_args(tiny, "--data-root", str(nan_train), "--epochs", "1", "--out-dir", str(runs), "--skip-nonfinite"))
    nan_test = with_nonfinite(tiny, tmp_path / "nan-test", "test", 3)
    with pytest.raises(DataError, match=r"^test images 3 hold NaN or inf region features \(1 of 20\); repair "
                                        r"test_ims\.npy$"):
        cr.main(tiny_args(tiny, "--data-root", str(nan_test), "--eval", str(runs / "best.pt")))


def test_nonfinite_loss_stops_with_its_step_and_terms_and_leaves_last_pt_from_before(tiny, tmp_path, monkeypatch):
    coder_loss, calls = cr.coder_loss, []

    def nan_at_step_6(*args):
        loss, terms = coder_loss(*args)
        calls.append(1)
        if len(calls) == 6:
            terms["I"] = terms["I"] * math.nan
            loss = sum(terms.values())
        return loss, terms

    monkeypatch.setattr(cr, "coder_loss", nan_at_step_6)
    runs = tmp_path / "runs"
    with pytest.raises(DataError, match=r"^the loss became non-finite at step 6 \(M-DCL [\d.]+, I nan, C [\d.]+, "
                                        r"PGC 0\); stopped, .*last\.pt keeps step 4; try a lower --lr"):
        cr.main(tiny_args(tiny, "--epochs", "1", "--save-every", "4", "--out-dir", str(runs)))
    last = load_checkpoint(runs / "last.pt")
    assert last["step"] == 4 and all(torch.isfinite(v.float()).all() for v in last["model"].values())


def dropout_bert(tiny, tmp_path):
    """The tiny text encoder with dropout on, so that the RNG stream decides what training computes."""
    from transformers import AutoTokenizer, BertModel
    BertModel.from_pretrained(tiny / "bert", hidden_dropout_prob=0.1).save_pretrained(tmp_path / "bert")
    AutoTokenizer.from_pretrained(tiny / "bert").save_pretrained(tmp_path / "bert")
    return str(tmp_path / "bert")


def test_one_seed_pairs_the_ablations_whatever_branches_the_flags_build(tiny, tmp_path):
    """PGC has no labels before its first clustering, so in epoch 0 it adds nothing but its prototype
    layer, whose random initialisation must not shift the dropout masks of the text encoder: --no-pgc
    and the default then train the same weights, bit for bit (the encoder here has dropout)."""
    argv = tiny_args(tiny, "--text-encoder", dropout_bert(tiny, tmp_path), "--epochs", "1", "--save-every", "0")
    cr.main(argv + ["--out-dir", str(tmp_path / "pgc")])
    cr.main(argv + ["--out-dir", str(tmp_path / "no-pgc"), "--no-pgc"])
    a, b = (load_checkpoint(tmp_path / name / "last.pt")["model"] for name in ("pgc", "no-pgc"))
    assert "prototypes.weight" in a and "prototypes.weight" not in b
    for key, value in b.items():
        assert torch.equal(a[key], value), key


def test_kill_9_at_a_random_step_then_resume_gives_the_same_weights_queues_and_rsum(tiny, tmp_path, run_killed):
    """Mid-epoch checkpoints hold the queues, momentum encoders, PGC store and labels and every RNG;
    the text encoder here has dropout, so the restored RNG states matter."""
    argv = tiny_args(tiny, "--text-encoder", dropout_bert(tiny, tmp_path), "--epochs", "2", "--save-every", "4")
    straight = cr.main(argv + ["--out-dir", str(tmp_path / "straight")])
    killed = tmp_path / "killed"
    steps_per_epoch = 300 // 16

    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # the same thread count: the same sums
    target, saved, _ = run_killed([sys.executable, Path(cr.__file__), *argv, "--out-dir", killed], killed / "last.pt",
                               lambda ckpt: ckpt["step"], range(1, 24), env)
    print(f"coder: killed after last.pt reached step {target}; it held step {saved} of {2 * steps_per_epoch}")
    resumed = cr.main(argv + ["--out-dir", str(killed), "--resume"])
    print(f"coder: test rsum {resumed[0][1]['rsum']!r} after the kill and resume, {straight[0][1]['rsum']!r} uninterrupted")
    assert resumed[0][1]["rsum"] == straight[0][1]["rsum"]
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(killed / "last.pt")
    assert torch.equal(a["pgc_labels"], b["pgc_labels"]) and torch.equal(a["pgc_store"], b["pgc_store"])
    for key, value in a["model"].items():  # weights, momentum encoders, both queues and their pointers
        assert torch.equal(b["model"][key], value), key


def test_a_kill_between_the_epoch_end_saves_leaves_a_run_that_resumes_to_the_same_table(tiny, tmp_path, monkeypatch):
    """At the end of an epoch best.pt and last.pt are written one after the other; last.pt records the
    new best dev rsum, so it must come second: a kill after the first save then resumes from the older
    last.pt and writes best.pt again (in the other order the resumed run found no best.pt to test)."""
    argv = tiny_args(tiny, "--epochs", "1", "--save-every", "4")
    straight = cr.main(argv + ["--out-dir", str(tmp_path / "straight")])

    class Killed(Exception):
        pass

    real_save = cr.save_checkpoint

    def save_then_die_at_the_epoch_end(obj, path):
        real_save(obj, path)
        if "pgc_store" not in obj:  # best.pt, the first file written at the end of the epoch
            raise Killed

    monkeypatch.setattr(cr, "save_checkpoint", save_then_die_at_the_epoch_end)
    with pytest.raises(Killed):
        cr.main(argv + ["--out-dir", str(tmp_path / "killed")])
    monkeypatch.setattr(cr, "save_checkpoint", real_save)
    resumed = cr.main(argv + ["--out-dir", str(tmp_path / "killed"), "--resume"])
    assert resumed[0][1]["rsum"] == straight[0][1]["rsum"]


# --- Hardening: whatever a user or a file gets wrong ends in one line, never a traceback or a wrong table ---

@pytest.mark.parametrize("flag, refused, accepted", [  # each numeric flag at the edge of what can work, by hand
    ("--embed-size", 1, 2), ("--batch-size", 1, 2), ("--max-len", 2, 3), ("--epochs", 0, 1), ("--lr-update", -1, 0),
    ("--val-images", 0, 1), ("--save-every", -1, 0), ("--kmeans-iters", -1, 0),
    ("--freeze-text-layers", -1, 0), ("--threads", -1, 0), ("--seed", -1, 0), ("--n-concepts", 0, 1),
    ("--n-prototypes", 0, 1), ("--lr", 1.01, 1.0), ("--lr", 0.0, 1e-9), ("--mu", 0.0, 1e-9), ("--eps", 0.0, 1e-9),
    ("--grad-clip", -0.01, 0.0), ("--concept-lambda", 0.0, 1e-9), ("--gamma", -0.01, 0.0), ("--margin", -0.01, 0.0),
    ("--lambda-inst", -0.01, 0.0), ("--text-lr-scale", -0.01, 0.0), ("--momentum", 1.01, 1.0), ("--beta", -0.01, 0.0),
    ("--beta", 1.01, 1.0), ("--bank-size", 1023, 1024)])
def test_each_bound_refuses_the_first_value_outside_and_takes_the_last_inside(flag, refused, accepted):
    fixed = ["--batch-size", "1024"] if flag == "--bank-size" else []  # a bank holds at least one global batch
    with pytest.raises(DataError, match=f"^{flag} "):
        cr.parse_args(fixed + [flag, str(refused)])
    assert getattr(cr.parse_args(fixed + [flag, str(accepted)]), flag[2:].replace("-", "_")) == accepted


def test_nonsense_values_are_one_line_errors(tiny, tmp_path, expect_one_error_line):
    refused_in_one_line(cr.main, Path(cr.__file__), [(tiny_args(tiny, *flags, "--out-dir", tmp_path / str(i)), message)
                                                      for i, (flags, message) in enumerate([
        (["--grad-clip", "-1"], "--grad-clip must be at least 0 and finite, got -1"),  # it reversed the gradients
        (["--text-lr-scale", "-5"], "--text-lr-scale must be at least 0 and finite, got -5"),
        (["--lr", "nan"], "--lr must be positive, at most 1 and finite, got nan"),
        (["--momentum", "nan"], "--momentum must be at least 0, at most 1 and finite, got nan"),
        (["--seed", "-1"], "--seed must be at least 0, got -1"),
        (["--seed", "1" + "0" * 400], "--seed must be at most 4294967295, got 1000"),  # too large for a float
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--bank-size", "1000000000"], "memory banks of 1000000000 and 4 PGC prototypes would need"),
        (["--n-prototypes", "1000000000"], "memory banks of 40 and 1000000000 PGC prototypes would need"),
        (["--max-len", "600"], "--max-len 600 is more than the text encoder's 64 positions"),
        (["--freeze-text-layers", "3"], "--freeze-text-layers 3 is more than the text encoder's 2 layers"),
        (["--batch-size", "1000", "--no-bank"], "--batch-size 1000 x 1 process(es) is more than the 300 training pairs"),
        (["--loss", "infonce"], "argument --loss: invalid choice: 'infonce'")])], expect_one_error_line)


def test_damaged_data_is_a_one_line_error(tiny, tmp_path, expect_one_error_line):
    coder_run = tiny_args(tiny)
    huge = lambda path: np.save(path, np.load(path).astype(np.float64) * np.where(np.arange(60) == 2, 1e300, 1)[:, None, None])
    refused_in_one_line(cr.main, Path(cr.__file__), [
        (coder_run + ["--out-dir", tmp_path / "run1", "--data-root", damaged(tiny / "toy", tmp_path / "dim", "test", lambda p: np.save(p, np.load(p)[..., :8]))],
         "test region features are 8-dimensional, train's 16"),
        (coder_run + ["--out-dir", tmp_path / "run3", "--data-root", damaged(tiny / "toy", tmp_path / "dev", "dev", lambda p: np.save(p, np.load(p)[..., :8]))],
         "dev region features are 8-dimensional, train's 16"),
        (coder_run + ["--out-dir", tmp_path / "run0", "--data-root", damaged(tiny / "toy", tmp_path / "float64", "train", huge)],
         "train images 2 hold NaN or inf region features in float32 (1 of 60)"),  # finite in float64, inf in float32
        (coder_run + ["--out-dir", tmp_path / "run2", "--data-root", damaged(tiny / "toy", tmp_path / "none", "train", lambda p: np.save(p, np.zeros((0, 4, 16))))],
         "got float64 (0, 4, 16)"),
        (coder_run + ["--out-dir", tmp_path / "run5", "--data-root", damaged(tiny / "toy", tmp_path / "npz", "train", lambda p: (np.savez(p, np.load(p)), os.replace(f"{p}.npz", p)))],
         "train_ims.npy is an .npz archive, not one .npy array")], expect_one_error_line)
    broken = shutil.copytree(tiny / "toy", tmp_path / "scenes")
    (broken / "test_scenes.json").write_text('[{"objects": []}]')
    assert cr.toy_ceiling(broken, "test") is None  # a malformed scenes file: no ceiling line, no traceback


def test_hostile_or_foreign_checkpoints_are_refused_on_every_loading_path(tiny, tmp_path, expect_one_error_line):
    marker, hostile, resumed = tmp_path / "ran", tmp_path / "hostile.pt", tmp_path / "resumed"
    torch.save({"model": Hostile(marker)}, hostile)
    resumed.mkdir()
    shutil.copy(hostile, resumed / "last.pt")
    for name, obj in {"dict": {"foo": 1}, "tensor": torch.ones(3), "list": [1, 2]}.items():
        torch.save(obj, tmp_path / f"{name}.pt")
    coder_run = tiny_args(tiny, "--epochs", "1")
    unsafe = "is not a checkpoint this script can read safely (UnpicklingError)"
    refused_in_one_line(cr.main, Path(cr.__file__), [
        (coder_run + ["--eval", hostile], unsafe), (coder_run + ["--out-dir", resumed, "--resume"], unsafe),
        *[(coder_run + ["--eval", tmp_path / f"{name}.pt"], "is not a checkpoint written by coder_retrieval.py")
          for name in ("dict", "tensor", "list")]], expect_one_error_line)
    assert not marker.exists()  # nothing the files named was run


def test_resume_and_eval_refuse_another_world_model_size_or_damaged_values(tiny, tmp_path, expect_one_error_line):
    argv = tiny_args(tiny, "--epochs", "1", "--out-dir", str(tmp_path / "run"))
    cr.main(argv)
    nan, beta = load_checkpoint(tmp_path / "run" / "best.pt"), load_checkpoint(tmp_path / "run" / "best.pt")
    nan["model"]["image_encoder.fc.weight"][0, 0] = math.nan
    beta["args"]["beta"] = math.nan
    torch.save(nan, tmp_path / "nan.pt")
    torch.save(beta, tmp_path / "beta.pt")
    make_toy_world(tmp_path / "other", n_train=40, n_dev=20, n_test=20, regions=4, dim=16)
    refused_in_one_line(cr.main, Path(cr.__file__), [
        ([*argv, "--eval", tmp_path / "beta.pt"], "beta.pt is not a checkpoint written by coder_retrieval.py"),
        ([*argv, "--epochs", "2", "--resume", "--data-root", tmp_path / "other"], "train_caps.txt was "),
        ([*argv, "--epochs", "2", "--resume", "--embed-size", "64"], "last.pt is another run: embed_size was 32, now 64"),
        ([*argv, "--eval", tmp_path / "nan.pt"], "the checkpoint holds NaN or inf weights")],
        expect_one_error_line)


def test_a_nan_similarity_is_a_miss_not_a_hit():
    S = torch.eye(2).repeat_interleave(5, 1)  # image i's own captions score 1, the others 0: all hits
    S[1] = math.nan  # image 1's embedding went NaN
    r = cr.recall_at_k(S)
    assert r["i2t_r1"] == 50.0  # image 1 misses; image 0 still finds its captions
    assert r["t2i_r1"] == 0.0  # every caption misses: a NaN score counts against the query, as a tie does


def test_ctrl_c_saves_last_pt_prints_the_resume_command_and_exits_130(tiny, tmp_path):
    code, out, err = interrupt_after_first_save([sys.executable, Path(cr.__file__), *tiny_args(
        tiny, "--epochs", "50", "--save-every", "2", "--out-dir", str(tmp_path / "run"))], tmp_path / "run" / "last.pt")
    assert code == 130 and "Traceback" not in err and "continue with the same command plus --resume" in out, err[-2000:]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] >= 2


# --- Several processes (torchrun / DDP, gloo on the CPU) ---

GLOBAL_BATCH = np.arange(0, 80, 5) + np.arange(16) % 5  # 16 captions of 16 different images


def fresh_model_and_batch(tiny, idx, *flags):
    args = cr.parse_args(tiny_args(tiny, *flags))
    tokenizer, text_model = cr.load_text_model(args.text_encoder)
    feats, tokens, caps = cr.load_retrieval_split(tiny / "toy", "train", tokenizer, args.max_len)
    torch.manual_seed(0)
    model, _, _ = cr.build_model(args, feats.shape[2], text_model, tokenizer, caps)
    regions = cr.image_batch(feats, idx // 5, "cpu")
    ids, mask = cr.text_batch(tokens, idx, tokenizer.pad_token_id, torch.device("cpu"))
    return args, model, (regions, ids, mask, torch.from_numpy(idx // 5), torch.from_numpy(idx % 4))


def coder_gradient_rank(rank, tiny, out):
    args, model, batch = fresh_model_and_batch(tiny, GLOBAL_BATCH[8 * rank:8 * (rank + 1)])
    ddp = cr.wrap_ddp(model, torch.device("cpu"))  # kept referenced until backward: its reducer all-reduces
    loss, terms, _ = step_loss(ddp, model, *batch, args)
    loss.backward()
    assert set(terms) == {"I", "M-DCL", "C", "PGC"}
    torch.save({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, out / f"grad{rank}.pt")


def test_two_rank_gradient_is_the_mean_of_the_per_rank_losses_gradients(run_ranks, tiny, tmp_path):
    """In-batch negatives and diversity (Eq. 3, normalised by the batch maximum) are per rank, so a
    2-rank step with batch B is not a 1-process step with 2B; what must hold is that it is the mean of
    the gradients of the two ranks' losses, each computed as one process would (here on an empty bank)."""
    run_ranks(coder_gradient_rank, tiny, tmp_path)
    ddp = [torch.load(tmp_path / f"grad{r}.pt") for r in range(2)]
    halves = []
    for rank in range(2):
        args, model, batch = fresh_model_and_batch(tiny, GLOBAL_BATCH[8 * rank:8 * (rank + 1)])
        step_loss(model, model, *batch, args)[0].backward()
        halves.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert set(ddp[0]) == set(halves[0]) and all(g is not None for g in ddp[0].values())
    for name in halves[0]:
        assert torch.equal(ddp[0][name], ddp[1][name]), name
        assert torch.allclose(ddp[0][name], (halves[0][name] + halves[1][name]) / 2, atol=1e-5, rtol=1e-4), name
    _, model, batch = fresh_model_and_batch(tiny, GLOBAL_BATCH)  # and the full batch is indeed different
    args = cr.parse_args(tiny_args(tiny))
    step_loss(model, model, *batch, args)[0].backward()
    assert not torch.allclose(model.image_encoder.fc.weight.grad, ddp[0]["image_encoder.fc.weight"], atol=1e-5)


def coder_train_rank(rank, argv, out):
    model, labels, _ = cr.train(cr.parse_args(argv), Path(argv[1]))
    torch.save({"state": model.state_dict(), "labels": labels}, Path(out) / f"rank{rank}.pt")


def test_two_rank_training_keeps_models_queues_and_prototype_labels_identical(run_ranks, tiny, tmp_path):
    argv = tiny_args(tiny, "--epochs", "2", "--out-dir", str(tmp_path / "runs"), "--batch-size", "8")
    run_ranks(coder_train_rank, argv, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, value in ranks[0]["state"].items():  # weights, momentum copies, both queues and pointers
        if "running_" not in name:  # BatchNorm's statistics: each rank's own batches; rank 0's are saved and evaluated
            assert torch.equal(ranks[1]["state"][name], value), name
    assert torch.equal(ranks[0]["labels"], ranks[1]["labels"]) and (ranks[0]["labels"] >= 0).all()
    # 300 pairs / 16 a step = 18 steps of 16 keys per epoch: 40 slots all filled, pointer at 36 * 16 % 40
    state = ranks[0]["state"]
    assert (state["text_queue.ids"] >= 0).all() and int(state["text_queue.ptr"]) == 36 * 16 % 40
    last = load_checkpoint(tmp_path / "runs" / "last.pt")
    assert last["epoch"] == 2
    trained = {int(i) for epoch in range(2) for i in np.random.default_rng([0, epoch]).permutation(300)[:18 * 16]}
    assert int(last["pgc_seen"].sum()) == len(trained)  # rank 0's PGC store holds both ranks' pairs


def test_torchrun_trains_evaluates_and_resumes_with_two_processes(tiny, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(Path(cr.__file__))] + tiny_args(tiny, "--out-dir", str(tmp_path / "runs"))
    first = subprocess.run(torchrun + ["--epochs", "1"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    out = first.stdout
    assert "CODER on toy, 2 process(es)" in out and out.count("epoch 1:") == 1 and out.count("\ntest ") == 1  # rank 0 alone
    again = subprocess.run(torchrun + ["--epochs", "2", "--resume"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "epoch 2:" in again.stdout and "epoch 1:" not in again.stdout
    assert load_checkpoint(tmp_path / "runs" / "last.pt")["epoch"] == 2


# --- CUDA: the path every real run takes (bf16 autocast, pinned memory); skipped without a GPU ---
# python -m pytest -q -s -k cuda     (prints steps/s and peak memory)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def real_shape_training(device, n_images=1000):
    """The paper's Flickr30K configuration at its real shapes: 36 x 2048 regions, a BERT-base-sized text model (random
    weights, the offline MiniLM's uncased vocabulary: no download), F = 1024, g = 400 concepts, banks of 4096,
    K = 10000 prototypes with labels, batch 128."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    args = cr.parse_args(["--dataset", "flickr30k"])
    tokenizer = AutoTokenizer.from_pretrained(cr.MINILM, local_files_only=True)
    torch.manual_seed(0)
    text_model = BertModel(BertConfig(vocab_size=len(tokenizer)))  # 12 layers, 768-d
    rng = np.random.default_rng(0)
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 3][:3000]
    captions = [" ".join(rng.choice(words, 12)) for _ in range(cr.CAPS_PER_IMAGE * n_images)]
    model = cr.build_model(args, 2048, text_model, tokenizer, captions)[0].to(device).train()
    optimizer, pgc = cr.make_optimizer(model, args), cr.OnlineClustering(len(captions), args.embed_size, device)
    pgc.labels.random_(0, args.n_prototypes)
    features = rng.standard_normal((n_images, 36, 2048), dtype=np.float32)
    tokens = tokenizer(captions, truncation=True, max_length=args.max_len, padding="max_length", return_tensors="np")
    return args, model, optimizer, pgc, features, tokens["input_ids"].astype(np.int32), tokenizer.pad_token_id


@cuda
def test_cuda_real_shape_steps_in_bf16_with_pinned_batches():
    device = torch.device("cuda")
    args, model, optimizer, pgc, features, tokens, pad_id = real_shape_training(device)
    rng, times = np.random.default_rng(1), []
    torch.cuda.reset_peak_memory_stats()
    for step in range(40):
        idx = rng.choice(len(tokens), args.batch_size, replace=False)
        start = time.perf_counter()
        regions = cr.image_batch(features, idx // cr.CAPS_PER_IMAGE, device)  # through pinned memory
        ids, mask = cr.text_batch(tokens, idx, pad_id, device)
        terms = cr.train_step(model, model, optimizer, pgc, regions, ids, mask, torch.from_numpy(idx).to(device), args)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        assert all(torch.isfinite(v).item() for v in terms.values()), (step, terms)
    assert set(terms) == {"I", "M-DCL", "C", "PGC"} and model.text_queue.feats.dtype == torch.float32
    assert (model.image_queue.ids >= 0).all()  # 40 x 128 keys filled the 4096 slots
    print(f"\nCODER real-shape step (Flickr30K config, BERT-base size, batch {args.batch_size}, bf16): "
          f"{1 / np.median(times[5:]):.2f} steps/s, peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


@cuda
def test_cuda_default_toy_run(tmp_path):
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    (name, metrics), = cr.main(["--out-dir", str(tmp_path / "coder")])
    assert name == "test" and metrics["rsum"] > 400  # CPU, fp32: 464.0 (README)
    print(f"\nCODER default toy run on CUDA: test rsum {metrics['rsum']:.1f}, {time.perf_counter() - start:.0f} s, "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


# --- issue 27: a run is one thing

@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    """An uninterrupted 2-epoch run (18 steps an epoch, last.pt every 4) whose text encoder has dropout: its argv
    folder and text encoder; a run resumed after any interrupt must end with the same last.pt."""
    bert = dropout_bert(tiny, tmp_path_factory.mktemp("dropout"))
    argv, out = tiny_args(tiny, "--text-encoder", bert, "--epochs", "2", "--save-every", "4"), tmp_path_factory.mktemp("run")
    cr.train(cr.parse_args(argv + ["--out-dir", str(out)]), tiny / "toy")
    return argv, out, Path(bert)


def leaves(x):
    """Every key and value of a nested checkpoint, in order."""
    if isinstance(x, dict):
        return [y for key, value in x.items() for y in [key, *leaves(value)]]
    return [y for value in x for y in leaves(value)] if isinstance(x, (list, tuple)) else [x]


def assert_same_last_pt(a, b):
    a, b = load_checkpoint(a), load_checkpoint(b)
    a.pop("args"), b.pop("args")  # --out-dir and --resume differ; every flag that matters is in the fingerprint
    leaves_a, leaves_b = leaves(a), leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        assert (torch.equal(x, y) if torch.is_tensor(x) else x == y), (x, y)


@pytest.mark.parametrize("signum, moment, step", [
    (signal.SIGINT, "step", 22),  # in epoch 2: the PGC labels are in use
    (signal.SIGTERM, "step", 18),  # the last step of epoch 1: the resumed run trains no step before the epoch end
    (signal.SIGHUP, "validation", 18),  # the end of an epoch is one unit: dev rsum, best.pt, last.pt, then the exit
    (signal.SIGINT, "save", 22),  # and a second signal, SIGTERM, while last.pt is written
], ids=["SIGINT mid-epoch", "SIGTERM at the epoch's last step", "SIGHUP in validation", "a second signal in the save"])
def test_a_signal_at_any_moment_saves_last_pt_and_the_resumed_run_ends_bit_identical(tiny, straight, tmp_path,
                                                                                    monkeypatch, capfd, signum, moment, step):
    argv, out = straight[0] + ["--out-dir", str(tmp_path / "run")], tmp_path / "run"
    send = lambda s: os.kill(os.getpid(), s)
    after_step, evaluate, save = cr.after_step, cr.evaluate, torch.save

    def signal_before_step(run, *rest):
        if moment != "validation" and run.step + 1 == step:
            send(signum)
        return after_step(run, *rest)

    def signal_in_validation(*args, **kwargs):
        if not (out / "best.pt").exists():
            send(signum)
        return evaluate(*args, **kwargs)

    def second_signal_in_save(*args, **kwargs):
        if cr.INTERRUPT["signal"]:
            send(signal.SIGTERM)
        return save(*args, **kwargs)

    monkeypatch.setattr(cr, "after_step", signal_before_step)
    monkeypatch.setattr(cr, "evaluate", signal_in_validation if moment == "validation" else evaluate)
    monkeypatch.setattr(torch, "save", second_signal_in_save if moment == "save" else save)
    with pytest.raises(SystemExit) as stopped:
        cr.train(cr.parse_args(argv), tiny / "toy")
    printed = capfd.readouterr()
    assert stopped.value.code == 128 + signum
    assert (f"interrupted by {signal.Signals(signum).name} at step {step}; {out / 'last.pt'} keeps step {step}; "
            f"continue with the same command plus --resume") in printed.out
    assert (f"still saving {out / 'last.pt'}; wait" in printed.err) == (moment == "save")
    last = load_checkpoint(out / "last.pt")
    best = load_checkpoint(out / "best.pt")["best_rsum"] if (out / "best.pt").exists() else -1.0
    assert last["step"] == step and last["best_rsum"] == best  # never a best rsum without its best.pt
    monkeypatch.undo()
    cr.train(cr.parse_args(argv + ["--resume"]), tiny / "toy")  # after step 18: an epoch end with no step trained
    assert_same_last_pt(straight[1] / "last.pt", out / "last.pt")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_the_imports_is_one_line_and_its_status(tmp_path, signum):
    """In the first second (Python importing torch) a signal ends the run with `interrupted` and 128 + the signal."""
    process = subprocess.Popen([sys.executable, cr.__file__, "--out-dir", str(tmp_path / "run")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,  # the default actions, even in a background suite:
                               preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in cr.SIGNALS])
    time.sleep(0.3)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert (process.returncode, err.strip()) == (128 + signum, "interrupted") and not (tmp_path / "run").exists()


@pytest.mark.parametrize("env, message", [
    ({"RANK": "1"}, "(RANK or LOCAL_RANK without WORLD_SIZE)"),  # it trained silently, saved nothing and exited 0
    ({"WORLD_SIZE": "2"}, "(WORLD_SIZE > 1 without RANK)"),  # env:// failed at once, reported as a 300 s wait
    ({"WORLD_SIZE": "2", "RANK": "0"}, "(WORLD_SIZE > 1 needs MASTER_ADDR and a numeric MASTER_PORT)"),
    ({"WORLD_SIZE": "abc"}, "(not a number: WORLD_SIZE='abc')"),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, "(not a number: RANK='-1')"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "1"}, "(RANK 2 is not below WORLD_SIZE 2)"),
])
def test_an_incomplete_torchrun_environment_is_one_line_before_anything_is_written(tiny, tmp_path, monkeypatch,
                                                                                  expect_one_error_line, env, message):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = tiny_args(tiny, "--out-dir", str(tmp_path / "run"))
    expected = f"incomplete torchrun environment {message}; start with torchrun, or unset RANK, LOCAL_RANK and WORLD_SIZE"
    with pytest.raises(DataError, match=re.escape(expected)):
        cr.main(argv)
    if env == {"RANK": "1"}:
        expect_one_error_line([sys.executable, cr.__file__, *argv], expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_peer_that_never_comes_ends_the_rendezvous_in_one_line(monkeypatch, rank):
    from conftest import _free_port
    monkeypatch.setattr(cr, "RENDEZVOUS_S", 1)
    for name, value in dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port()).items():
        monkeypatch.setenv(name, str(value))
    with pytest.raises(DataError, match=f"^rank {rank}: the other processes did not join within 1 s at 127.0.0.1:"):
        cr.setup_ddp()
    assert not torch.distributed.is_initialized()


def test_resume_refuses_another_run_in_one_line_before_anything_is_written(tiny, straight, tmp_path, expect_one_error_line):
    from transformers import BertConfig, BertModel, AutoTokenizer
    argv, out = straight[0] + ["--epochs", "3", "--resume"], tmp_path / "run"
    shutil.copytree(straight[1], out)
    bert = straight[2]
    BertModel(BertConfig.from_pretrained(bert, num_hidden_layers=3)).save_pretrained(tmp_path / "bert3")
    AutoTokenizer.from_pretrained(bert).save_pretrained(tmp_path / "bert3")
    make_toy_world(tmp_path / "same-size", seed=1, n_train=60, n_dev=20, n_test=20, regions=4, dim=16)
    before = (out / "last.pt").read_bytes()
    refused_in_one_line(cr.main, Path(cr.__file__), [(argv + ["--out-dir", out, *flags], f"{out / 'last.pt'} is another "
                                                      f"run: {change}") for flags, change in [
        (["--text-encoder", tmp_path / "bert3"], "text_config.num_hidden_layers was 2, now 3; resume with the same data, "
                                                 "flags and release, or pass another --out-dir"),
        (["--no-concepts"], "concepts was True, now False"),  # the banner said off, the concept losses trained
        (["--data-root", tmp_path / "same-size"], "train_caps.txt was "),  # another world of the same size
        (["--lr", "1e-3"], "lr was 0.0002, now 0.001"),
        (["--batch-size", "20"], "batch_size was 16, now 20")]], expect_one_error_line)
    assert (out / "last.pt").read_bytes() == before and not (out / "best.pt.tmp").exists()
    shutil.copytree(bert, tmp_path / "moved-bert")  # the same model in another folder: the same run
    cr.main(argv + ["--out-dir", str(out), "--text-encoder", str(tmp_path / "moved-bert")])
    assert load_checkpoint(out / "last.pt")["epoch"] == 3


def test_an_edited_last_pt_is_one_line(tiny, straight, tmp_path, expect_one_error_line):
    def first_moment(ckpt):
        ckpt["optimizer"]["state"][0]["exp_avg"] = torch.zeros(2)
    cases = []
    for i, (edit, message) in enumerate([
        (lambda c: c["model"].update({"image_encoder.fc.weight": torch.zeros(3, 3)}), "does not hold a CODER model"),
        (lambda c: c["model"].update({"extra": torch.zeros(1)}), "does not hold a CODER model"),
        (lambda c: c.update(rng=[]), "last.pt cannot be resumed (IndexError"),
        (first_moment, "last.pt cannot be resumed (ValueError: optimizer state for a (32, 16) parameter has another"),
        (lambda c: c.update(pgc_store=c["pgc_store"][:1]), "cannot be resumed (ValueError: pgc_store is (1, 32), not"),
        (lambda c: c.update(step=999), "cannot be resumed (ValueError: step 999 is not in epoch 3)"),
        (lambda c: c.pop("fingerprint"), "is not a last.pt written by coder_retrieval.py (an earlier release's cannot")]):
        ckpt = load_checkpoint(straight[1] / "last.pt")
        edit(ckpt)
        (tmp_path / str(i)).mkdir()
        torch.save(ckpt, tmp_path / str(i) / "last.pt")
        cases.append((straight[0] + ["--epochs", "3", "--resume", "--out-dir", tmp_path / str(i)], message))
    refused_in_one_line(cr.main, Path(cr.__file__), cases, expect_one_error_line)


def test_eval_honours_text_encoder_reads_only_and_refuses_another_tokenizer(tiny, straight, tmp_path,
                                                                            expect_one_error_line):
    from transformers import BertConfig, BertModel, BertTokenizerFast, AutoTokenizer
    argv, out = straight[0], straight[1]
    bert = straight[2]
    BertModel(BertConfig.from_pretrained(bert, num_hidden_layers=3)).save_pretrained(tmp_path / "bert3")
    AutoTokenizer.from_pretrained(bert).save_pretrained(tmp_path / "bert3")  # the same tokenizer, another transformer
    vocab = AutoTokenizer.from_pretrained(bert).get_vocab()
    BertTokenizerFast(vocab={("zebra" if i == len(vocab) - 1 else w): i for w, i in vocab.items()}).save_pretrained(
        tmp_path / "renamed")  # one word renamed
    BertModel.from_pretrained(bert).save_pretrained(tmp_path / "renamed")
    shutil.copytree(bert, tmp_path / "moved-bert")
    files = {path.name: path.read_bytes() for path in out.iterdir()}
    moved = cr.main(argv + ["--out-dir", str(out), "--eval", str(out / "best.pt"), "--text-encoder", str(tmp_path / "moved-bert")])
    assert {path.name: path.read_bytes() for path in out.iterdir()} == files  # --eval only reads, even its own folder
    assert moved[0][1]["rsum"] == cr.main(argv + ["--eval", str(out / "best.pt")])[0][1]["rsum"]
    # the weights are the checkpoint's: another transformer with the same tokenizer gives the same table
    assert moved[0][1]["rsum"] == cr.main(argv + ["--eval", str(out / "best.pt"), "--text-encoder",
                                                  str(tmp_path / "bert3")])[0][1]["rsum"]
    expect_one_error_line([sys.executable, cr.__file__, *argv, "--eval", out / "best.pt", "--text-encoder",
                           tmp_path / "renamed"], f"the tokenizer of {tmp_path / 'renamed'} is not the one "
                                                  f"{out / 'best.pt'} was trained with; pass --text-encoder with that one")


@pytest.mark.parametrize("content, held", [
    ("", False), ("\x00\xff", False), ("12345", False),  # empty, unreadable, the old format
    ("{host} 99999999999999999999 1 2026-01-01T00:00:00", False),  # a pid that overflows
    ("{host} {dead} 1 2026-01-01T00:00:00", False),  # a process that is gone
    ("{host} {live} 1 2026-01-01T00:00:00", False),  # a live process that is another one (its pid reused)
    ("{host} {live} {start} 2026-01-01T00:00:00", True),  # the live run
    ("elsewhere {live} 1 2026-01-01T00:00:00", True),  # another host's run: nothing here can tell it is gone
])
def test_a_lock_is_stale_unless_its_run_lives_and_a_full_disk_leaves_none(tmp_path, monkeypatch, content, held):
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        lock = tmp_path / "run" / ".lock"
        lock.parent.mkdir()
        lock.write_text(content.format(host=socket.gethostname(), dead=dead.pid, live=live.pid,
                                       start=cr.process_start(live.pid)))
        if held:
            with pytest.raises(DataError, match=r"^another run \(pid \d+ on host \S+, started 2026-01-01T00:00:00\) is "
                                                r"using .*; wait for it, or pass another --out-dir \(if no run is using "
                                                r"it, delete .*/run/\.lock\)$"):
                cr.lock(tmp_path / "run")
            assert lock.read_text() == content.format(host=socket.gethostname(), dead=dead.pid, live=live.pid,
                                                      start=cr.process_start(live.pid))
        else:
            release = cr.lock(tmp_path / "run")
            assert lock.read_text().startswith(f"{socket.gethostname()} {os.getpid()} {cr.process_start(os.getpid())} ")
            release()
            assert not lock.exists()
    finally:
        live.kill()
        live.wait()
    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(DataError, match=r"^cannot write checkpoints to .*full \(No space left on device\)"):
        cr.lock(tmp_path / "full")
    assert list((tmp_path / "full").iterdir()) == []


def coder_signalled_rank(rank, argv, out):
    after_step = cr.after_step

    def sigterm_on_rank_1_at_step_5(run, *rest):
        if rank == 1 and run.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return after_step(run, *rest)

    cr.after_step = sigterm_on_rank_1_at_step_5
    try:
        cr.train(cr.parse_args(argv), Path(argv[1]))
    except SystemExit as e:
        (Path(out) / f"code{rank}").write_text(str(e.code))


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(run_ranks, tiny, tmp_path):
    run_ranks(coder_signalled_rank, tiny_args(tiny, "--out-dir", str(tmp_path / "run"), "--batch-size", "8"), tmp_path)
    assert [(tmp_path / f"code{rank}").read_text() for rank in range(2)] == ["143", "143"]  # none waits for the other
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 5
