"""The eps/v denoiser wrapper, its training loss (sdlib.diffusion.denoisers) and classifier-free guidance (sdlib.diffusion.guidance)."""
import pytest
import torch
from torch import nn

from sdlib.diffusion.denoisers import Denoiser
from sdlib.diffusion.guidance import CFGDenoiser
from sdlib.diffusion.samplers import sample_euler
from sdlib.diffusion.schedules import alphas_cumprod, betas, get_sigmas

T = 1000
AC = alphas_cumprod(betas("scaled_linear", T))  # float64 so that training sigmas map to integer t exactly


def _images(seed: int, b: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 2, 4, 4, generator=g, dtype=torch.float64),
            torch.randn(b, 2, 4, 4, generator=g, dtype=torch.float64))


class Recorder(nn.Module):
    """A 'network' returning a fixed output and recording what it was called with."""

    def __init__(self, out: torch.Tensor | None = None):
        super().__init__()
        self.out, self.calls = out, []

    def forward(self, x_in, t, context):
        self.calls.append((x_in, t, context))
        return torch.zeros_like(x_in) if self.out is None else self.out


def test_sigma_to_t_is_exact_at_training_sigmas_and_log_linear_between():
    d = Denoiser(Recorder(), AC, "eps")
    assert torch.equal(d.sigma_to_t(d.train_sigmas), torch.arange(T, dtype=torch.float64))
    mid = (d.train_sigmas[:-1] * d.train_sigmas[1:]).sqrt()  # geometric mean = midpoint in log sigma
    torch.testing.assert_close(d.sigma_to_t(mid), torch.arange(T - 1, dtype=torch.float64) + 0.5)
    assert d.sigma_to_t(torch.tensor([1e-4, 1e3])).tolist() == [0.0, T - 1.0]  # clamped outside the trained range
    t = torch.tensor([0.0, 0.25, 17.5, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(d.sigma_to_t(d.t_to_sigma(t)), t)
    assert d.sigma_min == d.train_sigmas[0].item() and d.sigma_max == d.train_sigmas[-1].item()


def test_eps_denoiser_recovers_x0_from_the_true_noise():
    x0, eps = _images(0)
    sigma = torch.tensor([0.05, 1.0, 14.0], dtype=torch.float64)
    x = x0 + sigma[:, None, None, None] * eps
    net = Recorder(eps)
    d = Denoiser(net, AC, "eps")
    # float64 throughout: a few roundings (2^-53 relative) of |x| <= 45 are ~1e-14
    torch.testing.assert_close(d(x, sigma), x0, rtol=0, atol=1e-12)
    x_in, t, _ = net.calls[0]
    torch.testing.assert_close(x_in, x / (sigma[:, None, None, None] ** 2 + 1).sqrt())  # c_in x = x_VP
    torch.testing.assert_close(t, d.sigma_to_t(sigma))


def test_v_denoiser_round_trip():
    x0, eps = _images(1)
    sigma = torch.tensor([0.03, 0.7, 9.0], dtype=torch.float64)
    ab = (1 / (sigma**2 + 1))[:, None, None, None]
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0  # Salimans & Ho 2022
    x_vp = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    # float64, as for eps above
    torch.testing.assert_close(Denoiser(Recorder(v), AC, "v")(x_vp / ab.sqrt(), sigma), x0, rtol=0, atol=1e-12)


def test_sigma_may_be_a_float_a_scalar_or_per_image():
    x0, eps = _images(2)
    d = Denoiser(Recorder(eps), AC, "eps")
    x = x0 + 0.5 * eps
    ref = d(x, torch.full((3,), 0.5, dtype=torch.float64))
    assert torch.equal(d(x, 0.5), ref) and torch.equal(d(x, torch.tensor(0.5)), ref)


def _true_output_net(x0: torch.Tensor, prediction: str):
    """A net that reads x0 + sigma_t eps back off its input and returns the exact eps or v target."""
    def net(x_in, t, context):
        sigma = ((1 - AC[t.long()]) / AC[t.long()]).sqrt()[:, None, None, None]
        c_in = 1 / (sigma**2 + 1).sqrt()
        eps = (x_in / c_in - x0) / sigma
        return eps if prediction == "eps" else c_in * (eps - sigma * x0)
    return net


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_loss_of_the_true_target_is_zero(prediction):
    x0, _ = _images(3, b=8)
    d = Denoiser(_true_output_net(x0, prediction), AC, prediction)
    # float64: the net reads eps back to ~2^-52 |x| / sigma_min ~ 1e-14, so the mean square is ~1e-28
    assert d.loss(x0, None, torch.Generator().manual_seed(0)).item() < 1e-20


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_loss_is_the_mse_to_eps_or_v_drawn_from_the_generator(prediction):
    x0, _ = _images(4, b=8)
    net = Recorder()
    d = Denoiser(net, AC, prediction)
    loss = d.loss(x0, "ctx", torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # the documented draw order: t first, then eps
    t = torch.randint(0, T, (8,), generator=g)
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    ab = AC[t][:, None, None, None]
    target = eps if prediction == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
    assert loss.item() == pytest.approx(target.pow(2).mean().item(), rel=1e-10)  # float64 means of 256 terms
    x_in, t_in, context = net.calls[0]
    assert torch.equal(t_in, t.double()) and context == "ctx"
    torch.testing.assert_close(x_in, ab.sqrt() * x0 + (1 - ab).sqrt() * eps)  # the DDPM x_t (Ho et al. eq. 4)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weights_each_image_by_min_snr_gamma_over_its_target_snr(prediction):
    """Min-SNR-gamma (Hang et al. 2023): the x0 error weighted by min(SNR, gamma), i.e. the eps error by
    min(SNR, gamma) / SNR and the v error by min(SNR, gamma) / (SNR + 1); SNR = alpha_bar / (1 - alpha_bar)."""
    x0, eps = _images(6, b=4)
    t = torch.tensor([0, 300, 700, 999])  # SNR from about 1,000 down to 0.005: both sides of gamma = 5
    d = Denoiser(Recorder(), AC, prediction)
    plain = torch.stack([d.loss(x0[i:i + 1], None, t=t[i:i + 1], eps=eps[i:i + 1]) for i in range(4)])  # (4,)
    snr = AC[t] / (1 - AC[t])
    weight = snr.clamp(max=5.0) / (snr if prediction == "eps" else snr + 1)
    weighted = d.loss(x0, None, t=t, eps=eps, min_snr_gamma=5.0)
    assert weighted.item() == pytest.approx((weight * plain).mean().item(), rel=1e-10)
    assert weight[0] < 0.01  # the nearly clean image's weight is cut by gamma / SNR
    if prediction == "eps":  # below gamma the eps loss is as it was; gamma above every SNR leaves it all as it is
        assert weight[2:].tolist() == [1.0, 1.0]
        assert d.loss(x0, None, t=t, eps=eps, min_snr_gamma=1e9).item() == pytest.approx(plain.mean().item(),
                                                                                           rel=1e-12)


def test_loss_trains_the_net_and_schedule_stays_out_of_the_state_dict():
    net = nn.Conv2d(2, 2, 1)
    d = Denoiser(lambda x_in, t, context: net(x_in), AC.float(), "eps")
    x0 = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    d.loss(x0, None, torch.Generator().manual_seed(1)).backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0
    assert list(Denoiser(net, AC, "eps").state_dict()) == ["net.weight", "net.bias"]


def test_unknown_prediction_is_rejected():
    with pytest.raises(ValueError, match="unknown prediction 'x0'"):
        Denoiser(Recorder(), AC, "x0")


class ToyContextDenoiser:
    """D(x, sigma, context): a deterministic function of all three, counting calls and batch sizes."""

    def __init__(self):
        self.batches: list[int] = []

    def __call__(self, x, sigma, context):
        self.batches.append(x.shape[0])
        return x * context.mean(dim=(1, 2))[:, None, None, None] + sigma[:, None, None, None]


@pytest.fixture
def cfg_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g)
    cond, uncond = torch.randn(3, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    return x, torch.tensor([2.0, 1.0, 0.5]), cond, uncond


def test_cfg_scale_one_is_exactly_the_conditional_model(cfg_inputs):
    x, sigma, cond, uncond = cfg_inputs
    inner = ToyContextDenoiser()
    assert torch.equal(CFGDenoiser(inner, cond, uncond, 1.0)(x, sigma), ToyContextDenoiser()(x, sigma, cond))
    assert inner.batches == [3]


def test_cfg_scale_zero_is_the_unconditional_model(cfg_inputs):
    x, sigma, cond, uncond = cfg_inputs
    inner = ToyContextDenoiser()
    out = CFGDenoiser(inner, cond, uncond, 0.0)(x, sigma)
    assert torch.equal(out, ToyContextDenoiser()(x, sigma, uncond.expand(3, -1, -1)))
    assert inner.batches == [3]


@pytest.mark.parametrize("uncond_batch", [1, 3])  # "" shared by the batch, or one negative prompt per image
def test_cfg_combines_one_batched_call(cfg_inputs, uncond_batch):
    x, sigma, cond, _ = cfg_inputs
    uncond = torch.randn(uncond_batch, 5, 8, generator=torch.Generator().manual_seed(1))
    inner = ToyContextDenoiser()
    out = CFGDenoiser(inner, cond, uncond, 7.5)(x, sigma)
    assert inner.batches == [6]  # one call on cat([uncond, cond])
    ref = ToyContextDenoiser()
    x0_u, x0_c = ref(x, sigma, uncond.expand(3, -1, -1)), ref(x, sigma, cond)
    torch.testing.assert_close(out, x0_u + 7.5 * (x0_c - x0_u))


def test_cfg_rejects_mismatched_contexts(cfg_inputs):
    x, sigma, cond, _ = cfg_inputs
    with pytest.raises(ValueError, match="does not match cond context"):
        CFGDenoiser(ToyContextDenoiser(), cond, torch.zeros(2, 5, 8), 3.0)
    with pytest.raises(ValueError, match="batch of 2 images for 3 conditioning contexts"):
        CFGDenoiser(ToyContextDenoiser(), cond, torch.zeros(1, 5, 8), 3.0)(x[:2], sigma[:2])


def test_cfg_denoiser_drives_a_sampler_with_a_wrapped_net():
    d = Denoiser(lambda x_in, t, context: x_in * context.mean(), AC.float(), "eps")
    cond, uncond = torch.ones(2, 3, 4), torch.zeros(1, 3, 4)
    sigmas = get_sigmas("karras", d.train_sigmas, 5)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    out = sample_euler(CFGDenoiser(d, cond, uncond, 3.0), x, sigmas)
    assert out.shape == x.shape and torch.isfinite(out).all()
