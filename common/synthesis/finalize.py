"""What needs a whole synthetic folder, written once after its tasks (issue 26 item 2):

    python -m common.synthesis.finalize FOLDER [FOLDER ...]

- FOLDER/.index.npz: the compact index of every manifest line (common/data/index.py);
- FOLDER/panoptic_FOLDER.json: the COCO panoptic document of a COCO folder (synth.write_coco_panoptic_json);
- FOLDER/tally.json: MaskSyn's attempts, acceptances and rejections per rule over the whole folder, and the
  captions still short of --per-sample;
- FOLDER/.finalized.json, last: the manifests' names, sizes and mtimes these were made from.

The tasks of a sharded masksyn / imgsyn run (common/runtime/shard.py) write only their own manifests, so
none of them waits for another; a one-task run finalizes at its end by itself (or with --finalize). Readers
(train_seg through common/seg/data.py, quality.py) call `ensure_finalized`, which runs this when
.finalized.json is missing or does not match the manifests any more (a task added lines since). One process
writes these files: finalizers on one folder take `.lock.finalize` in turn, and the second finds the
folder finalized already. A folder that cannot be written (read-only, shared) is left as it is: the index
is then kept in memory by its reader.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

from common import SegGenError
from common.data.manifest import atomic_save, first_record, iter_lines, manifest_files, parse_line

STAMP = ".finalized.json"


def rejected_files(folder: Path) -> list[Path]:
    return manifest_files(Path(folder) / "rejected.jsonl")


def folder_key(folder: Path) -> list:
    """What the finalized files depend on: every manifest's and rejected file's name, size and mtime."""
    files = manifest_files(folder) + rejected_files(folder)
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def is_fresh(folder: Path) -> bool:
    try:
        return json.loads((Path(folder) / STAMP).read_text()).get("key") == folder_key(folder)
    except (OSError, ValueError, AttributeError):
        return False


def finalize(folder: str | Path, force: bool = False) -> dict:
    """Write the whole-folder files of a synthetic folder (module doc); {"fresh": True} when they match the
    manifests already (force: write them anyway). Returns what was written."""
    folder = Path(folder)
    if not folder.is_dir() or not (manifest_files(folder) or rejected_files(folder)):
        raise SegGenError(f"{folder}: not a synthetic folder (no manifest*.jsonl); finalize a masksyn.py / imgsyn.py output")
    with finalize_lock(folder):  # one finalizer at a time: a second waits, then finds the folder fresh
        if not force and is_fresh(folder):
            return {"fresh": True, "folder": str(folder)}
        return _write(folder, folder_key(folder))


@contextmanager
def finalize_lock(folder: Path):
    """FOLDER/.lock.finalize, exclusive, waiting for the holder (finalizing is short and one process's job)."""
    import fcntl
    import os

    from common.runtime.lock import _flock, locks_off

    if locks_off():
        yield
        return
    path = folder / ".lock.finalize"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _flock(fd, fcntl.LOCK_EX, path, "finalize", folder)
        yield
    finally:
        os.close(fd)


def _write(folder: Path, key: list) -> dict:
    from common.data.index import synthetic_index
    from common.synthesis.synth import write_coco_panoptic_json

    first = first_record(folder)
    index = synthetic_index(folder) if first is not None else None  # rebuilt and saved when the manifests changed
    written = {"folder": str(folder), "samples": len(index) if index is not None else 0}
    if index is not None:
        written["index"] = str(folder / ".index.npz")
    first = first or {}
    if (first.get("settings") or {}).get("data") == "coco":
        written["coco_json"] = str(write_coco_panoptic_json(folder))
    if first.get("method") == "masksyn" or rejected_files(folder):
        written["tally"] = str(write_tally(folder, index))
    atomic_save(folder / STAMP, lambda p: p.write_text(json.dumps({"key": key, "samples": written["samples"]}) + "\n"))
    return written


def tally(folder: Path, index=None) -> dict:
    """Per caption (source id): {"accepted", "attempts", "rejected": {rule: n}, "last": reason}, and the run's
    per_sample / max_attempts as its lines record them, from the folder's files alone."""
    from common.data.index import synthetic_index

    if index is None and first_record(folder) is not None:
        index = synthetic_index(folder)
    per: dict[str, dict] = {}
    for source in index.provenance()["source_id"] if index is not None else []:
        t = per.setdefault(source, {"accepted": 0, "attempts": 0, "rejected": {}, "last": (-1, "")})
        t["accepted"] += 1
        t["attempts"] += 1
    plan = {}
    for file in rejected_files(folder):
        for n, _, line in iter_lines(file):
            r = parse_line(line, f"{file}:{n}")
            t = per.setdefault(str(r.get("source_id")), {"accepted": 0, "attempts": 0, "rejected": {}, "last": (-1, "")})
            rule = rule_of(r)
            t["attempts"] += 1
            t["rejected"][rule] = t["rejected"].get(rule, 0) + 1
            if int(r.get("k", -1)) > t["last"][0]:
                t["last"] = (int(r.get("k", -1)), r.get("reason", ""))
            plan = plan or {k: r[k] for k in ("per_sample", "max_attempts") if k in r}
    first = first_record(folder) or {}
    plan = {**{k: first[k] for k in ("per_sample", "max_attempts") if k in first}, **plan}
    for t in per.values():
        t["why"] = ", ".join(f"{k} {v}" for k, v in sorted(t["rejected"].items())) + (f" (last: {t['last'][1]})" if t["last"][1] else "")
        t["last"] = t["last"][1]
    return {"plan": plan, "per": per}


def rule_of(record: dict) -> str:
    """The rejection rule of a rejected.jsonl line (lines written before rules were recorded: from the reason)."""
    return record.get("rule") or ("classes" if "class" in record.get("reason", "") else "off_palette")


def write_tally(folder: Path, index=None) -> Path:
    """FOLDER/tally.json: attempts, acceptances and rejections per rule over the whole folder, and the
    captions short of per_sample (when the lines record it)."""
    t = tally(folder, index)
    per, per_sample = t["per"], t["plan"].get("per_sample")
    rules: dict[str, int] = {}
    for x in per.values():
        for k, v in x["rejected"].items():
            rules[k] = rules.get(k, 0) + v
    record = {"per_sample": per_sample, "max_attempts": t["plan"].get("max_attempts"), "captions": len(per),
              "attempts": sum(x["attempts"] for x in per.values()), "accepted": sum(x["accepted"] for x in per.values()),
              "rejected": rules,
              "short": {s: x for s, x in sorted(per.items()) if per_sample is not None and x["accepted"] < per_sample}}
    return atomic_save(folder / "tally.json", lambda p: p.write_text(json.dumps(record, indent=1) + "\n"))


def finish(out: Path, state, finalize_flag: bool | None, summary: dict) -> None:
    """After a generation task's loop: finalize the folder when this is the only task or finalize_flag is
    True; else put the command to run once every task has ended into the summary. Nothing waits for
    another task."""
    if finalize_flag is None:
        finalize_flag = state.num_processes == 1
    if finalize_flag and out.is_dir() and (manifest_files(out) or rejected_files(out)):
        done = finalize(out)
        summary.update({k: v for k, v in done.items() if k in ("coco_json", "tally")})
    elif state.num_processes > 1:
        summary["finalize"] = f"python -m common.synthesis.finalize {out}"


def ensure_finalized(folder: str | Path, say=None) -> dict | None:
    """finalize(folder) when its finalized files are missing or stale (a reader's call); None when they are
    fresh or the folder cannot be written (the reader goes on with an index in memory)."""
    folder = Path(folder)
    if not folder.is_dir() or not manifest_files(folder) or is_fresh(folder):
        return None
    try:
        done = finalize(folder)
    except (OSError, SegGenError) as e:  # read-only or lock-less: readers do not need the files themselves
        if say is not None:
            say(f"[yellow]note:[/] {folder} is not finalized and cannot be now ({e}); reading it as it is")
        return None
    if say is not None and not done.get("fresh"):
        say(f"finalized {folder}: {done['samples']} sample(s)")
    return done


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m common.synthesis.finalize", description=(
        "Write what needs the whole synthetic folder once its tasks have ended: the compact index (.index.npz), "
        "the COCO panoptic JSON of a COCO folder, MaskSyn's tally.json. Readers run it by themselves when it is "
        "missing or stale; run it after a sharded masksyn.py / imgsyn.py array (docs/many-machines.md)."))
    parser.add_argument("folders", nargs="+", type=Path, metavar="FOLDER", help="synthetic folder(s) (masksyn.py / imgsyn.py --out)")
    parser.add_argument("--force", action="store_true", help="write the files even when they match the manifests already")
    args = parser.parse_args(argv)
    try:
        for folder in args.folders:
            done = finalize(folder, force=args.force)
            if done.get("fresh"):
                print(f"{folder}: finalized already (pass --force to write it again)")
            else:
                print(f"{folder}: {done['samples']} sample(s); " + ", ".join(f"{k} {v}" for k, v in done.items()
                                                                          if k not in ("folder", "samples")))
    except SegGenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
