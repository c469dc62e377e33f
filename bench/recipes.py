"""Quality per training compute: U-Net recipes trained side by side and evaluated along the way.

A recipe is a set of params overrides (dotted keys, as `dvc exp run -S`) on params.yaml. Each recipe trains in its
own process exactly what `train_unet` trains (`sdlib.training.latent_diffusion.unet_training`), on the workspace's
latents (`--workspace`, default this repository, after `dvc repro`), and every `--every` steps draws the first seed set of the `sample` section's images
(`evaluate.seed_sets` sets: the first 1/k of each prompt's images, the same seeds as the pipeline) with the EMA
weights and scores them with the pipeline's classifier: FID, KID, precision, recall and `cond_acc`. At the end of a
recipe every image of the `sample` section is drawn and scored as `evaluate` scores them (mean and spread over the seed
sets), so the final row of a recipe is comparable to reports/metrics.json. The U-Net's training time excludes the
evaluations; FLOPs per image are counted on one training step (U-Net and text encoder, forward and backward).

Recipes run one after the other by default; with `--jobs 2` two at a time, one thread each, so that the recipes of
one round share the machine equally (absolute times swing 2-3x from hour to hour on a shared machine: compare the
ratios). Finished recipes are kept in bench/out/recipes/<name>.jsonl and not re-run.

    python bench/recipes.py --recipe default --recipe half                 # what --list shows
    python bench/recipes.py --recipe half --set unet.min_snr_gamma=5 --name half-minsnr   # a recipe of your own
    python bench/recipes.py --table                                        # the table and plot of what has run
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
import yaml
from torch.utils.flop_counter import FlopCounterMode

from sdlib import config
from sdlib.cli import user_errors
from sdlib.data.images import from_uint8
from sdlib.data.latents import load_latents
from sdlib.data.splits import load_split
from sdlib.errors import ConfigError
from sdlib.data.shards import Rows
from sdlib.evaluation.metrics import classifier_features, fidelity_from_features
from sdlib.evaluation.scoring import real_features, score_samples, seed_sets
from sdlib.generate import Prompts
from sdlib.models.classifier import load_classifier, predict
from sdlib.data.encoded_captions import write_encoded_captions
from sdlib.models.text import load_frozen_text
from sdlib.models.vae import load_vae
from sdlib.presets import parse_overrides, set_params
from sdlib.samples import draw, drawn_size, plan
from sdlib.training.latent_diffusion import unet_training
from sdlib.training.loop import Checkpointer, fit

REPO = Path(__file__).resolve().parents[1]

# The default recipe until 2026-12-07 (params.yaml then: width 64, 30 epochs, the plain loss, 20 sampler steps). The
# recipes below are overrides of it, so that each name keeps meaning what was measured whatever params.yaml becomes.
OLD_DEFAULT = {"epochs": 30, "unet.model_channels": 64, "unet.min_snr_gamma": 0.0, "sample.steps": 20}
# name -> params overrides; `default` is params.yaml as it is
RECIPES: dict[str, dict[str, object]] = {
    "default": {},
    "old-default": OLD_DEFAULT,
    "half": OLD_DEFAULT | {"epochs": 15},  # the same recipe stopped at half the steps (its own LR schedule)
    "half-minsnr": OLD_DEFAULT | {"epochs": 15, "unet.min_snr_gamma": 5.0},
    "half-bs64": OLD_DEFAULT | {"epochs": 15, "unet.batch_size": 64},  # as many steps, half the images each
    "half-bs64-minsnr": OLD_DEFAULT | {"epochs": 15, "unet.batch_size": 64, "unet.min_snr_gamma": 5.0},
    "half-lognormal": OLD_DEFAULT | {"epochs": 15, "unet.timesteps": "lognormal"},
    "twothirds-minsnr": OLD_DEFAULT | {"epochs": 20, "unet.min_snr_gamma": 5.0},
    # scored with 10 sampler steps (the old default model scores FID 1.25 there, as at 20 steps: 1.30)
    "full-minsnr-s10": OLD_DEFAULT | {"unet.min_snr_gamma": 5.0, "sample.steps": 10},
    "half-minsnr-lr2e-3-s10": OLD_DEFAULT | {"epochs": 15, "unet.min_snr_gamma": 5.0, "unet.lr": 2e-3,
                                             "sample.steps": 10},
    "half-minsnr-noema-s10": OLD_DEFAULT | {"epochs": 15, "unet.min_snr_gamma": 5.0, "unet.ema_decay": 0.0,
                                            "sample.steps": 10},
    # narrower U-Nets for more steps in the same FLOPs (MFLOP per image: width 64 514, 48 299, 32 145);
    # w48-minsnr-s10 is the default since 2026-12-07
    "w48-minsnr-s10": OLD_DEFAULT | {"epochs": 25, "unet.model_channels": 48, "unet.min_snr_gamma": 5.0,
                                     "sample.steps": 10},
    "w32-minsnr-s10": OLD_DEFAULT | {"epochs": 53, "unet.model_channels": 32, "unet.min_snr_gamma": 5.0,
                                     "sample.steps": 10},
    "w48-minsnr-s10-full": OLD_DEFAULT | {"epochs": 50, "unet.model_channels": 48, "unet.min_snr_gamma": 5.0,
                                          "sample.steps": 10},  # the default's recipe at the old default's FLOPs
}

app = typer.Typer(add_completion=False)


def apply(params: dict, overrides: dict[str, object]) -> dict:
    """A copy of params with dotted-key overrides; a key params.yaml lacks is an error (as with `dvc exp run -S`)."""
    return set_params(copy.deepcopy(params), overrides, "recipe")


def count_flops(run) -> int:
    """FLOPs of one training step of `run` (forward and backward), gradients cleared afterwards."""
    with FlopCounterMode(display=False) as counter:
        loss, _ = run.loss_fn(0, torch.Generator().manual_seed(0))
        loss.backward()
    run.model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


class Evaluator:
    """The pipeline's sampling and scoring of an EMA copy of the model: one seed set along the way, all at the end."""

    def __init__(self, params: dict, workspace: Path, tokenizer_dir: Path, device: torch.device):
        self.sample = config.parse_section("sample", params["sample"])
        self.n_sets = config.parse_section("evaluate", params["evaluate"]).seed_sets
        self.tokenizer_dir, self.device = tokenizer_dir, device
        self.vae = load_vae(workspace / "models/vae.safetensors", device)
        self.classifier_path = workspace / "models/classifier.safetensors"
        self.classifier, self.classes = load_classifier(self.classifier_path, device)
        test = load_split(workspace / "data/processed", "test", "stream")
        self.train_images = load_split(workspace / "data/processed", "train", "stream").images
        self.real = real_features(Rows(test.images.array), self.classifier_path, device)  # of the uint8 test images
        self.meta = {"classes": test.classes, "digits": test.digits}  # meta.json's, the same for either split

    def draw(self, model, jobs) -> torch.Tensor:
        """uint8 images (N, C, H, W) of `jobs`, drawn as the sample stage draws them."""
        hw = drawn_size(model, self.vae, None, None)
        return torch.cat([images for _, images in draw(model, self.vae, Prompts(self.tokenizer_dir, model),
                                                        self.sample, jobs, hw=hw)])

    def __call__(self, model, final: bool, guidance: float | None = None) -> dict:
        """Metrics of `model`: one seed set, or (final) all of them; at `guidance` instead of the sample section's."""
        model.eval()
        if guidance is not None:
            self.sample = self.sample.model_copy(update={"guidance": guidance})
        jobs = plan(self.sample, self.meta)
        prompts = [j.prompt for j in jobs]
        labels = torch.tensor([-1 if j.label is None else j.label for j in jobs])
        if not final:
            first = seed_sets(prompts, self.n_sets)[0]
            jobs, prompts, labels = [jobs[i] for i in first], [prompts[i] for i in first], labels[first]
        gen = self.draw(model, jobs)
        pred = predict(self.classifier, from_uint8(gen), self.device)
        if final:
            result, _ = score_samples(gen, prompts, labels, pred, real=self.real, train_images=self.train_images,
                                      classes=self.classes, classifier=self.classifier_path, n_sets=self.n_sets,
                                      device=self.device)
            return {k: v for k, v in result.items() if not k.startswith("cond_acc_per_class")}
        m = fidelity_from_features(classifier_features(gen, self.classifier_path, self.device), self.real)
        m.pop("kid_std")
        m["cond_acc"] = (pred == labels)[labels >= 0].float().mean().item()
        return m | {"n_samples": len(gen), "n_seed_sets": 1}


