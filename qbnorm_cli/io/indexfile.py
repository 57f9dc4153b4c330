"""Index exports: the augmented gallery vectors an inner-product index serves normalised retrieval
from (core/augmented.py), the dynamic methods' per-item activation flags, and the query-side
recipe, in one of four stores:

  hdf5     one qbnorm file of kind `index-vectors`: /vectors (G, d+1) float32, /gate (G,) bool
           (gated methods only), the recipe as attributes (`recipe`: JSON, and its main fields);
  npy      a directory: vectors.npy, gate.npy, recipe.json (for tools that speak neither HDF5
           nor faiss: every vector database's client loads a float32 .npy);
  faiss    a directory: index.faiss (faiss.read_index reads it: IndexFlatIP, IndexHNSWFlat or
           IndexIVFFlat, inner-product metric), gate.npy, recipe.json;
  lancedb  a directory that is a LanceDB database: table `gallery` (id, vector, gate), and
           recipe.json; the table's schema metadata carries the export's uuid.

The recipe records the fingerprint of rows spread over the vectors (or, for LanceDB, the uuid),
so that a store from another export (another gallery, method or setting) is refused. Its fields
are declared once, in io/schemas.py (`RECIPE`: types, finite ranges), and checked when an export is
opened. Integrity: an HDF5 export is a qbnorm file (its schema, Fletcher-32 checksums and
attribute checksums); a directory export ends with manifest.json, written last: the size and
sha256 of every file (the recipe's included) and a sha256 of the manifest itself, all compared
before anything is read. faiss and
lancedb are optional extras, imported only here and only when a store needs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import uuid as _uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qbnorm_cli.core.augmented import FINGERPRINT_ROWS, fingerprint
from qbnorm_cli.core.sampling import spread
from qbnorm_cli.errors import DataError, RuntimeFailure, UsageError, one_line, param
from qbnorm_cli.io import schemas
from qbnorm_cli.io.atomic import (
    OutputDirectory,
    OutputFile,
    check_interrupt,
    check_space,
    created_now,
    jsonable,
    reserve,
)
from qbnorm_cli.io.extras import need
from qbnorm_cli.io.hdf5 import check_readable, has_checksum, open_qbnorm, reading
from qbnorm_cli.io.specs import ArrayInput, dataset_input, open_array, open_npy
from qbnorm_cli.version import FORMAT_VERSION, VERSION

KIND = "index-vectors"
RECIPE_FORMAT = schemas.INDEX_RECIPE_FORMAT
STORAGES = schemas.INDEX_STORAGES
INDEX_TYPES = schemas.INDEX_TYPES
RECIPE_FILE, VECTORS_FILE, GATE_FILE, FAISS_FILE, TABLE = "recipe.json", "vectors.npy", "gate.npy", "index.faiss", \
    "gallery"
STORAGE_EXTRAS = ("faiss", "lancedb")  # stores that need an extra of that name (io/extras.need)
MANIFEST_FILE, MANIFEST_FORMAT = "manifest.json", "qbnorm-index-manifest"
HASH_BUFFER = 8 << 20  # bytes read per step when a manifest's files are hashed
ATTR_FIELDS = schemas.RECIPE_ATTRS  # the recipe's fields an HDF5 export also holds as attributes


@dataclass(frozen=True)
class IndexOptions:
    """A faiss index to build: exact `flat`, or approximate `hnsw` (M, efConstruction, efSearch)
    or `ivf` (nlist inverted lists, nprobe probed at search time)."""

    index_type: str = "flat"
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    nlist: int | None = None  # None: 4·√G, at most G/39 (faiss wants 39 training points per list)
    nprobe: int = 16

    def lists(self, n_rows: int) -> int:
        if self.nlist is not None:
            return self.nlist
        return max(1, min(round(4 * float(np.sqrt(n_rows))), n_rows // 39))

    def describe(self, n_rows: int) -> dict:
        if self.index_type == "hnsw":
            return {"type": "hnsw", "M": self.hnsw_m, "ef_construction": self.ef_construction,
                    "ef_search": self.ef_search}
        if self.index_type == "ivf":
            return {"type": "ivf", "nlist": self.lists(n_rows), "nprobe": self.nprobe}
        return {"type": "flat"}


def _faiss_index(faiss, options: IndexOptions, dim: int, n_rows: int):
    metric = faiss.METRIC_INNER_PRODUCT
    if options.index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, options.hnsw_m, metric)
        index.hnsw.efConstruction = options.ef_construction
        index.hnsw.efSearch = options.ef_search
        return index
    if options.index_type == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, options.lists(n_rows), metric)
        index.nprobe = options.nprobe
        return index
    return faiss.IndexFlatIP(dim)


class _Picked:
    """The fingerprint's rows, collected as the vectors stream past."""

    def __init__(self, n_rows: int, dim: int):
        self.picks = spread(n_rows, FINGERPRINT_ROWS)
        self.rows = np.zeros((len(self.picks), dim), dtype=np.float32)
        self.n_rows = n_rows

    def see(self, r0: int, block: np.ndarray) -> None:
        for slot, row in enumerate(self.picks):
            if r0 <= row < r0 + len(block):
                self.rows[slot] = block[row - r0]

    def digest(self) -> str:
        return fingerprint(lambda picks: self.rows, self.n_rows)


