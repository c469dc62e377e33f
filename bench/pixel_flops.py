"""What the latent space buys, in FLOPs: the U-Net of params.yaml on the VAE's latents (`vae.kind: kl`) against the
same U-Net on the pixels (`vae.kind: none`), per image, counted with FlopCounterMode.

Training: one step of what `train_unet` trains (`unet_training`: U-Net and text encoder, forward and backward, as
bench/recipes.py counts it) over a batch of `unet.batch_size` random latents of each shape, divided by the batch size.
Sampling: one image drawn as the sample stage draws it (`sample.sampler`, `sample.steps`, guidance), VAE decode
included. The latent pipeline also trains its VAE (train_vae, `vae.epochs`), a cost pixel space does not have: its
training step is counted too (`VAELoss`, forward and backward, per image); the one-off encoding of the data set is not.

    python bench/pixel_flops.py [--params params.yaml]      # one JSON line per kind, then the ratio
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import torch
import typer
from torch.utils.flop_counter import FlopCounterMode

from recipes import count_flops  # bench/recipes.py: FLOPs of one training step
from sdlib.training.autoencoder import VAELoss
from sdlib.training.loop import Batches
from sdlib import config
from sdlib.data.captions import DIGIT_NAMES, class_captions
from sdlib.data.encoded_captions import write_encoded_captions
from sdlib.data.latents import Latents
from sdlib.generate import Prompts, generate
from sdlib.models.vae import AutoencoderKL, IdentityArgs, IdentityAutoencoder, VAEArgs
from sdlib.training.latent_diffusion import unet_training

app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Annotated[Path, typer.Option(help="params.yaml to take the sizes from")] = Path("params.yaml"),
) -> None:
    """Print the training and sampling FLOPs per image of both kinds, and their ratio."""
    raw = config.read_params(params)
    data, vae_cfg = config.parse_section("data", raw["data"]), config.parse_section("vae", raw["vae"])
    cfg, text_cfg = config.parse_section("unet", raw["unet"]), config.parse_section("text", raw["text"])
    sample = config.parse_section("sample", raw["sample"])
    torch.manual_seed(0)
    autoencoders = {"kl": AutoencoderKL(config.args_from(vae_cfg, VAEArgs, in_channels=data.channels)),
                    "none": IdentityAutoencoder(IdentityArgs(in_channels=data.channels))}
    n = cfg.batch_size
    labels = torch.arange(n) % 10
    captions = [class_captions(int(y), DIGIT_NAMES, True) for y in labels]
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        encoded = write_encoded_captions(Path(scratch) / "captions", captions, text_cfg.max_length)
        for kind, vae in autoencoders.items():
            side = data.image_size // vae.args.factor
            shape = (n, vae.args.latent_channels, side, side)
            latents = Latents(torch.randn(shape), torch.zeros(shape), labels, 1.0)
            run = unet_training(cfg, text_cfg, epochs=1, seed=0, latents=latents, captions=captions, encoded=encoded,
                                device=torch.device("cpu"))
            train = count_flops(run) / n
            run.model.eval()
            with FlopCounterMode(display=False) as counter:
                generate(run.model, vae.eval(), Prompts(Path(scratch) / "captions/tokenizer", run.model), ["3"], [0],
                         sampler=sample.sampler, steps=sample.steps, guidance=sample.guidance, schedule=sample.schedule)
            rows[kind] = {"kind": kind, "latent_shape": list(shape[1:]), "train_gflop_per_image": round(train / 1e9, 4),
                          "sample_gflop_per_image": round(counter.get_total_flops() / 1e9, 4)}
            print(json.dumps(rows[kind]), flush=True)
    ratio = {k: round(rows["none"][k] / rows["kl"][k], 2) for k in ("train_gflop_per_image", "sample_gflop_per_image")}
    print(json.dumps({"ratio_none_over_kl": ratio}))
    vae, bs = autoencoders["kl"], vae_cfg.batch_size
    images = torch.rand(bs, data.channels, data.image_size, data.image_size) * 2 - 1
    loss_fn = VAELoss(vae.train(), images, batches=Batches(bs, bs, 0, torch.device("cpu")), kl_weight=vae_cfg.kl_weight)
    with FlopCounterMode(display=False) as counter:
        loss_fn(0, torch.Generator().manual_seed(0))[0].backward()
    print(json.dumps({"kind": "kl", "vae_train_gflop_per_image": round(counter.get_total_flops() / bs / 1e9, 4)}))


if __name__ == "__main__":
    app()
