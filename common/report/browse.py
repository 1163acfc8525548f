"""A static browser of synthetic folders (issue 27 item 1): `python browse.py FOLDER ... --out DIR`.

The site opens from disk (file://, no server). Browsers block fetch() there, so every data file is a
script that calls `SEGGEN.put(name, value)`, loaded on demand with a <script> tag. Nothing the page
loads grows with the folder: a page of the grid needs the order chunks of its positions, the record
chunks they fall in, and for a filter one bitmap and one table of counts (a 1.2 M-sample folder:
~150 KB). Layout of DIR (positions are a sample's place in manifest order; coll "s" = samples, "x" =
MaskSyn's rejected masks):

    index.html browse.js browse.css   the page (common/assets/browse/)
    data/meta.js                      folders, classes (name, colour, count), rules, figures, sizes
    data/<coll>/r<n>.js               records of positions n*R .. n*R+R-1 (R = RECORD_CHUNK)
    data/<coll>/o<k>-<n>.js           figure k's ascending order (missing values last), chunk n of C (--chunk)
    data/<coll>/b<f>.js               filter f's members: a bitmap over positions (base64)
    data/<coll>/n<k>-<f>.js           members of f before each order chunk of k, and how many have figure k
    data/<coll>/g<n>.js               source id -> positions, for the sources of bucket n (sorted by id)

Figures are every numeric field of a sample's quality.jsonl line (quality.py) and of its manifest
line's off_palette / classes (masksyn). Classes of a sample come from its segments_info (COCO), else
its quality line's per-class losses, else its annotation PNG (read once per file: ImgSyn's samples of
one source share it).
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from common import ASSETS, SegGenError
from common.data.manifest import iter_lines, line_id, manifest_files, parse_line
from common.masks.colormap import class_names, coco_categories, palette_for

CHUNK = 500  # positions per order / source file (issue 27's suggestion)
RECORD_CHUNK = 50  # records per file: a sorted page's 48 cards fall in up to 48 files (at 500 a page parsed ~14 MB, 1.4 s)
PAGE = 48  # cards per page in the grid (the page's default; ?size= in the URL overrides)
MANIFEST_FIGURES = ("off_palette", "classes")  # masksyn's figures on the manifest line itself
QUALITY = "quality"  # quality.py's quality.jsonl (and quality.rank*.jsonl)
REJECTED = "rejected"  # masksyn's rejected.jsonl (and rejected.rank*.jsonl)
MARKER = "seggen-browse.json"  # marks DIR as a site this module wrote (it may be replaced)


@dataclass
class Collection:
    """One list of cards (samples or rejected masks) while it is built: records go to disk chunk by
    chunk; what sorting and filtering need stays in compact arrays."""

    name: str
    out: Path
    chunk: int  # positions per order / source file
    record_chunk: int  # records per file
    records: list = field(default_factory=list)
    count: int = 0
    figures: dict = field(default_factory=dict)  # figure -> array('d'), NaN where missing
    members: dict = field(default_factory=dict)  # filter name -> array('i') of positions
    sources: dict = field(default_factory=dict)  # source id -> array('i') of positions

    def add(self, record: dict, figures: dict, filters: list[str]) -> None:
        pos = self.count
        for key in figures.keys() - self.figures.keys():
            self.figures[key] = array("d", [math.nan]) * pos
        for key, values in self.figures.items():
            value = figures.get(key)
            values.append(float(value) if isinstance(value, (int, float)) else math.nan)
        for f in filters:
            self.members.setdefault(f, array("i")).append(pos)
        self.sources.setdefault(record["src"], array("i")).append(pos)
        self.records.append(record)
        self.count += 1
        if len(self.records) == self.record_chunk:
            self.flush()

    def flush(self) -> None:
        if self.records:
            put(self.out, f"{self.name}/r{(self.count - 1) // self.record_chunk}", self.records)
            self.records = []


def put(out: Path, name: str, value) -> None:
    """data/NAME.js: one script that hands `value` to the page."""
    path = out / "data" / f"{name}.js"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    path.write_text(f"SEGGEN.put({json.dumps(name)},{text});\n", encoding="utf-8")


# ---------------------------------------------------------------- reading a folder

def folder_data(folder: Path, data: str | None) -> str:
    """The dataset a folder was made from: --data, else its first manifest line's settings."""
    for file in manifest_files(folder):
        for n, _, line in iter_lines(file):
            recorded = (parse_line(line, f"{file}:{n}").get("settings") or {}).get("data")
            if data and recorded and recorded != data:
                raise SegGenError(f"{folder} holds {recorded} samples, not --data {data}; browse folders of one dataset at a time")
            if data or recorded:
                return data or recorded
            break
    raise SegGenError(f"{folder}: no manifest line records its dataset; pass --data ade20k|coco|toy")


