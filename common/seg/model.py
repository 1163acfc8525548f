"""train_seg.py's model (paper appendix A.3): Mask2Former from transformers, its configurations per
backbone, Mask2Former's optimizer groups, its semantic / panoptic / instance inference, and the
evaluation of each task (metrics: common/seg/metrics.py).

Evaluation is done at each image's original resolution (transformers' post-processing resizes to
384x384 first, so it is not used): short side resized to --eval-size, mask logits upsampled back to the
image, then Mask2Former's inference: semantic (softmax(class) . sigmoid(mask)) -> mIoU, per-class IoU,
pixel accuracy (optionally flip + multi-scale); panoptic -> PQ / SQ / RQ, things and stuff; instance
(top-100 query-class pairs) -> mask AP through pycocotools.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table

from common import ASSETS, SegGenError
from common.masks.colormap import IGNORE, coco_categories
from common.data.datasets import Sample, load_image, load_panoptic
from common.seg.metrics import MaskAP, PanopticQuality, SemanticMetrics
from common.runtime.record import write_json
from common.runtime.progress import console, progress_bar
from common.seg.data import class_names, load_train_label, thing_train_ids

CONFIGS = ASSETS  # Mask2Former's published configurations (SOURCES_mask2former.md)


class Backbone(str, Enum):
    r50 = "r50"
    swin_t = "swin-t"
    swin_l = "swin-l"
    hrnet_w48 = "hrnet-w48"  # HRNetV2-W48, a semantic segmenter (§4, A.3, Table 4b): common/seg/hrnet.py
    hrnet_small = "hrnet-small"  # a small HRNetV2 with random weights, trainable on CPU (tests, the toy world)


def is_hrnet(backbone: str) -> bool:
    return str(getattr(backbone, "value", backbone)).startswith("hrnet")


class Normalize:
    """HRNet's image "processor": the mean and std train_seg and the evaluation normalise with (in 0..1,
    as transformers' image processors give them); save_pretrained writes them beside the model."""

    def __init__(self, image_mean=None, image_std=None):
        from common.seg.hrnet import IMAGENET_MEAN, IMAGENET_STD

        self.image_mean, self.image_std = list(image_mean or IMAGENET_MEAN), list(image_std or IMAGENET_STD)

    def save_pretrained(self, folder) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "preprocessor_config.json").write_text(json.dumps({"image_mean": self.image_mean, "image_std": self.image_std}))


def model_type(folder) -> str | None:
    """config.json's model_type of a saved model folder ("mask2former", "hrnetv2"), None if there is none."""
    path = Path(folder) / "config.json"
    return json.loads(path.read_text()).get("model_type") if path.is_file() else None


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


def build_segmenter(model: str | None, backbone: str | None, data: str, queries: int = 100, weights: str | None = None,
                    task: str = "semantic"):
    """(network, processor, where its backbone weights came from) for train_seg: a saved HRNet folder
    (hrnet.save or a checkpoint) or a fresh HRNet of `backbone`, else Mask2Former (build_model). A fresh
    model starts from its backbone's ImageNet weights (`weights`: --backbone-weights, None = the official
    ones: common/seg/backbones.py DEFAULT_WEIGHTS, hrnet.DEFAULT_WEIGHTS), as Mask2Former's and HRNet's recipes do."""
    from common.seg import hrnet
    from common.seg.backbones import init_backbone

    if model is not None and model_type(model) == "hrnetv2":
        net = hrnet.load(model)
        if net.num_classes != len(class_names(data)):
            raise SegGenError(f"{model}: an HRNet of {net.num_classes} classes, but --data {data} has {len(class_names(data))}")
        return net, Normalize(), str(model)
    if model is None and is_hrnet(backbone):
        net, source = hrnet.build(str(backbone.value).removeprefix("hrnet-"), len(class_names(data)), weights)
        return net, Normalize(), source
    net, processor = build_model(model, None if model else backbone, data, queries, task)
    return net, processor, str(model) if model else init_backbone(net, backbone.value, weights)


R50 = dict(embedding_size=64, depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048])  # ResNet-50 (torchvision's widths)


