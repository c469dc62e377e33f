"""The report stage: reports/report.md with the numbers, their spread and the pictures; the pipeline's MLflow row."""
import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdlib import tracking
from sdlib.evaluation.report import confusion_table
from stages.report import app

runner = CliRunner()
METRICS = {"fid": 1.25, "fid_std": 0.05, "fid_floor": 0.9, "fid_floor_std": 0.02, "kid": 0.001, "kid_std": 0.002,
           "precision": 0.9, "precision_std": 0.01, "recall": 0.7, "recall_std": 0.02, "cond_acc": 0.99,
           "cond_acc_std": 0.004, "cond_acc_per_class.eight": 0.98, "vae_psnr": 28.4, "vae_rfid": 0.5,
           "n_samples": 500, "n_seed_sets": 3}


@pytest.fixture
def reports(tmp_path, monkeypatch, params_file):
    monkeypatch.chdir(tmp_path)
    logged = {}
    monkeypatch.setattr(tracking, "log_pipeline_run",
                        lambda params, metrics, artifacts: logged.update(params=params, metrics=metrics,
                                                                         artifacts=artifacts))
    r = Path("reports")
    (r / "curves").mkdir(parents=True)
    (r / "figures").mkdir()
    (r / "metrics.json").write_text(json.dumps(METRICS))
    (r / "train_vae.json").write_text(json.dumps({"psnr": 28.4, "note": "text is skipped"}))
    pd.DataFrame({"actual": ["eight", "eight", "three"], "predicted": ["eight", "three", "three"]}).to_csv(
        r / "confusion.csv", index=False)
    pd.DataFrame({"epoch": [1, 2, 3], "loss": [0.9, 0.3, 0.2]}).to_csv(r / "curves" / "unet.csv", index=False)
    pd.DataFrame({"epoch": [1, 2], "loss": [0.4, 0.1], "rec": [0.4, 0.1]}).to_csv(r / "curves" / "vae.csv",
                                                                                  index=False)
    for name in ("grid.png", "figures/forward.png", "figures/attention.png"):  # reverse.png missing: skipped
        Image.new("L", (8, 8)).save(r / name)
    return {"params": params_file(sample={"sampler": "heun", "steps": 20, "guidance": 3.0}), "logged": logged}


def test_report_shows_numbers_with_spread_and_pictures(reports):
    result = runner.invoke(app, ["--params", str(reports["params"])])
    assert result.exit_code == 0, result.output
    text = Path("reports/report.md").read_text()
    assert "| FID | 1.250 ± 0.050 |" in text and "| FID floor | 0.900 ± 0.020 |" in text
    assert "| reconstruction PSNR | 28.40 dB |" in text and "Inception FID" not in text
    assert "mean over 3 disjoint seed set(s) of 500 samples" in text and "Sampler `heun`, 20 steps" in text
    assert "| train_vae | psnr | 28.4 |" in text and "note" not in text
    links = [line[line.index("](") + 2:-1] for line in text.splitlines() if line.startswith("![")]
    assert links == ["grid.png", "curves.png", "figures/forward.png", "figures/attention.png"]
    assert all((Path("reports") / link).is_file() for link in links)
    with Image.open("reports/curves.png") as im:
        assert im.width > 400

    logged = reports["logged"]
    assert logged["params"]["seed"] == 0 and logged["params"]["sample.sampler"] == "heun"
    assert logged["metrics"]["train_vae.psnr"] == 28.4 and "train_vae.note" not in logged["metrics"]
    assert logged["metrics"]["fid"] == 1.25 and "metrics.fid" not in logged["metrics"]
    assert {Path(p).name for p in logged["artifacts"]} == {"metrics.json", "confusion.csv", "report.md", "grid.png",
                                                           "curves.png", "forward.png", "attention.png", "unet.csv",
                                                           "vae.csv"}


def test_report_needs_the_metrics(reports):
    Path("reports/metrics.json").unlink()
    result = runner.invoke(app, ["--params", str(reports["params"])])
    assert result.exit_code == 2 and "run the evaluate stage first" in result.output
    assert not Path("reports/report.md").exists() and not reports["logged"]


def test_confusion_table_fills_missing_pairs():
    table = confusion_table(pd.DataFrame({"actual": ["a", "a", "b"], "predicted": ["a", "c", "b"]}))
    assert table[0] == "| prompted \\ seen | a | b | c |"
    assert table[2:] == ["| a | 1 | 0 | 1 |", "| b | 0 | 1 | 0 |", "| c | 0 | 0 | 0 |"]
