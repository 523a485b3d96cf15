"""Every stage's typed configuration: each setting declared once, here.

A field is declared with `setting(...)` (hierdctl/settings.py): its default, its help
text, its role (identity / recorded / runtime) and, where it differs from --field-name,
its spelling on the command line. hierdctl/cli.py builds every command from these
classes, `settings.identity()` builds a cache's identity from them, and distill's resume
check reads its role sets from them: adding a setting is one field.

The stage's `run(config)` calls `validate()` once before any work; it raises a
`UserError` naming the flag at fault. Checks that need a stage's own knowledge (a saved
index's marker, Scenes' assets) live in that stage. This module imports nothing heavy
(no torch, no numpy): `hierdctl --help` reads it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hierdctl.errors import UserError, require
from hierdctl.settings import IDENTITY, RECORDED, RUNTIME, default, setting  # noqa: F401 (default: re-exported)

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (~ 0.25 GB RGB)
MAX_SEED = 2**32 - 1  # seeds reach numpy's and torch's generators (numpy refuses negative seeds)
MAX_WORKERS = 256  # DataLoader workers: each a forked process (-1: auto, distributed.auto_workers)
MAX_OPSET = 20  # the TorchScript ONNX exporter's newest opset (torch.onnx._constants), when torch does not say
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STORE_DTYPES = ("fp16", "fp32", "int8")  # cache float arrays (docs/cache-format.md)
INDEX_KINDS = ("flat", "ivf", "hnsw")  # eval-retrieval's FAISS indexes
# "all" is open_clip + onnx: hf is asked for by name (it needs transformers, and not every student maps).
EXPORT_FORMATS = ("open_clip", "onnx", "hf", "all")
# The `onnx` extra: exporting and checking the graphs, and writing the tokenizer files beside them.
ONNX_MODULES = ("onnx", "onnxruntime", "transformers")
REPORTERS = ("tensorboard", "wandb")  # distill --report-to: any of them (a comma list), or none
REPORTER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb"}
AUGMENTS = ("rrc+flip", "rrc+flip+randaugment")
# distill's caption per sample: a real one at random (the default), the first real one, a synthetic one
# (--captioner caches), any of them, or DataCompDR's real and synthetic in every step (both, averaged)
CAPTION_POLICIES = ("random", "first", "synthetic", "any", "real+synthetic")


# ----------------------------------------------------------------------------------
# Parsers of command-line text (value, flag) -> field value
# ----------------------------------------------------------------------------------


def parse_ks(text, where: str = "--k") -> list[int]:
    if isinstance(text, (list, tuple)):
        return [int(x) for x in text]
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated integers like 1,5,10, got {text!r}", where) from None
    require(bool(ks) and min(ks) >= 1, f"K must be positive integers, got {text!r}", where)
    return ks


def parse_pair(text, where: str) -> tuple[float, float]:
    if isinstance(text, (list, tuple)):
        return tuple(text)
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"expected two numbers 'LO,HI', got {text!r}", where) from None
    return a, b


def parse_int_pair(text, where: str) -> tuple[int, int]:
    return tuple(int(x) for x in parse_pair(text, where))


def parse_warmup(text, where: str = "--warmup") -> int | str | None:
    """The --warmup option: 'auto' or a whole number of steps."""
    if text is None or text == "auto" or isinstance(text, int):
        return text
    try:
        return int(text)
    except ValueError:
        raise UserError(f"expected auto or a number of steps, got {text!r}", where) from None


def parse_names(values, where: str, choices: tuple[str, ...], what: str) -> str:
    """A repeatable option of names, each value a name or a comma list ("a,b" or "--x a --x b"):
    the names given, in order, once each, as one comma list. An unknown or empty name is an
    error naming the flag; nothing given is dropped."""
    values = [values] if isinstance(values, str) else list(values or [])
    names: list[str] = []
    for v in values:
        for name in str(v).split(","):
            name = name.strip()
            require(bool(name), f"an empty {what} in {v!r} (give {', '.join(choices)}, comma-separated)", where)
            require(name in choices, f"unknown {what} {name!r} (choose from {', '.join(choices)})", where)
            if name not in names:
                names.append(name)
    require(bool(names), f"give a {what} ({', '.join(choices)})", where)
    return ",".join(names)


def parse_formats(values, where: str = "--format") -> str:
    return parse_names(values, where, EXPORT_FORMATS, "format")


def parse_reporters(values, where: str = "--report-to") -> str:
    text = parse_names(values, where, ("none",) + REPORTERS, "reporter")
    require(text == "none" or "none" not in text.split(","), f"none cannot be combined with a reporter ({text})",
            where)
    return text


def pair_text(pair) -> str:
    return ",".join(f"{x:g}" for x in pair)


def check_seed(seed, where: str = "--seed") -> None:
    require(isinstance(seed, int) and 0 <= seed <= MAX_SEED, f"must be an integer from 0 to {MAX_SEED}, got {seed!r}",
            where)


def check_workers(workers: int, where: str = "--workers") -> None:
    """DataLoader workers: -1 (auto), 0 (the main process) or up to MAX_WORKERS processes."""
    require(-1 <= workers <= MAX_WORKERS, f"must be -1 (auto), 0 (no worker process) or up to {MAX_WORKERS}, "
            f"got {workers}", where)


def _check_specs(models: list[str], where: str = "--model") -> None:
    from hierdctl.specs import parse_spec

    require(bool(models), f"give at least one {where} SPEC", where)
    for m in models:
        parse_spec(m, where)  # a malformed or unknown spec fails before any model loads


def check_report_path(out: Path | None, where: str = "--out", overwrite: bool = False) -> None:
    """A report path must name a file in an existing folder (checked before any model loads); an
    existing file is replaced only if hierdctl wrote it (hierdctl.reports.written_by_hierdctl) or
    `overwrite` is set."""
    if out is None:
        return
    out = Path(out)
    require(not out.is_dir(), f"{out} is a directory; give a file name such as {out / 'report.json'}", where)
    require(out.parent.is_dir(), f"the folder {out.parent} does not exist", where)
    from hierdctl.reports import written_by_hierdctl

    if (out.exists() or out.is_symlink()) and not overwrite and not written_by_hierdctl(out):
        raise UserError(f"{out} exists and was not written by hierdctl: add --overwrite to replace it, or give "
                        "another file", where)
    from hierdctl.atomic import check_writable

    check_writable(out, where)  # a read-only or unwritable folder: now, not after the evaluation


# Declarations several stages share (each stage's field still names its own default and help).
def _device(role=RUNTIME, help="auto, cpu, cuda or cuda:N."):
    return setting("auto", help=help, role=role)


def _quiet():
    return setting(False, help="No progress bar.", role=RUNTIME)


def _max_pixels(role):
    return setting(DEFAULT_MAX_PIXELS, help="Decompression-bomb limit; larger images are skipped.", role=role)


def _models():
    return setting(help="Model spec (repeatable); the first is the reference for retention %.", role=IDENTITY,
                   flags=("--model", "-m"), required=True, type=list[str])


# ----------------------------------------------------------------------------------
# Source options (hierdctl/sources.py's grammar): a group of options in every command that reads data
# ----------------------------------------------------------------------------------


@dataclass
class SourceOptions:
    """How a source spec is read. Its fields are options of every command that reads a source."""

    image_col: str = setting("image", help="Tables: the image-path column.", role=IDENTITY)
    caption_col: str = setting("caption", help="Tables: the caption column.", role=IDENTITY)
    image_root: Optional[str] = setting(None, help="Karpathy JSON: folder the image paths are relative to.",
                                        role=IDENTITY)
    split: str = setting("test", help="Karpathy JSON: split to read (train, restval, val, test, all).", role=IDENTITY)
    # The identity key keeps the name earlier caches recorded.
    rows_per_shard: int = setting(1000, help="Tables / Karpathy JSON: samples per output shard.", role=IDENTITY,
                                  key="rows_per_unit")

    @classmethod
    def from_record(cls, recorded: dict) -> "SourceOptions":
        """The options a cache recorded (its identity's "source_options", keyed as identity() keys them)."""
        keys = {(f.metadata["key"] or f.name): f.name for f in dataclasses.fields(cls)}
        return cls(**{keys[k]: v for k, v in recorded.items() if k in keys})


def _source_options():
    return setting(help="", role=IDENTITY, factory=SourceOptions, kind="group")


# ----------------------------------------------------------------------------------
# cache-teacher
# ----------------------------------------------------------------------------------


def _teachers(values, where: str) -> dict:
    """--teacher A [--teacher B …]: the first teacher and the ensemble's others."""
    values = [values] if isinstance(values, str) else list(values)
    require(bool(values), "give a --teacher SPEC", where)
    return {"teacher": values[0], "ensemble": tuple(values[1:])}


@dataclass
class CacheTeacherConfig:
    source: str = setting(help="Shards (data/{00000..00099}.tar, a dir, one .tar, or URLs: pipe:CMD, https://…, "
                               "file:…, s3://…), a .csv/.tsv/.jsonl, or a Karpathy .json.", role=IDENTITY,
                          kind="argument")
    out: Path = setting(help="Output cache directory (resumed if it exists).", role=RUNTIME,
                        flags=("--out", "-o"), required=True)
    teacher: str = setting(help="Model spec: open_clip:ARCH/TAG, open_clip:ARCH/CKPT, open_clip:CFG.json/CKPT, "
                                "local-dir:PATH, hf:REPO_OR_PATH. Repeat for an ensemble: every teacher's global "
                                "embeddings are cached; clusters, phrases, perturbations and crops come from the first.",
                           role=IDENTITY, flags=("--teacher", "-t"), type=list[str], parse=_teachers, spread=True,
                           required=True)
    source_options: SourceOptions = _source_options()
    ensemble: tuple[str, ...] = setting((), help="The ensemble's other teachers (the CLI's second --teacher on).",
                                        role=IDENTITY, kind="none")
    views: int = setting(2, help="Views per image: view 0 is the teacher's eval preprocessing, the rest random crops.",
                         role=IDENTITY)
    clusters: int = setting(8, help="K clusters of patch tokens per view (0: no clusters).", role=IDENTITY,
                            key="clusters.k")
    cluster_iters: int = setting(10, help="Spherical k-means iterations.", role=IDENTITY, key="clusters.iters")
    cluster_pos_weight: float = setting(0.0, help="Weight of patch position in clustering (0: features only).",
                                        role=IDENTITY, key="clusters.pos_weight")
    max_phrases: int = setting(4, help="Noun phrases kept per caption (0: none).", role=IDENTITY,
                               key="phrases.max_phrases")
    chunker: str = setting("auto", help="Phrase chunker: auto (spaCy if installed, else TextBlob), spacy, textblob.",
                           role=IDENTITY, key="phrases.chunker")
    perturbations: int = setting(0, help="Compositional perturbations per caption (noun chunks' modifiers, heads or "
                                         "places swapped) with the teacher's embeddings (0: none).",
                                 role=IDENTITY, key="perturbations.per_caption")
    cluster_crops: bool = setting(False, help="Also the teacher's embedding of each cluster's bounding-box crop "
                                              "(CLIPSelf-style; K extra forwards per view).", role=IDENTITY,
                                  flags=("--cluster-crops/--no-cluster-crops",))
    captioner: Optional[str] = setting(None, help="An open_clip CoCa spec: N generated captions per image beside the "
                                                  "real ones, embedded, chunked and perturbed like them (DataCompDR).",
                                       role=IDENTITY, key="captioner.spec", when=lambda c: bool(c.captioner),
                                       otherwise=None)
    synthetic_captions: int = setting(5, help="With --captioner: captions generated per image (top-p sampling, "
                                              "seeded per image).", role=IDENTITY, key="captioner.per_image",
                                      when=lambda c: bool(c.captioner), otherwise=None)
    store: str = setting("clusters", help="clusters, or tokens (also every patch token and text token feature).",
                         role=IDENTITY)
    store_images: bool = setting(True, help="Keep each original image in the cache (distill reads images from it).",
                                 role=IDENTITY, flags=("--store-images/--no-store-images",))
    dtype: str = setting("fp16", help="Storage of float arrays: fp16, fp32 or int8 (per-row scales).", role=IDENTITY)
    crop_scale: tuple[float, float] = setting((0.9, 1.0), help="RandomResizedCrop area range for views ≥ 1 "
                                              "(open_clip's training default).", role=IDENTITY,
                                              key="augment.crop_scale", type=str, parse=parse_pair, show=pair_text)
    crop_ratio: tuple[float, float] = setting((3 / 4, 4 / 3), help="RandomResizedCrop aspect range for views ≥ 1.",
                                              role=IDENTITY, key="augment.crop_ratio", type=str, parse=parse_pair,
                                              show=pair_text)
    flip_p: float = setting(0.5, help="Horizontal-flip probability for views ≥ 1.", role=IDENTITY, key="augment.flip_p")
    augment: str = setting("rrc+flip", help="Views ≥ 1: rrc+flip, or rrc+flip+randaugment (DataCompDR's; the drawn ops "
                                            "and magnitudes are stored and replayed exactly by distill).",
                           role=IDENTITY, key="augment.ops")
    randaugment: tuple[int, int] = setting((2, 9), help="RandAugment N,M: ops per view and magnitude (of 30).",
                                           role=IDENTITY, key="augment.randaugment",
                                           when=lambda c: c.augment.endswith("randaugment"), type=str,
                                           parse=parse_int_pair, show=lambda p: ",".join(map(str, p)))
    seed: int = setting(0, help="Seed of the augmentations (views depend on seed and image bytes only).",
                        role=IDENTITY)
    max_pixels: int = _max_pixels(IDENTITY)
    batch_size: int = setting(64, help="Images per teacher forward.", role=RUNTIME)
    device: str = _device()
    # The precision the teacher ran at is part of the identity, resolved (cache-teacher adds it).
    precision: str = setting("auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16.", role=RUNTIME)
    workers: int = setting(-1, help="DataLoader decoding workers (-1: the usable cores per process − 1).", role=RUNTIME)
    log_skipped: Optional[Path] = setting(None, help="Write every skipped sample (JSONL) here.", role=RUNTIME)
    overwrite: bool = setting(False, help="Remove what cache-teacher wrote in OUT and start over (never anything "
                                          "else); also replace a --log-skipped file hierdctl did not write.",
                              role=RUNTIME)
    rank: Optional[int] = setting(None, help="Job arrays without torchrun: this job's rank.", role=RUNTIME)
    world_size: Optional[int] = setting(None, help="Job arrays without torchrun: number of jobs.", role=RUNTIME)
    quiet: bool = _quiet()

    IDENTITY_CONSTANTS = {"clusters.algorithm": "spherical-kmeans/farthest-point-seeding",
                          "perturbations.ops": "swap_modifiers/swap_heads/swap_chunks"}

    def validate(self) -> "CacheTeacherConfig":
        self.out = Path(self.out)
        self.ensemble = tuple(self.ensemble)
        require(len(self.ensemble) <= 8, "at most 9 teachers", "--teacher")
        require(self.teacher not in self.ensemble and len(set(self.ensemble)) == len(self.ensemble),
                "a teacher is given twice", "--teacher")
        require(self.views >= 1, "must be at least 1", "--views")
        require(0 <= self.clusters <= 255, "must be within 0..255 (assignments are uint8)", "--clusters")
        require(self.cluster_iters >= 1, "must be at least 1", "--cluster-iters")
        require(math.isfinite(self.cluster_pos_weight) and self.cluster_pos_weight >= 0, "must be a finite number ≥ 0",
                "--cluster-pos-weight")
        require(0 <= self.max_phrases <= 64, "must be within 0..64", "--max-phrases")
        require(self.chunker in ("auto", "spacy", "textblob"), "must be auto, spacy or textblob", "--chunker")
        require(0 <= self.perturbations <= 16, "must be within 0..16", "--perturbations")
        require(not self.cluster_crops or self.clusters > 0, "needs clusters (--clusters K > 0)", "--cluster-crops")
        require(1 <= self.synthetic_captions <= 32, "must be within 1..32", "--synthetic-captions")
        require(self.store in ("clusters", "tokens"), "must be 'clusters' or 'tokens'", "--store")
        require(self.dtype in STORE_DTYPES, f"must be one of {', '.join(STORE_DTYPES)}", "--dtype")
        require(0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "must be 0 < lo ≤ hi ≤ 1", "--crop-scale")
        require(0 < self.crop_ratio[0] <= self.crop_ratio[1], "must be 0 < lo ≤ hi", "--crop-ratio")
        require(0 <= self.flip_p <= 1, "must be within [0, 1]", "--flip-p")
        require(self.augment in AUGMENTS, f"must be one of {', '.join(AUGMENTS)}", "--augment")
        n, m = self.randaugment
        require(1 <= n <= 8 and 0 <= m <= 30, f"must be N,M with 1 ≤ N ≤ 8 ops and magnitude 0 ≤ M ≤ 30, got {n},{m}",
                "--randaugment")
        require(self.batch_size >= 1, "must be at least 1", "--batch-size")
        require(self.precision in PRECISIONS, "must be auto, fp32, bf16 or fp16", "--precision")
        require(self.max_pixels > 0, "must be positive", "--max-pixels")
        check_seed(self.seed)
        check_workers(self.workers)
        require(self.source_options.rows_per_shard >= 1, "must be at least 1", "--rows-per-shard")
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"{self.out} exists and is not a directory", "--out")
        check_report_path(self.log_skipped, "--log-skipped", self.overwrite)
        return self


