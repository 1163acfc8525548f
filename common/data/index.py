"""Compact, cached indexes of a synthetic folder and of a COCO panoptic split (paper scale: 1.2 M
synthetic samples, 118k COCO images).

An index holds numpy arrays only (strings packed into one bytes blob with offsets; for a synthetic
folder its ids and the file, byte offset and number of each manifest line), so DataLoader workers forked from the main process share it without
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
from pathlib import Path

import numpy as np

from common import SegGenError
from common.data.ids import safe_name
from common.data.sample import Sample, synthetic_sample
from common.data.manifest import (
    SYNTHETIC_FIELDS, atomic_save, check_relative, chunk_ids, iter_chunks, iter_lines_of, line_id, manifest_files, parse_line,
)

INDEX_VERSION = 2  # 2: ids and line offsets only (paths read from the record)
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
    """Write the index once: the process that takes `.lock.NAME` beside it (without waiting) writes it,
    and one that finds it taken leaves the writing to that one (issue 26 item 5: index files written by
    one process; the many processes of a train_seg start each build the same index). Atomic either way."""
    import fcntl

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(f".lock.{path.name.lstrip('.')}"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a read-only folder: the index lives in memory only
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process is writing the same index now
            return False
        except OSError:  # no locks on this filesystem: the atomic rename alone keeps readers safe
            pass
        atomic_save(path, write)
        return True
    except OSError:  # a read-only folder: the index lives in memory only
        return False
    finally:
        os.close(fd)


# ---------------------------------------------------------------- synthetic folders

class SyntheticIndex:
    """A synthetic folder (masksyn / imgsyn output) as a sequence of Samples, read lazily.

    Built from the ids alone (the index is checked for unique ids and JSON lines); everything else of a
    record (its fields, relative paths, files inside the folder, caption) is checked when its sample is
    loaded, with a SegGenError naming manifest:line."""

    def __init__(self, folder: Path, arrays: dict):
        self.folder = folder
        self.files = [str(f) for f in arrays["files"]]
        self.ids = Packed(arrays["id_blob"], arrays["id_off"])
        self.file_no, self.line_off, self.line_no = arrays["file_no"], arrays["line_off"], arrays["line_no"]

    def __len__(self) -> int:
        return len(self.line_off)

    def where(self, i: int) -> str:
        return f"{self.folder / self.files[self.file_no[i]]}:{self.line_no[i]}"

    def record(self, i: int) -> dict:
        """The full manifest record of sample i (one seek and one line read)."""
        file, where = self.folder / self.files[self.file_no[i]], self.where(i)
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
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        rec, where = self.record(i), self.where(i)
        missing = [key for key in SYNTHETIC_FIELDS if key not in rec]
        if missing:
            raise SegGenError(f"{where}: missing field(s) {', '.join(missing)}")
        for key in SYNTHETIC_PATHS:
            check_relative(str(rec[key]), where)
        return synthetic_sample(self.folder, rec, where)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def id(self, i: int) -> str:
        """Sample i's id, from the index alone (no manifest read)."""
        return self.ids[i]

    def provenance(self) -> dict:
        """Every record's {"source_id": [str], "k": (N,) int64 (-1: none recorded), "method": [str],
        "annotation": [str]} in index order: one pass over the manifests (a regex on ManifestWriter's
        line form, json for any other line), for start-up decisions (FOLDER:k, hardness groups, the
        filtered annotations). Transient: nothing of it is kept on the index."""
        intern: dict[str, str] = {}
        source, method, annotation = [], [], []
        k = np.full(len(self), -1, np.int64)
        for no, name in enumerate(self.files):
            positions = np.flatnonzero(self.file_no == no)  # this file's lines, in line order
            with open(self.folder / name, "rb") as f:
                for i, off in zip(positions.tolist(), self.line_off[positions].tolist()):
                    f.seek(off)
                    line = f.readline()
                    m = _PROVENANCE.match(line)
                    if m is not None and b"\\" not in m.group(0):
                        src, kk, meth, ann = (m.group(1).decode(), int(m.group(2)), m.group(3).decode(), m.group(4).decode())
                    else:
                        rec = parse_line(line, self.where(i))
                        src, meth, ann = str(rec.get("source_id", "")), str(rec.get("method", "")), str(rec.get("annotation", ""))
                        kk = int(rec["k"]) if "k" in rec else -1
                    source.append(intern.setdefault(src, src)), method.append(intern.setdefault(meth, meth))
                    annotation.append(ann)
                    k[i] = kk
        return {"source_id": source, "k": k, "method": method, "annotation": annotation}

    def take(self, positions) -> IndexView:
        """The samples at `positions` (a view: the index's arrays are shared, not copied)."""
        return IndexView(self, np.asarray(positions, np.int64))

    def with_annotations_in(self, folder: Path) -> IndexView:
        """The same samples with each annotation read from `folder` as <id>.png."""
        return self.take(np.arange(len(self))).with_annotations_in(folder)


# A line as ManifestWriter writes masksyn / imgsyn records (synth.sample_record's key order): provenance by regex.
_PROVENANCE = re.compile(rb'\{"id": "(?:[^"\\\n]|\\.)*", "source_id": "([^"\\\n]*)", "k": (\d+), '
                         rb'"method": "([^"\\\n]*)", "image": "[^"\\\n]*", "annotation": "([^"\\\n]*)"')


