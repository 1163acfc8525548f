"""JSONL manifests: atomic files, resume, per-rank files, validation."""

import json

import pytest

from common import SegGenError
from common.manifest import (
    CAPTION_FIELDS, ManifestWriter, atomic_save, done_ids, manifest_files, rank_path, read_manifest,
)


def test_append_then_resume_skips_done_ids(tmp_path):
    path = tmp_path / "captions.jsonl"
    with ManifestWriter(path, path_fields=("image",)) as w:
        for i in range(3):
            w.append({"id": f"a{i}", "image": f"images/a{i}.jpg", "caption": "x"})
    assert done_ids(path) == {"a0", "a1", "a2"}
    todo = [f"a{i}" for i in range(5) if f"a{i}" not in done_ids(path)]
    with ManifestWriter(path) as w:
        for i in todo:
            w.append({"id": i, "image": f"images/{i}.jpg", "caption": "y"})
    assert [r["id"] for r in read_manifest(path, CAPTION_FIELDS)] == ["a0", "a1", "a2", "a3", "a4"]


def test_line_cut_by_a_kill_is_skipped_then_dropped(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"id": "a"}) + "\n" + '{"id": "b", "cap')  # killed mid-write
    assert [r["id"] for r in read_manifest(path)] == ["a"]
    with ManifestWriter(path) as w:  # reopening drops the partial line before appending
        w.append({"id": "b"})
    assert path.read_text().splitlines() == ['{"id": "a"}', '{"id": "b"}']


def test_rank_files_read_as_one(tmp_path):
    out = tmp_path / "synth"
    assert rank_path(out / "manifest.jsonl", 0, 1) == out / "manifest.jsonl"
    for rank in range(2):
        with ManifestWriter(rank_path(out / "manifest.jsonl", rank, 2)) as w:
            w.append({"id": f"r{rank}"})
    assert sorted(p.name for p in manifest_files(out)) == ["manifest.rank0.jsonl", "manifest.rank1.jsonl"]
    assert done_ids(out) == {"r0", "r1"}
    cap = tmp_path / "ade20k_train.jsonl"
    for rank in range(2):
        with ManifestWriter(rank_path(cap, rank, 2)) as w:
            w.append({"id": f"c{rank}"})
    assert done_ids(cap) == {"c0", "c1"}  # NAME.jsonl's family includes NAME.rank*.jsonl


def test_validation_names_file_and_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "image": "x.jpg"}\n{"id": "b"}\n')
    with pytest.raises(SegGenError, match=r"m.jsonl:2: missing field\(s\) image"):
        read_manifest(path, required=("id", "image"))
    path.write_text('{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(SegGenError, match=r"m.jsonl:2: not a JSON line"):
        read_manifest(path)
    path.write_text('{"id": "a"}\n{"id": "a"}\n')
    with pytest.raises(SegGenError, match=r"m.jsonl:2: id 'a' was already written at .*m.jsonl:1"):
        read_manifest(path)


@pytest.mark.parametrize("bad", ["/abs/x.png", "../x.png", "a/../../x.png", "C:\\x.png", ""])
def test_paths_must_be_relative_without_dotdot(tmp_path, bad):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"id": "a", "image": bad}) + "\n")
    with pytest.raises(SegGenError, match="must be relative"):
        read_manifest(path, path_fields=("image",))
    with pytest.raises(SegGenError, match="must be relative"), ManifestWriter(tmp_path / "w.jsonl", ("image",)) as w:
        w.append({"id": "a", "image": bad})
    assert "a" not in done_ids(tmp_path / "w.jsonl")  # nothing was written


def test_atomic_save_leaves_no_partial_file(tmp_path):
    target = tmp_path / "images" / "a.png"

    def fails(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_save(target, fails)
    assert not target.exists() and list(target.parent.iterdir()) == []
    atomic_save(target, lambda tmp: tmp.write_bytes(b"whole"))
    assert target.read_bytes() == b"whole" and len(list(target.parent.iterdir())) == 1
