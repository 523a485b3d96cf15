"""The experiment behind docs/RESULTS.md: what each distillation recipe is worth on Scenes.

For each Scenes flavour (shapes; fashion = Fashion-MNIST photos): one teacher, one teacher
cache, then students of one architecture trained with every recipe — `clip` (no teacher),
`clip-kd`, `tinyclip`, `clip-rd`, `hierd` — and `hierd` with each of its levels switched
off in turn, over several seeds; all evaluated on the flavour's test split (retrieval
recall@1 both ways, hard-negative accuracy by kind). One budget for every student (same
data, epochs, batch, schedule) and one learning-rate search shared by all: every recipe is
trained at seed 0 with each candidate rate, scored on a validation split (its own Scenes
seed, never the test split), and the rate with the best mean score over all recipes is
used for every recipe, seed and flavour (the search runs on the first flavour).

Only public commands are used (scenes, cache-teacher, distill, export, eval-retrieval).
Outputs: WORK/results.json (every number and wall time) and WORK/RESULTS.generated.md
(the tables that docs/RESULTS.md quotes).

    python examples/experiment.py                          # everything (about an hour on 2 CPU cores)
    python examples/experiment.py --flavours shapes --seeds 0,1,2
    python examples/experiment.py --quick                  # seconds: proves the plumbing
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import hierdctl  # noqa: E402

HERE = Path(__file__).resolve().parent
STUDENT = HERE / "configs" / "scenes-student.json"
RECIPES = ("clip", "clip-kd", "tinyclip", "clip-rd", "hierd")
# hierd's levels (docs/hierd.md): the global relational term and the three hierarchical levels.
LEVELS = {
    "global": ("crd",),
    "image": ("hierd_clu_clu", "hierd_clu_img"),
    "text": ("hierd_phr_phr", "hierd_phr_cap"),
    "cross": ("hierd_clu_phr", "hierd_phr_img", "hierd_clu_cap"),
}
PRESETS = {
    # What docs/RESULTS.md reports: sized to run in about an hour on 2 CPU cores.
    "full": dict(n_train=3000, n_val=300, n_test=1000, epochs=4, batch_size=128, warmup=50, views=2, clusters=6,
                 max_phrases=3, lrs=(1e-3, 2e-3, 4e-3), teacher_epochs=6, teacher_n_train=10000, teacher_batch=256),
    "quick": dict(n_train=48, n_val=16, n_test=16, epochs=1, batch_size=16, warmup=1, views=2, clusters=4,
                  max_phrases=2, lrs=(1e-3,), teacher_epochs=1, teacher_n_train=64, teacher_batch=16),
}
METRICS = ("text_retrieval_recall@1", "image_retrieval_recall@1", "hardneg_acc/swap_attribute",
           "hardneg_acc/swap_relation", "hardneg_acc/replace_object", "hardneg_acc/all")


def ablation_recipes(folder: Path) -> dict[str, str]:
    """hierd minus one level each, written as recipe files from the shipped hierd.yaml."""
    import hierdctl

    base = yaml.safe_load((Path(hierdctl.__file__).parent / "recipes" / "hierd.yaml").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for level, names in LEVELS.items():
        r = {"description": f"hierd without its {level} level (ablation)",
             "terms": [t for t in base["terms"] if t["name"] not in names]}
        path = folder / f"hierd-no-{level}.yaml"
        path.write_text(yaml.safe_dump(r, sort_keys=False))
        out[f"hierd-no-{level}"] = str(path)
    return out


def evaluate(source: Path, models: list[tuple[str, str]], out: Path, device: str, times: dict, key: str) -> dict:
    """One eval-retrieval call over many models (the data is decoded once): name -> metrics."""
    args = ["eval-retrieval", str(source), "--k", "1,5", "--device", device, "--out", str(out)]
    for _, spec in models:
        args += ["--model", spec]
    hierdctl(*args, times=times, key=key)
    report = json.loads(out.read_text())
    assert [m["spec"] for m in report["models"]] == [spec for _, spec in models], out
    return {name: m["metrics"] for (name, _), m in zip(models, report["models"])}


def student(w: Path, cache: Path, name: str, recipe: str, lr: float, seed: int, p: dict, device: str,
            times: dict) -> str:
    """distill + export one student. A student already exported with the very same settings is
    reused (the experiment resumes after an interruption); any other is retrained."""
    run, model = w / "runs" / name, w / "models" / name
    settings = {"recipe": Path(recipe).read_text() if recipe.endswith(".yaml") else recipe, "lr": lr, "seed": seed,
                "cache": str(cache), **{k: p[k] for k in ("n_train", "epochs", "batch_size", "warmup")}}
    stamp = w / "models" / f"{name}.settings.json"
    done = (model / "export.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == settings
    if not done:
        hierdctl("distill", str(cache), "--student", f"open_clip:{STUDENT}", "--recipe", recipe, "--out", str(run),
                 "--epochs", str(p["epochs"]), "--batch-size", str(p["batch_size"]), "--lr", str(lr),
                 "--warmup", str(p["warmup"]), "--seed", str(seed), "--device", device, "--save-every", "100000",
                 "--overwrite", "--quiet", times=times, key="distill")
        hierdctl("export", str(run), "--out", str(model), "--format", "open_clip", "--overwrite", times=times,
                 key="export")
        stamp.write_text(json.dumps(settings, indent=2) + "\n")
    return f"local-dir:{model}"


def flavour_experiment(flavour: str, root: Path, p: dict, seeds: list[int], device: str, teacher: str | None,
                       lr: float | None = None) -> dict:
    """One flavour end to end. `lr`: the rate an earlier flavour's search chose (None: search)."""
    w, times = root / flavour, {}
    # Data: train and test from seed 0; validation from its own seed (for the LR search only).
    hierdctl("scenes", "--out", str(w / "scenes"), "--flavour", flavour, "--seed", "0", "--n-train",
             str(p["n_train"]), "--n-test", str(p["n_test"]), "--shard-size", "1000", times=times)
    hierdctl("scenes", "--out", str(w / "val"), "--flavour", flavour, "--seed", "7", "--n-train", "0",
             "--n-test", str(p["n_val"]), times=times)
    if teacher is None and (w / "teacher" / "export.json").is_file():  # trained by an earlier, interrupted run
        teacher = f"local-dir:{w / 'teacher'}"
    if teacher is None:  # train this flavour's teacher with the same script as the shipped one
        t0 = time.time()
        cmd = [sys.executable, str(HERE / "train_teacher.py"), "--work", str(w / "teacher-work"), "--out",
               str(w / "teacher"), "--flavour", flavour, "--epochs", str(p["teacher_epochs"]), "--n-train",
               str(p["teacher_n_train"]), "--batch-size", str(p["teacher_batch"]), "--n-test", str(p["n_test"]),
               "--device", device]
        print("$ " + " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            sys.exit(f"experiment: training the {flavour} teacher failed")
        times["train_teacher"] = round(time.time() - t0, 1)
        teacher = f"local-dir:{w / 'teacher'}"
    cache = w / "cache"
    hierdctl("cache-teacher", str(w / "scenes" / "train"), "--out", str(cache), "--teacher", teacher,
             "--views", str(p["views"]), "--clusters", str(p["clusters"]), "--max-phrases", str(p["max_phrases"]),
             "--batch-size", "128", "--device", device, "--quiet", times=times)
    recipes = {r: r for r in RECIPES} | ablation_recipes(w / "recipes")

    # One learning-rate search shared by all recipes (seed 0, validation split), made on the
    # first flavour and reused by the others.
    search = {}
    if lr is None and len(p["lrs"]) > 1:
        for lr in p["lrs"]:
            models = [(r, student(w, cache, f"{r}-lr{lr:g}-s0", path, lr, 0, p, device, times))
                      for r, path in recipes.items() if r in RECIPES]
            scores = evaluate(w / "val" / "test", models, w / f"val-lr{lr:g}.json", device, times, "eval-val")
            search[lr] = statistics.mean(
                (m["text_retrieval_recall@1"] + m["image_retrieval_recall@1"]) / 2 for m in scores.values())
        lr = max(search, key=search.get)
    elif lr is None:
        lr = p["lrs"][0]

    # Every recipe and ablation at every seed with the chosen rate; the teacher alongside.
    models = [("teacher", teacher)]
    for seed in seeds:
        for r, path in recipes.items():
            spec = student(w, cache, f"{r}-lr{lr:g}-s{seed}", path, lr, seed, p, device, times)
            models.append((f"{r}@{seed}", spec))
    scores = evaluate(w / "scenes" / "test", models, w / "test-report.json", device, times, "eval-test")
    table = {"teacher": {k: [scores["teacher"].get(k)] for k in METRICS}}
    for r in recipes:
        table[r] = {k: [scores[f"{r}@{s}"].get(k) for s in seeds] for k in METRICS}
    return {"flavour": flavour, "lr": lr, "lr_search": search, "seeds": seeds, "table": table, "wall_seconds": times}


def fmt(values: list) -> str:
    vals = [100 * v for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"


def markdown(results: list[dict], p: dict) -> str:
    lines = []
    for res in results:
        lines += [f"### {res['flavour']} (lr {res['lr']:g}; seeds {', '.join(map(str, res['seeds']))})", "",
                  "| model | I→T R@1 | T→I R@1 | swap attr | swap rel | replace obj | all hard neg |",
                  "|---|---|---|---|---|---|---|"]
        for name, row in res["table"].items():
            lines.append(f"| {name} | " + " | ".join(fmt(row[k]) for k in METRICS) + " |")
        if res["lr_search"]:
            lines += ["", "LR search (validation, mean R@1 over recipes): "
                      + ", ".join(f"{lr:g}: {100 * s:.1f}" for lr, s in res["lr_search"].items())]
        lines += ["", "Wall time (s): " + ", ".join(f"{k} {v:,.0f}" for k, v in res["wall_seconds"].items()), ""]
    lines.append(f"Budget per student: {p['n_train']} training images, {p['epochs']} epochs, batch "
                 f"{p['batch_size']}, warm-up {p['warmup']} steps, cosine schedule.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/experiment"))
    ap.add_argument("--flavours", default="shapes,fashion")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shapes-teacher", default=f"local-dir:{HERE / 'teacher'}",
                    help="teacher for the shapes flavour [the shipped one]; 'train' trains one")
    ap.add_argument("--n-train", type=int, help="override the preset's training images")
    ap.add_argument("--epochs", type=float, help="override the preset's student epochs")
    ap.add_argument("--lrs", help="override the preset's learning-rate candidates (comma-separated)")
    ap.add_argument("--teacher-n-train", type=int, help="override the preset's teacher training images")
    ap.add_argument("--teacher-epochs", type=float, help="override the preset's teacher epochs")
    args = ap.parse_args(argv)
    p = dict(PRESETS["quick" if args.quick else "full"])
    if args.n_train:
        p["n_train"] = args.n_train
    if args.epochs:
        p["epochs"] = args.epochs
    if args.lrs:
        p["lrs"] = tuple(float(x) for x in args.lrs.split(","))
    if args.teacher_n_train:
        p["teacher_n_train"] = args.teacher_n_train
    if args.teacher_epochs:
        p["teacher_epochs"] = args.teacher_epochs
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    for flavour in args.flavours.split(","):
        teacher = args.shapes_teacher if flavour == "shapes" and args.shapes_teacher != "train" else None
        lr = results[0]["lr"] if results else None
        results.append(flavour_experiment(flavour, args.work, p, seeds, args.device, teacher, lr))
        args.work.mkdir(parents=True, exist_ok=True)
        (args.work / "results.json").write_text(json.dumps({"preset": p, "results": results}, indent=2) + "\n")
        (args.work / "RESULTS.generated.md").write_text(markdown(results, p))
    print((args.work / "RESULTS.generated.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
