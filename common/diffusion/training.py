"""What the two generator trainers share (paper §3.2, appendix A.4): train_text2mask.py and train_mask2img.py.

- the data: real annotations rendered to colour maps on the fly with the generation palette, NEAREST
  only, the same random crop and flip on image and colour map (`ColorMapDataset`), and a batch order
  that is a pure function of (seed, optimizer step, global batch) so that a resumed run sees exactly the
  batches an uninterrupted one would, on any number of processes (`StepBatches`); the noise, timestep,
  VAE draw and caption dropout of each sample come from its own stream position (`sample_generators`),
  so they do not depend on how the global batch is split either;
  optionally the VAE latents, encoded once for both flips of the centre crop (`cache_latents`);
- the run's set-up (`make_accelerator`, `load_vae`, `make_ema`, `make_lr_scheduler`, `step_loader`) and
  the pieces of a step (`sample_latents`, `noisy_latents`, `optimizer_step`, `StepMeter`, `ema_weights`);
- optimiser (AdamW / 8-bit AdamW), the run folder's options.json and stats.jsonl, the NaN stop.

Elsewhere: SDXL conditioning and base detection in common/diffusion/sdxl.py, checkpoints in common/runtime/checkpoint.py,
the shared options in common/runtime/cli.py. The training loops themselves stay in the two scripts, readable top
to bottom: set-up, data, model, loop (forward, loss, step), final save; what differs between Text2Mask
and Mask2Img stays visible there.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import SegGenError
from common.masks.colormap import Palette, label_to_color, panoptic_to_color, resize_nearest
from common.data.datasets import Sample, load_image, load_label, load_panoptic
from common.runtime.loader import as_tensors, collate
from common.data.manifest import CAPTION_FIELDS, read_manifest
from common.runtime.checkpoint import checkpoint_step, save_trainer_checkpoint
from common.runtime.cluster import BatchSplit, Preempted, ignore_sigterm, preempted_message, process_group_kwargs, stop_requested
from common.runtime.progress import progress_bar
from common.runtime import record
from common.runtime.record import trim_jsonl
from common.diffusion.sdxl import TextEmbeddings, time_ids
from common.runtime.weights import SAFE


# ---------------------------------------------------------------- the run's set-up

def check_cache_latents(cache_latents: bool, center_crop: bool) -> None:
    if cache_latents and not center_crop:
        raise SegGenError("--cache-latents needs --center-crop: the latent of a random crop cannot be cut from a cached "
                          "latent; add --center-crop (random flips stay: both flips are cached)")


def make_accelerator(a, out: Path, console):
    """The Accelerator of a run folder (mixed precision: the flag, else the launch config's; TensorBoard
    when asked for and installed; the process-group timeout), the global seed and TF32. The LR scheduler
    steps once per optimizer step (optimizer_step), whatever the process count. The gradient accumulation
    is set from the global batch once the process count is known (`split_batch`).
    Returns (accelerator, weight_dtype: what the frozen parts and inputs run in, use_tensorboard)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available, set_seed

    use_tb = a.report_to == "tensorboard" and is_tensorboard_available()
    accelerator = Accelerator(
        mixed_precision=a.mixed_precision, log_with="tensorboard" if use_tb else None, step_scheduler_with_optimizer=False,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        kwargs_handlers=process_group_kwargs(a.process_group_timeout),
    )
    set_seed(a.seed)  # model init of anything random; the data and noise have their own per-step seeds
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if a.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if a.report_to == "tensorboard" and not use_tb and accelerator.is_main_process:
        console.print("[dim]TensorBoard is not installed: stats go to stats.jsonl only[/]")
    return accelerator, weight_dtype, use_tb


