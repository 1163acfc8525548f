"""train_seg.py's model (paper appendix A.3): Mask2Former from transformers and HRNet, their configurations
per backbone, building and saving them, Mask2Former's optimizer groups and learning-rate schedules.
Inference: common/seg/inference.py; evaluation: common/seg/evaluate.py."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import torch

from common import ASSETS, SegGenError
from common.masks.colormap import IGNORE
from common.seg.data import class_names

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


def check_mask2former(model: str) -> None:
    """--model must hold a Mask2Former: transformers would otherwise build a random Mask2Former from another
    model's folder (with a warning only) and the run would train from scratch."""
    from transformers import AutoConfig

    try:
        kind = AutoConfig.from_pretrained(model).model_type
    except (OSError, ValueError):
        return  # from_pretrained below says what is missing
    if kind != "mask2former":
        raise SegGenError(f"--model {model} is a {kind!r} model, not Mask2Former: pass a Mask2Former checkpoint "
                          f"(e.g. facebook/mask2former-swin-large-ade-semantic), a train_seg run's model/, or --backbone")


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
        check_mask2former(model)
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
