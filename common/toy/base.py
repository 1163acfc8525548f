"""A pretrained base for the toy world, standing in for SDXL-base (issue 12).

    python -m common.toy.world WORLD --train 2000 --val 200 --seed 0
    python -m common.toy.base OUT --world WORLD --threads 1     # ~27 min on one core
    python -m common.toy.base OUT --world WORLD --quick         # seconds: a smoke build for tests

The paper fine-tunes a pretrained SDXL; on 2 CPU cores there is none, so this builds one, and
common/assets/toybase/ ships the result (10 MB, made by the commands above on the 2000-image world; its
toybase.json records the command, settings, losses and timings), so the toy preset starts from it as the
paper starts from SDXL. It is the tiny SDXL-architecture pipeline of common/models/tiny.py (two CLIP text
encoders, "text_time" conditioning, a VAE with 4 latent channels downsampling by 8, SDXL's scheduler):
1. word-level tokenizers (`word_tokenizer`: each caption word one token, as in CLIP's vocabulary) and
   random text encoders sized to them, frozen, as the paper keeps SDXL's text encoders frozen;
2. its VAE trained as an autoencoder on the world's training images and, half of each batch, their
   colour maps in the generation palette (a Text2Mask map comes out through this decoder), with L1 +
   a small KL term, as the Stable Diffusion autoencoders without their perceptual/GAN terms, and
   `scaling_factor` set to 1 / std of the latents, the rule by which SD's 0.18215 was chosen;
3. its UNet trained text-to-image on the same images with the world's captions: ε-prediction at a
   uniform timestep of SDXL's DDPM schedule, 10% of captions dropped to SDXL's zeroed unconditional
   embedding, so classifier-free guidance works as with the real base.
Measured (docs/toy-results.md): GroupNorm with one channel per group (8 groups on 8 channels) left 31% of
colour-map pixels off the palette after 300 VAE steps, 4 channels per group 17%; the VAE shipped before
issue 24's second session (blocks 8, 16, 32, 32; 1500 steps) left 5.6%, the shipped one (blocks 16, 32, 64,
64; 3000 steps) 2.3%, and the demo's generators on it met both demo marks (docs/toy-results.md).
`--vae-factor 4` gives 16x16 latents (a UNet step then costs ~3x more). The result is written with
save_pretrained, so `--pretrained OUT` loads it like any pipeline folder. Same world, same seed, same
settings give the same weights (on one machine; float reductions may differ across CPUs).
OUT/toybase.json records the settings, losses, timings (wall and CPU), the VAE's held-out
reconstruction error and its colour-map round trip (PSNR, pixels read back as their class, off-palette),
and whether the UNet reads its captions (held-out ε-MSE with its own captions vs shuffled ones);
OUT/samples.png shows the base sampled for validation captions beside the real images.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from common import SegGenError

console = Console(stderr=True, soft_wrap=True)


@dataclass
class BaseConfig:
    """The shipped base's settings: it took 1263 s for the VAE and 364 s for the UNet with one thread, 1493 CPU-s
    in all, load 1-4 (common/assets/toybase/toybase.json). The VAE's width and steps were doubled in issue 24
    (from 8, 16, 32, 32 and 1500 steps): held-out PSNR 18.6 -> 20.5 dB, colour maps off the palette 5.6% -> 2.3%."""

    vae_steps: int = 3000  # AdamW steps on batches of vae_batch images
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_map_share: float = 0.5  # share of each VAE batch that is colour maps (generation palette), not images:
    # Text2Mask's maps come out through this decoder (issue 12: off-palette share ≤ 10%)
    vae_kl: float = 1e-6  # weight of KL(q(z|x) || N(0, I)) per latent element, as SD's autoencoder configs
    vae_logvar_init: float = -6.0  # the posterior starts narrow (std 0.05, not 1): at weight 1e-6 the KL term
    # takes far longer than a few hundred steps to shrink a unit-std posterior, whose noise then caps
    # what the latents carry (measured: L1 0.426 vs 0.453 after 100 steps, same seed and batches)
    vae_channels: tuple[int, ...] = (16, 32, 64, 64)  # 4 blocks: downsampling by 8, as SDXL's VAE (FACTORS at width 16)
    vae_latent_channels: int = 4  # SDXL's 4; SD3 and FLUX use 16 to keep fine detail, but a UNet of this size
    # trained as long draws no scenes on 16 (measured in docs/toy-results.md: its generators lost twice as much)
    unet_steps: int = 2500
    unet_batch: int = 32
    unet_lr: float = 1e-3
    vae_groups: int = 2  # GroupNorm groups in every VAE block: 4+ channels per group. With 8 groups on 8 channels
    # (one channel per group: instance norm) a flat colour map loses its colour in the first block (measured
    # at 300 steps: 31% of map pixels off the palette with 8 groups, 17% with 2)
    unet_channels: tuple[int, ...] = (32, 64)  # common/models/tiny.py's SDXL-layout UNet
    unet_groups: int = 8  # GroupNorm groups in the UNet: 4+ channels per group, as above
    caption_dropout: float = 0.1  # share of captions replaced by the zeroed unconditional embedding
    sample_steps: int = 20  # Heun steps of the samples.png check
    seed: int = 0

    @classmethod
    def quick(cls) -> BaseConfig:
        """A smoke build for tests: the same code path in a few seconds; the model learns nothing useful."""
        return cls(vae_steps=3, vae_batch=4, unet_steps=3, unet_batch=4, sample_steps=2)


# --vae-factor -> (VAE block channels at --vae-width 8, UNet block channels). Measured one-thread CPU-s per training step
# (VAE batch 16, UNet batch 32, under load): factor 8 VAE 0.32, UNet (32, 64) on 8x8 0.21; factor 4 VAE 0.30,
# UNet (32, 64) on 16x16 0.56-1.26 (a (16, 32) UNet, 0.36-0.67, drew no scenes after 600 steps).
FACTORS = {8: ((8, 16, 32, 32), (32, 64)), 4: ((8, 16, 32), (32, 64))}


def _vae(channels, logvar_init: float = 0.0, groups: int = 2, latent_channels: int = 4):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=tuple(channels), layers_per_block=1,
        norm_num_groups=groups, sample_size=64, scaling_factor=1.0,
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
    )
    with torch.no_grad():  # quant_conv's output is (mean, logvar) along channels (DiagonalGaussianDistribution)
        vae.quant_conv.bias[vae.config.latent_channels:] = logvar_init
    return vae


def word_tokenizer(texts: list[str], pad_token: str = "<|endoftext|>"):
    """A CLIP BPE tokenizer that reads each word of `texts` as one token, as CLIP's 49k-entry vocabulary
    reads common words; the byte-level one of common/models/tiny.py reads one token per character, and a UNet
    cross-attending to random frozen encodings of characters barely learns to read them (measured:
    held-out ε-MSE 0.13541 with its own captions, 0.13546 shuffled).

    It is common/models/tiny.py's tokenizer plus, per word, the merges that join its characters left to right,
    each appended after all earlier merges, so adding a word never changes how an earlier one splits."""
    import json
    import re

    from transformers import CLIPTokenizer

    from common.models.tiny import _clip_tokenizer

    base = _clip_tokenizer(pad_token)
    vocab = dict(base.get_vocab())
    merges = json.loads(base.backend_tokenizer.to_str())["model"]["merges"]  # [[left, right], ...] by rank
    ranks = {tuple(m): r for r, m in enumerate(merges)}  # the lowest present pair merges first

    def bpe(word: str) -> list[str]:  # CLIP's merge loop on one lowercase word
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(ranks.get(p, len(ranks) + 1), i) for i, p in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank > len(ranks):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    for word in sorted({w for t in texts for w in re.findall(r"[a-z]+", t.lower())}):
        while len(parts := bpe(word)) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            vocab.setdefault(parts[0] + parts[1], len(vocab))
    merges = sorted(ranks, key=ranks.get)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token=pad_token)


def vae_factor(channels) -> int:
    """How much a VAE with these blocks downsamples (each block but the last halves the side)."""
    return 2 ** (len(channels) - 1)


def _unet(channels, latent_size: int, groups: int = 8, latent_channels: int = 4):
    from diffusers import UNet2DConditionModel

    from common.models.tiny import sdxl_unet

    unet = sdxl_unet()
    return UNet2DConditionModel.from_config(unet.config, block_out_channels=tuple(channels), sample_size=latent_size,
                                            norm_num_groups=groups, in_channels=latent_channels, out_channels=latent_channels)


def load_world(world: Path, split: str) -> tuple[torch.Tensor, list[str]]:
    """(N, 3, 64, 64) float images in [-1, 1] and their captions, from a toy world folder."""
    from PIL import Image

    from common.data.datasets import read_dataset
    from common.diffusion.training import read_captions

    captions = Path(world) / f"captions_{split}.jsonl"
    samples, texts = read_captions(captions, read_dataset("toy", world, split))
    images = np.stack([np.asarray(Image.open(s.image).convert("RGB")) for s in samples])  # (N, H, W, 3) uint8
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, texts


def load_maps(world: Path, split: str) -> tuple[torch.Tensor, np.ndarray]:
    """(N, 3, 64, 64) colour maps in [-1, 1], painted as the trainers paint them (common/diffusion/training.py
    render_colormap, the generation palette), and the (N, 64, 64) uint8 labels they were painted from."""
    from common.masks.colormap import label_to_color, palette_for
    from common.data.datasets import load_label, read_dataset

    labels = np.stack([load_label(s, "toy") for s in read_dataset("toy", world, split)])  # (N, H, W)
    maps = label_to_color(labels, palette_for("toy"))  # (N, H, W, 3) uint8
    return torch.from_numpy(maps).permute(0, 3, 1, 2).float() / 127.5 - 1, labels


@torch.no_grad()
def _roundtrip(vae, x: torch.Tensor, batch: int = 100) -> torch.Tensor:
    """decode(encode(x)) with the posterior mean, clamped to [-1, 1]."""
    return torch.cat([vae.decode(vae.encode(x[i:i + batch]).latent_dist.mode()).sample.clamp(-1, 1)
                      for i in range(0, len(x), batch)])


def reconstruction_error(vae, images: torch.Tensor, batch: int = 100) -> dict:
    """decode(encode(x)) with the posterior mean: mean absolute error in 0..255 and PSNR in dB."""
    y = _roundtrip(vae, images, batch)
    mse = ((y - images) / 2).pow(2).mean()
    return {"mae_255": float((y - images).abs().mean() * 127.5), "psnr_db": float(-10 * torch.log10(mse))}


def map_roundtrip(vae, maps: torch.Tensor, labels: np.ndarray) -> dict:
    """The colour maps through the VAE as a Text2Mask map comes out (paper A.7): PSNR in dB, the share of
    pixels read back (nearest palette colour) as their own class, and the share off the palette (farther
    than half the palette's closest pair, train_text2mask's threshold)."""
    from common.masks.colormap import IGNORE, color_to_label, palette_for

    palette = palette_for("toy")
    y = _roundtrip(vae, maps)
    mse = ((y - maps) / 2).pow(2).mean()
    out = ((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # (N, H, W, 3) uint8, as decoded pictures
    right = np.mean([(color_to_label(m, palette) == t).mean() for m, t in zip(out, labels)])
    off = np.mean([(color_to_label(m, palette, max_distance=palette.min_distance() / 2) == IGNORE).mean() for m in out])
    return {"psnr_db": float(-10 * torch.log10(mse)), "class_right": float(right), "off_palette": float(off)}


@torch.no_grad()
def set_scaling_factor(vae, images: torch.Tensor, batch: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Set the VAE's scaling_factor by SD's rule, 1 / std of the latents (unit-variance latents for the diffusion
    model), from the posteriors of `images`; returns those posteriors' means and stds, unscaled."""
    posts = [vae.encode(images[i:i + batch]).latent_dist for i in range(0, len(images), batch)]
    mean, std = torch.cat([p.mean for p in posts]), torch.cat([p.std for p in posts])
    vae.register_to_config(scaling_factor=float(1 / mean.std()))
    return mean, std


