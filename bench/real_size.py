"""Ready for the first GPU: real-size SDXL-base + ControlNet with random weights (common/realsize.py, the
published configs shipped in common/data/configs/, no download), timed in one run (issue 18 item 5):

- sampling: images/s and peak memory of our sampling path (synth.encode + synth.sample_images: the
  EDM/Euler sampler on SDXL's legacy schedule, VAE decode, uint8 on the device) for Text2Mask (masksyn's
  first half, no control) and Mask2Img (imgsyn, ControlNet) against diffusers' StableDiffusionXLPipeline /
  StableDiffusionXLControlNetPipeline (Euler, SDXL's scheduler config) at the same size, steps, guidance
  and batch; both encode the captions and decode with the VAE.
- training: seconds per step and peak memory of one Text2Mask (UNet) and one Mask2Img (ControlNet,
  frozen UNet) step as train_text2mask.py / train_mask2img.py compose it from common/training.py
  (sample_latents, noisy_latents, make_optimizer, optimizer_step under accelerate), against the step of
  diffusers' example trainers (examples/text_to_image/train_text_to_image_sdxl.py,
  examples/controlnet/train_controlnet_sdxl.py: vae.encode().latent_dist.sample(), randn_like, randint,
  clip, step), at --resolution with bf16, gradient checkpointing and 8-bit AdamW; captions as cached
  embeddings in both (as both trainers do).

Peak memory is torch.cuda.max_memory_allocated during the timed calls (weights included); on a CPU it is
not measured ("-"). Times: median of --repeat after one warm-up.

    python bench/real_size.py --smoke          # CPU, tiny models, seconds: the plumbing (CI runs it)
    python bench/real_size.py                  # GPU: 768 px, 40 steps, guidance 5, batch 4; bf16
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import realsize, synth  # noqa: E402
from common import sampler as edm  # noqa: E402

# ---------------------------------------------------------------- defaults (paper appendix A.4 where it says)
GPU = dict(resolution=768, steps=40, guidance=5.0, batch=4, repeat=2, train_batch=1, train_steps=3)  # A.4: 768 px, 40 Mask2Img steps
SMOKE = dict(resolution=64, steps=2, guidance=5.0, batch=1, repeat=1, train_batch=1, train_steps=2)  # tiny models on a CPU
CAPTION = "a living room with a sofa, a lamp and a window"


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, repeat: int, device) -> tuple[float, float | None]:
    """(median seconds of fn() over `repeat` calls after one warm-up, peak GiB allocated during them)."""
    fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak


# ---------------------------------------------------------------- sampling

def sampling(models: dict, a, device, dtype) -> dict:
    """{path: (seconds per batch, peak GiB)} for ours and diffusers', Text2Mask and Mask2Img."""
    text2img, control_pipe = realsize.pipelines(models)
    r, b = a.resolution, a.batch
    captions = [CAPTION] * b
    control = torch.rand(b, 3, r, r, generator=torch.Generator().manual_seed(0)).to(device, dtype)  # (B, 3, R, R) in [0, 1]
    settings = edm.Settings(guidance=a.guidance)  # imgsyn's / masksyn's defaults: euler, legacy
    out = {}
    for name, pipe, cn in (("text2mask", text2img, None), ("mask2img", control_pipe, models["controlnet"])):
        gen = synth._ready(pipe, cn, "sdxl", device, dtype)

        def ours():
            cond, uncond = synth.encode(gen, captions, (r, r))
            gens = [torch.Generator().manual_seed(i) for i in range(b)]
            return synth.sample_images(gen, cond, uncond, gens, (r, r), a.steps, settings, control=control if cn is not None else None)

        def theirs():
            kw = {"image": control} if cn is not None else {}
            gens = [torch.Generator(device).manual_seed(i) for i in range(b)]
            return pipe(prompt=captions, height=r, width=r, num_inference_steps=a.steps, guidance_scale=a.guidance,
                        generator=gens, output_type="np", **kw).images

        with torch.no_grad():
            out[f"{name} ours"] = measure(ours, a.repeat, device)
            out[f"{name} diffusers"] = measure(theirs, a.repeat, device)
    return out


# ---------------------------------------------------------------- training

