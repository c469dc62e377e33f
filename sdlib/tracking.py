"""MLflow tracking shared by all stages.

One absolute SQLite store under the repository root (`$DVC_ROOT/mlflow.db`), so workspace runs, `dvc exp run --temp`
and queued runs all land in the same place. Each stage logs its own run in the experiment `sd-stages`; `report`
logs the one row per pipeline run, in `sd-pipeline`, with every param of the run, the final metrics and the images.
Set `MLFLOW_TRACKING_URI` to use another server; `SDLIB_TRACKING=off` disables tracking.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

STAGES_EXPERIMENT = "sd-stages"
PIPELINE_EXPERIMENT = "sd-pipeline"


def repo_root() -> Path:
    """DVC's root while a stage runs (also inside `dvc exp run --temp`), else the git top level, else cwd."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip()).resolve()
    except (OSError, subprocess.CalledProcessError):
        return Path.cwd().resolve()


def enabled() -> bool:
    return os.environ.get("SDLIB_TRACKING", "on").lower() not in ("off", "0", "false")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "asimd", "sve")  # the kernels' code paths on x86 and ARM


def machine() -> dict[str, str | int]:
    """What the numbers were computed on: CPU model, its vector ISA, the kernel path torch takes, threads, versions.

    CPU kernels of different ISAs (AVX2, AVX-512) and thread counts round differently, so trained weights, and the
    metrics after them, match bit for bit only on the same kind of machine.
    """
    import platform

    import torch

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
    except OSError:  # not Linux
        pass
    return {"cpu": model, "isa": " ".join(f for f in ISA_FLAGS if f in flags),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__.split("+")[0],
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else ""}


def run_tags(stage: str) -> dict[str, str]:
    """Git commit, DVC experiment identity and the machine, so a row in the UI maps back to `dvc exp show`."""
    tags = {"stage": stage, "git_commit": _git_commit(), **{f"machine.{k}": str(v) for k, v in machine().items()}}
    for env, tag in (("DVC_EXP_NAME", "dvc_exp_name"), ("DVC_EXP_BASELINE_REV", "dvc_baseline_rev")):
        tags[tag] = os.environ.get(env, "workspace" if tag == "dvc_exp_name" else "")
    return tags


def _experiment(name: str) -> str:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = (repo_root() / "mlartifacts" / name).as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by a queued run: use theirs
        return mlflow.get_experiment_by_name(name).experiment_id


@contextlib.contextmanager
def stage_run(stage: str, params: dict) -> Iterator[object | None]:
    """An MLflow run for one stage, with its params and tags; yields the run (None when tracking is off)."""
    if not enabled():
        yield None
        return
    import mlflow

    exp_id = _experiment(STAGES_EXPERIMENT)
    run_name = f"{os.environ.get('DVC_EXP_NAME', 'workspace')}/{stage}"
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=run_tags(stage)) as run:
        mlflow.log_params({k: _param(v) for k, v in params.items()})
        yield run


def _param(v: object) -> object:
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    if not enabled():
        return
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_artifact(path: str | Path) -> None:
    if not enabled():
        return
    import mlflow

    if mlflow.active_run() is not None and Path(path).exists():
        mlflow.log_artifact(str(path))


def log_pipeline_run(params: dict, metrics: dict[str, float], artifacts: list[Path]) -> None:
    """The one comparison row per pipeline run: all params (flattened), final metrics, images and reports."""
    if not enabled():
        return
    import mlflow

    exp_id = _experiment(PIPELINE_EXPERIMENT)
    with mlflow.start_run(experiment_id=exp_id, run_name=os.environ.get("DVC_EXP_NAME", "workspace"),
                          tags=run_tags("pipeline")):
        mlflow.log_params({k: _param(v) for k, v in params.items()})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        for path in artifacts:
            if Path(path).exists():
                mlflow.log_artifact(str(path))
