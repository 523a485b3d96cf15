"""The fault suite: what a week-long run can meet, and what it must do about it.

* kill -9 at named moments (hierdctl/faults.py: HIERDCTL_FAULT=PATTERN[@N]) of cache-teacher
  and distill, then a rerun / --resume: the result is byte-identical to an uninterrupted run;
* corrupted, cut and foreign cache shards (on copies of a cache): refused at start-up naming
  the shard, or skipped, counted and named sample by sample; never a traceback, never silent;
* --overwrite only ever removes what hierdctl wrote; one writer per output folder;
* a full disk is one line naming the folder, and a rerun completes;
* pickled payloads in checkpoints never run;
* uncached pretrained tags fail fast, in one line, without network;
* bad input is one line naming the flag or file, exit 2.

docs/reliability.md reports the figures of this file. Killed runs are real processes: a
"zygote" process imports torch and hierdctl once and forks one child per CLI run (a fresh
interpreter per run costs 5-9 s of imports on 2 shared cores); one test runs the real
`python -m hierdctl.cli` to show a forked child and a fresh process behave alike.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_CFG, image_bytes, make_shards, make_tiny_model, write_tar
from hierdctl import atomic, cache_format, checkpoint
from hierdctl.cli import app
from hierdctl.errors import UserError
from hierdctl.stages import cache_teacher as CT
from hierdctl.stages import distill as S

REPO = Path(__file__).resolve().parents[1]
CACHE_OPTS = ["--views", "1", "--clusters", "2", "--max-phrases", "2", "--chunker", "textblob", "--workers", "0"]
CACHE_KW = dict(views=1, clusters=2, max_phrases=2, chunker="textblob", workers=0)
DISTILL_OPTS = ["--student", "tiny-test", "--recipe", "clip-kd", "--steps", "10", "--batch-size", "4", "--lr", "1e-3",
                "--warmup", "1", "--workers", "0", "--log-every", "1", "--save-every", "2", "--seed", "1"]
DISTILL_KW = dict(student="tiny-test", recipe="clip-kd", steps=10, batch_size=4, lr=1e-3, warmup=1, workers=0,
                  log_every=1, save_every=2, seed=1, quiet=True)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread, as in the zygote's children: on 2 shared cores two threads per
    process cost 5-8x in wall time, and the in-process runs stay comparable with each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cli(*args: str, env: dict | None = None):
    """`hierdctl ARGS` in-process, its output as a terminal shows it. pytest's handlers on the
    root logger are taken off for the call: with them, a library's logging.warning() would
    reach pytest's log capture instead of the user's stderr, and a one-line check would pass
    for a run that prints two lines."""
    import logging

    root = logging.getLogger()
    handlers = root.handlers[:]
    root.handlers.clear()
    try:
        with (pytest.MonkeyPatch.context() if env else contextlib.nullcontext()) as mp:
            for k, v in (env or {}).items():
                mp.setenv(k, v)
            return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        root.handlers[:] = handlers  # also drops a handler basicConfig() may have added meanwhile


def _lines(text: str) -> list[str]:
    return [line for line in text.strip().splitlines() if line.strip()]


def _one_line_error(r, *needles: str, code: int = 2) -> str:
    """The run exited `code` with exactly one line that names every needle, and no traceback."""
    out = r.output if hasattr(r, "output") else r
    rc = r.exit_code if hasattr(r, "exit_code") else code
    assert rc == code, (rc, out[-3000:], getattr(r, "exception", None))
    assert "Traceback" not in out, out[-3000:]
    lines = _lines(out)
    assert len(lines) == 1, out[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes), hidden ones included."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / checkpoint.METRICS).read_text().splitlines()]


def _curve(rows: list[dict]) -> list[dict]:
    """The loss curve: every logged value except the wall-clock throughput."""
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _tars(cache: Path) -> dict[str, bytes]:
    """The shards and their done-markers: what a rerun must reproduce byte for byte (the
    manifest carries the last run's wall time)."""
    return {k: v for k, v in _snapshot(cache).items() if re.fullmatch(r"shard-\d{5}\.(tar|done\.json)", k)}


def _manifest(cache: Path) -> dict:
    m = json.loads((cache / cache_format.MANIFEST_NAME).read_text())
    m.pop("wall_seconds_last_run")
    return m


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if atomic.is_leftover(p.name))


# ----------------------------------------------------------------------------------
# Real processes at low cost: a zygote that forks one child per CLI run
# ----------------------------------------------------------------------------------

ZYGOTE = r"""
import json, os, resource, sys, time, traceback
import torch
torch.set_num_threads(1)
import open_clip  # noqa: F401
import hierdctl.cli, hierdctl.stages.cache_teacher, hierdctl.stages.distill  # imported once, shared by every child
print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            for k, v in req["env"].items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            if req.get("fsize"):
                resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            try:
                hierdctl.cli.app(req["args"], prog_name="hierdctl")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    deadline = time.time() + req["timeout"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            break
        if time.time() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            rc = "timeout"
            break
        time.sleep(0.02)
    print(json.dumps({"rc": rc}), flush=True)
"""

BASE_ENV = {"HF_HUB_OFFLINE": "1", "HIERDCTL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class Zygote:
    def __init__(self, logdir: Path):
        self.logdir, self.n = logdir, 0
        env = os.environ | BASE_ENV
        env.pop("HIERDCTL_FAULT", None)
        self.p = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, env=env, cwd=REPO)
        assert "ready" in self._read(300)

    def _read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.p.stdout], [], [], timeout)
        assert ready, "the zygote did not answer"
        line = self.p.stdout.readline()
        assert line, f"the zygote died (rc {self.p.poll()})"
        return json.loads(line)

    def run(self, *args, fault: str | None = None, env: dict | None = None, fsize: int | None = None,
            timeout: float = 240) -> SimpleNamespace:
        """Run `hierdctl ARGS` in a fresh child process; returncode -9 when a fault point killed it."""
        self.n += 1
        log = self.logdir / f"run-{self.n:03d}.log"
        req = {"args": [str(a) for a in args], "env": {"HIERDCTL_FAULT": fault} | (env or {}), "log": str(log),
               "fsize": fsize, "timeout": timeout}
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        rc = self._read(timeout + 30)["rc"]
        assert rc != "timeout", f"hierdctl {' '.join(req['args'])} ran past {timeout} s"
        return SimpleNamespace(returncode=rc, output=log.read_text())

    def close(self):
        with contextlib.suppress(OSError):
            self.p.stdin.close()
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote-logs"))
    yield z
    z.close()


