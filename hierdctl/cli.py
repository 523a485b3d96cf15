"""The command line: an adapter from options to each stage's typed config and `run(config)`.

Only typer, rich and hierdctl/configs.py (pure Python) are imported at module level, so
`hierdctl --help` is instant; each command imports its stage (and with it torch) when it
runs. Every option's default is read from its config field (`_d`): defaults exist once.
A `UserError` anywhere becomes one message naming the flag or file, and exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .configs import (CacheTeacherConfig, DistillConfig, EvalRetrievalConfig, EvalZeroshotConfig, ExportConfig,
                      ScenesConfig, SourceOptions, default, parse_ks, parse_pair, parse_warmup)
from .errors import UserError

app = typer.Typer(
    help="Distil CLIP-style teachers into small retrieval students: cache the teacher once, "
    "train students offline (CLIP-KD, TinyCLIP, CLIP-RD, HieRD), export, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _fail(e: UserError) -> None:
    from .console import console

    console.print(f"[bold red]error:[/] {_escape(str(e))}", soft_wrap=True)  # one line, never wrapped
    raise typer.Exit(2)


def _escape(s: str) -> str:
    from rich.markup import escape

    return escape(s)


def _d(cls, name: str):
    """The default of a config field, for an option (so the help shows the stage's own default)."""
    return default(cls, name)


def _pair_text(pair) -> str:
    return ",".join(f"{x:g}" for x in pair)


_CT, _DC, _EX, _ER, _EZ = CacheTeacherConfig, DistillConfig, ExportConfig, EvalRetrievalConfig, EvalZeroshotConfig
_SC = ScenesConfig
_SRC = SourceOptions()


# ----------------------------------------------------------------------------------
# cache-teacher / cache-info
# ----------------------------------------------------------------------------------


@app.command("cache-teacher")
def cache_teacher(
    source: str = typer.Argument(..., help="Shards (data/{00000..00099}.tar, a dir, one .tar, or URLs: pipe:CMD, https://…, file:…, s3://…), a .csv/.tsv/.jsonl, or a Karpathy .json."),
    out: Path = typer.Option(..., "--out", "-o", help="Output cache directory (resumed if it exists)."),
    teacher: str = typer.Option(..., "--teacher", "-t", help="Model spec: open_clip:ARCH/TAG, open_clip:ARCH/CKPT, open_clip:CFG.json/CKPT, local-dir:PATH, hf:REPO_OR_PATH."),
    views: int = typer.Option(_d(_CT, "views"), help="Views per image: view 0 is the teacher's eval preprocessing, the rest random crops."),
    clusters: int = typer.Option(_d(_CT, "clusters"), help="K clusters of patch tokens per view (0: no clusters)."),
    cluster_iters: int = typer.Option(_d(_CT, "cluster_iters"), help="Spherical k-means iterations."),
    cluster_pos_weight: float = typer.Option(_d(_CT, "cluster_pos_weight"), help="Weight of patch position in clustering (0: features only)."),
    max_phrases: int = typer.Option(_d(_CT, "max_phrases"), help="Noun phrases kept per caption (0: none)."),
    chunker: str = typer.Option(_d(_CT, "chunker"), help="Phrase chunker: auto (spaCy if installed, else TextBlob), spacy, textblob."),
    perturbations: int = typer.Option(_d(_CT, "perturbations"), help="Compositional perturbations per caption (noun chunks' modifiers, heads or places swapped) with the teacher's embeddings (0: none)."),
    cluster_crops: bool = typer.Option(_d(_CT, "cluster_crops"), "--cluster-crops/--no-cluster-crops", help="Also the teacher's embedding of each cluster's bounding-box crop (CLIPSelf-style; K extra forwards per view)."),
    store: str = typer.Option(_d(_CT, "store"), help="clusters, or tokens (also every patch token and text token feature)."),
    store_images: bool = typer.Option(_d(_CT, "store_images"), "--store-images/--no-store-images", help="Keep each original image in the cache (distill reads images from it)."),
    dtype: str = typer.Option(_d(_CT, "dtype"), help="Storage of float arrays: fp16, fp32 or int8 (per-row scales)."),
    crop_scale: str = typer.Option(_pair_text(_d(_CT, "crop_scale")), help="RandomResizedCrop area range for views ≥ 1."),
    crop_ratio: str = typer.Option(_pair_text(_d(_CT, "crop_ratio")), help="RandomResizedCrop aspect range for views ≥ 1."),
    flip_p: float = typer.Option(_d(_CT, "flip_p"), help="Horizontal-flip probability for views ≥ 1."),
    seed: int = typer.Option(_d(_CT, "seed"), help="Seed of the augmentations (views depend on seed and image bytes only)."),
    image_col: str = typer.Option(_SRC.image_col, help="Tables: the image-path column."),
    caption_col: str = typer.Option(_SRC.caption_col, help="Tables: the caption column."),
    image_root: Optional[str] = typer.Option(_SRC.image_root, help="Karpathy JSON: folder the image paths are relative to."),
    split: str = typer.Option(_SRC.split, help="Karpathy JSON: split to read (train, restval, val, test, all)."),
    rows_per_shard: int = typer.Option(_SRC.rows_per_unit, help="Tables / Karpathy JSON: samples per output shard."),
    max_pixels: int = typer.Option(_d(_CT, "max_pixels"), help="Decompression-bomb limit; larger images are skipped."),
    batch_size: int = typer.Option(_d(_CT, "batch_size"), help="Images per teacher forward."),
    device: str = typer.Option(_d(_CT, "device"), help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option(_d(_CT, "precision"), help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16."),
    workers: int = typer.Option(_d(_CT, "workers"), help="DataLoader decoding workers (-1: min(8, cpus-1))."),
    log_skipped: Optional[Path] = typer.Option(_d(_CT, "log_skipped"), help="Write every skipped sample (JSONL) here."),
    overwrite: bool = typer.Option(_d(_CT, "overwrite"), help="Remove what cache-teacher wrote in OUT and start over (never anything else)."),
    rank: Optional[int] = typer.Option(_d(_CT, "rank"), help="Job arrays without torchrun: this job's rank."),
    world_size: Optional[int] = typer.Option(_d(_CT, "world_size"), help="Job arrays without torchrun: number of jobs."),
    quiet: bool = typer.Option(_d(_CT, "quiet"), help="No progress bar."),
):
    """Run a frozen teacher over an image–text source and cache its features in WebDataset shards."""
    try:
        from hierdctl.stages.cache_teacher import run

        cfg = CacheTeacherConfig(
            source=source, out=out, teacher=teacher,
            source_options=SourceOptions(image_col, caption_col, image_root, split, rows_per_shard),
            views=views, clusters=clusters, cluster_iters=cluster_iters, cluster_pos_weight=cluster_pos_weight,
            max_phrases=max_phrases, chunker=chunker, perturbations=perturbations, cluster_crops=cluster_crops, store=store, store_images=store_images, dtype=dtype,
            crop_scale=parse_pair(crop_scale, "--crop-scale"), crop_ratio=parse_pair(crop_ratio, "--crop-ratio"),
            flip_p=flip_p, seed=seed, max_pixels=max_pixels, batch_size=batch_size, device=device, precision=precision,
            workers=workers, log_skipped=log_skipped, overwrite=overwrite, rank=rank, world_size=world_size, quiet=quiet,
        )
        manifest = run(cfg)
    except UserError as e:
        _fail(e)
    if manifest["this_run"]["rank"] == 0:
        _print_cache_summary(manifest, out)


def _print_cache_summary(m: dict, out: Path) -> None:
    from rich.table import Table

    from .console import console

    t = Table(title=f"teacher cache {out}", show_header=False)
    r = m.get("this_run", {})
    t.add_row("teacher", f"{m['teacher']['spec']}  (D={m['teacher']['embed_dim']}, s_T={m['teacher']['logit_scale']:.2f})")
    t.add_row("complete", f"{m['complete']}  ({m['shards_done']}/{m['shards_total']} shards)")
    t.add_row("samples", f"{m['samples']:,}  captions {m['captions']:,}  phrases {m['phrases']:,}")
    t.add_row("skipped", f"{m['skipped_total']:,}  " + ", ".join(f"{k}: {v}" for k, v in m["skipped"].items()))
    if m["converted"]:
        t.add_row("converted to RGB", ", ".join(f"{k}: {v}" for k, v in m["converted"].items()))
    bps = m["bytes_per_sample"]
    t.add_row("size", f"{m['bytes'] / 1e6:,.1f} MB" + (f"  ({bps / 1e3:,.1f} KB/sample)" if bps else ""))
    if r:
        rate = r["samples"] / r["seconds"] if r["seconds"] else 0.0
        t.add_row("this run", f"{r['samples']:,} samples in {r['seconds']:.1f} s ({rate:,.1f}/s), "
                  f"{r['shards']} shards written, {r['shards_resumed']} kept from before")
    console.print(t)


@app.command("cache-info")
def cache_info(
    cache: Path = typer.Argument(..., help="A cache directory written by cache-teacher."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON on stdout."),
    verify: bool = typer.Option(False, "--verify", help="Re-read every shard and check its size, sample count and sha256 against the manifest (exit 1 on a mismatch)."),
):
    """Show a teacher cache's manifest; --verify checks every shard's bytes."""
    try:
        from .cache_format import MANIFEST_NAME

        p = cache / MANIFEST_NAME
        if not p.is_file():
            raise UserError(f"{cache} holds no {MANIFEST_NAME}: not a finished hierdctl cache", "CACHE")
        try:
            m = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{p} is not valid JSON ({e})", "CACHE") from None
        problems = _verify_cache(cache) if verify else None
    except UserError as e:
        _fail(e)
    if as_json:
        sys.stdout.write(json.dumps(m | ({"verify": problems} if verify else {}), indent=2, sort_keys=True) + "\n")
    else:
        _print_cache_summary(m, cache)
    if verify:
        from .console import console

        if problems:
            for line in problems:
                console.print(f"[bold red]damaged:[/] {_escape(line)}", soft_wrap=True)
            console.print(f"{len(problems)} problem(s): rerun cache-teacher on {_escape(str(cache))} with the same "
                          "options to redo the damaged shards", soft_wrap=True)
            raise typer.Exit(1)
        console.print(f"verified: every shard of {_escape(str(cache))} matches the manifest", soft_wrap=True)


def _verify_cache(cache: Path) -> list[str]:
    from . import cache_format

    c = cache_format.open_cache(cache)
    problems = cache_format.verify_digests(c.root, c.manifest["shards"])  # schema 1 recorded no sha256: sizes only
    for entry in c.shard_entries:
        path = c.root / entry["name"]
        if not path.is_file() or any(pr.startswith(entry["name"]) for pr in problems):
            continue
        try:
            n = len(cache_format.index_shard(path))
        except cache_format.CorruptShard as e:
            problems.append(str(e))
            continue
        if n != entry["samples"]:
            problems.append(f"{entry['name']}: {n} samples, the manifest recorded {entry['samples']}")
    return problems


# ----------------------------------------------------------------------------------
# Later stages
# ----------------------------------------------------------------------------------


@app.command("distill")
def distill(
    ctx: typer.Context,
    cache: Optional[str] = typer.Argument(None, help="A teacher cache written by cache-teacher."),
    student: Optional[str] = typer.Option(None, help="Student: an open_clip architecture (ViT-T-16 ships), open_clip:CFG.json, or any model spec to start from weights."),
    recipe: Optional[str] = typer.Option(None, help="A shipped recipe name (see --list-recipes) or a recipe YAML file."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Run directory (config, metrics, checkpoints, loss curves)."),
    epochs: Optional[float] = typer.Option(_d(_DC, "epochs"), help="Epochs over the cache (fractions allowed)."),
    steps: Optional[int] = typer.Option(_d(_DC, "steps"), help="Optimizer steps (wins over --epochs)."),
    batch_size: int = typer.Option(_d(_DC, "batch_size"), help="Global batch size, over all processes."),
    lr: float = typer.Option(_d(_DC, "lr"), help="Peak learning rate."),
    warmup: str = typer.Option(str(_d(_DC, "warmup")), help="Linear warm-up steps before the cosine decay, or auto = min(10000, 10% of the run)."),
    weight_decay: float = typer.Option(_d(_DC, "weight_decay"), help="AdamW weight decay (not on gains, biases, scales)."),
    grad_clip: Optional[float] = typer.Option(_d(_DC, "grad_clip"), help="Gradient-norm clipping."),
    precision: str = typer.Option(_d(_DC, "precision"), help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16."),
    device: str = typer.Option(_d(_DC, "device"), help="auto, cpu, cuda, cuda:N."),
    seed: int = typer.Option(_d(_DC, "seed"), help="Seed of initialisation, data order, views and masks."),
    workers: int = typer.Option(_d(_DC, "workers"), help="DataLoader workers (-1: automatic)."),
    save_every: int = typer.Option(_d(_DC, "save_every"), help="Checkpoint every N steps."),
    log_every: int = typer.Option(_d(_DC, "log_every"), help="Write metrics every N steps."),
    report_to: str = typer.Option(_d(_DC, "report_to"), help="none, or tensorboard (every loss term, lr, logit scale and samples/s under RUN_DIR/tensorboard)."),
    resume: bool = typer.Option(_d(_DC, "resume"), help="Continue the run in --out from its latest checkpoint."),
    overwrite: bool = typer.Option(_d(_DC, "overwrite"), help="Discard the run in --out (only what distill wrote) and start over."),
    config: Optional[str] = typer.Option(None, help="A YAML file of settings (command-line options win)."),
    set_: List[str] = typer.Option([], "--set", help="key=value override of any setting (repeatable; unknown keys are errors)."),
    list_recipes: bool = typer.Option(False, "--list-recipes", help="List the shipped recipes and exit."),
    quiet: bool = typer.Option(_d(_DC, "quiet"), help="No progress bar."),
):
    """Train a small open_clip student offline from a teacher cache; the teacher is never loaded."""
    if list_recipes:
        from rich.table import Table

        from .console import console
        from .losses.registry import list_recipes as _list

        t = Table("recipe", "description", title="shipped recipes")
        for name, desc in _list():
            t.add_row(name, desc)
        console.print(t)
        return
    try:
        from click.core import ParameterSource

        from hierdctl.stages.distill import TrainingDiverged, resolve_config, run

        given = dict(cache=cache, student=student, recipe=recipe, out=out, epochs=epochs, steps=steps,
                     batch_size=batch_size, lr=lr, warmup=parse_warmup(warmup), weight_decay=weight_decay,
                     grad_clip=grad_clip, precision=precision, device=device, seed=seed, workers=workers,
                     save_every=save_every, log_every=log_every, report_to=report_to, resume=resume,
                     overwrite=overwrite, quiet=quiet)
        # Only what the command line said overrides --config; the rest are the config's defaults.
        cli = {k: v for k, v in given.items() if ctx.get_parameter_source(k) != ParameterSource.DEFAULT}
        summary = run(resolve_config(cli, config, set_))
    except UserError as e:
        _fail(e)
    except TrainingDiverged as e:
        from .console import console

        console.print(f"[bold red]training stopped:[/] {_escape(str(e))}", soft_wrap=True)
        raise typer.Exit(1)
    if summary["rank"] != 0:
        return
    from rich.table import Table

    from .console import console

    t = Table(title=f"distill {summary['out']}", show_header=False)
    t.add_row("recipe", summary["recipe"])
    t.add_row("steps", f"{summary['steps']:,} (resumed from {summary['resumed_from']:,})" if summary["resumed_from"] else f"{summary['steps']:,}")
    t.add_row("warm-up", f"{summary['warmup_steps']:,} steps")
    t.add_row("throughput", f"{summary['samples_per_s']:,.1f} samples/s over {summary['seconds']:.1f} s")
    t.add_row("final loss", "  ".join(f"{k} {v:.4g}" for k, v in summary["final"].items()))
    if summary["skipped_samples"]:
        t.add_row("skipped samples", f"{summary['skipped_samples']:,} damaged cached samples replaced: "
                  + _escape("; ".join(summary["skipped_examples"][:3])))
    t.add_row("checkpoint", summary["checkpoint"])
    console.print(t)


@app.command("export")
def export(
    source: Path = typer.Argument(..., help="A distill run dir (its latest checkpoint), its checkpoints/ folder, or a step-NNNNNNN.safetensors."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written under a temporary name, then renamed into place)."),
    fmt: str = typer.Option(_d(_EX, "format"), "--format", "-f", help="open_clip (local dir), onnx (image and text graphs), hf (local dir + a transformers CLIPModel in DIR/hf), or all (open_clip + onnx)."),
    report: Optional[Path] = typer.Option(_d(_EX, "report"), help="An eval-retrieval / eval-zeroshot report.json whose metrics go into the model card."),
    opset: int = typer.Option(_d(_EX, "opset"), help="ONNX opset."),
    atol: float = typer.Option(_d(_EX, "atol"), help="Largest ONNX-vs-PyTorch difference accepted (normalised embeddings)."),
    overwrite: bool = typer.Option(_d(_EX, "overwrite"), help="Replace an earlier export in --out."),
    quiet: bool = typer.Option(_d(_EX, "quiet"), help="No notes."),
):
    """Export a trained student as an open_clip local dir (open_clip, CLIP_benchmark, clip-retrieval) and/or ONNX."""
    try:
        from hierdctl.stages.export import ExportMismatch, run

        summary = run(ExportConfig(source=source, out=out, format=fmt, report=report, opset=opset, atol=atol,
                                   overwrite=overwrite, quiet=quiet))
    except UserError as e:
        _fail(e)
    except ExportMismatch as e:
        from .console import console

        console.print(f"[bold red]export check failed:[/] {_escape(str(e))}", soft_wrap=True)
        raise typer.Exit(1)
    from rich.table import Table

    from .console import console

    t = Table(title=f"export {summary['out']}", show_header=False)
    t.add_row("checkpoint", f"{summary['checkpoint']['path']} (step {summary['checkpoint']['step']})")
    t.add_row("model", f"{summary['parameters']:,} parameters, {summary['embed_dim']}-d embedding"
              + ("  [projector dropped]" if summary["projector_dropped"] else ""))
    t.add_row("files", ", ".join(summary["files"]))
    oc = summary["checks"]["open_clip"]
    t.add_row("open_clip reload", f"max |Δ| image {oc['image_max_abs_diff']:.2e}, text {oc['text_max_abs_diff']:.2e}")
    for g, c in summary["checks"].get("onnx", {}).items():
        t.add_row(f"onnx {g} vs torch", f"max |Δ| {c['max_abs_diff']:.2e} (onnxruntime, batch {c['check_batch']})")
    hf = summary["checks"].get("hf")
    if hf:
        t.add_row("hf vs open_clip", f"max |Δ| image {hf['image']['max_abs_diff']:.2e}, text {hf['text']['max_abs_diff']:.2e}"
                  f" (token ids equal on {hf['text']['captions']} captions); pixels ≤ "
                  f"{hf['image_processor']['max_levels']:.1f}/255 ({hf['image_processor']['class']})")
    console.print(t)


def _print_eval_table(report: dict) -> None:
    """One row per metric, one column per model; later models show their retention of the first's."""
    from rich.table import Table

    from .console import console

    models = report["models"]
    names = []
    for m in models:
        names += [k for k in m["metrics"] if k not in names]
    idx = report.get("index")
    title = f"{report['task']} on {report['source'].get('spec')}"
    if idx:
        title += f"  (index {idx['kind']}: {'exact' if idx['exact'] else 'APPROXIMATE'}, faiss on {idx['device']})"
    t = Table(title=_escape(title))
    t.add_column("metric", no_wrap=True, min_width=max(len(k) for k in names))  # names are never cut
    for i, m in enumerate(models):
        t.add_column(_escape(("ref: " if i == 0 and len(models) > 1 else "") + m["spec"]), justify="right", overflow="fold")
    for k in names:
        row = [k]
        for i, m in enumerate(models):
            v = m["metrics"].get(k)
            r = m["retention"].get(k)
            row.append("" if v is None else f"{v:.4f}" + (f"  ({r:.1f}%)" if i and r is not None else ""))
        t.add_row(*row)
    c = report["counts"]
    t.caption = ", ".join(f"{k} {v:,}" for k, v in c.items() if isinstance(v, int)) + (
        "  skipped: " + ", ".join(f"{k} {v}" for k, v in c["skipped"].items()) if c.get("skipped") else "")
    console.print(t)


@app.command("eval-retrieval")
def eval_retrieval(
    source: str = typer.Argument(..., help="Shards (paths or URLs: pipe:CMD, https://…, file:…), a dir of shards, a .csv/.tsv/.jsonl, or a Karpathy .json (COCO, Flickr30k)."),
    model: List[str] = typer.Option(..., "--model", "-m", help="Model spec (repeatable); the first is the reference for retention %."),
    k: str = typer.Option(",".join(map(str, _d(_ER, "ks"))), "--k", help="Comma-separated K of recall@K."),
    batch_size: int = typer.Option(_d(_ER, "batch_size"), help="Images / captions per forward."),
    device: str = typer.Option(_d(_ER, "device"), help="auto, cpu, cuda or cuda:N (FAISS uses a GPU whenever faiss-gpu sees one)."),
    index: str = typer.Option(_d(_ER, "index"), help="flat (exact IndexFlatIP), ivf or hnsw (approximate, labelled so)."),
    nprobe: Optional[int] = typer.Option(_d(_ER, "nprobe"), help="With --index ivf: lists probed per query (default nlist/8)."),
    out: Optional[Path] = typer.Option(_d(_ER, "out"), "--out", "-o", help="Write the JSON report here."),
    save_index: Optional[Path] = typer.Option(_d(_ER, "save_index"), help="Keep each model's embeddings and FAISS indexes in this folder."),
    overwrite: bool = typer.Option(_d(_ER, "overwrite"), help="Replace an earlier --save-index folder."),
    image_col: str = typer.Option(_SRC.image_col, help="Tables: the image-path column."),
    caption_col: str = typer.Option(_SRC.caption_col, help="Tables: the caption column."),
    image_root: Optional[str] = typer.Option(_SRC.image_root, help="Karpathy JSON: folder the image paths are relative to."),
    split: str = typer.Option(_SRC.split, help="Karpathy JSON: split to read (train, restval, val, test, all)."),
    max_pixels: int = typer.Option(_d(_ER, "max_pixels"), help="Decompression-bomb limit; larger images are skipped."),
    workers: int = typer.Option(_d(_ER, "workers"), help="Image-decoding threads (0: decode in the main thread)."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    quiet: bool = typer.Option(_d(_ER, "quiet"), help="No progress bar."),
):
    """Image↔text recall@K (CLIP_benchmark's metrics) with a FAISS index; hard-negative accuracy where the data has them."""
    try:
        from hierdctl.stages.eval_retrieval import run

        cfg = EvalRetrievalConfig(source=source, models=list(model), ks=parse_ks(k), batch_size=batch_size, device=device,
                                  index=index, nprobe=nprobe, out=out, save_index=save_index, overwrite=overwrite,
                                  source_options=SourceOptions(image_col, caption_col, image_root, split),
                                  max_pixels=max_pixels, workers=workers, quiet=quiet)
        report = run(cfg)
    except UserError as e:
        _fail(e)
    _emit_report(report, json_out)


def _emit_report(report: dict, json_out: bool) -> None:
    """An evaluation report as JSON on stdout (--json) or as the rich table on stderr."""
    if json_out:
        sys.stdout.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
    else:
        _print_eval_table(report)


@app.command("eval-zeroshot")
def eval_zeroshot(
    source: str = typer.Argument(..., help="A class-per-folder tree (ROOT/<class>/<image>) or WebDataset shards (paths or URLs) with a class field."),
    model: List[str] = typer.Option(..., "--model", "-m", help="Model spec (repeatable); the first is the reference for retention %."),
    classnames: str = typer.Option(_d(_EZ, "classnames"), help="imagenet (open_clip's), folders (the folder names), or a file (.json list or one name a line)."),
    templates: str = typer.Option(_d(_EZ, "templates"), help="openai (open_clip's 80 ImageNet prompts), simple, or a file of prompts with {c}."),
    class_field: str = typer.Option(_d(_EZ, "class_field"), help="Shards: the member (KEY.cls) or .json field holding the class index."),
    batch_size: int = typer.Option(_d(_EZ, "batch_size"), help="Images / prompts per forward."),
    device: str = typer.Option(_d(_EZ, "device"), help="auto, cpu, cuda or cuda:N."),
    out: Optional[Path] = typer.Option(_d(_EZ, "out"), "--out", "-o", help="Write the JSON report here."),
    max_pixels: int = typer.Option(_d(_EZ, "max_pixels"), help="Decompression-bomb limit; larger images are skipped."),
    workers: int = typer.Option(_d(_EZ, "workers"), help="Image-decoding threads (0: decode in the main thread)."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    quiet: bool = typer.Option(_d(_EZ, "quiet"), help="No progress bar."),
):
    """Zero-shot classification: top-1, top-5 and mean per-class recall (CLIP_benchmark's names)."""
    try:
        from hierdctl.stages.eval_zeroshot import run

        report = run(EvalZeroshotConfig(source=source, models=list(model), classnames=classnames, templates=templates,
                                        class_field=class_field, batch_size=batch_size, device=device, out=out,
                                        max_pixels=max_pixels, workers=workers, quiet=quiet))
    except UserError as e:
        _fail(e)
    _emit_report(report, json_out)


@app.command("scenes")
def scenes(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: OUT/train/*.tar, OUT/test/*.tar, OUT/scenes.json."),
    flavour: str = typer.Option(_d(_SC, "flavour"), help="shapes (drawn), fashion (Fashion-MNIST photos) or cluttered (2–6 shapes and Fashion-MNIST items on photo crops, occlusion, distractors)."),
    n_train: int = typer.Option(_d(_SC, "n_train"), help="Training images."),
    n_test: int = typer.Option(_d(_SC, "n_test"), help="Test images (these carry hard-negative captions)."),
    image_size: int = typer.Option(_d(_SC, "image_size"), help="Image side in pixels."),
    shard_size: int = typer.Option(_d(_SC, "shard_size"), help="Samples per shard."),
    seed: int = typer.Option(_d(_SC, "seed"), help="Seed; the same seed gives byte-identical shards."),
    min_objects: Optional[int] = typer.Option(_d(_SC, "min_objects"), help="Fewest objects per image [flavour's default: 1, cluttered 2]."),
    max_objects: Optional[int] = typer.Option(_d(_SC, "max_objects"), help="Most objects per image [flavour's default: 4, cluttered 6]."),
    captions_per_image: int = typer.Option(_d(_SC, "captions_per_image"), help="Captions per image."),
    negatives_per_kind: int = typer.Option(_d(_SC, "negatives_per_kind"), help="Hard negatives of each kind per test image."),
    image_format: str = typer.Option(_d(_SC, "image_format"), help="png or jpg (quality 95)."),
    textured_fraction: Optional[float] = typer.Option(_d(_SC, "textured_fraction"), help="Share of mottled backgrounds, shapes and fashion [0.5]."),
    fashion_path: Optional[Path] = typer.Option(_d(_SC, "fashion_path"), help="Folder of Fashion-MNIST IDX files (default: Debian's dataset-fashion-mnist), for fashion and cluttered (cluttered falls back to shapes only without it)."),
    clip_benchmark: bool = typer.Option(_d(_SC, "clip_benchmark"), "--clip-benchmark/--no-clip-benchmark", help="Also write OUT/clip_benchmark: the test split in CLIP_benchmark's wds layout, every caption."),
):
    """Write the Scenes benchmark: compositional image–caption shards with hard negatives."""
    try:
        from hierdctl.scenes import run

        cfg = ScenesConfig(out_dir=out, flavour=flavour, n_train=n_train, n_test=n_test, image_size=image_size,
                           shard_size=shard_size, seed=seed, min_objects=min_objects, max_objects=max_objects,
                           captions_per_image=captions_per_image, negatives_per_kind=negatives_per_kind,
                           image_format=image_format, textured_fraction=textured_fraction, fashion_path=fashion_path,
                           clip_benchmark=clip_benchmark)
        summary = run(cfg)
    except UserError as e:
        _fail(e)
    from .console import console

    counts = summary.get("counts", {})
    console.print(f"scenes ({flavour}) → {out}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    if summary.get("cluttered", {}).get("objects"):
        console.print(f"cluttered objects: {_escape(str(summary['cluttered']['objects']))}", soft_wrap=True)
    if summary.get("clip_benchmark", {}).get("command"):
        console.print(f"CLIP_benchmark: {_escape(summary['clip_benchmark']['command'])}", soft_wrap=True)


@app.command("version")
def version():
    """Print the version."""
    from . import __version__

    typer.echo(f"hierdctl {__version__}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
