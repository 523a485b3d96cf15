"""The one rich console every stage reports through, and the progress bar they share.

Stages never print(): they call `console.print`, `progress(...)` or return summaries
that the CLI renders. Under torchrun only rank 0 shows progress (`quiet=True` elsewhere).
"""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

# stderr keeps stdout clean for --json outputs.
console = Console(stderr=True, highlight=False)


class RateColumn(ProgressColumn):
    """Throughput in the task's unit (samples/s, steps/s)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        if speed is None:
            return Text(f"-- {unit}/s", style="progress.data.speed")
        return Text(f"{speed:,.1f} {unit}/s", style="progress.data.speed")


def progress(quiet: bool = False) -> Progress:
    """A progress bar with count, throughput and ETA. Disabled when quiet or not a TTY in CI."""
    disable = quiet or os.environ.get("HIERDCTL_NO_PROGRESS") == "1"
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=disable,
        transient=not sys.stderr.isatty(),
    )
