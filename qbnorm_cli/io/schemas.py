"""The declared layout of every qbnorm file kind, checked when a file is opened.

A qbnorm file is read on trust no more than a foreign one: `check` compares an open file with the
schema of its kind (`SCHEMAS`) before anything is read from it, and returns its `Layout` (the
dimensions it found). Each schema lists

* root attributes and dataset attributes with their type: strings, whole numbers, finite numbers,
  JSON that parses to the right shape, numeric vectors (`Attr`); required ones must be there;
* datasets with their exact dtypes, their shape in named dimensions (`G` gallery items, `N` bank
  rows, …: a dimension is bound by the first attribute or dataset that names it, and every other
  must agree), and the values they may hold (`Data.values`: finite floats, indices into a
  dimension, counts, booleans, ascending rows);
* relations no single field shows (`FileSchema.relations`): the parameters recorded in `params`
  against the shapes, the gallery recorded in `inputs` against `gallery_rows`.

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
from dataclasses import dataclass, field, replace

import h5py
import numpy as np

from qbnorm_cli import methods
from qbnorm_cli.core import probestats
from qbnorm_cli.core.scale import SCALE_TEXT
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
SIMILARITY_RECORDS = ("cosine", "dot", "precomputed")  # how a probe's bank was scored


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
SCORE_STATS = tuple(Attr(f"{prefix}score_{part}", "number") for prefix in ("", "gallery_")
                    for part in ("min", "max", "mean", "std"))


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

def _element(spec: Data, layout: Layout | None, index: tuple[int, ...]) -> str:
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


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))


def _shift(index: tuple[int, ...], r0: int, c0: int) -> tuple[int, ...]:
    return tuple(i + (r0 if axis == 0 else c0 if axis == 1 else 0) for axis, i in enumerate(index))


def _float_text(value: float) -> str:
    return "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _check_values(spec: Data, block: np.ndarray, layout: Layout | None, r0: int = 0, c0: int = 0) -> None:
    block = np.asarray(block)
    if block.size == 0:
        return
    at = lambda mask: _element(spec, layout, _shift(_first(mask), r0, c0))
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


def check(h5: h5py.File, kind: str, path: str | None = None) -> Layout:
    """Check an open qbnorm file of `kind` against its schema; returns what was found (Layout)."""
    path = path or h5.filename
    schema = SCHEMAS[kind]
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


# --- relations -----------------------------------------------------------------------------------

def _same_numbers(a, b) -> bool:
    try:
        x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        return False
    return x.shape == y.shape and bool(np.allclose(np.sort(x), np.sort(y), rtol=1e-12, atol=0))


def _params_agree(layout: Layout, key: str, dataset: str, attr: str) -> None:
    """params[key] (a list of numbers) and a dataset attribute hold the same values."""
    recorded = layout.params.get(key)
    have = layout.data_attrs.get(dataset, {}).get(attr)
    if recorded is None or have is None:
        return
    if not isinstance(recorded, list) or not _same_numbers(recorded, have):
        raise Damaged(dataset, f"attribute {attr} {shown(have)} but params {key} is {shown(recorded)}")


def _probe_relations(layout: Layout) -> None:
    _params_agree(layout, "betas", "/log_norm", "betas")
    _params_agree(layout, "topk_mean", "/topk_mean", "ks")
    for name in ("/topk_kth", "/topk_distance"):
        if name in layout.data_attrs:
            _params_agree(layout, "topk_mean", name, "ks")
    if "/gallery_log_norm" in layout.data_attrs:
        _params_agree(layout, "gallery_betas", "/gallery_log_norm", "betas")
    k = layout.params.get("k")
    for name in ("/activation_count", "/gallery_activation_count"):
        count_k = layout.data_attrs.get(name, {}).get("k")
        if k is not None and count_k is not None and k != count_k:
            raise Damaged(name, f"attribute k {count_k} but params k is {shown(k)}")
    count_k = layout.data_attrs.get("/activation_count", {}).get("k")
    kmax = layout.dims.get("kmax")
    recorded = layout.params.get("kmax")
    if recorded is not None and (not isinstance(recorded, int) or min(recorded, layout.dims["G"]) != kmax):
        raise Damaged("/bank_neighbors", f"{kmax} neighbours per bank row but params kmax is {shown(recorded)} "
                                         f"(for a gallery of {layout.dims['G']})")
    if count_k is not None and kmax is not None and count_k > kmax:
        raise Damaged("/activation_count", f"attribute k {count_k} exceeds the {kmax} neighbours kept per bank row")
    recorded = layout.params.get("similarity")
    if recorded is not None and recorded != layout.attrs.get("similarity"):
        raise Damaged(None, f"attribute similarity {layout.attrs.get('similarity')!r} but params similarity is "
                            f"{shown(recorded)}")
    keep = layout.params.get("keep_sorted")
    if isinstance(keep, bool) and keep != ("/sorted_bank_scores" in layout.data_attrs):
        raise Damaged("/sorted_bank_scores", "missing (params keep_sorted is true)" if keep else
                      "present, but params keep_sorted is false")


NOT_MATRICES = ("probe", "index-vectors")  # inputs recorded without a shape: a probe, an index export


def _recorded_shape(layout: Layout, position: int) -> tuple[int, int] | None:
    """The shape of the `position`-th input matrix a file records (probes and index exports left out)."""
    matrices = [i for i in layout.inputs if isinstance(i, dict) and i.get("kind") not in NOT_MATRICES]
    if position >= len(matrices):
        return None
    shape = matrices[position].get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) and not isinstance(n, bool)
                                                                for n in shape)):
        raise Damaged(None, f"attribute inputs: the shape of input {position} is {shown(shape)}, not two whole "
                            "numbers")
    return shape[0], shape[1]


def _scores_relations(layout: Layout) -> None:
    method = layout.params.get("method")
    if method is not None and "method" not in layout.attrs:
        raise Damaged(None, f"attribute method: missing (params method is {shown(method)})")
    if method is not None and method != layout.attrs["method"]:
        raise Damaged(None, f"attribute method {layout.attrs['method']!r} but params method is {shown(method)}")
    ranking = layout.schema.kind == "ranking"
    gallery, listed = layout.dims.get("G"), layout.dims.get("listed")
    if ranking and "top_k" in layout.params and layout.params["top_k"] != listed:
        raise Damaged("/neighbors", f"{listed} items per query but params top_k is {shown(layout.params['top_k'])}")
    if ranking and listed > gallery:
        raise Damaged(None, f"attribute gallery_rows {gallery} is smaller than the {listed} items listed per query")
    # the inputs it was made from: precomputed scores (queries × gallery), or queries and gallery embeddings
    if layout.params.get("similarity") == "precomputed" or "source_format" in layout.params:
        scores = _recorded_shape(layout, 0)
        made_from = None if scores is None else scores
    else:
        queries, items = _recorded_shape(layout, 0), _recorded_shape(layout, 1)
        made_from = None if queries is None or items is None else (queries[0], items[0])
    if made_from is None:
        return
    if "source_format" in layout.params and layout.params.get("transpose") is True:
        # convert --transpose records its source as stored: the source's columns are the rows
        made_from = made_from[::-1]
    if layout.dims.get("Q") != made_from[0]:
        raise Damaged("/scores", f"{layout.dims.get('Q')} rows but the queries it was made from "
                                 f"(attribute inputs) have {made_from[0]}")
    if gallery != made_from[1]:
        raise Damaged(None, f"attribute gallery_rows {gallery} but the gallery it was made from "
                            f"(attribute inputs) has {made_from[1]} items")


def _embeddings_relations(layout: Layout) -> None:
    source = _recorded_shape(layout, 0)
    if source is None:
        return
    rows, dim = layout.dims.get("N"), layout.dims.get("d")
    if source[1] != dim:
        raise Damaged("/embeddings", f"{dim} columns but the source it was made from (attribute inputs) has "
                                     f"{source[1]}")
    expected = layout.dims.get("S", source[0]) if layout.schema.kind == "bank" else rows
    if source[0] != expected:
        raise Damaged(None, f"the source it was made from has {source[0]} rows (attribute inputs) but "
                            f"{'params source_rows is' if layout.schema.kind == 'bank' else '/embeddings has'} "
                            f"{expected}")


def _evaluation_relations(layout: Layout) -> None:
    n = layout.dims.get("inputs")
    for name, value in (("metrics", layout.attrs.get("metrics")),
                        ("rows", layout.data_attrs.get("/ranks", {}).get("rows"))):
        if value is not None and len(value) != n:
            raise Damaged(None if name == "metrics" else "/ranks", f"attribute {name} lists {len(value)} inputs "
                                                                    f"but /ranks has {n}")
    valid = layout.attrs.get("valid_queries")
    ranks = layout.values.get("/ranks")
    if valid is not None and ranks is not None:  # NaN marks a masked query: the others are valid
        counts = (~np.isnan(ranks)).sum(axis=1)
        if (counts != valid).any():
            row = int(np.argmax(counts != valid))
            raise Damaged("/ranks", f"input {row} has {int(counts[row])} ranked queries but attribute valid_queries "
                                    f"is {valid}")
    if ranks is not None and (ranks < 0).any():
        where = _element(layout.schema.data("/ranks"), layout, _first(ranks < 0))
        raise Damaged("/ranks", f"a negative rank at {where}")


def _hubness_relations(layout: Layout) -> None:
    n = layout.dims.get("inputs")
    measures = layout.attrs.get("measures")
    for name, value in (("measures", measures), ("rows", layout.data_attrs.get("/k_occurrence", {}).get("rows"))):
        if value is not None and len(value) != n:
            raise Damaged(None if name == "measures" else "/k_occurrence",
                          f"attribute {name} lists {len(value)} inputs but /k_occurrence has {n}")
    counts, ks = layout.values.get("/k_occurrence"), layout.data_attrs.get("/k_occurrence", {}).get("ks")
    if measures is None or counts is None or ks is None:
        return
    for i, record in enumerate(measures):  # a query has at most k items in its top k (fewer: −1 slots)
        queries = record.get("queries") if isinstance(record, dict) else None
        if not isinstance(queries, int):
            raise Damaged(None, f"attribute measures: input {i} records no number of queries")
        for j, k in enumerate(ks):
            row = counts[i, j]
            total = int(np.where(row > 0, row, 0).sum())
            if row.max(initial=0) > queries or total > int(k) * queries:
                raise Damaged("/k_occurrence", f"input {i} at k={int(k)}: the counts (largest {int(row.max())}, sum "
                                               f"{total}) exceed what {queries} queries can give")


# --- the schemas ---------------------------------------------------------------------------------

def _declared(stat) -> Data:
    """A probe dataset from its declaration (core/probestats.py)."""
    attrs = ()
    if stat.key == "betas":
        attrs = (Attr("betas", "numbers", required=True, dim=stat.shape[0], positive=True),)
    elif stat.key == "ks":
        attrs = (Attr("ks", "ints", required=True, dim=stat.shape[0], low=1),)
    elif stat.key == "k":
        attrs = (Attr("k", "int", required=True, low=1),)
    return Data(stat.name, (stat.dtype,), stat.shape, attrs=attrs, required=stat.required, values=stat.values,
                bound=stat.bound, at_open=stat.at_open, rows=stat.rows, cols=stat.cols)


def _sinkhorn(name: str, dim: str, dual: bool) -> Data:
    """Sinkhorn potentials (io/probefile.py): log u per β, and how each β's iterations ended."""
    per_beta = (Attr("betas", "numbers", required=True, dim=dim, positive=True),
                Attr("iterations", "ints", required=True, dim=dim, low=0),
                Attr("change", "numbers", required=True, dim=dim, low=0),
                Attr("marginal_error", "numbers", required=True, dim=dim, low=0),
                Attr("converged", "ints", required=True, dim=dim, low=0))
    settings = (Attr("fixed_iters", "int", low=0), Attr("tol", "number", low=0), Attr("max_iters", "int", low=0),
                Attr("scores_held", "int", required=True, low=0))
    extra = (Attr("gallery_bank_rows", "int", low=0),) if dual else ()
    return Data(name, ("<f8",), (dim, "G"), attrs=per_beta + settings + extra, required=False, values="finite",
                rows="β", cols="item")


