"""Judging and cleaning a synthetic folder with a segmenter trained on real data (issue 13).

- Alignment (FreestyleNet, SCP-Diff): how well a real-data segmenter recovers the synthetic label from
  the synthetic image. Per sample: mIoU over the classes present in label ∪ prediction, pixel accuracy,
  and the per-class mean cross-entropy.
- Noisy-region filtering (FreeMask, Yang et al., NeurIPS 2023; LiheYoung/FreeMask preprocess/filter.py):
  a labelled pixel of class c is ignored when its loss exceeds tolerance (1.25) × the mean loss of class
  c. FreeMask measures the class means on the *real* training images (filter.py lines 66-89) and filters
  the synthetic masks with them (lines 91-110); `class_means` takes either set of records.
- Hard-sample resampling (FreeMask preprocess/resample.py): a mask's hardness is the pixel-weighted mean
  of the class means over its classes (lines 39-50); masks are ranked by hardness and the i-th easiest of
  N gets min(1 + round((i + 1) / N · 20), 20) of its 20 synthetic images (lines 54-60).

Classes are train ids (ADE20K PNG value − 1, COCO categories in id order), 255 = ignore; in quality.jsonl
they are JSON object keys (strings).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import SegGenError
from common.masks.colormap import IGNORE
from common.data.datasets import Sample
from common.data.index import provenance, sample_ids
from common.data.ids import safe_name
from common.data.manifest import atomic_save, read_manifest

# ---------------------------------------------------------------- the segmenter's identity

def segmenter_identity(folder: Path) -> str:
    """What a resume of quality.py is keyed by (issue 28 item 6): a hash of the bytes of every file in the
    segmenter's model folder (config, processor, weights), not its path, so that a segmenter retrained in
    the same place is a different segmenter, and a copied or moved one is the same. 16 hex digits; reading
    the weights costs about a second per GB, once per run."""
    import hashlib

    digest = hashlib.blake2b(digest_size=8)
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(f.relative_to(folder).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


# ---------------------------------------------------------------- defaults and their source

TOLERANCE = 1.25  # FreeMask filter.py --tolerance-margin (default 1.25)
MAX_REPEAT = 20  # FreeMask resample.py: 20 synthetic images per mask, the hardest masks keep all 20
QUALITY_FILE = "quality.jsonl"
REFERENCE_FILE = "quality_reference.json"  # the class-wise mean losses on the real split
FILTERED_DIR = "annotations_filtered"  # beside annotations/, never over it


# ---------------------------------------------------------------- one sample

def log_probs(scores: torch.Tensor, kind: str = "logits") -> torch.Tensor:
    """(C, H, W) log-probabilities from logits (HRNet) or non-negative class scores (Mask2Former's
    softmax(class) · sigmoid(mask) sum, normalised over classes here)."""
    scores = scores.float()
    if kind == "logits":
        return scores.log_softmax(0)
    if kind == "scores":
        return (scores.clamp(min=0) / scores.clamp(min=0).sum(0, keepdim=True).clamp(min=1e-12)).clamp(min=1e-12).log()
    raise ValueError(f"kind must be 'logits' or 'scores' (got {kind!r})")


def sample_figures(scores: torch.Tensor, label: np.ndarray | torch.Tensor, ignore_index: int = IGNORE,
                   kind: str = "logits") -> tuple[dict, torch.Tensor]:
    """Figures of one sample and its per-pixel loss map.

    scores: (C, H, W) logits or class scores; label: (H, W) train ids, ignore_index left out.
    Returns ({"miou", "accuracy", "loss_mean", "pixels", "loss": {c: [mean CE, pixels]},
    "iou": {c: [intersection, union]}}, loss (H, W) float32, 0 on ignored pixels).
    miou: mean IoU over the classes in label ∪ prediction (on labelled pixels); NaN without any."""
    label = torch.as_tensor(np.asarray(label), device=scores.device).long()
    if label.shape != scores.shape[1:]:
        raise ValueError(f"label {tuple(label.shape)} and scores {tuple(scores.shape[1:])} differ in size")
    lp = log_probs(scores, kind)
    valid = label != ignore_index
    target = torch.where(valid, label, 0)
    loss = torch.where(valid, -lp.gather(0, target[None])[0], 0.0)  # (H, W) cross-entropy
    pred = lp.argmax(0)
    t, p, l = target[valid], pred[valid], loss[valid]
    c = lp.shape[0]
    n_t = torch.bincount(t, minlength=c)
    n_p = torch.bincount(p, minlength=c)
    inter = torch.bincount(t[t == p], minlength=c)
    union = n_t + n_p - inter
    loss_sum = torch.bincount(t, weights=l.double(), minlength=c)
    present = union > 0
    figures = {
        "miou": float((inter[present].double() / union[present]).mean()) if present.any() else float("nan"),
        "accuracy": int(inter.sum()) / int(valid.sum()) if valid.any() else float("nan"),
        "loss_mean": float(l.double().mean()) if valid.any() else float("nan"),
        "pixels": int(valid.sum()),
        "loss": {str(k): [float(loss_sum[k] / n_t[k]), int(n_t[k])] for k in torch.nonzero(n_t)[:, 0].tolist()},
        "iou": {str(k): [int(inter[k]), int(union[k])] for k in torch.nonzero(present)[:, 0].tolist()},
    }
    return figures, loss.float()


# ---------------------------------------------------------------- FreeMask: class means, filtering

def class_means(records: list[dict], num_classes: int) -> np.ndarray:
    """(num_classes,) mean loss of each class over all pixels of the records' "loss" dicts (pixel-weighted,
    FreeMask filter.py lines 81-87); NaN for a class no record has."""
    total, count = np.zeros(num_classes), np.zeros(num_classes)
    for r in records:
        for k, (mean, n) in r["loss"].items():
            total[int(k)] += mean * n
            count[int(k)] += n
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def noisy_pixels(loss: torch.Tensor | np.ndarray, label: np.ndarray, means: np.ndarray, tolerance: float = TOLERANCE,
                 ignore_index: int = IGNORE) -> np.ndarray:
    """(H, W) bool: labelled pixels whose loss > tolerance × their class's mean loss (FreeMask filter.py
    line 109). A class without a mean (NaN: never seen in the reference) is kept whole; FreeMask's mean
    would be 0 there, dropping all of it."""
    loss, label = np.asarray(torch.as_tensor(loss).cpu()), np.asarray(label)
    valid = label != ignore_index
    limit = np.full(label.shape, np.inf)
    limit[valid] = tolerance * np.nan_to_num(means[label[valid]], nan=np.inf)
    return valid & (loss > limit)


def filtered_path(folder: Path, sample: Sample) -> Path:
    """Where a sample's filtered annotation goes: FOLDER/annotations_filtered/<its id>.png (by id, not by the
    annotation's name: two annotations named x.png in two folders stay two files; common/data/ids.py)."""
    return Path(folder) / FILTERED_DIR / f"{safe_name(sample.id)}.png"


