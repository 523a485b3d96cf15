"""The data-source grammar, shared by every stage that reads image–text data.

    data/{00000..00099}.tar     WebDataset shards in img2dataset's layout (brace pattern)
    data/                       a directory of .tar shards
    data/00000.tar              one shard
    pairs.csv | pairs.tsv       an image-path column and a caption column
    pairs.jsonl                 the same as JSON lines; a caption may be a list of captions
    dataset_coco.json           a COCO / Flickr30k Karpathy-split file (+ image root, split)

WebDataset shards may also be URLs, brace-expanded the same way (docs/sources.md):

    pipe:aws s3 cp s3://bucket/{00000..00331}.tar -    a shell command writing the shard to stdout
    https://host/shards/{000..009}.tar                   fetched with curl (webdataset.gopen)
    file:/data/{0..3}.tar                                a local file, as a URL
    s3://bucket/{0..9}.tar, gs://…, hf://…               fsspec, with the protocol's backend installed

Local shards must exist before any work starts; a URL shard that cannot be opened or read
is one `unreadable_shard` skip. A shard cut short, or with a corrupt header, is one
`truncated_tar` / `corrupt_tar` skip that says how many samples were read before it.

A source is cut into *units* (one input shard, or a chunk of table rows) that stages
process independently: units are what ranks split between them and what resumes.
Iterating a unit yields `Sample`s and `Skip`s; a skip is never fatal and carries a reason
that is counted. Nothing here decodes images: that happens in `images.decode_rgb`.

What a sample must carry is the reader's `Needs`: an image and a caption by default (the
pipeline's stages and eval-retrieval need both). `hierdctl embed` reads an image collection
with `Needs(caption=False)`: a sample without a usable caption is then a Sample with no
captions whose `caption_issue` names the reason it would have been skipped for (counted by
the stage, never silent); `Needs(image=False)` reads texts, with or without images.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .configs import SourceOptions  # noqa: F401 (part of this module's interface)
from .errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
FOLDER_IMAGE_EXTS = IMAGE_EXTS + ("bmp", "gif", "tif", "tiff", "jpe")  # class-per-folder trees (FolderTree)


@dataclass
class Sample:
    key: str
    image: bytes  # b"" when the reader does not need images and the sample has none
    image_ext: str
    captions: list[str]
    meta: dict = field(default_factory=dict)  # the sample's .json, if any
    captions_cut: int = 0  # captions cut to MAX_CAPTION_CHARS (counted as caption_truncated)
    caption_issue: str | None = None  # Needs(caption=False): why captions is empty (a skip reason)


@dataclass(frozen=True)
class Needs:
    """What a sample must carry to be yielded; one without it is a Skip naming what is missing."""

    image: bool = True
    caption: bool = True


BOTH = Needs()


@dataclass
class Skip:
    key: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class Unit:
    index: int  # position in the source's unit list: output shard number
    label: str  # the input shard path, or "rows a..b of file"




# Captions are bounded before anything parses them (chunking grows about quadratically with
# length: a 4 MB caption stalled cache-teacher for minutes). CLIP reads 77 tokens, about 300
# characters of English: 2,000 characters cost nothing a model could use.
MAX_CAPTION_CHARS = 2000
# Whitespace, and characters that print nothing: format characters (zero-width space and
# joiners, word joiner, BOM, soft hyphen, direction marks) and C0/C1 controls. A caption made
# of these alone is empty.
_INVISIBLE = "".join(map(chr, [*range(0x00, 0x21), *range(0x7F, 0xA1), 0xAD, 0x61C, 0x1680, 0x180E,
                               *range(0x2000, 0x2010), 0x2028, 0x2029, *range(0x202A, 0x2030), 0x205F,
                               *range(0x2060, 0x2065), *range(0x2066, 0x2070), 0x3000, 0xFEFF]))


def bound_caption(c: str) -> tuple[str, bool]:
    """(caption, was it cut): invisible characters at the ends stripped, whitespace folded, at
    most MAX_CAPTION_CHARS, cut at the last space before the cap when there is one in its second
    half. "" when nothing visible is left. Linear in the caption (str.strip, str.split), and
    only its first 4 x MAX_CAPTION_CHARS characters are folded."""
    c = c.strip(_INVISIBLE)
    head = c[: 4 * MAX_CAPTION_CHARS]
    folded = " ".join(head.split())
    if len(folded) <= MAX_CAPTION_CHARS and len(head) == len(c):
        return folded, False
    cut = folded.rfind(" ", MAX_CAPTION_CHARS // 2, MAX_CAPTION_CHARS + 1)
    return folded[: cut if cut > 0 else MAX_CAPTION_CHARS].strip(_INVISIBLE), True


def _clean_captions(raw) -> tuple[list[str], str | None, int]:
    """Captions as stripped non-empty strings, bounded (`bound_caption`), or a skip reason;
    and how many of them were cut."""
    items = raw if isinstance(raw, list) else [raw]
    out, cut = [], 0
    for c in items:
        if isinstance(c, bytes):
            try:
                c = c.decode("utf-8")
            except UnicodeDecodeError:
                return [], "undecodable_caption", 0
        if not isinstance(c, str):
            continue
        if _undecodable(c):  # a table read with surrogateescape, or a "\udcXX" JSON escape
            return [], "undecodable_caption", 0
        c, was_cut = bound_caption(c)
        if c:
            out.append(c)
            cut += was_cut
    return (out, None, cut) if out else ([], "empty_caption", 0)


# ----------------------------------------------------------------------------------
# WebDataset shards: local paths and URLs
# ----------------------------------------------------------------------------------

# webdataset.gopen opens these (pipe: runs a shell command, http(s) runs curl, file: is a local
# path); any other scheme://… goes to fsspec, when the backend for it is installed.
GOPEN_SCHEMES = ("pipe", "http", "https", "file")
_URL = re.compile(r"^(?:(pipe|file):|([A-Za-z][A-Za-z0-9+.-]*)://)")

# curl's exit codes that a shard URL typically meets (`man curl`, EXIT CODES).
_CURL_EXITS = {6: "could not resolve the host", 7: "could not connect to the server", 18: "partial transfer",
               22: "the server answered with an HTTP error, 4xx or 5xx", 28: "timed out", 35: "TLS handshake failed",
               52: "empty reply from the server", 56: "the connection broke", 60: "TLS certificate not trusted"}


def url_scheme(spec: str) -> str | None:
    """'pipe', 'file', 'https', 's3', ... for a URL; None for a local path (even one with a colon)."""
    m = _URL.match(spec)
    return (m.group(1) or m.group(2)).lower() if m else None


def _file_url_path(url: str) -> str:
    """The local path of a file: URL, as webdataset.gopen opens it."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    return url2pathname(urlparse(url).path)


