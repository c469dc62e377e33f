"""Load a pretrained Stable Diffusion v1.x checkpoint into sdlib's own U-Net, VAE and text encoder.

Two layouts (see `keymap`): a diffusers folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`, with
`.safetensors` or `.bin` weights) whose config.json files give the architecture, and the original CompVis single
file (`.safetensors`, memory-mapped, or a `.ckpt` that `torch.load(weights_only=True)` can read) whose architecture is
`config` (SD v1 unless told otherwise). Every weight is accounted for: missing, unexpected and mis-shaped keys are
named in one `CheckpointError`, never skipped. SD 2.x and SDXL checkpoints are recognised and refused by name.

Loading holds one copy of the weights: the models are built with their parameters on the meta device (shapes, no
memory, no random init) and take the file's tensors as their parameters (`load_state_dict(assign=True)`). A tensor
already in the dtype asked stays a view of the memory-mapped file, which the kernel pages in as it is read; one in
another dtype is read and converted on its own (see `TensorFile`). So a checkpoint must not be rewritten in place
while a model loaded from it runs (replacing it by a rename, as sdlib's writers do, is safe).
"""
from __future__ import annotations

import json
import pickle
import shutil
import struct
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Literal

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from sdlib.diffusion.schedules import alphas_cumprod, betas
from sdlib.errors import CheckpointError, ConfigError
from sdlib.ldm import DiffusionArgs, LatentDiffusion
from sdlib.models.text import VOCAB_SIZE, TextEncoderArgs, load_tokenizer, write_clip_tokenizer_files
from sdlib.models.unet import UNetArgs
from sdlib.models.vae import AutoencoderKL, VAEArgs
from sdlib.pretrained.keymap import COMPVIS_PREFIX, Layout, expand, text_keymap, unet_blocks, vae_blocks
from sdlib.pretrained.sd_v1 import SD_V1, SDConfig

EMA = Literal["ema", "non_ema"]
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}  # diffusers' prediction_type -> sdlib's
SHOWN = 3  # keys named per kind of problem in an error; the rest are counted
# dtypes of the U-Net and text encoder: bfloat16 for the CPU, float16 for CUDA (it runs on the CPU, slower than float32)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VAE_DTYPE = torch.float32  # SD v1's VAE decoder overflows float16; at 8% of the weights, it stays float32

# CompVis' DDPM keeps its schedule as buffers beside the weights; `alphas_cumprod` is checked, the rest follow from it.
COMPVIS_SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "model_ema.decay",
                    "model_ema.num_updates")
# A constant arange that old transformers versions saved (sometimes as corrupted floats); CLIPTextModel rebuilds it.
POSITION_IDS = "embeddings.position_ids"
DIFFUSERS_WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}

# diffusers config values for which sdlib's models have no alternative: `config_from_diffusers` refuses a file that
# sets another, and `export` writes them.
FIXED_UNET_CONFIG = {"flip_sin_to_cos": True, "freq_shift": 0, "norm_num_groups": 32, "act_fn": "silu",
                     "mid_block_type": "UNetMidBlock2DCrossAttn", "class_embed_type": None,
                     "addition_embed_type": None, "time_embedding_type": "positional", "conv_in_kernel": 3,
                     "conv_out_kernel": 3, "only_cross_attention": False, "dual_cross_attention": False,
                     "resnet_time_scale_shift": "default", "center_input_sample": False, "time_cond_proj_dim": None,
                     "num_attention_heads": None, "encoder_hid_dim": None, "downsample_padding": 1,
                     "mid_block_scale_factor": 1, "resnet_out_scale_factor": 1.0}
FIXED_VAE_CONFIG = {"norm_num_groups": 32, "act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
                    "mid_block_add_attention": True, "shift_factor": None}
FIXED_SCHEDULER_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                          "num_train_timesteps": 1000, "trained_betas": None}


@dataclass
class PretrainedSD:
    """What a checkpoint loads into: sdlib's models, the CLIP tokenizer, and where the U-Net's weights came from."""
    model: LatentDiffusion
    vae: AutoencoderKL
    tokenizer: object  # transformers' CLIPTokenizer, padding with <|endoftext|> to 77 tokens
    layout: Layout
    unet_weights: Literal["ema", "non_ema", "as stored"]


