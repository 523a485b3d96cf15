"""The teacher-cache file format: the one contract between cache-teacher and distill.

Layout of a cache directory OUT (docs/cache-format.md is the prose version):

    OUT/cache-config.json        written first: everything that defines the cache's content
    OUT/shard-NNNNN.tar          one per input unit; members .npy / .json / the image only
    OUT/shard-NNNNN.done.json    per-shard stats; written last, after the rename: "done"
    OUT/manifest.json            config + merged counts, written when every shard is done

Members of one sample (KEY = UUUUU_IIIIII, unit and position; no dots):

    KEY.meta.json       source key, sha256, captions, phrases, size, views, conversions
    KEY.image.EXT       the original encoded image bytes, unmodified
    KEY.img_emb.npy     (V, D)      global image embedding per view, L2-normalised
    KEY.clu_emb.npy     (V, K, D)   cluster embeddings (joint space), L2-normalised; 0 rows = empty
    KEY.clu_assign.npy  (V, gh, gw) uint8 cluster index of every teacher patch
    KEY.clu_count.npy   (V, K)      uint16 patches per cluster
    KEY.txt_emb.npy     (C, D)      text embedding per caption, L2-normalised
    KEY.phr_emb.npy     (C, P, D)   phrase embeddings, L2-normalised; padding rows are 0
    KEY.phr_mask.npy    (C, P)      uint8, 1 where a phrase exists
    KEY.img_tok.npy     (V, G, D)   --store tokens: projected patch tokens (unnormalised)
    KEY.txt_tok.npy     (C, L, W)   --store tokens: final text token features

Float arrays are stored as fp16 (default), fp32, or int8 with a per-row scale in
`KEY.<name>.scale.npy` (fp16, shape = array shape without the last axis):
x ≈ int8 · scale, scale = max|row| / 127. Every .npy is read with allow_pickle=False.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import UserError

SCHEMA_VERSION = 1
FORMAT_NAME = "hierdctl-teacher-cache"
CONFIG_NAME = "cache-config.json"
MANIFEST_NAME = "manifest.json"
STORE_DTYPES = ("fp16", "fp32", "int8")
FLOAT_MEMBERS = ("img_emb", "clu_emb", "txt_emb", "phr_emb", "img_tok", "txt_tok")
INT_MEMBERS = {"clu_assign": np.uint8, "clu_count": np.uint16, "phr_mask": np.uint8}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.tar"


def done_name(index: int) -> str:
    return f"shard-{index:05d}.done.json"


def sample_key(unit: int, position: int) -> str:
    return f"{unit:05d}_{position:06d}"


# ----------------------------------------------------------------------------------
# Arrays <-> .npy bytes
# ----------------------------------------------------------------------------------


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def npy_load(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


def encode_float(name: str, a: np.ndarray, dtype: str) -> list[tuple[str, bytes]]:
    a = np.asarray(a, dtype=np.float32)
    if dtype == "fp32":
        return [(f"{name}.npy", npy_bytes(a))]
    if dtype == "fp16":
        return [(f"{name}.npy", npy_bytes(a.astype(np.float16)))]
    assert dtype == "int8", dtype
    scale = np.abs(a).max(axis=-1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float16)
    q = np.clip(np.rint(a / scale.astype(np.float32)[..., None]), -127, 127).astype(np.int8)
    return [(f"{name}.npy", npy_bytes(q)), (f"{name}.scale.npy", npy_bytes(scale))]


def decode_float(members: dict[str, bytes], name: str) -> np.ndarray | None:
    b = members.get(f"{name}.npy")
    if b is None:
        return None
    a = npy_load(b)
    if a.dtype == np.int8:
        return a.astype(np.float32) * npy_load(members[f"{name}.scale.npy"]).astype(np.float32)[..., None]
    return a.astype(np.float32)


# ----------------------------------------------------------------------------------
# One cached sample
# ----------------------------------------------------------------------------------


@dataclass
class CachedSample:
    key: str
    meta: dict
    image: bytes | None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def encode_sample(key: str, meta: dict, image: bytes | None, arrays: dict[str, np.ndarray], dtype: str):
    """Tar members (name, bytes) for one sample, in a fixed order."""
    out = [(f"{key}.meta.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode())]
    if image is not None:
        out.append((f"{key}.image.{meta['image_ext']}", image))
    for name in sorted(arrays):
        a = arrays[name]
        if name in INT_MEMBERS:
            out.append((f"{key}.{name}.npy", npy_bytes(np.asarray(a).astype(INT_MEMBERS[name]))))
        else:
            assert name in FLOAT_MEMBERS, name
            out += [(f"{key}.{n}", b) for n, b in encode_float(name, a, dtype)]
    return out


def decode_sample(key: str, members: dict[str, bytes]) -> CachedSample:
    """members: extension (everything after KEY.) -> bytes. Explicit decoding, never pickle."""
    meta = json.loads(members["meta.json"])
    image = members.get(f"image.{meta.get('image_ext')}")
    arrays = {}
    for name in FLOAT_MEMBERS:
        a = decode_float(members, name)
        if a is not None:
            arrays[name] = a
    for name in INT_MEMBERS:
        if f"{name}.npy" in members:
            arrays[name] = npy_load(members[f"{name}.npy"])
    return CachedSample(key, meta, image, arrays)


def iter_shard(path: str | Path) -> Iterator[CachedSample]:
    """Samples of one finished shard, in order."""
    key, members = None, {}
    with tarfile.open(path, "r|") as tf:
        for m in tf:
            if not m.isfile():
                continue
            k, ext = m.name.split(".", 1)
            if k != key and key is not None:
                yield decode_sample(key, members)
                members = {}
            key = k
            members[ext] = tf.extractfile(m).read()
    if key is not None:
        yield decode_sample(key, members)


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# ----------------------------------------------------------------------------------
# Reading a cache
# ----------------------------------------------------------------------------------


@dataclass
class Cache:
    root: Path
    manifest: dict

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def shards(self) -> list[Path]:
        return [self.root / s["name"] for s in self.manifest["shards"] if s["samples"] > 0]

    def has(self, part: str) -> bool:
        """'global', 'clusters', 'phrases', 'tokens', 'images'."""
        c = self.config
        return {
            "global": True,
            "clusters": c["clusters"]["k"] > 0,
            "phrases": c["phrases"]["max_phrases"] > 0,
            "tokens": c["store"] == "tokens",
            "images": c["store_images"],
        }[part]


def open_cache(root: str | Path, where: str = "CACHE") -> Cache:
    """Open a finished cache, checking its format and schema version."""
    root = Path(root)
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        if (root / CONFIG_NAME).is_file():
            raise UserError(f"{root} is an unfinished cache (no manifest.json): rerun cache-teacher to finish it", where)
        raise UserError(f"{root} is not a hierdctl teacher cache (no manifest.json)", where)
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{mpath} is not valid JSON ({e})", where) from None
    if manifest.get("format") != FORMAT_NAME:
        raise UserError(f"{mpath} is not a hierdctl teacher-cache manifest", where)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise UserError(
            f"cache schema version {manifest.get('schema_version')} but this hierdctl reads version "
            f"{SCHEMA_VERSION}: rebuild the cache with this version's cache-teacher",
            where,
        )
    if not manifest.get("complete"):
        raise UserError(f"{root} is incomplete ({manifest.get('shards_done')}/{manifest.get('shards_total')} shards)", where)
    return Cache(root, manifest)
