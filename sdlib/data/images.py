"""Images as tensors and files: the one pixel scaling ([-1, 1] floats <-> uint8), reading image files (any format,
fitted to a size) and PNG output."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from sdlib.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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


def read_pngs(paths: list[Path], channels: int, size: int | None = None) -> torch.Tensor:
    """uint8 (N, channels, H, W) images, size x size (None: all of the first one's size); one of another size is an
    error, not silently resized."""
    if size is None:
        with Image.open(paths[0]) as im:
            w, h = im.size
    else:
        h = w = size
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                a = np.asarray(im.convert("L" if channels == 1 else "RGB"))  # (H, W) or (H, W, 3)
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"{p}: not a readable image ({e})") from None
        if a.shape[:2] != (h, w):
            raise DataError(f"{p}: {a.shape[1]}x{a.shape[0]} image, the data is {w}x{h}")
        images.append(torch.from_numpy(a.reshape(h, w, channels).copy()).permute(2, 0, 1))  # (C, H, W)
    return torch.stack(images)


def _l_or_rgb(im: Image.Image) -> Image.Image:
    """Flatten transparency onto white; grayscale modes become L, all others RGB."""
    gray = im.getbands()[0] in ("L", "1", "I", "F")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
    return im.convert("L" if gray else "RGB")


def load_image(path: Path) -> Image.Image:
    """An image file upright (EXIF orientation applied), in mode L or RGB, transparency flattened onto white."""
    if not path.is_file():
        raise DataError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            im.load()
            return _l_or_rgb(ImageOps.exif_transpose(im))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # unknown, truncated, huge
        raise DataError(f"{path}: not a readable image ({e})") from None


def cover_crop(im: Image.Image, height: int, width: int) -> Image.Image:
    """Scale `im` to cover height x width, keeping its aspect ratio, and crop the centre."""
    w, h = im.size
    scale = max(width / w, height / h)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)  # Pillow low-pass filters when shrinking
    left, top = (nw - width) // 2, (nh - height) // 2
    return im.crop((left, top, left + width, top + height))


def image_files(folder: Path) -> list[Path]:
    """The image files directly in `folder` (by suffix), by name."""
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_fitted(paths: list[Path], height: int, width: int) -> torch.Tensor:
    """RGB uint8 (N, 3, H, W) of image files of any size, each fitted by `cover_crop`."""
    images = [np.asarray(cover_crop(load_image(p).convert("RGB"), height, width)) for p in paths]  # (H, W, 3) each
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
