"""The guidance curve: FID, KID, precision, recall and `cond_acc` of one trained model against the guidance scale.

Every image of the `sample` section is drawn at each scale (the same seeds, so only the scale changes) and scored as
`evaluate` scores them, with the mean and spread over `evaluate.seed_sets` seed sets. Low guidance gives diversity
(recall, and FID when the model is good), high guidance accuracy (`cond_acc`, precision); the curve is where the
default's `sample.guidance` comes from.

    python bench/guidance.py                              # the workspace's models/unet, scales 1 1.5 2 3 5
    python bench/guidance.py --scale 2 --scale 2.5 --label default
    python bench/guidance.py --scale 3 --set sample.steps=10 --label steps10   # another sampling setting
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
import yaml

from recipes import REPO, Evaluator, apply  # bench/recipes.py: the pipeline's sampling and scoring
from sdlib.cli import user_errors
from sdlib.ldm import load_ldm
from sdlib.presets import parse_overrides

app = typer.Typer(add_completion=False)
KEYS = ("fid", "kid", "precision", "recall", "cond_acc")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KEYS), figsize=(3.2 * len(KEYS), 3.2))
    g = [r["guidance"] for r in rows]
    for ax, key in zip(axes, KEYS):
        ax.errorbar(g, [r[key] for r in rows], yerr=[r.get(f"{key}_std", 0) for r in rows], marker="o", capsize=3)
        if key == "fid":
            ax.axhline(rows[0]["fid_floor"], color="gray", ls="--", label="real-vs-real floor")
            ax.legend(fontsize=8)
        ax.set_xlabel("guidance scale")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@app.command()
def main(
    scale: Annotated[Optional[list[float]], typer.Option(help="guidance scales (repeatable)")] = None,
    label: Annotated[str, typer.Option(help="name of this curve's files")] = "default",
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="override of the sample section, e.g. sample.steps=10 (repeatable)")] = None,
    workspace: Annotated[Path, typer.Option(help="a repository after `dvc repro`")] = REPO,
    out: Annotated[Path, typer.Option(help="folder for <label>.jsonl and <label>.png")] = REPO / "bench/out/guidance",
) -> None:
    """Score the workspace's trained model at each guidance scale; one JSON line per scale, then a table."""
    with user_errors():
        scales = scale or [1.0, 1.5, 2.0, 3.0, 5.0]
        params = apply(yaml.safe_load((workspace / "params.yaml").read_text()), parse_overrides(set_ or [], "--set"))
        model, _ = load_ldm(workspace / "models/unet/model.safetensors")
        rows = []
        for g in scales:
            evaluate = Evaluator(apply(params, {"sample.guidance": g}), workspace,
                                 workspace / "models/unet/tokenizer", torch.device("cpu"))
            t0 = time.perf_counter()
            m = evaluate(model, final=True)
            row = {"guidance": g, **{k: round(v, 5) for k, v in m.items()}, "seconds": round(time.perf_counter() - t0)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=out, delete=False, suffix=".tmp") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        Path(f.name).replace(out / f"{label}.jsonl")
        plot(rows, out / f"{label}.png")
        print("| guidance | FID | KID | precision | recall | cond_acc |\n|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['guidance']:g} | {r['fid']:.3f} ± {r['fid_std']:.3f} | {r['kid']:.4f} | {r['precision']:.3f} | "
                  f"{r['recall']:.3f} | {r['cond_acc']:.4f} ± {r['cond_acc_std']:.4f} |")
        print(f"wrote {out / f'{label}.jsonl'}, {out / f'{label}.png'}", file=sys.stderr)


if __name__ == "__main__":
    app()
