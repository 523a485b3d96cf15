"""Retrieval and classification metrics, shared by eval-retrieval, eval-zeroshot and bench/.

Definitions follow CLIP_benchmark (clip_benchmark/metrics/zeroshot_retrieval.py): with
Nt captions, Ni images and `text_to_image` (Nt,) naming each caption's image,

    image_retrieval_recall@K  fraction of captions whose image is among the K images
                              nearest to the caption
    text_retrieval_recall@K   fraction of images with at least one of their captions
                              among the K captions nearest to the image

"Nearest" is the inner product of L2-normalised embeddings (cosine). The same numbers
come from a dense score matrix (`recall_from_scores`, the torch reference) or from the
ranked lists an index returns (`recall_from_ranked`), which is what eval-retrieval uses:
an exact FAISS IndexFlatIP by default, IVF or HNSW as labelled approximations.

Hard negatives (`hardneg_accuracy`): for an image i with true captions T_i and a false
caption n, the pair (i, n) scores mean_{t in T_i} [s(i,t) > s(i,n)] — the mean over the
image's true captions, ties counted as failures. `hardneg_acc/<kind>` is the mean over the
pairs of that kind, `hardneg_acc/all` the mean over every pair (a micro average).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

INDEX_KINDS = ("flat", "ivf", "hnsw")


# ----------------------------------------------------------------------------------
# Recall@K
# ----------------------------------------------------------------------------------


def first_hit(ranked: np.ndarray, positive) -> np.ndarray:
    """ranked (Q,K) gallery ids per query; positive(q_ids (Q,1), ranked) -> (Q,K) bool.

    Returns (Q,) the rank of the first positive, or K when none is in the list."""
    hits = positive(ranked)
    assert hits.shape == ranked.shape, (hits.shape, ranked.shape)
    any_hit = hits.any(axis=1)
    return np.where(any_hit, hits.argmax(axis=1), ranked.shape[1])


def recall_from_ranked(img_for_text: np.ndarray, text_for_img: np.ndarray, text_to_image: np.ndarray,
                       ks: list[int]) -> dict[str, float]:
    """img_for_text (Nt,K) image ids ranked per caption; text_for_img (Ni,K) caption ids
    ranked per image; both with K >= max(ks). Index padding (-1) never counts as a hit."""
    text_to_image = np.asarray(text_to_image)
    nt, ni = img_for_text.shape[0], text_for_img.shape[0]
    assert text_to_image.shape == (nt,), (text_to_image.shape, nt)
    assert min(img_for_text.shape[1], text_for_img.shape[1]) >= max(ks), (img_for_text.shape, text_for_img.shape, ks)
    r_img = first_hit(img_for_text, lambda r: r == text_to_image[:, None])  # (Nt,)
    owner = np.where(text_for_img >= 0, text_to_image[np.clip(text_for_img, 0, None)], -1)  # (Ni,K) image of each ranked caption
    r_txt = first_hit(owner, lambda o: o == np.arange(ni)[:, None])  # (Ni,)
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float((r_img < k).mean())
        out[f"text_retrieval_recall@{k}"] = float((r_txt < k).mean())
    return out


def recall_from_scores(scores, text_to_image, ks: list[int]) -> dict[str, float]:
    """The brute-force reference: scores (Nt,Ni) caption-image similarities (torch or numpy)."""
    import torch

    s = torch.as_tensor(scores, dtype=torch.float32)
    k = max(ks)
    # Ties (within TIE_ATOL) to the lower index, as `search` ranks them.
    sn = s.numpy()
    img_for_text = _lowest_id_first(sn, np.broadcast_to(np.arange(sn.shape[1]), sn.shape))[:, :k]  # (Nt,k)
    text_for_img = _lowest_id_first(sn.T, np.broadcast_to(np.arange(sn.shape[0]), sn.T.shape))[:, :k]  # (Ni,k)
    return recall_from_ranked(img_for_text, text_for_img, np.asarray(text_to_image), ks)


def check_ks(ks: list[int], n_images: int, n_texts: int, where: str = "--k") -> None:
    from .errors import UserError

    if not ks or min(ks) < 1:
        raise UserError(f"K must be positive integers, got {ks}", where)
    if max(ks) > n_images:
        raise UserError(f"K={max(ks)} is larger than the gallery ({n_images} images, {n_texts} captions)", where)


# ----------------------------------------------------------------------------------
# FAISS
# ----------------------------------------------------------------------------------


@dataclass
class IndexInfo:
    kind: str
    exact: bool
    device: str  # "cpu" | "gpu"
    params: dict = field(default_factory=dict)

    def label(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.kind} ({'exact' if self.exact else 'approximate'}{', ' + p if p else ''}; faiss {self.device})"


def faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


@functools.lru_cache(maxsize=1)
def gpu_resources():
    """One faiss StandardGpuResources for the process: each holds its own scratch memory and
    CUDA streams, so every GPU index (both per model, every model) shares this one."""
    import faiss

    return faiss.StandardGpuResources()


def build_index(vectors: np.ndarray, kind: str = "flat", k: int = 10, use_gpu: bool | None = None,
                nprobe: int | None = None, seed: int = 0):
    """An inner-product index over vectors (N,D) float32: (index, IndexInfo).

    flat  IndexFlatIP: exact.
    ivf   IndexIVFFlat, nlist ≈ 4·√N (≥ 39 training points per list), nprobe = nlist/8 (≥ 1).
    hnsw  IndexHNSWFlat, M = 32, efConstruction = 80, efSearch = max(128, 2K); CPU only in faiss.
    """
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    assert kind in INDEX_KINDS, kind
    params: dict = {}
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = int(max(1, min(round(4 * np.sqrt(n)), n // 39)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.cp.min_points_per_centroid = 1  # nlist already keeps ≥ 39 points per list when N allows
        index.train(x)
        index.nprobe = int(nprobe or max(1, nlist // 8))
        params = {"nlist": nlist, "nprobe": int(index.nprobe)}
    else:
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = max(128, 2 * k)
        params = {"M": 32, "efSearch": int(index.hnsw.efSearch)}
    on_gpu = (faiss_gpus() > 0) if use_gpu is None else use_gpu
    on_gpu = on_gpu and kind != "hnsw"
    if on_gpu:
        index = faiss.index_cpu_to_gpu(gpu_resources(), 0, index)
    index.add(x)
    return index, IndexInfo(kind, kind == "flat", "gpu" if on_gpu else "cpu", params)


def search(index, queries: np.ndarray, k: int, batch: int = 16384, gallery: np.ndarray | None = None) -> np.ndarray:
    """(Q,k) int64 ids, best first; in query batches so GPU memory stays bounded.

    With `gallery` (the vectors an exact index holds), equal scores (within TIE_ATOL) rank the
    lower gallery id first — CLIP_benchmark's ordering for its recall@1 (torch.topk, k = 1), so duplicate
    captions cannot make the two tools disagree. FAISS's own order among ties is its heap's:
    the index is asked for a few more than k, each row is re-sorted by (score desc, id asc),
    and a row whose tie group may run past what was returned is ranked exactly by brute force."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    out = np.empty((q.shape[0], k), dtype=np.int64)
    extra = 0 if gallery is None else min(16, index.ntotal - k)
    for a in range(0, q.shape[0], batch):
        scores, ids = index.search(q[a : a + batch], k + extra)
        if gallery is not None:
            ids = _ties_to_lowest_id(scores, ids, k, q[a : a + batch], gallery)
        out[a : a + batch] = ids[:, :k]
    return out


