"""What a transposed read costs, by storage layout (docs/performance.md, "Reading scores transposed").

    python -m benchmarks.transposed_io [--tiny] [--rows R] [--cols C] [--keep DIR]

Writes one R × C float32 matrix (default 16,000 × 4,000 = 256 MB) as .npy and as HDF5 contiguous,
chunked by whole rows of 1 MiB (qbnorm's outputs) and chunked in 256 × 256 tiles; reads each, from
the page cache, by its stored rows in order (the baseline) and through io.specs.Transposed as the
engines do (as-read row blocks) with the panels of a 1 GiB and a 16 MiB budget; then writes a
transposed copy with `convert --transpose` and reads it back both ways. Prints seconds per read.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

import qbnorm_cli
from qbnorm_cli.io.specs import Transposed

BUDGETS = (("1GiB", 128 << 20, 128), ("16MiB", 2 << 20, 32))  # label, panel (1/8), as-read rows per request


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def read_rows(ds, n: int, step: int = 1024) -> None:
    for r0 in range(0, n, step):
        np.array(ds[r0:r0 + step])


def read_transposed(ds, panel: int, step: int) -> None:
    view = Transposed(ds, panel)
    for r0 in range(0, view.shape[0], step):
        view[r0:r0 + step]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transposed_io", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a 600 × 300 matrix (the smoke test)")
    parser.add_argument("--rows", type=int, default=16000)
    parser.add_argument("--cols", type=int, default=4000)
    parser.add_argument("--keep", metavar="DIR")
    args = parser.parse_args(argv)
    rows, cols = (600, 300) if args.tiny else (args.rows, args.cols)
    work = Path(args.keep or tempfile.mkdtemp(prefix="qbnorm-tio-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data = rng.standard_normal((rows, cols)).astype(np.float32)
    np.save(work / "m.npy", data)
    layouts = {"contiguous": None, "rows": (max(1, min(rows, (1 << 20) // (4 * cols))), cols),
               "tiles": (min(rows, 256), min(cols, 256))}
    for name, chunks in layouts.items():
        with h5py.File(work / f"{name}.h5", "w") as h5:
            h5.create_dataset("s", data=data, chunks=chunks)
    del data
    print(f"{rows:,} × {cols:,} float32 ({rows * cols * 4 / 2**20:.0f} MiB), from the page cache")
    results = {}
    try:
        for name in ("npy", *layouts):
            path = work / ("m.npy" if name == "npy" else f"{name}.h5")
            warm(path)
            with h5py.File(path, "r") if name != "npy" else open(path, "rb") as handle:
                ds = np.load(path, mmap_mode="r") if name == "npy" else handle["s"]
                line = {"rows": timed(lambda ds=ds: read_rows(ds, rows))}
                for label, panel, step in BUDGETS:
                    line[label] = timed(lambda ds=ds, panel=panel, step=step: read_transposed(ds, panel, step))
            results[name] = line
            print(f"   {name:10s} stored rows in order {line['rows']:7.2f} s   transposed: "
                  + "   ".join(f"{label} budget {line[label]:7.2f} s" for label, _, _ in BUDGETS), flush=True)
        copy = work / "copy.h5"
        seconds = timed(lambda: qbnorm_cli.convert(f"{work}/contiguous.h5::/s", copy, kind="similarity",
                                                   transpose=True, force=True))
        plain = timed(lambda: qbnorm_cli.convert(f"{work}/contiguous.h5::/s", work / "plain.h5", kind="similarity",
                                                 force=True))
        warm(copy)
        with h5py.File(copy, "r") as h5:
            ds = h5["scores"]
            by_rows = timed(lambda: read_rows(ds, cols))
            flipped = timed(lambda: read_transposed(ds, BUDGETS[1][1], BUDGETS[1][2]))
            chunks = ds.chunks
        print(f"   convert --transpose {seconds:7.2f} s (plain convert {plain:7.2f} s); the copy, chunks {chunks}: "
              f"by rows {by_rows:7.2f} s, transposed (16MiB budget) {flipped:7.2f} s")
        results["convert"] = {"transpose_s": seconds, "plain_s": plain, "copy_rows_s": by_rows,
                              "copy_transposed_s": flipped}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
