"""eval-retrieval's visual report (`--html REPORT.html`): one self-contained HTML file.

What a student retrieves, beside its teacher: for a seeded sample of caption queries, the
caption, its own image, and each model's top-k images in the order its index ranked them
(the first model is the reference, the others follow), a hit — the caption's own image —
marked; the metrics table with every later model's retention of the reference's score; and
the loss curves of every model that is an export of a distill run whose loss_curves.png is
still there. Everything is inline (thumbnails as base64 JPEG data URIs, downscaled to
THUMB px; curves as PNG): the file can be mailed or attached to a CI run alone. No script.

The page is plain HTML for people; its structure is what tests read: `table#metrics`, one
`section.query` per query with one `div.model-row[data-model]` per model, each result a
`figure.result.hit` or `figure.result.miss` holding one `img`.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

THUMB = 96  # px, the longer side of a thumbnail
QUERY_SEED = 0  # the sample of queries is drawn with this seed: the same data gives the same page



# What marks a page as hierdctl's (hierdctl.reports.written_by_hierdctl: --html replaces one without --overwrite).
GENERATOR = '<meta name="generator" content="hierdctl eval-retrieval">'

def thumbnail(data: bytes, max_pixels: int) -> str | None:
    """A data URI of a downscaled JPEG of image bytes; None when they do not decode."""
    from hierdctl.images import BadImage, decode_rgb

    try:
        img, _ = decode_rgb(data, max_pixels)
    except BadImage:
        return None
    img.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def loss_curves(spec: str) -> tuple[str, str] | None:
    """(run dir, PNG data URI) when `spec` is local-dir:DIR of an export whose export.json names a
    checkpoint of a distill run that still has its loss_curves.png; else None."""
    from hierdctl import checkpoint

    if not spec.startswith("local-dir:"):
        return None
    try:
        m = json.loads((Path(spec.split(":", 1)[1]) / "export.json").read_text(encoding="utf-8"))
        ck = Path(m["checkpoint"]["path"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return None
    run = ck.parent.parent  # RUN_DIR/checkpoints/step-NNNNNNN.safetensors
    png = run / checkpoint.CURVES
    if checkpoint.read_config(run) is None or not png.is_file():
        return None
    return str(run), "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table#metrics { border-collapse: collapse; margin: 1em 0; }
#metrics th, #metrics td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
#metrics th:first-child, #metrics td:first-child { text-align: left; }
.ret { color: #666; font-size: 12px; }
section.query { border-top: 1px solid #ddd; padding: .6em 0; }
.caption { font-weight: 600; }
.model-row { display: flex; align-items: flex-start; gap: 4px; margin: 3px 0; }
.model-name { width: 16em; flex: none; font-size: 12px; overflow-wrap: anywhere; }
figure { margin: 0; text-align: center; font-size: 11px; }
figure img { display: block; width: 96px; height: 96px; object-fit: contain; background: #eee; }
figure.hit img { outline: 4px solid #1a7f37; outline-offset: -4px; }
figure.miss img { opacity: .85; }
.mark { font-weight: 700; }
.hit .mark { color: #1a7f37; }
.miss .mark { color: #999; }
.truth { display: flex; gap: 8px; align-items: center; font-size: 12px; margin: 4px 0; }
.truth img { width: 96px; height: 96px; object-fit: contain; background: #eee; }
.curves img { max-width: 640px; border: 1px solid #ddd; }
.meta { color: #555; font-size: 12px; }
"""


def _img(uri: str | None, alt: str) -> str:
    if uri is None:
        return f'<img alt="{html.escape(alt)} (not decodable)" src="data:,">'
    return f'<img alt="{html.escape(alt)}" src="{uri}">'


def render(report: dict, queries: list[dict], thumbs: dict[int, str | None], curves: dict[str, tuple[str, str]],
           keys: list[str]) -> str:
    """The page. queries: [{"caption", "image" (its own image id), "results": [per model: [(image id,
    score), …] best first]}]; thumbs: image id -> data URI; curves: spec -> (run dir, PNG data URI);
    keys: each image id's sample key."""
    e = html.escape
    models = report["models"]
    names = []
    for m in models:
        names += [k for k in m["metrics"] if k not in names]
    out = ["<!doctype html>", f'<html lang="en"><head><meta charset="utf-8">{GENERATOR}',
           f"<title>hierdctl eval-retrieval: {e(str(report['source'].get('spec')))}</title>",
           f"<style>{_CSS}</style></head><body>",
           f"<h1>eval-retrieval: {e(str(report['source'].get('spec')))}</h1>"]
    c, idx = report["counts"], report["index"]
    out.append(f'<p class="meta">{c["images"]:,} images, {c["captions"]:,} captions; index {e(idx["kind"])} '
               f'({"exact" if idx["exact"] else "approximate"}); {e(report["created"])}; hierdctl '
               f'{e(report["versions"]["hierdctl"])}. The first model is the reference; the others show their '
               "retention of its score in %.</p>")
    out.append('<h2>Metrics</h2><table id="metrics"><thead><tr><th>metric</th>')
    for i, m in enumerate(models):
        ref = "reference: " if i == 0 and len(models) > 1 else ""
        out.append(f'<th class="model" data-model="{e(m["spec"])}">{ref}{e(m["spec"])}</th>')
    out.append("</tr></thead><tbody>")
    for k in names:
        out.append(f"<tr><td>{e(k)}</td>")
        for i, m in enumerate(models):
            v, r = m["metrics"].get(k), m["retention"].get(k)
            cell = "" if v is None else f"{v:.4f}"
            if i and r is not None:
                cell += f' <span class="ret">({r:.1f}%)</span>'
            out.append(f"<td>{cell}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    if curves:
        out.append("<h2>Loss curves</h2>")
        for spec, (run, uri) in curves.items():
            out.append(f'<figure class="curves" data-model="{e(spec)}"><img alt="loss curves of {e(run)}" src="{uri}">'
                       f"<figcaption>{e(spec)} — distill run {e(run)}</figcaption></figure>")
    k = max((len(r) for q in queries for r in q["results"]), default=0)
    out.append(f"<h2>Queries</h2><p class=\"meta\">{len(queries)} captions drawn at random (seed {QUERY_SEED}) of "
               f"{c['captions']:,}; each model's top {k} images as its index ranked them, with the cosine score; "
               "a green frame and ✓ mark the caption's own image.</p>")
    for qi, q in enumerate(queries):
        own = q["image"]
        out.append(f'<section class="query" data-query="{qi}"><div class="caption">“{e(q["caption"])}”</div>')
        out.append(f'<div class="truth">its image ({e(keys[own])}): {_img(thumbs.get(own), keys[own])}</div>')
        for i, (m, ranked) in enumerate(zip(models, q["results"])):
            out.append(f'<div class="model-row" data-model="{e(m["spec"])}"><span class="model-name">'
                       f'{"reference: " if i == 0 and len(models) > 1 else ""}{e(m["spec"])}</span>')
            for rank, (img, score) in enumerate(ranked, 1):
                hit = img == own
                out.append(f'<figure class="result {"hit" if hit else "miss"}" data-rank="{rank}">'
                           f"{_img(thumbs.get(img), keys[img])}<figcaption><span class=\"mark\">"
                           f"{'✓' if hit else '✗'}</span> {rank} · {score:.3f}</figcaption></figure>")
            out.append("</div>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