def _check_urls(spec: str, urls: list[str], where: str) -> None:
    """What can be checked before any work: local files behind file: URLs exist, the tool or
    fsspec backend a scheme needs is there. Remote shards are only known when opened."""
    import shutil

    schemes = sorted({url_scheme(u) for u in urls})
    for scheme in schemes:
        if scheme == "file":
            missing = [u for u in urls if not Path(_file_url_path(u)).is_file()]
            if len(missing) == len(urls):
                raise UserError(f"no file of {spec} exists", where)
            if missing:
                raise UserError(f"{len(missing)} of {len(urls)} shards do not exist (first: {missing[0]})", where)
        elif scheme in ("http", "https"):
            if shutil.which("curl") is None:
                raise UserError(f"{scheme}:// shards are fetched with curl (webdataset.gopen), and curl is not on PATH",
                                where)
        elif scheme != "pipe":
            import fsspec

            try:
                fsspec.get_filesystem_class(scheme)
            except ImportError as e:
                raise UserError(f"{scheme}:// needs an fsspec backend that is not installed ({e}); or read the "
                                "shards through a command, e.g. 'pipe:aws s3 cp s3://bucket/{00000..00099}.tar -'",
                                where) from None
            except ValueError:
                raise UserError(f"unknown URL scheme {scheme}:// (known: pipe:, file:, http(s)://, and fsspec's "
                                "protocols such as s3:// or gs:// with their backend installed)", where) from None


