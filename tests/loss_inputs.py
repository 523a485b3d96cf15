"""Explicit small inputs shared by the loss and recipe tests, as NumPy arrays and as `Features`."""

from __future__ import annotations

import numpy as np
import torch

from hierdctl.losses.features import Features


def np_unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --- explicit small inputs -------------------------------------------------------------

# N = 3 pairs, D = 4. Student rows are deliberately not unit-norm.
IMG_S = [[1.0, 0.5, -0.2, 0.3], [0.1, 1.2, 0.4, -0.5], [-0.6, 0.2, 0.9, 0.7]]
TXT_S = [[0.8, 0.1, 0.3, -0.1], [0.3, 0.9, -0.2, -0.4], [-0.2, 0.5, 1.1, 0.2]]
IMG_T = [[0.9, 0.3, 0.0, 0.2], [0.0, 1.0, 0.5, -0.3], [-0.5, 0.0, 0.8, 0.6]]
TXT_T = [[0.7, 0.2, 0.4, 0.0], [0.4, 0.8, 0.0, -0.5], [-0.1, 0.3, 1.0, 0.4]]
IMG_S_MASKED = [[0.7, 0.6, -0.1, 0.4], [0.2, 1.0, 0.6, -0.3], [-0.5, 0.4, 0.7, 0.9]]
IMG_FUSED = [[0.5, -0.2, 0.1, 0.9], [0.3, 0.4, -0.8, 0.1], [-0.7, 0.6, 0.2, 0.0]]
TXT_FUSED = [[0.4, -0.1, 0.3, 0.8], [0.2, 0.5, -0.6, 0.3], [-0.6, 0.4, 0.1, 0.2]]

# K = 3 clusters, P = 3 phrases per sample. Sample 0: all valid; sample 1: two clusters,
# three phrases; sample 2: one cluster, two phrases. Padded entries hold junk on purpose.
CLU_MASK = [[True, True, True], [True, True, False], [True, False, False]]
PHR_MASK = [[True, True, False], [True, True, True], [True, True, False]]
CLU_S = [
    [[1.0, 0.2, 0.0, 0.1], [0.1, 0.9, 0.3, 0.0], [0.0, 0.2, 1.1, 0.4]],
    [[0.5, 0.5, 0.1, -0.2], [-0.3, 0.2, 0.8, 0.6], [9.0, -9.0, 9.0, -9.0]],
    [[0.2, -0.4, 0.9, 0.3], [7.0, 7.0, 7.0, 7.0], [-5.0, 3.0, 1.0, 2.0]],
]
CLU_T = [
    [[0.9, 0.3, 0.1, 0.0], [0.0, 1.0, 0.2, 0.1], [0.1, 0.1, 1.0, 0.5]],
    [[0.6, 0.4, 0.0, -0.1], [-0.2, 0.1, 0.9, 0.5], [4.0, 4.0, -4.0, 4.0]],
    [[0.1, -0.3, 1.0, 0.2], [3.0, -3.0, 3.0, 3.0], [1.0, 2.0, 3.0, 4.0]],
]
PHR_S = [
    [[0.7, 0.0, 0.3, 0.1], [0.2, 0.6, 0.0, -0.3], [8.0, 8.0, -8.0, 8.0]],
    [[0.1, 1.0, 0.2, -0.2], [0.4, 0.3, 0.5, 0.0], [-0.2, 0.8, -0.1, -0.6]],
    [[-0.3, 0.1, 0.9, 0.2], [0.0, 0.4, 0.7, 0.8], [6.0, 0.0, 6.0, 0.0]],
]
PHR_T = [
    [[0.8, 0.1, 0.2, 0.0], [0.1, 0.7, 0.1, -0.2], [2.0, -2.0, 2.0, -2.0]],
    [[0.0, 0.9, 0.3, -0.1], [0.5, 0.2, 0.4, 0.1], [-0.1, 0.9, 0.0, -0.5]],
    [[-0.2, 0.0, 1.0, 0.3], [0.1, 0.3, 0.6, 0.9], [5.0, 5.0, 5.0, 5.0]],
]
# Q = 2 perturbations per caption: sample 0 has both, sample 1 one, sample 2 none (its
# row is dropped from hierd_neg). Padded entries hold junk on purpose.
NEG_MASK = [[True, True], [True, False], [False, False]]
NEG_S = [
    [[0.6, 0.3, 0.2, 0.0], [0.9, -0.1, 0.1, 0.2]],
    [[0.2, 0.7, 0.1, -0.6], [9.0, 9.0, 9.0, 9.0]],
    [[-4.0, 1.0, 2.0, 3.0], [5.0, -5.0, 0.0, 1.0]],
]
NEG_T = [
    [[0.5, 0.4, 0.3, 0.1], [0.8, 0.0, 0.2, 0.3]],
    [[0.3, 0.6, 0.2, -0.7], [1.0, -1.0, 1.0, -1.0]],
    [[2.0, 2.0, 2.0, 2.0], [-3.0, 1.0, 0.0, 1.0]],
]
# Teacher embeddings of each cluster's crop (CLIPSelf-style); padded clusters hold junk.
CLU_CROP_T = [
    [[0.8, 0.4, 0.0, 0.1], [0.1, 0.9, 0.4, 0.0], [0.0, 0.3, 0.9, 0.6]],
    [[0.7, 0.3, 0.1, -0.2], [-0.1, 0.2, 1.0, 0.4], [6.0, -6.0, 6.0, 6.0]],
    [[0.2, -0.2, 0.9, 0.3], [4.0, 4.0, 4.0, -4.0], [0.0, 1.0, 0.0, 1.0]],
]
# Patch-level inputs of the part-FD controls (G = 4 patch tokens, 2×2 and 3×3 fixed cells),
# drawn once from a fixed generator: every entry is valid, nothing is masked.
_RNG = np.random.default_rng(24)
TOK_S, TOK_T = _RNG.normal(size=(3, 4, 4)), _RNG.normal(size=(3, 4, 4))
GRID2_S, GRID2_T = _RNG.normal(size=(3, 4, 4)), _RNG.normal(size=(3, 4, 4))
GRID3_S, GRID3_T = _RNG.normal(size=(3, 9, 4)), _RNG.normal(size=(3, 9, 4))
S, S_T = 10.0, 20.0  # student and teacher CLIP scales (small so distributions are not one-hot)
KAPPA = {"x": 2.659, "v": 3.0, "t": 2.0}


