"""eval-retrieval --html: the page, read as written and as headless Chromium renders it.

What each model shows for a query is checked against a brute-force ranking of the
embeddings --save-index keeps; hits, the metrics table, inline images and the loss curves of
an exported student are read from the DOM. Rendering needs Debian's `chromium` package
(apt-get install -y chromium); without it those tests skip, saying so."""

from __future__ import annotations

import html.parser
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import TINY_CFG, image_bytes, make_tiny_model, save_local_dir, write_tar
from hierdctl import checkpoint, html_report
from hierdctl.cli import app
from hierdctl.stages.eval_retrieval import EvalRetrievalConfig
from hierdctl.stages.eval_retrieval import run as retrieval_run

COLOURS = ["red", "green", "blue", "yellow", "black", "white", "pink", "grey", "brown", "orange"]
SHAPES = ["circle", "square"]


def _chromium() -> str | None:
    return shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, list[str], list[int]]:
    """10 images with 2 distinct captions each and one corrupt image; the captions in the order
    eval-retrieval embeds them and each caption's image."""
    d = tmp_path_factory.mktemp("html")
    samples, captions, owner = [], [], []
    for i in range(10):
        caps = [f"a {COLOURS[i]} {s} number {i}" for s in SHAPES]
        samples.append({"key": f"{i:04d}", "jpg": image_bytes(i), "txt": caps[0], "json": {"captions": caps}})
        captions += caps
        owner += [i, i]
        if i == 4:
            samples.append({"key": "broken", "jpg": b"not an image", "txt": "a broken image"})
    write_tar(d / "00000.tar", samples)
    return str(d / "00000.tar"), captions, owner


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> tuple[str, Path]:
    """An exported student as `hierdctl export` leaves it: export.json names the checkpoint of its
    distill run, whose folder holds config.resolved.yaml and loss_curves.png."""
    from PIL import Image

    root = tmp_path_factory.mktemp("student")
    run = root / "run"
    (run / checkpoint.CHECKPOINTS).mkdir(parents=True)
    checkpoint.write_config(run, {"recipe": "clip-kd", "steps": 2})
    Image.new("RGB", (40, 20), (200, 30, 30)).save(run / checkpoint.CURVES)
    export = save_local_dir(make_tiny_model(seed=1), TINY_CFG, root / "export")
    ck = (run / checkpoint.CHECKPOINTS / (checkpoint.stem(2) + ".safetensors")).resolve()
    (export / "export.json").write_text(json.dumps({"schema": "hierdctl.export/1", "checkpoint": {"path": str(ck),
                                                                                                  "step": 2}}))
    return f"local-dir:{export}", run


@pytest.fixture(scope="module")
def page(data, tiny_teacher, student, tmp_path_factory) -> tuple[Path, dict, Path]:
    d = tmp_path_factory.mktemp("page")
    report = retrieval_run(EvalRetrievalConfig(source=data[0], models=[tiny_teacher, student[0]], ks=[1, 5],
                                               device="cpu", quiet=True, workers=0, html=d / "report.html",
                                               html_queries=4, save_index=d / "idx"))
    return d / "report.html", report, d / "idx"


class _Page(html.parser.HTMLParser):
    """The structure the page promises (hierdctl/html_report.py): metrics headers, per query
    the caption and per model row its results' hit/miss marks, every img's src, the curves."""

    def __init__(self, text: str):
        super().__init__()
        self.headers, self.queries, self.srcs, self.curves, self.links = [], [], [], [], []
        self._in_th = self._in_caption = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "th" and "model" in cls:
            self._in_th, self._th = True, ""
        elif tag == "section" and "query" in cls:
            self.queries.append({"caption": "", "rows": []})
        elif tag == "div" and "caption" in cls:
            self._in_caption = True
        elif tag == "div" and "model-row" in cls:
            self.queries[-1]["rows"].append({"model": a["data-model"], "marks": []})
        elif tag == "figure" and "result" in cls:
            self.queries[-1]["rows"][-1]["marks"].append("hit" in cls)
        elif tag == "figure" and "curves" in cls:
            self.curves.append(a["data-model"])
        elif tag == "img":
            self.srcs.append(a.get("src", ""))
        if tag in ("a", "link", "script", "iframe") or "href" in a:
            self.links.append(tag)

    def handle_endtag(self, tag):
        if tag == "th" and self._in_th:
            self.headers.append(self._th.strip())
            self._in_th = False
        if tag == "div":
            self._in_caption = False

    def handle_data(self, text):
        if self._in_th:
            self._th += text
        if self._in_caption:
            self.queries[-1]["caption"] += text


