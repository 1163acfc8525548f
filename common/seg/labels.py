"""Label tables: a dataset's label values (ADE20K-layout PNG values, COCO category ids) -> the train ids of
the segmenters (paper §4.1, A.3), their class names, and a sample's label map in train ids. train_seg.py,
quality.py and predict.py all read labels through here, so every stage agrees on what class 3 is."""

from __future__ import annotations

import numpy as np

from common import SegGenError
from common.data.datasets import Sample, load_label
from common.masks.colormap import IGNORE, ade20k_classes, coco_categories, toy_classes


# The class tables of the datasets read in the ADE20K layout (PNG values 0 = other and 1..N, train id =
# value - 1), by --data. COCO has its panoptic categories (coco_categories). The toy world (common/toy/world.py)
# is read the same way; its table ships in common/assets/toy_classes.json.
SEMANTIC_TABLES = {
    "ade20k": ade20k_classes,
    "toy": toy_classes,
}


def semantic_table(data: str) -> list[dict]:
    if data not in SEMANTIC_TABLES:
        raise SegGenError(f"--data {data}: no class table (known: {', '.join(SEMANTIC_TABLES)}, coco)")
    return SEMANTIC_TABLES[data]()


def ade20k_train_ids(data: str = "ade20k") -> np.ndarray:
    """(256,) uint8 lookup: PNG value -> train id of an ADE20K-layout dataset; 0 (other) -> 255 (ignored), v -> v - 1."""
    lut = np.full(256, IGNORE, np.uint8)
    for c in semantic_table(data):
        lut[c["png_value"]] = c["train_id"]
    return lut


def coco_train_ids() -> np.ndarray:
    """(256,) uint8 lookup: COCO panoptic category id -> contiguous train id 0..132 (sorted by id); void -> 255."""
    lut = np.full(256, IGNORE, np.uint8)
    for i, c in enumerate(sorted(coco_categories(), key=lambda c: c["id"])):
        lut[c["id"]] = i
    return lut


def class_names(data: str, task: str = "semantic") -> list[str]:
    """Class names by train id; COCO --task instance: the 80 thing categories (Table 3's head)."""
    if data != "coco":
        return [c["name"] for c in sorted(semantic_table(data), key=lambda c: c["train_id"])]
    return [c["name"] for c in sorted(coco_categories(), key=lambda c: c["id"]) if task != "instance" or c["isthing"]]


def instance_train_ids() -> np.ndarray:
    """(256,) uint8 lookup: COCO thing category id -> train id 0..79 of the instance head (sorted by id); stuff, void -> 255."""
    lut = np.full(256, IGNORE, np.uint8)
    for i, c in enumerate(sorted((c for c in coco_categories() if c["isthing"]), key=lambda c: c["id"])):
        lut[c["id"]] = i
    return lut


def thing_train_ids(data: str) -> set[int]:
    """Train ids of the "thing" classes (COCO); none for ADE20K semantic."""
    if data != "coco":
        return set()
    return {i for i, c in enumerate(sorted(coco_categories(), key=lambda c: c["id"])) if c["isthing"]}


def load_train_label(sample: Sample, data: str) -> np.ndarray:
    """(H, W) uint8 semantic train ids, 255 = ignore (checks values and size through common.data.datasets)."""
    return train_ids(data)[load_label(sample, data)]


def train_ids(data: str) -> np.ndarray:
    """(256,) uint8 lookup: label value (ADE20K-layout PNG value / COCO category id) -> train id, 255 = ignore."""
    return ade20k_train_ids(data) if data in ("ade20k", "toy") else coco_train_ids()
