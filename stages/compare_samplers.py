"""Compare the samplers on the trained model: FID, conditional accuracy and wall time for each (sampler, steps).

Writes reports/samplers.csv (`sampler,steps,recommended,guidance,fid,cond_acc,seconds`) and reports/samplers.png
(FID against steps). A pipeline of its own (compare/dvc.yaml) since it costs several default pipelines on a CPU:
    make compare        # = dvc repro compare/dvc.yaml
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import pandas as pd
import torch
import typer
from tqdm import tqdm

from sdlib import config, tracking
from sdlib.cli import check_outputs, pick_device, user_errors, wrote
from sdlib.data.captions import prompt_label
from sdlib.data.images import from_uint8, to_uint8
from sdlib.data.splits import load_split
from sdlib.errors import CheckpointError
from sdlib.evaluation.compare import fid_vs_steps_figure, planned_runs
from sdlib.data.shards import Rows
from sdlib.evaluation.metrics import classifier_features, fidelity_from_features
from sdlib.evaluation.scoring import fid_floor, real_features
from sdlib.generate import Prompts, generate, image_seed
from sdlib.io import atomic_path, fingerprint, write_csv, write_json
from sdlib.ldm import load_ldm
from sdlib.models.classifier import load_classifier, predict
from sdlib.models.vae import load_vae

app = typer.Typer(add_completion=False)
COLUMNS = ["sampler", "steps", "recommended", "guidance", "fid", "cond_acc", "seconds"]


def finished_runs(path: Path, key: str) -> list[dict]:
    """Rows an interrupted invocation saved under `path`, if it had the same fingerprint `key` (else none)."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or half-readable: start afresh
        return []
    return state.get("rows", []) if isinstance(state, dict) and state.get("fingerprint") == key else []


@app.command()
def main(
    params: Annotated[Path, typer.Option(help="params.yaml (`compare`, and `sample.prompts`)")] = Path("params.yaml"),
    unet: Annotated[Path, typer.Option(help="trained U-Net folder")] = Path("models/unet"),
    vae: Annotated[Path, typer.Option(help="trained VAE weights")] = Path("models/vae.safetensors"),
    data: Annotated[Path, typer.Option(help="preprocessed dataset folder (the test split is the real set)")] = Path("data/processed"),
    classifier: Annotated[Path, typer.Option(help="train_classifier's weights")] = Path("models/classifier.safetensors"),
    out: Annotated[Path, typer.Option(help="the comparison table")] = Path("reports/samplers.csv"),
    plot: Annotated[Path, typer.Option(help="FID against steps")] = Path("reports/samplers.png"),
    checkpoint: Annotated[Path, typer.Option(help="finished runs so far; a re-run after a kill skips them")] = Path("checkpoints/compare_samplers.json"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
) -> None:
    """Sample the same prompts and seeds with every sampler at several step counts; score each run."""
    with user_errors():
        cfg = config.load_section("compare", params)
        prompt_list = config.load_section("sample", params).prompts
        runs = planned_runs(cfg)
        check_outputs(out, plot, checkpoint)
        dev = pick_device(device)
        model, meta = load_ldm(unet / "model.safetensors", dev)
        autoencoder = load_vae(vae, dev)
        judge, classes = load_classifier(classifier, dev)
        test, train = load_split(data, "test", "stream"), load_split(data, "train", "stream")  # read as needed
        if classes != test.classes:
            raise CheckpointError(f"{classifier}: trained on other data than {data} (re-run train_classifier)")
        prompts = Prompts(unet / "tokenizer", model)
        label = lambda p: prompt_label(p, meta.get("classes", []), meta.get("digits", False))  # noqa: E731
        jobs = [(p, label(p), image_seed(cfg.seed, k, cfg.n_per_prompt, i))
                for k, p in enumerate(prompt_list) for i in range(cfg.n_per_prompt)]
        labels = torch.tensor([-1 if lbl is None else lbl for _, lbl, _ in jobs])
        labelled = labels >= 0
        real = real_features(Rows(test.images.array), classifier, dev)  # of the uint8 test images, once
        floor = fid_floor(train.images, real, len(jobs), classifier, dev)

        # runs finished by an earlier, interrupted invocation with the same params and models are not redone
        key = fingerprint(cfg.model_dump(), prompt_list, files=(unet / "model.safetensors", vae, classifier))
        rows = finished_runs(checkpoint, key)
        if rows:
            print(f"resuming from {checkpoint}: {len(rows)} of {len(runs)} runs done", file=sys.stderr)
        finished = {(r["sampler"], r["steps"]) for r in rows}
        with tracking.stage_run("compare_samplers", config.flatten({"compare": cfg})):
            for name, steps, recommended in tqdm(runs, desc="compare", unit="run", file=sys.stderr):
                if (name, steps) in finished:
                    continue
                start, images = time.perf_counter(), []
                for b in range(0, len(jobs), cfg.batch_size):
                    batch = jobs[b:b + cfg.batch_size]
                    images.append(generate(model, autoencoder, prompts, [j[0] for j in batch], [j[2] for j in batch],
                                           sampler=name, steps=steps, guidance=cfg.guidance).cpu())
                seconds = time.perf_counter() - start
                gen = to_uint8(torch.cat(images))  # (N, C, H, W)
                features = classifier_features(gen, classifier, dev)
                fid = fidelity_from_features(features, real, prc=False, kid=False)["fid"]
                pred = predict(judge, from_uint8(gen), dev)
                acc = (pred[labelled] == labels[labelled]).float().mean().item() if labelled.any() else float("nan")
                rows.append({"sampler": name, "steps": steps, "recommended": recommended, "guidance": cfg.guidance,
                             "fid": round(fid, 5), "cond_acc": round(acc, 4), "seconds": round(seconds, 2)})
                write_json(checkpoint, {"fingerprint": key, "rows": rows})
                tracking.log_metrics({f"fid.{name}.{steps}": fid, f"cond_acc.{name}.{steps}": acc})
                print(f"{name:>16} {steps:>4} steps: FID {fid:.3f}  cond_acc {acc:.3f}  {seconds:.1f} s",
                      file=sys.stderr)
            table = pd.DataFrame(rows, columns=COLUMNS)  # resumed rows are the first runs, so rows keep the plan's order
            write_csv(out, table)
            with atomic_path(plot) as tmp:
                fid_vs_steps_figure(tmp, table, floor)
            tracking.log_metrics({"fid_floor": floor})
            tracking.log_artifact(out)
            tracking.log_artifact(plot)
        checkpoint.unlink(missing_ok=True)
        wrote(out, plot)
        print(f"compare_samplers: {len(runs)} runs of {len(jobs)} images; real-vs-real FID floor {floor:.3f}")


if __name__ == "__main__":
    app()
