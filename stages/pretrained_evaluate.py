"""Score the pretrained model's samples against `pretrained.reference`, a folder of reference images: standard FID and
KID in Inception-v3 features (`evaluate.inception_weights`, a local weights file), in reports/pretrained/metrics.json.

With no images in the folder (the default, pretrained/reference, holds only its README) the metrics say so
(`n_reference: 0`) and nothing is computed: the stage always runs, so the pipeline keeps one shape whatever the params,
and adding images later re-runs this stage alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdlib import config, tracking
from sdlib.cli import check_outputs, pick_device, user_errors, wrote
from sdlib.data.images import image_files, read_fitted, read_pngs
from sdlib.errors import ConfigError, DataError
from sdlib.evaluation.metrics import inception_metrics
from sdlib.evaluation.scoring import read_manifest
from sdlib.io import write_json

app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Annotated[Path, typer.Option(help="params.yaml (pretrained.reference, evaluate.inception_weights)")] = Path(
        "params.yaml"),
    samples: Annotated[Path, typer.Option(help="pretrained_sample's folder, with manifest.csv")] = Path(
        "reports/pretrained/samples"),
    out: Annotated[Path, typer.Option(help="metrics JSON")] = Path("reports/pretrained/metrics.json"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
) -> None:
    """FID and KID of the samples against the reference images, or n_reference 0 when there are none."""
    with user_errors():
        values = config.read_params(params)
        reference = Path(config.parse_section("pretrained", values.get("pretrained")).reference)
        weights = config.parse_section("evaluate", values.get("evaluate")).inception_weights
        check_outputs(out)
        files = image_files(reference)
        if files:
            if not weights:
                raise ConfigError(f"params: evaluate.inception_weights is empty; FID and KID against {reference} "
                                  "need a local pt_inception-2015-12-05 weights file")
            if not Path(weights).is_file():
                raise ConfigError(f"params: evaluate.inception_weights: {weights} not found")
        _, paths, _ = read_manifest(samples / "manifest.csv", 0)
        result = {"n_samples": len(paths), "n_reference": len(files)}
        if files:
            if min(len(paths), len(files)) < 2:
                raise DataError(f"FID and KID need at least 2 samples and 2 reference images, got {len(paths)} and "
                                f"{len(files)} (raise pretrained.sample.n_per_prompt or add images to {reference})")
            gen = read_pngs(paths, 3)  # (N, 3, H, W) uint8, all the size drawn
            real = read_fitted(files, *gen.shape[-2:])
            result |= {k: float(f"{v:.5g}") for k, v in
                       inception_metrics(gen, real, weights, pick_device(device), kid=True).items()}
        write_json(out, result)
        with tracking.stage_run("pretrained_evaluate", {"pretrained.reference": str(reference),
                                                        "evaluate.inception_weights": weights}):
            tracking.log_metrics(result)
        for k, v in result.items():
            print(f"{k:>12}  {v}")
        if not files:
            print(f"no reference images in {reference}: FID and KID not computed (add images, or set "
                  "pretrained.reference to a folder of them)")
        wrote(out)


if __name__ == "__main__":
    app()
