"""The embeddings folder of `hierdctl embed`: the embed → index → search contract.

    OUT/embed-config.json           what the embeddings are of: the identity (model and its weight
                                    fingerprint, source, modality, dtype, precision, …); written
                                    first, a rerun must match it to resume
    OUT/shard-NNNNN.image.npy       (N,D) float16|float32, L2-normalised image embeddings; row i is
                                    sample i of source unit NNNNN (modality image or both)
    OUT/shard-NNNNN.text.npy        (M,D) caption embeddings, the samples' captions flattened in order
                                    (modality text or both)
    OUT/shard-NNNNN.text_row.npy    (M,) int64: the sample (row of this shard) each caption belongs to
    OUT/shard-NNNNN.hashes.npy      (N,2) uint64: 64-bit hashes of each sample's key and image bytes
                                    (0: no image); duplicates are counted from them
    OUT/shard-NNNNN.rows.json       {"unit": the source unit's label, "keys": [N], "paths": [N],
                                    "captions": [N lists]}
    OUT/shard-NNNNN.done.json       the done-marker, written last: rows, texts, caption-less and
                                    skipped samples (by reason and by key), every file's bytes and sha256
    OUT/manifest.json               schema, model, source, counts, shards, content digest; rewritten at
                                    the end of every run

One shard per source unit (an input .tar, or --rows-per-shard table rows), as in the teacher
cache. Every file is written atomically (hierdctl/atomic.py) and the done-marker last, so a
kill at any moment leaves finished shards intact: a rerun re-verifies them (size, sha256) and
redoes only the rest. Arrays are plain .npy, read with allow_pickle=False (never unpickled);
the rest is JSON. A `path` is the image's file for tables and Karpathy JSON, `SHARD#KEY.EXT`
for a member of a WebDataset shard.

`Embeddings` reads a complete folder: row ids are global (shards in order, rows within), for
`hierdctl index` and `hierdctl search`.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np

from hierdctl.errors import UserError

SCHEMA = "hierdctl.embeddings/1"
CONFIG_NAME = "embed-config.json"
MANIFEST_NAME = "manifest.json"
MODALITIES = ("both", "image", "text")
DTYPES = {"fp16": np.float16, "fp32": np.float32}
OVER = ("image", "text")  # what an index is built over: the image rows or the caption rows
_OURS = re.compile(r"^shard-\d{5}\.(image\.npy|text\.npy|text_row\.npy|hashes\.npy|rows\.json|done\.json)$")


def shard_stem(index: int) -> str:
    return f"shard-{index:05d}"


def done_name(index: int) -> str:
    return f"{shard_stem(index)}.done.json"


def _is_own_name(name: str) -> bool:
    return bool(_OURS.match(name)) or name in (CONFIG_NAME, MANIFEST_NAME)


def is_own(name: str) -> bool:
    """A file embed writes, or the leftover of a killed atomic write of one, or the folder lock."""
    from hierdctl.atomic import leftover_base

    base = leftover_base(name)
    return _is_own_name(name) or (base is not None and _is_own_name(base)) or name.startswith(".hierdctl.")


def is_embeddings_dir(root: Path) -> bool:
    try:
        obj = json.loads((Path(root) / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(obj, dict) and obj.get("schema") == SCHEMA


def key_hash(text: str | bytes) -> int:
    """A 64-bit hash (blake2b) of a key or of image bytes; 0 is kept for "no image"."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") or 1


# ----------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------


