"""masksyn.py with the tiny SDXL Text2Mask pipeline and ControlNet, on captions of the real ADE20K
samples: a valid synthetic folder whose labels and images agree, degenerate masks rejected and
counted, kill-and-resume, bit-for-bit reproduction from a manifest line, bad inputs."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import masksyn
from common import SegGenError
from common.synthesis import synth
from common.masks.colormap import Palette, label_to_color, palette_for, separated_colors
from common.data.datasets import load_label, read_dataset, read_synthetic
from common.data.manifest import read_manifest
from conftest import ADE_ROOT
from test_imgsyn import assert_same_samples, killed_at_sample  # the kill and the comparison, as for imgsyn

FAST = dict(text2mask_steps=2, mask2img_steps=2, resolution=64, guidance=3.0)
ACCEPT_ALL = dict(max_off_palette=1.0)  # random tiny weights paint noise, not palette colours
SOME = dict(max_off_palette=0.64)  # the tiny model's maps are 62-68 % off the palette: some pass, some are redrawn


@pytest.fixture(scope="module")
def models(tiny_models):
    return {"text2mask": str(tiny_models("sdxl")), "mask2img": str(tiny_models("controlnet")), "base": str(tiny_models("sdxl"))}


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    path = tmp_path_factory.mktemp("cap") / "ade20k_train.jsonl"
    with open(path, "w") as f:
        for s in read_dataset("ade20k", ADE_ROOT, "val"):
            f.write(json.dumps({"id": s.id, "image": s.image.relative_to(ADE_ROOT).as_posix(), "caption": f"a photo of {s.id}"}) + "\n")
    return path


def run(out, models, captions, **kw):
    return masksyn.masksyn(**{**dict(captions=captions, per_sample=3, batch_size=2, out=out, **models, **FAST), **kw})


@pytest.fixture(scope="module")
def accepted_run(tmp_path_factory, models, captions):
    out = tmp_path_factory.mktemp("masksyn") / "all"
    return out, run(out, models, captions, preview=2, **ACCEPT_ALL)


def test_folder_is_valid_and_labels_match_the_colour_maps(accepted_run):
    out, summary = accepted_run
    assert summary["written"] == 6 and summary["rejected"] == 0
    samples = read_synthetic(out)
    assert sorted(s.id for s in samples) == [f"ADE_val_0000000{i}_00{k}" for i in (1, 2) for k in range(3)]
    palette = palette_for("ade20k", "generation")
    for s in samples:
        label = load_label(s, "ade20k")  # valid ADE20K label values, image of the label's size
        assert label.shape == (64, 64)
        assert len(np.unique(label[label > 0])) == s.meta["classes"] >= 2
        cmap = np.asarray(Image.open(out / s.meta["colormap"]))
        assert np.array_equal(cmap, label_to_color(label, palette))  # the clean map Mask2Img was conditioned on
        assert s.meta["method"] == "masksyn" and s.meta["models"]["text2mask"] and s.meta["settings"]["text2mask_steps"] == 2
    assert (out / "preview.png").is_file()


def test_decode_mask_projects_to_the_palette_and_measures_off_palette_pixels():
    palette = palette_for("ade20k", "generation")
    limit = palette.min_distance() / 2
    # A colour clearly belonging to no class: the lattice midpoint farthest from every palette colour.
    axis = np.arange(25, 256, 51)
    cands = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    dist = np.sqrt(((cands[:, None].astype(float) - palette.colors[None]) ** 2).sum(-1)).min(1)
    far = cands[dist.argmax()]
    assert dist.max() > limit
    label = np.zeros((16, 16), np.uint8)
    label[:, :8], label[:, 8:] = 3, 17
    cmap = label_to_color(label, palette)
    cmap[:2] = far  # two rows off the palette
    got, off, classes = masksyn.decode_mask(cmap, palette, limit)
    assert off == 2 / 16 and classes == 2
    assert np.array_equal(got[2:], label[2:]) and (got[:2] == 0).all()  # off-palette pixels become "other"
    assert masksyn.decode_mask(label_to_color(np.full((8, 8), 5, np.uint8), palette), palette, limit)[2] == 1


def test_decode_mask_keeps_the_pixels_the_vote_mends():
    """An isolated pixel of another class's exact colour is mended by the 3×3 vote: it takes its
    neighbours' class and is on the palette, not "other" and not counted off-palette."""
    palette = palette_for("ade20k", "generation")
    label = np.full((8, 8), 3, np.uint8)
    label[:, 6:] = 5
    painted = label.copy()
    painted[4, 4] = 17  # a decoding error: class 17's colour amid class 3
    got, off, classes = masksyn.decode_mask(label_to_color(painted, palette), palette, palette.min_distance() / 2)
    assert np.array_equal(got, label) and off == 0.0 and classes == 2


