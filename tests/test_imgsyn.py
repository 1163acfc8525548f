"""imgsyn.py on the real ADE20K and COCO panoptic samples with the tiny SDXL ControlNet: a valid
synthetic folder, kill-and-resume, bit-for-bit reproduction from a manifest line, bad inputs."""

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgsyn
from common import SegGenError
from common.synthesis import synth
from common.masks.colormap import coco_categories, color_to_label, palette_for, panoptic_to_color
from common.data.datasets import load_label, load_panoptic, read_dataset, read_synthetic, rgb_to_id
from common.data.manifest import ManifestWriter
from conftest import ADE_ROOT, COCO_ROOT

FAST = dict(steps=2, resolution=64, guidance=3.0)


@pytest.fixture(scope="module")
def models(tiny_models):
    return {"mask2img": str(tiny_models("controlnet")), "base": str(tiny_models("sdxl"))}


def write_captions(path, data, root, split):
    with open(path, "w") as f:
        for s in read_dataset(data, root, split):
            f.write(json.dumps({"id": s.id, "image": s.image.relative_to(root).as_posix(), "caption": f"a photo of {s.id}"}) + "\n")
    return path


@pytest.fixture(scope="module")
def ade_captions(tmp_path_factory):
    return write_captions(tmp_path_factory.mktemp("cap") / "ade20k_val.jsonl", "ade20k", ADE_ROOT, "val")


def run_ade(out, models, captions, **kw):
    args = dict(data="ade20k", data_root=ADE_ROOT, split="val", captions=captions, per_sample=3, batch_size=2, out=out,
                **models, **FAST)
    return imgsyn.imgsyn(**{**args, **kw})


@pytest.fixture(scope="module")
def ade_run(tmp_path_factory, models, ade_captions):
    out = tmp_path_factory.mktemp("imgsyn") / "ade"
    summary = run_ade(out, models, ade_captions, preview=2)
    return out, summary


def test_ade20k_folder_is_valid(ade_run):
    out, summary = ade_run
    assert summary["written"] == 6 and summary["failed"] == 0 and summary["skipped"] == 0
    samples = read_synthetic(out)
    assert sorted(s.id for s in samples) == [f"ADE_val_0000000{i}_00{k}" for i in (1, 2) for k in range(3)]
    real = {s.id: s for s in read_dataset("ade20k", ADE_ROOT, "val")}
    palette = palette_for("ade20k", "generation")
    for s in samples:
        src = real[s.meta["source_id"]]
        label = load_label(s, "ade20k")  # valid ADE20K values, and the image has the label's size
        assert s.annotation.read_bytes() == src.annotation.read_bytes()  # the human annotation itself
        assert np.array_equal(label, load_label(src, "ade20k"))
        cmap = np.asarray(Image.open(out / s.meta["colormap"]))
        assert np.array_equal(color_to_label(cmap, palette), label)  # the map the image was drawn from
        assert Image.open(s.image).format == "JPEG"
        m = s.meta
        assert m["method"] == "imgsyn" and m["caption"] == f"a photo of {m['source_id']}"
        assert m["seed"] == synth.derive_seed(0, m["source_id"], m["k"])
        assert m["settings"]["steps"] == 2 and m["models"]["base"]
        # The SDXL reference default (sgm's streamlit demo): Euler, legacy DDPM schedule, guidance as given.
        assert (m["settings"]["sampler"], m["settings"]["schedule"]) == ("euler", "legacy")
    # Different seeds give different images for the same label.
    a, b = (np.asarray(Image.open(out / "images" / f"ADE_val_00000001_00{k}.jpg")) for k in (0, 1))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1
    assert Image.open(out / "preview.png").size[1] > 2 * 192


