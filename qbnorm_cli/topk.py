"""Exact, deterministic per-row top-k selection, mergeable across column blocks.

Ties are broken towards the lower column index, so results never depend on how the columns were
split into blocks. Unfilled slots hold value −inf and index −1.
"""

from __future__ import annotations

import numpy as np


def empty(rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((rows, k), -np.inf), np.full((rows, k), -1, dtype=np.int64)


def _rank(rows: np.ndarray, idx: np.ndarray, vals: np.ndarray, n_rows: int, k: int):
    """Place flat candidates (row, index, value) into (n_rows, k) arrays, best first."""
    order = np.lexsort((idx, -vals, rows))
    rows, idx, vals = rows[order], idx[order], vals[order]
    starts = np.searchsorted(rows, np.arange(n_rows))
    pos = np.arange(rows.size) - starts[rows]
    keep = pos < k
    out_vals, out_idx = empty(n_rows, k)
    out_vals[rows[keep], pos[keep]] = vals[keep]
    out_idx[rows[keep], pos[keep]] = idx[keep]
    return out_vals, out_idx


def select(values: np.ndarray, k: int, col_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The k largest values of each row of `values` and their column indices (+ col_offset)."""
    n_rows, n_cols = values.shape
    if n_cols > k:
        # Everything at or above each row's k-th largest value: k candidates, more only on ties.
        kth = np.partition(values, n_cols - k, axis=1)[:, n_cols - k]
        rows, cols = np.nonzero(values >= kth[:, None])
    else:
        rows, cols = np.divmod(np.arange(values.size), n_cols)
    return _rank(rows, cols + col_offset, values[rows, cols].astype(np.float64), n_rows, k)


def merge(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], k: int):
    """Top-k of the union of two (values, indices) candidate sets, row by row."""
    vals = np.concatenate([a[0], b[0]], axis=1)
    idx = np.concatenate([a[1], b[1]], axis=1)
    real = idx >= 0
    rows = np.nonzero(real)[0]
    return _rank(rows, idx[real], vals[real], vals.shape[0], k)


class RunningTopK:
    """Per-row top-k over column blocks visited in any order (update with each tile)."""

    def __init__(self, rows: int, k: int) -> None:
        self.k = k
        self.values, self.indices = empty(rows, k)

    def update(self, r0: int, tile: np.ndarray, col_offset: int) -> None:
        r1 = r0 + tile.shape[0]
        current = (self.values[r0:r1], self.indices[r0:r1])
        vals, idx = merge(current, select(tile, self.k, col_offset), self.k)
        self.values[r0:r1], self.indices[r0:r1] = vals, idx


class RunningArgmax:
    """Per-row maximum and its (lowest) column index, over column blocks visited left to right."""

    def __init__(self, rows: int) -> None:
        self.values = np.full(rows, -np.inf)
        self.indices = np.full(rows, -1, dtype=np.int64)

    def update(self, r0: int, tile: np.ndarray, col_offset: int) -> None:
        r1 = r0 + tile.shape[0]
        arg = np.argmax(tile, axis=1)
        best = tile[np.arange(tile.shape[0]), arg]
        better = best > self.values[r0:r1]
        self.values[r0:r1] = np.where(better, best, self.values[r0:r1])
        self.indices[r0:r1] = np.where(better, arg + col_offset, self.indices[r0:r1])
