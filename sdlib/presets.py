"""Params overrides: dotted keys (`unet.lr=2e-3`, as `dvc exp run -S` takes them) and preset files under configs/.

A preset is a partial params.yaml: only the keys it changes, nested as in params.yaml. It is run as one DVC experiment
(`python -m stages.preset NAME`), so that params.yaml stays the default and every preset lands in `dvc exp show` and
MLflow beside it. Every key must exist in params.yaml and the merged sections must validate, so that a typo or a bad
value stops before DVC starts any work.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from sdlib import config
from sdlib.errors import ConfigError

PRESETS = Path("configs")  # relative to the repository root


def parse_overrides(items: list[str], option: str = "--params-override") -> dict[str, object]:
    """["a.b=value", ...] -> {"a.b": the YAML value}; an item without "=" is an error naming `option`."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{option}: expected key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def set_params(params: dict, overrides: dict[str, object], option: str = "--params-override") -> dict:
    """params['a']['b'] = value for each dotted key `a.b` (in place); the key must already exist (catches typos)."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise ConfigError(f"{option}: params.yaml has no key {key!r}")
        node[leaf] = value
    return params


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"unet": {"lr": 2e-3}} -> {"unet.lr": 2e-3}: leaves are anything but a mapping (lists included)."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def available(root: Path) -> dict[str, Path]:
    """name -> file of every preset under root/configs."""
    return {f.stem: f for f in sorted((root / PRESETS).glob("*.yaml"))}


def read_preset(root: Path, name: str) -> dict[str, object]:
    """The dotted-key overrides of preset `name` (root/configs/<name>.yaml)."""
    presets = available(root)
    if name not in presets:
        raise ConfigError(f"no preset {name!r} in {root / PRESETS} (there are: {', '.join(presets) or 'none'})")
    try:
        tree = yaml.safe_load(presets[name].read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{presets[name]}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(tree, dict) or not tree:
        raise ConfigError(f"{presets[name]}: expected a mapping of params.yaml sections and keys")
    return flatten(tree)


def merged(params: dict, overrides: dict[str, object], option: str) -> dict:
    """A copy of `params` with `overrides`, each section (or top-level key) they touch validated as its stage will
    validate it: a bad value is a one-line ConfigError here rather than a failed stage later."""
    out = set_params(copy.deepcopy(params), overrides, option)
    for top in {key.split(".")[0] for key in overrides}:
        if top in config.SECTIONS:
            config.parse_section(top, out[top])
        elif top in config.TOP_LEVEL:
            config.top_level(out, top)
    return out


def exp_run_args(name: str, overrides: dict[str, object]) -> list[str]:
    """`dvc exp run` arguments that run the overrides as experiment `name` (values as JSON, which is YAML)."""
    sets = [a for key, value in overrides.items() for a in ("-S", f"{key}={json.dumps(value)}")]
    return ["dvc", "exp", "run", "-n", name, *sets]
