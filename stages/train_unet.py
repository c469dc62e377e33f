"""Train the text-conditioned latent U-Net and its CLIP text encoder jointly, with caption dropout and EMA weights."""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import pandas as pd
import torch
import typer
from safetensors.torch import load_file

from sdlib import config, tracking
from sdlib.cli import DataError, pick_device, user_errors, wrote
from sdlib.data import load_split
from sdlib.io import atomic_dir, write_csv, write_json
from sdlib.pipeline import DiffusionArgs, LatentDiffusion, save_ldm
from sdlib.text import load_tokenizer, tokenize, write_clip_tokenizer_files
from sdlib.trainer import (EMA, Batches, Checkpointer, adamw, distributed, fast_path, fingerprint, fit, steps_for,
                           warmup_cosine)
from sdlib.unet import UNetArgs

app = typer.Typer(add_completion=False)


def caption_table(captions: list[list[str]]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Unique captions (index 0 is "", the unconditional prompt), a padded (N, K) index table and counts (N,)."""
    unique = [""] + sorted({c for caps in captions for c in caps})
    index = {c: i for i, c in enumerate(unique)}
    k = max(len(caps) for caps in captions)
    table = torch.zeros(len(captions), k, dtype=torch.long)
    for i, caps in enumerate(captions):
        table[i, : len(caps)] = torch.tensor([index[c] for c in caps])
    counts = torch.tensor([len(caps) for caps in captions])
    return unique, table, counts


@app.command()
def main(
    params: Annotated[Path, typer.Option(help="params.yaml (`unet`, `text`, `epochs`, `seed`)")] = Path("params.yaml"),
    data: Annotated[Path, typer.Option(help="preprocessed dataset folder (captions)")] = Path("data/processed"),
    latents: Annotated[Path, typer.Option(help="encoded latents folder")] = Path("data/latents"),
    out: Annotated[Path, typer.Option(help="model folder to write (weights + tokenizer)")] = Path("models/unet"),
    metrics: Annotated[Path, typer.Option(help="metrics JSON")] = Path("reports/train_unet.json"),
    curve: Annotated[Path, typer.Option(help="loss-per-epoch CSV (a DVC plot)")] = Path("reports/curves/unet.csv"),
    checkpoint: Annotated[Path, typer.Option(help="resumable training state")] = Path("checkpoints/train_unet.pt"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N] (under torchrun: cuda:LOCAL_RANK)")] = "auto",
) -> None:
    """Train the U-Net noise predictor on VAE latents, conditioned on captions through a CLIP text encoder.

    Data-parallel on N GPUs (or CPU processes): `torchrun --nproc_per_node N -m stages.train_unet ...`.
    """
    with user_errors():
        raw = config.read_params(params)
        cfg, text_cfg = config.parse_section("unet", raw.get("unet")), config.parse_section("text", raw.get("text"))
        epochs, seed = config.top_level(raw, "epochs"), config.top_level(raw, "seed")
        if not (latents / "train.safetensors").is_file():
            raise DataError(f"{latents}: no train.safetensors (run the encode_latents stage first)")
        lat = load_file(str(latents / "train.safetensors"))
        scale_factor = json.loads((latents / "meta.json").read_text())["scale_factor"]
        split = load_split(data, "train")
        if len(split.captions) != len(lat["mean"]):
            raise DataError(f"{latents} holds {len(lat['mean'])} latents but {data} {len(split.captions)} images; "
                            "re-run encode_latents")
        unique, table, counts = caption_table(split.captions)
        n, bs = len(lat["mean"]), cfg.batch_size

        with distributed(pick_device(device)) as (dist, dev), tempfile.TemporaryDirectory() as scratch:
            dist.check_batch(bs, n, "unet.batch_size")
            torch.manual_seed(seed)  # parameter initialisation only; the loop uses its own per-step generators
            unet_args = UNetArgs.from_config(cfg, in_channels=lat["mean"].shape[1], context_dim=text_cfg.hidden_size)
            diffusion = DiffusionArgs(cfg.beta_schedule, cfg.num_timesteps, cfg.prediction, scale_factor)
            model = LatentDiffusion(unet_args, text_cfg, diffusion, tuple(lat["mean"].shape[2:])).to(dev)
            amp = fast_path([model.unet], dev, cfg.precision, cfg.compile, cfg.compile_mode)
            fmt = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
            tokenizer_dir = write_clip_tokenizer_files(Path(scratch) / "tokenizer")
            caption_ids = tokenize(load_tokenizer(tokenizer_dir, text_cfg.max_length), unique,
                                   text_cfg.max_length).to(dev)
            mean, std = lat["mean"].to(dev), lat["std"].to(dev)  # the whole data set lives on the device
            table, counts = table.to(dev), counts.to(dev)
            batches = Batches(n, bs, seed, dev)

            def loss_fn(step: int, gen: torch.Generator):
                idx = batches(step)  # (B,) the global batch; every draw is for all of it, then this rank's slice
                b, shape = len(idx), mean.shape[1:]
                noise = torch.randn((b, *shape), generator=gen, device=dev)
                pick = torch.rand(b, generator=gen, device=dev)
                drop = torch.rand(b, generator=gen, device=dev) < cfg.cond_drop
                t = torch.randint(0, model.denoiser.num_timesteps, (b,), generator=gen, device=dev)
                eps = torch.randn((b, *shape), generator=gen, device=dev)
                idx, noise, pick, drop, t, eps = (dist.shard(v) for v in (idx, noise, pick, drop, t, eps))
                z0 = (mean[idx] + std[idx] * noise) * scale_factor  # a posterior sample, scaled to unit variance
                cid = table[idx, (pick * counts[idx]).long()]
                cid = torch.where(drop, torch.zeros_like(cid), cid)  # caption dropout: "" trains p(x) for CFG
                if dev.type == "cuda":  # unique() would make every step wait for the GPU; B captions cost less
                    context = model.encode_text(caption_ids[cid])  # (B, L, D)
                else:
                    uniq, inverse = cid.unique(return_inverse=True)
                    context = model.encode_text(caption_ids[uniq])[inverse]  # (B, L, D); each caption encoded once
                z0, eps = z0.contiguous(memory_format=fmt), eps.contiguous(memory_format=fmt)
                return model.denoiser.loss(z0, context, t=t, eps=eps), {}

            optimizer = adamw(model.parameters(), cfg.lr, dev)
            total = steps_for(n, bs, epochs)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup=min(200, total // 10)))
            ema = EMA(model, cfg.ema_decay)
            run_params = {**{f"unet.{k}": v for k, v in cfg.model_dump().items()},
                          **{f"text.{k}": v for k, v in text_cfg.model_dump().items()}, "epochs": epochs, "seed": seed}
            ckpt = Checkpointer(checkpoint, fingerprint(run_params, files=(latents / "train.safetensors",)))
            with tracking.stage_run("train_unet", run_params) if dist.is_main else contextlib.nullcontext():
                history = fit(model=model, loss_fn=loss_fn, optimizer=optimizer, total_steps=total,
                              steps_per_epoch=max(n // bs, 1), seed=seed, device=dev, checkpointer=ckpt,
                              checkpoint_every=cfg.checkpoint_every, ema=ema, scheduler=scheduler,
                              on_epoch=lambda row: tracking.log_metrics(row, step=row["epoch"]), desc="train_unet",
                              dist=dist, log_every=cfg.log_every, autocast=amp)
                if not dist.is_main:  # rank 0 alone writes the outputs
                    return
                ema.copy_to(model)
                n_params = sum(p.numel() for p in model.unet.parameters())
                result = {"loss": round(history.rows[-1]["loss"], 5), "unet_params_m": round(n_params / 1e6, 3),
                          "steps": total}
                tracking.log_metrics(result)
                with atomic_dir(out) as tmp:
                    shutil.copytree(tokenizer_dir, tmp / "tokenizer")
                    save_ldm(tmp / "model.safetensors", model, {"classes": split.classes, "digits": split.digits})
        write_json(metrics, result)
        write_csv(curve, pd.DataFrame(history.rows))
        ckpt.clear()
        wrote(out, metrics, curve)
        print(f"train_unet: {total} steps, final loss {result['loss']:.4f}")


if __name__ == "__main__":
    app()
