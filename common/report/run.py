"""The report of a reproduce.sh run: WORK/report.md and WORK/contact_sheet.png.

    python -m common.report.run WORK [--data ade20k] [--preset tiny]

report.md: one row per stage (what it read, what it wrote, seconds, samples/s) from the stage times
reproduce.sh logged and the manifests the stages wrote, then the two Mask2Former evaluations side by
side. contact_sheet.png: the MaskSyn and ImgSyn previews (caption, colour map, image, overlay: the
paper's Fig. 3 / Fig. 4) one above the other.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from common.data.manifest import manifest_files, read_manifest


def count(path: Path) -> int | None:
    return len(read_manifest(path)) if manifest_files(path) else None


def stage_rows(work: Path, data: str) -> list[tuple[str, str, str, int | None]]:
    """(stage, reads, writes, samples written) in pipeline order."""
    seg = "aug" if data == "ade20k" else "pretrain"
    cap, t2m, m2i = f"captions/{data}_train.jsonl", f"runs/text2mask-{data}", f"runs/mask2img-{data}"
    ms, im = f"synth/masksyn-{data}", f"synth/imgsyn-{data}"
    rows = [
        ("caption", "real images", cap, count(work / cap)),
        ("train-text2mask", f"{cap} + real labels", f"{t2m}/ (diffusers pipeline)", None),
        ("train-mask2img", f"{cap} + real labels + images", f"{m2i}/ (ControlNet)", None),
        ("masksyn", f"{cap}, {t2m}, {m2i}", f"{ms}/", count(work / ms)),
        ("imgsyn", f"real labels, {cap}, {m2i}", f"{im}/", count(work / im)),
        ("seg-real", "real train split", f"runs/seg-{data}-real/metrics.json", None),
        (f"seg-{seg}", f"real + {ms}, {im}", f"runs/seg-{data}-{seg}/metrics.json", None),
    ]
    return [r for r in rows if data == "ade20k" or r[0] != "masksyn"]


def write_report(work: Path, data: str, preset: str) -> Path:
    times = {}
    if (work / "stage_times.tsv").is_file():
        for line in (work / "stage_times.tsv").read_text().splitlines():
            name, secs = line.split("\t")
            times[name] = times.get(name, 0.0) + float(secs)
    lines = [f"# SegGen run ({preset} preset, {data})", ""]
    if preset == "tiny":
        lines += ["**These models are tiny and randomly initialised.** The numbers below prove that every stage",
                  "reads what the previous one wrote and writes what the next one reads; they say nothing about",
                  "the paper's gains, which need the real SDXL, BLIP-2 and Mask2Former at the paper's scale.", ""]
    lines += ["| stage | reads | writes | samples | seconds | samples/s |", "| --- | --- | --- | --- | --- | --- |"]
    for name, reads, writes, n in stage_rows(work, data):
        secs = times.get(name)
        rate = f"{n / secs:.2f}" if n and secs else "—"
        lines.append(f"| {name} | {reads} | {writes} | {n if n is not None else '—'} | "
                     f"{f'{secs:.1f}' if secs is not None else '—'} | {rate} |")
    seg = "aug" if data == "ade20k" else "pretrain"
    evals = {}
    for strategy in ("real", seg):
        path = work / f"runs/seg-{data}-{strategy}/metrics.json"
        if path.is_file():
            evals[strategy] = json.loads(path.read_text())["single_scale"]
    if evals:
        lines += ["", "## Mask2Former on the val split, single scale", "",
                  "| | " + " | ".join(evals) + " |", "| --- |" + " --- |" * len(evals)]
        for key, label in (("mIoU", "mIoU (%)"), ("pixel_accuracy", "pixel accuracy (%)"), ("mean_accuracy", "mean accuracy (%)")):
            lines.append(f"| {label} | " + " | ".join(f"{100 * e[key]:.2f}" for e in evals.values()) + " |")
    sheet = contact_sheet(work, data)
    if sheet:
        lines += ["", f"Contact sheet (MaskSyn above ImgSyn; caption, colour map, image, overlay): `{sheet.name}`"]
    out = work / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def contact_sheet(work: Path, data: str) -> Path | None:
    previews = [Image.open(p).convert("RGB") for p in (work / f"synth/masksyn-{data}/preview.png",
                                                        work / f"synth/imgsyn-{data}/preview.png") if p.is_file()]
    if not previews:
        return None
    sheet = Image.new("RGB", (max(p.width for p in previews), sum(p.height for p in previews)), "white")
    y = 0
    for p in previews:
        sheet.paste(p, (0, y))
        y += p.height
    sheet.save(work / "contact_sheet.png")
    return work / "contact_sheet.png"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument("--data", default="ade20k", choices=("ade20k", "coco", "toy"))
    ap.add_argument("--preset", default="paper", choices=("paper", "tiny", "toy"))
    args = ap.parse_args()
    if args.preset == "toy":
        from common.report.toy import write_toy_report

        print(f"report: {write_toy_report(args.work)}")
    else:
        print(f"report: {write_report(args.work, args.data, args.preset)}")
