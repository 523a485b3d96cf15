"""Evaluation reports: their schemas, what every report records, and writing one.

eval-retrieval and eval-zeroshot return one flat JSON object (docs/eval.md) and write it
where --out says; eval-retrieval's --save-index folder is marked by its index.json. The
schema names below are those files' contracts.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

RETRIEVAL_SCHEMA = "hierdctl.eval-retrieval/1"  # eval-retrieval's report and --save-index's index.json
ZEROSHOT_SCHEMA = "hierdctl.eval-zeroshot/1"
GROUNDING_SCHEMA = "hierdctl.eval-grounding/1"
INDEX_MARKER = "index.json"  # the file that marks a --save-index folder as hierdctl's (written last)


def retention(metrics: dict, reference: dict) -> dict:
    """A later model's score as % of the reference's, for every metric the reference has > 0."""
    return {k: round(100.0 * v / reference[k], 2) for k, v in metrics.items() if reference.get(k, 0) > 0}


def versions() -> dict:
    """The versions a report records."""
    import faiss
    import numpy as np
    import open_clip
    import torch

    from hierdctl import __version__

    v = {"hierdctl": __version__, "python": platform.python_version(), "torch": torch.__version__,
         "numpy": np.__version__, "faiss": faiss.__version__, "open_clip": open_clip.__version__}
    if "transformers" in sys.modules:
        v["transformers"] = sys.modules["transformers"].__version__
    return v


def written_by_hierdctl(path: Path) -> bool:
    """True if the file at `path` is one hierdctl writes at a path the user names: an evaluation
    report (a JSON object whose "schema" is hierdctl.eval-*), an eval-retrieval --html page (its
    generator meta tag), or cache-teacher's --log-skipped
    (JSON lines, each with a shard, a key and a reason). An empty file holds nothing to lose."""
    import json

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if not text.strip():
        return True
    from hierdctl.html_report import GENERATOR

    if text.lstrip().lower().startswith("<!doctype html>") and GENERATOR in text[:2000]:
        return True  # an eval-retrieval --html page
    try:
        obj = json.loads(text)
        if isinstance(obj, dict) and str(obj.get("schema", "")).startswith("hierdctl.eval-"):
            return True
    except json.JSONDecodeError:
        pass
    try:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError:
        return False
    return all(isinstance(r, dict) and {"shard", "key", "reason"} <= set(r) for r in rows)


def check_save_index(folder: Path | None, overwrite: bool, where: str = "--save-index") -> None:
    """A --save-index folder hierdctl did not write is never replaced (checked before any model loads)."""
    if folder is None:
        return
    from hierdctl.atomic import check_dir_target, check_writable

    check_dir_target(Path(folder), INDEX_MARKER, RETRIEVAL_SCHEMA, where, overwrite, "a saved index")
    check_writable(Path(folder), where)  # filled beside itself, then renamed into place


def finish_report(report: dict, out, quiet: bool, stage: str) -> dict:
    """Write the report (atomically) where --out says, and say what was skipped."""
    from hierdctl.atomic import remove_dead_leftovers, write_json_atomic
    from hierdctl.console import console

    if out:
        remove_dead_leftovers(Path(out))  # what a killed evaluation's write of this report left
        write_json_atomic(Path(out), report)
    if not quiet and report["counts"]["skipped_total"]:
        console.print(f"[dim]{stage}:[/] skipped {report['counts']['skipped_total']} samples: "
                      + ", ".join(f"{k} {v}" for k, v in report["counts"]["skipped"].items()))
    return report
