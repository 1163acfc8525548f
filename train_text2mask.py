"""Train Text2Mask (paper §3.2, appendix A.4): the SDXL-base UNet fine-tuned to paint segmentation colour
maps from captions.

    accelerate launch train_text2mask.py --data ade20k --data-root PATH      # -> runs/text2mask-ade20k/
    accelerate launch train_text2mask.py ... --resume latest                  # continue a stopped run

Each training pair is [caption, colour map]: the caption from caption.py's manifest, the colour map drawn
on the fly from the real annotation with the generation palette (NEAREST only). The colour map is the
picture: the VAE encodes it and the UNet learns to denoise it, conditioned on the caption (and on SDXL's
size/crop time ids). Paper defaults: SDXL-base, resolution 768, 30,000 iterations, lr 1e-5, AdamW,
random flip. The global batch (--global-batch-size, A.4 gives none: 32) is the same on any number of
processes: --batch-size only caps the per-process micro-batch, gradient accumulation makes up the rest;
a run resumed on another process count continues the same run. SIGTERM saves a checkpoint at the end of
the step and exits 143 (docs/training-on-clusters.md). An SD-1.5-style --pretrained pipeline works too
(appendix A.11): told from its folder.

The run folder ends as a complete diffusers pipeline (StableDiffusionXLPipeline.from_pretrained(folder))
with palette.json and seggen.json beside model_index.json; it also holds options.json, stats.jsonl,
validation/step-N.png grids (held-out captions: --validation-captions, else the validation split's; also
sent with their captions to TensorBoard or W&B, --report-to), checkpoint-N/ folders and cache/ (the
caption embeddings, reused on resume; delete it when done).
"""

from __future__ import annotations

from common.runtime import quiet  # first: OMP_WAIT_POLICY before torch starts its threads
from common.runtime import threads

import json
import time
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
import typer
from PIL import Image
from rich.console import Console

from common.masks.colormap import color_to_label, label_to_color, palette_for
from common.data import subset
from common.data.datasets import default_data_root, read_dataset
from common.runtime.lock import output_lock
from common.runtime.weights import SAFE
from common.data.paths import captions_path, record_path, text2mask_dir
from common.runtime.checkpoint import checkpoint_step, register_diffusers_hooks, resolve_trainer_resume, save_trainer_checkpoint
from common.runtime.cluster import PROCESS_GROUP_TIMEOUT, on_sigterm
from common.report.card import card_for_run
from common.runtime.checkpoint import load as load_checkpoint
from common.runtime.cli import (  # the command line both trainers share: choices and options, declared once
    ConfigOpt,
    AllowTf32Opt, BatchSizeOpt, CacheLatentsOpt, CaptionDropoutOpt, CaptionsOpt, CenterCropOpt, CheckpointingStepsOpt,
    CheckpointsTotalLimitOpt, Data, DataOpt, DataRootOpt, EmaDecayOpt, GlobalBatchSizeOpt,
    GradientCheckpointingOpt, ProcessGroupTimeoutOpt, LrOpt, LrScheduleOpt, LrWarmupStepsOpt, MaxGradNormOpt, MaxStepsOpt, MaxTrainSamplesOpt, RealSubsetOpt,
    MixedPrecisionOpt, NumWorkersOpt, PaletteKind, PaletteOpt, PretrainedOpt, RandomFlipOpt, ReportToOpt,
    NumValidationOpt, ResolutionOpt, ResumeOpt, Schedule, SeedOpt, Split, SplitOpt, Tracker, Use8bitAdamOpt, VaeOpt,
    ValidationCaptionsOpt, ValidationGuidanceOpt, ValidationInferenceStepsOpt, ValidationStepsOpt, WeightDecayOpt, call, run,
)
from common.diffusion.sdxl import (
    PAPER_BASE, cache_caption_sets, check_resolution, check_vae, inspect_base, validation_prompts,
)
from common.diffusion.training import (
    ColorMapDataset, StepMeter, cache_latents, caption_cut_note, check_cache_latents, check_finite, check_resumed_schedule,
    drop_captions_per_sample, ema_weights, image_grid, init_run_trackers, load_vae, make_accelerator, make_ema, make_lr_scheduler, make_optimizer,
    noisy_latents_per_sample, optimizer_step, read_captions, sample_generators, sample_latents, start_run, step_loader,
    stop_if_preempted, to_device,
)
from common.diffusion.validation import pick_validation, report_validation, validation_items

