"""A small CNN classifier of the processed images: the offline feature space for FID/KID and the judge of prompts.

Three conv blocks (each halving the resolution), a 2x2 average pool and a linear layer give a 128-d penultimate
feature, the counterpart of the Inception pool3 feature of standard FID (Heusel et al. 2017), but trained on the
project's own data so it needs no download. Trained with random shifts, so that it judges a generated digit that is
a little off-centre by its shape. The checkpoint stores `ClassifierArgs` and the class names, so it rebuilds from
the file alone. Data with fewer than two classes has nothing to train it on: its checkpoint is then a placeholder with
no weights (`save_no_classifier`), which evaluation reads as "no classifier" and `load_classifier` refuses.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sdlib.data.shards import Rows
from sdlib.errors import CheckpointError
from sdlib.io import load_weights, save_weights

KIND = "classifier"


@dataclass(frozen=True, kw_only=True)
class ClassifierArgs:
    in_channels: int = 1  # 1 for grayscale, 3 for RGB
    image_size: int = 32  # any multiple of 8: three 2x poolings
    num_classes: int = 10
    width: int = 24  # channels of the first block; doubled by each following block
    feature_dim: int = 128  # the penultimate feature, the space FID/KID/precision/recall are measured in

    def __post_init__(self):
        if self.image_size % 8 or self.image_size < 8:
            raise ValueError(f"image_size must be a positive multiple of 8, got {self.image_size}")
        if self.in_channels not in (1, 3) or self.num_classes < 2:
            raise ValueError(f"bad classifier args {self}")


def _block(c_in: int, c_out: int, n_convs: int) -> nn.Sequential:
    """n_convs x (3x3 conv, BatchNorm, ReLU), then 2x max-pool."""
    layers: list[nn.Module] = []
    for i in range(n_convs):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU()]
    return nn.Sequential(*layers, nn.MaxPool2d(2))


class Classifier(nn.Module):
    """images (B, C, S, S) in [-1, 1] -> logits (B, num_classes); `features` gives the 128-d penultimate layer."""

    def __init__(self, args: ClassifierArgs):
        super().__init__()
        self.args = args
        w = args.width
        # one conv at full resolution keeps it cheap; two where the maps are small
        self.body = nn.Sequential(_block(args.in_channels, w, 1), _block(w, 2 * w, 2), _block(2 * w, 4 * w, 2))
        self.fc = nn.Linear(4 * w * 2 * 2, args.feature_dim)
        self.head = nn.Linear(args.feature_dim, args.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)  # (B, 4w, S/8, S/8)
        # a 2x2 pool rather than a global one: where the strokes are matters for digits, at any image size
        h = F.adaptive_avg_pool2d(h, 2).flatten(1)  # (B, 16w)
        return F.relu(self.fc(h))  # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random offset in [-max_shift, max_shift]^2, replicating the border."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")  # (B, C, H + 2m, W + 2m)
    off = torch.randint(0, 2 * max_shift + 1, (2, b, 1), generator=generator, device=generator.device).to(x.device)
    rows = off[0] + torch.arange(h, device=x.device)  # (B, H)
    cols = off[1] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def train_classifier(
    model: Classifier,
    images: torch.Tensor | Rows,  # (N, C, S, S) in [-1, 1]: in memory, or read from the shards a batch at a time
    labels: torch.Tensor,  # (N,) class indices; -1: no class, the image is left out
    generator: torch.Generator,
    device: torch.device,
    *,
    epochs: int,
    batch_size: int,
    lr: float,  # the one-cycle schedule's peak
    max_shift: int = 2,  # augmentation: random translations of up to this many pixels
    label_smoothing: float = 0.1,  # Szegedy et al. 2016; worth ~0.3% test accuracy on 4,500 MNIST digits
    on_epoch: Callable[[dict], None] | None = None,  # called with each epoch's row {epoch, loss, acc}, e.g. to log metrics
    progress: bool = True,
    dtype: torch.dtype = torch.float64,  # of training; the model comes back in float32
) -> list[dict]:
    """Train with AdamW and a one-cycle LR schedule (peak `lr`); returns one {epoch, loss, acc} row per epoch.

    `generator` (a CPU generator) drives the data order and the augmentation, so a fixed seed repeats the run.
    The classifier is the yardstick of FID, KID and cond_acc, so it must come out the same on every machine. In
    float32, CPUs of another ISA round sums differently (about 1e-7), and a few hundred optimiser steps grow that
    into another classifier (test accuracy 0.982 vs 0.986, FID of the same samples 1.33 vs 1.78 with another seed's
    classifier). Trained in float64, the differences start 1e9 times smaller and stay below float32's rounding.

    The labelled images go to the device whole, in `dtype`; `Rows` (`data.loading: stream`) are read a batch at a
    time and cast on the device: float32 to float64 is exact, so either way every step sees the same values and the
    weights come out the same to the bit. (A batch of 128 MNIST digits is read in ~2 ms; a float64 step takes over
    half a second on one CPU thread, so batches are not read ahead.)
    """
    if len(images) != len(labels):
        raise ValueError(f"need as many labels as images, got {len(images)} images and {len(labels)} labels")
    keep = (labels >= 0).nonzero()[:, 0].cpu()  # (n,) the labelled images
    if len(keep) == 0:
        raise ValueError("no labelled images to train on")
    model.to(device, dtype).train()
    labels = labels[keep.to(labels.device)].to(device)
    if not isinstance(images, Rows):
        images = images[keep.to(images.device)].to(device, dtype)
    n = len(keep)
    steps_per_epoch = -(-n // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    # one-cycle (Smith & Topin 2018) reaches high accuracy in few epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps_per_epoch * epochs,
                                                    pct_start=0.25)
    history = []
    bar = tqdm(total=steps_per_epoch * epochs, desc="train_classifier", unit="step", file=sys.stderr,
               dynamic_ncols=True, mininterval=1.0, disable=not progress)
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=generator)
        loss_sum, correct = 0.0, 0
        for idx in order.to(device).split(batch_size):
            batch = images[keep[idx.cpu()]].to(device, dtype) if isinstance(images, Rows) else images[idx]
            x = random_shift(batch, max_shift, generator)
            logits = model(x)
            loss = F.cross_entropy(logits, labels[idx], label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == labels[idx]).sum().item()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        row = {"epoch": epoch, "loss": loss_sum / n, "acc": correct / n}
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
    bar.close()
    model.float().eval()
    return history


@torch.no_grad()
def predict(model: Classifier, images: torch.Tensor, device: torch.device, batch_size: int = 500) -> torch.Tensor:
    """Class indices (N,) of images (N, C, S, S) in [-1, 1]."""
    model.to(device).eval()
    return torch.cat([model(x.to(device)).argmax(1).cpu() for x in images.split(batch_size)])


@torch.no_grad()
def embed(model: Classifier, images: torch.Tensor, device: torch.device | str, batch_size: int = 500) -> torch.Tensor:
    """The penultimate features (N, feature_dim) of images (N, C, S, S) in [-1, 1]: FID's feature space."""
    model.to(device).eval()
    return torch.cat([model.features(x.to(device)).cpu() for x in images.split(batch_size)])


