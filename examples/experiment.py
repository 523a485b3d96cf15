"""The experiment behind docs/RESULTS.md: HieRD against tuned CLIP-KD and CLIP-RD on Scenes.

The protocol is fixed here, in code, before any test number exists (issue 24):

    search   VALIDATION only. Two validation draws (Scenes seeds 7 and 8, 1,000 images each)
             of both flavours (shapes, cluttered); training seed 0.
             A: every recipe of RECIPES at each rate of LRS (3).
             B: each distilling recipe (clip-kd, clip-rd, hierd) gets the same EXTRA budget
                of weight configurations at its own best rate: FIRST[r] (five single
                changes), then two follow-ups built by one rule for all three
                (`follow_ups`): its two best single changes combined, and its best single
                change applied once more. tinyclip gets its two published mixes.
             C: the controls of hierd's part FD (CONTROLS), at hierd's best rate: reported,
                never chosen.
             Every model is scored by `val_score` (mean recall@1, both directions, over
             both flavours and both draws) and by eval-grounding on draw 7.
    select   `choose` (below): per recipe, the best (configuration, rate) by val_score among
             those within the step-time budget (OVER_BUDGET_TERMS). The shipped `hierd` is the
             best of hierd's candidates; `hierd-rel` the best of those with a structure term.
             Writes WORK/chosen.json; final and long read only that file.
    final    the test split, touched once: every chosen recipe × SEEDS on shapes and
             cluttered (and fashion: FASHION_RECIPES × FASHION_SEEDS), eval-retrieval and
             eval-grounding of every student and the teacher; paired differences with
             95 % confidence intervals (paired t) against clip-kd and clip-rd.
    long     3× the images (9,000), 16 epochs (1,120 steps), shapes and cluttered, LONG_SEEDS:
             LONG_RECIPES. Checkpoints after epochs 1, 2, 4, 8, 16 are exported and scored on
             validation draw 7 (the curve, and the epochs each recipe needs to reach 90 % of the
             teacher's recall@1 both ways); the last one on the test split, once.
    report   WORK/RESULTS.generated.md and WORK/results.json from every part finished so far.

The reduced protocol (`--budget small`), fixed on 2026-12-04 before any test number existed,
because the full one (~9 core-hours) did not fit the session: on the shared 2-core machine a
search student took 450 s of wall time (165 core-seconds when alone), so about 45 students fit.

    search   A for the three contenders only: clip-kd, clip-rd and hierd at each rate of LRS,
             both flavours, both draws (the same budget for each: 3 configurations). clip (the
             no-teacher reference) at LRS on shapes only; tinyclip not run. B is dropped.
             hierd-rel: SMALL_REL (two of hierd's structure configurations) at hierd's best
             rate on shapes' two draws, chosen among themselves. C: SMALL_CONTROLS, shapes only.
    final    SMALL_FINAL × the first 3 seeds (--seeds 3), shapes, then cluttered. A final
             student whose settings equal a search student's (seed 0, same configuration, rate
             and cache) is that student: it is not trained twice.
    dropped  tinyclip, B, four of the six controls, fashion, and the long budget (curves,
             epochs to 90 %).

Every part resumes: a student already exported with the very same settings is reused, so
the experiment runs in parts (--phase, --flavours, --jobs) and survives interruption. Only
public commands are used (scenes, cache-teacher, distill, export, eval-retrieval,
eval-grounding).

    python examples/experiment.py --phase search --jobs 2
    python examples/experiment.py --phase select
    python examples/experiment.py --phase final,long --jobs 2
    python examples/experiment.py --phase report
    python examples/experiment.py --quick --phase search,select,final,long,report   # seconds: the plumbing
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
FLAVOURS = ("shapes", "cluttered")  # selection and the main table
FASHION = "fashion"  # reported, never used for selection
RECIPES = ("clip", "tinyclip", "clip-kd", "clip-rd", "hierd")
BASELINES = ("clip-kd", "clip-rd")  # what hierd must beat: paired differences against each
LRS = (2e-3, 4e-3, 8e-3)
VAL_SEEDS = (7, 8)  # the two validation draws (Scenes seeds); the test split is Scenes seed 0
CURVE_EPOCHS = (1, 2, 4, 8, 16)
SEEDS = (0, 1, 2, 3, 4)
FASHION_SEEDS = (0, 1, 2)
LONG_SEEDS = (0, 1, 2)
FINAL_RECIPES = ("clip", "tinyclip", "clip-kd", "clip-rd", "hierd", "hierd-rel")
SMALL_TUNED = ("clip-kd", "clip-rd", "hierd")  # --budget small: A on both flavours for these
SMALL_REL = ("+align", "+structure")  # of FIRST["hierd"]
SMALL_CONTROLS = ("ctl-grid2-fd", "ctl-global-fd6000")  # clusters vs a fixed grid; FD matched globally
SMALL_FINAL = ("clip", "clip-kd", "clip-rd", "hierd", "hierd-rel")
FASHION_RECIPES = ("clip-kd", "clip-rd", "hierd", "hierd-rel")
LONG_RECIPES = ("clip-kd", "clip-rd", "hierd", "hierd-rel")
METRICS = ("text_retrieval_recall@1", "image_retrieval_recall@1", "hardneg_acc/swap_attribute",
           "hardneg_acc/swap_relation", "hardneg_acc/replace_object", "hardneg_acc/all")
R1 = METRICS[:2]
HARDNEG = METRICS[2:5]
GROUNDING = ("pointing_acc", "box_mass")  # eval-grounding's headline metrics (chance beside them)

# --- the tuning: every configuration tried on validation ---------------------------------
# A change is {term: weight}: a new name adds the term, a weight of 0 drops it.
PART_FD = {"hierd_clu_fd": 2000.0, "hierd_phr_fd": 2000.0}
FAMILIES = {  # HieRD's structure terms (docs/hierd.md), each a family added on top of hierd
    "align": {"hierd_clu_phr": 1.0},  # within the pair: cluster<->phrase affinities, both ways
    "xbatch": {"hierd_clu_phr_bx": 1.0},  # across the batch: clusters vs every teacher phrase, and back
    "relations": {"hierd_clu_clu": 1.0, "hierd_phr_phr": 1.0},  # relation matrices within an image / a caption
    "coupling": {"hierd_clu_cap": 1.0, "hierd_phr_img": 1.0, "hierd_clu_img": 1.0, "hierd_phr_cap": 1.0},
}
STRUCTURE_TERMS = tuple(t for f in FAMILIES.values() for t in f)
FIRST = {  # B's five single changes per distilling recipe (the same budget for each)
    "clip-kd": {"fd1000": {"fd": 1000.0}, "fd4000": {"fd": 4000.0}, "crd2": {"crd": 2.0}, "crd0.5": {"crd": 0.5},
                "icl2": {"icl": 2.0}},
    "clip-rd": {"rd2": {"vrd": 2.0, "xrd": 2.0}, "rd0.5": {"vrd": 0.5, "xrd": 0.5}, "fd1000": {"fd": 1000.0},
                "fd4000": {"fd": 4000.0}, "icl2": {"icl": 2.0}},
    "hierd": {**{f"+{name}": terms for name, terms in FAMILIES.items()},
              "+structure": {t: w for f in FAMILIES.values() for t, w in f.items()}},
    # TinyCLIP's two mixes: its released scripts' α = 1 (affinity only), and α = 0.75.
    "tinyclip": {"a1.0": {"clip": 0.0, "affinity": 1.0}, "a0.75": {"clip": 0.25, "affinity": 0.75}},
}
EXTRA = 7  # extra configurations of each of clip-kd, clip-rd and hierd: 5 single changes + 2 follow-ups
CONTROLS = ("ctl-dense-fd", "ctl-grid2-fd", "ctl-grid3-fd", "ctl-clu-fd", "ctl-phr-fd", "ctl-global-fd6000")
TOKEN_CONTROLS = ("ctl-dense-fd", "ctl-grid2-fd", "ctl-grid3-fd")  # need a --store tokens cache
# A configuration with one of these terms misses the step-time budget (hierd ≤ 1.4× clip-kd's
# step, bench/bench_distill.py); the choice is the best on validation among the others.
OVER_BUDGET_TERMS = ("hierd_neg",)

PRESETS = {
    "full": dict(n_train=3000, n_val=1000, n_test=1000, epochs=4, batch_size=128, warmup=50, views=2, clusters=6,
                 max_phrases=3, long_factor=3, long_epochs=16, teacher_epochs=6, teacher_n_train=10000,
                 teacher_batch=256, seeds=SEEDS, fashion_seeds=FASHION_SEEDS, long_seeds=LONG_SEEDS, lrs=LRS),
    "quick": dict(n_train=48, n_val=16, n_test=16, epochs=1, batch_size=16, warmup=1, views=2, clusters=4,
                  max_phrases=2, long_factor=2, long_epochs=4, teacher_epochs=1, teacher_n_train=64,
                  teacher_batch=16, seeds=(0, 1), fashion_seeds=(0,), long_seeds=(0,), lrs=(1e-3, 2e-3, 4e-3)),
}


def shipped_recipe(name: str) -> dict:
    import hierdctl

    return yaml.safe_load((Path(hierdctl.__file__).parent / "recipes" / f"{name}.yaml").read_text())


def weights_of(recipe: dict) -> dict:
    return {t["name"]: float(t["weight"]) for t in recipe["terms"]}


def apply(base: dict, change: dict) -> dict:
    return {k: v for k, v in (base | change).items() if v > 0}


def write_recipe(folder: Path, name: str, weights: dict, description: str) -> str:
    """A recipe file from {term: weight} (weight-0 terms dropped); returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    r = {"description": description, "terms": [{"name": n, "weight": w} for n, w in weights.items() if w > 0]}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return str(path)


