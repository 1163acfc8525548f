"""The segmenter's learning curve on the toy world (issue 24: has real-only plateaued at the small N?).

    python bench/toy_curve.py RUN [RUN...]

RUN is a train_seg run on the toy world kept with `--checkpoint-every K --keep-checkpoints 0`; every
RUN/checkpoints/phase*-step* is scored on the toy val split (`train_seg.py --eval-only`, metrics in
RUN/curve/step{N}.json) and RUN/curve.md lists mIoU and its stuff / thing means per step. The points are
checkpoints of one run on one poly schedule (the learning rate has not decayed to 0 at an early
checkpoint), not separate runs of that length.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.report.toy import stuff_thing  # noqa: E402


def score(run: Path, ckpt: Path) -> dict:
    """mIoU and stuff / thing means (%) of one checkpoint, evaluated once and cached in RUN/curve/."""
    step = int(ckpt.name.rsplit("step", 1)[1])
    out = run / "curve" / f"step{step}.json"
    if not out.is_file():
        opts = json.loads((run / "options.json").read_text())
        cmd = [sys.executable, "train_seg.py", "--data", "toy", "--data-root", str(opts["data_root"]), "--eval-only",
               "--checkpoint", str(ckpt), "--backbone", "hrnet-small", "--num-workers", "0",
               "--metrics-file", str(out), "--output-dir", str(run / "curve")]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    single = json.loads(out.read_text())["single_scale"]
    return {"step": step, "miou": round(100 * single["mIoU"], 2), **stuff_thing(single["per_class_iou"])}


def main(runs: list[Path]) -> None:
    for run in runs:
        points = [score(run, c) for c in sorted((run / "checkpoints").glob("phase*-step*"))]
        lines = [f"# {run.name}: mIoU % on the toy val split by step (bench/toy_curve.py)", "",
                 "| step | mIoU | stuff | things |", "| --- | --- | --- | --- |"]
        lines += [f"| {p['step']} | {p['miou']:.2f} | {p['stuff']:.2f} | {p['thing']:.2f} |" for p in points]
        (run / "curve.md").write_text("\n".join(lines) + "\n")
        (run / "curve.json").write_text(json.dumps(points, indent=1) + "\n")
        print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main([Path(a) for a in sys.argv[1:]])
