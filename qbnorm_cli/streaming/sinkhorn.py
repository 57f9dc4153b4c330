"""The Sinkhorn driver: core.sinkhorn's iterations over the bank × gallery scores, under the budget.

The scores of the bank queries against the rows of the transport problem come from one or more
segments (score sources with the bank as rows): the gallery (SN), or the gallery followed by a
gallery bank (DBSN: bank × gallery, then bank × gallery-bank). Each pass visits every column block
once, for all the problems (β values, SN and DBSN) still iterating; a block is handed to the kernel
transposed (items × bank queries, float32), its items split over the cores.

The blocks are kept in memory as float32 when they fit HELD_SHARE of the budget, segment by
segment; otherwise they are recomputed (or re-read) tile by tile on every pass. Both paths walk the
same blocks and apply the same arithmetic to the same float32 values, so they give the same
result, to the bit. Reductions are float64.

Cost: one pass to start (the first v-update, which also fills the held scores), then one pass per
iteration: one float64 exp per score and β, plus, when not held, the product (or read) of every
score again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from qbnorm_cli.core.sinkhorn import Sinkhorn
from qbnorm_cli.streaming import parallel
from qbnorm_cli.streaming.budget import Budget, aligned, column_block_width, spans
from qbnorm_cli.streaming.engine import tile_rows
from qbnorm_cli.streaming.sources import ScoreSource

HELD_SHARE = 0.5             # the float32 scores are kept when they fit this share of the budget
BLOCK_TARGET_BYTES = 32 << 20  # a recomputed block (float32, twice: as computed and transposed)
BLOCK_BYTES_PER_SCORE = 8


@dataclass(frozen=True)
class Block:
    """Columns c0:c1 of one segment; `offset` is its first column among a problem's rows."""

    segment: int
    c0: int
    c1: int
    offset: int


def block_width(segment: ScoreSource, n_bank: int, budget: Budget) -> int:
    """Columns per block: within a quarter of the budget, about BLOCK_TARGET_BYTES, whole HDF5 chunks."""
    width = column_block_width(segment.n_cols, segment.col_bytes(), BLOCK_BYTES_PER_SCORE * n_bank, budget,
                               align=segment.col_chunk)
    if budget.block_rows is None:
        target = max(4 * parallel.workers(), BLOCK_TARGET_BYTES // (BLOCK_BYTES_PER_SCORE * max(n_bank, 1)))
        width = min(width, aligned(target, segment.col_chunk))
    return max(1, width)


def plan(segments: Sequence[ScoreSource], budget: Budget, hold: bool | None = None) -> tuple[list[Block], list[bool]]:
    """The column blocks of every segment, in order, and which segments are held in memory."""
    n_bank = segments[0].n_rows
    blocks, held, offset, held_bytes = [], [], 0, 0
    for number, segment in enumerate(segments):
        width = block_width(segment, n_bank, budget)
        blocks += [Block(number, c0, c1, offset + c0) for c0, c1 in spans(segment.n_cols, width)]
        size = 4 * n_bank * segment.n_cols
        keep = budget.fits(held_bytes + size, HELD_SHARE) if hold is None else hold
        held.append(keep)
        held_bytes += size if keep else 0
        offset += segment.n_cols
    return blocks, held


def run_sinkhorn(segments: Sequence[ScoreSource], problems: Sequence[tuple[Sinkhorn, int]], budget: Budget,
                 hold: bool | None = None, progress: Callable[[int], None] | None = None) -> list[bool]:
    """Iterate every problem (a Sinkhorn state and how many leading segments form its rows) until
    each is done; returns which segments were held in memory.

    Every segment has the bank queries as rows; a problem's rows are its segments' columns, in order.
    `hold` forces holding the scores (True) or recomputing them on every pass (False); None decides
    by the budget. `progress(1)` is called after each pass.
    """
    n_bank = segments[0].n_rows
    for segment in segments:
        if segment.n_rows != n_bank:
            raise ValueError("every segment needs the same bank rows")
    for state, count in problems:
        if state.n_bank != n_bank or state.n_rows != sum(s.n_cols for s in segments[:count]):
            raise ValueError("a Sinkhorn state does not fit its segments")
    blocks, held = plan(segments, budget, hold)
    kept: dict[int, np.ndarray] = {}
    buffers: dict[str, np.ndarray] = {}

    def scores_of(number: int, block: Block) -> np.ndarray:
        """The block's scores transposed: (items, bank queries), float32, C-contiguous."""
        if number in kept:
            return kept[number]
        segment = segments[block.segment]
        width = block.c1 - block.c0
        if held[block.segment]:
            out = np.empty((width, n_bank), dtype=np.float32)
        else:
            if "t" not in buffers or buffers["t"].size < width * n_bank:
                buffers["t"] = np.empty(width * n_bank, dtype=np.float32)
            out = buffers["t"][:width * n_bank].reshape(width, n_bank)
        segment.column_block(block.c0, block.c1)
        for r0, r1 in spans(n_bank, tile_rows(width, budget, n_bank, segment.row_chunk)):
            out[:, r0:r1] = segment.tile(r0, r1).T
        if held[block.segment]:
            kept[number] = out
        return out

    active = [(state, count) for state, count in problems if not state.done]
    while active:
        for state, _ in active:
            state.begin_pass()
        for number, block in enumerate(blocks):
            users = [state for state, count in active if block.segment < count]
            if users:
                scores = scores_of(number, block)
                for state in users:
                    _visit(state, scores, block.offset)
        for state, _ in active:
            state.end_pass()
        active = [(state, count) for state, count in active if not state.done]
        if progress:
            progress(1)
    return held


def _visit(state: Sinkhorn, scores_t: np.ndarray, offset: int) -> None:
    """One block of one pass of one problem: its items split over the cores, folded in order."""
    if state.first:
        work, fold = (lambda a, b: state.first_part(scores_t[a:b], offset + a)), state.fold_first
    else:
        work, fold = (lambda a, b: state.sweep(scores_t[a:b], offset + a)), state.fold
    for part in parallel.start_row_chunks(scores_t.shape[0], scores_t.size, work)():
        fold(part)
