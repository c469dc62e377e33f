"""The sampler comparison: which (sampler, steps) runs to make, and the FID-against-steps picture.

Every run draws the same prompts from the same per-image seeds, so the runs differ only by the sampler and its step
count; FID and conditional accuracy are measured as in the evaluate stage.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from sdlib.config import CompareConfig
from sdlib.diffusion.samplers import SAMPLERS, check_sampler


def planned_runs(cfg: CompareConfig) -> list[tuple[str, int, bool]]:
    """(sampler, steps, is its recommended count) for every sampler at each count, its recommended count, and the
    extra runs; each pair once, grouped by sampler. An unknown sampler name is a ConfigError naming its key."""
    for name in cfg.samplers:
        check_sampler(name, "compare.samplers")
    extra = [(check_sampler(run.partition(":")[0], "compare.extra"), int(run.partition(":")[2])) for run in cfg.extra]
    runs: dict[tuple[str, int], bool] = {}
    for name in cfg.samplers:
        recommended = SAMPLERS[name].steps
        for steps in sorted({*cfg.steps, recommended}):
            runs[(name, steps)] = steps == recommended
    for name, steps in extra:
        runs.setdefault((name, steps), steps == SAMPLERS[name].steps)
    order = {name: i for i, name in enumerate(dict.fromkeys([*cfg.samplers, *(name for name, _ in extra)]))}
    return sorted(((n, s, rec) for (n, s), rec in runs.items()), key=lambda r: (order[r[0]], r[1]))


def fid_vs_steps_figure(path: Path, table: pd.DataFrame, fid_floor: float | None = None) -> None:
    """FID against sampling steps (log scale), one line per sampler; recommended counts marked, the floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in table.groupby("sampler", sort=False):
        rows = rows.sort_values("steps")
        line, = ax.plot(rows["steps"], rows["fid"], marker="o", markersize=3, label=name)
        rec = rows[rows["recommended"]]
        ax.scatter(rec["steps"], rec["fid"], s=60, facecolors="none", edgecolors=line.get_color())
    if fid_floor is not None:
        ax.axhline(fid_floor, color="gray", linestyle="--", linewidth=1, label="real-vs-real floor")
    ax.set(xscale="log", yscale="log", xlabel="sampling steps", ylabel="FID (classifier features)",
           title="FID against steps (circles: recommended step count)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
