"""Benchmark distill's data stream from a cache without images joined with its source
(`cache-teacher --no-store-images` + `distill --images SOURCE`) against a cache that holds
the images, in one run.

The same Scenes shards are cached twice by the same teacher (a tiny random one: only the
reading matters here); then `hierdctl.cache_format.CacheDataset` items — the whole
per-sample work of distill's loader: read the span, decode the members, fetch the image
(from the cache, or from the source tar by key with its sha256 checked), decode it, cut the
view, tokenize — are produced for every sample in a seeded random order. Each round times
both contenders once, starting at a different one; the figures are the medians over rounds
of samples/s and of the per-round ratio join / with-images (target ≥ 0.9, "as fast as").

    python bench/bench_image_join.py [--samples 2000] [--rounds 5] [--image-size 64]
"""

from __future__ import annotations

import argparse
import json
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
    args = p.parse_args()

    import torch

    from conftest import TINY_CFG, make_tiny_model, save_local_dir
    from hierdctl import cache_format
    from hierdctl.configs import CacheTeacherConfig, ScenesConfig, SourceOptions
    from hierdctl.scenes import run as scenes_run
    from hierdctl.stages.cache_teacher import run as cache_run
    from hierdctl.tv_shim import import_open_clip

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-join-"))
    teacher = f"local-dir:{save_local_dir(make_tiny_model(), TINY_CFG, work / 'teacher')}"
    scenes_run(ScenesConfig(out_dir=work / "data", n_train=args.samples, n_test=0, image_size=args.image_size,
                            shard_size=max(1, args.samples // 4), captions_per_image=2, seed=0))
    src = str(work / "data" / "train")
    kw = dict(views=2, clusters=0, max_phrases=0, workers=0, quiet=True)
    cache_run(CacheTeacherConfig(source=src, out=work / "with", teacher=teacher, **kw))
    cache_run(CacheTeacherConfig(source=src, out=work / "without", teacher=teacher, store_images=False, **kw))
    size = {k: sum(p.stat().st_size for p in (work / k).glob("*.tar")) for k in ("with", "without")}

    tok = import_open_clip().get_tokenizer("ViT-B-32")
    io_ = {"image_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3, "tokenize": tok,
           "eval_transform": lambda img: torch.zeros(3, 32, 32), "grid_size": 16}
    needs = {"global": True, "clusters": False, "phrases": False, "mask_noise": False}

    def dataset(name: str, join: bool):
        cache = cache_format.open_cache(work / name)
        images = cache_format.ImageJoin(src, SourceOptions(**cache.config["source_options"]),
                                        cache.manifest["shards_total"]) if join else None
        return cache_format.CacheDataset(cache, cache_format.check_shards(cache), 0, "random", "random", io_, needs,
                                         images)

    contenders = {"with images": dataset("with", False), "joined by key": dataset("without", True)}
    order = np.random.default_rng(0).permutation(len(contenders["with images"]))
    rates: dict[str, list[float]] = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(args.rounds):
        for name in names[r % 2:] + names[: r % 2]:
            ds = contenders[name]
            t0 = time.perf_counter()
            for i in order:
                item = ds[(int(i), r)]
                assert not item["bad"], item["bad"]
            rates[name].append(len(order) / (time.perf_counter() - t0))
    ratio = statistics.median(j / w for j, w in zip(rates["joined by key"], rates["with images"]))
    print(f"\n{len(order)} samples ({args.image_size} px PNG Scenes), {args.rounds} rounds, 1 thread\n")
    print("| reader | cache bytes | samples/s (median) | ratio to with-images |\n|---|---|---|---|")
    for name, key in (("with images", "with"), ("joined by key", "without")):
        r = statistics.median(rates[name])
        print(f"| {name} | {size[key] / 1e6:.1f} MB | {r:,.0f} | "
              + ("1.00 |" if name == "with images" else f"{ratio:.2f} |"))
    print(json.dumps({"ratio": round(ratio, 3), "rates": {k: [round(x, 1) for x in v] for k, v in rates.items()},
                      "bytes": size}))


if __name__ == "__main__":
    main()
