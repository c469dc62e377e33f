"""Wall time of each stage of `dvc repro`, run from scratch in a temporary copy of the repository.

The copy holds the source files git knows (tracked, plus new files that are not ignored) and the committed dvc.lock,
but no data, models, checkpoints or MLflow store, so every stage runs. `--params-override key=value` edits the copy's
params.yaml (dotted keys, YAML values) for a quick run. A stage's time runs from DVC's "Running stage 'x'" line to the
next one (or to the end), so it includes DVC's hashing and caching of that stage's outputs. One JSON line per stage,
then one for the total, with the CPU seconds of every process it ran (`cpu_s`: with OMP_NUM_THREADS=1 about what
the run takes on one quiet core, however loaded the machine is); the default config takes about ten minutes on a
2-core CPU. `--preset NAME` runs a preset of configs/ (as `python -m stages.preset NAME` would) in the copy.

`--runner plain` runs each stage's `cmd` from dvc.yaml in dependency order instead, for a machine without DVC (the
lent GPU machines; see bench/gpu.sh); `--save DIR` keeps the run's reports and log.

    python bench/pipeline.py
    python bench/pipeline.py --params-override epochs=1 --params-override vae.epochs=1 --params-override data.limit=600
    python bench/pipeline.py --runner plain --save out/reports
    OMP_NUM_THREADS=1 python bench/pipeline.py --preset openmoji --save out/openmoji
"""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml

from sdlib.cli import user_errors
from sdlib.errors import ConfigError
from sdlib.presets import merged, parse_overrides, read_preset, set_params

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = ("data/", "models/", "checkpoints/", "mlruns/", "mlartifacts/", "mlflow.db", "dvc.lock")  # not copied
RUNNING = re.compile(r"^Running stage '([^']+)'")

app = typer.Typer(add_completion=False)


class Runner(str, Enum):
    dvc = "dvc"
    plain = "plain"


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def source_files() -> list[str]:
    """The files git knows (tracked, and new ones that are not ignored); without git or a checkout (a bare copy of the
    tree, as on a lent GPU machine), every file outside the outputs and hidden folders (.git, .venv, .dvc/cache)."""
    try:
        return git("ls-files", "--cached", "--others", "--exclude-standard").splitlines()
    except (OSError, subprocess.CalledProcessError):
        return [str(f.relative_to(REPO)) for f in REPO.rglob("*")
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(REPO).parts[:-1])
                and "__pycache__" not in f.parts]


def copy_repo(dst: Path, with_lock: bool = True) -> None:
    """Source files of the working tree and (for DVC) the committed dvc.lock; no outputs."""
    for f in source_files():
        if (REPO / f).is_file() and not f.startswith(OUTPUTS):
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dst / f)
    if with_lock:
        (dst / "dvc.lock").write_text(git("show", "HEAD:dvc.lock"))


def apply_overrides(params: dict, overrides: list[str], preset: str | None = None) -> dict:
    """`a.b=value` sets params['a']['b'] to the YAML value; the key must already exist (catches typos). A preset
    (configs/NAME.yaml) applies first, validated as `python -m stages.preset` validates it."""
    if preset:
        params = merged(params, read_preset(REPO, preset), "--preset")
    return set_params(params, parse_overrides(overrides))


def init_project(dst: Path, overrides: list[str], runner: Runner, preset: str | None = None) -> None:
    copy_repo(dst, with_lock=runner == Runner.dvc)
    params = apply_overrides(yaml.safe_load((dst / "params.yaml").read_text()), overrides, preset)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if runner == Runner.plain:
        return
    git("init", "-q", cwd=dst)  # DVC wants a git repository
    git("-c", "user.name=bench", "-c", "user.email=bench@localhost", "add", "-A", cwd=dst)
    git("-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench", cwd=dst)


