"""Sample grids drawn while the U-Net trains, with its EMA weights, so that a user watches a long run take shape.

Every `unet.samples.every` epochs, and after the last, the same prompts are drawn from the same seeds (`sdlib.samples`'
plan and batch loop), so each grid shows the same images sharpening. A grid is a labelled PNG, a row per prompt with
the epoch in its title, `epoch_XXXX.png` in the output folder, reported (to MLflow) as soon as it is written.

Drawing leaves training alone: the copy it draws with is built under a forked global RNG and its noise comes from
per-image generators, so the trained weights are bit-identical with grids on or off. The frames drawn so far travel
in the training checkpoint (`state_dict`): a resumed run rewrites the grids drawn before the checkpoint, which DVC
deleted with the stage's other outputs, and redraws the later ones from the same weights and seeds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from sdlib.config import TrainSamplesConfig
from sdlib.evaluation.visualize import labelled_grid
from sdlib.generate import Prompts
from sdlib.io import atomic_dir, atomic_path
from sdlib.ldm import LatentDiffusion
from sdlib.models.text import load_pretrained_text_encoder
from sdlib.models.vae import load_vae
from sdlib.samples import draw, drawn_size, plan
from sdlib.training.loop import EMA

LABEL_CHARS = 24  # a longer prompt is cut in its row label


def grid_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}.png"


def row_label(prompt: str) -> str:
    """A prompt as its row's label: cut to LABEL_CHARS characters."""
    return prompt if len(prompt) <= LABEL_CHARS else prompt[:LABEL_CHARS - 2] + ".."


class TrainingGrids:
    """The grids of one training run in `folder` (emptied on creation): call it with each finished epoch.

    `model` is the model being trained and `ema` its EMA; `vae` decodes, `tokenizer` is the captions' tokenizer
    folder. `on_write(path)` runs after each grid is written (e.g. logging it to MLflow).
    """

    def __init__(self, cfg: TrainSamplesConfig, *, model: LatentDiffusion, ema: EMA, vae: Path, tokenizer: Path,
                 epochs: int, folder: Path, on_write: Callable[[Path], None] = lambda path: None):
        self.cfg, self.ema, self.epochs, self.folder, self.on_write = cfg, ema, epochs, folder, on_write
        self.frames: dict[int, torch.Tensor] = {}  # epoch -> its grid's images (prompts * n, C, H, W) uint8
        with atomic_dir(folder):  # the grids of an earlier run go
            pass
        if not cfg.every:
            return
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[]):  # building modules draws initial weights from the global RNG
            self.model = LatentDiffusion(unet=model.unet_args, text=model.text_args, diffusion=model.diffusion,
                                         latent_hw=model.latent_hw).to(device).eval()
            self.vae = load_vae(vae, device)
            if model.frozen_text:  # not trained, so not in the EMA; registered last, after the parameters it shadows
                self.model.text = load_pretrained_text_encoder(model.text_args.pretrained)[0].to(device)
        self.prompts = Prompts(tokenizer, self.model)
        self.jobs, self.hw = plan(cfg, {}), drawn_size(self.model, self.vae, None, None)

    def due(self, epoch: int) -> bool:
        return self.cfg.every > 0 and (epoch % self.cfg.every == 0 or epoch == self.epochs)

    def __call__(self, epoch: int) -> Path | None:
        """At the end of `epoch`: draw and write its grid if one is due; its path, else None."""
        if not self.due(epoch):
            return None
        self.ema.copy_to(self.model)
        self.frames[epoch] = torch.cat([images for _, images in draw(self.model, self.vae, self.prompts, self.cfg,
                                                                     self.jobs, hw=self.hw)])  # (P * n, C, H, W)
        return self._write(epoch)

    def _write(self, epoch: int) -> Path:
        cfg = self.cfg
        image, _ = labelled_grid(self.frames[epoch], [f"image {i + 1}" for i in range(cfg.n_per_prompt)],
                                 f"epoch {epoch} of {self.epochs}, EMA weights: {cfg.sampler}, {cfg.steps} steps, "
                                 f"guidance {cfg.guidance:g}", [row_label(p) for p in cfg.prompts])
        path = self.folder / grid_name(epoch)
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        self.on_write(path)
        return path

    def paths(self) -> list[Path]:
        """The grids written so far, by epoch."""
        return [self.folder / grid_name(epoch) for epoch in sorted(self.frames)]

    def state_dict(self) -> dict:
        return {"frames": dict(self.frames)}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the grids drawn before the checkpoint are written again (and reported) as they were."""
        self.frames = dict(state["frames"])
        for epoch in sorted(self.frames):
            self._write(epoch)
