"""bench/gpu/run_gpu.py cannot rot: its smoke run (every part at toy sizes, on the CPU)
runs in make test, and its budget and per-part caps do what they say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "bench" / "gpu" / "run_gpu.py"
PARTS = ["env", "search", "tests", "cache", "distill", "distill-extra", "stream", "cache-profile"]


def _run(out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HIERDCTL_NO_PROGRESS": "1"}
    env.pop("GPU_RUN_COMMAND", None)
    return subprocess.run([sys.executable, str(RUN), "--out", str(out), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_smoke_run_exercises_every_part(tmp_path):
    p = _run(tmp_path, "--smoke")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # Few files, all small: the device tool brings back at most 8 files of at most 16 MiB.
    files = sorted(f.name for f in tmp_path.iterdir())
    assert files == ["log.txt", "pytest.txt", "results.json", "summary.md"], files
    assert all((tmp_path / f).stat().st_size < 16 * 2**20 for f in files)

    r = _results(tmp_path)
    parts = r["parts"]
    assert list(parts) == PARTS
    assert {n: q["status"] for n, q in parts.items()} == dict.fromkeys(PARTS, "ok"), {
        n: q.get("reason") for n, q in parts.items()}
    assert r["smoke"] and r["seconds"] <= r["budget_s"]

    assert parts["env"]["data"]["cuda_available"] is False and parts["env"]["data"]["torch"]
    # Every GPU test is collected and skipped here; none fails, none passes without a GPU.
    counts = parts["tests"]["data"]["counts"]
    assert counts.get("skipped", 0) >= 7 and set(counts) == {"skipped"}, counts
    assert parts["tests"]["data"]["skip_reasons"] == {"needs a CUDA device": counts["skipped"]}

    s = parts["search"]["data"]
    assert s["torch_device"] == "cpu" and s["torch_same_ids"] == 1.0
    assert s["faiss_cpu_score_gap"] < 1e-5 and s["torch_score_gap"] < 1e-5
    assert any("no CUDA" in why for why in s["skipped"]) and any("faiss-gpu" in why for why in s["skipped"])

    j = parts["cache"]["data"]["json"]
    assert j["forward_samples_per_s"] > 0 and j["cache_samples_per_s"] > 0 and 0 < j["ratio"]
    assert parts["cache"]["data"]["memory"] is None  # no CUDA: no GPU memory to report

    t = parts["distill"]["data"]["table"]
    assert set(t["recipes"]) == {"clip", "hierd"}, t
    assert all(row["step_s"] > 0 and row["vs_online_speed"] > 0 for row in t["recipes"].values())
    assert t["online_s"] > 0 and t["teacher_s"] > 0 and t["online_target"] > 0.9

    ex = parts["distill-extra"]["data"]
    assert set(ex["recipes"]) == {"clip", "hierd"}
    assert ex["recipes"]["hierd"]["flops"] > ex["recipes"]["clip"]["flops"] > 0  # HieRD adds phrase forwards
    assert all(ex["stream"][n]["samples_per_s"] > 0 for n in ("clip", "hierd"))
    assert ex["peak_tflops"] is None and "mfu" not in ex["recipes"]["clip"]

    st = parts["stream"]["data"]["json"]
    assert st["per_core"]["64/before"] > 0 and st["per_core"]["64/gpu: worker part"] > 0
    assert st["device_decode"]["64"]["samples_per_s"] > 0 and st["device_decode"]["64"]["device"] == "cpu"

    prof = parts["cache-profile"]["data"]["profile"]
    assert prof["total_s"] > 0 and any("cache_teacher.py" in name for name, _ in prof["cumulative"])
    steps = dict(prof["breakdown"])
    assert 0 < steps["teacher batches (_Batcher.flush: process + bookkeeping)"] <= prof["total_s"]
    assert "waiting for decoded samples (DataLoader.__next__)" in steps and "writing shards (write_shard)" in steps

    md = (tmp_path / "summary.md").read_text()
    for piece in ("## On a GPU: CPU only", "smoke run", "`python bench/gpu/run_gpu.py --out ", " --smoke`",
                  "### GPU tests", "### 1. cache-teacher", "### 2. distill", "### 3. eval-retrieval search",
                  "| `hierd` from cache |", "skipped: torch search on the GPU (no CUDA)", "Where the time goes",
                  "### 4. The data stream at real resolution", "| gpu: worker part |"):
        assert piece in md, piece
    assert "Not measured" not in md
    assert (tmp_path / "pytest.txt").read_text().count("SKIPPED") >= 7


def test_an_exhausted_budget_skips_every_part_and_says_so(tmp_path):
    p = _run(tmp_path, "--smoke", "--budget", "0", timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    parts = _results(tmp_path)["parts"]
    assert list(parts) == PARTS and all(q["status"] == "skipped" and q["reason"] for q in parts.values())
    assert "budget: 0 s left" in parts["env"]["reason"]
    md = (tmp_path / "summary.md").read_text()
    assert md.split("### Not measured in this run")[1].count("— budget: 0 s left") == 6  # and 2 that need others
    assert "env" in p.stdout and "skipped: budget" in p.stdout


def test_a_part_past_its_cap_is_stopped_and_the_rest_goes_on(tmp_path):
    # A cap shorter than python's start-up: the child is killed at its cap, reported, and
    # the driver still writes every output.
    p = _run(tmp_path, "--smoke", "--only", "env,search", "--cap", "env=0.05", timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    parts = _results(tmp_path)["parts"]
    assert parts["env"]["status"] == "timeout" and "stopped at its cap" in parts["env"]["reason"]
    assert parts["search"]["status"] == "ok"
    assert {parts[n]["reason"] for n in PARTS[2:] if n not in ("distill-extra", "cache-profile")} == {"not in --only"}
    md = (tmp_path / "summary.md").read_text()
    assert "- env: timeout — stopped at its cap" in md
