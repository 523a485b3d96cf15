"""Soak: one long distill run on the demo cache, watched from inside (docs/reliability.md).

    python bench/soak_distill.py [--work runs/soak] [--epochs 20] [--save-every 5] [--n-train 3000]

Builds the demo's benchmark and teacher cache (examples/demo.py's default options; --n-train
and --batch-size shrink it to fit a shared machine) unless WORK/cache exists, then runs `distill` in this process for --epochs epochs with a
checkpoint every --save-every steps and DataLoader workers, sampling at the end of every epoch:

* resident memory (VmRSS) of this process and of its DataLoader workers,
* open file descriptors of this process and its workers,
* the checkpoints on disk.

It passes when the resident memory after the last epoch is within 5 % of that after epoch 2
(the first epochs fill allocator pools and caches), the file descriptors are the same at every
epoch's end (the workers': at every epoch's end but the last, when they are already closing), and checkpoints/ holds exactly keep_checkpoints checkpoints (3 files each) and
latest.json. A run, not a test: its numbers go into docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))


def _status(pid: int) -> tuple[int, int]:
    """(resident memory in kB, open descriptors) of process `pid`."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def main(argv: list[str] | None = None) -> int:
    from demo import PRESETS, STUDENT, TEACHER

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/soak"))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--save-every", type=int, default=5)
    ap.add_argument("--keep", type=int, default=3, help="keep_checkpoints")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--recipe", default="hierd")
    ap.add_argument("--n-train", type=int, default=None, help="training images [the demo's 3000]")
    ap.add_argument("--batch-size", type=int, default=None, help="[the demo's 128]")
    ap.add_argument("--trim", action="store_true", help="also measure the resident memory after glibc's "
                    "malloc_trim(0) at every epoch's end: memory freed but kept by the allocator vs memory in use")
    args = ap.parse_args(argv)
    p, w = dict(PRESETS["default"]), args.work
    p.update({k: v for k, v in (("n_train", args.n_train), ("batch_size", args.batch_size)) if v is not None})
    w.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"HIERDCTL_NO_PROGRESS": "1"}
    cli = [sys.executable, "-m", "hierdctl.cli"]
    if not (w / "cache" / "manifest.json").is_file():  # the demo's benchmark and cache, its sizes and options
        subprocess.run([*cli, "scenes", "--out", str(w / "scenes"), "--n-train", str(p["n_train"]), "--n-test",
                        str(p["n_test"]), "--shard-size", str(p["n_train"] // 4)], check=True, env=env)
        subprocess.run([*cli, "cache-teacher", str(w / "scenes" / "train"), "--out", str(w / "cache"), "--teacher",
                        f"local-dir:{TEACHER}", "--views", str(p["views"]), "--clusters", str(p["clusters"]),
                        "--max-phrases", str(p["max_phrases"]), "--batch-size", "128", "--quiet"], check=True, env=env)

    from hierdctl import faults
    from hierdctl.stages import distill as S

    cfg = S.resolve_config(dict(cache=str(w / "cache"), out=str(w / "run"), student=f"open_clip:{STUDENT}",
                                recipe=args.recipe, epochs=float(args.epochs), batch_size=p["batch_size"], lr=p["lr"],
                                warmup=p["warmup"], workers=args.workers, save_every=args.save_every,
                                keep_checkpoints=args.keep, overwrite=True, quiet=True))
    samples = json.loads((w / "cache" / "manifest.json").read_text())["samples"]
    per_epoch = samples // p["batch_size"]
    rows: list[dict] = []
    real_point = faults.point
    t0 = time.time()

    def point(name: str) -> None:  # distill:step:S, after optimizer step S
        real_point(name)
        if name.startswith("distill:step:") and int(name.rsplit(":", 1)[1]) % per_epoch == 0:
            step = int(name.rsplit(":", 1)[1])
            me = os.getpid()
            rss, fds = _status(me)
            workers = [_status(c) for c in _children(me)]
            trimmed = {}
            if args.trim:
                import ctypes

                ctypes.CDLL("libc.so.6").malloc_trim(0)
                trimmed = {"rss_trimmed_mb": round(_status(me)[0] / 1024, 1)}
            rows.append(trimmed | {"epoch": step // per_epoch, "step": step, "seconds": round(time.time() - t0, 1),
                         "rss_mb": round(rss / 1024, 1), "fds": fds, "workers": len(workers),
                         "workers_rss_mb": round(sum(r for r, _ in workers) / 1024, 1),
                         "workers_fds": sum(f for _, f in workers),
                         "checkpoints": sorted(x.name for x in (w / "run" / "checkpoints").glob("step-*.json"))})
            print(json.dumps(rows[-1]), flush=True)

    faults.point = point
    summary = S.run(cfg)
    ck = sorted(x.name for x in (w / "run" / "checkpoints").iterdir())
    second, last = rows[1], rows[-1]
    growth = (last["rss_mb"] - second["rss_mb"]) / second["rss_mb"]
    wgrowth = ((last["workers_rss_mb"] - second["workers_rss_mb"]) / second["workers_rss_mb"]
               if second["workers_rss_mb"] else 0.0)
    result = {
        "epochs": args.epochs, "samples": samples, "batch_size": p["batch_size"], "recipe": args.recipe,
        "workers": args.workers, "steps": summary["steps"], "steps_per_epoch": per_epoch, "save_every": args.save_every,
        "checkpoints_written": summary["steps"] // args.save_every + (summary["steps"] % args.save_every > 0),
        "seconds": round(time.time() - t0, 1),
        "rss_mb_epoch2": second["rss_mb"], "rss_mb_last": last["rss_mb"], "rss_growth": round(growth, 4),
        **({"rss_trimmed_mb_epoch2": second["rss_trimmed_mb"], "rss_trimmed_mb_last": last["rss_trimmed_mb"],
            "rss_trimmed_growth": round((last["rss_trimmed_mb"] - second["rss_trimmed_mb"])
                                        / second["rss_trimmed_mb"], 4)} if args.trim else {}),
        "workers_rss_mb_epoch2": second["workers_rss_mb"], "workers_rss_mb_last": last["workers_rss_mb"],
        "workers_rss_growth": round(wgrowth, 4),
        # The last row is taken after the final step: the loader is exhausted and its workers are
        # already closing their files, so their descriptors are compared over the epochs before it.
        "fds": sorted({r["fds"] for r in rows}), "workers_fds": sorted({r["workers_fds"] for r in rows[:-1]}),
        "workers_fds_after_the_last_step": rows[-1]["workers_fds"],
        "checkpoint_files": ck, "keep_checkpoints": args.keep, "rows": rows,
    }
    ok = (abs(growth) <= 0.05 and abs(wgrowth) <= 0.05 and len(result["fds"]) == 1
          and len(result["workers_fds"]) == 1 and len([c for c in ck if c.endswith(".json") and c != "latest.json"])
          == args.keep and len(ck) == 3 * args.keep + 1)
    result["passed"] = ok
    (w / "soak.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
