"""Peak memory of data larger than memory: preprocessing into shards, and training batches read from them.

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

One JSON line per case, with `peak_mib`, `before_mib` (the process after imports), `net_mib` = peak - before, and
`ratio` = the case's net over the `memory` case's net of the same phase. Every batch of the stream and mmap cases is
checked equal to the memory case's.

    python bench/stream_memory.py                        # ~1 GB of disk, about 3 minutes on 2 cores
    python bench/stream_memory.py --images 2000 --batches 20   # a quick check
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
from sdlib.data.shards import ShardedArray
from sdlib.data.sources import RawData, read_raw, write_raw
from sdlib.data.splits import load_split, write_processed
from sdlib.training.loop import Batches

app = typer.Typer(add_completion=False)
MIB = 2**20
CASES = [("preprocess", "memory"), ("preprocess", "stream"), ("batches", "memory"), ("batches", "stream"),
         ("batches", "mmap")]


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


def run_case(phase: str, case: str, work: Path, size: int, shard_size: int, batches: int, batch_size: int) -> dict:
    """One case in this (fresh) process; returns its memory and time, and a digest of what it produced."""
    before = memory_mib("VmRSS")
    start = time.perf_counter()
    digest = hashlib.sha256()
    kw = {"image_size": size, "channels": 3, "test_fraction": 0.1, "seed": 0}
    if phase == "preprocess":
        out = work / f"processed-{case}"
        if case == "stream":
            meta = preprocess_to(out, read_raw(work / "raw"), **kw, shard_size=shard_size)
        else:
            train, test, meta = preprocess(read_raw(work / "raw"), **kw)
            meta = write_processed(out, train, test, meta, shard_size=shard_size)
        digest.update(json.dumps(meta["sha256"], sort_keys=True).encode())
    else:
        processed = work / "processed-stream"
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
    batch_size: Annotated[int, typer.Option(help="images per batch")] = 128,
    dir: Annotated[Optional[Path], typer.Option(help="where to fabricate (default: a temporary folder, removed at "
                                                     "the end)")] = None,
    case: Annotated[Optional[str], typer.Option(hidden=True, help="phase:case to measure in this process")] = None,
    work: Annotated[Optional[Path], typer.Option(hidden=True)] = None,
) -> None:
    """Fabricate a data set of IMAGES random images and print the peak memory of each case, one JSON line each."""
    if case is not None:
        phase, name = case.split(":")
        print(json.dumps(run_case(phase, name, work, size, shard_size, batches, batch_size)))
        return
    with tempfile.TemporaryDirectory(dir=dir) as tmp:
        work = Path(tmp)
        print(f"fabricating {images} images of {size}x{size} RGB in {work}", file=sys.stderr)
        write_raw(RawData("folder", FabricatedImages(images, size), [-1] * images,
                          [[f"random picture {i}"] for i in range(images)], [], False), work / "raw")
        results: dict[tuple[str, str], dict] = {}
        for phase, name in CASES:
            print(f"{phase}: {name}", file=sys.stderr)
            out = subprocess.run([sys.executable, __file__, "--case", f"{phase}:{name}", "--work", str(work),
                                  "--size", str(size), "--shard-size", str(shard_size), "--batches", str(batches),
                                  "--batch-size", str(batch_size)], capture_output=True, text=True)
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
            results[phase, name] = result
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app()
