"""What a cluster asks of the three trainers (train_text2mask.py, train_mask2img.py, train_seg.py):

- a global batch that does not depend on the number of processes (`split_batch`: the per-process
  micro-batch and gradient accumulation derived from it, refused when it cannot be split);
- preemption that loses nothing (`on_sigterm`, `stop_requested`, `Preempted`): a scheduler's SIGTERM is
  noted, the step in progress ends, a checkpoint is saved and the run exits with PREEMPTED, so that the
  scheduler's requeue continues it with `--resume latest` (docs/training-on-clusters.md);
- the same for the generation stages (`stop_if_sigterm`): the batch in flight is finished, files and
  manifest lines, and the stage exits with PREEMPTED; rerunning the command continues it;
- a process-group timeout for long steps (`process_group_kwargs`): torch's default 10 minutes is shorter
  than a checkpoint save or a validation pass of a paper-size model while the other ranks wait.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from dataclasses import dataclass

from common import SegGenError

PREEMPTED = 143  # the exit code of a run stopped by SIGTERM after saving its checkpoint (128 + SIGTERM, as a shell reports it)
PROCESS_GROUP_TIMEOUT = 3600  # seconds: the default of --process-group-timeout


# ---------------------------------------------------------------- the global batch

@dataclass(frozen=True)
class BatchSplit:
    """How a global batch is spread: global_batch = world × micro × accumulation."""

    global_batch: int
    world: int
    micro: int  # samples per process per micro-step
    accumulation: int  # micro-steps per optimizer step

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.world} process(es) × {self.micro} sample(s) × "
                f"{self.accumulation} accumulation step(s)")


def split_batch(global_batch: int, world: int, cap: int) -> BatchSplit:
    """--global-batch-size over `world` processes: each process takes global_batch / world samples per
    optimizer step, in micro-batches of the largest size ≤ cap (--batch-size, the memory cap) that divides
    it, accumulated. Refused when the global batch is not a multiple of the process count."""
    if global_batch % world:
        fits = [n for n in range(world, 0, -1) if global_batch % n == 0][0]
        raise SegGenError(
            f"--global-batch-size {global_batch} cannot be split over {world} processes (each must take the same "
            f"number of samples): launch a number of processes that divides it (e.g. {fits}), or choose a global batch "
            f"that is a multiple of {world} (a different experiment)")
    per_process = global_batch // world
    micro = max(n for n in range(1, min(cap, per_process) + 1) if per_process % n == 0)
    return BatchSplit(global_batch, world, micro, per_process // micro)


def check_seg_batch(global_batch: int, world: int) -> None:
    """train_seg.py's --batch-size is the global batch: every process takes an equal, non-empty share."""
    if world > global_batch:
        raise SegGenError(
            f"{world} processes for a global batch of {global_batch} images (--batch-size is the global batch): each "
            f"process needs at least one image; launch at most {global_batch} processes (accelerate launch "
            f"--num_processes {global_batch}), or raise --batch-size (a different recipe)")
    if global_batch % world:
        fits = [n for n in range(world, 0, -1) if global_batch % n == 0][0]
        raise SegGenError(
            f"--batch-size {global_batch} (the global batch) cannot be split over {world} processes: launch a number of "
            f"processes that divides it (e.g. {fits}), or pass a --batch-size that is a multiple of {world}")


# ---------------------------------------------------------------- preemption

class Preempted(Exception):
    """Raised after the checkpoint of a SIGTERM'd run is saved; the command line exits with PREEMPTED."""


_requested = [False]


def _note(signum, frame):  # only notes it: the loop stops at the end of the step in progress
    _requested[0] = True


@contextmanager
def on_sigterm():
    """Inside: SIGTERM no longer ends the process but is noted (`stop_requested`); afterwards the
    previous handler is back. Outside the main thread (no signal handlers there) it changes nothing."""
    _requested[0] = False
    try:
        previous = signal.signal(signal.SIGTERM, _note)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _requested[0] = False


def stop_requested(accelerator) -> bool:
    """Whether any process was sent SIGTERM: the same answer on every process (a collective on more than
    one), so that all of them save the same step's checkpoint and stop together."""
    if accelerator.num_processes == 1:
        return _requested[0]
    import torch

    flag = torch.tensor([1.0 if _requested[0] else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, "max").item() > 0)


def preempted_message(step: int, checkpoint) -> str:
    return (f"stopped by SIGTERM after step {step}; checkpoint {checkpoint} saved. Continue with the same command and "
            f"--resume latest (exit code {PREEMPTED}: a scheduler may requeue the job)")


def stop_if_sigterm(stage: str) -> None:
    """Between two batches of a generation stage (caption.py, masksyn.py, imgsyn.py, quality.py), inside
    `on_sigterm`: when SIGTERM was noted, stop here (Preempted). Every batch before it is complete on disk,
    files and manifest lines (the stage's writers drain on Preempted); the same command continues, since
    every stage resumes by the ids already written. These stages run as independent tasks: no collective."""
    if _requested[0]:
        raise Preempted(f"{stage}: stopped by SIGTERM between two batches; every batch before it is complete on disk. "
                        f"Run the same command again to continue (exit code {PREEMPTED}: a scheduler may requeue the job)")


def ignore_sigterm(worker_id: int) -> None:
    """DataLoader worker_init_fn: a scheduler signals every process of the job, DataLoader workers included;
    they must outlive the SIGTERM so that the step in progress can end and its checkpoint be saved (the main
    process shuts them down afterwards)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ---------------------------------------------------------------- the process group

def process_group_kwargs(timeout_s: int) -> list:
    """accelerate's kwargs_handlers for a process-group timeout of `timeout_s` seconds (--process-group-timeout)."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))]
