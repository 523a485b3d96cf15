"""Pure loss math. Every function takes tensors and returns a scalar tensor.

Shapes: N = batch, D = joint width, K = clusters per image, P = phrases per caption,
M = entries a row's distribution runs over.

Conventions, shared by every function below:
- Arguments named `*_s` are raw student embeddings: they are L2-normalised here.
- Arguments named `*_t` are teacher embeddings (already normalised): they are
  detached here, so no gradient can ever reach a teacher tensor.
- `KL(Y ; Z)` of the method notes is `kl_rows(Y, Z)`: mean over rows of
  KL(softmax(Z_i) ‖ softmax(Y_i)), Z the detached target, temperature 1.
- softmax / log_softmax always run in float32 (logits are cast first), so the
  losses are safe under fp16/bf16 autocast.
- Scales (s, s_T, κ) are effective values, multiplied in directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

Scale = Tensor | float


# --- small helpers ---------------------------------------------------------------


def unit(x: Tensor) -> Tensor:
    """L2-normalise the last dim of a student tensor, in float32. (..., D) -> (..., D)."""
    return F.normalize(x.float(), dim=-1)


def frozen(x: Tensor) -> Tensor:
    """A teacher tensor as a float32 constant (detached). (..., D) -> (..., D)."""
    return x.detach().float()


# --- row-wise distribution losses ------------------------------------------------


def ce_diag(logits: Tensor) -> Tensor:
    """Cross-entropy with the labels on the diagonal.

    logits: (N, M), M ≥ N; row i's positive is column i.
    Returns () = mean_i −log softmax(logits_i)_i.
    """
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits.float(), labels)


def kl_rows(logits: Tensor, target_logits: Tensor) -> Tensor:
    """Mean over rows of KL(softmax(target_i) ‖ softmax(logits_i)); the target is detached.

    logits, target_logits: (R, M). Returns ().
    """
    log_q = F.log_softmax(logits.float(), dim=-1)  # (R, M) student
    log_p = F.log_softmax(target_logits.detach().float(), dim=-1)  # (R, M) target
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def soft_ce(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Soft cross-entropy: mean over rows of −Σ_j p_ij log softmax(logits_i)_j.

    logits, target_probs: (R, M), rows of target_probs sum to 1 (detached). Returns ().
    """
    log_q = F.log_softmax(logits.float(), dim=-1)
    return -(target_probs.detach().float() * log_q).sum(-1).mean()


def masked_kl_rows(logits: Tensor, target_logits: Tensor, mask: Tensor) -> Tensor:
    """`kl_rows` over rows whose entries are partly invalid.

    logits, target_logits: (..., M); mask: (..., M) bool, True = valid entry.
    Invalid entries get −inf logits on both sides (probability 0). Rows with fewer
    than 2 valid entries carry no distribution worth matching and are excluded from
    the mean. Returns () = mean over the remaining rows; 0 (still attached to the
    graph of `logits`) when no row remains.
    """
    logits = logits.flatten(0, -2).float()  # (R, M)
    target = target_logits.detach().flatten(0, -2).float()  # (R, M)
    mask = mask.flatten(0, -2)  # (R, M)

    row_ok = mask.sum(-1) >= 2  # (R,)
    # Excluded rows are computed over all their entries instead: a fully masked row
    # would give NaN in log_softmax, and NaN leaks into gradients even through where().
    mask = mask | ~row_ok[:, None]
    log_q = F.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    log_p = F.log_softmax(target.masked_fill(~mask, float("-inf")), dim=-1)
    # Masked entries: p = 0 and (−inf) − (−inf) = NaN, so select 0 there explicitly.
    per_entry = torch.where(mask, log_p.exp() * (log_p - log_q), 0.0)  # (R, M)
    per_row = torch.where(row_ok, per_entry.sum(-1), 0.0)  # (R,)
    return per_row.sum() / row_ok.sum().clamp(min=1)


# --- CLIP task loss ----------------------------------------------------------------


