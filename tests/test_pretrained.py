"""Pretrained SD v1.x checkpoints load into sdlib's own models and compute what diffusers computes from them.

diffusers makes random weights at a tiny SD-v1-shaped config (`TINY_SD_V1`: the same blocks, levels and key names as
SD v1, a few million parameters) and saves them as a diffusers folder; the CompVis single file is written from the
same tensors through the CompVis key map. Every weight is drawn at random (norms and biases included), so a weight
loaded into the wrong place changes the outputs.

Tolerance: both sides run the same float32 operations in the same order (same convolutions, scaled-dot-product
attention, GroupNorm), so they usually agree bit for bit; where a kernel is chosen differently (e.g. a fused vs an
unfused attention path, or a different reduction order in a GEMM) each op can differ by a few float32 ulps (1.2e-7
relative), and the error grows roughly linearly through the ~60 layers of the U-Net. The bound is therefore relative to
the output's scale: 1e-5 * max|output|, two orders of magnitude below what any misplaced weight, norm eps or
embedding order produces (those show up at 1e-2 or more, see the planted-bug notes at each test).
"""
from __future__ import annotations

import math
import pickle

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL as DiffusersVAE  # noqa: E402
from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from sdlib.errors import CheckpointError  # noqa: E402
from sdlib.models.text import VOCAB_SIZE, write_clip_tokenizer_files  # noqa: E402
from sdlib.models.unet import UNetArgs  # noqa: E402
from sdlib.models.vae import VAEArgs  # noqa: E402
from sdlib.pretrained.keymap import expand, text_keymap, unet_blocks, vae_blocks  # noqa: E402
from sdlib.pretrained.load import load_pretrained  # noqa: E402
from sdlib.pretrained.sd_v1 import TINY_SD_V1  # noqa: E402

CFG = TINY_SD_V1
REL_TOL = 1e-5


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random, at a scale that keeps activations O(1): norms' weights near 1, the rest ~ 1/sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))


def diffusers_models() -> tuple[UNet2DConditionModel, DiffusersVAE, CLIPTextModel]:
    u, v, t = CFG.unet, CFG.vae, CFG.text
    unet = UNet2DConditionModel(
        sample_size=CFG.latent_hw[0], in_channels=4, out_channels=4,
        block_out_channels=tuple(u.model_channels * m for m in u.channel_mult),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2, cross_attention_dim=u.context_dim, attention_head_dim=8, norm_num_groups=32)
    vae = DiffusersVAE(in_channels=3, out_channels=3, block_out_channels=tuple(v.base_channels * m for m in v.channel_mult),
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                       layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=64)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=t.hidden_size,
                                        intermediate_size=4 * t.hidden_size, num_hidden_layers=t.num_layers,
                                        num_attention_heads=t.num_heads, max_position_embeddings=77,
                                        hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
                                        pad_token_id=49407))
    for i, m in enumerate((unet, vae, text)):
        randomize(m, seed=i)
    return unet.eval(), vae.eval(), text.eval()


