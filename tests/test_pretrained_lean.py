"""`load_pretrained` holds one copy of the weights.

The models are built without memory or random init for their parameters, which then are the file's tensors
(views of the memory-mapped file where no conversion is needed). bench/load_memory.py measures the peak resident memory
this gives at full size; these tests check its mechanism on the tiny SD-v1-shaped checkpoints of test_pretrained.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

pytest.importorskip("diffusers")
from safetensors.torch import save_file  # noqa: E402
from test_pretrained import compvis_state_dict, diffusers_models, write_diffusers_folder  # noqa: E402

from sdlib.pretrained.load import PretrainedSD, load_pretrained  # noqa: E402
from sdlib.pretrained.sd_v1 import TINY_SD_V1  # noqa: E402

# what torch.nn.init and transformers' _init_weights fill parameters with
RANDOM_FILLS = {"uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                "xavier_normal_", "orthogonal_", "random_"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The same tiny weights as a diffusers folder and a CompVis file."""
    root = tmp_path_factory.mktemp("sd")
    unet, vae, text = diffusers_models()
    tensors = compvis_state_dict(unet, vae, text)
    save_file(tensors, str(root / "sd.safetensors"))
    return {"folder": write_diffusers_folder(root / "diffusers", unet, vae, text),
            "single": root / "sd.safetensors"}


def load(path: Path, dtype: torch.dtype = torch.float32) -> PretrainedSD:
    return load_pretrained(path, config=TINY_SD_V1, dtype=dtype)


# --- one copy --------------------------------------------------------------------------------------------------------

class RandomFills(TorchFunctionMode):
    """Records the random fills made on tensors that have memory (not on the meta device)."""

    def __init__(self):
        super().__init__()
        self.fills: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensor = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by keyword
        if name in RANDOM_FILLS and isinstance(tensor, torch.Tensor) and not tensor.is_meta:
            self.fills.append(f"{name} {tuple(tensor.shape)}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("layout", ["folder", "single"])
def test_loading_makes_no_random_init(files, layout):
    """Planted bug caught: the models built on the CPU, as before (kaiming_uniform_ on every conv and linear)."""
    with RandomFills() as mode:
        sd = load(files[layout])
    assert mode.fills == [], f"{len(mode.fills)} random fills, e.g. {mode.fills[:3]}"
    tensors = [*sd.model.parameters(), *sd.model.buffers(), *sd.vae.parameters(), *sd.vae.buffers()]
    assert not any(t.is_meta for t in tensors)


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges where this process maps `path`."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            low, high = line.split()[0].split("-")
            ranges.append((int(low, 16), int(high, 16)))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
@pytest.mark.parametrize("file, dtype", [("single", torch.float32)])
def test_weights_in_the_dtype_asked_are_the_file_pages(files, file, dtype):
    """No second copy: a parameter stored in the dtype asked is a view of the memory-mapped file.
    Planted bug caught: load_state_dict copying into the models' own parameters."""
    sd = load(files[file], dtype)
    ranges = mapped_ranges(files[file])

    def in_file(p: torch.Tensor) -> bool:
        return any(low <= p.data_ptr() and p.data_ptr() + p.nbytes <= high for low, high in ranges)

    assert all(in_file(p) for p in [*sd.model.unet.parameters(), *sd.model.text.parameters(), *sd.vae.parameters()])
