"""Streaming over stored scores: where each query's relevant items stand (evaluate), along the
stored rows or along the stored columns, and each query's nearest items (hubness), row block by
row block under the memory budget."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qbnorm_cli.core import metrics, topk
from qbnorm_cli.io.scorefiles import ScoreFile
from qbnorm_cli.streaming.budget import Budget, spans


def _none(n: int) -> None:
    return None


def _dense_step(source: ScoreFile, budget: Budget) -> int:
    return budget.rows(source.n_gallery * 24, share=0.5, total=source.rows, align=source.scores.chunk_rows)


def row_standings(source: ScoreFile, relevant: np.ndarray, budget: Budget, progress: Callable[[int], None] = _none,
                  *, missing_columns: np.ndarray | None = None, skip_missing: bool = False) -> metrics.Standing:
    """Standings of the stored rows as queries (core.metrics.row_standing / list_standing), one row
    block at a time: `relevant` holds each stored row's relevant columns (−1 padding), and
    `missing_columns` the columns scored as metric.py's MISSING value (v2t: masked captions)."""
    q = source.rows
    out = metrics.Standing.empty(q)
    if source.is_ranking:
        step = budget.rows(source.listed * 48, share=0.5, total=q, align=source.scores.chunk_rows)
        for r0, r1 in spans(q, step):
            out.put(r0, metrics.list_standing(source.read_neighbors(r0, r1), source.read_scores(r0, r1),
                                              relevant[r0:r1], missing_items=missing_columns,
                                              skip_missing=skip_missing))
            progress(r1 - r0)
        return out
    for r0, r1 in spans(q, _dense_step(source, budget)):
        out.put(r0, metrics.row_standing(source.read_scores(r0, r1), relevant[r0:r1],
                                         missing_columns=missing_columns, skip_missing=skip_missing))
        progress(r1 - r0)
    return out


def column_standings(source: ScoreFile, relevant: np.ndarray, budget: Budget, progress: Callable[[int], None] = _none,
                     *, masked_rows: np.ndarray | None = None, skip_missing: bool = False) -> metrics.Standing:
    """Standings of the stored columns as queries, from two passes over row blocks (the file is read
    in its own order, never by columns): the best relevant score of each column, then how many rows
    score above and equal to it. `relevant` holds each stored row's relevant columns (−1 padding);
    `masked_rows` score metric.py's MISSING value in every column and answer nothing (v2t: masked
    captions). Holds O(columns) counts and the relevant pairs."""
    n_cols = source.n_gallery
    step = _dense_step(source, budget)
    cols, values = [], []
    for r0, r1 in spans(source.rows, step):
        c, v = metrics.column_targets(source.read_scores(r0, r1), relevant[r0:r1],
                                      masked_rows=None if masked_rows is None else masked_rows[r0:r1],
                                      skip_missing=skip_missing)
        cols.append(c)
        values.append(v.astype(np.float64))
        progress((r1 - r0) // 2)
    best, relevant_tied = metrics.column_best(n_cols, np.concatenate(cols), np.concatenate(values))
    greater = np.zeros(n_cols, dtype=np.int64)
    tied = np.zeros(n_cols, dtype=np.int64)
    for r0, r1 in spans(source.rows, step):
        g, t = metrics.column_counts(source.read_scores(r0, r1), best,
                                     masked_rows=None if masked_rows is None else masked_rows[r0:r1])
        greater += g
        tied += t
        progress(r1 - r0 - (r1 - r0) // 2)
    return metrics.column_standing(best, relevant_tied, greater, tied)


def column_list_standings(source: ScoreFile, relevant: np.ndarray, budget: Budget,
                          progress: Callable[[int], None] = _none, *, masked_rows: np.ndarray | None = None,
                          skip_missing: bool = False) -> metrics.Standing:
    """Standings of the columns of top-N lists (core.metrics.list_column_*): exact where every
    row's last listed score pins them down, censored (a lower bound) elsewhere. Two passes over
    the lists in row blocks; holds O(columns) and one last score per row."""
    n_cols = source.n_gallery
    step = budget.rows(source.listed * 48, share=0.5, total=source.rows, align=source.scores.chunk_rows)
    best = np.full(n_cols, -np.inf)
    hidden = np.full(n_cols, -np.inf)
    has = np.zeros(n_cols, dtype=bool)
    lasts = []

    def block(r0, r1):
        return (source.read_neighbors(r0, r1), source.read_scores(r0, r1), relevant[r0:r1],
                None if masked_rows is None else masked_rows[r0:r1])

    for r0, r1 in spans(source.rows, step):
        neighbors, scores, rel, masked = block(r0, r1)
        b, h, a, last = metrics.list_column_bounds(neighbors, scores, rel, n_cols, masked_rows=masked,
                                                   skip_missing=skip_missing)
        np.maximum(best, b, out=best)
        np.maximum(hidden, h, out=hidden)
        has |= a
        lasts.append(last)
        progress((r1 - r0) // 2)
    counts: dict[str, np.ndarray] = {}
    for r0, r1 in spans(source.rows, step):
        neighbors, scores, rel, masked = block(r0, r1)
        for name, value in metrics.list_column_counts(neighbors, scores, rel, best, hidden, masked_rows=masked,
                                                      skip_missing=skip_missing).items():
            counts[name] = counts[name] + value if name in counts else value
        progress(r1 - r0 - (r1 - r0) // 2)
    return metrics.list_column_standing(best, hidden, has, np.concatenate(lasts), counts)


def drop_self(block: np.ndarray, r0: int, width: int) -> np.ndarray:
    """Remove each row's own index from its neighbour list and keep the first `width` others."""
    rows = np.arange(r0, r0 + block.shape[0])[:, None]
    keep = block != rows
    order = np.argsort(~keep, axis=1, kind="stable")
    shifted = np.take_along_axis(block, order, axis=1)
    shifted = np.where(np.take_along_axis(keep, order, axis=1), shifted, -1)
    return shifted[:, :width]


def neighbours(source: ScoreFile, kmax: int, exclude_self: bool, budget: Budget,
               progress: Callable[[int], None] = _none) -> np.ndarray:
    """Each query's top-kmax items (Q × kmax), best first, ties towards the lower index."""
    q = source.rows
    out = np.empty((q, kmax), dtype=np.int64)
    if source.is_ranking:
        step = budget.rows(source.listed * 32, share=0.5, total=q, align=source.scores.chunk_rows)
        for r0, r1 in spans(q, step):
            block = source.read_neighbors(r0, r1)
            out[r0:r1] = drop_self(block, r0, kmax) if exclude_self else block[:, :kmax]
            progress(r1 - r0)
        return out
    step = budget.rows(source.n_gallery * 24, share=0.5, total=q, align=source.scores.chunk_rows)
    for r0, r1 in spans(q, step):
        block = source.read_scores(r0, r1)
        if exclude_self:
            block = block.astype(np.float64)
            rows = np.arange(r1 - r0)
            block[rows, rows + r0] = -np.inf
        _, idx = topk.select(block, kmax)
        out[r0:r1] = idx
        progress(r1 - r0)
    return out
