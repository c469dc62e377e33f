"""The metric regression gate fails on a planted regression and passes on noise-level changes."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from sdlib.evaluation.regress import regressions, spread_over_runs

# the default run's reports/metrics.json (2026-11-26): each metric with its spread over 3 seed sets of 500 samples
BASE = {"fid": 1.2643, "fid_std": 0.040876, "kid": 0.001613, "kid_std": 0.00053315, "cond_acc": 0.99667,
        "cond_acc_std": 0.0011547, "precision": 0.88867, "precision_std": 0.0075719, "recall": 0.65,
        "recall_std": 0.047624, "vae_psnr": 28.472, "vae_rfid": 0.60726}


def regressed(current: dict, baseline: dict = BASE, training: dict | None = None) -> list[str]:
    return [r["metric"] for r in regressions(current, baseline, training=training) if r["regressed"]]


def test_noise_level_changes_pass():
    # each change is within its tolerance: 3 standard deviations of a single seed set's value, or the metric's floor
    current = {**BASE, "fid": 1.35, "kid": 0.008, "cond_acc": 0.985, "precision": 0.87, "recall": 0.55,
               "vae_psnr": 28.1, "vae_rfid": 0.7}
    assert regressed(current) == []


@pytest.mark.parametrize("metric, value", [
    ("fid", 1.45), ("kid", 0.015), ("cond_acc", 0.97), ("precision", 0.85), ("recall", 0.49), ("vae_psnr", 27.9),
    ("vae_rfid", 0.8),
])
def test_planted_regressions_fail(metric, value):
    assert regressed({**BASE, metric: value}) == [metric]


def test_improvements_pass_and_tolerance_follows_the_spread():
    assert regressed({**BASE, "fid": 0.9, "cond_acc": 1.0, "vae_psnr": 35.0}) == []
    noisy = {**BASE, "fid_std": 0.3}  # a noisier baseline tolerates a larger change: 3 x 0.3
    assert regressed({**BASE, "fid": 2.06}, noisy) == [] and regressed({**BASE, "fid": 2.2}, noisy) == ["fid"]
    no_spread = {k: v for k, v in BASE.items() if not k.endswith("_std")}  # floors: fid max(0.1, 5% of baseline)
    assert regressed({**BASE, "fid": 1.36}, no_spread) == [] and regressed({**BASE, "fid": 1.37}, no_spread) == ["fid"]


def test_tolerance_covers_the_spread_over_training_runs():
    # two independent runs differ by sqrt(2) x the std of one run: the band is 3 x sqrt(2) x 0.1 = 0.424 above 1.2643
    training = {"fid": {"std": 0.1, "n": 4}}
    assert regressed({**BASE, "fid": 1.68}, training=training) == []
    assert regressed({**BASE, "fid": 1.70}, training=training) == ["fid"]
    assert regressed({**BASE, "fid": 1.70}) == ["fid"]  # without it, the sampling spread alone: 3 x 0.0409
    tiny = {"fid": {"std": 0.001, "n": 4}}  # a spread below the seed-set one does not narrow the band
    assert regressed({**BASE, "fid": 1.38}, training=tiny) == []


def test_a_one_epoch_model_is_a_regression():
    """What `dvc exp run --temp -S epochs=1` measured on 2026-11-26: prompts ignored, digits unformed."""
    one_epoch = {"fid": 50.371, "fid_std": 0.80346, "kid": 1.2006, "cond_acc": 0.1, "precision": 0.34467,
                 "recall": 0.029333, "vae_psnr": 28.472, "vae_rfid": 0.60726}
    assert regressed(one_epoch) == ["fid", "kid", "cond_acc", "precision", "recall"]


# an OpenMoji preset's retrieval (README): top-1 0.050 and top-5 0.173 over 300 test captions
RETRIEVAL = {"retrieval_top1": 0.05, "retrieval_top5": 0.17333, "retrieval_n": 300, "retrieval_space": "classifier"}


def test_retrieval_tolerance_is_the_binomial_spread_of_two_runs():
    """A top-k hit rate over N queries: the band is 3 x sqrt(2) x sqrt(p(1-p)/N), p pooled over both files."""
    from sdlib.evaluation.regress import RULES, tolerance

    base = {**BASE, **RETRIEVAL}
    p = (0.17333 + 0.1) / 2
    assert tolerance(RULES["retrieval_top5"], "retrieval_top5", base, current={"retrieval_top5": 0.1}) == \
        pytest.approx(3 * math.sqrt(2 * p * (1 - p) / 300))
    assert regressed({**base, "retrieval_top5": 0.1}, base) == []  # 22 fewer of 300 found: noise (band 0.084)
    assert regressed({**base, "retrieval_top5": 0.08}, base) == ["retrieval_top5"]  # 28 fewer: band 0.081
    assert regressed({**base, "retrieval_top1": 0.02}, base) == []  # 9 fewer of 15 found: band 0.045
    assert regressed({**base, "retrieval_top1": 0.0}, base) == ["retrieval_top1"]  # none found: band 0.038
    assert regressed({**base, "retrieval_top1": 0.3, "retrieval_top5": 0.6}, base) == []  # better
    fewer = {**base, "retrieval_n": 30}  # ten times fewer queries: a band sqrt(10) times wider
    assert regressed({**fewer, "retrieval_top5": 0.08}, fewer) == []


def test_retrieval_is_skipped_unless_both_files_measured_it_alike():
    base = {**BASE, **RETRIEVAL}
    none_found = {"retrieval_top1": 0.0, "retrieval_top5": 0.0}
    assert regressed({**BASE, **none_found}, BASE) == []  # the baseline has none (the digits): nothing to compare
    assert regressed(BASE, base) == []  # the current run has none
    for key, other in (("retrieval_space", "pixels"), ("retrieval_n", 100)):
        rows = regressions({**base, **none_found, key: other}, base)
        assert not any(r["metric"].startswith("retrieval") for r in rows), key  # another gallery: another chance


def test_cli_names_the_retrieval_metrics_it_could_not_compare(tmp_path):
    base, cur = tmp_path / "base.json", tmp_path / "cur.json"
    cmd = [sys.executable, "-m", "stages.regress", "--baseline", str(base), "--current", str(cur)]
    base.write_text(json.dumps({**BASE, **RETRIEVAL}))
    cur.write_text(json.dumps({**BASE, **RETRIEVAL, "retrieval_top1": 0.0}))
    failed = subprocess.run(cmd, capture_output=True, text=True)
    assert failed.returncode == 1 and "retrieval_top1" in failed.stdout and "binomial" in failed.stdout
    cur.write_text(json.dumps(BASE))
    alone = subprocess.run(cmd, capture_output=True, text=True)
    assert alone.returncode == 0 and "not compared (in one file only): retrieval_top1, retrieval_top5" in alone.stdout
    cur.write_text(json.dumps({**BASE, **RETRIEVAL, "retrieval_top1": 0.0, "retrieval_space": "pixels"}))
    unlike = subprocess.run(cmd, capture_output=True, text=True)
    assert unlike.returncode == 0 and "retrieval_top1 (retrieval_space differ)" in unlike.stdout


def test_cli_exit_codes(tmp_path):
    base, cur = tmp_path / "base.json", tmp_path / "cur.json"
    base.write_text(json.dumps(BASE))
    cur.write_text(json.dumps({**BASE, "fid": 12.0}))
    cmd = [sys.executable, "-m", "stages.regress", "--baseline", str(base), "--current", str(cur)]
    failed = subprocess.run(cmd, capture_output=True, text=True)
    assert failed.returncode == 1 and "REGRESSED" in failed.stdout
    cur.write_text(json.dumps(BASE))
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0


def test_cli_reads_the_training_spread(tmp_path):
    base, cur, spread = tmp_path / "base.json", tmp_path / "cur.json", tmp_path / "spread.json"
    base.write_text(json.dumps(BASE))
    cur.write_text(json.dumps({**BASE, "fid": 1.5}))
    spread.write_text(json.dumps({"runs": {"seed0": {}, "seed1": {}, "seed2": {}},
                                  "spread": {"fid": {"std": 0.1, "n": 3}}}))
    cmd = [sys.executable, "-m", "stages.regress", "--baseline", str(base), "--current", str(cur)]
    alone = subprocess.run(cmd, capture_output=True, text=True)
    assert alone.returncode == 1 and "no reports/training_spread.json" in alone.stdout
    both = subprocess.run([*cmd, "--spread", str(spread)], capture_output=True, text=True)
    assert both.returncode == 0, both.stdout
    assert "std over 3 training runs (seed0, seed1, seed2; reports/training_spread.json)" in both.stdout


def test_cli_names_both_machines_when_they_differ(tmp_path):
    zen4 = {"cpu": "AMD EPYC 9R14", "isa": "avx2 avx512f", "torch_cpu_capability": "AVX512", "threads": 2,
            "torch": "2.14.1", "gpu": ""}
    base, cur = tmp_path / "base.json", tmp_path / "cur.json"
    base.write_text(json.dumps({**BASE, "machine": zen4}))
    cmd = [sys.executable, "-m", "stages.regress", "--baseline", str(base), "--current", str(cur)]
    cur.write_text(json.dumps({**BASE, "machine": zen4}))
    same = subprocess.run(cmd, capture_output=True, text=True)
    assert same.returncode == 0 and "machine" not in same.stdout
    cur.write_text(json.dumps({**BASE, "machine": {**zen4, "isa": "avx2", "torch_cpu_capability": "AVX2"}}))
    other = subprocess.run(cmd, capture_output=True, text=True)
    assert other.returncode == 0
    assert "baseline machine: AMD EPYC 9R14 [avx2 avx512f; torch kernels AVX512]" in other.stdout
    assert "current machine: AMD EPYC 9R14 [avx2; torch kernels AVX2]" in other.stdout


def test_cli_missing_baseline_is_one_line(tmp_path):
    cur = tmp_path / "cur.json"
    cur.write_text(json.dumps(BASE))
    cmd = [sys.executable, "-m", "stages.regress", "--baseline", "no-such-rev", "--current", str(cur)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: --baseline: no reports/metrics.json at git revision 'no-such-rev' (nor 'origin/no-such-rev'), and no such "
        "file"]


# --- measured: whole runs of the default recipe (reports/training_spread.json, written by bench/seed_spread.py) ----

MEASURED = json.loads((Path(__file__).resolve().parents[1] / "reports" / "training_spread.json").read_text())


@pytest.mark.parametrize("run", sorted(set(MEASURED["runs"]) - {"seed0"}))
def test_another_training_run_passes_the_gate(run):
    """Each run that is not the baseline (another training seed; the same seed on AVX2 kernels) passes against it,
    with the spread measured on the *other* runs only, so that no run is let through by its own deviation."""
    runs = MEASURED["runs"]
    others = {name: metrics for name, metrics in runs.items() if name != run}
    assert regressed(runs[run], runs["seed0"], training=spread_over_runs(others)) == []


def test_the_committed_spread_is_over_the_committed_runs():
    recomputed = spread_over_runs(MEASURED["runs"])
    assert recomputed.keys() == MEASURED["spread"].keys()
    for name, stats in recomputed.items():
        assert MEASURED["spread"][name] == pytest.approx(stats, rel=1e-12), name  # JSON keeps doubles exactly
    assert {s["n"] for s in MEASURED["spread"].values()} == {len(MEASURED["runs"])} and len(MEASURED["runs"]) >= 3


def test_planted_regressions_are_still_caught_with_the_training_spread():
    """The gate widened by the measured spread over training runs still fails a U-Net trained for one epoch (measured
    above), and a FID 25% worse than the baseline's."""
    base, spread = MEASURED["runs"]["seed0"], MEASURED["spread"]
    one_epoch = {"fid": 50.371, "kid": 1.2006, "cond_acc": 0.1, "precision": 0.34467, "recall": 0.029333}
    assert regressed({**base, **one_epoch}, base, training=spread) == ["fid", "kid", "cond_acc", "precision", "recall"]
    assert regressed({**base, "fid": base["fid"] * 1.25}, base, training=spread) == ["fid"]
