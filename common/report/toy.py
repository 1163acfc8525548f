"""The report of `reproduce.sh --preset toy`: WORK/report.md, WORK/results.json, WORK/contact_sheet.png.

Every figure comes from files the same run wrote: WORK/eval/*.json (bench/toy.py), the Table 4 runs'
metrics.json (WORK/runs/table4/n{N}-{synthetic}-s{seed}/), and WORK/stage_times.tsv.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common.masks.colormap import label_to_color, palette_for
from common.data.datasets import load_label, read_dataset, read_synthetic

# Table 4's rows: real only, the paper's three synthetic rows, the same from generators trained on the N real
# samples alone (--real-subset, the paper's 1,000-sample row; "-subset"), and a perfect generator's two oracle
# rows (issue 24: the real images of ImgSyn's labels, raw and through the base's VAE; bench/toy.py oracle).
SYNTHETIC = ("real", "imgsyn", "masksyn", "both", "imgsyn-subset", "masksyn-subset", "both-subset", "oracle-real", "oracle-vae", "oracle-down2")
LABEL = {"real": "real only", "imgsyn": "+ ImgSyn", "masksyn": "+ MaskSyn", "both": "+ both",
         "imgsyn-subset": "+ ImgSyn (generators on the N samples)", "masksyn-subset": "+ MaskSyn (generators on the N samples)",
         "both-subset": "+ both (generators on the N samples)",
         "oracle-real": "+ oracle-real (real images of ImgSyn's labels)", "oracle-vae": "+ oracle-VAE (the same through the base's VAE)",
         "oracle-down2": "+ oracle-down2 (the same halved and doubled)"}


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def stage_times(work: Path) -> dict[str, float]:
    times: dict[str, float] = {}
    if (work / "stage_times.tsv").is_file():
        for line in (work / "stage_times.tsv").read_text().splitlines():
            name, secs = line.split("\t")
            times[name] = times.get(name, 0.0) + float(secs)
    return times


def stuff_thing(per_class_iou: dict[str, float | None]) -> dict[str, float | None]:
    """{"stuff", "thing"}: mean IoU (%) over the toy world's stuff classes and over its things, from
    train_seg's per-class IoU (None: a class absent from the val labels)."""
    from common.toy.world import TOY_CLASSES

    out = {}
    for kind, want in (("stuff", True), ("thing", False)):
        v = [per_class_iou.get(c["name"]) for c in TOY_CLASSES if c["is_stuff"] == want]
        v = [x for x in v if x is not None]
        out[kind] = round(100 * sum(v) / len(v), 2) if v else None
    return out


def table4(work: Path, folder: str = "runs/table4") -> list[dict]:
    """One row per finished run WORK/FOLDER/n{N}-{synthetic}-s{seed}: mIoU and its stuff / thing means (%)."""
    rows = []
    for run in sorted((work / folder).glob("n*-*-s*")):
        m = re.fullmatch(r"n(\d+)-([\w-]+)-s(\d+)", run.name)
        metrics = _json(run / "metrics.json")
        if m and metrics:
            single = metrics["single_scale"]
            rows.append({"real_samples": int(m[1]), "synthetic": m[2], "seed": int(m[3]),
                         "miou": round(100 * single["mIoU"], 2), **stuff_thing(single.get("per_class_iou", {}))})
    return rows


def base_record(work: Path) -> dict:
    """toybase.json of the base the run fine-tuned: the Text2Mask trainer's --pretrained (the shipped
    common/assets/toybase, relative to the repository, or WORK/base built by --build-base)."""
    opts = _json(work / "runs/text2mask-toy/options.json") or {}
    base = Path(opts.get("pretrained") or work / "base")
    for folder in (base, Path(__file__).resolve().parents[2] / base):
        if (folder / "toybase.json").is_file():
            return _json(folder / "toybase.json")
    return {}


