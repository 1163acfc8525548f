"""Train Mask2Img (paper §3.2, appendix A.4): a ControlNet on the frozen SDXL-base that paints an image for
a segmentation colour map and a caption.

    accelerate launch train_mask2img.py --data ade20k --data-root PATH       # -> runs/mask2img-ade20k/
    accelerate launch train_mask2img.py ... --resume latest                   # continue a stopped run

Each training triplet is [caption, colour map, image]: the caption from caption.py's manifest, the colour
map drawn on the fly from the real annotation with the generation palette (NEAREST only), flipped and
cropped together with the image. The ControlNet starts as a copy of the UNet's encoder
(ControlNetModel.from_unet, Zhang et al. 2023) or from --controlnet; the base UNet, VAE and text
encoders stay frozen. Paper defaults: SDXL-base, resolution 768, 30,000 iterations, lr 1e-5, AdamW,
random flip. The global batch (--global-batch-size, A.4 gives none: 32) is the same on any number of
processes: --batch-size only caps the per-process micro-batch, gradient accumulation makes up the rest;
a run resumed on another process count continues the same run. SIGTERM saves a checkpoint at the end of
the step and exits 143 (docs/training-on-clusters.md). An SD-1.5-style --pretrained pipeline works too
(appendix A.11): told from its folder.

The run folder ends as a ControlNetModel folder (ControlNetModel.from_pretrained(folder)) with
seggen.json ({"base": the --pretrained pipeline, ...}) and palette.json beside it, so imgsyn.py and
masksyn.py need only the folder; it also holds options.json, stats.jsonl, validation/step-N.png grids
(held-out samples of the validation split: --validation-captions, else captions/{data}_val.jsonl; also sent
with their captions to TensorBoard or W&B, --report-to), checkpoint-N/ folders and cache/ (the caption
embeddings, reused on resume; delete it when done).
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

from common import SegGenError
from common.masks.colormap import palette_for
from common.data import subset
from common.data.datasets import default_data_root, read_dataset
from common.runtime.lock import output_lock
from common.runtime.weights import SAFE, check_safetensors
from common.data.paths import captions_path, mask2img_dir, record_path
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
    from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel

    # ---------------------------------------------------------------- setup: every check before heavy work
    quiet.quiet()
    plan = threads.configure()
    data_root = a.data_root or default_data_root()
    captions = a.captions or captions_path(a.data, a.split)
    out = a.output_dir or mask2img_dir(a.data)
    base = inspect_base(a.pretrained)
    check_resolution(a.resolution, base)
    check_vae(a.vae)
    check_controlnet(a.controlnet, base)
    resume_from = resolve_trainer_resume(a.resume, out, console.print, "mask2img", "controlnet", a.max_steps)
    check_cache_latents(a.cache_latents, a.center_crop)
    samples, texts = read_captions(captions, read_dataset(a.data, data_root, a.split))
    if a.real_subset is not None:  # the one subset every stage uses (common/data/subset.py)
        keep = subset.captioned([s.id for s in samples], a.real_subset, captions)
        samples, texts = [s for s in samples if s.id in keep], [t for s, t in zip(samples, texts) if s.id in keep]
    samples, texts = samples[:a.max_train_samples], texts[:a.max_train_samples]  # None: all
    val_set, val_note = pick_validation(data=a.data, data_root=data_root, split=a.split, validation_captions=a.validation_captions,
                                      num_validation=a.num_validation, train_samples=samples, train_texts=texts, need_samples=True)
    palette = palette_for(a.data, a.palette)
    note = plan.workers_note(a.num_workers)
    a.num_workers = plan.workers(a.num_workers)

    accelerator, weight_dtype, tracking = make_accelerator(a, out, console)
    held.enter_context(output_lock(out, accelerator.process_index, "--output-dir"))  # one writer per run folder
    main_proc = accelerator.is_main_process
    split, options, log = start_run(a, out, accelerator, resume_from, "mask2img", {
        "data_root": Path(data_root).resolve(), "captions": Path(captions).resolve(), "output_dir": out, "resume_from": resume_from,
        "is_sdxl": base.is_sdxl, "mixed_precision": accelerator.mixed_precision, "samples": len(samples)}, console.print)
    if main_proc:
        for line in (note, caption_cut_note(a.pretrained, samples, texts, captions), val_note):
            if line:
                console.print(f"[yellow]note:[/] {line}")
        console.print(f"Mask2Img ({'SDXL' if base.is_sdxl else 'SD-1.5'} base {a.pretrained}, ControlNet "
                      f"{a.controlnet or 'copied from its UNet'}) on {a.data}/{a.split}: "
                      f"{len(samples)} captioned samples from {data_root}, captions {captions} -> {out}; {split.describe()}")

    # ---------------------------------------------------------------- data
    # Every caption, held-out ones too, is encoded once, then the text encoders are freed (SDXL's two are 1.6 B parameters).
    embeddings, val_set.embeddings = cache_caption_sets(a.pretrained, base, [(texts, out / "cache"), (val_set.texts, out / "cache" / "validation")],
                                                     accelerator, dtype=weight_dtype, console=console if main_proc else None)
    empty = embeddings.empty()  # the empty prompt: SD-1.5's unconditional embedding
    dataset = ColorMapDataset(samples, a.data, palette, a.resolution, embeddings, flip_p=0.5 if a.random_flip else 0.0,
                              center_crop=a.center_crop)

    # ---------------------------------------------------------------- model
    noise_scheduler = DDPMScheduler.from_pretrained(a.pretrained, subfolder="scheduler")
    vae = load_vae(a, accelerator.device, weight_dtype)  # frozen; fp32 unless --vae (SDXL's overflows in fp16)
    if a.cache_latents:
        dataset.latents = cache_latents(vae, dataset, "pixel_values", out / "cache", accelerator, a.vae or a.pretrained,
                                        console=console if main_proc else None)
    unet = UNet2DConditionModel.from_pretrained(a.pretrained, subfolder="unet", **SAFE)
    # The ControlNet: a trainable copy of the UNet's encoder whose zero convolutions start silent
    # (Zhang et al. 2023), or an existing one. Its conditioning embedding downsamples as the VAE does.
    if a.controlnet:
        controlnet = ControlNetModel.from_pretrained(a.controlnet, **SAFE)
    else:
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels(base.vae_factor))
    # Frozen: SDXL-base stays as it is, in the training dtype.
    unet.requires_grad_(False).to(accelerator.device, weight_dtype)
    controlnet.train()
    if a.gradient_checkpointing:  # both: the gradient flows back through the frozen UNet into the residuals
        unet.enable_gradient_checkpointing()
        controlnet.enable_gradient_checkpointing()
    ema = make_ema(controlnet, ControlNetModel, a.ema_decay, accelerator) if a.ema else None
    register_diffusers_hooks(accelerator, ControlNetModel, "controlnet")

    optimizer = make_optimizer(controlnet.parameters(), a.lr, a.use_8bit_adam, a.weight_decay)
    lr_scheduler = make_lr_scheduler(a, optimizer)
    controlnet, optimizer, lr_scheduler = accelerator.prepare(controlnet, optimizer, lr_scheduler)

    global_step, last_ckpt = 0, resume_from
    if resume_from is not None:
        load_checkpoint(accelerator, resume_from, ema)
        global_step = checkpoint_step(resume_from)
        check_resumed_schedule(lr_scheduler, global_step, resume_from)
        accelerator.step = 0  # micro-steps counted from this optimizer step (the accumulation may differ from the checkpoint's)
        if main_proc:
            console.print(f"resumed from {resume_from} at step {global_step}")
    loader = step_loader(dataset, a, accelerator, split, global_step)  # starts where the checkpoint stopped
    init_run_trackers(accelerator, "mask2img", options, out, tracking)

    # ---------------------------------------------------------------- loop
    meter = StepMeter("Mask2Img", log, accelerator, global_step, a.max_steps, options["global_batch"], console)
    for batch in loader:
        if global_step >= a.max_steps:
            break
        gens = sample_generators(a.seed, batch["position"], accelerator.device)  # per sample: any split of the global batch draws alike
        batch = to_device(batch, accelerator.device, weight_dtype)
        with accelerator.accumulate(controlnet):
            latents = sample_latents(batch, "pixel_values", vae, gens)  # (B, 4, R/8, R/8)
            noisy, t, target = noisy_latents_per_sample(latents.to(weight_dtype), noise_scheduler, gens)
            embeds, pooled = drop_captions_per_sample(batch["prompt_embeds"], batch.get("pooled_prompt_embeds"), a.caption_dropout,
                                                      gens, empty, base.force_zeros_for_empty_prompt)
            cond = {"text_embeds": pooled, "time_ids": batch["time_ids"]} if base.is_sdxl else None
            # The colour map enters in [0, 1], as in diffusers' ControlNet trainers and pipelines.
            control = batch["colormap"].to(weight_dtype) / 255  # (B, 3, R, R)
            down, mid = controlnet(noisy, t, encoder_hidden_states=embeds, added_cond_kwargs=cond, controlnet_cond=control,
                                   return_dict=False)
            pred = unet(noisy, t, encoder_hidden_states=embeds, added_cond_kwargs=cond,
                        down_block_additional_residuals=[r.to(weight_dtype) for r in down],
                        mid_block_additional_residual=mid.to(weight_dtype)).sample
            loss = F.mse_loss(pred.float(), target.float())
            loss_value = accelerator.reduce(loss.detach(), "mean").item()  # the same number on every process
            check_finite(loss_value, global_step + 1, last_ckpt)  # before backward: the weights stay good
            grad_norm = optimizer_step(accelerator, controlnet, optimizer, lr_scheduler, loss, a.max_grad_norm)
        meter.micro_step(loss_value)
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        if ema is not None:
            ema.step(controlnet.parameters())
        meter.step(global_step, lr_scheduler.get_last_lr()[0], grad_norm)
        if a.checkpointing_steps and global_step % a.checkpointing_steps == 0:
            last_ckpt = save_trainer_checkpoint(accelerator, out, global_step, a.checkpoints_total_limit, "mask2img")
        if a.validation_steps and (global_step % a.validation_steps == 0 or global_step == a.max_steps):
            if main_proc:
                with ema_weights(ema, controlnet):  # sample with the EMA weights
                    grid = validate(a, base, accelerator, unet, accelerator.unwrap_model(controlnet), vae, val_set, empty, palette)
                report_validation(accelerator, log, global_step, grid, val_set, {}, out)  # PNG, stats.jsonl, trackers
            accelerator.wait_for_everyone()
        if global_step < a.max_steps:
            stop_if_preempted(accelerator, out, global_step, last_ckpt, a, "mask2img", meter)
    meter.close()

    # ---------------------------------------------------------------- final save: the ControlNet + its base
    accelerator.wait_for_everyone()
    if main_proc:
        controlnet = accelerator.unwrap_model(controlnet)
        if ema is not None:
            ema.copy_to(controlnet.parameters())
        controlnet.save_pretrained(out)
        palette.save(out / "palette.json")
        notes = []  # local folders relative to the run folder, hub ids as they are: the run can move (common/data/paths.py)
        (out / "seggen.json").write_text(json.dumps({
            "stage": "mask2img", "base": record_path(a.pretrained, out, notes), "vae": a.vae and record_path(a.vae, out, notes), "data": a.data, "palette": "palette.json",
            "palette_kind": a.palette, "resolution": a.resolution, "steps": global_step, "is_sdxl": base.is_sdxl,
        }, indent=2) + "\n")
        card_for_run(out)  # README.md, as diffusers' trainers write: base, data, steps, options, last validation grid
        for note in notes:
            console.print(f"[yellow]note:[/] {note}")
        console.print(f"[green]done[/]: {global_step} steps in {time.perf_counter() - meter.t_start:.1f} s; "
                      f"ControlNet + seggen.json + palette.json -> {out}")
    accelerator.end_training()
    return out


CONDITIONING_CHANNELS = (16, 32, 96, 256)  # ControlNet's default conditioning embedding (diffusers), 3 stride-2 convs


def conditioning_channels(vae_factor: int) -> tuple[int, ...]:
    """The conditioning embedding's channels for a VAE that downsamples by `vae_factor` (a power of 2, ≤ 8):
    ControlNet's default, cut to one stride-2 conv per halving, so the colour map meets the latents.
    SDXL's factor 8 keeps the default exactly; the toy base's factor 4 drops the last block."""
    n = vae_factor.bit_length() - 1  # log2
    if vae_factor != 2 ** n or n >= len(CONDITIONING_CHANNELS):
        raise SegGenError(f"--pretrained: its VAE downsamples by {vae_factor}; a ControlNet conditioning embedding "
                          f"is built for a factor of 1, 2, 4 or 8 only")
    return CONDITIONING_CHANNELS[: n + 1]


def check_controlnet(path: str | None, base) -> None:
    """--controlnet: a ControlNetModel folder whose conditioning embedding downsamples like the base's VAE."""
    if path is None:
        return
    config = Path(path) / "config.json"
    if not config.is_file():
        raise SegGenError(f"--controlnet {path}: no ControlNet folder there (no config.json); pass a folder written by "
                          "ControlNetModel.save_pretrained, or leave --controlnet out to copy the UNet's encoder")
    cfg = json.loads(config.read_text())
    if cfg.get("_class_name") != "ControlNetModel":
        raise SegGenError(f"--controlnet {path}: config.json describes a {cfg.get('_class_name')}, not a ControlNetModel")
    check_safetensors(path, "--controlnet")  # pickle-only weights are refused before any model loads
    factor = 2 ** (len(cfg.get("conditioning_embedding_out_channels", CONDITIONING_CHANNELS)) - 1)
    if factor != base.vae_factor:
        raise SegGenError(f"--controlnet {path}: its conditioning embedding downsamples by {factor}, the VAE of "
                          f"{base.path} by {base.vae_factor}; the colour map would not meet the latents")


