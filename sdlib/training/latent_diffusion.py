"""Latent diffusion's training objective, as `sdlib.training.loop.fit` runs it: `(step, generator) -> loss`.

Every random draw of a step is made for the whole global batch from the step's generator, and then this rank's
slice is kept, so N data-parallel processes compute what one process would.
"""
from __future__ import annotations

import torch

from sdlib.data.latents import Latents
from sdlib.ldm import LatentDiffusion
from sdlib.training.loop import Batches, Dist


def caption_table(captions: list[list[str]]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Unique captions (index 0 is "", the unconditional prompt), a padded (N, K) index table and counts (N,)."""
    unique = [""] + sorted({c for caps in captions for c in caps})
    index = {c: i for i, c in enumerate(unique)}
    k = max(len(caps) for caps in captions)
    table = torch.zeros(len(captions), k, dtype=torch.long)
    for i, caps in enumerate(captions):
        table[i, : len(caps)] = torch.tensor([index[c] for c in caps])
    counts = torch.tensor([len(caps) for caps in captions])
    return unique, table, counts


class LatentDiffusionLoss:
    """LDM's objective (Rombach et al. 2022, eq. 2) for the U-Net and text encoder trained jointly.

    Each step, for every image of the batch: a fresh posterior sample z ~ q(z|x) scaled by the scale factor, one of
    its captions at random, dropped to "" with probability `cond_drop` (classifier-free guidance, Ho & Salimans
    2022), a timestep and noise; the denoiser's loss (DDPM's simple loss, eps or v) on them.
    """

    def __init__(self, model: LatentDiffusion, latents: Latents, caption_ids: torch.Tensor, table: torch.Tensor,
                 counts: torch.Tensor, *, batches: Batches, cond_drop: float, dist: Dist = Dist()):
        device = caption_ids.device
        self.model, self.batches, self.cond_drop, self.dist = model, batches, cond_drop, dist
        self.mean, self.std = latents.mean.to(device), latents.std.to(device)  # the whole data set on the device
        self.scale_factor = latents.scale_factor
        self.caption_ids, self.table, self.counts = caption_ids, table.to(device), counts.to(device)
        self.fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format

    def __call__(self, step: int, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        dev, shard = self.mean.device, self.dist.shard
        idx = self.batches(step)  # (B,) the global batch; every draw is for all of it, then this rank's slice
        b, shape = len(idx), self.mean.shape[1:]
        noise = torch.randn((b, *shape), generator=gen, device=dev)
        pick = torch.rand(b, generator=gen, device=dev)
        drop = torch.rand(b, generator=gen, device=dev) < self.cond_drop
        t = torch.randint(0, self.model.denoiser.num_timesteps, (b,), generator=gen, device=dev)
        eps = torch.randn((b, *shape), generator=gen, device=dev)
        idx, noise, pick, drop, t, eps = (shard(v) for v in (idx, noise, pick, drop, t, eps))
        z0 = (self.mean[idx] + self.std[idx] * noise) * self.scale_factor  # a posterior sample, at unit variance
        cid = self.table[idx, (pick * self.counts[idx]).long()]
        cid = torch.where(drop, torch.zeros_like(cid), cid)  # caption dropout: "" trains p(x) for CFG
        if dev.type == "cuda":  # unique() would make every step wait for the GPU; B captions cost less
            context = self.model.encode_text(self.caption_ids[cid])  # (B, L, D)
        else:
            uniq, inverse = cid.unique(return_inverse=True)
            # each caption encoded once; index_select, not [inverse]: the backward of indexing (index_put_ with
            # accumulate) adds rows with atomics across threads in a run-dependent order, index_add_ in batch order
            context = self.model.encode_text(self.caption_ids[uniq]).index_select(0, inverse)  # (B, L, D)
        z0, eps = z0.contiguous(memory_format=self.fmt), eps.contiguous(memory_format=self.fmt)
        return self.model.denoiser.loss(z0, context, t=t, eps=eps), {}
