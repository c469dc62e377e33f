"""Noise schedules as pure functions: training betas (DDPM, Ho et al. 2020) and sampling sigmas (Karras et al. 2022).

Training uses the discrete variance-preserving (VP) process x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.
Sampling works in the variance-exploding (VE) coordinates of k-diffusion, x = x_0 + sigma eps, where
sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) and x_VE = x_VP / sqrt(alpha_bar_t). A sampling schedule is a
decreasing tensor of n + 1 sigmas ending in 0: n denoising steps, the last one down to the clean sample.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

BetaSchedule = Literal["scaled_linear", "linear", "cosine"]
SigmaSchedule = Literal["discrete", "karras"]


def betas(kind: BetaSchedule, num_timesteps: int) -> Tensor:
    """Training betas beta_1..beta_T (float64) for DDPM's linear, SD's scaled_linear or Nichol & Dhariwal's cosine."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if kind == "scaled_linear":  # Stable Diffusion (LDM): linear in sqrt(beta)
        return torch.linspace(0.00085**0.5, 0.012**0.5, num_timesteps, dtype=torch.float64) ** 2
    if kind == "linear":  # Ho et al. 2020, Sec. 4: beta_1 = 1e-4 .. beta_T = 0.02 (tuned for T = 1000)
        return torch.linspace(1e-4, 0.02, num_timesteps, dtype=torch.float64)
    if kind == "cosine":  # Nichol & Dhariwal 2021, eq. 17; beta clipped at 0.999 to avoid a singularity at t = T
        s = 0.008
        t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        alpha_bar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {kind!r} (choose from scaled_linear, linear, cosine)")


def alphas_cumprod(betas: Tensor) -> Tensor:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s) (Ho et al. 2020, eq. 4)."""
    return torch.cumprod(1 - betas, dim=0)


def vp_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """The VE noise level of each training timestep, sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), increasing."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sigmas_discrete(train_sigmas: Tensor, n: int) -> Tensor:
    """n training timesteps evenly spaced with "trailing" spacing (Lin et al. 2024, Table 2), so the first is T-1."""
    num_timesteps = len(train_sigmas)
    if not 1 <= n <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps} for a discrete schedule, got {n}")
    # t_i = round(T - i T/n) - 1 for i = 0..n-1: T-1 first, then every T/n timesteps down to about T/n - 1
    t = (num_timesteps - torch.arange(n, dtype=torch.float64) * num_timesteps / n).round().long() - 1
    return _append_zero(train_sigmas[t])


def sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, then 0."""
    if n < 1:
        raise ValueError(f"steps must be >= 1, got {n}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min} and {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def get_sigmas(kind: SigmaSchedule, train_sigmas: Tensor, n: int) -> Tensor:
    """A sampling schedule of n steps (n + 1 sigmas ending in 0) spanning the training noise levels."""
    if kind == "discrete":
        return sigmas_discrete(train_sigmas, n)
    if kind == "karras":
        return sigmas_karras(n, float(train_sigmas.min()), float(train_sigmas.max()))
    raise ValueError(f"unknown sigma schedule {kind!r} (choose from discrete, karras)")
