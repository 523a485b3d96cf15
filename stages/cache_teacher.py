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
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset

from hierdctl import atomic, cache_format, distributed, faults, settings
from hierdctl.configs import CacheTeacherConfig
from hierdctl.console import console, progress
from hierdctl.errors import UserError
from hierdctl.sources import open_source


# ----------------------------------------------------------------------------------
# Worker side: decode, cut views, tokenize, chunk
# ----------------------------------------------------------------------------------


class _UnitStream:
    """Iterable over the units of this rank; each DataLoader worker takes every W-th unit."""

    def __init__(self, source, units, cfg: CacheTeacherConfig, preps: list[dict], caption_transform=None,
                 duplicates: dict | None = None):
        """preps: each teacher's preprocessing {image_size, mean, std, eval_transform, tokenize}, teacher 0 first;
        caption_transform: the captioner's eval transform (--captioner), else None; duplicates: unit index ->
        {key: where it was first} for the keys an earlier unit has (skipped as duplicate_key)."""
        self.source, self.units, self.cfg, self.preps = source, units, cfg, preps
        self.caption_transform = caption_transform
        self.duplicates = duplicates or {}

    def __iter__(self):
        from torch.utils.data import get_worker_info

        from hierdctl.images import BadImage, apply_view, decode_rgb, sample_views

        wi = get_worker_info()
        units = self.units if wi is None else self.units[wi.id :: wi.num_workers]
        cfg, first = self.cfg, self.preps[0]
        chunker = make_chunker(cfg)
        for unit in units:
            pos = 0
            for rec in self.source.iter_unit(unit, self.duplicates.get(unit.index, {})):
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
                phrases, negs, phr_tok, neg_tok = text_parts(rec.captions, chunker, cfg, first["tokenize"])
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
                    } | ({"perturbations": negs} if cfg.perturbations > 0 else {})
                      | ({"captions_cut": rec.captions_cut} if rec.captions_cut else {}),
                    "image": rec.image if cfg.store_images else None,
                    "pixels": pixels[0],  # (V,3,S,S)
                    "cap_tok": first["tokenize"](rec.captions),  # (C,L) or (C,2,L)
                    "phr_tok": phr_tok,
                    "neg_tok": neg_tok,
                    # the other teachers of an ensemble: their own pixels and tokens (global embeddings only)
                    "ensemble": [(px, p["tokenize"](rec.captions)) for px, p in zip(pixels[1:], self.preps[1:])],
                    "cap_pixels": self.caption_transform(img) if self.caption_transform else None,
                }
                pos += 1
            yield {"type": "end", "unit": unit.index, "label": unit.label}


def text_parts(captions: list[str], chunker, cfg: CacheTeacherConfig, tokenize):
    """Each caption's noun phrases and compositional perturbations, and their tokens (flattened
    in caption order; None when there are none). Perturbations are built from every noun chunk
    (up to 8), phrases keep --max-phrases of them."""
    from hierdctl.perturb import perturb

    chunks = [chunker(c, max(cfg.max_phrases, 8)) for c in captions] if chunker else [[] for _ in captions]
    phrases = [ch[: cfg.max_phrases] for ch in chunks]
    negs = [perturb(c, ch, cfg.perturbations, cfg.seed) for c, ch in zip(captions, chunks)] \
        if cfg.perturbations > 0 else None
    flat = [p for ps in phrases for p in ps]
    flat_negs = [n for ns in negs for n in ns] if negs else []
    return (phrases, negs, tokenize(flat) if flat else None, tokenize(flat_negs) if flat_negs else None)


def make_chunker(cfg: CacheTeacherConfig):
    from hierdctl.phrases import Chunker

    return Chunker(cfg.chunker) if cfg.max_phrases > 0 or cfg.perturbations > 0 else None


def _identity_collate(x):
    return x


