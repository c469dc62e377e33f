"""KL-regularised convolutional autoencoder: Stable Diffusion's AutoencoderKL (Rombach et al. 2022, sec. 3.1).

The encoder maps an image (B, C, H, W) to a diagonal Gaussian over latents (B, z, H/f, W/f) with
f = 2 ** (len(channel_mult) - 1); the decoder maps latents back. Training minimises reconstruction error plus a small
KL term towards N(0, I) (`kl_weight`), which keeps the latent space smooth without constraining it much. SD adds a
perceptual (LPIPS) and a patch-GAN loss; on small images an L1 + KL objective is enough and keeps this runnable on a CPU.

`IdentityAutoencoder` (`vae.kind: none`) has the same interface and no weights: the latents are the pixels themselves,
so the U-Net diffuses pixels, as DDPM (Ho et al. 2020) does, and the pipeline shows what the latent space buys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sdlib.errors import CheckpointError
from sdlib.io import load_weights, save_weights
from sdlib.models.layers import Downsample, ResBlock, SelfAttention2d, Upsample, group_norm, header_dict

SD_OPTION = {"omit_default": True}  # an option added for pretrained SD v1.x: headers leave it out at its default


@dataclass(frozen=True, kw_only=True)
class VAEArgs:
    in_channels: int = 1  # image channels
    base_channels: int = 32  # width of the first level
    channel_mult: tuple[int, ...] = (1, 2, 2)  # width multiplier per level; one 2x downsampling between levels
    num_res_blocks: int = 1  # ResNet blocks per level (decoder uses one more, as SD)
    latent_channels: int = 4  # SD v1 uses 4
    # SD v1's layout, each the same kind of function with other parameters:
    # 1x1 convolutions on the posterior's moments (quant_conv) and on the latents before decoding (post_quant_conv)
    quant_conv: Literal["none", "1x1"] = field(default="none", metadata=SD_OPTION)
    # padding of the stride-2 downsampling convolutions: 1 on every side, or only right and bottom (SD v1)
    downsample_pad: Literal["symmetric", "asymmetric"] = field(default="symmetric", metadata=SD_OPTION)
    # the middle blocks' attention: one fused qkv convolution, or separate q, k, v and output linear maps (SD v1)
    attention_qkv: Literal["fused", "separate"] = field(default="fused", metadata=SD_OPTION)

    def __post_init__(self):
        for name, choices in (("quant_conv", ("none", "1x1")), ("downsample_pad", ("symmetric", "asymmetric")),
                              ("attention_qkv", ("fused", "separate"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "VAEArgs":
        """The inverse of `to_dict` (a checkpoint's JSON header)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict:
        return header_dict(self)


class DiagonalGaussian:
    """q(z|x) = N(mean, exp(logvar)), the encoder's posterior."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """z = mean + std * noise, with noise ~ N(0, I) from `generator` unless given (e.g. a rank's slice of a draw)."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) summed over latent dimensions, per example: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class Encoder(nn.Module):
    def __init__(self, a: VAEArgs):
        super().__init__()
        chs = [a.base_channels * m for m in a.channel_mult]
        self.conv_in = nn.Conv2d(a.in_channels, chs[0], 3, padding=1)
        blocks: list[nn.Module] = []
        ch = chs[0]
        for level, out in enumerate(chs):
            for _ in range(a.num_res_blocks):
                blocks.append(ResBlock(ch, out))
                ch = out
            if level < len(chs) - 1:
                blocks.append(Downsample(ch, a.downsample_pad))
        self.down = nn.Sequential(*blocks)
        self.mid = nn.Sequential(ResBlock(ch, ch), SelfAttention2d(ch, a.attention_qkv), ResBlock(ch, ch))
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, 2 * a.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))  # (B, C, H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2z, H/f, W/f): mean and logvar


class Decoder(nn.Module):
    def __init__(self, a: VAEArgs):
        super().__init__()
        chs = [a.base_channels * m for m in a.channel_mult]
        ch = chs[-1]
        self.conv_in = nn.Conv2d(a.latent_channels, ch, 3, padding=1)
        self.mid = nn.Sequential(ResBlock(ch, ch), SelfAttention2d(ch, a.attention_qkv), ResBlock(ch, ch))
        blocks: list[nn.Module] = []
        for level in reversed(range(len(chs))):
            for _ in range(a.num_res_blocks + 1):
                blocks.append(ResBlock(ch, chs[level]))
                ch = chs[level]
            if level > 0:
                blocks.append(Upsample(ch))
        self.up = nn.Sequential(*blocks)
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, a.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))  # (B, C, H, W)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    kind: ClassVar[str] = "kl"  # vae.kind

    def __init__(self, args: VAEArgs, scale_factor: float | None = None):
        super().__init__()
        self.args = args
        # latents are multiplied by this before diffusion, part of the latent space as diffusers' `scaling_factor`:
        # train_vae estimates it, a converted SD VAE has its checkpoint's; None: not known yet (encode_latents
        # estimates it from the training set)
        self.scale_factor = scale_factor
        self.encoder = Encoder(args)
        self.decoder = Decoder(args)
        if args.quant_conv == "1x1":
            z = args.latent_channels
            self.quant_conv, self.post_quant_conv = nn.Conv2d(2 * z, 2 * z, 1), nn.Conv2d(z, z, 1)
        else:
            self.quant_conv = self.post_quant_conv = None

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        moments = self.encoder(x)  # (B, 2z, H/f, W/f)
        return DiagonalGaussian(moments if self.quant_conv is None else self.quant_conv(moments))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior


