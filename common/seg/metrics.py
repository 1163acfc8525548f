"""Segmentation metrics as the paper reports them (§4.1): mIoU for semantic, PQ / SQ / RQ for panoptic.

Both are accumulated image by image and computed once at the end, over the whole dataset, the way
detectron2's evaluators (which the paper's Mask2Former numbers come from) do it:

- `SemanticMetrics`: one confusion matrix over all pixels (rows = ground truth, columns = prediction);
  per-class IoU = TP / (TP + FP + FN); mIoU = mean over the classes that occur in the ground truth
  (detectron2's SemSegEvaluator; on the full ADE20K val every class occurs, so mmseg's and
  torchmetrics' "any class seen" convention gives the same number there). Pixel accuracy = trace / sum.
- `PanopticQuality`: panopticapi's `pq_compute` (Kirillov et al. 2019) — segments matched at IoU > 0.5
  within a category, void pixels of the ground truth left out of the union, crowd regions absorbing
  unmatched predictions of their category, PQ averaged over categories that occur, things and stuff
  apart.

Why our own code where torchmetrics has both: the confusion matrix is one `bincount` on the device that
also gives per-class IoU and accuracy for the report, and torchmetrics' `PanopticQuality` knows no crowd
regions and treats pixels predicted void differently from panopticapi (it shrinks the union by them and
forgives ground-truth segments that are mostly predicted void), so its PQ is not COCO's. tests/test_metrics.py
checks that the two agree wherever their definitions do.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch


# ---------------------------------------------------------------- semantic: mIoU

def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """(C, C) int64 counts, rows = target class, columns = predicted class; target pixels equal to
    ignore_index are left out. pred and target: integer tensors (or arrays) of the same shape."""
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"target values must be 0..{num_classes - 1} or {ignore_index} (got {int(t.min())}..{int(t.max())})")
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_classes):
        raise ValueError(f"predicted values must be 0..{num_classes - 1} (got {int(p.min())}..{int(p.max())})")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def semantic_scores(confmat: torch.Tensor | np.ndarray, class_names: list[str] | None = None) -> dict:
    """mIoU, pixel accuracy, mean class accuracy and per-class IoU (None for classes absent from the
    ground truth) from a confusion matrix; fractions in [0, 1]."""
    cm = torch.as_tensor(confmat, dtype=torch.float64).cpu()
    tp = cm.diag()
    gt = cm.sum(1)  # pixels of each class in the ground truth
    union = gt + cm.sum(0) - tp
    valid = gt > 0
    iou = torch.where(valid, tp / union.clamp(min=1), torch.nan)
    acc = torch.where(valid, tp / gt.clamp(min=1), torch.nan)
    names = class_names or [str(i) for i in range(len(cm))]
    total = cm.sum()
    return {
        "mIoU": float(iou[valid].mean()) if valid.any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "mean_accuracy": float(acc[valid].mean()) if valid.any() else float("nan"),
        "classes_in_ground_truth": int(valid.sum()),
        "pixels": int(total),  # labelled pixels evaluated
        "per_class_iou": {n: (float(v) if ok else None) for n, v, ok in zip(names, iou.tolist(), valid.tolist())},
    }


class SemanticMetrics:
    """Accumulates a confusion matrix over images (on pred's device); `compute()` gives semantic_scores."""

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: list[str] | None = None):
        self.num_classes, self.ignore_index, self.class_names = num_classes, ignore_index, class_names
        self.confmat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        cm = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.confmat = self.confmat.to(cm.device) + cm

    def compute(self) -> dict:
        return semantic_scores(self.confmat, self.class_names)


# ---------------------------------------------------------------- panoptic: PQ / SQ / RQ

_OFFSET = 1 << 32  # pair key = gt_id * _OFFSET + pred_id; segment ids are < 2**24 (RGB)


