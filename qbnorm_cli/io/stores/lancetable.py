"""The lancedb store: a directory that is a LanceDB database, table `gallery` (id, vector, gate),
and recipe.json; the table's schema metadata carries the export's uuid. Searched with LanceDB's
own search (an optional extra, imported only here and only when needed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qbnorm_cli.errors import DataError, RuntimeFailure, one_line
from qbnorm_cli.io.atomic import check_space
from qbnorm_cli.io.extras import need
from qbnorm_cli.io.stores.base import DirectoryStore, Export, Writing, check_shape
from qbnorm_cli.io.stores.manifest import RECIPE_FILE

TABLE = "gallery"
LANCE_BATCH = 1024  # queries per LanceDB request


class LanceExport(Export):
    engine = "lancedb"

    def __init__(self, path: str, recipe: dict, gate, table):
        super().__init__(path, recipe, gate)
        self.table = table

    def read(self, c0: int, c1: int) -> np.ndarray:
        return lance_vectors(self.table, c0, c1)

    def search(self, nprobe: int | None, ef_search: int | None):
        table = self.table
        return lambda x, k: lance_search(table, x, k)


class LanceTable(DirectoryStore):
    name, title, extra, engine = "lancedb", "LanceDB", "lancedb", "lancedb"
    keeps_gate = True

    def write_files(self, lancedb, output, tmp: Path, recipe: dict, blocks, gate, how: Writing) -> dict:
        check_space(output, tmp, how.n_rows * how.dim * np.dtype(np.float32).itemsize)
        write_table(lancedb, tmp, blocks, gate, how.dim, recipe)
        return {"table": TABLE}

    def open_files(self, path: str, recipe: dict, gate, what: str) -> Export:
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
        export = LanceExport(path, recipe, None, table)
        check_shape(export, (rows, width), where)
        uuid = (schema.metadata or {}).get(b"qbnorm_uuid", b"").decode()
        if uuid != recipe.get("uuid"):
            raise DataError(f"{where}: written by another export than {os.path.join(path, RECIPE_FILE)} describes "
                            f"(uuid differs)")
        if recipe["gated"]:
            if "gate" not in schema.names:
                raise DataError(f"{where}: no gate column; the recipe says the method is gated")
            try:
                export.gate = lance_gate(table, rows)
            except Exception as exc:
                raise DataError(f"{where}: cannot read the gate column ({one_line(exc)})") from None
        return export


def write_table(lancedb, where: Path, blocks, gate, dim: int, recipe: dict) -> None:
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