def load_vae(a, device, weight_dtype):
    """The frozen VAE: the base's, or --vae. SDXL's own VAE overflows in fp16, so it stays fp32 unless a
    fixed VAE is given (which then runs in the training dtype), as in diffusers' examples."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(a.vae or a.pretrained, subfolder=None if a.vae else "vae", **SAFE)
    return vae.requires_grad_(False).to(device, **({} if a.vae is None else {"dtype": weight_dtype}))


def make_ema(model, model_cls, decay: float, accelerator):
    """diffusers' EMAModel of the trained model, on the training device, saved and loaded with the checkpoints."""
    from diffusers.training_utils import EMAModel

    ema = EMAModel(model.parameters(), decay=decay, model_cls=model_cls, model_config=model.config)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    return ema


def make_lr_scheduler(a, optimizer):
    """--lr-schedule with --lr-warmup-steps over --max-steps, in optimizer steps: the trainers step it once
    per optimizer step (accelerate is told not to step it per process), so it is a function of the global
    step alone and a resume on another process count continues it unchanged."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(a.lr_schedule, optimizer, num_warmup_steps=a.lr_warmup_steps, num_training_steps=a.max_steps)


LENGTH_FREE_SCHEDULES = ("constant_with_warmup",)  # --max-steps may change on --resume: the schedule does not depend on it


def split_for_run(a, accelerator) -> BatchSplit:
    """--global-batch-size over this run's processes (common/runtime/cluster.py split_batch); sets the accumulation."""
    from common.runtime.cluster import split_batch

    split = split_batch(a.global_batch_size, accelerator.num_processes, a.batch_size)
    accelerator.gradient_accumulation_steps = split.accumulation
    return split


def check_resumed_schedule(lr_scheduler, step: int, path: Path) -> None:
    """After load_state: the LR schedule stands at the checkpoint's optimizer step. A checkpoint of an earlier
    version counted it per process (× the process count): refused, not continued with a wrong LR."""
    seen = getattr(lr_scheduler, "scheduler", lr_scheduler).last_epoch
    if seen != step:
        raise SegGenError(f"--resume {path}: its LR schedule stands at {seen} for optimizer step {step} (written by an "
                          "earlier version that counted the schedule per process); resume it with that version, or start "
                          "a new run in another --output-dir")


# Options that may change when a run is resumed (common/runtime/record.py start): how the run is executed,
# logged and checkpointed, not what it learns. --max-steps too where the LR schedule does not depend on it.
FREE = {"resume", "resume_from", "output_dir", "num_workers", "batch_size", "micro_batch", "gradient_accumulation",
        "world_size", "process_group_timeout", "allow_tf32", "gradient_checkpointing", "cache_latents",
        "checkpointing_steps", "checkpoints_total_limit", "validation_steps", "num_validation",
        "validation_inference_steps", "validation_guidance", "report_to"}


def start_run(a, out: Path, accelerator, resume_from: Path | None, stage: str, derived: dict, say):
    """The global batch split over this run's processes, the record checked and written (options.json with
    its history; a resume that would change the experiment is refused), stats.jsonl trimmed to the
    checkpoint. Returns (split, options, RunLog)."""
    split = split_for_run(a, accelerator)
    options = {**vars(a), **derived, "stage": stage, "world_size": accelerator.num_processes,
               "global_batch": split.global_batch, "micro_batch": split.micro, "gradient_accumulation": split.accumulation}
    free = FREE | ({"max_steps"} if a.lr_schedule in LENGTH_FREE_SCHEDULES else set())
    step = checkpoint_step(resume_from) or 0
    record.start(out, options, resumed=resume_from, run_dir=None if resume_from is None else resume_from.parent, step=step,
                 free=free, main=accelerator.is_main_process, say=say if accelerator.is_main_process else None)
    return split, options, RunLog(out, accelerator.is_main_process, step)


