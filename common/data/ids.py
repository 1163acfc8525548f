"""Sample ids as file names (issue 28 item 1): one function maps an id to the stem of the files made for it,
and refuses every id it cannot map one-to-one, before anything is written.

masksyn and imgsyn write `images/<id>_<k>.jpg`, `annotations/...png`, `colormaps/...png`; masksyn keeps
`rejected/<id>_<k>.png`; quality.py writes `annotations_filtered/<id>.png`. An id is used as it is (so the
files keep the names every existing folder has), and only when it is safe:

- a string (or an integer, as COCO's), not None, not empty or blank;
- no path separator (`/`, `\\`), not `.` / `..`, not starting with `.` (hidden files, our lock and
  temporary files), no NUL or other control character;
- at most MAX_BYTES bytes in UTF-8, so that `<id>_<k>.jpg` and its temporary name fit the 255 bytes of a
  file name on every common filesystem;
- (`check_ids`) no two ids of one input that differ only by case: on a case-insensitive filesystem
  (macOS, Windows, many SMB shares) their files would be one file.

Nothing is escaped or shortened: an escaped name could equal another id's plain name, a shortened one
another id's prefix. The error names the file and line that holds the id, and the fix.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from common import SegGenError

MAX_BYTES = 200


def _why_unsafe(value) -> str | None:
    """The reason an id is no safe file name, or None."""
    if value is None:
        return "it is null"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return f"it is a {type(value).__name__}, not a string"
    text = str(value)
    if not text.strip():
        return "it is empty"
    if "/" in text or "\\" in text:
        return "it holds a path separator ('/' or '\\'), so its files would land in another folder"
    if text in (".", ".."):
        return "it is a path ('.' or '..')"
    if text.startswith("."):
        return "it starts with '.' (a hidden file; the lock and temporary files start so)"
    bad = next((c for c in text if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        return f"it holds the control character {bad!r}"
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        return f"it is {size} bytes long, above the {MAX_BYTES} bytes a file name of its samples can take"
    return None


def safe_name(value, where: str = "") -> str:
    """The id `value` as the stem of its files; SegGenError naming `where` (file:line) and the fix when
    it is unsafe (module doc)."""
    why = _why_unsafe(value)
    if why is not None:
        place = f"{where}: " if where else ""
        raise SegGenError(f"{place}sample id {str(value)[:80]!r}{'...' if len(str(value)) > 80 else ''} cannot name a file: {why}. "
                          f"Ids become file names; give this sample a plain id (letters, digits, '_', '-', at most "
                          f"{MAX_BYTES} bytes) in that file, or drop the line")
    return str(value)


def check_ids(ids, places=None, what: str = "ids") -> None:
    """safe_name for every id of one input (places[i]: where id i is, "file:line"), and no two that differ
    only by case (they would be one file on a case-insensitive filesystem)."""
    seen: dict[str, int] = {}
    for i, value in enumerate(ids):
        where = places[i] if places is not None else ""
        name = safe_name(value, where)
        key = name.casefold()
        if key in seen and str(ids[seen[key]]) != name:
            j = seen[key]
            other = places[j] if places is not None else f"{what} #{j}"
            raise SegGenError(f"{where or what}: sample id {name!r} differs only by case from {str(ids[j])!r} ({other}): on a "
                              f"case-insensitive filesystem their files would be one. Rename one of them")
        seen.setdefault(key, i)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def refuse_stem_clashes(folders, flag: str, suffixes=IMAGE_SUFFIXES) -> None:
    """Two images with one stem in one folder (`X.jpg`, `X.png`) would be one sample id: refuse, naming
    both (a reader keeps only one of them)."""
    for folder in folders:
        stems: dict[str, str] = {}
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            stem, suffix = os.path.splitext(name)
            if suffix.lower() not in suffixes:
                continue
            if stem in stems:
                raise SegGenError(f"{flag}: {Path(folder) / stems[stem]} and {Path(folder) / name} have one stem, so one sample "
                                  f"id {stem!r}; only one of them would be captioned. Rename or remove one")
            stems[stem] = name
