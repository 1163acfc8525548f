"""Issue 24, item 4: would a sharper VAE give the synthetic rows room to gain? VAEs only, no UNet.

    python bench/toy_vae_probe.py WORLD OUT VARIANT...      # WORLD: the base's 2000-image world

Each VARIANT trains the toy base's VAE (common/toy/base.py train_vae: same loss, data, seed and batches) with
other widths, latent channels or steps, and saves it as OUT/VARIANT/vae (a folder bench/toy.py oracle --vae
reads), with OUT/VARIANT/probe.json: held-out reconstruction (MAE, PSNR), the colour-map round trip, the
scaling factor, wall and CPU seconds. VARIANT names read as [f4-]lat{C}-w{W}-s{STEPS}: C latent channels, block
widths W·(1, 2, 4, 4) (the shipped base is lat4-w8-s1500) or, with f4-, W·(1, 2, 4) (factor 4: 16x16 latents),
STEPS training steps.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import torch
from rich.progress import Progress

from common.toy.base import (BaseConfig, _vae, load_maps, load_world, map_roundtrip, reconstruction_error, set_scaling_factor,
                             train_vae)


def config(name: str) -> BaseConfig:
    m = re.fullmatch(r"(f4-)?lat(\d+)-w(\d+)-s(\d+)", name)
    if not m:
        sys.exit(f"bench/toy_vae_probe.py: variant {name!r} is not [f4-]lat{{C}}-w{{W}}-s{{STEPS}}, e.g. lat16-w8-s1500")
    c, w, steps = map(int, m.groups()[1:])
    blocks = (1, 2, 4) if m[1] else (1, 2, 4, 4)  # f4-: three blocks, downsampling by 4 (16x16 latents)
    return BaseConfig(vae_latent_channels=c, vae_channels=tuple(w * b for b in blocks), vae_steps=steps)


def probe(world: Path, out: Path, name: str) -> dict:
    cfg = config(name)
    images, _ = load_world(world, "train")
    maps, _ = load_maps(world, "train")
    val_images, _ = load_world(world, "val")
    val_maps, val_labels = load_maps(world, "val")
    torch.manual_seed(cfg.seed)
    vae = _vae(cfg.vae_channels, logvar_init=cfg.vae_logvar_init, groups=cfg.vae_groups, latent_channels=cfg.vae_latent_channels)
    t, cpu = time.perf_counter(), time.process_time()
    with Progress() as progress:
        losses = train_vae(vae, images, maps, cfg, progress)
    record = {"variant": name, "config": {k: v for k, v in vars(cfg).items() if k.startswith("vae")},
              "seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - cpu,
              "torch_threads": torch.get_num_threads(), "loss_last100": sum(losses[-100:]) / 100}
    vae.eval().requires_grad_(False)
    set_scaling_factor(vae, images)  # as common/toy/base.py build
    record["reconstruction_val"] = reconstruction_error(vae, val_images)
    record["colormaps_val"] = map_roundtrip(vae, val_maps, val_labels)
    vae.save_pretrained(out / name / "vae")
    (out / name / "probe.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    world, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)  # one thread: the fastest for these tiny models on 2 cores (common/toy/base.py)
    for name in sys.argv[3:]:
        r = probe(world, out, name)
        print(f"{name}: {r['seconds']:.0f} s; val images PSNR {r['reconstruction_val']['psnr_db']:.2f} dB, "
              f"MAE {r['reconstruction_val']['mae_255']:.1f}; maps PSNR {r['colormaps_val']['psnr_db']:.2f} dB, "
              f"{r['colormaps_val']['off_palette']:.1%} off the palette")
