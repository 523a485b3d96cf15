"""The CLIP task loss on the student alone: L_clip = ½[CE(s·vs·tsᵀ) + CE(s·ts·vsᵀ)].

Needs no teacher. Under DDP the distill loop gathers features before building
`Features` (open_clip's gather_with_grad semantics), so this sees the global batch.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from hierdctl.losses import functional as L
from hierdctl.losses.features import Features


class ClipLoss(nn.Module):
    """Term `clip` -> {'clip_loss'}."""

    TERMS = ("clip",)

    def __init__(self, terms: Iterable[str] = ("clip",)):
        super().__init__()
        self.terms = tuple(terms)
        unknown = sorted(set(self.terms) - set(self.TERMS))
        if unknown:
            raise ValueError(f"ClipLoss has no term(s) {unknown}; it knows {list(self.TERMS)}")

    def forward(self, f: Features) -> dict[str, Tensor]:
        return {f"{name}_loss": L.clip_loss(f.img_s, f.txt_s, f.logit_scale_s) for name in self.terms}
