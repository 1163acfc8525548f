"""Train Mask2Former on real + synthetic data (paper §3.4, §4.1, appendix A.3) and evaluate it.

    accelerate launch train_seg.py --data ade20k --strategy aug --p-aug 0.6      # -> runs/seg-ade20k-aug/
    accelerate launch train_seg.py --data ade20k --strategy real                  # the baseline
    accelerate launch train_seg.py ... --resume latest                            # continue a stopped run
    python train_seg.py --eval-only --checkpoint runs/seg-ade20k-aug/model --multiscale

The paper's two ways of using synthetic data (§3.4):
- `aug` (ADE20K, the default there): in every iteration each real sample of the batch is replaced by a
  synthetic sample, drawn uniformly from all given synthetic folders, with probability p_aug = 0.6
  (p_aug = 0 is `real`, 1 is `synthetic`).
- `pretrain` (COCO): train on synthetic data only, then fine-tune on real data only, each for --max-steps
  (Table 6: 160k + 160k), with a fresh optimizer and schedule for the second phase.
- `real`: the baseline; `synthetic`: synthetic only (Table 5, against DiffuMask).

The model is transformers' Mask2FormerForUniversalSegmentation (detectron2 is not installable here),
trained with the official Mask2Former recipes (A.3: "we keep the official training hyper-parameters"):
AdamW lr 1e-4, weight decay 0.05 (none on norms and embeddings), backbone lr x 0.1, poly schedule
(power 0.9), full-model gradient clipping at norm 0.01, batch 16.
- ADE20K semantic: 160k iterations; short side resized to one of int(x * 0.1 * crop), x = 5..20, crop (512,
  Swin-L 640), photometric distortion, flip; ignore label 255 (ADE20K class 0), classes 0..149.
- COCO panoptic (or --task instance, things only): 50 epochs (368,750 iterations); large-scale jitter
  (0.1-2.0) at 1024, flip; one target mask per panoptic segment, crowd regions left out; 133 classes.

Evaluation is done at each image's original resolution (transformers' post-processing resizes to
384x384 first, so it is not used): short side resized to --eval-size, mask logits upsampled back to the
image, then Mask2Former's inference: semantic (softmax(class) . sigmoid(mask)) -> mIoU, per-class IoU,
pixel accuracy (optionally flip + multi-scale); panoptic -> PQ / SQ / RQ, things and stuff; instance
(top-100 query-class pairs) -> mask AP through pycocotools. Metrics: common/metrics.py.

The run folder holds options.json, stats.jsonl (loss, lr, it/s, what was drawn from where),
checkpoints/phase{k}-step{N}/ (accelerate state + config.json: loadable with from_pretrained),
model/ (the final model + image processor) and metrics.json.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from enum import Enum
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
import typer
from PIL import Image
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from common import SegGenError
from common.cli import Data, MixedPrecision, Tracker
from common.colormap import IGNORE, ade20k_classes, coco_categories
from common.datasets import (
    Sample,
    default_data_root,
    load_image,
    load_label,
    load_panoptic,
    read_dataset,
    read_synthetic,
)
from common.metrics import MaskAP, PanopticQuality, SemanticMetrics
from common.paths import seg_run_dir, synth_dir

console = Console(stderr=True, soft_wrap=True)
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
_CONFIGS = Path(__file__).parent / "common" / "data"


class Strategy(str, Enum):
    real = "real"
    aug = "aug"
    pretrain = "pretrain"
    synthetic = "synthetic"


class Task(str, Enum):
    semantic = "semantic"
    panoptic = "panoptic"
    instance = "instance"


class Backbone(str, Enum):
    r50 = "r50"
    swin_t = "swin-t"
    swin_l = "swin-l"


# ---------------------------------------------------------------- labels

def ade20k_train_ids() -> np.ndarray:
    """(256,) uint8 lookup: ADE20K PNG value -> train id; 0 (other) -> 255 (ignored), v -> v - 1."""
    lut = np.full(256, IGNORE, np.uint8)
    for c in ade20k_classes():
        lut[c["png_value"]] = c["train_id"]
    return lut


def coco_train_ids() -> np.ndarray:
    """(256,) uint8 lookup: COCO panoptic category id -> contiguous train id 0..132 (sorted by id); void -> 255."""
    lut = np.full(256, IGNORE, np.uint8)
    for i, c in enumerate(sorted(coco_categories(), key=lambda c: c["id"])):
        lut[c["id"]] = i
    return lut


def class_names(data: str) -> list[str]:
    if data == "ade20k":
        return [c["name"] for c in sorted(ade20k_classes(), key=lambda c: c["train_id"])]
    return [c["name"] for c in sorted(coco_categories(), key=lambda c: c["id"])]


def thing_train_ids(data: str) -> set[int]:
    """Train ids of the "thing" classes (COCO); none for ADE20K semantic."""
    if data == "ade20k":
        return set()
    return {i for i, c in enumerate(sorted(coco_categories(), key=lambda c: c["id"])) if c["isthing"]}


def load_train_label(sample: Sample, data: str) -> np.ndarray:
    """(H, W) uint8 semantic train ids, 255 = ignore (checks values and size through common.datasets)."""
    lut = ade20k_train_ids() if data == "ade20k" else coco_train_ids()
    return lut[load_label(sample, data)]


# Training targets of every task in one int32 map: class * SEG + k for the k-th segment of the image
# (k = 0 for semantic targets: one mask per class), -1 = ignore (ADE20K class 0, COCO void and crowd).
SEG = 1000


def load_target(sample: Sample, data: str, task: str) -> np.ndarray:
    """(H, W) int32 training target of `sample` for `task` (semantic, panoptic, instance)."""
    if data == "ade20k" or task == "semantic":
        label = load_train_label(sample, data).astype(np.int32)
        return np.where(label == IGNORE, -1, label * SEG)
    ids = load_panoptic(sample)
    lut, things = coco_train_ids(), thing_train_ids(data)
    target = np.full(ids.shape, -1, np.int32)
    for k, seg in enumerate(sample.segments or [], 1):
        cls = int(lut[seg["category_id"]])
        # Mask2Former (detectron2's panoptic mapper) leaves crowd regions out of the targets; the
        # instance task keeps things only.
        if seg.get("iscrowd", 0) or (task == "instance" and cls not in things):
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


# ---------------------------------------------------------------- §3.4: which samples each iteration sees

class MixedBatches(torch.utils.data.Sampler):
    """The per-process batches of iterations start..stop, as lists of (source, index, augmentation seed).

    Source 0 is the real training set, source k >= 1 the k-th synthetic folder. Each real slot of the
    batch is replaced by a synthetic sample with probability p_aug (§3.4), drawn uniformly from the union
    of all synthetic folders. Real samples are seen in a fresh random order every epoch, shared by the
    processes (process r takes slots r*B..r*B+B-1 of each global batch). Everything is a function of
    (seed, step, rank), so a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, n_real: int, n_synthetic: list[int], batch: int, p_aug: float, seed: int,
                 start: int, stop: int, rank: int = 0, world: int = 1):
        if not 0.0 <= p_aug <= 1.0:
            raise SegGenError(f"--p-aug must lie in [0, 1] (got {p_aug})")
        if p_aug > 0 and sum(n_synthetic) == 0:
            raise SegGenError("p_aug > 0 needs synthetic samples: pass --synthetic FOLDER (or --strategy real)")
        if p_aug < 1 and n_real == 0:
            raise SegGenError("no real training samples (check --data-root / --max-real-samples)")
        self.n_real, self.batch, self.p_aug, self.seed = n_real, batch, p_aug, seed
        self.offsets = np.concatenate([[0], np.cumsum(n_synthetic)]).astype(np.int64)
        self.start, self.stop, self.rank, self.world = start, stop, rank, world

    @lru_cache(maxsize=2)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 0, epoch]).permutation(self.n_real)

    def draw(self, step: int) -> list[tuple[int, int, int]]:
        rng = np.random.default_rng([self.seed, 1, step, self.rank])
        replace = rng.random(self.batch) < self.p_aug
        synth = rng.integers(0, max(int(self.offsets[-1]), 1), self.batch)
        aug_seeds = rng.integers(0, 2**62, self.batch)
        out = []
        for i in range(self.batch):
            if replace[i]:
                k = int(np.searchsorted(self.offsets, synth[i], side="right")) - 1
                out.append((k + 1, int(synth[i] - self.offsets[k]), int(aug_seeds[i])))
            else:
                epoch, j = divmod((step * self.world + self.rank) * self.batch + i, self.n_real)
                out.append((0, int(self._order(epoch)[j]), int(aug_seeds[i])))
        return out

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.draw(step)

    def __len__(self) -> int:
        return self.stop - self.start


