"""Scenes: a synthetic compositional image–caption benchmark that needs no download.

Each image holds 1–4 objects with a shape (or a Fashion-MNIST item), a colour and a size,
on a plain or lightly textured background. Captions name the objects with their
attributes and the spatial relations between them, from a small fixed grammar that
`scene_satisfies` parses back, so every caption can be checked against the scene graph.
The test split also carries hard-negative captions (attribute swaps, relation flips,
replaced objects), each verified false, to probe whether a student binds attributes to
objects and understands relations rather than matching bags of words.

Flavours:
    shapes    procedural PIL shapes (circle, square, triangle, ...); PIL and numpy only
    fashion   Fashion-MNIST item photos tinted with the object colour; the IDX files come
              from Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist)
              or from `fashion_path`. Train images feed the train split, t10k the test.

Output is img2dataset's WebDataset layout:
    OUT/scenes.json               manifest: generator version, config, counts
    OUT/{split}/00000.tar ...     KEY.png (or .jpg), KEY.txt (first caption), KEY.json
    OUT/{split}/stats.json        per-split summary (object, attribute, relation counts)

Everything is a pure function of (config, seed): each sample's RNG is built from
[seed, split id, index], so a sample does not depend on the shard it lands in, and the
tar members carry fixed metadata, so two runs write byte-identical shards. Every file is
written through hierdctl.atomic (temporary name, fsync, rename): a killed run leaves
complete files or none, never a torn shard.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .atomic import write_json_atomic, write_tar_atomic
from .errors import UserError

# Bump when a change alters the bytes generated for a given config and seed.
# 1.1: shards and JSON files written through hierdctl.atomic (tar members now carry the
# user and group name "hierdctl"; JSON keys sorted); member bytes are unchanged from 1.0.
GENERATOR_VERSION = "1.1"

FLAVOURS = ("shapes", "fashion")
SHAPES = ("circle", "square", "triangle", "cross", "star", "ring", "diamond", "hexagon")
# In label order: FASHION_ITEMS[label] names a Fashion-MNIST class.
FASHION_ITEMS = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
# Saturated colours only: each stays far from the light grey background and from the
# others, also after the fashion flavour darkens it by up to 30% for the item's shading.
COLOURS = {
    "red": (220, 30, 30),
    "orange": (245, 130, 0),
    "yellow": (235, 205, 0),
    "green": (30, 160, 50),
    "cyan": (0, 185, 205),
    "blue": (30, 70, 220),
    "purple": (130, 50, 180),
    "pink": (240, 100, 180),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
# An object's side as a fraction of the image side. At 64 px: 13 and 22 px.
SIZE_FRACTION = {"small": 0.2, "large": 0.34}
RELATIONS = ("left of", "right of", "above", "below")
FLIPPED = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# A relation holds only when the centres differ by at least this fraction of the image
# side along its axis, so no stated relation is a judgement call (8 px at 64 px).
RELATION_MARGIN = 0.125
MIN_OBJECTS, MAX_OBJECTS = 1, 4
NUMBER_WORDS = ("one", "two", "three", "four")
SPLIT_IDS = {"train": 0, "test": 1}
NEGATIVE_KINDS = ("swap_attribute", "swap_relation", "replace_object")
IMAGE_FORMATS = ("png", "jpg")
DEFAULT_FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_FILES = {  # split -> (images, labels) base names; a ".gz" twin is also accepted
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: smooth, deterministic edges
TEXTURE_AMPLITUDE = 10  # grey levels of the smooth background mottling
GRAIN_AMPLITUDE = 3  # grey levels of the per-pixel grain on top
INK_THRESHOLD = 8  # Fashion-MNIST pixels at or below this are background
PLACEMENT_ATTEMPTS = 200  # whole-scene restarts; in practice one or two are needed
POSITION_TRIES = 40  # positions tried per object before the scene restarts
MAX_SAMPLES_PER_SPLIT = 10**9 - 1  # keys are nine digits
MAX_SHARDS = 10**5  # shard names are five digits

# Caption templates. Relation forms with "is" make a sentence and take no prefix; the
# others read as a noun phrase, so a prefix like "there is" may lead them.
RELATION_FORMS = {
    "left of": ("to the left of", "left of", "is to the left of", "is left of"),
    "right of": ("to the right of", "right of", "is to the right of", "is right of"),
    "above": ("above", "is above"),
    "below": ("below", "is below"),
}
PREFIXES = ("", "there is ", "a picture of ", "an image of ")


# --------------------------------------------------------------------------- config


@dataclass
class ScenesConfig:
    out_dir: str | Path = "out/scenes"
    flavour: str = "shapes"
    n_train: int = 10_000
    n_test: int = 1_000
    image_size: int = 64
    shard_size: int = 1_000
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 4
    captions_per_image: int = 4
    negatives_per_kind: int = 2  # hard negatives of each kind per test image, at most
    image_format: str = "png"
    textured_fraction: float = 0.5  # share of images with a mottled background
    fashion_path: str | Path | None = None  # a folder of Fashion-MNIST IDX files

    def validate(self) -> "ScenesConfig":
        """Check every field; raise UserError naming the flag at fault. Returns self."""

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not str(self.out_dir).strip():
            raise UserError("an output folder is required", where="--out")
        if self.flavour not in FLAVOURS:
            raise UserError(f"unknown flavour {self.flavour!r}; choose one of {', '.join(FLAVOURS)}", where="--flavour")
        for flag, v in (("--n-train", self.n_train), ("--n-test", self.n_test)):
            if not is_int(v) or not 0 <= v <= MAX_SAMPLES_PER_SPLIT:
                raise UserError(f"must be an integer from 0 to {MAX_SAMPLES_PER_SPLIT}, got {v!r}", where=flag)
        if self.n_train + self.n_test == 0:
            raise UserError("nothing to generate: --n-train and --n-test are both 0", where="--n-train")
        # Below 32 px a small object is under 7 px wide and shapes stop being recognisable.
        if not is_int(self.image_size) or not 32 <= self.image_size <= 1024:
            raise UserError(f"must be an integer from 32 to 1024, got {self.image_size!r}", where="--image-size")
        if not is_int(self.shard_size) or self.shard_size < 1:
            raise UserError(f"must be a positive integer, got {self.shard_size!r}", where="--shard-size")
        if math.ceil(max(self.n_train, self.n_test) / self.shard_size) > MAX_SHARDS:
            raise UserError(f"more than {MAX_SHARDS} shards per split; raise it", where="--shard-size")
        if not is_int(self.seed) or self.seed < 0:
            raise UserError(f"must be a non-negative integer, got {self.seed!r}", where="--seed")
        if not is_int(self.min_objects) or not MIN_OBJECTS <= self.min_objects <= MAX_OBJECTS:
            raise UserError(f"must be from {MIN_OBJECTS} to {MAX_OBJECTS}, got {self.min_objects!r}", where="--min-objects")
        if not is_int(self.max_objects) or not self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise UserError(
                f"must be from --min-objects ({self.min_objects}) to {MAX_OBJECTS}, got {self.max_objects!r}",
                where="--max-objects",
            )
        if not is_int(self.captions_per_image) or not 1 <= self.captions_per_image <= 8:
            raise UserError(f"must be from 1 to 8, got {self.captions_per_image!r}", where="--captions-per-image")
        if not is_int(self.negatives_per_kind) or not 1 <= self.negatives_per_kind <= 5:
            raise UserError(f"must be from 1 to 5, got {self.negatives_per_kind!r}", where="--negatives-per-kind")
        if self.image_format not in IMAGE_FORMATS:
            raise UserError(f"must be one of {', '.join(IMAGE_FORMATS)}, got {self.image_format!r}", where="--image-format")
        if not isinstance(self.textured_fraction, (int, float)) or not 0.0 <= self.textured_fraction <= 1.0:
            raise UserError(f"must be a number from 0 to 1, got {self.textured_fraction!r}", where="--textured-fraction")
        if self.flavour == "fashion":
            folder = fashion_dir(self.fashion_path)
            for split, n in (("train", self.n_train), ("test", self.n_test)):
                if n:
                    _fashion_split_files(folder, split)  # raises when a file is missing
        elif self.fashion_path is not None:
            raise UserError("only the fashion flavour reads Fashion-MNIST; add --flavour fashion", where="--fashion-path")
        return self


def vocabulary(flavour: str) -> tuple[str, ...]:
    """The object nouns of a flavour."""
    return FASHION_ITEMS if flavour == "fashion" else SHAPES


# --------------------------------------------------------------------------- Fashion-MNIST

# IDX type codes (http://yann.lecun.com/exdb/mnist/): the third byte of the magic number.
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not, told apart by content) into an array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}", where="--fashion-path") from e
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number)", where="--fashion-path")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path} is truncated (incomplete IDX header)", where="--fashion-path")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    if len(raw) - header != math.prod(dims) * dtype.itemsize:
        raise UserError(f"{path} holds {len(raw) - header} data bytes, its header promises a {dims} array", where="--fashion-path")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def fashion_dir(fashion_path: str | Path | None) -> Path:
    """The folder holding the Fashion-MNIST IDX files: the given one or Debian's."""
    if fashion_path is not None:
        folder = Path(fashion_path)
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder of Fashion-MNIST IDX files", where="--fashion-path")
        return folder
    for candidate in DEFAULT_FASHION_DIRS:
        if Path(candidate).is_dir():
            return Path(candidate)
    raise UserError(
        "Fashion-MNIST not found: install Debian's dataset-fashion-mnist "
        f"(it fills {DEFAULT_FASHION_DIRS[0]}) or pass the folder of its IDX files",
        where="--fashion-path",
    )


