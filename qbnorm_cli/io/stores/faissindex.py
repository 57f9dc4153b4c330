"""The faiss store: a directory of index.faiss (faiss.read_index reads it: IndexFlatIP,
IndexHNSWFlat or IndexIVFFlat, inner-product metric), gate.npy and recipe.json; searched with
faiss (an optional extra, imported only here and only when needed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qbnorm_cli.errors import DataError, RuntimeFailure, one_line
from qbnorm_cli.io.atomic import check_space
from qbnorm_cli.io.extras import need
from qbnorm_cli.io.hdf5 import check_readable
from qbnorm_cli.io.schemas import INDEX_TYPES
from qbnorm_cli.io.stores.base import DirectoryStore, Export, IndexOptions, Writing, check_vectors

FAISS_FILE = "index.faiss"
FAISS_MAGIC = (b"Ix", b"IH", b"Iw")  # how faiss's index files begin (flat, HNSW, IVF)
SMALL_BATCH = 16  # fewer queries than this: faiss's scan one query at a time is the faster


class FaissExport(Export):
    engine = "faiss"

    def __init__(self, path: str, recipe: dict, gate, index, faiss):
        super().__init__(path, recipe, gate)
        self.index, self.faiss = index, faiss
        self.rows = faiss_rows(faiss, index)  # None: an index that does not keep the vectors exactly

    @property
    def exact(self) -> bool:
        return self.rows is not None

    def read(self, c0: int, c1: int) -> np.ndarray:
        return faiss_block(self.index, c0, c1)

    def search(self, nprobe: int | None, ef_search: int | None):
        index = self.index
        params = faiss_parameters(self.faiss, index, nprobe, ef_search)
        blas_rows = faiss_blas_rows(self.faiss, index)
        return lambda x, k: faiss_search(index, params, x, k, blas_rows)


class FaissIndex(DirectoryStore):
    name, title, extra, engine, index_types = "faiss", "faiss", "faiss", "faiss", INDEX_TYPES

    def index(self, options: IndexOptions, n_rows: int) -> dict | None:
        return options.describe(n_rows)

    def write_files(self, faiss, output, tmp: Path, recipe: dict, blocks, gate, how: Writing) -> dict:
        check_space(output, tmp, how.n_rows * how.dim * np.dtype(np.float32).itemsize)
        recipe["index"] = self.index(how.options, how.n_rows)
        index = build_index(faiss, how.options, how.dim, how.n_rows)
        try:
            if not index.is_trained:
                index.train(np.ascontiguousarray(how.train(), dtype=np.float32))
            for _, block in blocks:
                index.add(np.ascontiguousarray(block))
            faiss.write_index(index, str(tmp / FAISS_FILE))
        except RuntimeError as exc:
            raise RuntimeFailure(f"{output}: faiss failed: {one_line(exc)}") from None
        return {"index": FAISS_FILE}

    def open_files(self, path: str, recipe: dict, gate, what: str) -> Export:
        faiss = need("faiss", f"{what} on a faiss index")
        file = os.path.join(path, FAISS_FILE)
        check_readable(file)
        try:
            index = faiss.read_index(file)
        except RuntimeError as exc:
            raise DataError(f"{file}: cannot read the faiss index ({one_line(exc)})") from None
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise DataError(f"{file}: the index does not use the inner-product metric")
        export = FaissExport(path, recipe, gate, index, faiss)
        check_vectors(export, (index.ntotal, index.d), file, export.rows)
        return export

    def alone(self, path: str, magic: bytes) -> str | None:
        if Path(path).name == FAISS_FILE or magic[:2] in FAISS_MAGIC:
            return "a bare faiss index"
        return None

    def memory_search(self, read, n_rows: int, dim: int, what: str):
        """An exact faiss index of the stored vectors, built in memory 64 MiB at a time."""
        faiss = need("faiss", what)
        index = faiss.IndexFlatIP(dim)
        step = max(1, (64 << 20) // (4 * dim))
        for c0 in range(0, n_rows, step):
            index.add(np.ascontiguousarray(read(c0, min(n_rows, c0 + step))))
        blas_rows = faiss_blas_rows(faiss, index)
        return lambda x, k: faiss_search(index, None, x, k, blas_rows)


def build_index(faiss, options: IndexOptions, dim: int, n_rows: int):
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