def open_shard(label: str):
    """(what to read, what to close) for one shard: a local path, a webdataset.gopen URL or an
    fsspec URL. A gopen Pipe (pipe: commands, curl) polls its command after every read and
    raises once it exited non-zero, dropping output still in the pipe: its pipe is read
    directly instead, to the end, and the Pipe's close() checks the exit status once."""
    scheme = url_scheme(label)
    if scheme is None:
        f = open(label, "rb")
        return f, f
    if scheme in GOPEN_SCHEMES:
        from webdataset.gopen import Pipe, gopen

        f = gopen(label, "rb")
        return (f.stream, f) if isinstance(f, Pipe) else (f, f)
    import fsspec

    f = fsspec.open(label, "rb").open()
    return f, f


def _stream_failure(stream, e: Exception) -> str:
    """Why reading a shard's stream failed, in words: a pipe's or curl's exit status, or the error."""
    status = getattr(stream, "status", None)
    proc = getattr(stream, "proc", None)  # webdataset.gopen.Pipe: pipe: commands and curl
    if proc is not None and status not in (None, 0):
        args = proc.args
        if isinstance(args, (list, tuple)) and args and args[0] == "curl":
            return f"curl exit {status} ({_CURL_EXITS.get(status, 'see man curl')})"
        return f"the command exited with status {status}"
    return f"{type(e).__name__}: {e}"[:300]


class _HeaderProbe(tarfile.TarInfo):
    """Keeps the block that tarfile could not read as a header. In stream mode tarfile ends the
    archive silently on any bad header after the first; that block tells the real end (zeros)
    from a cut (a short or missing block) or a corrupt header (512 bytes that are no header).
    TarSource makes one subclass per shard read, so each read has its own `failed`."""

    failed: bytes | None = None

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        try:
            return super().frombuf(buf, encoding, errors)
        except tarfile.HeaderError:
            cls.failed = bytes(buf)
            raise


def _how_it_ended(block: bytes | None) -> tuple[str, str] | None:
    """None when the archive ended with (a part of) its end-of-archive zero blocks: nothing lost.
    Else (skip reason, what happened). A header never starts with a NUL byte (its name does)."""
    if block is None or (block and not any(block)):
        return None
    if not block:
        return "truncated_tar", "the archive ends between two members, without its end-of-archive blocks"
    if len(block) < tarfile.BLOCKSIZE:
        return "truncated_tar", f"the archive is cut inside a member header ({len(block)} of 512 bytes)"
    return "corrupt_tar", "a member header is invalid (bad checksum or not a tar header)"


