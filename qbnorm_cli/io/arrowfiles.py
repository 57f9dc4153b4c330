"""Embedding columns of Parquet and Arrow IPC (Feather v2) files, through pyarrow (the `arrow`
extra): `FILE.parquet::COLUMN`, a column of fixed_size_list<float> or list<float> (one length in
every row), read row group by row group (Parquet) or record batch by record batch (Arrow), so that
a column larger than memory is never loaded whole. Several files are one dataset (`shards`).

This is the layout of Hugging Face datasets' embedding columns and embedding-reader's parquet
mode. A ragged list, a null, or a column of another type is refused naming the row.
"""

from __future__ import annotations

import threading
from collections import deque
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


BATCH_BYTES = 1 << 20  # rows decoded at a time from a Parquet row group
RECENT_BLOCKS = 16  # decoded blocks kept (of BATCH_BYTES each, for Parquet)
READ_BUFFER = 1 << 20  # Parquet pages are read through a buffer of this size, not a column chunk at a time


class ColumnRows(RowArray):
    """One list column of one Parquet or Arrow IPC file, read by a cursor that walks one unit (a
    Parquet row group, an Arrow record batch) batch by batch: a Parquet row group is decoded page by
    page, `unit_rows` rows at a time, so that a row group larger than memory is never held whole.
    Reads in row order continue where the last one stopped; a read before the cursor restarts the
    unit it falls in."""

    def __init__(self, label: str, batches, unit_starts: np.ndarray, width: int, dtype, unit_rows: int,
                 recent: int = RECENT_BLOCKS):
        super().__init__((int(unit_starts[-1]), width), dtype, unit_rows)
        self.label, self.batches, self.starts = label, batches, unit_starts
        self._cursor: list | None = None  # [unit, its batch iterator, current block, its first row]
        # the last blocks decoded: readers on several threads ask for neighbouring blocks out of order
        self._recent: deque[tuple[int, np.ndarray]] = deque(maxlen=recent)
        self._lock = threading.Lock()

    def _at(self, unit: int, row: int) -> tuple[np.ndarray, int]:
        """(decoded block holding `row`, its first row): a block decoded lately, or the cursor's."""
        for start, block in self._recent:
            if start <= row < start + len(block):
                return block, start
        cursor = self._cursor
        if cursor is None or cursor[0] != unit or cursor[3] > row:
            self._cursor = None
            cursor = [unit, iter(self.batches(unit)), np.empty((0, self.shape[1]), self.dtype), int(self.starts[unit])]
        while row >= cursor[3] + len(cursor[2]):
            cursor[3] += len(cursor[2])
            column = next(cursor[1], None)
            if column is None:
                raise DataError(f"{self.label}: row group {unit} ends at row {cursor[3]}, before row "
                                f"{int(self.starts[unit + 1])} where its metadata says it ends")
            cursor[2] = np.empty((0, self.shape[1]), self.dtype)  # the previous block goes first
            cursor[2] = as_matrix(column, self.label, cursor[3], self.shape[1])
            self._recent.append((cursor[3], cursor[2]))
        self._cursor = cursor
        return cursor[2], cursor[3]

    def rows(self, r0: int, r1: int) -> np.ndarray:
        r1 = min(r1, self.shape[0])
        out = np.empty((max(0, r1 - r0), self.shape[1]), dtype=self.dtype)
        with self._lock, arrow_errors(self.label, f"rows {r0}:{r1}"):
            at = r0
            while at < r1:
                unit = int(np.searchsorted(self.starts, at, side="right")) - 1
                block, start = self._at(unit, at)
                stop = min(r1, start + len(block))
                out[at - r0:stop - r0] = block[at - start:stop - start]
                at = stop
        return out


def first_width(column, label: str) -> int:
    """The length of the first list of a column (0 when it has no rows)."""
    if column is None or len(column) == 0:
        return 0
    return as_matrix(column.slice(0, 1), label, 0, None).shape[1]


def open_parquet(source, label: str, column: str | None):
    """(ColumnRows, column name) of a Parquet file (`source`: a local path or an open file)."""
    pa = pyarrow_for(label)
    with arrow_errors(label, "its footer"):
        # pages read through a buffer: not memory-mapped (they are decompressed into fresh buffers
        # anyway, and a map would hold the file's pages in this process's resident memory), nor
        # pre-buffered (pyarrow would read a whole column chunk, as large as a row group, first)
        reader = pa.parquet.ParquetFile(source, buffer_size=READ_BUFFER, pre_buffer=False)
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

    dtype = value_dtype(field)
    batch_rows = max(1, BATCH_BYTES // max(1, width * dtype.itemsize))

    def batches(i: int):
        for batch in reader.iter_batches(batch_size=batch_rows, row_groups=[i], columns=[name], use_threads=False):
            yield batch.column(0)

    rows = ColumnRows(label, batches, starts, width, dtype, 1)  # batches of 1 MiB, or of one row when wider
    rows.unit = "row"  # refused only when a row alone is beyond the budget
    rows.unit_fix = "check that the column holds one vector per row"
    return rows, name, reader


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

    def batches(i: int):
        return [reader.get_batch(i).column(index)]  # zero-copy from a memory-mapped file

    sizes = np.diff(starts)
    rows = ColumnRows(label, batches, starts, width, value_dtype(field), int(sizes.max()) if sizes.size else 1,
                      recent=1)  # a record batch read from a URL is held whole: one at a time
    rows.unit = "record batch"
    rows.unit_fix = ("rewrite the file with smaller record batches "
                     "(pyarrow.feather.write_feather(table, path, chunksize=N))")
    return rows, name, handle


def sniff(magic: bytes) -> str | None:
    """parquet, arrow or feather-v1 from a file's first bytes."""
    if magic.startswith(PARQUET_MAGIC):
        return "parquet"
    if magic.startswith(ARROW_MAGIC):
        return "arrow"
    if magic.startswith(FEATHER_V1_MAGIC):
        return "feather-v1"
    return None
