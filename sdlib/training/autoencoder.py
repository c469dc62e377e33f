"""The autoencoder's training objective, as `sdlib.training.loop.fit` runs it: `(step, generator) -> loss`.

The posterior noise of a step is drawn for the whole global batch from the step's generator, and then this rank's
slice is kept, so N data-parallel processes compute what one process would. The images are a tensor on the device,
indexed by the batch's indices there, or `Rows` read from disk a step ahead on the host (`data.loading: stream`).
"""
from __future__ import annotations

import torch

from sdlib.data.shards import Rows
from sdlib.models.vae import AutoencoderKL, vae_loss
from sdlib.training.loop import Batches, Dist, prefetched_rows, to_device


class VAELoss:
    """The autoencoder's objective: L1 reconstruction of a posterior sample's decoding + kl_weight * KL."""

    def __init__(self, vae: AutoencoderKL, images: torch.Tensor | Rows, *, batches: Batches, kl_weight: float,
                 dist: Dist = Dist(), memory_format: torch.memory_format = torch.channels_last):
        self.vae, self.images, self.batches, self.kl_weight, self.dist = vae, images, batches, kl_weight, dist
        self.device, self.fmt = next(vae.parameters()).device, memory_format
        self.read = prefetched_rows([images], batches, dist) if isinstance(images, Rows) else None

    def __call__(self, step: int, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        idx = self.batches(step)  # (B,) the global batch
        if self.read is None:
            # .to, as to_device lays out a read batch: for 1-channel images .contiguous(channels_last) is a no-op
            # whose NCHW strides would steer the first convolution to another algorithm than the streamed batch's
            x = self.images[self.dist.shard(idx)].to(memory_format=self.fmt)
        else:  # this rank's slice of the same batch, read from disk a step ahead
            x = to_device(self.read(step)[0], self.device, self.fmt)
        posterior = self.vae.encode(x)
        shape = (len(idx), *posterior.mean.shape[1:])  # the draw is for the global batch, then sliced
        noise = self.dist.shard(torch.randn(shape, generator=gen, device=x.device, dtype=posterior.mean.dtype))
        recon = self.vae.decode(posterior.sample(noise=noise))
        loss, rec, kl = vae_loss(x, recon, posterior, self.kl_weight)
        return loss, {"rec": rec, "kl": kl}