def run_recipe(name: str, overrides: dict[str, object], every: int, workspace: Path, out: Path,
               guidance: list[float]) -> None:
    """Train one recipe in this process, writing a JSON line per evaluation to out/<name>.jsonl (atomically at the end).
    The final model is scored at each scale of `guidance` (none: the sample section's), a row each."""
    params = apply(yaml.safe_load((workspace / "params.yaml").read_text()), overrides)
    cfg, text_cfg = config.parse_section("unet", params["unet"]), config.parse_section("text", params["text"])
    epochs, seed = config.top_level(params, "epochs"), config.top_level(params, "seed")
    dev = torch.device("cpu")
    latents = load_latents(workspace / "data/latents", "train")
    split = load_split(workspace / "data/processed", "train")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        frozen = load_frozen_text(text_cfg.pretrained, text_cfg.max_length) if text_cfg.pretrained else None
        encoded = write_encoded_captions(Path(scratch) / "captions", split.captions, text_cfg.max_length, frozen, dev)
        tokenizer_dir = Path(scratch) / "captions/tokenizer"  # what encode_captions writes and train_unet copies
        run = unet_training(cfg, text_cfg, epochs=epochs, seed=seed, latents=latents, captions=split.captions,
                            encoded=encoded, device=dev)
        flops_per_image = count_flops(run) / cfg.batch_size
        evaluate = Evaluator(params, workspace, tokenizer_dir, dev)
        clock = {"train": 0.0, "since": time.perf_counter()}

        def on_step(done: int) -> None:
            final = done == run.total_steps
            if done % every and not final:
                return
            clock["train"] += time.perf_counter() - clock["since"]
            ema_model = copy.deepcopy(run.model)
            run.ema.copy_to(ema_model)
            for g in (guidance or [evaluate.sample.guidance]) if final else [evaluate.sample.guidance]:
                t0 = time.perf_counter()
                metrics = evaluate(ema_model, final, g)
                row = {"recipe": name, "overrides": overrides, "step": done, "images": done * cfg.batch_size,
                       "tflops": round(done * cfg.batch_size * flops_per_image / 1e12, 3), "guidance": g,
                       "train_s": round(clock["train"], 1), "eval_s": round(time.perf_counter() - t0, 1),
                       "final": final, "threads": torch.get_num_threads(),
                       **{k: round(v, 5) for k, v in metrics.items()}}
                rows.append(row)
                print(json.dumps(row), flush=True)
            clock["since"] = time.perf_counter()

        ckpt = Checkpointer(Path(scratch) / "ckpt.pt", "bench")
        fit(model=run.model, loss_fn=run.loss_fn, optimizer=run.optimizer, total_steps=run.total_steps,
            steps_per_epoch=run.steps_per_epoch, seed=seed, device=dev, checkpointer=ckpt,
            checkpoint_every=run.total_steps + 1, ema=run.ema, scheduler=run.scheduler, desc=name,
            log_every=cfg.log_every, on_step=on_step)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out / f"{name}.jsonl")


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(out.glob("*.jsonl")) for line in f.read_text().splitlines()]


