"""Segmentation masks <-> colour maps: the paper's f_mask→color and f_color→mask (§3.2, appendix A.2).

A colour map encodes a label map as an RGB picture, one colour per class, so that an image diffusion
model (SDXL) can learn to draw masks (Text2Mask) and be conditioned on them (Mask2Img).

Two palettes per dataset (see docs/design.md, "Colour maps and palettes"):
- "generation": what the generators are trained on and sample. Colours are picked greedily, each as
  far as possible from those already chosen, from the 6×6×6 lattice {0, 51, ..., 255}³, so any two are
  at least 51 RGB units apart and survive the VAE round trip and sampling noise.
- "usual": the community palette (mmseg / color150.mat for ADE20K, panopticapi's category colours for
  COCO), for pictures people look at. Not injective: ADE20K road and skyscraper share (140,140,140).

Label values are those of the dataset's annotation PNGs: ADE20K 0 (other) and 1..150 (the toy world of
common/toy/world.py likewise, 0 and 1..11, with its own class table); COCO panoptic 0
(void) and the category ids 1..200. Panoptic colour maps also carry an edge colour that outlines every
segment (appendix A.2); it decodes to the sentinel value EDGE.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common import SegGenError

IGNORE = 255  # label value of pixels that belong to no class (train_seg's ignore index)
EDGE = 254  # label value the edge colour of a panoptic colour map decodes to


@dataclass(frozen=True, eq=False)
class Palette:
    """A lookup table between label values and RGB colours."""

    name: str
    colors: np.ndarray  # (K, 3) uint8, one colour per entry
    values: np.ndarray  # (K,) uint8, the label value each colour encodes (EDGE for the edge colour)

    def __post_init__(self):
        if len(self.colors) != len(self.values) or not 0 < len(self.colors) <= 256:
            raise ValueError(f"palette {self.name!r}: {len(self.colors)} colours for {len(self.values)} values")
        if len(np.unique(self.values)) != len(self.values):
            raise ValueError(f"palette {self.name!r}: a label value appears twice")

    @property
    def edge_color(self) -> tuple[int, int, int] | None:
        hit = np.flatnonzero(self.values == EDGE)
        return tuple(int(c) for c in self.colors[hit[0]]) if len(hit) else None

    def min_distance(self) -> float:
        """Smallest Euclidean distance between two colours of the palette."""
        c = self.colors.astype(np.float64)
        d = np.sqrt(((c[:, None] - c[None]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        return float(d.min())

    def to_dict(self) -> dict:
        return {"name": self.name, "colors": self.colors.tolist(), "values": self.values.tolist(), "edge_value": EDGE}

    @classmethod
    def from_dict(cls, d: dict) -> Palette:
        return cls(d["name"], np.asarray(d["colors"], np.uint8).reshape(-1, 3), np.asarray(d["values"], np.uint8))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Palette:
        """A palette.json saved with a trained generator, checked: its colours must be distinct (a mask is
        decoded by nearest colour, so two classes with one colour cannot be told apart) and, when its name
        names a dataset ("ade20k-generation"), it must hold a colour for each of that dataset's values. The
        datasets' own palettes are taken as they are (the usual ADE20K / COCO colours repeat one colour)."""
        try:
            palette = cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SegGenError(f"{path}: not a readable palette file ({e})") from e
        data, _, kind = palette.name.partition("-")
        known = palette_for(data, kind) if data in ("ade20k", "coco", "toy") and kind in ("generation", "usual") else None
        if known is not None and np.array_equal(known.colors, palette.colors) and np.array_equal(known.values, palette.values):
            return palette
        if known is not None and sorted(palette.values.tolist()) != sorted(known.values.tolist()):
            lost = sorted(set(known.values.tolist()) - set(palette.values.tolist()))
            raise SegGenError(f"{path}: palette {palette.name!r} has {len(palette.values)} colours, {data} needs {len(known.values)} "
                              f"(one per label value{f'; none for {lost[:8]}' if lost else ''}); save the palette again with the trainer")
        colors, first = np.unique(palette.colors, axis=0, return_index=True)
        if len(colors) != len(palette.colors):
            dup = sorted(set(range(len(palette.colors))) - set(first.tolist()))[0]
            same = [int(v) for v, c in zip(palette.values, palette.colors) if (c == palette.colors[dup]).all()]
            raise SegGenError(f"{path}: palette {palette.name!r} gives label values {same} the same colour "
                              f"{tuple(int(x) for x in palette.colors[dup])}; every value needs its own colour")
        return palette


