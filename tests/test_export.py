"""`python -m sdlib.export`: a model trained here, or a pretrained SD v1.x checkpoint, written as a diffusers folder
or a CompVis single file. diffusers' StableDiffusionPipeline draws from the folder what sdlib draws; `load_pretrained`
reads both formats back to the very tensors; a pretrained checkpoint comes out under the released names; what SD v1's
layout cannot express is one error line, and nothing is written.

The trained-layout model has the digits model's shape (two levels, one ResNet block each, attention at level 1,
linear transformer projections, GroupNorm eps 1e-6, a one-channel VAE, 16-token prompts) at widths of 32, with SD's
VAE options (the only ones diffusers has). Every weight is random, zero-initialised layers included.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

diffusers = pytest.importorskip("diffusers")
from diffusers import StableDiffusionPipeline  # noqa: E402
from test_pretrained import (  # noqa: E402
    _schedulers,
    compvis_state_dict,
    diffusers_models,
    randomize,
    write_diffusers_folder,
)
from transformers import CLIPTextModel  # noqa: E402

from sdlib.diffusion.samplers import ImageRNG  # noqa: E402
from sdlib.export import app  # noqa: E402
from sdlib.generate import Prompts, generate, sampling_sigmas  # noqa: E402
from sdlib.ldm import DiffusionArgs, LatentDiffusion, save_ldm  # noqa: E402
from sdlib.models.text import TextEncoderArgs, write_clip_tokenizer_files  # noqa: E402
from sdlib.models.unet import UNetArgs  # noqa: E402
from sdlib.models.vae import AutoencoderKL, VAEArgs, save_vae  # noqa: E402
from sdlib.pretrained.export import refusals  # noqa: E402
from sdlib.pretrained.load import load_pretrained  # noqa: E402
from sdlib.pretrained.sd_v1 import SDConfig  # noqa: E402

UNET = dict(in_channels=4, context_dim=32, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
            attention_levels=(1,), num_heads=4)
VAE = dict(in_channels=1, base_channels=32, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4,
           quant_conv="1x1", downsample_pad="asymmetric", attention_qkv="separate")
TEXT = dict(hidden_size=32, num_layers=1, num_heads=2, max_length=16)
LATENT_HW = (4, 8)  # non-square: diffusers' sample_size is then a list


def build(unet: dict | None = None, vae: dict | None = None,
          diffusion: dict | None = None) -> tuple[LatentDiffusion, AutoencoderKL]:
    """The trained-layout model with some arguments replaced, every weight random."""
    model = LatentDiffusion(unet=UNetArgs(**{**UNET, **(unet or {})}), text=TextEncoderArgs(**TEXT),
                            diffusion=DiffusionArgs(**{"scale_factor": 0.9, **(diffusion or {})}), latent_hw=LATENT_HW)
    autoencoder = AutoencoderKL(VAEArgs(**{**VAE, **(vae or {})}))
    randomize(model, seed=0), randomize(autoencoder, seed=1)
    return model.eval(), autoencoder.eval()


def write_trained(root, model: LatentDiffusion, vae: AutoencoderKL):
    """The model as train_unet and train_vae write it: models/unet (weights + tokenizer) and models/vae.safetensors."""
    save_ldm(root / "unet" / "model.safetensors", model)
    write_clip_tokenizer_files(root / "unet" / "tokenizer")
    save_vae(root / "vae.safetensors", vae)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """prediction -> (folder with unet/ and vae.safetensors, model, VAE)."""
    out = {}
    for prediction in ("eps", "v"):
        model, vae = build(diffusion={"prediction": prediction})
        out[prediction] = write_trained(tmp_path_factory.mktemp(f"trained-{prediction}"), model, vae), model, vae
    return out


def export(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def export_trained(root, out, *args):
    return export("--unet", root / "unet", "--vae", root / "vae.safetensors", "--out", out, *args)


def _state(model: LatentDiffusion, vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    return {**{f"unet.{k}": v for k, v in model.unet.state_dict().items()},
            **{f"text.{k}": v for k, v in model.text.state_dict().items()},
            **{f"vae.{k}": v for k, v in vae.state_dict().items()}}


# --- diffusers draws from the exported folder what sdlib draws --------------------------------------------------------

@pytest.mark.parametrize("sampler, prediction", [("euler", "eps"), ("ddim", "v"), ("dpmpp_2m", "v")])
@torch.no_grad()
def test_stable_diffusion_pipeline_draws_what_sdlib_draws(trained, tmp_path, sampler, prediction):
    """The folder loads in StableDiffusionPipeline.from_pretrained (its tokenizer pads to 16 tokens, its scheduler
    config gives the betas and the prediction type); from the same initial latents, with guidance, it draws sdlib's
    images.

    Tolerance 1e-4 on images in [0, 1], as test_pretrained's pipeline tests: the networks agree to float32 rounding, and
    diffusers builds its schedules in float64 NumPy where sdlib uses float32, which moves pixels by ~1e-5 (measured
    here: 5e-7 to 3e-6). A misplaced weight moves them by 1e-2 or more. Planted bugs caught: the U-Net's attn1 to_k
    and to_v swapped in the export (9e-2 to 2e-1; every round trip and name test fails too); epsilon written as the
    prediction type of a v model; the tokenizer left padding to 77 tokens.
    """
    root, model, vae = trained[prediction]
    res = export_trained(root, tmp_path / "sd")
    assert res.exit_code == 0, res.output
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    scheduler, start, schedule = _schedulers()[sampler]
    exported = pipe.scheduler.config  # the exported schedule and prediction type, with the sampler's settings
    pipe.scheduler = type(scheduler).from_config(scheduler.config, **{
        k: exported[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")})
    assert pipe.scheduler.config.prediction_type == {"eps": "epsilon", "v": "v_prediction"}[prediction]
    assert pipe.tokenizer.model_max_length == 16 and pipe.vae.config.scaling_factor == 0.9

    texts, seeds, steps, guidance = ["a red cube", "a blue sphere"], [7, 8], 4, 5.0
    ours = generate(model, vae, Prompts(root / "unet" / "tokenizer", model), texts, seeds, sampler=sampler,
                    steps=steps, guidance=guidance, schedule=schedule)
    noise = ImageRNG(seeds).randn((4, *LATENT_HW))
    if start == "vp":  # the pipeline starts from x_T in VP coordinates; sdlib's x_T = noise * sigma_max is VE
        sigma_max = sampling_sigmas(model, sampler, steps, schedule)[0]
        noise = noise * sigma_max / (1 + sigma_max**2) ** 0.5
    theirs = pipe(prompt=texts, negative_prompt=[""] * 2, num_inference_steps=steps, guidance_scale=guidance,
                  latents=noise, output_type="pt", height=8, width=16).images  # (B, 1, 8, 16) in [0, 1]
    assert ours.shape == theirs.shape == (2, 1, 8, 16)
    assert float(((ours + 1) / 2 - theirs).abs().max()) <= 1e-4


# --- export, then load_pretrained: the same tensors -------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("fmt", ["diffusers", "single-file"])
def test_round_trip_is_exact(trained, tmp_path, fmt, prediction):
    """A single file records neither architecture nor prediction type (as CompVis'), so both are given back.

    Planted bug caught: norm_eps written as 1e-5 instead of the model's 1e-6, which moves the pipeline test's images
    by less than its bound."""
    root, model, vae = trained[prediction]
    out = tmp_path / ("sd.safetensors" if fmt == "single-file" else "sd")
    res = export_trained(root, out, "--format", fmt)
    assert res.exit_code == 0, res.output
    if fmt == "diffusers":
        back = load_pretrained(out)
    else:
        assert "a single file records no architecture" in res.output
        config = SDConfig(unet=model.unet_args, vae=vae.args, text=model.text_args, diffusion=model.diffusion,
                          latent_hw=model.latent_hw)
        back = load_pretrained(out, config=config, prediction=prediction)
    ours, theirs = _state(model, vae), _state(back.model, back.vae)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (back.model.unet_args, back.vae.args, back.model.text_args) == (model.unet_args, vae.args, model.text_args)
    assert (back.model.diffusion, back.model.latent_hw) == (model.diffusion, model.latent_hw)
    prompts = ["a red cube", ""]
    assert torch.equal(Prompts.from_tokenizer(back.tokenizer, back.model).ids(prompts),
                       Prompts(root / "unet" / "tokenizer", model).ids(prompts))


# --- a pretrained checkpoint comes out under the released names -------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    unet, vae, text = diffusers_models()
    return write_diffusers_folder(root / "diffusers", unet, vae, text), (unet, vae, text)


def test_pretrained_folder_to_single_file_has_compvis_names(pretrained, tmp_path):
    """Against the CompVis file that test_pretrained writes (and checks with diffusers' own converter): the same keys,
    shapes (the VAE's attention as 1x1 convolutions) and values, less the schedule buffers.

    Planted bug caught: the VAE's attention written as linear maps (which load_pretrained would still read)."""
    folder, models = pretrained
    res = export("--pretrained", folder, "--format", "single-file", "--out", tmp_path / "sd.safetensors")
    assert res.exit_code == 0, res.output
    assert "--architecture tiny_sd_v1" in res.output
    ours = load_file(tmp_path / "sd.safetensors")
    want = {k: v for k, v in compvis_state_dict(*models).items()
            if k not in ("alphas_cumprod", "betas") and not k.endswith("position_ids")}
    assert ours.keys() == want.keys()
    assert ours["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert all(torch.equal(ours[k], want[k]) for k in want)


def test_pretrained_single_file_to_folder_has_diffusers_names(pretrained, tmp_path):
    """The folder holds diffusers' own key names and config values, and transformers' CLIP text model."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import UNet2DConditionModel
    _, (unet, vae, text) = pretrained
    single = tmp_path / "sd.safetensors"
    save_file(compvis_state_dict(unet, vae, text), str(single))
    res = export("--pretrained", single, "--architecture", "tiny_sd_v1", "--out", tmp_path / "sd")
    assert res.exit_code == 0, res.output
    for name, ref, cls in (("unet", unet, UNet2DConditionModel), ("vae", vae, DiffusersVAE),
                           ("text_encoder", text, CLIPTextModel)):
        got = cls.from_pretrained(tmp_path / "sd" / name, local_files_only=True)
        ours, theirs = got.state_dict(), ref.state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs), name
        if name != "text_encoder":
            stored = load_file(tmp_path / "sd" / name / "diffusion_pytorch_model.safetensors")
            assert stored.keys() == theirs.keys(), name
            plain = lambda c: {k: list(v) if isinstance(v, tuple) else v for k, v in c.items() if k[0] != "_"}
            assert plain(got.config) == plain(ref.config), name


# --- what SD v1's layout cannot express: one line, nothing written ---------------------------------------------------

REFUSED = [
    ({"unet": {"skip": "add"}}, "unet.skip=add (diffusers' U-Net concatenates its skip connections)"),
    ({"vae": {"quant_conv": "none", "downsample_pad": "symmetric", "attention_qkv": "fused"}},  # a VAE trained here
     "vae.quant_conv=none (SD v1's VAE has 1x1 quant_conv and post_quant_conv); vae.downsample_pad=symmetric "
     "(diffusers' VAE pads right and bottom only); vae.attention_qkv=fused (SD v1's VAE has separate q, k and v maps)"),
    ({"unet": {"model_channels": 16}}, "unet widths [16, 32] (diffusers normalises in 32 groups"),
    ({"diffusion": {"beta_schedule": "cosine"}}, "unet.beta_schedule=cosine over 1000 steps"),
]


@pytest.mark.parametrize("fmt", ["diffusers", "single-file"])
@pytest.mark.parametrize("change, message", REFUSED, ids=[m[:24] for _, m in REFUSED])
def test_refusal_is_one_line_and_writes_nothing(tmp_path, change, message, fmt):
    """Planted bug caught: the single-file writer not checking (it wrote the file)."""
    root = write_trained(tmp_path / "models", *build(**change))
    out = tmp_path / ("sd.safetensors" if fmt == "single-file" else "sd")
    res = export_trained(root, out, "--format", fmt)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot export to SD v1's layout: ") and message in lines[0]
    assert not out.exists() and not list(tmp_path.glob("**/.*.tmp"))


def test_text_encoder_read_back_as_sd2_is_refused():
    with torch.device("meta"):  # arguments only: no 50M-parameter embedding
        model, vae = LatentDiffusion(unet=UNetArgs(**{**UNET, "context_dim": 1024}), text=TextEncoderArgs(
            hidden_size=1024, num_layers=1, num_heads=2), diffusion=DiffusionArgs()), AutoencoderKL(VAEArgs(**VAE))
    assert refusals(model, vae) == ["text.hidden_size=1024 (reads back as SD 2.x's OpenCLIP text encoder)"]


BAD = [
    (["--format", "onnx", "--out", "{tmp}/sd"], "--format must be one of diffusers, single-file, got 'onnx'"),
    (["--format", "single-file", "--out", "{tmp}/sd.ckpt"], "--out {tmp}/sd.ckpt: a single file is written as"),
    (["--out", "{tmp}/file"], "--out {tmp}/file is a file; --format diffusers writes a folder"),
    (["--pretrained", "{folder}", "--unet", "{tmp}", "--out", "{tmp}/sd"], "--pretrained contradicts --unet"),
    (["--pretrained", "{folder}", "--architecture", "tiny_sd_v1", "--out", "{tmp}/sd"], "--architecture and --weights"),
    (["--pretrained", "{folder}", "--out", "{folder}"], "is the --pretrained checkpoint itself"),
    (["--prediction", "v", "--out", "{tmp}/sd"], "--prediction applies to a --pretrained checkpoint only"),
    (["--pretrained", "{folder}", "--prediction", "x0", "--out", "{tmp}/sd"], "prediction must be eps or v"),
    (["--unet", "{tmp}/nowhere", "--out", "{tmp}/sd"], "model.safetensors: checkpoint not found"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[m[:32] for _, m in BAD])
def test_bad_options_are_one_line(pretrained, tmp_path, args, message):
    (tmp_path / "file").write_text("")
    fill = {"tmp": tmp_path, "folder": pretrained[0]}
    res = export(*[a.format(**fill) for a in args])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.format(**fill) in lines[0], res.output
    assert not (tmp_path / "sd").exists()


def test_failed_write_keeps_the_previous_output(trained, tmp_path, monkeypatch):
    """A write that fails half-way (here the second weights file) leaves the old folder and no temporary files."""
    import sdlib.pretrained.export as export_module
    root = trained["eps"][0]
    out = tmp_path / "sd"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    calls = []

    def failing_save(*args, **kw):
        calls.append(args)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(*args, **kw)

    monkeypatch.setattr(export_module, "save_file", failing_save)
    res = export_trained(root, out)
    assert isinstance(res.exception, OSError) and str(res.exception) == "disk full"
    assert [p.name for p in out.iterdir()] == ["old.txt"] and not list(tmp_path.glob(".*"))