def training(models: dict, a, device, dtype) -> dict:
    """{trainer: (seconds per step, peak GiB)} for our step and the diffusers examples' step."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from common.training import make_optimizer, noisy_latents, optimizer_step, sample_latents, step_generator

    accelerator = Accelerator(mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
    scheduler = DDPMScheduler.from_config(realsize.scheduler_config())
    r, b = a.resolution, a.train_batch
    g = torch.Generator().manual_seed(0)
    te_dim = models["unet"].config.cross_attention_dim
    pooled_dim = models["text_encoder_2"].config.projection_dim
    batch = {"pixel_values": (torch.rand(b, 3, r, r, generator=g) * 2 - 1).to(device),  # (B, 3, R, R) in [-1, 1]
             "colormap": torch.randint(0, 256, (b, 3, r, r), generator=g, dtype=torch.uint8).to(device),
             "prompt_embeds": torch.randn(b, 77, te_dim, generator=g).to(device, dtype),
             "pooled": torch.randn(b, pooled_dim, generator=g).to(device, dtype),
             "time_ids": torch.tensor([[r, r, 0, 0, r, r]] * b, dtype=dtype, device=device)}
    cond = {"text_embeds": batch["pooled"], "time_ids": batch["time_ids"]}
    vae = models["vae"]
    out = {}
    for name in ("text2mask", "mask2img"):
        for who in ("ours", "diffusers"):
            frozen = models["unet"]
            trained = copy.deepcopy(models["controlnet"] if name == "mask2img" else models["unet"]).float().train().requires_grad_(True)
            unet = frozen if name == "mask2img" else trained
            if a.gradient_checkpointing:
                trained.enable_gradient_checkpointing()
                if name == "mask2img":
                    frozen.enable_gradient_checkpointing()
            optimizer = make_optimizer(trained.parameters(), 1e-5, a.use_8bit_adam)
            lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
            model, optimizer, lr = accelerator.prepare(trained, optimizer, lr)
            key = "colormap" if name == "text2mask" else "pixel_values"  # Text2Mask learns colour maps, Mask2Img images
            step_no = [0]

            def forward(noisy, t):
                kw = {}
                if name == "mask2img":
                    control = batch["colormap"].to(dtype) / 255
                    down, mid = model(noisy, t, encoder_hidden_states=batch["prompt_embeds"], added_cond_kwargs=cond,
                                      controlnet_cond=control, return_dict=False)
                    kw = {"down_block_additional_residuals": [x.to(dtype) for x in down], "mid_block_additional_residual": mid.to(dtype)}
                net = unet if name == "mask2img" else model
                return net(noisy, t, encoder_hidden_states=batch["prompt_embeds"], added_cond_kwargs=cond, **kw).sample

            def ours():  # as train_text2mask.py / train_mask2img.py compose the helpers
                gen = step_generator(0, step_no[0], 0, device)
                step_no[0] += 1
                latents = sample_latents(batch, key, vae, gen)
                noisy, t, target = noisy_latents(latents.to(dtype), scheduler, gen)
                loss = F.mse_loss(forward(noisy, t).float(), target.float())
                optimizer_step(accelerator, model, optimizer, lr, loss, 1.0)

            def theirs():  # the diffusers examples' step, transcribed
                pictures = batch[key].float() / 127.5 - 1 if key == "colormap" else batch[key]
                with torch.no_grad():
                    latents = vae.encode(pictures.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
                latents = latents.to(dtype)
                noise = torch.randn_like(latents)
                t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device).long()
                noisy = scheduler.add_noise(latents, noise, t)
                loss = F.mse_loss(forward(noisy, t).float(), noise.float())
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                lr.step()
                optimizer.zero_grad(set_to_none=True)

            out[f"{name} {who}"] = measure(ours if who == "ours" else theirs, a.train_steps, device)
            if name == "mask2img" and a.gradient_checkpointing:
                frozen.disable_gradient_checkpointing()
            del model, optimizer, lr, trained, unet
            accelerator.free_memory()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- main

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models, 64 px, 2 steps, fp32: seconds on a CPU (CI)")
    for key, value in GPU.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None, help=f"default {value} (--smoke: {SMOKE[key]})")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default bf16 on a GPU, fp32 on a CPU")
    ap.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    ap.add_argument("--use-8bit-adam", action=argparse.BooleanOptionalAction, default=None, help="default: on a GPU")
    ap.add_argument("--skip-training", action="store_true")
    a = ap.parse_args(argv)
    for key, value in (SMOKE if a.smoke else GPU).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = a.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    if a.use_8bit_adam is None:
        a.use_8bit_adam = device.type == "cuda"  # bitsandbytes' 8-bit AdamW needs its GPU kernels
    t = time.perf_counter()
    models = realsize.tiny_models() if a.smoke else realsize.sdxl_models(device, dtype)
    if a.smoke:
        for m in models.values():
            m.to(device, dtype).eval().requires_grad_(False)
    built = time.perf_counter() - t
    size = sum(p.numel() for m in models.values() for p in m.parameters())
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{'tiny (smoke)' if a.smoke else 'real-size'} SDXL-base + ControlNet, {size / 1e9:.3f} B parameters, random weights "
          f"(built in {built:.0f} s), {where}, {precision}")
    results = {"sampling": sampling(models, a, device, dtype)}
    print(f"\nsampling: {a.resolution}x{a.resolution}, {a.steps} steps, guidance {a.guidance}, batch {a.batch}, median of {a.repeat}")
    print(f"{'':24}{'s/batch':>10}{'images/s':>10}{'peak GiB':>10}{'ours/diffusers':>16}")
    rows = results["sampling"]
    for key, (sec, peak) in rows.items():
        name, who = key.split()
        ratio = f"{sec / rows[f'{name} diffusers'][0]:.2f}x" if who == "ours" else ""
        print(f"{key:<24}{sec:>10.3f}{a.batch / sec:>10.2f}{'-' if peak is None else f'{peak:.1f}':>10}{ratio:>16}")
    if not a.skip_training:
        results["training"] = training(models, a, device, dtype)
        opt = "8-bit AdamW" if a.use_8bit_adam else "AdamW"
        print(f"\ntraining step: {a.resolution}x{a.resolution}, batch {a.train_batch}, {precision}, "
              f"{'gradient checkpointing, ' if a.gradient_checkpointing else ''}{opt}, median of {a.train_steps}")
        print(f"{'':24}{'s/step':>10}{'peak GiB':>10}{'ours/diffusers':>16}")
        rows = results["training"]
        for key, (sec, peak) in rows.items():
            name, who = key.split()
            ratio = f"{sec / rows[f'{name} diffusers'][0]:.2f}x" if who == "ours" else ""
            print(f"{key:<24}{sec:>10.3f}{'-' if peak is None else f'{peak:.1f}':>10}{ratio:>16}")
    return results


if __name__ == "__main__":
    main()