def separated_colors(n: int, seeds=((0, 0, 0),), levels: int = 6) -> np.ndarray:
    """n colours by greedy max-min selection over the lattice {0, 255/(levels-1), ..., 255}³.

    Starts from `seeds` (they keep their order), then repeatedly adds the lattice colour farthest from
    all chosen ones (first in lattice order on ties), so the result is deterministic. On the default
    6-level lattice any two colours are ≥ 51 apart; n may be at most levels³.
    """
    if n > levels**3:
        raise ValueError(f"{n} colours do not fit a {levels}-level lattice; raise levels")
    axis = np.round(np.linspace(0, 255, levels))
    lattice = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)  # (levels³, 3)
    chosen = [np.asarray(s, np.float64) for s in seeds]
    dist = np.min([((lattice - c) ** 2).sum(1) for c in chosen], axis=0)  # squared distance to the chosen set
    while len(chosen) < n:
        i = int(np.argmax(dist))
        chosen.append(lattice[i])
        dist = np.minimum(dist, ((lattice - lattice[i]) ** 2).sum(1))
    return np.asarray(chosen[:n], np.uint8)


# ---------------------------------------------------------------- the datasets' palettes

from common import ASSETS as _DATA


@functools.cache
def ade20k_classes() -> list[dict]:
    """The 150 ADE20K classes: png_value 1..150, name, full_name, is_stuff, rgb (usual colour)."""
    return json.loads((_DATA / "ade20k_classes.json").read_text())["classes"]


@functools.cache
def toy_classes() -> list[dict]:
    """The toy world's 11 classes (common/toy/world.py), in ADE20K's table format."""
    return json.loads((_DATA / "toy_classes.json").read_text())["classes"]


@functools.cache
def coco_categories() -> list[dict]:
    """The 133 COCO panoptic categories: id (1..200), name, isthing, color (panopticapi's)."""
    return json.loads((_DATA / "coco_panoptic_categories.json").read_text())


def semantic_classes(data: str) -> list[dict]:
    """The class table of a dataset read in the ADE20K layout ("ade20k", or "toy": common/toy/world.py):
    png_value, train_id, name, full_name, is_stuff, rgb."""
    if data == "toy":
        return toy_classes()
    return ade20k_classes()


def class_names(data: str) -> dict[int, str]:
    """Label value -> short class name, for captions and reports."""
    if data in ("ade20k", "toy"):
        return {c["png_value"]: c["name"] for c in semantic_classes(data)}
    return {c["id"]: c["name"] for c in coco_categories()}


@functools.cache
def palette_for(data: str, kind: str = "generation") -> Palette:
    """The palette of dataset `data` ("ade20k", "coco" or "toy"); kind "generation" or "usual" (see module doc)."""
    if kind not in ("generation", "usual"):
        raise SegGenError(f"palette kind must be 'generation' or 'usual' (got {kind!r})")
    if data in ("ade20k", "toy"):
        classes = semantic_classes(data)
        values = [0] + [c["png_value"] for c in classes]
        usual = [(0, 0, 0)] + [tuple(c["rgb"]) for c in classes]
        colors = separated_colors(len(values), seeds=[(0, 0, 0)]) if kind == "generation" else np.asarray(usual, np.uint8)
    elif data == "coco":
        values = [0, EDGE] + [c["id"] for c in coco_categories()]  # void, edge, 133 categories
        usual = [(0, 0, 0), (255, 255, 255)] + [tuple(c["color"]) for c in coco_categories()]
        seeds = [(0, 0, 0), (255, 255, 255)]
        colors = separated_colors(len(values), seeds=seeds) if kind == "generation" else np.asarray(usual, np.uint8)
    else:
        raise SegGenError(f"--data must be 'ade20k', 'coco' or 'toy' (got {data!r})")
    return Palette(f"{data}-{kind}", np.asarray(colors, np.uint8), np.asarray(values, np.uint8))


# ---------------------------------------------------------------- f_mask→color

def label_to_color(label: np.ndarray, palette: Palette) -> np.ndarray:
    """(H, W) label values -> (H, W, 3) uint8 colour map, by table lookup (appendix A.2)."""
    table = np.zeros((256, 3), np.uint8)
    known = np.zeros(256, bool)
    table[palette.values] = palette.colors
    known[palette.values] = True
    label = np.asarray(label)
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise SegGenError(f"label values must lie in 0..255 (got {label.min()}..{label.max()})")
        label = label.astype(np.uint8)
    present = np.unique(label)
    unknown = present[~known[present]]
    if len(unknown):
        raise SegGenError(f"label values {unknown.tolist()} have no colour in palette {palette.name!r}")
    return table[label]


