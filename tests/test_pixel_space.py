"""Pixel-space diffusion (`vae.kind: none`): the identity autoencoder, and the stages that see it as any other VAE.

train_vae writes the identity, encode_latents passes the images through unscaled, the U-Net learns its shape from
them, and evaluate, report and the regression gate leave out the reconstruction metrics that only a VAE has.
"""
import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from sdlib.config import parse_section, read_params
from sdlib.data.encoded_captions import write_encoded_captions
from sdlib.data.latents import Latents, load_latents
from sdlib.data.splits import load_split
from sdlib.errors import CheckpointError, ConfigError
from sdlib.evaluation.report import render
from sdlib.evaluation.scoring import vae_quality
from sdlib.export import app as export
from sdlib.io import load_weights, save_weights
from sdlib.models.unet import UNet, UNetArgs
from sdlib.models.vae import IdentityArgs, IdentityAutoencoder, encode_posteriors, load_vae, reconstruct, save_vae
from sdlib.training.latent_diffusion import unet_training
from stages.encode_latents import app as encode_latents
from stages.train_vae import app as train_vae

runner = CliRunner()


def test_identity_round_trip_is_exact(tmp_path):
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # beyond [-1, 1] too: nothing clamps
    save_vae(tmp_path / "vae.safetensors", IdentityAutoencoder(IdentityArgs(in_channels=3)))
    tensors, meta = load_weights(tmp_path / "vae.safetensors", kind="vae")
    assert tensors == {} and meta == {"kind": "vae", "autoencoder": "none", "args": {"in_channels": 3}}
    vae = load_vae(tmp_path / "vae.safetensors")
    posterior = vae.encode(x)
    assert torch.equal(vae.decode(posterior.mean), x) and torch.equal(posterior.sample(), x)
    mean, std = encode_posteriors(vae, x, batch_size=2)
    assert torch.equal(mean, x) and torch.equal(std, torch.zeros_like(x))
    assert torch.equal(reconstruct(vae, x), x.clamp(-1, 1))
    assert (vae.args.factor, vae.args.latent_channels, vae.scale_factor, vae.kind) == (1, 3, 1.0, "none")


def test_unknown_autoencoder_is_a_checkpoint_error(tmp_path):
    save_weights(tmp_path / "vae.safetensors", {}, {"kind": "vae", "autoencoder": "vq", "args": {"in_channels": 1}})
    with pytest.raises(CheckpointError, match="unknown autoencoder 'vq'"):
        load_vae(tmp_path / "vae.safetensors")


def test_kind_is_validated_and_kl_by_default():
    assert parse_section("vae", {}).kind == "kl"
    assert parse_section("vae", {"kind": "none", "channel_mult": [1, 2, 4]}).kind == "none"  # VAE sizes: ignored
    with pytest.raises(ConfigError, match=r"^params: bad value for 'vae.kind' \('vq'\)"):
        parse_section("vae", {"kind": "vq"})


@pytest.fixture
def pixel_workspace(tmp_path, params_file, monkeypatch, noise_digits):
    """Processed 3-channel 16x16 'digits' (noise), and params with `vae.kind: none`."""
    monkeypatch.setenv("SDLIB_TRACKING", "off")
    noise_digits(tmp_path / "processed", 24, 8, channels=3, size=16)
    params = params_file(vae={"kind": "none"}, unet={"model_channels": 16, "num_heads": 2, "batch_size": 8})
    return tmp_path, params


def test_train_vae_writes_the_identity_and_encode_latents_passes_pixels_unscaled(pixel_workspace):
    root, params = pixel_workspace
    out = root / "models/vae.safetensors"
    done = runner.invoke(train_vae, ["--params", str(params), "--data", str(root / "processed"), "--out", str(out),
                                     "--metrics", str(root / "train_vae.json"), "--curve", str(root / "vae.csv"),
                                     "--checkpoint", str(root / "vae.pt"), "--device", "cpu"])
    assert done.exit_code == 0, done.output
    assert "nothing to train" in done.output and not (root / "vae.pt").exists()
    assert isinstance(load_vae(out), IdentityAutoencoder) and load_vae(out).args.in_channels == 3
    assert json.loads((root / "train_vae.json").read_text()) == {"params_m": 0.0}
    assert (root / "vae.csv").read_text().strip() == "epoch,loss"

    done = runner.invoke(encode_latents, ["--data", str(root / "processed"), "--vae", str(out), "--out",
                                          str(root / "latents"), "--device", "cpu"])
    assert done.exit_code == 0, done.output
    for name in ("train", "test"):
        lat, images = load_latents(root / "latents", name), load_split(root / "processed", name).images
        assert torch.equal(lat.mean, images) and not lat.std.any() and lat.scale_factor == 1.0


