"""Fit data/raw to `data.image_size` and `data.channels`, scale to [-1, 1], caption and split it into data/processed."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdlib import config, tracking
from sdlib.cli import check_outputs, user_errors, wrote
from sdlib.data.preprocess import preprocess
from sdlib.data.sources import read_raw
from sdlib.data.splits import write_processed

app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Annotated[Path, typer.Option(help="params.yaml to read the `data` section from")] = Path(
        "params.yaml"),
    raw: Annotated[Path, typer.Option(help="raw dataset folder written by the download stage")] = Path("data/raw"),
    out: Annotated[Path, typer.Option(help="processed dataset folder to write (replaced as a whole)")] = Path(
        "data/processed"),
) -> None:
    """Write {train,test}.safetensors, captions.parquet and meta.json to OUT from the raw images in RAW."""
    with user_errors():
        raw_params = config.read_params(params)
        cfg = config.parse_section("data", raw_params.get("data"))
        check_outputs(out)
        data = read_raw(raw)
        run_params = {"data.image_size": cfg.image_size, "data.channels": cfg.channels,
                      "data.test_fraction": cfg.test_fraction, "data.seed": cfg.seed}
        with tracking.stage_run("preprocess", run_params):
            train, test, meta = preprocess(data, image_size=cfg.image_size, channels=cfg.channels,
                                           test_fraction=cfg.test_fraction, seed=cfg.seed)
            write_processed(out, train, test, meta)
            tracking.log_metrics({"n_train": len(train), "n_test": len(test)})
        wrote(out)
        shape = tuple(train.images.shape[1:])
        print(f"preprocess: {meta['n_train']} train + {meta['n_test']} test images of shape {shape}")


if __name__ == "__main__":
    app()
