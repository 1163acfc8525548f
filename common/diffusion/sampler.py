"""The EDM sampler (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", Algorithm 2) over the discrete ε-prediction UNets of SDXL and SD-1.5 (paper appendix A.4:
"the default EDM sampler", 200 steps for Text2Mask, 40 for Mask2Img).

The default is the SDXL reference demo's default (Stability-AI/generative-models,
`scripts/demo/streamlit_helpers.py: init_sampling, get_guider, get_sampler`: `EulerEDMSampler`,
`LegacyDDPMDiscretization`, `VanillaCFG` scale 5.0, s_churn 0; its steps default is 50, the paper's
A.4 counts are the caller's): Euler steps over the model's own DDPM noise levels. (`sgm/inference/
api.py: SamplingParams` defaults to DPMPP2MSampler, scale 6.0, 50 steps instead.) Heun and the Karras
ρ = 7 schedule stay as options.

Small pieces, in the paper's terms:
- the noise levels: σ(t) = sqrt((1 - ᾱ_t) / ᾱ_t) from the model's own `alphas_cumprod`, so σ_min and
  σ_max are the model's (SDXL: 0.0292, 14.6146); either sgm's legacy DDPM discretization (σ at roughly
  equally spaced training timesteps) or the Karras schedule with ρ = 7 between σ_min and σ_max;
- the denoiser D(x; σ) (EDM Table 1, "VP/ε-prediction" preconditioning, sgm's `EpsScaling`):
  c_skip = 1, c_out = -σ, c_in = 1/sqrt(σ² + 1), and the UNet's timestep t(σ): on the legacy schedule
  the nearest training timestep as sgm's `DiscreteDenoiser` (σ itself snapped to it), on the Karras
  schedule interpolated in log σ as diffusers' schedulers and k-diffusion map it; classifier-free
  guidance and ControlNet residuals live here;
- `edm_sampler`: Euler steps (Heun's second order as an option) with the stochastic "churn"
  (S_churn, S_tmin, S_tmax, S_noise), written like NVlabs/edm's `generate.py: edm_sampler`;
- `Settings` + `sample`: the whole recipe as one record (what a manifest stores per sample).

Why our own and not a diffusers scheduler: diffusers' SDXL config uses `timestep_spacing="leading"`,
which starts below σ_max (t = 976 of 999 for 40 steps) and truncates a Karras schedule;
`EDMEulerScheduler` assumes EDM-preconditioned models; and the schedulers hide the churn and Heun's
evaluation order behind a stateful `step()`. tests/test_sampler.py checks the default against sgm's
formulas transcribed there, and the Karras path against diffusers' `HeunDiscreteScheduler` /
`EulerDiscreteScheduler` (Karras sigmas, "linspace" spacing) step for step.

UNet evaluations per sample (classifier-free guidance puts both halves in one batch of 2):
Euler N steps: N calls; Heun N steps: 2N - 1 (Text2Mask 200 steps: 200 vs 399; Mask2Img 40: 40 vs 79).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

SAMPLERS = ("euler", "heun")
SCHEDULES = ("legacy", "karras")


# ---------------------------------------------------------------- noise levels

def model_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """(T,) float64 σ of each training timestep: σ_t = sqrt((1 - ᾱ_t) / ᾱ_t), increasing in t."""
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return ((1 - ac) / ac).sqrt()


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """(num_steps + 1,) float64: the EDM schedule (Karras et al. Eq. 5) from σ_max down to σ_min, then 0."""
    i = torch.arange(num_steps, dtype=torch.float64)
    ramp = i / max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, t.new_zeros(1)])


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Continuous timestep of σ: linear interpolation in log σ between the training timesteps
    (diffusers' `_sigma_to_t`, k-diffusion's `sigma_to_t`); clamped to [0, T-1]."""
    log_sigma = torch.as_tensor(sigma, dtype=torch.float64).clamp(min=1e-10).log()
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return low + w


