"""Arrays from other people's dumps: .npz archives, pickled numpy arrays, ann-benchmarks HDF5.

`specs.open_array` hands every input here first; anything not recognised (plain .npy, qbnorm and
other HDF5 files) goes back to it. Addressing follows the HDF5 convention:

  sims.npz::test        one array of a .npz archive (a .npz with a single array needs no key)
  sims.pkl              a pickled ndarray (QB-Norm's released similarity matrices)
  feats.pkl::text       one array of a pickled dict (or list: ::0, ::1; nested: ::a/b)
  glove.hdf5::/train    an ann-benchmarks file (train, test, neighbors, distances)

Pickles are read by `SafeUnpickler`, which resolves only the globals numpy's own pickles name
(array and dtype reconstruction); anything else is refused with a DataError before it can run.
"""

from __future__ import annotations

import codecs
import os
import pickle
from pathlib import Path

import numpy as np

from qbnorm_cli.errors import DataError, QbnormError
from qbnorm_cli.io import limits

PICKLE_SUFFIXES = (".pkl", ".pickle")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"
NPY_MAGIC = b"\x93NUMPY"
ANN_BENCHMARKS = {
    "train": "base vectors: the gallery",
    "test": "query vectors",
    "neighbors": "ids of each test query's true nearest train vectors",
    "distances": "distances to those neighbours",
}
MAX_LISTED = 20


def _latin1_encode(text, encoding="latin1"):
    """`_codecs.encode`, as protocol 0–2 pickles use it for bytes; only latin-1 is honoured."""
    if str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


class _NdarrayClass:
    """What `numpy.ndarray` resolves to: the class `_reconstruct` is handed (numpy's own pickles
    rebuild an empty array, then set its state from the bytes in the pickle), never a constructor:
    `ndarray((600000, 1024))` would make 2.4 GB of nothing from a 99-byte file."""

    def __call__(self, *args, **kwargs):
        raise DisallowedObject("numpy.ndarray called to allocate an array whose values are not in the pickle")


NDARRAY = _NdarrayClass()


def _reconstructor(reconstruct):
    def rebuild(subtype, shape, dtype):
        if subtype is not NDARRAY:
            raise DisallowedObject(f"_reconstruct of {type(subtype).__name__}")
        if not isinstance(shape, tuple) or any(not isinstance(n, int) for n in shape) or np.prod(shape) != 0:
            raise DisallowedObject(f"_reconstruct of shape {shape!r} (numpy's pickles rebuild an empty array and "
                                   "set its values from the pickle)")
        return reconstruct(np.ndarray, shape, dtype)

    return rebuild


