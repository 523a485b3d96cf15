"""`hierdctl index DIR`: a FAISS index over an embeddings folder, exact or approximate.

The index is built over the image rows (or, with --over text, the caption rows) of a
complete embeddings folder written by `hierdctl embed`, read shard by shard; approximate
kinds (ivf, hnsw, pq) are sized to the collection and get their recall@10 against exact
measured on held-out rows of the collection itself. Sizes, the measurement and the folder's
layout: hierdctl/index_format.py. The folder (default DIR/index) is written under a temporary
name and renamed; an earlier index is replaced only with --overwrite.
"""

from __future__ import annotations

import time

from hierdctl import index_format
from hierdctl.configs import IndexConfig
from hierdctl.console import progress
from hierdctl.embeddings_format import Embeddings
from hierdctl.errors import UserError


def run(cfg: IndexConfig) -> dict:
    """Build and write the index; return its manifest (INDEX/index.json)."""
    cfg.validate()
    started = time.time()
    index_format.check_target(cfg.out, cfg.overwrite)  # before any work
    emb = Embeddings(cfg.embeddings, "DIR")
    over = cfg.over if cfg.over != "auto" else emb.has[0]
    if over not in emb.has:
        raise UserError(f"the embeddings in {cfg.embeddings} hold {' and '.join(emb.has)} rows only "
                        f"(embed --modality {emb.manifest['modality']})", "--over")
    with progress(cfg.quiet) as bar:
        task = bar.add_task(f"index {cfg.index_type}", total=sum(emb.counts(over)), unit="vectors", info="")
        index, fields = index_format.build(emb, over, cfg.index_type, nprobe=cfg.nprobe,
                                           recall_queries=cfg.recall_queries, seed=cfg.seed,
                                           progress=lambda n: bar.advance(task, n))
    manifest = index_format.write(cfg.out, index, emb, fields | {"seed": cfg.seed}, cfg.overwrite)
    return manifest | {"out": str(cfg.out), "seconds": round(time.time() - started, 3)}
