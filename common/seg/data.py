"""train_seg.py's data (paper appendix A.3: Mask2Former's official data recipes): training
targets of every task, and the augmentation of ADE20K (random short-side resize, crop, photometric
distortion, flip), COCO (large-scale jitter, crop, flip) and HRNet's official ADE20K pipeline (random
long-side scaling, random crop, flip).

Training targets of every task are one int32 map: class * SEG + k for the k-th segment of the image
(k = 0 for semantic targets: one mask per class), -1 = ignore (ADE20K class 0, COCO void and crowd).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import SegGenError
from common.masks.colormap import IGNORE, coco_categories
from common.data.datasets import Sample, load_image, load_label, load_panoptic, read_dataset, synthetic_index
from common.data.index import first_per_source
from common.synthesis.finalize import ensure_finalized
from common.runtime.loader import by_value
from common.seg.labels import (  # noqa: F401  (the label tables, used by train_seg through this module too)
    class_names, coco_train_ids, instance_train_ids, load_train_label, semantic_table, thing_train_ids, train_ids,
)
from common.seg import quality
from common.data import subset
from common.data.manifest import manifest_files
from common.data.paths import synth_dir


SEG = 1000


def load_target(sample: Sample, data: str, task: str) -> np.ndarray:
    """(H, W) int32 training target of `sample` for `task` (semantic, panoptic, instance)."""
    if data != "coco" or task == "semantic":
        label = load_train_label(sample, data).astype(np.int32)
        return np.where(label == IGNORE, -1, label * SEG)
    ids = load_panoptic(sample)
    lut = instance_train_ids() if task == "instance" else coco_train_ids()  # instance: the 80-class head
    target = np.full(ids.shape, -1, np.int32)
    for k, seg in enumerate(sample.segments or [], 1):
        cls = int(lut[seg["category_id"]])
        # Mask2Former (detectron2's panoptic mapper) leaves crowd regions out of the targets; the
        # instance task keeps things only.
        if seg.get("iscrowd", 0) or cls == IGNORE:
            continue
        target[ids == seg["id"]] = cls * SEG + k
    return target


def probe_synthetic(folder: Path, samples: list[Sample], data: str, n: int = 8) -> None:
    """Decode a few labels of a synthetic folder up front: labels of another dataset fail here, named,
    not hours into training."""
    known = {c["id"] for c in coco_categories()}
    for i in np.linspace(0, len(samples) - 1, min(n, len(samples))).round().astype(int):
        try:
            if data == "coco":
                if samples[i].segments is None:
                    raise SegGenError(f"{samples[i].annotation}: no segments_info in the manifest (a COCO folder's records need it)")
                bad = sorted({s["category_id"] for s in samples[i].segments} - known)
                if bad:
                    raise SegGenError(f"{samples[i].annotation}: category ids {bad[:8]} are not coco categories")
                load_panoptic(samples[i])
            load_label(samples[i], data)
        except SegGenError as e:
            raise SegGenError(f"--synthetic {folder}: {e}. Synthetic labels must use {data}'s label encoding "
                              f"(was this folder made for another dataset?)") from e


def random_resize(image: Image.Image, label: np.ndarray, crop: int, rng, lsj: bool = False,
                  factor: float | None = None, kind: str | None = None) -> tuple[Image.Image, np.ndarray]:
    """The random resize of a recipe (`kind`, default "lsj" if lsj else "ade20k"):
    - ade20k: detectron2's ResizeShortestEdge as Mask2Former configures it: the short side drawn from the 16
      sizes int(x * 0.1 * crop), x = 5..20 ("choice" sampling: 256, 281, .., 1024 at 512), the long side at
      most 4 x crop (2048);
    - lsj (COCO, large-scale jitter): the image fitted into U(0.1, 2.0) x crop squared;
    - hrnet: HRNet-Semantic-Segmentation's multi_scale_aug (base_dataset.py): the long side int(crop * s + 0.5),
      s = 0.5 + randint(0, 11) / 10, i.e. 0.5, 0.6, .., 1.6 (SCALE_FACTOR 11, BASE_SIZE = the 520 crop).
    A given `factor` replaces the random draw (1.0: ade20k / hrnet's base size)."""
    kind = kind or ("lsj" if lsj else "ade20k")
    w, h = image.size
    if factor is None:
        factor = {"lsj": lambda: rng.uniform(0.1, 2.0), "hrnet": lambda: 0.5 + int(rng.integers(0, 12)) / 10,
                  "ade20k": lambda: int(rng.integers(5, 21) * 0.1 * crop) / crop}[kind]()
    if kind == "lsj":
        scale = factor * crop / max(w, h)
    elif kind == "hrnet":
        scale = int(crop * factor + 0.5) / max(w, h)
    else:
        scale = min(factor * crop / min(w, h), 4 * crop / max(w, h))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.BILINEAR), np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))


