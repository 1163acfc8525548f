"""The command line that the stage scripts share, defined once so that their --help pages agree: the
choices (Enum), the Typer options the two generator trainers and the two samplers declare alike, and the
entry points that turn a SegGenError into one red line and exit code 2."""

from __future__ import annotations

import json
import math

from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from common import SegGenError


class Data(str, Enum):
    ade20k = "ade20k"
    coco = "coco"
    toy = "toy"  # common/toy/world.py


class Split(str, Enum):
    train = "train"
    val = "val"


class Precision(str, Enum):
    """Weights dtype of a model used for inference (caption, imgsyn, masksyn)."""

    auto = "auto"  # bf16 on a GPU that has it, else fp16; fp32 on CPU
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class MixedPrecision(str, Enum):
    """accelerate's mixed precision of a training run."""

    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


class Tracker(str, Enum):
    """--report-to: accelerate's trackers (common/runtime/tracking.py); wandb is optional (pip install wandb)."""

    tensorboard = "tensorboard"
    wandb = "wandb"
    none = "none"


def precision_dtype(precision: str, device):
    """--precision as a torch dtype. auto: bf16 on a GPU that has it, else fp16; fp32 on CPU."""
    import torch

    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def precision_name(dtype) -> str:
    import torch

    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


# ---------------------------------------------------------------- the options both generator trainers declare
# One definition, used in both `main` signatures (`data: DataOpt = Data.ade20k`), so the two --help pages
# cannot drift.

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
PaletteOpt = Annotated[PaletteKind, typer.Option(help="Colour map palette: generation (separated colours, docs/design.md) or usual (community colours).", rich_help_panel="Data")]
RandomFlipOpt = Annotated[bool, typer.Option(help="Random horizontal flip of image and colour map together (appendix A.4).", rich_help_panel="Data")]
CenterCropOpt = Annotated[bool, typer.Option(help="Centre crop instead of a random crop.", rich_help_panel="Data")]
RealSubsetOpt = Annotated[Path | None, typer.Option(help="Use only the real samples listed in this file, one id a line (python -m common.data.subset; Table 4's 1,000, the same file in every stage).", rich_help_panel="Data")]
MaxTrainSamplesOpt = Annotated[int | None, typer.Option(min=1, help="Train on the first N captioned samples only (a quick try).", rich_help_panel="Data")]
NumWorkersOpt = Annotated[int | None, typer.Option(min=0, help="DataLoader worker processes (default: cores−1, at most 4; 0 on ≤ 2 cores; common/runtime/threads.py).", rich_help_panel="Data")]
PretrainedOpt = Annotated[str, typer.Option(help="Base pipeline, hub id or folder; SDXL or SD-1.5-style (told from its folder).", rich_help_panel="Model")]
VaeOpt = Annotated[str | None, typer.Option(help="Another VAE (folder or hub id), e.g. madebyollin/sdxl-vae-fp16-fix so the VAE can run in fp16.", rich_help_panel="Model")]
ResolutionOpt = Annotated[int, typer.Option(min=8, max=4096, help="Training resolution (appendix A.4: 768); a multiple of the VAE factor (8).", rich_help_panel="Training")]
MaxStepsOpt = Annotated[int, typer.Option(min=1, help="Optimizer steps (appendix A.4: 30,000).", rich_help_panel="Training")]
GlobalBatchSizeOpt = Annotated[int, typer.Option(min=1, help="Samples per optimizer step over all processes: the same experiment on any number of GPUs (split into per-process micro-batches of at most --batch-size and gradient accumulation; refused when it cannot be split evenly). A.4 gives no batch size; 32 = the paper preset's 4 per GPU on 8 GPUs.", rich_help_panel="Training")]
BatchSizeOpt = Annotated[int, typer.Option(min=1, help="Memory cap: at most this many samples per process per micro-step; the global batch is reached by gradient accumulation (it does not change the experiment).", rich_help_panel="Training")]
def finite(value: float) -> float:
    """A learning rate: typer's min=0 lets inf and nan through, and they train NaNs (0 is kept: a run that only
    starts from its weights, as tests and bench/toy_quality.sh use it)."""
    if not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number (got {value})")
    return value


LrOpt = Annotated[float, typer.Option(min=0, callback=finite, help="Learning rate (appendix A.4: 1e-5).", rich_help_panel="Training")]
LrScheduleOpt = Annotated[Schedule, typer.Option(help="LR schedule after warm-up.", rich_help_panel="Training")]
LrWarmupStepsOpt = Annotated[int, typer.Option(min=0, help="Linear LR warm-up steps.", rich_help_panel="Training")]
WeightDecayOpt = Annotated[float, typer.Option(min=0, help="AdamW weight decay.", rich_help_panel="Training")]
MaxGradNormOpt = Annotated[float, typer.Option(min=0, help="Gradient clipping norm (0: off).", rich_help_panel="Training")]
CaptionDropoutOpt = Annotated[float, typer.Option(min=0, max=1, help="Share of captions dropped (zero embeddings, as SDXL's CFG) for classifier-free guidance. The paper gives none; 0.1 because sampling guides at 5 against those zero embeddings (toy world, docs/toy-results.md: Text2Mask off-palette 22.1% at 0, 17.6% at 0.05, 15.8% at 0.1).", rich_help_panel="Training")]
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
ProcessGroupTimeoutOpt = Annotated[int, typer.Option(min=60, help="Seconds a process waits for the others at a collective (checkpoint saves, validation on the main process) before the run fails; torch's default is 600.", rich_help_panel="Performance")]
ReportToOpt = Annotated[Tracker, typer.Option(help="Also send the loss, lr and every validation grid with its captions to a tracker through accelerate: tensorboard (RUN/logs/; skipped when not installed) or wandb (needs pip install wandb; refused without it).", rich_help_panel="Output")]
NumValidationOpt = Annotated[int, typer.Option(min=1, help="Validation samples per grid: the first K of --validation-captions, else of the validation split's captions (captions/{data}_val.jsonl), else (said once) of the training samples.", rich_help_panel="Validation")]
ValidationCaptionsOpt = Annotated[Path | None, typer.Option(help="Held-out captions to validate with: a JSONL with id and caption per line (caption.py's manifest works as it is), its first --num-validation lines used. Ids of --data's validation split bring their real colour map (and image); Mask2Img needs them (it conditions on that colour map). Default: captions/{data}_val.jsonl when it exists.", rich_help_panel="Validation")]



