"""PyTorch .pt / .pth files (torch.save's zip format), read without torch and without running
code: `features.pt` (one tensor), `feats.pt::text` (a dict of tensors; a list takes ::0, ::1).

torch.save writes a zip archive: ARCHIVE/data.pkl, a pickle in which every tensor is a call of
torch._utils._rebuild_tensor_v2(storage, offset, size, stride, …) on a storage named by a
persistent id ('storage', torch.FloatStorage, KEY, device, numel), and ARCHIVE/data/KEY, each
storage's raw bytes, stored uncompressed (ARCHIVE/byteorder says little or big endian).

`TorchUnpickler` extends qbnorm's restricted unpickler (io/foreign.SafeUnpickler: numpy's own
reconstruction globals only) by exactly those rebuild functions and storage types, mapped to
qbnorm's own stand-ins that record what to read; any other global is refused before it can run, as
for numpy pickles. This was chosen over torch.load(weights_only=True): the same safety without a
multi-GB dependency, and storages are memory-mapped from the archive (or read by ranges from a
remote one), so a tensor larger than memory is never loaded whole.
"""

from __future__ import annotations

import collections
import struct
import zipfile
from dataclasses import dataclass

import numpy as np

from qbnorm_cli.errors import DataError, RuntimeFailure, UsageError, one_line
from qbnorm_cli.io.foreign import DisallowedObject, SafeUnpickler
from qbnorm_cli.io.lazyarrays import BFLOAT16, RangeRows, Widened, mapped, widen_bfloat16

STORAGES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": BFLOAT16,
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}
PICKLE_LIMIT = 64 << 20  # data.pkl holds only the structure (the storages are apart): a larger one is refused
LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # a zip member's local file header
MAX_LISTED = 20