def contrastive(img: Tensor, txt: Tensor, scale: Scale) -> Tensor:
    """Symmetric InfoNCE on embeddings used as given (no normalisation here).

    img, txt: (N, D); scale: () or float. Returns () = ½[CE(s·I·Tᵀ) + CE(s·T·Iᵀ)].
    """
    logits = scale * img @ txt.T  # (N, N) image -> text
    return 0.5 * (ce_diag(logits) + ce_diag(logits.T))


def clip_loss(img_s: Tensor, txt_s: Tensor, scale: Scale) -> Tensor:
    """CLIP loss on student embeddings. img_s, txt_s: (N, D) raw; scale: s. Returns ()."""
    return contrastive(unit(img_s), unit(txt_s), scale)


# --- CLIP-KD (Yang et al., CVPR 2024) ----------------------------------------------
# As in the authors' public code, with two deliberate differences: MFD masks for real
# (the student wrapper's forward drops 75% of the patches; the public code overwrote it
# with an unmasked forward), and AFD's CLIP loss on the fused features uses the student's
# CLIP scale s (the public code learns a separate fusion scale). κx (ICL) is multiplied in
# directly. GD offers the public code's formulation (the default) and an autograd one.


def fd(img_s: Tensor, txt_s: Tensor, img_t: Tensor, txt_t: Tensor) -> Tensor:
    """Feature distillation: MSE(vs, vt) + MSE(ts, tt), element mean.

    img_s, txt_s: (N, D) raw student; img_t, txt_t: (N, D) teacher. Returns ().
    MFD is this same function with the masked-image student embedding as img_s.
    """
    return F.mse_loss(unit(img_s), frozen(img_t)) + F.mse_loss(unit(txt_s), frozen(txt_t))


def crd(
    img_s: Tensor, txt_s: Tensor, img_t: Tensor, txt_t: Tensor, scale_s: Scale, scale_t: Scale
) -> Tensor:
    """Contrastive relational distillation: ½[KL(s·vs·tsᵀ ; s_T·vt·ttᵀ) + transposes].

    img_s, txt_s: (N, D) raw student; img_t, txt_t: (N, D) teacher;
    scale_s: s, scale_t: s_T. Returns ().
    """
    logits_s = scale_s * unit(img_s) @ unit(txt_s).T  # (N, N) student image -> text
    logits_t = scale_t * frozen(img_t) @ frozen(txt_t).T  # (N, N) teacher image -> text
    return 0.5 * (kl_rows(logits_s, logits_t) + kl_rows(logits_s.T, logits_t.T))


def icl(img_s: Tensor, txt_s: Tensor, img_t: Tensor, txt_t: Tensor, kappa_x: Scale) -> Tensor:
    """Interactive contrastive learning: ½[CE(κx·vs·ttᵀ) + CE(κx·ts·vtᵀ)].

    Student anchors, teacher positives/negatives. img_s, txt_s: (N, D) raw student;
    img_t, txt_t: (N, D) teacher; kappa_x: (). Returns ().
    """
    vs, ts = unit(img_s), unit(txt_s)
    vt, tt = frozen(img_t), frozen(txt_t)
    return 0.5 * (ce_diag(kappa_x * vs @ tt.T) + ce_diag(kappa_x * ts @ vt.T))


