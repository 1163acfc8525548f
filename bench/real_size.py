"""Ready for the first GPU: real-size SDXL-base + ControlNet with random weights (common/models/realsize.py, the
published configs shipped in common/assets/configs/, no download), timed in one run (issue 18 item 5):

- sampling: images/s and peak memory of our sampling path (synth.encode + synth.sample_images: the
  EDM/Euler sampler on SDXL's legacy schedule, VAE decode, uint8 on the device) for Text2Mask (masksyn's
  first half, no control) and Mask2Img (imgsyn, ControlNet) against diffusers' StableDiffusionXLPipeline /
  StableDiffusionXLControlNetPipeline (Euler, SDXL's scheduler config) at the same size, steps, guidance
  and batch; both encode the captions and decode with the VAE.
- training: seconds per step and peak memory of one Text2Mask (UNet) and one Mask2Img (ControlNet,
  frozen UNet) step as train_text2mask.py / train_mask2img.py compose it from common/diffusion/training.py
  (sample_latents, noisy_latents, make_optimizer, optimizer_step under accelerate), against the step of
  diffusers' example trainers (examples/text_to_image/train_text_to_image_sdxl.py,
  examples/controlnet/train_controlnet_sdxl.py: vae.encode().latent_dist.sample(), randn_like, randint,
  clip, step), at --resolution with bf16, gradient checkpointing and 8-bit AdamW; captions as cached
  embeddings in both (as both trainers do).

- captioning (caption.py): images/s and peak memory of caption.py's per-batch path (caption_images:
  processor, generate, decode) at its defaults (batch 16, max-new-tokens 30, greedy, bf16 on a GPU) with
  BLIP-2 FlanT5-xxl at real size, against a bare `processor + model.generate` at the same batch; both on
  real ADE20K images (tests/data) decoded beforehand. Random weights would stop each caption at an
  arbitrary token, so every caption is made max-new-tokens long in both: an upper bound on the cost.
- segmentation (train_seg.py): seconds per step and peak memory of train_seg's step (common/seg/loop.py
  Loop.step: the batch to the device, normalise, targets, loss, clip 0.01, AdamW with Mask2Former's
  groups, poly schedule, under accelerate) of Mask2Former Swin-L at its recipe (ADE20K crop 640, global
  batch 16), against a bare forward / backward / clip / AdamW loop of the same model on targets built
  beforehand; one batch of real ADE20K samples through train_seg's augmentation. train_seg splits the
  global batch over the GPUs; here one GPU takes the largest per-GPU batch that fits, from 16 halving on
  out-of-memory (printed).

Peak memory is torch.cuda.max_memory_allocated during the timed calls (weights included); on a CPU it is
not measured ("-"). Times: median of --repeat after one warm-up.

    python bench/real_size.py --smoke          # CPU, tiny models, seconds: the plumbing (CI runs it)
    python bench/real_size.py                  # GPU: 768 px, 40 steps, guidance 5, batch 4; bf16
    python bench/real_size.py --parts caption segmentation   # only some parts
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
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

from common.models import realsize  # noqa: E402
from common.synthesis import synth  # noqa: E402
from common.diffusion import sampler as edm  # noqa: E402


def stage(name: str):
    """The stage script ROOT/{name}.py as a module of its own name (bench/ has benchmarks called caption.py and
    train_seg.py, which a plain import finds first when bench/ leads sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"seggen_stage_{name}", ROOT / f"{name}.py")
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    if not hasattr(module, "main"):
        spec.loader.exec_module(module)
    return module


caption, train_seg = stage("caption"), stage("train_seg")

# ---------------------------------------------------------------- defaults (paper appendix A.4 where it says)
CAPTION_DEFAULTS = inspect.signature(caption._caption).parameters  # caption.py's --batch-size, --max-new-tokens
SEG = train_seg.RECIPES[("ade20k", "swin-l")]  # train_seg's paper recipe (A.3): crop 640, global batch 16
GPU = dict(resolution=768, steps=40, guidance=5.0, batch=4, repeat=2, train_batch=1, train_steps=3,  # A.4: 768 px, 40 Mask2Img steps
           caption_batch=CAPTION_DEFAULTS["batch_size"].default, max_new_tokens=CAPTION_DEFAULTS["max_new_tokens"].default,
           seg_batch=SEG.batch, crop=SEG.crop)
SMOKE = dict(resolution=64, steps=2, guidance=5.0, batch=1, repeat=1, train_batch=1, train_steps=2,  # tiny models on a CPU
             caption_batch=2, max_new_tokens=3, seg_batch=2, crop=64)
