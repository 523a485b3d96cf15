"""`hierdctl eval-retrieval`: image↔text recall@K, CLIP_benchmark's metrics, FAISS search.

Every model (teacher, exported student, open_clip tag: any spec of hierdctl.specs) reads
the same source through the same code: images decoded by `images.decode_rgb` and put
through the model's own eval transform, every caption of a sample kept (COCO has 5),
embeddings L2-normalised. Captions are searched against an index of images
(image_retrieval_recall@K) and images against an index of captions
(text_retrieval_recall@K); the metric definitions are in hierdctl/retrieval.py and
docs/eval.md. Samples whose .json carries `hard_negatives` also give hardneg_acc/<kind>.

The first model is the reference: every later model gets its retention of the
reference's score, in %. The report (docs/eval.md) is one flat JSON object.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hierdctl import distributed
from hierdctl.atomic import publish_dir
from hierdctl.configs import EvalRetrievalConfig
from hierdctl.embedding import check_joint_space, encode_images, encode_texts
from hierdctl.reports import finish_report, retention, versions
from hierdctl.retrieval import build_index, check_ks, hardneg_accuracy, index_to_cpu, recall_from_ranked, search
from hierdctl.sources import bound_caption, open_source
from hierdctl.specs import load_encoder

from hierdctl.reports import INDEX_MARKER
from hierdctl.reports import RETRIEVAL_SCHEMA as REPORT_SCHEMA


# ----------------------------------------------------------------------------------
# Embedding one model's view of the source (hierdctl/embedding.py does the reading)
# ----------------------------------------------------------------------------------


@dataclass
class Embedded:
    keys: list[str]
    img: np.ndarray  # (Ni,D)
    txt: np.ndarray  # (Nt,D)
    text_to_image: np.ndarray  # (Nt,)
    neg: np.ndarray  # (Nn,D)
    neg_image: np.ndarray  # (Nn,)
    neg_kind: list[str]
    skipped: Counter
    timing: dict
    captions: list[str] = field(default_factory=list)  # (Nt,) the caption texts (the --html report shows some)
    captions_cut: int = 0  # captions and hard negatives cut to sources.MAX_CAPTION_CHARS


def _captions_and_negatives(s) -> tuple[str, list[str], list[tuple[str, str]], int]:
    """What eval-retrieval keeps of a sample: key, captions, (kind, hard negative) pairs (bounded
    like captions), and how many of them were cut to sources.MAX_CAPTION_CHARS."""
    hn = s.meta.get("hard_negatives") if isinstance(s.meta, dict) else None
    negs, cut = [], s.captions_cut
    for kind, items in (hn.items() if isinstance(hn, dict) else ()):
        for c in (items if isinstance(items, list) else []):
            if isinstance(c, str):
                c, was_cut = bound_caption(c)
                if c:
                    negs.append((str(kind), c))
                    cut += was_cut
    return s.key, list(s.captions), negs, cut


def embed_source(encoder, source, cfg: EvalRetrievalConfig, label: str) -> Embedded:
    kept, img, skipped, t_img = encode_images(
        encoder, source, batch_size=cfg.batch_size, workers=cfg.workers, max_pixels=cfg.max_pixels, label=label,
        quiet=cfg.quiet, keep=_captions_and_negatives, what="image–caption pair", where_source=cfg.source)
    keys = [k for k, _, _, _ in kept]
    captions = [c for _, caps, _, _ in kept for c in caps]
    owner = [i for i, (_, caps, _, _) in enumerate(kept) for _ in caps]
    negs = [(i, kind, c) for i, (_, _, ns, _) in enumerate(kept) for kind, c in ns]
    t0 = time.perf_counter()
    txt = encode_texts(encoder, captions, cfg.batch_size)
    neg = encode_texts(encoder, [c for _, _, c in negs], cfg.batch_size) if negs else np.zeros((0, txt.shape[1]),
                                                                                              np.float32)
    t_txt = time.perf_counter() - t0
    check_joint_space(encoder.spec.raw, img.shape[1], txt.shape[1])
    n_txt = len(captions) + len(negs)
    timing = {"encode_images_s": round(t_img, 3), "encode_texts_s": round(t_txt, 3),
              "images_per_s": round(len(keys) / max(t_img, 1e-9), 1), "texts_per_s": round(n_txt / max(t_txt, 1e-9), 1)}
    return Embedded(keys, img, txt, np.asarray(owner, np.int64), neg, np.asarray([i for i, _, _ in negs], np.int64),
                    [k for _, k, _ in negs], skipped, timing, captions, sum(cut for _, _, _, cut in kept))


# ----------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------


def _counts(e: Embedded) -> dict:
    per = np.bincount(e.text_to_image, minlength=len(e.keys))
    return {
        "images": len(e.keys), "captions": int(len(e.text_to_image)),
        "captions_per_image": {"min": int(per.min()), "max": int(per.max()), "mean": round(float(per.mean()), 3)},
        "hard_negatives": dict(sorted(Counter(e.neg_kind).items())),
        "images_with_hard_negatives": int(len(set(e.neg_image.tolist()))),
        "skipped": dict(sorted(e.skipped.items())), "skipped_total": int(sum(e.skipped.values())),
        "caption_truncated": e.captions_cut,
    }


def evaluate(e: Embedded, cfg: EvalRetrievalConfig):
    """(metrics, index description, timing, (image index, caption index)) for one model's embeddings."""
    k = max(cfg.ks)
    t0 = time.perf_counter()
    img_index, info = build_index(e.img, cfg.index, k, nprobe=cfg.nprobe)
    txt_index, _ = build_index(e.txt, cfg.index, k, nprobe=cfg.nprobe)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact = info.exact  # ties break to the lower id, as CLIP_benchmark ranks them (exact indexes only)
    img_for_text = search(img_index, e.txt, k, gallery=e.img if exact else None)  # (Nt,k) images per caption
    text_for_img = search(txt_index, e.img, k, gallery=e.txt if exact else None)  # (Ni,k) captions per image
    t_search = time.perf_counter() - t0
    metrics = recall_from_ranked(img_for_text, text_for_img, e.text_to_image, cfg.ks)
    metrics |= hardneg_accuracy(e.img, e.txt, e.text_to_image, e.neg, e.neg_image, e.neg_kind)
    desc = {"kind": info.kind, "exact": info.exact, "device": info.device, "params": info.params,
            "metric": "inner product of L2-normalised embeddings"}
    return metrics, desc, {"index_build_s": round(t_build, 3), "search_s": round(t_search, 3)}, (img_index, txt_index)