def accuracy(model: Classifier, images: torch.Tensor | Rows, labels: torch.Tensor, device: torch.device,
             batch_size: int = 500) -> float:
    """The fraction of the labelled images (label >= 0; the rest are left out) that the model classifies right; the
    images in memory or read `batch_size` at a time."""
    idx = (labels >= 0).nonzero()[:, 0].cpu()
    pred = torch.cat([predict(model, images[i], device, batch_size) for i in idx.split(batch_size)])
    return (pred == labels.cpu()[idx]).float().mean().item()


def save_classifier(path: str | Path, model: Classifier, classes: list[str]) -> None:
    if len(classes) != model.args.num_classes:
        raise ValueError(f"{len(classes)} class names for a {model.args.num_classes}-class model")
    save_weights(path, model.state_dict(), {"kind": KIND, "args": asdict(model.args), "classes": list(classes)})


def save_no_classifier(path: str | Path, classes: list[str]) -> None:
    """The placeholder checkpoint of data with fewer than two classes: no weights, the data's classes."""
    save_weights(path, {}, {"kind": KIND, "args": None, "classes": list(classes)})


def is_trained(path: str | Path) -> bool:
    """Whether the checkpoint is a trained classifier (False: the placeholder of data without classes)."""
    return load_weights(path, KIND)[1].get("args") is not None


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> tuple[Classifier, list[str]]:
    """Rebuild a classifier from its checkpoint alone; returns (model in eval mode, class names)."""
    tensors, meta = load_weights(path, KIND)
    if meta.get("args", {}) is None:
        raise CheckpointError(f"{path}: no classifier, only the placeholder of data with fewer than 2 classes "
                              f"({len(meta.get('classes', []))} found); FID and cond_acc need labelled classes")
    try:
        model = Classifier(ClassifierArgs(**meta["args"]))
        model.load_state_dict(tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: classifier checkpoint does not match its config "
                              f"({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), list(meta["classes"])
