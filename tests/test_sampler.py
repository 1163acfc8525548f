"""The EDM sampler (common/diffusion/sampler.py) against references nobody here wrote: SDXL's reference code
(Stability-AI/generative-models, "sgm") transcribed below for the default (Euler, legacy DDPM
schedule, guidance 5); diffusers' Heun / Euler schedulers with Karras sigmas on the tiny SDXL UNet;
and a denoiser whose data distribution is a known Gaussian (its exact D(x; σ) and the ODE's exact
end distribution are known in closed form)."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from common.diffusion.sampler import (Cond, EpsDenoiser, Settings, edm_sampler, karras_sigmas, legacy_ddpm_sigmas, model_sigmas,
                            sample, sigma_to_index, sigma_to_t)

CONFIG = json.loads((Path(__file__).resolve().parents[1] / "common" / "assets" / "sdxl_scheduler_config.json").read_text())


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
    common/synthesis/synth.py feeds it ([0, 1], both guidance halves) and SDXL's size conditioning (h, w) from
    synth.encode, against StableDiffusionXLControlNetPipeline itself on a non-square image."""
    import numpy as np
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    from PIL import Image

    from common.synthesis import synth

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


# ---------------------------------------------------------------- SDXL's reference sampler (sgm), transcribed
# From Stability-AI/generative-models, written out here in numpy / plain torch and independently of
# common/diffusion/sampler.py, so that the default is checked against the published formulas themselves.

def sgm_alphas_cumprod(cfg):
    """sgm/modules/diffusionmodules/util.py `make_beta_schedule("linear")` (float64): β = linspace(√β_start,
    √β_end, T)², which diffusers calls "scaled_linear"; ᾱ = cumprod(1 - β) (discretizer.py
    `LegacyDDPMDiscretization.__init__`, linear_start 0.00085, linear_end 0.0120, 1000 timesteps)."""
    betas = np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, cfg["num_train_timesteps"], dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas, axis=0)


def sgm_legacy_sigmas(n, alphas_cumprod, do_append_zero=True, flip=False):
    """discretizer.py `LegacyDDPMDiscretization.get_sigmas` + `Discretization.__call__`."""
    T = len(alphas_cumprod)
    if n < T:  # generate_roughly_equally_spaced_steps(n, T)
        timesteps = np.linspace(T - 1, 0, n, endpoint=False).astype(int)[::-1]
        ac = alphas_cumprod[timesteps]
    else:
        ac = alphas_cumprod
    sigmas = (((1 - ac) / ac) ** 0.5)[::-1]  # torch.flip(sigmas, (0,))
    sigmas = np.append(sigmas, 0.0) if do_append_zero else sigmas  # append_zero
    return sigmas[::-1] if flip else sigmas


def sgm_euler(network, noise, sigmas, table, c, uc, scale):
    """sampling.py `EulerEDMSampler` (s_churn = 0) with guiders.py `VanillaCFG` and denoiser.py
    `DiscreteDenoiser` + denoiser_scaling.py `EpsScaling`. network(x_in, idx, c) -> ε. Returns the end
    point and the UNet calls made."""
    # BaseDiffusionSampler.prepare_sampling_loop: x *= sqrt(1 + σ_0²)
    x = noise * (1.0 + sigmas[0] ** 2.0) ** 0.5
    calls = 0
    for i in range(len(sigmas) - 1):
        sigma, next_sigma = sigmas[i], sigmas[i + 1]
        # VanillaCFG.prepare_inputs: x, σ doubled; the conditioning [uc; c]
        xs, ss, cs = torch.cat([x, x]), [sigma, sigma], torch.cat([uc, c])
        # DiscreteDenoiser.possibly_quantize_sigma: idx = argmin |σ - sigmas|, σ = sigmas[idx]; c_noise = sigma_to_idx(σ)
        idx = int(np.abs(ss[0] - table).argmin())
        s = table[idx]
        # EpsScaling: c_skip = 1, c_out = -σ, c_in = 1 / sqrt(σ² + 1); Denoiser.forward
        c_skip, c_out, c_in = 1.0, -s, 1 / (s**2 + 1.0) ** 0.5
        denoised = network(xs * c_in, idx, cs) * c_out + xs * c_skip
        calls += 1
        # VanillaCFG.__call__: x_u + scale (x_c - x_u)
        x_u, x_c = denoised.chunk(2)
        denoised = x_u + scale * (x_c - x_u)
        # EDMSampler.sampler_step (γ = 0): d = to_d(x, σ, denoised) = (x - denoised) / σ; euler_step x + dt d
        d = (x - denoised) / sigma
        x = x + (next_sigma - sigma) * d
    return x, calls


