"""Stage 2, `hierdctl distill`: train a small open_clip student offline from a teacher cache.

The teacher never runs here. Each cached sample carries the original image bytes and
the teacher's features, so one read gives the student everything (docs/distill.md).

Data order is a pure function of (seed, epoch, step): every epoch is a seeded
permutation of all cached samples, cut into global batches; under torchrun each rank
takes its slice of each global batch and features are gathered back into the global
batch before the losses (open_clip's gather_with_grad), so N processes see exactly what
one process sees. Per sample, the view, the caption and MFD's mask come from a generator
seeded by (seed, epoch, sample index). A checkpoint stores the step, so `--resume`
continues the exact same stream and, on CPU, reproduces the uninterrupted loss curve.

Checkpoint layout (the contract with `export`):
    RUN_DIR/checkpoints/step-NNNNNNN.safetensors   wrapper state: student.* + projectors/κ/fusion
    RUN_DIR/checkpoints/step-NNNNNNN.state.pt      optimizer, scaler, RNG, data position
    RUN_DIR/checkpoints/step-NNNNNNN.json          model_cfg, preprocess_cfg, teacher, recipe, step
    RUN_DIR/checkpoints/latest.json                names the newest complete step; written last
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hierdctl import __version__
from hierdctl import dist as D
from hierdctl import atomic, cache_format
from hierdctl.console import console, progress
from hierdctl.errors import UserError, require


class TrainingDiverged(RuntimeError):
    """A loss term became NaN/Inf; the last good checkpoint is kept."""


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
    warmup: int = 10_000
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
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False

    def validate(self) -> None:
        require(self.epochs is not None or self.steps is not None, "give --epochs or --steps", "--steps")
        require(self.steps is None or self.steps >= 1, "must be at least 1", "--steps")
        require(self.epochs is None or self.epochs > 0, "must be positive", "--epochs")
        require(self.batch_size >= 2, "must be at least 2 (contrastive losses need negatives)", "--batch-size")
        require(self.lr > 0, "must be positive", "--lr")
        require(self.warmup >= 0, "must be ≥ 0", "--warmup")
        require(self.weight_decay >= 0, "must be ≥ 0", "--weight-decay")
        require(self.grad_clip is None or self.grad_clip > 0, "must be positive", "--grad-clip")
        require(self.precision in ("auto", "fp32", "bf16", "fp16"), "must be auto, fp32, bf16 or fp16", "--precision")
        require(self.view_policy in ("random", "sequential"), "must be random or sequential", "--set view_policy")
        require(self.caption_policy in ("random", "first"), "must be random or first", "--set caption_policy")
        require(0 < self.mask_ratio < 1, "must be within (0, 1)", "--set mask_ratio")
        require(self.save_every >= 1, "must be at least 1", "--save-every")
        require(self.log_every >= 1, "must be at least 1", "--log-every")
        require(self.keep_checkpoints >= 1, "must be at least 1", "--set keep_checkpoints")


# Settings a resumed run must share with the run it continues.
# steps/epochs too: the cosine schedule is a function of the run's length.
RESUME_KEYS = ("cache", "student", "recipe", "steps", "epochs", "batch_size", "lr", "warmup", "weight_decay",
               "beta1", "beta2", "eps", "grad_clip", "seed", "view_policy", "caption_policy", "exp_scales",
               "mask_ratio", "precision")
# Execution details that do not enter the resolved config.
RUNTIME_KEYS = ("resume", "overwrite", "quiet", "device", "workers")


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
        if t.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if t.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{name}={value!r} is not a valid {t.split(' ')[0]}", where) from None


def resolve_config(cli: dict, config_file: str | None = None, sets: list[str] = ()) -> DistillConfig:
    """Defaults < --config FILE.yaml < explicit command-line options < --set key=value."""
    import yaml

    values: dict = {}
    if config_file:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"cannot read config ({e})", config_file) from None
        if not isinstance(loaded, dict):
            raise UserError("must be a mapping of setting: value", config_file)
        values.update({k.replace("-", "_"): _coerce(k.replace("-", "_"), v, config_file) for k, v in loaded.items()})
    values.update({k: v for k, v in cli.items() if v is not None})
    for s in sets:
        if "=" not in s:
            raise UserError(f"expected key=value, got {s!r}", "--set")
        k, v = s.split("=", 1)
        k = k.strip().replace("-", "_")
        values[k] = _coerce(k, yaml.safe_load(v) if v.strip() else None, "--set")
    for req in ("cache", "student", "recipe", "out"):
        if not values.get(req):
            raise UserError(f"{req} is required", f"--{req}" if req != "cache" else "CACHE")
    cfg = DistillConfig(**values)
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------------
# Data: an index over cached samples, random access, a resumable global-batch sampler
# ----------------------------------------------------------------------------------


def index_shard(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of every sample's contiguous run of tar members, in order."""
    spans: list[tuple[int, int]] = []
    key, start, end = None, 0, 0
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            k = m.name.split(".", 1)[0]
            if k != key:
                if key is not None:
                    spans.append((start, end - start))
                key, start = k, m.offset
            end = m.offset_data + ((m.size + 511) // 512) * 512
    if key is not None:
        spans.append((start, end - start))
    return spans


def parse_span(buf: bytes) -> dict[str, bytes]:
    """Tar members of one sample span -> {extension: bytes}. Our shards are plain USTAR."""
    out, pos = {}, 0
    while pos + 512 <= len(buf):
        info = tarfile.TarInfo.frombuf(buf[pos : pos + 512], "utf-8", "surrogateescape")
        data = buf[pos + 512 : pos + 512 + info.size]
        out[info.name.split(".", 1)[1]] = data
        pos += 512 + ((info.size + 511) // 512) * 512
    return out


class CacheDataset:
    """Map-style dataset over all cached samples; items are indexed by (sample, epoch)."""

    def __init__(self, cache, spans, cfg: DistillConfig, student_io: dict, needs: dict):
        self.paths = [str(p) for p in cache.shards]
        self.spans = spans  # list of (shard_idx, offset, length)
        self.cfg, self.io, self.needs = cfg, student_io, needs
        self.P = cache.config["phrases"]["max_phrases"]
        self._files: dict[int, object] = {}

    def __len__(self):
        return len(self.spans)

    def _read(self, i: int) -> dict[str, bytes]:
        s, off, n = self.spans[i]
        f = self._files.get(s)
        if f is None:
            f = self._files[s] = open(self.paths[s], "rb")
        f.seek(off)
        return parse_span(f.read(n))

    def __getitem__(self, item):
        import torch

        from hierdctl.images import View, apply_view, decode_rgb

        i, epoch = item
        cfg, io = self.cfg, self.io
        members = self._read(i)
        sample = cache_format.decode_sample("", members)
        meta, a = sample.meta, sample.arrays
        rng = np.random.default_rng([cfg.seed, epoch, i])
        n_views, n_caps = len(meta["views"]), len(meta["captions"])
        v = int(rng.integers(n_views)) if cfg.view_policy == "random" else epoch % n_views
        c = int(rng.integers(n_caps)) if cfg.caption_policy == "random" else 0
        img, _ = decode_rgb(sample.image)
        out = {
            "image": apply_view(img, View.from_json(meta["views"][v]), io["image_size"], io["mean"], io["std"],
                                io["eval_transform"]),
            "text": io["tokenize"]([meta["captions"][c]])[0],
            "index": torch.tensor(i),
        }
        if self.needs["global"]:
            out["img_t"] = torch.from_numpy(a["img_emb"][v])
            out["txt_t"] = torch.from_numpy(a["txt_emb"][c])
        if self.needs["clusters"]:
            out["clu_t"] = torch.from_numpy(a["clu_emb"][v])
            out["clu_assign"] = torch.from_numpy(a["clu_assign"][v].astype(np.int64))
            out["clu_mask"] = torch.from_numpy(a["clu_count"][v] > 0)
        if self.needs["phrases"]:
            phrases = meta["phrases"][c] + [""] * (self.P - len(meta["phrases"][c]))
            out["phr_t"] = torch.from_numpy(a["phr_emb"][c])
            out["phr_mask"] = torch.from_numpy(a["phr_mask"][c].astype(bool))
            out["phr_tok"] = io["tokenize"](phrases)
        if self.needs["mask_noise"]:
            out["mask_noise"] = torch.from_numpy(rng.random(io["grid_size"]).astype(np.float32))
        return out


class GlobalBatchSampler:
    """Yields this rank's slice of each global batch, from (epoch, step) on. Drops the tail."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, start_step: int, total_steps: int):
        assert global_batch % world == 0, (global_batch, world)
        self.n, self.gb, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
        self.steps_per_epoch = n // global_batch
        self.start, self.total = start_step, total_steps

    def __len__(self):
        return self.total - self.start

    def __iter__(self):
        import torch

        local = self.gb // self.world
        step = self.start
        while step < self.total:
            epoch, b = divmod(step, self.steps_per_epoch)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
            for b in range(b, self.steps_per_epoch):
                if step >= self.total:
                    return
                lo = b * self.gb + self.rank * local
                yield [(int(i), epoch) for i in perm[lo : lo + local]]
                step += 1


# ----------------------------------------------------------------------------------
# Checks, model, optimizer
# ----------------------------------------------------------------------------------


def _check_cache(cache, recipe) -> None:
    have = {p: cache.has(p) for p in ("global", "clusters", "phrases", "images")}
    if not have["images"]:
        raise UserError("the cache holds no images (made with --no-store-images); distill reads images from it", "CACHE")
    missing = [p for p in recipe.cache_parts if not have.get(p, False)]
    if missing:
        how = {"clusters": "rerun cache-teacher with --clusters K (K > 0)",
               "phrases": "rerun cache-teacher with --max-phrases P (P > 0)"}
        raise UserError(
            f"recipe {recipe.name!r} needs {', '.join(missing)} that cache {cache.root} lacks: "
            + "; ".join(how.get(p, p) for p in missing),
            "--recipe",
        )


def _student_spec(text: str) -> str:
    return text if ":" in text else f"open_clip:{text}"


def build_student(cfg: DistillConfig, device: str):
    """(model, model_cfg, preprocess_cfg, eval_transform, tokenizer) for the student spec."""
    from hierdctl.specs import create_open_clip, parse_spec
    from hierdctl.tv_shim import import_open_clip

    open_clip = import_open_clip()
    spec = parse_spec(_student_spec(cfg.student), "--student")
    if spec.kind not in ("open_clip", "local-dir"):
        raise UserError("students are open_clip models: use an architecture, a config JSON or local-dir:", "--student")
    model, preprocess, tokenizer, name = create_open_clip(spec, device, "--student")
    if spec.kind == "local-dir":
        model_cfg = json.loads((Path(spec.path) / "open_clip_config.json").read_text())["model_cfg"]
    else:
        model_cfg = open_clip.get_model_config(name)
    pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    return model, model_cfg, pp, preprocess, tokenizer


def param_groups(module, weight_decay: float):
    """open_clip's rule: no weight decay on gains, biases, norms, scales (ndim < 2)."""
    decay, no_decay = [], []
    for n, p in module.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n or "kappa" in n
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up then cosine to zero (open_clip's cosine_lr)."""
    if step < warmup:
        return base * (step + 1) / warmup
    e, es = step - warmup, max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base


# ----------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------


def _ckpt_dir(out: Path) -> Path:
    return out / "checkpoints"


def save_checkpoint(out: Path, step: int, wrapper, optimizer, scaler, meta: dict, keep: int) -> Path:
    import torch
    from safetensors.torch import save_file

    d = _ckpt_dir(out)
    d.mkdir(parents=True, exist_ok=True)
    stem = f"step-{step:07d}"
    tmp = d / f".{stem}.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in wrapper.state_dict().items()}, str(tmp))
    os.replace(tmp, d / f"{stem}.safetensors")
    state = {
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "step": step,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    tmp = d / f".{stem}.state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, d / f"{stem}.state.pt")
    atomic.write_json_atomic(d / f"{stem}.json", meta | {"step": step})
    atomic.write_json_atomic(d / "latest.json", {"step": step, "name": stem})  # the done-marker
    steps = sorted(int(p.stem.split("-")[1]) for p in d.glob("step-*.json"))
    for old in steps[:-keep]:
        for p in d.glob(f"step-{old:07d}.*"):
            p.unlink()
    return d / f"{stem}.safetensors"


def load_checkpoint(out: Path, wrapper, optimizer, scaler, device: str) -> int:
    import torch
    from safetensors.torch import load_file

    d = _ckpt_dir(out)
    latest = json.loads((d / "latest.json").read_text())
    stem = latest["name"]
    wrapper.load_state_dict(load_file(str(d / f"{stem}.safetensors"), device=device))
    state = torch.load(d / f"{stem}.state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["step"])


# ----------------------------------------------------------------------------------
# Gathering features across ranks
# ----------------------------------------------------------------------------------

def gather_features(f, env: D.DistEnv):
    """The global batch on every rank: student tensors keep their gradient (gather_with_grad)."""
    import torch
    import torch.distributed as dist
    import torch.distributed.nn

    from hierdctl.losses.features import STUDENT_BATCH_FIELDS, TEACHER_BATCH_FIELDS

    if not env.torchrun or env.world_size == 1:
        return f
    done: dict[int, object] = {}  # id(local tensor) -> gathered: img_st is img_s when nothing is projected
    for name in STUDENT_BATCH_FIELDS:
        t = getattr(f, name)
        if t is not None:
            if id(t) not in done:
                done[id(t)] = torch.cat(torch.distributed.nn.all_gather(t), dim=0)
            setattr(f, name, done[id(t)])
    for name in TEACHER_BATCH_FIELDS:
        t = getattr(f, name)
        if t is not None:
            parts = [torch.empty_like(t) for _ in range(env.world_size)]
            dist.all_gather(parts, t.contiguous())
            setattr(f, name, torch.cat(parts, dim=0))
    return f


# ----------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------


def _plot(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    keys = sorted({k for r in rows for k in r if k.endswith("_loss")})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k in keys + ["loss"]:
        xs = [r["step"] for r in rows if k in r]
        ys = [r[k] for r in rows if k in r]
        ax.plot(xs, ys, label=k, lw=2 if k == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (unweighted terms; 'loss' = weighted total)")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)


@dataclass
class Trainer:
    """Everything one training step needs, built once by `build_trainer`.

    `run` drives it over the data stream; `bench/bench_distill.py` drives `step` on a
    batch held in memory to time the training step without the data loader.
    """

    cfg: DistillConfig
    env: D.DistEnv
    device: str
    recipe: object  # hierdctl.losses.registry.Recipe
    teacher: dict  # the cache manifest's teacher entry
    model_cfg: dict
    pp_cfg: dict
    wrapper: object  # StudentWrapper
    net: object  # the wrapper, or DDP around it
    optimizer: object
    scaler: object
    amp_dtype: object
    needs: dict
    dataset: CacheDataset
    n_samples: int
    steps_per_epoch: int
    total: int
    notes: list = field(default_factory=list)

    def loader(self, start: int):
        """The data stream from global step `start` on: this rank's slice of each global batch."""
        from torch.utils.data import DataLoader

        cfg, env = self.cfg, self.env
        workers = cfg.workers if cfg.workers >= 0 else min(8, max(0, (os.cpu_count() or 1) // max(1, env.world_size) - 1))
        sampler = GlobalBatchSampler(self.n_samples, cfg.batch_size, env.rank, env.world_size, cfg.seed, start,
                                     self.total)
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=workers,
                          pin_memory=self.device.startswith("cuda"), persistent_workers=False,
                          prefetch_factor=4 if workers else None)

    def to_device(self, batch: dict) -> dict:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self.needs["global"]:
            batch["logit_scale_t"] = float(self.teacher["logit_scale"])
        if self.needs["clusters"]:
            batch["teacher_grid"] = tuple(self.teacher["patch_grid"])
        return batch

    def step(self, batch: dict, step: int):
        """One optimizer step on a device batch (see `to_device`) -> (terms, weighted loss, lr).

        Raises TrainingDiverged (before touching the weights) if a term is NaN/Inf.
        """
        import contextlib

        import torch

        from hierdctl.losses.registry import compute_terms, weighted_total

        cfg, wrapper, optimizer, scaler = self.cfg, self.wrapper, self.optimizer, self.scaler
        lr = lr_at(step, cfg.lr, cfg.warmup, self.total)
        for g in optimizer.param_groups:
            g["lr"] = lr
        autocast = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        with autocast:
            f = self.net(batch)
        f = gather_features(f, self.env)
        terms = compute_terms(self.recipe, f)
        bad = [k for k, v in terms.items() if not torch.isfinite(v.detach()).all()]
        if bad:
            raise TrainingDiverged(f"loss term {', '.join(bad)} became {terms[bad[0]].item()} at step {step + 1}")
        total_loss = weighted_total(terms, self.recipe)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total_loss).backward()
            scaler.unscale_(optimizer)
        else:
            total_loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(wrapper.parameters(), cfg.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        with torch.no_grad():  # open_clip clamps the scale to ≤ 100
            wrapper.student.logit_scale.clamp_(0, math.log(100))
        return terms, total_loss, lr


def build_trainer(cfg: DistillConfig, cache, recipe, env: D.DistEnv, device: str) -> Trainer:
    """Student, wrapper, losses, data set and optimizer for `cfg` (no run directory involved)."""
    import torch

    from hierdctl.student import StudentWrapper

    # --- student and its wrapper ---------------------------------------------------
    torch.manual_seed(cfg.seed)
    model, model_cfg, pp_cfg, eval_tf, tokenizer = build_student(cfg, device)
    student_dim = int(model_cfg["embed_dim"])
    teacher = cache.manifest["teacher"]
    teacher_dim = int(teacher["embed_dim"]) if recipe.needs_teacher else None
    extras = recipe.extras
    wrapper = StudentWrapper(model, student_dim, teacher_dim, recipe.fields, cfg.exp_scales, cfg.mask_ratio).to(device)
    if ("patch_tokens" in extras or "masked_forward" in extras) and not wrapper.is_vit:
        raise UserError(f"recipe {recipe.name!r} needs patch tokens but the student is not a ViT", "--student")
    notes = []
    if wrapper.project:
        notes.append(f"student width {student_dim} ≠ teacher width {teacher_dim}: added projectors "
                     f"Linear({student_dim}, {teacher_dim}) for the terms that compare the student with the "
                     "teacher (trained, dropped by export; the task loss trains the student's own embedding)")

    # --- data ---------------------------------------------------------------------
    spans = []
    for s, path in enumerate(cache.shards):
        spans += [(s, off, n) for off, n in index_shard(path)]
    require(len(spans) >= cfg.batch_size,
            f"the cache holds {len(spans)} samples, fewer than one global batch ({cfg.batch_size})", "--batch-size")
    steps_per_epoch = len(spans) // cfg.batch_size
    total = cfg.steps if cfg.steps is not None else max(1, int(round(cfg.epochs * steps_per_epoch)))
    vs = model.visual.image_size
    student_io = {
        "image_size": vs[0] if isinstance(vs, (tuple, list)) else int(vs),
        "mean": tuple(pp_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        "std": tuple(pp_cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
        "eval_transform": eval_tf,
        "tokenize": tokenizer,
        "grid_size": (wrapper.grid[0] * wrapper.grid[1]) if wrapper.grid else 0,
    }
    parts = set(recipe.cache_parts)
    needs = {"global": recipe.needs_teacher, "clusters": "clusters" in parts, "phrases": "phrases" in parts,
             "mask_noise": "masked_forward" in extras}
    dataset = CacheDataset(cache, spans, cfg, student_io, needs)

    # --- optimisation -------------------------------------------------------------
    prec = cfg.precision if cfg.precision != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    if prec != "fp32" and not device.startswith("cuda"):
        raise UserError(f"{prec} autocast is for GPUs; use --precision fp32 on CPU", "--precision")
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
    optimizer = torch.optim.AdamW(param_groups(wrapper, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    scaler = torch.amp.GradScaler("cuda") if prec == "fp16" else None
    if env.torchrun and env.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(wrapper, device_ids=[device] if device.startswith("cuda") else None)
    else:
        net = wrapper
    return Trainer(cfg=cfg, env=env, device=device, recipe=recipe, teacher=teacher, model_cfg=model_cfg,
                   pp_cfg=pp_cfg, wrapper=wrapper, net=net, optimizer=optimizer, scaler=scaler,
                   amp_dtype=amp_dtype, needs=needs, dataset=dataset, n_samples=len(spans),
                   steps_per_epoch=steps_per_epoch, total=total, notes=notes)


def run(cfg: DistillConfig) -> dict:
    """Train. Returns a summary: steps, final loss terms, throughput, paths."""
    import contextlib

    import yaml

    from hierdctl.losses.registry import load_recipe

    cfg.validate()
    started = time.time()
    env = D.resolve()
    device = D.resolve_device(cfg.device, env)
    D.init_process_group(env, device)
    try:
        out = Path(cfg.out)
        cache = cache_format.open_cache(cfg.cache)
        recipe = load_recipe(cfg.recipe)
        _check_cache(cache, recipe)
        require(cfg.batch_size % env.world_size == 0,
                f"global batch {cfg.batch_size} is not divisible by {env.world_size} processes", "--batch-size")

        # --- the run directory: fresh, resumed, or a clear refusal ---------------------
        resolved = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_KEYS}
        has_ckpt = (_ckpt_dir(out) / "latest.json").exists()
        if has_ckpt and not (cfg.resume or cfg.overwrite):
            raise UserError(f"{out} already holds a run: add --resume to continue it or --overwrite to restart", "--out")
        if cfg.resume and has_ckpt and (out / "config.resolved.yaml").exists():
            old = yaml.safe_load((out / "config.resolved.yaml").read_text())
            diff = [k for k in RESUME_KEYS if old.get(k) != resolved.get(k)]
            if diff:
                raise UserError("cannot resume with changed settings: " + ", ".join(
                    f"{k} {old.get(k)!r} → {resolved.get(k)!r}" for k in diff), "--resume")
        if env.is_main:
            if cfg.overwrite and out.exists():
                import shutil

                shutil.rmtree(_ckpt_dir(out), ignore_errors=True)
                for name in ("metrics.jsonl", "loss_curves.png"):
                    (out / name).unlink(missing_ok=True)
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / ".config.resolved.yaml.tmp"
            tmp.write_text(yaml.safe_dump(resolved | {"hierdctl": __version__, "recipe_terms": [
                {"name": t.name, "weight": t.weight, "args": dict(t.args)} for t in recipe.terms]}, sort_keys=False))
            os.replace(tmp, out / "config.resolved.yaml")
        D.barrier(env)

        tr = build_trainer(cfg, cache, recipe, env, device)
        notes, wrapper, total = tr.notes, tr.wrapper, tr.total
        start = 0
        if cfg.resume and has_ckpt:
            start = load_checkpoint(out, wrapper, tr.optimizer, tr.scaler, device)
            notes.append(f"resumed from step {start}")
        loader = tr.loader(start)
        metrics_path = out / "metrics.jsonl"
        if env.is_main and metrics_path.exists():  # a resumed run rewrites what came after its checkpoint
            keep = [ln for ln in metrics_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start]
            metrics_path.write_text("".join(k + "\n" for k in keep))
        ckpt_meta = {"model_cfg": tr.model_cfg, "preprocess_cfg": tr.pp_cfg, "teacher": tr.teacher,
                     "recipe": recipe.name, "recipe_terms": [{"name": t.name, "weight": t.weight} for t in recipe.terms],
                     "data": str(cfg.cache), "student_spec": cfg.student, "hierdctl": __version__}
        if env.is_main and not cfg.quiet:
            for n in notes:
                console.print(f"[dim]distill:[/] {n}")

        # --- the loop -----------------------------------------------------------------
        step, last_saved, last = start, start, {}
        t_log, n_log = time.time(), 0
        wrapper.train()
        with progress(cfg.quiet or not env.is_main) as bar, open(metrics_path, "a") if env.is_main else contextlib.nullcontext() as mf:
            task = bar.add_task("distill", total=total, completed=start, unit="steps", info="")
            for batch in loader:
                try:
                    terms, total_loss, lr = tr.step(tr.to_device(batch), step)
                except TrainingDiverged as e:
                    raise TrainingDiverged(f"{e}; the last good checkpoint (step {last_saved}) is kept in "
                                           f"{_ckpt_dir(out)}") from None
                step += 1
                n_log += cfg.batch_size
                last = {k: float(v.detach()) for k, v in terms.items()} | {"loss": float(total_loss.detach())}
                if env.is_main and (step % cfg.log_every == 0 or step == total or step == start + 1):
                    now = time.time()
                    rec = {"step": step, "epoch": round(step / tr.steps_per_epoch, 4), "lr": lr, **last,
                           "logit_scale": float(wrapper.student.logit_scale.detach().exp()),
                           "samples_per_s": round(n_log / max(now - t_log, 1e-9), 2)}
                    mf.write(json.dumps(rec) + "\n")
                    mf.flush()
                    t_log, n_log = now, 0
                    bar.update(task, info=f"{rec['samples_per_s']:,.0f} samples/s  " + " ".join(
                        f"{k.removesuffix('_loss')} {v:.3g}" for k, v in last.items()))
                bar.advance(task)
                if step % cfg.save_every == 0 or step == total:
                    if env.is_main:
                        save_checkpoint(out, step, wrapper, tr.optimizer, tr.scaler, ckpt_meta, cfg.keep_checkpoints)
                    last_saved = step
                    D.barrier(env)
        if env.is_main:
            _plot(metrics_path, out / "loss_curves.png")
        seconds = time.time() - started
        return {
            "out": str(out), "steps": step, "resumed_from": start, "final": last, "recipe": recipe.name,
            "samples_per_epoch": tr.n_samples, "steps_per_epoch": tr.steps_per_epoch,
            "seconds": round(seconds, 2), "samples_per_s": round((step - start) * cfg.batch_size / max(seconds, 1e-9), 2),
            "checkpoint": str(_ckpt_dir(out) / f"step-{step:07d}.safetensors"), "notes": notes,
            "rank": env.rank,
        }
    finally:
        D.destroy(env)
