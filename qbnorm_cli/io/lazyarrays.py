"""Arrays read by row ranges: what the readers of other formats (io/arrowfiles, io/shards,
io/safetensorsfile, io/torchfile, io/remote) hand to `specs.ArrayInput`.

An `ArrayInput` reads its array by slicing it (`array[r0:r1]`, `array[r0:r1, c0:c1]`, `array[rows]`
with ascending row numbers, `array[()]`), as it slices an h5py dataset or a memory map. A
`RowArray` offers that slicing on top of one method, `rows(r0, r1)`, so a reader only says how
to read a row range: nothing is read when the array is opened.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from qbnorm_cli.errors import DataError, RuntimeFailure, one_line
from qbnorm_cli.io.remote import redact_text

BFLOAT16 = "bfloat16"  # numpy has no bfloat16: such arrays are stored as uint16 and widened on read
RUN_GAP = 64  # row numbers closer than this are read as one range


class RowArray:
    """A 2-D array (rows × cols, `dtype`) read by row ranges through `rows(r0, r1)`.

    `unit_rows`: rows decoded at least in one read (an Arrow record batch, a batch of a Parquet row
    group; 1 where any range is read as it is); when `unit` names them, `Budget.check_unit` refuses
    units larger than the budget."""

    ndim = 2
    chunks = None
    unit: str | None = None  # what `unit_rows` rows are called, when a read allocates them whole
    unit_fix = ""  # how to write the file with smaller units

    def __init__(self, shape: tuple[int, int], dtype, unit_rows: int = 1):
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        self.unit_rows = int(unit_rows)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def unit_bytes(self) -> int:
        """Bytes of one unit decoded as float32 (what a read holds at least)."""
        return self.unit_rows * self.shape[1] * 4

    def rows(self, r0: int, r1: int) -> np.ndarray:
        raise NotImplementedError

    def _picked(self, picks: np.ndarray) -> np.ndarray:
        """Rows of ascending row numbers: runs of near rows are read as one range each."""
        if picks.size == 0:
            return np.empty((0, self.shape[1]), dtype=self.dtype)
        breaks = np.flatnonzero(np.diff(picks) > RUN_GAP) + 1
        parts = []
        for run in np.split(picks, breaks):
            lo = int(run[0])
            parts.append(self.rows(lo, int(run[-1]) + 1)[run - lo])
        return np.concatenate(parts)

    def __getitem__(self, key):
        if key is Ellipsis or (isinstance(key, tuple) and not key):
            return self.rows(0, self.shape[0])
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        if isinstance(rows, slice):
            r0, r1, step = rows.indices(self.shape[0])
            block = self.rows(r0, max(r0, r1)) if step == 1 else self.rows(r0, max(r0, r1))[::step] if step > 0 \
                else self[()][rows]
        elif np.ndim(rows) == 0:
            row = int(rows) + (self.shape[0] if int(rows) < 0 else 0)
            return self.rows(row, row + 1)[0][cols]
        else:
            block = self._picked(np.asarray(rows, dtype=np.int64))
        return block if cols == slice(None) else block[:, cols]


def widen_bfloat16(raw: np.ndarray) -> np.ndarray:
    """bfloat16 values stored as uint16 → float32 (exact: bfloat16 is float32's upper half)."""
    return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


class Widened(RowArray):
    """A bfloat16 array (stored as uint16 in `raw`) read as float32."""

    def __init__(self, raw):
        super().__init__(raw.shape, np.float32, getattr(raw, "unit_rows", 1))
        self.raw = raw

    def rows(self, r0: int, r1: int) -> np.ndarray:
        return widen_bfloat16(self.raw[r0:r1])


class Concatenated(RowArray):
    """Several arrays of one width and dtype (shards, files) read as one, in the order given."""

    def __init__(self, parts: list, labels: list[str]):
        first = parts[0]
        for part, label in zip(parts, labels, strict=True):
            if part.ndim != 2 or part.shape[1] != first.shape[1]:
                raise DataError(f"{label}: shape {tuple(part.shape)} does not match {labels[0]}'s "
                                f"{tuple(first.shape)}: every shard must have the same width")
            if part.dtype != first.dtype:
                raise DataError(f"{label}: dtype {part.dtype} differs from {labels[0]}'s {first.dtype}: "
                                "every shard must have the same dtype")
        self.parts, self.labels = parts, labels
        self.starts = np.cumsum([0] + [int(p.shape[0]) for p in parts])
        unit = max(int(getattr(p, "unit_rows", 1)) for p in parts)
        super().__init__((int(self.starts[-1]), int(first.shape[1])), first.dtype, unit)

    def rows(self, r0: int, r1: int) -> np.ndarray:
        r1 = min(r1, self.shape[0])
        if r1 <= r0:
            return np.empty((0, self.shape[1]), dtype=self.dtype)
        first = int(np.searchsorted(self.starts, r0, side="right")) - 1
        last = int(np.searchsorted(self.starts, r1, side="left")) - 1
        blocks = []
        for i in range(first, last + 1):
            base = int(self.starts[i])
            blocks.append(np.asarray(self.parts[i][max(r0, base) - base:min(r1, int(self.starts[i + 1])) - base]))
        return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


class RangeRows(RowArray):
    """A C-ordered array at byte `offset` of a file object that reads byte ranges (a remote file):
    rows r0:r1 are one seek and one read (under a lock: threads share the file position)."""

    def __init__(self, fh, offset: int, shape: tuple[int, int], dtype, label: str):
        super().__init__(shape, dtype)
        self.fh, self.offset, self.label = fh, int(offset), label
        self.row_bytes = self.shape[1] * self.dtype.itemsize
        self._lock = threading.Lock()

    def rows(self, r0: int, r1: int) -> np.ndarray:
        r1 = min(r1, self.shape[0])
        size = max(0, r1 - r0) * self.row_bytes
        try:
            with self._lock:
                self.fh.seek(self.offset + r0 * self.row_bytes)
                data = self.fh.read(size)
        except (OSError, TimeoutError) as exc:  # a remote file: the network, the server
            raise RuntimeFailure(f"{self.label}: cannot read rows {r0}:{r1}: {redact_text(one_line(exc))}") from None
        if len(data) != size:
            raise DataError(f"{self.label}: truncated: rows {r0}:{r1} lie beyond the end of the file")
        return np.frombuffer(data, dtype=self.dtype).reshape(r1 - r0, self.shape[1])


def mapped(path: str, offset: int, shape: tuple[int, ...], dtype, label: str) -> np.ndarray:
    """A read-only memory map of a C-ordered array at byte `offset` of a local file, refused when
    the file is shorter than the declared shape (nothing is allocated from a declared shape)."""
    dtype = np.dtype(dtype)
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = os.stat(path).st_size
    if need > size:
        raise DataError(f"{label}: truncated: the data declared ({'×'.join(map(str, shape))} {dtype}) needs "
                        f"{need} bytes, the file has {size}")
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return np.empty(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape))
