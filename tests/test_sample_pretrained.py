"""`python -m stages.sample --pretrained` on tiny SD-v1-shaped checkpoints (both layouts): it draws what `generate()`
draws, which in turn is what diffusers' StableDiffusionPipeline draws (also at sizes that are not multiples of 64 and
with clip skip); bad inputs are one line, exit 2, and write nothing.

The checkpoints are fabricated as in test_pretrained.py (diffusers' models with random weights, saved as a diffusers
folder and, through the key maps, as a CompVis single file).
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

diffusers = pytest.importorskip("diffusers")
from diffusers import StableDiffusionPipeline  # noqa: E402
from test_pretrained import _schedulers, compvis_state_dict, diffusers_models, write_diffusers_folder  # noqa: E402

from sdlib.data.images import to_uint8  # noqa: E402
from sdlib.diffusion.samplers import SAMPLERS, ImageRNG  # noqa: E402
from sdlib.errors import SamplingError  # noqa: E402
from sdlib.generate import Prompts, generate, load_init_image, run_sigmas, sampling_sigmas  # noqa: E402
from sdlib.pretrained.load import load_pretrained  # noqa: E402
from sdlib.pretrained.sd_v1 import TINY_SD_V1  # noqa: E402
from stages.sample import app  # noqa: E402


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """Tiny checkpoints: a diffusers folder, the same weights as a CompVis file, an EMA .ckpt, a NaN VAE, an SD2 file;
    the diffusers models; and sdlib's loaded copy."""
    root = tmp_path_factory.mktemp("sd")
    unet, vae, text = diffusers_models()
    folder = write_diffusers_folder(root / "diffusers", unet, vae, text)
    single = root / "sd.safetensors"
    tensors = compvis_state_dict(unet, vae, text)
    save_file(tensors, str(single))
    torch.save({"state_dict": compvis_state_dict(unet, vae, text, ema_offset=0.05)}, root / "ema.ckpt")
    save_file({**tensors, "first_stage_model.post_quant_conv.bias": torch.full((4,), float("nan"))},
              str(root / "nan.safetensors"))
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4),
               "cond_stage_model.model.token_embedding.weight": torch.zeros(8, 1024)}, str(root / "sd2.safetensors"))
    Image.new("RGB", (72, 48), (200, 40, 90)).save(root / "init-72x48.png")
    Image.new("RGB", (64, 64), (10, 40, 200)).save(root / "init-64x64.png")
    return {"root": root, "folder": folder, "single": single, "models": (unet, vae, text),
            "loaded": load_pretrained(folder)}


def draw(sd, tmp_path, *args):
    out = tmp_path / "out"
    return CliRunner().invoke(app, ["--out", str(out), "--device", "cpu", *[str(a).format(**sd) for a in args]]), out


def pngs(out, manifest) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(Image.open(out / p.rsplit("/", 1)[-1]))).permute(2, 0, 1)
                        for p in manifest["path"]])  # (N, 3, H, W) uint8


def direct(sd, texts, seeds, **kw) -> torch.Tensor:
    m = sd["loaded"]
    return to_uint8(generate(m.model, m.vae, Prompts.from_tokenizer(m.tokenizer, m.model), texts, seeds, **kw))


# --- the CLI draws what generate() draws ------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["folder", "single"])
def test_cli_draws_what_generate_draws(sd, tmp_path, layout):
    """Both layouts, two prompts x two images in batches of 3 (per-image seeds), a negative prompt, schedule.json.

    Planted bugs caught: seed + i instead of seed + k*n + i; the negative prompt not passed on; schedule.json written
    from the full schedule under img2img (next test)."""
    arch = ["--architecture", "tiny_sd_v1"] if layout == "single" else []
    res, out = draw(sd, tmp_path, "--pretrained", f"{{{layout}}}", *arch, "--prompt", "a red cube", "--prompt",
                    "a blue sphere", "--n", 2, "--batch-size", 3, "--sampler", "euler", "--steps", 2,
                    "--guidance", 5, "--seed", 7, "--negative-prompt", "blurry")
    assert res.exit_code == 0, res.output
    assert "4 images (euler, 2 steps, guidance 5.0, 64x64)" in res.output
    manifest = pd.read_csv(out / "manifest.csv")
    assert manifest["seed"].tolist() == [7, 8, 9, 10] and manifest["label"].tolist() == [-1] * 4
    kw = dict(sampler="euler", steps=2, guidance=5.0, negative_prompt="blurry")
    # in the CLI's batches: a batch of 4 computes the same images to within float32 rounding, not bit for bit
    want = torch.cat([direct(sd, ["a red cube"] * 2 + ["a blue sphere"], [7, 8, 9], **kw),
                      direct(sd, ["a blue sphere"], [10], **kw)])
    assert torch.equal(pngs(out, manifest), want)
    record = json.loads((out / "schedule.json").read_text())
    sigmas = run_sigmas(sd["loaded"].model, "euler", 2)
    assert record["schedule"] == "karras" and record["strength"] is None
    assert record["sigmas"] == sigmas.tolist() and len(record["timesteps"]) == 2
    assert record["timesteps"][-1] < record["timesteps"][0] <= 999


