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
    if not data:
        raise BadImage("empty_image")
    img = _open(data)
    w, h = img.size
    if w * h > max_pixels:  # checked before any pixel is decoded
        raise BadImage("decompression_bomb", f"{w}x{h} > {max_pixels} pixels")
    if w < 1 or h < 1:
        raise BadImage("corrupt_image", f"size {w}x{h}")
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
