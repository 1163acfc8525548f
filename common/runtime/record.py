"""A run folder's records (options.json, stats.jsonl, metrics.json) for the three trainers: written
atomically, read with care, and compared on --resume so that a resume continues the recorded experiment
or is refused.

- `write_json` writes through a temporary file and a rename: a reader never sees half a file, a kill never
  leaves an empty one. `read_json` names a broken file and the fix instead of a JSONDecodeError.
- `read_jsonl` reads a JSON-lines log whose last line may be torn by a kill (skipped); a broken line
  elsewhere is named. `trim_jsonl` keeps the lines a resumed run does not take again, atomically.
- `start` is THE comparison of a resume: the options recorded in options.json against the new ones.
  Options that define the experiment must match, or the run is refused naming each difference (old and
  new) and the fix; options in `free` (logging, checkpointing, workers, ...) may change and are recorded.
  options.json holds the options of the latest start and `history`: every start, its time, world size,
  step and changed options.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from common import SegGenError

# ---------------------------------------------------------------- atomic writes, careful reads


def write_json(path: Path, value, indent: int | None = 2) -> Path:
    """`value` as JSON at `path`, atomically (a temporary file in the same folder, fsync'ed, renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(value, indent=indent, default=str) + "\n")
    return path


def write_text(path: Path, text: str) -> None:
    """Text at `path`, atomically; the temporary name carries host and pid (unique on a shared filesystem)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path, fix: str = "delete it to start over, or restore it from a copy"):
    """The JSON value of `path`; an empty or broken file is a SegGenError naming it and `fix`."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise SegGenError(f"{path} is broken (empty or not JSON: {e}); {fix}") from None


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file (none when it is missing). A torn last line (a kill mid-write) is
    skipped; a broken line before it is a SegGenError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            if n == len(lines):  # torn by a kill: the step is taken again
                break
            raise SegGenError(f"{path}:{n} is not a JSON line; delete that line (or the file) and rerun") from None
    return out


def trim_jsonl(path: Path, keep) -> None:
    """Keep the records of `path` for which keep(record) is true (atomically); a torn last line goes too."""
    path = Path(path)
    if path.is_file():
        write_text(path, "".join(json.dumps(r) + "\n" for r in read_jsonl(path) if keep(r)))


# ---------------------------------------------------------------- the comparison of a resume


def options_or(path: Path | None, fallback: dict) -> dict:
    """The record at `path` when it reads as one, else `fallback` (the history of a broken record is lost, said nowhere else)."""
    try:
        value = json.loads(Path(path).read_text()) if path is not None else fallback
    except (OSError, ValueError):
        return fallback
    return value if isinstance(value, dict) else fallback

OPTIONS = "options.json"


def plain(options: dict) -> dict:
    """The options as options.json stores them (paths and Enums as strings)."""
    return json.loads(json.dumps(options, default=str))


def differences(recorded: dict, options: dict, free: set[str]) -> tuple[dict, dict]:
    """(fixed, changed): {name: (old, new)} of the options both record that differ, split by whether they
    define the experiment (not in `free`) or may change between starts."""
    fixed, changed = {}, {}
    for name, new in plain(options).items():
        if name in recorded and name != "history" and recorded[name] != new:
            (changed if name in free else fixed)[name] = (recorded[name], new)
    return fixed, changed


DERIVED = {"world_size": "the process count", "global_batch": "the global batch", "stage": "the stage", "samples": "the training samples",
           "is_sdxl": "the base's kind (SDXL)", "micro_batch": "the micro-batch", "gradient_accumulation": "the accumulation steps"}


def flag(name: str) -> str:
    """How a recorded option is named to the user: its flag, or what a derived value is."""
    return DERIVED.get(name, "--" + name.replace("_", "-"))


def refusal(fixed: dict, where: Path, output_dir: Path) -> str:
    said = "; ".join(f"{flag(k)}: recorded {old!r}, now {new!r}" for k, (old, new) in sorted(fixed.items()))
    hints = []
    if "world_size" in fixed:
        hints.append(f"this trainer resumes exactly only on the recorded number of processes: launch "
                     f"{fixed['world_size'][0]} processes (now {fixed['world_size'][1]})")
    if "stage" in fixed:
        hints.append(f"the checkpoint belongs to a {fixed['stage'][0]} run, this is {fixed['stage'][1]}")
    if "max_steps" in fixed or "pretrain_steps" in fixed:
        hints.append("the LR schedule is laid out over the recorded steps: changing them mid-run changes the schedule")
    return (f"--resume would change the experiment recorded in {where}: {said}. "
            + "".join(h + ". " for h in hints)
            + f"Resume with the recorded values, or start a new run in another --output-dir than {output_dir}")


def read_record(path: Path) -> dict:
    """An options.json: a JSON object, or a SegGenError naming the file and the fix."""
    value = read_json(path, "restore it from a copy, or start a new run in another --output-dir")
    if not isinstance(value, dict):
        raise SegGenError(f"{path} is not an options record (a JSON object); start a new run in another --output-dir")
    return value


def copy_into(checkpoint: Path, output_dir: Path) -> None:
    """A checkpoint carries the record it was written under (checkpoint/options.json): it stays comparable
    when the checkpoint is copied or its run folder's record is lost."""
    if (Path(output_dir) / OPTIONS).is_file():
        write_text(Path(checkpoint) / OPTIONS, (Path(output_dir) / OPTIONS).read_text())


def start(output_dir: Path, options: dict, *, resumed: Path | None, run_dir: Path | None = None, step: int, free: set[str],
          main: bool, say=None) -> dict:
    """Check a start against the record and write options.json (main process; every process checks).

    resumed: the checkpoint folder resumed (None: a new run); its options.json is compared, else that of its run
    folder `run_dir` (a checkpoint of an older version); with neither there is nothing to compare (said).
    The history continues the run folder's. step: the checkpoint's. Returns the changed options {name: (old, new)}."""
    output_dir = Path(output_dir)
    changed, history = {}, []
    if resumed is not None:
        found = [p for p in (Path(resumed) / OPTIONS, Path(run_dir or resumed) / OPTIONS) if p.is_file()]
        if not found and say is not None:
            say(f"[yellow]note:[/] neither {resumed} nor its run folder holds {OPTIONS}: this resume is not compared with "
                "the options it was trained with")
        recorded = read_record(found[0]) if found else {}
        fixed, changed = differences(recorded, options, free)
        if fixed:
            raise SegGenError(refusal(fixed, found[0], output_dir))
        history_from = (Path(run_dir) / OPTIONS) if run_dir is not None and (Path(run_dir) / OPTIONS).is_file() else None
        history = list(options_or(history_from, recorded).get("history", []))
        if changed and say is not None:
            say("resume: " + "; ".join(f"{flag(k)} {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items())))
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "world_size": options.get("world_size"),
             "step": step, "changed": {k: list(v) for k, v in sorted(changed.items())}}
    if main:
        write_json(output_dir / OPTIONS, {**plain(options), "history": [*history, entry]})
    return changed


# train_seg.py's options that may change when a run is resumed: how it is run, logged, checkpointed and evaluated,
# not what it learns. The process count may not: its per-process draws (MixedBatches, the loss's point sampling)
# depend on it, so a resume on another count is refused naming both.
SEG_FREE = {"resume", "output_dir", "num_workers", "checkpoint_every", "keep_checkpoints", "log_every", "report_to",
            "metrics_file", "eval_size", "multiscale", "eval_every", "eval_samples", "process_group_timeout"}
