"""What each command prints when its stage returns: the tables and lines of the CLI.

Rendering only: every value comes from the stage's returned summary or report. Output goes
to stderr through hierdctl.console (stdout stays clean for --json).
"""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from .console import console


def cache_summary(m: dict, out: Path) -> None:
    t = Table(title=f"teacher cache {out}", show_header=False)
    r = m.get("this_run", {})
    t.add_row("teacher", f"{m['teacher']['spec']}  (D={m['teacher']['embed_dim']}, s_T={m['teacher']['logit_scale']:.2f})")
    t.add_row("complete", f"{m['complete']}  ({m['shards_done']}/{m['shards_total']} shards)")
    t.add_row("samples", f"{m['samples']:,}  captions {m['captions']:,}  phrases {m['phrases']:,}")
    t.add_row("skipped", f"{m['skipped_total']:,}  " + ", ".join(f"{k}: {v}" for k, v in m["skipped"].items()))
    if m.get("caption_truncated"):
        from .sources import MAX_CAPTION_CHARS

        t.add_row("captions cut", f"{m['caption_truncated']:,} to at most {MAX_CAPTION_CHARS:,} characters "
                  "(caption_truncated)")
    if m["converted"]:
        t.add_row("converted to RGB", ", ".join(f"{k}: {v}" for k, v in m["converted"].items()))
    bps = m["bytes_per_sample"]
    t.add_row("size", f"{m['bytes'] / 1e6:,.1f} MB" + (f"  ({bps / 1e3:,.1f} KB/sample)" if bps else ""))
    if r:
        rate = r["samples"] / r["seconds"] if r["seconds"] else 0.0
        t.add_row("this run", f"{r['samples']:,} samples in {r['seconds']:.1f} s ({rate:,.1f}/s), "
                  f"{r['shards']} shards written, {r['shards_resumed']} kept from before")
    console.print(t)


def distill_summary(summary: dict) -> None:
    t = Table(title=f"distill {summary['out']}", show_header=False)
    t.add_row("recipe", summary["recipe"])
    t.add_row("steps", f"{summary['steps']:,} (resumed from {summary['resumed_from']:,})" if summary["resumed_from"] else f"{summary['steps']:,}")
    t.add_row("warm-up", f"{summary['warmup_steps']:,} steps")
    t.add_row("throughput", f"{summary['samples_per_s']:,.1f} samples/s over {summary['seconds']:.1f} s")
    t.add_row("final loss", "  ".join(f"{k} {v:.4g}" for k, v in summary["final"].items()))
    if summary["skipped_samples"]:
        t.add_row("skipped samples", f"{summary['skipped_samples']:,} damaged cached samples replaced: "
                  + escape("; ".join(summary["skipped_examples"][:3])))
    t.add_row("checkpoint", summary["checkpoint"])
    console.print(t)


def export_summary(summary: dict) -> None:
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
    tok = summary["checks"].get("tokenizer")
    if tok:
        t.add_row("tokenizer files", f"{tok['class']}: open_clip's ids on {tok['captions']} captions "
                  f"(context {tok['context_length']})")
    console.print(t)


def eval_table(report: dict) -> None:
    """One row per metric, one column per model; later models show their retention of the first's."""
    models = report["models"]
    names = []
    for m in models:
        names += [k for k in m["metrics"] if k not in names]
    idx = report.get("index")
    title = f"{report['task']} on {report['source'].get('spec')}"
    if idx:
        title += f"  (index {idx['kind']}: {'exact' if idx['exact'] else 'APPROXIMATE'}, faiss on {idx['device']})"
    t = Table(title=escape(title))
    t.add_column("metric", no_wrap=True, min_width=max(len(k) for k in names))  # names are never cut
    for i, m in enumerate(models):
        t.add_column(escape(("ref: " if i == 0 and len(models) > 1 else "") + m["spec"]), justify="right", overflow="fold")
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


def scenes_summary(summary: dict, flavour: str, out) -> None:
    counts = summary.get("counts", {})
    console.print(f"scenes ({flavour}) → {out}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    if summary.get("cluttered", {}).get("objects"):
        console.print(f"cluttered objects: {escape(str(summary['cluttered']['objects']))}", soft_wrap=True)
    if summary.get("clip_benchmark", {}).get("command"):
        console.print(f"CLIP_benchmark: {escape(summary['clip_benchmark']['command'])}", soft_wrap=True)


# ----------------------------------------------------------------------------------
# embed / index / search (issue 20)
# ----------------------------------------------------------------------------------


def embed_summary(m: dict) -> None:
    c, r = m["counts"], m.get("this_run", {})
    t = Table(title=escape(f"embeddings {r.get('out', '')}"), show_header=False)
    t.add_row("model", escape(f"{m['model']['spec']}  ({m['model']['embed_dim']}-d, {m['model']['precision']})"))
    t.add_row("complete", f"{m['complete']}  ({m['shards_done']}/{m['shards_total']} shards)")
    t.add_row("rows", f"{c['rows']:,} samples, {c['texts']:,} captions  ({m['modality']}, {m['dtype']})")
    t.add_row("caption-less", f"{c['captionless_total']:,}  "
              + ", ".join(f"{k}: {v}" for k, v in c["captionless"].items()))
    t.add_row("skipped", f"{c['skipped_total']:,}  " + ", ".join(f"{k}: {v}" for k, v in c["skipped"].items()))
    t.add_row("duplicates", f"keys {c['duplicate_keys']:,}, images {c['duplicate_images']:,} (kept, counted)")
    if r:
        t.add_row("this run", f"{r['rows']:,} samples in {r['embed_seconds']:.1f} s ({r['rows_per_s']:,.1f}/s), "
                  f"{r['shards']} shards written, {r['shards_resumed']} kept from before")
    console.print(t)


def index_summary(m: dict) -> None:
    t = Table(title=escape(f"index {m.get('out', '')}"), show_header=False)
    p = ", ".join(f"{k}={v}" for k, v in m["params"].items())
    t.add_row("index", escape(f"{m['kind']} ({'exact' if m['exact'] else 'approximate'}{'; ' + p if p else ''})"))
    t.add_row("rows", f"{m['rows']:,} {m['over']} vectors of {m['dim']} dims  ({escape(m['model']['spec'])})")
    rc = m["recall"]
    if rc["measured"]:
        t.add_row(f"recall@{rc['k']} vs exact", f"{rc['value']:.4f}  ({rc['queries']:,} held-out queries)")
    else:
        t.add_row(f"recall@{rc['k']} vs exact", f"{rc['value'] if rc['value'] is not None else '–'}  ({rc['why']})")
    tm = m["timing"]
    t.add_row("build", f"{tm['build_s']:.2f} s (train {tm['train_s']:.2f} s, add {tm['add_s']:.2f} s)")
    console.print(t)


def search_table(result: dict) -> None:
    idx = result["index"]
    for q in result["queries"]:
        what = f"text {q['text']!r}" if "text" in q else f"image {q['image']}"
        t = Table(title=escape(f"{what}  (top {result['k']} of {idx['rows']:,} {idx['over']} rows, {idx['kind']})"))
        t.add_column("#", justify="right")
        t.add_column("score", justify="right")
        t.add_column("key", overflow="fold")
        t.add_column("path", overflow="fold")
        t.add_column("caption" if idx["over"] == "text" else "captions", overflow="fold")
        for r in q["results"]:
            caps = r["caption"] if "caption" in r else " | ".join(r["captions"])
            t.add_row(str(r["rank"]), f"{r['score']:.4f}", escape(str(r["key"])), escape(str(r["path"])), escape(caps))
        console.print(t)
