"""The evaluation of each task (paper §4.1): semantic -> mIoU, per-class IoU, pixel accuracy (optionally flip +
multi-scale, Table 1's m.s.); panoptic -> PQ / SQ / RQ, things and stuff; instance (top-100 query-class pairs) ->
mask AP through pycocotools; gathered over processes, printed, written to metrics.json (metrics:
common/seg/metrics.py, inference: common/seg/inference.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from common import SegGenError
from common.masks.colormap import IGNORE, coco_categories
from common.data.datasets import Sample, load_image, load_panoptic
from common.seg.metrics import MaskAP, PanopticQuality, SemanticMetrics
from common.runtime.record import write_json
from common.runtime.progress import console, progress_bar
from common.seg.data import class_names, load_train_label, thing_train_ids
from common.seg.inference import instance_inference, panoptic_inference, predict, semantic_inference, semantic_scores


class SemanticEval:
    """mIoU, per-class IoU and pixel accuracy of the per-pixel argmax of the class scores (Table 1)."""

    def __init__(self, data: str):
        names = class_names(data)
        self.data, self.metrics = data, SemanticMetrics(len(names), IGNORE, names)

    def update(self, image_id: int, sample: Sample, scores, classes, masks) -> None:
        truth = torch.from_numpy(load_train_label(sample, self.data)).to(scores.device)
        self.metrics.update(scores.argmax(0), truth)

    def result(self, accelerator) -> dict:
        self.metrics.confmat = accelerator.reduce(self.metrics.confmat.to(accelerator.device), reduction="sum").cpu()
        return self.metrics.compute()


class PanopticEval:
    """PQ / SQ / RQ, things and stuff, per class (Table 2), through Mask2Former's panoptic inference."""

    def __init__(self, data: str):
        self.cats = sorted(coco_categories(), key=lambda c: c["id"])
        self.things, self.pq = thing_train_ids(data), PanopticQuality(categories(self.cats))

    def update(self, image_id: int, sample: Sample, scores, classes, masks) -> None:
        seg, segs = panoptic_inference(classes, masks, self.things)
        self.pq.update(load_panoptic(sample), sample.segments, seg.cpu().numpy(),
                       [{"id": x["id"], "category_id": self.cats[x["category"]]["id"]} for x in segs])

    def result(self, accelerator) -> dict:
        got = gathered(self.pq, PanopticQuality(categories(self.cats)), accelerator).compute()
        name_of = {c["id"]: c["name"] for c in self.cats}
        got["per_class"] = {name_of[k]: v for k, v in got["per_class"].items()}
        return {"panoptic": got}


class InstanceEval:
    """Mask AP (Table 3; for a panoptic model AP^Th_pan) through Mask2Former's instance inference.

    things_only: a panoptic model (133 classes, its thing predictions kept); else the instance head's 80
    thing classes. Ground truth: `instances` (COCO's instances_{split}2017.json, through pycocotools) when
    given, else the panoptic thing segments."""

    def __init__(self, data: str, things_only: bool, instances: Path | None = None):
        self.cats = sorted((c for c in coco_categories() if things_only or c["isthing"]), key=lambda c: c["id"])
        self.things = thing_train_ids(data) if things_only else None
        self.ap = MaskAP(categories(self.cats))
        self.coco = None
        if instances is not None:
            import contextlib
            import io

            from pycocotools.coco import COCO

            with contextlib.redirect_stdout(io.StringIO()):
                self.coco = COCO(str(instances))
            self.by_file = {im["file_name"]: im["id"] for im in self.coco.dataset["images"]}

    def ground_truth(self, image_id: int, sample: Sample) -> None:
        if self.coco is None:
            return self.ap.add_ground_truth(image_id, load_panoptic(sample), sample.segments)
        from pycocotools import mask as mask_util

        coco_id = self.by_file.get(sample.image.name)
        if coco_id is None:
            raise SegGenError(f"{sample.image.name} is not in the instances annotation file (COCO's instances_*2017.json)")
        info = self.coco.imgs[coco_id]
        self.ap.images.append({"id": image_id, "height": info["height"], "width": info["width"]})
        for ann in self.coco.imgToAnns[coco_id]:  # polygons and RLEs as COCO's own evaluation reads them
            rle = self.coco.annToRLE(ann)
            self.ap.gt.append({"id": len(self.ap.gt) + 1, "image_id": image_id, "category_id": ann["category_id"], "segmentation": rle,
                               "area": float(mask_util.area(rle)), "bbox": mask_util.toBbox(rle).tolist(), "iscrowd": int(ann.get("iscrowd", 0))})

    def update(self, image_id: int, sample: Sample, scores, classes, masks) -> None:
        self.ground_truth(image_id, sample)
        binary, inst_scores, labels = instance_inference(classes, masks, self.things)
        self.ap.add_predictions(image_id, binary.cpu().numpy(), inst_scores.tolist(), [self.cats[c]["id"] for c in labels.tolist()])

    def result(self, accelerator) -> dict:
        return {"instance": gathered(self.ap, MaskAP(categories(self.cats)), accelerator).compute()}


