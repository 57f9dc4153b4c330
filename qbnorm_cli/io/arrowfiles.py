"""Embedding columns of Parquet and Arrow IPC (Feather v2) files, through pyarrow (the `arrow`
extra): `FILE.parquet::COLUMN`, a column of fixed_size_list<float> or list<float> (one length in
every row), read row group by row group (Parquet) or record batch by record batch (Arrow), so that
a column larger than memory is never loaded whole. Several files are one dataset (`shards`).

This is the layout of Hugging Face datasets' embedding columns and embedding-reader's parquet
mode. A ragged list, a null, or a column of another type is refused naming the row.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np

from qbnorm_cli.errors import DataError, RuntimeFailure, UsageError, one_line
from qbnorm_cli.io.extras import need
from qbnorm_cli.io.lazyarrays import RowArray

PARQUET_MAGIC = b"PAR1"
ARROW_MAGIC = b"ARROW1"
FEATHER_V1_MAGIC = b"FEA1"
MAX_LISTED = 20


def pyarrow_for(label: str):
    need("arrow", f"reading {label}")
    import pyarrow
    import pyarrow.compute
    import pyarrow.ipc
    import pyarrow.parquet

    return pyarrow


@contextmanager
def arrow_errors(label: str, what: str = ""):
    """pyarrow's errors on a damaged file as one DataError naming it."""
    pa = pyarrow_for(label)
    try:
        yield
    except (DataError, RuntimeFailure, UsageError, MemoryError):
        raise
    except (pa.ArrowException, OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        reading = f" reading {what}" if what else ""
        raise DataError(f"{label}: damaged or not a valid file{reading}: {one_line(exc)}") from None


def column_listing(schema) -> str:
    shown = [f"{field.name} ({field.type})" for field in schema][:MAX_LISTED]
    more = len(schema) - MAX_LISTED
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def pick_column(schema, column: str | None, path: str):
    """The field of `column`, or the only list column when none is named."""
    pa = pyarrow_for(path)
    if column is None:
        lists = [f for f in schema if pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type)
                 or pa.types.is_large_list(f.type)]
        if len(lists) != 1:
            raise DataError(f"{path}: name a column as {path}::COLUMN; it has {column_listing(schema)}")
        return lists[0]
    name = column.lstrip("/")
    index = schema.get_field_index(name)
    if index < 0:
        raise DataError(f"{path}: no column {name!r}; it has {column_listing(schema)}")
    field = schema.field(index)
    kind = field.type
    listed = pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind) or pa.types.is_large_list(kind)
    value = kind.value_type if listed else kind
    if not listed or not (pa.types.is_floating(value) or pa.types.is_integer(value)):
        raise DataError(f"{path}::{name}: column of type {kind}; qbnorm reads embeddings from a column of "
                        "list<float> or fixed_size_list<float> (one vector per row)")
    return field


def value_dtype(field) -> np.dtype:
    return np.dtype(field.type.value_type.to_pandas_dtype())


def as_matrix(chunk, label: str, row0: int, width: int | None) -> np.ndarray:
    """An Arrow list column (Array or ChunkedArray) as a rows × width numpy array; refuses nulls
    and rows of another length, naming the first such row."""
    pa = pyarrow_for(label)
    arrays = chunk.chunks if isinstance(chunk, pa.ChunkedArray) else [chunk]
    blocks, at = [], row0
    for arr in arrays:
        n = len(arr)
        if arr.null_count:
            row = at + int(np.argmax(arr.is_null().to_numpy(zero_copy_only=False)))
            raise DataError(f"{label}: row {row} is null; every row must hold a vector")
        values = arr.flatten()
        if values.null_count:
            lengths = np.asarray(pa.compute.list_value_length(arr))
            owner = np.repeat(np.arange(n), lengths)
            row = at + int(owner[int(np.argmax(values.is_null().to_numpy(zero_copy_only=False)))])
            raise DataError(f"{label}: row {row} holds a null value; every value must be a number")
        if pa.types.is_fixed_size_list(arr.type):
            size = arr.type.list_size
        else:
            lengths = np.asarray(pa.compute.list_value_length(arr))
            size = width if width is not None else (int(lengths[0]) if n else 0)
            if n and (lengths != size).any():
                row = int(np.argmax(lengths != size))
                raise DataError(f"{label}: ragged lists: row {at + row} has {lengths[row]} values, "
                                f"{'the others' if width is None else 'the column'} {size}")
        if width is not None and size != width:
            raise DataError(f"{label}: rows from {at} have {size} values, the rows before {width}")
        width = size
        blocks.append(values.to_numpy(zero_copy_only=False).reshape(n, size))
        at += n
    if not blocks:
        return np.empty((0, width or 0))
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