def table(rows: list[dict], baseline: str = "old-default") -> str:
    """Markdown: each recipe's final rows (one per guidance scale), with FLOPs as a ratio of the baseline's. Training
    seconds are shown but not as a ratio: recipes that ran at different times met different loads (time them side by
    side, `--jobs 2`)."""
    finals = [r for r in rows if r["final"]]
    base = next((r for r in finals if r["recipe"] == baseline), None) or next(
        (r for r in finals if r["recipe"] == "default"), None)  # without the baseline's rows: the default's
    lines = [f"| recipe | overrides | steps | FLOPs vs {base['recipe'] if base else baseline} | train s (threads) | "
             "guidance | FID | KID | precision | recall | cond_acc |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(finals, key=lambda r: (-r["tflops"], r["recipe"], r.get("guidance", 0))):
        ratio = f"{r['tflops'] / base['tflops']:.2f}x" if base else ""
        over = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "(params.yaml)"
        lines.append(f"| {r['recipe']} | {over} | {r['step']} | {ratio} | {r['train_s']:.0f} ({r['threads']}) | "
                     f"{r.get('guidance', '')} | {r['fid']:.3f} ± {r['fid_std']:.3f} | {r['kid']:.4f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r['cond_acc']:.4f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """FID and cond_acc of one seed set against training TFLOPs, a line per recipe (the final points too)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in sorted({r["recipe"] for r in rows}):
        mine = [r for r in rows if r["recipe"] == name]
        first = next((r.get("guidance") for r in mine if r["final"]), None)  # the curve at the first final scale
        rs = sorted((r for r in mine if not r["final"] or r.get("guidance") == first), key=lambda r: r["tflops"])
        for ax, key in zip(axes, ("fid", "cond_acc")):
            ax.plot([r["tflops"] for r in rs], [r[key] for r in rs], marker="o", label=name)
    floor = [r["fid_floor"] for r in rows if "fid_floor" in r]
    if floor:
        axes[0].axhline(floor[0], color="gray", ls="--", label="real-vs-real floor")
    for ax, key in zip(axes, ("FID (classifier features, 500 images)", "cond_acc")):
        ax.set_xlabel("U-Net training TFLOPs")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")  # the first evaluations sit an order of magnitude above the rest
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@app.command()
def main(
    recipe: Annotated[Optional[list[str]], typer.Option(help="a recipe of RECIPES (repeatable); default: all")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="extra override key=value for --name")] = None,
    name: Annotated[Optional[str], typer.Option(help="name of the recipe made by --recipe plus --set")] = None,
    every: Annotated[int, typer.Option(help="evaluate every this many steps (and at the end)")] = 175,
    guidance: Annotated[Optional[list[float]], typer.Option(
        help="score the final model at this guidance scale (repeatable; default: the sample section's)")] = None,
    jobs: Annotated[int, typer.Option(help="recipes trained at once, one thread each when more than one")] = 1,
    one: Annotated[Optional[str], typer.Option(hidden=True, help="internal: run this JSON recipe here")] = None,
    show: Annotated[bool, typer.Option("--table", help="print the table and write the plot of what has run")] = False,
    list_: Annotated[bool, typer.Option("--list", help="print the recipes")] = False,
    workspace: Annotated[Path, typer.Option(help="a repository after `dvc repro`: its params, latents and models")] = REPO,
    out: Annotated[Path, typer.Option(help="folder of the recipes' JSON lines, the plot")] = REPO / "bench/out/recipes",
) -> None:
    """Train recipes and evaluate them along the way; print the table of final rows."""
    with user_errors():
        if one is not None:
            spec = json.loads(one)
            run_recipe(spec["name"], spec["overrides"], every, workspace, out, guidance or [])
            return
        if list_:
            for k, v in RECIPES.items():
                print(f"{k}: {v}")
            return
        specs = []
        for r in recipe or ([] if show else list(RECIPES)):
            if r not in RECIPES:
                raise ConfigError(f"unknown recipe '{r}' (--list shows them)")
            specs.append({"name": r, "overrides": dict(RECIPES[r])})
        if set_:
            if name is None or len(specs) != 1:
                raise ConfigError("--set needs --name and exactly one --recipe to start from")
            specs = [{"name": name, "overrides": {**specs[0]["overrides"], **parse_overrides(set_, "--set")}}]
        params = yaml.safe_load((workspace / "params.yaml").read_text())
        for s in specs:
            apply(params, s["overrides"])  # unknown keys stop here, before any training
        todo = [s for s in specs if not (out / f"{s['name']}.jsonl").exists()]
        env = os.environ | ({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if jobs > 1 else {})
        for i in range(0, len(todo), jobs):
            scales = [a for g in guidance or [] for a in ("--guidance", str(g))]
            procs = [subprocess.Popen([sys.executable, __file__, "--every", str(every), *scales, "--one", json.dumps(s),
                                       "--workspace", str(workspace), "--out", str(out)], env=env, cwd=REPO)
                     for s in todo[i:i + jobs]]
            if any(p.wait() for p in procs):
                raise SystemExit(1)
        rows = read_rows(out)
        if rows:
            print(table(rows))
            plot(rows, out / "curves.png")
            print(f"wrote {out / 'curves.png'}", file=sys.stderr)


if __name__ == "__main__":
    app()
