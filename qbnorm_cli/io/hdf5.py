"""Opening HDF5 files read-only, what makes one a qbnorm file (its kind and format version), and the
one way an HDF5 library error met while reading becomes a DataError (`damaged`, `reading`).

Whatever the HDF5 library raises on a damaged file (a corrupt heap or B-tree, a bad signature, a
truncated object, a failed Fletcher-32 checksum, an attribute that cannot be decoded) surfaces
through h5py as OSError, RuntimeError, KeyError, ValueError or TypeError; every read of a file goes
through `reading` (or catches HDF5_ERRORS and calls `damaged`), so that a damaged file is exit 3
naming the file, never an internal error.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from contextlib import contextmanager

import h5py
import numpy as np

from qbnorm_cli.errors import DataError, RuntimeFailure, UsageError, one_line
from qbnorm_cli.io.formats import READABLE
from qbnorm_cli.version import FORMAT_VERSION

# Per open dataset: compressed chunks read by blocks that cut through them are decompressed once.
CHUNK_CACHE_BYTES = 16 << 20

# What h5py raises for HDF5 library errors (and for attributes or datatypes it cannot decode).
HDF5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)
# The root attribute holding a checksum of every other attribute qbnorm wrote (HDF5 checksums
# datasets with Fletcher-32, but not attributes).
ATTRIBUTE_CHECKSUMS = "attribute_checksums"


def damaged(label: str, exc: BaseException, what: str = "", *, checksummed: bool = False,
            remedy: str | None = None) -> DataError:
    """The DataError for an HDF5 library error met reading `label` (FILE or FILE::/DATASET):
    `what` says what was being read ("rows 0:512"), `checksummed` that the dataset carries a
    Fletcher-32 checksum (a filter failure is then a checksum mismatch), `remedy` what remakes it."""
    text = one_line(exc)
    fix = f": {remedy}" if remedy else ""
    reading_what = f" reading {what}" if what else ""
    if checksummed and "filter returned failure" in text:
        return DataError(f"{label}: checksum mismatch{reading_what}; the file is damaged{fix}")
    return DataError(f"{label}: damaged HDF5 file (truncated or corrupt){reading_what}: {text}")


@contextmanager
def reading(label: str, what: str = "", *, checksummed: bool = False, remedy: str | None = None):
    """Turn HDF5 library errors raised inside into `damaged(label, …)`; wrap h5py calls only."""
    try:
        yield
    except HDF5_ERRORS as exc:
        raise damaged(label, exc, what, checksummed=checksummed, remedy=remedy) from None


def has_checksum(ds) -> bool:
    """Whether an h5py dataset carries the Fletcher-32 filter (False for arrays and on any doubt)."""
    try:
        return bool(getattr(ds, "fletcher32", False))
    except HDF5_ERRORS:
        return False


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
        raise DataError(f"{path}: empty file; qbnorm reads {READABLE}")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError:
        is_hdf5 = False
    if not is_hdf5:
        raise DataError(f"{path}: not a format qbnorm reads; it reads {READABLE}")
    try:
        return h5py.File(path, "r", locking=False, rdcc_nbytes=CHUNK_CACHE_BYTES)
    except HDF5_ERRORS as exc:
        if "locking" in str(exc):  # already open in this process with locking on (a caller's h5py.File)
            try:
                return h5py.File(path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES)
            except HDF5_ERRORS:
                pass
        raise damaged(path, exc) from None


def root_kind(h5: h5py.File) -> str | None:
    """The qbnorm kind of a file (None for foreign files); refuses files of a newer format, and a
    kind or version attribute that is not a string or a whole number."""
    path = h5.filename
    with reading(path, "its root attributes"):
        kind = h5.attrs.get("qbnorm_kind")
        if kind is None:
            return None
        version = h5.attrs.get("qbnorm_version")
    kind = plain(kind)
    if not isinstance(kind, str) or not kind.isprintable() or not kind.isascii():
        raise DataError(f"{path}: attribute qbnorm_kind: expected a string, got {shown(kind)}; the file is damaged")
    version = plain(version)
    if version is None:
        raise DataError(f"{path}: attribute qbnorm_version: missing; the file is damaged")
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
        raise DataError(f"{path}: attribute qbnorm_version: expected a whole number, got {shown(version)}; "
                        "the file is damaged")
    if version > FORMAT_VERSION:
        raise DataError(
            f"{path}: qbnorm_version {version} is newer than this qbnorm supports "
            f"({FORMAT_VERSION}); upgrade qbnorm"
        )
    if version < 1:
        raise DataError(f"{path}: attribute qbnorm_version: {version} is not a qbnorm format version; "
                        "the file is damaged")
    return kind


def list_datasets(h5: h5py.File) -> list[str]:
    names: list[str] = []
    with reading(h5.filename, "its list of datasets"):
        h5.visititems(lambda name, obj: names.append("/" + name) if isinstance(obj, h5py.Dataset) else None)
    return names


def shown(value, limit: int = 40) -> str:
    """A value inside a message: its repr (ASCII, whatever bytes a damaged file holds), shortened."""
    text = ascii(value.tolist() if isinstance(value, np.ndarray) else value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def plain(value):
    """An attribute value as a Python value (bytes decoded, numpy scalars unwrapped)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_attrs(h5, label: str | None = None) -> dict:
    """Every attribute of a file or dataset as plain Python values (DataError when unreadable)."""
    label = label or (h5.filename if isinstance(h5, h5py.File) else f"{h5.file.filename}::{h5.name}")
    with reading(label, "its attributes"):
        return {k: plain(v) for k, v in h5.attrs.items()}


def _attribute_bytes(value) -> bytes:
    """An attribute value as h5py reads it, as bytes that change whenever the value does."""
    if isinstance(value, str):
        return b"s" + value.encode("utf-8", "surrogatepass")
    if isinstance(value, bytes):
        return b"b" + value
    array = np.asarray(value)
    if array.dtype.kind == "O":
        return b"o" + json.dumps([plain(v) if not isinstance(v, bytes) else v.hex() for v in array.ravel()]).encode()
    return f"a{array.dtype.str}{array.shape}".encode() + np.ascontiguousarray(array).tobytes()


def all_attributes(h5: h5py.File) -> dict[str, dict]:
    """{'/': root attributes, '/DATASET': its attributes, …}, values as h5py reads them (one pass;
    HDF5 errors propagate: callers read inside `reading`)."""
    objects = {"/": h5}
    h5.visititems(lambda name, obj: objects.__setitem__("/" + name, obj) if isinstance(obj, h5py.Dataset) else None)
    out = {name: {key: obj.attrs[key] for key in obj.attrs} for name, obj in objects.items()}
    for name, attrs in out.items():
        for key in attrs:
            if not isinstance(key, str):  # h5py hands over a name that is not UTF-8 as bytes
                raise ValueError(f"{name} has an attribute whose name is not text: {shown(key)}")
    return out


def attribute_checksums(h5: h5py.File, attributes: dict[str, dict] | None = None) -> dict[str, str]:
    """{'OBJECT:NAME': checksum} of every attribute of the file and its datasets (but this one),
    written by qbnorm once a file is complete and compared by readers (`schemas.check`);
    `attributes`: what `all_attributes` read, when the caller has it."""
    attributes = all_attributes(h5) if attributes is None else attributes
    out = {}
    for name, attrs in attributes.items():
        for key in sorted(attrs):
            if name == "/" and key == ATTRIBUTE_CHECKSUMS:
                continue
            out[f"{name}:{key}"] = hashlib.blake2b(_attribute_bytes(attrs[key]), digest_size=8).hexdigest()
    return out


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