def owned_export(path: Path) -> bool:
    """Whether a directory is an export qbnorm wrote (it may be replaced with force)."""
    try:
        return json.loads((path / RECIPE_FILE).read_text(encoding="utf-8")).get("format") == RECIPE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_export(output, storage: str, recipe: dict, blocks, gate: np.ndarray | None, *, n_rows: int, dim: int,
                 options: IndexOptions = IndexOptions(), train=None, force: bool = False, inputs=(),
                 params: dict | None = None, provenance: str | None = None) -> dict:
    """Write the export: `blocks` yields (first row, float32 (rows, dim) augmented vectors) in order;
    `train()` gives the rows an IVF index is trained on. Returns the recipe as written (with its
    uuid, fingerprint, files and the index's parameters)."""
    recipe = dict(recipe, format=RECIPE_FORMAT, format_version=FORMAT_VERSION, storage=storage,
                  created_by=f"qbnorm {VERSION}", created_at=created_now(), metric="inner_product")
    picked = _Picked(n_rows, dim)

    def seen():
        for r0, block in blocks:
            check_interrupt()
            picked.see(r0, block)
            yield r0, block

    if storage == "hdf5":
        with OutputFile(str(output), KIND, force=force, params=params or {}, inputs=list(inputs),
                        provenance=provenance) as out:
            ds = out.create("/vectors", shape=(n_rows, dim), dtype=np.float32)
            for r0, block in seen():
                out.write_rows(ds, r0, block)
            if gate is not None:
                out.create("/gate", data=np.asarray(gate, dtype=bool))
            recipe.update(uuid=out.uuid, fingerprint=picked.digest(), files={"vectors": "/vectors", "gate": "/gate"}
                          if gate is not None else {"vectors": "/vectors"})
            _write_attrs(out.h5.attrs, recipe)
            out.warnings = list(recipe.get("warnings", ()))
        return recipe
    module = need(storage, param(f"format={storage!r}")) if storage in STORAGE_EXTRAS else None
    recipe["uuid"] = str(_uuid.uuid4())
    with OutputDirectory(output, force=force, inputs=list(inputs), owned=owned_export, what="the export") as tmp:
        files = {}
        if storage == "npy":
            _write_npy(tmp / VECTORS_FILE, seen(), (n_rows, dim), output)
            files["vectors"] = VECTORS_FILE
        else:
            check_space(output, tmp, n_rows * dim * np.dtype(np.float32).itemsize)
        if storage == "faiss":
            recipe["index"] = options.describe(n_rows)
            index = _faiss_index(module, options, dim, n_rows)
            try:
                if not index.is_trained:
                    index.train(np.ascontiguousarray(train(), dtype=np.float32))
                for _, block in seen():
                    index.add(np.ascontiguousarray(block))
                module.write_index(index, str(tmp / FAISS_FILE))
            except RuntimeError as exc:
                raise RuntimeFailure(f"{output}: faiss failed: {one_line(exc)}") from None
            files["index"] = FAISS_FILE
        elif storage == "lancedb":
            _write_table(module, tmp, seen(), gate, dim, recipe)
            files["table"] = TABLE
        if gate is not None and storage != "lancedb":
            np.save(tmp / GATE_FILE, np.asarray(gate, dtype=bool))
            files["gate"] = GATE_FILE
        recipe.update(fingerprint=picked.digest(), files=files)
        try:
            (tmp / RECIPE_FILE).write_text(json.dumps(jsonable(recipe), indent=2) + "\n", encoding="utf-8")
            write_manifest(tmp)
        except OSError as exc:
            raise RuntimeFailure(f"{output}: write failed: {exc.strerror or one_line(exc)}") from None
    return recipe


