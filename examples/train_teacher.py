"""Reproduce the small Scenes teacher shipped in examples/teacher/ (used by `make demo`).

No pretrained CLIP can be downloaded on the machines hierdctl is built on, so the demo
ships its own teacher: a small CLIP (examples/configs/scenes-teacher.json: ViT 6×128 at
64 px, patch 8; text 4×128) trained from scratch with the CLIP loss on Scenes images that
the demo never uses (seed 1; the demo uses seed 0). It is trained with hierdctl's own
public commands:

    hierdctl scenes         --seed 1 --n-train 20000          the teacher's training data
    hierdctl cache-teacher  --teacher open_clip:tiny-test     a *bootstrap* cache: `distill`
                            --views 1 --clusters 0 ...        reads images and captions from a
                                                              cache; the `clip` recipe uses no
                                                              teacher feature, so any teacher
                                                              (here a random tiny one) will do
    hierdctl distill        --recipe clip --student open_clip:scenes-teacher.json
    hierdctl export         --format open_clip

then stores the weights as fp16 (half the bytes in the repository; open_clip loads them
into its fp32 model unchanged) and writes examples/teacher/TRAINING.json with the settings
and wall times. Shipped run: 2 CPU cores; see TRAINING.json for the time it took.

    python examples/train_teacher.py [--work runs/teacher] [--out examples/teacher] [--flavour shapes]

A teacher for another Scenes flavour goes to examples/teacher-FLAVOUR unless --out says
otherwise (the shipped shapes teacher is never replaced by accident), e.g. the cluttered
flavour (2-6 objects on photo crops; needs scikit-image, uses Fashion-MNIST when present):

    python examples/train_teacher.py --flavour cluttered --work runs/teacher-cluttered
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import hierdctl  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "configs" / "scenes-teacher.json"

SETTINGS = dict(seed=1, n_train=20000, epochs=6, batch_size=256, lr=1e-3, warmup=50, train_seed=0)
FLAVOURS = ("shapes", "fashion", "cluttered")
# Objects per image of each flavour, passed explicitly so the teacher's data never depends
# on what the CLI defaults to.
OBJECTS = {"shapes": (1, 4), "fashion": (1, 4), "cluttered": (2, 6)}


def to_fp16(model_dir: Path) -> float:
    """Rewrite open_clip_model.safetensors with fp16 floats (atomically), record it in the
    export manifest, and return the largest change of any weight."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "open_clip_model.safetensors"
    sd = load_file(str(path))
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    err = max(float((sd[k] - half[k].float()).abs().max()) for k in sd if sd[k].is_floating_point())
    tmp = path.with_name(path.name + ".tmp")
    save_file(half, str(tmp))
    os.replace(tmp, path)
    manifest = json.loads((model_dir / "export.json").read_text())
    manifest["weights_dtype"] = "float16"
    manifest["note"] = ("weights rounded to fp16 by examples/train_teacher.py after export; the export's checks "
                        f"were made on the fp32 weights (largest weight change {err:.2e})")
    (model_dir / "export.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return err


def model_card(s: dict, metrics: dict, times: dict) -> str:
    """The teacher's own card (export's generic card would name the bootstrap cache's random
    teacher, whose features the `clip` recipe never reads)."""
    rows = "\n".join(f"| `{k}` | {100 * v:.1f} |" for k, v in sorted(metrics.items()))
    return f"""# Scenes teacher (hierdctl demo)

A small CLIP trained from scratch with the CLIP loss on {s['n_train']:,} Scenes images
({s['flavour']} flavour, Scenes seed {s['seed']}: never the demo's data), {s['epochs']:g} epochs, batch
{s['batch_size']}, lr {s['lr']:g} with {s['warmup']} warm-up steps and a cosine schedule, on
{os.cpu_count()} CPU cores in {times.get('distill', 0) / 60:.0f} min. Architecture:
`{CONFIG.relative_to(HERE.parent)}` (ViT 6×128 at 64 px, patch 8; text 4×128, context 32; 128-d
embedding). Weights stored in fp16. Reproduce with `python examples/train_teacher.py`
(settings and wall times in TRAINING.json).

Load: `open_clip.create_model_and_transforms('local-dir:examples/teacher')`, or the model
spec `local-dir:examples/teacher` in any hierdctl command.

On its own Scenes test split (500 images, {s['flavour']}), in %:

| metric | value |
|---|---|
{rows}
"""


def publish(staged: Path, out: Path) -> None:
    """Copy the finished teacher to OUT atomically (hierdctl.atomic.publish_dir): only over an
    earlier hierdctl export (its export.json carries the export schema), never over another folder."""
    from hierdctl.atomic import publish_dir
    from hierdctl.errors import UserError

    try:
        publish_dir(out, lambda tmp: shutil.copytree(staged, tmp, dirs_exist_ok=True), marker="export.json",
                    schema="hierdctl.export/1", where="--out", overwrite=True, what="a teacher export")
    except UserError as e:
        sys.exit(f"train_teacher: {e}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/teacher"))
    ap.add_argument("--out", type=Path, default=None, help="[examples/teacher; examples/teacher-FLAVOUR for the others]")
    ap.add_argument("--flavour", default="shapes", choices=FLAVOURS, help="Scenes flavour [shapes]")
    ap.add_argument("--epochs", type=float, default=SETTINGS["epochs"])
    ap.add_argument("--n-train", type=int, default=SETTINGS["n_train"])
    ap.add_argument("--batch-size", type=int, default=SETTINGS["batch_size"])
    ap.add_argument("--n-test", type=int, default=500, help="images of the teacher's own test split")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=SETTINGS["seed"], help="Scenes seed of the teacher's data [1]")
    ap.add_argument("--train-seed", type=int, default=SETTINGS["train_seed"], help="distill --seed [0]")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = HERE / ("teacher" if args.flavour == "shapes" else f"teacher-{args.flavour}")
    lo, hi = OBJECTS[args.flavour]
    s = SETTINGS | {"epochs": args.epochs, "n_train": args.n_train, "batch_size": args.batch_size,
                    "flavour": args.flavour, "min_objects": lo, "max_objects": hi, "seed": args.seed,
                    "train_seed": args.train_seed}
    w, times = args.work, {}
    started = time.time()
    steps = int(round(s["epochs"] * (s["n_train"] // s["batch_size"])))
    warmup = str(s["warmup"]) if steps > s["warmup"] else "auto"  # a tiny run (tests) cannot warm up for 50 steps

    hierdctl("scenes", "--out", str(w / "scenes"), "--flavour", args.flavour, "--seed", str(s["seed"]),
             "--n-train", str(s["n_train"]), "--n-test", str(args.n_test), "--shard-size", "1000",
             "--min-objects", str(lo), "--max-objects", str(hi), times=times)
    hierdctl("cache-teacher", str(w / "scenes" / "train"), "--out", str(w / "bootstrap-cache"),
             "--teacher", "open_clip:tiny-test", "--views", "1", "--clusters", "0", "--max-phrases", "0",
             "--batch-size", "256", "--device", args.device, "--quiet", times=times)
    hierdctl("distill", str(w / "bootstrap-cache"), "--student", f"open_clip:{CONFIG}", "--recipe", "clip",
             "--out", str(w / "run"), "--epochs", str(s["epochs"]), "--batch-size", str(s["batch_size"]),
             "--lr", str(s["lr"]), "--warmup", warmup, "--seed", str(s["train_seed"]),
             "--device", args.device, "--save-every", "50", "--quiet",
             *(["--resume"] if (w / "run" / "checkpoints").is_dir() else []), times=times)
    staged = w / "export"
    hierdctl("export", str(w / "run"), "--out", str(staged), "--format", "open_clip", "--overwrite", times=times)
    to_fp16(staged)
    hierdctl("eval-retrieval", str(w / "scenes" / "test"), "--model", f"local-dir:{staged}", "--k", "1,5",
             "--device", args.device, "--out", str(w / "teacher-eval.json"), times=times)
    metrics = json.loads((w / "teacher-eval.json").read_text())["models"][0]["metrics"]
    (staged / "TRAINING.json").write_text(json.dumps({
        "script": "examples/train_teacher.py",
        "config": str(CONFIG.relative_to(HERE.parent)),
        "settings": s,
        "wall_seconds": times | {"total": round(time.time() - started, 1)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "eval_on_its_own_test_split": metrics,
    }, indent=2) + "\n")
    (staged / "README.md").write_text(model_card(s, metrics, times))
    publish(staged, args.out)
    print(f"teacher written to {args.out}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in metrics.items() if "@1" in k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
