"""Seed sets and their spread, and the VAE reconstruction measures of the evaluate stage."""
import math

import pytest
import torch
from tolerances import forward_tol, rounding_tol

from sdlib.errors import DataError
from sdlib.evaluation.scoring import mean_and_spread, seed_sets
from sdlib.models.vae import AutoencoderKL, VAEArgs, reconstruct, reconstruction_psnr


def test_seed_sets_are_disjoint_with_the_same_prompt_mix():
    prompts = ["8"] * 6 + ["3"] * 7  # 3's seventh sample is a leftover for k = 3
    sets = seed_sets(prompts, 3)
    assert [s.tolist() for s in sets] == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]
    assert seed_sets(prompts, 1)[0].tolist() == list(range(13))  # one set: every sample


def test_seed_sets_need_enough_samples_per_prompt():
    with pytest.raises(DataError, match="prompt '3' has 1 sample"):
        seed_sets(["8", "8", "3"], 2)


def test_mean_and_spread():
    out = mean_and_spread([{"fid": 1.0, "kid": 0.0}, {"fid": 3.0, "kid": 0.0}])
    assert out == {"fid": 2.0, "fid_std": pytest.approx(math.sqrt(2)), "kid": 0.0, "kid_std": 0.0}
    assert mean_and_spread([{"fid": 5.0}]) == {"fid": 5.0, "fid_std": 0.0}


def test_reconstruction_psnr_is_analytic():
    x = torch.zeros(2, 1, 4, 4)
    # float32 roundings: 0.02, its square, the mean over 16 pixels, 4 / mse, log10, x 10 and the mean over images
    tol = rounding_tol(steps=7, terms=16)
    assert reconstruction_psnr(x, x + 0.02) == pytest.approx(10 * math.log10(4 / 0.02 ** 2), rel=tol)


def test_reconstruct_keeps_shape_range_and_is_batch_invariant():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEArgs(base_channels=8, channel_mult=(1, 2))).eval()
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    recon = reconstruct(vae, x, batch_size=2)
    assert recon.shape == x.shape and recon.abs().max() <= 1
    assert (recon - reconstruct(vae, x, batch_size=5)).abs().max() <= forward_tol(recon, vae)  # other kernels
