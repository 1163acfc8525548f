"""The tables of bench/toy_table4.sh: OUT/table4.md and OUT/table4.json from OUT/n{N}-{ROW}-s{SEED}/metrics.json.

    python bench/toy_table4.py OUT [--title TEXT]

Each row: mIoU and its stuff / thing means (%), mean ± std over the seeds that finished (n = how many), and
every row's gain over real only as a share of + oracle-VAE's (common/report/toy.py `table4_lines`). Also the
wall time of each run (train_seg's metrics.json) and the machine's CPU, for the cost of each knob.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.report.toy import table4, table4_lines  # noqa: E402


def seconds(run: Path) -> float | None:
    """Wall seconds of a train_seg run: from its options.json (written at the start) to its metrics.json."""
    start, end = run / "options.json", run / "metrics.json"
    return round(end.stat().st_mtime - start.stat().st_mtime, 1) if start.is_file() and end.is_file() else None


def main(out: Path, title: str) -> None:
    rows = table4(out, ".")
    for r in rows:
        r["seconds"] = seconds(out / f"n{r['real_samples']}-{r['synthetic']}-s{r['seed']}")
    (out / "table4.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [f"# {title}", *table4_lines(rows, "mIoU % on the toy val split, mean ± std over seeds (n = seeds)")]
    (out / "table4.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__)
    title = args[args.index("--title") + 1] if "--title" in args else "Toy Table 4 (bench/toy_table4.sh)"
    main(Path(args[0]), title)
