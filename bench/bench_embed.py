"""Benchmark embed → index → search against their cores alone; prints markdown tables.

1. embed: `hierdctl embed` end to end (read shards, decode, transform, embed images and
   captions, write .npy shards) against the model's forward alone (the same images already
   decoded and transformed in memory, the same captions, the same batch), samples/s; the
   rounds alternate which runs first.
2. index: `hierdctl index` (reading an embeddings folder of N random unit vectors, D dims,
   in shards) against plain FAISS (the same index type and parameters on the same vectors in
   memory): build time; then the query time of `hierdctl search`'s index path (OpenIndex:
   read back from INDEX) against the plain index, Q queries, top-10, and the recall@10 that
   `hierdctl index` measures (its measurement timed separately, not in the build).

    python bench/bench_embed.py [--n 100000] [--d 512] [--queries 1000] [--kinds flat,ivf,hnsw,pq]
                                [--images 256] [--arch ViT-T-16] [--rounds 2] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HIERDCTL_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _shards(root: Path, n: int, per_shard: int) -> str:
    from conftest import CAPTIONS, image_bytes, write_tar

    root.mkdir(parents=True)
    for s in range(0, n, per_shard):
        write_tar(root / f"{s // per_shard:05d}.tar",
                  [{"key": f"{i:09d}", "jpg": image_bytes(i, size=(160, 128)), "txt": CAPTIONS[i % len(CAPTIONS)]}
                   for i in range(s, min(n, s + per_shard))])
    return str(root)


def bench_embed(images: int, arch: str, batch: int, rounds: int, tmp: Path) -> list[tuple[str, str, str]]:
    import torch
    from PIL import Image

    import io

    from conftest import CAPTIONS, image_bytes
    from hierdctl.configs import EmbedConfig
    from hierdctl.specs import load_encoder
    from hierdctl.stages import embed as E

    src = _shards(tmp / "data", images, 128)
    spec = f"open_clip:{arch}"
    enc = load_encoder(spec, "cpu")
    pixels = torch.stack([enc.eval_transform(Image.open(io.BytesIO(image_bytes(i, size=(160, 128)))).convert("RGB"))
                          for i in range(images)])
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(images)]

    def forward() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for a in range(0, images, batch):
                enc.encode_image(pixels[a : a + batch])
                enc.encode_text(enc.tokenize(texts[a : a + batch]))
        return time.perf_counter() - t0

    def embed(r: int) -> float:
        out = tmp / f"emb-{r}"
        m = E.run(EmbedConfig(source=src, model=spec, out=out, device="cpu", quiet=True, batch_size=batch,
                              workers=2, dtype="fp16"))
        assert m["counts"]["rows"] == images
        shutil.rmtree(out)
        return m["this_run"]["embed_seconds"]

    forward()  # warm-up
    t_fwd, t_emb = [], []
    for r in range(rounds):
        if r % 2 == 0:
            t_emb.append(embed(r))
            t_fwd.append(forward())
        else:
            t_fwd.append(forward())
            t_emb.append(embed(r))
    f, e = min(t_fwd), min(t_emb)
    setting = f"{arch} (random), {images} images 160×128 + 1 caption each, batch {batch}, CPU"
    return [("embed: forward alone", setting, f"{images / f:,.1f} samples/s"),
            ("embed: `hierdctl embed` (2 decode threads, writes fp16 shards)", setting, f"{images / e:,.1f} samples/s"),
            ("embed: hierdctl / forward alone (speed)", "same run, best of each", f"{f / e:.2f}")]


def bench_index(n: int, d: int, q: int, kinds: list[str], tmp: Path) -> list[tuple[str, ...]]:
    from hierdctl import embeddings_format as EF
    from hierdctl import index_format as IF
    from hierdctl.configs import IndexConfig
    from hierdctl.stages import index as I

    class Units:
        units = [type("U", (), {"index": i, "label": f"bench-{i}"})() for i in range(-(-n // 10_000))]

        def describe(self):
            return {"kind": "bench"}

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = rng.standard_normal((q, d), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    emb = tmp / "vectors"
    emb.mkdir()
    for u in Units.units:
        part = x[u.index * 10_000 : (u.index + 1) * 10_000]
        keys = [str(i) for i in range(len(part))]
        EF.write_shard(emb, u.index, u.label, image=part, text=None, text_row=np.zeros(0, np.int64),
                       hashes=np.ones((len(part), 2), np.uint64), rows={"keys": keys, "paths": keys,
                                                                         "captions": [[] for _ in keys]},
                       skipped=[], captionless={})
    EF.write_manifest(emb, {"modality": "image", "dtype": "fp32"},
                      {"spec": "random", "fingerprint": "0" * 64, "embed_dim": d}, Units(), time.time())
    rows = []
    for j, kind in enumerate(kinds):
        def ours_build():
            # hierdctl: the whole command (read the shards, build, write INDEX); recall measured apart, below.
            t0 = time.perf_counter()
            m = I.run(IndexConfig(embeddings=emb, out=tmp / f"idx-{kind}", index_type=kind, recall_queries=0,
                                  quiet=True))
            return m, time.perf_counter() - t0

        def plain_build():
            # plain FAISS: the same index and parameters, the vectors in memory (ivf trains on all of them,
            # pq on as many random rows as hierdctl's sample).
            t0 = time.perf_counter()
            plain, _, _ = IF.make_index(kind, d, n)
            if kind in ("ivf", "pq"):
                plain.train(x if kind == "ivf" else x[rng.choice(n, min(n, 256 * 39), replace=False)])
            plain.add(x)
            return plain, time.perf_counter() - t0

        if j % 2 == 0:  # the contenders alternate which goes first
            (m, t_ours), (plain, t_plain) = ours_build(), plain_build()
        else:
            (plain, t_plain), (m, t_ours) = plain_build(), ours_build()
        ours = IF.OpenIndex(tmp / f"idx-{kind}")
        t0 = time.perf_counter()
        ours.search(queries, 10)
        s_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        plain.search(queries, 10)
        s_plain = time.perf_counter() - t0
        recall = "exact"
        if kind != "flat":
            t0 = time.perf_counter()
            r = I.run(IndexConfig(embeddings=emb, out=tmp / f"idx-{kind}", index_type=kind, recall_queries=q,
                                  overwrite=True, quiet=True))
            recall = f"{r['recall']['value']:.3f} ({time.perf_counter() - t0 - r['timing']['build_s']:.1f} s)"
        p = ", ".join(f"{k}={v}" for k, v in m["params"].items() if k != "train_rows")
        rows.append((kind + (f" ({p})" if p else ""), f"{t_ours:.2f} s ({m['timing']['build_s']:.2f} s)",
                     f"{t_plain:.2f} s", f"{t_ours / t_plain:.2f}",
                     f"{s_ours * 1e3 / q:.3f} ms", f"{s_plain * 1e3 / q:.3f} ms", f"{s_ours / s_plain:.2f}", recall))
        shutil.rmtree(tmp / f"idx-{kind}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--kinds", default="flat,ivf,hnsw,pq")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--arch", default="ViT-T-16")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch / faiss threads (0: all cores)")
    ap.add_argument("--skip-embed", action="store_true")
    args = ap.parse_args()

    import faiss
    import torch

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        emb_rows = [] if args.skip_embed else bench_embed(args.images, args.arch, args.batch_size, args.rounds, tmp)
        idx_rows = bench_index(args.n, args.d, args.queries, args.kinds.split(","), tmp)
    print(f"bench_embed on {platform.processor() or platform.machine()}, {threads} threads; torch {torch.__version__}, "
          f"faiss {faiss.__version__}\n")
    if emb_rows:
        print("| measurement | setting | result |\n|---|---|---|")
        for r in emb_rows:
            print("| " + " | ".join(r) + " |")
        print()
    print(f"{args.n:,} random unit vectors × {args.d}, {args.queries:,} queries, top-10:\n")
    print("| index | build: `hierdctl index` (of which building) | plain FAISS | ratio | query: hierdctl | plain FAISS "
          "| ratio "
          "| recall@10 vs exact (measuring) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in idx_rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
