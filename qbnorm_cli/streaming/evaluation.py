"""Streaming over stored scores: each query's rank of its relevant items (evaluate) and each
query's nearest items (hubness), row block by row block under the memory budget."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qbnorm_cli.core import metrics, topk
from qbnorm_cli.io.scorefiles import ScoreFile
from qbnorm_cli.streaming.budget import Budget, spans


def _none(n: int) -> None:
    return None


def _blocks(rows: tuple[int, int] | None, q: int, step: int):
    """(r0, r1) absolute, and (a, b) into the output, over `rows` (all q rows when None)."""
    first, last = rows if rows is not None else (0, q)
    for a, b in spans(last - first, step):
        yield first + a, first + b, a, b


def ranks(source: ScoreFile, relevant: np.ndarray, budget: Budget, progress: Callable[[int], None] = _none,
          rows: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rank, censored) of every query of one input (of queries rows[0]:rows[1]): tie-averaged
    ranks (core.metrics), and for a ranking which ranks are only bounded below (the relevant item
    is not listed). `relevant` holds every query's items."""
    q = source.rows
    n = q if rows is None else rows[1] - rows[0]
    rank = np.empty(n, dtype=np.float64)
    censored = np.zeros(n, dtype=bool)
    if source.is_ranking:
        step = budget.rows(source.listed * 48, share=0.5, total=q, align=source.scores.chunk_rows)
        for r0, r1, a, b in _blocks(rows, q, step):
            rank[a:b], censored[a:b] = metrics.topn_ranks(
                source.read_neighbors(r0, r1), source.read_scores(r0, r1), relevant[r0:r1])
            progress(r1 - r0)
    else:
        step = budget.rows(source.n_gallery * 24, share=0.5, total=q, align=source.scores.chunk_rows)
        for r0, r1, a, b in _blocks(rows, q, step):
            rank[a:b] = metrics.ranks(source.read_scores(r0, r1), relevant[r0:r1])
            progress(r1 - r0)
    return rank, censored


def drop_self(block: np.ndarray, r0: int, width: int) -> np.ndarray:
    """Remove each row's own index from its neighbour list and keep the first `width` others."""
    rows = np.arange(r0, r0 + block.shape[0])[:, None]
    keep = block != rows
    order = np.argsort(~keep, axis=1, kind="stable")
    shifted = np.take_along_axis(block, order, axis=1)
    shifted = np.where(np.take_along_axis(keep, order, axis=1), shifted, -1)
    return shifted[:, :width]


def neighbours(source: ScoreFile, kmax: int, exclude_self: bool, budget: Budget,
               progress: Callable[[int], None] = _none, rows: tuple[int, int] | None = None) -> np.ndarray:
    """Each query's top-kmax items (Q × kmax; of queries rows[0]:rows[1]), best first, ties
    towards the lower index."""
    q = source.rows
    out = np.empty((q if rows is None else rows[1] - rows[0], kmax), dtype=np.int64)
    if source.is_ranking:
        step = budget.rows(source.listed * 32, share=0.5, total=q, align=source.scores.chunk_rows)
        for r0, r1, a, b in _blocks(rows, q, step):
            block = source.read_neighbors(r0, r1)
            out[a:b] = drop_self(block, r0, kmax) if exclude_self else block[:, :kmax]
            progress(r1 - r0)
        return out
    step = budget.rows(source.n_gallery * 24, share=0.5, total=q, align=source.scores.chunk_rows)
    for r0, r1, a, b in _blocks(rows, q, step):
        block = source.read_scores(r0, r1)
        if exclude_self:
            block = block.astype(np.float64)
            local = np.arange(r1 - r0)
            block[local, local + r0] = -np.inf
        _, idx = topk.select(block, kmax)
        out[a:b] = idx
        progress(r1 - r0)
    return out
