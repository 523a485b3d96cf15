"""Loss terms, recipes, and computing a recipe's terms: the one table of every term.

A recipe is a YAML file naming weighted loss terms:

    description: CLIP-KD (Yang et al., CVPR 2024) — CLIP + CRD + ICL + 2000·FD
    terms:
      - {name: clip, weight: 1.0}
      - {name: crd, weight: 1.0}
      - {name: fd, weight: 2000.0}
      - {name: hierd_clu_img, weight: 1.0, args: {scale: student}}

`TERMS` is the single source of truth: for every term, the function of `functional`
that computes it and the `Features` fields it is called with, in order. Everything else
is derived from those fields: the cache parts a recipe needs, the κ scales and the
student-wrapper work (`FIELD_NEEDS`), and whether a projector into the teacher's space is
needed (`*_st` fields). `compute_terms(recipe, features)` checks the fields and calls the
functions. Validation happens when a recipe is loaded, so a bad file fails before any
training.

Which space each term works in (features.py explains the two):

    clip, crd, affinity, afd, the relational hierd_* terms, hierd_neg
                                         the student's own embeddings (*_s)
    fd, mfd, icl, gd, vrd, xrd, hierd_*_fd, hierd_*_x, hierd_clu_phr_bx, dense_fd, grid*_fd
                                         the student projected into the teacher's space (*_st)

Scales. A term whose fields include `scale_s, scale_t` takes a `scale` arg:
'teacher' (s_T on both sides), 'student' (the student's learned s on its side, s_T on the
teacher's), or a positive number used on both sides (TinyCLIP's released scripts pin
50). The default is the term's own (`TermSpec.scale`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
import yaml
from torch import Tensor

from hierdctl.errors import UserError
from hierdctl.losses import functional as L
from hierdctl.losses.features import Features


def check_scale(scale: object) -> str | None:
    """None if `scale` is a valid scale argument, else what is wrong with it."""
    if scale in ("teacher", "student"):
        return None
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0 < scale < float("inf"):
        return None
    return f"scale must be 'teacher', 'student' or a positive number, not {scale!r}"


def check_gd_form(form: object) -> str | None:
    return None if form in ("public", "autograd") else f"form must be 'public' or 'autograd', not {form!r}"


def check_teacher(teacher: object) -> str | None:
    ok = teacher == "all" or (isinstance(teacher, int) and not isinstance(teacher, bool) and teacher >= 0)
    return None if ok else f"teacher must be 'all' or a teacher's index (0 = the first --teacher), not {teacher!r}"


# How each accepted arg is checked: value -> None if fine, else the problem.
ARG_CHECKS: dict[str, Callable[[object], str | None]] = {"scale": check_scale, "form": check_gd_form,
                                                         "teacher": check_teacher}


@dataclass(frozen=True)
class TermSpec:
    """One loss term: fn(*fields, **args) -> () tensor."""

    fn: Callable[..., Tensor]
    fields: tuple[str, ...]  # Features fields, in fn's argument order; scale_s/scale_t come from `scale`
    summary: str
    scale: str | None = None  # default of the `scale` arg; None: the term takes no scale
    kwargs: tuple[str, ...] = ()  # other args, passed to fn by keyword
    # With a teacher ensemble: "each" = the mean of the term over the teachers, each through its
    # own projector; "softmax" = against the teachers' averaged in-batch softmaxes (DataCompDR),
    # computed by `ensemble_fn(img_s, txt_s, scale_s, [(img_t, txt_t, s_T)...])`; "first" = the
    # first teacher only (parts, fused features: what the cache has of the first teacher alone).
    ensemble: str = "first"
    ensemble_fn: Callable[..., Tensor] | None = None

    @property
    def args(self) -> tuple[str, ...]:
        return (("scale",) if self.scale else ()) + self.kwargs + (("teacher",) if self.ensemble != "first" else ())


_S = ("img_s", "txt_s")  # the student in its own space
_ST = ("img_st", "txt_st")  # the student in the teacher's space
_T = ("img_t", "txt_t")
_CLU = ("clu_s", "clu_t", "clu_mask")
_PHR = ("phr_s", "phr_t", "phr_mask")
_SCALES = ("scale_s", "scale_t")

TERMS: dict[str, TermSpec] = {
    # --- the CLIP task loss on the student alone
    "clip": TermSpec(L.clip_loss, _S + ("scale_s",), "CLIP contrastive loss on the student", scale="student"),
    # --- CLIP-KD (Yang et al., CVPR 2024), as in the authors' public code, except that MFD
    # masks for real and AFD's CLIP loss on the fused features uses the student's scale s.
    "fd": TermSpec(L.fd, _ST + _T, "feature distillation, MSE to the teacher embeddings", ensemble="each"),
    "mfd": TermSpec(L.fd, ("img_st_masked", "txt_st") + _T, "FD with 75% of the student's image patches masked",
                    ensemble="each"),
    "crd": TermSpec(L.crd, _S + _T + _SCALES, "KL between teacher and student in-batch logits", scale="student",
                    ensemble="softmax", ensemble_fn=L.crd_ensemble),
    "icl": TermSpec(L.icl, _ST + _T + ("kappa_x",), "InfoNCE with student anchors and teacher contrasts",
                    ensemble="each"),
    "gd": TermSpec(L.gd, _ST + _T + ("logit_scale_s", "logit_scale_t"),
                   "MSE between teacher and student contrastive-loss gradients", kwargs=("form",), ensemble="each"),
    "afd": TermSpec(L.clip_loss, ("img_fused", "txt_fused", "logit_scale_s"), "CLIP loss on student/teacher fused features"),
    # --- TinyCLIP (Wu et al., ICCV 2023): mixed with clip by the recipe's weights
    "affinity": TermSpec(L.affinity, _S + _T + _SCALES, "soft cross-entropy to the teacher's affinities",
                         scale="student", ensemble="softmax", ensemble_fn=L.affinity_ensemble),
    # --- CLIP-RD (Chung et al., 2026): κv, κt, κx multiplied in directly, as in the authors' code
    "vrd": TermSpec(L.vrd, _ST + _T + ("kappa_v", "kappa_t"),
                    "vertical (teacher<->student within a modality) relations", ensemble="each"),
    "xrd": TermSpec(L.xrd, _ST + _T + ("kappa_x",), "cross-modal teacher<->student relation symmetry",
                    ensemble="each"),
    # --- HieRD (our reconstruction, docs/hierd.md): relational KLs within and across levels
    "hierd_clu_clu": TermSpec(L.part_relation, _CLU + _SCALES, "per sample: cluster<->cluster relations",
                              scale="teacher"),
    "hierd_clu_img": TermSpec(L.part_given_global, _CLU + ("img_s", "img_t") + _SCALES,
                              "per sample: image -> its clusters", scale="teacher"),
    "hierd_phr_phr": TermSpec(L.part_relation, _PHR + _SCALES, "per sample: phrase<->phrase relations",
                              scale="teacher"),
    "hierd_phr_cap": TermSpec(L.part_given_global, _PHR + ("txt_s", "txt_t") + _SCALES,
                              "per sample: caption -> its phrases", scale="teacher"),
    "hierd_clu_phr": TermSpec(L.cluster_phrase, _CLU + _PHR + _SCALES,
                              "per sample: cluster<->phrase affinity, both ways", scale="teacher"),
    "hierd_phr_img": TermSpec(L.part_to_batch, _PHR + ("img_s", "img_t") + _SCALES, "in batch: phrase -> images",
                              scale="teacher"),
    "hierd_clu_cap": TermSpec(L.part_to_batch, _CLU + ("txt_s", "txt_t") + _SCALES, "in batch: cluster -> captions",
                              scale="teacher"),
    # --- HieRD v2 (docs/hierd.md): the part level distilled across models, beside the
    # global CLIP-KD terms. Student parts next to teacher vectors: the *_st fields.
    "hierd_clu_fd": TermSpec(L.part_fd, ("clu_st", "clu_t", "clu_mask"), "part FD: pooled student cluster -> "
                             "teacher cluster embedding"),
    "hierd_phr_fd": TermSpec(L.part_fd, ("phr_st", "phr_t", "phr_mask"), "part FD: student phrase -> teacher phrase"),
    "hierd_crop_fd": TermSpec(L.part_fd, ("clu_st", "clu_crop_t", "clu_mask"),
                              "part FD: pooled student cluster -> teacher embedding of the cluster's crop (CLIPSelf)"),
    "hierd_phr_img_x": TermSpec(L.part_to_teacher_batch, ("phr_st", "phr_t", "phr_mask", "img_t") + _SCALES,
                                "cross-level, across models: student phrase -> the N teacher images",
                                scale="teacher"),
    "hierd_clu_cap_x": TermSpec(L.part_to_teacher_batch, ("clu_st", "clu_t", "clu_mask", "txt_t") + _SCALES,
                                "cross-level, across models: student cluster -> the N teacher captions",
                                scale="teacher"),
    "hierd_clu_phr_x": TermSpec(L.cluster_phrase_cross, ("clu_st", "clu_t", "clu_mask", "phr_st", "phr_t",
                                                         "phr_mask") + _SCALES,
                                "per pair, across models: student cluster -> teacher phrases and back",
                                scale="teacher"),
    "hierd_clu_phr_bx": TermSpec(L.cluster_phrase_batch_cross, ("clu_st", "clu_t", "clu_mask", "phr_st", "phr_t",
                                                                "phr_mask") + _SCALES,
                                 "in batch, across models: student cluster -> every teacher phrase of the batch, "
                                 "and back", scale="teacher"),
    # --- controls of part FD (docs/hierd.md, "Controls"): the same FD on parts that are not
    # k-means clusters. Need a cache made with --store tokens (the teacher's patch tokens).
    "dense_fd": TermSpec(L.dense_fd, ("tok_st", "tok_t"), "dense FD: every student patch token -> the teacher's "
                         "token at the same place (area-resampled onto the student's grid)"),
    "grid2_fd": TermSpec(L.dense_fd, ("grid2_st", "grid2_t"), "fixed-grid FD: student tokens pooled over 2x2 cells "
                         "-> the teacher's pooled over the same cells"),
    "grid3_fd": TermSpec(L.dense_fd, ("grid3_st", "grid3_t"), "fixed-grid FD over 3x3 cells"),
    "hierd_neg": TermSpec(L.negative_kl, ("img_s", "txt_s", "neg_s", "img_t", "txt_t", "neg_t", "neg_mask") + _SCALES,
                          "compositional negatives: image -> {caption, its perturbations}", scale="teacher"),
}  # fmt: skip

# What a field costs the rest of the pipeline: (cache part, student-wrapper work).
#   masked_forward  an extra student image forward with 75% of patches masked
#   fusion          Linear([vs‖vt]) / Linear([ts‖tt]) fusion layers
#   patch_tokens    the student's patch tokens: pooled by the teacher's cluster map (by area), pooled
#                   over fixed cells, or one by one (dense FD)
#   phrase_forward  the student text tower run on every phrase
#   negative_forward  the student text tower run on every perturbation of the caption
# The `*_st` fields (PROJECTED) also need Linear(D_s, D_t) projectors when the widths differ.
FIELD_NEEDS: dict[str, tuple[str | None, str | None]] = {
    "img_s": (None, None), "txt_s": (None, None), "logit_scale_s": (None, None),
    "img_st": (None, None), "txt_st": (None, None),
    "img_st_masked": (None, "masked_forward"),
    "img_fused": ("global", "fusion"), "txt_fused": ("global", "fusion"),
    "clu_s": ("clusters", "patch_tokens"), "clu_st": ("clusters", "patch_tokens"),
    "phr_s": ("phrases", "phrase_forward"), "phr_st": ("phrases", "phrase_forward"),
    "neg_s": ("perturbations", "negative_forward"), "neg_st": ("perturbations", "negative_forward"),
    "kappa_x": (None, None), "kappa_v": (None, None), "kappa_t": (None, None),
    "img_t": ("global", None), "txt_t": ("global", None), "logit_scale_t": ("global", None),
    "clu_t": ("clusters", None), "clu_mask": ("clusters", None),
    "phr_t": ("phrases", None), "phr_mask": ("phrases", None),
    "neg_t": ("perturbations", None), "neg_mask": ("perturbations", None),
    "clu_crop_t": ("cluster_crops", None),
    "tok_st": ("tokens", "patch_tokens"), "tok_t": ("tokens", None),
    "grid2_st": ("tokens", "patch_tokens"), "grid2_t": ("tokens", None),
    "grid3_st": ("tokens", "patch_tokens"), "grid3_t": ("tokens", None),
}  # fmt: skip
PROJECTED = ("img_st", "txt_st", "img_st_masked", "clu_st", "phr_st", "neg_st", "tok_st", "grid2_st", "grid3_st")
KAPPA_FIELDS = {"kappa_x": "x", "kappa_v": "v", "kappa_t": "t"}


def _scale_fields(scale: object) -> tuple[str | float, str | float]:
    """(student-side, teacher-side) field names or constants for a `scale` arg."""
    if scale == "teacher":
        return "logit_scale_t", "logit_scale_t"
    if scale == "student":
        return "logit_scale_s", "logit_scale_t"
    return float(scale), float(scale)


# --- recipes -----------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """One weighted term of a recipe. `args` holds only what the recipe set."""

    name: str
    weight: float
    args: dict[str, object] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The key of this term in compute_terms' output dict."""
        return f"{self.name}_loss"

    @property
    def spec(self) -> TermSpec:
        return TERMS[self.name]

    def inputs(self) -> tuple[str | float, ...]:
        """The Features fields (or constant scales) this term is called with, in order."""
        spec = self.spec
        scale = _scale_fields(self.args.get("scale", spec.scale)) if spec.scale else None
        out = []
        for name in spec.fields:
            if name == "scale_s":
                out.append(scale[0])
            elif name == "scale_t":
                out.append(scale[1])
            else:
                out.append(name)
        return tuple(out)


