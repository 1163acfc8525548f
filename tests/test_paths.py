"""Paths recorded in a run or manifest folder (common/data/paths.py): relative to the folder, hub ids kept,
read back after the folders were moved."""

import shutil
from pathlib import Path

from common.data.paths import is_hub_id, record_path, resolve_recorded


def test_paths_are_recorded_relative_and_found_again_after_a_move(tmp_path, monkeypatch):
    for sub in ("project/runs/seg-ade20k/best", "project/runs/mask2img-ade20k", "project/synth/imgsyn-ade20k"):
        (tmp_path / sub).mkdir(parents=True)
    run = tmp_path / "project/runs/seg-ade20k"
    monkeypatch.chdir(tmp_path / "project")
    notes = []
    rec = {"best": record_path(run / "best", run, notes),
           "mask2img": record_path("runs/mask2img-ade20k", run, notes),  # given relative to the current directory
           "synthetic": record_path(Path("synth/imgsyn-ade20k"), "runs/seg-ade20k", notes),
           "base": record_path("stabilityai/stable-diffusion-xl-base-1.0", run, notes)}
    assert rec == {"best": "./best", "mask2img": "../mask2img-ade20k", "synthetic": "../../synth/imgsyn-ade20k",
                   "base": "stabilityai/stable-diffusion-xl-base-1.0"} and notes == []
    shutil.move(tmp_path / "project", tmp_path / "elsewhere")  # copied to another machine / mounted elsewhere
    monkeypatch.chdir(tmp_path)
    moved = tmp_path / "elsewhere/runs/seg-ade20k"
    back = {k: resolve_recorded(v, moved) for k, v in rec.items()}
    assert back["best"] == str(moved / "best") and back["mask2img"] == str(tmp_path / "elsewhere/runs/mask2img-ade20k")
    assert back["synthetic"] == str(tmp_path / "elsewhere/synth/imgsyn-ade20k")
    assert all(Path(back[k]).is_dir() for k in ("best", "mask2img", "synthetic"))
    assert back["base"] == "stabilityai/stable-diffusion-xl-base-1.0"


def test_a_local_folder_named_like_a_hub_id_is_not_taken_for_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run/org/model").mkdir(parents=True)
    assert record_path("run/org/model", "run") == "./org/model"  # not "org/model", which reads as a hub id
    assert resolve_recorded("./org/model", tmp_path / "run") == str(tmp_path / "run/org/model")
    assert resolve_recorded("./org/model", tmp_path / "gone") == str(tmp_path / "gone/org/model")  # missing: still a path
    assert is_hub_id("org/model2") and resolve_recorded("org/model2", tmp_path / "run") == "org/model2"


def test_a_path_sharing_only_the_root_is_recorded_absolute_with_a_note(tmp_path):
    notes = []
    assert record_path("/usr", tmp_path, notes) == "/usr"
    assert len(notes) == 1 and "/usr is recorded as an absolute path" in notes[0]
    assert resolve_recorded("/usr", tmp_path / "moved") == "/usr"


def test_values_recorded_before_relative_paths_still_resolve(tmp_path, monkeypatch):
    """seggen.json written by older runs: absolute, or relative to where the run started."""
    (tmp_path / "runs/mask2img-coco").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_recorded("runs/mask2img-coco", tmp_path / "runs/seg") == "runs/mask2img-coco"
    assert resolve_recorded(str(tmp_path / "runs/mask2img-coco"), "x") == str(tmp_path / "runs/mask2img-coco")
