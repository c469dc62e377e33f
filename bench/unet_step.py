"""Training-step throughput of this project's U-Net against diffusers' UNet2DConditionModel at the same config.

One step = forward + eps-MSE loss (Ho et al. 2020, eq. 14, through sdlib's `Denoiser.loss` for both nets) + backward
+ AdamW step, on a fixed batch of latents with a random text context (B, L, context_dim). Both nets come from one
`UNetArgs`; they get the same batch, optimiser, dtype and device setup. The cases run in interleaved rounds, so that
the load of a shared machine hits every case alike; each JSON line gives the median samples/s over rounds and the
median over rounds of the speed ratio to diffusers in the same mode.

    python bench/unet_step.py --preset cpu-small                        # CPU, eager
    python bench/unet_step.py --preset cpu-small --mode eager --mode compile
    python bench/unet_step.py --preset mnist-35m --mode eager --mode compile   # CUDA: bf16 autocast, channels_last
    python bench/unet_step.py --preset mnist-35m --mode compile --compile-mode reduce-overhead   # + CUDA graphs

Both nets get the set-up of `stages/train_unet.py` (`sdlib.training.loop.fast_path` and `adamw`): on CUDA channels_last,
bf16 autocast with TF32 for what stays in fp32, cuDNN autotuning and fused AdamW; fp32 and AdamW's default on the CPU.
Both attend with PyTorch's SDPA.
"""
from __future__ import annotations

import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from enum import Enum
from typing import Annotated, Callable, Optional, get_args

import torch
import typer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sdlib.cli import pick_device
from sdlib.config import CompileMode
from sdlib.diffusion.denoisers import Denoiser
from sdlib.diffusion.schedules import alphas_cumprod, betas
from sdlib.models.unet import UNet, UNetArgs
from sdlib.training.loop import adamw, fast_path

app = typer.Typer(add_completion=False)


class Preset(str, Enum):
    cpu_small = "cpu-small"
    mnist_35m = "mnist-35m"


class Impl(str, Enum):
    sdlib = "sdlib"
    diffusers = "diffusers"


class Mode(str, Enum):
    eager = "eager"
    compile = "compile"


CompileModeOpt = Enum("CompileModeOpt", {m: m for m in get_args(CompileMode)}, type=str)


@dataclass(frozen=True)
class Setup:
    unet: UNetArgs
    latent_size: int  # latents are (in_channels, latent_size, latent_size)
    batch: int
    context_len: int = 16  # text tokens, as text.max_length in params.yaml


PRESETS = {
    # the U-Net that params.yaml trains (4.0M parameters) on MNIST's 4x8x8 latents
    Preset.cpu_small: Setup(UNetArgs(), latent_size=8, batch=32),
    # a 35M-parameter U-Net on the same latents, at a batch that fills a GPU
    Preset.mnist_35m: Setup(UNetArgs(model_channels=160, channel_mult=(1, 2), num_res_blocks=2,
                                     attention_levels=(1,), num_heads=8), latent_size=8, batch=512),
}

# dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets; the first key in the device name wins
PEAK_BF16_TFLOPS = {"H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4, "H200 NVL": 835.0, "H200": 989.4}
PARAMS_TOLERANCE = 0.05  # the two nets must agree on parameter count within 5%


def diffusers_unet(a: UNetArgs, latent_size: int) -> nn.Module:
    """diffusers' SD U-Net with our widths, levels, res blocks, attention levels, heads, depth and context width."""
    from diffusers import UNet2DConditionModel

    if a.skip != "concat":
        raise ValueError(f"diffusers has no '{a.skip}' skip connections; compare with skip=concat")
    widths = [a.model_channels * m for m in a.channel_mult]
    levels = range(len(widths))
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=a.in_channels, out_channels=a.in_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if l in a.attention_levels else "DownBlock2D" for l in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if l in a.attention_levels else "UpBlock2D"
                             for l in reversed(levels)),
        block_out_channels=tuple(widths), layers_per_block=a.num_res_blocks,
        cross_attention_dim=a.context_dim,
        attention_head_dim=a.num_heads,  # diffusers' legacy name: for this class it is the number of heads
        transformer_layers_per_block=a.transformer_depth,
        norm_num_groups=math.gcd(32, *widths), norm_eps=1e-6,  # sdlib.layers.group_norm
        use_linear_projection=True,  # our spatial transformers project tokens with nn.Linear (SD 2)
    )