def write_filtered(sample: Sample, noisy: np.ndarray, dst: Path) -> Path:
    """A copy of the sample's annotation with the noisy pixels set to the dataset's ignore value: 0 in an
    ADE20K 8-bit label PNG ("other"), segment id 0 (void, RGB 0,0,0) in a COCO panoptic PNG. Never over
    the original."""
    if Path(dst).resolve() == Path(sample.annotation).resolve():
        raise SegGenError(f"{dst}: the filtered annotation must not replace the original")
    png = np.array(Image.open(sample.annotation))
    if png.shape[:2] != noisy.shape:
        raise SegGenError(f"{sample.annotation}: {png.shape[1]}x{png.shape[0]}, but its prediction is {noisy.shape[1]}x{noisy.shape[0]}")
    png[noisy] = 0
    return atomic_save(dst, lambda p: Image.fromarray(png).save(p, format="PNG"))


# ---------------------------------------------------------------- FreeMask: hardness and resampling

def hardness(class_pixels: dict, means: np.ndarray) -> float:
    """Σ_c n_c · L̄_c / Σ_c n_c over the mask's classes (FreeMask resample.py lines 39-50); classes
    without a mean count as 0, as FreeMask's 0-initialised sums do."""
    n = np.array([v[1] if isinstance(v, (list, tuple)) else v for v in class_pixels.values()], float)
    m = np.nan_to_num(np.array([means[int(k)] for k in class_pixels], float))
    return float((n * m).sum() / (n.sum() + 1e-5))