def compvis_state_dict(unet, vae, text, ema_offset: float | None = None) -> dict[str, torch.Tensor]:
    """The CompVis single file's tensors, written from diffusers' through the two key maps (sdlib key in the middle).

    With `ema_offset`, `model_ema.*` holds diffusers' U-Net and `model.diffusion_model.*` the same plus the offset.
    """
    out = {}
    for module, blocks, prefix in ((unet, unet_blocks, "model.diffusion_model."), (vae, vae_blocks, "first_stage_model.")):
        args = CFG.unet if module is unet else CFG.vae
        src = module.state_dict()
        d_map = expand(blocks(args, "diffusers"), list(_sdlib_keys(args)), "diffusers")
        c_map = expand(blocks(args, "compvis"), list(_sdlib_keys(args)), "compvis")
        for k in d_map:
            t = src[d_map[k]].clone()
            if module is vae and ".mid.attn_1." in c_map[k] and t.ndim == 2:
                t = t[:, :, None, None]  # CompVis' VAE attention uses 1x1 convolutions
            out[prefix + c_map[k]] = t
    # nested under text_model., as in SD's released files (transformers >= 5 saves the diffusers folder without it)
    out |= {f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v.clone()
            for k, v in text.state_dict().items()}
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    from sdlib.diffusion.schedules import alphas_cumprod, betas
    out["alphas_cumprod"] = alphas_cumprod(betas("scaled_linear", 1000)).float()
    out["betas"] = betas("scaled_linear", 1000).float()
    if ema_offset is not None:
        for k in [k for k in out if k.startswith("model.diffusion_model.")]:
            out["model_ema." + k.removeprefix("model.").replace(".", "")] = out[k].clone()
            out[k] = out[k] + ema_offset
        out["model_ema.decay"], out["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(1000)
    return out


def _sdlib_keys(args) -> list[str]:
    from sdlib.models.unet import UNet
    from sdlib.models.vae import AutoencoderKL
    with torch.device("meta"):
        return list((UNet if isinstance(args, UNetArgs) else AutoencoderKL)(args).state_dict())


def write_diffusers_folder(folder, unet, vae, text):
    """The models in diffusers' folder layout, with SD v1's scheduler config and CLIP's tokenizer."""
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    write_clip_tokenizer_files(folder / "tokenizer")
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False).save_pretrained(folder / "scheduler")
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(diffusers models, diffusers folder, CompVis .safetensors, CompVis .ckpt with EMA, its state dict)."""
    root = tmp_path_factory.mktemp("sd")
    unet, vae, text = diffusers_models()
    folder = write_diffusers_folder(root / "diffusers", unet, vae, text)
    single = root / "sd.safetensors"
    save_file(compvis_state_dict(unet, vae, text), str(single))
    ema_sd = compvis_state_dict(unet, vae, text, ema_offset=1.0)
    ckpt = root / "sd-ema.ckpt"
    torch.save({"state_dict": ema_sd, "global_step": 1}, ckpt)
    return (unet, vae, text), folder, single, ckpt, ema_sd


@pytest.fixture(scope="module")
def loaded(checkpoints):
    return load_pretrained(checkpoints[1])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    diff, scale = max_diff(ours, theirs), float(theirs.abs().max())
    assert diff <= REL_TOL * max(scale, 1.0), f"max abs difference {diff:.3g} at output scale {scale:.3g}"


# --- key maps --------------------------------------------------------------------------------------------------------

def test_keymaps_name_real_sd_v1_keys():
    """TINY_SD_V1 has SD v1's layout, so its maps hold the real checkpoints' key names and counts."""
    unet_keys, vae_keys = _sdlib_keys(CFG.unet), _sdlib_keys(CFG.vae)
    cv_unet = set(expand(unet_blocks(CFG.unet, "compvis"), unet_keys, "compvis").values())
    cv_vae = set(expand(vae_blocks(CFG.vae, "compvis"), vae_keys, "compvis").values())
    assert len(cv_unet) == 686 and len(cv_vae) == 248  # SD v1.5's U-Net and VAE tensor counts
    for key in ("time_embed.0.weight", "input_blocks.0.0.weight", "input_blocks.1.1.proj_in.weight",
                "input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight",
                "input_blocks.11.0.emb_layers.1.weight", "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                "middle_block.2.out_layers.3.weight", "output_blocks.2.1.conv.weight",
                "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight",
                "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight", "out.2.bias"):
        assert key in cv_unet, key
    for key in ("encoder.down.0.downsample.conv.weight", "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.mid.attn_1.q.weight", "decoder.up.3.upsample.conv.weight", "decoder.up.0.block.2.conv2.bias",
                "decoder.up.1.block.0.nin_shortcut.weight", "quant_conv.weight", "post_quant_conv.bias"):
        assert key in cv_vae, key
    for key in ("model.text_model.final_layer_norm.weight", "model.final_layer_norm.weight"):  # transformers 4, 5
        assert text_keymap([key], nested=True) == {key: "text_model.final_layer_norm.weight"}
        assert text_keymap([key], nested=False) == {key: "final_layer_norm.weight"}


def test_compvis_map_agrees_with_diffusers_converter(checkpoints):
    """diffusers' own CompVis converter (single_file_utils) turns our CompVis file back into diffusers' weights.

    This checks the CompVis map independently of the diffusers map it was written through (the round trip through the
    two maps alone cannot see two same-shaped CompVis names swapped).
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    (unet, vae, _), *_, ema_sd = checkpoints
    for extract_ema in (True, False):
        got = convert_ldm_unet_checkpoint(ema_sd, dict(unet.config), extract_ema=extract_ema)
        ref = unet.state_dict()
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k] + (0.0 if extract_ema else 1.0)) for k in ref)
    got, ref = convert_ldm_vae_checkpoint(ema_sd, dict(vae.config)), vae.state_dict()
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k].reshape(ref[k].shape), ref[k]) for k in ref)


