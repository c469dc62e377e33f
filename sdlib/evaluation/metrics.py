"""Sample-quality metrics: FID, KID, precision/recall through torch-fidelity, and conditional accuracy.

FID (Heusel et al. 2017), KID (Binkowski et al. 2018) and precision/recall (Kynkaanniemi et al. 2019) are computed
by `torch_fidelity.calculate_metrics`; this module only supplies the feature space. By default that is the
penultimate layer of the project's own classifier (`sdlib.models.classifier`), registered with torch-fidelity as the
feature extractor `sdlib-classifier`, so evaluation works offline. Standard Inception FID and KID
(`inception_metrics`) need a local copy of the Inception weights.

The classifier checkpoint reaches the extractor through torch-fidelity's own `feature_extractor_weights_path`
keyword: torch-fidelity passes every keyword on to the extractor's constructor, so the path travels with the call
that uses it. A module-level registry keyed by name would be hidden global state, and two checkpoints could not be
compared in one process.

The features are extracted here, batch by batch as torch-fidelity's `calculate_metrics` extracts them (the same
extractor, the same batches of a data set taken in order, so the same features to the bit), and handed to its metric
functions. So a real set larger than memory is read a chunk at a time (only its features, N x 128, are held), and
the real set's features are computed once for all the seed sets compared with it.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from sdlib.data.images import from_uint8
from sdlib.data.shards import Rows
from sdlib.errors import CheckpointError
from sdlib.models.classifier import load_classifier

FEATURE_EXTRACTOR = "sdlib-classifier"
PENULTIMATE = "penultimate"
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, PIL's RGB -> L
PRC_NEIGHBOURS = 3  # k of precision/recall's k-NN balls (torch-fidelity's default, Kynkaanniemi et al. 2019)
FEATURE_BATCH = 250  # images per feature-extraction batch
CHUNK = 1000  # images read from shards at a time
# (N, C, H, W) uint8: in memory, as `Rows` of shards (read CHUNK at a time), or any consecutive chunks of them
UInt8Images = torch.Tensor | Rows | Iterable[torch.Tensor]


class ClassifierFeatures(FeatureExtractorBase):
    """torch-fidelity feature extractor: uint8 (B, 3, H, W) -> the classifier's penultimate features (B, 128)."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"feature extractor '{name}' needs feature_extractor_weights_path=<classifier checkpoint>")
        self.model, _ = load_classifier(feature_extractor_weights_path)
        self.register_buffer("luma", torch.tensor(LUMA).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return PENULTIMATE, "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "logits" if metric == "isc" else PENULTIMATE

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = self.model.args
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (args.image_size,) * 2:
            raise ValueError(f"expected uint8 (B, 3, {args.image_size}, {args.image_size}) images, "
                             f"got {x.dtype} {tuple(x.shape)}")
        x = x.float()
        if args.in_channels == 1:
            x = (x * self.luma).sum(1, keepdim=True)  # (B, 1, H, W), still in 0..255
        x = from_uint8(x)  # the classifier's [-1, 1] scale
        feats = self.model.features(x)  # (B, feature_dim)
        out = {PENULTIMATE: feats, "logits": self.model.head(feats)}
        return tuple(out[name] for name in self.features_list)


def _check_images(gen: torch.Tensor, real: torch.Tensor) -> None:
    for name, x in (("generated", gen), ("real", real)):
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"{name} images must be uint8 (N, 1|3, H, W), got {x.dtype} {tuple(x.shape)}")
        if len(x) < 2:
            raise ValueError(f"need at least 2 {name} images, got {len(x)}")
    if gen.shape[1:] != real.shape[1:]:
        raise ValueError(f"generated images {tuple(gen.shape[1:])} and real images {tuple(real.shape[1:])} differ")


