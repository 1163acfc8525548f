"""What a DataLoader worker's batch costs to hand over, in shared memory vs by value (common/runtime/loader.py).

One worker, batches of two, prefetch 4; per batch, the main process's wait in `next()` once the worker
is ahead (the worker makes zeros, so its own work is negligible):
- tensors per batch: 1, 5, 9 small tensors (32 bytes each), sent the default way (a shared-memory file
  descriptor per tensor, torch.multiprocessing's default strategy), as NumPy arrays in the pickle, and with
  torch's other strategy, set_sharing_strategy("file_system"), in a fresh process;
- size: one uint8 tensor of 1 KiB to 4 MiB per batch, shared vs by value: where BY_VALUE (256 KiB)
  comes from.

    python bench/loader.py [--batches 300]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common.runtime import loader  # noqa: E402


class Zeros(torch.utils.data.Dataset):
    """Items of `count` uint8 tensors of `nbytes` bytes each, as a dict."""

    def __init__(self, count: int, nbytes: int):
        self.count, self.nbytes = count, nbytes

    def __len__(self):
        return 10**9

    def __getitem__(self, i):
        return {f"t{j}": torch.zeros(self.nbytes, dtype=torch.uint8) for j in range(self.count)}


def every_tensor_by_value(items: list[dict]) -> dict:
    """default_collate, then every tensor as a NumPy array, whatever its size (loader.by_value stops at BY_VALUE)."""
    return {k: v.numpy() for k, v in torch.utils.data.default_collate(items).items()}


def ms_per_batch(count: int, nbytes: int, by_value: bool, batches: int) -> float:
    collate = every_tensor_by_value if by_value else torch.utils.data.default_collate
    it = iter(torch.utils.data.DataLoader(Zeros(count, nbytes // 2), batch_size=2, num_workers=1, prefetch_factor=4,
                                          collate_fn=collate))
    for _ in range(20):  # the worker starts and gets ahead
        batch = loader.as_tensors(next(it))
    t = time.perf_counter()
    for _ in range(batches):
        batch = loader.as_tensors(next(it))
    assert all(torch.is_tensor(v) for v in batch.values())
    return (time.perf_counter() - t) / batches * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--file-system", action="store_true", help=argparse.SUPPRESS)  # the child process of the last column
    a = p.parse_args()
    if a.file_system:
        torch.multiprocessing.set_sharing_strategy("file_system")
        print(" ".join(f"{ms_per_batch(n, 32, False, a.batches):.2f}" for n in (1, 5, 9)))
        return
    child = subprocess.run([sys.executable, __file__, "--file-system", "--batches", str(a.batches)], capture_output=True, text=True,
                           check=True).stdout.split()
    print(f"ms per batch (2 items, 1 worker), {a.batches} batches")
    print(f"{'small tensors per batch':<26}{'shared (fd)':>12}{'by value':>10}{'file_system':>13}")
    for n, fs in zip((1, 5, 9), child):
        print(f"{n:<26}{ms_per_batch(n, 32, False, a.batches):>12.2f}{ms_per_batch(n, 32, True, a.batches):>10.2f}{float(fs):>13.2f}")
    print(f"{'one tensor of':<26}{'shared (fd)':>12}{'by value':>10}")
    for kib in (1, 64, 256, 1024, 4096):
        print(f"{f'{kib} KiB':<26}{ms_per_batch(1, kib * 1024, False, a.batches):>12.2f}{ms_per_batch(1, kib * 1024, True, a.batches):>10.2f}"
              + ("   <- loader.BY_VALUE" if kib * 1024 == loader.BY_VALUE else ""))


if __name__ == "__main__":
    main()
