"""Contrastive Learning for Image Captioning (Dai & Lin, NeurIPS 2017), https://arxiv.org/abs/1710.02534

A target captioner p_m(c|I; theta) learns to give ground-truth pairs (c_t, I_t) a higher and mismatched
pairs (c_/t, I_t) a lower probability than a frozen reference captioner p_n(c|I; phi) (Eq. 7-10), which
makes its captions more distinctive: better at retrieving their own image (self-retrieval, Sec. 4.1).

    python cl_captioning.py                      # MLE pre-training (Eq. 1) on the toy world
    python cl_captioning.py --ref runs/mle-showtell-toy/best.pt     # CL from that checkpoint
    python cl_captioning.py --eval runs/cl-showtell-toy/best.pt     # evaluate a checkpoint alone

Read top to bottom: configuration, data, the two captioners (Sec. 5.1), MLE (Eq. 1), contrastive
learning (Sec. 4.2), self-retrieval and caption metrics (Sec. 4.1, 5), training loop, command line.
"""
import argparse
import contextlib
import functools
import io
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from common import (BOS, CAPS_PER_IMAGE, EOS, PAD, DataError, NonFiniteWatch, Vocab, barrier, broadcast_from_master,
                    image_batch, load_checkpoint, load_split, nonfinite_images, pick_device, prepare_data,
                    require_at_least, require_finite, require_writable, rng_states, save_checkpoint, set_rng_states,
                    setup_distributed, shutdown_distributed, some_ids, tokenize, wrap_ddp)

# --- Configuration --------------------------------------------------------------------------------
# Defaults are the paper's (Sec. 5) or, where it is silent, the authors' code (NOTES.md).

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="toy", choices=["toy", "coco", "flickr30k"], help="which data")
    p.add_argument("--data-root", default=None, help="folder with {split}_ims.npy and {split}_caps.txt")
    p.add_argument("--ref", default=None, help="reference checkpoint p_n: switches from MLE to CL training")
    p.add_argument("--init", default=None, help="checkpoint the CL target starts from (default: --ref)")
    p.add_argument("--eval", default=None, help="only evaluate this checkpoint on the test split")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out-dir/last.pt")
    p.add_argument("--save-every", type=int, default=1000,
                   help="also write last.pt every this many steps, not only at the end of an epoch (0: never)")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="leave out training images whose features hold NaN or inf (found by one pass over the file)")
    p.add_argument("--out-dir", default=None, help="where checkpoints go (default: runs/<stage>-<model>-<dataset>)")
    p.add_argument("--model", default="showtell", choices=["showtell", "adaatt"],
                   help="MLE model: NeuralTalk2/ShowTell or AdaptiveAttention (CL takes it from --init)")
    p.add_argument("--rnn-size", type=int, default=512, help="LSTM hidden size")
    p.add_argument("--emb-size", type=int, default=512, help="word and image embedding size")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout before the word classifier")
    p.add_argument("--max-words", type=int, default=16, help="captions are cut to this many words (+<eos>)")
    p.add_argument("--min-count", type=int, default=5, help="rarer words become <unk>")
    p.add_argument("--batch-images", type=int, default=20, help="images per batch and process (torchrun: x processes), each with its 5 captions")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: 30 for MLE, 10 for CL)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in all (0: no limit)")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default: 4e-4 for MLE as in the authors' code, 1e-6 for CL, Sec. 5)")
    p.add_argument("--beta1", type=float, default=0.8, help="Adam beta1")
    p.add_argument("--grad-clip", type=float, default=0.1, help="clamp every gradient entry to +-this")
    p.add_argument("--K", type=int, default=5, help="negative rounds per positive set (Eq. 10)")
    p.add_argument("--nu", type=float, default=1.0, help="nu = T_n / T_m in r_nu (Eq. 3, 8)")
    p.add_argument("--terms", default="both", choices=["both", "pos", "neg"],
                   help="CL, CL(P) or CL(N) of Table 4: which terms of Eq. 9 are used")
    p.add_argument("--target-dropout", type=float, default=None,
                   help="dropout of the CL target (default: the checkpoint's, as in the authors' code)")
    p.add_argument("--replace-ref-every", type=int, default=0,
                   help="replace the reference by the best target every this many epochs (Sec. 4.3, Table 6; 0: never)")
    p.add_argument("--beam-size", type=int, default=1, help="beam size at test time (1: greedy)")
    p.add_argument("--val-images", type=int, default=5000, help="dev images for the per-epoch CIDEr")
    p.add_argument("--val-retrieval-images", type=int, default=0, help="dev images for a per-epoch self-retrieval R@1 (0: off)")
    p.add_argument("--retrieval-images", type=int, default=5000, help="N test images in self-retrieval (Sec. 4.1)")
    p.add_argument("--pairs-per-forward", type=int, default=4096, help="(caption, image) pairs scored at once in self-retrieval")
    p.add_argument("--examples", type=int, default=5, help="test images printed with their captions")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    return p


