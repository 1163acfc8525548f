"""Compact, cached indexes of a synthetic folder and of a COCO panoptic split (paper scale: 1.2 M
synthetic samples, 118k COCO images).

An index holds numpy arrays only (ids and paths packed into one bytes blob with offsets, the byte
offset of each manifest line), so DataLoader workers forked from the main process share it without
copying: there is no per-sample Python object whose reference count would dirty the pages. A sample's
full record (caption, settings, segments_info) is read from its line only when the sample is loaded;
`index[i]` is the same `Sample` that `read_synthetic` / `read_coco_panoptic` give.

Both are cached on disk as .npz next to what they index (synthetic: FOLDER/.index.npz; COCO:
annotations/.panoptic_{split}2017.index.npz, or ~/.cache/seggen/ when that folder is read-only) and
rebuilt when the source changes (size and mtime of each manifest file / of the JSON).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from array import array
from pathlib import Path

import numpy as np

from common import SegGenError
from common.manifest import _ID_LINE, SYNTHETIC_FIELDS, atomic_save, check_relative, iter_chunks, iter_lines_of, manifest_files, parse_line

INDEX_VERSION = 1
SYNTHETIC_PATHS = ("image", "annotation", "colormap")


class Packed:
    """Many strings in one uint8 blob with int64 offsets: 2 arrays instead of N Python objects."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets

    @classmethod
    def pack(cls, strings) -> Packed:
        return cls.pack_bytes([s.encode("utf-8") for s in strings])

    @classmethod
    def pack_bytes(cls, data: list[bytes]) -> Packed:
        offsets = np.zeros(len(data) + 1, np.int64)
        np.cumsum([len(b) for b in data], out=offsets[1:])
        return cls(np.frombuffer(b"".join(data), np.uint8), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")


def _cache_key(files: list[Path], folders: tuple[Path, ...] = ()) -> str:
    """What an index depends on: its files' names, sizes and mtimes (and folders' mtimes: a file
    added or deleted in them changes it)."""
    stats = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return json.dumps([INDEX_VERSION] + stats + [[d.name, d.stat().st_mtime_ns] for d in folders if d.is_dir()])


def _load(path: Path, key: str) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):  # missing, unreadable or from another version: rebuild
        return None


def _save(path: Path, arrays: dict) -> bool:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    try:
        atomic_save(path, write)
        return True
    except OSError:  # a read-only folder: the index lives in memory only
        return False


# ---------------------------------------------------------------- synthetic folders

class SyntheticIndex:
    """A synthetic folder (masksyn / imgsyn output) as a sequence of Samples, read lazily."""

    def __init__(self, folder: Path, arrays: dict):
        self.folder = folder
        self.files = [str(f) for f in arrays["files"]]
        self.ids = Packed(arrays["id_blob"], arrays["id_off"])
        self.images = Packed(arrays["image_blob"], arrays["image_off"])
        self.annotations = Packed(arrays["annotation_blob"], arrays["annotation_off"])
        self.file_no, self.line_off, self.line_no = arrays["file_no"], arrays["line_off"], arrays["line_no"]

    def __len__(self) -> int:
        return len(self.line_off)

    def record(self, i: int) -> dict:
        """The full manifest record of sample i (one seek and one line read)."""
        file = self.folder / self.files[self.file_no[i]]
        where = f"{file}:{self.line_no[i]}"
        try:
            with open(file, "rb") as f:
                f.seek(int(self.line_off[i]))
                rec = parse_line(f.readline(), where)
        except OSError as e:
            raise SegGenError(f"{where}: cannot read the manifest line ({e})") from e
        if str(rec["id"]) != self.ids[i]:
            raise SegGenError(f"{where}: the manifest changed since it was indexed (expected id {self.ids[i]!r}); "
                              f"rerun to rebuild {self.folder}/.index.npz")
        return rec

    def __getitem__(self, i: int):
        from common.datasets import synthetic_sample

        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        rec = self.record(i)
        for key in SYNTHETIC_PATHS:
            check_relative(str(rec.get(key, "")), f"{self.folder / self.files[self.file_no[i]]}:{self.line_no[i]}")
        return synthetic_sample(self.folder, rec, f"{self.folder / self.files[self.file_no[i]]}:{self.line_no[i]}")

    def __iter__(self):
        return (self[i] for i in range(len(self)))


_STR = rb'"((?:[^"\\\n]|\\.)*)"'
_SCALAR = rb'(?:"(?:[^"\\\n]|\\.)*"|-?[0-9.eE+-]+|null|true|false)'
# A line as synth.sample_record writes it: id first, then scalar fields, then image, annotation and
# colormap in this order, then the rest (the nested settings, models, segments_info).
_SYNTH_LINE = re.compile(rb'^\{"id": ' + _STR + rb'(?:, "[a-z_]+": ' + _SCALAR + rb')*?, "image": ' + _STR +
                         rb', "annotation": ' + _STR + rb', "colormap": ' + _STR + rb'[,}][^\n]*$', re.M)