def results(work: Path) -> dict:
    ft, base = _json(work / "eval/t2m-finetuned.json"), _json(work / "eval/t2m-base.json")
    align = _json(work / "eval/alignment.json")
    res = {
        "text2mask_off_palette": {"finetuned": ft and ft["off_palette"], "base": base and base["off_palette"]},
        "text2mask_histogram_tv": {"finetuned": ft and ft["histogram_tv"], "base": base and base["histogram_tv"]},
        "alignment_miou": {k: align and round(align[k], 2) for k in ("imgsyn", "ceiling", "floor")},
        # the same over the stuff classes and over the things alone (bench/toy.py align, issue 24)
        **{f"alignment_{kind}": {k: v if v is None else round(v, 2) for k, v in align[kind].items()}
           for kind in ("stuff", "thing") if align and kind in align},
        # the segmenter on real val images through the base's VAE and back: a perfect generator's ceiling
        "alignment_vae_ceiling": align and align.get("vae_ceiling") and round(align["vae_ceiling"], 2),
        "table4": table4(work),
        "base_vae": {k: v for k, v in base_record(work).items() if k in ("vae_reconstruction_val", "vae_colormaps_val")},
        "masksyn_tally": {k: v for k, v in (_json(work / "synth/masksyn-toy/tally.json") or {}).items()
                          if k in ("attempts", "accepted", "rejected")},
        "stage_seconds": {k: round(v, 1) for k, v in stage_times(work).items()},
    }
    a = res["alignment_miou"]
    if None not in a.values() and a["ceiling"] != a["floor"]:  # share of the way from floor to ceiling
        res["alignment_progress"] = round((a["imgsyn"] - a["floor"]) / (a["ceiling"] - a["floor"]), 3)
    return res


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def _paired(rows: list[dict], n: int, kind: str) -> str:
    """Mean ± std over seeds of (row - real only) with the same seed: the same N real samples (train_seg's
    --max-real-samples draws them from --seed), so the subset's luck cancels."""
    by_seed = lambda k: {r["seed"]: r["miou"] for r in rows if r["real_samples"] == n and r["synthetic"] == k}  # noqa: E731
    real, row = by_seed("real"), by_seed(kind)
    d = [row[s] - real[s] for s in sorted(row) if s in real]
    if kind == "real" or not d:
        return "—"
    return f"{statistics.mean(d):+.2f} ± {statistics.stdev(d):.2f}" if len(d) > 1 else f"{d[0]:+.2f}"


def table4_lines(rows: list[dict], title: str) -> list[str]:
    """Table 4 as markdown: one line per row kind, for each N the mIoU and its stuff / thing means (mean ± std
    over seeds, n = seeds), then each synthetic row's gain over real only as a share of + oracle-VAE's."""
    if not rows:
        return []
    ns = sorted({r["real_samples"] for r in rows})
    present = {r["synthetic"] for r in rows}
    kinds = [k for k in SYNTHETIC if k in present] + sorted(present - set(SYNTHETIC))  # knobs' rows (bench/toy_table4.sh) last
    cell = lambda n, k, key: [r[key] for r in rows if r["real_samples"] == n and r["synthetic"] == k and r.get(key) is not None]  # noqa: E731
    lines = ["", title, "", "| row | " + " | ".join(f"N = {n}: mIoU | Δ vs real only, same seed | stuff | things" for n in ns) + " |",
             "| --- |" + " --- | --- | --- | --- |" * len(ns)]
    for k in kinds:
        cells = []
        for n in ns:
            v = cell(n, k, "miou")
            cells += [f"{_mean_std(v)} (n={len(v)})" if v else "—", _paired(rows, n, k)]
            cells += [_mean_std(cell(n, k, key)) if cell(n, k, key) else "—" for key in ("stuff", "thing")]
        lines.append(f"| {LABEL.get(k, k)} | " + " | ".join(cells) + " |")
    shares = []
    for n in ns:
        real = cell(n, "real", "miou")
        for ref in ("oracle-vae", "oracle-real"):
            oracle = cell(n, ref, "miou")
            if not (real and oracle) or statistics.mean(oracle) == statistics.mean(real):
                continue
            gain = statistics.mean(oracle) - statistics.mean(real)
            spread = _paired(rows, n, ref)
            if gain <= 0 or ("±" in spread and gain <= float(spread.split("±")[1])):
                shares.append(f"N = {n}: {LABEL[ref]} {spread} over real only (same seed): no gain beyond the seeds' spread, no share")
                continue
            parts = [f"{LABEL.get(k, k)} {(statistics.mean(cell(n, k, 'miou')) - statistics.mean(real)) / gain:+.0%}"
                     for k in kinds if k not in ("real", ref) and not k.startswith("oracle") and cell(n, k, "miou")]
            shares.append(f"N = {n}: {LABEL[ref]} {gain:+.2f} over real only; as a share of it: " + ", ".join(parts))
    if shares:
        lines += ["", "Each row's gain over real only as a share of an oracle's (a perfect generator behind this decoder; the real images):", ""]
        lines += [f"- {x}" for x in shares]
    return lines


