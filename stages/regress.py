"""The metric regression gate as a command: exit 1 with a table when reports/metrics.json got worse than a baseline
(by default the one committed on main) beyond its tolerance; see sdlib.evaluation.regress for the rules.

    python -m stages.regress [--baseline REV_OR_PATH] [--current reports/metrics.json] [--spread REV_OR_PATH]
    make regress                                          # the same, against main
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sdlib.cli import user_errors
from sdlib.errors import DataError
from sdlib.evaluation.regress import (K_STD, RULES, comparable, describe_machine, read_baseline, read_committed,
                                      regressions)

app = typer.Typer(add_completion=False)
SPREAD = "reports/training_spread.json"


@app.command()
def main(
    baseline: Annotated[str, typer.Option(help="git revision or metrics file to compare against")] = "main",
    current: Annotated[Path, typer.Option(help="metrics file of this run")] = Path("reports/metrics.json"),
    spread: Annotated[str, typer.Option(
        help="git revision or file of the recipe's spread over training runs (default: the --baseline revision's "
             "reports/training_spread.json; none for a --baseline file)")] = "",
) -> None:
    """Exit 1 with a table if any gated metric regressed beyond its tolerance."""
    with user_errors():
        if not current.is_file():
            raise DataError(f"{current}: not found (run `dvc repro` first)")
        committed = str(current) if not current.is_absolute() else "reports/metrics.json"  # its path inside the repo
        now, base = json.loads(current.read_text()), read_baseline(baseline, committed)
        runs = read_committed(spread, SPREAD) if spread else (
            None if Path(baseline).is_file() else read_committed(baseline, SPREAD))
        rows = regressions(now, base, training=runs and runs["spread"])
    if now.get("machine") != base.get("machine"):  # other kernels round differently: say where each was made
        for name, metrics in (("baseline", base), ("current", now)):
            print(f"{name} machine: {describe_machine(metrics.get('machine'))}")
    if runs:
        n = max(s["n"] for s in runs["spread"].values())
        print(f"tolerance: the largest of the floor, {K_STD:g} x the baseline's std over seed sets and {K_STD:g} x "
              f"sqrt(2) x the std over {n} training runs ({', '.join(runs['runs'])}; {SPREAD})")
    else:
        print(f"tolerance: the largest of the floor and {K_STD:g} x the baseline's std over seed sets (no {SPREAD})")
    if any(RULES[r["metric"]].trials for r in rows):
        print(f"  retrieval: or {K_STD:g} x sqrt(2) x its binomial standard error sqrt(p(1-p)/N), p pooled over both")
    width = max([10, *(len(r["metric"]) for r in rows)])
    print(f"{'metric':<{width}} {'baseline':>10} {'current':>10} {'worse by':>10} {'tolerance':>10}  verdict")
    for r in rows:
        verdict = "REGRESSED" if r["regressed"] else "ok"
        print(f"{r['metric']:<{width}} {r['baseline']:>10.4g} {r['current']:>10.4g} {r['worse_by']:>10.4g} "
              f"{r['tolerance']:>10.4g}  {verdict}")
    one_sided = [name for name in RULES if (name in now) != (name in base)]  # e.g. vae_psnr: pixel space has none
    if one_sided:
        print(f"not compared (in one file only): {', '.join(one_sided)}")
    unlike = [f"{name} ({', '.join(k for k in rule.same if now.get(k) != base.get(k))} differ)"
              for name, rule in RULES.items() if name in now and name in base and not comparable(rule, now, base)]
    if unlike:
        print(f"not compared (measured differently): {', '.join(unlike)}")
    if any(r["regressed"] for r in rows):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
