"""distill end to end on a tiny cache: every recipe trains, resume equals no interruption,
torchrun with 2 processes equals 1 process, and every pre-flight check fails cleanly."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_shards
from hierdctl.cli import app
from hierdctl.errors import UserError
from hierdctl.stages import distill as S
from hierdctl.stages.cache_teacher import CacheTeacherConfig
from hierdctl.stages.cache_teacher import run as cache_run

RECIPES = ["clip", "clip-kd", "tinyclip", "clip-rd", "hierd", "hierd+rd"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_teacher) -> Path:
    d = tmp_path_factory.mktemp("distill")
    src = make_shards(d / "data", n_shards=2, per_shard=8)
    cache_run(CacheTeacherConfig(source=src, out=d / "cache", teacher=tiny_teacher, views=2, clusters=4,
                                 max_phrases=3, workers=0, quiet=True))
    return d / "cache"


def _cfg(cache: Path, out: Path, **kw) -> S.DistillConfig:
    base = dict(cache=str(cache), student="tiny-test", recipe="clip-rd", out=str(out), steps=6, batch_size=8,
                lr=1e-3, warmup=1, workers=0, quiet=True, log_every=1, seed=1)
    return S.resolve_config(base | kw)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_trains_and_its_loss_falls(cache, tmp_path, recipe):
    # One global batch = the whole (16-sample) cache, so every step sees the same pairs
    # and the weighted loss must go down.
    out = tmp_path / recipe
    summary = S.run(_cfg(cache, out, recipe=recipe, steps=15, batch_size=16, lr=2e-3, warmup=1))
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 16))
    assert rows[-1]["loss"] < rows[0]["loss"], (recipe, rows[0]["loss"], rows[-1]["loss"])
    terms = {k for k in rows[0] if k.endswith("_loss")}
    from hierdctl.losses.registry import load_recipe

    assert terms == {t.key for t in load_recipe(recipe).terms}
    assert (out / "loss_curves.png").stat().st_size > 1000
    assert (out / "config.resolved.yaml").exists()
    assert Path(summary["checkpoint"]).exists()


def test_student_equal_to_teacher_gives_zero_relational_terms(cache, tmp_path):
    # The tiny teacher is tiny-test initialised with seed 0: with seed 0 the student starts
    # as an exact copy, so at step 1 every teacher-matching term is zero (to fp16 storage).
    out = tmp_path / "same"
    S.run(_cfg(cache, out, recipe="hierd+rd", steps=1, seed=0, warmup=0))
    first = _metrics(out)[0]
    for term in ("crd_loss", "fd_loss", "hierd_clu_clu_loss", "hierd_clu_img_loss", "hierd_phr_phr_loss",
                 "hierd_phr_cap_loss", "hierd_clu_phr_loss", "hierd_phr_img_loss", "hierd_clu_cap_loss"):
        assert abs(first[term]) < 2e-3, (term, first[term])
    # XRD compares C = κ·vt·tsᵀ with D = κ·tt·vsᵀ = Cᵀ here: zero only for a symmetric C.
    assert first["xrd_loss"] > 1e-3
    assert first["clip_loss"] > 0.1  # the task loss is not a teacher-matching term


def test_resume_reproduces_the_uninterrupted_run(cache, tmp_path, monkeypatch):
    full, part = tmp_path / "full", tmp_path / "part"
    S.run(_cfg(cache, full, steps=10, save_every=4))
    real_save = S.checkpoint.save

    def save_then_die(out, step, *a, **k):
        path = real_save(out, step, *a, **k)
        if step == 4:
            raise KeyboardInterrupt  # as if killed right after the step-4 checkpoint
        return path

    monkeypatch.setattr(S.checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        S.run(_cfg(cache, part, steps=10, save_every=4))
    monkeypatch.setattr(S.checkpoint, "save", real_save)
    summary = S.run(_cfg(cache, part, steps=10, save_every=4, resume=True))
    assert summary["resumed_from"] == 4
    a, b = _metrics(full), _metrics(part)
    assert [r["step"] for r in b] == list(range(1, 11))
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=0, atol=1e-6)
    from safetensors.torch import load_file

    wa = load_file(str(full / "checkpoints" / "step-0000010.safetensors"))
    wb = load_file(str(part / "checkpoints" / "step-0000010.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoints_are_atomic_and_pruned(cache, tmp_path):
    out = tmp_path / "ck"
    S.run(_cfg(cache, out, steps=7, save_every=2, keep_checkpoints=2))
    d = out / "checkpoints"
    assert json.loads((d / "latest.json").read_text())["step"] == 7
    assert sorted(p.name for p in d.glob("step-*.json")) == ["step-0000006.json", "step-0000007.json"]
    assert not list(d.glob(".*tmp"))
    meta = json.loads((d / "step-0000007.json").read_text())
    assert meta["model_cfg"]["embed_dim"] == 32 and meta["recipe"] == "clip-rd" and meta["step"] == 7
    state = torch.load(d / "step-0000007.state.pt", weights_only=True)  # loadable without pickle code
    assert state["step"] == 7


def test_existing_run_needs_resume_or_overwrite(cache, tmp_path):
    out = tmp_path / "again"
    S.run(_cfg(cache, out, steps=2))
    with pytest.raises(UserError, match="--resume"):
        S.run(_cfg(cache, out, steps=2))
    with pytest.raises(UserError, match="lr"):
        S.run(_cfg(cache, out, steps=4, lr=5e-4, resume=True))
    with pytest.raises(UserError, match="steps 2 → 4"):  # another length is another cosine schedule
        S.run(_cfg(cache, out, steps=4, resume=True))
    assert S.run(_cfg(cache, out, steps=2, overwrite=True))["steps"] == 2


def test_projector_when_widths_differ(cache, tmp_path):
    cfg_path = tmp_path / "wide.json"
    cfg = json.loads((Path(S.__file__).parents[1] / "hierdctl" / "model_configs" / "tiny-test.json").read_text())
    cfg["embed_dim"] = 48
    cfg_path.write_text(json.dumps(cfg))
    summary = S.run(_cfg(cache, tmp_path / "proj", student=f"open_clip:{cfg_path}", recipe="clip-kd", steps=2))
    assert any("projector" in n for n in summary["notes"])
    from safetensors.torch import load_file

    w = load_file(summary["checkpoint"])
    assert w["img_proj.weight"].shape == (32, 48) and w["txt_proj.weight"].shape == (32, 48)
    # hierd-v1's terms all compare the student with itself (CRD, relational KLs): no projector needed.
    summary = S.run(_cfg(cache, tmp_path / "noproj", student=f"open_clip:{cfg_path}", recipe="hierd-v1", steps=2))
    assert not any("projector" in n for n in summary["notes"])
    assert not any(k.startswith(("img_proj", "txt_proj")) for k in load_file(summary["checkpoint"]))
    # hierd (v2) distils features and parts in the teacher's space: it needs one.
    summary = S.run(_cfg(cache, tmp_path / "v2proj", student=f"open_clip:{cfg_path}", recipe="hierd", steps=2))
    assert any("projector" in n for n in summary["notes"])
    assert load_file(summary["checkpoint"])["img_proj.weight"].shape == (32, 48)


def test_nan_loss_stops_naming_the_term(cache, tmp_path, monkeypatch):
    from hierdctl.losses import registry

    real = registry.compute_terms

    def poisoned(recipe, f):
        out = real(recipe, f)
        out["fd_loss"] = out["fd_loss"] * float("nan")
        return out

    monkeypatch.setattr(registry, "compute_terms", poisoned)
    with pytest.raises(S.TrainingDiverged, match="fd_loss"):
        S.run(_cfg(cache, tmp_path / "nan", recipe="clip-kd", steps=3))


def test_global_batch_sampler_partitions_each_global_batch():
    one = list(S.GlobalBatchSampler(20, 8, 0, 1, seed=3, start_step=0, total_steps=5))
    r0 = list(S.GlobalBatchSampler(20, 8, 0, 2, seed=3, start_step=0, total_steps=5))
    r1 = list(S.GlobalBatchSampler(20, 8, 1, 2, seed=3, start_step=0, total_steps=5))
    assert [a + b for a, b in zip(r0, r1)] == one
    assert len({i for i, _ in one[0] + one[1]}) == 16  # an epoch has no repeats (2 steps/epoch)
    assert [e for _, e in one[2]][0] == 1  # step 2 starts epoch 1
    assert list(S.GlobalBatchSampler(20, 8, 0, 1, seed=3, start_step=3, total_steps=5)) == one[3:]


def test_config_file_and_set_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.01\nbatch-size: 32\nview_policy: sequential\n")
    cfg = S.resolve_config(dict(cache="c", student="s", recipe="clip", out="o", steps=3, lr=0.02), str(f),
                           ["warmup=5", "exp_scales=true"])
    assert (cfg.lr, cfg.batch_size, cfg.warmup, cfg.exp_scales, cfg.view_policy) == (0.02, 32, 5, True, "sequential")
    with pytest.raises(UserError, match="unknown setting 'learning_rate'"):
        S.resolve_config(dict(cache="c", student="s", recipe="clip", out="o", steps=3), None, ["learning_rate=1"])
    with pytest.raises(UserError, match="--steps"):
        S.resolve_config(dict(cache="c", student="s", recipe="clip", out="o")).validate()  # run() validates once


def _cli(*args):
    return CliRunner().invoke(app, list(args))


def test_cli_preflight_errors_exit_2(cache, tmp_path):
    base = ["distill", str(cache), "--out", str(tmp_path / "r"), "--steps", "2", "--batch-size", "8", "--quiet"]
    r = _cli(*base, "--student", "tiny-test", "--recipe", "no-such-recipe")
    assert r.exit_code == 2 and "no-such-recipe" in r.output
    r = _cli(*base, "--student", "NoSuchArch-99", "--recipe", "clip")
    assert r.exit_code == 2 and "--student" in r.output
    r = _cli(*base, "--student", "tiny-test", "--recipe", "clip", "--set", "nonsense=1")
    assert r.exit_code == 2 and "nonsense" in r.output
    r = _cli("distill", str(tmp_path), "--out", str(tmp_path / "r"), "--steps", "2", "--student", "tiny-test", "--recipe", "clip")
    assert r.exit_code == 2 and "not a hierdctl teacher cache" in r.output
    r = _cli(*base, "--student", "tiny-test", "--recipe", "clip", "--batch-size", "64")
    assert r.exit_code == 2 and "fewer than one global batch" in r.output
    r = _cli("distill", "--list-recipes")
    assert r.exit_code == 0 and "clip-rd" in r.output and "hierd" in r.output


def test_recipe_needing_what_the_cache_lacks(tmp_path, tiny_teacher):
    src = make_shards(tmp_path / "data", n_shards=1, per_shard=8)
    cache_run(CacheTeacherConfig(source=src, out=tmp_path / "flat", teacher=tiny_teacher, clusters=0, max_phrases=0,
                                 workers=0, quiet=True))
    with pytest.raises(UserError, match="clusters.*phrases|--clusters"):
        S.run(_cfg(tmp_path / "flat", tmp_path / "r", recipe="hierd"))
    manifest = json.loads((tmp_path / "flat" / "manifest.json").read_text())
    manifest["schema_version"] = 999
    (tmp_path / "flat" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="schema version 999"):
        S.run(_cfg(tmp_path / "flat", tmp_path / "r", recipe="clip"))


@pytest.mark.dist
@pytest.mark.slow
def test_torchrun_two_processes_match_one(cache, tmp_path):
    args = ["distill", str(cache), "--student", "tiny-test", "--recipe", "hierd+rd", "--steps", "4", "--batch-size", "8",
            "--lr", "1e-3", "--warmup", "1", "--workers", "0", "--log-every", "1", "--seed", "1", "--quiet"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HIERDCTL_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "hierdctl.cli"]
    p = subprocess.run(cmd + args + ["--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    S.run(_cfg(cache, tmp_path / "one", recipe="hierd+rd", steps=4))
    a, b = _metrics(tmp_path / "ddp"), _metrics(tmp_path / "one")
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-4)
    for k in (k for k in a[-1] if k.endswith("_loss")):
        assert a[-1][k] == pytest.approx(b[-1][k], rel=1e-3, abs=1e-5), k


def test_trimmed_text_encoding_equals_open_clip():
    # Phrases are encoded up to the batch's last real token: exact for a causal, EOT-pooled tower.
    from conftest import make_tiny_model

    from hierdctl.student import encode_text_trimmed
    import open_clip

    model = make_tiny_model().eval()
    tok = open_clip.get_tokenizer("ViT-B-32")
    text = tok(["a red circle", "two dogs playing with a yellow ball in the park", ""])
    assert (text[:, 16:] == 0).all()  # so the trimmed forward really is shorter
    with torch.no_grad():
        full, trimmed = model.encode_text(text), encode_text_trimmed(model, text)
        torch.testing.assert_close(trimmed, full, rtol=1e-5, atol=1e-5)
        model.text_pool_type = "last"  # pooling at position L-1 depends on the padding: no trimming
        torch.testing.assert_close(encode_text_trimmed(model, text), model.encode_text(text), rtol=0, atol=0)
    grad = torch.zeros(())
    model.text_pool_type = "argmax"
    encode_text_trimmed(model, text).sum().backward()
    assert model.token_embedding.weight.grad is not None and model.token_embedding.weight.grad.abs().sum() > grad


def test_other_clip_kd_terms_train_end_to_end(cache, tmp_path):
    # MFD (masked forward), GD (gradient distillation) and AFD (fusion layers) through the real loop.
    recipe = tmp_path / "kd-extras.yaml"
    recipe.write_text("terms:\n  - {name: clip, weight: 1.0}\n  - {name: mfd, weight: 2000.0}\n"
                      "  - {name: gd, weight: 1e8}\n  - {name: afd, weight: 1.0}\n")
    out = tmp_path / "extras"
    summary = S.run(_cfg(cache, out, recipe=str(recipe), steps=3))
    rows = _metrics(out)
    assert {"clip_loss", "mfd_loss", "gd_loss", "afd_loss"} <= set(rows[-1])
    assert all(np.isfinite(r["loss"]) for r in rows)
    from safetensors.torch import load_file

    w = load_file(summary["checkpoint"])
    assert w["img_fusion.weight"].shape == (32, 64)  # Linear(D_s + D_t, D_s), kept beside the student


def test_mfd_masks_patches_for_real():
    # The masked forward must not see the dropped patches: changing them leaves img_st_masked unchanged.
    from conftest import make_tiny_model

    from hierdctl.student import StudentWrapper

    w = StudentWrapper(make_tiny_model(), 32, 32, fields=("img_s", "txt_s", "img_st_masked"), mask_ratio=0.75).eval()
    G = w.grid[0] * w.grid[1]  # 16 patches of 8×8 px
    noise = torch.rand(2, G)
    batch = {"image": torch.randn(2, 3, 32, 32), "text": torch.randint(1, 100, (2, 77)), "mask_noise": noise}
    with torch.no_grad():
        f = w(batch)
        dropped = noise.argsort(dim=1)[:, 4:]  # round(16 · 0.25) = 4 kept
        img = batch["image"].clone()
        for n in range(2):
            for g in dropped[n].tolist():
                r, c = divmod(g, w.grid[1])
                img[n, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = 5.0
        g2 = w(batch | {"image": img})
    torch.testing.assert_close(g2.img_st_masked, f.img_st_masked)
    assert not torch.allclose(g2.img_s, f.img_s)  # the unmasked forward does see them
    assert not torch.allclose(f.img_st_masked, f.img_s)


def test_afd_fuses_the_second_caption_of_real_plus_synthetic():
    """caption_policy real+synthetic: the second pass (the synthetic caption) has its own fused text
    feature and shares the image's, so AFD computes on it (it read the fusion before it was set)."""
    from conftest import make_tiny_model

    from hierdctl.losses.registry import Recipe, Term, compute_terms
    from hierdctl.student import StudentWrapper

    recipe = Recipe("afd", (Term("clip", 1.0), Term("afd", 1.0)))
    w = StudentWrapper(make_tiny_model(), 32, 32, fields=recipe.fields)
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    second = {"text": torch.randint(1, 100, (2, 77)), "txt_t": unit(torch.randn(2, 32))}
    batch = {"image": torch.randn(2, 3, 32, 32), "text": torch.randint(1, 100, (2, 77)), "img_t": unit(torch.randn(2, 32)),
             "txt_t": unit(torch.randn(2, 32)), "logit_scale_t": 17.5, "second": second}
    f = w(batch)
    assert f.second is not None and f.second.img_fused is f.img_fused
    txt2 = w.student.encode_text(second["text"])
    torch.testing.assert_close(f.second.txt_fused, w.txt_fusion(torch.cat([unit(txt2), second["txt_t"]], dim=-1)),
                               rtol=1e-4, atol=1e-5)
    assert not torch.allclose(f.second.txt_fused, f.txt_fused)
    assert torch.isfinite(compute_terms(recipe, f.second)["afd_loss"])


