"""What masksyn.py and imgsyn.py share (paper §3.3): loading Text2Mask and Mask2Img, sampling with the
EDM sampler, the plan of work (batches, shards, resume, seeds), writing the synthetic folder, and the
contact sheet.

The plan is what makes runs agree with each other. Work items are (source id, k) for every captioned
source and k < --per-sample, in a fixed order; they are cut into batches of --batch-size; process N of
an `accelerate launch` takes batches N, N + P, N + 2P, ... A sample depends only on its own seed
(derived from source id, k and --seed) and on its batch-mates' arithmetic (a UNet batch is not
bit-for-bit independent of the other rows on CPU or GPU), so the batch is recorded with every sample:
a sharded run, a resumed run and `--reproduce` all form exactly the same batches and give the same bytes.
That holds for the same sources and --batch-size: a run resumed with another --batch-size or --limit, or
with more captions, cuts other batches, so its new samples are not byte-identical to those of one
uninterrupted run (each is still reproduced exactly from the batch in its own line).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from common import SegGenError
from common.diffusion import sdxl
from common.masks.colormap import Palette, label_to_color, palette_for
from common.data.manifest import atomic_save, first_record, iter_lines, line_id, manifest_files, parse_line, read_ids
from common.runtime.cluster import Preempted
from common.runtime.progress import console, progress_bar
from common.diffusion import sampler as edm
from common.diffusion.sampler import Cond, EpsDenoiser
from common.data.paths import record_path, resolve_recorded
from common.runtime.shard import shard
from common.runtime.weights import SAFE, check_safetensors

SDXL_PIPELINES = ("StableDiffusionXLPipeline",)
SD_PIPELINES = ("StableDiffusionPipeline",)
JPEG_QUALITY = 95


# ---------------------------------------------------------------- the sampling settings

# What a manifest line written before the sampling schedule was recorded was drawn with (Heun on the Karras schedule).
BEFORE_SCHEDULE = {"sampler": "heun", "schedule": "karras"}


def upgrade(record: dict) -> dict:
    """A manifest line's "settings" with the fields older lines lack filled in as they were drawn."""
    return {**BEFORE_SCHEDULE, **record} if "schedule" not in record else dict(record)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What every sample's manifest line records under "settings": all that decides its bytes. Each script
    adds its own fields; ORDER is the order the manifest has always written them in. JSON has no
    infinity: S_tmax = ∞ is recorded as null."""

    ORDER = ()
    data: str
    resolution: int
    guidance: float
    sampler: str
    schedule: str
    S_churn: float
    S_tmin: float
    S_tmax: float | None  # None: ∞
    S_noise: float
    seed: int
    precision: str

    def record(self) -> dict:
        fields = dataclasses.asdict(self)
        return {k: fields[k] for k in self.ORDER}

    @classmethod
    def from_record(cls, record: dict):
        """The settings of an existing manifest line (for --reproduce); a line without "schedule" was
        drawn with Heun on the Karras schedule, and reads back so."""
        return cls(**upgrade(record))

    def sampling(self) -> edm.Settings:
        """The sampler's own record (common/diffusion/sampler.py `Settings`): sampler, schedule, guidance, churn."""
        return edm.Settings.from_dict({k: getattr(self, k) for k in ("sampler", "schedule", "guidance", "S_churn", "S_tmin",
                                                                     "S_tmax", "S_noise")})


@dataclass
class Job:
    """The options both sampling scripts take (the command line's, as plain values); each adds its own."""

    data: str = "ade20k"
    captions: Path | None = None
    mask2img: str | None = None
    base: str | None = None
    guidance: float = 5.0  # SDXL reference default (sgm VanillaCFG scale 5.0)
    sampler: str = "euler"  # SDXL reference default (sgm EulerEDMSampler)
    schedule: str = "legacy"  # SDXL reference default (sgm LegacyDDPMDiscretization)
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0
    resolution: int = 768
    batch_size: int = 4
    seed: int = 0
    limit: int | None = None
    out: Path | None = None
    precision: str = "auto"
    preview: int = 0
    reproduce: str | None = None
    write_threads: int = 2  # threads encoding and saving a batch's files beside the next batch (0: in the loop; not a flag)

    def settings(self, cls, dtype, **own):
        """The run's recorded settings (cls: the script's Settings) from these options and the script's own fields."""
        from common.runtime.cli import precision_name

        return cls(data=self.data, resolution=self.resolution, guidance=self.guidance, sampler=self.sampler,
                   schedule=self.schedule,
                   S_churn=self.s_churn, S_tmin=self.s_tmin, S_tmax=None if self.s_tmax == float("inf") else self.s_tmax,
                   S_noise=self.s_noise, seed=self.seed, precision=precision_name(dtype), **own)


