"""How a batch travels from a DataLoader worker to the training step.

torch.multiprocessing hands each tensor a worker returns over as a shared-memory file descriptor, sent
over a fresh Unix-socket connection: a fixed ~0.5 ms per tensor on a CPU here, however small the
tensor. A NumPy array travels inside the pickle instead, which is cheaper up to a few hundred KiB. So a
worker's batch sends its small tensors as arrays (`by_value`, the end of a collate_fn) and the main
process turns them back (`as_tensors`, no copy).

`python bench/loader.py` (one worker, batches of two, 2 cores), ms per batch: 1 / 5 / 9 small tensors
0.90 / 3.03 / 4.79 in shared memory, 0.30 / 0.77 / 0.86 by value; one tensor of 256 KiB 0.74 vs 0.51, of
1 MiB 1.26 vs 3.57 (from there on shared memory wins). torch's other strategy,
set_sharing_strategy("file_system"), gave 0.62 / 1.28 / 2.25, but it is process-wide and can leave files
in /dev/shm behind a killed job.
"""

from __future__ import annotations

import numpy as np
import torch

BY_VALUE = 256 * 1024  # bytes: tensors up to this size travel inside the pickle (measured above)
NUMPY_DTYPES = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32,
                torch.float64}  # the dtypes .numpy() keeps exactly (not bfloat16, fp8, complex)


def by_value(batch: dict) -> dict:
    """A collated batch with its small dense tensors as NumPy arrays; any other value stays as it is."""
    def small(v):
        return torch.is_tensor(v) and v.layout == torch.strided and v.dtype in NUMPY_DTYPES and v.nbytes <= BY_VALUE

    return {k: v.detach().numpy() if small(v) else v for k, v in batch.items()}


def as_tensors(batch: dict) -> dict:
    """by_value undone in the main process: the arrays as tensors sharing their memory."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def collate(items: list[dict]) -> dict:
    """torch's default_collate, then by_value: the generator trainers' collate_fn."""
    return by_value(torch.utils.data.default_collate(items))
