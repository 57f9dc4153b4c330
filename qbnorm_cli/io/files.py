"""Reading arrays from HDF5/.npy and writing self-describing HDF5 outputs atomically.

Inputs are `PATH` or `PATH::/dataset`. Every error names the file (and dataset) and the problem in
one line; the exit code follows from the exception class (see errors.py).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import signal
import stat
import tempfile
import threading
import uuid as _uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from qbnorm_cli import FORMAT_VERSION, __version__
from qbnorm_cli.errors import DataError, RuntimeFailure, UsageError
from qbnorm_cli.streaming.budget import spread

# The dataset a qbnorm file of each kind is read from when the input names none.
DEFAULT_DATASET = {
    "embeddings": "/embeddings",
    "bank": "/embeddings",
    "similarity": "/scores",
    "ranking": "/neighbors",
    "evaluation": "/ranks",
    "hubness": "/k_occurrence",
}
EMBEDDING_KINDS = ("embeddings", "bank")
CHUNK_BYTES = 1 << 20
# Per open dataset: compressed chunks read by blocks that cut through them are decompressed once.
CHUNK_CACHE_BYTES = 16 << 20

# Set by the CLI entry point so outputs can record how they were made.
COMMAND_LINE: list[str] = []


def split_spec(spec: str) -> tuple[str, str | None]:
    """'data.h5::/train' → ('data.h5', '/train'); 'x.npy' → ('x.npy', None)."""
    path, sep, dataset = str(spec).partition("::")
    if not sep:
        return path, None
    if not dataset:
        raise UsageError(f"{spec}: empty dataset name after '::'")
    return path, dataset if dataset.startswith("/") else "/" + dataset


def _check_readable(path: str) -> bytes:
    """Refuse what is not a readable regular file; returns its first 8 bytes (the format magic).

    The file is really opened (not `os.access`), so permission problems show up even as root, and
    FIFOs or devices are refused before anything could block on them.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except NotADirectoryError:
        raise UsageError(f"{path}: no such file (a parent is not a directory)") from None
    except PermissionError:
        raise RuntimeFailure(f"{path}: permission denied") from None
    except OSError as exc:
        raise RuntimeFailure(f"{path}: cannot access: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{path}: is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{path}: not a regular file (FIFOs and devices cannot be read)")
    try:
        with open(path, "rb") as fh:
            return fh.read(8)
    except PermissionError:
        raise RuntimeFailure(f"{path}: permission denied") from None
    except OSError as exc:
        raise RuntimeFailure(f"{path}: cannot read: {exc.strerror or exc}") from None


