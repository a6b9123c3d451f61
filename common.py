"""What cl_captioning.py and coder_retrieval.py share as data: the vocabulary, captions and region
features in the standard precomputed layout, and the toy world, a small dataset in that layout that
makes both scripts run offline in minutes.

The precomputed layout (SCAN, VSE-infinity and their successors):
    {root}/{split}_ims.npy   float32 (N, R, D) region features, one row per image
    {split}_caps.txt         one caption a line, 5 consecutive lines per image (image = line // 5)
"""
import json
import math
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CAPS_PER_IMAGE = 5
HERE = Path(__file__).resolve().parent


class DataError(Exception):
    """A problem the user can fix (missing file, wrong shape, wrong value): one sentence."""


# --- Vocabulary -----------------------------------------------------------------------------

def tokenize(text):
    """Lowercase alphabetic tokens, as both papers preprocess captions."""
    return re.findall(r"[a-z]+", text.lower())


class Vocab:
    def __init__(self, itos):
        self.itos = list(itos)
        self.stoi = {word: i for i, word in enumerate(self.itos)}

    @classmethod
    def build(cls, token_lists, min_count=5):
        """Words seen fewer than `min_count` times become <unk>; ids ordered by count, then word."""
        counts = Counter(word for tokens in token_lists for word in tokens)
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        if not kept:  # e.g. captions in a script without [a-z] letters: nothing to caption with
            raise DataError(f"no word occurs {min_count} times in the training captions (words are [a-z] letters, "
                            f"lowercased); check the caption files, or lower --min-count")
        return cls(SPECIALS + kept)

    def __len__(self):
        return len(self.itos)

    def __eq__(self, other):
        return isinstance(other, Vocab) and self.itos == other.itos

    def encode(self, tokens, max_len):
        """Word ids then <eos>, cut so that <eos> fits in max_len, padded with <pad>. No <bos>."""
        ids = [self.stoi.get(word, UNK) for word in tokens[: max_len - 1]] + [EOS]
        return ids + [PAD] * (max_len - len(ids))

    def encode_batch(self, texts, max_len):
        return np.array([self.encode(tokenize(t), max_len) for t in texts], dtype=np.int64).reshape(-1, max_len)

    def decode(self, ids):
        words = []
        for i in map(int, ids):
            if i == EOS:
                break
            if i not in (PAD, BOS):
                words.append(self.itos[i])
        return " ".join(words)


# --- Features and captions in the precomputed layout ----------------------------------------

WHERE_DATA_COMES_FROM = ("use --dataset toy, or download the precomputed bottom-up features "
                         "(e.g. SCAN's data.zip with f30k_precomp/ and coco_precomp/) and pass --data-root")


