"""distill's reporters (`--report-to tensorboard,wandb`): the scalars people already read.

Scalar names are open_clip's (its train.py logs `"train/" + name` for the running loss terms,
`lr`, `scale` and `samples_per_second`), so a hierdctl run and an open_clip run overlay on one
dashboard. One metrics.jsonl row becomes:

    loss            -> train/loss
    <term>_loss     -> train/<term>_loss          (clip_loss, fd_loss, crd_loss, ...)
    lr              -> train/lr
    logit_scale     -> train/scale                (exp θ: open_clip's "scale")
    samples_per_s   -> train/samples_per_second
    epoch           -> train/epoch
    skipped_samples -> train/skipped_samples
    step            -> the x axis

The run's hyperparameters (its resolved settings, the recipe's term weights, the resolved
warm-up and length) go to TensorBoard's hparams plugin (written into the run's own event
files, so TensorBoard's HPARAMS tab lists the run beside its scalars) and to the W&B run's
config. distill does not evaluate during training: eval metrics reach a dashboard only when
something evaluates (eval-retrieval / eval-zeroshot write their own reports).

TensorBoard: RUN_DIR/tensorboard/ (a resumed run drops the events after its checkpoint).
W&B: wandb.init with the project WANDB_PROJECT (default "hierdctl"), the run directory's name,
and a run id kept in config.resolved.yaml so a resumed run continues the same W&B run; its
files go to WANDB_DIR if set, else RUN_DIR/wandb/. W&B's own environment variables apply
(WANDB_MODE=offline: no network, `wandb sync` later; WANDB_ENTITY; WANDB_SILENT).

Only the main process reports. Imported lazily by the distill stage: tensorboard and wandb
are optional extras.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from hierdctl.errors import UserError

TENSORBOARD_DIR = "tensorboard"  # = checkpoint.TENSORBOARD
_RENAMED = {"logit_scale": "scale", "samples_per_s": "samples_per_second"}


def open_clip_names(row: dict) -> dict[str, float]:
    """A metrics.jsonl row -> {open_clip's scalar name: value}, without the step."""
    return {f"train/{_RENAMED.get(k, k)}": float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def hparams(resolved: dict) -> dict:
    """Flat {name: int | float | str | bool} of a run's resolved config (nested keys joined by
    '/', lists and None as text): what TensorBoard's hparams plugin accepts."""
    out: dict = {}

    def put(prefix: str, v) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                put(f"{prefix}/{k}" if prefix else str(k), x)
        elif isinstance(v, bool) or (isinstance(v, (int, float)) and math.isfinite(v)) or isinstance(v, str):
            out[prefix] = v
        else:
            out[prefix] = "none" if v is None else str(v)

    put("", resolved)
    return out


def new_run_id() -> str:
    import secrets

    return "hierdctl-" + secrets.token_hex(6)


class Reporters:
    """The reporters of one process's training: log(step, row) every log_every steps; close()."""

    def __init__(self, kinds: tuple[str, ...], run_dir: Path, config: dict, start_step: int, run_id: str | None,
                 quiet: bool = False):
        self.tb = self.wandb_run = None
        flat = hparams(config)
        if "tensorboard" in kinds:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams as hparams_summary

            self.tb = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=start_step + 1)
            # Into this run's own event file (SummaryWriter.add_hparams would start another run in a
            # sub-folder): the metrics the HPARAMS tab shows are this run's scalars of these names.
            for summary in hparams_summary(flat, {"train/loss": 0.0, "train/lr": 0.0}):
                self.tb._get_file_writer().add_summary(summary)
            self.tb.flush()
        if "wandb" in kinds:
            self.wandb_run = _wandb_init(Path(run_dir), config, run_id, quiet)

    def log(self, step: int, row: dict) -> None:
        scalars = open_clip_names(row)
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _wandb_init(run_dir: Path, config: dict, run_id: str | None, quiet: bool):
    """wandb.init for this run; anything W&B refuses (not logged in, an unreachable server in
    online mode, a bad WANDB_MODE) is one line on --report-to, before the first step."""
    import wandb

    settings = {"silent": True} if quiet else {}
    try:
        return wandb.init(project=os.environ.get("WANDB_PROJECT") or "hierdctl", name=run_dir.resolve().name,
                          id=run_id, resume="allow" if run_id else None, config=config,
                          dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
                          settings=wandb.Settings(**settings))
    except Exception as e:  # wandb's errors have no common base class it documents
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"wandb could not start a run ({type(e).__name__}: {first}); log in with `wandb login`, or "
                        "set WANDB_MODE=offline to log without network", "--report-to") from None