@torch.no_grad()
def validate(a, base, accelerator, unet, controlnet, vae, val_set, empty, palette) -> Image.Image:
    """Sample an image for the real colour map and caption of each held-out sample (centre crop, no flip;
    common/diffusion/validation.py); the grid, per row: colour map, sample, real image."""
    from diffusers import (
        EulerDiscreteScheduler, StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline,
    )

    scheduler = EulerDiscreteScheduler.from_pretrained(a.pretrained, subfolder="scheduler")
    if base.is_sdxl:
        pipe = StableDiffusionXLControlNetPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                                   tokenizer_2=None, unet=unet, controlnet=controlnet, scheduler=scheduler)
    else:
        pipe = StableDiffusionControlNetPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, controlnet=controlnet,
                                                 scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    items = validation_items(val_set, a.data, palette, a.resolution, need_image=True)
    dev, dtype = accelerator.device, unet.dtype
    kw = validation_prompts(items, base, empty, dev, dtype)
    # Colour maps at exactly the output size: the pipeline's own resize (LANCZOS) never touches them.
    maps = [Image.fromarray(it["colormap"].permute(1, 2, 0).numpy()) for it in items]
    # The residuals join the UNet in its dtype, as in the training step (CPU autocast leaves group_norm
    # with mixed dtypes otherwise).
    def cast(module, args, output):
        down, mid = output
        return [r.to(dtype) for r in down], mid.to(dtype)

    hook = controlnet.register_forward_hook(cast)
    with accelerator.autocast():
        images = pipe(**kw, image=maps, height=a.resolution, width=a.resolution, num_inference_steps=a.validation_inference_steps,
                      guidance_scale=a.validation_guidance, generator=torch.Generator(dev).manual_seed(a.seed),
                      output_type="pil").images
    hook.remove()
    rows = [[m, im, Image.fromarray(((it["pixel_values"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))]
            for m, im, it in zip(maps, images, items)]
    return image_grid(rows)


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
    controlnet: Annotated[str | None, typer.Option(help="Start from this ControlNet folder instead of a copy of the UNet's encoder.", rich_help_panel="Model")] = None,
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
    ema: Annotated[bool, typer.Option(help="Keep an EMA of the ControlNet weights; it is what gets saved and sampled.", rich_help_panel="Training")] = False,
    ema_decay: EmaDecayOpt = 0.9999,
    seed: SeedOpt = 0,
    mixed_precision: MixedPrecisionOpt = None,
    cache_latents: CacheLatentsOpt = False,
    gradient_checkpointing: GradientCheckpointingOpt = False,
    use_8bit_adam: Use8bitAdamOpt = False,
    allow_tf32: AllowTf32Opt = True,
    process_group_timeout: ProcessGroupTimeoutOpt = PROCESS_GROUP_TIMEOUT,
    output_dir: Annotated[Path | None, typer.Option(help="Run folder (default: runs/mask2img-{data}).", rich_help_panel="Output")] = None,
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
    """Train a ControlNet on the frozen SDXL-base into Mask2Img on (caption, colour map, image) triplets (paper §3.2, A.4)."""
    call(train, locals(), console)


if __name__ == "__main__":
    run(app, console, hint="continue with --resume latest")
