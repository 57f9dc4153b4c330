"""Hubness normalisers as per-gallery offsets with an optional per-row gate, pure numpy.

Every method of the registry (qbnorm_cli/methods.py, which cites each formula's source) has the
form  η_q(j) = scale · S[q, j] − offset[j] − r_q, applied to the rows whose raw top-1 item lies in
`gate` (every row when gate is None); other rows keep their raw scores. Row terms r_q (CSLS: the
mean of the row's K largest raw scores) do not change a row's ranking. Globally-Corrected
retrieval (Dinu et al. 2015) is the exception: its score depends on ranks inside each gallery
item's bank scores.

`Normaliser.eta` is the only place the affine formula is evaluated and `Normaliser.gated` the only
place the gate is decided: the dense driver, the top-k driver and `apply_dense` all call them, so
their outputs agree to the bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Normaliser:
    """η = scale·S − offset[j] − mean(top-`row_topk` of the raw row), on the rows gated in.

    identity: no row is normalised (the raw baseline through the same path).
    sorted_bank: (G, N) ascending bank scores per gallery item, sliceable (Globally-Corrected).
    """

    scale: float = 1.0
    offset: np.ndarray | None = None
    gate: np.ndarray | None = None
    row_topk: int = 0
    sorted_bank: object = None
    identity: bool = False

    @property
    def affine(self) -> bool:
        """Whether η is scale·S − offset (every method but Globally-Corrected)."""
        return self.sorted_bank is None

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

    def transform(self, tile: np.ndarray, c0: int = 0) -> np.ndarray:
        """η of a tile of raw scores covering gallery columns c0:c0+width (row term excluded), float64."""
        width = tile.shape[1]
        if not self.affine:
            tile = np.asarray(tile, dtype=np.float64)
            return tile - globally_corrected_rank(tile, self.sorted_bank[c0:c0 + width])
        return self.eta(tile, None if self.offset is None else self.offset[c0:c0 + width])

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


def apply_dense(raw: np.ndarray, norm: Normaliser) -> tuple[np.ndarray, np.ndarray]:
    """Normalise whole rows of raw scores: (scores float64, which rows were normalised)."""
    gated = norm.gated_rows(raw)
    out = raw.astype(np.float64)
    if gated.any():
        rows = np.nonzero(gated)[0]
        top = None
        if norm.row_topk:
            k = min(norm.row_topk, raw.shape[1])
            top = np.partition(raw[rows], raw.shape[1] - k, axis=1)[:, raw.shape[1] - k:]
        term = norm.row_term(top)
        out[rows] = norm.transform(raw[rows]) - (term[:, None] if np.ndim(term) else term)
    return out, gated
