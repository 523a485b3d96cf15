"""What hierdctl writes, loaded as a new user loads it, in the project's environment (no shim):
transformers' zero-shot pipeline, sentence-transformers 6.x and CLIP_benchmark 1.6.2 on one
export folder, each matched against hierdctl's own numbers (its `local-dir:` encoder, eval-zeroshot,
eval-retrieval). The parity of CLIPModel and onnxruntime themselves: test_export_hf.py, test_export.py."""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import CAPTIONS, image_bytes, make_shards
from hierdctl.cli import app

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # a distill run and an export first, then each client (~1 min in all on 2 cores)
LABELS = ["circle", "square", "triangle"]
TEMPLATE = "This is a photo of {}."  # the zero-shot pipeline's default hypothesis template


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_teacher) -> Path:
    """A short distill run exported with `--format open_clip,onnx --format hf`: one folder for all."""
    from hierdctl.stages import distill as S
    from hierdctl.stages.cache_teacher import CacheTeacherConfig
    from hierdctl.stages.cache_teacher import run as cache_run

    d = tmp_path_factory.mktemp("clients")
    src = make_shards(d / "data", n_shards=1, per_shard=8)
    cache_run(CacheTeacherConfig(source=src, out=d / "cache", teacher=tiny_teacher, views=1, clusters=2,
                                 max_phrases=2, workers=0, quiet=True))
    S.run(S.resolve_config(dict(cache=str(d / "cache"), student="tiny-test", recipe="clip-kd", steps=2, batch_size=8,
                                lr=1e-3, warmup=1, workers=0, quiet=True, seed=5, out=str(d / "run"))))
    out = d / "model"
    r = _cli("export", d / "run", "--out", out, "--format", "open_clip,onnx", "--format", "hf", "--quiet")
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def ours(exported):
    """hierdctl's own encoder of the export (what eval-retrieval / eval-zeroshot use)."""
    from hierdctl.specs import load_encoder

    return load_encoder(f"local-dir:{exported}")


def _images():
    """Decoded RGB images whose centre-crop offsets at 32 px are whole (on a half offset torchvision's
    CenterCrop and transformers' crop differ by a pixel: docs/eval.md, known differences)."""
    from PIL import Image

    sizes = [(48, 40), (60, 50), (100, 50), (40, 48)]
    return [Image.open(io.BytesIO(image_bytes(20 + i, size=s))).convert("RGB") for i, s in enumerate(sizes)]


def _embed(enc, images=None, texts=None) -> torch.Tensor:
    with torch.no_grad():
        if images is not None:
            return enc.encode_image(torch.stack([enc.eval_transform(im) for im in images]))[0]
        return enc.encode_text(enc.tokenize(texts))[0]


def test_zero_shot_pipeline_matches_hierdctl(exported, ours, tmp_path):
    """pipeline("zero-shot-image-classification", model=DIR): its probabilities are hierdctl's
    (softmax of the student's logit scale × cosine), and its top-1 accuracy on a class-folder
    tree is eval-zeroshot's acc1 with the same prompt."""
    from transformers import AutoImageProcessor, pipeline

    from hierdctl.configs import EvalZeroshotConfig
    from hierdctl.stages.eval_zeroshot import run as zeroshot_run

    tree = tmp_path / "tree"
    truth = []
    for c, label in enumerate(LABELS):
        (tree / label).mkdir(parents=True)
        for j in range(2):
            (tree / label / f"{j}.jpg").write_bytes(image_bytes(10 * c + j, size=(48, 40)))
            truth.append((tree / label / f"{j}.jpg", label))
    (tmp_path / "prompt.txt").write_text(TEMPLATE.replace("{}", "{c}") + "\n")
    report = zeroshot_run(EvalZeroshotConfig(source=str(tree), models=[f"local-dir:{exported}"], classnames="folders",
                                             templates=str(tmp_path / "prompt.txt"), device="cpu", workers=0,
                                             quiet=True))
    # open_clip's pixels exactly: transformers' PIL backend (its default torchvision one rounds differently).
    exact = pipeline("zero-shot-image-classification", model=str(exported), device="cpu",
                     image_processor=AutoImageProcessor.from_pretrained(exported, backend="pil"))
    default = pipeline("zero-shot-image-classification", model=str(exported), device="cpu")
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p, _ in truth]
    text = _embed(ours, texts=[TEMPLATE.format(c) for c in LABELS])
    want = torch.softmax(ours.logit_scale * _embed(ours, images=images) @ text.T, dim=-1).numpy()  # (N,C)
    hits = 0
    for i, (image, (_, label)) in enumerate(zip(images, truth)):
        for pipe, atol in ((exact, 1e-6), (default, 1e-3)):
            got = {r["label"]: r["score"] for r in pipe(image, candidate_labels=LABELS, hypothesis_template=TEMPLATE)}
            np.testing.assert_allclose([got[c] for c in LABELS], want[i], atol=atol)
        hits += LABELS[int(np.argmax(want[i]))] == label
    assert report["models"][0]["metrics"]["acc1"] == pytest.approx(hits / len(truth))


