"""What the evaluate stage measures, beyond the metric math in `sdlib.metrics`: reading the sample manifest, splitting
the samples into seed sets (so every number comes with its spread over sampling seeds), and the VAE's own quality.

A metric computed on one set of samples is one draw of a random variable; the spread over disjoint seed sets of the
same size says how far two runs may differ by chance alone. The regression gate (`sdlib.regress`) sets its tolerances
from that spread.
"""
from __future__ import annotations

import re
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from sdlib.cli import DataError
from sdlib.data import to_uint8
from sdlib.metrics import fidelity_metrics
from sdlib.vae import AutoencoderKL, psnr


def read_manifest(path: Path, num_classes: int) -> tuple[list[str], list[Path], torch.Tensor]:
    """Prompts, image paths (relative to the working directory) and prompted labels (-1: none) of manifest.csv."""
    if not path.is_file():
        raise DataError(f"{path}: no sample manifest (run the sample stage first)")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable CSV ({' '.join(str(e).split()) or 'empty'})") from None
    missing = [c for c in ("prompt", "label", "path") if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column {', '.join(missing)} (needs prompt,label,seed,path)")
    labels = []
    for line, (label, file) in enumerate(zip(table["label"], table["path"]), start=2):
        label = label.strip() or "-1"  # empty: the prompt names no class
        if not re.fullmatch(r"-?\d+", label) or not -1 <= int(label) < num_classes:
            raise DataError(f"{path} line {line}: label '{label}' is not -1 or a class index 0..{num_classes - 1}")
        if not Path(file).is_file():
            raise DataError(f"{path} line {line}: sample {file} not found")
        labels.append(int(label))
    return list(table["prompt"]), [Path(f) for f in table["path"]], torch.tensor(labels, dtype=torch.int64)


def read_pngs(paths: list[Path], channels: int, size: int) -> torch.Tensor:
    """uint8 (N, channels, size, size) images; a sample of another size is an error, not silently resized."""
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                a = np.asarray(im.convert("L" if channels == 1 else "RGB"))  # (H, W) or (H, W, 3)
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"{p}: not a readable image ({e})") from None
        if a.shape[:2] != (size, size):
            raise DataError(f"{p}: {a.shape[1]}x{a.shape[0]} image, the data is {size}x{size}")
        images.append(torch.from_numpy(a.reshape(size, size, channels).copy()).permute(2, 0, 1))  # (C, S, S)
    return torch.stack(images)


def seed_sets(prompts: list[str], k: int) -> list[torch.Tensor]:
    """Split the samples into `k` disjoint sets with the same prompt mix: set j takes the j-th consecutive chunk of
    each prompt's samples (distinct seeds). Leftovers when a prompt's count is not a multiple of k are left out."""
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_prompt.setdefault(p, []).append(i)
    fewest = min(by_prompt.items(), key=lambda kv: len(kv[1]))
    if len(fewest[1]) < k:
        raise DataError(f"evaluate.seed_sets is {k} but prompt '{fewest[0]}' has {len(fewest[1])} sample(s); "
                        f"sample at least {k} per prompt (sample.n_per_prompt) or lower evaluate.seed_sets")
    sets = []
    for j in range(k):
        idx = []
        for rows in by_prompt.values():
            chunk = len(rows) // k
            idx += rows[j * chunk:(j + 1) * chunk]
        sets.append(torch.tensor(sorted(idx)))
    return sets


def mean_and_spread(per_set: list[dict[str, float]]) -> dict[str, float]:
    """{m: mean over sets, m_std: sample standard deviation over sets (0 for a single set)} for every key."""
    out = {}
    for key in per_set[0]:
        values = [d[key] for d in per_set]
        out[key] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


FLOOR_SEED = 0  # train subsets of the FID floor: FLOOR_SEED + index; fixed, not a param


def fid_floor(train_images: torch.Tensor, real_uint8: torch.Tensor, n: int, classifier: Path,
              device: torch.device | str, index: int = 0) -> float:
    """The real-vs-real FID at `n` samples: `n` training images (subset `index`) against the real test set."""
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(FLOOR_SEED + index))[:n]
    return fidelity_metrics(to_uint8(train_images[pick]), real_uint8, classifier, device, prc=False, kid=False)["fid"]


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The VAE's reconstructions decode(mean of encode(x)) of images (N, C, H, W) in [-1, 1], clamped to [-1, 1]."""
    device = next(vae.parameters()).device
    out = [vae.decode(vae.encode(x.to(device)).mean).clamp(-1, 1).cpu() for x in images.split(batch_size)]
    return torch.cat(out)


def reconstruction_psnr(images: torch.Tensor, recon: torch.Tensor) -> float:
    """Mean PSNR (dB) of reconstructions against their originals, both in [-1, 1]."""
    return float(psnr(images, recon))