def write_toy_report(work: Path) -> Path:
    work = Path(work)
    res = results(work)
    (work / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    fmt = lambda v, pct=False: "—" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.3f}")  # noqa: E731
    off, tv, a = res["text2mask_off_palette"], res["text2mask_histogram_tv"], res["alignment_miou"]
    lines = ["# SegGen on the toy world (`reproduce.sh --preset toy`)", "",
             "Every model here was trained on 2 CPU cores on the procedural toy world (common/toy/world.py): the base",
             "(common/toy/base.py; the one shipped in common/assets/toybase unless --build-base built it in this run),",
             "then, in this run, Text2Mask, Mask2Img and the HRNet-small segmenters. The figures show whether the",
             "chain learns; the paper's own numbers need SDXL and ADE20K/COCO at the paper's scale.", "",
             "## Text2Mask quality (validation captions, masksyn's sampler)", "",
             "| model | off-palette pixels | class histogram distance (TV, 0..1) |", "| --- | --- | --- |",
             f"| fine-tuned Text2Mask | {fmt(off['finetuned'], True)} | {fmt(tv['finetuned'])} |",
             f"| untrained base | {fmt(off['base'], True)} | {fmt(tv['base'])} |", ""]
    maps = res["base_vae"].get("vae_colormaps_val")
    if maps:
        lines += [f"The base's VAE alone, encoding and decoding real validation colour maps, leaves "
                  f"{fmt(maps.get('off_palette'), True)} of pixels off the palette and reads back "
                  f"{fmt(maps.get('class_right'), True)} as their class (toybase.json): Text2Mask cannot do better.", ""]
    tally = res["masksyn_tally"]
    if tally:
        lines += [f"MaskSyn kept {tally.get('accepted')} of {tally.get('attempts')} drawn masks (rejected by rule: "
                  f"{tally.get('rejected')}; masksyn's --max-off-palette rule).", ""]
    lines += [
             "## Mask2Img alignment (FreestyleNet's measure: a segmenter trained on all real data, mIoU %)", "",
             "| images | mIoU (%) |", "| --- | --- |",
             f"| real validation images (ceiling) | {fmt(a['ceiling'] and a['ceiling'] / 100, True)} |"]
    vc = res["alignment_vae_ceiling"]
    if vc is not None:
        lines += [f"| real validation images through the base's VAE and back (a perfect generator's ceiling) | {fmt(vc / 100, True)} |"]
    lines += [f"| ImgSyn images vs the labels they were drawn for | {fmt(a['imgsyn'] and a['imgsyn'] / 100, True)} |",
              f"| base images for the caption alone (floor) | {fmt(a['floor'] and a['floor'] / 100, True)} |"]
    if "alignment_stuff" in res:
        names = {"ceiling": "real validation images (ceiling)", "vae_ceiling": "through the base's VAE",
                 "imgsyn": "ImgSyn images", "floor": "caption only (floor)"}
        st, th = res["alignment_stuff"], res["alignment_thing"]
        lines += ["", "The same over the stuff classes and over the things alone (mIoU %):", "",
                  "| images | stuff | things |", "| --- | --- | --- |"]
        lines += [f"| {names[k]} | {_num(st.get(k))} | {_num(th.get(k))} |" for k in names if k in st]
    if "alignment_progress" in res:
        lines += ["", f"ImgSyn sits {100 * res['alignment_progress']:.0f}% of the way from the floor to the ceiling"
                  + (f" ({100 * (a['imgsyn'] - a['floor']) / (vc - a['floor']):.0f}% of the way to the VAE's ceiling)."
                     if vc is not None and vc != a["floor"] else ".")]
    lines += table4_lines(res["table4"], "## Table 4 at toy scale (HRNet-small, `--strategy aug --p-aug 0.6`, mIoU % on "
                          "the toy val split, mean ± std over seeds)")
    times = res["stage_seconds"]
    if times:
        lines += ["", "## Stage times (s)", "", "| stage | seconds |", "| --- | --- |"]
        lines += [f"| {k} | {v:.1f} |" for k, v in times.items()]
        lines += [f"| **total** | {sum(times.values()):.1f} |"]
    sheet = contact_sheet(work)
    if sheet:
        lines += ["", "## Contact sheet", "", f"![contact sheet]({sheet.name})", "",
                  "Rows: real (image, map) · MaskSyn (learned map, image) · ImgSyn (real map, learned image) · "
                  "Text2Mask of the fine-tuned model · of the untrained base · base images for the caption alone (floor)."]
    out = work / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def contact_sheet(work: Path, k: int = 6, cell: int = 96) -> Path | None:
    """Rows of k pairs/pictures, each labelled; missing rows are left out."""
    usual = palette_for("toy", "usual")
    rows: list[tuple[str, list[np.ndarray]]] = []
    rgb = lambda p: np.asarray(Image.open(p).convert("RGB"))  # noqa: E731
    try:
        val = read_dataset("toy", work / "world", "val")[:k // 2]
        rows.append(("real: image | map", [x for s in val for x in (rgb(s.image), label_to_color(load_label(s, "toy"), usual))]))
    except Exception:  # noqa: BLE001 - no world: no row
        pass
    for name, title in (("masksyn", "MaskSyn: learned map | image"), ("imgsyn", "ImgSyn: real map | learned image")):
        folder = work / f"synth/{name}-toy"
        if (folder / "manifest.jsonl").is_file() and (folder / "manifest.jsonl").stat().st_size:  # MaskSyn may keep none
            syn = read_synthetic(folder)[:k // 2]
            rows.append((title, [x for s in syn for x in (label_to_color(load_label(s, "toy"), usual), rgb(s.image))]))
    for sub, title in (("t2m-finetuned", "Text2Mask maps (fine-tuned)"), ("t2m-base", "the same sampled from the base"),
                       ("floor", "base images, caption only (floor)")):
        pics = sorted((work / "eval" / sub).glob("*.png"))[:k]
        if pics:
            rows.append((title, [rgb(p) for p in pics]))
    if not rows:
        return None
    head = 14
    width = cell * max(len(r[1]) for r in rows)
    sheet = Image.new("RGB", (width, len(rows) * (cell + head)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (title, pics) in enumerate(rows):
        y = i * (cell + head)
        draw.text((2, y + 1), title, fill="black")
        for j, p in enumerate(pics):
            sheet.paste(Image.fromarray(p).resize((cell, cell), Image.NEAREST), (j * cell, y + head))
    path = work / "contact_sheet.png"
    sheet.save(path)
    return path