PARTS = ("sampling", "training", "caption", "segmentation")
CAPTION = "a living room with a sofa, a lamp and a window"
ADE = ROOT / "tests" / "data" / "ade20k"  # real ADE20K samples: the images captioned, the segmenter's batch


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

    from common.diffusion.training import make_optimizer, noisy_latents, optimizer_step, sample_latents
    from common.runtime.seeds import step_generator

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


# ---------------------------------------------------------------- captioning (caption.py) and segmentation (train_seg.py)

def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ade_samples() -> list:
    from common.data.datasets import read_dataset

    return read_dataset("ade20k", ADE, "train") + read_dataset("ade20k", ADE, "val")


def captioning(a, device) -> dict:
    """{path: (seconds per batch, peak GiB)}: caption.py's caption_images and a bare processor + generate."""
    from common.models import tiny
    from common.runtime.cli import precision_dtype
    from common.data.datasets import load_image

    dtype = precision_dtype("auto", device)  # caption.py's default --precision
    net, processor = tiny.tiny_blip2() if a.smoke else realsize.blip2(device, dtype)
    net = net.to(device, dtype).eval()
    net.generation_config.min_new_tokens = a.max_new_tokens  # random weights: every caption max_new_tokens long
    samples = ade_samples()
    images = [load_image(samples[i % len(samples)].image) for i in range(a.caption_batch)]
    gen = caption.generation_config(net, a.max_new_tokens, 1)  # caption.py's --num-beams 1

    def ours():
        return caption.caption_images(net, processor, images, caption.PAPER_PROMPT, gen, device, dtype)

    def bare():
        inputs = processor(images=images, text=[caption.PAPER_PROMPT] * len(images), return_tensors="pt", padding=True).to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.inference_mode():
            ids = net.generate(**inputs, max_new_tokens=a.max_new_tokens)
        return processor.batch_decode(ids, skip_special_tokens=True)

    a.caption_dtype = str(dtype).removeprefix("torch.")
    return {"caption ours": measure(ours, a.repeat, device), "caption bare": measure(bare, a.repeat, device)}


def segmentation_at(a, device, dtype, b: int) -> dict:
    """{path: (seconds per step, peak GiB)} of train_seg's step and the bare step at per-GPU batch b."""
    import tempfile
    from types import SimpleNamespace

    from accelerate import Accelerator

    from common.seg import data as segdata
    from common.seg import model as segmodel
    from common.models import tiny
    from common.runtime.loader import as_tensors
    from common.seg.loop import Loop

    accelerator = Accelerator(mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
    net, processor = tiny.tiny_mask2former() if a.smoke else realsize.mask2former()
    segmodel.freeze_unused(net)  # as train_seg does
    samples = ade_samples()
    data = segdata.SegData([samples], "ade20k", a.crop, augment=segdata.AUGMENTS[SEG.augment])
    items = [data[(0, i % len(samples), i)] for i in range(b)]  # (source, index, augmentation seed)
    batch = as_tensors(segdata.collate(items))  # as train_seg's DataLoader hands it over, segment ids found
    out = {}
    with tempfile.TemporaryDirectory() as tmp:  # Loop's stats.jsonl
        model = copy.deepcopy(net)
        optimizer = segmodel.build_optimizer(model, SEG.optimizer, SEG.lr, SEG.weight_decay, SEG.backbone_lr, SEG.momentum)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: segmodel.lr_factor(s, SEG.max_steps, SEG.schedule))
        model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
        loop = Loop(SimpleNamespace(recipe="ade20k/swin-l", grad_clip=SEG.grad_clip), accelerator, model, processor, None,
                    ["real"], Path(tmp), [], None)
        model.train()
        out["segmentation ours"] = measure(lambda: loop.step(model, optimizer, schedule, batch), a.train_steps, device)
        loop.close()
        del model, optimizer, schedule, loop
        accelerator.free_memory()
        free(device)

    model = net.to(device).train()
    optimizer = torch.optim.AdamW(segmodel.param_groups(model, SEG.lr, SEG.weight_decay, SEG.backbone_lr), lr=SEG.lr)
    mean = torch.tensor(processor.image_mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(processor.image_std, device=device).view(1, 3, 1, 1) * 255
    images = (batch["image"].to(device).float() - mean) / std
    valid = batch["valid"].to(device).long()
    masks, classes, _ = segdata.mask_targets(batch["label"].to(device))  # the targets made beforehand

    def bare():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(pixel_values=images, pixel_mask=valid, mask_labels=masks, class_labels=classes).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), SEG.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    out["segmentation bare"] = measure(bare, a.train_steps, device)
    return out