# ---------------------------------------------------------------- augmentation (Mask2Former's ADE20K recipe)

def random_resize(image: Image.Image, label: np.ndarray, crop: int, rng, lsj: bool = False,
                  factor: float | None = None) -> tuple[Image.Image, np.ndarray]:
    """ADE20K: detectron2's ResizeShortestEdge as Mask2Former configures it: the short side drawn from
    the 16 sizes int(x * 0.1 * crop), x = 5..20 ("choice" sampling: 256, 281, .., 1024 at 512), the long
    side at most 4 x crop (2048). COCO (lsj, large-scale jitter): the image fitted into U(0.1, 2.0) x
    crop squared. A given `factor` replaces the random draw."""
    w, h = image.size
    if factor is None:
        factor = rng.uniform(0.1, 2.0) if lsj else int(rng.integers(5, 21) * 0.1 * crop) / crop
    if lsj:
        scale = factor * crop / max(w, h)
    else:
        scale = min(factor * crop / min(w, h), 4 * crop / max(w, h))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.BILINEAR), np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))


def crop_window(image: np.ndarray, label: np.ndarray, y: int, x: int, crop: int):
    """The crop x crop window at (y, x): image (crop, crop, 3) uint8 padded with grey 128, label
    (crop, crop) int32 padded with ignore -1, valid (crop, crop) bool (False on the padding) — the
    padding of Mask2Former's semantic mapper, where the image is smaller than the crop."""
    img, lab = image[y:y + crop, x:x + crop], label[y:y + crop, x:x + crop]
    out_img = np.full((crop, crop, 3), 128, np.uint8)
    out_lab = np.full((crop, crop), -1, np.int32)
    valid = np.zeros((crop, crop), bool)
    out_img[:img.shape[0], :img.shape[1]] = img
    out_lab[:lab.shape[0], :lab.shape[1]] = lab
    valid[:img.shape[0], :img.shape[1]] = True
    return out_img, out_lab, valid


def random_crop(image: np.ndarray, label: np.ndarray, crop: int, rng, tries: int = 10):
    """A random crop_window; among up to `tries` windows the first with a labelled pixel, so that few
    crops arrive empty (an image without targets is left out of the loss: see mask_targets)."""
    h, w = label.shape
    for _ in range(tries):
        y, x = rng.integers(0, max(h - crop, 0) + 1), rng.integers(0, max(w - crop, 0) + 1)
        if (label[y:y + crop, x:x + crop] >= 0).any():
            break
    return crop_window(image, label, y, x, crop)


