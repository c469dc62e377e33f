"""Train the KL-regularised autoencoder that defines the latent space, and estimate its latent scale factor; report
reconstruction PSNR on the test split. With `vae.init_from` it starts from that VAE file (architecture and scale factor
from it; `vae.epochs: 0` writes it unchanged). With `vae.kind: none` (pixel space) there is nothing to train: it writes
the identity autoencoder instead. The images live on the device, or stream from their shards a batch at a time
(`data.loading`), with the same result."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import pandas as pd
import torch
import typer

from sdlib import config, tracking
from sdlib.cli import check_outputs, pick_device, user_errors, wrote
from sdlib.data.latents import ScaleEstimate
from sdlib.data.shards import pick_loading
from sdlib.data.splits import load_split
from sdlib.errors import DataError
from sdlib.finetune import init_vae
from sdlib.io import fingerprint, write_csv, write_json
from sdlib.models.vae import (
    AutoencoderKL,
    IdentityArgs,
    IdentityAutoencoder,
    VAEArgs,
    encode_posteriors,
    image_psnr,
    reconstruct,
    save_vae,
    vae_batch,
)
from sdlib.training.autoencoder import VAELoss
from sdlib.training.loop import Batches, Checkpointer, adamw, distributed, fast_path, fit, steps_for, warmup_cosine

app = typer.Typer(add_completion=False)


@torch.no_grad()
def scale_factor(vae: AutoencoderKL, images) -> float:
    """The latent scale factor, as encode_latents estimated it before VAE files carried one: from the posteriors of
    the first training images, in encode_latents' batches."""
    estimate, batch = ScaleEstimate(), vae_batch(images.shape[1:])
    for x in images.chunks(batch):
        estimate.add(*encode_posteriors(vae, x, batch))
        if estimate.full:
            break
    return estimate.value()


def write_identity(out: Path, metrics: Path, curve: Path, channels: int, run_params: dict) -> None:
    """`vae.kind: none`: the identity autoencoder of `channels`-channel images, with no loss curve to plot."""
    result = {"params_m": 0.0}
    with tracking.stage_run("train_vae", run_params):
        tracking.log_metrics(result)
        save_vae(out, IdentityAutoencoder(IdentityArgs(in_channels=channels)))
    write_json(metrics, result)
    write_csv(curve, pd.DataFrame(columns=["epoch", "loss"]))


