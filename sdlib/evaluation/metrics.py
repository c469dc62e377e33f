"""Sample-quality metrics: FID, KID, precision/recall through torch-fidelity, and conditional accuracy.

FID (Heusel et al. 2017), KID (Binkowski et al. 2018) and precision/recall (Kynkaanniemi et al. 2019) are computed
by `torch_fidelity.calculate_metrics`; this module only supplies the feature space. By default that is the
penultimate layer of the project's own classifier (`sdlib.models.classifier`), registered with torch-fidelity as the
feature extractor `sdlib-classifier`, so evaluation works offline. Standard Inception FID and KID
(`inception_metrics`) need a local copy of the Inception weights.

The classifier checkpoint reaches the extractor through torch-fidelity's own `feature_extractor_weights_path`
keyword: `calculate_metrics` passes every keyword on to the extractor's constructor, so the path travels with the
call that uses it. A module-level registry keyed by name would be hidden global state, and two checkpoints could not
be compared in one process.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from sdlib.data.images import from_uint8
from sdlib.errors import CheckpointError
from sdlib.models.classifier import load_classifier

FEATURE_EXTRACTOR = "sdlib-classifier"
PENULTIMATE = "penultimate"
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, PIL's RGB -> L
PRC_NEIGHBOURS = 3  # k of precision/recall's k-NN balls (torch-fidelity's default, Kynkaanniemi et al. 2019)


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


class _Images(Dataset):
    """uint8 images (N, C, H, W), C = 1 or 3, served as torch-fidelity expects them: (3, H, W) uint8 each."""

    def __init__(self, images: torch.Tensor):
        self.images = images.cpu()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.images[i]
        return x.repeat(3, 1, 1) if x.shape[0] == 1 else x


def _check_images(gen: torch.Tensor, real: torch.Tensor) -> None:
    for name, x in (("generated", gen), ("real", real)):
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"{name} images must be uint8 (N, 1|3, H, W), got {x.dtype} {tuple(x.shape)}")
        if len(x) < 2:
            raise ValueError(f"need at least 2 {name} images, got {len(x)}")
    if gen.shape[1:] != real.shape[1:]:
        raise ValueError(f"generated images {tuple(gen.shape[1:])} and real images {tuple(real.shape[1:])} differ")


def _common_kwargs(device: torch.device | str, batch_size: int) -> dict:
    # cache off: features of in-memory tensors must never be reused from disk; save_cpu_ram: no DataLoader worker
    # processes, which cost more than they save on tensors already in memory
    return {"cuda": torch.device(device).type == "cuda", "batch_size": batch_size, "cache": False, "verbose": False,
            "save_cpu_ram": True}


def kid_subset_size(n: int) -> int:
    """KID's usual 1000, but at most half the smaller set, so that its 100 subsets differ and kid_std means something
    (subsets of all n images would all be the same set)."""
    return min(1000, max(2, n // 2))


def _on(device: torch.device | str) -> contextlib.AbstractContextManager:
    """torch-fidelity moves its extractor with a bare `.cuda()`: make `device` the current CUDA device."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def fidelity_metrics(
    gen_uint8: torch.Tensor,
    real_uint8: torch.Tensor,
    classifier_path: str | Path,
    device: torch.device | str,
    *,
    prc: bool = True,  # also precision and recall (PRC_NEIGHBOURS nearest neighbours; needs more images than that)
    kid: bool = True,  # also KID, over 100 random subsets of `kid_subset_size(n)` images
    batch_size: int = 250,  # images per feature-extraction batch
) -> dict[str, float]:
    """FID, KID and precision/recall of generated vs real uint8 images (N, C, H, W) in the classifier's features.

    Returns {fid, kid, kid_std, precision, recall} (KID and precision/recall only when asked for).
    """
    _check_images(gen_uint8, real_uint8)
    if not Path(classifier_path).is_file():
        raise CheckpointError(f"{classifier_path}: classifier checkpoint not found")
    if FEATURE_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(FEATURE_EXTRACTOR, ClassifierFeatures)
    with _on(device):
        m = torch_fidelity.calculate_metrics(
            input1=_Images(gen_uint8), input2=_Images(real_uint8),  # input1 is the generated set for precision
            fid=True, kid=kid, prc=prc,
            feature_extractor=FEATURE_EXTRACTOR, feature_extractor_weights_path=str(classifier_path),
            feature_layer_fid=PENULTIMATE, feature_layer_kid=PENULTIMATE, feature_layer_prc=PENULTIMATE,
            kid_subset_size=kid_subset_size(min(len(gen_uint8), len(real_uint8))), prc_neighborhood=PRC_NEIGHBOURS,
            **_common_kwargs(device, batch_size),
        )
    out = {"fid": m[torch_fidelity.KEY_METRIC_FID]}
    if kid:
        out.update(kid=m[torch_fidelity.KEY_METRIC_KID_MEAN], kid_std=m[torch_fidelity.KEY_METRIC_KID_STD])
    if prc:
        out.update(precision=m[torch_fidelity.KEY_METRIC_PRECISION], recall=m[torch_fidelity.KEY_METRIC_RECALL])
    return {k: float(v) for k, v in out.items()}


def inception_metrics(gen_uint8: torch.Tensor, real_uint8: torch.Tensor, weights_path: str | Path,
                      device: torch.device | str, *, kid: bool = False, batch_size: int = 64) -> dict[str, float]:
    """Standard FID (and KID) in Inception-v3 pool3 features (torch-fidelity's `inception-v3-compat`) from local
    weights; returns {fid} or {fid, kid, kid_std}.

    `weights_path` is the converted TF Inception state dict torch-fidelity otherwise downloads
    (weights-inception-2015-12-05-6726825d.pth). It is first opened with `weights_only=True`, so the unrestricted
    `torch.load` torch-fidelity then does can only ever see plain tensors.
    """
    _check_images(gen_uint8, real_uint8)
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
        with _on(device):
            m = torch_fidelity.calculate_metrics(
                input1=_Images(gen_uint8), input2=_Images(real_uint8), fid=True, kid=kid,
                feature_extractor="inception-v3-compat", feature_layer_fid="2048", feature_layer_kid="2048",
                kid_subset_size=kid_subset_size(min(len(gen_uint8), len(real_uint8))),
                feature_extractor_weights_path=str(path), **_common_kwargs(device, batch_size),
            )
    except RuntimeError as e:
        if "state_dict" not in str(e):
            raise
        raise CheckpointError(f"{path}: weights do not fit torch-fidelity's Inception-v3 "
                              f"({str(e).splitlines()[0]})") from None
    out = {"fid": m[torch_fidelity.KEY_METRIC_FID]}
    if kid:
        out.update(kid=m[torch_fidelity.KEY_METRIC_KID_MEAN], kid_std=m[torch_fidelity.KEY_METRIC_KID_STD])
    return {k: float(v) for k, v in out.items()}


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
