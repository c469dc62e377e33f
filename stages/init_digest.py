"""Record what the init files hold (`unet.init_from`, `vae.init_from`): their sha256 in models/init/unet.json and
models/init/vae.json, the deps through which DVC re-runs the stages that read them when their content changes.

A path param cannot be a DVC dep when it may be "" (and a dep on the folder would tie this pipeline to whichever one
the params name), so this stage stands in for the files: it runs on every `dvc repro` (`always_changed`), hashing them,
and the stages after it re-run only when a digest changes. "": the digest is "" too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdlib import config
from sdlib.cli import check_outputs, user_errors, wrote
from sdlib.finetune import digest, init_model, vae_file
from sdlib.io import write_json

app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Annotated[Path, typer.Option(help="params.yaml (`unet.init_from`, `vae.init_from`)")] = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="folder of unet.json and vae.json")] = Path("models/init"),
) -> None:
    """Write OUT/unet.json and OUT/vae.json: {"init_from": path, "sha256": digest of what fine-tuning reads}."""
    with user_errors():
        unet_from = config.load_section("unet", params).init_from
        vae_from = config.load_section("vae", params).init_from
        check_outputs(out / "unet.json")
        unet_sha = init_model(unet_from).digest() if unet_from else ""  # checked to be a model folder first
        vae_sha = digest(vae_file(vae_from)) if vae_from else ""
        write_json(out / "unet.json", {"init_from": unet_from, "sha256": unet_sha})
        write_json(out / "vae.json", {"init_from": vae_from, "sha256": vae_sha})
        wrote(out / "unet.json", out / "vae.json")
        print(f"init_digest: unet.init_from {unet_from or '-'} {unet_sha[:12]}, "
              f"vae.init_from {vae_from or '-'} {vae_sha[:12]}")


if __name__ == "__main__":
    app()
