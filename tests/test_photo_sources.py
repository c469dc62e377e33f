"""The photo sources flowers102 and coco, on fabricated copies of their real on-disk layouts: images, labels, captions,
classes, `data.limit`, and the one-line errors for missing or broken files."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from sdlib.data.captions import class_captions, prompt_label
from sdlib.data.sources import COCO_ATTRIBUTION, FLOWERS102_ATTRIBUTION, NO_CAPTION, fetch_source, read_raw
from sdlib.data.splits import load_split
from sdlib.models.classifier import is_trained
from stages.train_classifier import app as train_classifier_app
from test_data import assert_user_error, download, run_preprocess, runner  # noqa: E402


def write_jpg(path: Path, width: int, height: int, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), colour).save(path, format="JPEG")


# ------------------------------------------------------------------------------------------------------ flowers102

# Image id -> 1-based label as in imagelabels.mat; each image is 20 + id pixels wide, so it can be told apart.
FLOWER_LABELS = {k: (7 * k) % 102 + 1 for k in range(1, 13)}
FLOWER_SPLITS = {"trnid": [3, 1, 7, 12], "valid": [2, 9, 5], "tstid": [11, 4, 6, 8, 10]}  # pooled in this order
FLOWER_ORDER = [k for ids in FLOWER_SPLITS.values() for k in ids]


def write_flowers(root: Path) -> Path:
    """torchvision's Flowers102 layout: flowers-102/jpg/image_00001.jpg..., imagelabels.mat, setid.mat (1-based)."""
    folder = root / "flowers-102"
    for k in FLOWER_LABELS:
        write_jpg(folder / "jpg" / f"image_{k:05d}.jpg", 20 + k, 16, (10 * k, 100, 200))
    scipy.io.savemat(folder / "imagelabels.mat", {"labels": np.array([list(FLOWER_LABELS.values())], np.uint8)})
    scipy.io.savemat(folder / "setid.mat", {key: np.array([ids], np.uint16) for key, ids in FLOWER_SPLITS.items()})
    return root


@pytest.fixture
def flowers_md5(monkeypatch):
    """torchvision checks the .mat files' md5 against the real dataset's: point it at the fabricated files."""
    from torchvision.datasets import Flowers102

    def point(root: Path) -> None:
        folder = root / "flowers-102"
        files = {key: (name, hashlib.md5((folder / name).read_bytes()).hexdigest())
                 for key, (name, _) in Flowers102._file_dict.items() if key != "image"}
        monkeypatch.setattr(Flowers102, "_file_dict", {**Flowers102._file_dict, **files})

    return point


def test_flowers102_images_labels_classes_and_captions(tmp_path, params_file, flowers_md5) -> None:
    from torchvision.datasets import Flowers102

    root = write_flowers(tmp_path / "external")
    flowers_md5(root)
    params = params_file(data={"source": "flowers102", "root": str(root), "channels": 3, "image_size": 16,
                               "test_fraction": 0.25})
    result = download(params, tmp_path / "raw")
    assert result.exit_code == 0, result.output
    assert FLOWERS102_ATTRIBUTION in result.stdout
    raw = read_raw(tmp_path / "raw")
    assert raw.source == "flowers102" and not raw.digits and raw.attribution == FLOWERS102_ATTRIBUTION
    assert raw.classes == Flowers102.classes and len(raw.classes) == 102 and raw.classes[0] == "pink primrose"
    assert [im.size for im in raw.images] == [(20 + k, 16) for k in FLOWER_ORDER]  # train, val, test pooled
    assert raw.labels == [FLOWER_LABELS[k] - 1 for k in FLOWER_ORDER]  # 0-based class index
    assert all(im.mode == "RGB" for im in raw.images) and raw.captions == [[]] * len(FLOWER_ORDER)

    result = run_preprocess(params, tmp_path / "raw", tmp_path / "processed")
    assert result.exit_code == 0, result.output
    train, test = load_split(tmp_path / "processed", "train"), load_split(tmp_path / "processed", "test")
    assert len(train) + len(test) == 12 and train.images.shape[1:] == (3, 16, 16) and len(test) == 3
    for split in (train, test):
        for label, captions in zip(split.labels.tolist(), split.captions):
            name = raw.classes[label]
            assert f"a photo of {'an' if name[0] in 'aeiou' else 'a'} {name}, a type of flower" in captions
            assert name in captions and len(captions) == 5
    meta = json.loads((tmp_path / "processed" / "meta.json").read_text())
    assert "a photo of {a_name}, a type of flower" in meta["templates"] and meta["classes"] == raw.classes


def test_flowers102_captions_name_their_class() -> None:
    """Every caption of every flower names its own class for conditional accuracy ("rose" inside "desert-rose"...)."""
    from torchvision.datasets import Flowers102

    classes = Flowers102.classes
    assert class_captions(0, classes, False, "flowers102")[-1] == "a photo of a pink primrose, a type of flower"
    assert class_captions(4, classes, False, "flowers102")[-1] == "a photo of an english marigold, a type of flower"
    for k in range(len(classes)):
        for caption in class_captions(k, classes, False, "flowers102"):
            assert prompt_label(caption, classes, False) == k, caption


