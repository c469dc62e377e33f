"""Image-to-image by SDEdit (Meng et al. 2022): noise the input latent to an intermediate level, then denoise.

Meng et al. start the reverse SDE at t0 in (0, 1] from x(t0) = x0 + sigma(t0) z (Alg. 1); here t0 = `strength` is the
fraction of the sampling schedule that is run, as in diffusers' img2img pipelines: strength 1 is plain generation
from pure noise, a small strength keeps only the last low-noise steps and changes the image little.
"""
from __future__ import annotations

import math

from torch import Tensor

from sdlib.diffusion.samplers import ImageRNG


def img2img_sigmas(sigmas_full: Tensor, strength: float) -> Tensor:
    """The tail of a schedule of n steps (n + 1 sigmas ending in 0) keeping the last floor(strength * n) steps."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if sigmas_full.ndim != 1 or sigmas_full[-1] != 0:
        raise ValueError("sigmas_full must be a 1-D schedule ending in 0")
    steps = len(sigmas_full) - 1
    kept = min(math.floor(strength * steps + 1e-9), steps)  # + 1e-9: 0.29 * 100 is 28.999...
    return sigmas_full[steps - kept:]  # (kept + 1,): starts at sigma(t0), or just [0] when no step is kept


def noised_start(z0: Tensor, sigma: Tensor | float, rng: ImageRNG) -> Tensor:
    """x(t0) = x0 + sigma(t0) z with z ~ N(0, I) per image (Meng et al. 2022, Alg. 1, VE-SDE)."""
    return z0 + sigma * rng.randn_like(z0)