def legacy_ddpm_sigmas(num_steps: int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """(num_steps + 1,) float64: sgm's `LegacyDDPMDiscretization` (sgm/modules/diffusionmodules/
    discretizer.py), the model's own σ_t at roughly equally spaced training timesteps, from σ_max down, then 0."""
    T = len(alphas_cumprod)
    if not 1 <= num_steps <= T:
        raise ValueError(f"the legacy DDPM schedule takes 1 to {T} steps (got {num_steps})")
    # Timesteps T-1, T-1 - (T-1)/N, ... (N of them, not reaching 0), truncated to integers
    # (`generate_roughly_equally_spaced_steps`; numpy's linspace, so that the truncation rounds as sgm's does).
    t = torch.from_numpy(np.linspace(T - 1, 0, num_steps, endpoint=False).astype(np.int64))
    # σ_t = sqrt((1 - ᾱ_t) / ᾱ_t), already from σ_max down (sgm computes them ascending, then flips).
    sigma = model_sigmas(alphas_cumprod)[t]
    # σ_N = 0: the last step lands on the data (`append_zero`).
    return torch.cat([sigma, sigma.new_zeros(1)])


def sigma_to_index(sigma: float | torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The training timestep whose σ is nearest (|σ - σ_t| smallest), as sgm's
    `DiscreteDenoiser.sigma_to_idx` (sgm/modules/diffusionmodules/denoiser.py): an integer, no interpolation."""
    return (torch.as_tensor(sigma, dtype=torch.float64) - sigmas).abs().argmin()


# ---------------------------------------------------------------- the sampler

def edm_sampler(
    denoise: Callable[[torch.Tensor, float], torch.Tensor],
    latents: torch.Tensor,
    t_steps: torch.Tensor,
    sampler: str = "euler",
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float = float("inf"),
    S_noise: float = 1.0,
    generators: list[torch.Generator] | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    init_sigma: float | None = None,
) -> torch.Tensor:
    """Karras et al. 2022, Algorithm 2 (Heun), or its first-order Euler form (sampler="euler", the
    default, as sgm's `EulerEDMSampler`: no second-order correction).

    denoise: D(x; σ) -> the denoised estimate, same shape as x. latents: (B, ...) unit-variance noise.
    t_steps: the noise levels σ_0 > ... > σ_{N-1} > 0 followed by 0 (`legacy_ddpm_sigmas`, `karras_sigmas`).
    init_sigma: the standard deviation of the starting point; None: σ_0 (Algorithm 2, diffusers'
    "linspace" spacing); sgm starts at sqrt(1 + σ_0²) (see `sample`).
    generators: one CPU generator per sample for the churn noise, so a sample does not depend on its
    batch-mates (None: torch's global generator). Heun costs 2N - 1 evaluations of D, Euler N.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS} (got {sampler!r})")
    num_steps = len(t_steps) - 1
    t_steps = [float(t) for t in t_steps]
    x_next = latents.float() * (t_steps[0] if init_sigma is None else init_sigma)  # x_0 ~ N(0, σ_0² I)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # Churn: temporarily raise the noise level, γ_i = min(S_churn / N, √2 - 1) inside [S_tmin, S_tmax].
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_tmin <= t_cur <= S_tmax else 0.0
        t_hat = t_cur + gamma * t_cur
        # Add the matching fresh noise: x̂ = x + sqrt(t̂² - t²) · S_noise · ε.
        x_hat = x_cur
        if gamma > 0:
            x_hat = x_cur + math.sqrt(t_hat**2 - t_cur**2) * S_noise * _randn_like(x_cur, generators)
        # Euler step from t̂ to t_{i+1} along d = (x̂ - D(x̂; t̂)) / t̂.
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        # Heun's 2nd-order correction: average the slopes at both ends (skipped when t_{i+1} = 0).
        if sampler == "heun" and t_next != 0:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        if callback is not None:
            callback(i, x_next)
    return x_next


def _randn_like(x: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
    if generators is None:
        return torch.randn_like(x)
    # Drawn on the CPU, one sample at a time: the same numbers on any device and in any batch.
    return torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(x)


# ---------------------------------------------------------------- the recipe, as a manifest records it

@dataclass(frozen=True)
class Settings:
    """How a sample is drawn, all in one record. The defaults are those of SDXL's reference demo
    (Stability-AI/generative-models `scripts/demo/streamlit_helpers.py`: sampler EulerEDMSampler,
    discretization LegacyDDPMDiscretization, guider VanillaCFG with cfg-scale 5.0, s_churn 0); the step
    count is the caller's (A.4: 200 for Text2Mask, 40 for Mask2Img; the demo's own default is 50)."""

    sampler: str = "euler"  # EulerEDMSampler; "heun": EDM Algorithm 2 (HeunEDMSampler)
    schedule: str = "legacy"  # LegacyDDPMDiscretization; "karras": Karras Eq. 5, ρ below, on the model's [σ_min, σ_max]
    guidance: float = 5.0  # VanillaCFG scale
    rho: float = 7.0  # the Karras schedule only
    S_churn: float = 0.0  # s_churn = 0: the deterministic sampler
    S_tmin: float = 0.0
    S_tmax: float = float("inf")
    S_noise: float = 1.0

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS} (got {self.sampler!r})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES} (got {self.schedule!r})")

    def to_dict(self) -> dict:
        """JSON-ready (JSON has no infinity: S_tmax = ∞ is null, as `synth.churn_settings` writes it)."""
        d = dataclasses.asdict(self)
        d["S_tmax"] = None if d["S_tmax"] == float("inf") else d["S_tmax"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Settings:
        """The inverse of `to_dict`, reading only its own keys. A record without "schedule" or "sampler"
        predates them: it was drawn with Heun on the Karras schedule, and reads back so."""
        d = {**{"sampler": "heun", "schedule": "karras"}, **{k: v for k, v in d.items() if k in _FIELDS}}
        if d.get("S_tmax", 0) is None:
            d["S_tmax"] = float("inf")
        return cls(**d)

    def unet_calls(self, num_steps: int) -> int:
        """UNet calls per sample (each a batch of 2 under guidance): Euler N, Heun 2N - 1."""
        return num_steps if self.sampler == "euler" else 2 * num_steps - 1


_FIELDS = {f.name for f in dataclasses.fields(Settings)}


def sample(d: EpsDenoiser, latents: torch.Tensor, num_steps: int, cond: Cond, uncond: Cond | None = None,
           settings: Settings = Settings(), generators: list[torch.Generator] | None = None,
           callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Latents (B, C, h, w) from unit noise `latents`, as `settings` say. With the defaults this is sgm's
    `EulerEDMSampler` over the `LegacyDDPMDiscretization` with `VanillaCFG`(5) and `DiscreteDenoiser`:
    the start scaled by sqrt(1 + σ_0²) (`BaseDiffusionSampler.prepare_sampling_loop`) and the UNet's
    timestep the nearest training one. The Karras schedule keeps its earlier behaviour (start at σ_0,
    t(σ) interpolated), which tests/test_sampler.py holds to diffusers' schedulers."""
    legacy = settings.schedule == "legacy"
    t_steps = d.schedule(num_steps, settings.rho, kind=settings.schedule)
    init_sigma = math.sqrt(1 + float(t_steps[0]) ** 2) if legacy else None  # sgm: x *= sqrt(1 + σ_0²)
    return edm_sampler(
        lambda x, sigma: d(x, sigma, cond, uncond, settings.guidance, nearest=legacy), latents, t_steps,
        sampler=settings.sampler, S_churn=settings.S_churn, S_tmin=settings.S_tmin, S_tmax=settings.S_tmax,
        S_noise=settings.S_noise, generators=generators, callback=callback, init_sigma=init_sigma,
    )


# ---------------------------------------------------------------- D(x; σ) from an ε-prediction UNet

@dataclass
class Cond:
    """What the UNet is conditioned on, one row per sample.

    prompt_embeds: (B, L, C) text encoder hidden states; pooled: (B, P) SDXL's pooled text embedding;
    time_ids: (B, 6) SDXL's size/crop conditioning; control: (B, 3, H, W) ControlNet image in [0, 1]."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    control: torch.Tensor | None = None

    def zeros(self) -> Cond:
        """SDXL's unconditional input for classifier-free guidance (`force_zeros_for_empty_prompt`):
        zeroed text embeddings, the same size conditioning and control image."""
        z = lambda t: None if t is None else torch.zeros_like(t)  # noqa: E731
        return Cond(torch.zeros_like(self.prompt_embeds), z(self.pooled), self.time_ids, self.control)


def _cat(a, b):
    return None if a is None else torch.cat([a, b])


class EpsDenoiser:
    """D(x; σ) = x - σ · ε_θ(x / sqrt(σ² + 1), t(σ)) for a discrete ε-prediction UNet (SDXL, SD-1.5),
    optionally with ControlNet residuals and classifier-free guidance.

    Counts its UNet evaluations in `evals` (one per call, whatever the guidance)."""

    def __init__(self, unet, alphas_cumprod: torch.Tensor, controlnet=None, control_scale: float = 1.0):
        self.unet, self.controlnet, self.control_scale = unet, controlnet, control_scale
        self.dtype = unet.dtype if unet is not None else torch.float32  # read once: diffusers' .dtype walks the parameters
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.sigmas = model_sigmas(alphas_cumprod)  # (T,) float64, σ_t of each training timestep
        self.log_sigmas = self.sigmas.log()
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])
        self.evals = 0
        self._t = {}  # (σ, nearest) -> (σ for c_in/c_out, the UNet's timestep); a schedule visits each σ once or twice
        self._guided = (None, None, None)  # (cond, uncond, their concatenation): built once per batch

    def schedule(self, num_steps: int, rho: float = 7.0, kind: str = "karras") -> torch.Tensor:
        """This model's noise levels for num_steps steps, 0 appended: kind="karras" (the default here, for
        the callers written before the legacy schedule), the Karras schedule over its own [σ_min, σ_max];
        kind="legacy", sgm's legacy DDPM discretization of its own σ_t (the default of `Settings`)."""
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES} (got {kind!r})")
        if kind == "legacy":
            return legacy_ddpm_sigmas(num_steps, self.alphas_cumprod)
        return karras_sigmas(num_steps, self.sigma_min, self.sigma_max, rho)

    @torch.no_grad()
    def eps(self, x_in: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """ε_θ(x_in, t | cond): one UNet call (plus the ControlNet's), in the UNet's dtype."""
        dtype = self.dtype
        x_in, emb = x_in.to(dtype), cond.prompt_embeds.to(dtype)
        added = None
        if cond.pooled is not None:  # SDXL's "text_time" added conditioning
            added = {"text_embeds": cond.pooled.to(dtype), "time_ids": cond.time_ids.to(dtype)}
        residuals = {}
        if self.controlnet is not None:
            down, mid = self.controlnet(
                x_in, t, encoder_hidden_states=emb, controlnet_cond=cond.control.to(dtype),
                conditioning_scale=self.control_scale, added_cond_kwargs=added, return_dict=False,
            )
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return self.unet(x_in, t, encoder_hidden_states=emb, added_cond_kwargs=added, return_dict=False, **residuals)[0]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: float, cond: Cond, uncond: Cond | None = None, guidance: float = 1.0,
                 nearest: bool = False) -> torch.Tensor:
        """The denoised estimate of x (B, C, h, w) at noise level σ, in float32.

        guidance > 1: classifier-free guidance, ε = ε_u + w (ε_c - ε_u), with both halves in one UNet
        batch as diffusers and sgm's `VanillaCFG` do; uncond defaults to `cond.zeros()` (SDXL style).
        nearest: sgm's `DiscreteDenoiser`: σ snaps to the nearest training σ_t and the UNet gets the
        integer t; otherwise t(σ) is interpolated in log σ (diffusers, k-diffusion). On the legacy
        schedule's own σ_t both give the same t; they differ between the training timesteps (Karras)."""
        self.evals += 1
        key = (sigma, nearest)
        if key not in self._t:
            if nearest:  # sgm: `possibly_quantize_sigma`, then c_noise = `sigma_to_idx`
                idx = sigma_to_index(sigma, self.sigmas)
                self._t[key] = (float(self.sigmas[idx]), idx.to(torch.float32).to(x.device))
            else:
                self._t[key] = (sigma, sigma_to_t(torch.tensor(sigma), self.log_sigmas).to(torch.float32).to(x.device))
        sigma, t = self._t[key]  # the σ the preconditioning uses, the UNet's timestep
        x_in = x / math.sqrt(sigma**2 + 1)  # c_in
        if guidance == 1.0:
            eps = self.eps(x_in, t, cond).float()
        else:
            eps_u, eps_c = self.eps(torch.cat([x_in, x_in]), t, self._both(cond, uncond)).float().chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        return x - sigma * eps  # c_skip = 1, c_out = -σ

    def _both(self, cond: Cond, uncond: Cond | None) -> Cond:
        """[uncond; cond] in one batch, concatenated once per sampling run rather than per step."""
        c, u, both = self._guided
        if c is not cond or u is not uncond:
            z = uncond if uncond is not None else cond.zeros()
            both = Cond(torch.cat([z.prompt_embeds, cond.prompt_embeds]), _cat(z.pooled, cond.pooled),
                        _cat(z.time_ids, cond.time_ids), _cat(z.control, cond.control))
            self._guided = (cond, uncond, both)
        return both