def _log_line(progress, task) -> None:
    """A plain line every 100 steps when stderr is a log file (rich draws its bar only on a terminal)."""
    t = progress.tasks[task]
    if not console.is_terminal and (t.completed % 100 == 0 or t.finished):
        console.print(f"{t.description}  step {t.completed:.0f}/{t.total:.0f}  {t.elapsed:.0f} s")


def train_vae(vae, images: torch.Tensor, maps: torch.Tensor, cfg: BaseConfig, progress) -> list[float]:
    """Autoencoder training: L1(decode(z), x) + kl · KL(q(z|x) || N(0, I)), z ~ q(z|x); x is an image or,
    with probability vae_map_share, a colour map (images, maps: (N, 3, 64, 64) in [-1, 1])."""
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.05)
    task = progress.add_task("VAE", total=cfg.vae_steps)
    losses = []
    vae.train()
    for _ in range(cfg.vae_steps):
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=g)
        is_map = torch.rand(cfg.vae_batch, generator=g) < cfg.vae_map_share
        x = torch.where(is_map[:, None, None, None], maps[idx], images[idx])
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x, x.flip(-1))  # random flips
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        loss = (vae.decode(z).sample - x).abs().mean() + cfg.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        progress.update(task, advance=1, description=f"VAE  loss {np.mean(losses[-50:]):.4f}")
        _log_line(progress, task)
    return losses


