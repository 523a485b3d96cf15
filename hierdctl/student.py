"""The student wrapper: an open_clip model plus everything a recipe learns beside it.

Learnable pieces that are not the student itself live here, never in a loss:
- projectors Linear(D_s, D_t) when the student's joint width differs from the teacher's,
  used only by the terms that compare a student vector with a teacher vector;
- the relational scales κ ('x', 'v', 't'), used directly (CLIP-KD/CLIP-RD's public code)
  or through exp() with `exp_scales`;
- AFD's fusion layers Linear(D_s + D_t, D_s).
Export keeps only `student.*` and drops the rest.

`forward(batch)` turns one data batch into the `Features` that the recipe's terms read.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from .cluster import area_overlap, area_weights, cell_weights, pool_area
from .losses.features import Features

KAPPA_INIT = math.log(1 / 0.07)  # ≈ 2.659, the public code's initial value
GRID_CELLS = (2, 3)  # the fixed-grid controls of clusters: 2×2 and 3×3 cells (fields grid2_*, grid3_*)
PATCH_FIELDS = frozenset({"clu_s", "clu_st", "tok_st", *(f"grid{r}_st" for r in GRID_CELLS)})  # need patch tokens


def _pair(x) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))


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
    import open_clip

    text_global_pool = open_clip.transformer.text_global_pool
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
    """The student plus what a recipe learns beside it; `forward(batch)` -> `Features`.

    `fields` are the Features fields the recipe reads (Recipe.fields): only those are
    computed. Projectors exist when the widths differ and some term works in the teacher's
    space (a `*_st` field); the student's own embeddings are never replaced by projected
    ones, so the task loss trains the embedding that export ships.
    """

    def __init__(
        self,
        student: nn.Module,
        student_dim: int,
        teacher_dim: int | None,
        fields: tuple[str, ...] = ("img_s", "txt_s", "logit_scale_s"),
        exp_scales: bool = False,
        mask_ratio: float = 0.75,
        ensemble_dims: tuple[int, ...] = (),
    ):
        """ensemble_dims: the widths of teachers 1.. of an ensemble (teacher 0 is `teacher_dim`)."""
        super().__init__()
        self.student = student
        self.fields = frozenset(fields)
        self.exp_scales = exp_scales
        self.mask_ratio = mask_ratio
        projected = self.fields & {"img_st", "txt_st", "img_st_masked", "clu_st", "phr_st", "neg_st", "tok_st",
                                   *(f"grid{r}_st" for r in GRID_CELLS)}
        self.project = bool(projected) and teacher_dim is not None and teacher_dim != student_dim
        if self.project:
            self.img_proj = nn.Linear(student_dim, teacher_dim)
            self.txt_proj = nn.Linear(student_dim, teacher_dim)
        # An ensemble's other teachers: one projector pair each into its space (identity when widths match).
        self.ensemble_dims = tuple(ensemble_dims)
        self.ens_img_proj = nn.ModuleList(
            nn.Linear(student_dim, d) if projected and d != student_dim else nn.Identity() for d in self.ensemble_dims)
        self.ens_txt_proj = nn.ModuleList(
            nn.Linear(student_dim, d) if projected and d != student_dim else nn.Identity() for d in self.ensemble_dims)
        # With exp_scales the parameter is log κ, so both start at the same effective κ.
        init = math.log(KAPPA_INIT) if exp_scales else KAPPA_INIT
        keys = [k for k in ("x", "v", "t") if f"kappa_{k}" in self.fields]
        self.kappa = nn.ParameterDict({k: nn.Parameter(torch.tensor(init)) for k in keys})
        if self.fields & {"img_fused", "txt_fused"}:
            tdim = teacher_dim if teacher_dim is not None else student_dim
            self.img_fusion = nn.Linear(student_dim + tdim, student_dim)
            self.txt_fusion = nn.Linear(student_dim + tdim, student_dim)
        v = student.visual
        self.is_vit = all(hasattr(v, a) for a in ("conv1", "transformer", "_pool", "grid_size"))
        self.grid = tuple(v.grid_size) if self.is_vit else None
        # The share of the view's height and width that the patch grid covers: 1 unless the
        # image size is not a multiple of the patch size (the conv drops the remainder).
        self.extent = (tuple(Fraction(g * p, s) for g, p, s in zip(self.grid, _pair(v.patch_size), _pair(v.image_size)))
                       if self.is_vit else None)

    def _proj_img(self, x):
        return self.img_proj(x) if self.project else x

    def _proj_txt(self, x):
        return self.txt_proj(x) if self.project else x

    def _encode_parts(self, tok, mask, txt, project: bool):
        """The text tower on every valid entry of (N,P,L) tokens with (N,P) mask -> ((N,P,D_s),
        (N,P,D_t) or None); padding rows are zero. Only up to the batch's last real token (exact)."""
        N, P, L = tok.shape
        flat = tok.view(N * P, L)[mask.view(-1)]
        emb = encode_text_trimmed(self.student, flat) if flat.shape[0] else txt.new_zeros(0, txt.shape[-1])  # (n,D_s)
        where = (mask.view(-1).nonzero().squeeze(1),)

        def scatter(e):  # (n,D) -> (N,P,D), zero rows for padding
            out = e.new_zeros(N * P, e.shape[-1])
            return out.index_put(where, e.to(out.dtype)).view(N, P, -1)

        return scatter(emb), (scatter(self._proj_txt(emb)) if project else None)

    def _patch_features(self, f: Features, batch: dict, tokens: torch.Tensor) -> None:
        """The patch-level fields from the student's patch tokens (N,G_s,D_s), in place.

        The teacher's cluster map and tokens live on the teacher's patch grid (batch
        "teacher_grid"); both are carried onto the student's by area (hierdctl/cluster.py):
        the student's view is the teacher's crop box, so the two grids cover the same image.
        The teacher's grid is taken to cover its whole input (its image size a multiple of its
        patch size, as for every released ViT at its native size)."""
        want, t_grid = self.fields, tuple(batch.get("teacher_grid") or self.grid)
        projected = self._proj_img(tokens) if want & (PATCH_FIELDS - {"clu_s"}) else None  # (N,G_s,D_t)
        if want & {"clu_s", "clu_st"}:
            # Student cluster k = normalise(Σ_g W[g,k]·token_g), W = O·A: each student patch's
            # area share per teacher cluster. A cluster that covers no student area (coverage 0)
            # has no student vector: it leaves the mask, so it drops out of every term's mean.
            K = batch["clu_t"].shape[1]
            weights = area_weights(batch["clu_assign"].flatten(1), K, t_grid, self.grid, self.extent)  # (N,G_s,K)
            if "clu_s" in want:
                f.clu_s, cover = pool_area(tokens, weights)  # (N,K,D_s), (N,K)
            if "clu_st" in want and "clu_s" in want and not self.project:
                f.clu_st = f.clu_s  # no projector: the very same tensor (as img_st is img_s)
            elif "clu_st" in want:
                f.clu_st, cover = pool_area(projected, weights)  # (N,K,D_t)
            f.clu_t, f.clu_mask = batch["clu_t"], batch["clu_mask"] & (cover > 0)
        if "tok_st" in want:  # dense FD: the teacher's tokens, area-resampled onto the student's grid
            f.tok_st, tok_t = projected, batch["tok_t"].float()  # (N,G_s,D_t), (N,G_t,D_t)
            if t_grid != self.grid or self.extent != (1, 1):
                o = area_overlap(self.grid, t_grid, self.extent).to(tokens.device, torch.float32)  # (G_s,G_t)
                tok_t = torch.einsum("st,ntd->nsd", o, tok_t)
            f.tok_t = F.normalize(tok_t, dim=-1)  # (N,G_s,D_t)
        for r in GRID_CELLS:  # fixed cells over the view, pooled on each model's own grid
            if f"grid{r}_st" in want:
                w_s = cell_weights(r, self.grid, self.extent).to(tokens.device, torch.float32)  # (G_s,r²)
                w_t = cell_weights(r, t_grid).to(tokens.device, torch.float32)  # (G_t,r²)
                n = tokens.shape[0]
                setattr(f, f"grid{r}_st", pool_area(projected, w_s.expand(n, -1, -1))[0])  # (N,r²,D_t)
                setattr(f, f"grid{r}_t", pool_area(batch["tok_t"].float(), w_t.expand(n, -1, -1))[0])

    def forward(self, batch: dict) -> Features:
        m, want = self.student, self.fields
        images, text = batch["image"], batch["text"]  # (N,3,S,S), (N,L)
        need_tokens = bool(want & PATCH_FIELDS)
        if need_tokens:
            pooled, tokens = vit_tokens(m.visual, images)  # (N,D_s), (N,G,D_s)
        else:
            pooled, tokens = m.encode_image(images), None
        txt = encode_text_trimmed(m, text)  # (N,D_s); exact: padding after the batch's last token is cut
        # The parameter is clamped to ≤ ln 100 after each optimizer step (open_clip's rule), not
        # here: clamping exp() would pass no gradient once the scale reaches its cap.
        f = Features(img_s=pooled, txt_s=txt, logit_scale_s=m.logit_scale.exp(),
                     img_t=batch.get("img_t"), txt_t=batch.get("txt_t"), logit_scale_t=batch.get("logit_scale_t"))
        if "img_st" in want:
            f.img_st = self._proj_img(pooled)
        if "txt_st" in want:
            f.txt_st = self._proj_txt(txt)
        for k, p in self.kappa.items():
            setattr(f, f"kappa_{k}", p.exp() if self.exp_scales else p)
        if need_tokens:
            self._patch_features(f, batch, tokens)
        for part in ("phr", "neg"):  # phrases, caption perturbations: the text tower on each
            if want & {f"{part}_s", f"{part}_st"}:
                own, projected = self._encode_parts(batch[f"{part}_tok"], batch[f"{part}_mask"], txt,
                                                    f"{part}_st" in want)
                setattr(f, f"{part}_s", own if f"{part}_s" in want else None)
                setattr(f, f"{part}_st", projected)
                setattr(f, f"{part}_t", batch[f"{part}_t"])
                setattr(f, f"{part}_mask", batch[f"{part}_mask"])
        if "clu_crop_t" in want:
            f.clu_crop_t = batch["clu_crop_t"]
        masked = None
        if "img_st_masked" in want:
            assert self.is_vit, "MFD needs a ViT student"
            # Per-sample noise comes from the data (seeded by sample and epoch), so the
            # mask does not depend on the world size or on a resume.
            G = self.grid[0] * self.grid[1]
            noise = batch["mask_noise"]  # (N,G)
            assert noise.shape == (images.shape[0], G), (noise.shape, G)
            n_keep = max(1, int(round(G * (1 - self.mask_ratio))))
            keep = noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values  # (N,G_keep) kept patch indices
            masked = vit_tokens(m.visual, images, keep)[0]  # (N,D_s)
            f.img_st_masked = self._proj_img(masked)
        if want & {"img_fused", "txt_fused"}:  # before `second`, which fuses its own caption beside these
            f.img_fused = self.img_fusion(torch.cat([F.normalize(pooled, dim=-1), batch["img_t"]], dim=-1))
            f.txt_fused = self.txt_fusion(torch.cat([F.normalize(txt, dim=-1), batch["txt_t"]], dim=-1))
        if batch.get("second"):  # real+synthetic: the same images with each sample's synthetic caption
            sec = batch["second"]
            txt2 = encode_text_trimmed(m, sec["text"])  # (N,D_s)
            f.second = dataclasses.replace(
                f, txt_s=txt2, txt_t=sec.get("txt_t"), txt_st=self._proj_txt(txt2) if "txt_st" in want else None,
                txt_fused=(self.txt_fusion(torch.cat([F.normalize(txt2, dim=-1), sec["txt_t"]], dim=-1))
                           if f.txt_fused is not None else None), second=None)
        if batch.get("ensemble"):  # teachers 1.. of an ensemble: theirs, and the student in their spaces
            first = {"img_t": f.img_t, "txt_t": f.txt_t, "logit_scale_t": f.logit_scale_t, "img_st": f.img_st,
                     "txt_st": f.txt_st, "img_st_masked": f.img_st_masked}
            f.ensemble = [first]
            for k, t in enumerate(batch["ensemble"]):
                ip, tp = self.ens_img_proj[k], self.ens_txt_proj[k]
                f.ensemble.append(dict(t) | {
                    "img_st": ip(pooled) if "img_st" in want else None, "txt_st": tp(txt) if "txt_st" in want else None,
                    "img_st_masked": ip(masked) if masked is not None else None})
            if f.second is not None:  # the second caption's view of the ensemble
                sec = batch["second"]
                f.second.ensemble = [e | {"txt_t": f.second.txt_t if k == 0 else sec[f"txt_t_{k}"],
                                          "txt_st": (f.second.txt_st if k == 0 else self.ens_txt_proj[k - 1](f.second.txt_s))
                                          if e["txt_st"] is not None else None}
                                     for k, e in enumerate(f.ensemble)]
        return f