def _probe() -> FileSchema:
    return FileSchema(
        "probe", "probe again",
        attrs=(Attr("gallery_rows", "int", required=True, dim="G", positive=True),
               Attr("bank_rows", "int", required=True, dim="N", positive=True),
               Attr("gallery_bank_rows", "int", dim="Nh", low=0),
               Attr("similarity", "str", required=True, choices=SIMILARITY_RECORDS),
               Attr("gallery_identity", "str"),
               Attr("score_scale", "str", choices=tuple(SCALE_TEXT)),
               *SCORE_STATS),
        datasets=(
            *(_declared(stat) for stat in probestats.ALL),
            _sinkhorn("/sinkhorn_log_u", "n_sinkhorn", dual=False),
            _sinkhorn("/dual_sinkhorn_log_u", "n_dual_sinkhorn", dual=True),
        ),
        relations=(_probe_relations,),
        together=(("/gallery_log_norm", "/gallery_bank_neighbors", "/gallery_activation_count"),),
    )


def _scores(kind: str) -> FileSchema:
    ranking = kind == "ranking"
    width = "listed" if ranking else "G"
    cols = "position" if ranking else "item"
    datasets = [
        Data("/scores", ANY_FLOATS, ("Q", width), values="finite", at_open=False, rows="query", cols=cols),
        Data("/normalised", BOOL, ("Q",), required=False, cols="query"),
    ]
    if ranking:
        datasets.insert(0, Data("/neighbors", ANY_INTS, ("Q", "listed"), values="index-or-pad", bound="G",
                                at_open=False, rows="query", cols="position"))
    return FileSchema(
        kind, "normalise again" if ranking else "write it again (normalise or convert)",
        attrs=(Attr("gallery_rows", "int", required=True, dim="G", positive=True),
               Attr("method", "str", choices=tuple(methods.METHODS)),
               Attr("gallery_identity", "str"),
               Attr("score_scale", "str", choices=tuple(SCALE_TEXT)),
               Attr("score_domain", "str"),
               Attr("source_format", "str"),
               *SCORE_STATS[:4]),
        datasets=tuple(datasets),
        relations=(_scores_relations,),
    )


