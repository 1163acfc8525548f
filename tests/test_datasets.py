"""Dataset readers on the real ADE20K / COCO panoptic layouts, and on broken copies of them."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import ADE_ROOT, COCO_ROOT
from PIL import Image

from common import SegGenError
from common.data.sample import Sample
from common.data.datasets import (
    default_data_root, id_to_rgb, load_image, load_label, load_panoptic, read_dataset, read_synthetic, rgb_to_id,
)
from common.data.manifest import ManifestWriter


def test_ade20k_reads_parent_or_folder_itself():
    val = read_dataset("ade20k", ADE_ROOT, "val")
    assert [s.id for s in val] == ["ADE_val_00000001", "ADE_val_00000002"]
    assert [s.id for s in read_dataset("ade20k", ADE_ROOT / "ADEChallengeData2016", "val")] == [s.id for s in val]
    (train,) = read_dataset("ade20k", ADE_ROOT, "train")
    assert train.image.name == "ADE_train_00000001.jpg" and train.annotation.name == "ADE_train_00000001.png"
    label = load_label(train, "ade20k")
    assert label.dtype == np.uint8 and label.shape == (512, 683) and label.max() <= 150
    assert load_image(train.image).size == (683, 512)


def test_default_data_root_follows_env(monkeypatch):
    monkeypatch.setenv("SEGGEN_DATASETS", str(ADE_ROOT))
    assert default_data_root() == ADE_ROOT
    assert len(read_dataset("ade20k", None, "val")) == 2
    monkeypatch.delenv("SEGGEN_DATASETS")
    assert str(default_data_root()) == "datasets"


def test_wrong_root_unknown_data_and_split_are_clear(tmp_path):
    (tmp_path / "somethingelse").mkdir()
    with pytest.raises(SegGenError, match=r"--data-root .*ADEChallengeData2016.*holds: somethingelse/"):
        read_dataset("ade20k", tmp_path, "train")
    with pytest.raises(SegGenError, match=r"--data must be one of ade20k, coco, toy \(got 'cityscapes'\)"):
        read_dataset("cityscapes", tmp_path, "train")
    with pytest.raises(SegGenError, match="--split"):
        read_dataset("ade20k", ADE_ROOT, "test")
    with pytest.raises(SegGenError, match=r"panoptic_train2017.json"):
        read_dataset("coco", COCO_ROOT, "train")


@pytest.fixture
def ade_copy(tmp_path):
    dst = tmp_path / "ADEChallengeData2016"
    shutil.copytree(ADE_ROOT / "ADEChallengeData2016", dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


def test_missing_annotation_is_named(ade_copy):
    (ade_copy / "annotations/validation/ADE_val_00000002.png").unlink()
    with pytest.raises(SegGenError, match=r"1 image\(s\) without a partner .*'ADE_val_00000002'"):
        read_dataset("ade20k", ade_copy, "val")


def test_missing_split_folder_is_named(ade_copy):
    shutil.rmtree(ade_copy / "annotations/training")
    with pytest.raises(SegGenError, match=r"annotations/training is missing"):
        read_dataset("ade20k", ade_copy, "train")


def test_label_out_of_range_names_the_file(ade_copy):
    path = ade_copy / "annotations/validation/ADE_val_00000001.png"
    label = np.asarray(Image.open(path)).copy()
    label[0, :3] = 151, 200, 200
    Image.fromarray(label).save(path)
    sample = read_dataset("ade20k", ade_copy, "val")[0]
    with pytest.raises(SegGenError, match=r"ADE_val_00000001.png: label values \[151, 200\] are not ade20k classes"):
        load_label(sample, "ade20k")


def test_label_size_mismatch_names_both_files(ade_copy):
    path = ade_copy / "annotations/validation/ADE_val_00000001.png"
    Image.open(path).crop((0, 0, 100, 50)).save(path)
    sample = read_dataset("ade20k", ade_copy, "val")[0]
    with pytest.raises(SegGenError, match=r"ADE_val_00000001.png: label is 100x50 but image .*ADE_val_00000001.jpg is"):
        load_label(sample, "ade20k")


def test_truncated_image_names_the_file(ade_copy):
    path = ade_copy / "images/validation/ADE_val_00000001.jpg"
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(SegGenError, match=r"ADE_val_00000001.jpg: unreadable image"):
        load_image(path)


def test_coco_panoptic_reader_on_real_samples():
    samples = read_dataset("coco", COCO_ROOT, "val")
    assert [s.id for s in samples] == ["000000142238", "000000439180"]
    meta = json.loads((COCO_ROOT / "annotations/panoptic_val2017.json").read_text())
    for s, ann in zip(samples, sorted(meta["annotations"], key=lambda a: a["file_name"])):
        ids = load_panoptic(s)
        assert s.segments == ann["segments_info"]
        assert set(np.unique(ids)) - {0} == {seg["id"] for seg in s.segments}
        # The published areas agree with our decoding of id = R + 256 G + 65536 B.
        for seg in s.segments:
            assert (ids == seg["id"]).sum() == seg["area"]
        assert ids.shape == load_image(s.image).size[::-1]


def test_rgb_id_round_trip():
    ids = np.array([[0, 1, 256, 65536, 3937500, 16777215]])
    assert np.array_equal(rgb_to_id(id_to_rgb(ids)), ids)


def test_coco_listed_file_missing_is_named(tmp_path):
    shutil.copytree(COCO_ROOT, tmp_path / "coco")
    (tmp_path / "coco/val2017/000000439180.jpg").unlink()
    with pytest.raises(SegGenError, match=r"lists .*000000439180.jpg, which does not exist"):
        read_dataset("coco", tmp_path / "coco", "val")


def _write_synthetic(folder, sample, n=2, **override):
    """A synthetic folder made by hand: copies of a real sample under new ids."""
    (folder / "images").mkdir(parents=True)
    (folder / "annotations").mkdir()
    (folder / "colormaps").mkdir()
    with ManifestWriter(folder / "manifest.jsonl", path_fields=("image", "annotation", "colormap")) as w:
        for k in range(n):
            sid = f"{sample.id}_s{k}"
            shutil.copy(sample.image, folder / f"images/{sid}.jpg")
            shutil.copy(sample.annotation, folder / f"annotations/{sid}.png")
            shutil.copy(sample.annotation, folder / f"colormaps/{sid}.png")
            rec = {"id": sid, "source_id": sample.id, "method": "imgsyn", "image": f"images/{sid}.jpg",
                   "annotation": f"annotations/{sid}.png", "colormap": f"colormaps/{sid}.png", "caption": "a room",
                   "seed": k, "models": {}}
            rec.update(override)
            w.append(rec)


def test_synthetic_folder_reader(tmp_path):
    real = read_dataset("ade20k", ADE_ROOT, "val")[0]
    _write_synthetic(tmp_path / "synth", real)
    samples = read_synthetic(tmp_path / "synth")
    assert [s.id for s in samples] == ["ADE_val_00000001_s0", "ADE_val_00000001_s1"]
    assert samples[1].meta["seed"] == 1 and samples[1].meta["source_id"] == real.id
    assert np.array_equal(load_label(samples[0], "ade20k"), load_label(real, "ade20k"))


def test_synthetic_folder_errors(tmp_path):
    with pytest.raises(SegGenError, match="run masksyn.py or imgsyn.py first"):
        read_synthetic(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SegGenError, match="has no samples"):
        read_synthetic(tmp_path / "empty")
    (tmp_path / "abs").mkdir()
    line = {"id": "x", "source_id": "y", "method": "imgsyn", "image": "/etc/passwd", "annotation": "a.png",
            "colormap": "c.png", "caption": "", "seed": 0, "models": {}}
    (tmp_path / "abs/manifest.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(SegGenError, match=r"manifest.jsonl:1: path '/etc/passwd' must be relative"):
        read_synthetic(tmp_path / "abs")


# ---------------------------------------------------------------- modes, bombs, negative labels (issue 16 item 4)

def test_16_bit_image_and_label_come_back_as_their_8_bit_values(ade_copy):
    """A real image and label saved as 16-bit PNGs (I;16): the image is scaled to 8 bits, not clipped to
    white by convert("RGB"); the label keeps its class values."""
    img_path = ade_copy / "images/validation/ADE_val_00000001.jpg"
    grey = np.asarray(Image.open(img_path).convert("L"))
    path16 = ade_copy / "grey16.png"
    Image.fromarray(grey.astype(np.uint16) * 257).save(path16)  # v * 257: the 16-bit value of 8-bit v
    assert Image.open(path16).mode == "I;16"
    rgb = np.asarray(load_image(path16))
    assert rgb.shape == (*grey.shape, 3) and (rgb == grey[..., None]).all()

    lab_path = ade_copy / "annotations/validation/ADE_val_00000001.png"
    label = np.asarray(Image.open(lab_path)).copy()
    Image.fromarray(label.astype(np.uint16)).save(lab_path)
    assert Image.open(lab_path).mode == "I;16"
    sample = read_dataset("ade20k", ade_copy, "val")[0]
    got = load_label(sample, "ade20k")
    assert got.dtype == np.uint8 and (got == label).all()
    label16 = label.astype(np.uint16)
    label16[0, 0] = 300  # a 16-bit value no class has
    Image.fromarray(label16).save(lab_path)
    with pytest.raises(SegGenError, match=r"ADE_val_00000001.png: label values \[300\] are not ade20k classes"):
        load_label(sample, "ade20k")


def test_negative_and_float_labels_are_refused_by_name(ade_copy):
    sample = read_dataset("ade20k", ade_copy, "val")[0]
    label = np.asarray(Image.open(sample.annotation)).astype(np.int32)
    label[1, 1] = -1
    neg = ade_copy / "negative.tif"  # 32-bit signed (mode I): PNG cannot hold it, TIFF can
    Image.fromarray(label).save(neg)
    with pytest.raises(SegGenError, match=r"negative.tif: label values \[-1\] are not ade20k classes"):
        load_label(type(sample)(sample.id, sample.image, neg), "ade20k")
    flt = ade_copy / "float.tif"
    Image.fromarray(label.astype(np.float32)).save(flt)
    with pytest.raises(SegGenError, match=r"float.tif: annotation must be a single-channel label PNG \(got mode F\)"):
        load_label(type(sample)(sample.id, sample.image, flt), "ade20k")


def test_decompression_bomb_is_a_per_item_error_naming_the_file(ade_copy, monkeypatch):
    """PIL's DecompressionBombError is not an OSError: it must still come back as SegGenError (what the
    stages record in errors.jsonl and go on), whether the image, the label or only the image's size is read."""
    sample = read_dataset("ade20k", ade_copy, "val")[0]
    w, h = Image.open(sample.image).size
    small = ade_copy / "small.png"
    Image.new("L", (1, 1)).save(small)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", w * h // 4)  # a bomb: over twice the limit
    with pytest.raises(SegGenError, match=r"ADE_val_00000001.jpg: unreadable image \(DecompressionBombError"):
        load_image(sample.image)
    with pytest.raises(SegGenError, match=r"ADE_val_00000001.png: unreadable annotation \(DecompressionBombError"):
        load_label(sample, "ade20k")
    with pytest.raises(SegGenError, match=r"ADE_val_00000001.jpg: unreadable image \(DecompressionBombError"):
        load_label(type(sample)(sample.id, sample.image, small), "ade20k")  # the label is fine; the image's size is read


