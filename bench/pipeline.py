"""Wall time of each stage of `dvc repro`, run from scratch in a temporary copy of the repository.

The copy holds the source files git knows (tracked, plus new files that are not ignored) and the committed dvc.lock,
but no data, models, checkpoints or MLflow store, so every stage runs. `--params-override key=value` edits the copy's
params.yaml (dotted keys, YAML values) for a quick run. A stage's time runs from DVC's "Running stage 'x'" line to the
next one (or to the end), so it includes DVC's hashing and caching of that stage's outputs. One JSON line per stage,
then one for the total; the default config takes about a quarter of an hour on a 2-core CPU.

    python bench/pipeline.py
    python bench/pipeline.py --params-override epochs=1 --params-override vae.epochs=1 --params-override data.limit=600
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml

from sdlib.cli import user_errors
from sdlib.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = ("data/", "models/", "checkpoints/", "mlruns/", "mlartifacts/", "mlflow.db", "dvc.lock")  # not copied
RUNNING = re.compile(r"^Running stage '([^']+)'")

app = typer.Typer(add_completion=False)


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def copy_repo(dst: Path) -> None:
    """Source files of the working tree (tracked and new unignored ones) and the committed dvc.lock; no outputs."""
    for f in git("ls-files", "--cached", "--others", "--exclude-standard").splitlines():
        if (REPO / f).is_file() and not f.startswith(OUTPUTS):
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dst / f)
    (dst / "dvc.lock").write_text(git("show", "HEAD:dvc.lock"))


def apply_overrides(params: dict, overrides: list[str]) -> dict:
    """`a.b=value` sets params['a']['b'] to the YAML value; the key must already exist (catches typos)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--params-override: expected key=value, got {item!r}")
        *parents, leaf = key.strip().split(".")
        node = params
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise ConfigError(f"--params-override: params.yaml has no key {key.strip()!r}")
        node[leaf] = yaml.safe_load(value)
    return params


def init_project(dst: Path, overrides: list[str]) -> None:
    copy_repo(dst)
    params = apply_overrides(yaml.safe_load((dst / "params.yaml").read_text()), overrides)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git("init", "-q", cwd=dst)  # DVC wants a git repository
    git("-c", "user.name=bench", "-c", "user.email=bench@localhost", "add", "-A", cwd=dst)
    git("-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench", cwd=dst)


def timed_repro(project: Path, log: Path) -> tuple[list[tuple[str, float]], float]:
    """Run `dvc repro`, echoing its output to `log`; returns ([(stage, start offset)], total seconds)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # runs land in the copy's own mlflow.db
    starts: list[tuple[str, float]] = []
    t0 = time.perf_counter()
    with open(log, "w") as out, subprocess.Popen(["dvc", "repro"], cwd=project, env=env, stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            now = time.perf_counter() - t0
            out.write(f"[{now:8.1f}s] {line}")
            if m := RUNNING.match(line):
                starts.append((m.group(1), now))
                print(f"[{now:7.1f}s] {m.group(1)}", file=sys.stderr)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"error: dvc repro failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    return starts, total


@app.command()
def main(
    params_override: Annotated[Optional[list[str]], typer.Option(
        "--params-override", help="key=value for the copy's params.yaml, e.g. epochs=1 (repeatable)")] = None,
    keep: Annotated[bool, typer.Option("--keep/--clean", help="keep the temporary copy (path on stderr)")] = False,
    workdir: Annotated[Optional[Path], typer.Option(help="where to make the temporary copy")] = None,
) -> None:
    """Time every stage of `dvc repro` in a fresh copy of the repository; one JSON line per stage and a total."""
    overrides = params_override or []
    tmp = Path(tempfile.mkdtemp(prefix="sdlib-pipeline-", dir=workdir))
    try:
        project = tmp / "project"
        project.mkdir()
        with user_errors():
            init_project(project, overrides)
        starts, total = timed_repro(project, tmp / "repro.log")
    finally:
        if keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    common = {"bench": "pipeline", "overrides": overrides}
    ends = [t for _, t in starts[1:]] + [total]
    for (stage, start), end in zip(starts, ends):
        print(json.dumps({**common, "stage": stage, "start_s": round(start, 2), "seconds": round(end - start, 2)}))
    print(json.dumps({**common, "stage": "total", "stages": len(starts), "seconds": round(total, 2),
                      "dvc_startup_s": round(starts[0][1], 2) if starts else None}))


if __name__ == "__main__":
    app()
