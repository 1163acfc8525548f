"""One real subset for every stage (issue 10 item 5; Table 4's 1,000-sample setting trains the generators
*and* the segmenter on the same images).

    python -m common.data.subset --data ade20k --data-root datasets --n 1000 --seed 0 --out subsets/ade20k-1000.txt

writes the sorted ids of a seeded choice of --n training samples, one per line; every stage's
`--real-subset FILE` (common/runtime/cli.py: RealSubsetOpt) keeps only those: `apply` for a stage that reads the
dataset (caption, train_seg), `captioned` for one that reads captions (both trainers, masksyn, imgsyn).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from common import SegGenError
from common.runtime.cli import Data, user_errors
from common.data.datasets import default_data_root, read_dataset
from common.runtime.progress import console


def choose(ids: list[str], n: int, seed: int) -> list[str]:
    """Sorted ids of a seeded choice of n of `ids` (without replacement)."""
    if not 1 <= n <= len(ids):
        raise SegGenError(f"--n must lie in 1..{len(ids)} (the split's samples; got {n})")
    pick = np.random.default_rng(seed).choice(len(ids), n, replace=False)
    return sorted(ids[i] for i in pick)


def read_ids(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise SegGenError(f"--real-subset {path}: no such file; write one with python -m common.data.subset --out {path}")
    # utf-8-sig: a BOM (as Windows editors write) is not part of the first id
    ids = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if not ids:
        raise SegGenError(f"--real-subset {path}: no ids in it")
    return ids


def apply(samples: list, path: str | Path) -> list:
    """The samples whose id is in the subset file, in their order; every id of the file must be one of them."""
    ids = set(read_ids(path))
    missing = sorted(ids - {s.id for s in samples})
    if missing:
        raise SegGenError(f"--real-subset {path}: {len(missing)} id(s) are not in the dataset (e.g. {missing[0]!r}); "
                          f"was it written for another --data / --data-root / split?")
    return [s for s in samples if s.id in ids]


def captioned(caption_ids, path: str | Path, captions: str | Path) -> set[str]:
    """The subset's ids, every one of them checked to have a caption in `captions` (its ids `caption_ids`):
    a stage that reads captions (both trainers, masksyn, imgsyn) keeps only the lines whose id this returns."""
    ids = read_ids(path)
    have = set(caption_ids)
    missing = [i for i in ids if i not in have]
    if missing:
        raise SegGenError(f"--real-subset {path}: {len(missing)} of its {len(ids)} id(s) have no caption in --captions {captions} "
                          f"(e.g. {missing[0]!r}); caption them with caption.py --real-subset {path} --out {captions}, "
                          f"or pass the subset written for this dataset and split")
    return set(ids)


def main(
    out: Annotated[Path, typer.Option(help="Where the ids go (one per line, sorted).")],
    n: Annotated[int, typer.Option(min=1, help="How many training samples (Table 4: 1000).")],
    data: Annotated[Data, typer.Option(help="Dataset.")] = Data.ade20k,
    data_root: Annotated[Path | None, typer.Option(help="Dataset root (default: $SEGGEN_DATASETS, else ./datasets).")] = None,
    split: Annotated[str, typer.Option(help="Split the ids are drawn from.")] = "train",
    seed: Annotated[int, typer.Option(help="Seed of the choice.")] = 0,
):
    """Write a seeded subset of a dataset's training ids, for every stage's --real-subset."""
    with user_errors(console):
        samples = read_dataset(data.value, data_root if data_root is not None else default_data_root(), split)
        ids = choose([s.id for s in samples], n, seed)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(f"{i}\n" for i in ids))
        console.print(f"{out}: {len(ids)} of {len(samples)} {data.value} {split} ids (seed {seed})")


if __name__ == "__main__":
    typer.run(main)