def categories(cats: list[dict]) -> dict[int, bool]:
    """COCO category id -> isthing."""
    return {c["id"]: bool(c["isthing"]) for c in cats}


def evaluators(task: str, data: str, instances: Path | None = None) -> list:
    """What `task` measures: semantic mIoU; panoptic PQ (+ AP of the things and mIoU, the paper's Table 2); instance
    mask AP (against `instances`, COCO's instances json, when given)."""
    return {"semantic": lambda: [SemanticEval(data)],
            "panoptic": lambda: [SemanticEval(data), PanopticEval(data), InstanceEval(data, things_only=True)],
            "instance": lambda: [InstanceEval(data, things_only=False, instances=instances)]}[task]()


def instances_file(data_root: Path, split: str = "val") -> Path | None:
    """COCO's annotations/instances_{split}2017.json under the data root, if it is there (Table 3's AP is measured on it)."""
    from common.data.datasets import coco_root

    path = coco_root(Path(data_root), split) / "annotations" / f"instances_{split}2017.json"
    return path if path.is_file() else None


def evaluate(model, samples: list[Sample], data: str, size: int, mean, std, accelerator, multiscale: bool,
             progress=None, task: str = "semantic", instances: Path | None = None) -> dict:
    """The metrics of `task` over `samples` at their original resolution (each process takes every
    world_size-th, results combined)."""
    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    metrics = evaluators(task, data, instances)
    mean_t = torch.tensor(mean, device=accelerator.device).view(3, 1, 1) * 255
    std_t = torch.tensor(std, device=accelerator.device).view(3, 1, 1) * 255
    max_long = 4 * size if data == "ade20k" else round(size * 1333 / 800)  # detectron2's test sizes
    # (short side, long side at most, flip) per view. Multi-scale is Mask2Former's TEST.AUG: short sides
    # 0.5..1.75 x size, each as is and flipped, all with the one long-side limit 7 x size (3584 at 512).
    views = [(round(size * s), 7 * size, f) for s in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) for f in (False, True)] \
        if multiscale else [(size, max_long, False)]
    mine = list(enumerate(samples))[accelerator.process_index::accelerator.num_processes]
    bar = progress.add_task("evaluating" + (" (multi-scale + flip)" if multiscale else ""), total=len(mine)) if progress else None
    for image_id, sample in mine:
        image = torch.from_numpy(np.asarray(load_image(sample.image)).copy()).to(accelerator.device).permute(2, 0, 1).float()
        image = (image - mean_t) / std_t  # (3, H, W)
        classes = masks = None
        with accelerator.autocast():
            if task == "semantic":  # (C, H, W) summed over the views
                scores = sum(semantic_scores(net, image, short, f, long) for short, long, f in views)
            else:
                classes, masks = predict(net, image, size, max_long)
                scores = semantic_inference(classes, masks)
        for m in metrics:
            m.update(image_id, sample, scores, classes, masks)
        if progress:
            progress.advance(bar)
    if progress:
        progress.remove_task(bar)
    result = {}
    for m in metrics:
        result.update(m.result(accelerator))
    net.train(was_training)
    return result


