"""JSONL manifests: atomic files, resume, per-rank files, validation."""

import json
from pathlib import Path

import pytest

from common import SegGenError
from common.data import manifest
from common.data.manifest import (
    CAPTION_FIELDS, ManifestWriter, atomic_save, done_ids, first_record, manifest_files, rank_path, read_ids,
    read_manifest,
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


# ---------------------------------------------------------------- streaming readers

def test_read_ids_agrees_with_done_ids_on_written_and_hand_written_lines(tmp_path):
    out = tmp_path / "synth"
    recs = [{"id": 'quote"d', "image": "images/a.jpg", "settings": {"id": "nested"}},
            {"id": "ümlaut", "caption": "a \"room\", {nested}", "segments_info": [{"id": 5}]},
            {"id": "plain"}]
    with ManifestWriter(rank_path(out / "manifest.jsonl", 0, 2)) as w:
        w.append_many(recs)
    # hand-written: id not first, an integer id, no newline after the last (complete) line
    (out / "manifest.rank1.jsonl").write_text('{"image": "x.jpg", "id": "late"}\n\n{"id": 7}')
    assert read_ids(out) == done_ids(out) == {'quote"d', "ümlaut", "plain", "late", "7"}
    assert first_record(out) == recs[0]
    assert first_record(tmp_path / "none") is None


def test_read_ids_skips_a_cut_line_and_names_bad_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b", "cap')  # killed mid-write: the id is there, the line is not
    assert read_ids(path) == {"a"}
    path.write_text('{"id": "a"}\nnot json\n')
    with pytest.raises(SegGenError, match=r"m.jsonl:2: not a JSON line"):
        read_ids(path)
    path.write_text('{"id": "a"}\n{"id": "a", "x": 1}\n')
    with pytest.raises(SegGenError, match=r"m.jsonl:2: id 'a' was already written"):
        read_ids(path)
    path.write_bytes(b'{"id": "a"}\n{"id": "b", "caption": "\xff\xfe"}\n')  # not UTF-8
    with pytest.raises(SegGenError, match=r"m.jsonl:2: not a JSON line"):
        read_manifest(path)


@pytest.mark.parametrize("tail", [b'{"id": "c", "cap', b"x" * 300])
def test_writer_drops_a_long_partial_line_reading_only_the_tail(tmp_path, tail, monkeypatch):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}\n' + tail)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read the whole file"))
    manifest._drop_partial_line(path, chunk=16)  # several chunks back to the newline
    monkeypatch.undo()
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    path.write_bytes(b"no newline at all")
    manifest._drop_partial_line(path, chunk=4)
    assert path.read_bytes() == b""


def test_read_ids_finds_an_id_written_twice_in_different_chunks(tmp_path, monkeypatch):
    """The fast path reads whole chunks: a duplicate of an id from an earlier chunk is still named."""
    import functools
    monkeypatch.setattr(manifest, "iter_chunks", functools.partial(manifest.iter_chunks, size=40))
    path = tmp_path / "m.jsonl"
    lines = [json.dumps({"id": f"id{i}", "caption": "c"}) for i in range(6)] + [json.dumps({"id": "id1", "caption": "c"})]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SegGenError, match=r"m.jsonl:7: id 'id1' was already written"):
        read_ids(path)
    path.write_text("\n".join(lines[:6]) + "\n")
    assert read_ids(path) == {f"id{i}" for i in range(6)}
    path.write_text('{"id": "a"}\n{"id": ""}\r\n{"id": "b"}\n\n{"id": "c"}\n')  # an empty id, CRLF, a blank line
    assert read_ids(path) == {"a", "", "b", "c"} == done_ids(path)


def test_iter_chunks_cover_the_file_and_end_at_newlines(tmp_path):
    """The fast scanners' pieces: joined they are the file; each ends with a newline but the file's
    last; a line longer than a piece is read whole."""
    import random
    rng, path = random.Random(0), tmp_path / "m.jsonl"
    for _ in range(200):
        data = b"".join(b"x" * rng.randint(0, 30) + b"\n" for _ in range(rng.randint(0, 12)))
        data += b"y" * rng.randint(0, 40) * (rng.random() < 0.5)  # a cut last line, or none
        path.write_bytes(data)
        pieces = list(manifest.iter_chunks(path, size=rng.randint(1, 25)))
        assert b"".join(c for _, c in pieces) == data
        assert [o for o, _ in pieces] == [sum(len(c) for _, c in pieces[:j]) for j in range(len(pieces))]
        assert all(c.endswith(b"\n") for _, c in pieces[:-1]) and all(pieces_c for _, pieces_c in pieces)


def test_a_failed_write_is_one_message_naming_the_file_and_keeps_the_lines_before(tmp_path, monkeypatch):
    """Disk full during an append (the fsync fails): SegGenError naming the manifest; earlier lines stay."""
    import errno
    import os

    import pytest

    from common import SegGenError
    from common.data.manifest import ManifestWriter, read_manifest

    path = tmp_path / "m.jsonl"
    with ManifestWriter(path) as w:
        w.append({"id": "a"})

        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "fsync", full)
        with pytest.raises(SegGenError, match=r"cannot write .*m.jsonl \(No space left on device\).*rerun"):
            w.append({"id": "b"})
        monkeypatch.undo()
    assert [r["id"] for r in read_manifest(path)][0] == "a"
    (tmp_path / "file").write_text("x")
    with pytest.raises(SegGenError, match=r"cannot write .*file/m.jsonl"):
        ManifestWriter(tmp_path / "file" / "m.jsonl")
