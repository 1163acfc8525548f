"""bench/real_size.py: the real-size models built from the shipped configs (parameter counts of the
published checkpoints, on the meta device: no memory), and its CPU smoke setting end to end."""

import sys
from pathlib import Path

import pytest

from common import realsize

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


def test_smoke_setting_times_every_path(capsys):
    import real_size

    results = real_size.main(["--smoke", "--repeat", "1", "--train-steps", "1"])
    paths = [f"{n} {w}" for n in ("text2mask", "mask2img") for w in ("ours", "diffusers")]
    assert list(results["sampling"]) == paths and list(results["training"]) == paths
    assert all(sec > 0 and peak is None for part in results.values() for sec, peak in part.values())  # no GPU: no peak
    out = capsys.readouterr().out
    assert "tiny (smoke) SDXL-base + ControlNet" in out and "ours/diffusers" in out and "training step: 64x64" in out
