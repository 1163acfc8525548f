"""Option choices that the stage scripts share, defined once so that their --help pages agree."""

from enum import Enum


class Data(str, Enum):
    ade20k = "ade20k"
    coco = "coco"
    toy = "toy"  # common/toyworld.py


class Split(str, Enum):
    train = "train"
    val = "val"


class Precision(str, Enum):
    """Weights dtype of a model used for inference (caption, imgsyn, masksyn)."""

    auto = "auto"  # bf16 on a GPU that has it, else fp16; fp32 on CPU
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class MixedPrecision(str, Enum):
    """accelerate's mixed precision of a training run."""

    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


class Tracker(str, Enum):
    tensorboard = "tensorboard"
    none = "none"


def run(main, console) -> None:
    """`typer.run(main)` for a resumable job: Ctrl-C ends it with a hint instead of a traceback (every
    manifest line written so far points at complete files, so a rerun resumes)."""
    import sys

    import typer

    try:
        typer.run(main)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: rerun the same command to resume")
        sys.exit(130)