def train_unet(unet, latents: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor, scheduler, cfg: BaseConfig, progress) -> list[float]:
    """Text-to-image: ε-prediction MSE at a uniform DDPM timestep (what SDXL was trained with).

    latents: (N, 2, C, h, w) scaled posterior means and stds (h = w = 64 / VAE factor); embeds (N, 77, 64); pooled (N, 32)."""
    from common.diffusion.sdxl import time_ids
    from common.diffusion.training import noisy_latents

    g = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.unet_lr, total_steps=cfg.unet_steps, pct_start=0.05)
    tid = time_ids((64, 64), (0, 0), (64, 64)).expand(cfg.unet_batch, 6)
    task = progress.add_task("UNet", total=cfg.unet_steps)
    losses = []
    unet.train()
    for _ in range(cfg.unet_steps):
        idx = torch.randint(len(latents), (cfg.unet_batch,), generator=g)
        mean, std = latents[idx, 0], latents[idx, 1]
        z = mean + std * torch.randn(mean.shape, generator=g)  # z ~ q(z|x), already scaled
        keep = (torch.rand(cfg.unet_batch, generator=g) >= cfg.caption_dropout).float()
        emb, pool = embeds[idx] * keep[:, None, None], pooled[idx] * keep[:, None]  # dropped: SDXL's zeros
        noisy, t, target = noisy_latents(z, scheduler, g)
        pred = unet(noisy, t, encoder_hidden_states=emb, added_cond_kwargs={"text_embeds": pool, "time_ids": tid}).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        progress.update(task, advance=1, description=f"UNet loss {np.mean(losses[-50:]):.4f}")
        _log_line(progress, task)
    return losses