def gd(
    img_s: Tensor, txt_s: Tensor, img_t: Tensor, txt_t: Tensor, scale_s: Scale, scale_t: Scale,
    form: str = "public",
) -> Tensor:
    """Gradient distillation: match the student's contrastive-loss gradients to the teacher's.

    form "public" (CLIP-KD's code, so its weight 1e8 carries over): for each direction
    (image anchors over text keys, text anchors over image keys) the closed-form gradients
    of CE(p·kᵀ / τ) w.r.t. the anchors p and the keys k, τ = the model's logit scale (the
    public code *divides* by it): g_p = (P − I)·k / (τN), g_k = (P − I)ᵀ·p / (τN); the loss is
    the sum of the four element-mean MSEs, student vs teacher.
    form "autograd" (hierdctl's first formulation): MSE(∂L/∂vs, ∂L/∂vt) + MSE(∂L/∂ts, ∂L/∂tt)
    with L the symmetric contrastive loss `contrastive` at ×s (student) and ×s_T (teacher),
    taken by autograd. Its values are ~s⁴ larger (docs/distill.md has the measured ratio).
    Either way the student's gradients keep their graph, so this term trains the student;
    the teacher's are constants.
    img_s, txt_s: (N, D) raw student; img_t, txt_t: (N, D) teacher. Returns ().
    """
    assert form in ("public", "autograd"), form
    if form == "public":
        vs, ts = unit(img_s), unit(txt_s)
        vt, tt = frozen(img_t), frozen(txt_t)
        scale_t = scale_t.detach() if isinstance(scale_t, Tensor) else scale_t
        terms = []
        for (ps, ks, pt, kt) in ((vs, ts, vt, tt), (ts, vs, tt, vt)):
            gp_s, gk_s = _ce_grads(ps, ks, scale_s)
            gp_t, gk_t = _ce_grads(pt, kt, scale_t)
            terms += [F.mse_loss(gp_s, gp_t), F.mse_loss(gk_s, gk_t)]
        return sum(terms)
    # enable_grad: the term must also be computable under torch.no_grad() (validation).
    with torch.enable_grad():
        vs, ts = unit(img_s), unit(txt_s)
        if not vs.requires_grad:  # student features came without a graph (eval)
            vs = vs.detach().requires_grad_()
        if not ts.requires_grad:
            ts = ts.detach().requires_grad_()
        g_vs, g_ts = torch.autograd.grad(contrastive(vs, ts, scale_s), (vs, ts), create_graph=True)

        vt = frozen(img_t).requires_grad_()  # fresh leaves: the cached tensors stay untouched
        tt = frozen(txt_t).requires_grad_()
        scale_t = scale_t.detach() if isinstance(scale_t, Tensor) else scale_t
        g_vt, g_tt = torch.autograd.grad(contrastive(vt, tt, scale_t), (vt, tt))
    return F.mse_loss(g_vs, g_vt) + F.mse_loss(g_ts, g_tt)


def _ce_grads(p: Tensor, k: Tensor, tau: Scale) -> tuple[Tensor, Tensor]:
    """Closed-form gradients of ce_diag(p·kᵀ / τ) w.r.t. p and k: ((N, D), (N, D))."""
    n = p.shape[0]
    prob = F.softmax((p @ k.T / tau).float(), dim=-1)  # (N, N)
    delta = prob - torch.eye(n, device=p.device, dtype=prob.dtype)  # (N, N) P − I
    return delta @ k / tau / n, delta.T @ p / tau / n


# --- TinyCLIP (Wu et al., ICCV 2023) -----------------------------------------------


def affinity(
    img_s: Tensor, txt_s: Tensor, img_t: Tensor, txt_t: Tensor, scale_s: Scale, scale_t: Scale
) -> Tensor:
    """Affinity mimicking: ½[softCE(s·vs·tsᵀ, softmax(s_T·vt·ttᵀ)) + transposes].

    Equals `crd` plus the mean teacher row entropy (same gradients for the student).
    img_s, txt_s: (N, D) raw student; img_t, txt_t: (N, D) teacher. Returns ().
    """
    logits_s = scale_s * unit(img_s) @ unit(txt_s).T  # (N, N)
    logits_t = scale_t * frozen(img_t) @ frozen(txt_t).T  # (N, N)
    p_i2t = F.softmax(logits_t.float(), dim=-1)  # teacher image -> text
    p_t2i = F.softmax(logits_t.T.float(), dim=-1)  # teacher text -> image
    return 0.5 * (soft_ce(logits_s, p_i2t) + soft_ce(logits_s.T, p_t2i))


# --- teacher ensembles (DataCompDR: the teachers' softmaxes averaged) ---------------


