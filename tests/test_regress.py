"""The metric regression gate fails on a planted regression and passes on noise-level changes."""
import json
import subprocess
import sys

from sdlib.regress import regressions

BASE = {"fid": 4.0, "kid": 0.010, "cond_acc": 0.95, "precision": 0.8, "recall": 0.7}


def test_noise_level_changes_pass():
    current = {"fid": 4.4, "kid": 0.011, "cond_acc": 0.93, "precision": 0.78, "recall": 0.72}
    assert not any(r["regressed"] for r in regressions(current, BASE))


def test_planted_regressions_fail():
    worse_fid = {**BASE, "fid": 9.0}
    worse_acc = {**BASE, "cond_acc": 0.80}
    assert [r["metric"] for r in regressions(worse_fid, BASE) if r["regressed"]] == ["fid"]
    assert [r["metric"] for r in regressions(worse_acc, BASE) if r["regressed"]] == ["cond_acc"]
    better = {**BASE, "fid": 1.0, "cond_acc": 1.0}
    assert not any(r["regressed"] for r in regressions(better, BASE))


def test_cli_exit_codes(tmp_path):
    base, cur = tmp_path / "base.json", tmp_path / "cur.json"
    base.write_text(json.dumps(BASE))
    cur.write_text(json.dumps({**BASE, "fid": 12.0}))
    cmd = [sys.executable, "-m", "sdlib.regress", "--baseline", str(base), "--current", str(cur)]
    failed = subprocess.run(cmd, capture_output=True, text=True)
    assert failed.returncode == 1 and "REGRESSED" in failed.stdout
    cur.write_text(json.dumps(BASE))
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