@pytest.mark.slow
def test_a_narrow_student_exports_an_embedding_that_was_trained(tmp_path):
    """A student narrower than its teacher (64 vs the shipped Scenes teacher's 128) gets a
    projector for the teacher-matching terms only: the CLIP task loss trains its own embedding,
    the one export ships. Its retrieval must be far above chance and close to the same student
    trained at the teacher's width (before the fix: 0.008 against 0.66, chance 0.016)."""
    from hierdctl.stages.scenes import ScenesConfig
    from hierdctl.stages.scenes import run as scenes_run
    from hierdctl.stages.eval_retrieval import EvalRetrievalConfig
    from hierdctl.stages.eval_retrieval import run as eval_run
    from hierdctl.stages.export import ExportConfig
    from hierdctl.stages.export import run as export_run

    n = 64
    scenes_run(ScenesConfig(out=tmp_path / "data", n_train=n, n_test=0, image_size=32, shard_size=n,
                            captions_per_image=1, seed=3).validate())
    src = str(tmp_path / "data" / "train")
    teacher = Path(__file__).parents[1] / "examples" / "teacher"
    cache_run(CacheTeacherConfig(source=src, out=tmp_path / "cache", teacher=f"local-dir:{teacher}", views=1,
                                 clusters=0, max_phrases=0, workers=0, quiet=True))
    base = json.loads((Path(S.__file__).parents[1] / "hierdctl" / "model_configs" / "tiny-test.json").read_text())
    base["text_cfg"]["context_length"] = 32
    r1 = {}
    for width in (128, 64):
        (tmp_path / f"s{width}.json").write_text(json.dumps(base | {"embed_dim": width}))
        run_dir = tmp_path / f"run{width}"
        S.run(_cfg(tmp_path / "cache", run_dir, student=f"open_clip:{tmp_path / f's{width}.json'}", recipe="clip-kd",
                   steps=60, batch_size=32, lr=3e-3, warmup=5, seed=0))
        export_run(ExportConfig(source=run_dir, out=tmp_path / f"model{width}", quiet=True))
        report = eval_run(EvalRetrievalConfig(source=src, models=[f"local-dir:{tmp_path / f'model{width}'}"],
                                              ks=[1, 5], workers=0, quiet=True))
        m = report["models"][0]["metrics"]
        r1[width] = (m["image_retrieval_recall@1"] + m["text_retrieval_recall@1"]) / 2
    chance = 1 / n
    assert r1[64] > 5 * chance, r1  # trained, not the untouched embedding behind a projector
    assert r1[64] > 0.6 * r1[128], r1  # and about as good as the student without a projector


