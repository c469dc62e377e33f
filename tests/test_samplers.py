"""Samplers (sdlib.diffusion.samplers) and SDEdit img2img (sdlib.diffusion.img2img), checked on Gaussian data where everything is exact.

For x0 ~ N(mu, s^2) the ideal denoiser is D(x, sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2), the marginal at
noise level sigma is N(mu, s^2 + sigma^2), and the probability-flow ODE has the closed-form solution
x(sigma) = mu + (x(sigma_T) - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_T^2).
"""
from functools import partial

import numpy as np
import pytest
import torch

from sdlib.diffusion.img2img import img2img_sigmas, noised_start
from sdlib.diffusion.samplers import (
    SAMPLERS,
    ImageRNG,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_pndm,
    sample_unipc,
)
from sdlib.diffusion.schedules import alphas_cumprod, betas, get_sigmas, sigmas_karras, vp_sigmas

# "image" i is a row of N iid 1-D draws from N(MU_i, S_i^2): (B=2, N), two generators whatever N is
MU = torch.tensor([[0.3], [-1.0]], dtype=torch.float64)
S = torch.tensor([[1.0], [1.5]], dtype=torch.float64)
N = 50_000
TRAIN_SIGMAS = vp_sigmas(alphas_cumprod(betas("scaled_linear", 1000)))  # Stable Diffusion's: 0.029 .. 14.6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These tensors are too small for intra-op threads to pay; on a shared machine they make the tests 10x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    assert (sigma > 0).all(), "samplers must never evaluate the denoiser at sigma = 0"
    s2 = sigma[:, None] ** 2  # (B, 1)
    return (S**2 * x + s2 * MU) / (S**2 + s2)


def marginal_sample(rng: ImageRNG, sigma: torch.Tensor, n: int = N) -> torch.Tensor:
    # Start from the exact marginal N(mu, s^2 + sigma^2), not N(0, sigma^2): at SD's sigma_max = 14.6 the prior
    # mismatch alone would shift the mean by mu s / sigma_max (7%), which is the schedule's error, not the sampler's.
    return MU + (S**2 + sigma**2).sqrt() * rng.randn((n,), dtype=torch.float64)


def test_registries_list_every_sampler():
    names = ["ddpm", "ddim", "euler_maruyama", "euler", "euler_ancestral", "heun", "lms", "pndm", "dpmpp_2m",
             "dpmpp_2m_sde", "unipc"]
    assert list(SAMPLERS) == names


def test_unknown_sampler_names_the_choices():
    with pytest.raises(ValueError, match=r"bad value for 'sampler' \('plms'\): choose from ddpm, ddim, euler_maruyama, "):
        sample("plms", gaussian_denoiser, torch.zeros(2, 3), sigmas_karras(3, 0.1, 1.0))


def test_bad_schedules_are_rejected():
    x = torch.zeros(2, 3)
    for sigmas in (torch.tensor([1.0, 2.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]), torch.ones(2, 2)):
        with pytest.raises(ValueError, match="sigmas must be a 1-D decreasing schedule"):
            sample_euler(gaussian_denoiser, x, sigmas)


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_contract(name):
    """Shape, dtype, one callback per step with the new sample, no denoiser call at sigma = 0."""
    sigmas = sigmas_karras(6, 0.1, 10.0)  # float64: the sampler computes in the sample's dtype
    x = ImageRNG([1, 2]).randn((3, 4, 4)) * sigmas[0]
    calls, reports = [], []

    def denoiser(x, sigma):
        assert sigma.shape == (2,) and sigma.dtype == x.dtype and (sigma > 0).all()
        calls.append(sigma[0].item())
        return 0.5 * x / (1 + sigma[:, None, None, None] ** 2)

    out = sample(name, denoiser, x, sigmas, rng=ImageRNG([1, 2]), callback=reports.append)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    assert [r["i"] for r in reports] == list(range(6)) and set(reports[0]) == {"i", "sigma", "x", "denoised"}
    torch.testing.assert_close(torch.stack([r["sigma"] for r in reports]), sigmas[1:].float())
    assert torch.equal(reports[-1]["x"], out) and calls[0] == pytest.approx(10.0)
    expected_calls = {"heun": 11, "pndm": 6 + 3 * 3}.get(name, 6)  # Heun: 2 per step but the last; PRK: 4 per step
    assert len(calls) == expected_calls
    assert torch.equal(sample(name, denoiser, x, torch.zeros(1)), x)  # an empty schedule is the identity


