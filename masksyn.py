"""MaskSyn (paper §3.3, §4.1): new masks from the captions, then images for them.

    python masksyn.py --per-sample 10                                   # -> synth/masksyn-ade20k/
    accelerate launch masksyn.py --data ade20k --per-sample 10          # sharded over GPUs
    python masksyn.py --reproduce ADE_train_00000001_003                # regenerate one sample, compare

For every caption: Text2Mask (SDXL fine-tuned on colour maps, 200 steps, appendix A.4)
draws a colour map -> label map by the nearest colour of the palette it was trained with, with a 3×3
majority vote (appendix A.2, common/masks/colormap.py) -> the clean colour map re-rendered from that label ->
Mask2Img (ControlNet, 40 steps) -> image. The image is conditioned on the re-rendered map, so the
stored label and the image agree. Degenerate masks are counted, not written, and redrawn with new seeds
(derived from caption id and attempt index) until --per-sample are accepted or --max-attempts drawn. The rules: fewer than
two classes, or more than --max-off-palette of the pixels far from every palette colour (farther than
half the palette's smallest colour distance, i.e. not clearly any class). The paper makes 10 per
ADE20K sample (202,100). COCO (beyond the paper, which leaves instance recovery open, appendix A.2):
the generated edge-coloured map -> `color_to_panoptic` -> panoptic PNG (id = R + 256G + 65536B) with
`segments_info` in the manifest (as imgsyn.py's COCO folders); Mask2Img draws from the recovered
annotation re-rendered by `panoptic_to_color`. Extra COCO rule: "no_instance" (no thing segment recovered).

Sampling (both models): by default SDXL's reference sampler (Stability-AI/generative-models
`scripts/demo/streamlit_helpers.py`): Euler over the legacy DDPM schedule, guidance 5 (common/diffusion/sampler.py),
so 200 + 40 UNet calls per sample; `--sampler heun --schedule karras` is the earlier default (399 + 79).

Output: the synthetic folder of docs/design.md. Resume, independent tasks (`--shard I/N`, a Slurm array,
torchrun: docs/many-machines.md) and `--reproduce` as in imgsyn.py (see common/synthesis/synth.py);
rejected samples go to rejected*.jsonl, with a 64-px picture of the rejected colour map in
rejected/<id>.png, so that a rerun does not redraw them and a person can see what was rejected and why.

Redraws are decided per caption inside a task: the captions are cut into blocks (`block_size`), each block
drawn in rounds whose plan depends on that block's outcomes alone, and task I of N takes blocks I, I + N, ...
So no task waits for another, and one task, N tasks and a resumed run form the same batches.
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
from rich.progress import TextColumn

from common import SegGenError
from common.runtime import cli
from common.data import subset
from common.synthesis import finalize, redraws, synth
from common.masks.colormap import (IGNORE, Palette, color_to_label, color_to_panoptic, label_to_color, off_palette_fraction,
                             panoptic_to_color, panoptic_to_semantic)
from common.data.datasets import id_to_rgb
from common.runtime.cluster import on_sigterm, stop_if_sigterm
from common.runtime.lock import task_lock
from common.data.manifest import ManifestWriter, atomic_save, task_path
from common.data.paths import captions_path, mask2img_dir, require, synth_dir, text2mask_dir
from common.runtime.shard import this_task
from common.runtime.cli import Data, Precision, PrecisionOpt, SamplerOpt, SamplingSchedule, ScheduleOpt, SChurnOpt, SNoiseOpt, STmaxOpt, STminOpt, Sampler, RealSubsetOpt, precision_dtype, user_errors
from common.synthesis.options import FinalizeOpt, ShardOpt
from common.synthesis.synth import console

PATH_FIELDS = ("image", "annotation", "colormap")


@dataclass(frozen=True, kw_only=True)
class Settings(synth.Settings):
    """The manifest's "settings" of a MaskSyn sample."""

    ORDER = ("data", "resolution", "text2mask_steps", "mask2img_steps", "guidance", "sampler", "schedule", "S_churn", "S_tmin", "S_tmax",
             "S_noise", "seed", "precision", "palettes", "max_off_palette", "off_palette_distance")
    text2mask_steps: int
    mask2img_steps: int
    palettes: list  # [Text2Mask's, Mask2Img's] palette names
    max_off_palette: float
    off_palette_distance: float


