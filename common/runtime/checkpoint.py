"""Crash-safe, resumable checkpoints of the three trainers (train_text2mask.py, train_mask2img.py,
train_seg.py), on accelerate's save_state / load_state.

A checkpoint is complete or it does not exist under its name:
1. accelerate writes the state into `.partial-NAME/` next to where it belongs (the trainer adds its own
   files there, e.g. a config.json, and a marker file naming what it holds);
2. every file and the folder are fsync'ed, then the folder is renamed to NAME (one atomic rename);
3. only then are the oldest checkpoints over the limit removed (renamed out of the way first, so a
   half-deleted folder never looks like a checkpoint), and what earlier killed saves left.
A kill at any point leaves the newest complete checkpoint in place. `--resume latest` takes the newest
folder that holds the marker, and says which it skipped (a `.partial-*` folder, or one without the
marker: cut by a kill, or written by an older version; pass its path with --resume to try it anyway).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from common import SegGenError
from common.runtime import record

PARTIAL = ".partial-"  # a checkpoint being written (or being deleted): never resumed from
MARKER = "checkpoint.json"  # written last into the temporary folder: its presence means complete


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder below `folder`, then `folder` itself (contents on disk before the rename)."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        for name in dirs:
            _fsync(Path(root) / name)
    _fsync(folder)


def _remove(path: Path) -> None:
    """Delete a folder so that no crash leaves it half-deleted under a checkpoint name."""
    gone = path.with_name(f"{PARTIAL}old-{path.name}")
    os.replace(path, gone)
    _fsync(path.parent)
    shutil.rmtree(gone, ignore_errors=True)


def read_marker(path: Path, marker: str = MARKER) -> dict | None:
    """The marker of a checkpoint folder, or None where it is missing or unreadable (incomplete)."""
    try:
        return json.loads((Path(path) / marker).read_text())
    except (OSError, ValueError):
        return None


def scan(parent: Path, pattern: str, marker: str = MARKER) -> tuple[list[Path], list[Path]]:
    """(complete checkpoints oldest first, by their marker's "order"; incomplete folders) of parent/pattern."""
    complete, incomplete = {}, []
    for path in Path(parent).glob(pattern):
        if not path.is_dir():
            continue
        info = read_marker(path, marker)
        if info is None or path.name.startswith(PARTIAL):
            incomplete.append(path)
        else:
            # train_seg's state.json of before this module carries its order as phase and step
            complete[path] = info.get("order", [info.get("phase", 0), info.get("step", 0)])
    incomplete += [p for p in Path(parent).glob(PARTIAL + "*") if p.is_dir()]
    return sorted(complete, key=complete.get), sorted(incomplete)


def save(accelerator, path: Path, info: dict, order: list[int], keep: int | None, pattern: str,
         marker: str = MARKER, extra=None) -> Path:
    """accelerator.save_state into `path`, crash-safe (see the module doc). Every process calls it.

    info: what the marker records (the step, ...), with "order" = `order` (how checkpoints sort);
    extra(folder): the trainer's own files, written by the main process before the marker;
    keep: how many complete checkpoints of parent/pattern stay afterwards (None or 0: all)."""
    path = Path(path)
    tmp = path.with_name(PARTIAL + path.name)
    main = accelerator.is_main_process
    if main and tmp.exists():  # left by a killed save
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if main:
        if extra is not None:
            extra(tmp)
        (tmp / marker).write_text(json.dumps({**info, "order": order}) + "\n")
        fsync_tree(tmp)
        if path.exists():  # the same step saved again (a resumed run's last step)
            _remove(path)
        os.replace(tmp, path)
        _fsync(path.parent)
        complete, _ = scan(path.parent, pattern, marker)
        for old in complete[:-keep] if keep else []:
            _remove(old)
        for stale in path.parent.glob(PARTIAL + "*"):  # what killed saves and deletions left: never complete
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def latest(parent: Path, pattern: str, marker: str = MARKER, say=None) -> Path | None:
    """The newest complete checkpoint of parent/pattern (None: there is none); `say` is told which
    incomplete folders were passed over."""
    complete, incomplete = scan(parent, pattern, marker)
    if incomplete and say is not None:
        say(f"[yellow]--resume latest: skipped {len(incomplete)} incomplete checkpoint folder(s) (cut by a kill, or "
            f"without {marker}): {', '.join(p.name for p in incomplete)}[/]")
    return complete[-1] if complete else None


def load(accelerator, path: Path, ema=None) -> None:
    """accelerator.load_state(path). accelerate loads registered objects such as diffusers' EMAModel
    with map_location="cpu", so the EMA's shadow weights are moved back to the training device here
    (or the first ema.step after a resume fails on a device mismatch)."""
    accelerator.load_state(str(path))
    if ema is not None:
        ema.to(accelerator.device)


def check_explicit(resume: str, required: str, what: str) -> Path:
    """--resume PATH: a folder holding `required` (accelerate's or the trainer's file), else an error saying what is wanted."""
    path = Path(resume)
    if not (path.is_dir() and any(path.glob(required))):
        raise SegGenError(f"--resume {resume}: not a checkpoint folder ({what}); pass --resume latest or a checkpoint folder")
    return path


# ---------------------------------------------------------------- the generator trainers: output_dir/checkpoint-{step}

def checkpoint_step(path: Path | None) -> int | None:
    """The step of a checkpoint-{step} folder; None for no path or another name."""
    name = Path(path).name if path is not None else ""
    return int(name[len("checkpoint-"):]) if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit() else None


def resolve_trainer_resume(resume: str | None, output_dir: Path, say=None, stage: str | None = None,
                           subfolder: str | None = None, max_steps: int | None = None) -> Path | None:
    """--resume latest | PATH -> the checkpoint folder (checked before any model is loaded).

    Without --resume, an output folder that holds checkpoints or a trained model is refused rather than
    mixed with a new run; one left by a run killed before its first checkpoint is simply started over.
    A checkpoint of another stage (its marker's "stage", else the model folder it lacks: `subfolder`) or
    past --max-steps is refused."""
    output_dir = Path(output_dir)
    if resume is None:
        complete, incomplete = scan(output_dir, "checkpoint-*")
        if complete or [p for p in incomplete if checkpoint_step(p) is not None]:
            raise SegGenError(
                f"--output-dir {output_dir} holds checkpoints of an earlier run: pass --resume latest to continue it, "
                "or choose another --output-dir"
            )
        for done in ("model_index.json", "config.json"):  # Text2Mask's pipeline, Mask2Img's ControlNet
            if (output_dir / done).is_file():
                raise SegGenError(
                    f"--output-dir {output_dir} holds a trained model ({done}) and no checkpoint to resume from: "
                    "choose another --output-dir, or delete that folder to train again"
                )
        return None
    if resume == "latest":
        found = latest(output_dir, "checkpoint-*", say=say)
        if found is None:
            raise SegGenError(f"--resume latest: no complete checkpoint-* folder in {output_dir}; drop --resume to start a new run, "
                              "or fix --output-dir")
    else:
        found = check_explicit(resume, "random_states_*.pkl", "checkpoint-STEP with random_states_0.pkl, written by this script")
        if checkpoint_step(found) is None:
            raise SegGenError(f"--resume {resume}: not a checkpoint folder (checkpoint-STEP, written by this script); "
                              "pass --resume latest or a checkpoint-* path")
    check_stage(found, stage, subfolder)
    step = checkpoint_step(found)
    if max_steps is not None and step > max_steps:
        raise SegGenError(f"--max-steps {max_steps} is below the step of the checkpoint resumed ({found}: step {step}); "
                          f"pass --max-steps {step} or more, or start a new run in another --output-dir")
    return found


def check_stage(path: Path, stage: str | None, subfolder: str | None) -> None:
    """A checkpoint resumed by the trainer of another stage (Text2Mask's given to Mask2Img) is refused."""
    recorded = (read_marker(path) or {}).get("stage")
    if stage is not None and recorded is not None and recorded != stage:
        raise SegGenError(f"--resume {path}: a checkpoint of {recorded}, not of {stage}; pass a checkpoint of this "
                          f"trainer's run (its --output-dir), or --resume latest")
    if subfolder is not None and recorded is None and not (Path(path) / subfolder).is_dir():
        raise SegGenError(f"--resume {path}: no {subfolder}/ folder, so not a checkpoint of {stage or 'this trainer'}; "
                          "pass a checkpoint of this trainer's run, or --resume latest")


def save_trainer_checkpoint(accelerator, output_dir: Path, step: int, total_limit: int | None, stage: str | None = None) -> Path:
    """output_dir/checkpoint-{step}, crash-safe; at most total_limit complete ones remain afterwards. The marker
    records the step and the stage (text2mask, mask2img)."""
    info = {"step": step, **({"stage": stage} if stage else {})}
    return save(accelerator, Path(output_dir) / f"checkpoint-{step}", info, [step], total_limit, "checkpoint-*",
                extra=lambda folder: record.copy_into(folder, output_dir))  # the record it was trained under


# ---------------------------------------------------------------- train_seg.py: output_dir/checkpoints/phase{k}-step{N}

def save_seg_checkpoint(accelerator, net, processor, output_dir: Path, state: dict, keep: int) -> Path:
    """train_seg.py: checkpoints/phase{k}-step{N}, crash-safe: accelerate state (model.safetensors, optimizer, scheduler,
    RNG) + config.json and the image processor, so from_pretrained (and --eval-only --checkpoint) loads it."""
    def extra(folder):
        accelerator.unwrap_model(net).config.save_pretrained(folder)
        processor.save_pretrained(folder)
        record.copy_into(folder, output_dir)  # the record it was trained under

    path = output_dir / "checkpoints" / f"phase{state['phase']}-step{state['step']:07d}"
    return save(accelerator, path, state, [state["phase"], state["step"]], keep, "phase*-step*", "state.json", extra)


def resolve_seg_resume(resume: str | None, output_dir: Path, say) -> Path | None:
    """--resume latest: the newest complete checkpoint (none yet: start from scratch); or a given folder.
    Without --resume, a folder holding checkpoints or a finished run (model/, metrics.json) is refused
    rather than replaced."""
    if resume is not None and resume != "latest":
        return check_explicit(resume, "state.json", "no state.json; use 'latest' or checkpoints/phase*-step*")
    found = latest(output_dir / "checkpoints", "phase*-step*", "state.json", say if resume else None)
    if found is not None and resume is None:
        raise SegGenError(f"--output-dir {output_dir} holds checkpoints of an earlier run: pass --resume latest to continue "
                          "it, or choose another --output-dir")
    for done in ("model", "metrics.json"):
        if found is None and (Path(output_dir) / done).exists():
            raise SegGenError(f"--output-dir {output_dir} holds a finished run ({done}) and no checkpoint to resume from: "
                              "choose another --output-dir, or delete that folder to train again")
    return found


def check_seg_position(path: Path, phases: list[tuple[str, float, int]]) -> tuple[int, int]:
    """A train_seg checkpoint's (phase, step) must lie inside this run's phases: a pretrain checkpoint resumed
    as `aug`, or a step past --max-steps, is refused."""
    state = read_marker(path, "state.json") or {}
    phase, step = state.get("phase", 0), state.get("step", 0)
    if phase >= len(phases):
        raise SegGenError(f"--resume {path}: a checkpoint of phase {phase + 1} of a run with more phases, this run has "
                          f"{len(phases)} ({', '.join(n for n, _, _ in phases)}); resume with the recorded --strategy, "
                          "or start a new run in another --output-dir")
    name, _, steps = phases[phase]
    if step > steps:
        raise SegGenError(f"--resume {path}: step {step} of phase {name}, past its {steps} steps (--max-steps / "
                          f"--pretrain-steps); pass at least {step}, or start a new run in another --output-dir")
    return phase, step


def start_seg(output_dir: Path, options: dict, resume_from: Path | None, phases: list, main: bool, say) -> tuple[int, int]:
    """train_seg.py's start: the checkpoint's (phase, step) checked against this run's phases, the record compared
    and written (`start`), stats.jsonl cut back to the checkpoint. Returns (phase, step)."""
    position = check_seg_position(resume_from, phases) if resume_from is not None else (0, 0)
    record.start(output_dir, options, resumed=resume_from, run_dir=None if resume_from is None else Path(resume_from).parent.parent,
                 step=sum(s for _, _, s in phases[:position[0]]) + position[1], free=record.SEG_FREE, main=main, say=say)
    names = [n for n, _, _ in phases]
    if main:  # the lines past the checkpoint are logged again by the resumed run; a new run starts an empty log
        record.trim_jsonl(Path(output_dir) / "stats.jsonl",
                          lambda r: (names.index(r["phase"]) if r.get("phase") in names else 0, r.get("step", 0)) <= position)
    return position


# ---------------------------------------------------------------- diffusers models inside checkpoints

def register_diffusers_hooks(accelerator, model_cls, subfolder: str) -> None:
    """Checkpoints keep the trained model in diffusers format (checkpoint-N/{subfolder}/, loadable with
    from_pretrained for a look at an intermediate model) instead of accelerate's flat state dict."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                accelerator.unwrap_model(model).save_pretrained(Path(output_dir) / subfolder)
        while weights:  # written above; accelerate must not write them again
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            loaded = model_cls.from_pretrained(input_dir, subfolder=subfolder)
            model.load_state_dict(loaded.state_dict())
            del loaded

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
