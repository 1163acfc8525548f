"""python -m common.data.export: a synthetic folder or a real split as a Hugging Face dataset (Parquet, read by
datasets.load_dataset offline) and as webdataset tar shards (read by webdataset.WebDataset)."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from common.data import export
from common.data.datasets import read_dataset, rgb_to_id
from common.masks.colormap import class_names, label_to_color, palette_for, panoptic_to_color
from tests.conftest import ADE_ROOT, COCO_ROOT, ROOT
from tests.test_browse import MIOU, masksyn_folder

datasets = pytest.importorskip("datasets")
webdataset = pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return masksyn_folder(tmp_path_factory.mktemp("export") / "masksyn-ade20k")


def pixels(value) -> np.ndarray:
    return np.asarray(value if isinstance(value, Image.Image) else Image.open(io.BytesIO(value)))


def test_hf_export_loads_with_datasets_offline(folder, tmp_path):
    paths = export.export("hf", tmp_path / "hf", folder=folder, shard_size=4)
    assert [p.name for p in paths] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    ds = datasets.load_dataset(str(tmp_path / "hf"), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 6 and isinstance(ds.features["image"], datasets.Image)
    names = class_names("ade20k")
    for row in ds:
        sid = row["id"]
        assert np.array_equal(pixels(row["annotation"]), pixels((folder / f"annotations/{sid}.png").read_bytes()))
        assert np.array_equal(pixels(row["colormap"]), pixels((folder / f"colormaps/{sid}.png").read_bytes()))
        assert row["image"].size == Image.open(folder / f"images/{sid}.jpg").size
        values = [int(v) for v in np.unique(pixels(row["annotation"])) if v > 0]
        assert row["class_values"] == values and row["classes"] == [names[v] for v in values]
        assert row["caption"].startswith("a scene") and row["seed"] in (1000, 1001)
        assert row["miou"] == MIOU[(row["source_id"], row["k"])]  # None where quality.py has not judged it
    card = (tmp_path / "hf/README.md").read_text()
    assert card.startswith("---\n") and "path: data/train-*.parquet" in card and "| 1 | wall |" in card


def test_webdataset_shards_read_by_webdataset(folder, tmp_path):
    paths = export.export("webdataset", tmp_path / "wds", folder=folder, shard_size=4)
    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar"]
    samples = list(webdataset.WebDataset([str(p) for p in paths], shardshuffle=False))
    assert len(samples) == 6
    for s in samples:
        sid = s["__key__"]
        assert s["jpg"] == (folder / f"images/{sid}.jpg").read_bytes()
        assert s["annotation.png"] == (folder / f"annotations/{sid}.png").read_bytes()
        meta = json.loads(s["json"])
        assert meta["id"] == sid and meta["miou"] == MIOU[(meta["source_id"], meta["k"])] and meta["classes"]
        assert s["txt"].decode().startswith("a scene")


def test_a_killed_export_redoes_only_the_missing_shard(folder, tmp_path):
    paths = export.export("webdataset", tmp_path / "wds", folder=folder, shard_size=4)
    before = paths[0].stat().st_mtime_ns
    paths[1].unlink()
    export.export("webdataset", tmp_path / "wds", folder=folder, shard_size=4)
    assert paths[0].stat().st_mtime_ns == before and paths[1].is_file()


def test_real_ade20k_split_exports_the_same_way(tmp_path):
    export.export("hf", tmp_path / "ade", data="ade20k", data_root=ADE_ROOT, split="val")
    ds = datasets.load_dataset(str(tmp_path / "ade"), split="validation", cache_dir=str(tmp_path / "cache"))
    real = {s.id: s for s in read_dataset("ade20k", ADE_ROOT, "val")}
    assert sorted(ds["id"]) == sorted(real)
    for row in ds:
        label = np.asarray(Image.open(real[row["id"]].annotation))
        assert np.array_equal(pixels(row["colormap"]), label_to_color(label, palette_for("ade20k")))
        assert row["method"] == "real" and row["caption"] == ""


def test_real_coco_panoptic_keeps_segments(tmp_path):
    paths = export.export("webdataset", tmp_path / "coco", data="coco", data_root=COCO_ROOT, split="val")
    samples = list(webdataset.WebDataset([str(p) for p in paths], shardshuffle=False))
    real = {s.id: s for s in read_dataset("coco", COCO_ROOT, "val")}
    assert sorted(s["__key__"] for s in samples) == sorted(real)
    for s in samples:
        r, meta = real[s["__key__"]], json.loads(s["json"])
        assert meta["segments_info"] == r.segments
        assert meta["class_values"] == sorted({x["category_id"] for x in r.segments})
        cmap = panoptic_to_color(rgb_to_id(np.asarray(Image.open(r.annotation))), r.segments, palette_for("coco"))
        assert np.array_equal(pixels(s["colormap.png"]), cmap)


def test_command_line_and_its_errors(folder, tmp_path, capsys):
    assert export.main([str(folder), "--to", "webdataset", str(tmp_path / "w"), "--shard-size", "10"]) == 0
    assert (tmp_path / "w/train-000000.tar").is_file()
    assert export.main([str(folder), "--to", "zip", str(tmp_path / "z")]) == 2
    assert "--to must be one of hf, webdataset" in capsys.readouterr().err
    assert export.main(["--to", "hf", str(tmp_path / "h")]) == 2
    assert "nothing to export" in capsys.readouterr().err
    r = subprocess.run([sys.executable, "-m", "common.data.export", str(tmp_path / "nothing"), "--to", "hf", str(tmp_path / "h")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
