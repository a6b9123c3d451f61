"""Contrastive Learning for Image Captioning (Dai & Lin, NeurIPS 2017), https://arxiv.org/abs/1710.02534

A target captioner p_m(c|I; theta) learns to give ground-truth pairs (c_t, I_t) a higher and mismatched
pairs (c_/t, I_t) a lower probability than a frozen reference captioner p_n(c|I; phi) (Eq. 7-10), which
makes its captions more distinctive: better at retrieving their own image (self-retrieval, Sec. 4.1).

    python cl_captioning.py                                         # MLE pre-training (Eq. 1), toy world
    python cl_captioning.py --ref runs/mle-showtell-toy/best.pt     # CL against that reference
    python cl_captioning.py --eval runs/cl-showtell-toy/best.pt     # test table of a checkpoint
    torchrun --nproc_per_node=8 cl_captioning.py --dataset coco     # the same on 8 GPUs

Paper to code: Sec. 5.1 ShowTell, AdaptiveAttention; Eq. 1 mle_loss; Eq. 7 log_ratio; Eq. 3, 8-10 cl_loss (--nu;
--terms: Table 4); Sec. 4.2 sample_negatives; Sec. 4.1 self_retrieval_recall; Sec. 4.3 train's --replace-ref-every;
Table 5 --init. After main, an appendix of plumbing.
"""
import argparse, contextlib, functools, hashlib, io, json, math, os, shlex, shutil, signal, socket, sys, time
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # each ends a run: in training, after saving last.pt
if __name__ == "__main__":  # from the first moment (`import torch` takes seconds) a signal ends the run in one line
    for s in SIGNALS:
        signal.signal(s, lambda signum, frame: (os.write(2, b"\ninterrupted\n"), sys.exit(128 + signum)))
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import (BOS, CAPS_PER_IMAGE, EOS, PAD, DataError, Vocab, finite_images, image_batch, load_image_ids,
                    load_split, prepare_data, tokenize)

# --- Configuration ------------------------------------------------------------------------------------
# Defaults are the paper's (Sec. 5) or, where it is silent, the authors' code (github.com/doubledaibo/
# clcaption_nips2017). The toy world (~40x smaller than COCO, 121 words) replaces a few, chosen on its dev
# split: at the MLE rate 4e-4 small nets take >12 epochs to use the image (2e-3: 3); CL's 1e-6 barely moves
# them; dropout in the target alone biases G = ln p_m - ln p_n below 0, so CL acts like more MLE.
TOY_OVERRIDES = {  # the toy nets are too small to gain from intra-op threads: one is fastest; toy captions: <= 16 words
    "mle": {"threads": 1, "rnn_size": 128, "emb_size": 128, "epochs": 12, "lr": 2e-3, "retrieval_images": 500,
            "max_words": 16},
    "cl": {"threads": 1, "epochs": 3, "lr": 5e-4, "target_dropout": 0.0, "retrieval_images": 500, "max_words": 16}}
# What each number may be: an integer (lowest, highest); a positive float its highest; a "probability" [0, 1)
BOUNDS = dict(batch_images=(1, 10**6), K=(1, 10**6), epochs=(1, 10**6), max_steps=(0, 10**12), save_every=(0, 10**12),
              rnn_size=(1, 10**5), emb_size=(1, 10**5), max_words=(1, 10**4), min_count=(1, 10**9), beam_size=(1, 10**3),
              val_images=(1, 10**9), retrieval_images=(0, 10**9), pairs_per_forward=(1, 10**9),
              replace_ref_every=(0, 10**6), threads=(0, 1024), examples=(0, 10**9), seed=(0, 2**32 - 1),
              lr=1.0,  # Adam's steps are about lr in size: beyond 1 they only blow the weights up
              nu=math.inf, grad_clip=math.inf, dropout="probability", target_dropout="probability", beta1="probability")
CONFIG_LINE = {"mle": ("batch_images", "lr", "epochs", "dropout", "seed"),  # what a run prints of its configuration
               "cl": ("batch_images", "lr", "epochs", "K", "nu", "terms", "target_dropout", "replace_ref_every", "seed")}

class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default, and the toy world's value where it replaces it."""

    def _get_help_string(self, action):
        text = action.help if action.default in (None, False) else super()._get_help_string(action)
        toy = [f"{stage.upper()} {values[action.dest]:g}" for stage, values in TOY_OVERRIDES.items()
               if action.dest in values]
        return text + (f" [toy world: {', '.join(toy)}]" if toy else "")