def stop_if_preempted(accelerator, out: Path, step: int, last_ckpt, a, stage: str, meter) -> None:
    """After optimizer step `step`: on SIGTERM (common/runtime/cluster.py) save checkpoint-{step} unless it
    was just saved, and stop the run (Preempted: exit code cluster.PREEMPTED)."""
    if not stop_requested(accelerator):
        return
    if checkpoint_step(last_ckpt) != step:
        last_ckpt = save_trainer_checkpoint(accelerator, out, step, a.checkpoints_total_limit, stage)
    meter.close()
    raise Preempted(preempted_message(step, last_ckpt))


def step_loader(dataset, a, accelerator, split: BatchSplit, global_step: int):
    """The training DataLoader from optimizer step `global_step` on. The batch order is a function of
    (seed, optimizer step, global batch), so the loader starts where a checkpoint stopped, on any number of
    processes (StepBatches)."""
    batches = StepBatches(len(dataset), split.micro, a.seed, accelerator.process_index, accelerator.num_processes,
                          global_step, split.accumulation)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=a.num_workers, collate_fn=collate,
                                       worker_init_fn=ignore_sigterm if a.num_workers else None,
                                       pin_memory=accelerator.device.type == "cuda")  # small tensors by value: to_device takes them back


# ---------------------------------------------------------------- captions

def read_captions(path: Path, samples: list[Sample]) -> tuple[list[Sample], list[str]]:
    """The samples that have a caption, in dataset order, and their captions.

    Every caption id must be a sample of the dataset: a mismatch means the file belongs to another
    dataset or split, which would silently train on nothing useful."""
    if not Path(path).is_file():
        raise SegGenError(f"{path} not found: run caption.py with the same --data/--split first, or pass --captions")
    records = read_manifest(path, CAPTION_FIELDS)
    by_id = {s.id: s for s in samples}
    unknown = [r["id"] for r in records if r["id"] not in by_id]
    if unknown:
        raise SegGenError(
            f"--captions {path}: {len(unknown)} of {len(records)} caption ids are not in the dataset "
            f"(e.g. {unknown[0]!r}); caption the same --data/--split/--data-root with caption.py, or pass the matching --captions"
        )
    caption = {r["id"]: str(r["caption"]) for r in records}
    kept = [s for s in samples if s.id in caption]
    if not kept:
        raise SegGenError(f"--captions {path} is empty: run caption.py first")
    return kept, [caption[s.id] for s in kept]


def caption_cut_note(pretrained: str, samples: list[Sample], texts: list[str], captions: Path) -> str | None:
    """common/runtime/quiet.py's one line naming the captions longer than the base's (first) text encoder reads,
    or None: said once here instead of the tokenizer's warning per batch."""
    from transformers import AutoTokenizer

    from common.runtime import quiet

    tokenizer = AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer")
    return quiet.caption_cut_note(tokenizer, {s.id: text for s, text in zip(samples, texts)}, source=str(captions))


class LatentCache:
    """Row i (or 2i + flipped, when random flips are on) = the VAE's latent distribution of training
    picture i at the centre crop: (2·C, R/8, R/8) mean and log-variance, fp16, memory-mapped. A training
    step samples from it with its own generator, exactly as it samples vae.encode(x).latent_dist."""

    def __init__(self, folder: Path, flips: bool):
        self.folder, self.flips, self._params = Path(folder), flips, None

    def __getstate__(self):
        return {"folder": self.folder, "flips": self.flips, "_params": None}

    def row(self, i: int) -> torch.Tensor:
        if self._params is None:
            self._params = np.load(self.folder / "latents.npy", mmap_mode="r")
        return torch.from_numpy(np.array(self._params[i]))


