"""Stage 2, `hierdctl distill`: train a small open_clip student offline from a teacher cache.

The teacher never runs here. Each cached sample carries the original image bytes and
the teacher's features, so one read gives the student everything (docs/distill.md); the
reader is hierdctl/cache_format.py's CacheDataset, the run directory's layout and
checkpoints are hierdctl/checkpoint.py's.

Data order is a pure function of (seed, epoch, step): every epoch is a seeded
permutation of all cached samples, cut into global batches; under torchrun each rank
takes its slice of each global batch and features are gathered back into the global
batch before the losses (open_clip's gather_with_grad), so N processes see exactly what
one process sees. Per sample, the view, the caption and MFD's mask come from a generator
seeded by (seed, epoch, sample index). A checkpoint stores the step, so `--resume`
continues the exact same stream and, on CPU, reproduces the uninterrupted loss curve.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hierdctl import __version__, atomic, cache_format, checkpoint, distributed, faults, reporting, settings
from hierdctl.loader import batch_bytes, prefetch_for, workers_for
from hierdctl.configs import DistillConfig, SourceOptions
from hierdctl.console import console, progress
from hierdctl.errors import Interrupted, UserError, require
from hierdctl.losses.features import STUDENT_BATCH_FIELDS, TEACHER_BATCH_FIELDS

if TYPE_CHECKING:
    from hierdctl.losses.registry import Recipe
    from hierdctl.student import StudentWrapper


class TrainingDiverged(RuntimeError):
    """A loss term became NaN/Inf; the last good checkpoint is kept."""


def resolve_config(cli: dict, config_file: str | None = None, sets: list[str] = ()) -> DistillConfig:
    """The CLI's entry: DistillConfig.resolve (defaults < --config < options < --set)."""
    return DistillConfig.resolve(cli, config_file, sets)


# ----------------------------------------------------------------------------------
# Data: a resumable global-batch sampler over the cache reader's samples
# ----------------------------------------------------------------------------------


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


def _check_cache(cache, recipe, images: str | None, cfg_policy: str = "random") -> None:
    have = {p: cache.has(p) for p in ("global", "clusters", "phrases", "perturbations", "cluster_crops", "tokens",
                                      "images")}
    if not have["images"] and images is None:
        raise UserError(f"the cache holds no images (made with --no-store-images): give its source with --images SOURCE "
                        f"(it was made from {cache.config['source']}); images are joined by key and checked by sha256",
                        "CACHE")
    if cfg_policy in ("synthetic", "real+synthetic") and not cache.has("synthetic"):
        raise UserError(f"caption_policy {cfg_policy} needs synthetic captions: the cache was made without "
                        "--captioner", "--set caption_policy")
    if cfg_policy == "real+synthetic" and {"phrases", "perturbations"} & set(recipe.cache_parts):
        raise UserError("caption_policy real+synthetic averages global terms over the two captions; recipe "
                        f"{recipe.name!r} also needs phrases or perturbations of one caption: use --set "
                        "caption_policy=any (a random real or synthetic caption per sample)", "--set caption_policy")
    if have["images"] and images is not None:
        raise UserError("the cache holds its images; --images is for caches made with --no-store-images", "--images")
    missing = [p for p in recipe.cache_parts if not have.get(p, False)]
    if missing:
        how = {"clusters": "rerun cache-teacher with --clusters K (K > 0)",
               "phrases": "rerun cache-teacher with --max-phrases P (P > 0)",
               "perturbations": "rerun cache-teacher with --perturbations Q (Q > 0)",
               "cluster_crops": "rerun cache-teacher with --cluster-crops",
               "tokens": "rerun cache-teacher with --store tokens"}
        raise UserError(
            f"recipe {recipe.name!r} needs {', '.join(missing)} that cache {cache.root} lacks: "
            + "; ".join(how.get(p, p) for p in missing),
            "--recipe",
        )


def _student_spec(text: str) -> str:
    return text if ":" in text else f"open_clip:{text}"


@dataclass
class Student:
    """The open_clip student as built from --student, with what the data and export need of it."""

    model: torch.nn.Module
    model_cfg: dict  # open_clip's model config (export rebuilds the student from it)
    pp_cfg: dict  # the visual tower's preprocess config (mean, std, interpolation, resize mode)
    eval_transform: object
    tokenizer: object


