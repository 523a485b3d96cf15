"""The data-source grammar, shared by every stage that reads image–text data.

    data/{00000..00099}.tar     WebDataset shards in img2dataset's layout (brace pattern)
    data/                       a directory of .tar shards
    data/00000.tar              one shard
    pairs.csv | pairs.tsv       an image-path column and a caption column
    pairs.jsonl                 the same as JSON lines; a caption may be a list of captions
    dataset_coco.json           a COCO / Flickr30k Karpathy-split file (+ image root, split)

A source is cut into *units* (one input shard, or a chunk of table rows) that stages
process independently: units are what ranks split between them and what resumes.
Iterating a unit yields `Sample`s and `Skip`s; a skip is never fatal and carries a reason
that is counted. Nothing here decodes images: that happens in `images.decode_rgb`.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .configs import SourceOptions  # noqa: F401 (part of this module's interface)
from .errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Sample:
    key: str
    image: bytes
    image_ext: str
    captions: list[str]
    meta: dict = field(default_factory=dict)  # the sample's .json, if any


@dataclass
class Skip:
    key: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class Unit:
    index: int  # position in the source's unit list: output shard number
    label: str  # the input shard path, or "rows a..b of file"




def _clean_captions(raw) -> tuple[list[str], str | None]:
    """Captions as stripped non-empty strings, or a skip reason."""
    items = raw if isinstance(raw, list) else [raw]
    out = []
    for c in items:
        if isinstance(c, bytes):
            try:
                c = c.decode("utf-8")
            except UnicodeDecodeError:
                return [], "undecodable_caption"
        if not isinstance(c, str):
            continue
        c = " ".join(c.split())
        if c:
            out.append(c)
    return (out, None) if out else ([], "empty_caption")


# ----------------------------------------------------------------------------------
# WebDataset shards
# ----------------------------------------------------------------------------------


class TarSource:
    kind = "webdataset"

    def __init__(self, spec: str, paths: list[str]):
        self.spec, self.paths = spec, paths
        self.units = [Unit(i, p) for i, p in enumerate(paths)]

    def describe(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "units": len(self.units)}

    def iter_unit(self, unit: Unit) -> Iterator[Sample | Skip]:
        """Group consecutive members by key (webdataset's rule: the basename up to its first dot)."""
        key, members = None, {}
        try:
            with tarfile.open(unit.label, "r|*") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    d, base = os.path.split(m.name)
                    if "." not in base or base.startswith("."):
                        continue
                    k, ext = base.split(".", 1)
                    k = f"{d}/{k}" if d else k
                    if k != key:  # the previous sample is complete: yield it before reading on
                        if key is not None:
                            yield self._make(key, members)
                        key, members = k, {}
                    data = tf.extractfile(m).read()
                    if len(data) != m.size:
                        raise tarfile.ReadError("unexpected end of data")
                    members[ext.lower()] = data
        except (tarfile.ReadError, EOFError, OSError) as e:
            # One skip per truncation: the sample being read when the archive broke is lost with
            # the rest of the shard, and how many samples that rest held cannot be known.
            yield Skip(key or unit.label, "truncated_tar",
                       f"{unit.label}: {e}; the rest of the shard from here on is lost "
                       "(how many samples it held cannot be known)")
            return
        if key is not None:
            yield self._make(key, members)

    @staticmethod
    def _make(key: str, members: dict) -> Sample | Skip:
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            return Skip(key, "missing_image")
        meta = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"])
            except (json.JSONDecodeError, UnicodeDecodeError):
                meta = {}
            if not isinstance(meta, dict):  # a JSON list or number carries no fields
                meta = {}
        if "txt" in members:
            captions, why = _clean_captions(members["txt"])
        elif "captions" in meta or "caption" in meta:
            captions, why = _clean_captions(meta.get("captions", meta.get("caption")))
        else:
            return Skip(key, "missing_caption")
        if why:
            return Skip(key, why)
        # A .json may carry extra captions (COCO-style shards): keep every distinct one, in order,
        # cleaned like the rest (non-strings such as null or numbers dropped, whitespace folded).
        extra = _clean_captions(meta["captions"])[0] if isinstance(meta.get("captions"), list) else []
        distinct: list[str] = []
        for c in captions + extra:
            if c not in distinct:
                distinct.append(c)
        return Sample(key, members[ext], ext, distinct, meta)


# ----------------------------------------------------------------------------------
# Row sources: tables and Karpathy JSON
# ----------------------------------------------------------------------------------


@dataclass
class _Row:
    key: str
    path: str
    captions: object  # str or list, cleaned later


class RowSource:
    def __init__(self, kind: str, spec: str, rows: list[_Row], rows_per_unit: int):
        self.kind, self.spec, self.rows = kind, spec, rows
        n = max(1, rows_per_unit)
        self.units = [
            Unit(i, f"rows {a}..{min(a + n, len(rows)) - 1} of {spec}") for i, a in enumerate(range(0, len(rows), n))
        ]
        self._n = n

    def describe(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "units": len(self.units), "rows": len(self.rows)}

    def unit_rows(self, unit: Unit) -> int:
        return len(self.rows[unit.index * self._n : (unit.index + 1) * self._n])

    def iter_unit(self, unit: Unit) -> Iterator[Sample | Skip]:
        for row in self.rows[unit.index * self._n : (unit.index + 1) * self._n]:
            captions, why = _clean_captions(row.captions)
            if why:
                yield Skip(row.key, why)
                continue
            try:
                with open(row.path, "rb") as f:
                    data = f.read()
            except OSError as e:
                yield Skip(row.key, "missing_file", f"{row.path}: {e.strerror}")
                continue
            ext = Path(row.path).suffix.lstrip(".").lower() or "jpg"
            yield Sample(row.key, data, ext, captions, {"path": row.path})


def _table_rows(path: Path, opts: SourceOptions) -> list[_Row]:
    base = path.parent
    rows: list[_Row] = []
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8") as f:
            records = []
            for ln, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"line {ln} is not JSON ({e.msg})", str(path)) from None
    else:
        delim = "\t" if path.suffix.lower() == ".tsv" else ","
        with open(path, newline="", encoding="utf-8") as f:
            records = list(csv.DictReader(f, delimiter=delim))
    if not records:
        raise UserError("has no rows", str(path))
    for flag, col in (("--image-col", opts.image_col), ("--caption-col", opts.caption_col)):
        if col not in records[0]:
            raise UserError(f"column {col!r} not found in {path} (columns: {', '.join(map(str, records[0]))})", flag)
    width = len(str(len(records)))
    for i, r in enumerate(records):
        p = str(r[opts.image_col] or "")
        rows.append(_Row(str(i).zfill(max(9, width)), str(base / p) if p else "", r[opts.caption_col]))
    return rows