def crop_window(image: np.ndarray, label: np.ndarray, y: int, x: int, crop: int, fill: int = 128):
    """The crop x crop window at (y, x): image (crop, crop, 3) uint8 padded with `fill` (grey 128; HRNet
    pads with 0), label (crop, crop) int32 padded with ignore -1, valid (crop, crop) bool (False on the
    padding) — the padding of Mask2Former's semantic mapper, where the image is smaller than the crop."""
    img, lab = image[y:y + crop, x:x + crop], label[y:y + crop, x:x + crop]
    out_img = np.full((crop, crop, 3), fill, np.uint8)
    out_lab = np.full((crop, crop), -1, np.int32)
    valid = np.zeros((crop, crop), bool)
    out_img[:img.shape[0], :img.shape[1]] = img
    out_lab[:lab.shape[0], :lab.shape[1]] = lab
    valid[:img.shape[0], :img.shape[1]] = True
    return out_img, out_lab, valid


def random_crop(image: np.ndarray, label: np.ndarray, crop: int, rng, tries: int = 10, fill: int = 128):
    """A random crop_window; among up to `tries` windows the first with a labelled pixel, so that few
    crops arrive empty (an image without targets is left out of the loss: SegData's keep). tries = 1:
    one uniform draw (HRNet's rand_crop)."""
    h, w = label.shape
    for _ in range(tries):
        y, x = rng.integers(0, max(h - crop, 0) + 1), rng.integers(0, max(w - crop, 0) + 1)
        if (label[y:y + crop, x:x + crop] >= 0).any():
            break
    return crop_window(image, label, y, x, crop, fill)


def center_crop(image: np.ndarray, label: np.ndarray, crop: int, fill: int = 128):
    """The centre crop_window."""
    h, w = label.shape
    return crop_window(image, label, max(h - crop, 0) // 2, max(w - crop, 0) // 2, crop, fill)


def photometric_distortion(img: np.ndarray, rng) -> np.ndarray:
    """Mask2Former's ColorAugSSDTransform (the SSD colour jitter): each with probability 1/2, brightness
    +-32, contrast and saturation x U(0.5, 1.5), hue +-18 degrees/2 (OpenCV units); contrast either first
    or last. As there, every step clips to 0..255 and rounds down to uint8 before the next one."""

    def convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(x):
        return convert(x, alpha=rng.uniform(0.5, 1.5)) if rng.random() < 0.5 else x

    def saturation_hue(x):
        do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
        if not (do_sat or do_hue):
            return x
        hsv = np.array(Image.fromarray(x).convert("HSV"))
        if do_sat:
            hsv[..., 1] = convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        if do_hue:  # OpenCV hue is 0..180, PIL's 0..255
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-18, 18) * 255 / 180) % 256
        return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))

    if rng.random() < 0.5:
        img = convert(img, beta=rng.uniform(-32, 32))
    if rng.random() < 0.5:
        return saturation_hue(contrast(img))
    return contrast(saturation_hue(img))


