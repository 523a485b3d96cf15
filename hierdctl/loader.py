"""DataLoader workers and batches in flight sized to the machine: the one `--workers -1` rule.

A GPU step of a small student takes less time than one core needs to prepare a batch, so
distill's stream needs every core it may use (BENCHMARKS.md, "The data stream at real
resolution"); the rules before it (min(8, cpu_count // world_size - 1) in distill, min(8, cpu_count - 1) in cache-teacher) capped a 16-core machine
at 8 workers, counted cores this process may not run on (cgroup cpusets, taskset), and divided
by the number of processes of every node, not of this one.

DataLoader workers hand their batches to the main process through shared memory
(/dev/shm): workers × prefetch_factor batches are in flight, which at batch 256 and 224 px
(154 MB of float pixels a batch) is gigabytes, and a container's default 64 MB /dev/shm
ends in a bus error. The prefetch is therefore the most batches per worker, up to 4, that
keep the batches in flight within a memory budget (half of /dev/shm, at most 8 GiB), and at
least 1.
"""

from __future__ import annotations

import os
import shutil

MAX_PREFETCH = 4  # batches per worker: enough to absorb one slow batch (a large image, a cold read)
SHM_BUDGET_CAP = 8 * 2**30


def available_cpus() -> int:
    """Cores this process may run on (its CPU affinity: cpusets, taskset), else os.cpu_count()."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def local_processes() -> int:
    """Training processes on this node: torchrun's LOCAL_WORLD_SIZE, else 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def shm_budget() -> int:
    """Bytes of batches in flight allowed: half of /dev/shm, at most 8 GiB (8 GiB without /dev/shm)."""
    try:
        return min(SHM_BUDGET_CAP, shutil.disk_usage("/dev/shm").total // 2)
    except OSError:
        return SHM_BUDGET_CAP


def workers_for(requested: int, cpus: int | None = None, processes: int | None = None) -> int:
    """DataLoader workers per training process: `requested` when ≥ 0; for -1, this node's usable
    cores shared by its training processes, less one per process for its own main loop."""
    if requested >= 0:
        return requested
    cpus = available_cpus() if cpus is None else cpus
    processes = local_processes() if processes is None else processes
    return max(0, cpus // max(1, processes) - 1)


def prefetch_for(workers: int, batch_bytes: int, budget: int | None = None) -> int | None:
    """DataLoader's prefetch_factor: None without workers; else the most batches per worker, up
    to MAX_PREFETCH, whose workers × prefetch × batch_bytes fit the budget, and at least 1."""
    if workers <= 0:
        return None
    budget = shm_budget() if budget is None else budget
    fit = budget // max(1, workers * batch_bytes)
    return int(max(1, min(MAX_PREFETCH, fit)))


def batch_bytes(local_batch: int, image_size: int, decode: str = "cpu", jpeg_bytes: int = 150_000) -> int:
    """Shared-memory bytes of one loader batch, roughly: its pixels (float32, 3×S×S a sample) on
    the CPU path, its JPEG bytes with --decode gpu; plus ~8 kB a sample of tokens and features."""
    per = (jpeg_bytes if decode == "gpu" else 3 * image_size * image_size * 4) + 8_192
    return local_batch * per