def _karpathy_rows(path: Path, opts: SourceOptions) -> list[_Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"is not a JSON file ({e})", str(path)) from None
    if not isinstance(data, dict) or "images" not in data:
        raise UserError("is not a Karpathy-split JSON (no 'images' list)", str(path))
    root = Path(opts.image_root) if opts.image_root else path.parent
    if not root.is_dir():
        raise UserError(f"image root {root} is not a directory", "--image-root")
    rows = []
    for im in data["images"]:
        if opts.split != "all" and im.get("split") != opts.split:
            continue
        rel = os.path.join(im.get("filepath", ""), im["filename"])
        caps = [s.get("raw", " ".join(s.get("tokens", []))) for s in im.get("sentences", [])]
        key = str(im.get("imgid", im.get("cocoid", Path(im["filename"]).stem)))
        rows.append(_Row(key, str(root / rel), caps))
    if not rows:
        splits = sorted({im.get("split", "?") for im in data["images"]})
        raise UserError(f"no image in split {opts.split!r} of {path} (splits: {', '.join(splits)})", "--split")
    return rows


def open_source(spec: str, opts: SourceOptions | None = None, where: str = "SOURCE"):
    """Resolve a source spec to a TarSource or RowSource. Errors name `where`."""
    opts = opts or SourceOptions()
    p = Path(spec)
    if "{" in spec and "}" in spec:
        import braceexpand

        paths = list(braceexpand.braceexpand(spec))
        missing = [q for q in paths if not Path(q).is_file()]
        if len(missing) == len(paths):
            raise UserError(f"no file of {spec} exists", where)
        if missing:
            raise UserError(f"{len(missing)} of {len(paths)} shards do not exist (first: {missing[0]})", where)
        return TarSource(spec, paths)
    if p.is_dir():
        paths = sorted(glob.glob(str(p / "*.tar")))
        if not paths:
            raise UserError(f"directory {spec} holds no .tar shards", where)
        return TarSource(spec, paths)
    if not p.exists():
        raise UserError(f"{spec} does not exist", where)
    suffix = p.suffix.lower()
    if suffix == ".tar":
        return TarSource(spec, [str(p)])
    if suffix in (".csv", ".tsv", ".jsonl"):
        return RowSource("table", spec, _table_rows(p, opts), opts.rows_per_unit)
    if suffix == ".json":
        return RowSource("karpathy", spec, _karpathy_rows(p, opts), opts.rows_per_unit)
    raise UserError(f"cannot read {spec}: expected .tar shards, a directory, .csv/.tsv/.jsonl or a Karpathy .json", where)
