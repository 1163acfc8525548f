"""Cached indexes of synthetic folders and COCO panoptic splits (common/data/index.py): the same Samples
as the validating readers, on real sample data, rebuilt when their source changes."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import ADE_ROOT, COCO_ROOT

from common import SegGenError
from common.data.datasets import (
    _read_coco_panoptic_json, coco_panoptic_index, load_label, load_panoptic, read_dataset, read_synthetic, synthetic_index,
)
from common.data.manifest import ManifestWriter, rank_path

PATHS = ("image", "annotation", "colormap")


def _write(folder, samples, rank=0, world=1, caption="a room"):
    """A synthetic folder by hand, as imgsyn writes it (COCO samples carry their segments_info)."""
    for sub in ("images", "annotations", "colormaps"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    with ManifestWriter(rank_path(folder / "manifest.jsonl", rank, world), PATHS) as w:
        for s in samples:
            sid = f"{s.id}_r{rank}"
            shutil.copy(s.image, folder / f"images/{sid}.jpg")
            shutil.copy(s.annotation, folder / f"annotations/{sid}.png")
            shutil.copy(s.annotation, folder / f"colormaps/{sid}.png")
            rec = {"id": sid, "source_id": s.id, "k": 0, "method": "imgsyn", "image": f"images/{sid}.jpg",
                   "annotation": f"annotations/{sid}.png", "colormap": f"colormaps/{sid}.png", "caption": caption,
                   "seed": 1, "settings": {"data": "x", "image": "nested"}, "models": {"base": "b"}, "batch": [[s.id, 0]]}
            if s.segments is not None:
                rec["segments_info"] = s.segments
            w.append(rec)
    return folder


@pytest.mark.parametrize("data,root", [("ade20k", ADE_ROOT), ("coco", COCO_ROOT)])
def test_index_gives_read_synthetics_samples_and_is_cached(tmp_path, data, root):
    real = read_dataset(data, root, "val")
    folder = _write(tmp_path / "synth", real, 0, 2)
    _write(folder, real[:1], 1, 2)
    index = synthetic_index(folder)
    assert (folder / ".index.npz").is_file()
    assert len(index) == 3 and list(index) == read_synthetic(folder)  # same ids, paths, records, segments
    assert index[-1] == read_synthetic(folder)[-1]
    for s in index:
        assert np.array_equal(load_label(s, data), load_label(real[0] if s.meta["source_id"] == real[0].id else real[1], data))
        if data == "coco":
            load_panoptic(s)
    mtime = (folder / ".index.npz").stat().st_mtime_ns
    assert list(synthetic_index(folder)) == list(index) and (folder / ".index.npz").stat().st_mtime_ns == mtime  # reused
    _write(folder, real[1:], 1, 2)  # a resumed rank appends: the index is rebuilt
    assert [s.id for s in synthetic_index(folder)] == [s.id for s in read_synthetic(folder)] and len(read_synthetic(folder)) == 4


def test_index_over_many_chunks_and_odd_lines(tmp_path, monkeypatch):
    """Small chunks: the fast path (whole chunks in C) and the line-by-line one (a blank line, an escaped
    id, a hand-written line) give read_synthetic's samples; an id repeated in a later chunk is named."""
    import functools

    from common.data import index as idx
    monkeypatch.setattr(idx, "iter_chunks", functools.partial(idx.iter_chunks, size=700))
    real = read_dataset("ade20k", ADE_ROOT, "val")
    folder = _write(tmp_path / "synth", real * 3, 0, 2)  # ids _r0 repeated: rewrite them unique below
    lines = (folder / "manifest.rank0.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    for j, r in enumerate(recs):
        r["id"] = f'{r["id"]}_{j}' if j != 4 else 'quote"d'
    text = [json.dumps(r) for r in recs]
    text[2] = json.dumps({k: recs[2][k] for k in reversed(list(recs[2]))})  # id last: parsed with json.loads
    (folder / "manifest.rank0.jsonl").write_text("\n".join(text[:3]) + "\n\n" + "\n".join(text[3:]) + "\n")
    index = idx.synthetic_index(folder, cache=False)
    assert list(index) == read_synthetic(folder) and len(index) == 6
    assert index.where(5).endswith("manifest.rank0.jsonl:7")  # after the blank line
    with open(folder / "manifest.rank0.jsonl", "a") as f:
        f.write(text[1] + "\n")
    with pytest.raises(SegGenError, match=r"manifest.rank0.jsonl:8: id 'ADE_val_00000002_r0_1' was already written"):
        idx.synthetic_index(folder, cache=False)


def test_index_of_a_read_only_folder_lives_in_memory(tmp_path):
    folder = _write(tmp_path / "synth", read_dataset("ade20k", ADE_ROOT, "val"))
    (folder / ".index.npz").mkdir()  # cannot be written (as in a read-only folder; tests may run as root)
    assert [s.id for s in synthetic_index(folder)] == ["ADE_val_00000001_r0", "ADE_val_00000002_r0"]


def test_index_arrays_hold_no_per_sample_objects(tmp_path):
    index = synthetic_index(_write(tmp_path / "synth", read_dataset("ade20k", ADE_ROOT, "val")))
    arrays = [index.ids.blob, index.ids.offsets, index.line_off, index.line_no, index.file_no]
    assert all(isinstance(a, np.ndarray) and a.dtype != object for a in arrays)


def test_index_errors_name_manifest_and_line(tmp_path):
    real = read_dataset("ade20k", ADE_ROOT, "val")
    folder = _write(tmp_path / "missing", real)
    (folder / "images/ADE_val_00000002_r0.jpg").unlink()
    with pytest.raises(SegGenError, match=r"missing/manifest.jsonl:2: image file .*ADE_val_00000002_r0.jpg is missing"):
        synthetic_index(folder)[1]
    with pytest.raises(SegGenError, match=r"missing/manifest.jsonl:2 \(id 'ADE_val_00000002_r0'\): image file .* is missing"):
        read_synthetic(folder)
    folder = _write(tmp_path / "link", real)
    outside = tmp_path / "secret.png"
    shutil.copy(real[0].annotation, outside)
    (folder / "annotations/ADE_val_00000001_r0.png").unlink()
    os.symlink(outside, folder / "annotations/ADE_val_00000001_r0.png")  # the text is inside, the file is not
    for read in (lambda: synthetic_index(folder)[0], lambda: read_synthetic(folder)):
        with pytest.raises(SegGenError, match=r"annotation 'annotations/ADE_val_00000001_r0.png' resolves to .*secret.png, outside"):
            read()
    dup = tmp_path / "dup"
    _write(dup, real[:1], 0, 2), _write(dup, real[:1], 0, 2)
    with pytest.raises(SegGenError, match=r"manifest.rank0.jsonl:2: id 'ADE_val_00000001_r0' was already written"):
        synthetic_index(dup)
    bad = tmp_path / "abs"
    bad.mkdir()
    line = {"id": "x", "source_id": "y", "method": "imgsyn", "image": "/etc/passwd", "annotation": "a.png",
            "colormap": "c.png", "caption": "c", "seed": 0, "models": {}}
    (bad / "manifest.jsonl").write_text(json.dumps(line) + "\n" + json.dumps({"id": "z"}) + "\n")
    with pytest.raises(SegGenError, match=r"manifest.jsonl:1: path '/etc/passwd' must be relative"):
        synthetic_index(bad)[0]
    (bad / "manifest.jsonl").write_text(json.dumps({**line, "image": "i.jpg"}) + "\n" + json.dumps({"id": "z"}) + "\n")
    with pytest.raises(SegGenError, match=r"manifest.jsonl:2: missing field\(s\) source_id"):
        synthetic_index(bad)[1]  # the index is built from ids; a record's fields are checked when it is loaded
    (bad / "manifest.jsonl").write_text(json.dumps({**line, "image": "i.jpg"}) + "\nnot json\n")
    with pytest.raises(SegGenError, match=r"manifest.jsonl:2: not a JSON line"):
        synthetic_index(bad)
    null = _write(tmp_path / "null", real[:1], caption=None)
    with pytest.raises(SegGenError, match=r"null/manifest.jsonl:1: caption must be a string \(got None\)"):
        synthetic_index(null)[0]


def test_coco_index_is_the_json_cached_and_rebuilt_when_it_changes(tmp_path, monkeypatch):
    root = tmp_path / "coco"
    shutil.copytree(COCO_ROOT, root, ignore=shutil.ignore_patterns("*.index.npz"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cached = root / "annotations/.panoptic_val2017.index.npz"
    assert list(coco_panoptic_index(root, "val")) == _read_coco_panoptic_json(root, "val")
    assert cached.is_file() and list(coco_panoptic_index(root, "val")) == _read_coco_panoptic_json(root, "val")
    ann = root / "annotations/panoptic_val2017.json"
    meta = json.loads(ann.read_text())
    meta["annotations"] = meta["annotations"][:1]
    ann.write_text(json.dumps(meta))
    assert [s.id for s in coco_panoptic_index(root, "val")] == [s.id for s in _read_coco_panoptic_json(root, "val")]
    assert len(coco_panoptic_index(root, "val")) == 1
    (root / "val2017" / meta["images"][0]["file_name"]).unlink()  # a listed file deleted: checked again
    with pytest.raises(SegGenError, match=r"lists .*\.jpg, which does not exist"):
        coco_panoptic_index(root, "val")


def test_coco_index_of_a_read_only_dataset_goes_to_the_cache_folder(tmp_path, monkeypatch):
    root = tmp_path / "coco"
    shutil.copytree(COCO_ROOT, root, ignore=shutil.ignore_patterns("*.index.npz"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (root / "annotations/.panoptic_val2017.index.npz").mkdir()  # cannot be written there
    assert [s.id for s in coco_panoptic_index(root, "val")] == ["000000142238", "000000439180"]
    assert len(list((tmp_path / "cache/seggen").glob("panoptic_val2017-*.index.npz"))) == 1
    assert list(coco_panoptic_index(root, "val")) == _read_coco_panoptic_json(root, "val")  # read from there


def test_provenance_views_and_filtered_annotations_match_the_record_list(tmp_path):
    """What train_seg decides at start-up from an index (FOLDER:k, hardness groups, filtered annotations)
    is what it decided from read_synthetic's records: lines in ManifestWriter's form (read by regex) and
    hand-written ones (another key order, an escaped id, no k: read by json) alike."""
    from common.data.index import first_per_source, provenance, sample_ids

    real = read_dataset("ade20k", ADE_ROOT, "val")
    folder = _write(tmp_path / "synth", real)
    with open(folder / "manifest.jsonl", "a") as f:
        for sid, rec in [('h"q', {"k": 3, "source_id": "S", "method": "masksyn"}), ("noK", {"source_id": "S", "method": "imgsyn"})]:
            name = sid.replace('"', "_")
            shutil.copy(real[0].image, folder / f"images/{name}.jpg")
            shutil.copy(real[0].annotation, folder / f"annotations/{name}.png")
            f.write(json.dumps({"caption": "a", "image": f"images/{name}.jpg", "annotation": f"annotations/{name}.png",
                                "colormap": f"images/{name}.jpg", "id": sid, "seed": 0, "models": {}, **rec}) + "\n")
    index, records = synthetic_index(folder), read_synthetic(folder)
    got, want = provenance(index), provenance(records)
    assert got["k"].tolist() == want["k"].tolist() == [0, 0, 3, -1]
    assert {k: got[k] for k in ("source_id", "method", "annotation")} == {k: want[k] for k in ("source_id", "method", "annotation")}
    assert got["source_id"] == ["ADE_val_00000001", "ADE_val_00000002", "S", "S"]
    for k in (1, 2):  # FOLDER:k: the same samples from the index (a view) as from the records (a list)
        picked = first_per_source(index, k)
        assert not isinstance(picked, list) and list(picked) == first_per_source(records, k)
    assert [s.id for s in first_per_source(index, 1)] == ["ADE_val_00000001_r0", "ADE_val_00000002_r0", 'h"q']  # S: k=3 before none
    view = index.take([3, 0])
    assert list(view) == [records[3], records[0]] and sample_ids(view) == ["noK", "ADE_val_00000001_r0"]
    assert provenance(view)["k"].tolist() == [-1, 0] and view.take([1])[0] == records[0]
    moved = view.with_annotations_in(folder / "elsewhere")
    assert [s.annotation for s in moved] == [folder / "elsewhere/noK.png", folder / "elsewhere/ADE_val_00000001_r0.png"]
    assert isinstance(view.positions, np.ndarray) and view.index is index  # the arrays are shared, not copied
    with pytest.raises(IndexError):
        view[2]
