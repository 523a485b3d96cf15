"""What every loss module receives: one global batch of student and teacher features.

The distill loop builds a `Features` per step (after gathering across ranks under DDP,
so losses never see the world size) and each method's loss module returns a dict of
*unweighted* named terms ending in `_loss`. Weights come from the recipe file.

Conventions (N = global batch, D = joint width, K = clusters, P = phrases):
- Student tensors are raw outputs, already passed through the student wrapper's
  projector when student and teacher widths differ (so their width is the teacher's D).
  Losses L2-normalise them themselves.
- Teacher tensors come from the cache: L2-normalised, frozen (requires_grad False).
- Scales are *effective* values (the wrapper already applied exp() where configured):
  `logit_scale_s` is the student's CLIP scale s, `logit_scale_t` the teacher's s_T,
  `kappa` holds the learnable relational scales {'x': κx, 'v': κv, 't': κt}.
- Optional fields are None when the recipe does not need them; a loss that needs a
  missing field asserts with the field's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Features:
    # --- global embeddings -------------------------------------------------------
    img_s: torch.Tensor  # (N, D) student image embeddings (projected, unnormalised)
    txt_s: torch.Tensor  # (N, D) student text embeddings (projected, unnormalised)
    logit_scale_s: torch.Tensor  # () student CLIP scale s = exp(θ), clamped ≤ 100
    img_t: torch.Tensor | None = None  # (N, D) teacher image embeddings, normalised
    txt_t: torch.Tensor | None = None  # (N, D) teacher text embeddings, normalised
    logit_scale_t: float | None = None  # teacher's s_T, from the cache manifest
    kappa: dict[str, torch.Tensor] = field(default_factory=dict)  # 'x','v','t' -> ()

    # --- CLIP-KD extras, produced by the student wrapper when a recipe asks ---------
    img_s_masked: torch.Tensor | None = None  # (N, D) student image emb. with 75% patches masked (MFD)
    img_fused: torch.Tensor | None = None  # (N, D_s) Linear([vs‖vt]) (AFD)
    txt_fused: torch.Tensor | None = None  # (N, D_s) Linear([ts‖tt]) (AFD)

    # --- HieRD hierarchy ----------------------------------------------------------
    clu_s: torch.Tensor | None = None  # (N, K, D) student patch tokens pooled by the teacher's assignment
    clu_t: torch.Tensor | None = None  # (N, K, D) teacher cluster embeddings, normalised
    clu_mask: torch.Tensor | None = None  # (N, K) bool, False for empty clusters
    phr_s: torch.Tensor | None = None  # (N, P, D) student text tower on each phrase
    phr_t: torch.Tensor | None = None  # (N, P, D) teacher phrase embeddings, normalised
    phr_mask: torch.Tensor | None = None  # (N, P) bool, False for padding

    def need(self, *names: str) -> None:
        """Assert that the named optional fields are present (a recipe/cache mismatch otherwise)."""
        missing = [n for n in names if getattr(self, n) is None and n != "kappa"]
        if "kappa" in names:
            missing += [f"kappa[{k}]" for k in ("x", "v", "t") if k not in self.kappa]
        assert not missing, f"loss needs feature(s) {missing} that this step did not provide"