def np_inputs():
    """The explicit inputs as float64 arrays, teacher rows normalised (as the cache stores them)."""
    a = {k: np.array(v, dtype=np.float64) for k, v in dict(
        img_s=IMG_S, txt_s=TXT_S, img_t=IMG_T, txt_t=TXT_T, img_s_masked=IMG_S_MASKED,
        img_fused=IMG_FUSED, txt_fused=TXT_FUSED, clu_s=CLU_S, clu_t=CLU_T, phr_s=PHR_S,
        phr_t=PHR_T, neg_s=NEG_S, neg_t=NEG_T, clu_crop_t=CLU_CROP_T, tok_s=TOK_S, tok_t=TOK_T, grid2_s=GRID2_S,
        grid2_t=GRID2_T, grid3_s=GRID3_S, grid3_t=GRID3_T).items()}  # fmt: skip
    for k in ("img_t", "txt_t", "clu_t", "phr_t", "neg_t", "clu_crop_t", "tok_t", "grid2_t", "grid3_t"):
        a[k] = np_unit(a[k])
    a["clu_mask"], a["phr_mask"], a["neg_mask"] = np.array(CLU_MASK), np.array(PHR_MASK), np.array(NEG_MASK)
    return a


def make_features(grad: bool = True, teacher_grad: bool = False, **override) -> Features:
    """Features from the explicit inputs (float32). Student tensors are leaves with grad;
    `img_st`/`txt_st`/`clu_st`/`phr_st`/`neg_st` are the same tensors as their `*_s` unless overridden;
    `tok_st`, `grid2_st`, `grid3_st` (no `*_s` twin) are leaves of their own."""
    a = np_inputs()

    def t(name, requires_grad):
        return torch.tensor(a[name], dtype=torch.float32, requires_grad=requires_grad)

    f = Features(
        img_s=t("img_s", grad),
        txt_s=t("txt_s", grad),
        logit_scale_s=torch.tensor(S, requires_grad=grad),
        img_t=t("img_t", teacher_grad),
        txt_t=t("txt_t", teacher_grad),
        logit_scale_t=S_T,
        kappa_x=torch.tensor(KAPPA["x"], requires_grad=grad),
        kappa_v=torch.tensor(KAPPA["v"], requires_grad=grad),
        kappa_t=torch.tensor(KAPPA["t"], requires_grad=grad),
        img_st_masked=t("img_s_masked", grad),
        img_fused=t("img_fused", grad),
        txt_fused=t("txt_fused", grad),
        clu_s=t("clu_s", grad),
        clu_t=t("clu_t", teacher_grad),
        clu_mask=torch.tensor(a["clu_mask"]),
        phr_s=t("phr_s", grad),
        phr_t=t("phr_t", teacher_grad),
        phr_mask=torch.tensor(a["phr_mask"]),
        neg_s=t("neg_s", grad),
        neg_t=t("neg_t", teacher_grad),
        neg_mask=torch.tensor(a["neg_mask"]),
        clu_crop_t=t("clu_crop_t", teacher_grad),
        tok_st=t("tok_s", grad),  # the controls' student tensors exist in the teacher's space only
        tok_t=t("tok_t", teacher_grad),
        grid2_st=t("grid2_s", grad),
        grid2_t=t("grid2_t", teacher_grad),
        grid3_st=t("grid3_s", grad),
        grid3_t=t("grid3_t", teacher_grad),
    )
    for k, v in override.items():
        setattr(f, k, v)
    # No projector in these inputs: the teacher-space fields are the student's own tensors
    # (as in the wrapper when the widths match), so every term sees the same numbers.
    for st, s in (("img_st", "img_s"), ("txt_st", "txt_s"), ("clu_st", "clu_s"), ("phr_st", "phr_s"),
                  ("neg_st", "neg_s")):
        if st not in override:
            setattr(f, st, getattr(f, s))
    return f
