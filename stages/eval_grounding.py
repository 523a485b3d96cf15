"""eval-grounding: does a model know where the objects are? Phrase grounding from patch tokens.

For every sample whose JSON carries `regions: [{"phrase": str, "bbox": [x0, y0, x1, y1]}]`
(original pixels; Scenes writes them, docs/eval.md has converters for Flickr30k Entities and
RefCOCO), each model's patch tokens in the joint space are compared with the phrase's text
embedding: pointing-game accuracy and box mass, with their chance levels and a
phrase-agnostic control (each image's mean phrase), over all regions, per phrase kind and
per object size. The geometry and the metrics are hierdctl/grounding.py's;
the reading is hierdctl/embedding.py's (the eval transform in a thread pool, skip-and-count).
A model without patch tokens is skipped with one line in the report, not a failure.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import torch

from hierdctl import distributed, grounding
from hierdctl.configs import EvalGroundingConfig
from hierdctl.console import progress
from hierdctl.embedding import encode_texts, image_batches, iter_samples
from hierdctl.errors import UserError
from hierdctl.reports import GROUNDING_SCHEMA as REPORT_SCHEMA
from hierdctl.reports import finish_report, retention, versions
from hierdctl.sources import open_source
from hierdctl.specs import load_encoder


# ----------------------------------------------------------------------------------
# One model over the source
# ----------------------------------------------------------------------------------


class _Phrases:
    """Text embeddings of phrases, each encoded once per model: (R,D) float32, L2-normalised."""

    def __init__(self, encoder, batch_size: int):
        self.encoder, self.batch_size, self.rows = encoder, batch_size, {}
        self.seconds = 0.0

    def embed(self, phrases: list[str]) -> np.ndarray:
        new = list(dict.fromkeys(p for p in phrases if p not in self.rows))
        if new:
            t0 = time.perf_counter()
            for p, e in zip(new, encode_texts(self.encoder, new, self.batch_size)):
                self.rows[p] = e
            self.seconds += time.perf_counter() - t0
        return np.stack([self.rows[p] for p in phrases])


def _with_regions(samples, skipped: Counter, bad: Counter):
    """The samples that carry at least one well-formed region; the others are counted."""
    for s in samples:
        regions, n_bad = grounding.read_regions(s.meta)
        bad["bad_region"] += n_bad
        if regions is None:
            skipped["no_regions"] += 1
        elif not regions:
            skipped["no_valid_regions"] += 1
        else:
            yield s


def ground_source(encoder, source, cfg: EvalGroundingConfig, label: str) -> dict:
    """Score every region of `source` with one model: per-region results, counts and timing."""
    plan, preprocessing = grounding.geometry_plan(encoder.eval_transform)
    grid = grounding.patch_grid(encoder)
    skipped, bad, region_skips = Counter(), Counter(), Counter()
    keys: list[str] = []
    scores = {name: [] for name in grounding.SCORE_NAMES}  # per batch, (R_b,) arrays
    kinds, sizes = [], []
    clipped = no_positive = n_read = 0
    phrases = _Phrases(encoder, cfg.batch_size)
    t_model = t_score = 0.0
    total = len(getattr(source, "rows", None) or []) or None
    t0 = time.perf_counter()
    with progress(cfg.quiet) as bar, torch.inference_mode():
        task = bar.add_task(f"ground {label}", total=total, unit="images", info="")
        batches = image_batches(_with_regions(iter_samples(source, skipped), skipped, bad), encoder, cfg.batch_size,
                                cfg.workers, cfg.max_pixels, skipped, with_sizes=True)
        for batch, x, whs in batches:
            t1 = time.perf_counter()
            tokens = grounding.patch_tokens(encoder, x.to(encoder.device))  # (B,G,D)
            t_model += time.perf_counter() - t1
            t1 = time.perf_counter()
            per_image = []  # per image of the batch: (the regions scored, its Cover, their rows in it)
            for s, (w, h) in zip(batch, whs):
                regions, _ = grounding.read_regions(s.meta)
                geometry = plan(w, h)
                assert (geometry.out_h, geometry.out_w) == tuple(x.shape[-2:]), (geometry, x.shape)
                c = grounding.cover(np.array([r.box for r in regions]), geometry, grid)
                n_read += len(regions)
                region_skips["box_outside_crop"] += int((~c.inside).sum())
                clipped += int((c.clipped & c.inside).sum())
                keep = np.flatnonzero(c.inside)
                per_image.append(([regions[k] for k in keep], c, keep))
                keys.append(s.key)
            R = max(len(r) for r, _, _ in per_image)
            if R:
                flat = [r.phrase for regs, _, _ in per_image for r in regs]
                emb = torch.from_numpy(phrases.embed(flat))  # (sum R_b, D)
                # (B,R+1,D): image b's phrases in rows 0..R_b-1, its control query (the normalised
                # mean of those phrases) in row R, zero rows pad
                queries = emb.new_zeros(len(per_image), R + 1, emb.shape[1])
                a = 0
                for b, (regs, _, _) in enumerate(per_image):
                    if regs:
                        queries[b, : len(regs)] = emb[a : a + len(regs)]
                        queries[b, R] = torch.nn.functional.normalize(emb[a : a + len(regs)].mean(0), dim=0)
                    a += len(regs)
                sims = grounding.score(tokens, queries.to(tokens.device)).cpu().numpy()  # (B,R+1,G)
                for b, (regs, c, keep) in enumerate(per_image):
                    if not regs:
                        continue
                    area, centre = c.area[keep], c.centre[keep]
                    r = grounding.region_scores(sims[b, : len(regs)], area, centre)
                    ctl = grounding.region_scores(np.repeat(sims[b, R][None], len(regs), 0), area, centre)
                    for name, v in (("pointing_acc", r["hit"]), ("box_mass", r["mass"]),
                                    ("pointing_acc_control", ctl["hit"]), ("box_mass_control", ctl["mass"]),
                                    ("pointing_acc_chance", centre.mean(axis=1)), ("box_mass_chance", c.share[keep])):
                        scores[name].append(v)
                    no_positive += int((~r["positive"]).sum())
                    kinds += [g.kind for g in regs]
                    sizes += [grounding.size_bucket(g) for g in regs]
            t_score += time.perf_counter() - t1
            bar.advance(task, len(batch))
    seconds = time.perf_counter() - t0
    if not keys:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "it holds no samples"
        hint = (" (Scenes folders written before generator 1.2 have none: rerun hierdctl scenes)"
                if skipped.get("no_regions") else "")
        raise UserError(f"no sample of {cfg.source} carries usable regions [{{\"phrase\", \"bbox\"}}] "
                        f"(skipped: {why}){hint}", "SOURCE")
    n_scored = len(kinds)
    metrics, by_group = grounding.summarise({k: np.concatenate(v) if v else np.zeros(0) for k, v in scores.items()},
                                            kinds, sizes)
    return {
        "keys": keys,
        "regions_read": n_read,
        "skipped": skipped,
        "bad": bad,
        "metrics": metrics,
        "regions": {"scored": n_scored, "skipped": dict(sorted((k, v) for k, v in region_skips.items() if v)),
                    "clipped_to_crop": clipped, "no_positive_similarity": no_positive,
                    "by_group": {k: v for k, v in by_group.items() if k != "all"}},
        "geometry": {"preprocessing": preprocessing, "input": [int(x.shape[-1]), int(x.shape[-2])],
                     "patch_grid": [grid.rows, grid.cols], "patch_px": [grid.ph, grid.pw]},
        "timing": {"seconds": round(seconds, 3), "images_per_s": round(len(keys) / max(seconds, 1e-9), 1),
                   "regions_per_s": round(n_scored / max(seconds, 1e-9), 1), "image_forward_s": round(t_model, 3),
                   "encode_phrases_s": round(phrases.seconds, 3), "score_s": round(t_score - phrases.seconds, 3),
                   "phrases_encoded": len(phrases.rows)},
    }


# ----------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------


def _counts(first: dict) -> dict:
    sk = first["skipped"]
    return {"images": len(first["keys"]), "regions": int(first["regions_read"]),
            "regions_malformed": int(first["bad"]["bad_region"]),
            "skipped": dict(sorted((k, v) for k, v in sk.items() if v)), "skipped_total": int(sum(sk.values()))}


def run(cfg: EvalGroundingConfig) -> dict:
    """Evaluate every model (the teacher first, when given); return (and with cfg.out, write)
    the report of docs/eval.md."""
    cfg.validate()
    started = time.time()
    source = open_source(cfg.source, cfg.source_options)
    device = distributed.resolve_device(cfg.device, distributed.resolve())
    entries = ([(cfg.teacher, "teacher", "--teacher")] if cfg.teacher else []) + [(m, "model", "--model")
                                                                                  for m in cfg.models]
    runs, notes, first = [], [], None
    for i, (spec, role, flag) in enumerate(entries):
        encoder = load_encoder(spec, device, flag)
        r = {"spec": spec, "role": role, "model": encoder.describe(), "metrics": {}, "retention": {}}
        why = grounding.unsupported(encoder)
        if why is None:
            try:
                g = ground_source(encoder, source, cfg, f"[{i}] {spec}")
            except grounding.Unsupported as e:
                why = str(e)
        if why is not None:
            notes.append(f"{spec}: skipped: {why}")  # the CLI prints the notes with the table
            runs.append(r | {"skipped": why})
            del encoder
            continue
        if first is None:
            first = g
        assert g["keys"] == first["keys"] and g["regions_read"] == first["regions_read"], "same data for every model"
        runs.append(r | {k: g[k] for k in ("metrics", "regions", "geometry", "timing")})
        del encoder, g
    if first is None:
        raise UserError("no model could be evaluated: " + "; ".join(notes), "--model")
    scored = [r for r in runs if "skipped" not in r]
    reference = scored[0]
    # chance levels and controls are no scores to retain
    keep = {k: v for k, v in reference["metrics"].items() if "_chance/" not in k and "_control/" not in k}
    for r in scored[1:]:
        r["retention"] = retention({k: v for k, v in r["metrics"].items() if k in keep}, keep)
    o = cfg.source_options
    report = {
        "schema": REPORT_SCHEMA,
        "task": "grounding",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": source.describe() | {"options": {"image_col": o.image_col, "caption_col": o.caption_col,
                                                   "image_root": o.image_root, "split": o.split}},
        "counts": _counts(first),
        "reference": reference["spec"],
        "device": device,
        "models": runs,
        "notes": notes,
        "seconds": round(time.time() - started, 3),
        "versions": versions(),
    }
    return finish_report(report, cfg.out, cfg.quiet, "eval-grounding")