def center_crop(image: np.ndarray, label: np.ndarray, crop: int):
    """The centre crop_window."""
    h, w = label.shape
    return crop_window(image, label, max(h - crop, 0) // 2, max(w - crop, 0) // 2, crop)


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


class SegData(torch.utils.data.Dataset):
    """Decodes and augments one (source, index, seed) from MixedBatches.

    Returns image (3, crop, crop) uint8, label (crop, crop) int32 targets (see load_target; -1 = ignore
    and padding), valid (crop, crop) bool (False on padding), source. ADE20K: Mask2Former's ADE20K
    recipe; COCO: its large-scale jitter recipe (resize, crop, flip; no colour jitter)."""

    def __init__(self, sources: list[list[Sample]], data: str, crop: int, augment: bool = True, task: str = "semantic"):
        self.sources, self.data, self.crop, self.augment, self.task = sources, data, crop, augment, task

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def __getitem__(self, key):
        source, index, seed = key
        sample = self.sources[source][index]
        rng = np.random.default_rng(seed)
        image, label = load_image(sample.image), load_target(sample, self.data, self.task)
        lsj = self.data == "coco"
        if self.augment:
            image, label = random_resize(image, label, self.crop, rng, lsj)
            img, lab, valid = random_crop(np.asarray(image), label, self.crop, rng)
        else:  # A.9's ablation without augmentation: scale 1 and the centre window
            image, label = random_resize(image, label, self.crop, rng, lsj, factor=1.0)
            img, lab, valid = center_crop(np.asarray(image), label, self.crop)
        if self.augment:
            if not lsj:
                img = photometric_distortion(img, rng)
            if rng.random() < 0.5:
                img, lab, valid = img[:, ::-1], lab[:, ::-1], valid[:, ::-1]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
            "label": torch.from_numpy(np.ascontiguousarray(lab)),
            "valid": torch.from_numpy(np.ascontiguousarray(valid)),
            "source": source,
        }


def mask_targets(labels: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(B, H, W) int32 targets (load_target) -> Mask2Former targets: per image one binary mask per
    segment (per class for semantic) present (mask_labels (N_i, H, W) float, class_labels (N_i,) long),
    and keep (B,) bool: images with any labelled pixel. Images without one must not reach the loss (it
    crashes on empty targets)."""
    masks, classes, keep = [], [], []
    for lab in labels:
        present = torch.unique(lab)
        present = present[present >= 0]
        keep.append(len(present) > 0)
        if len(present):
            classes.append((present // SEG).long())
            masks.append((lab[None] == present[:, None, None]).float())
    return masks, classes, torch.tensor(keep, device=labels.device)


# ---------------------------------------------------------------- model

def build_model(model: str | None, backbone: Backbone | None, data: str):
    """(Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor) from a hub id / folder, or the
    paper's configuration of `backbone` with random weights (no download)."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        ResNetConfig,
    )

    names = class_names(data)
    id2label = dict(enumerate(names))
    label2id = {v: k for k, v in id2label.items()}
    if model is not None:
        try:
            net = Mask2FormerForUniversalSegmentation.from_pretrained(
                model, num_labels=len(names), id2label=id2label, label2id=label2id, ignore_mismatched_sizes=True)
        except (OSError, ValueError) as e:
            raise SegGenError(f"--model {model}: cannot load a Mask2Former checkpoint from it ({str(e).splitlines()[0]})") from e
        try:
            processor = Mask2FormerImageProcessor.from_pretrained(model)
        except (OSError, ValueError):
            processor = Mask2FormerImageProcessor(ignore_index=IGNORE, do_reduce_labels=False)
        return net, processor
    if backbone == Backbone.r50:
        # Mask2Former's R50 ADE20K config: the Swin-T head (same hidden sizes, queries, layers) on ResNet-50.
        cfg = json.loads((_CONFIGS / "mask2former_swin_tiny_ade_semantic_config.json").read_text())
        cfg["backbone_config"] = ResNetConfig(
            depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck",
            out_features=["stage1", "stage2", "stage3", "stage4"]).to_dict()
    else:
        name = {Backbone.swin_t: "tiny", Backbone.swin_l: "large"}[backbone]
        cfg = json.loads((_CONFIGS / f"mask2former_swin_{name}_ade_semantic_config.json").read_text())
    cfg.update(num_labels=len(names), id2label=id2label, label2id=label2id)
    if data == "coco" and backbone == Backbone.swin_l:
        cfg["num_queries"] = 200  # Mask2Former's COCO Swin-L (IN21k, 384) configs use 200 queries
    config = Mask2FormerConfig.from_dict(cfg)
    return Mask2FormerForUniversalSegmentation(config), Mask2FormerImageProcessor(ignore_index=IGNORE, do_reduce_labels=False)


def freeze_unused(model) -> None:
    """The Swin backbone's final LayerNorm only feeds its pooled output, which Mask2Former never uses:
    it gets no gradient, and DistributedDataParallel refuses such parameters unless it searches the
    graph for them every step (find_unused_parameters). Freezing it costs nothing."""
    encoder = model.model.pixel_level_module.encoder
    for name in ("swin", "embeddings"):
        norm = getattr(getattr(encoder, name, None), "layernorm", None)
        if isinstance(norm, torch.nn.LayerNorm):
            norm.requires_grad_(False)