def ensemble_targets(teachers: list[tuple[Tensor, Tensor, Scale]]) -> tuple[Tensor, Tensor]:
    """The mean over teachers of their in-batch distributions, both directions.

    teachers: [(img_t (N,D_k), txt_t (N,D_k), s_T,k)] -> (P_i2t (N,N), P_t2i (N,N)), rows sum to 1."""
    p_i2t = p_t2i = 0.0
    for img_t, txt_t, scale_t in teachers:
        logits_t = scale_t * frozen(img_t) @ frozen(txt_t).T  # (N, N)
        p_i2t = p_i2t + F.softmax(logits_t.float(), dim=-1)
        p_t2i = p_t2i + F.softmax(logits_t.T.float(), dim=-1)
    return p_i2t / len(teachers), p_t2i / len(teachers)


def kl_probs(logits: Tensor, target_probs: Tensor) -> Tensor:
    """`kl_rows` with the target given as probabilities (rows sum to 1; detached). (R, M) -> ()."""
    log_q = F.log_softmax(logits.float(), dim=-1)
    p = target_probs.detach().float()
    return (torch.xlogy(p, p) - p * log_q).sum(-1).mean()


def crd_ensemble(img_s: Tensor, txt_s: Tensor, scale_s: Scale, teachers: list) -> Tensor:
    """CRD against the teachers' averaged softmaxes: ½[KL(s·vs·tsᵀ ; P̄_i2t) + KL(s·ts·vsᵀ ; P̄_t2i)].
    With one teacher it equals `crd`."""
    logits_s = scale_s * unit(img_s) @ unit(txt_s).T  # (N, N)
    p_i2t, p_t2i = ensemble_targets(teachers)
    return 0.5 * (kl_probs(logits_s, p_i2t) + kl_probs(logits_s.T, p_t2i))


def affinity_ensemble(img_s: Tensor, txt_s: Tensor, scale_s: Scale, teachers: list) -> Tensor:
    """Affinity mimicking against the teachers' averaged softmaxes (equals `affinity` for one)."""
    logits_s = scale_s * unit(img_s) @ unit(txt_s).T  # (N, N)
    p_i2t, p_t2i = ensemble_targets(teachers)
    return 0.5 * (soft_ce(logits_s, p_i2t) + soft_ce(logits_s.T, p_t2i))


# --- CLIP-RD (Chung et al., 2026) --------------------------------------------------


def vrd(
    img_s: Tensor, txt_s: Tensor, img_t: Tensor, txt_t: Tensor, kappa_v: Scale, kappa_t: Scale
) -> Tensor:
    """Vertical relational distillation.

    A_v = κv·vt·vsᵀ, A_t = κt·tt·tsᵀ, B_v = A_vᵀ, B_t = A_tᵀ (all (N, N)):
      ½[KL(A_v ; A_t) + KL(B_v ; B_t)]     text side is the target: stop-gradient,
                                           deliberately asymmetric (as published)
    + ½[CE(A_v) + CE(B_v)]                 image teacher<->student InfoNCE
    + ½[CE(A_t) + CE(B_t)]                 text teacher<->student InfoNCE
    img_s, txt_s: (N, D) raw student; img_t, txt_t: (N, D) teacher; κv, κt: (). Returns ().
    """
    a_v = kappa_v * frozen(img_t) @ unit(img_s).T  # (N, N) rows: teacher images
    a_t = kappa_t * frozen(txt_t) @ unit(txt_s).T  # (N, N) rows: teacher texts
    b_v, b_t = a_v.T, a_t.T  # rows: student images / texts
    consistency = 0.5 * (kl_rows(a_v, a_t) + kl_rows(b_v, b_t))
    nce_v = 0.5 * (ce_diag(a_v) + ce_diag(b_v))
    nce_t = 0.5 * (ce_diag(a_t) + ce_diag(b_t))
    return consistency + nce_v + nce_t


