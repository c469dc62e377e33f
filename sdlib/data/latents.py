"""Encoded latents: the VAE posterior of every image, and SD's latent scale factor, as the U-Net trains on them.

On disk, data/latents/: `{train,test}-mean-NNNNN.npy` and `{train,test}-std-NNNNN.npy`, the posterior mean and std
float32 (n, z, h, w) in shards (sdlib.data.shards) of the processed images' `shard_size`, and `{train,test}-labels.npy`
int64 (N,); `meta.json` `{"scale_factor", "latent_shape", "n_train", "n_test", "shard_size", "sha256"}`. Keeping the
posterior rather than one sample lets training draw a fresh z ~ q(z|x) every step, as LDM does.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from sdlib.data.shards import SHARD_SIZE, Loading, Rows, ShardedArray, ShardWriter
from sdlib.data.splits import SplitName
from sdlib.errors import DataError
from sdlib.io import atomic_dir, write_json

SCALE_SEED = 0  # the draw of posterior samples the scale factor is estimated from; fixed, not a param
# the scale factor is estimated from the first train latents up to this many values (16M: the whole of every data set
# up to 50,000 latents of 4x8x8, 1,024 of 4x32x32), so that it costs bounded memory
SCALE_MAX_VALUES = 2**24


@dataclass
class Latents:
    """One split's posteriors q(z|x) = N(mean, std^2), and the scale factor of the whole latent set."""

    mean: torch.Tensor | Rows  # (N, z, h, w): in memory, or read from the shards on demand (load_latents' `stream`)
    std: torch.Tensor | Rows  # (N, z, h, w)
    labels: torch.Tensor  # (N,)
    scale_factor: float

    def __len__(self) -> int:
        return len(self.mean)


def estimate_scale_factor(mean: torch.Tensor, std: torch.Tensor) -> float:
    """1 / std of posterior samples (Rombach et al. 2022, sec. 4.3.2 / app. G): rescales latents to unit variance
    before diffusion (SD v1's value is 0.18215)."""
    z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(SCALE_SEED))
    return float(1.0 / z.std())


class ScaleEstimate:
    """`estimate_scale_factor` over a stream of posterior chunks: keeps the first latents, up to SCALE_MAX_VALUES."""

    def __init__(self):
        self.head: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.keep: int | None = None  # latents still wanted

    def add(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        if self.keep is None:
            self.keep = max(SCALE_MAX_VALUES // math.prod(mean.shape[1:]), 1)
        if self.keep > 0:
            self.head.append((mean[:self.keep], std[:self.keep]))
            self.keep -= len(self.head[-1][0])

    @property
    def full(self) -> bool:
        return self.keep is not None and self.keep <= 0

    def value(self) -> float:
        return estimate_scale_factor(torch.cat([m for m, _ in self.head]), torch.cat([s for _, s in self.head]))


def write_encoded(out: str | Path, splits: dict[str, tuple[Iterable[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]],
                  scale_factor: float | None = None, *, shard_size: int = SHARD_SIZE) -> dict:
    """Write {split: (chunks of (mean, std), labels)} and meta.json as the folder `out`, holding one chunk at a time;
    the scale factor is the autoencoder's own where it has one (pixel space: 1; a VAE file written by train_vae or
    pretrained_convert), else estimated from the first train latents (all of them up to SCALE_MAX_VALUES)."""
    meta: dict = {"scale_factor": scale_factor, "latent_shape": None, "shard_size": shard_size, "sha256": {}}
    with atomic_dir(out) as tmp:
        for name, (chunks, labels) in splits.items():
            writers: tuple[ShardWriter, ShardWriter] | None = None
            scale = ScaleEstimate() if name == "train" and meta["scale_factor"] is None else None
            for mean, std in chunks:
                if writers is None:
                    meta["latent_shape"] = list(mean.shape[1:])
                    writers = tuple(ShardWriter(tmp, f"{name}-{part}", len(labels), tuple(mean.shape[1:]),
                                                np.float32, shard_size) for part in ("mean", "std"))
                for writer, part in zip(writers, (mean, std)):
                    writer.write(part.numpy())
                if scale is not None:
                    scale.add(mean, std)
            if writers is None:
                raise DataError(f"no {name} latents to write")
            meta["sha256"][name] = {part: w.close() for part, w in zip(("mean", "std"), writers)}
            meta[f"n_{name}"] = len(labels)
            np.save(tmp / f"{name}-labels.npy", labels.numpy())
            if scale is not None:
                meta["scale_factor"] = scale.value()
        write_json(tmp / "meta.json", meta)
    return meta


def write_latents(out: str | Path, splits: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                  scale_factor: float | None = None, *, shard_size: int = SHARD_SIZE) -> dict:
    """`write_encoded` of in-memory {split: (mean, std, labels)}."""
    return write_encoded(out, {name: ([(m, s)], labels) for name, (m, s, labels) in splits.items()}, scale_factor,
                         shard_size=shard_size)


def load_latents(folder: str | Path, split: SplitName = "train", loading: Loading = "memory") -> Latents:
    """One split of a latents folder written by `write_encoded`, checked against its meta.json: mean and std as
    tensors (`memory`) or as `Rows` read from the shards on demand (`stream`)."""
    folder = Path(folder)
    labels_path, meta_path = folder / f"{split}-labels.npy", folder / "meta.json"
    if (folder / f"{split}.safetensors").is_file() and not labels_path.is_file():
        raise DataError(f"{folder}: latents in the older single-file format ({split}.safetensors); "
                        "re-run encode_latents")
    missing = [p.name for p in (labels_path, meta_path) if not p.is_file()]
    if missing:
        raise DataError(f"{folder}: no {', '.join(missing)} (run the encode_latents stage first)")
    try:
        meta = json.loads(meta_path.read_text())
        scale_factor, expected = float(meta["scale_factor"]), int(meta[f"n_{split}"])
        labels = torch.from_numpy(np.load(labels_path, allow_pickle=False))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{folder}: corrupt latents ({str(e).splitlines()[0]}); re-run encode_latents") from None
    mean, std = (ShardedArray(folder, f"{split}-{part}") for part in ("mean", "std"))
    if mean.shape != std.shape or len(mean.row_shape) != 3 or labels.shape != (len(mean),):
        raise DataError(f"{folder}: expected {split} mean and std (N, z, h, w) and labels (N,); re-run encode_latents")
    if len(mean) != expected or not scale_factor > 0:
        raise DataError(f"{folder}: {len(mean)} {split} latents, scale factor {scale_factor}; meta.json says "
                        f"{expected}; re-run encode_latents")
    mean, std = Rows(mean), Rows(std)
    if loading == "memory":
        mean, std = mean.load(), std.load()
    return Latents(mean, std, labels, scale_factor)
