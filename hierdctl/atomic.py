"""Atomic files and folders: what every stage writes goes through here.

A file is written under a temporary name in its own folder, flushed, fsync'd and renamed
into place, so a reader (or a resumed run) sees either the previous file or the complete
new one, never a torn one; a kill at any moment leaves at most a `*.tmp*` leftover that
the next run may delete. A folder (export DIR, eval-retrieval --save-index DIR) is filled
under a temporary sibling name and renamed into place the same way (`publish_dir`).
Folders are only ever replaced when hierdctl wrote them (`check_dir_target`).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Callable

from .errors import UserError


def _tmp_name(path: Path) -> Path:
    return path.with_name(path.name + f".tmp{os.getpid()}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))



def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def write_tar_atomic(path: Path, members: list[tuple[str, bytes]]) -> int:
    """Write a tar under a temporary name, fsync, rename. Deterministic headers. Returns bytes."""
    path = Path(path)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uname = info.gname = "hierdctl"
                tf.addfile(info, io.BytesIO(data))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


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


def publish_dir(final: Path, write: Callable[[Path], None], *, marker: str, schema: str, where: str,
                overwrite: bool = False, what: str = "hierdctl output") -> None:
    """Fill a fresh temporary sibling of `final` with write(tmp), then rename it into place,
    so `final` is always either the previous folder or the complete new one.

    `write` must write `marker` (a JSON object with "schema": `schema`) last. The temporary
    folder and the one the old `final` is moved into come from tempfile.mkdtemp beside
    `final` (unique names: no collision with leftovers of a crashed run); on any failure
    both are removed and an old `final` already moved aside is put back."""
    final = Path(final)
    check_dir_target(final, marker, schema, where, overwrite, what)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    trash: Path | None = None  # holds the previous `final` while the new one moves in
    try:
        write(tmp)
        # mkdtemp makes the folder private (0700) and safetensors writes 0600 files; an
        # output folder gets the permissions of anything else the user creates.
        mask = os.umask(0)
        os.umask(mask)
        for p in (tmp, *tmp.rglob("*")):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
        if final.exists():
            trash = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
            os.replace(final, trash / final.name)
        try:
            os.replace(tmp, final)
        except BaseException:
            if trash is not None and not final.exists():
                os.replace(trash / final.name, final)  # put the previous folder back
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
