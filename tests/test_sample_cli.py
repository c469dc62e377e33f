"""The generate command (`python -m stages.sample`) on a tiny saved model: outputs, and one-line errors."""
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from stages.sample import app

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tiny_models):
    root = tiny_models
    Image.new("L", (8, 8), 128).save(root / "ok.png")
    Image.new("L", (20, 20), 128).save(root / "big.png")
    (root / "broken.png").write_bytes(b"not a png")
    return root


def invoke(models, tmp_path, *args):
    base = ["--unet", str(models / "unet"), "--vae", str(models / "vae.safetensors"), "--params", str(REPO / "params.yaml"),
            "--out", str(tmp_path / "out"), "--device", "cpu"]
    return CliRunner().invoke(app, [*base, *args])


def test_generate_writes_pngs_manifest_and_grid(models, tmp_path, monkeypatch):
    monkeypatch.setenv("SDLIB_TRACKING", "off")
    res = invoke(models, tmp_path, "--prompt", "8", "--prompt", "a handwritten digit three", "--n", "2",
                 "--sampler", "euler", "--steps", "3", "--seed", "7")
    assert res.exit_code == 0, res.output
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert manifest["label"].tolist() == [8, 8, 3, 3] and manifest["seed"].tolist() == [7, 8, 9, 10]
    assert (tmp_path / "out" / "grid.png").is_file() and len(list((tmp_path / "out").glob("0*.png"))) == 4
    res = invoke(models, tmp_path, "--prompt", "8", "--n", "1", "--steps", "2", "--init-image",
                 str(models / "ok.png"), "--strength", "0.5")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sampler", "magic"], "bad value for 'sample.sampler'"),
        (["--steps", "0"], "bad value for 'sample.steps'"),
        (["--prompt", " "], "bad value for 'sample.prompts'"),
        (["--init-image", "{m}/broken.png"], "cannot read init image"),
        (["--init-image", "{m}/big.png"], "init image is 20x20 (width x height), the drawing 8x8"),
        (["--init-image", "{m}/ok.png", "--strength", "0"], "--strength must lie in (0, 1]"),
        (["--unet", "{m}/missing"], "checkpoint not found"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(models, tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("SDLIB_TRACKING", "off")
    res = invoke(models, tmp_path, "--n", "1", "--steps", "2", *[a.format(m=models) for a in args])
    assert res.exit_code == 2
    assert message in res.output and res.output.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()


def test_unicode_and_over_long_prompts(models, tmp_path, monkeypatch):
    """Unicode prompts draw (byte-level BPE covers every character); a prompt over the model's context length is cut
    with a warning naming it, and still draws."""
    monkeypatch.setenv("SDLIB_TRACKING", "off")
    long = "a handwritten digit eight " * 20
    cut = r"1 of 2 prompts are longer than 8 tokens and were truncated, e\.g\. .a handwritten digit"
    with pytest.warns(UserWarning, match=cut):
        res = invoke(models, tmp_path, "--prompt", "八 ✓", "--prompt", long, "--n", "1", "--steps", "2")
    assert res.exit_code == 0, res.output
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv", keep_default_na=False)
    assert manifest["prompt"].tolist() == ["八 ✓", long]
    assert manifest["label"].tolist() == [-1, 8]  # an over-long prompt still names its digit
