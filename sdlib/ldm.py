"""The assembled latent diffusion model: U-Net + text encoder + noise schedule, saved and loaded as a unit.

`LatentDiffusion` is what `train_unet` trains (the U-Net and the text encoder jointly) and what `sample` loads
(`sdlib.generate` draws with it); its checkpoint carries every argument needed to rebuild it, so sampling needs
only the files. With a frozen pretrained text encoder (`text.pretrained`) the checkpoint holds the U-Net and the
learned projection of the encoder's states; the encoder itself is re-loaded from its package or folder.
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
from sdlib.models.text import (
    PretrainedTextArgs,
    PretrainedTextEncoder,
    TextEncoder,
    TextEncoderArgs,
    load_pretrained_text_encoder,
)
from sdlib.models.unet import UNet, UNetArgs


@dataclass(frozen=True, kw_only=True)
class DiffusionArgs:
    beta_schedule: BetaSchedule = "scaled_linear"
    num_timesteps: int = 1000
    prediction: Literal["eps", "v"] = "eps"
    scale_factor: float = 1.0  # latents are multiplied by this before diffusion (SD: 0.18215)


class LatentDiffusion(nn.Module):
    """U-Net noise predictor wrapped as a denoiser D(x, sigma, ctx), conditioned on a jointly trained text encoder,
    or on a frozen pretrained one (`PretrainedTextArgs`) through a learned linear projection of its states."""

    def __init__(self, *, unet: UNetArgs, text: TextEncoderArgs | PretrainedTextArgs, diffusion: DiffusionArgs,
                 latent_hw: tuple[int, int] = (8, 8)):
        super().__init__()
        if unet.context_dim != text.hidden_size:
            raise ValueError(f"the U-Net cross-attends to {unet.context_dim}-d states, the text encoder makes "
                             f"{text.hidden_size}-d ones")
        self.unet_args, self.text_args, self.diffusion = unet, text, diffusion
        self.latent_hw = tuple(latent_hw)
        self.unet = UNet(unet)
        self.text: TextEncoder | PretrainedTextEncoder | None
        if isinstance(text, PretrainedTextArgs):
            # Not part of the weights: training reads its cached states, `load_ldm` attaches it for sampling.
            self.text = None
            self.text_proj = (nn.Identity() if text.encoder_dim == text.hidden_size
                              else nn.Linear(text.encoder_dim, text.hidden_size))
        else:
            self.text = TextEncoder(text)
        ac = alphas_cumprod(betas(diffusion.beta_schedule, diffusion.num_timesteps)).float()
        self.denoiser = Denoiser(self.unet, ac, diffusion.prediction)

    @property
    def frozen_text(self) -> bool:
        return isinstance(self.text_args, PretrainedTextArgs)

    @property
    def text_layers(self) -> int:
        """The layers `clip_skip` can pick (a frozen encoder gives only its last)."""
        return 1 if self.frozen_text else self.text_args.num_layers

    def encode_text(self, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """Token ids (B, L) -> context (B, L, D) for cross-attention (see `TextEncoder.forward` for clip_skip)."""
        if not self.frozen_text:
            return self.text(ids, clip_skip)
        if clip_skip != 1:
            raise ValueError(f"clip_skip must be 1 with a frozen pretrained text encoder, got {clip_skip}")
        if self.text is None:
            raise RuntimeError("the frozen text encoder is not attached (load the model with load_ldm)")
        return self.project(self.text(ids))

    def project(self, states: torch.Tensor) -> torch.Tensor:
        """A frozen encoder's token states (B, L, encoder_dim) -> context (B, L, D)."""
        return self.text_proj(states)

    def meta(self) -> dict:
        return {"kind": "ldm", "unet": self.unet_args.to_dict(), "text": self.text_args.to_dict(),
                "diffusion": asdict(self.diffusion), "latent_hw": list(self.latent_hw)}


def save_ldm(path: Path, model: LatentDiffusion, extra: dict | None = None) -> None:
    tensors = {f"unet.{k}": v for k, v in model.unet.state_dict().items()}
    if model.frozen_text:  # the projection; the frozen encoder is re-loaded from its package or folder
        tensors |= {f"text_proj.{k}": v for k, v in model.text_proj.state_dict().items()}
    else:
        tensors |= {f"text.{k}": v for k, v in model.text.state_dict().items()}
    save_weights(path, tensors, {**model.meta(), **(extra or {})})


def load_ldm(path: Path, device: torch.device | str = "cpu") -> tuple[LatentDiffusion, dict]:
    """Rebuild the latent diffusion model (EMA weights) from its checkpoint alone, a frozen text encoder from the
    package or folder it names; returns (model, meta)."""
    tensors, meta = load_weights(path, kind="ldm")
    try:
        frozen = "pretrained" in meta["text"]
        text = PretrainedTextArgs(**meta["text"]) if frozen else TextEncoderArgs(**meta["text"])
        model = LatentDiffusion(unet=UNetArgs.from_dict(meta["unet"]), text=text,
                                diffusion=DiffusionArgs(**meta["diffusion"]), latent_hw=tuple(meta["latent_hw"]))
        model.unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
        if frozen:
            model.text_proj.load_state_dict({k[10:]: v for k, v in tensors.items() if k.startswith("text_proj.")})
        else:
            model.text.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("text.")})
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: checkpoint does not match the model ({str(e).splitlines()[0]})") from None
    if frozen:
        model.text = _frozen_encoder(path, text)
    return model.to(device, memory_format=torch.channels_last).eval(), meta  # NHWC: oneDNN's and cuDNN's fast path


def _frozen_encoder(path: Path, text: PretrainedTextArgs) -> PretrainedTextEncoder:
    try:
        encoder, _ = load_pretrained_text_encoder(text.pretrained)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: the model reads the frozen text encoder text.pretrained={text.pretrained!r}, "
                              f"which cannot be loaded here ({str(e).splitlines()[0]}); install its package "
                              "or restore its folder") from None
    if encoder.dim != text.encoder_dim:
        raise CheckpointError(f"{path}: text.pretrained={text.pretrained!r} makes {encoder.dim}-d states, the model "
                              f"was trained on {text.encoder_dim}-d ones")
    return encoder
