"""Score the samples: FID/KID/precision/recall against the test split, the real-vs-real FID floor, and how often the
classifier sees the prompted class. Writes reports/metrics.json and logs the pipeline run's one comparison row."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import torch
import typer
from PIL import Image

from sdlib import config, tracking
from sdlib.classifier import load_classifier, predict
from sdlib.cli import DataError, pick_device, user_errors, wrote
from sdlib.data import load_split, to_uint8
from sdlib.io import CheckpointError, write_csv, write_json
from sdlib.metrics import conditional_accuracy, fidelity_metrics, inception_fid

app = typer.Typer(add_completion=False)
FLOOR_SEED = 0  # the train subset of the FID floor; fixed, since evaluate's only params are `evaluate.*`


def read_manifest(path: Path, num_classes: int) -> tuple[list[Path], torch.Tensor]:
    """Image paths (relative to the working directory) and prompted labels (-1: none) of sample.py's manifest.csv."""
    if not path.is_file():
        raise DataError(f"{path}: no sample manifest (run the sample stage first)")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable CSV ({' '.join(str(e).split()) or 'empty'})") from None
    missing = [c for c in ("label", "path") if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column {', '.join(missing)} (needs prompt,label,seed,path)")
    labels = []
    for line, (label, file) in enumerate(zip(table["label"], table["path"]), start=2):
        label = label.strip() or "-1"  # empty: the prompt names no class
        if not re.fullmatch(r"-?\d+", label) or not -1 <= int(label) < num_classes:
            raise DataError(f"{path} line {line}: label '{label}' is not -1 or a class index 0..{num_classes - 1}")
        if not Path(file).is_file():
            raise DataError(f"{path} line {line}: sample {file} not found")
        labels.append(int(label))
    return [Path(f) for f in table["path"]], torch.tensor(labels, dtype=torch.int64)


def read_pngs(paths: list[Path], channels: int, size: int) -> torch.Tensor:
    """uint8 (N, channels, size, size) images; a sample of another size is an error, not silently resized."""
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                a = np.asarray(im.convert("L" if channels == 1 else "RGB"))  # (H, W) or (H, W, 3)
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"{p}: not a readable image ({e})") from None
        if a.shape[:2] != (size, size):
            raise DataError(f"{p}: {a.shape[1]}x{a.shape[0]} image, the data is {size}x{size}")
        images.append(torch.from_numpy(a.reshape(size, size, channels).copy()).permute(2, 0, 1))  # (C, S, S)
    return torch.stack(images)


def stage_metrics(reports: Path, exclude: Path) -> dict[str, float]:
    """Numbers in the earlier stages' reports/*.json, keyed `<file stem>.<key>`, for the pipeline's summary row."""
    found = {}
    for f in sorted(reports.glob("*.json")):
        if f.resolve() == exclude.resolve():
            continue
        try:
            values = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            print(f"warning: skipping unreadable {f}", file=sys.stderr)
            continue
        if isinstance(values, dict):
            found.update({f"{f.stem}.{k}": v for k, v in values.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return found


def _round(v: float) -> float:
    return float(f"{v:.5g}")


@app.command()
def main(
    params: Annotated[Path, typer.Option(help="params.yaml (its `evaluate` section; all of it is logged)")] = Path("params.yaml"),
    samples: Annotated[Path, typer.Option(help="the sample stage's folder, with manifest.csv")] = Path("reports/samples"),
    data: Annotated[Path, typer.Option(help="preprocessed dataset folder (the test split is the real set)")] = Path("data/processed"),
    classifier: Annotated[Path, typer.Option(help="train_classifier's weights")] = Path("models/classifier.safetensors"),
    out: Annotated[Path, typer.Option(help="metrics JSON")] = Path("reports/metrics.json"),
    confusion: Annotated[Path, typer.Option(help="actual,predicted CSV of the labelled samples (a DVC plot)")] = Path("reports/confusion.csv"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
) -> None:
    """Compute FID, KID, precision, recall, the FID floor and conditional accuracy of the samples."""
    with user_errors():
        cfg = config.parse_section("evaluate", config.read_params(params).get("evaluate"))
        run_params = config.flatten(config.load_all(params))
        weights = Path(cfg.inception_weights) if cfg.inception_weights else None
        if weights is not None and not weights.is_file():
            raise config.ConfigError(f"params: evaluate.inception_weights: {weights} not found")
        dev = pick_device(device)
        model, classes = load_classifier(classifier, dev)
        test, train = load_split(data, "test"), load_split(data, "train")
        if (classes, model.args.in_channels, model.args.image_size) != (test.classes, *test.images.shape[1::2]):
            raise CheckpointError(f"{classifier}: trained on other data than {data} (re-run train_classifier)")
        if len(train) < 2:
            raise DataError(f"{data}: {len(train)} training image(s), need at least 2 for the FID floor")
        paths, labels = read_manifest(samples / "manifest.csv", len(classes))
        if len(paths) < 2:
            raise DataError(f"{samples}/manifest.csv: {len(paths)} sample(s), need at least 2 for FID")
        gen = read_pngs(paths, test.images.shape[1], test.images.shape[-1])  # (N, C, S, S) uint8

        n = len(gen)
        real = to_uint8(test.images)
        floor_idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(FLOOR_SEED))[:n]
        result = fidelity_metrics(gen, real, classifier, dev)
        result["fid_floor"] = fidelity_metrics(to_uint8(train.images[floor_idx]), real, classifier, dev,
                                               prc=False, kid=False)["fid"]
        if weights is not None:
            result["fid_inception"] = inception_fid(gen, real, weights, dev)
        result["n_samples"] = n
        rows = pd.DataFrame(columns=["actual", "predicted"])
        labelled = labels >= 0
        if labelled.any():
            pred = predict(model, gen[labelled].float() / 127.5 - 1, dev)
            acc, per_class, _ = conditional_accuracy(pred, labels[labelled], len(classes))
            result["cond_acc"] = acc
            result.update({f"cond_acc_per_class.{re.sub(r'[^A-Za-z0-9_. /-]', '_', name)}": a
                           for name, a in zip(classes, per_class) if a == a})  # NaN: class never prompted
            rows = pd.DataFrame({"actual": [classes[i] for i in labels[labelled]],
                                 "predicted": [classes[i] for i in pred]})
        result = {k: v if isinstance(v, int) else _round(v) for k, v in result.items()}
        write_json(out, result)
        write_csv(confusion, rows)

        for k in ("fid", "fid_floor", "fid_inception", "kid", "precision", "recall", "cond_acc", "n_samples"):
            if k in result:
                print(f"{k:>14}  {result[k]}")
        reports = out.parent
        artifacts = [out, confusion, samples / "grid.png", *sorted(reports.glob("curves/*.csv")),
                     *sorted(reports.glob("figures/*.png"))]
        tracking.log_pipeline_run(run_params, {**stage_metrics(out.parent, out), **result},
                                  [p for p in artifacts if p.exists()])
        wrote(out, confusion)


if __name__ == "__main__":
    app()