def resample_probabilities(hard: list[float], groups: list[str] | None = None, max_repeat: int = MAX_REPEAT) -> np.ndarray:
    """Sampling probabilities from hardness, aligned with `hard`.

    groups: the mask each sample was drawn for (ImgSyn: its source id; MaskSyn: its own id). Masks are
    ranked by hardness, easiest first; the i-th of N gets r_i = min(1 + round((i + 1) / N · max_repeat),
    max_repeat) draws (FreeMask resample.py line 58) shared by its m samples: p ∝ r_i / m."""
    groups = list(groups) if groups is not None else [str(i) for i in range(len(hard))]
    if len(groups) != len(hard) or not hard:
        raise ValueError("hard and groups must be non-empty and of the same length")
    per_group: dict[str, list[float]] = {}
    for g, h in zip(groups, hard):
        per_group.setdefault(g, []).append(h)
    order = sorted(per_group, key=lambda g: (float(np.mean(per_group[g])), g))  # stable for ties
    n = len(order)
    repeat = {g: min(1 + round((i + 1) / n * max_repeat), max_repeat) for i, g in enumerate(order)}
    w = np.array([repeat[g] / len(per_group[g]) for g in groups], float)
    return w / w.sum()


def sample_groups(samples: list[Sample]) -> list[str]:
    """The mask each sample was drawn for: an ImgSyn sample shares its source's human label."""
    cols, ids = provenance(samples), sample_ids(samples)
    return [src if method == "imgsyn" else sid for src, method, sid in zip(cols["source_id"], cols["method"], ids)]


# ---------------------------------------------------------------- the folder summary

def class_histogram(records: list[dict], num_classes: int) -> np.ndarray:
    """(num_classes,) labelled pixels per class over the records' "loss" dicts."""
    h = np.zeros(num_classes)
    for r in records:
        for k, (_, n) in r["loss"].items():
            h[int(k)] += n
    return h


def histogram_distances(a: np.ndarray, b: np.ndarray) -> dict:
    """Total variation ½Σ|p − q| and Jensen-Shannon divergence (bits) between two class histograms."""
    p, q = a / max(a.sum(), 1e-12), b / max(b.sum(), 1e-12)
    m = (p + q) / 2

    def kl(x, y):
        keep = x > 0
        return float((x[keep] * np.log2(x[keep] / y[keep])).sum())

    return {"total_variation": float(np.abs(p - q).sum() / 2), "jensen_shannon": (kl(p, m) + kl(q, m)) / 2}