def follow_ups(recipe: str, scores: dict[str, float]) -> dict[str, dict]:
    """B's two follow-up configurations, one rule for every recipe: its two best single changes
    (by validation score) combined, and its best single change applied once more (each changed
    term's factor over the base applied again; an added term's weight ×4)."""
    base = weights_of(shipped_recipe(recipe))
    first = FIRST[recipe]
    ranked = sorted(first, key=lambda n: -scores[n])
    a, b = ranked[0], ranked[1]
    again = {}
    for t, w in first[a].items():
        again[t] = w * (w / base[t]) if t in base and base[t] > 0 else w * 4
    return {f"{a}+{b.lstrip('+')}": first[a] | first[b], f"{a}x2": again}


def val_score(m_by_flavour_draw: dict) -> float:
    """The selection score: mean recall@1, both directions, over every (flavour, draw)."""
    vals = [(m["text_retrieval_recall@1"] + m["image_retrieval_recall@1"]) / 2 for m in m_by_flavour_draw.values()]
    return statistics.mean(vals)


def within_budget(weights: dict) -> bool:
    return not set(OVER_BUDGET_TERMS) & set(weights)


def choose(search: dict) -> dict:
    """The selection rule, applied to search.json: recipe -> {config, lr, weights, score}.

    Per recipe, every (configuration, rate) it tried, scored by val_score; the best within
    the step-time budget wins. hierd-rel: the best hierd candidate with a structure term."""
    chosen = {}
    for r, rows in search["tried"].items():
        ok = [x for x in rows if within_budget(x["weights"])]
        chosen[r] = max(ok, key=lambda x: x["score"])
    # (--budget small: hierd-rel's own candidates, chosen above; the full search: hierd's own)
    rel = [x for x in search["tried"].get("hierd-rel", search["tried"]["hierd"])
           if within_budget(x["weights"]) and set(STRUCTURE_TERMS) & set(x["weights"])]
    chosen["hierd-rel"] = max(rel, key=lambda x: x["score"])
    return chosen


