"""A procedural segmentation world small enough to learn on 2 CPU cores (issue 12).

    python -m common.toy.world OUT --train 2000 --val 200 --seed 0

Writes the ADE20K layout, so `read_dataset("toy", OUT, split)` reads it with the ADE20K reader:

    OUT/images/{training,validation}/toy_{train,val}_{i:08d}.png       RGB, 64×64
    OUT/annotations/{training,validation}/toy_{train,val}_{i:08d}.png  8-bit labels, 0 = other/ignore
    OUT/captions_{train,val}.jsonl   the world's own captions, in caption.py's line format
    OUT/classes.json                 TOY_CLASSES, in the format of common/assets/ade20k_classes.json

Scenes: a top (sky, wall, or a wall under a sky) above a wavy horizon at a random height, a ground
(grass, sand or water), sometimes a road band or a second ground, and 0-4 things (ball, box, tree, car,
figure) drawn far to near, so nearer things occlude farther ones and are larger. A thing's colour is
drawn from a wide range (balls, boxes, cars and shirts take any hue; trees are green or autumnal),
so its class is told by its shape and texture, not by one colour. Stuff has textures too (bricks,
ripples, grass streaks, clouds). Every sample has its own generator seeded by (seed, split, index):
the same seed gives the same bytes, and sample i does not depend on how many were asked for.
"""

from __future__ import annotations

import colorsys
import json
import shutil
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from common import SegGenError
from common.masks.colormap import semantic_classes

SIZE = 64  # image side, pixels
MAX_CAPTION = 75  # characters: the tiny CLIP tokenizer of common/models/tiny.py reads one token per character, 77 at most

# The class table ships beside ADE20K's, in its format (png_value 1.., train_id = png_value - 1; 0 = other,
# ignored; rgb: a colour for pictures people look at, the "usual" palette), so that colour maps need no toy code.
TOY_CLASSES = semantic_classes("toy")  # common/assets/toy_classes.json
V = {c["name"]: c["png_value"] for c in TOY_CLASSES}  # name -> label value
THINGS = ("ball", "box", "tree", "car", "figure")
_SPLIT_DIR = {"train": "training", "val": "validation"}
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)  # (H, W) pixel centres' rows and columns


# ---------------------------------------------------------------- textures

def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0), 1), min(max(v, 0), 1)), np.float32)


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """(SIZE, SIZE) value noise in [0, 1]: a (cells+1)² random grid, bilinearly interpolated."""
    grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
    t = np.linspace(0, cells, SIZE, dtype=np.float32)
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]  # (SIZE, cells+1)
    return rows[:, i] * (1 - f)[None] + rows[:, i + 1] * f[None]


def _fill(img: np.ndarray, mask: np.ndarray, color: np.ndarray, shade: np.ndarray | float = 1.0) -> None:
    """img[mask] = color × shade (shade: a (H, W) brightness field or a number)."""
    shade = np.broadcast_to(np.asarray(shade, np.float32), mask.shape)
    img[mask] = color[None] * shade[mask][:, None]


