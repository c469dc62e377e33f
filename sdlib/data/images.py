"""Images as tensors and files: the one pixel scaling ([-1, 1] floats <-> uint8) and PNG input and output."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdlib.errors import DataError


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """Map 0..255 values (uint8, or floats such as a luma mix) to float32 [-1, 1], the scale every network here works
    in; same shape and device."""
    return images.float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Map [-1, 1] floats to uint8 0..255 (same shape, on the CPU), clamping values outside the range."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def save_png(path: str | Path, image: torch.Tensor) -> None:
    """Write one (C, H, W) uint8 image, C = 1 or 3, as a PNG (not atomic: write inside an `atomic_dir`)."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected a (C, H, W) uint8 image with C = 1 or 3, got {tuple(image.shape)} {image.dtype}")
    array = np.ascontiguousarray(image.cpu().permute(1, 2, 0).numpy())  # (H, W, C)
    Image.fromarray(array[..., 0] if image.shape[0] == 1 else array).save(path, format="PNG")


def make_grid_png(path: str | Path, images: torch.Tensor, nrow: int = 10, padding: int = 2,
                  pad_value: int = 255) -> None:
    """Tile (N, C, H, W) uint8 images, `nrow` per row, into one PNG with `pad_value` gaps."""
    from torchvision.utils import make_grid  # imported here: only image writers need torchvision

    grid = make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)  # (3, H', W'): 1 channel is repeated
    save_png(path, grid[:1] if images.shape[1] == 1 else grid)


def read_pngs(paths: list[Path], channels: int, size: int) -> torch.Tensor:
    """uint8 (N, channels, size, size) images; a sample of another size is an error, not silently resized."""
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                a = np.asarray(im.convert("L" if channels == 1 else "RGB"))  # (H, W) or (H, W, 3)
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"{p}: not a readable image ({e})") from None
        if a.shape[:2] != (size, size):
            raise DataError(f"{p}: {a.shape[1]}x{a.shape[0]} image, the data is {size}x{size}")
        images.append(torch.from_numpy(a.reshape(size, size, channels).copy()).permute(2, 0, 1))  # (C, S, S)
    return torch.stack(images)
