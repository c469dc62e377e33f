"""The assembled latent diffusion model: U-Net + text encoder + noise schedule + VAE, saved and loaded as a unit.

`LatentDiffusion` is what `train_unet` trains (the U-Net and the text encoder jointly) and what `sample` loads;
its checkpoint carries every config needed to rebuild it, so sampling needs only the files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sdlib.config import TextConfig
from sdlib.denoisers import Denoiser
from sdlib.guidance import CFGDenoiser
from sdlib.img2img import img2img_sigmas, noised_start
from sdlib.samplers import ImageRNG, sample
from sdlib.cli import DataError
from sdlib.io import CheckpointError, load_weights, save_weights
from sdlib.schedules import alphas_cumprod, betas, get_sigmas
from sdlib.text import TextEncoder, load_tokenizer, tokenize
from sdlib.unet import UNet, UNetArgs
from sdlib.vae import AutoencoderKL


@dataclass(frozen=True)
class DiffusionArgs:
    beta_schedule: str = "scaled_linear"
    num_timesteps: int = 1000
    prediction: str = "eps"
    scale_factor: float = 1.0  # latents are multiplied by this before diffusion (SD: 0.18215)


class LatentDiffusion(nn.Module):
    """U-Net noise predictor conditioned on a jointly trained text encoder, wrapped as a denoiser D(x, sigma, ctx)."""

    def __init__(self, unet_args: UNetArgs, text_cfg: TextConfig, diffusion: DiffusionArgs,
                 latent_hw: tuple[int, int] = (8, 8)):
        super().__init__()
        self.unet_args, self.text_cfg, self.diffusion = unet_args, text_cfg, diffusion
        self.latent_hw = tuple(latent_hw)
        self.unet = UNet(unet_args)
        self.text = TextEncoder(text_cfg)
        ac = alphas_cumprod(betas(diffusion.beta_schedule, diffusion.num_timesteps)).float()
        self.denoiser = Denoiser(self.unet, ac, diffusion.prediction)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> context (B, L, D) for cross-attention."""
        return self.text(ids)

    def meta(self) -> dict:
        return {"kind": "ldm", "unet": self.unet_args.to_dict(), "text": self.text_cfg.model_dump(),
                "diffusion": self.diffusion.__dict__, "latent_hw": list(self.latent_hw)}


def save_ldm(path: Path, model: LatentDiffusion, extra: dict | None = None) -> None:
    tensors = {f"unet.{k}": v for k, v in model.unet.state_dict().items()}
    tensors |= {f"text.{k}": v for k, v in model.text.state_dict().items()}
    save_weights(path, tensors, {**model.meta(), **(extra or {})})


def load_ldm(path: Path, device: torch.device | str = "cpu") -> tuple[LatentDiffusion, dict]:
    """Rebuild the latent diffusion model (EMA weights) from its checkpoint alone; returns (model, meta)."""
    tensors, meta = load_weights(path, kind="ldm")
    try:
        u = meta["unet"]
        unet_args = UNetArgs(**{**u, "channel_mult": tuple(u["channel_mult"]),
                                "attention_levels": tuple(u["attention_levels"])})
        model = LatentDiffusion(unet_args, TextConfig(**meta["text"]), DiffusionArgs(**meta["diffusion"]),
                                tuple(meta["latent_hw"]))
        model.unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
        model.text.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("text.")})
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: checkpoint does not match the model ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), meta


class Prompts:
    """Tokenizer + text encoder: prompts -> cross-attention context."""

    def __init__(self, tokenizer_dir: Path, model: LatentDiffusion):
        self.model = model
        self.max_length = model.text_cfg.max_length
        self.tokenizer = load_tokenizer(tokenizer_dir, self.max_length)

    def ids(self, prompts: list[str]) -> torch.Tensor:
        return tokenize(self.tokenizer, prompts, self.max_length)

    @torch.no_grad()
    def context(self, prompts: list[str], device: torch.device | str) -> torch.Tensor:
        return self.model.encode_text(self.ids(prompts).to(device))


DISCRETE_SAMPLERS = ("ddpm", "ddim", "pndm")  # defined on the training timesteps in their papers


def sampling_sigmas(model: LatentDiffusion, sampler: str, steps: int, schedule: str = "auto") -> torch.Tensor:
    """The n+1 noise levels a sampler visits: SD's discrete timesteps or Karras et al.'s schedule, ending in 0."""
    if schedule == "auto":
        schedule = "discrete" if sampler in DISCRETE_SAMPLERS else "karras"
    return get_sigmas(schedule, model.denoiser.train_sigmas, steps)


@torch.no_grad()
def generate(
    model: LatentDiffusion,
    vae: AutoencoderKL,
    prompts: Prompts,
    texts: list[str],
    seeds: list[int],
    *,
    sampler: str = "dpmpp_2m",
    steps: int = 20,
    guidance: float = 3.0,
    schedule: str = "auto",
    negative_prompt: str = "",
    init_image: torch.Tensor | None = None,
    strength: float = 1.0,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Text-to-image (or, with `init_image` (C, H, W) in [-1, 1], SDEdit image-to-image): images (B, C, H, W)."""
    device = next(model.parameters()).device
    scale = model.diffusion.scale_factor
    context = prompts.context(texts, device)  # (B, L, D)
    uncond = prompts.context([negative_prompt], device)  # (1, L, D), broadcast over the batch
    denoiser = CFGDenoiser(model.denoiser, context, uncond, guidance)
    sigmas = sampling_sigmas(model, sampler, steps, schedule).to(device)
    rng = ImageRNG(seeds, device)
    latent_shape = (model.unet_args.in_channels, *model.latent_hw)
    if init_image is None:
        x = rng.randn(latent_shape) * sigmas[0]  # (B, z, h, w)
    else:
        z0 = vae.encode(init_image[None].to(device)).mean * scale  # (1, z, h, w)
        sigmas = img2img_sigmas(sigmas, strength)
        x = noised_start(z0.expand(len(seeds), -1, -1, -1), sigmas[0], rng)
    z = sample(sampler, denoiser, x, sigmas, rng=rng, callback=callback)
    return vae.decode(z / scale).clamp(-1.0, 1.0)


def load_init_image(path: Path, channels: int, size: int) -> torch.Tensor:
    """An image-to-image start: a PNG/JPEG of the model's size -> (C, size, size) in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: cannot read init image ({type(e).__name__})") from None
    if im.size != (size, size):
        raise DataError(f"{path}: init image is {im.size[0]}x{im.size[1]}, the model draws {size}x{size}")
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(size, size, channels)
    return x.permute(2, 0, 1).float() / 127.5 - 1.0  # (C, H, W)