@dataclass(frozen=True)
class Augment:
    """The random transforms of a training sample (each recipe's row of train_seg.RECIPES names one)."""
    resize: str  # random_resize's kind: "ade20k" (Mask2Former's 16 short sides), "lsj" (large-scale jitter), "hrnet"
    #              (HRNet's long side x 0.5..1.6), "fixed": short side = crop
    crop: bool  # a random crop window (False: the centre window)
    colour: bool  # SSD photometric distortion (Mask2Former's ADE20K recipe)
    flip: bool  # horizontal flip with probability 1/2
    fill: int = 128  # the image's padding where it is smaller than the crop (Mask2Former 128, HRNet 0)
    tries: int = 10  # random crop windows tried for one with a labelled pixel (1: a single uniform draw)


AUGMENTS = {
    "ade20k": Augment("ade20k", crop=True, colour=True, flip=True),  # Mask2Former ADE20K semantic
    "lsj": Augment("lsj", crop=True, colour=False, flip=True),  # Mask2Former COCO (large-scale jitter)
    # HRNet-Semantic-Segmentation's ADE20K training (A.3 names its "random flipping"; its config adds the rest)
    "hrnet": Augment("hrnet", crop=True, colour=False, flip=True, fill=0, tries=1),
    "flip": Augment("fixed", crop=False, colour=False, flip=True),  # flip alone (the toy world's HRNet)
    "none": Augment("fixed", crop=False, colour=False, flip=False),
}


def without_a9(augment: Augment) -> Augment:
    """Appendix A.9's ablation: "we eliminate color augmentation, random flipping, and random cropping";
    the random resize (scale jitter) is not named there and stays."""
    return Augment(augment.resize, crop=False, colour=False, flip=False, fill=augment.fill)


class SegData(torch.utils.data.Dataset):
    """Decodes and augments one (source, index, seed) from MixedBatches.

    Returns image (3, crop, crop) uint8, label (crop, crop) int32 targets (see load_target; -1 = ignore
    and padding), valid (crop, crop) bool (False on padding), source, keep (bool: any labelled pixel), and
    with `segments` the ids of the segments present (segment_ids, (N,) int32), found here in the DataLoader
    workers: the step then builds Mask2Former's masks on the device from the label map and the ids
    (mask_target) without torch.unique there, a host sync on a GPU, and without sending N masks of
    crop x crop over. Batch them with `collate`. `augment`: an Augment, or True for the dataset's
    Mask2Former recipe (COCO: large-scale jitter, ADE20K-layout data: ADE20K's), False for none."""

    def __init__(self, sources: list[list[Sample]], data: str, crop: int, augment: Augment | bool = True, task: str = "semantic",
                 segments: bool = True):
        if isinstance(augment, bool):
            augment = AUGMENTS[("lsj" if data == "coco" else "ade20k") if augment else "none"]
        self.sources, self.data, self.crop, self.augment, self.task = sources, data, crop, augment, task
        self.segments = segments  # False for HRNet, whose loss takes the label map itself

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def __getitem__(self, key):
        source, index, seed = key
        sample = self.sources[source][index]
        rng = np.random.default_rng(seed)
        aug = self.augment
        image, label = load_image(sample.image), load_target(sample, self.data, self.task)
        fixed = aug.resize == "fixed"  # no random size: COCO fitted into the crop, the others' short side at the crop
        kind = ("lsj" if self.data == "coco" else "ade20k") if fixed else aug.resize
        image, label = random_resize(image, label, self.crop, rng, factor=1.0 if fixed else None, kind=kind)
        if aug.crop:
            img, lab, valid = random_crop(np.asarray(image), label, self.crop, rng, aug.tries, aug.fill)
        else:
            img, lab, valid = center_crop(np.asarray(image), label, self.crop, aug.fill)
        if aug.colour:
            img = photometric_distortion(img, rng)
        if aug.flip and rng.random() < 0.5:
            img, lab, valid = img[:, ::-1], lab[:, ::-1], valid[:, ::-1]
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
            "label": torch.from_numpy(np.ascontiguousarray(lab)),
            "valid": torch.from_numpy(np.ascontiguousarray(valid)),
            "source": source,
            "keep": bool((lab >= 0).any()),
        }
        if self.segments:
            item["segments"] = segment_ids(item["label"])
        return item