# The toy world is ~40x smaller than COCO with a 75-word vocabulary: small nets train in minutes, and
# at the authors' MLE rate 4e-4 they take >12 epochs to start using the image; 2e-3 does it in 3.
# CL: the paper's rate 1e-6 barely moves such a net in a few epochs. With dropout in the target only,
# G = ln p_m - ln p_n starts biased below 0 (dropout lowers p_m), the positive term dominates and CL
# acts like more MLE; without it dev self-retrieval rose more. Both choices were made on the dev split.
TOY_OVERRIDES = {  # the toy nets are too small to gain from intra-op threads: one is fastest
    "mle": {"threads": 1, "rnn_size": 128, "emb_size": 128, "epochs": 12, "lr": 2e-3,
            "retrieval_images": 500, "val_retrieval_images": 300},
    "cl": {"threads": 1, "epochs": 3, "lr": 5e-4, "target_dropout": 0.0,
           "retrieval_images": 500, "val_retrieval_images": 300},
}


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    probe = build_parser()  # parses only what the user typed: every default suppressed
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    given = vars(probe.parse_args(argv))
    args.stage = "cl" if args.ref else "mle"
    if args.dataset == "toy":
        for name, value in TOY_OVERRIDES[args.stage].items():
            if name not in given:
                setattr(args, name, value)
    if args.epochs is None:
        args.epochs = 10 if args.stage == "cl" else 30
    if args.lr is None:
        args.lr = 1e-6 if args.stage == "cl" else 4e-4
    require_at_least(args, {"batch_images": 1, "K": 1, "epochs": 0, "max_steps": 0, "save_every": 0, "rnn_size": 1,
                            "emb_size": 1, "max_words": 1, "min_count": 1, "beam_size": 1, "val_images": 0,
                            "val_retrieval_images": 0, "retrieval_images": 0, "pairs_per_forward": 1,
                            "replace_ref_every": 0, "threads": 0})
    for name in ("lr", "nu", "grad_clip"):
        if getattr(args, name) <= 0:
            raise DataError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("dropout", "target_dropout", "beta1"):
        if getattr(args, name) is not None and not 0 <= getattr(args, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    return args


# --- Data: images with their five captions (Sec. 5.1) ---------------------------------------------

def encode_captions(vocab, captions, max_words):
    """All captions as ids once, shaped (images, 5, max_words + 1): words, <eos>, padding."""
    return vocab.encode_batch(captions, max_words + 1).reshape(-1, CAPS_PER_IMAGE, max_words + 1)


# --- Captioners: NeuralTalk2 / ShowTell and AdaptiveAttention (Sec. 5.1) ---------------------------

def caption_mask(captions):
    """1 for every word up to and including the first <eos>, 0 after it (padding)."""
    is_eos = (captions == EOS).long()
    return (is_eos.cumsum(1) - is_eos) == 0


def used_length(captions):
    """Columns up to the longest caption's <eos> (the rest is padding), computed on the host so that
    cutting a batch to it never makes the GPU wait."""
    is_eos = np.asarray(captions) == EOS
    return int(np.where(is_eos.any(-1), is_eos.argmax(-1) + 1, is_eos.shape[-1]).max())


class Captioner(nn.Module):
    """What both captioners share: p(c|I) and decoding, written once over encode / init_state / step."""

    def forward(self, feats, captions, image_index=None):
        """log p(c_i|I) (B,): the sum of the words' log-probs including <eos>, padding masked (NOTES.md).
        With image_index, caption i is scored against image image_index[i]: each image is encoded once
        and shared by all its captions (and negatives)."""
        return self.log_prob_encoded(self.encode(feats), captions, image_index)

    def log_prob(self, feats, captions):
        return self(feats, captions)

    def log_prob_encoded(self, memory, captions, image_index=None):
        if image_index is not None:
            memory = tuple(m[image_index] for m in memory)
        word_log_probs = self.word_log_probs(memory, captions).gather(2, captions.unsqueeze(2)).squeeze(2)
        return (word_log_probs * caption_mask(captions)).sum(1)

    def next_word_log_probs(self, memory, words, state):
        log_probs, state = self.step(memory, words, state)
        # <pad> and <bos> are never targets in training: never emit them (their mass stays in p)
        blocked = torch.zeros_like(log_probs, dtype=torch.bool)
        blocked[:, [PAD, BOS]] = True
        return log_probs, log_probs.masked_fill(blocked, -math.inf), state

    def greedy(self, feats, max_len):
        """Most probable next word at each step: (captions (B, max_len), their log p(c|I) (B,))."""
        memory = self.encode(feats)
        state = self.init_state(memory)
        batch = feats.shape[0]
        words = torch.full((batch,), BOS, dtype=torch.long, device=feats.device)
        captions = torch.full((batch, max_len), PAD, dtype=torch.long, device=feats.device)
        total = torch.zeros(batch, device=feats.device)
        done = torch.zeros(batch, dtype=torch.bool, device=feats.device)
        for t in range(max_len):
            log_probs, allowed, state = self.next_word_log_probs(memory, words, state)
            words = allowed.argmax(1)
            total += log_probs.gather(1, words[:, None]).squeeze(1).masked_fill(done, 0)
            captions[:, t] = words.masked_fill(done, PAD)
            done |= words == EOS
            if done.all():
                break
        return captions, total

    def beam_search(self, feats, beam_size, max_len):
        """The beam_size best partial captions per image kept at every step, all images at once;
        a finished caption keeps its score and competes with the unfinished ones to the end."""
        memory = self.encode(feats)
        batch, k = feats.shape[0], beam_size
        memory = tuple(m.repeat_interleave(k, 0) for m in memory)
        state = self.init_state(memory)
        device = feats.device
        scores = torch.zeros(batch, k, device=device)
        scores[:, 1:] = -math.inf  # the k beams start identical: expand only the first
        words = torch.full((batch * k,), BOS, dtype=torch.long, device=device)
        captions = torch.full((batch * k, max_len), PAD, dtype=torch.long, device=device)
        done = torch.zeros(batch * k, dtype=torch.bool, device=device)
        for t in range(max_len):
            _, allowed, state = self.next_word_log_probs(memory, words, state)
            vocab_size = allowed.shape[1]
            finished = torch.full_like(allowed, -math.inf)
            finished[:, PAD] = 0  # a finished caption extends only with <pad>, at no cost
            allowed = torch.where(done[:, None], finished, allowed)
            candidates = (scores.reshape(-1, 1) + allowed).reshape(batch, k * vocab_size)
            scores, flat = candidates.topk(k, dim=1)
            parent = (flat // vocab_size + torch.arange(batch, device=device)[:, None] * k).reshape(-1)
            words = (flat % vocab_size).reshape(-1)
            captions = captions[parent]
            captions[:, t] = words
            done = done[parent] | (words == EOS)
            state = tuple(s[parent] for s in state)
            if done.all():
                break
        best = scores.argmax(1) + torch.arange(batch, device=device) * k
        return captions[best], scores.max(1).values

    def generate(self, feats, beam_size, max_len):
        return self.greedy(feats, max_len) if beam_size == 1 else self.beam_search(feats, beam_size, max_len)


class ShowTell(Captioner):
    """NeuralTalk2 / Show and Tell (Vinyals et al. 2015): the image's fc feature (here the mean of
    its regions), projected, is the LSTM's first input; <bos> and the words follow."""
    kind = "showtell"

    def __init__(self, vocab_size, feat_dim, rnn_size=512, emb_size=512, dropout=0.5):
        super().__init__()
        self.kwargs = dict(vocab_size=vocab_size, feat_dim=feat_dim, rnn_size=rnn_size, emb_size=emb_size,
                           dropout=dropout)
        self.register_buffer("feat_mean", torch.zeros(feat_dim))  # set by standardize_features
        self.register_buffer("feat_std", torch.ones(feat_dim))
        self.image_embed = nn.Linear(feat_dim, emb_size)
        self.word_embed = nn.Embedding(vocab_size, emb_size)
        nn.init.uniform_(self.word_embed.weight, -0.1, 0.1)  # as NeuralTalk2: N(0, 1) would drown the image
        self.lstm = nn.LSTM(emb_size, rnn_size, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(rnn_size, vocab_size)

    def encode(self, feats):
        return (self.image_embed((feats.mean(1) - self.feat_mean) / self.feat_std),)

    def init_state(self, memory):
        _, (h, c) = self.lstm(memory[0].unsqueeze(1))
        return h[0], c[0]

    def step(self, memory, words, state):
        out, (h, c) = self.lstm(self.word_embed(words).unsqueeze(1), (state[0][None], state[1][None]))
        return F.log_softmax(self.classifier(self.dropout(out[:, 0])), -1), (h[0], c[0])

    def word_log_probs(self, memory, captions):
        """Teacher forcing: log-probs (B, T, V) of each caption word given the image and the words before."""
        previous = torch.cat([torch.full_like(captions[:, :1], BOS), captions[:, :-1]], 1)
        out, _ = self.lstm(torch.cat([memory[0].unsqueeze(1), self.word_embed(previous)], 1))
        return F.log_softmax(self.classifier(self.dropout(out[:, 1:])), -1)


class AdaptiveAttention(Captioner):
    """Knowing when to look (Lu et al. 2017): LSTM input [w_t; v^g]; a visual sentinel
    s_t = sigmoid(W_x x_t + W_h h_{t-1}) * tanh(c_t); attention over the k regions and the sentinel;
    p_t = softmax(W_p tanh(c_hat_t + h_t))."""
    kind = "adaatt"

    def __init__(self, vocab_size, feat_dim, rnn_size=512, emb_size=512, dropout=0.5):
        super().__init__()
        self.kwargs = dict(vocab_size=vocab_size, feat_dim=feat_dim, rnn_size=rnn_size, emb_size=emb_size,
                           dropout=dropout)
        self.register_buffer("feat_mean", torch.zeros(feat_dim))  # set by standardize_features
        self.register_buffer("feat_std", torch.ones(feat_dim))
        self.region_embed = nn.Sequential(nn.Linear(feat_dim, rnn_size), nn.ReLU())   # V = [v_1 .. v_k]
        self.global_embed = nn.Sequential(nn.Linear(feat_dim, emb_size), nn.ReLU())   # v^g
        self.word_embed = nn.Embedding(vocab_size, emb_size)
        nn.init.uniform_(self.word_embed.weight, -0.1, 0.1)
        self.lstm = nn.LSTMCell(2 * emb_size, rnn_size)
        self.W_x = nn.Linear(2 * emb_size, rnn_size)
        self.W_h = nn.Linear(rnn_size, rnn_size, bias=False)
        self.W_v = nn.Linear(rnn_size, rnn_size, bias=False)
        self.W_g = nn.Linear(rnn_size, rnn_size, bias=False)
        self.W_s = nn.Linear(rnn_size, rnn_size, bias=False)
        self.w_h = nn.Linear(rnn_size, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.W_p = nn.Linear(rnn_size, vocab_size)

    def encode(self, feats):
        feats = (feats - self.feat_mean) / self.feat_std
        V = self.region_embed(feats)
        return V, self.W_v(V), self.global_embed(feats.mean(1))  # W_v V is the same at every step

    def init_state(self, memory):
        zeros = memory[0].new_zeros(memory[0].shape[0], memory[0].shape[2])
        return zeros, zeros

    def step(self, memory, words, state):
        V, W_v_V, v_g = memory
        h_prev, c_prev = state
        x = torch.cat([self.word_embed(words), v_g], 1)
        h, c = self.lstm(x, (h_prev, c_prev))
        s = torch.sigmoid(self.W_x(x) + self.W_h(h_prev)) * torch.tanh(c)
        W_g_h = self.W_g(h).unsqueeze(1)
        z = self.w_h(torch.tanh(torch.cat([W_v_V, self.W_s(s).unsqueeze(1)], 1) + W_g_h)).squeeze(2)
        alpha = torch.softmax(z, 1)  # over the k regions and the sentinel
        c_hat = (alpha.unsqueeze(2) * torch.cat([V, s.unsqueeze(1)], 1)).sum(1)
        return F.log_softmax(self.W_p(self.dropout(torch.tanh(c_hat + h))), -1), (h, c)

    def word_log_probs(self, memory, captions):
        previous = torch.cat([torch.full_like(captions[:, :1], BOS), captions[:, :-1]], 1)
        state = self.init_state(memory)
        steps = []
        for t in range(captions.shape[1]):
            log_probs, state = self.step(memory, previous[:, t], state)
            steps.append(log_probs)
        return torch.stack(steps, 1)


def standardize_features(model, features, n=2000):
    """Per-dimension mean and std of region features over (up to n) training images, frozen into the
    model: what varies between images then has unit scale from the first step (a frozen BatchNorm,
    as self-critical.pytorch's --use_bn). Without it the toy world's captioners ignore the image."""
    sample = torch.from_numpy(np.array(features[:n], dtype=np.float32)).flatten(0, 1)
    sample = sample[torch.isfinite(sample).all(1)]  # a NaN image is reported by the training loop, not spread
    model.feat_mean.copy_(sample.mean(0))
    model.feat_std.copy_(sample.std(0).clamp_min(1e-6))
    return model


CAPTIONERS = {"showtell": ShowTell, "adaatt": AdaptiveAttention}


def captioner_record(model):
    """What rebuilds the model from the file alone: its class, constructor arguments and weights."""
    return {"kind": model.kind, "kwargs": model.kwargs, "state": model.state_dict()}


def load_captioner(path, vocab, feat_dim, device, dataset):
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "vocab" not in ckpt:
        raise DataError(f"{path} is not a checkpoint written by cl_captioning.py")
    record = ckpt["model"]
    if record["kwargs"]["feat_dim"] != feat_dim:
        raise DataError(f"{path} expects {record['kwargs']['feat_dim']}-dimensional region features, but the "
                        f"{dataset} data has {feat_dim}; use a checkpoint trained on this dataset")
    saved_vocab = Vocab.from_dict(ckpt["vocab"])
    if saved_vocab != vocab:
        raise DataError(f"{path} was trained with a {len(saved_vocab)}-word vocabulary, but the {dataset} train "
                        f"split gives {len(vocab)} words; use a checkpoint trained on this dataset")
    model = CAPTIONERS[record["kind"]](**record["kwargs"])
    model.load_state_dict(record["state"])
    return model.to(device), ckpt


# --- Maximum likelihood (Eq. 1) --------------------------------------------------------------------

def mle_loss(log_probs, captions):
    """-Eq. 1 per word: the negative log-likelihood of the ground-truth words, averaged over words."""
    return -log_probs.sum() / caption_mask(captions).sum()


# --- Contrastive learning (Sec. 4.2) ---------------------------------------------------------------

def log_ratio(log_p_target, log_p_ref):
    """G((c, I); theta, phi) = ln p_m(c|I, theta) - ln p_n(c|I, phi)   (Eq. 7)."""
    return log_p_target - log_p_ref


def cl_loss(logp_target_pos, logp_ref_pos, logp_target_neg, logp_ref_neg, nu=1.0, terms="both"):
    """-J(theta) (Eq. 10) for T_m positives (shape (B,)) and K rounds of negatives (shape (K, B)).
    h = r_nu(G) = sigmoid(G - ln nu) (Eq. 3, 8); ln h and ln(1 - h) = logsigmoid(-(G - ln nu)) (Eq. 9).
    Each round copies the positives, so their term is the plain mean; the rounds are weighted 1/K."""
    log_nu = math.log(nu)
    positive = F.logsigmoid(log_ratio(logp_target_pos, logp_ref_pos) - log_nu).mean()
    negative = F.logsigmoid(-(log_ratio(logp_target_neg, logp_ref_neg) - log_nu)).mean()
    J = {"both": positive + negative, "pos": positive, "neg": negative}[terms]
    return -J


def sample_negatives(image_ids, n_images, K, rng):
    """K rounds of mismatched images (K, B): for image I_t, one whose captions form c_/t in C_/I_t
    (Sec. 4.2). Offsets 1..N-1 make it uniform over the *other* images of the split, never I_t."""
    if n_images < 2:
        raise DataError("contrastive learning needs at least two training images")
    offsets = rng.integers(1, n_images, size=(K, len(image_ids)))
    return (np.asarray(image_ids)[None, :] + offsets) % n_images


def contrastive_log_probs(target, reference, feats, pos_captions, neg_captions):
    """log p_m and log p_n of the positives (B,) and of the K*B negatives (K, B) in one batched forward
    per model; each image is encoded once and shared by its (1 + K) * 5 captions."""
    K, n_pos = neg_captions.shape[0], pos_captions.shape[0]
    captions = torch.cat([pos_captions, neg_captions.reshape(K * n_pos, -1)])
    image_index = torch.arange(feats.shape[0], device=feats.device).repeat_interleave(CAPS_PER_IMAGE).repeat(1 + K)
    logp_target = target(feats, captions, image_index)  # target: the captioner or its DDP wrapper
    with torch.no_grad():  # the reference is frozen (and in eval mode: no dropout)
        logp_ref = reference(feats, captions, image_index)
    return (logp_target[:n_pos], logp_ref[:n_pos], logp_target[n_pos:].reshape(K, n_pos),
            logp_ref[n_pos:].reshape(K, n_pos))


# --- Evaluation: caption metrics (Sec. 5) and self-retrieval (Sec. 4.1) ----------------------------

def captioning_test_split(dataset):
    """The captioning test split: Karpathy's 5,000 COCO test images are SCAN's testall (its test is
    only the first 1,000); Flickr30K's is test."""
    return "testall" if dataset == "coco" else "test"


def load_image_ids(root, split, n_images):
    """COCO / Flickr image ids of a split from SCAN's {split}_ids.txt, one a line per image or per
    caption (then 5 equal lines per image); without the file, the row index."""
    path = Path(root) / f"{split}_ids.txt"
    if not path.is_file():
        return list(range(n_images))
    try:
        ids = [int(line) for line in path.read_text().split()]
    except ValueError:
        raise DataError(f"{path} must hold one integer image id a line")
    if len(ids) == CAPS_PER_IMAGE * n_images and all(len(set(ids[i:i + CAPS_PER_IMAGE])) == 1
                                                     for i in range(0, len(ids), CAPS_PER_IMAGE)):
        ids = ids[::CAPS_PER_IMAGE]
    if len(ids) != n_images or len(set(ids)) != n_images:
        raise DataError(f"{path} must hold {n_images} distinct image ids (one per image, or one per caption), "
                        f"got {len(ids)} lines with {len(set(ids))} distinct ids")
    return ids


def quiet(function, *args):
    """pycocotools prints a line per index it builds: keep the table readable."""
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args)


def coco_ground_truth(references, image_ids):
    """The references as an in-memory pycocotools COCO: image image_ids[i] has the captions references[i]."""
    from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = {"images": [{"id": int(i)} for i in image_ids],
                    "annotations": [{"id": len(image_ids) * k + n, "image_id": int(i), "caption": caption}
                                    for n, (i, refs) in enumerate(zip(image_ids, references))
                                    for k, caption in enumerate(refs)]}
    quiet(coco.createIndex)
    return coco


def coco_results(candidates, image_ids):
    """The COCO caption results format, as the online test server takes it: one caption per image."""
    return [{"image_id": int(i), "caption": caption} for i, caption in zip(image_ids, candidates)]


def results_path(checkpoint_path, split):
    """Where --eval and a run's final evaluation write the captions: next to the checkpoint."""
    checkpoint_path = Path(checkpoint_path)
    return checkpoint_path.with_name(f"captions_{split}_{checkpoint_path.stem}_results.json")


def ptb_available():
    return shutil.which("java") is not None


@functools.lru_cache(maxsize=None)
def warn_no_java():
    print("warning: java not found: scores use [a-z]+ tokens, not the PTB tokenizer (not COCO-official), "
          "and METEOR is skipped", file=sys.stderr)


def scores_note():
    return "PTB-tokenised COCO-official scores" if ptb_available() else "not PTB-tokenised: java not found"


@functools.lru_cache(maxsize=None)
def meteor_scorer():
    """One METEOR java process for the whole run: starting one takes seconds."""
    from pycocoevalcap.meteor.meteor import Meteor
    return Meteor()


def caption_metrics(coco, results, meteor=True):
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr of results (a COCO results list or file, read with loadRes)
    against the references in coco: COCOEvalCap.evaluate without SPICE, which downloads Stanford
    models at run time (NOTES.md). References and candidates go through the PTB tokenizer as there;
    without Java, through common.tokenize ([a-z]+) and without METEOR."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    coco_res = quiet(coco.loadRes, str(results) if isinstance(results, Path) else results)
    image_ids = coco.getImgIds()
    gts = {i: coco.imgToAnns[i] for i in image_ids}
    res = {i: coco_res.imgToAnns[i] for i in image_ids}
    if ptb_available():
        tokenizer = PTBTokenizer()
        gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    else:
        warn_no_java()
        gts, res = ({i: [" ".join(tokenize(a["caption"])) for a in anns] for i, anns in d.items()} for d in (gts, res))
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU-{n + 1}": bleu[n] for n in range(4)}
    if meteor and ptb_available():
        scores["METEOR"] = meteor_scorer().compute_score(gts, res)[0]
    scores["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    scores["CIDEr"] = Cider().compute_score(gts, res)[0]
    return scores


def self_retrieval_recall(logp, ks=(1, 5, 50, 500)):
    """logp[t, j] = log p(c_t | I_j) for the caption c_t generated for image t. Recall@k (in %) of
    image t among the k images that give c_t the highest probability (Sec. 4.1); k is capped by N.
    Ties count against the query, as coder_retrieval.recall_at_k: rank = the number of *other* images
    scoring >= the own one, so an image-blind captioner scores 0, not 100; a NaN is a miss."""
    logp = torch.as_tensor(logp)
    n = len(logp)
    own = logp.diagonal()[:, None]
    other = ~torch.eye(n, dtype=torch.bool)
    rank = (~(logp < own) & other).sum(1)  # ~(x < own): x >= own, or either is NaN
    rank[own[:, 0].isnan()] = n  # beyond every k
    return {f"R@{k}": 100.0 * (rank < min(k, n)).double().mean().item() for k in ks}


def encode_images(model, features, ids, device, chunk=500):
    """Encoded memory of many images, read from the memory map a chunk at a time."""
    parts = [model.encode(image_batch(features, ids[i:i + chunk], device)) for i in range(0, len(ids), chunk)]
    return tuple(torch.cat(p) for p in zip(*parts))


@torch.no_grad()
def retrieval_log_probs(model, features, ids, captions, device, pairs_per_forward=4096):
    """The (N, N) matrix log p(c_t | I_j), at most pairs_per_forward (caption, image) pairs a forward:
    a block of captions against all N images, or, when N is larger, one caption against a block of
    images. Memory stays fixed as N grows (the (N, N) result aside, held on the host): the encoded
    images and one forward's (pairs, words, vocabulary) log-probs."""
    model.eval()
    memory = encode_images(model, features, ids, device)
    n = len(ids)
    image_block = min(n, pairs_per_forward)
    caption_block = max(1, pairs_per_forward // image_block)
    logp = torch.empty(n, n)
    for start in range(0, n, caption_block):
        block_captions = captions[start:start + caption_block]
        block_captions = block_captions[:, :used_length(block_captions)].to(device)  # no steps past its <eos>
        for image_start in range(0, n, image_block):
            images = torch.arange(image_start, min(image_start + image_block, n), device=device)
            logp[start:start + caption_block, image_start:image_start + len(images)] = model.log_prob_encoded(
                memory, block_captions.repeat_interleave(len(images), 0), images.repeat(len(block_captions))
            ).reshape(-1, len(images)).float().cpu()
    return logp


@torch.no_grad()
def generate_captions(model, features, ids, args, device, beam_size=1, batch=500):
    model.eval()
    return torch.cat([model.generate(image_batch(features, ids[i:i + batch], device), beam_size, args.max_words + 1)[0].cpu()
                      for i in range(0, len(ids), batch)])


def evaluate(model, features, captions, vocab, args, device, beam_size, retrieval_images, meteor=True,
             image_ids=None, results_file=None):
    """Caption metrics of the model's captions for every image, and self-retrieval recall on the first N.
    The captions go into a COCO results file when results_file is given, and are scored from it."""
    ids = np.arange(len(features))
    image_ids = list(ids) if image_ids is None else image_ids
    generated = generate_captions(model, features, ids, args, device, beam_size)
    candidates = [vocab.decode(c) for c in generated.tolist()]
    references = [captions[CAPS_PER_IMAGE * i:CAPS_PER_IMAGE * (i + 1)] for i in ids]
    results = coco_results(candidates, image_ids)
    if results_file is not None:
        Path(results_file).write_text(json.dumps(results))
        results = Path(results_file)
    scores = caption_metrics(coco_ground_truth(references, image_ids), results, meteor)
    n = min(retrieval_images, len(ids))
    if n > 0:
        logp = retrieval_log_probs(model, features, ids[:n], generated[:n], device, args.pairs_per_forward)
        scores.update(self_retrieval_recall(logp))
    return scores, candidates


def print_table(columns, title):
    """Metrics side by side: columns = {name: {metric: value}}; caption metrics x100 as in papers."""
    names = list(columns)
    metrics = [m for m in next(iter(columns.values()))]
    print(f"\n{title}\n{'metric':<10}" + "".join(f"{name:>18}" for name in names))
    for metric in metrics:
        scale = 1 if metric.startswith("R@") else 100
        print(f"{metric:<10}" + "".join(f"{scale * columns[name][metric]:>18.1f}" for name in names))


# --- Training loop ---------------------------------------------------------------------------------

def run_name(args, kind):
    return args.out_dir or f"runs/{args.stage}-{kind}-{args.dataset}"


def checkpoint(target, reference, optimizer, vocab, args, step, epoch, best_score, rng):
    """`epoch`: the epoch `step` lies in (the next one at its end); `rng`: rng_states() of every rank."""
    ckpt = {"model": captioner_record(target), "vocab": vocab.to_dict(), "args": vars(args), "stage": args.stage,
            "step": step, "epoch": epoch, "best_score": best_score, "optimizer": optimizer.state_dict(),
            "rng": rng, "world_size": dist.get_world_size() if dist.is_initialized() else 1}
    if reference is not None:  # the reference may have been replaced (Sec. 4.3)
        ckpt["reference"] = captioner_record(reference)
    return ckpt


def validate(model, dev, vocab, args, device):
    """Per-epoch model selection on the dev split: CIDEr of greedy captions (and, if asked, R@1)."""
    features, captions = dev
    ids = np.arange(min(args.val_images, len(features)))
    generated = generate_captions(model, features, ids, args, device)
    candidates = [vocab.decode(c) for c in generated.tolist()]
    references = [[" ".join(tokenize(c)) for c in captions[CAPS_PER_IMAGE * i:CAPS_PER_IMAGE * (i + 1)]] for i in ids]
    from pycocoevalcap.cider.cider import Cider
    scores = {"CIDEr": Cider().compute_score({i: r for i, r in enumerate(references)},
                                             {i: [c] for i, c in enumerate(candidates)})[0]}
    n = min(args.val_retrieval_images, len(ids))
    if n > 0:
        logp = retrieval_log_probs(model, features, ids[:n], generated[:n], device, args.pairs_per_forward)
        scores["R@1"] = self_retrieval_recall(logp, ks=(1,))["R@1"]
    return scores


def epoch_order(n_images, seed, epoch, world_size=1):
    """The shuffled images of an epoch, the same on every rank: it depends on (seed, epoch) only, so
    --resume replays it. Under DDP it wraps around to a multiple of the world size (as
    DistributedSampler pads) so that every rank has images in the last batch."""
    order = np.random.default_rng([seed, epoch]).permutation(n_images)
    return np.concatenate([order, order[: -n_images % world_size]])


def rank_share(global_ids, rank, world_size):
    """Positions in a global batch that this rank trains on: contiguous, disjoint, sizes differ by <= 1."""
    return np.array_split(np.arange(len(global_ids)), world_size)[rank]


def train(args, target, reference, train_data, dev, vocab, device, out_dir, keep=None):
    """MLE (reference is None) or CL; returns the path of the best checkpoint (by dev CIDEr).
    Under torchrun every rank trains on its share of each global batch of batch_images x world_size
    images; rank 0 alone validates, prints and saves while the others wait. `keep`: the training
    images to use (default: all; --skip-nonfinite leaves some out)."""
    rank, local_rank, world_size = setup_distributed()
    master = rank == 0
    features, captions = train_data
    n_images = len(features)
    keep = np.arange(n_images) if keep is None else np.asarray(keep)
    model = target  # what the loss calls: the target, or its DDP wrapper that averages gradients over ranks
    if world_size > 1:
        torch.manual_seed(args.seed + rank)  # weights start equal (DDP broadcasts rank 0's), dropout differs
        model = wrap_ddp(target, local_rank)
    optimizer = torch.optim.Adam(target.parameters(), lr=args.lr, betas=(args.beta1, 0.999))
    global_batch = args.batch_images * world_size
    steps_per_epoch = math.ceil(len(epoch_order(len(keep), args.seed, 0, world_size)) / global_batch)
    step, start_epoch, best_score = 0, 0, -math.inf
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    best_state = None
    kept = f"nothing saved yet in {out_dir}"
    if args.resume:
        ckpt = load_checkpoint(last_path)
        if ckpt.get("stage") != args.stage:
            raise DataError(f"{last_path} is a {ckpt.get('stage')} run, not {args.stage}; check --ref / --out-dir")
        if ckpt["model"]["kwargs"] != target.kwargs or ckpt["model"]["kind"] != target.kind:
            raise DataError(f"{last_path} holds a different model ({ckpt['model']['kind']} {ckpt['model']['kwargs']}); "
                            f"resume with the flags of that run")
        if ckpt.get("world_size", 1) != world_size:
            raise DataError(f"{last_path} was written by {ckpt.get('world_size', 1)} processes; resume with as many")
        for name in ("seed", "batch_images", "skip_nonfinite"):  # they fix the order of the batches
            if ckpt["args"].get(name, False) != getattr(args, name):
                raise DataError(f"{last_path} was trained with --{name.replace('_', '-')} {ckpt['args'].get(name)}; "
                                f"resume with the same")
        target.load_state_dict(ckpt["model"]["state"])
        if reference is not None:
            reference.load_state_dict(ckpt["reference"]["state"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if "rng" in ckpt:
            set_rng_states(ckpt["rng"])
        else:  # written before RNG states of all ranks were saved
            torch.set_rng_state(ckpt["torch_rng"])
        step, start_epoch, best_score = ckpt["step"], ckpt["epoch"], ckpt["best_score"]
        if reference is not None and args.replace_ref_every and best_score > -math.inf:
            best_state = load_checkpoint(best_path)["model"]["state"]  # written by this run with best_score
        kept = f"{last_path} keeps step {step}"
        if master:
            print(f"resuming {last_path} at step {step} (epoch {start_epoch + 1})")
    watch = NonFiniteWatch("train")

    def save_last(epoch_of_step):
        """last.pt, after checking that nothing non-finite came up since the last look."""
        nonlocal kept
        watch.check(kept)
        rng = rng_states()  # every rank's: a resumed run then draws the dropout masks this one would
        if master:
            save_checkpoint(checkpoint(target, reference, optimizer, vocab, args, step, epoch_of_step, best_score, rng),
                            last_path)
        kept = f"{last_path} keeps step {step}"
        barrier()

    trained_captions, train_seconds = 0, 0.0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    stopped = False
    for epoch in range(start_epoch, args.epochs):
        order = keep[epoch_order(len(keep), args.seed, epoch, world_size)]
        batches = [order[i:i + global_batch] for i in range(0, len(order), global_batch)]
        done_in_epoch = step - epoch * steps_per_epoch
        target.train()
        bar = tqdm(total=len(order) * CAPS_PER_IMAGE, unit="cap", unit_scale=True, dynamic_ncols=True,
                   desc=f"{args.stage} epoch {epoch + 1}/{args.epochs}", disable=not master,
                   initial=min(done_in_epoch * global_batch, len(order)) * CAPS_PER_IMAGE)
        t0 = time.time()
        try:
            for batch in batches[done_in_epoch:]:
                global_ids = np.sort(batch)
                mine = rank_share(global_ids, rank, world_size)
                ids = global_ids[mine]
                feats = image_batch(features, ids, device)
                pos = captions[ids].reshape(len(ids) * CAPS_PER_IMAGE, -1)
                if reference is None:
                    pos_captions = torch.from_numpy(pos[:, :used_length(pos)]).to(device)
                else:
                    # fresh negatives every step, reproducible from (seed, step); drawn for the global
                    # batch, the same on every rank, each rank taking its own columns: no draw repeats
                    neg_ids = sample_negatives(global_ids, n_images, args.K, np.random.default_rng([args.seed, step]))
                    neg = captions[neg_ids[:, mine]].reshape(args.K, len(pos), -1)
                    length = max(used_length(pos), used_length(neg))
                    pos_captions, neg_captions = (torch.from_numpy(c[..., :length]).to(device) for c in (pos, neg))
                with autocast:
                    if reference is None:
                        own_image = torch.arange(len(ids), device=device).repeat_interleave(CAPS_PER_IMAGE)
                        loss = mle_loss(model(feats, pos_captions, own_image), pos_captions)
                    else:
                        loss = cl_loss(*contrastive_log_probs(model, reference, feats, pos_captions, neg_captions),
                                       nu=args.nu, terms=args.terms)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_value_(target.parameters(), args.grad_clip)
                optimizer.step()
                step += 1
                watch.add(step, ids, feats, {"MLE loss (Eq. 1)" if reference is None else "CL loss -J (Eq. 10)": loss})
                trained_captions += len(batch) * CAPS_PER_IMAGE
                bar.update(len(batch) * CAPS_PER_IMAGE)
                if step % 25 == 0:  # .item() waits for the GPU: not every step
                    watch.check(kept)
                    bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                if args.max_steps and step >= args.max_steps:
                    stopped = True
                    break
                if args.save_every and step % args.save_every == 0 and step < (epoch + 1) * steps_per_epoch:
                    save_last(epoch)  # mid-epoch: a kill -9 loses at most save_every steps
        except KeyboardInterrupt:
            stopped = True
            if master:
                print(f"\ninterrupted at step {step}; continue with the same command plus --resume")
        bar.close()
        train_seconds += time.time() - t0
        if stopped:
            save_last(epoch)
            break
        watch.check(kept)  # never a dev score, best.pt or table from non-finite weights
        scores = broadcast_from_master(validate(target, dev, vocab, args, device) if master else None)
        if scores["CIDEr"] > best_score:  # decided on rank 0's scores: every rank keeps the same best_state
            best_score = scores["CIDEr"]
            best_state = {k: v.detach().clone() for k, v in target.state_dict().items()}
            if master:
                save_checkpoint(checkpoint(target, reference, optimizer, vocab, args, step, epoch + 1, best_score,
                                           None), best_path)
        if master:
            print(f"epoch {epoch + 1}: dev " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) +
                  f" (best CIDEr {best_score:.3f})")
        if reference is not None and args.replace_ref_every and (epoch + 1) % args.replace_ref_every == 0:
            if best_state is not None:  # the latest best target becomes the reference (Sec. 4.3)
                reference.load_state_dict(best_state)
                if master:
                    print("reference replaced by the best target so far")
        save_last(epoch + 1)
    if trained_captions and master:
        print(f"trained {trained_captions} captions in {train_seconds:.0f}s: {trained_captions / train_seconds:.0f} "
              f"captions/s" + (f" over {world_size} processes" if world_size > 1 else ""))
    return best_path if best_score > -math.inf else last_path  # never a stale best.pt of an earlier run


# --- Command line ----------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    rank, local_rank, world_size = setup_distributed()  # (0, 0, 1) unless started by torchrun
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(local_rank)
    root = prepare_data(args.dataset, args.data_root)
    train_features, train_text = load_split(root, "train")
    vocab = Vocab.build((tokenize(c) for c in train_text), args.min_count)
    feat_dim = train_features.shape[2]
    split = captioning_test_split(args.dataset)
    test = load_split(root, split)
    require_finite(test[0], split)  # up front: a training run never ends in a table computed from NaN
    test_ids = load_image_ids(root, split, len(test[0]))
    n_test = len(test[0])
    title = (f"{split} split of {args.dataset} ({n_test} images; self-retrieval among "
             f"{min(args.retrieval_images, n_test)}; {scores_note()})")

    if args.eval:
        if rank != 0:
            return None
        model, _ = load_captioner(args.eval, vocab, feat_dim, device, args.dataset)
        results_file = results_path(args.eval, split)
        scores, candidates = evaluate(model, *test, vocab, args, device, args.beam_size, args.retrieval_images,
                                      image_ids=test_ids, results_file=results_file)
        print_table({Path(args.eval).name: scores}, title)
        print(f"\ncaptions in COCO results format: {results_file}")
        return scores

    train_data = (train_features, encode_captions(vocab, train_text, args.max_words))
    dev = load_split(root, "dev")
    require_finite(dev[0][:args.val_images], "dev")
    keep = None  # without --skip-nonfinite the training loop itself stops at the first NaN image
    if args.skip_nonfinite:
        bad = nonfinite_images(train_features)
        keep = np.setdiff1d(np.arange(len(train_features)), bad)
        if len(keep) == 0:
            raise DataError("every training image holds NaN or inf region features")
        if rank == 0:
            print(f"--skip-nonfinite: left out {len(bad)} of {len(train_features)} training images with NaN or inf "
                  f"features" + (f" ({some_ids(bad)})" if len(bad) else ""))
    if args.stage == "cl":
        reference, _ = load_captioner(args.ref, vocab, feat_dim, device, args.dataset)
        reference.eval().requires_grad_(False)
        target, _ = load_captioner(args.init or args.ref, vocab, feat_dim, device, args.dataset)
        if args.target_dropout is not None:
            target.dropout.p = target.kwargs["dropout"] = args.target_dropout
        same_shape = {k: v for k, v in target.kwargs.items() if k != "dropout"} == \
            {k: v for k, v in reference.kwargs.items() if k != "dropout"}
        if args.replace_ref_every and (target.kind != reference.kind or not same_shape):
            raise DataError("--replace-ref-every needs target and reference of the same architecture")
    else:
        reference = None
        target = CAPTIONERS[args.model](len(vocab), feat_dim, args.rnn_size, args.emb_size, args.dropout)
        target = standardize_features(target, train_features).to(device)
    out_dir = Path(run_name(args, target.kind))
    require_writable(out_dir)
    if rank == 0:
        print(f"{args.stage.upper()}: {target.kind} with {sum(p.numel() for p in target.parameters()):,} parameters, "
              f"{len(vocab)} words, {len(train_features)} training images, lr {args.lr:g}, {args.epochs} epochs, "
              f"device {device} x {world_size}; checkpoints in {out_dir}/")
    best_path = train(args, target, reference, train_data, dev, vocab, device, out_dir, keep)
    if rank != 0:  # the test evaluation runs once, on rank 0
        return None

    target, _ = load_captioner(best_path, vocab, feat_dim, device, args.dataset)
    results_file = results_path(best_path, split)
    target_scores, target_captions = evaluate(target, *test, vocab, args, device, args.beam_size, args.retrieval_images,
                                              image_ids=test_ids, results_file=results_file)
    if args.stage == "mle":
        print_table({"MLE": target_scores}, title)
        data_flags = "" if args.dataset == "toy" and not args.data_root else \
            f" --dataset {args.dataset}" + (f" --data-root {shlex.quote(args.data_root)}" if args.data_root else "")
        print(f"\nbest checkpoint: {best_path}\ncaptions in COCO results format: {results_file}\n"
              f"next, contrastive learning against it:\n"
              f"    python cl_captioning.py --ref {shlex.quote(str(best_path))}{data_flags}")
        return target_scores
    reference, _ = load_captioner(args.ref, vocab, feat_dim, device, args.dataset)  # as it was before training
    ref_scores, ref_captions = evaluate(reference, *test, vocab, args, device, args.beam_size, args.retrieval_images,
                                        image_ids=test_ids)
    columns = {"reference": ref_scores}
    if args.init and Path(args.init).resolve() != Path(args.ref).resolve():  # Table 5: the target before CL too
        init, _ = load_captioner(args.init, vocab, feat_dim, device, args.dataset)
        columns["target before CL"] = evaluate(init, *test, vocab, args, device, args.beam_size, args.retrieval_images,
                                               image_ids=test_ids)[0]
    columns["CL target"] = target_scores
    print_table(columns, title)
    print(f"\nexamples (Figure 2): the first {args.examples} test images")
    for i in range(min(args.examples, n_test)):
        human = max(test[1][CAPS_PER_IMAGE * i:CAPS_PER_IMAGE * (i + 1)], key=len)
        print(f"  image {i}: human:     {human}\n"
              f"           reference: {ref_captions[i]}\n           target:    {target_captions[i]}")
    print(f"\nbest CL checkpoint: {best_path}\ncaptions in COCO results format: {results_file}")
    return {"reference": ref_scores, "target": target_scores}


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
    finally:
        shutdown_distributed()
