"""Export a synthetic folder or a real dataset split to the formats the ecosystem reads (issue 27 item 3).

    python -m common.data.export synth/masksyn-ade20k --to hf exports/masksyn-ade20k
    python -m common.data.export synth/imgsyn-coco --to webdataset exports/imgsyn-coco --shard-size 1000
    python -m common.data.export --data ade20k --data-root datasets --split val --to hf exports/ade20k-val

- `--to hf`: Parquet shards OUT/data/{split}-NNNNN-of-MMMMM.parquet written by `datasets`' own ParquetWriter, with
  its features in the file (images as `datasets.Image`), so `datasets.load_dataset(OUT)` reads it with no script
  and offline, and `push_to_hub` uploads it as it is (the Hub's own format). OUT/README.md is the dataset card
  (YAML: configs, license, tags) with the class table.
- `--to webdataset`: tar shards OUT/{split}-NNNNNN.tar (webdataset.TarWriter); each sample is KEY.jpg, KEY.annotation.png,
  KEY.colormap.png, KEY.txt (caption), KEY.json (id, source, seed, classes, quality figures, segments_info).

Columns / fields: id, image (the file's bytes as written, never re-encoded), annotation (the dataset's encoding:
ADE20K 8-bit label PNG, COCO panoptic PNG), colormap (synthetic: the drawn map; real: drawn here with the
generation palette), caption, source_id, method, k, seed, classes (names of the classes present) and
class_values (their label values), segments_info (COCO, JSON text), settings (JSON text), and every numeric
quality.py figure (miou, accuracy, ...; absent: null). Shards are written to a temporary name and renamed: a
killed export resumes with the shards it has not finished.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common import SegGenError
from common.data.manifest import atomic_save, iter_lines, manifest_files, parse_line, read_manifest
from common.data.sample import Sample
from common.masks.colormap import class_names, label_to_color, palette_for, panoptic_to_color

FORMATS = ("hf", "webdataset")
SHARD_SIZE = 1000  # samples per shard: ~200 MB of 768 px samples (webdataset's advice: 100 MB - 1 GB a shard)
HF_SPLITS = {"train": "train", "val": "validation"}  # the Hub's split names


@dataclass
class Source:
    """What is exported: a number of samples, each built on demand, and the figure columns they carry."""

    data: str
    split: str  # "train" for a synthetic folder
    count: int
    figures: list[str]
    row: object  # row(i) -> dict of the columns (image bytes and all)


# ---------------------------------------------------------------- what a sample becomes

def file_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SegGenError(f"cannot read {path} ({e.strerror or e}); regenerate the sample or remove its line") from e


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def classes_of(data: str, annotation: Path, segments: list | None) -> list[int]:
    """Label values present: COCO from segments_info, else the annotation PNG's values (0 = other left out)."""
    if segments is not None:
        return sorted({int(s["category_id"]) for s in segments})
    with Image.open(annotation) as im:
        return [int(v) for v in np.unique(np.asarray(im)) if 0 < v < 255]


def base_row(data: str, sid: str, image: Path, annotation: Path, colormap: bytes, segments: list | None, names: dict) -> dict:
    values = classes_of(data, annotation, segments)
    return {"id": sid, "image": {"bytes": file_bytes(image), "path": Path(image).name},
            "annotation": {"bytes": file_bytes(annotation), "path": Path(annotation).name},
            "colormap": {"bytes": colormap, "path": f"{sid}.colormap.png"},
            "classes": [names.get(v, str(v)) for v in values], "class_values": values,
            "segments_info": json.dumps(segments) if segments is not None else None}


# ---------------------------------------------------------------- synthetic folders

def quality_figures(folder: Path) -> tuple[dict[str, dict], list[str]]:
    """id -> {figure: value} of FOLDER/quality*.jsonl (numbers only) and the figure names, sorted."""
    by_id, names = {}, set()
    for file in manifest_files(folder / "quality.jsonl"):
        for n, _, line in iter_lines(file):
            rec = parse_line(line, f"{file}:{n}")
            figures = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "id"}
            by_id[str(rec["id"])] = figures
            names |= figures.keys()
    return by_id, sorted(names)