# ---------------------------------------------------------------- where the data is (issue 17 item 3)

def _copy(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*.index.npz"))
    return dst


def test_default_root_reads_detectron2s_layout(tmp_path, monkeypatch):
    """datasets/coco/… and datasets/ADEChallengeData2016/ (detectron2's convention, cited by docs/data-layouts.md)."""
    _copy(COCO_ROOT, tmp_path / "datasets/coco")
    _copy(ADE_ROOT / "ADEChallengeData2016", tmp_path / "datasets/ADEChallengeData2016")
    monkeypatch.delenv("SEGGEN_DATASETS", raising=False)
    monkeypatch.chdir(tmp_path)
    coco = read_dataset("coco", None, "val")
    assert [s.id for s in coco] == [s.id for s in read_dataset("coco", COCO_ROOT, "val")]
    assert coco[0].image.parent == Path("datasets/coco/val2017")  # under the default root, as caption records it
    assert [s.segments for s in coco] == [s.segments for s in read_dataset("coco", COCO_ROOT, "val")]
    assert [s.id for s in read_dataset("ade20k", None, "val")] == ["ADE_val_00000001", "ADE_val_00000002"]


def test_a_root_off_by_one_or_two_levels_gets_the_folder_that_is_there(tmp_path):
    """The error names where the data actually is, and that suggestion works."""
    _copy(COCO_ROOT, tmp_path / "downloads/coco2017")
    with pytest.raises(SegGenError, match=rf"no COCO panoptic found; found .*panoptic_val2017.json: pass --data-root {tmp_path}/downloads/coco2017\."):
        read_dataset("coco", tmp_path, "val")
    assert len(read_dataset("coco", tmp_path / "downloads/coco2017", "val")) == 2  # the suggestion
    with pytest.raises(SegGenError, match=r"panoptic_val2017.json: pass --data-root .*coco2017 \(that is another split: 'train' needs panoptic_train2017.json\)"):
        read_dataset("coco", tmp_path, "train")
    _copy(ADE_ROOT / "ADEChallengeData2016", tmp_path / "data/scene/ADEChallengeData2016")
    with pytest.raises(SegGenError, match=rf"no ADE20K found; found .*ADEChallengeData2016: pass --data-root {tmp_path}/data/scene\."):
        read_dataset("ade20k", tmp_path, "val")
    assert len(read_dataset("ade20k", tmp_path / "data/scene", "val")) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(SegGenError, match=r"no COCO panoptic found\. Expected .*empty/annotations/panoptic_val2017.json.*under .*empty/coco/"):
        read_dataset("coco", tmp_path / "empty", "val")


def test_a_label_drawn_on_the_exif_turned_view_is_named_as_such(tmp_path):
    """A photo stored landscape with EXIF orientation 6 (viewers show it portrait) and a label drawn on the
    portrait view: the size error says so and how to fix it, instead of only two sizes."""
    src = read_dataset("ade20k", ADE_ROOT, "val")[0]
    image, label = load_image(src.image), np.asarray(Image.open(src.annotation))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = image.transpose(Image.Transpose.ROTATE_90)  # what the camera stored
    stored.save(tmp_path / "x.jpg", exif=exif)
    Image.fromarray(label).save(tmp_path / "x.png")  # drawn on the view: the label has image's size
    sample = Sample("x", tmp_path / "x.jpg", tmp_path / "x.png")
    with pytest.raises(SegGenError, match=r"EXIF orientation \(6\).*ImageOps.exif_transpose"):
        load_label(sample, "ade20k")
    stored.save(tmp_path / "y.jpg")  # the same pixels without the tag: a plain size mismatch
    with pytest.raises(SegGenError) as e:
        load_label(Sample("y", tmp_path / "y.jpg", tmp_path / "x.png"), "ade20k")
    assert "EXIF" not in str(e.value)
