"""Loss terms, recipes and how they are built.

A recipe is a YAML file naming weighted loss terms:

    description: CLIP-KD (Yang et al., CVPR 2024) — CLIP + CRD + ICL + 2000·FD
    terms:
      - {name: clip, weight: 1.0}
      - {name: crd, weight: 1.0}
      - {name: fd, weight: 2000.0}
      - {name: hierd_clu_img, weight: 1.0, args: {scale: student}}

`TERMS` says, for every term, which loss module computes it and what the rest of the
pipeline must provide: `Features` fields, cache parts ('global', 'clusters',
'phrases'), κ scales, and student-wrapper extras:

    masked_forward  an extra student image forward with 75% of patches masked (img_s_masked)
    fusion          Linear([vs‖vt]) / Linear([ts‖tt]) fusion layers (img_fused, txt_fused)
    patch_tokens    student patch tokens pooled by the teacher's cluster map (clu_s)
    phrase_forward  the student text tower run on every phrase (phr_s)

Validation happens when a recipe is loaded, so a bad file fails before any training.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from hierdctl.errors import UserError
from hierdctl.losses.clip import ClipLoss
from hierdctl.losses.clipkd import ClipKDLoss
from hierdctl.losses.cliprd import ClipRDLoss
from hierdctl.losses.hierd import HieRDLoss, check_scale
from hierdctl.losses.tinyclip import TinyClipLoss


@dataclass(frozen=True)
class TermSpec:
    """What one loss term is computed by and what it needs."""

    module: str  # key of MODULES
    summary: str
    fields: tuple[str, ...]  # Features fields the term reads
    cache: tuple[str, ...] = ()  # cache parts: 'global', 'clusters', 'phrases'
    kappa: tuple[str, ...] = ()  # keys of Features.kappa
    extras: tuple[str, ...] = ()  # student-wrapper extras (see module docstring)
    args: tuple[str, ...] = ()  # accepted `args` keys


MODULES: dict[str, type[nn.Module]] = {
    "clip": ClipLoss,
    "clipkd": ClipKDLoss,
    "tinyclip": TinyClipLoss,
    "cliprd": ClipRDLoss,
    "hierd": HieRDLoss,
}

_STUDENT = ("img_s", "txt_s", "logit_scale_s")
_TEACHER = ("img_t", "txt_t", "logit_scale_t")
_CLU = ("clu_s", "clu_t", "clu_mask")
_PHR = ("phr_s", "phr_t", "phr_mask")
_HIERD_SCALE = ("scale",)

TERMS: dict[str, TermSpec] = {
    "clip": TermSpec("clip", "CLIP contrastive loss on the student", _STUDENT),
    # --- CLIP-KD
    "fd": TermSpec("clipkd", "feature distillation, MSE to the teacher embeddings",
                   ("img_s", "txt_s", "img_t", "txt_t"), ("global",)),
    "mfd": TermSpec("clipkd", "FD with 75% of the student's image patches masked",
                    ("img_s_masked", "txt_s", "img_t", "txt_t"), ("global",),
                    extras=("masked_forward",)),
    "crd": TermSpec("clipkd", "KL between teacher and student in-batch logits",
                    _STUDENT + _TEACHER, ("global",)),
    "icl": TermSpec("clipkd", "InfoNCE with student anchors and teacher contrasts",
                    ("img_s", "txt_s", "img_t", "txt_t", "kappa"), ("global",), kappa=("x",)),
    "gd": TermSpec("clipkd", "MSE between teacher and student contrastive-loss gradients",
                   _STUDENT + _TEACHER, ("global",)),
    "afd": TermSpec("clipkd", "CLIP loss on student/teacher fused features",
                    ("img_fused", "txt_fused", "logit_scale_s"), ("global",),
                    extras=("fusion",)),
    # --- TinyCLIP
    "affinity": TermSpec("tinyclip", "soft cross-entropy to the teacher's affinities",
                         _STUDENT + _TEACHER, ("global",)),
    # --- CLIP-RD
    "vrd": TermSpec("cliprd", "vertical (teacher<->student within a modality) relations",
                    ("img_s", "txt_s", "img_t", "txt_t", "kappa"), ("global",), kappa=("v", "t")),
    "xrd": TermSpec("cliprd", "cross-modal teacher<->student relation symmetry",
                    ("img_s", "txt_s", "img_t", "txt_t", "kappa"), ("global",), kappa=("x",)),
    # --- HieRD (docs/hierd.md). logit_scale_s is listed for scale: student.
    "hierd_clu_clu": TermSpec("hierd", "per sample: cluster<->cluster relations",
                              _CLU + ("logit_scale_s", "logit_scale_t"), ("clusters",),
                              extras=("patch_tokens",), args=_HIERD_SCALE),
    "hierd_clu_img": TermSpec("hierd", "per sample: image -> its clusters",
                              _CLU + ("img_s", "img_t", "logit_scale_s", "logit_scale_t"),
                              ("global", "clusters"), extras=("patch_tokens",),
                              args=_HIERD_SCALE),
    "hierd_phr_phr": TermSpec("hierd", "per sample: phrase<->phrase relations",
                              _PHR + ("logit_scale_s", "logit_scale_t"), ("phrases",),
                              extras=("phrase_forward",), args=_HIERD_SCALE),
    "hierd_phr_cap": TermSpec("hierd", "per sample: caption -> its phrases",
                              _PHR + ("txt_s", "txt_t", "logit_scale_s", "logit_scale_t"),
                              ("global", "phrases"), extras=("phrase_forward",),
                              args=_HIERD_SCALE),
    "hierd_clu_phr": TermSpec("hierd", "per sample: cluster<->phrase affinity, both ways",
                              _CLU + _PHR + ("logit_scale_s", "logit_scale_t"),
                              ("clusters", "phrases"),
                              extras=("patch_tokens", "phrase_forward"), args=_HIERD_SCALE),
    "hierd_phr_img": TermSpec("hierd", "in batch: phrase -> images",
                              _PHR + ("img_s", "img_t", "logit_scale_s", "logit_scale_t"),
                              ("global", "phrases"), extras=("phrase_forward",),
                              args=_HIERD_SCALE),
    "hierd_clu_cap": TermSpec("hierd", "in batch: cluster -> captions",
                              _CLU + ("txt_s", "txt_t", "logit_scale_s", "logit_scale_t"),
                              ("global", "clusters"), extras=("patch_tokens",),
                              args=_HIERD_SCALE),
}  # fmt: skip

# How each accepted arg is checked: value -> None if fine, else the problem.
ARG_CHECKS = {"scale": check_scale}


# --- recipes -----------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """One weighted term of a recipe. `args` holds only what the recipe set."""

    name: str
    weight: float
    args: dict[str, object] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The key of this term in a loss module's output dict."""
        return f"{self.name}_loss"


