"""Every stage's typed configuration: its fields, their defaults (once, here) and its checks.

The CLI builds one of these from its options — each option's default is read from the
field below, so a default exists in exactly one place — and hands it to the stage's
`run(config)`, which calls `validate()` once before any work. `validate()` raises a
`UserError` naming the flag at fault. This module imports nothing heavy (no torch, no
numpy): `hierdctl --help` reads it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from hierdctl.errors import UserError, require

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (~ 0.25 GB RGB)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STORE_DTYPES = ("fp16", "fp32", "int8")  # cache float arrays (docs/cache-format.md)
INDEX_KINDS = ("flat", "ivf", "hnsw")  # eval-retrieval's FAISS indexes
# "all" is open_clip + onnx: hf is asked for by name (it needs transformers, and not every student maps).
EXPORT_FORMATS = ("open_clip", "onnx", "hf", "all")
ONNX_MODULES = ("onnx", "onnxruntime")  # the `onnx` extra: exporting and checking the graphs
REPORT_TO = ("none", "tensorboard")


def default(cls, name: str):
    """The default of field `name` of dataclass `cls` (the CLI shows and uses it)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


@dataclass
class SourceOptions:
    """How a source spec is read (hierdctl/sources.py's grammar)."""

    image_col: str = "image"  # tables: the image-path column
    caption_col: str = "caption"  # tables: the caption column
    image_root: str | None = None  # Karpathy JSON; tables resolve paths against their own folder
    split: str = "test"  # Karpathy JSON
    rows_per_unit: int = 1000  # tables and Karpathy JSON: samples per output shard


def check_report_path(out: Path | None, where: str = "--out") -> None:
    """A report path must name a file in an existing folder (checked before any model loads)."""
    if out is None:
        return
    out = Path(out)
    require(not out.is_dir(), f"{out} is a directory; give a file name such as {out / 'report.json'}", where)
    require(out.parent.is_dir(), f"the folder {out.parent} does not exist", where)


def parse_ks(text: str, where: str = "--k") -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated integers like 1,5,10, got {text!r}", where) from None
    require(bool(ks) and min(ks) >= 1, f"K must be positive integers, got {text!r}", where)
    return ks


def parse_pair(text: str, where: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"expected two numbers 'LO,HI', got {text!r}", where) from None
    return a, b


def _check_specs(models: list[str]) -> None:
    from hierdctl.specs import parse_spec

    require(bool(models), "give at least one --model SPEC", "--model")
    for m in models:
        parse_spec(m, "--model")  # a malformed or unknown spec fails before any model loads


# ----------------------------------------------------------------------------------
# cache-teacher
# ----------------------------------------------------------------------------------


