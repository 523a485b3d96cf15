"""export: checkpoint -> open_clip local dir -> open_clip gives the checkpoint's embeddings;
ONNX graphs agree with PyTorch at any batch size; the model card; atomic output; errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import CAPTIONS, TINY_CFG, image_bytes, make_shards
from hierdctl.cli import app
from hierdctl.errors import UserError
from hierdctl.stages import distill as S
from hierdctl.stages.cache_teacher import CacheTeacherConfig
from hierdctl.stages.cache_teacher import run as cache_run
from hierdctl.checkpoint import load_student as load_checkpoint
from hierdctl.configs import ExportConfig
from hierdctl.stages.export import run as export_run
import open_clip


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_teacher) -> dict:
    """A tiny cache and two short distill runs: same width as the teacher, and a wider
    student (48-d vs 32-d) that trains with projectors."""
    d = tmp_path_factory.mktemp("export")
    src = make_shards(d / "data", n_shards=1, per_shard=8)
    cache_run(CacheTeacherConfig(source=src, out=d / "cache", teacher=tiny_teacher, views=1, clusters=2,
                                 max_phrases=2, workers=0, quiet=True))
    base = dict(cache=str(d / "cache"), student="tiny-test", recipe="clip-rd", steps=3, batch_size=8, lr=1e-3,
                warmup=1, workers=0, quiet=True, log_every=1, seed=3, save_every=2)
    S.run(S.resolve_config(base | {"out": str(d / "run")}))
    wide = json.loads(json.dumps(TINY_CFG)) | {"embed_dim": 48}
    (d / "wide.json").write_text(json.dumps(wide))
    S.run(S.resolve_config(base | {"out": str(d / "wide"), "student": f"open_clip:{d / 'wide.json'}"}))
    return {"run": d / "run", "wide": d / "wide", "data": src, "teacher": tiny_teacher}


def _checkpoint_student(ckpt: Path, cfg: dict):
    """The student straight from the training checkpoint, independently of export."""
    from safetensors.torch import load_file

    sd = load_file(str(ckpt))
    model = open_clip.CLIP(**cfg)
    model.load_state_dict({k.removeprefix("student."): v for k, v in sd.items() if k.startswith("student.")})
    return model.eval()


def _inputs(preprocess, tokenizer, n=3):
    from PIL import Image
    import io

    images = torch.stack([preprocess(Image.open(io.BytesIO(image_bytes(i))).convert("RGB")) for i in range(n)])
    return images, tokenizer(CAPTIONS[:n])


def test_round_trip_checkpoint_local_dir_open_clip_same_embeddings(runs, tmp_path):
    out = tmp_path / "model"
    summary = export_run(ExportConfig(source=runs["run"], out=out, quiet=True))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "export.json", "open_clip_config.json",
                                                    "open_clip_model.safetensors"]
    assert summary["checkpoint"]["step"] == 3  # RUN_DIR means the latest checkpoint
    # open_clip itself, unchanged, loads the folder...
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()
    images, tokens = _inputs(preprocess, tokenizer)
    ref = _checkpoint_student(runs["run"] / "checkpoints" / "step-0000003.safetensors", TINY_CFG)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), ref.encode_image(images))
        assert torch.equal(model.encode_text(tokens), ref.encode_text(tokens))
    # ...with the student's preprocessing, and only the student's weights.
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["model_cfg"] == TINY_CFG and cfg["preprocess_cfg"]["size"] in (32, [32, 32])
    from safetensors.torch import load_file

    keys = load_file(str(out / "open_clip_model.safetensors")).keys()
    assert set(keys) == set(ref.state_dict())
    assert summary["dropped_keys"] and all(k.startswith("kappa") for k in summary["dropped_keys"])
    assert summary["checks"]["open_clip"] == {"image_max_abs_diff": 0.0, "text_max_abs_diff": 0.0}
    # The same folder through hierdctl's spec grammar.
    from hierdctl.specs import load_encoder

    enc = load_encoder(f"local-dir:{out}")
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_image(images)[0], torch.nn.functional.normalize(ref.encode_image(images), dim=-1))


def test_a_named_checkpoint_file_is_exported(runs, tmp_path):
    ck = runs["run"] / "checkpoints" / "step-0000002.safetensors"
    summary = export_run(ExportConfig(source=ck, out=tmp_path / "m2", quiet=True))
    assert summary["checkpoint"]["step"] == 2
    model, _, pre = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'm2'}")
    images, tokens = _inputs(pre, open_clip.get_tokenizer(f"local-dir:{tmp_path / 'm2'}"))
    with torch.no_grad():
        assert torch.equal(model.eval().encode_image(images), _checkpoint_student(ck, TINY_CFG).encode_image(images))


def test_onnx_parity_with_pytorch_at_other_batch_sizes(runs, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "all"
    summary = export_run(ExportConfig(source=runs["run"], out=out, format="all", quiet=True))
    for g in ("image", "text"):
        c = summary["checks"]["onnx"][g]
        assert c["max_abs_diff"] <= 1e-5 and c["check_batch"] != 2
    model, _, pre = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    img_sess = ort.InferenceSession(str(out / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    txt_sess = ort.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 6):
        images, tokens = _inputs(pre, open_clip.get_tokenizer(f"local-dir:{out}"), n)
        with torch.no_grad():
            want_i = model.encode_image(images, normalize=True).numpy()
            want_t = model.encode_text(tokens, normalize=True).numpy()
        got_i = img_sess.run(["image_embeds"], {"image": images.numpy()})[0]
        got_t = txt_sess.run(["text_embeds"], {"text": tokens.numpy()})[0]
        assert got_i.shape == (n, 32) and got_t.shape == (n, 32)
        np.testing.assert_allclose(got_i, want_i, atol=1e-5)
        np.testing.assert_allclose(got_t, want_t, atol=1e-5)
    # The text graph takes exactly the exported context length: export.json and the model card say so.
    L = model.context_length
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["checks"]["onnx"]["text"]["input_shape"] == ["batch", L]
    assert manifest["checks"]["onnx"]["text"]["input_dtype"] == "int64"
    assert f"exactly {L} tokens" in (out / "README.md").read_text()
    onnx_only = export_run(ExportConfig(source=runs["run"], out=tmp_path / "onnx", format="onnx", quiet=True))
    assert sorted(onnx_only["files"]) == ["README.md", "export.json", "image_encoder.onnx", "merges.txt",
                                          "text_encoder.onnx", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == sorted(onnx_only["files"])
    assert onnx_only["checks"]["tokenizer"]["ids_match"] and onnx_only["checks"]["tokenizer"]["context_length"] == L
    _onnx_graphs_come_with_the_tokenizer_files_they_need(runs, tmp_path / "onnx")


def _onnx_graphs_come_with_the_tokenizer_files_they_need(runs, out: Path):
    """A user with onnxruntime and transformers only: the folder's tokenizer files give the text
    graph its tokens, and the embeddings are open_clip's (the checkpoint's student)."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    captions = CAPTIONS + ["A LONG caption, with punctuation!! " * 20, "x"]
    ids = AutoTokenizer.from_pretrained(out)(captions, padding="max_length", truncation=True,
                                             return_tensors="np")["input_ids"]
    got = ort.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"text": ids})[0]
    ref = _checkpoint_student(runs["run"] / "checkpoints" / "step-0000003.safetensors", TINY_CFG)
    with torch.no_grad():
        want = ref.encode_text(open_clip.SimpleTokenizer()(captions), normalize=True).numpy()
    assert ids.dtype == np.int64 and ids.shape == (len(captions), 77)
    np.testing.assert_array_equal(ids, open_clip.SimpleTokenizer()(captions).numpy())
    np.testing.assert_allclose(got, want, atol=1e-5)
    card = (out / "README.md").read_text()
    assert "AutoTokenizer.from_pretrained('onnx')" in card and "library_name: onnx" in card


