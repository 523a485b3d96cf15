"""HieRD (ICML 2026), hierdctl's reconstruction: relational distillation across levels.

Only the abstract is published; every design choice is ours and is documented in
docs/hierd.md. Levels: image = patches -> clusters -> image, text = words -> phrases
-> caption. The global level is the existing `crd` term (not repeated here). Each term
below is a KL between the teacher's and the student's softmax distributions (teacher
target, stop-gradient); padded clusters / phrases are masked out.

  hierd_clu_clu  per sample: cluster -> other clusters           (N, K, K), diagonal out
  hierd_clu_img  per sample: image -> its clusters                (N, K)
  hierd_phr_phr  per sample: phrase -> other phrases              (N, P, P), diagonal out
  hierd_phr_cap  per sample: caption -> its phrases               (N, P)
  hierd_clu_phr  per sample: cluster -> phrases and phrase -> clusters, averaged (N, K, P)
  hierd_phr_img  in batch:   phrase -> the N images               (N, P, N)
  hierd_clu_cap  in batch:   cluster -> the N captions            (N, K, N)

Scale, per term: 'teacher' (default) multiplies both sides by s_T; 'student' uses the
student's CLIP scale s on the student side and s_T on the teacher side; a number is
used on both sides.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor, nn

from hierdctl.losses import functional as L
from hierdctl.losses.features import Features

ScaleArg = str | float


def check_scale(scale: object) -> str | None:
    """None if `scale` is a valid HieRD scale argument, else what is wrong with it."""
    if scale in ("teacher", "student"):
        return None
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0 < scale < float("inf"):
        return None
    return f"scale must be 'teacher', 'student' or a positive number, not {scale!r}"


class HieRDLoss(nn.Module):
    """Any subset of the HieRD terms -> {'<term>_loss'} for each, unweighted.

    `scale` maps a term name to its scale argument; terms not in it use 'teacher'.
    """

    TERMS = (
        "hierd_clu_clu",
        "hierd_clu_img",
        "hierd_phr_phr",
        "hierd_phr_cap",
        "hierd_clu_phr",
        "hierd_phr_img",
        "hierd_clu_cap",
    )

    def __init__(self, terms: Iterable[str], scale: Mapping[str, ScaleArg] | None = None):
        super().__init__()
        self.terms = tuple(terms)
        self.scale = {name: "teacher" for name in self.terms} | dict(scale or {})
        unknown = sorted(set(self.terms) - set(self.TERMS))
        if unknown:
            raise ValueError(f"HieRDLoss has no term(s) {unknown}; it knows {list(self.TERMS)}")
        stray = sorted(set(self.scale) - set(self.terms))
        if stray:
            raise ValueError(f"HieRDLoss got a scale for term(s) {stray} it was not built with")
        for name, value in self.scale.items():
            problem = check_scale(value)
            if problem:
                raise ValueError(f"{name}: {problem}")

    def forward(self, f: Features) -> dict[str, Tensor]:
        return {f"{name}_loss": self._term(name, f) for name in self.terms}

    def _scales(self, name: str, f: Features) -> tuple[Tensor | float, Tensor | float]:
        """(student-side scale, teacher-side scale) for one term."""
        scale = self.scale[name]
        if scale == "teacher":
            f.need("logit_scale_t")
            return f.logit_scale_t, f.logit_scale_t
        if scale == "student":
            f.need("logit_scale_t")
            return f.logit_scale_s, f.logit_scale_t
        return float(scale), float(scale)

    def _term(self, name: str, f: Features) -> Tensor:
        s_s, s_t = self._scales(name, f)
        if name == "hierd_clu_clu":
            f.need("clu_s", "clu_t", "clu_mask")
            return L.part_relation(f.clu_s, f.clu_t, f.clu_mask, s_s, s_t)
        if name == "hierd_clu_img":
            f.need("clu_s", "clu_t", "clu_mask", "img_t")
            return L.part_given_global(f.clu_s, f.clu_t, f.clu_mask, f.img_s, f.img_t, s_s, s_t)
        if name == "hierd_phr_phr":
            f.need("phr_s", "phr_t", "phr_mask")
            return L.part_relation(f.phr_s, f.phr_t, f.phr_mask, s_s, s_t)
        if name == "hierd_phr_cap":
            f.need("phr_s", "phr_t", "phr_mask", "txt_t")
            return L.part_given_global(f.phr_s, f.phr_t, f.phr_mask, f.txt_s, f.txt_t, s_s, s_t)
        if name == "hierd_clu_phr":
            f.need("clu_s", "clu_t", "clu_mask", "phr_s", "phr_t", "phr_mask")
            return L.cluster_phrase(
                f.clu_s, f.clu_t, f.clu_mask, f.phr_s, f.phr_t, f.phr_mask, s_s, s_t
            )
        if name == "hierd_phr_img":
            f.need("phr_s", "phr_t", "phr_mask", "img_t")
            return L.part_to_batch(f.phr_s, f.phr_t, f.phr_mask, f.img_s, f.img_t, s_s, s_t)
        # hierd_clu_cap
        f.need("clu_s", "clu_t", "clu_mask", "txt_t")
        return L.part_to_batch(f.clu_s, f.clu_t, f.clu_mask, f.txt_s, f.txt_t, s_s, s_t)