def _save_index(dirpath: Path, runs: list[dict], overwrite: bool) -> None:
    import faiss

    def write(tmp: Path):
        entries = []
        for i, r in enumerate(runs):
            e: Embedded = r["embedded"]
            d = tmp / f"model-{i}"
            d.mkdir()
            np.save(d / "image_emb.npy", e.img)
            np.save(d / "text_emb.npy", e.txt)
            np.save(d / "text_to_image.npy", e.text_to_image)
            (d / "keys.json").write_text(json.dumps(e.keys))
            faiss.write_index(index_to_cpu(r["indexes"][0]), str(d / "image.faiss"))
            faiss.write_index(index_to_cpu(r["indexes"][1]), str(d / "text.faiss"))
            entries.append({"dir": d.name, "spec": r["spec"], "index": r["index"]})
        layout = {"image_emb.npy": "(Ni,D) float32, L2-normalised; row i is keys[i]",
                  "text_emb.npy": "(Nt,D) float32, L2-normalised; row t is a caption of image text_to_image[t]",
                  "text_to_image.npy": "(Nt,) int64", "keys.json": "(Ni,) sample keys",
                  "image.faiss": "index over image_emb (captions search it)",
                  "text.faiss": "index over text_emb (images search it)"}
        (tmp / INDEX_MARKER).write_text(json.dumps({"schema": REPORT_SCHEMA, "layout": layout, "models": entries},
                                                   indent=2))  # last: the done-marker

    publish_dir(dirpath, write, marker=INDEX_MARKER, schema=REPORT_SCHEMA, where="--save-index",
                overwrite=overwrite, what="a saved index")


