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

from qbnorm_cli.errors import DataError, RuntimeFailure, UsageError, one_line, param
from qbnorm_cli.io import limits
from qbnorm_cli.version import FORMAT_VERSION

# Every format qbnorm reads (io/formats.py dispatches the others before a file is taken for HDF5)
READABLE = ("HDF5 (.h5, FILE::/dataset), .npy, a folder of .npy shards, .npz, numpy pickles, "
            "Parquet or Arrow (FILE::COLUMN), safetensors and PyTorch .pt (FILE::TENSOR)")

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


def split_spec(spec) -> tuple[str, str | None]:
    """'data.h5::/train' → ('data.h5', '/train'); 'x.npy' → ('x.npy', None). A name that is an
    existing file is that file, '::' or not; otherwise the dataset (or key) follows the last '::':
    file names may hold '::' (run::3.h5::/gallery), dataset names may not."""
    text = str(spec)
    if "::" not in text or os.path.lexists(text):
        return text, None
    path, _, dataset = text.rpartition("::")
    if not dataset:
        raise UsageError(f"{spec}: empty dataset name after '::'")
    return path, dataset if dataset.startswith("/") else "/" + dataset


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
    """Open an HDF5 file read-only (file locking off so concurrent readers never block), refusing
    what would read other files or expand beyond the budget (`check_reach`)."""
    magic = check_readable(path)
    if not magic:
        raise DataError(f"{path}: empty file; qbnorm reads {READABLE}")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError:
        is_hdf5 = False
    if not is_hdf5:
        raise DataError(f"{path}: not a format qbnorm reads; it reads {READABLE}")
    h5 = _open(path)
    try:
        check_reach(h5, path)
    except BaseException:
        h5.close()
        raise
    return h5


def _open(path: str) -> h5py.File:
    try:
        return h5py.File(path, "r", locking=False, rdcc_nbytes=CHUNK_CACHE_BYTES)
    except HDF5_ERRORS as exc:
        if "locking" in str(exc):  # already open in this process with locking on (a caller's h5py.File)
            try:
                return h5py.File(path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES)
            except HDF5_ERRORS:
                pass
        raise damaged(path, exc) from None


def outside(ds: h5py.Dataset) -> tuple[str, list[str]]:
    """(how, files) when a dataset's values come from other files: its external storage (raw
    bytes of any file) or the sources of a virtual dataset ('.' is its own file); ('', [])."""
    plist = ds.id.get_create_plist()
    if plist.get_layout() == h5py.h5d.VIRTUAL:
        files = [plist.get_virtual_filename(i) for i in range(plist.get_virtual_count())]
        return "is a virtual dataset reading", list(dict.fromkeys(files))
    count = plist.get_external_count()
    if count:
        return "stores its values in the external file", [plist.get_external(i)[0].decode("utf-8", "replace")
                                                          for i in range(count)]
    return "", []


def check_reach(h5: h5py.File, label: str) -> None:
    """Refuse a file holding external links, external storage or virtual datasets (they read files
    the user did not name) unless `limits` allow them, and a chunk that would decompress beyond the
    budget's share (in a qbnorm file; a foreign file's dataset when it is read, `check_stored`); one
    walk over every link of the file at open time. Soft links stay inside."""
    bounds = limits.current()
    links: list[tuple[str, object]] = []
    with reading(label, "its links"):  # nothing may raise inside HDF5's visit: collect, then look
        h5.visititems_links(lambda name, link: links.append((name, link)) and None)
    found: list[str] = []
    with reading(label, "its root attributes"):
        own = "qbnorm_kind" in h5.attrs
    for name, link in links:
        if isinstance(link, h5py.ExternalLink):
            found.append(f"/{name} is an external link to {link.filename}::{link.path}")
            continue
        if not isinstance(link, h5py.HardLink):
            continue
        with reading(f"{label}::/{name}", "its layout"):
            obj = h5.get(name)
            if not isinstance(obj, h5py.Dataset):
                continue
            how, files = outside(obj)
            chunks, itemsize = obj.chunks, obj.dtype.itemsize
        if how:
            found.append(f"/{name} {how} {', '.join(files)}")
        if own:  # read whole, every dataset (a foreign file: the one named, `check_stored`)
            check_chunk(chunks, itemsize, f"{label}::/{name}")
    if found and not bounds.allow_external:
        more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
        raise DataError(f"{label}: {'; '.join(found[:3])}{more}; qbnorm reads only the files it is given "
                        f"(pass {param('allow_external=True')} to follow them)")


