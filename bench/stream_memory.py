"""Peak memory of data larger than memory: preprocessing into shards, training batches read from them, and the
stages that read whole splits (the classifier, evaluation's real features, visualize's one image).

Fabricates a raw data set (default 100,000 random 32x32 RGB images with captions, as the download stage writes
data/raw) in a temporary folder, then measures each case in a fresh process by its peak resident set (VmHWM: what the
kernel counts, the file pages a process maps included):

- preprocess `stream`: the preprocess stage's path, a chunk of images at a time into uint8 shards (`preprocess_to`);
  `memory`: the same images fitted in memory as float32 splits and written whole (`preprocess` + `write_processed`,
  what the stage did before shards)
- batches `stream`: `--batches` random training batches of `--batch-size`, as train_vae draws them (`Batches`, seed 0),
  read from the shards by `pread` (`load_split(..., "stream")`); `memory`: the same batches gathered from the split
  loaded as one float32 tensor (`load_split(..., "memory")`); `mmap`: from the shards memory-mapped with numpy, for
  comparison (the pages a map touches stay resident, so its peak grows with the epochs and the data's size)
- classifier `memory`: `train_classifier` for one epoch on the first `--classifier-images` training images (the
  rest unlabelled, as the stage leaves them out), from the split loaded as one float32 tensor, as train_classifier's
  `data.loading: memory`; `stream`: each batch read from the shards (`stream`). Checked: the same weights to the bit
- features `memory`: the classifier features of the test split (a fixed random classifier), from the split loaded as
  one tensor and converted to uint8, as evaluate held it before; `stream`: read from the shards a chunk at a time
  (`sdlib.evaluation.scoring.real_features`, what evaluate does now). Checked: the same features
- image `memory`: test image 0 of the split loaded as one tensor, as visualize read it before; `stream`: read alone

One JSON line per case, with `peak_mib`, `before_mib` (the process after imports), `net_mib` = peak - before, and
`ratio` = the case's net over the `memory` case's net of the same phase. What each case produced (shards, batches,
weights, features, image) is checked equal to the memory case's.

    python bench/stream_memory.py                        # ~1 GB of disk, about 3 minutes on 2 cores
    python bench/stream_memory.py --images 2000 --batches 20 --classifier-images 500   # a quick check
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional, Sequence

import numpy as np
import torch
import typer
from PIL import Image

from sdlib.data.preprocess import preprocess, preprocess_to
from sdlib.data.images import from_uint8
from sdlib.data.images import to_uint8
from sdlib.data.shards import Rows, ShardedArray
from sdlib.data.sources import RawData, read_raw, write_raw
from sdlib.data.splits import load_split, write_processed
from sdlib.models.classifier import Classifier, ClassifierArgs, save_classifier, train_classifier
from sdlib.training.loop import Batches

app = typer.Typer(add_completion=False)
MIB = 2**20
CASES = [("preprocess", "memory"), ("preprocess", "stream"), ("batches", "memory"), ("batches", "stream"),
         ("batches", "mmap"), ("classifier", "memory"), ("classifier", "stream"), ("features", "memory"),
         ("features", "stream"), ("image", "memory"), ("image", "stream")]
CLASSES = 10  # the fabricated labels of the classifier cases: image i is class i % 10


class FabricatedImages(Sequence):
    """`n` random RGB images, image i made from seed i when it is indexed (the fabricating process stays small)."""

    def __init__(self, n: int, size: int):
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            raise TypeError("no slices")
        pixels = np.random.default_rng(i).integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)
        return Image.fromarray(pixels)


def memory_mib(field: str) -> float:
    """A field of /proc/self/status in MiB: VmRSS (resident now), VmHWM (the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def run_case(phase: str, case: str, work: Path, size: int, shard_size: int, batches: int, batch_size: int,
             classifier_images: int) -> dict:
    """One case in this (fresh) process; returns its memory and time, and a digest of what it produced."""
    if phase == "features":  # imported here, before `before`: only these cases need torch-fidelity (~400 MiB)
        from sdlib.evaluation.metrics import classifier_features
        from sdlib.evaluation.scoring import real_features
    before = memory_mib("VmRSS")
    start = time.perf_counter()
    digest = hashlib.sha256()
    kw = {"image_size": size, "channels": 3, "test_fraction": 0.1, "seed": 0}
    processed = work / "processed-stream"
    if phase == "classifier":
        split = load_split(processed, "train", case)
        labels = torch.where(torch.arange(len(split)) < classifier_images, torch.arange(len(split)) % CLASSES, -1)
        torch.manual_seed(0)
        model = Classifier(ClassifierArgs(in_channels=3, image_size=size, num_classes=CLASSES))
        train_classifier(model, split.images, labels, torch.Generator().manual_seed(0), torch.device("cpu"), epochs=1,
                         batch_size=batch_size, lr=3e-3, progress=False)
        for tensor in model.state_dict().values():
            digest.update(tensor.numpy().tobytes())
    elif phase == "features":
        test = load_split(processed, "test", case)
        real = to_uint8(test.images) if case == "memory" else Rows(test.images.array)
        features = (classifier_features(real, work / "classifier.safetensors", "cpu") if case == "memory"
                    else real_features(real, work / "classifier.safetensors", "cpu"))
        digest.update(features.numpy().tobytes())
    elif phase == "image":
        images = load_split(processed, "test", case).images
        digest.update((images[0] if case == "memory" else images.read(0, 1)[0]).numpy().tobytes())
    elif phase == "preprocess":
        out = work / f"processed-{case}"
        if case == "stream":
            meta = preprocess_to(out, read_raw(work / "raw"), **kw, shard_size=shard_size)
        else:
            train, test, meta = preprocess(read_raw(work / "raw"), **kw)
            meta = write_processed(out, train, test, meta, shard_size=shard_size)
        digest.update(json.dumps(meta["sha256"], sort_keys=True).encode())
    else:
        if case == "mmap":
            array = ShardedArray(processed, "train-images")
            maps = [np.load(f, mmap_mode="r") for f in array.files]
            n = len(array)
        else:
            images = load_split(processed, "train", "memory" if case == "memory" else "stream").images
            n = len(images)
        draw = Batches(n, batch_size, seed=0, device=torch.device("cpu"))
        for step in range(batches):
            idx = draw(step)
            if case == "mmap":
                shard = np.searchsorted(array.starts, idx.numpy(), side="right") - 1
                rows = np.stack([maps[s][i - array.starts[s]] for s, i in zip(shard, idx.numpy())])
                x = from_uint8(torch.from_numpy(rows))
            else:
                x = images[idx]
            digest.update(x.numpy().tobytes())
    seconds = time.perf_counter() - start
    peak = memory_mib("VmHWM")
    return {"phase": phase, "case": case, "peak_mib": round(peak, 1), "before_mib": round(before, 1),
            "net_mib": round(peak - before, 1), "seconds": round(seconds, 2), "digest": digest.hexdigest()[:16]}


@app.command()
def main(
    images: Annotated[int, typer.Option(help="images in the fabricated data set")] = 100_000,
    size: Annotated[int, typer.Option(help="their side, in pixels (RGB)")] = 32,
    shard_size: Annotated[int, typer.Option(help="images per shard")] = 4096,
    batches: Annotated[int, typer.Option(help="training batches read per batches case")] = 300,
    batch_size: Annotated[int, typer.Option(help="images per batch (of the classifier too)")] = 128,
    classifier_images: Annotated[int, typer.Option(
        help="training images the classifier cases train on for one epoch (the rest unlabelled)")] = 2000,
    dir: Annotated[Optional[Path], typer.Option(help="where to fabricate (default: a temporary folder, removed at "
                                                     "the end)")] = None,
    case: Annotated[Optional[str], typer.Option(hidden=True, help="phase:case to measure in this process")] = None,
    work: Annotated[Optional[Path], typer.Option(hidden=True)] = None,
) -> None:
    """Fabricate a data set of IMAGES random images and print the peak memory of each case, one JSON line each."""
    if case is not None:
        phase, name = case.split(":")
        print(json.dumps(run_case(phase, name, work, size, shard_size, batches, batch_size, classifier_images)))
        return
    with tempfile.TemporaryDirectory(dir=dir) as tmp:
        work = Path(tmp)
        print(f"fabricating {images} images of {size}x{size} RGB in {work}", file=sys.stderr)
        write_raw(RawData("folder", FabricatedImages(images, size), [-1] * images,
                          [[f"random picture {i}"] for i in range(images)], [], False), work / "raw")
        torch.manual_seed(0)  # a fixed random classifier: the feature space of the features cases
        save_classifier(work / "classifier.safetensors",
                        Classifier(ClassifierArgs(in_channels=3, image_size=size, num_classes=CLASSES)).eval(),
                        [str(k) for k in range(CLASSES)])
        results: dict[tuple[str, str], dict] = {}
        for phase, name in CASES:
            print(f"{phase}: {name}", file=sys.stderr)
            out = subprocess.run([sys.executable, __file__, "--case", f"{phase}:{name}", "--work", str(work),
                                  "--size", str(size), "--shard-size", str(shard_size), "--batches", str(batches),
                                  "--batch-size", str(batch_size), "--classifier-images", str(classifier_images)],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{phase} {name} failed:\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.splitlines()[-1])
            base = results.get((phase, "memory"), result)
            if result["digest"] != base["digest"]:
                sys.exit(f"{phase} {name} produced other data than {phase} memory")
            result |= {"images": images, "size": size, "shard_size": shard_size, "float32_mib":
                       round(images * 3 * size * size * 4 / MIB, 1), "ratio": round(result["net_mib"] / base["net_mib"], 3)}
            if phase == "batches":
                result |= {"batches": batches, "batch_size": batch_size}
            if phase == "classifier":
                result |= {"classifier_images": classifier_images, "batch_size": batch_size}
            results[phase, name] = result
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app()
