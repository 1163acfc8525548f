"""Readers for the real datasets (ADE20K, COCO panoptic) and for SegGen's synthetic folders.

Each reader returns a list of `Sample`s (paths only; nothing is decoded while listing), and the
`load_*` functions decode one sample with validation. Layouts are the standard ones that detectron2
and mmsegmentation read, see docs/design.md "Data contract".
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from common import SegGenError
from common.masks.colormap import coco_categories, panoptic_to_semantic, semantic_classes
from common.data.manifest import SYNTHETIC_FIELDS, read_manifest
from common.data.sample import Sample, synthetic_sample  # noqa: F401  (Sample: the readers' type, imported from here too)

DATASETS = ("ade20k", "coco", "toy")  # toy: common/toy/world.py, written in the ADE20K layout
SPLITS = ("train", "val")
_ADE_SPLIT = {"train": "training", "val": "validation"}


def default_data_root() -> Path:
    """$SEGGEN_DATASETS, else ./datasets (detectron2's convention: datasets/coco/, datasets/ADEChallengeData2016/;
    the data root itself holding annotations/ or images/ works too)."""
    return Path(os.environ.get("SEGGEN_DATASETS", "datasets"))


def read_dataset(data: str, data_root: str | Path | None, split: str) -> list[Sample]:
    """All samples of a real dataset split, sorted by id."""
    if data not in DATASETS:
        raise SegGenError(f"--data must be one of {', '.join(DATASETS)} (got {data!r})")
    if split not in SPLITS:
        raise SegGenError(f"--split must be one of {', '.join(SPLITS)} (got {split!r})")
    root = Path(data_root) if data_root is not None else default_data_root()
    if data == "toy" and not (root / "images").is_dir():
        raise SegGenError(f"--data-root {root}: no toy world found; make one with `python -m common.toy.world {root} --train 2000 --val 200 --seed 0`")
    return read_coco_panoptic(root, split) if data == "coco" else read_ade20k(root, split)


def _listing(path: Path) -> str:
    if not path.exists():
        return f"{path} does not exist"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return f"{path} holds: " + (", ".join(entries[:10]) + (" ..." if len(entries) > 10 else "") or "nothing")


# ---------------------------------------------------------------- ADE20K

def ade20k_root(data_root: Path) -> Path:
    """The ADEChallengeData2016 folder: data_root/ADEChallengeData2016 (detectron2's layout) or data_root
    itself. When neither holds it, the error suggests an ADEChallengeData2016 found below data_root."""
    for cand in (data_root / "ADEChallengeData2016", data_root):
        if (cand / "images").is_dir() and (cand / "annotations").is_dir():
            return cand
    found = [p for p in _find_below(data_root, "ADEChallengeData2016") if (p / "images").is_dir()]
    hint = f"; found {found[0]}: pass --data-root {found[0].parent}" if found else ""
    raise SegGenError(
        f"--data-root {data_root}: no ADE20K found{hint}. Expected {data_root}/ADEChallengeData2016/"
        f"{{images,annotations}}/{{training,validation}}/ (or --data-root pointing at ADEChallengeData2016); "
        f"{_listing(data_root)}"
    )


def _find_below(root: Path, pattern: str, depth: int = 2) -> list[Path]:
    """What matches `pattern` 1..depth folders below root (a --data-root one or two levels off)."""
    found = []
    for d in range(1, depth + 1):
        try:
            found += sorted(root.glob("*/" * d + pattern))
        except OSError:  # an unreadable folder on the way
            pass
    return found


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


# What PIL raises for a file it cannot decode: OSError (unreadable, truncated, missing), its
# DecompressionBombError (not an OSError: a file over 2x Image.MAX_IMAGE_PIXELS), ValueError / SyntaxError
# (some corrupt headers) and struct.error / EOFError from a few plugins.
_DECODE_ERRORS = (OSError, Image.DecompressionBombError, ValueError, SyntaxError, EOFError, struct.error)
_RGB_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV", "La", "RGBa")
_PANOPTIC_MODES = ("RGB", "RGBA", "RGBX", "P", "PA")
_LABEL_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")


def _open(path: Path, what: str) -> Image.Image:
    """A decoded image, or SegGenError naming the file (any decoding error: a per-item error)."""
    try:
        im = Image.open(path)
        im.load()
        return im
    except _DECODE_ERRORS as e:
        raise SegGenError(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from e


def _image_size(path: Path) -> tuple[tuple[int, int], int]:
    """(size as stored, EXIF orientation: 1 = none, 5..8 = turned by 90°)."""
    try:
        with Image.open(path) as im:
            return im.size, int(im.getexif().get(0x0112, 1) or 1)
    except _DECODE_ERRORS as e:
        raise SegGenError(f"{path}: unreadable image ({type(e).__name__}: {e})") from e


def load_label(sample: Sample, data: str) -> np.ndarray:
    """(H, W) uint8 semantic label values of a sample (ADE20K: 0..150; COCO: category ids, 0 = void).

    Checks that the values are valid for `data` and that the label has the image's size; every failure
    is a SegGenError naming the file (a per-item error for the stages' error handling)."""
    png = _open(sample.annotation, "annotation")
    if sample.segments is not None:  # panoptic PNG
        if png.mode not in _PANOPTIC_MODES:
            raise SegGenError(f"{sample.annotation}: a panoptic PNG must be RGB (got mode {png.mode})")
        label = panoptic_to_semantic(rgb_to_id(np.asarray(png.convert("RGB"))), sample.segments)
    else:
        if png.mode not in _LABEL_MODES:
            raise SegGenError(f"{sample.annotation}: annotation must be a single-channel label PNG (got mode {png.mode})")
        label = np.asarray(png)
        valid = valid_label_values(data)
        if label.size and (label.min() < 0 or label.max() > 255 or not valid[np.unique(label)].all()):
            bad = [int(v) for v in np.unique(label) if not 0 <= v <= 255 or not valid[v]]
            raise SegGenError(f"{sample.annotation}: label values {bad[:8]} are not {data} classes")
        label = label.astype(np.uint8)
    size, orientation = _image_size(sample.image)
    if size != (label.shape[1], label.shape[0]):
        turned = orientation in (5, 6, 7, 8) and size[::-1] == (label.shape[1], label.shape[0])
        raise SegGenError(
            f"{sample.annotation}: label is {label.shape[1]}x{label.shape[0]} but image {sample.image} is {size[0]}x{size[1]}"
            + (f" as stored; its EXIF orientation ({orientation}) turns it to {size[1]}x{size[0]} for viewers, and the label "
               f"was drawn on that view. SegGen reads pixels as stored (as ADE20K and COCO's tools do): save the image "
               f"turned (PIL: ImageOps.exif_transpose) without the EXIF tag" if turned else "")
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
    """An RGB image. 16-bit greyscale is scaled to 8 bits (PIL's convert("RGB") would clip it to
    white); 32-bit integer / float images are refused by mode, as are unreadable, truncated and
    decompression-bomb files: SegGenError naming the file."""
    im = _open(Path(path), "image")
    if im.mode in _RGB_MODES:
        return im.convert("RGB")
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im)
        if im.mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
            raise SegGenError(f"{path}: 32-bit integer image (mode I, values {a.min()}..{a.max()}) is not a photo; "
                              f"save it as 8- or 16-bit")
        return Image.fromarray((a.astype(np.uint32) >> 8).astype(np.uint8), "L").convert("RGB")  # 16 -> 8 bits
    raise SegGenError(f"{path}: image mode {im.mode} is not supported; save it as 8- or 16-bit RGB or greyscale")


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
    """All samples of a COCO panoptic split, sorted by id, from the cached index of its JSON (see
    common/data/index.py: built once, rebuilt when the JSON changes). coco_panoptic_index gives the same
    samples lazily, without a Python object per segment, for paper-scale training."""
    return list(coco_panoptic_index(data_root, split))


def coco_root(data_root: Path, split: str) -> Path:
    """The COCO folder (annotations/, {split}2017/): data_root/coco (detectron2's layout) or data_root
    itself. When neither holds the split's panoptic JSON, the error suggests where one was found below
    data_root, or names what is missing."""
    root = Path(data_root)
    ann = f"annotations/panoptic_{split}2017.json"
    for cand in (root, root / "coco"):
        if (cand / ann).is_file():
            return cand
    have = root if (root / "annotations").is_dir() or not (root / "coco").is_dir() else root / "coco"
    hint = ""
    found = _find_below(have, f"panoptic_{split}2017.json", 3) or _find_below(have, "panoptic_*2017.json", 3)
    if found:
        hit = found[0]
        hint = (f"; found {hit}: pass --data-root {hit.parent.parent}" if hit.parent.name == "annotations"
                else f"; found {hit}, but COCO keeps it in annotations/ beside {split}2017/")
        if hit.name != f"panoptic_{split}2017.json":
            hint += f" (that is another split: {split!r} needs panoptic_{split}2017.json)"
    png_dir, img_dir = have / "annotations" / f"panoptic_{split}2017", have / f"{split}2017"
    raise SegGenError(
        f"--data-root {root}: no COCO panoptic found{hint}. Expected {have / ann}, {png_dir}/*.png and "
        f"{img_dir}/*.jpg (or the same under {root}/coco/, detectron2's layout); "
        f"{_listing(have / 'annotations' if (have / 'annotations').is_dir() else have)}"
    )


def coco_panoptic_index(data_root: Path, split: str):
    """A lazy sequence of a COCO panoptic split's Samples (common.data.index.CocoPanopticIndex); the layout
    is checked first (coco_root) and the error names what is missing."""
    from common.data.index import coco_panoptic_index as build

    return build(coco_root(Path(data_root), split), split)


def _read_coco_panoptic_json(data_root: Path, split: str) -> list[Sample]:
    """The JSON parsed on every call (before the cached index): bench/scale.py's baseline."""
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
    png = _open(sample.annotation, "panoptic PNG")
    if png.mode not in _PANOPTIC_MODES:
        raise SegGenError(f"{sample.annotation}: a panoptic PNG must be RGB (got mode {png.mode})")
    ids = rgb_to_id(np.asarray(png.convert("RGB")))
    unknown = set(np.unique(ids).tolist()) - {s["id"] for s in sample.segments or []} - {0}
    if unknown:
        raise SegGenError(f"{sample.annotation}: segment ids {sorted(unknown)[:5]} are not in its segments_info")
    return ids


# ---------------------------------------------------------------- synthetic folders

def read_synthetic(folder: str | Path) -> list[Sample]:
    """Every sample of a synthetic folder (masksyn/imgsyn output): all its manifest*.jsonl files, each
    record validated (read_manifest) and each sample's files checked (synthetic_sample). Keeps every
    record in memory: for paper-scale folders use synthetic_index."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SegGenError(f"synthetic folder {folder} does not exist: run masksyn.py or imgsyn.py first, or fix --synthetic")
    places: list[str] = []
    records = read_manifest(folder, required=SYNTHETIC_FIELDS, path_fields=("image", "annotation", "colormap"), places=places)
    if not records:
        raise SegGenError(f"synthetic folder {folder} has no samples (no manifest*.jsonl lines)")
    return [synthetic_sample(folder, r, f"{where} (id {r['id']!r})") for r, where in zip(records, places)]


def synthetic_index(folder: str | Path):
    """A synthetic folder as a lazy sequence of Samples (common.data.index.SyntheticIndex): numpy arrays of
    ids and manifest line offsets, cached in FOLDER/.index.npz; `index[i] == read_synthetic(folder)[i]`,
    with each record checked when its sample is loaded (read_synthetic checks all of them up front)."""
    from common.data.index import synthetic_index as build

    return build(folder)


