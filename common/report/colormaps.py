"""The built-in demo of what exists so far: colour maps (paper §3.2, appendix A.2) on the real samples
shipped in tests/data, and the tiny offline models every stage is tested with.

    python -m common.report.colormaps [OUT_DIR]        (what `make demo` runs; default runs/demo)

Writes OUT_DIR/colormaps.png (per sample: image, generation colour map, usual-palette overlay, and the
labels decoded back from a VAE-like degraded colour map) and OUT_DIR/tiny/{sdxl,...}, and prints how
many pixels survive the degradation with each palette.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from common.models import tiny
from common.masks.colormap import color_to_label, label_to_color, palette_for, panoptic_to_color, resize_nearest
from common.data.datasets import load_image, load_panoptic, read_dataset
from common.diffusion.vae_roundtrip import DECODINGS, KINDS, colour_maps, score

DATA = Path(__file__).resolve().parents[2] / "tests" / "data"
TILE = 256


def degrade(cmap: np.ndarray, rng) -> np.ndarray:
    """A stand-in for the VAE round trip: JPEG quality 75 (4:4:4), then Gaussian noise σ = 8/255."""
    buf = io.BytesIO()
    Image.fromarray(cmap).save(buf, "JPEG", quality=75, subsampling=0)
    return np.clip(np.asarray(Image.open(buf), np.float32) + rng.normal(0, 8, cmap.shape), 0, 255)


def tile(array: np.ndarray) -> Image.Image:
    h, w = array.shape[:2]
    return Image.fromarray(resize_nearest(array, (TILE, min(TILE, round(TILE * h / w)))))


def main(out: Path) -> None:
    console, rng = Console(), np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    table = Table(title="Colour map -> label after a VAE-like degradation (share of pixels right; "
                        "python -m common.diffusion.vae_roundtrip measures a real VAE)")
    for col in ("sample", "generation palette", "+ 3x3 vote", "usual palette", "+ 3x3 vote"):
        table.add_column(col)
    rows = []
    for sample in read_dataset("ade20k", DATA / "ade20k", "train") + read_dataset("ade20k", DATA / "ade20k", "val"):
        image = np.asarray(load_image(sample.image))
        label, maps = colour_maps(sample, "ade20k")
        after = {k: degrade(m, rng) for k, m in maps.items()}
        right = score(label, after, "ade20k")
        table.add_row(sample.id, *(f"{right[k][d] / label.size:.2%}" for k in KINDS for d in DECODINGS))
        gen, usual, cmap, noisy = palette_for("ade20k"), palette_for("ade20k", "usual"), maps["generation"], after["generation"]
        overlay = (0.5 * image + 0.5 * label_to_color(label, usual)).astype(np.uint8)
        decoded = label_to_color(color_to_label(noisy, gen, vote=True), gen)
        rows.append([tile(image), tile(cmap), tile(overlay), tile(decoded)])
    for sample in read_dataset("coco", DATA / "coco", "val"):
        image, ids = np.asarray(load_image(sample.image)), load_panoptic(sample)
        cmap = panoptic_to_color(ids, sample.segments, palette_for("coco"))
        usual = panoptic_to_color(ids, sample.segments, palette_for("coco", "usual"))
        overlay = (0.5 * image + 0.5 * usual).astype(np.uint8)
        rows.append([tile(image), tile(cmap), tile(overlay), tile(usual)])
    sheet = Image.new("RGB", (4 * TILE, len(rows) * TILE), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            sheet.paste(im, (c * TILE, r * TILE))
    sheet.save(out / "colormaps.png")
    console.print(table)
    for kind in tiny.KINDS:
        t = time.perf_counter()
        tiny.save(kind, out / "tiny" / kind, out / "tiny" / "sdxl" if kind == "controlnet" else None)
        console.print(f"tiny {kind:<12} -> {out / 'tiny' / kind}  ({time.perf_counter() - t:.1f} s)")
    console.print(f"\ncontact sheet (image | generation colour map | usual overlay | decoded): {out / 'colormaps.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/demo"))
