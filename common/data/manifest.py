"""JSONL manifests: how stages hand data to each other (docs/design.md "Data contract").

- Files are written to a temporary name and renamed (`atomic_save`), and only then is their line
  appended (`ManifestWriter.append`), so a line always points at complete files.
- A rerun skips the ids already written (`done_ids`): an interrupted job resumes and loses nothing.
- Each task of a sharded run (common/runtime/shard.py) writes its own `NAME.shard{I}-of-{N}.jsonl`
  (`task_path`; older runs: `NAME.rank{I}.jsonl`); readers take every file of the family (`manifest_files`)
  and read them as one; a resuming task only those whose shares meet its own (`share_files`).
- Paths inside a manifest are relative (to the manifest's folder; for captions, to the data root),
  never absolute, never with "..".
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath

from common import SegGenError

CAPTION_FIELDS = ("id", "image", "caption")
SYNTHETIC_FIELDS = ("id", "source_id", "method", "image", "annotation", "colormap", "caption", "seed", "models")


def check_relative(path: str, where: str) -> None:
    p = PurePosixPath(path)
    if not path or p.is_absolute() or ".." in p.parts or "\\" in path or (len(path) > 1 and path[1] == ":"):
        raise SegGenError(f"{where}: path {path!r} must be relative to the manifest's folder, without '..'")


def temporary_name(path: Path) -> Path:
    """A temporary file beside `path`, unique across processes, hosts and containers sharing the folder
    (two containers can have the same pid; two hosts the same pid and name): `.STEM.tmp-HOST-PID-RANDOM.SUFFIX`,
    the stem cut so that the name stays within 255 bytes."""
    import secrets
    import socket

    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32]
    stem = path.stem.encode("utf-8")[:96].decode("utf-8", "ignore")
    return path.with_name(f".{stem}.tmp-{host}-{os.getpid()}-{secrets.token_hex(4)}{path.suffix[:16]}")


def atomic_save(path: str | Path, write) -> Path:
    """Call write(tmp_path), then rename tmp_path to path: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def rank_path(path: str | Path, rank: int, world_size: int) -> Path:
    """The manifest file task `rank` of `world_size` writes: path itself in a one-task run, else
    NAME.rank{I}.jsonl. A rerun at another number of tasks appends to the files of its own indexes (only
    one run writes a folder at a time: common/runtime/lock.py `task_lock`)."""
    path = Path(path)
    return path if world_size == 1 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def task_path(path: str | Path, index: int, count: int) -> Path:
    """The manifest file task `index` of `count` writes (common/runtime/shard.py): path itself for a one-task
    run, else NAME.shard{I}-of-{N}.jsonl. The name says which share its lines belong to, so that a task
    resuming its share reads only the files whose shares meet its own (`share_files`)."""
    path = Path(path)
    return path if count == 1 else path.with_name(f"{path.stem}.shard{index}-of-{count}{path.suffix}")


_SHARD_NAME = re.compile(r".*\.shard(\d+)-of-(\d+)\.[^.]+$")


