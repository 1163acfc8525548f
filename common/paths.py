"""Default paths that chain the stages (docs/design.md "Defaults that chain").

With no path flags, each stage finds what the previous one wrote, derived from --data and --split.
"""

from __future__ import annotations

from pathlib import Path

from common import SegGenError


def captions_path(data: str, split: str) -> Path:
    return Path("captions") / f"{data}_{split}.jsonl"


def text2mask_dir(data: str) -> Path:
    return Path("runs") / f"text2mask-{data}"


def mask2img_dir(data: str) -> Path:
    return Path("runs") / f"mask2img-{data}"


def synth_dir(method: str, data: str) -> Path:
    """method: "masksyn" or "imgsyn"."""
    return Path("synth") / f"{method}-{data}"


def seg_run_dir(data: str, strategy: str) -> Path:
    return Path("runs") / f"seg-{data}-{strategy}"


def require(path: Path, made_by: str, flag: str) -> Path:
    """path, or an error naming the stage that makes it and the flag that overrides it."""
    if not Path(path).exists():
        raise SegGenError(f"{path} not found: run {made_by} first, or pass {flag}")
    return Path(path)
