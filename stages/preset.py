"""Run a preset of configs/ as one DVC experiment: `dvc exp run -n NAME -S key=value ...` with the preset's keys.

params.yaml stays the MNIST default; a preset (configs/<name>.yaml, a partial params.yaml) changes only what it names.
Its keys and values are checked against params.yaml and the stages' validation before DVC starts.

    python -m stages.preset --list
    python -m stages.preset openmoji                       # dvc exp run -n openmoji -S data.source="openmoji" ...
    python -m stages.preset minilm-mnist --set epochs=10 --name minilm-10   # more overrides on top, own name
    python -m stages.preset openmoji --dry-run             # print the command only
"""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml

from sdlib.cli import user_errors
from sdlib.presets import available, exp_run_args, merged, parse_overrides, read_preset

app = typer.Typer(add_completion=False)


@app.command()
def main(
    preset: Annotated[Optional[str], typer.Argument(help="a preset's name: configs/<name>.yaml")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="key=value on top of the preset (repeatable), e.g. epochs=2")] = None,
    name: Annotated[Optional[str], typer.Option(help="the experiment's name (default: the preset's)")] = None,
    root: Annotated[Path, typer.Option(help="the repository (params.yaml, configs/)")] = Path("."),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the dvc command, run nothing")] = False,
    list_: Annotated[bool, typer.Option("--list", help="list the presets and their first comment line")] = False,
) -> None:
    """Run a preset as a DVC experiment (it lands in `dvc exp show` and in MLflow under its name)."""
    with user_errors():
        if list_:
            for stem, file in available(root).items():
                lines = file.read_text().splitlines()
                first = next((ln.lstrip("# ").strip() for ln in lines if ln.startswith("#")), "")
                print(f"{stem:<16} {first}")
            return
        if preset is None:
            raise typer.BadParameter("name a preset (see --list)")
        overrides = {**read_preset(root, preset), **parse_overrides(set_ or [], "--set")}
        merged(yaml.safe_load((root / "params.yaml").read_text()), overrides, f"preset {preset}")
        cmd = exp_run_args(name or preset, overrides)
    print(shlex.join(cmd), flush=True)
    if not dry_run:
        sys.exit(subprocess.run(cmd, cwd=root).returncode)


if __name__ == "__main__":
    app()
