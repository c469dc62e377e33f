"""Train the small CNN classifier that `evaluate` uses as its feature space and as the judge of prompted classes.
It trains from the images in memory, or read from their shards a batch at a time (`data.loading`), with the same
weights to the bit; the test split is read a batch at a time.

Data with fewer than two classes (COCO, a captions-only folder) gets a placeholder checkpoint instead, and `evaluate`
then scores what needs no classes (caption retrieval in pixel space, the VAE's PSNR)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer

from sdlib import config, tracking
from sdlib.cli import check_outputs, pick_device, user_errors, wrote
from sdlib.data.shards import pick_loading
from sdlib.data.splits import load_split
from sdlib.errors import DataError
from sdlib.io import write_json
from sdlib.models.classifier import (Classifier, ClassifierArgs, accuracy, save_classifier, save_no_classifier,
                                     train_classifier)

app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Annotated[Path, typer.Option(help="params.yaml to read `classifier` and `data.loading` from")] = Path(
        "params.yaml"),
    data: Annotated[Path, typer.Option(help="preprocessed dataset folder")] = Path("data/processed"),
    out: Annotated[Path, typer.Option(help="classifier weights (safetensors)")] = Path("models/classifier.safetensors"),
    metrics: Annotated[Path, typer.Option(help="metrics JSON (test accuracy)")] = Path("reports/classifier.json"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
) -> None:
    """Train the evaluation classifier on the train split; report its accuracy on the test split."""
    with user_errors():
        raw = config.read_params(params)
        cfg = config.parse_section("classifier", raw.get("classifier"))
        data_cfg = config.parse_section("data", raw.get("data"))
        check_outputs(out, metrics)
        dev = pick_device(device)
        train, test = load_split(data, "train", "stream"), load_split(data, "test", "stream")
        labelled = train.labels >= 0
        if len(train.classes) < 2:
            save_no_classifier(out, train.classes)
            write_json(metrics, {"n_classes": len(train.classes)})
            wrote(out, metrics)
            print(f"train_classifier: none trained: the data has {len(train.classes)} class(es), a classifier needs "
                  "2; evaluate skips FID, KID, precision/recall and cond_acc")
            return
        if int(labelled.sum()) < 2:
            raise DataError(f"{data}: the classifier needs labelled images of at least 2 classes "
                            f"(found {len(train.classes)} classes, {int(labelled.sum())} labelled images)")

        torch.manual_seed(cfg.seed)  # parameter initialisation only; training draws from its own generator
        args = ClassifierArgs(in_channels=train.images.shape[1], image_size=train.images.shape[-1],
                              num_classes=len(train.classes))
        model = Classifier(args)
        images = train.images  # each batch read from the shards, or all of it in memory: the same weights either way
        if pick_loading(data_cfg.loading, 8 * images.shape.numel()) == "memory":  # as the float64 it trains in
            images = images.load()
        run_params = config.flatten({"classifier": cfg})
        with tracking.stage_run("train_classifier", run_params):
            history = train_classifier(model, images, train.labels,
                                       torch.Generator().manual_seed(cfg.seed), dev, epochs=cfg.epochs,
                                       batch_size=cfg.batch_size, lr=cfg.lr,
                                       on_epoch=lambda row: tracking.log_metrics(row, step=row["epoch"]))
            test_labelled = test.labels >= 0
            result = {"train_loss": round(history[-1]["loss"], 5), "train_acc": round(history[-1]["acc"], 4),
                      "n_params": sum(p.numel() for p in model.parameters())}
            if test_labelled.any():
                result["test_acc"] = round(accuracy(model, test.images, test.labels, dev), 4)  # of the labelled
            tracking.log_metrics(result)
            save_classifier(out, model, train.classes)
            write_json(metrics, result)
        wrote(out, metrics)
        print(f"train_classifier: test accuracy {result.get('test_acc', float('nan')):.4f}")


if __name__ == "__main__":
    app()
