"""Caption-to-image retrieval: does the sample drawn for the caption of a held-out image find that image among all N?

Captioned data without class labels has no conditional accuracy to measure. Retrieval asks the same question one
image at a time: for each of N test images, one sample is drawn from its caption; the sample is compared with all N
test images in a feature space, and counts as found at k when its own image is among its k most similar. A model that
ignores its captions scores chance, k/N. Each caption must name one image, so the N images have distinct captions.

Similarity is the cosine of features centred on the real images' mean feature (centring removes what every image
shares, such as the digits' black background). Ties (up to float roundings) count against the sample: a sample as close
to several images as to its own finds it at none of their ranks. A model that draws one image whatever the caption
scores chance exactly: that image is the first find of one caption, the second of another, and so on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from sdlib.errors import DataError
from sdlib.io import read_csv

RetrievalSpace = Literal["classifier", "pixels"]
RETRIEVAL_KS = (1, 5)  # top-k accuracies reported
# similarities closer than this tie: equal features give cosines that differ by float64 roundings (~1e-16), while
# features that differ at all (float32, ~1e-7 relative) give cosines further apart than this
TIE_TOL = 1e-9
PIXEL_SIDE = 8  # the `pixels` space: images area-averaged to 8x8 (per channel), a fixed space that needs no training
MANIFEST_COLUMNS = ("index", "caption", "seed", "path")  # the retrieval folder's manifest.csv: test image, its sample


def pick_captions(captions: Sequence[Sequence[str]], n: int) -> list[int]:
    """The first `n` images (in split order) whose first caption no earlier pick has: the retrieval set.

    `captions[i]` holds every caption of image i; its first names it (an emoji's name, COCO's first caption).
    """
    picked, seen = [], set()
    for i, caps in enumerate(captions):
        if len(picked) == n:
            break
        if caps[0] not in seen:
            seen.add(caps[0])
            picked.append(i)
    if len(picked) < n:
        raise DataError(f"evaluate.retrieval is {n} but the test split has {len(picked)} image(s) with distinct "
                        f"captions; lower evaluate.retrieval (class data names at most one image per class)")
    return picked


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """images (N, C, S, S) in [-1, 1] -> (N, C * 8 * 8): the mean of each 8x8 cell's block of pixels."""
    return F.adaptive_avg_pool2d(images.float(), PIXEL_SIDE).flatten(1)  # (N, C * 64)


def retrieval_ranks(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """(N,) the rank of gallery item i among all N for query i (0: the most similar), ties counted against it.

    queries, gallery: (N, D) features; query i's own item is gallery i.
    """
    if queries.ndim != 2 or queries.shape != gallery.shape or len(queries) == 0:
        raise ValueError(f"need queries and gallery of the same shape (N, D), got {tuple(queries.shape)} and "
                         f"{tuple(gallery.shape)}")
    centre = gallery.double().mean(0)
    q = F.normalize(queries.double() - centre, dim=1)
    g = F.normalize(gallery.double() - centre, dim=1)
    sim = q @ g.T  # (N, N): sim[i, j] is query i against gallery j
    own = sim.diagonal()
    return (sim >= own[:, None] - TIE_TOL).sum(1) - 1  # the others at least as similar as its own item


def retrieval_scores(ranks: torch.Tensor, ks: Sequence[int] = RETRIEVAL_KS) -> dict[str, float]:
    """{retrieval_top{k}: the share of queries whose own item ranks in the top k, retrieval_chance_top{k}: k/N}."""
    n = len(ranks)
    out: dict[str, float] = {}
    for k in ks:
        out[f"retrieval_top{k}"] = (ranks < k).double().mean().item()
        out[f"retrieval_chance_top{k}"] = min(k, n) / n
    return out


def read_retrieval_manifest(path: Path, captions: Sequence[Sequence[str]], n: int) -> tuple[list[int], list[Path]]:
    """(test image indices, sample paths) of a retrieval folder's manifest.csv, checked against the test split's
    `captions` and the `n` images evaluate.retrieval asks for."""
    table = read_csv(path, MANIFEST_COLUMNS,
                     missing="no retrieval manifest (run the sample stage with --retrieval first)")
    if len(table) != n:
        raise DataError(f"{path}: {len(table)} sample(s) but evaluate.retrieval is {n} (re-run the sample stage)")
    indices = []
    for line, (index, caption, file) in enumerate(zip(table["index"], table["caption"], table["path"]), start=2):
        if not index.isdigit() or int(index) >= len(captions) or captions[int(index)][0] != caption:
            raise DataError(f"{path} line {line}: test image {index} has not the caption '{caption}' "
                            "(drawn from other data: re-run the sample stage)")
        if not Path(file).is_file():
            raise DataError(f"{path} line {line}: sample {file} not found")
        indices.append(int(index))
    if len(set(indices)) != len(indices):
        raise DataError(f"{path}: a test image appears twice; each caption must name one image")
    return indices, [Path(f) for f in table["path"]]
