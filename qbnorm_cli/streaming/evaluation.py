"""Streaming over stored scores: where each query's relevant items stand (evaluate), along the
stored rows or along the stored columns, and each query's nearest items (hubness), row block by
row block under the memory budget.

Every pass is a function of a range of stored rows (`rows`, all of them when None) whose results
merge exactly (standings and neighbours concatenate, column maxima and counts combine in any
order), so the same passes run here (`here`) or as tasks on a cluster (streaming.cluster
`score_rows`), with the same results."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qbnorm_cli.core import metrics, topk
from qbnorm_cli.io.scorefiles import ScoreFile
from qbnorm_cli.streaming.budget import Budget, spans

Progress = Callable[[int], None]


def _none(n: int) -> None:
    return None


def here(fn: Callable, source: ScoreFile, progress: Progress, **kwargs) -> list:
    """Run a pass over every row of `source` in this process: [fn(source, progress=…, **kwargs)].
    (streaming.cluster.score_rows runs it as tasks over row ranges, a list in row order.)"""
    return [fn(source, progress=progress, **kwargs)]


def _blocks(source: ScoreFile, step: int, rows: tuple[int, int] | None):
    """(r0, r1) over `rows` (all rows when None), cut at the whole file's block boundaries."""
    first, last = rows if rows is not None else (0, source.rows)
    for a, b in spans(last - first, step):
        yield first + a, first + b


def _dense_step(source: ScoreFile, budget: Budget) -> int:
    return budget.rows(source.n_gallery * 24, share=0.5, total=source.rows, align=source.scores.chunk_rows)


def _list_step(source: ScoreFile, budget: Budget, per_item: int) -> int:
    return budget.rows(source.listed * per_item, share=0.5, total=source.rows, align=source.scores.chunk_rows)


def _masked(masked_rows: np.ndarray | None, r0: int, r1: int) -> np.ndarray | None:
    return None if masked_rows is None else masked_rows[r0:r1]


def row_standings(source: ScoreFile, relevant: np.ndarray, budget: Budget, progress: Progress = _none,
                  *, missing_columns: np.ndarray | None = None, skip_missing: bool = False,
                  rows: tuple[int, int] | None = None) -> metrics.Standing:
    """Standings of the stored rows as queries (core.metrics.row_standing / list_standing), one row
    block at a time: `relevant` holds each stored row's relevant columns (−1 padding), and
    `missing_columns` the columns scored as metric.py's MISSING value (v2t: masked captions)."""
    parts = []
    if source.is_ranking:
        for r0, r1 in _blocks(source, _list_step(source, budget, 48), rows):
            parts.append(metrics.list_standing(source.read_neighbors(r0, r1), source.read_scores(r0, r1),
                                               relevant[r0:r1], missing_items=missing_columns,
                                               skip_missing=skip_missing))
            progress(r1 - r0)
    else:
        for r0, r1 in _blocks(source, _dense_step(source, budget), rows):
            parts.append(metrics.row_standing(source.read_scores(r0, r1), relevant[r0:r1],
                                              missing_columns=missing_columns, skip_missing=skip_missing))
            progress(r1 - r0)
    return metrics.concatenate(parts) if parts else metrics.Standing.empty(0)