def xrd(img_s: Tensor, txt_s: Tensor, img_t: Tensor, txt_t: Tensor, kappa_x: Scale) -> Tensor:
    """Cross relational distillation: symmetry of cross-modal teacher–student similarity.

    C = κx·vt·tsᵀ, D = κx·tt·vsᵀ, E = Dᵀ, F = Cᵀ (all (N, N)):
      ¼[KL(C ; D) + KL(D ; C) + KL(F ; E) + KL(E ; F)]
    img_s, txt_s: (N, D) raw student; img_t, txt_t: (N, D) teacher; κx: (). Returns ().
    """
    c = kappa_x * frozen(img_t) @ unit(txt_s).T  # (N, N) teacher image -> student text
    d = kappa_x * frozen(txt_t) @ unit(img_s).T  # (N, N) teacher text -> student image
    e, f = d.T, c.T
    return 0.25 * (kl_rows(c, d) + kl_rows(d, c) + kl_rows(f, e) + kl_rows(e, f))


# --- HieRD (ICML 2026; only the abstract is published: our reconstruction, docs/hierd.md) ---
# Levels: image = patches -> clusters -> image, text = words -> phrases -> caption. The
# global level is `crd`. Each term is a KL between the teacher's and the student's softmax
# distributions (teacher target, stop-gradient), in the student's own space:
#
#   hierd_clu_clu  part_relation      per sample: cluster -> other clusters    (N, K, K), diagonal out
#   hierd_clu_img  part_given_global  per sample: image -> its clusters        (N, K)
#   hierd_phr_phr  part_relation      per sample: phrase -> other phrases      (N, P, P), diagonal out
#   hierd_phr_cap  part_given_global  per sample: caption -> its phrases       (N, P)
#   hierd_clu_phr  cluster_phrase     per sample: cluster <-> phrases, both ways (N, K, P)
#   hierd_phr_img  part_to_batch      in batch: phrase -> the N images         (N, P, N)
#   hierd_clu_cap  part_to_batch      in batch: cluster -> the N captions      (N, K, N)
#
# Parts are clusters (K per image) or phrases (P per caption); `mask` (N, K) marks the
# valid ones. Invalid parts are zeroed before normalising, so whatever the padding
# holds (even NaN) never reaches a value or a gradient.


def masked_parts(parts: Tensor, mask: Tensor, student: bool) -> Tensor:
    """Zero the invalid parts, then normalise (student) or detach (teacher).

    parts: (N, K, D); mask: (N, K) bool. Returns (N, K, D) float32.
    """
    parts = torch.where(mask[..., None], parts, 0.0)
    return unit(parts) if student else frozen(parts)


def part_relation(
    parts_s: Tensor, parts_t: Tensor, mask: Tensor, scale_s: Scale, scale_t: Scale
) -> Tensor:
    """Within one sample: each part's distribution over the sample's other parts.

    parts_s: (N, K, D) raw student; parts_t: (N, K, D) teacher; mask: (N, K) bool.
    Logits (N, K, K) = scale·part·partᵀ, diagonal excluded. Returns ().
    """
    ps, pt = masked_parts(parts_s, mask, True), masked_parts(parts_t, mask, False)
    logits_s = scale_s * ps @ ps.transpose(1, 2)  # (N, K, K)
    logits_t = scale_t * pt @ pt.transpose(1, 2)  # (N, K, K)
    eye = torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)
    pair_mask = mask[:, :, None] & mask[:, None, :] & ~eye  # (N, K, K) valid row & column, off-diagonal
    return masked_kl_rows(logits_s, logits_t, pair_mask)


def part_given_global(
    parts_s: Tensor,
    parts_t: Tensor,
    mask: Tensor,
    glob_s: Tensor,
    glob_t: Tensor,
    scale_s: Scale,
    scale_t: Scale,
) -> Tensor:
    """Within one sample: the global embedding's distribution over the sample's parts.

    parts_s: (N, K, D) raw student; parts_t: (N, K, D) teacher; mask: (N, K) bool;
    glob_s: (N, D) raw student image/caption; glob_t: (N, D) teacher.
    Logits (N, K) = scale·⟨global_n, part_nk⟩; one row per sample. Returns ().
    """
    ps, pt = masked_parts(parts_s, mask, True), masked_parts(parts_t, mask, False)
    logits_s = scale_s * torch.einsum("nkd,nd->nk", ps, unit(glob_s))  # (N, K)
    logits_t = scale_t * torch.einsum("nkd,nd->nk", pt, frozen(glob_t))  # (N, K)
    return masked_kl_rows(logits_s, logits_t, mask)


