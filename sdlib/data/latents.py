"""Encoded latents: the VAE posterior of every image, and SD's latent scale factor, as the U-Net trains on them.

On disk, data/latents/: `{train,test}.safetensors` with the posterior `mean` and `std` float32 (N, z, h, w) and
`labels` int64 (N,); `meta.json` `{"scale_factor", "latent_shape", "n_train", "n_test"}`. Keeping the posterior
rather than one sample lets training draw a fresh z ~ q(z|x) every step, as LDM does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sdlib.data.splits import SplitName
from sdlib.errors import DataError
from sdlib.io import atomic_dir, write_json

SCALE_SEED = 0  # the draw of posterior samples the scale factor is estimated from; fixed, not a param


@dataclass
class Latents:
    """One split's posteriors q(z|x) = N(mean, std^2), and the scale factor of the whole latent set."""

    mean: torch.Tensor  # (N, z, h, w)
    std: torch.Tensor  # (N, z, h, w)
    labels: torch.Tensor  # (N,)
    scale_factor: float

    def __len__(self) -> int:
        return len(self.mean)


def estimate_scale_factor(mean: torch.Tensor, std: torch.Tensor) -> float:
    """1 / std of posterior samples (Rombach et al. 2022, sec. 4.3.2 / app. G): rescales latents to unit variance
    before diffusion (SD v1's value is 0.18215)."""
    z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(SCALE_SEED))
    return float(1.0 / z.std())


def write_latents(out: str | Path, splits: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                  scale_factor: float | None = None) -> dict:
    """Write {split: (mean, std, labels)} and meta.json as the folder `out`; the scale factor is the autoencoder's
    own where it has one (pixel space: 1), else estimated from the train split."""
    mean, std, _ = splits["train"]
    scale_factor = estimate_scale_factor(mean, std) if scale_factor is None else scale_factor
    meta = {"scale_factor": scale_factor, "latent_shape": list(mean.shape[1:]),
            **{f"n_{name}": len(m) for name, (m, _, _) in splits.items()}}
    with atomic_dir(out) as tmp:
        for name, (m, s, labels) in splits.items():
            save_file({"mean": m, "std": s, "labels": labels}, str(tmp / f"{name}.safetensors"))
        write_json(tmp / "meta.json", meta)
    return meta


def load_latents(folder: str | Path, split: SplitName = "train") -> Latents:
    """One split of a latents folder written by `write_latents`, checked against its meta.json."""
    folder = Path(folder)
    tensors_path, meta_path = folder / f"{split}.safetensors", folder / "meta.json"
    missing = [p.name for p in (tensors_path, meta_path) if not p.is_file()]
    if missing:
        raise DataError(f"{folder}: no {', '.join(missing)} (run the encode_latents stage first)")
    try:
        meta = json.loads(meta_path.read_text())
        scale_factor, expected = float(meta["scale_factor"]), int(meta[f"n_{split}"])
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{folder}: corrupt latents ({str(e).splitlines()[0]}); re-run encode_latents") from None
    mean, std, labels = (tensors.get(k) for k in ("mean", "std", "labels"))
    if mean is None or std is None or labels is None or mean.ndim != 4 or std.shape != mean.shape:
        raise DataError(f"{tensors_path}: expected mean and std (N, z, h, w) and labels (N,); re-run encode_latents")
    if len(mean) != expected or not scale_factor > 0:
        raise DataError(f"{tensors_path}: {len(mean)} latents, scale factor {scale_factor}; meta.json says "
                        f"{expected}; re-run encode_latents")
    return Latents(mean, std, labels, scale_factor)
