"""The MLflow UI on the project's store, with links that open the runs tables where pipeline runs are compared.

    python -m stages.ui [--host 127.0.0.1] [--port 5000]      # or: make ui

MLflow 3's UI shows an experiment either as a GenAI app (traces, sessions, judges) or as model training (the runs
table, metric charts). Its earlier UIs chose by the experiment tag `mlflow.experimentKind`, which every experiment here
carries as `custom_model_development` (sdlib.tracking.experiment). MLflow 3.17's UI has that code path behind a flag
now on: a sidebar switch (GenAI | Model training) chooses for all experiments, the browser remembers it
(localStorage `mlflow.workflowType`, GenAI at first), and a link's `?workflowType=machine_learning` overrides it; so
the links printed here carry that parameter (as read in mlflow/server/js/build/static/js/main.*.js of mlflow 3.17.2).
"""
from __future__ import annotations

import os
from typing import Annotated

import typer

from sdlib import tracking

app = typer.Typer(add_completion=False)
WORKFLOW = "machine_learning"  # the UI's model-training view


def runs_table_links(base_url: str) -> dict[str, str]:
    """The runs table of each project experiment in the model-training view; creates or tags the experiments."""
    return {name: f"{base_url}/#/experiments/{tracking.experiment(name)}/runs?workflowType={WORKFLOW}"
            for name in (tracking.PIPELINE_EXPERIMENT, tracking.STAGES_EXPERIMENT)}


@app.command()
def main(
    host: Annotated[str, typer.Option(help="address to serve on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to serve on")] = 5000,
) -> None:
    """Print links to the runs tables of `sd-pipeline` (one row per pipeline run) and `sd-stages`, then run `mlflow ui`
    on the project's store."""
    for name, url in runs_table_links(f"http://{host}:{port}").items():
        print(f"{name}: {url}")
    os.execvp("mlflow", ["mlflow", "ui", "--backend-store-uri", tracking.tracking_uri(), "--host", host,
                         "--port", str(port)])


if __name__ == "__main__":
    app()
