"""HieRD v2 end to end: its recipe trains from a cache with caption perturbations and crop
embeddings, and its part-level terms vanish when the student is an exact copy of the teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_shards
from hierdctl.losses.registry import Recipe, Term, load_recipe
from hierdctl.stages import distill as S
from hierdctl.stages.cache_teacher import CacheTeacherConfig
from hierdctl.stages.cache_teacher import run as cache_run

V2_TERMS = ("hierd_clu_fd", "hierd_phr_fd", "hierd_crop_fd", "hierd_phr_img_x", "hierd_clu_cap_x", "hierd_clu_phr_x",
            "hierd_neg")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_teacher) -> Path:
    d = tmp_path_factory.mktemp("hierd-v2")
    src = make_shards(d / "data", n_shards=2, per_shard=8)
    cache_run(CacheTeacherConfig(source=src, out=d / "cache", teacher=tiny_teacher, views=2, clusters=4,
                                 max_phrases=3, perturbations=2, cluster_crops=True, workers=0, quiet=True))
    return d / "cache"


def _cfg(cache: Path, out: Path, **kw) -> S.DistillConfig:
    base = dict(cache=str(cache), student="tiny-test", recipe="hierd", out=str(out), steps=6, batch_size=8,
                lr=1e-3, warmup=1, workers=0, quiet=True, log_every=1, seed=1)
    return S.resolve_config(base | kw)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _every_v2_term(tmp_path: Path) -> Path:
    path = tmp_path / "all-v2.yaml"
    terms = "\n".join(f"  - {{name: {n}, weight: 1.0}}" for n in ("clip", "fd") + V2_TERMS)
    path.write_text(f"description: every HieRD v2 term\nterms:\n{terms}\n")
    return path


@pytest.mark.parametrize("recipe", ["hierd", "every-v2-term"])
def test_hierd_v2_trains_and_its_loss_falls(cache, tmp_path, recipe):
    r = str(_every_v2_term(tmp_path)) if recipe == "every-v2-term" else recipe
    out = tmp_path / recipe
    S.run(_cfg(cache, out, recipe=r, steps=15, batch_size=16, lr=2e-3))
    rows = _metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"], (rows[0]["loss"], rows[-1]["loss"])
    assert {k for k in rows[0] if k.endswith("_loss")} == {t.key for t in load_recipe(r).terms}
    # the negatives term sees real perturbations: a positive KL at step 1
    if "hierd_neg_loss" in rows[0]:
        assert rows[0]["hierd_neg_loss"] > 1e-6


def test_student_equal_to_teacher_gives_zero_part_terms(cache, tmp_path):
    # tiny-test at seed 0 is the tiny teacher itself: at step 1 every v2 term that matches the
    # teacher is zero (to fp16 storage); crop FD compares with the crops' embeddings, not zero.
    out = tmp_path / "same"
    S.run(_cfg(cache, out, recipe=str(_every_v2_term(tmp_path)), steps=1, seed=0, warmup=0))
    first = _metrics(out)[0]
    for name in ("fd", "hierd_clu_fd", "hierd_phr_fd", "hierd_phr_img_x", "hierd_clu_cap_x", "hierd_clu_phr_x",
                 "hierd_neg"):
        assert abs(first[f"{name}_loss"]) < 2e-3, (name, first[f"{name}_loss"])
    assert first["hierd_crop_fd_loss"] > 1e-3  # a crop's embedding is not the pooled cluster's


def test_wrapper_encodes_only_the_valid_perturbations(cache):
    from hierdctl.student import StudentWrapper

    cfg = S.resolve_config(dict(cache=str(cache), student="tiny-test", recipe="hierd+neg", out="unused", steps=1,
                                batch_size=8, workers=0, quiet=True))
    from hierdctl import cache_format, distributed

    tr = S.build_trainer(cfg, cache_format.open_cache(cache), load_recipe("hierd+neg"), distributed.resolve(), "cpu")
    batch = tr.to_device(next(iter(tr.loader(0))))
    assert isinstance(tr.wrapper, StudentWrapper) and "negative_forward" in load_recipe("hierd+neg").extras
    f = tr.wrapper(batch)
    assert f.neg_s.shape[:2] == batch["neg_mask"].shape
    valid = batch["neg_mask"]
    assert valid.any() and (f.neg_s[~valid] == 0).all() and (f.neg_s[valid].norm(dim=-1) > 0).all()
    # a valid perturbation's embedding is the text tower on its tokens, alone
    n, q = [int(i) for i in valid.nonzero()[0]]
    alone = tr.wrapper.student.encode_text(batch["neg_tok"][n, q][None])[0]
    torch.testing.assert_close(f.neg_s[n, q], alone, rtol=1e-4, atol=1e-5)


def test_a_recipe_needing_perturbations_names_the_flag(tmp_path, tiny_teacher):
    from hierdctl.errors import UserError

    src = make_shards(tmp_path / "data", n_shards=1, per_shard=8)
    cache_run(CacheTeacherConfig(source=src, out=tmp_path / "c", teacher=tiny_teacher, clusters=4, max_phrases=3,
                                 workers=0, quiet=True))
    recipe = Recipe("neg", (Term("clip", 1.0), Term("hierd_neg", 1.0)))
    assert recipe.cache_parts == ("perturbations", "global")
    with pytest.raises(UserError, match="--perturbations"):
        S.run(_cfg(tmp_path / "c", tmp_path / "r", recipe="hierd+neg"))
