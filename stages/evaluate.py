"""Score the samples: FID/KID/precision/recall against the test split with their spread over seed sets, the
real-vs-real FID floor, how often the classifier sees the prompted class, and the VAE's reconstruction PSNR and rFID.
Writes reports/metrics.json and reports/confusion.csv; the report stage logs the pipeline run's comparison row."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from sdlib import config, tracking
from sdlib.classifier import load_classifier, predict
from sdlib.cli import DataError, pick_device, user_errors, wrote
from sdlib.data import load_split, to_uint8
from sdlib.evaluation import (fid_floor, mean_and_spread, read_manifest, read_pngs, reconstruct, reconstruction_psnr,
                              seed_sets)
from sdlib.io import CheckpointError, write_csv, write_json
from sdlib.metrics import PRC_NEIGHBOURS, conditional_accuracy, fidelity_metrics, inception_fid
from sdlib.vae import load_vae

app = typer.Typer(add_completion=False)


def _round(v: float) -> float:
    return float(f"{v:.5g}")


@app.command()
def main(
    params: Annotated[Path, typer.Option(help="params.yaml (its `evaluate` section)")] = Path("params.yaml"),
    samples: Annotated[Path, typer.Option(help="the sample stage's folder, with manifest.csv")] = Path("reports/samples"),
    data: Annotated[Path, typer.Option(help="preprocessed dataset folder (the test split is the real set)")] = Path("data/processed"),
    classifier: Annotated[Path, typer.Option(help="train_classifier's weights")] = Path("models/classifier.safetensors"),
    vae: Annotated[Path, typer.Option(help="train_vae's weights (for reconstruction PSNR and rFID)")] = Path("models/vae.safetensors"),
    out: Annotated[Path, typer.Option(help="metrics JSON")] = Path("reports/metrics.json"),
    confusion: Annotated[Path, typer.Option(help="actual,predicted CSV of the labelled samples (a DVC plot)")] = Path("reports/confusion.csv"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
) -> None:
    """Compute FID, KID, precision, recall (mean and std over seed sets), the FID floor, conditional accuracy and the
    VAE's reconstruction quality."""
    with user_errors():
        cfg = config.parse_section("evaluate", config.read_params(params).get("evaluate"))
        weights = Path(cfg.inception_weights) if cfg.inception_weights else None
        if weights is not None and not weights.is_file():
            raise config.ConfigError(f"params: evaluate.inception_weights: {weights} not found")
        dev = pick_device(device)
        model, classes = load_classifier(classifier, dev)
        autoencoder = load_vae(vae, dev)
        test, train = load_split(data, "test"), load_split(data, "train")
        if (classes, model.args.in_channels, model.args.image_size) != (test.classes, *test.images.shape[1::2]):
            raise CheckpointError(f"{classifier}: trained on other data than {data} (re-run train_classifier)")
        if autoencoder.args.in_channels != test.images.shape[1]:
            raise CheckpointError(f"{vae}: a {autoencoder.args.in_channels}-channel VAE, the data has "
                                  f"{test.images.shape[1]} channels (re-run train_vae)")
        prompts, paths, labels = read_manifest(samples / "manifest.csv", len(classes))
        sets = seed_sets(prompts, cfg.seed_sets)
        n = len(sets[0])
        if n <= PRC_NEIGHBOURS:
            raise DataError(f"{samples}/manifest.csv: {n} sample(s) per seed set, need at least {PRC_NEIGHBOURS + 1} "
                            f"for precision/recall ({PRC_NEIGHBOURS} nearest neighbours)")
        if len(train) < n:
            raise DataError(f"{data}: {len(train)} training images, need {n} for the FID floor at {n} samples")
        gen = read_pngs(paths, test.images.shape[1], test.images.shape[-1])  # (N, C, S, S) uint8

        real = to_uint8(test.images)
        pred = predict(model, gen.float() / 127.5 - 1, dev)
        labelled = labels >= 0
        per_set, floors = [], []
        for j, idx in enumerate(sets):
            m = fidelity_metrics(gen[idx], real, classifier, dev)
            m.pop("kid_std")  # KID's own subset spread; the spread that matters here is over seed sets
            if labelled[idx].any():
                m["cond_acc"] = (pred[idx] == labels[idx])[labelled[idx]].float().mean().item()
            per_set.append(m)
            floors.append({"fid_floor": fid_floor(train.images, real, n, classifier, dev, index=j)})
        result = {**mean_and_spread(per_set), **mean_and_spread(floors)}
        rows = pd.DataFrame(columns=["actual", "predicted"])
        if labelled.any():
            acc, per_class, _ = conditional_accuracy(pred[labelled], labels[labelled], len(classes))
            result["cond_acc"] = acc  # over all samples; cond_acc_std is its spread over the seed sets
            result.update({f"cond_acc_per_class.{re.sub(r'[^A-Za-z0-9_. /-]', '_', name)}": a
                           for name, a in zip(classes, per_class) if a == a})  # NaN: class never prompted
            rows = pd.DataFrame({"actual": [classes[i] for i in labels[labelled]],
                                 "predicted": [classes[i] for i in pred[labelled]]})
        recon = reconstruct(autoencoder, test.images)
        result["vae_psnr"] = reconstruction_psnr(test.images, recon)
        result["vae_rfid"] = fidelity_metrics(to_uint8(recon), real, classifier, dev, prc=False, kid=False)["fid"]
        if weights is not None:
            result["fid_inception"] = inception_fid(gen[sets[0]], real, weights, dev)
        result.update(n_samples=n, n_seed_sets=len(sets))
        result = {k: v if isinstance(v, int) else _round(v) for k, v in sorted(result.items())}
        write_json(out, result)
        write_csv(confusion, rows)
        with tracking.stage_run("evaluate", {f"evaluate.{k}": v for k, v in cfg.model_dump().items()}):
            tracking.log_metrics(result)

        for k in ("fid", "fid_floor", "fid_inception", "kid", "precision", "recall", "cond_acc"):
            if k in result:
                spread = f" +- {result[k + '_std']}" if k + "_std" in result else ""
                print(f"{k:>14}  {result[k]}{spread}")
        print(f"{'vae_psnr':>14}  {result['vae_psnr']} dB, rFID {result['vae_rfid']}")
        print(f"{'n_samples':>14}  {n} per seed set x {len(sets)} sets")
        wrote(out, confusion)


if __name__ == "__main__":
    app()
