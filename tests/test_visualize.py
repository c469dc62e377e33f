"""Visualisations and generation on a tiny untrained model: files appear, attention maps are distributions."""
import pytest
import torch
from tolerances import forward_tol, rounding_tol

from sdlib.evaluation.visualize import attention_figure, attention_maps, forward_figure, reverse_figure
from sdlib.generate import Prompts, generate
from sdlib.ldm import DiffusionArgs, LatentDiffusion
from sdlib.models.text import TextEncoderArgs, write_clip_tokenizer_files
from sdlib.models.unet import UNetArgs
from sdlib.models.vae import AutoencoderKL, VAEArgs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    text = TextEncoderArgs(hidden_size=16, num_layers=1, num_heads=2, max_length=8)
    model = LatentDiffusion(unet=UNetArgs(in_channels=4, context_dim=16, model_channels=8, channel_mult=(1, 2),
                                          attention_levels=(0, 1), num_heads=2), text=text, diffusion=DiffusionArgs(),
                            latent_hw=(4, 4)).eval()
    for p in model.unet.parameters():  # random, non-zero weights so that attention reaches the output
        torch.nn.init.normal_(p, std=0.1)
    vae = AutoencoderKL(VAEArgs(in_channels=1, base_channels=8, channel_mult=(1, 2))).eval()
    tok = write_clip_tokenizer_files(tmp_path_factory.mktemp("tok"))
    return model, vae, Prompts(tok, model)


def test_generate_shapes_and_seed_invariance(tiny):
    model, vae, prompts = tiny
    both = generate(model, vae, prompts, ["8", "3"], [5, 6], sampler="ddim", steps=3, guidance=3.0)
    alone = generate(model, vae, prompts, ["3"], [6], sampler="ddim", steps=3, guidance=3.0)
    assert both.shape == (2, 1, 8, 8) and both.abs().max() <= 1.0
    # image i with seed s does not depend on its batch, up to rounding: after the text encoder, 3 DDIM steps (convex
    # combinations of x and the denoised x0_u + 3 (x0_c - x0_u), which weighs the U-Net's rounding by |1 - 3| + 3 = 5)
    # and the VAE's decoder
    tol = forward_tol(both[1], model.text, *[model.unet] * (3 * 5), vae.decoder)
    assert (both[1] - alone[0]).abs().max() <= tol


def test_attention_maps_are_distributions_over_tokens(tiny):
    model, vae, prompts = tiny
    image, maps = attention_maps(model, vae, prompts, "a handwritten 8", steps=3)
    assert image.shape == (1, 8, 8) and maps.shape == (8, 8, 8)  # (tokens, H, W)
    # float32 sums: the softmax's over 8 tokens, the mean over heads, the bilinear upsampling, the total over 3 steps x
    # the cross-attention layers (the most terms), its mean, and this sum over tokens
    count = 3 * len(model.unet.attention_modules())
    assert (maps.sum(0) - 1).abs().max() <= rounding_tol(steps=6, terms=count)
    assert all(m.maps is None and not m.store_maps for m in model.unet.attention_modules())


def test_figures_are_written(tiny, tmp_path):
    model, vae, prompts = tiny
    forward_figure(tmp_path / "f.png", model, vae, torch.rand(1, 8, 8) * 2 - 1)
    reverse_figure(tmp_path / "r.png", model, vae, prompts, "8", steps=4, sampler="heun")
    attention_figure(tmp_path / "a.png", model, vae, prompts, "8", steps=2)
    assert all((tmp_path / n).stat().st_size > 100 for n in ("f.png", "r.png", "a.png"))
