"""train_seg.py's trackers (--report-to): accelerate's own (TensorBoard, W&B, ...), so the loss, lr and the
periodic validation figures (common/seg/validation.py) reach whichever the user reads. Each needs its
package; a missing one is named with the install command before any training."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from common import SegGenError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to value -> the package it needs


def log_with(report_to: str) -> str | None:
    """Accelerator(log_with=...) for --report-to (none: no tracker)."""
    return None if report_to in (None, "none") else report_to


def check_tracker(report_to: str) -> None:
    package = PACKAGES.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise SegGenError(f"--report-to {report_to} needs the {package} package: pip install {package} (or --report-to none)")


def run_config(a) -> dict:
    """The run's options as trackers store them (numbers, strings and booleans; the rest as text)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in sorted(vars(a).items())}


def init_trackers(accelerator, a, output_dir: Path) -> None:
    """Start the trackers of --report-to (TensorBoard writes into RUN/train_seg/), with the run's options."""
    if log_with(a.report_to) is None:
        return
    init_kwargs = {"wandb": {"name": Path(output_dir).name, "dir": str(output_dir)}} if a.report_to == "wandb" else {}
    accelerator.init_trackers("train_seg", config=run_config(a), init_kwargs=init_kwargs)