def test_legacy_schedule_is_sgm_discretization():
    ac64 = sgm_alphas_cumprod(CONFIG)
    assert CONFIG["beta_schedule"] == "scaled_linear" and (CONFIG["beta_start"], CONFIG["beta_end"]) == (0.00085, 0.012)
    for n in (1, 3, 40, 185, 200, 999, 1000):  # 185: numpy's linspace truncates 972 - ε to 971 there
        want = sgm_legacy_sigmas(n, ac64)
        torch.testing.assert_close(legacy_ddpm_sigmas(n, torch.from_numpy(ac64)), torch.from_numpy(want.copy()), rtol=1e-12, atol=0)
    # From the ᾱ diffusers builds in float32 (what EpsDenoiser gets from the pipeline): the same within float32 round-off.
    ac32 = reference_scheduler("euler").alphas_cumprod
    d = EpsDenoiser(None, ac32)
    ours = d.schedule(40, kind="legacy")
    torch.testing.assert_close(ours, torch.from_numpy(sgm_legacy_sigmas(40, ac64).copy()), rtol=2e-5, atol=0)
    # The SDXL values: σ_max = 14.6146 first (t = 999), then t = 974, 949, ..., 24, then 0.
    assert len(ours) == 41 and float(ours[-1]) == 0.0
    assert float(ours[0]) == pytest.approx(14.6146, abs=1e-4) and float(ours[-2]) == pytest.approx(float(d.sigmas[24]))
    torch.testing.assert_close(ours[:-1], d.sigmas[999 - 25 * torch.arange(40)])
    with pytest.raises(ValueError, match="1 to 1000 steps"):
        d.schedule(1001, kind="legacy")


def test_legacy_schedule_equals_diffusers_trailing_spacing():
    """A second reference: diffusers' Euler scheduler with "trailing" spacing picks the same timesteps for 40
    and 200 steps (it starts at σ_0 rather than sgm's sqrt(1 + σ_0²), see test_default_trajectory_*)."""
    from diffusers import EulerDiscreteScheduler

    cfg = {k: v for k, v in CONFIG.items() if not k.startswith("_")}
    ref = EulerDiscreteScheduler.from_config({**cfg, "timestep_spacing": "trailing"})
    d = EpsDenoiser(None, ref.alphas_cumprod)
    for n in (40, 200):
        ref.set_timesteps(n)
        torch.testing.assert_close(d.schedule(n, kind="legacy").float(), ref.sigmas.float(), rtol=1e-6, atol=0)
        assert [int(sigma_to_index(s, d.sigmas)) for s in d.schedule(n, kind="legacy")[:-1]] == ref.timesteps.long().tolist()