def _embeddings(kind: str) -> FileSchema:
    datasets = [Data("/embeddings", ("<f4",), ("N", "d"), values="finite", at_open=False, rows="row")]
    if kind == "bank":
        datasets.append(Data("/source_index", INTS, ("N",), values="index", bound="S", cols="bank row"))
    return FileSchema(
        kind, "build the bank again" if kind == "bank" else "convert again",
        attrs=(Attr("source_format", "str"),),
        datasets=tuple(datasets),
        params={"size": "N", "source_rows": "S"} if kind == "bank" else {},
        relations=(_embeddings_relations,),
    )


# --- index exports (io/indexfile.py): the recipe, and the HDF5 store -----------------------------

INDEX_RECIPE_FORMAT = "qbnorm-index-vectors"
INDEX_STORAGES = ("hdf5", "npy", "faiss", "lancedb")
INDEX_TYPES = ("flat", "hnsw", "ivf")
INDEX_REMEDY = "export again"
# The recipe `search` follows (api/serving.py writes it): every field it reads, with its type and
# range. A field null in the recipe counts as absent.
RECIPE = (
    Attr("format", "str", required=True, choices=(INDEX_RECIPE_FORMAT,)),
    Attr("format_version", "int", required=True, low=1),
    Attr("storage", "str", required=True, choices=INDEX_STORAGES),
    Attr("method", "str", required=True,
         choices=tuple(name for name, m in methods.METHODS.items() if not m.needs.sorted_bank)),
    Attr("similarity", "str", required=True, choices=("cosine", "dot")),
    Attr("normalise_queries", "bool"),
    Attr("dim", "int", required=True, positive=True),
    Attr("gallery_rows", "int", required=True, positive=True),
    Attr("scale", "number", required=True, positive=True),
    Attr("center", "number", required=True),
    Attr("constant", "number", required=True, positive=True),
    Attr("raw_constant", "number"),
    Attr("gated", "bool", required=True),
    Attr("gate_share", "number", low=0),
    Attr("baseline", "bool"),
    Attr("row_topk", "int", low=0),
    Attr("metric", "str", choices=("inner_product",)),
    Attr("uuid", "str", required=True),
    Attr("fingerprint", "str"),
    Attr("gallery_identity", "str"),
    Attr("probe_uuid", "str"),
    Attr("score_domain", "str"),
    Attr("query_recipe", "str"),
    Attr("created_by", "str"),
    Attr("created_at", "str"),
    Attr("params", "object"),
    Attr("files", "object"),
    Attr("index", "object"),
    Attr("extra_column", "object"),
)
INDEX_PARAMETERS = (  # recipe["index"]: the faiss index built
    Attr("type", "str", required=True, choices=INDEX_TYPES),
    Attr("M", "int", positive=True), Attr("ef_construction", "int", positive=True),
    Attr("ef_search", "int", positive=True), Attr("nlist", "int", positive=True), Attr("nprobe", "int", positive=True),
)
# the recipe's fields an HDF5 export also holds as attributes (h5dump shows them): the same values
RECIPE_ATTRS = ("method", "similarity", "scale", "center", "constant", "dim", "gallery_rows", "gated",
                "baseline", "row_topk", "gallery_identity", "query_recipe")


