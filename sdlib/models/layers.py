"""Building blocks shared by the VAE and the U-Net: normalisation, ResNet blocks, resampling.

Follows the LDM/Stable Diffusion code base (Rombach et al. 2022, `ldm/modules/diffusionmodules`), reduced to what
this project uses.
"""
from __future__ import annotations

import math
from dataclasses import fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with SD's 32 groups, or fewer when `channels` is small or not divisible by 32."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=eps)


def header_dict(args: object) -> dict:
    """A model's argument dataclass as a checkpoint's JSON header: tuples as lists.

    Fields marked `omit_default` (the options added for pretrained Stable Diffusion) are left out while at their
    default, so a checkpoint written with today's defaults is byte-identical to one written before they existed.
    """
    out = {}
    for f in fields(args):
        value = getattr(args, f.name)
        if f.metadata.get("omit_default") and value == f.default:
            continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def zero_module(module: nn.Module) -> nn.Module:
    """Zero-initialise a residual branch's last layer so every block starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice with a residual connection; optionally adds a projected time embedding."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int | None = None, eps: float = 1e-6):
        super().__init__()
        self.norm1 = group_norm(in_ch, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch) if emb_dim else None
        self.norm2 = group_norm(out_ch, eps)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb_proj is not None:
            h = h + self.emb_proj(F.silu(emb))[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 convolution, halving height and width.

    `symmetric` pads one pixel on every side; `asymmetric` pads only the right and bottom, as SD's VAE does.
    """

    def __init__(self, ch: int, pad: Literal["symmetric", "asymmetric"] = "symmetric"):
        super().__init__()
        self.pad = pad
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1 if pad == "symmetric" else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad == "asymmetric":
            x = F.pad(x, (0, 1, 0, 1))  # (left, right, top, bottom)
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution (avoids checkerboard artefacts).

    `size` (H, W) replaces the doubled size where a stride-2 downsampling rounded an odd size up: the U-Net then
    returns to its skip's size, as diffusers' UNet2DConditionModel does (`upsample_size`), e.g. 9 -> 5 -> 9.
    """

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class SelfAttention2d(nn.Module):
    """Single-head spatial self-attention over all pixels, as in the VAE's middle block.

    `fused` computes q, k, v with one 1x1 convolution; `separate` uses three linear maps on the pixel tokens and a
    linear output map, the layout of SD's pretrained VAE (same function, different parameters).
    """

    def __init__(self, ch: int, qkv: Literal["fused", "separate"] = "fused"):
        super().__init__()
        self.norm = group_norm(ch)
        if qkv == "fused":
            self.qkv = nn.Conv2d(ch, 3 * ch, 1)
            self.proj = zero_module(nn.Conv2d(ch, ch, 1))
        else:
            self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
            self.to_out = zero_module(nn.Linear(ch, ch))
        self.fused = qkv == "fused"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if self.fused:
            q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # 3 x (B, HW, C)
            out = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
            return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))
        t = self.norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        out = self.to_out(F.scaled_dot_product_attention(self.to_q(t), self.to_k(t), self.to_v(t)))  # (B, HW, C)
        # diffusers adds in this order: the sum keeps the attention output's channels-last layout, so the next
        # convolution runs the same kernel and the outputs agree bit for bit
        return out.transpose(1, 2).reshape(b, c, h, w) + x
