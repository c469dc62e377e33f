"""Bad input, stage by stage: each gives a one-line `error:` and exit code 2 before any long work, and writes nothing."""
import importlib
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from sdlib.config import load_all
from sdlib.data.latents import write_latents

DROP = object()  # set_param value that removes the key


@pytest.fixture
def workspace(tmp_path, monkeypatch, tiny_models):
    """A working directory holding a valid params.yaml, a corrupt 'processed' dataset and checkpoints, latents folders
    without or with a corrupt meta.json, and a U-Net folder without its tokenizer."""
    repo = Path(__file__).resolve().parents[1]
    load_all(repo / "params.yaml")
    (tmp_path / "params.yaml").write_text((repo / "params.yaml").read_text())
    (tmp_path / "corrupt").mkdir()
    for name in ("train-images-00000.npy", "train-labels.npy", "test-images-00000.npy", "test-labels.npy",
                 "meta.json", "captions.parquet", "model.safetensors"):
        (tmp_path / "corrupt" / name).write_bytes(b"\x00garbage")
    (tmp_path / "old").mkdir()  # a processed folder of the format before shards
    save_file({"images": torch.zeros(2, 1, 8, 8), "labels": torch.zeros(2, dtype=torch.long)},
              str(tmp_path / "old" / "train.safetensors"))
    (tmp_path / "latents").mkdir()
    latents = (torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8), torch.zeros(2, dtype=torch.long))
    for name, meta in (("latents-nometa", None), ("latents-badmeta", "{not json")):
        write_latents(tmp_path / name, {"train": latents})
        (tmp_path / name / "meta.json").unlink()
        if meta is not None:
            (tmp_path / name / "meta.json").write_text(meta)
    (tmp_path / "unet-notok").mkdir()
    shutil.copy(tiny_models / "unet" / "model.safetensors", tmp_path / "unet-notok" / "model.safetensors")
    shutil.copy(tiny_models / "vae.safetensors", tmp_path / "vae.safetensors")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def set_param(path, dotted, value):
    params = yaml.safe_load(path.read_text())
    *sections, key = dotted.split(".")
    target = params
    for section in sections:  # nested sections too: unet.samples.every
        target = target[section]
    if value is DROP:
        del target[key]
    else:
        target[key] = value
    path.write_text(yaml.safe_dump(params))


CASES = [
    # (stage, params change, extra args, expected message, output that must not appear)
    ("download", ("data.source", "imagenet"), [], "bad value for 'data.source'", "data/raw"),
    ("download", ("data.source", "folder"), [], "folder not found", "data/raw"),
    ("download", ("data.seed", -1), [], "bad value for 'data.seed'", "data/raw"),
    ("download", ("data.image_size", 30), [], "bad value for 'data.image_size'", "data/raw"),
    ("train_vae", ("seed", -1), [], "bad value for 'seed'", "models/vae.safetensors"),
    ("preprocess", ("data.image_size", 30), [], "bad value for 'data.image_size'", "data/processed"),
    ("preprocess", None, ["--raw", "missing"], "missing", "data/processed"),
    ("train_vae", ("vae.lr", "fast"), [], "bad value for 'vae.lr'", "models/vae.safetensors"),
    ("train_vae", ("vae.epochs", 0), [], "params: vae.epochs 0 needs vae.init_from", "models/vae.safetensors"),
    ("train_vae", None, ["--data", "missing"], "run the preprocess stage first", "models/vae.safetensors"),
    ("train_vae", None, ["--data", "corrupt"], "corrupt", "models/vae.safetensors"),
    ("train_vae", None, ["--data", "old"], "older single-file format (train.safetensors); re-run the preprocess stage",
     "models/vae.safetensors"),
    ("encode_latents", None, ["--vae", "corrupt/model.safetensors"], "not a readable safetensors checkpoint",
     "data/latents"),
    ("train_unet", ("epochs", "many"), [], "bad value for 'epochs'", "models/unet"),
    ("train_unet", ("unet.skip", "multiply"), [], "bad value for 'unet.skip'", "models/unet"),
    ("train_unet", ("text.max_length", 100), [], "bad value for 'text.max_length'", "models/unet"),
    ("train_unet", None, ["--latents", "latents"], "run the encode_latents stage first", "models/unet"),
    ("train_unet", ("unet", DROP), [], "missing section 'unet'", "models/unet"),
    ("train_unet", ("unet.num_heads", 5), [], "bad value for 'unet.num_heads' (5): Value error, must divide",
     "models/unet"),
    ("train_unet", ("unet.samples.every", -1), [], "bad value for 'unet.samples.every' (-1)", "models/unet"),
    ("train_unet", ("unet.samples.sampler", "magic"), [], "bad value for 'unet.samples.sampler'", "models/unet"),
    ("train_unet", None, ["--latents", "latents-nometa"], "no meta.json (run the encode_latents stage first)",
     "models/unet"),
    ("train_unet", None, ["--latents", "latents-badmeta"], "corrupt latents", "models/unet"),
    ("train_classifier", ("classifier.batch_size", 0), [], "bad value for 'classifier.batch_size'",
     "models/classifier.safetensors"),
    ("sample", ("sample.sampler", "magic"), [], "bad value for 'sample.sampler'", "reports/samples"),
    ("sample", ("sample.guidance", -1), [], "bad value for 'sample.guidance'", "reports/samples"),
    ("sample", None, ["--unet", "corrupt"], "not a readable safetensors checkpoint", "reports/samples"),
    ("sample", None, [], "checkpoint not found", "reports/samples"),
    ("sample", None, ["--params", "nowhere.yaml"], "nowhere.yaml: params file not found", "reports/samples"),
    ("sample", None, ["--guidance", "inf"], "bad value for 'sample.guidance' (inf)", "reports/samples"),
    ("sample", None, ["--unet", "unet-notok", "--vae", "vae.safetensors"], "no vocab.json, merges.txt",
     "reports/samples"),
    ("sample", None, ["--out", "params.yaml/x"], "params.yaml is a file, not a folder", "params.yaml/x"),
    ("evaluate", ("evaluate.inception_weights", "nowhere.pth"), [], "nowhere.pth not found", "reports/metrics.json"),
    ("evaluate", None, [], "not found", "reports/metrics.json"),
    ("evaluate", ("evaluate.seed_sets", 0), [], "bad value for 'evaluate.seed_sets'", "reports/metrics.json"),
    ("report", None, [], "run the evaluate stage first", "reports/report.md"),
    ("compare_samplers", ("compare.extra", ["ddpm"]), [], "'ddpm' is not sampler:steps", "reports/samplers.csv"),
    ("compare_samplers", None, [], "checkpoint not found", "reports/samplers.csv"),
]


@pytest.mark.parametrize("stage, change, args, message, output", CASES,
                         ids=[f"{c[0]}-{c[3][:30]}" for c in CASES])
def test_bad_input(workspace, stage, change, args, message, output):
    if change is not None:
        set_param(workspace / "params.yaml", *change)
    app = importlib.import_module(f"stages.{stage}").app
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (workspace / output).exists()
    assert not list(workspace.glob("**/.*.tmp")), "a temporary output was left behind"
