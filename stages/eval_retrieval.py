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
import platform
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hierdctl.console import console, progress
from hierdctl.errors import UserError, require
from hierdctl.retrieval import INDEX_KINDS
from hierdctl.sources import SourceOptions

REPORT_SCHEMA = "hierdctl.eval-retrieval/1"  # the report's and --save-index's index.json "schema"
INDEX_MARKER = "index.json"


@dataclass
class EvalRetrievalConfig:
    source: str
    models: list[str]
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    batch_size: int = 64
    device: str = "auto"
    index: str = "flat"
    nprobe: int | None = None  # ivf only
    out: Path | None = None
    save_index: Path | None = None
    overwrite: bool = False  # replace an earlier --save-index folder
    source_options: SourceOptions = field(default_factory=SourceOptions)
    max_pixels: int = 89_478_485
    workers: int = 4  # decoding threads
    quiet: bool = False

    def validate(self) -> "EvalRetrievalConfig":
        from hierdctl.specs import parse_spec

        require(bool(self.models), "give at least one --model SPEC", "--model")
        for m in self.models:
            parse_spec(m, "--model")  # a malformed or unknown spec fails before any model loads
        require(bool(self.ks) and min(self.ks) >= 1, f"K must be positive integers, got {self.ks}", "--k")
        self.ks = sorted(set(self.ks))
        require(self.index in INDEX_KINDS, f"unknown index {self.index!r} ({', '.join(INDEX_KINDS)})", "--index")
        require(self.batch_size >= 1, "must be at least 1", "--batch-size")
        require(self.workers >= 0, "must be 0 or more", "--workers")
        require(self.nprobe is None or self.nprobe >= 1, "must be at least 1", "--nprobe")
        require(self.nprobe is None or self.index == "ivf", f"only applies to --index ivf (not {self.index})", "--nprobe")
        require(self.max_pixels > 0, f"must be positive, got {self.max_pixels}", "--max-pixels")
        check_report_path(self.out)
        if self.save_index is not None:
            from hierdctl.atomic import check_dir_target

            check_dir_target(Path(self.save_index), INDEX_MARKER, REPORT_SCHEMA, "--save-index", self.overwrite,
                             "a saved index")
        return self


def check_report_path(out: Path | None, where: str = "--out") -> None:
    """A report path must name a file in an existing folder (checked before any model loads)."""
    if out is None:
        return
    out = Path(out)
    require(not out.is_dir(), f"{out} is a directory; give a file name such as {out / 'report.json'}", where)
    require(out.parent.is_dir(), f"the folder {out.parent} does not exist", where)


def parse_ks(text: str, where: str = "--k") -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated integers like 1,5,10, got {text!r}", where) from None
    require(bool(ks) and min(ks) >= 1, f"K must be positive integers, got {text!r}", where)
    return ks


# ----------------------------------------------------------------------------------
# Reading and encoding (shared with eval-zeroshot)
# ----------------------------------------------------------------------------------


def iter_samples(source, skipped: Counter):
    """Every Sample of every unit, in order; Skips are counted by reason."""
    from hierdctl.sources import Skip

    for unit in source.units:
        for item in source.iter_unit(unit):
            if isinstance(item, Skip):
                skipped[item.reason] += 1
            else:
                yield item


def image_batches(samples, encoder, batch_size: int, workers: int, max_pixels: int, skipped: Counter):
    """Decode + eval-transform in a thread pool; yield (samples, images (B,3,S,S)) batches.
    Undecodable images are skipped and counted, never fatal."""
    import itertools
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from hierdctl.images import BadImage, decode_rgb

    def prep(s):
        try:
            img, _ = decode_rgb(s.image, max_pixels)
        except BadImage as e:
            return s, e.reason
        return s, encoder.eval_transform(img)

    pool = ThreadPoolExecutor(workers) if workers > 0 else None
    try:
        it = iter(samples)
        while True:
            chunk = list(itertools.islice(it, batch_size))
            if not chunk:
                return
            done = list(pool.map(prep, chunk)) if pool else [prep(s) for s in chunk]
            good = [(s, x) for s, x in done if not isinstance(x, str)]
            for _, why in (d for d in done if isinstance(d[1], str)):
                skipped[why] += 1
            if good:
                yield [s for s, _ in good], torch.stack([x for _, x in good])
    finally:
        if pool:
            pool.shutdown()


def encode_texts(encoder, texts: list[str], batch_size: int) -> np.ndarray:
    """(N,D) float32, L2-normalised."""
    import torch

    out = []
    with torch.inference_mode():
        for a in range(0, len(texts), batch_size):
            tok = encoder.tokenize(texts[a : a + batch_size]).to(encoder.device)
            out.append(encoder.encode_text(tok)[0].float().cpu())
    if not out:
        return np.zeros((0, encoder.embed_dim), np.float32)
    return torch.cat(out).numpy()


def versions() -> dict:
    import faiss
    import torch

    from hierdctl import __version__
    from hierdctl.tv_shim import import_open_clip

    v = {"hierdctl": __version__, "python": platform.python_version(), "torch": torch.__version__,
         "numpy": np.__version__, "faiss": faiss.__version__, "open_clip": import_open_clip().__version__}
    if "transformers" in sys.modules:
        v["transformers"] = sys.modules["transformers"].__version__
    return v


def retention(metrics: dict, reference: dict) -> dict:
    """A later model's score as % of the reference's, for every metric the reference has > 0."""
    return {k: round(100.0 * v / reference[k], 2) for k, v in metrics.items() if reference.get(k, 0) > 0}


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


