"""ImgSyn (paper §3.3, §4.1): new images for the human-labelled masks.

    python imgsyn.py --data ade20k --per-sample 50                      # -> synth/imgsyn-ade20k/
    accelerate launch imgsyn.py --data coco --per-sample 10             # sharded over GPUs
    python imgsyn.py --data ade20k --reproduce ADE_train_00000001_007   # regenerate one sample, compare

For every captioned real sample: its label -> colour map (generation palette; COCO panoptic: category
colours with every segment outlined in the edge colour, appendix A.2) -> Mask2Img (a ControlNet on
SDXL, 40 steps, appendix A.4; by default SDXL's reference Euler sampler on the legacy DDPM schedule, guidance 5,
common/diffusion/sampler.py; `--sampler heun --schedule karras` is the earlier default) conditioned on the colour map and the caption -> K new
images. The annotation beside each image is the human one (a hard link), with `segments_info` for
COCO. The paper makes 50 per sample on ADE20K (1,010,500 images) and 10 on COCO (1,182,870).

Output: the synthetic folder of docs/design.md (images/, annotations/, colormaps/, manifest*.jsonl). A
killed run resumes; split into N independent tasks (`--shard I/N`, a Slurm array, torchrun; no process
group, no barrier: common/runtime/shard.py, docs/many-machines.md) task I takes every N-th batch and writes
its own manifest.shard{I}-of-{N}.jsonl, and `python -m common.synthesis.finalize OUT` writes the COCO JSON and the
index once all have ended (a one-task run does it itself). Any sample is regenerated bit for bit by
`--reproduce ID` (see common/synthesis/synth.py).
"""

from __future__ import annotations

from common.runtime import quiet  # first: OMP_WAIT_POLICY before torch starts its threads
from common.runtime import threads

import time
from contextlib import ExitStack
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from PIL import Image

from common import SegGenError
from common.runtime import cli
from common.data import subset
from common.synthesis import finalize, synth
from common.masks.colormap import Palette, label_to_color, panoptic_to_color, resize_nearest
from common.data.datasets import Sample, load_label, load_panoptic, read_dataset
from common.runtime.cluster import on_sigterm, stop_if_sigterm
from common.runtime.lock import task_lock
from common.data.manifest import ManifestWriter, atomic_save, task_path
from common.data.paths import captions_path, mask2img_dir, require, synth_dir
from common.runtime.shard import this_task
from common.runtime.cli import Data, Precision, PrecisionOpt, SamplerOpt, SamplingSchedule, ScheduleOpt, SChurnOpt, SNoiseOpt, STmaxOpt, STminOpt, Sampler, RealSubsetOpt, Split, precision_dtype, user_errors
from common.synthesis.options import FinalizeOpt, ShardOpt
from common.synthesis.synth import console

PATH_FIELDS = ("image", "annotation", "colormap")


@dataclass(frozen=True, kw_only=True)
class Settings(synth.Settings):
    """The manifest's "settings" of an ImgSyn sample."""

    ORDER = ("data", "resolution", "steps", "guidance", "sampler", "schedule", "S_churn", "S_tmin", "S_tmax", "S_noise", "seed",
             "precision", "palette")
    steps: int
    palette: str


@dataclass
class Job(synth.Job):
    """The options of an ImgSyn run."""

    data_root: Path | None = None
    split: str = "train"
    per_sample: int | None = None  # paper §4.1: 50 ADE20K, 10 COCO
    steps: int = 40
    real_subset: Path | None = None  # only these sources (common/data/subset.py)
    shard: str | None = None  # "I/N": this task's share (default: the scheduler's environment; common/runtime/shard.py)
    finalize: bool | None = None  # write the folder's index / COCO JSON at the end (default: when this is the only task)


# ---------------------------------------------------------------- one source sample's inputs