def test_cli_img2img_at_a_non_square_size(sd, tmp_path):
    """72x48 images: latents 9x6, which SD v1's U-Net halves to 5x3, 3x2, 2x1 and must bring back to 9x6."""
    res, out = draw(sd, tmp_path, "--pretrained", "{folder}", "--prompt", "a red cube", "--height", 48, "--width", 72,
                    "--init-image", "{root}/init-72x48.png", "--strength", 0.6, "--sampler", "dpmpp_2m", "--steps", 5,
                    "--seed", 3)
    assert res.exit_code == 0, res.output
    init = load_init_image(sd["root"] / "init-72x48.png", 3, (48, 72))
    want = direct(sd, ["a red cube"], [3], sampler="dpmpp_2m", steps=5, guidance=7.5, init_image=init, strength=0.6)
    got = pngs(out, pd.read_csv(out / "manifest.csv"))
    assert got.shape == (1, 3, 48, 72) and torch.equal(got, want)
    record = json.loads((out / "schedule.json").read_text())
    assert record["strength"] == 0.6 and len(record["sigmas"]) == 4  # floor(0.6 * 5) = 3 steps kept, then 0
    assert record["sigmas"] == run_sigmas(sd["loaded"].model, "dpmpp_2m", 5, strength=0.6).tolist()


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_draws(sd, tmp_path, sampler):
    res, out = draw(sd, tmp_path, "--pretrained", "{folder}", "--prompt", "a red cube", "--sampler", sampler,
                    "--steps", 2)
    assert res.exit_code == 0, res.output
    assert (out / "00_0000.png").is_file() and (out / "schedule.json").is_file()


def test_weights_prediction_and_long_prompts(sd, tmp_path):
    """--weights non_ema reads model.diffusion_model.*, --prediction overrides; a prompt over 77 tokens is cut with
    tokenize's warning and still draws."""
    long = "a very detailed photograph of a red cube " * 12
    with pytest.warns(UserWarning, match=r"1 of 1 prompts are longer than 77 tokens and were truncated"):
        res, out = draw(sd, tmp_path, "--pretrained", "{root}/ema.ckpt", "--architecture", "tiny_sd_v1", "--weights",
                        "non_ema", "--prediction", "v", "--prompt", long, "--steps", 1)
    assert res.exit_code == 0, res.output
    assert "(compvis, U-Net weights non_ema, v-prediction, float32)" in res.output


def test_cli_dtype_draws_what_generate_draws_at_that_dtype(sd, tmp_path):
    res, out = draw(sd, tmp_path, "--pretrained", "{single}", "--architecture", "tiny_sd_v1", "--dtype", "bfloat16",
                    "--prompt", "a red cube", "--steps", 2, "--seed", 5)
    assert res.exit_code == 0, res.output
    assert "(compvis, U-Net weights as stored, eps-prediction, bfloat16)" in res.output
    m = load_pretrained(sd["single"], config=TINY_SD_V1, dtype=torch.bfloat16)
    want = to_uint8(generate(m.model, m.vae, Prompts.from_tokenizer(m.tokenizer, m.model), ["a red cube"], [5],
                             steps=2, guidance=7.5))
    assert torch.equal(pngs(out, pd.read_csv(out / "manifest.csv")), want)


# --- generate() equals diffusers' pipeline where the CLI goes beyond test_pretrained ----------------------------------

@pytest.mark.parametrize("sampler, clip_skip", [("euler", 1), ("dpmpp_2m", 2)])
@torch.no_grad()
def test_generate_at_72x48_matches_stable_diffusion_pipeline(sd, sampler, clip_skip):
    """Latents 9x6 (diffusers' U-Net upsamples to its skips' sizes, as sdlib's now does) and clip skip: sdlib's
    --clip-skip 2 is the penultimate layer after the final LayerNorm, diffusers' clip_skip=1. Planted bugs caught: the U-Net upsampling to
    2x instead of the skip's size (fails to run); clip skip taking hidden_states[-clip_skip - 1] (5e-2 off)."""
    unet, vae, text = sd["models"]
    m = sd["loaded"]
    scheduler, start, schedule = _schedulers()[sampler]
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=m.tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    texts, seeds, steps, guidance = ["a red cube"], [5], 4, 5.0
    ours = generate(m.model, m.vae, Prompts.from_tokenizer(m.tokenizer, m.model), texts, seeds, sampler=sampler,
                    steps=steps, guidance=guidance, schedule=schedule, latent_hw=(6, 9), clip_skip=clip_skip)
    noise = ImageRNG(seeds).randn((4, 6, 9))
    if start == "vp":
        sigma_max = sampling_sigmas(m.model, sampler, steps, schedule)[0]
        noise = noise * sigma_max / (1 + sigma_max**2) ** 0.5
    # diffusers' clip_skip=k (hidden_states[-(k + 1)], then the final LayerNorm) by hand: the pipeline's own path
    # looks for transformers 4's text_model attribute, which transformers 5 no longer has
    embeds = [text.final_layer_norm(text(input_ids=m.tokenizer(t, padding="max_length", max_length=77,
                                                                 return_tensors="pt").input_ids,
                                         output_hidden_states=True).hidden_states[-clip_skip])
              for t in (texts, [""])]
    theirs = pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], num_inference_steps=steps,
                  guidance_scale=guidance, latents=noise, output_type="pt", height=48, width=72).images
    assert ours.shape == (1, 3, 48, 72)
    assert float(((ours + 1) / 2 - theirs).abs().max()) <= 1e-4  # measured bound: see test_pretrained