def _write_npy(path: Path, blocks, shape: tuple[int, int], output) -> None:
    """A float32 .npy file written block by block through a plain file, its space reserved first
    (a memory map would die of SIGBUS on a full disk)."""
    dtype = np.dtype(np.float32)
    with open(path, "xb") as file:
        np.lib.format.write_array_header_1_0(file, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                    "fortran_order": False, "shape": shape})
        start = file.tell()
        row_bytes = shape[1] * dtype.itemsize
        reserve(output, file.fileno(), start + shape[0] * row_bytes)
        for r0, block in blocks:
            file.seek(start + r0 * row_bytes)
            file.write(np.ascontiguousarray(block, dtype=dtype))


def _write_attrs(attrs, recipe: dict) -> None:
    attrs["recipe"] = json.dumps(jsonable(recipe), sort_keys=True)
    for name in ATTR_FIELDS:
        value = recipe.get(name)
        if value is not None:
            attrs[name] = value


def _write_table(lancedb, where: Path, blocks, gate, dim: int, recipe: dict) -> None:
    import pyarrow as pa  # lancedb's own dependency

    fields = [pa.field("id", pa.int64()), pa.field("vector", pa.list_(pa.float32(), dim))]
    if gate is not None:
        fields.append(pa.field("gate", pa.bool_()))
    schema = pa.schema(fields, metadata={"qbnorm_uuid": recipe["uuid"], "qbnorm_method": str(recipe.get("method"))})

    def batches():
        for r0, block in blocks:
            ids = np.arange(r0, r0 + len(block), dtype=np.int64)
            columns = [pa.array(ids), pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), dim)]
            if gate is not None:
                columns.append(pa.array(np.asarray(gate[r0:r0 + len(block)], dtype=bool)))
            yield pa.record_batch(columns, schema=schema)

    try:
        lancedb.connect(str(where)).create_table(TABLE, data=batches(), schema=schema)
    except (OSError, RuntimeError, ValueError) as exc:
        raise RuntimeFailure(f"{where}: lancedb failed: {one_line(exc)}") from None


# --- integrity: the manifest of a directory export -------------------------------------------------

