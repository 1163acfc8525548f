"""The EDM sampler (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", Algorithm 2) over the discrete ε-prediction UNets of SDXL and SD-1.5 (paper appendix A.4:
200 steps for Text2Mask, 40 for Mask2Img).

Three small pieces, in the paper's terms:
- the noise levels: σ(t) = sqrt((1 - ᾱ_t) / ᾱ_t) from the model's own `alphas_cumprod`, so σ_min and
  σ_max are the model's (SDXL: 0.0292, 14.6146), and the Karras schedule with ρ = 7 between them;
- the denoiser D(x; σ) (EDM Table 1, "VP/ε-prediction" preconditioning, as k-diffusion's
  `DiscreteEpsDDPMDenoiser`): c_skip = 1, c_out = -σ, c_in = 1/sqrt(σ² + 1), and the UNet's timestep
  t(σ) interpolated in log σ between the training timesteps, exactly as diffusers' schedulers map it;
  classifier-free guidance and ControlNet residuals live here;
- `edm_sampler`: Heun's second-order steps (Euler as an option) with the stochastic "churn"
  (S_churn, S_tmin, S_tmax, S_noise), written like NVlabs/edm's `generate.py: edm_sampler`.

Why our own and not a diffusers scheduler: diffusers' SDXL config uses `timestep_spacing="leading"`,
which truncates a Karras schedule; `EDMEulerScheduler` assumes EDM-preconditioned models; and the
schedulers hide the churn and Heun's evaluation order behind a stateful `step()`. The sampler below is
the paper's algorithm in twenty lines, and tests/test_sampler.py checks it against diffusers'
`HeunDiscreteScheduler` / `EulerDiscreteScheduler` (Karras sigmas, "linspace" spacing) step for step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

SAMPLERS = ("heun", "euler")


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


# ---------------------------------------------------------------- the sampler

def edm_sampler(
    denoise: Callable[[torch.Tensor, float], torch.Tensor],
    latents: torch.Tensor,
    t_steps: torch.Tensor,
    sampler: str = "heun",
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float = float("inf"),
    S_noise: float = 1.0,
    generators: list[torch.Generator] | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Karras et al. 2022, Algorithm 2 (Euler when sampler="euler": no second-order correction).

    denoise: D(x; σ) -> the denoised estimate, same shape as x. latents: (B, ...) unit-variance noise.
    t_steps: the noise levels σ_0 > ... > σ_{N-1} > 0 followed by 0 (see `karras_sigmas`).
    generators: one CPU generator per sample for the churn noise, so a sample does not depend on its
    batch-mates (None: torch's global generator). Heun costs 2N - 1 evaluations of D, Euler N.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS} (got {sampler!r})")
    num_steps = len(t_steps) - 1
    t_steps = [float(t) for t in t_steps]
    x_next = latents.float() * t_steps[0]  # x_0 ~ N(0, σ_0² I)
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
        self.sigmas = model_sigmas(alphas_cumprod)  # (T,) float64
        self.log_sigmas = self.sigmas.log()
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])
        self.evals = 0
        self._t = {}  # σ -> the UNet's timestep tensor; a schedule visits each σ once or twice
        self._guided = (None, None, None)  # (cond, uncond, their concatenation): built once per batch

    def schedule(self, num_steps: int, rho: float = 7.0) -> torch.Tensor:
        """The Karras schedule over this model's own [σ_min, σ_max], 0 appended."""
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
    def __call__(self, x: torch.Tensor, sigma: float, cond: Cond, uncond: Cond | None = None, guidance: float = 1.0) -> torch.Tensor:
        """The denoised estimate of x (B, C, h, w) at noise level σ, in float32.

        guidance > 1: classifier-free guidance, ε = ε_u + w (ε_c - ε_u), with both halves in one UNet
        batch as diffusers does; uncond defaults to `cond.zeros()` (SDXL style)."""
        self.evals += 1
        if sigma not in self._t:
            self._t[sigma] = sigma_to_t(torch.tensor(sigma), self.log_sigmas).to(torch.float32).to(x.device)
        t = self._t[sigma]  # the UNet's timestep
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
