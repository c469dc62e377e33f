"""Convert the user's SD v1.x checkpoint (`pretrained.checkpoint`: a diffusers folder or a CompVis single file) once,
into the model folder that `sample` loads for a trained model: model.safetensors (U-Net + text encoder, with their
arguments), tokenizer/ and vae.safetensors.

The key maps and their strict report of missing, unexpected and mis-shaped keys run here, once; the stages after it
load plain safetensors by sdlib's own names, as they load a model trained here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer

from sdlib import config, tracking
from sdlib.cli import check_outputs, user_errors, wrote
from sdlib.errors import ConfigError
from sdlib.io import atomic_dir
from sdlib.ldm import save_ldm
from sdlib.models.vae import save_vae
from sdlib.pretrained.load import copy_tokenizer, load_pretrained
from sdlib.pretrained.options import check_choice
from sdlib.pretrained.sd_v1 import ARCHITECTURES

app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Annotated[Path, typer.Option(help="params.yaml (its `pretrained` section)")] = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="model folder to write")] = Path("models/pretrained"),
) -> None:
    """Read the checkpoint into sdlib's models, checking every key, and save them in sdlib's format."""
    with user_errors():
        cfg = config.load_section("pretrained", params)
        checkpoint = Path(cfg.checkpoint)
        if not checkpoint.exists():
            raise ConfigError(f"params: pretrained.checkpoint: {checkpoint} not found (set it to your SD v1.x "
                              "checkpoint: a diffusers folder or a CompVis .safetensors/.ckpt file)")
        check_choice("params: pretrained.architecture", cfg.architecture, tuple(ARCHITECTURES))
        check_outputs(out)
        sd = load_pretrained(checkpoint, config=ARCHITECTURES[cfg.architecture], ema=cfg.weights,
                             prediction=None if cfg.prediction == "auto" else cfg.prediction, dtype=torch.float32)
        source = {"checkpoint": str(checkpoint), "layout": sd.layout, "unet_weights": sd.unet_weights}
        run_params = {"pretrained.architecture": cfg.architecture, "pretrained.weights": cfg.weights,
                      "pretrained.prediction": cfg.prediction, **config.flatten({"pretrained": source})}
        with tracking.stage_run("pretrained_convert", run_params), atomic_dir(out) as tmp:
            save_ldm(tmp / "model.safetensors", sd.model, {"pretrained": source})
            save_vae(tmp / "vae.safetensors", sd.vae)
            copy_tokenizer(checkpoint, tmp / "tokenizer")
        wrote(out)
        print(f"pretrained_convert: {checkpoint} ({sd.layout}, U-Net weights {sd.unet_weights}, "
              f"{sd.model.diffusion.prediction}-prediction) -> {out}")


if __name__ == "__main__":
    app()
