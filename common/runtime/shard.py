"""Which slice of the work this process does under `accelerate launch` / torchrun."""

from __future__ import annotations


def process_state():
    """accelerate's PartialState, including multi-process CPU runs.

    PartialState() on a machine without a GPU treats a torchrun / `accelerate launch` with
    ACCELERATE_USE_CPU=true as one process (only Accelerator reads that flag), so every process would
    do all the work. Asking for CPU there makes it join the gloo process group instead.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def shard(items: list, state) -> list:
    """Process k of n takes items k, k+n, k+2n, ...: a slice fixed by the list, so that processes never
    overlap however much of the work is already done."""
    return items[state.process_index :: state.num_processes]