console = Console(stderr=True, soft_wrap=True)
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def train(a: SimpleNamespace) -> Path:
    """The whole run: checks, data, model, loop, final save. Returns the output folder."""
    with ExitStack() as held:  # the lock on --output-dir, taken once the accelerator knows this rank
        held.enter_context(on_sigterm())  # SIGTERM: the step in progress ends, a checkpoint is saved (cluster.py)
        return _train(a, held)


def _train(a: SimpleNamespace, held: ExitStack) -> Path:
    from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DConditionModel

    # ---------------------------------------------------------------- setup: every check before heavy work
    quiet.quiet()
    plan = threads.configure()
    data_root = a.data_root or default_data_root()
    captions = a.captions or captions_path(a.data, a.split)
    out = a.output_dir or text2mask_dir(a.data)
    base = inspect_base(a.pretrained)
    check_resolution(a.resolution, base)
    check_vae(a.vae)
    resume_from = resolve_trainer_resume(a.resume, out, console.print, "text2mask", "unet", a.max_steps)
    check_cache_latents(a.cache_latents, a.center_crop)
    samples, texts = read_captions(captions, read_dataset(a.data, data_root, a.split))
    if a.real_subset is not None:  # the one subset every stage uses (common/data/subset.py)
        keep = subset.captioned([s.id for s in samples], a.real_subset, captions)
        samples, texts = [s for s in samples if s.id in keep], [t for s, t in zip(samples, texts) if s.id in keep]
    samples, texts = samples[:a.max_train_samples], texts[:a.max_train_samples]  # None: all
    val_set, val_note = pick_validation(data=a.data, data_root=data_root, split=a.split, validation_captions=a.validation_captions,
                                      num_validation=a.num_validation, train_samples=samples, train_texts=texts, need_samples=False)
    palette = palette_for(a.data, a.palette)
    note = plan.workers_note(a.num_workers)
    a.num_workers = plan.workers(a.num_workers)

    accelerator, weight_dtype, tracking = make_accelerator(a, out, console)
    held.enter_context(output_lock(out, accelerator.process_index, "--output-dir"))  # one writer per run folder
    main_proc = accelerator.is_main_process
    split, options, log = start_run(a, out, accelerator, resume_from, "text2mask", {
        "data_root": Path(data_root).resolve(), "captions": Path(captions).resolve(), "output_dir": out, "resume_from": resume_from,
        "is_sdxl": base.is_sdxl, "mixed_precision": accelerator.mixed_precision, "samples": len(samples)}, console.print)
    if main_proc:
        for line in (note, caption_cut_note(a.pretrained, samples, texts, captions), val_note):
            if line:
                console.print(f"[yellow]note:[/] {line}")
        console.print(f"Text2Mask ({'SDXL' if base.is_sdxl else 'SD-1.5'} base {a.pretrained}) on {a.data}/{a.split}: "
                      f"{len(samples)} captioned samples from {data_root}, captions {captions} -> {out}; {split.describe()}")

    # ---------------------------------------------------------------- data
    # Every caption, held-out ones too, is encoded once, then the text encoders are freed (SDXL's two are 1.6 B parameters).
    embeddings, val_set.embeddings = cache_caption_sets(a.pretrained, base, [(texts, out / "cache"), (val_set.texts, out / "cache" / "validation")],
                                                     accelerator, dtype=weight_dtype, console=console if main_proc else None)
    empty = embeddings.empty()  # the empty prompt: SD-1.5's unconditional embedding
    dataset = ColorMapDataset(samples, a.data, palette, a.resolution, embeddings, flip_p=0.5 if a.random_flip else 0.0,
                              center_crop=a.center_crop, need_image=False)

    # ---------------------------------------------------------------- model
    noise_scheduler = DDPMScheduler.from_pretrained(a.pretrained, subfolder="scheduler")
    vae = load_vae(a, accelerator.device, weight_dtype)  # frozen; fp32 unless --vae (SDXL's overflows in fp16)
    if a.cache_latents:
        dataset.latents = cache_latents(vae, dataset, "colormap", out / "cache", accelerator, a.vae or a.pretrained,
                                        console=console if main_proc else None)
    unet = UNet2DConditionModel.from_pretrained(a.pretrained, subfolder="unet", **SAFE)
    unet.train()
    if a.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ema = make_ema(unet, UNet2DConditionModel, a.ema_decay, accelerator) if a.ema else None
    register_diffusers_hooks(accelerator, UNet2DConditionModel, "unet")

    optimizer = make_optimizer(unet.parameters(), a.lr, a.use_8bit_adam, a.weight_decay)
    lr_scheduler = make_lr_scheduler(a, optimizer)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)

    global_step, last_ckpt = 0, resume_from
    if resume_from is not None:
        load_checkpoint(accelerator, resume_from, ema)
        global_step = checkpoint_step(resume_from)
        check_resumed_schedule(lr_scheduler, global_step, resume_from)
        accelerator.step = 0  # micro-steps counted from this optimizer step (the accumulation may differ from the checkpoint's)
        if main_proc:
            console.print(f"resumed from {resume_from} at step {global_step}")
    loader = step_loader(dataset, a, accelerator, split, global_step)  # starts where the checkpoint stopped
    init_run_trackers(accelerator, "text2mask", options, out, tracking)

    # ---------------------------------------------------------------- loop
    meter = StepMeter("Text2Mask", log, accelerator, global_step, a.max_steps, options["global_batch"], console)
    for batch in loader:
        if global_step >= a.max_steps:
            break
        gens = sample_generators(a.seed, batch["position"], accelerator.device)  # per sample: any split of the global batch draws alike
        batch = to_device(batch, accelerator.device, weight_dtype)
        with accelerator.accumulate(unet):
            latents = sample_latents(batch, "colormap", vae, gens)  # the colour map is the picture Text2Mask learns to draw  # (B, 4, R/8, R/8)
            noisy, t, target = noisy_latents_per_sample(latents.to(weight_dtype), noise_scheduler, gens)
            embeds, pooled = drop_captions_per_sample(batch["prompt_embeds"], batch.get("pooled_prompt_embeds"), a.caption_dropout,
                                                      gens, empty, base.force_zeros_for_empty_prompt)
            cond = {"text_embeds": pooled, "time_ids": batch["time_ids"]} if base.is_sdxl else None
            pred = unet(noisy, t, encoder_hidden_states=embeds, added_cond_kwargs=cond).sample
            loss = F.mse_loss(pred.float(), target.float())
            loss_value = accelerator.reduce(loss.detach(), "mean").item()  # the same number on every process
            check_finite(loss_value, global_step + 1, last_ckpt)  # before backward: the weights stay good
            grad_norm = optimizer_step(accelerator, unet, optimizer, lr_scheduler, loss, a.max_grad_norm)
        meter.micro_step(loss_value)
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        if ema is not None:
            ema.step(unet.parameters())
        meter.step(global_step, lr_scheduler.get_last_lr()[0], grad_norm)
        if a.checkpointing_steps and global_step % a.checkpointing_steps == 0:
            last_ckpt = save_trainer_checkpoint(accelerator, out, global_step, a.checkpoints_total_limit, "text2mask")
        if a.validation_steps and (global_step % a.validation_steps == 0 or global_step == a.max_steps):
            if main_proc:
                with ema_weights(ema, unet):  # sample with the EMA weights
                    grid, figures = validate(a, base, accelerator, accelerator.unwrap_model(unet), vae, val_set, empty, palette)
                report_validation(accelerator, log, global_step, grid, val_set, figures, out)  # PNG, stats.jsonl, trackers
            accelerator.wait_for_everyone()
        if global_step < a.max_steps:
            stop_if_preempted(accelerator, out, global_step, last_ckpt, a, "text2mask", meter)
    meter.close()

    # ---------------------------------------------------------------- final save: a complete pipeline folder
    accelerator.wait_for_everyone()
    if main_proc:
        unet = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to(unet.parameters())
        extra = {"vae": vae.to(torch.float32)} if a.vae else {}
        pipe = DiffusionPipeline.from_pretrained(a.pretrained, unet=unet, **SAFE, **extra)
        pipe.save_pretrained(out)
        palette.save(out / "palette.json")
        (out / "seggen.json").write_text(json.dumps({
            "stage": "text2mask", "base": record_path(a.pretrained, out), "data": a.data, "palette": "palette.json", "palette_kind": a.palette,
            "resolution": a.resolution, "steps": global_step, "is_sdxl": base.is_sdxl,
        }, indent=2) + "\n")
        card_for_run(out)  # README.md, as diffusers' trainers write: base, data, steps, options, last validation grid
        console.print(f"[green]done[/]: {global_step} steps in {time.perf_counter() - meter.t_start:.1f} s; "
                      f"pipeline + palette.json -> {out}")
    accelerator.end_training()
    return out


