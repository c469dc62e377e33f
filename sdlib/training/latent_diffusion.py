"""Latent diffusion's training objective, as `sdlib.training.loop.fit` runs it: `(step, generator) -> loss`.

Every random draw of a step is made for the whole global batch from the step's generator, and then this rank's
slice is kept, so N data-parallel processes compute what one process would. The latents are tensors on the device,
or `Rows` read from disk a step ahead on the host (`data.loading: stream`); the same batches either way.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Literal

import torch

from sdlib import config
from sdlib.config import TextConfig, UNetConfig
from sdlib.data.encoded_captions import EncodedCaptions, unique_captions
from sdlib.data.latents import Latents
from sdlib.data.shards import Rows
from sdlib.diffusion.denoisers import Denoiser
from sdlib.errors import DataError
from sdlib.ldm import DiffusionArgs, LatentDiffusion
from sdlib.models.text import PretrainedTextArgs, TextEncoderArgs
from sdlib.models.unet import UNetArgs
from sdlib.training.loop import (
    EMA,
    Batches,
    Dist,
    adamw,
    fast_path,
    prefetched_rows,
    steps_for,
    to_device,
    warmup_cosine,
)


def caption_table(captions: list[list[str]]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Unique captions (index 0 is "", the unconditional prompt), a padded (N, K) index table and counts (N,)."""
    unique = unique_captions(captions)
    index = {c: i for i, c in enumerate(unique)}
    k = max(len(caps) for caps in captions)
    table = torch.zeros(len(captions), k, dtype=torch.long)
    for i, caps in enumerate(captions):
        table[i, : len(caps)] = torch.tensor([index[c] for c in caps])
    counts = torch.tensor([len(caps) for caps in captions])
    return unique, table, counts


TimestepSampling = Literal["uniform", "lognormal"]
LOGNORMAL = (-0.5, 1.2)  # (mean, std) of ln sigma: EDM's P_mean = -1.2, P_std = 1.2 for sigma_data 0.5, moved to 1


def draw_timesteps(denoiser: Denoiser, how: TimestepSampling, b: int, gen: torch.Generator,
                   device: torch.device) -> torch.Tensor:
    """(b,) training timesteps: uniform over 0..T-1 (DDPM), or `lognormal`: ln sigma ~ N(LOGNORMAL) as in Karras
    et al. 2022, each sigma rounded to its nearest training timestep (log-sigma interpolation, clamped to 0..T-1)."""
    if how == "uniform":
        return torch.randint(0, denoiser.num_timesteps, (b,), generator=gen, device=device)
    mean, std = LOGNORMAL
    sigma = (mean + std * torch.randn(b, generator=gen, device=device)).exp()
    return denoiser.sigma_to_t(sigma).round().long()


