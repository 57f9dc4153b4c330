"""Querybank statistics of a gallery, accumulated tile by tile (partial + merge), pure numpy.

P[i, j] = s(b_i, g_j) for bank item i and gallery item j. Per gallery column j:
  log_norm[β, j]   = logsumexp_i(β · P[i, j])            (Inverted Softmax denominator in log
                                                          form; Bogolin et al., CVPR 2022, Eq. 3)
  topk_mean[K, j]  = mean of the K largest P[:, j]       (CSLS r_j, Conneau et al. 2018;
                                                          NNN b_j, Chowdhury et al. 2024)
  sorted scores    = P[:, j] ascending                   (Globally-Corrected ranks, Dinu et al. 2015)
Per bank row i: its kmax highest-scoring gallery items (the DIS activation set, QB-Norm Sec. 3.4).

The gallery is split into column blocks; every column statistic is complete once all bank rows of
a column block have been seen, so only O(block) state is held besides the O(gallery) results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import logsumexp

from qbnorm_cli import topk


def lse_partial(tile: np.ndarray, betas: np.ndarray) -> np.ndarray:
    """logsumexp over the rows of β·tile, for each β: shape (len(betas), tile columns), float64."""
    tile = tile.astype(np.float64, copy=False)
    return np.stack([logsumexp(beta * tile, axis=0) for beta in betas])


def lse_merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Combine two partial log-sum-exps (−inf is the empty partial)."""
    return np.logaddexp(a, b)


def column_topk_partial(tile: np.ndarray, k: int) -> np.ndarray:
    """The min(k, rows) largest values of each column, unordered, float64."""
    tile = tile.astype(np.float64, copy=False)
    if tile.shape[0] <= k:
        return tile
    return np.partition(tile, tile.shape[0] - k, axis=0)[tile.shape[0] - k:]


def column_topk_merge(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    return column_topk_partial(np.concatenate([a, b], axis=0), k)


def column_topk_means(top: np.ndarray, ks) -> np.ndarray:
    """Mean of the K largest values per column for each K (all values when fewer than K exist)."""
    ordered = -np.sort(-top, axis=0)
    return np.stack([ordered[: min(k, len(ordered))].mean(axis=0) for k in ks])


def activation_mask(neighbors: np.ndarray, k: int, n_gallery: int) -> np.ndarray:
    """Gallery items among the top-k of at least one bank row (the DIS activation set A)."""
    mask = np.zeros(n_gallery, dtype=bool)
    mask[neighbors[:, :k].ravel()] = True
    return mask


def occurrence(neighbors: np.ndarray, k: int, n_gallery: int) -> np.ndarray:
    """How many bank rows have each gallery item among their top-k (bank-side k-occurrence)."""
    return np.bincount(neighbors[:, :k].ravel(), minlength=n_gallery).astype(np.int32)


@dataclass
class BankAccumulator:
    """Statistics of one bank against the gallery, fed tile by tile in gallery-column blocks."""

    n_rows: int
    n_gallery: int
    betas: np.ndarray
    kmax: int
    topk_ks: tuple[int, ...] = ()
    keep_sorted: bool = False
    log_norm: np.ndarray = field(init=False)
    topk_mean: np.ndarray = field(init=False)
    neighbors: topk.RunningTopK = field(init=False)
    score_min: float = np.inf
    score_max: float = -np.inf
    score_sum: float = 0.0
    score_sumsq: float = 0.0

    def __post_init__(self) -> None:
        self.log_norm = np.full((len(self.betas), self.n_gallery), -np.inf)
        self.topk_mean = np.zeros((len(self.topk_ks), self.n_gallery))
        self.neighbors = topk.RunningTopK(self.n_rows, min(self.kmax, self.n_gallery))
        self._block = None

    def start_block(self, c0: int, c1: int) -> None:
        self._block = (c0, c1)
        width = c1 - c0
        self._lse = np.full((len(self.betas), width), -np.inf)
        kcol = max(self.topk_ks, default=0)
        self._top = np.empty((0, width)) if kcol else None
        self._sorted = np.empty((self.n_rows, width), dtype=np.float32) if self.keep_sorted else None

    def update(self, r0: int, tile: np.ndarray) -> None:
        """Fold in P[r0:r0+len(tile), c0:c1] for the current column block."""
        c0, _ = self._block
        self._lse = lse_merge(self._lse, lse_partial(tile, self.betas))
        if self._top is not None:
            self._top = column_topk_merge(self._top, column_topk_partial(tile, max(self.topk_ks)),
                                          max(self.topk_ks))
        if self._sorted is not None:
            self._sorted[r0:r0 + tile.shape[0]] = tile
        self.neighbors.update(r0, tile, c0)
        self.score_min = min(self.score_min, float(tile.min()))
        self.score_max = max(self.score_max, float(tile.max()))
        self.score_sum += float(tile.sum(dtype=np.float64))
        self.score_sumsq += float(np.square(tile, dtype=np.float64).sum())

    def finish_block(self) -> np.ndarray | None:
        """Store the block's column statistics; returns its sorted scores (columns × rows) if kept."""
        c0, c1 = self._block
        self.log_norm[:, c0:c1] = self._lse
        if self._top is not None:
            self.topk_mean[:, c0:c1] = column_topk_means(self._top, self.topk_ks)
        sorted_block = None
        if self._sorted is not None:
            sorted_block = np.sort(self._sorted.T, axis=1)
        self._block = self._lse = self._top = self._sorted = None
        return sorted_block

    def score_summary(self) -> dict:
        n = self.n_rows * self.n_gallery
        mean = self.score_sum / n
        return {
            "min": self.score_min, "max": self.score_max, "mean": mean,
            "std": float(np.sqrt(max(self.score_sumsq / n - mean * mean, 0.0))),
        }