def segment_edges(segment_ids: np.ndarray, width: int = 2) -> np.ndarray:
    """(H, W) bool: True where a pixel up to `width` steps away along its row or column belongs to
    another segment. Both sides of a boundary are marked, so the line is 2·width pixels wide."""
    ids = np.asarray(segment_ids)
    edge = np.zeros(ids.shape, bool)
    for shift in range(1, width + 1):
        dv = ids[shift:, :] != ids[:-shift, :]  # vertical neighbours `shift` apart differ
        dh = ids[:, shift:] != ids[:, :-shift]
        edge[shift:, :] |= dv
        edge[:-shift, :] |= dv
        edge[:, shift:] |= dh
        edge[:, :-shift] |= dh
    return edge


def panoptic_to_color(segment_ids: np.ndarray, segments: list[dict], palette: Palette, edge_width: int = 1) -> np.ndarray:
    """Panoptic segments -> colour map: category colours, every segment outlined in the edge colour
    (appendix A.2), so instances of one category stay apart.

    segment_ids: (H, W) int, 0 = void; segments: [{"id", "category_id"}, ...] (COCO segments_info).
    """
    if palette.edge_color is None:
        raise SegGenError(f"palette {palette.name!r} has no edge colour; panoptic maps need one")
    cmap = label_to_color(panoptic_to_semantic(segment_ids, segments), palette)
    cmap[segment_edges(segment_ids, edge_width)] = palette.edge_color
    return cmap


def panoptic_to_semantic(segment_ids: np.ndarray, segments: list[dict]) -> np.ndarray:
    """(H, W) segment ids + segments_info -> (H, W) uint8 category ids (0 where void)."""
    category = {s["id"]: s["category_id"] for s in segments}
    ids, inverse = np.unique(np.asarray(segment_ids), return_inverse=True)
    return np.array([category.get(int(i), 0) for i in ids], np.uint8)[inverse].reshape(np.shape(segment_ids))


# ---------------------------------------------------------------- f_color→mask

@functools.lru_cache(maxsize=8)
def _nearest_lut(colors: bytes) -> np.ndarray:
    """(2^24,) uint8: for every RGB colour, the index of the nearest palette colour.

    Indexed by b·2^16 + g·2^8 + r, i.e. by the little-endian uint32 view of an RGBX pixel. Distances
    are exact integers and ties go to the lowest index, exactly like a full argmin. Built once per
    palette (~3 s) by sweeping blue planes: d = (r-pr)² + (g-pg)² + (b-pb)² for all (g, r) at once.
    """
    pal = np.frombuffer(colors, np.uint8).reshape(-1, 3).astype(np.int32)
    v = np.arange(256, dtype=np.int32)[:, None]
    sq_r, sq_g, sq_b = ((v - pal[None, :, c]) ** 2 for c in range(3))  # each (256, K)
    gr = sq_g[:, None, :] + sq_r[None, :, :]  # (256 g, 256 r, K)
    lut = np.empty((256, 256, 256), np.uint8)  # [b, g, r]
    for b in range(256):
        lut[b] = np.argmin(gr + sq_b[b], axis=-1)
    return lut.reshape(-1)


def color_to_index(cmap: np.ndarray, palette: Palette) -> np.ndarray:
    """(H, W, 3) colour map -> (H, W) uint8 index of the nearest palette colour (Euclidean, exact).

    One table lookup per pixel; besides the output, it allocates 4 bytes per pixel.
    """
    cmap = np.asarray(cmap)
    if cmap.ndim != 3 or cmap.shape[-1] != 3:
        raise SegGenError(f"a colour map must be (H, W, 3) (got shape {cmap.shape})")
    if cmap.dtype != np.uint8:  # e.g. a float decoder output in 0..255
        cmap = np.clip(np.rint(cmap), 0, 255).astype(np.uint8)
    rgbx = np.zeros(cmap.shape[:2] + (4,), np.uint8)
    rgbx[..., :3] = cmap
    key = rgbx.view("<u4")[..., 0]  # (H, W) r + g·2^8 + b·2^16
    return np.take(_nearest_lut(palette.colors.tobytes()), key)