def _digest(path: Path) -> str:
    """sha256 of a file, read once in large steps."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_BUFFER)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
            check_interrupt()
    return digest.hexdigest()


def _manifest_digest(files: dict) -> str:
    """The manifest's own checksum: sha256 of its file list in canonical JSON."""
    text = json.dumps({"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": files}, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _export_files(root: Path) -> list[str]:
    """Every file of an export directory but the manifest, relative, '/'-separated, sorted."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in names:
            relative = Path(folder, name).relative_to(root).as_posix()
            if relative != MANIFEST_FILE:
                found.append(relative)
    return sorted(found)


def write_manifest(root: Path) -> None:
    """manifest.json: the size and sha256 of every file of a complete export directory, and the
    manifest's own sha256; written last, once every other file is complete."""
    files = {}
    for relative in _export_files(root):
        file = root / relative
        files[relative] = {"bytes": file.stat().st_size, "sha256": _digest(file)}
    manifest = {"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": files,
                "manifest_sha256": _manifest_digest(files)}
    (root / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def verify_manifest(path: str) -> None:
    """Compare an export directory with its manifest before anything of it is read: DataError
    naming the file and what is wrong (missing, a link, another size or content, a file the
    manifest does not list inside the table's directory)."""
    root = Path(path)
    where = root / MANIFEST_FILE
    damaged = f"the export is damaged or was edited: {schemas.INDEX_REMEDY}"
    if not where.is_file() or where.is_symlink():
        raise DataError(f"{where}: missing; every export qbnorm writes ends with one ({damaged})")
    try:
        manifest = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DataError(f"{where}: unreadable ({one_line(exc)}); {damaged}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT
            or manifest.get("algorithm") != "sha256" or not all(
                isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
                for v in files.values())):
        raise DataError(f"{where}: not a qbnorm index manifest; {damaged}")
    if manifest.get("manifest_sha256") != _manifest_digest(files):
        raise DataError(f"{where}: its checksum does not match its contents; {damaged}")
    if RECIPE_FILE not in files:
        raise DataError(f"{where}: does not list {RECIPE_FILE}; {damaged}")
    folders = {relative.partition("/")[0] for relative in files if "/" in relative}
    for relative in _export_files(root):
        if relative not in files and relative.partition("/")[0] in folders:
            raise DataError(f"{root / relative}: not in the export's manifest (added after qbnorm wrote it?); "
                            f"{damaged}")
    for relative, recorded in files.items():
        file = root / relative
        if Path(relative).is_absolute() or ".." in Path(relative).parts:
            raise DataError(f"{where}: lists {relative!r}, outside the export; {damaged}")
        linked = next((p for p in file.relative_to(root).parents if p != Path(".") and (root / p).is_symlink()), None)
        if linked is not None:
            raise DataError(f"{root / linked}: a link (qbnorm writes none); {damaged}")
        try:
            info = os.lstat(file)
        except FileNotFoundError:
            raise DataError(f"{file}: missing (the manifest lists it); {damaged}") from None
        except OSError as exc:
            raise RuntimeFailure(f"{file}: cannot read ({exc.strerror or one_line(exc)})") from None
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"{file}: not a plain file (a link or device; qbnorm writes none); {damaged}")
        if info.st_size != recorded["bytes"]:
            raise DataError(f"{file}: {info.st_size} bytes, the manifest says {recorded['bytes']} (truncated or "
                            f"changed); {damaged}")
        try:
            found = _digest(file)
        except OSError as exc:
            raise RuntimeFailure(f"{file}: cannot read ({exc.strerror or one_line(exc)})") from None
        if found != recorded["sha256"]:
            raise DataError(f"{file}: changed after qbnorm wrote it (sha256 differs from {MANIFEST_FILE}); {damaged}")


# --- reading ---------------------------------------------------------------------------------------

class Export:
    """An export opened for searching: its recipe, activation flags and store."""

    def __init__(self, path: str, recipe: dict, gate, *, vectors: ArrayInput | None = None, faiss_index=None,
                 table=None, h5=None, attrs: dict | None = None):
        self.path, self.recipe, self.gate = path, recipe, gate
        self.vectors, self.faiss_index, self.table, self._h5 = vectors, faiss_index, table, h5
        self.attrs = attrs or {}

    @property
    def storage(self) -> str:
        return self.recipe["storage"]

    @property
    def label(self) -> str:
        return self.path

    @property
    def n_rows(self) -> int:
        return int(self.recipe["gallery_rows"])

    @property
    def dim(self) -> int:
        """The augmented vectors' dimension (the embeddings' + 1)."""
        return int(self.recipe["dim"]) + 1

    def read(self, c0: int, c1: int) -> np.ndarray:
        """Rows c0:c1 of the stored vectors (hdf5, npy), refused if any is not finite."""
        block = self.vectors.read(c0, c1)
        schemas.check_values(self.vectors.label, "the vectors", block, values="finite", r0=c0, rows="item")
        return block

    def describe(self) -> dict:
        return {"path": self.path, "dataset": None, "kind": KIND, "uuid": self.recipe.get("uuid"),
                "storage": self.storage}

    def close(self) -> None:
        if self.vectors is not None:
            self.vectors.close()
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self) -> Export:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _recipe(text: str, where: str) -> dict:
    try:
        recipe = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{where}: not a JSON recipe ({one_line(exc)})") from None
    if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT:
        raise DataError(f"{where}: not a qbnorm index recipe")
    try:
        version = int(recipe.get("format_version", 0))
    except (TypeError, ValueError):
        raise DataError(f"{where}: unreadable format_version") from None
    if version > FORMAT_VERSION:
        raise DataError(f"{where}: format_version {version} is newer than this qbnorm supports ({FORMAT_VERSION}); "
                        f"upgrade qbnorm")
    return schemas.check_recipe(recipe, where)