@dataclass(frozen=True)
class Recipe:
    name: str
    terms: tuple[Term, ...]
    description: str = ""

    @property
    def fields(self) -> tuple[str, ...]:
        """Features fields some term reads, in order of first use."""
        return tuple(dict.fromkeys(x for t in self.terms for x in t.inputs() if isinstance(x, str)))

    def _needs(self, which: int) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for f in self.fields if (n := FIELD_NEEDS[f][which]) is not None))

    @property
    def cache_parts(self) -> tuple[str, ...]:
        """Cache parts needed: subset of ('global', 'clusters', 'phrases', 'perturbations',
        'cluster_crops', 'tokens'); empty = no teacher."""
        return self._needs(0)

    @property
    def extras(self) -> tuple[str, ...]:
        """Student-wrapper work: masked_forward, fusion, patch_tokens, phrase_forward, negative_forward."""
        return self._needs(1)

    @property
    def teacher_space(self) -> bool:
        """Some term compares student vectors with teacher vectors (projectors if widths differ)."""
        return any(f in PROJECTED for f in self.fields)

    @property
    def kappa_keys(self) -> tuple[str, ...]:
        """Learnable relational scales the student wrapper must create: subset of x, v, t."""
        return tuple(KAPPA_FIELDS[f] for f in self.fields if f in KAPPA_FIELDS)

    @property
    def needs_teacher(self) -> bool:
        return bool(self.cache_parts)


