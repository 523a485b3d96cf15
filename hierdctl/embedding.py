"""Embedding a data source with any model spec: the shared core of eval-retrieval and eval-zeroshot
(what their reports record and how they are written: hierdctl/reports.py).

Every model (teacher, exported student, open_clip tag: any `specs.load_encoder` result)
reads a source through the same code: images decoded by `images.decode_rgb` and put
through the model's own eval transform in a thread pool, embeddings L2-normalised;
undecodable images and source skips are counted by reason, never fatal.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
import torch

from hierdctl.console import progress
from hierdctl.errors import UserError
from hierdctl.images import BadImage, decode_rgb
from hierdctl.sources import Skip, iter_source


def iter_samples(source, skipped: Counter) -> Iterator:
    """Every Sample of every unit, in order; Skips are counted by reason (a key read before is
    a `duplicate_key` skip: sources.iter_source keeps the first copy)."""
    for item in iter_source(source):
        if isinstance(item, Skip):
            skipped[item.reason] += 1
        else:
            yield item


def image_batches(samples, encoder, batch_size: int, workers: int, max_pixels: int, skipped: Counter,
                  with_sizes: bool = False, on_skip: Callable | None = None):
    """Decode + eval-transform in a thread pool; yield (samples, images (B,3,S,S)) batches, or with
    `with_sizes` (samples, images, each image's original (w, h)). Undecodable images are skipped
    and counted, never fatal; on_skip(sample, BadImage), when given, hears of each one (hierdctl
    embed lists them by key)."""

    def prep(s):
        try:
            img, _ = decode_rgb(s.image, max_pixels)
        except BadImage as e:
            return s, e, None
        return s, encoder.eval_transform(img), img.size

    pool = ThreadPoolExecutor(workers) if workers > 0 else None
    try:
        it = iter(samples)
        while True:
            chunk = list(itertools.islice(it, batch_size))
            if not chunk:
                return
            done = list(pool.map(prep, chunk)) if pool else [prep(s) for s in chunk]
            good = [d for d in done if not isinstance(d[1], BadImage)]
            for s, bad, _ in (d for d in done if isinstance(d[1], BadImage)):
                skipped[bad.reason] += 1
                if on_skip is not None:
                    on_skip(s, bad)
            if good:
                batch = [s for s, _, _ in good], torch.stack([x for _, x, _ in good])
                yield (*batch, [wh for _, _, wh in good]) if with_sizes else batch
    finally:
        if pool:
            pool.shutdown()


def encode_images(encoder, source, *, batch_size: int, workers: int, max_pixels: int, label: str, quiet: bool,
                  keep: Callable, what: str, where_source: str) -> tuple[list, np.ndarray, Counter, float]:
    """Embed every image of `source`: (keep(sample) for each embedded sample, (N,D) float32
    L2-normalised image embeddings, skips by reason, seconds). Only what `keep` returns is
    held in memory, never the image bytes. No usable sample at all is a UserError on SOURCE."""
    skipped: Counter = Counter()
    kept, feats = [], []
    total = len(getattr(source, "rows", None) or getattr(source, "files", None) or []) or None
    t0 = time.perf_counter()
    with progress(quiet) as bar, torch.inference_mode():
        task = bar.add_task(f"encode {label}", total=total, unit="images", info="")
        for batch, x in image_batches(iter_samples(source, skipped), encoder, batch_size, workers, max_pixels, skipped):
            feats.append(encoder.encode_image(x.to(encoder.device))[0].float().cpu())
            kept += [keep(s) for s in batch]
            bar.advance(task, len(batch))
    seconds = time.perf_counter() - t0
    if not kept:
        why = ", ".join(f"{k}: {v}" for k, v in skipped.items()) or "it holds no samples"
        raise UserError(f"no usable {what} in {where_source} (skipped: {why})", "SOURCE")
    return kept, torch.cat(feats).numpy(), skipped, seconds


def encode_texts(encoder, texts: list[str], batch_size: int) -> np.ndarray:
    """(N,D) float32, L2-normalised."""
    out = []
    with torch.inference_mode():
        for a in range(0, len(texts), batch_size):
            tok = encoder.tokenize(texts[a : a + batch_size]).to(encoder.device)
            out.append(encoder.encode_text(tok)[0].float().cpu())
    if not out:
        return np.zeros((0, encoder.embed_dim), np.float32)
    return torch.cat(out).numpy()


def check_joint_space(spec: str, image_dim: int, text_dim: int) -> None:
    if image_dim != text_dim:
        raise UserError(f"{spec} gives {image_dim}-wide image embeddings but {text_dim}-wide text embeddings: "
                        "they are not in one joint space", "--model")
