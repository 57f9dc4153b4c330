"""Text labels of gallery items (`hubs --labels`): a 1-D dataset of strings in an HDF5 file
(`data.h5::/text/gallery`, as the shared Multi30k file holds them) or a text file, one label a line.

Only the labels asked for are read (a gallery of millions stays on disk). A dataset reached through
a link to another file, a virtual dataset or one stored outside its file is refused: qbnorm reads
only the files it is given.
"""

from __future__ import annotations

import h5py
import numpy as np

from qbnorm_cli.errors import DataError, UsageError
from qbnorm_cli.io.hdf5 import HDF5_ERRORS, check_readable, damaged, open_h5, reading
from qbnorm_cli.io.specs import split_spec

MAX_TEXT_BYTES = 1 << 30  # a text file of labels is read whole: refuse one larger than this


def _text(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    return " ".join(str(value).split())


def _hdf5_labels(path: str, dataset: str, rows: np.ndarray, n_items: int) -> list[str]:
    h5 = open_h5(path)
    label = f"{path}::{dataset}"
    try:
        with reading(label, "its header"):
            link = h5.get(dataset, getlink=True)
            if link is None:
                raise DataError(f"{path}: no dataset {dataset}")
            if not isinstance(link, h5py.HardLink):
                raise DataError(f"{label}: a link ({type(link).__name__}); name the dataset itself")
            ds = h5[dataset]
            if not isinstance(ds, h5py.Dataset):
                raise DataError(f"{label}: a group, not a dataset")
            if ds.is_virtual or ds.external:
                raise DataError(f"{label}: its values are stored outside the file; qbnorm reads only the files "
                                "it is given")
            shape, dtype = ds.shape, ds.dtype
        if shape is None or len(shape) != 1:
            raise DataError(f"{label}: labels are a 1-D dataset of strings, not shape {shape}")
        if h5py.check_string_dtype(dtype) is None and dtype.kind not in "SU":
            raise DataError(f"{label}: labels are strings, not {dtype}")
        if shape[0] != n_items:
            raise DataError(f"{label}: {shape[0]} labels but the gallery has {n_items} items")
        wanted = np.unique(rows)
        with reading(label, "its values"):
            values = ds[wanted] if wanted.size else []
        found = dict(zip(wanted.tolist(), (_text(v) for v in values), strict=True))
        return [found[int(r)] for r in rows]
    except HDF5_ERRORS as exc:
        raise damaged(label, exc) from None
    finally:
        h5.close()


def _text_labels(path: str, rows: np.ndarray, n_items: int) -> list[str]:
    check_readable(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_TEXT_BYTES + 1)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > MAX_TEXT_BYTES:
        raise DataError(f"{path}: over {MAX_TEXT_BYTES >> 20} MiB of labels; give an HDF5 dataset of strings")
    if b"\0" in raw:
        raise DataError(f"{path}: not a text file (it holds NUL bytes); give one label a line or an HDF5 dataset")
    lines = raw.decode("utf-8", "backslashreplace").splitlines()
    if len(lines) != n_items:
        raise DataError(f"{path}: {len(lines)} labels (lines) but the gallery has {n_items} items")
    return [_text(lines[int(r)]) for r in rows]


def read_labels(spec: str, rows, n_items: int) -> list[str]:
    """The labels of gallery items `rows` from `spec` (PATH::/dataset, or a text file), which must
    hold exactly one label per gallery item (`n_items`)."""
    rows = np.asarray(rows, dtype=np.int64)
    path, dataset = split_spec(str(spec))
    magic = check_readable(path)
    if dataset is not None:
        return _hdf5_labels(path, dataset, rows, n_items)
    if magic.startswith(b"\x89HDF"):
        raise UsageError(f"{spec}: name the dataset of labels, e.g. {path}::/text/gallery")
    return _text_labels(path, rows, n_items)