def check_out(out: Path, where: str = "--out") -> None:
    """Before the lock file lands in it: OUT is new, empty, or an embeddings folder hierdctl wrote."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory", where)
    if out.is_dir() and any(not is_own(p.name) for p in out.iterdir()) and not is_embeddings_dir(out):
        raise UserError(f"{out} is not empty and is not a hierdctl embeddings folder (no {CONFIG_NAME} with schema "
                        f"{SCHEMA!r}); pick a new or empty folder", where)


def clear(out: Path) -> list[str]:
    """Remove what embed wrote into `out` (never anything else, e.g. an index folder inside it)."""
    removed = []
    for p in sorted(Path(out).iterdir()):
        if p.is_file() and is_own(p.name) and not p.name.startswith(".hierdctl."):
            p.unlink()
            removed.append(p.name)
    return removed


def prepare_out(out: Path, identity: dict, overwrite: bool, where: str = "--out") -> list[str]:
    """Create OUT, or check that it holds embeddings of this very configuration. Returns notes."""
    from hierdctl import atomic

    notes = []
    out = Path(out)
    cpath = out / CONFIG_NAME
    if overwrite and out.is_dir() and any(p.is_file() and is_own(p.name) and not p.name.startswith(".hierdctl.")
                                          for p in out.iterdir()):
        notes.append(f"--overwrite: removed the earlier embeddings' {len(clear(out))} files")
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():  # what killed writes of embed's own files left (NAME.tmpPID); the lock is ours
        base = atomic.leftover_base(p.name)
        if base is not None and _is_own_name(base) and (p.is_file() or p.is_symlink()):
            p.unlink(missing_ok=True)
    if not cpath.exists():
        atomic.write_json_atomic(cpath, {"schema": SCHEMA, "identity": identity})
    have = json.loads(cpath.read_text(encoding="utf-8"))
    if have.get("schema") != SCHEMA:
        raise UserError(f"{out} holds embeddings of schema {have.get('schema')!r}, not {SCHEMA!r}; use --overwrite",
                        where)
    old = have.get("identity", {})
    diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
    if diff:
        detail = "; ".join(f"{k}: the folder has {old.get(k)!r}, this run {identity.get(k)!r}" for k in diff[:4])
        raise UserError(f"{out} holds embeddings made with another configuration ({detail}). Use another --out, or "
                        "--overwrite to start over", where)
    return notes


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def write_shard(out: Path, index: int, label: str, *, image: np.ndarray | None, text: np.ndarray | None,
                text_row: np.ndarray, hashes: np.ndarray, rows: dict, skipped: list[dict],
                captionless: dict) -> dict:
    """Shard `index`'s files, each atomically, then its done-marker (last). Returns the marker.

    image (N,D) | None, text (M,D) | None, text_row (M,) int64, hashes (N,2) uint64, rows:
    {"keys", "paths", "captions"} with N entries each; skipped: [{key, reason, detail}]."""
    from hierdctl import atomic

    n = len(rows["keys"])
    assert hashes.shape == (n, 2) and hashes.dtype == np.uint64, (hashes.shape, hashes.dtype, n)
    assert image is None or image.shape[0] == n, (None if image is None else image.shape, n)
    assert text is None or text.shape[0] == text_row.shape[0], (None if text is None else text.shape, text_row.shape)
    stem = shard_stem(index)
    files: dict[str, dict] = {}
    payload = [("hashes.npy", _npy_bytes(hashes)), ("text_row.npy", _npy_bytes(text_row.astype(np.int64)))]
    if image is not None:
        payload.append(("image.npy", _npy_bytes(image)))
    if text is not None:
        payload.append(("text.npy", _npy_bytes(text)))
    payload.append(("rows.json", json.dumps({"unit": label} | rows, ensure_ascii=False).encode("utf-8")))
    for suffix, data in payload:
        atomic.write_bytes_atomic(out / f"{stem}.{suffix}", data)
        files[suffix] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    marker = {
        "schema": SCHEMA, "index": index, "unit": label, "rows": n, "texts": int(text_row.shape[0]),
        "captionless": dict(sorted(captionless.items())),
        "skipped": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "skipped_samples": skipped, "files": files,
    }
    atomic.write_json_atomic(out / done_name(index), marker)  # last: the shard is finished
    return marker


def verified_done(out: Path, index: int) -> tuple[dict | None, str | None]:
    """(marker, None) for a finished shard whose files are the ones written (size, sha256 re-checked);
    (None, why) for one to redo; (None, None) if never finished."""
    from hierdctl.atomic import sha256_file

    p = Path(out) / done_name(index)
    if not p.exists():
        return None, None
    try:
        marker = json.loads(p.read_text(encoding="utf-8"))
        files = marker["files"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return None, "its done-marker is unreadable"
    for suffix, st in files.items():
        f = Path(out) / f"{shard_stem(index)}.{suffix}"
        if not f.is_file() or f.stat().st_size != st["bytes"]:
            return None, f"{f.name} is missing or has another size than recorded"
        if sha256_file(f) != st["sha256"]:
            return None, f"{f.name} does not match its recorded sha256"
    return marker, None


def remove_shard(out: Path, index: int) -> None:
    """Every file of shard `index` and the leftovers of killed writes of them."""
    from hierdctl.atomic import leftover_base

    stem = shard_stem(index) + "."
    for p in Path(out).iterdir():
        base = leftover_base(p.name) or p.name
        if base.startswith(stem) and _is_own_name(base) and p.is_file():
            p.unlink()


def content_digest(shards: list[dict]) -> str:
    """sha256 over every shard's file digests, in order: what the embeddings are, byte for byte
    (an index records it; a rerun that changes nothing keeps it)."""
    h = hashlib.sha256()
    for s in shards:
        h.update(json.dumps([s["index"], sorted((k, v["sha256"]) for k, v in s["files"].items())]).encode())
    return h.hexdigest()


def _duplicates(out: Path, shards: list[dict]) -> tuple[int, int]:
    """(samples whose key an earlier sample has, samples whose image bytes an earlier one has)."""
    if not shards:
        return 0, 0
    h = np.concatenate([np.load(out / f"{shard_stem(s['index'])}.hashes.npy", allow_pickle=False) for s in shards])
    keys = int(len(h) - len(np.unique(h[:, 0])))
    images = h[h[:, 1] != 0, 1]
    return keys, int(len(images) - len(np.unique(images)))


def write_manifest(out: Path, identity: dict, model: dict, source, started: float) -> dict:
    """The manifest from every finished shard's done-marker (all units of the source)."""
    from hierdctl import atomic

    out = Path(out)
    shards, missing = [], 0
    for u in source.units:
        marker, _ = verified_done(out, u.index)
        if marker is None:
            missing += 1
            continue
        shards.append({k: marker[k] for k in ("index", "unit", "rows", "texts", "files")})
        shards[-1]["_marker"] = marker
    skipped, captionless = Counter(), Counter()
    for s in shards:
        skipped.update(s["_marker"]["skipped"])
        captionless.update(s["_marker"]["captionless"])
    for s in shards:
        del s["_marker"]
    dup_keys, dup_images = _duplicates(out, shards)
    manifest = {
        "schema": SCHEMA,
        "identity": identity,
        "model": model,
        "modality": identity["modality"],
        "dtype": identity["dtype"],
        "source": source.describe(),
        "complete": missing == 0,
        "shards_total": len(source.units),
        "shards_done": len(shards),
        "counts": {
            "rows": sum(s["rows"] for s in shards), "texts": sum(s["texts"] for s in shards),
            "captionless": dict(sorted(captionless.items())), "captionless_total": int(sum(captionless.values())),
            "skipped": dict(sorted(skipped.items())), "skipped_total": int(sum(skipped.values())),
            "duplicate_keys": dup_keys, "duplicate_images": dup_images,
        },
        "shards": shards,
        "content_digest": content_digest(shards),
        "wall_seconds_last_run": round(time.time() - started, 3),
    }
    atomic.write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest


