"""One training step of train_text2mask.py and train_mask2img.py, against a bare loop, in one run.

- script: the real `train()` of each script, run in-process on the real ADE20K samples (tiny SDXL,
  no validation, no checkpoints, --num-workers 1 by default: the data is prepared in one DataLoader worker
  beside the step, as the trainers do by default on more than 2 cores); its step time is the median step
  of the "seconds" column of stats.jsonl after 3 warm-up steps.
- split: the same step taken apart with the same helpers (common/diffusion/training.py), each phase timed alone:
  data (decode, colour map, crop/flip, collate), text (a cached embedding row vs encoding the captions
  with both text encoders), VAE encode, UNet (+ControlNet) forward+backward, optimizer.
- bare: UNet (+ControlNet) forward+backward, gradient clipping at 1.0 and AdamW on random tensors of the
  same shapes, as diffusers' example trainers step (examples/text_to_image/train_text_to_image_sdxl.py and
  examples/controlnet/train_controlnet_sdxl.py clip at --max_grad_norm 1.0): the floor any trainer pays.
  "bare+VAE" adds the VAE encode, which a trainer without cached latents pays too.

Rounds: bare, then --rounds times (script, bare); each script run is compared with the bare runs just
before and after it, and the median round is the ratio printed.

The goal: the script's step within 1.1× of bare+VAE once embeddings are cached, with the data prepared in
a worker (--num-workers 0 puts it in the step: compare with bare + VAE + data then). Prints milliseconds and
ratios. On a CPU the tiny models' numbers are dominated by per-call overheads; the ratios are what to read.

    python bench/train_step.py [--resolution 64] [--batch-size 2] [--steps 20] [--rounds 3] [--threads 1] [--num-workers 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import rounds  # noqa: E402  (bench/rounds.py: the rounds protocol)
from common.runtime import loader, quiet  # noqa: E402
from common.models import tiny  # noqa: E402
from common.masks.colormap import palette_for  # noqa: E402
from common.data.datasets import read_dataset  # noqa: E402
from common.diffusion.sdxl import cache_text_embeddings, encode_prompts, inspect_base, load_text_encoders  # noqa: E402
from common.diffusion.training import (  # noqa: E402
    ColorMapDataset, StepBatches, noisy_latents, sample_latents, to_device,
)
from common.runtime.seeds import step_generator  # noqa: E402

ADE = ROOT / "tests" / "data" / "ade20k"
CAPTIONS = {"ADE_val_00000001": "a living room with a sofa and a lamp", "ADE_val_00000002": "a street with cars, trees and sky"}


def timed(fn, repeat: int) -> float:
    """Median seconds of fn() over `repeat` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def script_step(module, work: Path, base: Path, captions: Path, args, steps: int, run: int) -> float:
    """Seconds per step of the real script (its `run`-th run): the median step in stats.jsonl after a few warm-up steps."""
    from typer.testing import CliRunner

    out, warm = work / f"run-{module.__name__}-{run}", 3
    cli = ["--data-root", str(ADE), "--split", "val", "--captions", str(captions), "--pretrained", str(base),
           "--output-dir", str(out), "--resolution", str(args.resolution), "--batch-size", str(args.batch_size),
           "--max-steps", str(steps + warm), "--num-workers", str(args.num_workers), "--validation-steps", "0", "--checkpointing-steps", "0",
           "--report-to", "none"]
    result = CliRunner().invoke(module.app, cli)
    if result.exit_code != 0:
        raise SystemExit(f"{module.__name__} failed:\n{result.output}\n{result.exception!r}")
    seconds = [json.loads(line)["seconds"] for line in (out / "stats.jsonl").read_text().splitlines()]
    return statistics.median(b - a for a, b in zip(seconds[warm - 1:], seconds[warm:]))  # robust to a busy machine


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="runs of each script, each between two bare runs")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable numbers on a shared machine)")
    ap.add_argument("--num-workers", type=int, default=1, help="the scripts' DataLoader workers (1: the data is prepared beside the step, "
                    "as the trainers do by default on more than 2 cores; 0: in the main process, timed in the step)")
    args = ap.parse_args()
    os.environ["SEGGEN_THREADS"] = str(args.threads)  # the scripts' threads.configure() would pick its own count
    torch.set_num_threads(args.threads)
    quiet.quiet()
    sys.path.insert(0, str(ROOT))
    import train_mask2img
    import train_text2mask
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel

    work = Path(tempfile.mkdtemp(prefix="bench-train-step-"))
    base = tiny.save("sdxl", work / "sdxl")
    captions = work / "captions.jsonl"
    captions.write_text("".join(json.dumps({"id": i, "image": f"ADEChallengeData2016/images/validation/{i}.jpg", "caption": c}) + "\n"
                                for i, c in CAPTIONS.items()))
    r, b, n = args.resolution, args.batch_size, args.steps

    # ------------------------------------------------ the step taken apart
    info, accelerator = inspect_base(str(base)), Accelerator()
    samples = read_dataset("ade20k", ADE, "val")
    texts = [CAPTIONS[s.id] for s in samples]
    emb = cache_text_embeddings(str(base), info, texts, work / "cache", accelerator)
    dataset = ColorMapDataset(samples, "ade20k", palette_for("ade20k"), r, emb)
    colormaps_only = ColorMapDataset(samples, "ade20k", palette_for("ade20k"), r, emb, need_image=False)  # Text2Mask's
    batches = iter(StepBatches(len(dataset), b, 0))
    collate = loader.collate  # the trainers' collate_fn (common/runtime/loader.py: small tensors by value; to_device takes them back)
    t_data = {"text2mask": timed(lambda: collate([colormaps_only[k] for k in next(batches)]), n),
              "mask2img": timed(lambda: collate([dataset[k] for k in next(batches)]), n)}
    t_text_cached = timed(lambda: [emb.row(i) for i in range(b)], n)
    encoders = load_text_encoders(str(base), True, "cpu", torch.float32)
    t_text_encode = timed(lambda: encode_prompts(texts[:b] * (b // len(texts[:b]) or 1), encoders), n)
    del encoders

    vae = AutoencoderKL.from_pretrained(base, subfolder="vae").requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    batch = to_device(collate([dataset[k] for k in next(batches)]), "cpu", torch.float32)
    g = step_generator(0, 0, 0, "cpu")
    t_vae = timed(lambda: sample_latents(batch, "pixel_values", vae, g), n)  # the scripts' own encode
    latents = sample_latents(batch, "pixel_values", vae, g)
    noisy, t, target = noisy_latents(latents, scheduler, g)
    embeds, pooled = batch["prompt_embeds"], batch["pooled_prompt_embeds"]
    cond = {"text_embeds": pooled, "time_ids": batch["time_ids"]}

    rows, bare = {}, {}
    for name in ("text2mask", "mask2img"):
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
        controlnet = ControlNetModel.from_unet(unet) if name == "mask2img" else None
        trained = controlnet if controlnet is not None else unet
        if controlnet is not None:
            unet.requires_grad_(False)
        opt = torch.optim.AdamW(trained.parameters(), lr=1e-5)
        control = batch["colormap"].float() / 255

        def forward_backward(unet=unet, controlnet=controlnet, control=control):
            kw = {}
            if controlnet is not None:
                down, mid = controlnet(noisy, t, encoder_hidden_states=embeds, added_cond_kwargs=cond, controlnet_cond=control,
                                       return_dict=False)
                kw = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            pred = unet(noisy, t, encoder_hidden_states=embeds, added_cond_kwargs=cond, **kw).sample
            F.mse_loss(pred, target).backward()

        def optimizer_step(opt=opt):
            opt.step()
            opt.zero_grad(set_to_none=False)  # keep the grads: the next call times the step alone

        forward_backward()
        t_fb, t_opt = timed(forward_backward, n), timed(optimizer_step, n)
        t_clip = timed(lambda: torch.nn.utils.clip_grad_norm_(trained.parameters(), 1e9), n)  # --max-grad-norm
        rows[name] = dict(data=t_data[name], text_cached=t_text_cached, text_encode=t_text_encode, vae=t_vae,
                          fwd_bwd=t_fb, clip=t_clip, optimizer=t_opt)

        # bare: random tensors of the same shapes, nothing else
        x, e, p, ids = torch.randn_like(noisy), torch.randn_like(embeds), torch.randn_like(pooled), batch["time_ids"].clone()
        c = torch.rand_like(control)
        ts = torch.randint(0, 1000, (b,))

        def bare_step(unet=unet, controlnet=controlnet, trained=trained, opt=opt, x=x, e=e, p=p, ids=ids, c=c, ts=ts):
            kw = {}
            bare_cond = {"text_embeds": p, "time_ids": ids}
            if controlnet is not None:
                down, mid = controlnet(x, ts, encoder_hidden_states=e, added_cond_kwargs=bare_cond, controlnet_cond=c, return_dict=False)
                kw = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            F.mse_loss(unet(x, ts, encoder_hidden_states=e, added_cond_kwargs=bare_cond, **kw).sample, x).backward()
            torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)  # diffusers' example trainers: --max_grad_norm 1.0
            opt.step()
            opt.zero_grad(set_to_none=True)

        bare[name] = bare_step

    # ------------------------------------------------ rounds: bare, then (script, bare) x --rounds (bench/rounds.py)
    # each bare run times the VAE encode beside it
    def bare_round():
        return {name: (timed(fn, n), timed(lambda: sample_latents(batch, "pixel_values", vae, g), n)) for name, fn in bare.items()}

    bares, scripts = rounds.interleaved(bare_round, lambda r: {
        "text2mask": script_step(train_text2mask, work, base, captions, args, n, r),
        "mask2img": script_step(train_mask2img, work, base, captions, args, n, r)}, args.rounds)
    for name, row in rows.items():
        floors = rounds.around([b[name][0] for b in bares])  # bare around each script run
        vaes = rounds.around([b[name][1] for b in bares])
        row["script"] = statistics.median(sc[name] for sc in scripts)
        row["bare"], row["bare_vae"] = statistics.median(floors), statistics.median(f + v for f, v in zip(floors, vaes))
        row["rounds"] = [(sc[name], f, f + v) for sc, f, v in zip(scripts, floors, vaes)]  # (script, bare, bare + VAE) per round

    print(f"one training step, tiny SDXL, {r}x{r}, batch {b}, {args.threads} thread(s), {args.num_workers} DataLoader worker(s), median of {n} "
          f"({'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'})")
    print(f"{'ms':<34}{'Text2Mask':>12}{'Mask2Img':>12}")
    labels = [("script step (train(), stats.jsonl)", "script"), ("  data: decode, colour map, crop/flip", "data"),
              ("  text: cached embedding rows", "text_cached"), ("  (text: encoding instead, not done)", "text_encode"),
              ("  VAE encode", "vae"), ("  UNet (+ControlNet) fwd+bwd", "fwd_bwd"), ("  gradient clipping", "clip"), ("  optimizer", "optimizer"),
              ("bare loop: fwd+bwd+clip+AdamW", "bare"), ("bare loop + VAE encode", "bare_vae")]
    for label, key in labels:
        print(f"{label:<34}{rows['text2mask'][key] * 1e3:>12.2f}{rows['mask2img'][key] * 1e3:>12.2f}")
    in_step = args.num_workers == 0  # the data is prepared inside the timed step only without workers
    for row in rows.values():
        row["parts"] = in_step * row["data"] + row["text_cached"] + row["vae"] + row["fwd_bwd"] + row["clip"] + row["optimizer"]
        row["floor"] = row["bare_vae"] + in_step * row["data"]
    print(f"{'sum of the parts' + ('' if in_step else ' (data in the worker)'):<34}"
          f"{rows['text2mask']['parts'] * 1e3:>12.2f}{rows['mask2img']['parts'] * 1e3:>12.2f}")
    floor = "bare + VAE + data" if in_step else "bare + VAE"
    for name, row in rows.items():
        by_round = [sc / (bare_vae + in_step * row["data"]) for sc, _, bare_vae in row["rounds"]]
        print(f"{name}: script / sum of its parts = {row['script'] / row['parts']:.2f}x (accelerate, logging, progress)")
        print(f"{name}: script / ({floor}) by round: {', '.join(f'{x:.2f}' for x in by_round)}")
        print(f"{name}: script / bare = {statistics.median(sc / bare for sc, bare, _ in row['rounds']):.2f}x; script / ({floor}) = {statistics.median(by_round):.2f}x "
              f"(median of {len(by_round)} rounds; goal: <= 1.1x once embeddings are cached); encoding captions every step would add "
              f"{row['text_encode'] / row['script']:.0%}")

if __name__ == "__main__":
    main()