def _fashion_split_files(folder: Path, split: str) -> tuple[Path, Path]:
    found = []
    for base in FASHION_FILES[split]:
        options = [folder / base, folder / f"{base}.gz"]
        hit = next((p for p in options if p.is_file()), None)
        if hit is None:
            raise UserError(f"{folder} has no {base} (nor {base}.gz) for the {split} split", where="--fashion-path")
        found.append(hit)
    return found[0], found[1]


def load_fashion(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W) uint8, labels (N,) int) of one Fashion-MNIST split."""
    images_path, labels_path = _fashion_split_files(Path(folder), split)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(
            f"{images_path.name} {images.shape} and {labels_path.name} {labels.shape} do not pair up as images and labels",
            where="--fashion-path",
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(FASHION_ITEMS)):
        raise UserError(f"{labels_path} has labels outside 0..{len(FASHION_ITEMS) - 1}", where="--fashion-path")
    return images.astype(np.uint8), labels.astype(np.int64)


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class SceneObject:
    shape: str  # a SHAPES name, or a FASHION_ITEMS name in the fashion flavour
    colour: str
    size: str  # "small" | "large"
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels; x1, y1 exclusive
    variant: int = 0  # which Fashion-MNIST photo of the item is drawn; unused by shapes

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass
class Scene:
    objects: list[SceneObject]
    image_size: int
    flavour: str
    background: tuple[int, int, int]  # base RGB
    texture_seed: int | None  # None: a plain background
    margin: float  # pixels by which centres must differ for a relation to hold


def holds(scene: Scene, i: int, relation: str, j: int) -> bool:
    """Does `objects[i] relation objects[j]` hold? Image y grows downwards."""
    (xi, yi), (xj, yj) = scene.objects[i].centre, scene.objects[j].centre
    m = scene.margin
    if relation == "left of":
        return xj - xi >= m
    if relation == "right of":
        return xi - xj >= m
    if relation == "above":
        return yj - yi >= m
    if relation == "below":
        return yi - yj >= m
    raise ValueError(f"unknown relation {relation!r}")


def relations(scene: Scene) -> list[tuple[int, str, int]]:
    """Every relation that holds, over all ordered pairs of distinct objects."""
    n = len(scene.objects)
    return [(i, r, j) for i in range(n) for j in range(n) if i != j for r in RELATIONS if holds(scene, i, r, j)]


def side_px(size: str, image_size: int) -> int:
    return round(SIZE_FRACTION[size] * image_size)


def make_scene(rng: np.random.Generator, cfg: ScenesConfig) -> Scene:
    """Draw a scene: object count, attributes, non-overlapping positions, background.

    Two rules keep captions unambiguous. No two objects share colour and shape, so a
    "colour shape" phrase names exactly one object. Boxes never overlap and keep a gap,
    so any two objects are apart along x or y by more than a small object's side, which
    exceeds the relation margin: every pair has at least one relation that holds.
    """
    s = cfg.image_size
    nouns = vocabulary(cfg.flavour)
    gap = max(2, s // 32)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    grey = int(rng.integers(200, 236))
    tint = rng.integers(-8, 9, size=3)
    background = tuple(min(255, max(0, grey + int(t))) for t in tint)
    textured = bool(rng.random() < cfg.textured_fraction)
    texture_seed = int(rng.integers(2**31)) if textured else None

    for _attempt in range(PLACEMENT_ATTEMPTS):
        objects: list[SceneObject] = []
        for _ in range(n):
            while True:  # at most 4 of 64 (colour, shape) pairs are taken: this ends fast
                shape = nouns[int(rng.integers(len(nouns)))]
                colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
                if all((o.colour, o.shape) != (colour, shape) for o in objects):
                    break
            size = SIZES[int(rng.integers(len(SIZES)))]
            side = side_px(size, s)
            variant = int(rng.integers(2**31))
            for _try in range(POSITION_TRIES):
                x0, y0 = (int(v) for v in rng.integers(1, s - side, size=2))  # 1 px off the edges
                box = (x0, y0, x0 + side, y0 + side)
                if all(_apart(box, o.bbox, gap) for o in objects):
                    objects.append(SceneObject(shape, colour, size, box, variant))
                    break
            else:
                break  # no room for this object: redraw the whole scene
        if len(objects) == n:
            return Scene(objects, s, cfg.flavour, background, texture_seed, RELATION_MARGIN * s)
    # Unreachable for validated configs (four large objects fill ~46% of the image).
    raise RuntimeError(f"could not place {n} objects in {s}x{s} px after {PLACEMENT_ATTEMPTS} attempts")


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    """Boxes separated by at least `gap` pixels along x or along y."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