def load_split(root, split):
    """Region features as a memory map (COCO train is ~33 GB: never read it whole) and captions."""
    root = Path(root)
    ims_path, caps_path = root / f"{split}_ims.npy", root / f"{split}_caps.txt"
    for path in (ims_path, caps_path):
        if not path.is_file():
            raise DataError(f"{path} not found; {WHERE_DATA_COMES_FROM}")
    try:
        features = np.load(ims_path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{ims_path} is not a readable .npy file ({e or 'empty'})")
    if not isinstance(features, np.ndarray):  # np.load opens an .npz archive too, whatever the file's name
        raise DataError(f"{ims_path} is an .npz archive, not one .npy array; save the features with np.save")
    if features.ndim != 3 or features.dtype.kind != "f" or 0 in features.shape:
        raise DataError(f"{ims_path} must hold float region features shaped (images, regions, dim), "
                        f"got {features.dtype} {features.shape}")
    captions = read_captions(caps_path)
    if len(captions) != CAPS_PER_IMAGE * len(features):
        raise DataError(f"{caps_path} has {len(captions)} captions for {len(features)} images in "
                        f"{ims_path.name}; the layout needs exactly {CAPS_PER_IMAGE} per image")
    return features, captions


def read_captions(path):
    """One caption a line, UTF-8; blank lines at the end of the file (an editor's) are dropped, a blank
    line anywhere else would shift every later caption to the wrong image and is refused."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); save it as UTF-8")
    captions = text.splitlines()
    while captions and not captions[-1].strip():
        captions.pop()
    for line, caption in enumerate(captions, 1):
        if not caption.strip():
            raise DataError(f"line {line} of {path} is empty (image {(line - 1) // CAPS_PER_IMAGE}); "
                            f"every image needs {CAPS_PER_IMAGE} non-empty captions")
    return captions


def load_image_ids(root, split, n_images):
    """COCO / Flickr image ids from SCAN's {split}_ids.txt, a line per image or per caption (5 equal lines an
    image); without the file, the row index."""
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


def nonfinite_images(features, chunk=64):
    """Indices of the images whose region features hold NaN or inf in float32, the dtype the models
    compute in: one sequential pass over the memory map, `chunk` images at a time."""
    bad = [np.zeros(0, dtype=np.int64)]
    for start in range(0, len(features), chunk):
        with np.errstate(over="ignore"):  # a float64 value past float32's range becomes inf: that is the point
            block = np.asarray(features[start:start + chunk], dtype=np.float32)
        bad.append(start + np.flatnonzero(~np.isfinite(block).reshape(len(block), -1).all(1)))
    return np.concatenate(bad)


def some_ids(ids, shown=10):
    """'3, 17, 42 and 5 more'."""
    ids = [int(i) for i in ids]
    return ", ".join(map(str, ids[:shown])) + (f" and {len(ids) - shown} more" if len(ids) > shown else "")


def finite_images(features, split, skip_nonfinite=False):
    """The images of a split a model may read: a NaN or inf image is refused (what a model computes from
    it is NaN), or with skip_nonfinite left out. One pass over the file, before anything is trained."""
    bad = nonfinite_images(features)
    if len(bad) and not skip_nonfinite:
        hint = " or pass --skip-nonfinite" if split == "train" else ""
        in_float32 = "" if features.dtype == np.float32 else " in float32"  # 1e300 in float64 is inf in float32
        raise DataError(f"{split} images {some_ids(bad)} hold NaN or inf region features{in_float32} ({len(bad)} of "
                        f"{len(features)}); repair {split}_ims.npy{hint}")
    if len(bad) == len(features):
        raise DataError(f"every {split} image holds NaN or inf region features")
    if len(bad) and int(os.environ.get("RANK", 0)) == 0:
        print(f"--skip-nonfinite: left out {len(bad)} of {len(features)} {split} images ({some_ids(bad)})")
    return np.setdiff1d(np.arange(len(features)), bad)


def image_batch(features, ids, device):
    """Rows `ids` of a memory-mapped (N, R, D) array as a tensor. Reading them in sorted order keeps
    the disk access sequential on COCO-sized files; on CUDA the copy goes through pinned memory and
    does not block the host."""
    ids, device = np.asarray(ids), torch.device(device)
    order = np.argsort(ids)
    rows = np.empty((len(ids),) + features.shape[1:], dtype=np.float32)
    rows[order] = features[ids[order]]
    rows = torch.from_numpy(rows)
    if device.type == "cuda":
        return rows.pin_memory().to(device, non_blocking=True)
    return rows.to(device)


def prepare_data(dataset, data_root=None):
    """The folder holding `dataset`; the toy world is generated there on first use."""
    defaults = {"toy": "data/toy", "coco": "data/coco_precomp", "flickr30k": "data/f30k_precomp"}
    root = Path(data_root) if data_root else HERE / defaults[dataset]
    if dataset == "toy" and not root.exists():
        print(f"building the toy world in {root} ...")
        building = root.with_name(f"{root.name}.building-{os.getpid()}")
        try:
            make_toy_world(building)
        except OSError as e:
            raise DataError(f"cannot build the toy world in {root} ({e.strerror or e}); pass --data-root with a "
                            f"writable folder")
        try:  # build aside, then rename: two scripts started at once never see half a world
            os.rename(building, root)
        except OSError:
            shutil.rmtree(building)
    if not root.is_dir():
        raise DataError(f"data folder {root} not found; {WHERE_DATA_COMES_FROM}")
    return root


# --- The toy world ---------------------------------------------------------------------------
# A small synthetic world in the real layout, built so that the papers' effects can show. A place draws
# the scene's objects (a beach: surfers, kites, dogs), the main one draws its companions (a dog: a
# frisbee); 40% of the other objects are weak in the features (small, occluded) though captions name
# them. Captions range from generic (shared content, varied wording) to detailed.

CATEGORIES = [  # (nouns used interchangeably in captions)
    ("man", "guy", "gentleman"), ("woman", "lady"), ("child", "kid"),
    ("dog", "puppy", "pup"), ("cat", "kitten", "kitty"), ("horse", "pony"), ("bird",), ("cow",), ("sheep",),
    ("car",), ("bus",), ("truck",), ("bicycle", "bike"), ("boat",),
    ("kite",), ("surfboard",), ("umbrella",), ("frisbee",), ("ball",), ("snowboard",), ("sled",),
    ("bench",), ("table",), ("couch", "sofa"), ("tv", "television"), ("stove", "oven"), ("pizza",), ("cake",),
]
KINDS = [("person", 3), ("animal", 6), ("vehicle", 5), (None, 14)]  # the word a caption may use instead; how many
KIND = [kind for kind, n in KINDS for _ in range(n)]
INDEX = {nouns[0]: i for i, nouns in enumerate(CATEGORIES)}
PLACES = [  # (name, phrases ending a caption, its categories, most frequent first)
    ("beach", ("on the beach", "on the sand", "by the ocean"), "man surfboard kite woman dog umbrella child bird ball"),
    ("kitchen", ("in a kitchen", "in the kitchen"), "woman man table stove cake pizza cat child"),
    ("street", ("on a street", "on a city street", "on the road"), "car man bus truck woman bicycle dog child"),
    ("park", ("in a park", "on the grass"), "dog man child frisbee bench woman ball bird bicycle kite"),
    ("field", ("in a field", "on a farm", "in a grassy field"), "horse cow sheep man dog bird child"),
    ("snowy hill", ("in the snow", "on a ski slope", "on a snowy hill"), "man snowboard child sled woman dog"),
    ("living room", ("in a living room", "in a room"), "cat couch tv dog woman man child table"),
    ("lake", ("on the water", "on a lake", "near the water"), "boat man bird dog woman child"),
]
COMPANIONS = {  # what the main object brings along: 4x as likely among what its place holds
    "man": "surfboard kite bicycle horse snowboard boat", "woman": "umbrella dog horse cake bicycle",
    "child": "kite ball sled cake dog", "dog": "frisbee ball man child", "cat": "couch tv", "horse": "man woman",
    "cow": "sheep", "car": "truck bus", "bus": "car", "table": "pizza cake", "couch": "tv cat", "tv": "couch",
}
USES = {  # what a person does with the second object, one word each (captions stay within 16 words)
    "surfboard": ("riding", "carrying"), "snowboard": ("riding", "carrying"), "sled": ("riding",), "horse": ("riding",),
    "bicycle": ("riding",), "boat": ("riding",), "kite": ("flying", "holding"), "umbrella": ("holding",),
    "frisbee": ("holding",), "ball": ("holding",), "cake": ("holding",),
}
POSTURES = {"person": ("standing", "sitting", "walking", "posing", "waiting", ""),
            "animal": ("standing", "sitting", "laying", "walking", "resting", ""),
            "vehicle": ("parked", "moving", "waiting", ""), None: ("sitting", "laying", "")}
RELATIONS = ["with", "near", "beside", "by", "and"]
COLOURS = ["red", "blue", "green", "yellow", "orange", "black", "white", "brown", "grey"]
ANIMAL_COLOURS = [5, 6, 7, 8]  # no blue dogs
SIZES = [("small", "little"), ("large", "big")]
POSITIONS = ["on the left", "on the right", "in the middle"]
PREFIXES = ["", "", "a photo of ", "a picture of ", "an image of ", "there is ", "this is ", "a view of ", "here is ",
            "a close up of "]
TAILS = ["", "", " today", " in the afternoon", " on a sunny day", " in the sun"]
VAGUE = 0.2  # a caption calls its main object 'a person', 'an animal': named in ~4 of 5 captions, as in COCO
WEAK = 0.4
LEVELS = [0, 0, 1, 2, 3]  # specificity of the 5 captions of an image


def _a(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def _describe(obj, rng, colour=True, size=False, vague=False, the=False):
    """'a small red kite'; people wear the colour: 'a small man in red'."""
    kind = KIND[obj["category"]]
    noun = kind if vague and kind else rng.choice(CATEGORIES[obj["category"]])
    words = " ".join(([rng.choice(SIZES[obj["size"]])] if size else [])
                     + ([COLOURS[obj["colour"]]] if colour and kind != "person" else []) + [noun])
    text = "the " + words if the else _a(words)
    worn = f" {rng.choice(['in', 'in', 'wearing'])} {COLOURS[obj['colour']]}" if colour and kind == "person" else ""
    return text + worn


def _caption(scene, level, rng, vague=None):
    """Level 0 names the main object and the place; 1 adds its colour; 2 the second object and its
    colour; 3 also the main object's size and a third object (alone: its position). `vague`: the main
    object by its kind; drawn with probability VAGUE when None."""
    main, others = scene["objects"][0], scene["objects"][1:]
    vague = rng.random() < VAGUE if vague is None else vague
    text = _describe(main, rng, colour=level > 0, size=level == 3, vague=vague, the=rng.random() < 0.3)
    if level >= 2 and others:
        uses = USES.get(CATEGORIES[others[0]["category"]][0]) if KIND[main["category"]] == "person" else None
        text += f" {rng.choice(uses or RELATIONS)} {_describe(others[0], rng)}"
        if level == 3 and len(others) >= 2:
            text += f" and {_describe(others[1], rng, colour=False)}"
    else:
        posture = rng.choice(POSTURES[KIND[main["category"]]])
        text += f"{rng.choice(['', ' is'])} {posture}" if posture else ""
        text += f" {POSITIONS[main['position']]}" if level == 3 else ""
    name, phrases, _ = PLACES[scene["place"]]
    while True:  # the wording varies so that images rarely share a caption word for word, as in COCO
        phrase, prefix, tail = rng.choice(phrases), rng.choice(PREFIXES), rng.choice(TAILS)
        forms = [prefix + f"{text} {phrase}", prefix + f"{_a(name)} with {text}", f"{phrase}, {text}"]
        caption = forms[rng.choice(3, p=[0.5, 0.25, 0.25])] + tail
        words = tokenize(caption)
        if len(words) <= 16 and words.count("is") <= 1:  # the papers' limit; not 'there is a man is sitting'
            return caption


def _scene(rng):
    """The place draws the main object, the main object favours its companions among the rest."""
    place = int(rng.integers(len(PLACES)))
    held = [INDEX[name] for name in PLACES[place][2].split()]
    weights = 1.0 / np.arange(1, len(held) + 1)  # Zipf within the place
    n_objects = min(len(held), rng.choice([1, 2, 3, 4], p=[0.2, 0.4, 0.25, 0.15]))
    chosen = [rng.choice(len(held), p=weights / weights.sum())]
    companions = COMPANIONS.get(CATEGORIES[held[chosen[0]]][0], "").split()
    weights *= [4.0 if CATEGORIES[c][0] in companions else 1.0 for c in held]
    while len(chosen) < n_objects:
        weights[chosen[-1]] = 0
        chosen.append(rng.choice(len(held), p=weights / weights.sum()))
    objects = [{"category": held[c], "size": int(rng.integers(len(SIZES))),
                "colour": int(rng.choice(ANIMAL_COLOURS if KIND[held[c]] == "animal" else len(COLOURS))),
                "position": int(rng.integers(len(POSITIONS))), "weak": bool(k > 0 and rng.random() < WEAK)}
               for k, c in enumerate(chosen)]
    return {"objects": objects, "place": place}


def _regions(scene, directions, rng, regions, dim, noise=0.6):
    """The main object gives 3 jittered detector boxes, stronger ones, the others 1-2 each (the
    main object is the salient one, which captions name first), a weak one a single faint box; the
    rest are place and clutter."""
    rows = []
    for k, obj in enumerate(scene["objects"]):
        signal = (directions["category"][obj["category"]] + 0.6 * directions["colour"][obj["colour"]]
                  + 0.4 * directions["size"][obj["size"]] + 0.4 * directions["position"][obj["position"]])
        boxes, strength = (3, 1.3) if k == 0 else (1, 0.35) if obj["weak"] else (rng.integers(1, 3), 1.0)
        rows += [signal * strength * rng.uniform(0.8, 1.2) for _ in range(boxes)]
    rows = rows[: regions - 2]  # at least two boxes of background
    rows += [directions["place"][scene["place"]]] * ((regions - len(rows) + 1) // 2)
    clutter = 0.5 * rng.standard_normal((regions - len(rows), dim)) / np.sqrt(dim)
    features = np.concatenate([np.stack(rows), clutter])
    features += noise * rng.standard_normal((regions, dim)) / np.sqrt(dim)
    # bottom-up features are post-ReLU; detector order carries no meaning
    return np.maximum(features, 0)[rng.permutation(regions)]


def make_toy_world(root, seed=0, n_train=3000, n_dev=300, n_test=500, regions=12, dim=128, levels=LEVELS):
    """Write train/dev/test of the toy world to `root` in the precomputed layout, plus
    {split}_scenes.json (each image's scene and its captions' specificity levels). `levels`: the
    specificity of each image's 5 captions (0 generic ... 3 detailed)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def unit_rows(n):
        rows = rng.standard_normal((n, dim))
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    directions = {"category": unit_rows(len(CATEGORIES)), "colour": unit_rows(len(COLOURS)),
                  "size": unit_rows(len(SIZES)), "position": unit_rows(len(POSITIONS)),
                  "place": unit_rows(len(PLACES))}
    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        scenes = [_scene(rng) for _ in range(n)]
        features = np.stack([_regions(s, directions, rng, regions, dim) for s in scenes]).astype(np.float32)
        captions = []
        for scene in scenes:
            scene["levels"] = [int(level) for level in rng.permutation(levels)]
            captions += [_caption(scene, level, rng) for level in scene["levels"]]
        np.save(root / f"{split}_ims.npy", features)
        (root / f"{split}_caps.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
        (root / f"{split}_scenes.json").write_text(json.dumps(scenes))


# --- The toy world's ceiling ---------------------------------------------------------------
# A caption says only its scene's content words; synonyms, prefixes, verbs, relation words and the place's
# wording are drawn at random. So no model can tell apart two images whose scenes can say the same content:
# ranking by content alone, ties in random order, is the best R@1 (both ways) and t2i R@K any model can expect.

SYNONYMS = {alt: group[0] for group in CATEGORIES + SIZES for alt in group}
FILLER = {"a", "an", "the", "in", "wearing", *" ".join(PREFIXES).split(), *RELATIONS, *sum(USES.values(), ()),
          *sum(POSTURES.values(), ())}


def caption_content(text):
    """What a toy caption says about its scene: its words less articles, prefixes, verbs, relation words
    and synonyms, its place last ('a photo of a beach with a little puppy sitting' -> ('dog', '<place0>'))."""
    place = None
    for tail in filter(None, TAILS):
        text = text.removesuffix(tail)
    for i, (name, phrases, _) in enumerate(PLACES):
        if f"{_a(name)} with " in text:
            text, place = text.replace(f"{_a(name)} with ", "", 1), i
        for phrase in phrases:
            if text.endswith(" " + phrase):
                text, place = text[: -len(phrase)], i
            if text.startswith(phrase + ", "):
                text, place = text[len(phrase) + 2:], i
    return tuple(SYNONYMS.get(word, word) for word in text.split() if word not in FILLER) + (f"<place{place}>",)


def sayable(scene):
    """The contents a scene's captions can say: each level, naming the main object or its kind."""
    rng = np.random.default_rng(0)  # draws only what caption_content drops
    return {caption_content(_caption(scene, level, rng, vague)) for level in range(4) for vague in (False, True)}


def oracle_recall(scenes, captions, ks=(1, 5, 10)):
    """Expected R@K (%) of the content oracle on a toy split, i2t and t2i. t2i: the caption's image is
    one of the n_c images whose scene can say the caption, in random order: min(K, n_c) / n_c.
    i2t: an image ranks the captions its scene can say by P(image | caption) = 1 / n_c; within the
    first score tier holding one of its own captions (a own, b others, after `above` captions of
    higher tiers), the first own caption lies in the top K with probability 1 - C(b, r) / C(a + b, r),
    r = K - above."""
    says = [sayable(scene) for scene in scenes]
    contents = [caption_content(text) for text in captions]
    consistent = np.array([[content in say for say in says] for content in contents])  # captions x images
    own = np.repeat(np.arange(len(scenes)), len(captions) // len(scenes))
    if not consistent[np.arange(len(own)), own].all():
        raise ValueError("a caption its own scene cannot say: not a toy split made by make_toy_world")
    n_c = consistent.sum(1)
    t2i = (100 * np.minimum(np.array(ks)[None, :], n_c[:, None]) / n_c[:, None]).mean(0)  # a caption's own of n_c
    i2t = np.zeros(len(ks))
    for i in range(len(scenes)):
        tiers = {}  # n_c -> [own, other] captions that image i's scene can say (score 1 / n_c)
        for c in np.nonzero(consistent[:, i])[0]:
            tiers.setdefault(int(n_c[c]), [0, 0])[int(own[c] != i)] += 1
        above = 0
        for n in sorted(tiers):
            a, b = tiers[n]
            if a:
                break
            above += b
        for j, k in enumerate(ks):
            r = k - above
            i2t[j] += 0.0 if r <= 0 else 1.0 - (math.comb(b, r) / math.comb(a + b, r) if r <= b else 0.0)
    return {"i2t": [float(v) for v in 100 * i2t / len(scenes)], "t2i": [float(v) for v in t2i]}


def toy_ceiling(root, split):
    """oracle_recall of a split made by make_toy_world; None for other data (no scenes file, or
    captions edited since)."""
    path = Path(root) / f"{split}_scenes.json"
    if not path.exists():
        return None
    try:
        return oracle_recall(json.loads(path.read_text()), load_split(root, split)[1])
    except (ValueError, KeyError, TypeError, IndexError, ZeroDivisionError, AttributeError):  # not a toy world's
        return None
