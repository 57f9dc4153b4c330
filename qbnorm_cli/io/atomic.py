"""Outputs written atomically: to a temporary file beside the target, renamed into place when
complete, removed on any failure or interrupt; never over an existing file without `force`.

HDF5 outputs (`OutputFile`) record how they were made (kind, format version, uuid, the
provenance the caller passes in, parameters, inputs, the warnings the run issued) and carry
checksums: every dataset HDF5's Fletcher-32 filter (verified by HDF5 on every read), the
attributes a checksum of each (`attribute_checksums`, compared by io/schemas.check). JSON
outputs (`write_json`) follow the same rules. Interrupts noted by a signal handler (the CLI
installs one) are checked before every write and before the rename, so an interrupted run never
completes an output.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import signal
import tempfile
import threading
import uuid as _uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from qbnorm_cli.errors import RuntimeFailure, UsageError, one_line, param, plain_text
from qbnorm_cli.io.hdf5 import ATTRIBUTE_CHECKSUMS, attribute_checksums
from qbnorm_cli.io.specs import ArrayInput
from qbnorm_cli.io.validate import check_written
from qbnorm_cli.version import FORMAT_VERSION, VERSION

CHUNK_BYTES = 1 << 20
LIBRARY_PROVENANCE = "qbnorm_cli (Python)"


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
                 inputs: list[ArrayInput | dict] = (), provenance: str | None = None) -> None:
        self.path = Path(path)
        self.kind = kind
        self.provenance = provenance or LIBRARY_PROVENANCE
        self._check_target(force, inputs)
        self.params = params
        self.inputs = [i.describe() if isinstance(i, ArrayInput) else i for i in inputs]
        self.uuid = str(_uuid.uuid4())
        self.warnings: list[str] = []  # recorded as the `warnings` attribute when the file is complete
        self.h5: h5py.File | None = None
        self._tmp: str | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def _check_target(self, force: bool, inputs) -> None:
        if self.path.suffix == ".npy" or "::" in str(self.path):
            raise UsageError(f"{self.path}: outputs are HDF5 files; name one like out.h5")
        check_target(self.path, force, inputs)

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
                raise RuntimeFailure(f"{self.path}: write failed: {one_line(exc)}") from None
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
        has lost) is one no reader accepts: NaN, or the smallest integer."""
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
        try:
            ds = self.h5.create_dataset(name, shape=shape, dtype=dtype, data=data, chunks=chunks,
                                        fletcher32=checksum, fillvalue=fill if checksum else None)
            for key, value in attrs.items():
                ds.attrs[key] = value
        except OSError as exc:
            raise RuntimeFailure(f"{self.path}: write failed: {one_line(exc)}") from None
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
        if pending is None:
            return
        try:
            pending.result()
        except OSError as exc:
            raise RuntimeFailure(f"{self.path}: write failed: {one_line(exc)}") from None

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
            self.h5.attrs["warnings"] = json.dumps([plain_text(w) for w in self.warnings])
            self.h5.attrs[ATTRIBUTE_CHECKSUMS] = json.dumps(attribute_checksums(self.h5), sort_keys=True)
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
            raise RuntimeFailure(f"{self.path}: write failed: {exc.strerror or one_line(exc)}") from None
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


def check_target(path: Path, force: bool, inputs=()) -> None:
    """Refuse an output path in a missing directory, a directory, one of the inputs, or an
    existing file (unless `force`)."""
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{path}: no such directory {str(parent)!r}")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory")
    target = path.resolve()
    for item in inputs:
        ipath = item.path if isinstance(item, ArrayInput) else item.get("path")
        if ipath and (Path(ipath).resolve() == target or _same_file(ipath, path)):
            raise UsageError(f"{path}: output would overwrite an input; choose another path")
    if path.exists() and not force:
        raise UsageError(f"{path}: exists; pass {param('force=True')} to overwrite")


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
    with _signals_deferred():
        try:
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".qbnorm-tmp")
            os.close(fd)
        except OSError as exc:
            raise RuntimeFailure(f"{target}: cannot write: {exc.strerror or exc}") from None
    try:
        writer(tmp)
        os.chmod(tmp, _file_mode())
        with _signals_deferred():
            check_interrupt()
            os.replace(tmp, target)
            tmp = None
    except OSError as exc:
        raise RuntimeFailure(f"{target}: write failed: {exc.strerror or one_line(exc)}") from None
    finally:
        if tmp is not None:
            with _signals_deferred():
                try:
                    os.unlink(tmp)
                except OSError:
                    pass


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
    only when `owned(path)` says that a previous run wrote it: never a directory of other files.

    Use as a context manager; it yields the temporary directory to write into.
    """

    def __init__(self, path, *, force: bool, inputs=(), owned=None, what: str = "an output") -> None:
        self.path = Path(path)
        parent = self.path.parent
        if "::" in str(path):
            raise UsageError(f"{path}: {what} is a directory, named without '::'")
        if not parent.is_dir():
            raise UsageError(f"{path}: no such directory {str(parent)!r}")
        target = self.path.resolve()
        for item in inputs:
            ipath = item.path if isinstance(item, ArrayInput) else item.get("path")
            if ipath and (Path(ipath).resolve() == target or target in Path(ipath).resolve().parents):
                raise UsageError(f"{path}: output would overwrite an input; choose another path")
        if self.path.exists() or self.path.is_symlink():
            if not force:
                raise UsageError(f"{path}: exists; pass {param('force=True')} to overwrite")
            if self.path.is_dir() and not (owned is not None and owned(self.path)):
                raise UsageError(f"{path}: is a directory that qbnorm did not write; choose another path")
        self._tmp: str | None = None

    def __enter__(self) -> Path:
        with _signals_deferred():
            try:
                self._tmp = tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".qbnorm-tmp")
            except OSError as exc:
                raise RuntimeFailure(f"{self.path}: cannot create a directory in {str(self.path.parent)!r}: "
                                     f"{exc.strerror or exc}") from None
        return Path(self._tmp)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._discard()
            return
        old = None
        try:
            check_interrupt()
            os.chmod(self._tmp, 0o777 & ~_umask())
            with _signals_deferred():
                check_interrupt()
                if self.path.is_dir() and not self.path.is_symlink():
                    old = tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".qbnorm-old")
                    os.replace(self.path, os.path.join(old, "previous"))
                elif self.path.exists() or self.path.is_symlink():
                    os.unlink(self.path)
                os.replace(self._tmp, self.path)
                self._tmp = None
        except OSError as exc:
            if old is not None and not self.path.exists():  # put the previous output back
                try:
                    os.replace(os.path.join(old, "previous"), self.path)
                except OSError:
                    pass
            self._discard()
            raise RuntimeFailure(f"{self.path}: write failed: {exc.strerror or one_line(exc)}") from None
        except BaseException:
            self._discard()
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    def _discard(self) -> None:
        with _signals_deferred():
            if self._tmp:
                shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