# --------------------------------------------------------------------------- rendering


@dataclass
class Assets:
    """What rendering needs beyond the scene: cached shape masks, Fashion-MNIST photos."""

    flavour: str
    fashion_images: np.ndarray | None = None  # (N, 28, 28) uint8, one split
    fashion_by_class: list[np.ndarray] | None = None  # photo indices of each label
    masks: dict = field(default_factory=dict)  # (shape, side) -> alpha, filled lazily


def load_assets(cfg: ScenesConfig, split: str = "train") -> Assets:
    """Assets for one split: the fashion flavour reads that split's Fashion-MNIST photos."""
    if cfg.flavour != "fashion":
        return Assets(cfg.flavour)
    images, labels = load_fashion(fashion_dir(cfg.fashion_path), split)
    by_class = [np.flatnonzero(labels == k) for k in range(len(FASHION_ITEMS))]
    for k, pool in enumerate(by_class):
        if len(pool) == 0:
            raise UserError(f"the {split} split has no {FASHION_ITEMS[k]} (label {k}) photos", where="--fashion-path")
    return Assets("fashion", images, by_class)


def render(scene: Scene, cfg: ScenesConfig, assets: Assets | None = None) -> Image.Image:
    """Draw a scene as an RGB image. Pass `assets` when rendering many scenes (the
    fashion flavour would otherwise reload Fashion-MNIST's train split on every call)."""
    if assets is None:
        assets = load_assets(cfg, "train")
    canvas = _background(scene)
    for obj in scene.objects:
        if scene.flavour == "fashion":
            alpha, rgb = _fashion_layers(obj, assets)
        else:
            alpha = _shape_mask(obj.shape, obj.bbox[2] - obj.bbox[0], assets)
            rgb = np.array(COLOURS[obj.colour], np.int32)
        x0, y0, x1, y1 = obj.bbox
        a = alpha[..., None]
        # Integer alpha blending, rounded: exact and platform-independent.
        canvas[y0:y1, x0:x1] = (canvas[y0:y1, x0:x1] * (255 - a) + rgb * a + 127) // 255
    return Image.fromarray(canvas.astype(np.uint8))