def color_to_label(cmap: np.ndarray, palette: Palette, max_distance: float | None = None, vote: bool = False) -> np.ndarray:
    """f_color→mask for semantic maps (appendix A.2): each pixel takes the class of the nearest palette
    colour (Euclidean). Returns (H, W) uint8 label values.

    max_distance: pixels farther than this from every palette colour become IGNORE (off-palette); the
    distance is the pixel's own, measured before the vote.
    vote: a 3×3 majority vote over the projected labels afterwards; it mends the isolated errors that
    decoding noise leaves on segment borders (measured: 97-99% -> 99.2-99.8% of pixels, docs/design.md).
    """
    index = color_to_index(cmap, palette)
    far = None
    if max_distance is not None:  # from each pixel's own nearest colour, before any vote mends it
        diff = np.asarray(cmap, np.float32) - palette.colors[index]
        far = (diff * diff).sum(-1) > max_distance**2
    if vote:
        index = majority_vote(index)
    label = palette.values[index]
    if far is not None:
        label[far] = IGNORE
    return label


def off_palette_fraction(cmap: np.ndarray, palette: Palette, max_distance: float) -> float:
    """Share of pixels farther than max_distance from every palette colour."""
    return float((color_to_label(cmap, palette, max_distance) == IGNORE).mean())


def majority_vote(label: np.ndarray) -> np.ndarray:
    """3×3 mode filter on a (H, W) uint8 map. Ties keep the centre pixel's value.

    Each of the nine values in a window is a candidate; its count is how many of the nine equal it.
    Borders are padded by replication. Memory: a few bytes per pixel.
    """
    pad = np.pad(label, 1, mode="edge")
    h, w = label.shape
    shifts = [(1, 1)] + [(dy, dx) for dy in range(3) for dx in range(3) if (dy, dx) != (1, 1)]  # centre first
    views = [pad[dy:dy + h, dx:dx + w] for dy, dx in shifts]
    best, best_count = label.copy(), np.zeros(label.shape, np.uint8)
    for cand in views:
        count = np.zeros(label.shape, np.uint8)
        for other in views:
            count += cand == other
        better = count > best_count  # strict: on ties the earlier candidate (the centre) stays
        best[better] = cand[better]
        best_count = np.maximum(best_count, count)
    return best


def panoptic_color_to_semantic(cmap: np.ndarray, palette: Palette, vote: bool = False) -> np.ndarray:
    """Semantic labels back from a panoptic colour map: edge pixels take the class of the nearest
    non-edge pixel. (Instances cannot be recovered reliably; the paper leaves that open, A.2.)"""
    from scipy.ndimage import distance_transform_edt

    label = color_to_label(cmap, palette, vote=vote)
    edge = label == EDGE
    if edge.all():
        return np.zeros_like(label)
    if edge.any():
        _, (iy, ix) = distance_transform_edt(edge, return_indices=True)
        label = label[iy, ix]
    return label


# Defaults of color_to_panoptic, measured by bench/panoptic_recovery.py on the real COCO samples.
RECOVERY_VOTE = True  # 3×3 majority vote on the decoded colours first (mends isolated decoding errors)
RECOVERY_BARRIER = 0  # widen edge pixels by this many pixels when splitting (1 closes 2 px gaps, but pinches thin parts)
RECOVERY_MIN_AREA = 32  # seeds under this many pixels (after the cut) are no segment; they join a neighbour
RECOVERY_TRUST = 0.0  # the vote changes only pixels farther than this from their nearest palette colour


