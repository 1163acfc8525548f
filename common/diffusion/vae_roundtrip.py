"""The VAE round trip of colour maps (paper appendix A.7, Fig. 12): how much of a mask survives being
drawn by the generator, i.e. encoded and decoded by its VAE, then read back with f_color→mask.

    python -m common.diffusion.vae_roundtrip --vae stabilityai/stable-diffusion-xl-base-1.0 --data ade20k --data-root datasets
    python -m common.diffusion.vae_roundtrip --vae runs/tiny/sdxl --data-root tests/data/ade20k --n 3 --json roundtrip.json

On real annotations, each map is painted with the generation palette and with the usual one, encoded
and decoded by the VAE (the latent mean: no sampling noise), and decoded back to labels by nearest
colour, with and without the 3×3 majority vote. The table gives the share of pixels that come back as
their own class, over all pixels of the n maps, and the worst single map.

The pieces (`colour_maps`, `recovered`, `score`) are shared with `common/report/colormaps.py`, which runs the same
study with a JPEG + noise stand-in for the VAE.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Callable

import numpy as np
import typer

from common import SegGenError
from common.runtime.cli import Data, Split
from common.masks.colormap import (color_to_label, label_to_color, palette_for, panoptic_color_to_semantic, panoptic_to_color,
                             panoptic_to_semantic, resize_nearest)
from common.data.datasets import Sample, load_label, load_panoptic, read_dataset
from common.runtime.weights import SAFE

KINDS = ("generation", "usual")  # the palettes compared
DECODINGS = ("nearest", "vote")  # nearest colour, then + the 3×3 majority vote

# Defaults, one block (paper A.7 / Fig. 12 studies ADE20K maps; SDXL trains at 1024, 512 keeps a CPU run short).
DEFAULT_N = 100
DEFAULT_RESOLUTION = 512


# ---------------------------------------------------------------- the study, whatever the round trip

def colour_maps(sample: Sample, data: str, resolution: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(truth, {palette kind: colour map}): the (H, W) semantic labels of a real sample and its (H, W, 3)
    uint8 colour map under each palette. resolution: the shorter side resized to it (nearest) and both
    sides cropped to a multiple of 8, as the VAE needs; None keeps the annotation's size."""
    if data != "coco":  # ADE20K and the toy world: 8-bit semantic labels
        truth = load_label(sample, data)
        maps = {k: label_to_color(truth, palette_for(data, k)) for k in KINDS}
    else:  # COCO panoptic: segments outlined with the edge colour (A.2); truth is the semantic map
        ids = load_panoptic(sample)
        truth = panoptic_to_semantic(ids, sample.segments)
        maps = {k: panoptic_to_color(ids, sample.segments, palette_for(data, k)) for k in KINDS}
    if resolution is not None:
        h, w = truth.shape
        scale = resolution / min(h, w)
        size = (max(8, round(w * scale) // 8 * 8), max(8, round(h * scale) // 8 * 8))  # (width, height)
        truth = resize_nearest(truth, size)
        maps = {k: resize_nearest(m, size) for k, m in maps.items()}
    return truth, maps


def recovered(truth: np.ndarray, cmap: np.ndarray, data: str, kind: str, vote: bool) -> np.ndarray:
    """(H, W) bool: the pixels of a round-tripped colour map that decode to their own class."""
    palette = palette_for(data, kind)
    if data != "coco":
        return color_to_label(cmap, palette, vote=vote) == truth
    return panoptic_color_to_semantic(cmap, palette, vote=vote) == truth


def score(truth: np.ndarray, after: dict[str, np.ndarray], data: str) -> dict[str, dict[str, int]]:
    """{palette kind: {decoding: pixels right}} for one sample's round-tripped maps."""
    return {k: {dec: int(recovered(truth, after[k], data, k, dec == "vote").sum()) for dec in DECODINGS} for k in after}


def study(samples: list[Sample], data: str, roundtrip: Callable[[list[np.ndarray]], list[np.ndarray]],
          resolution: int | None = None, advance: Callable[[], None] = lambda: None) -> dict:
    """Runs the round trip on every sample's maps (both palettes in one call) and sums the pixels right.

    Returns {"samples", "pixels", "share": {kind: {decoding: share over all pixels}},
    "worst": {kind: {decoding: lowest share of one map}}, "per_sample": [{"id", "pixels", kind: {decoding: share}}]}."""
    per_sample = []
    for sample in samples:
        truth, maps = colour_maps(sample, data, resolution)
        after = dict(zip(maps, roundtrip(list(maps.values()))))
        right = score(truth, after, data)
        per_sample.append({"id": sample.id, "pixels": int(truth.size),
                           **{k: {d: n / truth.size for d, n in r.items()} for k, r in right.items()},
                           "_right": right})
        advance()
    pixels = sum(s["pixels"] for s in per_sample)
    share = {k: {d: sum(s["_right"][k][d] for s in per_sample) / max(pixels, 1) for d in DECODINGS} for k in KINDS}
    worst = {k: {d: min((s[k][d] for s in per_sample), default=float("nan")) for d in DECODINGS} for k in KINDS}
    for s in per_sample:
        del s["_right"]
    return {"samples": len(per_sample), "pixels": pixels, "share": share, "worst": worst, "per_sample": per_sample}


# ---------------------------------------------------------------- the VAE

def load_vae(vae: str, device: str):
    """AutoencoderKL from a hub id or folder: a VAE of its own (config.json at the top) or a whole
    pipeline's (its vae/ subfolder), in float32 (SDXL's VAE overflows in fp16)."""
    from diffusers import AutoencoderKL

    folder = Path(vae)
    if folder.is_dir():
        if (folder / "vae" / "config.json").is_file():
            tries = ["vae"]
        elif (folder / "config.json").is_file():
            tries = [None]
        else:
            raise SegGenError(f"--vae {vae}: neither a VAE folder (config.json) nor a pipeline folder (vae/config.json)")
    else:  # a hub id: a pipeline's (e.g. stabilityai/stable-diffusion-xl-base-1.0) or a VAE's own repository
        tries = ["vae", None]
    for i, sub in enumerate(tries):
        try:
            return AutoencoderKL.from_pretrained(vae, subfolder=sub, **SAFE).to(device).eval()
        except (OSError, ValueError) as e:
            if i == len(tries) - 1:
                raise SegGenError(f"--vae {vae}: cannot load an AutoencoderKL from it ({e}); pass a VAE or pipeline "
                                  "folder, or a hub id such as stabilityai/stable-diffusion-xl-base-1.0") from e


def vae_roundtrip(vae, device: str) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """maps -> maps after encode → decode (same size, uint8), as the generators' pictures come out
    (decoded in [-1, 1], clamped, rounded, as `common.synthesis.synth.sample_images`)."""
    import torch

    @torch.no_grad()
    def roundtrip(maps: list[np.ndarray]) -> list[np.ndarray]:
        x = torch.from_numpy(np.stack(maps)).permute(0, 3, 1, 2).float().to(device) / 127.5 - 1  # (B, 3, H, W)
        latents = vae.encode(x).latent_dist.mode()  # (B, 4, H/8, W/8); scaling_factor cancels out
        y = vae.decode(latents).sample
        y = ((y.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return list(y.permute(0, 2, 3, 1).cpu().numpy())

    return roundtrip


# ---------------------------------------------------------------- the command

def table(result: dict, title: str):
    from rich.table import Table

    t = Table(title=title)
    for col in ("palette", "nearest colour", "+ 3×3 vote", "worst map (vote)"):
        t.add_column(col)
    for k in KINDS:
        s, w = result["share"][k], result["worst"][k]
        t.add_row(k, f"{s['nearest']:.2%}", f"{s['vote']:.2%}", f"{w['vote']:.2%}")
    return t


def main(
    vae: Annotated[str, typer.Option(help="The VAE: a hub id or folder, of a VAE or of a whole pipeline (its vae/).")],
    data: Annotated[Data, typer.Option(help="Dataset whose annotations are painted.")] = Data.ade20k,
    data_root: Annotated[Path | None, typer.Option(help="Dataset folder (default $SEGGEN_DATASETS or ./datasets).")] = None,
    split: Annotated[Split, typer.Option(help="Split whose annotations are used.")] = Split.val,
    n: Annotated[int, typer.Option(min=1, help="Number of annotations (the first n by id).")] = DEFAULT_N,
    resolution: Annotated[int, typer.Option(min=8, help="Shorter side of the maps (nearest resize; sides cropped to multiples of 8).")] = DEFAULT_RESOLUTION,
    device: Annotated[str, typer.Option(help="torch device; default cuda if available, else cpu.")] = "",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the result (and per-map shares) as JSON here.")] = None,
) -> None:
    """Share of colour-map pixels that come back as their class after the VAE round trip (A.7, Fig. 12)."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    try:
        samples = read_dataset(data.value, data_root, split.value)[:n]
        if not samples:
            raise SegGenError(f"--data-root {data_root}: no {data.value} {split.value} annotations found")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_vae(vae, device)
        with Progress(TextColumn("[bold]round trip"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("", total=len(samples))
            result = study(samples, data.value, vae_roundtrip(model, device), resolution, lambda: bar.advance(task))
    except SegGenError as e:
        console.print(f"[red]error[/]: {e}")
        raise typer.Exit(2)
    result = {"vae": vae, "data": data.value, "split": split.value, "resolution": resolution, **result}
    Console().print(table(result, f"VAE round trip of {result['samples']} {data.value} {split.value} colour maps "
                                  f"({result['pixels']:,} px): share of pixels decoded to their class"))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    typer.run(main)