def _allowed_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): NDARRAY,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for package in ("numpy.core", "numpy._core"):  # pickles from numpy 1.x and 2.x
        allowed[(f"{package}.multiarray", "_reconstruct")] = _reconstructor(multiarray._reconstruct)
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class DisallowedObject(pickle.UnpicklingError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class SafeUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays, scalars and dtypes in dicts/lists/tuples; refuses every other global."""

    _allowed = None

    def find_class(self, module: str, name: str):
        if SafeUnpickler._allowed is None:
            SafeUnpickler._allowed = _allowed_globals()
        found = SafeUnpickler._allowed.get((module, name))
        if found is None:
            raise DisallowedObject(f"{module}.{name}")
        return found

    def persistent_load(self, pid):
        raise DisallowedObject(f"persistent id {pid!r}")


def safe_load(fh, label: str):
    """Unpickle numpy data from an open binary file; DataError for anything else."""
    try:
        # latin1 lets numpy arrays pickled by Python 2 decode (numpy's own advice for np.load).
        return SafeUnpickler(fh, encoding="latin1").load()
    except DisallowedObject as exc:
        raise DataError(
            f"{label}: the pickle contains a disallowed object ({exc.name}); qbnorm reads only pickled "
            "numpy arrays (alone or in dicts/lists) and never runs code from a pickle"
        ) from None
    except MemoryError:
        raise
    except Exception as exc:
        raise DataError(f"{label}: cannot read pickle ({type(exc).__name__}: {exc})") from None


def _walk(obj, prefix: str = "", depth: int = 0):
    """(key path, array) for every numeric ndarray inside dicts/lists/tuples."""
    if isinstance(obj, np.ndarray) and obj.dtype != object:
        yield prefix, obj
        return
    if isinstance(obj, np.ndarray) and obj.ndim == 0:
        yield from _walk(obj.item(), prefix, depth)
        return
    if depth > 4:
        return
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return
    for key, value in items:
        yield from _walk(value, f"{prefix}/{key}" if prefix else str(key), depth + 1)


def _describe(arr: np.ndarray) -> str:
    return f"{'×'.join(str(n) for n in arr.shape)} {arr.dtype}"


def _listing(found: list[tuple[str, np.ndarray]]) -> str:
    shown = ", ".join(f"{key} ({_describe(arr)})" for key, arr in found[:MAX_LISTED])
    more = len(found) - MAX_LISTED
    return (shown + (f" and {more} more" if more > 0 else "")) or "no numeric arrays"


def _pick(obj, path: str, key: str | None, ndim: tuple[int, ...], what: str) -> tuple[np.ndarray, str | None]:
    """The array at `key` inside an unpickled object (or the only array when key is None)."""
    if key is None:
        if isinstance(obj, np.ndarray) and obj.dtype != object:
            return obj, None
        found = list(_walk(obj))
        fitting = [(k, a) for k, a in found if a.ndim in ndim]
        if len(found) == 1 or len(fitting) == 1:
            k, arr = found[0] if len(found) == 1 else fitting[0]
            return arr, "/" + k
        raise DataError(f"{path}: name an array as {path}::KEY; this {what} has {_listing(found)}")
    wanted = key.lstrip("/")
    for k, arr in _walk(obj):
        if k == wanted:
            return arr, "/" + k
    raise DataError(f"{path}: no array {wanted!r}; this {what} has {_listing(list(_walk(obj)))}")


def _npz_header(npz, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one .npz member without reading its data."""
    with npz.zip.open(name + ".npy") as member:
        version = np.lib.format.read_magic(member)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(member)
    return shape, dtype


def _open_npz(path: str, key: str | None, ndim) -> tuple[np.ndarray, str | None]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            if key is None:
                headers = {n: _npz_header(npz, n) for n in names}
                fitting = [n for n in names if len(headers[n][0]) in ndim] if len(names) > 1 else names
                if len(fitting) != 1:
                    listing = ", ".join(
                        f"{n} ({'×'.join(map(str, shape))} {dtype})" for n, (shape, dtype) in headers.items()
                    ) or "no arrays"
                    raise DataError(f"{path}: name an array as {path}::KEY; it has {listing}")
                key = fitting[0]
            key = key.lstrip("/")
            if key not in names:
                raise DataError(f"{path}: no array {key!r}; it has {', '.join(names) or 'no arrays'}")
            shape, dtype = _npz_header(npz, key)
            nbytes = int(np.prod(shape, dtype=np.float64) * dtype.itemsize)
            limits.check_expansion(f"{path}::{key}", nbytes, "a .npz member read whole",
                                   "save it as .npy (read by memory map)")
            return npz[key], "/" + key
    except DataError:
        raise
    except ValueError as exc:
        raise DataError(f"{path}: cannot read .npz ({exc})") from None
    except Exception as exc:  # zipfile.BadZipFile, OSError, …
        raise DataError(f"{path}: not a valid .npz file ({type(exc).__name__}: {exc})") from None


def _ann_benchmarks_error(path: str) -> DataError | None:
    """For an ann-benchmarks file named without a dataset: the error that lists its datasets."""
    from qbnorm_cli.io.hdf5 import open_h5

    try:
        h5 = open_h5(path)  # refuses links and storage outside the file
    except QbnormError:  # damaged or refused: specs.open_array says so
        return None
    with h5:
        try:
            if "qbnorm_kind" in h5.attrs or not {"train", "test"} <= set(h5.keys()):
                return None
            parts = [
                f"{path}::/{name} ({_describe(h5[name])}: {meaning})"
                for name, meaning in ANN_BENCHMARKS.items() if name in h5
            ]
            distance = h5.attrs.get("distance")
        except (OSError, RuntimeError, KeyError, ValueError, TypeError):  # damaged: specs.open_array says so
            return None
        distance = distance.decode() if isinstance(distance, bytes) else distance
        note = f"; its distance is {distance}" if distance else ""
        if distance and distance not in ("angular", "cosine"):
            note += " (qbnorm scores by cosine or dot product)"
        return DataError(f"{path}: an ann-benchmarks file; name a dataset: {', '.join(parts)}{note}")


def source_format(path: str) -> str:
    """npz, pickle, npy, hdf5 or unknown: what a dump is, for provenance records."""
    with open(path, "rb") as fh:
        magic = fh.read(8)
    if magic.startswith(ZIP_MAGIC) or path.endswith(".npz"):
        return "npz"
    if magic.startswith(NPY_MAGIC):
        return "npy"
    if magic.startswith(HDF5_MAGIC):
        return "hdf5"
    if _is_pickle(path, magic):
        return "pickle"
    return "unknown"


def _is_pickle(path: str, magic: bytes) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES or (
        len(magic) >= 2 and magic[0] == 0x80 and 2 <= magic[1] <= 5
    )


def open_foreign(path: str, dataset: str | None, ndim: tuple[int, ...]) -> tuple[np.ndarray, str | None] | None:
    """(array, key) of a .npz archive or a pickle; DataError naming the datasets of an
    ann-benchmarks file given without one; None for everything `specs.open_array` reads itself."""
    with open(path, "rb") as fh:
        magic = fh.read(8)
    if magic.startswith(HDF5_MAGIC):
        error = _ann_benchmarks_error(path) if dataset is None else None
        if error is not None:
            raise error
        return None
    if magic.startswith(ZIP_MAGIC) or (path.endswith(".npz") and not magic.startswith(NPY_MAGIC)):
        return _open_npz(path, dataset, ndim)
    if magic.startswith(NPY_MAGIC) or not _is_pickle(path, magic):
        return None
    limits.check_expansion(path, os.path.getsize(path), "a pickle read whole",
                           "save its arrays as .npy (read by memory map)")
    with open(path, "rb") as fh:
        payload = safe_load(fh, path)
    return _pick(payload, path, dataset, ndim, "pickle")
