"""reproduce.sh: the paper's settings in --dry-run, and the tiny chain killed mid-way then resumed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from PIL import Image

from common.data.datasets import read_synthetic
from common.data.manifest import CAPTION_FIELDS, read_manifest

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


def test_coco_masksyn_is_an_option_beyond_the_paper():
    r = run("--preset", "paper", "--data", "coco", "--data-root", "/data", "--dry-run", "--coco-masksyn")
    assert r.returncode == 0, r.stderr
    masksyn = [line for line in r.stdout.splitlines() if "masksyn.py" in line]
    assert len(masksyn) == 1 and "--data coco" in masksyn[0] and "--per-sample 10" in masksyn[0]
    seg = [line for line in r.stdout.splitlines() if "train_seg.py" in line and "--strategy pretrain" in line]
    assert seg and "--synthetic" in seg[0] and "masksyn-coco" in seg[0] and "imgsyn-coco" in seg[0]


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
    env = {**os.environ, "PYTHON": sys.executable}  # the interpreter running the tests, whatever virtualenv it is
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


def test_a_work_folder_holding_another_datasets_chain_is_refused(tmp_path):
    # The chain's stage markers (WORK/.done/caption, ...) carry no dataset: --data coco must not skip ADE20K's stages.
    work = tmp_path / "w"
    (work / ".done").mkdir(parents=True)
    (work / ".done/caption").touch()
    (work / ".data").write_text("ade20k\n")
    r = run("--preset", "tiny", "--data", "coco", "--work", work)
    assert r.returncode == 2 and f"--work {work} already holds the --data ade20k chain" in r.stderr
    assert "give --data coco its own --work" in r.stderr and "== caption" not in r.stdout
    assert (work / ".data").read_text() == "ade20k\n"


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
    assert "common.toy.world" in lines[0] and "--train 2000 --val 200 --seed 0" in lines[0]
    assert not any("common.toy.base" in x for x in lines)  # the shipped base, not a build
    for script in ("train_text2mask.py", "train_mask2img.py"):
        line = next(x for x in lines if script in x)
        assert "--data toy" in line and "--pretrained common/assets/toybase" in line and "--resolution 64" in line
    rebuilt = run("--preset", "toy", "--dry-run", "--build-base").stdout.splitlines()[1:]
    assert "common.toy.base runs/toy/base --world runs/toy/world" in rebuilt[1]
    assert all("--pretrained runs/toy/base" in x for x in rebuilt if "train_text2mask.py" in x or "train_mask2img.py" in x)
    table = [x for x in lines if "runs/table4/" in x]
    assert len(table) == 2 * 6 * 3  # two N x {real, +ImgSyn, +MaskSyn, +both, +oracle-real, +oracle-VAE} x three seeds
    assert all("--backbone hrnet-small" in x and "--max-real-samples" in x for x in table)
    assert all("--strategy aug --p-aug 0.6" in x for x in table if "-real-s" not in x or "oracle-real" in x)
    assert sum("--synthetic" in x for x in table) == 30
    assert sum("runs/toy/synth/oracle-vae-toy" in x for x in table) == 6  # issue 24: a perfect generator behind the VAE
    assert any("bench/toy.py oracle --world runs/toy/world --limit 200 --vae common/assets/toybase" in x for x in lines)
    assert sorted(ROOT.iterdir()) == before


def test_toy_base_of_ones_own_reaches_every_stage_and_bad_ones_are_named(tmp_path):
    """--base DIR (e.g. a base built with a sharper VAE, docs/toy-results.md): the trainers, the floor and the
    oracle read it instead of the shipped one; a folder that is no pipeline, a paper run, or --base with
    --build-base is refused with the flag named."""
    base = tmp_path / "mybase"
    base.mkdir()
    (base / "model_index.json").write_text("{}")
    lines = run("--preset", "toy", "--dry-run", "--base", str(base)).stdout.splitlines()[1:]
    users = [x for x in lines if any(k in x for k in ("train_text2mask.py", "train_mask2img.py", " floor ", " oracle "))]
    assert len(users) == 4 and all(str(base) in x for x in users)
    assert not any("common/assets/toybase" in x for x in lines)
    for args, message in [(("--preset", "toy", "--base", str(tmp_path)), "is not a pipeline folder (no model_index.json)"),
                          (("--preset", "paper", "--base", str(base)), "--base is for --preset toy"),
                          (("--preset", "toy", "--base", str(base), "--build-base"), "--base and --build-base exclude each other")]:
        r = run(*args, "--dry-run")
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)


def test_toy_smoke_chain_writes_report_and_results(tmp_path):
    work = tmp_path / "toy"
    env = {**os.environ, "PYTHON": sys.executable}  # the interpreter running the tests, whatever virtualenv it is
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
    assert 0.0 <= res["alignment_vae_ceiling"] <= 100.0  # the segmenter on val images through the base's VAE
    assert sorted(r["synthetic"] for r in res["table4"]) == ["both", "imgsyn", "masksyn", "oracle-real", "oracle-vae", "real"]
    assert all(set(r) == {"real_samples", "synthetic", "seed", "miou", "stuff", "thing"} and r["real_samples"] == 8 for r in res["table4"])
    assert set(res["alignment_stuff"]) == set(res["alignment_thing"]) == {"imgsyn", "ceiling", "floor", "vae_ceiling"}
    built = json.loads((work / "base/toybase.json").read_text())  # smoke builds its base: the report reads that one
    assert res["base_vae"]["vae_colormaps_val"] == built["vae_colormaps_val"]
    report = (work / "report.md").read_text()
    assert "## Text2Mask quality" in report and "+ MaskSyn" in report and "## Mask2Img alignment" in report
    assert "through the base's VAE and back" in report and "+ oracle-VAE" in report and "| images | stuff | things |" in report
    assert Image.open(work / "contact_sheet.png").size[1] >= 6 * 96  # six rows: real, MaskSyn, ImgSyn, two Text2Mask, floor


# ---------------------------------------------------------------- --experiment NAME: the paper's tables and figures

ADE_TRAIN = 20_210  # ADE20K training images (§4.1, Table 4)
R50_ADE, HRNET, COCO_50EP, COCO_100EP = 160_000, 100_000, 368_750, 737_500  # A.3 / Tables 1–4: 160k; 100k; 50 and 100 epochs at batch 16


def run_row(data="ade20k", backbone="r50", task="semantic", strategy="real", p_aug=None, synthetic=(), steps=R50_ADE,
            chain="full", extra=()):
    """One segmentation run as the paper describes it; steps: an int, or (pre-training, fine-tuning)."""
    return (data, backbone, task, strategy, p_aug, tuple(sorted(synthetic)), steps, chain, tuple(sorted(extra)))


def ade_ablation(backbone, steps, chain="full"):  # Table 4 / 9 rows: baseline, + MaskSyn, + ImgSyn, + both at p_aug 60 %
    baseline = run_row(backbone=backbone, steps=steps, chain="full" if chain == "sd15" else chain)  # real data only: no generator
    return [baseline] + [
        run_row(backbone=backbone, steps=steps, chain=chain, strategy="aug", p_aug=0.6, synthetic=s)
        for s in (["masksyn"], ["imgsyn"], ["masksyn", "imgsyn"])]


def coco_pair(task, backbone, epochs):  # Tables 2/3: real e+e epochs against synthetic pre-training + real fine-tuning
    return [run_row("coco", backbone, task, "real-pretrain", steps=(epochs, epochs)),
            run_row("coco", backbone, task, "pretrain", synthetic=["imgsyn"], steps=(epochs, epochs))]


BOTH = ["masksyn", "imgsyn"]
# Fig. 8's ImgSyn counts and Table 8's MaskSyn counts (samples in all), as the paper gives them.
FIG8_IMGSYN = (20_000, 200_000, 600_000, 1_000_000)
TABLE8_MASKSYN = (40_000, 80_000, 160_000, 200_000)

# Transcribed from the paper (§4.1–4.3, A.3, A.6, A.9–A.11).
PAPER = {
    "table1": [run_row(backbone=b, strategy=s, p_aug=p, synthetic=syn, extra=["--multiscale"])
               for b in ("r50", "swin-l") for s, p, syn in (("real", None, []), ("aug", 0.6, BOTH))],
    "table2": coco_pair("panoptic", "r50", COCO_50EP) + coco_pair("panoptic", "swin-l", COCO_100EP),
    "table3": coco_pair("instance", "r50", COCO_50EP) + coco_pair("instance", "swin-l", COCO_100EP),
    "table4": ade_ablation("r50", R50_ADE) + ade_ablation("r50", R50_ADE, "n1000")
              + ade_ablation("hrnet-w48", HRNET) + ade_ablation("hrnet-w48", HRNET, "n1000"),
    "table5": [run_row()] + [run_row(strategy="synthetic", synthetic=s) for s in (["masksyn"], ["imgsyn"], BOTH)],
    "table6": [run_row(strategy="pretrain", synthetic=BOTH, steps=(R50_ADE, R50_ADE)), run_row(strategy="aug", p_aug=0.6, synthetic=BOTH)]
              + [r for task in ("panoptic", "instance") for r in (
                  run_row("coco", "r50", task, "pretrain", synthetic=["imgsyn"], steps=(COCO_50EP, COCO_50EP)),
                  run_row("coco", "r50", task, "aug", p_aug=0.6, synthetic=["imgsyn"], steps=COCO_50EP))],
    "table7": [run_row(strategy=s, p_aug=p, synthetic=syn, extra=e) for e in ([], ["--no-augment"])
               for s, p, syn in (("real", None, []), ("aug", 0.6, BOTH))],
    "fig7": [run_row(strategy="aug", p_aug=p, synthetic=BOTH) for p in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)],
    "fig8": [run_row()] + [run_row(strategy="aug", p_aug=0.6, synthetic=[f"imgsyn:{n}"]) for n in FIG8_IMGSYN],
    "table8": [run_row()] + [run_row(strategy="aug", p_aug=0.6, synthetic=[f"masksyn:{n}"]) for n in TABLE8_MASKSYN],
    # A.6: "20K and 1M" ImgSyn samples at p_aug 60 %, validated along the run (Mask2Former's TEST.EVAL_PERIOD 5000)
    "fig11": [run_row(strategy="aug", p_aug=0.6, synthetic=[f"imgsyn:{n}"], extra=["--eval-every 5000"]) for n in (20_000, 1_000_000)],
    "table9": ade_ablation("r50", R50_ADE, "sd15"),
}


def flags(line: str) -> dict:
    """--flag value pairs after the script of a printed command (repeatable flags as lists, switches as True)."""
    import shlex

    words = shlex.split(line)
    words = words[next(i for i, w in enumerate(words) if w.endswith(".py") or w == "common.data.subset") + 1:]
    out = {}
    for i, w in enumerate(words):
        if w.startswith("--"):
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else True
            out.setdefault(w, []).append(value)
    return {k: v if k == "--synthetic" else v[-1] for k, v in out.items()}  # the last of a repeated flag wins (click)


def as_row(f: dict) -> tuple:
    """A printed train_seg.py command as a run_row; a --synthetic FOLDER:k as 'kind:the paper's count' (k per real sample)."""
    import re

    synthetic, chains = [], set()
    for s in f.get("--synthetic", []):
        m = re.fullmatch(r".*/(masksyn|imgsyn)-(ade20k|coco)(-1000|-sd15)?(?::(\d+))?", s)
        assert m, s
        synthetic.append(m[1] if m[4] is None else f"{m[1]}:{paper_count(int(m[4]) * ADE_TRAIN)}")
        chains.add({None: "full", "-1000": "n1000", "-sd15": "sd15"}[m[3]])
    chain = "n1000" if "--real-subset" in f else (chains.pop() if chains else "full")
    steps = int(f["--max-steps"]) if "--pretrain-steps" not in f else (int(f["--pretrain-steps"]), int(f["--max-steps"]))
    return (f["--data"], f["--backbone"], f["--task"], f["--strategy"], float(f["--p-aug"]) if "--p-aug" in f else None,
            tuple(sorted(synthetic)), steps, chain, tuple(sorted([k for k in ("--multiscale", "--no-augment") if k in f]
                                                               + [f"--eval-every {f['--eval-every']}" for _ in [0] if "--eval-every" in f])))


