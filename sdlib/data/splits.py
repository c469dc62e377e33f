"""Preprocessed splits, the train and test images every training and evaluation stage reads.

On disk, data/processed/: `{train,test}.safetensors` with `images` float32 (N, C, S, S) in [-1, 1] and `labels`
int64 (N,) (-1 without a class); `captions.parquet` with columns `split, index, caption`, one row per caption of image
`index` of that split; `meta.json` `{"source", "classes", "digits", "image_size", "channels", "n_train", "n_test",
"templates"}`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sdlib.errors import DataError
from sdlib.io import atomic_dir, write_json

SplitName = Literal["train", "test"]


@dataclass
class Split:
    """One preprocessed split, as `load_split` returns it."""

    images: torch.Tensor  # (N, C, S, S) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64, -1 without a class
    captions: list[list[str]]  # every caption of image i (at least one)
    classes: list[str]
    digits: bool

    def __len__(self) -> int:
        return len(self.labels)


def captions_frame(train: Split, test: Split) -> pd.DataFrame:
    """One row per (split, index, caption), the layout of captions.parquet."""
    rows = [(name, i, caption) for name, split in (("train", train), ("test", test))
            for i, captions in enumerate(split.captions) for caption in captions]
    return pd.DataFrame(rows, columns=["split", "index", "caption"]).astype({"index": "int64"})


def write_processed(out: str | Path, train: Split, test: Split, meta: dict) -> None:
    """Write the data/processed folder `out`, atomically as a whole."""
    with atomic_dir(out) as tmp:
        for name, split in (("train", train), ("test", test)):
            save_file({"images": split.images, "labels": split.labels}, str(tmp / f"{name}.safetensors"))
        captions_frame(train, test).to_parquet(tmp / "captions.parquet", index=False)
        write_json(tmp / "meta.json", meta)


def load_split(processed_dir: str | Path, split: SplitName) -> Split:
    """Load one split of a data/processed folder, checking that its files agree."""
    processed_dir = Path(processed_dir)
    tensors_path, captions_path, meta_path = (processed_dir / f"{split}.safetensors",
                                              processed_dir / "captions.parquet", processed_dir / "meta.json")
    missing = [p.name for p in (tensors_path, captions_path, meta_path) if not p.is_file()]
    if missing:
        raise DataError(f"{processed_dir}: no {', '.join(missing)} (run the preprocess stage first)")
    try:
        tensors = load_file(str(tensors_path))
        table = pd.read_parquet(captions_path, columns=["split", "index", "caption"])
        meta = json.loads(meta_path.read_text())
        classes, digits, expected = [str(c) for c in meta["classes"]], bool(meta["digits"]), int(meta[f"n_{split}"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{processed_dir}: corrupt {split} data ({str(e).splitlines()[0]}); "
                        "re-run the preprocess stage") from None
    images, labels = tensors.get("images"), tensors.get("labels")
    if (images is None or labels is None or images.dtype != torch.float32 or images.ndim != 4
            or labels.dtype != torch.int64 or labels.shape != (len(images),)):
        raise DataError(f"{tensors_path}: expected images float32 (N, C, S, S) and labels int64 (N,)")
    if len(images) != expected:
        raise DataError(f"{tensors_path}: {len(images)} images but meta.json says {expected}; re-run preprocess")
    rows = table[table["split"] == split]
    captions: list[list[str]] = [[] for _ in range(len(images))]
    for i, caption in zip(rows["index"].tolist(), rows["caption"].tolist()):
        if not 0 <= i < len(images):
            raise DataError(f"{captions_path}: {split} index {i} is outside its {len(images)} images")
        captions[i].append(caption)
    uncaptioned = [i for i, c in enumerate(captions) if not c]
    if uncaptioned:
        raise DataError(f"{captions_path}: {split} image {uncaptioned[0]} has no caption")
    return Split(images, labels, captions, classes, digits)
