"""The Python API (hierdctl/api.py, docs/api.md): every command as a function, the whole
pipeline through it, the same checks and messages as the command line, a light import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import hierdctl
from conftest import image_bytes, make_shards
from hierdctl import api, configs
from hierdctl.cli import app
from hierdctl.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _cli_error(*args) -> str:
    """The one line a command exits 2 with, without its 'error: ' prefix."""
    r = CliRunner().invoke(app, [str(a) for a in args])
    lines = [line for line in r.output.strip().splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1, (r.exit_code, r.output)
    return lines[0].removeprefix("error: ")


def test_import_hierdctl_is_light_and_exposes_every_command_lazily():
    code = ("import sys, hierdctl; from hierdctl import embed, search, distill; heavy = [m for m in ('torch', "
            "'numpy', 'open_clip', 'faiss', 'PIL') if m in sys.modules]; print('heavy:' + ','.join(heavy)); "
            "print(embed.__module__, callable(search), distill.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    heavy, names = out.stdout.strip().splitlines()
    assert heavy == "heavy:", f"importing the API pulls in: {heavy}"
    assert names == "hierdctl.api True distill"
    assert set(hierdctl.API) <= set(dir(hierdctl)) and set(hierdctl.__all__) >= set(hierdctl.API)
    wanted = {"cache_teacher", "distill", "export", "eval_retrieval", "eval_zeroshot", "eval_grounding", "embed", "search"}
    assert wanted <= set(hierdctl.API)
    with pytest.raises(AttributeError):
        hierdctl.no_such_function
    from hierdctl.stages import distill as stage  # the package beside the function of the same name

    assert hasattr(stage, "run") and hierdctl.distill is api.distill


def test_every_function_documents_its_settings():
    for name in hierdctl.API:
        doc = getattr(hierdctl, name).__doc__
        cls, _ = api.STAGES[name]
        assert doc and f"hierdctl {name.replace('_', '-')}" in doc
        for f, _ in __import__("hierdctl.settings").settings.option_fields(cls):
            assert f"    {f.name} (" in doc, (name, f.name)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_teacher) -> dict:
    """The whole pipeline through the API: cache → distill → export → eval (with --html)."""
    d = tmp_path_factory.mktemp("api")
    src = make_shards(d / "data", n_shards=2, per_shard=4)
    cache = hierdctl.cache_teacher(src, out=d / "cache", teacher=tiny_teacher, views=1, clusters=2, max_phrases=2,
                                   chunker="textblob", workers=0, quiet=True)
    run = hierdctl.distill(str(d / "cache"), student="tiny-test", recipe="clip-kd", out=str(d / "run"), steps=4,
                           batch_size=4, lr=1e-3, warmup=1, workers=0, log_every=1, save_every=2, quiet=True)
    exp = hierdctl.export(d / "run", out=d / "export", quiet=True)
    student = f"local-dir:{d / 'export'}"
    report = hierdctl.eval_retrieval(src, model=[tiny_teacher, student], k=[1, 5], device="cpu", workers=0,
                                     quiet=True, html=d / "report.html", out=d / "report.json")
    return {"d": d, "src": src, "cache": cache, "run": run, "export": exp, "student": student, "report": report}


@pytest.mark.slow
def test_the_pipeline_through_the_api_returns_what_each_command_reports(pipeline, tiny_teacher):
    p, d = pipeline, pipeline["d"]
    assert p["cache"]["samples"] == 8 and p["cache"] == {**json.loads((d / "cache" / "manifest.json").read_text()),
                                                          "this_run": p["cache"]["this_run"]}
    assert p["run"]["steps"] == 4 and (d / "run" / "loss_curves.png").is_file()
    assert p["export"]["formats"] == ["open_clip"] and p["export"]["out"] == str(d / "export")
    assert json.loads((d / "report.json").read_text()) == json.loads(json.dumps(p["report"]))
    assert [m["spec"] for m in p["report"]["models"]] == [tiny_teacher, p["student"]]
    # The page found the student's distill run through its real export.json.
    page = (d / "report.html").read_text(encoding="utf-8")
    assert f'class="curves" data-model="{p["student"]}"' in page and "data:image/png;base64," in page


@pytest.mark.slow
def test_zeroshot_embed_index_search_and_scenes_through_the_api(pipeline, tiny_teacher, tmp_path):
    tree = tmp_path / "tree"
    for c, name in enumerate(["circle", "square"]):
        (tree / name).mkdir(parents=True)
        for j in range(2):
            (tree / name / f"{j}.png").write_bytes(image_bytes(10 * c + j, fmt="PNG"))
    zs = hierdctl.eval_zeroshot(str(tree), model=pipeline["student"], classnames="folders", templates="simple",
                                device="cpu", workers=0, quiet=True)
    assert zs["counts"]["images"] == 4 and "acc1" in zs["models"][0]["metrics"]
    # The config dataclass and keyword arguments are the same call.
    m1 = hierdctl.embed(pipeline["src"], model=pipeline["student"], out=tmp_path / "e1", device="cpu", workers=0,
                        quiet=True, dtype="fp32")
    m2 = hierdctl.embed(configs.EmbedConfig(source=pipeline["src"], model=pipeline["student"], out=tmp_path / "e2",
                                            device="cpu", workers=0, quiet=True, dtype="fp32"))
    assert m1["content_digest"] == m2["content_digest"] and m1["counts"]["rows"] == 8
    idx = hierdctl.index(tmp_path / "e1", index_type="hnsw", quiet=True)
    assert idx["kind"] == "hnsw" and idx["out"] == str(tmp_path / "e1" / "index")
    hits = hierdctl.search(tmp_path / "e1" / "index", text="a red circle next to a blue square", k=3, device="cpu")
    same = hierdctl.search(configs.SearchConfig(index=tmp_path / "e1" / "index", texts=["a red circle next to a blue "
                                                                                       "square"], k=3, device="cpu"))
    assert hits["queries"] == same["queries"] and len(hits["queries"][0]["results"]) == 3
    s = hierdctl.scenes(out=tmp_path / "scenes", n_train=3, n_test=2, shard_size=5)
    assert s["counts"]["train"] == 3 and (tmp_path / "scenes" / "scenes.json").is_file()
    g = hierdctl.eval_grounding(str(tmp_path / "scenes" / "test"), model=pipeline["student"], device="cpu",
                                workers=0, quiet=True)
    assert g["counts"]["images"] == 2 and 0 <= g["models"][0]["metrics"]["pointing_acc/all"] <= 1


def test_bad_input_raises_the_message_the_command_exits_with(tiny_teacher, tmp_path):
    src = make_shards(tmp_path / "data", n_shards=1, per_shard=2)
    (tmp_path / "emb").mkdir()
    cases = [
        (hierdctl.embed, dict(source=src, model="nope:x", out=tmp_path / "o"),
         ["embed", src, "--model", "nope:x", "--out", tmp_path / "o"]),
        (hierdctl.embed, dict(source=src, model=tiny_teacher, out=tmp_path / "o", modality="audio"),
         ["embed", src, "--model", tiny_teacher, "--out", tmp_path / "o", "--modality", "audio"]),
        (hierdctl.eval_retrieval, dict(source=src, model=[tiny_teacher], k="one"),
         ["eval-retrieval", src, "--model", tiny_teacher, "--k", "one"]),
        (hierdctl.eval_retrieval, dict(source=src, models=[tiny_teacher], index="lsh"),
         ["eval-retrieval", src, "--model", tiny_teacher, "--index", "lsh"]),
        (hierdctl.eval_grounding, dict(source=src, model=[tiny_teacher], batch_size=0),
         ["eval-grounding", src, "--model", tiny_teacher, "--batch-size", "0"]),
        (hierdctl.cache_teacher, dict(source=src, out=tmp_path / "c", teacher=tiny_teacher, views=0),
         ["cache-teacher", src, "--out", tmp_path / "c", "--teacher", tiny_teacher, "--views", "0"]),
        (hierdctl.distill, dict(cache=str(tmp_path), student="tiny-test", recipe="clip-kd", out=str(tmp_path / "r"),
                                steps=0), ["distill", tmp_path, "--student", "tiny-test", "--recipe", "clip-kd",
                                           "--out", tmp_path / "r", "--steps", "0"]),
        (hierdctl.distill, dict(cache=str(tmp_path), student="tiny-test", recipe="clip-kd", out=str(tmp_path / "r"),
                                steps=3, set=["nope=1"]), ["distill", tmp_path, "--student", "tiny-test", "--recipe",
                                                           "clip-kd", "--out", tmp_path / "r", "--steps", "3", "--set",
                                                           "nope=1"]),
        (hierdctl.export, dict(source=tmp_path / "no-run", out=tmp_path / "x"),
         ["export", tmp_path / "no-run", "--out", tmp_path / "x"]),
        (hierdctl.index, dict(embeddings=tmp_path / "emb", index_type="lsh"),
         ["index", tmp_path / "emb", "--index-type", "lsh"]),
        (hierdctl.search, dict(index=tmp_path, text=["x"], k=0), ["search", tmp_path, "--text", "x", "--k", "0"]),
        (hierdctl.scenes, dict(out=tmp_path / "s", flavour="watercolour"),
         ["scenes", "--out", tmp_path / "s", "--flavour", "watercolour"]),
        (hierdctl.eval_zeroshot, dict(source=str(tmp_path), model=["open_clip:NoSuchArch-1"]),
         ["eval-zeroshot", tmp_path, "--model", "open_clip:NoSuchArch-1"]),
    ]
    for fn, kw, argv in cases:
        with pytest.raises(UserError) as e:
            fn(**kw)
        assert str(e.value) == _cli_error(*argv), fn.__name__


def test_keyword_arguments_are_checked_like_options(tiny_teacher, tmp_path):
    checks = [
        (hierdctl.embed, dict(source="x", model=tiny_teacher, out=tmp_path, batch_size="many"), "--batch-size",
         "expected an integer"),
        (hierdctl.embed, dict(source="x", model=tiny_teacher, out=tmp_path, quiet="yes"), "--quiet", "True or False"),
        (hierdctl.embed, dict(source="x", out=tmp_path), "--model", "is required"),
        (hierdctl.embed, dict(model=tiny_teacher, out=tmp_path), "SOURCE", "is required"),
        (hierdctl.embed, dict(source="x", model=tiny_teacher, out=tmp_path, modalty="image"), "hierdctl.embed()",
         "(did you mean model, modality?)"),
        (hierdctl.eval_retrieval, dict(source="x", models=[tiny_teacher], ks=5), "--k", "cannot read 5"),
        (hierdctl.cache_teacher, dict(source="x", out=tmp_path, teacher=tiny_teacher, crop_scale="a,b"),
         "--crop-scale", "two numbers"),
        (hierdctl.search, dict(index=tmp_path, text=[3]), "--text", "a list of strings"),
    ]
    for fn, kw, where, needle in checks:
        with pytest.raises(UserError) as e:
            fn(**kw)
        assert e.value.where == where and needle in str(e.value), (kw, str(e.value))
    with pytest.raises(TypeError, match="not both"):
        hierdctl.embed(configs.EmbedConfig(source="x", model=tiny_teacher, out=tmp_path), quiet=True)
    with pytest.raises(TypeError, match="given twice"):
        hierdctl.embed("x", source="y", model=tiny_teacher, out=tmp_path)


def test_keywords_become_the_configs_the_command_line_builds(tmp_path):
    from hierdctl import settings

    cfg = api._config_from("cache_teacher", api.build_config("cache_teacher", None, dict(
        source="s", out=str(tmp_path), teacher=["local-dir:a", "local-dir:b"], crop_scale="0.5,0.9", image_col="img",
        randaugment=(3, 7))))
    cli = settings.from_values(configs.CacheTeacherConfig, dict(
        source="s", out=tmp_path, teacher=["local-dir:a", "local-dir:b"], crop_scale="0.5,0.9", image_col="img",
        randaugment="3,7"))
    assert cfg == cli and cfg.ensemble == ("local-dir:b",) and cfg.source_options.image_col == "img"
    cfg = api._config_from("eval_retrieval", api.build_config("eval_retrieval", None, dict(source="s", model="m:x",
                                                                                         k="1,5")))
    assert cfg.models == ["m:x"] and cfg.ks == [1, 5]
    assert isinstance(api._config_from("index", api.build_config("index", "dir", {})).embeddings, Path)
