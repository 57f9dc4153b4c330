"""The classic reducers' cost against dis (issue 26): `qbnorm normalise --top-k` with ls, nicdm, dsl
and mp (gauss) against the same command with dis, on the same embeddings and one probe.

    python -m benchmarks.classic [--queries 10000] [--gallery 100000] [--bank 10000] [--dim 512]
                                 [--top-k 100] [--repeat 3] [--keep DIR]

The issue's targets at 10k queries × 100k gallery × 512, top-100: ls, nicdm and dsl within 1.1× of
dis, mp within 2×. Every command runs as a subprocess at the same nice level; each repeat times
dis and every method interleaved (dis, methods, dis, methods reversed), and a method's ratio is
the median of its per-repeat ratios against the mean of that repeat's two dis runs, so a slow
moment of a shared machine hits both sides. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

METHODS = (("ls", ()), ("nicdm", ()), ("dsl", ()), ("mp", ("--mp", "gauss")))
BASELINE = ("dis", ())


def clustered(rng, n: int, centres: np.ndarray, dim: int) -> np.ndarray:
    """Unit rows around a few centres: some items are hubs, as in real embeddings."""
    x = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, dim), dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write(path: Path, rows: np.ndarray) -> str:
    with h5py.File(path, "w") as h5:
        h5["embeddings"] = rows
    return str(path)


def qbnorm(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qbnorm_cli", *args, "--quiet"], check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--bank", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", help="write the data and outputs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    work = Path(args.keep or tempfile.mkdtemp(prefix="qbnorm-classic-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    centres = 3 * rng.standard_normal((16, args.dim), dtype=np.float32) / np.sqrt(args.dim) * 4
    queries = write(work / "q.h5", clustered(rng, args.queries, centres, args.dim))
    gallery = write(work / "g.h5", clustered(rng, args.gallery, centres, args.dim))
    bank = write(work / "b.h5", clustered(rng, args.bank, centres, args.dim))
    probe = str(work / "p.h5")
    probe_seconds = qbnorm("probe", "--bank", bank, "--gallery", gallery, "--topk-mean", "10",
                           *[a for name, _ in METHODS for a in ("--method", name)], "-o", probe, "--force")

    def normalise(method: str, extra) -> float:
        return qbnorm("normalise", "--queries", queries, "--gallery", gallery, "--probe", probe, "--method", method,
                      *extra, "--top-k", str(args.top_k), "-o", str(work / f"{method}.h5"), "--force")

    times: dict[str, list[float]] = {name: [] for name, _ in (BASELINE, *METHODS)}
    ratios: dict[str, list[float]] = {name: [] for name, _ in METHODS}
    for _ in range(args.repeat):
        first = normalise(*BASELINE)
        mine = {name: normalise(name, extra) for name, extra in METHODS}
        last = normalise(*BASELINE)
        for name, extra in reversed(METHODS):  # the second half in reverse order (ABBA)
            mine[name] = (mine[name] + normalise(name, extra)) / 2
        base = (first + last) / 2
        times["dis"] += [first, last]
        for name, seconds in mine.items():
            times[name].append(seconds)
            ratios[name].append(seconds / base)
    print(json.dumps({
        "shape": {"queries": args.queries, "gallery": args.gallery, "bank": args.bank, "dim": args.dim,
                  "top_k": args.top_k}, "cpus": os.cpu_count(), "probe_seconds": probe_seconds,
        "seconds": {name: statistics.median(t) for name, t in times.items()},
        "ratio_to_dis": {name: statistics.median(r) for name, r in ratios.items()},
        "targets": {"ls": 1.1, "nicdm": 1.1, "dsl": 1.1, "mp": 2.0},
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