def build_model(model: str | None, backbone: Backbone | None, data: str, queries: int = 100, task: str = "semantic"):
    """(Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor) from a hub id / folder, or the
    paper's configuration of `backbone` with random weights (no download)."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        ResNetConfig,
    )

    names = class_names(data, task)  # COCO --task instance: an 80-class head on the thing categories
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
        cfg = json.loads((CONFIGS / "mask2former_swin_tiny_ade_semantic_config.json").read_text())
        cfg["backbone_config"] = ResNetConfig(**R50, layer_type="bottleneck", out_features=["stage1", "stage2", "stage3", "stage4"]).to_dict()
    else:
        name = {Backbone.swin_t: "tiny", Backbone.swin_l: "large"}[backbone]
        cfg = json.loads((CONFIGS / f"mask2former_swin_{name}_ade_semantic_config.json").read_text())
    cfg.update(num_labels=len(names), id2label=id2label, label2id=label2id)
    cfg["num_queries"] = queries  # train_seg's recipe: 200 for COCO Swin-L (Mask2Former's IN21k-384 configs), else 100
    config = Mask2FormerConfig.from_dict(cfg)
    return Mask2FormerForUniversalSegmentation(config), Mask2FormerImageProcessor(ignore_index=IGNORE, do_reduce_labels=False)


def freeze_unused(model) -> None:
    """The Swin backbone's final LayerNorm only feeds its pooled output, which Mask2Former never uses:
    it gets no gradient, and DistributedDataParallel refuses such parameters unless it searches the
    graph for them every step (find_unused_parameters). Freezing it costs nothing. (HRNet: nothing unused.)"""
    if not hasattr(model, "model"):
        return
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


def save_model(net, processor, folder: Path) -> None:
    """The final model: HRNet through hrnet.save (what quality.py and --eval-only load), Mask2Former with save_pretrained."""
    from common.seg import hrnet

    if isinstance(net, hrnet.HRNetSegmenter):
        hrnet.save(net, folder)
    else:
        net.save_pretrained(folder)
    processor.save_pretrained(folder)


def lr_factor(step: int, steps: int, kind: str = "poly", milestones: tuple = (), base_steps: int | None = None,
              warmup: int = 0, warmup_factor: float = 1.0, power: float = 0.9, gamma: float = 0.1) -> float:
    """The learning rate of iteration `step` of `steps`, as a factor of the base lr (detectron2's lr schedulers,
    as Mask2Former configures them). poly: (1 - step / steps)^0.9 (WarmupPolyLR); multistep: gamma^(number of
    milestones passed) (WarmupMultiStepLR), the milestones given for `base_steps` iterations scaled to `steps`.
    Then a linear warm-up over `warmup` iterations from warmup_factor (1.0: none in effect)."""
    if kind == "poly":
        factor = (1 - min(step, steps) / steps) ** power
    else:
        scaled = [m * steps / (base_steps or steps) for m in milestones]
        factor = gamma ** sum(step >= m for m in scaled)
    if step < warmup:
        alpha = step / warmup
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


def build_optimizer(model, kind: str, lr: float, weight_decay: float, backbone_multiplier: float, momentum: float):
    """The recipe's optimizer: "adamw" with Mask2Former's groups (param_groups), or "sgd" with momentum over
    every parameter, as HRNet-Semantic-Segmentation trains."""
    if kind == "sgd":
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.AdamW(param_groups(model, lr, weight_decay, backbone_multiplier), lr=lr)


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


class SemanticEval:
    """mIoU, per-class IoU and pixel accuracy of the per-pixel argmax of the class scores (Table 1)."""

    def __init__(self, data: str):
        names = class_names(data)
        self.data, self.metrics = data, SemanticMetrics(len(names), IGNORE, names)

    def update(self, image_id: int, sample: Sample, scores, classes, masks) -> None:
        truth = torch.from_numpy(load_train_label(sample, self.data)).to(scores.device)
        self.metrics.update(scores.argmax(0), truth)

    def result(self, accelerator) -> dict:
        self.metrics.confmat = accelerator.reduce(self.metrics.confmat.to(accelerator.device), reduction="sum").cpu()
        return self.metrics.compute()


class PanopticEval:
    """PQ / SQ / RQ, things and stuff, per class (Table 2), through Mask2Former's panoptic inference."""

    def __init__(self, data: str):
        self.cats = sorted(coco_categories(), key=lambda c: c["id"])
        self.things, self.pq = thing_train_ids(data), PanopticQuality(categories(self.cats))

    def update(self, image_id: int, sample: Sample, scores, classes, masks) -> None:
        seg, segs = panoptic_inference(classes, masks, self.things)
        self.pq.update(load_panoptic(sample), sample.segments, seg.cpu().numpy(),
                       [{"id": x["id"], "category_id": self.cats[x["category"]]["id"]} for x in segs])

    def result(self, accelerator) -> dict:
        got = gathered(self.pq, PanopticQuality(categories(self.cats)), accelerator).compute()
        name_of = {c["id"]: c["name"] for c in self.cats}
        got["per_class"] = {name_of[k]: v for k, v in got["per_class"].items()}
        return {"panoptic": got}


