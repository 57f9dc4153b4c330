"""The Sinkhorn driver: core.sinkhorn's iterations over the bank × gallery scores, under the budget.

The scores of the bank queries against the rows of the transport problem come from one or more
segments (score sources with the bank as rows): the gallery (SN), or the gallery followed by a
gallery bank (DBSN: bank × gallery, then bank × gallery-bank). Each pass visits every column block
once, for all the problems (β values, SN and DBSN) still iterating; a block is handed to the kernel
transposed (items × bank queries, float32), its items split over the cores.

What is held, within HELD_SHARE of the budget: every problem's float32 kernel when they all fit (an
iteration over a held block is two matrix–vector products), or with one problem the kernel blocks
that fit, then the float32 scores of the blocks that still fit; when not every kernel of several
problems fits, the scores first (shared by every β), then the kernels that fit, block by block
(the passes that need scores: the first, and the kernel builds; and a block whose kernel is not
held gets its kernel from them with one exp per score). Between the first pass and the build, a
held kernel's room holds its block's scores, so that the build need not compute them again. The
rest is recomputed (or re-read) tile by tile whenever a pass needs it: the product of the bank
with a block of columns, so each recomputed pass costs about one product. Held and recomputed
blocks apply the same arithmetic to the same float32 values: the same result, to the
bit. Reductions are float64.

After a probe's pass (api/probing), the runs compute the bank × gallery scores in that pass's tiles
(`tiles`: its column blocks, its row tiles), and the pass hands over the scores of the blocks they
hold (ScoreHandover): into the held scores, or into the room of a held kernel, as the first pass
would. A float32 product's rounding depends on its shape (BLAS's edge micro-kernels), so the same
tiles give the same bits: a block's scores are the same whether handed over or computed again.

Cost: one pass to start (the first v-update; none for a run given it, as a probe's own pass gives
it), one to build the kernel (iteration 1; without products where its scores are handed over),
then one pass per iteration: two products over the held kernel, or the scores and one exp per score
where it is not held (plus their product, where the scores are not held either); a kernel build
again only when the scalings leave the kernel's safe range (core.sinkhorn.ABSORB).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from qbnorm_cli.core.memory import mapped_empty
from qbnorm_cli.core.sinkhorn import BUILD, FIRST, KERNEL, Sinkhorn
from qbnorm_cli.streaming import parallel
from qbnorm_cli.streaming.budget import Budget, aligned, column_block_width, spans
from qbnorm_cli.streaming.engine import ProbePlan, block_tile_rows
from qbnorm_cli.streaming.sources import ScoreSource, transpose_on_cores, transposed_tile

HELD_SHARE = 0.5             # the float32 kernels (and scores) are kept when they fit this share of the budget
BLOCK_TARGET_BYTES = 32 << 20  # a recomputed block (float32, twice: as computed and transposed)
BLOCK_BYTES_PER_SCORE = 8
KERNEL_BYTES_PER_SCORE = 4     # a held kernel: float32, per score and β


@dataclass(frozen=True)
class Block:
    """Columns c0:c1 of one segment; `offset` is its first column among a problem's rows."""

    segment: int
    c0: int
    c1: int
    offset: int
    rows: int  # bank rows per tile of its scores: a probe pass's where the runs share its tiles


@dataclass(frozen=True)
class Plan:
    """The column blocks of every segment, in order; which (problem, block) kernels and which
    blocks' scores are held in memory."""

    blocks: list[Block]
    kernels: set[tuple[int, int]]
    scores: set[int]