def stage_env() -> dict[str, str]:
    """The stages' environment: this Python first on PATH (their `python -m ...` is this one), unbuffered output."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONUNBUFFERED": "1"}


def stage_order(dvc_yaml: dict) -> list[tuple[str, str]]:
    """(name, cmd) of every stage, each after the stages whose outputs it reads (file order where free)."""
    stages = dvc_yaml["stages"]

    def paths(entries: list) -> list[str]:
        return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]

    producer = {out: name for name, st in stages.items()
                for out in paths(st.get("outs")) + paths(st.get("metrics")) + paths(st.get("plots"))}
    needs = {name: {producer[o] for d in paths(st.get("deps")) for o in producer
                    if (d == o or d.startswith(o.rstrip("/") + "/")) and producer[o] != name}
             for name, st in stages.items()}
    order: list[str] = []
    while len(order) < len(stages):
        ready = [n for n in stages if n not in order and needs[n] <= set(order)]
        if not ready:
            raise ConfigError(f"dvc.yaml: the stages {sorted(set(stages) - set(order))} depend on each other")
        order.append(ready[0])
    return [(n, " ".join(str(stages[n]["cmd"]).split())) for n in order]


def timed_plain(project: Path, log: Path) -> tuple[list[tuple[str, float]], float]:
    """Run each stage's command of dvc.yaml in order without DVC (for machines without it); as `timed_repro`."""
    env = stage_env()
    starts: list[tuple[str, float]] = []
    t0 = time.perf_counter()
    with open(log, "w") as out:
        for name, cmd in stage_order(yaml.safe_load((project / "dvc.yaml").read_text())):
            now = time.perf_counter() - t0
            starts.append((name, now))
            print(f"[{now:7.1f}s] {name}", file=sys.stderr)
            out.write(f"[{now:8.1f}s] Running stage '{name}':\n> {cmd}\n")
            out.flush()
            done = subprocess.run(cmd, shell=True, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
                raise SystemExit(f"error: stage {name} failed (exit {done.returncode}); last lines of {log}:\n{tail}")
    return starts, time.perf_counter() - t0


def timed_repro(project: Path, log: Path, cmd: tuple[str, ...] = ("dvc", "repro"),
                mode: str = "w") -> tuple[list[tuple[str, float]], float]:
    """Run `dvc repro` (or another DVC command that runs stages), echoing its output to `log`; returns
    ([(stage, start offset)], total seconds)."""
    env = {**stage_env(), "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # runs land in the copy's own mlflow.db
    starts: list[tuple[str, float]] = []
    t0 = time.perf_counter()
    with open(log, mode) as out, subprocess.Popen(list(cmd), cwd=project, env=env, stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        out.write(f"$ {' '.join(cmd)}\n")
        for line in proc.stdout:
            now = time.perf_counter() - t0
            out.write(f"[{now:8.1f}s] {line}")
            if m := RUNNING.match(line):
                starts.append((m.group(1), now))
                print(f"[{now:7.1f}s] {m.group(1)}", file=sys.stderr)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"error: {' '.join(cmd[:3])} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    return starts, total


def stage_seconds(starts: list[tuple[str, float]], total: float) -> list[tuple[str, float, float]]:
    """(stage, start offset, seconds) of each stage: a stage runs until the next one starts, the last to the end."""
    ends = [t for _, t in starts[1:]] + [total]
    return [(stage, start, end - start) for (stage, start), end in zip(starts, ends)]


def save_reports(project: Path, log: Path, dst: Path, since: float) -> None:
    """The files this run wrote in reports/ (JSON, CSV, Markdown, PNG; not the sample images) and the log.

    Files that came with the copy (say the committed sampler comparison) keep their old times and are left out."""
    dst.mkdir(parents=True, exist_ok=True)
    reports = project / "reports"
    for f in sorted(reports.rglob("*")) if reports.is_dir() else []:
        rel = f.relative_to(reports)
        if f.is_file() and rel.parts[0] != "samples" and f.stat().st_mtime >= since:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst / rel)
    if log.exists():
        shutil.copy2(log, dst / "pipeline.log")


@app.command()
def main(
    params_override: Annotated[Optional[list[str]], typer.Option(
        "--params-override", help="key=value for the copy's params.yaml, e.g. epochs=1 (repeatable)")] = None,
    runner: Annotated[Runner, typer.Option(
        help="dvc: `dvc repro`; plain: each stage's cmd from dvc.yaml in order, for machines without DVC")] = "dvc",
    save: Annotated[Optional[Path], typer.Option(
        help="copy the run's reports (metrics, report.md, figures; not the samples) and log into this folder")] = None,
    keep: Annotated[bool, typer.Option("--keep/--clean", help="keep the temporary copy (path on stderr)")] = False,
    workdir: Annotated[Optional[Path], typer.Option(help="where to make the temporary copy")] = None,
    preset: Annotated[Optional[str], typer.Option(
        help="run a preset of configs/ (e.g. openmoji); --params-override values go on top")] = None,
) -> None:
    """Time every stage of `dvc repro` in a fresh copy of the repository; one JSON line per stage and a total."""
    overrides = params_override or []
    tmp = Path(tempfile.mkdtemp(prefix="sdlib-pipeline-", dir=workdir))
    try:
        project = tmp / "project"
        project.mkdir()
        with user_errors():
            init_project(project, overrides, runner, preset)
        since = time.time()
        try:
            starts, total = (timed_repro if runner == Runner.dvc else timed_plain)(project, tmp / "repro.log")
        finally:
            if save:
                save_reports(project, tmp / "repro.log", save, since)
    finally:
        if keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    common = {"bench": "pipeline", "runner": runner.value, "preset": preset, "overrides": overrides}
    for stage, start, seconds in stage_seconds(starts, total):
        print(json.dumps({**common, "stage": stage, "start_s": round(start, 2), "seconds": round(seconds, 2)}))
    print(json.dumps({**common, "stage": "total", "stages": len(starts), "seconds": round(total, 2),
                      "cpu_s": round(cpu.ru_utime + cpu.ru_stime, 1),
                      "dvc_startup_s": round(starts[0][1], 2) if starts and runner == Runner.dvc else None}))


if __name__ == "__main__":
    app()
