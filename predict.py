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

import json
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


def load_segmenter(folder: Path, data: str):
    """(model, image mean, image std) of a train_seg model folder; its class count must match --data."""
    kind = segmodel.model_type(folder)
    if kind is None:
        raise SegGenError(f"--checkpoint {folder}: no config.json there; pass a train_seg run's model/ folder")
    names = segdata.class_names(data)
    if kind == "hrnetv2":
        from common.seg import hrnet

        net, norm = hrnet.load(folder), segmodel.Normalize(**_processor_json(folder))
        classes = net.num_classes
    elif kind == "mask2former":
        from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

        try:
            net, norm = Mask2FormerForUniversalSegmentation.from_pretrained(folder), Mask2FormerImageProcessor.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise SegGenError(f"--checkpoint {folder}: cannot load Mask2Former from it ({str(e).splitlines()[0]})") from e
        classes = net.config.num_labels
    else:
        raise SegGenError(f"--checkpoint {folder}: a {kind!r} model; pass a Mask2Former or HRNet folder written by train_seg")
    if classes != len(names):
        raise SegGenError(f"--checkpoint {folder} predicts {classes} classes, but --data {data} has {len(names)}: pass the --data it was trained on")
    return net.eval(), norm.image_mean, norm.image_std


def _processor_json(folder: Path) -> dict:
    path = folder / "preprocessor_config.json"
    return {k: v for k, v in json.loads(path.read_text()).items() if k in ("image_mean", "image_std")} if path.is_file() else {}


def find_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise SegGenError(f"--images {folder}: no such folder")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not images:
        raise SegGenError(f"--images {folder}: no images there ({', '.join(sorted(EXTENSIONS))}, searched recursively)")
    return images


@torch.no_grad()
def predict_label(net, image: Image.Image, mean, std, size: int, device) -> np.ndarray:
    """(H, W) uint8 label PNG values: argmax of the semantic scores + 1 (ADE20K convention)."""
    x = torch.from_numpy(np.asarray(image).copy()).to(device).permute(2, 0, 1).float()  # (3, H, W) 0..255
    x = (x - torch.tensor(mean, device=device).view(3, 1, 1) * 255) / (torch.tensor(std, device=device).view(3, 1, 1) * 255)
    scores = segmodel.semantic_scores(net, x, size)  # (C, H, W) at the original resolution
    return (scores.argmax(0) + 1).to(torch.uint8).cpu().numpy()


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
    size: Annotated[int, typer.Option(min=32, help="Short side the segmenter sees (train_seg's eval size).")] = SIZE,
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="Weight of the class colours in the overlays.")] = ALPHA,
):
    """Segment every image of --images with a trained segmenter: label PNGs and colour overlays."""
    with user_errors(console):
        files = find_images(images)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        net, mean, std = load_segmenter(checkpoint, data.value)
        net.to(device)
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
                    label = predict_label(net, image, mean, std, size, device)
                    atomic_save(label_out, lambda p: Image.fromarray(label).save(p, format="PNG"))
                    atomic_save(overlay_out, lambda p: Image.fromarray(overlay(image, label, data.value, alpha)).save(p, format="PNG"))
                    done += 1
                progress.advance(bar)
        console.print(f"predicted {done}, skipped {skipped} (already in {out})")


if __name__ == "__main__":
    run_cli(main, console, hint="rerun the same command to continue")
