"""One training loop for the VAE and the U-Net: resumable, deterministic, guarded against non-finite losses.

All randomness of step `s` comes from generators seeded by (seed, s), and the data order of epoch `e` from
(seed, e), so a run resumed from a checkpoint replays exactly what the uninterrupted run would have done: on the CPU
the final weights are bit-identical. Checkpoints hold model, EMA, optimizer, scheduler and step; they are written
atomically and carry a fingerprint of the params and inputs, so a checkpoint of a different run is never resumed.

Under `torchrun` the same loop runs data-parallel (DDP): every rank draws the randomness of the whole global batch
from the step generator and keeps its contiguous slice, so N processes compute what one process would, up to
floating-point rounding. The step never waits for the device: losses stay on it and are read every `log_every` steps.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from sdlib.config import CompileMode, Precision
from sdlib.errors import ConfigError, TrainingError
from sdlib.io import atomic_path

SEED_STRIDE = 1_000_003  # keeps (seed, step) streams of different seeds apart



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


def to_device(x: torch.Tensor, device: torch.device,
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """A batch read on the host, onto `device`: through pinned memory on CUDA, so the copy does not stall the host.
    On the CPU a batch already in `memory_format` is returned as it is."""
    if device.type == "cuda":
        x = x.pin_memory()
    return x.to(device, memory_format=memory_format, non_blocking=True)


class Batches:
    """`batch_indices` as a tensor on `device`, copied there once per epoch so that a step never waits on the host."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device):
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, device
        self.per_epoch = max(n // batch_size, 1)
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __call__(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            perm = epoch_permutation(self.n, self.seed, epoch)
            if self.device.type == "cuda":  # from pinned memory the copy is asynchronous
                perm = perm.pin_memory().to(self.device, non_blocking=True)
            self._epoch, self._perm = epoch, perm
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]


class Prefetched:
    """`read(step)`, with the next step's read already under way in a background thread, so that a batch read from
    disk overlaps the step before it (the read releases the GIL). `read` must be a pure function of the step, as the
    batches are, and thread-safe; an error of a read is raised by the call that asks for its step."""

    def __init__(self, read: Callable[[int], Any]):
        self.read = read
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        weakref.finalize(self, self._pool.shutdown, False)
        self._next: tuple[int, Future] | None = None

    def __call__(self, step: int) -> Any:
        if self._next is not None and self._next[0] == step:
            value = self._next[1].result()
        else:  # the first step, or a jump (a resumed run)
            value = self.read(step)
        self._next = (step + 1, self._pool.submit(self.read, step + 1))
        return value


def prefetched_rows(rows: Sequence[Any], batches: Batches, dist: Dist) -> Prefetched:
    """This rank's slice of each step's batch from each of `rows` (`Rows` of sdlib.data.shards), as a tuple, read a
    step ahead. The thread draws the indices from a `Batches` of its own: the caller's is not thread-safe."""
    own = Batches(batches.n, batches.batch_size, batches.seed, torch.device("cpu"))
    return Prefetched(lambda step: tuple(r[dist.shard(own(step))] for r in rows))


@dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel job: rank `rank` of `world_size` (0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, outputs and tracking logs."""
        return self.rank == 0

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch: (B, ...) -> (B / world_size, ...)."""
        if self.world_size == 1:
            return x
        b = len(x) // self.world_size
        return x[self.rank * b:(self.rank + 1) * b]

    def check_batch(self, batch_size: int, n: int, key: str) -> None:
        """The global batch (`batch_size`, or all `n` examples when fewer) must split evenly across the processes."""
        if min(batch_size, n) % self.world_size:
            fewer = f" (the data holds only {n} examples)" if n < batch_size else ""
            raise ConfigError(f"params: '{key}' ({batch_size}) must be divisible by the number of processes "
                              f"({self.world_size}){fewer}")


@contextlib.contextmanager
def distributed(device: torch.device) -> Iterator[tuple[Dist, torch.device]]:
    """Join the torchrun job the environment describes (WORLD_SIZE, RANK, LOCAL_RANK); a no-op in one process.

    Yields (dist, device): on CUDA each process takes GPU `LOCAL_RANK` and talks NCCL, on the CPU gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield Dist(), device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        tdist.init_process_group("nccl", device_id=device)
    else:
        tdist.init_process_group("gloo")
    try:
        yield Dist(tdist.get_rank(), tdist.get_world_size()), device
    finally:
        tdist.destroy_process_group()


def fast_path(modules: Sequence[nn.Module], device: torch.device, precision: Precision,
              compile: bool, compile_mode: CompileMode = "default") -> torch.dtype | None:
    """Set up the fast path for the networks in `modules`; returns the autocast dtype (None: plain fp32).

    channels_last weights on every device: oneDNN's CPU convolutions, like cuDNN's, are fastest on NHWC (on a 2-core
    Xeon, one thread: a VAE training step 0.81x, a U-Net step 0.87x the CPU time of NCHW; bench/memory_format.py).
    On CUDA: cuDNN autotuning, and with bf16 also TF32 for what autocast leaves in fp32; `fp32` stays exact IEEE
    float32. `compile` compiles each module in place (its state-dict keys do not change),
    in torch.compile's `compile_mode`; "reduce-overhead" replays each step's kernels as a CUDA graph on a GPU.
    """
    amp = torch.bfloat16 if precision == "bf16" or (precision == "auto" and device.type == "cuda") else None
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if amp else "highest")
        torch.backends.cudnn.allow_tf32 = amp is not None
        torch.backends.cudnn.benchmark = True  # shapes never change during training
    for m in modules:
        m.to(memory_format=torch.channels_last)
        if compile:
            m.compile(mode=compile_mode)
    return amp


def adamw(params, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW without weight decay, the fused kernel: one pass over all tensors per step (for the default 4M-parameter
    U-Net on one CPU thread 3.6 ms instead of the for-each implementation's 11.8 ms)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)


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

    def running_mean(self, key: str) -> float:
        """The mean of `key` over the current epoch's steps so far."""
        return self._acc.get(key, 0.0) / max(self._n, 1)

    def state_dict(self) -> dict:
        """Finished epochs and the running sums of the current one, so a resumed run logs the same means."""
        return {"rows": self.rows, "acc": self._acc, "n": self._n}

    def load_state_dict(self, state: dict) -> None:
        self.rows, self._acc, self._n = state["rows"], dict(state["acc"]), state["n"]


class _Step(nn.Module):
    """Runs `loss_fn` as the forward of a module holding `model`, so that DDP sees every step and syncs gradients."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, step: int, generator: torch.Generator):
        return self.loss_fn(step, generator)


def fit(
    *,
    model: nn.Module,
    loss_fn: Callable[[int, torch.Generator], tuple[torch.Tensor, dict[str, torch.Tensor]]],
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
    dist: Dist = Dist(),
    log_every: int = 50,
    autocast: torch.dtype | None = None,
    on_step: Callable[[int], None] | None = None,
    extra_state: dict[str, Any] | None = None,
) -> History:
    """Run `total_steps` optimiser steps of `loss_fn(step, generator) -> (loss, logs)`, resuming if possible.

    `loss_fn` computes this rank's share of the global batch; `logs` are extra scalar tensors for the history.
    Values stay on the device and are read (averaged over ranks, checked for non-finite values) every `log_every`
    steps, at epoch ends and before each checkpoint, which is saved by rank 0 only and never with non-finite weights.
    `on_epoch` runs on rank 0 only, as does `on_step(done)` after every step (e.g. an evaluation every N steps);
    `autocast` runs `loss_fn` under torch.autocast with that dtype. `extra_state` names more objects with
    `state_dict()` and `load_state_dict()` that the checkpoint saves and a resumed run restores (e.g. the sample grids
    that `on_epoch` draws).
    """
    extra_state = extra_state or {}
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
        history.load_state_dict(state["history"])
        for name, obj in extra_state.items():
            if name in state:
                obj.load_state_dict(state[name])
        start = state["step"]
        if dist.is_main:
            print(f"resuming from {checkpointer.path} at step {start}/{total_steps}", file=sys.stderr)

    def check_weights(done: int) -> None:
        if not bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all()):
            raise TrainingError(f"non-finite weights after step {done - 1}; "
                                f"the last good checkpoint is kept at {checkpointer.path}")

    def save(step: int) -> None:
        check_weights(step)
        if dist.is_main:
            checkpointer.save({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "scheduler": scheduler.state_dict() if scheduler is not None else {},
                "ema": ema.state_dict() if ema is not None else {}, "history": history.state_dict(),
                **{name: obj.state_dict() for name, obj in extra_state.items()},
            })

    model.train()
    step_fn = loss_fn
    if dist.world_size > 1:  # built after resuming; DDP broadcasts rank 0's weights, equal on every rank anyway
        step_fn = DistributedDataParallel(_Step(model, loss_fn), device_ids=[device] if device.type == "cuda" else None,
                                          broadcast_buffers=False)
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, desc=desc, unit="step",
               file=sys.stderr, dynamic_ncols=True, mininterval=1.0, disable=not dist.is_main)
    keys: list[str] = []
    pending: list[torch.Tensor] = []  # one (1 + len(logs),) tensor per step not yet read

    def sync(end: int) -> None:
        """Read the values of steps [end - len(pending), end): mean over ranks, non-finite guard, history."""
        values = torch.stack(pending)  # (steps, 1 + len(logs))
        pending.clear()
        if dist.world_size > 1:
            tdist.all_reduce(values)
            values /= dist.world_size
        for i, row in enumerate(values.tolist(), start=end - len(values)):
            if not all(math.isfinite(v) for v in row):
                raise TrainingError(f"non-finite loss ({row[0]}) at step {i}; "
                                    f"the last good checkpoint is kept at {checkpointer.path}")
            history.add(dict(zip(keys, row)))
        bar.set_postfix(loss=f"{history.running_mean('loss'):.4f}", refresh=False)

    for step in bar:
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss, logs = step_fn(step, step_generator(seed, step, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(model, step)
        keys = keys or ["loss", *logs]
        pending.append(torch.stack([loss.detach().float(), *(v.detach().float() for v in logs.values())]))
        done = step + 1
        epoch_end, checkpoint = done % steps_per_epoch == 0, done % checkpoint_every == 0 and done < total_steps
        if epoch_end or checkpoint or done % log_every == 0 or done == total_steps:
            sync(done)
        if epoch_end:
            row = history.end_epoch(done // steps_per_epoch)
            if on_epoch is not None and dist.is_main:
                on_epoch(row)
        if checkpoint:
            save(done)
        if on_step is not None and dist.is_main:
            on_step(done)
    bar.close()
    check_weights(total_steps)
    return history
