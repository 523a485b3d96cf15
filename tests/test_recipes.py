"""Recipes: every shipped one loads and builds; bad ones fail early with a UserError naming the file."""

from __future__ import annotations

import shutil
from importlib import resources

import pytest
import torch

from hierdctl.errors import UserError
from hierdctl.losses.registry import TERMS, Recipe, Term, compute_terms, list_recipes, load_recipe, weighted_total

from loss_inputs import make_features

SHIPPED = {"clip", "clip-kd", "tinyclip", "clip-rd", "hierd", "hierd+neg", "hierd-v1", "hierd+rd",
           # issue 24: controls of part FD, and hierd + each structure family
           "ctl-dense-fd", "ctl-grid2-fd", "ctl-grid3-fd", "ctl-clu-fd", "ctl-phr-fd", "ctl-global-fd6000",
           "hierd+align", "hierd+xbatch", "hierd+relations", "hierd+coupling", "hierd+structure"}
# HieRD v1's seven relational levels (hierd-v1, hierd+rd); `hierd` is v2 (docs/hierd.md).
HIERD_V1 = ("hierd_clu_clu", "hierd_clu_img", "hierd_phr_phr", "hierd_phr_cap", "hierd_clu_phr", "hierd_phr_img",
            "hierd_clu_cap")


HIERD_V2_WEIGHTS = {"hierd_clu_fd": 2000.0, "hierd_phr_fd": 2000.0}
HIERD_V2_PARTS = {"global", "clusters", "phrases"}


