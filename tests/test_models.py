"""VAE and U-Net: shapes, skip variants, identity-at-init, attention maps, a tiny overfit, checkpoint round trip."""
import math

import pytest
import torch
from tolerances import EPS32, forward_tol, rounding_tol

from sdlib.io import load_weights, save_weights
from sdlib.models.unet import UNet, UNetArgs, timestep_embedding
from sdlib.models.vae import AutoencoderKL, VAEArgs, psnr, vae_loss


def test_vae_shapes_and_factor():
    args = VAEArgs(in_channels=3, base_channels=8, channel_mult=(1, 2, 2), latent_channels=4)
    vae = AutoencoderKL(args)
    x = torch.randn(2, 3, 32, 32)
    posterior = vae.encode(x)
    assert args.factor == 4 and posterior.mean.shape == (2, 4, 8, 8)
    assert vae.decode(posterior.mean).shape == x.shape
    assert posterior.kl().shape == (2,) and (posterior.kl() >= 0).all()


def test_vae_overfits_a_tiny_batch():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEArgs(in_channels=1, base_channels=8, channel_mult=(1, 2), latent_channels=4))
    x = torch.zeros(8, 1, 16, 16)
    x[:, :, 4:12, 6:10] = 1.0  # a bar, like a digit one
    x = x * 2 - 1
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        recon, posterior = vae(x, generator=gen)
        loss, rec, _ = vae_loss(x, recon, posterior, kl_weight=1e-6)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert psnr(x, vae.decode(vae.encode(x).mean)) > 20.0


def test_psnr_analytic():
    x = torch.zeros(1, 1, 4, 4)
    # float32 roundings: 0.2, its square, the mean over 16 pixels, 4 / mse, log10 and x 10
    tol = rounding_tol(steps=6, terms=16)
    assert psnr(x, x + 0.2).item() == pytest.approx(10 * torch.log10(torch.tensor(4 / 0.04)).item(), rel=tol)


@pytest.mark.parametrize("dim", [8, 64])
def test_timestep_embedding_is_the_sinusoidal_formula(dim):
    """emb(t)_j = cos(t w_j), emb(t)_{half+j} = sin(t w_j), w_j = 10000^(-j/half) (Vaswani et al. 2017, sec. 3.5)."""
    t = torch.tensor([0.0, 1.0, 10.5, 999.0])
    half = dim // 2
    w = [10000.0 ** (-j / half) for j in range(half)]
    expected = torch.tensor([[math.cos(ti * wj) for wj in w] + [math.sin(ti * wj) for wj in w] for ti in t.tolist()])
    got = timestep_embedding(t, dim)
    assert got.shape == (4, dim)
    # float32 rounds -ln(10^4) and its product with j (together |ln w_j| eps of w_j), exp (1 ulp) and t w_j, so the
    # argument t w_j is off by up to t w_j (|ln w_j| + 1.5) eps; cos or sin and the float32 `expected` add < 1 eps
    w = torch.tensor(w, dtype=torch.float64)
    bound = EPS32 * (t[:, None] * w * (1.5 - w.log()) + 1)  # (4, half)
    assert ((got - expected).abs() <= bound.repeat(1, 2)).all()


@pytest.mark.parametrize("skip", ["concat", "add"])
def test_unet_shapes_and_zero_init(skip):
    args = UNetArgs(in_channels=4, context_dim=16, model_channels=16, channel_mult=(1, 2), attention_levels=(0, 1),
                    num_heads=2, skip=skip)
    net = UNet(args)
    x, t, ctx = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 10.5, 999.0]), torch.randn(3, 5, 16)
    out = net(x, t, ctx)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output layer: training starts from predicting 0


@pytest.mark.parametrize("skip", ["concat", "add"])
def test_unet_output_depends_on_time_and_text(skip):
    """With no zero-initialised layer left, the prediction changes with the timestep and with the context, and one
    image's output does not depend on the rest of the batch.

    The width is the default's (64): GroupNorm's 32 groups then hold 2 channels each. With one channel per group
    (widths <= 32) norm2 removes the per-channel time embedding that ResBlock adds just before it, and the output
    does not depend on t at all.
    """
    torch.manual_seed(0)
    net = UNet(UNetArgs(in_channels=4, context_dim=16, model_channels=64, channel_mult=(1, 2), attention_levels=(1,),
                        num_heads=2, skip=skip))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    t = torch.tensor([10.0, 10.0])
    out = net(x, t, ctx)
    assert (out - net(x, torch.tensor([500.0, 500.0]), ctx)).abs().amax() > 1e-2
    assert (out - net(x, t, torch.randn(2, 5, 16))).abs().amax() > 1e-2
    assert (net(x[:1], t[:1], ctx[:1]) - out[:1]).abs().max() <= forward_tol(out, net)  # other kernels for batch 1


def test_unet_args_reject_heads_that_do_not_divide():
    with pytest.raises(ValueError, match="num_heads=3 must divide"):
        UNetArgs(model_channels=64, num_heads=3)
    with pytest.raises(ValueError, match="attention_levels"):
        UNetArgs(channel_mult=(1, 2), attention_levels=(2,))


def test_unet_attention_maps_match_fused_path():
    torch.manual_seed(0)
    net = UNet(UNetArgs(in_channels=4, context_dim=16, model_channels=16, channel_mult=(1, 2), attention_levels=(1,),
                        num_heads=2))
    for p in net.parameters():  # leave no zero-initialised branch, so attention changes the output
        torch.nn.init.normal_(p, std=0.2)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 500.0]), torch.randn(2, 7, 16)
    fused = net(x, t, ctx)
    assert not torch.allclose(fused, net(x, t, torch.randn(2, 7, 16)), atol=1e-3)  # the text context matters
    for m in net.attention_modules():
        m.store_maps = True
    explicit = net(x, t, ctx)
    assert (fused - explicit).abs().max() <= forward_tol(fused, net)
    maps = [m.maps for m in net.attention_modules()]
    assert maps[0].shape == (2, 2, 16, 7)  # (B, heads, 4x4 latent positions, 7 tokens)
    # two float32 sums over the 7 tokens: the softmax's normaliser and this one
    assert (maps[0].sum(-1) - 1).abs().max() <= rounding_tol(steps=2, terms=7)


def test_weights_round_trip(tmp_path):
    args = VAEArgs(in_channels=1, base_channels=8, channel_mult=(1, 2))
    vae = AutoencoderKL(args)
    save_weights(tmp_path / "vae.safetensors", vae.state_dict(), {"kind": "vae", "args": args.to_dict()})
    tensors, meta = load_weights(tmp_path / "vae.safetensors", kind="vae")
    vae2 = AutoencoderKL(VAEArgs.from_dict(meta["args"]))
    vae2.load_state_dict(tensors)
    x = torch.randn(1, 1, 16, 16)
    assert torch.equal(vae.encode(x).mean, vae2.encode(x).mean)
