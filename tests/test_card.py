"""common/report/card.py: README.md model cards in the form of diffusers' example trainers (YAML front matter
read back by huggingface_hub), on run folders laid out as the trainers leave them."""

import json

import pytest
from huggingface_hub import ModelCard
from PIL import Image

from common import SegGenError
from common.report import card


def generator_run(run, stage="text2mask", base="stabilityai/stable-diffusion-xl-base-1.0"):
    """A finished train_text2mask.py / train_mask2img.py folder: seggen.json, options.json, stats.jsonl, validation/."""
    (run / "validation").mkdir(parents=True)
    for step in (2, 4):
        Image.new("RGB", (16, 8), (step * 20, 0, 0)).save(run / f"validation/step-{step:06d}.png")
    (run / "seggen.json").write_text(json.dumps({"stage": stage, "base": base, "data": "ade20k", "palette": "palette.json",
                                                 "resolution": 64, "steps": 4, "is_sdxl": True}))
    (run / "options.json").write_text(json.dumps({"data": "ade20k", "split": "train", "captions": "captions/ade20k_train.jsonl",
                                                  "learning_rate": 1e-5, "max_steps": 4}))
    (run / "stats.jsonl").write_text('{"step": 2, "loss": 0.5}\n{"step": 4, "loss": 0.4}\n')
    return run


def test_generator_card_has_front_matter_base_steps_options_image_and_citation(tmp_path):
    run = generator_run(tmp_path / "text2mask-ade20k")
    path = card.card_for_run(run)
    assert path == run / "README.md"
    c = ModelCard.load(path)  # the Hub's parser reads the front matter back
    assert c.data.license == "openrail++" and c.data.base_model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert c.data.library_name == "diffusers" and {"stable-diffusion-xl", "text2mask", "diffusers-training"} <= set(c.data.tags)
    text = path.read_text()
    assert "**4** steps" in text and "**ade20k**" in text and '"learning_rate": 1e-05' in text
    assert "![validation](validation/step-000004.png)" in text  # the last validation grid, linked in place
    assert "arXiv:2311.03355" in text and "DiffusionPipeline.from_pretrained" in text


def test_controlnet_card_and_a_local_base_gets_no_hub_id(tmp_path):
    base = tmp_path / "toybase"
    base.mkdir()
    run = generator_run(tmp_path / "mask2img-toy", stage="mask2img", base=str(base))
    c = ModelCard.load(card.card_for_run(run))
    assert "controlnet" in c.data.tags and c.data.base_model is None and c.data.license == "other"
    assert "placeholder" in c.text and "ControlNetModel.from_pretrained" in c.text


def test_seg_run_card_goes_into_model_with_metrics(tmp_path):
    run = tmp_path / "seg-ade20k-aug"
    (run / "model").mkdir(parents=True)
    (run / "options.json").write_text(json.dumps({"data": "ade20k", "strategy": "aug", "model": "facebook/mask2former-swin-tiny-ade-semantic",
                                                  "synthetic": ["synth/imgsyn-ade20k"], "max_steps": 10}))
    (run / "metrics.json").write_text(json.dumps({"data": "ade20k", "phases": [{"name": "mix", "p_aug": 0.6, "steps": 10}],
                                                  "semantic": {"mIoU": 41.25, "aAcc": 80.5}}))
    path = card.card_for_run(run)
    assert path == run / "model/README.md"
    c = ModelCard.load(path)
    assert c.data.library_name == "transformers" and c.data.pipeline_tag == "image-segmentation"
    assert c.data.base_model == "facebook/mask2former-swin-tiny-ade-semantic"
    assert "| semantic/mIoU | 41.25 |" in c.text and "**10** steps" in c.text and "synth/imgsyn-ade20k" in c.text


def test_write_model_card_copies_an_outside_image_and_names_bad_input(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    shot = tmp_path / "grid.png"
    Image.new("RGB", (4, 4)).save(shot)
    path = card.write_model_card(folder, stage="seg", base=None, data="coco", steps=3, options={}, validation_image=shot)
    assert (folder / "validation.png").is_file() and "![validation](validation.png)" in path.read_text()
    with pytest.raises(SegGenError, match="stage must be one of"):
        card.write_model_card(folder, stage="nope", base=None, data="coco", steps=3, options={})
    with pytest.raises(SegGenError, match="not a finished run"):
        card.card_for_run(tmp_path / "empty")
    assert card.main([str(tmp_path / "empty")]) == 2