def test_the_logit_scale_still_learns_at_its_cap(cache, tmp_path):
    """open_clip's rule: the parameter is clamped to ≤ ln 100 after each step. Clamping exp()
    in the forward instead passed no gradient once s reached 100 (exp(ln 100) > 100 in float)."""
    import math

    from conftest import make_tiny_model

    from hierdctl.losses import functional as L
    from hierdctl.student import StudentWrapper

    w = StudentWrapper(make_tiny_model(), 32, None)
    with torch.no_grad():
        w.student.logit_scale.fill_(math.log(100))
    batch = {"image": torch.randn(4, 3, 32, 32), "text": torch.randint(1, 100, (4, 77))}
    f = w(batch)
    L.clip_loss(f.img_s, f.txt_s, f.logit_scale_s).backward()
    assert w.student.logit_scale.grad.abs().item() > 0
    # ...and a run keeps the parameter at or below the cap whatever the optimizer does.
    summary = S.run(_cfg(cache, tmp_path / "cap", recipe="clip", steps=3, lr=5.0, warmup=1, grad_clip=None))
    from safetensors.torch import load_file

    assert load_file(summary["checkpoint"])["student.logit_scale"].item() <= math.log(100) + 1e-6


def test_perturbations_and_cluster_crops_reach_the_student(tmp_path, tiny_teacher):
    """cache-teacher --perturbations/--cluster-crops -> the cache reader -> the student wrapper:
    the student encodes each caption's perturbations; the crops' teacher embeddings arrive."""
    from hierdctl import cache_format
    from hierdctl.student import StudentWrapper

    src = make_shards(tmp_path / "data", n_shards=1, per_shard=6)
    cache_run(CacheTeacherConfig(source=src, out=tmp_path / "cache", teacher=tiny_teacher, views=1, clusters=3,
                                 max_phrases=2, perturbations=2, cluster_crops=True, workers=0, quiet=True))
    cache = cache_format.open_cache(tmp_path / "cache")
    assert cache.has("perturbations") and cache.has("cluster_crops")
    samples = list(cache_format.read_shard(cache.shards[0]))
    by_caption = {c: p for s in samples for c, p in zip(s.meta["captions"], s.meta["perturbations"])}
    assert by_caption["a red circle next to a blue square"] == ["a red square next to a blue circle",
                                                              "a blue square next to a red circle"]
    for s in samples:
        n = [len(p) for p in s.meta["perturbations"]]
        assert s.arrays["neg_mask"].sum(axis=1).tolist() == n and s.arrays["neg_emb"].shape[1] == 2
        live = s.arrays["clu_count"][0] > 0
        assert (np.abs(s.arrays["clu_crop_emb"][0][live]).sum(axis=1) > 0).all()
        assert (s.arrays["clu_crop_emb"][0][~live] == 0).all()
    from conftest import make_tiny_model
    import open_clip

    model = make_tiny_model()
    io = {"image_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3, "tokenize": open_clip.get_tokenizer("ViT-B-32"),
          "eval_transform": lambda img: torch.zeros(3, 32, 32), "grid_size": 16}
    needs = {"global": True, "clusters": True, "phrases": False, "perturbations": True, "cluster_crops": True,
             "mask_noise": False}
    ds = cache_format.CacheDataset(cache, cache_format.check_shards(cache), 0, "random", "random", io, needs)
    batch = torch.utils.data.default_collate([ds[(i, 0)] for i in range(4)])
    batch |= {"logit_scale_t": 10.0, "teacher_grid": (4, 4)}
    w = StudentWrapper(model, 32, 32, fields=("img_s", "txt_s", "neg_s", "neg_st", "neg_t", "neg_mask", "clu_crop_t"))
    f = w(batch)
    assert f.neg_s.shape == (4, 2, 32) and f.neg_t.shape == (4, 2, 32) and f.clu_crop_t.shape == (4, 3, 32)
    assert f.neg_st is f.neg_s or torch.equal(f.neg_st, f.neg_s)  # same width: no projector
    assert (f.neg_s[~f.neg_mask] == 0).all() and (f.neg_s[f.neg_mask].abs().sum(-1) > 0).all()


