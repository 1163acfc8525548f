"""The EDM sampler (common/sampler.py) against references nobody here wrote: diffusers' Heun / Euler
schedulers with Karras sigmas on the tiny SDXL UNet, and a denoiser whose data distribution is a
known Gaussian (its exact D(x; σ) and the ODE's exact end distribution are known in closed form)."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from common.sampler import Cond, EpsDenoiser, edm_sampler, karras_sigmas, model_sigmas, sigma_to_t

CONFIG = json.loads((Path(__file__).resolve().parents[1] / "common" / "data" / "sdxl_scheduler_config.json").read_text())


def reference_scheduler(kind):
    from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler

    cls = {"heun": HeunDiscreteScheduler, "euler": EulerDiscreteScheduler}[kind]
    cfg = {k: v for k, v in CONFIG.items() if not k.startswith("_")}
    return cls.from_config({**cfg, "use_karras_sigmas": True, "timestep_spacing": "linspace"})


@pytest.fixture(scope="module")
def unet(tiny_models):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_models("sdxl"), subfolder="unet").eval()


def sdxl_cond(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Cond(torch.randn(batch, 8, 64, generator=g), torch.randn(batch, 32, generator=g),
                torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(batch, 1))


def test_schedule_and_timesteps_match_diffusers():
    ref = reference_scheduler("euler")
    ref.set_timesteps(12)
    d = EpsDenoiser(None, ref.alphas_cumprod)
    assert d.sigma_min == pytest.approx(0.0292, abs=1e-4) and d.sigma_max == pytest.approx(14.6146, abs=1e-4)
    ours = d.schedule(12)
    torch.testing.assert_close(ours.float(), ref.sigmas.float(), rtol=1e-6, atol=1e-7)
    t = torch.stack([sigma_to_t(s, d.log_sigmas) for s in ours[:-1]])
    torch.testing.assert_close(t.float(), ref.timesteps.float(), rtol=0, atol=1e-3)
    # The end points are the model's own: σ_max ↦ t = 999, σ_min ↦ t = 0.
    assert sigma_to_t(d.sigma_max, d.log_sigmas) == pytest.approx(999) and sigma_to_t(d.sigma_min, d.log_sigmas) == pytest.approx(0)


@pytest.mark.parametrize("kind", ["heun", "euler"])
def test_trajectory_matches_diffusers_scheduler(unet, kind):
    steps, cond = 6, sdxl_cond(2)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}

    ref = reference_scheduler(kind)
    ref.set_timesteps(steps)
    x, ref_states, ref_evals = noise * ref.init_noise_sigma, [], 0
    with torch.no_grad():
        for j, t in enumerate(ref.timesteps):  # diffusers' pipeline loop
            eps = unet(ref.scale_model_input(x, t), t, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=added).sample
            ref_evals += 1
            x = ref.step(eps, t, x).prev_sample
            if kind == "euler" or ref.state_in_first_order or j == len(ref.timesteps) - 1:  # a full step is done
                ref_states.append(x)

    d = EpsDenoiser(unet, ref.alphas_cumprod)
    states = []
    ours = edm_sampler(lambda x, s: d(x, s, cond), noise, d.schedule(steps), sampler=kind,
                       callback=lambda i, x: states.append(x))
    assert d.evals == ref_evals == (2 * steps - 1 if kind == "heun" else steps)
    assert len(states) == len(ref_states) == steps
    for i, (a, b) in enumerate(zip(states, ref_states)):  # float32 round-off only
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()), msg=f"step {i}")
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))


def test_guided_sample_matches_sdxl_pipeline(tiny_models):
    """Classifier-free guidance with SDXL's zeroed unconditional embeddings and the text_time
    conditioning, against StableDiffusionXLPipeline itself with the Heun/Karras scheduler."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models("sdxl"))
    pipe.scheduler = reference_scheduler("heun")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.force_zeros_for_empty_prompt
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ref = pipe("a house by a lake", height=64, width=64, num_inference_steps=5, guidance_scale=5.0,
               latents=noise.clone(), output_type="latent").images

    emb, _, pooled, _ = pipe.encode_prompt("a house by a lake", do_classifier_free_guidance=True)
    cond = Cond(emb, pooled, torch.tensor([[64.0, 64, 0, 0, 64, 64]]))
    d = EpsDenoiser(pipe.unet, pipe.scheduler.alphas_cumprod)
    ours = edm_sampler(lambda x, s: d(x, s, cond, guidance=5.0), noise, d.schedule(5), sampler="heun")
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert d.evals == 9


class GaussianEpsUNet(torch.nn.Module):
    """An 'ε-prediction UNet' for data x0 ~ N(mu, s² I), exact: it undoes the wrapper's c_in and maps t
    back to σ through the model's own table, so the wrapper's preconditioning and timestep mapping are
    exercised, and returns ε = (x - D*(x; σ)) / σ with the exact denoiser D* = mu + s²/(s²+σ²) (x - mu)."""

    def __init__(self, alphas_cumprod, mu, s):
        super().__init__()
        self.log_sigmas, self.mu, self.s = model_sigmas(alphas_cumprod).log(), mu, s
        self.dtype = torch.float32

    def forward(self, x_in, t, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=False):
        t = float(t)
        lo = min(int(t), len(self.log_sigmas) - 2)
        sigma = math.exp(float(self.log_sigmas[lo] + (t - lo) * (self.log_sigmas[lo + 1] - self.log_sigmas[lo])))
        x = x_in.double() * math.sqrt(sigma**2 + 1)
        d = self.mu + self.s**2 / (self.s**2 + sigma**2) * (x - self.mu)
        return ((x - d) / sigma).float(), 


