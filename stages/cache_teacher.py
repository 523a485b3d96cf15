"""Stage 1, `hierdctl cache-teacher`: run a frozen teacher once and store what it knows.

Per sample and view: the global image embedding, K clusters of the patch tokens
(assignment map + cluster embeddings in the joint space), and per caption the text
embedding plus its noun phrases and their embeddings. See hierdctl/cache_format.py for the
exact members and docs/cache-format.md for sizes.

Work is split into units (one input shard, or a chunk of table rows); unit u becomes
OUT/shard-u.tar, written under a temporary name, renamed, then marked done. A rerun
skips done units, so a killed run resumes; ranks take units u ≡ rank (mod world).

Data flow: DataLoader workers decode images, cut the views, tokenize captions and chunk
phrases (CPU work); the main process batches samples across units, runs the teacher
and k-means on the device, and writes each unit's shard once its last sample is back.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from hierdctl import __version__, atomic, cache_format, distributed, faults
from hierdctl.configs import CacheTeacherConfig
from hierdctl.console import console, progress
from hierdctl.errors import UserError
from hierdctl.sources import open_source


# ----------------------------------------------------------------------------------
# Worker side: decode, cut views, tokenize, chunk
# ----------------------------------------------------------------------------------


class _UnitStream:
    """Iterable over the units of this rank; each DataLoader worker takes every W-th unit."""

    def __init__(self, source, units, cfg: CacheTeacherConfig, preps: list[dict], caption_transform=None):
        """preps: each teacher's preprocessing {image_size, mean, std, eval_transform, tokenize}, teacher 0 first;
        caption_transform: the captioner's eval transform (--captioner), else None."""
        self.source, self.units, self.cfg, self.preps = source, units, cfg, preps
        self.caption_transform = caption_transform

    def __iter__(self):
        from torch.utils.data import get_worker_info

        from hierdctl.images import BadImage, apply_view, decode_rgb, sample_views
        from hierdctl.perturb import perturb
        from hierdctl.phrases import Chunker

        wi = get_worker_info()
        units = self.units if wi is None else self.units[wi.id :: wi.num_workers]
        cfg, first = self.cfg, self.preps[0]
        chunker = Chunker(cfg.chunker) if cfg.max_phrases > 0 or cfg.perturbations > 0 else None
        for unit in units:
            pos = 0
            for rec in self.source.iter_unit(unit):
                if not hasattr(rec, "image"):  # a Skip from the source
                    yield {"type": "skip", "unit": unit.index, "key": rec.key, "reason": rec.reason, "detail": rec.detail}
                    continue
                try:
                    img, converted = decode_rgb(rec.image, cfg.max_pixels)
                except BadImage as e:
                    yield {"type": "skip", "unit": unit.index, "key": rec.key, "reason": e.reason, "detail": e.detail}
                    continue
                digest = cache_format.sha256(rec.image)
                # Views depend only on (seed, image bytes): the same on any rank, worker or rerun.
                rng = np.random.default_rng([cfg.seed, int(digest[:16], 16)])
                views = sample_views(rng, img.width, img.height, cfg.views, cfg.crop_scale, cfg.crop_ratio, cfg.flip_p,
                                     cfg.randaugment if cfg.augment.endswith("randaugment") else None)
                # Every teacher sees the same views, each at its own resolution and normalisation.
                pixels = [torch.stack([apply_view(img, v, p["image_size"], p["mean"], p["std"], p["eval_transform"])
                                       for v in views]) for p in self.preps]
                # Perturbations are built from every noun chunk (up to 8), phrases keep max_phrases of them.
                chunks = [chunker(c, max(cfg.max_phrases, 8)) for c in rec.captions] if chunker else \
                    [[] for _ in rec.captions]
                phrases = [ch[: cfg.max_phrases] for ch in chunks]
                flat = [p for ps in phrases for p in ps]
                negs = [perturb(c, ch, cfg.perturbations, cfg.seed) for c, ch in zip(rec.captions, chunks)] \
                    if cfg.perturbations > 0 else None
                flat_negs = [n for ns in negs for n in ns] if negs else []
                yield {
                    "type": "sample",
                    "unit": unit.index,
                    "pos": pos,
                    "meta": {
                        "key": rec.key,
                        "sha256": digest,
                        "captions": rec.captions,
                        "phrases": phrases,
                        "size": [img.width, img.height],
                        "views": [v.to_json() for v in views],
                        "converted_from": converted,
                        "image_ext": rec.image_ext,
                    } | ({"perturbations": negs} if negs is not None else {}),
                    "image": rec.image if cfg.store_images else None,
                    "pixels": pixels[0],  # (V,3,S,S)
                    "cap_tok": first["tokenize"](rec.captions),  # (C,L) or (C,2,L)
                    "phr_tok": first["tokenize"](flat) if flat else None,
                    "neg_tok": first["tokenize"](flat_negs) if flat_negs else None,
                    # the other teachers of an ensemble: their own pixels and tokens (global embeddings only)
                    "ensemble": [(px, p["tokenize"](rec.captions)) for px, p in zip(pixels[1:], self.preps[1:])],
                    "cap_pixels": self.caption_transform(img) if self.caption_transform else None,
                }
                pos += 1
            yield {"type": "end", "unit": unit.index, "label": unit.label}


