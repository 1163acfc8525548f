"""The paper's Fig. 11 (A.6): training loss and validation mIoU along the iterations of several
train_seg.py runs, side by side, as one PNG.

    python -m common.report.curves RUN [RUN ...] --out fig11.png [--label NAME ...]

Reads each RUN/stats.jsonl (the loss every --log-every steps) and RUN/metrics_history.jsonl (train_seg.py
--eval-every: mIoU, or PQ / AP for COCO runs, which the right panel then shows). Iterations count across
phases (pretrain + finetune one after the other). Drawn with Pillow: matplotlib is not among the project's
dependencies, and two line charts do not need it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from PIL import Image, ImageDraw, ImageFont

from common import SegGenError
from common.runtime.cli import user_errors
from common.runtime.record import read_jsonl
from common.runtime.progress import console

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75), (227, 119, 194), (23, 190, 207)]
PANEL_W, PANEL_H, MARGIN = 560, 380, 64


def loss_curve(run: Path) -> list[tuple[int, float]]:
    """(iteration across phases, loss) from RUN/stats.jsonl."""
    points, offset, phase, last = [], 0, None, 0
    for rec in read_jsonl(run / "stats.jsonl"):
        if rec["phase"] != phase:  # a new phase starts after the previous one's last step
            offset, phase = offset + last, rec["phase"]
        last = rec["step"]
        if rec.get("loss") is not None and math.isfinite(rec["loss"]):
            points.append((offset + rec["step"], float(rec["loss"])))
    return points


def metric_curve(run: Path) -> tuple[str, list[tuple[int, float]]]:
    """(figure name, [(iteration, value in %)]) from RUN/metrics_history.jsonl: mIoU where measured, else PQ, else AP."""
    history = read_jsonl(run / "metrics_history.jsonl")
    name = next((k for k in ("mIoU", "PQ", "AP") if history and k in history[0]), "mIoU")
    return name, [(r["global_step"], 100 * float(r[name])) for r in history if r.get(name) is not None]


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering lo..hi."""
    if hi - lo < 1e-9:  # one value: a band around it
        pad = max(abs(lo) * 0.05, 0.5)
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if raw <= m * step)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def label(value: float, step: float) -> str:
    """A tick's text: thousands as k, else as many decimals as the tick step needs."""
    if abs(value) >= 1000 and step >= 100:
        return f"{value / 1000:g}k"
    return f"{value:.{max(0, -math.floor(math.log10(step)))}f}"


def panel(draw: ImageDraw.ImageDraw, x0: int, title: str, curves: list[tuple[str, list[tuple[int, float]]]], font) -> None:
    """One line chart at x offset x0: axes, ticks, one polyline (and dots) per curve."""
    left, top, right, bottom = x0 + MARGIN, MARGIN // 2 + 10, x0 + PANEL_W - 16, PANEL_H - MARGIN
    points = [p for _, c in curves for p in c]
    draw.text((left, 8), title, fill="black", font=font)
    draw.rectangle([left, top, right, bottom], outline="black")
    if not points:
        draw.text((left + 20, (top + bottom) // 2), "no data", fill="grey", font=font)
        return
    xs, ys = nice_ticks(0, max(x for x, _ in points)), nice_ticks(min(y for _, y in points), max(y for _, y in points))

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - xs[0]) / (xs[-1] - xs[0]) * (right - left), bottom - (y - ys[0]) / (ys[-1] - ys[0]) * (bottom - top))

    for x in xs:
        px = at(x, ys[0])[0]
        draw.line([px, bottom, px, bottom + 4], fill="black")
        draw.text((px - 10, bottom + 6), label(x, xs[1] - xs[0]), fill="black", font=font)
    for y in ys:
        py = at(xs[0], y)[1]
        draw.line([left - 4, py, left, py], fill="black")
        draw.line([left + 1, py, right - 1, py], fill=(230, 230, 230))
        draw.text((x0 + 4, py - 7), label(y, ys[1] - ys[0]), fill="black", font=font)
    draw.text(((left + right) // 2 - 20, bottom + 24), "iteration", fill="black", font=font)
    for k, (_, curve) in enumerate(curves):
        colour = COLOURS[k % len(COLOURS)]
        xy = [at(x, y) for x, y in curve]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for px, py in xy if len(xy) <= 40 else []:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)


def draw_curves(runs: list[Path], out: Path, labels: list[str] | None = None) -> Path:
    """Fig. 11: the training loss (left) and the validation figure (right) of each run, one colour per run."""
    labels = labels or [Path(r).name for r in runs]
    if len(labels) != len(runs):
        raise SegGenError(f"--label: {len(labels)} labels for {len(runs)} runs (give one per run, or none)")
    for run in runs:
        if not (Path(run) / "stats.jsonl").is_file():
            raise SegGenError(f"{run}: no stats.jsonl; pass train_seg.py run folders (--eval-every N adds the validation curve)")
    metric = next((metric_curve(Path(r))[0] for r in runs if metric_curve(Path(r))[1]), "mIoU")
    font = ImageFont.load_default(size=13)
    image = Image.new("RGB", (2 * PANEL_W, PANEL_H + 22 * len(runs) + 10), "white")
    draw = ImageDraw.Draw(image)
    panel(draw, 0, "training loss", [(n, loss_curve(Path(r))) for n, r in zip(labels, runs)], font)
    panel(draw, PANEL_W, f"validation {metric} (%)", [(n, metric_curve(Path(r))[1]) for n, r in zip(labels, runs)], font)
    for k, name in enumerate(labels):  # the legend, below both panels
        y = PANEL_H + 6 + 22 * k
        draw.line([MARGIN, y + 7, MARGIN + 30, y + 7], fill=COLOURS[k % len(COLOURS)], width=3)
        draw.text((MARGIN + 40, y), name, fill="black", font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out


def main(
    runs: Annotated[list[Path], typer.Argument(help="train_seg.py run folders (stats.jsonl; metrics_history.jsonl from --eval-every).")],
    out: Annotated[Path, typer.Option(help="The PNG to write.")],
    label: Annotated[list[str] | None, typer.Option(help="A run's name in the legend, once per run in order (default: the folder names).")] = None,
):
    """Fig. 11: training loss and validation mIoU of train_seg.py runs, as one PNG."""
    with user_errors(console):
        console.print(f"curves: {draw_curves(runs, out, label)}")


if __name__ == "__main__":
    typer.run(main)