def test_degenerate_masks_are_rejected_counted_and_not_redrawn(tmp_path, monkeypatch, models, captions):
    out = tmp_path / "strict"
    s = run(out, models, captions)  # default --max-off-palette 0.1: the tiny model's noise is rejected
    # Every caption is redrawn up to the bound (default 3 × --per-sample = 9 attempts), then named as short.
    assert s["written"] == 0 and s["rejected"] == s["attempts"] == 18 and s["rejections"] == {"off_palette": 18}
    assert len(s["short"]) == 2 and all("0 of 3 accepted after 9 attempt(s)" in x and "off_palette 9" in x for x in s["short"])
    rejected = read_manifest(out / "rejected.jsonl")
    assert sorted(r["k"] for r in rejected) == sorted(list(range(9)) * 2)
    assert all("off the palette, above --max-off-palette 10.0%" in r["reason"] and r["off_palette"] > 0.1 for r in rejected)
    tally = json.loads((out / "tally.json").read_text())
    assert tally["attempts"] == 18 and tally["accepted"] == 0 and tally["rejected"] == {"off_palette": 18} and len(tally["short"]) == 2
    assert not (out / "images").exists()
    # A folder left without any sample ends loudly, with exit 1, saying why and what to change.
    from common.runtime.progress import console

    with console.capture() as cap:
        assert synth.report(s, compared="sample") == 1
    said = " ".join(cap.get().split())
    assert "no sample written" in said and "off_palette 18" in said and "--max-off-palette" in said and "--max-attempts" in said

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(synth, "load_text2mask", refuse)
    assert run(out, models, captions)["skipped"] == 18  # a rerun does not draw them again
    # Another run's rejections are not silently skipped: a looser filter on the same --out is refused.
    with pytest.raises(SegGenError, match=r"--out .* different settings \(max_off_palette: 0.1 there, 1.0 now\)"):
        run(out, models, captions, **ACCEPT_ALL)


def test_files_written_in_the_loop_or_by_the_pool_are_byte_identical(tmp_path, accepted_run, models, captions):
    full, _ = accepted_run
    inline = tmp_path / "inline"
    assert run(inline, models, captions, write_threads=0, **ACCEPT_ALL)["written"] == 6
    assert_same_samples(inline, full, 6)
    assert (inline / "manifest.jsonl").read_text().count("\n") == 6 and not list(full.rglob(".*tmp*"))


def test_kill_and_resume_gives_the_uninterrupted_result(tmp_path, monkeypatch, accepted_run, models, captions):
    full, _ = accepted_run
    out = tmp_path / "killed"
    with killed_at_sample(monkeypatch, 3):
        run(out, models, captions, **ACCEPT_ALL)
    assert len(read_synthetic(out)) == 2
    s = run(out, models, captions, **ACCEPT_ALL)
    assert s["written"] == 4 and s["skipped"] == 2
    assert_same_samples(out, full, 6)