def _recipe_fields(recipe: dict, decls: tuple[Attr, ...], prefix: str) -> dict:
    out = {}
    for attr in decls:
        value = recipe.get(attr.name)
        if value is None:
            if attr.required:
                raise Damaged(None, f"{prefix}{attr.name}: missing")
            continue
        try:
            out[attr.name] = attr_value(attr, value, None)
        except Damaged as exc:
            raise Damaged(None, f"{prefix}{exc.problem.removeprefix('attribute ')}") from None
    return out


def recipe_problems(recipe) -> None:
    """An index export's recipe checked against `RECIPE` (types, finite ranges, choices): raises
    Damaged naming the field."""
    if not isinstance(recipe, dict):
        raise Damaged(None, f"the recipe is {shown(recipe)}, not a JSON object")
    fields = _recipe_fields(recipe, RECIPE, "recipe field ")
    index = fields.get("index")
    if index is not None:
        _recipe_fields(index, INDEX_PARAMETERS, "recipe field index.")
    if fields["storage"] != "faiss" and index is not None:
        raise Damaged(None, f"recipe field index: a {fields['storage']} export has no faiss index")
    if fields.get("baseline") and fields["gated"]:
        raise Damaged(None, "recipe fields baseline and gated are both true (the baseline normalises nothing)")


