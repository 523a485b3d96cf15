"""Part pooling across patch grids (issue 24): the teacher's cluster map carried onto the
student's patch grid by area, checked against geometry computed by hand and against an
independent raster count; the coverage mask; and distill runs whose student cuts the image
into another patch grid than the teacher."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_CFG, make_shards
from hierdctl.cluster import area_overlap, area_weights, cell_weights, pool_area, pool_clusters


def raster_overlap(dst_grid, src_grid, dst_cover=(1, 1), res=None) -> np.ndarray:
    """Independent reference: cut the view into res×res pixels, give each pixel to the dst and the
    src patch whose box holds its centre, count. dst_cover: the share of the view the dst grid
    covers (pixels outside it belong to no dst patch); the src grid covers the view."""
    (hd, wd), (hs, ws) = dst_grid, src_grid
    res = res or int(np.lcm.reduce([hd, wd, hs, ws])) * 8
    c = (np.arange(res) + 0.5) / res  # pixel centres in [0, 1]
    ey, ex = (float(e) for e in dst_cover)
    dy, dx = np.floor(c / ey * hd).astype(int), np.floor(c / ex * wd).astype(int)  # dst patch per row / column
    sy, sx = np.floor(c * hs).astype(int), np.floor(c * ws).astype(int)
    counts = np.zeros((hd * wd, hs * ws))
    for y in range(res):
        for x in range(res):
            if dy[y] < hd and dx[x] < wd:
                counts[dy[y] * wd + dx[x], sy[y] * ws + sx[x]] += 1
    return counts / counts.sum(1, keepdims=True)


def nearest_assign(assign: torch.Tensor, src, dst) -> torch.Tensor:
    """What the student used before issue 24: nearest-neighbour (floor) resampling of the map."""
    a = assign.view(assign.shape[0], 1, *src).float()
    return F.interpolate(a, size=tuple(dst), mode="nearest").long().view(assign.shape[0], -1)


# --- the overlap matrix O (G_s × G_t), by hand ---------------------------------------------


def test_14_to_7_each_student_patch_is_four_teacher_patches():
    o = area_overlap((7, 7), (14, 14))
    assert o.shape == (49, 196) and o.dtype == torch.float64
    expected = torch.zeros(49, 196, dtype=torch.float64)
    for r in range(7):
        for c in range(7):
            for dr in (0, 1):
                for dc in (0, 1):
                    expected[r * 7 + c, (2 * r + dr) * 14 + 2 * c + dc] = 0.25
    assert torch.equal(o, expected)
    # e.g. student patch (0,0) = teacher patches 0, 1, 14, 15, a quarter each
    assert o[0].nonzero().flatten().tolist() == [0, 1, 14, 15]


def test_16_to_14_by_hand():
    # One axis, in units of 1/224 of the side: student patch i spans [16i, 16i+16], teacher
    # patch j spans [14j, 14j+14]. Student 0 = 14/16 of teacher 0 + 2/16 of teacher 1, etc.
    by_hand_1d = {0: {0: 7 / 8, 1: 1 / 8}, 1: {1: 3 / 4, 2: 1 / 4}, 6: {6: 1 / 8, 7: 7 / 8}, 7: {8: 7 / 8, 9: 1 / 8},
                  13: {14: 1 / 8, 15: 7 / 8}}
    o = area_overlap((14, 14), (16, 16))
    assert o.shape == (196, 256)
    for i, row in by_hand_1d.items():
        for k, share in row.items():  # a student patch on row i, column 0: its row's shares times column 0's
            assert o[i * 14, k * 16 + 0] == pytest.approx(share * 7 / 8, abs=0)
        assert o[i * 14].sum() == pytest.approx(1.0)
    assert o[0, 0] == 49 / 64 and o[0, 1] == 7 / 64 and o[0, 16] == 7 / 64 and o[0, 17] == 1 / 64
    assert o[1 * 14 + 6, 2 * 16 + 7] == pytest.approx(1 / 4 * 7 / 8)  # student (1,6) ∩ teacher (2,7)
    assert (o.count_nonzero(dim=1) <= 4).all()  # a 16/14-wide patch meets at most 2 teacher patches per axis
    torch.testing.assert_close(o.sum(1), torch.ones(196, dtype=torch.float64), rtol=0, atol=1e-12)
    # a teacher patch's area, in student patches: (14/16)² wherever it lies
    torch.testing.assert_close(o.sum(0), torch.full((256,), 49 / 64, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dst, src", [((7, 7), (14, 14)), ((14, 14), (16, 16)), ((3, 3), (4, 4)), ((4, 4), (3, 3)),
                                      ((2, 3), (5, 4))])
def test_overlap_equals_an_independent_raster_count(dst, src):
    np.testing.assert_allclose(area_overlap(dst, src).numpy(), raster_overlap(dst, src), rtol=0, atol=1e-12)


def test_8_to_8_is_the_identity_and_pooling_is_todays_to_the_bit():
    assert torch.equal(area_overlap((8, 8), (8, 8)), torch.eye(64, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 64, 16, generator=g)
    assign = torch.randint(0, 5, (3, 64), generator=g)
    assign[0, assign[0] == 4] = 3  # sample 0 has an empty cluster
    weights = area_weights(assign, 6, (8, 8), (8, 8))
    assert torch.equal(weights, F.one_hot(assign, 6).float())
    pooled, cover = pool_area(tokens, weights)
    assert torch.equal(pooled, pool_clusters(tokens, assign, 6))
    assert torch.equal(cover, F.one_hot(assign, 6).sum(1).float())  # the teacher's counts
    assert cover[0, 4] == 0 and cover[:, 5].eq(0).all()


def test_student_clusters_are_area_weighted_means():
    # 16x16 teacher -> 14x14 student: cluster 1 = the teacher's top-left 2×2 patches, cluster 0 the rest.
    assign = torch.zeros(1, 256, dtype=torch.long)
    for r in (0, 1):
        for c in (0, 1):
            assign[0, r * 16 + c] = 1
    tokens = torch.randn(1, 196, 8, generator=torch.Generator().manual_seed(1))
    w = area_weights(assign, 2, (16, 16), (14, 14))
    pooled, cover = pool_area(tokens, w)
    # teacher patches 0..1 per axis span [0, 28]/224: student patch 0 [0, 16] wholly, student 1
    # [16, 32] for 12/16 = 3/4; so per axis the weights are (1, 3/4), and in 2-D their products.
    share = {0: 1.0, 1: 0.75}
    by_hand = sum(share[r] * share[c] * tokens[0, r * 14 + c] for r in (0, 1) for c in (0, 1))
    torch.testing.assert_close(pooled[0, 1], F.normalize(by_hand, dim=0))
    assert cover[0, 1].item() == pytest.approx((1 + 0.75) ** 2)
    assert cover[0].sum().item() == pytest.approx(196.0)  # every student patch's area is shared out


# --- small clusters ------------------------------------------------------------------------


@pytest.mark.parametrize("src, dst, patch", [((14, 14), (7, 7), (1, 1)), ((16, 16), (14, 14), (7, 7))])
def test_a_one_patch_cluster_that_nearest_neighbour_drops_keeps_its_area(src, dst, patch):
    """14×14 → 7×7: NN keeps every other teacher row/column, so teacher patch (1,1) reaches no student
    patch; 16×16 → 14×14 (ViT-L/14 → ViT-T/16): NN skips teacher rows/columns 7 and 15."""
    g_t = patch[0] * src[1] + patch[1]
    assign = torch.zeros(1, src[0] * src[1], dtype=torch.long)
    assign[0, g_t] = 1  # cluster 1 = one teacher patch
    assert not (nearest_assign(assign, src, dst) == 1).any()  # nearest neighbour: gone
    w = area_weights(assign, 2, src, dst)
    o = area_overlap(dst, src)
    expect = o[:, g_t].float()  # the student patches it overlaps, by their share
    torch.testing.assert_close(w[0, :, 1], expect)
    tokens = torch.randn(1, dst[0] * dst[1], 8, generator=torch.Generator().manual_seed(2))
    pooled, cover = pool_area(tokens, w)
    assert cover[0, 1] > 0 and pooled[0, 1].norm() == pytest.approx(1.0)
    torch.testing.assert_close(pooled[0, 1], F.normalize((expect[:, None] * tokens[0]).sum(0), dim=0))
    if src == (14, 14):  # a quarter of student patch (0,0)
        assert w[0, 0, 1] == 0.25 and w[0, 1:, 1].eq(0).all()
    else:  # 7/8 × 7/8 of student patch (6,6)
        assert w[0, 6 * 14 + 6, 1] == 49 / 64 and w[0, :, 1].count_nonzero() == 1


def test_a_cluster_outside_the_students_grid_has_no_coverage():
    # A 7×7 student grid of 8-px patches over a 64-px view covers its first 56 px; the teacher's
    # 8×8 grid covers all 64. A cluster on the teacher's last row lies where no student patch is.
    cover_share = (Fraction(56, 64), Fraction(56, 64))
    o = area_overlap((7, 7), (8, 8), cover_share)
    np.testing.assert_allclose(o.numpy(), raster_overlap((7, 7), (8, 8), cover_share), rtol=0, atol=1e-12)
    assign = torch.zeros(1, 64, dtype=torch.long)
    assign[0, 56:] = 1  # the teacher's bottom row
    assign[0, 3] = 2  # one patch of the top row
    pooled, cover = pool_area(torch.randn(1, 49, 4), area_weights(assign, 3, (8, 8), (7, 7), cover_share))
    assert cover[0, 1] == 0 and pooled[0, 1].eq(0).all()
    # the two grids' patches coincide where both exist: teacher patch (0,3) is student patch (0,3)
    assert cover[0, 2] == 1 and cover[0, 0] == 48


def test_fixed_cells_by_hand():
    # 3×3 cells over a 4×4 patch grid: per axis the cell boundaries 1/3, 2/3 cut patches 1 and 2.
    w = cell_weights(3, (4, 4))
    by_hand_1d = [[1, 0, 0], [1 / 3, 2 / 3, 0], [0, 2 / 3, 1 / 3], [0, 0, 1]]
    np.testing.assert_allclose(w.numpy(), np.kron(by_hand_1d, by_hand_1d), rtol=0, atol=1e-12)
    assert torch.equal(cell_weights(2, (4, 4)), area_overlap((4, 4), (2, 2)))
    assert cell_weights(2, (4, 4))[0].tolist() == [1.0, 0.0, 0.0, 0.0]


# --- the student wrapper and distill --------------------------------------------------------


def _student(tmp_path: Path, image_size: int, patch_size: int) -> str:
    cfg = json.loads(json.dumps(TINY_CFG))
    cfg["vision_cfg"] |= {"image_size": image_size, "patch_size": patch_size}
    path = tmp_path / f"student-{image_size}-{patch_size}.json"
    path.write_text(json.dumps(cfg))
    return f"open_clip:{path}"


def test_the_wrapper_masks_clusters_from_teacher_counts_and_student_coverage():
    import open_clip

    from hierdctl.student import StudentWrapper

    cfg = json.loads(json.dumps(TINY_CFG))
    cfg["vision_cfg"] |= {"image_size": 36, "patch_size": 8}  # a 4×4 grid over 32 of 36 px
    torch.manual_seed(0)
    wrapper = StudentWrapper(open_clip.CLIP(**cfg), 32, 32, ("img_s", "txt_s", "clu_st", "clu_t", "clu_mask"))
    assert wrapper.grid == (4, 4) and wrapper.extent == (Fraction(8, 9), Fraction(8, 9))
    N, K = 2, 4
    assign = torch.zeros(N, 16, 16, dtype=torch.long)
    assign[:, :, 15] = 1  # the teacher's last column, [15/16, 1] of the view: beyond the student's 8/9
    assign[:, 0, 0] = 2
    counts_mask = torch.tensor([[True, True, True, False], [True, True, False, False]])  # as the cache says
    batch = {"image": torch.randn(N, 3, 36, 36), "text": torch.randint(1, 100, (N, 77)),
             "clu_assign": assign, "clu_t": F.normalize(torch.randn(N, K, 32), dim=-1), "clu_mask": counts_mask,
             "teacher_grid": (16, 16)}
    f = wrapper(batch)
    assert f.clu_mask.tolist() == [[True, False, True, False], [True, False, False, False]]
    assert f.clu_st[:, 1].eq(0).all() and (f.clu_st[0, 2].norm() - 1).abs() < 1e-5


@pytest.fixture(scope="module")
def tokens_cache(tmp_path_factory, tiny_teacher) -> Path:
    from hierdctl.stages.cache_teacher import CacheTeacherConfig
    from hierdctl.stages.cache_teacher import run as cache_run

    d = tmp_path_factory.mktemp("pooling")
    src = make_shards(d / "data", n_shards=2, per_shard=8)
    cache_run(CacheTeacherConfig(source=src, out=d / "cache", teacher=tiny_teacher, views=2, clusters=4,
                                 max_phrases=3, store="tokens", workers=0, quiet=True))
    return d / "cache"


def _cfg(cache: Path, out: Path, **kw):
    from hierdctl.stages import distill as S

    base = dict(cache=str(cache), student="tiny-test", recipe="hierd", out=str(out), steps=3, batch_size=8,
                lr=1e-3, warmup=1, workers=0, quiet=True, log_every=1, seed=1)
    return S.resolve_config(base | kw)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("image_size, patch_size, grid", [(48, 16, (3, 3)), (32, 4, (8, 8))])
def test_distill_with_a_student_on_another_patch_grid(tokens_cache, tmp_path, image_size, patch_size, grid):
    """The tiny teacher sees a 4×4 grid (32 px, patch 8); the student 3×3 (48 px, patch 16: the
    16→14 kind of mismatch) or 8×8 (32 px, patch 4). Every part term trains with finite values,
    the student's clusters are the area-weighted means of its patch tokens, the masks are the
    teacher's counts (a 4×4 map carried by area reaches every student grid)."""
    from hierdctl import cache_format, distributed
    from hierdctl.losses.registry import Recipe, Term, load_recipe
    from hierdctl.stages import distill as S
    from hierdctl.student import vit_tokens

    student = _student(tmp_path, image_size, patch_size)
    recipe = tmp_path / "parts.yaml"
    names = ("clip", "fd", "hierd_clu_fd", "hierd_phr_fd", "hierd_clu_clu", "hierd_clu_phr", "hierd_clu_phr_bx",
             "dense_fd", "grid2_fd", "grid3_fd")
    recipe.write_text("terms:\n" + "".join(f"  - {{name: {n}, weight: 1.0}}\n" for n in names))
    S.run(_cfg(tokens_cache, tmp_path / "run", student=student, recipe=str(recipe)))
    rows = _metrics(tmp_path / "run")
    assert len(rows) == 3 and all(np.isfinite(r[f"{n}_loss"]) for r in rows for n in names)
    assert all(rows[0][f"{n}_loss"] > 0 for n in ("hierd_clu_fd", "dense_fd", "grid2_fd", "grid3_fd"))

    cache = cache_format.open_cache(tokens_cache)
    cfg = _cfg(tokens_cache, tmp_path / "unused", student=student, recipe=str(recipe))
    tr = S.build_trainer(cfg, cache, load_recipe(str(recipe)), distributed.resolve(), "cpu")
    assert tr.wrapper.grid == grid and tuple(cache.manifest["teacher"]["patch_grid"]) == (4, 4)
    batch = tr.to_device(next(iter(tr.loader(0))))
    with torch.no_grad():
        f = tr.wrapper(batch)
        _, tokens = vit_tokens(tr.wrapper.student.visual, batch["image"])  # (N,G_s,D)
    o = torch.tensor(raster_overlap(grid, (4, 4)), dtype=torch.float32)  # (G_s, 16), independently
    A = F.one_hot(batch["clu_assign"].flatten(1), 4).float()  # (N,16,K)
    W = torch.einsum("st,ntk->nsk", o, A)
    torch.testing.assert_close(f.clu_st, F.normalize(torch.einsum("nsk,nsd->nkd", W, tokens), dim=-1),
                               rtol=1e-4, atol=1e-5)
    assert torch.equal(f.clu_mask, batch["clu_mask"]) and f.clu_mask.any()
    # dense FD's target: the teacher's tokens resampled by area onto the student's grid
    torch.testing.assert_close(f.tok_t, F.normalize(torch.einsum("st,ntd->nsd", o, batch["tok_t"]), dim=-1),
                               rtol=1e-4, atol=1e-5)
    assert f.tok_st.shape == (8, grid[0] * grid[1], 32) and f.grid2_t.shape == (8, 4, 32)
    assert f.grid3_st.shape == (8, 9, 32)