@dataclass(frozen=True)
class Storage:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor as torch's pickle describes it: which storage, at which element offset, of which
    size and element strides."""

    storage: Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def describe(self) -> str:
        dtype = "bfloat16" if self.storage.dtype == BFLOAT16 else str(np.dtype(self.storage.dtype))
        return f"{'×'.join(map(str, self.size)) or 'scalar'} {dtype}"


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    if not isinstance(storage, Storage):
        raise pickle_error("a tensor without a storage")
    return TensorRef(storage, int(storage_offset), tuple(int(n) for n in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, *_):
    return data


def pickle_error(what: str) -> DisallowedObject:
    return DisallowedObject(what)


class _StorageType:
    def __init__(self, name: str):
        self.name = name


TORCH_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name) for name in STORAGES},
}


class TorchUnpickler(SafeUnpickler):
    """SafeUnpickler plus torch's tensor rebuilding: tensors become `TensorRef`s, nothing is read."""

    def find_class(self, module: str, name: str):
        found = TORCH_GLOBALS.get((module, name))
        return found if found is not None else super().find_class(module, name)

    def persistent_load(self, pid):
        if (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            return Storage(pid[2], STORAGES[pid[1].name], pid[4])
        raise DisallowedObject(f"persistent id {pid!r}"[:80])


def walk(obj, prefix: str = "", depth: int = 0):
    """(key path, TensorRef) for every tensor inside dicts/lists/tuples."""
    if isinstance(obj, TensorRef):
        yield prefix, obj
        return
    if depth > 4:
        return
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        yield from walk(value, f"{prefix}/{key}" if prefix else str(key), depth + 1)


def listing(found: list[tuple[str, TensorRef]]) -> str:
    shown = ", ".join(f"{key} ({ref.describe()})" for key, ref in found[:MAX_LISTED])
    more = len(found) - MAX_LISTED
    return (shown + (f" and {more} more" if more > 0 else "")) or "no tensors"


def pick(obj, label: str, key: str | None, ndim: tuple[int, ...]) -> tuple[TensorRef, str | None]:
    found = list(walk(obj))
    if key is None:
        if isinstance(obj, TensorRef):
            return obj, None
        fitting = [(k, r) for k, r in found if len(r.size) in ndim]
        if len(found) == 1 or len(fitting) == 1:
            k, ref = found[0] if len(found) == 1 else fitting[0]
            return ref, "/" + k
        raise DataError(f"{label}: name a tensor as {label}::KEY; it has {listing(found)}")
    wanted = key.lstrip("/")
    for k, ref in found:
        if k == wanted:
            return ref, "/" + k
    raise DataError(f"{label}: no tensor {wanted!r}; it has {listing(found)}")


def is_torch_zip(names: list[str]) -> bool:
    return any(n.count("/") == 1 and n.endswith("/data.pkl") for n in names)


def member_offset(fh, info: zipfile.ZipInfo) -> int:
    """Where a stored zip member's bytes begin (after its local header)."""
    fh.seek(info.header_offset)
    header = fh.read(LOCAL_HEADER.size)
    if len(header) != LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise DataError("a zip member's local header is damaged")
    fields = LOCAL_HEADER.unpack(header)
    return info.header_offset + LOCAL_HEADER.size + fields[-2] + fields[-1]


def open_torch(fh, label: str, key: str | None, ndim: tuple[int, ...], local_path: str | None):
    """(array, key) of a tensor of a torch.save archive open as `fh` (memory-mapped from
    `local_path` when local, else read by ranges from `fh`)."""
    try:
        archive = zipfile.ZipFile(fh)
        infos = {i.filename: i for i in archive.infolist()}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DataError(f"{label}: not a valid PyTorch zip file ({one_line(exc)})") from None
    pickles = [n for n in infos if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise DataError(f"{label}: a zip file but not a PyTorch file (no ARCHIVE/data.pkl); "
                        "an .npz is read as FILE.npz::KEY")
    root = pickles[0][:-len("data.pkl")]
    info = infos[pickles[0]]
    if info.file_size > PICKLE_LIMIT:
        raise DataError(f"{label}: its pickle declares {info.file_size} bytes, more than a PyTorch file's "
                        f"structure needs ({PICKLE_LIMIT >> 20} MiB at most): refused")
    try:
        with archive.open(info) as member:
            payload = TorchUnpickler(member, encoding="latin1").load()
    except DisallowedObject as exc:
        raise DataError(
            f"{label}: the pickle contains a disallowed object ({exc.name}); qbnorm reads only tensors "
            "(alone or in dicts/lists) from PyTorch files and never runs code from a pickle"
        ) from None
    except (DataError, RuntimeFailure, UsageError, MemoryError):
        raise
    except Exception as exc:
        raise DataError(f"{label}: cannot read its pickle ({type(exc).__name__}: {one_line(exc)})") from None
    ref, found_key = pick(payload, label, key, ndim)
    name = f"{label}::{found_key}" if found_key else label
    byteorder = archive.read(root + "byteorder").decode(errors="replace").strip() if root + "byteorder" in infos \
        else "little"
    if byteorder != "little":
        raise DataError(f"{name}: written on a {byteorder}-endian machine; qbnorm reads little-endian PyTorch files")
    storage = infos.get(f"{root}data/{ref.storage.key}")
    if storage is None:
        raise DataError(f"{name}: its storage data/{ref.storage.key} is missing from the archive")
    if storage.compress_type != zipfile.ZIP_STORED:
        raise DataError(f"{name}: its storage is compressed; torch.save stores tensors uncompressed: save it again "
                        "with torch.save")
    raw_dtype = np.dtype("<u2") if ref.storage.dtype == BFLOAT16 else np.dtype(ref.storage.dtype)
    if ref.storage.numel * raw_dtype.itemsize > storage.file_size or any(s < 0 for s in ref.stride) \
            or len(ref.size) != len(ref.stride) \
            or any(n < 0 for n in ref.size) or ref.offset < 0:
        raise DataError(f"{name}: its storage holds {storage.file_size} bytes, less than its tensor declares; "
                        "the file is damaged")
    reach = sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    extent = ref.offset + reach + 1 if all(ref.size) else 0
    if extent > ref.storage.numel:
        raise DataError(f"{name}: the tensor reaches beyond its storage; the file is damaged")
    if int(np.prod(ref.size, dtype=object)) > ref.storage.numel:  # an expanded view: never larger than its file
        raise DataError(f"{name}: the tensor has more elements than its storage (an expanded view); save "
                        "tensor.contiguous()")
    with _reading(name):
        start = member_offset(fh, storage)
    contiguous = all(ref.size) and list(ref.stride) == [int(np.prod(ref.size[i + 1:])) for i in range(len(ref.size))]
    if local_path is not None:
        base = mapped(local_path, start, (storage.file_size // raw_dtype.itemsize,), raw_dtype, name)
        array = np.lib.stride_tricks.as_strided(
            base[ref.offset:], shape=ref.size, strides=tuple(s * raw_dtype.itemsize for s in ref.stride),
            writeable=False) if all(ref.size) else np.empty(ref.size, dtype=raw_dtype)
    elif contiguous and len(ref.size) == 2:
        array = RangeRows(fh, start + ref.offset * raw_dtype.itemsize, ref.size, raw_dtype, name)
    elif contiguous and len(ref.size) == 1:
        fh.seek(start + ref.offset * raw_dtype.itemsize)
        array = np.frombuffer(fh.read(ref.size[0] * raw_dtype.itemsize), dtype=raw_dtype)
    else:
        raise DataError(f"{name}: a strided (transposed or sliced) tensor is read from local files only; save "
                        "tensor.contiguous() or download the file")
    if ref.storage.dtype == BFLOAT16:
        array = Widened(array) if array.ndim == 2 else widen_bfloat16(array)
    return array, found_key, ("bfloat16" if ref.storage.dtype == BFLOAT16 else str(raw_dtype))


class _reading:
    """Errors of the archive's file object while locating a storage, as one line."""

    def __init__(self, label: str):
        self.label = label

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is not None and isinstance(exc, (OSError, ValueError, EOFError, struct.error)):
            raise DataError(f"{self.label}: damaged PyTorch file ({one_line(exc)})") from None
        return False