def test_coco_panoptic_folder(tmp_path, models):
    captions = write_captions(tmp_path / "coco_val.jsonl", "coco", COCO_ROOT, "val")
    out = tmp_path / "coco"
    s = imgsyn.imgsyn(data="coco", data_root=COCO_ROOT, split="val", captions=captions, per_sample=1, out=out, **models, **FAST)
    assert s["written"] == 2
    real = {x.id: x for x in read_dataset("coco", COCO_ROOT, "val")}
    palette = palette_for("coco", "generation")
    for sample in read_synthetic(out):
        src = real[sample.meta["source_id"]]
        assert sample.segments == src.segments  # segments_info travels with the panoptic PNG
        ids = load_panoptic(sample)
        assert np.array_equal(ids, load_panoptic(src))
        cmap = np.asarray(Image.open(out / sample.meta["colormap"]))
        assert np.array_equal(cmap, panoptic_to_color(ids, sample.segments, palette))  # category colours + edges
        with Image.open(sample.image) as im:
            assert im.size == (ids.shape[1], ids.shape[0])
    # The folder is a COCO panoptic dataset too: panoptic_coco.json read back with pycocotools' COCO.
    from pycocotools.coco import COCO

    doc = json.loads((out / "panoptic_coco.json").read_text())
    coco = COCO()
    coco.dataset = {**doc, "annotations": []}  # the panoptic annotations are per image, not per segment
    coco.createIndex()
    assert sorted(Path(img["file_name"]).stem for img in coco.loadImgs(coco.getImgIds())) == sorted(x.id for x in read_synthetic(out))
    assert {c["id"] for c in doc["categories"]} == {c["id"] for c in coco_categories()}
    for ann in doc["annotations"]:
        img = coco.loadImgs(ann["image_id"])[0]
        assert (out / "images" / img["file_name"]).is_file() and (out / "annotations" / ann["file_name"]).is_file()
        ids = rgb_to_id(np.asarray(Image.open(out / "annotations" / ann["file_name"])))
        assert ids.shape == (img["height"], img["width"])
        assert {x["id"] for x in ann["segments_info"]} == set(np.unique(ids[ids > 0]).tolist())
    # Written sample by sample, it is byte for byte the whole document dumped at once (ids 1..N in sample-id order).
    ordered = sorted(read_synthetic(out), key=lambda x: x.id)
    whole = {"images": [{"id": i, "file_name": x.image.name, "width": Image.open(x.annotation).size[0], "height": Image.open(x.annotation).size[1]}
                        for i, x in enumerate(ordered, start=1)],
             "annotations": [{"image_id": i, "file_name": x.annotation.name, "segments_info": x.segments} for i, x in enumerate(ordered, start=1)],
             "categories": [{k: c[k] for k in ("id", "name", "isthing", "color") if k in c} for c in coco_categories()]}
    assert (out / "panoptic_coco.json").read_text() == json.dumps(whole) and len(whole["images"]) == 2


@contextmanager
def killed_at_sample(monkeypatch, n):
    """The run inside is killed after the n-th sample's files are written, before its manifest line."""
    real_append, calls = ManifestWriter.append, []

    def dying_append(self, record, **kw):
        calls.append(record["id"])
        if len(calls) == n:
            raise KeyboardInterrupt
        real_append(self, record, **kw)

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(ManifestWriter, "append", dying_append)
        yield


def assert_same_samples(out, full, n):
    """out holds n samples, each id once, with the same files byte for byte as the folder full."""
    ids = [s.id for s in read_synthetic(out)]
    assert len(ids) == len(set(ids)) == n
    for sid in ids:
        for sub, ext in (("images", "jpg"), ("annotations", "png"), ("colormaps", "png")):
            assert (out / sub / f"{sid}.{ext}").read_bytes() == (full / sub / f"{sid}.{ext}").read_bytes(), sid


def test_kill_and_resume_gives_the_uninterrupted_result(tmp_path, monkeypatch, ade_run, models, ade_captions):
    full, _ = ade_run
    out = tmp_path / "killed"
    with killed_at_sample(monkeypatch, 4):
        run_ade(out, models, ade_captions)
    assert len(read_synthetic(out)) == 3
    # A label that cannot be read fails its batches' new samples only: sample 3, written, is not "failed".
    real_load_label = imgsyn.load_label

    def unreadable(sample, data):
        if sample.id == "ADE_val_00000002":
            raise SegGenError(f"{sample.annotation}: cannot read it")
        return real_load_label(sample, data)

    with monkeypatch.context() as m:
        m.setattr(imgsyn, "load_label", unreadable)
        summary = run_ade(out, models, ade_captions)
    assert (summary["written"], summary["skipped"], summary["failed"]) == (0, 3, 3) and len(read_synthetic(out)) == 3
    summary = run_ade(out, models, ade_captions)
    assert summary["written"] == 3 and summary["skipped"] == 3  # the batch holding samples 3 and 4 was redone
    assert_same_samples(out, full, 6)
    assert not list(out.rglob(".*tmp*"))