@app.command()
def main(
    params: Annotated[Path, typer.Option(help="params.yaml to read `vae`, `seed` and `data.loading` from")] = Path(
        "params.yaml"),
    data: Annotated[Path, typer.Option(help="preprocessed dataset folder")] = Path("data/processed"),
    out: Annotated[Path, typer.Option(help="VAE weights (safetensors)")] = Path("models/vae.safetensors"),
    metrics: Annotated[Path, typer.Option(help="metrics JSON")] = Path("reports/train_vae.json"),
    curve: Annotated[Path, typer.Option(help="loss-per-epoch CSV (a DVC plot)")] = Path("reports/curves/vae.csv"),
    checkpoint: Annotated[Path, typer.Option(help="resumable training state")] = Path("checkpoints/train_vae.pt"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N] (under torchrun: cuda:LOCAL_RANK)")] = "auto",
) -> None:
    """Train the VAE (SD's AutoencoderKL design) on the preprocessed images (`vae.kind: none`: write the identity).

    Data-parallel on N GPUs (or CPU processes): `torchrun --nproc_per_node N -m stages.train_vae ...`.
    """
    with user_errors():
        raw = config.read_params(params)
        cfg, seed = config.parse_section("vae", raw.get("vae")), config.top_level(raw, "seed")
        data_cfg = config.parse_section("data", raw.get("data"))
        check_outputs(out, metrics, curve, checkpoint)
        train, test = load_split(data, "train", "stream"), load_split(data, "test", "stream")
        n = len(train)
        loading = pick_loading(data_cfg.loading, 4 * train.images.shape.numel())  # as float32
        init, init_digest = init_vae(cfg.init_from, out) if cfg.init_from else (None, "")
        if init is not None and init.args.in_channels != train.images.shape[1]:
            raise DataError(f"vae.init_from: {cfg.init_from} encodes {init.args.in_channels}-channel images, "
                            f"{data} holds {train.images.shape[1]}-channel ones (data.channels)")

        with distributed(pick_device(device)) as (dist, dev):
            if cfg.kind == "none":  # nothing to train: rank 0 writes the identity
                if dist.is_main:
                    run_params = config.flatten({"vae": cfg, "seed": seed})
                    write_identity(out, metrics, curve, train.images.shape[1], run_params)
                    wrote(out, metrics, curve)
                    print("train_vae: vae.kind none: nothing to train, wrote the identity (the U-Net diffuses pixels)")
                return
            dist.check_batch(cfg.batch_size, n, "vae.batch_size")
            torch.manual_seed(seed)  # parameter initialisation only; the loop uses its own per-step generators
            if init is None:
                vae = AutoencoderKL(config.args_from(cfg, VAEArgs, in_channels=train.images.shape[1])).to(dev)
            else:  # its architecture and scale factor are the file's
                vae = init.to(dev)
            amp = fast_path([vae.encoder, vae.decoder], dev, cfg.precision, cfg.compile, cfg.compile_mode)
            fmt = torch.channels_last  # the batches' layout, as fast_path lays out the weights
            if loading == "memory":  # the whole data set lives on the device, batches are gathered there
                images, batches = train.images.load().to(dev), Batches(n, cfg.batch_size, seed, dev)
            else:  # each batch is read from the shards, by indices on the host
                images, batches = train.images, Batches(n, cfg.batch_size, seed, torch.device("cpu"))
            loss_fn = VAELoss(vae, images, batches=batches, kl_weight=cfg.kl_weight, dist=dist, memory_format=fmt)
            optimizer = adamw(vae.parameters(), cfg.lr, dev)
            total = steps_for(n, cfg.batch_size, cfg.epochs)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup=min(100, total // 10)))

            run_params = config.flatten({"vae": cfg, "seed": seed})
            ckpt = Checkpointer(checkpoint, fingerprint(cfg.model_dump(), seed, init_digest,
                                                        files=(data / "meta.json",)))
            with tracking.stage_run("train_vae", run_params) if dist.is_main else contextlib.nullcontext():
                history = fit(model=vae, loss_fn=loss_fn, optimizer=optimizer, total_steps=total,
                              steps_per_epoch=max(n // cfg.batch_size, 1), seed=seed, device=dev,
                              checkpointer=ckpt, checkpoint_every=cfg.checkpoint_every, scheduler=scheduler,
                              on_epoch=lambda row: tracking.log_metrics(row, step=row["epoch"]), desc="train_vae",
                              dist=dist, log_every=cfg.log_every, autocast=amp)
                if not dist.is_main:  # rank 0 alone evaluates and writes the outputs
                    return
                n_params = sum(p.numel() for p in vae.parameters())
                vae.eval()
                batch = vae_batch(test.images.shape[1:])
                psnr = torch.cat([image_psnr(x, reconstruct(vae, x, batch))
                                  for x in test.images.chunks(batch)]).mean()  # the mean of every image's
                if vae.scale_factor is None:  # an init VAE keeps its own: the U-Net it serves was trained at it
                    vae.scale_factor = scale_factor(vae, train.images)
                result = {"psnr": round(float(psnr), 3), "params_m": round(n_params / 1e6, 3)}
                if history.rows:  # none with vae.epochs 0
                    result["loss"] = round(history.rows[-1]["loss"], 5)
                tracking.log_metrics(result)
                save_vae(out, vae)
                write_json(metrics, result)
                write_csv(curve, pd.DataFrame(history.rows) if history.rows else pd.DataFrame(columns=["epoch", "loss"]))
                ckpt.clear()
        wrote(out, metrics, curve)
        start = f" from {cfg.init_from} (its architecture and scale factor)" if init is not None else ""
        print(f"train_vae: {total} steps{start}, test PSNR {result['psnr']:.2f} dB, scale factor "
              f"{vae.scale_factor:.5f}")


if __name__ == "__main__":
    app()
