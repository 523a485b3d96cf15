"""The run directory of `hierdctl distill`: its layout, its checkpoints and its metrics.

This module is the contract between `distill` (which writes a run) and `export` (which
reads it); nothing else knows the file names.

    RUN_DIR/config.resolved.yaml                   the resolved settings; `format: hierdctl.distill-run/1`
                                                   marks the folder as a hierdctl run
    RUN_DIR/metrics.jsonl                          one JSON object per logged step
    RUN_DIR/loss_curves.png                        the terms and the weighted loss per step
    RUN_DIR/tensorboard/                           with --report-to tensorboard
    RUN_DIR/checkpoints/step-NNNNNNN.safetensors   wrapper state: student.* + projectors/κ/fusion
    RUN_DIR/checkpoints/step-NNNNNNN.state.pt      optimizer, scaler, RNG, step (plain tensors and
                                                   containers: read with torch.load(weights_only=True))
    RUN_DIR/checkpoints/step-NNNNNNN.json          model_cfg, preprocess_cfg, teacher, recipe, step
    RUN_DIR/checkpoints/latest.json                names the newest complete step; written last
    RUN_DIR/.hierdctl.lock                         held by the one process writing the run

Every file is written atomically (hierdctl/atomic.py); a checkpoint is complete once
latest.json names it, so a kill at any moment leaves the previous checkpoint usable.
Only the files above are ever removed (`clear`), and only from a folder whose
config.resolved.yaml carries the format marker: a user's own files are never touched.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

from hierdctl import atomic
from hierdctl.errors import UserError, require

RUN_FORMAT = "hierdctl.distill-run/1"
CONFIG = "config.resolved.yaml"
METRICS = "metrics.jsonl"
CURVES = "loss_curves.png"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
STUDENT_PREFIX = "student."  # the student's own keys in the wrapper state; export keeps these only
_STEP_FILE = re.compile(r"^step-\d{7,}\.(safetensors|state\.pt|json)$")  # the names of a checkpoint's files
STEP_SUFFIXES = (".safetensors", ".state.pt", ".json")


def checkpoint_dir(run: Path) -> Path:
    return Path(run) / CHECKPOINTS


def stem(step: int) -> str:
    return f"step-{step:07d}"


# ----------------------------------------------------------------------------------
# Which folders are runs, and clearing one
# ----------------------------------------------------------------------------------


def read_config(run: Path) -> dict | None:
    """The run's resolved config, or None when the folder holds none hierdctl wrote."""
    import yaml

    p = Path(run) / CONFIG
    try:
        obj = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(obj, dict):
        return None
    # Runs written before the format marker carry hierdctl's version and the recipe's terms.
    legacy = "format" not in obj and isinstance(obj.get("hierdctl"), str) and isinstance(obj.get("recipe_terms"), list)
    return obj if obj.get("format") == RUN_FORMAT or legacy else None


def write_config(run: Path, config: dict) -> None:
    import yaml

    atomic.write_text_atomic(Path(run) / CONFIG, yaml.safe_dump({"format": RUN_FORMAT} | config, sort_keys=False))


def check_run_target(run: Path, resume: bool, overwrite: bool, where: str = "--out") -> bool:
    """Refuse an output folder distill must not write into. Returns True if it holds a run.

    A missing or empty folder is fine. A non-empty folder must be a hierdctl run
    (config.resolved.yaml with the format marker): files of anything else are never
    written over or deleted. An existing run needs --resume or --overwrite."""
    run = Path(run)
    if not run.exists():
        return False
    require(run.is_dir(), f"{run} exists and is not a directory", where)
    entries = [p for p in run.iterdir() if p.name != atomic.LOCK_NAME  # nor a killed first config write:
               and atomic.leftover_base(p.name) != CONFIG]
    if not entries:
        return False
    if read_config(run) is None:
        raise UserError(f"{run} is not empty and is not a hierdctl distill run (no {CONFIG} with format "
                        f"{RUN_FORMAT!r}); pick a new or empty folder", where)
    has_ckpt = (checkpoint_dir(run) / LATEST).is_file()
    if has_ckpt and not (resume or overwrite):
        raise UserError(f"{run} already holds a run: add --resume to continue it or --overwrite to restart", where)
    if resume and has_ckpt:  # a resume writes into these: never through a link out of the run folder
        for sub in (CHECKPOINTS, TENSORBOARD):
            if (run / sub).is_symlink():
                raise UserError(f"{run / sub} is a symbolic link (to {os.readlink(run / sub)}): hierdctl writes only "
                                "inside its output folder; move what it points to into the run folder, then resume",
                                "--resume")
    return has_ckpt


