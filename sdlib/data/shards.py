"""Arrays larger than memory as numbered .npy shards: written a chunk at a time, read back by rows.

A sharded array `name` in a folder is the files `name-00000.npy`, `name-00001.npy`, ..., plain C-order .npy files
(`numpy.load` reads any one of them) of one dtype and row shape, `shard_size` rows each but the last. A writer knows
the row count up front, so it streams each chunk straight to its file; a reader `pread`s the rows it is asked for into
a buffer of that size. Either holds only what it is handed or returns, whatever the array's size. (A memory map reads
as fast, but every page it has touched stays in the process's resident set, which then grows to the file's size over
a few epochs of random batches; the kernel's page cache keeps hot files in memory for `pread` just as well.)
"""
from __future__ import annotations

import hashlib
import os
import weakref
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
import numpy.lib.format as npy_format
import torch

from sdlib.errors import DataError

SHARD = "{name}-{index:05d}.npy"
MAX_SHARDS = 100_000  # the five digits of the names
SHARD_SIZE = 4096  # rows per shard unless told (`data.shard_size`'s default)
Loading = Literal["memory", "stream"]  # a data set as one tensor in memory, or rows read from its shards on demand
LoadingSetting = Literal["auto", "memory", "stream"]
LOAD_CHUNK_BYTES = 16 * 2**20  # `Rows.load` reads this much of the shards at a time (float32 from uint8: 4x that)
AUTO_MEMORY_BYTES = 2 * 2**30  # `auto` keeps a training set in memory up to this size (as float32)
HEADER_READERS = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}


def shard_files(folder: Path, name: str) -> list[Path]:
    """The shards of `name` in `folder`, in order (the names sort as the shards' order)."""
    return sorted(folder.glob(f"{name}-[0-9][0-9][0-9][0-9][0-9].npy"))


def pick_loading(setting: LoadingSetting, nbytes: int) -> Loading:
    """`auto`: memory for a data set of up to AUTO_MEMORY_BYTES (as the float32 tensors training reads), else stream.
    Both give the same batches, hence the same training run; memory is faster, streaming holds a batch at a time."""
    if setting != "auto":
        return setting
    return "memory" if nbytes <= AUTO_MEMORY_BYTES else "stream"


class ShardWriter:
    """Writes the `n` rows (each `row_shape`, `dtype`) of array `name` into `folder` as shards of `shard_size`."""

    def __init__(self, folder: Path, name: str, n: int, row_shape: tuple[int, ...], dtype: np.dtype | type,
                 shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        if -(-n // shard_size) > MAX_SHARDS:
            raise DataError(f"{n} rows of {name} in shards of {shard_size} would make more than {MAX_SHARDS} files; "
                            "raise data.shard_size")
        self.folder, self.name, self.n, self.shard_size = Path(folder), name, n, shard_size
        self.row_shape, self.dtype = tuple(row_shape), np.dtype(dtype)
        self.written, self.sha256 = 0, hashlib.sha256()
        self._file = None
        self._left = 0  # rows still to write into the open shard

    def _open_next(self) -> None:
        index = self.written // self.shard_size
        rows = min(self.shard_size, self.n - self.written)
        self._file = open(self.folder / SHARD.format(name=self.name, index=index), "wb")
        header = {"descr": npy_format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (rows, *self.row_shape)}
        npy_format.write_array_header_1_0(self._file, header)
        self._left = rows

    def write(self, rows: np.ndarray) -> None:
        """Append `rows` (k, *row_shape), any k; they fill the open shard and spill into the next ones."""
        if rows.dtype != self.dtype or rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.name}: expected rows {self.row_shape} {self.dtype}, "
                             f"got {rows.shape[1:]} {rows.dtype}")
        if self.written + len(rows) > self.n:
            raise ValueError(f"{self.name}: more than the {self.n} rows announced")
        rows = np.ascontiguousarray(rows)
        while len(rows):
            if self._left == 0:
                self._open_next()
            head, rows = rows[:self._left], rows[self._left:]
            data = head.tobytes()
            self._file.write(data)
            self.sha256.update(data)
            self._left -= len(head)
            self.written += len(head)
            if self._left == 0:
                self._file.close()

    def close(self) -> str:
        """Check that all `n` rows came (an empty array is one empty shard); returns the sha256 of the rows' bytes."""
        if self.written != self.n:
            raise ValueError(f"{self.name}: {self.written} rows written of the {self.n} announced")
        if self.n == 0:
            self._open_next()
            self._file.close()
        return self.sha256.hexdigest()


def write_sharded(folder: Path, name: str, array: np.ndarray, shard_size: int) -> str:
    """Write a whole in-memory array as shards; returns the sha256 of its bytes."""
    writer = ShardWriter(folder, name, len(array), array.shape[1:], array.dtype, shard_size)
    writer.write(array)
    return writer.close()


