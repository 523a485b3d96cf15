"""Phrase grounding from patch tokens: where on the patch grid a model puts a phrase.

The library half of `hierdctl eval-grounding` (stages/eval_grounding.py reads the data and
writes the report); nothing here reads a source or prints.

1. **Patch tokens** in the joint embedding space: `ClipEncoder.encode_image(x,
   want_patches=True)`, the path cache-teacher clusters and the student's cluster pooling
   use (open_clip ViTs: the final transformer tokens through `ln_post`, then `@ proj`;
   transformers CLIPModels: `post_layernorm`, then `visual_projection`), L2-normalised.
2. **Geometry.** A box is given in original pixels; the model saw the image through its own
   eval preprocessing (open_clip: resize the shorter side + centre crop, or resize only for
   `resize_mode: squash`, or keep-ratio resize + centre crop/pad for `longest`). Each step
   is an axis-aligned scale or shift, so the whole preprocessing is one affine map
   `u = x·sx − ox, v = y·sy − oy` from original to model-input pixels (`Geometry`), computed
   with the same integer arithmetic as torchvision / open_clip / hierdctl's hf transform.
   Coordinates are continuous: pixel i covers [i, i + 1), a box [x0, y0, x1, y1] covers
   [x0, x1) × [y0, y1). Patch (r, c) of a gh × gw grid covers model pixels
   [c·pw, (c+1)·pw) × [r·ph, (r+1)·ph); tokens are in row-major order (r·gw + c).
3. **Metrics, per region** (its phrase's text embedding t, the image's tokens p_g, and
   s_g = cos(p_g, t) for every patch g), with the box clipped to the model's input:
   - pointing game: hit when the centre of the best patch (argmax_g s_g, first on ties)
     lies inside the box;
   - box mass: Σ_g a_g·max(s_g, 0) / Σ_g max(s_g, 0), where a_g ∈ [0, 1] is the share of
     patch g's area that lies inside the box (0 when no similarity is positive);
   - chance levels beside them: `pointing_acc_chance` = the share of patch centres inside
     the box (what a uniformly random patch scores), `box_mass_chance` = the box's share of
     the model's input area (the crop as the model sees it: what a constant similarity
     scores, since Σ_g a_g / G is that share when the patches tile the input);
   - a phrase-agnostic control, `pointing_acc_control` / `box_mass_control`: the same two
     scores with the phrase replaced by the image's mean phrase (the L2-normalised mean of
     the embeddings of all the image's scored phrases). It knows which objects the image
     holds, not which one is asked for: a model that only points at salient things (a
     random-init ViT already does, well above chance) scores as well with it as with the
     phrase; the gap between a score and its control is what the phrase itself adds.
   A box with no area inside the model's input (cut away by the centre crop) is not scored:
   `cover` marks it and the stage counts it as `box_outside_crop`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

SIZE_ORDER = ("small", "medium", "large")
# COCO's object-size buckets (cocodataset.org/#detection-eval), here on the box area in
# original pixels: for regions whose data names no size.
COCO_SMALL, COCO_MEDIUM = 32**2, 96**2
SCORE_NAMES = ("pointing_acc", "pointing_acc_control", "pointing_acc_chance",
               "box_mass", "box_mass_control", "box_mass_chance")


class Unsupported(Exception):
    """A model eval-grounding cannot score: the message is the one-line reason."""


# ----------------------------------------------------------------------------------
# Regions as the data gives them
# ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    phrase: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in original pixels, x1/y1 exclusive
    kind: str | None = None  # e.g. Scenes' "attribute" / "object"; None: the data says nothing
    size: str | None = None  # the data's own size bucket; None: COCO's area buckets decide


def read_regions(meta) -> tuple[list[Region] | None, int]:
    """(the sample's well-formed regions, how many entries were malformed); (None, 0) when the
    sample carries no `regions` list at all. Well-formed: a non-empty phrase, a bbox of four
    finite numbers with x0 < x1 and y0 < y1; `kind` and `size` are kept when they are strings."""
    raw = meta.get("regions") if isinstance(meta, dict) else None
    if not isinstance(raw, list):
        return None, 0
    out, bad = [], 0
    for r in raw:
        phrase = r.get("phrase") if isinstance(r, dict) else None
        box = r.get("bbox") if isinstance(r, dict) else None
        phrase = " ".join(phrase.split()) if isinstance(phrase, str) else ""
        ok = (phrase and isinstance(box, (list, tuple)) and len(box) == 4
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
              and box[0] < box[2] and box[1] < box[3])
        if not ok:
            bad += 1
            continue
        kind, size = r.get("kind"), r.get("size")
        out.append(Region(phrase, tuple(float(v) for v in box), kind if isinstance(kind, str) else None,
                          size if isinstance(size, str) else None))
    return out, bad


def size_bucket(region: Region) -> str:
    """The data's size, else COCO's bucket of the box area in original pixels."""
    if region.size is not None:
        return region.size
    x0, y0, x1, y1 = region.box
    area = (x1 - x0) * (y1 - y0)
    return "small" if area < COCO_SMALL else "medium" if area < COCO_MEDIUM else "large"


# ----------------------------------------------------------------------------------
# Geometry: original pixels -> model input pixels -> patches
# ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Original pixel (x, y) -> model-input pixel (x·sx − ox, y·sy − oy); the input is out_w × out_h."""

    sx: float
    sy: float
    ox: float
    oy: float
    out_w: int
    out_h: int

    def map_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """(R,4) original-pixel boxes -> (R,4) model-input boxes (not clipped)."""
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        return np.stack([b[:, 0] * self.sx - self.ox, b[:, 1] * self.sy - self.oy,
                         b[:, 2] * self.sx - self.ox, b[:, 3] * self.sy - self.oy], axis=1)


class _Size:
    """What open_clip's ResizeKeepRatio.get_params reads of an image: `.size` = (w, h)."""

    def __init__(self, w: int, h: int):
        self.size = (w, h)


def _shortest(w: int, h: int, size: int, max_size: int | None) -> tuple[int, int]:
    """torchvision's Resize(int) output (w, h): the shorter side to `size`, the longer floored
    (transforms.functional._compute_resized_output_size)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if w <= h else (new_long, new_short)


def _steps(transform) -> list:
    """The steps of an eval transform: a torchvision Compose's, or the transform itself."""
    return list(transform.transforms) if hasattr(transform, "transforms") else [transform]


# Steps that move no pixel: mode conversion, to-tensor, normalisation.
_NEUTRAL = {"MaybeConvertMode", "MaybeToTensor", "ToTensor", "PILToTensor", "Normalize", "ConvertImageDtype",
            "ToImage", "ToDtype", "_convert_to_rgb"}


def geometry_plan(transform) -> tuple[Callable[[int, int], Geometry], str]:
    """(function (w, h) -> Geometry, a description) for an eval transform whose geometric steps
    are known: torchvision Resize (shorter side, or both sides = squash) and CenterCrop (with
    its padding when the image is smaller), open_clip's ResizeKeepRatio (without random
    scale/aspect) and CenterCropOrPad, and hierdctl's transform for hf: specs (its
    `resize_crop`). Anything else raises Unsupported naming the step."""
    ops, words = [], []
    for t in _steps(transform):
        name = getattr(t, "__name__", None) or type(t).__name__
        if hasattr(t, "resize_crop"):  # specs._pil_eval_transform: shorter side (rounded) + centre crop
            short, crop = t.resize_crop
            ops.append(("hf", short, crop))
            words.append(f"resize the shorter side to {short} (rounded), centre crop {crop}×{crop}")
            break  # it is the whole transform
        if name in _NEUTRAL:
            continue
        if name == "Resize" and type(t).__module__.startswith("torchvision.transforms"):
            size = t.size
            if isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 1):
                ops.append(("shortest", int(size if isinstance(size, int) else size[0]), t.max_size))
                words.append(f"resize the shorter side to {ops[-1][1]}")
            elif isinstance(size, (list, tuple)) and len(size) == 2:
                ops.append(("squash", int(size[0]), int(size[1])))
                words.append(f"resize to {size[1]}×{size[0]} (resize only: aspect not kept)")
            else:
                raise Unsupported(f"its eval preprocessing resizes to {size!r}, which eval-grounding cannot map")
        elif name in ("CenterCrop", "CenterCropOrPad"):
            h, w = (int(v) for v in t.size)
            ops.append(("crop", h, w))
            words.append(f"centre crop {w}×{h}")
        elif name == "ResizeKeepRatio":
            if t.random_scale_prob > 0 or t.random_aspect_prob > 0:
                raise Unsupported("its eval preprocessing resizes at random (ResizeKeepRatio with random scale)")
            ops.append(("keep_ratio", tuple(int(v) for v in t.size), float(t.longest)))
            words.append(f"resize keeping the aspect to {t.size[1]}×{t.size[0]} ({'longest' if t.longest else 'shortest'} side)")
        else:
            raise Unsupported(f"its eval preprocessing has a step eval-grounding cannot map to original pixels ({name})")

    def plan(w: int, h: int) -> Geometry:
        sx = sy = 1.0
        ox = oy = 0.0
        cw, ch = w, h  # the current image size
        for op in ops:
            if op[0] in ("shortest", "squash", "keep_ratio", "hf"):
                if op[0] == "shortest":
                    nw, nh = _shortest(cw, ch, op[1], op[2])
                elif op[0] == "squash":
                    nh, nw = op[1], op[2]
                elif op[0] == "keep_ratio":
                    from open_clip.transform import ResizeKeepRatio

                    nh, nw = ResizeKeepRatio.get_params(_Size(cw, ch), op[1], op[2])
                else:  # hf: specs._pil_eval_transform, resize then crop in one
                    r = op[1] / min(cw, ch)
                    nw, nh = max(op[2], round(cw * r)), max(op[2], round(ch * r))
                kx, ky = nw / cw, nh / ch  # PIL and torchvision resize map pixel edges linearly
                sx, sy, ox, oy = sx * kx, sy * ky, ox * kx, oy * ky
                cw, ch = nw, nh
                if op[0] != "hf":
                    continue
                op = ("crop", op[2], op[2])
            _, crop_h, crop_w = op  # torchvision center_crop / open_clip center_crop_or_pad
            if crop_w > cw or crop_h > ch:  # pad first (left/top get the floor of half the gap)
                pl = (crop_w - cw) // 2 if crop_w > cw else 0
                pt = (crop_h - ch) // 2 if crop_h > ch else 0
                ox, oy = ox - pl, oy - pt
                cw += pl + ((crop_w - cw + 1) // 2 if crop_w > cw else 0)
                ch += pt + ((crop_h - ch + 1) // 2 if crop_h > ch else 0)
            left, top = int(round((cw - crop_w) / 2.0)), int(round((ch - crop_h) / 2.0))
            ox, oy = ox + left, oy + top
            cw, ch = crop_w, crop_h
        return Geometry(sx, sy, ox, oy, cw, ch)

    return plan, ", ".join(words) or "none (the image as it is)"


@dataclass(frozen=True)
class PatchGrid:
    rows: int
    cols: int
    ph: float  # a patch's height and width in model-input pixels
    pw: float

    @property
    def size(self) -> int:
        return self.rows * self.cols


def patch_grid(encoder) -> PatchGrid:
    """The encoder's patch grid and patch size in input pixels (open_clip: visual.patch_size;
    transformers: vision_config.patch_size; else the input side over the grid side)."""
    gh, gw = encoder.patch_grid
    ps = getattr(getattr(encoder.model, "visual", None), "patch_size", None)
    if ps is None:
        ps = getattr(getattr(getattr(encoder.model, "config", None), "vision_config", None), "patch_size", None)
    if ps is None:
        ph, pw = encoder.image_size / gh, encoder.image_size / gw
    else:
        ph, pw = (ps, ps) if isinstance(ps, (int, float)) else ps
    return PatchGrid(int(gh), int(gw), float(ph), float(pw))


@dataclass
class Cover:
    """Where R boxes lie on the patch grid of one image (all arrays over the R boxes)."""

    area: np.ndarray  # (R,G) share of each patch's area inside the box, in [0, 1]
    centre: np.ndarray  # (R,G) bool: the patch's centre lies inside the box
    inside: np.ndarray  # (R,) bool: the box has area inside the model's input (else not scored)
    clipped: np.ndarray  # (R,) bool: part of the box lies outside the model's input
    share: np.ndarray  # (R,) the clipped box's share of the model's input area


def cover(boxes: np.ndarray, geometry: Geometry, grid: PatchGrid) -> Cover:
    """Map (R,4) original-pixel boxes onto the patch grid (module docstring, point 2)."""
    b = geometry.map_boxes(boxes)  # (R,4) model-input pixels
    W, H = geometry.out_w, geometry.out_h
    c = np.stack([np.clip(b[:, 0], 0, W), np.clip(b[:, 1], 0, H), np.clip(b[:, 2], 0, W), np.clip(b[:, 3], 0, H)], 1)
    full = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    kept = np.maximum(c[:, 2] - c[:, 0], 0) * np.maximum(c[:, 3] - c[:, 1], 0)
    x0 = np.arange(grid.cols) * grid.pw  # (gw,) patch left edges
    y0 = np.arange(grid.rows) * grid.ph
    ox = np.clip(np.minimum(c[:, 2:3], x0 + grid.pw) - np.maximum(c[:, 0:1], x0), 0, None) / grid.pw  # (R,gw)
    oy = np.clip(np.minimum(c[:, 3:4], y0 + grid.ph) - np.maximum(c[:, 1:2], y0), 0, None) / grid.ph  # (R,gh)
    cx, cy = x0 + grid.pw / 2, y0 + grid.ph / 2
    inx = (cx >= c[:, 0:1]) & (cx < c[:, 2:3])  # (R,gw)
    iny = (cy >= c[:, 1:2]) & (cy < c[:, 3:4])  # (R,gh)
    R = len(b)
    area = (oy[:, :, None] * ox[:, None, :]).reshape(R, grid.size)
    centre = (iny[:, :, None] & inx[:, None, :]).reshape(R, grid.size)
    return Cover(area, centre, kept > 0, kept < full * (1 - 1e-9), kept / (W * H))


# ----------------------------------------------------------------------------------
# Tokens, scoring, metrics
# ----------------------------------------------------------------------------------


def unsupported(encoder) -> str | None:
    """Why eval-grounding cannot score this model, in one line; None when it can."""
    if encoder.patch_grid is None:
        return ("it exposes no patch tokens in the joint space (only plain ViTs do: ResNet, ConvNeXt/timm "
                "and attention-pooled towers have none)")
    try:
        geometry_plan(encoder.eval_transform)
    except Unsupported as e:
        return str(e)
    return None


def patch_tokens(encoder, x):
    """(B,G,D) float32 L2-normalised patch tokens in the joint space for a (B,3,H,W) batch."""
    import torch.nn.functional as F

    _, tokens = encoder.encode_image(x, want_patches=True)
    if tokens is None:
        raise Unsupported("it returned no patch tokens")
    G = encoder.patch_grid[0] * encoder.patch_grid[1]
    if tokens.shape[1] != G:  # e.g. a ViT pooled with pool_type 'none': the class token stays in
        raise Unsupported(f"it returns {tokens.shape[1]} tokens per image for a {encoder.patch_grid[0]}×"
                          f"{encoder.patch_grid[1]} patch grid")
    return F.normalize(tokens.float(), dim=-1)


def score(tokens, phrases):
    """Cosine similarity of every phrase with every patch of its own image, one batched matmul.

    tokens (B,G,D) and phrases (B,R,D), both L2-normalised (rows of padding are zero; the
    stage puts each image's control query, its mean phrase, in one of the rows) -> (B,R,G)."""
    import torch

    assert tokens.shape[0] == phrases.shape[0] and tokens.shape[2] == phrases.shape[2], (tokens.shape, phrases.shape)
    return torch.bmm(phrases, tokens.transpose(1, 2))


def region_scores(sims: np.ndarray, area: np.ndarray, centre: np.ndarray) -> dict[str, np.ndarray]:
    """Per region (module docstring, point 3): sims, area (R,G), centre (R,G) bool -> (R,) arrays
    `hit` (bool), `mass` and `positive` (bool: some similarity was > 0)."""
    assert sims.shape == area.shape == centre.shape, (sims.shape, area.shape, centre.shape)
    best = sims.argmax(axis=1)  # first maximum on ties
    hit = centre[np.arange(len(sims)), best]
    pos = np.maximum(sims, 0.0)
    total = pos.sum(axis=1)
    mass = np.divide((pos * area).sum(axis=1), total, out=np.zeros_like(total), where=total > 0)
    return {"hit": hit, "mass": mass, "positive": total > 0}


def summarise(values: dict[str, np.ndarray], kinds: list, sizes: list[str]) -> tuple[dict, dict]:
    """(metrics, region counts) over all regions, then per phrase kind (where the data names
    one) and per size bucket. `values` holds one (R,) array per name of SCORE_NAMES. Metric
    names: `<score>/all`, `<score>/kind:<kind>`, `<score>/size:<bucket>`; every value a mean
    over the group's regions."""
    values = {name: np.asarray(values[name], np.float64) for name in SCORE_NAMES}
    assert all(len(v) == len(kinds) == len(sizes) for v in values.values()), {k: v.shape for k, v in values.items()}
    kinds_a, sizes_a = np.asarray(kinds, object), np.asarray(sizes, object)
    groups = [("all", np.ones(len(kinds_a), bool))]
    groups += [(f"kind:{k}", kinds_a == k) for k in sorted({k for k in kinds if k is not None})]
    order = [s for s in SIZE_ORDER if s in set(sizes)] + sorted(set(sizes) - set(SIZE_ORDER))
    groups += [(f"size:{s}", sizes_a == s) for s in order]
    metrics, counts = {}, {}
    for group, mask in groups:
        n = int(mask.sum())
        if n == 0:
            continue
        counts[group] = n
        for name in SCORE_NAMES:
            metrics[f"{name}/{group}"] = round(float(values[name][mask].mean()), 6)
    return metrics, counts
