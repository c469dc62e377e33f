"""Glue shared by the stage scripts: one-line user errors, device choice, output checks, what-was-written messages."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

import torch
import typer

from sdlib.errors import ConfigError, DataError, UserError


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a user-facing error into `error: <message>` on stderr and exit code 2, without a traceback."""
    try:
        yield
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available")
    return torch.device(name)


def check_outputs(*paths: str | Path | None) -> None:
    """Fail before any work when an output cannot be written: a file stands where a folder is needed."""
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise DataError(f"cannot write {path}: {parent} is a file, not a folder")
                break


def wrote(*paths: str | Path) -> None:
    """Tell the user what a stage wrote."""
    for p in paths:
        print(f"wrote {p}", file=sys.stderr)
