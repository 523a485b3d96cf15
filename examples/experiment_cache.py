"""The experiment behind docs/RESULTS.md's "A richer cache" section: teacher ensembles and
RandAugment replay on Scenes (shapes), each against the same student budget.

1. Ensembles (DataCompDR's): a second shapes teacher is trained by examples/train_teacher.py
   with other seeds (data seed 2, training seed 1) and a smaller budget (10,000 images, 6
   epochs: the budget of the fashion teacher in RESULTS.md); one cache holds both teachers'
   embeddings (`cache-teacher --teacher A --teacher B`). The `clip-kd` student is trained
   from it three ways: against the ensemble (CRD on the teachers' averaged softmaxes, FD/ICL
   averaged over both), against teacher A alone and against teacher B alone (the recipe's
   terms with `args: {teacher: K}`), so the data, views and captions are identical.
2. RandAugment replay: a cache with `--augment rrc+flip+randaugment` (N = 2, M = 9) against
   the plain rrc+flip cache, same teacher (A), same views (4), the same `clip-kd` student.

Both: 3,000 training images of Scenes seed 0, 1,000 test images, 4 epochs at batch 128, the
shared learning rate of RESULTS.md (4e-3), warm-up 50, seeds 0, 1, 2; `eval-retrieval`
R@1 both ways and hard-negative accuracy on the test split, touched once per model.
Only public commands are used. Resumable: every step is skipped when its output exists.

    python examples/experiment_cache.py [--work runs/experiment-cache] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import hierdctl  # noqa: E402

HERE = Path(__file__).resolve().parent
STUDENT = HERE / "configs" / "scenes-student.json"
TEACHER_A = HERE / "teacher"
PRESETS = {
    "full": dict(n_train=3000, n_test=1000, epochs=4, batch_size=128, warmup=50, lr=4e-3, seeds=(0, 1, 2),
                 teacher_b=dict(n_train=10000, epochs=6), views=4),
    "quick": dict(n_train=64, n_test=32, epochs=1, batch_size=16, warmup=1, lr=4e-3, seeds=(0,),
                  teacher_b=dict(n_train=256, epochs=1), views=2),
}
METRICS = ("text_retrieval_recall@1", "image_retrieval_recall@1", "hardneg_acc/swap_attribute",
           "hardneg_acc/swap_relation", "hardneg_acc/replace_object")
CLIP_KD = [("clip", 1.0), ("crd", 1.0), ("icl", 1.0), ("fd", 2000.0)]


def recipe(folder: Path, name: str, teacher: int | None) -> Path:
    """clip-kd, every teacher-using term pinned to one teacher (None: the whole ensemble)."""
    lines = [f"description: clip-kd, teacher {teacher if teacher is not None else 'ensemble'}", "terms:"]
    for term, w in CLIP_KD:
        args = f", args: {{teacher: {teacher}}}" if teacher is not None and term != "clip" else ""
        lines.append(f"  - {{name: {term}, weight: {w}{args}}}")
    p = folder / f"{name}.yaml"
    p.write_text("\n".join(lines) + "\n")
    return p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/experiment-cache"))
    ap.add_argument("--quick", action="store_true", help="a tiny run that proves the plumbing")
    args = ap.parse_args(argv)
    p = PRESETS["quick" if args.quick else "full"]
    w, times = args.work, {}
    w.mkdir(parents=True, exist_ok=True)
    started = time.time()

    # --- data and teachers --------------------------------------------------------------
    if not (w / "scenes" / "scenes.json").is_file():
        hierdctl("scenes", "--out", str(w / "scenes"), "--seed", "0", "--n-train", str(p["n_train"]),
                 "--n-test", str(p["n_test"]), "--shard-size", "1000", times=times)
    teacher_b = w / "teacher-b"
    if not (teacher_b / "export.json").is_file():
        import train_teacher

        train_teacher.main(["--work", str(w / "teacher-b-work"), "--out", str(teacher_b), "--seed", "2",
                            "--train-seed", "1", "--n-train", str(p["teacher_b"]["n_train"]),
                            "--epochs", str(p["teacher_b"]["epochs"]), "--n-test", str(min(500, p["n_test"]))])
    caches = {
        "ensemble": ["--teacher", f"local-dir:{TEACHER_A}", "--teacher", f"local-dir:{teacher_b}"],
        "randaugment": ["--teacher", f"local-dir:{TEACHER_A}", "--augment", "rrc+flip+randaugment"],
        "plain": ["--teacher", f"local-dir:{TEACHER_A}"],
    }
    for name, extra in caches.items():
        if not (w / f"cache-{name}" / "manifest.json").is_file():
            hierdctl("cache-teacher", str(w / "scenes" / "train"), "--out", str(w / f"cache-{name}"), *extra,
                     "--views", str(p["views"]), "--clusters", "0", "--max-phrases", "0", "--quiet",
                     times=times, key=f"cache-{name}")

    # --- students -----------------------------------------------------------------------
    recipes = w / "recipes"
    recipes.mkdir(exist_ok=True)
    arms = {  # arm -> (cache, recipe file)
        "ensemble (A+B)": ("ensemble", recipe(recipes, "kd-ensemble", None)),
        "teacher A alone": ("ensemble", recipe(recipes, "kd-teacher-a", 0)),
        "teacher B alone": ("ensemble", recipe(recipes, "kd-teacher-b", 1)),
        "rrc+flip": ("plain", recipe(recipes, "kd", None)),
        "rrc+flip+randaugment": ("randaugment", recipe(recipes, "kd", None)),
    }
    results_path = w / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for arm, (cache, rec) in arms.items():
        for seed in p["seeds"]:
            key = f"{arm}|{seed}"
            if key in results:
                continue
            slug = arm.replace(" ", "-").replace("(", "").replace(")", "").replace("+", "p")
            run, model = w / "runs" / f"{slug}-s{seed}", w / "models" / f"{slug}-s{seed}"
            if not (run / "checkpoints" / "latest.json").is_file() or not (model / "export.json").is_file():
                hierdctl("distill", str(w / f"cache-{cache}"), "--student", f"open_clip:{STUDENT}", "--recipe",
                         str(rec), "--out", str(run), "--epochs", str(p["epochs"]), "--batch-size",
                         str(p["batch_size"]), "--lr", str(p["lr"]), "--warmup", str(p["warmup"]), "--seed", str(seed),
                         "--overwrite", "--quiet", times=times, key="distill")
                hierdctl("export", str(run), "--out", str(model), "--overwrite", "--quiet", times=times, key="export")
            report = w / "reports" / f"{slug}-s{seed}.json"
            report.parent.mkdir(exist_ok=True)
            hierdctl("eval-retrieval", str(w / "scenes" / "test"), "--model", f"local-dir:{model}", "--k", "1",
                     "--out", str(report), "--quiet", times=times, key="eval")
            results[key] = json.loads(report.read_text())["models"][0]["metrics"]
            results_path.write_text(json.dumps(results, indent=1))
    teacher_eval = {}
    for name, spec in (("teacher A", TEACHER_A), ("teacher B", teacher_b)):
        rep = w / "reports" / f"{name.replace(' ', '-')}.json"
        if not rep.is_file():
            hierdctl("eval-retrieval", str(w / "scenes" / "test"), "--model", f"local-dir:{spec}", "--k", "1",
                     "--out", str(rep), "--quiet", times=times, key="eval")
        teacher_eval[name] = json.loads(rep.read_text())["models"][0]["metrics"]

    # --- the table ----------------------------------------------------------------------
    def cell(arm: str, metric: str) -> str:
        xs = [100 * results[f"{arm}|{s}"][metric] for s in p["seeds"]]
        return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"

    def paired(a: str, b: str, metric: str) -> str:
        d = [100 * (results[f"{a}|{s}"][metric] - results[f"{b}|{s}"][metric]) for s in p["seeds"]]
        wins = sum(x > 0 for x in d)
        sd = f" ± {statistics.stdev(d):.1f}" if len(d) > 1 else ""
        return f"{statistics.mean(d):+.1f}{sd} ({wins}/{len(d)} seeds)"

    head = "| model | I→T R@1 | T→I R@1 | swap attr | swap rel | replace obj |\n|---|---|---|---|---|---|"
    lines = ["### Teacher ensembles (clip-kd student, shapes)", "", head]
    for name, m in teacher_eval.items():
        lines.append(f"| {name} itself | " + " | ".join(f"{100 * m[k]:.1f}" for k in METRICS) + " |")
    for arm in ("ensemble (A+B)", "teacher A alone", "teacher B alone"):
        lines.append(f"| {arm} | " + " | ".join(cell(arm, k) for k in METRICS) + " |")
    lines += ["", "Per-seed paired differences, ensemble minus each teacher alone (I→T / T→I R@1, points):", ""]
    for other in ("teacher A alone", "teacher B alone"):
        lines.append(f"- vs {other}: {paired('ensemble (A+B)', other, METRICS[0])} / "
                     f"{paired('ensemble (A+B)', other, METRICS[1])}")
    lines += ["", "### RandAugment replay (clip-kd student from teacher A, 4 views, shapes)", "", head]
    for arm in ("rrc+flip", "rrc+flip+randaugment"):
        lines.append(f"| {arm} | " + " | ".join(cell(arm, k) for k in METRICS) + " |")
    lines += ["", f"- randaugment minus rrc+flip: {paired('rrc+flip+randaugment', 'rrc+flip', METRICS[0])} / "
              f"{paired('rrc+flip+randaugment', 'rrc+flip', METRICS[1])}", "",
              f"Wall time of this run: {time.time() - started:.0f} s; per stage: {json.dumps(times)}"]
    (w / "RESULTS-cache.generated.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
