"""Colour -> label projection speed (paper appendix A.2, f_color→mask), in one run on one core:

- ours: a 2^24-entry lookup table of the nearest palette colour, one table read per pixel;
- naive: the full Euclidean argmin against every palette colour (numpy broadcasting);
- cKDTree: scipy's k-d tree nearest-neighbour query.

On a 768×768 colour map against the 151-colour ADE20K generation palette, degraded like a VAE round
trip so that pixels are not all exact palette colours. Checks that all three agree exactly (ties go
to the lower index in ours and in the argmin; the tree's tie-break may differ, so it is compared by
distance). Prints Mpx/s and the ratios.

    python bench/colormap.py [--size 768] [--repeat 20]
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as the goal says
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402

from common.masks.colormap import _nearest_lut, color_to_index, label_to_color, palette_for, resize_nearest  # noqa: E402
from common.data.datasets import load_label, read_dataset  # noqa: E402


def naive_argmin(cmap, colors):
    d = ((cmap[..., None, :].astype(np.int32) - colors.astype(np.int32)) ** 2).sum(-1)  # (H, W, K)
    return d.argmin(-1).astype(np.uint8)


def best_time(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=768)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()

    pal = palette_for("ade20k")
    root = Path(__file__).resolve().parents[1] / "tests" / "data" / "ade20k"
    label = resize_nearest(load_label(read_dataset("ade20k", root, "train")[0], "ade20k"), (args.size, args.size))
    noise = np.random.default_rng(0).normal(0, 8, label.shape + (3,))
    cmap = np.clip(label_to_color(label, pal) + noise, 0, 255).astype(np.uint8)
    mpx = cmap.shape[0] * cmap.shape[1] / 1e6

    t = time.perf_counter()
    _nearest_lut(pal.colors.tobytes())
    build = time.perf_counter() - t

    t_ours, ours = best_time(lambda: color_to_index(cmap, pal), args.repeat)
    t_naive, naive = best_time(lambda: naive_argmin(cmap, pal.colors), max(2, args.repeat // 10))
    tree = cKDTree(pal.colors.astype(np.float64))
    t_tree, (dist_tree, _) = best_time(lambda: tree.query(cmap.reshape(-1, 3).astype(np.float64)), max(2, args.repeat // 10))

    assert np.array_equal(ours, naive), "lookup table disagrees with the full argmin"
    d_ours = np.sqrt(((cmap.astype(np.float64) - pal.colors[ours]) ** 2).sum(-1)).reshape(-1)
    assert np.allclose(d_ours, dist_tree), "lookup table is farther than the k-d tree's nearest colour"

    print(f"{args.size}x{args.size} colour map, {len(pal.colors)}-colour palette, 1 thread; best of runs")
    print(f"  table build (once per palette): {build:.2f} s, {ours.nbytes + 4 * ours.size} B per call "
          f"({(ours.nbytes + 4 * ours.size) / ours.size:.0f} B/px: the RGBX key and the output)")
    for name, secs in (("ours (lookup table)", t_ours), ("naive argmin", t_naive), ("scipy cKDTree", t_tree)):
        print(f"  {name:<20} {mpx / secs:9.1f} Mpx/s   {secs * 1e3:8.2f} ms   ours is {secs / t_ours:6.1f}x faster")
    print("  exact: ours == naive argmin on every pixel; distances equal cKDTree's")


if __name__ == "__main__":
    main()
