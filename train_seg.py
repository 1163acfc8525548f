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
the table RECIPES (common/seg/recipes.py, every value's source in docs/training-recipes.md; --help lists
it), and everywhere AdamW, weight decay 0.05 (none on norms and embeddings), backbone lr x 0.1, full-model
gradient clipping at 0.01. Data and augmentation: common/seg/data.py (ADE20K: random short-side resize,
crop, SSD colour jitter, flip; COCO: large-scale jitter, flip; crowd regions left out). Model, inference,
evaluation: common/seg/model.py, common/seg/inference.py, common/seg/evaluate.py.

HRNetV2 (§4, A.3, Table 4b; common/seg/hrnet.py) is the other segmenter: `--backbone hrnet-w48` (ImageNet
weights) or `hrnet-small` (random, CPU-sized), with its own RECIPES row (SGD, poly, and HRNet's official
ADE20K pipeline: random scaling, random 520 crop, flip), the same loop, strategies and semantic
evaluation; its model/ is hrnet.save's folder.

Evaluation runs at each image's original resolution with Mask2Former's semantic / panoptic / instance
inference -> mIoU, PQ, mask AP (common/seg/inference.py, common/seg/evaluate.py, common/seg/metrics.py).

With --eval-every N (Fig. 11) the model is also evaluated every N steps on the validation split (or a
fixed --eval-samples subset): metrics_history.jsonl, the trackers (--report-to), and the best model so far
in model-best/ (common/seg/validation.py).