class DiffusersNet(nn.Module):
    """diffusers' calling convention adapted to sdlib's net(x, t, context)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@dataclass
class Case:
    impl: str  # sdlib | diffusers
    mode: Mode
    step: Callable[[], None]
    params: int
    dtype: str  # fp32 | bf16-autocast
    flops_per_step: int
    warmup_s: float = 0.0
    seconds: list[float] | None = None  # timed seconds per round


def make_case(impl: str, mode: Mode, s: Setup, device: torch.device, batch: tuple[torch.Tensor, torch.Tensor],
              seed: int, compile_mode: str = "default") -> Case:
    torch.manual_seed(seed)
    net = UNet(s.unet) if impl == "sdlib" else DiffusersNet(diffusers_unet(s.unet, s.latent_size))
    net = net.to(device)
    amp = fast_path([net], device, "auto", compile=False)  # train_unet's: on CUDA bf16, channels_last, TF32
    optimizer = adamw(net.parameters(), lr=1e-3, device=device)  # train_unet's: fused on CUDA
    denoiser = Denoiser(net, alphas_cumprod(betas("scaled_linear", 1000)).float()).to(device)
    x0, context = batch
    gen = torch.Generator(device).manual_seed(seed)

    def step() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = denoiser.loss(x0, context, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    flops = count_flops(step)  # counted eagerly: the compiled step does the same math
    if mode == Mode.compile:
        net.compile(mode=compile_mode)  # in place, as fast_path(compile=True) does
    return Case(impl, mode, step, n_params(net), "bf16-autocast" if amp else "fp32", flops)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(step: Callable[[], None]) -> int:
    """FLOPs of one training step (matmuls, convolutions, attention; forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, when it is in PEAK_BF16_TFLOPS; None on the CPU (no agreed peak to cite)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def parse_ints(text: str | None) -> tuple[int, ...] | None:
    return None if text is None else tuple(int(v) for v in text.split(",") if v.strip())


@app.command()
def main(
    preset: Annotated[Preset, typer.Option(help="model, latent size and batch to start from")] = Preset.cpu_small,
    mode: Annotated[Optional[list[Mode]], typer.Option(help="eager and/or compile (repeatable)")] = None,
    impl: Annotated[Optional[list[Impl]], typer.Option(
        help="sdlib and/or diffusers (repeatable; default both; sdlib alone needs no diffusers and gives no ratio)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
    batch: Annotated[Optional[int], typer.Option(help="images per step (default: the preset's)")] = None,
    model_channels: Annotated[Optional[int], typer.Option(help="width of the first level")] = None,
    channel_mult: Annotated[Optional[str], typer.Option(help="per-level width multipliers, e.g. 1,2")] = None,
    num_res_blocks: Annotated[Optional[int], typer.Option(help="ResNet blocks per level")] = None,
    attention_levels: Annotated[Optional[str], typer.Option(help="levels with spatial transformers, e.g. 1")] = None,
    transformer_depth: Annotated[Optional[int], typer.Option(help="transformer blocks per spatial transformer")] = None,
    num_heads: Annotated[Optional[int], typer.Option(help="attention heads")] = None,
    context_dim: Annotated[Optional[int], typer.Option(help="width of the text context")] = None,
    latent_size: Annotated[Optional[int], typer.Option(help="latent height = width")] = None,
    compile_mode: Annotated[CompileModeOpt, typer.Option(
        help="torch.compile mode of both nets in --mode compile (reduce-overhead: CUDA graphs)")] = "default",
    steps: Annotated[int, typer.Option(min=1, help="timed steps per case and round")] = 10,
    warmup: Annotated[int, typer.Option(min=1, help="untimed steps per case first (compiling happens here)")] = 3,
    repeats: Annotated[int, typer.Option(min=1, help="interleaved rounds; lines report medians")] = 3,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads (default: torch's choice)")] = None,
    seed: Annotated[int, typer.Option(help="seed of weights and data")] = 0,
) -> None:
    """Time U-Net training steps of sdlib and diffusers; one JSON line per (net, mode) on stdout."""
    dev = pick_device(device)
    if threads:
        torch.set_num_threads(threads)
    s = PRESETS[preset]
    overrides = {"model_channels": model_channels, "channel_mult": parse_ints(channel_mult),
                 "num_res_blocks": num_res_blocks, "attention_levels": parse_ints(attention_levels),
                 "transformer_depth": transformer_depth, "num_heads": num_heads, "context_dim": context_dim}
    s = replace(s, unet=replace(s.unet, **{k: v for k, v in overrides.items() if v is not None}),
                batch=batch or s.batch, latent_size=latent_size or s.latent_size)
    gen = torch.Generator().manual_seed(seed)
    a = s.unet
    x0 = torch.randn(s.batch, a.in_channels, s.latent_size, s.latent_size, generator=gen).to(dev)  # (B, C, H, W)
    if dev.type == "cuda":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    context = torch.randn(s.batch, s.context_len, a.context_dim, generator=gen).to(dev)  # (B, L, D)
    modes = list(dict.fromkeys(mode or [Mode.eager]))
    impls = [i.value for i in Impl if i in (impl or list(Impl))]  # sdlib first
    cases = [make_case(i, m, s, dev, (x0, context), seed, compile_mode.value) for m in modes for i in impls]

    ours = cases[0].params if "sdlib" in impls else None
    theirs = cases[-1].params if "diffusers" in impls else None
    params_ratio = ours / theirs if ours and theirs else None
    counts = ", ".join(f"{c.impl} {c.params:,}" for c in cases[:len(impls)])
    print(f"parameters: {counts}" + (f" (ratio {params_ratio:.4f})" if params_ratio else ""), file=sys.stderr)
    if params_ratio and abs(params_ratio - 1) > PARAMS_TOLERANCE:
        raise SystemExit(f"error: parameter counts differ by more than {PARAMS_TOLERANCE:.0%}; the configs differ")

    for c in cases:
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(warmup):
            c.step()
        sync(dev)
        c.warmup_s = time.perf_counter() - t0
        c.seconds = []
    for r in range(repeats):
        for c in cases if r % 2 == 0 else cases[::-1]:  # alternate the order so that no case always goes first
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(steps):
                c.step()
            sync(dev)
            c.seconds.append(time.perf_counter() - t0)

    peak = peak_tflops(dev)
    by_key = {(c.impl, c.mode): c for c in cases}

    def speedup(c: Case, base: Case) -> float:
        """Median over rounds of base's step time / c's: both ran moments apart, so a shared machine's load cancels."""
        return round(statistics.median(t_b / t_c for t_b, t_c in zip(base.seconds, c.seconds)), 3)

    for c in cases:
        base = by_key.get(("diffusers", c.mode))
        ours_case = by_key.get(("sdlib", c.mode))
        rates = [s.batch * steps / t for t in c.seconds]
        rate = statistics.median(rates)
        flops = c.flops_per_step / s.batch
        tflops = flops * rate / 1e12
        print(json.dumps({
            "bench": "unet_step", "impl": c.impl, "mode": c.mode.value,
            "compile_mode": compile_mode.value if c.mode == Mode.compile else None, "preset": preset.value,
            "device": dev.type, "device_name": device_name(dev), "dtype": c.dtype,
            "torch": torch.__version__, "threads": torch.get_num_threads() if dev.type == "cpu" else None,
            "batch": s.batch, "latent": [a.in_channels, s.latent_size, s.latent_size], "unet": a.to_dict(),
            "params": c.params, "params_diffusers": theirs,
            "params_ratio": round(params_ratio, 4) if params_ratio else None,
            "steps": steps, "warmup": warmup, "warmup_s": round(c.warmup_s, 2), "repeats": repeats,
            "samples_per_s": round(rate, 2), "samples_per_s_runs": [round(v, 2) for v in rates],
            "flops_per_sample": int(flops), "tflops": round(tflops, 4),
            "mfu": round(tflops / peak, 4) if peak else None,
            "baseline": f"diffusers {c.mode.value}" if base else None, "ratio": speedup(c, base) if base else None,
            "ratio_of_medians": round(rate / statistics.median(s.batch * steps / t for t in base.seconds), 3)
            if base else None,
            "sdlib_over_diffusers": speedup(ours_case, base) if base and ours_case else None,  # same on both lines
        }), flush=True)


if __name__ == "__main__":
    app()