def collate(items: list[dict]) -> dict:
    """SegData items -> a batch: image (B, 3, C, C) uint8, label (B, C, C) int32, valid (B, C, C) bool,
    source (B,), keep (B,) bool; with segments, all images' segment ids in one tensor (sum N_i,) int32 and
    counts [N_i] (split them with .split(counts)). Few tensors, the small ones sent by value
    (common/runtime/loader.py: each tensor a worker sends costs a shared-memory descriptor); as_tensors undoes it."""
    batch = torch.utils.data.default_collate([{k: x[k] for k in ("image", "label", "valid", "source", "keep")} for x in items])
    if "segments" in items[0]:
        batch["segments"], batch["counts"] = torch.cat([x["segments"] for x in items]), [len(x["segments"]) for x in items]
    return by_value(batch)


def segment_ids(label: torch.Tensor) -> torch.Tensor:
    """(H, W) int32 targets (load_target) -> the ids of the segments present (N,), ignore (-1) left out.
    N = 0 for an image without a labelled pixel."""
    present = torch.unique(label)
    return present[present >= 0]


def mask_target(label: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W) int32 targets -> Mask2Former's: one binary mask per segment (per class for semantic) present,
    masks (N, H, W) bool, and its class, classes (N,) long. ids: segment_ids(label) when already known."""
    ids = segment_ids(label) if ids is None else ids
    return label[None] == ids[:, None, None], (ids // SEG).long()


def mask_targets(labels: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(B, H, W) int32 targets -> mask_target of each image with any labelled pixel (mask_labels (N_i, H, W)
    float, class_labels (N_i,) long), and keep (B,) bool: which images those are. Images without one must
    not reach the loss (it crashes on empty targets)."""
    targets = [mask_target(lab) for lab in labels]
    keep = [len(c) > 0 for _, c in targets]
    return ([m.float() for (m, _), k in zip(targets, keep) if k], [c for (_, c), k in zip(targets, keep) if k],
            torch.tensor(keep, device=labels.device))


