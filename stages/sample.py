"""Generate images from prompts: the pipeline's `sample` stage, and the command users run to draw a digit.

Pipeline:  python -m stages.sample --params params.yaml --out reports/samples
By hand:   python -m stages.sample --prompt 8 --n 16 --sampler dpmpp_2m --steps 20 --guidance 3 --seed 0 --out out/
Img2img:   python -m stages.sample --prompt 8 --init-image sketch.png --strength 0.6 --out out/
Retrieval: python -m stages.sample --params params.yaml --data data/processed --retrieval reports/retrieval
             (also one sample for each of `evaluate.retrieval` test captions, for `evaluate`'s caption retrieval)
SD v1.x:   python -m stages.sample --pretrained v1-5-pruned-emaonly.safetensors --prompt "an astronaut riding a horse"
             --height 512 --width 512 --sampler dpmpp_2m --steps 25 --guidance 7.5 --seed 0 --out out/

With --pretrained the defaults are SD's (`PRETRAINED_DEFAULTS`), not params.yaml's, and schedule.json records the
noise levels and U-Net timesteps of the run beside manifest.csv.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from sdlib import config, tracking
from sdlib.cli import check_outputs, pick_device, user_errors, wrote
from sdlib.data.images import to_uint8
from sdlib.data.splits import load_split
from sdlib.diffusion.samplers import SAMPLERS, check_sampler
from sdlib.errors import ConfigError
from sdlib.evaluation.retrieval import pick_captions
from sdlib.generate import Prompts, load_init_image
from sdlib.io import atomic_dir, atomic_path
from sdlib.ldm import LatentDiffusion
from sdlib.models.vae import Autoencoder
from sdlib.pretrained.load import DTYPES, load_pretrained
from sdlib.pretrained.options import check_read_options, check_size
from sdlib.pretrained.sd_v1 import ARCHITECTURES
from sdlib.retrieval_samples import write_retrieval
from sdlib.samples import check_clip_skip, drawn_size, load_model, plan, write_samples

app = typer.Typer(add_completion=False)

# With --pretrained: one image per prompt, drawn one at a time, at SD's usual guidance (params.yaml is the digits')
PRETRAINED_DEFAULTS = {"n_per_prompt": 1, "steps": 25, "guidance": 7.5, "batch_size": 1}


def settings(params: Path | None, overrides: dict) -> config.SampleConfig:
    """The `sample` section of params.yaml (or, without params, PRETRAINED_DEFAULTS) with command-line overrides;
    the sampler is checked against the registry."""
    if params is None:
        values = PRETRAINED_DEFAULTS
    else:
        values = config.read_params(params).get("sample")
        if values is None:
            raise ConfigError("params: missing section 'sample'")
    values = {**values, **{k: v for k, v in overrides.items() if v is not None}}
    cfg = config.parse_section("sample", values)
    check_sampler(cfg.sampler, "sample.sampler")
    return cfg


def load_models(pretrained: Path | None, unet: Path, vae: Path, architecture: str | None, weights: str | None,
                prediction: str | None, dtype: str, device: torch.device
                ) -> tuple[LatentDiffusion, Autoencoder, Prompts, dict, str]:
    """(model, VAE, prompts, checkpoint meta, a description for the summary line) of the trained or pretrained model."""
    if pretrained is None:
        return *load_model(unet, vae, device), ""
    sd = load_pretrained(pretrained, config=ARCHITECTURES[architecture or "sd_v1"], ema=weights or "ema",
                         prediction=prediction, device=device, dtype=DTYPES[dtype])
    described = (f" from {pretrained} ({sd.layout}, U-Net weights {sd.unet_weights}, "
                 f"{sd.model.diffusion.prediction}-prediction, {dtype})")
    return sd.model, sd.vae, Prompts.from_tokenizer(sd.tokenizer, sd.model), {}, described


@app.command()
def main(
    prompt: Annotated[Optional[list[str]], typer.Option(help="prompt to draw (repeatable); default: sample.prompts")] = None,
    n: Annotated[Optional[int], typer.Option(help="images per prompt; default: sample.n_per_prompt")] = None,
    sampler: Annotated[Optional[str], typer.Option(help=f"one of {', '.join(SAMPLERS)}")] = None,
    steps: Annotated[Optional[int], typer.Option(help="sampling steps (1..1000)")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="classifier-free guidance scale (1 = none)")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="noise levels: auto, karras or discrete")] = None,
    negative_prompt: Annotated[Optional[str], typer.Option(help="prompt to steer away from")] = None,
    seed: Annotated[Optional[int], typer.Option(help="base seed; image i of prompt k uses seed + k*n + i")] = None,
    init_image: Annotated[Optional[Path], typer.Option(help="PNG to start from (image-to-image, SDEdit)")] = None,
    strength: Annotated[float, typer.Option(help="img2img noise strength in (0, 1]; 1 ignores the image")] = 0.6,
    height: Annotated[Optional[int], typer.Option(help="image height, a multiple of 8; default: the model's")] = None,
    width: Annotated[Optional[int], typer.Option(help="image width, a multiple of 8; default: the model's")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="images drawn at once; default: sample.batch_size")] = None,
    clip_skip: Annotated[int, typer.Option(help="text encoder layer, counted from the last (2: penultimate)")] = 1,
    pretrained: Annotated[Optional[Path], typer.Option(
        help="a Stable Diffusion v1.x checkpoint: a diffusers folder or a CompVis .safetensors/.ckpt file")] = None,
    architecture: Annotated[Optional[str], typer.Option(
        help=f"architecture of a single-file checkpoint: {', '.join(ARCHITECTURES)} (default sd_v1)")] = None,
    weights: Annotated[Optional[str], typer.Option(
        help="U-Net weights of a single file holding both: ema (default) or non_ema")] = None,
    prediction: Annotated[Optional[str], typer.Option(
        help="what the pretrained U-Net predicts, eps or v; default: as the checkpoint says (single file: eps)")] = None,
    dtype: Annotated[Optional[str], typer.Option(
        help="the pretrained U-Net's and text encoder's dtype: float32 (default), bfloat16 (the CPU's half "
             "precision) or float16 (CUDA's); the VAE decodes in float32")] = None,
    params: Annotated[Optional[Path], typer.Option(
        help="params.yaml whose `sample` section gives the defaults (default: params.yaml)")] = None,
    unet: Annotated[Optional[Path], typer.Option(help="trained U-Net folder (default: models/unet)")] = None,
    vae: Annotated[Optional[Path], typer.Option(help="trained VAE weights (default: models/vae.safetensors)")] = None,
    out: Annotated[Path, typer.Option(help="folder for the PNGs, manifest.csv and grid.png")] = Path("reports/samples"),
    grid_copy: Annotated[Optional[Path], typer.Option("--grid", help="also write the grid here (a DVC plot)")] = None,
    retrieval: Annotated[Optional[Path], typer.Option(
        help="also draw one image per test caption (evaluate.retrieval of them) into this folder")] = None,
    data: Annotated[Optional[Path], typer.Option(
        help="preprocessed data whose test captions --retrieval draws (default: data/processed)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
) -> None:
    """Draw images for each prompt with the trained model, or a pretrained SD v1.x checkpoint; writes PNGs,
    manifest.csv and a grid (and, with --pretrained, schedule.json)."""
    with user_errors():
        check_read_options(pretrained, {"--unet": unet, "--vae": vae, "--params": params, "--retrieval": retrieval,
                                        "--data": data},
                           {"--architecture": architecture, "--weights": weights, "--prediction": prediction,
                            "--dtype": dtype})
        if pretrained is not None and not prompt:
            raise ConfigError("--pretrained needs --prompt (the default prompts are the digits model's)")
        cfg = settings(None if pretrained else params or Path("params.yaml"),
                       {"prompts": prompt, "n_per_prompt": n, "sampler": sampler, "steps": steps,
                        "guidance": guidance, "schedule": schedule, "negative_prompt": negative_prompt,
                        "seed": seed, "batch_size": batch_size})
        if not 0.0 < strength <= 1.0:
            raise ConfigError(f"--strength must lie in (0, 1], got {strength}")
        check_size(height, width)
        if clip_skip < 1:
            raise ConfigError(f"--clip-skip must be at least 1, got {clip_skip}")
        check_outputs(out, grid_copy, retrieval)
        if retrieval is not None:  # the test captions, checked before the model is read
            n = config.parse_section("evaluate", config.read_params(params or Path("params.yaml")).get("evaluate")
                                     ).retrieval
            test = load_split(data or Path("data/processed"), "test", "stream")  # the picked images alone are read
            picked = pick_captions(test.captions, n)
        # SD v1's VAE is RGB: with the size asked, a wrong init image fails before the checkpoint is read
        early = pretrained is not None and init_image is not None and height is not None and width is not None
        image = load_init_image(init_image, 3, (height, width)) if early else None
        dev = pick_device(device)
        model, autoencoder, prompts, meta, described = load_models(
            pretrained, unet or Path("models/unet"), vae or Path("models/vae.safetensors"), architecture, weights,
            prediction, dtype or "float32", dev)
        hw = drawn_size(model, autoencoder, height, width)
        check_clip_skip(model, clip_skip)
        if init_image is not None and image is None:
            image = load_init_image(init_image, autoencoder.args.in_channels, hw)
        jobs = plan(cfg, meta)

        run_params = config.flatten({"sample": cfg})
        if pretrained is not None:
            run_params |= {"pretrained": str(pretrained), "height": hw[0], "width": hw[1], "clip_skip": clip_skip,
                           "prediction": model.diffusion.prediction, "dtype": dtype or "float32"}
        with tracking.stage_run("sample", run_params), atomic_dir(out) as tmp:
            write_samples(tmp, out, model, autoencoder, prompts, cfg, jobs, hw=hw, clip_skip=clip_skip,
                          init_image=image, strength=strength, schedule=pretrained is not None)
            tracking.log_artifact(tmp / "grid.png")
            if retrieval is not None:
                with atomic_dir(retrieval) as tmp_retrieval:
                    write_retrieval(tmp_retrieval, retrieval, model, autoencoder, prompts, cfg, picked,
                                    [test.captions[i][0] for i in picked], to_uint8(test.images[torch.tensor(picked, dtype=torch.long)]), hw=hw)
        if grid_copy is not None:
            with atomic_path(grid_copy) as tmp_grid:
                shutil.copyfile(out / "grid.png", tmp_grid)
            wrote(grid_copy)
        wrote(out / "manifest.csv", out / "grid.png", *([out / "schedule.json"] if pretrained else []),
              *([retrieval / "manifest.csv"] if retrieval else []))
        size = f", {hw[1]}x{hw[0]}" if pretrained else ""
        print(f"sample: {len(jobs)} images ({cfg.sampler}, {cfg.steps} steps, guidance {cfg.guidance}{size}){described} "
              f"in {out}")


if __name__ == "__main__":
    app()
