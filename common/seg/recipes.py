"""train_seg.py's recipes (paper A.3: "we keep the official training hyper-parameters"): one row per
dataset x backbone, each value from the official config it names (docs/training-recipes.md has the same
table with every source and where the paper is silent). A flag left unset takes its row's value; a new
backbone or dataset is one more row. Also the options' choices (Strategy, Task, Sampling) and the phases a
strategy runs (§3.4)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from common import SegGenError
from common.seg.data import AUGMENTS, without_a9
from common.seg.model import is_hrnet, model_type


class Strategy(str, Enum):
    real = "real"
    aug = "aug"
    pretrain = "pretrain"
    real_pretrain = "real-pretrain"  # Tables 2/3's baseline: real then real again (50 + 50 epochs)
    synthetic = "synthetic"


class Sampling(str, Enum):
    uniform = "uniform"
    hardness = "hardness"


class Task(str, Enum):
    semantic = "semantic"
    panoptic = "panoptic"
    instance = "instance"


@dataclass(frozen=True)
class Recipe:
    task: str  # --task
    strategy: str  # --strategy: how synthetic data is used (§3.4, §4.2)
    max_steps: int  # --max-steps: iterations (per phase for pretrain)
    batch: int  # --batch-size: global batch
    crop: int  # --crop: training crop
    lr: float  # --lr: base learning rate
    optimizer: str  # adamw (Mask2Former) or sgd (HRNet)
    weight_decay: float  # --weight-decay
    momentum: float  # SGD momentum (unused by AdamW)
    backbone_lr: float  # --backbone-lr-multiplier
    grad_clip: float  # --grad-clip: full-model gradient norm (0: none)
    augment: str  # common/seg/data.py AUGMENTS: ade20k (resize, crop, colour, flip), lsj, hrnet (scale, crop, flip), flip
    schedule: str  # lr schedule: poly (power 0.9) or multistep (x 0.1 at `milestones`)
    milestones: tuple[int, ...]  # multistep: decay iterations at max_steps (scaled with --max-steps)
    warmup: int  # linear lr warm-up iterations, from warmup_factor x lr
    warmup_factor: float  # 1.0: the warm-up changes nothing (detectron2's WarmupMultiStepLR)
    queries: int  # object queries of a model built from --backbone
    eval_size: int | None  # --eval-size: test short side (None: the crop)
    source: str  # the official config the row transcribes


# Mask2Former (github.com/facebookresearch/Mask2Former, configs/; common/assets/SOURCES_mask2former.md); paper A.3
# and §4.2: AdamW lr 1e-4, weight decay 0.05, batch 16; the configs add backbone lr x 0.1, full-model clip 0.01, AMP.
# ADE20K (Base-ADE20K-SemanticSegmentation.yaml): MAX_ITER 160,000, WarmupPolyLR, WARMUP_ITERS 0; ResizeShortestEdge
# to int(x * 0.1 * 512), x = 5..20 ("choice"), max 2048; 512 crop (Swin-L: 640, ..._res640.yaml); SSD colour jitter.
# COCO (Base-COCO-PanopticSegmentation.yaml, Base-COCO-InstanceSegmentation.yaml: the same SOLVER): MAX_ITER 368,750
# (50 epochs at batch 16), WarmupMultiStepLR STEPS (327778, 355092), GAMMA 0.1, WARMUP_ITERS 10 at WARMUP_FACTOR 1.0
# (so no warm-up in effect), large-scale jitter at IMAGE_SIZE 1024 (MIN_SCALE 0.1, MAX_SCALE 2.0); test short side
# 800. Swin-L (panoptic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_100ep.yaml): 737,500 (100 epochs),
# STEPS (655556, 710184), 200 queries; COCO instance Swin-L takes the same row (the paper's Table 3 lists 100 epochs).
# HRNet (A.3): "W48 ... 100K iterations. SGD ... 2x10^-2 ... polynomial ... 0.9. The weight decay rate is 10^-4.
# Random flipping". Silent in A.3, from github.com/HRNet/HRNet-Semantic-Segmentation: momentum 0.9, batch 16 (4 per
# GPU x 4), the 520 crop, and the data pipeline: experiments/ade20k/seg_hrnet_w48_520x520_ohem_sgd_lr2e-2_wd1e-4_bs_16_
# epoch120.yaml (BASE_SIZE 520, IMAGE_SIZE 520x520, MULTI_SCALE true, SCALE_FACTOR 11, FLIP true) read by
# lib/datasets/base_dataset.py gen_sample (commit e51d614): long side int(520 * s + 0.5), s = 0.5 + randint(0, 11) / 10
# (0.5..1.6), padded to 520 (image 0, label ignore) and a uniform random 520 crop, flip with p 1/2
# (RANDOM_BRIGHTNESS defaults to False in lib/config/default.py); test short side 520 (TEST.BASE_SIZE). No clipping.
M2F_ADE = "Mask2Former configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml"
M2F_COCO = "Mask2Former configs/coco/{panoptic,instance}-segmentation/maskformer2_R50_bs16_50ep.yaml"
HRNET_ADE = "HRNet-Semantic-Segmentation experiments/ade20k/seg_hrnet_w48_520x520_ohem_sgd_lr2e-2_wd1e-4_bs_16_epoch120.yaml"
ADE20K = Recipe("semantic", "aug", 160_000, 16, 512, 1e-4, "adamw", 0.05, 0.0, 0.1, 0.01, "ade20k", "poly", (), 0, 1.0, 100, None, M2F_ADE)
COCO = Recipe("panoptic", "pretrain", 368_750, 16, 1024, 1e-4, "adamw", 0.05, 0.0, 0.1, 0.01, "lsj", "multistep", (327_778, 355_092),
              10, 1.0, 100, 800, M2F_COCO)
HRNET = Recipe("semantic", "aug", 100_000, 16, 520, 2e-2, "sgd", 1e-4, 0.9, 1.0, 0.0, "hrnet", "poly", (), 0, 1.0, 0, None, HRNET_ADE)
RECIPES: dict[tuple[str, str], Recipe] = {
    ("ade20k", "r50"): ADE20K,
    ("ade20k", "swin-t"): dataclasses.replace(ADE20K, source=M2F_ADE.replace("maskformer2_R50", "swin/maskformer2_swin_tiny")),
    ("ade20k", "swin-l"): dataclasses.replace(ADE20K, crop=640, source=M2F_ADE.replace(
        "maskformer2_R50_bs16_160k", "swin/maskformer2_swin_large_IN21k_384_bs16_160k_res640")),
    ("ade20k", "hrnet-w48"): HRNET,
    ("ade20k", "hrnet-small"): HRNET,  # random weights, for CPU runs: pass a small --crop / --batch-size
    ("coco", "r50"): COCO,
    ("coco", "swin-t"): dataclasses.replace(COCO, source="Mask2Former configs/coco/instance-segmentation/swin/maskformer2_swin_tiny_bs16_50ep.yaml"),
    ("coco", "swin-l"): dataclasses.replace(COCO, max_steps=737_500, milestones=(655_556, 710_184), queries=200, source=M2F_COCO.replace(
        "{panoptic,instance}-segmentation/maskformer2_R50_bs16_50ep", "panoptic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_100ep")),
    # The toy world (common/toy/world.py, 64x64 images in the ADE20K layout): ADE20K's recipes at its size. Its HRNet
    # keeps random flipping alone (A.3's words), the setting docs/toy-results.md measured.
    ("toy", "r50"): dataclasses.replace(ADE20K, crop=64, eval_size=64, source="ADE20K's, at 64 px"),
    ("toy", "hrnet-small"): dataclasses.replace(HRNET, crop=64, eval_size=64, augment="flip", source="A.3's HRNet, flip only, at 64 px"),
}


def recipe_table() -> str:
    """The recipes as --help shows them."""
    cols = [f.name for f in dataclasses.fields(Recipe)]

    def cell(value) -> str:
        return "crop" if value is None else f"{value:,}" if isinstance(value, int) else str(value)

    rows = [" | ".join(["data", "backbone", *cols])] + [" | ".join([d, b, *(cell(getattr(r, c)) for c in cols)]) for (d, b), r in RECIPES.items()]
    return ("Recipes (flags left unset take their row; --model checkpoints use the r50 row, HRNet ones the hrnet-w48 row; "
            "sources: docs/training-recipes.md):\n\n" + "\n\n".join(rows))


def recipe_key(a) -> tuple[str, str]:
    """(--data, backbone) of train_seg's options: --backbone, else the model's kind (HRNet or Mask2Former r50)."""
    source = a.checkpoint if a.eval_only else a.model
    return a.data, a.backbone.value if a.backbone else "hrnet-w48" if source and model_type(source) == "hrnetv2" else "r50"


P_AUG = 0.6  # §4.2: the probability that a real sample of a batch is replaced by a synthetic one


def resolve(a) -> Recipe:
    """Fills every option of `a` left unset from the recipe of (--data, --backbone) and checks the combination."""
    key = recipe_key(a)
    if key not in RECIPES:
        raise SegGenError(f"--backbone {key[1]} has no recipe for --data {key[0]} (HRNet is the paper's ADE20K semantic segmenter); "
                          f"recipes: {', '.join(f'{d}/{b}' for d, b in RECIPES)}")
    r = RECIPES[key]
    a.recipe = f"{key[0]}/{key[1]}"
    a.task = a.task.value if a.task else r.task
    a.strategy = a.strategy or Strategy(r.strategy)
    for flag, value in (("max_steps", r.max_steps), ("batch_size", r.batch), ("crop", r.crop), ("lr", r.lr),
                        ("weight_decay", r.weight_decay), ("backbone_lr_multiplier", r.backbone_lr), ("grad_clip", r.grad_clip)):
        setattr(a, flag, value if getattr(a, flag) is None else getattr(a, flag))
    a.optimizer, a.momentum, a.augment = r.optimizer, r.momentum, AUGMENTS[r.augment]
    a.schedule = dict(kind=r.schedule, milestones=r.milestones, base_steps=r.max_steps, warmup=r.warmup, warmup_factor=r.warmup_factor)
    if a.no_augment:
        a.augment = without_a9(a.augment)
    check(a, key)
    a.p_aug = P_AUG if a.p_aug is None else a.p_aug  # recorded for every strategy, as before
    a.eval_size = a.eval_size or r.eval_size or a.crop
    a.pretrain_steps = a.pretrain_steps or a.max_steps
    return r


def check(a, key: tuple[str, str]) -> None:
    """The combinations of options no recipe allows, each refused with the fix."""
    if is_hrnet(key[1]) and a.task != "semantic":
        raise SegGenError(f"--backbone {key[1]} is a semantic segmenter: --task semantic only")
    if a.data != "coco" and a.task != "semantic":
        raise SegGenError(f"--task {a.task} needs COCO panoptic data (--data coco); {a.data} is trained for semantic segmentation")
    if a.multiscale and a.task != "semantic":
        raise SegGenError("--multiscale is for semantic segmentation (the paper's ADE20K m.s. column)")
    if a.backbone_weights is not None and (a.model is not None or a.eval_only):
        raise SegGenError("--backbone-weights is for a fresh --backbone model; --model / --checkpoint carry their own weights")
    if a.model is not None and a.backbone is not None:
        raise SegGenError("pass either --model (a checkpoint) or --backbone (a fresh paper configuration), not both")
    if a.eval_only and a.checkpoint is None:
        raise SegGenError("--eval-only needs --checkpoint DIR (a model/ or checkpoints/phase*-step* folder of a run)")
    for flag in ("lr", "weight_decay", "backbone_lr_multiplier", "grad_clip"):
        value = getattr(a, flag)
        if not math.isfinite(value) or (flag == "lr" and value <= 0):
            raise SegGenError(f"--{flag.replace('_', '-')} must be a {'positive ' if flag == 'lr' else ''}finite number (got {value})")
    if getattr(a, "p_aug", None) not in (None, P_AUG) and a.strategy != Strategy.aug:  # P_AUG: every run records it
        raise SegGenError(f"--p-aug applies to --strategy aug only (got --strategy {a.strategy.value}, where it would be "
                          f"ignored): drop --p-aug, or train with --strategy aug")
    metrics_file = getattr(a, "metrics_file", None)
    if metrics_file is not None and Path(metrics_file).is_dir():
        raise SegGenError(f"--metrics-file {metrics_file} is a folder; pass a file name, e.g. {Path(metrics_file) / 'metrics.json'}")
    if getattr(a, "eval_samples", None) is not None and not getattr(a, "eval_every", 0):
        raise SegGenError("--eval-samples sets the size of the periodic evaluation: pass --eval-every N with it")


def plan_phases(a) -> list[tuple[str, float, int]]:
    """(name, p_aug, steps) per phase: pretrain is Table 6's synthetic then real, each a fresh schedule (§3.4)."""
    if a.strategy == Strategy.pretrain:
        return [("pretrain-synthetic", 1.0, a.pretrain_steps), ("finetune-real", 0.0, a.max_steps)]
    if a.strategy == Strategy.real_pretrain:  # the same two phases on real data only: Tables 2/3's "50+50" baseline
        return [("pretrain-real", 0.0, a.pretrain_steps), ("finetune-real", 0.0, a.max_steps)]
    return [(a.strategy.value, {"real": 0.0, "aug": a.p_aug, "synthetic": 1.0}[a.strategy.value], a.max_steps)]
