"""Which share of the work this task does (issue 26 item 1): independent scheduler tasks, no process group.

A generation stage (caption.py, masksyn.py, imgsyn.py, quality.py) is split into N tasks that never talk
to each other: task I of N takes the work items (or batches) I, I + N, I + 2N, ... of a list fixed by the
inputs, writes its own manifest beside the others in one folder, and waits for nobody. The share comes from

    --shard I/N                                       given on the command line (wins over the environment)
    SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT       a Slurm job array (--array=0-63); ids may start
      (SLURM_ARRAY_TASK_MIN, SLURM_ARRAY_TASK_STEP)   elsewhere (--array=1-64) or step (--array=0-63:2)
    RANK, WORLD_SIZE                                  torchrun / `accelerate launch` (each process a task;
                                                      no process group is started)

`srun -n N` is not read from SLURM_PROCID / SLURM_NTASKS: a batch script of --ntasks 4 that runs a stage
once (without srun) has them too, and would do a quarter of the work. Pass --shard $SLURM_PROCID/$SLURM_NTASKS.

An array task that itself runs torchrun (array of A tasks x W processes each) is task a * W + r of A * W.
Nothing given: task 0 of 1, the whole work.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from common import SegGenError


def task_share(spec: str | None = None, env: dict | None = None) -> tuple[int, int]:
    """(index, count) of this task: from `spec` ("I/N", the --shard option), else from the scheduler's
    environment (module doc), else (0, 1). SegGenError naming the flag or variable for a bad value."""
    env = os.environ if env is None else env
    if spec is not None:
        return _parse(spec)
    array = _slurm_array(env)
    ranks = _ranks(env)
    if array and ranks:  # an array task running torchrun: its processes split the task's share further
        return array[0] * ranks[1] + ranks[0], array[1] * ranks[1]
    return array or ranks or (0, 1)


def _parse(spec: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*", str(spec))
    if m is None:
        raise SegGenError(f"--shard {spec}: expected I/N, this task's index I of N tasks (e.g. --shard 0/4)")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1:
        raise SegGenError(f"--shard {spec}: N must be at least 1")
    if not 0 <= index < count:
        raise SegGenError(f"--shard {spec}: I must be in 0..N-1 (0..{count - 1})")
    return index, count


def _int(env, name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise SegGenError(f"environment variable {name}={value!r}: not an integer; unset it or pass --shard I/N") from None


def _slurm_array(env) -> tuple[int, int] | None:
    task = _int(env, "SLURM_ARRAY_TASK_ID")
    if task is None:
        return None
    low = _int(env, "SLURM_ARRAY_TASK_MIN") or 0
    step = _int(env, "SLURM_ARRAY_TASK_STEP") or 1
    count = _int(env, "SLURM_ARRAY_TASK_COUNT")
    if count is None:
        high = _int(env, "SLURM_ARRAY_TASK_MAX")
        if high is None:
            raise SegGenError(f"SLURM_ARRAY_TASK_ID={task} without SLURM_ARRAY_TASK_COUNT or SLURM_ARRAY_TASK_MAX: "
                              f"pass --shard I/N to say how many tasks share the work")
        count = (high - low) // step + 1
    index, rest = divmod(task - low, step)
    if rest or not 0 <= index < count:
        raise SegGenError(f"SLURM_ARRAY_TASK_ID={task} does not fit the array (min {low}, step {step}, {count} task(s)): "
                          f"use a contiguous array such as --array=0-{count - 1}, or pass --shard I/N")
    return index, count


def _ranks(env) -> tuple[int, int] | None:
    rank, size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    if rank is not None and size is not None and size > 1:
        if not 0 <= rank < size:
            raise SegGenError(f"RANK={rank} is not in 0..WORLD_SIZE-1 ({size - 1}); pass --shard I/N")
        return rank, size
    return None


@dataclass(frozen=True)
class Task:
    """This task's share and device: what the stages used accelerate's PartialState for, without the
    process group. `process_index` / `num_processes` keep PartialState's names for `shard`."""

    process_index: int
    num_processes: int
    device: object  # torch.device

    @property
    def is_main_process(self) -> bool:
        """Task 0 prints the run's header; every task prints its own progress and summary."""
        return self.process_index == 0

    @property
    def name(self) -> str:
        return f"task {self.process_index} of {self.num_processes}"


def task_device():
    """The device a task runs on: cuda:LOCAL_RANK under torchrun / accelerate (one GPU per process), else
    the first GPU this task sees (a Slurm array task gets its own through CUDA_VISIBLE_DEVICES), else MPS
    or the CPU."""
    import torch

    if torch.cuda.is_available():
        local = _int(os.environ, "LOCAL_RANK") or 0
        return torch.device("cuda", local % torch.cuda.device_count())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def this_task(spec: str | None = None) -> Task:
    """The Task of this process: `task_share(spec)` and `task_device()`."""
    index, count = task_share(spec)
    return Task(index, count, task_device())


def process_state():
    """accelerate's PartialState, including multi-process CPU runs (the trainers' and train_seg's).

    PartialState() on a machine without a GPU treats a torchrun / `accelerate launch` with
    ACCELERATE_USE_CPU=true as one process (only Accelerator reads that flag), so every process would
    do all the work. Asking for CPU there makes it join the gloo process group instead.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def shard(items: list, state) -> list:
    """Task k of n takes items k, k+n, k+2n, ...: a slice fixed by the list, so that tasks never
    overlap however much of the work is already done."""
    return items[state.process_index :: state.num_processes]
