"""Atomic file output and safe checkpoints.

Every declared DVC output is written to a temporary sibling, fsynced, then renamed into place, so a killed stage
leaves either the previous good file or none. Weights are safetensors with the model config as JSON metadata, so a
checkpoint rebuilds its model alone and loading never unpickles code.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from sdlib.errors import CheckpointError, DataError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    tmp.chmod(0o644)  # mkstemp creates 0600; outputs are ordinary, readable files
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` as a whole once the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp creates 0700
    old = path.parent / f".{path.name}.old"
    try:
        yield tmp
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Save tensors as safetensors, with `meta` (model kind, config, ...) stored as JSON in the header."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})


def load_weights(path: str | Path, kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a checkpoint written by `save_weights`; check its `kind` when given (from the header, before the
    tensors are read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (run `dvc repro` first)")
    meta = read_meta(path, kind)
    try:
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({str(e).splitlines()[0]})") from None


def read_meta(path: str | Path, kind: str | None = None) -> dict:
    """The `meta` of a checkpoint written by `save_weights`, from its header alone (no tensor is read); check its
    `kind` when given."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    except (SafetensorError, OSError, json.JSONDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({str(e).splitlines()[0]})") from None
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{path}: expected a '{kind}' checkpoint, found '{meta.get('kind')}'")
    return meta


def write_csv(path: str | Path, df) -> None:
    """Write a pandas DataFrame as CSV, atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def read_csv(path: str | Path, columns: tuple[str, ...], *, missing: str, needs: tuple[str, ...] | None = None):
    """A CSV of strings (pandas DataFrame, no NaN) that must exist (else DataError "{path}: {missing}") and hold
    `columns` (the one-line error names the absent ones and the `needs` header, default `columns`)."""
    import pandas as pd  # imported here: only the readers of tables need pandas

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {missing}")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable CSV ({' '.join(str(e).split()) or 'empty'})") from None
    absent = [c for c in columns if c not in table.columns]
    if absent:
        raise DataError(f"{path}: missing column {', '.join(absent)} (needs {','.join(needs or columns)})")
    return table


def fingerprint(*parts: object, files: tuple[Path, ...] = ()) -> str:
    """Hash of params and input files: a checkpoint only resumes the run that made it."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
