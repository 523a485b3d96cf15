"""eval-grounding's throughput against eval-retrieval's image encoding, on the same images.

Both contenders read the same Scenes test split with the same model, batch size and decoding
threads, in the same process; rounds alternate which goes first (background load hits both
alike). "retrieval" is `embedding.encode_images`, the image pass eval-retrieval runs per
model (decode, eval transform, forward, normalise); "grounding" is
`stages.eval_grounding.ground_source`, all of eval-grounding's work per model (decode, eval
transform, forward with patch tokens, every phrase encoded once, one batched matmul per
batch, the metrics). The ratio is grounding images/s over retrieval images/s (target ≥ 0.8),
by wall clock and by the process's CPU time (all its threads: decoding included), which other
jobs on a shared machine disturb less.

    python bench/bench_grounding.py [--arch ViT-B-16] [--n 512] [--image-size 224] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HIERDCTL_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-T-16", help="open_clip architecture, random init (seed 0)")
    ap.add_argument("--n", type=int, default=256, help="Scenes test images")
    ap.add_argument("--image-size", type=int, default=128, help="Scenes image side in pixels")
    ap.add_argument("--flavour", default="shapes")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="decoding threads (both contenders)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    import torch

    from hierdctl import distributed
    from hierdctl.embedding import encode_images
    from hierdctl.configs import EvalGroundingConfig, ScenesConfig
    from hierdctl.sources import open_source
    from hierdctl.specs import load_encoder
    from hierdctl.stages.eval_grounding import ground_source
    from hierdctl.stages.scenes import run as scenes_run

    if args.threads:
        torch.set_num_threads(args.threads)
    device = distributed.resolve_device(args.device, distributed.resolve())
    with tempfile.TemporaryDirectory() as tmp:
        scenes_run(ScenesConfig(out=Path(tmp) / "scenes", flavour=args.flavour, n_train=0, n_test=args.n,
                                image_size=args.image_size, shard_size=max(1, args.n // 4)))
        spec = str(Path(tmp) / "scenes" / "test")
        source = open_source(spec)
        encoder = load_encoder(f"open_clip:{args.arch}", device)
        cfg = EvalGroundingConfig(source=spec, models=[f"open_clip:{args.arch}"], batch_size=args.batch_size,
                                  device=device, workers=args.workers, quiet=True).validate()

        def timed(fn):
            t0, c0 = time.perf_counter(), time.process_time()
            n, extra = fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return n / (time.perf_counter() - t0), n / (time.process_time() - c0), extra

        def retrieval() -> tuple[int, dict]:
            kept, _, _, _ = encode_images(encoder, source, batch_size=args.batch_size, workers=args.workers,
                                          max_pixels=cfg.max_pixels, label="retrieval", quiet=True,
                                          keep=lambda s: s.key, what="image", where_source=spec)
            return len(kept), {}

        def grounding() -> tuple[int, dict]:
            g = ground_source(encoder, source, cfg, "grounding")
            return len(g["keys"]), g

        timed(retrieval), timed(grounding)  # warm-up: first-call allocations, page cache
        rates = {"retrieval": [], "grounding": []}  # (wall images/s, CPU images/s) per round
        last = {}
        for k in range(args.rounds):
            order = (retrieval, grounding) if k % 2 == 0 else (grounding, retrieval)
            for fn in order:
                wall, cpu, extra = timed(fn)
                rates[fn.__name__].append((wall, cpu))
                last = extra or last
        ratios = [(g[0] / r[0], g[1] / r[1]) for g, r in zip(rates["grounding"], rates["retrieval"])]

    t = last["timing"]
    print(f"bench_grounding on {platform.processor() or platform.machine()}, {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; open_clip:{args.arch} (random init), Scenes {args.flavour} "
          f"{args.n} × {args.image_size} px, batch {args.batch_size}, {args.workers} decode threads, "
          f"{args.rounds} alternating rounds\n")
    for j, clock in enumerate(("wall clock", "process CPU time")):
        print(f"| {clock}: contender | images/s per round | median |")
        print("|---|---|---:|")
        for name in ("retrieval", "grounding"):
            xs = [r[j] for r in rates[name]]
            print(f"| {name} | {', '.join(f'{x:,.1f}' for x in xs)} | {statistics.median(xs):,.1f} |")
        xs = [r[j] for r in ratios]
        print(f"| **grounding / retrieval** | {', '.join(f'{x:.2f}' for x in xs)} | **{statistics.median(xs):.2f}** |\n")
    print(f"last grounding round: {last['regions']['scored']} regions, {t['phrases_encoded']} distinct phrases; "
          f"image forward {t['image_forward_s']} s, phrase encoding {t['encode_phrases_s']} s, "
          f"scoring {t['score_s']} s of {t['seconds']} s")


if __name__ == "__main__":
    main()