def test_flowers102_limit(tmp_path, flowers_md5) -> None:
    root = write_flowers(tmp_path)
    flowers_md5(root)

    def pairs(limit: int, seed: int) -> list[tuple[tuple[int, int], int]]:
        raw = fetch_source("flowers102", root=root, download=False, limit=limit, seed=seed, image_size=32)
        return [(im.size, y) for im, y in zip(raw.images, raw.labels)]

    full, five = pairs(0, 0), pairs(5, 0)
    assert len(five) == 5 and five == [p for p in full if p in five]  # a subset, in source order
    assert five == pairs(5, 0) and five != pairs(5, 1)


def test_flowers102_missing_or_broken_files(tmp_path, params_file, flowers_md5, monkeypatch) -> None:
    root = tmp_path / "external"
    params = params_file(data={"source": "flowers102", "root": str(root), "channels": 3})
    assert_user_error(download(params, tmp_path / "raw"),
                      f"no Flowers102 files found (set data.download: true when online, or place torchvision's "
                      f"Flowers102 files jpg, imagelabels.mat, setid.mat in {root / 'flowers-102'})")
    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr("torchvision.datasets.flowers102.download_and_extract_archive", offline)
    online = params_file(data={"source": "flowers102", "root": str(root), "download": True})
    assert_user_error(download(online, tmp_path / "raw"), f"data.root={root}: could not download Flowers102 "
                      "(<urlopen error [Errno -3] Temporary failure in name resolution>)")
    write_flowers(root)
    # the fabricated .mat files are not the real ones, whose md5 torchvision checks
    assert_user_error(download(params, tmp_path / "raw"), f"Flowers102 files in {root / 'flowers-102'} are incomplete "
                      "or corrupt (Dataset not found or corrupted")
    flowers_md5(root)
    setid = root / "flowers-102" / "setid.mat"
    kept = setid.read_bytes()
    setid.unlink()
    assert_user_error(download(params, tmp_path / "raw"), "are incomplete (missing setid.mat)")
    setid.write_bytes(kept)
    (root / "flowers-102" / "jpg" / "image_00009.jpg").write_bytes(b"not a jpeg")
    assert_user_error(download(params, tmp_path / "raw"), "image not readable (cannot identify image file")
    (root / "flowers-102" / "jpg" / "image_00009.jpg").unlink()
    assert_user_error(download(params, tmp_path / "raw"), "image_00009.jpg")
    assert not (tmp_path / "raw").exists()


# ------------------------------------------------------------------------------------------------------------ coco

# split -> image id -> captions; the image of id k is 30 + k pixels wide. Image 8 has no caption.
COCO = {"train2017": {5: ["A cat on a mat.", "  a cat\nsitting  on a mat ", "Grey cat."], 2: ["Two dogs play."],
                      8: []},
        "val2017": {1: ["A red bus.", "A bus on a street."]}}
COCO_ORDER = [(2, ["Two dogs play."]), (5, ["A cat on a mat.", "a cat sitting on a mat", "Grey cat."]),
              (1, ["A red bus.", "A bus on a street."])]  # by id within a split, train first