def embed_source(encoder, source, cfg: EvalRetrievalConfig, label: str) -> Embedded:
    import torch

    skipped: Counter = Counter()
    keys, img_out, captions, owner, negs, neg_owner, neg_kind = [], [], [], [], [], [], []
    total = len(getattr(source, "rows", [])) or None
    t0 = time.perf_counter()
    with progress(cfg.quiet) as bar, torch.inference_mode():
        task = bar.add_task(f"encode {label}", total=total, unit="images", info="")
        for batch, x in image_batches(iter_samples(source, skipped), encoder, cfg.batch_size, cfg.workers,
                                      cfg.max_pixels, skipped):
            img_out.append(encoder.encode_image(x.to(encoder.device))[0].float().cpu())
            for s in batch:
                i = len(keys)
                keys.append(s.key)
                captions += s.captions
                owner += [i] * len(s.captions)
                hn = s.meta.get("hard_negatives") if isinstance(s.meta, dict) else None
                for kind, items in (hn.items() if isinstance(hn, dict) else ()):
                    for c in items if isinstance(items, list) else []:
                        if isinstance(c, str) and c.strip():
                            negs.append(" ".join(c.split()))
                            neg_owner.append(i)
                            neg_kind.append(str(kind))
            bar.advance(task, len(batch))
    t_img = time.perf_counter() - t0
    if not keys:
        why = ", ".join(f"{k}: {v}" for k, v in skipped.items()) or "it holds no samples"
        raise UserError(f"no usable image–caption pair in {cfg.source} (skipped: {why})", "SOURCE")
    img = torch.cat(img_out).numpy()
    t0 = time.perf_counter()
    txt = encode_texts(encoder, captions, cfg.batch_size)
    neg = encode_texts(encoder, negs, cfg.batch_size) if negs else np.zeros((0, txt.shape[1]), np.float32)
    t_txt = time.perf_counter() - t0
    if img.shape[1] != txt.shape[1]:
        raise UserError(f"{encoder.spec.raw} gives {img.shape[1]}-wide image embeddings but {txt.shape[1]}-wide "
                        "text embeddings: they are not in one joint space", "--model")
    n_txt = len(captions) + len(negs)
    timing = {"encode_images_s": round(t_img, 3), "encode_texts_s": round(t_txt, 3),
              "images_per_s": round(len(keys) / max(t_img, 1e-9), 1), "texts_per_s": round(n_txt / max(t_txt, 1e-9), 1)}
    return Embedded(keys, img, txt, np.asarray(owner, np.int64), neg, np.asarray(neg_owner, np.int64), neg_kind,
                    skipped, timing)


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
    }


def evaluate(e: Embedded, cfg: EvalRetrievalConfig):
    """(metrics, index description, timing, (image index, caption index)) for one model's embeddings."""
    from hierdctl.retrieval import build_index, hardneg_accuracy, recall_from_ranked, search

    k = max(cfg.ks)
    t0 = time.perf_counter()
    img_index, info = build_index(e.img, cfg.index, k, nprobe=cfg.nprobe)
    txt_index, _ = build_index(e.txt, cfg.index, k, nprobe=cfg.nprobe)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    img_for_text = search(img_index, e.txt, k)  # (Nt,k) images ranked per caption
    text_for_img = search(txt_index, e.img, k)  # (Ni,k) captions ranked per image
    t_search = time.perf_counter() - t0
    metrics = recall_from_ranked(img_for_text, text_for_img, e.text_to_image, cfg.ks)
    metrics |= hardneg_accuracy(e.img, e.txt, e.text_to_image, e.neg, e.neg_image, e.neg_kind)
    desc = {"kind": info.kind, "exact": info.exact, "device": info.device, "params": info.params,
            "metric": "inner product of L2-normalised embeddings"}
    return metrics, desc, {"index_build_s": round(t_build, 3), "search_s": round(t_search, 3)}, (img_index, txt_index)


def _save_index(dirpath: Path, runs: list[dict], overwrite: bool) -> None:
    import faiss

    from hierdctl.retrieval import index_to_cpu
    from hierdctl.atomic import publish_dir

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
    from hierdctl import dist as D
    from hierdctl.retrieval import check_ks
    from hierdctl.atomic import write_json_atomic
    from hierdctl.sources import open_source
    from hierdctl.specs import load_encoder

    cfg.validate()
    started = time.time()
    source = open_source(cfg.source, cfg.source_options)
    device = D.resolve_device(cfg.device, D.resolve())
    runs, ref = [], None  # ref: the first model's keys, text_to_image and counts (not its embeddings)
    for i, spec in enumerate(cfg.models):
        encoder = load_encoder(spec, device, "--model")
        e = embed_source(encoder, source, cfg, f"[{i}] {spec}")
        if ref is None:
            check_ks(cfg.ks, len(e.keys), len(e.text_to_image))
            ref = {"keys": e.keys, "text_to_image": e.text_to_image, "counts": _counts(e)}
        assert e.keys == ref["keys"] and np.array_equal(e.text_to_image, ref["text_to_image"]), "same data for every model"
        metrics, index, t_search, indexes = evaluate(e, cfg)
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
    if cfg.out:
        write_json_atomic(Path(cfg.out), report)
    if not cfg.quiet and report["counts"]["skipped_total"]:
        console.print(f"[dim]eval-retrieval:[/] skipped {report['counts']['skipped_total']} samples: "
                      + ", ".join(f"{k} {v}" for k, v in report["counts"]["skipped"].items()))
    return report