def block_width(segment: ScoreSource, n_bank: int, budget: Budget) -> int:
    """Columns per block: within a quarter of the budget, about BLOCK_TARGET_BYTES, whole HDF5 chunks."""
    width = column_block_width(segment.n_cols, segment.col_bytes(), BLOCK_BYTES_PER_SCORE * n_bank, budget,
                               align=segment.col_chunk)
    if budget.block_rows is None:
        target = max(4 * parallel.workers(), BLOCK_TARGET_BYTES // (BLOCK_BYTES_PER_SCORE * max(n_bank, 1)))
        width = min(width, aligned(target, segment.col_chunk))
    return max(1, width)


def memory_to_hold(n_bank: int, n_rows: int, problems: int = 1) -> int:
    """The --memory at which the kernels of `problems` β of n_bank × n_rows scores are all held."""
    return math.ceil(KERNEL_BYTES_PER_SCORE * n_bank * n_rows * problems / HELD_SHARE)


def plan(segments: Sequence[ScoreSource], budget: Budget, hold: bool | None = None,
         counts: Sequence[int] = (1,), tiles: ProbePlan | None = None) -> Plan:
    """The blocks, and what is held: every problem's kernel (a problem's rows are the columns of
    its first `counts[i]` segments), block by block while they fit, then the blocks' scores.
    tiles: the first segment's scores are computed in a probe pass's tiles (its blocks, its rows)."""
    n_bank = segments[0].n_rows
    blocks, offset = [], 0
    for number, segment in enumerate(segments):
        if number == 0 and tiles is not None:
            blocks += [Block(0, c0, c1, c0, tiles.tile_rows(segment, c0, c1, budget))
                       for c0, c1 in spans(segment.n_cols, tiles.width)]
        else:
            width = block_width(segment, n_bank, budget)
            blocks += [Block(number, c0, c1, offset + c0, block_tile_rows(segment, c0, c1, budget, None))
                       for c0, c1 in spans(segment.n_cols, width)]
        offset += segment.n_cols
    held_bytes, kernels, scores = 0, set(), set()
    wanted = [(problem, number) for problem, count in enumerate(counts) for number, block in enumerate(blocks)
              if block.segment < count]
    size_of = lambda number, per_score: per_score * n_bank * (blocks[number].c1 - blocks[number].c0)
    every_kernel = sum(size_of(number, KERNEL_BYTES_PER_SCORE) for _, number in wanted)
    # every kernel when they all fit, or the kernel blocks that fit when there is one problem (a
    # held kernel block saves its product and its exp, held scores only the product); otherwise the
    # scores first (shared by every β: a β whose kernel is not held then costs an exp per score, not
    # a product), then the kernels that fit
    kernels_first = hold is not None or len(counts) == 1 or budget.fits(every_kernel, HELD_SHARE)
    order = ["kernels", "scores"] if kernels_first else ["scores", "kernels"]
    for what in order:
        items = wanted if what == "kernels" else list(range(len(blocks)))
        for item in items:
            number = item[1] if what == "kernels" else item
            size = size_of(number, KERNEL_BYTES_PER_SCORE if what == "kernels" else 4)
            if hold if hold is not None else budget.fits(held_bytes + size, HELD_SHARE):
                (kernels if what == "kernels" else scores).add(item)
                held_bytes += size
    return Plan(blocks, kernels, scores)


class ScoreHandover:
    """The first segment's scores as a probe's pass computes them (`take`, its `on_tile` for that
    source), kept for the runs of `plan(segments, budget, None, counts, tiles)` where they would
    hold them: in the block's held scores, or in the room of its first held kernel until that
    kernel is built from them. The runs compute every other score in the same tiles: the same bits
    whether a block's scores were handed over or computed again (a product's rounding depends on
    its shape), so `memory` changes no result through it."""

    def __init__(self, segments: Sequence[ScoreSource], counts: Sequence[int], budget: Budget, tiles: ProbePlan):
        self.layout = plan(segments, budget, None, counts, tiles)
        n_bank = segments[0].n_rows
        held = {number for _, number in self.layout.kernels} | self.layout.scores
        self.rooms = {number: mapped_empty((block.c1 - block.c0, n_bank), np.float32)
                      for number, block in enumerate(self.layout.blocks) if block.segment == 0 and number in held}
        self._numbers = {self.layout.blocks[number].c0: number for number in self.rooms}

    def take(self, r0: int, c0: int, tile: np.ndarray) -> None:
        """Keep a tile of the pass (rows r0:…, columns c0:… of the first segment), transposed."""
        number = self._numbers.get(c0)
        if number is not None:
            transpose_on_cores(self.rooms[number][:, r0:r0 + tile.shape[0]], tile)


def warm_start(solved: Sequence[Sinkhorn], beta: float) -> np.ndarray:
    """A start for β's item scalings from the converged runs of other β on the same rows (the last
    two, nearest β last): log u extrapolated linearly in β, or from one run scaled by β/β' (the dual
    potential log u / β changes slowly with the regularisation 1/β); centred on POT's start
    (mean −log n_rows), so that the constant the run ends at stays near a cold run's."""
    last = solved[-1]
    if len(solved) == 1:
        log_u = last.log_u * (beta / last.beta)
    else:
        before = solved[-2]
        log_u = last.log_u + (beta - last.beta) * (last.log_u - before.log_u) / (last.beta - before.beta)
    return log_u - log_u.mean() - math.log(last.n_rows)


def chained(segments: Sequence[ScoreSource], problems: Sequence[tuple[Sinkhorn, int]], budget: Budget,
            hold: bool | None = None, tiles: ProbePlan | None = None) -> list[list[int]]:
    """The problems to run one after another, each warm-started from the ones before (warm_start),
    in rising β: the converging runs of each kind (same rows) when one run holds every score block,
    so that running them apart costs no more products than running them together. Fixed-iteration
    runs start as POT starts."""
    groups: dict[int, list[int]] = {}
    for index, (state, count) in enumerate(problems):
        if state.iters is None and state.accelerate and not state.iterations and state.first:
            groups.setdefault(count, []).append(index)
    chains = []
    for count, indices in groups.items():
        if len(indices) < 2:
            continue
        layout = plan(segments, budget, hold, [count], tiles)
        if all(number in layout.scores for number, block in enumerate(layout.blocks) if block.segment < count):
            chains.append(sorted(indices, key=lambda index: problems[index][0].beta))
    return chains


def run_sinkhorn(segments: Sequence[ScoreSource], problems: Sequence[tuple[Sinkhorn, int]], budget: Budget,
                 hold: bool | None = None, progress: Callable[[int], None] | None = None,
                 warm: bool = False, tiles: ProbePlan | None = None,
                 handed: ScoreHandover | None = None) -> list[bool]:
    """Iterate every problem (a Sinkhorn state and how many leading segments form its rows) until
    each is done; returns, per problem, whether its whole kernel was held in memory.

    Every segment has the bank queries as rows; a problem's rows are its segments' columns, in order.
    `hold` forces holding the kernels and scores (True) or recomputing them whenever a pass needs
    them (False); None decides by the budget. `progress(1)` is called after each pass. `warm`: the
    converging runs of several β start from each other's solutions where that costs no products
    (`chained`): fewer iterations, the same fixed point up to the constant (u·c, v/c) that
    Sinkhorn's scalings are defined up to (the c a run ends at depends on its start).
    `tiles`: compute the first segment's scores in a probe pass's tiles (`plan`); `handed`: that
    pass's scores (ScoreHandover, for these problems and `tiles`), not with `warm`.
    """
    if handed is not None and (warm or hold is not None):
        raise ValueError("scores are handed over to the runs of the budget's own plan only")
    chains = chained(segments, problems, budget, hold, tiles) if warm else []
    if not chains:
        return _run(segments, problems, budget, hold, progress, tiles, handed)
    held = [False] * len(problems)
    for chain in chains:
        for position, index in enumerate(chain):
            state = problems[index][0]
            if position:
                state.start_from(warm_start([problems[before][0] for before in chain[:position]], state.beta))
            held[index] = _run(segments, [problems[index]], budget, hold, progress, tiles)[0]
    rest = [index for index in range(len(problems)) if not any(index in chain for chain in chains)]
    if rest:
        for index, was_held in zip(rest, _run(segments, [problems[i] for i in rest], budget, hold, progress, tiles),
                                   strict=True):
            held[index] = was_held
    return held


def _run(segments: Sequence[ScoreSource], problems: Sequence[tuple[Sinkhorn, int]], budget: Budget,
         hold: bool | None, progress: Callable[[int], None] | None, tiles: ProbePlan | None = None,
         handed: ScoreHandover | None = None) -> list[bool]:
    n_bank = segments[0].n_rows
    for segment in segments:
        if segment.n_rows != n_bank:
            raise ValueError("every segment needs the same bank rows")
    for state, count in problems:
        if state.n_bank != n_bank or state.n_rows != sum(s.n_cols for s in segments[:count]):
            raise ValueError("a Sinkhorn state does not fit its segments")
    layout = plan(segments, budget, hold, [count for _, count in problems], tiles)
    if handed is not None and handed.layout != layout:
        raise ValueError("the handed-over scores are not laid out as these runs hold them")
    blocks = layout.blocks
    kept: dict[int, np.ndarray] = {}
    kernels: dict[tuple[int, int], np.ndarray] = {}
    buffers: dict[str, np.ndarray] = {}

    def scratch(name: str, width: int) -> np.ndarray:
        if name not in buffers or buffers[name].size < width * n_bank:
            buffers[name] = np.empty(width * n_bank, dtype=np.float32)
        return buffers[name][:width * n_bank].reshape(width, n_bank)

    def scores_of(number: int, block: Block) -> np.ndarray:
        """The block's scores transposed: (items, bank queries), float32, C-contiguous."""
        if number in kept:
            return kept[number]
        segment = segments[block.segment]
        width = block.c1 - block.c0
        out = mapped_empty((width, n_bank), np.float32) if number in layout.scores else scratch("t", width)
        segment.column_block(block.c0, block.c1)
        for r0, r1 in spans(n_bank, block.rows):
            transposed_tile(segment, r0, r1, out[:, r0:r1])
        if number in layout.scores:
            kept[number] = out
        return out

    def kernel_of(index: int, number: int, width: int) -> np.ndarray:
        key = (index, number)
        if key not in layout.kernels:
            return scratch("k", width)
        if key not in kernels:
            kernels[key] = mapped_empty((width, n_bank), np.float32)
        return kernels[key]

    blas = parallel.blas_limiter()
    active = [(index, state, count) for index, (state, count) in enumerate(problems) if not state.done]
    built: set[tuple[int, int]] = set()  # held kernels that are current
    stashed: dict[int, tuple[int, int]] = {}  # block → the held kernel holding its scores until built
    for number, room in (handed.rooms if handed is not None else {}).items():
        if number in layout.scores:
            kept[number] = room
        else:
            key = min(key for key in layout.kernels if key[1] == number)
            kernels[key], stashed[number] = room, key
    while active:
        for _, state, _ in active:
            state.begin_pass()
        for number, block in enumerate(blocks):
            users = [(index, state) for index, state, count in active if block.segment < count]
            if not users:
                continue
            width = block.c1 - block.c0
            current = {index: state.phase == KERNEL and (index, number) in built for index, state in users}
            if all(current.values()):
                scores = None
            elif number in stashed:
                scores = kernels[stashed[number]]
            else:
                scores = fresh = scores_of(number, block)
                spare = [(index, number) for index, state in users if state.first and (index, number) in
                         layout.kernels] if number not in layout.scores else []
                if spare:  # keep the scores in a kernel's room until that kernel is built from them
                    stashed[number] = spare[0]
                    scores = kernel_of(*spare[0], width)
                    scores[...] = fresh
            owner = stashed.get(number, (None,))[0]
            for index, state in sorted(users, key=lambda user: user[0] == owner):  # the owner's build last
                phase = state.phase
                with blas():
                    _visit(state, phase, scores, kernel_of(index, number, width), block.offset,
                           rebuild=phase == KERNEL and not current[index])
                if phase == BUILD and (index, number) in layout.kernels:
                    built.add((index, number))
                    if index == owner:
                        del stashed[number]
        for index, state, _ in active:
            state.end_pass()
            if state.phase == BUILD:  # absorbed: its held kernels are rebuilt by the next pass
                built -= {key for key in built if key[0] == index}
        active = [(index, state, count) for index, state, count in active if not state.done]
        if progress:
            progress(1)
    return [all((index, number) in layout.kernels for number, block in enumerate(blocks) if block.segment < count)
            for index, (_, count) in enumerate(problems)]


def _visit(state: Sinkhorn, phase: str, scores_t: np.ndarray | None, kernel_t: np.ndarray, offset: int,
           rebuild: bool) -> None:
    """One block of one pass of one problem: its items split over the cores, folded in order."""
    if phase == FIRST:
        work, fold = (lambda a, b: state.first_part(scores_t[a:b], offset + a)), state.fold_first
    elif phase == BUILD:
        work, fold = (lambda a, b: state.build(scores_t[a:b], offset + a, kernel_t[a:b])), state.fold
    elif rebuild:
        work = lambda a, b: state.step(state.kernel(scores_t[a:b], offset + a, kernel_t[a:b]), offset + a)
        fold = state.fold
    else:
        work, fold = (lambda a, b: state.step(kernel_t[a:b], offset + a)), state.fold
    n_rows = kernel_t.shape[0]
    for part in parallel.start_row_chunks(n_rows, n_rows * state.n_bank, work)():
        fold(part)
