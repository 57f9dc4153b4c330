"""The physical limit: the bare float32 product of two embedding matrices (numpy/BLAS).

    python -m benchmarks.matmul QUERIES.h5 GALLERY.h5

Reads both (float32 rows), then times the product `queries @ gallery.T` in its own process and
prints {"seconds": …, "allocating_seconds": …}:

* seconds: the product's arithmetic, written into an output whose pages were touched beforehand;
  the best of two runs. This is the floor `qbnorm normalise` is measured against.
* allocating_seconds: `queries @ gallery.T` as written, numpy allocating its output. Its first
  touch of Q × G × 4 bytes of fresh memory is part of it, and on a virtual machine that can cost
  as much as the arithmetic (4 GB at 10k × 100k: 5 s here one run, 9.5 s the next), so it is
  reported beside the floor, never as the floor.
"""

from __future__ import annotations

import json
import sys
import time

import h5py
import numpy as np


def load(path: str) -> np.ndarray:
    with h5py.File(path, "r", locking=False) as h5:
        return np.ascontiguousarray(h5["embeddings"][()], dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    queries, gallery = load(argv[0]), load(argv[1])
    t0 = time.perf_counter()
    product = queries @ gallery.T
    allocating = time.perf_counter() - t0
    shape = list(product.shape)
    product.fill(0)  # the pages are now this process's: later products write without faults
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        np.matmul(queries, gallery.T, out=product)
        runs.append(time.perf_counter() - t0)
    print(json.dumps({"seconds": min(runs), "allocating_seconds": allocating, "runs": runs, "shape": shape}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