def reached(h5: h5py.File, dataset: str) -> list[str]:
    """The other files reading `dataset` of an open file reads (an external link on its path, its
    external storage, its virtual sources), as absolute paths; refuses one that is missing or not
    a regular file (a FIFO would block, a missing source read as the fill value)."""
    base = os.path.dirname(os.path.abspath(h5.filename))
    files: list[str] = []
    parts = [p for p in dataset.split("/") if p]
    for i in range(1, len(parts) + 1):
        link = h5.get("/" + "/".join(parts[:i]), getlink=True)
        if isinstance(link, h5py.ExternalLink):
            files.append(os.path.join(base, link.filename))
    ds = h5[dataset]
    how, sources = outside(ds)
    if how:
        here = os.path.abspath(ds.file.filename)
        sources = [here if f == "." else os.path.join(os.path.dirname(here) if "virtual" in how else os.getcwd(), f)
                   for f in sources]
        files.extend(f for f in sources if f != here)
    files = list(dict.fromkeys(os.path.normpath(f) for f in files))
    for path in files:
        try:
            check_readable(path)
        except (UsageError, RuntimeFailure) as exc:
            raise DataError(f"{h5.filename}::{dataset} reads {exc} (a missing source would read as the fill "
                            "value)") from None
    return files


def check_chunk(chunks: tuple[int, ...] | None, itemsize: int, label: str) -> None:
    """Refuse a chunk that would decompress beyond its share of the budget (io.limits): HDF5
    decompresses a chunk whole, again for every read that cuts through it once it outgrows the cache."""
    if chunks is not None:
        nbytes = int(np.prod(chunks, dtype=np.float64) * itemsize)
        limits.check_expansion(label, nbytes, f"chunk {'×'.join(map(str, chunks))}",
                               "rechunk the file (h5repack -l CHUNK=…)")


def check_stored(ds: h5py.Dataset, label: str) -> None:
    """Refuse a dataset whose storage was never (fully) written: HDF5 reads what is missing as the
    fill value, so a 2 KB file can declare 10⁹ rows (every chunk, or the whole contiguous block,
    must be there; external and virtual storage are `reached`'s); and one whose chunks would
    decompress beyond the budget (`check_chunk`)."""
    with reading(label, "its layout"):
        chunks, itemsize = ds.chunks, ds.dtype.itemsize
    check_chunk(chunks, itemsize, label)
    with reading(label, "its storage"):
        if ds.size == 0 or ds.shape is None:
            return
        plist = ds.id.get_create_plist()
        layout = plist.get_layout()
        declared = f"{' × '.join(map(str, ds.shape))} values"
        if layout == h5py.h5d.CHUNKED:
            expected = int(np.prod([-(-n // c) for n, c in zip(ds.shape, ds.chunks, strict=True)], dtype=np.float64))
            stored = ds.id.get_num_chunks()
            if stored < expected:
                raise DataError(f"{label}: declares {declared} but stores {stored} of its {expected} chunks (the "
                                "rest were never written and would read as the fill value)")
        elif layout == h5py.h5d.CONTIGUOUS and not plist.get_external_count():
            if ds.id.get_storage_size() < ds.size * ds.dtype.itemsize:
                raise DataError(f"{label}: declares {declared} but stores none of them (never written: "
                                "every value would read as the fill value)")


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
    path, dataset = split_spec(spec)
    if dataset is not None:
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
