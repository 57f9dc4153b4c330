"""Opening HDF5 files read-only, and what makes one a qbnorm file (its kind and format version)."""

from __future__ import annotations

import os
import stat

import h5py
import numpy as np

from qbnorm_cli.errors import DataError, RuntimeFailure, UsageError, one_line
from qbnorm_cli.version import FORMAT_VERSION

# Per open dataset: compressed chunks read by blocks that cut through them are decompressed once.
CHUNK_CACHE_BYTES = 16 << 20


def check_readable(path: str) -> bytes:
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
    magic = check_readable(path)
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
        if "locking" in str(exc):  # already open in this process with locking on (a caller's h5py.File)
            try:
                return h5py.File(path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES)
            except OSError:
                pass
        raise DataError(f"{path}: cannot read HDF5 file (truncated or corrupt): {one_line(exc)}") from None


def root_kind(h5: h5py.File) -> str | None:
    """The qbnorm kind of a file (None for foreign files); refuses files of a newer format."""
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
    return plain(kind)


def list_datasets(h5: h5py.File) -> list[str]:
    names: list[str] = []
    h5.visititems(lambda name, obj: names.append("/" + name) if isinstance(obj, h5py.Dataset) else None)
    return names


def plain(value):
    """An attribute value as a Python value (bytes decoded, numpy scalars unwrapped)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_attrs(h5) -> dict:
    return {k: plain(v) for k, v in h5.attrs.items()}


def open_qbnorm(spec: str, kind: str) -> h5py.File:
    """Open a qbnorm file that must be of `kind` (a probe, an evaluation, …), named without '::'."""
    path, sep, _ = str(spec).partition("::")
    if sep:
        raise UsageError(f"{spec}: a {kind} file is named without '::'")
    h5 = open_h5(path)
    try:
        found = root_kind(h5)
    except BaseException:
        h5.close()
        raise
    if found != kind:
        h5.close()
        what = f"a qbnorm {found} file" if found else "not a qbnorm file"
        raise DataError(f"{path}: {what}; expected a qbnorm {kind} file")
    return h5
