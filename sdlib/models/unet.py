"""Text-conditioned latent U-Net noise predictor, after Stable Diffusion's UNetModel (Rombach et al. 2022, app. E).

ResNet blocks carry a sinusoidal time embedding (Ho et al. 2020); spatial transformers (self-attention, then
cross-attention to the text encoder's token states, then a GEGLU feed-forward) sit at the levels listed in
`attention_levels`; the decoder receives the encoder's activations through `concat` (SD, Ronneberger et al. 2015) or
`add` skip connections. The network predicts eps (or v); it knows nothing of noise schedules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sdlib.models.layers import Downsample, ResBlock, Upsample, group_norm, header_dict, zero_module

SD_OPTION = {"omit_default": True}  # an option added for pretrained SD v1.x: headers leave it out at its default


@dataclass(frozen=True, kw_only=True)
class UNetArgs:
    in_channels: int = 4  # latent channels
    context_dim: int = 128  # width of the text encoder's token states
    model_channels: int = 64  # width of the first level
    channel_mult: tuple[int, ...] = (1, 2)  # width multiplier per level; one 2x downsampling between levels
    num_res_blocks: int = 1  # ResNet blocks per level on the way down (one more on the way up, as SD)
    attention_levels: tuple[int, ...] = (1,)  # levels that get a spatial transformer after each ResNet block
    transformer_depth: int = 1  # transformer blocks per spatial transformer
    num_heads: int = 4
    skip: Literal["concat", "add"] = "concat"
    # GroupNorm eps of the ResNet blocks and the output norm (SD v1: 1e-5); spatial transformers keep 1e-6, as SD
    norm_eps: float = field(default=1e-6, metadata=SD_OPTION)
    # the spatial transformer's proj_in/proj_out: linear maps on the tokens, or 1x1 convolutions (SD v1)
    transformer_proj: Literal["linear", "conv"] = field(default="linear", metadata=SD_OPTION)

    def __post_init__(self):
        levels = len(self.channel_mult)
        if any(not 0 <= lvl < levels for lvl in self.attention_levels):
            raise ValueError(f"attention_levels {self.attention_levels} must lie in 0..{levels - 1}")
        if self.skip not in ("concat", "add"):
            raise ValueError(f"skip must be concat or add, got {self.skip!r}")
        if self.transformer_proj not in ("linear", "conv"):
            raise ValueError(f"transformer_proj must be linear or conv, got {self.transformer_proj!r}")
        bad = sorted({w for w in self.attention_widths() if w % self.num_heads})
        if bad:
            raise ValueError(f"num_heads={self.num_heads} must divide the width of every attention level, "
                             f"not {', '.join(map(str, bad))}")

    def attention_widths(self) -> tuple[int, ...]:
        """Channel widths of the spatial transformers: the listed levels and the middle block."""
        mult = self.channel_mult
        return (*(self.model_channels * mult[lvl] for lvl in self.attention_levels), self.model_channels * mult[-1])

    @classmethod
    def from_dict(cls, d: dict) -> "UNetArgs":
        """The inverse of `to_dict` (a checkpoint's JSON header)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def to_dict(self) -> dict:
        return header_dict(self)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017, sec. 3.5): (B,) -> (B, dim).

    Cosines first, frequencies max_period^(-i/half): SD's CompVis code, and diffusers' with flip_sin_to_cos=True,
    freq_shift=0 (SD v1's U-Net config), in the same float32 operations.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, else cross-attention to `context`.

    With `store_maps` set, the attention probabilities are kept in `maps` (B, heads, Nq, Nk) for visualisation; the
    fast path uses fused scaled-dot-product attention, which never materialises them.
    """

    def __init__(self, dim: int, context_dim: int | None, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.store_maps = False
        self.maps: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        ctx = x if context is None else context
        split = lambda t: t.reshape(b, -1, self.heads, d // self.heads).transpose(1, 2)  # (B, h, N, d/h)
        q, k, v = split(self.to_q(x)), split(self.to_k(ctx)), split(self.to_v(ctx))
        if self.store_maps:
            attn = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)  # (B, h, Nq, Nk)
            self.maps = attn.detach()
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))  # (B, N, D)


class GEGLU(nn.Module):
    """Gated GELU feed-forward (Shazeer 2020), as in SD's transformer blocks."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, None, heads)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, context_dim, heads)
        self.norm3, self.ff = nn.LayerNorm(dim), GEGLU(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Treats the (H, W) grid as H*W tokens, runs transformer blocks on them, and adds the result back.

    `proj` "linear" maps the tokens in and out with linear layers; "conv" with 1x1 convolutions on the grid, as SD v1
    (the same function; only the parameter shapes differ).
    """

    def __init__(self, ch: int, context_dim: int, heads: int, depth: int, proj: Literal["linear", "conv"] = "linear"):
        super().__init__()
        self.norm = group_norm(ch)
        self.conv_proj = proj == "conv"
        self.proj_in = nn.Conv2d(ch, ch, 1) if self.conv_proj else nn.Linear(ch, ch)
        self.blocks = nn.ModuleList(TransformerBlock(ch, context_dim, heads) for _ in range(depth))
        self.proj_out = zero_module(nn.Conv2d(ch, ch, 1) if self.conv_proj else nn.Linear(ch, ch))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if self.conv_proj:
            t = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, C)
        else:
            t = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, C)
        for block in self.blocks:
            t = block(t, context)
        if self.conv_proj:
            return x + self.proj_out(t.transpose(1, 2).reshape(b, c, h, w))
        return x + self.proj_out(t).transpose(1, 2).reshape(b, c, h, w)


class Level(nn.Module):
    """One ResNet block, optionally followed by a spatial transformer."""

    def __init__(self, res: ResBlock, attn: SpatialTransformer | None):
        super().__init__()
        self.res, self.attn = res, attn

    def forward(self, x, emb, context):
        x = self.res(x, emb)
        return self.attn(x, context) if self.attn is not None else x


class UNet(nn.Module):
    def __init__(self, a: UNetArgs):
        super().__init__()
        self.args = a
        mc, emb_dim = a.model_channels, 4 * a.model_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(a.in_channels, mc, 3, padding=1)

        def transformer(ch: int) -> SpatialTransformer:
            return SpatialTransformer(ch, a.context_dim, a.num_heads, a.transformer_depth, a.transformer_proj)

        def level(cin: int, cout: int, lvl: int) -> Level:
            attn = transformer(cout)
            return Level(ResBlock(cin, cout, emb_dim, a.norm_eps), attn if lvl in a.attention_levels else None)

        self.down = nn.ModuleList()
        skip_chs, ch = [mc], mc
        for lvl, mult in enumerate(a.channel_mult):
            for _ in range(a.num_res_blocks):
                self.down.append(level(ch, mc * mult, lvl))
                ch = mc * mult
                skip_chs.append(ch)
            if lvl < len(a.channel_mult) - 1:
                self.down.append(Downsample(ch))
                skip_chs.append(ch)

        top = len(a.channel_mult) - 1
        self.mid = nn.ModuleList([level(ch, ch, top), Level(ResBlock(ch, ch, emb_dim, a.norm_eps), None)])
        if self.mid[0].attn is None:  # the middle block always attends, as in SD
            self.mid[0].attn = transformer(ch)

        self.up = nn.ModuleList()
        self.skip_proj = nn.ModuleList()
        for lvl, mult in reversed(list(enumerate(a.channel_mult))):
            for i in range(a.num_res_blocks + 1):
                skip = skip_chs.pop()
                if a.skip == "concat":
                    self.skip_proj.append(nn.Identity())
                    self.up.append(level(ch + skip, mc * mult, lvl))
                else:  # add: bring the skip to the current width, then sum
                    self.skip_proj.append(nn.Conv2d(skip, ch, 1) if skip != ch else nn.Identity())
                    self.up.append(level(ch, mc * mult, lvl))
                ch = mc * mult
                if lvl > 0 and i == a.num_res_blocks:
                    self.up.append(Upsample(ch))
                    self.skip_proj.append(None)
        self.out = nn.Sequential(group_norm(ch, a.norm_eps), nn.SiLU(), zero_module(nn.Conv2d(ch, a.in_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) noisy latents (scaled by c_in), t: (B,) timesteps, context: (B, L, D) token states.

        Inputs are cast to the weights' dtype (the timestep embedding after its float32 sin/cos, as diffusers); the
        output is in that dtype.
        """
        dtype = self.conv_in.weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.args.model_channels).to(dtype))  # (B, 4*mc)
        x, context = x.to(dtype), context.to(dtype)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h) if isinstance(block, Downsample) else block(h, emb, context)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb, context)
        for block, proj in zip(self.up, self.skip_proj):
            if isinstance(block, Upsample):
                h = block(h, skips[-1].shape[-2:])  # the next skip's size: latents need not be multiples of 2^levels
                continue
            skip = skips.pop()
            h = torch.cat([h, skip], dim=1) if self.args.skip == "concat" else h + proj(skip)
            h = block(h, emb, context)
        return self.out(h)

    def attention_modules(self) -> list[Attention]:
        """The cross-attention layers, in forward order (for attention-map visualisations)."""
        return [m.attn2 for m in self.modules() if isinstance(m, TransformerBlock)]