def source_inputs(sample: Sample, data: str, palette: Palette, cache: dict) -> dict:
    """The human label and its colour map at the label's own size (H, W); cached, since the K
    samples of a source come in a row."""
    if sample.id in cache:
        return cache[sample.id]
    if data == "coco":  # panoptic: category colours, segments outlined (appendix A.2)
        ids = load_panoptic(sample)
        label = load_label(sample, data)  # semantic, for the overlay
        cmap = panoptic_to_color(ids, sample.segments, palette)
    else:
        label = load_label(sample, data)
        cmap = label_to_color(label, palette)
    cache[sample.id] = {"label": label, "colormap": cmap}
    return cache[sample.id]


def generation_size(h: int, w: int, res: int) -> tuple[int, int]:
    """(h, w) to draw a label of size (h, w) at: short side `res`, the label's aspect ratio (long side at
    most 2·res), multiples of 8. The scale train_mask2img.py trains at (short side to R, then R×R crops)."""
    scale = res / min(h, w)
    return tuple(int(min(2 * res, max(8, round(x * scale / 8) * 8))) for x in (h, w))


def generate(gen, batch, samples, captions, settings, palette, cache, resize: bool = True) -> list[np.ndarray]:
    """Mask2Img on one batch of (source id, k): (H, W, 3) uint8 images at each label's own size.

    Items are drawn at `generation_size` and resized back, so the human label fits as it is (resize=False:
    left at the drawn size, for `to_label_size` in the writing threads). A UNet batch needs one shape:
    items of different shapes (a batch that spans two sources) go in turns. A source's control rows are
    made once (its K samples come in a row) and kept in `cache`, on the device."""
    res = settings.resolution
    inputs = [source_inputs(samples[s], settings.data, palette, cache) for s, _ in batch]
    sizes = [generation_size(*i["label"].shape, res) for i in inputs]
    out = [None] * len(batch)
    for size in dict.fromkeys(sizes):  # in order of first appearance
        idx = [i for i, sz in enumerate(sizes) if sz == size]
        key = (tuple(batch[i][0] for i in idx), size)  # the batch's sources: the same for most batches in a row
        held = inputs[idx[0]].setdefault("control", {})
        if key not in held:
            rows = []
            for i in idx:  # (1, 3, h, w) float in [0, 1] on the device, per source and size
                if size not in inputs[i].setdefault("row", {}):
                    inputs[i]["row"][size] = synth.control_tensor([resize_nearest(inputs[i]["colormap"], size[::-1])], gen.device)
                rows.append(inputs[i]["row"][size])
            held.clear()  # one batch's control kept per source
            held[key] = torch.cat(rows)  # (B, 3, h, w)
        control = held[key]
        generators = [torch.Generator().manual_seed(synth.derive_seed(settings.seed, *batch[i])) for i in idx]
        cond, uncond = synth.encode(gen, [captions[batch[i][0]] for i in idx], size)
        images = synth.sample_images(gen, cond, uncond, generators, size, settings.steps, settings.sampling(),
                                     control=control)
        for i, im in zip(idx, images):
            out[i] = to_label_size(im, inputs[i]["label"].shape) if resize else im
    return out


def to_label_size(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A drawn (h, w, 3) image resized (bicubic) to the label's (H, W), unchanged when it has that size."""
    h, w = shape
    return image if image.shape[:2] == (h, w) else np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))


# ---------------------------------------------------------------- the job

def imgsyn(**options) -> dict:
    """Run ImgSyn with the options of `Job` (keyword arguments); returns the summary {"written", "skipped",
    "failed", "seconds", "out", ...}."""
    with ExitStack() as held:  # the lock on --out, taken once it is known, released however the run ends
        held.enter_context(on_sigterm())  # SIGTERM: the batch in flight is finished, then exit PREEMPTED (cluster.py)
        return _imgsyn(held, **options)


PER_SAMPLE = {"ade20k": 50, "coco": 10}  # images per human label, paper §4.1; other datasets 10


