"""Fetch the configured image source (params `data`) into data/raw at source size (openmoji: at data.image_size)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdlib import config, tracking
from sdlib.cli import check_outputs, user_errors, wrote
from sdlib.data.sources import fetch_source, write_raw

app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Annotated[Path, typer.Option(help="params.yaml to read the `data` section from")] = Path(
        "params.yaml"),
    out: Annotated[Path, typer.Option(help="raw dataset folder to write (replaced as a whole)")] = Path("data/raw"),
) -> None:
    """Fetch `data.source` into OUT: images/NNNNN.png, meta.csv (file,label,caption) and classes.json (with the
    source's attribution, when its license asks for one)."""
    with user_errors():
        raw_params = config.read_params(params)
        cfg = config.parse_section("data", raw_params.get("data"))
        check_outputs(out)
        run_params = {"data.source": cfg.source, "data.root": cfg.root, "data.download": cfg.download,
                      "data.limit": cfg.limit, "data.seed": cfg.seed, "data.image_size": cfg.image_size}
        with tracking.stage_run("download", run_params):
            raw = fetch_source(cfg.source, root=cfg.root, download=cfg.download, limit=cfg.limit, seed=cfg.seed,
                               image_size=cfg.image_size)
            write_raw(raw, out)
            tracking.log_metrics({"n_images": len(raw.images), "n_skipped": sum(raw.skipped.values())})
        wrote(out)
        print(f"download: {len(raw.images)} images from {cfg.source}, {len(raw.classes)} classes")
        if raw.skipped:
            print(f"download: skipped {', '.join(f'{n} ({reason})' for reason, n in raw.skipped.items())}")
        if raw.attribution:
            print(f"download: {raw.attribution}")


if __name__ == "__main__":
    app()
