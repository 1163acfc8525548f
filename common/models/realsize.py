"""Real-size SDXL-base + ControlNet with random weights, from the published configs shipped in
common/assets/configs/ (no download): what bench/real_size.py times on a GPU before any checkpoint exists.

The configs are the hub's files verbatim (common/assets/SOURCES.md): SDXL-base's UNet (2,567,463,684
parameters), VAE (83,653,863), CLIP ViT-L and OpenCLIP bigG text encoders (123,060,480 and 694,659,840),
and diffusers/controlnet-canny-sdxl-1.0's ControlNet (1,251,014,160), whose conditioning embedding is the
one train_mask2img.py makes (16, 32, 96, 256). The tokenizers are common/models/tiny.py's byte-level CLIP BPE
(token ids are all a text encoder sees; their values do not change the cost), so no vocabulary is shipped.

Also caption.py's BLIP-2 (Salesforce/blip2-flan-t5-xxl, 12,229,596,672 parameters: ViT-g, Q-Former,
FlanT5-xxl with its own output head) and train_seg.py's paper segmenter (Mask2Former Swin-L, ADE20K
semantic, 215,491,851 parameters), the latter as train_seg builds it (build_model in common/seg/model.py, from
the config in common/assets/SOURCES_mask2former.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common import ASSETS

CONFIGS = ASSETS / "configs"


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
    """The same five models at common/models/tiny.py's size (the CPU smoke setting)."""
    from common.models import tiny

    pipe = tiny.tiny_sdxl()
    return {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2,
            "controlnet": tiny.tiny_controlnet()}


def pipelines(models: dict) -> tuple:
    """(StableDiffusionXLPipeline, StableDiffusionXLControlNetPipeline) over the same modules, with SDXL's
    scheduler config and common/models/tiny.py's tokenizers; no watermarker."""
    from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

    from common.models import tiny

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


# ---------------------------------------------------------------- BLIP-2 (caption.py) and Mask2Former (train_seg.py)

def blip2(device="cpu", dtype: torch.dtype = torch.float32, empty: bool = False):
    """(Blip2ForConditionalGeneration, Blip2Processor) at Salesforce/blip2-flan-t5-xxl's real size, random
    weights made directly on `device` in `dtype` (24 GB in bf16; empty=True: on the meta device).

    The encoder's and decoder's token embeddings are the shared one and the output head is separate, as
    in the published checkpoint (transformers 5 builds T5 with three separate embeddings, or with
    tie_weights() ties the head too). The processor is BLIP-2's: 224 px input, CLIP's mean / std, 32
    query tokens, and a T5 tokenizer of FlanT5's size (32,000 pieces + 100 sentinels, "<image>" = 32,100 as
    the config says) whose pieces are characters and the words of caption.py's prompt (no vocabulary is
    shipped; the prompt is 12 tokens either way)."""
    import string

    from accelerate import init_empty_weights
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor, T5Tokenizer
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    cfg = Blip2Config.from_dict(config("blip2_flan_t5_xxl"))
    torch.manual_seed(0)
    with init_empty_weights() if empty else torch.device(device):
        net = Blip2ForConditionalGeneration._from_config(cfg, dtype=dtype)
    lm = net.language_model
    lm.set_input_embeddings(lm.shared)  # encoder / decoder embed_tokens = shared (the checkpoint's layout)
    pieces = ["<pad>", "</s>", "<unk>"] + [f"▁{w}" for w in "Question What are shown in the photo Answer a of".split()]
    pieces += ["▁"] + list(string.ascii_letters + string.digits + string.punctuation)
    pieces += [f"▁w{i}" for i in range(32_000 - len(pieces))]  # fillers up to FlanT5's SentencePiece size
    tokenizer = T5Tokenizer(vocab=[(p, -float(i)) for i, p in enumerate(pieces)], extra_ids=100)
    images = BlipImageProcessor(size={"height": 224, "width": 224}, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                                resample=3)  # bicubic
    processor = Blip2Processor(image_processor=images, tokenizer=tokenizer, num_query_tokens=cfg.num_query_tokens)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == cfg.image_token_index
    return (net if empty else net.eval().requires_grad_(False)), processor


def mask2former(empty: bool = False):
    """(Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor): train_seg.py's paper model
    (--data ade20k --backbone swin-l: Swin-L IN21k-384, 150 classes, 100 queries), random weights, on the
    CPU in fp32 as train_seg builds it (empty=True: on the meta device)."""
    from contextlib import nullcontext

    from accelerate import init_empty_weights

    from common.seg.model import Backbone, build_model

    with init_empty_weights() if empty else nullcontext():
        return build_model(None, Backbone.swin_l, "ade20k")
