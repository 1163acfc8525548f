"""Run a trained segmenter on any image folder (the paper's Figs 1, 6, 10: other domains, AI-generated images).

    python predict.py --checkpoint runs/seg-ade20k-aug/model --images my_photos/ --out predictions/

--checkpoint is a train_seg run's model/ folder (or a checkpoints/phase*-step* one): Mask2Former or HRNet.
For every image under --images (recursively; .jpg .jpeg .png .webp .bmp) it writes, under --out with the
same relative path:
- labels/<name>.png: 8-bit label PNG in the ADE20K convention, value = train id + 1 (ADE20K: the dataset's
  own values 1..150; COCO: 1..133 in category-id order), 0 = none (kept for unlabelled pixels; never predicted);
- overlays/<name>.png: the image with the classes' usual colours blended in (--alpha).
Semantic inference at the image's original resolution, short side resized to --size (train_seg's evaluation:
common/seg/model.py semantic_scores). Resumable: an image whose two outputs exist is skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from PIL import Image

from common import SegGenError
from common.seg import data as segdata
from common.seg import model as segmodel
from common.runtime.cli import Data, user_errors
from common.runtime.cli import run as run_cli
from common.masks.colormap import coco_categories, label_to_color, palette_for
from common.data.datasets import load_image
from common.data.manifest import atomic_save
from common.runtime.progress import console, progress_bar

SIZE = 512  # short side at test time: train_seg's ADE20K evaluation size (A.3)
ALPHA = 0.5  # weight of the class colours in the overlay
EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def find_images(folder: Path, out: Path) -> list[Path]:
    """The images under --images, each with an output name of its own; --out must be a folder outside them."""
    if not folder.is_dir():
        raise SegGenError(f"--images {folder}: no such folder")
    check_out(folder, out)
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not images:
        raise SegGenError(f"--images {folder}: no images there ({', '.join(sorted(EXTENSIONS))}, searched recursively)")
    by_output: dict[Path, Path] = {}
    for image in images:
        name = image.relative_to(folder).with_suffix(".png")
        if name in by_output:
            raise SegGenError(f"--images: {by_output[name]} and {image} would both write labels/{name}; rename one of them")
        by_output[name] = image
    return images


def check_out(images: Path, out: Path) -> None:
    """--out is a folder (or does not exist yet) and not inside --images: a rerun would segment its own outputs."""
    if out.exists() and not out.is_dir():
        raise SegGenError(f"--out {out} is a file; pass a folder (it gets labels/ and overlays/)")
    if out.resolve().is_relative_to(images.resolve()):
        raise SegGenError(f"--out {out} is inside --images {images}: the next run would segment its own outputs; "
                          f"put --out outside it")


def predict_label(seg: segmodel.Segmenter, image: Image.Image, size: int) -> np.ndarray:
    """(H, W) uint8 label PNG values: argmax of the semantic scores + 1 (ADE20K convention)."""
    return (seg.scores(np.asarray(image), size).argmax(0) + 1).to(torch.uint8).cpu().numpy()


def overlay(image: Image.Image, label: np.ndarray, data: str, alpha: float = ALPHA) -> np.ndarray:
    """(H, W, 3) uint8: the classes' usual colours blended into the image; value 0 (none) left as is."""
    palette = palette_for("coco" if data == "coco" else data, "usual")
    if data == "coco":  # label values are train id + 1; the palette is by COCO category id
        ids = np.array([0] + [c["id"] for c in sorted(coco_categories(), key=lambda c: c["id"])], np.uint8)
        label = ids[label]
    img = np.asarray(image).astype(np.float32)
    blend = (1 - alpha) * img + alpha * label_to_color(label, palette).astype(np.float32)
    return np.where((label > 0)[..., None], blend, img).round().astype(np.uint8)


def main(
    checkpoint: Annotated[Path, typer.Option(help="A train_seg model folder (RUN/model or RUN/checkpoints/phase*-step*): Mask2Former or HRNet.")],
    images: Annotated[Path, typer.Option(help="Folder of images (searched recursively).")],
    out: Annotated[Path, typer.Option(help="Output folder: labels/ (8-bit PNG, train id + 1, 0 = none) and overlays/.")],
    data: Annotated[Data, typer.Option(help="The dataset the segmenter was trained on (its classes and colours).")] = Data.ade20k,
    size: Annotated[int, typer.Option(min=64, help="Short side the segmenter sees (train_seg's eval size). At least 64: Mask2Former's coarsest features are 1/32 of the input, and a 1x1 map at 32 cannot be normalised.")] = SIZE,
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="Weight of the class colours in the overlays.")] = ALPHA,
):
    """Segment every image of --images with a trained segmenter: label PNGs and colour overlays."""
    with user_errors(console):
        files = find_images(images, out)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        seg = segmodel.load_segmenter(checkpoint, len(segdata.class_names(data.value)), device, flag="--checkpoint", data=data.value)
        done = skipped = 0
        with progress_bar(console, "img/s") as progress:
            bar = progress.add_task("predicting", total=len(files))
            for f in files:
                rel = f.relative_to(images).with_suffix(".png")
                label_out, overlay_out = out / "labels" / rel, out / "overlays" / rel
                if label_out.is_file() and overlay_out.is_file():
                    skipped += 1
                else:
                    try:
                        image = load_image(f)
                    except (SegGenError, OSError) as e:
                        raise SegGenError(f"--images: cannot read {f} ({e})") from e
                    label = predict_label(seg, image, size)
                    atomic_save(label_out, lambda p: Image.fromarray(label).save(p, format="PNG"))
                    atomic_save(overlay_out, lambda p: Image.fromarray(overlay(image, label, data.value, alpha)).save(p, format="PNG"))
                    done += 1
                progress.advance(bar)
        console.print(f"predicted {done}, skipped {skipped} (already in {out})")


if __name__ == "__main__":
    run_cli(main, console, hint="rerun the same command to continue")
