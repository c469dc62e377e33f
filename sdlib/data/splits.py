"""Preprocessed splits, the train and test images every training and evaluation stage reads.

On disk, data/processed/: `{train,test}-images-NNNNN.npy`, the images as uint8 (n, C, S, S) in shards of
`data.shard_size` (sdlib.data.shards), read as float32 in [-1, 1] by `from_uint8`; `{train,test}-labels.npy` int64
(N,) (-1 without a class); `captions.parquet` with columns `split, index, caption`, one row per caption of image
`index` of that split; `meta.json` `{"source", "classes", "digits", "image_size", "channels", "n_train", "n_test",
"templates", "shard_size", "sha256"}` (`sha256`: of each split's image bytes, so one file names the content).
`load_split` gives a split's images as one tensor in memory, or as rows read from the shards on demand (`stream`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import pandas as pd
import torch

from sdlib.data.images import from_uint8, to_uint8
from sdlib.data.shards import SHARD_SIZE, Loading, Rows, ShardedArray, ShardWriter
from sdlib.errors import DataError
from sdlib.io import atomic_dir, write_json

SplitName = Literal["train", "test"]


@dataclass
class Split:
    """One preprocessed split, as `load_split` returns it."""

    # (N, C, S, S) float32 in [-1, 1]: a tensor in memory, or `Rows` read from disk on demand (`load_split`'s `stream`)
    images: torch.Tensor | Rows
    labels: torch.Tensor  # (N,) int64, -1 without a class
    captions: list[list[str]]  # every caption of image i (at least one)
    classes: list[str]
    digits: bool

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class SplitStream:
    """One split to write, its images coming a chunk at a time: what `write_processed_stream` takes."""

    images: Iterable[torch.Tensor]  # uint8 chunks (k, C, S, S), N images in all
    labels: torch.Tensor  # (N,) int64
    captions: list[list[str]]


def captions_frame(captions: dict[str, list[list[str]]]) -> pd.DataFrame:
    """One row per (split, index, caption), the layout of captions.parquet."""
    rows = [(name, i, caption) for name, split in captions.items()
            for i, caps in enumerate(split) for caption in caps]
    return pd.DataFrame(rows, columns=["split", "index", "caption"]).astype({"index": "int64"})


def write_processed_stream(out: str | Path, splits: dict[str, SplitStream], meta: dict, *,
                           image_shape: tuple[int, int, int], shard_size: int) -> dict:
    """Write the data/processed folder `out`, atomically as a whole, holding one chunk of images at a time; returns
    meta.json's content (`meta` with `shard_size` and the images' `sha256`)."""
    meta = {**meta, "shard_size": shard_size, "sha256": {}}
    with atomic_dir(out) as tmp:
        for name, split in splits.items():
            writer = ShardWriter(tmp, f"{name}-images", len(split.labels), image_shape, np.uint8, shard_size)
            for chunk in split.images:
                writer.write(chunk.numpy())
            meta["sha256"][name] = writer.close()
            np.save(tmp / f"{name}-labels.npy", split.labels.numpy())
        captions_frame({name: split.captions for name, split in splits.items()}).to_parquet(
            tmp / "captions.parquet", index=False)
        write_json(tmp / "meta.json", meta)
    return meta


def write_processed(out: str | Path, train: Split, test: Split, meta: dict, *, shard_size: int = SHARD_SIZE) -> dict:
    """Write in-memory splits as the data/processed folder `out`; their images must be uint8 values through
    `from_uint8` (as preprocessing makes them), which the uint8 shards keep exactly."""
    streams = {}
    for name, split in (("train", train), ("test", test)):
        pixels = to_uint8(split.images)
        if not torch.equal(from_uint8(pixels), split.images):
            raise ValueError(f"{name} images are not uint8 values mapped by from_uint8; the shards would change them")
        streams[name] = SplitStream([pixels], split.labels, split.captions)
    return write_processed_stream(out, streams, meta, image_shape=tuple(train.images.shape[1:]), shard_size=shard_size)


def read_shard_size(processed_dir: str | Path) -> int:
    """The shard size of a data/processed folder, which the latents encoded from it keep."""
    try:
        return int(json.loads((Path(processed_dir) / "meta.json").read_text())["shard_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{processed_dir}: no shard_size in meta.json ({e}); re-run the preprocess stage") from None


def load_split(processed_dir: str | Path, split: SplitName, loading: Loading = "memory") -> Split:
    """Load one split of a data/processed folder, checking that its files agree: its images as one float32 tensor
    (`memory`), or as `Rows` that read them from the shards on demand (`stream`)."""
    processed_dir = Path(processed_dir)
    labels_path, captions_path, meta_path = (processed_dir / f"{split}-labels.npy",
                                             processed_dir / "captions.parquet", processed_dir / "meta.json")
    if (processed_dir / f"{split}.safetensors").is_file() and not labels_path.is_file():
        raise DataError(f"{processed_dir}: processed data in the older single-file format ({split}.safetensors); "
                        "re-run the preprocess stage")
    missing = [p.name for p in (labels_path, captions_path, meta_path) if not p.is_file()]
    if missing:
        raise DataError(f"{processed_dir}: no {', '.join(missing)} (run the preprocess stage first)")
    try:
        labels = torch.from_numpy(np.load(labels_path, allow_pickle=False))
        table = pd.read_parquet(captions_path, columns=["split", "index", "caption"])
        meta = json.loads(meta_path.read_text())
        classes, digits, expected = [str(c) for c in meta["classes"]], bool(meta["digits"]), int(meta[f"n_{split}"])
        shape = (int(meta["channels"]), int(meta["image_size"]), int(meta["image_size"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{processed_dir}: corrupt {split} data ({str(e).splitlines()[0]}); "
                        "re-run the preprocess stage") from None
    pixels = ShardedArray(processed_dir, f"{split}-images")
    if pixels.dtype != np.uint8 or pixels.row_shape != shape:
        raise DataError(f"{processed_dir}: {split} images are {pixels.row_shape} {pixels.dtype}, meta.json says "
                        f"{shape} uint8; re-run the preprocess stage")
    if labels.dtype != torch.int64 or labels.shape != (len(pixels),):
        raise DataError(f"{labels_path}: expected int64 labels (N,) for its {len(pixels)} images; re-run preprocess")
    if len(pixels) != expected:
        raise DataError(f"{processed_dir}: {len(pixels)} {split} images but meta.json says {expected}; "
                        "re-run preprocess")
    rows = table[table["split"] == split]
    captions: list[list[str]] = [[] for _ in range(len(pixels))]
    for i, caption in zip(rows["index"].tolist(), rows["caption"].tolist()):
        if not 0 <= i < len(pixels):
            raise DataError(f"{captions_path}: {split} index {i} is outside its {len(pixels)} images")
        captions[i].append(caption)
    uncaptioned = [i for i, c in enumerate(captions) if not c]
    if uncaptioned:
        raise DataError(f"{captions_path}: {split} image {uncaptioned[0]} has no caption")
    images = Rows(pixels, from_uint8)
    return Split(images.load() if loading == "memory" else images, labels, captions, classes, digits)
