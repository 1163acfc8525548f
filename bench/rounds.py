"""The rounds protocol of the ratio benchmarks (bench/caption.py, bench/train_step.py, bench/train_seg.py).

A script's speed on a shared machine drifts by more than the gaps we measure, so one run of the script
against one bare run minutes later measures the drift as much as the script. Instead: a bare run, then
`rounds` times (script, bare); each script run is compared with the mean of the bare runs on either side
of it, and the median of those ratios (statistics.median) is the result.
"""

from __future__ import annotations

from typing import Callable


def interleaved(bare: Callable[[], object], script: Callable[[int], object], rounds: int) -> tuple[list, list]:
    """(bare results, script results): bare, then `rounds` × (script(round), bare)."""
    bares, scripts = [bare()], []
    for r in range(rounds):
        scripts.append(script(r))
        bares.append(bare())
    return bares, scripts


def around(bares: list[float]) -> list[float]:
    """The bare figure beside each script run: the mean of the bare runs just before and after it."""
    return [(b0 + b1) / 2 for b0, b1 in zip(bares, bares[1:])]


def ratios(scripts: list[float], bares: list[float]) -> list[float]:
    """Each script run's figure over the bare figure around it."""
    return [s / b for s, b in zip(scripts, around(bares))]