def summarize(records: list[dict], names: list[str], real_histogram: np.ndarray | None = None, worst: int = 8) -> dict:
    """Mean / median alignment and accuracy, per-class alignment (IoU over the whole folder: Σ∩ / Σ∪),
    the class histogram against the real split, and the worst samples by alignment."""
    c = len(names)
    miou = np.array([r["miou"] for r in records], float)
    acc = np.array([r["accuracy"] for r in records], float)
    inter, union = np.zeros(c), np.zeros(c)
    for r in records:
        for k, (i, u) in r["iou"].items():
            inter[int(k)] += i
            union[int(k)] += u
    ok = ~np.isnan(miou)
    order = sorted((i for i in range(len(records)) if ok[i]), key=lambda i: (miou[i], records[i]["id"]))
    out = {
        "samples": len(records),
        "alignment": {"mean": float(np.mean(miou[ok])) if ok.any() else None, "median": float(np.median(miou[ok])) if ok.any() else None},
        "accuracy": {"mean": float(np.nanmean(acc)) if ok.any() else None, "median": float(np.nanmedian(acc)) if ok.any() else None},
        "per_class_alignment": {names[k]: float(inter[k] / union[k]) for k in range(c) if union[k] > 0},
        "worst": [{"id": records[i]["id"], "miou": float(miou[i])} for i in order[:worst]],
    }
    off = [r["off_palette"] for r in records if r.get("off_palette") is not None]
    if off:
        out["off_palette"] = {"mean": float(np.mean(off)), "max": float(np.max(off))}
    synth = class_histogram(records, c)
    out["class_histogram"] = {"synthetic": {names[k]: int(synth[k]) for k in range(c) if synth[k] > 0}}
    if real_histogram is not None:
        out["class_histogram"]["real"] = {names[k]: int(real_histogram[k]) for k in range(c) if real_histogram[k] > 0}
        out["class_histogram"].update(histogram_distances(synth, np.asarray(real_histogram, float)))
    return out


# ---------------------------------------------------------------- what train_seg --synthetic reads

def read_quality(folder: str | Path) -> list[dict]:
    path = Path(folder) / QUALITY_FILE
    if not path.is_file() and not list(Path(folder).glob("quality.rank*.jsonl")):
        raise SegGenError(f"--synthetic {folder}: no {QUALITY_FILE}; run quality.py --synthetic {folder} first")
    return read_manifest(path)


def reference_means(folder: str | Path, num_classes: int) -> np.ndarray:
    """The class-wise mean losses quality.py recorded for a folder: on the real split (FreeMask's choice,
    FOLDER/quality_reference.json), else over the folder's own samples."""
    ref = Path(folder) / REFERENCE_FILE
    if ref.is_file():
        return np.array([np.nan if v is None else v for v in json.loads(ref.read_text())["class_means"]], float)
    return class_means(read_quality(folder), num_classes)


def sampling_probabilities(folder: str | Path, samples: list[Sample], num_classes: int, max_repeat: int = MAX_REPEAT) -> np.ndarray:
    """FreeMask's hardness resampling for a synthetic folder: probabilities aligned with `samples`
    (read_synthetic's order), from FOLDER/quality.jsonl and the recorded class means."""
    by_id = {str(r["id"]): r for r in read_quality(folder)}
    ids = sample_ids(samples)
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise SegGenError(f"--synthetic {folder}: {len(missing)} sample(s) are not in {QUALITY_FILE} (e.g. {missing[0]!r}); "
                          f"rerun quality.py --synthetic {folder} to finish it")
    means = reference_means(folder, num_classes)
    return resample_probabilities([hardness(by_id[i]["loss"], means) for i in ids], sample_groups(samples), max_repeat)


def filtered_samples(folder: str | Path, samples: list[Sample]) -> list[Sample]:
    """The samples with their annotation replaced by the filtered one quality.py --filter wrote."""
    from dataclasses import replace

    if hasattr(samples, "with_annotations_in"):  # a SyntheticIndex / IndexView: a view, checked from the manifests' paths
        names = [f"{safe_name(i)}.png" for i in sample_ids(samples)]
        missing = [sid for sid, name in zip(sample_ids(samples), names) if not (Path(folder) / FILTERED_DIR / name).is_file()]
        out = samples.with_annotations_in(Path(folder) / FILTERED_DIR)
    else:
        out = [replace(s, annotation=filtered_path(folder, s)) for s in samples]
        missing = [s.id for s in out if not s.annotation.is_file()]
    if missing:
        raise SegGenError(f"--synthetic {folder}: {len(missing)} sample(s) have no filtered annotation in {FILTERED_DIR}/ "
                          f"(e.g. {missing[0]!r}); run quality.py --synthetic {folder} --filter")
    return out
