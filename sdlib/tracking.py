"""MLflow tracking shared by all stages.

One absolute SQLite store under the repository root (`$DVC_ROOT/mlflow.db`), so workspace runs, `dvc exp run --temp`
and queued runs all land in the same place. Each stage logs its own run in the experiment `sd-stages`; `report`
logs the one row per pipeline run, in `sd-pipeline`, with every param of the run, the final metrics and the images.
Set `MLFLOW_TRACKING_URI` to use another server; `SDLIB_TRACKING=off` disables tracking.

Runs are named for what they are, `<stage> · <pipeline run> · <params changed>`, e.g. `train_unet · two-epochs ·
epochs=2` (the pipeline row leaves out the stage). The pipeline run is DVC's experiment name under `dvc exp run` (DVC
always sets one, a random `sappy-horn` unless `-n`), else the short git commit for `dvc repro` in the workspace; it is
also the tag `pipeline_run`, by which the UI groups a pipeline run's stages. The params named are those whose value
differs from the committed params.yaml: what `-S` set, or an edit not yet committed.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

import yaml

STAGES_EXPERIMENT = "sd-stages"
PIPELINE_EXPERIMENT = "sd-pipeline"
# MLflow 3's UI shows an experiment either as a GenAI app (traces, sessions, judges) or as model training (the runs
# table, metric charts); this experiment tag picks the second in the 3.x UIs that read it (see stages/ui.py).
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
PARAMS_FILE = "params.yaml"  # read from the stage's working directory, the repository root (or DVC's executor copy)
NAMED_PARAMS = 3  # changed params spelled out in a run name; more are counted


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


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def _git_commit() -> str:
    return (_git("rev-parse", "HEAD") or "unknown").strip()


def pipeline_run() -> str:
    """The pipeline run a stage belongs to: DVC's experiment name, else (`dvc repro`) the short git commit."""
    return os.environ.get("DVC_EXP_NAME") or (_git("rev-parse", "--short", "HEAD") or "workspace").strip()


def committed_params() -> dict[str, object]:
    """params.yaml as committed at HEAD, flattened like the logged params ('unet.lr'); {} outside git.

    Under `dvc exp run` HEAD is the experiment's baseline, also in `--temp` and queued runs, whose executor checks the
    baseline out and applies the experiment's changes on top without committing them.
    """
    try:
        raw = yaml.safe_load(_git("show", f"HEAD:./{PARAMS_FILE}") or "")
    except yaml.YAMLError:
        return {}
    return flat_params(raw) if isinstance(raw, dict) else {}


def flat_params(raw: dict, prefix: str = "") -> dict[str, object]:
    """params.yaml sections flattened as logged: {"unet": {"lr": ..}, "epochs": ..} -> {"unet.lr": .., "epochs": ..};
    nested sections (pretrained.sample) are dotted too, as `config.flatten` does."""
    flat: dict[str, object] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat |= flat_params(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def _same(a: object, b: object) -> bool:
    """Equal as logged: `1.0e-3` and `0.001`, `[1, 2]` and `(1, 2)`, `30` and DVC's `'30'` are the same value."""
    a, b = str(_param(a)), str(_param(b))
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def changed_params(params: dict, committed: dict) -> dict:
    """The params whose value differs from the committed params.yaml; keys it lacks (CLI-only options) are left out."""
    return {k: v for k, v in params.items() if k in committed and not _same(v, committed[k])}


def _short(value: object, width: int = 24) -> str:
    text = str(value)
    return text if len(text) <= width else text[:width - 1] + "…"


def run_name(stage: str | None, params: dict) -> str:
    """`<stage> · <pipeline run> · <changed params>`, e.g. `train_unet · two-epochs · epochs=2 unet.lr=0.0003`."""
    changed = [f"{k}={_short(_param(v))}" for k, v in changed_params(params, committed_params()).items()]
    if len(changed) > NAMED_PARAMS:
        changed = [*changed[:NAMED_PARAMS], f"+{len(changed) - NAMED_PARAMS} more"]
    return " · ".join([*([stage] if stage else []), pipeline_run(), *([" ".join(changed)] if changed else [])])


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
    """Git commit, DVC experiment identity, the pipeline run (to group by) and the machine, so a row in the UI maps
    back to `dvc exp show`."""
    tags = {"stage": stage, "pipeline_run": pipeline_run(), "git_commit": _git_commit(),
            **{f"machine.{k}": str(v) for k, v in machine().items()}}
    for env, tag in (("DVC_EXP_NAME", "dvc_exp_name"), ("DVC_EXP_BASELINE_REV", "dvc_baseline_rev")):
        tags[tag] = os.environ.get(env, "workspace" if tag == "dvc_exp_name" else "")
    return tags


def experiment(name: str) -> str:
    """The experiment's id, created with an absolute artifact location; tagged for the model-training view, also when
    an older store has it untagged (a kind set by hand is kept)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = (repo_root() / "mlartifacts" / name).as_uri()
        try:
            return client.create_experiment(name, artifact_location=location, tags={KIND_TAG: KIND})
        except Exception:  # created concurrently by a queued run: use theirs
            exp = client.get_experiment_by_name(name)
    if KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
    return exp.experiment_id


@contextlib.contextmanager
def stage_run(stage: str, params: dict) -> Iterator[object | None]:
    """An MLflow run for one stage, with its params and tags; yields the run (None when tracking is off)."""
    if not enabled():
        yield None
        return
    import mlflow

    exp_id = experiment(STAGES_EXPERIMENT)
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name(stage, params), tags=run_tags(stage)) as run:
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


def log_artifact(path: str | Path, folder: str | None = None) -> None:
    """Log a file to the active run's artifacts, in `folder` of them (None: at the top)."""
    if not enabled():
        return
    import mlflow

    if mlflow.active_run() is not None and Path(path).exists():
        mlflow.log_artifact(str(path), artifact_path=folder)


def log_pipeline_run(params: dict, metrics: dict[str, float], artifacts: list[Path]) -> None:
    """The one comparison row per pipeline run: all params (flattened), final metrics, images and reports."""
    if not enabled():
        return
    import mlflow

    exp_id = experiment(PIPELINE_EXPERIMENT)
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name(None, params), tags=run_tags("pipeline")):
        mlflow.log_params({k: _param(v) for k, v in params.items()})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        for path in artifacts:
            if Path(path).exists():
                mlflow.log_artifact(str(path))
