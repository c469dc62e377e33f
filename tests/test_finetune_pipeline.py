"""End to end: `python -m stages.preset finetune` (a `dvc exp run` of dvc.yaml) in a temporary copy of the repository,
on a tiny SD-v1-shaped checkpoint converted by `dvc repro pretrained/dvc.yaml:pretrained_convert` and a fabricated
image folder in data/finetune, shrunk to 32x32 images and one epoch.

What re-runs afterwards is what each change invalidates, through init_digest (always run, cheap): nothing when the init
files are unchanged; new weights in models/pretrained/model.safetensors re-run encode_captions and train_unet but not
train_vae, whose VAE file is unchanged.
"""
from __future__ import annotations

import json
import re
import sys

import pytest
import torch
import yaml

diffusers = pytest.importorskip("diffusers")
from test_finetune import write_image_folder  # noqa: E402
from test_pipeline import REPO, copy_project, run  # noqa: E402
from test_pretrained import diffusers_models, randomize, write_diffusers_folder  # noqa: E402

from sdlib.ldm import load_ldm  # noqa: E402

pytestmark = pytest.mark.slow
TINY = ["data.image_size=32", "data.shard_size=8", "epochs=1", "unet.samples.every=0", "unet.log_every=1",
        "sample.n_per_prompt=3", "sample.steps=2", "sample.batch_size=6", "sample.sampler=euler"]


def ran(out) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", out.stdout))


def test_finetune_preset_runs_and_reruns_only_on_new_init_files(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["pretrained"] |= {"checkpoint": str(write_diffusers_folder(tmp_path / "sd", *diffusers_models()))}
    project = copy_project(tmp_path / "project", params)
    run(["dvc", "repro", "pretrained/dvc.yaml:pretrained_convert"], project)  # `make pretrained`'s conversion
    write_image_folder(project / "data/finetune")

    out = run([sys.executable, "-m", "stages.preset", "finetune", *[a for kv in TINY for a in ("--set", kv)]], project)
    assert {"init_digest", "train_vae", "encode_latents", "encode_captions", "train_unet", "sample",
            "evaluate"} <= ran(out), out.stdout
    assert "fine-tuning models/pretrained" in out.stdout + out.stderr
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["n_samples"] == 6 and "vae_psnr" in metrics
    tuned, _ = load_ldm(project / "models/unet/model.safetensors")
    pretrained, _ = load_ldm(project / "models/pretrained/model.safetensors")
    assert all(torch.equal(v, pretrained.text.state_dict()[k]) for k, v in tuned.text.state_dict().items())

    out = run(["dvc", "repro", "dvc.yaml"], project)  # init_digest runs, finds the same files: nothing after it does
    assert ran(out) == {"init_digest"}, out.stdout

    unet, vae, text = diffusers_models()  # new U-Net weights in the checkpoint, converted again
    randomize(unet, seed=3)
    unet.save_pretrained(tmp_path / "sd/unet")
    run(["dvc", "repro", "pretrained/dvc.yaml:pretrained_convert"], project)
    out = run(["dvc", "repro", "dvc.yaml"], project)
    assert {"init_digest", "encode_captions", "train_unet"} <= ran(out), out.stdout
    assert not {"train_vae", "encode_latents"} & ran(out), out.stdout