# ---------------------------------------------------------------- the plan: ids, seeds, batches

def read_captions(path: Path) -> dict[str, str]:
    """{id: caption} of a captions manifest, each id checked as a file name (common/data/ids.py) before
    anything is drawn or written: SegGenError naming file:line."""
    from common.data.ids import check_ids
    from common.data.manifest import CAPTION_FIELDS, read_manifest

    places: list[str] = []
    records = read_manifest(path, CAPTION_FIELDS, places=places)
    check_ids([r["id"] for r in records], places)
    return {str(r["id"]): r["caption"] for r in records}


def sample_id(source_id: str, k: int) -> str:
    return f"{source_id}_{k:03d}"


def derive_seed(base_seed: int, source_id: str, k: int) -> int:
    """A 63-bit seed from (base seed, source id, k): the same in every shard, rerun and batch size."""
    digest = hashlib.sha256(f"{base_seed}/{source_id}/{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def plan_batches(source_ids: list[str], per_sample: int, batch_size: int) -> list[list[tuple[str, int]]]:
    """All work items (source id, k) in order, cut into batches."""
    return cut_batches([(s, k) for s in source_ids for k in range(per_sample)], batch_size)


def cut_batches(items: list[tuple[str, int]], batch_size: int) -> list[list[tuple[str, int]]]:
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


def process_plan(source_ids: list[str], per_sample: int, batch_size: int, state, finished: set[str]) -> tuple[list, int]:
    """This process's share of the plan (every world-th batch): (the batches that still hold an
    unfinished sample, how many of its samples are finished already in the batches left out)."""
    return process_items([(s, k) for s in source_ids for k in range(per_sample)], batch_size, state, finished)


def process_items(items: list[tuple[str, int]], batch_size: int, state, finished: set[str]) -> tuple[list, int]:
    """`process_plan` for any list of work items (masksyn's redraw rounds)."""
    batches = shard(cut_batches(items, batch_size), state)
    todo = [b for b in batches if any(sample_id(s, k) not in finished for s, k in b)]
    return todo, sum(len(b) for b in batches) - sum(len(b) for b in todo)


# ---------------------------------------------------------------- checking model folders (before loading)

def _read_json(path: Path, flag: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SegGenError(f"{flag} {path.parent}: cannot read {path.name} ({e})") from e


def _is_hub_id(name: str) -> bool:
    return not Path(name).exists() and name.count("/") == 1 and not name.startswith((".", "/"))


def check_pipeline(path: str, flag: str, made_by: str) -> str:
    """'sdxl' or 'sd15' for a diffusers pipeline folder or hub id, from its model_index.json alone."""
    folder = Path(path)
    if _is_hub_id(path):
        from diffusers import DiffusionPipeline

        try:  # the hub cache (offline) or the hub: the config only, no weights
            index = DiffusionPipeline.load_config(path)
        except (OSError, ValueError) as e:
            raise SegGenError(f"{flag} {path}: not a local folder, and no pipeline of that hub id can be read ({e})") from e
    elif not folder.exists():
        raise SegGenError(f"{flag} {folder} not found: run {made_by} first, or pass {flag}")
    elif not (folder / "model_index.json").is_file():
        raise SegGenError(f"{flag} {folder}: not a diffusers pipeline folder (no model_index.json); "
                          f"pass the folder {made_by} wrote, or an SDXL / SD-1.5 pipeline")
    else:
        index = _read_json(folder / "model_index.json", flag)
        check_safetensors(folder, flag)  # pickle-only weights are refused before any model loads
    name = index.get("_class_name")
    if name not in SDXL_PIPELINES + SD_PIPELINES:
        raise SegGenError(f"{flag} {folder}: a {name}, not an SDXL or SD-1.5 text-to-image pipeline")
    return "sdxl" if sdxl.is_sdxl(index) else "sd15"


def check_controlnet(path: str, base: str | None, data: str) -> tuple[str, str]:
    """(the base pipeline to use, 'sdxl' or 'sd15') for a Mask2Img ControlNet folder; the base is
    --base, else the one recorded by train_mask2img.py in the folder's seggen.json."""
    folder = Path(path)
    if not _is_hub_id(path):
        if not folder.exists():
            raise SegGenError(f"--mask2img {folder} not found: run train_mask2img.py --data {data} first, or pass --mask2img")
        if not (folder / "config.json").is_file():
            raise SegGenError(f"--mask2img {folder}: not a ControlNet folder (no config.json); pass the folder train_mask2img.py wrote")
        name = _read_json(folder / "config.json", "--mask2img").get("_class_name")
        if name != "ControlNetModel":
            raise SegGenError(f"--mask2img {folder}: its config.json is a {name}, not a ControlNetModel; "
                              f"pass the folder train_mask2img.py wrote")
        check_safetensors(folder, "--mask2img")  # pickle-only weights are refused before any model loads
    if base is None:
        meta = folder / "seggen.json"
        recorded = _read_json(meta, "--mask2img").get("base") if meta.is_file() else None
        if not recorded:
            raise SegGenError(f"--mask2img {folder} records no base pipeline (no 'base' in {meta}): pass --base, "
                              f"the SDXL / SD-1.5 pipeline the ControlNet was trained on")
        base = resolve_recorded(str(recorded), folder)  # recorded relative to the ControlNet folder (common/data/paths.py)
        if not _is_hub_id(base) and not Path(base).exists():
            raise SegGenError(f"--mask2img {folder} records base pipeline {recorded!r} (in seggen.json), which is not found "
                              f"from {Path.cwd()} (looked for {base}): pass --base with that pipeline's folder or hub id")
    kind = check_pipeline(base, "--base", "train_mask2img.py")
    if not _is_hub_id(path) and not _is_hub_id(base):
        cn = _read_json(folder / "config.json", "--mask2img")
        unet_cfg = Path(base) / "unet" / "config.json"
        if unet_cfg.is_file():
            unet = _read_json(unet_cfg, "--base")
            if cn.get("cross_attention_dim") != unet.get("cross_attention_dim") or cn.get("addition_embed_type") != unet.get("addition_embed_type"):
                raise SegGenError(f"--mask2img {folder} does not fit --base {base}: the ControlNet was made for another UNet "
                                  f"(cross_attention_dim {cn.get('cross_attention_dim')} vs {unet.get('cross_attention_dim')})")
    return base, kind


def recorded_vae(mask2img: str) -> str | None:
    """The VAE train_mask2img.py --vae trained with (e.g. an fp16-fixed SDXL VAE), from seggen.json; None
    when it used the base pipeline's own."""
    meta = Path(mask2img) / "seggen.json"
    vae = _read_json(meta, "--mask2img").get("vae") if meta.is_file() else None
    return resolve_recorded(vae, mask2img) if vae else None


def record_models(models: dict, out: Path, notes: list[str] | None = None) -> dict:
    """A manifest's `models` as recorded in folder `out`: local paths relative to it, hub ids as they are
    (common/data/paths.py `record_path`), so a synthetic folder moved with its models still names them."""
    return {k: record_path(v, out, notes) if v else v for k, v in models.items()}


def resolve_models(recorded: dict, out: Path) -> dict:
    """`record_models`' inverse: the paths (or hub ids) a manifest line in folder `out` names."""
    return {k: resolve_recorded(str(v), out) if v else v for k, v in recorded.items()}


def _place(models: dict) -> dict:
    """Models by where they are (absolute, symlinks resolved), to compare a resumed run's with the folder's."""
    return {k: os.path.realpath(v) if v and not _is_hub_id(str(v)) else v for k, v in models.items()}


def model_palette(folder: str, data: str) -> Palette:
    """The palette saved with a trained generator (palette.json), else the dataset's generation palette."""
    path = Path(folder) / "palette.json"
    return Palette.load(path) if path.is_file() else palette_for(data, "generation")


# ---------------------------------------------------------------- loading and sampling

@dataclass
class Generator:
    """A loaded Text2Mask pipeline or Mask2Img (ControlNet + base pipeline), ready to sample."""

    pipe: object  # the diffusers pipeline: text encoders, tokenizers, UNet, VAE, scheduler
    denoiser: EpsDenoiser
    sdxl: bool
    device: torch.device
    dtype: torch.dtype

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)


def _load(what: str, flag: str, fn):
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()  # our own progress bar is the one that matters
    transformers.utils.logging.disable_progress_bar()
    check_safetensors(what, flag)  # a local pickle-only folder: refused with how to convert (common/runtime/weights.py)
    try:
        return fn()
    except (OSError, ValueError, EnvironmentError) as e:
        raise SegGenError(f"{flag} {what}: cannot load it ({e})") from e


def load_text2mask(path: str, kind: str, device: torch.device, dtype: torch.dtype) -> Generator:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    extra = {} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = _load(path, "--text2mask", lambda: cls.from_pretrained(path, dtype=dtype, **SAFE, **extra))
    return _ready(pipe, None, kind, device, dtype)


def load_mask2img(path: str, base: str, kind: str, device: torch.device, dtype: torch.dtype, vae: str | None = None) -> Generator:
    from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    controlnet = _load(path, "--mask2img", lambda: ControlNetModel.from_pretrained(path, dtype=dtype, **SAFE))
    cls = StableDiffusionXLControlNetPipeline if kind == "sdxl" else StableDiffusionControlNetPipeline
    extra = {} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    if vae:  # the VAE the ControlNet was trained with (seggen.json), instead of the base's
        extra["vae"] = _load(vae, "--mask2img (its seggen.json 'vae')", lambda: AutoencoderKL.from_pretrained(vae, dtype=dtype, **SAFE))
    pipe = _load(base, "--base", lambda: cls.from_pretrained(base, controlnet=controlnet, dtype=dtype, **SAFE, **extra))
    return _ready(pipe, controlnet, kind, device, dtype)


def _ready(pipe, controlnet, kind, device, dtype) -> Generator:
    pipe.to(device)
    if dtype == torch.float16 and pipe.vae.config.force_upcast:  # SDXL's VAE overflows in fp16
        pipe.vae.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    denoiser = EpsDenoiser(pipe.unet.eval(), pipe.scheduler.alphas_cumprod, controlnet=controlnet and controlnet.eval())
    return Generator(pipe, denoiser, kind == "sdxl", device, dtype)


def caption_note(gen: Generator, captions: dict[str, str], source) -> None:
    """Say once which captions are longer than the pipeline's text encoder reads (common/runtime/quiet.py), in
    place of the tokenizer's and the pipeline's warnings per batch."""
    from common.runtime import quiet

    note = quiet.caption_cut_note(gen.pipe.tokenizer, captions, source=str(source))
    if note:
        console.print(f"[yellow]note:[/] {note}")


@torch.no_grad()
def encode(gen: Generator, captions: list[str], size: tuple[int, int]) -> tuple[Cond, Cond]:
    """(cond, uncond) for a batch of captions to be drawn at size (h, w), through the pipeline's own
    `encode_prompt`: for SDXL the unconditional side is zeros (force_zeros_for_empty_prompt), for
    SD-1.5 the empty prompt."""
    if gen.sdxl:
        emb, neg, pooled, neg_pooled = gen.pipe.encode_prompt(captions, device=gen.device, do_classifier_free_guidance=True)
        # SDXL's micro-conditioning: original size, crop top-left, target size (Podell et al. §2.2).
        time_ids = sdxl.time_ids(size, (0, 0), size, emb.dtype).to(gen.device).repeat(len(captions), 1)  # (B, 6)
        return Cond(emb, pooled, time_ids), Cond(neg, neg_pooled, time_ids)
    emb, neg = gen.pipe.encode_prompt(captions, gen.device, 1, True)
    return Cond(emb), Cond(neg)


def initial_noise(gen: Generator, generators: list[torch.Generator], size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) unit noise, each row from its sample's own CPU generator (device independent)."""
    shape = (gen.pipe.unet.config.in_channels, size[0] // gen.latent_factor, size[1] // gen.latent_factor)
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(gen.device)


@torch.no_grad()
def sample_images(gen: Generator, cond: Cond, uncond: Cond, generators: list[torch.Generator], size: tuple[int, int],
                  steps: int, sampling: edm.Settings, control: torch.Tensor | None = None) -> np.ndarray:
    """Sampling as `sampling` says (common/diffusion/sampler.py `sample`; default: SDXL's reference Euler on the
    legacy DDPM schedule) then VAE decoding: (B, h, w, 3) uint8 pictures (images, or Text2Mask colour maps)
    of size = (h, w).

    control: (B, 3, H, W) in [0, 1], the ControlNet's colour maps (Mask2Img)."""
    if control is not None:
        cond, uncond = (dataclasses.replace(c, control=control.to(gen.device)) for c in (cond, uncond))
    latents = initial_noise(gen, generators, size)
    x = edm.sample(gen.denoiser, latents, steps, cond, uncond, settings=sampling, generators=generators)
    vae = gen.pipe.vae
    image = vae.decode((x / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]  # (B, 3, H, W) in [-1, 1]
    return to_uint8(image)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) VAE output in [-1, 1] -> (B, H, W, 3) uint8 pictures: converted on the device in one
    step, then one copy to the host (a quarter of float32's bytes). The same float32 ops, so the same
    bytes, as diffusers' numpy_to_pil: (x / 2 + 0.5).clamp(0, 1) * 255, rounded."""
    x = image.float() / 2  # a new tensor: the steps after it work in place (no more full-size temporaries)
    x.add_(0.5).clamp_(0, 1).mul_(255).round_()
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()  # (B, H, W, 3)


def control_tensor(colormaps: list[np.ndarray], device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] from (H, W, 3) uint8 colour maps, as diffusers' ControlNet
    trainers feed the conditioning image (ToTensor); moved to `device` as uint8 (a quarter of the
    bytes) and converted there."""
    return torch.from_numpy(np.stack(colormaps)).to(device).permute(0, 3, 1, 2).float() / 255


# ---------------------------------------------------------------- the output folder

def check_output(out: Path, settings: Settings, models: dict, manifest: Path | None = None, only=None,
                 share: tuple[int, int] | None = None) -> set[str]:
    """Ids already written in out (a rerun skips them). An output folder holding another run's
    samples made with different settings or models is an error: mixing them would break provenance.
    Models are compared by where they are (the recorded paths resolved from out, `models` from here), so
    a folder moved together with its models resumes.

    Reads the ids and the first line only, streaming (common/data/manifest.py `read_ids`, `first_record`): a
    resume of a million-line folder keeps ~100 bytes per id, not every record (issue 18 item 1).
    manifest: another manifest family to check the same way instead of out's (masksyn's rejected.jsonl).
    only: the ids to keep (a set, or id -> bool): a task's share, written by whichever task of any run;
    share: (I, N) of the task: only the files whose shares meet it are read (manifest.share_files)."""
    if manifest is None and not out.is_dir():
        return set()
    path = out if manifest is None else manifest
    first = first_record(path)
    if first is not None:
        old = {**upgrade(first.get("settings", {})), "models": _place(resolve_models(first.get("models") or {}, out))}
        settings = {**settings.record(), "models": _place(models)}
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            shown = "; ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in diff[:4])
            raise SegGenError(f"--out {out} holds samples of another run with different settings ({shown}): "
                              f"pass another --out, or the same settings to resume it")
    return read_ids(path, only, share) if first is not None else set()


def sample_record(method: str, sid: str, source_id: str, k: int, caption: str, settings: Settings, models: dict,
                  batch: list[tuple[str, int]]) -> dict:
    """The manifest line's fields that both methods write: the files, the provenance, the batch."""
    return {"id": sid, "source_id": source_id, "k": k, "method": method, "image": f"images/{sid}.jpg",
            "annotation": f"annotations/{sid}.png", "colormap": f"colormaps/{sid}.png", "caption": caption,
            "seed": derive_seed(settings.seed, source_id, k), "settings": settings.record(), "models": models,
            "batch": [[s, kk] for s, kk in batch]}


class SampleSink:
    """Writes a batch's sample files in a small thread pool while the loop draws the next batch, then its
    manifest lines in batch order with one fsync (issue 18 item 3: encoding off the loop's path).

    Each file is written atomically (`atomic_save`), and a batch's lines are appended only once all its
    files are complete (docs/design.md "Data contract"), by one committing thread, so the manifest keeps
    its order and a killed run keeps complete files and whole lines only. Pillow releases the GIL while
    it resizes and encodes, so the pool's threads run beside the loop. At most `depth` batches wait; an
    error in a write is raised in the loop at the next `put` or at `close`. workers=0: all inline."""

    def __init__(self, writer, workers: int = 2, depth: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self.writer, self.depth, self.pending, self.failed = writer, depth, [], False
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="seggen-write") if workers else None
        self.committer = ThreadPoolExecutor(1, thread_name_prefix="seggen-commit") if workers else None
        self.shared: dict = {}  # key -> (future, path) of a file written once and linked (a source's colour map)

    def _run(self, fn, *args):
        from concurrent.futures import Future

        if self.pool is None:
            done = Future()
            done.set_result(fn(*args))  # inline: an error is raised here, at once
            return done
        return self.pool.submit(fn, *args)

    def file(self, path: Path, write) -> object:
        """Write path atomically (write(tmp_path) makes the file) in the pool; a future."""
        return self._run(atomic_save, path, write)

    def shared_file(self, key, path: Path, write) -> object:
        """Like `file`, but the first file made for `key` is written once and every later one is a hard
        link to it (same bytes; a copy where links fail): a source's colour map, shared by its K samples."""
        if key not in self.shared:
            self.shared[key] = (self.file(path, write), path)
            return self.shared[key][0]
        first, first_path = self.shared[key]

        def link(tmp):
            first.result()  # submitted earlier, so already running or done: no deadlock in a FIFO pool
            link_or_copy(first_path, tmp)
        return self.file(path, link)

    def forget(self, keep) -> None:
        """Drop the shared files of keys not in `keep` (sources no longer drawn)."""
        for key in set(self.shared) - set(keep):
            del self.shared[key]

    def put(self, files: list, records: list[dict], to: list | None = None) -> None:
        """Commit `records` (one fsync per manifest) once the futures `files` are done; blocks while
        `depth` batches wait. to: each record's ManifestWriter, in order (default: the sink's own)."""
        to = to or [self.writer] * len(records)

        def commit():
            if self.failed:  # a batch before this one failed (its error is raised in the loop): none after it is committed
                return
            try:
                for f in files:
                    f.result()  # a line never points at an incomplete file
                for writer, r in zip(to, records):
                    writer.append(r, sync=False)
                for writer in {id(w): w for w in to}.values():
                    writer.sync()
            except BaseException:
                self.failed = True
                raise
        if self.committer is None:
            return commit()
        self.pending.append(self.committer.submit(commit))
        self._reap(self.depth)

    def _reap(self, depth: int) -> None:
        while self.pending and (len(self.pending) > depth or self.pending[0].done()):
            self.pending.pop(0).result()  # re-raises a write's error (or a KeyboardInterrupt) in the loop

    def drain(self) -> None:
        """Wait until everything put so far is on disk."""
        self._reap(0)

    def close(self, error: bool = False) -> None:
        """Drain, then stop the threads. After an error (error=True: the loop is already raising one),
        wait for the writes in flight (their temporary files removed) and commit no more."""
        try:
            if error:
                self.failed = True
            else:
                self.drain()
        finally:
            for f in self.pending:
                f.cancel()
            for ex in (self.pool, self.committer):
                if ex is not None:
                    ex.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc):
        # SIGTERM between batches (common/runtime/cluster.py stop_if_sigterm) is no error: what was put is committed
        self.close(error=kind is not None and not issubclass(kind, Preempted))


def save_jpeg(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path, format="JPEG", quality=JPEG_QUALITY)


def save_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, format="PNG")


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no extra disk for the 50 copies of a human annotation), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def find_record(out: Path, wanted: str) -> dict:
    """The manifest line of sample `wanted`, streaming: only that line is parsed. A line that lacks what
    --reproduce regenerates from (its batch, settings, models, source and k) is refused, naming it."""
    for file in manifest_files(out):
        for n, _, line in iter_lines(file):
            if line_id(line, f"{file}:{n}") == wanted:
                rec = parse_line(line, f"{file}:{n}")
                batch = rec.get("batch")
                missing = [k for k in ("batch", "settings", "models", "source_id", "k") if k not in rec]
                if missing or not (isinstance(batch, list) and all(isinstance(b, list) and len(b) == 2 for b in batch)):
                    raise SegGenError(f"--reproduce {wanted}: its manifest line {file}:{n} has no usable "
                                      f"{', '.join(missing) or 'batch'} (written by an older version, or edited), so the sample "
                                      "cannot be regenerated from it; regenerate the folder, or pick another id")
                return rec
    raise SegGenError(f"--reproduce {wanted}: no such id in the manifests of --out {out}")