# ----------------------------------------------------------------------------------
# distill
# ----------------------------------------------------------------------------------


@dataclass
class DistillConfig:
    # cache, student, recipe and out may come from --config FILE: validate() requires them.
    cache: str = setting("", help="A teacher cache written by cache-teacher.", role=IDENTITY, kind="argument")
    student: str = setting("", help="Student: an open_clip architecture (ViT-T-16 ships), open_clip:CFG.json, or any "
                                    "model spec to start from weights.", role=IDENTITY)
    recipe: str = setting("", help="A shipped recipe name (see --list-recipes) or a recipe YAML file.", role=IDENTITY)
    out: str = setting("", help="Run directory (config, metrics, checkpoints, loss curves).", role=RECORDED,
                       flags=("--out", "-o"))
    epochs: Optional[float] = setting(None, help="Epochs over the cache (fractions allowed).", role=IDENTITY)
    steps: Optional[int] = setting(None, help="Optimizer steps (wins over --epochs).", role=IDENTITY)
    batch_size: int = setting(256, help="Global batch size, over all processes.", role=IDENTITY)
    lr: float = setting(1e-3, help="Peak learning rate.", role=IDENTITY)
    warmup: int | str = setting("auto", help="Linear warm-up steps before the cosine decay, or auto = min(10000, 10% "
                                             "of the run).", role=IDENTITY, type=str, parse=parse_warmup, show=str)
    weight_decay: float = setting(0.1, help="AdamW weight decay (not on gains, biases, scales).", role=IDENTITY)
    beta1: float = setting(0.9, help="AdamW β1.", role=IDENTITY, kind="none")
    beta2: float = setting(0.98, help="AdamW β2.", role=IDENTITY, kind="none")
    eps: float = setting(1e-6, help="AdamW ε.", role=IDENTITY, kind="none")
    grad_clip: Optional[float] = setting(1.0, help="Gradient-norm clipping.", role=IDENTITY)
    precision: str = setting("auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16.", role=IDENTITY)
    device: str = _device(help="auto, cpu, cuda, cuda:N.")
    seed: int = setting(0, help="Seed of initialisation, data order, views and masks.", role=IDENTITY)
    view_policy: str = setting("random", help="Cached view per sample: random or sequential.", role=IDENTITY,
                               kind="none")
    caption_policy: str = setting("random", help="Caption per sample: random (a real one), first, synthetic, any, or "
                                                 "real+synthetic (both, terms averaged).", role=IDENTITY, kind="none")
    exp_scales: bool = setting(False, help="κ scales are exponentiated (log κ is the parameter).", role=IDENTITY,
                               kind="none")
    mask_ratio: float = setting(0.75, help="MFD's share of masked student patches.", role=IDENTITY, kind="none")
    workers: int = setting(-1, help="DataLoader workers (-1: the usable cores per process − 1).", role=RUNTIME)
    # Runtime like --device: views, captions and data order are the same either way; only the
    # interpolation's rounding differs (within the tolerance docs/distill.md states).
    decode: str = setting("cpu", help="Where JPEGs are decoded and the views cut: cpu (loader workers) or gpu (the "
                                      "batch's JPEG bytes decoded on the training device with torchvision's nvJPEG "
                                      "decode_jpeg, crops, flips and eval views replayed there; PNG, CMYK and "
                                      "RandAugment views stay on the CPU).", role=RUNTIME)
    save_every: int = setting(1000, help="Checkpoint every N steps.", role=RECORDED)
    keep_checkpoints: int = setting(3, help="Checkpoints kept (the oldest are pruned).", role=RECORDED, kind="none")
    log_every: int = setting(10, help="Write metrics every N steps.", role=RECORDED)
    report_to: str = setting("none", help="none, or reporters (repeatable or a comma list): tensorboard (RUN_DIR/"
                                          "tensorboard) and/or wandb (W&B; WANDB_MODE=offline works without network): "
                                          "open_clip's scalar names (train/loss, train/<term>_loss, train/lr, "
                                          "train/scale, train/samples_per_second) and the run's hyperparameters.",
                             role=RUNTIME, type=list[str], parse=parse_reporters, show=lambda d: [d])
    images: Optional[str] = setting(None, help="For a cache made with --no-store-images: its source (the same shards or "
                                               "table, any location); images are joined by key and checked by sha256.",
                                    role=RECORDED)
    cache_reader: str = setting("auto", help="random (random access to local shards), stream (shards read in order, "
                                             "per-epoch shard shuffle and a shuffle buffer: caches on object storage), "
                                             "or auto (stream for a URL).", role=IDENTITY)
    shuffle_buffer: int = setting(1000, help="The streaming reader's shuffle buffer, in samples per reader.",
                                  role=IDENTITY, kind="none")
    resume: bool = setting(False, help="Continue the run in --out from its latest checkpoint.", role=RUNTIME)
    overwrite: bool = setting(False, help="Discard the run in --out (only what distill wrote) and start over.",
                              role=RUNTIME)
    quiet: bool = _quiet()

    def validate(self) -> "DistillConfig":
        for req in ("cache", "student", "recipe", "out"):
            require(bool(getattr(self, req)), f"{req} is required", "CACHE" if req == "cache" else f"--{req}")
        require(self.epochs is not None or self.steps is not None, "give --epochs or --steps", "--steps")
        require(self.steps is None or self.steps >= 1, "must be at least 1", "--steps")
        require(self.epochs is None or (math.isfinite(self.epochs) and self.epochs > 0),
                f"must be a positive finite number, got {self.epochs}", "--epochs")
        require(self.batch_size >= 2, "must be at least 2 (contrastive losses need negatives)", "--batch-size")
        require(math.isfinite(self.lr) and self.lr > 0, "must be a positive number", "--lr")
        require(self.warmup == "auto" or (isinstance(self.warmup, int) and self.warmup >= 0),
                f"must be auto or a number of steps ≥ 0, got {self.warmup!r}", "--warmup")
        require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "must be a finite number ≥ 0",
                "--weight-decay")
        # AdamW's own arguments: checked here, not as torch's ValueError deep in the run
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            require(isinstance(v, (int, float)) and 0 <= v < 1, f"must be within [0, 1), got {v}", f"--set {name}")
        require(math.isfinite(self.eps) and self.eps > 0, f"must be a positive number, got {self.eps}", "--set eps")
        check_seed(self.seed)
        check_workers(self.workers)
        require(self.grad_clip is None or self.grad_clip > 0, "must be positive", "--grad-clip")
        require(self.precision in PRECISIONS, "must be auto, fp32, bf16 or fp16", "--precision")
        require(self.view_policy in ("random", "sequential"), "must be random or sequential", "--set view_policy")
        require(self.caption_policy in CAPTION_POLICIES, f"must be one of {', '.join(CAPTION_POLICIES)}",
                "--set caption_policy")
        require(0 < self.mask_ratio < 1, "must be within (0, 1)", "--set mask_ratio")
        require(self.save_every >= 1, "must be at least 1", "--save-every")
        require(self.log_every >= 1, "must be at least 1", "--log-every")
        require(self.keep_checkpoints >= 1, "must be at least 1", "--set keep_checkpoints")
        self.report_to = parse_reporters(self.report_to)  # also what --config / --set gave
        require(self.cache_reader in ("auto", "random", "stream"), "must be auto, random or stream", "--cache-reader")
        require(self.decode in ("cpu", "gpu"), f"must be cpu or gpu, got {self.decode!r}", "--decode")
        require(self.shuffle_buffer >= 1, "must be at least 1", "--set shuffle_buffer")
        import importlib.util

        for r in self.reporters:
            require(importlib.util.find_spec(REPORTER_MODULES[r]) is not None,
                    f"{r} is not installed (pip install 'hierdctl[{r}]')", "--report-to")
        return self

    @property
    def reporters(self) -> tuple[str, ...]:
        """The reporters asked for (none: empty), in the order given."""
        return tuple(r for r in parse_reporters(self.report_to).split(",") if r != "none")

    def resolve_warmup(self, total_steps: int) -> int:
        """The warm-up in steps: auto = min(10,000, 10 % of the run); an explicit value must
        be below the run's length, or the learning rate would never reach --lr."""
        if self.warmup == "auto":
            return min(10_000, total_steps // 10)
        require(self.warmup < total_steps, f"{self.warmup} warm-up steps ≥ the run's {total_steps} steps: the "
                f"learning rate would never reach --lr {self.lr:g} (use fewer, or --warmup auto)", "--warmup")
        return self.warmup

    @classmethod
    def resolve(cls, cli: dict, config_file: str | None = None, sets: list[str] = ()) -> "DistillConfig":
        """Defaults < --config FILE.yaml < explicit command-line options < --set key=value.

        `cli` holds only the options given on the command line (None values are ignored)."""
        import yaml

        values: dict = {}
        if config_file:
            try:
                loaded = yaml.safe_load(Path(config_file).read_text()) or {}
            except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read config ({yaml_problem(e)})", config_file) from None
            if not isinstance(loaded, dict):
                raise UserError("must be a mapping of setting: value", config_file)
            for k, v in loaded.items():
                k = str(k).replace("-", "_")
                values[k] = _coerce(k, v, config_file)
        values.update({k: v for k, v in cli.items() if v is not None})
        for s in sets:
            if "=" not in s:
                raise UserError(f"expected key=value, got {s!r}", "--set")
            k, v = s.split("=", 1)
            k = k.strip().replace("-", "_")
            try:
                parsed = yaml.safe_load(v) if v.strip() else None
            except yaml.YAMLError as e:
                raise UserError(f"{s!r}: the value is not valid YAML ({yaml_problem(e)})", "--set") from None
            values[k] = _coerce(k, parsed, "--set")
        return cls(**values)


def yaml_problem(e: Exception) -> str:
    """PyYAML's multi-line message (context, caret, problem) as one line: the problem and where."""
    mark = getattr(e, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or (str(e).splitlines() or [type(e).__name__])[0]
    return f"{problem}{at}"


def _coerce(name: str, value, where: str):
    """Coerce a YAML/--set value to the type of DistillConfig.<name>."""
    fields = {f.name: f for f in dataclasses.fields(DistillConfig)}
    if name not in fields:
        close = [f for f in fields if f.startswith(name[:3])]
        raise UserError(f"unknown setting {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""), where)
    t = str(fields[name].type)
    parse = fields[name].metadata["cli"].parse
    if isinstance(value, (list, tuple)) and parse is not None:  # a YAML list of a repeatable option (report_to)
        return parse(value, where)
    if value is None:
        if "None" in t or "Optional" in t:
            return None
        raise UserError(f"{name} cannot be empty", where)
    try:
        if t.startswith("bool"):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if name == "warmup":
            return parse_warmup(str(value), where)
        if t.startswith("int") or t == "Optional[int]":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if t.startswith("float") or t == "Optional[float]":
            return float(value)
        return str(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{name}={value!r} is not a valid {t.split(' ')[0]}", where) from None


# ----------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------


@dataclass
class ExportConfig:
    source: Path = setting(help="A distill run dir (its latest checkpoint), its checkpoints/ folder, or a "
                                "step-NNNNNNN.safetensors.", role=IDENTITY, kind="argument")
    out: Path = setting(help="Output folder (written under a temporary name, then renamed into place).", role=RUNTIME,
                        flags=("--out", "-o"), required=True)
    format: str = setting("open_clip", help="What DIR holds, repeatable or a comma list: open_clip (open_clip's "
                                            "local dir), onnx (image and text graphs + tokenizer files), hf (the "
                                            "local dir + a transformers CLIPModel beside it, as LAION's open_clip "
                                            "repos are laid out), all (open_clip + onnx).",
                          role=IDENTITY, flags=("--format", "-f"), type=list[str], parse=parse_formats,
                          show=lambda d: [d])
    report: Optional[Path] = setting(None, help="An eval-retrieval / eval-zeroshot report.json whose metrics go into "
                                                "the model card.", role=IDENTITY)
    license: str = setting("other", help="The model card's license, a Hugging Face license id (mit, apache-2.0, "
                                         "cc-by-4.0, …; other: see the teacher's and the data's terms).",
                           role=IDENTITY)
    opset: int = setting(17, help="ONNX opset.", role=IDENTITY)
    atol: float = setting(1e-4, help="Largest ONNX-vs-PyTorch difference accepted (normalised embeddings).",
                          role=RUNTIME)
    overwrite: bool = setting(False, help="Replace an earlier export in --out.", role=RUNTIME)
    quiet: bool = setting(False, help="No notes.", role=RUNTIME)

    def validate(self) -> "ExportConfig":
        import importlib.util
        import re

        self.format = parse_formats(self.format)  # also a list or a comma list given in Python
        if "onnx" in self.formats:  # before any work, not after the open_clip export
            missing = [m for m in ONNX_MODULES if importlib.util.find_spec(m) is None]
            require(not missing, f"--format {self.format} needs {' and '.join(missing)}, which "
                    f"{'is' if len(missing) == 1 else 'are'} not installed (pip install 'hierdctl[onnx]')", "--format")
        if "hf" in self.formats and importlib.util.find_spec("transformers") is None:
            raise UserError(f"--format {self.format} needs transformers, which is not installed "
                            "(pip install 'hierdctl[hf]')", "--format")
        require(isinstance(self.license, str) and re.fullmatch(r"[a-z0-9][a-z0-9.+-]{0,63}", self.license) is not None,
                f"expected a Hugging Face license id such as mit, apache-2.0 or other, got {self.license!r}",
                "--license")
        newest = MAX_OPSET
        if "onnx" in self.formats:
            try:  # the exporter export uses (TorchScript) says how far it goes
                from torch.onnx import _constants

                newest = int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", MAX_OPSET))
            except (ImportError, AttributeError, ValueError):
                pass
        require(14 <= self.opset <= newest, f"ONNX opset must be from 14 to {newest} (the newest torch's TorchScript "
                f"exporter writes), got {self.opset}", "--opset")
        require(math.isfinite(self.atol) and self.atol > 0, f"must be a positive number, got {self.atol:g}", "--atol")
        if self.report is not None:
            require(Path(self.report).is_file(), f"{self.report} does not exist", "--report")
        return self

    @property
    def formats(self) -> tuple[str, ...]:
        """What is written, in a fixed order: all = open_clip + onnx; hf keeps the open_clip local dir
        beside the transformers files (one folder for both libraries)."""
        given = set(parse_formats(self.format).split(","))
        want = set()
        for f in given:
            want |= {"all": {"open_clip", "onnx"}, "hf": {"open_clip", "hf"}}.get(f, {f})
        return tuple(f for f in ("open_clip", "onnx", "hf") if f in want)


# ----------------------------------------------------------------------------------
# eval-retrieval / eval-zeroshot
# ----------------------------------------------------------------------------------


@dataclass
class EvalRetrievalConfig:
    source: str = setting(help="Shards (paths or URLs: pipe:CMD, https://…, file:…), a dir of shards, a "
                               ".csv/.tsv/.jsonl, or a Karpathy .json (COCO, Flickr30k).", role=IDENTITY,
                          kind="argument")
    models: list[str] = _models()
    ks: list[int] = setting(help="Comma-separated K of recall@K.", role=IDENTITY, factory=lambda: [1, 5, 10],
                            flags=("--k",), type=str, parse=parse_ks, show=lambda ks: ",".join(map(str, ks)))
    batch_size: int = setting(64, help="Images / captions per forward.", role=RUNTIME)
    device: str = _device(help="auto, cpu, cuda or cuda:N (FAISS uses a GPU whenever faiss-gpu sees one).")
    index: str = setting("flat", help="flat (exact IndexFlatIP), ivf or hnsw (approximate, labelled so).",
                         role=IDENTITY)
    nprobe: Optional[int] = setting(None, help="With --index ivf: lists probed per query (default nlist/8).",
                                    role=IDENTITY)
    out: Optional[Path] = setting(None, help="Write the JSON report here.", role=RUNTIME, flags=("--out", "-o"))
    save_index: Optional[Path] = setting(None, help="Keep each model's embeddings and FAISS indexes in this folder.",
                                         role=RUNTIME)
    overwrite: bool = setting(False, help="Replace an earlier --save-index folder, and an --out or --html file "
                                          "hierdctl did not write (its own are replaced anyway).", role=RUNTIME)
    source_options: SourceOptions = _source_options()
    max_pixels: int = _max_pixels(IDENTITY)
    workers: int = setting(4, help="Image-decoding threads (0: decode in the main thread).", role=RUNTIME)
    quiet: bool = _quiet()
    # issue 20: the visual report (hierdctl/html_report.py)
    html: Optional[Path] = setting(None, help="Also write a self-contained HTML report here: each model's top-k images "
                                              "for a sample of caption queries, hits marked, the metrics, the loss "
                                              "curves of exported students.", role=RUNTIME)
    html_queries: int = setting(20, help="With --html: caption queries shown (drawn with a fixed seed).",
                                role=RUNTIME)

    def validate(self) -> "EvalRetrievalConfig":
        _check_specs(self.models)
        require(bool(self.ks) and min(self.ks) >= 1, f"K must be positive integers, got {self.ks}", "--k")
        self.ks = sorted(set(self.ks))
        require(self.index in INDEX_KINDS, f"unknown index {self.index!r} ({', '.join(INDEX_KINDS)})", "--index")
        require(self.batch_size >= 1, "must be at least 1", "--batch-size")
        require(0 <= self.workers <= MAX_WORKERS, f"must be 0 (no worker process) or up to {MAX_WORKERS}", "--workers")
        require(self.nprobe is None or self.nprobe >= 1, "must be at least 1", "--nprobe")
        require(self.nprobe is None or self.index == "ivf", f"only applies to --index ivf (not {self.index})", "--nprobe")
        require(self.max_pixels > 0, f"must be positive, got {self.max_pixels}", "--max-pixels")
        check_report_path(self.out, overwrite=self.overwrite)
        check_report_path(self.html, "--html", overwrite=self.overwrite)  # issue 20
        require(self.html_queries >= 1, f"must be at least 1, got {self.html_queries}", "--html-queries")
        from hierdctl.reports import check_save_index

        check_save_index(self.save_index, self.overwrite)
        return self


@dataclass
class EvalZeroshotConfig:
    source: str = setting(help="A class-per-folder tree (ROOT/<class>/<image>) or WebDataset shards (paths or URLs) "
                               "with a class field.", role=IDENTITY, kind="argument")
    models: list[str] = _models()
    classnames: str = setting("imagenet", help="imagenet (open_clip's), folders (the folder names), or a file (.json "
                                               "list or one name a line).", role=IDENTITY)
    templates: str = setting("openai", help="openai (open_clip's 80 ImageNet prompts), simple, or a file of prompts "
                                            "with {c}.", role=IDENTITY)
    class_field: str = setting("cls", help="Shards: the member (KEY.cls) or .json field holding the class index.",
                               role=IDENTITY)
    batch_size: int = setting(64, help="Images / prompts per forward.", role=RUNTIME)
    device: str = _device()
    out: Optional[Path] = setting(None, help="Write the JSON report here.", role=RUNTIME, flags=("--out", "-o"))
    overwrite: bool = setting(False, help="Replace an --out file hierdctl did not write (its own reports are "
                                          "replaced anyway).", role=RUNTIME)
    max_pixels: int = _max_pixels(IDENTITY)
    workers: int = setting(4, help="Image-decoding threads (0: decode in the main thread).", role=RUNTIME)
    quiet: bool = _quiet()

    def validate(self) -> "EvalZeroshotConfig":
        _check_specs(self.models)
        require(self.batch_size >= 1, "must be at least 1", "--batch-size")
        require(0 <= self.workers <= MAX_WORKERS, f"must be 0 (no worker process) or up to {MAX_WORKERS}", "--workers")
        require(self.max_pixels > 0, f"must be positive, got {self.max_pixels}", "--max-pixels")
        check_report_path(self.out, overwrite=self.overwrite)
        return self


@dataclass
class EvalGroundingConfig:
    source: str = setting(help="Shards, a dir of shards or a .csv/.tsv/.jsonl whose sample JSON carries regions: "
                               "[{phrase, bbox}] in original pixels (hierdctl scenes writes them; docs/eval.md).",
                          role=IDENTITY, kind="argument")
    models: list[str] = _models()
    teacher: Optional[str] = setting(None, help="A teacher spec, evaluated first and the reference for retention %.",
                                     role=IDENTITY)
    batch_size: int = setting(64, help="Images / phrases per forward.", role=RUNTIME)
    device: str = _device()
    out: Optional[Path] = setting(None, help="Write the JSON report here.", role=RUNTIME, flags=("--out", "-o"))
    overwrite: bool = setting(False, help="Replace an --out file hierdctl did not write (its own reports are replaced "
                                          "anyway).", role=RUNTIME)
    source_options: SourceOptions = _source_options()
    max_pixels: int = _max_pixels(IDENTITY)
    workers: int = setting(4, help="Image-decoding threads (0: decode in the main thread).", role=RUNTIME)
    quiet: bool = _quiet()

    def validate(self) -> "EvalGroundingConfig":
        self.models = list(self.models)
        _check_specs(self.models)
        if self.teacher is not None:
            _check_specs([self.teacher], "--teacher")
        require(self.batch_size >= 1, "must be at least 1", "--batch-size")
        require(0 <= self.workers <= MAX_WORKERS, f"must be 0 (no worker process) or up to {MAX_WORKERS}", "--workers")
        require(self.max_pixels > 0, f"must be positive, got {self.max_pixels}", "--max-pixels")
        self.out = Path(self.out) if self.out is not None else None
        check_report_path(self.out, overwrite=self.overwrite)
        return self


# ----------------------------------------------------------------------------------
# scenes (the benchmark generator, stages/scenes.py)
# ----------------------------------------------------------------------------------

FLAVOURS = ("shapes", "fashion", "cluttered")
MIN_OBJECTS = 1
MAX_OBJECTS = {"shapes": 4, "fashion": 4, "cluttered": 6}  # the most an image of a flavour holds
DEFAULT_OBJECTS = {"shapes": (1, 4), "fashion": (1, 4), "cluttered": (2, 6)}  # (min, max) when unset
DEFAULT_TEXTURED_FRACTION = 0.5  # shapes and fashion: share of mottled backgrounds when unset
IMAGE_FORMATS = ("png", "jpg")
MAX_SAMPLES_PER_SPLIT = 10**9 - 1  # keys are nine digits
MAX_SHARDS = 10**5  # shard names are five digits


def _objects_help(end: int) -> str:
    which = "Fewest" if end == 0 else "Most"
    return (f"{which} objects per image [the flavour's default: "
            + ", ".join(f"{f} {r[end]}" for f, r in DEFAULT_OBJECTS.items()) + "].")


@dataclass
class ScenesConfig:
    out: str | Path = setting("out/scenes", help="Output folder: OUT/train/*.tar, OUT/test/*.tar, OUT/scenes.json.",
                              role=RUNTIME, flags=("--out", "-o"), required=True, type=Path)
    flavour: str = setting("shapes", help="shapes (drawn), fashion (Fashion-MNIST photos) or cluttered (2–6 shapes "
                                          "and Fashion-MNIST items on photo crops, occlusion, distractors).",
                           role=IDENTITY)
    n_train: int = setting(10_000, help="Training images.", role=IDENTITY)
    n_test: int = setting(1_000, help="Test images (these carry hard-negative captions).", role=IDENTITY)
    image_size: int = setting(64, help="Image side in pixels.", role=IDENTITY)
    shard_size: int = setting(1_000, help="Samples per shard.", role=IDENTITY)
    seed: int = setting(0, help="Seed; the same seed gives byte-identical shards.", role=IDENTITY)
    min_objects: Optional[int] = setting(None, help=_objects_help(0), role=IDENTITY)
    max_objects: Optional[int] = setting(None, help=_objects_help(1), role=IDENTITY)
    captions_per_image: int = setting(4, help="Captions per image.", role=IDENTITY)
    negatives_per_kind: int = setting(2, help="Hard negatives of each kind per test image (at most).", role=IDENTITY)
    image_format: str = setting("png", help="png or jpg (quality 95).", role=IDENTITY)
    textured_fraction: Optional[float] = setting(
        None, help=f"Share of mottled backgrounds, shapes and fashion [unset: {DEFAULT_TEXTURED_FRACTION}].",
        role=IDENTITY)
    fashion_path: Optional[Path] = setting(None, help="Folder of Fashion-MNIST IDX files (default: Debian's "
                                                      "dataset-fashion-mnist), for fashion and cluttered (cluttered "
                                                      "falls back to shapes only without it).", role=IDENTITY)
    clip_benchmark: bool = setting(False, help="Also write OUT/clip_benchmark: the test split in CLIP_benchmark's wds "
                                               "layout, every caption.", role=RUNTIME,
                                   flags=("--clip-benchmark/--no-clip-benchmark",))

    def object_range(self) -> tuple[int, int]:
        """(fewest, most) objects per image: the fields, or the flavour's defaults."""
        lo, hi = DEFAULT_OBJECTS.get(self.flavour, (1, 4))
        return (lo if self.min_objects is None else self.min_objects, hi if self.max_objects is None else self.max_objects)

    def texture_share(self) -> float:
        """Share of mottled backgrounds (shapes and fashion; cluttered backgrounds are photos)."""
        return DEFAULT_TEXTURED_FRACTION if self.textured_fraction is None else self.textured_fraction

    def validate(self) -> "ScenesConfig":
        """Check every field, and that the flavour's assets are there (hierdctl/scenes_assets.py);
        raise UserError naming the flag at fault. Returns self."""

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not str(self.out).strip():
            raise UserError("an output folder is required", where="--out")
        if self.flavour not in FLAVOURS:
            raise UserError(f"unknown flavour {self.flavour!r}; choose one of {', '.join(FLAVOURS)}", where="--flavour")
        for flag, v in (("--n-train", self.n_train), ("--n-test", self.n_test)):
            if not is_int(v) or not 0 <= v <= MAX_SAMPLES_PER_SPLIT:
                raise UserError(f"must be an integer from 0 to {MAX_SAMPLES_PER_SPLIT}, got {v!r}", where=flag)
        if self.n_train + self.n_test == 0:
            raise UserError("nothing to generate: --n-train and --n-test are both 0", where="--n-train")
        # Below 32 px a small object is under 7 px wide and shapes stop being recognisable.
        if not is_int(self.image_size) or not 32 <= self.image_size <= 1024:
            raise UserError(f"must be an integer from 32 to 1024, got {self.image_size!r}", where="--image-size")
        if not is_int(self.shard_size) or self.shard_size < 1:
            raise UserError(f"must be a positive integer, got {self.shard_size!r}", where="--shard-size")
        if math.ceil(max(self.n_train, self.n_test) / self.shard_size) > MAX_SHARDS:
            raise UserError(f"more than {MAX_SHARDS} shards per split; raise it", where="--shard-size")
        if not is_int(self.seed) or self.seed < 0:
            raise UserError(f"must be a non-negative integer, got {self.seed!r}", where="--seed")
        most = MAX_OBJECTS[self.flavour]
        lo, hi = self.object_range()
        if not is_int(lo) or not MIN_OBJECTS <= lo <= most:
            raise UserError(f"must be from {MIN_OBJECTS} to {most} for {self.flavour}, got {lo!r}", where="--min-objects")
        if not is_int(hi) or not lo <= hi <= most:
            raise UserError(f"must be from --min-objects ({lo}) to {most} for {self.flavour}, got {hi!r}", where="--max-objects")
        if not is_int(self.captions_per_image) or not 1 <= self.captions_per_image <= 8:
            raise UserError(f"must be from 1 to 8, got {self.captions_per_image!r}", where="--captions-per-image")
        if not is_int(self.negatives_per_kind) or not 1 <= self.negatives_per_kind <= 5:
            raise UserError(f"must be from 1 to 5, got {self.negatives_per_kind!r}", where="--negatives-per-kind")
        if self.image_format not in IMAGE_FORMATS:
            raise UserError(f"must be one of {', '.join(IMAGE_FORMATS)}, got {self.image_format!r}", where="--image-format")
        share = self.textured_fraction
        if share is not None:
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
                raise UserError(f"must be a number from 0 to 1, got {share!r}", where="--textured-fraction")
            if self.flavour == "cluttered":
                raise UserError("cluttered backgrounds are always photos; the mottled share applies to "
                                "--flavour shapes and fashion", where="--textured-fraction")
        if not isinstance(self.clip_benchmark, bool):
            raise UserError(f"must be true or false, got {self.clip_benchmark!r}", where="--clip-benchmark")
        if self.clip_benchmark and self.n_test == 0:
            raise UserError("the CLIP_benchmark copy is of the test split: --n-test is 0", where="--clip-benchmark")
        from hierdctl import scenes_assets

        if self.flavour == "fashion" or (self.flavour == "cluttered" and self.fashion_path is not None):
            folder = scenes_assets.fashion_dir(self.fashion_path)
            for split, n in (("train", self.n_train), ("test", self.n_test)):
                if n:
                    scenes_assets.fashion_split_files(folder, split)  # raises when a file is missing
        elif self.fashion_path is not None:
            raise UserError("only the fashion and cluttered flavours read Fashion-MNIST", where="--fashion-path")
        if self.flavour == "cluttered":
            scenes_assets.skimage_data()  # raises when scikit-image is missing
        return self


# ----------------------------------------------------------------------------------
# embed / index / search (issue 20: a collection embedded, indexed and searched)
# ----------------------------------------------------------------------------------

EMBED_MODALITIES = ("both", "image", "text")  # hierdctl/embeddings_format.py's MODALITIES
EMBED_DTYPES = ("fp16", "fp32")
INDEX_TYPES = ("flat", "ivf", "hnsw", "pq")  # hierdctl/index_format.py builds them
INDEX_OVER = ("auto", "image", "text")


def _check_out_dir(out, where: str = "--out") -> None:
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"{out} exists and is not a directory", where)


@dataclass
class EmbedConfig:
    source: str = setting(help="Shards (paths or URLs), a dir of shards, a .csv/.tsv/.jsonl, or a Karpathy .json; "
                               "captions are optional (an image collection), or images are (--modality text).",
                          role=IDENTITY, kind="argument")
    model: str = setting(help="Model spec: open_clip:ARCH/TAG, local-dir:PATH (an export), hf:REPO_OR_PATH, ….",
                         role=IDENTITY, flags=("--model", "-m"), required=True)
    out: Path = setting(help="Output embeddings folder (resumed if it exists).", role=RUNTIME, flags=("--out", "-o"),
                        required=True)
    modality: str = setting("both", help="both (every image, and the captions a sample has), image, or text (the "
                                         "captions; images are not read).", role=IDENTITY)
    dtype: str = setting("fp16", help="Storage of the embeddings: fp16 or fp32.", role=IDENTITY)
    source_options: SourceOptions = _source_options()
    max_pixels: int = _max_pixels(IDENTITY)
    # The precision the model ran at is part of the identity, resolved (embed records it).
    precision: str = setting("auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16.", role=RUNTIME)
    batch_size: int = setting(64, help="Images / captions per forward.", role=RUNTIME)
    device: str = _device()
    workers: int = setting(4, help="Image-decoding threads (0: decode in the main thread).", role=RUNTIME)
    overwrite: bool = setting(False, help="Remove what embed wrote in OUT and start over (never anything else).",
                              role=RUNTIME)
    quiet: bool = _quiet()

    def validate(self) -> "EmbedConfig":
        _check_specs([self.model])
        self.out = Path(self.out)
        require(self.modality in EMBED_MODALITIES, f"must be one of {', '.join(EMBED_MODALITIES)}, got "
                f"{self.modality!r}", "--modality")
        require(self.dtype in EMBED_DTYPES, f"must be one of {', '.join(EMBED_DTYPES)}, got {self.dtype!r}", "--dtype")
        require(self.precision in PRECISIONS, "must be auto, fp32, bf16 or fp16", "--precision")
        require(self.batch_size >= 1, "must be at least 1", "--batch-size")
        require(0 <= self.workers <= MAX_WORKERS, f"must be 0 (no worker process) or up to {MAX_WORKERS}", "--workers")
        require(self.max_pixels > 0, f"must be positive, got {self.max_pixels}", "--max-pixels")
        require(self.source_options.rows_per_shard >= 1, "must be at least 1", "--rows-per-shard")
        _check_out_dir(self.out)
        return self


@dataclass
class IndexConfig:
    embeddings: Path = setting(help="An embeddings folder written by hierdctl embed.", role=IDENTITY, kind="argument")
    out: Optional[Path] = setting(None, help="The index folder (default: DIR/index).", role=RUNTIME,
                                  flags=("--out", "-o"))
    index_type: str = setting("flat", help="flat (exact), ivf (IVF-Flat, nlist ≈ 4·√N), hnsw (HNSW-Flat, M 32) or "
                                           "pq "
                                           "(product quantisation, m sized to the dimension); approximate ones get "
                                           "their recall@10 against exact measured.", role=IDENTITY)
    over: str = setting("auto", help="Index the image rows or the caption rows (auto: images when there are any).",
                        role=IDENTITY)
    nprobe: Optional[int] = setting(None, help="With --index-type ivf: lists probed per query (default nlist/8).",
                                    role=IDENTITY)
    recall_queries: int = setting(1000, help="Held-out rows of the collection searched to measure recall@10 against "
                                             "exact (0: not measured).", role=RECORDED)
    seed: int = setting(0, help="Seed of the training sample and the recall queries.", role=IDENTITY)
    overwrite: bool = setting(False, help="Replace an earlier index in --out.", role=RUNTIME)
    quiet: bool = _quiet()

    def validate(self) -> "IndexConfig":
        self.embeddings = Path(self.embeddings)
        require(self.embeddings.is_dir(), f"{self.embeddings} is not a directory", "DIR")
        require(self.index_type in INDEX_TYPES, f"unknown index type {self.index_type!r} ({', '.join(INDEX_TYPES)})",
                "--index-type")
        require(self.over in INDEX_OVER, f"must be one of {', '.join(INDEX_OVER)}, got {self.over!r}", "--over")
        require(self.nprobe is None or self.nprobe >= 1, "must be at least 1", "--nprobe")
        require(self.nprobe is None or self.index_type == "ivf", f"only applies to --index-type ivf (not "
                f"{self.index_type})", "--nprobe")
        require(self.recall_queries >= 0, "must be 0 or more", "--recall-queries")
        require(self.seed >= 0, "must be 0 or more", "--seed")
        if self.out is None:
            self.out = self.embeddings / "index"
        self.out = Path(self.out)
        _check_out_dir(self.out)
        return self


@dataclass
class SearchConfig:
    index: Path = setting(help="An index folder written by hierdctl index.", role=IDENTITY, kind="argument")
    model: Optional[str] = setting(None, help="Model spec of the queries (default: the model the collection was "
                                              "embedded with); its weights must be the same.", role=IDENTITY,
                                   flags=("--model", "-m"))
    texts: list[str] = setting(help="A text query (repeatable).", role=IDENTITY, factory=list, flags=("--text", "-t"))
    images: list[Path] = setting(help="An image file as the query (repeatable).", role=IDENTITY, factory=list,
                                 flags=("--image", "-i"))
    k: int = setting(10, help="Results per query.", role=IDENTITY, flags=("--k",))
    max_pixels: int = _max_pixels(IDENTITY)
    device: str = _device()
    quiet: bool = _quiet()

    def validate(self) -> "SearchConfig":
        self.index = Path(self.index)
        require(self.index.is_dir(), f"{self.index} is not a directory", "INDEX")
        if self.model is not None:
            _check_specs([self.model])
        self.texts, self.images = list(self.texts), [Path(p) for p in self.images]
        require(bool(self.texts or self.images), "give a query: --text TEXT or --image PATH", "--text")
        for t in self.texts:
            require(isinstance(t, str) and bool(t.strip()), f"a query must be non-empty text, got {t!r}", "--text")
        for p in self.images:
            require(p.is_file(), f"{p} does not exist or is not a file", "--image")
        require(1 <= self.k <= 10_000, f"must be within 1..10000, got {self.k}", "--k")
        require(self.max_pixels > 0, f"must be positive, got {self.max_pixels}", "--max-pixels")
        return self