def open_h5(path: str) -> h5py.File:
    """Open an HDF5 file read-only (file locking off so concurrent readers never block)."""
    magic = _check_readable(path)
    if not magic:
        raise DataError(f"{path}: empty file; expected an HDF5 or .npy file")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError:
        is_hdf5 = False
    if not is_hdf5:
        raise DataError(f"{path}: not an HDF5 or .npy file")
    try:
        return h5py.File(path, "r", locking=False, rdcc_nbytes=CHUNK_CACHE_BYTES)
    except OSError as exc:
        raise DataError(f"{path}: cannot read HDF5 file (truncated or corrupt): {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _root_kind(h5: h5py.File) -> str | None:
    kind = h5.attrs.get("qbnorm_kind")
    if kind is None:
        return None
    try:
        version = int(h5.attrs.get("qbnorm_version", 0))
    except (TypeError, ValueError):
        raise DataError(f"{h5.filename}: unreadable qbnorm_version attribute") from None
    if version > FORMAT_VERSION:
        raise DataError(
            f"{h5.filename}: qbnorm_version {version} is newer than this qbnorm supports "
            f"({FORMAT_VERSION}); upgrade qbnorm"
        )
    return str(kind)


def list_datasets(h5: h5py.File) -> list[str]:
    names: list[str] = []
    h5.visititems(lambda name, obj: names.append("/" + name) if isinstance(obj, h5py.Dataset) else None)
    return names


def check_kind(path: str, kind: str | None, allowed: tuple[str, ...] | None) -> None:
    """Refuse a qbnorm file of the wrong kind (foreign files, kind None, are always allowed)."""
    if allowed is not None and kind is not None and kind not in allowed:
        raise DataError(f"{path}: is a qbnorm {kind} file; expected {' or '.join(allowed)}")


@dataclass
class ArrayInput:
    """One array named on the command line, read lazily by row blocks as float32 (or its ints)."""

    spec: str
    path: str
    dataset: str | None
    array: object  # h5py.Dataset or np.memmap / ndarray
    kind: str | None = None
    attrs: dict = field(default_factory=dict)
    _h5: h5py.File | None = None

    @property
    def label(self) -> str:
        return f"{self.path}::{self.dataset}" if self.dataset else self.path

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[1]

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def chunk_rows(self) -> int | None:
        """Rows per HDF5 chunk (None: contiguous, .npy or in memory)."""
        chunks = getattr(self.array, "chunks", None)
        return int(chunks[0]) if chunks else None

    @property
    def chunk_cols(self) -> int | None:
        chunks = getattr(self.array, "chunks", None)
        return int(chunks[1]) if chunks and len(chunks) > 1 else None

    @property
    def uuid(self) -> str | None:
        value = self.attrs.get("uuid")
        return str(value) if value is not None else None

    @cached_property
    def identity(self) -> str:
        """uuid-based for qbnorm files, else a content fingerprint; equal data ⇒ equal identity.

        The fingerprint is taken of the values as qbnorm reads them (float32), so the same gallery
        stored as float64, float16 or integers is the same gallery.
        """
        if self.uuid:
            return f"{self.uuid}:{self.dataset}"
        digest = hashlib.sha1(repr(self.shape).encode())
        picks = spread(self.rows, 16)
        try:  # one selection: an HDF5 read per row costs a millisecond
            values = np.asarray(self.array[picks]) if picks else np.empty((0, *self.shape[1:]))
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise DataError(f"{self.label}: cannot read {len(picks)} sample rows ({_one_line(exc)})") from None
        with np.errstate(all="ignore"):
            for row in values:
                digest.update(np.ascontiguousarray(row, dtype=np.float32).tobytes())
        return "fp:" + digest.hexdigest()[:20]

    def describe(self) -> dict:
        """The record written into outputs' `inputs` attribute."""
        return {
            "path": self.path, "dataset": self.dataset, "kind": self.kind,
            "uuid": self.uuid, "identity": self.identity, "shape": list(self.shape),
        }

    def read(self, r0: int = 0, r1: int | None = None, c0: int = 0, c1: int | None = None,
             finite: bool = True) -> np.ndarray:
        """Rows r0:r1 (and columns c0:c1) as float32; refuses NaN/Inf naming the first bad row."""
        r1 = self.rows if r1 is None else r1
        try:
            if self.array.ndim == 1:
                block = np.asarray(self.array[r0:r1])
            elif c0 == 0 and (c1 is None or c1 == self.cols):
                block = np.asarray(self.array[r0:r1])
            else:
                block = np.asarray(self.array[r0:r1, c0:c1])
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise DataError(f"{self.label}: cannot read rows {r0}:{r1} ({_one_line(exc)})") from None
        if finite:
            return as_float32(block, self.label, r0)
        return block.astype(np.float32, copy=False)

    def read_raw(self) -> np.ndarray:
        """The whole array in its stored dtype (ground truth, masks, indices)."""
        try:
            return np.asarray(self.array[()])
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise DataError(f"{self.label}: cannot read ({_one_line(exc)})") from None

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None


def check_finite(block: np.ndarray, label: str, row_offset: int = 0) -> None:
    if not np.isfinite(block).all():
        bad = ~np.isfinite(block)
        row = int(np.argmax(bad.reshape(bad.shape[0], -1).any(axis=1))) if bad.ndim > 1 else int(np.argmax(bad))
        raise DataError(f"{label}: non-finite value (NaN or Inf) in row {row_offset + row}")


_F32_MAX = float(np.finfo(np.float32).max)


def as_float32(block: np.ndarray, label: str, rows: int | np.ndarray = 0) -> np.ndarray:
    """`block` as float32, deliberately: integers and float16/float64 are converted; NaN/Inf, and
    float64 values beyond float32's range, are refused naming the first offending row.

    `rows` is the row number of block[0], or the row numbers of every row of the block.
    """
    block = np.asarray(block)
    if block.dtype.kind == "f":
        bad = ~np.isfinite(block)
        if block.dtype.itemsize > 4:
            with np.errstate(invalid="ignore"):
                bad |= np.abs(block) > _F32_MAX
        if bad.any():
            local = int(np.argmax(bad.reshape(bad.shape[0], -1).any(axis=1))) if bad.ndim > 1 else int(np.argmax(bad))
            row = int(rows[local]) if np.ndim(rows) else int(rows) + local
            value = block.reshape(block.shape[0], -1)[local] if block.ndim > 1 else block[local:local + 1]
            what = "NaN or Inf" if not np.isfinite(value).all() else "too large for float32"
            raise DataError(f"{label}: non-finite value ({what}) in row {row}")
    return block.astype(np.float32, copy=False)


_NUMERIC = "biuf"


def _validate_array(arr, label: str, ndim: tuple[int, ...], numeric: bool = True) -> None:
    if numeric and arr.dtype.kind not in _NUMERIC:
        raise DataError(f"{label}: dtype {arr.dtype} is not numeric")
    if arr.ndim not in ndim:
        want = " or ".join(f"{n}-D" for n in ndim)
        raise DataError(f"{label}: expected a {want} array, got shape {tuple(arr.shape)}")
    if any(n == 0 for n in arr.shape):
        raise DataError(f"{label}: empty array, shape {tuple(arr.shape)}")


def _open_npy(path: str) -> np.ndarray:
    """Memory-map a .npy file; never unpickles (object arrays and pickles are refused)."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)(fh)
    except PermissionError:
        raise RuntimeFailure(f"{path}: permission denied") from None
    except (ValueError, EOFError, OSError, TypeError, SyntaxError) as exc:
        raise DataError(f"{path}: not a valid .npy file ({_one_line(exc)}); .npy files are never unpickled") from None
    if header[2].hasobject:
        raise DataError(f"{path}: holds Python objects (dtype {header[2]}); qbnorm refuses to unpickle data")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError, TypeError) as exc:
        raise DataError(f"{path}: cannot read .npy (truncated or corrupt: {_one_line(exc)})") from None


def open_array(spec: str, *, kinds: tuple[str, ...] | None = None,
               ndim: tuple[int, ...] = (2,), role: str = "input") -> ArrayInput:
    """Open `spec` for reading. `kinds` lists the qbnorm kinds accepted (foreign files always are)."""
    path, dataset = split_spec(spec)
    magic = _check_readable(path)
    from qbnorm_cli.io import foreign  # .npz, pickles, ann-benchmarks layouts (imports this module)

    # A file named .npy is read by np.load(allow_pickle=False) only, never by any unpickler.
    named_npy = dataset is None and path.endswith(".npy")
    if not named_npy and (found := foreign.open_foreign(spec, path, dataset, ndim)) is not None:
        return found
    if dataset is None and path.endswith(".npy"):
        arr = _open_npy(path)
        _validate_array(arr, path, ndim)
        return ArrayInput(spec, path, None, arr)
    if magic.startswith(b"\x93NUMPY"):
        if dataset is not None:
            raise UsageError(f"{spec}: a .npy file holds one array; drop '::{dataset}'")
        arr = _open_npy(path)
        _validate_array(arr, path, ndim)
        return ArrayInput(spec, path, None, arr)
    h5 = open_h5(path)
    try:
        kind = _root_kind(h5)
        check_kind(path, kind, kinds)
        names = list_datasets(h5)
        if dataset is None:
            dataset = DEFAULT_DATASET.get(kind or "")
            if dataset is None or dataset not in h5:
                candidates = [n for n in names if h5[n].ndim in ndim]
                if len(candidates) != 1:
                    listing = ", ".join(names) or "none"
                    raise DataError(
                        f"{path}: name a dataset as {path}::/NAME; it has {listing}"
                    )
                dataset = candidates[0]
        if dataset not in h5 or not isinstance(h5[dataset], h5py.Dataset):
            raise DataError(f"{path}: no dataset {dataset}; it has {', '.join(names) or 'none'}")
        arr = h5[dataset]
        _validate_array(arr, f"{path}::{dataset}", ndim)
        attrs = {k: _plain(v) for k, v in h5.attrs.items()}
        return ArrayInput(spec, path, dataset, arr, kind=kind, attrs=attrs, _h5=h5)
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
        h5.close()
        where = f"{path}::{dataset}" if dataset else path
        raise DataError(f"{where}: cannot read HDF5 file (truncated or corrupt): {_one_line(exc)}") from None
    except BaseException:
        h5.close()
        raise


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_attrs(h5: h5py.File) -> dict:
    return {k: _plain(v) for k, v in h5.attrs.items()}


def open_qbnorm(path: str, kind: str) -> h5py.File:
    """Open a qbnorm file that must be of `kind` (a probe, an evaluation, …)."""
    path, dataset = split_spec(path)
    if dataset is not None:
        raise UsageError(f"{path}::{dataset}: a {kind} file is named without '::'")
    h5 = open_h5(path)
    try:
        found = _root_kind(h5)
    except BaseException:
        h5.close()
        raise
    if found != kind:
        h5.close()
        what = f"a qbnorm {found} file" if found else "not a qbnorm file"
        raise DataError(f"{path}: {what}; expected a qbnorm {kind} file")
    return h5


def chunk_rows(row_bytes: int) -> int:
    return max(1, CHUNK_BYTES // max(row_bytes, 1))


_DEFERRED_SIGNALS = {signal.SIGINT, signal.SIGTERM} | ({signal.SIGHUP} if hasattr(signal, "SIGHUP") else set())

# Signals noted by the CLI's handler. The handler also raises KeyboardInterrupt, but Python drops an
# exception raised inside a weakref callback or __del__; outputs check this before every write and
# before the rename, so an interrupted run never completes an output.
_INTERRUPTS: list[int] = []


def note_interrupt(signum: int) -> None:
    _INTERRUPTS.append(signum)


def clear_interrupts() -> None:
    _INTERRUPTS.clear()


def check_interrupt() -> None:
    if _INTERRUPTS:
        raise KeyboardInterrupt


@contextmanager
def _signals_deferred():
    """Hold Ctrl-C / SIGTERM back while a temporary file is created, renamed or removed, so an
    interrupt never lands between the two halves of such a step (it is delivered right after)."""
    block = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if block:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED_SIGNALS)
    try:
        yield
    finally:
        if block:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _file_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp makes 0600 files)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


class OutputFile:
    """An HDF5 output written to a temporary file beside the target and renamed into place.

    Use as a context manager; on any exception (including KeyboardInterrupt) the temporary file is
    removed and the target is left as it was.

    Row blocks are written by a background thread (h5py releases the GIL while HDF5 writes), one
    block at a time, so that the next block is computed while this one goes to disk; a write's
    error surfaces at the next write_rows, create or close.
    """

    def __init__(self, path: str, kind: str, *, force: bool, params: dict,
                 inputs: list[ArrayInput | dict] = ()) -> None:
        self.path = Path(path)
        self.kind = kind
        self._check_target(force, inputs)
        self.params = params
        self.inputs = [i.describe() if isinstance(i, ArrayInput) else i for i in inputs]
        self.uuid = str(_uuid.uuid4())
        self.h5: h5py.File | None = None
        self._tmp: str | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def _check_target(self, force: bool, inputs) -> None:
        if self.path.suffix == ".npy" or "::" in str(self.path):
            raise UsageError(f"{self.path}: outputs are HDF5 files; name one like out.h5")
        parent = self.path.parent
        if not parent.is_dir():
            raise UsageError(f"{self.path}: no such directory {str(parent)!r}")
        if self.path.is_dir():
            raise UsageError(f"{self.path}: is a directory")
        target = self.path.resolve()
        for item in inputs:
            ipath = item.path if isinstance(item, ArrayInput) else item.get("path")
            if ipath and (Path(ipath).resolve() == target or _same_file(ipath, self.path)):
                raise UsageError(f"{self.path}: output would overwrite an input; choose another path")
        if self.path.exists() and not force:
            raise UsageError(f"{self.path}: exists; pass --force to overwrite")

    def __enter__(self) -> OutputFile:
        with _signals_deferred():
            try:
                fd, self._tmp = tempfile.mkstemp(
                    dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".qbnorm-tmp"
                )
                os.close(fd)
            except OSError as exc:
                raise RuntimeFailure(
                    f"{self.path}: cannot create a file in {str(self.path.parent)!r}: {exc.strerror or exc}"
                ) from None
        try:
            try:
                self.h5 = h5py.File(self._tmp, "w", locking=False)  # ours alone; NFS-safe
            except OSError as exc:
                raise RuntimeFailure(f"{self.path}: write failed: {_one_line(exc)}") from None
            attrs = self.h5.attrs
            attrs["qbnorm_kind"] = self.kind
            attrs["qbnorm_version"] = FORMAT_VERSION
            attrs["uuid"] = self.uuid
            attrs["created_by"] = f"qbnorm {__version__}"
            attrs["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            attrs["command"] = " ".join(["qbnorm", *COMMAND_LINE])
            attrs["params"] = json.dumps(self.params, sort_keys=True)
            attrs["inputs"] = json.dumps(self.inputs)
        except BaseException:
            self._discard()
            raise
        return self

    def create(self, name: str, data=None, *, shape=None, dtype=None, **attrs) -> h5py.Dataset:
        """A dataset chunked by whole rows of about 1 MiB (no compression: floats barely shrink)."""
        check_interrupt()
        self._wait_write()
        if data is not None:
            data = np.asarray(data)
            shape, dtype = data.shape, data.dtype
        dtype = np.dtype(dtype)
        chunks = None
        if len(shape) >= 1 and all(shape) and np.prod(shape) * dtype.itemsize > CHUNK_BYTES:
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            chunks = (min(shape[0], chunk_rows(row_bytes)), *shape[1:])
        try:
            ds = self.h5.create_dataset(name, shape=shape, dtype=dtype, data=data, chunks=chunks)
            for key, value in attrs.items():
                ds.attrs[key] = value
        except OSError as exc:
            raise RuntimeFailure(f"{self.path}: write failed: {_one_line(exc)}") from None
        return ds

    def write_rows(self, ds: h5py.Dataset, start: int, block: np.ndarray) -> None:
        """Write ds[start:start+len(block)] in the background; `block` must not change afterwards."""
        check_interrupt()
        self._wait_write()  # one block in flight: memory stays bounded by the block size
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qbnorm-write")
        self._pending = self._writer.submit(ds.__setitem__, slice(start, start + len(block)), block)

    def _wait_write(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except OSError as exc:
            raise RuntimeFailure(f"{self.path}: write failed: {_one_line(exc)}") from None

    def _stop_writer(self) -> None:
        """Wait for the write in flight, whatever happens to it, and end the thread."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        self._pending = None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._discard()
            return
        try:
            self._wait_write()
            self._stop_writer()
            check_interrupt()
            self.h5.flush()
            self.h5.close()
            self.h5 = None
            os.chmod(self._tmp, _file_mode())
            with _signals_deferred():
                check_interrupt()
                os.replace(self._tmp, self.path)
                self._tmp = None
        except OSError as exc:
            self._discard()
            raise RuntimeFailure(f"{self.path}: write failed: {exc.strerror or _one_line(exc)}") from None
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        self._stop_writer()
        with _signals_deferred():
            if self.h5 is not None:
                try:
                    self.h5.close()
                except Exception:
                    pass
                self.h5 = None
            if self._tmp:
                try:
                    os.unlink(self._tmp)
                except OSError:
                    pass
            self._tmp = None


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
