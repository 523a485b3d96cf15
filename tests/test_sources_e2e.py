"""Bad data end to end through the CLI: a decompression bomb (a PNG header claiming
100000x100000 pixels) and a caption that is not UTF-8 are skipped and counted by
`hierdctl cache-teacher` and `hierdctl eval-retrieval`, from a tar and from a CSV source;
the run goes on (exit 0) over the good images. Before, the bomb aborted both commands with
a DecompressionBombError traceback and the caption a UnicodeDecodeError one."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import CAPTIONS, image_bytes, write_tar
from hierdctl import cache_format
from hierdctl.cli import app
from test_sources_images import bomb_png

pytestmark = pytest.mark.slow

GOOD = 4


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def bad_sources(tmp_path_factory) -> dict[str, tuple[str, dict]]:
    """{kind: (SOURCE, the skips expected)}: GOOD good images and one bomb each; the CSV also
    has a row whose caption is Latin-1."""
    d = tmp_path_factory.mktemp("bad")
    samples = [{"key": f"{i:04d}", "jpg": image_bytes(i), "txt": CAPTIONS[i]} for i in range(GOOD)]
    samples.insert(2, {"key": "bomb", "png": bomb_png(), "txt": "a very large picture"})
    tar = write_tar(d / "00000.tar", samples)
    for i in range(GOOD):
        (d / f"{i}.jpg").write_bytes(image_bytes(i))
    (d / "bomb.png").write_bytes(bomb_png())
    rows = [f"{i}.jpg,{CAPTIONS[i]}\n".encode() for i in range(GOOD)]
    rows.insert(1, b"bomb.png,a very large picture\n")
    rows.insert(3, "0.jpg,caf\u00e9 au lait\n".encode("latin-1"))
    (d / "pairs.csv").write_bytes(b"image,caption\n" + b"".join(rows))
    return {"tar": (str(tar), {"decompression_bomb": 1}),
            "csv": (str(d / "pairs.csv"), {"decompression_bomb": 1, "undecodable_caption": 1})}


@pytest.mark.parametrize("kind", ["tar", "csv"])
def test_cache_teacher_skips_and_counts_a_bomb_and_an_undecodable_caption(bad_sources, kind, tiny_teacher, tmp_path):
    source, skipped = bad_sources[kind]
    out = tmp_path / "cache"
    r = _cli("cache-teacher", source, "--out", out, "--teacher", tiny_teacher, "--quiet", "--workers", "0",
             "--views", "1", "--clusters", "2", "--max-phrases", "1", "--chunker", "textblob")
    assert r.exit_code == 0, (r.output, r.exception)
    m = json.loads((out / cache_format.MANIFEST_NAME).read_text())
    assert m["complete"] and m["samples"] == GOOD
    assert m["skipped"] == skipped and m["skipped_total"] == sum(skipped.values())


@pytest.mark.parametrize("kind", ["tar", "csv"])
def test_eval_retrieval_skips_and_counts_a_bomb_and_an_undecodable_caption(bad_sources, kind, tiny_teacher, tmp_path):
    source, skipped = bad_sources[kind]
    out = tmp_path / "report.json"
    r = _cli("eval-retrieval", source, "--model", tiny_teacher, "--k", "1", "--device", "cpu", "--workers", "2",
             "--quiet", "--out", out)
    assert r.exit_code == 0, (r.output, r.exception)
    c = json.loads(out.read_text())["counts"]
    assert c["images"] == GOOD and c["skipped"] == skipped and c["skipped_total"] == sum(skipped.values())