def test_files_written_in_the_loop_or_by_the_pool_are_byte_identical(tmp_path, ade_run, models, ade_captions):
    """The writing threads change when files are written, not what: a run that writes in its loop
    (write_threads=0) gives the same bytes; a source's colour map is written once, its other samples link it."""
    full, _ = ade_run
    inline = tmp_path / "inline"
    assert run_ade(inline, models, ade_captions, write_threads=0)["written"] == 6
    assert_same_samples(inline, full, 6)
    assert [json.loads(x)["id"] for x in (inline / "manifest.jsonl").read_text().splitlines()] == \
        [json.loads(x)["id"] for x in (full / "manifest.jsonl").read_text().splitlines()]  # lines in the plan's order
    for folder in (full, inline):
        inodes = {(folder / f"colormaps/ADE_val_00000001_{k:03d}.png").stat().st_ino for k in range(3)}
        assert len(inodes) == 1  # one file, three names (hard links)
    assert not list(full.rglob(".*tmp*"))


def test_a_failed_write_stops_the_run_with_complete_files_and_whole_lines(tmp_path, monkeypatch, models, ade_captions):
    """An error in a writing thread (a full disk) reaches the loop: the lines written are those of the
    batches whose files all exist, no temporary file is left, and a rerun finishes the folder."""
    out, real_save, calls = tmp_path / "full", synth.save_jpeg, []

    def disk_full(path, image):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_save(path, image)

    with monkeypatch.context() as m, pytest.raises(OSError, match="No space left"):
        m.setattr(synth, "save_jpeg", disk_full)
        run_ade(out, models, ade_captions)
    ids = [s.id for s in read_synthetic(out)]
    assert ids == ["ADE_val_00000001_000", "ADE_val_00000001_001"] and not list(out.rglob(".*tmp*"))
    assert run_ade(out, models, ade_captions)["written"] == 4 and len(read_synthetic(out)) == 6


def test_reproduce_one_sample_bit_for_bit(tmp_path, ade_run, models, ade_captions):
    full, _ = ade_run
    out = tmp_path / "copy"
    shutil.copytree(full, out)
    # The manifest line names the models and settings: the command line's need not repeat them.
    result = run_ade(out, {"mask2img": None, "base": None}, ade_captions, steps=9, reproduce="ADE_val_00000001_002")
    assert result["identical"]  # drawn again together with its batch-mate ADE_val_00000002_000, as recorded
    assert (out / "reproduce" / "ADE_val_00000001_002.jpg").read_bytes() == (full / "images" / "ADE_val_00000001_002.jpg").read_bytes()
    # The comparison can fail: a sample whose stored image was altered is reported as different.
    Image.new("RGB", (8, 8)).save(out / "images" / "ADE_val_00000002_000.jpg")
    assert not run_ade(out, models, ade_captions, reproduce="ADE_val_00000002_000")["identical"]


def test_reproduce_a_manifest_written_before_the_schedule_was_recorded(tmp_path, models, ade_captions):
    """Lines written by the earlier default (Heun, Karras schedule) carry no "schedule": --reproduce reads
    them as Heun/Karras and gives the same bytes; the new default would give others."""
    out = tmp_path / "old"
    run_ade(out, models, ade_captions, per_sample=2, limit=1, sampler="heun", schedule="karras")
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert all(r["settings"]["schedule"] == "karras" for r in lines)
    for r in lines:  # as the old code wrote them: the same fields but "schedule"
        del r["settings"]["schedule"]
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert run_ade(out, models, ade_captions, reproduce="ADE_val_00000001_001")["identical"]
    # Resuming that folder with the old settings is allowed; with the new default it is another run.
    assert run_ade(out, models, ade_captions, per_sample=2, limit=1, sampler="heun", schedule="karras")["skipped"] == 2
    with pytest.raises(SegGenError, match=r"different settings \(sampler: 'heun' there, 'euler' now; schedule: 'karras' there, 'legacy' now\)"):
        run_ade(out, models, ade_captions, per_sample=2, limit=1)
    # The recorded sampler decides: the same stored line reproduced with Euler/legacy would differ.
    default = tmp_path / "new"
    run_ade(default, models, ade_captions, per_sample=2, limit=1)
    assert (default / "images" / "ADE_val_00000001_001.jpg").read_bytes() != (out / "images" / "ADE_val_00000001_001.jpg").read_bytes()


