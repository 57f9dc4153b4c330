"""How a qbnorm file is checked against the schema of its kind (the kinds: io/schemas.py).

A qbnorm file is read on trust no more than a foreign one: `check` compares an open file with a
`FileSchema` before anything is read from it, and returns its `Layout` (the dimensions it found).
A schema lists

* root attributes and dataset attributes with their type: strings, whole numbers, finite numbers,
  JSON that parses to the right shape, numeric vectors (`Attr`); required ones must be there;
* datasets with their exact dtypes, their shape in named dimensions (`G` gallery items, `N` bank
  rows, …: a dimension is bound by the first attribute or dataset that names it, and every other
  must agree), and the values they may hold (`Data.values`: finite floats, indices into a
  dimension, counts, booleans, ascending rows);
* relations no single field shows (`FileSchema.relations`, raising `Damaged`).

Datasets of O(gallery) size are read whole and checked at open (checking them costs nothing next
to using them); the large ones (score matrices, neighbour lists, sorted bank scores) are checked
by their readers as they stream (`check_values`, `Layout.check_block`). Files written since
checksums were introduced are also checked for integrity: every dataset must carry its Fletcher-32
checksum and its chunk index all of its chunks (HDF5 reads a chunk its index misses as the fill
value, unchecked: single chunks are looked up, larger datasets were written with fill values no
reader accepts), and the attributes must match the `attribute_checksums` qbnorm recorded when it
wrote the file (HDF5 checksums dataset payloads only). Files of format version 1 written before
that (no checksums) read as before.

Every violation is a DataError naming the file, the dataset or attribute and what is wrong, with
what remakes the file: `probe.h5::/log_norm: NaN at β=20, item 17; the file is damaged: probe again`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import h5py
import numpy as np

from qbnorm_cli.errors import DataError
from qbnorm_cli.io.hdf5 import (
    ATTRIBUTE_CHECKSUMS,
    HDF5_ERRORS,
    all_attributes,
    attribute_checksums,
    has_checksum,
    plain,
    reading,
    shown,
)

FLOATS = ("<f4", "<f8")
INTS = ("<i4", "<i8")
ANY_INTS = ("|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8")
ANY_FLOATS = ("<f2", "<f4", "<f8")
BOOL = ("|b1",)


class Damaged(Exception):
    """A violation found by a check: the message, without file or remedy (check adds them)."""

    def __init__(self, where: str, problem: str):
        super().__init__(problem)
        self.where, self.problem = where, problem


# --- declarations --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Attr:
    """An attribute. type: str | int | number (finite) | bool | json-object | json-list | json-strings
    (a JSON list of strings) | numbers (a 1-D vector of finite numbers) | ints (a 1-D vector of
    whole numbers) | object (a parsed JSON object: a field of a recipe). `dim` names the dimension
    an int binds, or a vector's length."""

    name: str
    type: str
    required: bool = False
    dim: str | None = None
    low: float | None = None      # numbers (each, for vectors) ≥ low
    positive: bool = False        # numbers (each) > 0
    choices: tuple | None = None  # strings: one of these


@dataclass(frozen=True)
class Data:
    """A dataset. shape: dimension names or fixed sizes; values: finite | index | index-or-pad
    (−1 pads) | count (0 … bound) | ascending (finite, each row ascending) | ranks (finite or NaN)
    | occurrences (≥ −1) | None; `bound` the dimension of an index or count; `at_open`: values
    checked when the file is opened (read whole), else by its readers as they stream.
    `rows`/`cols` name an element in messages ("β" takes the row's value from attribute betas)."""

    name: str
    dtypes: tuple[str, ...]
    shape: tuple[str | int, ...]
    attrs: tuple[Attr, ...] = ()
    required: bool | str = True   # a dimension name: required when that dimension is > 0
    values: str | None = None
    bound: str | None = None
    at_open: bool = True
    rows: str = "row"
    cols: str = "column"