def _identity_collate(x):
    return x


# ----------------------------------------------------------------------------------
# Main process: teacher forward, clustering, shard writing
# ----------------------------------------------------------------------------------


class _Teacher:
    def __init__(self, enc, cfg: CacheTeacherConfig, device: str, parts: bool = True):
        """parts: this teacher provides clusters/tokens (the first one); the others only global embeddings."""
        self.enc, self.cfg, self.device = enc, cfg, device
        self.want_patches = parts and (cfg.clusters > 0 or cfg.store == "tokens")
        if self.want_patches and enc.patch_grid is None:
            raise UserError(
                f"teacher {cfg.teacher} exposes no patch tokens (not a plain ViT): use --clusters 0 and --store clusters",
                "--clusters",
            )
        prec = cfg.precision
        if prec == "auto":
            prec = "bf16" if device.startswith("cuda") else "fp32"
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
        self.precision = prec

    def _autocast(self):
        import contextlib
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.split(":")[0], dtype=self.autocast_dtype)

    def text(self, tokens):
        """(T,L) tokens -> (T,D) embeddings and optionally token features, in chunks."""
        embs, toks = [], []
        for i in range(0, tokens.shape[0], 512):
            with torch.no_grad(), self._autocast():
                e, t = self.enc.encode_text(tokens[i : i + 512].to(self.device), want_tokens=self.cfg.store == "tokens")
            embs.append(e.float())
            if t is not None:
                toks.append(t.float())
        return torch.cat(embs), (torch.cat(toks) if toks else None)

    def process(self, items: list[dict]) -> list[dict]:
        """Teacher features for a batch of worker items -> per-item arrays (float32 numpy)."""
        from hierdctl.cluster import pool_clusters, spherical_kmeans

        cfg, V, K = self.cfg, self.cfg.views, self.cfg.clusters
        pixels = torch.cat([it["pixels"] for it in items])  # (B·V,3,S,S)
        if self.device.startswith("cuda"):  # a pinned staging copy makes the host-to-device copy asynchronous
            pixels = pixels.pin_memory()
        pixels = pixels.to(self.device, non_blocking=True)
        with torch.no_grad(), self._autocast():
            img_emb, patches = self.enc.encode_image(pixels, want_patches=self.want_patches)
        img_emb = img_emb.float()
        out: dict[str, torch.Tensor] = {"img_emb": img_emb.view(len(items), V, -1)}
        if K > 0:
            patches = patches.float()
            assign, counts = spherical_kmeans(patches, K, self.enc.patch_grid, cfg.cluster_iters, cfg.cluster_pos_weight)
            gh, gw = self.enc.patch_grid
            out["clu_emb"] = pool_clusters(patches, assign, K).view(len(items), V, K, -1)
            out["clu_assign"] = assign.view(len(items), V, gh, gw)
            out["clu_count"] = counts.view(len(items), V, K)
            if cfg.cluster_crops:
                out["clu_crop_emb"] = self._crop_embeddings(pixels, assign, counts).view(len(items), V, K, -1)
        if cfg.store == "tokens":
            out["img_tok"] = patches.float().view(len(items), V, patches.shape[1], -1)
        out = {k: v.cpu().numpy() for k, v in out.items()}

        cap_tok = torch.cat([it["cap_tok"] for it in items])
        txt_emb, txt_tok = self.text(cap_tok)
        txt_emb, txt_tok = txt_emb.cpu().numpy(), (txt_tok.cpu().numpy() if txt_tok is not None else None)
        phr = [it["phr_tok"] for it in items if it["phr_tok"] is not None]
        phr_emb = self.text(torch.cat(phr))[0].cpu().numpy() if phr else None
        neg = [it["neg_tok"] for it in items if it["neg_tok"] is not None]
        neg_emb = self.text(torch.cat(neg))[0].cpu().numpy() if neg else None

        results, c0, p0, q0 = [], 0, 0, 0
        D_ = txt_emb.shape[1]
        for i, it in enumerate(items):
            meta = it["meta"]
            C = len(meta["captions"])
            arrays = {k: v[i] for k, v in out.items()}
            arrays["txt_emb"] = txt_emb[c0 : c0 + C]
            if txt_tok is not None:
                arrays["txt_tok"] = txt_tok[c0 : c0 + C]
            c0 += C
            if cfg.max_phrases > 0:
                arrays["phr_emb"], arrays["phr_mask"], p0 = _per_caption(meta["phrases"], phr_emb, p0, cfg.max_phrases, D_)
            if cfg.perturbations > 0:
                arrays["neg_emb"], arrays["neg_mask"], q0 = _per_caption(meta["perturbations"], neg_emb, q0,
                                                                         cfg.perturbations, D_)
            results.append({"unit": it["unit"], "pos": it["pos"], "meta": meta, "image": it["image"], "arrays": arrays})
        assert c0 == txt_emb.shape[0], (c0, txt_emb.shape)
        assert neg_emb is None or q0 == neg_emb.shape[0], (q0, neg_emb.shape)
        return results

    def global_embeddings(self, items: list[dict], k: int) -> list[dict]:
        """Teacher k (k ≥ 1) of an ensemble: per item its img_emb_t{k} (V,D_k) and txt_emb_t{k} (C,D_k)."""
        V = self.cfg.views
        pixels = torch.cat([it["ensemble"][k - 1][0] for it in items]).to(self.device, non_blocking=True)
        with torch.no_grad(), self._autocast():
            img = self.enc.encode_image(pixels)[0].float().view(len(items), V, -1).cpu().numpy()
        txt = self.text(torch.cat([it["ensemble"][k - 1][1] for it in items]))[0].cpu().numpy()
        out, c0 = [], 0
        for i, it in enumerate(items):
            C = len(it["meta"]["captions"])
            out.append({f"img_emb_t{k}": img[i], f"txt_emb_t{k}": txt[c0 : c0 + C]})
            c0 += C
        assert c0 == txt.shape[0], (c0, txt.shape)
        return out

    def _crop_embeddings(self, pixels, assign, counts):
        """CLIPSelf-style part embeddings: the teacher's embedding of each cluster's bounding-box
        crop of the view it saw, resized to the teacher's input size.

        pixels (B·V,3,S,S) normalised, assign (B·V,G), counts (B·V,K) -> (B·V,K,D); empty clusters 0."""
        import torch.nn.functional as F

        gh, gw = self.enc.patch_grid
        n, _, S, _ = pixels.shape
        K = counts.shape[1]
        ph, pw = S / gh, S / gw  # pixels per patch
        grid = assign.view(n, gh, gw)
        crops, where = [], []
        for i in range(n):
            for k in range(K):
                if counts[i, k] == 0:
                    continue
                rows, cols = torch.nonzero(grid[i] == k, as_tuple=True)
                y0, y1 = int(rows.min() * ph), int((rows.max() + 1) * ph)
                x0, x1 = int(cols.min() * pw), int((cols.max() + 1) * pw)
                crop = pixels[i : i + 1, :, y0:y1, x0:x1]
                crops.append(F.interpolate(crop, size=(S, S), mode="bilinear", align_corners=False, antialias=True))
                where.append((i, k))
        out = torch.zeros(n, K, self.enc.embed_dim, device=pixels.device)
        for a in range(0, len(crops), 256):
            with torch.no_grad(), self._autocast():
                emb, _ = self.enc.encode_image(torch.cat(crops[a : a + 256]))
            for (i, k), e in zip(where[a : a + 256], emb.float()):
                out[i, k] = e
        return out