@torch.no_grad()
def validate(a, base, accelerator, unet, vae, val_set, empty, palette) -> tuple[Image.Image, dict]:
    """Sample a colour map for each held-out caption (common/diffusion/validation.py); the grid (per row:
    sample, its colour → label projection redrawn, and the real colour map, centre crop, where the
    caption's sample is known) and how much of each sample is off-palette (farther than half the palette's
    smallest gap from every colour)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler.from_pretrained(a.pretrained, subfolder="scheduler")
    if base.is_sdxl:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                         unet=unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    items = validation_items(val_set, a.data, palette, a.resolution, need_image=False)
    dev = accelerator.device
    kw = validation_prompts(items, base, empty, dev, unet.dtype)
    with accelerator.autocast():
        images = pipe(**kw, height=a.resolution, width=a.resolution, num_inference_steps=a.validation_inference_steps,
                      guidance_scale=a.validation_guidance, generator=torch.Generator(dev).manual_seed(a.seed),
                      output_type="np").images  # (B, R, R, 3) float in [0, 1]
    samples = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    rows, off = [], []
    max_distance = palette.min_distance() / 2
    for cmap, item in zip(samples, items):
        label = color_to_label(cmap, palette, max_distance=max_distance)  # IGNORE where off-palette
        off.append(float((label == 255).mean()))
        projected = label_to_color(np.where(label == 255, 0, label), palette)
        real = [Image.fromarray(item["colormap"].permute(1, 2, 0).numpy())] if "colormap" in item else []
        rows.append([Image.fromarray(cmap), Image.fromarray(projected), *real])
    return image_grid(rows), {"off_palette": float(np.mean(off))}


@app.command()
def main(
    data: DataOpt = Data.ade20k,
    data_root: DataRootOpt = None,
    split: SplitOpt = Split.train,
    captions: CaptionsOpt = None,
    palette: PaletteOpt = PaletteKind.generation,
    random_flip: RandomFlipOpt = True,
    center_crop: CenterCropOpt = False,
    real_subset: RealSubsetOpt = None,
    max_train_samples: MaxTrainSamplesOpt = None,
    num_workers: NumWorkersOpt = None,
    pretrained: PretrainedOpt = PAPER_BASE,
    vae: VaeOpt = None,
    resolution: ResolutionOpt = 768,
    max_steps: MaxStepsOpt = 30_000,
    global_batch_size: GlobalBatchSizeOpt = 32,
    batch_size: BatchSizeOpt = 4,
    lr: LrOpt = 1e-5,
    lr_schedule: LrScheduleOpt = Schedule.constant_with_warmup,
    lr_warmup_steps: LrWarmupStepsOpt = 0,
    weight_decay: WeightDecayOpt = 1e-2,
    max_grad_norm: MaxGradNormOpt = 1.0,
    caption_dropout: CaptionDropoutOpt = 0.1,
    ema: Annotated[bool, typer.Option(help="Keep an EMA of the weights; it is what gets saved and sampled.", rich_help_panel="Training")] = False,
    ema_decay: EmaDecayOpt = 0.9999,
    seed: SeedOpt = 0,
    mixed_precision: MixedPrecisionOpt = None,
    cache_latents: CacheLatentsOpt = False,
    gradient_checkpointing: GradientCheckpointingOpt = False,
    use_8bit_adam: Use8bitAdamOpt = False,
    allow_tf32: AllowTf32Opt = True,
    process_group_timeout: ProcessGroupTimeoutOpt = PROCESS_GROUP_TIMEOUT,
    output_dir: Annotated[Path | None, typer.Option(help="Run folder (default: runs/text2mask-{data}).", rich_help_panel="Output")] = None,
    checkpointing_steps: CheckpointingStepsOpt = 500,
    checkpoints_total_limit: CheckpointsTotalLimitOpt = 3,
    resume: ResumeOpt = None,
    validation_steps: ValidationStepsOpt = 500,
    num_validation: NumValidationOpt = 4,
    validation_captions: ValidationCaptionsOpt = None,
    validation_inference_steps: ValidationInferenceStepsOpt = 30,
    validation_guidance: ValidationGuidanceOpt = 5.0,
    report_to: ReportToOpt = Tracker.tensorboard,
    config: ConfigOpt = None,
):
    """Fine-tune the SDXL-base UNet into Text2Mask on (caption, colour map) pairs (paper §3.2, A.4)."""
    call(train, locals(), console)


if __name__ == "__main__":
    run(app, console, hint="continue with --resume latest")