class _Iterable(IterableDataset):
    """A DataLoader dataset over any iterable (the unit stream itself stays free of torch's classes)."""

    def __init__(self, stream):
        self.stream = stream

    def __iter__(self):
        return iter(self.stream)


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
        if parts and enc.patch_grid is not None and cfg.clusters > enc.patch_grid[0] * enc.patch_grid[1]:
            gh, gw = enc.patch_grid
            raise UserError(f"{cfg.clusters} clusters but teacher {cfg.teacher} sees {gh * gw} patches per view "
                            f"({gh}x{gw}): use at most {gh * gw}", "--clusters")
        prec = distributed.resolve_precision(cfg.precision, device)
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
        self.precision = prec

    def _autocast(self):
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
    from hierdctl.specs import load_encoder

    source = open_source(cfg.source, cfg.source_options)
    encs = [load_encoder(spec, device, where="--teacher") for spec in (cfg.teacher, *cfg.ensemble)]
    # The first teacher gives clusters, phrases, perturbations and crops; the others global embeddings.
    teachers = [_Teacher(e, cfg, device, parts=k == 0) for k, e in enumerate(encs)]
    infos = [e.describe() | {"fingerprint": e.fingerprint(), "precision": t.precision} for e, t in zip(encs, teachers)]
    # What the cache holds depends on the teachers' weights and the precision they ran at, too.
    identity = settings.identity(cfg) | {"teacher_fingerprint": infos[0]["fingerprint"],
                                         "precision": teachers[0].precision}
    if cfg.ensemble:
        identity["ensemble_fingerprints"] = [i["fingerprint"] for i in infos[1:]]
    notes += cache_format.prepare_out(cfg.out, identity, cfg.overwrite, env)

    mine = [u for u in source.units if u.index % env.world_size == env.rank]
    todo = _units_to_do(cfg.out, mine, env, notes)
    if env.is_main and not cfg.quiet:
        for n in notes:
            console.print(f"[dim]cache-teacher:[/] {n}", soft_wrap=True)
    preps = [{"image_size": e.image_size, "mean": e.mean, "std": e.std, "eval_transform": e.eval_transform,
              "tokenize": e.tokenize} for e in encs]
    captioner = None
    if cfg.captioner:
        from hierdctl.captioner import Captioner

        captioner = Captioner(cfg.captioner, device, cfg.synthetic_captions, cfg.seed)
    batcher = _Batcher(cfg, teachers, preps, captioner)
    counts = _stream(cfg, env, source, todo, preps, captioner, batcher)
    distributed.barrier(env)
    if captioner is not None and captioner.failed:
        notes.append(f"--captioner: {captioner.failed} images got no synthetic caption (the captioner's sampling "
                     "met non-finite probabilities)")
    manifest = None
    if env.is_main or not env.torchrun:
        manifest = cache_format.write_manifest(cfg.out, identity, infos, captioner.describe() if captioner else None,
                                               source, started, cfg.log_skipped)
    manifest = distributed.broadcast_object(env, manifest)
    if manifest["complete"] and manifest["samples"] == 0:
        raise UserError(
            f"no valid sample in {cfg.source} (skipped: {manifest['skipped'] or 'nothing found'})", "SOURCE"
        )
    manifest["this_run"] = {"samples": counts["samples"], "skipped": counts["skipped"], "shards": len(todo),
                            "shards_resumed": len(mine) - len(todo), "seconds": round(time.time() - started, 3),
                            "setup_seconds": round(counts["loop_started"] - started, 3), "notes": notes,
                            "rank": env.rank, "world_size": env.world_size}
    return manifest


def _units_to_do(out: Path, mine: list, env, notes: list[str]) -> list:
    """This rank's units whose shard is not finished and intact. Finished shards are re-verified
    (size, count, sha256); damaged ones are redone; what killed writes left is removed."""
    todo = []
    for u in mine:
        stats, why = cache_format.verified_stats(out, u.index)
        if stats is None:
            todo.append(u)
            if why:
                notes.append(f"{cache_format.shard_name(u.index)} is redone: {why}")
                (out / cache_format.done_name(u.index)).unlink(missing_ok=True)
    for u in todo:  # leftovers of a killed run: this rank's shards and done-markers
        cache_format.remove_shard_leftovers(out, u.index)
    if env.world_size == 1:  # the folder lock is ours alone: every other leftover is a dead run's
        for p in out.iterdir():
            if cache_format.is_own_leftover(p.name) and p.is_file():
                p.unlink()
    return todo


def add_synthetic(it: dict, captioner, chunker, cfg: CacheTeacherConfig, preps: list[dict]) -> None:
    """Append the captioner's captions to a worker item: meta, tokens, phrases, perturbations and
    the ensemble's tokens, exactly as the worker prepares real captions (`text_parts`)."""
    meta = it["meta"]
    syn = [c for c in captioner.captions(it["cap_pixels"], meta["sha256"]) if c not in meta["captions"]]
    meta["real_captions"] = len(meta["captions"])
    meta["captions"] = meta["captions"] + syn
    if not syn:
        return
    tokenize = preps[0]["tokenize"]
    it["cap_tok"] = torch.cat([it["cap_tok"], tokenize(syn)])
    phrases, negs, phr_tok, neg_tok = text_parts(syn, chunker, cfg, tokenize)
    meta["phrases"] = meta["phrases"] + phrases
    if phr_tok is not None:
        it["phr_tok"] = phr_tok if it["phr_tok"] is None else torch.cat([it["phr_tok"], phr_tok])
    if cfg.perturbations > 0:
        meta["perturbations"] = meta["perturbations"] + negs
        if neg_tok is not None:
            it["neg_tok"] = neg_tok if it["neg_tok"] is None else torch.cat([it["neg_tok"], neg_tok])
    it["ensemble"] = [(px, torch.cat([t, p["tokenize"](syn)])) for (px, t), p in zip(it["ensemble"], preps[1:])]