def member_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member by webdataset's rule: the basename up to its first dot,
    with the member's folder in front; None for a name that is no sample member (no dot, or a
    hidden file). The extension is lower-cased. The one parser of member names of a source."""
    d, base = os.path.split(name)
    if "." not in base or base.startswith("."):
        return None
    k, ext = base.split(".", 1)
    return (f"{d}/{k}" if d else k), ext.lower()


def _member_names(path: str) -> list[str] | None:
    """The names of a plain (USTAR / v7) tar's regular files, read from its 512-byte headers
    with one pread each and nothing else (tarfile's own parsing costs 5-10x more; a listing
    runs over every shard before cache-teacher starts). Stops at the end, a cut or a header
    whose size is no octal number (a listing needs no integrity check: iter_unit reports any
    break); None when a header needs tarfile (pax, GNU long names, base-256 sizes)."""
    out = []
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return []
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos + 512 <= size:
            buf = os.pread(fd, 512, pos)
            if len(buf) < 512 or buf[0] == 0:
                break
            kind, raw = buf[156:157], buf[124:136]
            if kind not in (b"0", b"\0", b"1", b"2", b"5") or raw[0] & 0x80:
                return None
            n = int(raw.split(b"\0", 1)[0].strip() or b"0", 8)
            name = buf[0:100].split(b"\0", 1)[0]
            if buf[257:262] == b"ustar":
                prefix = buf[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix + b"/" + name
            if kind in (b"0", b"\0"):
                out.append(name.decode("utf-8", "surrogateescape"))
            pos += 512 + (n + 511) // 512 * 512
    except (OSError, ValueError):
        pass
    finally:
        os.close(fd)
    return out


class TarSource:
    """WebDataset shards; each shard (a path or a URL) is a unit and its label.

    Duplicate keys: the first sample of a key is kept, every later one is a `duplicate_key`
    skip. Within a shard `iter_unit` sees them itself (the same key again after another key,
    or again right after itself: one of its member names repeats); across shards the reader
    passes the keys of earlier shards (`exclude`), or `later_duplicates` lists them up front."""

    kind = "webdataset"

    def __init__(self, spec: str, paths: list[str], needs: Needs = BOTH):
        self.spec, self.paths, self.needs = spec, paths, needs
        self.units = [Unit(i, p) for i, p in enumerate(paths)]

    def describe(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "units": len(self.units)}

    def unit_keys(self, unit: Unit) -> list[str] | None:
        """Every sample key of a local shard in order, each once, from its tar headers alone (no
        payload is read); None for a URL shard (listing it would mean reading it). A shard that
        breaks is listed up to the break."""
        if url_scheme(unit.label) is not None:
            return None
        names = _member_names(unit.label)
        if names is None:  # pax or GNU headers, base-256 sizes: tarfile reads those
            names = []
            try:
                with tarfile.open(unit.label, "r:") as tf:
                    names = [m.name for m in tf if m.isfile()]
            except (tarfile.TarError, OSError, EOFError):
                pass  # iter_unit reports the break
        keys, seen = [], set()
        for name in names:
            km = member_key(name)
            if km is not None and km[0] not in seen:
                seen.add(km[0])
                keys.append(km[0])
        return keys

    def later_duplicates(self) -> dict[int, dict[str, str]]:
        """unit index -> {key: label of the earlier unit that has it} for every key a unit shares
        with an earlier one (the first copy, in unit order, is the one kept). Lists every local
        shard's tar headers once; URL shards cannot be listed without reading them, so between
        URL shards duplicates are not found (within a shard they always are)."""
        first: dict[str, int] = {}
        later: dict[int, dict[str, str]] = {}
        for u in self.units:
            keys = self.unit_keys(u)
            for k in keys or ():
                if k in first:
                    later.setdefault(u.index, {})[k] = self.units[first[k]].label
                else:
                    first[k] = u.index
        return later

    def iter_unit(self, unit: Unit, exclude=frozenset()) -> Iterator[Sample | Skip]:
        """Group consecutive members by key (webdataset's rule: the basename up to its first dot).

        A sample is yielded once a member of the next key arrives, or at the archive's end. A key
        seen before in this shard, or in `exclude` (keys of earlier units: a set, or a dict key ->
        where it was first), is a `duplicate_key` skip; so is a second sample of the same key right
        after the first (a member name repeats: webdataset would merge the two). If the shard
        breaks first (cut, corrupt header, failing stream), the sample being read is not yielded
        (its members may be incomplete): one skip reports the break, its key is that sample's, and
        its detail says how many samples were read before."""
        label = unit.label
        try:
            stream, closer = open_shard(label)
        except (OSError, ValueError) as e:  # a missing file, a refused pipe:/file: URL, an fsspec error
            yield Skip(label, "unreadable_shard", f"{label}: {_stream_failure(None, e)}")
            return
        probe = type("_Probe", (_HeaderProbe,), {})
        key, members, n = None, {}, 0  # the sample being read, its members, samples yielded so far
        seen: set[str] = set()  # keys of this shard so far
        dup: str | None = None  # why the sample being read is a duplicate, or None
        broke: tuple[str, str] | None = None  # (reason, what) when the archive did not end cleanly
        failure: str | None = None  # the stream itself failed (pipe or curl exit status, I/O error)
        clean = False
        try:
            try:
                tf = tarfile.open(fileobj=stream, mode="r|*", tarinfo=probe)
            except tarfile.TarError as e:  # the first header, or the compression, is unreadable
                if probe.failed == b"":
                    broke = ("truncated_tar", "the shard is empty")
                else:
                    broke = _how_it_ended(probe.failed) or ("corrupt_tar", f"not a tar archive ({e})")
            else:
                with tf:
                    for m in tf:
                        tf.members = []  # stream mode would keep every header of the shard
                        km = member_key(m.name) if m.isfile() else None
                        if km is None:
                            continue
                        k, ext = km
                        if k != key or ext in members:  # the previous sample is complete: yield it first
                            if key is not None:
                                yield self._make(key, members) if dup is None else Skip(key, "duplicate_key", dup)
                                n += 1
                            dup = (f"{k} is also earlier in {label}; the first is kept" if k in seen else
                                   f"{k} is also in {exclude[k] if isinstance(exclude, dict) else 'an earlier shard'}"
                                   "; the first is kept" if k in exclude else None)
                            key, members = k, {}
                            seen.add(k)
                        data = tf.extractfile(m).read()
                        if len(data) != m.size:
                            raise tarfile.ReadError("unexpected end of data")
                        members[ext] = data if dup is None else b""
                broke = _how_it_ended(probe.failed)
                clean = broke is None
                if clean and url_scheme(label) is not None:
                    while stream.read(1 << 20):  # the rest (padding): a command then exits by itself, 0
                        pass
        except (tarfile.TarError, EOFError) as e:  # a cut inside member data, or after a pax/GNU header
            broke = ("corrupt_tar", str(e)) if probe.failed and len(probe.failed) == tarfile.BLOCKSIZE and any(
                probe.failed) else ("truncated_tar", f"the archive is cut ({e})")
        except OSError as e:  # the stream: an I/O error, a broken connection (fsspec)
            failure = _stream_failure(closer, e)
        finally:
            try:
                closer.close()  # a Pipe waits for its command here and raises on a bad exit status
            except OSError as e:
                failure = failure or _stream_failure(closer, e)

        if clean and key is not None:
            yield self._make(key, members) if dup is None else Skip(key, "duplicate_key", dup)
            n, key = n + 1, None
        if failure is not None:
            if clean:
                yield Skip(label, "unreadable_shard", f"{label}: {failure}, after the archive's end ({n} samples read)")
            elif n == 0 and key is None:
                yield Skip(label, "unreadable_shard", f"{label}: {failure}")
            else:
                yield Skip(key or label, "truncated_tar", f"{label}: the stream failed ({failure}); "
                           + _lost(n, key))
        elif broke is not None:
            reason, what = broke
            yield Skip(key or label, reason, f"{label}: {what}; " + _lost(n, key))

    def _make(self, key: str, members: dict) -> Sample | Skip:
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None and self.needs.image:
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
            captions, why, cut = _clean_captions(members["txt"])
        elif "captions" in meta or "caption" in meta:
            captions, why, cut = _clean_captions(meta.get("captions", meta.get("caption")))
        else:
            captions, why, cut = [], "missing_caption", 0
        if why and self.needs.caption:
            return Skip(key, why)
        image = members[ext] if ext is not None else b""
        if why:  # Needs(caption=False): the image alone, and why it has no caption
            return Sample(key, image, ext or "", [], meta, caption_issue=why)
        # A .json may carry extra captions (COCO-style shards): keep every distinct one, in order,
        # cleaned like the rest (non-strings such as null or numbers dropped, whitespace folded).
        extra, _, extra_cut = _clean_captions(meta["captions"]) if isinstance(meta.get("captions"), list) and \
            "txt" in members else ([], None, 0)
        distinct: list[str] = []
        for c in captions + extra:
            if c not in distinct:
                distinct.append(c)
        return Sample(key, image, ext or "", distinct, meta, cut + extra_cut)


def iter_source(source) -> Iterator[Sample | Skip]:
    """Every record of every unit in order, for a reader that reads the whole source in one
    process (eval-retrieval, eval-zeroshot): a key already read in an earlier unit is a
    `duplicate_key` skip (the first copy is kept; within a unit `iter_unit` sees it itself)."""
    seen: dict[str, str] = {}  # key -> the label of the unit it was first read in
    for unit in source.units:
        for rec in source.iter_unit(unit, seen):
            seen.setdefault(rec.key, getattr(unit, "label", source.describe()["spec"]))
            yield rec


def _lost(n: int, key: str | None) -> str:
    """The end of a break's detail: how many samples came before it, what it cost."""
    if key is None:
        return f"{n} samples read before it; the rest of the shard is lost"
    return f"{n} samples read before it; the sample being read ({key}) and the rest of the shard are lost"


# ----------------------------------------------------------------------------------
# Row sources: tables and Karpathy JSON
# ----------------------------------------------------------------------------------


NO_CAPTION = object()  # a table without the caption column (read with Needs(caption=False))


@dataclass
class _Row:
    key: str
    path: str
    captions: object  # str or list, cleaned later; NO_CAPTION when the table has no caption column


class RowSource:
    """Table rows or Karpathy images, `rows_per_unit` to a unit. A key twice (a Karpathy image
    id; table keys are row numbers) keeps its first row; every later one is a `duplicate_key` skip."""

    def __init__(self, kind: str, spec: str, rows: list[_Row], rows_per_unit: int, needs: Needs = BOTH):
        self.kind, self.spec, self.rows, self.needs = kind, spec, rows, needs
        first: dict[str, int] = {}
        self._dup = {i: first[r.key] for i, r in enumerate(rows) if first.setdefault(r.key, i) != i}
        n = max(1, rows_per_unit)
        self.units = [
            Unit(i, f"rows {a}..{min(a + n, len(rows)) - 1} of {spec}") for i, a in enumerate(range(0, len(rows), n))
        ]
        self._n = n

    def describe(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "units": len(self.units), "rows": len(self.rows)}

    def unit_rows(self, unit: Unit) -> int:
        return len(self.rows[unit.index * self._n : (unit.index + 1) * self._n])

    def iter_unit(self, unit: Unit, exclude=frozenset()) -> Iterator[Sample | Skip]:
        """`exclude` is accepted for the readers' sake: duplicate keys were found over all rows."""
        a = unit.index * self._n
        for i, row in enumerate(self.rows[a : (unit.index + 1) * self._n], a):
            if i in self._dup:
                yield Skip(row.key, "duplicate_key", f"row {i} has the key of row {self._dup[i]}; the first is kept")
                continue
            captions, why, cut = ([], "missing_caption", 0) if row.captions is NO_CAPTION else \
                _clean_captions(row.captions)
            if why and self.needs.caption:
                yield Skip(row.key, why)
                continue
            ext = Path(row.path).suffix.lstrip(".").lower() or "jpg"
            if not self.needs.image:  # texts: the image file is not read
                yield Sample(row.key, b"", ext if row.path else "", captions, {"path": row.path}, cut,
                             caption_issue=why)
                continue
            try:
                with open(row.path, "rb") as f:
                    data = f.read()
            except OSError as e:
                yield Skip(row.key, "missing_file", f"{row.path}: {e.strerror}")
                continue
            except ValueError as e:  # a NUL byte or a lone surrogate (JSON escape) in the path
                yield Skip(row.key, "missing_file", f"{_shown(row.path)}: {e}")
                continue
            yield Sample(row.key, data, ext, captions, {"path": row.path}, cut, caption_issue=why)


def _undecodable(text: str) -> bool:
    """A string read with errors='surrogateescape' that held bytes that are not UTF-8 (or a
    JSON "\\udcXX" escape): lone surrogates, which no UTF-8 encoder accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _shown(text: str) -> str:
    """Printable: undecodable bytes as \\xNN, as the file holds them."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape, not from a byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _table_rows(path: Path, opts: SourceOptions, needs: Needs = BOTH) -> list[_Row]:
    # Read as UTF-8 (a BOM dropped) with errors='surrogateescape': a row whose caption holds bytes
    # that are not UTF-8 is skipped later (undecodable_caption), not fatal; image paths keep their
    # bytes (the OS opens them as written); a header that is not UTF-8 text is a user error.
    base = path.parent
    rows: list[_Row] = []
    text = dict(encoding="utf-8-sig", errors="surrogateescape")
    if path.suffix.lower() == ".jsonl":
        with open(path, **text) as f:
            records = []
            for ln, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    what = "UTF-8 text" if _undecodable(line) or "\x00" in line else f"JSON ({e.msg})"
                    raise UserError(f"line {ln} is not {what}", str(path)) from None
    else:
        delim = "\t" if path.suffix.lower() == ".tsv" else ","
        with open(path, newline="", **text) as f:
            try:
                records = list(csv.DictReader(f, delimiter=delim))
            except csv.Error as e:
                raise UserError(f"is not a readable {path.suffix.lstrip('.').upper()} file ({e})", str(path)) from None
        header = [str(c) for c in records[0]] if records else []
        if any(_undecodable(c) or "\x00" in c for c in header):
            raise UserError(f"is not UTF-8 text (header: {_shown(delim.join(header))[:120]!r})", str(path))
    if not records:
        raise UserError("has no rows", str(path))
    for flag, col, needed in (("--image-col", opts.image_col, needs.image),
                              ("--caption-col", opts.caption_col, needs.caption)):
        if not isinstance(records[0], dict) or (needed and col not in records[0]):
            cols = ", ".join(map(str, records[0])) if isinstance(records[0], dict) else "none: not a JSON object"
            raise UserError(f"column {col!r} not found in {path} (columns: {_shown(cols)})", flag)
    width = len(str(len(records)))
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise UserError(f"row {i + 1} is not a JSON object", str(path))
        p = str(r.get(opts.image_col) or "")
        caption = r.get(opts.caption_col) if opts.caption_col in r else NO_CAPTION
        rows.append(_Row(str(i).zfill(max(9, width)), str(base / p) if p else "", caption))
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


def open_source(spec: str, opts: SourceOptions | None = None, where: str = "SOURCE", needs: Needs = BOTH):
    """Resolve a source spec to a TarSource or RowSource. Errors name `where`; `needs` says what
    a sample must carry (an image and a caption unless told otherwise)."""
    opts = opts or SourceOptions()
    p = Path(spec)
    if url_scheme(spec) is not None:  # pipe:CMD, file:PATH, http(s)://, s3://, ...: WebDataset shards
        urls = _expand(spec, where)
        for u in urls:
            if url_scheme(u) != "pipe" and Path(u.split("?", 1)[0]).suffix.lower() in (".csv", ".tsv", ".jsonl", ".json"):
                raise UserError(f"URLs name WebDataset shards; a table or Karpathy JSON must be a local file ({u})",
                                where)
        _check_urls(spec, urls, where)
        return TarSource(spec, urls, needs)
    if "{" in spec and "}" in spec:
        paths = _expand(spec, where)
        missing = [q for q in paths if not Path(q).is_file()]
        if len(missing) == len(paths):
            raise UserError(f"no file of {spec} exists", where)
        if missing:
            raise UserError(f"{len(missing)} of {len(paths)} shards do not exist (first: {missing[0]})", where)
        return TarSource(spec, paths, needs)
    if p.is_dir():
        paths = sorted(glob.glob(str(p / "*.tar")))
        if not paths:
            raise UserError(f"directory {spec} holds no .tar shards", where)
        return TarSource(spec, paths, needs)
    if not p.exists():
        raise UserError(f"{spec} does not exist", where)
    suffix = p.suffix.lower()
    if suffix == ".tar":
        return TarSource(spec, [str(p)], needs)
    if suffix in (".csv", ".tsv", ".jsonl"):
        return RowSource("table", spec, _table_rows(p, opts, needs), opts.rows_per_shard, needs)
    if suffix == ".json":
        return RowSource("karpathy", spec, _karpathy_rows(p, opts), opts.rows_per_shard, needs)
    raise UserError(f"cannot read {spec}: expected .tar shards, a directory, .csv/.tsv/.jsonl or a Karpathy .json", where)


def _expand(spec: str, where: str) -> list[str]:
    """Brace expansion, webdataset's way: data/{00000..00099}.tar, https://host/{a,b}.tar."""
    import braceexpand

    if not ("{" in spec and "}" in spec):
        return [spec]
    try:
        return list(braceexpand.braceexpand(spec))
    except braceexpand.UnbalancedBracesError:
        raise UserError(f"unbalanced braces in {spec}", where) from None


# ----------------------------------------------------------------------------------
# Labelled sources (eval-zeroshot): shards with a class field, class-per-folder trees
# ----------------------------------------------------------------------------------


def _parse_label(raw, by_name: dict[str, int]) -> int | None:
    """A class index from a JSON int or a decimal string ("3", "-1"), or a class name; None if
    it is neither. JSON true/false are not labels (bool is an int in Python), nor are strings
    str.isdigit accepts but int() does not ("²")."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    if not isinstance(raw, str):
        return None
    digits = raw.strip()
    if digits.removeprefix("-").isdecimal():  # isdecimal: what int() reads, unlike isdigit ("²")
        return int(digits)
    return by_name.get(raw)


class LabelledShards(TarSource):
    """WebDataset shards whose samples carry a class (no caption needed)."""

    def __init__(self, spec: str, paths: list[str], class_field: str, names: list[str]):
        super().__init__(spec, paths)
        self.class_field, self.names = class_field, names
        self.by_name = {n: i for i, n in enumerate(names)}

    def _make(self, key: str, members: dict):
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            return Skip(key, "missing_image")
        raw = members.get(self.class_field.lower())
        if raw is None and "json" in members:
            try:
                meta = json.loads(members["json"])
                raw = meta.get(self.class_field) if isinstance(meta, dict) else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                raw = None
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "replace").strip()
        if raw is None or raw == "":
            return Skip(key, "missing_label")
        label = _parse_label(raw, self.by_name)
        if label is None:
            return Skip(key, "bad_label", repr(raw)[:80])
        if not 0 <= label < len(self.names):
            return Skip(key, "label_out_of_range", f"{label} not in 0..{len(self.names) - 1}")
        return Sample(key, members[ext], ext, [], {"label": label})


class FolderTree:
    """ROOT/<class>/<image>: classes numbered in sorted folder order."""

    kind = "folders"

    def __init__(self, root: Path):
        self.root = root
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        self.files = []
        for i, c in enumerate(self.classes):
            for dirpath, _, names in sorted(os.walk(root / c)):
                for n in sorted(names):
                    if n.rsplit(".", 1)[-1].lower() in FOLDER_IMAGE_EXTS:
                        self.files.append((os.path.join(dirpath, n), i))
        self.units = [0]

    def describe(self) -> dict:
        return {"kind": self.kind, "spec": str(self.root), "classes": len(self.classes), "files": len(self.files)}

    def iter_unit(self, unit, exclude=frozenset()):
        """Keys are paths under the root: never twice."""
        for path, label in self.files:
            key = os.path.relpath(path, self.root)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                yield Skip(key, "missing_file", f"{path}: {e.strerror}")
                continue
            yield Sample(key, data, path.rsplit(".", 1)[-1].lower(), [], {"label": label})
