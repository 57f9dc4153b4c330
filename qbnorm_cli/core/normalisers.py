"""Hubness normalisers, pure numpy, in one of three forms.

- Affine (per item): η_q(j) = a_j · S[q, j] − b_j − r_q, with `scale` a_j one number or one per
  gallery item (Local Scaling, NICDM), `offset` b_j, and a row term r_q (CSLS: the mean of the
  row's K largest raw scores) that does not change a row's ranking. Affine forms are exportable:
  an inner-product index over [a_j·g_j, −b_j] ranks as they do (core/augmented.py).
- Pairwise: η_q(j) = f(S[q, j], per-row statistics of q, per-item statistics of j), evaluated
  block by block (`Pairwise`: Mutual Proximity). The row statistics are known before the scores
  (from the query embeddings, or from the row's own raw values), so a block's η needs nothing
  from other blocks. Globally-Corrected retrieval (Dinu et al. 2015), whose score depends on
  ranks inside each gallery item's bank scores, is pairwise too. Pairwise forms are not exportable.
Each applies to the rows whose raw top-1 item lies in `gate` (every row when gate is None); other
rows keep their raw scores.

`Normaliser.eta` is the only place the affine formula is evaluated and `Normaliser.gated` the only
place the gate is decided: the dense driver, the top-k driver and `apply_dense` all call them, so
their outputs agree to the bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Pairwise(Protocol):
    """A score η = f(S[q, j], row statistics of q, item statistics of j), increasing in S for each
    item, so that a row's raw order bounds it (`bound`); no gate and no row term go with it."""

    needs_embeddings: bool  # row statistics from the query embeddings (else from the row's raw values)
    why_not_exportable: str  # one line for `export`

    def row_statistics(self, queries: np.ndarray | None, top_values: np.ndarray | None, n_gallery: int):
        """Statistics of some query rows: from their embeddings (`needs_embeddings`), or from their
        raw values best first (`top_values`, the whole row or its best part, −inf padded)."""

    def eta(self, scores: np.ndarray, rows, columns: np.ndarray) -> np.ndarray:
        """float64 η of `scores` (r × w) of rows with statistics `rows`, at gallery `columns`
        (broadcastable against scores)."""

    def bound(self, rows, below: np.ndarray) -> np.ndarray:
        """Per row, an upper bound of η over every item whose raw score is at most `below`."""


@dataclass(frozen=True)
class Normaliser:
    """η = scale·S − offset[j] − mean(top-`row_topk` of the raw row), on the rows gated in.

    scale: one number, or one per gallery item (a (G,) array).
    identity: no row is normalised (the raw baseline through the same path).
    sorted_bank: (G, N) ascending bank scores per gallery item, sliceable (Globally-Corrected).
    pairwise: a `Pairwise` score instead of the affine form.
    """

    scale: float | np.ndarray = 1.0
    offset: np.ndarray | None = None
    gate: np.ndarray | None = None
    row_topk: int = 0
    sorted_bank: object = None
    identity: bool = False
    pairwise: Pairwise | None = None

    @property
    def affine(self) -> bool:
        """Whether η is scale·S − offset with one scale (what the top-k driver's ordered tiles use)."""
        return self.sorted_bank is None and self.pairwise is None and np.ndim(self.scale) == 0

    @property
    def exportable(self) -> bool:
        """Whether an inner-product index can rank as η does (an affine form, per-item scale or not)."""
        return self.sorted_bank is None and self.pairwise is None

    @property
    def decides_rows(self) -> bool:
        """Whether a row's raw top-1 decides if it is normalised (a dynamic gate, or none at all)."""
        return self.identity or self.gate is not None

    def eta(self, scores: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
        """scale·S − offset in float64, `offset` aligned with `scores` (a row of offsets for a tile,
        or one per score for scattered candidates). The one evaluation of the affine formula."""
        out = np.multiply(scores, self.scale, dtype=np.float64) if self.scale != 1.0 \
            else np.asarray(scores, dtype=np.float64)
        if offset is not None:
            out = np.subtract(out, offset, out=out if out is not scores else None)
        return out

    def transform(self, tile: np.ndarray, c0: int = 0, rows=None) -> np.ndarray:
        """η of a tile of raw scores covering gallery columns c0:c0+width, row term excluded,
        float64; `rows`: the tile's row statistics (pairwise forms)."""
        width = tile.shape[1]
        if self.pairwise is not None:
            return self.pairwise.eta(tile, rows, np.arange(c0, c0 + width)[None, :])
        if self.sorted_bank is not None:
            tile = np.asarray(tile, dtype=np.float64)
            return tile - globally_corrected_rank(tile, self.sorted_bank[c0:c0 + width])
        at = slice(c0, c0 + width)
        if np.ndim(self.scale):
            scale = np.asarray(self.scale[at], dtype=np.float64)
            out = np.multiply(tile, scale, dtype=np.float64)
            return out if self.offset is None else np.subtract(out, self.offset[at], out=out)
        return self.eta(tile, None if self.offset is None else self.offset[at])

    def row_term(self, raw_top_values: np.ndarray | None) -> np.ndarray | float:
        """r_q from each row's raw values, best first (0 when the method has no row term)."""
        if not self.row_topk:
            return 0.0
        return raw_top_values[:, : self.row_topk].mean(axis=1, dtype=np.float64)

    def gated(self, raw_top1: np.ndarray) -> np.ndarray:
        """Which rows are normalised, from each row's raw top-1 gallery index."""
        if self.identity:
            return np.zeros(raw_top1.shape, dtype=bool)
        if self.gate is None:
            return np.ones(raw_top1.shape, dtype=bool)
        return self.gate[raw_top1]

    def gated_rows(self, raw: np.ndarray) -> np.ndarray:
        """`gated` for whole rows of raw scores (their top-1 found only when the gate needs it)."""
        if self.gate is None or self.identity:
            return self.gated(np.zeros(raw.shape[0], dtype=np.int64))
        return self.gated(np.argmax(raw, axis=1))


def globally_corrected_rank(tile: np.ndarray, sorted_cols) -> np.ndarray:
    """How many bank scores of each column exceed each score: N − searchsorted(…, side='right')."""
    sorted_cols = np.asarray(sorted_cols)
    n = sorted_cols.shape[1]
    ranks = np.empty(tile.shape)
    for j in range(tile.shape[1]):
        ranks[:, j] = n - np.searchsorted(sorted_cols[j], tile[:, j], side="right")
    return ranks


def apply_dense(raw: np.ndarray, norm: Normaliser, queries: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Normalise whole rows of raw scores: (scores float64, which rows were normalised);
    `queries`: the rows' embeddings, for a pairwise form whose row statistics come from them."""
    gated = norm.gated_rows(raw)
    out = raw.astype(np.float64)
    if gated.any():
        rows = np.nonzero(gated)[0]
        top = None
        if norm.row_topk:
            k = min(norm.row_topk, raw.shape[1])
            top = np.partition(raw[rows], raw.shape[1] - k, axis=1)[:, raw.shape[1] - k:]
        term = norm.row_term(top)
        stats = None
        if norm.pairwise is not None:
            whole = None if norm.pairwise.needs_embeddings else -np.sort(-raw[rows], axis=1)
            stats = norm.pairwise.row_statistics(None if queries is None else queries[rows], whole, raw.shape[1])
        out[rows] = norm.transform(raw[rows], rows=stats) - (term[:, None] if np.ndim(term) else term)
    return out, gated
