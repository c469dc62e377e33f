"""Samplers in k-diffusion's form: each integrates from sigmas[0] down to sigmas[-1] (usually 0) with a denoiser.

VE coordinates throughout (Karras et al. 2022): x = x0 + sigma eps, and `denoiser(x, sigma) -> x0` with sigma a (B,)
tensor. The probability-flow ODE is dx/dsigma = (x - D(x, sigma)) / sigma (Karras eqs. 1 and 3, sigma(t) = t), and
d = (x - D) / sigma is also the net's eps prediction, which is why DDIM is Euler and PLMS is Adams-Bashforth here.
The exponential integrators (DPM-Solver++, UniPC) step in lambda = -log sigma, the half log-SNR at alpha = 1.

Every sampler has the signature `sample_<name>(denoiser, x, sigmas, *, rng=None, callback=None, **options)`:
`x` is the starting sample at sigmas[0] (e.g. rng.randn(shape) * sigmas[0]); stochastic samplers draw all their
noise from `rng` (the global generator if None); `callback(dict(i=, sigma=, x=, denoised=))` runs after step i
with the new sample `x` at noise level `sigma` = sigmas[i + 1] and `denoised`, the x0 estimate at sigmas[i].
The denoiser is never evaluated at sigma = 0: a step down to 0 returns a denoised estimate.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from scipy import integrate
from torch import Tensor

from sdlib.errors import ConfigError

Denoise = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]


class ImageRNG:
    """One torch.Generator per image, so image i with seed s gets the same noise in any batch (NVlabs/edm)."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    def randn(self, shape_per_image: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normal noise of shape (B, *shape_per_image), image i drawn from generator i."""
        return torch.stack([torch.randn(tuple(shape_per_image), generator=g, device=self.device, dtype=dtype)
                            for g in self.generators])

    def randn_like(self, x: Tensor) -> Tensor:
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch of {x.shape[0]} images for {len(self.generators)} seeds")
        return self.randn(x.shape[1:], dtype=x.dtype).to(x.device)


def _noise(rng: ImageRNG | None, x: Tensor) -> Tensor:
    return torch.randn_like(x) if rng is None else rng.randn_like(x)


def _check(x: Tensor, sigmas: Tensor) -> Tensor:
    if sigmas.ndim != 1 or (sigmas[:-1] <= 0).any() or sigmas[-1] < 0 or (sigmas[1:] >= sigmas[:-1]).any():
        raise ValueError("sigmas must be a 1-D decreasing schedule of positive noise levels, optionally ending in 0")
    return sigmas.to(x)  # coefficients in the sample's dtype and device


