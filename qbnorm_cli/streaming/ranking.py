"""Exact top-N of raw and normalised scores (normalise --top-k), at about the cost of the product.

Per query row two ranked lists may be needed (value descending, ties towards the lower gallery
index): the raw scores S[q, j] (the baseline, the dynamic gate's top-1, CSLS's r_q) and the
normalised scores η = scale·S[q, j] − offset[j] (normalisers.Normaliser; Globally-Corrected
scores come from its exact transform). Nothing holds a query × gallery matrix: for each query row
tile and gallery column block,

1. the block's first product tile is a uniform random sample of its columns. A row's threshold θ
   is a lower bound of the sample's k'-th best value, k' = ⌈safety · k · sample/block⌉ (at most
   k; `Tiling`): the row's k-th best over the whole block is about `safety` times more selective, so θ lies
   below it with high probability, whatever the score distribution (the rank of a sample's order
   statistic is distribution-free). The running top-k of earlier blocks raises θ where it is
   higher.
2. The other columns come ordered by offset, so that each product tile spans a narrow range of
   offsets [lo, hi]: one float32 comparison per score, S ≥ min(θ_raw, (θ_η + lo)/scale), finds
   every score that can reach either list (lowered by a margin for rounding); the few survivors
   are then tested exactly (float64 η, as Normaliser.transform computes it).
3. The candidates and the rows' running top-k are ranked exactly once per row tile
   (topk.rank). A row's result is exact when at least k of its entries are ≥ θ, or θ = −inf:
   everything not collected is then below its k-th best. Rows that fail the check (rare by
   construction) are recomputed against the whole block, with θ the k-th best's lower bound,
   by the tile they belong to (so that a tile's result depends on that tile alone).
   When the block holds the whole gallery, a dynamic gate (DIS) is decided first from each
   row's raw top-1, and each row is ranked by the one list its output takes.

Row tiles are independent: they run on all cores, each thread computing its own products with
BLAS on one thread (parallel.run_tasks).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from qbnorm_cli.core import topk
from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.streaming import parallel
from qbnorm_cli.streaming.budget import ROW_STATE_SHARE, TILE_SHARE, Budget, Ledger, aligned, column_block_width, spans
from qbnorm_cli.streaming.sources import ScoreSource, held_bytes

SAMPLE_SPREAD = 16     # column groups per wanted item in the sample's bound (tight for small k')
TILE_BYTES_PER_SCORE = 13  # per score of a tile: float32 score, bool mask, temporaries (≈ 10 B measured in RSS)
_SEED = 0x7162          # the sample's columns: fixed, so that timings repeat (results never depend on it)
_LOCAL = threading.local()


@dataclass(frozen=True)
class Tiling:
    """How the top-k driver cuts its work; the defaults are measured (docs/performance.md). Any
    values give the same exact result: tests set small ones to walk every path."""

    safety: float = 2.0           # speculative thresholds aim at the safety·k-th best: ~0.2 % of rows recomputed
    tile_rows: int = 1280         # queries per product tile at most (single-threaded OpenBLAS: 3–6 % faster than 512)
    sub_columns: int = 8192       # gallery items per product tile (× 1,250 queries: 41 MB, faster than narrower)
    sample_columns: int = 8192    # gallery items in a block's sample tile (at most a product tile)
    sample_piece_bytes: int = 8 << 20  # the sample tile's float32 scores computed at a time (passes stay in L3)
    trust_recompute: bool = True  # False: rows recomputed against a whole block are taken as unsure
                                  # anyway, so they take every entry (a last resort no rounding reaches)


@dataclass
class Trace:
    """What a run did, for whoever wants to know (tests, diagnostics): counts of tiles by kind,
    rows recomputed, and the gates decided before ranking."""

    sample_tiles: int = 0
    ordered_tiles: int = 0
    exact_tiles: int = 0
    recomputed_rows: int = 0
    gates: list = field(default_factory=list)  # per decided block: which rows were gated in

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def gate(self, gated: np.ndarray) -> None:
        with self._lock:
            self.gates.append(gated.copy())


@dataclass(frozen=True)
class Geometry:
    """Tile sizes: query rows per task, gallery columns per product tile, columns per block."""

    rows: int
    sub_columns: int
    block_columns: int


def geometry(scores, n_rows: int, n_cols: int, budget: Budget, workers: int, tiling: Tiling = Tiling(),
             ledger: Ledger | None = None, keep: float = 0) -> Geometry:
    """Tiles within a quarter of the budget on all threads, blocks as the engine sizes them: both
    taken from `ledger` (default: the budget's after what the scores hold), the tiles leaving
    `keep` bytes for the takers after them."""
    ledger = budget.ledger(held=held_bytes(scores)) if ledger is None else ledger
    block = column_block_width(n_cols, scores.col_bytes(), 0, ledger, align=scores.col_chunk)
    if budget.block_rows is not None:  # fixed by hand (tests, debugging)
        return Geometry(budget.block_rows, budget.block_rows, block)
    sub = min(tiling.sub_columns, block) if scores.sub_columns else block
    per_thread = ledger.room(TILE_SHARE, keep) / workers
    fit = max(1, int(per_thread // (TILE_BYTES_PER_SCORE * sub)))
    rows = min(tiling.tile_rows, fit, n_rows)
    if fit < 8 and rows < n_rows and sub > 64 and scores.sub_columns:  # a small budget: narrower tiles, not single rows
        sub = min(sub, max(64, int(per_thread // (TILE_BYTES_PER_SCORE * 8))))
        rows = min(8, n_rows)
    # rows read tile by tile: whole chunks; held rows: tiles of nearly equal size on every thread
    rows = aligned(rows, scores.row_chunk) if scores.row_chunk else balanced_rows(n_rows, rows, workers)
    ledger.charge(workers * rows * sub * TILE_BYTES_PER_SCORE)
    return Geometry(rows, sub, block)


def balanced_rows(n_rows: int, most: int, workers: int) -> int:
    """Rows per tile, at most `most`, such that the tiles come in a multiple of `workers` of
    nearly equal size: no core waits at the end for another's last tile (a tile of the
    10k × 100k benchmark takes half a second)."""
    tiles = math.ceil(math.ceil(n_rows / most) / workers) * workers
    return max(1, math.ceil(n_rows / tiles))


class Lists:
    """The running top-k lists of a super-block of query rows: raw (raw_k) and normalised (norm_k)."""

    def __init__(self, n_rows: int, raw_k: int, norm_k: int):
        self.raw_k, self.norm_k = raw_k, norm_k
        self.raw = topk.empty(n_rows, raw_k)
        self.norm = topk.empty(n_rows, norm_k)


class Block:
    """A gallery column block as the product tiles see it: the order of its columns (position p is
    gallery item index[p]), their offsets in that order, and the tiles' column spans (the first
    is the sample), with each later tile's lowest offset."""

    def __init__(self, c0: int, c1: int, norm: Normaliser, sub_columns: int, ordered: bool, sample_columns: int):
        width = c1 - c0
        self.c0, self.c1, self.width = c0, c1, width
        sample = min(sample_columns, sub_columns, width)
        self.order = None
        if ordered and width > sample:
            first = np.sort(np.random.default_rng([_SEED, c0]).choice(width, sample, replace=False))
            rest = np.ones(width, dtype=bool)
            rest[first] = False
            rest = np.flatnonzero(rest)
            key = norm.offset if np.ndim(norm.scale) == 0 else norm.scale  # what the bounds depend on
            if key is not None:
                rest = rest[np.argsort(key[c0 + rest], kind="stable")]
            self.order = np.concatenate([first, rest])
        self.index = c0 + (self.order if self.order is not None else np.arange(width))
        self.offset = None if norm.offset is None else np.asarray(norm.offset, dtype=np.float64)[self.index]
        self.scale = np.asarray(norm.scale, dtype=np.float64)[self.index] if np.ndim(norm.scale) else None
        self.subs = [(0, sample), *((s0 + sample, s1 + sample) for s0, s1 in spans(width - sample, sub_columns))]
        if self.offset is not None and self.order is not None:
            self.lows = [float(self.offset[s0:s1].min()) for s0, s1 in self.subs]
        else:
            self.lows = [0.0] * len(self.subs)
        if self.scale is not None:
            # η = a_j·S − b_j ≥ θ ⇔ S ≥ θ/a_j + b_j/a_j: per tile, the range of 1/a_j and the least b_j/a_j
            inverse = 1.0 / self.scale
            ratio = inverse * (0.0 if self.offset is None else self.offset)
            self.item_bounds = [(float(inverse[s0:s1].min()), float(inverse[s0:s1].max()),
                                 float(np.min(ratio[s0:s1]))) if s1 > s0 else (0.0, 0.0, 0.0)
                                for s0, s1 in self.subs]