# ----------------------------------------------------------------------------------
# Shared data: a 4-shard source, its cache (made once), a foreign cache
# ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_teacher):
    root = tmp_path_factory.mktemp("faults")
    source = make_shards(root / "data", n_shards=4, per_shard=2)  # 8 samples, 2 per shard
    CT.run(CT.CacheTeacherConfig(source=source, out=root / "cache", teacher=tiny_teacher, quiet=True, **CACHE_KW))
    return SimpleNamespace(root=root, source=source, teacher=tiny_teacher, cache=root / "cache",
                           shards=_tars(root / "cache"))


def _copy_cache(world, dst: Path) -> Path:
    shutil.copytree(world.cache, dst)
    return dst


def _recache(world, out: Path, **kw) -> dict:
    return CT.run(CT.CacheTeacherConfig(source=world.source, out=out, teacher=world.teacher, quiet=True,
                                        **(CACHE_KW | kw)))


def _distill(cache: Path, out: Path, **kw) -> dict:
    return S.run(S.resolve_config(dict(cache=str(cache), out=str(out)) | DISTILL_KW | kw))


@pytest.fixture(scope="module")
def ref_run(world, tmp_path_factory) -> Path:
    """An uninterrupted in-process distill run of 10 steps on the shared cache."""
    out = tmp_path_factory.mktemp("ref-run") / "run"
    _distill(world.cache, out)
    return out


# ----------------------------------------------------------------------------------
# kill -9, then rerun
# ----------------------------------------------------------------------------------

CT_KILLS = [  # (fault point, what must be on disk right after the kill)
    ("write:cache-config.json:after-rename", "config only: no shard started"),
    ("write:shard-00001.tar:before-rename", "shard 1 complete under its temporary name"),
    ("write:shard-00002.tar:after-rename", "shard 2 in place, no done-marker yet"),
    ("cache-teacher:unit-done:2", "shard 2 and its done-marker written"),
    ("write:shard-00003.done.json:before-rename", "shard 3 in place, its done-marker not yet"),
    ("write:manifest.json:before-rename", "every shard done, the manifest not yet"),
]


@pytest.mark.slow
def test_cache_teacher_killed_at_every_point_resumes_byte_identical(world, zygote, tmp_path):
    args = ["cache-teacher", world.source, "--teacher", world.teacher, *CACHE_OPTS]
    ref = tmp_path / "ref"
    assert zygote.run(*args, "--out", ref).returncode == 0
    out = tmp_path / "killed"
    survived = []
    for point, _ in CT_KILLS:
        r = zygote.run(*args, "--out", out, fault=point)
        assert r.returncode == -9, (point, r.output[-2000:])
        done = sorted(p.name for p in out.glob("shard-*.done.json"))
        if point.startswith("write:cache-config"):
            assert not list(out.glob("shard-*"))
        elif point == "write:shard-00001.tar:before-rename":
            assert done == ["shard-00000.done.json"] and not (out / "shard-00001.tar").exists()
            assert [p.name for p in out.glob("shard-00001.tar.tmp*")]  # the complete temporary file
        elif point == "write:shard-00002.tar:after-rename":
            assert (out / "shard-00002.tar").exists() and "shard-00002.done.json" not in done
        elif point == "cache-teacher:unit-done:2":
            assert "shard-00002.done.json" in done and not (out / "shard-00003.tar").exists()
        elif point == "write:shard-00003.done.json:before-rename":
            assert (out / "shard-00003.tar").exists() and "shard-00003.done.json" not in done
        else:
            assert len(done) == 4 and not (out / cache_format.MANIFEST_NAME).exists()
        assert not (out / cache_format.MANIFEST_NAME).exists()  # never a manifest of an unfinished cache
        with pytest.raises(UserError, match="unfinished cache"):
            cache_format.open_cache(out)
        survived.append(point)
    r = zygote.run(*args, "--out", out)
    assert r.returncode == 0, r.output[-3000:]
    assert "took over the lock of a run that is gone" in r.output  # the killed run's lock file
    shards = _tars(out)
    assert shards == _tars(ref) and len(shards) == 8
    assert _manifest(out) == _manifest(ref)
    assert not (out / atomic.LOCK_NAME).exists()
    keys = [s.meta["key"] for name in sorted(shards) if name.endswith(".tar")
            for s in cache_format.read_shard(out / name)]
    assert keys == [f"{i:09d}" for i in range(8)]  # every sample exactly once: 0 lost, 0 duplicated
    assert len(survived) == len(CT_KILLS)


