"""Tables of bench/toy_quality.sh OUT: alignment and filtered share per folder, the rows (mean ± std mIoU over
seeds), the trained vs untrained Mask2Img alignment. Writes OUT/quality.json and OUT/quality.md.

    python bench/toy_quality_report.py OUT --n 50
"""
import json
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image

VARIANTS = {"real": "real only (`--strategy real`)", "plain": "aug, ImgSyn + MaskSyn",
            "filtered": "aug, + `--synthetic-filtered`", "hardness": "aug, + `--synthetic-sampling hardness`"}


def filtered_share(folder: Path) -> float | None:
    """Share of labelled pixels (value != 0, the toy/ADE20K ignore) that annotations_filtered/ set to 0."""
    if not (folder / "annotations_filtered").is_dir():
        return None
    labelled = ignored = 0
    for p in sorted((folder / "annotations").glob("*.png")):
        a = np.asarray(Image.open(p))
        b = np.asarray(Image.open(folder / "annotations_filtered" / p.name))
        labelled += int((a != 0).sum())
        ignored += int(((a != 0) & (b == 0)).sum())
    return ignored / labelled


def main(out: Path, n: int) -> None:
    res: dict = {"folders": {}, "rows": {}}
    for name in ("imgsyn-toy", "masksyn-toy", "imgsyn-untrained"):
        s = out / "synth" / name / "quality_summary.json"
        if s.exists():
            q = json.loads(s.read_text())
            res["folders"][name] = {"samples": q["samples"], "alignment": q["alignment"], "accuracy": q["accuracy"],
                                    "off_palette": q.get("off_palette"), "filtered_share": filtered_share(s.parent)}
    for v in VARIANTS:
        m = {int(p.parent.name.rsplit("-s", 1)[1]): json.loads(p.read_text())["single_scale"]["mIoU"] * 100
             for p in sorted((out / "runs").glob(f"n{n}-{v}-s*/metrics.json"))}
        if m:
            res["rows"][v] = {"seeds": m, "mean": statistics.mean(m.values()),
                              "std": statistics.stdev(m.values()) if len(m) > 1 else 0.0}
    (out / "quality.json").write_text(json.dumps(res, indent=1))
    md = ["| folder | samples | alignment mIoU mean / median (%) | pixel acc. mean (%) | pixels ignored by the filter (tolerance 1.25) |",
          "| --- | --- | --- | --- | --- |"]
    for name, f in res["folders"].items():
        share = "—" if f["filtered_share"] is None else f"{100 * f['filtered_share']:.1f}%"
        md.append(f"| {name} | {f['samples']} | {100 * f['alignment']['mean']:.1f} / {100 * f['alignment']['median']:.1f} "
                  f"| {100 * f['accuracy']['mean']:.1f} | {share} |")
    md += ["", f"| N = {n} real samples | mIoU % (mean ± std) | per seed |", "| --- | --- | --- |"]
    for v, r in res["rows"].items():
        seeds = ", ".join(f"s{s}: {x:.2f}" for s, x in sorted(r["seeds"].items()))
        md.append(f"| {VARIANTS[v]} | {r['mean']:.2f} ± {r['std']:.2f} (n={len(r['seeds'])}) | {seeds} |")
    (out / "quality.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[2] != "--n":
        sys.exit(__doc__)
    main(Path(sys.argv[1]), int(sys.argv[3]))