def _imgsyn(held: ExitStack, **options) -> dict:
    quiet.quiet()
    threads.configure()
    o = Job(**options)
    data, split, resolution, limit, reproduce, batch_size = o.data, o.split, o.resolution, o.limit, o.reproduce, o.batch_size
    # -- setup: resolve the chained default paths, check every input before any model loads
    state = this_task(o.shard)  # bad --shard fails here
    per_sample = o.per_sample or PER_SAMPLE.get(data, 10)  # paper §4.1
    captions = require(Path(o.captions) if o.captions else captions_path(data, split), f"caption.py --data {data} --split {split}", "--captions")
    mask2img = str(o.mask2img or mask2img_dir(data))
    out = Path(o.out) if o.out else synth_dir("imgsyn", data)
    if resolution % 8:
        raise SegGenError(f"--resolution {resolution}: must be a multiple of 8 (the VAE's factor)")

    # -- data: captions joined to the real samples by id
    samples = {s.id: s for s in read_dataset(data, o.data_root, split)}
    caps = synth.read_captions(captions)  # ids checked as file names before anything is written
    if not caps:
        raise SegGenError(f"--captions {captions} holds no captions: run caption.py --data {data} --split {split}")
    missing = sorted(set(caps) - set(samples))
    if missing:
        raise SegGenError(f"--captions {captions}: {len(missing)} id(s) are not in {data}/{split} (e.g. {missing[0]!r}); "
                          f"pass the --data / --data-root / --split the captions were made from, or their --captions")
    if o.real_subset is not None:  # the one subset every stage uses: its sources only
        keep = subset.captioned(caps, o.real_subset, captions)
        caps = {i: c for i, c in caps.items() if i in keep}
    sources = sorted(caps)[:limit] if limit else sorted(caps)
    if reproduce is not None:  # the sample's own manifest line says which models and settings
        return _reproduce(out, reproduce, samples, caps, state)

    base, kind = synth.check_controlnet(mask2img, o.base, data)
    palette = synth.model_palette(mask2img, data)
    dtype = precision_dtype(o.precision, state.device)
    settings = o.settings(Settings, dtype, steps=o.steps, palette=palette.name)
    models = {"mask2img": mask2img, "base": base, "vae": synth.recorded_vae(mask2img)}
    # one run per folder; its tasks side by side (common/runtime/lock.py task_lock)
    held.enter_context(task_lock(out, state.process_index, state.num_processes, "imgsyn", "--out"))
    # -- the plan: batches of (source id, k); task I of N takes batches I, I + N, ... Resuming reads back the
    # ids of this share only, whichever task (of whatever N) wrote them.
    mine = synth.shard(synth.plan_batches(sources, per_sample, batch_size), state)
    share = (state.process_index, state.num_processes)
    done = synth.check_output(out, settings, models, only=synth.share_ids(mine), share=share)
    recorded = synth.record_models(models, out)  # relative to out: the folder moves with its models (issue 17 item 4)
    todo, skipped = synth.process_plan(sources, per_sample, batch_size, state, done)
    summary = {"written": 0, "skipped": skipped, "failed": 0, "rejected": 0, "out": str(out), "task": state.name,
               "share": sum(len(b) for b in mine)}
    console.print(f"[bold]imgsyn.py[/] {data}/{split}: {len(sources)} source(s) x {per_sample} = "
                  f"{len(sources) * per_sample} sample(s); captions {captions}; Mask2Img {mask2img} on {base}; "
                  f"{o.sampler}/{o.schedule} {o.steps} steps, guidance {o.guidance}, {resolution}px, {dtype}; output {out} "
                  f"({state.name}: {sum(len(b) for b in mine)} sample(s), {len(done)} of them written already)")

    # -- model
    gen = synth.load_mask2img(mask2img, base, kind, state.device, dtype, models["vae"]) if todo else None
    if gen is not None and state.is_main_process:
        synth.caption_note(gen, {s: caps[s] for s in sources}, captions)

    # -- the loop
    writer = ManifestWriter(task_path(out / "manifest.jsonl", state.process_index, state.num_processes), PATH_FIELDS)
    sink = synth.SampleSink(writer, workers=o.write_threads)  # files encoded and saved beside the next batch
    rows, failures, cache, start = [], [], {}, time.perf_counter()
    progress = synth.progress("imgsyn", state)
    with writer, sink, progress:
        task = progress.add_task("", total=sum(len(b) for b in todo), rate=0.0)
        for batch in todo:
            stop_if_sigterm("imgsyn.py")  # the batches put so far are committed by the sink on the way out
            for gone in set(cache) - {s for s, _ in batch}:  # keep the sources of this batch only
                del cache[gone]
            sink.forget(cache)
            try:
                images = generate(gen, batch, samples, caps, settings, palette, cache, resize=False)
            except SegGenError as e:  # an unreadable label: the batch's new samples fail, the run goes on
                failures.append(str(e))
                new = sum(synth.sample_id(s, k) not in done for s, k in batch)  # a redone batch's written ones stay
                summary["failed"] += new
                summary["skipped"] += len(batch) - new
                progress.update(task, advance=len(batch))
                continue
            files, records = [], []
            for (s, k), image in zip(batch, images):
                sid = synth.sample_id(s, k)
                if sid in done:  # a batch cut by a kill is drawn again whole; its written samples stay
                    summary["skipped"] += 1
                    continue
                shape = cache[s]["label"].shape
                files += [sink.file(out / "images" / f"{sid}.jpg", lambda p, im=image, hw=shape: synth.save_jpeg(p, to_label_size(im, hw))),
                          sink.shared_file(s, out / "colormaps" / f"{sid}.png", lambda p, c=cache[s]["colormap"]: synth.save_png(p, c)),
                          sink.file(out / "annotations" / f"{sid}.png", lambda p, a=samples[s].annotation: synth.link_or_copy(a, p))]
                record = synth.sample_record("imgsyn", sid, s, k, caps[s], settings, recorded, batch)
                if samples[s].segments is not None:
                    record["segments_info"] = samples[s].segments
                records.append(record)
                summary["written"] += 1
                if len(rows) < o.preview and state.is_main_process:
                    final = to_label_size(image, shape)
                    rows.append({"id": sid, "caption": caps[s], "colormap": cache[s]["colormap"], "image": final,
                                 "overlay": synth.overlay(final, cache[s]["label"], data)})
            sink.put(files, records)  # the lines follow once the files are complete (one fsync per batch)
            progress.update(task, advance=len(batch), rate=summary["written"] / (time.perf_counter() - start))

    summary["seconds"] = time.perf_counter() - start
    finalize.finish(out, state, o.finalize, summary)  # index, COCO JSON: one task, or finalize after all of them
    summary["failures"] = failures
    if rows:
        summary["preview"] = str(synth.contact_sheet(rows, out / "preview.png"))
    return summary