def segmentation(a, device, dtype) -> dict:
    """segmentation_at the largest per-GPU batch from --seg-batch down (halved on out-of-memory); sets a.seg_batch."""
    while True:
        try:
            return segmentation_at(a, device, dtype, a.seg_batch)
        except torch.cuda.OutOfMemoryError:
            if a.seg_batch == 1:
                raise
        a.seg_batch //= 2
        free(device)


# ---------------------------------------------------------------- main

def table(rows: dict, unit: str, per: int | None, base: str) -> None:
    """rows {"name who": (seconds, peak GiB)}, with images/s when `per` (images per call) and the ratio ours/`base`."""
    print(f"{'':24}{unit:>10}{'images/s' if per else '':>10}{'peak GiB':>10}{'ours/' + base:>16}")
    for key, (sec, peak) in rows.items():
        name, who = key.split()
        ratio = f"{sec / rows[f'{name} {base}'][0]:.2f}x" if who == "ours" else ""
        print(f"{key:<24}{sec:>10.3f}{f'{per / sec:.2f}' if per else '':>10}{'-' if peak is None else f'{peak:.1f}':>10}{ratio:>16}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models, 64 px, 2 steps, fp32: seconds on a CPU (CI)")
    for key, value in GPU.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None, help=f"default {value} (--smoke: {SMOKE[key]})")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default bf16 on a GPU, fp32 on a CPU")
    ap.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    ap.add_argument("--use-8bit-adam", action=argparse.BooleanOptionalAction, default=None, help="default: on a GPU")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to time (default: all)")
    ap.add_argument("--skip-training", action="store_true", help="--parts without training")
    a = ap.parse_args(argv)
    for key, value in (SMOKE if a.smoke else GPU).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    parts = [p for p in a.parts if not (a.skip_training and p == "training")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = a.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    if a.use_8bit_adam is None:
        a.use_8bit_adam = device.type == "cuda"  # bitsandbytes' 8-bit AdamW needs its GPU kernels
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    kind = "tiny (smoke)" if a.smoke else "real-size"
    results = {}
    if "sampling" in parts or "training" in parts:
        t = time.perf_counter()
        models = realsize.tiny_models() if a.smoke else realsize.sdxl_models(device, dtype)
        if a.smoke:
            for m in models.values():
                m.to(device, dtype).eval().requires_grad_(False)
        built = time.perf_counter() - t
        size = sum(p.numel() for m in models.values() for p in m.parameters())
        print(f"{kind} SDXL-base + ControlNet, {size / 1e9:.3f} B parameters, random weights "
              f"(built in {built:.0f} s), {where}, {precision}")
    if "sampling" in parts:
        results["sampling"] = sampling(models, a, device, dtype)
        print(f"\nsampling: {a.resolution}x{a.resolution}, {a.steps} steps, guidance {a.guidance}, batch {a.batch}, median of {a.repeat}")
        table(results["sampling"], "s/batch", a.batch, "diffusers")
    if "training" in parts:
        results["training"] = training(models, a, device, dtype)
        opt = "8-bit AdamW" if a.use_8bit_adam else "AdamW"
        print(f"\ntraining step: {a.resolution}x{a.resolution}, batch {a.train_batch}, {precision}, "
              f"{'gradient checkpointing, ' if a.gradient_checkpointing else ''}{opt}, median of {a.train_steps}")
        table(results["training"], "s/step", None, "diffusers")
    models = None
    free(device)
    if "caption" in parts:
        results["caption"] = captioning(a, device)
        print(f"\ncaptioning ({kind} BLIP-2{'' if a.smoke else ' FlanT5-xxl'}, {where}, {a.caption_dtype}): caption.py's caption_images vs bare "
              f"processor + generate, batch {a.caption_batch}, {a.max_new_tokens} new tokens each, greedy, median of {a.repeat}")
        table(results["caption"], "s/batch", a.caption_batch, "bare")
        free(device)
    if "segmentation" in parts:
        results["segmentation"] = segmentation(a, device, dtype)
        print(f"\nsegmentation step ({kind} Mask2Former{'' if a.smoke else ' Swin-L'}, {where}, {precision}): train_seg's step vs bare "
              f"forward/backward/AdamW, crop {a.crop}, per-GPU batch {a.seg_batch} (recipe: global {SEG.batch}), median of {a.train_steps}")
        table(results["segmentation"], "s/step", None, "bare")
    return results


if __name__ == "__main__":
    main()
