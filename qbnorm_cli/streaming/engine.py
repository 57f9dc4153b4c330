"""Streaming drivers: walk score tiles under a memory budget and feed the pure kernels.

Scores come either from embeddings (a block product, float32) or from a precomputed matrix read
tile by tile. Nothing here holds a bank × gallery or query × gallery matrix, except the dense
output rows a user asked for.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import numpy as np

from qbnorm_cli.core.normalisers import Normaliser, apply_dense
from qbnorm_cli.core.statistics import BankAccumulator
from qbnorm_cli.errors import DataError
from qbnorm_cli.io.files import ArrayInput, as_float32
from qbnorm_cli.streaming import parallel, ranking
from qbnorm_cli.streaming.budget import Budget, aligned, column_block_width, spans

SIMILARITIES = ("cosine", "dot")
TILE_BYTES_PER_SCORE = 48  # float32 score + float64 copies made by the kernels


class Embeddings:
    """Row blocks of an embedding matrix as float32, L2-normalised for cosine similarity.

    The whole matrix is read and kept when it fits `share` of the budget: at once (so that bad
    values are reported before any work), or with eager=False on first use by `block` or
    `rows_of` (a gallery read only in `ordered` blocks is then never held twice). Thread-safe.
    """

    def __init__(self, source: ArrayInput, similarity: str, budget: Budget, share: float = 0.25,
                 eager: bool = True):
        self.source = source
        self.cosine = similarity == "cosine"
        self._last: tuple[int, int, np.ndarray] | None = None
        self._all = None
        self._fits = budget.fits(source.rows * source.cols * 4, share)
        self._lock = threading.Lock()
        if eager:
            self._whole()

    @property
    def rows(self) -> int:
        return self.source.rows

    @property
    def held(self) -> bool:
        """Whether the whole matrix is held (or will be, on first use): its blocks cost no reads."""
        return self._fits

    @property
    def dim(self) -> int:
        return self.source.cols

    def _whole(self) -> np.ndarray | None:
        if self._fits and self._all is None:
            with self._lock:
                if self._all is None:
                    self._all = self._load(0, self.source.rows)
        return self._all

    def block(self, r0: int, r1: int) -> np.ndarray:
        """Rows r0:r1 (the last block is kept: callers ask for the same block tile after tile)."""
        if (whole := self._whole()) is not None:
            return whole[r0:r1]
        with self._lock:
            if self._last is None or self._last[:2] != (r0, r1):
                self._last = (r0, r1, self._load(r0, r1))
            return self._last[2]

    def rows_of(self, rows: slice | np.ndarray) -> np.ndarray:
        """Rows of a slice or of ascending row numbers, for one caller of several at once (no
        shared block kept)."""
        if (whole := self._whole()) is not None:
            return whole[rows]
        if isinstance(rows, slice):
            return self._load(rows.start, rows.stop)
        if rows[-1] - rows[0] < 4 * rows.size:
            return self._load(int(rows[0]), int(rows[-1]) + 1)[rows - rows[0]]
        return np.concatenate([self._load(int(r), int(r) + 1) for r in rows])

    def ordered(self, c0: int, c1: int, order: np.ndarray | None) -> np.ndarray:
        """Rows c0 + order[p] at position p (rows c0:c1 when order is None; nothing writes to it)."""
        if order is None:
            return self.block(c0, c1)
        if self._all is not None:
            return self._all[c0 + order]
        out = np.empty((c1 - c0, self.dim), dtype=np.float32)
        position = np.empty_like(order)
        position[order] = np.arange(order.size)

        def place(span):  # read in file order, scatter into place (on all cores: the first
            a, b = span   # touch of fresh memory costs as much as the copy)
            out[position[a:b]] = self._load(c0 + a, c0 + b)

        step = aligned(max(1, (4 << 20) // (4 * max(self.dim, 1))), self.source.chunk_rows)
        list(parallel.run_tasks(place, spans(c1 - c0, step)))
        return out

    def _load(self, r0: int, r1: int) -> np.ndarray:
        # A row holding NaN or Inf has a non-finite norm: for float32 rows normalised for cosine,
        # the norms stand in for a check of every value (and its temporaries, whose first touch
        # costs as much as the pass); as_float32 then names the first bad row.
        by_norms = self.cosine and self.source.dtype == np.float32
        block = self.source.read(r0, r1, finite=not by_norms)
        if self.cosine:
            norms = np.linalg.norm(block, axis=1, keepdims=True)
            if by_norms and not np.isfinite(norms).all():
                as_float32(block, self.source.label, r0)
            if not norms.all():
                row = r0 + int(np.argmin(norms[:, 0] > 0))
                raise DataError(
                    f"{self.source.label}: row {row} has zero norm; cosine similarity is undefined "
                    "(drop the row or use --similarity dot)"
                )
            owned = block.flags.owndata and block.flags.writeable
            block = np.divide(block, norms, out=block if owned else None)
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
        self._buf = np.empty(0, dtype=np.float32)

    def column_block(self, c0: int, c1: int) -> None:
        self._cols = self.cols.block(c0, c1)

    def tile(self, r0: int, r1: int) -> np.ndarray:
        """Scores of rows r0:r1 against the current column block, float32.

        The result lives in a buffer reused by the next call: use it before asking for another.
        """
        cols = self._cols
        shape = (r1 - r0, cols.shape[0])
        size = shape[0] * shape[1]
        if self._buf.size < size:
            self._buf = np.empty(size, dtype=np.float32)
        out = self._buf[:size].reshape(shape)
        return np.matmul(self.rows.block(r0, r1), cols.T, out=out)

    def col_bytes(self) -> int:
        return self.cols.dim * 4

    @property
    def row_chunk(self) -> int | None:
        return None if self.rows.held else self.rows.source.chunk_rows

    @property
    def col_chunk(self) -> int | None:
        return self.cols.source.chunk_rows  # gallery rows are score columns

    sub_columns = True  # tiles may cover part of a column block: the gallery block stays in memory

    # -- for ranking.py: several threads, each computing its own product tiles ------------------
    def prepare_columns(self, c0: int, c1: int, order: np.ndarray | None) -> None:
        """Hold gallery rows c0:c1 in `order` for product_tile (kept while the same block recurs)."""
        key = (c0, c1, None if order is None else order.tobytes())
        if getattr(self, "_ordered_key", None) != key:
            self._ordered = None  # the previous block goes first
            self._ordered = self.cols.ordered(c0, c1, order)
            self._ordered_key = key

    def product_tile(self, rows, s0: int, s1: int, scratch) -> tuple[np.ndarray, np.ndarray]:
        """Scores of query rows `rows` (a slice or row numbers) against positions s0:s1 of the
        prepared block: a query-major view of a gallery-major product (BLAS is fastest that way
        round), and a mask buffer of the same layout, both in this thread's scratch."""
        queries = self.rows.rows_of(rows)
        out, mask = scratch((s1 - s0, queries.shape[0]))
        np.matmul(self._ordered[s0:s1], queries.T, out=out)
        return out.T, mask.T


