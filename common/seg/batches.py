"""§3.4: which samples each iteration of train_seg.py sees (the batch sampler of common/seg/loop.py)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from common import SegGenError


class MixedBatches(torch.utils.data.Sampler):
    """The per-process batches of iterations start..stop, as lists of (source, index, augmentation seed).

    Source 0 is the real training set, source k >= 1 the k-th synthetic folder. Each real slot of the
    batch is replaced by a synthetic sample with probability p_aug (§3.4), drawn uniformly from the union
    of all synthetic folders (or with `weights`: synthetic_weights). Real samples are seen in a fresh random order every epoch, shared by the
    processes (process r takes slots r*B..r*B+B-1 of each global batch). Everything is a function of
    (seed, step, rank), so a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, n_real: int, n_synthetic: list[int], batch: int, p_aug: float, seed: int,
                 start: int, stop: int, rank: int = 0, world: int = 1, weights: np.ndarray | None = None):
        if not 0.0 <= p_aug <= 1.0:
            raise SegGenError(f"--p-aug must lie in [0, 1] (got {p_aug})")
        if p_aug > 0 and sum(n_synthetic) == 0:
            raise SegGenError("p_aug > 0 needs synthetic samples: pass --synthetic FOLDER (or --strategy real)")
        if p_aug < 1 and n_real == 0:
            raise SegGenError("no real training samples (check --data-root / --max-real-samples)")
        self.n_real, self.batch, self.p_aug, self.seed = n_real, batch, p_aug, seed
        self.offsets = np.concatenate([[0], np.cumsum(n_synthetic)]).astype(np.int64)
        self.start, self.stop, self.rank, self.world = start, stop, rank, world
        if weights is not None and (len(weights) != self.offsets[-1] or not np.isclose(np.sum(weights), 1.0)):
            raise SegGenError(f"--synthetic-sampling: {len(weights)} probabilities for {int(self.offsets[-1])} synthetic samples")
        self.weights = weights

    @lru_cache(maxsize=2)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 0, epoch]).permutation(self.n_real)

    def draw(self, step: int) -> list[tuple[int, int, int]]:
        rng = np.random.default_rng([self.seed, 1, step, self.rank])
        replace = rng.random(self.batch) < self.p_aug
        if self.weights is None:  # §3.4: uniform over the union of the folders
            synth = rng.integers(0, max(int(self.offsets[-1]), 1), self.batch)
        else:  # FreeMask's hardness resampling (--synthetic-sampling hardness)
            synth = rng.choice(len(self.weights), self.batch, p=self.weights)
        aug_seeds = rng.integers(0, 2**62, self.batch)
        out = []
        for i in range(self.batch):
            if replace[i]:
                k = int(np.searchsorted(self.offsets, synth[i], side="right")) - 1
                out.append((k + 1, int(synth[i] - self.offsets[k]), int(aug_seeds[i])))
            else:
                epoch, j = divmod((step * self.world + self.rank) * self.batch + i, self.n_real)
                out.append((0, int(self._order(epoch)[j]), int(aug_seeds[i])))
        return out

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.draw(step)

    def __len__(self) -> int:
        return self.stop - self.start
