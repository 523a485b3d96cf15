#!/usr/bin/env python3
"""The GPU measurement of hierdctl in one command: the GPU tests and benchmarks 1-3 of
bench/gpu/README.md, in a fixed order, each part under its own time cap, all of it under
a total budget, every table and log under --out.

    bash bench/gpu/run.sh                          # on the GPU machine: install.sh, then this
    python3 bench/gpu/run_gpu.py --out DIR         # the same, once install.sh has run
    python bench/gpu/run_gpu.py --smoke --out DIR  # CPU, toy sizes, < 60 s (make test runs it)

Parts, in this order (a part that would not fit in what is left of --budget is skipped,
and the summary says so; so is any GPU-only step on a machine without CUDA):

    env            versions, the device, the CPU cores
    search         100k x 512 gallery: FAISS IndexFlatIP on the CPU (what eval-retrieval
                   runs; hierdctl.retrieval) against torch matmul + topk on the GPU, and
                   FAISS on the GPU where a faiss-gpu wheel runs
    tests          pytest -m gpu tests/test_gpu.py
    cache          bench/bench_cache_teacher.py: ViT-B-16 at 224 px, bf16, batch 256, 4,096
                   JPEGs at 256 px, 16 decode workers; plus peak GPU memory
    distill        bench/bench_distill.py: ViT-T-16 student at 224 px, ViT-B-16 teacher,
                   batch 256, bf16; step times of every recipe, from cache vs online
    distill-extra  on distill's cache: FLOPs of each recipe's step (FlopCounterMode, forward
                   + backward) -> model FLOP utilisation; the data stream's samples/s alone
                   against the step's
    stream         bench/bench_stream.py: distill's per-sample loader work at 224 px from
                   256- and 512-px JPEGs per core of this machine, the cores a ViT-T-16 step
                   rate needs, and --decode gpu's device part (gpu_decode.BatchDecoder)
    cache-profile  only when cache's ratio < 0.9: cProfile of cache-teacher's main process
                   (where the time goes)

Every part runs in a child process (a killed part takes nothing else down); its output goes
to log.txt (pytest's to pytest.txt), its numbers to results.json, and summary.md is the
BENCHMARKS.md section (device, date, exact command, ratios with absolute figures beside).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve()
RESULT = "@@RESULT "  # a child's last line starting with this carries its JSON result

# Dense (no 2:4 sparsity) bf16 peaks in TFLOP/s, from NVIDIA's data sheets. The H200 has the
# H100 SXM's compute (989.4; 1,979 is the sparse figure) with more and faster memory.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}

TARGETS = {"cache_ratio": 0.9, "clip-kd": 1.15, "clip-rd": 1.15, "hierd": 1.40, "tinyclip": 1.15, "hierd+rd": 1.40}

# What each part runs at. "gpu" is the measurement; "smoke" exercises every part at
# toy sizes on the CPU (tiny-test models, a few dozen images).
SIZES = {
    "gpu": {
        "device": "cuda",
        "search": {"n": 100_000, "d": 512, "q": 5_000, "k": 10, "repeat": 3, "check_queries": 200},
        "cache": ["--arch", "ViT-B-16", "--n", "4096", "--batch-size", "256", "--precision", "bf16",
                  "--workers", "16", "--image-size", "256,256", "--per-shard", "256"],
        "cache_profile": ["--arch", "ViT-B-16", "--n", "2048", "--batch-size", "256", "--precision", "bf16",
                          "--workers", "16", "--image-size", "256,256", "--per-shard", "128"],
        "distill": ["--student", "ViT-T-16", "--teacher", "ViT-B-16", "--image-size", "224", "--batch-size", "256",
                    "--precision", "bf16", "--samples", "1024", "--data-image-size", "256", "--rounds", "3",
                    "--e2e-steps", "6"],
        "extra": {"batch_size": 256, "precision": "bf16", "timed_steps": 5, "stream_batches": 16,
                  "stream_workers": -1, "stream_recipes": ["clip", "hierd"]},
        "stream": ["--samples", "256", "--rounds", "3", "--sizes", "256,512", "--batch", "256"],
    },
    "smoke": {
        "device": "cpu",
        "search": {"n": 2_000, "d": 32, "q": 100, "k": 10, "repeat": 1, "check_queries": 50},
        "cache": ["--arch", "tiny-test", "--n", "16", "--batch-size", "8", "--workers", "1", "--image-size", "64,48",
                  "--per-shard", "8"],
        "cache_profile": ["--arch", "tiny-test", "--n", "16", "--batch-size", "8", "--workers", "1",
                          "--image-size", "64,48", "--per-shard", "8"],
        "distill": ["--student", "tiny-test", "--teacher", "tiny-test", "--image-size", "32", "--batch-size", "4",
                    "--samples", "8", "--data-image-size", "32", "--rounds", "1", "--e2e-steps", "2", "--workers", "0",
                    "--threads", "1", "--recipes", "hierd"],
        "extra": {"batch_size": 4, "precision": "fp32", "timed_steps": 1, "stream_batches": 1,
                  "stream_workers": 0, "stream_recipes": ["clip", "hierd"]},
        "stream": ["--samples", "8", "--rounds", "1", "--sizes", "64", "--batch", "4", "--no-flops"],
    },
}


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    cap_s: float  # its own time cap on the GPU machine
    min_s: float  # not started with less than this left of the budget


PARTS = [
    Part("env", "versions and device", 60, 10),
    Part("search", "3. eval-retrieval search, GPU vs CPU", 90, 15),
    Part("tests", "GPU tests (pytest -m gpu)", 120, 20),
    Part("cache", "1. cache-teacher vs the teacher's forward", 150, 40),
    Part("distill", "2. distill step times", 180, 40),
    Part("distill-extra", "2. distill: FLOP utilisation and data stream", 90, 20),
    Part("stream", "4. the data stream at real resolution, --decode gpu", 120, 30),
    Part("cache-profile", "1. cache-teacher: where the time goes", 90, 25),
]


# ==================================================================================
# Children: `run_gpu.py --worker NAME --cfg JSON` prints its result as the last line
# ==================================================================================


def emit(data: dict) -> None:
    print(RESULT + json.dumps(_finite(data)), flush=True)


def _finite(x):
    """JSON has no NaN/Inf: they become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _cuda_memory() -> dict | None:
    """Peak memory of this process's CUDA allocator, in GB (None if CUDA never started)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    gb = 1e9
    return {"max_allocated_gb": round(torch.cuda.max_memory_allocated() / gb, 2),
            "max_reserved_gb": round(torch.cuda.max_memory_reserved() / gb, 2),
            "device_total_gb": round(torch.cuda.get_device_properties(0).total_memory / gb, 1)}


def worker_env(cfg: dict) -> int:
    import platform
    from importlib.metadata import version

    import numpy
    import torch

    import hierdctl

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "numpy": numpy.__version__, "open_clip": version("open_clip_torch"), "hierdctl": hierdctl.__version__,
            "cpus": os.cpu_count(), "cuda_available": torch.cuda.is_available(), "device_name": None}
    if os.path.isdir("/dev/shm"):  # DataLoader workers hand samples over through it (16 workers: ~300 MB)
        import shutil

        info["shm_gb"] = round(shutil.disk_usage("/dev/shm").total / 1e9, 1)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info |= {"device_name": torch.cuda.get_device_name(0), "devices": torch.cuda.device_count(),
                 "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
                 "memory_gb": round(p.total_memory / 1e9, 1), "bf16": torch.cuda.is_bf16_supported()}
    try:
        import faiss

        from hierdctl.retrieval import faiss_gpus

        info |= {"faiss": faiss.__version__, "faiss_gpus": faiss_gpus()}
    except ImportError as e:
        info["faiss"] = f"missing ({e})"
    print(json.dumps(info, indent=1))
    emit(info)
    return 0


def _best_of(fn, repeat: int, sync) -> float:
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def worker_search(cfg: dict) -> int:
    """FAISS exact search on the CPU against torch on the GPU (and FAISS on the GPU if it can)."""
    import faiss
    import numpy as np
    import torch

    from hierdctl.retrieval import build_index, faiss_gpus, search

    n, d, q, k, repeat = cfg["n"], cfg["d"], cfg["q"], cfg["k"], cfg["repeat"]
    threads = os.cpu_count() or 1
    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((n, d), dtype=np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = rng.standard_normal((q, d), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    res: dict = {"n": n, "d": d, "q": q, "k": k, "repeat": repeat, "cpu_threads": threads, "skipped": []}

    # Exactness: the scores of the returned ids against brute force in float64, on a sample.
    sample = np.arange(min(q, cfg["check_queries"]))
    g64, q64 = gallery.astype(np.float64), queries[sample].astype(np.float64)
    exact = -np.sort(-(q64 @ g64.T), axis=1)[:, :k]  # (S,k) the exact top-k scores

    def score_gap(ids: np.ndarray) -> float:
        got = np.einsum("qd,qkd->qk", q64, g64[ids[sample]])  # (S,k) scores of the returned ids
        return float(np.abs(got - exact).max())

    index, _ = build_index(gallery, "flat", k, use_gpu=False)
    search(index, queries[:16], k)  # warm-up
    out = {}
    t_cpu = _best_of(lambda: out.__setitem__("cpu", search(index, queries, k)), repeat, lambda: None)
    res |= {"faiss_cpu_s": t_cpu, "faiss_cpu_qps": q / t_cpu, "faiss_cpu_score_gap": score_gap(out["cpu"])}

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if not cuda:
        res["skipped"].append("torch search on the GPU (no CUDA): torch on the CPU stands in")
    g = torch.from_numpy(gallery).to(dev)  # the "index": the gallery resident on the device

    def torch_search():
        ids = []
        with torch.inference_mode():
            for a in range(0, q, 4096):  # (4096,N) score blocks keep memory bounded
                s = torch.from_numpy(queries[a : a + 4096]).to(dev) @ g.T
                ids.append(s.topk(k, dim=1).indices)
        out["torch"] = torch.cat(ids).cpu().numpy()

    torch_search()  # warm-up (cuBLAS handles, kernels)
    t_torch = _best_of(torch_search, repeat, sync)
    res |= {"torch_device": dev, "torch_s": t_torch, "torch_qps": q / t_torch,
            "torch_score_gap": score_gap(out["torch"]),
            "torch_same_ids": float((out["torch"] == out["cpu"]).all(axis=1).mean()),
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32)}
    res["faiss_gpus"] = faiss_gpus()
    if res["faiss_gpus"]:
        gindex, info = build_index(gallery, "flat", k, use_gpu=True)
        search(gindex, queries[:16], k)
        t_fg = _best_of(lambda: out.__setitem__("fgpu", search(gindex, queries, k)), repeat, lambda: None)
        res |= {"faiss_gpu_s": t_fg, "faiss_gpu_qps": q / t_fg, "faiss_gpu_score_gap": score_gap(out["fgpu"]),
                "faiss_gpu_same_ids": float((out["fgpu"] == out["cpu"]).all(axis=1).mean())}
    else:
        res["skipped"].append("FAISS on the GPU: faiss-gpu is not installed (faiss-cpu only)")
    res["memory"] = _cuda_memory()
    print(json.dumps(res, indent=1))
    emit(res)
    return 0


class _Tee(io.TextIOBase):
    """Writes go to the stream and into a buffer (a bench script's output, kept to parse)."""

    def __init__(self, stream):
        self.stream, self.buf = stream, io.StringIO()

    def write(self, s):
        self.stream.write(s)
        self.stream.flush()
        self.buf.write(s)
        return len(s)

    def flush(self):
        self.stream.flush()


def worker_bench(cfg: dict) -> int:
    """Run a bench script in this process (so its peak GPU memory can be read afterwards)."""
    import runpy

    script = REPO / cfg["script"]
    sys.argv = [str(script)] + cfg["argv"]
    out, err = _Tee(sys.stdout), _Tee(sys.stderr)
    real = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    code = 0
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.stdout, sys.stderr = real
    res = {"exit": code, "argv": cfg["argv"], "stdout": out.buf.getvalue(), "memory": _cuda_memory()}
    js = [ln for ln in err.buf.getvalue().splitlines() if ln.startswith("{")]
    res["json"] = json.loads(js[-1]) if js else None
    if cfg.get("profile"):
        res["profile"] = profile_summary(Path(cfg["profile"]))
    emit(res)
    return code


def profile_summary(path: Path) -> dict:
    """cache-teacher's main process from a cProfile dump: hierdctl's and the DataLoader's
    functions by cumulative time, and the top self-time entries (waiting shows as lock acquire)."""
    import pstats

    st = pstats.Stats(str(path)).stats  # {(file, line, func): (cc, nc, tottime, cumtime, callers)}
    total = max((v[3] for (f, _, fn), v in st.items() if fn == "run" and f.endswith("cache_teacher.py")), default=None)
    total = total or max(v[3] for v in st.values())

    def label(f, ln, fn):
        if f == "~":
            return fn
        parts = Path(f).parts
        return f"{'/'.join(parts[-2:])}:{ln}({fn})"

    def cum(file_end: str, func: str) -> float | None:
        hits = [v[3] for (f, _, fn), v in st.items() if fn == func and f.endswith(file_end)]
        return max(hits) if hits else None

    # The stage's own steps, top to bottom (a function missing from the profile is left out).
    steps = [("set-up: load the teacher", "specs.py", "load_encoder"),
             ("set-up: fingerprint its weights", "specs.py", "fingerprint"),
             ("waiting for decoded samples (DataLoader.__next__)", "dataloader.py", "__next__"),
             ("teacher batches (_Batcher.flush: process + bookkeeping)", "cache_teacher.py", "flush"),
             ("of which image forward (encode_image)", "specs.py", "encode_image"),
             ("of which text forward (_Teacher.text)", "cache_teacher.py", "text"),
             ("of which k-means (spherical_kmeans)", "cluster.py", "spherical_kmeans"),
             ("writing shards (write_shard)", "cache_format.py", "write_shard"),
             ("manifest (write_manifest)", "cache_format.py", "write_manifest")]
    breakdown = [(what, t) for what, f, fn in steps if (t := cum(f, fn)) is not None]
    ours = [(label(*key), v[3]) for key, v in st.items()
            if any(s in key[0] for s in ("hierdctl", "stages", "torch/utils/data")) and v[3] >= 0.02 * total]
    ours.sort(key=lambda x: -x[1])
    self_time = sorted(((label(*key), v[2]) for key, v in st.items()), key=lambda x: -x[1])[:10]
    return {"total_s": total, "breakdown": breakdown, "cumulative": ours[:15], "self": self_time}


def worker_distill_extra(cfg: dict) -> int:
    """FLOPs of one training step per recipe (forward + backward, FlopCounterMode), the step
    time in the same process, and the data stream alone (Trainer.loader, no step)."""
    import dataclasses
    import gc

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from hierdctl import cache_format, distributed
    from hierdctl.losses.registry import load_recipe
    from hierdctl.stages import distill as S

    work = Path(cfg["work"])
    cache = cache_format.open_cache(work / "cache")
    env = distributed.resolve()
    device = distributed.resolve_device(cfg["device"], env)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    peak = cfg.get("peak_tflops")
    res: dict = {"recipes": {}, "stream": {}, "peak_tflops": peak, "skipped": []}
    if peak is None:
        res["skipped"].append("MFU: no bf16 peak known for this device (give --peak-tflops)")
    B = cfg["batch_size"]
    for name in cfg["recipes"]:
        c = S.resolve_config(dict(cache=str(work / "cache"), student=f"open_clip:{work / 'student.json'}",
                                  recipe=name, out=str(work / "unused"), steps=10_000, batch_size=B, lr=1e-4,
                                  warmup=100, device=cfg["device"], precision=cfg["precision"], workers=0, quiet=True))
        tr = S.build_trainer(c, cache, load_recipe(name), env, device)
        tr.wrapper.train()
        batch = tr.to_device(next(iter(tr.loader(0))))
        tr.step(batch, 0)  # warm-up
        sync()
        with FlopCounterMode(display=False) as fc:
            tr.step(batch, 1)
        flops = fc.get_total_flops()
        times = []
        for i in range(cfg["timed_steps"]):
            sync()
            t0 = time.perf_counter()
            tr.step(batch, 2 + i)
            sync()
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        r = {"flops": flops, "step_s": t, "tflops_per_s": flops / t / 1e12}
        if peak:
            r["mfu"] = flops / t / (peak * 1e12)
        res["recipes"][name] = r
        if name in cfg["stream_recipes"]:
            # The data stream alone, consumed as fast as it comes. Its first round (one batch
            # per worker, made in parallel while the workers start) is not timed: after it,
            # batches come at the workers' steady rate.
            tr.cfg = dataclasses.replace(tr.cfg, workers=cfg["stream_workers"])
            # Trainer.loader reads tr.data.workers (resolved by build_trainer from workers=0 above), not
            # tr.cfg.workers: set it, with the --workers -1 rule, or the stream runs without workers.
            from hierdctl.loader import workers_for

            tr.data.workers = workers_for(cfg["stream_workers"])
            loader = tr.loader(0)
            warm = max(1, loader.num_workers)
            t0 = time.perf_counter()
            it = iter(loader)
            for _ in range(warm):
                next(it)
            t1 = time.perf_counter()
            for _ in range(cfg["stream_batches"]):
                next(it)
            t2 = time.perf_counter()
            res["stream"][name] = {"workers": loader.num_workers, "warm_batches": warm,
                                   "batches": cfg["stream_batches"],
                                   "samples_per_s": cfg["stream_batches"] * B / (t2 - t1), "warm_s": t1 - t0,
                                   "step_samples_per_s": B / t}
            del it, loader
        print(f"{name}: {flops / 1e12:.3f} TFLOP/step, {t * 1e3:.1f} ms/step"
              + (f", stream {res['stream'][name]['samples_per_s']:.0f} samples/s" if name in res["stream"] else ""),
              flush=True)
        del tr, batch
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    res["memory"] = _cuda_memory()
    emit(res)
    return 0


WORKERS = {"env": worker_env, "search": worker_search, "bench": worker_bench, "distill-extra": worker_distill_extra}


# ==================================================================================
# The driver: parts in order, each a child process under its cap
# ==================================================================================


def run_child(cmd: list[str], timeout: float, log, env: dict) -> tuple[str, int | None, float, str]:
    """Run cmd with its output appended to `log`; kill its whole process group (DataLoader
    workers included) at `timeout`. Returns (status, exit code, seconds, its output)."""
    log.flush()
    start_off = log.tell()
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    status = "ok"
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        status = "timeout"
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    seconds = time.time() - t0
    log.flush()
    with open(log.name, encoding="utf-8", errors="replace") as f:
        f.seek(start_off)
        text = f.read()
    if status == "ok" and p.returncode != 0:
        status = "failed"
    return status, p.returncode, seconds, text


def parse_result(text: str) -> dict | None:
    lines = [ln for ln in text.splitlines() if ln.startswith(RESULT)]
    return json.loads(lines[-1][len(RESULT):]) if lines else None


def parse_distill_table(text: str) -> dict:
    """bench_distill.py's markdown table -> {recipe: {...}, online_s, teacher_s, online_target}."""
    num = r"(nan|[\d.]+)"
    out: dict = {"recipes": {}}
    # columns: run | step | samples/s | vs student-only | target | vs clip-kd | vs online | e2e | steady
    for m in re.finditer(rf"^\| `([^`]+)` from cache \| {num} \| {num} \| {num}× \|[^|]*\| ([^|]*) \| "
                         rf"{num} \([^)]*\) \| {num} \| {num} \|", text, re.M):
        name, step, sps, rel, vs_kd, vs_online, e2e, steady = m.groups()
        kd = re.match(r"(nan|[\d.]+)×", vs_kd.strip())
        out["recipes"][name] = {"step_s": float(step), "samples_per_s": float(sps), "vs_clip": float(rel),
                                "vs_clip_kd": float(kd.group(1)) if kd else None,
                                "vs_online_speed": float(vs_online), "e2e_samples_per_s": float(e2e),
                                "e2e_steady_samples_per_s": float(steady)}
    for key, pat in (("online_s", r"^\| open_clip online[^|]*\| ([\d.]+) \|"),
                     ("teacher_s", r"^\| teacher forward alone \| ([\d.]+) \|"),
                     ("online_target", r"online target = 0\.9·\(T_teacher\+T_student\)/T_student = (\d+\.\d+)")):
        m = re.search(pat, text, re.M)
        out[key] = float(m.group(1)) if m else None
    head = re.search(r"^student .*$", text, re.M)
    out["settings"] = head.group(0) if head else None
    return out


def parse_pytest(text: str) -> dict:
    counts = {w: int(n) for n, w in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)",
                                               text.strip().splitlines()[-1] if text.strip() else "")}
    tests = re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", text, re.M)
    skips: dict[str, int] = {}
    for n, why in re.findall(r"^SKIPPED \[(\d+)\] [^:]+:\d+: ([^\n]+)", text, re.M):
        skips[why] = skips.get(why, 0) + int(n)
    return {"counts": counts, "tests": tests, "skip_reasons": skips}