def test_warmup_auto_fits_the_run_and_an_impossible_one_is_refused(cache, tmp_path):
    import yaml

    # auto = min(10,000, 10% of the run): 20 steps -> 2, announced and recorded.
    summary = S.run(_cfg(cache, tmp_path / "auto", steps=20, warmup="auto"))
    assert summary["warmup_steps"] == 2 and any("warm-up 2 steps of 20" in n for n in summary["notes"])
    resolved = yaml.safe_load((tmp_path / "auto" / "config.resolved.yaml").read_text())
    assert resolved["warmup"] == "auto" and resolved["warmup_steps"] == 2 and resolved["total_steps"] == 20
    assert S.DistillConfig("c", "s", "r", "o", steps=10**6).resolve_warmup(10**6) == 10_000
    assert S.DistillConfig("c", "s", "r", "o").warmup == "auto"  # the default
    # An explicit warm-up as long as the run would never reach --lr: exit 2 naming --warmup, before any step.
    r = _cli("distill", str(cache), "--student", "tiny-test", "--recipe", "clip", "--out", str(tmp_path / "long"),
             "--steps", "5", "--warmup", "5", "--batch-size", "8", "--workers", "0", "--quiet")
    assert r.exit_code == 2 and "--warmup" in r.output and "never reach --lr" in r.output, r.output
    assert not (tmp_path / "long" / "checkpoints").exists()
    r = _cli("distill", str(cache), "--student", "tiny-test", "--recipe", "clip", "--out", str(tmp_path / "x"),
             "--warmup", "soon", "--steps", "5")
    assert r.exit_code == 2 and "--warmup" in r.output, r.output
    r = _cli("distill", str(cache), "--student", "tiny-test", "--recipe", "clip", "--out", str(tmp_path / "x"),
             "--epochs", "inf")
    assert r.exit_code == 2 and "--epochs" in r.output and "Traceback" not in r.output, r.output