def quality_lines(folder: Path) -> dict[str, tuple[Path, int]]:
    """id -> (file, byte offset) of each quality.jsonl line: the lines are parsed when their sample is."""
    where = {}
    for file in manifest_files(folder / f"{QUALITY}.jsonl"):
        for n, offset, line in iter_lines(file):
            where[line_id(line, f"{file}:{n}")] = (file, offset)
    return where


def read_line(file: Path, offset: int) -> dict:
    with open(file, "rb") as f:
        f.seek(offset)
        return parse_line(f.readline(), f"{file} at byte {offset}")


class Classes:
    """Label values of a sample (ADE20K-layout PNG values, COCO category ids), found as cheaply as it can be."""

    def __init__(self, data: str):
        self.data, self.seen = data, {}
        self.coco_ids = sorted(c["id"] for c in coco_categories())

    def of(self, folder: Path, rec: dict, quality: dict | None) -> list[int]:
        if rec.get("segments_info") is not None:
            return sorted({int(s["category_id"]) for s in rec["segments_info"]})
        if quality and isinstance(quality.get("loss"), dict):
            return sorted(self.value(int(t)) for t in quality["loss"])
        # ImgSyn's annotation is its source's human label (a hard link, or a copy where links fail): read once a source
        same = (str(folder), str(rec.get("source_id"))) if rec.get("method") == "imgsyn" else None
        return self.from_png(folder / rec["annotation"], same)

    def value(self, train_id: int) -> int:
        return self.coco_ids[train_id] if self.data == "coco" else train_id + 1

    def from_png(self, path: Path, same=None) -> list[int]:
        if same in self.seen:
            return self.seen[same]
        try:
            st = path.stat()
            key = same or (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if key not in self.seen:
                with Image.open(path) as im:
                    values = np.unique(np.asarray(im))
                self.seen[key] = [int(v) for v in values if 0 < v < 255]
        except (OSError, ValueError):
            return []  # a missing or unreadable annotation: the card shows no classes
        return self.seen[key]


def real_images(data: str, data_root: Path | None, split: str | None) -> tuple[dict[str, str], Path | None]:
    """Real sample id -> image path relative to the dataset's images, for the real image beside each
    synthetic one; from `split`, else from every split there is. No --data-root: the default root if it
    holds the dataset, else none (the page says so)."""
    from common.data.datasets import SPLITS, default_data_root, read_dataset

    root, samples = data_root or default_data_root(), []
    for s in [split] if split else SPLITS:
        try:
            samples += read_dataset(data, root, s)
        except SegGenError:
            if data_root is not None and split:
                raise
    if not samples:
        if data_root is not None:
            raise SegGenError(f"--data-root {data_root}: no {data} images found there; give the folder of the dataset "
                              f"the samples came from, or leave --data-root out")
        return {}, None
    base = Path(os.path.commonpath([str(s.image.parent) for s in samples]))
    return {s.id: os.path.relpath(s.image, base) for s in samples}, base


def sample_card(rec: dict, no: int, classes: list[int], quality: dict | None, real: dict) -> tuple[dict, dict]:
    """The record a card shows and the figures it sorts by."""
    figures = {k: rec[k] for k in MANIFEST_FIGURES if isinstance(rec.get(k), (int, float)) and not isinstance(rec.get(k), bool)}
    per_class = []
    if quality:
        figures.update({k: v for k, v in quality.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "id"})
        iou = quality.get("iou") or {}
        for t, (loss, pixels) in (quality.get("loss") or {}).items():
            i, u = iou.get(t, (0, 0))
            per_class.append([int(t), clean(round(loss, 4)), pixels, clean(round(i / u, 4)) if u else None])
    card = {"id": str(rec["id"]), "f": no, "src": str(rec.get("source_id", "")), "k": rec.get("k"), "m": rec.get("method"),
            "seed": text(rec.get("seed")), "cap": rec.get("caption"), "img": rec.get("image"), "cm": rec.get("colormap"),
            "cls": classes, "q": {k: clean(v) for k, v in figures.items()}}
    if per_class:
        card["pc"] = per_class
    if card["src"] in real:
        card["real"] = real[card["src"]]
    return card, figures


def rejected_card(folder: Path, rec: dict, no: int) -> tuple[dict, dict]:
    """A rejected mask's card: its rule and reason, and its picture when masksyn kept one (the line's
    "colormap", FOLDER/rejected/ID.png); else the line alone."""
    settings = rec.get("settings") or {}
    seed = rec.get("seed")
    if seed is None and "seed" in settings and "k" in rec:  # masksyn's rejected lines record the run's seed, not the sample's
        from common.synthesis.synth import derive_seed  # (imports torch: only when a folder has rejected lines)

        seed = derive_seed(settings["seed"], str(rec.get("source_id", "")), int(rec["k"]))
    picture = rec.get("colormap")
    if not (isinstance(picture, str) and (folder / picture).is_file()):
        picture = None
    figures = {k: rec[k] for k in MANIFEST_FIGURES if isinstance(rec.get(k), (int, float)) and not isinstance(rec.get(k), bool)}
    card = {"id": str(rec["id"]), "f": no, "src": str(rec.get("source_id", "")), "k": rec.get("k"), "seed": text(seed),
            "rule": rule_of(rec), "why": rec.get("reason", ""), "cm": picture, "q": {k: clean(v) for k, v in figures.items()}}
    return card, figures


def rule_of(rec: dict) -> str:
    """masksyn.rule_of: the rule of a rejected line (lines written before rules were recorded: from the reason)."""
    return rec.get("rule") or ("classes" if "class" in rec.get("reason", "") else "off_palette")


def text(seed):
    """A seed as text: 63-bit seeds lose digits as JavaScript numbers."""
    return None if seed is None else str(seed)


def clean(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


# ---------------------------------------------------------------- the views: orders, filters, sources

def write_views(coll: Collection) -> dict:
    """Order chunks per figure, a bitmap and counts per filter, source buckets; returns the collection's meta."""
    n, c = coll.count, coll.chunk
    starts = np.arange(0, n, c)
    orders, keys = [(np.arange(n), n)], [{"name": "order", "valid": n}]  # key 0: manifest order (no files)
    for k, name in enumerate(sorted(coll.figures), start=1):
        values = np.frombuffer(coll.figures[name], np.float64)
        order = np.argsort(values, kind="stable")  # NaN (missing) last
        valid = int(np.isfinite(values).sum())
        for j, s in enumerate(starts):
            put(coll.out, f"{coll.name}/o{k}-{j}", order[s:s + c].tolist())
        orders.append((order, valid))
        keys.append({"name": name, "valid": valid})
    filters = {}
    for f, (name, members) in enumerate(sorted(coll.members.items())):
        mask = np.zeros(n, bool)
        mask[np.frombuffer(members, np.int32)] = True
        put(coll.out, f"{coll.name}/b{f}", base64.b64encode(np.packbits(mask, bitorder="little").tobytes()).decode())
        for k, (order, valid) in enumerate(orders):
            inorder = mask[order]
            cum = np.concatenate([[0], np.cumsum(np.add.reduceat(inorder, starts))]) if n else np.zeros(1, int)
            put(coll.out, f"{coll.name}/n{k}-{f}", {"cum": cum.tolist(), "valid": int(inorder[:valid].sum())})
        filters[name] = {"file": f, "count": int(mask.sum())}
    names = sorted(coll.sources)
    for j in range(0, len(names), c):
        put(coll.out, f"{coll.name}/g{j // c}", {s: coll.sources[s].tolist() for s in names[j:j + c]})
    return {"count": n, "keys": keys, "filters": filters, "sources": names[::c]}


# ---------------------------------------------------------------- the site

def build(folders: list[Path], out: Path, *, data: str | None = None, data_root: Path | None = None, split: str | None = None,
          chunk: int = CHUNK, record_chunk: int = RECORD_CHUNK, page: int = PAGE, progress=None) -> dict:
    """Write the site for `folders` into `out` (built beside it, then renamed: a killed build leaves the
    old site whole; the next build removes what a killed one left). progress(n) is called every 10,000 samples.
    Returns a summary: samples, rejected, classes, figures, real (images found or None)."""
    folders, out = [Path(f) for f in folders], Path(out)
    for folder in folders:
        if not folder.is_dir() or not manifest_files(folder):
            raise SegGenError(f"FOLDER {folder}: not a synthetic folder (no manifest*.jsonl); give a masksyn.py or imgsyn.py output")
    if min(chunk, record_chunk, page) < 1:
        raise SegGenError("--chunk and --page must be at least 1")
    found = {folder_data(f, data) for f in folders}
    if len(found) > 1:
        raise SegGenError(f"the folders hold samples of {', '.join(sorted(found))}; browse folders of one dataset at a time")
    data = found.pop()
    check_out(out)
    real, real_root = real_images(data, data_root, split)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by a killed build
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    samples, rejected = Collection("s", tmp, chunk, record_chunk), Collection("x", tmp, chunk, record_chunk)
    classes = Classes(data)
    for no, folder in enumerate(folders):
        quality = quality_lines(folder)
        for file in manifest_files(folder):
            for n, _, line in iter_lines(file):
                rec = parse_line(line, f"{file}:{n}")
                q = read_line(*quality[str(rec["id"])]) if str(rec["id"]) in quality else None
                cls = classes.of(folder, rec, q)
                card, figures = sample_card(rec, no, cls, q, real)
                samples.add(card, figures, [f"c{v}" for v in cls])
                if progress and samples.count % 10_000 == 0:
                    progress(samples.count)
        for file in manifest_files(folder / f"{REJECTED}.jsonl"):
            for n, _, line in iter_lines(file):
                card, figures = rejected_card(folder, parse_line(line, f"{file}:{n}"), no)
                rejected.add(card, figures, [f"r{card['rule']}"])
    samples.flush(), rejected.flush()
    meta = site_meta(folders, out, data, real_root, chunk, page)
    meta["record_chunk"] = record_chunk
    meta["collections"] = {"s": write_views(samples), "x": write_views(rejected)}
    put(tmp, "meta", meta)
    for asset in sorted((ASSETS / "browse").iterdir()):
        shutil.copy(asset, tmp / asset.name)
    (tmp / MARKER).write_text(json.dumps({"folders": [str(f) for f in folders], "samples": samples.count}) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return {"samples": samples.count, "rejected": rejected.count, "classes": len(samples.members),
            "figures": sorted(samples.figures), "real": str(real_root) if real_root else None, "out": str(out)}


def check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and ((out / MARKER).is_file() or not any(out.iterdir()))):
        raise SegGenError(f"--out {out} exists and is not a site browse.py wrote; choose a new or empty folder")


def site_meta(folders: list[Path], out: Path, data: str, real_root: Path | None, chunk: int, page: int) -> dict:
    """What the page needs first: where the files are (relative to the site), the classes and their colours."""
    rel = lambda p: Path(os.path.relpath(Path(p).resolve(), out.resolve())).as_posix() + "/"  # noqa: E731
    palette = palette_for(data, "generation")
    colour = {int(v): "#%02x%02x%02x" % tuple(int(x) for x in c) for v, c in zip(palette.values, palette.colors)}
    names, seen = {}, set()
    for value, name in sorted(class_names(data).items()):
        names[value] = name if name not in seen else f"{name} ({value})"  # a name shared by two classes stays unique
        seen.add(name)
    train_values = sorted(c["id"] for c in coco_categories()) if data == "coco" else sorted(class_names(data))
    return {"version": 1, "data": data, "chunk": chunk, "page": page, "train_values": train_values,
            "folders": [{"name": f.name, "path": rel(f)} for f in folders],
            "real": rel(real_root) if real_root else None,
            "classes": {str(v): {"name": name, "color": colour.get(v, "#888888")} for v, name in names.items()}}
