"""`load_pretrained` holds one copy of the weights, and loads them in float32, bfloat16 or float16.

One copy: the models are built without memory or random init for their parameters, which then are the file's tensors
(views of the memory-mapped file where no conversion is needed). bench/load_memory.py measures the peak resident memory
this gives at full size; these tests check its mechanism on the tiny SD-v1-shaped checkpoints of test_pretrained.

Half precision: a float16 file loads as float32 to its values exactly, and as bfloat16 or float16 to those values
rounded once to the dtype; the images drawn in half precision match float32's within the dtype's rounding (see
`test_half_precision_draws_the_float32_images` for the tolerance).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

pytest.importorskip("diffusers")
from safetensors.torch import save_file  # noqa: E402
from test_pretrained import _state, compvis_state_dict, diffusers_models, write_diffusers_folder  # noqa: E402

from sdlib.errors import ConfigError  # noqa: E402
from sdlib.generate import Prompts, generate  # noqa: E402
from sdlib.pretrained.load import VAE_DTYPE, PretrainedSD, load_pretrained  # noqa: E402
from sdlib.pretrained.sd_v1 import TINY_SD_V1  # noqa: E402

# what torch.nn.init and transformers' _init_weights fill parameters with
RANDOM_FILLS = {"uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                "xavier_normal_", "orthogonal_", "random_"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The same tiny weights as a diffusers folder, a float32 CompVis file and a float16 one (SD's usual download,
    whose schedule buffers are float16 too)."""
    root = tmp_path_factory.mktemp("sd")
    unet, vae, text = diffusers_models()
    tensors = compvis_state_dict(unet, vae, text)
    save_file(tensors, str(root / "sd.safetensors"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, str(root / "sd16.safetensors"))
    return {"folder": write_diffusers_folder(root / "diffusers", unet, vae, text),
            "single": root / "sd.safetensors", "single16": root / "sd16.safetensors"}


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
@pytest.mark.parametrize("file, dtype", [("single", torch.float32), ("single16", torch.float16)])
def test_weights_in_the_dtype_asked_are_the_file_pages(files, file, dtype):
    """No second copy: a parameter stored in the dtype asked is a view of the memory-mapped file; the float16 file's VAE,
    converted to float32, is not. Planted bug caught: load_state_dict copying into the models' own parameters."""
    sd = load(files[file], dtype)
    ranges = mapped_ranges(files[file])

    def in_file(p: torch.Tensor) -> bool:
        return any(low <= p.data_ptr() and p.data_ptr() + p.nbytes <= high for low, high in ranges)

    assert all(in_file(p) for p in [*sd.model.unet.parameters(), *sd.model.text.parameters()])
    assert all(in_file(p) == (dtype == VAE_DTYPE) for p in sd.vae.parameters())


# --- dtypes ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float16_file_converts_exactly(files, dtype):
    """The float16 file holds the float32 file's weights rounded to float16: loaded as float32 they are those values
    exactly, and in half precision that rounding, itself rounded to the dtype; the VAE is float32 either way.
    Planted bugs caught: conversion through bfloat16 (float32 load), the VAE in the dtype asked, the schedule
    buffer checked at float32's tolerance (the float16 file refused)."""
    ref = _state(load(files["single"]))
    got = _state(load(files["single16"], dtype))
    assert got.keys() == ref.keys()
    wanted = {k: v.half().to(VAE_DTYPE if k.startswith("vae.") else dtype) for k, v in ref.items()}
    wrong = [k for k, v in got.items() if v.dtype != wanted[k].dtype or not torch.equal(v, wanted[k])]
    assert not wrong, f"{len(wrong)} tensors differ, e.g. {wrong[:3]}"


@torch.no_grad()
def draw(sd: PretrainedSD) -> torch.Tensor:
    return generate(sd.model, sd.vae, Prompts.from_tokenizer(sd.tokenizer, sd.model), ["a red cube", "a blue sphere"],
                    [7, 8], sampler="euler", steps=5, guidance=5.0)


def perturbed(sd: PretrainedSD, u: float, seed: int) -> PretrainedSD:
    """The U-Net and text encoder with each weight w made w (1 + delta), delta ~ U(-u, u): a rounding's worth."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*sd.model.unet.parameters(), *sd.model.text.parameters()]:
            p.mul_(1 + u * (2 * torch.rand(p.shape, generator=g) - 1))
    return sd


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_draws_the_float32_images(files, dtype):
    """The tolerance is the model's own sensitivity to the dtype's rounding, measured in float32.

    A dtype with p significant bits rounds each value by a relative amount up to u = 2^-p (bfloat16: 2^-8, float16:
    2^-11). The half-precision model differs from the float32 one by (a) each weight, rounded once, and (b) each op's
    output, rounded once (matrix products accumulate in float32). (a) alone is measured here: the float32 model with
    each U-Net and text-encoder weight scaled by 1 + U(-u, u). Rounding a layer's output perturbs it about as much as
    rounding its weights does, and each weight layer is followed by about three roundings (its output, a norm or
    activation, a residual sum), so (a) and (b) together are at most 1 + 3 = 4 times (a) when the errors line up, and
    about sqrt(4) = 2 times when they are independent. The bound: mean |image difference| <= 4 x (a), in images in
    [-1, 1]. Measured (Intel Xeon, AVX-512 and AMX): 2.4 x (a) for bfloat16 (0.0141 against 0.0058) and 2.5 x for float16 (0.0018
    against 0.00073); other draws of the perturbation give up to 3.0 x.
    Planted bug caught: the dtype ignored, as before (the converted tensors copied into float32 parameters). Not
    caught, being roundings of the same size: the timestep embedding taken from bfloat16 timesteps (2.9 x (a)), and a
    bfloat16 VAE (2.6 x (a); the VAE's dtype is checked in `test_float16_file_converts_exactly`).
    """
    ref = draw(load(files["single"]))
    u = torch.finfo(dtype).eps / 2  # the unit roundoff
    weights_only = float((draw(perturbed(load(files["single"]), u, seed=0)) - ref).abs().mean())
    sd = load(files["single"], dtype)
    assert {p.dtype for p in [*sd.model.unet.parameters(), *sd.model.text.parameters()]} == {dtype}
    diff = float((draw(sd) - ref).abs().mean())
    assert 0 < diff <= 4 * weights_only, f"{diff:.3g} against {weights_only:.3g} for the weights' rounding alone"


def test_refuses_other_dtypes(files):
    with pytest.raises(ConfigError, match=r"^dtype must be one of float32, bfloat16, float16, got torch.float64$"):
        load(files["single"], torch.float64)
