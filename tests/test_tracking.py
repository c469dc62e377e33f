"""MLflow tracking: stage runs and the one pipeline row, with flattened params, metrics, tags and artifacts."""
import mlflow

from sdlib import tracking


def test_stage_and_pipeline_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("SDLIB_TRACKING", "on")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_EXP_NAME", "my-exp")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"

    with tracking.stage_run("train_unet", {"unet.lr": 1e-3, "unet.channel_mult": [1, 2]}):
        tracking.log_metrics({"loss": 0.5}, step=1)
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"png")
    tracking.log_pipeline_run({"epochs": 3, "unet.lr": 1e-3}, {"fid": 1.5, "note": "skipped"}, [grid])

    client = mlflow.MlflowClient(tracking.tracking_uri())
    stage = client.search_runs([client.get_experiment_by_name(tracking.STAGES_EXPERIMENT).experiment_id])[0]
    assert stage.data.params == {"unet.lr": "0.001", "unet.channel_mult": "1,2"}
    assert stage.data.tags["stage"] == "train_unet" and stage.data.tags["dvc_exp_name"] == "my-exp"
    row = client.search_runs([client.get_experiment_by_name(tracking.PIPELINE_EXPERIMENT).experiment_id])[0]
    assert row.info.run_name == "my-exp" and row.data.metrics == {"fid": 1.5}
    assert row.data.params["epochs"] == "3" and "git_commit" in row.data.tags
    assert [a.path for a in client.list_artifacts(row.info.run_id)] == ["grid.png"]
    assert client.get_experiment_by_name(tracking.PIPELINE_EXPERIMENT).artifact_location.startswith("file://")


def test_tracking_off_logs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    with tracking.stage_run("x", {"a": 1}) as run:
        tracking.log_metrics({"m": 1.0})
    assert run is None and not (tmp_path / "mlflow.db").exists()
