"""Row samples: querybanks (QB-Norm Sec. 3.2: the bank is a sample of training queries), and rows
spread evenly over a matrix (score statistics, fingerprints)."""

from __future__ import annotations

import numpy as np

STRATEGIES = ("random", "first", "all")


def sample_indices(n_source: int, size: int | None, strategy: str, seed: int) -> np.ndarray:
    """Sorted row indices of the bank: a seeded uniform sample without replacement, the first
    `size` rows, or all rows."""
    if strategy == "all":
        return np.arange(n_source, dtype=np.int64)
    if strategy == "first":
        return np.arange(size, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_source, size=size, replace=False)).astype(np.int64)


def spread(total: int, count: int) -> list[int]:
    """Up to `count` distinct row numbers spread evenly over range(total), ascending, the first
    and last included. Not np.unique: it imports numpy.ma (15 ms of every command's start-up)."""
    picks = np.linspace(0, total - 1, num=min(total, count)).astype(np.int64)
    return list(dict.fromkeys(picks.tolist()))
