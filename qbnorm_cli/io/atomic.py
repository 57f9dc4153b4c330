"""Outputs written atomically: staged beside the target, renamed into place when complete,
removed on any failure or interrupt; never over an existing file without `force` (the sequence
and the interrupts: io/staging.py).

HDF5 outputs (`OutputFile`) record how they were made (kind, format version, uuid, the
provenance the caller passes in, parameters, inputs, the warnings the run issued) and carry
checksums: every dataset HDF5's Fletcher-32 filter (verified by HDF5 on every read), the
attributes a checksum of each (`attribute_checksums`, compared by io/schemas.check). JSON
outputs (`write_json`), other files (`write_with`) and directories (`OutputDirectory`) follow the
same rules. Interrupts are checked before every write and before the rename, so an interrupted
run never completes an output. A file system's error (disk full, I/O error, a file size limit)
never reaches HDF5 (`_Storage`): qbnorm reports it in one line.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import uuid as _uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from qbnorm_cli.errors import RuntimeFailure, UsageError, param, plain_text
from qbnorm_cli.io.hdf5 import ATTRIBUTE_CHECKSUMS, attribute_checksums
from qbnorm_cli.io.specs import ArrayInput
from qbnorm_cli.io.staging import (
    FULL,
    Staged,
    check_interrupt,
    check_replaceable,
    held,
    shielded,
    write_failure,
)
from qbnorm_cli.io.validate import check_written
from qbnorm_cli.version import FORMAT_VERSION, VERSION

CHUNK_BYTES = 1 << 20
LIBRARY_PROVENANCE = "qbnorm_cli (Python)"
# Space reserved beyond an HDF5 output's data for its metadata (superblock, object headers,
# attributes, chunk indexes: a few KiB per dataset and ~100 bytes per 1 MiB chunk in practice).
METADATA_BYTES = 256 << 10
INDEX_SHARE = 256  # a dataset's chunk index: at most 1/256 of its data


def chunk_rows(row_bytes: int) -> int:
    return max(1, CHUNK_BYTES // max(row_bytes, 1))


# --- failures of the file system ----------------------------------------------------------------

def check_space(path, directory, nbytes: int) -> None:
    """Refuse to start a write of `nbytes` that the file system holding `directory` has no room for."""
    try:
        info = os.statvfs(directory)
    except (OSError, AttributeError):
        return
    free = info.f_bavail * info.f_frsize
    if nbytes > free:
        raise RuntimeFailure(f"no space left on device writing {path} ({_mib(nbytes)} needed, {_mib(free)} free)")


def reserve(path, fd: int, nbytes: int) -> None:
    """Allocate the first `nbytes` of the file open as `fd` now (posix_fallocate), so that a full
    disk is found before the data is computed and never half-way through a write; where the file
    system cannot allocate ahead, check its free space instead."""
    size = 0
    try:
        size = os.fstat(fd).st_size
        if nbytes <= size:
            return
        os.posix_fallocate(fd, 0, nbytes)
    except AttributeError:  # no posix_fallocate (macOS)
        check_space(path, Path(path).parent, nbytes)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
            check_space(path, Path(path).parent, nbytes - size)
            return
        if exc.errno in FULL:
            raise RuntimeFailure(f"no space left on device writing {path} ({_free(path)} free)") from None
        raise write_failure(path, exc) from None


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


def _free(path) -> str:
    try:
        info = os.statvfs(Path(path).parent)
    except (OSError, AttributeError):
        return "no room"
    return _mib(info.f_bavail * info.f_frsize)


class _Storage:
    """The temporary file as HDF5 writes it (h5py's `fileobj` driver), with positioned reads and
    writes on one descriptor. An error of the file system (disk full, an I/O error, a file size
    limit) is kept in `error` for qbnorm to report, and HDF5 is told its write succeeded (later
    writes are dropped): HDF5 cannot recover from a failed write (closing the file then fails,
    and freeing its objects crashes the process). Main-thread calls into HDF5 on this file hold
    signals back (staging.held); the methods are also shielded."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        self.position = 0
        self.error: OSError | None = None

    @shielded
    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position}.get(whence)
        self.position = (os.fstat(self.fd).st_size if base is None else base) + offset
        return self.position

    @shielded
    def tell(self) -> int:
        return self.position

    @shielded
    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        got = 0
        try:
            while got < len(view):
                n = os.preadv(self.fd, [view[got:]], self.position + got)
                if n == 0:
                    break
                got += n
        except OSError as exc:
            self.error = self.error or exc
        view[got:] = bytes(len(view) - got)  # beyond the end, or lost: zeros (HDF5's own fill)
        self.position += len(view)
        return len(view)

    @shielded
    def read(self, size: int = -1) -> bytes:
        buffer = bytearray(max(size, 0))
        self.readinto(buffer)
        return bytes(buffer)

    @shielded
    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            done = 0
            try:
                while done < len(view):
                    done += os.pwrite(self.fd, view[done:], self.position + done)
            except OSError as exc:
                self.error = exc
        self.position += len(view)
        return len(view)

    @shielded
    def truncate(self, size: int | None = None) -> int:
        size = self.position if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as exc:
                self.error = exc
        return size

    @shielded
    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class OutputFile:
    """An HDF5 output written to a temporary file beside the target and renamed into place.

    Use as a context manager; on any exception (including KeyboardInterrupt) the temporary file is
    removed and the target is left as it was.

    Row blocks are written by a background thread (h5py releases the GIL while HDF5 writes), one
    block at a time, so that the next block is computed while this one goes to disk; a write's
    error surfaces at the next write_rows, create or close. Each dataset's space is reserved on
    disk when it is created (`reserve`): a full disk is reported before its rows are computed.
    """

    def __init__(self, path: str, kind: str, *, force: bool, params: dict,
                 inputs: list[ArrayInput | dict] = (), provenance: str | None = None) -> None:
        self.path = Path(path)
        self.kind = kind
        self.provenance = provenance or LIBRARY_PROVENANCE
        self.force = force
        self._check_target(force, inputs)
        self.params = params
        self.inputs = [i.describe() if isinstance(i, ArrayInput) else i for i in inputs]
        self.uuid = str(_uuid.uuid4())
        self.warnings: list[str] = []  # recorded as the `warnings` attribute when the file is complete
        self.h5: h5py.File | None = None
        self._staged = Staged(self.path, force=force)
        self._storage: _Storage | None = None
        self._reserved = METADATA_BYTES
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def _check_target(self, force: bool, inputs) -> None:
        if self.path.suffix == ".npy" or "::" in str(self.path):
            raise UsageError(f"{self.path}: outputs are HDF5 files; name one like out.h5")
        check_target(self.path, force, inputs)

    def __enter__(self) -> OutputFile:
        tmp = self._staged.create()
        try:
            with held():  # HDF5 calls back into Python (_Storage): no interrupt inside
                try:
                    self._storage = _Storage(tmp)
                    self.h5 = h5py.File(self._storage, "w", locking=False)  # ours alone; NFS-safe
                    reserve(self.path, self._storage.fd, self._reserved)
                except OSError as exc:
                    raise write_failure(self.path, exc) from None
                attrs = self.h5.attrs
                attrs["qbnorm_kind"] = self.kind
                attrs["qbnorm_version"] = FORMAT_VERSION
                attrs["uuid"] = self.uuid
                attrs["created_by"] = f"qbnorm {VERSION}"
                attrs["created_at"] = created_now()
                attrs["command"] = self.provenance
                attrs["params"] = json.dumps(self.params, sort_keys=True)
                attrs["inputs"] = json.dumps(self.inputs)
        except BaseException:
            self._discard()
            raise
        return self

    def create(self, name: str, data=None, *, shape=None, dtype=None, chunks=None, **attrs) -> h5py.Dataset:
        """A dataset chunked by whole rows of about 1 MiB (one chunk when smaller), or by the
        `chunks` given (clipped to the shape), each chunk with its Fletcher-32 checksum (no
        compression: floats barely shrink). Its fill value (what HDF5 returns for a chunk its index
        has lost) is one no reader accepts: NaN, or the smallest integer. Its space on disk is
        reserved now."""
        check_interrupt()
        self._wait_write()
        if data is not None:
            data = np.asarray(data)
            shape, dtype = data.shape, data.dtype
        dtype = np.dtype(dtype)
        checksum = len(shape) >= 1 and all(shape)  # HDF5 chunks no scalar or empty dataset
        if not checksum:
            chunks = None
        elif chunks is not None:
            chunks = tuple(max(1, min(int(c), int(n))) for c, n in zip(chunks, shape, strict=True))
        else:
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            chunks = (min(shape[0], chunk_rows(row_bytes)), *shape[1:])
        fill = np.nan if dtype.kind == "f" else np.iinfo(dtype).min if dtype.kind == "i" else None
        stored = shape if chunks is None else [-(-n // c) * c for n, c in zip(shape, chunks, strict=True)]
        nbytes = int(np.prod(stored, dtype=np.int64)) * dtype.itemsize  # whole chunks
        self._reserved += nbytes + nbytes // INDEX_SHARE + (16 << 10)
        reserve(self.path, self._storage.fd, self._reserved)
        try:
            with held():
                ds = self.h5.create_dataset(name, shape=shape, dtype=dtype, data=data, chunks=chunks,
                                            fletcher32=checksum, fillvalue=fill if checksum else None)
                for key, value in attrs.items():
                    ds.attrs[key] = value
        except OSError as exc:
            raise write_failure(self.path, exc) from None
        self._check_storage()
        return ds

    def write_rows(self, ds: h5py.Dataset, start: int, block: np.ndarray) -> None:
        """Write ds[start:start+len(block)] in the background; `block` must not change afterwards."""
        check_interrupt()
        check_written(f"{self.path}::{ds.name}", block, start)
        self._wait_write()  # one block in flight: memory stays bounded by the block size
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qbnorm-write")
        self._pending = self._writer.submit(ds.__setitem__, slice(start, start + len(block)), block)

    def write_columns(self, ds: h5py.Dataset, start: int, block: np.ndarray) -> None:
        """Write ds[:, start:start+block.shape[1]] in the background, as write_rows does rows."""
        check_interrupt()
        check_written(f"{self.path}::{ds.name}", block)
        self._wait_write()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qbnorm-write")
        self._pending = self._writer.submit(ds.__setitem__, (slice(None), slice(start, start + block.shape[1])),
                                            block)

    def _wait_write(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except OSError as exc:
                raise write_failure(self.path, exc) from None
        self._check_storage()

    def _check_storage(self) -> None:
        if self._storage is not None and self._storage.error is not None:
            raise write_failure(self.path, self._storage.error)

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
            with held():
                self.h5.attrs["warnings"] = json.dumps([plain_text(w) for w in self.warnings])
                self.h5.attrs[ATTRIBUTE_CHECKSUMS] = json.dumps(attribute_checksums(self.h5), sort_keys=True)
                self.h5.flush()
                self._check_storage()
                self.h5.close()
                self.h5 = None
            self._check_storage()
            self._storage.close()
            self._storage = None
            self._staged.commit()
        except OSError as exc:
            self._discard()
            raise write_failure(self.path, exc) from None
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        self._stop_writer()
        with held():
            if self.h5 is not None:
                try:
                    self.h5.close()  # cannot fail for the file system: _Storage keeps its errors
                except Exception:
                    pass
                self.h5 = None
            if self._storage is not None:
                self._storage.close()
                self._storage = None
        self._staged.discard()


def check_target(path: Path, force: bool, inputs=()) -> None:
    """Refuse an output path in a missing directory, a directory, a device or FIFO, one of the
    inputs, or an existing file (unless `force`)."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{path}: no such directory {str(parent)!r}")
    exists = check_replaceable(path)
    check_outputs([path], inputs)
    if exists and not force:
        raise UsageError(f"{path}: exists; pass {param('force=True')} to overwrite")


def _input_path(item) -> str | None:
    """The file an input names: an ArrayInput's, a record's `path`, a `PATH[::/dataset]` string's."""
    if isinstance(item, ArrayInput):
        return item.path
    if isinstance(item, dict):
        return item.get("path")
    if isinstance(item, (str, os.PathLike)):
        return str(item).split("::", 1)[0] or None
    return None


def overwrites(output, given, *, directory: bool = False) -> bool:
    """Whether writing `output` would overwrite the existing path `given`: the same file (by path,
    a symbolic or a hard link), or with `directory` (a directory output) a path inside it."""
    if not os.path.lexists(given):
        return False
    if _same_file(output, given):
        return True
    out, inside = os.path.realpath(output), os.path.realpath(given)
    return inside == out or (directory and inside.startswith(out.rstrip(os.sep) + os.sep))


def check_outputs(outputs, inputs, names=None, *, directory: bool = False) -> None:
    """Refuse (UsageError) an output that would overwrite one of the inputs (see `overwrites`), or
    another output. `names` optionally gives each input's option, for the message."""
    outputs = [Path(o) for o in outputs if o is not None]
    for i, output in enumerate(outputs):
        for j, item in enumerate(inputs):
            given = _input_path(item)
            if given and overwrites(output, given, directory=directory):
                which = f" ({names[j]} {item})" if names is not None else ""
                raise UsageError(f"{output}: output would overwrite an input{which}; choose another path")
        for other in outputs[:i]:
            if os.path.abspath(other) == os.path.abspath(output) or _same_file(other, output):
                raise UsageError(f"{output}: named as two outputs; choose another path for one")


def write_json(path, document: dict, *, force: bool, inputs=()) -> None:
    """A JSON document written atomically, under the same rules as OutputFile."""
    target = Path(path)
    if "::" in str(path):
        raise UsageError(f"{path}: JSON is written to a plain file, e.g. params.json")
    check_target(target, force, inputs)
    text = json.dumps(jsonable(document), indent=2) + "\n"
    write_with(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), force=force, inputs=inputs)


def write_with(path, writer, *, force: bool, inputs=()) -> None:
    """A file written atomically by `writer(temporary_path)` (a figure, …), under the same rules
    as OutputFile: beside the target, renamed into place when complete, removed on any failure."""
    target = Path(path)
    check_target(target, force, inputs)
    staged = Staged(target, force=force)
    tmp = staged.create()
    try:
        writer(tmp)
        staged.commit()
    except OSError as exc:
        raise write_failure(target, exc) from None
    finally:
        staged.discard()


def jsonable(value):
    """`value` with numpy arrays and scalars as plain Python values, non-finite floats as None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def created_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class OutputDirectory:
    """A directory output (an index and the files beside it) built in a temporary directory next
    to the target and renamed into place when complete; removed on any failure or interrupt, the
    target then left as it was. An existing target is replaced only with `force`, and a directory
    only when `owned(path)` says that a previous run wrote it: never a directory of other files,
    also one created at the target while this run wrote (checked again at the commit).

    Use as a context manager; it yields the temporary directory to write into. An OSError of the
    body (disk full, the directory removed) is reported as this output's write failure.
    """

    def __init__(self, path, *, force: bool, inputs=(), owned=None, what: str = "an output") -> None:
        self.path = Path(path)
        parent = self.path.parent
        if "::" in str(path):
            raise UsageError(f"{path}: {what} is a directory, named without '::'")
        if not parent.is_dir():
            raise UsageError(f"{path}: no such directory {str(parent)!r}")
        check_outputs([self.path], inputs, directory=True)
        self._staged = Staged(self.path, force=force, directory=True, owned=owned)
        if check_replaceable(self.path, directory_ok=True):
            if not force:
                raise UsageError(f"{path}: exists; pass {param('force=True')} to overwrite")
            self._staged.check_ours(self.path)

    def __enter__(self) -> Path:
        return Path(self._staged.create())

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._staged.discard()
            if issubclass(exc_type, OSError):
                raise write_failure(self.path, exc) from None
            if issubclass(exc_type, Exception) and not self.path.parent.is_dir():  # whatever a library said of it
                raise write_failure(self.path, OSError(errno.ENOENT, os.strerror(errno.ENOENT))) from None
            return
        try:
            self._staged.commit()
        except BaseException as failure:
            self._staged.discard()
            if isinstance(failure, OSError):
                raise write_failure(self.path, failure) from None
            raise
