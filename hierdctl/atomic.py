"""Atomic files and folders: what every stage writes goes through here.

A file is written under a temporary name in its own folder, flushed, fsync'd and renamed
into place, so a reader (or a resumed run) sees either the previous file or the complete
new one, never a torn one; a kill at any moment leaves at most a `*.tmpPID` leftover that
the next run may delete (`is_leftover`). A full disk is one clear message (`DiskFull`)
and the partial file is removed. A folder (export DIR, eval-retrieval --save-index DIR)
is filled under a temporary sibling name and renamed into place the same way
(`publish_dir`); folders are only ever replaced when hierdctl wrote them
(`check_dir_target`). An output folder has one writer at a time (`FolderLock`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import socket
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import faults
from .errors import UserError


def _tmp_name(path: Path) -> Path:
    return path.with_name(path.name + f".tmp{os.getpid()}")


_LEFTOVER = re.compile(r"\.tmp\d+$")


def is_leftover(name: str) -> bool:
    """A temporary file of an atomic write that a killed process left behind."""
    return bool(_LEFTOVER.search(name))


def leftover_base(name: str) -> str | None:
    """The name of the file whose atomic write left `name` (NAME.tmpPID -> NAME); None for
    anything else. The one parser of the temporary names `_tmp_name` makes."""
    m = _LEFTOVER.search(name)
    return name[: m.start()] if m else None


def leftovers(folder: Path, name: str) -> list[Path]:
    """The leftovers of atomic writes of `folder/name` (files, and links: removed as links)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if leftover_base(p.name) == name and (p.is_file() or p.is_symlink())]


