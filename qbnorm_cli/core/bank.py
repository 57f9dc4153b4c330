"""Querybank sampling (QB-Norm Sec. 3.2: the bank is a sample of training queries)."""

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