def _reproduce(out, wanted, samples, caps, state) -> dict:
    """Regenerate one sample from its manifest line (its own settings, models and batch) into
    out/reproduce/ and compare it with the stored image byte for byte."""
    rec = synth.find_record(out, wanted)
    settings, models = Settings.from_record(rec["settings"]), synth.resolve_models(rec["models"], out)
    batch = [(s, int(k)) for s, k in rec["batch"]]
    lost = [s for s, _ in batch if s not in samples or s not in caps]
    if lost:
        raise SegGenError(f"--reproduce {wanted}: source(s) {lost[:3]} of its batch are missing from the dataset or captions")
    base, kind = synth.check_controlnet(models["mask2img"], models["base"], settings.data)
    palette = synth.model_palette(models["mask2img"], settings.data)
    dtype = precision_dtype(settings.precision, state.device)
    gen = synth.load_mask2img(models["mask2img"], base, kind, state.device, dtype, models.get("vae"))
    images = generate(gen, batch, samples, caps, settings, palette, {})
    image = images[batch.index((rec["source_id"], int(rec["k"])))]
    path = atomic_save(out / "reproduce" / f"{wanted}.jpg", lambda p: synth.save_jpeg(p, image))
    same = path.read_bytes() == (out / rec["image"]).read_bytes()
    return {"reproduced": str(path), "identical": same}