def run(cfg: EvalRetrievalConfig) -> dict:
    """Evaluate every model; return (and with cfg.out, write) the report of docs/eval.md."""
    cfg.validate()
    started = time.time()
    source = open_source(cfg.source, cfg.source_options)
    device = distributed.resolve_device(cfg.device, distributed.resolve())
    runs, ref = [], None  # ref: the first model's keys, text_to_image and counts (not its embeddings)
    html_queries, html_ranked = None, []  # --html: the sampled caption ids, each model's ranked images for them
    for i, spec in enumerate(cfg.models):
        encoder = load_encoder(spec, device, "--model")
        e = embed_source(encoder, source, cfg, f"[{i}] {spec}")
        if ref is None:
            check_ks(cfg.ks, len(e.keys), len(e.text_to_image))
            ref = {"keys": e.keys, "text_to_image": e.text_to_image, "counts": _counts(e)}
        assert e.keys == ref["keys"] and np.array_equal(e.text_to_image, ref["text_to_image"]), "same data for every model"
        metrics, index, t_search, indexes = evaluate(e, cfg)
        if cfg.html:  # issue 20: what this model retrieves for the sampled queries
            if html_queries is None:
                html_queries = _html_queries(e, cfg.html_queries)
            html_ranked.append(_html_ranked(e, indexes[0], html_queries, index["exact"], min(max(cfg.ks), 10)))
        r = {"spec": spec, "model": encoder.describe(), "embed_dim": int(e.img.shape[1]),
             "metrics": metrics, "timing": e.timing | t_search, "index": index}
        if cfg.save_index:  # only then are embeddings and indexes (maybe on the GPU) kept past this model
            r |= {"embedded": e, "indexes": indexes}
        runs.append(r)
        del encoder, e, indexes
    reference = runs[0]["metrics"]
    for r in runs:
        r["retention"] = retention(r["metrics"], reference) if r is not runs[0] else {}
    if cfg.save_index:
        _save_index(Path(cfg.save_index), runs, cfg.overwrite)
    report = {
        "schema": REPORT_SCHEMA,
        "task": "retrieval",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": source.describe() | {"options": {"image_col": cfg.source_options.image_col,
                                                   "caption_col": cfg.source_options.caption_col,
                                                   "image_root": cfg.source_options.image_root,
                                                   "split": cfg.source_options.split}},
        "counts": ref["counts"],
        "k": cfg.ks,
        "index": runs[0]["index"],
        "exact": runs[0]["index"]["exact"],
        "reference": cfg.models[0],
        "device": device,
        "models": [{k: r[k] for k in ("spec", "model", "embed_dim", "metrics", "retention", "timing")} for r in runs],
        "seconds": round(time.time() - started, 3),
        "versions": versions(),
    }
    if cfg.html:
        report["html"] = {"path": str(cfg.html), "queries": len(html_queries["ids"])}
        _write_html(cfg, source, report, ref["keys"], html_queries, html_ranked)
    return finish_report(report, cfg.out, cfg.quiet, "eval-retrieval")


# ----------------------------------------------------------------------------------
# --html (issue 20): hierdctl/html_report.py renders the page
# ----------------------------------------------------------------------------------


def _html_queries(e: Embedded, n: int) -> dict:
    """A seeded sample of caption ids (sorted), their texts and their own images."""
    from hierdctl.html_report import QUERY_SEED

    nt = len(e.text_to_image)
    ids = np.sort(np.random.default_rng(QUERY_SEED).choice(nt, size=min(n, nt), replace=False))
    return {"ids": ids, "captions": [e.captions[i] for i in ids], "images": e.text_to_image[ids]}


def _html_ranked(e: Embedded, img_index, q: dict, exact: bool, k: int) -> list[list[tuple[int, float]]]:
    """Per sampled caption: the model's top-k (image id, cosine score), as its image index ranks them."""
    ranked = search(img_index, e.txt[q["ids"]], k, gallery=e.img if exact else None)  # (Q,k)
    out = []
    for row, t in zip(ranked, q["ids"]):
        ids = [int(i) for i in row if i >= 0]
        out.append([(i, float(e.img[i] @ e.txt[t])) for i in ids])
    return out


def _write_html(cfg: EvalRetrievalConfig, source, report: dict, keys: list[str], q: dict, ranked: list) -> None:
    """Thumbnails of every image the page shows (a second pass over the source, decoding only
    those), every export's loss curves, then the page, written atomically."""
    from hierdctl import html_report
    from hierdctl.atomic import remove_dead_leftovers, write_text_atomic
    from hierdctl.embedding import iter_samples

    shown = {int(i) for i in q["images"]} | {i for per_model in ranked for row in per_model for i, _ in row}
    want = {keys[i] for i in shown}
    by_key: dict[str, str] = {}  # a key's first decodable image (a key given twice shows that one)
    for s in iter_samples(source, Counter()):
        if s.key in want and s.key not in by_key:
            uri = html_report.thumbnail(s.image, cfg.max_pixels)
            if uri is not None:
                by_key[s.key] = uri
                if len(by_key) == len(want):
                    break
    thumbs = {i: by_key.get(keys[i]) for i in shown}
    curves = {spec: c for spec in dict.fromkeys(cfg.models) if (c := html_report.loss_curves(spec))}
    queries = [{"caption": cap, "image": int(img), "results": [per_model[j] for per_model in ranked]}
               for j, (cap, img) in enumerate(zip(q["captions"], q["images"]))]
    remove_dead_leftovers(Path(cfg.html))  # what a killed evaluation's write of this page left
    write_text_atomic(Path(cfg.html), html_report.render(report, queries, thumbs, curves, keys))