OPEN_CLIP_SCALARS = {"train/loss", "train/lr", "train/scale", "train/samples_per_second"}  # open_clip's train.py


def test_report_to_tensorboard_writes_open_clips_names_and_the_hyperparameters(cache, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = tmp_path / "tb"
    S.run(_cfg(cache, out, recipe="clip-kd", steps=4, report_to="tensorboard"))
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    terms = {"train/clip_loss", "train/crd_loss", "train/icl_loss", "train/fd_loss"}
    assert tags == OPEN_CLIP_SCALARS | terms | {"train/epoch", "train/skipped_samples"}, tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    rows = _metrics(out)  # metrics.jsonl stays, with the same numbers under its own names
    for tag, key in (("train/fd_loss", "fd_loss"), ("train/scale", "logit_scale"), ("train/lr", "lr"),
                     ("train/samples_per_second", "samples_per_s")):
        assert [e.value for e in acc.Scalars(tag)] == pytest.approx([r[key] for r in rows], rel=1e-6), tag
    # The hyperparameters, in the run's own event file (TensorBoard's HPARAMS tab), with its metrics.
    start = plugin_data_pb2.HParamsPluginData.FromString(
        acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content).session_start_info
    hp = {k: v.string_value or v.number_value or v.bool_value for k, v in start.hparams.items()}
    assert hp["recipe"] == "clip-kd" and hp["lr"] == pytest.approx(1e-3) and hp["batch_size"] == 8
    assert hp["total_steps"] == 4 and hp["warmup_steps"] == 1 and hp["cache"] == str(cache)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        acc.SummaryMetadata("_hparams_/experiment").plugin_data.content).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"train/loss", "train/lr"}
    assert sorted(p.name for p in (out / "tensorboard").iterdir())[0].startswith("events.out.tfevents.")
    assert (out / "loss_curves.png").exists()


def test_report_to_takes_a_list_and_bad_reporters_exit_2_naming_the_flag(cache, tmp_path, monkeypatch):
    import importlib.util

    assert _cfg(cache, tmp_path / "a", report_to="wandb,tensorboard").reporters == ("wandb", "tensorboard")
    assert _cfg(cache, tmp_path / "a", report_to=["tensorboard", "wandb,tensorboard"]).reporters == (
        "tensorboard", "wandb")
    assert _cfg(cache, tmp_path / "a").reporters == ()
    given = {"cache": str(cache), "student": "tiny-test", "recipe": "clip", "out": str(tmp_path / "a"), "steps": 2}
    yaml_list = S.resolve_config(given, None, ["report_to=[tensorboard, wandb]"])  # --set / --config: a YAML list
    assert yaml_list.report_to == "tensorboard,wandb" and yaml_list.validate().reporters == ("tensorboard", "wandb")
    with pytest.raises(UserError, match="unknown reporter 'mlflow'"):
        S.resolve_config(given, None, ["report_to=tensorboard,mlflow"]).validate()
    base = ["distill", str(cache), "--student", "tiny-test", "--recipe", "clip", "--out", str(tmp_path / "r"),
            "--steps", "2", "--batch-size", "8", "--workers", "0", "--quiet"]
    for bad in (["mlflow"], ["tensorboard,"], ["none,wandb"], ["tensorboard", "--report-to", "neptune"]):
        r = _cli(*base, "--report-to", *bad)
        assert r.exit_code == 2 and "--report-to" in r.output and r.output.count("\n") <= 2, (bad, r.output)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    r = _cli(*base, "--report-to", "tensorboard,wandb")
    assert r.exit_code == 2 and "--report-to" in r.output and "hierdctl[wandb]" in r.output, r.output
    assert not (tmp_path / "r").exists()


