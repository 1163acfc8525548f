"""The random source of one training step as a pure function of (seed, step, rank): a resumed run draws what
the uninterrupted run drew (the generator trainers' noise, timesteps and dropout; train_seg's augmentation)."""

from __future__ import annotations

import numpy as np
import torch


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of micro-step `step` on process `rank`: a pure function of (seed, step, rank)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)


def step_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    """The random source of micro-step `step` on process `rank` (noise, timesteps, VAE sample, dropout):
    a pure function of (seed, step, rank), so resuming draws what the uninterrupted run drew."""
    g = torch.Generator(device=device)
    g.manual_seed(step_seed(seed, step, rank))
    return g
