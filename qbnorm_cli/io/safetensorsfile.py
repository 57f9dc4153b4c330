"""safetensors files (`FILE.safetensors::TENSOR`), memory-mapped: the `safetensors` extra.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range (`data_offsets`, relative to the end of the header), then the raw
little-endian data. A local file is opened with safetensors.safe_open, which validates the header
(ranges inside the file, not overlapping, sizes matching shapes) and lists its tensors; the tensor
is then memory-mapped at its range, so bfloat16 (which safetensors' numpy bindings cannot return)
is read too, widened to float32 as it is read. A remote file's header is read by range and given
the same checks here.
"""

from __future__ import annotations

import json
import struct

import numpy as np

from qbnorm_cli.errors import DataError, one_line
from qbnorm_cli.io.extras import need
from qbnorm_cli.io.lazyarrays import BFLOAT16, RangeRows, Widened, mapped, widen_bfloat16

DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": BFLOAT16, "I64": "<i8", "I32": "<i4",
          "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
HEADER_LIMIT = 100 << 20  # the format's own limit on the JSON header
MAX_LISTED = 20


def looks_like(first: bytes) -> bool:
    """Whether a file's first 16 bytes are a safetensors header: a plausible length, then '{'."""
    if len(first) < 9:
        return False
    (size,) = struct.unpack("<Q", first[:8])
    return 2 <= size <= HEADER_LIMIT and first[8:9] == b"{"


def read_header(fh, label: str, file_size: int) -> tuple[dict, int]:
    """(tensors' entries, byte offset of the data) of an open safetensors file, checked."""
    fh.seek(0)
    head = fh.read(8)
    if len(head) != 8:
        raise DataError(f"{label}: not a safetensors file (shorter than its header)")
    (size,) = struct.unpack("<Q", head)
    if size > HEADER_LIMIT or 8 + size > file_size:
        raise DataError(f"{label}: not a valid safetensors file (its header declares {size} bytes)")
    try:
        header = json.loads(fh.read(size))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{label}: not a valid safetensors file (header: {one_line(exc)})") from None
    if not isinstance(header, dict):
        raise DataError(f"{label}: not a valid safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    data_start, data_size = 8 + size, file_size - 8 - size
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], [int(n) for n in entry["shape"]], entry["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{label}: tensor {name!r}: damaged header entry") from None
        if dtype not in DTYPES:
            continue  # listed by name; refused only when asked for
        itemsize = 2 if DTYPES[dtype] == BFLOAT16 else np.dtype(DTYPES[dtype]).itemsize
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_size or \
                end - begin != int(np.prod(shape, dtype=np.int64)) * itemsize:
            raise DataError(f"{label}: tensor {name!r}: its byte range does not match its shape, or lies beyond "
                            "the file; the file is damaged")
    return header, data_start


def listing(header: dict) -> str:
    shown = [f"{name} ({'×'.join(map(str, e['shape'])) or 'scalar'} {e['dtype']})"
             for name, e in list(header.items())[:MAX_LISTED]]
    more = len(header) - MAX_LISTED
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "") or "no tensors"


def pick(header: dict, label: str, key: str | None, ndim: tuple[int, ...]) -> str:
    if key is None:
        fitting = [n for n, e in header.items() if len(e["shape"]) in ndim]
        if len(header) == 1 or len(fitting) == 1:
            return next(iter(header)) if len(header) == 1 else fitting[0]
        raise DataError(f"{label}: name a tensor as {label}::TENSOR; it has {listing(header)}")
    name = key.lstrip("/")
    if name not in header:
        raise DataError(f"{label}: no tensor {name!r}; it has {listing(header)}")
    return name


def validated(path: str, label: str) -> None:
    """safetensors' own check of a local file's header (ranges, overlaps, sizes)."""
    need("safetensors", f"reading {label}")
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as opened:
            opened.keys()
    except Exception as exc:  # safetensors raises its own SafetensorError (not exported) and OSError
        raise DataError(f"{label}: not a valid safetensors file ({one_line(exc)})") from None


def open_safetensors(fh, label: str, key: str | None, ndim: tuple[int, ...], file_size: int,
                     local_path: str | None):
    """(array, key, stored dtype) of a tensor of a safetensors file open as `fh`: memory-mapped
    from `local_path` when local, read by ranges from `fh` otherwise."""
    if local_path is not None:
        validated(local_path, label)
    header, data_start = read_header(fh, label, file_size)
    name = pick(header, label, key, ndim)
    entry = header[name]
    full = f"{label}::{name}"
    if entry["dtype"] not in DTYPES:
        raise DataError(f"{full}: dtype {entry['dtype']} is not numeric data qbnorm reads")
    bf16 = DTYPES[entry["dtype"]] == BFLOAT16
    raw = np.dtype("<u2") if bf16 else np.dtype(DTYPES[entry["dtype"]])
    shape = tuple(int(n) for n in entry["shape"])
    offset = data_start + int(entry["data_offsets"][0])
    if local_path is not None:
        array = mapped(local_path, offset, shape, raw, full)
    elif len(shape) == 2:
        array = RangeRows(fh, offset, shape, raw, full)
    else:
        fh.seek(offset)
        array = np.frombuffer(fh.read(int(np.prod(shape)) * raw.itemsize), dtype=raw).reshape(shape)
    if bf16:
        array = Widened(array) if len(shape) == 2 else widen_bfloat16(array)
    return array, "/" + name, ("bfloat16" if bf16 else str(raw))