@dataclass(frozen=True, kw_only=True)
class IdentityArgs:
    """Pixel space: the latents are the images, at the same size and with the same channels."""

    in_channels: int = 1  # image channels
    factor: ClassVar[int] = 1  # no downsampling

    @classmethod
    def from_dict(cls, d: dict) -> "IdentityArgs":
        return cls(**d)

    @property
    def latent_channels(self) -> int:
        return self.in_channels

    def to_dict(self) -> dict:
        return header_dict(self)


class PointMass:
    """q(z|x) = delta(z - x): the identity's posterior, with `DiagonalGaussian`'s mean, std and sample."""

    def __init__(self, x: torch.Tensor):
        self.mean, self.std = x, torch.zeros_like(x)

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.mean


class IdentityAutoencoder(nn.Module):
    """`vae.kind: none`: encode and decode return their input, unchanged, and the latents go to the U-Net unscaled
    (pixels in [-1, 1], as in DDPM)."""

    kind: ClassVar[str] = "none"
    scale_factor: ClassVar[float | None] = 1.0

    def __init__(self, args: IdentityArgs):
        super().__init__()
        self.args = args

    def encode(self, x: torch.Tensor) -> PointMass:
        return PointMass(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


Autoencoder = AutoencoderKL | IdentityAutoencoder
AUTOENCODERS = {"kl": (AutoencoderKL, VAEArgs), "none": (IdentityAutoencoder, IdentityArgs)}  # by vae.kind


def vae_loss(x: torch.Tensor, recon: torch.Tensor, posterior: DiagonalGaussian, kl_weight: float):
    """Per-pixel L1 reconstruction + kl_weight * KL per pixel (LDM's weighting, without LPIPS/GAN terms)."""
    rec = (recon - x).abs().mean()
    kl = posterior.kl().mean() / x[0].numel()
    return rec + kl_weight * kl, rec.detach(), kl.detach()


def image_psnr(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image (N,), for images in [-1, 1] (peak-to-peak 2)."""
    mse = (recon.clamp(-1, 1) - x).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


def psnr(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Mean PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    return image_psnr(x, recon).mean()


VAE_VALUES = 2**22  # input values per VAE batch: 256 images up to 64x64 RGB, 5 at SD's 512x512 (~0.7 GB a layer)


def vae_batch(image_shape: tuple[int, ...] | torch.Size) -> int:
    """Images (C, H, W) per batch through the VAE: 256, fewer for large images, so that the activations of SD's
    128-channel VAE at 512x512 stay near a gigabyte a layer."""
    return max(1, min(256, VAE_VALUES // math.prod(image_shape)))


@torch.no_grad()
def reconstruct(vae: Autoencoder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The VAE's reconstructions decode(mean of encode(x)) of images (N, C, H, W) in [-1, 1], clamped to [-1, 1]."""
    device = next(vae.parameters(), images).device  # the identity has no parameters: it runs where the images are
    out = [vae.decode(vae.encode(x.to(device)).mean).clamp(-1, 1).cpu().contiguous() for x in images.split(batch_size)]
    return torch.cat(out)


@torch.no_grad()
def encode_posteriors(vae: Autoencoder, images: torch.Tensor,
                      batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image: 2 x (N, z, H/f, W/f), on the CPU."""
    device = next(vae.parameters(), images).device  # the identity has no parameters: it runs where the images are
    means, stds = [], []
    for x in images.split(batch_size):
        posterior = vae.encode(x.to(device))
        means.append(posterior.mean.cpu().contiguous())  # NCHW: a channels_last VAE gives NHWC-strided tensors
        stds.append(posterior.std.cpu().contiguous())
    return torch.cat(means), torch.cat(stds)


def reconstruction_psnr(images: torch.Tensor, recon: torch.Tensor) -> float:
    """Mean PSNR (dB) of reconstructions against their originals, both in [-1, 1]."""
    return float(psnr(images, recon))


def save_vae(path: str | Path, vae: Autoencoder) -> None:
    """The VAE's weights with its config, so that `load_vae` rebuilds it from the file alone. The header names the
    identity (`"autoencoder": "none"`, no tensors); a kl one is written as it was before pixel space existed."""
    which = {} if vae.kind == "kl" else {"autoencoder": vae.kind}
    if vae.kind == "kl" and vae.scale_factor is not None:
        which["scale_factor"] = vae.scale_factor
    save_weights(path, vae.state_dict(), {"kind": "vae", **which, "args": vae.args.to_dict()})


def load_vae(path: Path, device: torch.device | str = "cpu") -> Autoencoder:
    """Rebuild the VAE (or the identity of pixel space) from its checkpoint alone."""
    tensors, meta = load_weights(path, kind="vae")
    try:
        kind = meta.get("autoencoder", "kl")
        if kind not in AUTOENCODERS:
            raise ValueError(f"unknown autoencoder {kind!r}")
        model, args = AUTOENCODERS[kind]
        vae = model(args.from_dict(meta["args"]))
        if "scale_factor" in meta:  # kl only (save_vae); older files carry none
            vae.scale_factor = float(meta["scale_factor"])
            if not 0 < vae.scale_factor < math.inf:
                raise ValueError(f"scale factor {vae.scale_factor}")
        vae.load_state_dict(tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: VAE checkpoint does not match the model ({str(e).splitlines()[0]})") from None
    return vae.to(device, memory_format=torch.channels_last).eval()  # NHWC: oneDNN's and cuDNN's fast path
