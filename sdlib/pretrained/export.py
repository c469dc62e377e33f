"""Write sdlib's models as a Stable Diffusion v1.x checkpoint: a diffusers folder or a CompVis single file.

The inverse of `load`: the same key maps (`keymap`) read from sdlib's names to the layout's, and config files that
`load.config_from_diffusers` reads back to the same arguments, so `load_pretrained` returns the very tensors written.
SD v1's layout fixes a few choices that sdlib leaves open (skip connections, VAE padding and attention, GroupNorm
groups, the noise schedule); a model that takes another is refused by name, before anything is written. Outputs are
written atomically: a failed export leaves the previous output, or none.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from safetensors.torch import save_file
from torch import Tensor

from sdlib.errors import CheckpointError
from sdlib.io import atomic_dir, atomic_path
from sdlib.ldm import LatentDiffusion
from sdlib.models.text import clip_text_config, write_clip_tokenizer_files
from sdlib.models.vae import AutoencoderKL
from sdlib.pretrained.keymap import COMPVIS_PREFIX, Layout, expand, text_keymap, unet_blocks, vae_blocks
from sdlib.pretrained.load import (
    DIFFUSERS_WEIGHTS,
    FIXED_SCHEDULER_CONFIG,
    FIXED_UNET_CONFIG,
    FIXED_VAE_CONFIG,
    PREDICTIONS,
)
from sdlib.pretrained.sd_v1 import SD_V1

Format = Literal["diffusers", "single-file"]
FORMATS: tuple[Format, ...] = ("diffusers", "single-file")
GROUPS = FIXED_UNET_CONFIG["norm_num_groups"]  # diffusers' GroupNorms have this many groups; sdlib's gcd(32, width)
# stamped in the config files as diffusers does; it applies workarounds to files older than 0.9 (U-Net sample_size)
DIFFUSERS_VERSION = "0.28.0"
SAFETENSORS_META = {"format": "pt"}  # what transformers and diffusers look for in a safetensors header


# --- what SD v1's layout cannot express ------------------------------------------------------------------------------

def refusals(model: LatentDiffusion, vae: AutoencoderKL) -> list[str]:
    """Every option of the model that SD v1's layout (diffusers' and CompVis') cannot express, one phrase each."""
    u, v, d, t = model.unet_args, vae.args, model.diffusion, model.text_args
    sd = SD_V1.vae
    out = []
    if u.skip != "concat":
        out.append(f"unet.skip={u.skip} (diffusers' U-Net concatenates its skip connections)")
    for name, widths in (("unet", [u.model_channels * m for m in u.channel_mult]),
                         ("vae", [v.base_channels * m for m in v.channel_mult])):
        if any(w % GROUPS for w in widths):
            out.append(f"{name} widths {widths} (diffusers normalises in {GROUPS} groups: every width must be a "
                       f"multiple of {GROUPS})")
    why = {"quant_conv": "SD v1's VAE has 1x1 quant_conv and post_quant_conv",
           "downsample_pad": "diffusers' VAE pads right and bottom only",
           "attention_qkv": "SD v1's VAE has separate q, k and v maps"}
    out += [f"vae.{k}={getattr(v, k)} ({reason})" for k, reason in why.items() if getattr(v, k) != getattr(sd, k)]
    if (d.beta_schedule, d.num_timesteps) != (SD_V1.diffusion.beta_schedule, SD_V1.diffusion.num_timesteps):
        out.append(f"unet.beta_schedule={d.beta_schedule} over {d.num_timesteps} steps (SD v1's is "
                   f"{SD_V1.diffusion.beta_schedule} over {SD_V1.diffusion.num_timesteps})")
    if t.hidden_size == 1024:
        out.append("text.hidden_size=1024 (reads back as SD 2.x's OpenCLIP text encoder)")
    return out


def check_exportable(model: LatentDiffusion, vae: AutoencoderKL) -> None:
    """Raise one CheckpointError naming every option that SD v1's layout cannot express."""
    problems = refusals(model, vae)
    if problems:
        raise CheckpointError(f"cannot export to SD v1's layout: {'; '.join(problems)}")


# --- tensors ---------------------------------------------------------------------------------------------------------

def layout_tensors(model: LatentDiffusion, vae: AutoencoderKL, layout: Layout) -> dict[str, dict[str, Tensor]]:
    """sdlib's weights under the layout's names, per part (unet, vae, text_encoder): the key maps read forwards."""
    out = {}
    for part, module, blocks in (("unet", model.unet, unet_blocks(model.unet_args, layout)),
                                 ("vae", vae, vae_blocks(vae.args, layout))):
        state = module.state_dict()
        names = expand(blocks, list(state), layout)
        # CompVis' VAE attention maps are 1x1 convolutions where sdlib and diffusers have linear maps
        conv = tuple(p + "." for p, (_, kind) in blocks.items() if layout == "compvis" and kind == "vae_attention")
        out[part] = {names[k]: w[:, :, None, None] if w.ndim == 2 and k.startswith(conv) else w
                     for k, w in state.items()}
    state = model.text.state_dict()  # nested under text_model., as SD's released files and transformers 4
    out["text_encoder"] = {name: state[k] for k, name in text_keymap(list(state), nested=True).items()}
    return {part: {k: w.detach().contiguous().cpu() for k, w in tensors.items()} for part, tensors in out.items()}


