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
