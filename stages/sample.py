"""Generate images from prompts: the pipeline's `sample` stage, and the command users run to draw a digit.

Pipeline:  python -m stages.sample --params params.yaml --out reports/samples
By hand:   python -m stages.sample --prompt 8 --n 16 --sampler dpmpp_2m --steps 20 --guidance 3 --seed 0 --out out/
Img2img:   python -m stages.sample --prompt 8 --init-image sketch.png --strength 0.6 --out out/
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import pandas as pd
import torch
import typer
from tqdm import tqdm

from sdlib import config, tracking
from sdlib.cli import check_outputs, pick_device, user_errors, wrote
from sdlib.data.captions import prompt_label
from sdlib.data.images import make_grid_png, save_png, to_uint8
from sdlib.diffusion.samplers import SAMPLERS, check_sampler
from sdlib.errors import ConfigError
from sdlib.generate import Prompts, generate, image_seed, load_init_image
from sdlib.io import atomic_dir, atomic_path, write_csv
from sdlib.ldm import load_ldm
from sdlib.models.vae import load_vae

app = typer.Typer(add_completion=False)


def settings(params: Path, overrides: dict) -> config.SampleConfig:
    """The `sample` section of params.yaml with command-line overrides; the sampler is checked against the registry."""
    values = config.read_params(params).get("sample")
    if values is None:
        raise ConfigError("params: missing section 'sample'")
    values = {**values, **{k: v for k, v in overrides.items() if v is not None}}
    cfg = config.parse_section("sample", values)
    check_sampler(cfg.sampler, "sample.sampler")
    return cfg


@app.command()
def main(
    prompt: Annotated[Optional[list[str]], typer.Option(help="prompt to draw (repeatable); default: sample.prompts")] = None,
    n: Annotated[Optional[int], typer.Option(help="images per prompt; default: sample.n_per_prompt")] = None,
    sampler: Annotated[Optional[str], typer.Option(help=f"one of {', '.join(SAMPLERS)}")] = None,
    steps: Annotated[Optional[int], typer.Option(help="sampling steps (1..1000)")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="classifier-free guidance scale (1 = none)")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="noise levels: auto, karras or discrete")] = None,
    negative_prompt: Annotated[Optional[str], typer.Option(help="prompt to steer away from")] = None,
    seed: Annotated[Optional[int], typer.Option(help="base seed; image i of prompt k uses seed + k*n + i")] = None,
    init_image: Annotated[Optional[Path], typer.Option(help="PNG to start from (image-to-image, SDEdit)")] = None,
    strength: Annotated[float, typer.Option(help="img2img noise strength in (0, 1]; 1 ignores the image")] = 0.6,
    params: Annotated[Path, typer.Option(help="params.yaml whose `sample` section gives the defaults")] = Path("params.yaml"),
    unet: Annotated[Path, typer.Option(help="trained U-Net folder (train_unet's output)")] = Path("models/unet"),
    vae: Annotated[Path, typer.Option(help="trained VAE weights")] = Path("models/vae.safetensors"),
    out: Annotated[Path, typer.Option(help="folder for the PNGs, manifest.csv and grid.png")] = Path("reports/samples"),
    grid_copy: Annotated[Optional[Path], typer.Option("--grid", help="also write the grid here (a DVC plot)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
) -> None:
    """Draw images for each prompt with the trained model; writes PNGs, manifest.csv and a grid."""
    with user_errors():
        cfg = settings(params, {"prompts": prompt, "n_per_prompt": n, "sampler": sampler, "steps": steps,
                                "guidance": guidance, "schedule": schedule, "negative_prompt": negative_prompt,
                                "seed": seed})
        if not 0.0 < strength <= 1.0:
            raise ConfigError(f"--strength must lie in (0, 1], got {strength}")
        check_outputs(out, grid_copy)
        dev = pick_device(device)
        model, meta = load_ldm(unet / "model.safetensors", dev)
        autoencoder = load_vae(vae, dev)
        size = model.latent_hw[0] * autoencoder.args.factor
        image = load_init_image(init_image, autoencoder.args.in_channels, size) if init_image else None
        prompts = Prompts(unet / "tokenizer", model)
        jobs = [(p, prompt_label(p, meta.get("classes", []), meta.get("digits", False)),
                 image_seed(cfg.seed, k, cfg.n_per_prompt, i), f"{k:02d}_{i:04d}.png")
                for k, p in enumerate(cfg.prompts) for i in range(cfg.n_per_prompt)]

        with tracking.stage_run("sample", config.flatten({"sample": cfg})), \
                atomic_dir(out) as tmp:
            images = []
            for start in tqdm(range(0, len(jobs), cfg.batch_size), desc="sample", unit="batch", file=sys.stderr):
                batch = jobs[start:start + cfg.batch_size]
                x = generate(model, autoencoder, prompts, [j[0] for j in batch], [j[2] for j in batch],
                             sampler=cfg.sampler, steps=cfg.steps, guidance=cfg.guidance, schedule=cfg.schedule,
                             negative_prompt=cfg.negative_prompt, init_image=image, strength=strength)
                for (_, _, _, name), img in zip(batch, to_uint8(x.cpu())):
                    save_png(tmp / name, img)
                    images.append(img)
            cols = min(cfg.n_per_prompt, 10)
            grid = [img for k in range(len(cfg.prompts)) for img in images[k * cfg.n_per_prompt:][:cols]]
            make_grid_png(tmp / "grid.png", torch.stack(grid), nrow=cols)
            manifest = pd.DataFrame([{"prompt": p, "label": -1 if lbl is None else lbl, "seed": s,
                                      "path": os.path.relpath(out / name)} for p, lbl, s, name in jobs])
            write_csv(tmp / "manifest.csv", manifest)
            tracking.log_artifact(tmp / "grid.png")
        if grid_copy is not None:
            with atomic_path(grid_copy) as tmp_grid:
                shutil.copyfile(out / "grid.png", tmp_grid)
            wrote(grid_copy)
        wrote(out / "manifest.csv", out / "grid.png")
        print(f"sample: {len(jobs)} images ({cfg.sampler}, {cfg.steps} steps, guidance {cfg.guidance}) in {out}")


if __name__ == "__main__":
    app()