@pytest.mark.parametrize("kind, steps, churn", [("heun", 40, 0.0), ("euler", 200, 0.0), ("heun", 40, 20.0)])
def test_gaussian_data_gives_right_mean_and_variance(kind, steps, churn):
    ac = reference_scheduler("euler").alphas_cumprod
    mu, s = 0.7, 0.5
    d = EpsDenoiser(GaussianEpsUNet(ac, mu, s), ac)
    cond = Cond(torch.zeros(1, 1, 1))
    n = 2**16
    gens = [torch.Generator().manual_seed(3)]
    noise = torch.randn(1, n, generator=gens[0])
    x = edm_sampler(lambda x, sg: d(x, sg, cond), noise, d.schedule(steps), sampler=kind,
                    S_churn=churn, generators=gens)
    # Without churn, the probability-flow ODE is linear here: x(σ) - mu = sqrt((s²+σ²)/(s²+σ_max²)) (x(σ_max) - mu), so from
    # x(σ_max) ~ N(0, σ_max²) (the sampler's start, as in SDXL) the exact end is known in closed form.
    smax = d.sigma_max
    shrink = s / math.sqrt(s**2 + smax**2)
    want_mean, want_std = mu * (1 - shrink), shrink * smax
    if churn:  # the stochastic sampler's fresh noise forgets the start: it ends on the data N(mu, s²) itself
        want_mean, want_std = mu, s
    se = want_std / math.sqrt(n)
    assert abs(float(x.mean()) - want_mean) < 5 * se + 2e-3
    assert float(x.std()) == pytest.approx(want_std, rel=0.02)
    assert want_mean != pytest.approx(0, abs=0.3)  # the test can tell a wrong mean from a right one


def test_karras_schedule_is_eq5():
    t = karras_sigmas(3, 0.002, 80.0)
    mid = (80.0 ** (1 / 7) + 0.5 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    torch.testing.assert_close(t, torch.tensor([80.0, mid, 0.002, 0.0], dtype=torch.float64))


def test_churn_window_and_per_sample_noise():
    """S_churn acts only for σ in [S_tmin, S_tmax]; its noise comes from each sample's own generator, so
    a sample's result does not depend on its batch-mates."""
    ac = reference_scheduler("euler").alphas_cumprod
    d = EpsDenoiser(GaussianEpsUNet(ac, 0.3, 0.5), ac)
    cond = Cond(torch.zeros(1, 1, 1))
    noise = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))

    def run(x, seeds, **churn):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return edm_sampler(lambda x, s: d(x, s, cond), x, d.schedule(10), sampler="heun", generators=gens, **churn)

    plain = run(noise, [1, 2])
    assert torch.equal(run(noise, [1, 2], S_churn=40.0, S_tmin=100.0), plain)  # window above σ_max: no churn
    churned = run(noise, [1, 2], S_churn=40.0, S_tmin=0.5, S_tmax=5.0)
    assert not torch.allclose(churned, plain)
    torch.testing.assert_close(run(noise[1:], [2], S_churn=40.0, S_tmin=0.5, S_tmax=5.0), churned[1:], rtol=0, atol=1e-6)


def test_controlnet_guided_sample_matches_sdxl_controlnet_pipeline(tiny_models):
    """Mask2Img's path: the ControlNet residuals under classifier-free guidance, the control image as
    common/synth.py feeds it ([0, 1], both guidance halves) and SDXL's size conditioning (h, w) from
    synth.encode, against StableDiffusionXLControlNetPipeline itself on a non-square image."""
    import numpy as np
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    from PIL import Image

    from common import synth

    controlnet = ControlNetModel.from_pretrained(tiny_models("controlnet"))
    # A fresh ControlNet's output convs are zero (no residuals at all): give them weights, so that the
    # control image and its preprocessing show in the result.
    torch.manual_seed(0)
    with torch.no_grad():
        for m in [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            m.weight.normal_(0, 1.0)
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(tiny_models("sdxl"), controlnet=controlnet)
    pipe.scheduler = reference_scheduler("heun")
    pipe.set_progress_bar_config(disable=True)
    h, w = 64, 96
    cmap = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    noise = torch.randn(1, 4, h // 8, w // 8, generator=torch.Generator().manual_seed(4))
    ref = pipe("a street", image=Image.fromarray(cmap), height=h, width=w, num_inference_steps=4, guidance_scale=4.0,
               latents=noise.clone(), output_type="latent").images

    d = EpsDenoiser(pipe.unet, pipe.scheduler.alphas_cumprod, controlnet=controlnet)
    gen = synth.Generator(pipe, d, True, torch.device("cpu"), torch.float32)
    assert gen.latent_factor == 8
    cond, uncond = synth.encode(gen, ["a street"], (h, w))
    control = synth.control_tensor([cmap])  # (1, 3, h, w)
    cond, uncond = (Cond(c.prompt_embeds, c.pooled, c.time_ids, control) for c in (cond, uncond))
    ours = edm_sampler(lambda x, s: d(x, s, cond, uncond, guidance=4.0), noise, d.schedule(4), sampler="heun")
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert d.evals == 7
    # The comparison can fail: the control image in [-1, 1] (the VAE's range) gives another sample.
    cond, uncond = (dataclasses.replace(c, control=control * 2 - 1) for c in (cond, uncond))
    other = edm_sampler(lambda x, s: d(x, s, cond, uncond, guidance=4.0), noise, d.schedule(4), sampler="heun")
    assert not torch.allclose(other, ref, rtol=1e-4, atol=1e-4)
