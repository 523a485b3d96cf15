"""Scenes: a synthetic compositional image–caption benchmark that needs no download.

Each image holds 1–4 objects with a shape (or a Fashion-MNIST item), a colour and a size,
on a plain or lightly textured background (the cluttered flavour: 2–6 objects, partly
occluding each other, on crops of real photos, some left out of every caption).
Captions name the objects with their attributes and the spatial relations between them, from a small fixed grammar that
`scene_satisfies` parses back, so every caption can be checked against the scene graph.
The test split also carries hard-negative captions (attribute swaps, relation flips,
replaced objects), each verified false, to probe whether a student binds attributes to
objects and understands relations rather than matching bags of words.

Flavours:
    shapes    procedural PIL shapes (circle, square, triangle, ...); PIL and numpy only
    fashion   Fashion-MNIST item photos tinted with the object colour; the IDX files come
              from Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist)
              or from `fashion_path`. Train images feed the train split, t10k the test.
    cluttered shapes and Fashion-MNIST items mixed (shapes only when Fashion-MNIST is
              absent), outlined, on crops of scikit-image's bundled sample photos
              (brick, grass, gravel, camera, ...): train crops come from the left 70%
              of every photo, test crops from the right 30%. Later objects may hide
              at most 30% of an earlier one; distractors are drawn but never named.

Output is img2dataset's WebDataset layout:
    OUT/scenes.json               manifest: generator version, config, counts
    OUT/{split}/00000.tar ...     KEY.png (or .jpg), KEY.txt (first caption), KEY.json
                                  (objects, relations, captions, phrase boxes `regions`)
    OUT/{split}/stats.json        per-split summary (object, attribute, relation counts)
    OUT/clip_benchmark/...        optional: the test split in CLIP_benchmark's `wds/` layout
                                  (every caption in KEY.txt, one a line)

Everything is a pure function of (config, seed): each sample's RNG is built from
[seed, split id, index], so a sample does not depend on the shard it lands in, and the
tar members carry fixed metadata, so two runs write byte-identical shards. Every file is
written through hierdctl.atomic (temporary name, fsync, rename): a killed run leaves
complete files or none, never a torn shard.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import math
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from hierdctl.atomic import write_bytes_atomic, write_json_atomic, write_tar_atomic
from hierdctl.scenes_assets import (DEFAULT_FASHION_DIRS, FASHION_FILES, cluttered_fashion_dir,  # noqa: F401
                                    fashion_dir, load_fashion, read_idx, skimage_data)
from hierdctl.configs import (DEFAULT_OBJECTS, DEFAULT_TEXTURED_FRACTION, FLAVOURS, IMAGE_FORMATS,  # noqa: F401
                      MAX_OBJECTS, MAX_SAMPLES_PER_SPLIT, MAX_SHARDS, MIN_OBJECTS, ScenesConfig)
from hierdctl.errors import UserError

# Bump when a change alters the bytes generated for a given config and seed.
# 1.1: shards and JSON files written through hierdctl.atomic (tar members now carry the
# user and group name "hierdctl"; JSON keys sorted); member bytes are unchanged from 1.0.
# 1.2: every sample's JSON ends with `regions` (phrase boxes for eval-grounding) and stats.json
# counts them; images, captions and every other JSON field are unchanged from 1.0.
GENERATOR_VERSION = "1.2"

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
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six")
SPLIT_IDS = {"train": 0, "test": 1}
NEGATIVE_KINDS = ("swap_attribute", "swap_relation", "replace_object")

SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: smooth, deterministic edges
TEXTURE_AMPLITUDE = 10  # grey levels of the smooth background mottling
GRAIN_AMPLITUDE = 3  # grey levels of the per-pixel grain on top
INK_THRESHOLD = 8  # Fashion-MNIST pixels at or below this are background
# Some Fashion-MNIST photos sit on a faint grey rectangle (levels 10-25): invisible on the
# plain flavours' light grey, but on a photo its outline would draw a box. Cut above it.
CLUTTERED_INK_THRESHOLD = 32
PLACEMENT_ATTEMPTS = 200  # whole-scene restarts; in practice one or two are needed
POSITION_TRIES = 40  # positions tried per object before the scene restarts

# Caption templates. Relation forms with "is" make a sentence and take no prefix; the
# others read as a noun phrase, so a prefix like "there is" may lead them.
RELATION_FORMS = {
    "left of": ("to the left of", "left of", "is to the left of", "is left of"),
    "right of": ("to the right of", "right of", "is to the right of", "is right of"),
    "above": ("above", "is above"),
    "below": ("below", "is below"),
}
PREFIXES = ("", "there is ", "a picture of ", "an image of ")

# The cluttered flavour. Backgrounds: sample photos that scikit-image ships inside its
# wheel (skimage.data reads them from the package: no download). Left out on purpose:
# text and page (printed words), chessboard, colorwheel, logo and horse (drawn shapes and
# colour fields that would compete with the objects), retina (one red disc), cell and
# clock (nearly flat).
BACKGROUND_PHOTOS = ("brick", "grass", "gravel", "camera", "coins", "moon", "coffee", "chelsea", "astronaut",
                     "rocket", "hubble_deep_field")  # fmt: skip
# A photo's columns from this fraction of its width on feed the test split, the columns
# before it the train split: test backgrounds are pixels the train split never shows.
TEST_REGION_START = 0.7
CROP_SIDE = (96, 160)  # a background crop's side in photo pixels (then resized to the image)
# Backgrounds keep this share of their colour saturation and of their contrast around
# their mean: the photo stays recognisable, and the objects' saturated colours stand out.
BACKGROUND_SATURATION = 0.4
BACKGROUND_CONTRAST = 0.8
# Every object keeps at least this share of its ink visible: objects drawn later may hide
# at most 30% of an earlier one, so each object stays recognisable.
MIN_VISIBLE = 0.7
OUTLINE_LUMA_SPLIT = 128  # an object on a background darker than this gets a white outline
OUTLINES = {"black": (0, 0, 0), "white": (255, 255, 255)}


# --------------------------------------------------------------------------- config


def vocabulary(flavour: str, fashion: bool = True) -> tuple[str, ...]:
    """The object nouns of a flavour; `fashion=False`: cluttered without Fashion-MNIST."""
    if flavour == "fashion":
        return FASHION_ITEMS
    if flavour == "cluttered" and fashion:
        return SHAPES + FASHION_ITEMS
    return SHAPES


# --------------------------------------------------------------------------- photos


@functools.lru_cache(maxsize=1)
def load_photos() -> dict[str, np.ndarray]:
    """BACKGROUND_PHOTOS as RGB arrays (H, W, 3) uint8; greyscale photos are repeated to RGB."""
    data = skimage_data()
    photos = {}
    for name in BACKGROUND_PHOTOS:
        a = np.asarray(getattr(data, name)())
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        assert a.ndim == 3 and a.shape[2] == 3 and a.dtype == np.uint8, (name, a.shape, a.dtype)
        assert a.shape[1] * (1 - TEST_REGION_START) >= CROP_SIDE[0] and a.shape[0] >= CROP_SIDE[0], (name, a.shape)
        a = np.ascontiguousarray(a)
        a.flags.writeable = False  # shared by every caller (cached)
        photos[name] = a
    return photos


def crop_region(photo_shape: tuple[int, ...], split: str) -> tuple[int, int, int, int]:
    """The (x0, y0, x1, y1) part of a photo that a split's background crops come from:
    train the columns left of TEST_REGION_START of the width, test those from it on."""
    h, w = photo_shape[:2]
    cut = int(w * TEST_REGION_START)
    return (0, 0, cut, h) if split == "train" else (cut, 0, w, h)


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class SceneObject:
    shape: str  # a SHAPES name or a FASHION_ITEMS name (its noun)
    colour: str
    size: str  # "small" | "large"
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels; x1, y1 exclusive
    variant: int = 0  # which Fashion-MNIST photo of the item is drawn; unused by shapes
    # The cluttered flavour: the share of the object's ink that later objects leave
    # visible, whether captions leave it out, and the colour of its outline.
    visible: float = 1.0
    distractor: bool = False
    outline: str | None = None  # an OUTLINES name; None: no outline

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
    # The cluttered flavour: the photo and its (x0, y0, x1, y1) crop behind the objects,
    # the outline width in pixels, and the nouns objects were drawn from.
    photo: str | None = None
    crop: tuple[int, int, int, int] | None = None
    outline_px: int = 0
    nouns: tuple[str, ...] | None = None  # None: vocabulary(flavour)


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


def _draw_identity(rng: np.random.Generator, nouns, objects) -> tuple[str, str, str, int]:
    """(noun, colour, size, variant) of the next object: a (colour, noun) pair no placed object has.
    The draws are the generator's, in this order, as every flavour made them (bytes unchanged)."""
    while True:  # only a few of the pairs are ever taken: this ends fast
        noun = nouns[int(rng.integers(len(nouns)))]
        colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
        if all((o.colour, o.shape) != (colour, noun) for o in objects):
            break
    return noun, colour, SIZES[int(rng.integers(len(SIZES)))], int(rng.integers(2**31))


