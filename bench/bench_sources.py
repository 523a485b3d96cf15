"""Benchmark reading WebDataset shards through URLs against the local-path reader, in one run.

The same shards (small JPEGs with a caption and a .json each) are read through
`hierdctl.sources` as

  (a) local paths            data/{00000..N}.tar             (plain open(), no webdataset)
  (b) file: URLs             file:/…/data/{00000..N}.tar     (webdataset.gopen)
  (c) a pipe: command        pipe:cat /…/data/{00000..N}.tar (webdataset.gopen: a subprocess)

Every shard is read to its end: samples grouped, captions cleaned, images not decoded
(that is the same for every path). Each round times every contender once, each round
starting at another one, so background load on a shared machine hits them alike; the
figure is the median over rounds of samples/s, and the median over rounds of each round's
ratio to (a) (a paired figure: load that drifts between rounds cancels). Target: (b) and
(c) within 10 % of (a) (ratio ≥ 0.90).

A pipe: shard costs a process start (sh + the command, a few ms) before its first byte,
whatever its size: the second table times that alone (an empty shard), so the ratio can be
carried to other shard sizes. Real shards (img2dataset: 10,000 samples, hundreds of MB)
make it negligible; the default here is one shard of 1,000 small samples.

    python bench/bench_sources.py [--samples 1000] [--shards 1] [--rounds 7] [--passes 3]

Prints markdown tables; the shards live in a temporary folder.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hierdctl.sources import Sample, open_source  # noqa: E402


def make_shards(root: Path, samples: int, shards: int, side: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    per = -(-samples // shards)
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tf:
            for i in range(s * per, min(samples, (s + 1) * per)):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
                caption = f"a photo of thing number {i}"
                for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()),
                                  ("json", json.dumps({"key": f"{i:09d}", "caption": caption}).encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return str(root / ("{00000..%05d}.tar" % (shards - 1)))


def read_all(spec: str, passes: int) -> int:
    """Samples read in `passes` full passes over the source (every record is consumed)."""
    n = 0
    for _ in range(passes):
        src = open_source(spec)
        for u in src.units:
            for rec in src.iter_unit(u):
                assert isinstance(rec, Sample), rec  # the bench shards hold no bad sample
                n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1000, help="samples in the generated shards")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--side", type=int, default=64, help="side of the generated JPEGs (px)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (after one warm-up round)")
    p.add_argument("--passes", type=int, default=3, help="full passes over the shards per contender and round")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        pattern = make_shards(Path(tmp), args.samples, args.shards, args.side)
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.tar"))
        contenders = {"local path": pattern, "file: URL": "file:" + pattern, "pipe:cat": "pipe:cat " + pattern}
        names = list(contenders)
        rates: dict[str, list[float]] = {k: [] for k in names}
        empty = Path(tmp) / "empty.tar"
        with tarfile.open(empty, "w"):
            pass
        empties = {"local path": str(empty), "file: URL": f"file:{empty}", "pipe:cat": f"pipe:cat {empty}"}
        starts: dict[str, list[float]] = {k: [] for k in names}
        for r in range(args.rounds + 1):  # round 0 warms the page cache and the imports
            order = names[r % len(names):] + names[: r % len(names)]
            for k in order:
                t0 = time.perf_counter()
                n = read_all(contenders[k], args.passes)
                dt = time.perf_counter() - t0
                assert n == args.samples * args.passes, (k, n)
                if r:
                    rates[k].append(n / dt)
                    t0 = time.perf_counter()
                    for _ in range(10):
                        read_all(empties[k], 1)
                    starts[k].append((time.perf_counter() - t0) / 10)
            if r:
                print(f"round {r}/{args.rounds}: " + " ".join(f"{k} {rates[k][-1]:,.0f}/s" for k in names),
                      file=sys.stderr)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\nReading {args.samples} samples ({args.side}px JPEG + .txt + .json) in {args.shards} shards "
          f"({size / 1e6:.1f} MB), {args.passes} passes per timing; median of {args.rounds} rounds; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs.\n")
    print("| reader | samples/s (median) | min – max | ratio to local path (median of rounds) | min – max |")
    print("|---|---:|---:|---:|---:|")
    for k in names:
        ratios = [a / b for a, b in zip(rates[k], rates["local path"])]
        print(f"| {k} | {med[k]:,.0f} | {min(rates[k]):,.0f} – {max(rates[k]):,.0f} | "
              f"{statistics.median(ratios):.3f} | {min(ratios):.3f} – {max(ratios):.3f} |")
    print("\n| reader | one empty shard: open, read, close (ms, median) |")
    print("|---|---:|")
    for k in names:
        print(f"| {k} | {statistics.median(starts[k]) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
