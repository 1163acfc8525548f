"""Caption every image of a real dataset (paper §3.2): the text side of the Text2Mask and Mask2Img pairs.

    python caption.py --data ade20k --data-root PATH --split train          # -> captions/ade20k_train.jsonl
    accelerate launch caption.py --data ade20k ...                          # sharded over GPUs
    python caption.py --data ade20k --captioner labels                      # no model: class names by area

The paper captions with BLIP-2 FlanT5-xxl and the prompt "Question: What are shown in the photo?
Answer:". Output: one `{"id", "image", "caption", "captioner", "prompt", "model"}` line per image, image
relative to the data root. Killed runs resume: ids already written are skipped, and every line is
appended only once its caption exists. Split into N independent tasks (`--shard I/N`, a Slurm array,
torchrun: common/runtime/shard.py, docs/many-machines.md), task I takes every N-th sample of the dataset
(a slice fixed by the dataset, not by what is done, so tasks never overlap) and writes its own
`NAME.shard{I}-of-{N}.jsonl`; readers take the family as one file. Sample ids become file names downstream, so
each is checked here (common/data/ids.py), and two images with one stem (`X.jpg`, `X.png`) are refused.
"""

from __future__ import annotations

from common.runtime import quiet  # first: OMP_WAIT_POLICY before torch starts its threads
from common.runtime import threads

import copy
import json
import time
from contextlib import ExitStack
from enum import Enum
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console

from common import SegGenError
from common.runtime import cli
from common.data import subset
from common.runtime.cli import Data, Precision, RealSubsetOpt, Split, precision_dtype, user_errors
from common.masks.colormap import class_names
from common.data.datasets import Sample, default_data_root, load_image, load_label, read_dataset
from common.runtime.cluster import ignore_sigterm, on_sigterm, stop_if_sigterm
from common.runtime.lock import task_lock
from common.data.ids import check_ids, refuse_stem_clashes
from common.data.manifest import CAPTION_FIELDS, SYNTHETIC_FIELDS, ManifestWriter, check_appending, read_ids, task_path
from common.data.paths import captions_path
from common.runtime.progress import progress_bar
from common.runtime.shard import shard, this_task
from common.synthesis.options import ShardOpt

PAPER_MODEL = "Salesforce/blip2-flan-t5-xxl"
PAPER_PROMPT = "Question: What are shown in the photo? Answer:"
console = Console(stderr=True, soft_wrap=True)  # no hard wraps: messages stay greppable in logs


class Captioner(str, Enum):
    blip2 = "blip2"
    labels = "labels"


class Quantize(str, Enum):
    none = "none"
    int8 = "8bit"
    int4 = "4bit"


# ---------------------------------------------------------------- captioners

def labels_caption(sample: Sample, data: str, names: dict[int, str]) -> str:
    """The class names present in the sample's annotation, largest area first: "wall, floor, bed".
    COCO's panoptic names lose their "-merged" / "-other" / "-stuff" tags ("sky-other-merged" -> "sky")."""
    label = load_label(sample, data)
    area = np.bincount(label.ravel(), minlength=256)
    area[0] = 0  # ADE20K "other" / COCO void: not a class
    order = np.argsort(-area, kind="stable")
    tags = {"merged", "other", "stuff"}
    clean = (" ".join(w for w in names[int(v)].split("-") if w not in tags) for v in order if area[v] > 0)
    return ", ".join(clean)


class ImageFolder:
    """Decodes images and runs BLIP-2's image processor (resize to 224, normalise) in DataLoader workers, so
    that reading overlaps generation and only a (3, 224, 224) tensor per image reaches the main process. A
    file that fails to decode comes back as its error message instead."""

    def __init__(self, samples: list[Sample], image_processor):
        self.samples, self.image_processor = samples, image_processor

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        try:
            image = load_image(self.samples[i].image)
        except SegGenError as e:
            return i, None, str(e)
        return i, self.image_processor(images=image, return_tensors="pt")["pixel_values"][0], None  # (3, 224, 224)


def _collate(batch):
    return batch  # a list of (index, pixel values or None, error or None)