def _recipe_dir():
    return resources.files("hierdctl") / "recipes"


def _shipped_names() -> list[str]:
    files = (e.name for e in _recipe_dir().iterdir())
    return sorted(f.removesuffix(".yaml") for f in files if f.endswith(".yaml"))


def _is_path(name_or_path: str | os.PathLike) -> bool:
    text = os.fspath(name_or_path)
    return (
        isinstance(name_or_path, os.PathLike)
        or "/" in text
        or os.sep in text
        or text.endswith((".yaml", ".yml"))
    )


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """Load and validate a recipe: a bare name is a shipped recipe, anything else a file.

    A path is anything that is a PathLike, contains a slash or ends in .yaml/.yml.
    Raises UserError(message, where=<file or recipe name>) on any problem.
    """
    if _is_path(name_or_path):
        path = Path(name_or_path)
        name, where = path.stem, str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError("no such recipe file", where) from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read recipe file: {e}", where) from None
    else:
        name = os.fspath(name_or_path)
        resource = _recipe_dir() / f"{name}.yaml"
        if not resource.is_file():
            shipped = ", ".join(_shipped_names())
            raise UserError(
                f"unknown recipe {name!r}; shipped recipes: {shipped} "
                "(or give the path of a .yaml file)",
                name,
            )
        where = str(resource)
        text = resource.read_text(encoding="utf-8")

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        from hierdctl.configs import yaml_problem

        raise UserError(f"malformed YAML: {yaml_problem(e)}", where) from None
    return parse_recipe(data, name, where)