class IndexView:
    """Some samples of a SyntheticIndex, by position (numpy), optionally with their annotations read
    from another folder (quality.py --filter's annotations_filtered/, named <id>.png: common/data/ids.py).
    Shares the index's arrays."""

    def __init__(self, index: SyntheticIndex, positions: np.ndarray, annotations: Path | None = None):
        self.index, self.positions, self.annotations = index, positions, annotations
        self.folder = index.folder

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        from dataclasses import replace

        sample = self.index[int(self.positions[i])]  # IndexError past the end, as a list
        return sample if self.annotations is None else replace(sample, annotation=self.annotations / f"{safe_name(sample.id)}.png")

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def id(self, i: int) -> str:
        return self.index.id(int(self.positions[i]))

    def provenance(self) -> dict:
        cols = self.index.provenance()
        pos = self.positions.tolist()
        return {key: col[self.positions] if isinstance(col, np.ndarray) else [col[j] for j in pos] for key, col in cols.items()}

    def take(self, positions) -> IndexView:
        return IndexView(self.index, self.positions[np.asarray(positions, np.int64)], self.annotations)

    def with_annotations_in(self, folder: Path) -> IndexView:
        return IndexView(self.index, self.positions, Path(folder))


def sample_ids(samples) -> list[str]:
    """The ids of a sample list or of a SyntheticIndex / IndexView (from the index: no record read)."""
    if hasattr(samples, "id"):
        return [samples.id(i) for i in range(len(samples))]
    return [s.id for s in samples]


def provenance(samples) -> dict:
    """`SyntheticIndex.provenance` for a sample list too (from each Sample's meta)."""
    if hasattr(samples, "provenance"):
        return samples.provenance()
    return {"source_id": [str(s.meta.get("source_id", "")) for s in samples],
            "k": np.array([int(s.meta["k"]) if "k" in s.meta else -1 for s in samples], np.int64),
            "method": [str(s.meta.get("method", "")) for s in samples],
            "annotation": [str(s.meta.get("annotation", "")) for s in samples]}


def first_per_source(samples, k: int):
    """The first k samples made from each source (real) sample: ordered by source id, then by the sample
    index `k` that masksyn / imgsyn record (manifest order where a record has none). A SyntheticIndex /
    IndexView gives a view of itself (its arrays shared, nothing copied); a list gives a list. Sorted with
    numpy: one int per sample, not a Python tuple (1.2 M samples at paper scale)."""
    cols = provenance(samples)
    src, n = cols["source_id"], len(cols["source_id"])
    rank = {s: r for r, s in enumerate(sorted(set(src)))}
    codes = np.fromiter((rank[s] for s in src), np.int64, n)
    position = np.arange(n)
    order = np.lexsort((position, np.where(cols["k"] >= 0, cols["k"], position), codes))  # source, then k, then position
    ranked = codes[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]]) if n else np.zeros(0, np.int64)
    within = position - np.repeat(starts, np.diff(np.r_[starts, n]))  # each sample's place among its source's
    keep = order[within < k]
    return samples.take(keep) if hasattr(samples, "take") else [samples[i] for i in keep]


def build_synthetic_arrays(folder: Path, files: list[Path]) -> dict:
    """Scan the manifests once for ids and line offsets: a chunk at a time in C (manifest.chunk_ids and
    numpy's newline positions), line by line with json.loads only for a chunk with a line not in
    ManifestWriter's form. Ids must be unique (SegGenError naming file:line)."""
    ids: list[bytes] = []
    seen: set[bytes] = set()
    file_no, line_off, line_no = [], [], []  # numpy arrays, one per chunk
    for k, file in enumerate(files):
        first = 1
        for base, chunk in iter_chunks(file):
            newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10)  # (lines,) byte offsets of "\n"
            found = chunk_ids(chunk)
            new = set(found) if found is not None else None
            if new is not None and len(new) == len(found) and seen.isdisjoint(new):
                seen |= new
                ids.extend(found)
                starts = np.empty(len(newlines), np.int64)
                starts[0], starts[1:] = 0, newlines[:-1] + 1
                offsets, numbers = starts + base, np.arange(first, first + len(found), dtype=np.int32)
            else:
                offsets, numbers = [], []  # a line not in the form, or an id twice: line by line, to name it
                for n, offset, line in iter_lines_of(chunk, base, first):
                    rid = line_id(line, f"{file}:{n}").encode()
                    if rid in seen:
                        raise SegGenError(f"{file}:{n}: id {rid.decode()!r} was already written earlier in {folder}")
                    seen.add(rid), ids.append(rid), offsets.append(offset), numbers.append(n)
            line_off.append(np.asarray(offsets, np.int64)), line_no.append(np.asarray(numbers, np.int32))
            file_no.append(np.full(len(offsets), k, np.int16))
            first += len(newlines)
    del seen
    packed = Packed.pack_bytes(ids)
    cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
    return {"files": np.array([f.name for f in files], dtype=str), "id_blob": packed.blob, "id_off": packed.offsets,
            "file_no": cat(file_no, np.int16), "line_off": cat(line_off, np.int64), "line_no": cat(line_no, np.int32)}


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
    from common.masks.colormap import coco_categories

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

