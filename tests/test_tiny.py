"""Each tiny model saves, reloads through the real from_pretrained path, and runs a forward pass."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ADE_ROOT, ROOT
from PIL import Image

from common.data.datasets import load_image, load_label, read_dataset

SAMPLE = read_dataset("ade20k", ADE_ROOT, "val")[0]


def test_command_line_writes_a_loadable_folder(tmp_path):
    out = tmp_path / "sdxl"
    run = subprocess.run([sys.executable, "-m", "common.models.tiny", "sdxl", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (out / "model_index.json").is_file() and (out / "unet" / "config.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "common.models.tiny", "sdxxl", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "usage: python -m common.models.tiny {sdxl,sd15,controlnet,blip2,mask2former}" in bad.stderr


def test_sdxl_pipeline_samples(tiny_models):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models("sdxl"))
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.tokenizer_2.pad_token == "!"
    img = pipe("a bedroom with a bed", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()


def test_sd15_pipeline_samples(tiny_models):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models("sd15"))
    img = pipe("a street", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert img.shape == (1, 64, 64, 3)


def test_controlnet_conditions_the_sdxl_unet(tiny_models):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

    from common.masks.colormap import label_to_color, palette_for, resize_nearest

    base = StableDiffusionXLPipeline.from_pretrained(tiny_models("sdxl"))
    controlnet = ControlNetModel.from_pretrained(tiny_models("controlnet"))
    pipe = StableDiffusionXLControlNetPipeline(**base.components, controlnet=controlnet)
    cmap = resize_nearest(label_to_color(load_label(SAMPLE, "ade20k"), palette_for("ade20k")), (64, 64))
    img = pipe("a room", image=Image.fromarray(cmap), num_inference_steps=2, height=64, width=64, output_type="np").images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()


def test_blip2_captions_a_real_image(tiny_models):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    model = Blip2ForConditionalGeneration.from_pretrained(tiny_models("blip2"))
    processor = Blip2Processor.from_pretrained(tiny_models("blip2"))
    inputs = processor(images=[load_image(SAMPLE.image)], text=["Question: What are shown in the photo? Answer:"],
                       return_tensors="pt")
    model.generation_config.max_new_tokens = 5
    out = model.generate(**inputs, generation_config=model.generation_config)
    text = processor.batch_decode(out, skip_special_tokens=True)
    assert len(text) == 1 and len(text[0].strip()) > 0  # visible text, not only special tokens


def test_mask2former_trains_on_a_real_label(tiny_models):
    from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    model = Mask2FormerForUniversalSegmentation.from_pretrained(tiny_models("mask2former"))
    processor = Mask2FormerImageProcessor.from_pretrained(tiny_models("mask2former"))
    assert model.config.num_labels == 150 and model.config.id2label[0] == "wall"
    label = load_label(SAMPLE, "ade20k").astype(np.int64) - 1  # ADE20K: 0 -> ignore, classes 0..149
    label[label < 0] = 255
    batch = processor(images=[np.asarray(load_image(SAMPLE.image))], segmentation_maps=[label.astype(np.uint8)],
                      return_tensors="pt")
    out = model(pixel_values=batch["pixel_values"], mask_labels=batch["mask_labels"], class_labels=batch["class_labels"])
    assert torch.isfinite(out.loss)
    out.loss.backward()


@pytest.mark.parametrize("kind", ["sdxl", "controlnet"])
def test_same_seed_same_weights(tiny_models, tmp_path, kind):
    from common.models import tiny

    again = tiny.save(kind, tmp_path / kind, tiny_models("sdxl") if kind == "controlnet" else None)
    from safetensors.torch import load_file

    sub = "unet/diffusion_pytorch_model.safetensors" if kind == "sdxl" else "diffusion_pytorch_model.safetensors"
    a, b = load_file(tiny_models(kind) / sub), load_file(again / sub)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
