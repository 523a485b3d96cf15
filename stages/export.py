"""`hierdctl export`: a distill checkpoint -> one folder for open_clip, transformers and ONNX.

Input: a run dir (its latest checkpoint, named by checkpoints/latest.json), a run's
checkpoints/ folder, or one checkpoints/step-NNNNNNN.safetensors with its sibling .json
(model_cfg, preprocess_cfg, teacher, recipe, step): the run directory's contract is
hierdctl/checkpoint.py.

Output DIR (written under a temporary name and renamed into place, so DIR is either the
previous export or the complete new one), laid out as LAION's open_clip repositories on the
Hugging Face hub are: open_clip's two files beside transformers' (`--format` takes several
formats, repeated or as a comma list):

    open_clip_config.json          open_clip  {"model_cfg": ..., "preprocess_cfg": ...} (open_clip's local-dir layout)
    open_clip_model.safetensors    open_clip  the student's state dict alone: `student.` prefix removed;
                                              projectors, κ scales and fusion layers dropped
    config.json, model.safetensors hf         transformers.CLIPModel (hierdctl/hf_export.py)
    processor_config.json,         hf         CLIPProcessor / CLIPImageProcessor
      preprocessor_config.json
    vocab.json, merges.txt,        hf, onnx   CLIPTokenizer: open_clip's ids, padded to the context
      tokenizer.json, tokenizer_config.json
    image_encoder.onnx             onnx       image (B,3,S,S) float32, normalised as preprocess_cfg says
                                              -> image_embeds (B,D) L2-normalised; dynamic B
    text_encoder.onnx              onnx       text (B,L) int64 open_clip tokens -> text_embeds (B,D) L2-normalised
    README.md                      always     model card, with Hugging Face front matter
    export.json                    always     what was exported from where, and every parity check

export.json's "layout" is 2: the transformers files at DIR's root. Exports of layout 1 (no
"layout" key) had them in DIR/hf; hierdctl's `hf:DIR` spec still reads those (specs.py).

The exported embedding is the student's own (width D_s = model_cfg.embed_dim): when the
student was narrower or wider than the teacher, the projector that mapped it into the
teacher's space during distillation is dropped, so exported embeddings are comparable
with the student's, not the teacher's.

Checks before DIR is published: the local dir is loaded back with
`open_clip.create_model_and_transforms('local-dir:…')` and its image and text embeddings
must equal the checkpoint's (max abs difference recorded, must be ≤ 1e-6); each ONNX
graph is run with onnxruntime at a batch size other than the traced one and compared with
PyTorch (max abs difference recorded, must be ≤ `atol`); the transformers files are loaded
back with transformers and compared with the student (hf_export.check_parity); the tokenizer
files give open_clip's ids (hf_export.check_tokenizer).
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import torch

from hierdctl import cache_format, checkpoint, hf_export
from hierdctl.atomic import check_dir_target, check_writable, publish_dir, sha256_file, write_errno
from hierdctl.checkpoint import StudentCheckpoint
from hierdctl.configs import ExportConfig
from hierdctl.console import console
from hierdctl.errors import UserError, require

MARKER = "export.json"
SCHEMA = "hierdctl.export/1"  # export.json's "schema": what marks DIR as an export hierdctl may replace
# export.json's "layout": where the files are. 1 (no key): transformers' files in DIR/hf; 2: at DIR's root.
LAYOUT = 2


class ExportMismatch(RuntimeError):
    """An exported model does not reproduce the checkpoint (a bug, not bad input)."""


# ----------------------------------------------------------------------------------
# The student, rebuilt from a checkpoint (hierdctl/checkpoint.py reads it)
# ----------------------------------------------------------------------------------


def reference_model(ck: StudentCheckpoint):
    """The student exactly as the checkpoint holds it (built from model_cfg, strict load)."""
    from hierdctl.specs import register_model_config
    import open_clip
    name = register_model_config(open_clip, ck.meta["model_cfg"], where="RUN_DIR",
                                 origin=f"the model_cfg of {ck.path.with_suffix('.json')}")
    logging.disable(logging.WARNING)  # open_clip's "no pretrained weights" note: the weights come next
    try:
        model = open_clip.create_model(name, device="cpu")
    finally:
        logging.disable(logging.NOTSET)
    try:
        model.load_state_dict(ck.student, strict=True)
    except RuntimeError as e:
        raise UserError(f"{ck.path}: the student weights do not fit its model_cfg ({str(e).splitlines()[0]})",
                        "RUN_DIR") from None
    return model.eval().requires_grad_(False).to(torch.float32)


# ----------------------------------------------------------------------------------
# Parity probes
# ----------------------------------------------------------------------------------


def _probe_inputs(model, tokenizer, batch: int, seed: int = 0):
    """Fixed random images (B,3,S,S) and real tokenised captions (B,L)."""
    size = model.visual.image_size
    s = size if isinstance(size, (tuple, list)) else (size, size)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, s[0], s[1], generator=g)
    words = ["a photo of a dog", "two red squares left of a blue circle", "a man riding a bicycle",
             "a bowl of fruit", "a small green triangle", "an empty street at night", "a black cat", "x"]
    tokens = tokenizer([words[i % len(words)] for i in range(batch)])
    return images, tokens


def _embed(model, images, tokens):
    with torch.inference_mode():
        return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


def _max_diff(a, b) -> float:
    import numpy as np

    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ----------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------


def canonical_safetensors(tensors: dict, metadata: dict) -> bytes:
    """safetensors bytes whose header is the same for the same tensors and metadata: safetensors
    writes its metadata map in hash order (a sha256 that changed from one export to the next);
    the header is re-serialised with sorted keys and padded to 8 bytes as the format asks (the
    data offsets are relative to the data: unchanged)."""
    from safetensors.torch import save

    raw = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + raw[8 + n :]


def write_open_clip(ck: StudentCheckpoint, d: Path) -> None:
    pp = dict(ck.meta.get("preprocess_cfg") or {})
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": ck.meta["model_cfg"], "preprocess_cfg": pp},
                                                        indent=2) + "\n")
    (d / "open_clip_model.safetensors").write_bytes(
        canonical_safetensors(ck.student, {"format": "pt", "source": ck.path.name}))


def write_onnx(model, d: Path, opset: int, atol: float, tokenizer) -> dict:
    """Export image and text encoders; check each with onnxruntime. Returns the checks."""
    import warnings

    import onnx
    import onnxruntime as ort
    class ImageEncoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, image):  # (B,3,S,S) -> (B,D)
            return self.m.encode_image(image, normalize=True)

    class TextEncoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, text):  # (B,L) int64 -> (B,D)
            return self.m.encode_text(text, normalize=True)

    trace_images, trace_tokens = _probe_inputs(model, tokenizer, 2, seed=1)
    check_images, check_tokens = _probe_inputs(model, tokenizer, 5, seed=2)  # another batch size: dynamic B
    graphs = {
        "image": (ImageEncoder(model).eval(), trace_images, check_images, "image", "image_embeds"),
        "text": (TextEncoder(model).eval(), trace_tokens, check_tokens, "text", "text_embeds"),
    }
    checks = {}
    for name, (module, trace, check, inp, outp) in graphs.items():
        path = d / f"{name}_encoder.onnx"
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # its fused kernel has no ONNX export
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
                # The TorchScript exporter: the dynamo one needs onnxscript, which the onnx extra does not pull.
                try:
                    torch.onnx.export(module, (trace,), str(path), input_names=[inp], output_names=[outp],
                                      dynamic_axes={inp: {0: "batch"}, outp: {0: "batch"}}, opset_version=opset,
                                      dynamo=False)
                except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
                    if isinstance(e, OSError) or write_errno(e) is not None:
                        raise  # a full or read-only file system: publish_dir says so
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                    raise UserError(f"torch.onnx.export cannot write the {name} encoder at opset {opset}: {first}",
                                    "--opset") from None
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        onnx.checker.check_model(str(path))
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run([outp], {inp: check.numpy()})[0]
        with torch.inference_mode():
            want = module(check).numpy()
        diff = _max_diff(got, want)
        # The batch axis is dynamic; the text graph's token axis is not: its attention mask and
        # positional embedding are traced at the context length, so inputs must have exactly L tokens.
        shape = ["batch"] + [int(d) for d in check.shape[1:]]
        checks[name] = {"file": path.name, "input": inp, "output": outp, "opset": opset,
                        "input_shape": shape, "input_dtype": str(check.dtype).removeprefix("torch."),
                        "check_batch": int(check.shape[0]), "max_abs_diff": diff, "atol": atol}
        if not diff <= atol:
            raise ExportMismatch(f"ONNX {name} encoder differs from PyTorch by {diff:.3g} (> {atol:g})")
    return checks


# ----------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


_ABSOLUTE = re.compile(r"(?<![\w.-])/(?:[^/\s`'\"|]+/)*([^/\s`'\"|]+)")


def public(text) -> str:
    """A spec or path as the model card shows it: absolute paths cut to their last component
    (the card is published; where the files lay on this machine is nobody's business), URLs
    and relative paths as they are. `local-dir:/data/x/model` -> `local-dir:model`."""
    text = str(text)
    if "://" in text:
        return text
    scheme, sep, rest = text.partition(":")
    if sep and scheme in ("local-dir", "hf", "open_clip", "file"):
        return scheme + ":" + _ABSOLUTE.sub(r"\1", rest)
    return _ABSOLUTE.sub(r"\1", text)


def hub_id(spec: str | None) -> str | None:
    """The Hugging Face hub repository of a teacher spec (the card's base_model), or None when
    the teacher is local: hf:ORG/REPO, open_clip:hf-hub:ORG/REPO[@rev], or an open_clip
    pretrained tag whose weights open_clip takes from the hub."""
    if not isinstance(spec, str) or ":" not in spec:
        return None
    repo = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
    scheme, rest = spec.split(":", 1)
    if scheme == "hf" and repo.fullmatch(rest) and not Path(rest).exists():
        return rest
    if scheme != "open_clip":
        return None
    if rest.startswith("hf-hub:"):
        rid = rest[len("hf-hub:"):].split("@", 1)[0]
        return rid if repo.fullmatch(rid) else None
    arch, _, tag = rest.partition("/")
    if not tag or Path(tag).suffix or "/" in tag:
        return None  # a checkpoint file or a config JSON: local
    try:
        import open_clip

        hub = (open_clip.get_pretrained_cfg(arch, tag) or {}).get("hf_hub") or ""
    except Exception:  # an unknown tag: nothing to link to
        return None
    rid = "/".join(hub.strip("/").split("/")[:2])
    return rid if repo.fullmatch(rid) else None


def _metrics_section(report: dict, out: Path) -> list[str]:
    models = report.get("models") or []
    if not models:
        return []
    names = []
    for m in models:
        for k in m.get("metrics", {}):
            if k not in names:
                names.append(k)
    src = report.get("source", {})
    lines = ["## Evaluation", "",
             f"From `{report.get('schema', '?')}` on `{public(src.get('spec', '?'))}` "
             f"({', '.join(f'{k} {v}' for k, v in report.get('counts', {}).items() if isinstance(v, int))}); "
             f"index: {report.get('index', {}).get('kind', 'n/a')}"
             + (" (exact)" if report.get("exact") else (" (approximate)" if "exact" in report else "")) + ".", "",
             "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    me = str(out.resolve())
    for m in models:
        spec = m.get("spec", "?")
        scheme, _, path = spec.partition(":")
        this = scheme in ("local-dir", "hf") and bool(path) and str(Path(path).resolve()) == me
        cells = []
        for k in names:
            v = m.get("metrics", {}).get(k)
            r = m.get("retention", {}).get(k)
            cells.append("" if v is None else _fmt(v) + (f" ({r:.1f}%)" if r is not None else ""))
        lines.append(f"| `{public(spec)}`{' **(this model)**' if this else ''} | " + " | ".join(cells) + " |")
    lines += ["", "Percentages: retention of the first (reference) model's score."]
    return lines


def front_matter(manifest: dict, license: str) -> str:
    """The Hugging Face model card's YAML metadata (what the hub indexes)."""
    import yaml

    formats = manifest["formats"]
    tags = ["clip", "hierdctl", "knowledge-distillation", "image-text-retrieval", "zero-shot-image-classification"]
    tags += [t for f, t in (("open_clip", "open_clip"), ("hf", "transformers"), ("hf", "sentence-transformers"),
                            ("onnx", "onnx")) if f in formats]
    meta = {"library_name": "open_clip" if "open_clip" in formats else "onnx",
            "pipeline_tag": "zero-shot-image-classification", "license": license, "tags": tags}
    base = hub_id((manifest.get("teacher") or {}).get("spec"))
    if base:
        meta["base_model"] = base
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def model_card(ck: StudentCheckpoint, manifest: dict, report: dict | None, out: Path, license: str = "other") -> str:
    meta, cfg = ck.meta, ck.meta["model_cfg"]
    teacher = meta.get("teacher") or {}
    vc, tc = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    d_s = cfg.get("embed_dim")
    projected = any(k.startswith(("img_proj", "txt_proj")) for k in ck.dropped)
    terms = ", ".join(f"{t['name']} × {t['weight']:g}" for t in meta.get("recipe_terms", []))
    train = manifest.get("training", {})
    data = manifest.get("data", {})
    formats = manifest["formats"]
    name = out.name
    ckpt = (f"{ck.run_dir.name}/{ck.path.relative_to(ck.run_dir)}" if ck.run_dir is not None
            and ck.path.is_relative_to(ck.run_dir) else ck.path.name)
    rows = [
        ("student", f"`{public(meta.get('student_spec', '?'))}`: ViT width {vc.get('width')}, {vc.get('layers')} "
                    f"layers, patch {vc.get('patch_size')}, image {vc.get('image_size')}; text width {tc.get('width')}, "
                    f"{tc.get('layers')} layers, context {tc.get('context_length', 77)}; "
                    f"{manifest['parameters']:,} parameters"),
        ("embedding", f"{d_s}-d, L2-normalised (the student's own joint space)"),
        ("teacher", f"`{public(teacher.get('spec', '?'))}` ({teacher.get('embed_dim', '?')}-d"
                    + (f", weights sha256 {teacher['fingerprint'][:12]}…" if teacher.get("fingerprint") else "") + ")"),
        ("recipe", f"`{meta.get('recipe', '?')}`" + (f": {terms}" if terms else "")),
        ("data", f"teacher cache `{public(meta.get('data', '?'))}`"
                 + (f": {data['samples']:,} samples from `{public(data.get('source', '?'))}`"
                    if data.get("samples") else "")),
        ("steps", f"{meta.get('step', '?'):,}" if isinstance(meta.get("step"), int) else str(meta.get("step", "?"))),
    ]
    if train:
        rows.append(("training", ", ".join(f"{k} {v}" for k, v in train.items())))
    rows.append(("checkpoint", f"`{ckpt}` (sha256 {manifest['checkpoint']['sha256'][:12]}…)"))
    rows.append(("hierdctl", str(meta.get("hierdctl", "?"))))
    lines = [front_matter(manifest, license), f"# {name}", "",
             "A CLIP-style image–text model distilled with hierdctl: a small open_clip student trained "
             "offline from a cached teacher. Files: "
             + "; ".join(w for f, w in (("open_clip", "open_clip (`open_clip_config.json`, "
                                                     "`open_clip_model.safetensors`)"),
                                        ("hf", "transformers `CLIPModel` (`config.json`, `model.safetensors`, "
                                               "tokenizer and processor files)"),
                                        ("onnx", "ONNX (`image_encoder.onnx`, `text_encoder.onnx`, tokenizer files)"))
                         if f in formats) + ".", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += [""]
    if projected:
        lines += [f"**Embedding space.** The student ({d_s}-d) was narrower or wider than the teacher "
                  f"({teacher.get('embed_dim', '?')}-d); during distillation a learned projector mapped it into the "
                  "teacher's space. The projector is *not* exported: this model's embeddings are the student's own, "
                  "comparable with each other (image↔text retrieval, zero-shot), not with the teacher's.", ""]
    lines += ["Dropped from the training checkpoint: " + (", ".join(f"`{k}`" for k in ck.dropped) or "nothing")
              + " (projectors, relational scales κ, fusion layers: training-only).", ""]
    if report:
        lines += _metrics_section(report, out) + [""]
    lines += ["## Use", "", f"From this folder (`{name}`; on the Hugging Face hub, its repository id).", ""]
    if "open_clip" in formats:
        lines += ["open_clip:", "", "```python", "import open_clip",
                  f"model, _, preprocess = open_clip.create_model_and_transforms('local-dir:{name}')",
                  f"tokenizer = open_clip.get_tokenizer('local-dir:{name}')", "```", "",
                  "CLIP_benchmark loads it through open_clip: `--model local-dir:PATH --pretrained none`, and "
                  "`--no_amp` to reproduce hierdctl's numbers exactly (its default bf16 autocast moves recall@1). "
                  f"hierdctl: `hierdctl eval-retrieval DATA --model local-dir:{name}`.", ""]
    if "hf" in formats:
        lines += ["transformers (the zero-shot pipeline, or the model itself):", "", "```python",
                  "from transformers import CLIPModel, CLIPProcessor, pipeline",
                  f"classifier = pipeline('zero-shot-image-classification', model='{name}')",
                  f"model, processor = CLIPModel.from_pretrained('{name}'), CLIPProcessor.from_pretrained('{name}')",
                  "out = model(**processor(text=captions, images=images, padding=True, truncation=True, "
                  "return_tensors='pt'))",
                  "out.image_embeds, out.text_embeds   # L2-normalised, equal to open_clip's", "```", "",
                  "sentence-transformers (6.x):", "", "```python", "from sentence_transformers import SentenceTransformer",
                  f"st = SentenceTransformer('{name}')",
                  "st.encode(images_or_captions, normalize_embeddings=True)  # it returns unnormalised embeddings "
                  "otherwise", "```", "",
                  "transformers 5 resizes with torchvision by default, which rounds pixels differently from open_clip's "
                  "PIL resize (≤ 2 of 255 grey levels); pass `backend='pil'` to `CLIPProcessor.from_pretrained` (or "
                  "`processor_kwargs={'backend': 'pil'}` to SentenceTransformer) for open_clip's pixels exactly.", ""]
    if "onnx" in formats:
        o = manifest["checks"]["onnx"]
        pp = manifest.get("preprocess_cfg", {})
        L = o["text"]["input_shape"][1]
        lines += ["ONNX (onnxruntime): `image_encoder.onnx` takes `image` (B,3,S,S) float32 — resized, centre-cropped "
                  f"to {vc.get('image_size')} and normalised with mean {pp.get('mean')} / std {pp.get('std')} — and "
                  f"returns `image_embeds` (B,D); `text_encoder.onnx` takes `text` (B,{L}) int64 "
                  f"open_clip tokens — exactly {L} tokens, the exported context length — and returns `text_embeds` "
                  f"(B,D). Both L2-normalised, dynamic batch, opset {o['image']['opset']}. The tokenizer files beside "
                  "them give those tokens:", "", "```python", "import onnxruntime as ort",
                  "from transformers import AutoTokenizer",
                  f"tok = AutoTokenizer.from_pretrained('{name}')",
                  "ids = tok(captions, padding='max_length', truncation=True, return_tensors='np')['input_ids']",
                  f"text_embeds = ort.InferenceSession('{name}/text_encoder.onnx').run(None, {{'text': ids}})[0]",
                  "```", ""]
    lines += ["## Checks at export", ""]
    oc = manifest["checks"]["open_clip"]
    lines += [f"- open_clip `local-dir:` reload vs the checkpoint: max abs difference {oc['image_max_abs_diff']:.2e} "
              f"(image), {oc['text_max_abs_diff']:.2e} (text)"]
    if "onnx" in manifest["checks"]:
        for g, c in manifest["checks"]["onnx"].items():
            lines.append(f"- ONNX {g} encoder vs PyTorch (onnxruntime, batch {c['check_batch']}): "
                         f"max abs difference {c['max_abs_diff']:.2e}")
    if "hf" in manifest["checks"]:
        h = manifest["checks"]["hf"]
        lines.append(f"- transformers {h['transformers']} CLIPModel vs open_clip: max abs difference "
                     f"{h['image']['max_abs_diff']:.2e} (image), {h['text']['max_abs_diff']:.2e} (text; token ids "
                     f"equal on {h['text']['captions']} captions); "
                     f"{h['image_processor']['class']} vs open_clip preprocessing: at most "
                     f"{h['image_processor']['max_levels']:.1f} of 255 grey levels")
    if "tokenizer" in manifest["checks"]:
        t = manifest["checks"]["tokenizer"]
        lines.append(f"- tokenizer files ({t['class']}, context {t['context_length']}) vs open_clip's tokenizer: "
                     f"ids equal on {t['captions']} captions")
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------


def cache_dir(ck: StudentCheckpoint) -> Path | None:
    """The teacher cache the checkpoint was trained from (meta["data"]), or None when unknown.

    A relative path is taken relative to the run dir, never to the current directory (which
    has nothing to do with the run); without a run dir a relative path cannot be placed."""
    raw = ck.meta.get("data")
    if not isinstance(raw, str) or not raw.strip():
        return None
    p = Path(raw)
    if p.is_absolute():
        return p
    return ck.run_dir / p if ck.run_dir is not None else None


def _training_and_data(ck: StudentCheckpoint) -> tuple[dict, dict]:
    """For the model card: the run's training settings (its resolved config) and its data (the
    cache's manifest), each when it can still be read; missing or unreadable ones are left out."""
    train, data = {}, {}
    r = checkpoint.read_config(ck.run_dir) if ck.run_dir else None
    if r:
        train = {k: r[k] for k in ("batch_size", "lr", "warmup", "weight_decay", "epochs", "steps", "precision", "seed")
                 if r.get(k) is not None}
    cache = cache_dir(ck)
    if cache is not None:
        try:
            m = cache_format.read_manifest(cache)
            data = {"samples": m.get("samples"), "captions": m.get("captions"),
                    "source": (m.get("source") or {}).get("spec")}
        except (UserError, AttributeError):
            data = {}
    return train, data


def run(cfg: ExportConfig) -> dict:
    """Export; return the manifest written as DIR/export.json."""
    from hierdctl import __version__
    import open_clip

    cfg.validate()
    report = None
    if cfg.report is not None:
        try:
            report = json.loads(Path(cfg.report).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{cfg.report} is not a JSON report ({e})", "--report") from None
        require(isinstance(report, dict) and isinstance(report.get("models"), list),
                f"{cfg.report} is not an eval-retrieval / eval-zeroshot report (no 'models' list)", "--report")
    out = Path(cfg.out)
    check_dir_target(out, MARKER, SCHEMA, "--out", cfg.overwrite, "an export")  # before any work
    check_writable(out, "--out")  # DIR is filled beside itself, then renamed into place

    t0 = time.time()
    ck = checkpoint.load_student(cfg.source)
    if "hf" in cfg.formats:  # before any work: the student must map onto transformers' CLIPModel
        reason = hf_export.check_convertible(ck.meta["model_cfg"], ck.meta.get("preprocess_cfg") or {})
        require(reason is None, f"the student does not map onto transformers' CLIPModel: {reason}", "--format")
    ref = reference_model(ck)
    train, data = _training_and_data(ck)

    def write(tmp: Path) -> None:
        write_open_clip(ck, tmp)
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp}", device="cpu")
        model.eval()
        tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp}")
        images, tokens = _probe_inputs(ref, tokenizer, 4)
        (ri, rt), (li, lt) = _embed(ref, images, tokens), _embed(model, images, tokens)
        checks = {"open_clip": {"image_max_abs_diff": _max_diff(ri, li), "text_max_abs_diff": _max_diff(rt, lt)}}
        if max(checks["open_clip"].values()) > 1e-6:
            raise ExportMismatch(f"the open_clip local dir does not reproduce the checkpoint: {checks['open_clip']}")
        if "onnx" in cfg.formats:
            checks["onnx"] = write_onnx(model, tmp, cfg.opset, cfg.atol, tokenizer)
        if "hf" in cfg.formats:  # transformers' files beside open_clip's, loaded back and compared with the student
            files = hf_export.write_hf(model, ck.meta["model_cfg"], dict(model.visual.preprocess_cfg), tmp)
            try:
                checks["hf"] = hf_export.check_parity(model, tmp, tokenizer, preprocess) | {"folder": ".",
                                                                                            "files": files}
            except hf_export.ParityError as e:
                raise ExportMismatch(f"the transformers CLIPModel files do not reproduce the student: {e}") from None
        elif "onnx" in cfg.formats:  # the tokenizer files the text graph needs (hf wrote them already)
            hf_export.write_tokenizer_files(tmp, int(model.context_length))
        if "onnx" in cfg.formats or "hf" in cfg.formats:
            try:
                checks["tokenizer"] = hf_export.check_tokenizer(tmp, tokenizer)
            except hf_export.ParityError as e:
                raise ExportMismatch(str(e)) from None
        if "open_clip" not in cfg.formats:  # onnx only: the open_clip files were scaffolding
            for n in ("open_clip_config.json", "open_clip_model.safetensors"):
                (tmp / n).unlink()
        manifest = {
            "schema": SCHEMA,
            "layout": LAYOUT,
            "formats": list(cfg.formats),
            "checkpoint": {"path": str(ck.path.resolve()), "sha256": ck.sha256, "step": ck.meta.get("step")},
            "model_cfg": ck.meta["model_cfg"],
            "preprocess_cfg": dict(model.visual.preprocess_cfg),
            "embed_dim": int(ri.shape[1]),
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "dropped_keys": ck.dropped,
            "projector_dropped": any(k.startswith(("img_proj", "txt_proj")) for k in ck.dropped),
            "teacher": ck.meta.get("teacher"),
            "recipe": ck.meta.get("recipe"),
            "recipe_terms": ck.meta.get("recipe_terms"),
            "data": {"cache": ck.meta.get("data")} | data,
            "training": train,
            "checks": checks,
            "report": str(cfg.report) if cfg.report else None,
            "license": cfg.license,
            "hierdctl": __version__,
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
        }
        manifest["files"] = sorted([p.name for p in tmp.iterdir()] + ["README.md", MARKER])
        # The digest of every file written so far (not README.md and export.json, written next): a
        # loader of this folder checks those it reads (hierdctl.specs), so a zeroed or cut file is found.
        manifest["sha256"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / "README.md").write_text(model_card(ck, manifest, report, out, cfg.license))
        (tmp / MARKER).write_text(json.dumps(manifest, indent=2, default=str) + "\n")  # last: the done-marker
        summary.update(manifest)

    summary: dict = {}
    publish_dir(out, write, marker=MARKER, schema=SCHEMA, where="--out", overwrite=cfg.overwrite, what="an export")
    summary["out"] = str(out)
    summary["seconds"] = round(time.time() - t0, 2)
    if not cfg.quiet and summary["projector_dropped"]:
        console.print(f"[dim]export:[/] the student ({summary['embed_dim']}-d) had a projector to the teacher's "
                      "width; it is dropped, the exported embedding is the student's own")
    return summary