def make_scene(rng: np.random.Generator, cfg: ScenesConfig, assets: Assets | None = None) -> Scene:
    """Draw a scene: object count, attributes, non-overlapping positions, background.
    (The cluttered flavour: see _make_cluttered_scene; it needs the split's `assets`,
    and loads the train split's when none are given.)

    Two rules keep captions unambiguous. No two objects share colour and shape, so a
    "colour shape" phrase names exactly one object. Boxes never overlap and keep a gap,
    so any two objects are apart along x or y by more than a small object's side, which
    exceeds the relation margin: every pair has at least one relation that holds.
    """
    if cfg.flavour == "cluttered":
        return _make_cluttered_scene(rng, cfg, assets if assets is not None else load_assets(cfg, "train"))
    s = cfg.image_size
    nouns = vocabulary(cfg.flavour)
    gap = max(2, s // 32)
    lo, hi = cfg.object_range()
    n = int(rng.integers(lo, hi + 1))
    grey = int(rng.integers(200, 236))
    tint = rng.integers(-8, 9, size=3)
    background = tuple(min(255, max(0, grey + int(t))) for t in tint)
    textured = bool(rng.random() < cfg.texture_share())
    texture_seed = int(rng.integers(2**31)) if textured else None

    for _attempt in range(PLACEMENT_ATTEMPTS):
        objects: list[SceneObject] = []
        for _ in range(n):
            shape, colour, size, variant = _draw_identity(rng, nouns, objects)  # at most 4 of 64 pairs taken
            side = side_px(size, s)
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


def _make_cluttered_scene(rng: np.random.Generator, cfg: ScenesConfig, assets: Assets) -> Scene:
    """A cluttered scene: a photo crop, then objects placed one after another, each drawn
    over the ones before it. Three rules keep every caption checkable:

    - no two objects share colour and noun, so "a red circle" names at most one object;
    - any two objects' centres differ by the relation margin along x or y, so every pair
      (distractors included) has a relation that holds;
    - an object may cover earlier ones only while each keeps MIN_VISIBLE of its ink
      (alpha after the outline and fill of every later object; integer arithmetic).

    Then up to half of the objects (never all) become distractors: drawn, never named.
    Each object's outline is white on a dark local background and black on a light one.
    """
    s = cfg.image_size
    nouns = assets.nouns
    w = max(1, round(s / 64))  # outline width: 1 px at 64, 2 px at 128
    lo, hi = cfg.object_range()
    n = int(rng.integers(lo, hi + 1))
    photo = BACKGROUND_PHOTOS[int(rng.integers(len(BACKGROUND_PHOTOS)))]
    rx0, ry0, rx1, ry1 = crop_region(assets.photos[photo].shape, assets.split)
    side_max = min(CROP_SIDE[1], rx1 - rx0, ry1 - ry0)
    c = int(rng.integers(min(CROP_SIDE[0], side_max), side_max + 1))
    cx0, cy0 = int(rng.integers(rx0, rx1 - c + 1)), int(rng.integers(ry0, ry1 - c + 1))
    crop = (cx0, cy0, cx0 + c, cy0 + c)
    margin = RELATION_MARGIN * s

    for _attempt in range(PLACEMENT_ATTEMPTS):
        objects: list[SceneObject] = []
        inks: list[np.ndarray] = []  # per placed object: (side, side) int64 ink still visible, 0..255*255
        totals: list[int] = []  # per placed object: its full ink, the sum of its alpha * 255
        for _ in range(n):
            noun, colour, size, variant = _draw_identity(rng, nouns, objects)  # at most 6 of 144 pairs taken
            side = side_px(size, s)
            alpha = _object_layers(SceneObject(noun, colour, size, (0, 0, side, side), variant), assets)[0]
            foot = _dilate(alpha, w)  # (side + 2w, side + 2w): outline and fill
            for _try in range(POSITION_TRIES):
                x0, y0 = (int(v) for v in rng.integers(w, s - side - w + 1, size=2))
                box = (x0, y0, x0 + side, y0 + side)
                cx, cy = x0 + side / 2, y0 + side / 2
                if not all(max(abs(cx - o.centre[0]), abs(cy - o.centre[1])) >= margin for o in objects):
                    continue
                covered = [_cover(ink, o.bbox, foot, (x0 - w, y0 - w)) for ink, o in zip(inks, objects)]
                if all(int(k.sum()) * 100 >= round(MIN_VISIBLE * 100) * t for k, t in zip(covered, totals)):
                    inks = covered
                    inks.append(alpha.astype(np.int64) * 255)
                    totals.append(int(alpha.sum()) * 255)
                    objects.append(SceneObject(noun, colour, size, box, variant))
                    break
            else:
                break  # no room for this object: redraw the whole scene
        if len(objects) == n:
            break
    else:
        raise RuntimeError(f"could not place {n} objects in {s}x{s} px after {PLACEMENT_ATTEMPTS} attempts")

    distractors = {int(k) for k in rng.choice(n, size=int(rng.integers(0, n // 2 + 1)), replace=False)}
    luma = _luma(_photo_background(assets.photos[photo], crop, s))
    final = []
    for k, (o, ink, total) in enumerate(zip(objects, inks, totals)):
        x0, y0, x1, y1 = o.bbox
        local = luma[max(0, y0 - 2 * w) : y1 + 2 * w, max(0, x0 - 2 * w) : x1 + 2 * w]  # the photo around and under it
        outline = "white" if int(local.sum()) < OUTLINE_LUMA_SPLIT * local.size else "black"  # integers: exact
        visible = int(ink.sum()) / total if total else 1.0
        final.append(SceneObject(o.shape, o.colour, o.size, o.bbox, o.variant, visible, k in distractors, outline))
    # background and texture_seed are the plain flavours'; the photo crop replaces them.
    return Scene(final, s, "cluttered", (0, 0, 0), None, margin, photo, crop, w, nouns)


def _cover(ink: np.ndarray, bbox: tuple[int, int, int, int], foot: np.ndarray, at: tuple[int, int]) -> np.ndarray:
    """`ink` (the visible ink of an object at `bbox`) after a footprint `foot` (alpha 0..255)
    is drawn with its top-left corner at `at`: each covered pixel keeps (255 - foot) / 255."""
    x0, y0 = bbox[0], bbox[1]
    fx0, fy0 = at
    h, w = ink.shape
    fh, fw = foot.shape
    ox0, oy0 = max(x0, fx0), max(y0, fy0)
    ox1, oy1 = min(x0 + w, fx0 + fw), min(y0 + h, fy0 + fh)
    if ox0 >= ox1 or oy0 >= oy1:
        return ink
    out = ink.copy()
    f = foot[oy0 - fy0 : oy1 - fy0, ox0 - fx0 : ox1 - fx0].astype(np.int64)
    out[oy0 - y0 : oy1 - y0, ox0 - x0 : ox1 - x0] = out[oy0 - y0 : oy1 - y0, ox0 - x0 : ox1 - x0] * (255 - f) // 255
    return out


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    """Boxes separated by at least `gap` pixels along x or along y."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


# --------------------------------------------------------------------------- rendering


@dataclass
class Assets:
    """What drawing needs beyond the scene: cached shape masks, Fashion-MNIST photos, and
    for the cluttered flavour the split, the background photos and the nouns in use."""

    flavour: str
    fashion_images: np.ndarray | None = None  # (N, 28, 28) uint8, one split
    fashion_by_class: list[np.ndarray] | None = None  # photo indices of each label
    masks: dict = field(default_factory=dict)  # (shape, side) -> alpha, filled lazily
    split: str = "train"
    photos: dict[str, np.ndarray] | None = None  # cluttered: BACKGROUND_PHOTOS, (H, W, 3) uint8

    @property
    def nouns(self) -> tuple[str, ...]:
        return vocabulary(self.flavour, fashion=self.fashion_images is not None)


def load_assets(cfg: ScenesConfig, split: str = "train") -> Assets:
    """Assets for one split: the fashion flavour reads that split's Fashion-MNIST photos;
    the cluttered flavour also the background photos, and Fashion-MNIST only if present."""
    if cfg.flavour == "shapes":
        return Assets(cfg.flavour, split=split)
    folder = fashion_dir(cfg.fashion_path) if cfg.flavour == "fashion" else cluttered_fashion_dir(cfg.fashion_path)
    images = by_class = None
    if folder is not None:
        images, labels = load_fashion(folder, split)
        by_class = [np.flatnonzero(labels == k) for k in range(len(FASHION_ITEMS))]
        for k, pool in enumerate(by_class):
            if len(pool) == 0:
                raise UserError(f"the {split} split has no {FASHION_ITEMS[k]} (label {k}) photos", where="--fashion-path")
    if cfg.flavour == "fashion":
        return Assets("fashion", images, by_class, split=split)
    return Assets("cluttered", images, by_class, split=split, photos=load_photos())  # no images: shapes only


def render(scene: Scene, cfg: ScenesConfig, assets: Assets | None = None) -> Image.Image:
    """Draw a scene as an RGB image. Pass `assets` when rendering many scenes (the
    fashion flavour would otherwise reload Fashion-MNIST's train split on every call)."""
    if assets is None:
        assets = load_assets(cfg, "train")
    if scene.flavour == "cluttered":
        return _render_cluttered(scene, assets)
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


def _render_cluttered(scene: Scene, assets: Assets) -> Image.Image:
    """The photo crop, then each object in order: its outline (the fill's alpha dilated by
    scene.outline_px) and its fill, so later objects cover earlier ones."""
    w = scene.outline_px
    canvas = _photo_background(assets.photos[scene.photo], scene.crop, scene.image_size)
    for obj in scene.objects:
        alpha, rgb = _object_layers(obj, assets)
        x0, y0, x1, y1 = obj.bbox
        foot = _dilate(alpha, w)[..., None]  # (side + 2w, side + 2w, 1)
        under = canvas[y0 - w : y1 + w, x0 - w : x1 + w]  # a view: writing it draws the outline
        under[...] = (under * (255 - foot) + np.array(OUTLINES[obj.outline], np.int32) * foot + 127) // 255
        a = alpha[..., None]
        canvas[y0:y1, x0:x1] = (canvas[y0:y1, x0:x1] * (255 - a) + rgb * a + 127) // 255
    return Image.fromarray(canvas.astype(np.uint8))


def _photo_background(photo: np.ndarray, crop: tuple[int, int, int, int], s: int) -> np.ndarray:
    """(s, s, 3) int32: the crop resized, its saturation and contrast turned down."""
    x0, y0, x1, y1 = crop
    img = Image.fromarray(photo[y0:y1, x0:x1]).resize((s, s), Image.Resampling.LANCZOS)
    rgb = np.asarray(img, np.int32)
    luma = _luma(rgb)[..., None]
    sat = round(BACKGROUND_SATURATION * 100)
    rgb = luma + (rgb - luma) * sat // 100
    mean = int(luma.mean())
    con = round(BACKGROUND_CONTRAST * 100)
    return np.clip(mean + (rgb - mean) * con // 100, 0, 255)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """Rec. 601 luma (..., ) int of RGB (..., 3) ints."""
    return (299 * rgb[..., 0] + 587 * rgb[..., 1] + 114 * rgb[..., 2]) // 1000


def _dilate(alpha: np.ndarray, w: int) -> np.ndarray:
    """(H + 2w, W + 2w) max of `alpha` over a (2w + 1)-square window: its outline footprint."""
    h, wd = alpha.shape
    padded = np.zeros((h + 4 * w, wd + 4 * w), alpha.dtype)
    padded[2 * w : 2 * w + h, 2 * w : 2 * w + wd] = alpha
    out = np.zeros((h + 2 * w, wd + 2 * w), alpha.dtype)
    for dy in range(2 * w + 1):
        for dx in range(2 * w + 1):
            np.maximum(out, padded[dy : dy + h + 2 * w, dx : dx + wd + 2 * w], out=out)
    return out


def _object_layers(obj: SceneObject, assets: Assets) -> tuple[np.ndarray, np.ndarray]:
    """(alpha (side, side) int32 0..255, rgb (3,) or (side, side, 3) int32) of a cluttered
    object: a drawn shape in flat colour, or a tinted Fashion-MNIST photo made opaque
    inside its silhouette (dark folds and prints would let the photo show through; only
    the rim keeps its soft edge, and the shading keeps the item's texture)."""
    if obj.shape not in FASHION_ITEMS:
        return _shape_mask(obj.shape, obj.bbox[2] - obj.bbox[0], assets), np.array(COLOURS[obj.colour], np.int32)
    from scipy import ndimage  # a dependency of scikit-image, which the cluttered flavour needs

    alpha, rgb = _fashion_layers(obj, assets, CLUTTERED_INK_THRESHOLD)
    inside = ndimage.binary_erosion(ndimage.binary_fill_holes(alpha > 0))
    return np.where(inside, 255, alpha).astype(np.int32), rgb


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


def _fashion_layers(obj: SceneObject, assets: Assets, threshold: int = INK_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, rgb) of a Fashion-MNIST photo tinted with the object's colour.

    The photo is cropped to its ink, scaled to fit the box keeping its aspect, and
    centred. Ink intensity sets opacity (the faint rim fades out) and shading (70–100%
    of the colour), so the item keeps its texture but reads as one colour. Pixels at or
    below `threshold` are background (the cluttered flavour cuts higher: see
    CLUTTERED_INK_THRESHOLD).
    """
    if assets.fashion_images is None:
        raise ValueError("rendering a fashion scene needs assets from load_assets(cfg, split)")
    pool = assets.fashion_by_class[FASHION_ITEMS.index(obj.shape)]
    photo = assets.fashion_images[pool[obj.variant % len(pool)]]
    ys, xs = np.nonzero(photo > threshold)
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
    alpha = np.clip((ink - threshold) * 255 // 40, 0, 255)
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
# distinct objects. Every clause of a conjunction must hold. Only a recognisable object
# (at least MIN_VISIBLE of it visible) matches a phrase; distractors count like any
# object, so a caption true of a distractor is true, and a count counts them.


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


def _mentioned(scene: Scene) -> list[int]:
    """Indices of the objects captions may name: all but the distractors."""
    return [k for k, o in enumerate(scene.objects) if not o.distractor]


def captions(scene: Scene, rng: np.random.Generator, n: int = 4) -> list[str]:
    """`n` distinct true captions. The first is the most complete: full noun phrases,
    and for several objects a chain of relations that mentions every object.

    Distractors are never named. A count caption must list every object, so a scene
    with distractors gets a plain "there is a red circle" where a count would go.
    """
    objs = scene.objects
    named = _mentioned(scene)
    countable = len(named) == len(objs)
    if len(named) == 1:
        obj = objs[named[0]]
        first = _np(obj.size, obj.colour, obj.shape)
    else:
        order = [named[int(k)] for k in rng.permutation(len(named))]
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
    rels = [(i, r, j) for i, r, j in relations(scene) if not (objs[i].distractor or objs[j].distractor)]
    # Draw candidates until there are n distinct ones; the cap only guards against a
    # tiny candidate space (it is never near for n <= 8).
    for _ in range(30 * n):
        if len(out) >= n:
            break
        kind = rng.random()
        if len(named) == 1:
            obj = objs[named[0]]
            if kind < 0.2 and countable:
                cand = _count_caption(rng, [_describe(rng, obj)])
            else:
                cand = PREFIXES[int(rng.integers(len(PREFIXES)))] + _describe(rng, obj)
        elif kind < 0.6:
            i, r, j = rels[int(rng.integers(len(rels)))]
            cand = _relation_clause(rng, _describe(rng, objs[i]), r, _describe(rng, objs[j]))
        elif kind < 0.8 and countable:
            cand = _count_caption(rng, [_describe(rng, o) for o in objs])
        elif kind < 0.8:
            obj = objs[named[int(rng.integers(len(named)))]]
            cand = PREFIXES[1 + int(rng.integers(len(PREFIXES) - 1))] + _describe(rng, obj)
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

    Each candidate is kept only if `scene_satisfies` says it is false of the whole scene,
    distractors included (a swap that happens to describe a distractor is dropped). The
    candidates are built from the named objects (not distractors), like the captions. A
    scene with one named object has nothing to swap or relate, so it gets replace_object
    negatives only.
    """
    objs = scene.objects
    assert all(o.visible >= MIN_VISIBLE for o in objs), "negatives are checked against recognisable objects only"
    named = _mentioned(scene)
    countable = len(named) == len(objs)
    nouns = scene.nouns or vocabulary(scene.flavour)
    absent = [s for s in nouns if s not in {o.shape for o in objs}]
    rels = [(i, r, j) for i, r, j in relations(scene) if not (objs[i].distractor or objs[j].distractor)]
    rels = [rels[int(k)] for k in rng.permutation(len(rels))]
    candidates: dict[str, list[str]] = {k: [] for k in NEGATIVE_KINDS}

    def replaced(obj: SceneObject) -> tuple[str | None, str, str]:
        return (obj.size if rng.random() < 0.5 else None, obj.colour, absent[int(rng.integers(len(absent)))])

    if len(named) == 1:
        obj = objs[named[0]]
        for _ in range(3 * per_kind):
            phrase = _np(*replaced(obj))
            if rng.random() < 0.2 and countable:
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
    if len(objs) > 1 and countable:
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


# --------------------------------------------------------------------------- regions

REGION_KINDS = ("attribute", "object")


def regions(scene: Scene) -> list[dict]:
    """Phrase boxes for phrase grounding (hierdctl eval-grounding), in the layout of docs/eval.md.

    Per object, in object order: its noun phrase as the first caption phrases it, with size
    and colour ("a small blue diamond", kind "attribute"; colour and noun pick exactly one
    object, make_scene's rule), then the bare noun ("a diamond", kind "object") when no other
    object of the scene has that noun (else the bare phrase would name several boxes).
    Captions always give an object's colour, so the bare kind exists only here. Distractors
    get regions too: a phrase names them as well as any object. `bbox` is the object's box,
    `size` its size, `object` its index in `objects`. Uses no RNG."""
    nouns = Counter(o.shape for o in scene.objects)
    out = []
    for k, o in enumerate(scene.objects):
        base = {"bbox": list(o.bbox), "size": o.size, "object": k}
        out.append({"phrase": _np(o.size, o.colour, o.shape), "kind": "attribute"} | base)
        if nouns[o.shape] == 1:
            out.append({"phrase": _np(None, None, o.shape), "kind": "object"} | base)
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
    """Does the phrase describe `obj`? An object hidden beyond MIN_VISIBLE is no evidence."""
    size, colour, noun = phrase
    return (obj.shape == noun and (size is None or obj.size == size) and (colour is None or obj.colour == colour)
            and obj.visible >= MIN_VISIBLE)


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
        # At most 6! assignments of phrases to distinct objects.
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
    scene = make_scene(rng, cfg, assets)
    caps = captions(scene, rng, cfg.captions_per_image)
    key = f"{index:09d}"
    objects = [{"shape": o.shape, "colour": o.colour, "size": o.size, "bbox": list(o.bbox)} for o in scene.objects]
    if scene.flavour == "cluttered":
        for d, o in zip(objects, scene.objects):
            d.update(visible=round(o.visible, 4), distractor=o.distractor, outline=o.outline)
    meta = {
        "key": key,
        "captions": caps,
        "objects": objects,
        "relations": [[i, r, j] for i, r, j in relations(scene)],
        "flavour": scene.flavour,
        "seed": seed,
    }
    if scene.flavour == "cluttered":
        meta["background"] = {"photo": scene.photo, "crop": list(scene.crop)}
        meta["outline_px"] = scene.outline_px
    if split == "test":
        meta["hard_negatives"] = hard_negatives(scene, rng, cfg.negatives_per_kind)
    meta["regions"] = regions(scene)  # last, and drawn from no RNG: every other byte is as before

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
_CB_SHARD_RE = re.compile(r"^\d+\.tar(\.tmp\d*)?$")  # CLIP_benchmark names shards 0.tar, 1.tar, ...
CLIP_BENCHMARK_DIR = "clip_benchmark"


def _written_by_scenes(manifest: Path) -> bool:
    """True if `manifest` is a scenes.json that hierdctl scenes wrote (its "generator")."""
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("generator") == "hierdctl.scenes"
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def _write_split(cfg: ScenesConfig, split: str, n: int, folder: Path, cb_folder: Path | None = None) -> dict:
    """Write one split's shards and stats.json; with `cb_folder`, also its CLIP_benchmark
    copy there: shard k as k.tar, each sample's image and all its captions in KEY.txt."""
    for d in (folder, cb_folder):  # a link in the output folder is removed as a link, never written through
        if d is not None and d.is_symlink():
            d.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(n / cfg.shard_size)
    shard_names = [f"{k:05d}.tar" for k in range(n_shards)]
    # Shards left by an earlier, larger run (or an interrupted one) would mix in.
    for p in folder.iterdir():
        if _SHARD_RE.match(p.name) and p.name not in shard_names:
            p.unlink()
    if cb_folder is not None:
        cb_folder.mkdir(parents=True, exist_ok=True)
        for p in cb_folder.iterdir():
            if _CB_SHARD_RE.match(p.name) and p.name not in {f"{k}.tar" for k in range(n_shards)}:
                p.unlink()

    names = ["objects_per_image", "shapes", "colours", "sizes", "relations", "regions", "hard_negatives"]
    if cfg.flavour == "cluttered":
        names += ["distractors_per_image", "backgrounds", "outlines"]
    counts = {name: Counter() for name in names}
    visible: list[float] = []
    n_captions = 0
    assets = load_assets(cfg, split) if n else None
    for shard, name in enumerate(shard_names):
        members: list[tuple[str, bytes]] = []
        cb_members: list[tuple[str, bytes]] = []
        for index in range(shard * cfg.shard_size, min(n, (shard + 1) * cfg.shard_size)):
            key, sample_members, meta = make_sample(cfg, split, index, assets)
            members += sample_members
            if cb_folder is not None:
                # CLIP_benchmark reads KEY.txt with str.splitlines: one caption a line.
                assert all("\n" not in c and "\r" not in c for c in meta["captions"]), key
                cb_members += [sample_members[0], (f"{key}.txt", "\n".join(meta["captions"]).encode("utf-8"))]
            if cfg.flavour == "cluttered":
                counts["distractors_per_image"][str(sum(o["distractor"] for o in meta["objects"]))] += 1
                counts["backgrounds"][meta["background"]["photo"]] += 1
                for o in meta["objects"]:
                    counts["outlines"][o["outline"]] += 1
                    visible.append(o["visible"])
            counts["objects_per_image"][str(len(meta["objects"]))] += 1
            for o in meta["objects"]:
                counts["shapes"][o["shape"]] += 1
                counts["colours"][o["colour"]] += 1
                counts["sizes"][o["size"]] += 1
            for _i, r, _j in meta["relations"]:
                counts["relations"][r] += 1
            for region in meta["regions"]:
                counts["regions"][region["kind"]] += 1
            for kind, negs in meta.get("hard_negatives", {}).items():
                counts["hard_negatives"][kind] += len(negs)
            n_captions += len(meta["captions"])
        write_tar_atomic(folder / name, members)
        if cb_folder is not None:
            write_tar_atomic(cb_folder / f"{shard}.tar", cb_members)
    if cb_folder is not None:
        write_bytes_atomic(cb_folder / "nshards.txt", f"{n_shards}\n".encode())

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
    if visible:
        stats["visible"] = {
            "objects": len(visible),
            "occluded": sum(v < 1 for v in visible),  # partly covered by a later object
            "mean": round(sum(visible) / len(visible), 4),
            "min": min(visible),
        }
    write_json_atomic(folder / "stats.json", stats)
    return stats


def clip_benchmark_command(root: str | Path = f"OUT/{CLIP_BENCHMARK_DIR}", shards: int = 1) -> str:
    """How to run CLIP_benchmark on the copy at `root` (the files say OUT/clip_benchmark, so
    they do not depend on where the output was written), with MODEL_DIR the one thing to fill
    in. --output is needed: the default file name holds the model name, and "local-dir:PATH"
    has slashes. --no_amp: fp32, as hierdctl's eval-retrieval computes (amp's bf16 on CPU can
    reorder near ties). --num_workers at most the number of shards: CLIP_benchmark's default
    of 4 DataLoader workers over fewer shards leaves a worker without data, and webdataset
    then stops the run ("No samples found in dataset; perhaps you have fewer shards than
    workers")."""
    import shlex

    return (f"clip_benchmark eval --dataset wds/scenes --dataset_root {shlex.quote(str(root))} "
            "--task zeroshot_retrieval --model local-dir:MODEL_DIR --pretrained none --recall_k 1 5 10 --no_amp "
            f"--num_workers {max(1, min(4, shards))} --output scenes_clip_benchmark.json")


def run(cfg: ScenesConfig) -> dict:
    """Generate both splits under cfg.out; return the manifest plus per-split stats."""
    cfg.validate()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder", where="--out")
    # Regenerating over an earlier Scenes output is fine; writing into anything else is not.
    if out.is_dir() and any(out.iterdir()) and not _written_by_scenes(out / "scenes.json"):
        raise UserError(f"{out} is not empty and holds no scenes.json of hierdctl scenes: pick a new or empty folder",
                        where="--out")
    from hierdctl.atomic import check_writable

    check_writable(out, "--out")
    out.mkdir(parents=True, exist_ok=True)

    cb = out / CLIP_BENCHMARK_DIR
    if cb.is_symlink():  # removed as a link: what it points to is not ours
        cb.unlink()
    if not cfg.clip_benchmark and cb.is_dir() and _written_by_scenes(cb / "scenes.json"):
        shutil.rmtree(cb)  # an earlier run's copy of a test split that is about to change
    stats = {
        "train": _write_split(cfg, "train", cfg.n_train, out / "train"),
        "test": _write_split(cfg, "test", cfg.n_test, out / "test", cb / "test" if cfg.clip_benchmark else None),
    }
    config = {k: v for k, v in vars(cfg).items() if k != "out"}  # the manifest lives in out
    config["min_objects"], config["max_objects"] = cfg.object_range()  # the flavour's defaults filled in
    config["textured_fraction"] = None if cfg.flavour == "cluttered" else cfg.texture_share()
    nouns = vocabulary(cfg.flavour)
    if cfg.flavour == "fashion":
        config["fashion_path"] = str(fashion_dir(cfg.fashion_path))
    if cfg.flavour == "cluttered":
        folder = cluttered_fashion_dir(cfg.fashion_path)
        config["fashion_path"] = None if folder is None else str(folder)
        nouns = vocabulary("cluttered", fashion=folder is not None)
    manifest = {
        "generator": "hierdctl.scenes",
        "version": GENERATOR_VERSION,
        "config": config,
        "counts": {split: s["count"] for split, s in stats.items()},
        "shards": {split: len(s["shards"]) for split, s in stats.items()},
        "vocabulary": {
            "shapes": list(nouns),
            "colours": list(COLOURS),
            "sizes": list(SIZES),
            "relations": list(RELATIONS),
        },
        "relation_margin_px": RELATION_MARGIN * cfg.image_size,
        "negative_kinds": list(NEGATIVE_KINDS),
        "region_kinds": list(REGION_KINDS),
    }
    if cfg.flavour == "cluttered":
        import skimage

        photos = load_photos()
        manifest["cluttered"] = {
            "objects": "shapes and Fashion-MNIST items" if folder is not None
            else "shapes only: Fashion-MNIST not found (install Debian's dataset-fashion-mnist or pass --fashion-path)",
            "fashion_mnist": config["fashion_path"],
            "backgrounds": {
                "source": f"scikit-image {skimage.__version__} sample photos (skimage.data, bundled in the wheel)",
                "photos": list(BACKGROUND_PHOTOS),
                # Per photo, the (x0, y0, x1, y1) region each split's crops come from: disjoint.
                "regions": {name: {split: list(crop_region(p.shape, split)) for split in SPLIT_IDS} for name, p in photos.items()},
                "crop_side_px": list(CROP_SIDE),
                "saturation": BACKGROUND_SATURATION,
                "contrast": BACKGROUND_CONTRAST,
            },
            "min_visible": MIN_VISIBLE,
            "outline_px": max(1, round(cfg.image_size / 64)),
        }
    if cfg.clip_benchmark:
        # CLIP_benchmark's wds/ layout: dataset_type.txt beside test/{nshards.txt, 0.tar, ...}.
        write_bytes_atomic(cb / "dataset_type.txt", b"retrieval\n")
        n_shards = len(stats["test"]["shards"])
        manifest["clip_benchmark"] = {"dir": CLIP_BENCHMARK_DIR, "split": "test", "shards": n_shards,
                                      "command": clip_benchmark_command(shards=n_shards)}
        write_json_atomic(cb / "scenes.json", {"generator": "hierdctl.scenes", "version": GENERATOR_VERSION,
                                              "layout": "CLIP_benchmark wds (retrieval)", "of": "../test",
                                              "count": cfg.n_test, **manifest["clip_benchmark"]})
    write_json_atomic(out / "scenes.json", manifest)
    summary = {"out": str(out), **manifest, "stats": stats}
    if cfg.clip_benchmark:
        summary["clip_benchmark"] = {**manifest["clip_benchmark"],
                                     "command": clip_benchmark_command(cb, manifest["clip_benchmark"]["shards"])}
    return summary
