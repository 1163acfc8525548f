"""What the two generator trainers validate on, and where the validation grids go (beyond the paper, which
reports no training-time validation; issue 27).

- the captions: `--validation-captions FILE` (a JSONL with `id` and `caption` per line: caption.py's
  manifest works as it is), else the validation split's captions (captions/{data}_val.jsonl, found like
  the training captions), first `--num-validation` of them; only when neither exists (or the run trains
  on the validation split itself) the first training samples, said once on the console, since a grid of
  training samples shows fitting, not overfitting (`pick_validation`);
- the real sample of each held-out caption where --data's validation split has its id: Text2Mask shows
  its real colour map beside the sample, Mask2Img conditions on it (and requires it);
- their embeddings, encoded once at start together with the training captions, before the text
  encoders are freed (common/diffusion/sdxl.py cache_caption_sets), kept for every validation;
- the grid: a PNG in RUN/validation/step-N.png, a stats.jsonl line, the numbers and the picture with its
  captions in every tracker of --report-to (common/runtime/tracking.py log_images).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from common import SegGenError
from common.data.datasets import Sample, read_dataset
from common.data.manifest import read_manifest
from common.data.paths import captions_path
from common.diffusion.sdxl import TextEmbeddings
from common.runtime.tracking import log_images


@dataclass
class HeldOut:
    """The validation captions, each with its real sample where known (None: a caption only)."""

    texts: list[str]
    samples: list[Sample | None]
    source: str  # where they come from, as the console and stats.jsonl say it
    embeddings: TextEmbeddings | None = None  # set once encoded (cache_caption_sets): row i = texts[i]


def pick_validation(*, data: str, data_root, split: str, validation_captions: Path | None, num_validation: int,
                    train_samples: list[Sample], train_texts: list[str], need_samples: bool) -> tuple[HeldOut, str | None]:
    """The first `num_validation` held-out captions (module docstring) and a note for the console when they
    are training samples instead (else None). need_samples: every caption must be a validation sample
    (Mask2Img conditions on its colour map)."""
    if validation_captions is not None:
        where = f"--validation-captions {validation_captions}"
        return _read_held_out(Path(validation_captions), where, data, data_root, num_validation, need_samples), None
    default = captions_path(data, "val")
    if split != "val" and default.is_file():
        where = f"{default} (the default validation captions; pass --validation-captions to choose others)"
        return _read_held_out(default, where, data, data_root, num_validation, need_samples), None
    why = "the run trains on the validation split" if split == "val" else f"{default} does not exist"
    note = (f"validation uses the first {min(num_validation, len(train_samples))} training samples ({why}): the grids show "
            f"fitting, not overfitting; caption the val split (caption.py --split val) or pass --validation-captions FILE")
    held = HeldOut(train_texts[:num_validation], train_samples[:num_validation], "training samples")
    return held, note


def _read_held_out(path: Path, where: str, data: str, data_root, k: int, need_samples: bool) -> HeldOut:
    if not path.is_file():
        raise SegGenError(f"{where} not found: pass a JSONL file of held-out captions (id and caption per line, "
                          f"e.g. caption.py's captions/{data}_val.jsonl)")
    records = read_manifest(path, ("id", "caption"))[:k]
    if not records:
        raise SegGenError(f"{where} holds no captions: caption the val split with caption.py --split val, or pass another file")
    val = _validation_split(data, data_root, where, need_samples)
    samples = [val.get(str(r["id"])) for r in records]
    missing = [str(r["id"]) for r, s in zip(records, samples) if s is None]
    if need_samples and missing:
        raise SegGenError(
            f"{where}: {len(missing)} of its first {len(records)} ids are not samples of {data}'s validation split "
            f"under {data_root} (e.g. {missing[0]!r}); Mask2Img validates on their real colour maps: pass captions of "
            f"that split (caption.py --data {data} --split val)")
    return HeldOut([str(r["caption"]) for r in records], samples, str(path))


def _validation_split(data: str, data_root, where: str, need_samples: bool) -> dict[str, Sample]:
    """--data's validation samples by id; Text2Mask goes on without them (captions only), Mask2Img cannot."""
    try:
        return {s.id: s for s in read_dataset(data, data_root, "val")}
    except SegGenError as e:
        if need_samples:
            raise SegGenError(f"{where}: Mask2Img validates on the colour maps of {data}'s validation split, "
                              f"which cannot be read: {e}") from None
        return {}


def validation_items(held: HeldOut, data: str, palette, resolution: int, need_image: bool) -> list[dict]:
    """Per held-out caption: its cached embeddings, and where its sample is known that sample's centre crop
    with no flip (colour map, and the image when need_image), as the training items are made."""
    from common.diffusion.training import ColorMapDataset

    known = [s for s in held.samples if s is not None]
    view = ColorMapDataset(known, data, palette, resolution, flip_p=0.0, center_crop=True, need_image=need_image)
    items, n = [], 0
    for i, sample in enumerate(held.samples):
        item = {}
        if sample is not None:
            item, n = view[(n, 0)], n + 1
        item["prompt_embeds"], pooled = held.embeddings.row(i)  # (77, D), (P,) or None
        if pooled is not None:
            item["pooled_prompt_embeds"] = pooled
        items.append(item)
    return items


def report_validation(accelerator, log, step: int, grid: Image.Image, held: HeldOut, figures: dict, out: Path) -> dict:
    """The grid as RUN/validation/step-N.png, a stats.jsonl line, and figures + grid + captions to the trackers."""
    path = Path(out) / "validation" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    v = {**figures, "grid": str(path.relative_to(out)), "captions": held.source}
    log.write(step=step, validation=v)
    accelerator.log({f"validation/{k}": x for k, x in figures.items() if isinstance(x, float)}, step=step)
    log_images(accelerator, step, {"validation": grid}, held.texts)
    return v
