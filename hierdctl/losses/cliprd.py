"""CLIP-RD (Chung et al., 2026): terms vrd (vertical) and xrd (cross).

Global embeddings only. κv, κt (VRD) and κx (XRD) are the student wrapper's learnable
relational scales, multiplied in directly as in the authors' code. VRD's KL keeps the
text side as the detached target on purpose (the published asymmetry). The recipe
adds these to CLIP-KD's terms (recipes/clip-rd.yaml).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from hierdctl.losses import functional as L
from hierdctl.losses.features import Features


class ClipRDLoss(nn.Module):
    """Any subset of {vrd, xrd} -> {'vrd_loss', 'xrd_loss'}, unweighted."""

    TERMS = ("vrd", "xrd")

    def __init__(self, terms: Iterable[str]):
        super().__init__()
        self.terms = tuple(terms)
        unknown = sorted(set(self.terms) - set(self.TERMS))
        if unknown:
            raise ValueError(f"ClipRDLoss has no term(s) {unknown}; it knows {list(self.TERMS)}")

    def forward(self, f: Features) -> dict[str, Tensor]:
        return {f"{name}_loss": self._term(name, f) for name in self.terms}

    def _term(self, name: str, f: Features) -> Tensor:
        f.need("img_t", "txt_t")
        if name == "vrd":
            missing = [k for k in ("v", "t") if k not in f.kappa]
            assert not missing, f"vrd needs kappa{missing} that this step did not provide"
            return L.vrd(f.img_s, f.txt_s, f.img_t, f.txt_t, f.kappa["v"], f.kappa["t"])
        assert "x" in f.kappa, "xrd needs kappa['x'] that this step did not provide"
        return L.xrd(f.img_s, f.txt_s, f.img_t, f.txt_t, f.kappa["x"])
