"""`hierdctl eval-zeroshot`: zero-shot classification, CLIP_benchmark's metric names.

Data: a class-per-folder tree (ROOT/<class>/<image>, classes in sorted folder order as
torchvision's ImageFolder numbers them, e.g. ImageNet's val/n01440764/...) or WebDataset
shards whose samples carry a class index in a `.cls` member or in their `.json` under
--class-field (a class *name* equal to one of the class names also works).

Classifier: for each class c, every prompt template t(c) is embedded and L2-normalised;
their mean, normalised again, is the class weight (CLIP's prompt ensembling). Class names
and templates default to open_clip's bundled ImageNet ones (IMAGENET_CLASSNAMES,
OPENAI_IMAGENET_TEMPLATES); --classnames folders|FILE and --templates simple|FILE
replace them. Metrics: acc1, acc5 (with ≥ 5 classes), mean_per_class_recall.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from hierdctl import distributed
from hierdctl.configs import EvalZeroshotConfig
from hierdctl.embedding import check_joint_space, encode_images, encode_texts
from hierdctl.reports import finish_report, retention, versions
from hierdctl.errors import UserError, require
from hierdctl.retrieval import classification_metrics
from hierdctl.reports import ZEROSHOT_SCHEMA as REPORT_SCHEMA
from hierdctl.sources import FolderTree, LabelledShards, TarSource, open_source, url_scheme
from hierdctl.specs import load_encoder


# ----------------------------------------------------------------------------------
# Class names, templates and labelled data
# ----------------------------------------------------------------------------------


def _read_list(path: str, where: str) -> list[str]:
    p = Path(path)
    require(p.is_file(), f"{path} is not a file (nor one of the built-in names)", where)
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e})", where) from None
        require(isinstance(items, list) and all(isinstance(x, str) for x in items), f"{path} is not a JSON list of strings", where)
    else:
        items = [ln.strip() for ln in text.splitlines() if ln.strip()]
    require(bool(items), f"{path} is empty", where)
    return items


def load_templates(spec: str) -> tuple[list, str]:
    """Callables class name -> prompt, and a description."""
    import open_clip

    zsm = open_clip.zero_shot_metadata
    if spec == "openai":
        return list(zsm.OPENAI_IMAGENET_TEMPLATES), "open_clip OPENAI_IMAGENET_TEMPLATES"
    if spec == "simple":
        return list(zsm.SIMPLE_IMAGENET_TEMPLATES), "open_clip SIMPLE_IMAGENET_TEMPLATES"
    items = _read_list(spec, "--templates")
    bad = [t for t in items if "{c}" not in t and "{}" not in t]
    if bad:
        raise UserError(f"template {bad[0]!r} has no {{c}} placeholder for the class name", "--templates")
    return [lambda c, t=t: t.replace("{c}", c).replace("{}", c) for t in items], spec


def open_labelled(cfg: EvalZeroshotConfig) -> tuple[object, list[str], str]:
    """(source, class names, where the names come from)."""
    import open_clip

    p = Path(cfg.source)
    if not ("{" in cfg.source and "}" in cfg.source) and url_scheme(cfg.source) is None:  # open_source checks these
        require(p.exists(), f"{cfg.source} does not exist", "SOURCE")
    folders = p.is_dir() and not any(p.glob("*.tar")) and any(d.is_dir() for d in p.iterdir())
    if cfg.classnames == "imagenet":
        names, origin = list(open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES), "open_clip IMAGENET_CLASSNAMES"
    elif cfg.classnames == "folders":
        require(folders, "--classnames folders needs a class-per-folder SOURCE", "--classnames")
        names, origin = None, "folder names"
    else:
        names, origin = _read_list(cfg.classnames, "--classnames"), cfg.classnames
    if folders:
        tree = FolderTree(p)
        require(bool(tree.files), f"{p} holds no images in class folders", "SOURCE")
        if names is None:
            names = [c.replace("_", " ") for c in tree.classes]
        require(len(names) == len(tree.classes),
                f"{p} has {len(tree.classes)} class folders but {origin} gives {len(names)} class names; "
                "use --classnames folders or a file with one name per folder (sorted folder order)", "--classnames")
        return tree, names, origin
    src = open_source(cfg.source, None)
    require(isinstance(src, TarSource), "zero-shot data must be a class-per-folder directory or WebDataset shards", "SOURCE")
    return LabelledShards(src.spec, src.paths, cfg.class_field, names), names, origin


# ----------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------


def classifier(encoder, names: list[str], templates: list, batch_size: int) -> np.ndarray:
    """(C,D) class weights: the normalised mean of each class's normalised prompt embeddings."""
    prompts = [t(c) for c in names for t in templates]
    emb = encode_texts(encoder, prompts, batch_size).reshape(len(names), len(templates), -1)  # (C,T,D)
    w = emb.mean(axis=1)
    return w / np.linalg.norm(w, axis=1, keepdims=True).clip(min=1e-12)


def run(cfg: EvalZeroshotConfig) -> dict:
    cfg.validate()
    started = time.time()
    templates, tpl_origin = load_templates(cfg.templates)
    source, names, origin = open_labelled(cfg)
    device = distributed.resolve_device(cfg.device, distributed.resolve())
    runs, ref_keys, skipped = [], None, Counter()
    for i, spec in enumerate(cfg.models):
        encoder = load_encoder(spec, device, "--model")
        t0 = time.perf_counter()
        w = classifier(encoder, names, templates, cfg.batch_size)  # (C,D)
        t_cls = time.perf_counter() - t0
        kept, img, skipped, t_img = encode_images(
            encoder, source, batch_size=cfg.batch_size, workers=cfg.workers, max_pixels=cfg.max_pixels,
            label=f"[{i}] {spec}", quiet=cfg.quiet, keep=lambda s: (s.key, s.meta["label"]),
            what="labelled image", where_source=cfg.source)
        keys, labels = [k for k, _ in kept], [lb for _, lb in kept]
        check_joint_space(spec, img.shape[1], w.shape[1])
        if ref_keys is None:
            ref_keys = keys
        assert keys == ref_keys, "same data for every model"
        metrics = classification_metrics(img @ w.T, np.asarray(labels), len(names))
        runs.append({"spec": spec, "model": encoder.describe(), "embed_dim": int(img.shape[1]), "metrics": metrics,
                     "timing": {"classifier_s": round(t_cls, 3), "encode_images_s": round(t_img, 3),
                                "images_per_s": round(len(keys) / max(t_img, 1e-9), 1)},
                     "labels": labels})
        del encoder
    for r in runs:
        r["retention"] = retention(r["metrics"], runs[0]["metrics"]) if r is not runs[0] else {}
    present = sorted(set(runs[0]["labels"]))
    report = {
        "schema": REPORT_SCHEMA,
        "task": "zeroshot",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": source.describe() | {"class_field": cfg.class_field},
        "counts": {"images": len(ref_keys), "classes": len(names), "classes_present": len(present),
                   "templates": len(templates), "skipped": dict(sorted(skipped.items())),
                   "skipped_total": int(sum(skipped.values()))},
        "classnames": origin,
        "templates": tpl_origin,
        "reference": cfg.models[0],
        "device": device,
        "models": [{k: r[k] for k in ("spec", "model", "embed_dim", "metrics", "retention", "timing")} for r in runs],
        "seconds": round(time.time() - started, 3),
        "versions": versions(),
    }
    if len(names) < 5:
        report["notes"] = ["acc5 is not reported: fewer than 5 classes"]
    return finish_report(report, cfg.out, cfg.quiet, "eval-zeroshot")
