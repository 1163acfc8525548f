"""Judge and clean a synthetic folder with a segmenter trained on real data (issue 13).

    python quality.py --data ade20k --synthetic synth/imgsyn-ade20k --segmenter runs/seg-ade20k-real/model
    python quality.py ... --filter --tolerance 1.25        # + FOLDER/annotations_filtered/ (FreeMask)
    accelerate launch quality.py ...                       # sharded over GPUs

1. The class-wise mean losses of the segmenter on the real --split (FreeMask measures them on real
   images; --reference folder takes the synthetic folder's own) -> FOLDER/quality_reference.json, with the
   real class histogram.
2. Per synthetic sample: the segmenter's prediction on the image against the synthetic label ->
   FOLDER/quality.jsonl: id, alignment mIoU (classes in label ∪ prediction), pixel accuracy, per-class
   mean cross-entropy and pixels ("loss"), per-class intersection / union ("iou"), MaskSyn's off_palette.
3. --filter: a copy of each annotation without its noisy pixels (loss > --tolerance × class mean) in
   FOLDER/annotations_filtered/; the originals are never touched.
4. FOLDER/quality_summary.json (mean / median alignment, per-class alignment, class histogram against the
   real split, the worst samples) and FOLDER/quality_worst.png (synthetic label, image, prediction).

Resumable: ids already in quality.jsonl and filtered annotations already written are skipped. As N
independent tasks (`--shard I/N`, a Slurm array, torchrun; no process group) task I takes every N-th sample
and writes quality.rank{I}.jsonl; then the same command once as one task writes what needs the whole
folder (the filtered annotations that waited for the reference means, the summary, the contact sheet). The functions
are in common/seg/quality.py; train_seg reads the results through `filtered_samples` / `sampling_probabilities`.
"""

from __future__ import annotations

import json
import re
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from rich.console import Console

from common import SegGenError
from common.runtime import cli
from common.synthesis import synth
from common.seg import labels, quality as q
from common.runtime.cli import Data, Split, user_errors
from common.masks.colormap import label_to_color, palette_for
from common.data.datasets import Sample, load_image, read_dataset, read_synthetic
from common.seg.data import check_made_for
from common.runtime.cluster import on_sigterm, stop_if_sigterm
from common.runtime.lock import task_lock
from common.data.manifest import ManifestWriter, atomic_save, first_record, rank_path, read_ids, read_manifest
from common.runtime.shard import shard, this_task
from common.seg.inference import Segmenter, load_segmenter
from common.synthesis.finalize import ensure_finalized
from common.synthesis.options import ShardOpt

# ---------------------------------------------------------------- defaults and their source
SIZE = 512  # short side the segmenter sees: train_seg's ADE20K crop / eval size (A.3)
WORST = 8  # samples on the contact sheet
console = Console(stderr=True, soft_wrap=True)


class Reference(str, Enum):
    real = "real"  # FreeMask filter.py: class means on the real training images
    folder = "folder"  # the reading: class means over the synthetic folder itself


# ---------------------------------------------------------------- the segmenter

def segmenter_run(segmenter: Path) -> dict:
    """The options of the segmenter's train_seg run (RUN/options.json beside RUN/model); {} when there is none."""
    opts = Path(segmenter).parent / "options.json"
    try:
        recorded = json.loads(opts.read_text()) if opts.is_file() else {}
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def eval_size(segmenter: Path, data: str, run: dict | None = None) -> int:
    """The short side the segmenter was evaluated at: its train_seg run's --eval-size, else train_seg's size
    for the dataset (toy 64; ADE20K/COCO 512)."""
    size = (segmenter_run(segmenter) if run is None else run).get("eval_size")
    return int(size) if size else (64 if data == "toy" else SIZE)


def predict(seg: Segmenter, image: np.ndarray, size: int) -> tuple[torch.Tensor, str]:
    """(H, W, 3) uint8 -> ((C, H, W) class scores at the image's size, their kind for the figures): train_seg's
    evaluation (common.seg.inference.Segmenter.scores), short side `size`."""
    return seg.scores(image, size), "scores"


