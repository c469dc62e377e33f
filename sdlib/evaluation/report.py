"""The run's report: one Markdown page (reports/report.md) with its numbers, their context and its pictures.

Every metric is shown with its spread over seed sets and next to the number that gives it meaning (the real-vs-real
FID floor at the same sample count); training curves are drawn from the stages' CSVs. Images are linked by paths
relative to the report, so the page renders on GitHub, in VS Code, or from an MLflow artifact folder.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

# (metric key, label, format, what it means) in the order the report shows them
SAMPLE_METRICS = (
    ("fid", "FID", "{:.3f}", "Fréchet distance of samples to the test split, in the digit classifier's features"),
    ("fid_floor", "FID floor", "{:.3f}", "real-vs-real FID (train vs test) at the same sample count"),
    ("kid", "KID", "{:.4f}", "kernel inception distance (unbiased, can be below 0)"),
    ("precision", "precision", "{:.3f}", "share of samples that land on the real data manifold"),
    ("recall", "recall", "{:.3f}", "share of the real data manifold the samples cover"),
    ("cond_acc", "conditional accuracy", "{:.3f}", "share of samples the classifier reads as the prompted class"),
    ("fid_inception", "Inception FID", "{:.3f}", "standard FID (only with local Inception weights)"),
    ("retrieval_top1", "retrieval top-1", "{:.3f}",
     "share of samples drawn from a test image's caption that find that image first among the N"),
    ("retrieval_top5", "retrieval top-5", "{:.3f}", "... among their 5 most similar of the N"),
)
VAE_METRICS = (
    ("vae_psnr", "reconstruction PSNR", "{:.2f} dB", "test split, decode(mean of encode(x))"),
    ("vae_rfid", "reconstruction FID", "{:.3f}", "reconstructions vs originals of the test split"),
)
RETRIEVAL_SPACES = {"classifier": "the classifier's penultimate features",
                    "pixels": "the pixels averaged over 8x8 cells (a fixed space that needs no training)"}
FIGURES = (
    ("grid.png", "Samples: one row per prompt"),
    ("curves.png", "Training loss per epoch"),
    ("figures/forward.png", "Forward diffusion of a real digit: pixels (top) and latents, decoded (bottom)"),
    ("figures/reverse.png", "Reverse diffusion: the sample x_t (top) and the model's x_0 prediction (bottom)"),
    ("figures/attention.png", "Cross-attention of each prompt token over the latent grid"),
    ("retrieval/grid.png", "Caption retrieval: test images (top) and the samples drawn from their captions (bottom)"),
)


def _row(metrics: dict, key: str, label: str, fmt: str, meaning: str) -> str | None:
    if key not in metrics:
        return None
    spread = f" ± {fmt.format(metrics[key + '_std'])}" if key + "_std" in metrics else ""
    return f"| {label} | {fmt.format(metrics[key])}{spread} | {meaning} |"


def metrics_table(metrics: dict, rows: tuple) -> list[str]:
    lines = ["| metric | value | meaning |", "| --- | --- | --- |"]
    return lines + [r for spec in rows if (r := _row(metrics, *spec)) is not None]


def confusion_table(confusion: pd.DataFrame) -> list[str]:
    """Counts of (prompted, classified) pairs as a Markdown table; rows: prompted class."""
    if confusion.empty:
        return ["No sample was prompted with a known class."]
    table = pd.crosstab(confusion["actual"], confusion["predicted"])
    classes = list(table.index.union(table.columns))
    table = table.reindex(index=classes, columns=classes, fill_value=0)
    lines = ["| prompted \\ seen | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    lines += [f"| {c} | " + " | ".join(str(v) for v in table.loc[c]) + " |" for c in classes]
    return lines


def curves_figure(path: Path, curves: dict[str, pd.DataFrame]) -> None:
    """One panel per training curve (loss against epoch, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.2), squeeze=False)
    for ax, (name, df) in zip(axes[0], curves.items()):
        ax.plot(df["epoch"], df["loss"], marker="o", markersize=2)
        ax.set(title=name, xlabel="epoch", ylabel="loss", yscale="log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def render(*, metrics: dict, stages: dict[str, dict], params: dict, confusion: pd.DataFrame, report_dir: Path,
           images: list[Path], title: str) -> str:
    """The Markdown text of the report; `images` that exist are shown by their path relative to `report_dir`."""
    n, sets = metrics.get("n_samples"), metrics.get("n_seed_sets", 1)
    lines = [f"# {title}", ""]
    sample = {k[len("sample."):]: v for k, v in params.items() if k.startswith("sample.")}
    if sample:
        lines += [f"Sampler `{sample.get('sampler')}`, {sample.get('steps')} steps, guidance {sample.get('guidance')}; "
                  f"U-Net trained for {params.get('epochs')} epoch(s) (seed {params.get('seed')}).", ""]
    lines += ["## Samples", ""]
    if "n_seed_sets" in metrics:
        lines += [f"Each number is the mean over {sets} disjoint seed set(s) of {n} samples each, ± the standard "
                  "deviation over the sets: differences smaller than a few of those are noise.", ""]
    lines += metrics_table(metrics, SAMPLE_METRICS) + [""]
    if "fid" not in metrics:
        lines += ["No FID, KID, precision/recall or conditional accuracy: the data has no classes to train the "
                  "evaluation classifier (their feature space and judge) on.", ""]
    if "retrieval_n" in metrics:
        lines += [f"Caption retrieval: one sample for the caption of each of {metrics['retrieval_n']} test images "
                  f"(distinct captions), compared with all of them by the cosine similarity of "
                  f"{RETRIEVAL_SPACES.get(metrics.get('retrieval_space'), metrics.get('retrieval_space'))}; chance "
                  f"is {metrics['retrieval_chance_top1']:.3f} at top-1 and {metrics['retrieval_chance_top5']:.3f} at "
                  "top-5. One draw per caption: no spread over seed sets.", ""]
    per_class = {k.split(".", 1)[1]: v for k, v in metrics.items() if k.startswith("cond_acc_per_class.")}
    if per_class:
        lines += ["Conditional accuracy per class: " + ", ".join(f"{c} {v:.2f}" for c, v in per_class.items()), ""]
    if isinstance(metrics.get("machine"), dict):
        m = metrics["machine"]
        lines += [f"Computed on {m.get('cpu')} ({m.get('isa')}; torch {m.get('torch')}, {m.get('threads')} threads).",
                  ""]
    lines += ["## Autoencoder", ""]
    if any(key in metrics for key, *_ in VAE_METRICS):
        lines += metrics_table(metrics, VAE_METRICS) + [""]
    else:
        lines += ["None: the U-Net diffuses pixels (`vae.kind: none`).", ""]
    lines += ["## Training", "", "| stage | " + " | ".join(["metric", "value"]) + " |", "| --- | --- | --- |"]
    lines += [f"| {stage} | {k} | {v if isinstance(v, int) else f'{v:.5g}'} |"
              for stage, values in stages.items() for k, v in values.items()] + [""]
    lines += ["## Prompt adherence (counts)", ""] + confusion_table(confusion) + [""]
    for image, caption in FIGURES:
        path = next((p for p in images if p.as_posix().endswith(image)), None)
        if path is not None and path.exists():
            lines += [f"### {caption}", "", f"![{caption}]({Path(os.path.relpath(path, report_dir)).as_posix()})", ""]
    return "\n".join(lines)