def open_export(path, *, what: str = "search") -> Export:
    """An export written by `write_export`: an HDF5 file of kind index-vectors, or a directory
    with recipe.json. Refuses a store that does not hold the vectors its recipe describes."""
    path = str(path)
    if os.path.isdir(path):
        return _open_directory(path, what)
    magic = check_readable(path)
    if Path(path).name == FAISS_FILE or magic[:2] in (b"Ix", b"IH", b"Iw"):
        raise DataError(f"{path}: a bare faiss index; pass the export's directory (with its {RECIPE_FILE})")
    h5 = open_qbnorm(path, KIND)
    try:
        layout = schemas.check(h5, KIND, path)  # the recipe's fields, checksums and shapes
        attrs = layout.root_attrs
        recipe = _recipe(attrs.get("recipe", ""), path)
        vectors = dataset_input(h5, path, "/vectors", kind=KIND, layout=layout, owner=False)
        gate = None
        if recipe["gated"]:
            if "/gate" not in h5:
                raise DataError(f"{path}: no dataset /gate; the recipe says the method is gated")
            with reading(f"{path}::/gate", "its values", checksummed=has_checksum(h5["/gate"]),
                         remedy=schemas.INDEX_REMEDY):
                gate = np.asarray(h5["/gate"][()], dtype=bool)
    except BaseException:
        h5.close()
        raise
    export = Export(path, recipe, gate, vectors=vectors, h5=h5, attrs=attrs)
    _check_vectors(export, vectors.shape, path, lambda picks: vectors.read_rows(np.asarray(picks)))
    return export


