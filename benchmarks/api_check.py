"""The library against the CLI on the shared Multi30k data (issue 14): DIS and CSLS R@1 through
qbnorm_cli.evaluate from specs and from arrays, and the API's DIS top-10 against
`qbnorm normalise --top-k 10`'s /neighbors. Exits 1 when a figure is off.

    python -m benchmarks.api_check [DATA.h5]     (from the repository's root)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

import qbnorm_cli

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "multi30k-de2en-e5.h5"
EXPECTED = {"none": 29.58, "dis": 32.36, "csls": 33.28}


def r1(scores, gt) -> float:
    return round(qbnorm_cli.evaluate(scores, gt)["metrics"]["R@1"], 2)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    data = argv[0] if argv else str(DATA)
    start = time.perf_counter()
    failures = []
    probe = qbnorm_cli.probe(f"{data}::/train_queries", f"{data}::/gallery", betas=[20], k=1)  # specs in
    for method, want in EXPECTED.items():
        got = r1(qbnorm_cli.normalise(f"{data}::/queries", f"{data}::/gallery", probe, method=method), f"{data}::/gt")
        print(f"specs:  {method:5s} R@1 {got:.2f} (expected {want:.2f})")
        failures += [method] if got != want else []
    with h5py.File(data, "r") as f:
        queries, gallery, bank, gt = (f[n][()] for n in ("queries", "gallery", "train_queries", "gt"))
    probe = qbnorm_cli.probe(bank, gallery, betas=[20], k=1)  # arrays in
    top = qbnorm_cli.normalise(queries, gallery, probe, method="dis", top_k=10)
    for method, scores in (("dis", top), ("csls", qbnorm_cli.normalise(queries, gallery, probe, method="csls"))):
        got = r1(scores, gt)
        print(f"arrays: {method:5s} R@1 {got:.2f} (expected {EXPECTED[method]:.2f})")
        failures += [f"arrays {method}"] if got != EXPECTED[method] else []
    with tempfile.TemporaryDirectory() as tmp:
        qb = [sys.executable, "-m", "qbnorm_cli"]
        subprocess.run([*qb, "probe", "--bank", f"{data}::/train_queries", "--gallery", f"{data}::/gallery",
                        "--beta", "20", "--k", "1", "-o", f"{tmp}/p.h5", "-q"], check=True)
        subprocess.run([*qb, "normalise", "--queries", f"{data}::/queries", "--gallery", f"{data}::/gallery",
                        "--probe", f"{tmp}/p.h5", "--method", "dis", "--top-k", "10", "-o", f"{tmp}/dis10.h5", "-q"],
                       check=True)
        with h5py.File(f"{tmp}/dis10.h5", "r") as f:
            same = np.array_equal(top.indices, f["neighbors"][()])
    print(f"the API's DIS top-10 equals `qbnorm normalise --top-k 10`'s /neighbors: {same} ({len(top)} rows)")
    failures += [] if same else ["top-10"]
    verdict = "all figures as expected" if not failures else f"OFF: {failures}"
    print(f"{time.perf_counter() - start:.1f} s; {verdict}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