def test_help_shows_the_sampling_defaults():
    from typer.testing import CliRunner
    import typer

    app = typer.Typer()
    app.command()(imgsyn.main)
    text = " ".join(CliRunner().invoke(app, ["--help"], terminal_width=200).output.split())
    assert "[default: euler]" in text and "[default: legacy]" in text and "[default: 40]" in text and "[default: 5.0]" in text
    unboxed = " ".join(text.replace("│", " ").split())  # rich wraps long help inside its box
    assert "[default: (50 for ade20k, 10 for coco and toy)]" in unboxed  # --per-sample: the paper's count per dataset


@pytest.fixture
def no_model(monkeypatch):
    """Bad inputs must fail before any model loads."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(synth, "load_mask2img", refuse)


def test_bad_inputs_fail_before_any_model(tmp_path, monkeypatch, models, ade_captions, ade_run, no_model, tiny_models):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(ade_captions.read_text() + json.dumps({"id": "ADE_val_99999999", "image": "x.jpg", "caption": "c"}) + "\n")
    with pytest.raises(SegGenError, match=r"--captions .*1 id\(s\) are not in ade20k/val \(e.g. 'ADE_val_99999999'\)"):
        run_ade(tmp_path / "o", models, bad)
    with pytest.raises(SegGenError, match=r"--mask2img .*not a ControlNet folder"):
        run_ade(tmp_path / "o", {**models, "mask2img": models["base"]}, ade_captions)
    with pytest.raises(SegGenError, match=r"--mask2img .*records no base pipeline.*pass --base"):
        run_ade(tmp_path / "o", {**models, "base": None}, ade_captions)
    with pytest.raises(SegGenError, match=r"--mask2img .*not found: run train_mask2img.py --data ade20k first"):
        run_ade(tmp_path / "o", {**models, "mask2img": str(tmp_path / "nothing")}, ade_captions)
    with pytest.raises(SegGenError, match=r"--mask2img .* does not fit --base .*sd15.*: the ControlNet was made for another UNet"):
        run_ade(tmp_path / "o", {**models, "base": str(tiny_models("sd15"))}, ade_captions)
    full, _ = ade_run
    with pytest.raises(SegGenError, match=r"--out .* holds samples of another run with different settings \(steps: 2 there, 5 now\)"):
        run_ade(full, models, ade_captions, steps=5)
    monkeypatch.chdir(tmp_path)  # the default captions/ade20k_val.jsonl does not exist here
    with pytest.raises(SegGenError, match=r"captions/ade20k_val.jsonl not found: run caption.py --data ade20k --split val first, or pass --captions"):
        run_ade(tmp_path / "o", models, None)


def test_base_and_vae_recorded_with_the_controlnet(tmp_path, models, ade_captions):
    """train_mask2img.py writes seggen.json {"base", "vae", ...} beside the ControlNet: only --mask2img is needed."""
    cn = tmp_path / "mask2img"
    shutil.copytree(models["mask2img"], cn)
    (cn / "seggen.json").write_text(json.dumps({"base": models["base"], "vae": None}))
    assert synth.check_controlnet(str(cn), None, "ade20k") == (models["base"], "sdxl")
    (cn / "seggen.json").write_text(json.dumps({"base": "../elsewhere/sdxl"}))  # relative to where training ran
    with pytest.raises(SegGenError, match=r"records base pipeline '../elsewhere/sdxl' \(in seggen.json\), which is not found from .*: pass --base"):
        synth.check_controlnet(str(cn), None, "ade20k")
    vae = str(tmp_path / "vae")
    shutil.copytree(f"{models['base']}/vae", vae)
    (cn / "seggen.json").write_text(json.dumps({"base": models["base"], "vae": vae}))
    s = run_ade(tmp_path / "o", {"mask2img": str(cn), "base": None}, ade_captions, per_sample=1, limit=1)
    assert s["written"] == 1
    recorded = read_synthetic(tmp_path / "o")[0].meta["models"]
    assert all(v.startswith("../") for v in recorded.values())  # relative to the folder (issue 17 item 4)
    assert synth.resolve_models(recorded, tmp_path / "o") == {"mask2img": str(cn), "base": models["base"], "vae": vae}


def test_cli_errors_exit_2_with_the_flag_named(tmp_path, ade_captions):
    from typer.testing import CliRunner
    import typer

    app = typer.Typer()
    app.command()(imgsyn.main)
    res = CliRunner().invoke(app, ["--per-sample", "0", "--captions", str(ade_captions)])
    assert res.exit_code == 2 and "--per-sample" in res.output
    res = CliRunner().invoke(app, ["--data-root", str(ADE_ROOT), "--split", "val", "--captions", str(ade_captions),
                                   "--mask2img", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "error:" in res.output and "--mask2img" in res.output


def test_generation_size_keeps_the_aspect_ratio_at_the_training_scale():
    assert imgsyn.generation_size(512, 683, 768) == (768, 1024)  # ADE_val_00000001: short side 768, as trained
    assert imgsyn.generation_size(768, 768, 768) == (768, 768)
    assert imgsyn.generation_size(100, 1000, 768) == (768, 1536)  # a panorama: the long side stops at 2·768
    assert all(x % 8 == 0 for x in imgsyn.generation_size(333, 517, 512))


def test_sampler_choices_are_the_samplers_own():
    from common.runtime.cli import Sampler, SamplingSchedule
    from common.diffusion.sampler import SAMPLERS, SCHEDULES

    assert [s.value for s in Sampler] == list(SAMPLERS) and [s.value for s in SamplingSchedule] == list(SCHEDULES)


SLOW_START = r"""
import os, runpy, sys, time
from common.synthesis import synth
real = synth.sample_images
def waiting(*a, **k):  # the first batch waits until the test has seen the second job refused
    while not os.path.exists(os.environ["GO"]):
        time.sleep(0.1)
    return real(*a, **k)
