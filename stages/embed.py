"""`hierdctl embed`: a collection's images and/or texts → embeddings in shards, with their keys.

clip-retrieval's inference step on hierdctl's sources: every sample of SOURCE (WebDataset
shards, tables, Karpathy JSON; paths or URLs) is read with the source grammar, its image
decoded by `images.decode_rgb` and put through the model's own eval transform (a thread
pool), its captions — optional: an image collection needs none — tokenized; embeddings are
L2-normalised and written per source unit as one shard of .npy arrays with the samples'
keys, paths and captions (hierdctl/embeddings_format.py). Corrupt images, unreadable shards,
missing files are skipped, counted by reason and listed by key in the shard's done-marker;
caption-less samples are counted; duplicate keys and images are counted in the manifest.

Resumable like cache-teacher: a shard's done-marker is written last, a rerun of the same
command re-verifies finished shards (size, sha256) and redoes only the rest; another model or
setting on the same --out is refused; --overwrite removes only what embed wrote. One writer
per folder (FolderLock).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter

import numpy as np
import torch

from hierdctl import atomic, distributed, embeddings_format, faults, settings
from hierdctl.configs import EmbedConfig
from hierdctl.console import console, progress
from hierdctl.embedding import check_joint_space, image_batches
from hierdctl.errors import UserError
from hierdctl.sources import Needs, Skip, open_source

NEEDS = {"both": Needs(image=True, caption=False), "image": Needs(image=True, caption=False),
         "text": Needs(image=False, caption=True)}


def _path(source, unit, s) -> str:
    """Where a sample's image is: its file (tables, Karpathy JSON), or SHARD#KEY.EXT (a shard's
    member; SHARD#KEY for a text-only sample)."""
    if source.kind != "webdataset":
        return s.meta["path"]
    return f"{unit.label}#{s.key}.{s.image_ext}" if s.image_ext else f"{unit.label}#{s.key}"


class _Model:
    """The encoder with its autocast: image and text embeddings as float32 numpy."""

    def __init__(self, encoder, precision: str):
        self.encoder = encoder
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.encoder.device.split(":")[0], dtype=self.dtype)

    def images(self, x) -> np.ndarray:
        with torch.inference_mode(), self._autocast():
            return self.encoder.encode_image(x.to(self.encoder.device))[0].float().cpu().numpy()

    def texts(self, texts: list[str], batch_size: int) -> np.ndarray:
        out = []
        with torch.inference_mode(), self._autocast():
            for a in range(0, len(texts), batch_size):
                tok = self.encoder.tokenize(texts[a : a + batch_size]).to(self.encoder.device)
                out.append(self.encoder.encode_text(tok)[0].float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.encoder.embed_dim), np.float32)


def _embed_unit(cfg: EmbedConfig, source, unit, model: _Model, advance) -> dict:
    """Read, embed and write one unit's shard; returns its done-marker."""
    want_image, want_text = cfg.modality in ("both", "image"), cfg.modality in ("both", "text")
    skipped: list[dict] = []
    store = embeddings_format.DTYPES[cfg.dtype]

    def samples():
        for item in source.iter_unit(unit):
            if isinstance(item, Skip):
                skipped.append({"key": item.key, "reason": item.reason, "detail": item.detail})
                advance(1)
            else:
                yield item

    def bad_image(s, e):
        skipped.append({"key": s.key, "reason": e.reason, "detail": e.detail})
        advance(1)

    kept, feats = [], []  # kept: the samples (their image bytes dropped once embedded)
    if want_image:
        for batch, x in image_batches(samples(), model.encoder, cfg.batch_size, cfg.workers, cfg.max_pixels,
                                      Counter(), on_skip=bad_image):
            feats.append(model.images(x))
            for s in batch:
                image_hash = embeddings_format.key_hash(s.image)
                kept.append((s.key, _path(source, unit, s), s.captions, s.caption_issue, image_hash))
            advance(len(batch))
    else:
        for s in samples():
            kept.append((s.key, _path(source, unit, s), s.captions, s.caption_issue, 0))
            advance(1)
    d = model.encoder.embed_dim
    image = np.concatenate(feats) if feats else np.zeros((0, d), np.float32)
    texts = [c for _, _, caps, _, _ in kept for c in caps] if want_text else []
    text_row = np.asarray([i for i, (_, _, caps, _, _) in enumerate(kept) for _ in caps] if want_text else [], np.int64)
    text = model.texts(texts, cfg.batch_size) if want_text else None
    if want_image and want_text and len(image) and len(texts):
        check_joint_space(cfg.model, image.shape[1], text.shape[1])
    hashes = np.asarray([[embeddings_format.key_hash(k), h] for k, _, _, _, h in kept], np.uint64).reshape(-1, 2)
    rows = {"keys": [k for k, *_ in kept], "paths": [p for _, p, *_ in kept], "captions": [c for _, _, c, _, _ in kept]}
    captionless = Counter(issue for _, _, _, issue, _ in kept if issue)
    return embeddings_format.write_shard(
        cfg.out, unit.index, unit.label, image=image.astype(store) if want_image else None,
        text=text.astype(store) if text is not None else None, text_row=text_row, hashes=hashes, rows=rows,
        skipped=skipped, captionless=captionless)


