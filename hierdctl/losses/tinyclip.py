"""TinyCLIP (Wu et al., ICCV 2023) affinity mimicking: term `affinity`.

½[softCE(s·vs·tsᵀ, softmax(s_T·vt·ttᵀ)) + same for the transposes]. TinyCLIP mixes it
with the CLIP loss as α·affinity + (1−α)·clip (α = distillation_alpha); in hierdctl
that mix is just the two weights in the recipe (see recipes/tinyclip.yaml).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from hierdctl.losses import functional as L
from hierdctl.losses.features import Features


class TinyClipLoss(nn.Module):
    """Term `affinity` -> {'affinity_loss'}."""

    TERMS = ("affinity",)

    def __init__(self, terms: Iterable[str] = ("affinity",)):
        super().__init__()
        self.terms = tuple(terms)
        unknown = sorted(set(self.terms) - set(self.TERMS))
        if unknown:
            raise ValueError(f"TinyClipLoss has no term(s) {unknown}; it knows {list(self.TERMS)}")

    def forward(self, f: Features) -> dict[str, Tensor]:
        f.need("img_t", "txt_t", "logit_scale_t")
        return {
            f"{name}_loss": L.affinity(
                f.img_s, f.txt_s, f.img_t, f.txt_t, f.logit_scale_s, f.logit_scale_t
            )
            for name in self.terms
        }