def test_wider_student_drops_its_projector_and_says_so(runs, tmp_path):
    out = tmp_path / "wide"
    summary = export_run(ExportConfig(source=runs["wide"], out=out, quiet=True))
    assert summary["projector_dropped"] and summary["embed_dim"] == 48
    assert {"img_proj.weight", "txt_proj.weight"} <= set(summary["dropped_keys"])
    model, _, pre = open_clip.create_model_and_transforms(f"local-dir:{out}")
    images, _ = _inputs(pre, open_clip.get_tokenizer(f"local-dir:{out}"))
    with torch.no_grad():
        assert model.eval().encode_image(images).shape == (3, 48)  # the student's own embedding
    card = (out / "README.md").read_text()
    assert "projector is *not* exported" in card and "48-d" in card


def test_model_card_carries_teacher_recipe_data_steps_and_metrics(runs, tmp_path):
    from hierdctl.stages.eval_retrieval import EvalRetrievalConfig
    from hierdctl.stages.eval_retrieval import run as eval_run

    first = tmp_path / "m"
    export_run(ExportConfig(source=runs["run"], out=first, quiet=True))
    report = tmp_path / "report.json"
    eval_run(EvalRetrievalConfig(source=runs["data"], models=[runs["teacher"], f"local-dir:{first}"], ks=[1, 5],
                                 device="cpu", out=report, quiet=True))
    r = _cli("export", runs["run"], "--out", first, "--report", report, "--overwrite", "--quiet", "--license", "mit")
    assert r.exit_code == 0, r.output
    card = (first / "README.md").read_text()
    teacher = runs["teacher"]
    teacher_name = Path(teacher.split(":", 1)[1]).name
    for needle in (f"| teacher | `local-dir:{teacher_name}`", "`clip-rd`", "vrd", "| steps | 3 |",
                   "teacher cache `cache`", "8 samples", "image_retrieval_recall@1", "**(this model)**",
                   "`local-dir:m` **(this model)**", "max abs difference", "run/checkpoints/step-0000003.safetensors"):
        assert needle in card, needle
    # Hugging Face front matter, the model's name as the title, and no path of this machine.
    import yaml

    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "open_clip" and meta["pipeline_tag"] == "zero-shot-image-classification"
    assert meta["license"] == "mit" and {"clip", "open_clip", "hierdctl"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local teacher has no hub repository to point at
    assert card.split("---\n", 2)[2].lstrip().startswith("# m\n")
    for local in (str(Path(runs["run"]).parent), str(tmp_path), str(Path.cwd())):
        assert local not in card, local
    assert card.index("## Evaluation") < card.index("## Use")
    manifest = json.loads((first / "export.json").read_text())
    assert manifest["teacher"]["spec"] == teacher and manifest["training"]["batch_size"] == 8
    assert manifest["license"] == "mit" and manifest["layout"] == 2


def test_model_card_paths_and_base_model():
    from hierdctl.stages.export import hub_id, public

    assert public("local-dir:/data/x/model") == "local-dir:model"
    assert public("/data/caches/cc3m") == "cc3m" and public("runs/cache") == "runs/cache"
    assert public("open_clip:ViT-B-16//ckpts/b16.pt") == "open_clip:ViT-B-16/b16.pt"
    assert public("open_clip:/cfg/m.json//w/m.safetensors") == "open_clip:m.json/m.safetensors"
    assert public("open_clip:ViT-B-16/laion400m_e32") == "open_clip:ViT-B-16/laion400m_e32"
    assert public("https://host/data/{000..009}.tar") == "https://host/data/{000..009}.tar"
    assert public("/d/shards/{00000..00009}.tar") == "{00000..00009}.tar"
    assert hub_id("hf:openai/clip-vit-base-patch16") == "openai/clip-vit-base-patch16"
    assert hub_id("open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K") == "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    tag = open_clip.get_pretrained_cfg("ViT-B-16", "laion400m_e32")["hf_hub"]
    assert hub_id("open_clip:ViT-B-16/laion400m_e32") == "/".join(tag.strip("/").split("/")[:2])
    for local in ("local-dir:/x/teacher", "open_clip:ViT-B-16//x/b16.pt", "open_clip:ViT-B-16", "hf:/x/clip",
                  "open_clip:ViT-B-16/no-such-tag", None, "teacher"):
        assert hub_id(local) is None, local


def test_output_is_atomic_and_never_clobbers(runs, tmp_path, monkeypatch):
    out = tmp_path / "m"
    export_run(ExportConfig(source=runs["run"], out=out, quiet=True))
    before = (out / "export.json").read_text()
    with pytest.raises(UserError, match="--overwrite"):
        export_run(ExportConfig(source=runs["run"], out=out, quiet=True))
    # A failure half-way leaves the previous export intact and no temporary folder behind.
    from hierdctl.stages import export as E

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(E, "write_onnx", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(ExportConfig(source=runs["run"], out=out, format="all", overwrite=True, quiet=True))
    assert (out / "export.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not written by hierdctl"):
        export_run(ExportConfig(source=runs["run"], out=foreign, overwrite=True, quiet=True))
    assert (foreign / "notes.txt").exists()
    # An export.json of some other tool (no hierdctl schema tag) does not make the folder ours.
    (foreign / "export.json").write_text(json.dumps({"exported_by": "another tool"}))
    with pytest.raises(UserError, match="not written by hierdctl"):
        export_run(ExportConfig(source=runs["run"], out=foreign, overwrite=True, quiet=True))
    assert sorted(p.name for p in foreign.iterdir()) == ["export.json", "notes.txt"]


# ----------------------------------------------------------------------------------
# publish_dir (hierdctl/cache_format.py): the atomic folder both export and --save-index use
# ----------------------------------------------------------------------------------


def _writer(text: str):
    def write(tmp: Path) -> None:
        (tmp / "data.txt").write_text(text)
        (tmp / "m.json").write_text(json.dumps({"schema": "test/1"}))

    return write


def test_publish_dir_replaces_only_its_own_folders(tmp_path):
    from hierdctl.atomic import publish_dir

    out = tmp_path / "out"
    publish_dir(out, _writer("one"), marker="m.json", schema="test/1", where="--x")
    with pytest.raises(UserError, match="--overwrite") as e:
        publish_dir(out, _writer("two"), marker="m.json", schema="test/1", where="--x")  # overwrite defaults off
    assert e.value.where == "--x" and (out / "data.txt").read_text() == "one"
    publish_dir(out, _writer("two"), marker="m.json", schema="test/1", where="--x", overwrite=True)
    assert (out / "data.txt").read_text() == "two"
    with pytest.raises(UserError, match="not written by hierdctl"):  # same marker name, another schema
        publish_dir(out, _writer("three"), marker="m.json", schema="test/2", where="--x", overwrite=True)
    assert (out / "data.txt").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_published_folders_get_the_users_permissions_not_private_ones(tmp_path):
    import os
    import stat

    from hierdctl.atomic import publish_dir

    def write(d):
        (d / "sub").mkdir()
        (d / "sub" / "w.bin").write_bytes(b"x")
        os.chmod(d / "sub" / "w.bin", 0o600)  # as safetensors writes its files
        _writer("one")(d)

    old = os.umask(0o022)
    try:
        publish_dir(tmp_path / "out", write, marker="m.json", schema="test/1", where="--x")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "out") == 0o755 and mode(tmp_path / "out" / "sub") == 0o755
    assert mode(tmp_path / "out" / "sub" / "w.bin") == 0o644 and mode(tmp_path / "out" / "m.json") == 0o644


def test_publish_dir_ignores_leftovers_and_cleans_up_after_a_failure(tmp_path, monkeypatch):
    import os

    from hierdctl import atomic

    out = tmp_path / "out"
    atomic.publish_dir(out, _writer("one"), marker="m.json", schema="test/1", where="--x")
    # Leftovers under the names the old code derived from the PID: no collision, left alone.
    for name in (f".out.tmp-{os.getpid()}", f".out.old-{os.getpid()}"):
        (tmp_path / name).write_text("someone's leftover")
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    # write() fails: the temporary folder goes, the old folder stays.
    with pytest.raises(RuntimeError, match="disk full"):
        atomic.publish_dir(out, lambda tmp: (_ for _ in ()).throw(RuntimeError("disk full")), marker="m.json",
                           schema="test/1", where="--x", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == leftovers and (out / "data.txt").read_text() == "one"
    # Where the file system has no RENAME_EXCHANGE (the old folder is moved aside first): the
    # rename of the new folder into place fails after the old one moved aside: it is put back.
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise OSError("rename failed")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(OSError, match="rename failed"):
        atomic.publish_dir(out, _writer("two"), marker="m.json", schema="test/1", where="--x", overwrite=True)
    monkeypatch.setattr(atomic.os, "replace", real)
    assert len(calls) == 3  # old aside, new in (fails), old back
    assert sorted(p.name for p in tmp_path.iterdir()) == leftovers and (out / "data.txt").read_text() == "one"
    atomic.publish_dir(out, _writer("two"), marker="m.json", schema="test/1", where="--x", overwrite=True)
    assert (out / "data.txt").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == leftovers
    monkeypatch.undo()  # with RENAME_EXCHANGE (tmpfs, ext4, ...): one swap, the same result
    atomic.publish_dir(out, _writer("three"), marker="m.json", schema="test/1", where="--x", overwrite=True)
    assert (out / "data.txt").read_text() == "three" and sorted(p.name for p in tmp_path.iterdir()) == leftovers


def test_relative_cache_paths_resolve_against_the_run_dir(tmp_path, monkeypatch):
    from hierdctl.checkpoint import StudentCheckpoint as Checkpoint
    from hierdctl.stages.export import _training_and_data, cache_dir

    def manifest(folder: Path, n: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "manifest.json").write_text(json.dumps({"samples": n, "captions": n, "source": {"spec": f"s{n}"}}))

    run, cwd = tmp_path / "run", tmp_path / "cwd"
    manifest(run / "cache", 11)
    manifest(cwd / "cache", 22)
    manifest(cwd, 33)  # ./manifest.json: what str(Path("")) == "." used to read
    monkeypatch.chdir(cwd)
    ck = lambda meta, run_dir=run: Checkpoint(run / "x.safetensors", meta, {}, [], run_dir)  # noqa: E731
    assert _training_and_data(ck({}))[1] == {}  # no meta["data"]: no data, not ./manifest.json
    assert _training_and_data(ck({"data": ""}))[1] == {}
    assert cache_dir(ck({"data": "cache"})) == run / "cache"
    assert _training_and_data(ck({"data": "cache"}))[1]["samples"] == 11  # not the CWD's 22
    assert _training_and_data(ck({"data": "cache"}, None))[1] == {}  # no run dir: cannot be placed
    assert _training_and_data(ck({"data": str(cwd / "cache")}))[1]["samples"] == 22  # absolute: as given


def test_cli_export_errors_exit_2(runs, tmp_path):
    r = _cli("export", tmp_path / "nothing", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "does not exist" in r.output
    (tmp_path / "empty").mkdir()
    r = _cli("export", tmp_path / "empty", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "not a hierdctl distill run dir" in r.output
    for bad in (["--format", "tflite"], ["--format", "open_clip,tflite"], ["--format", "onnx,"],
                ["--format", "onnx", "--format", "tflite"], ["--license", "MIT License"], ["--license", ""]):
        r = _cli("export", runs["run"], "--out", tmp_path / "o", *bad)
        flag = bad[0]
        assert r.exit_code == 2 and flag in r.output and r.output.count("\n") <= 2, (bad, r.output)
        assert "Traceback" not in r.output
    r = _cli("export", runs["run"], "--out", tmp_path / "o", "--report", tmp_path / "missing.json")
    assert r.exit_code == 2 and "--report" in r.output
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((runs["run"] / "checkpoints" / "step-0000003.safetensors").read_bytes())
    r = _cli("export", lone, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "no sibling lone.json" in r.output
    r = _cli("export", runs["run"], "--out", tmp_path / "ok", "--format", "all", "--quiet")
    assert r.exit_code == 0, r.output
    assert "onnx image vs torch" in r.output
    for atol in ("0", "-1e-4", "nan"):
        r = _cli("export", runs["run"], "--out", tmp_path / "o", "--atol", atol)
        assert r.exit_code == 2 and "--atol" in r.output, (atol, r.output)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime", "transformers"])
def test_onnx_format_without_onnx_installed_is_a_user_error_before_any_work(runs, tmp_path, monkeypatch, missing):
    import importlib.util

    from hierdctl.stages import export as E

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    monkeypatch.setattr(E.checkpoint, "load_student", lambda *a, **k: pytest.fail("work started"))
    for fmt in ("onnx", "all"):
        r = _cli("export", runs["run"], "--out", tmp_path / "o", "--format", fmt)
        assert r.exit_code == 2 and "--format" in r.output and missing in r.output, r.output
        assert r.output.count("\n") <= 2
    assert not (tmp_path / "o").exists()
    ExportConfig(source=runs["run"], out=tmp_path / "o", format="open_clip").validate()  # open_clip needs neither


def test_model_configs_are_registered_through_specs(runs):
    from hierdctl.specs import register_model_config

    ck = load_checkpoint(runs["run"])
    a = register_model_config(open_clip, ck.meta["model_cfg"])
    assert a == register_model_config(open_clip, json.loads(json.dumps(ck.meta["model_cfg"])))  # by content
    assert open_clip.factory._MODEL_CONFIGS[a] == ck.meta["model_cfg"]
    assert open_clip.factory._MODEL_CONFIGS[a] is not ck.meta["model_cfg"]  # a copy
    with pytest.raises(UserError, match="not an open_clip model config"):
        register_model_config(open_clip, {"embed_dim": 32}, where="RUN_DIR")


def test_load_checkpoint_splits_student_and_training_only_keys(runs):
    ck = load_checkpoint(runs["wide"])
    assert ck.meta["model_cfg"]["embed_dim"] == 48
    assert not any(k.startswith("student.") for k in ck.student)
    assert "visual.conv1.weight" in ck.student and "img_proj.weight" in ck.dropped
