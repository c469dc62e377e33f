"""The stages of pretrained/dvc.yaml run in-process on tiny SD-v1-shaped checkpoints (both layouts), with params.

`pretrained_convert` then `pretrained_sample` draw exactly what `python -m stages.sample --pretrained` draws from the
checkpoint itself (so the converted model is the checkpoint's, and the two share one drawing code path);
`pretrained_evaluate` scores against a folder of reference images, or says there are none; bad params are one line.
The whole pipeline under `dvc repro` is in test_pretrained_pipeline.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

diffusers = pytest.importorskip("diffusers")
from test_pretrained import compvis_state_dict, diffusers_models, write_diffusers_folder  # noqa: E402

from sdlib.ldm import load_ldm  # noqa: E402
from sdlib.pretrained.load import load_pretrained  # noqa: E402
from stages import pretrained_convert, pretrained_evaluate, pretrained_sample, sample  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = {"prompts": ["a red cube", "a blue sphere"], "n_per_prompt": 2, "sampler": "euler", "steps": 2,
          "guidance": 5.0, "schedule": "auto", "negative_prompt": "blurry", "seed": 7, "batch_size": 3,
          "height": 48, "width": 72, "clip_skip": 2}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny diffusers folder and the same weights as a CompVis single file."""
    root = tmp_path_factory.mktemp("sd")
    unet, vae, text = diffusers_models()
    save_file(compvis_state_dict(unet, vae, text), str(root / "sd.safetensors"))
    return {"folder": write_diffusers_folder(root / "diffusers", unet, vae, text), "single": root / "sd.safetensors"}


def invoke(app, *args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res, res.output.strip().splitlines()


def pipeline_params(params_file, checkpoint, changed: dict | None = None):
    return params_file(pretrained={"checkpoint": str(checkpoint), "architecture": "tiny_sd_v1", "weights": "ema",
                                   "prediction": "auto", "sample": SAMPLE} | (changed or {}))


def pixels(folder) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("0*.png"))}


@pytest.mark.parametrize("layout", ["folder", "single"])
def test_convert_then_sample_draws_what_sample_pretrained_draws(checkpoints, params_file, tmp_path, layout):
    """Planted bugs caught: the text encoder's weights lost in conversion; clip_skip not passed on to the drawing."""
    params = pipeline_params(params_file, checkpoints[layout])
    res, lines = invoke(pretrained_convert.app, "--params", params, "--out", tmp_path / "model")
    assert res.exit_code == 0, res.output
    kind = "diffusers" if layout == "folder" else "compvis"
    assert f"({kind}, U-Net weights as stored, eps-prediction)" in res.output
    model, meta = load_ldm(tmp_path / "model" / "model.safetensors")
    ref = load_pretrained(checkpoints[layout], config=pretrained_convert.ARCHITECTURES["tiny_sd_v1"])
    assert meta["pretrained"]["checkpoint"] == str(checkpoints[layout])
    assert all(torch.equal(v, ref.model.state_dict()[k]) for k, v in model.state_dict().items())

    res, lines = invoke(pretrained_sample.app, "--params", params, "--model", tmp_path / "model",
                        "--out", tmp_path / "ours", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "4 images (euler, 2 steps, guidance 5.0, 72x48)" in res.output
    arch = ["--architecture", "tiny_sd_v1"] if layout == "single" else []
    res, _ = invoke(sample.app, "--pretrained", checkpoints[layout], *arch, "--prompt", "a red cube",
                    "--prompt", "a blue sphere", "--n", 2, "--sampler", "euler", "--steps", 2, "--guidance", 5,
                    "--negative-prompt", "blurry", "--seed", 7, "--batch-size", 3, "--height", 48, "--width", 72,
                    "--clip-skip", 2, "--out", tmp_path / "theirs", "--device", "cpu")
    assert res.exit_code == 0, res.output
    ours, theirs = pixels(tmp_path / "ours"), pixels(tmp_path / "theirs")
    assert len(ours) == 4 and ours.keys() == theirs.keys()
    assert all(a.shape == (48, 72, 3) and np.array_equal(a, theirs[k]) for k, a in ours.items())
    columns = ["prompt", "label", "seed"]
    assert pd.read_csv(tmp_path / "ours" / "manifest.csv")[columns].equals(
        pd.read_csv(tmp_path / "theirs" / "manifest.csv")[columns])
    assert (tmp_path / "ours" / "schedule.json").read_text() == (tmp_path / "theirs" / "schedule.json").read_text()


@pytest.fixture(scope="module")
def drawn(checkpoints, tmp_path_factory):
    """A converted model and its 4 samples (72x48), with the params that made them."""
    root = tmp_path_factory.mktemp("drawn")
    params = root / "params.yaml"
    values = yaml.safe_load((REPO / "params.yaml").read_text())
    values["pretrained"] |= {"checkpoint": str(checkpoints["folder"]), "sample": SAMPLE}
    params.write_text(yaml.safe_dump(values))
    with pytest.MonkeyPatch.context() as mp:  # module scope: conftest's tracking switch is not on yet
        mp.setenv("SDLIB_TRACKING", "off")
        for app, args in ((pretrained_convert.app, ["--out", root / "model"]),
                          (pretrained_sample.app, ["--model", root / "model", "--out", root / "samples",
                                                   "--device", "cpu"])):
            res, _ = invoke(app, "--params", params, *args)
            assert res.exit_code == 0, res.output
    return root


def evaluate(params_file, drawn, tmp_path, reference, weights=""):
    params = params_file(pretrained={"reference": str(reference)}, evaluate={"inception_weights": str(weights)})
    res, lines = invoke(pretrained_evaluate.app, "--params", params, "--samples", drawn / "samples",
                        "--out", tmp_path / "metrics.json", "--device", "cpu")
    return res, lines, tmp_path / "metrics.json"


def test_evaluate_without_reference_images_says_so(drawn, params_file, tmp_path):
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "README.md").write_text("not an image")
    res, lines, out = evaluate(params_file, drawn, tmp_path, tmp_path / "refs")
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text()) == {"n_samples": 4, "n_reference": 0}
    assert "no reference images in" in res.output


