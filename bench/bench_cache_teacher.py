"""Benchmark `hierdctl cache-teacher`: its throughput against the teacher's forward pass alone,
measured in one run, and the bytes per sample of every store mode.

    python bench/bench_cache_teacher.py                       # CPU default: ViT-S-32, 64 samples
    python bench/bench_cache_teacher.py --arch ViT-B-16 --n 4096 --batch-size 256 --device cuda
    python bench/bench_cache_teacher.py --sizes-only          # the bytes table alone (no model run)

The teacher is a random-init open_clip architecture (speed does not depend on weights).
"Forward alone" is exactly the model work cache-teacher does per batch, on tensors made
beforehand: encode_image on the B·V view images and encode_text on the batch's captions
and noun phrases, same batch, device, image size and precision. It is timed before and
after the cache run and averaged, since other processes may share the machine. The ratio
compares cache-teacher's steady-state samples/s (after model load and fingerprinting) with
the forward's; an end-to-end ratio that includes the setup is printed beside it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HIERDCTL_NO_PROGRESS", "1")

CAPTIONS = [
    "a red circle next to a blue square",
    "two dogs playing with a yellow ball in the park",
    "a man riding a bicycle down a busy street at night",
    "a bowl of fruit on a wooden kitchen table",
    "a black cat sleeping on an old sofa near the window",
    "a small boat on a calm lake under a cloudy sky",
    "children flying a kite on a sandy beach",
    "a plate of pasta with tomato sauce and fresh basil",
]


# ----------------------------------------------------------------------------------
# Bytes per sample: encode one sample with a teacher's shapes
# ----------------------------------------------------------------------------------


def tar_size(n: int) -> int:
    """Bytes a member of n bytes takes in a tar: a 512-byte header + data padded to 512."""
    return 512 + -(-n // 512) * 512


def sample_bytes(embed_dim: int, grid: tuple[int, int], text_width: int, context: int, views: int, captions: int,
                 clusters: int, phrases: int, store: str, dtype: str) -> tuple[int, int]:
    """(payload bytes, bytes in the shard) of one sample without its image, via cache_format.encode_sample.

    Random arrays of the real shapes; the meta.json holds `captions` captions of ~40
    characters with `phrases` phrases each and `views` views, as cache-teacher writes it.
    """
    from hierdctl import cache_format

    rng = np.random.default_rng(0)
    D, G = embed_dim, grid[0] * grid[1]
    V, C, K, P = views, captions, clusters, phrases

    def unit(*shape):
        a = rng.normal(size=shape).astype(np.float32)
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    arrays = {"img_emb": unit(V, D), "txt_emb": unit(C, D)}
    if K:
        arrays |= {"clu_emb": unit(V, K, D), "clu_assign": rng.integers(0, K, (V, *grid)),
                   "clu_count": np.full((V, K), G // K)}
    if P:
        arrays |= {"phr_emb": unit(C, P, D), "phr_mask": np.ones((C, P), np.uint8)}
    if store == "tokens":
        arrays |= {"img_tok": rng.normal(size=(V, G, D)), "txt_tok": rng.normal(size=(C, context, text_width))}
    caps = [CAPTIONS[i % len(CAPTIONS)] for i in range(C)]
    meta = {"key": "000012345", "sha256": "0" * 64, "captions": caps,
            "phrases": [[f"a phrase {j}" for j in range(P)] for _ in caps], "size": [640, 480],
            "views": [{"kind": "eval" if v == 0 else "crop", "box": [80, 0, 480, 480], "flip": bool(v % 2)}
                      for v in range(V)], "converted_from": None, "image_ext": "jpg"}
    members = cache_format.encode_sample(cache_format.sample_key(3, 12345), meta, None, arrays, dtype)
    return sum(len(b) for _, b in members), sum(tar_size(len(b)) for _, b in members)


def sizes_table(embed_dim, grid, text_width, context, views, clusters, phrases, title: str) -> str:
    rows = [f"**{title}** — D={embed_dim}, {grid[0]}×{grid[1]} patches, text width {text_width}, "
            f"context {context}, V={views}, K={clusters}, P={phrases}; bytes per sample without the image",
            "", "| store | dtype | C=1 payload | C=1 in shard | C=5 payload | C=5 in shard |", "|---|---|---:|---:|---:|---:|"]
    for store in ("clusters", "tokens"):
        for dtype in ("fp16", "fp32", "int8"):
            c1 = sample_bytes(embed_dim, grid, text_width, context, views, 1, clusters, phrases, store, dtype)
            c5 = sample_bytes(embed_dim, grid, text_width, context, views, 5, clusters, phrases, store, dtype)
            rows.append(f"| {store} | {dtype} | {c1[0]:,} | {c1[1]:,} | {c5[0]:,} | {c5[1]:,} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------
# Data and timing
# ----------------------------------------------------------------------------------


def make_data(root: Path, n: int, per_shard: int, size: tuple[int, int]) -> str:
    """n JPEG images (random shapes) with captions, in img2dataset-layout shards."""
    from PIL import Image, ImageDraw

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n_shards = -(-n // per_shard)
    for s in range(n_shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tf:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 255, 3)))
                d = ImageDraw.Draw(img)
                for _ in range(6):
                    x0, y0 = int(rng.integers(0, size[0] - 40)), int(rng.integers(0, size[1] - 40))
                    d.ellipse([x0, y0, x0 + int(rng.integers(20, size[0] // 2)), y0 + int(rng.integers(20, size[1] // 2))],
                              fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("txt", CAPTIONS[i % len(CAPTIONS)].encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return str(root / ("{00000..%05d}.tar" % (n_shards - 1)))


def time_forward(enc, teacher, args, n: int) -> float:
    """Seconds for the teacher's forward passes over n samples, batch by batch."""
    import torch

    from hierdctl.phrases import Chunker

    B, V = args.batch_size, args.views
    S = enc.image_size
    chunker = Chunker(args.chunker) if args.max_phrases else None
    g = torch.Generator().manual_seed(0)
    batches = []
    for start in range(0, n, B):
        b = min(B, n - start)
        caps = [CAPTIONS[i % len(CAPTIONS)] for i in range(start, start + b)]
        phr = [p for c in caps for p in (chunker(c, args.max_phrases) if chunker else [])]
        x = torch.randn(b * V, 3, S, S, generator=g)
        batches.append((x, enc.tokenize(caps), enc.tokenize(phr) if phr else None))

    def one(x, cap, phr):
        with torch.no_grad(), teacher._autocast():
            emb, _ = enc.encode_image(x.to(teacher.device))
            emb.float().cpu()
        teacher.text(cap)[0].cpu()
        if phr is not None:
            teacher.text(phr)[0].cpu()

    one(*batches[0])  # warm-up
    if teacher.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches:
        one(*b)
    if teacher.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="ViT-S-32", help="open_clip architecture (random init)")
    ap.add_argument("--n", type=int, default=64, help="samples")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--clusters", type=int, default=8)
    ap.add_argument("--max-phrases", type=int, default=4)
    ap.add_argument("--chunker", default="auto")
    ap.add_argument("--workers", type=int, default=-1)
    ap.add_argument("--image-size", default="320,240", help="W,H of the synthetic source JPEGs")
    ap.add_argument("--per-shard", type=int, default=32)
    ap.add_argument("--sizes-only", action="store_true", help="print the bytes-per-sample tables and stop")
    ap.add_argument("--profile", type=Path, default=None, help="cProfile the cache run into this file")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    vitb16 = sizes_table(512, (14, 14), 512, 77, args.views, args.clusters, args.max_phrases,
                         "ViT-B/16 teacher (224 px)")
    if args.sizes_only:
        print(vitb16)
        return

    import torch

    from hierdctl.distributed import DistEnv, resolve_device
    from hierdctl.specs import load_encoder
    from hierdctl.stages import cache_teacher as CT

    device = resolve_device(args.device, DistEnv())
    spec = f"open_clip:{args.arch}"
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        tmp = Path(tmp)
        w, h = (int(v) for v in args.image_size.split(","))
        src = make_data(tmp / "data", args.n, args.per_shard, (w, h))
        cfg = CT.CacheTeacherConfig(source=src, out=tmp / "cache", teacher=spec, views=args.views,
                                    clusters=args.clusters, max_phrases=args.max_phrases, chunker=args.chunker,
                                    batch_size=args.batch_size, device=device, precision=args.precision,
                                    workers=args.workers, quiet=True)
        enc = load_encoder(spec, device)
        teacher = CT._Teacher(enc, cfg, device)
        fwd_before = time_forward(enc, teacher, args, args.n)
        del enc, teacher
        if args.profile:
            import cProfile

            prof = cProfile.Profile()
            manifest = prof.runcall(CT.run, cfg)
            prof.dump_stats(str(args.profile))
        else:
            manifest = CT.run(cfg)
        enc = load_encoder(spec, device)
        teacher = CT._Teacher(enc, cfg, device)
        fwd_after = time_forward(enc, teacher, args, args.n)
        grid = enc.patch_grid
        text_width = int(enc.model.transformer.width) if hasattr(enc.model, "transformer") else enc.embed_dim
        context = int(enc.tokenize(["a"]).shape[-1])
        image_bytes = sum(len(m) for p in sorted((tmp / "data").glob("*.tar")) for m in _jpgs(p)) / args.n

    r = manifest["this_run"]
    fwd = (fwd_before + fwd_after) / 2
    fwd_rate = args.n / fwd
    steady = args.n / (r["seconds"] - r["setup_seconds"])
    e2e = args.n / r["seconds"]
    workers = args.workers if args.workers >= 0 else min(8, max(0, (os.cpu_count() or 1) - 1))
    dev = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    print(f"**cache-teacher vs forward alone** — {args.arch} (random init, {enc.image_size} px), {dev}, "
          f"precision {teacher.precision}, batch {args.batch_size}, n={args.n}, V={args.views}, K={args.clusters}, "
          f"P≤{args.max_phrases}, {workers} decode workers, source JPEGs {w}×{h}\n")
    print("| measure | value |\n|---|---:|")
    print(f"| forward alone (before / after) | {args.n / fwd_before:.2f} / {args.n / fwd_after:.2f} samples/s |")
    print(f"| cache-teacher, steady state | {steady:.2f} samples/s |")
    print(f"| **ratio** (steady / forward) | **{steady / fwd_rate:.2f}** |")
    print(f"| cache-teacher, end to end (setup {r['setup_seconds']:.1f} s incl.) | {e2e:.2f} samples/s |")
    print(f"| ratio, end to end | {e2e / fwd_rate:.2f} |")
    print(f"| shard bytes per sample (clusters, fp16, with image) | {manifest['bytes_per_sample']:,.0f} |")
    print(f"| source image bytes per sample (JPEG) | {image_bytes:,.0f} |")
    print()
    print(sizes_table(enc.embed_dim, grid, text_width, context, args.views, args.clusters, args.max_phrases,
                      f"{args.arch} teacher ({enc.image_size} px)"))
    print()
    print(vitb16)
    print(json.dumps({"forward_samples_per_s": fwd_rate, "cache_samples_per_s": steady, "ratio": steady / fwd_rate,
                      "ratio_end_to_end": e2e / fwd_rate}), file=sys.stderr)


def _jpgs(path: Path):
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            if m.name.endswith(".jpg"):
                yield tf.extractfile(m).read()


if __name__ == "__main__":
    main()
