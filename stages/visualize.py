"""Figures of forward diffusion, reverse diffusion and cross-attention for the trained model (reports/figures)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer

from sdlib import config, tracking
from sdlib.cli import check_outputs, pick_device, user_errors, wrote
from sdlib.data.splits import load_split
from sdlib.diffusion.samplers import check_sampler
from sdlib.evaluation.visualize import attention_figure, forward_figure, reverse_figure
from sdlib.generate import Prompts
from sdlib.io import atomic_dir
from sdlib.ldm import load_ldm
from sdlib.models.vae import load_vae

app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Annotated[Path, typer.Option(help="params.yaml; uses the `sample` section's sampler and guidance")] = Path("params.yaml"),
    data: Annotated[Path, typer.Option(help="preprocessed dataset (a real test image for the forward process)")] = Path("data/processed"),
    unet: Annotated[Path, typer.Option(help="trained U-Net folder")] = Path("models/unet"),
    vae: Annotated[Path, typer.Option(help="trained VAE weights")] = Path("models/vae.safetensors"),
    out: Annotated[Path, typer.Option(help="folder for forward.png, reverse.png, attention.png")] = Path("reports/figures"),
    prompt: Annotated[str, typer.Option(help="prompt for the reverse-process and attention figures")] = "a handwritten digit eight",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
) -> None:
    """Draw the forward process of a real image, the reverse process of a prompt, and its attention maps."""
    with user_errors():
        cfg = config.load_section("sample", params)
        check_sampler(cfg.sampler, "sample.sampler")
        check_outputs(out)
        dev = pick_device(device)
        model, _ = load_ldm(unet / "model.safetensors", dev)
        autoencoder = load_vae(vae, dev)
        prompts = Prompts(unet / "tokenizer", model)
        image = load_split(data, "test", "stream").images.read(0, 1)[0].to(dev)  # the one image read
        kw = {"seed": cfg.seed, "sampler": cfg.sampler, "steps": cfg.steps, "guidance": cfg.guidance}
        with tracking.stage_run("visualize", {f"sample.{k}": v for k, v in kw.items()}), atomic_dir(out) as tmp:
            forward_figure(tmp / "forward.png", model, autoencoder, image, seed=cfg.seed)
            reverse_figure(tmp / "reverse.png", model, autoencoder, prompts, prompt, **kw)
            attention_figure(tmp / "attention.png", model, autoencoder, prompts, prompt, **kw)
            for name in ("forward.png", "reverse.png", "attention.png"):
                tracking.log_artifact(tmp / name)
        wrote(out / "forward.png", out / "reverse.png", out / "attention.png")


if __name__ == "__main__":
    with torch.no_grad():
        app()