@dataclass(frozen=True)
class Recipe:
    name: str
    terms: tuple[Term, ...]
    description: str = ""

    def _union(self, attr: str) -> tuple[str, ...]:
        """Ordered union of one TermSpec attribute over the recipe's terms."""
        seen = dict.fromkeys(x for t in self.terms for x in getattr(TERMS[t.name], attr))
        return tuple(seen)

    @property
    def term_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.terms)

    @property
    def fields(self) -> tuple[str, ...]:
        """Features fields some term reads ('kappa' means the dict; see kappa_keys)."""
        return self._union("fields")

    @property
    def cache_parts(self) -> tuple[str, ...]:
        """Cache parts needed: subset of ('global', 'clusters', 'phrases'); empty = no teacher."""
        return self._union("cache")

    @property
    def kappa_keys(self) -> tuple[str, ...]:
        """Learnable relational scales the student wrapper must create: subset of x, v, t."""
        return self._union("kappa")

    @property
    def extras(self) -> tuple[str, ...]:
        """Student-wrapper extras: masked_forward, fusion, patch_tokens, phrase_forward."""
        return self._union("extras")

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
        raise UserError(f"malformed YAML: {e}", where) from None
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


# --- building and combining ----------------------------------------------------------


def build_losses(recipe: Recipe) -> list[nn.Module]:
    """One loss module per method the recipe draws on, each built with just its terms.

    Term args are passed per arg name: {arg: {term: value}} (e.g. HieRDLoss(scale=…)).
    Call each module on the step's Features and merge the dicts.
    """
    groups: dict[str, list[Term]] = {}
    for term in recipe.terms:
        groups.setdefault(TERMS[term.name].module, []).append(term)

    modules = []
    for module, terms in groups.items():
        kwargs: dict[str, dict[str, object]] = {}
        for term in terms:
            for arg, value in term.args.items():
                kwargs.setdefault(arg, {})[term.name] = value
        modules.append(MODULES[module](terms=[t.name for t in terms], **kwargs))
    return modules


def weighted_total(terms: dict[str, Tensor], recipe: Recipe) -> Tensor:
    """Σ weight · term over the recipe's terms. `terms`: merged module outputs ('<name>_loss')."""
    missing = [t.key for t in recipe.terms if t.key not in terms]
    if missing:
        raise KeyError(f"loss terms {missing} were not computed; build them with build_losses(recipe)")
    total = torch.zeros((), device=terms[recipe.terms[0].key].device)
    for term in recipe.terms:
        total = total + term.weight * terms[term.key]
    return total