@dataclass
class Job(synth.Job):
    """The options of a MaskSyn run."""

    text2mask: str | None = None
    per_sample: int = 10  # accepted masks per caption (paper §4.1: 10)
    max_attempts: int | None = None  # masks drawn per caption at most; None: 3 × per_sample
    text2mask_steps: int = 200
    mask2img_steps: int = 40
    max_off_palette: float = 0.1
    real_subset: Path | None = None  # only these captions' ids (common/data/subset.py)
    shard: str | None = None  # "I/N": this task's share (default: the scheduler's environment; common/runtime/shard.py)
    finalize: bool | None = None  # write the folder's index / COCO JSON / tally at the end (default: the only task)


# ---------------------------------------------------------------- one batch: caption -> mask -> image

def decode_mask(cmap: np.ndarray, palette: Palette, max_distance: float) -> tuple[np.ndarray, float, int]:
    """A generated colour map -> (label map, share of off-palette pixels, number of classes).

    f_color→mask (appendix A.2): nearest palette colour with a 3×3 majority vote; pixels far from every
    colour (measured before the vote) become 0 ("other", ignored in training)."""
    label = color_to_label(cmap, palette, max_distance=max_distance, vote=True)
    far = label == IGNORE  # (H, W) bool
    off = float(far.mean())
    label[far] = 0
    classes = int(np.count_nonzero(np.bincount(label.ravel(), minlength=256)[1:]))
    return label, off, classes


def decode_panoptic(cmap: np.ndarray, palette: Palette, max_distance: float) -> dict:
    """A generated COCO panoptic colour map -> {"panoptic": (H, W) segment ids, "segments_info", "label":
    (H, W) category ids, "off_palette", "classes"} by `color_to_panoptic` (category by nearest palette
    colour, things split along the edge colour, edge pixels given back to their neighbours)."""
    seg, segments = color_to_panoptic(cmap, palette)
    label = panoptic_to_semantic(seg, segments)
    classes = len({x["category_id"] for x in segments})
    return {"panoptic": seg, "segments_info": segments, "label": label, "classes": classes,
            "off_palette": round(off_palette_fraction(cmap, palette, max_distance), 6)}


def judge(label: np.ndarray, off: float, classes: int, settings) -> tuple[str, str] | None:
    """(rule, reason with its figure) of a degenerate mask, else None. Rules: "classes" (fewer than two
    classes), "off_palette" (more than --max-off-palette of the pixels far from every palette colour)."""
    if classes < 2:
        return "classes", f"{classes} class(es), fewer than 2"
    if off > settings.max_off_palette:
        return "off_palette", f"{off:.1%} of pixels off the palette, above --max-off-palette {settings.max_off_palette:.1%}"
    return None


def generate(t2m, m2i, batch, captions, settings, palettes) -> list[dict]:
    """Text2Mask then Mask2Img on one batch of (source id, k). Per item: {"label", "colormap", "image",
    "off_palette", "classes"} or, for a degenerate mask, {"rule", "rejected": reason, ...} without an image."""
    res = settings.resolution
    generators = [torch.Generator().manual_seed(synth.derive_seed(settings.seed, s, k)) for s, k in batch]
    texts = [captions[s] for s, _ in batch]

    # 1. caption -> colour map (Text2Mask)
    cond, uncond = synth.encode(t2m, texts, (res, res))
    cmaps = synth.sample_images(t2m, cond, uncond, generators, (res, res), settings.text2mask_steps, settings.sampling())
    # 2. colour map -> label; degenerate masks are dropped here
    items = []
    for cmap in cmaps:  # cmap: (H, W, 3) uint8, as drawn
        if settings.data == "coco":  # panoptic: instances recovered along the edge colour (issue 14)
            item = decode_panoptic(cmap, palettes[0], settings.off_palette_distance)
        else:
            label, off, classes = decode_mask(cmap, palettes[0], settings.off_palette_distance)
            item = {"label": label, "off_palette": round(off, 6), "classes": classes}
        verdict = judge(item["label"], item["off_palette"], item["classes"], settings)
        if verdict is None and settings.data == "coco" and not any(x["isthing"] for x in item["segments_info"]):
            verdict = "no_instance", "no thing instance recovered (stuff only)"
        if verdict:
            item["rule"], item["rejected"], item["drawn"] = verdict[0], verdict[1], cmap
        items.append(item)
    keep = [i for i, it in enumerate(items) if "rejected" not in it]
    if not keep:
        return items
    # 3. label -> clean colour map in Mask2Img's palette -> image (Mask2Img)
    for i in keep:
        it = items[i]  # COCO: the recovered annotation re-rendered, edges and all, so label and image agree
        it["colormap"] = (panoptic_to_color(it["panoptic"], it["segments_info"], palettes[1]) if settings.data == "coco"
                          else label_to_color(it["label"], palettes[1]))
    cond, uncond = synth.encode(m2i, [texts[i] for i in keep], (res, res))
    control = synth.control_tensor([items[i]["colormap"] for i in keep])
    images = synth.sample_images(m2i, cond, uncond, [generators[i] for i in keep], (res, res), settings.mask2img_steps,
                                 settings.sampling(), control=control)
    for i, image in zip(keep, images):
        items[i]["image"] = image
    return items


