"""WebDataset shards read through URLs: webdataset.gopen's pipe:, http:// and file:, and an
fsspec protocol (memory://, in-process). Every form gives the same samples and the same
skips as the local path, truncated and corrupt shards included; a shard that cannot be
opened (a 404, a refused connection, a command exiting non-zero) is one unreadable_shard
skip; what can be checked before any work is a one-line UserError. The only address ever
contacted is 127.0.0.1: an http.server in a thread, stopped by its fixture."""

from __future__ import annotations

import json
import re
import socket
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import CAPTIONS, http_server, image_bytes, write_tar
from hierdctl import cache_format
from hierdctl.cli import app
from hierdctl.errors import UserError
from hierdctl.sources import Sample, open_source, url_scheme

N_SHARDS = 4


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """curl follows proxy variables: never let it reach anything but 127.0.0.1."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def _sample(i: int) -> dict:
    return {"key": f"{i:09d}", "jpg": image_bytes(i), "txt": CAPTIONS[i % len(CAPTIONS)], "json": {"i": i}}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """00000 good; 00001 with bad members; 00002 cut inside a header; 00003 a corrupt header."""
    d = tmp_path_factory.mktemp("urls")
    write_tar(d / "00000.tar", [_sample(i) for i in range(3)])
    write_tar(d / "00001.tar", [_sample(3), {"key": "nocap", "jpg": image_bytes(9)},
                                {"key": "badtxt", "jpg": image_bytes(9), "txt": b"\xff\xfe"},
                                {"key": "noimg", "txt": "no image"}, _sample(4)])
    # Distinct keys in every shard: a key in two shards is a duplicate_key, which cache-teacher
    # finds between local shards but cannot between URL shards (docs/sources.md).
    for name, how, first in (("00002.tar", "cut", 5), ("00003.tar", "corrupt", 9)):
        p = write_tar(d / name, [_sample(i) for i in range(first, first + 4)])
        with tarfile.open(p) as tf:
            third = [m for m in tf.getmembers() if m.name.startswith(f"{first + 2:09d}.")][0]
        data = bytearray(p.read_bytes())
        if how == "cut":
            data = data[: third.offset + 100]
        else:
            data[third.offset + 20] ^= 0xFF  # the checksum no longer matches
        p.write_bytes(bytes(data))
    return d


@pytest.fixture(scope="module")
def http_base(shards):
    """http://127.0.0.1:PORT serving the shards folder, for this module only."""
    with http_server(shards) as url:
        yield url


def _records(spec: str) -> list[tuple]:
    """(kind, key, reason, samples read before a break): what every form must agree on. A
    skip keyed by its shard says <shard>, since each form labels shards its own way."""
    src = open_source(spec)
    out = []
    for u in src.units:
        for r in src.iter_unit(u):
            if isinstance(r, Sample):
                out.append(("sample", r.key, r.captions, r.image))
            else:
                n = re.search(r"(\d+) samples read", r.detail)
                out.append(("skip", "<shard>" if r.key == u.label else r.key, r.reason, int(n.group(1)) if n else None))
    return out


PATTERN = "{00000..%05d}.tar" % (N_SHARDS - 1)


def test_every_url_form_reads_what_the_local_path_reads(shards, http_base):
    import fsspec

    local = _records(str(shards / PATTERN))
    skips = [r for r in local if r[0] == "skip"]
    assert skips == [("skip", "nocap", "missing_caption", None), ("skip", "badtxt", "undecodable_caption", None),
                     ("skip", "noimg", "missing_image", None), ("skip", "000000006", "truncated_tar", 1),
                     ("skip", "000000010", "corrupt_tar", 1)]
    assert sum(r[0] == "sample" for r in local) == 3 + 2 + 1 + 1
    mem = fsspec.filesystem("memory")
    root = f"/hierdctl-test-{id(local)}"
    for p in shards.glob("*.tar"):
        mem.pipe(f"{root}/{p.name}", p.read_bytes())
    try:
        forms = [f"file:{shards}/{PATTERN}", f"file://{shards}/{PATTERN}", f"pipe:cat {shards}/{PATTERN}",
                 f"{http_base}/{PATTERN}", f"memory://{root}/{PATTERN}"]
        for spec in forms:
            src = open_source(spec)
            assert src.describe() == {"kind": "webdataset", "spec": spec, "units": N_SHARDS}
            assert [u.label for u in src.units][1] == spec.replace(PATTERN, "00001.tar")  # the unit label is the URL
            assert _records(spec) == local, spec
    finally:
        mem.rm(root, recursive=True)


def test_a_shard_that_cannot_be_opened_is_one_unreadable_shard_skip(shards, http_base):
    # A 404 among served shards: the others read as they do locally.
    recs = _records(f"{http_base}/{{00000..{N_SHARDS:05d}}}.tar")
    assert recs[:-1] == _records(str(shards / PATTERN))
    assert recs[-1] == ("skip", "<shard>", "unreadable_shard", None)
    (skip,) = [r for r in open_source(f"{http_base}/{N_SHARDS:05d}.tar").iter_unit(
        open_source(f"{http_base}/{N_SHARDS:05d}.tar").units[0])]
    assert skip.detail == f"{http_base}/{N_SHARDS:05d}.tar: curl exit 22 (the server answered with an HTTP error, 4xx or 5xx)"
    # A refused connection: a port that was just free.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = open_source(f"http://127.0.0.1:{port}/{{0..1}}.tar")
    got = [r for u in src.units for r in src.iter_unit(u)]
    assert [(r.reason, r.key) for r in got] == [("unreadable_shard", u.label) for u in src.units]
    assert all("curl exit 7 (could not connect to the server)" in r.detail for r in got)
    # A command that fails before writing anything.
    src = open_source(f"pipe:cat {shards}/missing-{{0..1}}.tar 2>/dev/null")
    got = [r for u in src.units for r in src.iter_unit(u)]
    assert [r.reason for r in got] == ["unreadable_shard"] * 2
    assert got[0].detail == f"pipe:cat {shards}/missing-0.tar 2>/dev/null: the command exited with status 1"


