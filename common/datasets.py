"""Readers for the real datasets (ADE20K, COCO panoptic) and for SegGen's synthetic folders.

Each reader returns a list of `Sample`s (paths only; nothing is decoded while listing), and the
`load_*` functions decode one sample with validation. Layouts are the standard ones that detectron2
and mmsegmentation read, see DESIGN.md "Data contract".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from common import SegGenError
from common.colormap import coco_categories, panoptic_to_semantic, semantic_classes
from common.manifest import SYNTHETIC_FIELDS, read_manifest

DATASETS = ("ade20k", "coco", "toy")  # toy: common/toyworld.py, written in the ADE20K layout
SPLITS = ("train", "val")
_ADE_SPLIT = {"train": "training", "val": "validation"}


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path
    annotation: Path  # ADE20K: 8-bit label PNG; COCO: panoptic PNG (id = R + 256·G + 65536·B)
    segments: list[dict] | None = None  # COCO segments_info: [{"id", "category_id", "iscrowd", ...}]
    meta: dict = field(default_factory=dict)  # the manifest record, for synthetic samples


def default_data_root() -> Path:
    """$SEGGEN_DATASETS, else ./datasets (detectron2's convention)."""
    return Path(os.environ.get("SEGGEN_DATASETS", "datasets"))


def read_dataset(data: str, data_root: str | Path | None, split: str) -> list[Sample]:
    """All samples of a real dataset split, sorted by id."""
    if data not in DATASETS:
        raise SegGenError(f"--data must be one of {', '.join(DATASETS)} (got {data!r})")
    if split not in SPLITS:
        raise SegGenError(f"--split must be one of {', '.join(SPLITS)} (got {split!r})")
    root = Path(data_root) if data_root is not None else default_data_root()
    if data == "toy" and not (root / "images").is_dir():
        raise SegGenError(f"--data-root {root}: no toy world found; make one with `python -m common.toyworld {root} --train 2000 --val 200 --seed 0`")
    return read_coco_panoptic(root, split) if data == "coco" else read_ade20k(root, split)


def _listing(path: Path) -> str:
    if not path.exists():
        return f"{path} does not exist"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return f"{path} holds: " + (", ".join(entries[:10]) + (" ..." if len(entries) > 10 else "") or "nothing")


# ---------------------------------------------------------------- ADE20K

def ade20k_root(data_root: Path) -> Path:
    """The ADEChallengeData2016 folder: data_root itself or data_root/ADEChallengeData2016."""
    for cand in (data_root / "ADEChallengeData2016", data_root):
        if (cand / "images").is_dir() and (cand / "annotations").is_dir():
            return cand
    raise SegGenError(
        f"--data-root {data_root}: no ADE20K found. Expected {data_root}/ADEChallengeData2016/"
        f"{{images,annotations}}/{{training,validation}}/ (or --data-root pointing at ADEChallengeData2016); "
        f"{_listing(data_root)}"
    )


def read_ade20k(data_root: Path, split: str) -> list[Sample]:
    root = ade20k_root(Path(data_root))
    img_dir, ann_dir = root / "images" / _ADE_SPLIT[split], root / "annotations" / _ADE_SPLIT[split]
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise SegGenError(f"ADE20K split {split!r}: folder {d} is missing; {_listing(d.parent)}")
    images = {p.stem: p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
    labels = {p.stem: p for p in ann_dir.iterdir() if p.suffix.lower() == ".png"}
    if not images:
        raise SegGenError(f"ADE20K split {split!r}: no images in {img_dir}")
    for missing, have, where in ((set(images) - set(labels), "image", ann_dir), (set(labels) - set(images), "annotation", img_dir)):
        if missing:
            first = sorted(missing)[0]
            raise SegGenError(f"ADE20K: {len(missing)} {have}(s) without a partner in {where}, e.g. {first!r}")
    return [Sample(k, images[k], labels[k]) for k in sorted(images)]


def load_label(sample: Sample, data: str) -> np.ndarray:
    """(H, W) uint8 semantic label values of a sample (ADE20K: 0..150; COCO: category ids, 0 = void).

    Checks that the values are valid for `data` and that the label has the image's size."""
    try:
        png = Image.open(sample.annotation)
        png.load()
    except OSError as e:
        raise SegGenError(f"{sample.annotation}: unreadable annotation ({e})") from e
    if sample.segments is not None:  # panoptic PNG
        label = panoptic_to_semantic(rgb_to_id(np.asarray(png.convert("RGB"))), sample.segments)
    else:
        if png.mode not in ("L", "P", "I", "I;16"):
            raise SegGenError(f"{sample.annotation}: annotation must be a single-channel label PNG (got mode {png.mode})")
        label = np.asarray(png)
        valid = valid_label_values(data)
        if label.max() > 255 or not valid[np.unique(label)].all():
            bad = [int(v) for v in np.unique(label) if v > 255 or not valid[v]]
            raise SegGenError(f"{sample.annotation}: label values {bad[:8]} are not {data} classes")
        label = label.astype(np.uint8)
    with Image.open(sample.image) as im:
        if im.size != (label.shape[1], label.shape[0]):
            raise SegGenError(
                f"{sample.annotation}: label is {label.shape[1]}x{label.shape[0]} but image {sample.image} is {im.size[0]}x{im.size[1]}"
            )
    return label


def valid_label_values(data: str) -> np.ndarray:
    """(256,) bool: which label values are classes of `data` (0 = other/void included)."""
    valid = np.zeros(256, bool)
    valid[0] = True
    ids = [c["id"] for c in coco_categories()] if data == "coco" else [c["png_value"] for c in semantic_classes(data)]
    valid[ids] = True
    return valid


def load_image(path: Path) -> Image.Image:
    """An RGB image; unreadable or truncated files raise SegGenError naming the file."""
    try:
        im = Image.open(path)
        im.load()
        return im.convert("RGB")
    except OSError as e:
        raise SegGenError(f"{path}: unreadable image ({e})") from e


# ---------------------------------------------------------------- COCO panoptic

def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 panoptic PNG -> (H, W) int32 segment ids: R + 256·G + 65536·B."""
    rgb = rgb.astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) segment ids -> (H, W, 3) uint8 panoptic PNG colours (the inverse of rgb_to_id)."""
    ids = np.asarray(ids, np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)


def read_coco_panoptic(data_root: Path, split: str) -> list[Sample]:
    root = Path(data_root)
    ann_json = root / "annotations" / f"panoptic_{split}2017.json"
    png_dir = root / "annotations" / f"panoptic_{split}2017"
    img_dir = root / f"{split}2017"
    if not ann_json.is_file():
        raise SegGenError(
            f"--data-root {root}: no COCO panoptic found. Expected {ann_json}, {png_dir}/*.png and "
            f"{img_dir}/*.jpg; {_listing(root / 'annotations' if (root / 'annotations').is_dir() else root)}"
        )
    try:
        meta = json.loads(ann_json.read_text())
        files = {im["id"]: im["file_name"] for im in meta["images"]}
        anns = meta["annotations"]
    except (ValueError, KeyError) as e:
        raise SegGenError(f"{ann_json}: not a COCO panoptic annotation file ({e})") from e
    known = {c["id"] for c in coco_categories()}
    samples = []
    for ann in anns:
        bad = {s["category_id"] for s in ann["segments_info"]} - known
        if bad:
            raise SegGenError(f"{ann_json}: image {ann['image_id']} has unknown category ids {sorted(bad)}")
        image, png = img_dir / files[ann["image_id"]], png_dir / ann["file_name"]
        for p in (image, png):
            if not p.is_file():
                raise SegGenError(f"{ann_json} lists {p}, which does not exist")
        samples.append(Sample(Path(ann["file_name"]).stem, image, png, segments=ann["segments_info"]))
    return sorted(samples, key=lambda s: s.id)


def load_panoptic(sample: Sample) -> np.ndarray:
    """(H, W) int32 segment ids of a COCO panoptic sample; every non-zero id must be in segments_info."""
    try:
        ids = rgb_to_id(np.asarray(Image.open(sample.annotation).convert("RGB")))
    except OSError as e:
        raise SegGenError(f"{sample.annotation}: unreadable panoptic PNG ({e})") from e
    unknown = set(np.unique(ids).tolist()) - {s["id"] for s in sample.segments or []} - {0}
    if unknown:
        raise SegGenError(f"{sample.annotation}: segment ids {sorted(unknown)[:5]} are not in its segments_info")
    return ids


# ---------------------------------------------------------------- synthetic folders

def read_synthetic(folder: str | Path) -> list[Sample]:
    """Every sample of a synthetic folder (masksyn/imgsyn output): all its manifest*.jsonl files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SegGenError(f"synthetic folder {folder} does not exist: run masksyn.py or imgsyn.py first, or fix --synthetic")
    records = read_manifest(folder, required=SYNTHETIC_FIELDS, path_fields=("image", "annotation", "colormap"))
    if not records:
        raise SegGenError(f"synthetic folder {folder} has no samples (no manifest*.jsonl lines)")
    return [
        Sample(r["id"], folder / r["image"], folder / r["annotation"], segments=r.get("segments_info"), meta=r)
        for r in records
    ]