@dataclass
class CacheTeacherConfig:
    source: str
    out: Path
    teacher: str
    source_options: SourceOptions = field(default_factory=SourceOptions)
    views: int = 2  # view 0 = the teacher's eval preprocessing, the rest random crops
    clusters: int = 8
    cluster_iters: int = 10
    cluster_pos_weight: float = 0.0
    max_phrases: int = 4
    chunker: str = "auto"  # auto (spaCy if installed, else TextBlob) | spacy | textblob
    perturbations: int = 0  # compositional caption perturbations per caption (hierdctl/perturb.py), 0 = none
    cluster_crops: bool = False  # also the teacher's embedding of each cluster's crop (CLIPSelf-style)
    store: str = "clusters"  # "clusters" | "tokens"
    store_images: bool = True
    dtype: str = "fp16"
    crop_scale: tuple[float, float] = (0.9, 1.0)  # open_clip's training default
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    batch_size: int = 64
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast on GPU)
    workers: int = -1  # -1: min(8, cpus - 1)
    log_skipped: Path | None = None
    overwrite: bool = False
    rank: int | None = None
    world_size: int | None = None
    quiet: bool = False

    def validate(self) -> "CacheTeacherConfig":
        self.out = Path(self.out)
        require(self.views >= 1, "must be at least 1", "--views")
        require(0 <= self.clusters <= 255, "must be within 0..255 (assignments are uint8)", "--clusters")
        require(self.cluster_iters >= 1, "must be at least 1", "--cluster-iters")
        require(self.cluster_pos_weight >= 0, "must be ≥ 0", "--cluster-pos-weight")
        require(0 <= self.max_phrases <= 64, "must be within 0..64", "--max-phrases")
        require(self.chunker in ("auto", "spacy", "textblob"), "must be auto, spacy or textblob", "--chunker")
        require(0 <= self.perturbations <= 16, "must be within 0..16", "--perturbations")
        require(not self.cluster_crops or self.clusters > 0, "needs clusters (--clusters K > 0)", "--cluster-crops")
        require(self.store in ("clusters", "tokens"), "must be 'clusters' or 'tokens'", "--store")
        require(self.dtype in STORE_DTYPES, f"must be one of {', '.join(STORE_DTYPES)}", "--dtype")
        require(0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "must be 0 < lo ≤ hi ≤ 1", "--crop-scale")
        require(0 < self.crop_ratio[0] <= self.crop_ratio[1], "must be 0 < lo ≤ hi", "--crop-ratio")
        require(0 <= self.flip_p <= 1, "must be within [0, 1]", "--flip-p")
        require(self.batch_size >= 1, "must be at least 1", "--batch-size")
        require(self.precision in PRECISIONS, "must be auto, fp32, bf16 or fp16", "--precision")
        require(self.max_pixels > 0, "must be positive", "--max-pixels")
        require(self.source_options.rows_per_unit >= 1, "must be at least 1", "--rows-per-shard")
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"{self.out} exists and is not a directory", "--out")
        return self

    def identity(self) -> dict:
        """Everything that decides the cache's bytes; a rerun must match it to resume."""
        o = self.source_options
        return {
            "source": self.source,
            "source_options": {"image_col": o.image_col, "caption_col": o.caption_col, "split": o.split,
                               "image_root": o.image_root, "rows_per_unit": o.rows_per_unit},
            "teacher": self.teacher,
            "views": self.views,
            "clusters": {"k": self.clusters, "iters": self.cluster_iters, "pos_weight": self.cluster_pos_weight,
                         "algorithm": "spherical-kmeans/farthest-point-seeding"},
            "phrases": {"max_phrases": self.max_phrases, "chunker": self.chunker},
            "perturbations": {"per_caption": self.perturbations, "ops": "swap_modifiers/swap_heads/swap_chunks"},
            "cluster_crops": self.cluster_crops,
            "store": self.store,
            "store_images": self.store_images,
            "dtype": self.dtype,
            "augment": {"crop_scale": list(self.crop_scale), "crop_ratio": list(self.crop_ratio), "flip_p": self.flip_p},
            "seed": self.seed,
            "max_pixels": self.max_pixels,
        }


# ----------------------------------------------------------------------------------
# distill
# ----------------------------------------------------------------------------------


@dataclass
class DistillConfig:
    cache: str
    student: str
    recipe: str
    out: str
    epochs: float | None = None
    steps: int | None = None
    batch_size: int = 256  # global, over all ranks
    lr: float = 1e-3
    warmup: int | str = "auto"  # steps, or auto = min(10,000, 10% of the run's steps)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float | None = 1.0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"
    seed: int = 0
    view_policy: str = "random"  # random | sequential
    caption_policy: str = "random"  # random | first
    exp_scales: bool = False
    mask_ratio: float = 0.75
    workers: int = -1
    save_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    report_to: str = "none"  # none | tensorboard (scalars under RUN_DIR/tensorboard)
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False

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
        require(self.weight_decay >= 0, "must be ≥ 0", "--weight-decay")
        require(self.grad_clip is None or self.grad_clip > 0, "must be positive", "--grad-clip")
        require(self.precision in PRECISIONS, "must be auto, fp32, bf16 or fp16", "--precision")
        require(self.view_policy in ("random", "sequential"), "must be random or sequential", "--set view_policy")
        require(self.caption_policy in ("random", "first"), "must be random or first", "--set caption_policy")
        require(0 < self.mask_ratio < 1, "must be within (0, 1)", "--set mask_ratio")
        require(self.save_every >= 1, "must be at least 1", "--save-every")
        require(self.log_every >= 1, "must be at least 1", "--log-every")
        require(self.keep_checkpoints >= 1, "must be at least 1", "--set keep_checkpoints")
        require(self.report_to in REPORT_TO, f"must be one of {', '.join(REPORT_TO)}", "--report-to")
        if self.report_to == "tensorboard":
            import importlib.util

            require(importlib.util.find_spec("tensorboard") is not None,
                    "tensorboard is not installed (pip install 'hierdctl[tensorboard]')", "--report-to")
        return self

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
                raise UserError(f"cannot read config ({e})", config_file) from None
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
            values[k] = _coerce(k, yaml.safe_load(v) if v.strip() else None, "--set")
        for req in ("cache", "student", "recipe", "out"):
            values.setdefault(req, "")
        return cls(**values)


