"""Peak memory of `load_pretrained` on a full-size SD v1.x checkpoint, as a multiple of the file's weight bytes.

Fabricates SD v1.x with random weights in its real layouts (860M-parameter U-Net, 83M VAE, 123M CLIP ViT-L/14 text
tower): a CompVis single .safetensors file and a diffusers folder in float32 (4.3 GB each), and a float16 single file
as most SD v1.5 downloads are. Each case then loads in a fresh process and reads every weight once, and reports its
peak resident set (VmHWM: anonymous memory and the file pages it maps, as the kernel counts it) against the
checkpoint's weight bytes. One JSON line per case; `ratio_net` leaves out what the process held before loading
(Python, torch, transformers), `peak_loaded_gib` is the peak before the weights were read.

    python bench/load_memory.py                            # ~11 GB of disk in --dir, and the memory it reports
    python bench/load_memory.py --architecture tiny_sd_v1  # the same code paths at a few million parameters
"""
from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from sdlib.ldm import LatentDiffusion
from sdlib.models.vae import AutoencoderKL
from sdlib.pretrained.export import layout_tensors, write_diffusers_configs
from sdlib.pretrained.keymap import COMPVIS_PREFIX, Layout
from sdlib.pretrained.load import DIFFUSERS_WEIGHTS, load_pretrained
from sdlib.pretrained.sd_v1 import ARCHITECTURES, SDConfig

app = typer.Typer(add_completion=False)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16"}
# (layout, dtype on disk, dtype loaded): float32 in each layout; a float16 file as is, for the CPU (bf16) and as float32
CASES = [("compvis", "float32", "float32"), ("diffusers", "float32", "float32"), ("compvis", "float16", "float16"),
         ("compvis", "float16", "bfloat16"), ("compvis", "float16", "float32")]
GIB = 2**30


def empty_models(cfg: SDConfig) -> tuple[LatentDiffusion, AutoencoderKL]:
    """sdlib's models in uninitialised CPU storage that is never touched, hence takes no resident memory."""
    with torch.device("meta"):
        model = LatentDiffusion(unet=cfg.unet, text=cfg.text, diffusion=cfg.diffusion, latent_hw=cfg.latent_hw)
        vae = AutoencoderKL(cfg.vae)
    return model.to_empty(device="cpu"), vae.to_empty(device="cpu")


def layout_shapes(model: LatentDiffusion, vae: AutoencoderKL, layout: Layout) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per part (unet, vae, text_encoder), the layout's tensor names and shapes, as `export` writes them."""
    return {part: {k: tuple(t.shape) for k, t in tensors.items()}
            for part, tensors in layout_tensors(model, vae, layout).items()}


def write_random_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                             generator: torch.Generator) -> None:
    """A safetensors file of random N(0, 0.02^2) tensors, written one tensor at a time (safetensors' `save_file`
    would hold a second copy of them all)."""
    size = torch.empty(0, dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        n = math.prod(shape) * size
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the format's 8-byte alignment of the data
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for shape in shapes.values():
            f.write((0.02 * torch.randn(shape, generator=generator)).to(dtype).numpy().tobytes())


def fabricate(cfg: SDConfig, root: Path) -> dict[tuple[str, str], Path]:
    """The checkpoints of CASES under `root`, by (layout, dtype on disk)."""
    model, vae = empty_models(cfg)
    g = torch.Generator().manual_seed(0)
    paths = {}
    for layout, file_dtype in sorted({(c[0], c[1]) for c in CASES}):
        dtype, parts = DTYPES[file_dtype], layout_shapes(model, vae, layout)
        if layout == "compvis":
            path = root / f"sd-{file_dtype}.safetensors"
            flat = {COMPVIS_PREFIX[part] + k: s for part, shapes in parts.items() for k, s in shapes.items()}
            write_random_safetensors(path, flat, dtype, g)
        else:
            path = root / f"sd-diffusers-{file_dtype}"
            write_diffusers_configs(model, vae, path)
            for part, shapes in parts.items():
                write_random_safetensors(path / part / f"{DIFFUSERS_WEIGHTS[part]}.safetensors", shapes, dtype, g)
        paths[layout, file_dtype] = path
    return paths


def weight_bytes(path: Path) -> int:
    """The tensor bytes of a safetensors file, or of every one in a folder (the headers left out)."""
    total = 0
    for f in sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
        total += f.stat().st_size - 8 - n
    return total


def memory_kib(field: str) -> int:
    """A field of /proc/self/status in KiB: VmRSS (resident now), VmHWM (the peak), RssAnon, RssFile."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(path: Path, architecture: str, dtype: str) -> dict:
    """Load `path` in this (fresh) process, then read every weight once (as a first forward pass does: a memory-mapped
    weight takes memory when it is read), and report the memory at each point."""
    before = memory_kib("VmRSS") * 1024
    start = time.perf_counter()
    sd = load_pretrained(path, config=ARCHITECTURES[architecture], dtype=DTYPES[dtype])
    seconds = time.perf_counter() - start
    loaded = memory_kib("VmHWM") * 1024
    tensors = [t for m in (sd.model.unet, sd.model.text, sd.vae) for t in m.state_dict().values()]
    for t in tensors:
        t.sum()
    peak, weights = memory_kib("VmHWM") * 1024, weight_bytes(path)
    return {"weights_gib": weights / GIB, "model_gib": sum(t.numel() * t.element_size() for t in tensors) / GIB,
            "before_gib": before / GIB, "peak_loaded_gib": loaded / GIB, "peak_gib": peak / GIB,
            "ratio": peak / weights, "ratio_net": (peak - before) / weights, "load_s": seconds,
            "rss_anon_gib": memory_kib("RssAnon") * 1024 / GIB, "rss_file_gib": memory_kib("RssFile") * 1024 / GIB}


@app.command()
def main(
    architecture: Annotated[str, typer.Option(help=f"one of {', '.join(ARCHITECTURES)}")] = "sd_v1",
    dir: Annotated[Optional[Path], typer.Option(help="where to write the checkpoints (default: a temporary folder, "
                                                     "removed at the end)")] = None,
    load: Annotated[Optional[Path], typer.Option(hidden=True, help="measure this checkpoint in this process")] = None,
    dtype: Annotated[str, typer.Option(hidden=True)] = "float32",
) -> None:
    """Fabricate SD v1.x checkpoints and print the peak resident memory of loading each, one JSON line per case."""
    if architecture not in ARCHITECTURES:
        raise typer.BadParameter(f"must be one of {', '.join(ARCHITECTURES)}", param_hint="--architecture")
    if load is not None:
        print(json.dumps(measure(load, architecture, dtype)))
        return
    with tempfile.TemporaryDirectory(dir=dir) as tmp:
        print(f"writing the checkpoints to {tmp}", file=sys.stderr)
        paths = fabricate(ARCHITECTURES[architecture], Path(tmp))
        for layout, file_dtype, load_dtype in CASES:
            out = subprocess.run([sys.executable, __file__, "--architecture", architecture, "--load",
                                  str(paths[layout, file_dtype]), "--dtype", load_dtype],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"loading {paths[layout, file_dtype]} failed:\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.splitlines()[-1])
            print(json.dumps({"architecture": architecture, "layout": layout, "file_dtype": file_dtype,
                              "dtype": load_dtype, **{k: round(v, 3) for k, v in result.items()}}), flush=True)


if __name__ == "__main__":
    app()