def _report(callback: Callback | None, i: int, sigma: Tensor, x: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback({"i": i, "sigma": sigma, "x": x, "denoised": denoised})


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """dx/dsigma of the probability-flow ODE (Karras et al. 2022, eqs. 1 and 3); also the eps prediction."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """(sigma_down, sigma_up): a deterministic step to sigma_down, then fresh noise sigma_up, lands at sigma_next."""
    # Song et al. 2021 (DDIM), eq. 16 in VE coordinates; eta = 1 is the DDPM posterior variance
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


@torch.no_grad()
def sample_ddpm(denoiser: Denoise, x: Tensor, sigmas: Tensor, *, rng: ImageRNG | None = None,
                callback: Callback | None = None) -> Tensor:
    """Ancestral sampling from the DDPM posterior q(x_{t-1} | x_t, x0) (Ho et al. 2020, eqs. 6-7)."""
    sigmas, s_in = _check(x, sigmas), x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        # Eq. 7 with alpha_bar = 1 / (1 + sigma^2) and x_VE = x_VP / sqrt(alpha_bar): the forward chain adds
        # independent noise of variance sigma^2 - sigma_next^2, so the posterior is a Brownian bridge with
        # mu_tilde = x0 + (sigma_next / sigma)^2 (x_t - x0) and beta_tilde = sigma_next^2 (1 - (sigma_next / sigma)^2).
        ratio = (sigma_next / sigma) ** 2
        x = denoised + ratio * (x - denoised)
        if sigma_next > 0:
            x = x + (sigma_next**2 * (1 - ratio)) ** 0.5 * _noise(rng, x)  # eq. 6: + sqrt(beta_tilde) z
        _report(callback, i, sigma_next, x, denoised)
    return x


@torch.no_grad()
def sample_ddim(denoiser: Denoise, x: Tensor, sigmas: Tensor, *, rng: ImageRNG | None = None,
                callback: Callback | None = None, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12 with sigma_t(eta) of eq. 16); eta = 0 is deterministic, eta = 1 is DDPM."""
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    sigmas, s_in = _check(x, sigmas), x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        eps = to_d(x, sigma, denoised)
        # eq. 16 divided by sqrt(alpha_bar_{t-1}): the noise injected, in VE units
        sigma_eta = eta * sigma_next * (1 - (sigma_next / sigma) ** 2) ** 0.5
        # eq. 12 divided by sqrt(alpha_bar_{t-1}): predicted x0 + direction pointing to x_t + random noise
        x = denoised + (sigma_next**2 - sigma_eta**2) ** 0.5 * eps
        if sigma_eta > 0:
            x = x + sigma_eta * _noise(rng, x)
        _report(callback, i, sigma_next, x, denoised)
    return x


@torch.no_grad()
def sample_euler_maruyama(denoiser: Denoise, x: Tensor, sigmas: Tensor, *, rng: ImageRNG | None = None,
                          callback: Callback | None = None) -> Tensor:
    """Euler-Maruyama on the reverse-time VE SDE (Song et al. 2021, score SDE, eqs. 6 and 9)."""
    sigmas, s_in = _check(x, sigmas), x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        if sigma_next == 0:
            x = denoised  # the last step returns the mean, without noise (score SDE's final denoising step)
        else:
            score = (denoised - x) / sigma**2  # grad log p(x; sigma) (Karras et al. 2022, eq. 3)
            g2_dt = sigma**2 - sigma_next**2  # g(t)^2 |dt| = d[sigma^2], the forward variance added over the step
            # eq. 6 with f = 0: dx = -g^2 score dt + g dw, stepped backwards in time
            x = x + g2_dt * score + g2_dt**0.5 * _noise(rng, x)
        _report(callback, i, sigma_next, x, denoised)
    return x


@torch.no_grad()
def sample_euler(denoiser: Denoise, x: Tensor, sigmas: Tensor, *, rng: ImageRNG | None = None,
                 callback: Callback | None = None) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 1 without the 2nd-order correction)."""
    sigmas, s_in = _check(x, sigmas), x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        x = x + (sigma_next - sigma) * to_d(x, sigma, denoised)  # Alg. 1, line 5
        _report(callback, i, sigma_next, x, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser: Denoise, x: Tensor, sigmas: Tensor, *, rng: ImageRNG | None = None,
                           callback: Callback | None = None, eta: float = 1.0) -> Tensor:
    """Euler step down to sigma_down, then fresh noise sigma_up (k-diffusion; DDIM eq. 16 split of the step)."""
    sigmas, s_in = _check(x, sigmas), x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x = x + (sigma_down - sigma) * to_d(x, sigma, denoised)
        if sigma_next > 0:
            x = x + sigma_up * _noise(rng, x)
        _report(callback, i, sigma_next, x, denoised)
    return x


@torch.no_grad()
def sample_heun(denoiser: Denoise, x: Tensor, sigmas: Tensor, *, rng: ImageRNG | None = None,
                callback: Callback | None = None) -> Tensor:
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Alg. 1); Euler on the step to 0."""
    sigmas, s_in = _check(x, sigmas), x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        d = to_d(x, sigma, denoised)  # Alg. 1, line 4
        x_next = x + (sigma_next - sigma) * d  # line 5
        if sigma_next > 0:  # lines 6-8: trapezoidal correction
            d_prime = to_d(x_next, sigma_next, denoiser(x_next, sigma_next * s_in))
            x_next = x + (sigma_next - sigma) * (d + d_prime) / 2
        x = x_next
        _report(callback, i, sigma_next, x, denoised)
    return x


