"""Streaming drivers: walk score tiles under a memory budget and feed the pure kernels.

Scores come either from embeddings (a block product, float32) or from a precomputed matrix read
tile by tile. Nothing here holds a bank × gallery or query × gallery matrix, except the dense
output rows a user asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from qbnorm_cli import topk
from qbnorm_cli.blocks import Budget, spans
from qbnorm_cli.errors import DataError
from qbnorm_cli.files import ArrayInput
from qbnorm_cli.normalisers import Normaliser, apply_dense
from qbnorm_cli.probe import BankAccumulator

SIMILARITIES = ("cosine", "dot")
TILE_BYTES_PER_SCORE = 48  # float32 score + float64 copies made by the kernels


class Embeddings:
    """Row blocks of an embedding matrix as float32, L2-normalised for cosine similarity."""

    def __init__(self, source: ArrayInput, similarity: str, budget: Budget, share: float = 0.25):
        self.source = source
        self.cosine = similarity == "cosine"
        self._last: tuple[int, int, np.ndarray] | None = None
        self._all = None
        if budget.fits(source.rows * source.cols * 4, share):
            self._all = self._load(0, source.rows)

    @property
    def rows(self) -> int:
        return self.source.rows

    @property
    def dim(self) -> int:
        return self.source.cols

    def block(self, r0: int, r1: int) -> np.ndarray:
        if self._all is not None:
            return self._all[r0:r1]
        if self._last is None or self._last[:2] != (r0, r1):
            self._last = (r0, r1, self._load(r0, r1))
        return self._last[2]

    def _load(self, r0: int, r1: int) -> np.ndarray:
        block = self.source.read(r0, r1)
        if self.cosine:
            norms = np.linalg.norm(block, axis=1, keepdims=True)
            if not norms.all():
                row = r0 + int(np.argmin(norms[:, 0] > 0))
                raise DataError(
                    f"{self.source.label}: row {row} has zero norm; cosine similarity is undefined "
                    "(drop the row or use --similarity dot)"
                )
            block = block / norms
        return np.ascontiguousarray(block, dtype=np.float32)


class EmbeddingScores:
    """s(row, col) = row · col for two embedding matrices, tile by tile."""

    def __init__(self, rows: Embeddings, cols: Embeddings):
        if rows.dim != cols.dim:
            raise DataError(
                f"{rows.source.label} has dimension {rows.dim} but {cols.source.label} has {cols.dim}"
            )
        self.rows, self.cols = rows, cols
        self.n_rows, self.n_cols = rows.rows, cols.rows
        self._cols = None
        self._c0 = 0

    def column_block(self, c0: int, c1: int) -> None:
        self._cols, self._c0 = self.cols.block(c0, c1), c0

    def tile(self, r0: int, r1: int) -> np.ndarray:
        return self.rows.block(r0, r1) @ self._cols.T

    def col_bytes(self) -> int:
        return self.cols.dim * 4


class MatrixScores:
    """Tiles of a precomputed score matrix (rows × gallery)."""

    def __init__(self, source: ArrayInput):
        self.source = source
        self.n_rows, self.n_cols = source.shape
        self._span = (0, self.n_cols)

    def column_block(self, c0: int, c1: int) -> None:
        self._span = (c0, c1)

    def tile(self, r0: int, r1: int) -> np.ndarray:
        return self.source.read(r0, r1, *self._span)

    def col_bytes(self) -> int:
        return 0


def column_block_width(n_cols: int, col_bytes: int, state_bytes_per_col: int, budget: Budget) -> int:
    """Gallery columns per block: everything when it fits a quarter of the budget."""
    return budget.rows(col_bytes + state_bytes_per_col, share=0.25, total=n_cols)


def tile_rows(width: int, budget: Budget, total: int) -> int:
    return budget.rows(width * TILE_BYTES_PER_SCORE, share=0.25, total=total)


def run_probe(banks: list[tuple[object, BankAccumulator]], n_gallery: int, budget: Budget,
              on_sorted: Callable[[int, int, int, np.ndarray], None] | None = None,
              progress: Callable[[int], None] | None = None) -> None:
    """One pass over the gallery's column blocks, every bank folded into its accumulator.

    `on_sorted(bank_number, c0, c1, sorted_block)` receives each block's sorted scores when an
    accumulator keeps them (Globally-Corrected retrieval).
    """
    col_bytes = max(scores.col_bytes() for scores, _ in banks)
    state = max(16 * (len(acc.betas) + 2 * max(acc.topk_ks, default=0)) + (4 * acc.n_rows if acc.keep_sorted else 0)
                for _, acc in banks)
    width = column_block_width(n_gallery, col_bytes, state, budget)
    for c0, c1 in spans(n_gallery, width):
        for number, (scores, acc) in enumerate(banks):
            scores.column_block(c0, c1)
            acc.start_block(c0, c1)
            for r0, r1 in spans(scores.n_rows, tile_rows(c1 - c0, budget, scores.n_rows)):
                acc.update(r0, scores.tile(r0, r1))
                if progress:
                    progress((r1 - r0) * (c1 - c0))
            sorted_block = acc.finish_block()
            if sorted_block is not None and on_sorted is not None:
                on_sorted(number, c0, c1, sorted_block)


class _DenseRows:
    """Super-block state for dense output: the raw rows themselves."""

    def __init__(self, rows: int, n_cols: int, norm: Normaliser):
        self.raw = np.empty((rows, n_cols), dtype=np.float32)
        self.norm = norm

    def update(self, r0: int, c0: int, tile: np.ndarray) -> None:
        self.raw[r0:r0 + tile.shape[0], c0:c0 + tile.shape[1]] = tile

    def finish(self):
        scores, gated = apply_dense(self.raw, self.norm)
        return scores, None, gated


class _TopKRows:
    """Super-block state for ranking output: running top-N of raw and/or normalised scores."""

    def __init__(self, rows: int, n_out: int, norm: Normaliser):
        self.norm = norm
        self.top1 = topk.RunningArgmax(rows)
        needs_raw = norm.identity or norm.gate is not None
        needs_norm = not norm.identity
        self.raw = topk.RunningTopK(rows, n_out) if needs_raw else None
        self.normed = topk.RunningTopK(rows, n_out) if needs_norm else None
        self.raw_k = topk.RunningTopK(rows, norm.row_topk) if norm.row_topk else None

    def update(self, r0: int, c0: int, tile: np.ndarray) -> None:
        self.top1.update(r0, tile, c0)
        if self.raw is not None:
            self.raw.update(r0, tile, c0)
        if self.raw_k is not None:
            self.raw_k.update(r0, tile, c0)
        if self.normed is not None:
            self.normed.update(r0, self.norm.transform(tile, c0), c0)

    def finish(self):
        gated = self.norm.gated(self.top1.indices)
        if self.normed is None:
            return self.raw.values, self.raw.indices, gated
        term = self.norm.row_term(self.raw_k.values if self.raw_k else None)
        normed = self.normed.values - (term[:, None] if np.ndim(term) else term)
        if self.raw is None:
            return normed, self.normed.indices, gated
        values = np.where(gated[:, None], normed, self.raw.values)
        indices = np.where(gated[:, None], self.normed.indices, self.raw.indices)
        return values, indices, gated


def run_normalise(scores, norm: Normaliser, budget: Budget, top_k: int | None = None,
                  progress: Callable[[int], None] | None = None) -> Iterable[tuple[int, tuple]]:
    """Yield (first row, (scores, indices or None, normalised)) for consecutive query row blocks.

    Dense output (top_k None) yields float64 scores for whole rows; ranking output yields the
    top_k best per row, best first, ties towards the lower gallery index.
    """
    n_rows, n_cols = scores.n_rows, scores.n_cols
    if top_k is None:
        row_state_bytes = n_cols * (4 + 8 + 8)
    else:
        row_state_bytes = 48 * (2 * top_k + norm.row_topk) + 32
    super_rows = budget.rows(row_state_bytes, share=0.5, total=n_rows)
    if budget.block_rows is None:
        super_rows = max(super_rows, 1)
    width = column_block_width(n_cols, scores.col_bytes(), 0, budget)
    for q0, q1 in spans(n_rows, super_rows):
        state = _DenseRows(q1 - q0, n_cols, norm) if top_k is None else _TopKRows(q1 - q0, top_k, norm)
        for c0, c1 in spans(n_cols, width):
            scores.column_block(c0, c1)
            for r0, r1 in spans(q1 - q0, tile_rows(c1 - c0, budget, q1 - q0)):
                state.update(r0, c0, scores.tile(q0 + r0, q0 + r1))
                if progress:
                    progress((r1 - r0) * (c1 - c0))
        yield q0, state.finish()