def param_groups(model, lr: float, weight_decay: float, backbone_multiplier: float) -> list[dict]:
    """Mask2Former's optimizer groups (its build_optimizer): backbone lr x 0.1; no weight decay on norm
    layers, nn.Embedding (queries, level embeddings) and Swin's relative position bias tables."""
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm, torch.nn.Embedding)
    backbone = model.model.pixel_level_module.encoder
    backbone_ids = {id(p) for p in backbone.parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            no_decay = isinstance(module, norm_types) or name in ("relative_position_bias_table", "absolute_pos_embed")
            groups.setdefault((id(p) in backbone_ids, no_decay), []).append(p)
    return [
        {"params": ps, "lr": lr * (backbone_multiplier if in_backbone else 1.0), "weight_decay": 0.0 if no_decay else weight_decay}
        for (in_backbone, no_decay), ps in groups.items()
    ]


# ---------------------------------------------------------------- evaluation at the original resolution

@torch.no_grad()
def predict(model, image: torch.Tensor, short: int, max_long: int, flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, H, W) normalised image -> class probabilities (Q, C + 1) and mask logits (Q, H, W) at the
    original resolution.

    Short side resized to `short` (long side at most max_long), padded to a multiple of 32; the mask
    logits upsampled to the padded input, cropped, upsampled to (H, W), as detectron2's
    sem_seg_postprocess does (transformers' post-processing would go through 384x384 instead)."""
    _, h, w = image.shape
    scale = min(short / min(h, w), max_long / max(h, w))
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
    if flip:
        x = x.flip(-1)
    ph, pw = math.ceil(size[0] / 32) * 32, math.ceil(size[1] / 32) * 32
    x = F.pad(x, (0, pw - size[1], 0, ph - size[0]))
    mask = torch.zeros(1, ph, pw, dtype=torch.long, device=x.device)
    mask[:, :size[0], :size[1]] = 1
    out = model(pixel_values=x, pixel_mask=mask)
    masks = F.interpolate(out.masks_queries_logits.float(), size=(ph, pw), mode="bilinear", align_corners=False)
    masks = masks[..., :size[0], :size[1]]  # the padding is on the right and bottom of the (flipped) input
    if flip:
        masks = masks.flip(-1)
    masks = F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)[0]  # (Q, H, W)
    return out.class_queries_logits.float().softmax(-1)[0], masks


def semantic_inference(classes: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mask2Former's semantic inference: class probabilities (Q, C + 1) without "no object", times mask
    probabilities (Q, H, W), summed over queries -> (C, H, W) class scores."""
    return torch.einsum("qc,qhw->chw", classes[:, :-1], masks.sigmoid())


def semantic_scores(model, image: torch.Tensor, short: int, flip: bool = False, max_long: int | None = None) -> torch.Tensor:
    """(C, H, W) class scores of one view at the original resolution."""
    return semantic_inference(*predict(model, image, short, max_long or 4 * short, flip))


def panoptic_inference(classes: torch.Tensor, masks: torch.Tensor, things: set[int],
                       object_threshold: float = 0.8, overlap_threshold: float = 0.8) -> tuple[torch.Tensor, list[dict]]:
    """Mask2Former's panoptic inference: queries whose best class is not "no object" and scores above
    object_threshold; each pixel to the query of highest score x mask probability; segments that keep
    less than overlap_threshold of their own mask dropped; stuff of one class merged.
    Returns (H, W) segment ids (0 = void) and [{"id", "category" (train id), "isthing"}]."""
    scores, labels = classes.max(-1)
    keep = (labels != classes.shape[-1] - 1) & (scores > object_threshold)
    scores, labels, probs = scores[keep], labels[keep], masks[keep].sigmoid()
    seg = torch.zeros(masks.shape[-2:], dtype=torch.int32, device=masks.device)
    segments: list[dict] = []
    if len(labels) == 0:
        return seg, segments
    owner = (scores[:, None, None] * probs).argmax(0)
    stuff_ids: dict[int, int] = {}
    for k, cls in enumerate(labels.tolist()):
        mine = owner == k
        own = probs[k] >= 0.5
        area, original = int(mine.sum()), int(own.sum())
        region = mine & own
        if area == 0 or original == 0 or not bool(region.any()) or area / original < overlap_threshold:
            continue
        if cls not in things and cls in stuff_ids:
            seg[region] = stuff_ids[cls]
            continue
        sid = len(segments) + 1
        seg[region] = sid
        segments.append({"id": sid, "category": cls, "isthing": cls in things})
        if cls not in things:
            stuff_ids[cls] = sid
    return seg, segments


def instance_inference(classes: torch.Tensor, masks: torch.Tensor, things: set[int] | None, topk: int = 100):
    """Mask2Former's instance inference: the top-k (query, class) pairs by class probability (things
    only for a panoptic model), binary masks at logit 0, score = class probability x mean mask
    probability inside the mask. Returns masks (K, H, W) bool, scores (K,), train ids (K,)."""
    num_classes = classes.shape[-1] - 1
    flat = classes[:, :-1].flatten()
    scores, idx = flat.topk(min(topk, len(flat)))
    query, labels = idx // num_classes, idx % num_classes
    if things is not None:
        keep = torch.tensor([int(c) in things for c in labels.tolist()], dtype=torch.bool, device=labels.device)
        scores, query, labels = scores[keep], query[keep], labels[keep]
    logits = masks[query]
    binary = logits > 0
    mask_scores = (logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return binary, scores * mask_scores, labels


def evaluate(model, samples: list[Sample], data: str, size: int, mean, std, accelerator, multiscale: bool,
             progress=None, task: str = "semantic") -> dict:
    """The metrics of `task` over `samples` (each process takes every world_size-th, results combined):
    semantic mIoU; panoptic PQ (+ AP of the things and mIoU, the paper's Table 2); instance mask AP."""
    from accelerate.utils import gather_object

    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    device = accelerator.device
    names = class_names(data)
    semantic = SemanticMetrics(len(names), IGNORE, names) if task in ("semantic", "panoptic") else None
    cats = sorted(coco_categories(), key=lambda c: c["id"]) if data == "coco" else []
    categories = {c["id"]: bool(c["isthing"]) for c in cats}
    pq = PanopticQuality(categories) if task == "panoptic" else None
    ap = MaskAP(categories) if task in ("panoptic", "instance") else None
    things = thing_train_ids(data)
    mean_t = torch.tensor(mean, device=device).view(3, 1, 1) * 255
    std_t = torch.tensor(std, device=device).view(3, 1, 1) * 255
    max_long = 4 * size if data == "ade20k" else round(size * 1333 / 800)  # detectron2's test sizes
    # (short side, long side at most, flip) per view. Multi-scale is Mask2Former's TEST.AUG: short sides
    # 0.5..1.75 x size, each as is and flipped, all with the one long-side limit 7 x size (3584 at 512).
    views = [(round(size * s), 7 * size, f) for s in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) for f in (False, True)] \
        if multiscale else [(size, max_long, False)]
    mine = list(enumerate(samples))[accelerator.process_index::accelerator.num_processes]
    bar = progress.add_task("evaluating" + (" (multi-scale + flip)" if multiscale else ""), total=len(mine)) if progress else None
    for image_id, sample in mine:
        image = torch.from_numpy(np.asarray(load_image(sample.image)).copy()).to(device).permute(2, 0, 1).float()
        image = (image - mean_t) / std_t
        with accelerator.autocast():
            if task == "semantic":
                scores = sum(semantic_scores(net, image, short, f, long) for short, long, f in views)
            else:
                classes, masks = predict(net, image, size, max_long)
                scores = semantic_inference(classes, masks)
        if semantic is not None:
            semantic.update(scores.argmax(0), torch.from_numpy(load_train_label(sample, data)).to(device))
        if pq is not None or ap is not None:
            gt_ids = load_panoptic(sample)
        if pq is not None:
            seg, segs = panoptic_inference(classes, masks, things)
            pq.update(gt_ids, sample.segments, seg.cpu().numpy(),
                      [{"id": x["id"], "category_id": cats[x["category"]]["id"]} for x in segs])
        if ap is not None:
            ap.add_ground_truth(image_id, gt_ids, sample.segments)
            binary, inst_scores, labels = instance_inference(classes, masks, things if task == "panoptic" else None)
            ap.add_predictions(image_id, binary.cpu().numpy(), inst_scores.tolist(), [cats[c]["id"] for c in labels.tolist()])
        if progress:
            progress.advance(bar)
    if progress:
        progress.remove_task(bar)
    result = {}
    if semantic is not None:
        semantic.confmat = accelerator.reduce(semantic.confmat.to(device), reduction="sum").cpu()
        result.update(semantic.compute())
    if pq is not None:
        if accelerator.num_processes > 1:
            pq = merged(PanopticQuality(categories), gather_object([pq]))
        got = pq.compute()
        name_of = {c["id"]: c["name"] for c in cats}
        got["per_class"] = {name_of[k]: v for k, v in got["per_class"].items()}
        result["panoptic"] = got
    if ap is not None:
        if accelerator.num_processes > 1:
            ap = merged(MaskAP(categories), gather_object([ap]))
        result["instance"] = ap.compute()
    net.train(was_training)
    return result


def merged(total, parts: list):
    """`total` with every process's accumulator (gather_object's list) merged into it."""
    for part in parts:
        total.merge(part)
    return total


def evaluate_scales(model, val: list[Sample], a, eval_size: int, mean, std, accelerator) -> dict:
    """{"single_scale": metrics} and, with --multiscale, {"multi_scale": metrics (flip + 6 scales)}."""
    out = {}
    with progress_bar(accelerator.is_main_process) as progress:
        out["single_scale"] = evaluate(model, val, a.data, eval_size, mean, std, accelerator, False, progress, a.task)
        if a.multiscale:
            out["multi_scale"] = evaluate(model, val, a.data, eval_size, mean, std, accelerator, True, progress, a.task)
    return out


# ---------------------------------------------------------------- run folder

def checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders in training order: checkpoints/phase{k}-step{N}."""
    found = {p: json.loads((p / "state.json").read_text()) for p in (output_dir / "checkpoints").glob("phase*-step*")
             if (p / "state.json").is_file()}
    return sorted(found, key=lambda p: (found[p]["phase"], found[p]["step"]))


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoints(output_dir)
        return found[-1] if found else None  # nothing yet: start from scratch
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise SegGenError(f"--resume {resume}: not a checkpoint folder of train_seg.py (no state.json); use 'latest' or checkpoints/phase*-step*")
    return path


def print_metrics(title: str, scores: dict) -> None:
    """The paper's columns in %: mIoU (Table 1); PQ, PQ^Th, PQ^St, AP^Th_pan, mIoU_pan (Table 2); AP (Table 3)."""
    cols: dict[str, float | int] = {}
    if "panoptic" in scores:
        p = scores["panoptic"]
        cols.update({"PQ": p["PQ"], "SQ": p["SQ"], "RQ": p["RQ"], "PQ th": p["PQ_th"], "PQ st": p["PQ_st"]})
    if "instance" in scores:
        cols.update({"AP": scores["instance"]["AP"], "AP50": scores["instance"]["AP50"]})
    if "mIoU" in scores:
        cols.update({"mIoU": scores["mIoU"], "pixel acc.": scores["pixel_accuracy"], "mean acc.": scores["mean_accuracy"]})
    table = Table(title=title)
    for col in cols:
        table.add_column(col, justify="right")
    table.add_row(*(f"{100 * v:.2f}" for v in cols.values()))
    console.print(table)


def save_checkpoint(accelerator, net, processor, output_dir: Path, state: dict, keep: int) -> None:
    """checkpoints/phase{k}-step{N}: accelerate state (model.safetensors, optimizer, scheduler, RNG) +
    config.json and the image processor, so from_pretrained (and --eval-only --checkpoint) loads it."""
    path = output_dir / "checkpoints" / f"phase{state['phase']}-step{state['step']:07d}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        accelerator.unwrap_model(net).config.save_pretrained(path)
        processor.save_pretrained(path)
        (path / "state.json").write_text(json.dumps(state))
        for old in checkpoints(output_dir)[:-keep] if keep else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


class _Rate(TextColumn):
    def render(self, task):
        return f"{task.speed or 0:.2f} it/s"


def progress_bar(enabled: bool):
    """A transient rich bar with count, it/s, elapsed and ETA on the main process; None elsewhere."""
    if not enabled:
        return nullcontext(None)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(""), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=True)