# ---------------------------------------------------------------- command line


def main(
    data: Annotated[Data, typer.Option(help="Dataset whose human labels are drawn again.", rich_help_panel="Data")] = Data.ade20k,
    data_root: Annotated[Path | None, typer.Option(help="Dataset root (default: $SEGGEN_DATASETS, else ./datasets).", rich_help_panel="Data")] = None,
    split: Annotated[Split, typer.Option(help="Split of the real samples.", rich_help_panel="Data")] = Split.train,
    captions: Annotated[Path | None, typer.Option(help="Captions JSONL (default: captions/{data}_{split}.jsonl, from caption.py).", rich_help_panel="Data")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N captioned sources (a quick look).", rich_help_panel="Data")] = None,
    real_subset: RealSubsetOpt = None,
    mask2img: Annotated[str | None, typer.Option(help="Mask2Img ControlNet folder or hub id (default: runs/mask2img-{data}/).", rich_help_panel="Models")] = None,
    base: Annotated[str | None, typer.Option(help="Base SDXL / SD-1.5 pipeline of the ControlNet (default: the one recorded in its seggen.json).", rich_help_panel="Models")] = None,
    precision: PrecisionOpt = Precision.auto,
    per_sample: Annotated[int | None, typer.Option(min=1, max=10000, help="Images per human label (paper §4.1).", show_default="50 for ade20k, 10 for coco and toy", rich_help_panel="Sampling")] = None,
    steps: Annotated[int, typer.Option(min=1, max=1000, help="EDM sampler steps (paper A.4: 40 for Mask2Img).", rich_help_panel="Sampling")] = 40,
    guidance: Annotated[float, typer.Option(min=1.0, max=30.0, help="Classifier-free guidance scale (1 = none; SDXL's default 5).", rich_help_panel="Sampling")] = 5.0,
    sampler: SamplerOpt = Sampler.euler,
    schedule: ScheduleOpt = SamplingSchedule.legacy,
    s_churn: SChurnOpt = 0.0,
    s_tmin: STminOpt = 0.0,
    s_tmax: STmaxOpt = float("inf"),
    s_noise: SNoiseOpt = 1.0,
    resolution: Annotated[int, typer.Option(min=64, max=4096, help="Short side of the generated image (paper A.4: 768); the long side keeps the label's aspect ratio, and the image is resized back to the label's size.", rich_help_panel="Sampling")] = 768,
    batch_size: Annotated[int, typer.Option(min=1, max=256, help="Samples per UNet call.", rich_help_panel="Sampling")] = 4,
    seed: Annotated[int, typer.Option(min=0, help="Base seed; each sample's seed derives from (source id, k, seed).", rich_help_panel="Sampling")] = 0,
    out: Annotated[Path | None, typer.Option(help="Synthetic folder (default: synth/imgsyn-{data}/).", rich_help_panel="Output")] = None,
    preview: Annotated[int, typer.Option(min=0, max=64, help="Write preview.png with the first N samples (caption, colour map, image, overlay; paper Fig. 4).", rich_help_panel="Output")] = 0,
    reproduce: Annotated[str | None, typer.Option(help="Regenerate sample ID of --out from its manifest line into --out/reproduce/ and compare it byte for byte.", rich_help_panel="Output")] = None,
    shard: ShardOpt = None,
    finalize: FinalizeOpt = None,
):
    """ImgSyn (paper §3.3): new images for every human-labelled mask with Mask2Img; resumable, shardable."""
    with user_errors(console):
        s = imgsyn(**{k: v.value if isinstance(v, Enum) else v for k, v in locals().items()})
    raise typer.Exit(synth.report(s, compared="image"))


if __name__ == "__main__":
    cli.run(main, console)