@dataclass(frozen=True)
class FileSchema:
    kind: str
    remedy: str                                  # what remakes a damaged file
    attrs: tuple[Attr, ...]
    datasets: tuple[Data, ...]
    params: dict[str, str] = field(default_factory=dict)   # params key → the dimension its int binds
    relations: tuple[Callable, ...] = ()         # (Layout) → None, raising Damaged
    together: tuple[tuple[str, ...], ...] = ()   # datasets present all or none
    checksummed: bool = False                    # attribute checksums required (kinds always written with them)

    def data(self, name: str) -> Data | None:
        return next((d for d in self.datasets if d.name == name), None)


COMMON = (
    Attr("qbnorm_kind", "str", required=True),
    Attr("qbnorm_version", "int", required=True, low=1),
    Attr("uuid", "str"),
    Attr("created_by", "str"),
    Attr("created_at", "str"),
    Attr("command", "str"),
    Attr("params", "json-object"),
    Attr("inputs", "json-list"),
    Attr("warnings", "json-strings"),
)


# --- layouts: what a check found ---------------------------------------------------------------

@dataclass
class Layout:
    """A checked file: its kind's schema, dimensions, root attributes and recorded parameters."""

    path: str
    schema: FileSchema
    dims: dict[str, int]
    attrs: dict
    params: dict
    inputs: list
    data_attrs: dict[str, dict] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # dimension → what bound it
    raw: dict[str, dict] = field(default_factory=dict)     # every object's attributes as h5py read them
    values: dict[str, np.ndarray] = field(default_factory=dict)  # the datasets read whole when opened

    @property
    def root_attrs(self) -> dict:
        """Every root attribute as a plain Python value (what readers look up: uuid, gallery_rows …)."""
        return {key: plain(value) for key, value in self.raw.get("/", {}).items()}

    def label(self, name: str | None = None) -> str:
        return f"{self.path}::{name}" if name and name != "/" else self.path

    def error(self, where: str | None, problem: str) -> DataError:
        return DataError(f"{self.label(where)}: {problem}; the file is damaged: {self.schema.remedy}")

    def check_block(self, name: str, block: np.ndarray, r0: int = 0, c0: int = 0) -> None:
        """The declared values of rows r0: (columns c0:) of dataset `name`, as a reader streams them
        (nothing to do for datasets whose values were checked when the file was opened)."""
        spec = self.schema.data(name)
        if spec is None or spec.values is None or spec.at_open:
            return
        try:
            _check_values(spec, block, self, r0, c0)
        except Damaged as exc:
            raise self.error(exc.where, exc.problem) from None

    def bind(self, dim: str, value: int, source: str, where: str) -> None:
        if dim not in self.dims:
            self.dims[dim], self.sources[dim] = int(value), source
        elif self.dims[dim] != value:
            raise Damaged(where, f"{source} is {value} but {self.sources[dim]} is {self.dims[dim]}")


# --- values --------------------------------------------------------------------------------------

def element(spec: Data, layout: Layout | None, index: tuple[int, ...]) -> str:
    """'β=20, item 17' or 'bank row 3, column 0': an element of a dataset named for people."""
    parts = []
    for axis, (name, i) in enumerate(zip((spec.rows, spec.cols, "item"), index, strict=False)):
        if axis == 0 and len(index) == 1 and spec.rows == "row":
            name = spec.cols
        if name in ("β", "K") and layout is not None:
            attr = "betas" if name == "β" else "ks"
            values = layout.data_attrs.get(spec.name, {}).get(attr)
            if values is not None and i < len(values):
                parts.append(f"{name}={float(values[i]):g}")
                continue
        parts.append(f"{name} {i}")
    return ", ".join(parts)


def first_index(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))


def _shift(index: tuple[int, ...], r0: int, c0: int) -> tuple[int, ...]:
    return tuple(i + (r0 if axis == 0 else c0 if axis == 1 else 0) for axis, i in enumerate(index))