def peak_for(name: str | None, override: float | None) -> float | None:
    if override:
        return override
    for key, v in PEAK_BF16_TFLOPS.items():
        if name and key in name:
            return v
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder for summary.md, results.json, log.txt, pytest.txt (required)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: exercises every part (make test)")
    ap.add_argument("--budget", type=float, default=None, help="total seconds for all parts [420; 600 with --smoke]")
    ap.add_argument("--only", default=None, help="comma-separated parts to run besides env (others are skipped)")
    ap.add_argument("--cap", action="append", default=[], metavar="PART=SECONDS", help="another cap for one part")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak for MFU")
    ap.add_argument("--keep-work", action="store_true", help="keep the scratch folder (data, caches, runs)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cfg", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return WORKERS[args.worker](json.loads(args.cfg))
    if args.out is None:
        ap.error("--out is required")

    sizes = SIZES["smoke" if args.smoke else "gpu"]
    # The smoke run takes ~30 s on 2 idle cores; its budget only guards against a hang, since
    # make test may share the machine with anything.
    budget = args.budget if args.budget is not None else (600.0 if args.smoke else 420.0)
    caps = {p.name: p.cap_s for p in PARTS}
    for c in args.cap:
        name, _, sec = c.partition("=")
        if name not in caps:
            ap.error(f"--cap: unknown part {name!r} ({', '.join(caps)})")
        caps[name] = float(sec)
    only = set(args.only.split(",")) if args.only else None
    if only and only - set(caps):
        ap.error(f"--only: unknown part(s) {', '.join(sorted(only - set(caps)))} ({', '.join(caps)})")

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hierdctl-gpu-"))
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HIERDCTL_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
    command = os.environ.get("GPU_RUN_COMMAND") or shlex.join(["python", str(THIS.relative_to(REPO)), *sys.argv[1:]])
    started = time.time()
    deadline = started + budget
    results: dict = {"format": "hierdctl.gpu-run/1", "command": command, "smoke": args.smoke, "budget_s": budget,
                     "date": datetime.date.today().isoformat(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "commit": _git_commit(), "parts": {}}
    device = sizes["device"]
    log = open(out / "log.txt", "w", encoding="utf-8")

    def record(name: str, **kw):
        results["parts"][name] = kw
        results["seconds"] = round(time.time() - started, 1)
        _write(out / "results.json", json.dumps(_finite(results), indent=1))
        _write(out / "summary.md", summary_md(results))
        print(f"[{time.time() - started:6.1f}s] {name:14s} {kw['status']}"
              + (f" ({kw['seconds']:.1f} s)" if kw.get("seconds") is not None else "")
              + (f": {kw['reason']}" if kw.get("reason") else ""), flush=True)

    def py(worker: str, cfg: dict) -> list[str]:
        return [sys.executable, str(THIS), "--worker", worker, "--cfg", json.dumps(cfg)]

    for part in PARTS:
        name = part.name
        if only is not None and name not in only and name != "env":  # env always runs: it finds the device
            record(name, status="skipped", reason="not in --only")
            continue
        env_data = results["parts"].get("env", {}).get("data") or {}
        cuda = bool(env_data.get("cuda_available"))
        if name != "env" and not args.smoke and env_data and not cuda:
            record(name, status="skipped", reason="no CUDA device here (--smoke runs the toy sizes on the CPU)")
            continue
        cmd, log_to = None, log
        if name == "env":
            cmd = py("env", {})
        elif name == "search":
            cmd = py("search", sizes["search"])
        elif name == "tests":
            cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-v", "-rs",
                   "tests/test_gpu.py"]
        elif name == "cache":
            cmd = py("bench", {"script": "bench/bench_cache_teacher.py", "argv": sizes["cache"] + ["--device", device]})
        elif name == "distill":
            cmd = py("bench", {"script": "bench/bench_distill.py",
                               "argv": sizes["distill"] + ["--device", device, "--keep", str(work / "distill")]})
        elif name == "distill-extra":
            if not (work / "distill" / "cache" / "manifest.json").is_file():
                record(name, status="skipped", reason="needs the cache that part distill makes; it has none")
                continue
            recipes = list((results["parts"].get("distill", {}).get("data") or {}).get("recipes") or [])
            peak = peak_for(env_data.get("device_name"), args.peak_tflops)
            cmd = py("distill-extra", sizes["extra"] | {"work": str(work / "distill"), "device": device,
                                                        "recipes": recipes or ["clip"],
                                                        "peak_tflops": peak if cuda else None})
        elif name == "stream":
            cmd = py("bench", {"script": "bench/bench_stream.py", "argv": sizes["stream"] + ["--device", device]})
        elif name == "cache-profile":
            ratio = ((results["parts"].get("cache", {}).get("data") or {}).get("json") or {}).get("ratio")
            if ratio is None:
                record(name, status="skipped", reason="part cache gave no ratio")
                continue
            if ratio >= TARGETS["cache_ratio"] and not args.smoke:
                record(name, status="skipped", reason=f"cache-teacher's ratio {ratio:.2f} meets the target")
                continue
            prof = work / "cache.prof"
            cmd = py("bench", {"script": "bench/bench_cache_teacher.py", "profile": str(prof),
                               "argv": sizes["cache_profile"] + ["--device", device, "--profile", str(prof)]})
        left = deadline - time.time()
        if left < part.min_s:
            record(name, status="skipped",
                   reason=f"budget: {max(0.0, left):.0f} s left, the part needs ≥ {part.min_s:.0f} s")
            continue
        cap = min(caps[name], left)
        if name == "tests":
            log_to = open(out / "pytest.txt", "w", encoding="utf-8")
        print(f"\n===== {name}: {part.title} (cap {cap:.0f} s) =====\n$ {shlex.join(cmd)}\n", file=log, flush=True)
        status, code, seconds, text = run_child(cmd, cap, log_to, env)
        reason = None
        try:
            if name == "tests":
                log_to.close()
                last = text.strip().splitlines()[-1] if text.strip() else ""
                print(f"(pytest output in pytest.txt)\n{last}", file=log)
                data = parse_pytest(text)
            else:
                data = parse_result(text)
                if name == "distill" and data:
                    data["table"] = parse_distill_table(data.get("stdout", ""))
                    data["recipes"] = list(data["table"]["recipes"])
                    if not data["recipes"] and status == "ok":
                        status, reason = "failed", "bench_distill.py's table had no recipe row this script can read"
        except (ValueError, KeyError, TypeError) as e:  # a changed output format: say so, go on
            data, status, reason = None, "failed", f"could not read its output: {type(e).__name__}: {e}"
        if status == "timeout":
            reason = f"stopped at its cap of {cap:.0f} s"
        elif status == "failed":
            tail = [ln for ln in text.strip().splitlines() if ln.strip() and not ln.startswith(RESULT)][-1:]
            reason = f"exit {code}" + (f": {tail[0][:200]}" if tail else "")
        record(name, status=status, seconds=round(seconds, 1), cap_s=round(cap, 1), exit=code, reason=reason, data=data)

    log.close()
    if not args.keep_work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    print("\n" + summary_md(results))
    return 0


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _write(path: Path, text: str) -> None:
    sys.path.insert(0, str(REPO))
    from hierdctl.atomic import write_text_atomic

    write_text_atomic(path, text)


# ==================================================================================
# summary.md: the BENCHMARKS.md section
# ==================================================================================


def _f(x, fmt="{:.2f}", none="—"):
    return none if x is None else fmt.format(x)


def _mark(ok: bool | None) -> str:
    return "" if ok is None else (" ✓" if ok else " ✗")


def summary_md(r: dict) -> str:
    parts = r["parts"]
    env = parts.get("env", {}).get("data") or {}
    dev = env.get("device_name") or (f"CPU only ({env.get('cpus')} cores)" if env else "device unknown")
    title = "smoke run (toy sizes, not a measurement)" if r["smoke"] else "measured"
    L = [f"## On a GPU: {dev} — {r['date']} ({title})", ""]
    L.append(f"`{r['command']}`" + (f" at commit {r['commit']}" if r.get("commit") else "") + ": python "
             f"{env.get('python', '?')}, torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, "
             f"open_clip {env.get('open_clip', '?')}, faiss {env.get('faiss', '?')}, {env.get('cpus', '?')} CPU cores, "
             f"/dev/shm {env.get('shm_gb', '?')} GB. "
             "Every ratio is measured within this one run, with absolute figures beside it. Budget "
             f"{r['budget_s']:.0f} s, used {r.get('seconds', 0):.0f} s.")
    if env.get("shm_gb") is not None and env["shm_gb"] < 8:
        L.append(f"**/dev/shm holds only {env['shm_gb']} GB**: DataLoader workers hand their samples over through "
                 "it (cache-teacher with 16 workers: ~0.3 GB in flight; distill with 8 workers at batch 256: ~5 GB), "
                 "so a bus error or 'No space left on device' in parts cache or distill comes from there.")
    L.append("")

    def status_line(name):
        p = parts.get(name)
        if p is None:
            return "*not run yet*"
        if p["status"] == "ok":
            return None
        return f"*{name}: {p['status']}" + (f" — {p['reason']}" if p.get("reason") else "") + "*"

    # --- tests
    L += ["### GPU tests", ""]
    t = parts.get("tests", {})
    if t.get("data"):
        c = t["data"]["counts"]
        L.append("`pytest -m gpu tests/test_gpu.py`: "
                 + (", ".join(f"{v} {k}" for k, v in c.items()) or "no summary line")
                 + (f" in {t['seconds']:.0f} s" if t.get("seconds") else "") + ".")
        for name, outcome in t["data"]["tests"]:
            L.append(f"- `{name.split('::', 1)[1]}`: {outcome}")
        for why, n in t["data"]["skip_reasons"].items():
            L.append(f"- {n} skipped: {why}")
    s = status_line("tests")
    if s:
        L.append(s)
    L.append("")

    # --- 1. cache-teacher
    L += ["### 1. cache-teacher against the teacher's forward pass alone", ""]
    c = parts.get("cache", {}).get("data") or {}
    j = c.get("json") or {}
    if j:
        head = re.search(r"^\*\*cache-teacher vs forward alone\*\* — (.*)$", c.get("stdout", ""), re.M)
        if head:
            L += [head.group(1), ""]
        ratio = j.get("ratio")
        mem = c.get("memory") or {}
        L += ["| measure | value |", "|---|---:|",
              f"| teacher forward alone | {_f(j.get('forward_samples_per_s'), '{:,.1f}')} samples/s |",
              f"| cache-teacher, steady state | {_f(j.get('cache_samples_per_s'), '{:,.1f}')} samples/s |",
              f"| **ratio** (target ≥ {TARGETS['cache_ratio']}) | **{_f(ratio)}**"
              f"{_mark(None if ratio is None else ratio >= TARGETS['cache_ratio'])} |",
              f"| ratio, end to end (model load and fingerprint included) | {_f(j.get('ratio_end_to_end'))} |",
              f"| peak GPU memory, allocated / reserved (of {_f(mem.get('device_total_gb'), '{:.0f}')} GB) | "
              f"{_f(mem.get('max_allocated_gb'))} / {_f(mem.get('max_reserved_gb'))} GB |", ""]
    s = status_line("cache")
    if s:
        L += [s, ""]
    cp = parts.get("cache-profile", {})
    prof = (cp.get("data") or {}).get("profile")
    if prof:
        tot = prof["total_s"]
        argv = cp["data"].get("argv") or []
        if "--profile" in argv:  # the scratch path says nothing
            i = argv.index("--profile")
            argv = argv[:i] + argv[i + 2:]
        L += [f"Where the time goes: cProfile of cache-teacher's main process in a second, smaller run "
              f"(`{shlex.join(argv)}`), {tot:.1f} s in `run` (GPU work shows where the CPU waits for it, "
              "e.g. in `.cpu()`):", "", "| step (cumulative time) | s | % of run |", "|---|---:|---:|"]
        L += [f"| {n} | {v:.2f} | {100 * v / tot:.0f} % |" for n, v in prof.get("breakdown", [])]
        L += ["", "| self time, top 10 | s | % of run |", "|---|---:|---:|"]
        L += [f"| `{n}` | {v:.2f} | {100 * v / tot:.0f} % |" for n, v in prof["self"]]
        L.append("")
    elif cp:
        L += [f"*cache-profile: {cp['status']}" + (f" — {cp['reason']}" if cp.get("reason") else "") + "*", ""]

    # --- 2. distill
    L += ["### 2. distill: step times from the cache, online distillation, FLOP utilisation, data stream", ""]
    d = parts.get("distill", {}).get("data") or {}
    tb = d.get("table") or {}
    ex = parts.get("distill-extra", {}).get("data") or {}
    if tb.get("recipes"):
        if tb.get("settings"):
            L += [tb["settings"], ""]
        tgt = tb.get("online_target")
        L += [f"| run | step (s) | samples/s | vs `clip` | target | from-cache / online speed (target ≥ {_f(tgt)}) "
              "| TFLOP per step | MFU |", "|---|---:|---:|---:|---|---:|---:|---:|"]
        for name, row in tb["recipes"].items():
            e = (ex.get("recipes") or {}).get(name, {})
            limit = TARGETS.get(name, 0)
            target = "—" if name == "clip" else f"≤ {limit:.2f}{_mark(row['vs_clip'] <= limit)}"
            on = row["vs_online_speed"]
            L.append(f"| `{name}` from cache | {row['step_s']:.4f} | {row['samples_per_s']:,.0f} | "
                     f"{row['vs_clip']:.2f}× | "
                     f"{target} | {_f(on)}{_mark(None if (on is None or tgt is None) else on >= tgt)} | "
                     f"{_f(e.get('flops') and e['flops'] / 1e12, '{:.3g}')} | {_f(e.get('mfu'), '{:.1%}')} |")
        if tb.get("online_s"):
            L.append(f"| open_clip online (teacher forward + `DistillClipLoss` step) | {tb['online_s']:.4f} | — | "
                     f"{tb['online_s'] / tb['recipes']['clip']['step_s']:.2f}× | — | 1.00 | — | — |")
        if tb.get("teacher_s"):
            L.append(f"| teacher forward alone | {tb['teacher_s']:.4f} | — | "
                     f"{tb['teacher_s'] / tb['recipes']['clip']['step_s']:.2f}× | — | — | — | — |")
        mem = d.get("memory") or {}
        L += ["", f"MFU = FLOPs of one step (FlopCounterMode: forward + backward matmuls, convolutions, attention) / "
              f"median step time (distill-extra's own timing, same process) / "
              f"{_f(ex.get('peak_tflops'), '{:.1f}', 'an unknown')} TFLOP/s dense bf16 peak. "
              f"Peak GPU memory of the bench: {_f(mem.get('max_allocated_gb'))} GB allocated.", ""]
    s = status_line("distill")
    if s:
        L += [s, ""]
    if ex.get("stream") or tb.get("recipes"):
        L += ["| recipe | data stream alone (samples/s) | training step (samples/s) | stream / step | "
              "end to end, steady (samples/s) | end to end / step |", "|---|---:|---:|---:|---:|---:|"]
        for name, row in tb.get("recipes", {}).items():
            st = (ex.get("stream") or {}).get(name)
            e2e = row.get("e2e_steady_samples_per_s")
            sr = st and st["samples_per_s"] / row["samples_per_s"]
            L.append(f"| `{name}` | {_f(st and st['samples_per_s'], '{:,.0f}')}"
                     + (f" ({st['workers']} workers)" if st else "")
                     + f" | {row['samples_per_s']:,.0f} | {_f(sr)}{_mark(None if sr is None else sr >= 1)} | "
                     f"{_f(e2e, '{:,.0f}')} | {_f(e2e and e2e / row['samples_per_s'])} |")
        L += ["", "The stream is not the bottleneck where stream / step ≥ 1; where it is below 1, training from the "
              "cache waits on it by that factor.", ""]
    s = status_line("distill-extra")
    if s:
        L += [s, ""]
    for why in ex.get("skipped", []):
        L += [f"- skipped: {why}"]

    # --- 4. the data stream
    L += ["### 4. The data stream at real resolution (bench/bench_stream.py)", ""]
    st = parts.get("stream", {}).get("data") or {}
    if st.get("stdout"):
        L += [ln for ln in st["stdout"].strip().splitlines() if not ln.startswith("WARNING")]
        L.append("")
    s = status_line("stream")
    if s:
        L += [s, ""]

    # --- 3. search
    L += ["", "### 3. eval-retrieval search on the GPU against the CPU", ""]
    q = parts.get("search", {}).get("data") or {}
    if q:
        shape = f"{q['n']:,} × {q['d']} gallery, {q['q']:,} queries, top-{q['k']}, best of {q['repeat']}"
        L += [f"{shape}; FAISS with {q['cpu_threads']} CPU threads.", "",
              "| search | time (s) | queries/s | speed vs FAISS CPU | max score error vs float64 brute force |",
              "|---|---:|---:|---:|---:|",
              f"| FAISS `IndexFlatIP`, CPU (eval-retrieval's index) | {q['faiss_cpu_s']:.4f} | "
              f"{q['faiss_cpu_qps']:,.0f} | "
              f"1.00× | {q['faiss_cpu_score_gap']:.1e} |",
              f"| torch matmul + topk, {q['torch_device'].upper()} | {q['torch_s']:.4f} | {q['torch_qps']:,.0f} | "
              f"{q['faiss_cpu_s'] / q['torch_s']:.1f}× | {q['torch_score_gap']:.1e} |"]
        if q.get("faiss_gpu_s"):
            L.append(f"| FAISS `GpuIndexFlatIP` | {q['faiss_gpu_s']:.4f} | {q['faiss_gpu_qps']:,.0f} | "
                     f"{q['faiss_cpu_s'] / q['faiss_gpu_s']:.1f}× | {q['faiss_gpu_score_gap']:.1e} |")
        L += ["", f"Queries with the same top-{q['k']} ids as FAISS on the CPU: {q['torch_same_ids']:.2%} (torch)"
              + (f", {q['faiss_gpu_same_ids']:.2%} (FAISS GPU)" if q.get("faiss_gpu_same_ids") is not None else "")
              + f"; TF32 matmuls {'on' if q.get('tf32_matmul') else 'off'} (exact fp32)."]
        for why in q.get("skipped", []):
            L.append(f"- skipped: {why}")
    s = status_line("search")
    if s:
        L += ["", s]

    # --- what did not run
    skipped = [(n, p) for n, p in parts.items() if p["status"] != "ok"]
    if skipped:
        L += ["", "### Not measured in this run", ""]
        L += [f"- {n}: {p['status']}" + (f" — {p['reason']}" if p.get("reason") else "") for n, p in skipped]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
