"""Text-to-image and image-to-image with a trained latent diffusion model and its VAE.

Prompts become the text encoder's token states; a sampler integrates from noise (or, for image-to-image, from a
noised latent of the init image) with classifier-free guidance; the VAE decodes the result. Image i of prompt k
draws its noise from seed + k*n + i, so every image is the same whatever the batch it is drawn in.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from transformers import PreTrainedTokenizerBase

from sdlib.data.images import from_uint8
from sdlib.diffusion.guidance import CFGDenoiser
from sdlib.diffusion.img2img import img2img_sigmas, noised_start
from sdlib.diffusion.samplers import SAMPLERS, ImageRNG, check_sampler, sample
from sdlib.diffusion.schedules import get_sigmas
from sdlib.errors import CheckpointError, DataError, SamplingError
from sdlib.ldm import LatentDiffusion
from sdlib.models.text import TOKENIZER_FILES, load_pretrained_tokenizer, load_tokenizer, tokenize
from sdlib.models.vae import Autoencoder


class Prompts:
    """Tokenizer + text encoder: prompts -> cross-attention context."""

    def __init__(self, tokenizer_dir: Path, model: LatentDiffusion):
        self.model = model
        self.max_length = model.text_args.max_length
        if model.frozen_text:  # the frozen encoder's own tokenizer, as train_unet saved it
            try:
                self.tokenizer = load_pretrained_tokenizer(tokenizer_dir, self.max_length)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{str(e).splitlines()[0]} (the model folder needs the tokenizer train_unet "
                                      "wrote beside the weights)") from None
            return
        missing = [f for f in TOKENIZER_FILES if not (Path(tokenizer_dir) / f).is_file()]
        if missing:
            raise CheckpointError(f"{tokenizer_dir}: no {', '.join(missing)} (the model folder needs the tokenizer "
                                  "train_unet wrote beside the weights)")
        self.tokenizer = load_tokenizer(tokenizer_dir, self.max_length)

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, model: LatentDiffusion) -> "Prompts":
        """With a tokenizer already loaded (a pretrained checkpoint's, see `sdlib.pretrained.load`)."""
        self = cls.__new__(cls)
        self.model, self.max_length, self.tokenizer = model, model.text_args.max_length, tokenizer
        return self

    def ids(self, prompts: list[str]) -> torch.Tensor:
        return tokenize(self.tokenizer, prompts, self.max_length)

    @torch.no_grad()
    def context(self, prompts: list[str], device: torch.device | str, clip_skip: int = 1) -> torch.Tensor:
        return self.model.encode_text(self.ids(prompts).to(device), clip_skip)


def image_seed(seed: int, prompt_index: int, n_per_prompt: int, i: int) -> int:
    """The seed of image `i` of prompt `prompt_index`: seed + k*n + i, so each image is the same whatever the batch."""
    return seed + prompt_index * n_per_prompt + i


def sampling_sigmas(model: LatentDiffusion, sampler: str, steps: int, schedule: str = "auto") -> torch.Tensor:
    """The n+1 noise levels a sampler visits: SD's discrete timesteps or Karras et al.'s schedule, ending in 0.

    `auto` takes the sampler's own default (discrete for DDPM, DDIM and PNDM, which are defined on the training
    timesteps in their papers; Karras et al.'s otherwise).
    """
    return get_sigmas(resolve_schedule(sampler, schedule), model.denoiser.train_sigmas, steps)


def resolve_schedule(sampler: str, schedule: str = "auto") -> str:
    """`schedule`, with `auto` replaced by the sampler's registered default."""
    return SAMPLERS[check_sampler(sampler)].schedule if schedule == "auto" else schedule


def run_sigmas(model: LatentDiffusion, sampler: str, steps: int, schedule: str = "auto",
               strength: float | None = None) -> torch.Tensor:
    """The noise levels `generate` visits: the whole schedule, or for image-to-image (`strength`) its tail."""
    sigmas = sampling_sigmas(model, sampler, steps, schedule)
    return sigmas if strength is None else img2img_sigmas(sigmas, strength)


@torch.no_grad()
def generate(
    model: LatentDiffusion,
    vae: Autoencoder,
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
    latent_hw: tuple[int, int] | None = None,
    clip_skip: int = 1,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Text-to-image (or, with `init_image` (C, H, W) in [-1, 1], SDEdit image-to-image): images (B, C, H, W).

    `latent_hw` is the latent size drawn (default: the model's; an init image gives its own); `clip_skip` picks the
    text encoder's layer (1 = last). Raises SamplingError naming the prompt and seed of a non-finite image.
    """
    device = next(model.parameters()).device
    scale = model.diffusion.scale_factor
    context = prompts.context(texts, device, clip_skip)  # (B, L, D)
    uncond = prompts.context([negative_prompt], device, clip_skip)  # (1, L, D), broadcast over the batch
    denoiser = CFGDenoiser(model.denoiser, context, uncond, guidance)
    sigmas = run_sigmas(model, sampler, steps, schedule, None if init_image is None else strength).to(device)
    rng = ImageRNG(seeds, device)
    if init_image is None:
        latent_shape = (model.unet_args.in_channels, *(latent_hw or model.latent_hw))
        x = rng.randn(latent_shape) * sigmas[0]  # (B, z, h, w)
    else:
        z0 = vae.encode(init_image[None].to(device)).mean * scale  # (1, z, h, w)
        x = noised_start(z0.expand(len(seeds), -1, -1, -1), sigmas[0], rng)
    z = sample(sampler, denoiser, x, sigmas, rng=rng, callback=callback)
    images = vae.decode(z.float() / scale)  # float32: SD's VAE overflows in float16
    finite = images.isfinite().flatten(1).all(1)  # (B,)
    if not finite.all():
        i = int((~finite).nonzero()[0])
        raise SamplingError(f"image {i} of the batch (prompt {texts[i]!r}, seed {seeds[i]}) decoded to non-finite "
                            "values (NaN/inf): broken weights, or a dtype too narrow for the model")
    return images.clamp(-1.0, 1.0)


def load_init_image(path: Path, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """An image-to-image start: a PNG/JPEG of the size drawn, (H, W) -> (C, H, W) in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: cannot read init image ({type(e).__name__})") from None
    h, w = size
    if im.size != (w, h):
        raise DataError(f"{path}: init image is {im.size[0]}x{im.size[1]} (width x height), the drawing {w}x{h}")
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(h, w, channels)
    return from_uint8(x.permute(2, 0, 1))  # (C, H, W)
