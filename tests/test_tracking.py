"""MLflow tracking: stage runs and the one pipeline row, with flattened params, metrics, tags and artifacts; experiments
that open in the UI's model-training view; run names that say what a run is."""
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml
from typer.testing import CliRunner

from sdlib import config, tracking
from stages import ui

REPO = Path(__file__).resolve().parents[1]
COMMITTED = {"seed": 0, "epochs": 30, "unet": {"lr": "1e-3", "channel_mult": [1, 2], "skip": "concat"}}


def git(cwd: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def store(tmp_path, monkeypatch):
    """Tracking on, into tmp_path/mlflow.db, from a git checkout in tmp_path whose params.yaml commits COMMITTED."""
    monkeypatch.setenv("SDLIB_TRACKING", "on")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    git(tmp_path, "init", "-q")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(COMMITTED))
    git(tmp_path, "add", "params.yaml")
    git(tmp_path, "commit", "-qm", "params")
    return tmp_path


def client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking.tracking_uri())


def only_run(experiment: str):
    (run,) = client().search_runs([client().get_experiment_by_name(experiment).experiment_id])
    return run


def test_stage_and_pipeline_runs(store, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "my-exp")
    assert tracking.tracking_uri() == f"sqlite:///{store / 'mlflow.db'}"

    with tracking.stage_run("train_unet", {"unet.lr": 1e-3, "unet.channel_mult": [1, 2], "epochs": 3}):
        tracking.log_metrics({"loss": 0.5}, step=1)
    grid = store / "grid.png"
    grid.write_bytes(b"png")
    tracking.log_pipeline_run({"epochs": 3, "unet.lr": 1e-3}, {"fid": 1.5, "note": "skipped"}, [grid])

    stage = only_run(tracking.STAGES_EXPERIMENT)
    assert stage.data.params == {"unet.lr": "0.001", "unet.channel_mult": "1,2", "epochs": "3"}
    assert stage.data.tags["stage"] == "train_unet" and stage.data.tags["dvc_exp_name"] == "my-exp"
    assert stage.info.run_name == "train_unet · my-exp · epochs=3"
    row = only_run(tracking.PIPELINE_EXPERIMENT)
    assert row.info.run_name == "my-exp · epochs=3" and row.data.metrics == {"fid": 1.5}
    assert row.data.params["epochs"] == "3" and "git_commit" in row.data.tags
    assert stage.data.tags["pipeline_run"] == row.data.tags["pipeline_run"] == "my-exp"  # the UI groups by it
    assert [a.path for a in client().list_artifacts(row.info.run_id)] == ["grid.png"]
    for name in (tracking.STAGES_EXPERIMENT, tracking.PIPELINE_EXPERIMENT):
        exp = client().get_experiment_by_name(name)
        assert exp.artifact_location.startswith("file://")
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_workspace_run_is_named_by_commit_and_changed_params(store):
    """`dvc repro` sets no experiment name: the short commit stands in; params differing from the committed file
    are named, whatever their spelling (DVC's `-S` writes strings), the equal ones not."""
    params = {"seed": 0, "epochs": "30", "unet.lr": 3e-4, "unet.channel_mult": (1, 2), "unet.skip": "add",
              "unet.heads": 8}  # unet.heads is not in the committed file: left out
    with tracking.stage_run("train_unet", params):
        pass
    short = git(store, "rev-parse", "--short", "HEAD")
    run = only_run(tracking.STAGES_EXPERIMENT)
    assert run.info.run_name == f"train_unet · {short} · unet.lr=0.0003 unet.skip=add"
    assert run.data.tags["pipeline_run"] == short and run.data.tags["dvc_exp_name"] == "workspace"


def test_run_name_counts_what_it_leaves_out(store, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "e")
    params = {"seed": 1, "epochs": 2, "unet.lr": 0.5, "unet.channel_mult": [1, 2, 2, 4], "unet.skip": "a" * 40}
    assert tracking.run_name(None, params) == "e · seed=1 epochs=2 unet.lr=0.5 +2 more"
    assert tracking.run_name("x", {"unet.skip": "a" * 40}) == f"x · e · unet.skip={'a' * 23}…"


def test_run_name_outside_git(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert tracking.run_name("sample", {"epochs": 3}) == "sample · workspace"


def test_the_repository_params_name_no_changes():
    """The validated params of the committed params.yaml equal its raw values: no false `changed` in a run's name."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    validated = config.flatten(config.load_all(REPO / "params.yaml"))
    assert tracking.flat_params(raw).keys() == validated.keys()
    assert tracking.changed_params(validated, tracking.flat_params(raw)) == {}


def test_existing_experiments_get_the_kind(store):
    """A store from before the tag: its experiment is tagged when next used; a kind chosen by hand is kept."""
    mlflow.set_tracking_uri(tracking.tracking_uri())
    old = mlflow.create_experiment(tracking.STAGES_EXPERIMENT)
    mine = mlflow.create_experiment(tracking.PIPELINE_EXPERIMENT, tags={"mlflow.experimentKind": "genai_development"})
    assert "mlflow.experimentKind" not in client().get_experiment(old).tags
    assert tracking.experiment(tracking.STAGES_EXPERIMENT) == old
    assert tracking.experiment(tracking.PIPELINE_EXPERIMENT) == mine
    assert client().get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client().get_experiment(mine).tags["mlflow.experimentKind"] == "genai_development"


def test_make_ui_links_to_the_runs_tables(store, monkeypatch):
    execs = []
    monkeypatch.setattr(ui.os, "execvp", lambda *args: execs.append(args))
    result = CliRunner().invoke(ui.app, ["--port", "5001"])
    assert result.exit_code == 0, result.output
    ids = {name: client().get_experiment_by_name(name).experiment_id
           for name in (tracking.PIPELINE_EXPERIMENT, tracking.STAGES_EXPERIMENT)}
    assert result.output.splitlines()[-2:] == [  # after MLflow's log of creating the store
        f"{name}: http://127.0.0.1:5001/#/experiments/{ids[name]}/runs?workflowType=machine_learning" for name in ids]
    assert all(client().get_experiment(i).tags["mlflow.experimentKind"] == "custom_model_development"
               for i in ids.values())
    assert execs == [("mlflow", ["mlflow", "ui", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                                 "--host", "127.0.0.1", "--port", "5001"])]


def test_tracking_off_logs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    with tracking.stage_run("x", {"a": 1}) as run:
        tracking.log_metrics({"m": 1.0})
    assert run is None and not (tmp_path / "mlflow.db").exists()