# ---------------------------------------------------------------- the job

def masksyn(**options) -> dict:
    """Run MaskSyn with the options of `Job` (keyword arguments); returns the summary {"written", "skipped",
    "rejected", "failed", "seconds", "out", ...}."""
    with ExitStack() as held:  # the lock on --out, taken once it is known, released however the run ends
        held.enter_context(on_sigterm())  # SIGTERM: the batch in flight is finished, then exit PREEMPTED (cluster.py)
        return _masksyn(held, **options)


def _masksyn(held: ExitStack, **options) -> dict:
    quiet.quiet()
    threads.configure()
    o = Job(**options)
    data, resolution, limit, reproduce, per_sample, batch_size = o.data, o.resolution, o.limit, o.reproduce, o.per_sample, o.batch_size
    # -- setup: resolve the chained default paths, check every input before any model loads
    state = this_task(o.shard)  # bad --shard fails here
    max_attempts = o.max_attempts or 3 * per_sample
    if max_attempts < per_sample:
        raise SegGenError(f"--max-attempts {max_attempts}: must be at least --per-sample ({per_sample})")
    if resolution % 8:
        raise SegGenError(f"--resolution {resolution}: must be a multiple of 8 (the VAE's factor)")
    captions = require(Path(o.captions) if o.captions else captions_path(data, "train"), f"caption.py --data {data}", "--captions")
    text2mask = str(o.text2mask or text2mask_dir(data))
    mask2img = str(o.mask2img or mask2img_dir(data))
    out = Path(o.out) if o.out else synth_dir("masksyn", data)

    # -- data: the captions are the only input; their ids become file names (checked here, before any write)
    caps = synth.read_captions(captions)
    if not caps:
        raise SegGenError(f"--captions {captions} holds no captions: run caption.py --data {data}")
    if o.real_subset is not None:  # the one subset every stage uses: its captions only
        keep = subset.captioned(caps, o.real_subset, captions)
        caps = {i: c for i, c in caps.items() if i in keep}
    sources = sorted(caps)[:limit] if limit else sorted(caps)
    if reproduce is not None:  # the sample's own manifest line says which models and settings
        return _reproduce(out, reproduce, caps, state)

    synth.check_pipeline(text2mask, "--text2mask", f"train_text2mask.py --data {data}")  # bad folders fail here, not mid-run
    base, _ = synth.check_controlnet(mask2img, o.base, data)
    palettes = (synth.model_palette(text2mask, data), synth.model_palette(mask2img, data))
    dtype = precision_dtype(o.precision, state.device)
    settings = o.settings(Settings, dtype, text2mask_steps=o.text2mask_steps, mask2img_steps=o.mask2img_steps,
                          palettes=[p.name for p in palettes], max_off_palette=o.max_off_palette,
                          off_palette_distance=palettes[0].min_distance() / 2)
    models = {"text2mask": text2mask, "mask2img": mask2img, "base": base, "vae": synth.recorded_vae(mask2img)}
    rejected_path = out / "rejected.jsonl"
    # one run per folder; its tasks side by side (common/runtime/lock.py task_lock)
    held.enter_context(task_lock(out, state.process_index, state.num_processes, "masksyn", "--out"))
    # -- this task's share: blocks of captions (block_size), task I of N taking blocks I, I + N, ...; to resume
    # it reads back the outcomes of its own captions only, whichever task (of whatever N) drew them.
    blocks = synth.shard(redraws.caption_blocks(sources, per_sample, batch_size), state)
    mine = {s for block in blocks for s in block}
    in_share = lambda sid: sid.rpartition("_")[0] in mine  # noqa: E731
    share = (state.process_index, state.num_processes)
    done = synth.check_output(out, settings, models, only=in_share, share=share)
    # Rejections carry their settings too: a rerun with e.g. a looser --max-off-palette must not skip them.
    rejected = synth.check_output(out, settings, models, rejected_path, only=in_share, share=share)  # ids only, streaming
    recorded = synth.record_models(models, out)  # relative to out: the folder moves with its models (issue 17 item 4)
    plan = {"per_sample": per_sample, "max_attempts": max_attempts}  # recorded on every line: finalize's tally reads it

    summary = {"written": 0, "skipped": 0, "rejected": 0, "failed": 0, "attempts": 0, "rejections": {}, "out": str(out),
               "task": state.name, "share": len(mine)}
    console.print(f"[bold]masksyn.py[/] {data}: {len(sources)} caption(s) x {per_sample} = {len(sources) * per_sample} "
                  f"sample(s), at most {max_attempts} attempt(s) per caption; captions {captions}; Text2Mask {text2mask}; "
                  f"Mask2Img {mask2img} on {base}; {o.sampler}/{o.schedule} {o.text2mask_steps}/{o.mask2img_steps} steps, "
                  f"guidance {o.guidance}, {resolution}px, {dtype}; output {out} ({state.name}: {len(mine)} caption(s) in "
                  f"{len(blocks)} block(s), {len(done)} accepted and {len(rejected)} rejected before)")

    writer = ManifestWriter(task_path(out / "manifest.jsonl", state.process_index, state.num_processes), PATH_FIELDS)
    rejects = ManifestWriter(task_path(rejected_path, state.process_index, state.num_processes), ("colormap",))
    gens, rows, total, start = None, [], 0, time.perf_counter()
    finished = redraws.Either(done, rejected)  # drawn already, accepted or rejected (no union copied per round)
    why: dict[str, list] = {}  # caption -> [rules of this run's rejections, last reason]
    progress = synth.progress("masksyn", state, TextColumn("{task.fields[rejected]} rejected"))
    sink = synth.SampleSink(writer, workers=o.write_threads)  # files encoded and saved beside the next batch
    with writer, rejects, sink, progress:
        task = progress.add_task("", total=0, rate=0.0, rejected=0)
        for block in blocks:
            planned = dict.fromkeys(block, 0)  # attempts planned so far per caption of the block: 0..planned-1
            # A round's plan depends only on this block's outcomes before it (known here, in memory).
            while items := redraws.next_round(planned, done, per_sample, max_attempts):
                todo, skipped = synth.process_items(items, batch_size, redraws.ONE_TASK, finished)
                summary["skipped"] += skipped
                total += sum(len(b) for b in todo)
                progress.update(task, total=total)
                for batch in todo:
                    stop_if_sigterm("masksyn.py")  # the batches put so far are committed by the sink on the way out
                    if gens is None:  # models load once there is work
                        gens = load_models(models, settings, state.device)
                        if state.is_main_process:
                            synth.caption_note(gens[0], {s: caps[s] for s in sources}, captions)
                    files, records, lines = [], [], []  # written by the sink's threads beside the next batch
                    for (s, k), item in zip(batch, generate(*gens, batch, caps, settings, palettes)):
                        sid = synth.sample_id(s, k)
                        if sid in done or sid in rejected:  # a batch cut by a kill is drawn again whole
                            summary["skipped"] += 1
                            continue
                        summary["attempts"] += 1
                        if "rejected" in item:  # kept as a small picture with its rule (issue 27 item 1)
                            files.append(sink.file(out / "rejected" / f"{sid}.png", lambda p, x=item["drawn"]: redraws.save_thumbnail(p, x)))
                            lines.append(rejects)
                            records.append({"id": sid, "source_id": s, "k": k, "rule": item["rule"], "reason": item["rejected"],
                                            "off_palette": item["off_palette"], "classes": item["classes"],
                                            "colormap": f"rejected/{sid}.png", "settings": settings.record(), "models": recorded,
                                            "batch": [[b, kk] for b, kk in batch], **plan})
                            rejected.add(sid)
                            summary["rejected"] += 1
                            summary["rejections"][item["rule"]] = summary["rejections"].get(item["rule"], 0) + 1
                            rules = why.setdefault(s, [{}, ""])
                            rules[0][item["rule"]] = rules[0].get(item["rule"], 0) + 1
                            rules[1] = item["rejected"]
                            continue
                        annotation = id_to_rgb(item["panoptic"]) if data == "coco" else item["label"]  # COCO panoptic / ADE20K encoding
                        files += [sink.file(out / "images" / f"{sid}.jpg", lambda p, x=item["image"]: synth.save_jpeg(p, x)),
                                  sink.file(out / "colormaps" / f"{sid}.png", lambda p, x=item["colormap"]: synth.save_png(p, x)),
                                  sink.file(out / "annotations" / f"{sid}.png", lambda p, x=annotation: synth.save_png(p, x))]
                        record = {**synth.sample_record("masksyn", sid, s, k, caps[s], settings, recorded, batch),
                                  "attempt": k, "off_palette": item["off_palette"], "classes": item["classes"]}
                        if data == "coco":
                            record["segments_info"] = item["segments_info"]
                        lines.append(writer), records.append({**record, **plan})
                        done.add(sid)
                        summary["written"] += 1
                        if len(rows) < o.preview and state.is_main_process:
                            rows.append({"id": sid, "caption": caps[s], "colormap": item["colormap"], "image": item["image"],
                                         "overlay": synth.overlay(item["image"], item["label"], data)})
                    sink.put(files, records, lines)  # files, then the lines in order, one fsync per manifest
                    progress.update(task, advance=len(batch), rejected=summary["rejected"],
                                    rate=summary["written"] / (time.perf_counter() - start))

    summary["seconds"] = time.perf_counter() - start
    summary["failures"] = []
    summary["short"] = redraws.short_captions(sorted(mine), done, rejected, why, per_sample, max_attempts)
    finalize.finish(out, state, o.finalize, summary)  # index, COCO JSON, tally.json: one task, or finalize after all
    if rows:
        summary["preview"] = str(synth.contact_sheet(rows, out / "preview.png"))
    return summary