def _scratch(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """This thread's float32 tile buffer and bool mask (fresh large arrays cost page faults)."""
    size = shape[0] * shape[1]
    bufs = getattr(_LOCAL, "bufs", None)
    if bufs is None or bufs[0].size < size:
        bufs = _LOCAL.bufs = (np.empty(size, dtype=np.float32), np.empty(size, dtype=bool))
    return bufs[0][:size].reshape(shape), bufs[1][:size].reshape(shape)


def _survivors(tile: np.ndarray, mask: np.ndarray):
    """(rows, cols, scores) where a query-major mask is set, read in the tile's memory order (a
    product tile is a transposed view: gallery-major in memory)."""
    if mask.flags.c_contiguous:
        flat = np.flatnonzero(mask)
        rows, cols = np.divmod(flat, mask.shape[1])
        return rows, cols, tile.reshape(-1)[flat] if tile.flags.c_contiguous else tile[rows, cols]
    flat = np.flatnonzero(mask.T)
    cols, rows = np.divmod(flat, mask.shape[0])
    return rows, cols, tile.T.reshape(-1)[flat] if tile.T.flags.c_contiguous else tile[rows, cols]


def _spec_k(k: int, sample: int, width: int, safety: float) -> int:
    """k': the sample's order statistic whose value the block's k-th best exceeds w.h.p."""
    if sample >= width:
        return k
    return min(k, max(1, math.ceil(safety * k * sample / width)))


class _Candidates:
    """The candidates of some query rows of the super-block (a slice, or ascending row numbers)
    against the current gallery block, gathered tile by tile, and the rows' thresholds."""

    def __init__(self, run: _Run, rows, n: int, everything: bool = False):
        self.run, self.rows, self.n, self.everything = run, rows, n, everything
        self.raw_parts: list = []
        self.norm_parts: list = []
        self.th_raw = np.full(n, -np.inf)
        self.th_norm = np.full(n, -np.inf)

    def collect(self, subs) -> None:
        run, block = self.run, self.run.block
        for t, (s0, s1) in enumerate(subs):
            if t == 0:
                self._sample(s0, s1)
                continue
            tile, mask = run.tile(self.rows, s0, s1)
            if (run.affine or run.item_scaled) and block.order is not None:
                run.trace.count("ordered_tiles")
                self._ordered(tile, mask, s0, t)
            else:
                run.trace.count("exact_tiles")
                self._exact(tile, mask, s0, s1)

    def fold(self, k: int, held, parts, theta):
        """The exact top-k of the rows' held list and its candidates, and which rows were not
        sure to be exact (fewer than k entries at or above a finite threshold)."""
        if not k:
            return (held[0][self.rows], held[1][self.rows]), np.zeros(self.n, dtype=bool)
        return self._ranked(k, self._joined(parts, held), theta)

    def _joined(self, parts, held):
        """(rows, indices, values) of candidate parts and of these rows' entries in a held list."""
        values, indices = held[0][self.rows], held[1][self.rows]
        r, c = np.nonzero(indices >= 0)
        parts = [*parts, (r, indices[r, c], values[r, c])]
        return tuple(np.concatenate(p) for p in zip(*parts, strict=True))

    def _ranked(self, k: int, candidates, theta, keep=None):
        """fold() of joined candidates (rows, indices, values). With `keep` (a mask of these
        rows), only those rows are ranked; the others come back empty and sure."""
        if keep is not None:
            candidates = _where(keep[candidates[0]], *candidates)
        top = topk.rank(*candidates, self.n, k)
        unsure = ~np.isneginf(theta) & (np.count_nonzero(top[0] >= theta[:, None], axis=1) < k)
        return top, unsure if keep is None else unsure & keep

    def fold_gated(self):
        """fold() of both lists when this block decides the dynamic gate (it holds the whole
        gallery): the raw top-1 of each row gives its gate, and a gated row needs only its
        normalised list, another row only its raw one: each row is ranked once. A gated row's raw
        list holds just its top-1 (all that finish() reads of it)."""
        lists, n = self.run.lists, self.n
        raw_candidates = self._joined(self.raw_parts, lists.raw)
        rows, idx, vals = raw_candidates
        best = np.full(n, -np.inf)
        np.maximum.at(best, rows, vals)
        tied = vals == best[rows]
        first = np.full(n, np.iinfo(np.int64).max)
        np.minimum.at(first, rows[tied], idx[tied])  # ties towards the lower index, as rank() orders them
        found = ~np.isneginf(best)
        gated = np.zeros(n, dtype=bool)
        gated[found] = self.run.norm.gated(first[found])
        self.run.trace.gate(gated)
        raw, unsure_raw = self._ranked(lists.raw_k, raw_candidates, self.th_raw, ~gated)
        norm_candidates = self._joined(self.norm_parts, lists.norm)
        norm, unsure_norm = self._ranked(lists.norm_k, norm_candidates, self.th_norm, gated)
        raw[0][gated, 0], raw[1][gated, 0] = best[gated], first[gated]
        # the top-1 is exact where an entry reached the raw threshold (nothing below it was collected)
        unsure_gate = ~found & ~np.isneginf(self.th_raw)
        return raw, norm, unsure_raw | unsure_norm | unsure_gate

    def _normed(self, tile, s0, s1):
        """The tile in the normalised list's terms: u = S − offset/scale in float32 (affine
        methods), or the exact η (Globally-Corrected)."""
        run = self.run
        if run.affine:
            return tile if run.shift32 is None else tile - run.shift32[s0:s1]
        if run.item_scaled:  # η in float32: (S − b_j/a_j)·a_j, within run.margin(tile) of η
            return (tile - run.shift32[s0:s1]) * run.scale32[s0:s1]
        return run.norm.transform(tile, run.gc_column(s0))

    def _piece(self, a: int, b: int):
        """Rows a:b of these rows, in the super-block's numbering (for run.tile and the lists)."""
        if isinstance(self.rows, slice):
            return slice(self.rows.start + a, self.rows.start + b)
        return self.rows[a:b]

    def _sample(self, s0, s1):
        """The first tile: speculative thresholds from it, then its candidates by exact tests. It
        is computed a piece of rows at a time, so that its several passes stay in the cache."""
        self.run.trace.count("sample_tiles")
        step = max(1, self.run.tiling.sample_piece_bytes // (4 * (s1 - s0)))
        for a, b in spans(self.n, step):
            tile, mask = self.run.tile(self._piece(a, b), s0, s1)
            self._sample_piece(tile, mask, s0, s1, a)

    def _sample_piece(self, tile, mask, s0, s1, r0):
        run, lists, width = self.run, self.run.lists, self.run.block.width
        if self.everything:  # every entry a candidate (thresholds stay −inf)
            self._exact(tile, mask, s0, s1, r0=r0)
            return
        part, rows = slice(r0, r0 + tile.shape[0]), self._piece(r0, r0 + tile.shape[0])
        normed = None
        if lists.raw_k:
            spec = _spec_k(lists.raw_k, s1 - s0, width, run.tiling.safety)
            self.th_raw[part] = np.maximum(topk.kth_lower_bound(tile, spec, SAMPLE_SPREAD), lists.raw[0][rows, -1])
        if lists.norm_k:
            spec = _spec_k(lists.norm_k, s1 - s0, width, run.tiling.safety)
            normed = self._normed(tile, s0, s1)
            if run.affine:
                low = topk.kth_lower_bound(normed, spec, SAMPLE_SPREAD)
                # lowered by the float32 rounding of u, so that the entries reaching it in u reach it in η
                th = (low - 2.0 ** -22 * (np.abs(low) + run.shift_max)) * run.norm.scale
            elif run.item_scaled:
                th = topk.kth_lower_bound(normed, spec) - run.margin(tile)
            else:
                th = topk.kth_lower_bound(normed, spec)
            self.th_norm[part] = np.maximum(th, lists.norm[0][rows, -1])
        self._exact(tile, mask, s0, s1, normed, r0)

    def _exact(self, tile, mask, s0, s1, normed=None, r0=0):
        """Candidates of a tile whose columns span any offsets: a test per list (`normed`: the
        tile's _normed values when the caller has them; the tile holds rows r0: of these rows)."""
        run, lists = self.run, self.run.lists
        part = slice(r0, r0 + tile.shape[0])
        eta = None
        if lists.raw_k:
            np.greater_equal(tile, topk.float_bound(self.th_raw[part], np.float32)[:, None], out=mask)
        if lists.norm_k:
            if normed is None:
                normed = self._normed(tile, s0, s1)
            if run.affine:
                # u = S − offset/scale in float32: |u − (S − offset/scale)| ≤ 2⁻²⁴·(|u| + |offset/scale|);
                # a margin of 2⁻²² times that magnitude covers it (and η's float64 rounding)
                held = self.th_norm[part] / run.norm.scale
                low = topk.float_bound(held - 2.0 ** -22 * (np.abs(held) + run.shift_max), np.float32)
                hit = normed >= low[:, None]
            elif run.item_scaled:
                hit = normed >= topk.float_bound(self.th_norm[part] - run.margin(tile), np.float32)[:, None]
            else:
                eta = normed
                hit = eta >= self.th_norm[part][:, None]
            if lists.raw_k:
                mask |= hit
            else:
                mask[...] = hit
        self._take(tile, mask, s0, eta, r0)

    def _ordered(self, tile, mask, s0, t):
        """Candidates of a tile of offset-ordered (scale-ordered) columns: one comparison per score."""
        run, lists = self.run, self.run.lists
        bound = np.full(self.n, np.inf)
        if lists.raw_k:
            bound = self.th_raw
        if lists.norm_k and run.item_scaled:
            # η ≥ θ ⇒ S ≥ θ/a_j + b_j/a_j ≥ θ·(1/a)_{hi or lo} + min b/a, lowered for float64 rounding
            inv_lo, inv_hi, ratio_lo = run.block.item_bounds[t]
            x = np.where(self.th_norm < 0, inv_hi, inv_lo) * self.th_norm + ratio_lo
            x = x - 2.0 ** -40 * (np.abs(self.th_norm) * inv_hi + abs(ratio_lo) + 1.0)
            bound = np.minimum(bound, x)
        elif lists.norm_k:
            low_offset = run.block.lows[t]
            # η ≥ θ ⇒ S ≥ (θ + offset)/scale ≥ (θ + lo)/scale, lowered for float64 rounding
            scale = run.norm.scale
            x = (self.th_norm + low_offset) / scale
            x = x - 2.0 ** -40 * (np.abs(self.th_norm) + 2 * run.offset_max) / scale
            bound = np.minimum(bound, x)
        np.greater_equal(tile, topk.float_bound(bound, np.float32)[:, None], out=mask)
        self._take(tile, mask, s0, None)

    def _take(self, tile, mask, s0, eta, r0=0):
        """Exact tests of the masked scores; the survivors join the lists' candidates."""
        run, lists, block = self.run, self.run.lists, self.run.block
        rows, cols, scores = _survivors(tile, mask)
        if rows.size == 0:
            return
        if eta is not None:
            eta = eta[rows, cols]
        rows = rows + r0 if r0 else rows
        scores = scores.astype(np.float64)
        positions = s0 + cols
        index = block.index[positions]
        if lists.raw_k:
            keep = np.flatnonzero(scores >= self.th_raw[rows])
            self.raw_parts.append((rows[keep], index[keep], scores[keep]))
        if lists.norm_k:
            if eta is not None:
                values = eta
            elif run.item_scaled:  # as Normaliser.transform evaluates it, to the bit
                values = np.multiply(scores, block.scale[positions])
                if block.offset is not None:
                    values -= block.offset[positions]
            else:
                values = run.norm.eta(scores, None if block.offset is None else block.offset[positions])
            keep = np.flatnonzero(values >= self.th_norm[rows])
            self.norm_parts.append((rows[keep], index[keep], values[keep]))


def _where(mask, *arrays):
    at = np.flatnonzero(mask)
    return tuple(a[at] for a in arrays)


def _fold_rows(run: _Run, rows, n: int, subs, everything: bool = False):
    """Candidates of `rows` over the tiles `subs`, ranked with their held lists:
    ((raw, norm) top-k lists of the rows, which rows are not sure to be exact)."""
    lists = run.lists
    found = _Candidates(run, rows, n, everything)
    found.collect(subs)
    if run.gate_decided:
        return found.fold_gated()
    raw, unsure_raw = found.fold(lists.raw_k, lists.raw, found.raw_parts, found.th_raw)
    norm, unsure_norm = found.fold(lists.norm_k, lists.norm, found.norm_parts, found.th_norm)
    return raw, norm, unsure_raw | unsure_norm


def _store(lists: Lists, rows, raw, norm, keep=slice(None)) -> None:
    lists.raw[0][rows], lists.raw[1][rows] = raw[0][keep], raw[1][keep]
    lists.norm[0][rows], lists.norm[1][rows] = norm[0][keep], norm[1][keep]


def _row_tile(run: _Run, r0: int, r1: int) -> int:
    """Fold the block into rows r0:r1, recomputing at once those whose thresholds were too high:
    a tile's lists then depend on that tile alone, never on which other rows share its block or
    super-block (the product of a row with other rows rounds otherwise than with fewer: float32
    scores from gemm depend on the operands' shapes). Returns the scores done."""
    raw, norm, unsure = _fold_rows(run, slice(r0, r1), r1 - r0, run.block.subs)
    sure = np.flatnonzero(~unsure)
    _store(run.lists, r0 + sure, raw, norm, sure)
    redo = r0 + np.flatnonzero(unsure)
    step = max(1, int(run.geom.rows * run.geom.sub_columns // run.block.width))  # a tile's worth of scores
    for a, b in spans(redo.size, step):
        _recompute(run, redo[a:b])
    return (r1 - r0) * run.block.width


def _recompute(run: _Run, rows: np.ndarray) -> None:
    """Rows whose speculative threshold was too high, against the whole block in one tile: its
    threshold is then a lower bound of the k-th best, so the result is exact (were rounding ever
    to defeat the bound's margins, those rows would take every entry as a candidate)."""
    run.trace.count("recomputed_rows", rows.size)
    raw, norm, unsure = _fold_rows(run, rows, rows.size, [(0, run.block.width)])
    if not run.tiling.trust_recompute:
        unsure = np.ones_like(unsure)
    sure = np.flatnonzero(~unsure)
    _store(run.lists, rows[sure], raw, norm, sure)
    if unsure.any():
        rows = rows[unsure]
        raw, norm, _ = _fold_rows(run, rows, rows.size, [(0, run.block.width)], everything=True)
        _store(run.lists, rows, raw, norm)


class _Run:
    """One gallery block against one super-block of query rows."""

    def __init__(self, scores, norm: Normaliser, lists: Lists, block: Block, q0: int, geom: Geometry, tiling: Tiling,
                 trace: Trace):
        self.scores, self.norm, self.lists, self.block, self.q0, self.geom = scores, norm, lists, block, q0, geom
        self.tiling, self.trace = tiling, trace
        # the whole gallery in this block: its raw top-1 is final, and with it the dynamic gate
        self.gate_decided = (norm.gate is not None and not norm.row_topk and lists.raw_k > 0 and lists.norm_k > 0
                             and block.c0 == 0 and block.c1 == scores.n_cols)
        self.affine = norm.affine
        self.item_scaled = norm.exportable and block.scale is not None  # a_j·S − b_j, a scale per item
        self.shift32 = self.shift_max = None
        self.offset_max = 0.0
        if self.affine and block.offset is not None:
            shift = block.offset / norm.scale
            self.shift32 = shift.astype(np.float32)
            self.shift_max = float(np.abs(shift).max()) if shift.size else 0.0
            self.offset_max = float(np.abs(block.offset).max()) if shift.size else 0.0
        elif self.affine:
            self.shift_max = 0.0
        if self.item_scaled:
            shift = block.offset / block.scale if block.offset is not None else np.zeros(block.width)
            self.shift32, self.scale32 = shift.astype(np.float32), block.scale.astype(np.float32)
            self.shift_max = float(np.abs(shift).max()) if shift.size else 0.0
            self.scale_max = float(block.scale.max()) if shift.size else 0.0

    def margin(self, tile) -> float:
        """How far the float32 η of run._normed may lie from the float64 one (a per-item scale):
        S − shift rounds by 2⁻²⁴ of its magnitude, a_j and the product by as much again."""
        return 2.0 ** -20 * self.scale_max * ((float(np.abs(tile).max()) if tile.size else 0.0) + self.shift_max)

    def gc_column(self, s0: int) -> int:
        return self.block.c0 + s0  # gc blocks keep the gallery order

    def tile(self, rows, s0: int, s1: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores of `rows` (super-block numbering) against block positions s0:s1, query-major,
        with a mask buffer of the same layout."""
        q = self.q0 + rows if isinstance(rows, np.ndarray) else slice(self.q0 + rows.start, self.q0 + rows.stop)
        if self.scores.sub_columns:
            return self.scores.product_tile(q, s0, s1, _scratch)
        values = self.scores.read_rows(q, self.block.c0 + s0, self.block.c0 + s1)
        mask = _scratch(values.shape)[1]
        return values, mask


def list_lengths(norm: Normaliser, top_k: int) -> tuple[int, int]:
    """(raw_k, norm_k): the raw list serves the baseline, the gate's top-1 and CSLS's row term."""
    raw_k = top_k if (norm.identity or norm.gate is not None) else 0
    return max(raw_k, norm.row_topk), (0 if norm.identity else top_k)


def rank_block(scores: ScoreSource, norm: Normaliser, lists: Lists, c0: int, c1: int, q0: int, geom: Geometry,
               progress: Callable[[int], None] | None = None, tiling: Tiling = Tiling(),
               trace: Trace | None = None, threaded: bool | None = None) -> None:
    """Fold gallery columns c0:c1 into `lists` (query rows q0: of the scores), row tile by row
    tile on all cores, each tile recomputing the few rows whose thresholds were too high."""
    ordered = scores.sub_columns and norm.exportable
    block = Block(c0, c1, norm, geom.sub_columns, ordered, tiling.sample_columns)
    if scores.sub_columns:
        scores.prepare_columns(c0, c1, block.order)
    run = _Run(scores, norm, lists, block, q0, geom, tiling, trace if trace is not None else Trace())
    spans_ = list(spans(lists.raw[0].shape[0], geom.rows))
    for done in parallel.run_tasks(lambda span: _row_tile(run, *span), spans_, threaded):
        if progress:
            progress(done)


def finish(lists: Lists, norm: Normaliser, top_k: int):
    """(values, indices, normalised) of a super-block: gated rows normalised, the others raw."""
    n = lists.raw[0].shape[0]
    if lists.raw_k:
        gated = norm.gated(lists.raw[1][:, 0])
    else:
        gated = norm.gated(np.zeros(n, dtype=np.int64))
    if not lists.norm_k:
        return lists.raw[0][:, :top_k], lists.raw[1][:, :top_k], gated
    # in place: the lists are done with, and fresh output arrays would cost their first touch
    values, indices = lists.norm
    term = norm.row_term(lists.raw[0] if norm.row_topk else None)
    if np.ndim(term):
        values -= term[:, None]
    if norm.gate is None:
        return values, indices, gated
    raw_rows = np.flatnonzero(~gated)
    values[raw_rows] = lists.raw[0][raw_rows, :top_k]
    indices[raw_rows] = lists.raw[1][raw_rows, :top_k]
    return values, indices, gated


@dataclass(frozen=True)
class Plan:
    """How a ranking run is cut: its tile geometry, query rows per super-block (the unit whose
    lists are held at once) and the lengths of the raw and normalised lists."""

    geom: Geometry
    super_rows: int
    raw_k: int
    norm_k: int
    top_k: int


def ranking_plan(scores: ScoreSource, norm: Normaliser, budget: Budget, top_k: int, tiling: Tiling = Tiling(),
                 workers: int | None = None) -> Plan:
    """The plan of run_ranking for `workers` threads (default: this process's cores)."""
    n_rows, n_cols = scores.n_rows, scores.n_cols
    raw_k, norm_k = list_lengths(norm, top_k)
    # per row: the lists (value and index), their candidates (≈ safety·k each) and the merges
    row_bytes = 16 * (raw_k + norm_k) * (2 + tiling.safety) + 32
    ledger = budget.ledger(held=held_bytes(scores))
    geom = geometry(scores, n_rows, n_cols, budget, workers or parallel.workers(), tiling, ledger,
                    keep=row_bytes)  # a super-block of one row at least
    super_rows = ledger.rows(row_bytes, share=ROW_STATE_SHARE, total=n_rows, align=geom.rows)
    return Plan(geom, super_rows, raw_k, norm_k, top_k)


def rank_rows(scores: ScoreSource, norm: Normaliser, plan: Plan, q0: int, q1: int,
              progress: Callable[[int], None] | None = None, tiling: Tiling = Tiling(),
              trace: Trace | None = None, threaded: bool | None = None) -> tuple:
    """(values, indices, normalised) of query rows q0:q1 over the whole gallery. With q0 a
    multiple of plan.geom.rows into a super-block, and `threaded` as the super-block's tiles
    decide it (parallel.threads_for), the products are the super-block's own: rows cut this way
    give the same lists as the whole super-block."""
    lists = Lists(q1 - q0, plan.raw_k, plan.norm_k)
    for c0, c1 in spans(scores.n_cols, plan.geom.block_columns):
        rank_block(scores, norm, lists, c0, c1, q0, plan.geom, progress, tiling, trace, threaded)
    return finish(lists, norm, plan.top_k)


def run_ranking(scores: ScoreSource, norm: Normaliser, budget: Budget, top_k: int,
                progress: Callable[[int], None] | None = None, tiling: Tiling = Tiling(),
                trace: Trace | None = None) -> Iterable[tuple[int, tuple]]:
    """Yield (first row, (values, indices, normalised)) for consecutive super-blocks of query rows:
    the top_k best per row (float64), best first, ties towards the lower gallery index.

    `tiling` cuts the work (any tiling gives the same result); `trace` counts what was done."""
    plan = ranking_plan(scores, norm, budget, top_k, tiling)
    for q0, q1 in spans(scores.n_rows, plan.super_rows):
        yield q0, rank_rows(scores, norm, plan, q0, q1, progress, tiling, trace)
