"""Score the samples: FID/KID/precision/recall against the test split with their spread over seed sets, the
real-vs-real FID floor, how often the classifier sees the prompted class, and the VAE's reconstruction PSNR and rFID;
with `evaluate.retrieval`, caption retrieval of the sample stage's retrieval set. Data without classes has no
classifier (train_classifier's placeholder): then only retrieval (in pixels) and the VAE's PSNR are measured.
The test and train splits are read from their shards a chunk at a time (the real set's features are computed once),
so memory holds the samples and the features, not the data set.
Writes reports/metrics.json and reports/confusion.csv; the report stage logs the pipeline run's comparison row."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pandas as pd
import torch
import typer

from sdlib import config, tracking
from sdlib.cli import check_outputs, pick_device, user_errors, wrote
from sdlib.data.images import from_uint8, read_pngs
from sdlib.data.shards import Rows
from sdlib.data.splits import load_split
from sdlib.errors import CheckpointError, ConfigError
from sdlib.evaluation.metrics import inception_metrics
from sdlib.evaluation.retrieval import read_retrieval_manifest
from sdlib.evaluation.scoring import (read_manifest, real_features, score_retrieval, score_samples, seed_sets,
                                      vae_quality)
from sdlib.io import write_csv, write_json
from sdlib.models.classifier import is_trained, load_classifier, predict
from sdlib.models.vae import load_vae

app = typer.Typer(add_completion=False)


def _round(v: float | int | str) -> float | int | str:
    return v if isinstance(v, (int, str)) else float(f"{v:.5g}")


@app.command()
def main(
    params: Annotated[Path, typer.Option(help="params.yaml (its `evaluate` section)")] = Path("params.yaml"),
    samples: Annotated[Path, typer.Option(help="the sample stage's folder, with manifest.csv")] = Path("reports/samples"),
    retrieval: Annotated[Path, typer.Option(help="the sample stage's retrieval folder (read when evaluate.retrieval "
                                            "is set)")] = Path("reports/retrieval"),
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
            raise ConfigError(f"params: evaluate.inception_weights: {weights} not found")
        check_outputs(out, confusion)
        dev = pick_device(device)
        model, classes = load_classifier(classifier, dev) if is_trained(classifier) else (None, None)
        autoencoder = load_vae(vae, dev)
        test, train = load_split(data, "test", "stream"), load_split(data, "train", "stream")
        if model is None and len(test.classes) >= 2:
            raise CheckpointError(f"{classifier}: the placeholder of data without classes, but {data} has "
                                  f"{len(test.classes)} classes (re-run train_classifier)")
        classes = test.classes if model is None else classes  # fewer than 2: no classifier to judge them by
        if model is not None and ((classes, model.args.in_channels, model.args.image_size)
                                  != (test.classes, *test.images.shape[1::2])):
            raise CheckpointError(f"{classifier}: trained on other data than {data} (re-run train_classifier)")
        space = cfg.retrieval_space if cfg.retrieval_space != "auto" else "classifier" if model is not None else "pixels"
        if space == "classifier" and model is None:
            raise ConfigError("params: evaluate.retrieval_space is classifier, but the data has no classes to train "
                              "one on (use auto or pixels)")
        if autoencoder.args.in_channels != test.images.shape[1]:
            raise CheckpointError(f"{vae}: a {autoencoder.args.in_channels}-channel VAE, the data has "
                                  f"{test.images.shape[1]} channels (re-run train_vae)")
        if cfg.retrieval:
            picked, retrieval_paths = read_retrieval_manifest(retrieval / "manifest.csv", test.captions,
                                                              cfg.retrieval)
        prompts, paths, labels = read_manifest(samples / "manifest.csv", len(classes))
        gen = read_pngs(paths, test.images.shape[1], test.images.shape[-1])  # (N, C, S, S) uint8
        real = Rows(test.images.array)  # the test images as uint8, as the shards hold them
        features = real_features(real, classifier, dev) if model is not None else None
        if model is not None:
            pred = predict(model, from_uint8(gen), dev)
            result, rows = score_samples(gen, prompts, labels, pred, real=features, train_images=train.images,
                                         classes=classes, classifier=classifier, n_sets=cfg.seed_sets, device=dev)
        else:  # nothing to judge the samples by, nor a feature space learnt from the data
            result, rows = {"n_samples": len(gen)}, pd.DataFrame(columns=["actual", "predicted"])
        result.update(vae_quality(autoencoder, test.images, classifier if model else None, dev, real=features))
        if cfg.retrieval:
            drawn = read_pngs(retrieval_paths, test.images.shape[1], test.images.shape[-1])  # (N, C, S, S) uint8
            result.update(score_retrieval(drawn, real[torch.tensor(picked, dtype=torch.long)], space, model, dev))
        if weights is not None:
            result["fid_inception"] = inception_metrics(gen[seed_sets(prompts, cfg.seed_sets)[0]], real, weights,
                                                        dev)["fid"]
        result = {k: v if isinstance(v, int) else _round(v) for k, v in sorted(result.items())}
        result["machine"] = tracking.machine()  # the gate shows it when a baseline was made on another machine
        write_json(out, result)
        write_csv(confusion, rows)
        with tracking.stage_run("evaluate", config.flatten({"evaluate": cfg})):
            tracking.log_metrics({k: v for k, v in result.items() if isinstance(v, (int, float))})

        for k in ("fid", "fid_floor", "fid_inception", "kid", "precision", "recall", "cond_acc", "retrieval_top1",
                  "retrieval_top5"):
            if k in result:
                spread = f" +- {result[k + '_std']}" if k + "_std" in result else ""
                print(f"{k:>14}  {result[k]}{spread}")
        if "vae_psnr" in result:  # pixel space (vae.kind none) has no autoencoder to measure
            rfid = f", rFID {result['vae_rfid']}" if "vae_rfid" in result else ""  # rFID needs the classifier
            print(f"{'vae_psnr':>14}  {result['vae_psnr']} dB{rfid}")
        if "n_seed_sets" in result:
            print(f"{'n_samples':>14}  {result['n_samples']} per seed set x {result['n_seed_sets']} sets")
        else:
            print("  (no classifier: the data has no classes; FID, KID, precision/recall and cond_acc skipped)")
        if "retrieval_n" in result:
            print(f"{'retrieval':>14}  {result['retrieval_n']} test captions in {space} space, chance top-1 "
                  f"{result['retrieval_chance_top1']}, top-5 {result['retrieval_chance_top5']}")
        wrote(out, confusion)


if __name__ == "__main__":
    app()
