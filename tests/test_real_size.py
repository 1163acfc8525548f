"""bench/real_size.py: the real-size models built from the shipped configs (parameter counts of the
published checkpoints, on the meta device: no memory), and its CPU smoke setting end to end."""

import sys
from pathlib import Path

import pytest

from common.models import realsize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_the_shipped_configs_build_sdxl_base_and_its_controlnet_at_their_published_sizes():
    models = realsize.sdxl_models(empty=True)
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    # SDXL-base's UNet, VAE and two text encoders as published (stabilityai/stable-diffusion-xl-base-1.0),
    # and diffusers/controlnet-canny-sdxl-1.0's ControlNet
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
                      "controlnet": 1_251_014_160}
    cn = models["controlnet"].config
    assert tuple(cn.conditioning_embedding_out_channels) == (16, 32, 96, 256)  # train_mask2img.py's conditioning embedding
    assert models["unet"].config.cross_attention_dim == 2048 == 768 + 1280  # both text encoders' hidden states


def test_the_shipped_configs_build_caption_py_blip2_and_train_seg_mask2former_at_their_published_sizes():
    from real_size import caption  # the stage script (bench/ has a caption.py too)

    assert caption.PAPER_MODEL == "Salesforce/blip2-flan-t5-xxl"  # the model whose config is shipped
    net, processor = realsize.blip2(empty=True)
    parts = {k: sum(p.numel() for p in getattr(net, k).parameters()) for k in ("vision_model", "qformer", "language_model")}
    # ViT-g (39 layers, 1408 wide), the Q-Former, FlanT5-xxl (shared embedding + its own output head): 48.9 GB of fp32 shards
    assert parts == {"vision_model": 985_952_256, "qformer": 105_137_664, "language_model": 11_135_332_352}
    total = sum(p.numel() for p in net.parameters())
    assert total == 12_229_596_672 and round(total * 4 / 1e9, 1) == 48.9  # the hub's fp32 shards: 48.9 GB
    lm = net.language_model
    assert lm.encoder.embed_tokens.weight is lm.shared.weight and lm.lm_head.weight is not lm.shared.weight
    from PIL import Image

    ids = processor(images=[Image.new("RGB", (64, 48))], text=[caption.PAPER_PROMPT], return_tensors="pt")["input_ids"][0].tolist()
    assert ids[:32] == [32_100] * 32 and len(ids) > 32  # 32 query tokens at the config's image token, then the prompt

    seg, _ = realsize.mask2former(empty=True)  # train_seg.py --data ade20k --backbone swin-l
    assert sum(p.numel() for p in seg.parameters()) == 215_491_851
    assert sum(p.numel() for p in seg.model.pixel_level_module.encoder.parameters()) == 195_204_276  # Swin-L
    assert (seg.config.num_labels, seg.config.num_queries, seg.config.backbone_config.embed_dim) == (150, 100, 192)


def test_smoke_setting_times_every_path(capsys):
    import real_size

    results = real_size.main(["--smoke", "--repeat", "1", "--train-steps", "1"])
    paths = [f"{n} {w}" for n in ("text2mask", "mask2img") for w in ("ours", "diffusers")]
    assert list(results["sampling"]) == paths and list(results["training"]) == paths
    assert list(results["caption"]) == ["caption ours", "caption bare"]
    assert list(results["segmentation"]) == ["segmentation ours", "segmentation bare"]
    assert all(sec > 0 and peak is None for part in results.values() for sec, peak in part.values())  # no GPU: no peak
    out = capsys.readouterr().out
    assert "tiny (smoke) SDXL-base + ControlNet" in out and "ours/diffusers" in out and "training step: 64x64" in out
    assert "caption_images vs bare processor + generate, batch 2" in out and "crop 64, per-GPU batch 2 (recipe: global 16)" in out


def test_gpu_defaults_are_caption_py_and_train_seg_defaults():
    import real_size

    assert (real_size.GPU["caption_batch"], real_size.GPU["max_new_tokens"]) == (16, 30)  # caption.py --batch-size, --max-new-tokens
    assert (real_size.GPU["crop"], real_size.GPU["seg_batch"]) == (640, 16)  # A.3 / Mask2Former's Swin-L res640 recipe
