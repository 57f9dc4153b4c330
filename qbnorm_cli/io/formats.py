"""The formats read besides HDF5, .npy, .npz and numpy pickles, and where an input lies:

  queries.parquet::emb        a list column of a Parquet file (pyarrow: the `arrow` extra)
  queries.arrow::emb          … of an Arrow IPC / Feather v2 file
  parts/ or 'parts/*.parquet' several Parquet or Arrow files as one dataset
  text_emb/ or 'text_emb/*.npy'  a folder of .npy shards (clip-retrieval, embedding-reader)
  feats.safetensors::text     a tensor of a safetensors file (the `safetensors` extra)
  feats.pt::text              a tensor of a PyTorch file (no torch needed; never runs code)
  s3://…, gs://…, https://…, hf://…  any of these, or a .npy, read by ranges (the `remote` extra)

`specs.open_array` asks `open_format` first; None hands the input back to it (a local .npy,
.npz, pickle or HDF5 file). Every reader opens lazily: nothing but headers and footers is read
until rows are asked for.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np

from qbnorm_cli.core.sampling import spread
from qbnorm_cli.errors import DataError, RuntimeFailure, UsageError, one_line
from qbnorm_cli.io import arrowfiles, remote, safetensorsfile, shards, torchfile
from qbnorm_cli.io.lazyarrays import Concatenated, RangeRows, mapped

READABLE = ("HDF5 (.h5, FILE::/dataset), .npy, a folder of .npy shards, .npz, numpy pickles, "
            "Parquet or Arrow (FILE::COLUMN), safetensors and PyTorch .pt (FILE::TENSOR)")
ZIP_MAGIC = b"PK\x03\x04"
TORCH_SUFFIXES = (".pt", ".pth")
SHARD_FINGERPRINT_ROWS = 4


@dataclass
class Opened:
    """An input of one of these formats: the array, what it was read from (for provenance), and
    what to close with it."""

    array: object
    path: str  # as shown: a URL without its credentials
    key: str | None
    fmt: str
    stored_dtype: str
    shards: list[tuple[str, object]] = field(default_factory=list)  # (path, array) of each file
    handles: list = field(default_factory=list)

    def record(self) -> dict:
        """What `ArrayInput.describe` adds: format, column or tensor, and each shard's fingerprint."""
        out = {"format": self.fmt, "stored_dtype": self.stored_dtype}
        if self.key is not None:
            out["column" if self.fmt in ("parquet", "arrow") else "tensor"] = self.key.lstrip("/")
        if self.shards:
            out["shards"] = [{"path": p, "rows": int(a.shape[0]), "fingerprint": fingerprint(a)}
                             for p, a in self.shards]
        return out

    def close(self) -> None:
        for handle in self.handles:
            try:
                handle.close()
            except Exception:  # closing a reader never fails a run
                pass
        self.handles = []


def fingerprint(array) -> str:
    """A content fingerprint of one shard: its shape and a few rows spread over it, as float32."""
    digest = hashlib.sha1(repr(tuple(array.shape)).encode())
    picks = spread(int(array.shape[0]), SHARD_FINGERPRINT_ROWS)
    with np.errstate(all="ignore"):
        for row in picks:
            digest.update(np.ascontiguousarray(np.asarray(array[row:row + 1]), dtype=np.float32).tobytes())
    return "fp:" + digest.hexdigest()[:20]


