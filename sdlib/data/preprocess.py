"""Preprocessing: fit the raw images to one size and channel count, caption them and split them into train and test
(data/raw -> data/processed; the formats are in sdlib.data.sources and sdlib.data.splits), a chunk of images at a
time; in memory they are float32 in [-1, 1] (`from_uint8`), on disk uint8."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from sdlib.data.captions import class_captions, templates
from sdlib.data.images import cover_crop, from_uint8
from sdlib.data.sources import RawData
from sdlib.data.splits import Split, SplitStream, write_processed_stream
from sdlib.errors import DataError

CHUNK = 256  # images fitted at a time
_SPLIT_STREAM = 1  # the random stream of the train/test split (sdlib.data.sources' `data.limit` subset has 0)


def fit_image(im: Image.Image, size: int) -> Image.Image:
    """Make `im` size x size: pad one that nearly fits (MNIST's 28 -> 32) with its background, the median of its
    border; otherwise resize the shorter side to `size` and center-crop."""
    w, h = im.size
    if 4 * min(w, h) >= 3 * size and max(w, h) <= size:
        a = np.asarray(im)  # (H, W) or (H, W, 3)
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])  # (2W + 2H,) or (2W + 2H, 3)
        fill = np.median(border, axis=0).astype(int)
        canvas = Image.new(im.mode, (size, size), int(fill) if fill.ndim == 0 else tuple(fill.tolist()))
        canvas.paste(im, ((size - w) // 2, (size - h) // 2))
        return canvas
    return cover_crop(im, size, size)


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test indices, each in a seeded random order; the same seed gives the same split.

    The test split holds round(N * test_fraction) images (at least one, and at least one left for training),
    shared among the labels (-1 is one group) in proportion to their sizes, by largest remainder.
    """
    rng = np.random.default_rng([seed, _SPLIT_STREAM])
    order = rng.permutation(len(labels))
    groups = [order[labels[order] == label] for label in np.unique(labels)]  # each class, in the seeded order
    n_test = min(max(round(len(labels) * test_fraction), 1), len(labels) - 1)
    quota = np.array([len(g) * test_fraction for g in groups])
    share = np.floor(quota).astype(int)
    by_remainder = np.lexsort((rng.random(len(groups)), share - quota))  # largest remainder first, ties at random
    share[by_remainder[:n_test - share.sum()]] += 1
    is_test = np.zeros(len(labels), dtype=bool)
    for group, k in zip(groups, share):
        is_test[group[:k]] = True
    order = rng.permutation(len(labels))  # fresh: in `order` the classes that filled their test share first lead
    return order[~is_test[order]], order[is_test[order]]


@dataclass
class Plan:
    """What preprocessing makes of a raw data set, but the pixels: the split, every image's captions, meta.json."""

    train: np.ndarray  # raw indices of the train split, in its order
    test: np.ndarray
    labels: torch.Tensor  # (N,) of the raw images
    captions: list[list[str]]  # of the raw images
    meta: dict


def plan(raw: RawData, *, image_size: int, channels: int, test_fraction: float, seed: int) -> Plan:
    """Caption and split `raw` (cheap: no image is read)."""
    if len(raw.images) < 2:
        raise DataError(f"need at least 2 images for a train/test split, found {len(raw.images)}")
    labels = torch.tensor(raw.labels, dtype=torch.int64)
    captions = []
    for i, (own, label) in enumerate(zip(raw.captions, raw.labels)):
        if not own and label < 0:
            raise DataError(f"raw image {i} has neither a caption nor a label")
        captions.append(own or class_captions(label, raw.classes, raw.digits, raw.source))
    train_idx, test_idx = split_indices(labels.numpy(), test_fraction, seed)
    used = [] if all(raw.captions) else list(templates(raw.source, raw.digits))  # any used?
    meta = {"source": raw.source, "classes": list(raw.classes), "digits": raw.digits, "image_size": image_size,
            "channels": channels, "n_train": len(train_idx), "n_test": len(test_idx), "templates": used}
    return Plan(train_idx, test_idx, labels, captions, meta)


def fitted(raw: RawData, idx: np.ndarray, *, image_size: int, channels: int, chunk: int = CHUNK,
           desc: str = "preprocess") -> Iterator[torch.Tensor]:
    """The raw images `idx`, in that order, fitted to image_size with `channels`: uint8 (k, C, S, S) chunks."""
    mode = "L" if channels == 1 else "RGB"
    bar = tqdm(total=len(idx), desc=desc, unit="img", disable=None)
    for start in range(0, len(idx), chunk):
        pixels = np.stack([np.asarray(fit_image(raw.images[i].convert(mode), image_size))
                           for i in idx[start:start + chunk]])  # (k, S, S[, 3])
        pixels = pixels.reshape(len(pixels), image_size, image_size, channels)  # (k, S, S, C)
        bar.update(len(pixels))
        yield torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()  # (k, C, S, S)
    bar.close()


def preprocess(raw: RawData, *, image_size: int, channels: int, test_fraction: float,
               seed: int) -> tuple[Split, Split, dict]:
    """Fit every image to `image_size` with `channels`, scale to [-1, 1], caption it and split it, in memory."""
    p = plan(raw, image_size=image_size, channels=channels, test_fraction=test_fraction, seed=seed)

    def take(idx: np.ndarray) -> Split:
        pixels = torch.cat([torch.empty(0, channels, image_size, image_size, dtype=torch.uint8),
                            *fitted(raw, idx, image_size=image_size, channels=channels)])
        return Split(from_uint8(pixels), p.labels[torch.from_numpy(idx)], [p.captions[i] for i in idx],
                     list(raw.classes), raw.digits)

    return take(p.train), take(p.test), p.meta


def preprocess_to(out: str | Path, raw: RawData, *, image_size: int, channels: int, test_fraction: float, seed: int,
                  shard_size: int) -> dict:
    """`preprocess` written straight into the data/processed folder `out`, a chunk of images at a time, so that a
    data set larger than memory goes through; returns meta.json's content."""
    p = plan(raw, image_size=image_size, channels=channels, test_fraction=test_fraction, seed=seed)
    splits = {name: SplitStream(fitted(raw, idx, image_size=image_size, channels=channels, desc=f"preprocess {name}"),
                                p.labels[torch.from_numpy(idx)], [p.captions[i] for i in idx])
              for name, idx in (("train", p.train), ("test", p.test))}
    return write_processed_stream(out, splits, p.meta, image_shape=(channels, image_size, image_size),
                                  shard_size=shard_size)