# --- outputs equal diffusers' ----------------------------------------------------------------------------------------

@torch.no_grad()
def test_unet_matches_diffusers(checkpoints, loaded):
    """Planted bugs caught: sin/cos order swapped, norm_eps left at 1e-6, two ResNet keys swapped in the map."""
    unet = checkpoints[0][0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([981.0, 3.7])  # fractional timesteps, as k-diffusion samplers give
    ctx = torch.randn(2, 77, CFG.unet.context_dim, generator=g)
    theirs = unet(x, t, encoder_hidden_states=ctx).sample
    ours = loaded.model.unet(x, t, ctx)
    assert_close(ours, theirs)


@torch.no_grad()
def test_vae_matches_diffusers(checkpoints, loaded):
    """Encoder moments (through quant_conv, asymmetric padding) and decoder (through post_quant_conv)."""
    vae = checkpoints[0][1]
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    z = torch.randn(2, 4, 8, 8, generator=g)
    post, theirs = loaded.vae.encode(x), vae.encode(x).latent_dist
    assert_close(post.mean, theirs.mean)
    assert_close(post.std, theirs.std)
    assert_close(loaded.vae.decode(z), vae.decode(z).sample)


@torch.no_grad()
def test_text_encoder_matches_diffusers(checkpoints, loaded):
    """SD v1's prompt pipeline: 77 tokens padded with <|endoftext|>, last hidden state after the final LayerNorm."""
    from sdlib.generate import Prompts
    text = checkpoints[0][2]
    prompts = Prompts.from_tokenizer(loaded.tokenizer, loaded.model)
    ids = prompts.ids(["a photograph of an astronaut riding a horse", ""])
    assert ids.shape == (2, 77) and ids[1, 0] == 49406 and (ids[1, 1:] == 49407).all()
    assert_close(prompts.context(["a photograph of an astronaut riding a horse", ""], "cpu"),
                 text(input_ids=ids).last_hidden_state)


# --- both layouts, one set of weights --------------------------------------------------------------------------------

def _state(sd) -> dict[str, torch.Tensor]:
    return {**{f"unet.{k}": v for k, v in sd.model.unet.state_dict().items()},
            **{f"text.{k}": v for k, v in sd.model.text.state_dict().items()},
            **{f"vae.{k}": v for k, v in sd.vae.state_dict().items()}}


def test_compvis_file_loads_the_same_weights(checkpoints, loaded):
    single = load_pretrained(checkpoints[2], config=CFG)
    assert single.layout == "compvis" and single.unet_weights == "as stored"
    ours, theirs = _state(single), _state(loaded)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert single.model.diffusion.scale_factor == 0.18215 and loaded.model.diffusion.scale_factor == 0.18215


def test_compvis_ckpt_picks_ema_or_non_ema(checkpoints, loaded):
    ema = load_pretrained(checkpoints[3], config=CFG, ema="ema")
    non_ema = load_pretrained(checkpoints[3], config=CFG, ema="non_ema")
    assert (ema.unet_weights, non_ema.unet_weights) == ("ema", "non_ema")
    ref = loaded.model.unet.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in ema.model.unet.state_dict().items())
    assert all(torch.equal(v, ref[k] + 1.0) for k, v in non_ema.model.unet.state_dict().items())


