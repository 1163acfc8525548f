"""Browse synthetic folders in a web browser: a static site that opens from disk (issue 27).

    python browse.py synth/masksyn-ade20k synth/imgsyn-ade20k --out browse/ade20k --data-root datasets
    chromium browse/ade20k/index.html            # or any browser: file://, no server

A grid of samples: image, colour map, label overlay with the class names, caption, source id, seed and
every quality.py figure; the real image beside it when --data-root holds the source dataset; MaskSyn's
rejected masks with the rule that rejected them. Sort by any figure, filter by class, source or
rejection rule; the view is in the URL (#sort=-miou&class=wall&page=3), so it can be shared. Data files
are written in chunks of --chunk samples and loaded on demand, so a 1.2 M-sample folder opens as fast as
a small one. The site points at the folders' images (relative paths): move them together.
The code is in common/report/browse.py and common/assets/browse/.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from common.report import browse
from common.runtime.cli import Data, run, user_errors

console = Console(stderr=True, soft_wrap=True)


def main(
    folders: Annotated[list[Path], typer.Argument(help="Synthetic folders (masksyn.py / imgsyn.py outputs) of one dataset.")],
    out: Annotated[Path, typer.Option(help="Where to write the site (index.html + data/); replaced if browse.py wrote it before.")],
    data: Annotated[Optional[Data], typer.Option(help="The dataset of the folders; default: what their manifests record.")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="The real dataset the samples came from, to show each source's real "
                                                      "image beside its synthetic ones (default: $SEGGEN_DATASETS or ./datasets, if it holds it).")] = None,
    split: Annotated[Optional[str], typer.Option(help="The real split the sources are in (train or val); default: both.")] = None,
    chunk: Annotated[int, typer.Option(min=1, help="Positions per sort-order / source file, the unit the page loads on demand "
                                                   "(records come 50 a file).")] = browse.CHUNK,
    page: Annotated[int, typer.Option(min=1, help="Cards per page (the URL's &size= overrides it).")] = browse.PAGE,
):
    """Write a static site to browse synthetic folders: sort by any figure, filter by class, source, rejection rule."""
    start = time.perf_counter()
    with user_errors(console):
        summary = browse.build(folders, out, data=data.value if data else None, data_root=data_root, split=split, chunk=chunk, page=page,
                               progress=lambda n: console.print(f"{n} samples read", highlight=False))
    real = f"real images from {summary['real']}" if summary["real"] else "no real images (give --data-root)"
    console.print(f"{summary['samples']} samples, {summary['rejected']} rejected masks, {summary['classes']} classes, "
                  f"figures: {', '.join(summary['figures']) or 'none (run quality.py for alignment figures)'}; {real}; "
                  f"{time.perf_counter() - start:.1f} s")
    print(Path(summary["out"]).resolve() / "index.html", file=sys.stdout)


if __name__ == "__main__":
    run(main, console, hint="rerun the same command: the site is written anew")