def figures_of(seg: Segmenter, sample: Sample, data: str, size: int) -> tuple[dict, torch.Tensor, np.ndarray, np.ndarray]:
    """(figures, loss (H, W), label train ids (H, W), prediction train ids (H, W)) of one sample."""
    label = labels.load_train_label(sample, data)
    scores, kind = predict(seg, np.asarray(load_image(sample.image)), size)
    figures, loss = q.sample_figures(scores, label, kind=kind)
    return figures, loss, label, scores.argmax(0).cpu().numpy()


# ---------------------------------------------------------------- steps 1-4

def reference(real: list[Sample], seg: Segmenter, a: dict, state, progress) -> dict | None:
    """Step 1: class means of the segmenter on the real split and its class histogram (cached in
    FOLDER/quality_reference.json). Sharded, task I of N measures its share of the real split into
    quality_reference.part{I}-of-{N}.json and the means are their sum once every part exists (None until
    then: the task judges, and filtering waits for a later pass). No task waits for another."""
    folder, key = a["folder"], {k: a[k] for k in ("segmenter", "data", "split", "size")}
    path = folder / q.REFERENCE_FILE
    cached = _read_json(path)
    if cached is not None and cached.get("settings") == key:
        return cached
    merged = _merged_parts(folder, key)
    if merged is None:
        part = folder / f"{Path(q.REFERENCE_FILE).stem}.part{state.process_index}-of-{state.num_processes}.json"
        if (_read_json(part) or {}).get("settings") != key:
            mine = shard(real, state)
            task = progress.add_task("real split", total=len(mine), rate=0.0)
            records, start = [], time.perf_counter()
            for s in mine:
                stop_if_sigterm("quality.py")  # this part is saved whole or not at all: nothing to finish
                records.append({"loss": figures_of(seg, s, a["data"], a["size"])[0]["loss"]})
                progress.update(task, advance=1, rate=len(records) / (time.perf_counter() - start))
            c = len(a["names"])
            hist = q.class_histogram(records, c)
            total = np.nan_to_num(q.class_means(records, c)) * hist
            atomic_save(part, lambda p: p.write_text(json.dumps({"settings": key, "total": total.tolist(), "count": hist.tolist()})))
        merged = _merged_parts(folder, key)
    if merged is None:
        return None
    total, count = merged
    means = [float(t / n) if n > 0 else None for t, n in zip(total, count)]
    ref = {"settings": key, "class_means": means, "class_pixels": count.astype(int).tolist()}
    if state.num_processes == 1:  # one process writes the folder's files (the sharded tasks merge in memory)
        atomic_save(path, lambda p: p.write_text(json.dumps(ref)))
    return ref


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _merged_parts(folder: Path, key: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(per-class loss total, pixel count) summed over a complete set of reference parts (every I of one N)
    made with `key`, else None."""
    sets: dict[int, dict[int, dict]] = {}
    for p in folder.glob(f"{Path(q.REFERENCE_FILE).stem}.part*-of-*.json"):
        m = re.fullmatch(r".*\.part(\d+)-of-(\d+)\.json", p.name)
        part = _read_json(p) if m else None
        if part is not None and part.get("settings") == key:
            sets.setdefault(int(m.group(2)), {})[int(m.group(1))] = part
    for n, parts in sorted(sets.items()):
        if len(parts) == n:
            return (np.sum([np.array(x["total"], float) for x in parts.values()], axis=0),
                    np.sum([np.array(x["count"], float) for x in parts.values()], axis=0))
    return None


def check_filter_settings(folder: Path, settings: dict, state) -> None:
    path = folder / q.FILTERED_DIR / "filter.json"
    if path.is_file() and json.loads(path.read_text()) != settings:
        old = json.loads(path.read_text())
        raise SegGenError(f"--tolerance / --reference / --segmenter: {path.parent} was made with {old}, not {settings}; "
                          f"pass those, or delete {path.parent} to filter again")
    if state.is_main_process and not path.is_file():
        atomic_save(path, lambda p: p.write_text(json.dumps(settings)))


def check_resume(out: Path, settings: dict) -> None:
    """Figures already in `out` continue only when made by the same segmenter (its identity, whatever its
    path) at the same --size; a segmenter retrained in place is named as such (issue 28 item 6)."""
    first = first_record(out)
    old = (first or {}).get("settings") or {}
    if first is None or all(old.get(k) == settings[k] for k in ("identity", "size")):
        return
    if old.get("size") != settings["size"]:
        raise SegGenError(f"--size {settings['size']}: {out} holds figures at --size {old.get('size')}; pass that to resume, "
                          f"or delete {out} to judge again")
    changed = ("has changed since (retrained or replaced: its files differ)" if old.get("segmenter") == settings["segmenter"]
               else f"is not the segmenter that judged them ({old.get('segmenter')})")
    raise SegGenError(f"--segmenter {settings['segmenter']} {changed}; {out} holds figures of segmenter {old.get('identity') or '(not recorded: an older quality.py)'}, "
                      f"not {settings['identity']}: delete {out} (and {q.REFERENCE_FILE}, {q.FILTERED_DIR}/) to judge again with "
                      f"this one, or pass the segmenter that judged them")


def run(data: str, synthetic: Path, segmenter: Path, data_root: Path | None = None, split: str = "train", size: int = SIZE,
        reference_on: str = "real", filter: bool = False, tolerance: float = q.TOLERANCE, worst: int = WORST,
        shard_spec: str | None = None) -> dict:
    """quality.py's job; returns {"written", "skipped", "filtered", "seconds", "summary", ...}.

    As N independent tasks (shard_spec "I/N" or the scheduler's environment), task I judges every N-th
    sample into quality.rank{I}.jsonl and waits for nobody; what needs the whole folder (the reference
    means for --filter, quality_summary.json, quality_worst.png) is done by a one-task run of the same
    command after them, which finds every sample judged and does only that (docs/many-machines.md)."""
    state = this_task(shard_spec)  # bad --shard fails here
    folder = Path(synthetic)
    samples = read_synthetic(folder)  # a bad --synthetic fails here, before any lock or model
    check_made_for(folder, samples, data)  # drawn for another --data: its label values are other classes
    # one run per folder; its tasks side by side (common/runtime/lock.py task_lock)
    with task_lock(folder, state.process_index, state.num_processes, "quality", "--synthetic"), on_sigterm():
        real = read_dataset(data, data_root, split)
        names = labels.class_names(data)
        seg = load_segmenter(segmenter, len(names), state.device, data=data)
        ensure_finalized(folder, console.print)  # a sharded run's folder: its index etc., written once (common/synthesis/finalize.py)
        identity = q.segmenter_identity(segmenter)  # its files' bytes, not its path: a retrained segmenter judges again
        a = {"folder": folder, "segmenter": identity, "data": data, "split": split, "size": size, "names": names}
        out = folder / q.QUALITY_FILE
        settings = {"segmenter": str(segmenter), "identity": identity, "size": size}
        check_resume(out, settings)
        mine = shard(samples, state)
        done = read_ids(out, {s.id for s in mine})  # this share's ids only, whichever task wrote them
        todo = [s for s in mine if s.id not in done]
        console.print(f"[bold]quality.py[/] {folder}: {len(samples)} sample(s); {state.name}: {len(mine)}, {len(done)} already "
                      f"judged; segmenter {segmenter} ({seg.kind}) at short side {size}; reference: {reference_on} ({data}/{split}, "
                      f"{len(real)} image(s)){f'; filter, tolerance {tolerance}' if filter else ''}")
        summary = {"written": 0, "skipped": len(mine) - len(todo), "filtered": 0, "out": str(out)}
        start = time.perf_counter()
        with synth.progress("quality", state) as progress:
            ref = reference(real, seg, a, state, progress) if reference_on == "real" else None
            means = np.array([np.nan if m is None else m for m in ref["class_means"]]) if ref else None
            if filter:
                check_filter_settings(folder, {"tolerance": tolerance, "reference": reference_on, "identity": identity, "size": size}, state)

            def write_filtered(s, loss, label):
                q.write_filtered(s, q.noisy_pixels(loss, label, means, tolerance), q.filtered_path(folder, s))
                summary["filtered"] += 1

            # step 2 (+ step 3 when the class means are known already)
            task = progress.add_task("judging", total=len(todo), rate=0.0)
            with ManifestWriter(rank_path(out, state.process_index, state.num_processes)) as writer:
                for s in todo:
                    stop_if_sigterm("quality.py")  # every figure written so far is a whole line
                    figures, loss, label, _ = figures_of(seg, s, data, size)
                    if filter and means is not None:
                        write_filtered(s, loss, label)
                    off = {"off_palette": s.meta["off_palette"]} if "off_palette" in s.meta else {}
                    writer.append({"id": s.id, **figures, **off, "settings": settings})
                    summary["written"] += 1
                    progress.update(task, advance=1, rate=summary["written"] / (time.perf_counter() - start))
            # What needs the whole folder: once every sample is judged (and, for --reference real, every part of
            # the reference measured). A task of several checks and, when it is not yet so, leaves it to the
            # one-task pass after them.
            complete = (ref is not None or reference_on != "real") and len(read_ids(out, {s.id for s in samples})) == len(samples)
            records = read_manifest(out) if complete else []
            # step 3: the samples still without a filtered annotation (--reference folder, or judged before)
            if filter and complete:
                means = means if means is not None else q.class_means(records, len(names))
                left = [s for s in mine if not q.filtered_path(folder, s).is_file()]
                task = progress.add_task("filtering", total=len(left), rate=0.0)
                for s in left:
                    stop_if_sigterm("quality.py")
                    _, loss, label, _ = figures_of(seg, s, data, size)
                    write_filtered(s, loss, label)
                    progress.update(task, advance=1, rate=summary["filtered"] / (time.perf_counter() - start))
        summary["seconds"] = time.perf_counter() - start
        # step 4: the summary and the contact sheet of the worst samples (a one-task run: one writer)
        if complete and state.num_processes == 1:
            hist = np.array(ref["class_pixels"]) if ref else sum(  # --reference folder: the real labels, no model
                np.bincount(labels.load_train_label(s, data).ravel(), minlength=256)[:len(names)] for s in real)
            summ = {"segmenter": str(segmenter), "reference": reference_on, **q.summarize(records, names, hist, worst)}
            atomic_save(folder / "quality_summary.json", lambda p: p.write_text(json.dumps(summ, indent=1)))
            summary.update(summary=summ, summary_path=str(folder / "quality_summary.json"))
            if summ["worst"]:
                summary["sheet"] = str(worst_sheet(seg, {s.id: s for s in samples}, summ["worst"], data, size, folder / "quality_worst.png"))
        else:
            summary["pending"] = (f"{state.name} has ended; once every task has, run the same command once without --shard "
                                  f"(one task): it judges nothing again{', filters what is left' if filter else ''} and writes "
                                  f"quality_summary.json")
        return summary


def worst_sheet(seg: Segmenter, by_id: dict, worst: list[dict], data: str, size: int, path: Path) -> Path:
    """Contact sheet: per sample its synthetic label, image and prediction, in the people's palette."""
    palette = palette_for(data, "usual")
    values = np.nonzero(labels.train_ids(data) != 255)[0]  # train id -> label value
    rows = []
    for w in worst:
        s = by_id[w["id"]]
        _, _, label, pred = figures_of(seg, s, data, size)
        rows.append({"id": s.id, "caption": f"mIoU {w['miou']:.3f}: {s.meta.get('caption', '')}",
                     "colormap": label_to_color(np.where(label == 255, 0, values[np.minimum(label, len(values) - 1)]).astype(np.uint8), palette),
                     "image": np.asarray(load_image(s.image)), "overlay": label_to_color(values[pred].astype(np.uint8), palette)})
    return synth.contact_sheet(rows, path)


# ---------------------------------------------------------------- command line

def main(
    synthetic: Annotated[Path, typer.Option(help="Synthetic folder (masksyn.py / imgsyn.py output) to judge.", rich_help_panel="Data")],
    segmenter: Annotated[Path, typer.Option(help="Segmenter trained on real data: a train_seg run's model folder (Mask2Former or HRNet).", rich_help_panel="Model")],
    data: Annotated[Data, typer.Option(help="Dataset of the folder's labels.", rich_help_panel="Data")] = Data.ade20k,
    data_root: Annotated[Path | None, typer.Option(help="Dataset root (default: the segmenter's train_seg run's --data-root when it recorded one, else $SEGGEN_DATASETS, else ./datasets).", rich_help_panel="Data")] = None,
    split: Annotated[Split, typer.Option(help="Real split of the reference class losses and histogram.", rich_help_panel="Data")] = Split.train,
    size: Annotated[int | None, typer.Option(min=16, max=4096, show_default="the segmenter run's eval size", help="Short side the segmenter sees (default: the --eval-size recorded in the segmenter run's options.json, else 512; 64 for --data toy).", rich_help_panel="Model")] = None,
    reference: Annotated[Reference, typer.Option(help="Class-wise mean losses from the real split (FreeMask) or from the folder itself.", rich_help_panel="Filtering")] = Reference.real,
    filter: Annotated[bool, typer.Option("--filter", help="Write FOLDER/annotations_filtered/: noisy pixels set to ignore (FreeMask).", rich_help_panel="Filtering")] = False,
    tolerance: Annotated[float, typer.Option(min=0.0, help="Ignore pixels whose loss exceeds this × their class's mean loss (FreeMask: 1.25).", rich_help_panel="Filtering")] = q.TOLERANCE,
    worst: Annotated[int, typer.Option(min=0, max=64, help="Samples on the contact sheet FOLDER/quality_worst.png.", rich_help_panel="Output")] = WORST,
    shard: ShardOpt = None,
):
    """Judge a synthetic folder with a real-data segmenter (alignment, loss); optionally filter noisy regions."""
    with user_errors(console):  # a bad input: one line, exit 2; SIGTERM: exit PREEMPTED (common/runtime/cli.py)
        trained = segmenter_run(segmenter)  # read once: the eval size and data root it recorded
        size = size or eval_size(segmenter, data.value, trained)
        if data_root is None and trained.get("data") == data.value and trained.get("data_root"):
            data_root = Path(trained["data_root"])  # the real data the segmenter was trained on
            console.print(f"--data-root {data_root} (the segmenter's train_seg run)")
        s = run(data.value, synthetic, segmenter, data_root, split.value, size, reference.value, filter, tolerance, worst, shard)
    if s.get("pending"):
        console.print(f"judged {s['written']}, skipped {s['skipped']} (already done), filtered {s['filtered']} "
                      f"[{s['seconds']:.1f} s] -> {s['out']}; {s['pending']}")
    if "summary" in s:
        al = s["summary"]["alignment"]
        console.print(f"judged {s['written']}, skipped {s['skipped']} (already done), filtered {s['filtered']} "
                      f"[{s['seconds']:.1f} s] -> {s['out']}; alignment mIoU mean {al['mean']}, median {al['median']}; "
                      f"summary {s['summary_path']}" + (f", worst samples {s['sheet']}" if s.get("sheet") else ""))


if __name__ == "__main__":
    cli.run(main, console)