def share_of(file: Path) -> tuple[int, int] | None:
    """(I, N) of a file written by task I of N (`task_path`), else None (a one-task file, a rank file: any share)."""
    m = _SHARD_NAME.fullmatch(Path(file).name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def shares_meet(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether share (I, N) and share (J, M) of one list striped over the tasks (items I, I + N, ...) hold an item
    in common: some x with x = I mod N and x = J mod M, i.e. I = J mod gcd(N, M) (Chinese remainders)."""
    import math

    return (a[0] - b[0]) % math.gcd(a[1], b[1]) == 0


def share_files(path: str | Path, share: tuple[int, int] | None) -> list[Path]:
    """manifest_files(path) that can hold items of `share` (None: all): a task of a run at the same N reads
    its own file only; at another N, the files of the tasks whose shares meet its own."""
    files = manifest_files(path)
    if share is None:
        return files
    return [f for f in files if (other := share_of(f)) is None or shares_meet(share, other)]


def manifest_files(path: str | Path) -> list[Path]:
    """A folder: its manifest*.jsonl. A file NAME.jsonl: itself (if present) and its NAME.rank*.jsonl and
    NAME.shard*.jsonl."""
    path = Path(path)
    if path.is_dir():
        return sorted(path.glob("manifest*.jsonl"))
    family = [*path.parent.glob(f"{path.stem}.rank*{path.suffix}"), *path.parent.glob(f"{path.stem}.shard*{path.suffix}")]
    return sorted(p for p in [path, *family] if p.is_file())


class ManifestWriter:
    """Appends one JSON object per line, flushed and fsynced, so a killed job keeps every line it wrote.

    A line cut short by a kill is dropped when the file is reopened."""

    def __init__(self, path: str | Path, path_fields: tuple[str, ...] = ()):
        self.path, self.path_fields = Path(path), path_fields
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_partial_line(self.path)
            self._f = open(self.path, "a", encoding="utf-8")
        except OSError as e:  # a read-only place, a file where the folder should be, a full disk
            raise _write_error(self.path, e) from e

    def append(self, record: dict, sync: bool = True) -> None:
        """One line; sync=False leaves it to the next `sync()` (a batch's lines, one fsync)."""
        self.append_many([record], sync)

    def append_many(self, records: list[dict], sync: bool = True) -> None:
        """Several lines with one fsync (about 1 ms each): what a batch of generated samples writes."""
        for record in records:
            for key in self.path_fields:
                check_relative(record[key], f"{self.path} id {record.get('id')!r} field {key!r}")
        try:
            self._f.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
            if sync:
                self.sync()
        except OSError as e:  # disk full: the lines written before stay; a part of this one is dropped on reopening
            raise _write_error(self.path, e) from e

    def sync(self) -> None:
        """Flush and fsync the lines written so far."""
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:
            raise _write_error(self.path, e) from e

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:  # its lines failed to flush: append_many has said so
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _write_error(path: Path, e: OSError) -> SegGenError:
    """An OSError while writing an output, as one line naming the file and what to do."""
    return SegGenError(f"cannot write {path} ({e.strerror or e}); free space or choose a writable output, "
                       f"then rerun the same command: what was written so far is kept and resumed")


def _drop_partial_line(path: Path, chunk: int = 1 << 16) -> None:
    """Truncate a last line cut short by a kill, reading only the file's tail (not the whole file)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        pos = end
        while pos > 0:  # walk back chunk by chunk to the last newline
            start = max(0, pos - chunk)
            f.seek(start)
            cut = f.read(pos - start).rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
            pos = start
        f.truncate(0)


def check_caption(rec: dict, where: str, empty_ok: bool = False) -> None:
    """A caption is a string, non-empty unless empty_ok (captions that drive generation or training)."""
    cap = rec.get("caption")
    if not isinstance(cap, str) or not (empty_ok or cap.strip()):
        raise SegGenError(f"{where}: caption must be a non-empty string (got {cap!r}); recaption it or drop the line")


INTEGER_FIELDS = ("k", "seed", "attempt")  # a sample's draw: whole numbers ≥ 0 wherever a record holds them


def check_integers(rec: dict, where: str) -> None:
    """`INTEGER_FIELDS` a record holds are whole numbers ≥ 0 (json.loads takes NaN, Infinity and 1.5): a
    sample's k and seed name its files and redraw it, so a bad one is refused naming file:line."""
    for key in INTEGER_FIELDS:
        value = rec.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise SegGenError(f"{where}: {key} must be a whole number ≥ 0 (got {value!r}); the line was edited or written "
                              f"by another tool: restore it from the stage's output, or drop the line and rerun the stage")


def read_manifest(path: str | Path, required: tuple[str, ...] = ("id",), path_fields: tuple[str, ...] = (),
                  captions: bool | None = None, places: list[str] | None = None) -> list[dict]:
    """Every record of a manifest family (see manifest_files), validated.

    Raises SegGenError naming file and line for bad JSON or UTF-8, a missing field, an absolute or
    escaping path, a k / seed / attempt that is not a whole number ≥ 0 (NaN, inf, 1.5), an id written twice, or (captions; by default when `required` holds "caption") a
    caption that is not a string, or (for CAPTION_FIELDS manifests) an empty one. A last line without
    its newline (a write cut by a kill) is skipped. `places`, if given, receives each record's "file:line".
    """
    if captions is None:
        captions = "caption" in required
    empty_ok = tuple(required) != CAPTION_FIELDS  # synthetic folders record the caption; only caption files drive work
    records, seen = [], {}
    for file in manifest_files(path):
        for n, _, line in iter_lines(file):
            where = f"{file}:{n}"
            try:
                rec = json.loads(line)
            except ValueError as e:  # bad JSON, or bytes that are not UTF-8
                raise SegGenError(f"{where}: not a JSON line ({e})") from e
            if not isinstance(rec, dict):
                raise SegGenError(f"{where}: expected a JSON object")
            missing = [k for k in required if k not in rec]
            if missing:
                raise SegGenError(f"{where}: missing field(s) {', '.join(missing)}")
            for key in path_fields:
                check_relative(str(rec[key]), where)
            check_integers(rec, where)
            if captions:
                check_caption(rec, where, empty_ok)
            rid = str(rec["id"])
            if rid in seen:
                raise SegGenError(f"{where}: id {rid!r} was already written at {seen[rid]}")
            seen[rid] = where
            records.append(rec)
            if places is not None:
                places.append(where)
    return records


def done_ids(path: str | Path) -> set[str]:
    """Ids already in a manifest family: what a rerun skips (validates every record; see read_ids
    for the streaming reader that scales to millions of lines)."""
    return {str(r["id"]) for r in read_manifest(path)}


# ---------------------------------------------------------------- streaming readers (millions of lines)
# ManifestWriter writes json.dumps' default form, '{"id": "...", "key": value, ...}': the id is the first
# key, so the ids of a whole chunk of lines come out of one regex pass in C, without parsing the nested
# values (settings, segments_info: ~70 µs a line with json.loads for a COCO line). Any chunk with a line
# not in that form (hand-written, blank, an escaped id) is read line by line, those lines with json.loads.

_ID_AT = re.compile(rb'\{"id": "([^"\\\n]*)"[,}]')  # .match at a line's start: a plain (unescaped) id
_ID_AFTER_NEWLINE = re.compile(rb'\n(?:\{"id": "([^"\\\n]*)"[,}])?')  # findall: each newline's next id, or b""
_ID_ESCAPED = re.compile(rb'\{"id": "((?:[^"\\\n]|\\.)*)"[,}]')


def _unescape(raw: bytes) -> str:
    return json.loads(b'"' + raw + b'"') if b"\\" in raw else raw.decode("utf-8")


def iter_lines(file: Path):
    """(line number, byte offset, line bytes without its newline) for each non-blank line of one
    manifest file, streaming. A last line without its newline is given only if it is a whole JSON
    object (a hand-written file); cut short by a kill, it is skipped, as ManifestWriter drops it."""
    offset = 0
    with open(file, "rb") as f:
        for n, line in enumerate(f, 1):
            size = len(line)
            if line.endswith(b"\n"):
                if line.strip():
                    yield n, offset, line.rstrip(b"\r\n")
            elif line.strip():
                try:
                    json.loads(line)
                except ValueError:
                    return
                yield n, offset, line
            offset += size


def parse_line(line: bytes, where: str) -> dict:
    """One manifest line as a dict, or SegGenError naming file:line."""
    try:
        rec = json.loads(line)
    except ValueError as e:  # UnicodeDecodeError included
        raise SegGenError(f"{where}: not a JSON line ({e})") from e
    if not isinstance(rec, dict):
        raise SegGenError(f"{where}: expected a JSON object")
    if "id" not in rec:
        raise SegGenError(f"{where}: missing field(s) id")
    return rec


def iter_chunks(file: Path, size: int = 1 << 22):
    """(byte offset, bytes) of one manifest file in ~4 MB pieces that end at a newline: what the fast
    scanners run their regex over. A last piece without a newline is given as it is (the caller treats
    it as a possibly cut line). Line numbers are the caller's: it counts the newlines anyway."""
    offset = 0
    with open(file, "rb") as f:
        while True:
            f.seek(offset)  # a line cut by the last read is read again (cheaper than joining rest + data)
            data = f.read(size)
            cut = data.rfind(b"\n") + 1
            if len(data) < size:  # the rest of the file
                if 0 < cut < len(data):  # whole lines, then a last line without its newline
                    yield offset, data[:cut]
                    offset, data = offset + cut, data[cut:]
                if data:
                    yield offset, data
                return
            while not cut:  # one line longer than size: read on to its end
                more = f.read(size)
                if not more:
                    yield offset, data
                    return
                data += more
                cut = data.rfind(b"\n") + 1
            yield offset, data if cut == len(data) else data[:cut]
            offset += cut


def chunk_ids(chunk: bytes) -> list[bytes] | None:
    """The raw ids of a chunk's lines, in order, when every line starts as ManifestWriter writes it
    with a plain, non-empty id: one regex pass in C, ~1 µs a line. None when some line does not (blank,
    hand-written, an escaped id, a last line without its newline): the caller reads that chunk line by
    line."""
    if not chunk.endswith(b"\n") or (first := _ID_AT.match(chunk)) is None:
        return None
    found = _ID_AFTER_NEWLINE.findall(chunk)  # one per "\n": the next line's id, or b"" (the last has none)
    if found.pop() != b"" or b"" in found or not first.group(1):
        return None
    found.insert(0, first.group(1))
    return found


def iter_lines_of(chunk: bytes, base: int, first: int):
    """iter_lines for a chunk from iter_chunks: base = its byte offset, first = its first line's number."""
    pos = 0
    for j, line in enumerate(chunk.split(b"\n")):
        end = pos + len(line)
        complete = end < len(chunk)
        if line.strip():
            if complete:
                yield first + j, base + pos, line.rstrip(b"\r")
            else:
                try:  # the last line of the file without its newline: kept only if it is whole
                    json.loads(line)
                except ValueError:
                    return
                yield first + j, base + pos, line
        pos = end + 1


def line_id(line: bytes, where: str) -> str:
    """The id of one line: by regex in ManifestWriter's form, else parsed (SegGenError naming `where`)."""
    m = _ID_ESCAPED.match(line)
    if m is not None:
        try:
            return _unescape(m.group(1))
        except ValueError:  # not UTF-8, a bad escape: parse_line names it
            pass
    return str(parse_line(line, where)["id"])


def read_ids(path: str | Path, only=None, share: tuple[int, int] | None = None) -> set[str]:
    """Ids in a manifest family (see manifest_files), streaming: only the ids are kept in memory.

    The same ids as done_ids, at a few µs a line and ~100 bytes per id (done_ids keeps every record:
    ~6 GB per million imgsyn lines). Lines not in ManifestWriter's form are parsed with json.loads;
    bad JSON there and an id written twice are errors naming file and line.

    only: a set of ids, or a function id -> bool: keep those alone (a task's share: what it needs to
    resume, whatever the number of tasks that wrote the folder). Ids written twice are still found among
    those kept. share: (I, N) of the task, to read only the files whose shares meet it (`share_files`)."""
    ids: set[str] = set()
    if only is None:
        keep = None
    elif callable(only):
        keep = lambda new: {x for x in new if only(x)}  # noqa: E731
    else:
        keep = lambda new: new & only  # noqa: E731
    for file in share_files(path, share):
        first = 1
        for base, chunk in iter_chunks(file):
            found = chunk_ids(chunk)
            if found is not None:
                try:
                    new = {x.decode("utf-8") for x in found}
                except UnicodeDecodeError:
                    new = set()
                if len(new) == len(found):
                    new = new if keep is None else keep(new)
                    if ids.isdisjoint(new):
                        ids |= new
                        first += len(found)
                        continue
            # a line not in the form, or an id twice (in the chunk or with an earlier one): line by line
            for n, _, line in iter_lines_of(chunk, base, first):
                rid = line_id(line, f"{file}:{n}")
                if keep is not None and not keep({rid}):
                    continue
                if rid in ids:
                    raise SegGenError(f"{file}:{n}: id {rid!r} was already written earlier in {path}")
                ids.add(rid)
            first += chunk.count(b"\n")
    return ids


def first_record(path: str | Path) -> dict | None:
    """The first record of a manifest family, or None when it has none: what a resume compares its
    settings with (synth.check_output), without reading the rest."""
    for file in manifest_files(path):
        for n, _, line in iter_lines(file):
            return parse_line(line, f"{file}:{n}")
    return None


def check_appending(path: str | Path, *, option: str, kind: str, fields: tuple[str, ...], foreign: tuple[str, ...],
                    made_with: dict, fix: str) -> None:
    """Before a run appends to an existing manifest family (issue 28 item 2): its first record must be one
    of this run's kind (it holds `fields` and none of the `foreign` fields that mark another stage's
    output) and be made with the same `made_with` (each key the record holds is compared). Otherwise
    refused, naming the file, what it holds and `fix`: one run's output is never mixed into another's,
    nor old results kept silently."""
    first = first_record(path)
    if first is None:
        return
    where = manifest_files(path)[0]
    foreign = sorted(set(first) & set(foreign))
    missing = sorted(set(fields) - set(first))
    if missing or foreign:
        holds = f"fields {foreign} of another stage's output" if foreign else f"no {missing}"
        raise SegGenError(f"{option} {path}: {where}:1 is not a {kind} manifest ({holds}); this run would append its "
                          f"lines to it: {fix}")
    old = {k: first[k] for k in made_with if k in first}
    new = {k: made_with[k] for k in old}
    if old != new:
        raise SegGenError(f"{option} {path} holds output made with {old}, not {new} ({where}:1); resuming would keep "
                          f"its old lines as if they were this run's: {fix}")
