"""common/seg/metrics.py against torchmetrics: mIoU on random label maps, PQ on the real COCO panoptic samples."""

import numpy as np
import pytest
import torch
from conftest import COCO_ROOT
from scipy.ndimage import distance_transform_edt
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex
from torchmetrics.detection import PanopticQuality as TMPanopticQuality

from common.masks.colormap import coco_categories
from common.data.datasets import load_panoptic, read_dataset
from common.seg.metrics import PanopticQuality, SemanticMetrics, confusion_matrix, semantic_scores

C = 12


def _noisy_maps(gen, n=3, shape=(37, 53), flip=0.3):
    """Random targets (every class present, some 255) and predictions that are right on ~70% of pixels."""
    for _ in range(n):
        target = torch.randint(0, C, shape, generator=gen)
        target.view(-1)[:C] = torch.arange(C)  # every class occurs in the ground truth
        target[torch.rand(shape, generator=gen) < 0.1] = 255
        pred = target.clone()
        wrong = torch.rand(shape, generator=gen) < flip
        pred[wrong] = torch.randint(0, C, (int(wrong.sum()),), generator=gen)
        pred[pred == 255] = torch.randint(0, C, (int((pred == 255).sum()),), generator=gen)
        yield pred, target


def test_miou_equals_torchmetrics_on_random_label_maps():
    gen = torch.Generator().manual_seed(0)
    ours = SemanticMetrics(C, ignore_index=255)
    tm_iou = MulticlassJaccardIndex(C, ignore_index=255, average="macro")
    tm_per_class = MulticlassJaccardIndex(C, ignore_index=255, average="none")
    tm_acc = MulticlassAccuracy(C, ignore_index=255, average="micro")
    for pred, target in _noisy_maps(gen):
        ours.update(pred, target)
        for m in (tm_iou, tm_per_class, tm_acc):
            m.update(pred.flatten(), target.flatten())
    got = ours.compute()
    assert 0.3 < got["mIoU"] < 0.9  # a real mix of right and wrong pixels, not a degenerate case
    assert got["mIoU"] == pytest.approx(float(tm_iou.compute()), abs=1e-6)
    assert list(got["per_class_iou"].values()) == pytest.approx(tm_per_class.compute().tolist(), abs=1e-6)
    assert got["pixel_accuracy"] == pytest.approx(float(tm_acc.compute()), abs=1e-6)


def test_miou_averages_over_ground_truth_classes_like_detectron2():
    # Class 2 is predicted but absent from the ground truth: detectron2's SemSegEvaluator (the paper's
    # numbers) leaves it out of the mean; its wrong pixels still lower class 1's IoU.
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = torch.tensor([[0, 0, 1, 2], [0, 0, 1, 2]])
    got = semantic_scores(confusion_matrix(pred, target, 3))
    assert got["per_class_iou"] == {"0": 1.0, "1": pytest.approx(2 / 3), "2": None}
    assert got["mIoU"] == pytest.approx((1 + 2 / 3) / 2)
    assert got["pixel_accuracy"] == pytest.approx(6 / 7)


def test_perfect_semantic_prediction_gives_one():
    gen = torch.Generator().manual_seed(1)
    ours = SemanticMetrics(C)
    for _, target in _noisy_maps(gen):
        ours.update(torch.where(target == 255, 0, target), target)
    got = ours.compute()
    assert got["mIoU"] == 1.0 and got["pixel_accuracy"] == 1.0 and got["classes_in_ground_truth"] == C


def test_confusion_matrix_rejects_out_of_range_values():
    with pytest.raises(ValueError, match=r"target values must be 0..2 or 255 \(got 0..7\)"):
        confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 7], [1, 2]]), 3)


# ---------------------------------------------------------------- PQ on the real COCO samples

CATEGORIES = {c["id"]: bool(c["isthing"]) for c in coco_categories()}


def _coco_without_crowd():
    """The real samples with crowd regions turned into void (torchmetrics knows no crowd)."""
    out = []
    for s in read_dataset("coco", COCO_ROOT, "val"):
        ids = load_panoptic(s)
        for seg in s.segments:
            if seg["iscrowd"]:
                ids[ids == seg["id"]] = 0
        out.append((ids, [seg for seg in s.segments if not seg["iscrowd"]]))
    return out


def _fill_void(ids):
    """Every void pixel takes the nearest segment's id: a prediction that covers the whole image."""
    _, (iy, ix) = distance_transform_edt(ids == 0, return_indices=True)
    return ids[iy, ix]