def test_non_finite_decode_names_prompt_and_seed(sd, monkeypatch):
    """The first non-finite image of a batch is named (the CLI's case, a NaN weight, is in the table below)."""
    m = sd["loaded"]
    decode = m.vae.decode
    monkeypatch.setattr(m.vae, "decode", lambda z: decode(z).index_fill(0, torch.tensor([1]), float("nan")))
    with pytest.raises(SamplingError, match=r"image 1 of the batch \(prompt 'b', seed 4\) decoded to non-finite"):
        generate(m.model, m.vae, Prompts.from_tokenizer(m.tokenizer, m.model), ["a", "b"], [3, 4], steps=1)


# --- bad inputs: one line, exit 2, nothing written --------------------------------------------------------------------

BAD = [
    (["--pretrained", "{folder}", "--prompt", "x", "--height", 100], "--height must be a positive multiple of 8, got 100"),
    (["--pretrained", "{folder}", "--prompt", "x", "--width", 0], "--width must be a positive multiple of 8"),
    (["--pretrained", "{folder}", "--prompt", "x", "--unet", "{root}"], "--pretrained contradicts --unet"),
    (["--pretrained", "{folder}", "--prompt", "x", "--vae", "{single}"], "--pretrained contradicts --vae"),
    (["--pretrained", "{folder}", "--prompt", "x", "--params", "params.yaml"], "--pretrained contradicts --params"),
    (["--pretrained", "{folder}", "--prompt", "x", "--weights", "non_ema"], "--weights applies to a single-file"),
    (["--pretrained", "{single}", "--prompt", "x", "--weights", "best"], "--weights must be one of ema, non_ema"),
    (["--pretrained", "{single}", "--prompt", "x", "--prediction", "x0"], "--prediction must be one of eps, v"),
    (["--pretrained", "{single}", "--prompt", "x", "--architecture", "sd_v2"], "--architecture must be one of"),
    (["--prediction", "v"], "--prediction applies to a --pretrained checkpoint only"),
    (["--dtype", "bfloat16"], "--dtype applies to a --pretrained checkpoint only"),
    (["--pretrained", "{folder}", "--prompt", "x", "--dtype", "float64"],
     "--dtype must be one of float32, bfloat16, float16, got 'float64'"),
    (["--pretrained", "{folder}"], "--pretrained needs --prompt"),
    (["--pretrained", "{folder}", "--prompt", "x", "--height", 48, "--width", 72, "--init-image",
      "{root}/init-64x64.png"], "init image is 64x64 (width x height), the drawing 72x48"),
    (["--pretrained", "{folder}", "--prompt", "x", "--init-image", "{root}/init-72x48.png"],
     "init image is 72x48 (width x height), the drawing 64x64"),  # the model's size, known once it is read
    (["--pretrained", "{folder}", "--prompt", "x", "--clip-skip", 3], "--clip-skip must lie in 1..2"),
    (["--pretrained", "{root}/sd2.safetensors", "--prompt", "x"], "an SD 2.x checkpoint"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_input_is_one_line_and_writes_nothing(sd, tmp_path, args, message):
    res, out = draw(sd, tmp_path, *args)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output
    assert not out.exists() and not list(tmp_path.glob("**/.*.tmp"))


def test_non_finite_checkpoint_is_one_error_line_and_writes_nothing(sd, tmp_path):
    """Found after sampling, so the progress bar comes first; the error is still one line, and nothing is written."""
    res, out = draw(sd, tmp_path, "--pretrained", "{root}/nan.safetensors", "--architecture", "tiny_sd_v1",
                    "--prompt", "x", "--steps", 1)
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error: ")]
    assert errors == [res.output.strip().splitlines()[-1]]
    assert "(prompt 'x', seed 0) decoded to non-finite values" in errors[0]
    assert not out.exists() and not list(tmp_path.glob("**/.*.tmp"))