# --- running ---------------------------------------------------------------------------


JOBS = 1  # students trained at once (--jobs); each then runs torch with one thread


def run_many(fn, items: list) -> list:
    if JOBS <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(JOBS) as pool:
        return list(pool.map(fn, items))


def evaluate(source: Path, models: list[tuple[str, str]], out: Path, device: str, times: dict, key: str) -> dict:
    """One eval-retrieval call over many models (the data is decoded once): name -> metrics.
    Reused when an earlier run evaluated exactly these models."""
    if out.is_file():
        report = json.loads(out.read_text())
        if [m["spec"] for m in report["models"]] == [spec for _, spec in models]:
            return {name: m["metrics"] for (name, _), m in zip(models, report["models"])}
    args = ["eval-retrieval", str(source), "--k", "1,5", "--device", device, "--out", str(out), "--overwrite"]
    for _, spec in models:
        args += ["--model", spec]
    hierdctl(*args, times=times, key=key)
    report = json.loads(out.read_text())
    assert [m["spec"] for m in report["models"]] == [spec for _, spec in models], out
    return {name: m["metrics"] for (name, _), m in zip(models, report["models"])}


def ground(source: Path, models: list[tuple[str, str]], out: Path, device: str, times: dict) -> dict:
    """eval-grounding over many models: name -> its metrics (pointing game, box mass, chance)."""
    if not out.is_file() or [m["spec"] for m in json.loads(out.read_text())["models"]] != [s for _, s in models]:
        args = ["eval-grounding", str(source), "--device", device, "--out", str(out), "--overwrite"]
        for _, spec in models:
            args += ["--model", spec]
        hierdctl(*args, times=times, key="eval-grounding")
    report = json.loads(out.read_text())
    return {name: headline(m.get("metrics", {})) for (name, _), m in zip(models, report["models"])}


def headline(metrics: dict) -> dict:
    """eval-grounding's metrics plus the names the tables read: pointing_acc, box_mass (over all
    regions), chance/… and control/… of each."""
    out = dict(metrics)
    for k in GROUNDING:
        for prefix, suffix in (("", ""), ("chance/", "_chance"), ("control/", "_control")):
            if f"{k}{suffix}/all" in metrics:
                out[f"{prefix}{k}"] = metrics[f"{k}{suffix}/all"]
    return out