def _float_text(value: float) -> str:
    return "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _check_values(spec: Data, block: np.ndarray, layout: Layout | None, r0: int = 0, c0: int = 0) -> None:
    block = np.asarray(block)
    if block.size == 0:
        return
    at = lambda mask: element(spec, layout, _shift(first_index(mask), r0, c0))
    if spec.values in ("finite", "ascending", "ranks"):
        bad = np.isinf(block) if spec.values == "ranks" else ~np.isfinite(block)
        if bad.any():
            value = float(block[np.unravel_index(int(np.argmax(bad)), bad.shape)])
            raise Damaged(spec.name, f"{_float_text(value)} at {at(bad)}")
        if spec.values == "ascending" and block.ndim == 2 and block.shape[1] > 1:
            down = np.diff(block, axis=1) < 0
            if down.any():
                raise Damaged(spec.name, f"not ascending at {at(down)}")
    elif spec.values in ("index", "index-or-pad", "count", "occurrences"):
        low = -1 if spec.values in ("index-or-pad", "occurrences") else 0
        high = None if spec.bound is None or layout is None else layout.dims.get(spec.bound)
        if spec.values == "count" and high is not None:
            high += 1
        bad = block < low
        if high is not None:
            bad |= block >= high
        if bad.any():
            value = int(block[np.unravel_index(int(np.argmax(bad)), bad.shape)])
            limit = f"[{low}, {high})" if high is not None else f"≥ {low}"
            raise Damaged(spec.name, f"value {value} at {at(bad)} is outside {limit}")


# --- attributes ----------------------------------------------------------------------------------

def _no_constants(name: str):
    raise ValueError(f"{name} is not a number")


def _text(value) -> bool:
    """A string that is valid text (h5py decodes damaged UTF-8 into surrogates)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json(value, name: str):
    if not _text(value):
        raise Damaged(None, f"attribute {name}: expected JSON text, got {shown(value)}")
    try:
        return json.loads(value, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise Damaged(None, f"attribute {name}: not valid JSON ({' '.join(str(exc).split())})") from None


def _number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def attr_value(attr: Attr, raw, where: str | None):
    """An attribute's value checked against its declaration (the parsed value for JSON)."""
    value = plain(raw)
    name = attr.name
    bad = lambda what: Damaged(where, f"attribute {name}: expected {what}, got {shown(value)}")
    if attr.type == "str":
        if not _text(value):
            raise bad("a string of text")
        if attr.choices is not None and value not in attr.choices:
            raise bad(f"one of {', '.join(attr.choices)}")
        return value
    if attr.type == "int":
        if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
            raise bad("a whole number")
        value = int(value)
        if (attr.low is not None and value < attr.low) or (attr.positive and value <= 0):
            raise bad("a positive whole number" if attr.positive else f"a whole number ≥ {attr.low:g}")
        return value
    if attr.type == "number":
        if not _number(value) or not math.isfinite(float(value)):
            raise bad("a finite number")
        if (attr.low is not None and value < attr.low) or (attr.positive and value <= 0):
            raise bad("a finite number > 0" if attr.positive else f"a finite number ≥ {attr.low:g}")
        return float(value)
    if attr.type == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise bad("true or false")
        return bool(value)
    if attr.type == "object":
        if not isinstance(value, dict):
            raise bad("a JSON object")
        return value
    if attr.type in ("numbers", "ints"):
        array = np.asarray(value)
        if array.ndim == 0:
            array = array.reshape(1)
        kinds = "iu" if attr.type == "ints" else "iuf"
        if array.ndim != 1 or array.dtype.kind not in kinds:
            raise bad("a vector of whole numbers" if attr.type == "ints" else "a vector of numbers")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise bad("finite numbers")
        if (attr.positive and (array <= 0).any()) or (attr.low is not None and (array < attr.low).any()):
            raise bad("positive numbers" if attr.positive else f"numbers ≥ {attr.low:g}")
        return array
    parsed = _json(value, name)
    if attr.type == "json-object" and not isinstance(parsed, dict):
        raise bad("a JSON object")
    if attr.type in ("json-list", "json-strings") and not isinstance(parsed, list):
        raise bad("a JSON list")
    if attr.type == "json-strings" and not all(isinstance(v, str) for v in parsed):
        raise bad("a JSON list of strings")
    return parsed


