"""Score sources: where the scores a driver walks come from, tile by tile.

Scores come either from embeddings (a block product in float32, rows L2-normalised for cosine)
or from a precomputed matrix read tile by tile (`MatrixScores`), or from scores computed once and
kept (`CachedScores`, for tune's many passes over the same validation scores). Every source
offers the `ScoreSource` protocol; a source with `sub_columns` also computes its own product tiles
for the top-k driver (`prepare_columns`, `product_tile`), the others read rows (`read_rows`).
"""

from __future__ import annotations

import threading
from typing import Protocol

import numpy as np

from qbnorm_cli.core.sampling import spread
from qbnorm_cli.core.scale import ScoreStats
from qbnorm_cli.errors import DataError, param
from qbnorm_cli.io.specs import ArrayInput, transpose_into
from qbnorm_cli.io.validate import as_float32
from qbnorm_cli.streaming import parallel
from qbnorm_cli.streaming.budget import Budget, aligned, spans

SIMILARITIES = ("cosine", "dot")
EXACT_NORMS = (1e-15, 1e15)  # float32 norms are exact between these; outside, norms are taken in float64
NORM_PIECE = 1 << 20  # bytes of rows whose norms are taken at a time (each row's norm is its own)
DOT_MAX_NORM = float(np.sqrt(np.finfo(np.float32).max))  # beyond: a dot product of two such rows overflows


class ScoreSource(Protocol):
    """Tiles of a rows × columns score matrix (queries or bank rows × gallery items)."""

    n_rows: int
    n_cols: int
    sub_columns: bool  # tiles may cover part of a column block (product tiles of its own)

    def column_block(self, c0: int, c1: int) -> None:
        """Make columns c0:c1 the current block."""

    def tile(self, r0: int, r1: int) -> np.ndarray:
        """Scores of rows r0:r1 against the current column block, float32."""

    def col_bytes(self) -> int:
        """Bytes held per column of a block (the gallery rows of an embedding product)."""

    @property
    def row_chunk(self) -> int | None:
        """Rows per HDF5 chunk of what rows are read from (None: held, or not chunked)."""

    @property
    def col_chunk(self) -> int | None:
        """Columns per HDF5 chunk of what columns are read from."""

    def held_bytes(self) -> int:
        """Bytes kept for the whole run (inputs held whole, cached scores): charged to the budget's
        ledger before any block (streaming/budget.py)."""


def held_bytes(scores) -> int:
    """What `scores` keeps for the whole run (0 for a wrapper that keeps nothing of its own)."""
    held = getattr(scores, "held_bytes", None)
    return held() if held is not None else 0


def check_unit(source: ArrayInput, budget: Budget) -> None:
    """Refuse an input read in units (Arrow record batches) larger than the budget allows."""
    unit = getattr(source.array, "unit", None)
    if unit is not None:
        budget.check_unit(source.label, unit, source.array.unit_rows, source.array.unit_bytes, source.array.unit_fix)