def test_prediction_from_scheduler_or_override(checkpoints, tmp_path):
    import json
    import shutil
    folder = tmp_path / "v"
    shutil.copytree(checkpoints[1], folder)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "prediction_type": "v_prediction"}))
    assert load_pretrained(folder).model.diffusion.prediction == "v"
    assert load_pretrained(folder, prediction="eps").model.denoiser.prediction == "eps"


# --- bad inputs: one-line errors -------------------------------------------------------------------------------------

def _error(path, **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path, config=CFG, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_refuses_sd2_and_sdxl(checkpoints, tmp_path):
    sd2 = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024),
           "cond_stage_model.model.token_embedding.weight": torch.zeros(8, 1024)}
    save_file(sd2, str(tmp_path / "sd2.safetensors"))
    assert "SD 2.x" in _error(tmp_path / "sd2.safetensors")
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(768),
               "model.diffusion_model.out.2.bias": torch.zeros(4)}, str(tmp_path / "xl.safetensors"))
    assert "SDXL" in _error(tmp_path / "xl.safetensors")
    import json
    import shutil
    folder = tmp_path / "sd2"
    shutil.copytree(checkpoints[1], folder)
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**cfg, "cross_attention_dim": 1024}))
    assert "SD 2.x" in _error(folder)


def test_refuses_truncated_and_foreign_files(checkpoints, tmp_path):
    data = checkpoints[2].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    assert "not a readable safetensors file" in _error(tmp_path / "cut.safetensors")
    data = checkpoints[3].read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    assert "not a readable PyTorch checkpoint" in _error(tmp_path / "cut.ckpt")
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    assert "not a Stable Diffusion checkpoint" in _error(tmp_path / "other.safetensors")
    assert "not found" in _error(tmp_path / "absent.safetensors")


class Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_refuses_a_pickle_with_code(tmp_path):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": torch.zeros(1)}, "payload": Payload()}, f)
    assert "convert it to .safetensors" in _error(path)


def test_strict_report_names_missing_unexpected_and_mis_shaped_keys(checkpoints, tmp_path):
    sd = compvis_state_dict(*checkpoints[0])
    del sd["model.diffusion_model.input_blocks.1.1.proj_in.weight"]
    sd["first_stage_model.encoder.extra.weight"] = torch.zeros(1)
    sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.zeros(5)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    msg = _error(path)
    assert "U-Net" in msg and "1 missing keys (model.diffusion_model.input_blocks.1.1.proj_in.weight)" in msg
    sd["model.diffusion_model.input_blocks.1.1.proj_in.weight"] = torch.zeros(32, 32, 1, 1)
    save_file(sd, str(path))
    assert "VAE" in _error(path) and "1 unexpected keys (first_stage_model.encoder.extra.weight)" in _error(path)
    del sd["first_stage_model.encoder.extra.weight"]
    save_file(sd, str(path))
    assert "mis-shaped keys (cond_stage_model.transformer.text_model.final_layer_norm.weight [5] (model [32]))" \
        in _error(path)


# --- today's models unchanged -----------------------------------------------------------------------------------------

def test_sd_options_default_to_todays_models():
    """The options added for SD v1 default to the models trained before them; headers leave them out at defaults."""
    assert set(UNetArgs().to_dict()) == {"in_channels", "context_dim", "model_channels", "channel_mult",
                                         "num_res_blocks", "attention_levels", "transformer_depth", "num_heads", "skip"}
    assert set(VAEArgs().to_dict()) == {"in_channels", "base_channels", "channel_mult", "num_res_blocks",
                                        "latent_channels"}
    assert UNetArgs.from_dict(CFG.unet.to_dict()) == CFG.unet
    assert VAEArgs.from_dict(CFG.vae.to_dict()) == CFG.vae


