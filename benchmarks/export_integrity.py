"""What checking an index export costs when `search` opens it (issue 24, item 10). Standalone:

    python benchmarks/export_integrity.py [--gallery 100000 --dim 512 --queries 1000 --repeat 3 | --tiny]

Random embeddings, a probe and a dis export of each store (hdf5, npy, faiss when installed) in a
temporary directory; then, best of --repeat, interleaved: `open_export` with its checks, the same
with the manifest check left out (io/indexfile.verify_manifest replaced by nothing), the manifest
check alone, and a whole `search` of the queries (top-10, the open included). Prints seconds and
the check's share of the search.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np

import qbnorm_cli
from qbnorm_cli.io import indexfile


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--bank", type=int, default=2_000)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a few thousand rows: does it run")
    args = parser.parse_args()
    if args.tiny:
        args.gallery, args.dim, args.bank, args.queries, args.repeat = 3_000, 32, 500, 100, 1
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="qbnorm-export-integrity-") as tmp:
        work = Path(tmp)
        for name, rows in (("gallery", args.gallery), ("bank", args.bank), ("queries", args.queries)):
            np.save(work / f"{name}.npy", rng.standard_normal((rows, args.dim)).astype(np.float32))
        qbnorm_cli.probe(str(work / "bank.npy"), str(work / "gallery.npy"), output=str(work / "probe.h5")).close()
        stores = ["hdf5", "npy"] + (["faiss"] if importlib.util.find_spec("faiss") else [])
        print(f"gallery {args.gallery} × {args.dim}, {args.queries} queries, best of {args.repeat}")
        for store in stores:
            out = work / ("e.h5" if store == "hdf5" else f"e-{store}")
            qbnorm_cli.export(str(work / "probe.h5"), str(work / "gallery.npy"), method="dis", format=store,
                              output=str(out))
            measure(store, out, work / "queries.npy", args.repeat)


def measure(store: str, out: Path, queries: Path, repeat: int) -> None:
    verify = indexfile.verify_manifest
    checked = best(lambda: indexfile.open_export(out).close(), repeat)
    indexfile.verify_manifest = lambda path: None
    try:
        unchecked = best(lambda: indexfile.open_export(out).close(), repeat)
    finally:
        indexfile.verify_manifest = verify
    manifest = best(lambda: verify(str(out)), repeat) if out.is_dir() else 0.0
    search = best(lambda: qbnorm_cli.search(str(out), str(queries), top_k=10), repeat)
    mib = size_of(out) / 2**20
    rate = f" ({mib / manifest:.0f} MiB/s)" if manifest else ""
    print(f"{store:6} {mib:8.1f} MiB  open {checked:7.3f} s, without the manifest {unchecked:7.3f} s, "
          f"the manifest alone {manifest:7.3f} s{rate}; search {search:7.3f} s "
          f"(the manifest: {100 * manifest / search:.0f}% of it)", flush=True)


if __name__ == "__main__":
    main()