def _per_caption(parts: list[list[str]], emb, start: int, width: int, dim: int):
    """Spread the embeddings of every caption's parts (phrases, perturbations), flattened in caption
    order from row `start` of emb (T,D), into (C,width,D) with a (C,width) uint8 mask; returns them
    and the next row. A batch whose captions have no part at all has emb None."""
    out = np.zeros((len(parts), width, dim), np.float32)
    mask = np.zeros((len(parts), width), np.uint8)
    for c, ps in enumerate(parts):
        n = len(ps)
        if n:
            out[c, :n] = emb[start : start + n]
            mask[c, :n] = 1
            start += n
    return out, mask, start


def _prepare_out(cfg: CacheTeacherConfig, identity: dict, env: distributed.DistEnv) -> list[str]:
    """Create OUT, or check that it holds a cache of this very configuration. Returns notes.

    A non-empty OUT must be a hierdctl cache (cache-config.json with the format name):
    another tool's files are never written over, and --overwrite removes only what
    cache-teacher wrote (cache_format.clear)."""
    out, notes = cfg.out, []
    cpath = out / cache_format.CONFIG_NAME
    config = {"format": cache_format.FORMAT_NAME, "schema_version": cache_format.SCHEMA_VERSION, "config": identity}
    if env.is_main:
        others = [p for p in out.iterdir() if not cache_format.is_own_start(p.name)] if out.is_dir() else []
        if others and not cache_format.is_cache_dir(out):
            raise UserError(f"{out} is not empty and is not a hierdctl teacher cache (no {cache_format.CONFIG_NAME} "
                            f"with format {cache_format.FORMAT_NAME!r}); pick a new or empty folder", "--out")
        if cfg.overwrite and others:
            removed = cache_format.clear(out)
            notes.append(f"--overwrite: removed the earlier cache's {len(removed)} files")
        out.mkdir(parents=True, exist_ok=True)
        if not cpath.exists():
            atomic.write_json_atomic(cpath, config)
    distributed.barrier(env)
    if not cpath.exists():  # a job-array rank that started before rank 0
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_json_atomic(cpath, config)
    have = json.loads(cpath.read_text())
    if have.get("schema_version") != cache_format.SCHEMA_VERSION:
        raise UserError(f"{out} holds a cache of schema version {have.get('schema_version')}; use --overwrite", "--out")
    old = have.get("config", {})
    diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
    if diff:
        detail = "; ".join(f"{k}: cache has {old.get(k)!r}, this run {identity.get(k)!r}" for k in diff[:4])
        raise UserError(f"{out} holds a cache made with another configuration ({detail}). "
                        "Use another --out, or --overwrite to start over", "--out")
    return notes