# ---------------------------------------------------------------- progress and summary

def progress(name: str, state, *columns):
    """The bar of the main process: done/total, samples/s, extra columns, elapsed, ETA. The task's
    `rate` field (and any field the extra columns name) is set by the caller."""
    return progress_bar(console, "samples/s", *columns, name=f"[bold]{name}", enabled=show_progress(state))


def show_progress(state) -> bool:
    """Every task shows its bar (a scheduler's task has a log of its own), except the processes of one
    torchrun beside the first (they share a terminal)."""
    return state.is_main_process or not os.environ.get("LOCAL_RANK") or os.environ.get("LOCAL_RANK") == "0"


def share_ids(batches: list[list[tuple[str, int]]]) -> set[str]:
    """The sample ids of a task's batches: what it reads back from the folder to resume."""
    return {sample_id(s, k) for b in batches for s, k in b}


def report(s: dict, compared: str) -> int:
    """Print a run's summary (or a --reproduce verdict about the stored `compared`); the exit code:
    1 when samples failed or a reproduction differs."""
    if "reproduced" in s:
        verdict = f"[green]identical[/] to the stored {compared}" if s["identical"] else f"[red]differs[/] from the stored {compared}"
        if s.get("rejected"):  # masksyn: the mask now drawn is degenerate, so there is no image to compare
            verdict = f"[red]now rejected[/]: {s['rejected']} (the stored {compared} was accepted)"
        console.print(f"reproduced {s['reproduced'] or s.get('id')}: {verdict}")
        return 0 if s["identical"] else 1
    rate = s["written"] / s["seconds"] if s["seconds"] > 0 else 0.0
    console.print(f"written {s['written']}, skipped {s['skipped']} (already done), rejected {s['rejected']}, "
                  f"failed {s['failed']}  [{s['seconds']:.1f} s, {rate:.2f} samples/s] -> {s['out']}")
    if s.get("preview"):
        console.print(f"preview: {s['preview']}")
    if s.get("rejections"):
        console.print(f"attempts {s['attempts']}; rejected by rule: " + ", ".join(f"{k} {v}" for k, v in sorted(s["rejections"].items())))
    for short in s.get("short", [])[:10]:
        console.print(f"[yellow]short:[/] {short}")
    if len(s.get("short", [])) > 10:
        console.print(f"[yellow]short:[/] ... {len(s['short']) - 10} more caption(s) (all in tally.json)")
    if s.get("finalize"):
        console.print(f"{s.get('task', 'this task')} has ended; once every task has, run: {s['finalize']} "
                      f"(readers such as train_seg run it by themselves)")
    for f in s["failures"][:3]:
        console.print(f"[red]failed:[/] {f}")
    if s.get("share") == 0:  # more tasks than blocks of work: this one had none, which is no failure
        console.print(f"{s.get('task', 'this task')}: no work in its share (more tasks than batches or caption blocks)")
        return 0
    if s["written"] == 0 and s["skipped"] == 0:  # the folder holds no sample: say why, loudly, and what to change
        if s.get("rejected"):
            why = (f"every mask drawn was rejected ({', '.join(f'{k} {v}' for k, v in sorted(s.get('rejections', {}).items()))}; "
                   "see rejected*.jsonl). Train Text2Mask longer, or loosen --max-off-palette, or raise --max-attempts")
        elif s["failed"]:
            why = "every sample failed (see the failures above)"
        else:
            why = "there was nothing to draw: check --captions / --limit / --data-root"
        console.print(f"[bold red]no sample written to {s['out']}[/]: {why}. train_seg skips an empty folder it finds by default.")
        return 1
    return 1 if s["failed"] else 0