def test_nearest_timestep_is_sgm_sigma_to_idx():
    """Off the training σ_t (the Karras schedule), sgm's DiscreteDenoiser takes the nearest σ_t by |σ - σ_t|
    (not in log σ) and uses that σ_t for c_in and c_out as well; the default sampler's own σ_t map exactly."""
    ac64 = sgm_alphas_cumprod(CONFIG)
    table = sgm_legacy_sigmas(1000, ac64, do_append_zero=False, flip=True)  # DiscreteDenoiser.sigmas, ascending
    d = EpsDenoiser(None, torch.from_numpy(ac64))
    # Between the geometric and the arithmetic mean of two neighbours, the nearest σ_t and the nearest log σ_t differ.
    a, b = table[[10, 500, 990]], table[[11, 501, 991]]
    between = ((a * b) ** 0.5 + (a + b) / 2) / 2
    probe = np.concatenate([d.schedule(25).numpy()[:-1], np.random.default_rng(0).uniform(0.03, 14.6, 200), between])
    got = [int(sigma_to_index(float(s), d.sigmas)) for s in probe]
    assert got == [int(np.abs(s - table).argmin()) for s in probe]
    assert got[-3:] == [10, 500, 990]  # where rounding the log-interpolated t(σ) would give 11, 501, 991
    assert [round(float(sigma_to_t(s, d.log_sigmas))) for s in between] == [11, 501, 991]
    legacy = d.schedule(40, kind="legacy")[:-1]
    assert [int(sigma_to_index(s, d.sigmas)) for s in legacy] == [float(sigma_to_t(s, d.log_sigmas)) for s in legacy]
    # D(x; σ) off the table: sgm's Denoiser.forward with the snapped σ_t in c_in and c_out, and t = its index.
    net = ToyEpsNet()
    d = EpsDenoiser(net, torch.from_numpy(ac64))
    x, emb = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 5, 6, dtype=torch.float64)
    sigma = float(between[1])
    s_q = table[500]
    want = x + net.eps(x / (s_q**2 + 1) ** 0.5, 500, emb) * -s_q
    torch.testing.assert_close(d(x.float(), sigma, Cond(emb.float()), nearest=True), want.float(), rtol=1e-5, atol=1e-5)
    assert net.t_seen == [500.0]


class ToyEpsNet(torch.nn.Module):
    """A stand-in ε-network with a UNet's call signature, nonlinear in x and in t, reading the text
    embedding (so guidance shows); it records the timesteps it is given."""

    dtype = torch.float32

    def __init__(self):
        super().__init__()
        self.t_seen, self.rows = [], 0

    def eps(self, x_in, t, emb):
        t = float(t)
        return torch.tanh(x_in * (1 + t / 400)) + 0.3 * math.sin(t / 37) + emb.mean(dim=(1, 2)).view(-1, *[1] * (x_in.ndim - 1))

    def forward(self, x_in, t, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=False):
        self.t_seen.append(float(t))
        self.rows += len(x_in)
        return (self.eps(x_in, t, encoder_hidden_states),)