def test_the_unet_diffuses_the_pixels_themselves(pixel_workspace):
    """unet_training learns its shape from the latents, and each step noises exactly the images (scale 1)."""
    root, params = pixel_workspace
    raw = read_params(params)
    images = load_split(root / "processed", "train")
    save_vae(root / "vae.safetensors", IdentityAutoencoder(IdentityArgs(in_channels=3)))
    mean, std = encode_posteriors(load_vae(root / "vae.safetensors"), images.images)
    lat = Latents(mean, std, images.labels, IdentityAutoencoder.scale_factor)
    encoded = write_encoded_captions(root / "captions", images.captions, raw["text"]["max_length"])
    run = unet_training(parse_section("unet", raw["unet"]), parse_section("text", raw["text"]), epochs=1, seed=0,
                        latents=lat, captions=images.captions, encoded=encoded, device=torch.device("cpu"))
    model = run.model
    assert model.unet_args.in_channels == 3 and model.latent_hw == (16, 16) and model.diffusion.scale_factor == 1.0
    seen = []
    loss = model.denoiser.loss
    model.denoiser.loss = lambda z0, *a, **k: seen.append(z0) or loss(z0, *a, **k)
    value, _ = run.loss_fn(0, torch.Generator().manual_seed(0))
    assert value.isfinite() and len(seen) == 1
    idx = run.loss_fn.batches(0)
    assert torch.equal(seen[0], images.images[idx])


def test_evaluate_report_and_gate_leave_out_the_reconstruction_metrics(tmp_path):
    identity = IdentityAutoencoder(IdentityArgs(in_channels=1))
    assert vae_quality(identity, torch.zeros(2, 1, 8, 8), tmp_path / "unused", "cpu") == {}
    metrics = {"fid": 2.0, "fid_std": 0.1, "n_samples": 10, "n_seed_sets": 1}
    text = render(metrics=metrics, stages={}, params={}, confusion=pd.DataFrame(columns=["actual", "predicted"]),
                  report_dir=tmp_path, images=[], title="t")
    assert "None: the U-Net diffuses pixels" in text and "reconstruction PSNR" not in text
    base, cur = tmp_path / "base.json", tmp_path / "cur.json"
    base.write_text(json.dumps({**metrics, "vae_psnr": 28.0, "vae_rfid": 0.6}))
    cur.write_text(json.dumps(metrics))
    gate = subprocess.run([sys.executable, "-m", "stages.regress", "--baseline", str(base), "--current", str(cur)],
                          capture_output=True, text=True)
    assert gate.returncode == 0 and "not compared (in one file only): vae_psnr, vae_rfid" in gate.stdout


def test_export_refuses_a_pixel_space_model(tmp_path, tiny_models):
    save_vae(tmp_path / "vae.safetensors", IdentityAutoencoder(IdentityArgs(in_channels=1)))
    done = runner.invoke(export, ["--unet", str(tiny_models / "unet"), "--vae", str(tmp_path / "vae.safetensors"),
                                  "--out", str(tmp_path / "out")])
    assert done.exit_code == 2 and "diffuses pixels (vae.kind none)" in done.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("hw, channel_mult", [((32, 32), (1, 2, 2, 2)), ((8, 8), (1, 1, 1, 1, 1)),
                                              ((24, 24), (1, 1, 1, 1, 1))])  # 24 -> 12 -> 6 -> 3 -> 2
def test_the_unet_takes_any_image_size(hw, channel_mult):
    """Why no image size is refused in pixel space: where a downsampling halves an odd side, the upsampling returns to
    the skip's size, so the U-Net runs at any data.image_size whatever unet.channel_mult is."""
    torch.manual_seed(0)
    unet = UNet(UNetArgs(in_channels=1, context_dim=8, model_channels=8, channel_mult=channel_mult,
                         attention_levels=(len(channel_mult) - 1,), num_heads=2))
    x = torch.randn(2, 1, *hw)
    assert unet(x, torch.tensor([1, 500]), torch.randn(2, 3, 8)).shape == x.shape