class ShardedArray:
    """Read access to the sharded array `name` in `folder`: its shape and dtype, and any rows, from disk."""

    def __init__(self, folder: str | Path, name: str):
        folder = Path(folder)
        files = shard_files(folder, name)
        if not files:
            raise DataError(f"{folder}: no {SHARD.format(name=name, index=0)}")
        self.files, counts, self._offsets, kinds = files, [], [], set()
        for path in files:
            try:
                with open(path, "rb") as f:
                    read_header = HEADER_READERS.get(npy_format.read_magic(f))
                    if read_header is None:
                        raise ValueError("unknown .npy version")
                    shape, fortran, dtype = read_header(f)
                    offset = f.tell()
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: not a readable .npy shard ({e}); re-run the stage that wrote it") from None
            if fortran or not shape or dtype.hasobject:
                raise DataError(f"{path}: not a C-order array of rows; re-run the stage that wrote it")
            row_bytes = dtype.itemsize * int(np.prod(shape[1:]))
            if path.stat().st_size != offset + shape[0] * row_bytes:
                raise DataError(f"{path}: truncated or padded (expected {shape[0]} rows of {row_bytes} bytes); "
                                "re-run the stage that wrote it")
            kinds.add((tuple(shape[1:]), dtype))
            counts.append(shape[0])
            self._offsets.append(offset)
        if len(kinds) != 1:
            raise DataError(f"{folder}: the shards of {name} differ in row shape or dtype")
        (self.row_shape, self.dtype), = kinds
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.row_shape))
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # shard k holds rows starts[k]:starts[k + 1]
        self.shape = (int(self.starts[-1]), *self.row_shape)
        self._fds = [os.open(p, os.O_RDONLY) for p in files]
        weakref.finalize(self, lambda fds: [os.close(fd) for fd in fds], self._fds)

    def __len__(self) -> int:
        return self.shape[0]

    def _locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, byte offset in its file) of each global row index."""
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        return shard, np.asarray(self._offsets)[shard] + (rows - self.starts[shard]) * self.row_bytes

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The rows at the global indices `rows` (B,), in that order: (B, *row_shape)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.row_shape), dtype=self.dtype)
        flat = out.reshape(len(rows), self.row_bytes // self.dtype.itemsize).view(np.uint8)  # (B, row_bytes)
        for j, (shard, offset) in enumerate(zip(*self._locate(rows))):
            self._read_into(flat[j], shard, int(offset))
        return out

    def read(self, start: int, stop: int) -> np.ndarray:
        """The rows start..stop-1 in order: one read per shard they span."""
        start, stop = max(start, 0), min(stop, len(self))
        out = np.empty((max(stop - start, 0), *self.row_shape), dtype=self.dtype)
        flat = out.reshape(-1).view(np.uint8)
        pos = start
        while pos < stop:
            shard = int(np.searchsorted(self.starts, pos, side="right") - 1)
            end = min(stop, int(self.starts[shard + 1]))
            offset = self._offsets[shard] + (pos - int(self.starts[shard])) * self.row_bytes
            self._read_into(flat[(pos - start) * self.row_bytes:(end - start) * self.row_bytes], shard, offset)
            pos = end
        return out

    def _read_into(self, buffer: np.ndarray, shard: int, offset: int) -> None:
        view, done = memoryview(buffer), 0
        while done < len(view):  # pread may return fewer bytes than asked
            n = os.preadv(self._fds[shard], [view[done:]], offset + done)
            if n == 0:
                raise DataError(f"{self.files[shard]}: ended early (changed while reading?)")
            done += n


class Rows:
    """A sharded array as torch tensors on the CPU, each row mapped by `convert` (e.g. uint8 -> float32 images):
    `rows[idx]` for a (B,) index tensor, `rows.read(start, stop)`, `rows.chunks(size)`, `rows.load()` (all of it)."""

    def __init__(self, array: ShardedArray, convert: Callable[[torch.Tensor], torch.Tensor] = lambda t: t):
        self.array, self.convert = array, convert
        self.shape = torch.Size((len(array), *convert(torch.from_numpy(array.read(0, 1))).shape[1:]))

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.convert(torch.from_numpy(self.array.take(idx.cpu().numpy())))

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.convert(torch.from_numpy(self.array.read(start, stop)))

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        """Consecutive chunks of `size` rows (the last may be shorter), in order."""
        for start in range(0, len(self), size):
            yield self.read(start, start + size)

    def load(self) -> torch.Tensor:
        """All rows as one tensor, converted a chunk at a time: no temporaries of the whole array's size."""
        step = max(LOAD_CHUNK_BYTES // self.array.row_bytes, 1)
        first = self.read(0, step)
        out = torch.empty(self.shape, dtype=first.dtype)
        out[:len(first)] = first
        for start in range(step, len(self), step):
            out[start:start + step] = self.read(start, start + step)
        return out
