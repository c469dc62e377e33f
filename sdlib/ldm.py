"""The assembled latent diffusion model: U-Net + text encoder + noise schedule, saved and loaded as a unit.

`LatentDiffusion` is what `train_unet` trains (the U-Net and the text encoder jointly) and what `sample` loads
(`sdlib.generate` draws with it); its checkpoint carries every argument needed to rebuild it, so sampling needs
only the files.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from sdlib.diffusion.denoisers import Denoiser
from sdlib.diffusion.schedules import BetaSchedule, alphas_cumprod, betas
from sdlib.errors import CheckpointError
from sdlib.io import load_weights, save_weights
from sdlib.models.text import TextEncoder, TextEncoderArgs
from sdlib.models.unet import UNet, UNetArgs


@dataclass(frozen=True, kw_only=True)
class DiffusionArgs:
    beta_schedule: BetaSchedule = "scaled_linear"
    num_timesteps: int = 1000
    prediction: Literal["eps", "v"] = "eps"
    scale_factor: float = 1.0  # latents are multiplied by this before diffusion (SD: 0.18215)


class LatentDiffusion(nn.Module):
    """U-Net noise predictor conditioned on a jointly trained text encoder, wrapped as a denoiser D(x, sigma, ctx)."""

    def __init__(self, *, unet: UNetArgs, text: TextEncoderArgs, diffusion: DiffusionArgs,
                 latent_hw: tuple[int, int] = (8, 8)):
        super().__init__()
        if unet.context_dim != text.hidden_size:
            raise ValueError(f"the U-Net cross-attends to {unet.context_dim}-d states, the text encoder makes "
                             f"{text.hidden_size}-d ones")
        self.unet_args, self.text_args, self.diffusion = unet, text, diffusion
        self.latent_hw = tuple(latent_hw)
        self.unet = UNet(unet)
        self.text = TextEncoder(text)
        ac = alphas_cumprod(betas(diffusion.beta_schedule, diffusion.num_timesteps)).float()
        self.denoiser = Denoiser(self.unet, ac, diffusion.prediction)

    def encode_text(self, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """Token ids (B, L) -> context (B, L, D) for cross-attention (see `TextEncoder.forward` for clip_skip)."""
        return self.text(ids, clip_skip)

    def meta(self) -> dict:
        return {"kind": "ldm", "unet": self.unet_args.to_dict(), "text": self.text_args.to_dict(),
                "diffusion": asdict(self.diffusion), "latent_hw": list(self.latent_hw)}


def save_ldm(path: Path, model: LatentDiffusion, extra: dict | None = None) -> None:
    tensors = {f"unet.{k}": v for k, v in model.unet.state_dict().items()}
    tensors |= {f"text.{k}": v for k, v in model.text.state_dict().items()}
    save_weights(path, tensors, {**model.meta(), **(extra or {})})


def load_ldm(path: Path, device: torch.device | str = "cpu") -> tuple[LatentDiffusion, dict]:
    """Rebuild the latent diffusion model (EMA weights) from its checkpoint alone; returns (model, meta)."""
    tensors, meta = load_weights(path, kind="ldm")
    try:
        model = LatentDiffusion(unet=UNetArgs.from_dict(meta["unet"]), text=TextEncoderArgs(**meta["text"]),
                                diffusion=DiffusionArgs(**meta["diffusion"]), latent_hw=tuple(meta["latent_hw"]))
        model.unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
        model.text.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("text.")})
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: checkpoint does not match the model ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), meta
