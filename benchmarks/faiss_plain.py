"""The baselines of `qbnorm search`: plain faiss indexes of the raw gallery, searched as a user
would (read the index and the queries, L2-normalise them, search, write the top-k).

    python -m benchmarks.faiss_plain build GALLERY.h5 OUT.faiss [--hnsw M EF_CONSTRUCTION EF_SEARCH | --ivf NPROBE]
    python -m benchmarks.faiss_plain search INDEX.faiss QUERIES.h5 K OUT.h5 [--exact FLAT.faiss --sample FRACTION]

build writes IndexFlatIP (or IndexHNSWFlat / IndexIVFFlat with 4·√G lists, inner product) of the
L2-normalised gallery. search prints {"seconds": the run after imports, "search_seconds":
index.search alone}, and with --exact the recall@K of a seeded sample of the queries against the
exact search (not timed).
"""

from __future__ import annotations

import argparse
import json
import time

import faiss
import h5py
import numpy as np


def read(path: str) -> np.ndarray:
    with h5py.File(path, "r", locking=False) as h5:
        rows = np.ascontiguousarray(h5["embeddings"][()], dtype=np.float32)
    faiss.normalize_L2(rows)
    return rows


def build(args) -> dict:
    gallery = read(args.gallery)
    dim, n = gallery.shape[1], gallery.shape[0]
    t0 = time.perf_counter()
    if args.hnsw:
        index = faiss.IndexHNSWFlat(dim, int(args.hnsw[0]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = int(args.hnsw[1]), int(args.hnsw[2])
    elif args.ivf:
        nlist = max(1, min(round(4 * float(np.sqrt(n))), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(gallery[np.sort(np.random.default_rng(0).choice(n, min(n, 256 * nlist), replace=False))])
        index.nprobe = int(args.ivf)
    else:
        index = faiss.IndexFlatIP(dim)
    index.add(gallery)
    built = time.perf_counter() - t0
    faiss.write_index(index, args.out)
    return {"build_seconds": built}


def search(args) -> dict:
    t0 = time.perf_counter()
    index = faiss.read_index(args.index)
    queries = read(args.queries)
    t1 = time.perf_counter()
    scores, neighbors = index.search(queries, args.k)
    searched = time.perf_counter() - t1
    with h5py.File(args.out, "w") as h5:
        h5["neighbors"] = neighbors.astype(np.int32)
        h5["scores"] = scores
    out = {"seconds": time.perf_counter() - t0, "search_seconds": searched}
    if args.exact:
        rows = np.sort(np.random.default_rng(0).choice(len(queries), max(1, int(np.ceil(args.sample * len(queries)))),
                                                       replace=False))
        _, exact = faiss.read_index(args.exact).search(queries[rows], args.k)
        hits = [np.isin(exact[i], neighbors[r]).mean() for i, r in enumerate(rows)]
        out["recall"] = float(np.mean(hits))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.faiss_plain")
    sub = parser.add_subparsers(dest="what", required=True)
    b = sub.add_parser("build")
    b.add_argument("gallery")
    b.add_argument("out")
    kind = b.add_mutually_exclusive_group()
    kind.add_argument("--hnsw", nargs=3)
    kind.add_argument("--ivf")
    s = sub.add_parser("search")
    s.add_argument("index")
    s.add_argument("queries")
    s.add_argument("k", type=int)
    s.add_argument("out")
    s.add_argument("--exact")
    s.add_argument("--sample", type=float, default=0.01)
    args = parser.parse_args(argv)
    print(json.dumps(build(args) if args.what == "build" else search(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