# --- reading tensors ------------------------------------------------------------------------------------------------

class TensorFile:
    """A checkpoint's tensors by name: memory-mapped safetensors, or a `torch.load(weights_only=True)` dict.

    A safetensors tensor in the dtype asked is a view of the mapped file; one to convert is read from the file into a
    buffer reused for each, so that neither the pages it came from nor freed copies stay resident beside the result.
    """

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint not found")
        if path.suffix == ".safetensors":
            try:
                self._st = safe_open(str(path), framework="pt")  # reads the header only; tensors stay on disk
                self._keys = list(self._st.keys())
                self._offsets = _safetensors_offsets(path)
                self._buffer = torch.empty(0, dtype=torch.uint8)
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
            self._dict = None
        else:
            self._st = None
            self._dict = _torch_load(path)
            self._keys = list(self._dict)

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        if self._st is not None:
            return tuple(self._st.get_slice(key).get_shape())
        return tuple(self._dict[key].shape)

    def get(self, key: str, dtype: torch.dtype | None = None) -> Tensor:
        """The tensor, converted to `dtype` when given."""
        if self._st is None:
            return self._dict[key] if dtype is None else self._dict[key].to(dtype)
        view = self._st.get_tensor(key)  # maps the file; no page is read until the tensor is
        if dtype is None or view.dtype == dtype:
            return view
        start, end = self._offsets[key]
        if len(self._buffer) < end - start:  # sized for the largest tensor at once: no smaller ones left behind
            self._buffer = torch.empty(max(e - s for s, e in self._offsets.values()), dtype=torch.uint8)
        raw = self._buffer[: end - start]
        with open(self.path, "rb") as f:
            f.seek(start)
            f.readinto(raw.numpy())
        return raw.view(view.dtype).reshape(view.shape).to(dtype)


def _safetensors_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Where each tensor's bytes lie in a safetensors file: after the header's length (8 bytes) and the header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__"}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _torch_load(path: Path) -> dict[str, Tensor]:
    """A pickled state dict, loaded with weights_only=True: a pickle that needs any code to load is refused."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: the pickle holds more than tensors ({_first_line(e)[:120]}); sdlib never runs "
                              "a checkpoint's code: convert it to .safetensors") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # PyTorch Lightning's checkpoint, as CompVis saved SD
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return obj


# --- the strict report -----------------------------------------------------------------------------------------------

def _same_function(src: tuple[int, ...], dst: tuple[int, ...]) -> bool:
    """A linear weight (out, in) and a 1x1 convolution's (out, in, 1, 1) hold the same map."""
    return src != dst and src[:2] == dst[:2] and all(s == 1 for s in src[2:] + dst[2:])


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f", ... {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def convert(tf: TensorFile, keymap: dict[str, str], shapes: dict[str, torch.Size], *, prefix: str, what: str,
            ignore: set[str] = frozenset(), dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """sdlib's state dict from the file's keys `prefix + keymap[k]`; every key under `prefix` must be used.

    Raises one CheckpointError naming the missing, unexpected and mis-shaped keys (the first few and a count of each).
    """
    wanted = {prefix + src: dst for dst, src in keymap.items()}
    present = {k for k in tf.keys() if k.startswith(prefix)}
    missing = sorted(k for k in wanted if k not in present)
    unexpected = sorted(present - wanted.keys() - ignore)
    mis_shaped = [f"{k} {list(tf.shape(k))} (model {list(shapes[d])})" for k, d in wanted.items()
                  if k in present and tf.shape(k) != tuple(shapes[d]) and not _same_function(tf.shape(k), shapes[d])]
    problems = [f"{len(items)} {label} ({_names(items)})" for label, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", mis_shaped)) if items]
    if problems:
        raise CheckpointError(f"{tf.path}: {what} does not match sdlib's SD v1 model: {'; '.join(problems)}")
    return {dst: tf.get(src, dtype).reshape(shapes[dst]) for src, dst in wanted.items()}


def _model_shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


# --- architecture from diffusers' config.json files -----------------------------------------------------------------

def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a diffusers Stable Diffusion folder has unet/, vae/, text_encoder/, "
                              "tokenizer/ and scheduler/ with their config files)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({_first_line(e)})") from None