def cluster_phrase(
    clu_s: Tensor,
    clu_t: Tensor,
    clu_mask: Tensor,
    phr_s: Tensor,
    phr_t: Tensor,
    phr_mask: Tensor,
    scale_s: Scale,
    scale_t: Scale,
) -> Tensor:
    """Within one pair: cluster↔phrase affinity, KL over rows and over columns, averaged.

    clu_*: (N, K, D), clu_mask: (N, K); phr_*: (N, P, D), phr_mask: (N, P).
    Logits (N, K, P) = scale·clu·phrᵀ; rows = cluster -> phrases,
    columns = phrase -> clusters. Returns () = ½[KL_rows + KL_cols].
    """
    cs, ct = masked_parts(clu_s, clu_mask, True), masked_parts(clu_t, clu_mask, False)
    ps, pt = masked_parts(phr_s, phr_mask, True), masked_parts(phr_t, phr_mask, False)
    logits_s = scale_s * cs @ ps.transpose(1, 2)  # (N, K, P)
    logits_t = scale_t * ct @ pt.transpose(1, 2)  # (N, K, P)
    pair_mask = clu_mask[:, :, None] & phr_mask[:, None, :]  # (N, K, P)
    rows = masked_kl_rows(logits_s, logits_t, pair_mask)
    cols = masked_kl_rows(
        logits_s.transpose(1, 2), logits_t.transpose(1, 2), pair_mask.transpose(1, 2)
    )
    return 0.5 * (rows + cols)


def part_to_batch(
    parts_s: Tensor,
    parts_t: Tensor,
    mask: Tensor,
    other_s: Tensor,
    other_t: Tensor,
    scale_s: Scale,
    scale_t: Scale,
) -> Tensor:
    """In batch: every valid part's distribution over the N global embeddings of the other modality.

    parts_s: (N, K, D) raw student; parts_t: (N, K, D) teacher; mask: (N, K) bool;
    other_s: (N, D) raw student; other_t: (N, D) teacher.
    Logits (N, K, N) = scale·part·otherᵀ; invalid parts are dropped rows. Returns ().
    """
    ps, pt = masked_parts(parts_s, mask, True), masked_parts(parts_t, mask, False)
    logits_s = scale_s * ps @ unit(other_s).T  # (N, K, N)
    logits_t = scale_t * pt @ frozen(other_t).T  # (N, K, N)
    row_mask = mask[:, :, None].expand_as(logits_s)  # (N, K, N): whole row valid or not
    return masked_kl_rows(logits_s, logits_t, row_mask)


# --- HieRD v2: part-level distillation across models (docs/hierd.md, "HieRD v2") ---------
# The terms above compare the student with itself (relational KLs in its own space). The
# ones below put a student part next to a *teacher* vector, as CLIP-KD's FD and ICL do at
# the global level, so they take the `*_st` fields (the student projected into the
# teacher's space; the same tensors when the widths match):
#
#   hierd_clu_fd / hierd_phr_fd / hierd_crop_fd  part_fd              valid part -> its teacher part (MSE)
#   hierd_phr_img_x / hierd_clu_cap_x           part_to_teacher_batch student part -> the N teacher images / captions
#   hierd_clu_phr_x                              cluster_phrase_cross  student cluster -> teacher phrases, and back
#   hierd_clu_phr_bx                             cluster_phrase_batch_cross  the same over every part of the batch
#   hierd_neg                                    negative_kl           image -> {caption, its perturbations}
#   dense_fd / grid2_fd / grid3_fd               dense_fd              controls of part FD: every patch token / fixed cell