def parse_recipe(data: object, name: str, where: str) -> Recipe:
    """Validate the parsed YAML of a recipe and build it. Raises UserError(…, where)."""
    if not isinstance(data, dict):
        raise UserError(
            f"a recipe is a mapping with 'terms' (and optionally 'description'), "
            f"not {type(data).__name__}",
            where,
        )
    stray = sorted(set(data) - {"description", "terms"})
    if stray:
        raise UserError(f"unknown key(s) {stray}; a recipe has 'description' and 'terms'", where)
    description = data.get("description", "")
    if not isinstance(description, str):
        raise UserError("'description' must be text", where)
    entries = data.get("terms")
    if not isinstance(entries, list) or not entries:
        raise UserError("'terms' must be a non-empty list of {name, weight[, args]}", where)

    terms: list[Term] = []
    seen: dict[str, int] = {}  # term name -> its entry number
    for i, entry in enumerate(entries, start=1):
        term = _parse_term(entry, f"term {i}", where)
        if term.name in seen:
            raise UserError(
                f"term {i}: {term.name!r} is already term {seen[term.name]}; list each term once",
                where,
            )
        seen[term.name] = i
        terms.append(term)
    # one line, whatever the YAML folding did: list_recipes() shows it in a table
    return Recipe(name=name, terms=tuple(terms), description=" ".join(description.split()))


