"""What every loss term receives: one global batch of student and teacher features.

The distill loop builds a `Features` per step (after gathering across ranks under DDP,
so losses never see the world size); `registry.compute_terms` hands each term the fields
its spec names and returns a dict of *unweighted* named terms ending in `_loss`. Weights
come from the recipe file.

Two spaces (N = global batch, D_s = the student's joint width, D_t = the teacher's,
K = clusters, P = phrases):
- `*_s` fields are the student's own embeddings (D_s): the space export ships. The CLIP
  task loss and every term that compares the student with itself (the in-batch or
  in-sample distributions of CRD, affinity and the relational HieRD terms) read these.
- `*_st` fields are the student projected into the teacher's space (D_t) by the student
  wrapper's projector, for the terms that put a student vector next to a teacher vector
  (FD, MFD, ICL, GD, VRD, XRD, the part-level HieRD v2 terms, the dense and fixed-grid FD
  controls). When the widths match there
  is no projector and `*_st` is the very same tensor as `*_s`.
This follows CLIP-KD's public code (task loss and CRD on the student's own features, FD,
ICL and GD on the projected ones); docs/distill.md has the table for every term.

Conventions:
- Student tensors are raw outputs; the losses L2-normalise them themselves.
- Teacher tensors come from the cache: L2-normalised, frozen (requires_grad False).
- Scales are *effective* values (the wrapper already applied exp() where configured):
  `logit_scale_s` is the student's CLIP scale s, `logit_scale_t` the teacher's s_T,
  `kappa_x/v/t` the learnable relational scales κx, κv, κt.
- Optional fields are None when the recipe does not need them; `compute_terms` asserts
  with the field's name when a term's field is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Features:
    # --- the student in its own space (D_s) ---------------------------------------------
    img_s: torch.Tensor  # (N, D_s) student image embeddings (unnormalised)
    txt_s: torch.Tensor  # (N, D_s) student text embeddings (unnormalised)
    logit_scale_s: torch.Tensor  # () student CLIP scale s = exp(θ), θ clamped to ≤ ln 100 after each step

    # --- the student projected into the teacher's space (D_t) ---------------------------
    img_st: torch.Tensor | None = None  # (N, D_t)
    txt_st: torch.Tensor | None = None  # (N, D_t)
    img_st_masked: torch.Tensor | None = None  # (N, D_t) image forward with 75% patches masked (MFD)
    clu_st: torch.Tensor | None = None  # (N, K, D_t) pooled patch tokens, projected
    phr_st: torch.Tensor | None = None  # (N, P, D_t) phrase embeddings, projected
    neg_st: torch.Tensor | None = None  # (N, Q, D_t) caption perturbations, projected
    tok_st: torch.Tensor | None = None  # (N, G_s, D_t) every patch token, projected (dense FD control)
    grid2_st: torch.Tensor | None = None  # (N, 4, D_t) patch tokens pooled over fixed 2×2 cells, projected
    grid3_st: torch.Tensor | None = None  # (N, 9, D_t) ... over fixed 3×3 cells

    # --- AFD, HieRD parts in the student's own space ------------------------------------
    img_fused: torch.Tensor | None = None  # (N, D_s) Linear([vs‖vt]) (AFD)
    txt_fused: torch.Tensor | None = None  # (N, D_s) Linear([ts‖tt]) (AFD)
    clu_s: torch.Tensor | None = None  # (N, K, D_s) student patch tokens pooled by the teacher's assignment
    phr_s: torch.Tensor | None = None  # (N, P, D_s) student text tower on each phrase
    neg_s: torch.Tensor | None = None  # (N, Q, D_s) student text tower on each perturbation of the caption

    # --- learnable relational scales (), effective values --------------------------------
    kappa_x: torch.Tensor | None = None
    kappa_v: torch.Tensor | None = None
    kappa_t: torch.Tensor | None = None

    # --- the teacher, from the cache ------------------------------------------------------
    img_t: torch.Tensor | None = None  # (N, D_t) normalised
    txt_t: torch.Tensor | None = None  # (N, D_t) normalised
    logit_scale_t: float | None = None  # s_T, from the cache manifest
    clu_t: torch.Tensor | None = None  # (N, K, D_t) cluster embeddings, normalised
    clu_mask: torch.Tensor | None = None  # (N, K) bool, False for empty clusters and for clusters that cover
    #   no area of the student's patch grid (the wrapper ands the cache's mask with the student-side coverage)
    phr_t: torch.Tensor | None = None  # (N, P, D_t) phrase embeddings, normalised
    phr_mask: torch.Tensor | None = None  # (N, P) bool, False for padding
    neg_t: torch.Tensor | None = None  # (N, Q, D_t) the caption's perturbations (hierdctl/perturb.py), normalised
    neg_mask: torch.Tensor | None = None  # (N, Q) bool, False for padding
    clu_crop_t: torch.Tensor | None = None  # (N, K, D_t) teacher embedding of each cluster's crop; 0 = empty
    # cache --store tokens: the teacher's patch tokens, carried onto the student's grid by area
    tok_t: torch.Tensor | None = None  # (N, G_s, D_t) normalised
    grid2_t: torch.Tensor | None = None  # (N, 4, D_t) teacher tokens pooled over the same 2×2 cells, normalised
    grid3_t: torch.Tensor | None = None  # (N, 9, D_t) ... 3×3 cells

    # --- a teacher ensemble (cache-teacher --teacher A --teacher B ...) -------------------
    # One entry per teacher, teacher 0 first (the same tensors as the fields above): its
    # "img_t", "txt_t", "logit_scale_t", and the student projected into its space ("img_st",
    # "txt_st", "img_st_masked" where the recipe needs them). None with a single teacher.
    ensemble: list[dict] | None = None

    # --- caption_policy real+synthetic (DataCompDR): the same batch with each sample's synthetic
    # caption instead of its real one; the step's terms are the mean over the two --------------
    second: "Features | None" = None


# Per-sample fields (first dimension N), for gathering across ranks: the student's keep
# their graph (gather_with_grad), the teacher's are constants.
STUDENT_BATCH_FIELDS = ("img_s", "txt_s", "img_st", "txt_st", "img_st_masked", "clu_st", "phr_st", "neg_st",
                        "tok_st", "grid2_st", "grid3_st", "img_fused", "txt_fused", "clu_s", "phr_s", "neg_s")
TEACHER_BATCH_FIELDS = ("img_t", "txt_t", "clu_t", "clu_mask", "phr_t", "phr_mask", "neg_t", "neg_mask", "clu_crop_t",
                        "tok_t", "grid2_t", "grid3_t")
ENSEMBLE_FIELDS = ("img_t", "txt_t", "logit_scale_t", "img_st", "txt_st", "img_st_masked")  # per teacher
assert set(STUDENT_BATCH_FIELDS + TEACHER_BATCH_FIELDS) | {"logit_scale_s", "logit_scale_t", "kappa_x", "kappa_v",
                                                           "kappa_t", "ensemble", "second"} == {f.name for f in fields(Features)}