def _require(path: Path, cfg: dict, expected: dict) -> None:
    """Every listed config value that the file sets must be SD v1's; sdlib has no code for the alternatives."""
    bad = [f"{k}={cfg[k]!r} (sdlib supports {v!r})" for k, v in expected.items() if k in cfg and cfg[k] != v]
    if bad:
        raise CheckpointError(f"{path}: unsupported option {_names(bad)}")


def _refuse_other_versions(root: Path, unet: dict, text: dict) -> None:
    if (root / "text_encoder_2").is_dir() or unet.get("addition_embed_type") == "text_time":
        raise CheckpointError(f"{root}: an SDXL checkpoint (two text encoders, 2048-d context); sdlib loads SD v1.x only")
    if unet.get("cross_attention_dim") == 1024 or text.get("hidden_size") == 1024:
        raise CheckpointError(f"{root}: an SD 2.x checkpoint (1024-d OpenCLIP ViT-H text context); "
                              "sdlib loads SD v1.x only")


def _levels(path: Path, channels: list[int]) -> tuple[int, tuple[int, ...]]:
    base = channels[0]
    if any(c % base for c in channels):
        raise CheckpointError(f"{path}: block_out_channels {channels} are not multiples of the first")
    return base, tuple(c // base for c in channels)


def config_from_diffusers(root: Path) -> tuple[SDConfig, str]:
    """sdlib's arguments from a diffusers folder's config files, refusing what sdlib's models cannot express.

    Returns the config and the scheduler's prediction type (eps or v).
    """
    unet = _read_json(root / "unet" / "config.json")
    vae = _read_json(root / "vae" / "config.json")
    text = _read_json(root / "text_encoder" / "config.json")
    sched = _read_json(root / "scheduler" / "scheduler_config.json")
    _refuse_other_versions(root, unet, text)

    p = root / "unet" / "config.json"
    down, up = list(unet.get("down_block_types", [])), list(unet.get("up_block_types", []))
    if [t.replace("Down", "Up") for t in reversed(down)] != up or not all(
            t in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down):
        raise CheckpointError(f"{p}: unsupported block types {down} / {up}")
    _require(p, unet, FIXED_UNET_CONFIG)
    for key in ("attention_head_dim", "layers_per_block", "transformer_layers_per_block"):
        if isinstance(unet.get(key), list):
            raise CheckpointError(f"{p}: per-level {key} {unet[key]} is not supported (SD v1 has one value)")
    if unet.get("in_channels", 4) != unet.get("out_channels", 4):
        raise CheckpointError(f"{p}: in_channels {unet.get('in_channels')} != out_channels {unet.get('out_channels')} "
                              "(an inpainting or depth U-Net?); sdlib loads text-to-image SD v1.x")
    model_channels, mult = _levels(p, list(unet["block_out_channels"]))
    unet_args = UNetArgs(in_channels=unet.get("in_channels", 4), context_dim=unet["cross_attention_dim"],
                         model_channels=model_channels, channel_mult=mult,
                         num_res_blocks=unet.get("layers_per_block", 2),
                         attention_levels=tuple(i for i, t in enumerate(down) if t.startswith("CrossAttn")),
                         transformer_depth=unet.get("transformer_layers_per_block", 1),
                         num_heads=unet.get("attention_head_dim", 8),  # diffusers' name for SD v1's head count
                         skip="concat", norm_eps=unet.get("norm_eps", 1e-5),
                         transformer_proj="linear" if unet.get("use_linear_projection") else "conv")

    p = root / "vae" / "config.json"
    _require(p, vae, {**FIXED_VAE_CONFIG, "down_block_types": ["DownEncoderBlock2D"] * len(vae.get("block_out_channels", [])),
                      "up_block_types": ["UpDecoderBlock2D"] * len(vae.get("block_out_channels", []))})
    base, vae_mult = _levels(p, list(vae["block_out_channels"]))
    if vae.get("in_channels", 3) != vae.get("out_channels", 3):
        raise CheckpointError(f"{p}: in_channels != out_channels")
    vae_args = VAEArgs(in_channels=vae.get("in_channels", 3), base_channels=base, channel_mult=vae_mult,
                       num_res_blocks=vae.get("layers_per_block", 2), latent_channels=vae.get("latent_channels", 4),
                       quant_conv="1x1", downsample_pad="asymmetric", attention_qkv="separate")

    p = root / "text_encoder" / "config.json"
    hidden = text.get("hidden_size", 512)
    _require(p, text, {"hidden_act": "quick_gelu", "vocab_size": VOCAB_SIZE, "intermediate_size": 4 * hidden})
    try:
        text_args = TextEncoderArgs(hidden_size=hidden, num_layers=text["num_hidden_layers"],
                                    num_heads=text["num_attention_heads"],
                                    max_length=text.get("max_position_embeddings", 77))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{p}: not a CLIP text encoder config ({_first_line(e)})") from None

    p = root / "scheduler" / "scheduler_config.json"
    _require(p, sched, FIXED_SCHEDULER_CONFIG)
    prediction = PREDICTIONS.get(sched.get("prediction_type", "epsilon"))
    if prediction is None:
        raise CheckpointError(f"{p}: unsupported prediction_type {sched.get('prediction_type')!r} "
                              f"(sdlib supports {', '.join(PREDICTIONS)})")
    diffusion = replace(SD_V1.diffusion, scale_factor=float(vae.get("scaling_factor", 0.18215)))
    latent = unet.get("sample_size", 64)
    latent_hw = tuple(latent) if isinstance(latent, list) else (latent, latent)
    try:
        return SDConfig(unet=unet_args, vae=vae_args, text=text_args, diffusion=diffusion,
                        latent_hw=latent_hw), prediction
    except ValueError as e:
        raise CheckpointError(f"{root}: {_first_line(e)}") from None


def _diffusers_weights(folder: Path) -> TensorFile:
    name = DIFFUSERS_WEIGHTS[folder.name]
    candidates = [folder / f"{name}.safetensors", folder / f"{name}.bin", folder / "pytorch_model.bin"]
    for path in candidates:
        if path.is_file():
            return TensorFile(path)
    raise CheckpointError(f"{folder}: no weights ({', '.join(p.name for p in candidates[:2])})")


# --- assembling the models -------------------------------------------------------------------------------------------

@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside put their parameters on the meta device: shapes without memory or random init, for
    `load_state_dict(assign=True)` to replace. Buffers, which state dicts leave out (the noise schedule, CLIP's
    position ids), are made as usual. (accelerate's `init_empty_weights`, through torch's registration hook.)"""
    handle = register_module_parameter_registration_hook(
        lambda module, name, p: None if p is None else nn.Parameter(p.to("meta"), p.requires_grad))
    try:
        yield
    finally:
        handle.remove()


def _build(cfg: SDConfig, prediction: str) -> tuple[LatentDiffusion, AutoencoderKL]:
    with _parameters_on_meta():
        model = LatentDiffusion(unet=cfg.unet, text=cfg.text, diffusion=replace(cfg.diffusion, prediction=prediction),
                                latent_hw=cfg.latent_hw)
        return model, AutoencoderKL(cfg.vae, scale_factor=cfg.diffusion.scale_factor)  # the checkpoint's


def _check_prediction(prediction: str | None) -> None:
    if prediction not in (None, "eps", "v"):
        raise CheckpointError(f"prediction must be eps or v, got {prediction!r}")


def load_diffusers(root: Path, *, prediction: str | None = None,
                   dtype: torch.dtype = torch.float32) -> PretrainedSD:
    """A diffusers Stable Diffusion v1.x folder into sdlib's models; `prediction` overrides the scheduler's."""
    _check_prediction(prediction)
    cfg, scheduled = config_from_diffusers(root)
    model, vae = _build(cfg, prediction or scheduled)
    unet_sd = convert(_diffusers_weights(root / "unet"), expand(unet_blocks(cfg.unet, "diffusers"),
                      list(model.unet.state_dict()), "diffusers"), _model_shapes(model.unet), prefix="", what="U-Net",
                      dtype=dtype)
    vae_sd = convert(_diffusers_weights(root / "vae"), expand(vae_blocks(cfg.vae, "diffusers"),
                     list(vae.state_dict()), "diffusers"), _model_shapes(vae), prefix="", what="VAE", dtype=VAE_DTYPE)
    text_file = _diffusers_weights(root / "text_encoder")
    nested = any(k.startswith("text_model.") for k in text_file.keys())
    text_sd = convert(text_file, text_keymap(list(model.text.state_dict()), nested), _model_shapes(model.text),
                      prefix="", what="text encoder", ignore={POSITION_IDS, f"text_model.{POSITION_IDS}"}, dtype=dtype)
    _load(model, vae, unet_sd, vae_sd, text_sd)
    tokenizer_dir = root / "tokenizer"
    if not all((tokenizer_dir / f).is_file() for f in ("vocab.json", "merges.txt")):
        raise CheckpointError(f"{tokenizer_dir}: no vocab.json and merges.txt (CLIP's tokenizer)")
    tokenizer = load_tokenizer(tokenizer_dir, cfg.text.max_length)
    return PretrainedSD(model, vae, tokenizer, "diffusers", "as stored")


def _refuse_compvis_other_versions(tf: TensorFile) -> None:
    keys = tf.keys()
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise CheckpointError(f"{tf.path}: an SDXL checkpoint (two text encoders, 2048-d context); "
                              "sdlib loads SD v1.x only")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise CheckpointError(f"{tf.path}: an SD 2.x checkpoint (1024-d OpenCLIP ViT-H text context); "
                              "sdlib loads SD v1.x only")
    if not any(k.startswith(COMPVIS_PREFIX["unet"]) for k in keys):
        raise CheckpointError(f"{tf.path}: not a Stable Diffusion checkpoint (no model.diffusion_model.* keys)")


def _check_compvis_schedule(tf: TensorFile, diffusion: DiffusionArgs) -> None:
    if "alphas_cumprod" not in tf.keys():
        return
    ours = alphas_cumprod(betas(diffusion.beta_schedule, diffusion.num_timesteps))
    theirs = tf.get("alphas_cumprod")
    # a float16 file stores the schedule in float16 too: rounded, ours may differ from it by one ulp
    rtol = max(1e-4, torch.finfo(theirs.dtype).eps) if theirs.is_floating_point() else 1e-4
    if theirs.shape != ours.shape or not torch.allclose(theirs.double(), ours, rtol=rtol, atol=1e-6):
        raise CheckpointError(f"{tf.path}: alphas_cumprod is not SD v1's scaled_linear schedule "
                              f"({diffusion.num_timesteps} steps, betas 0.00085..0.012)")


def load_compvis(path: Path, *, config: SDConfig = SD_V1, ema: EMA = "ema", prediction: str | None = None,
                 dtype: torch.dtype = torch.float32) -> PretrainedSD:
    """The original single-file checkpoint into sdlib's models, with the architecture `config`.

    `ema` picks the U-Net's EMA weights (`model_ema.*`) when the file holds both; a pruned file holds one set in
    `model.diffusion_model.*` (the EMA weights, for SD v1.x's released "emaonly" files), used whichever is asked.
    """
    _check_prediction(prediction)
    if ema not in ("ema", "non_ema"):
        raise CheckpointError(f"ema must be ema or non_ema, got {ema!r}")
    tf = TensorFile(Path(path))
    _refuse_compvis_other_versions(tf)
    _check_compvis_schedule(tf, config.diffusion)
    model, vae = _build(config, prediction or config.diffusion.prediction)
    keys = set(tf.keys())

    unet_map = expand(unet_blocks(config.unet, "compvis"), list(model.unet.state_dict()), "compvis")
    has_ema = any(k.startswith("model_ema.") and k not in COMPVIS_SCHEDULE for k in keys)
    ignore = set(COMPVIS_SCHEDULE)
    if has_ema and ema == "ema":
        # LitEma names each parameter of `model` (diffusion_model.*) with its dots removed
        unet_map = {k: ("diffusion_model." + v).replace(".", "") for k, v in unet_map.items()}
        unet_prefix, used = "model_ema.", "ema"
        ignore |= {k for k in keys if k.startswith(COMPVIS_PREFIX["unet"])}
    else:
        unet_prefix, used = COMPVIS_PREFIX["unet"], "non_ema" if has_ema else "as stored"
        ignore |= {k for k in keys if k.startswith("model_ema.")}
    unet_sd = convert(tf, unet_map, _model_shapes(model.unet), prefix=unet_prefix, what="U-Net", ignore=ignore,
                      dtype=dtype)
    vae_sd = convert(tf, expand(vae_blocks(config.vae, "compvis"), list(vae.state_dict()), "compvis"),
                     _model_shapes(vae), prefix=COMPVIS_PREFIX["vae"], what="VAE", dtype=VAE_DTYPE)
    nested = any(k.startswith(COMPVIS_PREFIX["text_encoder"] + "text_model.") for k in keys)
    text_map = text_keymap(list(model.text.state_dict()), nested)
    text_sd = convert(tf, text_map, _model_shapes(model.text), prefix=COMPVIS_PREFIX["text_encoder"],
                      what="text encoder", dtype=dtype,
                      ignore={f"{COMPVIS_PREFIX['text_encoder']}{p}{POSITION_IDS}" for p in ("", "text_model.")})
    known = ("model_ema.", *COMPVIS_PREFIX.values())
    stray = sorted(k for k in keys if not k.startswith(known) and k not in ignore)
    if stray:
        raise CheckpointError(f"{tf.path}: {len(stray)} unexpected keys ({_names(stray)})")
    _load(model, vae, unet_sd, vae_sd, text_sd)
    with tempfile.TemporaryDirectory() as tmp:  # a single file carries no tokenizer: CLIP's own, from open_clip
        tokenizer = load_tokenizer(write_clip_tokenizer_files(Path(tmp)), config.text.max_length)
    return PretrainedSD(model, vae, tokenizer, "compvis", used)


def _load(model: LatentDiffusion, vae: AutoencoderKL, unet_sd: dict, vae_sd: dict, text_sd: dict) -> None:
    """The converted tensors become the parameters (no copy); strict, so no meta parameter is left."""
    model.unet.load_state_dict(unet_sd, strict=True, assign=True)
    model.text.load_state_dict(text_sd, strict=True, assign=True)
    vae.load_state_dict(vae_sd, strict=True, assign=True)
    model.eval(), vae.eval()


def load_pretrained(path: str | Path, *, config: SDConfig = SD_V1, ema: EMA = "ema", prediction: str | None = None,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> PretrainedSD:
    """A diffusers folder or a CompVis single file -> sdlib's LatentDiffusion, AutoencoderKL and CLIP tokenizer.

    `config` is the architecture of a single file (a folder's config files give its own); `prediction` (eps or v)
    overrides the scheduler config's prediction_type. `dtype` (one of DTYPES) is the U-Net's and the text encoder's;
    the VAE's is VAE_DTYPE.
    """
    if dtype not in DTYPES.values():
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    path = Path(path)
    if path.is_dir():
        sd = load_diffusers(path, prediction=prediction, dtype=dtype)
    else:
        sd = load_compvis(path, config=config, ema=ema, prediction=prediction, dtype=dtype)
    sd.model.to(device), sd.vae.to(device)
    return sd


def copy_tokenizer(path: str | Path, out: Path) -> Path:
    """Write the tokenizer files `load_pretrained(path)` reads into the folder `out`: a diffusers folder's tokenizer/
    as it is, or CLIP's own (from open_clip) for a single file, which carries none."""
    path = Path(path)
    if path.is_dir():
        return Path(shutil.copytree(path / "tokenizer", out))
    return write_clip_tokenizer_files(out)
