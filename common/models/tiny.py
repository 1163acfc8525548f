"""Tiny randomly initialised models with the real architectures, fully offline.

    python -m common.models.tiny {sdxl,sd15,controlnet,blip2,mask2former} OUT_DIR

Each writes a folder that loads through the very `from_pretrained` call a real checkpoint takes
(`StableDiffusionXLPipeline`, `StableDiffusionPipeline`, `ControlNetModel`, `Blip2ForConditionalGeneration`
+ `Blip2Processor`, `Mask2FormerForUniversalSegmentation` + `Mask2FormerImageProcessor`), tokenizers
and processors included, so tests and the demo run every stage end to end without a GPU or a
download. Same seed, same weights. The numbers they produce mean nothing; the plumbing is real.

What is kept from the real models: SDXL's two text encoders (hidden states concatenated, the second's
pooled projection), its "text_time" added conditioning, a VAE that downsamples by 8, the real SDXL /
SD-1.5 scheduler configs, a ControlNet made from the UNet, BLIP-2 with a T5 decoder, Mask2Former with a
Swin backbone and ADE20K's 150 classes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

KINDS = ("sdxl", "sd15", "controlnet", "blip2", "mask2former")
from common import ASSETS as _DATA


def _clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A byte-level CLIP BPE tokenizer over single bytes only (CLIP's first 512 vocab entries + specials).

    Every text tokenizes (one token per character), like the real one on words it has no merge for.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())  # the 256 printable stand-ins of the bytes
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + 256 for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n")]
    for m in merges:
        vocab.setdefault("".join(m), len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token=pad_token)


def _clip_text_config(tokenizer, hidden: int, projection: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae():
    from diffusers import AutoencoderKL

    # 4 blocks -> downsampling by 8, like SDXL's VAE; scaling_factor as SDXL's.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        norm_num_groups=8, sample_size=64, scaling_factor=0.13025,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )


def _scheduler(name: str):
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    cfg = json.loads((_DATA / f"{name}_scheduler_config.json").read_text())
    cls = {"EulerDiscreteScheduler": EulerDiscreteScheduler, "PNDMScheduler": PNDMScheduler}[cfg["_class_name"]]
    return cls.from_config(cfg)


def sdxl_unet():
    """SDXL's UNet layout in miniature: cross-attention on both text encoders' hidden states
    (32 + 32 = 64 wide) and text_time added conditioning (pooled 32 + 6 time ids × 8)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=64,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=16,
    )


def tiny_sdxl():
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok, tok_2 = _clip_tokenizer(), _clip_tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!"
    return StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_clip_text_config(tok, 32, 32)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(tok_2, 32, 32)),
        tokenizer=tok, tokenizer_2=tok_2, unet=sdxl_unet(), scheduler=_scheduler("sdxl"),
    )


def tiny_sd15():
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tok = _clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=32, norm_num_groups=16,
    )
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_clip_text_config(tok, 32, 32)), tokenizer=tok, unet=unet,
        scheduler=_scheduler("sd15"), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_controlnet(base: str | Path | None = None):
    """A ControlNet copied from the encoder of the tiny SDXL UNet (or of the UNet in pipeline folder `base`).

    Its conditioning embedding downsamples by 8 (3 strided convs), matching the VAE, so a colour map at
    image resolution meets the latents at their resolution."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet") if base else tiny_sdxl().unet
    torch.manual_seed(1)
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32))


def tiny_blip2():
    """BLIP-2 with a 2-layer ViT, a 2-layer Q-Former (4 queries) and a 2-layer T5 encoder-decoder;
    a Unigram T5 tokenizer over characters and the words of the paper's prompt."""
    import string

    from transformers import (
        Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor, GenerationConfig, T5Tokenizer,
    )

    pieces = ["<pad>", "</s>", "<unk>"] + [f"▁{w}" for w in "Question What are shown in the photo Answer a of".split()]
    pieces += ["▁"] + list(string.ascii_letters + string.digits + string.punctuation)
    tok = T5Tokenizer(vocab=[(p, -float(i)) for i, p in enumerate(pieces)], extra_ids=0)
    num_query_tokens = 4
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok,
        num_query_tokens=num_query_tokens,
    )  # adds the "<image>" token to the tokenizer
    tok = processor.tokenizer
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            encoder_hidden_size=32, vocab_size=len(tok)),
        text_config=dict(model_type="t5", vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=2,
                         num_decoder_layers=2, num_heads=2, decoder_start_token_id=tok.pad_token_id,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id),
        num_query_tokens=num_query_tokens, image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    # Random weights favour <pad>; keep the specials out so that the tiny captions are visible text.
    model.generation_config = GenerationConfig(
        decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        suppress_tokens=[tok.pad_token_id, tok.unk_token_id, config.image_token_index],
    )
    return model, processor


def tiny_mask2former(num_labels: int = 150):
    """Mask2Former with a 4-stage Swin backbone (embed 16), 10 queries, ADE20K's classes by default."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig

    from common.masks.colormap import ade20k_classes

    backbone = SwinConfig(
        image_size=128, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    id2label = {c["train_id"]: c["name"] for c in ade20k_classes()} if num_labels == 150 else {i: str(i) for i in range(num_labels)}
    config = Mask2FormerConfig(
        backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64,
        dim_feedforward=64, encoder_layers=1, decoder_layers=2, num_attention_heads=2, num_queries=10,
        num_labels=num_labels, id2label=id2label, label2id={v: k for k, v in id2label.items()},
        train_num_points=256, common_stride=4,
    )
    torch.manual_seed(0)
    processor = Mask2FormerImageProcessor(size={"height": 128, "width": 128}, ignore_index=255, do_reduce_labels=False)
    return Mask2FormerForUniversalSegmentation(config), processor


def save(kind: str, out_dir: str | Path, base: str | Path | None = None) -> Path:
    """Build the tiny model of `kind` and save it to out_dir with save_pretrained."""
    out_dir = Path(out_dir)
    if kind == "sdxl":
        tiny_sdxl().save_pretrained(out_dir)
    elif kind == "sd15":
        tiny_sd15().save_pretrained(out_dir)
    elif kind == "controlnet":
        tiny_controlnet(base).save_pretrained(out_dir)
    elif kind in ("blip2", "mask2former"):
        model, processor = tiny_blip2() if kind == "blip2" else tiny_mask2former()
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    else:
        raise SystemExit(f"kind must be one of {', '.join(KINDS)} (got {kind!r})")
    return out_dir


def main(argv: list[str]) -> None:
    if len(argv) not in (2, 3) or argv[0] not in KINDS:
        raise SystemExit(
            "usage: python -m common.models.tiny {" + ",".join(KINDS) + "} OUT_DIR [BASE_PIPELINE_DIR]\n"
            "  writes a tiny random model folder; for controlnet, BASE_PIPELINE_DIR (a tiny sdxl folder)\n"
            "  is the UNet to copy, else the tiny SDXL UNet is rebuilt (same seed, same weights)."
        )
    out = save(argv[0], argv[1], argv[2] if len(argv) == 3 else None)
    print(f"wrote tiny {argv[0]} to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
