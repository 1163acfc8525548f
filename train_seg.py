"""Train Mask2Former (or HRNet) on real + synthetic data (paper §3.4, §4.1, appendix A.3) and evaluate it.

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
- `real`: the baseline; `real-pretrain`: its two-phase form, real then real again, each phase a fresh
  optimizer and schedule (Tables 2/3's "50+50" baseline against `pretrain`); `synthetic`: synthetic only
  (Table 5, against DiffuMask).

The model is transformers' Mask2FormerForUniversalSegmentation (detectron2 is not installable here),
trained with the official Mask2Former recipes (A.3: "we keep the official training hyper-parameters"):
the table RECIPES below, and everywhere AdamW, weight decay 0.05 (none on norms and embeddings), backbone
lr x 0.1, full-model gradient clipping at 0.01. Data and augmentation: common/seg/data.py (ADE20K:
random short-side resize, crop, SSD colour jitter, flip; COCO: large-scale jitter, flip; crowd regions
left out). Model, inference, evaluation: common/seg/model.py.

HRNetV2 (§4, A.3, Table 4b; common/seg/hrnet.py) is the other segmenter: `--backbone hrnet-w48` (ImageNet
weights) or `hrnet-small` (random, CPU-sized), with its own RECIPES row (SGD, poly, random flip only), the
same loop, strategies and semantic evaluation; its model/ is hrnet.save's folder.

Evaluation runs at each image's original resolution with Mask2Former's semantic / panoptic / instance
inference -> mIoU, PQ, mask AP (common/seg/model.py, common/seg/metrics.py).

The run folder holds options.json, stats.jsonl (loss, lr, it/s, what was drawn from where),
checkpoints/phase{k}-step{N}/ (accelerate state + config.json: loadable with from_pretrained),
model/ (the final model + image processor) and metrics.json.
"""

from __future__ import annotations

from common.runtime import quiet  # first: threads sets OMP_WAIT_POLICY before torch starts its OpenMP pool
from common.runtime import threads

import dataclasses
from functools import lru_cache
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import numpy as np
import torch
import typer

from common import SegGenError
from common.runtime.checkpoint import resolve_seg_resume, start_seg
from common.runtime.cli import Data, MixedPrecision, ProcessGroupTimeoutOpt, Tracker, user_errors
from common.runtime.cluster import PROCESS_GROUP_TIMEOUT, check_seg_batch, on_sigterm, process_group_kwargs
from common.runtime.cli import run as run_cli
from common.data.datasets import default_data_root, read_dataset
from common.runtime.lock import output_lock
from common.data.paths import seg_run_dir
from common.runtime.progress import console
from common.seg.data import AUGMENTS, SegData, read_sources, synthetic_weights, without_a9
from common.seg.loop import Loop
from common.seg.model import Backbone, build_segmenter, evaluate_scales, finish, freeze_unused, is_hrnet, model_type, save_model

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


# ---------------------------------------------------------------- the recipes (paper A.3: "we keep the official
# training hyper-parameters"): Mask2Former's published configs, one row per dataset x backbone. A flag left
# unset takes its row's value; a new backbone or dataset is one more row.

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
    augment: str  # common/seg/data.py AUGMENTS: ade20k (resize, crop, colour, flip), lsj, flip (flip only)
    schedule: str  # lr schedule: poly (power 0.9) or multistep (x 0.1 at `milestones`)
    milestones: tuple[int, ...]  # multistep: decay iterations at max_steps (scaled with --max-steps)
    warmup: int  # linear lr warm-up iterations, from warmup_factor x lr
    warmup_factor: float  # 1.0: the warm-up changes nothing (detectron2's WarmupMultiStepLR)
    queries: int  # object queries of a model built from --backbone
    eval_size: int | None  # --eval-size: test short side (None: the crop)