@torch.no_grad()
def cache_latents(vae, dataset: ColorMapDataset, key: str, folder: Path, accelerator, pretrained: str,
                  batch_size: int = 8, console=None) -> LatentCache:
    """Encode every training picture once (key "colormap" for Text2Mask, "pixel_values" for Mask2Img),
    both flips when random flips are on, into folder/latents.npy. Needs centre crops: a random crop of a
    latent is not the latent of a random crop. Processes share the rows; a fingerprint of the model,
    resolution, samples and picture keeps a valid cache for --resume."""
    folder, flips = Path(folder), dataset.flip_p > 0
    ids = [s.id for s in dataset.samples]
    fingerprint = hashlib.sha256(json.dumps([pretrained, key, flips, dataset.resolution, dataset.data,
                                             dataset.palette.name, ids]).encode()).hexdigest()
    meta = folder / "latents.json"
    cache = LatentCache(folder, flips)
    if meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == fingerprint:
        return cache
    t = time.perf_counter()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    side = dataset.resolution // factor
    rows = len(ids) * (2 if flips else 1)
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        meta.unlink(missing_ok=True)
        np.lib.format.open_memmap(folder / "latents.npy", "w+", np.float16, (rows, 2 * vae.config.latent_channels, side, side)).flush()
    accelerator.wait_for_everyone()
    params = np.load(folder / "latents.npy", mmap_mode="r+")
    views = [ColorMapDataset(dataset.samples, dataset.data, dataset.palette, dataset.resolution, flip_p=float(f),
                             center_crop=True, need_image=key == "pixel_values") for f in (0, 1)]
    mine = list(range(accelerator.process_index, rows, accelerator.num_processes))
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        items = [views[r % 2 if flips else 0][(r // 2 if flips else r, 0)] for r in chunk]
        x = torch.stack([it[key] for it in items])
        out = vae.encode(vae_input(x, key).to(accelerator.device, vae.dtype)).latent_dist.parameters  # (B, 2·C, R/8, R/8)
        params[chunk] = out.float().cpu().numpy()
    params.flush()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta.write_text(json.dumps({"fingerprint": fingerprint, "rows": rows, "key": key}) + "\n")
        if console is not None:
            console.print(f"latents: {rows} pictures encoded once in {time.perf_counter() - t:.1f} s -> {folder}")
    accelerator.wait_for_everyone()
    return cache


# ---------------------------------------------------------------- data

def render_colormap(sample: Sample, data: str, palette: Palette) -> np.ndarray:
    """The sample's annotation as a colour map (paper §3.2, A.2), (H, W, 3) uint8, at its own size.
    Panoptic samples (COCO) get their segments outlined in the palette's edge colour."""
    if sample.segments is not None:
        return panoptic_to_color(load_panoptic(sample), sample.segments, palette)
    return label_to_color(load_label(sample, data), palette)


class ColorMapDataset(torch.utils.data.Dataset):
    """Training items at resolution R: the image, its colour map, its cached caption embeddings, time ids.

    Indexed by (sample index, augmentation seed), the pairs StepBatches yields. The shorter side is
    resized to R (image bicubic; colour map NEAREST: any other filter invents colours between classes),
    then one R×R crop and one horizontal flip (appendix A.4: random flip) are applied to both.
    """

    def __init__(self, samples: list[Sample], data: str, palette: Palette, resolution: int,
                 embeddings: TextEmbeddings | None = None, flip_p: float = 0.5, center_crop: bool = False,
                 need_image: bool = True, latents: LatentCache | None = None):
        self.samples, self.data, self.palette, self.resolution = samples, data, palette, resolution
        self.embeddings, self.flip_p, self.center_crop, self.need_image = embeddings, flip_p, center_crop, need_image
        self.latents = latents

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key) -> dict:
        index, aug_seed, position = (*key, -1)[:3] if isinstance(key, tuple) else (key, 0, -1)
        sample, r = self.samples[index], self.resolution
        cmap = render_colormap(sample, self.data, self.palette)  # (H, W, 3), checked to match the image's size
        h0, w0 = cmap.shape[:2]
        scale = r / min(w0, h0)
        w, h = max(r, round(w0 * scale)), max(r, round(h0 * scale))
        cmap = resize_nearest(cmap, (w, h))  # (h, w, 3), palette colours only
        # Text2Mask draws only the colour map, and cached latents replace the image: no JPEG to decode then.
        need_image = self.need_image and self.latents is None
        image = np.asarray(load_image(sample.image).resize((w, h), Image.BICUBIC)) if need_image else cmap  # (h, w, 3)
        rng = np.random.default_rng(aug_seed)
        top, left, flip = int(rng.integers(0, h - r + 1)), int(rng.integers(0, w - r + 1)), bool(rng.random() < self.flip_p)
        if self.center_crop:
            top, left = (h - r) // 2, (w - r) // 2
        image, cmap = image[top:top + r, left:left + r], cmap[top:top + r, left:left + r]
        if flip:
            image, cmap = image[:, ::-1], cmap[:, ::-1]
            left = w - left - r  # the crop's left edge, seen in the flipped picture
        item = {
            "index": index,
            "position": position,  # in the training stream (StepBatches): the seed of this sample's noise
            "colormap": torch.from_numpy(cmap.copy()).permute(2, 0, 1),  # (3, R, R) uint8
            "time_ids": time_ids((h0, w0), (top, left), (r, r)),  # (6,)
        }
        if self.latents is not None:  # (2·C, R/8, R/8): the VAE's mean and log-variance of this very crop and flip
            item["latent_params"] = self.latents.row(2 * index + flip if self.latents.flips else index)
        elif need_image:
            item["pixel_values"] = torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 127.5 - 1  # (3, R, R) in [-1, 1]
        if self.embeddings is not None:
            item["prompt_embeds"], pooled = self.embeddings.row(index)  # (77, D) fp16
            if pooled is not None:
                item["pooled_prompt_embeds"] = pooled  # (P,)
        return item


class StepBatches(torch.utils.data.Sampler):
    """Micro-batches of (sample index, augmentation seed, stream position) for one process, forever, from
    optimizer step `start`.

    The data is an endless stream of epochs, each a permutation drawn from (seed, epoch). Optimizer step s
    takes stream positions [s·G, (s+1)·G) of the global batch G = B·P·A (B per micro-batch, P processes,
    A accumulation steps); its micro-step j on process p takes the slice starting at s·G + (j·P + p)·B.
    Which samples, crops and flips a step sees is thus a pure function of (seed, s, G): a resumed run
    starts at its step with no replay and sees exactly what an uninterrupted run sees, on any number of
    processes. (accelerate's skip_first_batches replays the loader instead, and its sharded sampler does
    not carry augmentation seeds.)"""

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0,
                 accumulation: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world, self.start = num_samples, batch_size, seed, rank, world_size, start
        self.accumulation = accumulation
        self._epoch, self._perm, self._aug = None, None, None

    def _at(self, position: int) -> tuple[int, int]:
        epoch, i = divmod(position, self.n)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._perm, self._aug = epoch, rng.permutation(self.n), rng.integers(0, 2**31, self.n)
        return int(self._perm[i]), int(self._aug[i])

    def __iter__(self):
        step, b, p = self.start, self.batch_size, self.world
        while True:
            for j in range(self.accumulation):
                first = step * b * p * self.accumulation + (j * p + self.rank) * b
                yield [(*self._at(q), q) for q in range(first, first + b)]
            step += 1

    def __len__(self):  # endless; DataLoader only asks for this when printing
        return 2**62


def to_device(batch: dict, device, dtype) -> dict:
    """Moves a batch (step_loader's, its small tensors sent by value: common/runtime/loader.py). The cached embeddings
    and time ids take the training dtype (as the pipelines pass them at sampling time); the image stays fp32
    for the VAE, the colour map uint8 (exact colours)."""
    def move(key, v):
        if not torch.is_tensor(v):
            return v
        keep = key in ("pixel_values", "latent_params")
        return v.to(device, dtype if v.is_floating_point() and not keep else None, non_blocking=True)

    return {k: move(k, v) for k, v in as_tensors(batch).items()}


def noisy_latents(latents: torch.Tensor, scheduler, generator: torch.Generator):
    """The DDPM forward process at a uniform random timestep (what SDXL was trained with) and the
    regression target for the scheduler's prediction type. latents: (B, 4, H/8, W/8)."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    else:
        raise SegGenError(f"scheduler prediction_type {scheduler.config.prediction_type!r} is not supported (epsilon or v_prediction)")
    return noisy, t, target


def vae_input(pictures: torch.Tensor, key: str) -> torch.Tensor:
    """What the VAE encodes: key "colormap" (Text2Mask: uint8 colours, exact) or "pixel_values" (Mask2Img:
    already in [-1, 1]) -> (B, 3, R, R) in [-1, 1]."""
    return pictures.float() / 127.5 - 1 if key == "colormap" else pictures


def sample_generators(seed: int, positions, device) -> list[torch.Generator]:
    """The random source of each sample of a micro-batch (its VAE draw, noise, timestep, caption dropout):
    a pure function of (seed, its position in the training stream), so neither a resume nor another split
    of the global batch over processes and accumulation steps changes what a sample draws."""
    out = []
    for position in torch.as_tensor(positions).tolist():
        g = torch.Generator(device=device)
        g.manual_seed(int(np.random.SeedSequence([seed, int(position)]).generate_state(1, np.uint64)[0] >> 1))
        out.append(g)
    return out


@torch.no_grad()
def sample_latents(batch: dict, key: str, vae, generators: list[torch.Generator]) -> torch.Tensor:
    """z ~ q(z | picture) times the VAE's scaling factor (as the pipelines decode it): (B, 4, R/8, R/8), each
    sample drawn with its own generator. With --cache-latents the distribution comes from the cache."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if "latent_params" in batch:
        params = batch["latent_params"].float()
    else:
        params = vae.encode(vae_input(batch[key], key).to(vae.dtype)).latent_dist.parameters  # (B, 2·C, R/8, R/8)
    if isinstance(generators, torch.Generator):  # one generator for the whole batch (bench/real_size.py's step)
        return DiagonalGaussianDistribution(params).sample(generator=generators) * vae.config.scaling_factor
    z = [DiagonalGaussianDistribution(params[i:i + 1]).sample(generator=g) for i, g in enumerate(generators)]
    return torch.cat(z) * vae.config.scaling_factor


def noisy_latents_per_sample(latents: torch.Tensor, scheduler, generators: list[torch.Generator]):
    """noisy_latents with each sample's own generator: (noisy, t, target) for the micro-batch."""
    parts = [noisy_latents(latents[i:i + 1], scheduler, g) for i, g in enumerate(generators)]
    return tuple(torch.cat(x) for x in zip(*parts))


def drop_captions_per_sample(embeds, pooled, p: float, generators, empty, zeros: bool):
    """common/diffusion/sdxl.py's drop_captions with each sample's own generator."""
    from common.diffusion.sdxl import drop_captions

    if p <= 0:
        return embeds, pooled
    parts = [drop_captions(embeds[i:i + 1], None if pooled is None else pooled[i:i + 1], p, g, empty, zeros)
             for i, g in enumerate(generators)]
    return torch.cat([e for e, _ in parts]), None if pooled is None else torch.cat([q for _, q in parts])


# ---------------------------------------------------------------- optimiser

def make_optimizer(params, lr: float, use_8bit: bool, weight_decay: float = 1e-2, betas=(0.9, 0.999), eps: float = 1e-8):
    """AdamW (appendix A.4), or bitsandbytes' 8-bit AdamW (optimizer state at a quarter of the memory)."""
    if use_8bit:
        import logging

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # a harmless CPU-kernel notice
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise SegGenError(f"--use-8bit-adam needs bitsandbytes: pip install bitsandbytes ({e})") from e
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)


def optimizer_step(accelerator, model, optimizer, lr_scheduler, loss: torch.Tensor, max_grad_norm: float):
    """backward, then (on the micro-step that ends an accumulation) clip, step and zero the gradients;
    the prepared optimizer and scheduler skip the other micro-steps themselves. Returns the gradient norm
    before clipping when it was clipped (None otherwise, and under DeepSpeed, which clips inside)."""
    accelerator.backward(loss)  # divides by the accumulation steps
    grad_norm = None
    if accelerator.sync_gradients and max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()  # the prepared optimizer skips the micro-steps inside an accumulation
    if accelerator.sync_gradients:
        lr_scheduler.step()  # once per optimizer step: the schedule is a function of the global step
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


@contextmanager
def ema_weights(ema, model):
    """Inside: the model holds the EMA weights (to sample with); after: the trained ones again."""
    if ema is None:
        yield
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield
    finally:
        ema.restore(model.parameters())


# ---------------------------------------------------------------- run folder

class RunLog:
    """stats.jsonl (one line per logged step) in the run folder, written by the main process only
    (options.json: common/runtime/record.py start)."""

    def __init__(self, output_dir: Path, main: bool, start_step: int = 0):
        self.main, self.path = main, Path(output_dir) / "stats.jsonl"
        if main:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            # A killed run logged steps past its last checkpoint (past step 0 when it had none), perhaps a torn
            # last line: the run that starts at start_step takes them again.
            trim_jsonl(self.path, lambda r: r.get("step", 0) <= start_step)

    def write(self, **stats) -> None:
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(stats) + "\n")