class MatrixScores:
    """Tiles of a precomputed score matrix (rows × gallery)."""

    sub_columns = False  # read whole rows of the column block: files are laid out by rows

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

    @property
    def row_chunk(self) -> int | None:
        return self.source.chunk_rows

    @property
    def col_chunk(self) -> int | None:
        return self.source.chunk_cols

    def read_rows(self, rows: slice | np.ndarray, c0: int, c1: int) -> np.ndarray:
        """Rows of a slice or of ascending row numbers, columns c0:c1."""
        if isinstance(rows, slice):
            return self.source.read(rows.start, rows.stop, c0, c1)
        return self.source.read(int(rows[0]), int(rows[-1]) + 1, c0, c1)[rows - rows[0]]


# Tiles are sized for the caches, not just the budget: a tile of about TILE_TARGET_BYTES float32
# scores stays in the last-level cache while the post-processing passes run over it.
PROBE_COLUMNS = 512  # probe blocks: tiles 8192 bank rows tall, so column top-K bounds fold cheaply
TILE_TARGET_BYTES = 16 << 20
DENSE_BLOCK_BYTES = 32 << 20  # float64 output rows handed back at a time (dense output)
POST_CHUNK_BYTES = 4 << 20    # rows of a product tile filtered at a time (with their scratch)


