"""MaskSyn's redraw plan (paper §4.1: N accepted masks per caption), decided per caption inside a task.

The captions are cut into blocks (`block_size`); a task takes whole blocks (common/runtime/shard.py) and
draws each in rounds: round 0 draws attempts 0..N-1 of each caption of the block, each later round as many
new attempts as a caption still lacks (at most --max-attempts in all). A round's plan depends only on the
block's own outcomes before it, which the task knows, so no task waits for another, and one task, N tasks
and a resumed run all cut the same batches (the same bytes).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from common.synthesis import synth


class Either:
    """`x in` either of two sets, without building their union."""

    def __init__(self, a: set, b: set):
        self.a, self.b = a, b

    def __contains__(self, x) -> bool:
        return x in self.a or x in self.b


class _One:
    """The whole list of a block's work items to one task (the blocks are what tasks share)."""

    process_index, num_processes = 0, 1


ONE_TASK = _One()


def caption_blocks(sources: list[str], per_sample: int, batch_size: int) -> list[list[str]]:
    """The captions cut into blocks of `block_size`, in order: the unit a task takes whole."""
    n = block_size(per_sample, batch_size)
    return [sources[i:i + n] for i in range(0, len(sources), n)]


def block_size(per_sample: int, batch_size: int) -> int:
    """Captions per block: the fewest whose first round (per_sample attempts each) fills whole batches,
    batch_size / gcd(batch_size, per_sample) (per_sample 10, batch 4: 2 captions, 5 full batches). Fixed by
    the settings alone, so every run cuts the same blocks and batches."""
    return batch_size // math.gcd(batch_size, per_sample)


def save_thumbnail(path: Path, cmap: np.ndarray, side: int = 64) -> None:
    """A rejected colour map as a PNG of `side` px on its long side (nearest neighbour: its colours kept)."""
    im = Image.fromarray(cmap)
    scale = side / max(im.size)
    if scale < 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.NEAREST)
    im.save(path, format="PNG")


def short_captions(sources, done, rejected, why, per_sample, max_attempts) -> list[str]:
    """This task's captions still short of per_sample accepted masks, each with its attempts and rules."""
    accepted, tried = {}, {}
    for sid in done:
        accepted[sample_attempt(sid)[0]] = accepted.get(sample_attempt(sid)[0], 0) + 1
    for sid in done | rejected:
        tried[sample_attempt(sid)[0]] = tried.get(sample_attempt(sid)[0], 0) + 1
    out = []
    for s in sources:
        if accepted.get(s, 0) >= per_sample:
            continue
        rules, last = why.get(s, [{}, ""])
        text = ", ".join(f"{k} {v}" for k, v in sorted(rules.items())) + (f" (last: {last})" if last else "")
        earlier = tried.get(s, 0) - accepted.get(s, 0) - sum(rules.values())
        if earlier > 0:
            text += f"{'; ' if text else ''}{earlier} in an earlier run (rejected*.jsonl)"
        out.append(f"{s}: {accepted.get(s, 0)} of {per_sample} accepted after {tried.get(s, 0)} attempt(s) (max {max_attempts}); "
                   f"rejected: {text}")
    return out


def sample_attempt(sid: str) -> tuple[str, int]:
    s, _, k = sid.rpartition("_")
    return s, int(k)


def next_round(planned: dict[str, int], accepted: set[str], per_sample: int, max_attempts: int) -> list[tuple[str, int]]:
    """The work items (source id, attempt) of the next round, and `planned` moved on to include them.

    Round 0 (nothing planned): attempts 0..N-1 of every caption. Later: a caption with a accepted of its
    planned attempts gets min(N - a, max_attempts - planned) more. Only attempts already planned count,
    so what a killed run drew beyond them does not change the plan."""
    items = []
    for s, n in planned.items():
        have = sum(synth.sample_id(s, k) in accepted for k in range(n))
        more = per_sample if n == 0 else min(per_sample - have, max_attempts - n)
        items += [(s, k) for k in range(n, n + max(more, 0))]
        planned[s] = n + max(more, 0)
    return items
