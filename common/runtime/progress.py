"""What the stages show on the terminal: their console (stderr) and the one progress bar of every stage:
name, bar, done/total, rate, extra columns, elapsed, ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

console = Console(stderr=True, soft_wrap=True)  # the stages' messages, on stderr; no hard wraps: greppable in logs


class Rate(ProgressColumn):
    """The task's `rate` field when the caller sets one (e.g. samples written per second), else rich's
    own estimate of completed units per second."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        rate = task.fields.get("rate")
        return Text(f"{(task.speed or 0) if rate is None else rate:.2f} {self.unit}")


def progress_bar(console, unit: str, *columns, name: str = "{task.description}", enabled: bool = True,
                 transient: bool = False) -> Progress:
    """A rich Progress (use it as a context manager); `enabled` False (another process than the main
    one) gives a silent one with the same interface."""
    return Progress(TextColumn(name), BarColumn(), MofNCompleteColumn(), Rate(unit), *columns, TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console, disable=not enabled, transient=transient)