def _parse_term(entry: object, at: str, where: str) -> Term:
    if not isinstance(entry, dict):
        raise UserError(f"{at}: expected a mapping {{name, weight[, args]}}, got {entry!r}", where)
    stray = sorted(set(entry) - {"name", "weight", "args"})
    if stray:
        raise UserError(f"{at}: unknown key(s) {stray}; a term has name, weight, args", where)

    name = entry.get("name")
    if not isinstance(name, str) or name not in TERMS:
        hint = difflib.get_close_matches(str(name), TERMS, n=1)
        hint_text = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise UserError(
            f"{at}: unknown term {name!r}{hint_text}; known terms: {', '.join(TERMS)}", where
        )
    at = f"{at} ({name})"

    weight = entry.get("weight")
    if isinstance(weight, str):
        # PyYAML reads exponents without a dot ('1e8') as strings: accept them.
        try:
            weight = float(weight)
        except ValueError:
            pass
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise UserError(f"{at}: weight must be a number, got {entry.get('weight')!r}", where)
    if not math.isfinite(weight) or weight < 0:
        raise UserError(f"{at}: weight must be finite and ≥ 0, got {weight}", where)

    args = entry.get("args") or {}
    if not isinstance(args, dict):
        raise UserError(f"{at}: args must be a mapping, got {args!r}", where)
    accepted = TERMS[name].args
    for arg, value in args.items():
        if arg not in accepted:
            takes = f"it takes {list(accepted)}" if accepted else "it takes no args"
            raise UserError(f"{at}: unknown arg {arg!r}; {takes}", where)
        problem = ARG_CHECKS[arg](value)
        if problem:
            raise UserError(f"{at}: {problem}", where)
    return Term(name=name, weight=float(weight), args=dict(args))