def _relative_ok(p: str) -> bool:  # the common case of manifest.check_relative, without PurePosixPath
    return bool(p) and p[0] != "/" and "\\" not in p and p[1:2] != ":" and ".." not in p.split("/")


def build_synthetic_arrays(folder: Path, files: list[Path]) -> dict:
    """Scan the manifests once: ids, paths and line offsets, with read_manifest's checks of what the
    index uses (relative paths, unique ids) and of the other fields' presence; the rest of a record is
    parsed when its sample is loaded."""
    ids, images, annotations = [], [], []
    file_no, line_off, line_no = array("h"), array("q"), array("i")
    seen: set[bytes] = set()
    keys = [(key, f'"{key}": '.encode()) for key in SYNTHETIC_FIELDS]
    for k, file in enumerate(files):
        for base, first, chunk in iter_chunks(file):
            if _fast_chunk(chunk, base, first, k, keys, seen, ids, images, annotations, file_no, line_off, line_no):
                continue
            for n, offset, line in iter_lines_of(chunk, base, first):
                _slow_line(folder, file, k, n, offset, line, keys, seen, ids, images, annotations, file_no, line_off, line_no)
    del seen
    return _pack(files, ids, images, annotations, file_no, line_off, line_no)


_BAD_PATH = re.compile(rb'^/|\\|^.:|(?:^|/)\.\.(?:/|$)', re.M)


def _fast_chunk(chunk, base, first, k, keys, seen, ids, images, annotations, file_no, line_off, line_no) -> bool:
    """A chunk where every line is in sample_record's form, with relative paths, every field present
    (counted over the chunk) and new ids: added in a few vectorised steps. False: the caller goes
    line by line (and names what is wrong)."""
    found = _ID_LINE.findall(chunk)  # ids only: paths are checked when a sample is loaded (synthetic_sample)
    newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10)
    if not chunk.endswith(b"\n") or len(found) != len(newlines):
        return False
    if any(chunk.count(quoted) < len(found) for _, quoted in keys):
        return False
    cols = [found, [b""] * len(found), [b""] * len(found)]
    if any(b"\\" in x for x in found):
        return False
    before = len(seen)
    seen.update(cols[0])
    if len(seen) != before + len(found):
        seen.difference_update(cols[0])
        return False
    ids.extend(cols[0]), images.extend(cols[1]), annotations.extend(cols[2])
    starts = np.concatenate([[0], newlines[:-1] + 1]) + base
    line_off.extend(starts.tolist()), line_no.extend(range(first, first + len(found)))
    file_no.extend([k] * len(found))
    return True


def _slow_line(folder, file, k, n, offset, line, keys, seen, ids, images, annotations, file_no, line_off, line_no):
    """One line of a chunk that was not clean: checked and added, or SegGenError naming file:line."""
    m = _SYNTH_LINE.match(line)
    where = f"{file}:{n}"
    if m is not None:
        rid, img, ann, cmap = (g if b"\\" not in g else json.loads(b'"' + g + b'"').encode() for g in m.groups())
        missing = [key for key, quoted in keys if quoted not in line]
        if missing:
            raise SegGenError(f"{where}: missing field(s) {', '.join(missing)}")
        paths = (img.decode("utf-8", "replace"), ann.decode("utf-8", "replace"), cmap.decode("utf-8", "replace"))
    else:  # not in sample_record's form: parse it
        rec = parse_line(line, where)
        missing = [key for key in SYNTHETIC_FIELDS if key not in rec]
        if missing:
            raise SegGenError(f"{where}: missing field(s) {', '.join(missing)}")
        rid, paths = str(rec["id"]).encode(), tuple(str(rec[key]) for key in SYNTHETIC_PATHS)
        img, ann = paths[0].encode(), paths[1].encode()
    if not all(_relative_ok(p) for p in paths):
        for p in paths:
            check_relative(p, where)
    if rid in seen:
        raise SegGenError(f"{where}: id {rid.decode('utf-8', 'replace')!r} was already written earlier in {folder}")
    seen.add(rid)
    ids.append(rid), images.append(img), annotations.append(ann)
    file_no.append(k), line_off.append(offset), line_no.append(n)


def _pack(files, ids, images, annotations, file_no, line_off, line_no) -> dict:
    arrays = {"files": np.array([f.name for f in files], dtype=str)}
    for name, strings in (("id", ids), ("image", images), ("annotation", annotations)):
        packed = Packed.pack_bytes(strings)
        arrays[f"{name}_blob"], arrays[f"{name}_off"] = packed.blob, packed.offsets
        strings.clear()
    arrays["file_no"] = np.frombuffer(file_no, np.int16).copy()
    arrays["line_off"] = np.frombuffer(line_off, np.int64).copy()
    arrays["line_no"] = np.frombuffer(line_no, np.int32).copy()
    return arrays


