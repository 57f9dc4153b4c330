"""Inputs: `PATH` or `PATH::/dataset` specs, arrays handed over by a caller, and the lazily read
`ArrayInput` every command and library function reads its arrays through.

Every error names the input (its file and dataset, or the parameter it was passed as) and the
problem in one line.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field, replace
from functools import cached_property
from os import PathLike

import h5py
import numpy as np

from qbnorm_cli.core.sampling import spread
from qbnorm_cli.errors import DataError, RuntimeFailure, UsageError, one_line
from qbnorm_cli.io import fileschema, foreign, formats, schemas
from qbnorm_cli.io.hdf5 import (
    HDF5_ERRORS,
    check_readable,
    check_stored,
    damaged,
    has_checksum,
    list_datasets,
    open_h5,
    reached,
    read_attrs,
    reading,
    root_kind,
    split_spec,
)
from qbnorm_cli.io.validate import as_float32, check_array

# The dataset a qbnorm file of each kind is read from when the input names none.
DEFAULT_DATASET = {
    "embeddings": "/embeddings",
    "bank": "/embeddings",
    "similarity": "/scores",
    "ranking": "/neighbors",
    "evaluation": "/ranks",
    "hubness": "/k_occurrence",
    "hubs": "/hub_score",
}
# Root attributes that describe a file's stored orientation: not carried over to a transposed read.
ORIENTED_ATTRS = ("gallery_rows", "gallery_identity")
EMBEDDING_KINDS = ("embeddings", "bank")
SIMILARITY_KINDS = ("similarity",)
FINGERPRINT_ROWS = 16


def check_kind(path: str, kind: str | None, allowed: tuple[str, ...] | None) -> None:
    """Refuse a qbnorm file of the wrong kind (foreign files, kind None, are always allowed)."""
    if allowed is not None and kind is not None and kind not in allowed:
        raise DataError(f"{path}: is a qbnorm {kind} file; expected {' or '.join(allowed)}")


@dataclass
class ArrayInput:
    """One input array, read lazily by row blocks as float32 (or its stored integers).

    `path` is None for an array a caller handed over; `name` then labels it in messages (the
    parameter it was passed as)."""

    spec: str
    path: str | None
    dataset: str | None
    array: object  # h5py.Dataset, np.memmap or ndarray
    kind: str | None = None
    attrs: dict = field(default_factory=dict)
    h5: h5py.File | None = None
    name: str | None = None
    transposed: bool = False  # read transposed: `array` is a `Transposed` view of the stored one
    layout: fileschema.Layout | None = None  # a qbnorm file: what its schema check found
    origin: formats.Opened | None = None  # a file of io/formats (Parquet, shards, …): what was read
    external: tuple[str, ...] = ()  # other files reading it reads (allowed external storage, links, VDS)

    @property
    def label(self) -> str:
        if self.path is None:
            base = self.name or "array"
        else:
            base = f"{self.path}::{self.dataset}" if self.dataset else self.path
        return f"{base} (transposed)" if self.transposed else base

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
        stored as float64, float16 or integers, or handed over as an array, is the same gallery.
        """
        if self.uuid:
            return f"{self.uuid}:{self.dataset}" + (":T" if self.transposed else "")
        array = self.array
        if self.transposed:  # the stored rows' fingerprint, marked: never a transposed read of the whole
            array = array.stored if isinstance(array, Transposed) else array.T
        shape = tuple(array.shape)
        digest = hashlib.sha1((repr(shape) + (":T" if self.transposed else "")).encode())
        picks = spread(shape[0], FINGERPRINT_ROWS)
        with self.reading(f"{len(picks)} sample rows"):  # one selection: an HDF5 read per row costs a millisecond
            values = np.asarray(array[picks]) if picks else np.empty((0, *shape[1:]))
        with np.errstate(all="ignore"):
            for row in values:
                digest.update(np.ascontiguousarray(row, dtype=np.float32).tobytes())
        return "fp:" + digest.hexdigest()[:20]

    def describe(self) -> dict:
        """The record written into outputs' `inputs` attribute."""
        record = {
            "path": self.path, "dataset": self.dataset, "kind": self.kind,
            "uuid": self.uuid, "identity": self.identity, "shape": list(self.shape),
        }
        if self.transposed:
            record["transposed"] = True
        if self.origin is not None:
            record.update(self.origin.record())
        if self.external:
            record["external_files"] = list(self.external)
        return record

    def read(self, r0: int = 0, r1: int | None = None, c0: int = 0, c1: int | None = None,
             finite: bool = True) -> np.ndarray:
        """Rows r0:r1 (and columns c0:c1) as float32; refuses NaN/Inf naming the first bad row."""
        r1 = self.rows if r1 is None else r1
        with self.reading(f"rows {r0}:{r1}"):
            if self.array.ndim == 1 or (c0 == 0 and (c1 is None or c1 == self.cols)):
                block = np.asarray(self.array[r0:r1])
            else:
                block = np.asarray(self.array[r0:r1, c0:c1])
        if finite:
            return as_float32(block, self.label, r0)
        return block.astype(np.float32, copy=False)

    def read_into(self, out: np.ndarray, r0: int = 0) -> np.ndarray:
        """Rows r0 : r0 + len(out) into `out` (float32, C-contiguous), as `read` reads them: a
        float32 HDF5 dataset straight into it (no block made and copied)."""
        r1 = r0 + out.shape[0]
        if isinstance(self.array, h5py.Dataset) and self.array.dtype == np.float32 and self.array.ndim == 2 \
                and out.flags.c_contiguous and out.shape[1:] == self.array.shape[1:]:
            with self.reading(f"rows {r0}:{r1}"):
                self.array.read_direct(out, np.s_[r0:r1])
            return as_float32(out, self.label, r0)
        out[...] = self.read(r0, r1)
        return out

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """The rows of ascending row numbers `rows`, in their stored dtype (one selection)."""
        with self.reading(f"{len(rows)} rows"):
            return np.asarray(self.array[rows])

    def read_raw(self) -> np.ndarray:
        """The whole array in its stored dtype (ground truth, masks, indices)."""
        with self.reading("its values"):
            return np.asarray(self.array[()])

    def reading(self, what: str):
        """HDF5 library errors while reading `what` become one DataError (io/hdf5.reading): a
        failed Fletcher-32 check is a checksum mismatch, anything else a damaged file."""
        remedy = self.layout.schema.remedy if self.layout is not None else None
        return reading(self.label, what, checksummed=has_checksum(self.array), remedy=remedy)

    def close(self) -> None:
        if self.origin is not None:
            self.origin.close()
        if self.h5 is not None:
            self.h5.close()
            self.h5 = None


