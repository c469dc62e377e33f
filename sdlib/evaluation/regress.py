"""Metric regression gate: compare reports/metrics.json with a baseline (by default the one committed on main).

`dvc metrics diff` always exits 0, so CI needs this small check: each gated metric has a direction and a tolerance,
and the gate exits 1 with a table when a metric got worse by more than its tolerance. Tolerances come from the
baseline's own measured spread over sampling seeds (`fid_std`, ...), with a floor per metric.

    python -m stages.regress [--baseline REV_OR_PATH] [--current reports/metrics.json]   # or: make regress
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sdlib.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    higher_is_better: bool
    abs_tol: float  # never flag a change smaller than this (the floor when the spread is tiny or unmeasured)
    rel_tol: float = 0.0  # ... nor one smaller than this fraction of the baseline
    k_std: float = 3.0  # ... nor one within k standard deviations of the baseline's spread over seed sets


# The spread `<metric>_std` that evaluate measures over disjoint seed sets of samples is the std of a single set's
# value; the reported metric is their mean, so k_std = 3 of a single set's std is a wide (conservative) band for the
# difference of two means. The absolute floors apply when the baseline has no spread (e.g. vae_psnr, which is
# deterministic given the weights) and keep a near-zero measured spread from making the gate flag float noise.
RULES: dict[str, Rule] = {
    "fid": Rule(False, abs_tol=0.1, rel_tol=0.05),
    "kid": Rule(False, abs_tol=0.01),
    "cond_acc": Rule(True, abs_tol=0.02),
    "precision": Rule(True, abs_tol=0.03),
    "recall": Rule(True, abs_tol=0.03),
    "vae_psnr": Rule(True, abs_tol=0.5),
    "vae_rfid": Rule(False, abs_tol=0.05, rel_tol=0.25),
}


def tolerance(rule: Rule, name: str, baseline: dict) -> float:
    spread = float(baseline.get(f"{name}_std", 0.0))
    return max(rule.abs_tol, rule.rel_tol * abs(float(baseline[name])), rule.k_std * spread)


def regressions(current: dict, baseline: dict, rules: dict[str, Rule] = RULES) -> list[dict]:
    """One row per gated metric present in both files, with `regressed` set where it got worse beyond tolerance."""
    rows = []
    for name, rule in rules.items():
        if name not in current or name not in baseline:
            continue
        old, new = float(baseline[name]), float(current[name])
        worse_by = (old - new) if rule.higher_is_better else (new - old)
        tol = tolerance(rule, name, baseline)
        rows.append({"metric": name, "baseline": old, "current": new, "worse_by": worse_by, "tolerance": tol,
                     "regressed": worse_by > tol})
    return rows


def read_baseline(ref: str, path: str) -> dict:
    """A metrics file on disk, or `path` as committed at git revision `ref` (or `origin/<ref>`, for clones in which
    the branch exists only as a remote-tracking one)."""
    if Path(ref).is_file():
        return json.loads(Path(ref).read_text())
    for rev in (ref, f"origin/{ref}"):
        out = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
        if out.returncode == 0:
            return json.loads(out.stdout)
    raise ConfigError(f"--baseline: no {path} at git revision '{ref}' (nor 'origin/{ref}'), and no such file")


def describe_machine(machine: dict | None) -> str:
    """One line for the `machine` entry of a metrics file (sdlib.tracking.machine), or 'not recorded'."""
    if not machine:
        return "not recorded"
    return (f"{machine.get('cpu')} [{machine.get('isa') or 'no vector ISA seen'}; torch kernels "
            f"{machine.get('torch_cpu_capability')}], {machine.get('threads')} threads, torch {machine.get('torch')}"
            + (f", {machine['gpu']}" if machine.get("gpu") else ""))