def _finish_unit(cfg, index: int, label: str, records: list[dict], skips: list[dict]) -> dict:
    members = []
    for r in sorted(records, key=lambda r: r["pos"]):
        key = cache_format.sample_key(index, r["pos"])
        members += cache_format.encode_sample(key, r["meta"], r["image"], r["arrays"], cfg.dtype)
    written = atomic.write_tar_atomic(cfg.out / cache_format.shard_name(index), members)
    stats = {
        "index": index,
        "name": cache_format.shard_name(index),
        "label": label,
        "samples": len(records),
        "captions": sum(len(r["meta"]["captions"]) for r in records),
        "phrases": sum(len(p) for r in records for p in r["meta"]["phrases"]),
        "skipped": dict(collections.Counter(s["reason"] for s in skips)),
        "skipped_samples": skips,
        "converted": dict(collections.Counter(r["meta"]["converted_from"] for r in records if r["meta"]["converted_from"])),
        "bytes": written.bytes,
        "sha256": written.sha256,
    }
    atomic.write_json_atomic(cfg.out / cache_format.done_name(index), stats)  # the done-marker, last
    return stats


def _done_stats(out: Path, index: int) -> dict | None:
    """A unit's stats if it finished (done-marker present and its shard of the recorded size)."""
    p = out / cache_format.done_name(index)
    if not p.exists():
        return None
    try:
        st = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    shard = out / cache_format.shard_name(index)
    return st if shard.exists() and shard.stat().st_size == st.get("bytes") else None