def _expected_marks(idx: Path, caption: str, data, k: int) -> list[list[bool]]:
    """Per model: is each of its top-k images (brute force, ties to the lower id) the caption's own?"""
    _, captions, owner = data
    t = captions.index(caption.strip("“”"))
    out = []
    for m in json.loads((idx / "index.json").read_text())["models"]:
        img = np.load(idx / m["dir"] / "image_emb.npy")
        txt = np.load(idx / m["dir"] / "text_emb.npy")
        assert txt.shape[0] == len(captions)
        ranked = np.argsort(-(img @ txt[t]), kind="stable")[:k]
        out.append([int(i) == owner[t] for i in ranked])
    return out


def _check(dom: str, page, data, tiny_teacher, student) -> None:
    path, report, idx = page
    p = _Page(dom)
    assert p.headers == [f"reference: {tiny_teacher}", student[0]]
    assert len(p.queries) == 4
    for q in p.queries:
        assert [r["model"] for r in q["rows"]] == [tiny_teacher, student[0]]
        assert all(len(r["marks"]) == 5 for r in q["rows"])
        assert [r["marks"] for r in q["rows"]] == _expected_marks(idx, q["caption"], data, 5), q["caption"]
    hits = sum(m for q in p.queries for r in q["rows"] for m in r["marks"])
    assert dom.count(">✓</span>") == hits and dom.count(">✗</span>") == 4 * 2 * 5 - hits
    # Every image inline: 4 queries × (its own image + 2 models × 5), and the student's loss curves.
    assert len(p.srcs) == 4 * 11 + 1 and all(s.startswith("data:image/") for s in p.srcs)
    assert sum(s.startswith("data:image/png") for s in p.srcs) == 1
    assert p.curves == [student[0]] and not p.links
    for k, v in report["models"][1]["metrics"].items():
        assert f"{v:.4f}" in dom, k


def test_the_page_holds_each_models_ranking_hits_metrics_and_curves(page, data, tiny_teacher, student):
    path, report, _ = page
    assert report["html"] == {"path": str(path), "queries": 4}
    _check(path.read_text(encoding="utf-8"), page, data, tiny_teacher, student)


def test_headless_chromium_renders_the_page_with_the_same_content(page, data, tiny_teacher, student, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium): the page is not rendered")
    p = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run",
                        f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page[0].resolve().as_uri()],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "<section" in p.stdout, p.stdout[:500]
    _check(p.stdout, page, data, tiny_teacher, student)


def test_thumbnails_are_downscaled_jpegs(page):
    import base64
    import io

    from PIL import Image

    srcs = _Page(page[0].read_text(encoding="utf-8")).srcs
    jpegs = [s for s in srcs if s.startswith("data:image/jpeg;base64,")]
    assert len(jpegs) == 4 * 11
    for s in jpegs[:5]:
        im = Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1])))
        assert im.format == "JPEG" and max(im.size) <= html_report.THUMB


def test_loss_curves_are_found_only_for_exports_of_runs_that_have_them(student, tiny_teacher, tmp_path):
    spec, run = student
    found = html_report.loss_curves(spec)
    assert found is not None and found[0] == str(run.resolve()) and found[1].startswith("data:image/png;base64,")
    assert html_report.loss_curves(tiny_teacher) is None  # no export.json
    assert html_report.loss_curves("open_clip:RN50") is None
    other = tmp_path / "export"
    shutil.copytree(spec.split(":", 1)[1], other)
    m = json.loads((other / "export.json").read_text())
    m["checkpoint"]["path"] = str(tmp_path / "gone" / "checkpoints" / "step-0000002.safetensors")
    (other / "export.json").write_text(json.dumps(m))
    assert html_report.loss_curves(f"local-dir:{other}") is None  # its run is gone


def test_more_queries_than_captions_shows_every_caption_once(data, tiny_teacher, tmp_path):
    retrieval_run(EvalRetrievalConfig(source=data[0], models=[tiny_teacher], ks=[1], device="cpu", quiet=True,
                                      workers=0, html=tmp_path / "r.html", html_queries=1000))
    p = _Page((tmp_path / "r.html").read_text(encoding="utf-8"))
    assert sorted(q["caption"].strip("“”") for q in p.queries) == sorted(data[1])
    assert all(len(q["rows"]) == 1 and len(q["rows"][0]["marks"]) == 1 for q in p.queries)


@pytest.mark.parametrize("extra, needle", [
    (["--html", "{tmp}"], "is a directory"),
    (["--html", "{tmp}/missing/r.html"], "does not exist"),
    (["--html", "{tmp}/r.html", "--html-queries", "0"], "--html-queries"),
])
def test_bad_html_options_exit_2_in_one_line_before_any_model_loads(data, tiny_teacher, tmp_path, extra, needle):
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    r = CliRunner().invoke(app, ["eval-retrieval", data[0], "--model", tiny_teacher, "--quiet", *args])
    assert r.exit_code == 2 and needle in r.output and "--html" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()