# Variance tolerance at the recommended steps: each sampler's discretisation bias on this problem (measured, worst of
# the two schedules) + ~4 standard errors (0.6%). Ancestral samplers lose variance because the DDPM posterior uses
# E[x0 | x_t] and drops Var[x0 | x_t] (Bao et al. 2022, Analytic-DPM); that bias vanishes as steps grow (see below).
VAR_TOL = {"ddpm": 0.10, "ddim": 0.08, "euler_maruyama": 0.05, "euler": 0.08, "euler_ancestral": 0.16,
           "heun": 0.06, "lms": 0.03, "pndm": 0.03, "dpmpp_2m": 0.06, "dpmpp_2m_sde": 0.04, "unipc": 0.06}


@pytest.mark.parametrize("schedule", ["discrete", "karras"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_gaussian_moments_at_recommended_steps(name, schedule):
    sigmas = get_sigmas(schedule, TRAIN_SIGMAS, SAMPLERS[name].steps)
    rng = ImageRNG([10, 11])
    out = SAMPLERS[name].fn(gaussian_denoiser, marginal_sample(rng, sigmas[0]), sigmas, rng=rng)
    mean_err = (out.mean(dim=1, keepdim=True) - MU) / (S / N**0.5)  # in standard errors
    assert mean_err.abs().max() < 4, mean_err
    var_ratio = out.var(dim=1, keepdim=True) / S**2
    assert (var_ratio - 1).abs().max() < VAR_TOL[name], var_ratio


def test_ddpm_with_every_training_timestep_is_unbiased():
    sigmas = get_sigmas("discrete", TRAIN_SIGMAS, 1000)  # the full DDPM chain of Ho et al. 2020
    rng, n = ImageRNG([20, 21]), 20_000
    out = sample_ddpm(gaussian_denoiser, marginal_sample(rng, sigmas[0], n), sigmas, rng=rng)
    assert ((out.mean(dim=1, keepdim=True) - MU) / (S / n**0.5)).abs().max() < 4
    assert (out.var(dim=1, keepdim=True) / S**2 - 1).abs().max() < 0.035  # bias ~1% at 1000 steps, SE 1%


def test_ancestral_samplers_agree_in_ve_coordinates():
    """The DDPM posterior, DDIM with eta = 1 and Euler ancestral are one update in VE coordinates; eta = 0 is Euler."""
    sigmas = get_sigmas("karras", TRAIN_SIGMAS, 12)
    x = marginal_sample(ImageRNG([0, 1]), sigmas[0], 100)
    run = lambda f: f(gaussian_denoiser, x, sigmas, rng=ImageRNG([5, 6]))
    ddpm = run(sample_ddpm)
    torch.testing.assert_close(run(partial(sample_ddim, eta=1.0)), ddpm)
    torch.testing.assert_close(run(sample_euler_ancestral), ddpm)
    torch.testing.assert_close(run(sample_ddim), run(sample_euler))
    two_steps = lambda f: f(gaussian_denoiser, x, sigmas[[0, 6, 12]], rng=ImageRNG([5, 6]))
    # one step of SDE-DPM-Solver++1 (its first step, before any history) is DDPM's posterior; then the step to 0
    torch.testing.assert_close(two_steps(sample_dpmpp_2m_sde), two_steps(sample_ddpm))
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        run(partial(sample_ddim, eta=1.5))


# Deterministic samplers against the closed-form ODE solution. Karras schedule (rho = 7) from sigma_max = 10 to
# sigma_min = 0.02, error measured AT sigma_min: the final jump to 0 has a fixed length sigma_min whatever the step
# count, so its O(sigma_min^2) error would put a floor under the curve and hide the order.
# Expected: Euler/DDIM 1, Heun and DPM-Solver++(2M) 2; LMS 4 in principle but its lower-order warm-up steps and the
# variable steps leave ~3.5 here; PNDM 2, because PLMS's fixed equal-step Adams-Bashforth weights meet
# unequal steps in sigma (exact order 4 only on a uniform grid). UniPC: the corrector UniC raises the predictor's
# order by one, so UniP-2 (= DPM-Solver++(2M)) with UniC is 3, and UniP-1 (= DDIM) with UniC is 2.
VARIANTS = {"pndm_plms_warmup": partial(sample_pndm, warmup="plms"), "unipc_order_1": partial(sample_unipc, order=1)}


@pytest.mark.parametrize("name, low, high", [
    ("euler", 0.9, 1.15), ("ddim", 0.9, 1.15), ("heun", 1.85, 2.3), ("dpmpp_2m", 1.85, 2.3),
    ("lms", 1.9, 4.3), ("pndm", 1.9, 4.3), ("pndm_plms_warmup", 1.9, 4.3),
    ("unipc", 2.8, 3.4), ("unipc_order_1", 1.85, 2.3),
])
def test_convergence_order(name, low, high):
    sampler = VARIANTS[name] if name in VARIANTS else SAMPLERS[name].fn
    mu, s, sigma_min, sigma_max = 0.3, 0.5, 0.02, 10.0
    denoiser = lambda x, sigma: (s**2 * x + sigma[:, None] ** 2 * mu) / (s**2 + sigma[:, None] ** 2)
    x_T = mu + (s**2 + sigma_max**2) ** 0.5 * torch.linspace(-2, 2, 5, dtype=torch.float64)[None]  # (1, 5)
    exact = mu + (x_T - mu) * ((s**2 + sigma_min**2) / (s**2 + sigma_max**2)) ** 0.5
    steps = [10, 20, 40, 80]
    errors = [(sampler(denoiser, x_T, sigmas_karras(n, sigma_min, sigma_max)[:-1]) - exact).abs().max().item()
              for n in steps]
    order = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert low < order < high, (order, errors)


# --- equal to diffusers' schedulers, step by step --------------------------------------------------------------------

def toy_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian data's ideal denoiser plus a nonlinear term, so that which sample D is evaluated at matters."""
    s2 = sigma.reshape(-1, *[1] * (x.ndim - 1)) ** 2  # (B, 1, 1, 1)
    return (0.25 * x + 0.3 * s2) / (0.25 + s2) + 0.2 * torch.tanh(x) / (1 + s2)


def diffusers_scheduler(name: str, schedule: str, order: int):
    """The diffusers scheduler that runs `name`: eps-prediction on SD's betas, sigmas ending at 0; `trailing` timesteps
    are sdlib's `discrete`, `use_karras_sigmas` its `karras`."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
    kw = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
          "timestep_spacing": "trailing", "use_karras_sigmas": schedule == "karras", "final_sigmas_type": "zero",
          "solver_order": order}
    if name == "dpmpp_2m_sde":
        return DPMSolverMultistepScheduler(**kw, algorithm_type="sde-dpmsolver++", solver_type="midpoint")
    return UniPCMultistepScheduler(**kw, predict_x0=True, solver_type="bh2", lower_order_final=True)


def run_diffusers(scheduler, steps: int, x_T: torch.Tensor, noise: list[torch.Tensor] | None) -> torch.Tensor:
    """`toy_denoiser` as an eps-prediction model in diffusers' VP coordinates x_VP = x / sqrt(1 + sigma^2)."""
    scheduler.set_timesteps(steps)
    scheduler.set_begin_index(0)
    sigmas = scheduler.sigmas
    x = x_T / (1 + sigmas[0] ** 2).sqrt()
    for i, t in enumerate(scheduler.timesteps):
        x_ve = x * (1 + sigmas[i] ** 2).sqrt()
        eps = (x_ve - toy_denoiser(x_ve, sigmas[i].expand(len(x)))) / sigmas[i]
        x = scheduler.step(eps, t, x, **({} if noise is None else {"variance_noise": noise[i]})).prev_sample
    return x  # at sigma = 0, where VP and VE coordinates agree


@pytest.mark.parametrize("steps", [4, 12])
@pytest.mark.parametrize("schedule", ["discrete", "karras"])
@pytest.mark.parametrize("name, order", [("dpmpp_2m_sde", 2), ("unipc", 2), ("unipc", 3)])
def test_matches_diffusers_scheduler(name, order, schedule, steps):
    """Our sampler on diffusers' own sigmas gives diffusers' final sample; the stochastic one with the same noise.

    Planted bugs caught, each in every case of its sampler (off by 7e-4 to 2, against bounds of 4e-5 and 1e-4;
    measured 2e-7 to 3e-6): the midpoint weight 1/2 of D1 as 1; r = h_prev / h inverted; the noise scale
    sqrt(1 - e^{-2h}) as sqrt(1 - e^{-h}); UniPC's one-point weight 1/2 as 1/3; its i! as (i + 1)!; the corrector
    left out; the corrector applied to the predicted sample instead of the one its predictor started from.
    """
    pytest.importorskip("diffusers")
    scheduler = diffusers_scheduler(name, schedule, order)
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.double()  # float32 values; diffusers builds alpha_bar by a float32 cumprod
    # the same schedules as ours up to that rounding: after t + 1 factors alpha_bar is off by <= (t + 1) 2^-24
    # relative, which moves sigma by that over 2 (1 - alpha_bar): at most 3.5e-5 relative, at t = 0
    torch.testing.assert_close(sigmas, get_sigmas(schedule, TRAIN_SIGMAS, steps), rtol=1e-4, atol=0)
    x_T = ImageRNG([5, 6]).randn((3, 4, 4), dtype=torch.float64) * sigmas[0]  # (B, C, H, W)
    rng, twin = ImageRNG([1, 2]), ImageRNG([1, 2])  # ours draws one noise per step but the last, as twin does here
    noise = [twin.randn_like(x_T) for _ in range(steps - 1)] + [torch.zeros_like(x_T)]
    ours = SAMPLERS[name].fn(toy_denoiser, x_T, sigmas, rng=rng, **({"order": order} if name == "unipc" else {}))
    theirs = run_diffusers(scheduler, steps, x_T.float(), noise if name == "dpmpp_2m_sde" else None)
    # diffusers works in float32 (unit roundoff u = 2^-24), ours in float64. Each step rounds a few quantities
    # (the VP scaling, eps, the update) whose size is at most |x_T|, and the steps contract (sigma_t/sigma_s < 1), so
    # the rounding errors add up to at most ~4 u |x_T| per step.
    bound = 4 * steps * 2**-24 * x_T.abs().max().item()
    assert (ours - theirs.double()).abs().max().item() <= bound


@pytest.mark.parametrize("name", ["ddpm", "euler_ancestral", "euler_maruyama", "dpmpp_2m_sde"])
def test_image_rng_makes_each_image_independent_of_its_batch(name):
    sigmas = get_sigmas("discrete", TRAIN_SIGMAS, 10)
    denoiser = lambda x, sigma: 0.8 * x / (1 + sigma[:, None, None, None] ** 2) + 0.1  # deterministic toy D

    def generate(seeds):
        rng = ImageRNG(seeds)
        return SAMPLERS[name].fn(denoiser, rng.randn((2, 4, 4)) * sigmas[0], sigmas, rng=rng)

    alone, batch = generate([7]), generate([3, 7, 11, 5])
    assert torch.equal(alone[0], batch[1])
    assert not torch.equal(batch[0], batch[1]) and torch.equal(generate([3, 7, 11, 5]), batch)


def test_image_rng_shapes_and_batch_check():
    rng = ImageRNG([1, 2, 3])
    assert rng.randn((4, 5)).shape == (3, 4, 5)
    assert rng.randn_like(torch.zeros(3, 2, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError, match="batch of 2 images for 3 seeds"):
        rng.randn_like(torch.zeros(2, 4))


def test_img2img_strength_one_keeps_the_full_schedule():
    full = get_sigmas("karras", TRAIN_SIGMAS, 20)
    assert torch.equal(img2img_sigmas(full, 1.0), full)
    tail = img2img_sigmas(full, 0.5)
    assert torch.equal(tail, full[10:]) and len(tail) == 11
    assert len(img2img_sigmas(get_sigmas("discrete", TRAIN_SIGMAS, 100), 0.29)) == 30  # not 29: 0.29 * 100 < 29


def test_img2img_small_strength_returns_almost_the_input():
    full = get_sigmas("discrete", TRAIN_SIGMAS, 50)
    rng = ImageRNG([0, 1])
    z0 = MU + S * rng.randn((1000,), dtype=torch.float64)  # an "image" from the data distribution
    nothing = img2img_sigmas(full, 0.01)  # 0.5 steps: none kept
    assert nothing.tolist() == [0.0]
    assert torch.equal(sample_euler(gaussian_denoiser, noised_start(z0, 0.0, rng), nothing), z0)
    tail = img2img_sigmas(full, 0.04)  # the last 2 of 50 steps
    assert len(tail) == 3 and tail[0] < 0.2
    out = sample_euler(gaussian_denoiser, noised_start(z0, tail[0], rng), tail)
    assert (out - z0).abs().mean() < tail[0]  # closer to the input than the noise that was added (E|z| = 0.8)
    regenerated = sample_euler(gaussian_denoiser, noised_start(z0, full[0], rng), full)
    assert (regenerated - z0).abs().mean() > 0.8  # strength 1 forgets the input


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5])
def test_img2img_rejects_bad_strength(strength):
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        img2img_sigmas(sigmas_karras(10, 0.1, 10.0), strength)
