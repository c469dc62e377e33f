"""Preprocessing: fit the raw images to one size and channel count, scale them to [-1, 1], caption them and split
them into train and test (data/raw -> data/processed; the formats are in sdlib.data.sources and sdlib.data.splits)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from sdlib.data.captions import class_captions, templates
from sdlib.data.images import cover_crop, from_uint8
from sdlib.data.sources import RawData
from sdlib.data.splits import Split
from sdlib.errors import DataError

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


def preprocess(raw: RawData, *, image_size: int, channels: int, test_fraction: float,
               seed: int) -> tuple[Split, Split, dict]:
    """Fit every image to `image_size` with `channels`, scale to [-1, 1], caption it and split it."""
    if len(raw.images) < 2:
        raise DataError(f"need at least 2 images for a train/test split, found {len(raw.images)}")
    mode = "L" if channels == 1 else "RGB"
    pixels = np.stack([np.asarray(fit_image(im.convert(mode), image_size))
                       for im in tqdm(raw.images, desc="preprocess", unit="img", disable=None)])  # (N, S, S[, 3])
    pixels = pixels.reshape(len(pixels), image_size, image_size, channels)  # (N, S, S, C)
    images = from_uint8(torch.from_numpy(pixels).permute(0, 3, 1, 2)).contiguous()  # (N, C, S, S)
    labels = torch.tensor(raw.labels, dtype=torch.int64)
    captions = []
    for i, (own, label) in enumerate(zip(raw.captions, raw.labels)):
        if not own and label < 0:
            raise DataError(f"raw image {i} has neither a caption nor a label")
        captions.append(own or class_captions(label, raw.classes, raw.digits, raw.source))

    def take(idx: np.ndarray) -> Split:
        rows = torch.from_numpy(idx)
        return Split(images[rows], labels[rows], [captions[i] for i in idx], list(raw.classes), raw.digits)

    train_idx, test_idx = split_indices(labels.numpy(), test_fraction, seed)
    used = [] if all(raw.captions) else list(templates(raw.source, raw.digits))  # any used?
    meta = {"source": raw.source, "classes": list(raw.classes), "digits": raw.digits, "image_size": image_size,
            "channels": channels, "n_train": len(train_idx), "n_test": len(test_idx), "templates": used}
    return take(train_idx), take(test_idx), meta
