"""CLIP-KD (Yang et al., CVPR 2024): terms fd, mfd, crd, icl, gd, afd.

Follows the authors' public code, with three deliberate differences:
- MFD masks for real: `img_s_masked` comes from a student forward with 75% of the
  patches dropped (the public code overwrote it with an unmasked forward).
- GD compares the gradients of the symmetric contrastive loss w.r.t. the normalised
  embeddings, each side at its own effective scale (s, s_T). The public code computes
  four closed-form partial gradients and divides the logits by the logit scale.
- AFD's CLIP loss on the fused features uses the student's CLIP scale s; the public
  code learns a separate fusion scale. Fusion layers live in the student wrapper.
κx (ICL) is multiplied in directly, as in the public code.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from hierdctl.losses import functional as L
from hierdctl.losses.features import Features


class ClipKDLoss(nn.Module):
    """Any subset of CLIP-KD's terms -> {'<term>_loss'} for each, unweighted."""

    TERMS = ("fd", "mfd", "crd", "icl", "gd", "afd")

    def __init__(self, terms: Iterable[str]):
        super().__init__()
        self.terms = tuple(terms)
        unknown = sorted(set(self.terms) - set(self.TERMS))
        if unknown:
            raise ValueError(f"ClipKDLoss has no term(s) {unknown}; it knows {list(self.TERMS)}")

    def forward(self, f: Features) -> dict[str, Tensor]:
        return {f"{name}_loss": self._term(name, f) for name in self.terms}

    def _term(self, name: str, f: Features) -> Tensor:
        if name == "fd":
            f.need("img_t", "txt_t")
            return L.fd(f.img_s, f.txt_s, f.img_t, f.txt_t)
        if name == "mfd":
            f.need("img_s_masked", "img_t", "txt_t")
            return L.fd(f.img_s_masked, f.txt_s, f.img_t, f.txt_t)
        if name == "crd":
            f.need("img_t", "txt_t", "logit_scale_t")
            return L.crd(f.img_s, f.txt_s, f.img_t, f.txt_t, f.logit_scale_s, f.logit_scale_t)
        if name == "icl":
            f.need("img_t", "txt_t")
            assert "x" in f.kappa, "icl needs kappa['x'] that this step did not provide"
            return L.icl(f.img_s, f.txt_s, f.img_t, f.txt_t, f.kappa["x"])
        if name == "gd":
            f.need("img_t", "txt_t", "logit_scale_t")
            return L.gd(f.img_s, f.txt_s, f.img_t, f.txt_t, f.logit_scale_s, f.logit_scale_t)
        # afd: a CLIP loss on Linear([vs‖vt]) / Linear([ts‖tt]) from the student wrapper
        f.need("img_fused", "txt_fused")
        return L.clip_loss(f.img_fused, f.txt_fused, f.logit_scale_s)