TIE_ATOL = 1e-6  # cosine scores this close are one tie: identical vectors may differ in the last bit by the
# order a BLAS or SIMD kernel sums them in, so exact equality would not see duplicate captions as ties


def _lowest_id_first(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Order each row by score descending, scores within TIE_ATOL of their neighbour forming one
    tie group ordered by id ascending. scores, ids (Q,M) -> (Q,M) positions."""
    order = np.argsort(-scores, axis=1, kind="stable")
    s = np.take_along_axis(scores, order, axis=1)
    group = np.concatenate([np.zeros((len(s), 1), np.int64), np.cumsum(s[:, :-1] - s[:, 1:] > TIE_ATOL, axis=1)],
                           axis=1)  # (Q,M) tie-group number along the descending order
    inner = np.lexsort((np.take_along_axis(ids, order, axis=1), group), axis=1)
    return np.take_along_axis(order, inner, axis=1)


def _ties_to_lowest_id(scores: np.ndarray, ids: np.ndarray, k: int, queries: np.ndarray,
                       gallery: np.ndarray) -> np.ndarray:
    """Re-sort each row of a k' ≥ k result, ties to the lower id; exact brute force where a tie
    at rank k may continue past the k' returned."""
    pos = _lowest_id_first(scores, ids)
    ids = np.take_along_axis(ids, pos, axis=1)
    scores = np.take_along_axis(scores, pos, axis=1)
    unsure = (np.abs(scores[:, k - 1] - scores.min(axis=1)) <= TIE_ATOL) & (ids.shape[1] < gallery.shape[0])
    for r in np.flatnonzero(unsure):
        full = (gallery @ queries[r])[None]  # (1,N) the same float32 inner products
        ids[r] = _lowest_id_first(full, np.arange(full.shape[1])[None])[0, : ids.shape[1]]
    return ids


def index_to_cpu(index):
    import faiss

    return faiss.index_gpu_to_cpu(index) if hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex) else index