def part_fd(parts_s: Tensor, parts_t: Tensor, mask: Tensor) -> Tensor:
    """Part-level feature distillation: element-mean MSE over the valid parts.

    parts_s: (N, K, D) raw student (normalised here); parts_t: (N, K, D) teacher
    (normalised); mask: (N, K) bool. Returns () = Σ_valid ‖p̂s − pt‖² / D / #valid, the
    per-part analogue of `fd` (same scale, so FD's weight carries over); 0 (attached to
    the graph) when no part is valid.
    """
    ps, pt = masked_parts(parts_s, mask, True), masked_parts(parts_t, mask, False)
    per_part = ((ps - pt) ** 2).mean(-1)  # (N, K)
    return torch.where(mask, per_part, 0.0).sum() / mask.sum().clamp(min=1)


def part_to_teacher_batch(
    parts_s: Tensor,
    parts_t: Tensor,
    mask: Tensor,
    other_t: Tensor,
    scale_s: Scale,
    scale_t: Scale,
) -> Tensor:
    """Across models, in batch: a student part's distribution over the N *teacher* global
    embeddings of the other modality, matched to the teacher part's (soft ICL for parts).

    parts_s: (N, K, D) raw student; parts_t: (N, K, D) teacher; mask: (N, K) bool;
    other_t: (N, D) teacher images or captions.
    Logits (N, K, N): student σ_s·p̂s·otherᵀ, teacher σ_t·pt·otherᵀ; invalid parts are
    dropped rows. Soft targets rather than ICL's one-hot: a phrase ("a red circle") or a
    region can match many images/captions of a batch, and the teacher says which.
    Returns ().
    """
    ps, pt = masked_parts(parts_s, mask, True), masked_parts(parts_t, mask, False)
    ot = frozen(other_t)
    logits_s = scale_s * ps @ ot.T  # (N, K, N)
    logits_t = scale_t * pt @ ot.T  # (N, K, N)
    row_mask = mask[:, :, None].expand_as(logits_s)
    return masked_kl_rows(logits_s, logits_t, row_mask)


def cluster_phrase_cross(
    clu_s: Tensor,
    clu_t: Tensor,
    clu_mask: Tensor,
    phr_s: Tensor,
    phr_t: Tensor,
    phr_mask: Tensor,
    scale_s: Scale,
    scale_t: Scale,
) -> Tensor:
    """Within one pair, across models: each student cluster's distribution over the
    teacher's phrases, and each student phrase's over the teacher's clusters.

    clu_*: (N, K, D), clu_mask: (N, K); phr_*: (N, P, D), phr_mask: (N, P).
    Rows: student σ_s·ĉs·ptᵀ vs teacher σ_t·ct·ptᵀ (N, K, P);
    columns: student σ_s·p̂s·ctᵀ vs teacher σ_t·pt·ctᵀ (N, P, K).
    Returns () = ½[KL_rows + KL_cols] (masked, rows with < 2 valid entries dropped).
    """
    cs, ct = masked_parts(clu_s, clu_mask, True), masked_parts(clu_t, clu_mask, False)
    ps, pt = masked_parts(phr_s, phr_mask, True), masked_parts(phr_t, phr_mask, False)
    pair_mask = clu_mask[:, :, None] & phr_mask[:, None, :]  # (N, K, P)
    rows = masked_kl_rows(scale_s * cs @ pt.transpose(1, 2), scale_t * ct @ pt.transpose(1, 2), pair_mask)
    cols = masked_kl_rows(scale_s * ps @ ct.transpose(1, 2), scale_t * pt @ ct.transpose(1, 2),
                          pair_mask.transpose(1, 2))
    return 0.5 * (rows + cols)


