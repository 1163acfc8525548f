"""Colour maps (paper §3.2, appendix A.2) on the real ADE20K and COCO annotations."""

import io

import numpy as np
import pytest
from conftest import ADE_ROOT, COCO_ROOT
from PIL import Image

from common import SegGenError
from common.masks.colormap import (
    EDGE, IGNORE, color_to_index, color_to_label, label_to_color, majority_vote, off_palette_fraction,
    palette_for, panoptic_color_to_semantic, panoptic_to_color, panoptic_to_semantic, resize_nearest,
    segment_edges, separated_colors,
)
from common.data.datasets import load_label, load_panoptic, read_dataset

ADE_SAMPLES = read_dataset("ade20k", ADE_ROOT, "train") + read_dataset("ade20k", ADE_ROOT, "val")
COCO_SAMPLES = read_dataset("coco", COCO_ROOT, "val")


def vae_like_degradation(cmap: np.ndarray, seed: int = 0) -> np.ndarray:
    """The probe of docs/design.md ("Colour maps and palettes") of a VAE round trip: JPEG quality 75 with 4:4:4 chroma, then Gaussian noise σ = 8/255."""
    buf = io.BytesIO()
    Image.fromarray(cmap).save(buf, "JPEG", quality=75, subsampling=0)
    noisy = np.asarray(Image.open(buf), np.float32) + np.random.default_rng(seed).normal(0, 8, cmap.shape)
    return np.clip(noisy, 0, 255)


def test_generation_palettes_are_distinct_and_well_separated():
    for data, n in (("ade20k", 151), ("coco", 135)):  # ADE: 0 + 150 classes; COCO: void + edge + 133
        pal = palette_for(data)
        assert len(pal.colors) == n
        assert len(np.unique(pal.colors, axis=0)) == n
        assert pal.min_distance() >= 51  # the 6-level lattice spacing
    assert tuple(palette_for("ade20k").colors[0]) == (0, 0, 0)  # class 0 (other) is black
    assert palette_for("coco").edge_color == (255, 255, 255)
    # The usual ADE20K palette is not injective: road (7) and skyscraper (49) share (140,140,140).
    usual = palette_for("ade20k", "usual")
    assert tuple(usual.colors[7]) == tuple(usual.colors[49]) == (140, 140, 140)


def test_separated_colors_is_deterministic_greedy_maxmin():
    a = separated_colors(20, seeds=[(0, 0, 0)])
    assert np.array_equal(a, separated_colors(20, seeds=[(0, 0, 0)]))
    assert tuple(a[1]) == (255, 255, 255)  # farthest lattice point from black
    with pytest.raises(ValueError, match="levels"):
        separated_colors(300)


@pytest.mark.parametrize("sample", ADE_SAMPLES, ids=lambda s: s.id)
def test_ade20k_label_color_label_is_exact(sample):
    label = load_label(sample, "ade20k")
    pal = palette_for("ade20k")
    cmap = label_to_color(label, pal)
    assert cmap.shape == label.shape + (3,) and cmap.dtype == np.uint8
    assert np.array_equal(color_to_label(cmap, pal), label)


@pytest.mark.parametrize("sample", COCO_SAMPLES, ids=lambda s: s.id)
def test_coco_semantic_label_color_label_is_exact(sample):
    label = load_label(sample, "coco")  # category ids, 0 = void
    assert set(np.unique(label)) - {0} == {s["category_id"] for s in sample.segments}
    pal = palette_for("coco")
    assert np.array_equal(color_to_label(label_to_color(label, pal), pal), label)


@pytest.mark.parametrize("sample", ADE_SAMPLES, ids=lambda s: s.id)
def test_vae_like_degradation_projects_back_to_99_percent(sample):
    label = load_label(sample, "ade20k")
    pal = palette_for("ade20k")
    degraded = vae_like_degradation(label_to_color(label, pal))
    plain = (color_to_label(degraded, pal) == label).mean()
    voted = (color_to_label(degraded, pal, vote=True) == label).mean()
    print(f"{sample.id}: nearest colour {plain:.4f}, with 3x3 vote {voted:.4f}")
    assert voted >= 0.99
    assert plain > 0.95


def test_usual_palette_decodes_worse_than_the_generation_palette():
    # Why the generators use the separated palette: on the same degradation, over all real samples,
    # the usual (mmseg) palette leaves at least three times as many wrong pixels.
    errors = {}
    for kind in ("generation", "usual"):
        pal = palette_for("ade20k", kind)
        wrong = total = 0
        for sample in ADE_SAMPLES:
            label = load_label(sample, "ade20k")
            wrong += (color_to_label(vae_like_degradation(label_to_color(label, pal)), pal, vote=True) != label).sum()
            total += label.size
        errors[kind] = wrong / total
    print(f"wrong pixels with 3x3 vote: {errors}")
    assert errors["usual"] > 3 * errors["generation"]


def test_projection_equals_full_argmin_on_random_colours():
    pal = palette_for("ade20k", "usual")  # has a duplicated colour: ties must go to the lower index
    rng = np.random.default_rng(0)
    cmap = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    cmap[0, :151] = pal.colors  # exact palette colours, including the tie
    d = ((cmap[..., None, :].astype(np.int32) - pal.colors.astype(np.int32)) ** 2).sum(-1)
    assert np.array_equal(color_to_index(cmap, pal), d.argmin(-1))


