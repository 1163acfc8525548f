"""What the two generator trainers share (paper §3.2, appendix A.4): train_text2mask.py and train_mask2img.py.

- the base pipeline: SDXL or SD-1.5, told apart from its folder (`inspect_base`), never by a flag;
- prompt encoding the SDXL way (`encode_prompts`) and a cache of every caption's embeddings on disk,
  so the two large text encoders run once and are freed before training (`cache_text_embeddings`);
- SDXL's size/crop conditioning (`time_ids`) and caption dropout that zeroes the embeddings the way
  SDXL's classifier-free guidance does (`drop_captions`); optionally the VAE latents, encoded once for
  both flips of the centre crop (`cache_latents`);
- the data: real annotations rendered to colour maps on the fly with the generation palette, NEAREST
  only, the same random crop and flip on image and colour map (`ColorMapDataset`), and a batch order
  that is a pure function of (seed, step) so that a resumed run sees exactly the batches an
  uninterrupted one would (`StepBatches`); the noise is drawn the same way (`step_generator`);
- the run's set-up (`make_accelerator`, `load_vae`, `make_ema`, `make_lr_scheduler`, `step_loader`) and
  the pieces of a step (`sample_latents`, `noisy_latents`, `optimizer_step`, `StepMeter`, `ema_weights`);
- optimiser (AdamW / 8-bit AdamW), checkpoints on accelerate's save_state/load_state with a total
  limit and `--resume latest` (`load_checkpoint` puts the EMA back on the training device), the run
  folder's options.json and stats.jsonl, the NaN stop;
- the command line: choices (Enum) and Typer options that both scripts declare alike (`DataOpt`, ...),
  and `cli`, which turns a SegGenError into one red line and exit code 2.

The training loops themselves stay in the two scripts, readable top to bottom: set-up, data, model,
loop (forward, loss, step), final save; what differs between Text2Mask and Mask2Img stays visible there.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from PIL import Image

from common import SegGenError
from common.cli import Data, MixedPrecision, Split, Tracker  # noqa: F401  (the trainers take them from here)
from common.colormap import Palette, label_to_color, panoptic_to_color, resize_nearest
from common.datasets import Sample, load_image, load_label, load_panoptic
from common.manifest import CAPTION_FIELDS, read_manifest

PAPER_BASE = "stabilityai/stable-diffusion-xl-base-1.0"  # appendix A.4: both generators start from SDXL-base


# ---------------------------------------------------------------- the command line both scripts share
# Choices and Typer options that train_text2mask.py and train_mask2img.py declare alike: one definition,
# used in both `main` signatures (`data: DataOpt = Data.ade20k`), so the two --help pages cannot drift.

class PaletteKind(str, Enum):
    generation = "generation"
    usual = "usual"


class Schedule(str, Enum):  # diffusers.optimization.get_scheduler names
    constant_with_warmup = "constant_with_warmup"
    linear = "linear"
    cosine = "cosine"
    cosine_with_restarts = "cosine_with_restarts"
    polynomial = "polynomial"


DataOpt = Annotated[Data, typer.Option(help="Dataset to train on.", rich_help_panel="Data")]
DataRootOpt = Annotated[Path | None, typer.Option(help="Dataset root (default: $SEGGEN_DATASETS, else ./datasets).", rich_help_panel="Data")]
SplitOpt = Annotated[Split, typer.Option(help="Split to train on (the paper: train).", rich_help_panel="Data")]
CaptionsOpt = Annotated[Path | None, typer.Option(help="Captions manifest of caption.py (default: captions/{data}_{split}.jsonl).", rich_help_panel="Data")]
PaletteOpt = Annotated[PaletteKind, typer.Option(help="Colour map palette: generation (separated colours, DESIGN.md) or usual (community colours).", rich_help_panel="Data")]
RandomFlipOpt = Annotated[bool, typer.Option(help="Random horizontal flip of image and colour map together (appendix A.4).", rich_help_panel="Data")]
CenterCropOpt = Annotated[bool, typer.Option(help="Centre crop instead of a random crop.", rich_help_panel="Data")]
MaxTrainSamplesOpt = Annotated[int | None, typer.Option(min=1, help="Train on the first N captioned samples only (a quick try).", rich_help_panel="Data")]
NumWorkersOpt = Annotated[int, typer.Option(min=0, help="DataLoader worker processes.", rich_help_panel="Data")]
PretrainedOpt = Annotated[str, typer.Option(help="Base pipeline, hub id or folder; SDXL or SD-1.5-style (told from its folder).", rich_help_panel="Model")]
VaeOpt = Annotated[str | None, typer.Option(help="Another VAE (folder or hub id), e.g. madebyollin/sdxl-vae-fp16-fix so the VAE can run in fp16.", rich_help_panel="Model")]
ResolutionOpt = Annotated[int, typer.Option(min=8, max=4096, help="Training resolution (appendix A.4: 768); a multiple of the VAE factor (8).", rich_help_panel="Training")]
MaxStepsOpt = Annotated[int, typer.Option(min=1, help="Optimizer steps (appendix A.4: 30,000).", rich_help_panel="Training")]
BatchSizeOpt = Annotated[int, typer.Option(min=1, help="Samples per process per micro-step.", rich_help_panel="Training")]
GradientAccumulationOpt = Annotated[int, typer.Option(min=1, help="Micro-steps per optimizer step.", rich_help_panel="Training")]
LrOpt = Annotated[float, typer.Option(min=0, help="Learning rate (appendix A.4: 1e-5).", rich_help_panel="Training")]
LrScheduleOpt = Annotated[Schedule, typer.Option(help="LR schedule after warm-up.", rich_help_panel="Training")]
LrWarmupStepsOpt = Annotated[int, typer.Option(min=0, help="Linear LR warm-up steps.", rich_help_panel="Training")]
WeightDecayOpt = Annotated[float, typer.Option(min=0, help="AdamW weight decay.", rich_help_panel="Training")]
MaxGradNormOpt = Annotated[float, typer.Option(min=0, help="Gradient clipping norm (0: off).", rich_help_panel="Training")]
CaptionDropoutOpt = Annotated[float, typer.Option(min=0, max=1, help="Share of captions dropped (zero embeddings, as SDXL's CFG) for classifier-free guidance.", rich_help_panel="Training")]
EmaDecayOpt = Annotated[float, typer.Option(min=0, max=1, help="EMA decay.", rich_help_panel="Training")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the data order, augmentation and noise.", rich_help_panel="Training")]
MixedPrecisionOpt = Annotated[MixedPrecision | None, typer.Option(help="Mixed precision (default: what accelerate launch / config selects).", rich_help_panel="Performance")]
CacheLatentsOpt = Annotated[bool, typer.Option(help="Encode every picture once (both flips) and train from the cache; needs --center-crop.", rich_help_panel="Performance")]
GradientCheckpointingOpt = Annotated[bool, typer.Option(help="Recompute activations in backward: less memory, ~30% slower.", rich_help_panel="Performance")]
Use8bitAdamOpt = Annotated[bool, typer.Option(help="bitsandbytes' 8-bit AdamW.", rich_help_panel="Performance")]
AllowTf32Opt = Annotated[bool, typer.Option(help="TF32 matmuls on Ampere+ GPUs.", rich_help_panel="Performance")]
CheckpointingStepsOpt = Annotated[int, typer.Option(min=0, help="Save a resumable checkpoint every N steps (0: never).", rich_help_panel="Output")]
CheckpointsTotalLimitOpt = Annotated[int | None, typer.Option(min=1, help="Keep at most this many checkpoints.", rich_help_panel="Output")]
ResumeOpt = Annotated[str | None, typer.Option(help="'latest' or a checkpoint-N folder to continue from.", rich_help_panel="Output")]
ValidationStepsOpt = Annotated[int, typer.Option(min=0, help="Sample a validation grid every N steps and at the end (0: never).", rich_help_panel="Validation")]
ValidationInferenceStepsOpt = Annotated[int, typer.Option(min=1, help="Sampler steps for validation.", rich_help_panel="Validation")]
ValidationGuidanceOpt = Annotated[float, typer.Option(min=0, help="Classifier-free guidance scale for validation.", rich_help_panel="Validation")]
ReportToOpt = Annotated[Tracker, typer.Option(help="Also log to TensorBoard through accelerate (skipped when not installed).", rich_help_panel="Output")]


def cli(train, options: dict, console) -> None:
    """What each script's `main` does with its options: plain values (Enum -> str) into train(); a
    SegGenError is printed in red and exits with code 2."""
    from types import SimpleNamespace

    try:
        train(SimpleNamespace(**{k: (v.value if isinstance(v, Enum) else v) for k, v in options.items()}))
    except SegGenError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from None


# ---------------------------------------------------------------- the run's set-up

def check_cache_latents(cache_latents: bool, center_crop: bool) -> None:
    if cache_latents and not center_crop:
        raise SegGenError("--cache-latents needs --center-crop: the latent of a random crop cannot be cut from a cached "
                          "latent; add --center-crop (random flips stay: both flips are cached)")


def make_accelerator(a, out: Path, console):
    """The Accelerator of a run folder (gradient accumulation, mixed precision: the flag, else the launch
    config's; TensorBoard when asked for and installed), the global seed and TF32.
    Returns (accelerator, weight_dtype: what the frozen parts and inputs run in, use_tensorboard)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available, set_seed

    use_tb = a.report_to == "tensorboard" and is_tensorboard_available()
    accelerator = Accelerator(
        gradient_accumulation_steps=a.gradient_accumulation, mixed_precision=a.mixed_precision,
        log_with="tensorboard" if use_tb else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
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

    vae = AutoencoderKL.from_pretrained(a.vae or a.pretrained, subfolder=None if a.vae else "vae")
    return vae.requires_grad_(False).to(device, **({} if a.vae is None else {"dtype": weight_dtype}))


def make_ema(model, model_cls, decay: float, accelerator):
    """diffusers' EMAModel of the trained model, on the training device, saved and loaded with the checkpoints."""
    from diffusers.training_utils import EMAModel

    ema = EMAModel(model.parameters(), decay=decay, model_cls=model_cls, model_config=model.config)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    return ema


def make_lr_scheduler(a, optimizer, num_processes: int):
    """--lr-schedule with --lr-warmup-steps over --max-steps. accelerate steps a prepared scheduler once
    per process, hence the factor (as diffusers' examples do)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(a.lr_schedule, optimizer, num_warmup_steps=a.lr_warmup_steps * num_processes,
                         num_training_steps=a.max_steps * num_processes)


def step_loader(dataset, a, accelerator, global_step: int):
    """The training DataLoader from optimizer step `global_step` on. The batch order is a function of
    (seed, micro-step), so the loader starts where a checkpoint stopped (StepBatches)."""
    batches = StepBatches(len(dataset), a.batch_size, a.seed, accelerator.process_index, accelerator.num_processes,
                          global_step * a.gradient_accumulation)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=a.num_workers,
                                       pin_memory=accelerator.device.type == "cuda")


# ---------------------------------------------------------------- the base pipeline

@dataclass(frozen=True)
class BaseInfo:
    """What the trainers need to know about --pretrained before loading any weights."""

    path: str  # as given: a folder or a hub id
    is_sdxl: bool  # two text encoders, pooled embedding, add_time_ids (else SD-1.5-style, appendix A.11)
    vae_factor: int  # how much the VAE downsamples: a resolution must be a multiple of it
    force_zeros_for_empty_prompt: bool  # SDXL's unconditional embedding is all zeros, not encode("")


def _base_file(pretrained: str, name: str, flag: str = "--pretrained") -> dict:
    """A JSON file of the base pipeline (or of the --vae), from its folder or (for a hub id) the hub cache."""
    folder = Path(pretrained)
    what = "a diffusers pipeline folder" if flag == "--pretrained" else "an AutoencoderKL folder"
    if folder.exists():
        path = folder / name
        if not path.is_file():
            raise SegGenError(
                f"{flag} {pretrained}: {name} is missing; pass {what} (as written by save_pretrained, "
                f"e.g. `python -m common.tiny sdxl DIR`) or a hub id such as {PAPER_BASE}"
            )
    else:
        try:
            from huggingface_hub import hf_hub_download

            sub, _, file = name.rpartition("/")
            path = Path(hf_hub_download(pretrained, file, subfolder=sub or None))
        except Exception as e:  # noqa: BLE001 - offline, unknown repo, bad id: all mean the same to the user
            raise SegGenError(
                f"{flag} {pretrained}: no such folder, and not a hub id that can be read here "
                f"({type(e).__name__}). Pass {what} (e.g. `python -m common.tiny sdxl DIR`) "
                f"or a hub id such as {PAPER_BASE} on a machine that can download it"
            ) from None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise SegGenError(f"--pretrained {pretrained}: {name} is not valid JSON ({e})") from e


def inspect_base(pretrained: str) -> BaseInfo:
    """SDXL or SD-1.5, from model_index.json (a text_encoder_2 entry means SDXL), and the VAE's factor."""
    index = _base_file(pretrained, "model_index.json")
    for part in ("unet", "vae", "scheduler", "text_encoder", "tokenizer"):
        if not (isinstance(index.get(part), list) and index[part][0]):
            raise SegGenError(f"--pretrained {pretrained}: model_index.json has no {part!r}; a Stable Diffusion (XL) pipeline is needed")
    is_sdxl = isinstance(index.get("text_encoder_2"), list) and index["text_encoder_2"][0] is not None
    vae = _base_file(pretrained, "vae/config.json")
    factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    return BaseInfo(pretrained, is_sdxl, factor, bool(index.get("force_zeros_for_empty_prompt", is_sdxl)))


def check_vae(vae: str | None) -> None:
    """--vae: an AutoencoderKL folder or hub id (e.g. madebyollin/sdxl-vae-fp16-fix), checked before loading."""
    if vae is not None:
        config = _base_file(vae, "config.json", "--vae")
        if config.get("_class_name") != "AutoencoderKL":
            raise SegGenError(f"--vae {vae}: config.json describes a {config.get('_class_name')}, not an AutoencoderKL")


def check_resolution(resolution: int, base: BaseInfo) -> None:
    if resolution % base.vae_factor:
        lo = resolution // base.vae_factor * base.vae_factor
        raise SegGenError(
            f"--resolution {resolution} is not a multiple of {base.vae_factor} (the VAE of {base.path} downsamples by "
            f"{base.vae_factor}): use {max(lo, base.vae_factor)} or {lo + base.vae_factor}"
        )


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL's micro-conditioning (Podell et al. 2023, §2.2): (6,) = original (h, w) + crop (top, left) + target (h, w)."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


# ---------------------------------------------------------------- captions and text embeddings

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


def load_text_encoders(pretrained: str, is_sdxl: bool, device, dtype) -> list[tuple]:
    """[(tokenizer, text encoder)]: one pair for SD-1.5, two for SDXL (CLIP ViT-L, then OpenCLIP bigG with projection)."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    pairs = [(AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer"),
              CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", torch_dtype=dtype))]
    if is_sdxl:
        pairs.append((AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2"),
                      CLIPTextModelWithProjection.from_pretrained(pretrained, subfolder="text_encoder_2", torch_dtype=dtype)))
    return [(tok, enc.to(device).eval().requires_grad_(False)) for tok, enc in pairs]


@torch.no_grad()
def encode_prompts(prompts: list[str], encoders: list[tuple]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text embeddings as the pipelines compute them.

    SDXL: each encoder's penultimate hidden states, concatenated on the channel axis -> (B, 77, 768+1280),
    and the second encoder's pooled projection -> (B, 1280). SD-1.5: the last hidden states, no pooled.
    """
    is_sdxl = len(encoders) == 2
    hidden, pooled = [], None
    for tok, enc in encoders:
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        out = enc(ids.to(enc.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2] if is_sdxl else out.last_hidden_state)
        if is_sdxl:
            pooled = out[0]  # text_embeds of the projection model (the last encoder in the loop)
    return torch.cat(hidden, -1), pooled


class TextEmbeddings:
    """Row i = the cached embeddings of training sample i; row N = the empty prompt. Memory-mapped .npy
    files, so every process and data-loader worker shares one copy in the page cache (ADE20K at SDXL
    size: 20k × 77 × 2048 fp16 = 6.4 GB on disk, only touched rows in memory)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._embeds = self._pooled = None

    def _open(self):
        if self._embeds is None:
            self._embeds = np.load(self.folder / "embeds.npy", mmap_mode="r")
            pooled = self.folder / "pooled.npy"
            self._pooled = np.load(pooled, mmap_mode="r") if pooled.is_file() else None

    def __getstate__(self):  # data-loader workers reopen the maps instead of pickling them
        return {"folder": self.folder, "_embeds": None, "_pooled": None}

    def row(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._open()
        e = torch.from_numpy(np.array(self._embeds[i]))
        return e, (torch.from_numpy(np.array(self._pooled[i])) if self._pooled is not None else None)

    def empty(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._open()
        return self.row(len(self._embeds) - 1)


def cache_text_embeddings(pretrained: str, base: BaseInfo, captions: list[str], folder: Path, accelerator,
                          batch_size: int = 64, dtype=torch.float32, console=None) -> TextEmbeddings:
    """Encode every caption once (plus the empty prompt) into folder/{embeds,pooled}.npy, fp16; the
    encoders run in `dtype` on a GPU, fp32 elsewhere.

    The main process encodes; the others wait and then map the files. A fingerprint of the base and the
    captions is kept beside them, so a resumed run reuses the cache and a changed captions file rebuilds it."""
    folder = Path(folder)
    if accelerator.device.type != "cuda":
        dtype = torch.float32  # CPUs lack fast fp16 kernels
    fingerprint = hashlib.sha256(json.dumps([pretrained, base.is_sdxl, captions]).encode()).hexdigest()
    meta = folder / "meta.json"
    fresh = meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == fingerprint
    if accelerator.is_main_process and not fresh:
        folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        encoders = load_text_encoders(pretrained, base.is_sdxl, accelerator.device, dtype)
        prompts = captions + [""]
        embeds = pooled = None
        for start in range(0, len(prompts), batch_size):
            e, p = encode_prompts(prompts[start:start + batch_size], encoders)
            if embeds is None:  # (N+1, 77, D) and (N+1, P), written in place on disk
                embeds = np.lib.format.open_memmap(folder / "embeds.npy", "w+", np.float16, (len(prompts), *e.shape[1:]))
                if p is not None:
                    pooled = np.lib.format.open_memmap(folder / "pooled.npy", "w+", np.float16, (len(prompts), p.shape[1]))
            embeds[start:start + len(e)] = e.float().cpu().numpy()
            if pooled is not None:
                pooled[start:start + len(p)] = p.float().cpu().numpy()
        embeds.flush()
        if pooled is not None:
            pooled.flush()
        del encoders  # the text encoders are not needed again: free them before the UNet arrives
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        meta.write_text(json.dumps({"fingerprint": fingerprint, "rows": len(prompts), "base": pretrained}) + "\n")
        if console is not None:
            console.print(f"text embeddings: {len(captions)} captions encoded once in {time.perf_counter() - t:.1f} s -> {folder}")
    accelerator.wait_for_everyone()
    return TextEmbeddings(folder)


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


def drop_captions(embeds: torch.Tensor, pooled: torch.Tensor | None, p: float, generator: torch.Generator,
                  empty: tuple[torch.Tensor, torch.Tensor | None], zeros: bool):
    """Caption dropout for classifier-free guidance: each sample loses its caption with probability p.

    SDXL (force_zeros_for_empty_prompt) samples its unconditional branch with all-zero embeddings, so a
    dropped caption becomes zeros, pooled included; SD-1.5 uses the embedding of the empty prompt."""
    if p <= 0:
        return embeds, pooled
    drop = torch.rand(embeds.shape[0], generator=generator, device=generator.device) < p  # (B,)
    e_empty, p_empty = (torch.zeros_like(embeds[0]), None if pooled is None else torch.zeros_like(pooled[0])) if zeros else empty
    embeds = torch.where(drop[:, None, None], e_empty.to(embeds), embeds)
    if pooled is not None:
        pooled = torch.where(drop[:, None], p_empty.to(pooled), pooled)
    return embeds, pooled


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
        index, aug_seed = key if isinstance(key, tuple) else (key, 0)
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
    """Batches of (sample index, augmentation seed) for one process, forever, from micro-step `start`.

    The data is an endless stream of epochs, each a permutation drawn from (seed, epoch); micro-step m
    takes stream positions [m·B·P, (m+1)·B·P) and process p its p-th slice of B. Everything is a pure
    function of (seed, m), so a resumed run starts at its step with no replay and sees exactly the
    batches and crops/flips an uninterrupted run sees. (accelerate's skip_first_batches replays the
    loader instead, and its sharded sampler does not carry augmentation seeds.)"""

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.n, self.batch_size, self.seed, self.rank, self.world, self.start = num_samples, batch_size, seed, rank, world_size, start
        self._epoch, self._perm, self._aug = None, None, None

    def _at(self, position: int) -> tuple[int, int]:
        epoch, i = divmod(position, self.n)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._perm, self._aug = epoch, rng.permutation(self.n), rng.integers(0, 2**31, self.n)
        return int(self._perm[i]), int(self._aug[i])

    def __iter__(self):
        step = self.start
        while True:
            first = (step * self.world + self.rank) * self.batch_size
            yield [self._at(p) for p in range(first, first + self.batch_size)]
            step += 1

    def __len__(self):  # endless; DataLoader only asks for this when printing
        return 2**62


def step_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    """The random source of micro-step `step` on process `rank` (noise, timesteps, VAE sample, dropout):
    a pure function of (seed, step, rank), so resuming draws what the uninterrupted run drew."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1))
    return g


def to_device(batch: dict, device, dtype) -> dict:
    """Moves a batch. The cached embeddings and time ids take the training dtype (as the pipelines pass
    them at sampling time); the image stays fp32 for the VAE, the colour map uint8 (exact colours)."""
    def move(key, v):
        if not torch.is_tensor(v):
            return v
        keep = key in ("pixel_values", "latent_params")
        return v.to(device, dtype if v.is_floating_point() and not keep else None, non_blocking=True)

    return {k: move(k, v) for k, v in batch.items()}


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


@torch.no_grad()
def sample_latents(batch: dict, key: str, vae, generator: torch.Generator) -> torch.Tensor:
    """z ~ q(z | picture) times the VAE's scaling factor (as the pipelines decode it): (B, 4, R/8, R/8).
    With --cache-latents the distribution comes from the cache, the draw from the same generator."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if "latent_params" in batch:
        dist = DiagonalGaussianDistribution(batch["latent_params"].float())
    else:
        dist = vae.encode(vae_input(batch[key], key).to(vae.dtype)).latent_dist
    return dist.sample(generator=generator) * vae.config.scaling_factor


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
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ---------------------------------------------------------------- checkpoints

def checkpoint_step(path: Path | None) -> int | None:
    """The step of a checkpoint-{step} folder; None for no path or another name."""
    name = Path(path).name if path is not None else ""
    return int(name[len("checkpoint-"):]) if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit() else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """output_dir/checkpoint-{step} folders, oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """--resume latest | PATH -> the checkpoint folder (checked before any model is loaded).

    Without --resume, an output folder that holds checkpoints or a trained model is refused rather than
    mixed with a new run; one left by a run killed before its first checkpoint is simply started over."""
    output_dir = Path(output_dir)
    if resume is None:
        if list_checkpoints(output_dir):
            raise SegGenError(
                f"--output-dir {output_dir} holds checkpoints of an earlier run: pass --resume latest to continue it, "
                "or choose another --output-dir"
            )
        for done in ("model_index.json", "config.json"):  # Text2Mask's pipeline, Mask2Img's ControlNet
            if (output_dir / done).is_file():
                raise SegGenError(
                    f"--output-dir {output_dir} holds a trained model ({done}) and no checkpoint to resume from: "
                    "choose another --output-dir, or delete that folder to train again"
                )
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise SegGenError(f"--resume latest: no checkpoint-* folder in {output_dir}; drop --resume to start a new run, "
                              "or fix --output-dir")
        return found[-1]
    path = Path(resume)
    if not (path.is_dir() and checkpoint_step(path) is not None and any(path.glob("random_states_*.pkl"))):
        raise SegGenError(
            f"--resume {resume}: not a checkpoint folder (checkpoint-STEP with random_states_0.pkl, written by this script); "
            "pass --resume latest or a checkpoint-* path"
        )
    return path


def save_checkpoint(accelerator, output_dir: Path, step: int, total_limit: int | None) -> Path:
    """accelerator.save_state to output_dir/checkpoint-{step}, first removing the oldest ones so that at
    most total_limit remain afterwards."""
    output_dir = Path(output_dir)
    if accelerator.is_main_process and total_limit:
        old = list_checkpoints(output_dir)
        for path in old[: max(0, len(old) - total_limit + 1)]:
            shutil.rmtree(path, ignore_errors=True)
    path = output_dir / f"checkpoint-{step}"
    accelerator.save_state(str(path))
    return path


def load_checkpoint(accelerator, path: Path, ema=None) -> int:
    """accelerator.load_state(path) -> the step it was saved at.

    accelerate loads registered objects such as the EMAModel with map_location="cpu", so the EMA's
    shadow weights come back on the CPU while the model trains on the GPU: moved back here, or the
    first ema.step after a resume fails on a device mismatch."""
    accelerator.load_state(str(path))
    if ema is not None:
        ema.to(accelerator.device)
    return checkpoint_step(path)


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


def register_diffusers_hooks(accelerator, model_cls, subfolder: str) -> None:
    """Checkpoints keep the trained model in diffusers format (checkpoint-N/{subfolder}/, loadable with
    from_pretrained for a look at an intermediate model) instead of accelerate's flat state dict."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                accelerator.unwrap_model(model).save_pretrained(Path(output_dir) / subfolder)
        while weights:  # written above; accelerate must not write them again
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            loaded = model_cls.from_pretrained(input_dir, subfolder=subfolder)
            model.load_state_dict(loaded.state_dict())
            del loaded

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ---------------------------------------------------------------- run folder

class RunLog:
    """options.json (every option after resolution) and stats.jsonl (one line per logged step) in the
    run folder; written by the main process only."""

    def __init__(self, output_dir: Path, options: dict, main: bool, start_step: int = 0):
        self.main, self.path = main, Path(output_dir) / "stats.jsonl"
        if main:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "options.json").write_text(json.dumps(options, indent=2, default=str) + "\n")
            if self.path.is_file():
                # A killed run logged steps past its last checkpoint (past step 0 when it had none): the
                # run that starts at start_step takes them again.
                lines = self.path.read_text().splitlines()
                kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= start_step]
                self.path.write_text("".join(line + "\n" for line in kept))

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
        self.progress = progress_bar(console) if accelerator.is_main_process else None
        if self.progress:
            self.progress.start()
            self.task = self.progress.add_task(name, total=max_steps, completed=start_step, rate="", info="")

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
            self.progress.update(self.task, completed=step, rate=f"{rate:.2f} step/s", info=f"loss {loss:.4f}")

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


def validation_prompts(items: list[dict], base: BaseInfo, empty, device, dtype) -> dict:
    """Pipeline keyword arguments from the items' cached embeddings, with the unconditional branch as
    the base samples it: zeros for SDXL (force_zeros_for_empty_prompt), else the empty prompt's."""
    embeds = torch.stack([it["prompt_embeds"] for it in items]).to(device, dtype)  # (B, 77, D)
    zeros = base.force_zeros_for_empty_prompt
    kw = dict(prompt_embeds=embeds,
              negative_prompt_embeds=torch.zeros_like(embeds) if zeros else empty[0][None].expand_as(embeds).to(device, dtype))
    if base.is_sdxl:
        pooled = torch.stack([it["pooled_prompt_embeds"] for it in items]).to(device, dtype)  # (B, P)
        kw.update(pooled_prompt_embeds=pooled,
                  negative_pooled_prompt_embeds=torch.zeros_like(pooled) if zeros else empty[1][None].expand_as(pooled).to(device, dtype))
    return kw


def image_grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Rows of equally sized pictures pasted into one image."""
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((w, h), Image.NEAREST), (j * w, i * h))
    return grid


def quiet_loading() -> None:
    """No per-file "Loading weights" bars from diffusers/transformers: the run has its own progress bar."""
    import logging

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def progress_bar(console):
    """A rich progress bar with rate and ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"), console=console, transient=False)
