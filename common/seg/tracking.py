"""train_seg.py's trackers (--report-to): accelerate's own (TensorBoard, W&B, ...), so the loss, lr and the
periodic validation figures (common/seg/validation.py) reach whichever the user reads. Each needs its
package; a missing one is named with the install command before any training."""

from __future__ import annotations

from pathlib import Path

from common.runtime.tracking import PACKAGES, check_tracker, log_with, run_config  # noqa: F401 - shared with the generator trainers


def init_trackers(accelerator, a, output_dir: Path) -> None:
    """Start the trackers of --report-to (TensorBoard writes into RUN/train_seg/), with the run's options."""
    if log_with(a.report_to) is None:
        return
    init_kwargs = {"wandb": {"name": Path(output_dir).name, "dir": str(output_dir)}} if a.report_to == "wandb" else {}
    accelerator.init_trackers("train_seg", config=run_config(a), init_kwargs=init_kwargs)
