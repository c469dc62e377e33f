"""Wraps a discrete-time eps- or v-prediction network into a denoiser D(x, sigma) -> x0 (k-diffusion's external.py).

The network is trained on the DDPM (VP) process at integer timesteps t in 0..T-1; samplers work in VE coordinates
x = x0 + sigma eps (Karras et al. 2022). Following Karras et al. 2022, eq. 7, the denoiser is

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, t(sigma))

and the training loss (Table 1, "training") regresses F onto (x0 - c_skip x) / c_out, which is exactly the eps
target of Ho et al. 2020 (eq. 14) or the v target of Salimans & Ho 2022 (Sec. 4): one set of scalings for both.
"""
from __future__ import annotations

from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from sdlib.diffusion.schedules import vp_sigmas

Prediction = Literal["eps", "v"]


class NoisePredictor(Protocol):
    def __call__(self, x_in: Tensor, t: Tensor, context: Tensor | None) -> Tensor: ...


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """(B,) -> (B, 1, ..., 1) with `ndim` dimensions in all, to broadcast a per-image scalar over an image."""
    return v.reshape(v.shape[0], *([1] * (ndim - 1)))


class Denoiser(nn.Module):
    """D(x, sigma, context) -> x0 for a net trained on the discrete VP schedule `alphas_cumprod`."""

    def __init__(self, net: nn.Module | NoisePredictor, alphas_cumprod: Tensor, prediction: Prediction = "eps"):
        super().__init__()
        if prediction not in ("eps", "v"):
            raise ValueError(f"unknown prediction {prediction!r} (choose from eps, v)")
        self.net, self.prediction = net, prediction
        sigmas = vp_sigmas(alphas_cumprod)
        # schedule constants, rebuilt from the config: kept out of the state dict
        self.register_buffer("train_sigmas", sigmas, persistent=False)  # (T,) increasing in t
        self.register_buffer("log_sigmas", sigmas.log(), persistent=False)

    @property
    def num_timesteps(self) -> int:
        return len(self.train_sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.train_sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.train_sigmas[-1])

    def get_scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) of Karras et al. 2022, Table 1, for the VP-trained eps or v parametrisation."""
        c_in = 1 / (sigma**2 + 1) ** 0.5  # = sqrt(alpha_bar): maps x_VE back to the net's x_VP
        if self.prediction == "eps":  # x0 = x - sigma eps
            return torch.ones_like(sigma), -sigma, c_in
        # v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022) gives x0 = x / (sigma^2 + 1) - sigma c_in v
        return 1 / (sigma**2 + 1), -sigma * c_in, c_in

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Continuous timestep of `sigma`: linear interpolation in log sigma between training timesteps."""
        log_sigma = sigma.to(self.log_sigmas.dtype).log()
        high = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, self.num_timesteps - 1)
        low = high - 1
        w = (log_sigma - self.log_sigmas[low]) / (self.log_sigmas[high] - self.log_sigmas[low])
        return low + w.clamp(0, 1)  # exactly t at sigma = train_sigmas[t]; clamped to [0, T-1] outside

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Inverse of `sigma_to_t`: interpolate log sigma at a continuous timestep."""
        t = t.to(self.log_sigmas.dtype).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]).exp()

    def forward(self, x: Tensor, sigma: Tensor | float, context: Tensor | None = None) -> Tensor:
        """x0 estimate D(x, sigma) (Karras et al. 2022, eq. 7); x (B, ...), sigma a float, 0-dim or (B,) tensor."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])  # (B,)
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in self.get_scalings(sigma))
        t = self.sigma_to_t(sigma).to(x.dtype)
        return c_skip * x + c_out * self.net(c_in * x, t, context)

    def loss(self, x0: Tensor, context: Tensor | None = None, generator: torch.Generator | None = None, *,
             t: Tensor | None = None, eps: Tensor | None = None, min_snr_gamma: float = 0.0) -> Tensor:
        """DDPM's simple loss (Ho et al. 2020, Alg. 1 / eq. 14) with t ~ U{0..T-1}, eps ~ N(0, I) from `generator`.

        `t` (B,) and `eps` (B, ...) may be given instead, e.g. a data-parallel rank's slice of the global draws.
        `min_snr_gamma` > 0 weights each sample by Min-SNR-gamma (Hang et al. 2023): its loss counts as
        min(SNR, gamma) times the x0 error, SNR = 1 / sigma^2; the eps error is SNR times the x0 error, the v error
        (SNR + 1) times, so the weight is min(SNR, gamma) / SNR or / (SNR + 1).
        """
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), generator=generator, device=x0.device)  # (B,)
        if eps is None:
            eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        sigma = self.train_sigmas[t].to(x0.dtype)
        c_skip, c_out, c_in = (append_dims(c, x0.ndim) for c in self.get_scalings(sigma))
        x = x0 + append_dims(sigma, x0.ndim) * eps  # x_t in VE coordinates (Ho et al. 2020, eq. 4, divided by sqrt(ab))
        # Karras et al. 2022, Table 1: the effective target of F; it equals eps, or v = c_in (eps - sigma x0)
        target = (x0 - c_skip * x) / c_out
        err = (self.net(c_in * x, t.to(x0.dtype), context) - target).pow(2)
        if not min_snr_gamma:
            return err.mean()
        snr = sigma.pow(-2)
        weight = snr.clamp(max=min_snr_gamma) / (snr if self.prediction == "eps" else snr + 1)  # (B,)
        return (err.flatten(1).mean(1) * weight).mean()
