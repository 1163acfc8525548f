"""Mask2Former's and HRNet's inference (paper §4.1, A.3), as train_seg evaluates and quality.py / predict.py
score: one view at an image's original resolution (short side resized, Mask2Former padded to 32 and its mask
logits upsampled as detectron2's sem_seg_postprocess does, not transformers' 384x384 post-processing), then
semantic (softmax(class) · sigmoid(mask) summed over queries), panoptic and instance inference; and a trained
segmenter loaded from a run folder, ready to score images (Segmenter)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import SegGenError
from common.seg.model import Normalize, model_type


@dataclass
class Segmenter:
    """A trained segmenter, ready to score images as train_seg's evaluation does: the network, its kind
    ("mask2former" or "hrnet") and the normalisation it was trained with ((3, 1, 1), in 0..255)."""
    model: torch.nn.Module
    kind: str
    mean: torch.Tensor
    std: torch.Tensor

    @torch.no_grad()
    def scores(self, image: np.ndarray, short: int, flip: bool = False) -> torch.Tensor:
        """(H, W, 3) uint8 -> (C, H, W) class scores at the image's size (semantic_scores: short side `short`,
        long side at most 4 × short; Mask2Former: class-probability-weighted mask sums, HRNet: softmax)."""
        x = torch.from_numpy(np.ascontiguousarray(image)).to(self.mean.device).permute(2, 0, 1).float()
        return semantic_scores(self.model, (x - self.mean) / self.std, short, flip)


def load_segmenter(folder: Path, num_classes: int, device="cpu", flag: str = "--segmenter", data: str | None = None) -> Segmenter:
    """A train_seg run's model/ folder (or one of its checkpoints): Mask2Former (save_pretrained + processor)
    or HRNet (hrnet.save). It must predict `num_classes` classes; errors name `flag`."""
    folder = Path(folder)
    kind = model_type(folder)
    if kind is None:
        raise SegGenError(f"{flag} {folder}: no config.json there; pass a train_seg run's model folder, "
                          f"e.g. runs/seg-ade20k-real/model")
    if kind == "hrnetv2":
        from common.seg import hrnet

        net, norm = hrnet.load(folder), Normalize(**_normalisation(folder))
        classes = net.num_classes
    elif kind == "mask2former":
        from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

        try:
            net, norm = Mask2FormerForUniversalSegmentation.from_pretrained(folder), Mask2FormerImageProcessor.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise SegGenError(f"{flag} {folder}: cannot load Mask2Former from it ({str(e).splitlines()[0]})") from e
        classes = net.config.num_labels
    else:
        raise SegGenError(f"{flag} {folder}: a {kind!r} model; pass a Mask2Former or HRNet folder written by train_seg")
    if classes != num_classes:
        given = f"--data {data}" if data else "--data"
        raise SegGenError(f"{flag} {folder} predicts {classes} classes, but {given} has {num_classes}: pass a segmenter "
                          f"trained on it, or the --data it was trained on")
    t = lambda v: torch.tensor(v, device=device).view(3, 1, 1) * 255  # noqa: E731
    return Segmenter(net.to(device).eval(), "hrnet" if kind == "hrnetv2" else "mask2former", t(norm.image_mean), t(norm.image_std))


def _normalisation(folder: Path) -> dict:
    """HRNet's saved image mean and std (preprocessor_config.json), when the folder has them."""
    path = folder / "preprocessor_config.json"
    return {k: v for k, v in json.loads(path.read_text()).items() if k in ("image_mean", "image_std")} if path.is_file() else {}


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
    """(C, H, W) class scores of one view at the original resolution (HRNet: softmax probabilities)."""
    from common.seg.hrnet import HRNetSegmenter

    if isinstance(model, HRNetSegmenter):
        return hrnet_scores(model, image, short, max_long or 4 * short, flip)
    return semantic_inference(*predict(model, image, short, max_long or 4 * short, flip))


@torch.no_grad()
def hrnet_scores(model, image: torch.Tensor, short: int, max_long: int, flip: bool = False) -> torch.Tensor:
    """(3, H, W) normalised image -> (C, H, W) HRNet class probabilities: short side resized to `short`
    (long side at most max_long), optionally flipped, the softmax flipped back and upsampled to (H, W)."""
    _, h, w = image.shape
    scale = min(short / min(h, w), max_long / max(h, w))
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
    probs = model.semantic(x.flip(-1) if flip else x).float()  # (1, C, h', w')
    probs = probs.flip(-1) if flip else probs
    return F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)[0]


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