def build_parser():
    def refuse(message):  # argparse's own errors end in one line too
        raise DataError(f"{message}; see --help")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Help, allow_abbrev=False,
                                usage="%(prog)s [flags]")
    p.error = refuse
    add = p.add_argument
    add("--dataset", default="toy", choices=["toy", "coco", "flickr30k"], help="which data")
    add("--data-root", default=None, help="folder with {split}_ims.npy and {split}_caps.txt (default: data/<dataset>)")
    add("--ref", default=None, help="reference checkpoint p_n: switches from MLE to CL training")
    add("--init", default=None, help="checkpoint the CL target starts from (default: --ref; Table 5)")
    add("--eval", default=None, metavar="CKPT", help="only evaluate this checkpoint on the test split")
    add("--out-dir", default=None, help="where best.pt and last.pt go (default: runs/<stage>-<model>-<dataset>)")
    add("--resume", action="store_true", help="continue the run saved in --out-dir/last.pt")
    add("--save-every", type=int, default=1000, help="also write last.pt every this many steps (0: at epoch ends only)")
    add("--skip-nonfinite", action="store_true", help="leave out training images whose features hold NaN or inf")
    add("--raw-features", action="store_true", help="MLE: feed the region features unstandardised, as the paper")
    add("--model", default="showtell", choices=["showtell", "adaatt"],
        help="MLE model: NeuralTalk2/ShowTell or AdaptiveAttention (CL takes it from the checkpoint)")
    add("--rnn-size", type=int, default=512, help="LSTM hidden size")
    add("--emb-size", type=int, default=512, help="word and image embedding size")
    add("--dropout", type=float, default=0.5, help="dropout before the word classifier")
    add("--max-words", type=int, default=18, help="captions are cut to this many words (+<eos>), as Sec. 5.1")
    add("--min-count", type=int, default=5, help="rarer words become <unk>")
    add("--batch-images", type=int, default=20, help="images per step and process, each with its 5 captions")
    add("--epochs", type=int, default=None, help="training epochs (default: 30 MLE, 10 CL)")
    add("--max-steps", type=int, default=0, help="stop after this many steps in all (0: no limit)")
    add("--lr", type=float, default=None, help="Adam learning rate (default: 4e-4 MLE, authors' code; 1e-6 CL, Sec. 5)")
    add("--beta1", type=float, default=0.8, help="Adam beta1")
    add("--grad-clip", type=float, default=0.1, help="clamp every gradient entry to +-this")
    add("--K", type=int, default=5, help="negative rounds per positive set (Eq. 10)")
    add("--nu", type=float, default=1.0, help="nu = T_n / T_m in r_nu (Eq. 3, 8)")
    add("--terms", default="both", choices=["both", "pos", "neg"], help="CL, CL(P) or CL(N) of Table 4")
    add("--target-dropout", type=float, default=None, help="dropout of the CL target (default: the checkpoint's)")
    add("--replace-ref-every", type=int, default=0,
        help="replace the reference by the best target every this many epochs (Sec. 4.3, Table 6; 0: never)")
    add("--beam-size", type=int, default=1, help="beam size at test time (1: greedy)")
    add("--val-images", type=int, default=2000, help="dev images for the per-epoch CIDEr (Sec. 5.1: 2,000)")
    add("--retrieval-images", type=int, default=5000, help="N test images in self-retrieval (Sec. 4.1)")
    add("--pairs-per-forward", type=int, default=4096, help="caption-image pairs scored at once in self-retrieval")
    add("--examples", type=int, default=5, help="test images printed with their captions (Figure 2)")
    add("--seed", type=int, default=0, help="random seed")
    add("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    return p

def parse_args(argv=None):
    argv, p = sys.argv[1:] if argv is None else argv, build_parser()
    args = p.parse_args(argv)
    given = {a.dest for a in p._actions for s in a.option_strings for arg in argv if arg == s or arg.startswith(s + "=")}
    args.stage = "cl" if args.ref else "mle"
    defaults = {"epochs": 10, "lr": 1e-6} if args.stage == "cl" else {"epochs": 30, "lr": 4e-4}  # as --help says
    for name, value in (defaults | TOY_OVERRIDES[args.stage] if args.dataset == "toy" else defaults).items():
        if name not in given:
            setattr(args, name, value)
    for name, bounds in BOUNDS.items():
        value, flag = getattr(args, name), "--" + name.replace("_", "-")
        if bounds == "probability":
            if value is not None and not 0 <= value < 1:  # None: --target-dropout keeps the checkpoint's
                raise DataError(f"{flag} must be in [0, 1), got {value}")
        elif isinstance(bounds, float):
            if not 0 < value < math.inf:
                raise DataError(f"{flag} must be positive and finite, got {value}")
            if value > bounds:
                raise DataError(f"{flag} must be at most {bounds:g}, got {value:g}")
        elif not bounds[0] <= value <= bounds[1]:
            raise DataError(f"{flag} must be at {f'least {bounds[0]}' if value < bounds[0] else f'most {bounds[1]}'}, "
                            f"got {value}")
    return args

def departures(args):
    """The run's departures from the paper, one line each: what, value: what the code does, why; the paper's (flag)."""
    lines = ["region features: detector regions (--data-root), ShowTell's image vector their mean; the paper: CNN "
             "features (no flag: other features in --data-root)"]
    if args.stage == "mle" and not args.raw_features:
        lines.append("features standardised: train mean, std frozen into the model (self-critical.pytorch's --use_bn), "
                     "else small nets ignore the image; the paper: raw (--raw-features)")
    toy = [f"{k.replace('_', '-')} {v:g}" for k, v in TOY_OVERRIDES[args.stage].items() if k != "threads"
           and getattr(args, k) == v]
    if args.dataset == "toy" and toy:
        lines.append(f"toy world: {', '.join(toy)}, chosen on its dev split; the paper's: --dataset coco")
    return lines

# --- Data: images with their five captions (Sec. 5.1) ---------------------------------------------
def encode_captions(vocab, captions, max_words):
    """All captions as ids once, shaped (images, 5, max_words + 1): words, <eos>, padding."""
    return vocab.encode_batch(captions, max_words + 1).reshape(-1, CAPS_PER_IMAGE, max_words + 1)

def own_images(n_images, device):
    """The image of each of a batch's 5n captions: 0, 0, 0, 0, 0, 1, ..."""
    return torch.arange(n_images, device=device).repeat_interleave(CAPS_PER_IMAGE)

# --- Captioners: NeuralTalk2 / ShowTell and AdaptiveAttention (Sec. 5.1) ---------------------------
def caption_mask(captions):
    """1 for every word up to and including the first <eos>, 0 after it (padding)."""
    is_eos = (captions == EOS).long()
    return (is_eos.cumsum(1) - is_eos) == 0

def used_length(captions):
    """Columns up to the longest caption's <eos> (the rest is padding), on the host: cutting never waits for a GPU."""
    is_eos = np.asarray(captions) == EOS
    return int(np.where(is_eos.any(-1), is_eos.argmax(-1) + 1, is_eos.shape[-1]).max())

class Captioner(nn.Module):
    """What both captioners share: p(c|I) and decoding, written once over encode / init_state / step."""

    def __init__(self, vocab_size, feat_dim, rnn_size, emb_size, dropout):
        super().__init__()
        self.kwargs = dict(vocab_size=vocab_size, feat_dim=feat_dim, rnn_size=rnn_size, emb_size=emb_size,
                           dropout=dropout)  # what rebuilds the model from a checkpoint
        self.register_buffer("feat_mean", torch.zeros(feat_dim))  # set by standardize_features
        self.register_buffer("feat_std", torch.ones(feat_dim))
        self.dropout = nn.Dropout(dropout)

    def word_embedding(self, vocab_size, emb_size):
        embed = nn.Embedding(vocab_size, emb_size)
        nn.init.uniform_(embed.weight, -0.1, 0.1)  # as NeuralTalk2: N(0, 1) would drown the image
        return embed

    def forward(self, feats, captions, image_index=None):
        """log p(c_i|I) (B,): <eos> counted, padding masked; caption i on image image_index[i]: images encoded once."""
        return self.log_prob_encoded(self.encode(feats), captions, image_index)

    def log_prob_encoded(self, memory, captions, image_index=None):
        if image_index is not None:
            memory = tuple(m[image_index] for m in memory)
        word_log_probs = self.word_log_probs(memory, captions).gather(2, captions.unsqueeze(2)).squeeze(2)
        return (word_log_probs * caption_mask(captions)).sum(1)

    def next_word_log_probs(self, memory, words, state):
        log_probs, state = self.step(memory, words, state)
        allowed = log_probs.clone()
        allowed[:, [PAD, BOS]] = -math.inf  # never targets in training: never emitted (their mass stays in p)
        return log_probs, allowed, state

    def greedy(self, feats, max_len):
        """Most probable next word at each step: (captions (B, max_len), their log p(c|I) (B,))."""
        memory, batch, device = self.encode(feats), feats.shape[0], feats.device
        state = self.init_state(memory)
        words = torch.full((batch,), BOS, dtype=torch.long, device=device)
        captions = torch.full((batch, max_len), PAD, dtype=torch.long, device=device)
        total, done = torch.zeros(batch, device=device), torch.zeros(batch, dtype=torch.bool, device=device)
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
        """All images at once; a finished caption keeps its score and competes with the unfinished ones to the end."""
        batch, k, device = feats.shape[0], beam_size, feats.device
        memory = tuple(m.repeat_interleave(k, 0) for m in self.encode(feats))
        state = self.init_state(memory)
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

class ShowTell(Captioner):
    """NeuralTalk2 / Show and Tell (Vinyals et al. 2015): the projected fc feature (its regions' mean) goes first."""
    kind = "showtell"

    def __init__(self, vocab_size, feat_dim, rnn_size=512, emb_size=512, dropout=0.5):
        super().__init__(vocab_size, feat_dim, rnn_size, emb_size, dropout)
        self.image_embed = nn.Linear(feat_dim, emb_size)
        self.word_embed = self.word_embedding(vocab_size, emb_size)  # modules in this order: the RNG draws them so
        self.lstm = nn.LSTM(emb_size, rnn_size, batch_first=True)
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
    """Knowing when to look (Lu et al. 2017): LSTM input [w_t; v^g]; attention over the k regions and a visual sentinel
    s_t = sigmoid(W_x x_t + W_h h_{t-1}) * tanh(c_t); p_t = softmax(W_p tanh(c_hat_t + h_t))."""
    kind = "adaatt"

    def __init__(self, vocab_size, feat_dim, rnn_size=512, emb_size=512, dropout=0.5):
        super().__init__(vocab_size, feat_dim, rnn_size, emb_size, dropout)
        self.region_embed = nn.Sequential(nn.Linear(feat_dim, rnn_size), nn.ReLU())   # V = [v_1 .. v_k]
        self.global_embed = nn.Sequential(nn.Linear(feat_dim, emb_size), nn.ReLU())   # v^g
        self.word_embed = self.word_embedding(vocab_size, emb_size)
        self.lstm = nn.LSTMCell(2 * emb_size, rnn_size)
        self.W_x = nn.Linear(2 * emb_size, rnn_size)
        self.W_h = nn.Linear(rnn_size, rnn_size, bias=False)
        self.W_v = nn.Linear(rnn_size, rnn_size, bias=False)
        self.W_g = nn.Linear(rnn_size, rnn_size, bias=False)
        self.W_s = nn.Linear(rnn_size, rnn_size, bias=False)
        self.w_h = nn.Linear(rnn_size, 1, bias=False)
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
    """A frozen BatchNorm of region features (self-critical.pytorch's --use_bn): else small nets ignore the image."""
    sample = torch.from_numpy(np.array(features[:n], dtype=np.float32)).flatten(0, 1)
    sample = sample[torch.isfinite(sample).all(1)]  # a NaN image is reported by the training loop, not spread
    model.feat_mean.copy_(sample.mean(0))
    model.feat_std.copy_(sample.std(0).clamp_min(1e-6))
    return model

CAPTIONERS = {"showtell": ShowTell, "adaatt": AdaptiveAttention}

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
    """K rounds (K, B) of images whose captions are c_/t for I_t (Sec. 4.2): uniform over the *other* images."""
    if n_images < 2:
        raise DataError("contrastive learning needs at least two training images")
    offsets = rng.integers(1, n_images, size=(K, len(image_ids)))
    return (np.asarray(image_ids)[None, :] + offsets) % n_images

def contrastive_log_probs(target, reference, feats, pos_captions, neg_captions):
    """log p_m and log p_n of the positives (B,) and negatives (K, B): one forward a model, each image encoded once."""
    K, n_pos = neg_captions.shape[0], pos_captions.shape[0]
    captions = torch.cat([pos_captions, neg_captions.reshape(K * n_pos, -1)])
    image_index = own_images(feats.shape[0], feats.device).repeat(1 + K)
    logp_target = target(feats, captions, image_index)  # target: the captioner or its DDP wrapper
    with torch.no_grad():  # the reference is frozen (and in eval mode: no dropout)
        logp_ref = reference(feats, captions, image_index)
    return (logp_target[:n_pos], logp_ref[:n_pos], logp_target[n_pos:].reshape(K, n_pos),
            logp_ref[n_pos:].reshape(K, n_pos))

# --- Evaluation: caption metrics (Sec. 5) and self-retrieval (Sec. 4.1) ----------------------------
def self_retrieval_recall(logp, ks=(1, 5, 50, 500)):
    """logp[t, j] = log p(c_t | I_j) for the caption c_t generated for image t: recall@k (in %) of image t among the k
    images that give c_t the highest probability (Sec. 4.1), k capped by N. Ties count against the query (rank =
    the *other* images scoring >= the own one): an image-blind captioner scores 0, not 100; a NaN is a miss."""
    logp = torch.as_tensor(logp)
    n = len(logp)
    own = logp.diagonal()[:, None]
    other = ~torch.eye(n, dtype=torch.bool)
    rank = (~(logp < own) & other).sum(1)  # ~(x < own): x >= own, or either is NaN
    rank[own[:, 0].isnan()] = n  # beyond every k
    return {f"R@{k}": 100.0 * (rank < min(k, n)).double().mean().item() for k in ks}

@torch.no_grad()
def retrieval_log_probs(model, features, ids, captions, device, pairs_per_forward=4096):
    """The (N, N) log p(c_t | I_j) on the host, pairs_per_forward (caption, image) pairs a forward: fixed memory."""
    model.eval()
    parts = [model.encode(image_batch(features, ids[i:i + 500], device)) for i in range(0, len(ids), 500)]
    memory, n = tuple(torch.cat(p) for p in zip(*parts)), len(ids)
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
    decode = model.greedy if beam_size == 1 else functools.partial(model.beam_search, beam_size=beam_size)
    return torch.cat([decode(image_batch(features, ids[i:i + batch], device), max_len=args.max_words + 1)[0].cpu()
                      for i in range(0, len(ids), batch)])

def evaluate(model, features, captions, vocab, args, device, image_ids, results_file=None):
    """Caption metrics (Sec. 5), self-retrieval on the first --retrieval-images; results_file: scored from that file."""
    ids = np.arange(len(features))
    generated = generate_captions(model, features, ids, args, device, args.beam_size)
    candidates = [vocab.decode(c) for c in generated.tolist()]
    references = [captions[CAPS_PER_IMAGE * i:CAPS_PER_IMAGE * (i + 1)] for i in ids]
    results = [{"image_id": int(i), "caption": c} for i, c in zip(image_ids, candidates)]  # as the COCO test server
    if results_file is not None:
        write_atomically(results_file, lambda f: f.write(json.dumps(results).encode()), 0, "free some space there")
        results = str(results_file)
    scores = caption_metrics(references, image_ids, results)
    n = min(args.retrieval_images, len(ids))
    if n > 0:
        logp = retrieval_log_probs(model, features, ids[:n], generated[:n], device, args.pairs_per_forward)
        scores.update(self_retrieval_recall(logp))
    return scores, candidates

def validate(model, dev, vocab, args, device):
    """Per-epoch model selection: the CIDEr of greedy captions of the dev split."""
    from pycocoevalcap.cider.cider import Cider
    features, captions = dev
    ids = np.arange(min(args.val_images, len(features)))
    generated = generate_captions(model, features, ids, args, device)
    references = {i: [" ".join(tokenize(c)) for c in captions[CAPS_PER_IMAGE * i:CAPS_PER_IMAGE * (i + 1)]] for i in ids}
    return float(Cider().compute_score(references, {i: [vocab.decode(c)] for i, c in enumerate(generated.tolist())})[0])

# --- Training: MLE (Eq. 1) or CL (Eq. 10) -------------------------------------------------------------
def train(args, target, reference, train_data, dev, vocab, out_dir, keep):
    """MLE (reference None) or CL on the `keep` images; the best checkpoint's path. Rank 0 alone validates and saves."""
    rank, world_size, device = setup_ddp()
    (features, captions), model = train_data, target  # the loss calls the target, or its DDP wrapper
    if world_size > 1:
        torch.manual_seed(args.seed + rank)  # weights start equal (DDP broadcasts rank 0's), dropout differs
        model = DDP(target, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(target.parameters(), lr=args.lr, betas=(args.beta1, 0.999))
    run = start_run(args, target, reference, optimizer, vocab, out_dir, keep, (train_data, dev))  # --resume: last.pt's
    autocast = mixed_precision(device)  # bf16 on CUDA
    with signals_deferred(run):  # SIGINT, SIGTERM, SIGHUP: last.pt of this step (or this epoch's end), then exit
        for epoch in range(run.epoch, args.epochs):
            target.train()
            for global_ids, mine in batches(keep, epoch, run):  # this rank's share of a global batch; resumable
                ids = global_ids[mine]
                feats, pos = image_batch(features, ids, device), captions[ids].reshape(len(ids) * CAPS_PER_IMAGE, -1)
                with autocast:
                    if reference is None:  # MLE on the 5 ground-truth captions c_t of each image I_t
                        pos, = on_device(device, pos)
                        loss = mle_loss(model(feats, pos, own_images(len(ids), device)), pos)  # Eq. 1
                    else:  # CL: K rounds of captions c_/t of other images, drawn alike on every rank (Sec. 4.2)
                        rng = np.random.default_rng([args.seed, run.step])  # fresh each step, replayed by --resume
                        neg = captions[sample_negatives(global_ids, len(captions), args.K, rng)[:, mine]]
                        pos, neg = on_device(device, pos, neg.reshape(args.K, len(pos), -1))
                        log_probs = contrastive_log_probs(model, reference, feats, pos, neg)  # ln p_m, ln p_n
                        loss = cl_loss(*log_probs, args.nu, args.terms)  # -J (Eq. 10)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_value_(target.parameters(), args.grad_clip)  # as the authors' code
                optimizer.step()
                run.step += 1
                if after_step(run, loss, len(ids), epoch):  # progress; last.pt every --save-every; True at --max-steps
                    return finish(run)
            keep_best(run, epoch, dev)  # dev CIDEr; best.pt when it is the best so far
            if reference is not None and args.replace_ref_every and (epoch + 1) % args.replace_ref_every == 0:
                reference.load_state_dict(run.best_state)  # the best target so far becomes the reference (Sec. 4.3)
                if rank == 0:
                    print("reference replaced by the best target so far")
            save_last(run, epoch + 1)
            stop_on_signal(run, epoch + 1)
    return finish(run)

# --- Main ---------------------------------------------------------------------------------------------
def captioners(args, vocab, train_features, device):
    """(target, reference): a new captioner for MLE (reference None), or both from checkpoints for CL."""
    feat_dim = train_features.shape[2]
    if args.stage == "mle":
        target = CAPTIONERS[args.model](len(vocab), feat_dim, args.rnn_size, args.emb_size, args.dropout)
        return (target if args.raw_features else standardize_features(target, train_features)).to(device), None
    reference = load_captioner(args.ref, vocab, feat_dim, device, args.dataset)[0].eval().requires_grad_(False)
    target = load_captioner(args.init or args.ref, vocab, feat_dim, device, args.dataset)[0]
    if args.target_dropout is not None:
        target.dropout.p = target.kwargs["dropout"] = args.target_dropout
    shape = lambda m: (m.kind, {k: v for k, v in m.kwargs.items() if k != "dropout"})
    if args.replace_ref_every and shape(target) != shape(reference):
        raise DataError("--replace-ref-every needs target and reference of the same architecture")
    return target, reference

def test_report(args, best_path, test, vocab, device):
    """The test table: MLE alone, or the reference (and the target before CL, Table 5) and the CL target."""
    split, n = captioning_test_split(args.dataset), len(test[0])
    image_ids = load_image_ids(prepare_data(args.dataset, args.data_root), split, n)
    title = f"{split} split of {args.dataset} ({n} images; self-retrieval among {min(args.retrieval_images, n)}; " + (
        "PTB-tokenised COCO-official scores)" if ptb_available() else "not PTB-tokenised: java not found)")
    score = lambda path, results=None: evaluate(load_captioner(path, vocab, test[0].shape[2], device, args.dataset)[0],
                                                *test, vocab, args, device, image_ids, results)
    results = Path(best_path).with_name(f"captions_{split}_{Path(best_path).stem}_results.json")  # beside it
    target_scores, target_captions = score(best_path, results)
    if args.stage == "mle" or args.eval:
        print_table({Path(best_path).name if args.eval else "MLE": target_scores}, title)
        print(f"\ncaptions in COCO results format: {results}")
        if not args.eval:
            data = "" if args.dataset == "toy" and not args.data_root else f" --dataset {args.dataset}" + (
                f" --data-root {shlex.quote(args.data_root)}" if args.data_root else "")
            print(f"best checkpoint: {best_path}\nnext, contrastive learning against it:\n"
                  f"    python cl_captioning.py --ref {shlex.quote(str(best_path))}{data}")
        return target_scores
    columns = {"reference": score(args.ref)}  # the reference as it was before training
    if args.init and Path(args.init).resolve() != Path(args.ref).resolve():  # Table 5: the target before CL too
        columns["target before CL"] = score(args.init)
    columns["CL target"] = target_scores, target_captions
    print_table({name: scores for name, (scores, _) in columns.items()}, title)
    print(f"\nexamples (Figure 2): the first {args.examples} test images")
    for i in range(min(args.examples, n)):
        print(f"  image {i}: human:     {max(test[1][CAPS_PER_IMAGE * i:CAPS_PER_IMAGE * (i + 1)], key=len)}\n"
              f"           reference: {columns['reference'][1][i]}\n           target:    {target_captions[i]}")
    print(f"\nbest CL checkpoint: {best_path}\ncaptions in COCO results format: {results}")
    return {"reference": columns["reference"][0], "target": target_scores}

def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = setup_ddp()  # rank 0 of 1 unless started by torchrun
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    root, test_split = prepare_data(args.dataset, args.data_root), captioning_test_split(args.dataset)
    train_features, train_text = load_split(root, "train")
    vocab = Vocab.build((tokenize(c) for c in train_text), args.min_count)
    test = load_split(root, test_split)
    finite_images(test[0], test_split)  # up front: never a table computed from NaN
    require_memory(args, len(vocab), device)
    if args.eval:
        return test_report(args, args.eval, test, vocab, device) if rank == 0 else None
    dev = load_split(root, "dev")
    for split, features in (("dev", dev[0]), (test_split, test[0])):
        if features.shape[2] != train_features.shape[2]:
            raise DataError(f"{split} region features are {features.shape[2]}-dimensional, train's "
                            f"{train_features.shape[2]}; every split of --data-root must come from one detector")
    finite_images(dev[0][:args.val_images], "dev")
    keep = finite_images(train_features, "train", args.skip_nonfinite)
    target, reference = captioners(args, vocab, train_features, device)
    out_dir = Path(args.out_dir or f"runs/{args.stage}-{target.kind}-{args.dataset}")
    refuse_to_overwrite_inputs(args, out_dir)
    release = lock(out_dir) if rank == 0 else (lambda: None)  # one run per folder; fails now if it is not writable
    if rank == 0:
        print(f"{args.stage.upper()} on {args.dataset}, {world_size} process(es), {device}: {target.kind} with "
              f"{sum(p.numel() for p in target.parameters()):,} parameters, {len(vocab)} words, {len(keep)} training "
              f"images; " + ", ".join(f"{k} {getattr(args, k)}" for k in CONFIG_LINE[args.stage]) +
              f"; checkpoints in {out_dir}/", *(f"  departure: {line}" for line in departures(args)), sep="\n")
    try:
        best_path = train(args, target, reference, (train_features, encode_captions(vocab, train_text, args.max_words)),
                          dev, vocab, out_dir, keep)
    finally:
        release()
    return test_report(args, best_path, test, vocab, device) if rank == 0 else None

# --- Appendix: plumbing, not the paper (torchrun, checkpoints, lock, signals, checks, scoring wrappers) -------
RENDEZVOUS_S = 300  # how long the processes of one launch wait for each other at the start
SAVING = []  # the file being written now: a signal meanwhile is told to wait
# Flags a resumed run may change: where it writes, how long it runs, how fast, and what only the test table reads
RESUMABLE = {"out_dir", "resume", "save_every", "threads", "epochs", "max_steps", "eval", "data_root", "beam_size",
             "retrieval_images", "pairs_per_forward", "examples", "ref", "init"}

def setup_ddp():
    """(rank, world_size, device) from the variables torchrun sets, checked first; a plain run is rank 0 of 1."""
    env = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k in os.environ}
    number = {k: int(v) for k, v in env.items() if k != "MASTER_ADDR" and v.strip().isdigit() and len(v) < 10}
    rank, local_rank, world_size = number.get("RANK", 0), number.get("LOCAL_RANK", 0), number.get("WORLD_SIZE", 1)
    cuda, gpus = torch.cuda.is_available(), torch.cuda.device_count()
    problems = {f"{k}={v!r} is not a whole number": k not in number for k, v in env.items() if k != "MASTER_ADDR"}
    ranked = "RANK" in env or "LOCAL_RANK" in env
    problems |= {"RANK or LOCAL_RANK without WORLD_SIZE": ranked and "WORLD_SIZE" not in env,
                 f"RANK {rank} not below WORLD_SIZE {world_size}": "WORLD_SIZE" in number and rank >= world_size,
                 **{f"{k} missing": world_size > 1 and k not in env for k in ("MASTER_ADDR", "MASTER_PORT")},
                 f"LOCAL_RANK {local_rank} but {gpus} GPUs": cuda and local_rank >= gpus}
    if any(problems.values()):
        raise DataError(f"incomplete torchrun environment ({'; '.join(p for p, found in problems.items() if found)}); "
                        f"start with torchrun, or unset RANK, LOCAL_RANK and WORLD_SIZE")
    if world_size > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        try:  # rank 0 waits for the others (and they for it) RENDEZVOUS_S, not forever
            store = next(dist.rendezvous("env://", timeout=timedelta(seconds=RENDEZVOUS_S)))[0]
        except (RuntimeError, ValueError) as e:
            raise DataError(f"rank {rank}: the other processes did not join within {RENDEZVOUS_S} s at "
                            f"{env['MASTER_ADDR']}:{env['MASTER_PORT']} ({type(e).__name__}); start them all with "
                            f"torchrun, or check MASTER_ADDR and MASTER_PORT")
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(hours=1))  # rank 0 validates meanwhile
    return rank, world_size, torch.device(f"cuda:{local_rank}" if cuda else "cpu")