def test_reproduce_one_sample_bit_for_bit(tmp_path, accepted_run, models, captions):
    full, _ = accepted_run
    out = tmp_path / "copy"
    shutil.copytree(full, out)
    # The manifest line names the models and settings: the command line's need not repeat them.
    result = run(out, {"text2mask": None, "mask2img": None, "base": None}, captions, reproduce="ADE_val_00000002_000")
    assert result["identical"]
    assert (out / "reproduce" / "ADE_val_00000002_000.png").read_bytes() == (full / "annotations" / "ADE_val_00000002_000.png").read_bytes()


def test_reproduce_of_a_sample_now_rejected_says_why(tmp_path, accepted_run, models, captions, capsys):
    """A stored sample whose mask, drawn again under its recorded settings, is rejected (here: its line says
    --max-off-palette 0.1, which the tiny model's maps exceed) is reported as rejected, with rule and figure."""
    full, _ = accepted_run
    out = tmp_path / "copy"
    shutil.copytree(full, out)
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    for r in lines:
        r["settings"]["max_off_palette"] = 0.1
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    result = run(out, models, captions, reproduce="ADE_val_00000001_000")
    assert not result["identical"] and result["reproduced"] is None
    figure = next(r["off_palette"] for r in lines if r["id"] == "ADE_val_00000001_000")
    assert result["rejected"] == f"off_palette: {figure:.1%} of pixels off the palette, above --max-off-palette 10.0%"
    assert synth.report(result, compared="sample") == 1
    assert "reproduced ADE_val_00000001_000: now rejected: off_palette: " in " ".join(capsys.readouterr().err.split())


def test_model_palette_is_read_from_the_model_folder(tmp_path, models):
    folder = tmp_path / "t2m"
    shutil.copytree(models["text2mask"], folder)
    assert synth.model_palette(str(folder), "ade20k").name == "ade20k-generation"
    Palette("custom", separated_colors(151), palette_for("ade20k").values).save(folder / "palette.json")
    assert synth.model_palette(str(folder), "ade20k").name == "custom"


def test_bad_inputs_fail_before_any_model(tmp_path, monkeypatch, accepted_run, models, captions):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(synth, "load_text2mask", refuse)
    monkeypatch.setattr(synth, "load_mask2img", refuse)
    with pytest.raises(SegGenError, match=r"--text2mask .*not a diffusers pipeline folder"):
        run(tmp_path / "o", {**models, "text2mask": models["mask2img"]}, captions)
    with pytest.raises(SegGenError, match=r"--text2mask .*not found: run train_text2mask.py --data ade20k first"):
        run(tmp_path / "o", {**models, "text2mask": str(tmp_path / "none")}, captions)
    full, _ = accepted_run
    with pytest.raises(SegGenError, match=r"--out .* different settings \(guidance: 3.0 there, 4.0 now\)"):
        run(full, models, captions, guidance=4.0, **ACCEPT_ALL)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SegGenError, match=r"--captions .* holds no captions"):
        run(tmp_path / "o", models, empty)


def test_sd15_text2mask(tmp_path, models, captions, tiny_models):
    """Paper appendix A.11: SD-1.5 as the Text2Mask base (detected from the pipeline folder)."""
    s = run(tmp_path / "sd15", {**models, "text2mask": str(tiny_models("sd15"))}, captions, per_sample=1, **ACCEPT_ALL)
    out = tmp_path / "sd15"
    assert s["written"] == 2 and {synth.resolve_models(x.meta["models"], out)["text2mask"] for x in read_synthetic(out)} == {str(tiny_models("sd15"))}


def test_help_shows_the_sampling_defaults():
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command()(masksyn.main)
    text = " ".join(CliRunner().invoke(app, ["--help"], terminal_width=200).output.split())
    assert "[default: euler]" in text and "[default: legacy]" in text and "[default: 5.0]" in text
    assert "[default: 200]" in text and "[default: 40]" in text  # paper A.4's step counts
    unboxed = " ".join(text.replace("│", " ").split())  # rich wraps long help inside its box
    assert "coco: panoptic PNGs + segments_info" in unboxed and "--data" in unboxed  # --data says what each dataset gives


