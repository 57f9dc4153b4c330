"""Exact top-N of a pairwise normaliser (normalisers.Pairwise: Mutual Proximity and the other forms
whose η is not a per-item affine map of S), from the raw ranking (streaming/ranking.py).

η is increasing in S for each item and bounded by a row factor, so a row's raw top-C is enough:
every item outside it scores at most bound(row, C-th raw value). A row is exact once its k-th best
η among the candidates exceeds that bound and its top k all lie strictly above the C-th raw value
(statistics from the raw values are exact there); other rows double C, and a row whose C reaches
the gallery takes its whole row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.streaming.budget import Budget, spans
from qbnorm_cli.streaming.ranking import Tiling, Trace, rank_rows, ranking_plan
from qbnorm_cli.streaming.sources import RowSubset, ScoreSource

PAIRWISE_CANDIDATES = 4  # raw candidates per wanted item at first


def _pairwise_top(norm: Normaliser, values: np.ndarray, indices: np.ndarray, queries, n_cols: int, top_k: int):
    """(η top-k values, indices, sure) of rows from their raw values and indices best first."""
    pairwise = norm.pairwise
    stats = pairwise.row_statistics(queries, None if pairwise.needs_embeddings else values, n_cols)
    present = indices >= 0
    eta = np.full(values.shape, -np.inf)
    if present.any():
        eta_all = pairwise.eta(np.where(present, values, values[:, :1]), stats, np.where(present, indices, 0))
        eta[present] = eta_all[present]
    order = np.lexsort((np.where(present, indices, np.iinfo(np.int64).max), -eta), axis=1)[:, :top_k]
    top_values = np.take_along_axis(eta, order, axis=1)
    top_indices = np.take_along_axis(np.where(present, indices, -1), order, axis=1)
    if values.shape[1] >= n_cols:
        return top_values, top_indices, np.ones(values.shape[0], dtype=bool)
    last = values[:, -1]
    bound = pairwise.bound(stats, last)
    raw_at = np.take_along_axis(values, order, axis=1)
    sure = (top_values[:, -1] > bound) & (raw_at > last[:, None]).all(axis=1)
    return top_values, top_indices, sure


def run_pairwise_ranking(scores: ScoreSource, norm: Normaliser, budget: Budget, top_k: int, queries_of,
                         progress: Callable[[int], None] | None = None, tiling: Tiling = Tiling(),
                         trace: Trace | None = None) -> Iterable[tuple[int, tuple]]:
    """run_ranking for a pairwise η: the rows' raw top-C (C = PAIRWISE_CANDIDATES·top_k at first,
    doubled for the rows not yet exact) ranked by η. `queries_of(rows)`: their embeddings or None.

    Cost: the raw top-C ranking (about the cost of the product), then η of C candidates per row."""
    raw = Normaliser(identity=True)
    n_rows, n_cols = scores.n_rows, scores.n_cols
    wanted = min(n_cols, max(PAIRWISE_CANDIDATES * top_k, top_k + 16))
    plan = ranking_plan(scores, raw, budget, wanted, tiling)
    for q0, q1 in spans(n_rows, plan.super_rows):
        values, indices, _ = rank_rows(scores, raw, plan, q0, q1, progress, tiling, trace)
        top_values, top_indices, sure = _pairwise_top(norm, values, indices, queries_of(slice(q0, q1)), n_cols,
                                                      top_k)
        more = wanted
        while not sure.all():  # the few rows whose bound failed, gathered, with twice the candidates
            more = min(n_cols, 2 * more)
            redo = np.flatnonzero(~sure)
            rows = RowSubset(scores, q0 + redo)
            v, i, _ = rank_rows(rows, raw, ranking_plan(rows, raw, budget, more, tiling), 0, redo.size, None,
                                tiling, trace)
            tv, ti, ok = _pairwise_top(norm, v, i, queries_of(q0 + redo), n_cols, top_k)
            top_values[redo], top_indices[redo], sure[redo] = tv, ti, ok
            if trace is not None:
                trace.count("recomputed_rows", redo.size)
        yield q0, (top_values, top_indices, np.ones(q1 - q0, dtype=bool))