def _background(scene: Scene) -> np.ndarray:
    s = scene.image_size
    canvas = np.empty((s, s, 3), np.int32)
    canvas[...] = scene.background
    if scene.texture_seed is not None:
        trng = np.random.default_rng(scene.texture_seed)
        # A few random levels on a coarse grid, smoothly upsampled: soft mottling.
        coarse = trng.integers(128 - TEXTURE_AMPLITUDE, 128 + TEXTURE_AMPLITUDE + 1, size=(6, 6)).astype(np.uint8)
        mottle = np.asarray(Image.fromarray(coarse).resize((s, s), Image.Resampling.BICUBIC), np.int32) - 128
        grain = trng.integers(-GRAIN_AMPLITUDE, GRAIN_AMPLITUDE + 1, size=(s, s))
        canvas += (mottle + grain)[..., None]
    return np.clip(canvas, 0, 255)


def _shape_mask(shape: str, side: int, assets: Assets) -> np.ndarray:
    """Alpha (side, side) int32 in 0..255 of a shape filling its box, cached per size."""
    key = (shape, side)
    if key in assets.masks:
        return assets.masks[key]
    n = side * SUPERSAMPLE
    img = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(img)
    c, r, last = n / 2, n / 2, n - 1
    if shape == "circle":
        draw.ellipse((0, 0, last, last), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, last, last), fill=255)
    elif shape == "triangle":
        draw.polygon([(c, 0), (last, last), (0, last)], fill=255)
    elif shape == "cross":
        t = n / 3
        draw.rectangle((t, 0, last - t, last), fill=255)
        draw.rectangle((0, t, last, last - t), fill=255)
    elif shape == "star":
        # Five points; a star's lower points sit at 0.81 r below the centre, so shift it
        # down to centre it vertically in its box.
        dy = r * (1 - math.cos(math.pi / 5)) / 2
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.42 * r
            angle = k * math.pi / 5
            points.append((c + radius * math.sin(angle), c + dy - radius * math.cos(angle)))
        draw.polygon(points, fill=255)
    elif shape == "ring":
        hole = 0.36 * r  # ring thickness, as a fraction of the radius
        draw.ellipse((0, 0, last, last), fill=255)
        draw.ellipse((hole, hole, last - hole, last - hole), fill=0)
    elif shape == "diamond":
        draw.polygon([(c, 0), (last, c), (c, last), (0, c)], fill=255)
    elif shape == "hexagon":
        draw.polygon([(c + r * math.cos(k * math.pi / 3), c + r * math.sin(k * math.pi / 3)) for k in range(6)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask = np.asarray(img.reduce(SUPERSAMPLE), np.int32)
    assets.masks[key] = mask
    return mask


def _fashion_layers(obj: SceneObject, assets: Assets) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, rgb) of a Fashion-MNIST photo tinted with the object's colour.

    The photo is cropped to its ink, scaled to fit the box keeping its aspect, and
    centred. Ink intensity sets opacity (the faint rim fades out) and shading (70–100%
    of the colour), so the item keeps its texture but reads as one colour.
    """
    if assets.fashion_images is None:
        raise ValueError("rendering a fashion scene needs assets from load_assets(cfg, split)")
    pool = assets.fashion_by_class[FASHION_ITEMS.index(obj.shape)]
    photo = assets.fashion_images[pool[obj.variant % len(pool)]]
    ys, xs = np.nonzero(photo > INK_THRESHOLD)
    if len(ys):
        photo = photo[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    side = obj.bbox[2] - obj.bbox[0]
    h, w = photo.shape
    scale = side / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    small = np.asarray(Image.fromarray(photo).resize((nw, nh), Image.Resampling.BILINEAR), np.int32)
    ink = np.zeros((side, side), np.int32)
    top, left = (side - nh) // 2, (side - nw) // 2
    ink[top : top + nh, left : left + nw] = small
    alpha = np.clip((ink - INK_THRESHOLD) * 255 // 40, 0, 255)
    shade = 178 + (77 * ink) // 255  # 178/255 = 70%
    rgb = np.array(COLOURS[obj.colour], np.int32) * shade[..., None] // 255
    return alpha, rgb


# --------------------------------------------------------------------------- captions
#
# The grammar (lower case; a final "." is ignored):
#   caption  := count | clause (", and " clause)*
#   count    := NUMBER ("object" | "objects") ": " np ((", " | " and ") np)*
#   clause   := [prefix] np [relation np]
#   prefix   := "there is " | "a picture of " | "an image of "
#   relation := ["is "] ["to the "] ("left of" | "right of" | "above" | "below")
#   np       := ("a" | "an" | "the") [size] [colour] noun
# A clause holds when some objects match its noun phrases (and are related as stated);
# a count holds when the scene has exactly that many objects and the phrases match
# distinct objects. Every clause of a conjunction must hold.


def _np(size: str | None, colour: str | None, noun: str) -> str:
    words = [w for w in (size, colour, noun) if w]
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def _describe(rng: np.random.Generator, obj: SceneObject, full: bool | None = None) -> str:
    """A noun phrase naming `obj`: with size or not (colour and noun always, which by
    make_scene's rule picks exactly one object). `full=None` flips a coin."""
    if full is None:
        full = bool(rng.random() < 0.5)
    return _np(obj.size if full else None, obj.colour, obj.shape)


def _relation_clause(rng: np.random.Generator, a: str, relation: str, b: str, sentence: bool = False) -> str:
    """"A <relation> B" in a random wording; a phrase wording may take a prefix.
    `sentence=True` forces an "is" wording, as the later clauses of a conjunction need."""
    forms = [f for f in RELATION_FORMS[relation] if f.startswith("is ") or not sentence]
    form = forms[int(rng.integers(len(forms)))]
    prefix = "" if form.startswith("is ") else PREFIXES[int(rng.integers(len(PREFIXES)))]
    return f"{prefix}{a} {form} {b}"


def _count_caption(rng: np.random.Generator, phrases: list[str]) -> str:
    order = [phrases[k] for k in rng.permutation(len(phrases))]
    n = len(order)
    listed = order[0] if n == 1 else ", ".join(order[:-1]) + " and " + order[-1]
    return f"{NUMBER_WORDS[n - 1]} object{'s' if n > 1 else ''}: {listed}"


def _pair_relations(scene: Scene, a: int, b: int) -> list[tuple[int, str, int]]:
    return [(i, r, j) for i, j in ((a, b), (b, a)) for r in RELATIONS if holds(scene, i, r, j)]


def captions(scene: Scene, rng: np.random.Generator, n: int = 4) -> list[str]:
    """`n` distinct true captions. The first is the most complete: full noun phrases,
    and for several objects a chain of relations that mentions every object."""
    objs = scene.objects
    if len(objs) == 1:
        first = _np(objs[0].size, objs[0].colour, objs[0].shape)
    else:
        order = [int(k) for k in rng.permutation(len(objs))]
        # Pairs (o0, o1), (o2, o3); an odd one out is related to o0.
        pairs = [(order[k], order[k + 1]) for k in range(0, len(order) - 1, 2)]
        if len(order) % 2:
            pairs.append((order[-1], order[0]))
        clauses = []
        for a, b in pairs:
            options = _pair_relations(scene, a, b)
            if options:  # always, given make_scene's spacing rule
                i, r, j = options[int(rng.integers(len(options)))]
                clauses.append(_relation_clause(rng, _describe(rng, objs[i], True), r, _describe(rng, objs[j], True), sentence=bool(clauses)))
        first = ", and ".join(clauses)

    out = [first]
    rels = relations(scene)
    # Draw candidates until there are n distinct ones; the cap only guards against a
    # tiny candidate space (it is never near for n <= 8).
    for _ in range(30 * n):
        if len(out) >= n:
            break
        kind = rng.random()
        if len(objs) == 1:
            obj = objs[0]
            if kind < 0.2:
                cand = _count_caption(rng, [_describe(rng, obj)])
            else:
                cand = PREFIXES[int(rng.integers(len(PREFIXES)))] + _describe(rng, obj)
        elif kind < 0.6:
            i, r, j = rels[int(rng.integers(len(rels)))]
            cand = _relation_clause(rng, _describe(rng, objs[i]), r, _describe(rng, objs[j]))
        elif kind < 0.8:
            cand = _count_caption(rng, [_describe(rng, o) for o in objs])
        else:
            picks = rng.choice(len(rels), size=2, replace=False)
            cand = ", and ".join(
                _relation_clause(rng, _describe(rng, objs[i]), r, _describe(rng, objs[j]), sentence=k > 0)
                for k, (i, r, j) in enumerate(rels[int(p)] for p in picks)
            )
        if cand not in out:
            out.append(cand)
    return out


def hard_negatives(scene: Scene, rng: np.random.Generator, per_kind: int = 2) -> dict[str, list[str]]:
    """Up to `per_kind` false captions of each kind, worded like the true ones:

    swap_attribute  two objects trade colour or size ("a blue circle left of a red square")
    swap_relation   a relation flipped, or its two objects swapped
    replace_object  one object's noun replaced by one not in the scene

    Each candidate is kept only if `scene_satisfies` says it is false. A single-object
    scene has nothing to swap or relate, so it gets replace_object negatives only.
    """
    objs = scene.objects
    absent = [s for s in vocabulary(scene.flavour) if s not in {o.shape for o in objs}]
    rels = relations(scene)
    rels = [rels[int(k)] for k in rng.permutation(len(rels))]
    candidates: dict[str, list[str]] = {k: [] for k in NEGATIVE_KINDS}

    def replaced(obj: SceneObject) -> tuple[str | None, str, str]:
        return (obj.size if rng.random() < 0.5 else None, obj.colour, absent[int(rng.integers(len(absent)))])

    if len(objs) == 1:
        obj = objs[0]
        for _ in range(3 * per_kind):
            phrase = _np(*replaced(obj))
            if rng.random() < 0.2:
                candidates["replace_object"].append(_count_caption(rng, [phrase]))
            else:
                candidates["replace_object"].append(PREFIXES[int(rng.integers(len(PREFIXES)))] + phrase)
    for i, r, j in rels[: 3 * per_kind]:
        a, b = objs[i], objs[j]
        if a.colour != b.colour:
            full = bool(rng.random() < 0.5)
            pa, pb = _np(a.size if full else None, b.colour, a.shape), _np(b.size if full else None, a.colour, b.shape)
            candidates["swap_attribute"].append(_relation_clause(rng, pa, r, pb))
        if a.size != b.size:
            pa, pb = _np(b.size, a.colour, a.shape), _np(a.size, b.colour, b.shape)
            candidates["swap_attribute"].append(_relation_clause(rng, pa, r, pb))
        candidates["swap_relation"].append(_relation_clause(rng, _describe(rng, a), FLIPPED[r], _describe(rng, b)))
        candidates["swap_relation"].append(_relation_clause(rng, _describe(rng, b), r, _describe(rng, a)))
        if rng.random() < 0.5:
            candidates["replace_object"].append(_relation_clause(rng, _np(*replaced(a)), r, _describe(rng, b)))
        else:
            candidates["replace_object"].append(_relation_clause(rng, _describe(rng, a), r, _np(*replaced(b))))
    if len(objs) > 1:
        # Binding in a plain listing: the scene's objects with two colours traded.
        a, b = (int(k) for k in rng.choice(len(objs), size=2, replace=False))
        if objs[a].colour != objs[b].colour:
            colours = [o.colour for o in objs]
            colours[a], colours[b] = colours[b], colours[a]
            phrases = [_np(o.size, c, o.shape) for o, c in zip(objs, colours)]
            candidates["swap_attribute"].append(_count_caption(rng, phrases))

    out: dict[str, list[str]] = {}
    for kind in NEGATIVE_KINDS:
        kept: list[str] = []
        for k in rng.permutation(len(candidates[kind])):
            cand = candidates[kind][int(k)]
            if cand not in kept and not scene_satisfies(scene, cand):
                kept.append(cand)
                if len(kept) == per_kind:
                    break
        out[kind] = kept
    return out


# --------------------------------------------------------------------------- checker

_COUNT_RE = re.compile(r"^(?P<number>[a-z]+) objects?: (?P<items>.+)$")
_RELATION_RE = re.compile(r"^(?P<a>.+?) (?:is )?(?:to the )?(?P<rel>left of|right of|above|below) (?P<b>.+)$")
_NOUNS = set(SHAPES) | set(FASHION_ITEMS)


def _parse_np(text: str) -> tuple[str | None, str | None, str]:
    words = text.split(" ")
    if words[0] not in ("a", "an", "the"):
        raise ValueError(f"noun phrase without an article: {text!r}")
    words = words[1:]
    size = words.pop(0) if words and words[0] in SIZES else None
    colour = words.pop(0) if words and words[0] in COLOURS else None
    noun = " ".join(words)
    if noun not in _NOUNS:
        raise ValueError(f"unknown noun {noun!r} in {text!r}")
    return size, colour, noun


def _matches(obj: SceneObject, phrase: tuple[str | None, str | None, str]) -> bool:
    size, colour, noun = phrase
    return obj.shape == noun and (size is None or obj.size == size) and (colour is None or obj.colour == colour)


def scene_satisfies(scene: Scene, caption: str) -> bool:
    """Is `caption` (in this module's grammar, see above) true of `scene`?

    Raises ValueError on text outside the grammar, so a malformed caption can never
    pass for a false one.
    """
    text = caption.strip().lower().removesuffix(".")
    objs = scene.objects
    count = _COUNT_RE.match(text)
    if count:
        if count["number"] not in NUMBER_WORDS:
            raise ValueError(f"unknown number {count['number']!r} in {caption!r}")
        phrases = [_parse_np(p) for p in re.split(r", | and ", count["items"])]
        if NUMBER_WORDS.index(count["number"]) + 1 != len(phrases):
            raise ValueError(f"count and listed objects disagree in {caption!r}")
        if len(phrases) != len(objs):
            return False
        # At most 4! assignments of phrases to distinct objects.
        return any(all(_matches(objs[k], p) for k, p in zip(perm, phrases)) for perm in itertools.permutations(range(len(objs))))

    for clause in text.split(", and "):
        for prefix in PREFIXES[1:]:
            if clause.startswith(prefix):
                clause = clause[len(prefix) :]
                break
        rel = _RELATION_RE.match(clause)
        if rel:
            pa, pb = _parse_np(rel["a"]), _parse_np(rel["b"])
            ok = any(
                i != j and _matches(objs[i], pa) and _matches(objs[j], pb) and holds(scene, i, rel["rel"], j)
                for i in range(len(objs))
                for j in range(len(objs))
            )
        else:
            phrase = _parse_np(clause)
            ok = any(_matches(o, phrase) for o in objs)
        if not ok:
            return False
    return True


# --------------------------------------------------------------------------- writing


def sample_seed(cfg: ScenesConfig, split: str, index: int) -> list[int]:
    """The entropy of a sample's RNG. Splits differ in the middle entry, so train and
    test never share a seed; `np.random.default_rng(seed)` replays the sample."""
    return [int(cfg.seed), SPLIT_IDS[split], int(index)]


def make_sample(cfg: ScenesConfig, split: str, index: int, assets: Assets) -> tuple[str, list[tuple[str, bytes]], dict]:
    """(key, tar members as (name, bytes), metadata) of one sample, independent of sharding."""
    seed = sample_seed(cfg, split, index)
    rng = np.random.default_rng(seed)
    scene = make_scene(rng, cfg)
    caps = captions(scene, rng, cfg.captions_per_image)
    key = f"{index:09d}"
    meta = {
        "key": key,
        "captions": caps,
        "objects": [{"shape": o.shape, "colour": o.colour, "size": o.size, "bbox": list(o.bbox)} for o in scene.objects],
        "relations": [[i, r, j] for i, r, j in relations(scene)],
        "flavour": scene.flavour,
        "seed": seed,
    }
    if split == "test":
        meta["hard_negatives"] = hard_negatives(scene, rng, cfg.negatives_per_kind)

    image = render(scene, cfg, assets)
    buf = io.BytesIO()
    if cfg.image_format == "png":
        image.save(buf, format="PNG", compress_level=3)  # no metadata chunks: deterministic; 3 is
        # as small as 6 on these images and twice as fast
    else:
        image.save(buf, format="JPEG", quality=95)
    members = [
        (f"{key}.{cfg.image_format}", buf.getvalue()),
        (f"{key}.txt", caps[0].encode("utf-8")),
        (f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8")),
    ]
    return key, members, meta


# A shard, or the temporary file of an interrupted write (atomic.py names it NAME.tmpPID).
_SHARD_RE = re.compile(r"^\d{5}\.tar(\.tmp\d*)?$")


def _write_split(cfg: ScenesConfig, split: str, n: int, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(n / cfg.shard_size)
    shard_names = [f"{k:05d}.tar" for k in range(n_shards)]
    # Shards left by an earlier, larger run (or an interrupted one) would mix in.
    for p in folder.iterdir():
        if _SHARD_RE.match(p.name) and p.name not in shard_names:
            p.unlink()

    counts = {name: Counter() for name in ("objects_per_image", "shapes", "colours", "sizes", "relations", "hard_negatives")}
    n_captions = 0
    assets = load_assets(cfg, split) if n else None
    for shard, name in enumerate(shard_names):
        members: list[tuple[str, bytes]] = []
        for index in range(shard * cfg.shard_size, min(n, (shard + 1) * cfg.shard_size)):
            _key, sample_members, meta = make_sample(cfg, split, index, assets)
            members += sample_members
            counts["objects_per_image"][str(len(meta["objects"]))] += 1
            for o in meta["objects"]:
                counts["shapes"][o["shape"]] += 1
                counts["colours"][o["colour"]] += 1
                counts["sizes"][o["size"]] += 1
            for _i, r, _j in meta["relations"]:
                counts["relations"][r] += 1
            for kind, negs in meta.get("hard_negatives", {}).items():
                counts["hard_negatives"][kind] += len(negs)
            n_captions += len(meta["captions"])
        write_tar_atomic(folder / name, members)

    stats = {
        "split": split,
        "count": n,
        "shards": shard_names,
        "image_format": cfg.image_format,
        "captions": n_captions,
        **{name: dict(sorted(c.items())) for name, c in counts.items()},
    }
    if split != "test":
        del stats["hard_negatives"]
    write_json_atomic(folder / "stats.json", stats)
    return stats


def run(cfg: ScenesConfig) -> dict:
    """Generate both splits under cfg.out_dir; return the manifest plus per-split stats."""
    cfg.validate()
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder", where="--out")
    # Regenerating over an earlier Scenes output is fine; writing into anything else is not.
    if out.is_dir() and any(out.iterdir()) and not (out / "scenes.json").is_file():
        raise UserError(f"{out} is not empty and holds no scenes.json: pick a new or empty folder", where="--out")
    out.mkdir(parents=True, exist_ok=True)

    stats = {split: _write_split(cfg, split, n, out / split) for split, n in (("train", cfg.n_train), ("test", cfg.n_test))}
    config = {k: v for k, v in vars(cfg).items() if k != "out_dir"}  # the manifest lives in out_dir
    if cfg.flavour == "fashion":
        config["fashion_path"] = str(fashion_dir(cfg.fashion_path))
    manifest = {
        "generator": "hierdctl.scenes",
        "version": GENERATOR_VERSION,
        "config": config,
        "counts": {split: s["count"] for split, s in stats.items()},
        "shards": {split: len(s["shards"]) for split, s in stats.items()},
        "vocabulary": {
            "shapes": list(vocabulary(cfg.flavour)),
            "colours": list(COLOURS),
            "sizes": list(SIZES),
            "relations": list(RELATIONS),
        },
        "relation_margin_px": RELATION_MARGIN * cfg.image_size,
        "negative_kinds": list(NEGATIVE_KINDS),
    }
    write_json_atomic(out / "scenes.json", manifest)
    return {"out_dir": str(out), **manifest, "stats": stats}
