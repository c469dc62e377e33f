"""Encode the dataset with the trained VAE and compute the latent scale factor (SD's 0.18215); with `vae.kind: none`
the latents are the images themselves, at scale factor 1."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdlib import tracking
from sdlib.cli import check_outputs, pick_device, user_errors, wrote
from sdlib.data.latents import write_latents
from sdlib.data.splits import load_split
from sdlib.models.vae import encode_posteriors, load_vae

app = typer.Typer(add_completion=False)


@app.command()
def main(
    data: Annotated[Path, typer.Option(help="preprocessed dataset folder")] = Path("data/processed"),
    vae_path: Annotated[Path, typer.Option("--vae", help="trained VAE weights")] = Path("models/vae.safetensors"),
    out: Annotated[Path, typer.Option(help="latents folder to write")] = Path("data/latents"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
) -> None:
    """Write data/latents/{train,test}.safetensors (posterior mean, std, labels) and meta.json (scale_factor)."""
    with user_errors():
        check_outputs(out)
        vae = load_vae(vae_path, pick_device(device))
        splits = {name: load_split(data, name) for name in ("train", "test")}
        with tracking.stage_run("encode_latents", {}):
            encoded = {name: (*encode_posteriors(vae, split.images), split.labels) for name, split in splits.items()}
            meta = write_latents(out, encoded, vae.scale_factor)
            tracking.log_metrics({"scale_factor": meta["scale_factor"]})
        wrote(out)
        print(f"encode_latents: latents {tuple(meta['latent_shape'])}, scale_factor {meta['scale_factor']:.5f}")


if __name__ == "__main__":
    app()
