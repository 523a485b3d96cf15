"""Benchmark the evaluation and export paths on this machine; prints a markdown table.

1. Search: FAISS IndexFlatIP (exact, what eval-retrieval uses by default) against torch
   brute force (chunked matmul + topk), N gallery × D vectors, Q queries, top-10, in the
   same run; the ratio is what matters. Both must return the same ids.
2. Encoding: images/s and texts/s of an exported student (ViT-T-16 from
   hierdctl/model_configs, random weights) in PyTorch and in onnxruntime, on CPU.

    python bench/bench_eval.py [--n 100000] [--d 512] [--queries 5000] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_search(n: int, d: int, q: int, k: int, repeat: int) -> list[tuple[str, str, str]]:
    import faiss
    import torch

    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((n, d), dtype=np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = rng.standard_normal((q, d), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    index = faiss.IndexFlatIP(d)
    index.add(gallery)
    out = {}

    def run_faiss():
        out["faiss"] = index.search(queries, k)[1]

    g, qs = torch.from_numpy(gallery), torch.from_numpy(queries)

    def run_torch():
        ids = []
        with torch.inference_mode():
            for a in range(0, q, 1000):  # (1000,N) score blocks keep memory bounded
                ids.append((qs[a : a + 1000] @ g.T).topk(k, dim=1).indices)
        out["torch"] = torch.cat(ids).numpy()

    t_faiss = best_of(run_faiss, repeat)
    t_torch = best_of(run_torch, repeat)
    agree = float((out["faiss"] == out["torch"]).all(axis=1).mean())
    shape = f"{n:,} × {d}, {q:,} queries, top-{k}"
    return [
        ("search: FAISS IndexFlatIP (exact)", shape, f"{t_faiss:.3f} s ({q / t_faiss:,.0f} queries/s)"),
        ("search: torch brute force (matmul + topk)", shape, f"{t_torch:.3f} s ({q / t_torch:,.0f} queries/s)"),
        ("search: torch / FAISS time ratio", "same run", f"{t_torch / t_faiss:.2f}×"),
        ("search: queries with identical top-k ids", "", f"{agree:.4f}"),
    ]


def bench_encode(img_batch: int, txt_batch: int, repeat: int) -> list[tuple[str, str, str]]:
    import onnxruntime as ort
    import torch

    from hierdctl.specs import create_open_clip, parse_spec
    from hierdctl.stages.export import write_onnx

    torch.manual_seed(0)
    model, _, tokenizer, _ = create_open_clip(parse_spec("open_clip:ViT-T-16"), "cpu")
    model.eval()
    images = torch.randn(img_batch, 3, 224, 224)
    words = ["a photo of a dog", "two red squares left of a blue circle", "a man riding a bicycle down the street"]
    tokens = tokenizer([words[i % 3] for i in range(txt_batch)])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checks = write_onnx(model, Path(tmp), 17, 1e-4, tokenizer)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        img_sess = ort.InferenceSession(str(Path(tmp) / "image_encoder.onnx"), opts, providers=["CPUExecutionProvider"])
        txt_sess = ort.InferenceSession(str(Path(tmp) / "text_encoder.onnx"), opts, providers=["CPUExecutionProvider"])
        with torch.inference_mode():
            model.encode_image(images[:2])  # warm-up
            model.encode_text(tokens[:2])
            t_ti = best_of(lambda: model.encode_image(images, normalize=True), repeat)
            t_tt = best_of(lambda: model.encode_text(tokens, normalize=True), repeat)
        x, t = images.numpy(), tokens.numpy()
        img_sess.run(None, {"image": x[:2]})
        txt_sess.run(None, {"text": t[:2]})
        t_oi = best_of(lambda: img_sess.run(None, {"image": x}), repeat)
        t_ot = best_of(lambda: txt_sess.run(None, {"text": t}), repeat)
    rows += [
        ("encode images: PyTorch", f"ViT-T-16, 224², batch {img_batch}", f"{img_batch / t_ti:,.1f} images/s"),
        ("encode images: onnxruntime", f"ViT-T-16, 224², batch {img_batch}", f"{img_batch / t_oi:,.1f} images/s"),
        ("encode images: onnxruntime / PyTorch", "same run", f"{t_ti / t_oi:.2f}×"),
        ("encode texts: PyTorch", f"ViT-T-16 text tower, 77 tokens, batch {txt_batch}", f"{txt_batch / t_tt:,.1f} texts/s"),
        ("encode texts: onnxruntime", f"ViT-T-16 text tower, 77 tokens, batch {txt_batch}", f"{txt_batch / t_ot:,.1f} texts/s"),
        ("encode texts: onnxruntime / PyTorch", "same run", f"{t_tt / t_ot:.2f}×"),
        ("ONNX parity (max abs diff, normalised)", "image / text",
         f"{checks['image']['max_abs_diff']:.1e} / {checks['text']['max_abs_diff']:.1e}"),
    ]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--queries", type=int, default=5_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--img-batch", type=int, default=32)
    ap.add_argument("--txt-batch", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch / faiss / onnxruntime threads (0: all cores)")
    args = ap.parse_args()

    import faiss
    import onnxruntime
    import torch

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    rows = bench_search(args.n, args.d, args.queries, args.k, args.repeat)
    rows += bench_encode(args.img_batch, args.txt_batch, args.repeat)
    print(f"bench_eval on {platform.processor() or platform.machine()}, {threads} threads; torch {torch.__version__}, "
          f"faiss {faiss.__version__}, onnxruntime {onnxruntime.__version__}; best of {args.repeat}\n")
    print("| measurement | setting | result |")
    print("|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
