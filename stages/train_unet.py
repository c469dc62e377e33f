"""Train the text-conditioned latent U-Net and its CLIP text encoder jointly (or, with `text.pretrained`, a projection
of a frozen encoder's cached states), with caption dropout and EMA weights; or, with `unet.init_from`, fine-tune the
U-Net of a saved model folder (its text encoder frozen). The latents live on the device, or stream from their shards a
batch at a time (`data.loading`), with the same result."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Annotated

import pandas as pd
import torch
import typer

from sdlib import config, tracking
from sdlib.cli import check_outputs, pick_device, user_errors, wrote
from sdlib.data.encoded_captions import FILE as CAPTIONS_FILE
from sdlib.data.encoded_captions import load_encoded_captions
from sdlib.data.latents import load_latents
from sdlib.data.shards import pick_loading
from sdlib.data.splits import load_split
from sdlib.diffusion.samplers import check_sampler
from sdlib.errors import DataError
from sdlib.finetune import MODEL, check_latents, check_tokenizer, init_model
from sdlib.io import atomic_dir, fingerprint, write_csv, write_json
from sdlib.ldm import load_ldm, save_ldm
from sdlib.training.grids import TrainingGrids
from sdlib.training.latent_diffusion import unet_training
from sdlib.training.loop import Checkpointer, distributed, fit

app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Annotated[Path, typer.Option(help="params.yaml (`unet`, `text`, `epochs`, `seed`, `data.loading`)")] = Path(
        "params.yaml"),
    data: Annotated[Path, typer.Option(help="preprocessed dataset folder (captions)")] = Path("data/processed"),
    latents: Annotated[Path, typer.Option(help="encoded latents folder")] = Path("data/latents"),
    captions: Annotated[Path, typer.Option(help="encoded captions folder (ids, states, tokenizer)")] = Path("data/captions"),
    vae: Annotated[Path, typer.Option(help="VAE weights, to decode the grids drawn while training")] = Path(
        "models/vae.safetensors"),
    out: Annotated[Path, typer.Option(help="model folder to write (weights + tokenizer)")] = Path("models/unet"),
    metrics: Annotated[Path, typer.Option(help="metrics JSON")] = Path("reports/train_unet.json"),
    curve: Annotated[Path, typer.Option(help="loss-per-epoch CSV (a DVC plot)")] = Path("reports/curves/unet.csv"),
    samples: Annotated[Path, typer.Option(help="folder of the grids drawn every unet.samples.every epochs")] = Path(
        "reports/train_samples"),
    checkpoint: Annotated[Path, typer.Option(help="resumable training state")] = Path("checkpoints/train_unet.pt"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N] (under torchrun: cuda:LOCAL_RANK)")] = "auto",
) -> None:
    """Train the U-Net noise predictor on VAE latents, conditioned on captions through a CLIP text encoder (or a
    frozen pretrained one, `text.pretrained`), or fine-tune the model folder `unet.init_from`. Every
    `unet.samples.every` epochs, and after the last, a grid of samples drawn with the EMA weights from fixed seeds:
    SAMPLES/epoch_XXXX.png, also logged to MLflow.

    Data-parallel on N GPUs (or CPU processes): `torchrun --nproc_per_node N -m stages.train_unet ...`.
    """
    with user_errors():
        raw = config.read_params(params)
        cfg, text_cfg = config.parse_section("unet", raw.get("unet")), config.parse_section("text", raw.get("text"))
        epochs, seed = config.top_level(raw, "epochs"), config.top_level(raw, "seed")
        data_cfg = config.parse_section("data", raw.get("data"))
        check_sampler(cfg.samples.sampler, "unet.samples.sampler")
        config.check_init_text(cfg.init_from, text_cfg.pretrained)
        check_outputs(out, metrics, curve, samples, checkpoint)
        init = init_model(cfg.init_from, out) if cfg.init_from else None
        lat = load_latents(latents, "train", "stream")
        if pick_loading(data_cfg.loading, 2 * 4 * lat.mean.shape.numel()) == "memory":  # mean and std, float32
            lat = load_latents(latents, "train", "memory")
        split = load_split(data, "train", "stream")  # its captions: the images are not read
        if len(split) != len(lat):
            raise DataError(f"{latents} holds {len(lat)} latents but {data} {len(split)} images; re-run encode_latents")
        encoded = load_encoded_captions(captions)
        source = {}  # where the weights started, recorded in the model's header
        if init is not None:  # before loading gigabytes of weights
            check_latents(init, lat.mean.shape[1], lat.scale_factor, latents)
            check_tokenizer(init, captions, encoded.max_length)
            source = {"init_from": {"path": str(init.folder), "sha256": init.digest()}}
        with distributed(pick_device(device)) as (dist, dev):
            run = unet_training(cfg, text_cfg, epochs=epochs, seed=seed, latents=lat, captions=split.captions,
                                encoded=encoded, device=dev, dist=dist,
                                init=load_ldm(init.folder / MODEL)[0] if init is not None else None)
            model, ema, total = run.model, run.ema, run.total_steps
            run_params = config.flatten({"unet": cfg, "text": text_cfg, "epochs": epochs, "seed": seed})
            inputs = (latents / "meta.json", captions / CAPTIONS_FILE)
            ckpt = Checkpointer(checkpoint, fingerprint(run_params, source, files=inputs))
            with tracking.stage_run("train_unet", run_params) if dist.is_main else contextlib.nullcontext():
                grids = TrainingGrids(cfg.samples, model=model, ema=ema, vae=vae, tokenizer=captions / "tokenizer",
                                      epochs=epochs, folder=samples,
                                      on_write=lambda path: tracking.log_artifact(path, "train_samples")
                                      ) if dist.is_main else None

                def on_epoch(row: dict) -> None:
                    tracking.log_metrics(row, step=row["epoch"])
                    grids(row["epoch"])

                history = fit(model=model, loss_fn=run.loss_fn, optimizer=run.optimizer, total_steps=total,
                              steps_per_epoch=run.steps_per_epoch, seed=seed, device=dev, checkpointer=ckpt,
                              checkpoint_every=cfg.checkpoint_every, ema=ema, scheduler=run.scheduler,
                              on_epoch=on_epoch, desc="train_unet", dist=dist, log_every=cfg.log_every,
                              autocast=run.autocast, extra_state={"grids": grids} if grids is not None else None)
                if not dist.is_main:  # rank 0 alone writes the outputs
                    return
                ema.copy_to(model)
                n_params = sum(p.numel() for p in model.unet.parameters())
                result = {"loss": round(history.rows[-1]["loss"], 5), "unet_params_m": round(n_params / 1e6, 3),
                          "steps": total}
                tracking.log_metrics(result)
                with atomic_dir(out) as tmp:
                    shutil.copytree(captions / "tokenizer", tmp / "tokenizer")
                    save_ldm(tmp / MODEL, model, {"classes": split.classes, "digits": split.digits, **source})
        write_json(metrics, result)
        write_csv(curve, pd.DataFrame(history.rows))
        ckpt.clear()
        wrote(out, metrics, curve, *grids.paths())
        how = (f" fine-tuning {init.folder} (its architecture, schedule and scale factor; text encoder frozen)"
               if init is not None else "")
        print(f"train_unet: {total} steps{how}, final loss {result['loss']:.4f}")

if __name__ == "__main__":
    app()