def load_blip2(model: str, quantize: Quantize, precision: Precision, device):
    """BLIP-2 from a hub id or folder, in the precision / quantisation asked for."""
    import torch
    from transformers import BitsAndBytesConfig, Blip2ForConditionalGeneration, Blip2Processor

    dtype = precision_dtype(precision.value, device)
    kwargs = {"dtype": dtype}
    if quantize != Quantize.none:  # transformers 5 takes only a BitsAndBytesConfig (no load_in_8bit=)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=quantize == Quantize.int8, load_in_4bit=quantize == Quantize.int4, bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": device}
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
        raise SegGenError(f"--model {model}: no such folder; pass a BLIP-2 folder or a hub id such as {PAPER_MODEL}")
    try:
        processor = Blip2Processor.from_pretrained(model)
        net = Blip2ForConditionalGeneration.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as e:  # missing files, offline hub id, or a path the hub client rejects
        raise SegGenError(f"--model {model}: cannot load a BLIP-2 model and processor from it ({e})") from e
    if quantize == Quantize.none:
        net = net.to(device)
    return net.eval(), processor, dtype


def generation_config(net, max_new_tokens: int, num_beams: int):
    """The checkpoint's generation config with our length and beams."""
    gen = copy.deepcopy(net.generation_config)
    gen.max_new_tokens, gen.num_beams = max_new_tokens, num_beams
    return gen


def prompt_inputs(processor, prompt: str) -> dict:
    """input_ids and attention_mask, (1, L), of the prompt as the processor writes them beside an image (BLIP-2's
    processor puts the query's image tokens first only when it is given images; a blank one stands in)."""
    from PIL import Image

    inputs = processor(images=Image.new("RGB", (8, 8)), text=[prompt], return_tensors="pt")
    return {k: v for k, v in inputs.items() if k != "pixel_values"}


