"""`hierdctl search INDEX --text "…" | --image PATH`: the top-k rows of a collection for each query.

The queries are embedded with the model the collection was embedded with (--model names it
again or another spec of the same weights: a different embedding width or weight fingerprint
is refused, hierdctl/index_format.py) and searched in the index; each result carries its
score (the cosine similarity, or the index's approximation of it), its global row, and the
row's key, path and captions (an image row) or caption (a caption row).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from hierdctl import distributed
from hierdctl.configs import SearchConfig
from hierdctl.embedding import encode_texts
from hierdctl.errors import UserError
from hierdctl.images import BadImage, decode_rgb
from hierdctl.index_format import OpenIndex

SCHEMA = "hierdctl.search/1"


def _image_queries(encoder, paths, max_pixels: int) -> np.ndarray:
    x = []
    for p in paths:
        try:
            img, _ = decode_rgb(p.read_bytes(), max_pixels)
        except BadImage as e:
            raise UserError(f"{p} is not a usable image ({e.reason})", "--image") from None
        except OSError as e:
            raise UserError(f"cannot read {p} ({e.strerror})", "--image") from None
        x.append(encoder.eval_transform(img))
    with torch.inference_mode():
        return encoder.encode_image(torch.stack(x).to(encoder.device))[0].float().cpu().numpy()


def run(cfg: SearchConfig) -> dict:
    """Search every query; return the results (the --json document)."""
    from hierdctl.specs import load_encoder

    cfg.validate()
    started = time.time()
    idx = OpenIndex(cfg.index, "INDEX")
    m = idx.manifest
    spec = cfg.model or m["model"]["spec"]
    device = distributed.resolve_device(cfg.device, distributed.resolve())
    encoder = load_encoder(spec, device, "--model")
    idx.check_model(spec, int(encoder.embed_dim), encoder.fingerprint())
    queries = [{"text": t} for t in cfg.texts] + [{"image": str(p)} for p in cfg.images]
    parts = []
    if cfg.texts:
        parts.append(encode_texts(encoder, cfg.texts, 64))
    if cfg.images:
        parts.append(_image_queries(encoder, cfg.images, cfg.max_pixels))
    q = np.concatenate(parts)
    assert q.shape == (len(queries), m["dim"]), (q.shape, len(queries), m["dim"])
    scores, ids = idx.search(q, cfg.k)
    over = m["over"]
    for query, s_row, i_row in zip(queries, scores, ids):
        query["results"] = [{"rank": r + 1, "score": round(float(s), 6), "row": int(i)}
                            | idx.embeddings.lookup(int(i), over)
                            for r, (s, i) in enumerate((s, i) for s, i in zip(s_row, i_row) if i >= 0)]
    return {"schema": SCHEMA, "index": {"path": str(cfg.index), "kind": m["kind"], "exact": m["exact"],
                                        "over": over, "rows": m["rows"], "recall": m["recall"]},
            "model": spec, "k": cfg.k, "queries": queries, "seconds": round(time.time() - started, 3)}