# ---------------------------------------------------------------- the EDM sampling options of imgsyn and masksyn

SAMPLERS = ("euler", "heun")  # common/diffusion/sampler.py's SAMPLERS (not imported: torch stays out of --help)
SCHEDULES = ("legacy", "karras")  # common/diffusion/sampler.py's SCHEDULES
Sampler = Enum("Sampler", {s: s for s in SAMPLERS}, type=str)
SamplingSchedule = Enum("SamplingSchedule", {s: s for s in SCHEDULES}, type=str)
SamplerOpt = Annotated[Sampler, typer.Option(help="euler: first order, N UNet calls (SDXL reference default, sgm EulerEDMSampler); heun: EDM Algorithm 2, 2N-1 calls.", rich_help_panel="Sampling")]
ScheduleOpt = Annotated[SamplingSchedule, typer.Option("--schedule", help="Noise levels. legacy: the model's own DDPM sigmas at equally spaced timesteps (SDXL reference default, sgm LegacyDDPMDiscretization); karras: Karras et al. Eq. 5, rho 7. The earlier default was --sampler heun --schedule karras.", rich_help_panel="Sampling")]
SChurnOpt = Annotated[float, typer.Option("--s-churn", min=0.0, help="EDM S_churn: stochasticity (0 = deterministic ODE).", rich_help_panel="Sampling")]
STminOpt = Annotated[float, typer.Option("--s-tmin", min=0.0, help="EDM S_tmin: churn only for σ >= this.", rich_help_panel="Sampling")]
STmaxOpt = Annotated[float, typer.Option("--s-tmax", min=0.0, help="EDM S_tmax: churn only for σ <= this.", rich_help_panel="Sampling")]
SNoiseOpt = Annotated[float, typer.Option("--s-noise", min=0.0, help="EDM S_noise: scale of the churn noise.", rich_help_panel="Sampling")]
PrecisionOpt = Annotated[Precision, typer.Option(help="auto = bf16 (else fp16) on GPU, fp32 on CPU.", rich_help_panel="Models")]


# ---------------------------------------------------------------- entry points

@contextmanager
def user_errors(console):
    """A SegGenError inside is printed as one red line (no traceback) and exits with code 2; a run stopped by
    SIGTERM after saving its checkpoint (common/runtime/cluster.py) says so and exits with cluster.PREEMPTED."""
    from common.runtime.cluster import PREEMPTED, Preempted

    try:
        yield
    except SegGenError as e:
        console.print(f"[red]error:[/] {our_message(e)}")
        raise typer.Exit(2) from None
    except Preempted as e:
        console.print(f"[yellow]preempted[/]: {e}")
        raise typer.Exit(PREEMPTED) from None


def our_message(error: SegGenError) -> str:
    """The message of a SegGenError, also when a DataLoader worker raised it: torch re-raises it in the main
    process with the worker's "Original Traceback" in the text, and the user needs only our last line."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split("SegGenError: ", 1)[-1] + " (in a DataLoader worker)"


NOT_REPLAYED = {"config", "resume", "output_dir", "history"}  # a replay is a new run, in a folder of its own


def replay_config(ctx: typer.Context, param, value: Path | None) -> Path | None:
    """--config RUN/options.json: the options a run recorded become this run's defaults, so flags given on the
    command line win (click's default_map, filled before the other options are read: the option is eager)."""
    if value is None:
        return None
    try:
        recorded = json.loads(Path(value).read_text())
    except (OSError, ValueError) as e:
        raise typer.BadParameter(f"{value}: not a run's options.json ({e})") from None
    if not isinstance(recorded, dict):
        raise typer.BadParameter(f"{value}: not a run's options.json (a JSON object)")
    names = {p.name for p in ctx.command.params} - NOT_REPLAYED
    ctx.default_map = {**(ctx.default_map or {}), **{k: v for k, v in recorded.items() if k in names and v is not None}}
    return value


ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", is_eager=True, callback=replay_config, rich_help_panel="Output",
    help="Repeat a run: RUN/options.json's recorded options are the defaults, and flags given here win (give the replay "
         "its own --output-dir; --resume and --output-dir are never taken from the record).")]


def call(train, options: dict, console) -> None:
    """What a trainer's `main` does with its options: plain values (Enum -> str) into train(), under user_errors."""
    from types import SimpleNamespace

    options = {k: v for k, v in options.items() if k != "config"}  # how the options were given is not part of them
    with user_errors(console):
        train(SimpleNamespace(**{k: (v.value if isinstance(v, Enum) else v) for k, v in options.items()}))


def run(main, console, hint: str = "rerun the same command to resume") -> None:
    """Runs a stage's command line (a `main` function, or a Typer app) so that Ctrl-C ends it with a hint
    instead of a traceback: every manifest line and checkpoint written so far is complete, so it resumes."""
    import sys

    try:
        main() if isinstance(main, typer.Typer) else typer.run(main)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: {hint}")
        sys.exit(130)