def _verified_stats(out: Path, index: int) -> tuple[dict | None, str | None]:
    """(stats, None) for a finished unit whose shard still has the bytes written (size, sample
    count and sha256 re-checked); (None, why) for one to redo; (None, None) if never finished."""
    p = out / cache_format.done_name(index)
    if not p.exists():
        return None, None
    st = _done_stats(out, index)
    if st is None:
        return None, "its shard is missing or has another size than recorded"
    shard = out / cache_format.shard_name(index)
    if cache_format.verify_digests(out, [st]):
        return None, "its bytes changed since they were written (sha256)"
    try:
        n = len(cache_format.index_shard(shard))
    except cache_format.CorruptShard as e:
        return None, str(e)
    if n != st["samples"]:
        return None, f"it holds {n} samples, {st['samples']} were written"
    return st, None


def _write_manifest(cfg, identity, teacher_info, source, started: float, infos: list[dict],
                    captioner: dict | None = None) -> dict:
    stats = [_done_stats(cfg.out, u.index) for u in source.units]
    done = [s for s in stats if s is not None]
    skipped: collections.Counter = collections.Counter()
    converted: collections.Counter = collections.Counter()
    for s in done:
        skipped.update(s["skipped"])
        converted.update(s["converted"])
    samples = sum(s["samples"] for s in done)
    total_bytes = sum(s["bytes"] for s in done)
    manifest = {
        "format": cache_format.FORMAT_NAME,
        "schema_version": cache_format.SCHEMA_VERSION,
        "created_by": f"hierdctl {__version__}",
        "config": identity,
        "teacher": teacher_info,  # the first teacher (clusters, phrases and the unsuffixed embeddings are its)
        "teachers": infos,  # every teacher of the ensemble, the first first
        "captioner": captioner,  # --captioner: its spec, sampling and fingerprint (None without one)
        "source": source.describe(),
        "samples": samples,
        "captions": sum(s["captions"] for s in done),
        "phrases": sum(s["phrases"] for s in done),
        "skipped": dict(sorted(skipped.items())),
        "skipped_total": sum(skipped.values()),
        "converted": dict(sorted(converted.items())),
        "bytes": total_bytes,
        "bytes_per_sample": (total_bytes / samples) if samples else None,
        "shards_total": len(source.units),
        "shards_done": len(done),
        "complete": len(done) == len(source.units),
        "shards": [{k: s.get(k) for k in ("name", "label", "samples", "captions", "bytes", "sha256", "skipped")}
                   for s in done],
        "wall_seconds_last_run": round(time.time() - started, 3),
    }
    atomic.write_json_atomic(cfg.out / cache_format.MANIFEST_NAME, manifest)
    if cfg.log_skipped:
        with open(cfg.log_skipped, "w") as f:
            for s in done:
                for sk in s["skipped_samples"]:
                    f.write(json.dumps({"shard": s["name"], **sk}) + "\n")
    return manifest


def run(cfg: CacheTeacherConfig) -> dict:
    """Cache the teacher's features for `cfg.source` into `cfg.out`. Returns the manifest."""
    cfg.validate()
    started = time.time()
    env = distributed.resolve(cfg.rank, cfg.world_size)
    device = distributed.resolve_device(cfg.device, env)
    distributed.init_process_group(env, device)
    # One writer per cache folder: a plain run holds its lock alone; job-array ranks share it
    # and each holds its own rank's lock; under torchrun, rank 0 holds it for the job.
    if env.torchrun:
        lock = atomic.FolderLock(cfg.out, "--out") if env.is_main else contextlib.nullcontext()
    else:
        part = f"rank-{env.rank}-of-{env.world_size}" if env.world_size > 1 else None
        lock = atomic.FolderLock(cfg.out, "--out", part=part)
    try:
        if cfg.out.is_dir() and any(not cache_format.is_own_start(p.name) for p in cfg.out.iterdir()) \
                and not cache_format.is_cache_dir(cfg.out):  # before the lock file lands in someone's folder
            raise UserError(f"{cfg.out} is not empty and is not a hierdctl teacher cache (no "
                            f"{cache_format.CONFIG_NAME}); pick a new or empty folder", "--out")
        with lock:
            return _run(cfg, env, device, started, [f"took over the lock of a run that is gone ({o})"
                                                    for o in getattr(lock, "took_over", [])])
    finally:
        distributed.destroy(env)


