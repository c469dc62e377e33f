"""Fit data/raw to `data.image_size` and `data.channels`, caption and split it into data/processed: uint8 image
shards of `data.shard_size`, written a chunk at a time."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdlib import config, tracking
from sdlib.cli import check_outputs, user_errors, wrote
from sdlib.data.preprocess import preprocess_to
from sdlib.data.sources import read_raw

app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Annotated[Path, typer.Option(help="params.yaml to read the `data` section from")] = Path(
        "params.yaml"),
    raw: Annotated[Path, typer.Option(help="raw dataset folder written by the download stage")] = Path("data/raw"),
    out: Annotated[Path, typer.Option(help="processed dataset folder to write (replaced as a whole)")] = Path(
        "data/processed"),
) -> None:
    """Write {train,test}-images-NNNNN.npy, {train,test}-labels.npy, captions.parquet and meta.json to OUT from the
    raw images in RAW."""
    with user_errors():
        raw_params = config.read_params(params)
        cfg = config.parse_section("data", raw_params.get("data"))
        check_outputs(out)
        data = read_raw(raw)
        run_params = {"data.image_size": cfg.image_size, "data.channels": cfg.channels,
                      "data.test_fraction": cfg.test_fraction, "data.seed": cfg.seed, "data.shard_size": cfg.shard_size}
        with tracking.stage_run("preprocess", run_params):
            meta = preprocess_to(out, data, image_size=cfg.image_size, channels=cfg.channels,
                                 test_fraction=cfg.test_fraction, seed=cfg.seed, shard_size=cfg.shard_size)
            tracking.log_metrics({"n_train": meta["n_train"], "n_test": meta["n_test"]})
        wrote(out)
        shape = (cfg.channels, cfg.image_size, cfg.image_size)
        print(f"preprocess: {meta['n_train']} train + {meta['n_test']} test images of shape {shape}")


if __name__ == "__main__":
    app()
