"""The trackers of every training stage (--report-to): accelerate's own (TensorBoard, W&B), so the numbers
and the validation pictures reach whichever the user reads. Each tracker needs its package; a missing one
is named with the install command before any training (wandb is optional: never a requirement).

train_seg.py uses them through common/seg/tracking.py, the generator trainers through
common/diffusion/training.py and common/diffusion/validation.py."""

from __future__ import annotations

import importlib.util

from common import SegGenError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to value -> the package it needs


def log_with(report_to: str) -> str | None:
    """Accelerator(log_with=...) for --report-to (none: no tracker)."""
    return None if report_to in (None, "none") else report_to


def installed(report_to: str) -> bool:
    package = PACKAGES.get(report_to)
    return package is None or importlib.util.find_spec(package) is not None


def check_tracker(report_to: str) -> None:
    """Refuse --report-to X when X's package is missing, with the command that installs it."""
    if not installed(report_to):
        package = PACKAGES[report_to]
        raise SegGenError(f"--report-to {report_to} needs the {package} package: pip install {package} (or --report-to none)")


def run_config(a) -> dict:
    """The run's options as trackers store them (numbers, strings and booleans; the rest as text)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in sorted(vars(a).items())}


def log_images(accelerator, step: int, images: dict, captions: list[str]) -> None:
    """Send pictures (name -> PIL image, e.g. a validation grid) and their captions (one per grid row) to
    every active tracker: TensorBoard gets an image summary per picture and the captions as a text summary
    ("NAME/captions", a numbered Markdown list), W&B a wandb.Image per picture with the captions as its
    caption. Main process only; other trackers are left alone."""
    import numpy as np

    if not accelerator.is_main_process:
        return
    text = "\n".join(f"{i + 1}. {c}" for i, c in enumerate(captions))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for name, image in images.items():
                tracker.writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")  # (H, W, 3) uint8
                tracker.writer.add_text(f"{name}/captions", text, step)
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb  # optional: present, since check_tracker let --report-to wandb through

            tracker.run.log({name: wandb.Image(image, caption=text) for name, image in images.items()}, step=step)