# Settings a resumed run must share with the run it continues.
# steps/epochs too: the cosine schedule is a function of the run's length.
RESUME_KEYS = ("cache", "student", "recipe", "steps", "epochs", "batch_size", "lr", "warmup", "weight_decay",
               "beta1", "beta2", "eps", "grad_clip", "seed", "view_policy", "caption_policy", "exp_scales",
               "mask_ratio", "precision")
# Execution details that do not enter the resolved config.
RUNTIME_KEYS = ("resume", "overwrite", "quiet", "device", "workers", "report_to")


def _coerce(name: str, value, where: str):
    """Coerce a YAML/--set value to the type of DistillConfig.<name>."""
    fields = {f.name: f for f in dataclasses.fields(DistillConfig)}
    if name not in fields:
        close = [f for f in fields if f.startswith(name[:3])]
        raise UserError(f"unknown setting {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""), where)
    t = str(fields[name].type)
    if value is None:
        if "None" in t:
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
        if t.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if t.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{name}={value!r} is not a valid {t.split(' ')[0]}", where) from None


def parse_warmup(text: str | None, where: str = "--warmup") -> int | str | None:
    """The --warmup option: 'auto' or a whole number of steps."""
    if text is None or text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise UserError(f"expected auto or a number of steps, got {text!r}", where) from None


# ----------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------


@dataclass
class ExportConfig:
    source: Path  # run dir, its checkpoints/ folder, or a step-NNNNNNN.safetensors
    out: Path
    format: str = "open_clip"
    report: Path | None = None  # an eval-retrieval / eval-zeroshot report for the model card
    opset: int = 17
    atol: float = 1e-4  # ONNX vs PyTorch, on L2-normalised embeddings
    overwrite: bool = False
    quiet: bool = False

    def validate(self) -> "ExportConfig":
        import importlib.util

        require(self.format in EXPORT_FORMATS, f"unknown format {self.format!r} ({', '.join(EXPORT_FORMATS)})",
                "--format")
        if "onnx" in self.formats:  # before any work, not after the open_clip export
            missing = [m for m in ONNX_MODULES if importlib.util.find_spec(m) is None]
            require(not missing, f"--format {self.format} needs {' and '.join(missing)}, which "
                    f"{'is' if len(missing) == 1 else 'are'} not installed (pip install 'hierdctl[onnx]')", "--format")
        if "hf" in self.formats and importlib.util.find_spec("transformers") is None:
            raise UserError(f"--format {self.format} needs transformers, which is not installed "
                            "(pip install 'hierdctl[hf]')", "--format")
        require(self.opset >= 14, "ONNX opset must be at least 14", "--opset")
        require(math.isfinite(self.atol) and self.atol > 0, f"must be a positive number, got {self.atol:g}", "--atol")
        if self.report is not None:
            require(Path(self.report).is_file(), f"{self.report} does not exist", "--report")
        return self

    @property
    def formats(self) -> tuple[str, ...]:
        # hf keeps the open_clip local dir beside DIR/hf: one folder for both libraries.
        return {"all": ("open_clip", "onnx"), "hf": ("open_clip", "hf")}.get(self.format, (self.format,))


# ----------------------------------------------------------------------------------
# eval-retrieval / eval-zeroshot
# ----------------------------------------------------------------------------------


@dataclass
class EvalRetrievalConfig:
    source: str
    models: list[str]
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    batch_size: int = 64
    device: str = "auto"
    index: str = "flat"
    nprobe: int | None = None  # ivf only
    out: Path | None = None
    save_index: Path | None = None
    overwrite: bool = False  # replace an earlier --save-index folder
    source_options: SourceOptions = field(default_factory=SourceOptions)
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int = 4  # decoding threads
    quiet: bool = False

    def validate(self) -> "EvalRetrievalConfig":
        _check_specs(self.models)
        require(bool(self.ks) and min(self.ks) >= 1, f"K must be positive integers, got {self.ks}", "--k")
        self.ks = sorted(set(self.ks))
        require(self.index in INDEX_KINDS, f"unknown index {self.index!r} ({', '.join(INDEX_KINDS)})", "--index")
        require(self.batch_size >= 1, "must be at least 1", "--batch-size")
        require(self.workers >= 0, "must be 0 or more", "--workers")
        require(self.nprobe is None or self.nprobe >= 1, "must be at least 1", "--nprobe")
        require(self.nprobe is None or self.index == "ivf", f"only applies to --index ivf (not {self.index})", "--nprobe")
        require(self.max_pixels > 0, f"must be positive, got {self.max_pixels}", "--max-pixels")
        check_report_path(self.out)
        if self.save_index is not None:  # a folder hierdctl did not write is never replaced
            from hierdctl.atomic import check_dir_target
            from hierdctl.stages.eval_retrieval import INDEX_MARKER, REPORT_SCHEMA

            check_dir_target(Path(self.save_index), INDEX_MARKER, REPORT_SCHEMA, "--save-index", self.overwrite,
                             "a saved index")
        return self


@dataclass
class EvalZeroshotConfig:
    source: str
    models: list[str]
    classnames: str = "imagenet"  # imagenet | folders | FILE (.json list or one name a line)
    templates: str = "openai"  # openai | simple | FILE (.json list or one a line, with {c})
    class_field: str = "cls"
    batch_size: int = 64
    device: str = "auto"
    out: Path | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int = 4
    quiet: bool = False

    def validate(self) -> "EvalZeroshotConfig":
        _check_specs(self.models)
        require(self.batch_size >= 1, "must be at least 1", "--batch-size")
        require(self.workers >= 0, "must be 0 or more", "--workers")
        require(self.max_pixels > 0, f"must be positive, got {self.max_pixels}", "--max-pixels")
        check_report_path(self.out)
        return self


# ----------------------------------------------------------------------------------
# scenes (the benchmark generator, hierdctl/scenes.py)
# ----------------------------------------------------------------------------------

FLAVOURS = ("shapes", "fashion", "cluttered")
MIN_OBJECTS = 1
MAX_OBJECTS = {"shapes": 4, "fashion": 4, "cluttered": 6}  # the most an image of a flavour holds
DEFAULT_OBJECTS = {"shapes": (1, 4), "fashion": (1, 4), "cluttered": (2, 6)}  # (min, max) when unset
DEFAULT_TEXTURED_FRACTION = 0.5  # shapes and fashion: share of mottled backgrounds when unset
IMAGE_FORMATS = ("png", "jpg")
MAX_SAMPLES_PER_SPLIT = 10**9 - 1  # keys are nine digits
MAX_SHARDS = 10**5  # shard names are five digits


@dataclass
class ScenesConfig:
    out_dir: str | Path = "out/scenes"
    flavour: str = "shapes"
    n_train: int = 10_000
    n_test: int = 1_000
    image_size: int = 64
    shard_size: int = 1_000
    seed: int = 0
    min_objects: int | None = None  # None: the flavour's default (DEFAULT_OBJECTS)
    max_objects: int | None = None
    captions_per_image: int = 4
    negatives_per_kind: int = 2  # hard negatives of each kind per test image, at most
    image_format: str = "png"
    textured_fraction: float | None = None  # shapes/fashion: share of mottled backgrounds (None: 0.5)
    fashion_path: str | Path | None = None  # a folder of Fashion-MNIST IDX files
    clip_benchmark: bool = False  # also write OUT/clip_benchmark: the test split for CLIP_benchmark

    def object_range(self) -> tuple[int, int]:
        """(fewest, most) objects per image: the fields, or the flavour's defaults."""
        lo, hi = DEFAULT_OBJECTS.get(self.flavour, (1, 4))
        return (lo if self.min_objects is None else self.min_objects, hi if self.max_objects is None else self.max_objects)

    def texture_share(self) -> float:
        """Share of mottled backgrounds (shapes and fashion; cluttered backgrounds are photos)."""
        return DEFAULT_TEXTURED_FRACTION if self.textured_fraction is None else self.textured_fraction

    def validate(self) -> "ScenesConfig":
        """Check every field; raise UserError naming the flag at fault. Returns self."""

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not str(self.out_dir).strip():
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
        if self.flavour == "fashion" or (self.flavour == "cluttered" and self.fashion_path is not None):
            from hierdctl.scenes import _fashion_split_files, _skimage_data, fashion_dir

            folder = fashion_dir(self.fashion_path)
            for split, n in (("train", self.n_train), ("test", self.n_test)):
                if n:
                    _fashion_split_files(folder, split)  # raises when a file is missing
        elif self.fashion_path is not None:
            raise UserError("only the fashion and cluttered flavours read Fashion-MNIST", where="--fashion-path")
        if self.flavour == "cluttered":
            from hierdctl.scenes import _skimage_data

            _skimage_data()  # raises when scikit-image is missing
        return self