def test_student_equal_to_teacher_gives_zero_dense_and_grid_fd(tokens_cache, tmp_path):
    # tiny-test at seed 0 is the tiny teacher: its patch tokens are the cached ones (fp16).
    recipe = tmp_path / "controls.yaml"
    names = ("clip", "hierd_clu_fd", "dense_fd", "grid2_fd", "grid3_fd")
    recipe.write_text("terms:\n" + "".join(f"  - {{name: {n}, weight: 1.0}}\n" for n in names))
    from hierdctl.stages import distill as S

    S.run(_cfg(tokens_cache, tmp_path / "same", recipe=str(recipe), steps=1, seed=0, warmup=0))
    first = _metrics(tmp_path / "same")[0]
    for n in names[1:]:
        assert abs(first[f"{n}_loss"]) < 2e-3, (n, first[f"{n}_loss"])
    S.run(_cfg(tokens_cache, tmp_path / "other", recipe=str(recipe), steps=1, seed=3, warmup=0))
    assert all(_metrics(tmp_path / "other")[0][f"{n}_loss"] > 1e-2 for n in names[1:])


def test_a_control_recipe_on_a_cache_without_tokens_names_the_flag(tmp_path, tiny_teacher):
    from hierdctl.errors import UserError
    from hierdctl.stages import distill as S
    from hierdctl.stages.cache_teacher import CacheTeacherConfig
    from hierdctl.stages.cache_teacher import run as cache_run

    src = make_shards(tmp_path / "data", n_shards=1, per_shard=8)
    cache_run(CacheTeacherConfig(source=src, out=tmp_path / "c", teacher=tiny_teacher, clusters=4, max_phrases=3,
                                 workers=0, quiet=True))
    with pytest.raises(UserError, match="--store tokens"):
        S.run(_cfg(tmp_path / "c", tmp_path / "r", recipe="ctl-dense-fd"))
