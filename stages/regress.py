"""The metric regression gate as a command: exit 1 with a table when reports/metrics.json got worse than a baseline
(by default the one committed on main) beyond its tolerance; see sdlib.evaluation.regress for the rules.

    python -m stages.regress [--baseline REV_OR_PATH] [--current reports/metrics.json]   # or: make regress
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sdlib.cli import user_errors
from sdlib.errors import DataError
from sdlib.evaluation.regress import describe_machine, read_baseline, regressions

app = typer.Typer(add_completion=False)


@app.command()
def main(
    baseline: Annotated[str, typer.Option(help="git revision or metrics file to compare against")] = "main",
    current: Annotated[Path, typer.Option(help="metrics file of this run")] = Path("reports/metrics.json"),
) -> None:
    """Exit 1 with a table if any gated metric regressed beyond its tolerance."""
    with user_errors():
        if not current.is_file():
            raise DataError(f"{current}: not found (run `dvc repro` first)")
        committed = str(current) if not current.is_absolute() else "reports/metrics.json"  # its path inside the repo
        now, base = json.loads(current.read_text()), read_baseline(baseline, committed)
        rows = regressions(now, base)
    if now.get("machine") != base.get("machine"):  # other kernels round differently: say where each was made
        for name, metrics in (("baseline", base), ("current", now)):
            print(f"{name} machine: {describe_machine(metrics.get('machine'))}")
    print(f"{'metric':<10} {'baseline':>10} {'current':>10} {'worse by':>10} {'tolerance':>10}  verdict")
    for r in rows:
        verdict = "REGRESSED" if r["regressed"] else "ok"
        print(f"{r['metric']:<10} {r['baseline']:>10.4g} {r['current']:>10.4g} {r['worse_by']:>10.4g} "
              f"{r['tolerance']:>10.4g}  {verdict}")
    if any(r["regressed"] for r in rows):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