synth.sample_images = waiting
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_second_job_on_the_same_out_stops_at_once_naming_the_holder(tmp_path, models, ade_captions):
    """Two real processes on one --out (issue 16 item 2): the second exits 2 before any work, naming the
    first; the first finishes, and its folder reads back with every id once."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    root, out, go = Path(imgsyn.__file__).parent, tmp_path / "o", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(root), "GO": str(go)}
    args = [str(root / "imgsyn.py"), "--data-root", str(ADE_ROOT), "--split", "val", "--captions", str(ade_captions),
            "--mask2img", models["mask2img"], "--base", models["base"], "--per-sample", "2", "--steps", "1",
            "--resolution", "64", "--out", str(out)]
    (tmp_path / "slow.py").write_text(SLOW_START)
    first = subprocess.Popen([sys.executable, str(tmp_path / "slow.py"), *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        lock, deadline = out / ".lock.rank0", time.monotonic() + 120
        while not (lock.is_file() and lock.read_text().strip()) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert json.loads(lock.read_text())["pid"] == first.pid
        second = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        message = " ".join(second.stderr.split())
        assert f"--out {out} is in use by another job: pid {first.pid}" in message
        assert "imgsyn.py" in message  # the holder's command
        assert first.poll() is None and not any(p.stat().st_size for p in out.glob("manifest*.jsonl"))  # no line yet
    finally:
        go.touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    ids = [s.id for s in read_synthetic(out)]  # read_synthetic refuses an id written twice
    assert sorted(ids) == [f"ADE_val_0000000{i}_00{k}" for i in (1, 2) for k in range(2)]


def test_a_moved_run_still_finds_its_models(tmp_path, tiny_models, ade_captions):
    """Issue 17 item 4: a Mask2Img run folder and a synthetic folder record their models relative to
    themselves; moved together with them (another machine, another mount), they still find them and resume."""
    import train_mask2img
    from conftest import invoke, trainer_args

    here = tmp_path / "here"
    shutil.copytree(tiny_models("sdxl"), here / "base")
    res = invoke(train_mask2img.app, trainer_args(tmp_path, here / "base", here / "run", **{"--max-steps": 1}))
    assert res.exit_code == 0, res.output
    assert json.loads((here / "run" / "seggen.json").read_text())["base"] == "../base"
    s = run_ade(here / "synth", {"mask2img": str(here / "run"), "base": None}, ade_captions, per_sample=1, limit=1)
    assert s["written"] == 1
    line = json.loads((here / "synth" / "manifest.jsonl").read_text())
    assert line["models"] == {"mask2img": "../run", "base": "../base", "vae": None}

    there = tmp_path / "there"
    (here).rename(there)  # the whole tree moves; the old paths are gone
    again = run_ade(there / "synth", {"mask2img": str(there / "run"), "base": None}, ade_captions, per_sample=1, limit=1)
    assert again["written"] == 0 and again["skipped"] == 1  # same models where they now are: a resume, not a clash
    rep = imgsyn.imgsyn(**{**dict(data="ade20k", data_root=ADE_ROOT, split="val", captions=ade_captions, out=there / "synth"),
                           "reproduce": line["id"]})
    assert rep["identical"]