def check_recipe(recipe, label: str) -> dict:
    """`recipe_problems` as a DataError naming `label` (recipe.json, or the HDF5 export)."""
    try:
        recipe_problems(recipe)
    except Damaged as exc:
        raise DataError(f"{label}: {exc.problem}; the export is damaged: {INDEX_REMEDY}") from None
    return recipe


def _index_relations(layout: Layout) -> None:
    recipe = layout.attrs["recipe"]
    recipe_problems(recipe)
    if recipe["storage"] != "hdf5":
        raise Damaged(None, f"recipe field storage: {recipe['storage']!r} in an HDF5 export")
    for name in RECIPE_ATTRS:
        if name in layout.attrs and layout.attrs[name] != recipe.get(name):
            raise Damaged(None, f"attribute {name} {shown(layout.attrs[name])} but the recipe says "
                                f"{shown(recipe.get(name))}")
    if "uuid" in layout.attrs and recipe["uuid"] != layout.attrs["uuid"]:
        raise Damaged(None, f"attribute uuid {shown(layout.attrs['uuid'])} but the recipe says {shown(recipe['uuid'])}")
    if layout.dims["G"] != recipe["gallery_rows"]:
        raise Damaged("/vectors", f"{layout.dims['G']} rows but the recipe says gallery_rows {recipe['gallery_rows']}")
    if layout.dims["width"] != recipe["dim"] + 1:
        raise Damaged("/vectors", f"{layout.dims['width']} columns but the recipe says dim {recipe['dim']} (+1)")
    if recipe["gated"] != ("/gate" in layout.data_attrs):
        raise Damaged("/gate", "missing (the recipe says the method is gated)" if recipe["gated"] else
                      "present, but the recipe says the method is not gated")


