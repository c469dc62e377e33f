"""Encode the dataset with the trained VAE, at the VAE's latent scale factor (SD's 0.18215; estimated here for VAE files
that carry none); with `vae.kind: none` the latents are the images themselves, at scale factor 1. It reads and writes
one batch of images at a time."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdlib import tracking
from sdlib.cli import check_outputs, pick_device, user_errors, wrote
from sdlib.data.latents import write_encoded
from sdlib.data.splits import load_split, read_shard_size
from sdlib.models.vae import encode_posteriors, load_vae, vae_batch


app = typer.Typer(add_completion=False)


@app.command()
def main(
    data: Annotated[Path, typer.Option(help="preprocessed dataset folder")] = Path("data/processed"),
    vae_path: Annotated[Path, typer.Option("--vae", help="trained VAE weights")] = Path("models/vae.safetensors"),
    out: Annotated[Path, typer.Option(help="latents folder to write")] = Path("data/latents"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
) -> None:
    """Write data/latents/{train,test}-{mean,std}-NNNNN.npy (posterior mean and std), {train,test}-labels.npy and
    meta.json (scale_factor), in shards of the processed data's size."""
    with user_errors():
        check_outputs(out)
        vae = load_vae(vae_path, pick_device(device))
        splits = {name: load_split(data, name, "stream") for name in ("train", "test")}
        with tracking.stage_run("encode_latents", {}):
            # the batches of `encode_posteriors` are the chunks read, so the latents do not depend on shards
            batch = vae_batch(splits["train"].images.shape[1:])
            encoded = {name: ((encode_posteriors(vae, x, batch) for x in split.images.chunks(batch)), split.labels)
                       for name, split in splits.items()}
            meta = write_encoded(out, encoded, vae.scale_factor, shard_size=read_shard_size(data))
            tracking.log_metrics({"scale_factor": meta["scale_factor"]})
        wrote(out)
        print(f"encode_latents: latents {tuple(meta['latent_shape'])}, scale_factor {meta['scale_factor']:.5f}")


if __name__ == "__main__":
    app()