class LatentDiffusionLoss:
    """LDM's objective (Rombach et al. 2022, eq. 2) for the U-Net and text encoder trained jointly.

    Each step, for every image of the batch: a fresh posterior sample z ~ q(z|x) scaled by the scale factor, one of
    its captions at random, dropped to "" with probability `cond_drop` (classifier-free guidance, Ho & Salimans
    2022), a timestep and noise; the denoiser's loss (DDPM's simple loss, eps or v) on them.

    `encoded` holds each caption's token ids (N, L), or, with a frozen pretrained encoder, its cached token states
    (N, L, D), which only the learned projection sees. A text encoder whose parameters are all frozen (fine-tuning
    from `unet.init_from`) runs without autograd: the backward pass stops at the U-Net.
    """

    def __init__(self, model: LatentDiffusion, latents: Latents, encoded: torch.Tensor, table: torch.Tensor,
                 counts: torch.Tensor, *, batches: Batches, cond_drop: float, dist: Dist = Dist(),
                 min_snr_gamma: float = 0.0, timesteps: TimestepSampling = "uniform"):
        self.device = device = encoded.device
        self.model, self.batches, self.cond_drop, self.dist = model, batches, cond_drop, dist
        self.min_snr_gamma, self.timesteps = min_snr_gamma, timesteps
        self.mean, self.std = latents.mean, latents.std
        self.read = prefetched_rows([self.mean, self.std], batches, dist) if isinstance(self.mean, Rows) else None
        if self.read is None:  # the whole data set on the device
            self.mean, self.std = self.mean.to(device), self.std.to(device)
        self.scale_factor = model.diffusion.scale_factor  # the latents' (checked by the caller)
        self.encoded, self.table, self.counts = encoded, table.to(device), counts.to(device)
        self.encode = model.project if model.frozen_text else model.encode_text
        self.no_text_grad = not model.frozen_text and not any(p.requires_grad for p in model.text.parameters())
        self.fmt = torch.channels_last  # as fast_path lays out the weights

    def __call__(self, step: int, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        dev, shard = self.device, self.dist.shard
        idx = self.batches(step)  # (B,) the global batch; every draw is for all of it, then this rank's slice
        b, shape = len(idx), self.mean.shape[1:]
        noise = torch.randn((b, *shape), generator=gen, device=dev)
        pick = torch.rand(b, generator=gen, device=dev)
        drop = torch.rand(b, generator=gen, device=dev) < self.cond_drop
        t = draw_timesteps(self.model.denoiser, self.timesteps, b, gen, dev)
        eps = torch.randn((b, *shape), generator=gen, device=dev)
        idx, noise, pick, drop, t, eps = (shard(v) for v in (idx, noise, pick, drop, t, eps))
        if self.read is None:
            mean, std = self.mean[idx], self.std[idx]
        else:  # this rank's slice of the same batch, read from disk a step ahead; the caption tables are on the device
            mean, std = (to_device(v, dev) for v in self.read(step))
            idx = idx.to(dev)
        z0 = (mean + std * noise) * self.scale_factor  # a posterior sample, at unit variance
        cid = self.table[idx, (pick * self.counts[idx]).long()]
        cid = torch.where(drop, torch.zeros_like(cid), cid)  # caption dropout: "" trains p(x) for CFG
        with torch.no_grad() if self.no_text_grad else contextlib.nullcontext():
            if dev.type == "cuda":  # unique() would make every step wait for the GPU; B captions cost less
                context = self.encode(self.encoded[cid])  # (B, L, D)
            else:
                uniq, inverse = cid.unique(return_inverse=True)
                # each caption encoded once; index_select, not [inverse]: the backward of indexing (index_put_ with
                # accumulate) adds rows with atomics across threads in a run-dependent order, index_add_ in batch
                # order
                context = self.encode(self.encoded[uniq]).index_select(0, inverse)  # (B, L, D)
        z0, eps = z0.contiguous(memory_format=self.fmt), eps.contiguous(memory_format=self.fmt)
        return self.model.denoiser.loss(z0, context, t=t, eps=eps, min_snr_gamma=self.min_snr_gamma), {}


@dataclass
class UNetTraining:
    """What `fit` needs to train the U-Net and its text encoder: the `train_unet` stage and `bench/recipes.py` build
    it with `unet_training`, so the benchmark trains exactly what the pipeline trains."""

    model: LatentDiffusion
    loss_fn: LatentDiffusionLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMA
    total_steps: int
    steps_per_epoch: int
    autocast: torch.dtype | None


def unet_training(cfg: UNetConfig, text_cfg: TextConfig, *, epochs: int, seed: int, latents: Latents,
                  captions: list[list[str]], encoded: EncodedCaptions, device: torch.device,
                  dist: Dist = Dist(), init: LatentDiffusion | None = None) -> UNetTraining:
    """Model (initialised from `seed`), objective, AdamW, warm-up + cosine LR and EMA for `epochs` over `latents`,
    whose image i has the captions `captions[i]`, tokenized (and, with `text.pretrained`, encoded) once in `encoded`.

    With `init` (the model of `unet.init_from`, loaded), that model is fine-tuned instead: its arguments, weights,
    noise schedule and scale factor, not `cfg`'s and `text_cfg`'s sizes; its text encoder is frozen (as diffusers'
    train_text_to_image does), and its default drawing size becomes the latents'.
    """
    unique, table, counts = caption_table(captions)
    max_length = text_cfg.max_length if init is None else init.text_args.max_length
    made_with = (encoded.captions, encoded.pretrained, encoded.max_length)
    if made_with != (unique, text_cfg.pretrained, max_length):
        raise DataError(f"the encoded captions were made from other captions or text params (pretrained "
                        f"{encoded.pretrained!r}, max_length {encoded.max_length}); re-run encode_captions")
    n, bs = len(latents), cfg.batch_size
    dist.check_batch(bs, n, "unet.batch_size")
    if init is None:
        model = _new_model(cfg, text_cfg, seed, latents, encoded).to(device)
    else:
        if init.frozen_text:
            raise ValueError("fine-tuning needs a model with its own text encoder, not a frozen text.pretrained one")
        channels, scale = latents.mean.shape[1], latents.scale_factor
        if channels != init.unet_args.in_channels or not math.isclose(scale, init.diffusion.scale_factor,
                                                                      rel_tol=1e-6):
            raise DataError(f"the latents ({channels} channels, scale factor {scale:.6g}) are not in the init model's "
                            f"latent space ({init.unet_args.in_channels}, {init.diffusion.scale_factor:.6g})")
        model = init.to(device)
        model.latent_hw = tuple(latents.mean.shape[2:])
        model.text.requires_grad_(False)
    amp = fast_path([model.unet], device, cfg.precision, cfg.compile, cfg.compile_mode)
    inputs = (encoded.ids if encoded.states is None else encoded.states).to(device)
    batches = Batches(n, bs, seed, torch.device("cpu") if isinstance(latents.mean, Rows) else device)
    loss_fn = LatentDiffusionLoss(model, latents, inputs, table, counts, batches=batches,
                                  cond_drop=cfg.cond_drop, dist=dist, min_snr_gamma=cfg.min_snr_gamma,
                                  timesteps=cfg.timesteps)
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], cfg.lr, device)
    total = steps_for(n, bs, epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup=min(cfg.warmup, total // 10)))
    return UNetTraining(model, loss_fn, optimizer, scheduler, EMA(model, cfg.ema_decay), total, max(n // bs, 1), amp)


def _new_model(cfg: UNetConfig, text_cfg: TextConfig, seed: int, latents: Latents,
               encoded: EncodedCaptions) -> LatentDiffusion:
    """A model of the params' sizes, initialised from `seed`, for `latents` and the `encoded` captions."""
    torch.manual_seed(seed)  # parameter initialisation only; the loop uses its own per-step generators
    if text_cfg.pretrained:
        text_args = PretrainedTextArgs(pretrained=text_cfg.pretrained, encoder_dim=encoded.states.shape[-1],
                                       hidden_size=text_cfg.hidden_size, max_length=text_cfg.max_length)
    else:
        text_args = config.args_from(text_cfg, TextEncoderArgs)
    unet_args = config.args_from(cfg, UNetArgs, in_channels=latents.mean.shape[1], context_dim=text_args.hidden_size)
    diffusion = config.args_from(cfg, DiffusionArgs, scale_factor=latents.scale_factor)
    return LatentDiffusion(unet=unet_args, text=text_args, diffusion=diffusion, latent_hw=tuple(latents.mean.shape[2:]))
