"""Searching an index export (core/augmented.py): the raw and normalised rankings from one index,
and an exact inner-product search for stores without an engine of their own.

A searcher answers search(x, k) → (values float64, indices int64), each row best first, ties
towards the lower index, −1/−inf in empty slots. `search_block` runs a block of queries against
one: [q, 0] gives the raw ranking (its top-1 decides a dynamic gate), [q, c] the normalised one,
searched only for the rows that take it, so a gated method costs 1 + (gated share) searches and
an offset method one. Scores come back in η units, as normalise writes them:
η = scale·⟨[q, c], [g, x]⟩ − m (− r_q), through `Normaliser.eta`; the gate is decided by
`Normaliser.gated`, the one place it is.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qbnorm_cli.core import augmented, topk
from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.streaming.budget import Budget, spans


class ExactSearch:
    """Exact inner-product top-k over stored vectors (read(c0, c1) → float32 rows), in blocks
    under the budget: the whole matrix held when it fits a quarter of it, else column blocks."""

    approximate = False

    def __init__(self, read: Callable[[int, int], np.ndarray], n_items: int, dim: int, budget: Budget):
        self.read, self.n_items, self.dim, self.budget = read, n_items, dim, budget
        self.held = read(0, n_items) if budget.fits(n_items * dim * 4, 0.25) else None
        self.width = n_items if self.held is not None else budget.rows(dim * 4, share=0.25, total=n_items)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        best = topk.RunningTopK(len(x), k)
        step = self.budget.rows(self.width * 4 * 3, share=0.25, total=len(x))
        for c0, c1 in spans(self.n_items, self.width):
            block = self.held[c0:c1] if self.held is not None else self.read(c0, c1)
            for r0, r1 in spans(len(x), step):
                best.update(r0, x[r0:r1] @ block.T, c0, forward=True)
        return best.values, best.indices


class EngineSearch:
    """An index engine's search (faiss, LanceDB): its results put in qbnorm's order."""

    def __init__(self, search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], n_items: int,
                 approximate: bool):
        self._search, self.n_items, self.approximate = search, n_items, approximate

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        values, indices = self._search(np.ascontiguousarray(x, dtype=np.float32), k)
        return augmented.ordered(values, indices)


def search_block(searcher, queries: np.ndarray, norm: Normaliser, center: float, constant: float, top_k: int,
                 row_term: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores float64, indices, normalised) of a block of queries (float32, prepared as the
    recipe says: L2-normalised for cosine), best first.

    `norm` carries the export's scale, gate, row term and identity (the raw baseline); rows a
    dynamic gate leaves alone keep their raw ranking and scores, as normalise writes them."""
    n = len(queries)
    gated_method = norm.gate is not None and not norm.identity
    raw_k = top_k if (gated_method or norm.identity) else 0
    if row_term and norm.row_topk:
        raw_k = max(raw_k, norm.row_topk)
    raw = searcher.search(augmented.with_constant(queries, 0.0), raw_k) if raw_k else None
    if gated_method:
        top1 = raw[1][:, 0]
        found = top1 >= 0
        gated = np.zeros(n, dtype=bool)
        gated[found] = norm.gated(top1[found])
    else:
        gated = norm.gated(np.zeros(n, dtype=np.int64))
    scores = np.empty((n, top_k))
    indices = np.empty((n, top_k), dtype=np.int64)
    if not gated.all():
        scores[~gated], indices[~gated] = raw[0][~gated, :top_k], raw[1][~gated, :top_k]
    rows = np.flatnonzero(gated)
    if rows.size:
        values, found = searcher.search(augmented.with_constant(queries[rows], constant), top_k)
        eta = norm.eta(values, center)
        if row_term and norm.row_topk:
            eta = eta - np.asarray(norm.row_term(raw[0][rows]))[:, None]
        scores[rows], indices[rows] = eta, found
    return scores, indices, gated