def kid_subset_size(n: int) -> int:
    """KID's usual 1000, but at most half the smaller set, so that its 100 subsets differ and kid_std means something
    (subsets of all n images would all be the same set)."""
    return min(1000, max(2, n // 2))


def _on(device: torch.device | str) -> contextlib.AbstractContextManager:
    """torch-fidelity moves its extractor with a bare `.cuda()`: make `device` the current CUDA device."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def rebatch(chunks: Iterable[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """The rows of consecutive chunks of any sizes, as consecutive batches of `size` rows (the last may be shorter)."""
    held: list[torch.Tensor] = []
    n = 0
    for chunk in chunks:
        while len(chunk):
            take = min(size - n, len(chunk))
            held.append(chunk[:take])
            n, chunk = n + take, chunk[take:]
            if n == size:
                yield held[0] if len(held) == 1 else torch.cat(held)
                held, n = [], 0
    if held:
        yield torch.cat(held)


def extract_features(images: UInt8Images, extractor: str, layer: str, device: torch.device | str, *,
                     n: int | None = None, batch_size: int = FEATURE_BATCH, **kwargs) -> torch.Tensor:
    """Features `layer` (N, D) of torch-fidelity extractor `extractor` (built with `kwargs`) of uint8 images, a batch
    of `batch_size` at a time, in order: torch-fidelity's `get_featuresdict_from_dataset` step for step (1-channel
    images repeated to 3, pinned and moved on CUDA, no gradients), without holding the images. Chunks from an
    iterable need their count `n`.

    The features go into one tensor of N rows as they come: kept as one small tensor per batch, they interleave with
    the freed activations on glibc's heap and fragment it, so that the resident set grew ~3.6 MiB a batch (measured).
    """
    if isinstance(images, (torch.Tensor, Rows)):
        n, chunks = len(images), [images] if isinstance(images, torch.Tensor) else images.chunks(CHUNK)
    elif n is None:
        raise ValueError("images given as chunks need their count n")
    else:
        chunks = images
    cuda = torch.device(device).type == "cuda"
    out, done = None, 0
    with _on(device), torch.no_grad():
        model = create_feature_extractor(extractor, [layer], cuda=cuda, verbose=False, **kwargs)
        for batch in rebatch(chunks, batch_size):
            if batch.ndim == 4 and batch.shape[1] == 1:
                batch = batch.repeat(1, 3, 1, 1)  # (B, 3, H, W): what torch-fidelity's inputs serve
            if cuda:
                batch = batch.pin_memory().cuda(non_blocking=True)
            features = model(batch)[0].cpu()  # (B, D)
            if done + len(features) > n:
                raise ValueError(f"expected features of {n} images, got more")
            if out is None:
                out = torch.empty((n, *features.shape[1:]), dtype=features.dtype)
            out[done:done + len(features)] = features
            done += len(features)
    if out is None:
        raise ValueError("no images to extract features of")
    if done != n:
        raise ValueError(f"expected features of {n} images, got {done}")
    return out


def classifier_features(images: UInt8Images, classifier_path: str | Path, device: torch.device | str,
                        batch_size: int = FEATURE_BATCH, n: int | None = None) -> torch.Tensor:
    """The classifier's penultimate features (N, feature_dim) of uint8 images (N, C, H, W), in memory or read a chunk
    at a time (`n` of them, for chunks from an iterable): the feature space of FID, KID and precision/recall."""
    if not Path(classifier_path).is_file():
        raise CheckpointError(f"{classifier_path}: classifier checkpoint not found")
    if FEATURE_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(FEATURE_EXTRACTOR, ClassifierFeatures)
    return extract_features(images, FEATURE_EXTRACTOR, PENULTIMATE, device, n=n, batch_size=batch_size,
                            feature_extractor_weights_path=str(classifier_path))


def fidelity_from_features(gen: torch.Tensor, real: torch.Tensor, *, prc: bool = True,
                           kid: bool = True) -> dict[str, float]:
    """FID, KID and precision/recall of generated vs real features (N, D), by torch-fidelity's metric functions with
    the keywords `calculate_metrics` is given; returns {fid, kid, kid_std, precision, recall} (KID and
    precision/recall only when asked for)."""
    for name, f in (("generated", gen), ("real", real)):
        if len(f) < 2:
            raise ValueError(f"need at least 2 {name} images, got {len(f)}")
    out = {"fid": fid_statistics_to_metric(fid_features_to_statistics(gen), fid_features_to_statistics(real),
                                           False)[torch_fidelity.KEY_METRIC_FID]}
    if kid:
        m = kid_features_to_metric(gen, real, kid_subset_size=kid_subset_size(min(len(gen), len(real))),
                                   verbose=False)
        out.update(kid=m[torch_fidelity.KEY_METRIC_KID_MEAN], kid_std=m[torch_fidelity.KEY_METRIC_KID_STD])
    if prc:  # gen first: precision is the share of samples inside the real manifold
        m = prc_features_to_metric(gen, real, prc_neighborhood=PRC_NEIGHBOURS, save_cpu_ram=True, verbose=False)
        out.update(precision=m[torch_fidelity.KEY_METRIC_PRECISION], recall=m[torch_fidelity.KEY_METRIC_RECALL])
    return {k: float(v) for k, v in out.items()}


def fidelity_metrics(
    gen_uint8: torch.Tensor,
    real_uint8: torch.Tensor,
    classifier_path: str | Path,
    device: torch.device | str,
    *,
    prc: bool = True,  # also precision and recall (PRC_NEIGHBOURS nearest neighbours; needs more images than that)
    kid: bool = True,  # also KID, over 100 random subsets of `kid_subset_size(n)` images
    batch_size: int = FEATURE_BATCH,  # images per feature-extraction batch
) -> dict[str, float]:
    """FID, KID and precision/recall of generated vs real uint8 images (N, C, H, W) in the classifier's features.

    Returns {fid, kid, kid_std, precision, recall} (KID and precision/recall only when asked for).
    """
    _check_images(gen_uint8, real_uint8)
    gen, real = (classifier_features(x, classifier_path, device, batch_size) for x in (gen_uint8, real_uint8))
    return fidelity_from_features(gen, real, prc=prc, kid=kid)


INCEPTION, INCEPTION_LAYER = "inception-v3-compat", "2048"  # torch-fidelity's TF-compatible Inception, pool3


def inception_metrics(gen_uint8: torch.Tensor, real_uint8: torch.Tensor | Rows, weights_path: str | Path,
                      device: torch.device | str, *, kid: bool = False, batch_size: int = 64) -> dict[str, float]:
    """Standard FID (and KID) in Inception-v3 pool3 features (torch-fidelity's `inception-v3-compat`) from local
    weights; returns {fid} or {fid, kid, kid_std}. The real images may be `Rows`, read a chunk at a time.

    `weights_path` is the converted TF Inception state dict torch-fidelity otherwise downloads
    (weights-inception-2015-12-05-6726825d.pth). It is first opened with `weights_only=True`, so the unrestricted
    `torch.load` torch-fidelity then does can only ever see plain tensors.
    """
    if isinstance(real_uint8, torch.Tensor):
        _check_images(gen_uint8, real_uint8)
    else:
        _check_images(gen_uint8, gen_uint8)
    path = Path(weights_path)
    if not path.is_file():
        raise CheckpointError(f"{path}: Inception weights not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, disallowed globals: all mean "not a plain state dict"
        raise CheckpointError(f"{path}: not a plain Inception state dict ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise CheckpointError(f"{path}: not torch-fidelity's Inception-v3 state dict (no 'fc.weight')")
    try:
        gen, real = (extract_features(x, INCEPTION, INCEPTION_LAYER, device, batch_size=batch_size,
                                      feature_extractor_weights_path=str(path)) for x in (gen_uint8, real_uint8))
    except RuntimeError as e:
        if "state_dict" not in str(e):
            raise
        raise CheckpointError(f"{path}: weights do not fit torch-fidelity's Inception-v3 "
                              f"({str(e).splitlines()[0]})") from None
    return fidelity_from_features(gen, real, prc=False, kid=kid)


def conditional_accuracy(pred: torch.Tensor, target: torch.Tensor,
                         num_classes: int) -> tuple[float, list[float], torch.Tensor]:
    """How often the classifier finds the prompted class: (accuracy, per-class accuracy, confusion matrix).

    `confusion[i, j]` counts samples prompted as class i and classified as j (rows: actual, as in DVC's template);
    the accuracy of a class without samples is NaN.
    """
    pred, target = pred.long().cpu().flatten(), target.long().cpu().flatten()
    if len(pred) != len(target) or len(pred) == 0:
        raise ValueError(f"need equally many predictions and targets, at least one; got {len(pred)} and {len(target)}")
    if min(pred.min(), target.min()) < 0 or max(pred.max(), target.max()) >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    confusion = torch.bincount(target * num_classes + pred, minlength=num_classes ** 2).view(num_classes, num_classes)
    per_class = confusion.diag().double() / confusion.sum(1).double()  # NaN where a row is empty
    acc = confusion.diag().sum().item() / len(pred)
    return acc, per_class.tolist(), confusion