def caption_pixels(net, processor, pixel_values, text: dict, prompt: str, gen, device, dtype) -> list[str]:
    """One batch of processed images (B, 3, 224, 224) -> their captions: generate with the prompt's tokens
    (`prompt_inputs`, one row repeated), decode, the prompt left out (what the job runs per batch)."""
    import torch

    n = len(pixel_values)
    inputs = {k: v.expand(n, -1).to(device) for k, v in text.items()}
    inputs["pixel_values"] = pixel_values.to(device, dtype)
    with torch.inference_mode():
        ids = net.generate(**inputs, generation_config=gen)
    texts = [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
    return [t[len(prompt):].strip() if t.startswith(prompt) else t for t in texts]  # decoder-only LMs echo the prompt


def caption_images(net, processor, images: list, prompt: str, gen, device, dtype) -> list[str]:
    """One batch of decoded PIL images -> their captions: the image processor here, then `caption_pixels`
    (bench/real_size.py times this at real size)."""
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    return caption_pixels(net, processor, pixels, prompt_inputs(processor, prompt), prompt, gen, device, dtype)


# ---------------------------------------------------------------- the job

def caption(*args, **kwargs) -> dict:
    """Caption a dataset split (the arguments of `_caption`); returns the summary {"captioned", "skipped", "failed",
    "seconds", "out"}."""
    with ExitStack() as held:  # the lock on --out, taken once it is known, released however the run ends
        held.enter_context(on_sigterm())  # SIGTERM: the batch in flight is written, then exit PREEMPTED (cluster.py)
        return _caption(held, *args, **kwargs)


def _caption(
    held: ExitStack,
    data: str, data_root: Path | None, split: str, out: Path | None = None, captioner: str = "blip2",
    model: str = PAPER_MODEL, prompt: str = PAPER_PROMPT, quantize: str = "none", precision: str = "auto",
    batch_size: int = 16, num_workers: int | None = None, max_new_tokens: int = 30, num_beams: int = 1, limit: int | None = None,
    real_subset: Path | None = None, shard_spec: str | None = None,
) -> dict:
    """Caption a dataset split; returns the summary {"captioned", "skipped", "failed", "seconds", "out"}."""
    quiet.quiet()
    plan = threads.configure()
    state = this_task(shard_spec)  # bad --shard fails here
    if (note := plan.workers_note(num_workers)) and state.is_main_process:
        console.print(f"[yellow]note:[/] {note}")
    num_workers = plan.workers(num_workers)
    samples = read_dataset(data, data_root, split)  # bad --data / --data-root fail here, before any model
    root = Path(data_root) if data_root is not None else default_data_root()
    out = Path(out) if out is not None else captions_path(data, split)
    if real_subset is not None:  # the one subset every stage uses (common/data/subset.py)
        samples = subset.apply(samples, real_subset)
    samples = samples[:limit] if limit else samples
    # Ids become file names downstream (masksyn, imgsyn, quality): refused here, naming the image, if unsafe.
    refuse_stem_clashes(sorted({str(s.image.parent) for s in samples}), f"--data {data} --split {split}")
    check_ids([s.id for s in samples], [str(s.image) for s in samples])
    mine = shard(samples, state)
    meta = {"captioner": captioner, "prompt": prompt if captioner == "blip2" else None,
            "model": model if captioner == "blip2" else None}  # on every line: what made it
    # one run per captions file; its tasks side by side (common/runtime/lock.py task_lock)
    held.enter_context(task_lock(out, state.process_index, state.num_processes, "caption", "--out", file=True))
    # another stage's manifest, or captions of another captioner / prompt / model: refused, not appended to
    check_appending(out, option="--out", kind="caption", fields=CAPTION_FIELDS, made_with=meta,
                    foreign=tuple(set(SYNTHETIC_FIELDS) - set(CAPTION_FIELDS)),  # a synthetic folder's lines
                    fix=f"pass the same --captioner / --prompt / --model to resume it, or another --out for these captions "
                        f"(the default is captions/{data}_{split}.jsonl), or delete {out} to caption again")
    # this share's ids only, streaming, from the files whose shares meet it, whichever task wrote them
    done = read_ids(out, {s.id for s in mine}, (state.process_index, state.num_processes))
    todo = [s for s in mine if s.id not in done]
    console.print(f"[bold]caption.py[/] {data}/{split}: {len(samples)} image(s) under {root}, output {out}"
                  f" (task {state.process_index} of {state.num_processes}: {len(mine)} image(s), {len(done)} already captioned)")

    errors_path = task_path(out.with_name(out.stem + ".errors.jsonl"), state.process_index, state.num_processes)
    summary = {"captioned": 0, "skipped": len(mine) - len(todo), "failed": 0, "out": str(out)}
    failures = []
    start = time.perf_counter()
    progress = progress_bar(console, "img/s", name="[bold]captioning", enabled=True)
    with ManifestWriter(task_path(out, state.process_index, state.num_processes), path_fields=("image",)) as writer, progress:
        task = progress.add_task("", total=len(todo), rate=0.0)

        def write(done: list[tuple[Sample, str]]):  # one batch, one fsync
            writer.append_many([{"id": sample.id, "image": sample.image.relative_to(root).as_posix(), "caption": text, **meta}
                                for sample, text in done])
            summary["captioned"] += len(done)

        def fail(sample: Sample, reason: str):
            failures.append({"id": sample.id, "image": str(sample.image), "error": reason})
            summary["failed"] += 1

        def advance(n: int):
            progress.update(task, advance=n, rate=(summary["captioned"] + summary["failed"]) / (time.perf_counter() - start))

        if captioner == "labels":
            names = class_names(data)
            for sample in todo:
                stop_if_sigterm("caption.py")  # the captions written so far are whole lines
                try:  # only the item's own failure (bad label) is caught: a write error (disk full) stops the run
                    text = labels_caption(sample, data, names)
                except SegGenError as e:
                    fail(sample, str(e))
                else:
                    write([(sample, text)])
                advance(1)
        elif todo:
            import torch
            from torch.utils.data import DataLoader

            net, processor, dtype = load_blip2(model, Quantize(quantize), Precision(precision), state.device)
            start = time.perf_counter()  # the rate counts captioning, not loading the model
            gen = generation_config(net, max_new_tokens, num_beams)
            text = prompt_inputs(processor, prompt)  # the same prompt for every image: tokenised once
            loader = DataLoader(ImageFolder(todo, processor.image_processor), batch_size=batch_size, num_workers=num_workers,
                                collate_fn=_collate, worker_init_fn=ignore_sigterm if num_workers else None)
            for batch in loader:
                stop_if_sigterm("caption.py")  # the captions written so far are whole lines
                good = [(i, px) for i, px, err in batch if err is None]
                for i, _, err in batch:
                    if err is not None:
                        fail(todo[i], err)
                if good:
                    pixels = torch.stack([px for _, px in good])  # (B, 3, 224, 224)
                    texts = caption_pixels(net, processor, pixels, text, prompt, gen, state.device, dtype)
                    write([(todo[i], text) for (i, _), text in zip(good, texts)])
                advance(len(batch))

    if failures:
        with open(errors_path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in failures)
    summary["seconds"] = time.perf_counter() - start
    summary["errors"] = str(errors_path) if failures else None
    return summary


# ---------------------------------------------------------------- command line

def main(
    data: Annotated[Data, typer.Option(help="Dataset to caption.", rich_help_panel="Data")] = Data.ade20k,
    data_root: Annotated[Path | None, typer.Option(help="Dataset root (default: $SEGGEN_DATASETS, else ./datasets).", rich_help_panel="Data")] = None,
    split: Annotated[Split, typer.Option(help="Split to caption.", rich_help_panel="Data")] = Split.train,
    limit: Annotated[int | None, typer.Option(min=1, help="Caption only the first N images (a quick look).", rich_help_panel="Data")] = None,
    real_subset: RealSubsetOpt = None,
    out: Annotated[Path | None, typer.Option(help="Output JSONL (default: captions/{data}_{split}.jsonl).", rich_help_panel="Output")] = None,
    captioner: Annotated[Captioner, typer.Option(help="blip2: the paper's captioner (§3.2). labels: the class names in the annotation, largest area first; no model, offline.", rich_help_panel="Captioner")] = Captioner.blip2,
    model: Annotated[str, typer.Option(help="BLIP-2 hub id or folder.", rich_help_panel="Captioner")] = PAPER_MODEL,
    prompt: Annotated[str, typer.Option(help="Prompt given to BLIP-2 with each image (the paper's by default).", rich_help_panel="Captioner")] = PAPER_PROMPT,
    quantize: Annotated[Quantize, typer.Option(help="Load BLIP-2 in 8 or 4 bit through bitsandbytes (8bit fits FlanT5-xxl on a 24 GB card).", rich_help_panel="Captioner")] = Quantize.none,
    precision: Annotated[Precision, typer.Option(help="Weights dtype: auto = bf16/fp16 on GPU, fp32 on CPU.", rich_help_panel="Captioner")] = Precision.auto,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=512, help="Longest caption, in tokens.", rich_help_panel="Generation")] = 30,
    num_beams: Annotated[int, typer.Option(min=1, max=16, help="Beam search width (1 = greedy).", rich_help_panel="Generation")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per generate() call.", rich_help_panel="Generation")] = 16,
    num_workers: Annotated[int | None, typer.Option(min=0, help="DataLoader workers decoding images (default: cores−1, at most 4; 0 on ≤ 2 cores; common/runtime/threads.py).", rich_help_panel="Generation")] = None,
    shard: ShardOpt = None,
):
    """Caption a dataset with BLIP-2 (paper §3.2) or with its class names; resumable, shardable."""
    with user_errors(console):
        options = {k: v.value if isinstance(v, Enum) else v for k, v in locals().items()}
        options["shard_spec"] = options.pop("shard")
        s = caption(**options)
    rate = s["captioned"] / s["seconds"] if s["seconds"] > 0 else 0.0
    console.print(f"captioned {s['captioned']}, skipped {s['skipped']} (already done), failed {s['failed']}"
                  f"  [{s['seconds']:.1f} s, {rate:.1f} img/s] -> {s['out']}")
    if s["failed"]:
        console.print(f"[red]{s['failed']} image(s) failed[/]: see {s['errors']}")
        raise typer.Exit(1)


if __name__ == "__main__":
    cli.run(main, console)