def clear(run: Path) -> list[str]:
    """Remove what distill wrote into `run` (checkpoints, metrics, curves, config,
    tensorboard events), nothing else. Returns the names removed. Call check_run_target first."""
    import shutil

    run = Path(run)
    removed = []
    removed += remove_leftovers(run)  # NAME.tmpPID of distill's own files only
    d = checkpoint_dir(run)
    for sub in (d, run / TENSORBOARD):  # a link is removed as a link: what it points to is never touched
        if sub.is_symlink():
            sub.unlink()
            removed.append(f"{sub.name} (a link)")
    if d.is_dir():  # only the checkpoints latest.json records, never a file that merely has their names
        for s in recorded(d):
            for p in (d / f"{s}{ext}" for ext in STEP_SUFFIXES):
                if p.is_file():
                    p.unlink()
                    removed.append(f"{CHECKPOINTS}/{p.name}")
        if (d / LATEST).is_file():
            (d / LATEST).unlink()
            removed.append(f"{CHECKPOINTS}/{LATEST}")
        if not any(d.iterdir()):
            d.rmdir()
    tb = run / TENSORBOARD
    if tb.is_dir() and all(p.name.startswith("events.out.tfevents.") and not p.is_dir() for p in tb.iterdir()):
        shutil.rmtree(tb)
        removed.append(TENSORBOARD)
    for name in (METRICS, CURVES, CONFIG):
        if (run / name).is_file():
            (run / name).unlink()
            removed.append(name)
    return removed


def remove_leftovers(run: Path) -> list[str]:
    """Remove the NAME.tmpPID files a killed atomic write of distill's left in `run` and its
    checkpoints/ (only of names distill writes: a user's files are never touched)."""
    run, removed = Path(run), []
    for d, ours in ((run, lambda b: b in (METRICS, CURVES, CONFIG)),
                    (checkpoint_dir(run), lambda b: bool(_STEP_FILE.match(b)) or b == LATEST)):
        if d.is_dir():
            for p in d.iterdir():
                base = atomic.leftover_base(p.name)
                if base is not None and ours(base) and p.is_file():
                    p.unlink()
                    removed.append(str(p.relative_to(run)))
    return removed


# ----------------------------------------------------------------------------------
# Writing and resuming
# ----------------------------------------------------------------------------------