def mixed_precision(device, on_cpu=False):
    """bf16 autocast on CUDA (on the CPU only when asked: the tests rehearse the dtypes CUDA sees)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or on_cpu)

def epoch_order(n_images, seed, epoch, world_size=1):
    """Shuffled from (seed, epoch) alone: alike on every rank, replayed by --resume; padded as DistributedSampler."""
    order = np.random.default_rng([seed, epoch]).permutation(n_images)
    return np.concatenate([order, order[: -n_images % world_size]])

def rank_share(global_ids, rank, world_size):
    """Positions in a global batch that this rank trains on: contiguous, disjoint, sizes differ by <= 1."""
    return np.array_split(np.arange(len(global_ids)), world_size)[rank]

def batches(keep, epoch, run):
    """(global batch, this rank's positions in it) for the rest of the epoch; a progress bar in captions/s."""
    args = run.args
    order, global_batch = keep[epoch_order(len(keep), args.seed, epoch, run.world_size)], args.batch_images * run.world_size
    done = run.step - epoch * run.steps_per_epoch
    run.bar = tqdm(total=len(order) * CAPS_PER_IMAGE, unit="cap", unit_scale=True, dynamic_ncols=True,
                   desc=f"{args.stage} epoch {epoch + 1}/{args.epochs}", disable=run.rank != 0,
                   initial=min(done * global_batch, len(order)) * CAPS_PER_IMAGE)
    run.tick = time.perf_counter()
    for start in range(done * global_batch, len(order), global_batch):
        global_ids = np.sort(order[start:start + global_batch])
        yield global_ids, rank_share(global_ids, run.rank, run.world_size)
        run.bar.update(len(global_ids) * CAPS_PER_IMAGE)
    run.bar.close()

def on_device(device, *captions):  # cut to the longest caption: the rest is padding
    length = max(used_length(c) for c in captions)
    return [torch.from_numpy(c[..., :length]).to(device) for c in captions]

def start_run(args, target, reference, optimizer, vocab, out_dir, keep, data):
    """The run in one namespace: what a checkpoint holds and the loop's bookkeeping; --resume takes it from last.pt."""
    rank, world_size, device = setup_ddp()
    run = SimpleNamespace(args=args, target=target, reference=reference, optimizer=optimizer, vocab=vocab, rank=rank,
                          world_size=world_size, device=device, step=0, epoch=0, best_score=-math.inf, best_state=None,
                          last=out_dir / "last.pt", best=out_dir / "best.pt", pending=[], seen=0, seconds=0.0,
                          kept=f"nothing saved yet in {out_dir}", saved=None, signals=[],
                          loss_name="CL loss -J (Eq. 10)" if reference else "MLE loss (Eq. 1)",
                          steps_per_epoch=math.ceil(len(keep) / (args.batch_images * world_size)),
                          fingerprint=fingerprint(args, vocab, data, world_size))
    if args.resume:
        resume(run)
    return run

def after_step(run, loss, n_images, epoch):
    """Progress, speed; last.pt every --save-every steps and at --max-steps (then True); a signal ends the run."""
    now, args = time.perf_counter(), run.args
    run.seconds, run.tick, run.seen = run.seconds + now - run.tick, now, run.seen + n_images * CAPS_PER_IMAGE
    run.pending.append((run.step, loss.detach()))
    if run.step % 25 == 0:  # reading the loss waits for the device: not every step
        run.bar.set_postfix(loss=f"{check_finite_loss(run):.4f}", refresh=False)
    stop = bool(args.max_steps) and run.step >= args.max_steps
    if stop or args.save_every and run.step % args.save_every == 0 and run.step < (epoch + 1) * run.steps_per_epoch:
        save_last(run, epoch)  # mid-epoch: a kill -9 loses at most save_every steps
    stop_on_signal(run, epoch)
    return stop

@contextlib.contextmanager
def signals_deferred(run):
    """Signals only recorded while training: the loop acts after a step or an epoch's end, where last.pt is whole."""
    def record(signum, frame):
        run.signals.append(signum)
        if SAVING:
            os.write(2, f"\nstill saving {SAVING[-1]}; wait\n".encode())  # os.write: safe inside another print
    previous = {s: signal.signal(s, record) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    stop_on_signal(run, None)  # one that came after the last look: training is saved, stop before the test table

def stop_on_signal(run, epoch):
    """The first signal any rank got (a max over ranks: all agree): last.pt of this step, one line, exit 128+n."""
    signum = run.signals[0] if run.signals else 0
    if dist.is_initialized():
        flag = torch.tensor([signum], device=run.device)
        dist.all_reduce(flag, dist.ReduceOp.MAX)
        signum = int(flag.item())
    if not signum:
        return
    if run.saved != run.step and epoch is not None:
        save_last(run, epoch)
    if run.rank == 0:
        print(f"\ninterrupted by {signal.Signals(signum).name} at step {run.step}; {run.kept}; continue with the same "
              f"command plus --resume", flush=True)
    raise SystemExit(128 + signum)

def keep_best(run, epoch, dev):
    """Dev CIDEr, rank 0's for every rank; best.pt and the best weights when it is the best so far."""
    check_finite_loss(run)  # never a dev score or best.pt from non-finite weights
    box = [validate(run.target, dev, run.vocab, run.args, run.device) if run.rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    if box[0] > run.best_score:  # decided on rank 0's score: every rank keeps the same best_state
        run.best_score, run.best_state = box[0], {k: v.detach().clone() for k, v in run.target.state_dict().items()}
        if run.rank == 0:
            save_checkpoint(checkpoint(run, epoch + 1), run.best)
    if run.rank == 0:
        print(f"epoch {epoch + 1}: dev CIDEr {100 * box[0]:.1f} (best {100 * run.best_score:.1f})")

def finish(run):
    if run.seen and run.seconds > 0 and run.rank == 0:
        print(f"trained {run.seen} captions in {run.seconds:.0f}s: {run.seen / run.seconds:.0f} captions/s" +
              (f" over {run.world_size} processes" if run.world_size > 1 else ""))
    return run.best if run.best_score > -math.inf else run.last  # never a stale best.pt of an earlier run

def check_finite_loss(run):
    """The losses since the last look (returns the latest): a NaN or inf stops every rank before anything is saved."""
    values = torch.stack([loss for _, loss in run.pending]).float().cpu().tolist() if run.pending else []
    bad = [(step, value) for (step, _), value in zip(run.pending, values) if not math.isfinite(value)][:1]
    run.pending.clear()
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, bad)
        bad = sorted(sum(everyone, []))[:1]
    if bad:
        raise DataError(f"the loss became non-finite at step {bad[0][0]} ({run.loss_name} {bad[0][1]:.4g}); stopped, "
                        f"{run.kept}; try a lower --lr, or check the data")
    return values[-1] if values else math.nan

def fingerprint(args, vocab, data, world_size):
    """What decides a run's meaning, flat, stored in last.pt: --resume must meet the same."""
    digest = lambda data: hashlib.sha256(data).hexdigest()[:16]
    (features, captions), (dev_features, dev_text) = data
    prints = {f"--{k.replace('_', '-')}": str(v) for k, v in vars(args).items() if k not in RESUMABLE}
    prints.update({f"--{flag} file": digest(Path(getattr(args, flag)).read_bytes()) for flag in ("ref", "init")
                   if getattr(args, flag)})
    return prints | {"vocabulary": digest("\n".join(vocab.itos).encode()), "world size": str(world_size),
                     "train captions": digest(np.ascontiguousarray(captions).tobytes()), "train features": str(features.shape),
                     "dev captions": digest("\n".join(dev_text).encode()), "dev features": str(dev_features.shape)}

def checkpoint(run, epoch):
    """A plain dict (`epoch`: where a resumed run goes on); the reference too: it may have been replaced (Sec. 4.3)."""
    record = lambda model: {"kind": model.kind, "kwargs": model.kwargs, "state": model.state_dict()}
    return {"model": record(run.target), "vocab": run.vocab.itos, "args": vars(run.args), "stage": run.args.stage,
            "step": run.step, "epoch": epoch, "best_score": run.best_score, "optimizer": run.optimizer.state_dict(),
            "world_size": run.world_size, "reference": record(run.reference) if run.reference else None,
            "fingerprint": run.fingerprint}

def rng_states(run):
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state(run.device)] if run.device.type == "cuda" else [])