class InstanceEval:
    """Mask AP (Table 3; for a panoptic model AP^Th_pan) through Mask2Former's instance inference.

    things_only: a panoptic model (133 classes, its thing predictions kept); else the instance head's 80
    thing classes. Ground truth: `instances` (COCO's instances_{split}2017.json, through pycocotools) when
    given, else the panoptic thing segments."""

    def __init__(self, data: str, things_only: bool, instances: Path | None = None):
        self.cats = sorted((c for c in coco_categories() if things_only or c["isthing"]), key=lambda c: c["id"])
        self.things = thing_train_ids(data) if things_only else None
        self.ap = MaskAP(categories(self.cats))
        self.coco = None
        if instances is not None:
            import contextlib
            import io

            from pycocotools.coco import COCO

            with contextlib.redirect_stdout(io.StringIO()):
                self.coco = COCO(str(instances))
            self.by_file = {im["file_name"]: im["id"] for im in self.coco.dataset["images"]}

    def ground_truth(self, image_id: int, sample: Sample) -> None:
        if self.coco is None:
            return self.ap.add_ground_truth(image_id, load_panoptic(sample), sample.segments)
        from pycocotools import mask as mask_util

        coco_id = self.by_file.get(sample.image.name)
        if coco_id is None:
            raise SegGenError(f"{sample.image.name} is not in the instances annotation file (COCO's instances_*2017.json)")
        info = self.coco.imgs[coco_id]
        self.ap.images.append({"id": image_id, "height": info["height"], "width": info["width"]})
        for ann in self.coco.imgToAnns[coco_id]:  # polygons and RLEs as COCO's own evaluation reads them
            rle = self.coco.annToRLE(ann)
            self.ap.gt.append({"id": len(self.ap.gt) + 1, "image_id": image_id, "category_id": ann["category_id"], "segmentation": rle,
                               "area": float(mask_util.area(rle)), "bbox": mask_util.toBbox(rle).tolist(), "iscrowd": int(ann.get("iscrowd", 0))})

    def update(self, image_id: int, sample: Sample, scores, classes, masks) -> None:
        self.ground_truth(image_id, sample)
        binary, inst_scores, labels = instance_inference(classes, masks, self.things)
        self.ap.add_predictions(image_id, binary.cpu().numpy(), inst_scores.tolist(), [self.cats[c]["id"] for c in labels.tolist()])

    def result(self, accelerator) -> dict:
        return {"instance": gathered(self.ap, MaskAP(categories(self.cats)), accelerator).compute()}


def categories(cats: list[dict]) -> dict[int, bool]:
    """COCO category id -> isthing."""
    return {c["id"]: bool(c["isthing"]) for c in cats}


def evaluators(task: str, data: str, instances: Path | None = None) -> list:
    """What `task` measures: semantic mIoU; panoptic PQ (+ AP of the things and mIoU, the paper's Table 2); instance
    mask AP (against `instances`, COCO's instances json, when given)."""
    return {"semantic": lambda: [SemanticEval(data)],
            "panoptic": lambda: [SemanticEval(data), PanopticEval(data), InstanceEval(data, things_only=True)],
            "instance": lambda: [InstanceEval(data, things_only=False, instances=instances)]}[task]()


