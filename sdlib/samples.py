"""A sample set on disk, as the `sample` and `pretrained_sample` stages write it and `evaluate` reads it.

One PNG per image (image i of prompt k is `kk_iiii.png`, drawn from seed + k*n + i), `manifest.csv`
(prompt, label, seed, path), `grid.png` (up to ten images of each prompt, a row each) and, for Stable Diffusion
checkpoints, `schedule.json`: the noise levels of the run and the U-Net timestep at each.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd
import torch
from tqdm import tqdm

from sdlib.config import SampleConfig
from sdlib.data.captions import prompt_label
from sdlib.data.images import make_grid_png, save_png, to_uint8
from sdlib.errors import ConfigError
from sdlib.generate import Prompts, generate, image_seed, resolve_schedule, run_sigmas
from sdlib.io import write_csv
from sdlib.ldm import LatentDiffusion, load_ldm
from sdlib.models.vae import Autoencoder, load_vae

GRID_COLUMNS = 10  # images of each prompt shown in grid.png


def load_model(folder: Path, vae: Path,
               device: torch.device | str) -> tuple[LatentDiffusion, Autoencoder, Prompts, dict]:
    """(model, VAE, prompts, checkpoint meta) from a model folder (model.safetensors + tokenizer/) and VAE weights:
    what train_unet and train_vae write, and what pretrained_convert writes for an SD checkpoint."""
    model, meta = load_ldm(folder / "model.safetensors", device)
    return model, load_vae(vae, device), Prompts(folder / "tokenizer", model), meta


def drawn_size(model: LatentDiffusion, vae: Autoencoder, height: int | None, width: int | None,
               name: str = "--height/--width") -> tuple[int, int]:
    """The image size drawn, (H, W): as asked, else the model's; a multiple of the VAE's factor (the option `name`)."""
    factor = vae.args.factor
    hw = (height or model.latent_hw[0] * factor, width or model.latent_hw[1] * factor)
    if hw[0] % factor or hw[1] % factor:
        raise ConfigError(f"{name} must be multiples of the VAE's factor {factor}, got {hw[0]}x{hw[1]}")
    return hw


def check_clip_skip(model: LatentDiffusion, clip_skip: int, name: str = "--clip-skip") -> None:
    layers = model.text_layers
    if not 1 <= clip_skip <= layers:
        raise ConfigError(f"{name} must lie in 1..{layers} (the text encoder's layers), got {clip_skip}")


@dataclass(frozen=True)
class Job:
    """One image: its prompt, the class the prompt names (None: none), its seed and its file name."""
    prompt: str
    label: int | None
    seed: int
    name: str


def plan(cfg: SampleConfig, meta: dict) -> list[Job]:
    """Every image of the run, prompt by prompt; labels from the classes the model's checkpoint names (if any)."""
    return [Job(p, prompt_label(p, meta.get("classes", []), meta.get("digits", False)),
                image_seed(cfg.seed, k, cfg.n_per_prompt, i), f"{k:02d}_{i:04d}.png")
            for k, p in enumerate(cfg.prompts) for i in range(cfg.n_per_prompt)]


def schedule_record(model: LatentDiffusion, cfg: SampleConfig, strength: float | None) -> dict:
    """The noise levels of the run and the U-Net's timestep at each nonzero one (what schedule.json holds)."""
    sigmas = run_sigmas(model, cfg.sampler, cfg.steps, cfg.schedule, strength)
    return {"sampler": cfg.sampler, "steps": cfg.steps, "strength": strength,
            "schedule": resolve_schedule(cfg.sampler, cfg.schedule),
            "sigmas": sigmas.tolist(),  # float32 values, ending in 0
            # at each nonzero sigma (second-order samplers also evaluate the U-Net in between)
            "timesteps": model.denoiser.sigma_to_t(sigmas[sigmas > 0]).tolist()}


def draw(model: LatentDiffusion, vae: Autoencoder, prompts: Prompts, cfg: SampleConfig, jobs: list[Job], *,
         hw: tuple[int, int], clip_skip: int = 1, init_image: torch.Tensor | None = None,
         strength: float = 1.0) -> Iterator[tuple[list[Job], torch.Tensor]]:
    """Draw `jobs`, cfg.batch_size at a time, at size `hw`: (the batch's jobs, their uint8 images (B, C, H, W)) per
    batch. `init_image` (C, H, W) in [-1, 1] makes it image-to-image at `strength`."""
    factor = vae.args.factor
    for start in tqdm(range(0, len(jobs), cfg.batch_size), desc="sample", unit="batch", file=sys.stderr):
        batch = jobs[start:start + cfg.batch_size]
        x = generate(model, vae, prompts, [j.prompt for j in batch], [j.seed for j in batch],
                     sampler=cfg.sampler, steps=cfg.steps, guidance=cfg.guidance, schedule=cfg.schedule,
                     negative_prompt=cfg.negative_prompt, init_image=init_image, strength=strength,
                     latent_hw=(hw[0] // factor, hw[1] // factor), clip_skip=clip_skip)
        yield batch, to_uint8(x.cpu())


def write_samples(tmp: Path, out: Path, model: LatentDiffusion, vae: Autoencoder, prompts: Prompts,
                  cfg: SampleConfig, jobs: list[Job], *, hw: tuple[int, int], clip_skip: int = 1,
                  init_image: torch.Tensor | None = None, strength: float = 1.0, schedule: bool = False) -> None:
    """Draw `jobs` (cfg.batch_size at a time) at size `hw` into the folder `tmp`, which becomes `out`.

    manifest.csv names each PNG by its path under `out`, relative to the working directory; `schedule` also writes
    schedule.json. `init_image` (C, H, W) in [-1, 1] makes it image-to-image at `strength`.
    """
    images = []
    for batch, drawn in draw(model, vae, prompts, cfg, jobs, hw=hw, clip_skip=clip_skip, init_image=init_image,
                             strength=strength):
        for job, img in zip(batch, drawn):
            save_png(tmp / job.name, img)
            images.append(img)
    cols = min(cfg.n_per_prompt, GRID_COLUMNS)
    grid = [img for k in range(len(cfg.prompts)) for img in images[k * cfg.n_per_prompt:][:cols]]
    make_grid_png(tmp / "grid.png", torch.stack(grid), nrow=cols)
    write_csv(tmp / "manifest.csv", pd.DataFrame([
        {"prompt": j.prompt, "label": -1 if j.label is None else j.label, "seed": j.seed,
         "path": os.path.relpath(out / j.name)} for j in jobs]))
    if schedule:
        record = schedule_record(model, cfg, None if init_image is None else strength)
        (tmp / "schedule.json").write_text(json.dumps(record, indent=2) + "\n")