def list_recipes() -> list[tuple[str, str]]:
    """(name, one-line description) of every shipped recipe, sorted by name."""
    return [(name, load_recipe(name).description) for name in _shipped_names()]


# --- computing a recipe's terms --------------------------------------------------------


def compute_terms(recipe: Recipe, f: Features) -> dict[str, Tensor]:
    """{'<term>_loss': unweighted () tensor} for every term of the recipe, on one Features.

    With a teacher ensemble (f.ensemble), each term follows its spec's `ensemble` rule and its
    `teacher` arg ('all', the default, or one teacher's index)."""
    out = {}
    for term in recipe.terms:
        spec, inputs = term.spec, term.inputs()
        kwargs = {k: term.args[k] for k in spec.kwargs if k in term.args}
        teachers = _chosen_teachers(term, f)
        if teachers is None:  # one teacher (or a term of the first one only)
            out[term.key] = spec.fn(*_values(term, inputs, f), **kwargs)
        elif spec.ensemble == "each" or len(teachers) == 1:
            views = [dataclasses.replace(f, **f.ensemble[k]) for k in teachers]
            out[term.key] = sum(spec.fn(*_values(term, inputs, v), **kwargs) for v in views) / len(views)
        else:  # "softmax": one KL against the teachers' averaged distributions
            assert spec.ensemble == "softmax" and spec.ensemble_fn is not None, term.name
            img_s, txt_s, _, _, scale_s, scale_t = _values(term, inputs, f)
            fixed = not isinstance(inputs[-1], str)  # a pinned number: every teacher at it too
            pairs = [(f.ensemble[k]["img_t"], f.ensemble[k]["txt_t"], scale_t if fixed else f.ensemble[k]["logit_scale_t"])
                     for k in teachers]
            out[term.key] = spec.ensemble_fn(img_s, txt_s, scale_s, pairs)
    return out


def _chosen_teachers(term: Term, f: Features) -> list[int] | None:
    """Indices of the ensemble's teachers this term uses, or None for the single-teacher path."""
    if f.ensemble is None or term.spec.ensemble == "first":
        return None
    which = term.args.get("teacher", "all")
    if which == "all":
        return list(range(len(f.ensemble)))
    assert which < len(f.ensemble), f"{term.name}: teacher {which} of {len(f.ensemble)}"
    return [which]


def _values(term: Term, inputs, f: Features) -> list:
    missing = [x for x in inputs if isinstance(x, str) and getattr(f, x) is None]
    assert not missing, f"{term.name} needs feature(s) {missing} that this step did not provide"
    return [getattr(f, x) if isinstance(x, str) else x for x in inputs]


def weighted_total(terms: dict[str, Tensor], recipe: Recipe) -> Tensor:
    """Σ weight · term over the recipe's terms. `terms`: compute_terms' output ('<name>_loss')."""
    missing = [t.key for t in recipe.terms if t.key not in terms]
    assert not missing, f"loss terms {missing} were not computed"
    total = torch.zeros((), device=terms[recipe.terms[0].key].device)
    for term in recipe.terms:
        total = total + term.weight * terms[term.key]
    return total