class Embeddings:
    """Row blocks of an embedding matrix as float32, L2-normalised for cosine similarity.

    The whole matrix is read and kept when it fits `share` of the budget: at once (so that bad
    values are reported before any work), or with eager=False on first use by `block` or
    `rows_of` (a gallery read only in `ordered` blocks is then never held twice). `held`: the
    rows already read and normalised, a part of another Embeddings' (an update's kept and new
    items). `in_place`: the source's rows are the caller's scratch, normalised where they lie when
    read whole at once (eager, within the budget): an update's final rows, not held twice. Thread-safe.
    """

    def __init__(self, source: ArrayInput, similarity: str, budget: Budget, share: float = 0.25,
                 eager: bool = True, held: np.ndarray | None = None, in_place: bool = False):
        self.source = source
        check_unit(source, budget)
        self.cosine = similarity == "cosine"
        self._last: tuple[int, int, np.ndarray] | None = None
        self._all = held  # the rows as _load gives them, when another Embeddings already made them
        self._fits = held is not None or budget.fits(source.rows * source.cols * 4, share)
        self._in_place = in_place and eager and self._fits  # read once, whole: normalised where it lies
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

    def held_bytes(self) -> int:
        return self.source.rows * self.source.cols * 4 if self._fits else 0

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
        # A row holding NaN or Inf has a non-finite norm (and the block a non-finite extreme): for
        # float32 rows, the norms (cosine) or extremes (dot) stand in for a check of every value (and
        # its temporaries, whose first touch costs as much as the pass); as_float32 then names the
        # first bad row.
        by_norms = self.source.dtype == np.float32
        block = self.source.read(r0, r1, finite=not by_norms)
        if not self.cosine:
            self._check_dot(block, r0)
            return np.ascontiguousarray(block, dtype=np.float32)
        norms = np.empty((block.shape[0], 1), dtype=block.dtype)
        step = max(1, NORM_PIECE // max(4 * block.shape[1], 1))
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            for a in range(0, block.shape[0], step):  # cache-sized pieces: linalg.norm makes two temporaries
                norms[a:a + step] = np.linalg.norm(block[a:a + step], axis=1, keepdims=True)
        # float32 squares overflow beyond ~1.8e19 and lose digits below ~1e-19 (a norm of 1e20 became
        # inf, every score 0; one of 1e-22 was off by 14 %): such rows again, in float64
        rows = np.flatnonzero(~((norms[:, 0] > EXACT_NORMS[0]) & (norms[:, 0] < EXACT_NORMS[1])))
        if rows.size:
            wide = block[rows].astype(np.float64)
            exact = np.sqrt(np.einsum("ij,ij->i", wide, wide))
            if by_norms and not np.isfinite(exact).all():
                as_float32(block, self.source.label, r0)
            if not exact.all():
                row = r0 + int(rows[np.argmin(exact > 0)])
                dot = param("similarity='dot'")
                raise DataError(f"{self.source.label}: row {row} has zero norm; cosine similarity is undefined "
                                f"(drop the row or use {dot})")
            norms[rows, 0] = 1.0
        owned = self._in_place or (block.flags.owndata and block.flags.writeable)
        block = np.divide(block, norms, out=block if owned else None)
        if rows.size:  # divided in float64, where their norms are exact
            block[rows] = wide / exact[:, None]
        return np.ascontiguousarray(block, dtype=np.float32)

    def _check_dot(self, block: np.ndarray, r0: int) -> None:
        """Refuse NaN or Inf (naming the row) and a row whose dot products could overflow float32
        (norm above √max): the block's extremes first (two reductions), exact norms only past them."""
        if not block.size:
            return
        peak = max(float(block.max()), -float(block.min()))
        if not np.isfinite(peak):
            as_float32(block, self.source.label, r0)
        if peak * np.sqrt(block.shape[1]) <= DOT_MAX_NORM:
            return
        wide = block.astype(np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", wide, wide))
        if (norms > DOT_MAX_NORM).any():
            row = int(np.argmax(norms > DOT_MAX_NORM))
            cosine = param("similarity='cosine'")
            raise DataError(f"{self.source.label}: row {r0 + row} has norm {norms[row]:.3g}; its dot products "
                            f"would overflow float32 (scale the embeddings down, or use {cosine})")


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
        self._ordered = None
        self._ordered_key = None

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

    def held_bytes(self) -> int:
        return self.rows.held_bytes() + (self.cols.held_bytes() if self.cols is not self.rows else 0)

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
        if self._ordered_key != key:
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


class RowSubset:
    """Some rows of a score source (ascending row numbers), as the top-k driver reads a source: the
    rows a pairwise ranking widens (pairwise.run_pairwise_ranking) gathered into one run."""

    row_chunk = None  # gathered rows: no chunk alignment to keep

    def __init__(self, scores, rows: np.ndarray):
        self.inner, self.index = scores, np.asarray(rows)
        self.n_rows, self.n_cols = self.index.size, scores.n_cols
        self.sub_columns = scores.sub_columns

    def col_bytes(self) -> int:
        return self.inner.col_bytes()

    def held_bytes(self) -> int:
        return held_bytes(self.inner)

    @property
    def col_chunk(self) -> int | None:
        return self.inner.col_chunk

    def prepare_columns(self, c0: int, c1: int, order: np.ndarray | None) -> None:
        self.inner.prepare_columns(c0, c1, order)

    def product_tile(self, rows, s0: int, s1: int, scratch) -> tuple[np.ndarray, np.ndarray]:
        return self.inner.product_tile(self.index[rows], s0, s1, scratch)

    def read_rows(self, rows, c0: int, c1: int) -> np.ndarray:
        return self.inner.read_rows(self.index[rows], c0, c1)


def transposed_tile(scores: ScoreSource, r0: int, r1: int, out: np.ndarray) -> np.ndarray:
    """out[...] = scores.tile(r0, r1).T (the current column block's items × rows r0:r1), copied
    through cache-sized squares (io/specs.transpose_into) on every core: one strided copy of a
    large tile took as long as its product (5,000 × 25,000 scores: 1.27 s against 1.1 s)."""
    return transpose_on_cores(out, scores.tile(r0, r1))


def transpose_on_cores(out: np.ndarray, tile: np.ndarray) -> np.ndarray:
    """out[...] = tile.T, through cache-sized squares on every core (transposed_tile)."""
    step = -(-tile.shape[1] // parallel.workers())
    list(parallel.run_tasks(lambda c0: transpose_into(out[c0:c0 + step], tile[:, c0:c0 + step]),
                            range(0, tile.shape[1], step)))
    return out


class MatrixScores:
    """Tiles of a precomputed score matrix (rows × gallery)."""

    sub_columns = False  # read whole rows of the column block: files are laid out by rows

    def __init__(self, source: ArrayInput, budget: Budget | None = None):
        self.source = source
        if budget is not None:
            check_unit(source, budget)
        self.n_rows, self.n_cols = source.shape
        self._span = (0, self.n_cols)

    def column_block(self, c0: int, c1: int) -> None:
        self._span = (c0, c1)

    def tile(self, r0: int, r1: int) -> np.ndarray:
        return self.source.read(r0, r1, *self._span)

    def col_bytes(self) -> int:
        return 0

    def held_bytes(self) -> int:
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


class CachedScores:
    """Row × column scores computed once and kept when they fit a quarter of the budget (tune
    reads the same validation scores once per setting); otherwise the wrapped source, tile by tile."""

    def __init__(self, scores: ScoreSource, budget: Budget):
        self.inner = scores
        self.n_rows, self.n_cols = scores.n_rows, scores.n_cols
        self.full = None
        self._span = (0, self.n_cols)
        if budget.fits(self.n_rows * self.n_cols * 4 * 2, 0.25):
            self.full = np.empty((self.n_rows, self.n_cols), dtype=np.float32)
            scores.column_block(0, self.n_cols)
            for r0, r1 in spans(self.n_rows, max(1, (1 << 24) // max(self.n_cols, 1))):
                self.full[r0:r1] = scores.tile(r0, r1)

    def column_block(self, c0: int, c1: int) -> None:
        if self.full is None:
            self.inner.column_block(c0, c1)
        self._span = (c0, c1)

    def tile(self, r0: int, r1: int) -> np.ndarray:
        if self.full is None:
            return self.inner.tile(r0, r1)
        return self.full[r0:r1, self._span[0]:self._span[1]]

    @property
    def sub_columns(self) -> bool:
        return self.full is None and self.inner.sub_columns

    def prepare_columns(self, c0: int, c1: int, order: np.ndarray | None) -> None:
        self.inner.prepare_columns(c0, c1, order)

    def product_tile(self, rows, s0: int, s1: int, scratch) -> tuple[np.ndarray, np.ndarray]:
        return self.inner.product_tile(rows, s0, s1, scratch)

    def read_rows(self, rows: slice | np.ndarray, c0: int, c1: int) -> np.ndarray:
        """Rows of a slice or of ascending row numbers, columns c0:c1 (for the top-k driver)."""
        if self.full is None:
            return self.inner.read_rows(rows, c0, c1)
        return self.full[rows, c0:c1]

    def col_bytes(self) -> int:
        return 0 if self.full is not None else self.inner.col_bytes()

    def held_bytes(self) -> int:
        return (0 if self.full is None else self.full.nbytes) + held_bytes(self.inner)

    @property
    def row_chunk(self) -> int | None:
        return None if self.full is not None else self.inner.row_chunk

    @property
    def col_chunk(self) -> int | None:
        return None if self.full is not None else self.inner.col_chunk


def sample_stats(scores: ScoreSource, rows: int = 256, max_cols: int | None = None) -> ScoreStats:
    """Score statistics of up to `rows` evenly spaced rows (and the first `max_cols` columns) of a
    score source: the scale a β is judged against before (or without) a full pass."""
    scores.column_block(0, scores.n_cols if max_cols is None else min(scores.n_cols, max_cols))
    return ScoreStats.of(np.concatenate([np.array(scores.tile(r, r + 1)) for r in spread(scores.n_rows, rows)]))
