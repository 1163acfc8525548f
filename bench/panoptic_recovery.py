"""Instance recovery from edge-coloured panoptic maps (issue 14; the open question of the paper's A.2).

On the real COCO panoptic samples in tests/data: render each annotation with panoptic_to_color, degrade
it like a VAE round trip (common.report.colormaps.degrade: JPEG q75 4:4:4, then Gaussian noise σ = 8/255), recover
it with color_to_panoptic and score PQ / SQ / RQ (common.seg.metrics.PanopticQuality, panopticapi's rules:
crowd regions absorb unmatched predictions) against the original annotation. Clean maps are the
ceiling. Each variant (edge width of the map, decoding options) is one row; "probe" is the plain
method of the issue (connected components, one segment per stuff category, edges to the nearest
segment, no vote, no barrier, no size floor).

    python bench/panoptic_recovery.py [--seeds 3] [--scale 1.0] [--picture bench/out/panoptic_recovery.png] [--tile 320]

--scale resizes the annotation (NEAREST) before rendering, e.g. 1.6 for COCO's 640 px at SDXL's 1024.
Degraded figures are averaged over --seeds noise draws (PQ pooled over all images and draws).
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from common.masks.colormap import (  # noqa: E402
    RECOVERY_BARRIER, RECOVERY_MIN_AREA, RECOVERY_TRUST, RECOVERY_VOTE, coco_categories, color_to_panoptic, palette_for,
    panoptic_to_color, resize_nearest,
)
from common.data.datasets import load_panoptic, read_dataset  # noqa: E402
from common.report.colormaps import degrade  # noqa: E402
from common.seg.metrics import PanopticQuality  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = dict(vote=RECOVERY_VOTE, barrier=RECOVERY_BARRIER, min_area=RECOVERY_MIN_AREA, trust=RECOVERY_TRUST)
# (name, edge width of panoptic_to_color (0: a one-sided 1 px line, see one_sided_color), color_to_panoptic options)
VARIANTS = [
    ("probe: CC + nearest edges", 1, dict(vote=False, barrier=0, min_area=1)),
    ("+ size floor 32 px", 1, dict(vote=False, barrier=0, min_area=32)),
    ("+ 3x3 vote = defaults", 1, DEFAULT),
    ("vote only if dist > 12", 1, {**DEFAULT, "trust": 12}),
    ("barrier 1", 1, {**DEFAULT, "barrier": 1}),
    ("barrier 2", 1, {**DEFAULT, "barrier": 2}),
    ("size floor 16", 1, {**DEFAULT, "min_area": 16}),
    ("size floor 64", 1, {**DEFAULT, "min_area": 64}),
    ("edge width 2, defaults", 2, DEFAULT),
    ("edge width 3, defaults", 3, DEFAULT),
    ("1 px one-sided edge, defaults", 0, DEFAULT),
]


def one_sided_color(ids: np.ndarray, segments: list[dict], pal) -> np.ndarray:
    """A rendering we do not ship, for comparison: only the pixel above / left of a boundary is edge,
    so lines are 1 px wide (still enough to keep 4-connected pieces apart)."""
    cmap = panoptic_to_color(ids, segments, pal, edge_width=0)
    edge = np.zeros(ids.shape, bool)
    edge[:-1] |= ids[:-1] != ids[1:]
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    cmap[edge] = pal.edge_color
    return cmap


def render(ids, segments, pal, edge_width: int) -> np.ndarray:
    return panoptic_to_color(ids, segments, pal, edge_width=edge_width) if edge_width else one_sided_color(ids, segments, pal)


def load_samples(scale: float):
    out = []
    for s in read_dataset("coco", ROOT / "tests" / "data" / "coco", "val"):
        ids = load_panoptic(s)
        if scale != 1:
            ids = resize_nearest(ids, (round(ids.shape[1] * scale), round(ids.shape[0] * scale)))
        out.append((s, ids))
    return out


def score(samples, edge_width: int, opts: dict, seeds: int) -> dict:
    cats = {c["id"]: bool(c["isthing"]) for c in coco_categories()}
    pal = palette_for("coco")
    clean, noisy = PanopticQuality(cats), PanopticQuality(cats)
    for s, ids in samples:
        cmap = render(ids, s.segments, pal, edge_width)
        clean.update(ids, s.segments, *color_to_panoptic(cmap, pal, **opts))
        for seed in range(seeds):
            noisy.update(ids, s.segments, *color_to_panoptic(degrade(cmap, np.random.default_rng(seed)), pal, **opts))
    return {"clean": clean.compute(), "degraded": noisy.compute()}


def picture(samples, path: Path, tile: int = 320) -> None:
    """Per sample: the map, the degraded map, the recovered instances (random colours), side by side."""
    pal, rng = palette_for("coco"), np.random.default_rng(0)
    rows = []
    for s, ids in samples:
        cmap = panoptic_to_color(ids, s.segments, pal)
        noisy = degrade(cmap, np.random.default_rng(0)).astype(np.uint8)
        seg, _ = color_to_panoptic(noisy, pal)
        colours = rng.integers(40, 256, (seg.max() + 1, 3), dtype=np.uint8)
        colours[0] = 0
        h = round(tile * ids.shape[0] / ids.shape[1])
        rows.append(np.concatenate([resize_nearest(a, (tile, h)) for a in (cmap, noisy, colours[seg])], 1))
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="noise draws per degraded map")
    ap.add_argument("--scale", type=float, default=1.0, help="resize annotations by this factor first")
    ap.add_argument("--picture", type=Path, default=ROOT / "bench" / "out" / "panoptic_recovery.png")
    ap.add_argument("--tile", type=int, default=320, help="width of each panel of the picture")
    args = ap.parse_args()
    samples = load_samples(args.scale)
    n_seg = sum(len(s.segments) for s, _ in samples)
    print(f"{len(samples)} real COCO val images, {n_seg} segments, scale {args.scale}, {args.seeds} noise draws; PQ/SQ/RQ in %")
    head = f"{'variant':28} {'edge':>4} | {'clean PQ':>8} {'PQth':>5} {'SQth':>5} {'RQth':>5} {'PQst':>5} {'SQst':>5} {'RQst':>5}" \
           f" | {'degr PQ':>8} {'PQth':>5} {'SQth':>5} {'RQth':>5} {'PQst':>5} {'SQst':>5} {'RQst':>5}"
    print(head)
    print("-" * len(head))
    for name, width, opts in VARIANTS:
        r = score(samples, width, opts, args.seeds)
        cells = []
        for key in ("clean", "degraded"):
            m = r[key]
            cells.append(" ".join([f"{100 * m['PQ']:8.1f}"] + [f"{100 * m[k + sfx]:5.1f}" for sfx in ("_th", "_st") for k in ("PQ", "SQ", "RQ")]))
        print(f"{name:28} {width or '1px':>4} | {cells[0]} | {cells[1]}")
    picture(samples, args.picture, args.tile)


if __name__ == "__main__":
    main()
