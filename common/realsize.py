"""Real-size SDXL-base + ControlNet with random weights, from the published configs shipped in
common/data/configs/ (no download): what bench/real_size.py times on a GPU before any checkpoint exists.

The configs are the hub's files verbatim (common/data/SOURCES.md): SDXL-base's UNet (2,567,463,684
parameters), VAE (83,653,863), CLIP ViT-L and OpenCLIP bigG text encoders (123,060,480 and 694,659,840),
and diffusers/controlnet-canny-sdxl-1.0's ControlNet (1,251,014,160), whose conditioning embedding is the
one train_mask2img.py makes (16, 32, 96, 256). The tokenizers are common/tiny.py's byte-level CLIP BPE
(token ids are all a text encoder sees; their values do not change the cost), so no vocabulary is shipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIGS = Path(__file__).parent / "data" / "configs"


def config(name: str) -> dict:
    """A shipped config: "sdxl_base/unet", "sdxl_base/vae", "sdxl_base/text_encoder", "sdxl_base/text_encoder_2",
    "controlnet_sdxl"."""
    return json.loads((CONFIGS / f"{name}.json").read_text())


def sdxl_models(device="cpu", dtype: torch.dtype = torch.float32, empty: bool = False) -> dict:
    """{"unet", "vae", "text_encoder", "text_encoder_2", "controlnet"} at SDXL-base's real size, random
    weights made directly on `device` (empty=True: on the meta device, no memory, to count parameters)."""
    from contextlib import nullcontext

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text(name):
        return CLIPTextConfig.from_dict({k: v for k, v in config(f"sdxl_base/{name}").items() if not k.startswith("_")})

    torch.manual_seed(0)
    with init_empty_weights() if empty else torch.device(device) if device != "cpu" else nullcontext():
        models = {
            "unet": UNet2DConditionModel.from_config(config("sdxl_base/unet")),
            "vae": AutoencoderKL.from_config(config("sdxl_base/vae")),
            "text_encoder": CLIPTextModel(text("text_encoder")),
            "text_encoder_2": CLIPTextModelWithProjection(text("text_encoder_2")),
            "controlnet": ControlNetModel.from_config(config("controlnet_sdxl")),
        }
    if not empty:
        for m in models.values():
            m.to(device, dtype).eval().requires_grad_(False)
    return models


def tiny_models() -> dict:
    """The same five models at common/tiny.py's size (the CPU smoke setting)."""
    from common import tiny

    pipe = tiny.tiny_sdxl()
    return {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2,
            "controlnet": tiny.tiny_controlnet()}


def pipelines(models: dict) -> tuple:
    """(StableDiffusionXLPipeline, StableDiffusionXLControlNetPipeline) over the same modules, with SDXL's
    scheduler config and common/tiny.py's tokenizers; no watermarker."""
    from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

    from common import tiny

    parts = dict(vae=models["vae"], text_encoder=models["text_encoder"], text_encoder_2=models["text_encoder_2"],
                 tokenizer=tiny._clip_tokenizer(), tokenizer_2=tiny._clip_tokenizer(pad_token="!"), unet=models["unet"],
                 scheduler=tiny._scheduler("sdxl"))
    text2img = StableDiffusionXLPipeline(**parts, add_watermarker=False)
    control = StableDiffusionXLControlNetPipeline(**parts, controlnet=models["controlnet"], add_watermarker=False)
    for p in (text2img, control):
        p.set_progress_bar_config(disable=True)
    return text2img, control


def scheduler_config() -> dict:
    """SDXL-base's scheduler config (shipped verbatim): what the trainers' DDPMScheduler is made from."""
    return json.loads((CONFIGS.parent / "sdxl_scheduler_config.json").read_text())
