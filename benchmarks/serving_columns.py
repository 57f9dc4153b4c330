"""How the extra column's scale (the query constant c) matters to quantised and graph indexes.

    python -m benchmarks.serving_columns [--tiny] [--json FILE]

On a seeded gallery of low intrinsic dimension (benchmarks/serving.py's `write_structured`:
20,000 items × 255 dimensions + the extra column, 1,000 queries, a 4,000-query bank; --tiny: 2,000 ×
31 + 1), the IS export (β = 20) is indexed by faiss with a uniform 8-bit scalar quantiser (one
range for all dimensions), PQ (8 dimensions per sub-quantiser: the extra column shares its
sub-space with 7 coordinates) and HNSW, for qbnorm's c and for columns 4× and 16× wider or 4×
narrower, for the uncentred column of c = 1, and for qbnorm's column given a PQ sub-space of its
own (zero columns padded around it, zeros in the query too: inner products unchanged; PQ with one
sub-quantiser more). Printed: the column's spread, and recall@10 of each index against the exact
normalised ranking (`normalise --top-k 10`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import faiss
import h5py
import numpy as np

import qbnorm_cli
from benchmarks.serving import write_structured
from qbnorm_cli.core import augmented

SIZES = {"tiny": (2000, 31, 200, 800, 8), "default": (20000, 255, 1000, 4000, 32)}  # G, d, Q, bank, PQ M


def indexes(dim: int, pq: int, name: int | None = None):
    def hnsw():
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = 100, 64
        return index

    return {
        "SQ8 uniform": lambda: faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit_uniform,
                                                          faiss.METRIC_INNER_PRODUCT),
        f"PQ{name or pq}": lambda: faiss.IndexPQ(dim, pq, 8, faiss.METRIC_INNER_PRODUCT),  # no polysemous training
        "HNSW32": hnsw,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving_columns", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    n_gallery, dim, n_queries, n_bank, pq = SIZES["tiny" if args.tiny else "default"]
    faiss.omp_set_num_threads(1)  # HNSW's build is then deterministic
    work = Path(tempfile.mkdtemp(prefix="qbnorm-columns-"))
    paths = {name: str(work / f"{name}.h5") for name in ("gallery", "queries", "bank")}
    write_structured(paths["gallery"], n_gallery, dim, seed=7)
    write_structured(paths["queries"], n_queries, dim, seed=7, near=n_gallery, noise_seed=1)
    write_structured(paths["bank"], n_bank, dim, seed=7, near=n_gallery, noise_seed=2)
    arrays = {}
    for name, path in paths.items():
        with h5py.File(path, "r") as h5:
            arrays[name] = h5["embeddings"][()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qbnorm_cli.QbnormWarning)
        probe = qbnorm_cli.probe(arrays["bank"], arrays["gallery"], betas=[20])
        export = qbnorm_cli.export(probe, arrays["gallery"], method="is")
    recipe, gallery, queries = export.recipe, arrays["gallery"], arrays["queries"]
    c = recipe["constant"]
    shift = -export.vectors[:, -1].astype(np.float64) * c
    column = recipe["extra_column"]
    print(f"IS export of {n_gallery:,} × {dim} + 1: qbnorm's c = {c:g}; offsets/β − m: std {shift.std():.3f}, max "
          f"{np.abs(shift).max():.3f}; gallery coordinates: rms {column['coordinate_rms']:.3f}, largest "
          f"{column['coordinate_max']:.3f}", flush=True)
    exact = qbnorm_cli.normalise(queries, gallery, probe, method="is", top_k=10).indices
    variants = [("qbnorm's c", c, True), ("4× wider (c/4)", c / 4, True), ("16× wider (c/16)", c / 16, True),
                ("4× narrower (4c)", 4 * c, True), ("uncentred, c = 1", 1.0, False), ("own PQ sub-space", c, True)]
    results = []
    sub = (dim + 1) // pq  # dimensions per PQ sub-quantiser
    for name, constant, centred in variants:
        col = -shift / constant if centred else -(shift + recipe["center"] / recipe["scale"]) / constant
        vectors = np.hstack([gallery, col[:, None]]).astype(np.float32)
        q = augmented.with_constant(queries, constant)
        subspaces = pq
        if name == "own PQ sub-space":  # [g, 0 … 0, x, 0 … 0]: g fills whole sub-spaces, x one of its own
            content = -(-dim // sub) * sub
            padded = np.zeros((len(vectors), content + sub), dtype=np.float32)
            padded[:, :dim], padded[:, content] = gallery, col
            queried = np.zeros((len(q), content + sub), dtype=np.float32)
            queried[:, :dim], queried[:, content] = queries, constant
            vectors, q, subspaces = padded, queried, (content + sub) // sub
        line = {"variant": name, "constant": constant, "column_std": float(col.std()),
                "column_max": float(np.abs(col).max())}
        for label, make in indexes(vectors.shape[1], subspaces, pq).items():
            index = make()
            index.train(vectors)
            index.add(vectors)
            _, found = index.search(q, 10)
            line[label] = float(augmented.recall(found, exact).mean())
        results.append(line)
        print(f"   {name:18s} c = {constant:<7g} column std {line['column_std']:.3f} max {line['column_max']:.3f}   "
              + "   ".join(f"{label} {line[label]:.3f}" for label in indexes(dim + 1, pq)), flush=True)
    print(f"   (PQ{pq}: {sub} dimensions per sub-quantiser; the own sub-space variant has one more)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