def instances_file(data_root: Path, split: str = "val") -> Path | None:
    """COCO's annotations/instances_{split}2017.json under the data root, if it is there (Table 3's AP is measured on it)."""
    from common.data.datasets import coco_root

    path = coco_root(Path(data_root), split) / "annotations" / f"instances_{split}2017.json"
    return path if path.is_file() else None


def evaluate(model, samples: list[Sample], data: str, size: int, mean, std, accelerator, multiscale: bool,
             progress=None, task: str = "semantic", instances: Path | None = None) -> dict:
    """The metrics of `task` over `samples` at their original resolution (each process takes every
    world_size-th, results combined)."""
    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    metrics = evaluators(task, data, instances)
    mean_t = torch.tensor(mean, device=accelerator.device).view(3, 1, 1) * 255
    std_t = torch.tensor(std, device=accelerator.device).view(3, 1, 1) * 255
    max_long = 4 * size if data == "ade20k" else round(size * 1333 / 800)  # detectron2's test sizes
    # (short side, long side at most, flip) per view. Multi-scale is Mask2Former's TEST.AUG: short sides
    # 0.5..1.75 x size, each as is and flipped, all with the one long-side limit 7 x size (3584 at 512).
    views = [(round(size * s), 7 * size, f) for s in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) for f in (False, True)] \
        if multiscale else [(size, max_long, False)]
    mine = list(enumerate(samples))[accelerator.process_index::accelerator.num_processes]
    bar = progress.add_task("evaluating" + (" (multi-scale + flip)" if multiscale else ""), total=len(mine)) if progress else None
    for image_id, sample in mine:
        image = torch.from_numpy(np.asarray(load_image(sample.image)).copy()).to(accelerator.device).permute(2, 0, 1).float()
        image = (image - mean_t) / std_t  # (3, H, W)
        classes = masks = None
        with accelerator.autocast():
            if task == "semantic":  # (C, H, W) summed over the views
                scores = sum(semantic_scores(net, image, short, f, long) for short, long, f in views)
            else:
                classes, masks = predict(net, image, size, max_long)
                scores = semantic_inference(classes, masks)
        for m in metrics:
            m.update(image_id, sample, scores, classes, masks)
        if progress:
            progress.advance(bar)
    if progress:
        progress.remove_task(bar)
    result = {}
    for m in metrics:
        result.update(m.result(accelerator))
    net.train(was_training)
    return result


def gathered(mine, total, accelerator):
    """This process's accumulator, or with several processes `total` with every process's merged into it."""
    from accelerate.utils import gather_object

    return merged(total, gather_object([mine])) if accelerator.num_processes > 1 else mine


def merged(total, parts: list):
    """`total` with every process's accumulator (gather_object's list) merged into it."""
    for part in parts:
        total.merge(part)
    return total


def evaluate_scales(model, val: list[Sample], a, eval_size: int, mean, std, accelerator) -> dict:
    """{"single_scale": metrics} and, with --multiscale, {"multi_scale": metrics (flip + 6 scales)}."""
    out = {}
    instances = instances_file(a.data_root) if a.task == "instance" else None
    if a.task == "instance":  # Table 3: against COCO's instance annotations when present
        out["ap_source"] = str(instances) if instances else "panoptic things (no annotations/instances_val2017.json)"
    with progress_bar(console, "it/s", enabled=accelerator.is_main_process, transient=True) as progress:
        out["single_scale"] = evaluate(model, val, a.data, eval_size, mean, std, accelerator, False, progress, a.task, instances)
        if a.multiscale:
            out["multi_scale"] = evaluate(model, val, a.data, eval_size, mean, std, accelerator, True, progress, a.task)
    return out


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


def finish(result: dict, output_dir: Path, main_proc: bool, metrics_file: Path | None) -> dict:
    if main_proc:
        path = metrics_file or output_dir / "metrics.json"
        write_json(path, result, indent=1)  # atomic: a kill never leaves half a metrics.json
        print_metrics("single-scale", result["single_scale"])
        if "multi_scale" in result:
            print_metrics("multi-scale + flip", result["multi_scale"])
        console.print(f"[green]done[/]: metrics in {path}")
    return result

