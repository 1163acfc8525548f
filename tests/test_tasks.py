"""Generation stages as independent scheduler tasks (issue 26 items 1, 2): a share from --shard or the
scheduler's environment, no process group and no barrier, one folder written by many tasks, a killed task
resumed at another N, finalize; and sample ids that cannot escape --out (issue 28 item 1)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import caption
import imgsyn
import masksyn
from common import SegGenError
from common.data.ids import MAX_BYTES, check_ids, safe_name
from common.data.manifest import manifest_files
from common.runtime.shard import task_share
from common.synthesis import finalize
from conftest import ADE_ROOT
from test_imgsyn import FAST, write_captions

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the share

def test_share_from_the_flag_and_each_schedulers_environment():
    assert task_share(None, {}) == (0, 1)
    assert task_share("2/4", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "9"}) == (2, 4)  # the flag wins
    assert task_share(None, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == (3, 4)
    assert task_share(None, {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "4"}) == (3, 4)
    assert task_share(None, {"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_MAX": "6"}) == (3, 4)
    assert task_share(None, {"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    assert task_share(None, {"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == (0, 1)  # a batch script's own variables: all the work
    # an array task running torchrun: its processes split the task's share further
    assert task_share(None, {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "RANK": "1", "WORLD_SIZE": "2"}) == (3, 6)


@pytest.mark.parametrize("spec, message", [("4/4", r"--shard 4/4: I must be in 0..N-1 \(0..3\)"),
                                           ("1/0", "--shard 1/0: N must be at least 1"),
                                           ("-1/3", "I must be in 0..N-1"),
                                           ("half", "--shard half: expected I/N")])
def test_a_bad_shard_is_named(spec, message):
    with pytest.raises(SegGenError, match=message):
        task_share(spec, {})


def test_a_slurm_array_that_does_not_map_is_refused():
    with pytest.raises(SegGenError, match="SLURM_ARRAY_TASK_ID=3 does not fit the array"):
        task_share(None, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "4"})
    with pytest.raises(SegGenError, match="SLURM_ARRAY_TASK_COUNT or SLURM_ARRAY_TASK_MAX"):
        task_share(None, {"SLURM_ARRAY_TASK_ID": "3"})


def test_a_resuming_task_reads_only_the_files_whose_shares_meet_its_own(tmp_path):
    from common.data.manifest import read_ids, share_files

    for name in ("manifest.jsonl", "manifest.rank0.jsonl", *(f"manifest.shard{i}-of-4.jsonl" for i in range(4)),
                 *(f"manifest.shard{i}-of-2.jsonl" for i in range(2))):
        (tmp_path / name).write_text(json.dumps({"id": name}) + "\n")
    names = lambda share: sorted(p.name for p in share_files(tmp_path, share))  # noqa: E731
    every = ["manifest.jsonl", "manifest.rank0.jsonl"]  # a one-task file, an older rank file: any share
    assert names((1, 4)) == sorted(every + ["manifest.shard1-of-2.jsonl", "manifest.shard1-of-4.jsonl"])
    assert names((0, 2)) == sorted(every + ["manifest.shard0-of-2.jsonl", "manifest.shard0-of-4.jsonl", "manifest.shard2-of-4.jsonl"])
    assert len(names((2, 3))) == 8  # gcd(3, 4) = gcd(3, 2) = 1: every share of the others meets it
    assert read_ids(tmp_path, share=(3, 4)) == {"manifest.jsonl", "manifest.rank0.jsonl", "manifest.shard1-of-2.jsonl",
                                                "manifest.shard3-of-4.jsonl"}


# ---------------------------------------------------------------- imgsyn: 4 tasks, one killed, finished at N = 3

# Task 1 of the array is killed (SIGKILL, as a scheduler's timeout) once its first batch is on disk.
DIES_AFTER_ONE_BATCH = r"""
import os, runpy, signal, sys
from common.synthesis import synth
real_put = synth.SampleSink.put
def put(self, *a, **k):
    real_put(self, *a, **k)
    if os.environ.get("SLURM_ARRAY_TASK_ID") == "1":
        self.drain()
        os.kill(os.getpid(), signal.SIGKILL)
