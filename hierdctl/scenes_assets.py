"""Where Scenes' assets are: Fashion-MNIST's IDX files and scikit-image's sample photos.

The config's checks (hierdctl/configs.py ScenesConfig.validate) and the generator
(stages/scenes.py) both need to find them; this module is the one that knows where they
are and how they are read. numpy is imported when a file is read, not before.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

from .errors import UserError

DEFAULT_FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_FILES = {  # split -> (images, labels) base names; a ".gz" twin is also accepted
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_CLASSES = 10  # labels 0..9 (stages/scenes.py FASHION_ITEMS names them)

# IDX type codes (http://yann.lecun.com/exdb/mnist/): the third byte of the magic number.
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path):
    """Read an IDX file (gzip-compressed or not, told apart by content) into a numpy array."""
    import numpy as np

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


def fashion_split_files(folder: Path, split: str) -> tuple[Path, Path]:
    found = []
    for base in FASHION_FILES[split]:
        options = [folder / base, folder / f"{base}.gz"]
        hit = next((p for p in options if p.is_file()), None)
        if hit is None:
            raise UserError(f"{folder} has no {base} (nor {base}.gz) for the {split} split", where="--fashion-path")
        found.append(hit)
    return found[0], found[1]


def load_fashion(folder: str | Path, split: str):
    """(images (N, H, W) uint8, labels (N,) int64) of one Fashion-MNIST split."""
    import numpy as np

    images_path, labels_path = fashion_split_files(Path(folder), split)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(
            f"{images_path.name} {images.shape} and {labels_path.name} {labels.shape} do not pair up as images and labels",
            where="--fashion-path",
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= FASHION_CLASSES):
        raise UserError(f"{labels_path} has labels outside 0..{FASHION_CLASSES - 1}", where="--fashion-path")
    return images.astype(np.uint8), labels.astype(np.int64)


def cluttered_fashion_dir(fashion_path: str | Path | None) -> Path | None:
    """Where the cluttered flavour reads Fashion-MNIST: the given folder (which must hold
    it), else Debian's when installed, else None: the flavour falls back to shapes only."""
    if fashion_path is not None:
        return fashion_dir(fashion_path)
    return next((Path(d) for d in DEFAULT_FASHION_DIRS if Path(d).is_dir()), None)


# --------------------------------------------------------------------------- photos


def skimage_data():
    """skimage.data, imported on first use: only the cluttered flavour needs it."""
    try:
        import skimage.data
    except ImportError as e:
        raise UserError("the cluttered flavour draws its backgrounds from scikit-image's sample photos: "
                        f"pip install scikit-image ({e})", where="--flavour") from e
    return skimage.data


