"""JSONL manifests: how stages hand data to each other (docs/design.md "Data contract").

- Files are written to a temporary name and renamed (`atomic_save`), and only then is their line
  appended (`ManifestWriter.append`), so a line always points at complete files.
- A rerun skips the ids already written (`done_ids`): an interrupted job resumes and loses nothing.
- Under `accelerate launch` each process writes its own `NAME.rank{N}.jsonl`; readers take every
  file of the family (`manifest_files`) and read them as one.
- Paths inside a manifest are relative (to the manifest's folder; for captions, to the data root),
  never absolute, never with "..".
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

from common import SegGenError

CAPTION_FIELDS = ("id", "image", "caption")
SYNTHETIC_FIELDS = ("id", "source_id", "method", "image", "annotation", "colormap", "caption", "seed", "models")


def check_relative(path: str, where: str) -> None:
    p = PurePosixPath(path)
    if not path or p.is_absolute() or ".." in p.parts or "\\" in path or (len(path) > 1 and path[1] == ":"):
        raise SegGenError(f"{where}: path {path!r} must be relative to the manifest's folder, without '..'")


def atomic_save(path: str | Path, write) -> Path:
    """Call write(tmp_path), then rename tmp_path to path: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def rank_path(path: str | Path, rank: int, world_size: int) -> Path:
    """The manifest file process `rank` writes: path itself in a one-process run, else NAME.rank{N}.jsonl."""
    path = Path(path)
    return path if world_size == 1 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def manifest_files(path: str | Path) -> list[Path]:
    """A folder: its manifest*.jsonl. A file NAME.jsonl: itself (if present) and its NAME.rank*.jsonl."""
    path = Path(path)
    if path.is_dir():
        return sorted(path.glob("manifest*.jsonl"))
    return sorted(p for p in [path, *path.parent.glob(f"{path.stem}.rank*{path.suffix}")] if p.is_file())


class ManifestWriter:
    """Appends one JSON object per line, flushed and fsynced, so a killed job keeps every line it wrote.

    A line cut short by a kill is dropped when the file is reopened."""

    def __init__(self, path: str | Path, path_fields: tuple[str, ...] = ()):
        self.path, self.path_fields = Path(path), path_fields
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_line(self.path)
        self._f = open(self.path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        self.append_many([record])

    def append_many(self, records: list[dict]) -> None:
        """Several lines with one fsync (about 1 ms each): what a batch of generated samples writes."""
        for record in records:
            for key in self.path_fields:
                check_relative(record[key], f"{self.path} id {record.get('id')!r} field {key!r}")
        self._f.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _drop_partial_line(path: Path) -> None:
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def read_manifest(path: str | Path, required: tuple[str, ...] = ("id",), path_fields: tuple[str, ...] = ()) -> list[dict]:
    """Every record of a manifest family (see manifest_files), validated.

    Raises SegGenError naming file and line for bad JSON, a missing field, an absolute or escaping
    path, or an id written twice. A last line without its newline (a write cut by a kill) is skipped.
    """
    records, seen = [], {}
    for file in manifest_files(path):
        lines = file.read_text(encoding="utf-8").split("\n")
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{file}:{n}"
            try:
                rec = json.loads(line)
            except ValueError as e:
                if n == len(lines):  # no newline after it: cut short by a kill, the writer drops it
                    continue
                raise SegGenError(f"{where}: not a JSON line ({e})") from e
            if not isinstance(rec, dict):
                raise SegGenError(f"{where}: expected a JSON object")
            missing = [k for k in required if k not in rec]
            if missing:
                raise SegGenError(f"{where}: missing field(s) {', '.join(missing)}")
            for key in path_fields:
                check_relative(str(rec[key]), where)
            rid = str(rec["id"])
            if rid in seen:
                raise SegGenError(f"{where}: id {rid!r} was already written at {seen[rid]}")
            seen[rid] = where
            records.append(rec)
    return records


def done_ids(path: str | Path) -> set[str]:
    """Ids already in a manifest family: what a rerun skips."""
    return {str(r["id"]) for r in read_manifest(path)}