def build_student(cfg: DistillConfig, device: str) -> Student:
    import open_clip

    from hierdctl.specs import create_open_clip, parse_spec

    spec = parse_spec(_student_spec(cfg.student), "--student")
    if spec.kind not in ("open_clip", "local-dir"):
        raise UserError("students are open_clip models: use an architecture, a config JSON or local-dir:", "--student")
    model, preprocess, tokenizer, name = create_open_clip(spec, device, "--student")
    if spec.kind == "local-dir":
        model_cfg = json.loads((Path(spec.path) / "open_clip_config.json").read_text())["model_cfg"]
    else:
        model_cfg = open_clip.get_model_config(name)
    pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    return Student(model, model_cfg, pp, preprocess, tokenizer)


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
# Gathering features across ranks
# ----------------------------------------------------------------------------------


def gather_features(f, env: distributed.DistEnv):
    """The global batch on every rank: student tensors keep their gradient (gather_with_grad)."""
    import torch.distributed as dist
    import torch.distributed.nn

    if not env.torchrun or env.world_size == 1:
        return f
    done: dict[int, object] = {}  # id(local tensor) -> gathered: img_st is img_s when nothing is projected
    for name in STUDENT_BATCH_FIELDS:
        t = getattr(f, name)
        if t is not None:
            if id(t) not in done:
                done[id(t)] = torch.cat(torch.distributed.nn.all_gather(t), dim=0)
            setattr(f, name, done[id(t)])
    def plain(t):
        parts = [torch.empty_like(t) for _ in range(env.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=0)

    for name in TEACHER_BATCH_FIELDS:
        t = getattr(f, name)
        if t is not None:
            setattr(f, name, plain(t))
    for k, entry in enumerate(f.ensemble or []):
        if k == 0:  # teacher 0's tensors are the fields just gathered
            f.ensemble[0] = {n: getattr(f, n) for n in entry}
            continue
        for n, t in entry.items():
            if not isinstance(t, torch.Tensor):
                continue
            if n.endswith("_t"):
                entry[n] = plain(t)
            else:  # the student in teacher k's space; the very tensor of another field when nothing is projected
                if id(t) not in done:
                    done[id(t)] = torch.cat(torch.distributed.nn.all_gather(t), dim=0)
                entry[n] = done[id(t)]
    return f


# ----------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------


def _plot(run_dir: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, _ = checkpoint.read_metrics(run_dir)
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
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    plt.close(fig)
    atomic.write_bytes_atomic(png, buf.getvalue())


@dataclass
class Data:
    """The training data: the cache reader, its size in samples and steps, and what a batch carries."""

    dataset: cache_format.CacheDataset
    stream: cache_format.CacheStream | None  # the streaming reader (URL caches, --cache-reader stream), else None
    n_samples: int
    steps_per_epoch: int
    workers: int  # DataLoader workers, resolved
    needs: dict  # what each batch must carry: global, clusters, phrases, perturbations, cluster_crops, mask_noise, teachers


@dataclass
class Trainer:
    """Everything one training step needs, built once by `build_trainer`.

    `run` drives it over the data stream; `bench/bench_distill.py` drives `step` on a
    batch held in memory to time the training step without the data loader.
    """

    cfg: DistillConfig
    env: distributed.DistEnv
    device: str
    recipe: "Recipe"
    teachers: list[dict]  # the cache manifest's entry of every teacher (one without an ensemble), the first first
    student: Student
    wrapper: "StudentWrapper"
    net: torch.nn.Module  # the wrapper, or DDP around it
    optimizer: torch.optim.Optimizer
    scaler: "torch.amp.GradScaler | None"  # fp16 only
    amp_dtype: "torch.dtype | None"
    data: Data
    total: int  # optimizer steps of the run
    warmup: int  # resolved: cfg.warmup, or auto = min(10,000, 10% of total)
    notes: list = field(default_factory=list)
    decoder: object = None  # gpu_decode.BatchDecoder with --decode gpu: the batch's JPEGs are decoded in to_device
    position: tuple = (0, None)  # (steps taken, step of the last checkpoint or None), for an interrupt's message

    @property
    def teacher(self) -> dict:
        """The first teacher: clusters, phrases and the unsuffixed embeddings are its."""
        return self.teachers[0]

    def loader(self, start: int):
        """The data stream from global step `start` on: this rank's slice of each global batch."""
        from torch.utils.data import DataLoader

        cfg, env, workers = self.cfg, self.env, self.data.workers
        if self.data.stream is not None:
            return self._streamed(start)
        sampler = GlobalBatchSampler(self.data.n_samples, cfg.batch_size, env.rank, env.world_size, cfg.seed, start,
                                     self.total)
        return DataLoader(self.data.dataset, batch_sampler=sampler, num_workers=workers,
                          pin_memory=self.device.startswith("cuda"), persistent_workers=False,
                          prefetch_factor=self._prefetch(), collate_fn=self._collate())

    def _streamed(self, start: int):
        """Streamed batches from global step `start` on: epoch by epoch, each a fresh pass whose
        first batches (those a resumed run already took) are read but not decoded."""
        from torch.utils.data import DataLoader, IterableDataset

        class Streamed(IterableDataset):  # CacheStream itself stays torch-free (cache-info imports its module)
            def __init__(self, stream):
                self.stream = stream

            def __iter__(self):
                return iter(self.stream)

        st, step, epoch, done = self.data.stream, 0, 0, 0
        while done + st.steps_per_epoch(epoch) <= start:  # the epoch `start` falls in
            done += st.steps_per_epoch(epoch)
            epoch += 1
        step = start
        while step < self.total:
            st.epoch, st.skip_batches = epoch, step - done
            loader = DataLoader(Streamed(st), batch_size=st.B, drop_last=True, num_workers=self.data.workers,
                                pin_memory=self.device.startswith("cuda"), persistent_workers=False,
                                prefetch_factor=self._prefetch(), collate_fn=self._collate())
            for batch in loader:
                if step >= self.total or step - done >= st.steps_per_epoch(epoch):
                    break
                yield batch
                step += 1
            done += st.steps_per_epoch(epoch)
            epoch += 1

    def _prefetch(self) -> int | None:
        """Batches in flight per worker, within a share of /dev/shm (hierdctl/loader.py)."""
        io = self.data.dataset.io
        local = self.cfg.batch_size // self.env.world_size
        return prefetch_for(self.data.workers, batch_bytes(local, io["image_size"], self.cfg.decode))

    def _collate(self):
        from hierdctl import gpu_decode

        return gpu_decode.collate if self.decoder is not None else None  # None: DataLoader's default_collate

    def to_device(self, batch: dict) -> dict:
        """Tensors to the device (the loader's `bad` notes stay behind), plus the teachers' constants.
        With --decode gpu the images are decoded here; a row no decoder reads is replaced in `batch`
        and noted in its `bad` field."""
        image = self.decoder(batch) if self.decoder is not None and "jpeg" in batch else None
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        if image is not None:
            batch["image"] = image
        if self.data.needs["global"]:
            batch["logit_scale_t"] = float(self.teacher["logit_scale"])
            teachers = self.data.needs.get("teachers", 1)
            if teachers > 1:  # an ensemble: teacher k's embeddings and scale, k ≥ 1
                batch["ensemble"] = [{"img_t": batch.pop(f"img_t_{k}"), "txt_t": batch.pop(f"txt_t_{k}"),
                                      "logit_scale_t": float(self.teachers[k]["logit_scale"])}
                                     for k in range(1, teachers)]
        if "text_2" in batch:  # caption_policy real+synthetic: the second caption and its teachers' embeddings
            second = {"text": batch.pop("text_2")}
            for k in [k for k in batch if k.startswith("txt_t") and k.endswith("_2")]:
                second[k[: -len("_2")]] = batch.pop(k)
            batch["second"] = second
        if self.data.needs["clusters"] or self.data.needs.get("tokens"):
            batch["teacher_grid"] = tuple(self.teacher["patch_grid"])
        return batch

    def step(self, batch: dict, step: int):
        """One optimizer step on a device batch (see `to_device`) -> (terms, weighted loss, lr).

        Raises TrainingDiverged (before touching the weights) if a term is NaN/Inf.
        """
        from hierdctl.losses import registry

        cfg, wrapper, optimizer, scaler = self.cfg, self.wrapper, self.optimizer, self.scaler
        lr = lr_at(step, cfg.lr, self.warmup, self.total)
        for g in optimizer.param_groups:
            g["lr"] = lr
        autocast = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        with autocast:
            f = self.net(batch)
        f = gather_features(f, self.env)
        terms = registry.compute_terms(self.recipe, f)
        if f.second is not None:  # real+synthetic: every term is the mean over the two captions
            other = registry.compute_terms(self.recipe, gather_features(f.second, self.env))
            terms = {k: 0.5 * (v + other[k]) for k, v in terms.items()}
        finite = torch.stack([v.detach().float() for v in terms.values()]).isfinite()  # one device sync, not one per term
        bad = [] if bool(finite.all()) else [k for k, ok in zip(terms, finite.tolist()) if not ok]
        if bad:
            raise TrainingDiverged(f"loss term {', '.join(bad)} became {terms[bad[0]].item()} at step {step + 1}")
        total_loss = registry.weighted_total(terms, self.recipe)
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
        with torch.no_grad():  # open_clip's rule: the parameter, not exp() in the forward, is clamped to ≤ ln 100
            wrapper.student.logit_scale.clamp_(0, math.log(100))
        return terms, total_loss, lr


def build_trainer(cfg: DistillConfig, cache, recipe, env: distributed.DistEnv, device: str) -> Trainer:
    """Student, wrapper, data and optimizer for `cfg` (no run directory involved).

    Checks every shard against the manifest first (counts, sizes, the cache id)."""
    torch.manual_seed(cfg.seed)
    student = build_student(cfg, device)
    wrapper, notes = _wrap(cfg, recipe, cache.teachers, student, device)
    data = _data(cfg, cache, recipe, env, wrapper, student, notes)
    decoder = None
    if cfg.decode == "gpu":
        from hierdctl.gpu_decode import BatchDecoder

        io = data.dataset.io
        decoder = BatchDecoder(io["image_size"], io["mean"], io["std"], data.dataset.plan, device,
                               student.eval_transform, (data.stream or data.dataset).where)
        notes.append(f"--decode gpu: JPEGs decoded on {device} (torchvision decode_jpeg), crops replayed there"
                     + ("" if data.dataset.plan else "; eval views on the CPU (the student's eval transform is not "
                        "resize + centre crop)"))
    if data.stream is not None:
        total = cfg.steps if cfg.steps is not None else _stream_total(data.stream, cfg.epochs)
    else:
        total = cfg.steps if cfg.steps is not None else max(1, int(round(cfg.epochs * data.steps_per_epoch)))
    warmup = cfg.resolve_warmup(total)
    notes.append(f"warm-up {warmup} steps of {total}" + (" (auto: min(10,000, 10% of the run))"
                                                         if cfg.warmup == "auto" else ""))
    prec = distributed.resolve_precision(cfg.precision, device)
    if prec != "fp32" and not device.startswith("cuda"):
        raise UserError(f"{prec} autocast is for GPUs; use --precision fp32 on CPU", "--precision")
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
    optimizer = torch.optim.AdamW(param_groups(wrapper, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    scaler = torch.amp.GradScaler("cuda") if prec == "fp16" else None
    net = wrapper
    if env.torchrun and env.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(wrapper, device_ids=[device] if device.startswith("cuda") else None)
    return Trainer(cfg=cfg, env=env, device=device, recipe=recipe, teachers=cache.teachers, student=student,
                   wrapper=wrapper, net=net, optimizer=optimizer, scaler=scaler, amp_dtype=amp_dtype, data=data,
                   total=total, warmup=warmup, notes=notes, decoder=decoder)


def _wrap(cfg: DistillConfig, recipe, teachers: list[dict], student: Student, device: str):
    """The student inside what the recipe learns beside it (projectors, κ scales, fusion). -> (wrapper, notes)"""
    from hierdctl.student import StudentWrapper

    student_dim = int(student.model_cfg["embed_dim"])
    teacher_dim = int(teachers[0]["embed_dim"]) if recipe.needs_teacher else None
    n_teachers = len(teachers) if recipe.needs_teacher else 1
    for t in recipe.terms:
        which = t.args.get("teacher", "all")
        require(which == "all" or which < len(teachers), f"term {t.name} names teacher {which}, but the cache has "
                f"{len(teachers)} teacher(s) (0 = the first --teacher)", "--recipe")
    wrapper = StudentWrapper(student.model, student_dim, teacher_dim, recipe.fields, cfg.exp_scales, cfg.mask_ratio,
                             ensemble_dims=tuple(int(t["embed_dim"]) for t in teachers[1:n_teachers])).to(device)
    notes = []
    if n_teachers > 1:
        notes.append(f"teacher ensemble of {n_teachers}: in-batch distribution terms average the teachers' softmaxes, "
                     "feature terms average over the teachers (each through its own projector); parts come from the "
                     "first")
    if ("patch_tokens" in recipe.extras or "masked_forward" in recipe.extras) and not wrapper.is_vit:
        raise UserError(f"recipe {recipe.name!r} needs patch tokens but the student is not a ViT", "--student")
    if wrapper.project:
        notes.append(f"student width {student_dim} ≠ teacher width {teacher_dim}: added projectors "
                     f"Linear({student_dim}, {teacher_dim}) for the terms that compare the student with the "
                     "teacher (trained, dropped by export; the task loss trains the student's own embedding)")
    return wrapper, notes


def _data(cfg: DistillConfig, cache, recipe, env, wrapper, student: Student, notes: list) -> Data:
    """The cache reader: random access over checked local shards, or the streaming reader."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    remote = cache_format.is_remote(str(cache.root))
    stream = cfg.cache_reader == "stream" or (cfg.cache_reader == "auto" and remote)
    require(not (remote and not stream), "a cache given as a URL is read by the streaming reader: drop "
            "--cache-reader random", "--cache-reader")
    # A local cache is checked against its manifest first; a remote one is read as it streams.
    spans = [[(0, 0)] * e["samples"] for e in cache.shard_entries] if remote else cache_format.check_shards(cache)
    n_samples = sum(len(s) for s in spans)
    require(n_samples >= cfg.batch_size,
            f"the cache holds {n_samples} samples, fewer than one global batch ({cfg.batch_size})", "--batch-size")
    workers = workers_for(cfg.workers)
    vs = student.model.visual.image_size
    student_io = {
        "image_size": vs[0] if isinstance(vs, (tuple, list)) else int(vs),
        "mean": tuple(student.pp_cfg.get("mean", OPENAI_DATASET_MEAN)),
        "std": tuple(student.pp_cfg.get("std", OPENAI_DATASET_STD)),
        "eval_transform": student.eval_transform,
        "tokenize": student.tokenizer,
        "grid_size": (wrapper.grid[0] * wrapper.grid[1]) if wrapper.grid else 0,
        "decode": cfg.decode,
    }
    parts = set(recipe.cache_parts)
    needs = {"global": recipe.needs_teacher, "clusters": "clusters" in parts, "phrases": "phrases" in parts,
             "perturbations": "perturbations" in parts, "cluster_crops": "cluster_crops" in parts,
             "tokens": "tokens" in parts, "mask_noise": "masked_forward" in recipe.extras,
             "teachers": len(cache.teachers) if recipe.needs_teacher else 1}
    join = None
    if cfg.images is not None:
        join = cache_format.ImageJoin(cfg.images, SourceOptions.from_record(cache.config["source_options"]),
                                      cache.manifest["shards_total"])
        notes.append(f"images joined from {cfg.images} by key (sha256-checked)")
    dataset = cache_format.CacheDataset(cache, spans, cfg.seed, cfg.view_policy, cfg.caption_policy, student_io, needs,
                                        join)
    if not stream:
        return Data(dataset, None, n_samples, n_samples // cfg.batch_size, workers, needs)
    streamer = cache_format.CacheStream(cache, dataset, env.world_size, env.rank, workers,
                                        cfg.batch_size // env.world_size, cfg.shuffle_buffer, cfg.seed)
    require(streamer.steps_per_epoch(0) >= 1, f"streaming {len(cache.shard_entries)} shards over "
            f"{env.world_size} process(es) × {max(1, workers)} worker(s) leaves fewer samples per worker than one "
            "batch: fewer --workers or a smaller --batch-size", "--cache-reader")
    notes.append(f"streaming the cache: {max(1, workers)} reader(s) per process, shuffle buffer "
                 f"{cfg.shuffle_buffer}, {streamer.steps_per_epoch(0)} steps per epoch")
    return Data(dataset, streamer, n_samples, streamer.steps_per_epoch(0), workers, needs)


def _log_line(out: Path, mf, rec: dict) -> None:
    """Append one metrics row; a full disk is one clear message, not a traceback."""
    with atomic.write_guard(out, str(out), checkpoint.METRICS):
        mf.write(json.dumps(rec) + "\n")
        mf.flush()


def run(cfg: DistillConfig) -> dict:
    """Train. Returns a summary: steps, final loss terms, throughput, paths, skipped samples."""
    from hierdctl.losses.registry import load_recipe

    cfg.validate()
    started = time.time()
    env = distributed.resolve()
    device = distributed.resolve_device(cfg.device, env)
    distributed.init_process_group(env, device)
    out = Path(cfg.out)
    try:
        cache = cache_format.open_cache(cfg.cache)
        recipe = load_recipe(cfg.recipe)
        _check_cache(cache, recipe, cfg.images, cfg.caption_policy)
        require(cfg.batch_size % env.world_size == 0,
                f"global batch {cfg.batch_size} is not divisible by {env.world_size} processes", "--batch-size")

        # --- the run directory: fresh, resumed, or a clear refusal ---------------------
        runtime = settings.keys(DistillConfig, settings.RUNTIME)  # never recorded; free to change at a resume
        resolved = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in runtime}
        has_ckpt = checkpoint.check_run_target(out, cfg.resume, cfg.overwrite)
        cache_digest = cache_format.identity_digest(cache.manifest)
        terms = [{"name": t.name, "weight": t.weight, "args": dict(t.args)} for t in recipe.terms]
        old = (checkpoint.read_config(out) or {}) if cfg.resume and has_ckpt else {}
        # One W&B run across resumes: its id is kept with the run (a run started without W&B gets one now).
        wandb_id = old.get("wandb_run_id") or (reporting.new_run_id() if "wandb" in cfg.reporters else None)
        if cfg.resume and has_ckpt:
            diff = [k for k in settings.keys(DistillConfig, settings.IDENTITY) if old.get(k) != resolved.get(k)]
            if diff:
                raise UserError("cannot resume with changed settings: " + ", ".join(
                    f"{k} {old.get(k)!r} → {resolved.get(k)!r}" for k in diff), "--resume")
            _check_checkpoint_record(out, resolved, terms, cache_digest, old, cfg.cache)
        lock = atomic.FolderLock(out, "--out") if env.is_main else contextlib.nullcontext()
        with lock:
            notes = [f"took over the lock of a run that is gone ({o})" for o in getattr(lock, "took_over", [])]
            resume = cfg.resume and has_ckpt
            if env.is_main and resume:  # what a killed atomic write left (NAME.tmpPID); the lock is ours
                checkpoint.remove_leftovers(out)
            if env.is_main and not resume and out.exists():
                removed = checkpoint.clear(out)  # only what a hierdctl run wrote (check_run_target)
                if removed and cfg.overwrite:
                    notes.append(f"--overwrite: removed the earlier run's {len(removed)} files")
            distributed.barrier(env)
            tr = build_trainer(cfg, cache, recipe, env, device)
            notes = notes + tr.notes
            readers = max(1, tr.data.workers) if tr.data.stream is not None else None
            if resume and readers != (checkpoint.read_config(out) or {}).get("stream_readers"):
                raise UserError(f"the streamed data order depends on the number of readers: resume with the --workers "
                                f"of the run ({(checkpoint.read_config(out) or {}).get('stream_readers')}), not "
                                f"{readers}", "--workers")
            if env.is_main:
                checkpoint.write_config(out, resolved | {
                    "warmup_steps": tr.warmup, "total_steps": tr.total, "stream_readers": readers,
                    "hierdctl": __version__, "recipe_terms": terms, "cache_digest": cache_digest}
                    | ({"wandb_run_id": wandb_id} if wandb_id else {}))
            distributed.barrier(env)
            identity = {k: resolved[k] for k in settings.keys(DistillConfig, settings.IDENTITY)}
            try:
                return _train(cfg, out, cache, recipe, tr, env, resume, notes, started,
                              {"identity": identity, "recipe_terms_full": terms, "cache_digest": cache_digest})
            except KeyboardInterrupt as e:  # SIGINT, or SIGTERM (the CLI raises Interrupted for it)
                step, saved = tr.position
                since = (f"from step {saved}, its last checkpoint" if saved is not None else
                         "from the start: no checkpoint was written yet")
                raise Interrupted(getattr(e, "signum", signal.SIGINT), f"interrupted at step {step}; rerun with "
                                  f"--resume to continue ({since})") from None
    except cache_format.CorruptShard as e:  # re-raised from a loader worker
        raise UserError(f"{e}; rerun cache-teacher on {cfg.cache} with the same options to redo damaged shards",
                        "CACHE") from None
    finally:
        distributed.destroy(env)


def _check_checkpoint_record(out: Path, resolved: dict, terms: list[dict], cache_digest: str, config: dict,
                             cache_spec: str) -> None:
    """--resume: the newest checkpoint's own record (its .json) must match this run, whatever
    config.resolved.yaml says (an edited record must not resume a run as another recipe), and the
    cache must be the one it trained on (its manifest digest: a cache rebuilt in place from
    another source is not)."""
    got = checkpoint.latest_meta(out)
    if got is None:
        return  # load_training_state names what is wrong with the checkpoint
    path, meta = got
    edited = f"; {checkpoint.CONFIG} was edited to match: resume with the checkpoint's settings, or start a new run"
    recorded = meta.get("identity") if isinstance(meta.get("identity"), dict) else {}
    if not recorded:  # a checkpoint of an older hierdctl: its recipe is what it recorded
        recorded = {k: meta[k] for k in ("recipe",) if k in meta} | (
            {"student": meta["student_spec"]} if "student_spec" in meta else {})
    diff = [k for k, v in recorded.items() if k in resolved and resolved[k] != v]
    if diff:
        raise UserError(f"cannot resume: {path} was trained with " + ", ".join(
            f"{k} {recorded[k]!r}" for k in diff) + ", this run has " + ", ".join(
            f"{k} {resolved[k]!r}" for k in diff) + edited, "--resume")
    mine = meta.get("recipe_terms_full")
    if mine is None and isinstance(meta.get("recipe_terms"), list):  # older: name and weight only
        mine, terms = meta["recipe_terms"], [{"name": t["name"], "weight": t["weight"]} for t in terms]
    if mine is not None and mine != terms:
        raise UserError(f"cannot resume: {path} was trained with the recipe terms {mine}, this run's recipe has "
                        f"{terms}" + edited, "--resume")
    want = meta.get("cache_digest") or config.get("cache_digest")
    if want and want != cache_digest:
        raise UserError(f"cannot resume: the cache {cache_spec} is not the one this run trained on (its manifest "
                        f"digest is {cache_digest[:12]}…, {path.name} recorded {want[:12]}…): it was rebuilt or "
                        "changed since; give the run its own cache, or start over with --overwrite", "--resume")


def _train(cfg: DistillConfig, out: Path, cache, recipe, tr: "Trainer", env, resume: bool, notes: list,
           started: float, record: dict) -> dict:
    wrapper, total = tr.wrapper, tr.total
    start = 0
    if resume:
        start = checkpoint.load_training_state(out, wrapper, tr.optimizer, tr.scaler, tr.device)
        notes.append(f"resumed from step {start}")
    if env.is_main:  # a resumed run rewrites what came after its checkpoint; a fresh one starts empty
        kept, torn = checkpoint.truncate_metrics(out, start)
        if torn:
            notes.append(f"{checkpoint.METRICS}: dropped {torn} unreadable line(s) (torn by a crash mid-write)")
    ckpt_meta = {"model_cfg": tr.student.model_cfg, "preprocess_cfg": tr.student.pp_cfg, "teacher": tr.teacher,
                 "recipe": recipe.name, "recipe_terms": [{"name": t.name, "weight": t.weight} for t in recipe.terms],
                 "data": str(cfg.cache), "student_spec": cfg.student, "hierdctl": __version__} | record
    if env.is_main and not cfg.quiet:
        for n in notes:
            console.print(f"[dim]distill:[/] {n}")
    reporters = None
    if cfg.reporters and env.is_main:  # open_clip's scalar names and the run's hyperparameters (hierdctl/reporting.py)
        recorded = checkpoint.read_config(out) or {}
        reporters = reporting.Reporters(cfg.reporters, out, recorded, start, recorded.get("wandb_run_id"), cfg.quiet)

    # --- the loop -----------------------------------------------------------------
    step, last_saved, last = start, (start if resume else None), {}
    tr.position = (step, last_saved)
    skipped, skipped_examples = 0, []
    t_log, n_log = time.time(), 0
    wrapper.train()
    mf_ctx = open(out / checkpoint.METRICS, "a") if env.is_main else contextlib.nullcontext()
    try:
        with progress(cfg.quiet or not env.is_main) as bar, mf_ctx as mf:
            task = bar.add_task("distill", total=total, completed=start, unit="steps", info="")
            for batch in tr.loader(start):
                device_batch = tr.to_device(batch)  # first: --decode gpu notes an image no decoder reads in batch["bad"]
                bad = [b for b in batch.get("bad", []) if b]
                if bad:
                    skipped += sum(b.count("; ") + 1 for b in bad)
                    if not skipped_examples and env.is_main and not cfg.quiet:
                        console.print(f"[yellow]distill:[/] skipped a damaged cached sample: {bad[0]} "
                                      "(replaced by the next good one; counted in metrics.jsonl)", soft_wrap=True)
                    skipped_examples += bad[: max(0, 5 - len(skipped_examples))]
                try:
                    terms, total_loss, lr = tr.step(device_batch, step)
                except TrainingDiverged as e:
                    kept = (f"the last good checkpoint (step {last_saved}) is kept in {checkpoint.checkpoint_dir(out)}"
                            if last_saved is not None else "no checkpoint was written yet")
                    raise TrainingDiverged(f"{e}; {kept}") from None
                step += 1
                tr.position = (step, last_saved)  # where an interrupt finds the run
                faults.point(f"distill:step:{step}")
                n_log += cfg.batch_size
                last = {k: float(v.detach()) for k, v in terms.items()} | {"loss": float(total_loss.detach())}
                if step % cfg.log_every == 0 or step == total or step == 1:  # a resumed run logs the same rows
                    n_skipped = _sum_over_ranks(skipped, env)
                    if env.is_main:
                        now = time.time()
                        rec = {"step": step, "epoch": round(step / tr.data.steps_per_epoch, 4), "lr": lr, **last,
                               "logit_scale": float(wrapper.student.logit_scale.detach().exp()),
                               "samples_per_s": round(n_log / max(now - t_log, 1e-9), 2), "skipped_samples": n_skipped}
                        _log_line(out, mf, rec)
                        if reporters is not None:
                            reporters.log(step, rec)
                        t_log, n_log = now, 0
                        bar.update(task, info=f"{rec['samples_per_s']:,.0f} samples/s  " + " ".join(
                            f"{k.removesuffix('_loss')} {v:.3g}" for k, v in last.items()))
                bar.advance(task)
                if step % cfg.save_every == 0 or step == total:
                    if env.is_main:
                        checkpoint.save(out, step, wrapper, tr.optimizer, tr.scaler, ckpt_meta, cfg.keep_checkpoints)
                    last_saved = step
                    tr.position = (step, last_saved)
                    distributed.barrier(env)
    finally:  # a run stopped by an error still closes its reporters (W&B's run, TensorBoard's file)
        if reporters is not None:
            reporters.close()
    if env.is_main:
        _plot(out, out / checkpoint.CURVES)
    seconds = time.time() - started
    return {
        "out": str(out), "steps": step, "resumed_from": start, "final": last, "recipe": recipe.name,
        "samples_per_epoch": tr.data.n_samples, "steps_per_epoch": tr.data.steps_per_epoch, "warmup_steps": tr.warmup,
        "seconds": round(seconds, 2), "samples_per_s": round((step - start) * cfg.batch_size / max(seconds, 1e-9), 2),
        "checkpoint": str(checkpoint.checkpoint_dir(out) / f"{checkpoint.stem(step)}.safetensors"), "notes": notes,
        "skipped_samples": _sum_over_ranks(skipped, env), "skipped_examples": skipped_examples, "rank": env.rank,
    }


def _stream_total(streamer, epochs: float) -> int:
    """Steps of `epochs` epochs of a streamed cache (each epoch's steps depend on its shard shuffle)."""
    whole, frac = int(epochs), epochs - int(epochs)
    total = sum(streamer.steps_per_epoch(e) for e in range(whole))
    return max(1, total + int(round(frac * streamer.steps_per_epoch(whole))))


def _sum_over_ranks(n: int, env) -> int:
    if not env.torchrun or env.world_size == 1:
        return n
    nccl = torch.distributed.get_backend() == "nccl"
    t = torch.tensor([n], dtype=torch.int64, device=f"cuda:{torch.cuda.current_device()}" if nccl else "cpu")
    torch.distributed.all_reduce(t)
    return int(t.item())
