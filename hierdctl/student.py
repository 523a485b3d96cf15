"""The student wrapper: an open_clip model plus everything a recipe learns beside it.

Learnable pieces that are not the student itself live here, never in a loss:
- projectors Linear(D_s, D_t) when the student's joint width differs from the teacher's;
- the relational scales κ ('x', 'v', 't'), used directly (CLIP-KD/CLIP-RD's public code)
  or through exp() with `exp_scales`;
- AFD's fusion layers Linear(D_s + D_t, D_s).
Export keeps only `student.*` and drops the rest.

`forward(batch)` turns one data batch into a `Features` for the loss modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cluster import pool_clusters, resample_assign
from .losses.features import Features

KAPPA_INIT = math.log(1 / 0.07)  # ≈ 2.659, the public code's initial value


def vit_tokens(visual, x: torch.Tensor, keep: torch.Tensor | None = None):
    """open_clip VisionTransformer forward that also returns the projected patch tokens.

    x (B,3,H,W) -> pooled (B,D), tokens (B,G',D). With `keep` (B,G_keep) patch indices,
    only those patches enter the transformer (MFD's masking; G' = G_keep).
    """
    h = visual.conv1(x).flatten(2).transpose(1, 2)  # (B,G,W)
    pos = visual.positional_embedding.to(h.dtype)
    h = h + pos[1:]
    if keep is not None:
        h = torch.gather(h, 1, keep.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
    cls = (visual.class_embedding.to(h.dtype) + pos[0]).expand(h.shape[0], 1, -1)
    h = visual.ln_pre(torch.cat([cls, h], dim=1))
    h = visual.transformer(h)
    pooled, tokens = visual._pool(h)
    if visual.proj is not None:
        pooled, tokens = pooled @ visual.proj, tokens @ visual.proj
    return pooled, tokens


def encode_text_trimmed(model: nn.Module, text: torch.Tensor) -> torch.Tensor:
    """`model.encode_text(text)` computed only up to the batch's last non-padding token.

    text (B,L) -> (B,D). open_clip's CLIP text tower is causal and pools at the EOT token
    (argmax / eos pooling), so padding after the last EOT of the batch influences nothing:
    cutting it is exact and saves the padded positions' compute. Short texts (HieRD's
    phrases: 3–8 tokens in a 77-token context) get ~10× cheaper. Any other text tower
    (no causal mask, other pooling, custom text towers) runs unchanged.
    """
    L = text.shape[1]
    ok = (
        all(hasattr(model, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final"))
        and getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", None) in ("argmax", "eos")
    )
    nonpad = (text != 0).any(dim=0).nonzero()  # positions holding a token in some row (pad id is 0)
    n = int(nonpad.max()) + 1 if nonpad.numel() else 1
    if not ok or n >= L:
        return model.encode_text(text)
    from .tv_shim import import_open_clip

    text_global_pool = import_open_clip().transformer.text_global_pool
    text = text[:, :n]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype)  # (B,n,W)
    x = x + model.positional_embedding[:n].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    x = text_global_pool(x, text, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x


class StudentWrapper(nn.Module):
    def __init__(
        self,
        student: nn.Module,
        student_dim: int,
        teacher_dim: int | None,
        kappa_keys=(),
        extras=(),
        exp_scales: bool = False,
        mask_ratio: float = 0.75,
    ):
        super().__init__()
        self.student = student
        self.extras = tuple(extras)
        self.exp_scales = exp_scales
        self.mask_ratio = mask_ratio
        self.project = teacher_dim is not None and teacher_dim != student_dim
        if self.project:
            self.img_proj = nn.Linear(student_dim, teacher_dim)
            self.txt_proj = nn.Linear(student_dim, teacher_dim)
        # With exp_scales the parameter is log κ, so both start at the same effective κ.
        init = math.log(KAPPA_INIT) if exp_scales else KAPPA_INIT
        self.kappa = nn.ParameterDict({k: nn.Parameter(torch.tensor(init)) for k in kappa_keys})
        if "fusion" in self.extras:
            tdim = teacher_dim if teacher_dim is not None else student_dim
            self.img_fusion = nn.Linear(student_dim + tdim, student_dim)
            self.txt_fusion = nn.Linear(student_dim + tdim, student_dim)
        v = student.visual
        self.is_vit = all(hasattr(v, a) for a in ("conv1", "transformer", "_pool", "grid_size"))
        self.grid = tuple(v.grid_size) if self.is_vit else None

    def _proj_img(self, x):
        return self.img_proj(x) if self.project else x

    def _proj_txt(self, x):
        return self.txt_proj(x) if self.project else x

    def forward(self, batch: dict) -> Features:
        m = self.student
        images, text = batch["image"], batch["text"]  # (N,3,S,S), (N,L)
        need_tokens = "patch_tokens" in self.extras
        if need_tokens:
            pooled, tokens = vit_tokens(m.visual, images)
        else:
            pooled, tokens = m.encode_image(images), None
        txt = m.encode_text(text)
        f = Features(
            img_s=self._proj_img(pooled),
            txt_s=self._proj_txt(txt),
            logit_scale_s=m.logit_scale.exp().clamp(max=100.0),
            img_t=batch.get("img_t"),
            txt_t=batch.get("txt_t"),
            logit_scale_t=batch.get("logit_scale_t"),
        )
        f.kappa = {k: (p.exp() if self.exp_scales else p) for k, p in self.kappa.items()}
        if need_tokens:
            # Pool the student's projected patch tokens with the teacher's cluster map,
            # resampled (nearest) from the teacher's patch grid to the student's.
            K = batch["clu_t"].shape[1]
            assign = resample_assign(batch["clu_assign"].flatten(1), tuple(batch["teacher_grid"]), self.grid)
            f.clu_s = pool_clusters(self._proj_img(tokens), assign, K)  # (N,K,D)
            f.clu_t, f.clu_mask = batch["clu_t"], batch["clu_mask"]
        if "phrase_forward" in self.extras:
            ptok, pmask = batch["phr_tok"], batch["phr_mask"]  # (N,P,L), (N,P)
            N, P, L = ptok.shape
            flat = ptok.view(N * P, L)[pmask.view(-1)]
            emb = self._proj_txt(encode_text_trimmed(m, flat)) if flat.shape[0] else None
            D = f.txt_s.shape[-1]
            phr = f.txt_s.new_zeros(N * P, D)
            if emb is not None:
                phr = phr.index_put((pmask.view(-1).nonzero().squeeze(1),), emb.to(phr.dtype))
            f.phr_s, f.phr_t, f.phr_mask = phr.view(N, P, D), batch["phr_t"], pmask
        if "masked_forward" in self.extras:
            assert self.is_vit, "MFD needs a ViT student"
            # Per-sample noise comes from the data (seeded by sample and epoch), so the
            # mask does not depend on the world size or on a resume.
            G = self.grid[0] * self.grid[1]
            noise = batch["mask_noise"]  # (N,G)
            assert noise.shape == (images.shape[0], G), (noise.shape, G)
            n_keep = max(1, int(round(G * (1 - self.mask_ratio))))
            keep = noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values  # (N,G_keep) kept patch indices
            f.img_s_masked = self._proj_img(vit_tokens(m.visual, images, keep)[0])
        if "fusion" in self.extras:
            f.img_fused = self.img_fusion(torch.cat([F.normalize(pooled, dim=-1), batch["img_t"]], dim=-1))
            f.txt_fused = self.txt_fusion(torch.cat([F.normalize(txt, dim=-1), batch["txt_t"]], dim=-1))
        return f
