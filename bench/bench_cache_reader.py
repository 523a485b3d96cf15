"""Benchmark distill's two cache readers on the same cache, in one run: random access
(`CacheDataset`, one seek + read per sample, the default for local caches) against the
streaming reader (`CacheStream`: shards read front to back with a shuffle buffer, for caches
on object storage; here read from local files, so the figure is the reader's own cost).

Each round produces every item of one epoch once per contender (decode, view, tokenize
included), the contenders alternating their order; figures are the medians over rounds.

    python bench/bench_cache_reader.py [--samples 2000] [--rounds 5] [--image-size 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--buffer", type=int, default=1000)
    args = p.parse_args()

    import torch

    from conftest import TINY_CFG, make_tiny_model, save_local_dir
    from hierdctl import cache_format
    from hierdctl.configs import CacheTeacherConfig, ScenesConfig
    from hierdctl.scenes import run as scenes_run
    from hierdctl.stages.cache_teacher import run as cache_run
    from hierdctl.tv_shim import import_open_clip

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-reader-"))
    teacher = f"local-dir:{save_local_dir(make_tiny_model(), TINY_CFG, work / 'teacher')}"
    scenes_run(ScenesConfig(out_dir=work / "data", n_train=args.samples, n_test=0, image_size=args.image_size,
                            shard_size=max(1, args.samples // 8), captions_per_image=2, seed=0))
    cache_run(CacheTeacherConfig(source=str(work / "data" / "train"), out=work / "cache", teacher=teacher, views=2,
                                 clusters=4, max_phrases=0, workers=0, quiet=True))
    cache = cache_format.open_cache(work / "cache")
    io_ = {"image_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3, "tokenize": import_open_clip().get_tokenizer("ViT-B-32"),
           "eval_transform": lambda img: torch.zeros(3, 32, 32), "grid_size": 16}
    needs = {"global": True, "clusters": True, "phrases": False, "mask_noise": False}
    ds = cache_format.CacheDataset(cache, cache_format.check_shards(cache), 0, "random", "random", io_, needs)
    stream = cache_format.CacheStream(cache, ds, 1, 0, 1, 32, args.buffer, seed=0)

    def random_access(epoch: int) -> int:
        order = np.random.default_rng(epoch).permutation(len(ds))
        for i in order:
            ds[(int(i), epoch)]
        return len(order)

    def streamed(epoch: int) -> int:
        stream.epoch, stream.skip_batches = epoch, 0
        return sum(1 for _ in stream)

    contenders = {"random access": random_access, "streaming": streamed}
    rates: dict[str, list[float]] = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(args.rounds):
        for name in names[r % 2:] + names[: r % 2]:
            t0 = time.perf_counter()
            n = contenders[name](r)
            rates[name].append(n / (time.perf_counter() - t0))
    ratio = statistics.median(s / a for s, a in zip(rates["streaming"], rates["random access"]))
    print(f"\n{len(ds)} samples in {len(cache.shard_entries)} shards ({args.image_size} px), shuffle buffer "
          f"{args.buffer}, {args.rounds} rounds, 1 thread\n")
    print("| reader | samples/s (median) | ratio |\n|---|---|---|")
    print(f"| random access | {statistics.median(rates['random access']):,.0f} | 1.00 |")
    print(f"| streaming | {statistics.median(rates['streaming']):,.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
