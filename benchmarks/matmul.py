"""The physical limit: the bare float32 product of two embedding matrices (numpy/BLAS).

    python -m benchmarks.matmul QUERIES.h5 GALLERY.h5

Reads both (float32 rows), then times only `queries @ gallery.T` and prints {"seconds": …}: the
time of the matrix product `qbnorm normalise` cannot avoid, measured in a process of its own.
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
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "shape": list(product.shape)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
