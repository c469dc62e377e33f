"""What the evaluate stage measures, beyond the metric math in `sdlib.evaluation.metrics`: reading the sample
manifest, splitting the samples into seed sets (so every number comes with its spread over sampling seeds), the
real-vs-real floor, the VAE's own quality (pixel space has no VAE to measure), and caption retrieval.

A metric computed on one set of samples is one draw of a random variable; the spread over disjoint seed sets of the
same size says how far two runs may differ by chance alone. The regression gate (`sdlib.evaluation.regress`) sets
its tolerances from that spread.
"""
from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Iterator

import pandas as pd
import torch

from sdlib.data.images import from_uint8, to_uint8
from sdlib.data.shards import Rows
from sdlib.errors import DataError
from sdlib.evaluation.metrics import PRC_NEIGHBOURS, classifier_features, conditional_accuracy, fidelity_from_features
from sdlib.evaluation.retrieval import RetrievalSpace, pixel_features, retrieval_ranks, retrieval_scores
from sdlib.models.classifier import Classifier, embed
from sdlib.io import read_csv
from sdlib.models.vae import Autoencoder, image_psnr, reconstruct, vae_batch


def read_manifest(path: Path, num_classes: int) -> tuple[list[str], list[Path], torch.Tensor]:
    """Prompts, image paths (relative to the working directory) and prompted labels (-1: none) of manifest.csv."""
    table = read_csv(path, ("prompt", "label", "path"), missing="no sample manifest (run the sample stage first)",
                     needs=("prompt", "label", "seed", "path"))
    labels = []
    for line, (label, file) in enumerate(zip(table["label"], table["path"]), start=2):
        label = label.strip() or "-1"  # empty: the prompt names no class
        if not re.fullmatch(r"-?\d+", label) or not -1 <= int(label) < num_classes:
            raise DataError(f"{path} line {line}: label '{label}' is not -1 or a class index 0..{num_classes - 1}")
        if not Path(file).is_file():
            raise DataError(f"{path} line {line}: sample {file} not found")
        labels.append(int(label))
    return list(table["prompt"]), [Path(f) for f in table["path"]], torch.tensor(labels, dtype=torch.int64)


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


def real_features(real: torch.Tensor | Rows, classifier: Path, device: torch.device | str) -> torch.Tensor:
    """The classifier features (N, D) of the real uint8 images, in memory or read from their shards a chunk at a time:
    computed once, compared with every seed set, the FID floor and the reconstructions."""
    return classifier_features(real, classifier, device)


def fid_floor(train_images: torch.Tensor | Rows, real: torch.Tensor, n: int, classifier: Path,
              device: torch.device | str, index: int = 0) -> float:
    """The real-vs-real FID at `n` samples: `n` training images (subset `index`, read alone when the images are
    `Rows`) against the real test set's features `real` (`real_features`)."""
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(FLOOR_SEED + index))[:n]
    picked = classifier_features(to_uint8(train_images[pick]), classifier, device)
    return fidelity_from_features(picked, real, prc=False, kid=False)["fid"]


