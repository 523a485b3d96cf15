"""A FAISS index over an embeddings folder: building it, measuring its recall, its folder.

    INDEX/index.faiss   the FAISS index (faiss.write_index, CPU form), inner product
    INDEX/index.json    the manifest, written last (it marks the folder as hierdctl's): schema, the
                        embeddings it was built from (path relative to INDEX and absolute, content
                        digest), the model (spec, weight fingerprint, embedding dim), what it is over
                        (image or caption rows), kind and parameters, rows, recall@10 against exact
                        and how it was measured, build time

Index types, sized to the collection of N vectors of dimension D:

    flat   IndexFlatIP: exact.
    ivf    IndexIVFFlat: nlist ≈ 4·√N (at most N/39, so every list gets ≥ 39 training points),
           trained on ≤ 256·nlist sampled rows; nprobe = nlist/8 (≥ 1) unless given.
    hnsw   IndexHNSWFlat: M = 32, efConstruction = 80, efSearch = 128.
    pq     IndexPQ: m sub-quantisers of D/m ≥ 4 dimensions each (m = the largest divisor of D that
           is ≤ D/4 and ≤ 64), 8 bits each (fewer when N is too small to train 256 centroids with
           39 points each; below 16 centroids it is refused), trained on ≤ 256·39 sampled rows:
           4·D bytes a vector become m.

recall@10 against exact is measured on a held-out sample of the collection's own rows (held
out of the training sample, never of the index): for each query row, the share of its 10
exact nearest neighbours other than itself that the index also returns among its top 10
(itself excluded). The exact neighbours come from a brute-force pass over the shards, so no
second copy of the collection is held. An exact index has recall 1 by construction and is
not measured.

`search` refuses a model whose embedding width or weight fingerprint differ from the ones
the collection was embedded with, and an index whose embeddings changed since it was built.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from hierdctl.embeddings_format import Embeddings
from hierdctl.errors import UserError

SCHEMA = "hierdctl.index/1"
MARKER = "index.json"
INDEX_FILE = "index.faiss"
KINDS = ("flat", "ivf", "hnsw", "pq")
RECALL_K = 10
PQ_MIN_TRAIN = 39 * 16  # 4 bits per sub-quantiser at least; fewer make PQ pointless


def ivf_nlist(n: int) -> int:
    return int(max(1, min(round(4 * np.sqrt(n)), n // 39)))


def pq_shape(d: int, n: int) -> tuple[int, int]:
    """(m, nbits) for D = d, N = n training rows at most."""
    m = max([x for x in range(1, min(64, max(1, d // 4)) + 1) if d % x == 0])
    nbits = int(min(8, max(1, np.floor(np.log2(max(2, n / 39))))))
    return m, nbits


def make_index(kind: str, d: int, n: int, nprobe: int | None = None):
    """An untrained index of `kind` for n vectors of dimension d: (index, params, training rows wanted)."""
    import faiss

    assert kind in KINDS, kind
    if kind == "flat":
        return faiss.IndexFlatIP(d), {}, 0
    if kind == "ivf":
        nlist = ivf_nlist(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.min_points_per_centroid = 1  # nlist already keeps ≥ 39 points per list when N allows
        index.nprobe = int(nprobe or max(1, nlist // 8))
        return index, {"nlist": nlist, "nprobe": int(index.nprobe)}, 256 * nlist
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 128
        return index, {"M": 32, "efConstruction": 80, "efSearch": 128}, 0
    m, nbits = pq_shape(d, n)
    index = faiss.IndexPQ(d, m, nbits, faiss.METRIC_INNER_PRODUCT)
    index.pq.cp.min_points_per_centroid = 1
    return index, {"m": m, "nbits": nbits, "bytes_per_vector": (m * nbits + 7) // 8}, 256 * 39


def set_search_params(index, kind: str, params: dict) -> None:
    """What a read-back index must search with (the manifest's parameters)."""
    if kind == "ivf":
        index.nprobe = int(params["nprobe"])
    elif kind == "hnsw":
        index.hnsw.efSearch = int(params["efSearch"])


def exact_neighbours(emb: Embeddings, over: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force over the shards, streamed: (Q,k) scores and global ids, best first."""
    q = np.ascontiguousarray(queries, np.float32)
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    start = 0
    for _, x in emb.vectors(over):
        s = q @ x.T  # (Q,n)
        ids = np.broadcast_to(np.arange(start, start + x.shape[0]), s.shape)
        start += x.shape[0]
        s, ids = np.concatenate([best_s, s], 1), np.concatenate([best_i, ids], 1)
        keep = min(k, s.shape[1])
        top = np.argpartition(-s, keep - 1, axis=1)[:, :keep] if keep < s.shape[1] else np.argsort(-s, axis=1)
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(ids, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def recall_vs_exact(approx_ids: np.ndarray, exact_ids: np.ndarray, self_ids: np.ndarray, k: int) -> float:
    """Mean over queries of |approx ∩ exact| / k, each list's first k ids other than the query's own row."""
    hits = []
    for a, e, me in zip(approx_ids, exact_ids, self_ids):
        a = [i for i in a if i != me and i >= 0][:k]
        e = [i for i in e if i != me][:k]
        hits.append(len(set(a) & set(e)) / max(1, len(e)))
    return float(np.mean(hits)) if hits else float("nan")


def build(emb: Embeddings, over: str, kind: str, *, nprobe: int | None, recall_queries: int, seed: int,
          progress=None):
    """Build the index over `emb`'s `over` rows: (faiss index (CPU), manifest fields).

    `progress(n)` hears of every n vectors added."""
    import faiss

    counts = emb.counts(over)
    n, d = int(sum(counts)), emb.dim()
    if n == 0:
        raise UserError(f"the embeddings in {emb.root} hold no {over} rows", "--over")
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    index, params, want_train = make_index(kind, d, n, nprobe)
    # Held-out queries (for recall) and the training sample are disjoint sets of rows.
    n_q = 0 if kind == "flat" or n < 2 else min(recall_queries, max(1, n // 10))  # ≤ 10 % held out of training
    perm = rng.permutation(n)
    q_ids, rest = np.sort(perm[:n_q]), perm[n_q:]
    train_s = 0.0
    if want_train:
        t = time.perf_counter()
        sample = np.sort(rest[:want_train])
        x = emb.gather(sample, over)
        if kind == "pq" and len(x) < PQ_MIN_TRAIN:
            raise UserError(f"{len(x)} training rows are too few for product quantisation (≥ {PQ_MIN_TRAIN}: 16 "
                            "centroids per sub-quantiser, 39 rows each); a collection this small is searched "
                            "exactly as fast: use flat", "--index-type")
        index.train(x)
        train_s = time.perf_counter() - t
        params["train_rows"] = int(len(x))
    t = time.perf_counter()
    for _, x in emb.vectors(over):
        index.add(x)
        if progress is not None:
            progress(len(x))
    add_s = time.perf_counter() - t
    build_s = time.perf_counter() - t0
    recall = {"k": RECALL_K, "value": 1.0, "measured": False, "queries": 0, "why": "exact index"}
    if kind != "flat":
        recall = {"k": RECALL_K, "value": None, "measured": False, "queries": 0, "why": "--recall-queries 0"}
        if n_q:
            t = time.perf_counter()
            q = emb.gather(q_ids, over)
            k = min(RECALL_K + 1, n)
            _, exact = exact_neighbours(emb, over, q, k)
            _, approx = index.search(q, k)
            value = recall_vs_exact(approx, exact, q_ids, k - 1)
            recall = {"k": k - 1, "value": round(value, 4), "measured": True, "queries": int(n_q),
                      "held_out": "of the training sample, not of the index; each query's own row excluded",
                      "seconds": round(time.perf_counter() - t, 3)}
    fields = {"kind": kind, "exact": kind == "flat", "params": params, "rows": n, "dim": d, "over": over,
              "metric": "inner product of L2-normalised embeddings", "recall": recall,
              "timing": {"train_s": round(train_s, 3), "add_s": round(add_s, 3), "build_s": round(build_s, 3)},
              "faiss": faiss.__version__}
    return index, fields


def write(out: Path, index, emb: Embeddings, fields: dict, overwrite: bool) -> dict:
    """Publish INDEX atomically (a temporary sibling, renamed); index.json last. Returns the manifest."""
    import faiss

    from hierdctl.atomic import publish_dir

    out = Path(out)
    m = emb.manifest
    manifest = {
        "schema": SCHEMA,
        "embeddings": {"path": os.path.relpath(emb.root.resolve(), out.resolve()), "abs_path": str(emb.root.resolve()),
                       "content_digest": m["content_digest"], "schema": m["schema"]},
        "model": {k: m["model"][k] for k in ("spec", "fingerprint", "embed_dim")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    } | fields

    def fill(tmp: Path) -> None:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        (tmp / MARKER).write_text(json.dumps(manifest, indent=2) + "\n")  # last: the done-marker

    publish_dir(out, fill, marker=MARKER, schema=SCHEMA, where="--out", overwrite=overwrite, what="an index")
    return manifest


def check_target(out: Path, overwrite: bool) -> None:
    from hierdctl.atomic import check_dir_target

    check_dir_target(Path(out), MARKER, SCHEMA, "--out", overwrite, "an index")


class OpenIndex:
    """An index folder read back: manifest, FAISS index, and the embeddings it was built from."""

    def __init__(self, root: Path, where: str = "INDEX"):
        import faiss

        self.root = Path(root)
        try:
            m = json.loads((self.root / MARKER).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{root} holds no {MARKER}: not an index written by hierdctl index", where) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{root}/{MARKER} is unreadable ({e})", where) from None
        if not isinstance(m, dict) or m.get("schema") != SCHEMA:
            raise UserError(f"{root}/{MARKER} is not an index manifest of schema {SCHEMA!r}", where)
        self.manifest = m
        try:
            self.index = faiss.read_index(str(self.root / INDEX_FILE))
        except RuntimeError as e:
            raise UserError(f"cannot read {root}/{INDEX_FILE} ({str(e).splitlines()[0][:160]}): rebuild it with "
                            "hierdctl index", where) from None
        set_search_params(self.index, m["kind"], m["params"])
        rel = self.root / m["embeddings"]["path"]
        folder = rel if rel.is_dir() else Path(m["embeddings"]["abs_path"])
        self.embeddings = Embeddings(folder, where)
        if self.embeddings.manifest["content_digest"] != m["embeddings"]["content_digest"]:
            raise UserError(f"the embeddings in {folder} changed since this index was built: rebuild it with "
                            f"hierdctl index {folder}", where)
        if self.index.ntotal != m["rows"]:
            raise UserError(f"{root}/{INDEX_FILE} holds {self.index.ntotal} vectors, its manifest {m['rows']}: rebuild "
                            "it with hierdctl index", where)

    def check_model(self, spec: str, embed_dim: int, fingerprint: str, where: str = "--model") -> None:
        """The query model must be the one the collection was embedded with."""
        m = self.manifest["model"]
        if embed_dim != m["embed_dim"]:
            raise UserError(f"{spec} gives {embed_dim}-d embeddings but the index holds {m['embed_dim']}-d ones (made "
                            f"with {m['spec']}); search with that model", where)
        if fingerprint != m["fingerprint"]:
            raise UserError(f"{spec} has other weights (fingerprint {fingerprint[:12]}) than the model the collection "
                            f"was embedded with ({m['spec']}, {m['fingerprint'][:12]}); search with that model", where)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q,k') scores and global row ids, best first, k' = min(k, rows); FAISS's -1 padding dropped later."""
        k = min(k, int(self.index.ntotal))
        return self.index.search(np.ascontiguousarray(queries, np.float32), k)
