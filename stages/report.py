"""Write reports/report.md (the run's numbers and pictures on one page) and log the pipeline run's comparison row to
MLflow: all params flattened, every stage's final metrics, and the images and reports as artifacts."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from sdlib import config, tracking
from sdlib.cli import user_errors, wrote
from sdlib.errors import DataError
from sdlib.evaluation.report import curves_figure, render
from sdlib.io import atomic_path, write_text

app = typer.Typer(add_completion=False)


def stage_reports(reports: Path, exclude: Path) -> dict[str, dict[str, float]]:
    """The numbers in the stages' reports/*.json files other than `exclude`, by file stem."""
    found = {}
    for f in sorted(reports.glob("*.json")):
        if f.resolve() == exclude.resolve():
            continue
        try:
            values = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            print(f"warning: skipping unreadable {f}", file=sys.stderr)
            continue
        if isinstance(values, dict):
            found[f.stem] = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return found


@app.command()
def main(
    params: Annotated[Path, typer.Option(help="params.yaml (all of it is logged with the run)")] = Path("params.yaml"),
    metrics: Annotated[Path, typer.Option(help="evaluate's metrics JSON")] = Path("reports/metrics.json"),
    confusion: Annotated[Path, typer.Option(help="evaluate's actual,predicted CSV")] = Path("reports/confusion.csv"),
    reports: Annotated[Path, typer.Option(help="folder of the stages' *.json reports, curves/*.csv, grid, figures")] = Path("reports"),
    out: Annotated[Path, typer.Option(help="the Markdown report to write")] = Path("reports/report.md"),
    curves_png: Annotated[Path, typer.Option(help="training curves picture to write")] = Path("reports/curves.png"),
) -> None:
    """Write the run's report (Markdown + training-curve picture) and log the pipeline run to MLflow."""
    with user_errors():
        run_params = config.flatten(config.load_all(params))
        if not metrics.is_file():
            raise DataError(f"{metrics}: not found (run the evaluate stage first)")
        try:
            values = json.loads(metrics.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{metrics}: not valid JSON ({e})") from None
        table = pd.read_csv(confusion, dtype=str) if confusion.is_file() else pd.DataFrame(columns=["actual", "predicted"])
        stages = stage_reports(reports, metrics)
        curves = {f.stem: pd.read_csv(f) for f in sorted(reports.glob("curves/*.csv"))}
        curves = {name: df for name, df in curves.items() if not df.empty}  # train_vae trains nothing in pixel space

        if curves:
            with atomic_path(curves_png) as tmp:
                curves_figure(tmp, curves)
        images = [reports / "grid.png", curves_png, *sorted(reports.glob("figures/*.png")),
                  reports / "retrieval" / "grid.png"]
        title = f"Run report: {os.environ.get('DVC_EXP_NAME') or 'workspace'}"
        write_text(out, render(metrics=values, stages=stages, params=run_params, confusion=table,
                               report_dir=out.parent, images=images, title=title))

        logged = {**{f"{stage}.{k}": v for stage, kv in stages.items() for k, v in kv.items()}, **values}
        artifacts = [metrics, confusion, out, *images, *sorted(reports.glob("curves/*.csv"))]
        tracking.log_pipeline_run(run_params, logged, [p for p in artifacts if p.exists()])
        wrote(out, *([curves_png] if curves else []))


if __name__ == "__main__":
    app()