def _alive(pid: int) -> bool:
    """True if a process `pid` exists on this host (it may be another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


def remove_dead_leftovers(path: Path) -> list[str]:
    """Remove the NAME.tmpPID files that killed atomic writes of `path` left, when no process PID
    is alive any more (a live one may be writing it right now: an output without a folder lock,
    such as an evaluation report). Returns the names removed."""
    path, removed = Path(path), []
    for p in leftovers(path.parent, path.name):
        pid = int(p.name[len(path.name) + len(".tmp"):])
        if pid != os.getpid() and not _alive(pid):
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


class NotWritable(UserError):
    """An output cannot be written: a read-only file system, a folder this user may not write
    in, a full device. One line naming the folder and the reason; nothing was replaced."""


class DiskFull(NotWritable):
    """The device ran out of space (or quota) during an atomic write; nothing was replaced."""


# The errors of writing that the user's environment causes, and what each means.
WRITE_ERRNOS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
                errno.EFBIG: "File too large", errno.EROFS: "Read-only file system",
                errno.EACCES: "Permission denied", errno.EPERM: "Operation not permitted"}


def write_errno(e: BaseException) -> int | None:
    """The WRITE_ERRNOS code behind a failed write: an OSError's own, or one a library wrapped in
    its own exception (safetensors' `IoError(Os { code: 28, ... })`, faiss's and onnx's messages),
    found in the exception's chain and text. None for anything else."""
    import re

    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            return e.errno
        text = str(e)
        for code, words in WRITE_ERRNOS.items():
            if words in text or re.search(rf"(?:code: |os error |Errno |errno=?){code}\b", text):
                return code
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def write_error(e: BaseException, folder: Path | None, where: str | None = None, name: str | None = None,
                needed: int | None = None) -> "NotWritable | None":
    """The one-line error for a write in `folder` (of file `name`) that failed with `e`; None
    when `e` is not about writing (the caller re-raises it)."""
    code = write_errno(e)
    if code is None:
        return None
    folder = Path(folder) if folder is not None else Path(getattr(e, "filename", None) or ".")
    where = where or str(folder)
    what = f" while writing {name}" if name else ""
    if code in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(_existing(folder)).free
        except OSError:
            free = -1
        need = f"{_size(needed)} for this file, " if needed else ""
        quota = " (the disk quota is used up)" if code == errno.EDQUOT else ""
        return DiskFull(f"no space left on the device of {folder}{quota}{what} ({need}{_size(free)} free); free "
                        "some space and rerun: finished work is kept (distill: add --resume)", where)
    if code == errno.EFBIG:
        return DiskFull(f"{name or 'a file'} is larger than a file in {folder} may be (EFBIG: a file-size limit, "
                        "ulimit -f, or a FAT/exFAT volume's 4 GiB); raise the limit or use another file system, "
                        "and rerun the same command: finished work is kept", where)
    why = {errno.EROFS: "it is on a read-only file system (EROFS)",
           errno.EACCES: "permission denied (EACCES): this user may not create files there",
           errno.EPERM: "operation not permitted (EPERM: an immutable folder, or a file system that forbids it)"}[code]
    return NotWritable(f"cannot write in {folder}{what}: {why}; pick a writable folder (or make this one "
                       "writable) and rerun: finished work is kept", where)


def _existing(p: Path) -> Path:
    """`p`, or its nearest ancestor that exists."""
    p = Path(p).absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


def check_writable(path: Path, where: str) -> None:
    """Refuse, before any work, an output `path` (a file or folder, made or still to be made)
    whose folder cannot be written: the folder that holds it, or the nearest ancestor that
    exists, is on a read-only file system or not writable by this user. The line names `path`."""
    path = Path(path)
    anchor = path if path.is_dir() else _existing(path.parent)
    if os.access(anchor, os.W_OK | os.X_OK):
        return
    try:
        read_only = bool(os.statvfs(anchor).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    code = errno.EROFS if read_only else (errno.EPERM if os.geteuid() == 0 else errno.EACCES)
    raise write_error(OSError(code, WRITE_ERRNOS[code]), path, where)


@contextlib.contextmanager
def write_guard(folder: Path, where: str | None = None, name: str | None = None, needed: int | None = None,
                cleanup: Callable[[], None] | None = None):
    """Turn a failed write in `folder` (full, read-only, unwritable; also from inside a library)
    into one NotWritable line; `cleanup` first removes what the write left."""
    try:
        yield
    except Exception as e:
        err = write_error(e, folder, where, name, needed)
        if err is None:
            raise
        if cleanup is not None:
            with contextlib.suppress(OSError):
                cleanup()
        raise err from None


@contextlib.contextmanager
def _no_space_guard(path: Path, tmp: Path, needed: int | None):
    """An atomic write: a failed write is one clear message; the partial file is removed."""
    with write_guard(path.parent, str(path.parent), path.name, needed, lambda: tmp.unlink(missing_ok=True)):
        yield


def _size(n: int | None) -> str:
    if n is None or n < 0:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _open_tmp(tmp: Path):
    """The temporary file of an atomic write, opened without following a link: a link at its
    name (never one of ours) is removed as a link and a fresh file made."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    return os.fdopen(fd, "wb")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    with _no_space_guard(path, tmp, len(data)):
        with _open_tmp(tmp) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        faults.point(f"write:{path.name}:before-rename")
        os.replace(tmp, path)
    faults.point(f"write:{path.name}:after-rename")


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


class _HashingWriter(io.RawIOBase):
    """A write-only file that feeds every byte to sha256 on its way to `f`."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.n += len(b)
        return self.f.write(b)

    def tell(self) -> int:  # tarfile asks where it is; a fresh file holds what was written
        return self.n


@dataclass(frozen=True)
class Written:
    bytes: int
    sha256: str


def write_tar_atomic(path: Path, members: list[tuple[str, bytes]]) -> Written:
    """Write a tar under a temporary name, fsync, rename. Deterministic headers (USTAR, mtime 0,
    owner 'hierdctl'). Returns its size and the sha256 of its bytes, computed while writing."""
    path = Path(path)
    tmp = _tmp_name(path)
    with _no_space_guard(path, tmp, sum(512 + len(d) for _, d in members)):
        with _open_tmp(tmp) as f:
            w = _HashingWriter(f)
            with tarfile.open(fileobj=w, mode="w", format=tarfile.USTAR_FORMAT) as tf:
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    info.uname = info.gname = "hierdctl"
                    tf.addfile(info, io.BytesIO(data))
            f.flush()
            os.fsync(f.fileno())
        faults.point(f"write:{path.name}:before-rename")
        os.replace(tmp, path)
    faults.point(f"write:{path.name}:after-rename")
    assert w.n == path.stat().st_size, (w.n, path)
    return Written(w.n, w.sha.hexdigest())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------
# One writer per output folder
# ----------------------------------------------------------------------------------

LOCK_NAME = ".hierdctl.lock"


class FolderLock:
    """An exclusive lock on an output folder: a second writer exits 2 naming the first.

    `fcntl.flock` on FOLDER/.hierdctl.lock, which holds the owner's pid, host and start
    time. The kernel releases the lock when its process dies, so a lock left by a killed
    run is taken over (with a message saying so); a clean exit removes the file. Job-array ranks writing disjoint parts of
    one folder (`part="rank-3-of-16"`) share the folder lock and hold their own part lock
    exclusively, so a plain run and an array, or two runs of one rank, still exclude each
    other. flock is per host on some network file systems: the owner's host is recorded."""

    def __init__(self, folder: Path, where: str, part: str | None = None, name: str = LOCK_NAME,
                 subject: Path | None = None):
        """name: the lock file's name in `folder` (publish_dir locks `.DIR.hierdctl.lock` beside DIR);
        subject: what the messages say is being written (default: the folder)."""
        self.folder, self.where, self.part, self.name = Path(folder), where, part, name
        self.subject = Path(subject) if subject is not None else self.folder
        self._fds: list[int] = []
        self.took_over: list[str] = []  # descriptions of dead owners whose locks were taken over
        self._made: list[Path] = []  # folders this lock created (removed again if left empty)

    def __enter__(self) -> "FolderLock":
        try:
            self._made = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
            self.folder.mkdir(parents=True, exist_ok=True)
            self._take(self.folder / self.name, exclusive=self.part is None)
            if self.part is not None:
                self._take(self.folder / f".hierdctl.{self.part}.lock", exclusive=True)
        except BaseException as e:
            self.release()
            err = write_error(e, self.folder, self.where) if isinstance(e, OSError) else None
            if err is not None:
                raise err from None
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _take(self, path: Path, exclusive: bool) -> None:
        while True:
            try:  # never through a link: a link at the lock's name is not ours, and is removed as a link
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as e:
                if e.errno != errno.ELOOP or not path.is_symlink():
                    raise
                path.unlink()
                continue
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _describe_owner(os.pread(fd, 4096, 0))
                os.close(fd)
                raise UserError(f"{self.subject} is being written by another hierdctl process ({owner}); wait for "
                                "it to finish, or use another folder", self.where) from None
            try:  # the owner before us may have removed the file between our open and our flock
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fds.append((fd, path, exclusive))
        _HELD.add(fd)
        if exclusive:
            previous = os.pread(fd, 4096, 0)
            if previous.strip():  # a clean exit removes the file: an owner recorded here died
                self.took_over.append(_describe_owner(previous))
            me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, me, 0)

    def release(self) -> None:
        for fd, path, exclusive in reversed(self._fds):
            if exclusive:  # removed while still locked: the next writer finds no stale owner
                with contextlib.suppress(OSError):
                    os.unlink(path)
            _HELD.discard(fd)
            os.close(fd)  # closing releases the flock
        self._fds = []
        for p in self._made:  # a run that failed before writing anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                p.rmdir()
        self._made = []


# The descriptors of the folder locks this process holds. A forked child (a DataLoader worker)
# shares the lock with its parent as long as it keeps a copy of the descriptor: a worker orphaned
# by a killed run would hold the folder for seconds (until torch's watchdog notices) and a rerun
# would be refused. So every forked child closes its copies (closing, unlike LOCK_UN, leaves the
# parent's lock alone), and asks to be killed when its parent dies (Linux: PR_SET_PDEATHSIG).
_HELD: set[int] = set()


def _after_fork_in_child() -> None:
    if not _HELD:
        return
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the descriptors are closed, which is what matters for the lock


os.register_at_fork(after_in_child=_after_fork_in_child)


def _describe_owner(raw: bytes) -> str:
    try:
        o = json.loads(raw.decode("utf-8"))
        return f"pid {o['pid']} on host {o['host']}, since {o['started']}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "owner unknown"


def _carries_schema(marker: Path, schema: str) -> bool:
    """True if `marker` is a JSON object whose "schema" is `schema`: hierdctl wrote the folder."""
    try:
        obj = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(obj, dict) and obj.get("schema") == schema


def check_dir_target(final: Path, marker: str, schema: str, where: str, overwrite: bool, what: str) -> None:
    """Refuse an output folder that must not be replaced; a missing or empty folder is fine.

    A non-empty `final` may be replaced only if its `marker` file is JSON carrying `schema`
    (hierdctl wrote it: a same-named file of another tool does not count) and `overwrite`
    is set. Stages call this before any work, and publish_dir again just before renaming."""
    final = Path(final)
    if not final.exists():
        return
    if not final.is_dir():
        raise UserError(f"{final} exists and is not a directory", where)
    if not any(final.iterdir()):
        return
    if not _carries_schema(final / marker, schema):
        raise UserError(f"{final} is not empty and was not written by hierdctl (no {marker} with schema "
                        f"{schema!r}); pick a new or empty folder", where)
    if not overwrite:
        raise UserError(f"{final} already holds {what}: add --overwrite to replace it", where)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE, kernel 3.15+: ext4,
    xfs, btrfs, tmpfs...). False where the system or the file system cannot."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove(p: Path) -> None:
    """Remove a path as what it is: a link as a link (never what it points to), a folder with its contents."""
    if p.is_symlink() or not p.is_dir():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def publish_leftovers(final: Path) -> list[Path]:
    """The hidden folders a killed publish_dir of `final` left beside it: `.NAME.tmp-XXXXXXXX`
    (a new folder not yet in place, or the previous one after the exchange) and `.NAME.old-XXXXXXXX`
    (the previous folder, moved aside where RENAME_EXCHANGE is not available). tempfile.mkdtemp's
    names: 8 characters of [a-z0-9_]. Nothing else matches."""
    final = Path(final)
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(tmp|old)-[a-z0-9_]{{8}}$")
    if not final.parent.is_dir():
        return []
    return [p for p in final.parent.iterdir() if pattern.match(p.name)]