def test_list_recipes_names_every_shipped_recipe_with_a_description():
    listed = dict(list_recipes())
    assert set(listed) == SHIPPED
    assert all(desc and "\n" not in desc for desc in listed.values())


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_recipe_loads_builds_and_runs(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    f = make_features()
    out = compute_terms(recipe, f)
    assert set(out) == {t.key for t in recipe.terms}  # exactly the recipe's terms
    total = weighted_total(out, recipe)
    expected = sum(t.weight * out[t.key].item() for t in recipe.terms)
    assert total.item() == pytest.approx(expected, rel=1e-6)
    total.backward()
    assert f.img_s.grad is not None


def test_shipped_recipes_have_the_published_terms_and_weights():
    def weights(name):
        return {t.name: t.weight for t in load_recipe(name).terms}

    assert weights("clip") == {"clip": 1.0}
    assert weights("clip-kd") == {"clip": 1.0, "crd": 1.0, "icl": 1.0, "fd": 2000.0}
    assert weights("clip-rd") == weights("clip-kd") | {"vrd": 1.0, "xrd": 1.0}
    assert weights("tinyclip") == {"clip": 0.5, "affinity": 0.5}  # α = 0.5: a real mix
    hierd_terms = {n: 1.0 for n in HIERD_V1}
    assert set(HIERD_V1) <= set(TERMS)
    assert weights("hierd-v1") == {"clip": 1.0, "crd": 1.0} | hierd_terms
    assert weights("hierd+rd") == weights("clip-rd") | hierd_terms
    # HieRD v2 = CLIP-KD's global terms + the part-level terms the validation search kept
    # (examples/experiment.py SEARCH/CHOSEN, docs/hierd.md)
    assert weights("hierd") == weights("clip-kd") | HIERD_V2_WEIGHTS
    assert weights("hierd+neg") == weights("hierd") | {"hierd_neg": 1.0}


def test_control_recipes_change_one_thing_of_hierd():
    def weights(name):
        return {t.name: t.weight for t in load_recipe(name).terms}

    hierd, kd = weights("hierd"), weights("clip-kd")
    without_clusters = {k: v for k, v in hierd.items() if k != "hierd_clu_fd"}
    assert weights("ctl-dense-fd") == without_clusters | {"dense_fd": 2000.0}
    assert weights("ctl-grid2-fd") == without_clusters | {"grid2_fd": 2000.0}
    assert weights("ctl-grid3-fd") == without_clusters | {"grid3_fd": 2000.0}
    assert weights("ctl-clu-fd") == kd | {"hierd_clu_fd": 2000.0}
    assert weights("ctl-phr-fd") == kd | {"hierd_phr_fd": 2000.0}
    # the global-only control carries hierd's whole FD weight on the global FD
    total_fd = sum(v for k, v in hierd.items() if k.endswith("fd"))
    assert weights("ctl-global-fd6000") == kd | {"fd": total_fd} and total_fd == 6000.0
    for name in ("ctl-dense-fd", "ctl-grid2-fd", "ctl-grid3-fd"):
        assert "tokens" in load_recipe(name).cache_parts and "clusters" not in load_recipe(name).cache_parts
    assert "clusters" not in load_recipe("ctl-phr-fd").cache_parts


def test_structure_recipes_are_hierd_plus_one_family():
    def weights(name):
        return {t.name: t.weight for t in load_recipe(name).terms}

    families = {"hierd+align": {"hierd_clu_phr"}, "hierd+xbatch": {"hierd_clu_phr_bx"},
                "hierd+relations": {"hierd_clu_clu", "hierd_phr_phr"},
                "hierd+coupling": {"hierd_clu_cap", "hierd_phr_img", "hierd_clu_img", "hierd_phr_cap"}}
    for name, family in families.items():
        assert weights(name) == weights("hierd") | {n: 1.0 for n in family}, name
    every = set().union(*families.values())
    assert weights("hierd+structure") == weights("hierd") | {n: 1.0 for n in every}


def test_recipe_needs():
    clip = load_recipe("clip")
    assert clip.cache_parts == () and not clip.needs_teacher and clip.kappa_keys == ()
    kd = load_recipe("clip-kd")
    assert kd.cache_parts == ("global",) and kd.kappa_keys == ("x",) and kd.extras == ()
    assert {"img_t", "txt_t", "logit_scale_t", "img_s", "img_st"} <= set(kd.fields) and kd.teacher_space
    assert not load_recipe("tinyclip").teacher_space  # clip + affinity: the student's own space only
    rd = load_recipe("clip-rd")
    assert set(rd.kappa_keys) == {"x", "v", "t"}
    v1 = load_recipe("hierd-v1")
    assert set(v1.cache_parts) == {"global", "clusters", "phrases"}
    assert set(v1.extras) == {"patch_tokens", "phrase_forward"}
    assert {"clu_s", "clu_t", "clu_mask", "phr_s", "phr_t", "phr_mask"} <= set(v1.fields)
    assert not v1.teacher_space  # CRD and the relational HieRD terms compare the student with itself
    hierd = load_recipe("hierd")
    assert set(hierd.cache_parts) == HIERD_V2_PARTS
    assert hierd.teacher_space  # FD, ICL and the part-level v2 terms compare the student with the teacher
    assert set(hierd.extras) == {"patch_tokens", "phrase_forward"}  # no perturbation forwards: the cost budget
    assert "negative_forward" in load_recipe("hierd+neg").extras
    assert one_term_needs("hierd_neg") == (("perturbations", "global"), ("negative_forward",))
    assert one_term_needs("hierd_crop_fd") == (("clusters", "cluster_crops"), ("patch_tokens",))

    def one(name):
        return Recipe(name, (Term(name, 1.0),))

    assert one("mfd").extras == ("masked_forward",) and one("afd").extras == ("fusion",)


def one_term_needs(name):
    r = Recipe(name, (Term(name, 1.0),))
    return r.cache_parts, r.extras


def write(tmp_path, text, name="my.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_recipe_from_a_path(tmp_path):
    src = resources.files("hierdctl") / "recipes" / "clip-kd.yaml"
    path = tmp_path / "copy.yaml"
    with resources.as_file(src) as p:
        shutil.copy(p, path)
    recipe = load_recipe(str(path))
    assert recipe.name == "copy" and recipe.terms == load_recipe("clip-kd").terms


def test_a_fixed_scale_pins_both_sides_of_affinity_and_clip():
    """TinyCLIP's --logit-scale 50: args {scale: 50} replaces s and s_T by 50 on both sides."""
    pinned = Recipe("t", (Term("clip", 0.5, {"scale": 50}), Term("affinity", 0.5, {"scale": 50})))
    assert [t.inputs()[-2:] for t in pinned.terms][1] == (50.0, 50.0) and pinned.terms[0].inputs()[-1] == 50.0
    assert "logit_scale_s" not in pinned.fields and "logit_scale_t" not in pinned.fields
    f = make_features()
    out = compute_terms(pinned, f)
    learned = compute_terms(load_recipe("tinyclip"), make_features())
    assert out["affinity_loss"].item() != pytest.approx(learned["affinity_loss"].item())
    f50 = make_features(logit_scale_s=torch.tensor(50.0))
    f50.logit_scale_t = 50.0
    assert out["affinity_loss"].item() == pytest.approx(compute_terms(load_recipe("tinyclip"), f50)["affinity_loss"].item())


def test_args_reach_the_terms(tmp_path):
    path = write(
        tmp_path,
        "terms:\n"
        "  - {name: hierd_clu_img, weight: 1.0, args: {scale: student}}\n"
        "  - {name: hierd_phr_img, weight: 0.5, args: {scale: 30}}\n"
        "  - {name: gd, weight: 1e8, args: {form: autograd}}\n"  # PyYAML reads 1e8 as a string: accepted
        "  - {name: hierd_clu_cap, weight: 1.0}\n",
    )
    recipe = load_recipe(path)
    assert recipe.terms[2].weight == 1e8
    scales = [t.inputs()[-2:] for t in recipe.terms if t.name.startswith("hierd_")]
    assert scales == [("logit_scale_s", "logit_scale_t"), (30.0, 30.0), ("logit_scale_t", "logit_scale_t")]
    assert "logit_scale_s" not in Recipe("x", (recipe.terms[3],)).fields  # 'teacher' is the HieRD default
    f = make_features()
    out = compute_terms(recipe, f)
    assert out["gd_loss"].item() != compute_terms(Recipe("x", (Term("gd", 1.0),)), f)["gd_loss"].item()


BAD = {
    "unknown term": ("terms:\n  - {name: crdd, weight: 1.0}\n", "unknown term 'crdd' (did you mean 'crd'?)"),
    "unknown arg": ("terms:\n  - {name: fd, weight: 1.0, args: {scale: teacher}}\n", "unknown arg 'scale'"),
    "bad gd form": ("terms:\n  - {name: gd, weight: 1.0, args: {form: closed}}\n", "form must be"),
    "bad scale": ("terms:\n  - {name: hierd_clu_clu, weight: 1, args: {scale: huge}}\n", "scale must be"),
    "text weight": ("terms:\n  - {name: crd, weight: lots}\n", "weight must be a number"),
    "bool weight": ("terms:\n  - {name: crd, weight: true}\n", "weight must be a number"),
    "no weight": ("terms:\n  - {name: crd}\n", "weight must be a number"),
    "negative weight": ("terms:\n  - {name: crd, weight: -1.0}\n", "≥ 0"),
    "nan weight": ("terms:\n  - {name: crd, weight: .nan}\n", "finite"),
    "duplicate": ("terms:\n  - {name: crd, weight: 1}\n  - {name: clip, weight: 1}\n  - {name: crd, weight: 2}\n",
                  "term 3: 'crd' is already term 1"),
    "malformed yaml": ("terms:\n  - {name: crd, weight: 1.0\n", "malformed YAML"),
    "not a mapping": ("- clip\n- crd\n", "a recipe is a mapping"),
    "empty terms": ("description: nothing\nterms: []\n", "non-empty list"),
    "stray key": ("terms:\n  - {name: clip, weight: 1}\nweights: {}\n", "unknown key(s) ['weights']"),
    "stray term key": ("terms:\n  - {name: clip, weight: 1, wieght: 2}\n", "unknown key(s) ['wieght']"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipe_is_a_user_error_naming_the_file(tmp_path, case):
    text, message = BAD[case]
    path = write(tmp_path, text)
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert err.value.where == str(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_unknown_recipe_name_lists_the_shipped_ones():
    with pytest.raises(UserError) as err:
        load_recipe("clip-kdd")
    assert err.value.where == "clip-kdd"
    assert "hierd+rd" in str(err.value) and "clip-kd" in str(err.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="no such recipe file") as err:
        load_recipe(tmp_path / "nope.yaml")
    assert err.value.where == str(tmp_path / "nope.yaml")


def test_weighted_total_needs_every_term():
    recipe = load_recipe("clip-kd")
    with pytest.raises(AssertionError, match="fd_loss"):
        weighted_total({"clip_loss": torch.tensor(1.0), "crd_loss": torch.tensor(1.0),
                        "icl_loss": torch.tensor(1.0)}, recipe)  # fmt: skip
