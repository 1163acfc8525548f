"""One results table of reproduce.sh's experiments: mean ± std over the seeds of each segmentation run
(ADE20K's run-to-run spread is about the size of the gains the paper reports, so one seed says little).

    python -m common.report.seeds WORK/runs/table1 [WORK/runs/fig7 ...] --out WORK/results.md

Each argument is an experiment folder (WORK/runs/NAME) holding one folder per run; `reproduce.sh --seeds N`
names them RUN-s0 .. RUN-s{N-1} (RUN alone for one seed). Every run's metrics.json gives the paper's
figures in %: mIoU single- and multi-scale (Table 1), PQ (Table 2), AP (Table 3). The table shows the mean
and the sample standard deviation (n - 1) over the seeds found; a run that has not finished (no
metrics.json) is listed below the table. Also writes the same as JSON beside it (--out with .json).
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Annotated

import typer

from common import SegGenError
from common.runtime.cli import user_errors
from common.runtime.progress import console

SEED = re.compile(r"^(?P<run>.+)-s(?P<seed>\d+)$")
COLUMNS = {  # column -> where metrics.json holds it (train_seg.py: single_scale / multi_scale, as fractions)
    "mIoU s.s.": ("single_scale", "mIoU"),
    "mIoU m.s.": ("multi_scale", "mIoU"),
    "PQ": ("single_scale", "panoptic", "PQ"),
    "AP": ("single_scale", "instance", "AP"),
}


def split_seed(name: str) -> tuple[str, int | None]:
    """A run folder's name -> (run, seed): RUN-s3 -> (RUN, 3); a name without the suffix is seed None."""
    m = SEED.match(name)
    return (m["run"], int(m["seed"])) if m else (name, None)


def figures(metrics: dict) -> dict[str, float]:
    """The COLUMNS a metrics.json holds, in %."""
    out = {}
    for column, path in COLUMNS.items():
        value = metrics
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            out[column] = 100 * float(value)
    return out


def collect(experiment: Path) -> tuple[dict[str, dict], list[str]]:
    """{run: {"seeds": [...], column: [values]}} of one experiment folder, and its unfinished run folders."""
    runs: dict[str, dict] = {}
    unfinished = []
    for folder in sorted(p for p in Path(experiment).iterdir() if p.is_dir()):
        run, seed = split_seed(folder.name)
        path = folder / "metrics.json"
        if not path.is_file():
            unfinished.append(folder.name)
            continue
        entry = runs.setdefault(run, {"seeds": []})
        entry["seeds"].append(seed if seed is not None else 0)
        for column, value in figures(json.loads(path.read_text())).items():
            entry.setdefault(column, []).append(value)
    return runs, unfinished


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def summarise(experiments: list[Path]) -> tuple[str, dict]:
    """(the markdown table, the same as a dict) of the experiment folders."""
    lines = ["| experiment | run | seeds | " + " | ".join(COLUMNS) + " |", "| --- | --- | --- |" + " --- |" * len(COLUMNS)]
    data, notes = {}, []
    for experiment in experiments:
        if not Path(experiment).is_dir():
            raise SegGenError(f"{experiment}: no such experiment folder (reproduce.sh --experiment NAME writes WORK/runs/NAME)")
        runs, unfinished = collect(Path(experiment))
        name = Path(experiment).name
        data[name] = {run: {"seeds": sorted(e["seeds"]), **{c: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else None,
                                                                "values": v} for c, v in e.items() if c != "seeds"}}
                      for run, e in runs.items()}
        for run, entry in runs.items():
            cells = [mean_std(entry[c]) if c in entry else "—" for c in COLUMNS]
            lines.append(f"| {name} | {run} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
        if unfinished:
            notes.append(f"- {name}: no metrics.json yet in {', '.join(unfinished)}")
    text = ("Mean ± sample standard deviation over the seeds, in % (train_seg.py's metrics.json of each run).\n\n"
            + "\n".join(lines) + "\n" + ("\nNot finished:\n" + "\n".join(notes) + "\n" if notes else ""))
    return text, data


def main(
    experiments: Annotated[list[Path], typer.Argument(help="Experiment folders (WORK/runs/NAME), each holding its runs' folders.")],
    out: Annotated[Path, typer.Option(help="The markdown table to write (and the same as .json beside it).")],
):
    """Mean ± std over seeds of every run of the given experiments, as one table."""
    with user_errors(console):
        text, data = summarise(experiments)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(data, indent=1))
        console.print(f"results: {out}")


if __name__ == "__main__":
    typer.run(main)
