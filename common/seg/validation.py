"""train_seg.py's periodic validation (paper A.6, Fig. 11: training loss and validation mIoU along the run):
every --eval-every steps (and at each phase's end) the model is evaluated at a single scale on the
validation split, or on a fixed subset of it (--eval-samples K: K images evenly spaced over the split, the
same at every evaluation). Each evaluation

- appends a line to RUN/metrics_history.jsonl: phase, step, global_step, loss, lr, the task's figures
  (mIoU; PQ, mIoU, AP for panoptic; AP for instance), images, seconds;
- goes to the trackers (--report-to: TensorBoard through accelerate, or any tracker accelerate knows) as
  val/mIoU, val/PQ, val/AP;
- keeps the best model so far (mIoU, PQ or AP: the task's headline, as Mask2Former's tables rank) in
  RUN/model-best/ beside the last (RUN/model/), with best.json saying which step it is.

A resumed run drops the history lines past the step it resumes from (they are measured again) and keeps
the best model it had.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from common.data.datasets import Sample
from common.runtime import record
from common.seg.model import evaluate, instances_file, save_model

HISTORY = "metrics_history.jsonl"
BEST = "model-best"
HEADLINE = {"semantic": "mIoU", "panoptic": "PQ", "instance": "AP"}  # what "best" ranks by


def figures(scores: dict) -> dict[str, float]:
    """The flat figures of an evaluation (model.evaluate's dict): mIoU, PQ, AP where measured."""
    out = {}
    if "mIoU" in scores:
        out["mIoU"] = float(scores["mIoU"])
    if "panoptic" in scores:
        out["PQ"] = float(scores["panoptic"]["PQ"])
    if "instance" in scores:
        out["AP"] = float(scores["instance"]["AP"])
    return out


def fixed_subset(samples: list[Sample], k: int | None) -> list[Sample]:
    """K samples evenly spaced over the split (all of them when k is None or at least their number)."""
    if k is None or k >= len(samples):
        return list(samples)
    return [samples[i] for i in np.linspace(0, len(samples) - 1, k).round().astype(int)]


class Validator:
    """The periodic evaluations of one run: `due` says when, `run` measures, logs and keeps the best."""

    def __init__(self, a, accelerator, val: list[Sample], processor, output_dir: Path):
        self.a, self.accelerator, self.processor, self.output_dir = a, accelerator, processor, Path(output_dir)
        self.samples = fixed_subset(val, a.eval_samples)
        self.every, self.metric = a.eval_every, HEADLINE[a.task]
        self.instances = instances_file(a.data_root) if a.task == "instance" else None
        self.best = self._read_best()

    def _read_best(self) -> dict | None:
        final, old = self.output_dir / BEST, self.output_dir / f".partial-old-{BEST}"
        if self.accelerator.is_main_process and not final.exists() and (old / "best.json").is_file():
            os.replace(old, final)  # killed between _save_best's two renames: the previous best comes back
        self.accelerator.wait_for_everyone()
        path = final / "best.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def resume(self, global_step: int) -> None:
        """A run resumed at `global_step`: the history lines after it are dropped (they will be measured again)."""
        if not self.accelerator.is_main_process:
            return
        record.trim_jsonl(self.output_dir / HISTORY, lambda r: r.get("global_step", 0) <= global_step)
        if self.best is not None and self.best["global_step"] > global_step:
            self.best = None  # measured after the checkpoint: the rerun measures it again

    def due(self, done: int, steps: int) -> bool:
        return self.every > 0 and (done % self.every == 0 or done == steps)

    def run(self, model, phase: str, done: int, global_step: int, loss: float | None, lr: float) -> dict:
        """Evaluate `model` (a collective: every process calls it), then log the record and keep the best."""
        acc, a = self.accelerator, self.a
        t0 = time.perf_counter()
        scores = evaluate(model, self.samples, a.data, a.eval_size, self.processor.image_mean, self.processor.image_std, acc,
                          False, task=a.task, instances=self.instances)
        rec = {"phase": phase, "step": done, "global_step": global_step, "loss": loss, "lr": lr, **figures(scores),
               "images": len(self.samples), "seconds": round(time.perf_counter() - t0, 2)}
        acc.log({f"val/{k}": rec[k] for k in ("mIoU", "PQ", "AP") if k in rec}, step=global_step)
        if acc.is_main_process:
            with open(self.output_dir / HISTORY, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.best is None or rec[self.metric] > self.best[self.metric]:
                self.best = {**rec, "metric": self.metric}
                self._save_best(acc.unwrap_model(model))
        acc.wait_for_everyone()
        return rec

    def _save_best(self, net) -> None:
        """model-best/ replaced whole: written beside it, the old one renamed away, the new one renamed in (a kill
        leaves the old or the new one complete; _read_best puts the old one back where the kill fell in between)."""
        final, tmp = self.output_dir / BEST, self.output_dir / f".partial-{BEST}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(net, self.processor, tmp)
        (tmp / "best.json").write_text(json.dumps(self.best, indent=1))
        if final.exists():
            old = self.output_dir / f".partial-old-{BEST}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