# Sources: Mask2Former's configs/ade20k/semantic-segmentation/{maskformer2_R50_bs16_160k, swin/maskformer2_swin_tiny_bs16_160k,
# swin/maskformer2_swin_large_IN21k_384_bs16_160k_res640}.yaml and configs/coco/panoptic-segmentation/{maskformer2_R50_bs16_50ep,
# swin/maskformer2_swin_large_IN21k_384_bs16_100ep}.yaml (common/assets/SOURCES_mask2former.md); paper A.3 and §4.2:
# AdamW lr 1e-4, weight decay 0.05, backbone lr x 0.1, full-model clip 0.01.
# ADE20K: poly (LR_SCHEDULER_NAME WarmupPolyLR, WARMUP_FACTOR 1.0, WARMUP_ITERS 0). COCO (Base-COCO-PanopticSegmentation.yaml):
# MAX_ITER 368,750 (50 epochs at batch 16), WarmupMultiStepLR STEPS (327778, 355092), GAMMA 0.1, WARMUP_ITERS 10 at
# WARMUP_FACTOR 1.0 (so no warm-up in effect), large-scale jitter at 1024 (MIN_SCALE 0.1, MAX_SCALE 2.0); Swin-L
# (maskformer2_swin_large_IN21k_384_bs16_100ep.yaml): 737,500 (100 epochs), STEPS (655556, 710184), 200 queries.
# HRNet (A.3): "W48 ... 100K iterations. SGD ... 2x10^-2 ... polynomial ... 0.9. The weight decay rate is 10^-4.
# Random flipping"; momentum 0.9, batch 16 and the 520 crop from HRNet-Semantic-Segmentation's ADE20K config
# (seg_hrnet_w48_520x520_ohem_sgd_lr2e-2_wd1e-4_bs_16_epoch120.yaml); no clipping there.
ADE20K = Recipe("semantic", "aug", 160_000, 16, 512, 1e-4, "adamw", 0.05, 0.0, 0.1, 0.01, "ade20k", "poly", (), 0, 1.0, 100, None)
COCO = Recipe("panoptic", "pretrain", 368_750, 16, 1024, 1e-4, "adamw", 0.05, 0.0, 0.1, 0.01, "lsj", "multistep", (327_778, 355_092),
              10, 1.0, 100, 800)
HRNET = Recipe("semantic", "aug", 100_000, 16, 520, 2e-2, "sgd", 1e-4, 0.9, 1.0, 0.0, "flip", "poly", (), 0, 1.0, 0, None)
RECIPES: dict[tuple[str, str], Recipe] = {
    ("ade20k", "r50"): ADE20K,
    ("ade20k", "swin-t"): ADE20K,
    ("ade20k", "swin-l"): dataclasses.replace(ADE20K, crop=640),  # ..._res640.yaml
    ("ade20k", "hrnet-w48"): HRNET,
    ("ade20k", "hrnet-small"): HRNET,  # random weights, for CPU runs: pass a small --crop / --batch-size
    ("coco", "r50"): COCO,
    ("coco", "swin-t"): COCO,
    ("coco", "swin-l"): dataclasses.replace(COCO, max_steps=737_500, milestones=(655_556, 710_184), queries=200),
    # The toy world (common/toy/world.py, 64x64 images in the ADE20K layout): ADE20K's recipes at its size.
    ("toy", "r50"): dataclasses.replace(ADE20K, crop=64, eval_size=64),
    ("toy", "hrnet-small"): dataclasses.replace(HRNET, crop=64, eval_size=64),
}


def recipe_table() -> str:
    """The recipes as --help and docs/stages.md show them."""
    cols = [f.name for f in dataclasses.fields(Recipe)]
    rows = [" | ".join(["data", "backbone", *cols])] + [
        " | ".join([d, b, *("crop" if getattr(r, c) is None else f"{getattr(r, c):,}" if isinstance(getattr(r, c), int) else str(getattr(r, c))
                            for c in cols)])
        for (d, b), r in RECIPES.items()]
    return "Recipes (flags left unset take their row; --model checkpoints use the r50 row, HRNet ones the hrnet-w48 row):\n\n" + "\n\n".join(rows)