def synthetic_index(folder: str | Path, cache: bool = True) -> SyntheticIndex:
    """The index of a synthetic folder, from FOLDER/.index.npz when it matches the manifests' sizes
    and mtimes, else built (and saved there when the folder is writable)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SegGenError(f"synthetic folder {folder} does not exist: run masksyn.py or imgsyn.py first, or fix --synthetic")
    files = manifest_files(folder)
    key, path = _cache_key(files), folder / ".index.npz"
    arrays = _load(path, key) if cache else None
    if arrays is None:
        arrays = build_synthetic_arrays(folder, files)
        arrays["key"] = np.array(key)
        if cache:
            _save(path, arrays)
    if len(arrays["line_off"]) == 0:
        raise SegGenError(f"synthetic folder {folder} has no samples (no manifest*.jsonl lines)")
    return SyntheticIndex(folder, arrays)


# ---------------------------------------------------------------- COCO panoptic

class CocoPanopticIndex:
    """A COCO panoptic split as a sequence of Samples sorted by id; segments_info kept as compact
    JSON bytes per image and decoded when the sample is loaded."""

    def __init__(self, root: Path, split: str, arrays: dict):
        self.img_dir = root / f"{split}2017"
        self.png_dir = root / "annotations" / f"panoptic_{split}2017"
        self.ids = Packed(arrays["id_blob"], arrays["id_off"])
        self.images = Packed(arrays["image_blob"], arrays["image_off"])
        self.pngs = Packed(arrays["png_blob"], arrays["png_off"])
        self.segments = Packed(arrays["seg_blob"], arrays["seg_off"])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        from common.datasets import Sample

        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return Sample(self.ids[i], self.img_dir / self.images[i], self.png_dir / self.pngs[i],
                      segments=json.loads(self.segments[i]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def _coco_cache_path(ann_json: Path) -> list[Path]:
    """Where the COCO index may live: beside the JSON, else in the user's cache folder."""
    digest = hashlib.sha1(str(ann_json.resolve()).encode()).hexdigest()[:16]
    cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "seggen"
    return [ann_json.parent / f".{ann_json.stem}.index.npz", cache_home / f"{ann_json.stem}-{digest}.index.npz"]


def build_coco_arrays(root: Path, split: str, ann_json: Path) -> dict:
    from common.colormap import coco_categories

    try:
        meta = json.loads(ann_json.read_bytes())
        files = {im["id"]: im["file_name"] for im in meta["images"]}
        anns = meta["annotations"]
    except (ValueError, KeyError, TypeError) as e:
        raise SegGenError(f"{ann_json}: not a COCO panoptic annotation file ({e})") from e
    known = {c["id"] for c in coco_categories()}
    img_dir, png_dir = root / f"{split}2017", root / "annotations" / f"panoptic_{split}2017"
    rows = []
    for ann in anns:
        try:
            bad = {s["category_id"] for s in ann["segments_info"]} - known
            image, png = files[ann["image_id"]], ann["file_name"]
        except (KeyError, TypeError) as e:
            raise SegGenError(f"{ann_json}: annotation {str(ann)[:80]} is not COCO panoptic ({e!r} missing)") from e
        if bad:
            raise SegGenError(f"{ann_json}: image {ann['image_id']} has unknown category ids {sorted(bad)}")
        for p in (img_dir / image, png_dir / png):
            if not p.is_file():
                raise SegGenError(f"{ann_json} lists {p}, which does not exist")
        rows.append((Path(png).stem, image, png, json.dumps(ann["segments_info"], separators=(",", ":"))))
    del meta, anns, files
    rows.sort(key=lambda r: r[0])
    arrays = {}
    for j, name in enumerate(("id", "image", "png", "seg")):
        packed = Packed.pack(r[j] for r in rows)
        arrays[f"{name}_blob"], arrays[f"{name}_off"] = packed.blob, packed.offsets
    return arrays


def coco_panoptic_index(root: str | Path, split: str, cache: bool = True) -> CocoPanopticIndex:
    """The index of root/annotations/panoptic_{split}2017.json, built once and cached (see module doc).
    The JSON must exist (datasets.read_coco_panoptic checks the layout and names what is missing)."""
    root = Path(root)
    ann_json = root / "annotations" / f"panoptic_{split}2017.json"
    key = _cache_key([ann_json], (root / f"{split}2017", root / "annotations" / f"panoptic_{split}2017"))
    candidates = _coco_cache_path(ann_json) if cache else []
    for path in candidates:
        arrays = _load(path, key)
        if arrays is not None:
            return CocoPanopticIndex(root, split, arrays)
    arrays = build_coco_arrays(root, split, ann_json)
    arrays["key"] = np.array(key)
    for path in candidates:
        if _save(path, arrays):
            break
    return CocoPanopticIndex(root, split, arrays)

