"""Stable Diffusion v1.x's architecture as sdlib arguments (Rombach et al. 2022; the v1-inference.yaml of CompVis).

SD v1.1-v1.5 and their fine-tunes share one architecture: a 860M-parameter U-Net (320 channels, multipliers
(1, 2, 4, 4), two ResNet blocks per level, spatial transformers with 8 heads at levels 0-2 and in the middle), the
KL-f8 autoencoder (128 channels, (1, 2, 4, 4)) and CLIP ViT-L/14's text tower (768 wide, 12 layers, 77 tokens).
Nothing is fetched: users bring the weights. `TINY_SD_V1` has the same layout, hence the same code paths and key
names, at a few million parameters, for tests.
"""
from __future__ import annotations

from dataclasses import dataclass

from sdlib.ldm import DiffusionArgs
from sdlib.models.text import TextEncoderArgs
from sdlib.models.unet import UNetArgs
from sdlib.models.vae import VAEArgs


@dataclass(frozen=True, kw_only=True)
class SDConfig:
    unet: UNetArgs
    vae: VAEArgs
    text: TextEncoderArgs
    diffusion: DiffusionArgs
    latent_hw: tuple[int, int] = (64, 64)  # latents drawn by default (512 x 512 images at the VAE's factor 8)


def sd_v1_unet(model_channels: int, context_dim: int) -> UNetArgs:
    """SD v1's U-Net layout at a given width (320 and 768 for the real one)."""
    return UNetArgs(in_channels=4, context_dim=context_dim, model_channels=model_channels, channel_mult=(1, 2, 4, 4),
                    num_res_blocks=2, attention_levels=(0, 1, 2), transformer_depth=1, num_heads=8, skip="concat",
                    norm_eps=1e-5, transformer_proj="conv")


def sd_v1_vae(base_channels: int) -> VAEArgs:
    """SD v1's KL-f8 autoencoder layout at a given width (128 for the real one)."""
    return VAEArgs(in_channels=3, base_channels=base_channels, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                   latent_channels=4, quant_conv="1x1", downsample_pad="asymmetric", attention_qkv="separate")


# scaled_linear betas from 0.00085 to 0.012 over 1000 steps, eps-prediction; latents scaled by 0.18215 (unit variance)
SD_V1_DIFFUSION = DiffusionArgs(beta_schedule="scaled_linear", num_timesteps=1000, prediction="eps",
                                scale_factor=0.18215)

SD_V1 = SDConfig(unet=sd_v1_unet(320, 768), vae=sd_v1_vae(128),
                 text=TextEncoderArgs(hidden_size=768, num_layers=12, num_heads=12, max_length=77),
                 diffusion=SD_V1_DIFFUSION, latent_hw=(64, 64))

TINY_SD_V1 = SDConfig(unet=sd_v1_unet(32, 32), vae=sd_v1_vae(32),
                      text=TextEncoderArgs(hidden_size=32, num_layers=2, num_heads=4, max_length=77),
                      diffusion=SD_V1_DIFFUSION, latent_hw=(8, 8))

# The architectures a single file can be read as (a diffusers folder's config files give its own), by CLI name.
ARCHITECTURES = {"sd_v1": SD_V1, "tiny_sd_v1": TINY_SD_V1}
