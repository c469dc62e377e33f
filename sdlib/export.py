"""Write the trained model, or a pretrained SD v1.x checkpoint, as a diffusers folder or a CompVis single file.

Trained model:  python -m sdlib.export --out exported/        (models/unet and models/vae.safetensors, from dvc.yaml)
Pretrained:     python -m sdlib.export --pretrained v1-5-pruned-emaonly.safetensors --out sd-v1-5/
Single file:    python -m sdlib.export --pretrained sd-v1-5/ --format single-file --out sd-v1-5.safetensors

The folder loads with diffusers' `StableDiffusionPipeline.from_pretrained`; both load back here with
`--pretrained` (`sdlib.pretrained.load_pretrained`). A model SD v1's layout cannot express is refused by name before
anything is written (see `sdlib.pretrained.export`).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from sdlib.cli import check_outputs, user_errors, wrote
from sdlib.errors import ConfigError
from sdlib.ldm import LatentDiffusion, load_ldm
from sdlib.models.vae import AutoencoderKL, load_vae
from sdlib.pretrained.export import FORMATS, export
from sdlib.pretrained.load import load_pretrained
from sdlib.pretrained.options import check_source
from sdlib.pretrained.sd_v1 import ARCHITECTURES

app = typer.Typer(add_completion=False)


def check_options(fmt: str, out: Path, pretrained: Path | None, trained: dict[str, object],
                  sd_options: dict[str, object]) -> None:
    """Refuse a bad format or output, and options that contradict the source (trained model or --pretrained)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "single-file" and out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: a single file is written as .safetensors")
    if (out.is_dir() if fmt == "single-file" else out.is_file()):
        raise ConfigError(f"--out {out} is a {'folder' if out.is_dir() else 'file'}; --format {fmt} writes a "
                          f"{'file' if fmt == 'single-file' else 'folder'}")
    check_source(pretrained, trained, sd_options)
    if pretrained is None:
        return
    if out.resolve() == pretrained.resolve():
        raise ConfigError(f"--out {out} is the --pretrained checkpoint itself")
    if pretrained.is_dir() and (sd_options["--architecture"] or sd_options["--weights"]):
        raise ConfigError(f"--architecture and --weights apply to a single-file checkpoint; {pretrained} is a folder")
    if sd_options["--architecture"] not in (None, *ARCHITECTURES):
        raise ConfigError(f"--architecture must be one of {', '.join(ARCHITECTURES)}, "
                          f"got {sd_options['--architecture']!r}")


def architecture_name(model: LatentDiffusion, vae: AutoencoderKL) -> str | None:
    """The name of the `--architecture` a single file of this model reads back as, if any."""
    for name, cfg in ARCHITECTURES.items():
        if (cfg.unet, cfg.vae, cfg.text, cfg.latent_hw) == (model.unet_args, vae.args, model.text_args,
                                                            model.latent_hw) \
                and replace(cfg.diffusion, prediction=model.diffusion.prediction) == model.diffusion:
            return name
    return None


def read_back(model: LatentDiffusion, vae: AutoencoderKL) -> str:
    """How to load the single file that was written: it records neither architecture nor prediction type."""
    name = architecture_name(model, vae)
    if name is None:
        return ("a single file records no architecture and this is none of "
                f"{', '.join(ARCHITECTURES)}: read it with load_pretrained(config=...), or export --format diffusers")
    prediction = " --prediction v" if model.diffusion.prediction == "v" else ""
    return f"read it back with --pretrained FILE --architecture {name}{prediction}"


@app.command()
def main(
    out: Annotated[Path, typer.Option(help="folder to write (diffusers), or a .safetensors file (single-file)")],
    format: Annotated[str, typer.Option("--format", help=f"one of {', '.join(FORMATS)}")] = "diffusers",
    unet: Annotated[Optional[Path], typer.Option(help="trained U-Net folder (default: models/unet)")] = None,
    vae: Annotated[Optional[Path], typer.Option(help="trained VAE weights (default: models/vae.safetensors)")] = None,
    pretrained: Annotated[Optional[Path], typer.Option(
        help="export a Stable Diffusion v1.x checkpoint instead: a diffusers folder or a CompVis file")] = None,
    architecture: Annotated[Optional[str], typer.Option(
        help=f"architecture of a single-file --pretrained: {', '.join(ARCHITECTURES)} (default sd_v1)")] = None,
    weights: Annotated[Optional[str], typer.Option(
        help="U-Net weights of a single-file --pretrained holding both: ema (default) or non_ema")] = None,
    prediction: Annotated[Optional[str], typer.Option(
        help="what a --pretrained U-Net predicts, eps or v; default: as it says (single file: eps)")] = None,
) -> None:
    """Write the trained model (or --pretrained) in diffusers' folder layout or as one CompVis .safetensors file."""
    with user_errors():
        check_options(format, out, pretrained, {"--unet": unet, "--vae": vae},
                      {"--architecture": architecture, "--weights": weights, "--prediction": prediction})
        check_outputs(out)
        if pretrained is None:
            model, _ = load_ldm((unet or Path("models/unet")) / "model.safetensors")
            if model.frozen_text:
                raise ConfigError(f"the model reads a frozen text encoder (text.pretrained="
                                  f"{model.text_args.pretrained!r}); SD v1's layouts hold a CLIP text encoder only")
            autoencoder = load_vae(vae or Path("models/vae.safetensors"))
            if autoencoder.kind == "none":
                raise ConfigError("the model diffuses pixels (vae.kind none); SD v1's layouts hold an AutoencoderKL")
        else:
            sd = load_pretrained(pretrained, config=ARCHITECTURES[architecture or "sd_v1"], ema=weights or "ema",
                                 prediction=prediction, dtype=torch.float32)
            model, autoencoder = sd.model, sd.vae
        export(model, autoencoder, out, format)
        wrote(out)
        note = f"; {read_back(model, autoencoder)}" if format == "single-file" else ""
        print(f"export: {format} {out} ({model.diffusion.prediction}-prediction){note}")


if __name__ == "__main__":
    app()
