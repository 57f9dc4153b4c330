"""What the Fletcher-32 checksums on every dataset qbnorm writes cost (issue 15). Standalone:

    python benchmarks/checksums.py io [--rows 2000 --cols 20000 --repeat 9 | --tiny]
    python benchmarks/checksums.py processes [--queries 2000 --gallery 40000 --dense-gallery 20000
                                              --bank 5000 --dim 512 --repeat 5 --before PATH]

`io`: the filter alone. A float32 dataset is written and read back in row blocks, chunked as
io/atomic.OutputFile chunks it (whole rows, about 1 MiB), with and without the filter, interleaved;
the file lives in /dev/shm when there is one, so the figure is the filter's CPU cost, not a disk's.

`processes`: whole `qbnorm` processes. Variants, each converting its own inputs with its own code
(so that `filter` reads checksummed inputs) and run interleaved: `filter` (this code), `nofilter`
(this code with the filter off, the layout of before, no attribute checksums: its files read as
files written before checksums) and, with --before PATH (a checkout of the code before the
change), `before`. Commands: normalise --top-k 100, normalise dense (writes Q × G float32),
evaluate of that output, probe. Medians of wall time and their ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

CHUNK_BYTES = 1 << 20  # as io/atomic.CHUNK_BYTES

# The `nofilter` variant: this code, its datasets created as before (contiguous under 1 MiB, no
# filter) and no attribute checksums.
NOFILTER = r'''
import sys, h5py, numpy as np
create = h5py.Group.create_dataset
def create_dataset(self, name, shape=None, dtype=None, data=None, chunks=None, fletcher32=False, **kw):
    if data is not None:
        arr = np.asarray(data); shape, dtype = arr.shape, arr.dtype
    dt = np.dtype(dtype)
    chunks = None
    if len(shape) >= 1 and all(shape) and np.prod(shape) * dt.itemsize > (1 << 20):
        row = int(np.prod(shape[1:], dtype=np.int64)) * dt.itemsize
        chunks = (min(shape[0], max(1, (1 << 20) // max(row, 1))), *shape[1:])
    return create(self, name, shape=shape, dtype=dtype, data=data, chunks=chunks, **kw)
h5py.Group.create_dataset = create_dataset
set_attr = h5py.AttributeManager.__setitem__
h5py.AttributeManager.__setitem__ = lambda self, k, v: None if k == "attribute_checksums" else set_attr(self, k, v)
from qbnorm_cli.cli import main
sys.exit(main(sys.argv[1:]))
'''


def filter_io(rows: int, cols: int, repeat: int, block: int) -> dict:
    data = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    chunk_rows = min(rows, max(1, CHUNK_BYTES // (cols * 4)))
    where = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    times = {(op, f): [] for op in ("write", "read") for f in (False, True)}
    for r in range(repeat + 1):  # the first round warms up and is dropped
        for checksum in (False, True) if r % 2 == 0 else (True, False):
            path = os.path.join(where, f"qbnorm-checksum-bench-{os.getpid()}-{checksum}.h5")
            start = time.perf_counter()
            with h5py.File(path, "w", locking=False) as h5:
                ds = h5.create_dataset("x", shape=data.shape, dtype=np.float32, chunks=(chunk_rows, cols),
                                       fletcher32=checksum)
                for i in range(0, rows, block):
                    ds[i:i + block] = data[i:i + block]
            written = time.perf_counter() - start
            start = time.perf_counter()
            with h5py.File(path, "r", locking=False, rdcc_nbytes=16 << 20) as h5:
                for i in range(0, rows, block):
                    h5["x"][i:i + block]
            read = time.perf_counter() - start
            os.unlink(path)
            if r:
                times["write", checksum].append(written)
                times["read", checksum].append(read)
    mb = data.nbytes / 1e6
    print(f"{rows} × {cols} float32 ({mb:.0f} MB), chunks of {chunk_rows} rows, blocks of {block} rows, in {where}; "
          f"{repeat} interleaved repeats, medians")
    out = {}
    for op in ("write", "read"):
        off, on = statistics.median(times[op, False]), statistics.median(times[op, True])
        out[op] = {"without_s": off, "with_s": on, "ms_per_mb": (on - off) / mb * 1000}
        print(f"  {op:5s} without {off:.3f} s, with {on:.3f} s: ratio {on / off:.2f}, filter {on - off:+.3f} s "
              f"({(on - off) / mb * 1000:.2f} ms per MB)")
    return out


def processes(a) -> None:
    work = Path(a.work or tempfile.mkdtemp(prefix="qbnorm-checksums-"))
    work.mkdir(exist_ok=True)
    variants = ["filter", "nofilter"] + (["before"] if a.before else [])

    def qbnorm(variant: str, *args) -> float:
        env = dict(os.environ)
        if variant == "before":
            env["PYTHONPATH"] = a.before
        cmd = [sys.executable, *(["-c", NOFILTER] if variant == "nofilter" else ["-m", "qbnorm_cli"]), *map(str, args)]
        start = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{variant}: qbnorm {' '.join(map(str, args))}: {done.stderr}")
        return time.perf_counter() - start

    rng = np.random.default_rng(0)

    def unit(n):
        x = rng.standard_normal((n, a.dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    raw = work / "raw.h5"
    with h5py.File(raw, "w") as h5:
        h5["queries"], h5["gallery"], h5["bank"] = unit(a.queries), unit(a.gallery), unit(a.bank)
        h5["dense_gallery"] = h5["gallery"][: a.dense_gallery]
        h5["gt"] = rng.integers(0, a.dense_gallery, a.queries)
    for v in variants:
        d = work / v
        d.mkdir(exist_ok=True)
        for name in ("queries", "gallery", "dense_gallery", "bank"):
            qbnorm(v, "convert", f"{raw}::/{name}", "-o", d / f"{name}.h5", "-q", "--force")
        for g in ("gallery", "dense_gallery"):
            qbnorm(v, "probe", "--bank", d / "bank.h5", "--gallery", d / f"{g}.h5", "-o", d / f"probe-{g}.h5", "-q",
                   "--force")
    commands = {
        "normalise --top-k 100": lambda d: ["normalise", "--queries", d / "queries.h5", "--gallery", d / "gallery.h5",
                                            "--probe", d / "probe-gallery.h5", "--top-k", 100, "-o", d / "top.h5"],
        "normalise dense": lambda d: ["normalise", "--queries", d / "queries.h5", "--gallery", d / "dense_gallery.h5",
                                      "--probe", d / "probe-dense_gallery.h5", "-o", d / "dense.h5"],
        "evaluate dense": lambda d: ["evaluate", d / "dense.h5", "--gt", f"{raw}::/gt"],
        "probe": lambda d: ["probe", "--bank", d / "bank.h5", "--gallery", d / "gallery.h5", "-o", d / "p.h5"],
    }
    times = {(c, v): [] for c in commands for v in variants}
    for r in range(a.repeat + 1):  # the first round warms the page cache and is dropped
        for c, make in commands.items():
            for v in variants if r % 2 == 0 else variants[::-1]:
                t = qbnorm(v, *make(work / v), "-q", *(["--force"] if "-o" in make(work / v) else []))
                if r:
                    times[c, v].append(t)
    print(f"Q {a.queries}, G {a.gallery} (dense: {a.dense_gallery}), bank {a.bank}, d {a.dim}: {a.repeat} "
          "interleaved repeats, medians (min–max)")
    for c in commands:
        med = {v: statistics.median(times[c, v]) for v in variants}
        parts = [f"{v} {med[v]:.2f} s ({min(times[c, v]):.2f}–{max(times[c, v]):.2f})" for v in variants]
        parts.append(f"filter/nofilter {med['filter'] / med['nofilter']:.3f}")
        if "before" in med:
            parts.append(f"filter/before {med['filter'] / med['before']:.3f}")
        print(f"  {c:22s} " + "  ".join(parts))
    if not a.work:
        shutil.rmtree(work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    io = sub.add_parser("io")
    io.add_argument("--rows", type=int, default=2000)
    io.add_argument("--cols", type=int, default=20000)
    io.add_argument("--block", type=int, default=256)
    io.add_argument("--repeat", type=int, default=9)
    io.add_argument("--tiny", action="store_true", help="the smoke test's size")
    pr = sub.add_parser("processes")
    for name, default in (("queries", 2000), ("gallery", 40000), ("dense-gallery", 20000), ("bank", 5000),
                          ("dim", 512), ("repeat", 5)):
        pr.add_argument(f"--{name}", type=int, default=default)
    pr.add_argument("--before", help="a checkout of qbnorm before checksums (PYTHONPATH for the `before` variant)")
    pr.add_argument("--work", help="where the data go (default: a new temporary directory)")
    a = ap.parse_args()
    if a.what == "io":
        if a.tiny:
            a.rows, a.cols, a.repeat = 200, 1000, 1
        filter_io(a.rows, a.cols, a.repeat, a.block)
    else:
        processes(a)


if __name__ == "__main__":
    main()