def _perturb(ids, segments, kind, rng):
    """A prediction made from the ground truth, always covering every pixel (no predicted void)."""
    pred, segs = _fill_void(ids), [dict(s) for s in segments]
    if kind == "shift":
        pred = np.roll(pred, (7, -11), axis=(0, 1))
    elif kind == "relabel":  # some segments get another category of their kind (thing/stuff)
        same_kind = {True: [c for c, t in CATEGORIES.items() if t], False: [c for c, t in CATEGORIES.items() if not t]}
        for s in rng.choice(segs, size=len(segs) // 3, replace=False):
            s["category_id"] = int(rng.choice(same_kind[CATEGORIES[s["category_id"]]]))
    elif kind == "merge":  # pairs of segments of one category become one
        by_cat = {}
        for s in segs:
            by_cat.setdefault(s["category_id"], []).append(s)
        for group in by_cat.values():
            for a, b in zip(group[::2], group[1::2]):
                pred[pred == b["id"]] = a["id"]
        segs = [s for s in segs if (pred == s["id"]).any()]
    elif kind == "split":  # the right half of every thing gets a new id (stuff is one segment per category)
        new_id = int(ids.max()) + 1
        half = np.zeros(pred.shape, bool)
        half[:, pred.shape[1] // 2:] = True
        for s in [s for s in segs if CATEGORIES[s["category_id"]]]:
            m = (pred == s["id"]) & half
            if m.any():
                pred[m] = new_id
                segs.append({"id": new_id, "category_id": s["category_id"], "iscrowd": 0})
                new_id += 1
    elif kind == "erode":  # 40% of each segment's pixels go to a random other segment
        flip = rng.random(pred.shape) < 0.4
        pred[flip] = rng.choice([s["id"] for s in segs], size=int(flip.sum()))
    return pred, segs


def _torchmetrics_input(ids, segments):
    """(1, H, W, 2) [category_id, instance id]; void -> category 0, which torchmetrics maps to void."""
    cat = np.zeros_like(ids)
    for s in segments:
        cat[ids == s["id"]] = s["category_id"]
    return torch.from_numpy(np.stack([cat, np.where(cat > 0, ids, 0)], -1)[None]).long()


@pytest.mark.parametrize("kinds", [("shift",), ("relabel", "merge"), ("split", "erode")])
def test_pq_equals_torchmetrics_on_real_coco_samples(kinds):
    rng = np.random.default_rng(0)
    things = {c for c, t in CATEGORIES.items() if t}
    tm = TMPanopticQuality(things=things, stuffs=set(CATEGORIES) - things, return_sq_and_rq=True, return_per_class=True)
    ours = PanopticQuality(CATEGORIES)
    for ids, segments in _coco_without_crowd():
        for kind in kinds:
            pred, pred_segs = _perturb(ids, segments, kind, rng)
            ours.update(ids, segments, pred, pred_segs)
            tm.update(_torchmetrics_input(pred, pred_segs), _torchmetrics_input(ids, segments))
    got, per_class = ours.compute(), tm.compute().reshape(-1, 3)  # (num_categories, 3): PQ, SQ, RQ
    order = sorted(things) + sorted(set(CATEGORIES) - things)  # torchmetrics' continuous ids
    seen = (tm.true_positives + tm.false_positives + tm.false_negatives) > 0
    assert {order[i] for i in torch.nonzero(seen).flatten().tolist()} == set(got["per_class"])
    for i in torch.nonzero(seen).flatten().tolist():
        mine = got["per_class"][order[i]]
        assert [mine["PQ"], mine["SQ"], mine["RQ"]] == pytest.approx(per_class[i].tolist(), abs=1e-6), order[i]
    is_thing = torch.tensor([CATEGORIES[c] for c in order])
    for suffix, mask in (("", seen), ("_th", seen & is_thing), ("_st", seen & ~is_thing)):
        assert got["PQ" + suffix] == pytest.approx(float(per_class[mask, 0].mean()), abs=1e-6)
        assert got["SQ" + suffix] == pytest.approx(float(per_class[mask, 1].mean()), abs=1e-6)
        assert got["RQ" + suffix] == pytest.approx(float(per_class[mask, 2].mean()), abs=1e-6)
    assert 0.05 < got["PQ"] < 0.95  # the perturbations make real errors


def test_perfect_panoptic_prediction_gives_one_crowd_included():
    ours = PanopticQuality(CATEGORIES)
    for s in read_dataset("coco", COCO_ROOT, "val"):
        ids = load_panoptic(s)
        ours.update(ids, s.segments, ids, s.segments)
    got = ours.compute()
    assert (got["PQ"], got["SQ"], got["RQ"], got["PQ_th"], got["PQ_st"]) == (1.0,) * 5
    assert got["n_th"] > 0 and got["n_st"] > 0


def test_crowd_region_forgives_predictions_like_panopticapi():
    (s, _) = read_dataset("coco", COCO_ROOT, "val")
    ids = load_panoptic(s)
    crowd = next(seg for seg in s.segments if seg["iscrowd"])
    # Predict the crowd region as one more segment of its category: no match (crowd), and not a false
    # positive because it lies on the crowd of its own category (panopticapi's rule).
    ours = PanopticQuality(CATEGORIES)
    ours.update(ids, s.segments, ids, s.segments)
    as_other = PanopticQuality(CATEGORIES)
    other = dict(crowd, category_id=next(c for c, t in CATEGORIES.items() if t and c != crowd["category_id"]))
    as_other.update(ids, s.segments, ids, [other if seg is crowd else seg for seg in s.segments])
    assert ours.compute()["PQ"] == 1.0
    assert as_other.compute()["per_class"][other["category_id"]]["FP"] == 1  # another category is not forgiven


def test_mask_ap_on_real_coco_samples():
    from common.seg.metrics import MaskAP

    samples = read_dataset("coco", COCO_ROOT, "val")
    perfect, half = MaskAP(CATEGORIES), MaskAP(CATEGORIES)
    n_things = 0
    for image_id, s in enumerate(samples):
        ids = load_panoptic(s)
        things = [seg for seg in s.segments if CATEGORIES[seg["category_id"]] and not seg["iscrowd"]]
        n_things += len(things)
        masks = np.stack([ids == seg["id"] for seg in things])
        cats = [seg["category_id"] for seg in things]
        for m in (perfect, half):
            m.add_ground_truth(image_id, ids, s.segments)
        perfect.add_predictions(image_id, masks, np.linspace(1, 0.5, len(things)), cats)
        half.add_predictions(image_id, masks[::2], np.ones(len(things[::2])), cats[::2])
    assert n_things > 20
    assert perfect.compute()["AP"] == pytest.approx(1.0)
    assert perfect.compute() == perfect.compute()  # compute leaves the accumulated records as they were
    # Half of the instances found, all right: precision 1 up to recall ~1/2 per category.
    assert 0.3 < half.compute()["AP"] < 0.7


def test_merged_accumulators_equal_one_over_all_images():
    # What a multi-process evaluation does: each process accumulates its images, the parts are merged.
    from common.seg.metrics import MaskAP

    rng = np.random.default_rng(0)
    whole_pq, parts_pq = PanopticQuality(CATEGORIES), [PanopticQuality(CATEGORIES) for _ in range(2)]
    whole_ap, parts_ap = MaskAP(CATEGORIES), [MaskAP(CATEGORIES) for _ in range(2)]
    for image_id, s in enumerate(read_dataset("coco", COCO_ROOT, "val")):
        ids = load_panoptic(s)
        pred, pred_segs = _perturb(ids, s.segments, "shift", rng)
        things = [seg for seg in pred_segs if CATEGORIES[seg["category_id"]]]
        masks = np.stack([pred == seg["id"] for seg in things])
        for pq, ap in ((whole_pq, whole_ap), (parts_pq[image_id], parts_ap[image_id])):
            pq.update(ids, s.segments, pred, pred_segs)
            ap.add_ground_truth(image_id, ids, s.segments)
            ap.add_predictions(image_id, masks, np.linspace(1, 0.5, len(things)), [seg["category_id"] for seg in things])
    merged_pq, merged_ap = PanopticQuality(CATEGORIES), MaskAP(CATEGORIES)
    for pq, ap in zip(parts_pq, parts_ap):
        merged_pq.merge(pq)
        merged_ap.merge(ap)
    assert merged_pq.compute() == whole_pq.compute()
    assert len({g["id"] for g in merged_ap.gt}) == len(merged_ap.gt)  # ground-truth ids stay unique
    assert merged_ap.compute() == whole_ap.compute()
    assert 0 < whole_ap.compute()["AP"] < 1
