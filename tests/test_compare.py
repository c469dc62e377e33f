"""The sampler comparison: which runs it plans, and the stage end to end on a tiny untrained model."""
import dataclasses

import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sdlib.config import CompareConfig, parse_section
from sdlib.data.captions import DIGIT_NAMES
from sdlib.diffusion.samplers import SAMPLERS
from sdlib.errors import ConfigError
from sdlib.evaluation.compare import planned_runs
from sdlib.models.classifier import Classifier, ClassifierArgs, save_classifier
from stages.compare_samplers import app


def test_planned_runs_add_recommended_counts_and_extras_once():
    cfg = CompareConfig(samplers=("dpmpp_2m", "heun"), steps=(10, 20), extra=("ddpm:250", "heun:10"))
    assert planned_runs(cfg) == [("dpmpp_2m", 10, False), ("dpmpp_2m", 20, True), ("heun", 10, False),
                                 ("heun", 20, True), ("ddpm", 250, False)]


@pytest.mark.parametrize("values, message", [
    ({"extra": ["ddpm-250"]}, "'ddpm-250' is not sampler:steps"),
    ({"extra": ["magic:20"]}, "bad value for 'compare.extra' \\('magic'\\): choose from ddpm, "),
    ({"steps": [0, 10]}, "step counts in 1..1000"),
    ({"samplers": ["euler", "magic"]}, "bad value for 'compare.samplers' \\('magic'\\)"),
    ({"samplers": []}, "compare.samplers"),
])
def test_bad_compare_params(values, message):
    """Shape errors are found when the section is read, unknown sampler names when the runs are planned."""
    with pytest.raises(ConfigError, match=message):
        planned_runs(parse_section("compare", {"samplers": ["euler"], **values}))


@pytest.fixture
def workspace(tmp_path, tiny_models, params_file, noise_digits):
    """8x8 'digits' (noise), a tiny untrained classifier, and params for two prompts x 3 images, two runs."""
    noise_digits(tmp_path / "processed", 20, 12, channels=1, size=8)
    torch.manual_seed(0)
    save_classifier(tmp_path / "classifier.safetensors", Classifier(ClassifierArgs(image_size=8, width=4)),
                    list(DIGIT_NAMES))
    params = params_file(sample={"prompts": ["8", "a handwritten digit three"]},
                         compare={"samplers": ["euler"], "steps": [2], "extra": ["ddim:3"], "n_per_prompt": 3,
                                  "batch_size": 4})
    args = ["--params", str(params), "--unet", str(tiny_models / "unet"), "--vae", str(tiny_models / "vae.safetensors"),
            "--data", str(tmp_path / "processed"), "--classifier", str(tmp_path / "classifier.safetensors"),
            "--out", str(tmp_path / "samplers.csv"), "--plot", str(tmp_path / "samplers.png"), "--device", "cpu"]
    return {"args": args, "dir": tmp_path, "params_file": params_file}


def test_compare_writes_the_table_and_the_plot(workspace, monkeypatch):
    for name, steps in (("euler", 4), ("ddim", 50)):
        monkeypatch.setitem(SAMPLERS, name, dataclasses.replace(SAMPLERS[name], steps=steps))
    result = CliRunner().invoke(app, workspace["args"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(workspace["dir"] / "samplers.csv")
    assert list(table.columns) == ["sampler", "steps", "recommended", "guidance", "fid", "cond_acc", "seconds"]
    assert table[["sampler", "steps", "recommended"]].values.tolist() == [["euler", 2, False], ["euler", 4, True],
                                                                         ["ddim", 3, False]]
    assert (table["fid"] > 0).all() and table["cond_acc"].between(0, 1).all() and (table["seconds"] > 0).all()
    with Image.open(workspace["dir"] / "samplers.png") as im:
        assert im.width >= 600


def test_compare_rejects_bad_params_before_sampling(workspace):
    params = workspace["params_file"](compare={"extra": ["ddpm"]})
    args = workspace["args"]
    at = args.index("--params") + 1
    result = CliRunner().invoke(app, [*args[:at], str(params), *args[at + 1:]])
    assert result.exit_code == 2 and "'ddpm' is not sampler:steps" in result.output
    assert not (workspace["dir"] / "samplers.csv").exists()


def test_compare_resumes_after_an_interruption(workspace, monkeypatch):
    """Runs finished before a kill are kept in the checkpoint and not redone; the table equals an uninterrupted one."""
    import stages.compare_samplers as stage

    ckpt = workspace["dir"] / "compare.json"
    args = [*workspace["args"], "--checkpoint", str(ckpt)]
    assert CliRunner().invoke(app, args).exit_code == 0
    reference = pd.read_csv(workspace["dir"] / "samplers.csv")
    assert not ckpt.exists()  # removed once the table is written

    real_generate, calls = stage.generate, []

    def dies_in_the_third_run(*a, **kw):
        calls.append(kw["sampler"])
        if len(calls) > 2 * 2:  # 6 images in batches of 4: two calls per run
            raise KeyboardInterrupt
        return real_generate(*a, **kw)

    monkeypatch.setattr(stage, "generate", dies_in_the_third_run)
    (workspace["dir"] / "samplers.csv").unlink()
    CliRunner().invoke(app, args)
    assert ckpt.exists() and not (workspace["dir"] / "samplers.csv").exists()

    monkeypatch.setattr(stage, "generate", lambda *a, **kw: calls.append(kw["sampler"]) or real_generate(*a, **kw))
    calls.clear()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output and calls == ["ddim", "ddim"]  # only the unfinished run
    table = pd.read_csv(workspace["dir"] / "samplers.csv")
    pd.testing.assert_frame_equal(table.drop(columns="seconds"), reference.drop(columns="seconds"))
