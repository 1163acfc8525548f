"""The toy world's measurements for `reproduce.sh --preset toy` (issue 12); each writes one JSON file.

    python bench/toy.py text2mask --model T2M_OR_BASE --world WORLD --out WORK/eval/t2m-finetuned.json
    python bench/toy.py floor --base BASE --world WORLD --out WORK/eval/floor   # base images, caption only
    python bench/toy.py align --segmenter SEG/model --world WORLD --imgsyn DIR --floor WORK/eval/floor \
        --out WORK/eval/alignment.json

text2mask: draws one colour map per validation caption with the masksyn sampler settings (SDXL reference
Euler, legacy schedule, guidance 5), then measures what masksyn's decode measures: the share of pixels
farther than half the palette's closest pair of colours from every colour (masksyn's off-palette rule),
and the total variation distance, ½·Σ|p - q|, between the class-pixel histogram of the decoded maps and
that of the real validation labels. Run on the untrained base too: it was never asked for colour maps,
so it shows what fine-tuning taught.

floor / align: the alignment measure of FreestyleNet (Xue et al. 2023, §4.1), with the segmenter of
quality.py (its `predict`): one segmenter trained on all real data, dataset-level mIoU (intersections and
unions summed over images, as train_seg's evaluator) on (a) ImgSyn images against the labels they were
drawn for, (b) real validation images (the ceiling), (c) images the base draws from the same caption with
no map (the floor, written by `floor` as PNGs beside their source ids); with --vae BASE also (d) the real
validation images through the base's VAE and back: what a perfect generator behind that decoder could reach.
Every mIoU is also given over the stuff classes and over the thing classes alone (`_stuff_thing`): the
toy world's things (ball, box, tree, car, figure) are small, and the all-class mean can hide that a
segmenter sees none of them.

oracle: the synthetic folders of a perfect generator (issue 24), for Table 4's oracle rows: for the
same training labels ImgSyn draws from (the first --limit captioned sources in id order, as imgsyn.py),
the real image itself ("oracle-real"), the real image once through the base's VAE ("oracle-vae"), or
halved and doubled again, bilinear ("oracle-down2": a decoder that loses only resolution, no colours or
textures; the alignment segmenter scores such images between the VAE's and the real ones).
Both go through train_seg's synthetic path exactly as ImgSyn's folder does (JPEG, manifest, --p-aug).

    python bench/toy.py oracle --world WORLD --limit 48 --vae BASE --out WORK/synth   # oracle-real-toy/, oracle-vae-toy/
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.runtime import quiet  # noqa: E402  first: OMP_WAIT_POLICY before torch starts its threads
from common.runtime import threads  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import typer  # noqa: E402
from PIL import Image  # noqa: E402

from common.synthesis import synth  # noqa: E402
from common.masks.colormap import IGNORE, label_to_color, palette_for, semantic_classes  # noqa: E402
from common.data.datasets import load_label, read_dataset, read_synthetic  # noqa: E402
from common.diffusion.training import read_captions  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
SAMPLING = synth.edm.Settings.from_dict({"sampler": "euler", "schedule": "legacy", "guidance": 5.0, "S_churn": 0.0,
                                         "S_tmin": 0.0, "S_tmax": None, "S_noise": 1.0})  # masksyn's defaults
# --sampler: "euler" masksyn's default (the SDXL reference code's: Euler on the legacy DDPM schedule), "heun"
# the EDM paper's Heun on the Karras schedule (issue 12 item 5 compares them)
SAMPLERS = {"euler": SAMPLING, "heun": synth.edm.Settings.from_dict({**SAMPLING.to_dict(), "sampler": "heun", "schedule": "karras"})}
C = len(semantic_classes("toy"))


def _captions(world: Path, split: str, n: int):
    samples, texts = read_captions(world / f"captions_{split}.jsonl", read_dataset("toy", world, split))
    return samples[:n], texts[:n]


def _draw(gen, texts: list[str], steps: int, seed: int, batch: int = 16, control=None, sampling=SAMPLING) -> np.ndarray:
    """(N, 64, 64, 3) uint8 pictures, sample i seeded by (seed, i)."""
    out = []
    for i in range(0, len(texts), batch):
        t = texts[i:i + batch]
        cond, uncond = synth.encode(gen, t, (64, 64))
        gens = [torch.Generator().manual_seed(seed * 100003 + i + j) for j in range(len(t))]
        out.append(synth.sample_images(gen, cond, uncond, gens, (64, 64), steps, sampling))
    return np.concatenate(out)


def _histogram(labels) -> np.ndarray:
    """Share of labelled pixels per label value 1..C (0 = other/off-palette left out)."""
    h = sum(np.bincount(lab.ravel(), minlength=256)[1:C + 1] for lab in labels).astype(np.float64)
    return h / max(h.sum(), 1)


@app.command()
def text2mask(model: Annotated[str, typer.Option()], world: Annotated[Path, typer.Option()], out: Annotated[Path, typer.Option()],
              n: int = 64, steps: int = 20, seed: int = 0, sampler: str = "euler", guidance: float = 5.0) -> None:
    from masksyn import decode_mask

    palette = synth.model_palette(model, "toy")  # a fine-tuned model's palette.json, else the toy generation palette
    gen = synth.load_text2mask(model, "sdxl", torch.device("cpu"), torch.float32)
    samples, texts = _captions(world, "val", n)
    sampling = synth.edm.Settings.from_dict({**SAMPLERS[sampler].to_dict(), "guidance": guidance})
    cmaps = _draw(gen, texts, steps, seed, sampling=sampling)
    distance = palette.min_distance() / 2  # masksyn's off-palette rule
    decoded = [decode_mask(c, palette, distance) for c in cmaps]
    real = _histogram(load_label(s, "toy") for s in samples)
    fake = _histogram(d[0] for d in decoded)
    res = {"model": model, "captions": len(texts), "steps": steps, "sampler": sampler, "guidance": guidance, "off_palette": float(np.mean([d[1] for d in decoded])),
           "histogram_tv": float(0.5 * np.abs(real - fake).sum()), "histogram_real": real.round(4).tolist(),
           "histogram_generated": fake.round(4).tolist()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    pics = out.with_suffix("")
    pics.mkdir(exist_ok=True)
    for i, c in enumerate(cmaps[:8]):
        Image.fromarray(c).save(pics / f"{i:02d}.png")
    print(f"{model}: off-palette {res['off_palette']:.1%}, histogram TV {res['histogram_tv']:.3f} -> {out}")


@app.command()
def floor(base: Annotated[str, typer.Option()], world: Annotated[Path, typer.Option()], out: Annotated[Path, typer.Option()],
          n: int = 64, steps: int = 20, seed: int = 0) -> None:
    gen = synth.load_text2mask(base, "sdxl", torch.device("cpu"), torch.float32)
    samples, texts = _captions(world, "train", n)
    images = _draw(gen, texts, steps, seed)
    out.mkdir(parents=True, exist_ok=True)
    for s, im in zip(samples, images):
        Image.fromarray(im).save(out / f"{s.id}.png")
    print(f"floor: {len(images)} base images for their captions alone -> {out}")


def _stuff_thing(iou: np.ndarray, seen: np.ndarray) -> dict[str, float | None]:
    """{"miou", "stuff", "thing"} (%): the mean IoU over the classes seen, over all of them and over the
    stuff and the thing classes of the toy world alone (None when none of a kind was seen)."""
    from common.toy.world import TOY_CLASSES

    stuff = np.array([c["is_stuff"] for c in TOY_CLASSES])
    mean = lambda keep: float(100 * iou[keep].mean()) if keep.any() else None  # noqa: E731
    return {"miou": mean(seen), "stuff": mean(seen & stuff), "thing": mean(seen & ~stuff)}


def _miou(seg, pairs) -> dict[str, float | None]:
    """Dataset-level mIoU (%) over the classes present in labels or predictions: all, stuff, things."""
    from common.seg.labels import ade20k_train_ids
    from quality import predict

    inter, union = np.zeros(C), np.zeros(C)
    lut = ade20k_train_ids("toy")  # label value -> train id, 0 (other) -> IGNORE
    for image, label in pairs:
        gt = lut[label]
        pred = predict(seg, image, 64)[0].argmax(0).numpy()
        ok = gt != IGNORE
        for k in range(C):
            p, g = (pred == k) & ok, gt == k
            inter[k] += (p & g).sum()
            union[k] += (p | g).sum()
    seen = union > 0
    return _stuff_thing(np.where(seen, inter / np.maximum(union, 1), 0.0), seen)


@app.command()
def align(segmenter: Annotated[Path, typer.Option()], world: Annotated[Path, typer.Option()], imgsyn: Annotated[Path, typer.Option()],
          floor_dir: Annotated[Path, typer.Option("--floor")], out: Annotated[Path, typer.Option()],
          vae: Annotated[str, typer.Option(help="the base: adds its VAE's ceiling")] = "") -> None:
    from quality import load_segmenter

    seg = load_segmenter(segmenter, C, torch.device("cpu"))
    rgb = lambda p: np.asarray(Image.open(p).convert("RGB"))  # noqa: E731
    syn = read_synthetic(imgsyn)
    val = read_dataset("toy", world, "val")
    by_id = {s.id: s for s in read_dataset("toy", world, "train")}
    floor_pairs = [(rgb(p), load_label(by_id[p.stem], "toy")) for p in sorted(floor_dir.glob("*.png"))]
    val_images, val_labels = [rgb(s.image) for s in val], [load_label(s, "toy") for s in val]
    scores = {"imgsyn": _miou(seg, [(rgb(s.image), load_label(s, "toy")) for s in syn]),
              "ceiling": _miou(seg, zip(val_images, val_labels)),
              "floor": _miou(seg, floor_pairs)}
    if vae:  # the ceiling of any generator behind this VAE: real val images encoded and decoded once
        scores["vae_ceiling"] = _miou(seg, zip(_through_vae(vae, val_images), val_labels))
    # "imgsyn", "ceiling", ...: all-class mIoU (as before issue 24); "stuff"/"thing": {row: the mean over that kind}
    res = {k: v["miou"] for k, v in scores.items()}
    res.update({kind: {k: v[kind] for k, v in scores.items()} for kind in ("stuff", "thing")})
    res.update({"images": {"imgsyn": len(syn), "ceiling": len(val), "floor": len(floor_pairs)}, "segmenter": str(segmenter)})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    row = lambda k: f"{res[k]:.1f}% (stuff {_pct(res['stuff'][k])}, things {_pct(res['thing'][k])})"  # noqa: E731
    vc = f", the base VAE's round trip of real images {row('vae_ceiling')}" if vae else ""
    print(f"alignment mIoU: ImgSyn {row('imgsyn')}, ceiling {row('ceiling')}{vc}, floor {row('floor')} -> {out}")


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}%"


def _through_vae(vae: str, images: list[np.ndarray], batch: int = 32) -> list[np.ndarray]:
    """The images encoded (posterior mode) and decoded once by the VAE of `vae` (a pipeline folder)."""
    from common.diffusion.vae_roundtrip import load_vae, vae_roundtrip

    roundtrip = vae_roundtrip(load_vae(vae, "cpu"), "cpu")
    return [y for i in range(0, len(images), batch) for y in roundtrip(images[i:i + batch])]


@app.command()
def oracle(world: Annotated[Path, typer.Option()], out: Annotated[Path, typer.Option(help="writes OUT/oracle-{real,vae,down2}-toy")],
           limit: Annotated[int, typer.Option(min=1, help="the first N captioned training sources, as imgsyn.py --limit")],
           vae: Annotated[str, typer.Option(help="the base (pipeline folder) whose VAE the oracle-vae images go through")],
           captions: Annotated[Path | None, typer.Option(help="default WORLD/captions_train.jsonl")] = None) -> None:
    """A perfect generator's synthetic folders: real training images for their own labels, raw and through the VAE."""
    from common.synthesis.synth import save_jpeg, save_png

    samples, texts = read_captions(captions or world / "captions_train.jsonl", read_dataset("toy", world, "train"))
    chosen = sorted(zip(samples, texts), key=lambda st: st[0].id)[:limit]  # imgsyn.py: sorted(caption ids)[:limit]
    images = [np.asarray(Image.open(s.image).convert("RGB")) for s, _ in chosen]
    down2 = [np.asarray(Image.fromarray(x).resize((32, 32), Image.BILINEAR).resize((64, 64), Image.BILINEAR)) for x in images]
    for method, pictures in (("oracle-real", images), ("oracle-vae", _through_vae(vae, images)), ("oracle-down2", down2)):
        folder = out / f"{method}-toy"
        for sub in ("images", "annotations", "colormaps"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        lines = []
        for (s, text), picture in zip(chosen, pictures):
            sid = f"{s.id}_0"
            label = load_label(s, "toy")
            save_jpeg(folder / "images" / f"{sid}.jpg", picture)  # through the same JPEG as imgsyn.py's images
            save_png(folder / "annotations" / f"{sid}.png", label)
            save_png(folder / "colormaps" / f"{sid}.png", colormap(label))
            lines.append(json.dumps({"id": sid, "source_id": s.id, "k": 0, "method": method, "image": f"images/{sid}.jpg",
                                     "annotation": f"annotations/{sid}.png", "colormap": f"colormaps/{sid}.png",
                                     "caption": text, "seed": 0, "models": {"vae": vae} if method == "oracle-vae" else {}}))
        (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
        print(f"{method}: {len(lines)} samples -> {folder}")


def colormap(label: np.ndarray) -> np.ndarray:
    """A label map in the usual toy colours (for the contact sheet)."""
    return label_to_color(label, palette_for("toy", "usual"))


if __name__ == "__main__":
    quiet.quiet()
    threads.configure()  # SEGGEN_THREADS=1 when reproduce.sh runs it beside another stage
    torch.set_grad_enabled(False)
    app()
