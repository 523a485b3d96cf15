"""The teacher-cache file format: the one contract between cache-teacher and distill.

Layout of a cache directory OUT (docs/cache-format.md is the prose version):

    OUT/cache-config.json        written first: everything that defines the cache's content
    OUT/shard-NNNNN.tar          one per input unit; members .npy / .json / the image only
    OUT/shard-NNNNN.done.json    per-shard stats (samples, bytes, sha256 of the tar); written
                                 last, after the rename: "done"
    OUT/manifest.json            config + merged counts + every shard's samples/bytes/sha256,
                                 written when every shard is done
    OUT/.hierdctl.lock           held by the process writing the cache

This module is the whole contract: the writer's encoding (`encode_sample`), the folder's
names, and the reader (`open_cache`, `index_shard`, `read_span`, `read_shard`,
`CacheDataset`) with its integrity checks (`check_shards`, `verify_digests`).

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
    KEY.neg_emb.npy     (C, Q, D)   --perturbations Q: teacher embeddings of each caption's perturbations
                                    (their texts: meta "perturbations"); padding rows are 0
    KEY.neg_mask.npy    (C, Q)      uint8, 1 where a perturbation exists
    KEY.clu_crop_emb.npy (V, K, D)  --cluster-crops: teacher embedding of each cluster's crop; 0 = empty
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
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import UserError

SCHEMA_VERSION = 2  # 2: every shard's sha256 in its done-marker and the manifest
READABLE_SCHEMAS = (1, 2)  # version 1 caches still read, with count checks only
FORMAT_NAME = "hierdctl-teacher-cache"
CONFIG_NAME = "cache-config.json"
MANIFEST_NAME = "manifest.json"
FLOAT_MEMBERS = ("img_emb", "clu_emb", "clu_crop_emb", "txt_emb", "phr_emb", "neg_emb", "img_tok", "txt_tok")
INT_MEMBERS = {"clu_assign": np.uint8, "clu_count": np.uint16, "phr_mask": np.uint8, "neg_mask": np.uint8}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.tar"


def done_name(index: int) -> str:
    return f"shard-{index:05d}.done.json"


def sample_key(unit: int, position: int) -> str:
    return f"{unit:05d}_{position:06d}"


_OURS = re.compile(r"^shard-\d{5}\.(tar|done\.json)$")


def is_cache_dir(root: Path) -> bool:
    """True if `root/cache-config.json` carries this format's name: hierdctl wrote the folder."""
    try:
        obj = json.loads((Path(root) / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(obj, dict) and obj.get("format") == FORMAT_NAME


def clear(root: Path) -> list[str]:
    """Remove what cache-teacher wrote into `root` (shards, done-markers, their leftovers,
    cache-config.json, manifest.json), nothing else. Returns the names removed."""
    from hierdctl.atomic import is_leftover

    removed = []
    for p in sorted(Path(root).iterdir()):
        base = p.name.split(".tmp")[0] if is_leftover(p.name) else p.name
        if p.is_file() and (_OURS.match(base) or base in (CONFIG_NAME, MANIFEST_NAME)):
            p.unlink()
            removed.append(p.name)
    return removed


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


class CorruptSample(Exception):
    """A cached sample whose members cannot be decoded (reason, detail)."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def decode_sample(key: str, members: dict[str, bytes]) -> CachedSample:
    """members: extension (everything after KEY.) -> bytes. Explicit decoding, never pickle.
    Raises CorruptSample for anything that does not decode (missing meta, bad JSON, a bad or
    object-dtype .npy, a missing int8 scale)."""
    try:
        meta = json.loads(members["meta.json"])
        if not isinstance(meta, dict):
            raise ValueError("meta.json is not an object")
        image = members.get(f"image.{meta.get('image_ext')}")
        arrays = {}
        for name in FLOAT_MEMBERS:
            a = decode_float(members, name)
            if a is not None:
                arrays[name] = a
        for name in INT_MEMBERS:
            if f"{name}.npy" in members:
                arrays[name] = npy_load(members[f"{name}.npy"])
    except KeyError as e:
        raise CorruptSample("missing_member", f"{key}: no {e.args[0]}") from None
    except (ValueError, UnicodeDecodeError, EOFError, OSError) as e:  # JSONDecodeError is a ValueError
        raise CorruptSample("undecodable_member", f"{key}: {str(e)[:160]}") from None
    return CachedSample(key, meta, image, arrays)


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# ----------------------------------------------------------------------------------
# Reading shards: an index of sample spans, random access, sequential reading
# ----------------------------------------------------------------------------------


def index_shard(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of every sample's contiguous run of tar members, in order.

    Reads the 512-byte headers only (tarfile seeks over the data). tarfile stops silently
    at a damaged header after the first one, so whatever follows the last member must be
    the end-of-archive zero blocks: anything else (a flipped header, a cut) raises
    CorruptShard."""
    path = Path(path)
    spans: list[tuple[int, int]] = []
    key, start, end = None, 0, 0
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                k = m.name.split(".", 1)[0]
                if k != key:
                    if key is not None:
                        spans.append((start, end - start))
                    key, start = k, m.offset
                end = m.offset_data + ((m.size + 511) // 512) * 512
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(end)
            tail = f.read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CorruptShard(f"{path.name} cannot be read as a tar ({e})") from None
    if end > size:
        raise CorruptShard(f"{path.name} is cut short: its last member ends at byte {end}, the file has {size}")
    if len(tail) < 1024 or tail.count(0) != len(tail):
        raise CorruptShard(f"{path.name} is damaged at byte {end}: {len(spans) + (key is not None)} samples are "
                           "readable before it, the rest are not")
    if key is not None:
        spans.append((start, end - start))
    return spans


class CorruptShard(Exception):
    """A shard that is not what the manifest says (cut, damaged, foreign)."""


def read_span(buf: bytes) -> tuple[str, dict[str, bytes]]:
    """Tar members of one sample span -> (key, {extension: bytes}). Our shards are plain
    USTAR. Raises CorruptSample on a header that does not parse or data that runs past the span."""
    key, out, pos = "?", {}, 0
    while pos + 512 <= len(buf):
        try:
            info = tarfile.TarInfo.frombuf(buf[pos : pos + 512], "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise CorruptSample("bad_tar_header", str(e)) from None
        if pos + 512 + info.size > len(buf) or "." not in info.name:
            raise CorruptSample("bad_tar_header", f"member {info.name!r} of {info.size} bytes does not fit its span")
        key, ext = info.name.split(".", 1)
        out[ext] = buf[pos + 512 : pos + 512 + info.size]
        pos += 512 + ((info.size + 511) // 512) * 512
    return key, out


def read_shard(path: str | Path) -> Iterator[CachedSample]:
    """Samples of one finished shard, in order (the same index and parser distill uses)."""
    spans = index_shard(Path(path))
    with open(path, "rb") as f:
        for off, n in spans:
            f.seek(off)
            yield decode_sample(*read_span(f.read(n)))


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
    def schema_version(self) -> int:
        return int(self.manifest["schema_version"])

    @property
    def shard_entries(self) -> list[dict]:
        """The manifest's entry of every shard that holds samples: name, samples, bytes, sha256."""
        return [s for s in self.manifest["shards"] if s["samples"] > 0]

    @property
    def shards(self) -> list[Path]:
        return [self.root / s["name"] for s in self.shard_entries]

    def has(self, part: str) -> bool:
        """'global', 'clusters', 'phrases', 'tokens', 'images', 'perturbations', 'cluster_crops'."""
        c = self.config
        return {
            "global": True,
            "clusters": c["clusters"]["k"] > 0,
            "phrases": c["phrases"]["max_phrases"] > 0,
            "tokens": c["store"] == "tokens",
            "images": c["store_images"],
            "perturbations": c.get("perturbations", {}).get("per_caption", 0) > 0,
            "cluster_crops": bool(c.get("cluster_crops", False)),
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{mpath} is not valid JSON ({e})", where) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise UserError(f"{mpath} is not a hierdctl teacher-cache manifest", where)
    if manifest.get("schema_version") not in READABLE_SCHEMAS:
        raise UserError(
            f"cache schema version {manifest.get('schema_version')} but this hierdctl reads versions "
            f"{', '.join(map(str, READABLE_SCHEMAS))}: rebuild the cache with this version's cache-teacher",
            where,
        )
    if not manifest.get("complete"):
        raise UserError(f"{root} is incomplete ({manifest.get('shards_done')}/{manifest.get('shards_total')} shards)", where)
    return Cache(root, manifest)


def check_shards(cache: Cache, where: str = "CACHE") -> list[list[tuple[int, int]]]:
    """Every shard's sample spans, checked against the manifest before any training: the
    shard exists, has the recorded size (a shard of another cache would not), walks to its
    end-of-archive marker, and holds the recorded number of samples. Cheap: the headers
    only. The sha256 of every byte is `verify_digests` (cache-info --verify, cache-teacher's
    resume). Raises UserError naming the shard."""
    redo = f"rerun cache-teacher on {cache.root} with the same options: it checks finished shards and redoes damaged ones"
    out = []
    for entry in cache.shard_entries:
        path = cache.root / entry["name"]
        if not path.is_file():
            raise UserError(f"{path} is missing; {redo}", where)
        size = path.stat().st_size
        if entry.get("bytes") is not None and size != entry["bytes"]:
            raise UserError(f"{path} has {size} bytes but the manifest recorded {entry['bytes']}: it was changed "
                            f"after cache-teacher wrote it; {redo}", where)
        try:
            spans = index_shard(path)
        except CorruptShard as e:
            raise UserError(f"{e}; {redo}", where) from None
        if len(spans) != entry["samples"]:
            raise UserError(f"{path} holds {len(spans)} samples but the manifest recorded {entry['samples']}: "
                            f"the shard is damaged or comes from another cache; {redo}", where)
        out.append(spans)
    return out


def verify_digests(root: Path, entries: list[dict]) -> list[str]:
    """Problems found re-reading every shard in full: a missing file, another size or another
    sha256 than the manifest recorded. Empty when all is well (schema-1 caches have no digest)."""
    from hierdctl.atomic import sha256_file

    problems = []
    for e in entries:
        path = Path(root) / e["name"]
        if not path.is_file():
            problems.append(f"{e['name']}: missing")
        elif e.get("bytes") is not None and path.stat().st_size != e["bytes"]:
            problems.append(f"{e['name']}: {path.stat().st_size} bytes, the manifest recorded {e['bytes']}")
        elif e.get("sha256") and sha256_file(path) != e["sha256"]:
            problems.append(f"{e['name']}: its sha256 differs from the manifest's: the bytes changed")
    return problems


# ----------------------------------------------------------------------------------
# The training-time reader
# ----------------------------------------------------------------------------------


class CacheDataset:
    """Map-style dataset over every cached sample of a cache; items are (sample, epoch).

    Per item, the view, the caption and MFD's patch noise come from a generator seeded by
    (seed, epoch, sample index): the same on any rank, worker or resume. A sample that does
    not decode (a damaged member, a bad image, non-finite teacher features) is replaced by
    the next good one in index order and reported in the item's `bad` field
    ("shard:key: reason"), so batches keep their size (DDP gathers need equal sizes) and
    nothing is silent: the distill loop counts and names them.
    """

    def __init__(self, cache: Cache, spans: list[list[tuple[int, int]]], seed: int, view_policy: str,
                 caption_policy: str, student_io: dict, needs: dict):
        self.paths = [str(p) for p in cache.shards]
        # (shard, offset, length, position in the shard) of every sample
        self.index = [(s, off, n, pos) for s, shard in enumerate(spans) for pos, (off, n) in enumerate(shard)]
        self.seed, self.view_policy, self.caption_policy = seed, view_policy, caption_policy
        self.io, self.needs = student_io, needs
        self.P = cache.config["phrases"]["max_phrases"]
        self.Q = cache.config.get("perturbations", {}).get("per_caption", 0)
        self._files: dict[int, object] = {}

    def __len__(self):
        return len(self.index)

    def where(self, i: int) -> str:
        """Where sample i lives: 'shard-00003.tar sample 42'."""
        s, _, _, pos = self.index[i]
        return f"{Path(self.paths[s]).name} sample {pos}"

    def _read(self, i: int) -> CachedSample:
        s, off, n, _ = self.index[i]
        f = self._files.get(s)
        if f is None:
            f = self._files[s] = open(self.paths[s], "rb")
        f.seek(off)
        return decode_sample(*read_span(f.read(n)))

    def __getitem__(self, item):
        i, epoch = item
        bad = []
        for attempt in range(len(self.index)):
            j = (i + attempt) % len(self.index)
            try:
                out = self._item(j, epoch)
            except CorruptSample as e:
                bad.append(f"{self.where(j)}: {e}")
                if len(bad) >= 32:
                    break
                continue
            out["bad"] = "; ".join(bad)
            return out
        raise CorruptShard(f"{len(bad)} consecutive cached samples do not decode, from {self.where(i)}: {bad[0]}")

    def _item(self, i: int, epoch: int) -> dict:
        import torch

        from hierdctl.images import BadImage, View, apply_view, decode_rgb

        io_ = self.io
        sample = self._read(i)
        meta, a = sample.meta, sample.arrays
        try:
            rng = np.random.default_rng([self.seed, epoch, i])
            n_views, n_caps = len(meta["views"]), len(meta["captions"])
            v = int(rng.integers(n_views)) if self.view_policy == "random" else epoch % n_views
            c = int(rng.integers(n_caps)) if self.caption_policy == "random" else 0
            img, _ = decode_rgb(sample.image)
            out = {
                "image": apply_view(img, View.from_json(meta["views"][v]), io_["image_size"], io_["mean"], io_["std"],
                                    io_["eval_transform"]),
                "text": io_["tokenize"]([meta["captions"][c]])[0],
                "index": torch.tensor(i),
            }
            if self.needs["global"]:
                out["img_t"] = torch.from_numpy(a["img_emb"][v])
                out["txt_t"] = torch.from_numpy(a["txt_emb"][c])
            if self.needs["clusters"]:
                out["clu_t"] = torch.from_numpy(a["clu_emb"][v])
                out["clu_assign"] = torch.from_numpy(a["clu_assign"][v].astype(np.int64))
                out["clu_mask"] = torch.from_numpy(a["clu_count"][v] > 0)
            if self.needs["phrases"]:
                phrases = meta["phrases"][c] + [""] * (self.P - len(meta["phrases"][c]))
                out["phr_t"] = torch.from_numpy(a["phr_emb"][c])
                out["phr_mask"] = torch.from_numpy(a["phr_mask"][c].astype(bool))
                out["phr_tok"] = io_["tokenize"](phrases)
            if self.needs.get("perturbations"):
                negs = meta["perturbations"][c] + [""] * (self.Q - len(meta["perturbations"][c]))
                out["neg_t"] = torch.from_numpy(a["neg_emb"][c])
                out["neg_mask"] = torch.from_numpy(a["neg_mask"][c].astype(bool))
                out["neg_tok"] = io_["tokenize"](negs)
            if self.needs.get("cluster_crops"):
                out["clu_crop_t"] = torch.from_numpy(a["clu_crop_emb"][v])
            if self.needs["mask_noise"]:
                out["mask_noise"] = torch.from_numpy(rng.random(io_["grid_size"]).astype(np.float32))
        except BadImage as e:
            raise CorruptSample("bad_image", f"{sample.key}: {e}") from None
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise CorruptSample("inconsistent_sample", f"{sample.key}: {type(e).__name__} {str(e)[:120]}") from None
        for name in ("img_t", "txt_t", "clu_t", "phr_t", "neg_t", "clu_crop_t"):
            if name in out and not torch.isfinite(out[name]).all():
                raise CorruptSample("non_finite_teacher_features", f"{sample.key}: {name}")
        return out
