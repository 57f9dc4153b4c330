"""Streaming drivers: walk score tiles under a memory budget and feed the pure kernels.

`run_probe` folds bank × gallery tiles into the probe's accumulators; `run_normalise` normalises
query × gallery tiles into dense rows, or hands them to the top-k driver (ranking.py). Nothing
here holds a bank × gallery or query × gallery matrix, except the dense output rows a caller
asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from qbnorm_cli.core.normalisers import Normaliser, apply_dense
from qbnorm_cli.core.statistics import BankAccumulator
from qbnorm_cli.errors import UsageError, param
from qbnorm_cli.streaming import pairwise, parallel, ranking
from qbnorm_cli.streaming.budget import (
    ROW_STATE_SHARE,
    TILE_SHARE,
    Budget,
    aligned,
    column_block_width,
    rows_within,
    spans,
)
from qbnorm_cli.streaming.sources import ScoreSource, held_bytes

TILE_BYTES_PER_SCORE = 48  # float32 score + float64 copies made by the kernels


# Tiles are sized for the caches, not just the budget: a tile of about TILE_TARGET_BYTES float32
# scores stays in the last-level cache while the post-processing passes run over it.
PROBE_COLUMNS = 512  # probe blocks: tiles 8192 bank rows tall, so column top-K bounds fold cheaply
TILE_TARGET_BYTES = 16 << 20
DENSE_BLOCK_BYTES = 32 << 20  # float64 output rows handed back at a time (dense output)
POST_CHUNK_BYTES = 4 << 20    # rows of a product tile filtered at a time (with their scratch)


def tile_rows(width: int, budget: Budget, total: int, align: int | None = None, room: float | None = None) -> int:
    """Rows per tile: within a quarter of the budget (within `room` bytes, what a plan's ledger
    left for tiles, when given), about TILE_TARGET_BYTES of float32 scores, whole HDF5 chunks
    (`align` rows each) where the rows are read from a file."""
    if budget.block_rows is not None:
        return budget.rows(width * TILE_BYTES_PER_SCORE, total=total)
    room = budget.memory * TILE_SHARE if room is None else room
    rows = rows_within(room, width * TILE_BYTES_PER_SCORE, total=total, align=align)
    return min(rows, aligned(max(1, TILE_TARGET_BYTES // (4 * max(width, 1))), align))


@dataclass(frozen=True)
class ProbePlan:
    """A probe pass's geometry, from one ledger of the budget after what the scores hold: gallery
    columns per block (every block but the last), and the bytes the product tiles may use."""

    width: int
    tile_room: float

    def tile_rows(self, scores: ScoreSource, c0: int, c1: int, budget: Budget) -> int:
        """Rows per tile of `scores` over columns c0:c1 in this pass (probe_block's): a product's
        rounding depends on its shape, so another pass over the same tiles computes the same scores
        to the bit."""
        return block_tile_rows(scores, c0, c1, budget, self.tile_room)


def block_tile_rows(scores: ScoreSource, c0: int, c1: int, budget: Budget, room: float | None) -> int:
    """Rows per tile of `scores` over columns c0:c1 in a probe pass (tile_rows within `room`)."""
    return tile_rows(c1 - c0, budget, scores.n_rows, scores.row_chunk, room)


def probe_plan(banks: list[tuple[ScoreSource, BankAccumulator]], n_gallery: int, budget: Budget) -> ProbePlan:
    """The column blocks, then the tiles, each within its share of what the held inputs leave: where
    the shares fit, the blocks and tiles (and so the statistics' bits) are those of fixed shares."""
    ledger = budget.ledger(held=sum(held_bytes(scores) for scores, _ in banks))
    col_bytes = max(scores.col_bytes() for scores, _ in banks)
    state = max(16 * (len(acc.betas) + 2 * max(acc.topk_ks, default=0)) + (4 * acc.n_rows if acc.keep_sorted else 0)
                for _, acc in banks)
    col_chunk = banks[0][0].col_chunk
    # the block is charged below, at the width kept; it leaves the tiles at least half of what the
    # held inputs left (with both shares: a quarter each where half the budget is left)
    sizing = budget.ledger(ledger.charged + ledger.room(1.0) / 2)
    width = column_block_width(n_gallery, col_bytes, state, sizing, align=col_chunk)
    if budget.block_rows is None and all(getattr(scores, "sub_columns", False) for scores, _ in banks):
        # A product tile is as wide as the block: keep blocks cache-sized (the column statistics
        # of a block are complete after one pass over the bank, so narrow blocks cost nothing).
        # A bank of few rows (an update's new queries) takes wider blocks, each one tile: a call
        # per 512 columns would cost more than its product.
        rows = max(scores.n_rows for scores, _ in banks)
        width = aligned(min(width, max(PROBE_COLUMNS, TILE_TARGET_BYTES // (4 * max(rows, 1)))), col_chunk)
    ledger.charge(width * (col_bytes + state))
    return ProbePlan(width, ledger.room(TILE_SHARE))


def probe_block(banks: list[tuple[ScoreSource, BankAccumulator]], c0: int, c1: int, budget: Budget,
                on_sorted: Callable[[int, int, int, np.ndarray], None] | None = None,
                progress: Callable[[int], None] | None = None, chunks=parallel.start_row_chunks,
                tile_room: float | None = None,
                on_tile: Callable[[int, int, int, np.ndarray], None] | None = None) -> None:
    """Gallery columns c0:c1 against every bank, folded into its accumulator: the bank's row
    tiles (within `tile_room` bytes: the plan's) in order, each tile's exponentials in `chunks`
    (parallel.start_row_chunks); `on_tile(bank_number, r0, c0, tile)` sees each tile as well."""
    for number, (scores, acc) in enumerate(banks):
        scores.column_block(c0, c1)
        acc.start_block(c0, c1)
        for r0, r1 in spans(scores.n_rows, block_tile_rows(scores, c0, c1, budget, tile_room)):
            tile = scores.tile(r0, r1)
            acc.update(r0, tile, chunks=chunks)
            if on_tile is not None:
                on_tile(number, r0, c0, tile)
            if progress:
                progress((r1 - r0) * (c1 - c0))
        sorted_block = acc.finish_block()
        if sorted_block is not None and on_sorted is not None:
            on_sorted(number, c0, c1, sorted_block)


def run_probe(banks: list[tuple[ScoreSource, BankAccumulator]], n_gallery: int, budget: Budget,
              on_sorted: Callable[[int, int, int, np.ndarray], None] | None = None,
              progress: Callable[[int], None] | None = None, plan: ProbePlan | None = None,
              on_tile: Callable[[int, int, int, np.ndarray], None] | None = None) -> None:
    """One pass over the gallery's column blocks (`plan`'s width: `probe_plan`'s unless given), every
    bank folded into its accumulator (`probe_block`).

    `on_sorted(bank_number, c0, c1, sorted_block)` receives each block's sorted scores when an
    accumulator keeps them (Globally-Corrected retrieval); `on_tile(bank_number, r0, c0, tile)`
    every tile of scores (the Sinkhorn runs' scores: streaming.sinkhorn.ScoreHandover).

    Cost: O(bank × gallery × d) for embeddings (one matrix product), plus one float64 exp per
    score and β; the column statistics are O(gallery), the block state O(block width).
    """
    plan = plan or probe_plan(banks, n_gallery, budget)
    for c0, c1 in spans(n_gallery, plan.width):
        probe_block(banks, c0, c1, budget, on_sorted, progress, tile_room=plan.tile_room, on_tile=on_tile)


def query_rows(scores: ScoreSource, norm: Normaliser):
    """A function giving the embeddings of query rows (a slice, or ascending row numbers) when the
    normaliser's row statistics come from them (Mutual Proximity with Gaussian fits), else None."""
    if norm.pairwise is None or not norm.pairwise.needs_embeddings:
        return lambda rows: None
    source = getattr(scores, "inner", scores)  # what a cache holds
    rows = getattr(source, "rows", None)
    if not hasattr(rows, "rows_of"):
        raise UsageError(f"{param('method')}: its row statistics come from the query embeddings and the "
                         f"gallery's moments: give {param('queries')} and {param('gallery')}, not {param('sims')}")
    return rows.rows_of


def _dense_whole_rows(raw: np.ndarray, norm: Normaliser, out: np.ndarray, queries=None) -> np.ndarray:
    """Normalise whole rows of raw scores into `out`; returns which rows were normalised.

    The values of normalisers.apply_dense: η is computed in float64 and rounded once into `out`'s
    dtype, chunk by chunk so the float64 scratch stays in cache.
    """
    if not norm.affine or norm.row_topk:
        scores, gated = apply_dense(raw, norm, queries)
        out[...] = scores
        return gated
    gated = norm.gated_rows(raw)
    if not gated.any() or (norm.scale == 1.0 and norm.offset is None):
        out[...] = raw
        return gated
    step = max(1, POST_CHUNK_BYTES // (8 * raw.shape[1]))
    for a in range(0, raw.shape[0], step):
        part = raw[a:a + step]
        eta = norm.eta(part, norm.offset)
        keep = ~gated[a:a + step]
        if keep.any():
            eta[keep] = part[keep]
        out[a:a + step] = eta
    return gated


class _DenseRows:
    """Super-block state for dense output: the normalised rows (or the raw rows when the gallery
    is split into several column blocks and a row's gate is only known at the end)."""

    def __init__(self, rows: int, n_cols: int, norm: Normaliser, whole_rows: bool, dtype=np.float64,
                 queries=lambda r0, r1: None):
        self.norm = norm
        self.queries = queries  # embeddings of rows r0:r1 of the super-block (or None)
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
            self.gated[r0:r1] = _dense_whole_rows(tile, self.norm, self.out[r0:r1], self.queries(r0, r1))
        else:
            self.raw[r0:r1, c0:c0 + tile.shape[1]] = tile

    def finish(self):
        if self.whole_rows:
            return self.out, None, self.gated
        scores, gated = apply_dense(self.raw, self.norm, self.queries(0, self.raw.shape[0]))
        return scores.astype(self.dtype, copy=False), None, gated


@dataclass(frozen=True)
class DensePlan:
    """How dense output is cut: gallery columns per block, whether a block holds whole rows (the
    gallery in one block), and query rows per super-block (the unit of output)."""

    width: int
    whole_rows: bool
    super_rows: int
    tile_room: float | None = None  # bytes for product tiles (None: the tiles' share of the budget)


def dense_plan(scores: ScoreSource, budget: Budget) -> DensePlan:
    """The column block, the tiles and the super-block taken from one ledger of the budget, after
    what the scores hold: together never more than the budget. A super-block cut below its share
    is whole tiles: the tiles, and so the products and the output's bits, are those of its share."""
    n_rows, n_cols = scores.n_rows, scores.n_cols
    ledger = budget.ledger(held=held_bytes(scores))
    width = column_block_width(n_cols, scores.col_bytes(), 0, ledger, align=scores.col_chunk)
    whole_rows = width >= n_cols
    row_state_bytes = n_cols * (8 if whole_rows else 4 + 8 + 8)
    most = None
    if whole_rows and budget.block_rows is None:
        most = aligned(max(1, DENSE_BLOCK_BYTES // (8 * n_cols)), scores.row_chunk)
    if budget.block_rows is not None:
        return DensePlan(width, whole_rows, ledger.rows(row_state_bytes, total=n_rows))
    full = min(rows_within(budget.memory * ROW_STATE_SHARE, row_state_bytes, n_rows, scores.row_chunk), most or n_rows)
    tile_room = ledger.room(TILE_SHARE, keep=row_state_bytes)  # a super-block of one row at least
    tiles = {w: tile_rows(w, budget, full, scores.row_chunk, tile_room) for w in {width, n_cols % width or width}}
    ledger.charge(max(rows * w * TILE_BYTES_PER_SCORE for w, rows in tiles.items()))  # the last block's may be taller
    super_rows = ledger.rows(row_state_bytes, share=ROW_STATE_SHARE, total=n_rows, align=scores.row_chunk, most=most)
    if super_rows < full:
        super_rows = aligned(super_rows, tiles[width])
    return DensePlan(width, whole_rows, super_rows, tile_room)


def dense_rows(scores: ScoreSource, norm: Normaliser, budget: Budget, plan: DensePlan, q0: int, q1: int,
               progress: Callable[[int], None] | None = None, dtype=np.float64) -> tuple:
    """(scores, None, normalised) of the super-block of query rows q0:q1."""
    n_cols = scores.n_cols
    rows_of = query_rows(scores, norm)
    state = _DenseRows(q1 - q0, n_cols, norm, plan.whole_rows, dtype, lambda a, b: rows_of(slice(q0 + a, q0 + b)))
    for c0, c1 in spans(n_cols, plan.width):
        scores.column_block(c0, c1)
        for r0, r1 in spans(q1 - q0, tile_rows(c1 - c0, budget, q1 - q0, scores.row_chunk, plan.tile_room)):
            state.update(r0, c0, scores.tile(q0 + r0, q0 + r1))
            if progress:
                progress((r1 - r0) * (c1 - c0))
    return state.finish()


def run_normalise(scores: ScoreSource, norm: Normaliser, budget: Budget, top_k: int | None = None,
                  progress: Callable[[int], None] | None = None, dtype=np.float64,
                  tiling: ranking.Tiling = ranking.Tiling(), trace: ranking.Trace | None = None,
                  ) -> Iterable[tuple[int, tuple]]:
    """Yield (first row, (scores, indices or None, normalised)) for consecutive query row blocks.

    Dense output (top_k None) yields scores for whole rows, computed in float64 and rounded once to
    `dtype`, super-block by super-block (`dense_plan`, `dense_rows`); ranking output
    (ranking.run_ranking) yields the top_k best per row (float64), best first, ties towards the
    lower gallery index (`tiling` and `trace` as ranking.run_ranking takes them).

    Cost: O(queries × gallery × d) for embeddings (the matrix product); the rest is a few passes
    over each cache-sized tile. A larger bank changes nothing here: its statistics are O(gallery).
    """
    if top_k is not None and norm.pairwise is not None:
        yield from pairwise.run_pairwise_ranking(scores, norm, budget, top_k, query_rows(scores, norm), progress,
                                                tiling, trace)
        return
    if top_k is not None:
        yield from ranking.run_ranking(scores, norm, budget, top_k, progress, tiling, trace)
        return
    plan = dense_plan(scores, budget)
    for q0, q1 in spans(scores.n_rows, plan.super_rows):
        yield q0, dense_rows(scores, norm, budget, plan, q0, q1, progress, dtype)