def resolve(a) -> Recipe:
    """Fills every option left unset from the recipe of (--data, --backbone) and checks the combination."""
    source = a.checkpoint if a.eval_only else a.model
    key = (a.data, a.backbone.value if a.backbone else "hrnet-w48" if source and model_type(source) == "hrnetv2" else "r50")
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
    if is_hrnet(key[1]) and a.task != "semantic":
        raise SegGenError(f"--backbone {key[1]} is a semantic segmenter: --task semantic only")
    a.eval_size = a.eval_size or r.eval_size or a.crop
    a.pretrain_steps = a.pretrain_steps or a.max_steps
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
    return r


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


# ---------------------------------------------------------------- §3.4: which samples each iteration sees

class MixedBatches(torch.utils.data.Sampler):
    """The per-process batches of iterations start..stop, as lists of (source, index, augmentation seed).

    Source 0 is the real training set, source k >= 1 the k-th synthetic folder. Each real slot of the
    batch is replaced by a synthetic sample with probability p_aug (§3.4), drawn uniformly from the union
    of all synthetic folders (or with `weights`: synthetic_weights). Real samples are seen in a fresh random order every epoch, shared by the
    processes (process r takes slots r*B..r*B+B-1 of each global batch). Everything is a function of
    (seed, step, rank), so a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, n_real: int, n_synthetic: list[int], batch: int, p_aug: float, seed: int,
                 start: int, stop: int, rank: int = 0, world: int = 1, weights: np.ndarray | None = None):
        if not 0.0 <= p_aug <= 1.0:
            raise SegGenError(f"--p-aug must lie in [0, 1] (got {p_aug})")
        if p_aug > 0 and sum(n_synthetic) == 0:
            raise SegGenError("p_aug > 0 needs synthetic samples: pass --synthetic FOLDER (or --strategy real)")
        if p_aug < 1 and n_real == 0:
            raise SegGenError("no real training samples (check --data-root / --max-real-samples)")
        self.n_real, self.batch, self.p_aug, self.seed = n_real, batch, p_aug, seed
        self.offsets = np.concatenate([[0], np.cumsum(n_synthetic)]).astype(np.int64)
        self.start, self.stop, self.rank, self.world = start, stop, rank, world
        if weights is not None and (len(weights) != self.offsets[-1] or not np.isclose(np.sum(weights), 1.0)):
            raise SegGenError(f"--synthetic-sampling: {len(weights)} probabilities for {int(self.offsets[-1])} synthetic samples")
        self.weights = weights

    @lru_cache(maxsize=2)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 0, epoch]).permutation(self.n_real)

    def draw(self, step: int) -> list[tuple[int, int, int]]:
        rng = np.random.default_rng([self.seed, 1, step, self.rank])
        replace = rng.random(self.batch) < self.p_aug
        if self.weights is None:  # §3.4: uniform over the union of the folders
            synth = rng.integers(0, max(int(self.offsets[-1]), 1), self.batch)
        else:  # FreeMask's hardness resampling (--synthetic-sampling hardness)
            synth = rng.choice(len(self.weights), self.batch, p=self.weights)
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


# ---------------------------------------------------------------- the run's pieces


def plan_phases(a) -> list[tuple[str, float, int]]:
    """(name, p_aug, steps) per phase: pretrain is Table 6's synthetic then real, each a fresh schedule (§3.4)."""
    if a.strategy == Strategy.pretrain:
        return [("pretrain-synthetic", 1.0, a.pretrain_steps), ("finetune-real", 0.0, a.max_steps)]
    if a.strategy == Strategy.real_pretrain:  # the same two phases on real data only: Tables 2/3's "50+50" baseline
        return [("pretrain-real", 0.0, a.pretrain_steps), ("finetune-real", 0.0, a.max_steps)]
    return [(a.strategy.value, {"real": 0.0, "aug": a.p_aug, "synthetic": 1.0}[a.strategy.value], a.max_steps)]


