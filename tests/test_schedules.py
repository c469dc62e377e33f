"""Training betas and sampling sigma schedules (sdlib.diffusion.schedules)."""
import math

import pytest
import torch

from sdlib.diffusion.schedules import alphas_cumprod, betas, get_sigmas, sigmas_discrete, sigmas_karras, vp_sigmas

T = 1000


@pytest.fixture(scope="module")
def train_sigmas() -> torch.Tensor:
    return vp_sigmas(alphas_cumprod(betas("scaled_linear", T)))


@pytest.mark.parametrize("kind, first, last", [("scaled_linear", 0.00085, 0.012), ("linear", 1e-4, 0.02)])
def test_betas_endpoints(kind, first, last):
    b = betas(kind, T)
    assert b.dtype == torch.float64 and b.shape == (T,)
    assert b[0].item() == pytest.approx(first, rel=1e-12) and b[-1].item() == pytest.approx(last, rel=1e-12)
    assert (b[1:] > b[:-1]).all()


def test_scaled_linear_is_linear_in_sqrt_beta():
    d = betas("scaled_linear", T).sqrt().diff()
    torch.testing.assert_close(d, torch.full_like(d, d[0].item()))


def test_cosine_betas_follow_alpha_bar_and_are_clipped():
    b = betas("cosine", T)
    assert b.shape == (T,) and (b > 0).all() and b.max() <= 0.999 and b[-1] == 0.999
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # Nichol & Dhariwal 2021, eq. 17
    # float64: a product of 500 factors rounds by at most 500 x 2^-53 ~ 6e-14
    assert alphas_cumprod(b)[T // 2 - 1].item() == pytest.approx(f(T // 2) / f(0), rel=1e-10)


def test_unknown_beta_schedule_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'"):
        betas("quadratic", T)


def test_vp_sigmas_match_stable_diffusion(train_sigmas):
    # the well-known sigma range of SD v1 (k-diffusion's CompVisDenoiser): 0.0292 .. 14.6146, written to 4 decimals,
    # so off by at most half a unit in the 4th
    assert train_sigmas[0].item() == pytest.approx(0.0292, abs=5e-5)
    assert train_sigmas[-1].item() == pytest.approx(14.6146, abs=5e-5)
    assert (train_sigmas.diff() > 0).all()
    ab = alphas_cumprod(betas("scaled_linear", T))
    torch.testing.assert_close(1 / (train_sigmas**2 + 1), ab)  # sigma <-> alpha_bar round trip


def _check_schedule(sigmas: torch.Tensor, n: int) -> None:
    assert sigmas.shape == (n + 1,)
    assert sigmas[-1] == 0 and (sigmas[:-1] > 0).all()
    assert (sigmas.diff() < 0).all()


@pytest.mark.parametrize("n", [1, 7, 50, 1000])
def test_discrete_schedule(train_sigmas, n):
    sigmas = sigmas_discrete(train_sigmas, n)
    _check_schedule(sigmas, n)
    assert sigmas[0] == train_sigmas[-1]  # "trailing": the first step is at t = T - 1


def test_discrete_schedule_uses_trailing_timesteps(train_sigmas):
    expected = train_sigmas[torch.arange(999, 0, -100)]  # t = 999, 899, ..., 99
    torch.testing.assert_close(sigmas_discrete(train_sigmas, 10)[:-1], expected, rtol=0, atol=0)
    torch.testing.assert_close(sigmas_discrete(train_sigmas, T)[:-1], train_sigmas.flip(0), rtol=0, atol=0)


@pytest.mark.parametrize("n", [0, T + 1])
def test_discrete_schedule_rejects_bad_step_counts(train_sigmas, n):
    with pytest.raises(ValueError, match="steps must be in 1..1000"):
        sigmas_discrete(train_sigmas, n)


@pytest.mark.parametrize("n", [2, 10, 40])
def test_karras_endpoints(n):
    sigmas = sigmas_karras(n, 0.002, 80.0)
    _check_schedule(sigmas, n)
    assert sigmas.dtype == torch.float64  # so a few roundings of 2^-53 each
    assert sigmas[0].item() == pytest.approx(80.0, rel=1e-12)
    assert sigmas[-2].item() == pytest.approx(0.002, rel=1e-12)


def test_karras_interpolates_in_sigma_to_the_one_over_rho():
    torch.testing.assert_close(sigmas_karras(5, 1.0, 5.0, rho=1.0)[:-1], torch.tensor([5.0, 4, 3, 2, 1]).double())
    u = sigmas_karras(9, 0.1, 10.0) ** (1 / 7)
    torch.testing.assert_close(u[:-1].diff(), torch.full((8,), u[1].item() - u[0].item()).double())
    assert sigmas_karras(1, 0.1, 10.0).tolist() == pytest.approx([10.0, 0.0], rel=1e-12)


def test_karras_rejects_bad_range():
    with pytest.raises(ValueError, match="sigma_min <= sigma_max"):
        sigmas_karras(10, 1.0, 0.5)


def test_get_sigmas_dispatches(train_sigmas):
    assert torch.equal(get_sigmas("discrete", train_sigmas, 20), sigmas_discrete(train_sigmas, 20))
    karras = get_sigmas("karras", train_sigmas, 20)
    _check_schedule(karras, 20)
    assert karras[0] == pytest.approx(train_sigmas[-1].item()) and karras[-2] == pytest.approx(train_sigmas[0].item())
    with pytest.raises(ValueError, match="unknown sigma schedule 'exponential'"):
        get_sigmas("exponential", train_sigmas, 20)