def test_cli_errors_exit_2_with_the_flag_named(tmp_path, captions):
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command()(masksyn.main)
    res = CliRunner().invoke(app, ["--per-sample", "0", "--captions", str(captions)])
    assert res.exit_code == 2 and "--per-sample" in res.output
    res = CliRunner().invoke(app, ["--captions", str(captions), "--text2mask", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "error:" in res.output and "--text2mask" in res.output and "train_text2mask.py" in res.output


@pytest.fixture(scope="module")
def some_run(tmp_path_factory, models, captions):
    out = tmp_path_factory.mktemp("masksyn") / "some"
    return out, run(out, models, captions, **SOME)


def attempts_by_caption(out):
    accepted, tried = {}, {}
    for r in read_manifest(out):
        accepted.setdefault(r["source_id"], []).append(r["k"])
        tried.setdefault(r["source_id"], []).append(r["k"])
    for r in read_manifest(out / "rejected.jsonl"):
        tried.setdefault(r["source_id"], []).append(r["k"])
    return ({c: sorted(v) for c, v in accepted.items()}, {c: sorted(v) for c, v in tried.items()})


def test_rejected_masks_are_redrawn_until_per_sample_are_accepted(some_run):
    out, s = some_run
    accepted, tried = attempts_by_caption(out)
    assert s["rejected"] > 0 and s["rejections"] == {"off_palette": s["rejected"]}  # the rule did reject some
    assert {c: len(v) for c, v in accepted.items()} == {"ADE_val_00000001": 3, "ADE_val_00000002": 3} and not s["short"]
    assert any(k >= 3 for v in accepted.values() for k in v)  # an accepted mask from a redraw
    assert all(sorted(v) == list(range(len(v))) for v in tried.values())  # attempts 0, 1, 2, ... none skipped
    assert s["attempts"] == sum(len(v) for v in tried.values()) == s["written"] + s["rejected"]
    for r in read_manifest(out):  # a redraw's seed derives from (caption id, attempt index)
        assert r["attempt"] == r["k"] and r["seed"] == synth.derive_seed(0, r["source_id"], r["k"]) and r["off_palette"] <= 0.64
    assert json.loads((out / "tally.json").read_text())["attempts"] == s["attempts"]


def test_redraws_stop_at_max_attempts_and_name_the_short_captions(tmp_path, models, captions):
    s = run(tmp_path / "bound", models, captions, max_attempts=4, **SOME)
    accepted, tried = attempts_by_caption(tmp_path / "bound")
    for c in tried:
        assert len(accepted.get(c, [])) == 3 or len(tried[c]) == 4
    short = [c for c in tried if len(accepted.get(c, [])) < 3]
    assert short and len(s["short"]) == len(short)
    assert all(x.startswith(short[i]) and "after 4 attempt(s) (max 4)" in x and "off_palette" in x and "last:" in x
               for i, x in enumerate(s["short"]))
    with pytest.raises(SegGenError, match=r"--max-attempts 2: must be at least --per-sample \(3\)"):
        run(tmp_path / "x", models, captions, max_attempts=2)


def test_redraws_kill_and_resume_gives_the_uninterrupted_result(tmp_path, monkeypatch, some_run, models, captions):
    full, _ = some_run
    out = tmp_path / "killed"
    with killed_at_sample(monkeypatch, 5):  # the 5th line, accepted or rejected
        run(out, models, captions, **SOME)
    run(out, models, captions, **SOME)
    assert_same_samples(out, full, 6)
    assert attempts_by_caption(out)[1] == attempts_by_caption(full)[1]


def test_redraws_two_processes_give_the_same_samples_as_one(tmp_path, some_run, models, captions):
    import os
    import subprocess
    import sys
    from pathlib import Path

    full, _ = some_run
    out = tmp_path / "ranks"
    root = Path(masksyn.__file__).parent
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(root / "masksyn.py"),
           "--captions", str(captions), "--text2mask", models["text2mask"], "--mask2img", models["mask2img"], "--base", models["base"],
           "--per-sample", "3", "--batch-size", "2", "--text2mask-steps", "2", "--mask2img-steps", "2", "--resolution", "64",
           "--guidance", "3.0", "--max-off-palette", "0.64", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.glob("rejected*.jsonl")) == ["rejected.shard0-of-2.jsonl", "rejected.shard1-of-2.jsonl"]
    assert_same_samples(out, full, 6)
    assert attempts_by_caption(out)[1] == attempts_by_caption(full)[1]


def test_coco_panoptic_folder_from_recovered_instances(tmp_path, models, captions):
    """--data coco: the generated edge-coloured map -> color_to_panoptic -> a COCO panoptic folder that
    read_synthetic reads with segments_info; the colour map stored (and drawn from) is the recovered
    annotation re-rendered, so label and image agree; --reproduce gives the same bytes."""
    from common.masks.colormap import panoptic_to_color
    from common.data.datasets import load_panoptic

    out = tmp_path / "coco"
    s = run(out, models, captions, data="coco", per_sample=2, **ACCEPT_ALL)
    assert s["written"] == 4 and s["written"] + s["rejected"] == s["attempts"]
    palette = palette_for("coco", "generation")
    for sample in read_synthetic(out):
        ids = load_panoptic(sample)  # id = R + 256 G + 65536 B
        assert sample.segments and {x["id"] for x in sample.segments} == set(np.unique(ids[ids > 0]).tolist())
        assert all(x["area"] == int((ids == x["id"]).sum()) for x in sample.segments)
        assert any(x["isthing"] for x in sample.segments)
        cmap = np.asarray(Image.open(out / sample.meta["colormap"]))
        assert np.array_equal(cmap, panoptic_to_color(ids, sample.segments, palette))
    assert run(out, {"text2mask": None, "mask2img": None, "base": None}, captions, data="coco",
               reproduce=read_synthetic(out)[-1].id)["identical"]


@pytest.mark.parametrize("task", ["panoptic", "instance"])
def test_train_seg_trains_on_a_coco_masksyn_folder(tmp_path, models, captions, tiny_models, task):
    """A COCO MaskSyn folder is a training source for train_seg --data coco, panoptic and instance alike:
    every synthetic slot of the batches is drawn from it (p_aug 1) and metrics.json is written."""
    from typer.testing import CliRunner

    import train_seg
    from conftest import COCO_ROOT

    out = tmp_path / "masksyn-coco"
    assert run(out, models, captions, data="coco", per_sample=1, **ACCEPT_ALL)["written"] == 2
    root = tmp_path / "coco"  # a COCO root whose train split is a copy of the 2 real val samples
    shutil.copytree(COCO_ROOT, root)
    shutil.copytree(root / "val2017", root / "train2017")
    shutil.copytree(root / "annotations/panoptic_val2017", root / "annotations/panoptic_train2017")
    shutil.copy(root / "annotations/panoptic_val2017.json", root / "annotations/panoptic_train2017.json")
    args = ["--data", "coco", "--data-root", root, "--task", task, "--strategy", "synthetic", "--synthetic", out,
            "--model", tiny_models("mask2former"), "--max-steps", "2", "--batch-size", "2", "--crop", "64",
            "--num-workers", "0", "--checkpoint-every", "0", "--log-every", "1", "--eval-size", "64",
            "--output-dir", tmp_path / "run"]
    result = CliRunner().invoke(train_seg.app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    got = json.loads((tmp_path / "run/metrics.json").read_text())
    assert got["task"] == task and got["drawn"] == {"real": 0, str(out): 4}
