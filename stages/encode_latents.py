"""Encode the dataset with the trained VAE and compute the latent scaling factor (SD's 0.18215)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from safetensors.torch import save_file

from sdlib import tracking
from sdlib.cli import pick_device, user_errors, wrote
from sdlib.data import load_split
from sdlib.io import atomic_dir, write_json
from sdlib.vae import AutoencoderKL, load_vae

app = typer.Typer(add_completion=False)


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image: 2 x (N, z, H/f, W/f)."""
    means, stds = [], []
    for x in images.split(batch_size):
        posterior = vae.encode(x)
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


@app.command()
def main(
    data: Annotated[Path, typer.Option(help="preprocessed dataset folder")] = Path("data/processed"),
    vae_path: Annotated[Path, typer.Option("--vae", help="trained VAE weights")] = Path("models/vae.safetensors"),
    out: Annotated[Path, typer.Option(help="latents folder to write")] = Path("data/latents"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
) -> None:
    """Write data/latents/{train,test}.safetensors (posterior mean, std, labels) and meta.json (scale_factor)."""
    with user_errors():
        dev = pick_device(device)
        vae = load_vae(vae_path, dev)
        splits = {name: load_split(data, name) for name in ("train", "test")}
        with tracking.stage_run("encode_latents", {}), atomic_dir(out) as tmp:
            encoded = {}
            for name, split in splits.items():
                mean, std = encode(vae, split.images.to(dev))
                encoded[name] = (mean, std)
                save_file({"mean": mean, "std": std, "labels": split.labels}, str(tmp / f"{name}.safetensors"))
            # Rombach et al. 2022, sec. 4.3.2 / app. G: rescale latents to unit variance before diffusion, with the
            # factor estimated from samples of the training posteriors (SD v1's value is 0.18215).
            mean, std = encoded["train"]
            z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
            scale_factor = float(1.0 / z.std())
            meta = {"scale_factor": scale_factor, "latent_shape": list(mean.shape[1:]),
                    "n_train": len(mean), "n_test": len(encoded["test"][0])}
            write_json(tmp / "meta.json", meta)
            tracking.log_metrics({"scale_factor": scale_factor})
        wrote(out)
        print(f"encode_latents: latents {tuple(mean.shape[1:])}, scale_factor {scale_factor:.5f}")


if __name__ == "__main__":
    app()