def synthetic_source(folder: Path, data: str | None) -> Source:
    """A masksyn / imgsyn folder, in manifest order (its lazy index: paper-scale folders fit in memory)."""
    from common.data.index import synthetic_index

    index = synthetic_index(folder)
    first = index.record(0)
    recorded = (first.get("settings") or {}).get("data")
    data = data or recorded
    if data is None:
        raise SegGenError(f"{folder}: its manifest does not record the dataset; pass --data ade20k|coco|toy")
    quality, figures = quality_figures(folder)
    figures = sorted(set(figures) | {k for k in ("off_palette",) if isinstance(first.get(k), (int, float))})
    names = class_names(data)

    def row(i: int) -> dict:
        sample = index[i]
        rec = sample.meta
        out = base_row(data, sample.id, sample.image, sample.annotation, file_bytes(folder / rec["colormap"]), sample.segments, names)
        figs = {**{k: rec[k] for k in figures if k in rec}, **quality.get(sample.id, {})}
        return {**out, "caption": rec.get("caption") or "", "source_id": str(rec.get("source_id", "")),
                "method": str(rec.get("method", "")), "k": rec.get("k"), "seed": rec.get("seed"),
                "settings": json.dumps(rec.get("settings")), **{k: figs.get(k) for k in figures}}

    return Source(data, "train", len(index), figures, row)


# ---------------------------------------------------------------- real datasets

def real_source(data: str, data_root: Path | None, split: str, captions: Path | None) -> Source:
    """A real split (ADE20K, COCO panoptic, toy): colour maps drawn with the generation palette the generators see."""
    from common.data.datasets import read_dataset, rgb_to_id
    from common.data.paths import captions_path

    samples: list[Sample] = read_dataset(data, data_root, split)
    path = captions or captions_path(data, split)
    if captions is not None and not Path(captions).is_file():
        raise SegGenError(f"--captions {captions} does not exist; run caption.py or leave --captions out")
    caps = {str(r["id"]): r["caption"] for r in read_manifest(path, required=("id", "caption"))} if Path(path).is_file() else {}
    palette, names = palette_for(data, "generation"), class_names(data)

    def row(i: int) -> dict:
        s = samples[i]
        with Image.open(s.annotation) as im:
            label = np.asarray(im)
        cmap = panoptic_to_color(rgb_to_id(label), s.segments, palette) if data == "coco" else label_to_color(label, palette)
        return {**base_row(data, s.id, s.image, s.annotation, png_bytes(cmap), s.segments, names), "caption": caps.get(s.id, ""),
                "source_id": s.id, "method": "real", "k": None, "seed": None, "settings": None}

    return Source(data, split, len(samples), [], row)


# ---------------------------------------------------------------- writers

def shard_ranges(count: int, shard_size: int) -> list[range]:
    return [range(s, min(count, s + shard_size)) for s in range(0, count, shard_size)]


def finished(path: Path, write) -> bool:
    """write(tmp) then rename to path, unless path is there already (a resumed export). True if written now."""
    if path.is_file():
        return False
    atomic_save(path, write)  # a temporary name unique across hosts and containers, renamed when complete
    return True


def hf_features(source: Source):
    import datasets

    strings = datasets.Value("string")
    return datasets.Features({
        "id": strings, "image": datasets.Image(), "annotation": datasets.Image(), "colormap": datasets.Image(), "caption": strings,
        "source_id": strings, "method": strings, "k": datasets.Value("int32"), "seed": datasets.Value("int64"),
        "classes": datasets.List(strings), "class_values": datasets.List(datasets.Value("int32")),
        "segments_info": strings, "settings": strings, **{f: datasets.Value("float64") for f in source.figures}})


def write_hf(source: Source, out: Path, shard_size: int, progress=None) -> list[Path]:
    """Parquet shards by datasets' ParquetWriter (features in the file) and a dataset card."""
    from datasets.arrow_writer import ParquetWriter

    features, split = hf_features(source), HF_SPLITS.get(source.split, source.split)
    ranges, paths = shard_ranges(source.count, shard_size), []
    for n, rows in enumerate(ranges):
        path = out / "data" / f"{split}-{n:05d}-of-{len(ranges):05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp, rows=rows):
            with ParquetWriter(path=str(tmp), features=features) as writer:
                for i in rows:
                    writer.write(features.encode_example(source.row(i)))
                writer.finalize()
        finished(path, write)
        paths.append(path)
        if progress:
            progress(rows.stop)
    (out / "README.md").write_text(dataset_card(source, split), encoding="utf-8")
    return paths


def write_webdataset(source: Source, out: Path, shard_size: int, progress=None) -> list[Path]:
    """Tar shards by webdataset.TarWriter: KEY.jpg, KEY.annotation.png, KEY.colormap.png, KEY.txt, KEY.json."""
    import webdataset

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, rows in enumerate(shard_ranges(source.count, shard_size)):
        path = out / f"{source.split}-{n:06d}.tar"

        def write(tmp, rows=rows):
            with webdataset.TarWriter(str(tmp)) as sink:
                for i in rows:
                    r = source.row(i)
                    meta = {k: v for k, v in r.items() if k not in ("image", "annotation", "colormap", "caption")}
                    for key in ("segments_info", "settings"):
                        meta[key] = json.loads(meta[key]) if meta[key] else None
                    ext = Path(r["image"]["path"]).suffix.lstrip(".").lower() or "jpg"
                    sink.write({"__key__": wds_key(r["id"]), ext: r["image"]["bytes"], "annotation.png": r["annotation"]["bytes"],
                                "colormap.png": r["colormap"]["bytes"], "txt": r["caption"], "json": meta})
        finished(path, write)
        paths.append(path)
        if progress:
            progress(rows.stop)
    return paths