class PanopticQuality:
    """panopticapi's PQ, accumulated image by image.

    update() takes, per image, segment id maps (H, W) (0 = void) with their segments_info lists
    ([{"id", "category_id", "iscrowd"?}], COCO's format) for ground truth and prediction.
    `categories`: {category_id: isthing}.
    """

    def __init__(self, categories: dict[int, bool]):
        self.categories = dict(categories)
        self.iou = defaultdict(float)
        self.tp, self.fp, self.fn = defaultdict(int), defaultdict(int), defaultdict(int)

    def update(self, gt_ids: np.ndarray, gt_segments: list[dict], pred_ids: np.ndarray, pred_segments: list[dict]) -> None:
        gt_ids, pred_ids = np.asarray(gt_ids, np.int64), np.asarray(pred_ids, np.int64)
        if gt_ids.shape != pred_ids.shape:
            raise ValueError(f"prediction {pred_ids.shape} and ground truth {gt_ids.shape} differ in shape")
        for segs, who in ((gt_segments, "ground truth"), (pred_segments, "prediction")):
            unknown = {s["category_id"] for s in segs} - set(self.categories)
            if unknown:
                raise ValueError(f"{who} segments have unknown category ids {sorted(unknown)}")
        ids, counts = np.unique(gt_ids, return_counts=True)
        gt_area = dict(zip(ids.tolist(), counts.tolist()))
        ids, counts = np.unique(pred_ids, return_counts=True)
        pred_area = dict(zip(ids.tolist(), counts.tolist()))
        # Segments listed but without a pixel take no part (panopticapi refuses them; we are lenient).
        gt = {s["id"]: s for s in gt_segments if s["id"] != 0 and gt_area.get(s["id"], 0) > 0}
        pred = {s["id"]: s for s in pred_segments if s["id"] != 0 and pred_area.get(s["id"], 0) > 0}
        pairs, counts = np.unique(gt_ids * _OFFSET + pred_ids, return_counts=True)
        inter = {(int(k // _OFFSET), int(k % _OFFSET)): int(c) for k, c in zip(pairs, counts)}

        gt_matched, pred_matched = set(), set()
        for (g, p), n in inter.items():
            if g not in gt or p not in pred or gt[g].get("iscrowd", 0) == 1:
                continue
            if gt[g]["category_id"] != pred[p]["category_id"]:
                continue
            # Pixels of the prediction that fall on ground-truth void are not counted against it.
            union = pred_area[p] + gt_area[g] - n - inter.get((0, p), 0)
            iou = n / union
            if iou > 0.5:  # at most one match per segment (segments do not overlap)
                cat = gt[g]["category_id"]
                self.tp[cat] += 1
                self.iou[cat] += iou
                gt_matched.add(g)
                pred_matched.add(p)
        crowd = {}  # category -> its crowd segment id in this image
        for g, s in gt.items():
            if g in gt_matched:
                continue
            if s.get("iscrowd", 0) == 1:
                crowd[s["category_id"]] = g
                continue
            self.fn[s["category_id"]] += 1
        for p, s in pred.items():
            if p in pred_matched:
                continue
            # An unmatched prediction lying mostly on void or on a crowd region of its category is forgiven.
            covered = inter.get((0, p), 0)
            if s["category_id"] in crowd:
                covered += inter.get((crowd[s["category_id"]], p), 0)
            if covered / pred_area[p] > 0.5:
                continue
            self.fp[s["category_id"]] += 1

    def merge(self, other: PanopticQuality) -> None:
        """Add another accumulator's counts (e.g. another process's images) to this one."""
        for mine, theirs in ((self.iou, other.iou), (self.tp, other.tp), (self.fp, other.fp), (self.fn, other.fn)):
            for cat, v in theirs.items():
                mine[cat] += v

    def compute(self) -> dict:
        """PQ, SQ, RQ (fractions) over all / thing / stuff categories that occur, and per category."""
        per_class = {}
        for cat in self.categories:
            tp, fp, fn = self.tp[cat], self.fp[cat], self.fn[cat]
            if tp + fp + fn == 0:
                continue
            sq = self.iou[cat] / tp if tp else 0.0
            rq = tp / (tp + 0.5 * fp + 0.5 * fn)
            per_class[cat] = {"PQ": sq * rq, "SQ": sq, "RQ": rq, "TP": tp, "FP": fp, "FN": fn}
        out = {}
        for name, keep in (("", lambda c: True), ("_th", lambda c: self.categories[c]), ("_st", lambda c: not self.categories[c])):
            rows = [v for c, v in per_class.items() if keep(c)]
            for key in ("PQ", "SQ", "RQ"):
                out[key + name] = float(np.mean([r[key] for r in rows])) if rows else float("nan")
            out["n" + name] = len(rows)
        out["per_class"] = per_class
        return out


# ---------------------------------------------------------------- instance: mask AP (pycocotools)

class MaskAP:
    """COCO mask AP through pycocotools' COCOeval (iouType "segm"), the instance metric of §4.1.

    Ground truth comes from panoptic "thing" segments (crowd ones kept as iscrowd regions), as the
    data contract of docs/design.md says; predictions are binary masks with a score and a category per image."""

    def __init__(self, categories: dict[int, bool]):
        self.things = sorted(c for c, isthing in categories.items() if isthing)
        self.images, self.gt, self.dt = [], [], []

    def add_ground_truth(self, image_id: int, segment_ids: np.ndarray, segments: list[dict]) -> None:
        from pycocotools import mask as mask_util

        h, w = segment_ids.shape
        self.images.append({"id": image_id, "height": h, "width": w})
        for s in segments:
            if s["category_id"] not in self.things:
                continue
            m = np.asfortranarray((segment_ids == s["id"]).astype(np.uint8))
            if not m.any():
                continue
            rle = mask_util.encode(m)
            self.gt.append({"id": len(self.gt) + 1, "image_id": image_id, "category_id": s["category_id"],
                            "segmentation": rle, "area": float(mask_util.area(rle)), "bbox": mask_util.toBbox(rle).tolist(),
                            "iscrowd": int(s.get("iscrowd", 0))})

    def add_predictions(self, image_id: int, masks: np.ndarray, scores, category_ids) -> None:
        """masks: (N, H, W) bool; scores, category_ids: (N,)."""
        from pycocotools import mask as mask_util

        for m, score, cat in zip(masks, scores, category_ids):
            rle = mask_util.encode(np.asfortranarray(np.asarray(m, np.uint8)))
            self.dt.append({"image_id": image_id, "category_id": int(cat), "segmentation": rle, "score": float(score)})

    def merge(self, other: MaskAP) -> None:
        """Add another accumulator's images (e.g. another process's; image ids must differ) to this one;
        its ground-truth annotations are renumbered after ours (COCO needs unique ids)."""
        self.images += other.images
        self.dt += other.dt
        self.gt += [dict(g, id=len(self.gt) + i + 1) for i, g in enumerate(other.gt)]

    def compute(self) -> dict:
        """AP, AP50, AP75, APs, APm, APl as fractions (-1 where undefined, as pycocotools)."""
        import contextlib
        import io

        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
        if not self.dt:
            return dict.fromkeys(keys, 0.0)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            gt = COCO()
            gt.dataset = {"images": self.images, "annotations": [dict(g) for g in self.gt], "categories": [{"id": c} for c in self.things]}
            gt.createIndex()
            dt = gt.loadRes([dict(d) for d in self.dt])  # loadRes adds fields to the dicts it gets
            ev = COCOeval(gt, dt, iouType="segm")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return dict(zip(keys, (float(v) for v in ev.stats[:6])))