def load_models(models: dict, settings: Settings, device) -> tuple:
    """(Text2Mask, Mask2Img) ready to sample, in the run's precision."""
    dtype = precision_dtype(settings.precision, device)
    t2m_kind = synth.check_pipeline(models["text2mask"], "--text2mask", "train_text2mask.py")
    base, kind = synth.check_controlnet(models["mask2img"], models["base"], settings.data)
    return (synth.load_text2mask(models["text2mask"], t2m_kind, device, dtype),
            synth.load_mask2img(models["mask2img"], base, kind, device, dtype, models.get("vae")))


def _reproduce(out, wanted, caps, state) -> dict:
    """Regenerate one sample from its manifest line (its own settings, models and batch) into
    out/reproduce/ and compare image and annotation with the stored ones byte for byte."""
    rec = synth.find_record(out, wanted)
    settings, models = Settings.from_record(rec["settings"]), synth.resolve_models(rec["models"], out)
    batch = [(s, int(k)) for s, k in rec["batch"]]
    lost = [s for s, _ in batch if s not in caps]
    if lost:
        raise SegGenError(f"--reproduce {wanted}: source(s) {lost[:3]} of its batch are not in --captions")
    palettes = tuple(synth.model_palette(models[m], settings.data) for m in ("text2mask", "mask2img"))
    t2m, m2i = load_models(models, settings, state.device)
    item = generate(t2m, m2i, batch, caps, settings, palettes)[batch.index((rec["source_id"], int(rec["k"])))]
    if "rejected" in item:  # drawn again, the mask is degenerate now: say which rule and its figure
        return {"reproduced": None, "id": wanted, "identical": False, "rejected": f"{item['rule']}: {item['rejected']}"}
    image = atomic_save(out / "reproduce" / f"{wanted}.jpg", lambda p: synth.save_jpeg(p, item["image"]))
    annotation = id_to_rgb(item["panoptic"]) if settings.data == "coco" else item["label"]
    label = atomic_save(out / "reproduce" / f"{wanted}.png", lambda p: synth.save_png(p, annotation))
    same = image.read_bytes() == (out / rec["image"]).read_bytes() and label.read_bytes() == (out / rec["annotation"]).read_bytes()
    return {"reproduced": str(image), "identical": same}


