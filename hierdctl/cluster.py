"""Clustered visual tokens: batched spherical k-means over a teacher's patch tokens, and
pooling a (student's) patch tokens by those clusters, or by fixed cells, on any patch grid.

k-means runs once at cache time on the teacher's device. Deterministic: seeding is
farthest-point (no randomness), iterations are fixed, ties break by index. An optional weight
on each patch's (row, col) position keeps clusters spatially coherent.

Pooling at training time is by area (`area_weights`, `pool_area`): a student patch counts
towards a teacher cluster in proportion to the share of its area that the cluster's teacher
patches cover, so a student whose patch grid differs from the teacher's loses no cluster.
"""

from __future__ import annotations

import functools
from fractions import Fraction

import torch
import torch.nn.functional as F


def _positions(grid: tuple[int, int], device) -> torch.Tensor:
    """(G, 2) patch centres in [-1, 1], row-major like the ViT token order."""
    gh, gw = grid
    ys = (torch.arange(gh, device=device, dtype=torch.float32) + 0.5) / gh * 2 - 1
    xs = (torch.arange(gw, device=device, dtype=torch.float32) + 0.5) / gw * 2 - 1
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(gh * gw, 2)


@torch.no_grad()
def spherical_kmeans(
    tokens: torch.Tensor, k: int, grid: tuple[int, int], iters: int = 10, pos_weight: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster each image's patch tokens.

    tokens: (B, G, D) patch tokens (any scale), G = gh*gw.
    Returns assign (B, G) int64 in [0, k) and counts (B, k) int64 (0 = empty cluster).
    Similarity is the cosine of [normalised token ‖ sqrt(pos_weight)·position], so
    pos_weight = 0 is plain spherical k-means on the tokens.
    """
    B, G, D = tokens.shape
    assert G == grid[0] * grid[1], (tokens.shape, grid)
    x = F.normalize(tokens.float(), dim=-1)
    if pos_weight > 0:
        pos = _positions(grid, tokens.device).expand(B, G, 2) * pos_weight**0.5
        x = F.normalize(torch.cat([x, pos], dim=-1), dim=-1)
    k_eff = min(k, G)
    # Farthest-point seeding: start from the token nearest the mean direction, then
    # repeatedly take the token least similar to every chosen centre.
    mean = F.normalize(x.mean(dim=1, keepdim=True), dim=-1)  # (B,1,D')
    first = (x * mean).sum(-1).argmax(dim=1)  # (B,)
    idx = [first]
    best = torch.einsum("bgd,bd->bg", x, x[torch.arange(B), first])  # (B,G) max sim to chosen
    for _ in range(1, k_eff):
        nxt = best.argmin(dim=1)
        idx.append(nxt)
        best = torch.maximum(best, torch.einsum("bgd,bd->bg", x, x[torch.arange(B), nxt]))
    centres = torch.stack([x[torch.arange(B), i] for i in idx], dim=1)  # (B,k_eff,D')
    for _ in range(iters):
        assign = torch.einsum("bgd,bkd->bgk", x, centres).argmax(dim=-1)  # (B,G)
        onehot = F.one_hot(assign, k_eff).float()  # (B,G,k)
        sums = torch.einsum("bgk,bgd->bkd", onehot, x)
        counts = onehot.sum(dim=1)  # (B,k)
        # An emptied cluster keeps its previous centre.
        centres = torch.where(counts.unsqueeze(-1) > 0, F.normalize(sums, dim=-1), centres)
    assign = torch.einsum("bgd,bkd->bgk", x, centres).argmax(dim=-1)
    counts = F.one_hot(assign, k).sum(dim=1)  # (B,k), clusters ≥ k_eff stay empty
    return assign, counts


def pool_clusters(tokens: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """Mean token of each cluster, L2-normalised; empty clusters are zero vectors.

    tokens (B,G,D), assign (B,G) -> (B,k,D). Differentiable in `tokens` (students use it).
    """
    onehot = F.one_hot(assign.long(), k).to(tokens.dtype)  # (B,G,k)
    sums = torch.einsum("bgk,bgd->bkd", onehot, tokens)
    return F.normalize(sums, dim=-1)  # normalize leaves an all-zero row at zero


# --- pooling over another patch grid, by area -------------------------------------------
# The student's view replays the teacher's crop box, so both patch grids lie over the same
# image; they differ only in how finely they cut it (ViT-L/14 -> ViT-T/16 at 224 px: 16x16 ->
# 14x14; B/16 -> B/32: 14x14 -> 7x7). Patch h of one grid covers a share of patch g of the
# other that follows from the geometry alone, so pooling by area is exact for any two grids.


def _overlap_1d(n_dst: int, n_src: int, e_dst: Fraction, e_src: Fraction) -> list[list[Fraction]]:
    """(n_dst, n_src): the share of each dst interval covered by each src interval, exactly.

    Along one axis the dst grid cuts [0, e_dst] of the view into n_dst equal intervals, the
    src grid [0, e_src] into n_src (e = 1: the whole side)."""
    a, b = e_dst / n_dst, e_src / n_src  # interval lengths
    return [[max(Fraction(0), min((i + 1) * a, (j + 1) * b) - max(i * a, j * b)) / a for j in range(n_src)]
            for i in range(n_dst)]


@functools.lru_cache(maxsize=64)
def area_overlap(dst_grid: tuple[int, int], src_grid: tuple[int, int], dst_extent: tuple = (1, 1),
                 src_extent: tuple = (1, 1)) -> torch.Tensor:
    """O (G_dst, G_src) float64, row-major patches: O[g, h] = area(dst patch g ∩ src patch h) /
    area(dst patch g). Computed in rational arithmetic, so zeros are exact zeros.

    Both grids start at the view's top-left corner; `*_extent` = (height, width) share of the
    view the grid covers (1: all of it; an open_clip ViT's grid covers grid·patch / image_size,
    less than 1 when the image size is not a multiple of the patch size). Rows sum to 1 where
    the src grid covers the whole dst patch, less where it covers only part of it. Equal grids
    over equal extents give the identity. Do not modify the returned (cached) tensor.
    """
    (hd, wd), (hs, ws) = dst_grid, src_grid
    ey_d, ex_d = (Fraction(e) for e in dst_extent)
    ey_s, ex_s = (Fraction(e) for e in src_extent)
    oy = torch.tensor([[float(x) for x in row] for row in _overlap_1d(hd, hs, ey_d, ey_s)], dtype=torch.float64)
    ox = torch.tensor([[float(x) for x in row] for row in _overlap_1d(wd, ws, ex_d, ex_s)], dtype=torch.float64)
    # Separable: O[(r, c), (r', c')] = oy[r, r'] · ox[c, c'], which is the Kronecker product.
    return torch.kron(oy, ox)


def _same_grid(dst_grid, src_grid, dst_extent, src_extent) -> bool:
    return tuple(dst_grid) == tuple(src_grid) and tuple(map(Fraction, dst_extent)) == tuple(map(Fraction, src_extent))


def area_weights(assign: torch.Tensor, k: int, src_grid: tuple[int, int], dst_grid: tuple[int, int],
                 dst_extent: tuple = (1, 1)) -> torch.Tensor:
    """W (B, G_dst, k) float32: each dst patch's area share per cluster, W = O·A.

    assign (B, G_src) cluster index of every src (teacher) patch, A its one-hot (B, G_src, k),
    O = area_overlap(dst_grid, src_grid, dst_extent) (the src grid covers the whole view).
    On equal grids W = A exactly."""
    onehot = F.one_hot(assign.long(), k).float()  # (B,G_src,k)
    if _same_grid(dst_grid, src_grid, dst_extent, (1, 1)):
        return onehot
    o = area_overlap(tuple(dst_grid), tuple(src_grid), tuple(dst_extent)).to(onehot.device, torch.float32)
    return torch.einsum("st,btk->bsk", o, onehot)  # (B,G_dst,k)


def pool_area(tokens: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Area-weighted pooling: part k = normalise(Σ_g W[g, k]·token_g).

    tokens (B, G, D), weights (B, G, k) (from `area_weights`, or the cells of `cell_weights`) ->
    (parts (B, k, D) L2-normalised, coverage (B, k) = Σ_g W[g, k]: the part's area in patches).
    A part with coverage 0 covers no patch of this grid: its vector is zero, and it must be
    masked out of every mean. With one-hot weights this is `pool_clusters`, to the bit.
    Differentiable in `tokens`.
    """
    assert weights.shape[:2] == tokens.shape[:2], (weights.shape, tokens.shape)
    sums = torch.einsum("bgk,bgd->bkd", weights.to(tokens.dtype), tokens)
    return F.normalize(sums, dim=-1), weights.sum(dim=1)


def cell_weights(cells: int, grid: tuple[int, int], extent: tuple = (1, 1)) -> torch.Tensor:
    """(G, cells²) float64: each patch's area share in each of a fixed cells×cells grid over
    the whole view, row-major cells (the fixed-grid control of k-means clusters)."""
    return area_overlap(tuple(grid), (cells, cells), tuple(extent), (1, 1))