def finish(result: dict, output_dir: Path, main_proc: bool, metrics_file: Path | None) -> dict:
    if main_proc:
        path = metrics_file or output_dir / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print_metrics("single-scale", result["single_scale"])
        if "multi_scale" in result:
            print_metrics("multi-scale + flip", result["multi_scale"])
        console.print(f"[green]done[/]: metrics in {path}")
    return result


# ---------------------------------------------------------------- main

def run(a) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    a.data = a.data.value
    # Paper defaults per dataset (§4.2, A.3): ADE20K semantic with synthetic augmentation, 160k
    # iterations, crop 512 (Swin-L 640); COCO panoptic with synthetic pre-training, 50 epochs
    # (368,750 iterations at batch 16), large-scale jitter at 1024, tested at short side 800.
    a.task = (a.task.value if a.task else "semantic" if a.data == "ade20k" else "panoptic")
    a.strategy = a.strategy or (Strategy.aug if a.data == "ade20k" else Strategy.pretrain)
    a.max_steps = a.max_steps or (160_000 if a.data == "ade20k" else 368_750)
    if a.data == "ade20k" and a.task != "semantic":
        raise SegGenError(f"--task {a.task} needs COCO panoptic data (--data coco); ADE20K is trained for semantic segmentation")
    if a.multiscale and a.task != "semantic":
        raise SegGenError("--multiscale is for semantic segmentation (the paper's ADE20K m.s. column)")
    if a.model is not None and a.backbone is not None:
        raise SegGenError("pass either --model (a checkpoint) or --backbone (a fresh paper configuration), not both")
    if a.eval_only and a.checkpoint is None:
        raise SegGenError("--eval-only needs --checkpoint DIR (a model/ or checkpoints/phase*-step* folder of a run)")
    data_root = a.data_root if a.data_root is not None else default_data_root()
    output_dir = a.output_dir or seg_run_dir(a.data, a.strategy.value)
    accelerator = Accelerator(mixed_precision=a.mixed_precision, step_scheduler_with_optimizer=False,
                              log_with="tensorboard" if a.report_to == "tensorboard" else None, project_dir=str(output_dir))
    main_proc = accelerator.is_main_process
    say = console.print if main_proc else (lambda *x, **k: None)

    # ---- data (every check before any heavy work)
    val = read_dataset(a.data, data_root, "val")
    real, synthetic, folders = [], [], []
    if not a.eval_only:
        if a.strategy != Strategy.synthetic:
            real = read_dataset(a.data, data_root, "train")
            if a.max_real_samples is not None:  # Table 4's low-data ablation: a fixed random subset
                keep = np.random.default_rng(a.seed).permutation(len(real))[:a.max_real_samples]
                real = [real[i] for i in sorted(keep)]
        if a.strategy != Strategy.real:
            folders = list(a.synthetic) or [p for p in (synth_dir(m, a.data) for m in ("masksyn", "imgsyn")) if p.is_dir()]
            if not folders:
                raise SegGenError(
                    f"--strategy {a.strategy.value} needs synthetic data, but neither {synth_dir('masksyn', a.data)} nor "
                    f"{synth_dir('imgsyn', a.data)} exists: run masksyn.py / imgsyn.py first, pass --synthetic FOLDER, or use --strategy real")
            for folder in folders:
                samples = read_synthetic(folder)
                probe_synthetic(folder, samples, a.data)
                synthetic.append(samples)
        elif a.synthetic:
            say(f"[yellow]--strategy real: ignoring {len(a.synthetic)} --synthetic folder(s)[/]")
        if a.strategy == Strategy.pretrain:  # Table 6: 160k on synthetic, then 160k on real
            phases = [("pretrain-synthetic", 1.0, a.pretrain_steps or a.max_steps), ("finetune-real", 0.0, a.max_steps)]
        else:
            phases = [(a.strategy.value, {"real": 0.0, "aug": a.p_aug, "synthetic": 1.0}[a.strategy.value], a.max_steps)]
        if a.batch_size % accelerator.num_processes:
            raise SegGenError(f"--batch-size {a.batch_size} (the global batch) must be a multiple of the {accelerator.num_processes} processes")
        for _, p, _ in phases:  # the sampler checks p and the sources before any model is built
            MixedBatches(len(real), [len(s) for s in synthetic], 1, p, a.seed, 0, 0)
        resume_from = resolve_resume(a.resume, output_dir)

    # ---- model
    set_seed(a.seed)
    model_src = str(a.checkpoint) if a.eval_only else a.model
    net, processor = build_model(model_src, None if model_src else (a.backbone or Backbone.r50), a.data)
    freeze_unused(net)
    mean, std = processor.image_mean, processor.image_std
    crop = a.crop or (1024 if a.data == "coco" else 640 if a.backbone == Backbone.swin_l else 512)
    eval_size = a.eval_size or (800 if a.data == "coco" else crop)
    say(f"Mask2Former ({model_src or (a.backbone or Backbone.r50).value + ' from config'}, "
        f"{sum(p.numel() for p in net.parameters()) / 1e6:.1f} M parameters) on {a.data}; "
        f"{accelerator.num_processes} process(es) on {accelerator.device}, mixed precision {accelerator.mixed_precision}")
    say(f"  data root {data_root}: {len(real)} real training, {len(val)} validation images; synthetic: "
        + (", ".join(f"{f} ({len(s)})" for f, s in zip(folders, synthetic)) or "none"))
    say(f"  output {output_dir}")

    if a.eval_only:
        result = {"data": a.data, "task": a.task, "checkpoint": str(a.checkpoint)}
        result.update(evaluate_scales(accelerator.prepare(net), val, a, eval_size, mean, std, accelerator))
        return finish(result, output_dir, main_proc, a.metrics_file)

    if main_proc:
        output_dir.mkdir(parents=True, exist_ok=True)
        # Enums are str subclasses and encode as their values; paths as strings.
        (output_dir / "options.json").write_text(json.dumps(vars(a), indent=1, default=str))
    if a.report_to == "tensorboard":
        accelerator.init_trackers("train_seg")
    per_proc = a.batch_size // accelerator.num_processes
    dataset = SegData([real, *synthetic], a.data, crop, augment=not a.no_augment, task=a.task)
    source_names = ["real", *[str(f) for f in folders]]
    # Per-process counts: samples drawn from each source, then images left out for having no label.
    counts = torch.zeros(len(source_names) + 1, dtype=torch.long)
    skipped_steps = 0  # the same on every process

    def totals() -> dict:  # a collective: every process calls it
        c = accelerator.reduce(counts.to(accelerator.device), "sum").cpu().tolist()
        return {"drawn": dict(zip(source_names, c[:-1])), "skipped_images": c[-1], "skipped_steps": skipped_steps}
    start_phase, start_step = 0, 0
    if resume_from is not None:
        state = json.loads((resume_from / "state.json").read_text())
        start_phase, start_step = state["phase"], state["step"]
        if main_proc:  # the run's totals so far, counted once
            counts = torch.tensor([state["drawn"].get(n, 0) for n in source_names] + [state["skipped_images"]], dtype=torch.long)
        skipped_steps = state["skipped_steps"]
        say(f"resuming from {resume_from} (phase {start_phase + 1}, step {start_step})")
    stats = open(output_dir / "stats.jsonl", "a") if main_proc else None
    mean_t = torch.tensor(mean, device=accelerator.device).view(1, 3, 1, 1) * 255
    std_t = torch.tensor(std, device=accelerator.device).view(1, 3, 1, 1) * 255

    for k, (phase, p_aug, steps) in enumerate(phases):
        if k < start_phase:
            continue
        first = start_step if k == start_phase else 0
        # A fresh optimizer and poly schedule per phase (pretrain -> finetune, §3.4).
        accelerator.free_memory()
        optimizer = torch.optim.AdamW(param_groups(net, a.lr, a.weight_decay, a.backbone_lr_multiplier), lr=a.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s, n=steps: (1 - min(s, n) / n) ** 0.9)
        model, optimizer, scheduler = accelerator.prepare(net, optimizer, scheduler)
        if resume_from is not None and k == start_phase:
            accelerator.load_state(str(resume_from))
        sampler = MixedBatches(len(real), [len(s) for s in synthetic], per_proc, p_aug, a.seed + 1000 * k,
                               first, steps, accelerator.process_index, accelerator.num_processes)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=a.num_workers,
                                             pin_memory=accelerator.device.type == "cuda",
                                             persistent_workers=False, prefetch_factor=4 if a.num_workers else None)
        say(f"phase {k + 1}/{len(phases)} [bold]{phase}[/]: steps {first}..{steps}, p_aug {p_aug}, global batch {a.batch_size}, crop {crop}")
        model.train()
        t0, t_log, n_log, loss_sum = time.perf_counter(), time.perf_counter(), 0, 0.0
        with progress_bar(main_proc) as progress:
            task = progress.add_task(phase, total=steps, completed=first) if progress else None
            for step, batch in enumerate(loader, start=first):
                images = (batch["image"].to(accelerator.device, non_blocking=True).float() - mean_t) / std_t
                labels = batch["label"].to(accelerator.device, non_blocking=True)
                valid = batch["valid"].to(accelerator.device, non_blocking=True).long()
                counts[:-1] += torch.bincount(batch["source"], minlength=len(source_names))
                mask_labels, class_labels, keep = mask_targets(labels)
                counts[-1] += int((~keep).sum())
                # Every process takes the same branch (the loss itself synchronises its mask count).
                if bool(accelerator.gather(keep.any()[None].long()).min() == 0):
                    skipped_steps += 1
                    scheduler.step()
                else:
                    out = model(pixel_values=images[keep], pixel_mask=valid[keep], mask_labels=mask_labels, class_labels=class_labels)
                    accelerator.backward(out.loss)
                    if a.grad_clip > 0:
                        accelerator.clip_grad_norm_(model.parameters(), a.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    loss_sum += out.loss.detach().float()
                    n_log += 1
                done = step + 1
                if progress:
                    progress.update(task, completed=done)
                if done % a.log_every == 0 or done == steps:
                    loss = accelerator.reduce(torch.as_tensor(loss_sum / max(n_log, 1), device=accelerator.device), "mean")
                    now = time.perf_counter()
                    rec = {"phase": phase, "step": done, "loss": float(loss), "lr": max(scheduler.get_last_lr()),  # head lr
                           "it_per_s": a.log_every / (now - t_log) if done % a.log_every == 0 else None, **totals()}
                    t_log, n_log, loss_sum = now, 0, 0.0
                    if main_proc:
                        stats.write(json.dumps(rec) + "\n")
                        stats.flush()
                    accelerator.log({"loss": rec["loss"], "lr": rec["lr"]}, step=done + sum(s for _, _, s in phases[:k]))
                if a.checkpoint_every and (done % a.checkpoint_every == 0 or done == steps):
                    save_checkpoint(accelerator, net, processor, output_dir, {"phase": k, "step": done, **totals()}, a.keep_checkpoints)
        accelerator.wait_for_everyone()
        elapsed = time.perf_counter() - t0
        say(f"phase {phase}: {steps - first} steps in {elapsed:.1f} s ({(steps - first) / max(elapsed, 1e-9):.2f} it/s)")

    # ---- the final model and its evaluation
    if main_proc:
        accelerator.unwrap_model(model).save_pretrained(output_dir / "model")
        processor.save_pretrained(output_dir / "model")
    result = {"data": a.data, "task": a.task, "strategy": a.strategy.value, "phases": [{"name": n, "p_aug": p, "steps": s} for n, p, s in phases],
              **totals(), "model": str(output_dir / "model")}
    if result["skipped_images"]:
        say(f"[yellow]{result['skipped_images']} training image(s) without any labelled pixel were left out of the loss "
            f"({skipped_steps} whole step(s) skipped)[/]")
    result.update(evaluate_scales(model, val, a, eval_size, mean, std, accelerator))
    if stats:
        stats.close()
    accelerator.end_training()
    return finish(result, output_dir, main_proc, a.metrics_file)


@app.command()
def main(
    data: Annotated[Data, typer.Option(help="Dataset: ADE20K (semantic) or COCO panoptic (panoptic / instance).", rich_help_panel="Data")] = Data.ade20k,
    data_root: Annotated[Path | None, typer.Option(help="Dataset root (default: $SEGGEN_DATASETS, else ./datasets).", rich_help_panel="Data")] = None,
    synthetic: Annotated[list[Path], typer.Option(help="Synthetic folder (masksyn.py / imgsyn.py output); repeatable. Default: whichever of synth/masksyn-{data}, synth/imgsyn-{data} exist.", rich_help_panel="Data")] = [],  # noqa: B006
    task: Annotated[Task | None, typer.Option(help="semantic (ADE20K), panoptic or instance (COCO); default by --data.", rich_help_panel="Data")] = None,
    strategy: Annotated[Strategy | None, typer.Option(help="aug: replace real samples by synthetic ones with p_aug (§3.4; ADE20K's default); pretrain: synthetic then real (COCO's default); real: baseline; synthetic: synthetic only.", rich_help_panel="Data")] = None,
    p_aug: Annotated[float, typer.Option(min=0.0, max=1.0, help="Probability that a real sample is replaced by a synthetic one (§3.4, §4.2: 0.6).", rich_help_panel="Data")] = 0.6,
    max_real_samples: Annotated[int | None, typer.Option(min=1, help="Train on a fixed random subset of this many real samples (Table 4).", rich_help_panel="Data")] = None,
    num_workers: Annotated[int, typer.Option(min=0, help="DataLoader worker processes per process.", rich_help_panel="Data")] = 4,
    no_augment: Annotated[bool, typer.Option("--no-augment", help="No random resize/crop, colour jitter or flip (appendix A.9's ablation).", rich_help_panel="Data")] = False,
    model: Annotated[str | None, typer.Option(help="Mask2Former checkpoint to fine-tune: hub id or folder (e.g. facebook/mask2former-swin-large-ade-semantic).", rich_help_panel="Model")] = None,
    backbone: Annotated[Backbone | None, typer.Option(help="Build the paper's configuration with random weights instead (default r50).", rich_help_panel="Model")] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Iterations, per phase for pretrain (ADE20K 160k; COCO 368,750 = 50 epochs at batch 16).", rich_help_panel="Training")] = None,
    pretrain_steps: Annotated[int | None, typer.Option(min=1, help="--strategy pretrain: iterations on synthetic data (default: --max-steps, Table 6's 160k + 160k).", rich_help_panel="Training")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Global batch over all processes (A.3: 16).", rich_help_panel="Training")] = 16,
    lr: Annotated[float, typer.Option(min=0.0, help="AdamW learning rate (A.3: 1e-4).", rich_help_panel="Training")] = 1e-4,
    weight_decay: Annotated[float, typer.Option(min=0.0, help="AdamW weight decay (A.3: 0.05).", rich_help_panel="Training")] = 0.05,
    backbone_lr_multiplier: Annotated[float, typer.Option(min=0.0, help="Backbone lr factor (Mask2Former: 0.1).", rich_help_panel="Training")] = 0.1,
    grad_clip: Annotated[float, typer.Option(min=0.0, help="Full-model gradient norm clip (Mask2Former: 0.01; 0: off).", rich_help_panel="Training")] = 0.01,
    crop: Annotated[int | None, typer.Option(min=32, max=2048, help="Training crop (ADE20K: 512, Swin-L 640; COCO: 1024).", rich_help_panel="Training")] = None,
    seed: Annotated[int, typer.Option(help="Seed of weights, sample order, p_aug draws and augmentation.", rich_help_panel="Training")] = 0,
    mixed_precision: Annotated[MixedPrecision | None, typer.Option(help="Mixed precision (default: accelerate's config; Mask2Former trains with AMP).", rich_help_panel="Training")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Run folder (default runs/seg-{data}-{strategy}).", rich_help_panel="Output")] = None,
    resume: Annotated[str | None, typer.Option(help="'latest' or a checkpoints/phase*-step* folder.", rich_help_panel="Output")] = None,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Save a checkpoint every N steps (and at each phase's end); 0: never.", rich_help_panel="Output")] = 5000,
    keep_checkpoints: Annotated[int, typer.Option(min=0, help="Keep the last N checkpoints (0: all).", rich_help_panel="Output")] = 2,
    log_every: Annotated[int, typer.Option(min=1, help="Write a stats.jsonl line every N steps.", rich_help_panel="Output")] = 50,
    report_to: Annotated[Tracker, typer.Option(help="Also log to TensorBoard (through accelerate; needs the tensorboard package).", rich_help_panel="Output")] = Tracker.none,
    metrics_file: Annotated[Path | None, typer.Option(help="Where metrics.json goes (default: in --output-dir).", rich_help_panel="Output")] = None,
    eval_only: Annotated[bool, typer.Option("--eval-only", help="Only evaluate --checkpoint on the val split.", rich_help_panel="Evaluation")] = False,
    checkpoint: Annotated[Path | None, typer.Option(help="Model to evaluate: a run's model/ or checkpoints/phase*-step* folder.", rich_help_panel="Evaluation")] = None,
    eval_size: Annotated[int | None, typer.Option(min=32, help="Short side at test time (default: ADE20K the crop size, COCO 800).", rich_help_panel="Evaluation")] = None,
    multiscale: Annotated[bool, typer.Option("--multiscale", help="Also evaluate with flip + scales 0.5..1.75.", rich_help_panel="Evaluation")] = False,
):
    """Train Mask2Former on real + synthetic data (paper §3.4) and write metrics.json."""
    args = SimpleNamespace(**locals())
    try:
        args.report_to = args.report_to.value
        args.mixed_precision = args.mixed_precision.value if args.mixed_precision else None
        if args.report_to == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError as e:
                raise SegGenError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from e
        if args.checkpoint is not None and not (args.checkpoint / "config.json").is_file():
            raise SegGenError(f"--checkpoint {args.checkpoint}: no config.json there; pass a run's model/ or checkpoints/phase*-step* folder")
        run(args)
    except SegGenError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from None


if __name__ == "__main__":
    app()