class _Batcher:
    """Samples from the workers, batched across units for the teachers; each unit's records are
    kept until the unit ends (`finish`), when its shard is written."""

    def __init__(self, cfg: CacheTeacherConfig, teachers: list[_Teacher], preps: list[dict], captioner):
        self.cfg, self.teachers, self.preps, self.captioner = cfg, teachers, preps, captioner
        self.chunker = make_chunker(cfg) if captioner is not None else None
        self.pending: list[dict] = []
        self.records: dict[int, list[dict]] = collections.defaultdict(list)
        self.skips: dict[int, list[dict]] = collections.defaultdict(list)

    def add(self, item: dict) -> int:
        """Queue a sample; returns the samples run through the teachers (0 until a batch is full)."""
        self.pending.append(item)
        return self.flush() if len(self.pending) >= self.cfg.batch_size else 0

    def flush(self) -> int:
        """Run every queued sample through the teachers; returns how many."""
        pending, self.pending = self.pending, []
        if not pending:
            return 0
        if self.captioner is not None:
            for it in pending:
                add_synthetic(it, self.captioner, self.chunker, self.cfg, self.preps)
        extra = [t.global_embeddings(pending, k) for k, t in enumerate(self.teachers) if k > 0]
        for i, r in enumerate(self.teachers[0].process(pending)):
            for per_teacher in extra:
                r["arrays"].update(per_teacher[i])
            self.records[r["unit"]].append(r)
        return len(pending)

    def finish(self, unit: int, label: str) -> int:
        """A unit ended: everything of it goes through the teachers, then its shard is written."""
        n = self.flush()
        cache_format.write_shard(self.cfg.out, unit, label, self.records.pop(unit, []), self.skips.pop(unit, []),
                                 self.cfg.dtype)
        return n


def _stream(cfg: CacheTeacherConfig, env, source, todo: list, preps: list[dict], captioner, batcher: _Batcher) -> dict:
    """Decode in DataLoader workers, run the teachers in this process, write each unit's shard."""
    from torch.utils.data import DataLoader

    from hierdctl.loader import workers_for

    workers = min(workers_for(cfg.workers), len(todo))
    # Duplicate keys: the first copy in unit order is kept, whichever worker, rank or run reads it.
    duplicates = source.later_duplicates() if hasattr(source, "later_duplicates") and todo else {}
    loader = DataLoader(
        _Iterable(_UnitStream(source, todo, cfg, preps, captioner.eval_transform if captioner else None,
                              duplicates)),
        batch_size=None,
        num_workers=workers,
        collate_fn=_identity_collate,
        pin_memory=False,  # items are single samples; the batch is pinned once it is assembled (_Teacher.process)
        # Items are single samples: let the workers decode a whole batch ahead while the
        # teacher runs the current one (4 per worker left the teacher waiting for decodes).
        prefetch_factor=max(4, -(-cfg.batch_size // workers)) if workers else None,
    )
    n_samples = n_skipped = units_done = 0
    est_total = sum(source.unit_rows(u) for u in todo) if hasattr(source, "unit_rows") else None
    loop_started = time.time()  # setup (model load, fingerprint, source listing) ends here
    with progress(cfg.quiet or not env.is_main) as bar:
        task = bar.add_task("cache-teacher", total=est_total, unit="samples", info="")
        for item in loader:
            kind = item["type"]
            if kind == "sample":
                n = batcher.add(item)
            elif kind == "skip":
                batcher.skips[item["unit"]].append({k: item[k] for k in ("key", "reason", "detail")})
                n_skipped += 1
                n = 0
                if est_total is not None:
                    bar.advance(task, 1)
            else:  # a unit ended: everything of it must be through the teacher
                u = item["unit"]
                n = batcher.finish(u, item["label"])
                faults.point(f"cache-teacher:unit-done:{u}")
                units_done += 1
            if n:
                n_samples += n
                bar.advance(task, n)
            if kind == "end":
                if est_total is None and units_done:  # shards: extrapolate from finished ones
                    bar.update(task, total=int((n_samples + n_skipped) / units_done * len(todo)))
                bar.update(task, info=f"shards {units_done}/{len(todo)} skipped {n_skipped}")
    return {"samples": n_samples, "skipped": n_skipped, "loop_started": loop_started}