def publish_dir(final: Path, write: Callable[[Path], None], *, marker: str, schema: str, where: str,
                overwrite: bool = False, what: str = "hierdctl output") -> None:
    """Fill a fresh temporary sibling of `final` with write(tmp), then swap it into place, so
    `final` is always either the previous folder or the complete new one, even when the
    process is killed at any moment.

    `write` must write `marker` (a JSON object with "schema": `schema`) last. One publisher
    per `final` (a lock file `.NAME.hierdctl.lock` beside it, removed at the end): under it,
    what killed publishers left (`publish_leftovers`) is removed first. The temporary folder
    comes from tempfile.mkdtemp beside `final`. The swap is one RENAME_EXCHANGE where the file
    system has it (a kill leaves the old folder or the new one in place, and the other one
    hidden beside it for the next run to remove); elsewhere the old folder is moved aside
    first, and a kill between the two renames leaves no `final` until the next run puts the
    old one back (`.NAME.old-*`). On a failure the temporary folder is removed and an old
    `final` moved aside is put back."""
    final = Path(final)
    check_dir_target(final, marker, schema, where, overwrite, what)
    with write_guard(final.parent, where):
        final.parent.mkdir(parents=True, exist_ok=True)
    with FolderLock(final.parent, where, name=f".{final.name}.hierdctl.lock", subject=final):
        for p in publish_leftovers(final):
            if p.name.startswith(f".{final.name}.old-") and not (final.exists() or final.is_symlink()) \
                    and (p / final.name).is_dir():
                os.replace(p / final.name, final)  # a kill between the two renames: the old folder goes back
            _remove(p)
        check_dir_target(final, marker, schema, where, overwrite, what)
        with write_guard(final.parent, where):
            tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
        trash: Path | None = None  # holds the previous `final` while the new one moves in (no RENAME_EXCHANGE)
        try:
            with write_guard(final.parent, where, f"{final.name}/"):  # also a library's own error (safetensors, onnx)
                write(tmp)
            # mkdtemp makes the folder private (0700) and safetensors writes 0600 files; an
            # output folder gets the permissions of anything else the user creates.
            mask = os.umask(0)
            os.umask(mask)
            for p in (tmp, *tmp.rglob("*")):
                os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
            faults.point(f"publish:{final.name}:before-exchange")
            if final.exists() or final.is_symlink():
                if exchange(tmp, final):  # tmp now holds the previous folder
                    faults.point(f"publish:{final.name}:after-exchange")
                    return
                trash = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
                os.replace(final, trash / final.name)
            try:
                os.replace(tmp, final)
            except BaseException:
                if trash is not None and not final.exists():
                    os.replace(trash / final.name, final)  # put the previous folder back
                raise
            faults.point(f"publish:{final.name}:after-exchange")
        finally:
            _remove(tmp)  # gone already after a rename; the previous folder after an exchange
            if trash is not None:
                _remove(trash)