def write_coco(root: Path, splits: tuple[str, ...] = ("train2017", "val2017"), coco: dict = COCO) -> Path:
    """COCO's layout: <root>/train2017/000000000005.jpg ..., <root>/annotations/captions_train2017.json."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = 100
    for split in splits:
        images, annotations = [], []
        for k, captions in coco[split].items():
            file = f"{k:012d}.jpg"
            write_jpg(root / split / file, 30 + k, 24, (20 * k, 50, 90))
            images.append({"id": k, "file_name": file, "width": 30 + k, "height": 24, "license": 1})
            for caption in captions:
                annotations.append({"id": ann_id, "image_id": k, "caption": caption})
                ann_id += 1
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(
            {"info": {}, "licenses": [{"id": 1, "name": "CC BY 2.0", "url": ""}], "images": images,
             "annotations": annotations}))
    return root


def test_coco_every_caption_no_classes(tmp_path, params_file) -> None:
    root = write_coco(tmp_path / "coco")
    params = params_file(data={"source": "coco", "root": str(root), "channels": 3, "image_size": 16,
                               "test_fraction": 0.4})
    result = download(params, tmp_path / "raw")
    assert result.exit_code == 0, result.output
    assert f"skipped 1 ({NO_CAPTION})" in result.stdout and COCO_ATTRIBUTION in result.stdout
    raw = read_raw(tmp_path / "raw")
    assert raw.source == "coco" and raw.classes == [] and raw.labels == [-1] * 3 and raw.skipped == {NO_CAPTION: 1}
    assert [im.size for im in raw.images] == [(30 + k, 24) for k, _ in COCO_ORDER]
    assert raw.captions == [captions for _, captions in COCO_ORDER]
    assert all(im.mode == "RGB" for im in raw.images) and raw.attribution == COCO_ATTRIBUTION

    result = run_preprocess(params, tmp_path / "raw", tmp_path / "processed")
    assert result.exit_code == 0, result.output
    train, test = load_split(tmp_path / "processed", "train"), load_split(tmp_path / "processed", "test")
    assert len(train) == 2 and len(test) == 1 and train.images.shape[1:] == (3, 16, 16)
    assert sorted(train.captions + test.captions) == sorted(captions for _, captions in COCO_ORDER)
    assert json.loads((tmp_path / "processed" / "meta.json").read_text())["templates"] == []

    # The classifier (FID's feature space, cond_acc's judge) needs classes: a placeholder, as for an unlabelled folder
    result = runner.invoke(train_classifier_app, ["--params", str(params), "--data", str(tmp_path / "processed"),
                                                  "--out", str(tmp_path / "c.safetensors"),
                                                  "--metrics", str(tmp_path / "c.json")])
    assert result.exit_code == 0, result.output
    assert "none trained: the data has 0 class(es)" in result.stdout and not is_trained(tmp_path / "c.safetensors")
    assert json.loads((tmp_path / "c.json").read_text()) == {"n_classes": 0}


def test_coco_train_only_and_limit(tmp_path) -> None:
    root = write_coco(tmp_path, ("train2017",))

    def captions(limit: int, seed: int) -> list[list[str]]:
        return fetch_source("coco", root=root, download=False, limit=limit, seed=seed, image_size=32).captions

    assert captions(0, 0) == [c for _, c in COCO_ORDER[:2]]
    one = [captions(1, seed) for seed in range(8)]
    assert all(len(c) == 1 for c in one) and {str(c) for c in one} == {str([c]) for _, c in COCO_ORDER[:2]}
    assert captions(1, 3) == captions(1, 3)


def test_coco_photos_are_read_one_at_a_time_as_they_are_written(tmp_path, monkeypatch) -> None:
    """Fetching reads no photo; write_raw reads each of 12 once, while at most two photos read before are still alive
    (the one being written, and one in Python's iterator machinery), and writes the pixels torchvision's CocoCaptions
    reads (RGB): memory holds a photo or two, whatever COCO's size."""
    import gc
    import weakref

    from torchvision.datasets import CocoCaptions

    from sdlib.data.sources import write_raw

    root = write_coco(tmp_path / "coco", ("train2017",), {"train2017": {k: [f"photo {k}"] for k in range(1, 13)}})
    read, alive_at_read = [], []
    load = CocoCaptions._load_image

    def counting(self, image_id):
        gc.collect()
        alive_at_read.append(sum(ref() is not None for ref in read))
        image = load(self, image_id)
        read.append(weakref.ref(image))
        return image

    monkeypatch.setattr(CocoCaptions, "_load_image", counting)
    raw = fetch_source("coco", root=root, download=False, limit=0, seed=0, image_size=32)
    assert len(raw.images) == 12 and read == []
    write_raw(raw, tmp_path / "raw")
    assert len(read) == 12 and max(alive_at_read) <= 2, alive_at_read
    for k in range(1, 13):
        with Image.open(root / "train2017" / f"{k:012d}.jpg") as photo, \
                Image.open(tmp_path / "raw" / "images" / f"{k - 1:05d}.png") as png:
            assert png.mode == "RGB" and np.array_equal(np.asarray(png), np.asarray(photo.convert("RGB")))


def test_coco_missing_or_broken_files(tmp_path, params_file) -> None:
    root = tmp_path / "coco"
    params = params_file(data={"source": "coco", "root": str(root), "channels": 3})
    assert_user_error(download(params, tmp_path / "raw"), f"data.root={root}: no COCO captions file "
                      "annotations/captions_train2017.json (or captions_val2017.json) with its images folder "
                      "train2017/ (or val2017/); fetch train2017.zip")
    online = params_file(data={"source": "coco", "root": str(root), "download": True})
    assert_user_error(download(online, tmp_path / "raw"), "torchvision cannot download COCO; fetch train2017.zip (and "
                      "val2017.zip if wanted) and annotations_trainval2017.zip from https://cocodataset.org/#download")
    write_coco(root)
    (root / "val2017" / f"{1:012d}.jpg").unlink()
    assert_user_error(download(params, tmp_path / "raw"), "1 of the 3 COCO images to read are missing, "
                      f"e.g. {root / 'val2017' / f'{1:012d}.jpg'}")
    for file in (root / "val2017").iterdir():
        file.unlink()
    (root / "val2017").rmdir()
    assert_user_error(download(params, tmp_path / "raw"),
                      f"found captions_val2017.json but not its images folder {root / 'val2017'}")
    (root / "val2017").mkdir()
    (root / "annotations" / "captions_val2017.json").write_text("{not json")
    assert_user_error(download(params, tmp_path / "raw"), "captions_val2017.json: not a COCO captions file (")
    (root / "annotations" / "captions_val2017.json").unlink()
    (root / "train2017" / f"{5:012d}.jpg").write_bytes(b"not a jpeg")
    assert_user_error(download(params, tmp_path / "raw"), "image not readable (cannot identify image file")
    assert not (tmp_path / "raw").exists()