def color_to_panoptic(cmap: np.ndarray, palette: Palette, *, things: set[int] | None = None, vote: bool = RECOVERY_VOTE,
                      barrier: int = RECOVERY_BARRIER, min_area: int = RECOVERY_MIN_AREA,
                      trust: float = RECOVERY_TRUST) -> tuple[np.ndarray, list[dict]]:
    """f_color→mask for panoptic maps, the inverse of panoptic_to_color (appendix A.2 leaves it open).

    cmap: (H, W, 3) colour map (uint8, or float in 0..255); palette: with an edge colour.
    things: category ids that are things (default: COCO's 80). Returns segment_ids (H, W) int32,
    0 = void, and segments_info [{"id", "category_id", "isthing", "area", "bbox", "iscrowd"}] (COCO).

    1. Each pixel takes the category of the nearest palette colour (optionally a 3×3 vote).
    2. Things: the connected pieces (4-neighbourhood) of each category, cut along the edge pixels
       (before or after the vote) widened by `barrier`, so that an edge broken by noise (a gap of up
       to 2·barrier pixels) still separates; pieces of at least
       `min_area` pixels are the instances' seeds. Stuff: one seed per category (its pieces of at
       least `min_area` pixels); void: its pieces of at least `min_area` pixels.
    3. The rest of a thing category's region (the widened margin, small pieces) goes to the nearest
       seed in the same connected region of that category; all that is left (edge pixels, stray
       pieces) goes to the nearest seeded pixel, void included.
    """
    from scipy import ndimage

    if palette.edge_color is None:
        raise SegGenError(f"palette {palette.name!r} has no edge colour; panoptic maps need one")
    if things is None:
        things = {c["id"] for c in coco_categories() if c["isthing"]}
    index = color_to_index(cmap, palette)
    edge_before_vote = palette.values[index] == EDGE
    if vote:
        voted = majority_vote(index)
        if trust > 0:  # pixels close to a palette colour keep it (a clean map stays as it is)
            diff = np.asarray(cmap, np.float32) - palette.colors[index]
            unsure = (diff * diff).sum(-1) > trust**2
            index = np.where(unsure, voted, index)
        else:
            index = voted
    label = palette.values[index]  # (H, W) category ids, 0 = void, EDGE
    edge = label == EDGE
    cross = ndimage.generate_binary_structure(2, 1)
    cut = edge | edge_before_vote  # the vote must not widen a gap in an edge line
    if barrier > 0 and cut.any():
        cut = ndimage.binary_dilation(cut, cross, iterations=barrier)

    seg = np.full(label.shape, -1, np.int32)  # -1 = not yet assigned, 0 = void, > 0 = segment
    category = {}  # segment id -> category id
    for c in np.unique(label[~edge]).tolist():
        region = label == c
        pieces, n = ndimage.label(region & ~cut if c in things else region, cross)
        area = np.bincount(pieces.ravel(), minlength=n + 1)
        area[0] = 0
        keep = np.flatnonzero(area >= min_area)
        if not len(keep):
            continue
        if c == 0:  # void stays void
            seg[np.isin(pieces, keep)] = 0
        elif c in things:  # one segment per piece
            first = len(category) + 1
            new = np.zeros(n + 1, np.int32)
            new[keep] = np.arange(first, first + len(keep))
            seg[new[pieces] > 0] = new[pieces][new[pieces] > 0]
            category.update({first + i: c for i in range(len(keep))})
            # The rest of this category's region goes to the nearest seed of the same region.
            rest = region & (seg < 0)
            if rest.any():
                seeds = seg >= first
                regions, _ = ndimage.label(region, cross)  # the category's pieces before the cut
                _, (iy, ix) = ndimage.distance_transform_edt(~seeds, return_indices=True)
                same = rest & (regions[iy, ix] == regions)
                seg[same] = seg[iy[same], ix[same]]
        else:  # stuff: one segment per category
            sid = len(category) + 1
            seg[np.isin(pieces, keep)] = sid
            category[sid] = c
    if (seg >= 0).any() and (seg < 0).any():  # edges and stray pieces: the nearest assigned pixel
        _, (iy, ix) = ndimage.distance_transform_edt(seg < 0, return_indices=True)
        seg = seg[iy, ix]
    seg[seg < 0] = 0

    # segments_info, numbered 1.. in order of appearance after filling (some seeds may have vanished: none do)
    area = np.bincount(seg.ravel(), minlength=len(category) + 1)
    boxes = ndimage.find_objects(seg)
    segments = []
    for sid, c in category.items():
        if area[sid] == 0:
            continue
        ys, xs = boxes[sid - 1]
        segments.append({"id": sid, "category_id": int(c), "isthing": int(c in things), "area": int(area[sid]),
                         "bbox": [xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start], "iscrowd": 0})
    return seg, segments


# ---------------------------------------------------------------- resizing

def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a label map (H, W) or colour map (H, W, 3) to size=(width, height) with NEAREST.

    Label and colour maps are never interpolated: any other filter invents values between classes.
    """
    array = np.asarray(array)
    if (array.shape[1], array.shape[0]) == tuple(size):
        return array
    if array.dtype == np.uint8:
        return np.asarray(Image.fromarray(array).resize(size, Image.NEAREST))
    return np.asarray(Image.fromarray(array.astype(np.int32)).resize(size, Image.NEAREST)).astype(array.dtype)
