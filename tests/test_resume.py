"""Runs on a cluster (common/runtime/cluster.py, common/runtime/record.py; docs/training-on-clusters.md): a global
batch that does not depend on the process count, a resume on another process count that continues the same run,
SIGTERM that saves and exits with PREEMPTED, resumes that cannot change the experiment, records that survive a kill."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import ADE_ROOT, ROOT, invoke, trainer_args
from safetensors.torch import load_file

import train_mask2img
import train_seg
import train_text2mask
from common import SegGenError
from common.diffusion import training
from common.diffusion.training import StepBatches
from common.runtime import record
from common.runtime.cluster import PREEMPTED, check_seg_batch, split_batch


def unet_weights(folder):
    return load_file(str(next((folder / "unet").glob("*.safetensors"))))


def said(result):
    return " ".join(result.output.split())


# ---------------------------------------------------------------- the global batch

def test_the_global_batch_is_split_into_micro_batches_and_accumulation_or_refused():
    assert (split_batch(32, 8, 4).micro, split_batch(32, 8, 4).accumulation) == (4, 1)
    assert (split_batch(32, 1, 4).micro, split_batch(32, 1, 4).accumulation) == (4, 8)  # one GPU: the same 32
    assert (split_batch(12, 1, 5).micro, split_batch(12, 1, 5).accumulation) == (4, 3)  # the largest divisor under the cap
    with pytest.raises(SegGenError, match=r"--global-batch-size 32 cannot be split over 3 processes.*\(e\.g\. 2\)"):
        split_batch(32, 3, 4)
    with pytest.raises(SegGenError, match=r"32 processes for a global batch of 16 images.*--num_processes 16"):
        check_seg_batch(16, 32)


def test_a_step_sees_the_same_samples_on_any_process_count():
    """Optimizer step s takes the stream positions [s·G, (s+1)·G) however G = processes × micro × accumulation."""
    def step_items(world, micro, accumulation, step):
        items = []
        for rank in range(world):
            it = iter(StepBatches(7, micro, 3, rank, world, start=step, accumulation=accumulation))
            for _ in range(accumulation):
                items += next(it)
        return sorted(items, key=lambda x: x[2])

    for step in (0, 1, 5):
        one = step_items(1, 6, 1, step)
        assert [x[2] for x in one] == list(range(6 * step, 6 * step + 6))
        assert step_items(2, 3, 1, step) == one == step_items(3, 1, 2, step) == step_items(1, 2, 3, step)


# ---------------------------------------------------------------- SIGTERM, and a resume on two processes

RUN = {"--max-steps": 4, "--lr": 1e-3, "--lr-warmup-steps": 3}  # a warm-up: the LR differs at every step


def two_process(tmp, base, out, **extra):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train_text2mask.py"),
           *trainer_args(tmp, base, out, **{**RUN, "--batch-size": 1}, **extra)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc):
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def sigterm_at(monkeypatch, step):
    """SIGTERM to this very process right after optimizer step `step` is logged (as a scheduler sends it)."""
    original = training.StepMeter.step

    def step_then_term(self, s, *args):
        original(self, s, *args)
        if s == step:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(training.StepMeter, "step", step_then_term)


def test_sigterm_saves_the_step_and_a_two_process_resume_equals_an_uninterrupted_two_process_run(tmp_path, tiny_models, monkeypatch):
    base, stopped, whole = tiny_models("sdxl"), tmp_path / "stopped", tmp_path / "whole"
    (tmp_path / "w").mkdir()
    # Runs beside the one-process run below; its checkpoints and validation grids change nothing in the training.
    uninterrupted = two_process(tmp_path / "w", base, whole, **{"--checkpointing-steps": 2, "--validation-steps": 2,
                                                                "--validation-inference-steps": 2})

    # One process, micro-batch 1 × 2 accumulation steps, no periodic checkpoint: SIGTERM after step 2.
    sigterm_at(monkeypatch, 2)
    args = trainer_args(tmp_path, base, stopped, **{**RUN, "--batch-size": 1})
    result = invoke(train_text2mask.app, args)
    assert result.exit_code == PREEMPTED, result.output
    assert f"stopped by SIGTERM after step 2; checkpoint {stopped}/checkpoint-2 saved" in said(result)
    assert "--resume latest" in said(result)
    assert sorted(p.name for p in stopped.glob("checkpoint-*")) == ["checkpoint-2"] and not (stopped / "model_index.json").exists()
    assert json.loads((stopped / "checkpoint-2" / "checkpoint.json").read_text())["stage"] == "text2mask"
    monkeypatch.undo()

    # The same run continued on two processes (micro-batch 1 each, no accumulation).
    finished(two_process(tmp_path, base, stopped, **{"--resume": "latest"}))
    finished(uninterrupted)
    leaves_a_pipeline_that_samples(whole, base)
    resumed, reference = unet_weights(stopped), unet_weights(whole)
    diff = max((resumed[k] - reference[k]).abs().max().item() for k in resumed)
    assert diff < 1e-6, diff
    options = json.loads((stopped / "options.json").read_text())
    assert [(h["world_size"], h["step"]) for h in options["history"]] == [(1, 0), (2, 2)]
    assert options["history"][1]["changed"]["world_size"] == [1, 2] and options["global_batch"] == 2
    losses = lambda d: [s["loss"] for s in record.read_jsonl(d / "stats.jsonl") if "loss" in s]  # noqa: E731
    assert losses(stopped) == pytest.approx(losses(whole), abs=1e-6)
    lrs = [s["lr"] for s in record.read_jsonl(stopped / "stats.jsonl")]  # one schedule step per optimizer step, on 1 or 2 processes
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])


def leaves_a_pipeline_that_samples(out, base):
    """A 2-process accelerate run leaves a loadable pipeline: the UNet trained, the rest copied, the options, stats,
    validation grids and diffusers-format checkpoints recorded."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline

    from common.data.paths import resolve_recorded
    from common.masks.colormap import Palette, palette_for

    options = json.loads((out / "options.json").read_text())
    assert options["world_size"] == 2 and options["resolution"] == 64 and options["is_sdxl"]
    stats = record.read_jsonl(out / "stats.jsonl")
    assert [s["step"] for s in stats if "loss" in s] == [1, 2, 3, 4] and all(np.isfinite(s["loss"]) for s in stats if "loss" in s)
    assert all(s["grad_norm"] > 0 for s in stats if "loss" in s)
    validation = [s["validation"] for s in stats if "validation" in s]
    assert len(validation) == 2 and all(0 <= v["off_palette"] <= 1 and (out / v["grid"]).is_file() for v in validation)
    assert (out / "checkpoint-4" / "unet" / "config.json").is_file()  # diffusers-format checkpoints
    assert Palette.load(out / "palette.json").colors.tolist() == palette_for("ade20k").colors.tolist()
    assert resolve_recorded(json.loads((out / "seggen.json").read_text())["base"], out) == str(base)  # recorded relative
    trained, start = unet_weights(out), unet_weights(base)
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # the UNet was trained, the rest copied
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    image = pipe("a street with cars", height=64, width=64, num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


# ---------------------------------------------------------------- resumes that would change the experiment

@pytest.fixture
def checkpointed(tmp_path, tiny_models):
    """A Text2Mask run of 2 steps with checkpoint-2, and the arguments that made it."""
    out = tmp_path / "run"
    args = {"--max-steps": 2, "--checkpointing-steps": 2, "--max-train-samples": 1, "--global-batch-size": 1}
    assert invoke(train_text2mask.app, trainer_args(tmp_path, tiny_models("sdxl"), out, **args)).exit_code == 0
    return out, args


@pytest.mark.parametrize("change,message", [
    ({"--lr": 2e-5}, "--lr: recorded 1e-05, now 2e-05"),
    ({"--global-batch-size": 2}, "--global-batch-size: recorded 1, now 2"),
    ({"--caption-dropout": 0.5, "--seed": 3}, "--caption-dropout: recorded 0.1, now 0.5; --seed: recorded 0, now 3"),
    ({"--max-steps": 1}, "--max-steps 1 is below the step of the checkpoint resumed"),
    ({"--lr-schedule": "linear"}, "--lr-schedule: recorded 'constant_with_warmup', now 'linear'"),
])
def test_a_resume_that_would_change_the_experiment_is_refused(tmp_path, tiny_models, checkpointed, change, message):
    out, args = checkpointed
    before = (out / "options.json").read_text()
    result = invoke(train_text2mask.app, trainer_args(tmp_path, tiny_models("sdxl"), out, **{**args, **change, "--resume": "latest"}))
    assert result.exit_code == 2 and message in said(result), result.output
    if "below" not in message:
        assert f"start a new run in another --output-dir than {out}" in said(result)
    assert (out / "options.json").read_text() == before  # the record is unchanged


def test_a_resume_may_change_how_the_run_is_executed_and_the_record_keeps_it(tmp_path, tiny_models, checkpointed):
    out, args = checkpointed
    with open(out / "stats.jsonl", "a") as f:  # torn by a kill mid-write
        f.write('{"step": 3, "lo')
    more = {**args, "--max-steps": 3, "--checkpointing-steps": 0, "--resume": "latest"}
    result = invoke(train_text2mask.app, trainer_args(tmp_path, tiny_models("sdxl"), out, **more))
    assert result.exit_code == 0, result.output
    options = json.loads((out / "options.json").read_text())
    assert options["max_steps"] == 3 and len(options["history"]) == 2
    assert options["history"][1]["changed"] == {"checkpointing_steps": [2, 0], "max_steps": [2, 3], "resume": [None, "latest"],
                                                "resume_from": [None, str(out / "checkpoint-2")]}
    assert [s["step"] for s in record.read_jsonl(out / "stats.jsonl")] == [1, 2, 3]


def test_another_stages_checkpoint_and_a_broken_record_are_refused(tmp_path, tiny_models, checkpointed):
    out, args = checkpointed
    m2i = trainer_args(tmp_path, tiny_models("sdxl"), tmp_path / "m2i", **{**args, "--resume": str(out / "checkpoint-2")})
    result = invoke(train_mask2img.app, m2i)
    assert result.exit_code == 2 and "a checkpoint of text2mask, not of mask2img" in said(result), result.output

    (out / "checkpoint-2" / "options.json").write_text("")  # the record the checkpoint carries, emptied
    result = invoke(train_text2mask.app, trainer_args(tmp_path, tiny_models("sdxl"), out, **{**args, "--resume": "latest"}))
    assert result.exit_code == 2 and f"{out}/checkpoint-2/options.json is broken (empty or not JSON" in said(result), result.output


def test_read_jsonl_skips_a_torn_last_line_and_names_a_broken_one(tmp_path):
    path = tmp_path / "stats.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert record.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(SegGenError, match=r"stats.jsonl:2 is not a JSON line"):
        record.read_jsonl(path)


# ---------------------------------------------------------------- train_seg

def seg_args(tiny_models, out, *extra):
    return [str(a) for a in ["--data-root", ADE_ROOT, "--strategy", "real", "--max-steps", "4", "--eval-size", "32", "--model",
                             tiny_models("mask2former"), "--batch-size", "2", "--crop", "64", "--num-workers", "0", "--log-every", "1",
                             "--checkpoint-every", "0", "--output-dir", out, *extra]]


def test_train_seg_sigterm_saves_resumes_and_refuses_what_would_change_the_run(tmp_path, tiny_models, monkeypatch):
    from common.seg.loop import Loop

    out, original = tmp_path / "run", Loop.step
    calls = []

    def step_then_term(self, *args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args)

    monkeypatch.setattr(Loop, "step", step_then_term)
    result = invoke(train_seg.app, seg_args(tiny_models, out))
    assert result.exit_code == PREEMPTED, result.output
    assert "stopped by SIGTERM after step 2" in said(result)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["phase0-step0000002"]
    monkeypatch.undo()

    result = invoke(train_seg.app, seg_args(tiny_models, out, "--strategy", "real-pretrain", "--resume", "latest"))
    assert result.exit_code == 2 and "--strategy: recorded 'real', now 'real-pretrain'" in said(result), result.output
    result = invoke(train_seg.app, seg_args(tiny_models, out, "--max-steps", "8"))  # no --resume: refused, nothing replaced
    assert result.exit_code == 2 and "holds checkpoints of an earlier run: pass --resume latest" in said(result), result.output

    result = invoke(train_seg.app, seg_args(tiny_models, out, "--resume", "latest"))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["drawn"] == {"real": 8}  # 4 steps × 2, none lost or repeated
    assert [s["step"] for s in record.read_jsonl(out / "stats.jsonl")] == [1, 2, 3, 4]
    shutil.rmtree(out / "checkpoints")
    result = invoke(train_seg.app, seg_args(tiny_models, out, "--max-steps", "8"))
    assert result.exit_code == 2 and f"--output-dir {out} holds a finished run (model)" in said(result), result.output


def test_reproduce_of_a_line_without_its_batch_is_a_clear_error(tmp_path):
    from common.synthesis import synth

    line = {"id": "s_000", "source_id": "s", "method": "imgsyn", "image": "images/s_000.jpg", "annotation": "a/s_000.png",
            "colormap": None, "caption": "a room", "seed": 1, "models": {}, "settings": {}, "k": 0}
    (tmp_path / "manifest.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(SegGenError, match=r"--reproduce s_000: its manifest line .*manifest.jsonl:1 has no usable batch"):
        synth.find_record(tmp_path, "s_000")


def test_train_seg_refuses_a_resume_on_another_process_count_naming_both(tmp_path):
    """train_seg's per-process draws depend on the process count: its record keeps it fixed."""
    ckpt = tmp_path / "run" / "checkpoints" / "phase0-step0000002"
    ckpt.mkdir(parents=True)
    options = {"lr": 1e-4, "world_size": 1, "log_every": 50}
    record.write_json(ckpt / "options.json", options)
    record.start(tmp_path / "run", {**options, "log_every": 10}, resumed=ckpt, run_dir=tmp_path / "run", step=2,
                 free=record.SEG_FREE, main=False)  # logging may change
    with pytest.raises(SegGenError, match=r"the process count: recorded 1, now 2\. .*launch 1 processes \(now 2\)"):
        record.start(tmp_path / "run", {**options, "world_size": 2}, resumed=ckpt, run_dir=tmp_path / "run", step=2,
                     free=record.SEG_FREE, main=False)


def test_reproduce_sh_gives_the_trainers_one_global_batch_on_any_gpu_count_and_launches_them_over_nodes():
    def trainer_lines(*extra):
        r = subprocess.run([str(ROOT / "reproduce.sh"), "--preset", "paper", "--data-root", "/data", "--dry-run", *extra],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return [line for line in r.stdout.splitlines() if "train_text2mask.py" in line or "train_mask2img.py" in line]

    for gpus in ("1", "8", "64"):
        lines = trainer_lines("--gpus", gpus)
        assert len(lines) == 2 and all("--global-batch-size 32 --batch-size 4" in line for line in lines)
    lines = trainer_lines("--gpus", "8", "--nodes", "4", "--node-rank", "2", "--main-ip", "10.0.0.1")
    assert all("--num_processes 32 --num_machines 4 --machine_rank 2 --main_process_ip 10.0.0.1 --main_process_port 29500"
               in line for line in lines)
    r = subprocess.run([str(ROOT / "reproduce.sh"), "--nodes", "2", "--dry-run"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "--nodes 2 needs --main-ip" in r.stderr