class StepMeter:
    """The bookkeeping of each optimizer step: the mean loss of its micro-steps, the rate since the run
    (or the resume) started, a stats.jsonl line, the trackers, the progress bar (main process)."""

    def __init__(self, name: str, log: RunLog, accelerator, start_step: int, max_steps: int, samples_per_step: int, console):
        self.log, self.accelerator, self.start_step, self.samples_per_step = log, accelerator, start_step, samples_per_step
        self.losses, self.t_start = [], time.perf_counter()
        from rich.progress import TextColumn

        self.progress = progress_bar(console, "step/s", TextColumn("{task.fields[info]}")) if accelerator.is_main_process else None
        if self.progress:
            self.progress.start()
            self.task = self.progress.add_task(name, total=max_steps, completed=start_step, rate=0.0, info="")

    def micro_step(self, loss: float) -> None:
        self.losses.append(loss)

    def step(self, step: int, lr: float, grad_norm) -> None:
        loss, self.losses = sum(self.losses) / len(self.losses), []
        elapsed = time.perf_counter() - self.t_start
        rate = (step - self.start_step) / max(elapsed, 1e-9)
        stats = {"step": step, "loss": loss, "lr": lr, "seconds": round(elapsed, 3), "samples_per_s": rate * self.samples_per_step}
        if grad_norm is not None:
            stats["grad_norm"] = float(grad_norm)
        self.log.write(**stats)
        self.accelerator.log({"loss": loss, "lr": lr}, step=step)
        if self.progress:
            self.progress.update(self.task, completed=step, rate=rate, info=f"loss {loss:.4f}")

    def close(self) -> None:
        if self.progress:
            self.progress.stop()


def check_finite(loss: float, step: int, last_checkpoint: Path | None) -> None:
    """Stop on a NaN/inf loss before it reaches the weights, naming the step and where to resume from."""
    if not math.isfinite(loss):
        where = (f"the last good checkpoint is {last_checkpoint} (resume with --resume latest)" if last_checkpoint
                 else "no checkpoint was written yet")
        raise SegGenError(
            f"the training loss became {loss} at step {step}; {where}. Try a lower --lr, --mixed-precision bf16 "
            "instead of fp16, or --max-grad-norm"
        )


def image_grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Rows of equally sized pictures pasted into one image."""
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((w, h), Image.NEAREST), (j * w, i * h))
    return grid