def gathered(mine, total, accelerator):
    """This process's accumulator, or with several processes `total` with every process's merged into it."""
    from accelerate.utils import gather_object

    return merged(total, gather_object([mine])) if accelerator.num_processes > 1 else mine


def merged(total, parts: list):
    """`total` with every process's accumulator (gather_object's list) merged into it."""
    for part in parts:
        total.merge(part)
    return total


def evaluate_scales(model, val: list[Sample], a, eval_size: int, mean, std, accelerator) -> dict:
    """{"single_scale": metrics} and, with --multiscale, {"multi_scale": metrics (flip + 6 scales)}."""
    out = {}
    instances = instances_file(a.data_root) if a.task == "instance" else None
    if a.task == "instance":  # Table 3: against COCO's instance annotations when present
        out["ap_source"] = str(instances) if instances else "panoptic things (no annotations/instances_val2017.json)"
    with progress_bar(console, "it/s", enabled=accelerator.is_main_process, transient=True) as progress:
        out["single_scale"] = evaluate(model, val, a.data, eval_size, mean, std, accelerator, False, progress, a.task, instances)
        if a.multiscale:
            out["multi_scale"] = evaluate(model, val, a.data, eval_size, mean, std, accelerator, True, progress, a.task)
    return out


def print_metrics(title: str, scores: dict) -> None:
    """The paper's columns in %: mIoU (Table 1); PQ, PQ^Th, PQ^St, AP^Th_pan, mIoU_pan (Table 2); AP (Table 3)."""
    cols: dict[str, float | int] = {}
    if "panoptic" in scores:
        p = scores["panoptic"]
        cols.update({"PQ": p["PQ"], "SQ": p["SQ"], "RQ": p["RQ"], "PQ th": p["PQ_th"], "PQ st": p["PQ_st"]})
    if "instance" in scores:
        cols.update({"AP": scores["instance"]["AP"], "AP50": scores["instance"]["AP50"]})
    if "mIoU" in scores:
        cols.update({"mIoU": scores["mIoU"], "pixel acc.": scores["pixel_accuracy"], "mean acc.": scores["mean_accuracy"]})
    table = Table(title=title)
    for col in cols:
        table.add_column(col, justify="right")
    table.add_row(*(f"{100 * v:.2f}" for v in cols.values()))
    console.print(table)


def finish(result: dict, output_dir: Path, main_proc: bool, metrics_file: Path | None) -> dict:
    if main_proc:
        path = metrics_file or output_dir / "metrics.json"
        write_json(path, result, indent=1)  # atomic: a kill never leaves half a metrics.json
        print_metrics("single-scale", result["single_scale"])
        if "multi_scale" in result:
            print_metrics("multi-scale + flip", result["multi_scale"])
        console.print(f"[green]done[/]: metrics in {path}")
    return result


def eval_dir(checkpoint: Path) -> Path:
    """train_seg --eval-only's default folder: beside the evaluated model and named after it (RUN/eval-model),
    never a training run's own folder, whose metrics.json it would replace."""
    return Path(checkpoint).parent / f"eval-{Path(checkpoint).name}"


def check_eval_output(output_dir: Path, metrics_file: Path | None) -> None:
    """--eval-only refuses to write over a training run's metrics.json (an evaluation's names its checkpoint)."""
    target = Path(metrics_file) if metrics_file else Path(output_dir) / "metrics.json"
    try:
        old = json.loads(target.read_text()) if target.is_file() else None
    except (OSError, ValueError):
        return  # unreadable: nothing a user could lose by replacing it
    if isinstance(old, dict) and "checkpoint" not in old:
        raise SegGenError(f"{target} holds a training run's metrics, which --eval-only would replace: pass another "
                          f"--output-dir (the default is beside --checkpoint) or --metrics-file")
