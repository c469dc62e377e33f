"""Draw `pretrained.sample`'s prompts with the converted SD v1.x model: PNGs, manifest.csv, grid.png and
schedule.json, as `python -m stages.sample --pretrained` writes them for the same checkpoint and settings."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer

from sdlib import config, tracking
from sdlib.cli import check_outputs, pick_device, user_errors, wrote
from sdlib.diffusion.samplers import check_sampler
from sdlib.io import atomic_dir
from sdlib.samples import check_clip_skip, drawn_size, load_model, plan, write_samples

app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Annotated[Path, typer.Option(help="params.yaml (its `pretrained.sample` section)")] = Path("params.yaml"),
    model: Annotated[Path, typer.Option(help="pretrained_convert's model folder")] = Path("models/pretrained"),
    out: Annotated[Path, typer.Option(help="folder for the PNGs, manifest.csv, grid.png and schedule.json")] = Path(
        "reports/pretrained/samples"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
) -> None:
    """Draw n images per prompt with the converted checkpoint, image i of prompt k from seed + k*n + i."""
    with user_errors():
        cfg = config.load_section("pretrained", params).sample
        check_sampler(cfg.sampler, "pretrained.sample.sampler")
        check_outputs(out)
        net, vae, prompts, meta = load_model(model, model / "vae.safetensors", pick_device(device))
        # NCHW, the layout `sample --pretrained` draws in (load_pretrained keeps the weights as views of the file):
        # either way, the same images to the bit
        net.to(memory_format=torch.contiguous_format)
        vae.to(memory_format=torch.contiguous_format)
        hw = drawn_size(net, vae, cfg.height, cfg.width, "params: pretrained.sample.height/width")
        check_clip_skip(net, cfg.clip_skip, "params: pretrained.sample.clip_skip")
        jobs = plan(cfg, meta)
        with tracking.stage_run("pretrained_sample", config.flatten({"pretrained.sample": cfg})), \
                atomic_dir(out) as tmp:
            write_samples(tmp, out, net, vae, prompts, cfg, jobs, hw=hw, clip_skip=cfg.clip_skip, schedule=True)
            tracking.log_artifact(tmp / "grid.png")
        wrote(out / "manifest.csv", out / "grid.png", out / "schedule.json")
        source = meta.get("pretrained", {}).get("checkpoint", model)
        print(f"pretrained_sample: {len(jobs)} images ({cfg.sampler}, {cfg.steps} steps, guidance {cfg.guidance}, "
              f"{hw[1]}x{hw[0]}) from {source} ({net.diffusion.prediction}-prediction) in {out}")


if __name__ == "__main__":
    app()
