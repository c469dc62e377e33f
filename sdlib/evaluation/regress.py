"""Metric regression gate: compare reports/metrics.json with a baseline (by default the one committed on main).

`dvc metrics diff` always exits 0, so CI needs this small check: each gated metric has a direction and a tolerance,
and the gate exits 1 with a table when a metric got worse by more than its tolerance. A run on another machine, or
with another training seed, trains other weights; so the tolerance covers two measured spreads, with a floor per
metric: the baseline's own spread over sampling seeds (`fid_std`, ... in metrics.json), and the spread of the default
recipe over whole training runs (`reports/training_spread.json`, written by bench/seed_spread.py). Caption retrieval
(`retrieval_top1`/`_top5`, the OpenMoji presets) is one proportion over N queries, so its sampling spread is the
binomial standard error sqrt(p(1-p)/N); it is compared only when both files have it, over the same N in the same
space.

    python -m stages.regress [--baseline REV_OR_PATH] [--current reports/metrics.json]   # or: make regress
"""
from __future__ import annotations

import json
import math
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sdlib.errors import ConfigError


K_STD = 3.0  # standard deviations of a measured spread that a change must exceed to count as a regression


@dataclass(frozen=True)
class Rule:
    higher_is_better: bool
    abs_tol: float  # never flag a change smaller than this (the floor when the spread is tiny or unmeasured)
    rel_tol: float = 0.0  # ... nor one smaller than this fraction of the baseline
    k_std: float = K_STD  # ... nor one within k standard deviations of either measured spread (see `tolerance`)
    trials: str = ""  # a proportion over this key's count of trials: its spread is binomial (see `tolerance`)
    same: tuple[str, ...] = ()  # keys that must be equal in both files for the metric to be comparable


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
    # a top-k hit rate over the same `retrieval_n` queries in the same space (another N has another chance level)
    "retrieval_top1": Rule(True, abs_tol=0.02, trials="retrieval_n", same=("retrieval_n", "retrieval_space")),
    "retrieval_top5": Rule(True, abs_tol=0.02, trials="retrieval_n", same=("retrieval_n", "retrieval_space")),
}


def tolerance(rule: Rule, name: str, baseline: dict, training: dict | None = None, current: dict | None = None
              ) -> float:
    """The largest change of `name` that still counts as noise.

    `<name>_std` in the baseline is the std of one seed set's value, and the gated value is the mean over the sets,
    so k of it is a wide band for sampling noise alone (the old gate). `training[name]["std"]` is the std of the
    gated value over whole training runs of the recipe (seeds, ISA paths), each scored on the same sampling seeds, so
    it already holds the sampling noise of the mean; two independent runs differ by sqrt(2) times that.

    A proportion p over N trials (`rule.trials`: retrieval's N queries, each found or not) has the binomial standard
    error sqrt(p (1 - p) / N); two independent runs differ by sqrt(2) times that too. p is pooled over the baseline
    and `current` (the two-proportion test's estimate if nothing changed), which keeps the band from vanishing when
    the baseline's p is near 0 or 1; without `current`, the baseline's.
    """
    sampling = float(baseline.get(f"{name}_std", 0.0))
    runs = float((training or {}).get(name, {}).get("std", 0.0))
    binomial = 0.0
    if rule.trials and float(baseline.get(rule.trials, 0)) > 0:
        values = [float(baseline[name])] + ([float(current[name])] if current and name in current else [])
        p = min(max(statistics.fmean(values), 0.0), 1.0)
        binomial = math.sqrt(p * (1 - p) / float(baseline[rule.trials]))
    return max(rule.abs_tol, rule.rel_tol * abs(float(baseline[name])), rule.k_std * sampling,
               rule.k_std * math.sqrt(2) * runs, rule.k_std * math.sqrt(2) * binomial)


def comparable(rule: Rule, current: dict, baseline: dict) -> bool:
    """Whether the keys the metric's meaning depends on (`rule.same`) agree in both files."""
    return all(current.get(key) == baseline.get(key) for key in rule.same)


def regressions(current: dict, baseline: dict, rules: dict[str, Rule] = RULES, training: dict | None = None
                ) -> list[dict]:
    """One row per gated metric present in both files and comparable there (`comparable`), with `regressed` set where
    it got worse beyond tolerance; `training` is the `spread` of a training_spread.json (None: the sampling spread and
    the floors only)."""
    rows = []
    for name, rule in rules.items():
        if name not in current or name not in baseline or not comparable(rule, current, baseline):
            continue
        old, new = float(baseline[name]), float(current[name])
        worse_by = (old - new) if rule.higher_is_better else (new - old)
        tol = tolerance(rule, name, baseline, training, current)
        rows.append({"metric": name, "baseline": old, "current": new, "worse_by": worse_by, "tolerance": tol,
                     "regressed": worse_by > tol})
    return rows


def spread_over_runs(runs: dict[str, dict], rules: dict[str, Rule] = RULES) -> dict[str, dict[str, float]]:
    """Mean, sample std, range and count over whole training runs (name -> metrics) of each gated metric that at
    least two runs have: the `training` argument of `regressions`."""
    stats = {}
    for name in rules:
        values = [float(r[name]) for r in runs.values() if name in r]
        if len(values) >= 2:
            stats[name] = {"mean": statistics.fmean(values), "std": statistics.stdev(values), "n": len(values),
                           "min": min(values), "max": max(values)}
    return stats


def read_committed(ref: str, path: str) -> dict | None:
    """A JSON file on disk, or `path` as committed at git revision `ref` (or `origin/<ref>`, for clones in which
    the branch exists only as a remote-tracking one); None when there is neither."""
    if Path(ref).is_file():
        return json.loads(Path(ref).read_text())
    for rev in (ref, f"origin/{ref}"):
        out = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
        if out.returncode == 0:
            return json.loads(out.stdout)
    return None


def read_baseline(ref: str, path: str) -> dict:
    """The baseline metrics (see `read_committed`); a one-line error when there are none."""
    found = read_committed(ref, path)
    if found is None:
        raise ConfigError(f"--baseline: no {path} at git revision '{ref}' (nor 'origin/{ref}'), and no such file")
    return found


def describe_machine(machine: dict | None) -> str:
    """One line for the `machine` entry of a metrics file (sdlib.tracking.machine), or 'not recorded'."""
    if not machine:
        return "not recorded"
    return (f"{machine.get('cpu')} [{machine.get('isa') or 'no vector ISA seen'}; torch kernels "
            f"{machine.get('torch_cpu_capability')}], {machine.get('threads')} threads, torch {machine.get('torch')}"
            + (f", {machine['gpu']}" if machine.get("gpu") else ""))