def _stuff(rng: np.random.Generator, name: str, img: np.ndarray, mask: np.ndarray) -> None:
    """Paint a stuff region with its colour range and texture."""
    n = rng.standard_normal((SIZE, SIZE), dtype=np.float32)
    if name == "sky":
        dusk = rng.random() < 0.2
        top = _hsv(rng.uniform(0.0, 0.1) if dusk else rng.uniform(0.53, 0.65), rng.uniform(0.3, 0.7), rng.uniform(0.75, 1.0))
        low = np.minimum(top + rng.uniform(0.1, 0.3), 1.0)
        ramp = (_YY / SIZE)[..., None]
        sky = top * (1 - ramp) + low * ramp
        clouds = np.clip((_smooth_noise(rng, 4) - rng.uniform(0.5, 0.8)) * 4, 0, 1)[..., None]  # white puffs
        img[mask] = (sky * (1 - clouds) + clouds * 0.97)[mask]
    elif name == "wall":  # bricks: mortar every `row` rows, joints offset by half a brick on alternate rows
        color = _hsv(rng.uniform(0.0, 0.1), rng.uniform(0.0, 0.6), rng.uniform(0.4, 0.8))
        row, brick = int(rng.integers(4, 8)), int(rng.integers(7, 13))
        course = (_YY // row).astype(int)
        mortar = (_YY % row < 1) | ((_XX + (course % 2) * brick / 2) % brick < 1)
        shade = 0.9 + 0.1 * n
        shade[mortar] = 1.35
        _fill(img, mask, color, shade)
    elif name == "grass":  # streaks: noise constant along short vertical runs
        color = _hsv(rng.uniform(0.2, 0.38), rng.uniform(0.5, 0.9), rng.uniform(0.35, 0.7))
        streak = np.repeat(rng.standard_normal((SIZE // 3 + 1, SIZE), dtype=np.float32), 3, 0)[:SIZE]
        _fill(img, mask, color, 1 + 0.15 * streak + 0.05 * n)
    elif name == "sand":
        color = _hsv(rng.uniform(0.09, 0.15), rng.uniform(0.25, 0.55), rng.uniform(0.7, 0.92))
        _fill(img, mask, color, 1 + 0.08 * n + 0.1 * (_smooth_noise(rng, 3) - 0.5))
    elif name == "water":  # horizontal ripples
        color = _hsv(rng.uniform(0.48, 0.63), rng.uniform(0.5, 0.9), rng.uniform(0.4, 0.8))
        ripples = np.sin(_YY * rng.uniform(1.0, 2.2) + 2 * _smooth_noise(rng, 3))
        _fill(img, mask, color, 1 + 0.18 * ripples + 0.03 * n)
    elif name == "road":  # asphalt with a dashed lane marking along the band (drawn by the caller's band)
        color = _hsv(0, 0, rng.uniform(0.22, 0.5))
        _fill(img, mask, color, 1 + 0.1 * n)
    else:
        raise ValueError(name)


# ---------------------------------------------------------------- things

def _disk(cx, cy, r):
    return (_XX - cx) ** 2 + (_YY - cy) ** 2 <= r * r


def _rect(x0, y0, x1, y1):
    return (_XX >= x0) & (_XX < x1) & (_YY >= y0) & (_YY < y1)


def _any_color(rng: np.random.Generator) -> tuple[float, float, float]:
    """A colour from the whole hue circle, often saturated, sometimes white/grey/black."""
    if rng.random() < 0.15:
        return 0.0, 0.0, float(rng.choice([0.15, 0.5, 0.9]))
    return float(rng.random()), float(rng.uniform(0.5, 1.0)), float(rng.uniform(0.5, 1.0))


def _thing(rng: np.random.Generator, kind: str, x: float, y: float, s: float, img: np.ndarray, label: np.ndarray) -> tuple | None:
    """Draw one thing standing at (x, y) (bottom centre), s = its scale; returns its caption colour (h, s, v) or None."""
    n = rng.standard_normal((SIZE, SIZE), dtype=np.float32)
    parts = []  # (mask, colour, shade) painted in order; the union is the thing's label
    hsv = None
    if kind == "ball":  # a shaded disk, lit from the top left; sometimes striped
        r = s * rng.uniform(4, 8)
        cx, cy = x, y - r
        hsv = _any_color(rng)
        lx, ly = cx - 0.4 * r, cy - 0.4 * r
        shade = 1.05 - 0.55 * np.sqrt((_XX - lx) ** 2 + (_YY - ly) ** 2) / (1.6 * r)
        parts.append((_disk(cx, cy, r), _hsv(*hsv), shade))
        if rng.random() < 0.35:
            stripes = (np.floor(np.arctan2(_YY - cy, _XX - cx) / (np.pi / 3)) % 2 == 0) & _disk(cx, cy, r)
            parts.append((stripes, _hsv(0, 0, 0.95), shade))
        parts.append((_disk(lx, ly, max(r * 0.18, 0.6)), _hsv(0, 0, 1), 1.0))
    elif kind == "box":  # a crate seen from the front and a little above: front face, top face, tape
        w = s * rng.uniform(8, 16)
        h = w * rng.uniform(0.7, 1.1)
        d = w * 0.3  # depth of the top face
        x0, y1 = x - w / 2, y
        hsv = (float(rng.uniform(0.05, 0.11)), float(rng.uniform(0.4, 0.7)), float(rng.uniform(0.45, 0.75))) if rng.random() < 0.4 else _any_color(rng)
        c = _hsv(*hsv)
        top = (_YY >= y1 - h - d) & (_YY < y1 - h) & (_XX >= x0 + (y1 - h - _YY)) & (_XX < x0 + w + (y1 - h - _YY))
        parts += [(_rect(x0, y1 - h, x0 + w, y1), c, 0.85 + 0.04 * n), (top, c, 1.2),
                  (_rect(x - max(w * 0.06, 0.6), y1 - h, x + max(w * 0.06, 0.6), y1), c, 1.45),
                  (_rect(x0, y1 - h, x0 + w, y1) & ~_rect(x0 + 1, y1 - h + 1, x0 + w - 1, y1 - 1), c, 0.5)]
    elif kind == "tree":  # a brown trunk under a leafy canopy (round cluster or conifer triangle)
        hgt = s * rng.uniform(16, 30)
        tw = max(hgt * 0.1, 1.2)
        trunk_h = hgt * rng.uniform(0.3, 0.45)
        parts.append((_rect(x - tw / 2, y - trunk_h, x + tw / 2, y), _hsv(rng.uniform(0.04, 0.1), 0.6, rng.uniform(0.25, 0.45)), 1 + 0.1 * n))
        autumn = rng.random() < 0.3
        leaf = _hsv(rng.uniform(0.0, 0.12) if autumn else rng.uniform(0.22, 0.42), rng.uniform(0.6, 0.95), rng.uniform(0.3, 0.75))
        speckle = 1 + 0.3 * n  # leaf texture: strong per-pixel variation
        top = y - hgt
        if rng.random() < 0.5:
            r = (hgt - trunk_h) * 0.45
            canopy = _disk(x, top + r, r) | _disk(x - r * 0.6, top + r * 1.4, r * 0.75) | _disk(x + r * 0.6, top + r * 1.4, r * 0.75)
        else:
            frac = np.clip((_YY - top) / (hgt - trunk_h * 0.6), 0, 1)  # 0 at the tip, 1 at the base
            canopy = (_YY >= top) & (_YY < y - trunk_h * 0.6) & (np.abs(_XX - x) <= frac * hgt * 0.33)
        parts.append((canopy, leaf, speckle))
    elif kind == "car":  # body, cabin with windows, two dark wheels
        w = s * rng.uniform(14, 26)
        r = w * 0.12
        hsv = _any_color(rng)
        c = _hsv(*hsv)
        body_top = y - r - w * 0.25
        cab_x0, cab_x1, cab_top = x - w * 0.3, x + w * 0.22, body_top - w * 0.2
        slope = (_YY - cab_top) * 0.6
        cabin = (_YY >= cab_top) & (_YY < body_top) & (_XX >= cab_x0 - slope) & (_XX < cab_x1 + slope)
        windows = cabin & (_YY >= cab_top + 1) & (_YY < body_top - 0.5) & (np.abs(_XX - (cab_x0 + cab_x1) / 2) > 0.6)
        windows &= (_XX >= cab_x0 - slope + 1) & (_XX < cab_x1 + slope - 1)
        parts += [(_rect(x - w / 2, body_top, x + w / 2, y - r * 0.6), c, 1 - 0.25 * (_YY - body_top) / (w * 0.25 + r)),
                  (cabin, c, 0.95), (windows, _hsv(0.55, 0.2, 0.85), 1 - 0.15 * (_YY - cab_top) / (w * 0.2 + 1)),
                  (_disk(x - w * 0.3, y - r, r), _hsv(0, 0, 0.1), 1.0), (_disk(x + w * 0.3, y - r, r), _hsv(0, 0, 0.1), 1.0)]
    elif kind == "figure":  # head, shirt with arms, legs
        hgt = s * rng.uniform(12, 22)
        shirt, pants = _hsv(*_any_color(rng)), _hsv(rng.random(), rng.uniform(0.2, 0.7), rng.uniform(0.15, 0.5))
        skin = _hsv(rng.uniform(0.04, 0.1), rng.uniform(0.3, 0.6), rng.uniform(0.35, 0.95))
        leg_w, leg_h = max(hgt * 0.09, 0.8), hgt * 0.42
        torso_w, torso_h = hgt * 0.28, hgt * 0.34
        head_r = hgt * 0.11
        t0 = y - leg_h - torso_h
        parts += [(_rect(x - torso_w / 2, y - leg_h, x - torso_w / 2 + leg_w, y) | _rect(x + torso_w / 2 - leg_w, y - leg_h, x + torso_w / 2, y), pants, 1.0),
                  (_rect(x - torso_w / 2, t0, x + torso_w / 2, y - leg_h + 0.5), shirt, 1 + 0.05 * n),
                  (_rect(x - torso_w / 2 - leg_w, t0, x - torso_w / 2, t0 + torso_h * 0.9) | _rect(x + torso_w / 2, t0, x + torso_w / 2 + leg_w, t0 + torso_h * 0.9), shirt, 0.85),
                  (_disk(x, t0 - head_r * 0.9, head_r), skin, 1.0)]
    else:
        raise ValueError(kind)
    for mask, color, shade in parts:
        _fill(img, mask, color, shade)
        label[mask] = V[kind]
    return hsv


# ---------------------------------------------------------------- captions

_NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}
_PLURAL = {"box": "boxes"}


def color_name(h: float, s: float, v: float) -> str:
    if v < 0.25:
        return "black"
    if s < 0.2:
        return "white" if v > 0.75 else "grey"
    if 0.04 <= h < 0.11 and v < 0.7:
        return "brown"
    for name, upper in (("red", 0.04), ("orange", 0.11), ("yellow", 0.18), ("green", 0.45), ("blue", 0.7), ("purple", 0.83), ("pink", 0.95)):
        if h < upper:
            return name
    return "red"


def make_caption(things: list[tuple[str, str | None]], ground: list[str], top: str) -> str:
    """"a red ball and two trees on grass under a sky": the visible things (kind, colour name or None),
    largest first, grouped; the ground; the top. Colours, then the last groups, are dropped to fit
    MAX_CAPTION characters."""
    scene = " and ".join("a road" if g == "road" else g for g in ground) + " " + top

    def phrase(with_color: bool, keep: int) -> str:
        groups: dict[tuple[str, str | None], int] = {}
        for kind, color in things:
            key = (kind, color if with_color else None)
            groups[key] = groups.get(key, 0) + 1
        words = []
        for (kind, color), k in list(groups.items())[:keep]:
            noun = kind if k == 1 else _PLURAL.get(kind, kind + "s")
            first = _NUMBERS.get(k, str(k))
            rest = " ".join(w for w in (color, noun) if w)
            words.append(("an" if first == "a" and rest[0] in "aeiou" else first) + " " + rest)
        if not words:
            return scene
        lead = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
        return f"{lead} on {scene}"

    for with_color in (True, False):
        for keep in range(len(things), -1, -1):
            text = phrase(with_color, keep)
            if len(text) <= MAX_CAPTION or keep == 0:
                if len(text) <= MAX_CAPTION:
                    return text
                break
    return scene[:MAX_CAPTION]


# ---------------------------------------------------------------- one scene

def render(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    """One scene: (SIZE, SIZE, 3) uint8 image, (SIZE, SIZE) uint8 label, caption."""
    img = np.zeros((SIZE, SIZE, 3), np.float32)
    label = np.zeros((SIZE, SIZE), np.uint8)
    # The horizon: a wavy line at a random height.
    horizon = rng.uniform(12, 40)
    wave = horizon + rng.uniform(0, 3) * np.sin(_XX * rng.uniform(0.05, 0.25) + rng.uniform(0, 6.3))
    above = _YY < wave
    # Top: sky, a wall, or a wall with sky above it.
    r = rng.random()
    if r < 0.65:
        top, tops = "under a sky", [("sky", above)]
    elif r < 0.85:
        top, tops = "in front of a wall", [("wall", above)]
    else:
        wall_top = rng.uniform(4, horizon - 4)
        top, tops = "by a wall under a sky", [("sky", above & (_YY < wall_top)), ("wall", above & (_YY >= wall_top))]
    # Ground: one kind, sometimes a second one beside it (a curved border) or a road band across it.
    kinds = ["grass", "sand", "water"]
    main = str(rng.choice(kinds, p=[0.5, 0.25, 0.25]))
    grounds = [(main, ~above)]
    ground_names = [main]
    r = rng.random()
    road_band = None
    if r < 0.4:
        y0 = rng.uniform(horizon + 2, SIZE - 6)
        slope = rng.uniform(-0.25, 0.25)
        width = rng.uniform(6, 16)
        mid = y0 + slope * (_XX - SIZE / 2)
        road_band = (~above) & (_YY >= mid - width / 2) & (_YY < mid + width / 2)
        grounds.append(("road", road_band))
        ground_names.append("road")
        lane = road_band & (np.abs(_YY - mid) < 0.75) & ((_XX // 5) % 2 == 0)
    elif r < 0.65:
        other = str(rng.choice([k for k in kinds if k != main]))
        border = rng.uniform(16, 48) + 6 * np.sin(_YY * rng.uniform(0.05, 0.2) + rng.uniform(0, 6.3))
        side = (_XX < border) if rng.random() < 0.5 else (_XX >= border)
        grounds.append((other, (~above) & side))
        ground_names.append(other)
    for name, mask in tops + grounds:
        _stuff(rng, name, img, mask)
        label[mask] = V[name]
    if road_band is not None:
        img[lane] = _hsv(rng.choice([0.15, 0.0]), rng.choice([0.0, 0.8]), 0.95)
    # Things: 0-4, far (high) to near (low), so that near ones occlude far ones; nearer is larger.
    count = int(rng.choice(5, p=[0.1, 0.3, 0.3, 0.2, 0.1]))
    spots = sorted((rng.uniform(horizon + 1, SIZE + 2), rng.uniform(4, SIZE - 4)) for _ in range(count))
    drawn = []
    for y, x in spots:
        kind = str(rng.choice(THINGS))
        scale = 0.55 + 0.75 * (y - horizon) / (SIZE + 2 - horizon)
        before = label.copy()
        hsv = _thing(rng, kind, x, y, scale, img, label)
        drawn.append((kind, hsv, (label == V[kind]) & (before != V[kind])))
    # Whole-image jitter: exposure and sensor noise.
    img = img * rng.uniform(0.85, 1.15) + rng.normal(0, 0.02, img.shape).astype(np.float32)
    image = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    # Caption: the things still visible (≥ 6 of their own pixels after occlusion), largest first.
    visible = []
    for i, (kind, hsv, own) in enumerate(drawn):
        later = np.zeros_like(own)
        for _, _, m in drawn[i + 1:]:
            later |= m
        area = int((own & ~later).sum())
        if area >= 6:
            visible.append((area, kind, color_name(*hsv) if hsv else None))
    visible.sort(key=lambda t: -t[0])
    caption = make_caption([(k, c) for _, k, c in visible], ground_names, top)
    return image, label, caption


# ---------------------------------------------------------------- the dataset on disk

def sample_id(split: str, i: int) -> str:
    return f"toy_{split}_{i:08d}"


def write_world(out: Path, train: int, val: int, seed: int, progress: Progress | None = None) -> dict:
    """Write the world to `out` (see the module doc); returns {"train", "val", "seconds"}."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "classes.json").is_file():
        raise SegGenError(f"OUT {out} exists and is not a toy world (no classes.json): choose an empty or new folder")
    for sub in ("images", "annotations"):  # a rerun replaces the splits, so no sample of an older, larger run stays
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "classes.json").write_text(json.dumps({"description": "SegGen toy world (common/toy/world.py)", "num_classes": len(TOY_CLASSES),
                                                  "ignore_value_in_png": 0, "classes": TOY_CLASSES}, indent=1) + "\n")
    start = time.perf_counter()
    for split_no, (split, n) in enumerate((("train", train), ("val", val))):
        img_dir, ann_dir = out / "images" / _SPLIT_DIR[split], out / "annotations" / _SPLIT_DIR[split]
        img_dir.mkdir(parents=True)
        ann_dir.mkdir(parents=True)
        task = progress.add_task(split, total=n) if progress else None
        lines = []
        for i in range(n):
            rng = np.random.default_rng([seed, split_no, i])  # one stream per sample
            image, label, caption = render(rng)
            sid = sample_id(split, i)
            Image.fromarray(image).save(img_dir / f"{sid}.png")
            Image.fromarray(label, mode="L").save(ann_dir / f"{sid}.png")
            lines.append(json.dumps({"id": sid, "image": f"images/{_SPLIT_DIR[split]}/{sid}.png", "caption": caption,
                                     "captioner": "toyworld", "prompt": None, "model": None}, ensure_ascii=False) + "\n")
            if progress:
                progress.advance(task)
        (out / f"captions_{split}.jsonl").write_text("".join(lines), encoding="utf-8")
    return {"train": train, "val": val, "seconds": time.perf_counter() - start}


def main(
    out: Annotated[Path, typer.Argument(help="Output folder (the --data-root of --data toy).")],
    train: Annotated[int, typer.Option(min=0, help="Training samples.")] = 2000,
    val: Annotated[int, typer.Option(min=0, help="Validation samples.")] = 200,
    seed: Annotated[int, typer.Option(min=0, help="World seed: the same seed gives the same bytes.")] = 0,
):
    """Write the toy segmentation world in the ADE20K layout, with its class table and captions."""
    console = Console(stderr=True, soft_wrap=True)
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as p:
            s = write_world(out, train, val, seed, p)
    except SegGenError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2)
    console.print(f"wrote {s['train']} train + {s['val']} val samples to {out} in {s['seconds']:.1f} s")


if __name__ == "__main__":
    typer.run(main)
