"""Image decoding (PIL only) and the views a teacher saw, reapplicable at any resolution.

Every stage decodes images through `decode_rgb`, so the teacher and the student see the
same pixels: grayscale, palette, CMYK, alpha and 16-bit images are converted to 8-bit
RGB the same way everywhere (alpha is composited over white). Undecodable, truncated or
over-large images raise `BadImage` with a reason that the stages count.

A *view* is how a training image was cut: view 0 is the model's own eval preprocessing
(resize the shorter side, centre crop); other views are RandomResizedCrop + flip whose
box is stored in original-pixel coordinates, so a student at another resolution can
reapply exactly the crop the teacher saw (as Apple's DataCompDR does).
"""

from __future__ import annotations

import io
import math
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .configs import DEFAULT_MAX_PIXELS  # one declaration of PIL's decompression-bomb threshold

# decode_rgb applies the caller's max_pixels itself; PIL's warning at its own global threshold
# would only repeat that check on stderr (and warnings.catch_warnings is not thread-safe).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class BadImage(Exception):
    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, str | None]:
    """Decode to 8-bit RGB. Returns (image, original mode if it was converted, else None).

    `max_pixels` alone decides what is a decompression bomb: the size is read from the
    header and checked before any pixel is decoded, whatever PIL's global limit says."""
    return load_rgb(open_checked(data, max_pixels))