def paper_count(n: int) -> int:
    """The count of Fig. 8 / Table 8 that n samples are (within 5 %: the paper rounds 50 x 20,210 = 1,010,500 to '1M'), else n."""
    return next((c for c in FIG8_IMGSYN + TABLE8_MASKSYN if abs(n - c) <= 0.05 * c), n)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_experiment_dry_run_matches_the_paper(name):
    before = sorted(ROOT.iterdir())
    r = run("--preset", "paper", "--experiment", name, "--data-root", "/data", "--gpus", "8", "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    seg = [flags(x) for x in lines if "train_seg.py" in x]
    assert sorted(as_row(f) for f in seg) == sorted(PAPER[name])
    assert all(f["--batch-size"] == "16" and f["--data-root"] == "/data" for f in seg)  # A.3: batch 16
    assert len({f["--output-dir"] for f in seg}) == len(seg)  # one run folder each
    assert all("--num_processes 8" in x for x in lines if ".py" in x)
    gen = {s: [flags(x) for x in lines if f" {s} " in x] for s in ("caption.py", "train_text2mask.py", "train_mask2img.py", "masksyn.py", "imgsyn.py")}
    for f in gen["train_text2mask.py"] + gen["train_mask2img.py"]:  # A.4: 30k iterations at lr 1e-5
        assert f["--max-steps"] == "30000" and f["--lr"] == "1e-5"
        sd15 = f["--output-dir"].endswith("-sd15")
        assert (f["--pretrained"], f["--resolution"]) == (("stable-diffusion-v1-5/stable-diffusion-v1-5", "512") if sd15 else
                                                          ("stabilityai/stable-diffusion-xl-base-1.0", "768"))
    for f in gen["imgsyn.py"]:  # §4.1: 50 per ADE20K sample, 10 per COCO sample; A.11: 200K with SD-1.5
        assert f["--per-sample"] == {"ade20k": "50", "coco": "10", "sd15": "10"}["sd15" if f["--out"].endswith("-sd15") else f["--data"]]
    assert all(f["--per-sample"] == "10" and f["--data"] == "ade20k" for f in gen["masksyn.py"])  # §4.1: 10, ADE20K only
    uses = {f["--data"] for f in seg}
    assert {f["--data"] for f in gen["caption.py"]} == uses  # every chain a run needs, and only those
    sd15 = any(f["--output-dir"].endswith("-sd15") for f in gen["train_text2mask.py"])
    assert sd15 == (name == "table9")
    uses_masksyn = any(s.startswith("masksyn") for row in PAPER[name] for s in row[5])
    assert bool(gen["train_text2mask.py"]) == bool(gen["masksyn.py"]) == uses_masksyn  # Text2Mask serves MaskSyn only
    assert sorted(ROOT.iterdir()) == before


def test_table4_uses_one_subset_in_every_stage():
    r = run("--preset", "paper", "--experiment", "table4", "--data-root", "/data", "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    made = [flags(x) for x in lines if "common.data.subset" in x]
    assert len(made) == 1 and made[0]["--n"] == "1000" and made[0]["--data"] == "ade20k"  # Table 4: 1,000 real samples
    subset = made[0]["--out"]
    first = lines.index(next(x for x in lines if "common.data.subset" in x))
    assert first < min(i for i, x in enumerate(lines) if "--real-subset" in x)  # written before its first use
    later = [x for x in lines[first + 1:] if ".py" in x and "-1000" in x]
    stages = {next(w for w in x.split() if w.endswith(".py")) for x in later}
    assert stages == {"caption.py", "train_text2mask.py", "train_mask2img.py", "masksyn.py", "imgsyn.py", "train_seg.py"}
    assert all(flags(x).get("--real-subset") == subset for x in later)
    assert not any("--real-subset" in x for x in lines if "-1000" not in x)  # the full-data runs use every sample


def test_experiment_list_and_bad_names():
    r = run("--preset", "paper", "--experiment", "list")
    assert r.returncode == 0 and "Table 9 (A.11)" in r.stdout and "Fig. 7" in r.stdout
    r = run("--experiment", "table10", "--dry-run")
    assert r.returncode == 2 and "--experiment table10 is none of: table1 table2" in r.stderr
    r = run("--preset", "toy", "--experiment", "table1", "--dry-run")
    assert r.returncode == 2 and "--experiment is for --preset paper (or tiny, its plumbing)" in r.stderr


def test_all_experiments_share_each_chain_and_max_steps_caps_every_run():
    r = run("--preset", "paper", "--experiment", "all", "--data-root", "/data", "--dry-run", "--max-steps", "7")
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if ".py" in x]
    generation = [x for x in lines if "train_seg.py" not in x]
    assert len(generation) == len(set(generation))  # a chain that several experiments use is printed (and run) once
    assert sum("caption.py" in x for x in lines) == 3  # ADE20K, COCO, the 1,000-sample subset
    seg = [flags(x) for x in lines if "train_seg.py" in x]
    assert len(seg) == sum(len(v) for v in PAPER.values())
    assert all(f["--max-steps"] == "7" and f.get("--pretrain-steps", "7") == "7" for f in seg)


def test_toy_defaults_bench_names_what_is_missing(tmp_path):
    r = subprocess.run([str(ROOT / "bench/toy_defaults.sh"), str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert f"{tmp_path / 'run'}/world is missing: run ./reproduce.sh --preset toy --work {tmp_path / 'run'} first" in r.stderr
    usage = subprocess.run([str(ROOT / "bench/toy_defaults.sh")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "caption dropout" in usage.stdout and "set -euo" not in usage.stdout


def test_toy_quality_bench_names_what_is_missing(tmp_path):
    r = subprocess.run([str(ROOT / "bench/toy_quality.sh"), str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert f"{tmp_path / 'run'}/world is missing: run ./reproduce.sh --preset toy --work {tmp_path / 'run'} first" in r.stderr
    usage = subprocess.run([str(ROOT / "bench/toy_quality.sh")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "bench/toy_quality.sh RUN [OUT]" in usage.stdout and "set -euo" not in usage.stdout


# ---------------------------------------------------------------- the plain chains: each segmenter's recipe (issue 25 item 1)

# Transcribed from the paper, per (--data, --backbone): (dataset, iterations per phase, crop, task, strategy, m.s.).
# ADE20K (Table 1, A.3): 160k at crop 512 (Swin-L 640), real against SegGen's augmentation, both evaluated
# single- and multi-scale. HRNet-W48 (A.3, Table 4b): 100k; its 520 crop is HRNet's official config (the paper is
# silent). COCO (Tables 2/3): panoptic and instance, real 50+50 epochs against synthetic pre-training + real
# fine-tuning; an epoch is 7,375 iterations at batch 16 (Mask2Former's 50 epochs = 368,750), crop 1024 (LSJ).
EPOCH = 7_375
ADE_PAIR = [("real", None), ("aug", 0.6)]
PLAIN = {
    ("ade20k", "r50"): [("ade20k", 160_000, 512, "semantic", s, True) for s, _ in ADE_PAIR],
    ("ade20k", "swin-l"): [("ade20k", 160_000, 640, "semantic", s, True) for s, _ in ADE_PAIR],
    ("ade20k", "hrnet-w48"): [("ade20k", 100_000, 520, "semantic", s, True) for s, _ in ADE_PAIR],
    ("coco", "r50"): [("coco", (50 * EPOCH, 50 * EPOCH), 1024, t, s, False)
                      for t in ("panoptic", "instance") for s in ("real-pretrain", "pretrain")],
    ("coco", "swin-l"): [("coco", (100 * EPOCH, 100 * EPOCH), 1024, t, s, False)
                         for t in ("panoptic", "instance") for s in ("real-pretrain", "pretrain")],
}


@pytest.mark.parametrize("data,backbone", sorted(PLAIN))
def test_plain_dry_run_follows_the_papers_recipe(data, backbone):
    r = run("--preset", "paper", "--data", data, "--backbone", backbone, "--data-root", "/data", "--gpus", "8", "--dry-run")
    assert r.returncode == 0, r.stderr
    seg = [flags(x) for x in r.stdout.splitlines() if "train_seg.py" in x]
    got = [(f["--data"], int(f["--max-steps"]) if "--pretrain-steps" not in f else (int(f["--pretrain-steps"]), int(f["--max-steps"])),
            int(f["--crop"]), f["--task"], f["--strategy"], "--multiscale" in f) for f in seg]
    assert sorted(got) == sorted(PLAIN[(data, backbone)])
    assert all(f["--backbone"] == backbone and f["--batch-size"] == "16" for f in seg)  # A.3: batch 16
    assert all(f.get("--mixed-precision") == (None if backbone == "hrnet-w48" else "bf16") for f in seg)  # HRNet's recipe in fp32
    synthetic = [f for f in seg if f["--strategy"] != "real-pretrain" and f["--strategy"] != "real"]
    assert all(f["--synthetic"] for f in synthetic) and all("--synthetic" not in f for f in seg if f not in synthetic)
    if data == "ade20k":
        assert all(f["--p-aug"] == "0.6" and len(f["--synthetic"]) == 2 for f in synthetic)  # §4.2: MaskSyn + ImgSyn at 60 %
    else:
        assert all(x.endswith("imgsyn-coco") for f in synthetic for x in f["--synthetic"])  # §4.1: ImgSyn only
        assert "train_text2mask.py" not in r.stdout  # Text2Mask serves MaskSyn, which COCO does not use


def test_coco_trains_text2mask_only_for_its_masksyn():
    r = run("--preset", "paper", "--data", "coco", "--data-root", "/data", "--dry-run", "--coco-masksyn")
    assert r.returncode == 0, r.stderr
    assert sum("train_text2mask.py" in x for x in r.stdout.splitlines()) == 1


def test_paper_preset_uses_adamw_and_8bit_adam_only_when_asked():
    plain = run("--preset", "paper", "--data-root", "/data", "--dry-run").stdout
    small = run("--preset", "paper", "--data-root", "/data", "--dry-run", "--use-8bit-adam").stdout
    for trainer in ("train_text2mask.py", "train_mask2img.py"):  # A.4: "AdamW optimizer is employed"
        assert "--use-8bit-adam" not in next(x for x in plain.splitlines() if trainer in x)
        assert "--use-8bit-adam" in next(x for x in small.splitlines() if trainer in x)
    r = run("--preset", "tiny", "--use-8bit-adam", "--dry-run")
    assert r.returncode == 2 and "--use-8bit-adam is for --preset paper" in r.stderr


def test_plain_chain_options_are_checked():
    r = run("--preset", "paper", "--data", "coco", "--backbone", "hrnet-w48", "--dry-run")
    assert r.returncode == 2 and "--backbone hrnet-w48 is the paper's ADE20K semantic segmenter" in r.stderr
    r = run("--preset", "paper", "--backbone", "swin-b", "--dry-run")
    assert r.returncode == 2 and "--backbone must be r50, swin-l or hrnet-w48 (got swin-b)" in r.stderr
    r = run("--preset", "paper", "--seeds", "3", "--dry-run")
    assert r.returncode == 2 and "--seeds is for --experiment NAME" in r.stderr
    r = run("--preset", "paper", "--experiment", "fig7", "--seeds", "0", "--dry-run")
    assert r.returncode == 2 and "--seeds must be a positive integer (got 0)" in r.stderr


# ---------------------------------------------------------------- --seeds N: one table of mean ± std (issue 25 item 6)

def test_seeds_run_every_segmentation_run_under_each_seed_and_end_in_one_table():
    r = run("--preset", "paper", "--experiment", "table1,fig7", "--seeds", "3", "--data-root", "/data", "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    seg = [flags(x) for x in lines if "train_seg.py" in x]
    assert len(seg) == 3 * (len(PAPER["table1"]) + len(PAPER["fig7"]))
    by_row = {}
    for f in seg:
        run_dir, _, seed = f["--output-dir"].rpartition("-s")
        assert seed == f["--seed"]  # RUN-sK trains with --seed K
        by_row.setdefault(run_dir, []).append(int(seed))
    assert all(sorted(v) == [0, 1, 2] for v in by_row.values())
    assert lines[-1].endswith("-m common.report.seeds ./runs/table1 ./runs/fig7 --out ./results.md ")  # one table of both


def test_seeds_table_gives_mean_and_std_per_run(tmp_path):
    from common.report.seeds import summarise

    for seed, (miou, ms) in enumerate([(0.47, 0.49), (0.48, 0.50), (0.49, 0.51)]):  # three seeds of two runs
        for run_name, shift in (("r50-real", 0.0), ("r50-seggen", 0.02)):
            d = tmp_path / "table1" / f"{run_name}-s{seed}"
            d.mkdir(parents=True)
            (d / "metrics.json").write_text(json.dumps({"single_scale": {"mIoU": miou + shift}, "multi_scale": {"mIoU": ms + shift}}))
    (tmp_path / "table1/swinl-real-s0").mkdir()  # started, not finished
    text, data = summarise([tmp_path / "table1"])
    assert "| table1 | r50-real | 3 | 48.00 ± 1.00 | 50.00 ± 1.00 | — | — |" in text
    assert "| table1 | r50-seggen | 3 | 50.00 ± 1.00 | 52.00 ± 1.00 | — | — |" in text
    assert "table1: no metrics.json yet in swinl-real-s0" in text
    assert data["table1"]["r50-real"]["seeds"] == [0, 1, 2] and data["table1"]["r50-real"]["mIoU s.s."]["std"] == pytest.approx(1.0)
    out = tmp_path / "results.md"
    cli = subprocess.run([sys.executable, "-m", "common.report.seeds", str(tmp_path / "table1"), "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert out.read_text() == text and json.loads(out.with_suffix(".json").read_text()) == json.loads(json.dumps(data))
    missing = subprocess.run([sys.executable, "-m", "common.report.seeds", str(tmp_path / "table2"), "--out", str(out)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "table2: no such experiment folder" in missing.stderr


# ---------------------------------------------------------------- --experiment fig11: Fig. 11's curves (issue 25 item 5)

def test_fig11_tiny_run_writes_the_history_and_the_curves(tmp_path, tiny_models):
    """The fig11 experiment's own part: its two segmentation runs with --eval-every, the curves, the table. The
    generation stages before them are the tiny chain's (test_tiny_chain_killed_midway_resumes_and_validates runs
    them): here they are marked done, with the session's tiny models and an ImgSyn folder of real pairs."""
    from common.data.datasets import read_dataset
    from common.data.manifest import ManifestWriter

    work = tmp_path / "w"
    (work / "tiny").mkdir(parents=True)
    (work / ".done").mkdir()
    for kind in ("sdxl", "mask2former"):
        (work / "tiny" / kind).symlink_to(tiny_models(kind))
    for stage in ("tiny-sdxl", "tiny-mask2former", "ade20k-caption", "ade20k-train-mask2img", "ade20k-imgsyn"):
        (work / ".done" / stage).touch()
    imgsyn = work / "synth/imgsyn-ade20k"
    for sub in ("images", "annotations", "colormaps"):
        (imgsyn / sub).mkdir(parents=True)
    with ManifestWriter(imgsyn / "manifest.jsonl", path_fields=("image", "annotation", "colormap")) as w:
        for sample in read_dataset("ade20k", ROOT / "tests/data/ade20k", "train"):
            for k in range(2):
                sid = f"{sample.id}_s{k}"
                (imgsyn / f"images/{sid}.jpg").write_bytes(sample.image.read_bytes())
                for sub in ("annotations", "colormaps"):  # the colour map's content is not read by train_seg
                    (imgsyn / f"{sub}/{sid}.png").write_bytes(sample.annotation.read_bytes())
                w.append({"id": sid, "source_id": sample.id, "method": "imgsyn", "image": f"images/{sid}.jpg", "annotation": f"annotations/{sid}.png",
                          "colormap": f"colormaps/{sid}.png", "caption": "a room", "seed": k, "k": k, "models": {}})
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run([SCRIPT, "--preset", "tiny", "--experiment", "fig11", "--max-steps", "2", "--work", str(work)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "== ade20k-imgsyn: done before, skipped" in r.stdout and "text2mask" not in r.stdout  # fig11 uses ImgSyn only
    for run_name in ("imgsyn-20k", "imgsyn-1m"):
        run_dir = work / "runs/fig11" / run_name
        history = [json.loads(x) for x in (run_dir / "metrics_history.jsonl").read_text().splitlines()]
        assert [h["global_step"] for h in history] == [1, 2] and all(0 <= h["mIoU"] <= 1 and h["loss"] > 0 for h in history)
        assert [s["step"] for s in map(json.loads, (run_dir / "stats.jsonl").read_text().splitlines())] == [1, 2]
        assert (run_dir / "model-best/best.json").is_file()
    png = Image.open(work / "runs/fig11/fig11.png").convert("RGB")
    colours = {c for _, c in png.getcolors(1 << 20)}
    assert png.size[0] > 800 and {(31, 119, 180), (214, 39, 40)} <= colours  # both runs drawn, one colour each
    table = (work / "results.md").read_text()
    assert "| fig11 | imgsyn-20k | 1 |" in table and "| fig11 | imgsyn-1m | 1 |" in table