def save_last(run, epoch):
    """last.pt, never of NaN weights, with every rank's RNG states: a resumed run draws the same dropout masks."""
    check_finite_loss(run)
    ckpt, state = checkpoint(run, epoch), rng_states(run)
    ckpt["rng"] = [state] * run.world_size
    if dist.is_initialized():
        dist.all_gather_object(ckpt["rng"], state)  # a collective: on every rank
    if run.rank == 0:
        save_checkpoint(ckpt, run.last)
    run.kept, run.saved = f"{run.last} keeps step {run.step}", run.step
    if dist.is_initialized():
        dist.barrier()

def save_checkpoint(ckpt, path):
    write_atomically(path, lambda f: torch.save(ckpt, f), nbytes(ckpt), "free some space or pass another --out-dir")

def nbytes(obj):
    obj = list(obj.values()) if isinstance(obj, dict) else obj
    return obj.nbytes if torch.is_tensor(obj) else sum(map(nbytes, obj)) if isinstance(obj, (list, tuple)) else 0

def write_atomically(path, write, size, advice):
    """Via a flushed temporary file renamed over `path`: a kill -9 or a full disk leaves the old file or the new one."""
    path, tmp = Path(path), Path(path).with_name(f".{Path(path).name}.tmp")
    SAVING.append(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        os.fsync(folder)  # the rename itself reaches the disk
        os.close(folder)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        raise DataError(f"cannot write {path} ({getattr(e, 'strerror', None) or str(e).splitlines()[0][:80]}); it needs "
                        f"about {size / 2**20:,.0f} MB in {path.parent}; {advice}")
    finally:
        SAVING.pop()
        with contextlib.suppress(OSError):
            tmp.unlink()

def refuse_to_overwrite_inputs(args, out_dir):
    """A stage never writes over the checkpoints it reads: CL into the folder of its --ref would replace it."""
    outputs = {(out_dir / name).resolve() for name in ("best.pt", "last.pt")}
    for flag in ("ref", "init"):
        if getattr(args, flag) and Path(getattr(args, flag)).resolve() in outputs:
            raise DataError(f"--out-dir {out_dir} holds the --{flag} checkpoint {getattr(args, flag)}, which this run "
                            f"would overwrite; pass another --out-dir")

def lock(out_dir):
    """One run per --out-dir (returns its release); taken at once: the folder proves writable now, not an hour later."""
    def process_start(pid):  # /proc/<pid>/stat field 22: a pid reused by another process has another start time
        with contextlib.suppress(OSError, IndexError):
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        return "?"
    path, host = Path(out_dir) / ".lock", socket.gethostname()
    tmp = path.with_name(f".lock.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(f"{host} {os.getpid()} {process_start(os.getpid())}")
        while True:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
                return lambda: path.unlink(missing_ok=True)
            with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):  # unreadable or malformed: stale
                other_host, pid, start = path.read_text().split()
                pid, started = int(pid), time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
                if other_host != host or 0 < pid < 2**22 and pid != os.getpid() and process_start(pid) == start:
                    raise DataError(f"another run (pid {pid} on host {other_host}, started {started}) is using "
                                    f"{out_dir}; wait for it, or pass another --out-dir (if no run is using it, delete "
                                    f"{path})")
            path.unlink(missing_ok=True)
    except OSError as e:
        raise DataError(f"cannot write checkpoints to {out_dir} ({e.strerror or e}); pass --out-dir with a writable folder")
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()

def load_checkpoint(path, what=None):
    """A checkpoint read safely (weights_only: never runs a file's code); with `what`, one of this script's models."""
    if not Path(path).is_file():
        raise DataError(f"checkpoint {path} {'is not a file' if Path(path).exists() else 'not found'}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated, foreign or unsafe file: torch raises many types
        raise DataError(f"{path} is not a checkpoint this script can read safely ({type(e).__name__}); one written "
                        f"by an earlier release cannot be read: retrain")
    record = ckpt.get("model") if isinstance(ckpt, dict) else None
    if what and not (isinstance(record, dict) and record.get("kind") in CAPTIONERS and isinstance(ckpt.get("vocab"), list)
                     and all(isinstance(record.get(k), dict) for k in ("kwargs", "state"))):
        raise DataError(f"{path} is not {what}")
    return ckpt

def load_captioner(path, vocab, feat_dim, device, dataset):
    """A captioner rebuilt from a checkpoint's model record, checked against the data it will see."""
    ckpt = load_checkpoint(path, "a checkpoint written by cl_captioning.py")
    record = ckpt["model"]
    if record["kwargs"].get("feat_dim") != feat_dim:
        raise DataError(f"{path} expects {record['kwargs']['feat_dim']}-dimensional region features, but the "
                        f"{dataset} data has {feat_dim}; use a checkpoint trained on this dataset")
    if Vocab(ckpt["vocab"]) != vocab:
        raise DataError(f"{path} was trained with another vocabulary ({len(ckpt['vocab'])} words) than the {dataset} "
                        f"train split gives ({len(vocab)} words); use a checkpoint trained on this dataset")
    try:
        model = CAPTIONERS[record["kind"]](**record["kwargs"])
        model.load_state_dict(record["state"])
    except (TypeError, ValueError, RuntimeError, MemoryError) as e:
        raise DataError(f"{path} holds a {record['kind']} captioner this script cannot rebuild ({type(e).__name__})")
    if not all(v.isfinite().all() for v in model.state_dict().values() if v.is_floating_point()):
        raise DataError(f"{path} holds NaN or inf weights; use a checkpoint from before the loss went non-finite")
    return model.to(device), ckpt

def layout_difference(saved, expected, where):
    """Where `saved` is not laid out as `expected` (keys, lengths, tensor shapes and dtypes, types), or None."""
    if isinstance(expected, (list, tuple)) and isinstance(saved, (list, tuple)):
        if len(saved) != len(expected):
            return f"{where} has {len(saved)} entries, not {len(expected)}"
        saved, expected = dict(enumerate(saved)), dict(enumerate(expected))  # entry i compared as key i
    if isinstance(expected, dict) and isinstance(saved, dict):
        odd = sorted(map(str, saved.keys() - expected.keys())), sorted(map(str, expected.keys() - saved.keys()))
        if odd[0] or odd[1]:
            return f"{where} has {f'an unexpected key {odd[0][0]}' if odd[0] else f'no key {odd[1][0]}'}"
        return next(filter(None, (layout_difference(saved[k], v, f"{where}/{k}") for k, v in expected.items())), None)
    describe = lambda x: f"a {x.dtype} tensor {list(x.shape)}" if torch.is_tensor(x) else f"a {type(x).__name__}"
    if describe(saved) != describe(expected):
        return f"{where} is {describe(saved)}, not {describe(expected)}"

def resume(run):
    """Go on from last.pt of --out-dir as if never stopped, if it is this run's (its fingerprint) and whole."""
    ckpt = load_checkpoint(run.last, "a last.pt written by cl_captioning.py; pass another --out-dir")
    saved, now = ckpt.get("fingerprint"), run.fingerprint
    if not isinstance(saved, dict):
        raise DataError(f"{run.last} has no run fingerprint (an earlier release wrote it): it cannot be verified as this "
                        f"run; pass another --out-dir")
    changed = [key for key in now | saved if saved.get(key) != now.get(key)]
    if changed:  # the values are flags, digests and shapes: short
        raise DataError(f"{run.last} is another run: {changed[0]} was {saved.get(changed[0])}, now "
                        f"{now.get(changed[0])}; resume with the same data and flags, or pass another --out-dir")
    expected = checkpoint(run, 0) | {"args": ckpt.get("args"), "rng": [rng_states(run)] * run.world_size}  # its layout
    expected["optimizer"]["state"] = {i: {"step": torch.tensor(0.0), "exp_avg": p, "exp_avg_sq": p}
                                      for i, p in enumerate(run.target.parameters())}  # Adam's, of every parameter
    if damage := layout_difference(ckpt, expected, "last.pt"):
        raise DataError(f"{run.last} is damaged: {damage}; pass another --out-dir")
    run.target.load_state_dict(ckpt["model"]["state"])
    if run.reference is not None:
        run.reference.load_state_dict(ckpt["reference"]["state"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"][run.rank][0])
    if run.device.type == "cuda":
        torch.cuda.set_rng_state(ckpt["rng"][run.rank][1], run.device)
    run.step, run.epoch, run.best_score = ckpt["step"], ckpt["epoch"], ckpt["best_score"]
    run.kept, run.saved = f"{run.last} keeps step {run.step}", run.step
    if run.reference is not None and run.args.replace_ref_every and run.best_score > -math.inf:
        run.best_state = load_checkpoint(run.best)["model"]["state"]  # written by this run with best_score
    if run.rank == 0:
        print(f"resuming {run.last} at step {run.step} (epoch {run.epoch + 1})")

def require_memory(args, vocab_size, device):
    """A step's or a self-retrieval forward's word log-probs that cannot fit are refused before anything is allocated."""
    total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
             else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    per_caption, rounds = (args.max_words + 1) * vocab_size * 4, 1 + args.K * (args.stage == "cl")  # float32 bytes
    for needed, what in ((per_caption * rounds * CAPS_PER_IMAGE * args.batch_images,
                          f"a step's word log-probs ({args.batch_images} images x 5 captions x {rounds})"),
                         (per_caption * args.pairs_per_forward, f"--pairs-per-forward {args.pairs_per_forward}")):
        if needed > total:
            raise DataError(f"{what} would need {needed / 2**30:,.0f} GiB, more than the {total / 2**30:,.0f} GiB "
                            f"of {device.type}")

def captioning_test_split(dataset):
    """Karpathy's 5,000 COCO test images are SCAN's testall (its test: the first 1,000); Flickr30K's are test."""
    return "testall" if dataset == "coco" else "test"

def caption_metrics(references, image_ids, results):
    """COCOEvalCap.evaluate without SPICE (it downloads models at run time); without Java, [a-z]+ tokens, no METEOR."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    from pycocotools.coco import COCO
    coco = COCO()  # the references, in memory: image image_ids[i] has the captions references[i]
    coco.dataset = {"images": [{"id": int(i)} for i in image_ids],
                    "annotations": [{"id": len(image_ids) * k + n, "image_id": int(i), "caption": caption}
                                    for n, (i, refs) in enumerate(zip(image_ids, references))
                                    for k, caption in enumerate(refs)]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints a line per index it builds
        coco.createIndex()
        coco_res = coco.loadRes(results)
    gts, res = ({i: c.imgToAnns[i] for i in coco.getImgIds()} for c in (coco, coco_res))
    if ptb_available():
        gts, res = (PTBTokenizer().tokenize(d) for d in (gts, res))
    else:
        warn_no_java()
        gts, res = ({i: [" ".join(tokenize(a["caption"])) for a in anns] for i, anns in d.items()} for d in (gts, res))
    scores = {f"BLEU-{n + 1}": b for n, b in enumerate(Bleu(4).compute_score(gts, res, verbose=0)[0])}
    if ptb_available():
        scores["METEOR"] = meteor(gts, res)
    return scores | {"ROUGE-L": Rouge().compute_score(gts, res)[0], "CIDEr": Cider().compute_score(gts, res)[0]}

def ptb_available():
    return shutil.which("java") is not None

@functools.lru_cache(maxsize=None)
def warn_no_java():
    print("warning: not PTB-tokenised: java not found: scores use [a-z]+ tokens (not COCO-official), without METEOR",
          file=sys.stderr)

@functools.lru_cache(maxsize=None)
def meteor_scorer():
    """One METEOR java process for the whole run: starting one takes seconds."""
    from pycocoevalcap.meteor.meteor import Meteor
    return Meteor()

def meteor(gts, res):
    scorer = meteor_scorer()
    try:
        return scorer.compute_score(gts, res)[0]
    except BaseException:  # Ctrl-C mid-score leaves pycocoevalcap's lock held: its __del__ would wait forever at exit
        scorer.meteor_p.kill()
        scorer.lock.release() if scorer.lock.locked() else None
        meteor_scorer.cache_clear()
        raise

def print_table(columns, title):
    """Metrics side by side: columns = {name: {metric: value}}; caption metrics x100 as in papers."""
    print(f"\n{title}\n{'metric':<10}" + "".join(f"{name:>18}" for name in columns))
    for metric in next(iter(columns.values())):
        scale = 1 if metric.startswith("R@") else 100
        print(f"{metric:<10}" + "".join(f"{scale * columns[name][metric]:>18.1f}" for name in columns))

if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