@torch.no_grad()
def caption_use(pipe, images: torch.Tensor, texts: list[str], seed: int = 0) -> dict:
    """Does the UNet read its captions? Its ε-MSE on held-out images with their own captions and with the
    captions shuffled among them (same noise, same timesteps); equal losses mean captions are ignored."""
    from diffusers import DDPMScheduler

    from common.diffusion.sdxl import encode_prompts, time_ids
    from common.diffusion.training import noisy_latents

    z = torch.cat([pipe.vae.encode(images[i:i + 100]).latent_dist.mode() for i in range(0, len(images), 100)])
    z = z * pipe.vae.config.scaling_factor
    embeds, pooled = encode_prompts(texts, [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)])
    g = torch.Generator().manual_seed(seed)
    noisy, t, target = noisy_latents(z, DDPMScheduler.from_config(pipe.scheduler.config), g)
    tid = time_ids((64, 64), (0, 0), (64, 64)).expand(len(z), 6)
    perm = torch.randperm(len(z), generator=g)
    out = {}
    for name, (e, p) in {"own": (embeds, pooled), "shuffled": (embeds[perm], pooled[perm])}.items():
        pred = pipe.unet(noisy, t, encoder_hidden_states=e, added_cond_kwargs={"text_embeds": p, "time_ids": tid}).sample
        out[f"mse_{name}_captions"] = float(torch.nn.functional.mse_loss(pred, target))
    return out