# --- diffusers config files ------------------------------------------------------------------------------------------

def unet_config(model: LatentDiffusion) -> dict:
    a = model.unet_args
    down = ["CrossAttnDownBlock2D" if lvl in a.attention_levels else "DownBlock2D"
            for lvl in range(len(a.channel_mult))]
    h, w = model.latent_hw
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION, **FIXED_UNET_CONFIG,
            "sample_size": h if h == w else [h, w], "in_channels": a.in_channels, "out_channels": a.in_channels,
            "down_block_types": down, "up_block_types": [t.replace("Down", "Up") for t in reversed(down)],
            "block_out_channels": [a.model_channels * m for m in a.channel_mult], "layers_per_block": a.num_res_blocks,
            "cross_attention_dim": a.context_dim, "transformer_layers_per_block": a.transformer_depth,
            "attention_head_dim": a.num_heads,  # diffusers' name for SD v1's head count
            "norm_eps": a.norm_eps, "use_linear_projection": a.transformer_proj == "linear"}


def vae_config(model: LatentDiffusion, vae: AutoencoderKL) -> dict:
    a, levels = vae.args, len(vae.args.channel_mult)
    return {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, **FIXED_VAE_CONFIG,
            "in_channels": a.in_channels, "out_channels": a.in_channels,
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": [a.base_channels * m for m in a.channel_mult], "layers_per_block": a.num_res_blocks,
            "latent_channels": a.latent_channels, "sample_size": model.latent_hw[0] * a.factor,
            "scaling_factor": model.diffusion.scale_factor}


def scheduler_config(model: LatentDiffusion) -> dict:
    """SD v1's own scheduler (PNDM without its Runge-Kutta warm-up), with the model's prediction type."""
    prediction = {ours: theirs for theirs, ours in PREDICTIONS.items()}[model.diffusion.prediction]
    return {"_class_name": "PNDMScheduler", "_diffusers_version": DIFFUSERS_VERSION, **FIXED_SCHEDULER_CONFIG,
            "prediction_type": prediction, "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1,
            "clip_sample": False}


MODEL_INDEX = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
               "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
               "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
               "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
               "feature_extractor": [None, None], "requires_safety_checker": False}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# --- writers ---------------------------------------------------------------------------------------------------------

def export_diffusers(model: LatentDiffusion, vae: AutoencoderKL, out: Path) -> None:
    """A diffusers StableDiffusionPipeline folder: unet/, vae/, text_encoder/, tokenizer/, scheduler/, model_index."""
    check_exportable(model, vae)
    tensors = layout_tensors(model, vae, "diffusers")
    with atomic_dir(out) as tmp:
        for part, weights in tensors.items():
            (tmp / part).mkdir()
            save_file(weights, str(tmp / part / f"{DIFFUSERS_WEIGHTS[part]}.safetensors"), metadata=SAFETENSORS_META)
        write_diffusers_configs(model, vae, tmp)


def write_diffusers_configs(model: LatentDiffusion, vae: AutoencoderKL, folder: Path) -> None:
    """Everything of a diffusers folder but the weights: the config files, CLIP's tokenizer and model_index.json."""
    for part in ("unet", "vae", "text_encoder", "scheduler"):
        (folder / part).mkdir(parents=True, exist_ok=True)
    _write_json(folder / "unet" / "config.json", unet_config(model))
    _write_json(folder / "vae" / "config.json", vae_config(model, vae))
    text = clip_text_config(model.text_args)
    text.architectures = ["CLIPTextModel"]
    text.to_json_file(str(folder / "text_encoder" / "config.json"))
    tokenizer = write_clip_tokenizer_files(folder / "tokenizer")  # CLIP's, which every SD v1 model uses
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    _write_json(tokenizer / "tokenizer_config.json", {**config, "model_max_length": model.text_args.max_length})
    _write_json(folder / "scheduler" / "scheduler_config.json", scheduler_config(model))
    _write_json(folder / "model_index.json", MODEL_INDEX)


def export_single_file(model: LatentDiffusion, vae: AutoencoderKL, out: Path) -> None:
    """A CompVis single .safetensors file (SD v1's released layout, one set of U-Net weights, no schedule buffers).

    Like CompVis' files it records neither the architecture nor the prediction type: reading it back needs both.
    """
    check_exportable(model, vae)
    tensors = {COMPVIS_PREFIX[part] + k: w for part, weights in layout_tensors(model, vae, "compvis").items()
               for k, w in weights.items()}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=SAFETENSORS_META)


def export(model: LatentDiffusion, vae: AutoencoderKL, out: str | Path, fmt: Format = "diffusers") -> None:
    """Write the model in `fmt` to `out` (a folder for diffusers, a .safetensors file for single-file)."""
    if fmt not in FORMATS:
        raise CheckpointError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    (export_diffusers if fmt == "diffusers" else export_single_file)(model, vae, Path(out))