def test_default_trajectory_matches_sgm_loop_toy_network():
    ac64 = sgm_alphas_cumprod(CONFIG)
    table = sgm_legacy_sigmas(1000, ac64, do_append_zero=False, flip=True)
    net = ToyEpsNet()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    c, uc = torch.randn(3, 7, 8, generator=g, dtype=torch.float64), torch.zeros(3, 7, 8, dtype=torch.float64)
    want, ref_calls = sgm_euler(net.eps, noise, sgm_legacy_sigmas(40, ac64), table, c, uc, scale=5.0)

    d = EpsDenoiser(net, torch.from_numpy(ac64))
    got = sample(d, noise.float(), 40, Cond(c.float()), Cond(uc.float()))
    assert Settings() == Settings(sampler="euler", schedule="legacy", guidance=5.0, S_churn=0.0)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # 40 steps: 40 UNet calls, each a guided batch of 2 × 3 samples; the integer timesteps 999, 974, ..., 24.
    assert d.evals == ref_calls == 40 == Settings().unet_calls(40) and net.rows == 40 * 2 * 3
    assert net.t_seen == [999.0 - 25 * k for k in range(40)]
    # The check can fail: EDM's start at σ_0 instead of sgm's sqrt(1 + σ_0²) gives another end point.
    t_steps = d.schedule(40, kind="legacy")
    other = edm_sampler(lambda x, s: d(x, s, Cond(c.float()), Cond(uc.float()), 5.0, nearest=True), noise.float(), t_steps)
    assert not torch.allclose(other, want.float(), rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_default_trajectory_matches_sgm_loop_tiny_unet(unet):
    """The same on the tiny SDXL UNet, with SDXL's zeroed unconditional text (force_uc_zero_embeddings)."""
    ac32 = reference_scheduler("euler").alphas_cumprod  # the pipeline's ᾱ, as EpsDenoiser gets it
    sigmas = sgm_legacy_sigmas(40, ac32.double().numpy())
    table = sgm_legacy_sigmas(1000, ac32.double().numpy(), do_append_zero=False, flip=True)
    cond = sdxl_cond(2)
    uncond = cond.zeros()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))

    def network(x_in, idx, emb):  # the UNet as sgm's OpenAIWrapper calls it: integer timestep, [uc; c] batch
        both = torch.cat([uncond.pooled, cond.pooled]), torch.cat([uncond.time_ids, cond.time_ids])
        with torch.no_grad():
            return unet(x_in.float(), torch.tensor(idx), encoder_hidden_states=emb.float(),
                        added_cond_kwargs={"text_embeds": both[0], "time_ids": both[1]}).sample.double()

    want, calls = sgm_euler(network, noise.double(), sigmas, table, cond.prompt_embeds.double(), uncond.prompt_embeds.double(), 5.0)
    d = EpsDenoiser(unet, ac32)
    got = sample(d, noise, 40, cond)  # uncond defaults to cond.zeros()
    assert d.evals == calls == 40
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_unet_calls_default_against_heun_karras():
    """Text2Mask's 200 steps: 200 UNet calls by default (sgm's Euler) against 399 for Heun; Mask2Img's 40: 40 vs 79."""
    ac = reference_scheduler("euler").alphas_cumprod
    for settings, steps, want in [(Settings(), 200, 200), (Settings(), 40, 40),
                                  (Settings(sampler="heun", schedule="karras"), 200, 399), (Settings(sampler="heun", schedule="karras"), 40, 79)]:
        net = ToyEpsNet()
        d = EpsDenoiser(net, ac)
        sample(d, torch.zeros(1, 2), steps, Cond(torch.zeros(1, 1, 1)), settings=settings)
        assert d.evals == settings.unet_calls(steps) == want
        assert net.rows == 2 * want  # guidance 5: each call a batch of [uncond; cond]


def test_karras_settings_keep_the_earlier_sampler():
    """Settings(sampler="heun", schedule="karras") is exactly the sampler as it was (what older manifests
    were drawn with, and what a record without "schedule" reads back as)."""
    ac = reference_scheduler("euler").alphas_cumprod
    d = EpsDenoiser(ToyEpsNet(), ac)
    cond = Cond(torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1)))
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    old = edm_sampler(lambda x, s: d(x, s, cond, None, 5.0), noise, d.schedule(12), sampler="heun")
    settings = Settings.from_dict({"sampler": "heun", "guidance": 5.0, "S_churn": 0.0, "S_tmin": 0.0, "S_tmax": None, "S_noise": 1.0, "steps": 12})
    assert settings.schedule == "karras" and settings.S_tmax == float("inf")
    assert torch.equal(sample(d, noise, 12, cond, settings=settings), old)
    assert not torch.allclose(sample(d, noise, 12, cond), old)  # the new default is another sampler


def test_settings_record_round_trip_and_errors():
    s = Settings(sampler="heun", schedule="karras", guidance=3.0, S_churn=10.0, S_tmax=50.0)
    record = json.loads(json.dumps(Settings().to_dict()))  # JSON-ready: S_tmax = ∞ is null
    assert record == {"sampler": "euler", "schedule": "legacy", "guidance": 5.0, "rho": 7.0, "S_churn": 0.0,
                      "S_tmin": 0.0, "S_tmax": None, "S_noise": 1.0}
    assert Settings.from_dict(record) == Settings() and Settings.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="schedule must be one of"):
        Settings(schedule="linear")
    with pytest.raises(ValueError, match="sampler must be one of"):
        Settings(sampler="dpm")