# ---------------------------------------------------------------- main

def run(a) -> dict:
    from accelerate import Accelerator

    # ---- 1. setup: the recipe fills unset options; every check before any heavy work
    a.data = a.data.value
    resolve(a)
    a.data_root = a.data_root if a.data_root is not None else default_data_root()
    output_dir = a.output_dir or seg_run_dir(a.data, a.strategy.value)
    accelerator = Accelerator(mixed_precision=a.mixed_precision, step_scheduler_with_optimizer=False,
                              log_with="tensorboard" if a.report_to == "tensorboard" else None, project_dir=str(output_dir),
                              kwargs_handlers=process_group_kwargs(a.process_group_timeout))
    if a.eval_only:
        return train(a, accelerator, output_dir)
    with output_lock(output_dir, rank=accelerator.process_index, flag="--output-dir"), on_sigterm():  # one job per run folder
        return train(a, accelerator, output_dir)


def train(a, accelerator, output_dir: Path) -> dict:
    from accelerate.utils import set_seed

    main_proc = accelerator.is_main_process
    say = console.print if main_proc else (lambda *x, **k: None)

    # ---- 2. data
    val = read_dataset(a.data, a.data_root, "val")
    real, synthetic, folders = ([], [], []) if a.eval_only else read_sources(a, say)
    weights = synthetic_weights(folders, synthetic, a.data, a.synthetic_sampling.value) if synthetic else None
    phases = [] if a.eval_only else plan_phases(a)
    if not a.eval_only:
        check_seg_batch(a.batch_size, accelerator.num_processes)
    for _, p, _ in phases:  # the sampler checks p and the sources before any model is built
        MixedBatches(len(real), [len(s) for s in synthetic], 1, p, a.seed, 0, 0, weights=weights)
    resume_from = None if a.eval_only else resolve_seg_resume(a.resume, output_dir, say)

    # ---- 3. model
    set_seed(a.seed)
    model_src = str(a.checkpoint) if a.eval_only else a.model
    backbone = a.backbone or Backbone.r50
    key = a.recipe.split("/")[1]
    net, processor, a.weights_loaded = build_segmenter(model_src, None if model_src else backbone, a.data, RECIPES[(a.data, key)].queries,
                                                       a.backbone_weights, a.task)
    freeze_unused(net)
    say(f"{type(net).__name__} ({model_src or backbone.value + ', backbone weights: ' + a.weights_loaded}, {sum(p.numel() for p in net.parameters()) / 1e6:.1f} M "
        f"parameters) on {a.data}; {accelerator.num_processes} process(es) on {accelerator.device}, mixed precision {accelerator.mixed_precision}")
    say(f"  data root {a.data_root}: {len(real)} real training, {len(val)} validation images; synthetic: "
        + (", ".join(f"{f} ({len(s)})" for f, s in zip(folders, synthetic)) or "none"))
    say(f"  output {output_dir}")
    if a.eval_only:
        result = {"data": a.data, "task": a.task, "checkpoint": str(a.checkpoint)}
        result.update(evaluate_scales(accelerator.prepare(net), val, a, a.eval_size, processor.image_mean, processor.image_std, accelerator))
        return finish(result, output_dir, main_proc, a.metrics_file)

    # ---- 4. the loop, phase by phase
    a.world_size = accelerator.num_processes  # the per-process draws depend on it: a resume keeps it
    start_seg(output_dir, vars(a), resume_from, phases, main_proc, say)  # options.json compared, history, stats.jsonl trimmed
    if a.report_to == "tensorboard":
        accelerator.init_trackers("train_seg")
    loop = Loop(a, accelerator, net, processor, SegData([real, *synthetic], a.data, a.crop, augment=a.augment, task=a.task, segments=not is_hrnet(key)),
                ["real", *[str(f) for f in folders]], output_dir, phases, MixedBatches, weights)
    start_phase, start_step = loop.resume(resume_from, say)
    for k in range(start_phase, len(phases)):
        model = loop.phase(k, start_step if k == start_phase else 0, resume_from if k == start_phase else None, say)

    # ---- 5. the final model and its evaluation
    if main_proc:
        save_model(accelerator.unwrap_model(model), processor, output_dir / "model")
    result = {"data": a.data, "task": a.task, "strategy": a.strategy.value, "recipe": a.recipe, "weights": a.weights_loaded, "phases": [{"name": n, "p_aug": p, "steps": s} for n, p, s in phases],
              **loop.totals(), "model": str(output_dir / "model")}
    if result["skipped_images"]:
        say(f"[yellow]{result['skipped_images']} training image(s) without any labelled pixel were left out of the loss "
            f"({loop.skipped_steps} whole step(s) skipped)[/]")
    result.update(evaluate_scales(model, val, a, a.eval_size, processor.image_mean, processor.image_std, accelerator))
    loop.close()
    accelerator.end_training()
    return finish(result, output_dir, main_proc, a.metrics_file)