@pytest.mark.slow
def test_cache_teacher_killed_as_a_fresh_interpreter_resumes_like_the_forked_child(world, zygote, tmp_path):
    """The zygote's children stand for real runs: the same kill in `python -m hierdctl.cli`."""
    args = ["cache-teacher", world.source, "--teacher", world.teacher, *CACHE_OPTS, "--quiet"]
    out = tmp_path / "c"
    env = os.environ | BASE_ENV | {"HIERDCTL_FAULT": "write:shard-00001.tar:before-rename"}
    p = subprocess.run([sys.executable, "-m", "hierdctl.cli", *args, "--out", str(out)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    assert (out / "shard-00000.done.json").exists() and not (out / "shard-00001.tar").exists()
    assert zygote.run(*args, "--out", out).returncode == 0
    assert _tars(out) == world.shards


DISTILL_KILLS = [  # (fault point, the newest complete checkpoint right after the kill)
    ("distill:step:3", 2),                               # after an optimizer step, before its metrics row
    ("write:step-0000004.state.pt:before-rename", 2),    # inside a checkpoint, between its files
    ("write:metrics.jsonl:before-rename", 2),            # the metrics rewrite of a resume
    ("write:latest.json:before-rename@2", 4),            # step 6's files all written, latest.json not yet
    ("write:latest.json:after-rename@2", 8),             # step 8 complete, older ones not yet pruned
]


@pytest.mark.slow
def test_distill_killed_at_every_point_resumes_bit_identical(world, zygote, tmp_path):
    base = ["distill", world.cache, *DISTILL_OPTS]
    ref = tmp_path / "ref"
    assert zygote.run(*base, "--out", ref).returncode == 0
    out = tmp_path / "killed"
    survived = []
    for i, (point, latest) in enumerate(DISTILL_KILLS):
        before = (out / checkpoint.METRICS).read_bytes() if i else None
        r = zygote.run(*base, "--out", out, *(["--resume"] if i else []), fault=point)
        assert r.returncode == -9, (point, r.output[-3000:])
        assert checkpoint.latest(out)[0] == latest, point
        steps = [row["step"] for row in _metrics(out)]
        assert steps == sorted(set(steps)) and steps[0] == 1, (point, steps)  # no step twice, none missing
        if point.startswith("write:metrics.jsonl"):
            assert (out / checkpoint.METRICS).read_bytes() == before  # the old file, whole
        survived.append(point)
    # A crash mid-append leaves a torn last line: dropped with a note, not a JSONDecodeError.
    with open(out / checkpoint.METRICS, "a") as f:
        f.write('{"step": 9, "epoch": 4.5, "lr": 0.0001, "clip_lo')
    r = zygote.run(*base, "--out", out, "--resume")
    assert r.returncode == 0, r.output[-3000:]
    assert "resumed from step 8" in r.output and "dropped 1 unreadable line" in r.output
    rows = _metrics(out)
    assert [row["step"] for row in rows] == list(range(1, 11))  # 0 steps lost, 0 duplicated
    assert _curve(rows) == _curve(_metrics(ref))  # the loss curve, value for value
    final = f"{checkpoint.stem(10)}.safetensors"
    assert _same_weights(out / "checkpoints" / final, ref / "checkpoints" / final)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == \
        sorted(p.name for p in (ref / "checkpoints").glob("step-*"))
    assert not (out / atomic.LOCK_NAME).exists()
    assert len(survived) == len(DISTILL_KILLS)


@pytest.mark.slow
def test_a_cache_teacher_rerun_removes_the_leftovers_of_a_killed_write(world, zygote, tmp_path):
    args = ["cache-teacher", world.source, "--teacher", world.teacher, *CACHE_OPTS, "--quiet", "--out", tmp_path / "c"]
    assert zygote.run(*args, fault="write:shard-00001.done.json:before-rename").returncode == -9
    assert zygote.run(*args, fault="write:manifest.json:before-rename").returncode == -9
    assert _leftovers(tmp_path / "c")  # what the kills left
    assert zygote.run(*args).returncode == 0
    assert _leftovers(tmp_path / "c") == []


@pytest.mark.slow
def test_a_resumed_distill_run_removes_the_leftovers_of_a_killed_write(world, zygote, tmp_path):
    base = ["distill", world.cache, *DISTILL_OPTS, "--steps", "4", "--save-every", "2"]
    out = tmp_path / "run"
    assert zygote.run(*base, "--out", out, fault="write:latest.json:before-rename@2").returncode == -9
    assert zygote.run(*base, "--out", out, "--resume", fault="write:metrics.jsonl:before-rename").returncode == -9
    assert _leftovers(out)  # what the two kills left
    assert zygote.run(*base, "--out", out, "--resume").returncode == 0
    assert _leftovers(out) == []


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["cache-teacher", "distill"])
def test_a_run_killed_in_its_first_write_can_be_rerun(world, zygote, tmp_path, stage):
    out = tmp_path / "out"
    if stage == "cache-teacher":
        args, point = ["cache-teacher", world.source, "--teacher", world.teacher, *CACHE_OPTS], "cache-config.json"
    else:
        args, point = ["distill", world.cache, *DISTILL_OPTS, "--steps", "2"], checkpoint.CONFIG
    assert zygote.run(*args, "--out", out, fault=f"write:{point}:before-rename").returncode == -9
    assert _leftovers(out)
    r = zygote.run(*args, "--out", out, "--quiet")
    assert r.returncode == 0, r.output[-2000:]


# ----------------------------------------------------------------------------------
# Corrupted caches (every test works on a copy)
# ----------------------------------------------------------------------------------


def _member_offsets(shard: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tf:
        return tf.getmembers()


def _patch(shard: Path, offset: int, data: bytes) -> None:
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _distill_cli(cache: Path, out: Path, *extra: str, quiet: bool = True):
    return _cli("distill", cache, "--out", out, *DISTILL_OPTS, "--steps", "2", *extra, *(["--quiet"] if quiet else []))


def test_flipped_tar_header_bytes_refuse_distill_then_a_cache_teacher_rerun_repairs(world, tmp_path):
    cache = _copy_cache(world, tmp_path / "cache")
    shard = cache / "shard-00001.tar"
    third = _member_offsets(shard)[2]
    header = bytearray(shard.read_bytes()[third.offset:third.offset + 512])
    _patch(shard, third.offset + 100, bytes(b ^ 0xFF for b in header[100:112]))  # 12 bytes: mode, uid
    r = _distill_cli(cache, tmp_path / "run")
    _one_line_error(r, "shard-00001.tar", "rerun cache-teacher")
    assert not (tmp_path / "run" / checkpoint.METRICS).exists()  # refused before any step
    r = _cli("cache-info", cache, "--verify")
    assert r.exit_code == 1 and "shard-00001.tar" in r.output and "Traceback" not in r.output
    m = _recache(world, cache)
    assert any(n.startswith("shard-00001.tar is redone") for n in m["this_run"]["notes"]), m["this_run"]["notes"]
    assert m["this_run"]["shards"] == 1 and _tars(cache) == world.shards
    assert _cli("cache-info", cache, "--verify").exit_code == 0
    assert _distill(cache, tmp_path / "run2", steps=2)["steps"] == 2


def test_a_truncated_shard_is_refused_naming_it(world, tmp_path):
    cache = _copy_cache(world, tmp_path / "cache")
    shard = cache / "shard-00002.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _one_line_error(_distill_cli(cache, tmp_path / "run"), "shard-00002.tar", "rerun cache-teacher")
    r = _cli("cache-info", cache, "--verify")
    assert r.exit_code == 1 and "shard-00002.tar" in r.output
    m = _recache(world, cache)
    assert m["this_run"]["shards"] == 1 and (cache / "shard-00002.tar").read_bytes() == world.shards["shard-00002.tar"]


def test_a_foreign_shard_renamed_into_place_is_refused_and_redone(world, tmp_path):
    """A shard of another cache with the same settings (another source) is not trained on."""
    other_src = make_shards(tmp_path / "other-data", n_shards=4, per_shard=3, start=100)
    other = tmp_path / "other"
    CT.run(CT.CacheTeacherConfig(source=other_src, out=other, teacher=world.teacher, quiet=True, **CACHE_KW))
    cache = _copy_cache(world, tmp_path / "cache")
    shutil.copy(other / "shard-00001.tar", cache / "shard-00001.tar")
    _one_line_error(_distill_cli(cache, tmp_path / "run"), "shard-00001.tar", "rerun cache-teacher")
    r = _cli("cache-info", cache, "--verify")
    assert r.exit_code == 1 and "shard-00001.tar" in r.output
    m = _recache(world, cache)
    assert m["this_run"]["shards"] == 1 and (cache / "shard-00001.tar").read_bytes() == world.shards["shard-00001.tar"]


def _member(shard: Path, suffix: str, sample: int) -> tarfile.TarInfo:
    key = f"{int(shard.stem.split('-')[1]):05d}_{sample:06d}"
    return next(m for m in _member_offsets(shard) if m.name == f"{key}.{suffix}")


def _npy_data_offset(raw: bytes) -> int:
    """Where a .npy's array bytes start (version 1 header)."""
    return 10 + int.from_bytes(raw[8:10], "little")


def _damage(shard: Path, kind: str, sample: int) -> None:
    """Damage one member of one sample in place: the tar stays well-formed and of the same size."""
    raw = shard.read_bytes()
    if kind == "flipped_npy_magic":
        m = _member(shard, "txt_emb.npy", sample)
        _patch(shard, m.offset_data, bytes(b ^ 0xFF for b in raw[m.offset_data:m.offset_data + 6]))
    elif kind == "flipped_npy_header":  # 12 bytes of the header's dict literal
        m = _member(shard, "txt_emb.npy", sample)
        _patch(shard, m.offset_data + 10, bytes(b ^ 0xFF for b in raw[m.offset_data + 10:m.offset_data + 22]))
    elif kind == "object_dtype_npy":
        m = _member(shard, "img_emb.npy", sample)
        head = raw[m.offset_data:m.offset_data + 128]
        i = head.index(b"'<f2'")
        _patch(shard, m.offset_data + i, b"'|O' ")
    elif kind == "flipped_image_bytes":
        m = _member(shard, "image.jpg", sample)
        _patch(shard, m.offset_data, b"\x00" * 16)
    elif kind == "nan_teacher_features":
        m = _member(shard, "img_emb.npy", sample)
        start = m.offset_data + _npy_data_offset(raw[m.offset_data:m.offset_data + 256])
        n = m.offset_data + m.size - start
        _patch(shard, start, np.full(n // 2, np.nan, np.float16).tobytes())
    else:
        raise AssertionError(kind)


DAMAGE = {  # kind -> the reason distill names
    "flipped_npy_magic": "undecodable_member",
    "flipped_npy_header": "undecodable_member",
    "object_dtype_npy": "undecodable_member",
    "flipped_image_bytes": "bad_image",
    "nan_teacher_features": "non_finite_teacher_features",
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_member_is_skipped_counted_and_named(world, tmp_path, kind):
    cache = _copy_cache(world, tmp_path / "cache")
    _damage(cache / "shard-00002.tar", kind, sample=1)
    # Size and count still match: the start-up check lets it through, the reader catches it.
    run = tmp_path / "run"
    r = _distill_cli(cache, run, quiet=False)  # 2 steps of 4 = one epoch: every sample is read once
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    assert "Traceback" not in r.output
    assert "skipped a damaged cached sample: shard-00002.tar sample 1" in r.output and DAMAGE[kind] in r.output
    assert _metrics(run)[-1]["skipped_samples"] == 1
    summary = _distill(cache, tmp_path / "run-again", steps=2)
    assert summary["skipped_samples"] == 1
    assert summary["skipped_examples"][0].startswith("shard-00002.tar sample 1: " + DAMAGE[kind])
    # The sha256 in the manifest sees it; a cache-teacher rerun redoes the shard.
    r = _cli("cache-info", cache, "--verify")
    assert r.exit_code == 1 and "shard-00002.tar" in r.output
    m = _recache(world, cache)
    assert m["this_run"]["shards"] == 1 and (cache / "shard-00002.tar").read_bytes() == world.shards["shard-00002.tar"]


def test_a_diverged_run_names_the_checkpoint_it_keeps_or_says_there_is_none(world, tmp_path, monkeypatch):
    from hierdctl.losses import registry

    real, calls = registry.compute_terms, {"n": 0}

    def poisoned_from(step):
        def f(recipe, feats):
            calls["n"] += 1
            out = real(recipe, feats)
            if calls["n"] >= step:
                out["fd_loss"] = out["fd_loss"] * float("nan")
            return out
        return f

    monkeypatch.setattr(registry, "compute_terms", poisoned_from(1))
    r = _distill_cli(world.cache, tmp_path / "a")
    assert r.exit_code == 1 and "fd_loss" in r.output and "no checkpoint was written yet" in r.output
    calls["n"] = 0
    monkeypatch.setattr(registry, "compute_terms", poisoned_from(4))
    r = _cli("distill", world.cache, "--out", tmp_path / "b", *DISTILL_OPTS, "--save-every", "1", "--quiet")
    assert r.exit_code == 1 and "step 4" in r.output and "(step 3) is kept" in r.output
    assert len(_lines(r.output)) == 1


# ----------------------------------------------------------------------------------
# --overwrite removes only what hierdctl wrote
# ----------------------------------------------------------------------------------


def _users_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_cache_teacher_overwrite_refuses_a_folder_hierdctl_did_not_write(world, tmp_path):
    out = _users_folder(tmp_path / "mine", {"shard-0001.tar": b"my own tar", "manifest.json": b'{"mine": true}',
                                            "shard-00000.tar": b"not a hierdctl shard",
                                            "cache-config.json": b'{"format": "something-else"}'})
    before = _snapshot(out)
    r = _cli("cache-teacher", world.source, "--out", out, "--teacher", world.teacher, *CACHE_OPTS, "--overwrite")
    _one_line_error(r, "--out", str(out), "not a hierdctl teacher cache")
    assert _snapshot(out) == before  # every file byte-identical, no lock file left in it


def test_distill_overwrite_refuses_a_folder_hierdctl_did_not_write(world, tmp_path):
    out = _users_folder(tmp_path / "mine", {"checkpoints/latest.json": b'{"step": 1, "name": "step-0000001"}',
                                            "checkpoints/step-0000001.safetensors": b"weights of mine",
                                            "metrics.jsonl": b'{"step": 1, "loss": 0.5}\n',
                                            "config.resolved.yaml": b"lr: 0.1\n"})
    before = _snapshot(out)
    _one_line_error(_distill_cli(world.cache, out, "--overwrite"), "--out", str(out), "not a hierdctl distill run")
    assert _snapshot(out) == before


def test_overwrite_of_hierdctl_folders_removes_only_their_own_files(world, tmp_path):
    cache = _copy_cache(world, tmp_path / "cache")
    extra = {"notes.txt": b"mine", "shard-00001.tar.bak": b"my backup", "mine/shard-00000.tar": b"a copy of mine",
             "manifest.json.orig": b"{}"}
    _users_folder(cache, extra)
    m = _recache(world, cache, overwrite=True)
    assert m["complete"] and m["this_run"]["shards_resumed"] == 0
    after = _snapshot(cache)
    assert {k: after[k] for k in extra} == extra
    assert _tars(cache) == world.shards and _manifest(cache) == _manifest(world.cache)

    run = tmp_path / "run"
    _distill(world.cache, run, steps=2)
    extra = {"my-notes.txt": b"mine", "checkpoints/mine.pt": b"mine too", "checkpoints/step-1.safetensors": b"x",
             "tensorboard-old/events": b"e"}
    _users_folder(run, extra)
    summary = _distill(world.cache, run, steps=4, overwrite=True)
    assert summary["steps"] == 4 and summary["resumed_from"] == 0
    after = _snapshot(run)
    assert {k: after[k] for k in extra} == extra
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------
# One writer per output folder
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["cache-teacher", "distill"])
def test_a_second_writer_exits_2_naming_the_folder_and_the_owner(world, tmp_path, stage):
    out = tmp_path / "out"
    if stage == "cache-teacher":
        args = ["cache-teacher", world.source, "--out", out, "--teacher", world.teacher, *CACHE_OPTS]
    else:
        args = ["distill", world.cache, "--out", out, *DISTILL_OPTS, "--steps", "2"]
    with atomic.FolderLock(out, "--out"):
        before = _snapshot(out)
        line = _one_line_error(_cli(*args), "--out", str(out), f"pid {os.getpid()}", socket.gethostname())
        assert "another hierdctl process" in line
        assert _snapshot(out) == before
    assert _cli(*args, "--quiet").exit_code == 0  # the lock is released: the same command now runs


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("stage", ["cache-teacher", "distill"])
def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_note(world, tmp_path, stage):
    out = tmp_path / "out"
    out.mkdir()
    pid = _dead_pid()
    (out / atomic.LOCK_NAME).write_text(json.dumps({"pid": pid, "host": "node-7", "started": "2024-01-01T00:00:00"}))
    if stage == "cache-teacher":
        r = _cli("cache-teacher", world.source, "--out", out, "--teacher", world.teacher, *CACHE_OPTS)
    else:
        r = _cli("distill", world.cache, "--out", out, *DISTILL_OPTS, "--steps", "2")
    assert r.exit_code == 0, r.output[-3000:]
    assert f"took over the lock of a run that is gone (pid {pid} on host node-7" in r.output
    assert not (out / atomic.LOCK_NAME).exists()


# ----------------------------------------------------------------------------------
# A full disk
# ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _disk_full_at(name_pattern: str):
    """os.fsync raises ENOSPC for the files whose name matches: what a full disk does to the
    flush of a file's last blocks (the write itself can raise it too; both land in the same guard)."""
    real = os.fsync
    hits = []

    def fsync(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if re.search(name_pattern, name):
            hits.append(name)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", fsync)
        yield hits
    assert hits, f"no write matched {name_pattern}"


def test_disk_full_in_cache_teacher_is_one_line_and_a_rerun_completes(world, tmp_path):
    out = tmp_path / "cache"
    args = ["cache-teacher", world.source, "--out", out, "--teacher", world.teacher, *CACHE_OPTS]
    with _disk_full_at(r"^shard-00002\.tar"):
        _one_line_error(_cli(*args), "no space left", str(out), "free", "rerun")
    assert not _leftovers(out) and (out / "shard-00001.done.json").exists()
    assert _cli(*args, "--quiet").exit_code == 0
    assert _tars(out) == world.shards


def test_disk_full_in_distill_is_one_line_and_resume_completes(world, ref_run, tmp_path):
    out = tmp_path / "run"
    with _disk_full_at(r"^step-0000006\.state\.pt"):
        _one_line_error(_distill_cli(world.cache, out, "--steps", "10"), "no space left", str(out / "checkpoints"))
    assert checkpoint.latest(out)[0] == 4 and not _leftovers(out)
    assert _distill(world.cache, out, resume=True)["resumed_from"] == 4
    assert _curve(_metrics(out)) == _curve(_metrics(ref_run))
    assert _same_weights(out / "checkpoints" / "step-0000010.safetensors",
                         ref_run / "checkpoints" / "step-0000010.safetensors")


def test_disk_full_while_appending_metrics_is_one_line_and_resume_completes(world, ref_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_open = open

    def fake_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if Path(path).name == checkpoint.METRICS and "a" in mode:
            writes = {"n": 0}
            real_write = f.write

            def write(s):
                writes["n"] += 1
                if writes["n"] > 5:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real_write(s)

            f.write = write
        return f

    monkeypatch.setattr(S, "open", fake_open, raising=False)
    _one_line_error(_distill_cli(world.cache, out, "--steps", "10"), "no space left", str(out), "--resume")
    monkeypatch.undo()
    assert _distill(world.cache, out, resume=True)["resumed_from"] == 4
    assert _curve(_metrics(out)) == _curve(_metrics(ref_run))


@pytest.mark.slow
def test_a_file_size_limit_is_one_line(world, zygote, tmp_path):
    """RLIMIT_FSIZE makes write() fail with EFBIG (Python ignores SIGXFSZ), not ENOSPC."""
    out = tmp_path / "cache"
    r = zygote.run("cache-teacher", world.source, "--out", out, "--teacher", world.teacher, *CACHE_OPTS, "--quiet",
                   fsize=8192)
    _one_line_error(r.output, str(out), code=2)
    assert r.returncode == 2


# ----------------------------------------------------------------------------------
# Pickled payloads never run
# ----------------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling creates the marker file


def _pickled(path: Path, marker: Path, extra: dict | None = None) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _Payload(str(marker))} | (extra or {}), path)
    return path


def _crafted(path: Path, marker: Path) -> Path:
    """A checkpoint whose pickle makes torch's weights-only unpickler raise TypeError (BUILD of a
    Tensor with a 5-tuple: set_(*state) there, Tensor.__setstate__ in pickle) before its payload.
    open_clip answers a TypeError by loading again without weights_only, which
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns into a full unpickling: the payload runs."""
    import zipfile

    m = str(marker).encode()
    stream = (b"\x80\x02ctorch\nTensor\n)\x81(ctorch\nTensor\n)\x81N\x89\x89Ntb0"
              b"cbuiltins\nopen\nX" + len(m).to_bytes(4, "little") + m + b"X\x01\x00\x00\x00w\x86R0}.")
    buf = io.BytesIO()
    torch.save({}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, stream if info.filename.endswith("data.pkl") else zin.read(info.filename))
    return path


@pytest.fixture()
def marker(tmp_path):
    m = tmp_path / "PAYLOAD-RAN"
    yield m
    assert not m.exists(), "a pickled payload ran"


MAKERS = {"pickled-object": _pickled, "weights-only-TypeError-trick": _crafted}


@pytest.mark.parametrize("force_no_weights_only", [False, True],
                         ids=["default-env", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"])
@pytest.mark.parametrize("kind", list(MAKERS))
def test_a_pickled_teacher_checkpoint_is_refused_in_one_line_and_never_runs(world, tmp_path, marker, kind,
                                                                             force_no_weights_only):
    ckpt = MAKERS[kind](tmp_path / "teacher.pt", marker)
    env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"} if force_no_weights_only else None
    r = _cli("cache-teacher", world.source, "--out", tmp_path / "c", "--teacher", f"open_clip:tiny-test/{ckpt}",
             *CACHE_OPTS, env=env)
    _one_line_error(r, "--teacher", str(ckpt), "refused", "pickled", "weights_only")
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # the guard put the environment back


@pytest.mark.parametrize("where", ["--student", "--model", "local-dir"])
def test_pickled_weights_are_refused_wherever_a_model_is_loaded(world, tmp_path, marker, where):
    ckpt = _pickled(tmp_path / "model.pt", marker)
    if where == "--student":
        r = _distill_cli(world.cache, tmp_path / "run", "--student", f"open_clip:tiny-test/{ckpt}")
        _one_line_error(r, "--student", str(ckpt), "pickled")
    elif where == "--model":
        r = _cli("eval-retrieval", world.source, "--model", f"open_clip:tiny-test/{ckpt}", "--workers", "0")
        _one_line_error(r, "--model", str(ckpt), "pickled")
    else:  # an open_clip local dir whose weights are a pickled .bin
        d = tmp_path / "dir"
        d.mkdir()
        (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {}}))
        _pickled(d / "open_clip_pytorch_model.bin", marker)
        r = _cli("cache-teacher", world.source, "--out", tmp_path / "c", "--teacher", f"local-dir:{d}", *CACHE_OPTS)
        _one_line_error(r, "--teacher", str(d), "pickled")


def test_a_plain_pt_state_dict_still_loads(tmp_path):
    from hierdctl.specs import fingerprint_state_dict, load_encoder

    model = make_tiny_model(seed=3)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    enc = load_encoder(f"open_clip:tiny-test/{tmp_path / 'plain.pt'}")
    assert enc.fingerprint() == fingerprint_state_dict(model.state_dict())


def _run_with_state(world, tmp_path, make) -> tuple[Path, Path]:
    run = tmp_path / "run"
    _distill(world.cache, run, steps=4)
    state = run / "checkpoints" / "step-0000004.state.pt"
    make(state)
    return run, state


def test_a_pickled_state_pt_is_refused_on_resume(world, tmp_path, marker):
    run, state = _run_with_state(world, tmp_path, lambda p: _pickled(p, marker, {"optimizer": {}, "step": 4}))
    r = _cli("distill", world.cache, "--out", run, *DISTILL_OPTS, "--steps", "4", "--resume")
    _one_line_error(r, "--resume", str(state), "pickled")


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:1000])


@pytest.mark.parametrize("kind", ["truncated", "not-a-distill-state"])
def test_a_damaged_state_pt_is_refused_on_resume_in_one_line(world, tmp_path, kind):
    def not_a_state(p):
        torch.save({"step": 4, "rng_cpu": torch.get_rng_state()}, p)

    make = _truncate if kind == "truncated" else not_a_state
    run, state = _run_with_state(world, tmp_path, make)
    r = _cli("distill", world.cache, "--out", run, *DISTILL_OPTS, "--steps", "4", "--resume", "--quiet")
    _one_line_error(r, "--resume", str(state))


def test_a_crafted_state_pt_is_refused_on_resume_in_one_line(world, tmp_path, marker):
    run, state = _run_with_state(world, tmp_path, lambda p: _crafted(p, marker))
    r = _cli("distill", world.cache, "--out", run, *DISTILL_OPTS, "--steps", "4", "--resume",
             env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    _one_line_error(r, "--resume", str(state))


# ----------------------------------------------------------------------------------
# Uncached pretrained tags without network: fail fast, one line
# ----------------------------------------------------------------------------------

TAG = "open_clip:ViT-B-32/laion2b_s34b_b79k"


@pytest.mark.parametrize("spec", [TAG, "open_clip:hf-hub:timm/no-such-repo-for-hierdctl-tests"])
def test_an_uncached_pretrained_tag_offline_fails_at_once_in_one_line(world, tmp_path, monkeypatch, spec):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets when the client is imported
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    t0 = time.time()
    r = _cli("cache-teacher", world.source, "--out", tmp_path / "c", "--teacher", spec, *CACHE_OPTS)
    _one_line_error(r, "--teacher", spec, "not in the local Hugging Face cache", "HF_HUB_OFFLINE")
    assert time.time() - t0 < 10
    r = _cli("eval-retrieval", world.source, "--model", spec, "--workers", "0")
    _one_line_error(r, "--model", "HF_HUB_OFFLINE")


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.slow
def test_an_uncached_pretrained_tag_with_an_unreachable_hub_is_one_attempt_and_one_line(world, tmp_path):
    """Without HF_HUB_OFFLINE and without network (HF_ENDPOINT: a closed port on 127.0.0.1):
    before, 48 lines of hub retries with backoff and ~50 s; now one HEAD request, one line."""
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    env = os.environ | BASE_ENV | {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")}
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "hierdctl.cli", "cache-teacher", world.source, "--out",
                        str(tmp_path / "c"), "--teacher", TAG, *CACHE_OPTS], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    wall = time.time() - t0
    assert p.returncode == 2, p.stderr[-3000:]
    line = _one_line_error(p.stdout + p.stderr, "--teacher", TAG, endpoint, "cannot be reached")
    assert "Retry" not in line
    assert wall < 30  # interpreter start-up included; the retries alone took 31 s per file


# ----------------------------------------------------------------------------------
# Bad input: one line naming the flag or file, exit 2
# ----------------------------------------------------------------------------------


def _bad_inputs(w, tmp: Path) -> dict[str, tuple[list, str]]:
    """kind -> (arguments, what the line must name)."""
    ct = ["cache-teacher", w.source, "--teacher", w.teacher, *CACHE_OPTS, "--out"]
    a_file = tmp / "a-file"
    a_file.write_text("x")
    (tmp / "bad.yaml").write_text("lr: [1, 2\n")
    (tmp / "bad-recipe.yaml").write_text("terms:\n  - {name: no-such-term, weight: 1}\n")
    dt = ["distill", w.cache, *DISTILL_OPTS, "--out", tmp / "run"]
    de = ["distill", w.cache, "--student", "tiny-test", "--recipe", "clip-kd", "--batch-size", "4",
          "--out", tmp / "run"]
    return {
        "cache-teacher: missing source": (["cache-teacher", tmp / "nope.tar", "--teacher", w.teacher, "--out",
                                           tmp / "c"], "SOURCE"),
        "cache-teacher: teacher spec without scheme": (["cache-teacher", w.source, "--teacher", "ViT-B-32", "--out",
                                                        tmp / "c"], "--teacher"),
        "cache-teacher: unknown architecture": (["cache-teacher", w.source, "--teacher", "open_clip:NoSuch-9",
                                                 "--out", tmp / "c"], "--teacher"),
        "cache-teacher: missing checkpoint": (["cache-teacher", w.source, "--teacher",
                                               f"open_clip:tiny-test/{tmp / 'missing.pt'}", "--out", tmp / "c"],
                                              "--teacher"),
        "cache-teacher: missing local dir": (["cache-teacher", w.source, "--teacher", f"local-dir:{tmp / 'nodir'}",
                                              "--out", tmp / "c"], "--teacher"),
        "cache-teacher: --views 0": ([*ct, tmp / "c", "--views", "0"], "--views"),
        "cache-teacher: --clusters 300": ([*ct, tmp / "c", "--clusters", "300"], "--clusters"),
        "cache-teacher: --dtype fp8": ([*ct, tmp / "c", "--dtype", "fp8"], "--dtype"),
        "cache-teacher: --crop-scale a,b": ([*ct, tmp / "c", "--crop-scale", "a,b"], "--crop-scale"),
        "cache-teacher: --batch-size 0": ([*ct, tmp / "c", "--batch-size", "0"], "--batch-size"),
        "cache-teacher: --max-pixels 0": ([*ct, tmp / "c", "--max-pixels", "0"], "--max-pixels"),
        "cache-teacher: --out is a file": ([*ct, a_file], "--out"),
        "cache-teacher: --precision fp64": ([*ct, tmp / "c", "--precision", "fp64"], "--precision"),
        "cache-teacher: --rank without --world-size": ([*ct, tmp / "c", "--rank", "3"], "--rank"),
        "cache-info: not a cache": (["cache-info", tmp], "CACHE"),
        "distill: --epochs inf": ([*de, "--epochs", "inf"], "--epochs"),
        "distill: --epochs nan": ([*de, "--epochs", "nan"], "--epochs"),
        "distill: --epochs -1": ([*de, "--epochs", "-1"], "--epochs"),
        "distill: --steps 0": ([*dt, "--steps", "0"], "--steps"),
        "distill: --batch-size 0": ([*dt, "--batch-size", "0"], "--batch-size"),
        "distill: --warmup abc": ([*dt, "--warmup", "abc"], "--warmup"),
        "distill: --save-every 0": ([*dt, "--save-every", "0"], "--save-every"),
        "distill: --log-every 0": ([*dt, "--log-every", "0"], "--log-every"),
        "distill: --lr nan": ([*dt, "--lr", "nan"], "--lr"),
        "distill: missing --config": ([*dt, "--config", tmp / "nope.yaml"], "nope.yaml"),
        "distill: --config not YAML": ([*dt, "--config", tmp / "bad.yaml"], "bad.yaml"),
        "distill: --set without =": ([*dt, "--set", "lr"], "--set"),
        "distill: --set value not YAML": ([*dt, "--set", "lr=[1"], "--set"),
        "distill: recipe file not YAML": ([*dt, "--recipe", tmp / "bad.yaml"], "bad.yaml"),
        "distill: recipe with an unknown term": ([*dt, "--recipe", tmp / "bad-recipe.yaml"], "no-such-term"),
        "distill: missing cache": (["distill", tmp / "no-cache", *DISTILL_OPTS, "--out", tmp / "run"], "CACHE"),
        "distill: --out is a file": (["distill", w.cache, *DISTILL_OPTS, "--out", a_file], "--out"),
        "distill: missing student checkpoint": ([*dt, "--student", f"open_clip:tiny-test/{tmp / 'no.safetensors'}"],
                                                "--student"),
        "distill: bf16 on CPU": ([*dt, "--precision", "bf16", "--device", "cpu"], "--precision"),
        "distill: --report-to mlflow": ([*dt, "--report-to", "mlflow"], "--report-to"),
        "export: missing run": (["export", tmp / "no-run", "--out", tmp / "e"], "RUN_DIR"),
        "export: --format xyz": (["export", tmp / "no-run", "--out", tmp / "e", "--format", "xyz"], "--format"),
        "eval-retrieval: missing local dir": (["eval-retrieval", w.source, "--model", f"local-dir:{tmp / 'nodir'}"],
                                              "--model"),
        "eval-retrieval: --k 1,a": (["eval-retrieval", w.source, "--model", w.teacher, "--k", "1,a"], "--k"),
    }


BAD_INPUT_KINDS = ["cache-teacher: missing source", "cache-teacher: teacher spec without scheme",
                   "cache-teacher: unknown architecture", "cache-teacher: missing checkpoint",
                   "cache-teacher: missing local dir", "cache-teacher: --views 0", "cache-teacher: --clusters 300",
                   "cache-teacher: --dtype fp8", "cache-teacher: --crop-scale a,b", "cache-teacher: --batch-size 0",
                   "cache-teacher: --max-pixels 0", "cache-teacher: --out is a file",
                   "cache-teacher: --precision fp64", "cache-teacher: --rank without --world-size",
                   "cache-info: not a cache", "distill: --epochs inf", "distill: --epochs nan", "distill: --epochs -1",
                   "distill: --steps 0", "distill: --batch-size 0", "distill: --warmup abc", "distill: --save-every 0",
                   "distill: --log-every 0", "distill: --lr nan", "distill: missing --config",
                   "distill: --config not YAML",
                   "distill: --set without =",
                   "distill: --set value not YAML",
                   "distill: recipe file not YAML",
                   "distill: recipe with an unknown term",
                   "distill: missing cache", "distill: --out is a file", "distill: missing student checkpoint",
                   "distill: bf16 on CPU", "distill: --report-to mlflow", "export: missing run",
                   "export: --format xyz", "eval-retrieval: missing local dir", "eval-retrieval: --k 1,a"]


@pytest.mark.parametrize("kind", BAD_INPUT_KINDS)
def test_bad_input_is_one_line_naming_the_flag_and_exit_2(world, tmp_path, kind):
    args, names = _bad_inputs(world, tmp_path)[kind]
    _one_line_error(_cli(*args), names)


def test_bad_input_kinds_are_all_tried(world, tmp_path):
    kinds = [k.values[0] if hasattr(k, "values") else k for k in BAD_INPUT_KINDS]
    assert sorted(_bad_inputs(world, tmp_path)) == sorted(kinds)


def test_batch_size_1_with_phraseless_captions_caches_every_sample(world, tmp_path):
    """A batch whose captions yield no noun phrase at all (phrase embeddings None) at --batch-size 1."""
    src = tmp_path / "data"
    src.mkdir()
    captions = ["running quickly", "a red circle next to a blue square", "and then", "go"]
    write_tar(src / "00000.tar", [{"key": f"{i:09d}", "jpg": image_bytes(i), "txt": c} for i, c in enumerate(captions)])
    out = tmp_path / "c"
    r = _cli("cache-teacher", src / "00000.tar", "--out", out, "--teacher", world.teacher, *CACHE_OPTS,
             "--batch-size", "1", "--quiet")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    m = json.loads((out / cache_format.MANIFEST_NAME).read_text())
    assert m["samples"] == 4 and m["phrases"] == 2 and m["skipped_total"] == 0
    masks = [s.arrays["phr_mask"].sum() for s in cache_format.read_shard(out / "shard-00000.tar")]
    assert masks == [0, 2, 0, 0]