def column_targets(source: ScoreFile, relevant: np.ndarray, budget: Budget, progress: Progress = _none, *,
                   masked_rows: np.ndarray | None = None, skip_missing: bool = False,
                   rows: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1 of column standings: the relevant (column, score) pairs of the rows."""
    cols, values = [np.empty(0, dtype=np.int64)], [np.empty(0)]
    for r0, r1 in _blocks(source, _dense_step(source, budget), rows):
        c, v = metrics.column_targets(source.read_scores(r0, r1), relevant[r0:r1],
                                      masked_rows=_masked(masked_rows, r0, r1), skip_missing=skip_missing)
        cols.append(c)
        values.append(v.astype(np.float64))
        progress(r1 - r0)
    return np.concatenate(cols), np.concatenate(values)


def column_counts(source: ScoreFile, best: np.ndarray, budget: Budget, progress: Progress = _none, *,
                  masked_rows: np.ndarray | None = None,
                  rows: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pass 2 of column standings: per column the rows scoring above and equal to `best`."""
    greater = np.zeros(len(best), dtype=np.int64)
    tied = np.zeros(len(best), dtype=np.int64)
    for r0, r1 in _blocks(source, _dense_step(source, budget), rows):
        g, t = metrics.column_counts(source.read_scores(r0, r1), best, masked_rows=_masked(masked_rows, r0, r1))
        greater += g
        tied += t
        progress(r1 - r0)
    return greater, tied


def _halves(progress: Progress) -> tuple[Progress, Progress]:
    """Progress of a two-pass walk: each block counts half its rows in each pass."""
    return (lambda n: progress(n // 2)), (lambda n: progress(n - n // 2))


def column_standings(source: ScoreFile, relevant: np.ndarray, budget: Budget, progress: Progress = _none,
                     *, masked_rows: np.ndarray | None = None, skip_missing: bool = False,
                     map_rows: Callable = here) -> metrics.Standing:
    """Standings of the stored columns as queries, from two passes over row blocks (the file is read
    in its own order, never by columns): the best relevant score of each column, then how many rows
    score above and equal to it. `relevant` holds each stored row's relevant columns (−1 padding);
    `masked_rows` score metric.py's MISSING value in every column and answer nothing (v2t: masked
    captions). Holds O(columns) counts and the relevant pairs. `map_rows` runs each pass (`here`)."""
    first, second = _halves(progress)
    found = map_rows(column_targets, source, first, relevant=relevant, budget=budget, masked_rows=masked_rows,
                     skip_missing=skip_missing)
    best, relevant_tied = metrics.column_best(source.n_gallery, np.concatenate([c for c, _ in found]),
                                              np.concatenate([v for _, v in found]))
    counted = map_rows(column_counts, source, second, best=best, budget=budget, masked_rows=masked_rows)
    greater = sum((g for g, _ in counted), np.zeros(source.n_gallery, dtype=np.int64))
    tied = sum((t for _, t in counted), np.zeros(source.n_gallery, dtype=np.int64))
    return metrics.column_standing(best, relevant_tied, greater, tied)


def _list_block(source: ScoreFile, relevant: np.ndarray, masked_rows: np.ndarray | None, r0: int, r1: int):
    return source.read_neighbors(r0, r1), source.read_scores(r0, r1), relevant[r0:r1], _masked(masked_rows, r0, r1)


def list_column_bounds(source: ScoreFile, relevant: np.ndarray, budget: Budget, progress: Progress = _none, *,
                       masked_rows: np.ndarray | None = None, skip_missing: bool = False,
                       rows: tuple[int, int] | None = None):
    """Pass 1 of column standings from top-N lists (core.metrics.list_column_bounds)."""
    n_cols = source.n_gallery
    best, hidden = np.full(n_cols, -np.inf), np.full(n_cols, -np.inf)
    has = np.zeros(n_cols, dtype=bool)
    lasts = [np.empty(0)]
    for r0, r1 in _blocks(source, _list_step(source, budget, 48), rows):
        neighbors, scores, rel, masked = _list_block(source, relevant, masked_rows, r0, r1)
        b, h, a, last = metrics.list_column_bounds(neighbors, scores, rel, n_cols, masked_rows=masked,
                                                   skip_missing=skip_missing)
        np.maximum(best, b, out=best)
        np.maximum(hidden, h, out=hidden)
        has |= a
        lasts.append(last)
        progress(r1 - r0)
    return best, hidden, has, np.concatenate(lasts)


def list_column_counts(source: ScoreFile, relevant: np.ndarray, best: np.ndarray, hidden: np.ndarray,
                       budget: Budget, progress: Progress = _none, *, masked_rows: np.ndarray | None = None,
                       skip_missing: bool = False, rows: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Pass 2 of column standings from top-N lists (core.metrics.list_column_counts), summed."""
    counts: dict[str, np.ndarray] = {}
    for r0, r1 in _blocks(source, _list_step(source, budget, 48), rows):
        neighbors, scores, rel, masked = _list_block(source, relevant, masked_rows, r0, r1)
        for name, value in metrics.list_column_counts(neighbors, scores, rel, best, hidden, masked_rows=masked,
                                                      skip_missing=skip_missing).items():
            counts[name] = counts[name] + value if name in counts else value
        progress(r1 - r0)
    return counts


def column_list_standings(source: ScoreFile, relevant: np.ndarray, budget: Budget, progress: Progress = _none,
                          *, masked_rows: np.ndarray | None = None, skip_missing: bool = False,
                          map_rows: Callable = here) -> metrics.Standing:
    """Standings of the columns of top-N lists (core.metrics.list_column_*): exact where every
    row's last listed score pins them down, censored (a lower bound) elsewhere. Two passes over
    the lists in row blocks; holds O(columns) and one last score per row."""
    first, second = _halves(progress)
    options = {"masked_rows": masked_rows, "skip_missing": skip_missing}
    bounds = map_rows(list_column_bounds, source, first, relevant=relevant, budget=budget, **options)
    best, hidden, has, _ = (part.copy() for part in bounds[0])
    for b, h, a, _ in bounds[1:]:
        np.maximum(best, b, out=best)
        np.maximum(hidden, h, out=hidden)
        has |= a
    lasts = np.concatenate([last for _, _, _, last in bounds])
    counts: dict[str, np.ndarray] = {}
    for part in map_rows(list_column_counts, source, second, relevant=relevant, best=best, hidden=hidden,
                         budget=budget, **options):
        for name, value in part.items():
            counts[name] = counts[name] + value if name in counts else value
    return metrics.list_column_standing(best, hidden, has, lasts, counts)


def drop_self(block: np.ndarray, r0: int, width: int) -> np.ndarray:
    """Remove each row's own index from its neighbour list and keep the first `width` others."""
    rows = np.arange(r0, r0 + block.shape[0])[:, None]
    keep = block != rows
    order = np.argsort(~keep, axis=1, kind="stable")
    shifted = np.take_along_axis(block, order, axis=1)
    shifted = np.where(np.take_along_axis(keep, order, axis=1), shifted, -1)
    return shifted[:, :width]


def neighbours(source: ScoreFile, kmax: int, exclude_self: bool, budget: Budget, progress: Progress = _none,
               *, rows: tuple[int, int] | None = None) -> np.ndarray:
    """Each query's top-kmax items (rows × kmax), best first, ties towards the lower index."""
    parts = [np.empty((0, kmax), dtype=np.int64)]
    if source.is_ranking:
        for r0, r1 in _blocks(source, _list_step(source, budget, 32), rows):
            block = source.read_neighbors(r0, r1)
            parts.append(drop_self(block, r0, kmax) if exclude_self else block[:, :kmax].astype(np.int64))
            progress(r1 - r0)
        return np.concatenate(parts)
    for r0, r1 in _blocks(source, _dense_step(source, budget), rows):
        block = source.read_scores(r0, r1)
        if exclude_self:
            block = block.astype(np.float64)
            local = np.arange(r1 - r0)
            block[local, local + r0] = -np.inf
        _, idx = topk.select(block, kmax)
        parts.append(idx.astype(np.int64, copy=False))
        progress(r1 - r0)
    return np.concatenate(parts)