def open_checked(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image with its header read and its size checked (empty, bomb, zero size), no pixel
    decoded: `load_rgb` decodes it, after an optional `Image.draft` (see `decode_view`)."""
    if not data:
        raise BadImage("empty_image")
    img = _open(data)
    w, h = img.size
    if w * h > max_pixels:  # checked before any pixel is decoded
        raise BadImage("decompression_bomb", f"{w}x{h} > {max_pixels} pixels")
    if w < 1 or h < 1:
        raise BadImage("corrupt_image", f"size {w}x{h}")
    return img


def load_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Decode an `open_checked` image to 8-bit RGB: (image, original mode if converted, else None)."""
    try:
        img.load()
    except Image.DecompressionBombError as e:  # a later frame (GIF) larger than PIL's limit
        raise BadImage("decompression_bomb", str(e)[:200]) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImage(_failure_reason(e), str(e)[:200]) from None
    mode = img.mode
    if mode == "RGB":
        return img, None
    return _to_rgb(img), mode


# PIL refuses images over 2 x Image.MAX_IMAGE_PIXELS inside Image.open already; such an image
# is opened again with PIL's limit lifted, under this lock (the limit is a module global and
# decoding runs in threads), so that its size meets the caller's max_pixels like any other.
_UNLIMITED_OPEN = threading.Lock()


def _open(data: bytes) -> Image.Image:
    """The image with its header read, no pixel decoded."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        pass
    except (Image.UnidentifiedImageError, OSError, ValueError) as e:  # a cut inside the header lands here
        raise BadImage(_failure_reason(e), str(e)[:200]) from None
    with _UNLIMITED_OPEN:
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(io.BytesIO(data))
        except (Image.UnidentifiedImageError, OSError, ValueError) as e:
            raise BadImage(_failure_reason(e), str(e)[:200]) from None
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _failure_reason(e: Exception) -> str:
    # PIL says "image file is truncated" (pixel data) or "Truncated File Read" (headers).
    return "truncated_image" if "truncated" in str(e).lower() else "corrupt_image"


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit grayscale: scale the full range to 8 bits instead of clipping.
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or img.mode in ("RGBA", "LA"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


@dataclass(frozen=True)
class View:
    """kind 'eval': the model's eval preprocessing; 'crop': box (x, y, w, h) in original pixels,
    flip, and RandAugment's drawn (op, value) pairs (empty without --augment …+randaugment)."""

    kind: str
    box: tuple[int, int, int, int]
    flip: bool = False
    ops: tuple[tuple[str, float], ...] = ()

    def to_json(self) -> dict:
        d = {"kind": self.kind, "box": list(self.box), "flip": self.flip}
        if self.ops:
            d["ops"] = [[name, value] for name, value in self.ops]
        return d

    @staticmethod
    def from_json(d: dict) -> "View":
        ops = tuple((str(n), float(v)) for n, v in d.get("ops", ()))
        return View(d["kind"], tuple(int(v) for v in d["box"]), bool(d.get("flip", False)), ops)


def eval_box(w: int, h: int) -> tuple[int, int, int, int]:
    """The original-pixel region that resize-shorter-side + centre-crop keeps (square images)."""
    s = min(w, h)
    return ((w - s) // 2, (h - s) // 2, s, s)


def random_resized_crop_box(rng: np.random.Generator, w: int, h: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawn from a numpy Generator."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return (int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch)
    # Fallback: the largest centred crop within the ratio range.
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return ((w - cw) // 2, (h - ch) // 2, cw, ch)


def sample_views(rng: np.random.Generator, w: int, h: int, n_views: int, scale, ratio, flip_p: float,
                 randaugment: tuple[int, int] | None = None) -> list[View]:
    """View 0 = eval; the others RandomResizedCrop + flip [+ RandAugment (n ops, magnitude m of 30)]."""
    views = [View("eval", eval_box(w, h), False)]
    for _ in range(n_views - 1):
        box = random_resized_crop_box(rng, w, h, scale, ratio)
        flip = bool(rng.random() < flip_p)
        ops = draw_randaugment(rng, *randaugment) if randaugment else ()
        views.append(View("crop", box, flip, ops))
    return views


# --- RandAugment (Cubuk et al. 2020; torchvision's op set), replayable ----------------
# Each op's value is drawn once and stored resolution-free (degrees, a fraction of the image
# side, an enhancement factor, bits, a threshold), so a student at another resolution
# replays exactly the view its teacher saw: DataCompDR keeps only these draws too.

RANDAUGMENT_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                   "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
_SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}


def draw_randaugment(rng: np.random.Generator, n: int, m: int) -> tuple[tuple[str, float], ...]:
    """n ops drawn uniformly, each at magnitude m of 30 (random sign where the op has one)."""
    f = m / 30.0
    out = []
    for _ in range(n):
        name = RANDAUGMENT_OPS[int(rng.integers(len(RANDAUGMENT_OPS)))]
        sign = -1.0 if (name in _SIGNED and rng.random() < 0.5) else 1.0
        value = {"ShearX": 0.3 * f, "ShearY": 0.3 * f, "TranslateX": 0.45 * f, "TranslateY": 0.45 * f,
                 "Rotate": 30.0 * f, "Brightness": 0.9 * f, "Color": 0.9 * f, "Contrast": 0.9 * f,
                 "Sharpness": 0.9 * f, "Posterize": float(8 - int(4 * f)), "Solarize": 255.0 * (1.0 - f),
                 }.get(name, 0.0)
        out.append((name, round(sign * value, 6)))
    return tuple(out)


def apply_randaugment(img: Image.Image, ops) -> Image.Image:
    """Apply stored (op, value) pairs in order; geometric ops fill with black (torchvision's default)."""
    from PIL import ImageEnhance, ImageOps

    w, h = img.size
    for name, v in ops:
        if name == "ShearX":
            img = img.transform((w, h), Image.AFFINE, (1, v, -v * h / 2, 0, 1, 0), Image.NEAREST, fillcolor=(0, 0, 0))
        elif name == "ShearY":
            img = img.transform((w, h), Image.AFFINE, (1, 0, 0, v, 1, -v * w / 2), Image.NEAREST, fillcolor=(0, 0, 0))
        elif name == "TranslateX":
            img = img.transform((w, h), Image.AFFINE, (1, 0, -v * w, 0, 1, 0), Image.NEAREST, fillcolor=(0, 0, 0))
        elif name == "TranslateY":
            img = img.transform((w, h), Image.AFFINE, (1, 0, 0, 0, 1, -v * h), Image.NEAREST, fillcolor=(0, 0, 0))
        elif name == "Rotate":
            img = img.rotate(v, resample=Image.NEAREST, fillcolor=(0, 0, 0))
        elif name in ("Brightness", "Color", "Contrast", "Sharpness"):
            img = getattr(ImageEnhance, name)(img).enhance(1.0 + v)
        elif name == "Posterize":
            img = ImageOps.posterize(img, int(v))
        elif name == "Solarize":
            img = ImageOps.solarize(img, int(v))
        elif name == "AutoContrast":
            img = ImageOps.autocontrast(img)
        elif name == "Equalize":
            img = ImageOps.equalize(img)
        else:
            assert name == "Identity", name
    return img


def to_tensor(img: Image.Image, mean, std):
    """(3,H,W) float32, normalised. Same arithmetic as torchvision's ToTensor + Normalize."""
    import torch

    t = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (t - m) / s


def apply_crop(img: Image.Image, view: View, size: int, mean, std):
    """Cut a 'crop' view out of the original image at `size`×`size` pixels."""
    assert view.kind == "crop", view
    x, y, w, h = view.box
    out = img.resize((size, size), Image.BICUBIC, box=(x, y, x + w, y + h))
    if view.flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    if view.ops:
        out = apply_randaugment(out, view.ops)
    return to_tensor(out, mean, std)


def apply_view(img: Image.Image, view: View, size: int, mean, std, eval_transform):
    """A view as a tensor: eval views go through the model's own eval transform."""
    if view.kind == "eval":
        return eval_transform(img)
    return apply_crop(img, view, size, mean, std)


# --- distill's loader: the view cut straight from the encoded bytes, cheaply ------------
# `decode_view` gives what `apply_view(decode_rgb(data)[0], view, ...)` gives, within
# interpolation tolerance (tests/test_stream.py states it), at a fraction of the cost:
#  - no full-size intermediate: the region is cut and resized in one pass, by PyTorch's
#    antialiased bicubic on uint8 (PIL's filter and rounding: mean difference 0.02-0.07 grey
#    levels; 4-6x faster than PIL's resize on one core);
#  - a JPEG whose region is scaled down DRAFT_FROM (4) times or more is decoded by libjpeg at
#    1/4 or 1/8 scale (`Image.draft`), the region kept at least as large as the output, the
#    crop box mapped into the reduced image exactly (PIL's own box: x -> x / s) and cut by
#    PIL's resize(box=), which takes the fractional box as it is. At 2x a draft saves less
#    decoding than PIL's resize costs over PyTorch's (bench/bench_stream.py: no gain from
#    512-px JPEGs at 224 px) and moves the pixels more (DCT scaling: mean 1.3-1.6 grey levels
#    from the full decode), so `draft_from=2` is there to measure, not the default;
#  - the eval view through the student's eval transform, or, when that transform is
#    recognised as resize-shorter-side + centre crop + normalise (open_clip's), the same
#    arithmetic with PyTorch's resize.
# cache-teacher keeps decode_rgb + apply_view: the teacher's pixels are the reference.


@dataclass(frozen=True)
class EvalPlan:
    """An eval transform recognised as: resize the shorter side to `short` (bicubic,
    antialiased), centre-crop `crop`×`crop`, ToTensor, Normalize(mean, std)."""

    short: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def geometry(self, w: int, h: int) -> tuple[int, int, int, int]:
        """(resized w, resized h, crop left, crop top): torchvision's Resize(int) + CenterCrop arithmetic."""
        if w <= h:
            rw, rh = self.short, int(self.short * h / w)
        else:
            rw, rh = int(self.short * w / h), self.short
        return rw, rh, int(round((rw - self.crop) / 2.0)), int(round((rh - self.crop) / 2.0))


def eval_plan(transform) -> EvalPlan | None:
    """The EvalPlan of a torchvision Compose [Resize(int, bicubic), CenterCrop(square), RGB
    conversion, ToTensor, Normalize] (open_clip's eval preprocessing), else None: an unknown
    transform is called as it is."""
    try:
        from torchvision import transforms as T
    except ImportError:
        return None
    steps = list(getattr(transform, "transforms", None) or ())
    if len(steps) < 4 or not isinstance(steps[0], T.Resize) or not isinstance(steps[1], T.CenterCrop):
        return None
    resize, crop, norm, middle = steps[0], steps[1], steps[-1], steps[2:-1]
    size = resize.size if isinstance(resize.size, int) else (resize.size[0] if len(resize.size) == 1 else None)
    if (size is None or resize.max_size is not None or resize.interpolation != T.InterpolationMode.BICUBIC
            or resize.antialias is False):
        return None
    ch, cw = (crop.size, crop.size) if isinstance(crop.size, int) else tuple(crop.size)
    if ch != cw or ch > size or not isinstance(norm, T.Normalize):
        return None
    names = [getattr(t, "__name__", type(t).__name__) for t in middle]
    if names[-1] not in ("ToTensor", "MaybeToTensor") or any(
            n not in ("MaybeConvertMode", "_convert_to_rgb", "convert_to_rgb") for n in names[:-1]):
        return None
    if any(getattr(t, "mode", "RGB") != "RGB" for t in middle):
        return None
    mean, std = tuple(float(v) for v in norm.mean), tuple(float(v) for v in norm.std)
    if len(mean) != 3 or len(std) != 3:
        return None
    return EvalPlan(int(size), int(ch), mean, std)


DRAFT_FROM = 4  # the smallest JPEG draft scale decode_view uses (see above)


def draft_scale(region_w: float, region_h: float, out: int, lowest: int = 2) -> int:
    """The largest JPEG decode scale s of 8, 4, 2 (and ≥ `lowest`) that keeps the region at
    least `out` pixels on its shorter side (s·out ≤ min side); 1 when there is none."""
    for s in (8, 4, 2):
        if s >= lowest and s * out <= min(region_w, region_h):
            return s
    return 1


def resize_u8(pixels, box: tuple[int, int, int, int], size: tuple[int, int]):
    """(3,h,w) uint8 tensor of the region box = (x0, y0, x1, y1) (whole pixels) of `pixels`
    ((H,W,3) uint8 numpy or (3,H,W) uint8 tensor), resized to size = (h, w): PyTorch's
    antialiased bicubic, which on uint8 follows PIL's kernel and rounding."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(pixels).permute(2, 0, 1) if isinstance(pixels, np.ndarray) else pixels
    x0, y0, x1, y1 = box
    region = t[None, :, y0:y1, x0:x1]  # (1,3,h,w) a view: nothing copied
    return F.interpolate(region, size=size, mode="bicubic", antialias=True, align_corners=False)[0]


def normalise_u8(t, mean, std):
    """(3,H,W) uint8 tensor -> float32, normalised: the arithmetic of `to_tensor` (bit for bit)."""
    import torch

    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (t.float().div_(255.0) - m) / s


def eval_pixels(img: Image.Image, plan: EvalPlan):
    """(3,crop,crop) float32: `plan`'s resize + centre crop + normalise on an RGB image."""
    w, h = img.size
    rw, rh, left, top = plan.geometry(w, h)
    resized = resize_u8(np.array(img), (0, 0, w, h), (rh, rw))  # (3,rh,rw): the whole image, as the transform does
    return normalise_u8(resized[:, top : top + plan.crop, left : left + plan.crop], plan.mean, plan.std)


def decode_view(data: bytes, view: View, size: int, mean, std, eval_transform, plan: EvalPlan | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS, draft_from: int = DRAFT_FROM):
    """`apply_view(decode_rgb(data)[0], view, size, mean, std, eval_transform)` within
    interpolation tolerance, without its costs (see above); a JPEG is draft-decoded at a scale
    ≥ `draft_from` where one fits (0: never). The decompression-bomb check and the colour
    conversions are decode_rgb's own (open_checked, load_rgb). Raises BadImage."""
    import torch

    img = open_checked(data, max_pixels)
    w0, h0 = img.size
    lowest = max(2, draft_from)
    if view.kind == "eval":
        s = draft_scale(w0, h0, plan.short, lowest) if plan is not None else 1  # an unknown transform: full size
    else:
        s = draft_scale(view.box[2], view.box[3], size, lowest)
    rx = ry = 1.0
    if draft_from and s > 1 and img.format == "JPEG":
        got = img.draft("RGB", (w0 // s, h0 // s))  # libjpeg's DCT scaling: 1/s of the pixels decoded
        if got is not None:
            rx, ry = got[1][2] / w0, got[1][3] / h0  # the original image spans (0, 0, w0/s, h0/s) of the draft
    img, _ = load_rgb(img)
    drafted = rx != 1.0 or ry != 1.0
    if view.kind == "eval":
        if plan is None:
            return eval_transform(img)
        if not drafted:
            return eval_pixels(img, plan)
        # The region the transform keeps, in original pixels (its geometry on the original size:
        # a draft's rounded size would move the centre crop), cut from the draft by PIL's resize.
        rw, rh, left, top = plan.geometry(w0, h0)
        fx, fy = w0 / rw * rx, h0 / rh * ry  # resized pixels -> draft pixels
        cut = img.resize((plan.crop, plan.crop), Image.BICUBIC,
                         box=(left * fx, top * fy, (left + plan.crop) * fx, (top + plan.crop) * fy))
        return normalise_u8(torch.from_numpy(np.array(cut)).permute(2, 0, 1), plan.mean, plan.std)
    assert view.kind == "crop", view
    x, y, w, h = view.box
    if not drafted:
        out = resize_u8(np.array(img), (x, y, x + w, y + h), (size, size))  # (3,S,S) uint8
    else:  # the box is fractional in the draft's pixels: PIL's resize takes it as it is
        cut = img.resize((size, size), Image.BICUBIC, box=(x * rx, y * ry, (x + w) * rx, (y + h) * ry))
        out = torch.from_numpy(np.array(cut)).permute(2, 0, 1)
    if view.flip:
        out = out.flip(-1)
    if view.ops:
        out = torch.from_numpy(np.array(apply_randaugment(Image.fromarray(out.permute(1, 2, 0).numpy()), view.ops)))
        out = out.permute(2, 0, 1)
    return normalise_u8(out, mean, std)
