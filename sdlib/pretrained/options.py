"""The options that say how to read a pretrained SD v1.x checkpoint, checked before it is read.

`--architecture` and `--weights` apply to a CompVis single file (a diffusers folder's config files give its own
architecture and its one set of weights), `--prediction` to both; a trained model's options contradict them. The
commands that take them (`stages.sample --pretrained`, `sdlib.export`) refuse a contradiction or a bad choice in one
line naming the option; the `pretrained` params section names the same choices.
"""
from __future__ import annotations

from pathlib import Path
from typing import get_args

from sdlib.errors import ConfigError
from sdlib.pretrained.load import DTYPES, EMA, PREDICTIONS
from sdlib.pretrained.sd_v1 import ARCHITECTURES

WEIGHTS: tuple[str, ...] = get_args(EMA)  # the U-Net weights of a single file holding both
PREDICTION_TYPES: tuple[str, ...] = tuple(PREDICTIONS.values())  # what a U-Net predicts, sdlib's names


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def check_source(pretrained: Path | None, trained: dict[str, object], sd_options: dict[str, object]) -> None:
    """Refuse SD's options (given as None when not set) without --pretrained, and the trained model's with it."""
    options, message = ((sd_options, "{} applies to a --pretrained checkpoint only") if pretrained is None else
                        (trained, "--pretrained contradicts {} (that is the trained model's option)"))
    stray = [k for k, v in options.items() if v is not None]
    if stray:
        raise ConfigError(message.format(stray[0]))


def check_read_options(pretrained: Path | None, trained: dict[str, object], sd_options: dict[str, object]) -> None:
    """`check_source`, then SD's options against the checkpoint's kind (folder or file) and their choices.

    `sd_options` maps `--architecture`, `--weights`, `--prediction` and `--dtype` to their values (None: not set).
    """
    check_source(pretrained, trained, sd_options)
    if pretrained is None:
        return
    if pretrained.is_dir():
        for k in ("--architecture", "--weights"):
            if sd_options[k] is not None:
                raise ConfigError(f"{k} applies to a single-file checkpoint; {pretrained} is a diffusers folder, "
                                  "whose config files give the architecture and its one set of weights")
    for k, choices in (("--architecture", tuple(ARCHITECTURES)), ("--weights", WEIGHTS),
                       ("--prediction", PREDICTION_TYPES), ("--dtype", tuple(DTYPES))):
        if sd_options.get(k) is not None:
            check_choice(k, sd_options[k], choices)


def check_size(height: int | None, width: int | None) -> None:
    """`--height` and `--width`, when given, are positive multiples of 8 (SD v1's VAE factor)."""
    for name, v in (("--height", height), ("--width", width)):
        if v is not None and (v <= 0 or v % 8):
            raise ConfigError(f"{name} must be a positive multiple of 8, got {v}")
