"""One declaration per setting (hierdctl/settings.py): every field has a role, every option a
field, the identity and the resume keys come from the declarations, the help shows the
field's default."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer

from hierdctl import configs, settings
from hierdctl.cli import ADAPTER_OPTIONS, app

CONFIGS = {
    "cache-teacher": configs.CacheTeacherConfig,
    "distill": configs.DistillConfig,
    "export": configs.ExportConfig,
    "eval-retrieval": configs.EvalRetrievalConfig,
    "eval-zeroshot": configs.EvalZeroshotConfig,
    "scenes": configs.ScenesConfig,
    "embed": configs.EmbedConfig,  # issue 20
    "index": configs.IndexConfig,
    "search": configs.SearchConfig,
}
COMMANDS = typer.main.get_command(app).commands


def _all_fields(cls):
    for f in dataclasses.fields(cls):
        yield cls, f
        if f.metadata.get("cli") is not None and f.metadata["cli"].kind == "group":
            yield from _all_fields(settings.group_class(cls, f))


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_field_is_declared_with_a_role_and_help(command):
    bad = [f"{c.__name__}.{f.name}" for c, f in _all_fields(CONFIGS[command])
           if f.metadata.get("role") not in settings.ROLES or "help" not in f.metadata]
    assert not bad, f"fields without a role or help (declare them with settings.setting): {bad}"


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_option_maps_to_a_field_and_every_field_to_an_option(command):
    cls = CONFIGS[command]
    params = {p.name for p in COMMANDS[command].params}
    options = {f.name for f, _ in settings.option_fields(cls)}
    adapter = {name for name, _, _ in ADAPTER_OPTIONS.get(command, [])}
    assert params - options - adapter == set(), "CLI options that map to no field"
    # A field off the command line is set through another option (--teacher's spread) or --set / --config.
    hidden = {f.name for _, f in _all_fields(cls) if f.metadata["cli"].kind == "none"}
    if command == "distill":
        assert hidden == {"beta1", "beta2", "eps", "view_policy", "caption_policy", "exp_scales", "mask_ratio",
                          "keep_checkpoints", "shuffle_buffer"}  # the --set keys docs/distill.md lists
    elif command == "cache-teacher":
        assert hidden == {"ensemble"}
    else:
        assert hidden == set()


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_help_shows_each_fields_own_default(command):
    cls = CONFIGS[command]
    by_name = {p.name: p for p in COMMANDS[command].params}
    for f, group in settings.option_fields(cls):
        d = settings.default(group or cls, f.name)
        p = by_name[f.name]
        if d is dataclasses.MISSING or f.metadata["cli"].required:
            assert p.required, f.name
            continue
        c = f.metadata["cli"]
        want = c.show(d) if c.show else d
        assert p.default == want or (isinstance(want, Path) and str(p.default) == str(want)), (f.name, p.default, want)


def _old_identity(c: configs.CacheTeacherConfig) -> dict:
    """cache-teacher's identity as it was hand-written before the declarations (frozen copy):
    caches written then must resume now."""
    o = c.source_options
    return {
        "source": c.source,
        "source_options": {"image_col": o.image_col, "caption_col": o.caption_col, "split": o.split,
                           "image_root": o.image_root, "rows_per_unit": o.rows_per_shard},
        "teacher": c.teacher,
        "ensemble": list(c.ensemble),
        "views": c.views,
        "clusters": {"k": c.clusters, "iters": c.cluster_iters, "pos_weight": c.cluster_pos_weight,
                     "algorithm": "spherical-kmeans/farthest-point-seeding"},
        "phrases": {"max_phrases": c.max_phrases, "chunker": c.chunker},
        "perturbations": {"per_caption": c.perturbations, "ops": "swap_modifiers/swap_heads/swap_chunks"},
        "cluster_crops": c.cluster_crops,
        "captioner": {"spec": c.captioner, "per_image": c.synthetic_captions} if c.captioner else None,
        "store": c.store,
        "store_images": c.store_images,
        "dtype": c.dtype,
        "augment": {"crop_scale": list(c.crop_scale), "crop_ratio": list(c.crop_ratio), "flip_p": c.flip_p,
                    "ops": c.augment} | ({"randaugment": list(c.randaugment)}
                                         if c.augment.endswith("randaugment") else {}),
        "seed": c.seed,
        "max_pixels": c.max_pixels,
    }


@pytest.mark.parametrize("changes", [
    {},
    {"captioner": "open_clip:coca_ViT-B-32", "synthetic_captions": 3, "augment": "rrc+flip+randaugment",
     "randaugment": (3, 7), "ensemble": ("local-dir:b",), "clusters": 0, "store": "tokens"},
    {"source_options": configs.SourceOptions(image_col="x", rows_per_shard=7), "crop_scale": (0.5, 0.8),
     "batch_size": 9, "workers": 3, "device": "cpu", "quiet": True},  # the last four: runtime, not identity
])
def test_the_cache_identity_is_what_it_was_and_only_identity_settings_enter_it(changes):
    c = configs.CacheTeacherConfig(source="data/", out=Path("o"), teacher="local-dir:a", **changes)
    assert settings.identity(c) == _old_identity(c)


def test_a_new_identity_setting_enters_the_identity_without_more_code():
    @dataclasses.dataclass
    class C:
        a: int = settings.setting(1, help="", role=settings.IDENTITY)
        b: int = settings.setting(2, help="", role=settings.IDENTITY, key="group.b")
        c: int = settings.setting(3, help="", role=settings.RUNTIME)

    assert settings.identity(C()) == {"a": 1, "group": {"b": 2}}


def test_distills_resume_keys_are_its_identity_settings():
    # The lists that were kept by hand (configs.py RESUME_KEYS / RUNTIME_KEYS before the declarations).
    old_resume = {"cache", "student", "recipe", "steps", "epochs", "batch_size", "lr", "warmup", "weight_decay",
                  "beta1", "beta2", "eps", "grad_clip", "seed", "view_policy", "caption_policy", "exp_scales",
                  "mask_ratio", "precision", "cache_reader", "shuffle_buffer"}
    old_runtime = {"resume", "overwrite", "quiet", "device", "workers", "report_to", "decode"}  # + decode (issue 23)
    assert set(settings.keys(configs.DistillConfig, settings.IDENTITY)) == old_resume
    assert set(settings.keys(configs.DistillConfig, settings.RUNTIME)) == old_runtime


def test_source_options_round_trip_through_a_caches_record():
    o = configs.SourceOptions(image_col="img", caption_col="cap", image_root="/r", split="val", rows_per_shard=5)
    c = configs.CacheTeacherConfig(source="s", out=Path("o"), teacher="t", source_options=o)
    assert configs.SourceOptions.from_record(settings.identity(c)["source_options"]) == o
