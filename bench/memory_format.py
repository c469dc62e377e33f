"""channels_last (NHWC) against contiguous NCHW for the default networks on this machine, in interleaved rounds.

Three cases at params.yaml's sizes: a VAE training step (batch `vae.batch_size`), a U-Net training step (batch
`unet.batch_size`, 8x8 latents, a random text context) and a sampling call (one U-Net forward at twice
`sample.batch_size`, as classifier-free guidance batches it, and one VAE decode of `sample.batch_size` latents). Each
case builds the same network twice from one seed, one laid out channels_last as `sdlib.training.loop.fast_path` and
the loaders lay it out, and alternates between them, so the load of a shared machine hits both alike. One JSON line per
case: the median milliseconds of each layout over the rounds after the first, and their ratio, in wall time and in this
process's CPU time (with one thread, the CPU time is what a loaded machine does not inflate as much).

    OMP_NUM_THREADS=1 python bench/memory_format.py --threads 1
    python bench/memory_format.py --threads 2
    ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python bench/memory_format.py   # AVX2
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Annotated, Callable

import torch
import torch.nn.functional as F
import typer

from sdlib import config
from sdlib.models.unet import UNet, UNetArgs
from sdlib.models.vae import AutoencoderKL, VAEArgs, vae_loss

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}

app = typer.Typer(add_completion=False)


def vae_step(args: VAEArgs, batch: int, fmt: torch.memory_format) -> Callable[[], None]:
    torch.manual_seed(0)
    vae = AutoencoderKL(args).to(memory_format=fmt)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, fused=True)
    x = torch.rand(batch, args.in_channels, 32, 32).mul(2).sub(1).contiguous(memory_format=fmt)

    def step() -> None:
        posterior = vae.encode(x)
        loss = vae_loss(x, vae.decode(posterior.sample(noise=torch.randn_like(posterior.mean))), posterior, 1e-6)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def unet_step(args: UNetArgs, batch: int, length: int, fmt: torch.memory_format) -> Callable[[], None]:
    torch.manual_seed(0)
    unet = UNet(args).to(memory_format=fmt)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, fused=True)
    z = torch.randn(batch, args.in_channels, 8, 8).contiguous(memory_format=fmt)
    t, ctx = torch.randint(0, 1000, (batch,)), torch.randn(batch, length, args.context_dim)

    def step() -> None:
        loss = F.mse_loss(unet(z, t, ctx), torch.randn_like(z))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def sample_call(unet_args: UNetArgs, vae_args: VAEArgs, batch: int, length: int,
                fmt: torch.memory_format) -> Callable[[], None]:
    torch.manual_seed(0)
    unet, vae = UNet(unet_args).eval().to(memory_format=fmt), AutoencoderKL(vae_args).eval().to(memory_format=fmt)
    z = torch.randn(2 * batch, unet_args.in_channels, 8, 8)
    t, ctx = torch.randint(0, 1000, (2 * batch,)), torch.randn(2 * batch, length, unet_args.context_dim)

    @torch.no_grad()
    def call() -> None:
        unet(z, t, ctx)
        vae.decode(z[:batch])
    return call


@app.command()
def main(
    threads: Annotated[int, typer.Option(help="torch threads")] = 2,
    rounds: Annotated[int, typer.Option(help="interleaved rounds (the first is a warm-up)")] = 5,
    repeats: Annotated[int, typer.Option(help="calls per layout per round")] = 2,
    params: Annotated[Path, typer.Option(help="params.yaml of the sizes")] = REPO / "params.yaml",
) -> None:
    """Time each case in both layouts, interleaved; one JSON line per case."""
    torch.set_num_threads(threads)
    raw = config.read_params(params)
    vae_cfg, unet_cfg = config.parse_section("vae", raw["vae"]), config.parse_section("unet", raw["unet"])
    text_cfg, sample_cfg = config.parse_section("text", raw["text"]), config.parse_section("sample", raw["sample"])
    vae_args = config.args_from(vae_cfg, VAEArgs, in_channels=raw["data"]["channels"])
    unet_args = config.args_from(unet_cfg, UNetArgs, in_channels=vae_args.latent_channels,
                                 context_dim=text_cfg.hidden_size)
    cases = {
        f"vae train step, batch {vae_cfg.batch_size}":
            {name: vae_step(vae_args, vae_cfg.batch_size, f) for name, f in LAYOUTS.items()},
        f"unet train step, batch {unet_cfg.batch_size}":
            {name: unet_step(unet_args, unet_cfg.batch_size, text_cfg.max_length, f) for name, f in LAYOUTS.items()},
        f"sampling call (unet forward x{2 * sample_cfg.batch_size}, vae decode x{sample_cfg.batch_size})":
            {name: sample_call(unet_args, vae_args, sample_cfg.batch_size, text_cfg.max_length, f)
             for name, f in LAYOUTS.items()},
    }
    isa = os.environ.get("ATEN_CPU_CAPABILITY", "default")
    for case, fns in cases.items():
        wall: dict[str, list[float]] = {name: [] for name in fns}
        cpu: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(repeats):
                    fn()
                wall[name].append((time.perf_counter() - t0) / repeats * 1e3)
                cpu[name].append((time.process_time() - c0) / repeats * 1e3)
        ms = {name: statistics.median(v[1:]) for name, v in wall.items()}
        cpu_ms = {name: statistics.median(v[1:]) for name, v in cpu.items()}
        print(json.dumps({"bench": "memory_format", "case": case, "threads": threads, "isa": isa,
                          "cpu": platform.processor() or platform.machine(),
                          **{f"{name}_ms": round(v, 1) for name, v in ms.items()},
                          **{f"{name}_cpu_ms": round(v, 1) for name, v in cpu_ms.items()},
                          "ratio_channels_last": round(ms["channels_last"] / ms["contiguous"], 3),
                          "cpu_ratio_channels_last": round(cpu_ms["channels_last"] / cpu_ms["contiguous"], 3)}),
              flush=True)


if __name__ == "__main__":
    app()
