"""A retrieval set on disk, as the `sample` stage writes it and `evaluate` scores it (`sdlib.evaluation.retrieval`).

One sample for the caption of each of N test images, sample k drawn from seed + k with the `sample` section's sampler
settings: its PNGs (`kkkk.png`), `manifest.csv` (index, caption, seed, path; index is the test image's) and
`grid.png` (up to ten test images over the samples drawn from their captions).
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import torch

from sdlib.config import SampleConfig
from sdlib.data.images import make_grid_png, save_png
from sdlib.evaluation.retrieval import MANIFEST_COLUMNS
from sdlib.generate import Prompts, image_seed
from sdlib.io import write_csv
from sdlib.ldm import LatentDiffusion
from sdlib.models.vae import Autoencoder
from sdlib.samples import GRID_COLUMNS, Job, draw


def write_retrieval(tmp: Path, out: Path, model: LatentDiffusion, vae: Autoencoder, prompts: Prompts,
                    cfg: SampleConfig, indices: list[int], captions: list[str], real: torch.Tensor, *,
                    hw: tuple[int, int]) -> None:
    """Draw one image per caption (image k from seed cfg.seed + k) into the folder `tmp`, which becomes `out`.

    `indices` are the captions' test images and `real` (N, C, H, W) uint8 those images, for the grid. No captions:
    only an empty manifest (retrieval off), so the folder exists for DVC.
    """
    jobs = [Job(c, None, image_seed(cfg.seed, k, 1, 0), f"{k:04d}.png") for k, c in enumerate(captions)]
    drawn = []
    for batch, images in (draw(model, vae, prompts, cfg, jobs, hw=hw) if jobs else ()):
        for job, img in zip(batch, images):
            save_png(tmp / job.name, img)
            drawn.append(img)
    if drawn:
        cols = min(len(drawn), GRID_COLUMNS)
        make_grid_png(tmp / "grid.png", torch.cat([real[:cols], torch.stack(drawn[:cols])]), nrow=cols)
    write_csv(tmp / "manifest.csv", pd.DataFrame(
        [(i, j.prompt, j.seed, os.path.relpath(out / j.name)) for i, j in zip(indices, jobs)],
        columns=list(MANIFEST_COLUMNS)))