def _wandb_records(path: Path) -> list:
    """The records of a W&B offline run file (run-ID.wandb): LevelDB's log format (32 KiB blocks;
    each record a 7-byte header crc32c(4) length(2, little-endian) type(1: full, 2-4: first, middle,
    last) and its bytes) after W&B's 7-byte header, each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or (kind == 0 and length == 0):  # a block's zero-filled tail
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            out.append(r)
            buf = b""
    return out


def _wandb_run(folder: Path) -> dict:
    import json as _json

    (f,) = folder.glob("run-*.wandb")
    run, history = None, {}
    for r in _wandb_records(f):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = r.run
        elif kind == "history":
            history[r.history.step.num] = {(i.key or "/".join(i.nested_key)): _json.loads(i.value_json)
                                           for i in r.history.item}
    config = {(i.key or "/".join(i.nested_key)): _json.loads(i.value_json) for i in run.config.update}
    return {"id": run.run_id, "name": run.display_name, "project": run.project, "config": config, "history": history}


@pytest.mark.slow
def test_report_to_wandb_offline_and_a_resumed_run_continues_its_wandb_run(cache, tmp_path, monkeypatch):
    """--report-to tensorboard,wandb with WANDB_MODE=offline: no network (a base URL that cannot
    answer), the same scalars under the same names, the hyperparameters as the W&B config; a run
    stopped by an error closes its W&B run, and its resume logs into the same W&B run id."""
    import yaml

    wandb_dir = tmp_path / "wandb-files"
    wandb_dir.mkdir()
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(wandb_dir),
                 "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_PROJECT": "hierdctl-test",
                 "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache")
                 }.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    real_point = S.faults.point

    def stop_at_3(name):
        if name == "distill:step:3":
            raise RuntimeError("stopped at step 3")
        real_point(name)

    monkeypatch.setattr(S.faults, "point", stop_at_3)
    with pytest.raises(RuntimeError, match="stopped at step 3"):
        S.run(_cfg(cache, out, recipe="clip-kd", steps=4, save_every=2, report_to="tensorboard,wandb"))
    monkeypatch.setattr(S.faults, "point", real_point)
    S.run(_cfg(cache, out, recipe="clip-kd", steps=4, save_every=2, report_to=["tensorboard", "wandb"], resume=True))

    run_id = yaml.safe_load((out / "config.resolved.yaml").read_text())["wandb_run_id"]
    folders = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(run_id) for f in folders)
    first, second = (_wandb_run(f) for f in folders)
    assert first["id"] == second["id"] == run_id and first["name"] == "run" and first["project"] == "hierdctl-test"
    assert sorted(first["history"]) == [1, 2] and sorted(second["history"]) == [3, 4]
    rows = {r["step"]: r for r in _metrics(out)}
    history = first["history"] | second["history"]
    for step, logged in history.items():
        assert OPEN_CLIP_SCALARS | {"train/fd_loss"} <= set(logged), logged
        assert logged["train/loss"] == pytest.approx(rows[step]["loss"], rel=1e-6)
        assert logged["train/scale"] == pytest.approx(rows[step]["logit_scale"], rel=1e-6)
    assert second["config"]["lr"] == 1e-3 and second["config"]["recipe"] == "clip-kd"
    assert second["config"]["total_steps"] == 4


def test_a_cache_without_images_joins_its_source_by_key(tmp_path, tiny_teacher):
    """--no-store-images + distill --images SOURCE: the same training as a cache with images (the
    source may have moved); an image that changed since caching is counted, never trained on."""
    import shutil

    src = make_shards(tmp_path / "data", n_shards=2, per_shard=8)
    kw = dict(views=2, clusters=0, max_phrases=0, workers=0, quiet=True)
    cache_run(CacheTeacherConfig(source=src, out=tmp_path / "with", teacher=tiny_teacher, **kw))
    cache_run(CacheTeacherConfig(source=src, out=tmp_path / "without", teacher=tiny_teacher, store_images=False, **kw))
    with_bytes = sum(p.stat().st_size for p in (tmp_path / "with").glob("*.tar"))
    without_bytes = sum(p.stat().st_size for p in (tmp_path / "without").glob("*.tar"))
    assert without_bytes < with_bytes
    r = _cli("distill", str(tmp_path / "without"), "--student", "tiny-test", "--recipe", "clip-kd", "--out",
             str(tmp_path / "r0"), "--steps", "2", "--batch-size", "8", "--workers", "0", "--quiet")
    assert r.exit_code == 2 and "--images" in r.output, r.output
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "data", moved)
    a = S.run(_cfg(tmp_path / "with", tmp_path / "a", recipe="clip-kd", steps=4))
    b = S.run(_cfg(tmp_path / "without", tmp_path / "b", recipe="clip-kd", steps=4,
                   images=str(moved / "{00000..00001}.tar")))
    assert [r["loss"] for r in _metrics(tmp_path / "a")] == [r["loss"] for r in _metrics(tmp_path / "b")]
    assert a["skipped_samples"] == b["skipped_samples"] == 0
    # One source image replaced after caching: that sample is skipped and counted, by name.
    from conftest import image_bytes, write_tar

    samples = [{"key": f"{i:09d}", "jpg": image_bytes(100 + i if i == 3 else i), "txt": "a photo"} for i in range(8)]
    write_tar(moved / "00000.tar", samples)
    c = S.run(_cfg(tmp_path / "without", tmp_path / "c", recipe="clip-kd", steps=2, batch_size=16,
                   images=str(moved / "{00000..00001}.tar")))
    assert c["skipped_samples"] >= 1 and any("image_mismatch" in x for x in c["skipped_examples"]), c
    with pytest.raises(UserError, match="units"):
        S.run(_cfg(tmp_path / "without", tmp_path / "d", steps=2, images=str(moved / "00000.tar")))


def test_a_teacher_ensemble_is_cached_and_distilled(tmp_path, tiny_teacher):
    """cache-teacher --teacher A --teacher B stores both teachers' global embeddings (B is 48-d,
    A 32-d); distill averages their softmaxes for CRD and runs FD/ICL through a projector per
    teacher; a term naming one teacher uses it alone."""
    from conftest import make_tiny_model, save_local_dir

    from hierdctl import cache_format

    cfg48 = json.loads(json.dumps(__import__("conftest").TINY_CFG)) | {"embed_dim": 48}
    second = f"local-dir:{save_local_dir(make_tiny_model(cfg48, seed=1), cfg48, tmp_path / 'b')}"
    src = make_shards(tmp_path / "data", n_shards=1, per_shard=8)
    r = _cli("cache-teacher", src, "--out", str(tmp_path / "cache"), "--teacher", tiny_teacher, "--teacher", second,
             "--views", "2", "--clusters", "2", "--max-phrases", "0", "--workers", "0", "--quiet")
    assert r.exit_code == 0, r.output
    cache = cache_format.open_cache(tmp_path / "cache")
    assert [t["embed_dim"] for t in cache.teachers] == [32, 48] and cache.manifest["teacher"]["embed_dim"] == 32
    assert cache.teachers[0]["fingerprint"] != cache.teachers[1]["fingerprint"]
    s = next(cache_format.read_shard(cache.shards[0]))
    assert s.arrays["img_emb"].shape == (2, 32) and s.arrays["img_emb_t1"].shape == (2, 48)
    assert s.arrays["txt_emb_t1"].shape == (1, 48) and "clu_emb_t1" not in s.arrays
    from hierdctl.specs import load_encoder

    enc = load_encoder(second, "cpu")
    with torch.no_grad():
        want = enc.encode_text(enc.tokenize(s.meta["captions"]))[0].numpy()
    np.testing.assert_allclose(s.arrays["txt_emb_t1"], want, atol=2e-3)  # fp16 storage
    summary = S.run(_cfg(tmp_path / "cache", tmp_path / "run", recipe="clip-kd", steps=3))
    assert any("ensemble of 2" in n for n in summary["notes"])
    from safetensors.torch import load_file

    w = load_file(summary["checkpoint"])
    assert "ens_img_proj.0.weight" in w and w["ens_img_proj.0.weight"].shape == (48, 32)
    assert "img_proj.weight" not in w  # teacher 0 has the student's width: no projector
    one = tmp_path / "one.yaml"
    one.write_text("terms:\n  - {name: clip, weight: 1}\n  - {name: crd, weight: 1, args: {teacher: 1}}\n"
                   "  - {name: fd, weight: 100, args: {teacher: 1}}\n")
    S.run(_cfg(tmp_path / "cache", tmp_path / "run1", recipe=str(one), steps=2))
    bad = tmp_path / "bad.yaml"
    bad.write_text("terms:\n  - {name: crd, weight: 1, args: {teacher: 2}}\n")
    with pytest.raises(UserError, match="teacher 2"):
        S.run(_cfg(tmp_path / "cache", tmp_path / "run2", recipe=str(bad), steps=2))


def _fresh_cli(*args: str):
    return subprocess.run([sys.executable, "-m", "hierdctl.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)


TINY_COCA = {"embed_dim": 32, "custom_text": True,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8,
                            "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
             "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                          "embed_cls": True, "output_tokens": True},
             "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                                "attn_pooler_heads": 2}}


@pytest.mark.slow
def test_synthetic_captions_from_a_coca_captioner(tmp_path, tiny_teacher):
    """cache-teacher --captioner (a tiny random CoCa saved locally: the path is real, its captions
    are noise) adds N generated captions per image after the real ones, embedded by the teacher;
    they are the same on a rerun; distill can train on them, or on real+synthetic per step."""
    from conftest import save_local_dir

    from hierdctl import cache_format
    from hierdctl.specs import register_model_config
    import open_clip

    oc = open_clip
    torch.manual_seed(0)
    coca = oc.create_model(register_model_config(oc, TINY_COCA, "test-tiny-coca"))
    g = torch.Generator().manual_seed(0)  # weights from a generator of its own: the same in every worker
    with torch.no_grad():
        for p in coca.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    captioner = f"local-dir:{save_local_dir(coca, TINY_COCA, tmp_path / 'coca')}"
    src = make_shards(tmp_path / "data", n_shards=1, per_shard=4)
    args = ["cache-teacher", src, "--teacher", tiny_teacher, "--captioner", captioner, "--synthetic-captions", "2",
            "--views", "1", "--clusters", "0", "--max-phrases", "2", "--workers", "0", "--quiet"]
    # cache-teacher in a fresh process: the random CoCa's sampling depended on what earlier tests
    # in the same worker had left behind (CI saw NaN probabilities twice in four runs)
    assert _fresh_cli(*args, "--out", str(tmp_path / "cache")).returncode == 0
    cache = cache_format.open_cache(tmp_path / "cache")
    assert cache.has("synthetic") and cache.manifest["captioner"]["per_image"] == 2
    samples = list(cache_format.read_shard(cache.shards[0]))
    for s in samples:
        real = s.meta["real_captions"]
        assert real == 1 and 1 <= len(s.meta["captions"]) - real <= 2
        assert s.arrays["txt_emb"].shape[0] == len(s.meta["captions"]) == len(s.meta["phrases"])
    assert _fresh_cli(*args, "--out", str(tmp_path / "again")).returncode == 0  # seeded per image: the same captions
    again = list(cache_format.read_shard(cache_format.open_cache(tmp_path / "again").shards[0]))
    assert [s.meta["captions"] for s in samples] == [s.meta["captions"] for s in again]
    for policy in ("synthetic", "any", "real+synthetic"):
        summary = S.run(_cfg(tmp_path / "cache", tmp_path / policy, recipe="clip-kd", steps=2, batch_size=4,
                             caption_policy=policy))
        assert summary["steps"] == 2
    afd = tmp_path / "afd.yaml"  # AFD fuses each of the two captions with its teacher embedding
    afd.write_text("terms:\n  - {name: clip, weight: 1.0}\n  - {name: afd, weight: 1.0}\n")
    summary = S.run(_cfg(tmp_path / "cache", tmp_path / "afd", recipe=str(afd), steps=2, batch_size=4,
                         caption_policy="real+synthetic"))
    assert summary["steps"] == 2 and math.isfinite(summary["final"]["afd_loss"])
    with pytest.raises(UserError, match="caption_policy"):  # real+synthetic averages global terms only
        S.run(_cfg(tmp_path / "cache", tmp_path / "h", recipe="hierd", steps=1, caption_policy="real+synthetic"))


def test_a_schema_1_cache_still_trains_and_another_version_is_refused(cache, tmp_path):
    """Schema 2 added per-shard sha256; a version-1 cache (no digests) still reads, with size and
    count checks; an unknown version is one line asking to rebuild."""
    import shutil

    old = tmp_path / "v1"
    shutil.copytree(cache, old)
    m = json.loads((old / "manifest.json").read_text())
    m["schema_version"] = 1
    for s in m["shards"]:
        s.pop("sha256", None)
    (old / "manifest.json").write_text(json.dumps(m))
    # ... as version 1 wrote its own records too: its config and done-markers (the manifest is checked against them)
    c = json.loads((old / "cache-config.json").read_text())
    (old / "cache-config.json").write_text(json.dumps(c | {"schema_version": 1}))
    for p in old.glob("shard-*.done.json"):
        d = json.loads(p.read_text())
        d.pop("sha256", None)
        p.write_text(json.dumps(d))
    assert S.run(_cfg(old, tmp_path / "run", steps=2))["steps"] == 2
    r = _cli("cache-info", str(old), "--verify")
    assert r.exit_code == 0 and "verified" in r.output, r.output
    m["schema_version"] = 99
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="schema version 99.*rebuild"):
        S.run(_cfg(old, tmp_path / "run2", steps=2))


def test_streaming_a_cache_resumes_exactly_and_reads_urls(cache, tmp_path, monkeypatch):
    """--cache-reader stream: shards read in order (per-epoch shard shuffle, a shuffle buffer),
    every sample of an epoch at most once, resume equal to the uninterrupted run; a cache given
    as a file: URL streams the same batches."""
    kw = dict(cache_reader="stream", shuffle_buffer=4, steps=8, batch_size=4, save_every=3)
    full = S.run(_cfg(cache, tmp_path / "full", **kw))
    assert any("streaming the cache" in n for n in full["notes"])
    real_save = S.checkpoint.save

    def save_then_die(out, step, *a, **k):
        path = real_save(out, step, *a, **k)
        if step == 3:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(S.checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        S.run(_cfg(cache, tmp_path / "part", **kw))
    monkeypatch.setattr(S.checkpoint, "save", real_save)
    assert S.run(_cfg(cache, tmp_path / "part", resume=True, **kw))["resumed_from"] == 3
    a, b = _metrics(tmp_path / "full"), _metrics(tmp_path / "part")
    assert [r["step"] for r in b] == list(range(1, 9))
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=0, atol=1e-6)
    url = S.run(_cfg(f"file:{cache}", tmp_path / "url", **kw))
    np.testing.assert_allclose([r["loss"] for r in _metrics(tmp_path / "url")], [r["loss"] for r in a],
                               rtol=0, atol=1e-6)
    assert url["steps"] == 8
    # Within one epoch no sample repeats; across the run the streamed order differs from random access.
    from hierdctl import cache_format

    c = cache_format.open_cache(cache)
    st = cache_format.CacheStream(c, None, 1, 0, 1, 4, 4, seed=1)
    st.ds = type("D", (), {"build": lambda self, smp, i, e: {"index": i, "image": 0}})()
    st.epoch = 0
    seen = [x["index"] for x in st]
    assert len(seen) == len(set(seen)) == st.steps_per_epoch(0) * 4 and st.steps_per_epoch(0) == 4
    with pytest.raises(UserError, match="--workers"):
        S.run(_cfg(cache, tmp_path / "part", resume=True, workers=2, **kw))


def test_a_cache_served_over_http_streams(cache, tmp_path, no_proxy):
    """A cache on a web server (an http.server on 127.0.0.1, stopped at the end): its manifest is
    fetched, its shards streamed through curl; the run equals the local streamed run."""
    from conftest import http_server

    with http_server(cache) as url:
        kw = dict(steps=4, batch_size=4, shuffle_buffer=4)
        S.run(_cfg(url, tmp_path / "http", **kw))  # auto: a URL is streamed
        S.run(_cfg(cache, tmp_path / "local", cache_reader="stream", **kw))
        assert [r["loss"] for r in _metrics(tmp_path / "http")] == [r["loss"] for r in _metrics(tmp_path / "local")]
        with pytest.raises(UserError, match="--cache-reader"):
            S.run(_cfg(url, tmp_path / "x", cache_reader="random", **kw))


def test_a_captioner_sampling_non_finite_probabilities_gives_that_image_no_caption():
    """A (random or broken) CoCa whose top-p sampling meets NaN/inf probabilities gives that
    image no synthetic caption and is counted, instead of ending cache-teacher with a traceback."""
    from hierdctl.captioner import Captioner

    class Broken:
        def generate(self, *a, **k):
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")

    c = object.__new__(Captioner)
    c.model, c.device, c.n, c.seed, c.failed = Broken(), "cpu", 2, 0, 0
    assert c.captions(torch.zeros(3, 8, 8), "ab" * 32) == []
    assert c.failed == 1

    class Other:
        def generate(self, *a, **k):
            raise RuntimeError("some other failure")

    c.model = Other()
    with pytest.raises(RuntimeError, match="some other failure"):
        c.captions(torch.zeros(3, 8, 8), "ab" * 32)