def semantic_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, H, W) int32 semantic targets (load_target: class * SEG, -1 ignore) -> train ids, IGNORE (255) for ignore and padding."""
    return torch.where(labels >= 0, labels // SEG, IGNORE).long()


def split_count(spec: Path) -> tuple[Path, int | None]:
    """--synthetic FOLDER[:k] -> (FOLDER, k or None). A folder whose own name ends in :digits is taken whole."""
    head, sep, tail = str(spec).rpartition(":")
    if not sep or not tail.isdigit() or Path(spec).is_dir():
        return Path(spec), None
    if int(tail) < 1:
        raise SegGenError(f"--synthetic {spec}: k must be at least 1 (FOLDER:k takes the first k samples per source)")
    return Path(head), int(tail)


def default_folders(data: str, say) -> list[Path]:
    """Whichever of synth/masksyn-{data}, synth/imgsyn-{data} exist; one without any manifest line (a run
    that stopped before its first sample) is skipped with a warning (issue 17 item 2). An empty folder
    given with --synthetic still fails (synthetic_index)."""
    found = []
    for p in (synth_dir(m, data) for m in ("masksyn", "imgsyn")):
        if not p.is_dir():
            continue
        if not any(f.stat().st_size for f in manifest_files(p)):
            say(f"[yellow]skipping the default synthetic folder {p}: it has no samples yet[/]")
            continue
        found.append(p)
    return found


def check_once(folders: list[Path]) -> None:
    """Each --synthetic folder once: a folder given twice would double its share of the draws."""
    seen: dict[str, Path] = {}
    for folder in folders:
        key = os.path.realpath(folder)
        if key in seen:
            raise SegGenError(f"--synthetic {folder} is given twice (as {seen[key]} too), which would double its share: "
                              f"pass each folder once (FOLDER:k takes fewer samples per source)")
        seen[key] = folder


def check_made_for(folder: Path, samples, data: str) -> None:
    """A synthetic folder drawn for another dataset (its manifest's settings.data) is refused: its label values
    mean other classes under --data."""
    made_for = (samples[0].meta.get("settings") or {}).get("data") if len(samples) else None
    if made_for is not None and made_for != data:
        raise SegGenError(f"--synthetic {folder} was drawn for --data {made_for} (its manifest's settings), not --data {data}: "
                          f"pass a folder made for {data}, or --data {made_for}")


def read_sources(a, say) -> tuple[list, list[list], list[Path]]:
    """(real training samples, one sample list per synthetic folder, the folders) of train_seg's options
    `a` (--strategy, --synthetic, --max-real-samples ...), checked before any model."""
    real, synthetic, folders = [], [], []
    if a.strategy != "synthetic":
        real = read_dataset(a.data, a.data_root, "train")
        if getattr(a, "real_subset", None) is not None:  # the one subset every stage trains on (common/data/subset.py)
            real = subset.apply(real, a.real_subset)
        if a.max_real_samples is not None:  # Table 4's low-data ablation: a fixed random subset
            keep = np.random.default_rng(a.seed).permutation(len(real))[:a.max_real_samples]
            real = [real[i] for i in sorted(keep)]
    if a.strategy not in ("real", "real-pretrain"):
        folders = list(a.synthetic) or default_folders(a.data, say)
        if not folders:
            raise SegGenError(
                f"--strategy {a.strategy.value} needs synthetic data, but neither {synth_dir('masksyn', a.data)} nor "
                f"{synth_dir('imgsyn', a.data)} exists with samples: run masksyn.py / imgsyn.py first, pass --synthetic FOLDER, or use --strategy real")
        folders, counts = zip(*(split_count(f) for f in folders))
        folders = list(folders)
        check_once(folders)
        for folder, k in zip(folders, counts):
            ensure_finalized(folder, say)  # a sharded run's folder: its index etc. written once (common/synthesis/finalize.py)
            samples = synthetic_index(folder)  # numpy arrays: records read when loaded, workers share it (issue 18)
            if k is not None:  # Fig. 8 / Table 8 / A.6 count ablations without regenerating
                samples = first_per_source(samples, k)
            if getattr(a, "synthetic_filtered", False):  # FreeMask's noisy-region filter (quality.py --filter)
                samples = quality.filtered_samples(folder, samples)
            check_made_for(folder, samples, a.data)
            probe_synthetic(folder, samples, a.data)
            synthetic.append(samples)
    elif a.synthetic:
        say(f"[yellow]--strategy {a.strategy.value}: ignoring {len(a.synthetic)} --synthetic folder(s)[/]")
    return real, synthetic, folders


def synthetic_weights(folders: list[Path], synthetic: list[list[Sample]], data: str, sampling: str) -> np.ndarray | None:
    """(sum of the folders' sizes,) probabilities of drawing each synthetic sample (MixedBatches' order:
    folder after folder), or None for §3.4's uniform draw. "hardness": FreeMask's resampling within each
    folder (common.seg.quality.sampling_probabilities), each folder's share kept at its share of the samples
    as under the uniform draw."""
    if sampling == "uniform":
        return None
    total = sum(len(s) for s in synthetic)
    classes = len(class_names(data))
    return np.concatenate([quality.sampling_probabilities(f, s, classes) * len(s) / total for f, s in zip(folders, synthetic)])
