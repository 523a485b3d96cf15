"""Every loss term against values computed independently (closed form or NumPy), plus invariants.

The NumPy references below are written from the formulas in docs/losses.md, in float64,
row by row where masks are involved; they never call hierdctl code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hierdctl.errors import UserError
from hierdctl.losses import functional as L
from hierdctl.losses.features import Features
from hierdctl.losses.registry import TERMS, Recipe, Term, compute_terms, parse_recipe
from loss_inputs import KAPPA, S, S_T, make_features, np_inputs, np_unit

# HieRD's relational terms (v1: the student compared with itself) and v2's part-level terms
# across models (docs/hierd.md).
HIERD_V2_TERMS = ("hierd_clu_fd", "hierd_phr_fd", "hierd_crop_fd", "hierd_phr_img_x", "hierd_clu_cap_x",
                  "hierd_clu_phr_x", "hierd_clu_phr_bx", "hierd_neg")
# The controls of part FD: the same FD on every patch token, or on fixed cells (issue 24).
CONTROL_TERMS = ("dense_fd", "grid2_fd", "grid3_fd")
HIERD_TERMS = tuple(n for n in TERMS if n.startswith("hierd_") and n not in HIERD_V2_TERMS)
SCALED_V2_TERMS = tuple(n for n in HIERD_V2_TERMS if TERMS[n].scale)
KD_TERMS = ("fd", "mfd", "crd", "icl", "gd", "afd")


def terms(names, f: Features, args: dict | None = None) -> dict[str, torch.Tensor]:
    """compute_terms over a recipe of `names` (weights 1), `args` = {term: {arg: value}}."""
    args = args or {}
    recipe = Recipe("test", tuple(Term(n, 1.0, dict(args.get(n, {}))) for n in names))
    return compute_terms(recipe, f)

# --- NumPy references ----------------------------------------------------------------


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_softmax(z):
    return np.exp(np_log_softmax(z))


def np_ce_diag(z):
    return -np.mean(np.diag(np_log_softmax(z)))


def np_kl(y, z):
    """mean over rows of KL(softmax(z) || softmax(y)); works on a single row too."""
    lp, lq = np_log_softmax(np.atleast_2d(z)), np_log_softmax(np.atleast_2d(y))
    return np.mean((np.exp(lp) * (lp - lq)).sum(-1))


def np_entropy_rows(z):
    p = np_softmax(z)
    return np.mean(-(p * np.log(p)).sum(-1))


def np_contrastive_grads(v, t, s):
    """Closed-form ∂/∂v, ∂/∂t of ½[CE(s v tᵀ) + CE(s t vᵀ)] (v, t used as given)."""
    n = v.shape[0]
    eye = np.eye(n)
    p = np_softmax(s * v @ t.T)  # image -> text
    q = np_softmax(s * t @ v.T)  # text -> image
    g_v = s / (2 * n) * ((p - eye) @ t + (q - eye).T @ t)
    g_t = s / (2 * n) * ((p - eye).T @ v + (q - eye) @ v)
    return g_v, g_t


def np_masked_mean_kl(rows):
    """rows: list of (student_logits_1d, teacher_logits_1d) over valid entries only."""
    kept = [np_kl(y, z) for y, z in rows if len(y) >= 2]
    return float(np.mean(kept)) if kept else 0.0


def all_terms(f: Features) -> dict[str, torch.Tensor]:
    """Every term of the registry on one Features."""
    return terms(tuple(TERMS), f)


def swap_modalities(f: Features) -> Features:
    return make_features(img_s=f.txt_s, txt_s=f.img_s, img_t=f.txt_t, txt_t=f.img_t)


# --- primitives by hand ------------------------------------------------------------------


def test_ce_diag_by_hand():
    logits = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    expected = 0.5 * (-math.log(math.e**2 / (math.e**2 + 1)) + math.log(2))
    assert L.ce_diag(logits).item() == pytest.approx(expected, rel=1e-6)


def test_kl_rows_by_hand_and_direction():
    # target row softmax([ln 3, 0]) = [3/4, 1/4], student row softmax([0, 0]) = [1/2, 1/2]
    student, target = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3), 0.0]])
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert L.kl_rows(student, target).item() == pytest.approx(expected, rel=1e-6)
    # the other direction is a different number: the argument order matters
    reverse = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert L.kl_rows(target, student).item() == pytest.approx(reverse, rel=1e-6)


def test_kl_rows_detaches_target():
    student = torch.tensor([[0.3, -0.2, 0.5]], requires_grad=True)
    target = torch.tensor([[1.0, 0.0, -1.0]], requires_grad=True)
    L.kl_rows(student, target).backward()
    assert target.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_soft_ce_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    probs = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    expected = 0.5 * (math.log(2) + -math.log(0.75))
    assert L.soft_ce(logits, probs).item() == pytest.approx(expected, rel=1e-6)


def test_masked_kl_rows_by_hand():
    student = torch.tensor([[0.0, 0.0, 5.0], [1.0, 2.0, 3.0], [0.0, 9.0, 9.0]], requires_grad=True)
    target = torch.tensor([[math.log(3), 0.0, -7.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    # row 0: entries 0,1 -> KL([3/4,1/4] || [1/2,1/2]); row 1: KL(uniform || softmax(1,2,3));
    # row 2: one valid entry -> excluded from the mean.
    row0 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    q = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
    row1 = float(np.sum(1 / 3 * np.log((1 / 3) / q)))
    loss = L.masked_kl_rows(student, target, mask)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert student.grad[0, 2] == 0 and (student.grad[2] == 0).all()  # masked / excluded


def test_masked_kl_rows_no_valid_row_is_zero_with_graph():
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    target = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    mask = torch.tensor([[True, False], [False, False]])  # one valid entry, then none
    loss = L.masked_kl_rows(student, target, mask)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(student.grad, torch.zeros(2, 2))  # finite zeros, no NaN


# --- every term against a NumPy reference -------------------------------------------------


def np_global_terms(a):
    vs, ts, vt, tt = np_unit(a["img_s"]), np_unit(a["txt_s"]), a["img_t"], a["txt_t"]
    kx, kv, kt = KAPPA["x"], KAPPA["v"], KAPPA["t"]
    out = {}
    out["clip"] = 0.5 * (np_ce_diag(S * vs @ ts.T) + np_ce_diag(S * ts @ vs.T))
    out["fd"] = np.mean((vs - vt) ** 2) + np.mean((ts - tt) ** 2)
    out["mfd"] = np.mean((np_unit(a["img_s_masked"]) - vt) ** 2) + np.mean((ts - tt) ** 2)
    out["crd"] = 0.5 * (np_kl(S * vs @ ts.T, S_T * vt @ tt.T) + np_kl(S * ts @ vs.T, S_T * tt @ vt.T))
    out["icl"] = 0.5 * (np_ce_diag(kx * vs @ tt.T) + np_ce_diag(kx * ts @ vt.T))
    # GD, CLIP-KD's public formulation: closed-form CE gradients w.r.t. anchors and keys,
    # logits p·kᵀ / τ, both directions, four MSEs.
    def ce_grads(p, k, tau):
        d = np_softmax(p @ k.T / tau) - np.eye(len(p))
        return d @ k / tau / len(p), d.T @ p / tau / len(p)

    out["gd"] = 0.0
    for anchor_s, key_s, anchor_t, key_t in ((vs, ts, vt, tt), (ts, vs, tt, vt)):
        (gps, gks), (gpt, gkt) = ce_grads(anchor_s, key_s, S), ce_grads(anchor_t, key_t, S_T)
        out["gd"] += np.mean((gps - gpt) ** 2) + np.mean((gks - gkt) ** 2)
    # GD, the autograd formulation: gradients of the symmetric loss at ×s w.r.t. vs, ts.
    gvs, gts = np_contrastive_grads(vs, ts, S)
    gvt, gtt = np_contrastive_grads(vt, tt, S_T)
    out["gd/autograd"] = np.mean((gvs - gvt) ** 2) + np.mean((gts - gtt) ** 2)
    fi, ft = np_unit(a["img_fused"]), np_unit(a["txt_fused"])
    out["afd"] = 0.5 * (np_ce_diag(S * fi @ ft.T) + np_ce_diag(S * ft @ fi.T))

    def soft_ce(y, z):
        return np.mean(-(np_softmax(z) * np_log_softmax(y)).sum(-1))

    out["affinity"] = 0.5 * (soft_ce(S * vs @ ts.T, S_T * vt @ tt.T) + soft_ce(S * ts @ vs.T, S_T * tt @ vt.T))
    a_v, a_t = kv * vt @ vs.T, kt * tt @ ts.T
    out["vrd"] = (
        0.5 * (np_kl(a_v, a_t) + np_kl(a_v.T, a_t.T))
        + 0.5 * (np_ce_diag(a_v) + np_ce_diag(a_v.T))
        + 0.5 * (np_ce_diag(a_t) + np_ce_diag(a_t.T))
    )
    c, d = kx * vt @ ts.T, kx * tt @ vs.T
    out["xrd"] = 0.25 * (np_kl(c, d) + np_kl(d, c) + np_kl(c.T, d.T) + np_kl(d.T, c.T))
    return out


def np_hierd_terms(a, s_student, s_teacher):
    """HieRD terms row by row over the valid entries only."""
    cs, ct = np_unit(a["clu_s"]), a["clu_t"]
    ps, pt = np_unit(a["phr_s"]), a["phr_t"]
    vs, ts, vt, tt = np_unit(a["img_s"]), np_unit(a["txt_s"]), a["img_t"], a["txt_t"]
    cm, pm = a["clu_mask"], a["phr_mask"]
    n = cs.shape[0]

    def within(xs, xt, m):
        rows = []
        for i in range(n):
            for k in np.flatnonzero(m[i]):
                others = [j for j in np.flatnonzero(m[i]) if j != k]
                rows.append((s_student * xs[i, others] @ xs[i, k], s_teacher * xt[i, others] @ xt[i, k]))
        return np_masked_mean_kl(rows)

    def given_global(xs, xt, m, gs, gt):
        rows = []
        for i in range(n):
            valid = np.flatnonzero(m[i])
            rows.append((s_student * xs[i, valid] @ gs[i], s_teacher * xt[i, valid] @ gt[i]))
        return np_masked_mean_kl(rows)

    def to_batch(xs, xt, m, os_, ot):
        rows = [
            (s_student * os_ @ xs[i, k], s_teacher * ot @ xt[i, k])
            for i in range(n)
            for k in np.flatnonzero(m[i])
        ]
        return np_masked_mean_kl(rows)

    rows, cols = [], []
    for i in range(n):
        kv, pv = np.flatnonzero(cm[i]), np.flatnonzero(pm[i])
        for k in kv:
            rows.append((s_student * ps[i, pv] @ cs[i, k], s_teacher * pt[i, pv] @ ct[i, k]))
        for p in pv:
            cols.append((s_student * cs[i, kv] @ ps[i, p], s_teacher * ct[i, kv] @ pt[i, p]))
    return {
        "hierd_clu_clu": within(cs, ct, cm),
        "hierd_clu_img": given_global(cs, ct, cm, vs, vt),
        "hierd_phr_phr": within(ps, pt, pm),
        "hierd_phr_cap": given_global(ps, pt, pm, ts, tt),
        "hierd_clu_phr": 0.5 * (np_masked_mean_kl(rows) + np_masked_mean_kl(cols)),
        "hierd_phr_img": to_batch(ps, pt, pm, vs, vt),
        "hierd_clu_cap": to_batch(cs, ct, cm, ts, tt),
    }


GLOBAL_TERMS = ("clip",) + KD_TERMS + ("gd/autograd", "affinity", "vrd", "xrd")


@pytest.mark.parametrize("name", GLOBAL_TERMS)
def test_global_term_matches_reference(name):
    expected = np_global_terms(np_inputs())[name]
    term, _, form = name.partition("/")
    got = terms([term], make_features(), {term: {"form": form}} if form else None)[f"{term}_loss"]
    assert got.dtype == torch.float32 and got.dim() == 0
    assert expected > 1e-6  # a reference of 0 would make the comparison toothless
    assert got.item() == pytest.approx(expected, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("scale", ["teacher", "student", 7.5])
@pytest.mark.parametrize("name", HIERD_TERMS)
def test_hierd_term_matches_reference(name, scale):
    s_student, s_teacher = {"teacher": (S_T, S_T), "student": (S, S_T), 7.5: (7.5, 7.5)}[scale]
    expected = np_hierd_terms(np_inputs(), s_student, s_teacher)[name]
    got = terms([name], make_features(), {name: {"scale": scale}})[f"{name}_loss"]
    assert expected > 1e-6
    assert got.item() == pytest.approx(expected, rel=1e-4)


def np_hierd_v2_terms(a, s_student, s_teacher):
    """HieRD v2's part-level terms across models, written from docs/hierd.md row by row over
    the valid entries only (float64)."""
    cs, ct, crop = np_unit(a["clu_s"]), a["clu_t"], a["clu_crop_t"]
    ps, pt = np_unit(a["phr_s"]), a["phr_t"]
    ns, nt = np_unit(a["neg_s"]), a["neg_t"]
    vs, ts, vt, tt = np_unit(a["img_s"]), np_unit(a["txt_s"]), a["img_t"], a["txt_t"]
    cm, pm, qm = a["clu_mask"], a["phr_mask"], a["neg_mask"]
    n = cs.shape[0]

    def part_fd(xs, xt, m):
        errs = [np.mean((xs[i, k] - xt[i, k]) ** 2) for i in range(n) for k in np.flatnonzero(m[i])]
        return float(np.mean(errs))

    def to_teacher_batch(xs, xt, m, ot):
        rows = [(s_student * ot @ xs[i, k], s_teacher * ot @ xt[i, k]) for i in range(n) for k in np.flatnonzero(m[i])]
        return np_masked_mean_kl(rows)

    # in batch: every valid part against every valid part of the other kind, in any pair
    all_k = [(i, k) for i in range(n) for k in np.flatnonzero(cm[i])]
    all_p = [(i, p) for i in range(n) for p in np.flatnonzero(pm[i])]
    pt_all = np.array([pt[i, p] for i, p in all_p])  # (#valid phrases, D)
    ct_all = np.array([ct[i, k] for i, k in all_k])  # (#valid clusters, D)
    b_rows = [(s_student * pt_all @ cs[i, k], s_teacher * pt_all @ ct[i, k]) for i, k in all_k]
    b_cols = [(s_student * ct_all @ ps[i, p], s_teacher * ct_all @ pt[i, p]) for i, p in all_p]

    rows, cols, negs = [], [], []
    for i in range(n):
        kv, pv = np.flatnonzero(cm[i]), np.flatnonzero(pm[i])
        for k in kv:  # student cluster -> teacher phrases
            rows.append((s_student * pt[i, pv] @ cs[i, k], s_teacher * pt[i, pv] @ ct[i, k]))
        for p in pv:  # student phrase -> teacher clusters
            cols.append((s_student * ct[i, kv] @ ps[i, p], s_teacher * ct[i, kv] @ pt[i, p]))
        qv = np.flatnonzero(qm[i])
        cand_s = np.vstack([ts[i][None], ns[i, qv]])
        cand_t = np.vstack([tt[i][None], nt[i, qv]])
        negs.append((s_student * cand_s @ vs[i], s_teacher * cand_t @ vt[i]))
    return {
        "hierd_clu_fd": part_fd(cs, ct, cm),
        "hierd_phr_fd": part_fd(ps, pt, pm),
        "hierd_crop_fd": part_fd(cs, crop, cm),
        "hierd_phr_img_x": to_teacher_batch(ps, pt, pm, vt),
        "hierd_clu_cap_x": to_teacher_batch(cs, ct, cm, tt),
        "hierd_clu_phr_x": 0.5 * (np_masked_mean_kl(rows) + np_masked_mean_kl(cols)),
        "hierd_clu_phr_bx": 0.5 * (np_masked_mean_kl(b_rows) + np_masked_mean_kl(b_cols)),
        "hierd_neg": np_masked_mean_kl(negs),
    }


@pytest.mark.parametrize("name", CONTROL_TERMS)
def test_part_fd_control_matches_reference(name):
    a = np_inputs()
    key = {"dense_fd": "tok", "grid2_fd": "grid2", "grid3_fd": "grid3"}[name]
    xs, xt = np_unit(a[f"{key}_s"]), a[f"{key}_t"]
    expected = float(np.mean([np.mean((xs[i, g] - xt[i, g]) ** 2) for i in range(xs.shape[0])
                              for g in range(xs.shape[1])]))
    got = terms([name], make_features())[f"{name}_loss"]
    assert got.dtype == torch.float32 and got.dim() == 0 and expected > 1e-3
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # it is part FD with every part valid: FD's weight carries over
    f = make_features()
    same = L.part_fd(getattr(f, f"{key}_st"), getattr(f, f"{key}_t"), torch.ones(xs.shape[:2], dtype=torch.bool))
    assert same.item() == pytest.approx(got.item(), rel=1e-6)


def test_batch_cluster_phrase_term_is_the_pair_term_when_the_batch_is_one_pair():
    """hierd_clu_phr_bx confines to hierd_clu_phr_x on a batch of one pair, and differs from it on
    more (the other pairs' parts enter its distributions); a permutation of the batch leaves it as is."""
    f = make_features()
    one = {k: getattr(f, k)[:1] for k in ("clu_st", "clu_t", "clu_mask", "phr_st", "phr_t", "phr_mask")}
    args = (one["clu_st"], one["clu_t"], one["clu_mask"], one["phr_st"], one["phr_t"], one["phr_mask"], S_T, S_T)
    assert L.cluster_phrase_batch_cross(*args).item() == pytest.approx(L.cluster_phrase_cross(*args).item(), rel=1e-6)
    full = terms(["hierd_clu_phr_x", "hierd_clu_phr_bx"], f)
    assert abs(full["hierd_clu_phr_x_loss"].item() - full["hierd_clu_phr_bx_loss"].item()) > 1e-4
    perm = [2, 0, 1]
    g = make_features(**{k: getattr(f, k).detach()[perm] for k in
                         ("clu_s", "clu_st", "clu_t", "clu_mask", "phr_s", "phr_st", "phr_t", "phr_mask")})
    assert terms(["hierd_clu_phr_bx"], g)["hierd_clu_phr_bx_loss"].item() == pytest.approx(
        full["hierd_clu_phr_bx_loss"].item(), rel=1e-6)


@pytest.mark.parametrize("scale", ["teacher", "student", 7.5])
@pytest.mark.parametrize("name", HIERD_V2_TERMS)
def test_hierd_v2_term_matches_reference(name, scale):
    if not TERMS[name].scale and scale != "teacher":
        pytest.skip("an MSE: no scale")
    s_student, s_teacher = {"teacher": (S_T, S_T), "student": (S, S_T), 7.5: (7.5, 7.5)}[scale]
    expected = np_hierd_v2_terms(np_inputs(), s_student, s_teacher)[name]
    args = {name: {"scale": scale}} if TERMS[name].scale else None
    got = terms([name], make_features(), args)[f"{name}_loss"]
    assert got.dtype == torch.float32 and got.dim() == 0
    assert expected > 1e-6
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_hierd_v2_cross_model_terms_read_the_projected_student():
    """The v2 terms that put a student part next to a teacher vector read `*_st`, one field at
    a time: moving the projected clusters moves exactly the terms that read them (likewise
    phrases), and moving the student's own parts (with `*_st` held) moves none of them."""
    v2 = ("hierd_clu_fd", "hierd_phr_fd", "hierd_crop_fd", "hierd_phr_img_x", "hierd_clu_cap_x", "hierd_clu_phr_x")
    base = make_features()
    a = terms(v2 + HIERD_TERMS, base)
    moves = {"clu_st": base.clu_s.detach() * 0 + 1.0, "phr_st": base.phr_s.detach().flip(-1)}
    readers = {field: {n for n in v2 if field in TERMS[n].fields} for field in moves}
    assert readers == {"clu_st": {"hierd_clu_fd", "hierd_crop_fd", "hierd_clu_cap_x", "hierd_clu_phr_x"},
                       "phr_st": {"hierd_phr_fd", "hierd_phr_img_x", "hierd_clu_phr_x"}}
    for field, value in moves.items():
        b = terms(v2 + HIERD_TERMS, make_features(**{field: value}))
        for name in v2:
            moved = abs(a[f"{name}_loss"].item() - b[f"{name}_loss"].item()) > 1e-4
            assert moved == (name in readers[field]), (field, name)
        for name in HIERD_TERMS:  # the v1 relational terms read the own space only
            assert a[f"{name}_loss"].item() == pytest.approx(b[f"{name}_loss"].item()), (field, name)
    own = make_features(clu_s=moves["clu_st"], phr_s=moves["phr_st"], clu_st=base.clu_s, phr_st=base.phr_s)
    c = terms(v2, own)
    for name in v2:
        assert a[f"{name}_loss"].item() == pytest.approx(c[f"{name}_loss"].item()), name


def test_hierd_neg_sample_without_perturbations_is_dropped():
    # Sample 2 has no valid perturbation: its image and caption must not move hierd_neg.
    f, g = make_features(), make_features()
    with torch.no_grad():
        g.img_s[2] = torch.tensor([3.0, -1.0, 0.5, 0.0])
        g.txt_s[2] = torch.tensor([-2.0, 0.0, 1.0, 1.0])
    assert terms(["hierd_neg"], f)["hierd_neg_loss"].item() == pytest.approx(
        terms(["hierd_neg"], g)["hierd_neg_loss"].item())
    # ...while sample 0's do (the test can tell)
    with torch.no_grad():
        g.img_s[0] = torch.tensor([3.0, -1.0, 0.5, 0.0])
    assert abs(terms(["hierd_neg"], f)["hierd_neg_loss"].item() - terms(["hierd_neg"], g)["hierd_neg_loss"].item()) > 1e-4


def test_part_fd_with_no_valid_part_is_zero_with_graph():
    parts = torch.randn(2, 3, 4, requires_grad=True)
    loss = L.part_fd(parts, torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(parts.grad, torch.zeros(2, 3, 4))


def test_compute_terms_computes_only_the_recipes_terms():
    f = make_features()
    assert set(terms(["icl", "fd"], f)) == {"icl_loss", "fd_loss"}
    assert set(terms(["xrd"], f)) == {"xrd_loss"}
    assert set(terms(["hierd_phr_img"], f)) == {"hierd_phr_img_loss"}
    with pytest.raises(UserError, match="unknown term"):
        parse_recipe({"terms": [{"name": "vrdd", "weight": 1}]}, "r", "r.yaml")
    with pytest.raises(UserError, match="scale"):
        parse_recipe({"terms": [{"name": "hierd_clu_clu", "weight": 1, "args": {"scale": "nope"}}]}, "r", "r.yaml")


def test_missing_feature_is_named():
    f = make_features(clu_s=None)
    with pytest.raises(AssertionError, match="clu_s"):
        terms(["hierd_clu_clu"], f)
    with pytest.raises(AssertionError, match="kappa_v"):
        terms(["vrd"], make_features(kappa_v=None))


# --- invariants ------------------------------------------------------------------------------


def student_equals_teacher(scale_s: float) -> Features:
    """Student tensors equal to the teacher's (scaled by 3: normalisation must undo it)."""
    f = make_features()
    return make_features(
        img_s=3 * f.img_t, txt_s=3 * f.txt_t, clu_s=3 * f.clu_t, phr_s=3 * f.phr_t, neg_s=3 * f.neg_t,
        logit_scale_s=torch.tensor(scale_s),
    )  # fmt: skip


def test_kl_terms_vanish_when_student_equals_teacher():
    f = student_equals_teacher(S_T)
    student_scale = {n: {"scale": "student"} for n in HIERD_TERMS}
    out = terms(("crd",) + HIERD_TERMS, f)
    out |= {f"{k} (student)": v for k, v in terms(HIERD_TERMS, f, student_scale).items()}  # s == s_T here
    for key, value in out.items():
        assert abs(value.item()) < 1e-5, key
    # HieRD v2: every part-level term across models vanishes too (crop FD against the crops)
    v2 = tuple(n for n in HIERD_V2_TERMS if n != "hierd_crop_fd")
    for key, value in terms(v2, f).items():
        assert abs(value.item()) < 1e-5, key
    same = make_features(tok_st=3 * f.tok_t, grid2_st=3 * f.grid2_t, grid3_st=3 * f.grid3_t)
    for key, value in terms(CONTROL_TERMS, same).items():
        assert abs(value.item()) < 1e-6, key
    assert all(v.item() > 1e-3 for v in terms(CONTROL_TERMS, make_features()).values())
    crop = make_features(clu_s=3 * f.clu_crop_t)
    assert abs(terms(["hierd_crop_fd"], crop)["hierd_crop_fd_loss"].item()) < 1e-6
    assert terms(HIERD_V2_TERMS, make_features())["hierd_crop_fd_loss"].item() > 1e-3
    # ...and do not vanish when the scales differ: the test can tell.
    g = student_equals_teacher(S)
    v2_scaled = terms(SCALED_V2_TERMS, g, {n: {"scale": "student"} for n in SCALED_V2_TERMS})
    assert all(v.item() > 1e-4 for v in v2_scaled.values()), v2_scaled
    assert terms(["crd"], g)["crd_loss"].item() > 1e-3
    scaled = terms(HIERD_TERMS, g, student_scale)
    assert all(v.item() > 1e-4 for v in scaled.values())


def test_affinity_minus_crd_is_teacher_entropy():
    a = np_inputs()
    logits_t = S_T * a["img_t"] @ a["txt_t"].T
    entropy = 0.5 * (np_entropy_rows(logits_t) + np_entropy_rows(logits_t.T))
    f = make_features()
    diff = terms(["affinity"], f)["affinity_loss"] - terms(["crd"], f)["crd_loss"]
    assert entropy > 1e-3
    assert diff.item() == pytest.approx(entropy, rel=1e-4)


def test_affinity_and_crd_have_the_same_student_gradients():
    f1, f2 = make_features(), make_features()
    terms(["affinity"], f1)["affinity_loss"].backward()
    terms(["crd"], f2)["crd_loss"].backward()
    for name in ("img_s", "txt_s", "logit_scale_s"):
        g1, g2 = getattr(f1, name).grad, getattr(f2, name).grad
        assert g1.abs().sum() > 0
        torch.testing.assert_close(g1, g2)


def test_no_gradient_reaches_teacher_tensors():
    f = make_features(teacher_grad=True)
    total = sum(all_terms(f).values())
    total.backward()
    for name in ("img_t", "txt_t", "clu_t", "phr_t", "neg_t", "clu_crop_t", "tok_t", "grid2_t", "grid3_t"):
        assert getattr(f, name).grad is None, name
    # the student does get gradients, so the check above is not vacuous
    for name in ("img_s", "txt_s", "img_st_masked", "img_fused", "txt_fused", "clu_s", "phr_s", "neg_s", "tok_st",
                 "grid2_st", "grid3_st"):
        grad = getattr(f, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "make",
    [
        ["clip"],
        ["fd", "crd", "icl", "gd"],
        ["affinity"],
        ["xrd"],
    ],
)
def test_symmetric_terms_are_symmetric_under_swapping_modalities(make):
    f = make_features()
    before, after = terms(make, f), terms(make, swap_modalities(f))
    for key in before:
        assert after[key].item() == pytest.approx(before[key].item(), rel=1e-5), key


def test_vrd_is_not_symmetric():
    # Swapping modalities (and κv <-> κt) turns the target side around: VRD must change.
    f = make_features()
    g = swap_modalities(f)
    g.kappa_v, g.kappa_t = f.kappa_t, f.kappa_v
    before = terms(["vrd"], f)["vrd_loss"].item()
    after = terms(["vrd"], g)["vrd_loss"].item()
    assert abs(before - after) > 1e-4


def test_vrd_text_side_is_stop_gradient():
    """VRD's text side gets gradients only from its own InfoNCE, never from the KL."""
    f = make_features()
    terms(["vrd"], f)["vrd_loss"].backward()

    # Reference: just ½[CE(A_t) + CE(A_tᵀ)], written out with F.cross_entropy.
    ts = make_features().txt_s
    kt = torch.tensor(KAPPA["t"], requires_grad=True)
    a_t = kt * f.txt_t @ F.normalize(ts, dim=-1).T
    labels = torch.arange(3)
    (0.5 * (F.cross_entropy(a_t, labels) + F.cross_entropy(a_t.T, labels))).backward()
    torch.testing.assert_close(f.txt_s.grad, ts.grad)
    torch.testing.assert_close(f.kappa_t.grad, kt.grad)

    # The image side, by contrast, also learns from the KL: its gradient differs from
    # that of its InfoNCE alone.
    vs = make_features().img_s
    a_v = KAPPA["v"] * f.img_t @ F.normalize(vs, dim=-1).T
    (0.5 * (F.cross_entropy(a_v, labels) + F.cross_entropy(a_v.T, labels))).backward()
    assert (f.img_s.grad - vs.grad).abs().max() > 1e-4


def test_masked_entries_do_not_affect_hierd():
    names = HIERD_TERMS + HIERD_V2_TERMS
    f = make_features()
    out = terms(names, f)
    sum(out.values()).backward()

    g = make_features()
    for name, mask in (("clu_s", g.clu_mask), ("clu_t", g.clu_mask), ("phr_s", g.phr_mask), ("phr_t", g.phr_mask),
                       ("clu_crop_t", g.clu_mask), ("neg_s", g.neg_mask), ("neg_t", g.neg_mask)):
        with torch.no_grad():
            getattr(g, name)[~mask] = float("nan")  # NaN in every padded slot
    out_junk = terms(names, g)
    sum(out_junk.values()).backward()

    for key in out:
        assert out_junk[key].item() == pytest.approx(out[key].item(), rel=1e-6), key
    for name in ("clu_s", "phr_s", "neg_s", "img_s", "txt_s"):
        gf, gg = getattr(f, name).grad, getattr(g, name).grad
        assert torch.isfinite(gg).all(), name
        torch.testing.assert_close(gg, gf)
    assert (f.clu_s.grad[~f.clu_mask] == 0).all() and (f.phr_s.grad[~f.phr_mask] == 0).all()
    assert (f.neg_s.grad[~f.neg_mask] == 0).all() and f.neg_s.grad[f.neg_mask].abs().sum() > 0


def test_hierd_sample_with_too_few_parts_is_excluded():
    # Sample 2 has a single cluster: its clu_clu / clu_img rows are excluded. Changing
    # that cluster's student embedding must not move those two terms.
    f = make_features()
    g = make_features()
    with torch.no_grad():
        g.clu_s[2, 0] = torch.tensor([5.0, -1.0, 0.0, 2.0])
    names = ["hierd_clu_clu", "hierd_clu_img", "hierd_clu_cap"]
    a, b = terms(names, f), terms(names, g)
    assert a["hierd_clu_clu_loss"].item() == pytest.approx(b["hierd_clu_clu_loss"].item())
    assert a["hierd_clu_img_loss"].item() == pytest.approx(b["hierd_clu_img_loss"].item())
    # ...but it still counts in batch, where its row runs over all N captions.
    assert abs(a["hierd_clu_cap_loss"].item() - b["hierd_clu_cap_loss"].item()) > 1e-4


def test_gd_trains_the_student():
    f = make_features()
    terms(["gd"], f)["gd_loss"].backward()
    for grad in (f.img_s.grad, f.txt_s.grad, f.logit_scale_s.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_gd_under_no_grad_gives_the_same_value():
    with_grad = terms(["gd"], make_features())["gd_loss"].item()
    with torch.no_grad():
        value = terms(["gd"], make_features(grad=False))["gd_loss"]
    assert value.item() == pytest.approx(with_grad, rel=1e-6)


def test_all_terms_are_float32_under_bf16_autocast():
    f = make_features()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = all_terms(f)
    for key, value in out.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), key
    sum(out.values()).backward()
    assert torch.isfinite(f.img_s.grad).all()


# --- teacher ensembles ---------------------------------------------------------------------


def _ensemble(f: Features, *others: dict) -> Features:
    """f with an ensemble: teacher 0 = f's teacher fields, then `others`."""
    first = {"img_t": f.img_t, "txt_t": f.txt_t, "logit_scale_t": f.logit_scale_t, "img_st": f.img_st,
             "txt_st": f.txt_st, "img_st_masked": f.img_st_masked}
    f.ensemble = [first] + [first | o for o in others]
    return f


def test_an_ensemble_of_one_teacher_twice_is_that_teacher():
    single = terms(("crd", "affinity", "fd", "icl", "vrd", "xrd", "gd"), make_features())
    twice = terms(("crd", "affinity", "fd", "icl", "vrd", "xrd", "gd"), _ensemble(make_features(), {}))
    for k in single:
        assert twice[k].item() == pytest.approx(single[k].item(), rel=1e-5), k


def test_ensemble_terms_average_softmaxes_or_terms():
    a = np_inputs()
    rng = np.random.default_rng(3)
    vt2, tt2 = np_unit(a["img_t"] + 0.7 * rng.standard_normal(a["img_t"].shape)), np_unit(a["txt_t"] + 0.7 * rng.standard_normal(a["txt_t"].shape))
    s2 = 7.0
    other = {"img_t": torch.tensor(vt2, dtype=torch.float32), "txt_t": torch.tensor(tt2, dtype=torch.float32),
             "logit_scale_t": s2}
    f = _ensemble(make_features(), other)
    out = terms(("crd", "affinity", "fd"), f)
    # crd: KL from the mean of the two teachers' softmaxes (DataCompDR), not the mean of two KLs.
    vs, ts = np_unit(a["img_s"]), np_unit(a["txt_s"])
    p = 0.5 * (np_softmax(S_T * a["img_t"] @ a["txt_t"].T) + np_softmax(s2 * vt2 @ tt2.T))
    q = 0.5 * (np_softmax(S_T * a["txt_t"] @ a["img_t"].T) + np_softmax(s2 * tt2 @ vt2.T))

    def kl(y, pt):
        return np.mean((pt * (np.log(pt) - np_log_softmax(y))).sum(-1))

    crd = 0.5 * (kl(S * vs @ ts.T, p) + kl(S * ts @ vs.T, q))
    assert out["crd_loss"].item() == pytest.approx(crd, rel=1e-4)
    ent = 0.5 * (np.mean(-(p * np.log(p)).sum(-1)) + np.mean(-(q * np.log(q)).sum(-1)))
    assert out["affinity_loss"].item() == pytest.approx(crd + ent, rel=1e-4)
    # fd: the mean over teachers of each teacher's FD.
    fd = 0.5 * ((np.mean((vs - a["img_t"]) ** 2) + np.mean((ts - a["txt_t"]) ** 2))
                + (np.mean((vs - vt2) ** 2) + np.mean((ts - tt2) ** 2)))
    assert out["fd_loss"].item() == pytest.approx(fd, rel=1e-4)
    # A term that names one teacher uses that one alone.
    only = Recipe("t", (Term("fd", 1.0, {"teacher": 1}), Term("crd", 1.0, {"teacher": 0})))
    got = compute_terms(only, _ensemble(make_features(), other))
    assert got["fd_loss"].item() == pytest.approx(np.mean((vs - vt2) ** 2) + np.mean((ts - tt2) ** 2), rel=1e-4)
    assert got["crd_loss"].item() == pytest.approx(terms(["crd"], make_features())["crd_loss"].item(), rel=1e-5)
    with pytest.raises(UserError, match="teacher"):
        parse_recipe({"terms": [{"name": "hierd_clu_clu", "weight": 1, "args": {"teacher": 1}}]}, "r", "r.yaml")