def cluster_phrase_batch_cross(
    clu_s: Tensor,
    clu_t: Tensor,
    clu_mask: Tensor,
    phr_s: Tensor,
    phr_t: Tensor,
    phr_mask: Tensor,
    scale_s: Scale,
    scale_t: Scale,
) -> Tensor:
    """In batch, across models: each valid student cluster's distribution over *every* valid
    teacher phrase of the batch (all N captions), and each valid student phrase's over every
    valid teacher cluster of the batch (all N images), matched to the teacher part's own.

    `cluster_phrase_cross` is the same with the distributions confined to one pair; here the
    other pairs' parts are the negatives, so the student learns which regions of *other*
    images a phrase also names (and which phrases of other captions a region fits).
    clu_*: (N, K, D), clu_mask: (N, K); phr_*: (N, P, D), phr_mask: (N, P).
    Rows: student σ_s·ĉs·ptᵀ vs teacher σ_t·ct·ptᵀ, (N·K, N·P); columns: student σ_s·p̂s·ctᵀ vs
    teacher σ_t·pt·ctᵀ, (N·P, N·K). Invalid parts are dropped rows and −inf entries.
    Returns () = ½[KL_rows + KL_cols].
    """
    cs, ct = masked_parts(clu_s, clu_mask, True).flatten(0, 1), masked_parts(clu_t, clu_mask, False).flatten(0, 1)
    ps, pt = masked_parts(phr_s, phr_mask, True).flatten(0, 1), masked_parts(phr_t, phr_mask, False).flatten(0, 1)
    cm, pm = clu_mask.flatten(), phr_mask.flatten()  # (N·K,), (N·P,)
    rows = masked_kl_rows(scale_s * cs @ pt.T, scale_t * ct @ pt.T, cm[:, None] & pm[None, :])  # (N·K, N·P)
    cols = masked_kl_rows(scale_s * ps @ ct.T, scale_t * pt @ ct.T, pm[:, None] & cm[None, :])  # (N·P, N·K)
    return 0.5 * (rows + cols)


def dense_fd(parts_s: Tensor, parts_t: Tensor) -> Tensor:
    """FD over every part, none masked: Σ_{n,g} ‖p̂s_ng − pt_ng‖² / D / (N·G).

    The controls of part FD: every student patch token -> the teacher's patch token at the
    same place (dense FD), or the student's patch tokens pooled over fixed cells -> the
    teacher's pooled over the same cells (fixed-grid FD). parts_s: (N, G, D) raw student
    (normalised here); parts_t: (N, G, D) teacher (normalised). Returns (). Equals `part_fd`
    with every part valid, so FD's weight carries over.
    """
    return F.mse_loss(unit(parts_s), frozen(parts_t))


def negative_kl(
    img_s: Tensor,
    txt_s: Tensor,
    neg_s: Tensor,
    img_t: Tensor,
    txt_t: Tensor,
    neg_t: Tensor,
    neg_mask: Tensor,
    scale_s: Scale,
    scale_t: Scale,
) -> Tensor:
    """Compositional negative distillation: per sample, the image's distribution over
    {its caption, the caption's valid structure-preserving perturbations}.

    img_s, txt_s: (N, D) raw student; neg_s: (N, Q, D) raw student text tower on the
    perturbations; img_t, txt_t: (N, D), neg_t: (N, Q, D) teacher; neg_mask: (N, Q) bool.
    Logits (N, 1 + Q): student σ_s·⟨v̂s, [t̂s, n̂s_q]⟩, teacher σ_t·⟨vt, [tt, nt_q]⟩.
    A sample without a valid perturbation has one entry and is dropped. Returns ().
    """
    cand_s = torch.cat([unit(txt_s)[:, None], masked_parts(neg_s, neg_mask, True)], dim=1)  # (N, 1+Q, D)
    cand_t = torch.cat([frozen(txt_t)[:, None], masked_parts(neg_t, neg_mask, False)], dim=1)
    logits_s = scale_s * torch.einsum("nqd,nd->nq", cand_s, unit(img_s))  # (N, 1+Q)
    logits_t = scale_t * torch.einsum("nqd,nd->nq", cand_t, frozen(img_t))
    mask = torch.cat([torch.ones_like(neg_mask[:, :1]), neg_mask], dim=1)
    return masked_kl_rows(logits_s, logits_t, mask)