def _open_directory(path: str, what: str) -> Export:
    recipe_path = os.path.join(path, RECIPE_FILE)
    if not os.path.isfile(recipe_path):
        raise DataError(f"{path}: not a qbnorm index export (no {RECIPE_FILE})")
    verify_manifest(path)
    try:
        text = Path(recipe_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{recipe_path}: cannot read ({one_line(exc)})") from None
    recipe = _recipe(text, recipe_path)
    storage = recipe["storage"]
    if storage not in ("npy", "faiss", "lancedb"):
        raise DataError(f"{recipe_path}: unknown storage {storage!r}")
    gate = None
    if recipe["gated"] and storage != "lancedb":
        gate_path = os.path.join(path, GATE_FILE)
        if not os.path.isfile(gate_path):
            raise DataError(f"{path}: no {GATE_FILE}; the recipe says the method is gated")
        gate = np.asarray(open_npy(gate_path))
        if gate.shape != (int(recipe["gallery_rows"]),) or gate.dtype != bool:
            raise DataError(f"{gate_path}: expected ({recipe['gallery_rows']},) bool flags, got {gate.shape} "
                            f"{gate.dtype}")
    if storage == "npy":
        file = os.path.join(path, VECTORS_FILE)
        vectors = open_array(file)
        export = Export(path, recipe, gate, vectors=vectors)
        _check_vectors(export, vectors.shape, file, lambda picks: vectors.read_rows(np.asarray(picks)))
        return export
    if storage == "faiss":
        faiss = need("faiss", f"{what} on a faiss index")
        file = os.path.join(path, FAISS_FILE)
        check_readable(file)
        try:
            index = faiss.read_index(file)
        except RuntimeError as exc:
            raise DataError(f"{file}: cannot read the faiss index ({one_line(exc)})") from None
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise DataError(f"{file}: the index does not use the inner-product metric")
        export = Export(path, recipe, gate, faiss_index=index)
        _check_vectors(export, (index.ntotal, index.d), file, faiss_rows(faiss, index))
        return export
    lancedb = need("lancedb", f"{what} on a LanceDB table")
    try:
        table = lancedb.connect(path).open_table(TABLE)
        rows = table.count_rows()
        schema = table.schema
    except Exception as exc:  # lance's errors have no common type; a damaged table is bad input
        raise DataError(f"{path}: cannot open the LanceDB table {TABLE!r} ({one_line(exc)})") from None
    where = f"{path} (LanceDB table {TABLE})"
    vector = schema.field("vector").type if "vector" in schema.names else None
    width = getattr(vector, "list_size", None)
    export = Export(path, recipe, None, table=table)
    _check_shape(export, (rows, width), where)
    uuid = (schema.metadata or {}).get(b"qbnorm_uuid", b"").decode()
    if uuid != recipe.get("uuid"):
        raise DataError(f"{where}: written by another export than {recipe_path} describes (uuid differs)")
    if recipe["gated"]:
        if "gate" not in schema.names:
            raise DataError(f"{where}: no gate column; the recipe says the method is gated")
        try:
            export.gate = lance_gate(table, rows)
        except Exception as exc:
            raise DataError(f"{where}: cannot read the gate column ({one_line(exc)})") from None
    return export


def _check_shape(export: Export, shape, where: str) -> None:
    want = (export.n_rows, export.dim)
    if tuple(shape) != want:
        raise DataError(f"{where} holds {shape[0]} vectors of dimension {shape[1]}, but its recipe describes "
                        f"{want[0]} of {want[1]} (the index of another gallery?)")


def _check_vectors(export: Export, shape, where: str, read_rows) -> None:
    _check_shape(export, shape, where)
    want = export.recipe.get("fingerprint")
    if want is None or read_rows is None:
        return
    if fingerprint(read_rows, export.n_rows) != want:
        raise DataError(f"{where} holds other vectors than its recipe describes (the index of another gallery "
                        f"or setting?); export again")


def faiss_rows(faiss, index):
    """read_rows(list) → the stored vectors of an index that keeps them exactly, else None."""
    inner = faiss.downcast_index(index)
    exact = (faiss.IndexFlat, faiss.IndexHNSWFlat, faiss.IndexIVFFlat)
    if not isinstance(inner, exact):
        return None
    if isinstance(inner, faiss.IndexIVFFlat):
        inner.make_direct_map()

    def read(picks):
        return np.stack([index.reconstruct(int(i)) for i in picks]) if len(picks) else np.zeros((0, index.d))

    return read


def faiss_block(index, c0: int, c1: int) -> np.ndarray:
    """Rows c0:c1 of an exact index's vectors (float32)."""
    return np.asarray(index.reconstruct_n(c0, c1 - c0), dtype=np.float32)


def faiss_parameters(faiss, index, nprobe: int | None, ef_search: int | None):
    """Per-search parameters of an approximate index (None for exact ones or when not given)."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW) and ef_search is not None:
        return faiss.SearchParametersHNSW(efSearch=int(ef_search))
    if isinstance(inner, faiss.IndexIVF) and nprobe is not None:
        return faiss.SearchParametersIVF(nprobe=int(nprobe))
    return None


SMALL_BATCH = 16  # fewer queries than this: faiss's scan one query at a time is the faster


def faiss_blas_rows(faiss, index) -> int:
    """The fewest queries an exact faiss index searches as one matrix product (0: not exact).
    Below it faiss scans the vectors once per query (nq · d < distance_compute_blas_threshold:
    250 queries at d = 513 in faiss 1.15), ~15× slower per query than its product: the few rows a
    dynamic gate sends to the second search would cost 40 % of the first's."""
    if not isinstance(faiss.downcast_index(index), faiss.IndexFlat):
        return 0
    return int(faiss.cvar.distance_compute_blas_threshold) // max(1, index.d) + 1


def faiss_search(index, params, x: np.ndarray, k: int, blas_rows: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """index.search, with a batch of SMALL_BATCH to `blas_rows` queries padded to `blas_rows` (the
    last query repeated) so that faiss takes its matrix-product path; padding rows are dropped."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    padded = SMALL_BATCH <= n < blas_rows
    if padded:
        x = np.concatenate([x, np.repeat(x[-1:], blas_rows - n, axis=0)])
    try:
        values, indices = index.search(x, k, params=params)
    except RuntimeError as exc:
        raise RuntimeFailure(f"faiss search failed: {one_line(exc)}") from None
    return (values[:n], indices[:n]) if padded else (values, indices)


LANCE_BATCH = 1024  # queries per LanceDB request


def lance_gate(table, rows: int) -> np.ndarray:
    """The activation flags of a LanceDB table's gate column."""
    flagged = table.search().where("gate").select(["id"]).limit(rows).to_arrow()
    gate = np.zeros(rows, dtype=bool)
    gate[np.asarray(flagged["id"].to_numpy(), dtype=np.int64)] = True
    return gate


def lance_vectors(table, c0: int, c1: int) -> np.ndarray:
    """Rows c0:c1 of a LanceDB table's vectors (float32), in id order."""
    found = table.search().where(f"id >= {int(c0)} AND id < {int(c1)}").select(["id", "vector"]).limit(c1 - c0) \
        .to_arrow()
    ids = np.asarray(found["id"].to_numpy(), dtype=np.int64)
    vectors = found["vector"].combine_chunks()
    block = np.asarray(vectors.values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(ids), -1)
    out = np.empty((c1 - c0, block.shape[1]), dtype=np.float32)
    out[ids - c0] = block
    return out


def lance_search(table, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """LanceDB's own search with its dot metric (its _distance is 1 − ⟨x, y⟩): (⟨x, y⟩, ids), −1 where
    it returned fewer than k."""
    values = np.full((len(x), k), -np.inf)
    ids = np.full((len(x), k), -1, dtype=np.int64)
    for a in range(0, len(x), LANCE_BATCH):
        part = x[a:a + LANCE_BATCH]
        try:
            found = (table.search([row for row in part]).distance_type("dot").limit(k)
                     .select(["id", "_distance"]).to_arrow())
        except (OSError, RuntimeError, ValueError) as exc:
            raise RuntimeFailure(f"LanceDB search failed: {one_line(exc)}") from None
        query = (np.asarray(found["query_index"].to_numpy(), dtype=np.int64) if "query_index" in found.column_names
                 else np.zeros(found.num_rows, dtype=np.int64))
        item = np.asarray(found["id"].to_numpy(), dtype=np.int64)
        dot = 1.0 - np.asarray(found["_distance"].to_numpy(), dtype=np.float64)
        order = np.lexsort((item, -dot, query))
        query, item, dot = query[order], item[order], dot[order]
        slot = np.arange(query.size) - np.searchsorted(query, query)
        keep = slot < k
        values[a + query[keep], slot[keep]] = dot[keep]
        ids[a + query[keep], slot[keep]] = item[keep]
    return values, ids


def check_storage(storage: str, index_type: str) -> None:
    if storage not in STORAGES:
        raise UsageError(f"{param('format')} {storage!r}: choose one of {', '.join(STORAGES)}")
    if index_type not in INDEX_TYPES:
        raise UsageError(f"{param('index_type')} {index_type!r}: choose one of {', '.join(INDEX_TYPES)}")
    if index_type != "flat" and storage != "faiss":
        raise UsageError(f"{param('index_type')} {index_type}: approximate indexes are built with "
                         f"{param('format=faiss')}")