class ColumnRows(RowArray):
    """One list column of one Parquet or Arrow IPC file, read by its units (row groups, record
    batches); the last unit decoded is kept (blocks that cut through a unit decode it once)."""

    def __init__(self, label: str, read_unit, unit_starts: np.ndarray, width: int, dtype):
        sizes = np.diff(unit_starts)
        super().__init__((int(unit_starts[-1]), width), dtype, int(sizes.max()) if sizes.size else 1)
        self.label, self.read_unit, self.starts = label, read_unit, unit_starts
        self._kept: tuple[int, np.ndarray] | None = None
        self._lock = threading.Lock()

    def unit(self, i: int) -> np.ndarray:
        with self._lock:
            if self._kept is None or self._kept[0] != i:
                self._kept = None  # the previous unit goes first
                with arrow_errors(self.label, f"row group {i}"):
                    column = self.read_unit(i)
                    block = as_matrix(column, self.label, int(self.starts[i]), self.shape[1])
                expected = int(self.starts[i + 1] - self.starts[i])
                if block.shape[0] != expected:
                    raise DataError(f"{self.label}: unit {i} holds {block.shape[0]} rows, its metadata says {expected}")
                self._kept = (i, block)
            return self._kept[1]

    def rows(self, r0: int, r1: int) -> np.ndarray:
        r1 = min(r1, self.shape[0])
        if r1 <= r0:
            return np.empty((0, self.shape[1]), dtype=self.dtype)
        first = int(np.searchsorted(self.starts, r0, side="right")) - 1
        last = int(np.searchsorted(self.starts, r1, side="left")) - 1
        blocks = []
        for i in range(first, last + 1):
            base = int(self.starts[i])
            block = self.unit(i)[max(r0, base) - base:min(r1, int(self.starts[i + 1])) - base]
            blocks.append(block)
        return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


def first_width(column, label: str) -> int:
    """The length of the first list of a column (0 when it has no rows)."""
    if column is None or len(column) == 0:
        return 0
    return as_matrix(column.slice(0, 1), label, 0, None).shape[1]


def open_parquet(source, label: str, column: str | None):
    """(ColumnRows, column name) of a Parquet file (`source`: a local path or an open file)."""
    pa = pyarrow_for(label)
    with arrow_errors(label, "its footer"):
        reader = pa.parquet.ParquetFile(source, memory_map=isinstance(source, str))
        schema = reader.schema_arrow
    field = pick_column(schema, column, label)
    name = field.name
    meta = reader.metadata
    starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    label = f"{label}::{name}"
    if pa.types.is_fixed_size_list(field.type):
        width = field.type.list_size
    else:
        with arrow_errors(label, "its first row"):
            batch = next(reader.iter_batches(batch_size=1, columns=[name]), None)
            width = first_width(None if batch is None else batch.column(0), label)

    def read_unit(i: int):
        return reader.read_row_group(i, columns=[name]).column(0)

    return ColumnRows(label, read_unit, starts, width, value_dtype(field)), name, reader


def open_ipc(source, label: str, column: str | None):
    """(ColumnRows, column name) of an Arrow IPC file (Feather v2); a local file is memory-mapped."""
    pa = pyarrow_for(label)
    with arrow_errors(label, "its footer"):
        handle = pa.memory_map(source, "r") if isinstance(source, str) else source
        reader = pa.ipc.open_file(handle)
        schema = reader.schema
    field = pick_column(schema, column, label)
    name = field.name
    index = schema.get_field_index(name)
    label = f"{label}::{name}"
    with arrow_errors(label, "its record batches"):
        counts = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
    starts = np.cumsum([0, *counts])
    if pa.types.is_fixed_size_list(field.type):
        width = field.type.list_size
    else:
        first = next((i for i, c in enumerate(counts) if c), None)
        with arrow_errors(label, "its first row"):
            width = 0 if first is None else first_width(reader.get_batch(first).column(index), label)

    def read_unit(i: int):
        return reader.get_batch(i).column(index)

    return ColumnRows(label, read_unit, starts, width, value_dtype(field)), name, handle


def sniff(magic: bytes) -> str | None:
    """parquet, arrow or feather-v1 from a file's first bytes."""
    if magic.startswith(PARQUET_MAGIC):
        return "parquet"
    if magic.startswith(ARROW_MAGIC):
        return "arrow"
    if magic.startswith(FEATHER_V1_MAGIC):
        return "feather-v1"
    return None