def distill_export(w: Path, cache: Path, name: str, recipe: str, lr: float, seed: int, p: dict, device: str,
                   times: dict, epochs: float | None = None, curve: tuple[int, ...] = ()) -> dict[int | None, str]:
    """distill + export one student (and, with `curve`, its checkpoints after those epochs).
    Returns {epoch or None (the final one): model spec}. A student already exported with the
    very same settings is reused (the experiment resumes); any other is retrained."""
    run, model = w / "runs" / name, w / "models" / name
    epochs = epochs or p["epochs"]
    settings = {"recipe": Path(recipe).read_text() if recipe.endswith(".yaml") else
                yaml.safe_dump(shipped_recipe(recipe), sort_keys=False), "lr": lr, "seed": seed,
                "cache": str(cache), "epochs": epochs, "curve": list(curve),
                **{k: p[k] for k in ("batch_size", "warmup")}}
    stamp = w / "models" / f"{name}.settings.json"
    out = {None: f"local-dir:{model}"} | {e: f"local-dir:{model}-ep{e}" for e in curve}
    if (model / "export.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return out
    if not curve:  # the same student trained under another name (a search student is a final one's seed 0)
        for other in sorted((w / "models").glob("*.settings.json")):
            twin = other.with_name(other.name[: -len(".settings.json")])
            if (twin / "export.json").is_file() and _same_student(json.loads(other.read_text()), settings):
                return {None: f"local-dir:{twin}"}
    steps_per_epoch = json.loads((cache / "manifest.json").read_text())["samples"] // p["batch_size"]
    t0 = time.time()
    extra = ["--save-every", str(steps_per_epoch), "--set", f"keep_checkpoints={max(curve) + 1}"] if curve else \
        ["--save-every", "100000"]
    hierdctl("distill", str(cache), "--student", f"open_clip:{STUDENT}", "--recipe", recipe, "--out", str(run),
             "--epochs", str(epochs), "--batch-size", str(p["batch_size"]), "--lr", str(lr),
             "--warmup", str(p["warmup"]), "--seed", str(seed), "--device", device, "--workers", "0",
             *extra, "--overwrite", "--quiet", times=times, key="distill")
    times.setdefault("distill_per_model", {})[name] = round(time.time() - t0, 1)
    for e in curve:
        ck = run / "checkpoints" / f"step-{e * steps_per_epoch:07d}.safetensors"
        hierdctl("export", str(ck), "--out", f"{model}-ep{e}", "--format", "open_clip", "--overwrite",
                 times=times, key="export")
    hierdctl("export", str(run), "--out", str(model), "--format", "open_clip", "--overwrite", times=times, key="export")
    stamp.write_text(json.dumps(settings, indent=2) + "\n")
    return out


def _same_student(a: dict, b: dict) -> bool:
    """Two distill settings train the same student: equal but for the recipe's description."""
    def terms(x):
        return yaml.safe_load(x["recipe"]).get("terms")
    return terms(a) == terms(b) and {k: v for k, v in a.items() if k != "recipe"} == \
        {k: v for k, v in b.items() if k != "recipe"}


def prepare(flavour: str, root: Path, p: dict, device: str, times: dict, long: bool = False) -> tuple[Path, str]:
    """Data, teacher and teacher caches of one flavour -> (work folder, teacher spec)."""
    w = root / flavour
    n = p["n_train"] * (p["long_factor"] if long else 1)
    tag = "-long" if long else ""
    scenes = w / f"scenes{tag}"
    # The test split depends on the seed and its size only: the long data's test split is the same.
    hierdctl("scenes", "--out", str(scenes), "--flavour", flavour, "--seed", "0", "--n-train", str(n),
             "--n-test", str(p["n_test"]), "--shard-size", "1000", times=times)
    for s in VAL_SEEDS:
        hierdctl("scenes", "--out", str(w / f"val{s}"), "--flavour", flavour, "--seed", str(s), "--n-train", "0",
                 "--n-test", str(p["n_val"]), times=times)
    shipped = HERE / ("teacher" if flavour == "shapes" or p.get("quick") else f"teacher-{flavour}")
    if (shipped / "export.json").is_file():  # --quick: the shapes teacher for every flavour (plumbing only)
        teacher = f"local-dir:{shipped}"
    elif (w / "teacher" / "export.json").is_file():  # trained by an earlier run
        teacher = f"local-dir:{w / 'teacher'}"
    else:  # this flavour's teacher, trained with the same script as the shipped ones
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
    for cache, store in ((w / f"cache{tag}", "clusters"),) + (((w / "cache-tokens", "tokens"),) if not long else ()):
        if not (cache / "manifest.json").is_file():
            hierdctl("cache-teacher", str(scenes / "train"), "--out", str(cache), "--teacher", teacher,
                     "--views", str(p["views"]), "--clusters", str(p["clusters"]), "--max-phrases",
                     str(p["max_phrases"]), "--store", store, "--batch-size", "128", "--device", device,
                     "--overwrite", "--quiet", times=times)
    return w, teacher


def r1(m: dict) -> float:
    return (m["text_retrieval_recall@1"] + m["image_retrieval_recall@1"]) / 2


# --- search (validation only) ------------------------------------------------------------


def _val_scores(root: Path, p: dict, device: str, times: dict, models: dict[str, tuple[str, float]],
                tag: str, grounding: bool = False, flavours: tuple[str, ...] = FLAVOURS) -> dict:
    """Train `models` (config name -> (recipe path, lr)) at seed 0 on every flavour and score them
    on both validation draws -> {config name: {"metrics": {flavour/draw: metrics}, "grounding": …}}."""
    out: dict = {name: {"metrics": {}, "grounding": {}} for name in models}
    for flavour in flavours:
        w, teacher = prepare(flavour, root, p, device, times)
        items = []
        for name, (path, lr) in models.items():
            cache = w / ("cache-tokens" if Path(path).stem in TOKEN_CONTROLS else "cache")
            items.append((name, path, lr, cache))
        specs = run_many(lambda x: distill_export(w, x[3], f"search-{x[0]}-lr{x[2]:g}", x[1], x[2], 0, p, device,
                                                  times)[None], items)
        named = list(zip([x[0] for x in items], specs))
        for s in VAL_SEEDS:
            scores = evaluate(w / f"val{s}" / "test", named, w / f"val{s}-{tag}.json", device, times, "eval-val")
            for name, m in scores.items():
                out[name]["metrics"][f"{flavour}/val{s}"] = m
        if grounding:
            g = ground(w / f"val{VAL_SEEDS[0]}" / "test", [("teacher", teacher)] + named,
                       w / f"val{VAL_SEEDS[0]}-{tag}-grounding.json", device, times)
            for name in models:
                out[name]["grounding"][flavour] = g[name]
            out.setdefault("_teacher_grounding", {})[flavour] = g["teacher"]
    return out


def search_phase(root: Path, p: dict, device: str, small: bool = False) -> dict:
    times: dict = {}
    folder = root / "recipes"
    base = {r: weights_of(shipped_recipe(r)) for r in RECIPES}
    tried: dict[str, list] = {r: [] for r in RECIPES}

    def add(r, config, lr, weights, res):
        tried[r].append({"config": config, "lr": lr, "weights": weights, "score": val_score(res["metrics"]),
                         "metrics": res["metrics"], "grounding": res["grounding"]})

    if small:
        return _small_search(root, p, device, times, folder, base, add, tried)
    # A: the rate grid, every recipe at its shipped weights
    grid = {f"{r}@{lr:g}": (write_recipe(folder, r, base[r], f"{r} (shipped)"), lr) for r in RECIPES for lr in p["lrs"]}
    res = _val_scores(root, p, device, times, grid, "grid", grounding=True)
    for r in RECIPES:
        for lr in p["lrs"]:
            add(r, r, lr, base[r], res[f"{r}@{lr:g}"])
    best_lr = {r: max(tried[r], key=lambda x: x["score"])["lr"] for r in RECIPES}
    # B1: the single changes, at each recipe's own best rate
    b1 = {f"{r}-{c}": (write_recipe(folder, f"{r}-{c}", apply(base[r], ch), f"{r}: {c}"), best_lr[r])
          for r, changes in FIRST.items() for c, ch in changes.items()}
    res = _val_scores(root, p, device, times, b1, "b1", grounding=True)
    for r, changes in FIRST.items():
        for c, ch in changes.items():
            add(r, c, best_lr[r], apply(base[r], ch), res[f"{r}-{c}"])
    # B2: the follow-ups (the same rule for clip-kd, clip-rd and hierd)
    b2 = {}
    for r in ("clip-kd", "clip-rd", "hierd"):
        scores = {x["config"]: x["score"] for x in tried[r] if x["config"] in FIRST[r]}
        for c, ch in follow_ups(r, scores).items():
            b2[f"{r}-{c}"] = (write_recipe(folder, f"{r}-{c}", apply(base[r], ch), f"{r}: {c}"), best_lr[r], r, c, ch)
    res = _val_scores(root, p, device, times, {k: v[:2] for k, v in b2.items()}, "b2", grounding=True)
    for k, (_, lr, r, c, ch) in b2.items():
        add(r, c, lr, apply(base[r], ch), res[k])
    # C: the controls of part FD, at hierd's rate (reported, never chosen)
    ctl = {c: (write_recipe(folder, c, weights_of(shipped_recipe(c)), f"control {c}"), best_lr["hierd"])
           for c in CONTROLS}
    res_c = _val_scores(root, p, device, times, ctl, "controls", grounding=True)
    controls = [{"config": c, "lr": best_lr["hierd"], "weights": weights_of(shipped_recipe(c)),
                 "score": val_score(res_c[c]["metrics"]), "metrics": res_c[c]["metrics"],
                 "grounding": res_c[c]["grounding"]} for c in CONTROLS]
    out = {"tried": tried, "controls": controls, "best_lr": best_lr, "teacher_grounding": res.get("_teacher_grounding"),
           "configs_tried": {r: len(v) for r, v in tried.items()}, "wall_seconds": times}
    assert all(out["configs_tried"][r] == len(p["lrs"]) + EXTRA for r in ("clip-kd", "clip-rd", "hierd")), out
    (root / "search.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def _small_search(root, p, device, times, folder, base, add, tried) -> dict:
    """--budget small (the docstring): A for SMALL_TUNED on both flavours, clip's rates on shapes,
    hierd-rel's SMALL_REL and the SMALL_CONTROLS on shapes at hierd's rate."""
    only = (FLAVOURS[0],)
    grid = {f"{r}@{lr:g}": (write_recipe(folder, r, base[r], f"{r} (shipped)"), lr) for r in SMALL_TUNED
            for lr in p["lrs"]}
    res = _val_scores(root, p, device, times, grid, "grid", grounding=True)
    clip = {f"clip@{lr:g}": (write_recipe(folder, "clip", base["clip"], "clip (shipped)"), lr) for lr in p["lrs"]}
    res |= _val_scores(root, p, device, times, clip, "grid-clip", grounding=True, flavours=only)
    for r in ("clip",) + SMALL_TUNED:
        for lr in p["lrs"]:
            add(r, r, lr, base[r], res[f"{r}@{lr:g}"])
    del tried["tinyclip"]
    best_lr = {r: max(rows, key=lambda x: x["score"])["lr"] for r, rows in tried.items()}
    rel = {f"hierd{c}": (write_recipe(folder, f"hierd{c}", apply(base["hierd"], FIRST["hierd"][c]), f"hierd: {c}"),
                         best_lr["hierd"]) for c in SMALL_REL}
    res_r = _val_scores(root, p, device, times, rel, "rel", grounding=True, flavours=only)
    tried["hierd-rel"] = [{"config": c, "lr": best_lr["hierd"], "weights": apply(base["hierd"], FIRST["hierd"][c]),
                           "score": val_score(res_r[f"hierd{c}"]["metrics"]), "metrics": res_r[f"hierd{c}"]["metrics"],
                           "grounding": res_r[f"hierd{c}"]["grounding"]} for c in SMALL_REL]
    ctl = {c: (write_recipe(folder, c, weights_of(shipped_recipe(c)), f"control {c}"), best_lr["hierd"])
           for c in SMALL_CONTROLS}
    res_c = _val_scores(root, p, device, times, ctl, "controls", grounding=True, flavours=only)
    controls = [{"config": c, "lr": best_lr["hierd"], "weights": weights_of(shipped_recipe(c)),
                 "score": val_score(res_c[c]["metrics"]), "metrics": res_c[c]["metrics"],
                 "grounding": res_c[c]["grounding"]} for c in SMALL_CONTROLS]
    out = {"budget": "small", "tried": tried, "controls": controls, "best_lr": best_lr,
           "teacher_grounding": res.get("_teacher_grounding"),
           "configs_tried": {r: len(v) for r, v in tried.items()}, "wall_seconds": times}
    assert all(out["configs_tried"][r] == len(p["lrs"]) for r in SMALL_TUNED), out
    (root / "search.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def select_phase(root: Path) -> dict:
    chosen = choose(json.loads((root / "search.json").read_text()))
    (root / "chosen.json").write_text(json.dumps(chosen, indent=2) + "\n")
    return chosen


def chosen_recipes(root: Path) -> dict[str, tuple[str, float]]:
    """recipe -> (recipe file, lr), from WORK/chosen.json (select writes it before any test number)."""
    chosen = json.loads((root / "chosen.json").read_text())
    folder = root / "recipes-chosen"
    return {r: (write_recipe(folder, r, c["weights"], f"{r}: the search's choice ({c['config']})"), c["lr"])
            for r, c in chosen.items()}


# --- final and long (the test split, once) -----------------------------------------------


def final_phase(flavour: str, root: Path, p: dict, device: str) -> dict:
    times: dict = {}
    w, teacher = prepare(flavour, root, p, device, times)
    recipes = chosen_recipes(root)
    names = FASHION_RECIPES if flavour == FASHION else p.get("final_recipes", FINAL_RECIPES)
    seeds = p["fashion_seeds"] if flavour == FASHION else p["seeds"]
    runs = [(s, r) for s in seeds for r in names]
    specs = run_many(lambda x: distill_export(w, w / "cache", f"final-{x[1]}-s{x[0]}", *recipes[x[1]], x[0], p,
                                              device, times)[None], runs)
    models = [("teacher", teacher)] + [(f"{r}@{s}", spec) for (s, r), spec in zip(runs, specs)]
    test = w / "scenes" / "test"
    scores = evaluate(test, models, w / "test-report.json", device, times, "eval-test")
    grounding = ground(test, models, w / "test-grounding.json", device, times)
    return {"flavour": flavour, "teacher": teacher, "seeds": list(seeds), "recipes": list(names),
            "lr": {r: recipes[r][1] for r in names}, "table": table(scores, names, seeds),
            "grounding": table(grounding, names, seeds, GROUNDING + tuple(f"{c}/{k}" for c in ("chance", "control")
                                                                          for k in GROUNDING)),
            "wall_seconds": times}


def long_phase(flavour: str, root: Path, p: dict, device: str) -> dict:
    times: dict = {}
    w, teacher = prepare(flavour, root, p, device, times, long=True)
    recipes = chosen_recipes(root)
    runs = [(s, r) for s in p["long_seeds"] for r in LONG_RECIPES]
    curve = tuple(e for e in CURVE_EPOCHS if e <= p["long_epochs"])
    specs = run_many(lambda x: distill_export(w, w / "cache-long", f"long-{x[1]}-s{x[0]}", *recipes[x[1]], x[0], p,
                                              device, times, epochs=p["long_epochs"], curve=curve), runs)
    val = w / f"val{VAL_SEEDS[0]}" / "test"
    curve_models = [("teacher", teacher)] + [(f"{r}@{s}@{e}", sp[e]) for (s, r), sp in zip(runs, specs) for e in curve]
    curve_scores = evaluate(val, curve_models, w / "val-curve-long.json", device, times, "eval-val")
    final_models = [("teacher", teacher)] + [(f"{r}@{s}", sp[None]) for (s, r), sp in zip(runs, specs)]
    test = w / "scenes-long" / "test"
    scores = evaluate(test, final_models, w / "test-report-long.json", device, times, "eval-test")
    grounding = ground(test, final_models, w / "test-grounding-long.json", device, times)
    t = curve_scores["teacher"]
    curves = {r: {e: [curve_scores[f"{r}@{s}@{e}"] for s in p["long_seeds"]] for e in curve} for r in LONG_RECIPES}
    return {"flavour": f"{flavour}, {p['long_factor']}× the images, {p['long_epochs']} epochs", "base_flavour": flavour,
            "teacher": teacher, "seeds": list(p["long_seeds"]), "recipes": list(LONG_RECIPES),
            "lr": {r: recipes[r][1] for r in LONG_RECIPES}, "table": table(scores, LONG_RECIPES, p["long_seeds"]),
            "grounding": table(grounding, LONG_RECIPES, p["long_seeds"],
                               GROUNDING + tuple(f"chance/{k}" for k in GROUNDING)),
            "curve": {r: {str(e): {k: [m[k] for m in ms] for k in R1} for e, ms in c.items()} for r, c in curves.items()},
            "teacher_val": {k: t[k] for k in R1},
            "epochs_to_90": {r: [epochs_to(curves[r], t, i, 0.9) for i in range(len(p["long_seeds"]))]
                             for r in LONG_RECIPES},
            "wall_seconds": times}


def epochs_to(curve: dict, teacher: dict, seed_index: int, share: float):
    """The first curve epoch at which one seed's student reaches `share` of the teacher's
    validation recall@1 in both directions; None if it never does."""
    for e in sorted(curve):
        m = curve[e][seed_index]
        if all(m[k] >= share * teacher[k] for k in R1):
            return e
    return None


def table(scores: dict, names, seeds, metrics=METRICS) -> dict:
    """{model: {metric: [value per seed]}} with the teacher first."""
    out = {"teacher": {k: [scores["teacher"].get(k)] for k in metrics}}
    for r in names:
        out[r] = {k: [scores[f"{r}@{s}"].get(k) for s in seeds] for k in metrics}
    return out


# --- statistics and reporting ----------------------------------------------------------------


def fmt(values: list) -> str:
    vals = [100 * v for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"


def t_interval(d: list[float], level: float = 0.95) -> tuple[float, float]:
    """The paired-t confidence interval of the mean of per-seed differences."""
    from scipy import stats

    n = len(d)
    m = statistics.mean(d)
    if n < 2:
        return (math.nan, math.nan)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(d) / math.sqrt(n)
    return (m - half, m + half)


def paired(a: list, b: list) -> str:
    """Per-seed differences a − b (points): mean, 95 % paired-t interval, seeds favouring each side."""
    d = [100 * (x - y) for x, y in zip(a, b) if x is not None and y is not None]
    if not d:
        return "–"
    win, lose = sum(x > 0 for x in d), sum(x < 0 for x in d)
    if len(d) < 2:
        return f"{d[0]:+.1f} ({win}–{lose})"
    lo, hi = t_interval(d)
    return f"{statistics.mean(d):+.1f} [{lo:+.1f}, {hi:+.1f}] ({win}–{lose})"


def search_markdown(s: dict, chosen: dict | None) -> str:
    pct = lambda m, k: f"{100 * m[k]:.1f}"  # noqa: E731
    lines = ["| recipe | configuration | lr | val score | " + " | ".join(f"{f} I→T / T→I" for f in FLAVOURS)
             + " | pointing (shapes, cluttered) |", "|---|---|---|---|" + "---|" * len(FLAVOURS) + "---|"]

    def row(r, x, mark=""):
        cells = []
        for f in FLAVOURS:
            ms = [m for k, m in x["metrics"].items() if k.startswith(f + "/")]
            cells.append(f"{100 * statistics.mean(m[R1[0]] for m in ms):.1f} / "
                         f"{100 * statistics.mean(m[R1[1]] for m in ms):.1f}" if ms else "–")
        g = {f: headline(v) for f, v in (x.get("grounding") or {}).items()}
        point = ", ".join(pct(g[f], "pointing_acc") if g.get(f, {}).get("pointing_acc") is not None else "–"
                          for f in FLAVOURS)
        return f"| {r} | {x['config']}{mark} | {x['lr']:g} | {100 * x['score']:.2f} | " + " | ".join(cells) + f" | {point} |"

    for r, rows in s["tried"].items():
        for x in rows:
            mark = ""
            for name, c in (chosen or {}).items():
                if (name == r or (r == "hierd" and name == "hierd-rel")) and (c["config"], c["lr"]) == (x["config"], x["lr"]):
                    mark += f" **({'chosen' if name == r else 'hierd-rel'})**"
            lines.append(row(r, x, mark))
    for x in s["controls"]:
        lines.append(row("control", x))
    lines += ["", "Configurations tried per recipe (rate grid + extra configurations): "
              + ", ".join(f"`{r}` {n}" for r, n in s["configs_tried"].items()) + f"; controls {len(s['controls'])}.", ""]
    return "\n".join(lines) + "\n"


def markdown(results: list[dict]) -> str:
    lines = []
    for res in results:
        lrs = ", ".join(f"{r} {lr:g}" for r, lr in res["lr"].items())
        lines += [f"### {res['flavour']} (seeds {', '.join(map(str, res['seeds']))}; lr: {lrs})", "",
                  "| model | I→T R@1 | T→I R@1 | swap attr | swap rel | replace obj | all hard neg | pointing | box mass "
                  "| pointing (control) | box mass (control) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        g = res.get("grounding", {})
        for name, row in res["table"].items():
            gr = g.get(name, {})
            lines.append(f"| {name} | " + " | ".join(fmt(row[k]) for k in METRICS) + " | "
                         + " | ".join(fmt(gr.get(k, [None])) for k in GROUNDING + tuple(f"control/{k}" for k in GROUNDING))
                         + " |")
        if g.get("teacher"):
            lines += ["", "Grounding (eval-grounding, the test split): control = the image's mean phrase instead of the "
                      "region's (no phrase-specific information). Chance (the box's share of the image as the model "
                      "sees it): pointing "
                      + fmt(g["teacher"].get("chance/pointing_acc", [None])) + ", box mass "
                      + fmt(g["teacher"].get("chance/box_mass", [None])) + "."]
        t = res["table"]
        rows = [(h, b) for h in ("hierd", "hierd-rel") for b in BASELINES if h in t and b in t]
        if rows:
            lines += ["", "Paired per-seed differences, model − baseline, in points: mean [95 % paired-t interval] "
                      "(seeds favouring the model – seeds favouring the baseline):", "",
                      "| model − baseline | I→T R@1 | T→I R@1 | swap attr | swap rel | replace obj | pointing |",
                      "|---|---|---|---|---|---|---|"]
            for h, b in rows:
                cells = [paired(t[h][k], t[b][k]) for k in R1 + HARDNEG]
                cells.append(paired(g[h]["pointing_acc"], g[b]["pointing_acc"]) if h in g and b in g else "–")
                lines.append(f"| {h} − {b} | " + " | ".join(cells) + " |")
        if "curve" in res:
            tv = res["teacher_val"]
            lines += ["", f"Validation recall@1 (draw {VAL_SEEDS[0]}) after each epoch, I→T / T→I, mean over seeds "
                      f"(teacher {100 * tv[R1[0]]:.1f} / {100 * tv[R1[1]]:.1f}):", "",
                      "| recipe | " + " | ".join(f"epoch {e}" for e in next(iter(res["curve"].values())))
                      + " | epochs to 90 % of the teacher (per seed) |", "|---|" + "---|" * (len(next(iter(res["curve"].values()))) + 1)]
            for r, c in res["curve"].items():
                cells = [f"{100 * statistics.mean(v[R1[0]]):.1f} / {100 * statistics.mean(v[R1[1]]):.1f}" for v in c.values()]
                reach = ", ".join("–" if e is None else str(e) for e in res["epochs_to_90"][r])
                lines.append(f"| {r} | " + " | ".join(cells) + f" | {reach} |")
        per = res["wall_seconds"].get("distill_per_model", {})
        if per:
            lines += ["", "Distill seconds per student (mean): " + ", ".join(
                f"{r} {statistics.mean(v):.0f}" for r, v in _by_recipe(per).items())]
        lines.append("")
    return "\n".join(lines) + "\n"


def _by_recipe(per: dict) -> dict:
    out: dict = {}
    for name, s in per.items():
        out.setdefault(name.rsplit("-s", 1)[0].split("-", 1)[1], []).append(s)
    return out


def plot_curves(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    longs = [r for r in results if "curve" in r]
    if not longs:
        return
    fig, axes = plt.subplots(1, len(longs), figsize=(6 * len(longs), 4), squeeze=False)
    for ax, res in zip(axes[0], longs):
        tv = r1(res["teacher_val"])
        for r, c in res["curve"].items():
            es = [int(e) for e in c]
            ax.plot(es, [100 * statistics.mean((a + b) / 2 for a, b in zip(v[R1[0]], v[R1[1]])) for v in c.values()],
                    marker="o", label=r)
        ax.axhline(100 * tv, color="k", lw=1, label="teacher")
        ax.axhline(90 * tv, color="k", lw=1, ls="--", label="90 % of the teacher")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("epochs over the cache")
        ax.set_ylabel("validation R@1, mean of both ways (%)")
        ax.set_title(res["flavour"])
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def report(root: Path) -> None:
    files = sorted((root / "results").glob("*.json"))
    results = [json.loads(f.read_text()) for f in files]
    if (root / "search.json").is_file():
        chosen = json.loads((root / "chosen.json").read_text()) if (root / "chosen.json").is_file() else None
        (root / "SEARCH.generated.md").write_text(search_markdown(json.loads((root / "search.json").read_text()), chosen))
    if not results:
        return
    order = {f"final-{f}": i for i, f in enumerate(FLAVOURS + (FASHION,))}
    results.sort(key=lambda r: order.get(r.get("part", ""), 99))
    (root / "results.json").write_text(json.dumps({"results": results}, indent=2) + "\n")
    (root / "RESULTS.generated.md").write_text(markdown(results))
    plot_curves(results, root / "curves.png")
    print((root / "RESULTS.generated.md").read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/experiment"))
    ap.add_argument("--phase", default="report", help="comma-separated: search, select, final, long, report")
    ap.add_argument("--flavours", default=",".join(FLAVOURS + (FASHION,)), help="final/long: these flavours")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--jobs", type=int, default=1, help="students trained at once, one torch thread each [1]")
    ap.add_argument("--budget", choices=("full", "small"), default="full", help="search: the protocol (see above)")
    ap.add_argument("--seeds", type=int, default=None,
                    help="final: only the first N of SEEDS (when compute runs out; results record the seeds used)")
    args = ap.parse_args(argv)
    global JOBS
    JOBS = args.jobs
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # one thread per student (inherited by commands)
    p = dict(PRESETS["quick" if args.quick else "full"], quick=args.quick)
    if args.seeds is not None:
        p["seeds"] = p["seeds"][: args.seeds]
    phases = args.phase.split(",")
    root = args.work
    (root / "results").mkdir(parents=True, exist_ok=True)
    started = time.time()
    if "search" in phases:
        search_phase(root, p, args.device, small=args.budget == "small")
    if args.budget == "small":
        p["final_recipes"] = SMALL_FINAL
    if "select" in phases:
        select_phase(root)
    flavours = args.flavours.split(",")
    for phase in ("final", "long"):
        if phase not in phases:
            continue
        for flavour in flavours:
            if phase == "long" and flavour == FASHION:
                continue
            t0 = time.time()
            res = (final_phase if phase == "final" else long_phase)(flavour, root, p, args.device)
            res["part"], res["phase_seconds"] = f"{phase}-{flavour}", round(time.time() - t0)
            (root / "results" / f"{phase}-{flavour}.json").write_text(json.dumps({"preset": p, **res}, indent=2) + "\n")
    report(root)
    print(f"experiment: {time.time() - started:,.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
