"""Benchmark distill's ways of reading a cache against each other, on the same samples, in one run:

  (a) random access              `CacheDataset` on a cache with images: one seek + read per sample
                                 (the default for a local cache)
  (b) streamed                   `CacheStream` on the same cache: shards front to back, a shuffle
                                 buffer (for caches on object storage; read here from local files,
                                 so the figure is the reader's own cost)
  (c) images joined by key       `CacheDataset` on a cache made with --no-store-images, each image
                                 read from the source tar by key and its sha256 checked
                                 (`distill --images SOURCE`)

The whole per-sample work of distill's loader is timed (read, decode the members, fetch and
decode the image, cut the view, tokenize), one thread. Each round produces one epoch per
contender, the contenders' order rotating; figures are medians over rounds of samples/s and
of each round's ratio to (a). Targets: (b) and (c) ≥ 0.9 × (a).

    python bench/bench_cache_readers.py [--samples 2000] [--rounds 5] [--image-size 64]
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
    from hierdctl.configs import CacheTeacherConfig, ScenesConfig, SourceOptions
    from hierdctl.stages.scenes import run as scenes_run
    from hierdctl.stages.cache_teacher import run as cache_run
    import open_clip

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-readers-"))
    teacher = f"local-dir:{save_local_dir(make_tiny_model(), TINY_CFG, work / 'teacher')}"
    scenes_run(ScenesConfig(out=work / "data", n_train=args.samples, n_test=0, image_size=args.image_size,
                            shard_size=max(1, args.samples // 8), captions_per_image=2, seed=0))
    src = str(work / "data" / "train")
    kw = dict(views=2, clusters=0, max_phrases=0, workers=0, quiet=True)
    cache_run(CacheTeacherConfig(source=src, out=work / "with", teacher=teacher, **kw))
    cache_run(CacheTeacherConfig(source=src, out=work / "without", teacher=teacher, store_images=False, **kw))
    size = {k: sum(f.stat().st_size for f in (work / k).glob("*.tar")) for k in ("with", "without")}

    io_ = {"image_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3, "grid_size": 16,
           "tokenize": open_clip.get_tokenizer("ViT-B-32"), "eval_transform": lambda img: torch.zeros(3, 32, 32)}
    needs = {"global": True, "clusters": False, "phrases": False, "mask_noise": False}

    def dataset(name: str, join: bool):
        cache = cache_format.open_cache(work / name)
        images = cache_format.ImageJoin(src, SourceOptions.from_record(cache.config["source_options"]),
                                        cache.manifest["shards_total"]) if join else None
        return cache, cache_format.CacheDataset(cache, cache_format.check_shards(cache), 0, "random", "random", io_,
                                                needs, images)

    cache, with_images = dataset("with", False)
    _, joined = dataset("without", True)
    stream = cache_format.CacheStream(cache, with_images, 1, 0, 1, 32, args.buffer, seed=0)

    def random_access(ds):
        def epoch(e: int) -> int:
            order = np.random.default_rng(e).permutation(len(ds))
            for i in order:
                assert not ds[(int(i), e)]["bad"]
            return len(order)
        return epoch

    def streamed(e: int) -> int:
        stream.epoch, stream.skip_batches = e, 0
        return sum(1 for _ in stream)

    contenders = {"random access": random_access(with_images), "streamed": streamed,
                  "images joined by key": random_access(joined)}
    rates: dict[str, list[float]] = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            n = contenders[name](r)
            rates[name].append(n / (time.perf_counter() - t0))
    base = rates["random access"]
    print(f"\n{len(with_images)} samples in {len(cache.shard_entries)} shards ({args.image_size} px PNG Scenes), "
          f"shuffle buffer {args.buffer}, {args.rounds} rounds, 1 thread\n")
    print("| reader | cache bytes | samples/s (median) | ratio to random access |\n|---|---|---|---|")
    for name in names:
        ratio = statistics.median(x / b for x, b in zip(rates[name], base))
        nbytes = size["without" if "joined" in name else "with"]
        print(f"| {name} | {nbytes / 1e6:.1f} MB | {statistics.median(rates[name]):,.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