def test_a_command_that_fails_midway_or_after_the_archive_is_reported(shards):
    good = shards / "00000.tar"
    with tarfile.open(good) as tf:
        third = [m for m in tf.getmembers() if m.name.startswith("000000002.")][0]
    # Output cut inside the third sample's first header, then exit 4: one sample is known
    # complete, the second was being read; one skip says both, and the exit status.
    recs = list(open_source(f"pipe:head -c {third.offset + 100} {good}; exit 4").iter_unit(
        open_source(f"pipe:head -c {third.offset + 100} {good}; exit 4").units[0]))
    assert [type(r).__name__ for r in recs] == ["Sample", "Skip"]
    assert recs[1].reason == "truncated_tar" and recs[1].key == "000000001"
    assert "the command exited with status 4" in recs[1].detail and "1 samples read before it" in recs[1].detail
    # The whole archive, then a failure: every sample, then one unreadable_shard skip.
    spec = f"pipe:cat {good}; exit 3"
    recs = list(open_source(spec).iter_unit(open_source(spec).units[0]))
    assert [type(r).__name__ for r in recs] == ["Sample"] * 3 + ["Skip"]
    assert recs[-1].reason == "unreadable_shard"
    assert recs[-1].detail == f"{spec}: the command exited with status 3, after the archive's end (3 samples read)"


def test_what_can_be_checked_up_front_is_one_user_error(shards, monkeypatch):
    with pytest.raises(UserError, match="no file of"):
        open_source(f"file:{shards}/nothing-{{0..2}}.tar")
    with pytest.raises(UserError, match=r"1 of 5 shards do not exist \(first: file:.*/00004.tar\)"):
        open_source(f"file:{shards}/{{00000..00004}}.tar")
    with pytest.raises(UserError, match="unknown URL scheme nosuch://"):
        open_source("nosuch://host/{0..3}.tar")
    with pytest.raises(UserError, match="a table or Karpathy JSON must be a local file"):
        open_source("https://127.0.0.1/pairs.csv")
    with pytest.raises(UserError, match="unbalanced braces"):
        open_source("https://127.0.0.1/{0..3}}.tar")
    import fsspec

    try:
        fsspec.get_filesystem_class("s3")
    except ImportError:
        with pytest.raises(UserError, match=r"s3:// needs an fsspec backend .*pipe:aws s3 cp"):
            open_source("s3://bucket/{0..3}.tar")
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(UserError, match="curl is not on PATH") as e:
        open_source("https://127.0.0.1/{0..3}.tar", where="SOURCE")
    assert str(e.value).startswith("SOURCE: ")


@pytest.mark.parametrize("spec,scheme", [
    ("pipe:aws s3 cp s3://b/0.tar -", "pipe"), ("file:/data/0.tar", "file"), ("file:///data/0.tar", "file"),
    ("https://host/0.tar", "https"), ("S3://bucket/0.tar", "s3"), ("memory://x/0.tar", "memory"),
    ("data/0.tar", None), ("/data/{0..3}.tar", None), ("a:b.tar", None), ("C:\\data\\0.tar", None),
])
def test_url_scheme(spec, scheme):
    assert url_scheme(spec) == scheme


@pytest.mark.slow
def test_cache_teacher_through_a_pipe_equals_the_local_run(shards, tiny_teacher, tmp_path):
    def run(source: str, out: Path, *more) -> dict:
        r = CliRunner().invoke(app, ["cache-teacher", source, "--out", str(out), "--teacher", tiny_teacher, "--quiet",
                                     "--views", "1", "--clusters", "2", "--max-phrases", "1", "--chunker", "textblob",
                                     *more])
        assert r.exit_code == 0, (r.output, r.exception)
        return json.loads((out / cache_format.MANIFEST_NAME).read_text())

    local = run(str(shards / PATTERN), tmp_path / "local", "--workers", "0")
    piped = run(f"pipe:cat {shards}/{PATTERN}", tmp_path / "piped", "--workers", "1")  # read in a DataLoader worker
    keys = ("samples", "captions", "phrases", "skipped", "skipped_total", "converted", "shards_total", "complete")
    assert {k: piped[k] for k in keys} == {k: local[k] for k in keys}
    assert local["samples"] == 7 and local["skipped"] == {"corrupt_tar": 1, "missing_caption": 1, "missing_image": 1,
                                                          "truncated_tar": 1, "undecodable_caption": 1}
    assert [s["label"] for s in piped["shards"]] == [f"pipe:cat {shards}/{i:05d}.tar" for i in range(N_SHARDS)]
    for a, b in zip(sorted((tmp_path / "local").glob("shard-*.tar")), sorted((tmp_path / "piped").glob("shard-*.tar"))):
        assert a.read_bytes() == b.read_bytes()  # the cache itself is the same, byte for byte
    # Every shard unreadable: the stage's usual one-line error, exit 2.
    r = CliRunner().invoke(app, ["cache-teacher", f"pipe:cat {shards}/missing-{{0..1}}.tar 2>/dev/null",
                                 "--out", str(tmp_path / "none"), "--teacher", tiny_teacher, "--quiet", "--workers", "0"])
    assert r.exit_code == 2 and "no valid sample" in r.output and "unreadable_shard" in r.output