# ----------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------


class Embeddings:
    """A complete embeddings folder: its manifest, vectors shard by shard, rows by global id."""

    def __init__(self, root: Path, where: str = "DIR"):
        self.root, self.where = Path(root), where
        if not self.root.is_dir():
            raise UserError(f"{root} is not a directory", where)
        try:
            m = json.loads((self.root / MANIFEST_NAME).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{root} holds no {MANIFEST_NAME}: not an embeddings folder written by hierdctl embed",
                            where) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{root}/{MANIFEST_NAME} is unreadable ({e})", where) from None
        if not isinstance(m, dict) or m.get("schema") != SCHEMA:
            raise UserError(f"{root}/{MANIFEST_NAME} is not an embeddings manifest of schema {SCHEMA!r}", where)
        if not m["complete"]:
            raise UserError(f"the embeddings in {root} are incomplete ({m['shards_done']}/{m['shards_total']} "
                            "shards): rerun the same hierdctl embed command to finish them", where)
        self.manifest = m
        self.shards = m["shards"]
        self._rows: dict[int, dict] = {}

    @property
    def has(self) -> tuple[str, ...]:
        return {"both": ("image", "text"), "image": ("image",), "text": ("text",)}[self.manifest["modality"]]

    def counts(self, over: str) -> list[int]:
        """Rows per shard of the `over` vectors."""
        return [s["rows"] if over == "image" else s["texts"] for s in self.shards]

    def dim(self) -> int:
        return int(self.manifest["model"]["embed_dim"])

    def load(self, shard: dict, over: str) -> np.ndarray:
        """(n,D) float32 vectors of one shard, re-normalised (fp16 storage rounds the norms)."""
        p = self.root / f"{shard_stem(shard['index'])}.{over}.npy"
        try:
            x = np.load(p, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {p.name} ({e}): rerun hierdctl embed on {self.root} to redo it",
                            self.where) from None
        want = shard["rows"] if over == "image" else shard["texts"]
        if x.ndim != 2 or x.shape[0] != want:
            raise UserError(f"{p.name} holds {x.shape} vectors, its done-marker {want}: rerun hierdctl embed",
                            self.where)
        n = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.maximum(n, 1e-12)

    def vectors(self, over: str):
        """(shard, (n,D) float32) for every shard in order."""
        for s in self.shards:
            yield s, self.load(s, over)

    def gather(self, ids: np.ndarray, over: str) -> np.ndarray:
        """(len(ids),D) float32 vectors of global row ids (any order), reading only the shards they fall in."""
        ids = np.asarray(ids, np.int64)
        starts = np.concatenate([[0], np.cumsum(self.counts(over))])
        out = np.empty((len(ids), self.dim()), np.float32)
        which = np.searchsorted(starts, ids, side="right") - 1
        for si in np.unique(which):
            sel = np.flatnonzero(which == si)
            out[sel] = self.load(self.shards[si], over)[ids[sel] - starts[si]]
        return out

    def _shard_rows(self, si: int) -> dict:
        if si not in self._rows:
            s = self.shards[si]
            p = self.root / f"{shard_stem(s['index'])}.rows.json"
            rows = json.loads(p.read_text(encoding="utf-8"))
            rows["text_row"] = np.load(self.root / f"{shard_stem(s['index'])}.text_row.npy", allow_pickle=False)
            self._rows[si] = rows
        return self._rows[si]

    def lookup(self, row: int, over: str) -> dict:
        """What global row `row` of the `over` vectors is: key, path, captions (an image row) or
        the caption and its sample's key and path (a text row)."""
        starts = np.concatenate([[0], np.cumsum(self.counts(over))])
        si = int(np.searchsorted(starts, row, side="right") - 1)
        r = self._shard_rows(si)
        local = int(row - starts[si])
        if over == "image":
            return {"key": r["keys"][local], "path": r["paths"][local], "captions": r["captions"][local]}
        sample = int(r["text_row"][local])
        first = int(np.searchsorted(r["text_row"], sample))  # captions of a sample are consecutive
        return {"key": r["keys"][sample], "path": r["paths"][sample],
                "caption": r["captions"][sample][local - first]}