@torch.no_grad()
def sample(pipe, captions: list[str], steps: int = 30, guidance: float = 5.0, seed: int = 0, sampler: str = "heun") -> np.ndarray:
    """Sample the pipeline's UNet for `captions` with common/diffusion/sampler.py (Karras schedule, Heun);
    returns (B, 64, 64, 3) uint8 images."""
    side = 64 // vae_factor(pipe.vae.config.block_out_channels)  # the latents' side
    from common.diffusion.sampler import Cond, EpsDenoiser, edm_sampler
    from common.diffusion.sdxl import encode_prompts, time_ids

    encoders = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    embeds, pooled = encode_prompts(captions, encoders)
    cond = Cond(embeds, pooled, time_ids((64, 64), (0, 0), (64, 64)).expand(len(captions), 6))
    denoise = EpsDenoiser(pipe.unet.eval(), pipe.scheduler.alphas_cumprod)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(captions))]
    noise = torch.stack([torch.randn(pipe.unet.config.in_channels, side, side, generator=gen) for gen in gens])
    z = edm_sampler(lambda x, s: denoise(x, s, cond, guidance=guidance), noise, denoise.schedule(steps), sampler=sampler)
    x = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def build(out: Path, world: Path, cfg: BaseConfig) -> dict:
    """Train the toy base on `world` and save it to `out`; returns what toybase.json records."""
    from diffusers import DDPMScheduler

    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from common.diffusion.sdxl import encode_prompts
    from common.models.tiny import _clip_text_config, tiny_sdxl

    world, out = Path(world), Path(out)
    if not (world / "captions_train.jsonl").is_file():
        raise SegGenError(f"--world {world}: no toy world there (captions_train.jsonl missing); make one with "
                          f"`python -m common.toy.world {world} --train 2000 --val 200 --seed 0`")
    t0 = time.perf_counter()
    images, texts = load_world(world, "train")
    val_images, val_texts = load_world(world, "val")
    maps, _ = load_maps(world, "train")
    val_maps, val_labels = load_maps(world, "val")
    torch.manual_seed(cfg.seed)
    pipe = tiny_sdxl()  # the scheduler and the text encoders' layout; the rest is replaced
    torch.manual_seed(cfg.seed)
    # The text side: word-level tokenizers (SDXL's second pads with "!") and random text encoders sized to
    # them, frozen as the paper keeps SDXL's
    tok, tok_2 = word_tokenizer(texts), word_tokenizer(texts, pad_token="!")
    pipe.text_encoder = CLIPTextModel(_clip_text_config(tok, 32, 32))
    pipe.text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tok_2, 32, 32))
    pipe.register_modules(tokenizer=tok, tokenizer_2=tok_2, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
    pipe.vae = _vae(cfg.vae_channels, logvar_init=cfg.vae_logvar_init, groups=cfg.vae_groups,
                    latent_channels=cfg.vae_latent_channels)
    pipe.unet = _unet(cfg.unet_channels, latent_size=64 // vae_factor(cfg.vae_channels), groups=cfg.unet_groups,
                      latent_channels=cfg.vae_latent_channels)
    pipe.register_modules(vae=pipe.vae, unet=pipe.unet)
    record = {"world": str(world), "train_images": len(images), "config": asdict(cfg), "torch_threads": torch.get_num_threads()}
    cpu0 = time.process_time()
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("ETA"), TimeRemainingColumn(), console=console)
    with progress:
        t = time.perf_counter()
        vae_losses = train_vae(pipe.vae, images, maps, cfg, progress)
        pipe.vae.eval().requires_grad_(False)
        record["vae_seconds"] = time.perf_counter() - t
        mean, std = set_scaling_factor(pipe.vae, images)
        scale = pipe.vae.config.scaling_factor
        record["vae_scaling_factor"] = scale
        record["vae_reconstruction_val"] = reconstruction_error(pipe.vae, val_images)
        record["vae_colormaps_val"] = map_roundtrip(pipe.vae, val_maps, val_labels)
        encoders = [(pipe.tokenizer, pipe.text_encoder.eval()), (pipe.tokenizer_2, pipe.text_encoder_2.eval())]
        embeds, pooled = encode_prompts(texts, encoders)  # (N, 77, 64), (N, 32): frozen, computed once
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        t = time.perf_counter()
        unet_losses = train_unet(pipe.unet, torch.stack([mean, std], 1) * scale, embeds, pooled, scheduler, cfg, progress)
        pipe.unet.eval().requires_grad_(False)
        record["unet_seconds"] = time.perf_counter() - t
    record["vae_loss_last100"] = float(np.mean(vae_losses[-100:]))
    record["unet_loss_last100"] = float(np.mean(unet_losses[-100:]))
    pipe.save_pretrained(out)
    record["seconds"] = time.perf_counter() - t0
    record["cpu_seconds"] = time.process_time() - cpu0
    if len(val_texts) > 1:
        record["unet_caption_use_val"] = caption_use(pipe, val_images, val_texts, cfg.seed)
    # A look at what it learned: real validation images over samples drawn for their captions.
    n = min(8, len(val_texts))
    if n:
        from PIL import Image

        real = ((val_images[:n] + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        fake = sample(pipe, val_texts[:n], steps=cfg.sample_steps, seed=cfg.seed)
        Image.fromarray(np.concatenate([np.concatenate(list(real), 1), np.concatenate(list(fake), 1)], 0)).save(out / "samples.png")
        record["sample_captions"] = val_texts[:n]
    (out / "toybase.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(
    out: Annotated[Path, typer.Argument(help="Output pipeline folder (pass it as --pretrained).")],
    world: Annotated[Path, typer.Option(help="Toy world folder made by `python -m common.toy.world`.")],
    quick: Annotated[bool, typer.Option(help="A smoke build in seconds (a few steps): for tests, not for use.")] = False,
    vae_steps: Annotated[int | None, typer.Option(min=1, help=f"VAE training steps (default {BaseConfig.vae_steps}).")] = None,
    unet_steps: Annotated[int | None, typer.Option(min=1, help=f"UNet training steps (default {BaseConfig.unet_steps}).")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the weights and of the training batches.")] = 0,
    vae_factor: Annotated[int, typer.Option(help="How much the VAE downsamples: 8 (SDXL's factor, 8x8 latents) or 4 "
                                                 "(16x16 latents, UNet (16, 32)).")] = 8,
    vae_latent_channels: Annotated[int, typer.Option(min=1, help="The VAE's latent channels: 4 as SDXL (default), 16 as "
                                                                 "SD3 and FLUX, which keep finer detail at the same factor.")] = 4,
    vae_width: Annotated[int, typer.Option(min=2, help="Channels of the VAE's first block; the others scale with it "
                                                       "(default 16: blocks 16, 32, 64, 64; 8 was the base before "
                                                       "issue 24). A step costs about width².")] = 16,
    threads: Annotated[int, typer.Option(min=1, help="torch threads; 1 is fastest for these tiny models on a shared "
                                                     "2-core machine (measured under load).")] = 1,
):
    """Train a tiny SDXL-architecture base (VAE + UNet, text-to-image) on a toy world."""
    from common.runtime import quiet

    quiet.quiet()
    torch.set_num_threads(threads)
    cfg = BaseConfig.quick() if quick else BaseConfig()
    cfg.seed = seed
    if vae_factor not in FACTORS:
        console.print(f"[red]error:[/] --vae-factor must be one of {sorted(FACTORS)} (got {vae_factor})")
        raise typer.Exit(2)
    cfg.vae_channels, cfg.unet_channels = FACTORS[vae_factor]
    if vae_width % cfg.vae_groups:
        console.print(f"[red]error:[/] --vae-width must be a multiple of {cfg.vae_groups} (its GroupNorm groups; got {vae_width})")
        raise typer.Exit(2)
    cfg.vae_channels = tuple(c * vae_width // 8 for c in cfg.vae_channels)
    cfg.vae_latent_channels = vae_latent_channels
    cfg.vae_steps = vae_steps or cfg.vae_steps
    cfg.unet_steps = unet_steps or cfg.unet_steps
    try:
        r = build(out, world, cfg)
    except SegGenError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2)
    rec, maps = r["vae_reconstruction_val"], r["vae_colormaps_val"]
    console.print(f"wrote {out} in {r['seconds']:.0f} s, {r['cpu_seconds']:.0f} CPU-s (VAE {r['vae_seconds']:.0f} s, "
                  f"UNet {r['unet_seconds']:.0f} s); VAE on val images: MAE {rec['mae_255']:.1f}/255, PSNR {rec['psnr_db']:.1f} dB; "
                  f"on val colour maps: PSNR {maps['psnr_db']:.1f} dB, {maps['class_right']:.1%} of pixels read back right, "
                  f"{maps['off_palette']:.1%} off the palette; samples: {out / 'samples.png'}")


if __name__ == "__main__":
    typer.run(main)
