"""What the fault fixes of issue 22 cost (docs/reliability.md, "Round two").

    python bench/bench_faults.py [--rounds 5] [--caption-bytes 65536,262144,4194304]

1. Duplicate keys: cache-teacher lists every local shard's keys from its tar headers before it
   starts (sources.TarSource.later_duplicates). Timed against reading the same shards
   (iter_unit, images not decoded), contenders alternating; the ratio is the median of the
   rounds' ratios. 4 shards of 1,000 samples (a 64 px JPEG, a .txt, a .json each).
2. Huge captions: cache-teacher's text path for one caption (sources' cleaning, noun-phrase
   chunking, perturbations, the teacher's tokenizer) at the given sizes. Run it on an older
   checkout to see the time before the cap (it grows about quadratically there).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def keys_listing(rounds: int) -> None:
    from conftest import make_shards

    from hierdctl.sources import open_source

    with tempfile.TemporaryDirectory() as d:
        src = open_source(make_shards(Path(d) / "data", n_shards=4, per_shard=1000))
        ratios, lists, reads = [], [], []
        for _ in range(rounds):
            t = time.perf_counter()
            src.later_duplicates()
            lists.append((time.perf_counter() - t) / 4)
            t = time.perf_counter()
            for u in src.units:
                for _ in src.iter_unit(u):
                    pass
            reads.append((time.perf_counter() - t) / 4)
            ratios.append(lists[-1] / reads[-1])
        print(f"| listing keys (tar headers) | {1000 * statistics.median(lists):.1f} ms per 1,000-sample shard |")
        print(f"| reading the shard (no decode) | {1000 * statistics.median(reads):.1f} ms |")
        print(f"| ratio (median of {rounds}) | {statistics.median(ratios):.3f} |")


def caption_path(sizes: list[int]) -> None:
    import open_clip

    from hierdctl import sources
    from hierdctl.stages import cache_teacher as CT

    tok = open_clip.get_tokenizer("ViT-B-32")
    cfg = SimpleNamespace(max_phrases=4, perturbations=2, seed=0, chunker="textblob")
    chunker = CT.make_chunker(cfg)
    chunker("warm up the parser", 4)
    for n in sizes:
        cap = ("a red circle next to a blue square " * (n // 35 + 1))[:n]
        t = time.perf_counter()
        caps = sources._clean_captions(cap)[0]
        CT.text_parts(caps, chunker, cfg, tok)
        tok(caps)
        print(f"| caption of {n:,} bytes | {time.perf_counter() - t:.3f} s |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--caption-bytes", default="65536,262144,1048576,4194304")
    ap.add_argument("--only", choices=["keys", "captions"], default=None)
    args = ap.parse_args()
    if args.only in (None, "keys"):
        keys_listing(args.rounds)
    if args.only in (None, "captions"):
        caption_path([int(x) for x in args.caption_bytes.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