The run folder holds options.json, stats.jsonl (loss, lr, it/s, what was drawn from where),
checkpoints/phase{k}-step{N}/ (accelerate state + config.json: loadable with from_pretrained),
model/ (the final model + image processor), metrics.json, and with --eval-every metrics_history.jsonl
and model-best/.
"""

from __future__ import annotations

from common.report.card import card_for_run
from common.runtime import quiet  # first: threads sets OMP_WAIT_POLICY before torch starts its OpenMP pool
from common.runtime import threads

from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import typer

from common import SegGenError
from common.runtime.checkpoint import resolve_seg_resume, start_seg
from common.runtime.cli import ConfigOpt, Data, MixedPrecision, ProcessGroupTimeoutOpt, Tracker, user_errors
from common.runtime.cluster import PROCESS_GROUP_TIMEOUT, check_seg_batch, on_sigterm, process_group_kwargs
from common.runtime.cli import run as run_cli
from common.data.datasets import default_data_root, read_dataset
from common.runtime.lock import output_lock
from common.data.paths import seg_run_dir
from common.runtime.progress import console
from common.seg.batches import MixedBatches
from common.seg.data import SegData, read_sources, synthetic_weights
from common.seg.loop import Loop
from common.seg.evaluate import check_eval_output, eval_dir, evaluate_scales, finish
from common.seg.model import Backbone, build_segmenter, freeze_unused, is_hrnet, save_model
from common.seg.recipes import RECIPES, Sampling, Strategy, Task, plan_phases, recipe_table, resolve
from common.seg.tracking import check_tracker, init_trackers, log_with
from common.seg.validation import BEST, HISTORY

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


# ---------------------------------------------------------------- main

def run(a) -> dict:
    from accelerate import Accelerator

    # ---- 1. setup: the recipe fills unset options; every check before any heavy work
    a.data = a.data.value
    resolve(a)
    a.data_root = a.data_root if a.data_root is not None else default_data_root()
    output_dir = a.output_dir or (eval_dir(a.checkpoint) if a.eval_only else seg_run_dir(a.data, a.strategy.value))
    if a.eval_only:
        check_eval_output(output_dir, a.metrics_file)
    accelerator = Accelerator(mixed_precision=a.mixed_precision, step_scheduler_with_optimizer=False,
                              log_with=log_with(a.report_to), project_dir=str(output_dir),
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
    init_trackers(accelerator, a, output_dir)
    loop = Loop(a, accelerator, net, processor, SegData([real, *synthetic], a.data, a.crop, augment=a.augment, task=a.task, segments=not is_hrnet(key)),
                ["real", *[str(f) for f in folders]], output_dir, phases, MixedBatches, weights, val=val)
    start_phase, start_step = loop.resume(resume_from, say)
    for k in range(start_phase, len(phases)):
        model = loop.phase(k, start_step if k == start_phase else 0, resume_from if k == start_phase else None, say)

    # ---- 5. the final model and its evaluation
    if main_proc:
        save_model(accelerator.unwrap_model(model), processor, output_dir / "model")
    result = {"data": a.data, "task": a.task, "strategy": a.strategy.value, "recipe": a.recipe, "weights": a.weights_loaded, "phases": [{"name": n, "p_aug": p, "steps": s} for n, p, s in phases],
              **loop.totals(), "model": str(output_dir / "model")}
    if loop.validator and loop.validator.best:  # --eval-every: the history and the best model beside the last
        result.update(history=str(output_dir / HISTORY), best={**loop.validator.best, "model": str(output_dir / BEST)})
    if result["skipped_images"]:
        say(f"[yellow]{result['skipped_images']} training image(s) without any labelled pixel were left out of the loss "
            f"({loop.skipped_steps} whole step(s) skipped)[/]")
    result.update(evaluate_scales(model, val, a, a.eval_size, processor.image_mean, processor.image_std, accelerator))
    loop.close()
    accelerator.end_training()
    result = finish(result, output_dir, main_proc, a.metrics_file)
    if main_proc:
        card_for_run(output_dir)  # model/README.md: the model card (data, steps, options, metrics)
    return result


@app.command(epilog=recipe_table())
def main(
    data: Annotated[Data, typer.Option(help="Dataset: ADE20K (semantic) or COCO panoptic (panoptic / instance).", rich_help_panel="Data")] = Data.ade20k,
    data_root: Annotated[Path | None, typer.Option(help="Dataset root (default: $SEGGEN_DATASETS, else ./datasets).", rich_help_panel="Data")] = None,
    synthetic: Annotated[list[Path], typer.Option(help="Synthetic folder (masksyn.py / imgsyn.py output); repeatable. FOLDER:k takes only the first k samples per source (count ablations, Fig. 8 / Table 8). Default: whichever of synth/masksyn-{data}, synth/imgsyn-{data} exist.", rich_help_panel="Data")] = [],  # noqa: B006
    task: Annotated[Task | None, typer.Option(show_default="recipe", help="semantic (ADE20K), panoptic or instance (COCO); default by --data.", rich_help_panel="Data")] = None,
    strategy: Annotated[Strategy | None, typer.Option(show_default="recipe", help="aug: replace real samples by synthetic ones with p_aug (§3.4; ADE20K's default); pretrain: synthetic then real (COCO's default); real: baseline; real-pretrain: real then real (Tables 2/3's 50+50 baseline); synthetic: synthetic only.", rich_help_panel="Data")] = None,
    p_aug: Annotated[float | None, typer.Option(min=0.0, max=1.0, show_default="0.6", help="--strategy aug: the probability that a real sample is replaced by a synthetic one (§3.4, §4.2: 0.6). Refused with the other strategies, where it has no effect.", rich_help_panel="Data")] = None,
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
    output_dir: Annotated[Path | None, typer.Option(help="Run folder (default runs/seg-{data}-{strategy}; with --eval-only, eval-NAME beside --checkpoint NAME, so that no training run's metrics.json is replaced).", rich_help_panel="Output")] = None,
    resume: Annotated[str | None, typer.Option(help="'latest' or a checkpoints/phase*-step* folder.", rich_help_panel="Output")] = None,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Save a checkpoint every N steps (and at each phase's end); 0: never.", rich_help_panel="Output")] = 5000,
    keep_checkpoints: Annotated[int, typer.Option(min=0, help="Keep the last N checkpoints (0: all).", rich_help_panel="Output")] = 2,
    log_every: Annotated[int, typer.Option(min=1, help="Write a stats.jsonl line every N steps.", rich_help_panel="Output")] = 50,
    report_to: Annotated[Tracker, typer.Option(help="Also send the loss, lr and the --eval-every figures (val/mIoU, val/PQ, val/AP) to a tracker through accelerate (tensorboard: RUN/train_seg/; needs its package).", rich_help_panel="Output")] = Tracker.none,
    metrics_file: Annotated[Path | None, typer.Option(help="Where metrics.json goes (default: in --output-dir).", rich_help_panel="Output")] = None,
    eval_only: Annotated[bool, typer.Option("--eval-only", help="Only evaluate --checkpoint on the val split.", rich_help_panel="Evaluation")] = False,
    checkpoint: Annotated[Path | None, typer.Option(help="Model to evaluate: a run's model/ or checkpoints/phase*-step* folder.", rich_help_panel="Evaluation")] = None,
    eval_size: Annotated[int | None, typer.Option(min=32, show_default="recipe", help="Short side at test time (default: ADE20K the crop size, COCO 800).", rich_help_panel="Evaluation")] = None,
    multiscale: Annotated[bool, typer.Option("--multiscale", help="Also evaluate with flip + scales 0.5..1.75.", rich_help_panel="Evaluation")] = False,
    eval_every: Annotated[int, typer.Option(min=0, help="Evaluate every N steps (and at each phase's end) at a single scale (Fig. 11; Mask2Former's configs: TEST.EVAL_PERIOD 5000): metrics_history.jsonl, the trackers, the best model in model-best/. 0: only at the end.", rich_help_panel="Evaluation")] = 0,
    eval_samples: Annotated[int | None, typer.Option(min=1, show_default="all", help="--eval-every on a fixed subset of this many validation images (evenly spaced over the split; the final evaluation stays whole).", rich_help_panel="Evaluation")] = None,
    process_group_timeout: ProcessGroupTimeoutOpt = PROCESS_GROUP_TIMEOUT,
    config: ConfigOpt = None,
):
    """Train Mask2Former (or HRNet) on real + synthetic data (paper §3.4) and write metrics.json."""
    args = SimpleNamespace(**{k: v for k, v in locals().items() if k != "config"})  # --config: defaults only
    quiet.quiet()
    plan = threads.configure()
    with user_errors(console):
        note = plan.workers_note(args.num_workers)
        if note:
            console.print(f"[yellow]{note}[/]")
        args.num_workers = plan.workers(args.num_workers)
        args.report_to = args.report_to.value
        args.mixed_precision = args.mixed_precision.value if args.mixed_precision else None
        check_tracker(args.report_to)
        if args.checkpoint is not None and not (args.checkpoint / "config.json").is_file():
            raise SegGenError(f"--checkpoint {args.checkpoint}: no config.json there; pass a run's model/ or checkpoints/phase*-step* folder")
        run(args)


if __name__ == "__main__":
    run_cli(app, console, hint="continue with --resume latest")