def test_evaluate_scores_fid_and_kid_against_the_reference(drawn, params_file, tmp_path, inception_weights):
    """The samples themselves are a reference at FID ~0; grey images of another size and shape are far.
    Planted bug caught: reference images not fitted to the samples' size (a shape error)."""
    refs, grey = tmp_path / "refs", tmp_path / "grey"
    refs.mkdir(), grey.mkdir()
    for p in sorted((drawn / "samples").glob("0*.png")):
        shutil.copyfile(p, refs / p.name)
        Image.new("RGB", (30, 50), (128, 128, 128)).save(grey / p.name.replace(".png", ".jpg"))
    res, _, out = evaluate(params_file, drawn, tmp_path, refs, inception_weights)
    assert res.exit_code == 0, res.output
    same = json.loads(out.read_text())
    res, _, out = evaluate(params_file, drawn, tmp_path, grey, inception_weights)
    assert res.exit_code == 0, res.output
    far = json.loads(out.read_text())
    assert same.keys() == far.keys() == {"n_samples", "n_reference", "fid", "kid", "kid_std"}
    assert same["n_reference"] == 4 and abs(same["fid"]) < 1e-2 and far["fid"] > 1.0 and far["kid"] > same["kid"]


BAD = [
    ("convert", {"checkpoint": "nowhere/sd.safetensors"}, "pretrained.checkpoint: nowhere/sd.safetensors not found "
     "(set it to your SD v1.x checkpoint"),
    ("convert", {"architecture": "sd_v2"},
     "params: pretrained.architecture must be one of sd_v1, tiny_sd_v1, got 'sd_v2'"),
    ("convert", {"weights": "best"}, "bad value for 'pretrained.weights'"),
    ("sample", {"sample": {**SAMPLE, "height": 100}}, "bad value for 'pretrained.sample.height' (100)"),
    ("sample", {"sample": {**SAMPLE, "sampler": "dpm_fast"}}, "bad value for 'pretrained.sample.sampler'"),
    ("sample", {"sample": {**SAMPLE, "clip_skip": 3}}, "pretrained.sample.clip_skip must lie in 1..2"),
    ("evaluate", {"reference": "{drawn}/samples"}, "evaluate.inception_weights is empty"),
    ("evaluate", {"reference": "{drawn}/nowhere"}, "nowhere: not a folder"),
]


@pytest.mark.parametrize("stage, pretrained, message", BAD, ids=[m[:40] for *_, m in BAD])
def test_bad_params_are_one_line_and_write_nothing(checkpoints, drawn, params_file, tmp_path, stage, pretrained,
                                                   message):
    pretrained = {k: v.format(drawn=drawn) if isinstance(v, str) else v for k, v in pretrained.items()}
    params = pipeline_params(params_file, checkpoints["folder"], pretrained)
    app, args = {"convert": (pretrained_convert.app, []),
                 "sample": (pretrained_sample.app, ["--model", drawn / "model", "--device", "cpu"]),
                 "evaluate": (pretrained_evaluate.app, ["--samples", drawn / "samples"])}[stage]
    res, lines = invoke(app, "--params", params, "--out", tmp_path / "out", *args)
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output
    assert not (tmp_path / "out").exists()
