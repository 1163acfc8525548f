"""One sample of a dataset, real or synthetic: its id, image, annotation, COCO segments and manifest record.

Readers of real datasets (common.data.datasets) and the lazy indexes of large folders (common.data.index)
both hand out these, so the type and the check of a synthetic record live here, below both."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from common import SegGenError


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path
    annotation: Path  # ADE20K: 8-bit label PNG; COCO: panoptic PNG (id = R + 256·G + 65536·B)
    segments: list[dict] | None = None  # COCO segments_info: [{"id", "category_id", "iscrowd", ...}]
    meta: dict = field(default_factory=dict)  # the manifest record, for synthetic samples


def synthetic_sample(folder: Path, rec: dict, where: str) -> Sample:
    """The Sample of one synthetic manifest record. Its image and annotation must be files inside the
    folder once symlinks are resolved (a manifest cannot point at any file on the machine), and its
    caption a string; errors name `where` (manifest:line, or folder and id)."""
    inside = Path(os.path.realpath(folder))
    paths = {}
    for key in ("image", "annotation"):
        path = folder / rec[key]
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(inside):
            raise SegGenError(f"{where}: {key} {rec[key]!r} resolves to {real}, outside the synthetic folder {folder} "
                              f"(a symlink?); copy the file into the folder")
        if not real.is_file():
            raise SegGenError(f"{where}: {key} file {path} is missing; regenerate the sample or remove its line")
        paths[key] = path
    if not isinstance(rec.get("caption"), str):
        raise SegGenError(f"{where}: caption must be a string (got {rec.get('caption')!r})")
    return Sample(rec["id"], paths["image"], paths["annotation"], segments=rec.get("segments_info"), meta=rec)