# ---------------------------------------------------------------- command line

def main(
    data: Annotated[Data, typer.Option(help="Dataset whose classes and palette the masks use. ade20k: semantic label PNGs (the paper); coco: panoptic PNGs + segments_info, instances recovered from the edge-coloured maps (common/masks/colormap.py: color_to_panoptic, beyond the paper); toy: the toy world.", rich_help_panel="Data")] = Data.ade20k,
    captions: Annotated[Path | None, typer.Option(help="Captions JSONL, the prompts (default: captions/{data}_train.jsonl, from caption.py).", rich_help_panel="Data")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N captions (a quick look).", rich_help_panel="Data")] = None,
    real_subset: RealSubsetOpt = None,
    text2mask: Annotated[str | None, typer.Option(help="Text2Mask pipeline folder or hub id (default: runs/text2mask-{data}/).", rich_help_panel="Models")] = None,
    mask2img: Annotated[str | None, typer.Option(help="Mask2Img ControlNet folder or hub id (default: runs/mask2img-{data}/).", rich_help_panel="Models")] = None,
    base: Annotated[str | None, typer.Option(help="Base SDXL / SD-1.5 pipeline of the ControlNet (default: the one recorded in its seggen.json).", rich_help_panel="Models")] = None,
    precision: PrecisionOpt = Precision.auto,
    per_sample: Annotated[int, typer.Option(min=1, max=10000, help="Accepted masks per caption (paper §4.1: 10): rejected masks are redrawn with new seeds.", rich_help_panel="Sampling")] = 10,
    max_attempts: Annotated[int | None, typer.Option(min=1, help="Masks drawn per caption at most, rejected ones included (default: 3 × --per-sample); a caption still short is named in the summary and tally.json.", rich_help_panel="Filtering")] = None,
    text2mask_steps: Annotated[int, typer.Option(min=1, max=1000, help="EDM steps for Text2Mask (paper A.4: 200).", rich_help_panel="Sampling")] = 200,
    mask2img_steps: Annotated[int, typer.Option(min=1, max=1000, help="EDM steps for Mask2Img (paper A.4: 40).", rich_help_panel="Sampling")] = 40,
    guidance: Annotated[float, typer.Option(min=1.0, max=30.0, help="Classifier-free guidance scale of both models (1 = none; SDXL's default 5).", rich_help_panel="Sampling")] = 5.0,
    sampler: SamplerOpt = Sampler.euler,
    schedule: ScheduleOpt = SamplingSchedule.legacy,
    s_churn: SChurnOpt = 0.0,
    s_tmin: STminOpt = 0.0,
    s_tmax: STmaxOpt = float("inf"),
    s_noise: SNoiseOpt = 1.0,
    resolution: Annotated[int, typer.Option(min=64, max=4096, help="Side of the generated masks and images (paper A.4: 768).", rich_help_panel="Sampling")] = 768,
    batch_size: Annotated[int, typer.Option(min=1, max=256, help="Samples per UNet call.", rich_help_panel="Sampling")] = 4,
    seed: Annotated[int, typer.Option(min=0, help="Base seed; each sample's seed derives from (source id, k, seed).", rich_help_panel="Sampling")] = 0,
    max_off_palette: Annotated[float, typer.Option(min=0.0, max=1.0, help="Reject a mask with more than this share of pixels far from every palette colour.", rich_help_panel="Filtering")] = 0.1,
    out: Annotated[Path | None, typer.Option(help="Synthetic folder (default: synth/masksyn-{data}/).", rich_help_panel="Output")] = None,
    preview: Annotated[int, typer.Option(min=0, max=64, help="Write preview.png with the first N samples (caption, colour map, image, overlay; paper Fig. 3).", rich_help_panel="Output")] = 0,
    reproduce: Annotated[str | None, typer.Option(help="Regenerate sample ID of --out from its manifest line into --out/reproduce/ and compare it byte for byte.", rich_help_panel="Output")] = None,
    shard: ShardOpt = None,
    finalize: FinalizeOpt = None,
):
    """MaskSyn (paper §3.3): new masks from captions with Text2Mask, images for them with Mask2Img."""
    with user_errors(console):
        s = masksyn(**{k: v.value if isinstance(v, Enum) else v for k, v in locals().items()})
    raise typer.Exit(synth.report(s, compared="sample"))


if __name__ == "__main__":
    cli.run(main, console)