def _units_to_do(cfg: EmbedConfig, source, notes: list[str]) -> list:
    todo = []
    for u in source.units:
        marker, why = embeddings_format.verified_done(cfg.out, u.index)
        if marker is None:
            todo.append(u)
            if why:
                notes.append(f"{embeddings_format.shard_stem(u.index)} is redone: {why}")
            embeddings_format.remove_shard(cfg.out, u.index)  # with a killed run's leftovers
    return todo


def run(cfg: EmbedConfig) -> dict:
    """Embed `cfg.source` into `cfg.out`. Returns the manifest, with this run's figures."""
    cfg.validate()
    started = time.time()
    embeddings_format.check_out(cfg.out)  # before the lock file lands in someone's folder
    device = distributed.resolve_device(cfg.device, distributed.resolve())
    created = not cfg.out.exists()
    try:
        return _run(cfg, device, started)
    finally:
        if created and cfg.out.is_dir() and not any(cfg.out.iterdir()):
            cfg.out.rmdir()  # a run that failed before writing anything leaves no empty folder behind


def _run(cfg: EmbedConfig, device: str, started: float) -> dict:
    from hierdctl.specs import load_encoder

    with atomic.FolderLock(cfg.out, "--out") as lock:
        notes = [f"took over the lock of a run that is gone ({o})" for o in lock.took_over]
        source = open_source(cfg.source, cfg.source_options, needs=NEEDS[cfg.modality])
        encoder = load_encoder(cfg.model, device, "--model")
        precision = distributed.resolve_precision(cfg.precision, device)
        fingerprint = encoder.fingerprint()
        identity = settings.identity(cfg) | {"model_fingerprint": fingerprint, "precision": precision,
                                             "schema": embeddings_format.SCHEMA}
        notes += embeddings_format.prepare_out(cfg.out, identity, cfg.overwrite)
        todo = _units_to_do(cfg, source, notes)
        if not cfg.quiet:
            for n in notes:
                console.print(f"[dim]embed:[/] {n}", soft_wrap=True)
        model = _Model(encoder, precision)
        total = sum(source.unit_rows(u) for u in todo) if hasattr(source, "unit_rows") else None
        n_rows = n_texts = 0
        t_loop = time.perf_counter()
        with progress(cfg.quiet) as bar:
            task = bar.add_task("embed", total=total, unit="samples", info="")
            for i, u in enumerate(todo):
                marker = _embed_unit(cfg, source, u, model, lambda n: bar.advance(task, n))
                faults.point(f"embed:unit-done:{u.index}")
                n_rows, n_texts = n_rows + marker["rows"], n_texts + marker["texts"]
                bar.update(task, info=f"shards {i + 1}/{len(todo)}")
        loop_s = time.perf_counter() - t_loop
        info = encoder.describe() | {"fingerprint": fingerprint, "precision": precision}
        manifest = embeddings_format.write_manifest(cfg.out, identity, info, source, started)
    if manifest["counts"]["rows"] == 0:
        c = manifest["counts"]
        why = ", ".join(f"{k}: {v}" for k, v in c["skipped"].items()) or "it holds no samples"
        raise UserError(f"no usable sample in {cfg.source} (skipped: {why})", "SOURCE")
    manifest["this_run"] = {"rows": n_rows, "texts": n_texts, "shards": len(todo),
                            "shards_resumed": len(source.units) - len(todo), "seconds": round(time.time() - started, 3),
                            "embed_seconds": round(loop_s, 3),
                            "rows_per_s": round(n_rows / loop_s, 1) if loop_s > 0 and n_rows else 0.0,
                            "notes": notes, "out": str(cfg.out)}
    return manifest
