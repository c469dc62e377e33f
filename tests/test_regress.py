"""The metric regression gate fails on a planted regression and passes on noise-level changes."""
import json
import subprocess
import sys

import pytest

from sdlib.regress import regressions

# a baseline as evaluate writes it: each metric with its spread over seed sets
BASE = {"fid": 1.2, "fid_std": 0.06, "kid": 0.002, "kid_std": 0.004, "cond_acc": 0.99, "cond_acc_std": 0.004,
        "precision": 0.9, "precision_std": 0.012, "recall": 0.7, "recall_std": 0.02, "vae_psnr": 28.4,
        "vae_rfid": 0.4}


def regressed(current: dict, baseline: dict = BASE) -> list[str]:
    return [r["metric"] for r in regressions(current, baseline) if r["regressed"]]


def test_noise_level_changes_pass():
    # each change is within 3 standard deviations of a single seed set's value
    current = {**BASE, "fid": 1.35, "kid": 0.012, "cond_acc": 0.975, "precision": 0.87, "recall": 0.65,
               "vae_psnr": 28.0, "vae_rfid": 0.48}
    assert regressed(current) == []


@pytest.mark.parametrize("metric, value", [
    ("fid", 1.45), ("kid", 0.02), ("cond_acc", 0.95), ("precision", 0.85), ("recall", 0.62), ("vae_psnr", 27.5),
    ("vae_rfid", 0.6),
])
def test_planted_regressions_fail(metric, value):
    assert regressed({**BASE, metric: value}) == [metric]


def test_improvements_pass_and_tolerance_follows_the_spread():
    assert regressed({**BASE, "fid": 0.5, "cond_acc": 1.0, "vae_psnr": 35.0}) == []
    noisy = {**BASE, "fid_std": 0.3}  # a noisier baseline tolerates a larger change
    assert regressed({**BASE, "fid": 1.9}, noisy) == [] and regressed({**BASE, "fid": 2.2}, noisy) == ["fid"]
    no_spread = {k: v for k, v in BASE.items() if not k.endswith("_std")}  # floors: fid max(0.1, 5% of baseline)
    assert regressed({**BASE, "fid": 1.29}, no_spread) == [] and regressed({**BASE, "fid": 1.31}, no_spread) == ["fid"]


def test_a_one_epoch_model_is_a_regression():
    """What a deliberately degraded U-Net (`dvc exp run -S epochs=1`) measured: prompts ignored, digits blurry."""
    one_epoch = {"fid": 9.8, "kid": 0.15, "cond_acc": 0.11, "precision": 0.2, "recall": 0.1, "vae_psnr": 28.4,
                 "vae_rfid": 0.4}
    assert set(regressed(one_epoch)) == {"fid", "kid", "cond_acc", "precision", "recall"}


def test_cli_exit_codes(tmp_path):
    base, cur = tmp_path / "base.json", tmp_path / "cur.json"
    base.write_text(json.dumps(BASE))
    cur.write_text(json.dumps({**BASE, "fid": 12.0}))
    cmd = [sys.executable, "-m", "sdlib.regress", "--baseline", str(base), "--current", str(cur)]
    failed = subprocess.run(cmd, capture_output=True, text=True)
    assert failed.returncode == 1 and "REGRESSED" in failed.stdout
    cur.write_text(json.dumps(BASE))
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
