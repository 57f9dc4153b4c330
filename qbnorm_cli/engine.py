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
        self._buf = np.empty(0, dtype=np.float32)

    def column_block(self, c0: int, c1: int) -> None:
        self._cols, self._c0 = self.cols.block(c0, c1), c0

    def tile(self, r0: int, r1: int, c0: int | None = None, c1: int | None = None) -> np.ndarray:
        """Scores of rows r0:r1 against the current column block (or its columns c0:c1), float32.

        The result lives in a buffer reused by the next call: use it before asking for another.
        """
        cols = self._cols
        if c0 is not None:
            cols = cols[c0 - self._c0:c1 - self._c0]
        shape = (r1 - r0, cols.shape[0])
        size = shape[0] * shape[1]
        if self._buf.size < size:
            self._buf = np.empty(size, dtype=np.float32)
        out = self._buf[:size].reshape(shape)
        return np.matmul(self.rows.block(r0, r1), cols.T, out=out)

    def col_bytes(self) -> int:
        return self.cols.dim * 4

    sub_columns = True  # tiles may cover part of a column block: the gallery block stays in memory


class MatrixScores:
    """Tiles of a precomputed score matrix (rows × gallery)."""

    sub_columns = False  # read whole rows of the column block: files are laid out by rows

    def __init__(self, source: ArrayInput):
        self.source = source
        self.n_rows, self.n_cols = source.shape
        self._span = (0, self.n_cols)

    def column_block(self, c0: int, c1: int) -> None:
        self._span = (c0, c1)

    def tile(self, r0: int, r1: int, c0: int | None = None, c1: int | None = None) -> np.ndarray:
        span = self._span if c0 is None else (c0, c1)
        return self.source.read(r0, r1, *span)

    def col_bytes(self) -> int:
        return 0


# Tiles are sized for the caches, not just the budget: a matrix-product tile of about
# TILE_TARGET_BYTES float32 scores (SUB_COLUMNS wide) stays in the last-level cache while the
# post-processing passes (offset, comparisons, candidate extraction) run over it.
SUB_COLUMNS = 8192
PROBE_COLUMNS = 512  # probe blocks: tiles 8192 bank rows tall, so column top-K bounds fold cheaply
TILE_TARGET_BYTES = 16 << 20
DENSE_BLOCK_BYTES = 32 << 20  # float64 output rows handed back at a time (dense output)
POST_CHUNK_BYTES = 4 << 20    # rows of a product tile filtered at a time (with their scratch)


def column_block_width(n_cols: int, col_bytes: int, state_bytes_per_col: int, budget: Budget) -> int:
    """Gallery columns per block: everything when it fits a quarter of the budget."""
    return budget.rows(col_bytes + state_bytes_per_col, share=0.25, total=n_cols)


