"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper that samplers see as D(x, sigma).

Eq. 6 of the paper, written for x0 rather than eps (the two are the same affine map of the net output at fixed
x and sigma): D_w(x, sigma) = D(x, sigma, c_uncond) + w (D(x, sigma, c) - D(x, sigma, c_uncond)). w = 1 is the plain
conditional model, w = 0 the unconditional one, w > 1 trades diversity for prompt adherence.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class ContextDenoiser(Protocol):
    def __call__(self, x: Tensor, sigma: Tensor, context: Tensor | None) -> Tensor: ...


class CFGDenoiser:
    """(x, sigma) -> x0 with guidance scale `scale`, one batched call of `denoiser` per evaluation."""

    def __init__(self, denoiser: ContextDenoiser, cond: Tensor, uncond: Tensor, scale: float):
        if scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {scale}")
        if uncond.ndim != cond.ndim or uncond.shape[1:] != cond.shape[1:] or uncond.shape[0] not in (1, cond.shape[0]):
            raise ValueError(f"uncond context {tuple(uncond.shape)} does not match cond context {tuple(cond.shape)}")
        self.denoiser, self.cond, self.scale = denoiser, cond, scale
        self.uncond = uncond.expand_as(cond)  # (B, L, C): one "" or negative prompt shared by the batch, or one each

    def __call__(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        if x.shape[0] != self.cond.shape[0]:
            raise ValueError(f"batch of {x.shape[0]} images for {self.cond.shape[0]} conditioning contexts")
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])  # (B,)
        # w = 1 and w = 0 are exact and need only half the batch
        if self.scale == 1:
            return self.denoiser(x, sigma, self.cond)
        if self.scale == 0:
            return self.denoiser(x, sigma, self.uncond)
        context = torch.cat([self.uncond, self.cond])  # (2B, L, C)
        x0 = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), context)  # (2B, ...)
        x0_uncond, x0_cond = x0.chunk(2)
        return x0_uncond + self.scale * (x0_cond - x0_uncond)  # Ho & Salimans 2022, eq. 6
