"""Starting from saved weights (`unet.init_from`, `vae.init_from`): the checks that run before any long work, and the
content digests that key resumable checkpoints and DVC to the init files.

A model folder (`models/pretrained` as pretrained_convert writes it, or a copy of an earlier `models/unet`) holds
`model.safetensors` (U-Net, text encoder and their arguments) and `tokenizer/`; fine-tuning reads those two and
nothing else. Its arguments are read from the header alone, so a mismatch with the latents or the captions is a
one-line error before gigabytes of weights are loaded.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from sdlib.errors import CheckpointError, ConfigError, DataError
from sdlib.io import read_meta
from sdlib.models.text import TOKENIZER_FILES
from sdlib.models.vae import AutoencoderKL, load_vae

MODEL = "model.safetensors"
TOKENIZER = "tokenizer"


def digest(*paths: Path) -> str:
    """sha256 of files and folders (every file below, by relative name and content), in the order given."""
    h = hashlib.sha256()
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(f"{f.relative_to(path).as_posix() if path.is_dir() else f.name}\0".encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def _not_the_output(path: Path, out: Path, key: str) -> None:
    if path.resolve() == out.resolve():
        raise ConfigError(f"params: {key}: {path} is this stage's own output, which the run replaces; copy it "
                          f"elsewhere first (e.g. cp -r {path} {path.parent / ('base-' + path.name)})")


@dataclass(frozen=True)
class InitModel:
    """A model folder to fine-tune, and what its header (`LatentDiffusion.meta`) says the data must fit."""

    folder: Path
    text_max_length: int  # tokens per caption
    latent_channels: int  # of the U-Net's input
    scale_factor: float  # the latents' scale in training

    def digest(self) -> str:
        """Of what fine-tuning reads: the weights and the tokenizer."""
        return digest(self.folder / MODEL, self.folder / TOKENIZER)


def init_model(init_from: str, out: Path | None = None, key: str = "unet.init_from") -> InitModel:
    """Check that `init_from` is a model folder of a jointly trained text encoder (not `out`); read its header."""
    folder = Path(init_from)
    if out is not None:
        _not_the_output(folder, out, key)
    if not folder.exists():
        raise ConfigError(f"params: {key}: {folder} not found (`make pretrained` writes models/pretrained from your "
                          "SD v1.x checkpoint; or name a copy of an earlier models/unet)")
    missing = [name for name in (MODEL, *(f"{TOKENIZER}/{f}" for f in TOKENIZER_FILES))
               if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"params: {key}: {folder} is not a model folder (no {', '.join(missing)}; "
                          "pretrained_convert and train_unet write one)")
    meta = read_meta(folder / MODEL, kind="ldm")
    if "pretrained" in meta.get("text", {}):
        raise ConfigError(f"params: {key}: {folder} conditions on a frozen text.pretrained encoder; only a model with "
                          "its own text encoder can be fine-tuned")
    try:
        return InitModel(folder, int(meta["text"]["max_length"]), int(meta["unet"]["in_channels"]),
                         float(meta["diffusion"]["scale_factor"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / MODEL}: not a model header ({str(e).splitlines()[0]})") from None


def check_latents(init: InitModel, channels: int, scale_factor: float, latents: Path) -> None:
    """The latents must be in the init model's latent space: its channels, encoded at its scale factor."""
    if channels != init.latent_channels:
        raise DataError(f"{latents} holds {channels}-channel latents, the U-Net of {init.folder} takes "
                        f"{init.latent_channels}; set vae.init_from to the VAE it was trained with")
    if not math.isclose(scale_factor, init.scale_factor, rel_tol=1e-6):
        raise DataError(f"{latents} are at scale factor {scale_factor:.6g}, the U-Net of {init.folder} was trained at "
                        f"{init.scale_factor:.6g}; set vae.init_from to the VAE it was trained with and re-run "
                        "train_vae and encode_latents")


def check_tokenizer(init: InitModel, captions: Path, max_length: int) -> None:
    """The captions must be tokenized as the init model's text encoder was trained: its tokenizer and length."""
    same = all((captions / TOKENIZER / f).is_file()
               and (captions / TOKENIZER / f).read_bytes() == (init.folder / TOKENIZER / f).read_bytes()
               for f in TOKENIZER_FILES)
    if not same or max_length != init.text_max_length:
        raise DataError(f"{captions} was tokenized with another tokenizer or length ({max_length} tokens) than "
                        f"{init.folder} ({init.text_max_length}); re-run encode_captions with unet.init_from set")


def vae_file(init_from: str) -> Path:
    """`vae.init_from`, checked to be a VAE file by its header."""
    path = Path(init_from)
    if not path.is_file():
        raise ConfigError(f"params: vae.init_from: {path} is not a file (name a VAE's .safetensors, e.g. "
                          "models/pretrained/vae.safetensors)")
    read_meta(path, kind="vae")
    return path


def init_vae(init_from: str, out: Path) -> tuple[AutoencoderKL, str]:
    """The VAE file to start from (not `out`), on the CPU, and its digest."""
    _not_the_output(Path(init_from), out, "vae.init_from")
    path = vae_file(init_from)
    vae = load_vae(path)
    if vae.kind != "kl":
        raise CheckpointError(f"params: vae.init_from: {path} is the identity of pixel space, not a VAE to train")
    return vae, digest(path)
