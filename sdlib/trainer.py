"""One training loop for the VAE and the U-Net: resumable, deterministic, guarded against non-finite losses.

All randomness of step `s` comes from generators seeded by (seed, s), and the data order of epoch `e` from
(seed, e), so a run resumed from a checkpoint replays exactly what the uninterrupted run would have done: on the CPU
the final weights are bit-identical. Checkpoints hold model, EMA, optimizer, scheduler and step; they are written
atomically and carry a fingerprint of the params and inputs, so a checkpoint of a different run is never resumed.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from sdlib.io import atomic_path

SEED_STRIDE = 1_000_003  # keeps (seed, step) streams of different seeds apart


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(seed * SEED_STRIDE + step)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch, a pure function of (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * SEED_STRIDE + 7919 * epoch + 1))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of the batch at global `step`; epochs are whole passes over a fresh permutation, last partial dropped."""
    per_epoch = max(n // batch_size, 1)
    epoch, i = divmod(step, per_epoch)
    return epoch_permutation(n, seed, epoch)[i * batch_size:(i + 1) * batch_size]


def steps_for(n: int, batch_size: int, epochs: int) -> int:
    return max(n // batch_size, 1) * epochs


def warmup_cosine(total_steps: int, warmup: int, final_frac: float = 0.1) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine decay to `final_frac` (Loshchilov & Hutter 2017)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p))

    return f


class EMA:
    """Exponential moving average of parameters, with the usual warm-up min(decay, (1+s)/(10+s))."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in model.parameters()], 1 - d)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for p, s in zip(model.parameters(), self.shadow):
            p.copy_(s)


def fingerprint(*parts: object, files: tuple[Path, ...] = ()) -> str:
    """Hash of params and input files: a checkpoint only resumes the run that made it."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


@dataclass
class Checkpointer:
    """Atomic save/resume of a training state under `path` (a `torch.save` file loaded with weights_only=True)."""

    path: Path
    fingerprint: str

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt or foreign file: say so and start afresh rather than crash
            print(f"warning: ignoring unreadable checkpoint {self.path} ({type(e).__name__}); starting fresh",
                  file=sys.stderr)
            return None
        if state.get("fingerprint") != self.fingerprint:
            print(f"warning: checkpoint {self.path} was made with other params or inputs; starting fresh",
                  file=sys.stderr)
            return None
        return state

    def save(self, state: dict) -> None:
        with atomic_path(self.path) as tmp:
            torch.save({**state, "fingerprint": self.fingerprint}, tmp)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class History:
    """Mean loss (and extra terms) per epoch, for the training-curve plots."""

    rows: list[dict] = field(default_factory=list)
    _acc: dict = field(default_factory=dict)
    _n: int = 0

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self._acc[k] = self._acc.get(k, 0.0) + v
        self._n += 1

    def end_epoch(self, epoch: int) -> dict:
        row = {"epoch": epoch, **{k: v / max(self._n, 1) for k, v in self._acc.items()}}
        self.rows.append(row)
        self._acc, self._n = {}, 0
        return row


def fit(
    *,
    model: nn.Module,
    loss_fn: Callable[[int, torch.Generator], tuple[torch.Tensor, dict[str, float]]],
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    seed: int,
    device: torch.device,
    checkpointer: Checkpointer,
    checkpoint_every: int,
    ema: EMA | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    grad_clip: float = 1.0,
    on_epoch: Callable[[dict], None] | None = None,
    desc: str = "train",
) -> History:
    """Run `total_steps` optimiser steps of `loss_fn(step, generator) -> (loss, logs)`, resuming if possible."""
    history = History()
    start = 0
    state = checkpointer.load()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        history.rows = state["history"]
        start = state["step"]
        print(f"resuming from {checkpointer.path} at step {start}/{total_steps}", file=sys.stderr)

    def save(step: int) -> None:
        checkpointer.save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "scheduler": scheduler.state_dict() if scheduler is not None else {},
            "ema": ema.state_dict() if ema is not None else {}, "history": history.rows,
        })

    model.train()
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, desc=desc, unit="step",
               file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    for step in bar:
        loss, logs = loss_fn(step, step_generator(seed, step, device))
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite loss ({loss.item()}) at step {step}; "
                                f"the last good checkpoint is kept at {checkpointer.path}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(model, step)
        history.add({"loss": loss.item(), **logs})
        bar.set_postfix(loss=f"{history._acc['loss'] / history._n:.4f}", refresh=False)
        if (step + 1) % steps_per_epoch == 0:
            row = history.end_epoch((step + 1) // steps_per_epoch)
            if on_epoch is not None:
                on_epoch(row)
        if (step + 1) % checkpoint_every == 0 and step + 1 < total_steps:
            save(step + 1)
    bar.close()
    return history