def test_sentence_transformers_loads_the_folder_itself(exported, ours):
    """sentence-transformers 6.x: the plain SentenceTransformer(DIR) encodes images and text;
    normalize_embeddings=True gives hierdctl's embeddings (without it they are unnormalised)."""
    from sentence_transformers import SentenceTransformer

    images = _images()
    captions = CAPTIONS + [" ".join(["a long caption about a cat on a red sofa"] * 12)]  # truncated as open_clip does
    want_i, want_t = _embed(ours, images=images), _embed(ours, texts=captions)
    st = SentenceTransformer(str(exported), device="cpu", processor_kwargs={"backend": "pil"})
    got_i = st.encode(images, normalize_embeddings=True, convert_to_tensor=True)
    got_t = st.encode(captions, normalize_embeddings=True, convert_to_tensor=True)
    torch.testing.assert_close(got_i, want_i, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_t, want_t, atol=1e-6, rtol=0)
    raw = st.encode(captions[:2], convert_to_tensor=True)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(2), atol=1e-3)  # why docs/eval.md says normalize_embeddings
    plain = SentenceTransformer(str(exported), device="cpu")  # transformers' default image backend
    torch.testing.assert_close(plain.encode(images, normalize_embeddings=True, convert_to_tensor=True), want_i,
                               atol=1e-3, rtol=0)
    torch.testing.assert_close(plain.encode(captions, normalize_embeddings=True, convert_to_tensor=True), want_t,
                               atol=1e-6, rtol=0)


@pytest.mark.slow
def test_clip_benchmark_command_printed_by_scenes_works_as_printed(exported, tmp_path):
    """`hierdctl scenes --clip-benchmark` on a one-shard test split prints a command; run as
    printed (MODEL_DIR filled in), CLIP_benchmark's six recalls are eval-retrieval's."""
    from hierdctl.configs import EvalRetrievalConfig
    from hierdctl.stages.eval_retrieval import run as retrieval_run

    r = _cli("scenes", "--out", tmp_path / "scenes", "--n-train", "0", "--n-test", "24", "--image-size", "32",
             "--clip-benchmark")
    assert r.exit_code == 0, r.output
    (line,) = [x for x in r.output.splitlines() if x.startswith("CLIP_benchmark: ")]
    argv = shlex.split(line.removeprefix("CLIP_benchmark: ").replace("MODEL_DIR", str(exported)))
    assert argv[0] == "clip_benchmark" and json.loads((tmp_path / "scenes" / "scenes.json").read_text())[
        "clip_benchmark"]["shards"] == 1
    # The console script's own entry point, with this interpreter (the venv's bin/ may not be on PATH).
    entry = "import sys; from clip_benchmark.cli import main; sys.argv[0] = 'clip_benchmark'; sys.exit(main())"
    p = subprocess.run([sys.executable, "-c", entry, *argv[1:]], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    theirs = json.loads((tmp_path / "scenes_clip_benchmark.json").read_text())["metrics"]
    report = retrieval_run(EvalRetrievalConfig(source=str(tmp_path / "scenes" / "test"),
                                               models=[f"local-dir:{exported}"], ks=[1, 5, 10], device="cpu",
                                               workers=0, quiet=True))
    mine = report["models"][0]["metrics"]
    names = [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)]
    assert set(names) <= set(theirs)
    for name in names:
        assert theirs[name] == pytest.approx(mine[name], abs=1e-6), (name, theirs[name], mine[name])