def _index_vectors() -> FileSchema:
    recipe_attrs = tuple(replace(a, required=False, dim="G" if a.name == "gallery_rows" else None)
                         for a in RECIPE if a.name in RECIPE_ATTRS)
    return FileSchema(
        "index-vectors", INDEX_REMEDY,
        attrs=(Attr("recipe", "json-object", required=True), *recipe_attrs),
        datasets=(Data("/vectors", ("<f4",), ("G", "width"), values="finite", at_open=False, rows="item"),
                  Data("/gate", BOOL, ("G",), required=False, cols="item")),
        relations=(_index_relations,),
        checksummed=True,  # index exports were written with attribute checksums from their first release
    )


# --- hubs: the hub audit (api/hubs.py) -----------------------------------------------------------

def _hubs_relations(layout: Layout) -> None:
    """One record per input; each input's N_k within what its queries can give; the flagged items
    those whose score is above the recorded threshold."""
    n = layout.dims.get("inputs")
    records, names = layout.attrs.get("hubs"), layout.data_attrs.get("/hub_score", {}).get("rows")
    for name, value in (("hubs", records), ("rows", names)):
        if value is not None and len(value) != n:
            raise Damaged(None if name == "hubs" else "/hub_score", f"attribute {name} lists {len(value)} inputs "
                                                                     f"but /hub_score has {n}")
    scores, counts = layout.values.get("/hub_score"), layout.values.get("/n_k")
    k, threshold = layout.attrs.get("k"), layout.attrs.get("threshold")
    if records is None or scores is None or counts is None:
        return
    for i, record in enumerate(records):
        queries = record.get("queries") if isinstance(record, dict) else None
        flagged = record.get("flagged") if isinstance(record, dict) else None
        if not isinstance(queries, int) or not isinstance(flagged, list):
            raise Damaged(None, f"attribute hubs: input {i} records no number of queries or flagged items")
        row = counts[i]
        if row.max(initial=0) > queries or (k is not None and int(row.sum()) > k * queries):
            raise Damaged("/n_k", f"input {i}: the counts (largest {int(row.max(initial=0))}, sum {int(row.sum())}) "
                                  f"exceed what {queries} queries can give")
        if threshold is not None:
            above = np.flatnonzero(scores[i] > threshold)
            if sorted(v for v in flagged if isinstance(v, int)) != above.tolist() or len(flagged) != above.size:
                raise Damaged("/hub_score", f"input {i}: attribute hubs flags {len(flagged)} items but {above.size} "
                                            f"score above the threshold {threshold:g}")


HUBS = FileSchema(
    "hubs", "audit the hubs again",
    attrs=(Attr("hubs", "json-list"), Attr("threshold", "number"), Attr("k", "int", low=1)),
    datasets=(Data("/hub_score", ("<f8",), ("inputs", "G"),
                   attrs=(Attr("rows", "json-strings"), Attr("description", "str")),
                   values="finite", rows="input", cols="item"),
              Data("/n_k", INTS, ("inputs", "G"), attrs=(Attr("description", "str"),),
                   values="count", rows="input", cols="item")),
    relations=(_hubs_relations,),
)


SCHEMAS: dict[str, FileSchema] = {
    "probe": _probe(),
    "similarity": _scores("similarity"),
    "ranking": _scores("ranking"),
    "embeddings": _embeddings("embeddings"),
    "bank": _embeddings("bank"),
    "evaluation": FileSchema(
        "evaluation", "evaluate again",
        attrs=(Attr("protocol", "str"), Attr("metrics", "json-list"), Attr("valid_queries", "int", low=0),
               Attr("difference", "json-object")),
        datasets=(Data("/ranks", ("<f8",), ("inputs", "Q"),
                       attrs=(Attr("rows", "json-strings"), Attr("description", "str")),
                       values="ranks", rows="input", cols="query"),
                  Data("/censored", BOOL, ("inputs", "Q"))),
        relations=(_evaluation_relations,),
    ),
    "hubness": FileSchema(
        "hubness", "measure hubness again",
        attrs=(Attr("measures", "json-list"),),
        datasets=(Data("/k_occurrence", INTS, ("inputs", "n_ks", "width"),
                       attrs=(Attr("ks", "ints", required=True, dim="n_ks", low=1), Attr("rows", "json-strings"),
                              Attr("description", "str")),
                       values="occurrences", rows="input", cols="k"),),
        relations=(_hubness_relations,),
    ),
    "index-vectors": _index_vectors(),
    "hubs": HUBS,
}
KINDS = tuple(SCHEMAS)
