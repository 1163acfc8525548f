"""Crash-safe checkpoints (common/runtime/checkpoint.py): a real tiny run killed inside its checkpoint save, at a
chosen point, resumes with --resume latest from the newest complete checkpoint and ends with the weights
of an uninterrupted run."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ADE_ROOT, ROOT, invoke, trainer_args
from safetensors.torch import load_file

import train_seg
import train_text2mask
from common.runtime import checkpoint

# Runs a stage script in a child process with one function wrapped so that its Nth call ends the process
# with os._exit (as a kill -9 would: no cleanup, no flush) before or after the original runs.
KILLER = """
import os, runpy, sys
module, attr, nth, when = os.environ["KILL_AT"].split(":")
import importlib
owner = importlib.import_module(module)
original, calls = getattr(owner, attr), [0]
def killed(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(nth) and when == "before":
        os._exit(9)
    out = original(*args, **kwargs)
    if calls[0] == int(nth) and when == "after":
        os._exit(9)
    return out
setattr(owner, attr, killed)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# Where the second save (step 4; the limit keeps 1) dies:
POINTS = {
    # inside accelerate's save_state: the UNet is written, the optimizer / scheduler / RNG state are not
    "mid-state": "accelerate.accelerator:save_accelerator_state:2:before",
    # every file written and fsync'ed, the folder not yet renamed to checkpoint-4
    "before-rename": "common.runtime.checkpoint:fsync_tree:2:after",
    # checkpoint-4 complete; checkpoint-2 renamed away and being deleted
    "mid-delete": "shutil:rmtree:1:before",
}


def killed_run(script, args, point, cwd):
    env = {**os.environ, "KILL_AT": POINTS[point], "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(ROOT / script), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-3000:]  # it died where it was told to, not earlier or later


def unet_weights(folder):
    return load_file(str(next((folder / "unet").glob("*.safetensors"))))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_models):
    tmp = tmp_path_factory.mktemp("whole")
    args = trainer_args(tmp, tiny_models("sdxl"), tmp / "run", **{"--max-steps": 4, "--lr": 1e-3})
    assert invoke(train_text2mask.app, args).exit_code == 0
    return unet_weights(tmp / "run")


@pytest.mark.parametrize("point", list(POINTS))
def test_trainer_killed_inside_a_checkpoint_save_resumes_to_the_same_weights(point, tmp_path, tiny_models, uninterrupted):
    out = tmp_path / "run"
    save = {"--max-steps": 4, "--lr": 1e-3, "--checkpointing-steps": 2, "--checkpoints-total-limit": 1}
    killed_run("train_text2mask.py", trainer_args(tmp_path, tiny_models("sdxl"), out, **save), point, tmp_path)
    left = sorted(p.name for p in out.iterdir() if "checkpoint-" in p.name)
    complete, incomplete = checkpoint.scan(out, "checkpoint-*")
    # The last complete checkpoint survives the kill: never a half-written checkpoint-N.
    assert [p.name for p in complete] == (["checkpoint-4"] if point == "mid-delete" else ["checkpoint-2"]), left
    assert incomplete and all(p.name.startswith(".partial-") for p in incomplete), left

    result = invoke(train_text2mask.app, trainer_args(tmp_path, tiny_models("sdxl"), out, **save, **{"--resume": "latest"}))
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "skipped 1 incomplete checkpoint folder(s)" in said and incomplete[0].name in said
    assert f"resumed from {complete[-1]}" in said
    resumed = unet_weights(out)
    assert max((resumed[k] - uninterrupted[k]).abs().max().item() for k in resumed) < 1e-6


def test_train_seg_killed_inside_a_checkpoint_save_resumes_from_the_last_complete_one(tmp_path, tiny_models):
    args = ["--data-root", ADE_ROOT, "--strategy", "real", "--max-steps", "4", "--eval-size", "32", "--model",
            tiny_models("mask2former"), "--batch-size", "2", "--crop", "64", "--num-workers", "0", "--log-every", "2",
            "--checkpoint-every", "2", "--keep-checkpoints", "1", "--output-dir", tmp_path / "run"]
    args = [str(a) for a in args]
    killed_run("train_seg.py", args, "mid-state", tmp_path)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [".partial-phase0-step0000004", "phase0-step0000002"]
    assert json.loads((ckpts / "phase0-step0000002" / "state.json").read_text())["step"] == 2

    result = invoke(train_seg.app, [*args, "--resume", "latest"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "skipped 1 incomplete checkpoint folder(s)" in said and "resuming from" in said and "step 2)" in said
    assert sorted(p.name for p in ckpts.iterdir()) == ["phase0-step0000004"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["drawn"] == {"real": 8}


def test_scan_orders_by_the_marker_and_takes_train_segs_older_state_files(tmp_path):
    """Complete checkpoints sort by what they hold (phase, step), not by name; a train_seg checkpoint
    written before the crash-safe save (state.json without "order") still counts; a folder without its
    marker, or under the .partial- name, does not."""
    for name, state in [("phase1-step0000002", {"phase": 1, "step": 2}), ("phase0-step0000009", {"phase": 0, "step": 9, "order": [0, 9]})]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.json").write_text(json.dumps(state))
    (tmp_path / "phase1-step0000004").mkdir()  # cut before its state.json
    (tmp_path / ".partial-phase1-step0000006").mkdir()
    complete, incomplete = checkpoint.scan(tmp_path, "phase*-step*", "state.json")
    assert [p.name for p in complete] == ["phase0-step0000009", "phase1-step0000002"]
    assert [p.name for p in incomplete] == [".partial-phase1-step0000006", "phase1-step0000004"]
    said = []
    assert checkpoint.latest(tmp_path, "phase*-step*", "state.json", said.append).name == "phase1-step0000002"
    assert "phase1-step0000004" in said[0] and ".partial-phase1-step0000006" in said[0]
