"""Clustered visual tokens: batched spherical k-means over a teacher's patch tokens.

Run once at cache time on the teacher's device. Deterministic: seeding is farthest-point
(no randomness), iterations are fixed, ties break by index. An optional weight on each
patch's (row, col) position keeps clusters spatially coherent.
"""

from __future__ import annotations

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


def resample_assign(assign: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resampling of (B, gh*gw) assignment maps to another patch grid."""
    if tuple(src_grid) == tuple(dst_grid):
        return assign
    B = assign.shape[0]
    a = assign.view(B, 1, *src_grid).float()
    return F.interpolate(a, size=tuple(dst_grid), mode="nearest").long().view(B, -1)
