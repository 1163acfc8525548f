"""predict.py: a trained segmenter (a tiny HRNet saved by hrnet.save, the tiny Mask2Former) on the real
ADE20K images of tests/data: label PNGs in the ADE20K convention, overlays, resume, errors naming the flag."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from common.seg import hrnet
from common.seg import model as segmodel
from common.masks.colormap import ade20k_classes
from common.data.datasets import load_image
from conftest import ADE_ROOT, invoke

IMAGES = ADE_ROOT / "ADEChallengeData2016" / "images"  # training/ and validation/: 3 images


def cli(argv):
    import typer

    app = typer.Typer()
    app.command()(predict.main)
    return invoke(app, [str(a) for a in argv])


@pytest.fixture(scope="module")
def tiny_hrnet(tmp_path_factory):
    torch.manual_seed(0)
    model, _ = hrnet.build("small", 150, "none")
    folder = hrnet.save(model.eval(), tmp_path_factory.mktemp("hrnet") / "model")
    segmodel.Normalize().save_pretrained(folder)  # as train_seg's save_model writes it
    return folder


@pytest.mark.parametrize("kind", ["hrnet", "mask2former"])
def test_labels_are_the_segmenters_argmax_plus_one_with_overlays(kind, tiny_hrnet, tiny_models, tmp_path):
    ckpt = tiny_hrnet if kind == "hrnet" else tiny_models("mask2former")
    r = cli(["--checkpoint", ckpt, "--images", IMAGES, "--out", tmp_path, "--size", "64"])
    assert r.exit_code == 0, r.output
    assert "predicted 3, skipped 0" in r.output
    seg = segmodel.load_segmenter(ckpt, 150)
    for f in sorted(IMAGES.rglob("*.jpg")):
        rel = f.relative_to(IMAGES).with_suffix(".png")
        label = Image.open(tmp_path / "labels" / rel)
        image = load_image(f)
        assert label.mode == "L" and label.size == image.size  # 8-bit, at the original resolution
        x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()
        x = (x - seg.mean) / seg.std
        expect = segmodel.semantic_scores(seg.model, x, 64).argmax(0).numpy() + 1  # train id + 1
        got = np.asarray(label)
        assert (got == expect).mean() > 0.999 and got.min() >= 1 and got.max() <= 150
        over = np.asarray(Image.open(tmp_path / "overlays" / rel)).astype(int)
        colours = np.array([c["rgb"] for c in sorted(ade20k_classes(), key=lambda c: c["png_value"])])  # the usual colours
        blend = np.round(0.5 * np.asarray(image) + 0.5 * colours[got - 1]).astype(int)
        assert np.abs(over - blend).max() <= 1


def test_a_rerun_skips_finished_images_and_redoes_a_missing_one(tiny_hrnet, tmp_path):
    images = tmp_path / "imgs"
    shutil.copytree(IMAGES, images)
    args = ["--checkpoint", tiny_hrnet, "--images", images, "--out", tmp_path / "out", "--size", "64"]
    assert cli(args).exit_code == 0
    labels = sorted((tmp_path / "out/labels").rglob("*.png"))
    before = {p: p.read_bytes() for p in labels}
    (tmp_path / "out/overlays/validation/ADE_val_00000001.png").unlink()
    r = cli(args)
    assert r.exit_code == 0 and "predicted 1, skipped 2" in r.output
    assert {p: p.read_bytes() for p in labels} == before and (tmp_path / "out/overlays/validation/ADE_val_00000001.png").is_file()


@pytest.mark.parametrize("case, message", [
    ("no_model", "--checkpoint .*nope: no config.json"),
    ("no_images", "--images .*empty: no images there"),
    ("classes", "--checkpoint .* predicts 150 classes, but --data coco has 133"),
    ("small", "Invalid value for '--size': .*64"),
])
def test_bad_inputs_name_the_flag(case, message, tiny_hrnet, tmp_path):
    import re

    (tmp_path / "empty").mkdir()
    args = {"no_model": ["--checkpoint", tmp_path / "nope", "--images", IMAGES],
            "no_images": ["--checkpoint", tiny_hrnet, "--images", tmp_path / "empty"],
            "classes": ["--checkpoint", tiny_hrnet, "--images", IMAGES, "--data", "coco"],
            "small": ["--checkpoint", tiny_hrnet, "--images", IMAGES, "--size", "32"]}[case]
    r = cli([*args, "--out", tmp_path / "out"])
    assert r.exit_code == 2 and re.search(message, " ".join(r.output.split())), r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, message", [
    ("out_is_a_file", "--out .*taken is a file; pass a folder"),
    ("out_inside_images", "--out .*imgs/preds is inside --images .*imgs: the next run would segment its own outputs"),
    ("one_stem_twice", "ADE_val_00000001.jpg and .*ADE_val_00000001.png would both write labels/validation/ADE_val_00000001.png"),
])
def test_outputs_that_would_clobber_are_refused_before_any_work(case, message, tiny_hrnet, tmp_path):
    """Nothing is written: --out a file, --out inside --images (a rerun would segment its own outputs), two
    images whose outputs share a name (X.jpg and X.png)."""
    import re

    images = tmp_path / "imgs"
    shutil.copytree(IMAGES, images)
    out = {"out_is_a_file": tmp_path / "taken", "out_inside_images": images / "preds", "one_stem_twice": tmp_path / "out"}[case]
    if case == "out_is_a_file":
        out.write_text("not a folder")
    if case == "one_stem_twice":
        load_image(images / "validation/ADE_val_00000001.jpg").save(images / "validation/ADE_val_00000001.png")
    before = sorted(p for p in tmp_path.rglob("*"))
    r = cli(["--checkpoint", tiny_hrnet, "--images", images, "--out", out, "--size", "64"])
    assert r.exit_code == 2 and re.search(message, " ".join(r.output.split())), r.output
    assert sorted(p for p in tmp_path.rglob("*")) == before