def tile_rows(width: int, budget: Budget, total: int, align: int | None = None) -> int:
    """Rows per tile: within a quarter of the budget, about TILE_TARGET_BYTES of float32 scores,
    whole HDF5 chunks (`align` rows each) where the rows are read from a file."""
    rows = budget.rows(width * TILE_BYTES_PER_SCORE, share=0.25, total=total, align=align)
    if budget.block_rows is None:
        rows = min(rows, aligned(max(1, TILE_TARGET_BYTES // (4 * max(width, 1))), align))
    return rows


def run_probe(banks: list[tuple[object, BankAccumulator]], n_gallery: int, budget: Budget,
              on_sorted: Callable[[int, int, int, np.ndarray], None] | None = None,
              progress: Callable[[int], None] | None = None) -> None:
    """One pass over the gallery's column blocks, every bank folded into its accumulator.

    `on_sorted(bank_number, c0, c1, sorted_block)` receives each block's sorted scores when an
    accumulator keeps them (Globally-Corrected retrieval).

    Cost: O(bank × gallery × d) for embeddings (one matrix product), plus one float64 exp per
    score and β; the column statistics are O(gallery), the block state O(block width).
    """
    col_bytes = max(scores.col_bytes() for scores, _ in banks)
    state = max(16 * (len(acc.betas) + 2 * max(acc.topk_ks, default=0)) + (4 * acc.n_rows if acc.keep_sorted else 0)
                for _, acc in banks)
    col_chunk = banks[0][0].col_chunk
    width = column_block_width(n_gallery, col_bytes, state, budget, align=col_chunk)
    if budget.block_rows is None and all(getattr(scores, "sub_columns", False) for scores, _ in banks):
        # A product tile is as wide as the block: keep blocks cache-sized (the column statistics
        # of a block are complete after one pass over the bank, so narrow blocks cost nothing).
        width = aligned(min(width, PROBE_COLUMNS), col_chunk)
    for c0, c1 in spans(n_gallery, width):
        for number, (scores, acc) in enumerate(banks):
            scores.column_block(c0, c1)
            acc.start_block(c0, c1)
            for r0, r1 in spans(scores.n_rows, tile_rows(c1 - c0, budget, scores.n_rows, scores.row_chunk)):
                acc.update(r0, scores.tile(r0, r1))
                if progress:
                    progress((r1 - r0) * (c1 - c0))
            sorted_block = acc.finish_block()
            if sorted_block is not None and on_sorted is not None:
                on_sorted(number, c0, c1, sorted_block)


def _dense_whole_rows(raw: np.ndarray, norm: Normaliser, out: np.ndarray) -> np.ndarray:
    """Normalise whole rows of raw scores into `out`; returns which rows were normalised.

    The values of normalisers.apply_dense: η is computed in float64 and rounded once into `out`'s
    dtype, chunk by chunk so the float64 scratch stays in cache.
    """
    if norm.sorted_bank is not None or norm.row_topk:
        scores, gated = apply_dense(raw, norm)
        out[...] = scores
        return gated
    if norm.identity:
        gated = np.zeros(raw.shape[0], dtype=bool)
    elif norm.gate is None:
        gated = np.ones(raw.shape[0], dtype=bool)
    else:
        gated = norm.gated(np.argmax(raw, axis=1))
    if not gated.any() or (norm.scale == 1.0 and norm.offset is None):
        out[...] = raw
        return gated
    step = max(1, POST_CHUNK_BYTES // (8 * raw.shape[1]))
    for a in range(0, raw.shape[0], step):
        part = raw[a:a + step]
        # η = scale·S − offset in float64, exactly as Normaliser.transform computes it
        eta = np.multiply(part, norm.scale, dtype=np.float64)
        if norm.offset is not None:
            np.subtract(eta, norm.offset, out=eta)
        keep = ~gated[a:a + step]
        if keep.any():
            eta[keep] = part[keep]
        out[a:a + step] = eta
    return gated


class _DenseRows:
    """Super-block state for dense output: the normalised rows (or the raw rows when the gallery
    is split into several column blocks and a row's gate is only known at the end)."""

    def __init__(self, rows: int, n_cols: int, norm: Normaliser, whole_rows: bool, dtype=np.float64):
        self.norm = norm
        self.whole_rows = whole_rows
        self.dtype = dtype
        if whole_rows:
            self.out = np.empty((rows, n_cols), dtype=dtype)
            self.gated = np.zeros(rows, dtype=bool)
        else:
            self.raw = np.empty((rows, n_cols), dtype=np.float32)

    def update(self, r0: int, c0: int, tile: np.ndarray) -> None:
        r1 = r0 + tile.shape[0]
        if self.whole_rows:
            self.gated[r0:r1] = _dense_whole_rows(tile, self.norm, self.out[r0:r1])
        else:
            self.raw[r0:r1, c0:c0 + tile.shape[1]] = tile

    def finish(self):
        if self.whole_rows:
            return self.out, None, self.gated
        scores, gated = apply_dense(self.raw, self.norm)
        return scores.astype(self.dtype, copy=False), None, gated


def run_normalise(scores, norm: Normaliser, budget: Budget, top_k: int | None = None,
                  progress: Callable[[int], None] | None = None,
                  dtype=np.float64) -> Iterable[tuple[int, tuple]]:
    """Yield (first row, (scores, indices or None, normalised)) for consecutive query row blocks.

    Dense output (top_k None) yields scores for whole rows, computed in float64 and rounded once to
    `dtype`; ranking output (ranking.run_ranking) yields the top_k best per row (float64), best
    first, ties towards the lower gallery index.

    Cost: O(queries × gallery × d) for embeddings (the matrix product); the rest is a few passes
    over each cache-sized tile. A larger bank changes nothing here: its statistics are O(gallery).
    """
    if top_k is not None:
        yield from ranking.run_ranking(scores, norm, budget, top_k, progress)
        return
    n_rows, n_cols = scores.n_rows, scores.n_cols
    width = column_block_width(n_cols, scores.col_bytes(), 0, budget, align=scores.col_chunk)
    whole_rows = width >= n_cols
    row_state_bytes = n_cols * (8 if whole_rows else 4 + 8 + 8)
    super_rows = budget.rows(row_state_bytes, share=0.5, total=n_rows, align=scores.row_chunk)
    if whole_rows and budget.block_rows is None:
        super_rows = min(super_rows, aligned(max(1, DENSE_BLOCK_BYTES // (8 * n_cols)), scores.row_chunk))
    for q0, q1 in spans(n_rows, super_rows):
        state = None  # the previous block's state goes before the next one is allocated
        state = _DenseRows(q1 - q0, n_cols, norm, whole_rows, dtype)
        for c0, c1 in spans(n_cols, width):
            scores.column_block(c0, c1)
            for r0, r1 in spans(q1 - q0, tile_rows(c1 - c0, budget, q1 - q0, scores.row_chunk)):
                state.update(r0, c0, scores.tile(q0 + r0, q0 + r1))
                if progress:
                    progress((r1 - r0) * (c1 - c0))
        yield q0, state.finish()
