"""The default pipeline's spread over training runs: what the regression gate must tolerate from one run to the next.

`evaluate` measures the spread over sampling seeds of one trained model (`fid_std`, ...). Another machine, another
training seed or another ISA trains other weights, which moves every metric further than that. This runs the whole
pipeline (`bench/pipeline.py --runner plain`, a fresh copy each time) once per case and writes
`reports/training_spread.json`, which `stages.regress` reads beside the baseline:

- `seed=K` for each `--seeds K`: the top-level `seed` alone varies (initialisation, batches and noise of the VAE, the
  classifier and the U-Net); `data.seed`, hence the test set, stays;
- `--avx2`: seed 0 on the AVX2 kernels of ATen, oneDNN and MKL, as a machine without AVX-512 rounds;
- `--plant KEY=VALUE`: a deliberately worse sampling setting (say `sample.steps=5`) that the gate must still catch;
  it re-samples and re-scores the workspace's trained models (those of the baseline), so it costs minutes, not a run.

The committed `--baseline` metrics count as the seed-0 run. Each case keeps its reports in `--work/<case>`, and a
case that finished is not run again, so a killed bench resumes where it stopped.

    python bench/seed_spread.py --seeds 1 --seeds 2 --avx2 --plant sample.steps=5   # 1-2 hours on a 2-core CPU
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml

from sdlib.evaluation.regress import RULES, spread_over_runs
from sdlib.io import atomic_path
from sdlib.tracking import machine

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from pipeline import apply_overrides  # noqa: E402  (bench/ is a folder of scripts, not a package)
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
GATED = tuple(RULES)

app = typer.Typer(add_completion=False)


def run_case(name: str, overrides: list[str], env: dict[str, str], work: Path) -> dict:
    """The metrics of one fresh pipeline run (read back from `work/name` when it already finished)."""
    out = work / name
    done = out / "metrics.json"
    if not done.exists():
        print(f"[seed_spread] {name}: {' '.join(overrides) or 'defaults'} {' '.join(env) or ''}", file=sys.stderr)
        cmd = [sys.executable, str(REPO / "bench" / "pipeline.py"), "--runner", "plain", "--save", str(out)]
        cmd += [arg for o in overrides for arg in ("--params-override", o)]
        timing = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, check=True, capture_output=True, text=True)
        (out / "timing.jsonl").write_text(timing.stdout)
    return kept(json.loads(done.read_text()))


def planted_case(overrides: list[str], work: Path) -> dict:
    """Sample and score the workspace's trained models with `overrides` applied to the sample section."""
    out = work / "planted"
    done = out / "metrics.json"
    if not done.exists():
        print(f"[seed_spread] planted: {' '.join(overrides)}", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        params = apply_overrides(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)
        (out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        p = str(out / "params.yaml")
        for cmd in (["stages.sample", "--params", p, "--unet", "models/unet", "--vae", "models/vae.safetensors",
                     "--out", str(out / "samples"), "--grid", str(out / "grid.png")],
                    ["stages.evaluate", "--params", p, "--samples", str(out / "samples"), "--data", "data/processed",
                     "--classifier", "models/classifier.safetensors", "--vae", "models/vae.safetensors",
                     "--out", str(done), "--confusion", str(out / "confusion.csv")]):
            subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, check=True, capture_output=True, text=True)
    return kept(json.loads(done.read_text()))


def kept(metrics: dict) -> dict:
    """What the gate reads of a run's metrics.json: the gated metrics, their spread over seed sets, the machine."""
    return {k: v for k, v in metrics.items() if k in GATED or k.removesuffix("_std") in GATED or k == "machine"}


@app.command()
def main(
    seeds: Annotated[list[int], typer.Option(help="training seeds to run besides the baseline's seed 0")] = [1, 2],
    avx2: Annotated[bool, typer.Option(help="also run seed 0 on the AVX2 kernels (ATen, oneDNN, MKL)")] = True,
    plant: Annotated[Optional[list[str]], typer.Option(
        help="KEY=VALUE of a worse recipe the gate must catch (repeatable: one run with all of them)")] = None,
    baseline: Annotated[Path, typer.Option(exists=True, help="the committed seed-0 metrics")] = Path(
        "reports/metrics.json"),
    work: Annotated[Path, typer.Option(help="each case's reports and log (a finished case is reused)")] = Path(
        "bench/out/seed_spread"),
    out: Annotated[Path, typer.Option(help="the spread the gate reads")] = Path("reports/training_spread.json"),
) -> None:
    """Run the default pipeline over training seeds (and on AVX2 kernels); write each metric's spread over runs."""
    runs = {"seed0": kept(json.loads(baseline.read_text()))}
    for s in seeds:
        runs[f"seed{s}"] = run_case(f"seed{s}", [f"seed={s}"], {}, work)
    if avx2:
        runs["seed0-avx2"] = run_case("seed0-avx2", [], AVX2_ENV, work)
    planted = {"overrides": plant, "metrics": planted_case(plant, work)} if plant else None
    result = {
        "about": "spread of the default pipeline's metrics over training runs (bench/seed_spread.py)",
        "bench_machine": machine(),
        "runs": runs,
        "spread": spread_over_runs(runs),
        "planted": planted,
    }
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    for name, s in result["spread"].items():
        print(f"{name:10s} mean {s['mean']:.4f}  std over {s['n']} runs {s['std']:.4f}  range {s['min']:.4f}..{s['max']:.4f}")


if __name__ == "__main__":
    app()
