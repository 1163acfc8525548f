"""Our EDM sampler (common/diffusion/sampler.py) against diffusers' own pipelines, in one run (paper appendix A.4):

- Text2Mask-like: `StableDiffusionXLPipeline` with `HeunDiscreteScheduler` / `EulerDiscreteScheduler`
  (Karras sigmas, "linspace" spacing: the same sampler family) against `edm_sampler` + `EpsDenoiser`;
- Mask2Img-like: `StableDiffusionXLControlNetPipeline` against the same with ControlNet residuals.

Same tiny SDXL UNet (and ControlNet), same prompt embeddings, noise, steps, batch and guidance (5, so
each UNet call carries 2×batch rows). Only the denoising loop is timed: both get the embeddings
precomputed and return latents (no text encoders, no VAE). For each setting it prints the UNet
evaluations (Heun: 2N-1), the time per sampling run (best of --repeat, the two alternating; CPU time
with one thread, else wall time), the time per UNet evaluation and the ratio ours / pipeline (goal:
≤ 1.05, no overhead of ours), the time per evaluation spent outside the networks (forward hooks: the
sampler's own overhead), and the largest difference between the two results (they compute the same).

    python bench/sampling.py [--steps 20] [--batch 1 4] [--repeat 7] [--threads 1]
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

from common.models import tiny  # noqa: E402
from common.diffusion.sampler import Cond, EpsDenoiser, edm_sampler  # noqa: E402

RES, GUIDANCE = 64, 5.0


def scheduler(kind, config):
    from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler

    cls = HeunDiscreteScheduler if kind == "heun" else EulerDiscreteScheduler
    return cls.from_config(config, use_karras_sigmas=True, timestep_spacing="linspace")


class ModelClock:
    """Counts the forward calls of the networks and the time spent inside them (hooks: no change to
    what runs); the rest of a sampling run is the sampler's own overhead."""

    def __init__(self, counted, timed):
        self.n, self.inside, self._start = 0, 0.0, None
        counted.register_forward_pre_hook(lambda *a: setattr(self, "n", self.n + 1))
        for m in timed:
            m.register_forward_pre_hook(self._enter)
            m.register_forward_hook(self._leave)

    def _enter(self, *a):
        if self._start is None:  # the ControlNet's call and the UNet's: one span each
            self._start = clock()

    def _leave(self, *a):
        self.inside += clock() - self._start
        self._start = None

    def reset(self):
        self.n, self.inside = 0, 0.0


def clock():
    """CPU time of this process with one torch thread: the work done, unlike wall time, which on a
    shared machine also counts the time other jobs held the core. Wall time with more threads."""
    return time.process_time() if torch.get_num_threads() == 1 else time.perf_counter()


def timed(fn, model):
    """(time, time outside the networks, result) of one call."""
    model.reset()
    t = clock()
    out = fn()
    t = clock() - t
    return t, t - model.inside, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers import StableDiffusionXLControlNetPipeline

    base = tiny.tiny_sdxl()
    controlnet = tiny.tiny_controlnet().eval()
    base.unet.eval()
    cpipe = StableDiffusionXLControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2, unet=base.unet, controlnet=controlnet, scheduler=base.scheduler,
    )
    for p in (base, cpipe):
        p.set_progress_bar_config(disable=True)
    model = ModelClock(base.unet, [base.unet, controlnet])
    config = dict(base.scheduler.config)
    print(f"tiny SDXL UNet ({sum(p.numel() for p in base.unet.parameters()) / 1e6:.1f} M parameters), {RES}x{RES}, "
          f"{args.steps} steps, guidance {GUIDANCE}, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"{'':<26}{'UNet':>8}{'total ms':>18}{'ms / eval':>18}{'':>7}{'us/eval outside':>16}")
    print(f"{'setting':<26}{'evals':>8}{'ours':>9}{'pipe':>9}{'ours':>9}{'pipe':>9}{'ratio':>7}{'ours':>8}{'pipe':>8}{'max|diff|':>10}")

    for use_cn in (False, True):
        pipe = cpipe if use_cn else base
        for kind in ("heun", "euler"):
            pipe.scheduler = scheduler(kind, config)
            for batch in args.batch:
                g = torch.Generator().manual_seed(batch)
                emb, pooled = torch.randn(batch, 77, 64, generator=g), torch.randn(batch, 32, generator=g)
                noise = torch.randn(batch, 4, RES // 8, RES // 8, generator=g)
                control = torch.rand(batch, 3, RES, RES, generator=g)
                time_ids = torch.tensor([[RES, RES, 0, 0, RES, RES]], dtype=torch.float32).repeat(batch, 1)
                extra = {"image": control} if use_cn else {}

                def theirs():
                    return pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, negative_prompt_embeds=torch.zeros_like(emb),
                                negative_pooled_prompt_embeds=torch.zeros_like(pooled), height=RES, width=RES,
                                num_inference_steps=args.steps, guidance_scale=GUIDANCE, latents=noise.clone(),
                                output_type="latent", **extra).images

                d = EpsDenoiser(base.unet, pipe.scheduler.alphas_cumprod, controlnet=controlnet if use_cn else None)
                cond = Cond(emb, pooled, time_ids, control if use_cn else None)

                def ours():
                    return edm_sampler(lambda x, s: d(x, s, cond, guidance=GUIDANCE), noise, d.schedule(args.steps), sampler=kind)

                model.reset()
                theirs()
                evals_pipe = model.n
                model.reset()
                ours()
                evals_ours = model.n
                (t_ours, o_ours), (t_pipe, o_pipe) = (float("inf"), 0.0), (float("inf"), 0.0)
                for _ in range(args.repeat):  # alternate, so that load on the machine hits both alike
                    t, o, a = timed(ours, model)
                    t_ours, o_ours = min((t_ours, o_ours), (t, o))
                    t, o, b = timed(theirs, model)
                    t_pipe, o_pipe = min((t_pipe, o_pipe), (t, o))
                name = f"{'ControlNet ' if use_cn else ''}{kind} batch {batch}"
                per_ours, per_pipe = 1e3 * t_ours / evals_ours, 1e3 * t_pipe / evals_pipe
                print(f"{name:<26}{f'{evals_ours}/{evals_pipe}':>8}{1e3 * t_ours:>9.1f}{1e3 * t_pipe:>9.1f}"
                      f"{per_ours:>9.2f}{per_pipe:>9.2f}{per_ours / per_pipe:>7.3f}"
                      f"{1e6 * o_ours / evals_ours:>8.0f}{1e6 * o_pipe / evals_pipe:>8.0f}{float((a - b).abs().max()):>10.1e}")
    print("UNet evals: ours/pipeline (Heun: 2N-1, Euler: N). ratio: ours / pipeline per UNet evaluation (goal <= 1.05).\n"
          "outside: time per evaluation spent outside the UNet and ControlNet (sampler, guidance, scheduler, pipeline).")


if __name__ == "__main__":
    main()