def _read_attrs(raws: dict, decls: tuple[Attr, ...], where: str | None, layout: Layout) -> dict:
    """The declared attributes of one object (`raws`: all its attributes as h5py read them)."""
    out = {}
    for attr in decls:
        if attr.name not in raws:
            if attr.required:
                raise Damaged(where, f"attribute {attr.name}: missing")
            continue
        value = attr_value(attr, raws[attr.name], where)
        out[attr.name] = value
        if attr.dim is not None:
            size = len(value) if isinstance(value, np.ndarray) else value
            layout.bind(attr.dim, size, f"attribute {attr.name}" if where is None else f"{where} attribute {attr.name}",
                        where)
    return out


# --- the check -----------------------------------------------------------------------------------

def _standard_type(ds: h5py.Dataset) -> bool:
    """Whether the stored HDF5 datatype is exactly the standard one of its numpy dtype (a damaged
    datatype message can leave h5py a dtype whose values HDF5 then converts into other numbers)."""
    try:
        return ds.id.get_type().equal(h5py.h5t.py_create(ds.dtype))
    except HDF5_ERRORS:
        return False


def _check_dataset(h5: h5py.File, spec: Data, layout: Layout) -> None:
    label = layout.label(spec.name)
    with reading(label, "its header"):
        obj = h5.get(spec.name)
        if not isinstance(obj, h5py.Dataset):
            raise Damaged(spec.name, "a group, not a dataset")
        shape, dtype = tuple(obj.shape) if obj.shape is not None else None, obj.dtype
    if shape is None or len(shape) != len(spec.shape):
        want = f"{len(spec.shape)}-D ({' × '.join(map(str, spec.shape))})"
        raise Damaged(spec.name, f"expected a {want} array, got shape {shape}")
    if dtype.str not in spec.dtypes or not _standard_type(obj):
        raise Damaged(spec.name, f"dtype {dtype} ({dtype.str}) is not one of {', '.join(spec.dtypes)}")
    layout.data_attrs[spec.name] = _read_attrs(layout.raw.get(spec.name, {}), spec.attrs, spec.name, layout)
    for axis, (dim, size) in enumerate(zip(spec.shape, shape, strict=True)):
        if isinstance(dim, int):
            if size != dim:
                raise Damaged(spec.name, f"shape {shape}: axis {axis} should have {dim} entries")
        else:
            layout.bind(dim, size, f"{spec.name} axis {axis} ({dim})", spec.name)
    if spec.values is not None and spec.at_open:
        with reading(label, "its values", checksummed=has_checksum(obj), remedy=layout.schema.remedy):
            values = obj[()]
        _check_values(spec, values, layout)
        layout.values[spec.name] = values


def _chunk_index(ds: h5py.Dataset) -> list[tuple[tuple[int, ...], int]]:
    """(offset, filter mask) of every allocated chunk (a set mask bit: that filter was skipped)."""
    found: list[tuple[tuple[int, ...], int]] = []
    ds.id.chunk_iter(lambda info: found.append((tuple(info.chunk_offset), info.filter_mask)))
    return found


