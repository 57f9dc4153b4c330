"""The npy store: a directory of vectors.npy (G, d+1) float32, gate.npy and recipe.json, for tools
that speak neither HDF5 nor faiss (every vector database's client loads a float32 .npy)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qbnorm_cli.io.atomic import reserve
from qbnorm_cli.io.specs import open_array
from qbnorm_cli.io.stores.base import DirectoryStore, Export, VectorsExport, Writing, check_vectors

VECTORS_FILE = "vectors.npy"


class NpyDirectory(DirectoryStore):
    name, title = "npy", "npy"

    def write_files(self, module, output, tmp: Path, recipe: dict, blocks, gate, how: Writing) -> dict:
        write_npy(tmp / VECTORS_FILE, blocks, (how.n_rows, how.dim), output)
        return {"vectors": VECTORS_FILE}

    def open_files(self, path: str, recipe: dict, gate, what: str) -> Export:
        file = os.path.join(path, VECTORS_FILE)
        vectors = open_array(file)
        export = VectorsExport(path, recipe, gate, vectors)
        check_vectors(export, vectors.shape, file, lambda picks: vectors.read_rows(np.asarray(picks)))
        return export


def write_npy(path: Path, blocks, shape: tuple[int, int], output) -> None:
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