def save(run: Path, step: int, wrapper, optimizer, scaler, meta: dict, keep: int) -> Path:
    """Write checkpoint `step` (weights, training state, meta), then latest.json; prune to `keep`."""
    import torch
    from safetensors.torch import save as safetensors_bytes

    d = checkpoint_dir(run)
    with atomic.write_guard(d, str(d)):
        d.mkdir(parents=True, exist_ok=True)
    name = stem(step)
    weights = {k: v.detach().contiguous().cpu() for k, v in wrapper.state_dict().items()}
    atomic.write_bytes_atomic(d / f"{name}.safetensors", safetensors_bytes(weights))
    state = {
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "step": step,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic.write_bytes_atomic(d / f"{name}.state.pt", buf.getvalue())
    atomic.write_json_atomic(d / f"{name}.json", meta | {"step": step})
    # The done-marker: the newest step, and every checkpoint of this run that may still be on disk
    # (a kill right after it leaves the older ones unpruned: the next save prunes them). Pruning and
    # --overwrite remove only what this list names, never a file that merely has such a name.
    mine = sorted({s for s in recorded(d) if any((d / f"{s}{e}").exists() for e in STEP_SUFFIXES)} | {name},
                  key=_step_of)
    atomic.write_json_atomic(d / LATEST, {"step": step, "name": name, "checkpoints": mine})
    prune(d, mine, keep)
    del weights, state, buf
    release_freed_memory()
    return d / f"{name}.safetensors"


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc's malloc_trim; elsewhere nothing).

    glibc keeps what a process frees for its next allocations, and the training step's and the
    checkpoint's large temporary buffers leave the heap fragmented: in a 20-epoch soak
    (bench/soak_distill.py, docs/reliability.md) the resident memory grew 8.4 % from epoch 2 to the
    end while the memory in use (measured after a trim) grew under 1 %. Called after every
    checkpoint, so a week-long run's resident memory stays where its first epochs put it."""
    import ctypes

    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC(0)


_LIBC = None  # glibc's malloc_trim, False where there is none


def _step_of(name: str) -> int:
    return int(name.split("-", 1)[1])


def recorded(d: Path) -> list[str]:
    """The stems of the checkpoints this run wrote, as its latest.json records them. A latest.json
    of an older hierdctl (no list): the one it names, and the step files whose .json is a checkpoint
    meta of that very step (its model_cfg and the hierdctl version that wrote it)."""
    try:
        obj = json.loads((Path(d) / LATEST).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return []
    if not isinstance(obj, dict):
        return []
    listed = obj.get("checkpoints")
    if isinstance(listed, list):
        return [s for s in listed if isinstance(s, str) and _STEP_FILE.match(f"{s}.json")]
    out = {obj["name"]} if isinstance(obj.get("name"), str) and _STEP_FILE.match(f"{obj['name']}.json") else set()
    for p in Path(d).glob("step-*.json"):
        if _STEP_FILE.match(p.name):
            try:
                meta = json.loads(p.read_text())
            except (OSError, ValueError, UnicodeDecodeError):
                continue
            if isinstance(meta, dict) and "model_cfg" in meta and "hierdctl" in meta and \
                    meta.get("step") == _step_of(p.name[: -len(".json")]):
                out.add(p.name[: -len(".json")])
    return sorted(out, key=_step_of)


def prune(d: Path, mine: list[str], keep: int) -> None:
    """Remove the files of all but the newest `keep` of this run's checkpoints `mine` (oldest
    first; the newest is the one latest.json names)."""
    for old in mine[:-keep]:
        for p in (d / f"{old}{e}" for e in STEP_SUFFIXES):
            p.unlink(missing_ok=True)


def latest_meta(run: Path) -> tuple[Path, dict] | None:
    """(path, content) of the .json of the newest complete checkpoint of `run`: the settings
    that checkpoint was trained with, as it recorded them itself. None when unreadable."""
    try:
        got = latest(run)
    except UserError:
        return None
    if got is None:
        return None
    p = checkpoint_dir(run) / f"{got[1]}.json"
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return (p, meta) if isinstance(meta, dict) else None


def latest(run: Path, where: str = "--out") -> tuple[int, str] | None:
    """(step, stem) of the newest complete checkpoint of `run`, or None."""
    d = checkpoint_dir(run)
    return _read_latest(d, where) if (d / LATEST).is_file() else None


def _read_latest(d: Path, where: str) -> tuple[int, str]:
    try:
        obj = json.loads((d / LATEST).read_text())
        return int(obj["step"]), str(obj["name"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError):
        raise UserError(f"{d / LATEST} is not a valid {LATEST}", where) from None


def load_training_state(run: Path, wrapper, optimizer, scaler, device: str) -> int:
    """Restore weights, optimizer, scaler and RNG from the newest checkpoint; return its step."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    step, name = latest(run)
    d = checkpoint_dir(run)
    weights_path, state_path = d / f"{name}.safetensors", d / f"{name}.state.pt"
    try:
        wrapper.load_state_dict(load_file(str(weights_path), device=device))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise UserError(f"cannot resume from {weights_path}: {str(e).splitlines()[0]}", "--resume") from None
    state = load_state(state_path, "--resume")
    try:
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        return int(state["step"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        what = f"no {e.args[0]!r}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise UserError(f"cannot resume from {state_path}: it is not this run's training state ({what})",
                        "--resume") from None


def load_state(path: Path, where: str) -> dict:
    """A .state.pt with torch.load(weights_only=True): pickled Python objects are refused."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        why = "it holds pickled Python objects, which hierdctl never loads" if isinstance(
            e, pickle.UnpicklingError) else str(e).splitlines()[0]
        raise UserError(f"cannot load {path}: {why}", where) from None
    except Exception as e:  # a crafted pickle raises TypeError, ValueError... inside the weights-only unpickler
        raise UserError(f"cannot load {path}: it holds pickled Python objects that torch.load(weights_only=True) "
                        f"refuses ({type(e).__name__}), which hierdctl never loads", where) from None


# ----------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------


def read_metrics(run: Path) -> tuple[list[dict], int]:
    """(rows, number of unreadable lines dropped): a line torn by a crash mid-append is
    dropped, not fatal."""
    p = Path(run) / METRICS
    if not p.is_file():
        return [], 0
    rows, bad = [], 0
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def truncate_metrics(run: Path, upto_step: int) -> tuple[int, int]:
    """Keep the rows up to `upto_step` (a resumed run rewrites what came after its checkpoint),
    atomically: a kill during the rewrite leaves the old file. Returns (rows kept, lines dropped
    as unreadable)."""
    rows, bad = read_metrics(run)
    keep = [r for r in rows if r["step"] <= upto_step]
    atomic.write_text_atomic(Path(run) / METRICS, "".join(json.dumps(r) + "\n" for r in keep))
    return len(keep), bad


# ----------------------------------------------------------------------------------
# Reading a checkpoint for export
# ----------------------------------------------------------------------------------


@dataclass
class StudentCheckpoint:
    path: Path  # the .safetensors
    meta: dict  # its sibling .json
    student: dict  # student state dict, prefix removed
    dropped: list[str]  # wrapper keys that are not the student
    run_dir: Path | None
    sha256: str = ""  # of the .safetensors bytes that were read (the file may be pruned since)


def resolve(source: Path, where: str = "RUN_DIR", must_exist: bool = True) -> tuple[Path, Path | None]:
    """(checkpoint .safetensors, run dir or None) for a run dir, a checkpoints/ dir or a file."""
    p = Path(source)
    if p.is_file():
        require(p.suffix == ".safetensors", f"{p} is not a .safetensors checkpoint", where)
        d = p.parent
        return p, (d.parent if d.name == CHECKPOINTS else None)
    if not p.is_dir():
        raise UserError(f"{p} does not exist", where)
    for d, run in ((p / CHECKPOINTS, p), (p, p.parent if p.name == CHECKPOINTS else None)):
        if (d / LATEST).is_file():
            _, name = _read_latest(d, where)
            ck = d / f"{name}.safetensors"
            require(ck.is_file() or not must_exist, f"{d / LATEST} names {ck.name}, which does not exist", where)
            return ck, run
    raise UserError(f"{p} holds no {CHECKPOINTS}/{LATEST}: not a hierdctl distill run dir", where)


READ_ATTEMPTS = 5  # a run being written: latest.json read again this often before export gives up


def load_student(source: Path, where: str = "RUN_DIR") -> StudentCheckpoint:
    """The student's weights and meta of a checkpoint (a run dir means its newest one).

    A run dir may be written while it is read (distill saves a checkpoint and prunes an old one):
    a checkpoint that latest.json named but that vanished is read again from the new latest.json,
    and every byte is read once, into memory, so what is exported is one consistent checkpoint."""
    import time

    for attempt in range(READ_ATTEMPTS):
        path, run_dir = resolve(source, where, must_exist=False)
        try:
            return _read_student(path, run_dir, where)
        except FileNotFoundError:
            if Path(source).is_file():  # a checkpoint file given by name: nothing to retry
                raise UserError(f"{path.name} has no sibling {path.with_suffix('.json').name} (model config); "
                                "it is not a hierdctl distill checkpoint", where) from None
            time.sleep(0.2 * attempt)  # pruned while read: latest.json names a newer one by now
    raise UserError(f"{source} is being written, or damaged: the checkpoint its latest.json names was missing "
                    f"{READ_ATTEMPTS} times in a row; export again once distill has saved its checkpoint", where)


def _read_student(path: Path, run_dir: Path | None, where: str) -> StudentCheckpoint:
    """One checkpoint, read into memory. FileNotFoundError when one of its files is gone."""
    import hashlib

    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    meta_path = path.with_suffix(".json")
    raw_meta, data = meta_path.read_bytes(), path.read_bytes()
    try:
        meta = json.loads(raw_meta)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_path} is not valid JSON ({e})", where) from None
    require(isinstance(meta, dict) and isinstance(meta.get("model_cfg"), dict), f"{meta_path} carries no model_cfg",
            where)
    try:
        state = load_bytes(data)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e} (a hierdctl checkpoint is a safetensors file; pickled "
                        "checkpoints are never loaded)", where) from None
    student = {k[len(STUDENT_PREFIX):]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}
    require(bool(student), f"{path} holds no '{STUDENT_PREFIX}*' tensors: not a StudentWrapper checkpoint", where)
    dropped = sorted(k for k in state if not k.startswith(STUDENT_PREFIX))
    return StudentCheckpoint(path, meta, student, dropped, run_dir, hashlib.sha256(data).hexdigest())
