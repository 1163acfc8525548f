"""The command-line options every generation stage shares for running as independent scheduler tasks
(caption.py, masksyn.py, imgsyn.py, quality.py; common/runtime/shard.py, docs/many-machines.md)."""

from __future__ import annotations

from typing import Annotated

import typer

ShardOpt = Annotated[str | None, typer.Option(
    "--shard", metavar="I/N",
    help="Do task I's share of N independent tasks (0 <= I < N) and write its own manifest beside the others in one "
         "folder; no task waits for another, N may change between runs, and ids written by any task are skipped. Default: "
         "from the scheduler, SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT of a job array, else RANK / WORLD_SIZE of "
         "torchrun or accelerate launch, else 0/1 (all the work).", rich_help_panel="Tasks")]

FinalizeOpt = Annotated[bool | None, typer.Option(
    "--finalize/--no-finalize",
    help="At the end, write what needs the whole folder (its index, a COCO folder's panoptic JSON, MaskSyn's tally.json; "
         "python -m common.synthesis.finalize). Default: when this is the only task; with several, run finalize once all "
         "have ended (readers such as train_seg run it by themselves when it is missing or stale).",
    show_default="when the only task", rich_help_panel="Tasks")]