# ----------------------------------------------------------------------------------
# Hard negatives
# ----------------------------------------------------------------------------------


def hardneg_accuracy(img: np.ndarray, txt: np.ndarray, text_to_image: np.ndarray, neg: np.ndarray,
                     neg_image: np.ndarray, neg_kind: list[str]) -> dict[str, float]:
    """img (Ni,D), txt (Nt,D), neg (Nn,D) normalised; neg_image (Nn,) the image each negative
    belongs to; neg_kind (Nn,) its kind. Returns {"hardneg_acc/<kind>": acc, "hardneg_acc/all": acc}."""
    text_to_image, neg_image = np.asarray(text_to_image), np.asarray(neg_image)
    if len(neg_image) == 0:
        return {}
    ni = img.shape[0]
    pos = np.einsum("td,td->t", txt, img[text_to_image])  # (Nt,) s(image of t, t)
    n_cap = np.bincount(text_to_image, minlength=ni)  # (Ni,)
    cmax = int(n_cap.max())
    order = np.argsort(text_to_image, kind="stable")
    slot = np.arange(len(order)) - np.repeat(np.cumsum(n_cap) - n_cap, n_cap)  # position within its image
    P = np.full((ni, cmax), np.nan, dtype=np.float64)  # (Ni,Cmax) true-caption scores, NaN-padded
    P[text_to_image[order], slot] = pos[order]
    s_neg = np.einsum("nd,nd->n", neg, img[neg_image])  # (Nn,)
    true = P[neg_image]  # (Nn,Cmax)
    valid = ~np.isnan(true)
    assert valid.any(axis=1).all(), "every image with negatives has a true caption"
    wins = ((true > s_neg[:, None]) & valid).sum(axis=1) / valid.sum(axis=1)  # (Nn,) per pair
    kinds = np.asarray(neg_kind)
    out = {f"hardneg_acc/{k}": float(wins[kinds == k].mean()) for k in sorted(set(neg_kind))}
    out["hardneg_acc/all"] = float(wins.mean())
    return out


# ----------------------------------------------------------------------------------
# Zero-shot classification
# ----------------------------------------------------------------------------------


def classification_metrics(logits: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, float]:
    """CLIP_benchmark's names: acc1, acc5 (only with ≥ 5 classes), mean_per_class_recall
    (the mean over classes present in `labels` of the per-class top-1 recall).

    Top-k needs only the true class's rank, not a sort of every row: rank = the number of
    classes scoring above it, ties going to the lower class index (a stable descending sort's
    order), and the true class is in the top k iff rank < k. O(N·C), in row blocks."""
    labels = np.asarray(labels)
    assert logits.shape == (len(labels), n_classes), (logits.shape, len(labels), n_classes)
    rank = np.empty(len(labels), dtype=np.int64)  # (N,) 0 = top-1
    cls = np.arange(n_classes)
    for a in range(0, len(labels), 4096):
        lg, lb = logits[a : a + 4096], labels[a : a + 4096]
        own = lg[np.arange(len(lb)), lb][:, None]  # (n,1) the true class's logit
        ahead = (lg > own) | ((lg == own) & (cls[None, :] < lb[:, None]))  # (n,C)
        rank[a : a + 4096] = ahead.sum(axis=1)
    top1 = rank == 0
    out = {"acc1": float(top1.mean())}
    if n_classes >= 5:
        out["acc5"] = float((rank < 5).mean())
    present = np.unique(labels)
    out["mean_per_class_recall"] = float(np.mean([top1[labels == c].mean() for c in present]))
    return out