@app.command(epilog=recipe_table())
def main(
    data: Annotated[Data, typer.Option(help="Dataset: ADE20K (semantic) or COCO panoptic (panoptic / instance).", rich_help_panel="Data")] = Data.ade20k,
    data_root: Annotated[Path | None, typer.Option(help="Dataset root (default: $SEGGEN_DATASETS, else ./datasets).", rich_help_panel="Data")] = None,
    synthetic: Annotated[list[Path], typer.Option(help="Synthetic folder (masksyn.py / imgsyn.py output); repeatable. FOLDER:k takes only the first k samples per source (count ablations, Fig. 8 / Table 8). Default: whichever of synth/masksyn-{data}, synth/imgsyn-{data} exist.", rich_help_panel="Data")] = [],  # noqa: B006
    task: Annotated[Task | None, typer.Option(show_default="recipe", help="semantic (ADE20K), panoptic or instance (COCO); default by --data.", rich_help_panel="Data")] = None,
    strategy: Annotated[Strategy | None, typer.Option(show_default="recipe", help="aug: replace real samples by synthetic ones with p_aug (§3.4; ADE20K's default); pretrain: synthetic then real (COCO's default); real: baseline; real-pretrain: real then real (Tables 2/3's 50+50 baseline); synthetic: synthetic only.", rich_help_panel="Data")] = None,
    p_aug: Annotated[float, typer.Option(min=0.0, max=1.0, help="Probability that a real sample is replaced by a synthetic one (§3.4, §4.2: 0.6).", rich_help_panel="Data")] = 0.6,
    synthetic_filtered: Annotated[bool, typer.Option("--synthetic-filtered", help="Train on the FreeMask-filtered annotations quality.py --filter wrote (FOLDER/annotations_filtered/: noisy regions ignored).", rich_help_panel="Data")] = False,
    synthetic_sampling: Annotated[Sampling, typer.Option(help="How synthetic samples are drawn: uniform (§3.4) or hardness (FreeMask's resampling from FOLDER/quality.jsonl, each folder keeping its share).", rich_help_panel="Data")] = Sampling.uniform,
    real_subset: Annotated[Path | None, typer.Option(help="Train only on the real samples listed in this file (python -m common.data.subset; Table 4's 1,000, the same in every stage). Validation is whole.", rich_help_panel="Data")] = None,
    max_real_samples: Annotated[int | None, typer.Option(min=1, help="Train on a fixed random subset of this many real samples (Table 4).", rich_help_panel="Data")] = None,
    num_workers: Annotated[int | None, typer.Option(min=0, show_default="machine", help="DataLoader worker processes per process (default: cores - 1, at most 4; 0 on 1-2 cores: common/runtime/threads.py).", rich_help_panel="Data")] = None,
    no_augment: Annotated[bool, typer.Option("--no-augment", help="Appendix A.9's ablation: no colour augmentation, random flipping or random cropping (the centre window); the random resize (scale jitter) stays, as A.9 does not name it.", rich_help_panel="Data")] = False,
    model: Annotated[str | None, typer.Option(help="Mask2Former checkpoint to fine-tune: hub id or folder (e.g. facebook/mask2former-swin-large-ade-semantic).", rich_help_panel="Model")] = None,
    backbone: Annotated[Backbone | None, typer.Option(help="Build a fresh model instead (default r50): Mask2Former on r50 / swin-t / swin-l, or HRNetV2 (hrnet-w48; hrnet-small: random, CPU-sized) as a semantic segmenter (A.3, Table 4b).", rich_help_panel="Model")] = None,
    backbone_weights: Annotated[str | None, typer.Option(show_default="official", help="ImageNet weights of a --backbone model: hub id, folder, or none (random). Default: r50 timm/resnet50.tv_in1k (torchvision = detectron2's R-50.pkl, BatchNorm frozen), swin-t microsoft/swin-tiny-patch4-window7-224, swin-l microsoft/swin-large-patch4-window12-384-in22k, hrnet-w48 timm/hrnet_w48.ms_in1k, hrnet-small none.", rich_help_panel="Model")] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, show_default="recipe", help="Iterations, per phase for pretrain (ADE20K 160k; COCO 368,750 = 50 epochs at batch 16).", rich_help_panel="Training")] = None,
    pretrain_steps: Annotated[int | None, typer.Option(min=1, show_default="--max-steps", help="--strategy pretrain / real-pretrain: iterations of the first phase (default: --max-steps, Table 6's 160k + 160k).", rich_help_panel="Training")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, show_default="recipe", help="Global batch over all processes (A.3: 16).", rich_help_panel="Training")] = None,
    lr: Annotated[float | None, typer.Option(min=0.0, show_default="recipe", help="Base learning rate (A.3: AdamW 1e-4; HRNet SGD 2e-2).", rich_help_panel="Training")] = None,
    weight_decay: Annotated[float | None, typer.Option(min=0.0, show_default="recipe", help="Weight decay (A.3: AdamW 0.05; HRNet SGD 1e-4).", rich_help_panel="Training")] = None,
    backbone_lr_multiplier: Annotated[float | None, typer.Option(min=0.0, show_default="recipe", help="Backbone lr factor (Mask2Former: 0.1; HRNet: 1).", rich_help_panel="Training")] = None,
    grad_clip: Annotated[float | None, typer.Option(min=0.0, show_default="recipe", help="Full-model gradient norm clip (Mask2Former: 0.01; HRNet: none; 0: off).", rich_help_panel="Training")] = None,
    crop: Annotated[int | None, typer.Option(min=32, max=2048, show_default="recipe", help="Training crop (ADE20K: 512, Swin-L 640; COCO: 1024).", rich_help_panel="Training")] = None,
    seed: Annotated[int, typer.Option(help="Seed of weights, sample order, p_aug draws, augmentation and the loss's random draws (per step, so --resume is exact).", rich_help_panel="Training")] = 0,
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
    eval_size: Annotated[int | None, typer.Option(min=32, show_default="recipe", help="Short side at test time (default: ADE20K the crop size, COCO 800).", rich_help_panel="Evaluation")] = None,
    multiscale: Annotated[bool, typer.Option("--multiscale", help="Also evaluate with flip + scales 0.5..1.75.", rich_help_panel="Evaluation")] = False,
    process_group_timeout: ProcessGroupTimeoutOpt = PROCESS_GROUP_TIMEOUT,
):
    """Train Mask2Former (or HRNet) on real + synthetic data (paper §3.4) and write metrics.json."""
    args = SimpleNamespace(**locals())
    quiet.quiet()
    plan = threads.configure()
    with user_errors(console):
        note = plan.workers_note(args.num_workers)
        if note:
            console.print(f"[yellow]{note}[/]")
        args.num_workers = plan.workers(args.num_workers)
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


if __name__ == "__main__":
    run_cli(app, console, hint="continue with --resume latest")