def _check_integrity(h5: h5py.File, layout: Layout, names: list[str]) -> None:
    """A file written with checksums: every dataset has its Fletcher-32 filter and all its chunks
    (HDF5 reads a chunk its index does not find as the fill value, with no checksum to fail: a
    single chunk is looked up here, the chunks of larger datasets read as NaN or the smallest
    integer, which their readers refuse), and its attributes are unchanged."""
    recorded = layout.attrs.get(ATTRIBUTE_CHECKSUMS)
    if recorded is None:
        return  # written before checksums: read as before
    for name in names:
        with reading(layout.label(name), "its chunk index"):
            ds = h5[name]
            if ds.size == 0 or ds.shape == ():
                continue
            if not ds.fletcher32 or ds.chunks is None:
                raise Damaged(name, "the dataset lost its checksum filter")
            shape, chunks = ds.shape, ds.chunks
            index = _chunk_index(ds)
        expected = math.prod(-(-n // c) for n, c in zip(shape, chunks, strict=True))
        # every chunk on the grid, once: a chunk the index lost (or moved) reads as zeros, unchecked
        on_grid = {offset for offset, _ in index
                   if all(o % c == 0 and o < n for o, c, n in zip(offset, chunks, shape, strict=True))}
        if len(on_grid) != expected or len(index) != expected:
            raise Damaged(name, f"its chunk index lists {len(on_grid)} of its {expected} chunks"
                                + (f" and {len(index) - len(on_grid)} others" if len(index) > len(on_grid) else ""))
        if any(mask for _, mask in index):
            raise Damaged(name, "a chunk skips its checksum")
        if expected == 1:  # found by the lookup reads use (the index iterates keys the lookup may miss)
            with reading(layout.label(name), "its chunk index"):
                try:
                    ds.id.read_direct_chunk(index[0][0])
                except RuntimeError:
                    raise Damaged(name, "its chunk index does not find its chunk") from None
    found = attribute_checksums(h5, layout.raw)
    for key, value in recorded.items():
        obj, _, attr = key.rpartition(":")
        where = None if obj == "/" else obj
        if key not in found:
            raise Damaged(where, f"attribute {attr}: missing (qbnorm wrote it)")
        if found[key] != value:
            raise Damaged(where, f"attribute {attr} was changed after qbnorm wrote the file (checksum mismatch)")


def check(h5: h5py.File, schema: FileSchema, path: str | None = None) -> Layout:
    """Check an open qbnorm file against `schema`; returns what was found (Layout)."""
    path = path or h5.filename
    kind = schema.kind
    layout = Layout(path, schema, {}, {}, {}, [])
    try:
        with reading(path, "its attributes"):
            layout.raw = all_attributes(h5)
        checksums = Attr(ATTRIBUTE_CHECKSUMS, "json-object")
        layout.attrs = _read_attrs(layout.raw["/"], COMMON + schema.attrs + (checksums,), None, layout)
        if schema.checksummed and ATTRIBUTE_CHECKSUMS not in layout.attrs:
            raise Damaged(None, f"attribute {ATTRIBUTE_CHECKSUMS}: missing (qbnorm writes it in every {kind} file)")
        layout.params = layout.attrs.get("params", {})
        layout.inputs = layout.attrs.get("inputs", [])
        for key, dim in schema.params.items():
            value = layout.params.get(key)
            if value is not None:
                if not isinstance(value, int) or isinstance(value, bool):
                    raise Damaged(None, f"attribute params: {key} {shown(value)} is not a whole number")
                layout.bind(dim, value, f"params {key}", None)
        with reading(path, "its list of datasets"):
            present = {name for name in (d.name for d in schema.datasets) if name in h5}
        for group in schema.together:
            if present & set(group) and not set(group) <= present:
                missing = sorted(set(group) - present)
                raise Damaged(missing[0], f"missing (the file has {', '.join(sorted(present & set(group)))})")
        for spec in schema.datasets:
            if spec.name in present:
                _check_dataset(h5, spec, layout)
        for spec in schema.datasets:
            need = spec.required if isinstance(spec.required, bool) else layout.dims.get(spec.required, 0) > 0
            if need and spec.name not in present:
                raise Damaged(spec.name, "missing")
            if isinstance(spec.required, str) and spec.name in present and layout.dims.get(spec.required) == 0:
                raise Damaged(spec.name, f"present, but {layout.sources.get(spec.required)} is 0")
        for relation in schema.relations:
            relation(layout)
        _check_integrity(h5, layout, sorted(present))
    except Damaged as exc:
        raise layout.error(exc.where, exc.problem) from None
    return layout


def check_values(label: str, name: str, block: np.ndarray, *, values: str, bound: int | None = None,
                 r0: int = 0, rows: str = "row", cols: str = "column") -> None:
    """The checks of `Data.values` for an array no schema describes (a foreign file's)."""
    spec = Data(name, (), (), values=values, bound=None if bound is None else "bound", rows=rows, cols=cols)
    layout = Layout(label, FileSchema("", "", (), ()), {"bound": bound} if bound is not None else {}, {}, {}, [])
    try:
        _check_values(spec, block, layout, r0)
    except Damaged as exc:
        raise DataError(f"{label}: {exc.problem}") from None