def lms_coeff(order: int, sigmas: Sequence[float], i: int, j: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of node i-j (nodes i-order+1..i)."""
    def basis(tau: float) -> float:
        return math.prod((tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k]) for k in range(order) if k != j)
    return integrate.quad(basis, sigmas[i], sigmas[i + 1], epsrel=1e-8)[0]


@torch.no_grad()
def sample_lms(denoiser: Denoise, x: Tensor, sigmas: Tensor, *, rng: ImageRNG | None = None,
               callback: Callback | None = None, order: int = 4) -> Tensor:
    """Linear multistep (Adams-Bashforth with variable steps in sigma), as in k-diffusion's sample_lms."""
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    sigmas, s_in = _check(x, sigmas), x.new_ones(x.shape[0])
    sigmas_cpu = sigmas.detach().cpu().double().tolist()
    ds: list[Tensor] = []  # derivatives at the last `order` nodes, oldest first
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        ds = [*ds, to_d(x, sigmas[i], denoised)][-order:]
        # x_{i+1} = x_i + int_{sigma_i}^{sigma_{i+1}} p(tau) dtau, p interpolating d at the last len(ds) nodes
        coeffs = [lms_coeff(len(ds), sigmas_cpu, i, j) for j in range(len(ds))]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        _report(callback, i, sigmas[i + 1], x, denoised)
    return x


# Adams-Bashforth coefficients of orders 1-4 on equal steps (PLMS uses order 4: (55, -59, 37, -9) / 24)
_AB_COEFFS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


@torch.no_grad()
def sample_pndm(denoiser: Denoise, x: Tensor, sigmas: Tensor, *, rng: ImageRNG | None = None,
                callback: Callback | None = None, warmup: Literal["prk", "plms"] = "prk") -> Tensor:
    """PNDM (Liu et al. 2022): 3 pseudo Runge-Kutta steps, then pseudo linear multistep (PLMS) with 4th-order AB."""
    if warmup not in ("prk", "plms"):
        raise ValueError(f"unknown warmup {warmup!r} (choose from prk, plms)")
    sigmas, s_in = _check(x, sigmas), x.new_ones(x.shape[0])

    def eps(x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        denoised = denoiser(x, sigma * s_in)
        return to_d(x, sigma, denoised), denoised

    def phi(x: Tensor, e: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return x + (sigma_next - sigma) * e  # the transfer part phi (eq. 9, the DDIM step) in VE coordinates

    ets: list[Tensor] = []  # eps at previous steps' start points, oldest first
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        e_1, denoised = eps(x, sigma)
        if warmup == "prk" and len(ets) < 3 and sigma_next > 0:
            # PRK with t - delta/2 at the midpoint in sigma, where phi is linear: classic RK4 in sigma
            sigma_mid = (sigma + sigma_next) / 2
            e_2, _ = eps(phi(x, e_1, sigma, sigma_mid), sigma_mid)
            e_3, _ = eps(phi(x, e_2, sigma, sigma_mid), sigma_mid)
            e_4, _ = eps(phi(x, e_3, sigma, sigma_next), sigma_next)
            e_prime = (e_1 + 2 * e_2 + 2 * e_3 + e_4) / 6
        else:  # PLMS, with the lower-order Adams-Bashforth formulas until 4 eps are known
            history = [*ets[-3:], e_1]
            e_prime = sum(c * e for c, e in zip(_AB_COEFFS[len(history) - 1], reversed(history)))
        ets.append(e_1)
        x = phi(x, e_prime, sigma, sigma_next)
        _report(callback, i, sigma_next, x, denoised)
    return x


def _data_2m(denoised: Tensor, denoised_prev: Tensor | None, h: Tensor, h_prev: Tensor | None) -> Tensor:
    """DPM-Solver++(2M)'s data term D_i = (1 + 1/(2r)) D0 - 1/(2r) D_prev, r = h_{i-1}/h_i; D0 on the first step
    (DPM-Solver++1, i.e. DDIM)."""
    if denoised_prev is None:
        return denoised
    r = h_prev / h  # r_i = h_{i-1} / h_i
    return (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * denoised_prev


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoise, x: Tensor, sigmas: Tensor, *, rng: ImageRNG | None = None,
                    callback: Callback | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) with alpha_t = 1, lambda_t = -log sigma_t in VE coordinates."""
    sigmas, s_in = _check(x, sigmas), x.new_ones(x.shape[0])
    denoised_prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        if sigma_next == 0:
            x = denoised  # the first-order step to lambda = inf
        else:
            h = sigma.log() - sigma_next.log()  # h_i = lambda_{t_i} - lambda_{t_{i-1}}
            D = _data_2m(denoised, denoised_prev, h, h_prev)
            x = (sigma_next / sigma) * x - torch.expm1(-h) * D  # x_i = sigma_i/sigma_{i-1} x_{i-1} - (e^{-h_i} - 1) D_i
            h_prev = h
        denoised_prev = denoised
        _report(callback, i, sigma_next, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: Denoise, x: Tensor, sigmas: Tensor, *, rng: ImageRNG | None = None,
                        callback: Callback | None = None) -> Tensor:
    """SDE-DPM-Solver++(2M) with eta = 1, midpoint form (Lu et al. 2022; k-diffusion's sample_dpmpp_2m_sde)."""
    sigmas, s_in = _check(x, sigmas), x.new_ones(x.shape[0])
    denoised_prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        if sigma_next == 0:
            x = denoised  # the first-order step to lambda = inf, where the noise term vanishes with sigma_t
        else:
            h = sigma.log() - sigma_next.log()  # h = lambda_t - lambda_s with lambda = -log sigma
            D = _data_2m(denoised, denoised_prev, h, h_prev)  # shared with the ODE solver (midpoint form)
            # The reverse diffusion SDE in lambda, solved exactly with the data prediction held at D, at alpha = 1:
            # x_t = sigma_t/sigma_s e^{-h} x_s + (1 - e^{-2h}) D + sigma_t sqrt(1 - e^{-2h}) z, and e^{-h} is
            # sigma_t/sigma_s in VE coordinates: the first-order step is DDPM's posterior (see sample_ddpm).
            decay = (sigma_next / sigma) ** 2  # e^{-2h}
            x = decay * x + (1 - decay) * D + sigma_next * (1 - decay) ** 0.5 * _noise(rng, x)
            h_prev = h
        denoised_prev = denoised
        _report(callback, i, sigma_next, x, denoised)
    return x


def _unipc_rhos(h: float, rs: Sequence[float]) -> list[float]:
    """UniPC's coefficients a_k for K = len(rs) points at r_k = (lambda_k - lambda_s) / h, data prediction (h -> -h).

    They solve sum_k a_k r_k^(i-1) = i! (-h) phi_{i+1}(-h) / B(-h) for i = 1..K, with B(h) = e^h - 1 (bh2) and
    phi_{i+1}(z) = (phi_i(z) - 1/i!) / z; one point takes a = 1/2, the limit h -> 0, as the reference code does.
    """
    if len(rs) < 2:
        return [0.5] * len(rs)
    hh = -h
    g, b = math.expm1(hh) / hh - 1, []  # g = hh phi_2(hh)
    for i in range(1, len(rs) + 1):
        b.append(g * math.factorial(i) / math.expm1(hh))
        g = g / hh - 1 / math.factorial(i + 1)  # hh phi_{i+2}(hh)
    R = torch.tensor([[r ** (i - 1) for r in rs] for i in range(1, len(rs) + 1)], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()


def _unipc_update(x: Tensor, sigmas: Sequence[float], ms: Sequence[Tensor], sigma_next: float,
                  m_next: Tensor | None = None) -> Tensor:
    """One UniP step from x at sigmas[-1] to sigma_next, or with `m_next` (D at sigma_next) the UniC step.

    `ms` are the denoised estimates at `sigmas` (oldest first, the last at x's level). In VE coordinates (alpha = 1)
    x_t = sigma_t/sigma_s x_s - (e^{-h} - 1) m_s - B(-h) sum_k a_k D_k with D_k = (m_k - m_s) / r_k, where the
    corrector adds the new point r = 1, m_next.
    """
    sigma, m_s = sigmas[-1], ms[-1]
    h = math.log(sigma / sigma_next)  # lambda_t - lambda_s
    rs = [math.log(sigma / s_k) / h for s_k in reversed(sigmas[:-1])]  # r_k < 0: earlier points, newest first
    ds = [(m_k - m_s) / r_k for m_k, r_k in zip(reversed(ms[:-1]), rs)]
    if m_next is not None:
        rs, ds = [*rs, 1.0], [*ds, m_next - m_s]
    x_next = sigma_next / sigma * x - math.expm1(-h) * m_s
    if ds:
        x_next = x_next - math.expm1(-h) * sum(a * d for a, d in zip(_unipc_rhos(h, rs), ds))  # B(-h) = e^{-h} - 1
    return x_next


@torch.no_grad()
def sample_unipc(denoiser: Denoise, x: Tensor, sigmas: Tensor, *, rng: ImageRNG | None = None,
                 callback: Callback | None = None, order: int = 2) -> Tensor:
    """UniPC (Zhao et al. 2023): UniP-p predictor and UniC corrector, B(h) = e^h - 1 (bh2), data prediction."""
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    sigmas, s_in = _check(x, sigmas), x.new_ones(x.shape[0])
    levels = sigmas.detach().cpu().double().tolist()
    n = len(sigmas) - 1
    ms: list[Tensor] = []  # denoised at the last `order` predicted samples, oldest first
    x_start, p = x, 0  # the sample the last predictor started from, and that predictor's order
    for i in range(n):
        denoised = denoiser(x, sigmas[i] * s_in)
        if i > 0:  # UniC-p with the predictor's own order: the new evaluation corrects x at no extra cost
            x = _unipc_update(x_start, levels[i - p:i], ms[-p:], levels[i], denoised)
        ms = [*ms, denoised][-order:]
        p = min(order, i + 1, n - i)  # lower orders to warm up and at the last steps (lower_order_final)
        x_start = x
        if levels[i + 1] == 0:
            x = denoised  # the first-order step to lambda = inf, which nothing corrects (no evaluation follows it)
        else:
            x = _unipc_update(x, levels[i - p + 1:i + 1], ms[-p:], levels[i + 1])
        _report(callback, i, sigmas[i + 1], x, denoised)  # the predicted sample, which the next step corrects
    return x


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: the function, the noise levels it is run on by default, and a good step count."""

    fn: Callable[..., Tensor]
    schedule: Literal["discrete", "karras"]  # discrete: SD's training timesteps, as in the sampler's paper
    steps: int  # recommended steps (len(sigmas) - 1); heun makes 2 denoiser calls a step (39 for 20 steps)


# The one list of samplers: the config, the CLI, the comparison and the docs all derive from it.
SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(sample_ddpm, "discrete", 100),
    "ddim": SamplerSpec(sample_ddim, "discrete", 50),
    "euler_maruyama": SamplerSpec(sample_euler_maruyama, "karras", 250),
    "euler": SamplerSpec(sample_euler, "karras", 50),
    "euler_ancestral": SamplerSpec(sample_euler_ancestral, "karras", 50),
    "heun": SamplerSpec(sample_heun, "karras", 20),
    "lms": SamplerSpec(sample_lms, "karras", 30),
    "pndm": SamplerSpec(sample_pndm, "discrete", 30),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, "karras", 20),
    "dpmpp_2m_sde": SamplerSpec(sample_dpmpp_2m_sde, "karras", 30),
    "unipc": SamplerSpec(sample_unipc, "karras", 20),
}


def check_sampler(name: str, key: str = "sampler") -> str:
    """`name` if it is a registered sampler, else a ConfigError naming the parameter `key`."""
    if name not in SAMPLERS:
        raise ConfigError(f"params: bad value for '{key}' ({name!r}): choose from {', '.join(SAMPLERS)}")
    return name


def sample(name: str, denoiser: Denoise, x: Tensor, sigmas: Tensor, **kw: Any) -> Tensor:
    """Run the sampler called `name` (a key of SAMPLERS) with keyword arguments `kw`."""
    return SAMPLERS[check_sampler(name)].fn(denoiser, x, sigmas, **kw)