def wds_key(sid: str) -> str:
    """webdataset splits a member's name at its first dot: a key must have none (nor a slash)."""
    if "." in sid or "/" in sid:
        raise SegGenError(f"sample id {sid!r} holds '.' or '/', which webdataset reads as part of the extension; "
                          f"export it --to hf instead")
    return sid


def dataset_card(source: Source, split: str) -> str:
    """README.md of an exported dataset: the Hub's YAML front matter, then what the columns hold."""
    names = class_names(source.data)
    table = "\n".join(f"| {v} | {n} |" for v, n in sorted(names.items()))
    figures = ", ".join(source.figures) or "none (run quality.py on the folder first)"
    return f"""---
license: other
task_categories:
- image-segmentation
tags:
- seggen
- synthetic
- semantic-segmentation
configs:
- config_name: default
  data_files:
  - split: {split}
    path: data/{split}-*.parquet
---

# SegGen {source.data} export ({source.count} samples)

Written by `python -m common.data.export` (SegGen, "SegGen: Supercharging Segmentation Models with Text2Mask and
Mask2Img Synthesis"). Load it with `datasets.load_dataset(PATH)`; `push_to_hub` uploads it unchanged. The
license above is a placeholder: set the terms of the source dataset (and of the generators) before you share it.

Columns: `image`, `annotation` ({'COCO panoptic PNG, segment id = R + 256 G + 65536 B' if source.data == 'coco' else '8-bit label PNG, 0 = other, value = class'}),
`colormap` (the class colours the generators see), `caption`, `source_id`, `method`, `k`, `seed`, `classes` (names of
the classes present), `class_values`, `segments_info` (COCO, JSON), `settings` (JSON); quality figures: {figures}.

| label value | class |
| --- | --- |
{table}
"""


# ---------------------------------------------------------------- the command

def export(to: str, out: Path, *, folder: Path | None = None, data: str | None = None, data_root: Path | None = None,
           split: str = "train", captions: Path | None = None, shard_size: int = SHARD_SIZE, progress=None) -> list[Path]:
    if to not in FORMATS:
        raise SegGenError(f"--to must be one of {', '.join(FORMATS)} (got {to!r})")
    if shard_size < 1:
        raise SegGenError(f"--shard-size must be at least 1 (got {shard_size})")
    if folder is not None:
        if data_root is not None:
            raise SegGenError("give a synthetic FOLDER or --data-root (a real dataset), not both")
        source = synthetic_source(Path(folder), data)
    elif data is not None:
        source = real_source(data, data_root, split, captions)
    else:
        raise SegGenError("nothing to export: give a synthetic FOLDER, or --data (ade20k, coco, toy) with --data-root and --split")
    writer = write_hf if to == "hf" else write_webdataset
    return writer(source, Path(out), shard_size, progress)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m common.data.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("folder", nargs="?", type=Path, help="a synthetic folder (masksyn.py / imgsyn.py output); leave out for a real dataset")
    p.add_argument("--to", required=True, nargs=2, metavar=("FORMAT", "OUT"), help="hf or webdataset, and the output folder")
    p.add_argument("--shard-size", type=int, default=SHARD_SIZE, help=f"samples per Parquet file / tar shard (default {SHARD_SIZE})")
    p.add_argument("--data", choices=("ade20k", "coco", "toy"), help="a real dataset to export (or the dataset of FOLDER when its manifest does not say)")
    p.add_argument("--data-root", type=Path, help="where the real dataset is (default: $SEGGEN_DATASETS or ./datasets)")
    p.add_argument("--split", choices=("train", "val"), default="train", help="the real split (default train)")
    p.add_argument("--captions", type=Path, help="captions of the real split (default: captions/{data}_{split}.jsonl if it exists)")
    a = p.parse_args(argv)
    try:
        paths = export(a.to[0], a.to[1], folder=a.folder, data=a.data, data_root=a.data_root,
                       split=a.split, captions=a.captions, shard_size=a.shard_size,
                       progress=lambda n: print(f"\r{n} samples", end="", file=sys.stderr, flush=True))
    except SegGenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{len(paths)} shard(s) in {a.to[1]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