def _run(cfg: CacheTeacherConfig, env, device: str, started: float, notes: list[str]) -> dict:
    from torch.utils.data import DataLoader, IterableDataset

    from hierdctl.specs import load_encoder

    source = open_source(cfg.source, cfg.source_options)
    encs = [load_encoder(spec, device, where="--teacher") for spec in (cfg.teacher, *cfg.ensemble)]
    # The first teacher gives clusters, phrases, perturbations and crops; the others global embeddings.
    teachers = [_Teacher(e, cfg, device, parts=k == 0) for k, e in enumerate(encs)]
    teacher = teachers[0]
    infos = [e.describe() | {"fingerprint": e.fingerprint(), "precision": t.precision} for e, t in zip(encs, teachers)]
    teacher_info = infos[0]
    identity = cfg.identity() | {"teacher_fingerprint": teacher_info["fingerprint"], "precision": teacher.precision}
    if cfg.ensemble:
        identity["ensemble_fingerprints"] = [i["fingerprint"] for i in infos[1:]]
    notes += _prepare_out(cfg, identity, env)

    mine = [u for u in source.units if u.index % env.world_size == env.rank]
    todo = []
    for u in mine:  # finished shards are re-verified (size, count, sha256); damaged ones are redone
        stats, why = _verified_stats(cfg.out, u.index)
        if stats is None:
            todo.append(u)
            if why:
                notes.append(f"{cache_format.shard_name(u.index)} is redone: {why}")
                (cfg.out / cache_format.done_name(u.index)).unlink(missing_ok=True)
    for u in todo:  # leftovers of a killed run: this rank's shards and done-markers
        for name in (cache_format.shard_name(u.index), cache_format.done_name(u.index)):
            for p in cfg.out.glob(name + ".tmp*"):
                p.unlink()
    if env.world_size == 1:  # the folder lock is ours alone: every other leftover is a dead run's
        for p in cfg.out.iterdir():
            if cache_format.is_own_leftover(p.name) and p.is_file():
                p.unlink()
    if env.is_main and not cfg.quiet:
        for n in notes:
            console.print(f"[dim]cache-teacher:[/] {n}", soft_wrap=True)
    workers = cfg.workers if cfg.workers >= 0 else min(8, max(0, (os.cpu_count() or 1) - 1))
    workers = min(workers, len(todo))
    preps = [{"image_size": e.image_size, "mean": e.mean, "std": e.std, "eval_transform": e.eval_transform,
              "tokenize": e.tokenize} for e in encs]
    captioner = None
    if cfg.captioner:
        from hierdctl.captioner import Captioner
        from hierdctl.perturb import perturb
        from hierdctl.phrases import Chunker

        captioner = Captioner(cfg.captioner, device, cfg.synthetic_captions, cfg.seed)
        chunker = Chunker(cfg.chunker) if cfg.max_phrases > 0 or cfg.perturbations > 0 else None

        def add_synthetic(it: dict) -> None:
            """Append the captioner's captions to an item: meta, tokens, phrases, perturbations, ensemble tokens."""
            meta = it["meta"]
            syn = [c for c in captioner.captions(it["cap_pixels"], meta["sha256"]) if c not in meta["captions"]]
            meta["real_captions"] = len(meta["captions"])
            meta["captions"] = meta["captions"] + syn
            if not syn:
                return
            it["cap_tok"] = torch.cat([it["cap_tok"], preps[0]["tokenize"](syn)])
            chunks = [chunker(c, max(cfg.max_phrases, 8)) for c in syn] if chunker else [[] for _ in syn]
            phrases = [ch[: cfg.max_phrases] for ch in chunks]
            meta["phrases"] = meta["phrases"] + phrases
            flat = [p for ps in phrases for p in ps]
            if flat:
                tok = preps[0]["tokenize"](flat)
                it["phr_tok"] = tok if it["phr_tok"] is None else torch.cat([it["phr_tok"], tok])
            if cfg.perturbations > 0:
                negs = [perturb(c, ch, cfg.perturbations, cfg.seed) for c, ch in zip(syn, chunks)]
                meta["perturbations"] = meta["perturbations"] + negs
                flat_negs = [n for ns in negs for n in ns]
                if flat_negs:
                    tok = preps[0]["tokenize"](flat_negs)
                    it["neg_tok"] = tok if it["neg_tok"] is None else torch.cat([it["neg_tok"], tok])
            it["ensemble"] = [(px, torch.cat([t, p["tokenize"](syn)])) for (px, t), p in zip(it["ensemble"], preps[1:])]

    class _DS(IterableDataset):
        def __init__(self, stream):
            self.stream = stream

        def __iter__(self):
            return iter(self.stream)

    loader = DataLoader(
        _DS(_UnitStream(source, todo, cfg, preps, captioner.eval_transform if captioner else None)),
        batch_size=None,
        num_workers=workers,
        collate_fn=_identity_collate,
        pin_memory=False,  # items are single samples; the batch is pinned once it is assembled (_Teacher.process)
        # Items are single samples: let the workers decode a whole batch ahead while the
        # teacher runs the current one (4 per worker left the teacher waiting for decodes).
        prefetch_factor=max(4, -(-cfg.batch_size // workers)) if workers else None,
    )
    pending: list[dict] = []
    records: dict[int, list[dict]] = collections.defaultdict(list)
    skips: dict[int, list[dict]] = collections.defaultdict(list)
    n_samples = n_skipped = units_done = 0
    est_total = sum(source.unit_rows(u) for u in todo) if hasattr(source, "unit_rows") else None

    def flush():
        nonlocal pending
        if pending:
            if captioner is not None:
                for it in pending:
                    add_synthetic(it)
            extra = [t.global_embeddings(pending, k) for k, t in enumerate(teachers) if k > 0]
            for i, r in enumerate(teacher.process(pending)):
                for per_teacher in extra:
                    r["arrays"].update(per_teacher[i])
                records[r["unit"]].append(r)
            pending = []

    loop_started = time.time()  # setup (model load, fingerprint, source listing) ends here
    with progress(cfg.quiet or not env.is_main) as bar:
        task = bar.add_task("cache-teacher", total=est_total, unit="samples", info="")
        for item in loader:
            kind = item["type"]
            if kind == "sample":
                pending.append(item)
                if len(pending) >= cfg.batch_size:
                    n = len(pending)
                    flush()
                    n_samples += n
                    bar.advance(task, n)
            elif kind == "skip":
                skips[item["unit"]].append({k: item[k] for k in ("key", "reason", "detail")})
                n_skipped += 1
                if est_total is not None:
                    bar.advance(task, 1)
            else:  # a unit ended: everything of it must be through the teacher
                n = len(pending)
                flush()
                n_samples += n
                bar.advance(task, n)
                u = item["unit"]
                _finish_unit(cfg, u, item["label"], records.pop(u, []), skips.pop(u, []))
                faults.point(f"cache-teacher:unit-done:{u}")
                units_done += 1
                if est_total is None and units_done:  # shards: extrapolate from finished ones
                    bar.update(task, total=int((n_samples + n_skipped) / units_done * len(todo)))
                bar.update(task, info=f"shards {units_done}/{len(todo)} skipped {n_skipped}")
    distributed.barrier(env)
    if captioner is not None and captioner.failed:
        notes.append(f"--captioner: {captioner.failed} images got no synthetic caption (the captioner's sampling "
                     "met non-finite probabilities)")
    manifest = None
    if env.is_main or not env.torchrun:
        manifest = _write_manifest(cfg, identity, teacher_info, source, started, infos,
                                   captioner.describe() if captioner else None)
    manifest = distributed.broadcast_object(env, manifest)
    if manifest["complete"] and manifest["samples"] == 0:
        raise UserError(
            f"no valid sample in {cfg.source} (skipped: {manifest['skipped'] or 'nothing found'})", "SOURCE"
        )
    manifest["this_run"] = {"samples": n_samples, "skipped": n_skipped, "shards": len(todo),
                            "shards_resumed": len(mine) - len(todo), "seconds": round(time.time() - started, 3),
                            "setup_seconds": round(loop_started - started, 3), "notes": notes,
                            "rank": env.rank, "world_size": env.world_size}
    return manifest
