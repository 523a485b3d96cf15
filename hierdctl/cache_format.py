"""The teacher-cache file format: the one contract between cache-teacher and distill.

Layout of a cache directory OUT (docs/cache-format.md is the prose version):

    OUT/cache-config.json        written first: everything that defines the cache's content
    OUT/shard-NNNNN.tar          one per input unit; members .npy / .json / the image only
    OUT/shard-NNNNN.done.json    per-shard stats (samples, bytes, sha256 of the tar); written
                                 last, after the rename: "done"
    OUT/manifest.json            config + merged counts + every shard's samples/bytes/sha256,
                                 written when every shard is done
    OUT/.hierdctl.lock           held by the process writing the cache

This module is the cache's one home: the folder's names and the manifest's schema, the
members' encoding (`encode_sample`/`decode_sample`), the writer (`prepare_out`,
`write_shard`, `verified_stats`, `write_manifest`) and the reader (`open_cache`,
`index_shard`, `read_span`, `read_shard`, `CacheDataset`, `CacheStream`) with its integrity
checks (`check_shards`, `verify_digests`, `verify_cache`). cache-teacher and distill
never name a file of the cache themselves.

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
    KEY.img_emb_tK.npy  (V, D_k)    teacher K ≥ 1 of an ensemble (--teacher A --teacher B): its image embeddings
    KEY.txt_emb_tK.npy  (C, D_k)    ... and its text embeddings; everything else is the first teacher's
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
import math
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


def _is_own_name(name: str) -> bool:
    return bool(_OURS.match(name)) or name in (CONFIG_NAME, MANIFEST_NAME)


def is_own_leftover(name: str) -> bool:
    """NAME.tmpPID of a file cache-teacher writes, left by a killed atomic write (not a user's file)."""
    from hierdctl.atomic import leftover_base

    base = leftover_base(name)
    return base is not None and _is_own_name(base)


def is_own_start(name: str) -> bool:
    """A name cache-teacher may find in an output folder it has not written yet: the lock, or
    the leftover of a first cache-config.json write that a kill interrupted."""
    from hierdctl.atomic import leftover_base

    return name.startswith(".hierdctl.") or leftover_base(name) == CONFIG_NAME


def _json(p: Path):
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _written_by_cache_teacher(root: Path, name: str, recorded: set[str]) -> bool:
    """True if `root/name`, named like one of cache-teacher's files, is one: the config and the
    manifest carry the format's name, a done-marker names its own shard, a shard is recorded by a
    done-marker or the manifest, or (renamed into place by a run killed before its done-marker)
    carries the writer's headers: USTAR, owner 'hierdctl', mtime 0 (atomic.write_tar_atomic)."""
    p = root / name
    if name in (CONFIG_NAME, MANIFEST_NAME):
        obj = _json(p)
        return isinstance(obj, dict) and obj.get("format") == FORMAT_NAME
    if name.endswith(".done.json"):
        obj = _json(p)
        return isinstance(obj, dict) and obj.get("name") == name.replace(".done.json", ".tar") and "sha256" in obj
    if name in recorded:
        return True
    try:
        with open(p, "rb") as f:
            head = f.read(512)
        info = tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except (OSError, tarfile.HeaderError):
        return False
    return info.uname == "hierdctl" and info.mtime == 0 and head[257:262] == b"ustar"


def clear(root: Path) -> list[str]:
    """Remove what cache-teacher wrote into `root` (shards, done-markers, their leftovers,
    cache-config.json, manifest.json), nothing else: not a file that merely has such a name
    (`_written_by_cache_teacher`). Returns the names removed."""
    from hierdctl.atomic import leftover_base

    root = Path(root)
    recorded = set()
    for p in root.glob("shard-*.done.json"):
        obj = _json(p)
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            recorded.add(obj["name"])
    m = _json(root / MANIFEST_NAME)
    if isinstance(m, dict) and m.get("format") == FORMAT_NAME:
        recorded |= {e.get("name") for e in m.get("shards") or [] if isinstance(e, dict)}
    removed = []
    for p in sorted(root.iterdir()):
        base = leftover_base(p.name)
        ours = _is_own_name(base) if base is not None else (
            _is_own_name(p.name) and _written_by_cache_teacher(root, p.name, recorded))
        if (p.is_file() or p.is_symlink()) and ours:
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
    """The array of .npy bytes, never unpickled. What np.save writes for a plain little-endian
    number array (format 1.0, C order) is read directly: numpy's own header parser
    (ast.literal_eval) is most of the cost of reading a cached sample's small arrays; anything
    else goes to np.load, with its errors."""
    if b[:8] == b"\x93NUMPY\x01\x00" and len(b) >= 10:
        n = int.from_bytes(b[8:10], "little")
        m = _NPY_V1.fullmatch(b[10 : 10 + n])
        if m:
            dtype = np.dtype(m[1].decode())
            shape = tuple(int(d) for d in m[2].split(b",") if d.strip())
            count = math.prod(shape)
            if len(b) - 10 - n == count * dtype.itemsize:
                return np.frombuffer(b, dtype, count, 10 + n).reshape(shape).copy()  # writable, as np.load's
    return np.load(io.BytesIO(b), allow_pickle=False)


# np.save's format-1.0 header of a C-order number array: {'descr': '<f2', 'fortran_order': False, 'shape': (2, 32), }
_NPY_V1 = re.compile(rb"\{'descr': '([<|][fiu][1248]|\|b1)', 'fortran_order': False, "
                     rb"'shape': \(((?:\d+, )*(?:\d+,?)?)\), \} *\n")


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


_ENSEMBLE_MEMBER = re.compile(r"^(img|txt)_emb_t[1-9]$")  # teacher k ≥ 1 of an ensemble: its global embeddings


def is_float_member(name: str) -> bool:
    return name in FLOAT_MEMBERS or bool(_ENSEMBLE_MEMBER.match(name))


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
            assert is_float_member(name), name
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
        names = FLOAT_MEMBERS + tuple(m[:-4] for m in members if m.endswith(".npy") and _ENSEMBLE_MEMBER.match(m[:-4]))
        for name in names:
            a = decode_float(members, name)
            if a is not None:
                arrays[name] = a
        for name in INT_MEMBERS:
            if f"{name}.npy" in members:
                arrays[name] = npy_load(members[f"{name}.npy"])
    except KeyError as e:
        raise CorruptSample("missing_member", f"{key}: no {e.args[0]}") from None
    except Exception as e:  # untrusted bytes: numpy's header parser raises TokenError, SyntaxError, TypeError...
        raise CorruptSample("undecodable_member", f"{key}: {type(e).__name__}: {str(e)[:160]}") from None
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
        header = buf[pos : pos + 512]
        fast = _plain_header(header)
        if fast is not None:
            name, size = fast
        else:  # anything but the plain header our writer makes: tarfile's parser, with its errors
            try:
                info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            except tarfile.HeaderError as e:
                raise CorruptSample("bad_tar_header", str(e)) from None
            name, size = info.name, info.size
        if pos + 512 + size > len(buf) or "." not in name:
            raise CorruptSample("bad_tar_header", f"member {name!r} of {size} bytes does not fit its span")
        key, ext = name.split(".", 1)
        out[ext] = buf[pos + 512 : pos + 512 + size]
        pos += 512 + ((size + 511) // 512) * 512
    return key, out


def _plain_header(h: bytes) -> tuple[str, int] | None:
    """(name, size) of a USTAR regular-file header without a name prefix whose (unsigned)
    checksum holds, read as tarfile.TarInfo.frombuf reads those two fields; None for any other
    header (tarfile then decides). tarfile's parser is most of the cost of splitting a span."""
    if h[156] not in (0x30, 0) or h[345] != 0 or h[124] & 0x80 or h.count(0) == 512:
        return None
    try:
        size = int(h[124:136].split(b"\0", 1)[0].decode("ascii").strip() or "0", 8)
        chksum = int(h[148:156].split(b"\0", 1)[0].decode("ascii").strip() or "0", 8)
    except ValueError:  # UnicodeDecodeError included
        return None
    if chksum != 256 + sum(h) - sum(h[148:156]):  # the checksum field counts as 8 spaces
        return None
    return h[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape"), size


def read_shard(path: str | Path) -> Iterator[CachedSample]:
    """Samples of one finished shard, in order (the same index and parser distill uses)."""
    spans = index_shard(Path(path))
    with open(path, "rb") as f:
        for off, n in spans:
            f.seek(off)
            yield decode_sample(*read_span(f.read(n)))


# ----------------------------------------------------------------------------------
# Writing a cache (cache-teacher): the folder, shards and done-markers, the manifest
# ----------------------------------------------------------------------------------


def prepare_out(out: Path, identity: dict, overwrite: bool, env) -> list[str]:
    """Create OUT, or check that it holds a cache of this very configuration. Returns notes.

    A non-empty OUT must be a hierdctl cache (cache-config.json with the format name):
    another tool's files are never written over, and --overwrite removes only what
    cache-teacher wrote (`clear`). `env`: hierdctl.distributed.DistEnv (rank 0 prepares)."""
    from hierdctl import atomic, distributed

    notes = []
    cpath = out / CONFIG_NAME
    config = {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "config": identity}
    if env.is_main:
        others = [p for p in out.iterdir() if not is_own_start(p.name)] if out.is_dir() else []
        if others and not is_cache_dir(out):
            raise UserError(f"{out} is not empty and is not a hierdctl teacher cache (no {CONFIG_NAME} "
                            f"with format {FORMAT_NAME!r}); pick a new or empty folder", "--out")
        if overwrite and others:
            removed = clear(out)
            notes.append(f"--overwrite: removed the earlier cache's {len(removed)} files")
        out.mkdir(parents=True, exist_ok=True)
        if not cpath.exists():
            atomic.write_json_atomic(cpath, config)
    distributed.barrier(env)
    if not cpath.exists():  # a job-array rank that started before rank 0
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_json_atomic(cpath, config)
    have = json.loads(cpath.read_text())
    if have.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{out} holds a cache of schema version {have.get('schema_version')}; use --overwrite", "--out")
    old = have.get("config", {})
    diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
    if diff:
        detail = "; ".join(f"{k}: cache has {old.get(k)!r}, this run {identity.get(k)!r}" for k in diff[:4])
        raise UserError(f"{out} holds a cache made with another configuration ({detail}). "
                        "Use another --out, or --overwrite to start over", "--out")
    return notes


def write_shard(out: Path, index: int, label: str, records: list[dict], skips: list[dict], dtype: str) -> dict:
    """Shard `index` from its records ({pos, meta, image, arrays}) in position order, then its
    done-marker (last). Returns the shard's stats (what the done-marker holds)."""
    import collections

    from hierdctl import atomic

    members = []
    for r in sorted(records, key=lambda r: r["pos"]):
        members += encode_sample(sample_key(index, r["pos"]), r["meta"], r["image"], r["arrays"], dtype)
    written = atomic.write_tar_atomic(out / shard_name(index), members)
    stats = {
        "index": index,
        "name": shard_name(index),
        "label": label,
        "samples": len(records),
        "captions": sum(len(r["meta"]["captions"]) for r in records),
        "phrases": sum(len(p) for r in records for p in r["meta"]["phrases"]),
        "skipped": dict(collections.Counter(s["reason"] for s in skips)),
        "skipped_samples": skips,
        "converted": dict(collections.Counter(r["meta"]["converted_from"] for r in records if r["meta"]["converted_from"])),
        # captions cut to sources.MAX_CAPTION_CHARS (a sample's meta says how many of its own)
        "caption_truncated": sum(r["meta"].get("captions_cut", 0) for r in records),
        "bytes": written.bytes,
        "sha256": written.sha256,
    }
    atomic.write_json_atomic(out / done_name(index), stats)  # the done-marker, last
    return stats


def done_stats(out: Path, index: int) -> dict | None:
    """A shard's stats if it finished (done-marker present and its shard of the recorded size)."""
    p = out / done_name(index)
    if not p.exists():
        return None
    try:
        st = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    shard = out / shard_name(index)
    return st if shard.exists() and shard.stat().st_size == st.get("bytes") else None


def shard_problem(path: Path, entry: dict, what: str) -> str | None:
    """What is wrong with a finished shard against `what` recorded of it (its done-marker or its
    manifest entry: bytes, sha256, samples), re-reading every byte; None when it is intact."""
    problems = verify_digests(path.parent, [entry], what)
    if problems:
        return problems[0].split(": ", 1)[1]
    try:
        n = len(index_shard(path))
    except CorruptShard as e:
        return str(e)
    if n != entry["samples"]:
        return f"it holds {n} samples, {what} recorded {entry['samples']}"
    return None


def verified_stats(out: Path, index: int) -> tuple[dict | None, str | None]:
    """(stats, None) for a finished shard whose bytes are still the ones written (size, sample
    count and sha256 re-checked); (None, why) for one to redo; (None, None) if never finished."""
    if not (out / done_name(index)).exists():
        return None, None
    st = done_stats(out, index)
    if st is None:
        return None, "its shard is missing or has another size than recorded"
    why = shard_problem(out / shard_name(index), st, "its done-marker")
    return (None, why) if why else (st, None)


def remove_shard_leftovers(out: Path, index: int) -> None:
    """What a killed write of shard `index` left: its temporary shard and done-marker files."""
    from hierdctl import atomic

    for name in (shard_name(index), done_name(index)):
        for p in atomic.leftovers(out, name):
            p.unlink()


def write_manifest(out: Path, identity: dict, teachers: list[dict], captioner: dict | None, source, started: float,
                   log_skipped: Path | None = None) -> dict:
    """manifest.json from every finished shard's done-marker; with `log_skipped`, every skipped
    sample as a JSON line there. `teachers`: each teacher's description, the first first."""
    import collections
    import time

    from hierdctl import __version__, atomic

    done = [s for s in (done_stats(out, u.index) for u in source.units) if s is not None]
    skipped: collections.Counter = collections.Counter()
    converted: collections.Counter = collections.Counter()
    for s in done:
        skipped.update(s["skipped"])
        converted.update(s["converted"])
    samples = sum(s["samples"] for s in done)
    total_bytes = sum(s["bytes"] for s in done)
    manifest = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "created_by": f"hierdctl {__version__}",
        "config": identity,
        "teacher": teachers[0],  # the first teacher (clusters, phrases and the unsuffixed embeddings are its)
        "teachers": teachers,  # every teacher of the ensemble, the first first
        "captioner": captioner,  # --captioner: its spec, sampling and fingerprint (None without one)
        "source": source.describe(),
        "samples": samples,
        "captions": sum(s["captions"] for s in done),
        "phrases": sum(s["phrases"] for s in done),
        "skipped": dict(sorted(skipped.items())),
        "skipped_total": sum(skipped.values()),
        "caption_truncated": sum(s.get("caption_truncated", 0) for s in done),
        "converted": dict(sorted(converted.items())),
        "bytes": total_bytes,
        "bytes_per_sample": (total_bytes / samples) if samples else None,
        "shards_total": len(source.units),
        "shards_done": len(done),
        "complete": len(done) == len(source.units),
        "shards": [{k: s.get(k, 0 if k == "caption_truncated" else None) for k in
                    ("name", "label", "samples", "captions", "bytes", "sha256", "skipped", "caption_truncated")}
                   for s in done],
        "wall_seconds_last_run": round(time.time() - started, 3),
    }
    atomic.write_json_atomic(out / MANIFEST_NAME, manifest)
    if log_skipped:
        atomic.write_text_atomic(Path(log_skipped), "".join(json.dumps({"shard": s["name"], **sk}) + "\n"
                                                            for s in done for sk in s["skipped_samples"]))
    return manifest


# ----------------------------------------------------------------------------------
# Reading a cache
# ----------------------------------------------------------------------------------


@dataclass
class Cache:
    root: Path | str  # a local folder, or a URL (str) read by CacheStream
    manifest: dict

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def schema_version(self) -> int:
        return int(self.manifest["schema_version"])

    @property
    def teachers(self) -> list[dict]:
        """Every teacher of the cache (an ensemble, or the one), the first first."""
        return self.manifest.get("teachers") or [self.manifest["teacher"]]

    @property
    def shard_entries(self) -> list[dict]:
        """The manifest's entry of every shard that holds samples: name, samples, bytes, sha256."""
        return [s for s in self.manifest["shards"] if s["samples"] > 0]

    @property
    def shards(self) -> list[Path | str]:
        """Each shard's path (or URL, for a remote cache)."""
        if isinstance(self.root, str):
            return [cache_file(self.root, s["name"]) for s in self.shard_entries]
        return [self.root / s["name"] for s in self.shard_entries]

    def has(self, part: str) -> bool:
        """'global', 'clusters', 'phrases', 'tokens', 'images', 'perturbations', 'cluster_crops', 'synthetic'."""
        c = self.config
        return {
            "global": True,
            "clusters": c["clusters"]["k"] > 0,
            "phrases": c["phrases"]["max_phrases"] > 0,
            "tokens": c["store"] == "tokens",
            "images": c["store_images"],
            "perturbations": c.get("perturbations", {}).get("per_caption", 0) > 0,
            "cluster_crops": bool(c.get("cluster_crops", False)),
            "synthetic": bool(c.get("captioner")),
        }[part]


def is_remote(root) -> bool:
    """True for a cache given as a URL (http(s)://, file:, s3://, …): read by the streaming reader."""
    from hierdctl.sources import url_scheme

    return isinstance(root, str) and url_scheme(root) is not None


def cache_file(root, name: str) -> str:
    """The path or URL of a file of the cache at `root`."""
    return f"{root.rstrip('/')}/{name}" if is_remote(root) else str(Path(root) / name)


def open_cache(root: str | Path, where: str = "CACHE", check: bool = True) -> Cache:
    """Open a finished cache (a local folder, or a URL: its manifest is fetched), checking its
    format and schema version and, with `check`, the manifest against the cache's own records
    (`manifest_problems`): a manifest changed after cache-teacher wrote it is refused."""
    if is_remote(str(root)):
        from hierdctl.sources import open_shard

        mpath = cache_file(str(root), MANIFEST_NAME)
        try:
            stream, closer = open_shard(mpath)
            try:
                text = stream.read().decode("utf-8")
            finally:
                closer.close()
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {mpath} ({e})", where) from None
        root = str(root)
    else:
        root = Path(root)
        mpath = root / MANIFEST_NAME
        if not mpath.is_file():
            if (root / CONFIG_NAME).is_file():
                raise UserError(f"{root} is an unfinished cache (no manifest.json): rerun cache-teacher to finish it",
                                where)
            raise UserError(f"{root} is not a hierdctl teacher cache (no manifest.json)", where)
        text = mpath.read_text(errors="replace")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{mpath} is not valid JSON ({e})", where) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise UserError(f"{mpath} is not a hierdctl teacher-cache manifest", where)
    if manifest.get("schema_version") not in READABLE_SCHEMAS:
        raise UserError(
            f"{mpath} has cache schema version {manifest.get('schema_version')} but this hierdctl reads versions "
            f"{', '.join(map(str, READABLE_SCHEMAS))}: rebuild the cache with this version's cache-teacher",
            where,
        )
    if not manifest.get("complete"):
        raise UserError(f"{root} is incomplete ({manifest.get('shards_done')}/{manifest.get('shards_total')} shards)", where)
    cache = Cache(root, manifest)
    if check:
        problems = manifest_problems(cache)
        if problems:
            raise UserError(f"{mpath} does not match the cache's own records ({problems[0]}): it was changed after "
                            f"cache-teacher wrote it; rerun cache-teacher on {root} with the same options: it "
                            "rewrites the manifest from the shards' records", where)
    return cache


def _read_text(root, name: str) -> str | None:
    """A small file of a local or remote cache, or None when it cannot be read."""
    if is_remote(root):
        from hierdctl.sources import open_shard

        try:
            stream, closer = open_shard(cache_file(root, name))
            try:
                return stream.read().decode("utf-8")
            finally:
                closer.close()
        except (OSError, ValueError, UnicodeDecodeError):
            return None
    try:
        return (Path(root) / name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def manifest_problems(cache: Cache) -> list[str]:
    """How the manifest disagrees with the cache's own records, written before it: cache-config.json
    (the configuration and the teachers' fingerprints the cache was made with) and, for a local
    cache, every shard's done-marker (samples, bytes, sha256). Empty when they agree."""
    problems = []
    try:
        own = json.loads(_read_text(cache.root, CONFIG_NAME) or "null")
    except json.JSONDecodeError:
        own = None
    if not isinstance(own, dict) or own.get("format") != FORMAT_NAME:
        return [f"{CONFIG_NAME} is missing or unreadable"]
    m, conf = cache.manifest, own.get("config") or {}
    if m.get("schema_version") != own.get("schema_version"):
        problems.append(f"schema version {m.get('schema_version')} against {own.get('schema_version')} in {CONFIG_NAME}")
    diff = sorted(k for k in set(m.get("config") or {}) | set(conf) if (m.get("config") or {}).get(k) != conf.get(k))
    if diff:
        problems.append(f"its config differs from {CONFIG_NAME}'s in {', '.join(diff[:4])}")
    teachers = m.get("teachers") or [m.get("teacher") or {}]
    want = [conf.get("teacher_fingerprint"), *(conf.get("ensemble_fingerprints") or [])]
    got = [t.get("fingerprint") if isinstance(t, dict) else None for t in teachers]
    if got != want or (isinstance(m.get("teacher"), dict) and m["teacher"].get("fingerprint") != want[0]):
        problems.append(f"its teacher fingerprints differ from {CONFIG_NAME}'s")
    if not is_remote(cache.root):
        for e in cache.manifest.get("shards") or []:
            done = _json(Path(cache.root) / e["name"].replace(".tar", ".done.json"))
            if isinstance(done, dict):
                bad = [k for k in ("samples", "bytes", "sha256") if e.get(k) != done.get(k)]
                if bad:
                    problems.append(f"its {'/'.join(bad)} of {e['name']} differ from the shard's done-marker")
    return problems


def identity_digest(manifest: dict) -> str:
    """The cache's identity: sha256 over what defines its content (configuration, teachers, source,
    and every shard's name, samples and sha256), not the wall time or the version that wrote it; so
    a cache repaired in place keeps it, and one rebuilt from another source does not. A distill run
    records it and --resume checks it."""
    keep = {k: manifest.get(k) for k in ("format", "schema_version", "config", "teachers", "captioner", "source",
                                         "samples")}
    keep["shards"] = [{k: e.get(k) for k in ("name", "samples", "bytes", "sha256")} for e in manifest.get("shards") or []]
    return sha256(json.dumps(keep, sort_keys=True, default=str).encode())


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


def verify_digests(root: Path, entries: list[dict], what: str = "the manifest") -> list[str]:
    """Problems found re-reading every shard in full: a missing file, another size or another
    sha256 than `what` recorded. Empty when all is well (schema-1 caches have no digest)."""
    from hierdctl.atomic import sha256_file

    problems = []
    for e in entries:
        path = Path(root) / e["name"]
        if not path.is_file():
            problems.append(f"{e['name']}: missing")
        elif e.get("bytes") is not None and path.stat().st_size != e["bytes"]:
            problems.append(f"{e['name']}: {path.stat().st_size} bytes, {what} recorded {e['bytes']}")
        elif e.get("sha256") and sha256_file(path) != e["sha256"]:
            problems.append(f"{e['name']}: its sha256 differs from what {what} recorded: the bytes changed")
    return problems


def read_manifest(root: Path, where: str = "CACHE") -> dict:
    """The manifest of a local cache as it is, finished or not (cache-info shows either)."""
    p = Path(root) / MANIFEST_NAME
    if not p.is_file():
        raise UserError(f"{root} holds no {MANIFEST_NAME}: not a finished hierdctl cache", where)
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p} is not valid JSON ({e})", where) from None


def verify_cache(root: Path, where: str = "CACHE") -> list[str]:
    """Every problem of a finished cache: its manifest against the cache's own records
    (`manifest_problems`), and every shard re-read in full against its done-marker, or the
    manifest where it has none (size, sha256, sample count; schema 1 recorded no sha256: sizes
    and counts only). A shard is said to have changed only when it differs from its own record."""
    c = open_cache(root, where, check=False)
    problems = [f"{MANIFEST_NAME}: {p}; the manifest was changed after cache-teacher wrote it" for p in
                manifest_problems(c)]
    for entry in c.shard_entries:
        done = _json(Path(c.root) / entry["name"].replace(".tar", ".done.json"))
        record, what = (done, "its done-marker") if isinstance(done, dict) and "samples" in done else (entry,
                                                                                                       "the manifest")
        why = shard_problem(c.root / entry["name"], record, what)
        if why:
            problems.append(f"{entry['name']}: {why}")
    return problems


# ----------------------------------------------------------------------------------
# Images from where they are: joining a cache made with --no-store-images with its source
# ----------------------------------------------------------------------------------


class ImageJoin:
    """The original image bytes of cached samples, read from the source instead of the cache.

    A cache written with `--no-store-images` keeps every sample's source key and the sha256 of
    its image; cache shard u holds unit u of its source. `ImageJoin(source)` finds sample
    (u, key) by random access: for WebDataset shards an index of each shard's image members
    (its tar headers, read on first use: no payload), for tables and Karpathy JSON the row's
    file. Every image's sha256 is checked against the cache, so a moved, edited or reordered
    source is a counted `image_mismatch`, never a silent wrong pair. Only local shards are
    indexed (random access); a URL source is refused up front.
    """

    def __init__(self, spec: str, source_options, expected_units: int, where: str = "--images"):
        from hierdctl.sources import RowSource, TarSource, open_source, url_scheme

        require_local = [u for u in [spec] if url_scheme(u) is not None]
        if require_local:
            raise UserError("images are joined by random access into local files: copy the shards to a local disk "
                            f"or keep them in the cache (a URL source cannot be indexed): {spec}", where)
        self.source = open_source(spec, source_options, where)
        if len(self.source.units) != expected_units:
            raise UserError(f"{spec} has {len(self.source.units)} units (shards or row chunks) but the cache was made "
                            f"from {expected_units}: it is not the cache's source", where)
        self.tar = isinstance(self.source, TarSource)
        assert self.tar or isinstance(self.source, RowSource), type(self.source)
        self._index: dict[int, dict[str, tuple[int, int]]] = {}  # unit -> key -> (offset, size) of its image
        self._rows: dict[str, str] | None = None  # RowSource: key -> path
        self._files: dict[int, object] = {}

    def _tar_index(self, unit: int) -> dict[str, tuple[int, int]]:
        idx = self._index.get(unit)
        if idx is None:
            from hierdctl.sources import IMAGE_EXTS, member_key

            idx, path = {}, self.source.units[unit].label
            order = {e: r for r, e in enumerate(IMAGE_EXTS)}
            key, exts, done = None, set(), set()  # the sample being read, its member names, keys read
            try:
                with tarfile.open(path, "r:") as tf:
                    for m in tf:
                        km = member_key(m.name) if m.isfile() else None
                        if km is None:
                            continue
                        k, ext = km
                        if k != key or ext in exts:  # the next sample (the sources' grouping)
                            if key is not None:
                                done.add(key)
                            key, exts = k, set()
                        exts.add(ext)
                        if k in done:  # a later copy of a key: the cache holds the first (duplicate_key)
                            continue
                        best = idx.get(k)
                        # the sources' rule: the first of IMAGE_EXTS a sample has is its image
                        if ext in order and (best is None or order[ext] < best[2]):
                            idx[k] = (m.offset_data, m.size, order[ext])
            except (tarfile.TarError, OSError):
                pass  # a broken source shard: its samples are counted as missing below
            self._index[unit] = idx
        return idx

    def read(self, unit: int, key: str) -> bytes | None:
        """The image bytes of sample `key` of unit `unit`, or None when the source lacks it."""
        if self.tar:
            hit = self._tar_index(unit).get(key)
            if hit is None:
                return None
            f = self._files.get(unit)
            if f is None:
                f = self._files[unit] = open(self.source.units[unit].label, "rb")
            f.seek(hit[0])
            return f.read(hit[1])
        if self._rows is None:
            self._rows = {r.key: r.path for r in self.source.rows}
        path = self._rows.get(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except (OSError, TypeError):
            return None


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
                 caption_policy: str, student_io: dict, needs: dict, images: ImageJoin | None = None):
        self.paths = [str(p) for p in cache.shards]
        self.units = [int(e["name"].removeprefix("shard-").split(".")[0]) for e in cache.shard_entries]  # unit of each shard
        self.images = images  # None: the cache holds the images
        # (shard, offset, length, position in the shard) of every sample
        self.index = [(s, off, n, pos) for s, shard in enumerate(spans) for pos, (off, n) in enumerate(shard)]
        self.seed, self.view_policy, self.caption_policy = seed, view_policy, caption_policy
        self.io, self.needs = student_io, needs
        from hierdctl.images import eval_plan

        self.decode = student_io.get("decode", "cpu")  # "gpu": items carry the JPEG bytes (hierdctl.gpu_decode)
        self.plan = eval_plan(student_io["eval_transform"])  # the eval view's fast path, or None
        self.P = cache.config["phrases"]["max_phrases"]
        self.Q = cache.config.get("perturbations", {}).get("per_caption", 0)
        self._files: dict[int, object] = {}

    def __len__(self):
        return len(self.index)

    def _shard_of(self, i: int) -> int:
        return self.index[i][0]

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

    def _captions(self, rng, n_caps: int, real: int) -> tuple[int, int | None]:
        """(the caption of this step, the second one for real+synthetic or None). Captions 0..real-1 are
        real, real.. synthetic (--captioner); an image the captioner gave nothing stays on a real one."""
        pol, synthetic = self.caption_policy, n_caps - real
        if pol == "first":
            return 0, None
        if pol == "any":
            return int(rng.integers(n_caps)), None
        c = int(rng.integers(real))  # random, and the real half of real+synthetic
        if pol == "random":
            return c, None
        s = real + int(rng.integers(synthetic)) if synthetic > 0 else c
        return (s, None) if pol == "synthetic" else (c, s)

    def _item(self, i: int, epoch: int) -> dict:
        return self.build(self._read(i), i, epoch)

    def pixels(self, data: bytes, view) -> dict:
        """The item's image: {"image": (3,S,S) float32}, the view cut by `images.decode_view`; with
        decode "gpu", the JPEG's bytes and view for the device (`gpu_decode.encode_item`). Raises BadImage."""
        io_ = self.io
        if self.decode == "gpu":
            from hierdctl.gpu_decode import encode_item

            return encode_item(data, view, io_["image_size"], io_["mean"], io_["std"], io_["eval_transform"], self.plan)
        from hierdctl.images import decode_view

        return {"image": decode_view(data, view, io_["image_size"], io_["mean"], io_["std"], io_["eval_transform"],
                                     self.plan)}

    def build(self, sample: CachedSample, i: int, epoch: int) -> dict:
        """The training item of cached sample `i` (its global index) at `epoch`. Raises CorruptSample."""
        import torch

        from hierdctl.images import BadImage, View

        io_ = self.io
        meta, a = sample.meta, sample.arrays
        if self.images is not None:
            data = self.images.read(self.units[self._shard_of(i)], meta.get("key", ""))
            if data is None:
                raise CorruptSample("image_missing", f"{sample.key}: source key {meta.get('key')!r} is not in "
                                    f"unit {self.units[self._shard_of(i)]} of --images")
            if sha256(data) != meta.get("sha256"):
                raise CorruptSample("image_mismatch", f"{sample.key}: the source's image for {meta.get('key')!r} is "
                                    "not the one the teacher saw (sha256 differs)")
            sample.image = data
        try:
            rng = np.random.default_rng([self.seed, epoch, i])
            n_views, n_caps = len(meta["views"]), len(meta["captions"])
            v = int(rng.integers(n_views)) if self.view_policy == "random" else epoch % n_views
            c, c2 = self._captions(rng, n_caps, int(meta.get("real_captions", n_caps)))
            out = self.pixels(sample.image, View.from_json(meta["views"][v]))
            out["text"] = io_["tokenize"]([meta["captions"][c]])[0]
            out["index"] = torch.tensor(i)
            if self.needs["global"]:
                out["img_t"] = torch.from_numpy(a["img_emb"][v])
                out["txt_t"] = torch.from_numpy(a["txt_emb"][c])
                for k in range(1, self.needs.get("teachers", 1)):  # the ensemble's other teachers
                    out[f"img_t_{k}"] = torch.from_numpy(a[f"img_emb_t{k}"][v])
                    out[f"txt_t_{k}"] = torch.from_numpy(a[f"txt_emb_t{k}"][c])
            if c2 is not None:  # real+synthetic: the second caption of the step, and its teachers' embeddings
                out["text_2"] = io_["tokenize"]([meta["captions"][c2]])[0]
                if self.needs["global"]:
                    out["txt_t_2"] = torch.from_numpy(a["txt_emb"][c2])
                    for k in range(1, self.needs.get("teachers", 1)):
                        out[f"txt_t_{k}_2"] = torch.from_numpy(a[f"txt_emb_t{k}"][c2])
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
            if self.needs.get("tokens"):  # --store tokens: the teacher's patch tokens (G_t, D), unnormalised
                out["tok_t"] = torch.from_numpy(a["img_tok"][v])
            if self.needs["mask_noise"]:
                out["mask_noise"] = torch.from_numpy(rng.random(io_["grid_size"]).astype(np.float32))
        except BadImage as e:
            raise CorruptSample("bad_image", f"{sample.key}: {e}") from None
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise CorruptSample("inconsistent_sample", f"{sample.key}: {type(e).__name__} {str(e)[:120]}") from None
        teacher_arrays = ("img_t", "txt_t", "clu_t", "phr_t", "neg_t", "clu_crop_t", "tok_t")
        for name in [n for n in out if n.startswith(teacher_arrays)]:
            if not torch.isfinite(out[name]).all():
                raise CorruptSample("non_finite_teacher_features", f"{sample.key}: {name}")
        return out


# ----------------------------------------------------------------------------------
# The streaming reader: caches that do not sit on a local disk
# ----------------------------------------------------------------------------------


class CacheStream:
    """Sequential reading of a cache's shards (a local folder or a URL: http(s)://, file:, s3://,
    gs://… through hierdctl.sources' openers), for caches on object storage.

    Per epoch the shard order is a permutation seeded by (seed, epoch); rank r takes every
    world-th shard of it and DataLoader worker w every W-th of those; each worker reads its
    shards front to back and shuffles the samples through a buffer seeded by (seed, epoch,
    rank, worker). So that every rank and worker yields the same number of batches (DDP needs
    equal steps), each yields `steps_per_worker` batches per epoch, the most the smallest
    share allows; what is left over in an epoch is not used that epoch (docs/distill.md).
    Resume is exact: the stream of an epoch is a pure function of (seed, epoch, world, W), and
    the batches already consumed are skipped by reading, not decoding, their samples.
    """

    def __init__(self, cache: Cache, dataset: CacheDataset, world: int, rank: int, workers: int,
                 local_batch: int, buffer: int, seed: int):
        self.cache, self.ds = cache, dataset
        self.world, self.rank, self.workers = world, rank, max(1, workers)
        self.B, self.buffer, self.seed = local_batch, buffer, seed
        counts = [e["samples"] for e in cache.shard_entries]
        self.first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)  # global index of each shard's first
        self.counts = counts
        self.epoch, self.skip_batches = 0, 0

    def shards_of(self, epoch: int, rank: int, worker: int) -> list[int]:
        order = np.random.default_rng([self.seed, epoch, 7919]).permutation(len(self.counts))
        return order[rank :: self.world][worker :: self.workers].tolist()

    def steps_per_worker(self, epoch: int) -> int:
        return min(sum(self.counts[s] for s in self.shards_of(epoch, r, w)) // self.B
                   for r in range(self.world) for w in range(self.workers))

    def steps_per_epoch(self, epoch: int) -> int:
        return self.steps_per_worker(epoch) * self.workers

    def _samples(self, shard: int):
        """(global index, CachedSample | CorruptSample) of one shard, read front to back."""
        from hierdctl.sources import open_shard

        label = cache_file(self.cache.root, self.cache.shard_entries[shard]["name"])
        stream, closer = open_shard(label)
        try:
            key, members, pos = None, {}, 0
            with tarfile.open(fileobj=stream, mode="r|") as tf:
                for m in tf:
                    tf.members = []
                    k, ext = m.name.split(".", 1)
                    if k != key and key is not None:
                        yield int(self.first[shard]) + pos, key, members
                        pos, members = pos + 1, {}
                    key = k
                    members[ext] = tf.extractfile(m).read()
            if key is not None:
                yield int(self.first[shard]) + pos, key, members
        finally:
            closer.close()

    def __iter__(self):
        from torch.utils.data import get_worker_info

        wi = get_worker_info()
        w = 0 if wi is None else wi.id
        epoch = self.epoch
        budget = self.steps_per_worker(epoch) * self.B  # items this worker yields this epoch
        # Batches are taken from the workers in turn: worker w made batches w, w+W, … of the epoch.
        skip_items = (self.skip_batches // self.workers + (w < self.skip_batches % self.workers)) * self.B
        rng = np.random.default_rng([self.seed, epoch, self.rank, w])
        buf: list = []
        state = {"n": 0, "bad": []}  # items counted towards the budget; damaged samples not yet reported

        def take(entry):
            """The item of one buffered sample, or None (skipped on resume, or damaged: counted)."""
            i, key, members = entry
            state["n"] += 1
            if state["n"] <= skip_items:  # consumed before a resume: read, not decoded
                return None
            try:
                item = self.ds.build(decode_sample(key, members), i, epoch)
            except CorruptSample as e:  # the next good sample takes its place, as in the random-access reader
                state["n"] -= 1
                state["bad"].append(f"{self.where(i)}: {e}")
                return None
            item["bad"], state["bad"] = "; ".join(state["bad"]), []
            return item

        for shard in self.shards_of(epoch, self.rank, w):
            for entry in self._samples(shard):
                buf.append(entry)
                if len(buf) < self.buffer:
                    continue
                j = int(rng.integers(len(buf)))
                buf[j], buf[-1] = buf[-1], buf[j]
                if state["n"] >= budget:
                    return
                item = take(buf.pop())
                if item is not None:
                    yield item
        order = rng.permutation(len(buf))
        for j in order:
            if state["n"] >= budget:
                return
            item = take(buf[j])
            if item is not None:
                yield item

    def where(self, i: int) -> str:
        s = int(np.searchsorted(self.first, i, side="right") - 1)
        return f"{self.cache.shard_entries[s]['name']} sample {i - int(self.first[s])}"
