"""reproduce.sh: the paper's settings in --dry-run, and the tiny chain killed mid-way then resumed."""

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import ROOT
from PIL import Image

from common.datasets import read_synthetic
from common.manifest import CAPTION_FIELDS, read_manifest

SCRIPT = str(ROOT / "reproduce.sh")


def run(*args, **kw):
    return subprocess.run([SCRIPT, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120, **kw)


def test_paper_preset_dry_run_prints_the_paper_settings():
    before = sorted(ROOT.iterdir())
    r = run("--preset", "paper", "--data-root", "/data", "--gpus", "8", "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = {next(t for t in line.split() if t.endswith(".py")): line for line in r.stdout.splitlines()[1:]}
    assert set(lines) == {"caption.py", "train_text2mask.py", "train_mask2img.py", "masksyn.py", "imgsyn.py", "train_seg.py"}
    assert all("--num_processes 8" in line for line in lines.values())
    assert "--model Salesforce/blip2-flan-t5-xxl" in lines["caption.py"]
    for trainer in ("train_text2mask.py", "train_mask2img.py"):  # appendix A.4
        for setting in ("--pretrained stabilityai/stable-diffusion-xl-base-1.0", "--resolution 768", "--max-steps 30000", "--lr 1e-5"):
            assert setting in lines[trainer]
    assert "--per-sample 10 --text2mask-steps 200 --mask2img-steps 40" in lines["masksyn.py"]  # §4.1, A.4
    assert "--per-sample 50 --steps 40" in lines["imgsyn.py"]
    seg = [line for line in r.stdout.splitlines() if "train_seg.py" in line]
    assert "--strategy real" in seg[0] and "--strategy aug --p-aug 0.6" in seg[1]  # §3.4
    assert all("--backbone r50 --max-steps 160000 --batch-size 16 --crop 512" in line for line in seg)  # A.3, Table 1
    assert sorted(ROOT.iterdir()) == before  # a dry run writes nothing (whatever the checkout already held)


def test_coco_uses_imgsyn_only_and_pretrain_then_finetune():
    r = run("--preset", "paper", "--data", "coco", "--data-root", "/data", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "masksyn.py" not in r.stdout  # instances cannot be read back from colour maps (§4.1)
    assert "imgsyn.py" in r.stdout and "--per-sample 10 --steps 40" in r.stdout
    assert "--strategy pretrain" in r.stdout


def test_bad_options_are_named():
    r = run("--preset", "huge")
    assert r.returncode == 2 and "--preset must be paper, toy or tiny (got huge)" in r.stderr
    r = run("--preset", "toy", "--size", "huge", "--dry-run")
    assert r.returncode == 2 and "--size must be full, demo or smoke (got huge)" in r.stderr
    r = run("--gpus", "zero", "--dry-run")
    assert r.returncode == 2 and "--gpus must be a positive integer" in r.stderr
    r = run("--frobnicate")
    assert r.returncode == 2 and "unknown option --frobnicate" in r.stderr


def test_tiny_chain_killed_midway_resumes_and_validates(tmp_path):
    work = tmp_path / "demo"
    env = {**os.environ, "PYTHON": str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else "python3"}
    args = [SCRIPT, "--preset", "tiny", "--work", str(work), "--max-steps", "4"]
    first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    while not (work / ".done" / "masksyn").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert (work / ".done" / "masksyn").exists(), "the first run did not reach masksyn"
    os.killpg(first.pid, signal.SIGKILL)  # killed in the middle of a later stage
    first.wait()
    finished_before = {p.name for p in (work / ".done").iterdir()}
    assert {"caption", "train-text2mask", "train-mask2img", "masksyn"} <= finished_before

    second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for stage in finished_before:
        assert f"== {stage}: done before, skipped" in second.stdout
    # Every stage's output exists and validates.
    caps = read_manifest(work / "captions/ade20k_train.jsonl", CAPTION_FIELDS, path_fields=("image",))
    assert [c["id"] for c in caps] == ["ADE_train_00000001"] and caps[0]["caption"].startswith("ceiling, wall")
    assert (work / "runs/text2mask-ade20k/model_index.json").is_file()
    assert (work / "runs/text2mask-ade20k/palette.json").is_file()
    assert json.loads((work / "runs/mask2img-ade20k/seggen.json").read_text())["base"]
    for method in ("masksyn", "imgsyn"):
        samples = read_synthetic(work / f"synth/{method}-ade20k")
        assert len(samples) == 2 and all(s.image.is_file() and s.annotation.is_file() for s in samples)
    for strategy in ("real", "aug"):
        scores = json.loads((work / f"runs/seg-ade20k-{strategy}/metrics.json").read_text())["single_scale"]
        assert 0.0 <= scores["mIoU"] <= 1.0 and 0.0 <= scores["pixel_accuracy"] <= 1.0
    report = (work / "report.md").read_text()
    assert "tiny and randomly initialised" in report and "| seg-aug |" in report and "| mIoU (%) |" in report
    assert Image.open(work / "contact_sheet.png").size[0] > 0


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_the_options(flag):
    r = run(flag)
    assert r.returncode == 0 and "--preset {paper,toy,tiny}" in r.stdout and "--dry-run" in r.stdout


def test_help_prints_the_header_not_the_script():
    r = run("--help")
    assert r.returncode == 0 and "--preset" in r.stdout
    assert "set -euo" not in r.stdout and "cd " not in r.stdout


def test_toy_preset_dry_run_prints_the_chain_and_table4():
    before = sorted(ROOT.iterdir())
    r = run("--preset", "toy", "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()[1:]
    assert "common.toyworld" in lines[0] and "--train 2000 --val 200 --seed 0" in lines[0]
    assert "common.toybase" in lines[1]
    for script in ("train_text2mask.py", "train_mask2img.py"):
        line = next(x for x in lines if script in x)
        assert "--data toy" in line and "--pretrained runs/toy/base" in line and "--resolution 64" in line
    table = [x for x in lines if "runs/table4/" in x]
    assert len(table) == 2 * 4 * 3  # two N x {real, +ImgSyn, +MaskSyn, +both} x three seeds
    assert all("--backbone hrnet-small" in x and "--max-real-samples" in x for x in table)
    assert all("--strategy aug --p-aug 0.6" in x for x in table if "-real-s" not in x)
    assert sum("--synthetic" in x for x in table) == 18
    assert sorted(ROOT.iterdir()) == before


def test_toy_smoke_chain_writes_report_and_results(tmp_path):
    work = tmp_path / "toy"
    env = {**os.environ, "PYTHON": str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else "python3"}
    r = subprocess.run([SCRIPT, "--preset", "toy", "--size", "smoke", "--work", str(work)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    stages = {line.split("\t")[0] for line in (work / "stage_times.tsv").read_text().splitlines()}
    assert {"world", "base", "train-text2mask", "train-mask2img", "masksyn", "imgsyn", "eval-text2mask",
            "eval-text2mask-base", "seg-all", "eval-floor", "eval-alignment"} <= stages
    res = json.loads((work / "results.json").read_text())
    assert set(res["text2mask_off_palette"]) == {"finetuned", "base"}
    assert all(0.0 <= v <= 1.0 for v in res["text2mask_off_palette"].values())
    assert set(res["alignment_miou"]) == {"imgsyn", "ceiling", "floor"}
    assert all(0.0 <= v <= 100.0 for v in res["alignment_miou"].values())
    assert sorted(r["synthetic"] for r in res["table4"]) == ["both", "imgsyn", "masksyn", "real"]
    assert all(set(r) == {"real_samples", "synthetic", "seed", "miou"} and r["real_samples"] == 8 for r in res["table4"])
    report = (work / "report.md").read_text()
    assert "## Text2Mask quality" in report and "+ MaskSyn" in report and "## Mask2Img alignment" in report
    assert Image.open(work / "contact_sheet.png").size[1] >= 6 * 96  # six rows: real, MaskSyn, ImgSyn, two Text2Mask, floor