synth.SampleSink.put = put
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

TASKS = dict(per_sample=4, batch_size=1)  # 2 sources x 4 = 8 batches: 2 per task of 4


def same_folder(a: Path, b: Path) -> list[str]:
    """The ids of folder a, after checking that b holds the same ids with the same image, annotation and
    colour map bytes (and every id once)."""
    from common.data.datasets import read_synthetic

    ids_a, ids_b = ([s.id for s in read_synthetic(f)] for f in (a, b))
    assert len(ids_a) == len(set(ids_a)) and sorted(ids_a) == sorted(ids_b)
    for sid in ids_a:
        for sub, ext in (("images", "jpg"), ("annotations", "png"), ("colormaps", "png")):
            assert (a / sub / f"{sid}.{ext}").read_bytes() == (b / sub / f"{sid}.{ext}").read_bytes(), (sid, sub)
    return sorted(ids_a)


def test_imgsyn_array_killed_task_finished_at_another_n_equals_one_process(tmp_path, tiny_models):
    models = {"mask2img": str(tiny_models("controlnet")), "base": str(tiny_models("sdxl"))}
    captions = write_captions(tmp_path / "ade20k_val.jsonl", "ade20k", ADE_ROOT, "val")
    one = tmp_path / "one"
    imgsyn.imgsyn(data="ade20k", data_root=ADE_ROOT, split="val", captions=captions, out=one, **models, **TASKS, **FAST)

    out = tmp_path / "array"
    (tmp_path / "task.py").write_text(DIES_AFTER_ONE_BATCH)
    args = [str(ROOT / "imgsyn.py"), "--data-root", str(ADE_ROOT), "--split", "val", "--captions", str(captions),
            "--mask2img", models["mask2img"], "--base", models["base"], "--per-sample", "4", "--batch-size", "1",
            "--steps", "2", "--resolution", "64", "--guidance", "3.0", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", SLURM_ARRAY_TASK_COUNT="4")
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "task.py"), *args], env={**env, "SLURM_ARRAY_TASK_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    for i, (code, err) in enumerate(results):
        assert code == (-9 if i == 1 else 0), (i, err[-2000:])
    assert "python -m common.synthesis.finalize" in results[0][1]  # each task says how to finish; none waited
    assert sorted(p.name for p in manifest_files(out)) == [f"manifest.shard{i}-of-4.jsonl" for i in range(4)]
    assert sum(1 for _ in open(out / "manifest.shard1-of-4.jsonl")) == 1  # killed after its first batch of 2
    assert not (out / ".finalized.json").exists()  # finalize is nobody's task but finalize's

    # The rerun at N = 3: ids written by any task are skipped; only the killed task's last batch is drawn.
    summaries = [imgsyn.imgsyn(data="ade20k", data_root=ADE_ROOT, split="val", captions=captions, out=out, shard=f"{i}/3",
                               **models, **TASKS, **FAST) for i in range(3)]
    assert sum(s["written"] for s in summaries) == 1 and sum(s["skipped"] for s in summaries) == 7
    assert same_folder(out, one) == [f"ADE_val_0000000{i}_00{k}" for i in (1, 2) for k in range(4)]

    # finalize: once, by the command; then fresh, so a reader does not write it again
    assert not finalize.is_fresh(out)
    assert finalize.main([str(out)]) == 0
    assert finalize.is_fresh(out) and (out / ".index.npz").is_file()
    assert finalize.ensure_finalized(out) is None
    assert not list(out.rglob(".*tmp*"))


# ---------------------------------------------------------------- preemption (issue 28 item 4)

PAUSES_IN_SECOND_BATCH = r"""
import os, runpy, sys, time
from common.synthesis import synth
real, calls = synth.sample_images, [0]
def paused(*a, **k):  # the second batch says it has begun and waits until the test has sent SIGTERM
    calls[0] += 1
    if calls[0] == 2:
        open(os.environ["BEGUN"], "w").close()
        while not os.path.exists(os.environ["GO"]):
            time.sleep(0.05)
    return real(*a, **k)
synth.sample_images = paused
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_imgsyn_sigterm_mid_batch_ends_the_batch_exits_preempted_and_resumes(tmp_path, tiny_models):
    """A scheduler's SIGTERM to a real imgsyn process in its second batch: that batch's files and lines are
    written whole, the process exits with PREEMPTED (the trainers' code), and the same command finishes the
    folder, equal to an uninterrupted run."""
    import signal
    import time

    from common.runtime.cluster import PREEMPTED

    models = {"mask2img": str(tiny_models("controlnet")), "base": str(tiny_models("sdxl"))}
    captions = write_captions(tmp_path / "ade20k_val.jsonl", "ade20k", ADE_ROOT, "val")
    opts = dict(per_sample=2, batch_size=1)  # 2 sources x 2 = 4 batches of one
    one = tmp_path / "one"
    imgsyn.imgsyn(data="ade20k", data_root=ADE_ROOT, split="val", captions=captions, out=one, **models, **opts, **FAST)

    out, begun, go = tmp_path / "out", tmp_path / "begun", tmp_path / "go"
    (tmp_path / "task.py").write_text(PAUSES_IN_SECOND_BATCH)
    args = [str(ROOT / "imgsyn.py"), "--data-root", str(ADE_ROOT), "--split", "val", "--captions", str(captions),
            "--mask2img", models["mask2img"], "--base", models["base"], "--per-sample", "2", "--batch-size", "1",
            "--steps", "2", "--resolution", "64", "--guidance", "3.0", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", BEGUN=str(begun), GO=str(go))
    p = subprocess.Popen([sys.executable, str(tmp_path / "task.py"), *args], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not begun.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert begun.exists(), p.communicate()[1][-2000:]
        p.send_signal(signal.SIGTERM)  # in the middle of batch 2
        time.sleep(0.5)
        assert p.poll() is None  # noted, not obeyed at once
    finally:
        go.touch()
        stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == PREEMPTED, stderr[-2000:]
    assert "SIGTERM" in " ".join((stdout + stderr).split())
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 2  # batches 1 and 2, whole; nothing of batch 3
    for r in lines:  # every line's files complete: they read back as images
        for key in ("image", "annotation", "colormap"):
            Image.open(out / r[key]).load()
    assert not list(out.rglob(".*tmp*"))

    rerun = imgsyn.imgsyn(data="ade20k", data_root=ADE_ROOT, split="val", captions=captions, out=out, **models, **opts, **FAST)
    assert (rerun["written"], rerun["skipped"]) == (2, 2)
    assert same_folder(out, one) == [f"ADE_val_0000000{i}_00{k}" for i in (1, 2) for k in range(2)]


# ---------------------------------------------------------------- masksyn: two tasks (lighter), redraws inside each

SOME = dict(per_sample=3, batch_size=1, max_off_palette=0.64, text2mask_steps=2, mask2img_steps=2, resolution=64, guidance=3.0)


def test_masksyn_two_tasks_equal_one_process_with_rejected_pictures(tmp_path, tiny_models):
    models = {"text2mask": str(tiny_models("sdxl")), "mask2img": str(tiny_models("controlnet")), "base": str(tiny_models("sdxl"))}
    captions = write_captions(tmp_path / "ade20k_train.jsonl", "ade20k", ADE_ROOT, "val")
    one, two = tmp_path / "one", tmp_path / "two"
    whole = masksyn.masksyn(captions=captions, out=one, **models, **SOME)
    halves = [masksyn.masksyn(captions=captions, out=two, shard=f"{i}/2", **models, **SOME) for i in range(2)]
    assert whole["rejected"] > 0 and sum(h["rejected"] for h in halves) == whole["rejected"]
    assert all(h["written"] == 3 for h in halves)  # one caption per task (block of 1 caption at batch 1)
    assert same_folder(two, one)
    rejected = {json.loads(x)["id"]: json.loads(x) for f in manifest_files(two / "rejected.jsonl") for x in open(f)}
    assert set(rejected) == {json.loads(x)["id"] for x in open(one / "rejected.jsonl")}
    for sid, r in rejected.items():  # a small picture of each rejected colour map, named in its line with its rule
        assert r["colormap"] == f"rejected/{sid}.png" and r["rule"] == "off_palette"
        with Image.open(two / r["colormap"]) as im:
            assert max(im.size) == 64 and im.mode == "RGB"
        assert (two / r["colormap"]).read_bytes() == (one / r["colormap"]).read_bytes()
    finalize.finalize(two)
    tallies = [json.loads((f / "tally.json").read_text()) for f in (one, two)]
    assert tallies[0] == tallies[1] and tallies[0]["per_sample"] == 3 and tallies[0]["attempts"] == whole["attempts"]


# ---------------------------------------------------------------- sample ids as file names

BAD_IDS = {"../../x": "path separator", "/abs/x": "path separator", "a/b": "path separator", "..": "'.' or '..'",
           None: "null", "": "empty", "x" * 300: "300 bytes", "a\x00b": "control character", "a\nb": "control character",
           ".hidden": "starts with '.'", 3.5: "a float"}


@pytest.mark.parametrize("bad", list(BAD_IDS), ids=[repr(k)[:20] for k in BAD_IDS])
def test_an_unsafe_id_is_refused_naming_file_and_line_and_nothing_is_written(tmp_path, bad):
    cap = tmp_path / "work" / "captions.jsonl"
    cap.parent.mkdir()
    lines = [{"id": "ADE_val_00000001", "image": "a.jpg", "caption": "a room"}, {"id": bad, "image": "b.jpg", "caption": "a street"}]
    cap.write_text("".join(json.dumps(x) + "\n" for x in lines))
    before = sorted(tmp_path.rglob("*"))
    for run in (lambda: masksyn.masksyn(captions=cap, out=tmp_path / "work" / "out", text2mask="none", mask2img="none"),
                lambda: imgsyn.imgsyn(data="ade20k", data_root=ADE_ROOT, split="val", captions=cap, out=tmp_path / "work" / "out",
                                      mask2img="none")):
        with pytest.raises(SegGenError) as e:
            run()
        assert f"{cap}:2" in str(e.value) and BAD_IDS[bad] in str(e.value) and "give this sample a plain id" in str(e.value)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, inside --out or outside it
    assert not (tmp_path.parent / "x").exists()


def test_safe_names_are_the_ids_themselves_and_case_twins_are_refused():
    assert safe_name("ADE_train_00000001") == "ADE_train_00000001" and safe_name(139) == "139"
    assert safe_name("é" * (MAX_BYTES // 2)) and safe_name("a:b c")  # UTF-8, spaces and colons are fine on every POSIX fs
    with pytest.raises(SegGenError, match="201 bytes"):
        safe_name("x" * 201, "f.jsonl:3")
    with pytest.raises(SegGenError, match=r"f:2: sample id 'abc' differs only by case from 'ABC' \(f:1\)"):
        check_ids(["ABC", "abc"], ["f:1", "f:2"])


def test_caption_refuses_two_images_with_one_stem_naming_both(tmp_path):
    import shutil

    root = tmp_path / "ade"
    shutil.copytree(ADE_ROOT, root)
    images = root / "ADEChallengeData2016" / "images" / "validation"
    Image.open(images / "ADE_val_00000001.jpg").save(images / "ADE_val_00000001.png")
    with pytest.raises(SegGenError) as e:
        caption.caption(data="ade20k", data_root=root, split="val", out=tmp_path / "c.jsonl", captioner="labels")
    assert "ADE_val_00000001.jpg" in str(e.value) and "ADE_val_00000001.png" in str(e.value) and "one stem" in str(e.value)
    assert not (tmp_path / "c.jsonl").exists()


def test_caption_tasks_split_the_work_and_resume_at_another_n(tmp_path):
    out = tmp_path / "c.jsonl"
    for i in range(2):
        caption.caption(data="ade20k", data_root=ADE_ROOT, split="val", out=out, captioner="labels", shard_spec=f"{i}/2")
    assert sorted(p.name for p in manifest_files(out)) == ["c.shard0-of-2.jsonl", "c.shard1-of-2.jsonl"]
    s = caption.caption(data="ade20k", data_root=ADE_ROOT, split="val", out=out, captioner="labels")
    assert s["captioned"] == 0 and s["skipped"] == 2