TRANSPOSE_TILE = 256
ROW_READ_BYTES = 8 << 20  # whole stored rows read at a time when a transposed read walks them


def transpose_into(out: np.ndarray, a: np.ndarray) -> None:
    """out[...] = a.T, copied tile by tile (3× faster than one strided copy of a large array:
    each tile stays in cache)."""
    step = TRANSPOSE_TILE
    for i in range(0, a.shape[0], step):
        for j in range(0, a.shape[1], step):
            out[j:j + step, i:i + step] = a[i:i + step, j:j + step].T


class Transposed:
    """A stored 2-D array (h5py dataset, memory map) read transposed: view[i, j] = stored[j, i].

    A row block of the view is a column block of the stored array. A contiguous array, or one
    chunked by whole rows (qbnorm's own outputs, numpy's .npy), is read by whole stored rows, ~8 MiB
    at a time, keeping the wanted columns (HDF5 would otherwise read a column block row segment by
    row segment, 10× slower), so every pass over it reads the whole file: the cost of a transposed
    walk is (number of panels) × (one sequential read of the file). A dataset chunked in tiles is
    read by column blocks (its chunks of those columns, each once). Blocks smaller than `panel_bytes`
    are served from a panel of that size read at once (one lock serialises readers, as h5py does
    anyway); they are copies, so a reader never sees a panel being replaced.
    """

    ndim = 2

    def __init__(self, stored, panel_bytes: int = 0):
        self.stored = stored
        self.shape = (int(stored.shape[1]), int(stored.shape[0]))
        self.dtype = stored.dtype
        chunks = getattr(stored, "chunks", None)
        self.chunks = (int(chunks[1]), int(chunks[0])) if chunks else None
        self.by_rows = chunks is None or int(chunks[1]) == int(stored.shape[1])
        self.panel_bytes = int(panel_bytes)
        self._panel: tuple[int, int, int, int, np.ndarray] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, r0: int, r1: int, c0: int, c1: int, out: np.ndarray | None = None) -> np.ndarray:
        """view[r0:r1, c0:c1] = stored[c0:c1, r0:r1].T, C-contiguous (into `out` if given)."""
        if out is None:
            out = np.empty((r1 - r0, c1 - c0), dtype=self.dtype)
        if not self.by_rows:
            transpose_into(out, np.asarray(self.stored[c0:c1, r0:r1]))
            return out
        chunk = self.chunks[1] if self.chunks else 1
        step = max(1, ROW_READ_BYTES // max(1, self.stored.shape[1] * self.dtype.itemsize))
        step = max(chunk, step // chunk * chunk)
        for a in range(c0, c1, step):
            b = min(c1, a + step)
            transpose_into(out[:, a - c0:b - c0], np.asarray(self.stored[a:b])[:, r0:r1])
        return out

    def _block(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        width = max(c1 - c0, 1) * self.dtype.itemsize
        rows = self.panel_bytes // width
        if rows <= 2 * (r1 - r0):  # a panel would not save a pass
            return self._read(r0, r1, c0, c1)
        with self._lock:
            panel = self._panel
            if panel is None or not (panel[0] <= r0 and r1 <= panel[1] and panel[2] == c0 and panel[3] == c1):
                end = min(self.shape[0], r0 + rows)
                shape = (end - r0, c1 - c0)
                # the panels' memory is reused (tiles leave as copies): touching fresh pages for every
                # panel costs as much as reading it
                buffer = panel[4] if panel is not None and panel[4].shape == shape else None
                self._panel = None
                panel = (r0, end, c0, c1, self._read(r0, end, c0, c1, buffer))
                self._panel = panel
            return panel[4][r0 - panel[0]:r1 - panel[0]].copy()

    def __getitem__(self, key):
        if key is Ellipsis or (isinstance(key, tuple) and not key):
            return self._read(0, self.shape[0], 0, self.shape[1])
        rows, cols = (key if isinstance(key, tuple) else (key, slice(None)))
        c0, c1, step = cols.indices(self.shape[1]) if isinstance(cols, slice) else (None, None, None)
        if step not in (None, 1):
            raise ValueError("a transposed read takes contiguous column ranges")
        if isinstance(rows, slice):
            r0, r1, rstep = rows.indices(self.shape[0])
            if rstep != 1:
                raise ValueError("a transposed read takes contiguous row ranges")
            return self._block(r0, max(r0, r1), c0, max(c0, c1))
        picks = np.asarray(rows, dtype=np.int64)  # ascending row numbers
        lo, hi = int(picks.min()), int(picks.max()) + 1
        return self._read(lo, hi, c0, c1)[picks - lo]


def transposed(source: ArrayInput, panel_bytes: int = 0) -> ArrayInput:
    """`source` read transposed (rows ↔ columns); its orientation-bound root attributes are dropped.
    An array in memory is transposed in place (a numpy view); files, memory maps included, are
    read through `Transposed`."""
    if source.transposed:
        raise UsageError(f"{source.label}: already read transposed")
    if source.array.ndim != 2:
        raise DataError(f"{source.label}: only a 2-D array can be read transposed")
    in_memory = isinstance(source.array, np.ndarray) and not isinstance(source.array, np.memmap)
    array = source.array.T if in_memory else Transposed(source.array, panel_bytes)
    attrs = {k: v for k, v in source.attrs.items() if k not in ORIENTED_ATTRS}
    return replace(source, array=array, attrs=attrs, transposed=True)


def open_npy(path: str) -> np.ndarray:
    """Memory-map a .npy file; never unpickles (object arrays and pickles are refused)."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)(fh)
    except PermissionError:
        raise RuntimeFailure(f"{path}: permission denied") from None
    except (ValueError, EOFError, OSError, TypeError, SyntaxError) as exc:
        raise DataError(f"{path}: not a valid .npy file ({one_line(exc)}); .npy files are never unpickled") from None
    if header[2].hasobject:
        raise DataError(f"{path}: holds Python objects (dtype {header[2]}); qbnorm refuses to unpickle data")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError, TypeError) as exc:
        raise DataError(f"{path}: cannot read .npy (truncated or corrupt: {one_line(exc)})") from None


def open_array(spec: str, *, kinds: tuple[str, ...] | None = None,
               ndim: tuple[int, ...] = (2,)) -> ArrayInput:
    """Open `spec` for reading. `kinds` lists the qbnorm kinds accepted (foreign files always are)."""
    path, dataset = split_spec(spec)
    if (opened := formats.open_format(path, dataset, ndim)) is not None:
        return format_input(spec, opened, ndim)
    magic = check_readable(path)
    # A file named .npy is read by np.load(allow_pickle=False) only, never by any unpickler.
    named_npy = dataset is None and path.endswith(".npy")
    if not named_npy and (found := foreign.open_foreign(path, dataset, ndim)) is not None:
        arr, key = found
        label = f"{path}::{key}" if key else path
        check_array(arr, label, ndim)
        return ArrayInput(spec, path, key, arr)
    if named_npy or magic.startswith(foreign.NPY_MAGIC):
        if dataset is not None:
            raise UsageError(f"{spec}: a .npy file holds one array; drop '::{dataset}'")
        arr = open_npy(path)
        check_array(arr, path, ndim)
        return ArrayInput(spec, path, None, arr)
    h5 = open_h5(path)
    try:
        kind = root_kind(h5)
        check_kind(path, kind, kinds)
        layout = schemas.check(h5, kind, path) if kind in schemas.SCHEMAS else None
        return dataset_input(h5, path, dataset, ndim, kind=kind, layout=layout, spec=spec)
    except BaseException:
        h5.close()
        raise


def format_input(spec: str, opened: formats.Opened, ndim: tuple[int, ...]) -> ArrayInput:
    """An input of io/formats (Parquet, Arrow, .npy shards, safetensors, PyTorch, URLs)."""
    try:
        check_array(opened.array, f"{opened.path}::{opened.key}" if opened.key else opened.path, ndim)
    except BaseException:
        opened.close()
        raise
    return ArrayInput(spec, opened.path, opened.key, opened.array, origin=opened)


def dataset_input(h5: h5py.File, path: str, dataset: str | None, ndim: tuple[int, ...] = (2,), *,
                  kind: str | None = None, layout: fileschema.Layout | None = None, spec: str | None = None,
                  owner: bool = True) -> ArrayInput:
    """One dataset of an open HDF5 file (its kind's default dataset when `dataset` is None) as an
    ArrayInput; `owner`: closing the input closes the file."""
    names = list_datasets(h5)
    try:
        if dataset is None:
            dataset = DEFAULT_DATASET.get(kind or "")
            if dataset is None or dataset not in h5:
                candidates = [n for n in names if h5[n].ndim in ndim]
                if len(candidates) != 1:
                    listing = ", ".join(names) or "no datasets"
                    raise DataError(f"{path}: name a dataset as {path}::/NAME; it has {listing}")
                dataset = candidates[0]
        if dataset not in h5 or not isinstance(h5[dataset], h5py.Dataset):
            raise DataError(f"{path}: no dataset {dataset}; it has {', '.join(names) or 'no datasets'}")
        external = tuple(reached(h5, dataset))
        arr = h5[dataset]
        check_array(arr, f"{path}::{dataset}", ndim)
    except HDF5_ERRORS as exc:
        raise damaged(f"{path}::{dataset}" if dataset else path, exc) from None
    check_stored(arr, f"{path}::{dataset}")
    attrs = layout.root_attrs if layout is not None else read_attrs(h5, path)
    return ArrayInput(spec or f"{path}::{dataset}", path, dataset, arr, kind=kind, attrs=attrs,
                      h5=h5 if owner else None, layout=layout, external=external)


def as_input(value, name: str, *, kinds: tuple[str, ...] | None = None, ndim: tuple[int, ...] = (2,),
             transpose: bool = False, panel_bytes: int = 0) -> ArrayInput:
    """What a caller passed as parameter `name`, as an ArrayInput: a `PATH[::/dataset]` string or
    path, an h5py.Dataset, an ArrayInput, or an array (numpy arrays and memory maps are read in
    place, without a copy). `transpose`: read it transposed (`transposed`)."""
    if transpose:
        return transposed(as_input(value, name, kinds=kinds, ndim=ndim), panel_bytes)
    if isinstance(value, ArrayInput):
        return value
    if isinstance(value, (str, PathLike)):
        return open_array(str(value), kinds=kinds, ndim=ndim)
    if isinstance(value, h5py.Dataset):
        check_array(value, f"{value.file.filename}::{value.name}", ndim)
        check_stored(value, f"{value.file.filename}::{value.name}")
        return ArrayInput(value.name, value.file.filename, value.name, value)
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    check_array(array, name, ndim)
    return ArrayInput(name, None, None, array, name=name)