# ---------------------------------------------------------------- the folder as a COCO panoptic dataset

def write_coco_panoptic_json(out: Path) -> Path:
    """OUT/panoptic_{OUT name}.json, the COCO panoptic format that panopticapi, detectron2 and mmdet read:
    `images` (id, file_name under OUT/images, width, height), `annotations` (image_id, file_name under
    OUT/annotations — the panoptic PNGs, id = R + 256 G + 65536 B — and segments_info) and COCO's 133
    `categories`. Made from the manifest lines and replaced atomically at the end of every run, so after
    a resume it lists exactly the samples the manifests hold (register it with panoptic_root=OUT/annotations,
    image_root=OUT/images).

    Written as it is read, one sample at a time, through the folder's index (paper scale: 1.18 M samples of
    ~25 segments, which as one Python document took tens of GB): `images` into the file, `annotations` into
    a scratch file copied in after them. The bytes are json.dumps of the whole document."""
    import tempfile

    from common.masks.colormap import coco_categories
    from common.data.datasets import synthetic_index

    index = synthetic_index(out)
    # Integer image ids 1..N in sample-id order, as the tools expect (detectron2 casts them with int());
    # the sample id is the file names' stem.
    order = sorted(range(len(index)), key=index.id)
    categories = [{k: c[k] for k in ("id", "name", "isthing", "color") if k in c} for c in coco_categories()]

    def write(tmp):
        with open(tmp, "w") as doc, tempfile.TemporaryFile("w+", dir=out) as annotations:
            doc.write('{"images": [')
            for image_id, i in enumerate(order, start=1):
                sample, sep = index[i], ", " if image_id > 1 else ""
                with Image.open(sample.annotation) as im:  # reads the header only
                    width, height = im.size
                doc.write(sep + json.dumps({"id": image_id, "file_name": sample.image.name, "width": width, "height": height}))
                annotations.write(sep + json.dumps({"image_id": image_id, "file_name": sample.annotation.name,
                                                    "segments_info": sample.segments}))
            doc.write('], "annotations": [')
            annotations.seek(0)
            shutil.copyfileobj(annotations, doc)
            doc.write('], "categories": ' + json.dumps(categories) + "}")

    return atomic_save(out / f"panoptic_{out.name}.json", write)


# ---------------------------------------------------------------- contact sheet (paper Fig. 3 / 4)

def overlay(image: np.ndarray, label: np.ndarray, data: str, alpha: float = 0.5) -> np.ndarray:
    """The image with the label in the usual palette (for people) blended over it."""
    colors = label_to_color(label, palette_for(data, "usual")).astype(np.float32)
    return (alpha * colors + (1 - alpha) * image.astype(np.float32)).astype(np.uint8)


def contact_sheet(rows: list[dict], path: Path, cell: int = 192) -> Path:
    """One row per sample: caption, colour map, image, overlay; written as a PNG."""
    head = 40
    sheet = Image.new("RGB", (3 * cell, len(rows) * (cell + head)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        y = r * (cell + head)
        draw.text((4, y + 4), f"{row['id']}: {row['caption']}"[:3 * cell // 6], fill="black")
        for c, key in enumerate(("colormap", "image", "overlay")):
            tile = Image.fromarray(row[key]).resize((cell, cell), Image.NEAREST if key == "colormap" else Image.BILINEAR)
            sheet.paste(tile, (c * cell, y + head))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