# --- whole text-to-image runs equal diffusers' pipeline --------------------------------------------------------------

def _schedulers():
    """sdlib sampler -> (diffusers scheduler, its start coordinates, sdlib's sigma schedule).

    Settings that make them the same algorithm:
    - euler: Karras et al.'s sigmas between the training extremes (`use_karras_sigmas`; `linspace` spacing so that the
      first sigma is sigma_max and the pipeline scales unit noise by sigma_max, as sdlib does), ending at sigma 0;
      diffusers evaluates the U-Net at the same fractional timesteps.
    - ddim: sdlib's discrete `trailing` timesteps, ending at alpha_bar = 1 (sigma 0, `set_alpha_to_one`), from VP
      latents x_T / sqrt(1 + sigma_max^2). The steps must divide 1000: diffusers' DDIM steps from t to
      t - 1000 // steps, not to the next timestep of its own list.
    - dpmpp_2m: on the discrete `trailing` timesteps, first order at the last step (as k-diffusion), ending at sigma 0,
      from VP latents. With Karras sigmas diffusers rounds the U-Net's timesteps to integers while sdlib keeps them
      fractional, which differs by ~1e-2 at 5 steps.
    - unipc: as dpmpp_2m (UniPC's defaults are SD's: order 2, bh2, data prediction, lower order at the end).
    """
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler
    beta = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    return {
        "euler": (EulerDiscreteScheduler(**beta, use_karras_sigmas=True, timestep_spacing="linspace"), "ve", "karras"),
        "ddim": (DDIMScheduler(**beta, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False,
                               steps_offset=0), "vp", "discrete"),
        "dpmpp_2m": (DPMSolverMultistepScheduler(**beta, algorithm_type="dpmsolver++", solver_order=2,
                                                 timestep_spacing="trailing", final_sigmas_type="zero",
                                                 lower_order_final=True), "vp", "discrete"),
        "unipc": (UniPCMultistepScheduler(**beta, timestep_spacing="trailing", final_sigmas_type="zero"), "vp",
                  "discrete"),
    }


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m", "unipc"])
@torch.no_grad()
def test_generate_matches_stable_diffusion_pipeline(checkpoints, loaded, sampler):
    from diffusers import StableDiffusionPipeline

    from sdlib.diffusion.samplers import ImageRNG
    from sdlib.generate import Prompts, generate, sampling_sigmas
    unet, vae, text = checkpoints[0]
    scheduler, start, schedule = _schedulers()[sampler]
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=loaded.tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    texts, seeds, steps, guidance = ["a red cube", "a blue sphere"], [7, 8], 5, 5.0
    ours = generate(loaded.model, loaded.vae, Prompts.from_tokenizer(loaded.tokenizer, loaded.model), texts, seeds,
                    sampler=sampler, steps=steps, guidance=guidance, schedule=schedule)
    noise = ImageRNG(seeds).randn((4, *loaded.model.latent_hw))
    if start == "vp":  # DDIM's pipeline starts from x_T in VP coordinates; sdlib's x_T = noise * sigma_max is VE
        sigma_max = sampling_sigmas(loaded.model, sampler, steps, schedule)[0]
        noise = noise * sigma_max / (1 + sigma_max**2) ** 0.5
    theirs = pipe(prompt=texts, negative_prompt=[""] * 2, num_inference_steps=steps, guidance_scale=guidance,
                  latents=noise, output_type="pt", height=64, width=64).images  # (B, 3, H, W) in [0, 1]
    # Images in [0, 1]. diffusers builds its schedules in float64 NumPy, sdlib in float32: the sigmas and fractional
    # timesteps differ in the 7th digit, which moves pixels by ~1e-5 (measured 5e-6); a wrong setting moves them by
    # 1e-3 or more (DDIM at 6 steps, where diffusers' step is not its timestep spacing: 3e-3).
    assert max_diff((ours + 1) / 2, theirs) <= 1e-4