def tile_rows(width: int, budget: Budget, total: int) -> int:
    """Rows per tile: within a quarter of the budget, and about TILE_TARGET_BYTES of float32 scores."""
    rows = budget.rows(width * TILE_BYTES_PER_SCORE, share=0.25, total=total)
    if budget.block_rows is None:
        rows = min(rows, max(1, TILE_TARGET_BYTES // (4 * max(width, 1))))
    return rows


def _sub_spans(scores, c0: int, c1: int, budget: Budget):
    """Column spans of the tiles inside a column block."""
    if getattr(scores, "sub_columns", False) and budget.block_rows is None:
        return list(spans(c1 - c0, SUB_COLUMNS))
    return [(0, c1 - c0)]


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
    width = column_block_width(n_gallery, col_bytes, state, budget)
    if budget.block_rows is None and all(getattr(scores, "sub_columns", False) for scores, _ in banks):
        # A product tile is as wide as the block: keep blocks cache-sized (the column statistics
        # of a block are complete after one pass over the bank, so narrow blocks cost nothing).
        width = min(width, PROBE_COLUMNS)
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


class _Pending:
    """Candidates of one running top-k, gathered over a row tile's column tiles and merged when
    they pile up (one sort of the held top-k per merge, not per column tile)."""

    def __init__(self, tracker: topk.RunningTopK):
        self.tracker = tracker
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.count = 0

    def add(self, rows: np.ndarray, idx: np.ndarray, vals: np.ndarray) -> None:
        if rows.size:
            self.parts.append((rows, idx, vals))
            self.count += rows.size

    def flush(self, r0: int) -> None:
        if not self.parts:
            return
        if len(self.parts) == 1:
            rows, idx, vals = self.parts[0]
        else:
            rows, idx, vals = (np.concatenate(p) for p in zip(*self.parts, strict=True))
            order = np.argsort(rows, kind="stable")  # parts come left to right: indices stay ascending
            rows, idx, vals = rows[order], idx[order], vals[order]
        self.parts, self.count = [], 0
        self.tracker.offer(r0, rows, idx, vals, forward=True)


class _TopKRows:
    """Super-block state for ranking output: running top-N of raw and/or normalised scores.

    Each row's columns must arrive left to right (run_normalise walks them so). Per tile, only the
    scores above a row's running threshold (its current N-th best) become candidates:
      raw      one comparison with the threshold (float32, exact);
      affine   η = scale·S − offset[j]: u = S − offset[j]/scale in float32 (one pass), compared with
               threshold/scale lowered by a margin that covers float32 rounding; the candidates'
               η are then computed exactly in float64, as Normaliser.transform does;
      gc       the exact transform of the whole tile (ranks: no shortcut).
    On a row's first tile the threshold is topk.kth_lower_bound of the tile. Candidates of a row
    tile's column tiles are merged into the top-N when they pile up and when the row tile ends.
    The raw top-1 (the dynamic gate) is the first raw item, and the CSLS row term the mean of the
    raw top-K.
    """

    def __init__(self, rows: int, n_out: int, norm: Normaliser):
        self.norm = norm
        self.n_out = n_out
        self.rows = rows
        raw_k = n_out if (norm.identity or norm.gate is not None) else 0
        raw_k = max(raw_k, norm.row_topk)
        self.raw = topk.RunningTopK(rows, raw_k) if raw_k else None
        self.normed = None if norm.identity else topk.RunningTopK(rows, n_out)
        self.affine = self.normed is not None and norm.sorted_bank is None
        if self.affine and norm.offset is not None:
            shift = np.asarray(norm.offset, dtype=np.float64) / norm.scale
            self.shift32 = shift.astype(np.float32)
            self.shift_max = float(np.abs(shift).max()) if shift.size else 0.0
        else:
            self.shift32, self.shift_max = None, 0.0
        self.pending = [_Pending(t) for t in (self.raw, self.normed) if t is not None]
        self._r0 = None
        # scratch reused chunk after chunk (fresh arrays would cost page faults every time)
        self._u = np.empty(0, dtype=np.float32)
        self._masks = (np.empty(0, dtype=bool), np.empty(0, dtype=bool))

    def _scratch(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        size = shape[0] * shape[1]
        if self._masks[0].size < size:
            self._masks = (np.empty(size, dtype=bool), np.empty(size, dtype=bool))
            if self.shift32 is not None:
                self._u = np.empty(size, dtype=np.float32)
        u = self._u[:size].reshape(shape) if self.shift32 is not None else None
        return u, self._masks[0][:size].reshape(shape), self._masks[1][:size].reshape(shape)

    def update(self, r0: int, c0: int, tile: np.ndarray) -> None:
        if self._r0 != r0:
            self.flush()
            self._r0 = r0
        rows = tile.shape[0]
        step = max(1, POST_CHUNK_BYTES // (4 * max(tile.shape[1], 1)))
        for a in range(0, rows, step):
            self._chunk(r0, c0, tile, a, min(a + step, rows))
        for pend in self.pending:
            # merge once a row tile's candidates reach a top-N per row: later tiles then filter
            # against a tighter threshold, and a row's top-N is re-sorted a few times, not per tile
            if pend.count >= rows * pend.tracker.k:
                pend.flush(r0)

    def flush(self) -> None:
        if self._r0 is not None:
            for pend in self.pending:
                pend.flush(self._r0)

    def _chunk(self, r0: int, c0: int, tile: np.ndarray, a: int, b: int) -> None:
        """Candidates of rows a:b of a tile (a cache-sized chunk), for both running top-Ns."""
        part = tile[a:b]
        u, mask, mask2 = self._scratch(part.shape)
        compare_raw = compare_norm = None
        if self.raw is not None:
            bound = self.raw.bound(r0 + a, r0 + b)
            strict = True
            if np.isneginf(bound).any():
                bound = np.maximum(bound, topk.kth_lower_bound(part, self.raw.k))
                strict = False
            compare_raw = (np.greater if strict else np.greater_equal, topk.float_bound(bound, part.dtype, strict))
        if self.normed is not None:
            normed, thr_n, strict = self._normed_filter(part, c0, u, self.normed.bound(r0 + a, r0 + b))
            compare_norm = (np.greater if strict else np.greater_equal, topk.float_bound(thr_n, normed.dtype, strict))
        # one mask for both: a compare each, an or, one extraction
        if compare_raw is not None:
            compare_raw[0](part, compare_raw[1][:, None], out=mask)
        if compare_norm is not None:
            target = mask2 if compare_raw is not None else mask
            compare_norm[0](normed, compare_norm[1][:, None], out=target)
            if compare_raw is not None:
                np.logical_or(mask, mask2, out=mask)
        rows, cols = np.divmod(np.flatnonzero(mask), part.shape[1])
        if rows.size == 0:
            return
        if compare_raw is not None:
            vals = part[rows, cols]
            keep = compare_raw[0](vals, compare_raw[1][rows])
            self.pending_raw.add(rows[keep] + a, cols[keep] + c0, vals[keep].astype(np.float64))
        if compare_norm is not None:
            keep = compare_norm[0](normed[rows, cols], compare_norm[1][rows])
            rows, cols = rows[keep], cols[keep]
            if self.affine:
                vals = part[rows, cols].astype(np.float64)
                if self.norm.scale != 1.0:
                    vals = self.norm.scale * vals
                if self.norm.offset is not None:
                    vals = vals - self.norm.offset[c0 + cols]
            else:
                vals = normed[rows, cols]
            self.pending_norm.add(rows + a, cols + c0, vals)

    def _normed_filter(self, part, c0, u, bound):
        """(values to compare, per-row threshold, strict) for the normalised top-N of a chunk."""
        k = self.normed.k
        if not self.affine:  # gc: exact values of the whole chunk
            values = self.norm.transform(part, c0)
            strict = True
            if np.isneginf(bound).any():
                bound = np.maximum(bound, topk.kth_lower_bound(values, k))
                strict = False
            return values, bound, strict
        if self.shift32 is not None:
            np.subtract(part, self.shift32[c0:c0 + part.shape[1]], out=u)
        else:
            u = part
        scale, shift_max = float(self.norm.scale), self.shift_max
        # |u − (S − offset/scale)| ≤ 2⁻²⁴·(|offset/scale| + |u|) (float32 rounding of the shift and
        # of the difference); margins of 2⁻²² times that magnitude cover it with room to spare.
        held = bound / scale
        thr = held - 2.0 ** -22 * (np.abs(held) + shift_max)
        if np.isneginf(held).any():
            lower = topk.kth_lower_bound(u, k)
            thr = np.maximum(thr, lower - 2.0 ** -21 * (np.abs(lower) + shift_max))
        thr = np.where(np.isnan(thr), -np.inf, thr)
        return u, thr, False

    @property
    def pending_raw(self):
        return self.pending[0] if self.raw is not None else None

    @property
    def pending_norm(self):
        return self.pending[-1] if self.normed is not None else None

    def finish(self):
        self.flush()
        norm, n = self.norm, self.n_out
        if self.raw is not None:
            gated = norm.gated(self.raw.indices[:, 0])
        else:
            gated = norm.gated(np.zeros(self.rows, dtype=np.int64))
        if self.normed is None:
            return self.raw.values[:, :n], self.raw.indices[:, :n], gated
        term = norm.row_term(self.raw.values if norm.row_topk else None)
        normed = self.normed.values - (term[:, None] if np.ndim(term) else term)
        if norm.gate is None:
            return normed, self.normed.indices, gated
        values = np.where(gated[:, None], normed, self.raw.values[:, :n])
        indices = np.where(gated[:, None], self.normed.indices, self.raw.indices[:, :n])
        return values, indices, gated


def run_normalise(scores, norm: Normaliser, budget: Budget, top_k: int | None = None,
                  progress: Callable[[int], None] | None = None,
                  dtype=np.float64) -> Iterable[tuple[int, tuple]]:
    """Yield (first row, (scores, indices or None, normalised)) for consecutive query row blocks.

    Dense output (top_k None) yields scores for whole rows, computed in float64 and rounded once to
    `dtype`; ranking output yields the top_k best per row (float64), best first, ties towards the
    lower gallery index.

    Cost: O(queries × gallery × d) for embeddings (the matrix product); the rest is a few passes
    over each cache-sized tile. A larger bank changes nothing here: its statistics are O(gallery).
    """
    n_rows, n_cols = scores.n_rows, scores.n_cols
    width = column_block_width(n_cols, scores.col_bytes(), 0, budget)
    whole_rows = width >= n_cols
    if top_k is None:
        row_state_bytes = n_cols * (8 if whole_rows else 4 + 8 + 8)
    else:
        row_state_bytes = 48 * (2 * top_k + norm.row_topk) + 32
    super_rows = budget.rows(row_state_bytes, share=0.5, total=n_rows)
    if top_k is None and whole_rows and budget.block_rows is None:
        super_rows = min(super_rows, max(1, DENSE_BLOCK_BYTES // (8 * n_cols)))
    for q0, q1 in spans(n_rows, super_rows):
        state = None  # the previous block's state goes before the next one is allocated
        if top_k is None:
            state = _DenseRows(q1 - q0, n_cols, norm, whole_rows, dtype)
        else:
            state = _TopKRows(q1 - q0, top_k, norm)
        for c0, c1 in spans(n_cols, width):
            scores.column_block(c0, c1)
            subs = _sub_spans(scores, c0, c1, budget) if top_k is not None else [(0, c1 - c0)]
            rows_per_tile = tile_rows(subs[0][1] - subs[0][0], budget, q1 - q0)
            for r0, r1 in spans(q1 - q0, rows_per_tile):
                for s0, s1 in subs:
                    if len(subs) == 1:
                        tile = scores.tile(q0 + r0, q0 + r1)
                    else:
                        tile = scores.tile(q0 + r0, q0 + r1, c0 + s0, c0 + s1)
                    state.update(r0, c0 + s0, tile)
                    if progress:
                        progress((r1 - r0) * (s1 - s0))
        yield q0, state.finish()
