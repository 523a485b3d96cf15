"""`make demo`: the whole hierdctl pipeline on the Scenes benchmark, on a CPU, in minutes.

It uses only the public commands, so it doubles as a tutorial; every command is printed
before it runs. The teacher is the small CLIP shipped in examples/teacher/ (trained on
Scenes images that the demo never uses, by examples/train_teacher.py). Four students of
one small architecture (examples/configs/scenes-student.json) are distilled from it with
the `clip` (no teacher), `clip-kd`, `clip-rd` and `hierd` (HieRD v2, docs/hierd.md) recipes,
on the same data, steps and learning rate, then exported and evaluated together with the teacher:

    hierdctl scenes          -> WORK/scenes/{train,test}     the benchmark
    hierdctl cache-teacher   -> WORK/cache                   the teacher runs once
    hierdctl distill  x4     -> WORK/runs/RECIPE             students, offline
    hierdctl export   x4     -> WORK/models/RECIPE           open_clip local dirs
    hierdctl eval-retrieval  -> WORK/report.json             recall@K + hard negatives
    hierdctl eval-grounding  -> WORK/grounding.json          where the objects are (phrase boxes)

and prints one table (and writes WORK/demo.png) of retrieval recall@1/@5 both ways,
hard-negative accuracy and phrase grounding (pointing game, box mass; chance beside them). `--quick` shrinks everything to seconds (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import hierdctl  # noqa: E402

HERE = Path(__file__).resolve().parent
TEACHER = HERE / "teacher"
STUDENT = HERE / "configs" / "scenes-student.json"
RECIPES = ("clip", "clip-kd", "clip-rd", "hierd")

# Sizes: `default` is what `make demo` runs (budgeted for 2 CPU cores and ~10 minutes
# with set-up); `quick` only proves the pipeline runs end to end.
PRESETS = {
    "default": dict(n_train=3000, n_test=500, epochs=6, batch_size=128, lr=2e-3, warmup=50,
                    views=2, clusters=6, max_phrases=3),
    "quick": dict(n_train=48, n_test=16, epochs=1, batch_size=16, lr=1e-3, warmup=1,
                  views=2, clusters=4, max_phrases=2),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/demo"), help="working folder [runs/demo]")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: seconds, for the test suite")
    ap.add_argument("--teacher", default=f"local-dir:{TEACHER}", help="teacher model spec [the shipped one]")
    ap.add_argument("--student", default=f"open_clip:{STUDENT}", help="student model spec [scenes-student.json]")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    p = PRESETS["quick" if args.quick else "default"]
    w: Path = args.work
    recipes = [r for r in args.recipes.split(",") if r]
    times: dict = {}
    logs = w / "logs"
    for old in logs.glob("[0-9][0-9]-*.log"):  # an earlier run's command logs (pipeline.py's names) only
        old.unlink()
    started = time.time()

    # 1. The benchmark: img2dataset-layout shards, read like any real dataset.
    hierdctl("scenes", "--out", str(w / "scenes"), "--n-train", str(p["n_train"]), "--n-test", str(p["n_test"]),
             "--shard-size", str(max(1, p["n_train"] // 4)), "--seed", str(args.seed), times=times, log_dir=logs)
    # 2. The teacher runs once: global embeddings, clustered patch tokens, phrases, 2 views.
    #    (`hierd+neg` would also need caption perturbations: --perturbations 2.)
    hierdctl("cache-teacher", str(w / "scenes" / "train"), "--out", str(w / "cache"), "--teacher", args.teacher,
             "--views", str(p["views"]), "--clusters", str(p["clusters"]), "--max-phrases", str(p["max_phrases"]),
             "--batch-size", "128", "--device", args.device, "--overwrite", "--quiet", times=times, log_dir=logs)
    # 3-4. One student per recipe: same architecture, data, steps, learning rate and seed.
    models = [("teacher", args.teacher)]
    for r in recipes:
        run_dir, model_dir = w / "runs" / r, w / "models" / r
        hierdctl("distill", str(w / "cache"), "--student", args.student, "--recipe", r, "--out", str(run_dir),
                 "--epochs", str(p["epochs"]), "--batch-size", str(p["batch_size"]), "--lr", str(p["lr"]),
                 "--warmup", str(p["warmup"]), "--seed", str(args.seed), "--device", args.device,
                 "--save-every", "100000", "--overwrite", "--quiet", times=times, log_dir=logs)
        hierdctl("export", str(run_dir), "--out", str(model_dir), "--format", "open_clip", "--overwrite", times=times,
                 log_dir=logs)
        models.append((r, f"local-dir:{model_dir}"))
    # 5. Everything evaluated the same way; the first model (the teacher) is the reference.
    report_path = w / "report.json"
    evals = ["eval-retrieval", str(w / "scenes" / "test"), "--k", "1,5", "--device", args.device,
             "--out", str(report_path)]
    for _, spec in models:
        evals += ["--model", spec]
    hierdctl(*evals, times=times, log_dir=logs)
    # 6. Does each model know where the objects are? Scenes' phrase boxes vs its patch tokens.
    grounding_path = w / "grounding.json"
    grounds = ["eval-grounding", str(w / "scenes" / "test"), "--device", args.device, "--out", str(grounding_path),
               "--overwrite", "--quiet"]
    for _, spec in models:
        grounds += ["--model", spec]
    hierdctl(*grounds, times=times, log_dir=logs)

    report = json.loads(report_path.read_text())
    rows = summarise(report, [name for name, _ in models], json.loads(grounding_path.read_text()))
    print_table(rows, times, time.time() - started)
    chart(rows, w / "demo.png")
    return 0


COLUMNS = [  # (label, metric name in the eval-retrieval report, or grounding/… in eval-grounding's)
    ("I→T@1", "text_retrieval_recall@1"),
    ("T→I@1", "image_retrieval_recall@1"),
    ("I→T@5", "text_retrieval_recall@5"),
    ("T→I@5", "image_retrieval_recall@5"),
    ("HN all", "hardneg_acc/all"),
    ("HN attr", "hardneg_acc/swap_attribute"),
    ("HN rel", "hardneg_acc/swap_relation"),
    ("HN obj", "hardneg_acc/replace_object"),
    ("point", "grounding/pointing_acc/all"),
    ("mass", "grounding/box_mass/all"),
]


def summarise(report: dict, names: list[str], grounding: dict) -> list[tuple[str, dict]]:
    """Per model: eval-retrieval's metrics, and eval-grounding's under grounding/…"""
    models, g = report["models"], grounding["models"]
    assert len(models) == len(names) == len(g), (len(models), len(g), names)
    assert [m["spec"] for m in models] == [m["spec"] for m in g], "the same models in both reports"
    return [(name, m["metrics"] | {f"grounding/{k}": v for k, v in gm.get("metrics", {}).items()})
            for name, m, gm in zip(names, models, g)]


def print_table(rows, times, wall: float) -> None:
    from rich.table import Table

    from hierdctl.console import console

    chance = rows[0][1]
    t = Table(title="Scenes demo: retrieval recall@K (I→T, T→I), hard-negative accuracy (HN) and phrase "
              "grounding, in %",
              caption="HN: how often the true caption beats a negative that swaps an attribute (attr), "
              "flips a relation (rel) or replaces an object (obj). point: the patch most like an object's phrase "
              "lies in its box; mass: the share of positive similarity inside the box (chance "
              f"{100 * chance.get('grounding/pointing_acc_chance/all', float('nan')):.1f} / "
              f"{100 * chance.get('grounding/box_mass_chance/all', float('nan')):.1f}). Bold: best student")
    t.add_column("model", no_wrap=True)
    for label, _ in COLUMNS:
        t.add_column(label, justify="right")
    best = {key: max(m.get(key, float("-inf")) for name, m in rows[1:]) for _, key in COLUMNS} if len(rows) > 1 else {}
    for name, m in rows:
        cells = []
        for _, key in COLUMNS:
            v = m.get(key)
            s = "–" if v is None else f"{100 * v:.1f}"
            cells.append(f"[bold]{s}[/]" if name != "teacher" and v is not None and v == best.get(key) else s)
        t.add_row(name, *cells)
    console.print(t)
    console.print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"; total {wall:.0f} s")


def chart(rows, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [label for label, _ in COLUMNS]
    x = np.arange(len(labels))
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(11, 4.2))
    for i, (name, m) in enumerate(rows):
        vals = [100 * m.get(key, float("nan")) for _, key in COLUMNS]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, vals, width, label=name)
    ax.set_xticks(x, labels)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title("hierdctl demo on Scenes: retrieval recall and hard-negative accuracy")
    ax.legend(ncol=len(rows), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)


if __name__ == "__main__":
    sys.exit(main())