def test_max_distance_marks_off_palette_pixels_ignore():
    pal = palette_for("ade20k")
    cmap = label_to_color(np.full((4, 4), 3, np.uint8), pal)
    cmap[0, 0] = pal.colors[3] + np.array([20, 0, 0], np.uint8) * (pal.colors[3, 0] < 200)
    cmap[1, 1] = (pal.colors[3].astype(int) + pal.colors[5]) // 2  # between two classes
    label = color_to_label(cmap, pal, max_distance=21)
    assert label[0, 0] == 3 and label[1, 1] == IGNORE and (label == 3).sum() == 15
    assert off_palette_fraction(cmap, pal, 21) == pytest.approx(1 / 16)


def test_off_palette_is_judged_before_the_vote():
    pal = palette_for("ade20k")
    label = np.full((5, 5), 3, np.uint8)
    label[2, 2] = 9  # an isolated pixel of another class, exactly on its palette colour
    cmap = label_to_color(label, pal)
    cmap[0, 0] = (pal.colors[3].astype(int) + pal.colors[5]) // 2  # truly off-palette
    out = color_to_label(cmap, pal, max_distance=10, vote=True)
    assert out[2, 2] == 3  # mended by the vote, not turned into IGNORE
    assert out[0, 0] == IGNORE and (out == IGNORE).sum() == 1


def test_float_colour_maps_are_rounded_not_truncated():
    pal = palette_for("ade20k")
    cmap = label_to_color(np.array([[5, 9]], np.uint8), pal).astype(np.float32) - 0.4
    assert color_to_label(cmap, pal).tolist() == [[5, 9]]


def test_majority_vote_mends_isolated_pixels_and_keeps_ties():
    lab = np.zeros((5, 5), np.uint8)
    lab[2, 2] = 7  # an isolated wrong pixel
    assert majority_vote(lab).max() == 0
    stripes = np.tile(np.array([1, 2, 3], np.uint8), (5, 3))  # inside, every window is a 3/3/3 tie
    assert np.array_equal(majority_vote(stripes)[1:-1, 1:-1], stripes[1:-1, 1:-1])


def test_unknown_label_value_names_it():
    with pytest.raises(SegGenError, match=r"\[200\]"):
        label_to_color(np.array([[1, 200]], np.uint8), palette_for("ade20k"))


@pytest.mark.parametrize("sample", COCO_SAMPLES, ids=lambda s: s.id)
def test_panoptic_colour_map_outlines_segments_and_decodes_semantics(sample):
    ids = load_panoptic(sample)
    pal = palette_for("coco")
    cmap = panoptic_to_color(ids, sample.segments, pal, edge_width=1)
    edge = segment_edges(ids, 1)
    assert np.all(cmap[edge] == 255)  # every boundary pixel is drawn in the edge colour
    # Two touching people (same category) stay apart: their shared border is in the edge colour.
    semantic = panoptic_to_semantic(ids, sample.segments)
    assert np.array_equal(color_to_label(cmap, pal)[~edge], semantic[~edge])
    assert (color_to_label(cmap, pal)[edge] == EDGE).all()
    back = panoptic_color_to_semantic(cmap, pal)
    assert EDGE not in back
    assert (back == semantic).mean() > 0.98  # edge pixels take the class of the nearest segment
    print(f"{sample.id}: edges {edge.mean():.3f} of pixels, semantic recovered {(back == semantic).mean():.4f}")


def test_touching_instances_of_one_class_are_separated_by_the_edge():
    ids = np.zeros((6, 8), np.int32)
    ids[:, :4], ids[:, 4:] = 10, 11  # two instances, one category
    segments = [{"id": 10, "category_id": 1}, {"id": 11, "category_id": 1}]
    cmap = panoptic_to_color(ids, segments, palette_for("coco"))
    assert np.all(cmap[:, 3] == 255) and np.all(cmap[:, 4] == 255)
    assert np.all(cmap[:, [0, 7]] == palette_for("coco").colors[2])  # category 1 is the first after void, edge


def test_resize_nearest_invents_no_colours():
    pal = palette_for("ade20k")
    label = load_label(ADE_SAMPLES[0], "ade20k")
    cmap = label_to_color(label, pal)
    small = resize_nearest(cmap, (123, 77))
    assert small.shape == (77, 123, 3)
    palette_set = {tuple(c) for c in pal.colors}
    assert {tuple(c) for c in small.reshape(-1, 3)} <= palette_set
    assert set(np.unique(resize_nearest(label, (300, 200)))) <= set(np.unique(label))
    ids = load_panoptic(COCO_SAMPLES[0])
    assert set(np.unique(resize_nearest(ids, (64, 64)))) <= set(np.unique(ids))


def test_palette_file_needs_distinct_colours_and_the_datasets_count(tmp_path):
    """A palette.json saved with a generator: the datasets' own palettes load as they are (the usual ADE20K
    colours repeat one), a generation palette with two equal colours or a missing class is refused by name."""
    import json

    import pytest

    from common import SegGenError
    from common.masks.colormap import Palette, palette_for

    for data in ("ade20k", "coco"):
        for kind in ("generation", "usual"):
            palette_for(data, kind).save(tmp_path / "p.json")
            assert Palette.load(tmp_path / "p.json").colors.tolist() == palette_for(data, kind).colors.tolist()
    d = palette_for("ade20k").to_dict()
    d["colors"][5] = d["colors"][3]
    (tmp_path / "dup.json").write_text(json.dumps(d))
    with pytest.raises(SegGenError, match=r"dup.json: palette 'ade20k-generation' gives label values \[3, 5\] the same colour"):
        Palette.load(tmp_path / "dup.json")
    d = palette_for("ade20k").to_dict()
    d["colors"], d["values"] = d["colors"][:-1], d["values"][:-1]
    (tmp_path / "short.json").write_text(json.dumps(d))
    with pytest.raises(SegGenError, match=r"short.json: palette 'ade20k-generation' has 150 colours, ade20k needs 151 .*none for \[150\]"):
        Palette.load(tmp_path / "short.json")