class Location:
    """A local file or a remote one (`fs` an fsspec filesystem): what a reader needs of it."""

    def __init__(self, path: str, fs=None, fs_path: str | None = None):
        self.path, self.fs, self.fs_path = path, fs, fs_path
        self.label = remote.redact(path)

    @property
    def local(self) -> bool:
        return self.fs is None

    def open(self):
        if self.local:
            try:
                return open(self.path, "rb")
            except PermissionError:
                raise RuntimeFailure(f"{self.path}: permission denied") from None
            except OSError as exc:
                raise RuntimeFailure(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        return remote.open_file(self.fs, self.fs_path, self.label)

    def size(self) -> int:
        if self.local:
            return os.stat(self.path).st_size
        with remote.remote_errors(self.label):
            return int(self.fs.size(self.fs_path))


def sniff(loc: Location, fh) -> str | None:
    """The format of one file from its first bytes (its name when they say nothing)."""
    with remote.remote_errors(loc.label):
        fh.seek(0)
        first = fh.read(16)
    name = loc.path.lower()
    if (fmt := arrowfiles.sniff(first)) is not None:
        return fmt
    if first.startswith(b"\x93NUMPY"):
        return "npy"
    if first.startswith(ZIP_MAGIC):
        if name.endswith(TORCH_SUFFIXES):
            return "torch"
        try:
            with remote.remote_errors(loc.label):
                fh.seek(0)
                names = zipfile.ZipFile(fh).namelist()
        except (zipfile.BadZipFile, ValueError, EOFError):
            return None
        return "torch" if torchfile.is_torch_zip(names) else None
    if name.endswith(".safetensors") or safetensorsfile.looks_like(first):
        return "safetensors"
    if name.endswith(TORCH_SUFFIXES) and first[:1] == b"\x80":
        return "torch-legacy"
    return None


def open_one(loc: Location, fmt: str | None, key: str | None, ndim: tuple[int, ...]) -> Opened | None:
    """One file of a known (or sniffed) format; None for what `specs.open_array` reads itself."""
    fh = loc.open()
    try:
        fmt = fmt or sniff(loc, fh)
        opened = read(loc, fh, fmt, key, ndim)
    except BaseException:
        fh.close()
        raise
    if opened is None:
        fh.close()
    elif fh not in opened.handles:
        opened.handles.append(fh)
    return opened


def read(loc: Location, fh, fmt: str | None, key: str | None, ndim: tuple[int, ...]) -> Opened | None:
    label = loc.label
    if fmt in ("parquet", "arrow"):
        source = loc.path if loc.local else fh
        opener = arrowfiles.open_parquet if fmt == "parquet" else arrowfiles.open_ipc
        array, column, handle = opener(source, label, key)
        return Opened(array, label, "/" + column, fmt, str(array.dtype), handles=[handle, fh])
    if fmt == "feather-v1":
        raise DataError(f"{label}: a Feather v1 file; qbnorm reads Arrow IPC (Feather v2): rewrite it with "
                        "pyarrow.feather.write_feather(table, path)")
    if fmt == "safetensors":
        array, found, dtype = safetensorsfile.open_safetensors(fh, label, key, ndim, loc.size(),
                                                               loc.path if loc.local else None)
        return Opened(array, label, found, fmt, dtype)
    if fmt == "torch":
        array, found, dtype = torchfile.open_torch(fh, label, key, ndim, loc.path if loc.local else None)
        return Opened(array, label, found, fmt, dtype)
    if fmt == "torch-legacy":
        raise DataError(f"{label}: a PyTorch file in the legacy (pre-1.6) format; qbnorm reads torch.save's zip "
                        "format: save it again with torch.save")
    if fmt == "npy" and not loc.local:
        if key is not None:
            raise UsageError(f"{label}::{key}: a .npy file holds one array; drop '::{key.lstrip('/')}'")
        with remote.remote_errors(label):
            fh.seek(0)
            shape, fortran, dtype, offset = shards.npy_header(fh, label)
        if fortran and len(shape) > 1:
            raise DataError(f"{label}: a Fortran-ordered .npy is read from local files only")
        if len(shape) == 2:
            array = RangeRows(fh, offset, shape, dtype, label)
        else:
            need = int(np.prod(shape)) * dtype.itemsize
            if offset + need > loc.size():
                raise DataError(f"{label}: truncated .npy file")
            fh.seek(offset)
            array = np.frombuffer(fh.read(need), dtype=dtype).reshape(shape)
        return Opened(array, label, None, "npy", str(dtype))
    if not loc.local:
        raise DataError(f"{label}: qbnorm reads Parquet, Arrow, safetensors, PyTorch and .npy files (and folders "
                        f"of them) from URLs; download other formats first")
    return None


def npy_shard(loc: Location):
    """A .npy shard: memory-mapped when local, read by ranges when remote."""
    fh = loc.open()
    with remote.remote_errors(loc.label):
        shape, fortran, dtype, offset = shards.npy_header(fh, loc.label)
    if len(shape) != 2:
        fh.close()
        raise DataError(f"{loc.label}: a shard must be a 2-D array, got shape {shape}")
    if loc.local:
        fh.close()
        if fortran:
            return np.load(loc.path, mmap_mode="r", allow_pickle=False), None
        return mapped(loc.path, offset, shape, dtype, loc.label), None
    if fortran:
        raise DataError(f"{loc.label}: a Fortran-ordered .npy is read from local files only")
    return RangeRows(fh, offset, shape, dtype, loc.label), fh


def open_many(folder: str, fmt: str, locations: list[Location], key: str | None, ndim) -> Opened:
    """Several files of one format as one dataset, in the order given."""
    if fmt == "npy" and key is not None:
        raise UsageError(f"{folder}::{key}: .npy shards hold one array each; drop '::{key.lstrip('/')}'")
    parts, handles, found = [], [], None
    try:
        for loc in locations:
            if fmt == "npy":
                array, fh = npy_shard(loc)
                handles += [fh] if fh is not None else []
            else:
                one = open_one(loc, fmt, key, ndim)
                handles += one.handles
                array, found = one.array, one.key
            parts.append(array)
        array = parts[0] if len(parts) == 1 and fmt != "npy" else Concatenated(parts, [loc.label for loc in locations])
    except BaseException:
        for handle in handles:
            handle.close()
        raise
    return Opened(array, remote.redact(folder), found, fmt, str(array.dtype),
                  shards=[(loc.label, part) for loc, part in zip(locations, parts, strict=True)], handles=handles)


def open_format(path: str, key: str | None, ndim: tuple[int, ...]) -> Opened | None:
    """An input of the formats above, or None for what `specs.open_array` reads itself."""
    if remote.is_url(path):
        return open_remote(path, key, ndim)
    if os.path.isdir(path) or (shards.is_pattern(path) and not os.path.exists(path)):
        fmt, files = shards.local_files(path)
        return open_many(path, fmt, [Location(f) for f in files], key, ndim)
    if not os.path.isfile(path):
        return None  # specs.open_array says what is wrong with it
    try:
        with open(path, "rb") as fh:
            first = fh.read(16)
    except OSError:
        return None
    loc = Location(path)
    if not (arrowfiles.sniff(first) or first.startswith(ZIP_MAGIC) or path.lower().endswith(
            (".safetensors", *TORCH_SUFFIXES)) or safetensorsfile.looks_like(first)):
        return None
    return open_one(loc, None, key, ndim)


def open_remote(url: str, key: str | None, ndim) -> Opened:
    fs, fs_path = remote.filesystem(url)
    label = remote.redact(url)
    if remote.is_dir(fs, fs_path, label) or (shards.is_pattern(fs_path) and not remote.exists(fs, fs_path, label)):
        names = remote.listing(fs, fs_path, label)
        if not names:
            raise UsageError(f"{label}: no file matches this pattern")
        fmt, files = shards.choose(names, label, [])
        urls = [n if remote.is_url(n) else remote.unqualified(fs, n) for n in files]
        return open_many(url, fmt, [Location(u, fs, f) for u, f in zip(urls, files, strict=True)], key, ndim)
    if not remote.exists(fs, fs_path, label):
        raise UsageError(f"{label}: no such file")
    try:
        return open_one(Location(url, fs, fs_path), shards.format_of(fs_path), key, ndim)
    except (OSError, ValueError) as exc:
        raise RuntimeFailure(f"{label}: cannot read: {remote.redact_text(one_line(exc))}") from None
