"""Sampling throughput of every sampler in `sdlib.diffusion.samplers` at its recommended step count, with guidance (CFG).

Calls `sdlib.generate.generate` the way `stages/sample.py` does (text encoding, sampling, VAE decoding of one batch)
on the model that params.yaml describes, randomly initialised so that no trained model is needed (or the trained
one with `--unet models/unet`): speed does not depend on the weights. Samplers run in interleaved rounds, so the load
of a shared machine hits all alike; one JSON line per sampler gives steps, U-Net evaluations, the median images/s
and the ratio to a baseline sampler (ddpm at its recommended steps).

    python bench/sampling.py                      # all samplers, batch 32, CPU or CUDA
    python bench/sampling.py --unet models/unet --sampler dpmpp_2m --sampler ddim
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from sdlib import config
from sdlib.cli import pick_device, user_errors
from sdlib.diffusion.samplers import SAMPLERS
from sdlib.generate import Prompts, generate
from sdlib.ldm import DiffusionArgs, LatentDiffusion, load_ldm
from sdlib.models.text import TextEncoderArgs, write_clip_tokenizer_files
from sdlib.models.unet import UNetArgs
from sdlib.models.vae import AutoencoderKL, VAEArgs, load_vae

app = typer.Typer(add_completion=False)


def random_models(params: dict, tokenizer_dir: Path, device: torch.device, seed: int
                  ) -> tuple[LatentDiffusion, AutoencoderKL, Prompts]:
    """The latent diffusion model, VAE and prompt encoder that params.yaml trains, with random weights."""
    data, vae_cfg = config.parse_section("data", params.get("data")), config.parse_section("vae", params.get("vae"))
    unet_cfg = config.parse_section("unet", params.get("unet"))
    text_cfg = config.parse_section("text", params.get("text"))
    torch.manual_seed(seed)
    vae = AutoencoderKL(config.args_from(vae_cfg, VAEArgs, in_channels=data.channels))
    hw = data.image_size // vae.args.factor
    unet_args = config.args_from(unet_cfg, UNetArgs, in_channels=vae_cfg.latent_channels,
                                 context_dim=text_cfg.hidden_size)
    model = LatentDiffusion(unet=unet_args, text=config.args_from(text_cfg, TextEncoderArgs),
                            diffusion=config.args_from(unet_cfg, DiffusionArgs), latent_hw=(hw, hw)).to(device).eval()
    write_clip_tokenizer_files(tokenizer_dir)
    return model, vae.to(device).eval(), Prompts(tokenizer_dir, model)


class Timer:
    """Times generate() on one batch of prompts and counts the U-Net evaluations it makes."""

    def __init__(self, model: LatentDiffusion, vae: AutoencoderKL, prompts: Prompts, cfg: config.SampleConfig,
                 guidance: float, batch: int, seed: int):
        self.model, self.vae, self.prompts, self.cfg, self.guidance = model, vae, prompts, cfg, guidance
        self.texts = [cfg.prompts[i % len(cfg.prompts)] for i in range(batch)]  # as the sample stage cycles them
        self.seeds = [seed + i for i in range(batch)]
        self.device = next(model.parameters()).device
        self.calls = 0
        model.unet.register_forward_hook(self._count)

    def _count(self, *_) -> None:
        self.calls += 1

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, sampler: str, steps: int) -> tuple[float, int]:
        """(seconds, U-Net evaluations) of one generate() call."""
        self.calls = 0
        self._sync()
        t0 = time.perf_counter()
        generate(self.model, self.vae, self.prompts, self.texts, self.seeds, sampler=sampler, steps=steps,
                 guidance=self.guidance, schedule=self.cfg.schedule, negative_prompt=self.cfg.negative_prompt)
        self._sync()
        return time.perf_counter() - t0, self.calls


@app.command()
def main(
    sampler: Annotated[Optional[list[str]], typer.Option(help="sampler to time (repeatable); default: all")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="steps, all samplers (default: recommended)")] = None,
    batch: Annotated[int, typer.Option(min=1, help="images per generate() call")] = 32,
    guidance: Annotated[Optional[float], typer.Option(help="CFG scale (default: sample.guidance)")] = None,
    baseline: Annotated[str, typer.Option(help="sampler the ratios refer to (always timed)")] = "ddpm",
    repeats: Annotated[int, typer.Option(min=1, help="interleaved rounds; lines report medians")] = 3,
    params: Annotated[Path, typer.Option(exists=True, help="the model and `sample`")] = Path("params.yaml"),
    unet: Annotated[Optional[Path], typer.Option(help="trained model folder (default: random weights)")] = None,
    vae: Annotated[Path, typer.Option(help="trained VAE, used with --unet")] = Path("models/vae.safetensors"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads (default: torch's choice)")] = None,
    seed: Annotated[int, typer.Option(help="weights and per-image seeds")] = 0,
) -> None:
    """Time generate() for each sampler; one JSON line per sampler on stdout."""
    with user_errors(), tempfile.TemporaryDirectory() as tmp:
        names = list(dict.fromkeys([baseline, *(sampler or SAMPLERS)]))
        unknown = [n for n in names if n not in SAMPLERS]
        if unknown:
            raise config.ConfigError(f"unknown sampler {unknown[0]!r} (choose from {', '.join(SAMPLERS)})")
        dev = pick_device(device)
        if threads:
            torch.set_num_threads(threads)
        raw = config.read_params(params)
        cfg = config.parse_section("sample", raw.get("sample"))
        scale = cfg.guidance if guidance is None else guidance
        if unet is None:
            model, autoencoder, prompts = random_models(raw, Path(tmp) / "tokenizer", dev, seed)
        else:
            model, _ = load_ldm(unet / "model.safetensors", dev)
            autoencoder, prompts = load_vae(vae, dev), Prompts(unet / "tokenizer", model)
        timer = Timer(model, autoencoder, prompts, cfg, scale, batch, seed)

        step_counts = {n: steps or SAMPLERS[n].steps for n in names}
        timer(names[0], 2)  # warm-up: first-call allocations and kernel choices stay out of the timings
        seconds: dict[str, list[float]] = {n: [] for n in names}
        evals: dict[str, int] = {}
        for r in range(repeats):
            for n in names if r % 2 == 0 else names[::-1]:  # alternate the order so that no sampler always goes first
                t, evals[n] = timer(n, step_counts[n])
                seconds[n].append(t)
                print(f"round {r + 1}/{repeats} {n}: {batch / t:.2f} images/s", file=sys.stderr)

    base = statistics.median(batch / t for t in seconds[baseline])
    for n in names:
        rates = [batch / t for t in seconds[n]]
        print(json.dumps({
            "bench": "sampling", "sampler": n, "steps": step_counts[n], "model_evals": evals[n],
            "guidance": scale, "batch": batch, "unet_batch": batch if scale in (0, 1) else 2 * batch,
            "weights": str(unet) if unet else "random", "device": dev.type,
            "threads": torch.get_num_threads() if dev.type == "cpu" else None, "torch": torch.__version__,
            "images_per_s": round(statistics.median(rates), 3), "images_per_s_runs": [round(v, 3) for v in rates],
            "repeats": repeats, "baseline": f"{baseline} ({step_counts[baseline]} steps)",
            "ratio": round(statistics.median(b / t for b, t in zip(seconds[baseline], seconds[n])), 3),  # per round
            "ratio_of_medians": round(statistics.median(rates) / base, 3),
        }), flush=True)


if __name__ == "__main__":
    app()
