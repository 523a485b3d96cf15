"""The command line: an adapter from options to each stage's typed config and `run(config)`.

Only typer and rich are imported at module level, so `hierdctl --help` is instant; each
command imports its stage (and with it torch) when it runs. A `UserError` anywhere
becomes one message naming the flag or file, and exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

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

    console.print(f"[bold red]error:[/] {_escape(str(e))}")
    raise typer.Exit(2)


def _escape(s: str) -> str:
    from rich.markup import escape

    return escape(s)


def _pair(text: str, flag: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"expected two numbers 'LO,HI', got {text!r}", flag) from None
    return a, b


# ----------------------------------------------------------------------------------
# cache-teacher / cache-info
# ----------------------------------------------------------------------------------


@app.command("cache-teacher")
def cache_teacher(
    source: str = typer.Argument(..., help="Shards (data/{00000..00099}.tar, a dir, one .tar), a .csv/.tsv/.jsonl, or a Karpathy .json."),
    out: Path = typer.Option(..., "--out", "-o", help="Output cache directory (resumed if it exists)."),
    teacher: str = typer.Option(..., "--teacher", "-t", help="Model spec: open_clip:ARCH/TAG, open_clip:ARCH/CKPT, open_clip:CFG.json/CKPT, local-dir:PATH, hf:REPO_OR_PATH."),
    views: int = typer.Option(2, help="Views per image: view 0 is the teacher's eval preprocessing, the rest random crops."),
    clusters: int = typer.Option(8, help="K clusters of patch tokens per view (0: no clusters)."),
    cluster_iters: int = typer.Option(10, help="Spherical k-means iterations."),
    cluster_pos_weight: float = typer.Option(0.0, help="Weight of patch position in clustering (0: features only)."),
    max_phrases: int = typer.Option(4, help="Noun phrases kept per caption (0: none)."),
    chunker: str = typer.Option("auto", help="Phrase chunker: auto (spaCy if installed, else TextBlob), spacy, textblob."),
    store: str = typer.Option("clusters", help="clusters, or tokens (also every patch token and text token feature)."),
    store_images: bool = typer.Option(True, "--store-images/--no-store-images", help="Keep each original image in the cache (distill reads images from it)."),
    dtype: str = typer.Option("fp16", help="Storage of float arrays: fp16, fp32 or int8 (per-row scales)."),
    crop_scale: str = typer.Option("0.9,1.0", help="RandomResizedCrop area range for views ≥ 1."),
    crop_ratio: str = typer.Option("0.75,1.3333", help="RandomResizedCrop aspect range for views ≥ 1."),
    flip_p: float = typer.Option(0.5, help="Horizontal-flip probability for views ≥ 1."),
    seed: int = typer.Option(0, help="Seed of the augmentations (views depend on seed and image bytes only)."),
    image_col: str = typer.Option("image", help="Tables: the image-path column."),
    caption_col: str = typer.Option("caption", help="Tables: the caption column."),
    image_root: Optional[str] = typer.Option(None, help="Karpathy JSON: folder the image paths are relative to."),
    split: str = typer.Option("test", help="Karpathy JSON: split to read (train, restval, val, test, all)."),
    rows_per_shard: int = typer.Option(1000, help="Tables / Karpathy JSON: samples per output shard."),
    max_pixels: int = typer.Option(89_478_485, help="Decompression-bomb limit; larger images are skipped."),
    batch_size: int = typer.Option(64, help="Images per teacher forward."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16."),
    workers: int = typer.Option(-1, help="DataLoader decoding workers (-1: min(8, cpus-1))."),
    log_skipped: Optional[Path] = typer.Option(None, help="Write every skipped sample (JSONL) here."),
    overwrite: bool = typer.Option(False, help="Delete what OUT holds and start over."),
    rank: Optional[int] = typer.Option(None, help="Job arrays without torchrun: this job's rank."),
    world_size: Optional[int] = typer.Option(None, help="Job arrays without torchrun: number of jobs."),
    quiet: bool = typer.Option(False, help="No progress bar."),
):
    """Run a frozen teacher over an image–text source and cache its features in WebDataset shards."""
    try:
        from hierdctl.sources import SourceOptions
        from hierdctl.stages.cache_teacher import CacheTeacherConfig, run

        cfg = CacheTeacherConfig(
            source=source, out=out, teacher=teacher,
            source_options=SourceOptions(image_col, caption_col, image_root, split, rows_per_shard),
            views=views, clusters=clusters, cluster_iters=cluster_iters, cluster_pos_weight=cluster_pos_weight,
            max_phrases=max_phrases, chunker=chunker, store=store, store_images=store_images, dtype=dtype,
            crop_scale=_pair(crop_scale, "--crop-scale"), crop_ratio=_pair(crop_ratio, "--crop-ratio"), flip_p=flip_p,
            seed=seed, max_pixels=max_pixels, batch_size=batch_size, device=device, precision=precision,
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
):
    """Show a teacher cache's manifest."""
    try:
        from .schema import MANIFEST_NAME

        p = cache / MANIFEST_NAME
        if not p.is_file():
            raise UserError(f"{cache} holds no {MANIFEST_NAME}: not a finished hierdctl cache", "CACHE")
        try:
            m = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{p} is not valid JSON ({e})", "CACHE") from None
    except UserError as e:
        _fail(e)
    if as_json:
        sys.stdout.write(json.dumps(m, indent=2, sort_keys=True) + "\n")
    else:
        _print_cache_summary(m, cache)


# ----------------------------------------------------------------------------------
# Later stages
# ----------------------------------------------------------------------------------


@app.command("distill", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def distill(ctx: typer.Context):
    """Train a small open_clip student offline from a teacher cache (arrives with issue 3)."""
    _fail(UserError("distill is not available in this version yet"))


@app.command("export", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def export(ctx: typer.Context):
    """Export a trained student as an open_clip local dir or ONNX (arrives with issue 4)."""
    _fail(UserError("export is not available in this version yet"))


@app.command("eval-retrieval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def eval_retrieval(ctx: typer.Context):
    """Image↔text recall@K with a FAISS index, CLIP_benchmark-compatible (arrives with issue 4)."""
    _fail(UserError("eval-retrieval is not available in this version yet"))


@app.command("version")
def version():
    """Print the version."""
    from . import __version__

    typer.echo(f"hierdctl {__version__}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
