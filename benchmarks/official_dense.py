"""The official QB-Norm Dynamic Inverted Softmax, dense, as the baseline qbnorm is measured against.

Written from Bogolin et al., "Cross Modal Retrieval with Querybank Normalisation", CVPR 2022,
Algorithm 1 and Sec. 3.4, the way the authors' code applies it to precomputed similarity matrices:
everything in memory as float64, in the exp domain, full-row argsorts for the activation set (the
top-k of every bank query) and for each test query's raw top-1 (the gate), and a division of the
gated rows by the column sums of exp(β·P). It reads the same HDF5 files as `qbnorm` and writes its
scores (float32, like `qbnorm normalise`'s default) and which rows were normalised.

    python -m benchmarks.official_dense --bank-sims BANK.h5 --sims TEST.h5 -o OUT.h5 [--beta 20] [--k 1]

Ties: the argsorts are stable, so ties go to the lower index as in qbnorm (the authors' code uses
numpy's default sort; with real-valued scores the two agree).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import h5py
import numpy as np


def read_matrix(path: str) -> np.ndarray:
    """The file's only 2-D dataset (or /scores), whole, as float64."""
    with h5py.File(path, "r", locking=False) as h5:
        names: list[str] = []
        h5.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and o.ndim == 2 else None)
        name = "scores" if "scores" in names else names[0]
        return h5[name][()].astype(np.float64)


def activation_set(bank: np.ndarray, k: int) -> np.ndarray:
    """Gallery items in the top-k of at least one bank query (full-row argsort)."""
    order = np.argsort(-bank, axis=1, kind="stable")
    return np.unique(order[:, :k])


def qb_norm(bank: np.ndarray, test: np.ndarray, beta: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, normalised rows): exp(β·S)/Σ_i exp(β·P[i, j]) on gated rows, exp(β·S) elsewhere."""
    retrieved = activation_set(bank, k)
    bank_exp = np.exp(bank * beta)
    normalizing_sum = np.sum(bank_exp, axis=0)
    del bank_exp
    test_exp = np.exp(test * beta)
    top1 = np.argsort(-test_exp, axis=1, kind="stable")[:, 0]
    gated = np.isin(top1, retrieved)
    rows = np.nonzero(gated)[0]
    test_exp[rows, :] = np.divide(test_exp[rows, :], normalizing_sum)
    return test_exp, gated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank-sims", required=True, help="bank × gallery similarities (HDF5)")
    parser.add_argument("--sims", required=True, help="test queries × gallery similarities (HDF5)")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--beta", type=float, default=20.0)
    parser.add_argument("--k", type=int, default=1)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    bank = read_matrix(args.bank_sims)
    test = read_matrix(args.sims)
    scores, gated = qb_norm(bank, test, args.beta, args.k)
    with h5py.File(args.output, "w") as h5:
        h5.create_dataset("scores", data=scores.astype(np.float32))
        h5.create_dataset("normalised", data=gated)
    print(json.dumps({"seconds": time.perf_counter() - t0, "normalised": int(gated.sum())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