def score_samples(gen: torch.Tensor, prompts: list[str], labels: torch.Tensor, pred: torch.Tensor, *,
                  real: torch.Tensor, train_images: torch.Tensor | Rows, classes: list[str], classifier: Path,
                  n_sets: int, device: torch.device | str) -> tuple[dict[str, float], pd.DataFrame]:
    """FID, KID, precision/recall and conditional accuracy of the samples, each as mean and `_std` over `n_sets`
    disjoint seed sets, next to the real-vs-real FID floor at the same sample count.

    gen: uint8 samples (N, C, S, S); labels: the prompted class of each (-1: none); pred: the class the classifier
    sees; real: the test images' features (`real_features`). Returns (metrics, the (actual, predicted) rows of the
    labelled samples).
    """
    sets = seed_sets(prompts, n_sets)
    n = len(sets[0])
    if n <= PRC_NEIGHBOURS:
        raise DataError(f"{n} sample(s) per seed set, need at least {PRC_NEIGHBOURS + 1} for precision/recall "
                        f"({PRC_NEIGHBOURS} nearest neighbours); raise sample.n_per_prompt")
    if len(train_images) < n:
        raise DataError(f"{len(train_images)} training images, need {n} for the FID floor at {n} samples")
    labelled = labels >= 0
    per_set, floors = [], []
    for j, idx in enumerate(sets):
        m = fidelity_from_features(classifier_features(gen[idx], classifier, device), real)
        m.pop("kid_std")  # KID's own subset spread; the spread that matters here is over seed sets
        if labelled[idx].any():
            m["cond_acc"] = (pred[idx] == labels[idx])[labelled[idx]].float().mean().item()
        per_set.append(m)
        floors.append({"fid_floor": fid_floor(train_images, real, n, classifier, device, index=j)})
    result = {**mean_and_spread(per_set), **mean_and_spread(floors)}
    rows = pd.DataFrame(columns=["actual", "predicted"])
    if labelled.any():
        acc, per_class, _ = conditional_accuracy(pred[labelled], labels[labelled], len(classes))
        result["cond_acc"] = acc  # over all samples; cond_acc_std is its spread over the seed sets
        result.update({f"cond_acc_per_class.{re.sub(r'[^A-Za-z0-9_. /-]', '_', name)}": a
                       for name, a in zip(classes, per_class) if a == a})  # NaN: class never prompted
        rows = pd.DataFrame({"actual": [classes[i] for i in labels[labelled]],
                             "predicted": [classes[i] for i in pred[labelled]]})
    result.update(n_samples=n, n_seed_sets=len(sets))
    return result, rows


def vae_quality(vae: Autoencoder, images: torch.Tensor | Rows, classifier: Path | None, device: torch.device | str,
                real: torch.Tensor | None = None) -> dict:
    """The autoencoder alone on real images (N, C, S, S) in [-1, 1], in memory or read from their shards a batch at a
    time: reconstruction PSNR and reconstruction FID against the images' features `real` (no classifier, data without
    classes: PSNR only); none for the identity of pixel space (`vae.kind: none`), whose reconstructions are the
    images. The reconstructions are made, measured and embedded a batch at a time, never held together."""
    if vae.kind == "none":
        return {}
    if classifier is not None and real is None:
        raise ValueError("the reconstruction FID needs the real images' features")
    psnr: list[torch.Tensor] = []  # (B,) each image's, filled as the reconstructions are made
    batch = vae_batch(images.shape[1:])

    def reconstructions() -> Iterator[torch.Tensor]:
        for x in (images.chunks if isinstance(images, Rows) else images.split)(batch):
            recon = reconstruct(vae, x, batch)
            psnr.append(image_psnr(x, recon))
            yield to_uint8(recon)

    if classifier is None:  # made and measured, with no feature space to embed them in
        for _ in reconstructions():
            pass
        return {"vae_psnr": float(torch.cat(psnr).mean())}
    recon = classifier_features(reconstructions(), classifier, device, n=len(images))
    rfid = fidelity_from_features(recon, real, prc=False, kid=False)["fid"]
    return {"vae_psnr": float(torch.cat(psnr).mean()), "vae_rfid": rfid}


def score_retrieval(gen: torch.Tensor, real: torch.Tensor, space: RetrievalSpace, classifier: Classifier | None,
                    device: torch.device | str) -> dict[str, float | int | str]:
    """Caption retrieval of uint8 samples (N, C, S, S), sample i drawn from the caption of real image i, in `space`
    (the classifier's penultimate features, or 8x8 pixel averages): top-1/top-5 accuracy, their chance, N, the space."""
    if space == "classifier":
        if classifier is None:
            raise ValueError("the classifier space needs a classifier")
        q, g = embed(classifier, from_uint8(gen), device), embed(classifier, from_uint8(real), device)
    else:
        q, g = pixel_features(from_uint8(gen)), pixel_features(from_uint8(real))
    return {**retrieval_scores(retrieval_ranks(q, g)), "retrieval_n": len(gen), "retrieval_space": space}
