"""Default paths that chain the stages (docs/design.md "Defaults that chain").

With no path flags, each stage finds what the previous one wrote, derived from --data and --split.
Paths a run records (seggen.json, a manifest's `models`) are stored relative to the recording folder
with `record_path` and read back with `resolve_recorded`, so run folders can be moved.
"""

from __future__ import annotations

import os
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


# ---------------------------------------------------------------- paths recorded in a folder (issue 17 item 4)
# seggen.json and each manifest's `models` record what a run used. Recorded relative to the folder that
# holds the record, they stay right when that folder and what it points at move together (copied to
# another machine, mounted elsewhere on a cluster); hub ids are kept as they are. A local path is always
# recorded starting with "./" or "../", so it is never mistaken for a hub id ("org/name").


def is_hub_id(name: str) -> bool:
    """'org/name' that is not a local path: a Hugging Face hub id (as common.synthesis.synth reads it)."""
    return not Path(name).exists() and name.count("/") == 1 and not name.startswith((".", "/", "~"))


def record_path(path: str | Path, folder: str | Path, notes: list[str] | None = None) -> str:
    """How a record kept in `folder` stores `path` (a model folder, a dataset, another run).

    A hub id is kept as it is. A local path (relative ones are taken from the current directory) is
    recorded relative to `folder`, "./sub/model" inside it, "../../runs/x" outside it, when the two
    share a folder below the filesystem root. Otherwise (only "/" in common, or another drive) it is
    recorded absolute, and a note saying so is added to `notes` for the caller to print."""
    text = str(path)
    if is_hub_id(text):
        return text
    target, base = os.path.abspath(os.path.expanduser(text)), os.path.abspath(folder)
    try:
        common = os.path.commonpath([target, base])
        rel = os.path.relpath(target, base)
    except ValueError:  # another drive (Windows)
        common, rel = None, None
    if rel is None or common == os.path.dirname(common):  # nothing in common below the root
        if notes is not None:
            notes.append(f"{target} is recorded as an absolute path in {folder}: the two share no folder below the "
                         f"root, so a moved copy of {folder} finds it only where that path is the same")
        return Path(target).as_posix()
    rel = Path(rel).as_posix()
    return rel if rel.startswith("../") or rel == ".." else "./" + rel if rel != "." else "."


def resolve_recorded(value: str, folder: str | Path) -> str:
    """The path (or hub id) that a record kept in `folder` stores: record_path's inverse.

    "./x" and "../x" are taken from `folder`, absolute paths as they are, hub ids as they are. Values
    written before paths were recorded relative (a path from the directory the run started in, e.g.
    "runs/mask2img-coco") are taken from `folder` when there, else from the current directory."""
    folder = Path(folder)
    if value == "." or value.startswith(("./", "../")) or value == "..":
        return os.path.normpath(folder / value)
    if os.path.isabs(value):
        return value
    for cand in (folder / value, Path(value)):  # older records
        if cand.exists():
            return os.path.normpath(cand)
    return value if is_hub_id(value) else os.path.normpath(folder / value)
