"""Querybank statistics of a gallery, accumulated tile by tile (partial + merge), pure numpy.

P[i, j] = s(b_i, g_j) for bank item i and gallery item j. Per gallery column j:
  log_norm[β, j]   = logsumexp_i(β · P[i, j])            (Inverted Softmax denominator in log
                                                          form; Bogolin et al., CVPR 2022, Eq. 3)
  largest_means[K, j] = mean of the K largest P[:, j]    (CSLS r_j, Conneau et al. 2018;
                                                          NNN b_j, Chowdhury et al. 2024)
  sorted scores    = P[:, j] ascending                   (Globally-Corrected ranks, Dinu et al. 2015)
  column_mean[j]   = mean_i P[i, j]                      (Distribution Normalisation, Zhou et al. 2023)
  topk_kth[K, j]   = the K-th largest P[:, j]            (Local Scaling σ_j, Schnitzer et al. 2012)
  topk_distance[K, j] = mean of √(2 − 2·P) over the K largest (NICDM μ_j, Jégou et al. 2007;
                                                          cosine scores: d = √(2 − 2s))
  column_std[j]    = std_i P[i, j], with column_moments  (Mutual Proximity σ_j, Schnitzer 2012)
  column_topk_index[j] = the bank rows of the K largest P[:, j], with neighbor_k = K (DisSimLocal's
                                                          c_k(g), Hara et al. 2016)
Per bank row i: its kmax highest-scoring gallery items (the DIS activation set, QB-Norm Sec. 3.4).

The gallery is split into column blocks; every column statistic is complete once all bank rows of
a column block have been seen, so only O(block) state is held besides the O(gallery) results.

Cost per bank score: one float64 exp per β (log-sum-exp against a running column maximum, summed
in float64: float32 exp would miss the 1e-9 relative accuracy of the log-normalisers), a few cheap
passes (column maximum, sums), and one comparison each for the column top-K and the row top-kmax:
only scores above a running threshold (the current K-th best of the column, the kmax-th best of
the row) are merged, a few per column and row over the whole bank.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from qbnorm_cli.core import topk
from qbnorm_cli.core.hubness import skewness
from qbnorm_cli.core.probestats import COLUMN_FIELDS, ITEM_MAJOR, SPARE
from qbnorm_cli.core.scale import ScoreStats

_SUB_ITEMS = 1 << 17  # float64 items per piece: 1 MiB, cache-resident while exponentiated
# A row's sum of exp(β·(P − M)) is accurate to float64's rounding when it is at least e^−600: its
# terms below the smallest normal number (e^−708) then add at most n·e^−708 (n < e^50 columns).
ROW_SUM_RANGE = 600.0
_LOCAL = threading.local()


def _scratch(size: int, slot: int) -> np.ndarray:
    """A float64 buffer of this thread's, reused (fresh large arrays cost page faults each time)."""
    bufs = getattr(_LOCAL, "bufs", None)
    if bufs is None:
        bufs = _LOCAL.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.size < size:
        buf = bufs[slot] = np.empty(max(size, _SUB_ITEMS))
    return buf[:size]


def serial_chunks(n_rows: int, n_items: int, fn):
    """Run fn(0, n_rows) now; returns a function that gives its results (a list of one). The
    streaming layer passes a parallel version (streaming.parallel.start_row_chunks) instead."""
    done = [fn(0, n_rows)]
    return lambda: done


def activation_mask(neighbors: np.ndarray, k: int, n_gallery: int) -> np.ndarray:
    """Gallery items among the top-k of at least one bank row (the DIS activation set A)."""
    mask = np.zeros(n_gallery, dtype=bool)
    mask[neighbors[:, :k].ravel()] = True
    return mask


def occurrence(neighbors: np.ndarray, k: int, n_gallery: int) -> np.ndarray:
    """How many bank rows have each gallery item among their top-k (bank-side k-occurrence)."""
    return np.bincount(neighbors[:, :k].ravel(), minlength=n_gallery).astype(np.int32)


class ColumnTopK:
    """The K largest values of each column of a column block, over row tiles (a multiset of values:
    which row a value came from does not matter, so ties need no rule). With a `floor`, only those
    above it (an update's new bank rows: only scores above an item's old K-th largest enter its K
    largest), at one comparison per score: the few that pass are kept as (column, value) pairs
    until they would outnumber a quarter of the held values (then merged into them)."""

    def __init__(self, width: int, k: int, floor: np.ndarray | None = None) -> None:
        self.k, self.width = k, width
        self.values = None  # (width, k) unordered; the first `count` slots are real
        self.count = 0
        self._pairs = None
        if floor is not None:  # values at or below a column's floor are never wanted: −inf pads stand for them
            # (the held values are made only if the pairs are folded into them: most blocks never are)
            self.count, self.bound = k, np.asarray(floor, dtype=np.float64)
            self._pairs, self._paired = [], 0
        else:
            self.values = np.full((width, k), -np.inf)
            self.bound = np.full(width, -np.inf)  # the K-th largest once count == k

    def update(self, tile: np.ndarray) -> None:
        if tile.shape[0] == 0:
            return
        if self._pairs is not None:
            flat = np.flatnonzero(tile > topk.float_bound(self.bound, tile.dtype, strict=True)[None, :])
            rows, cols = np.divmod(flat, tile.shape[1])  # (flat: a 2-D nonzero is several times slower)
            self._pairs.append((cols, tile[rows, cols]))
            self._paired += cols.size
            if self._paired * 4 > self.width * self.k:
                self._fold()
            return
        if self.count == 0 and tile.shape[0] >= 16 * self.k:
            # a fresh block and a tall tile: everything at or above a lower bound of each column's
            # K-th largest (from column-group maxima, about one pass), then only those are merged
            bound = topk.kth_lower_bound_columns(tile, self.k)
            flat = np.flatnonzero(tile >= topk.float_bound(bound, tile.dtype)[None, :])
            self._merge(tile, flat)
            self.count = self.k
            return
        if self.count < self.k:
            merged = np.concatenate([self.values[:, : self.count], tile.T.astype(np.float64)], axis=1)
            keep = min(self.k, merged.shape[1])
            if merged.shape[1] > keep:
                merged = np.partition(merged, merged.shape[1] - keep, axis=1)[:, merged.shape[1] - keep:]
            self.values[:, :keep] = merged
            self.count = keep
            if keep == self.k:
                self.bound = merged.min(axis=1)
            return
        # Only values above the column's K-th largest change the multiset (an equal one would
        # replace an equal one): one comparison, and a merge of the few that pass.
        thr = topk.float_bound(self.bound, tile.dtype, strict=True)
        flat = np.flatnonzero(tile > thr[None, :])
        if flat.size == 0:
            return
        if flat.size * 8 > tile.size:
            # not selective (a small bank): one partition of held ∪ the tile's values above the
            # bounds per column (the bounds never fall: a floor stays)
            above = np.where(tile.T > thr[:, None], tile.T.astype(np.float64), -np.inf)
            merged = np.concatenate([self.values, above], axis=1)
            top = np.partition(merged, merged.shape[1] - self.k, axis=1)[:, merged.shape[1] - self.k:]
            self.values[...] = top
            self.bound = np.maximum(self.bound, top.min(axis=1))
            return
        self._merge(tile, flat)

    def _merge(self, tile: np.ndarray, flat: np.ndarray) -> None:
        """Merge the tile's entries at flat positions into the held values of their columns."""
        rows, cols = np.divmod(flat, tile.shape[1])
        self._merge_pairs(cols, tile[rows, cols])

    def _fold(self) -> None:
        """Merge the pairs kept above the floor into the held values; from now on, merge as usual."""
        pairs, self._pairs = self._pairs, None
        self.values = np.full((self.width, self.k), -np.inf)
        if pairs:
            self._merge_pairs(np.concatenate([c for c, _ in pairs]), np.concatenate([v for _, v in pairs]))

    def _merge_pairs(self, cols: np.ndarray, vals: np.ndarray) -> None:
        """Merge values into the held values of their columns."""
        if cols.size == 0:
            return
        # group by column: a stable sort of 16-bit keys is a radix sort (int64 would be a timsort)
        keys = cols.astype(np.uint16) if self.values.shape[0] <= 1 << 16 else cols
        order = np.argsort(keys, kind="stable")
        cols, vals = cols[order], vals[order].astype(np.float64)
        starts = np.flatnonzero(np.r_[True, cols[1:] != cols[:-1]])
        counts = np.diff(np.r_[starts, cols.size])
        slot = np.repeat(np.arange(starts.size), counts)
        target = cols[starts]
        pad = np.full((starts.size, self.k + int(counts.max())), -np.inf)
        pad[:, : self.k] = self.values[target]
        pad[slot, self.k + np.arange(cols.size) - starts[slot]] = vals
        top = np.partition(pad, pad.shape[1] - self.k, axis=1)[:, pad.shape[1] - self.k:]
        self.values[target] = top
        self.bound[target] = np.maximum(self.bound[target], top.min(axis=1))

    def descending(self, out: np.ndarray | None = None) -> np.ndarray:
        """(width, count) the held values, largest first; written into `out` when given (an
        accumulator's own rows: no block-sized table made, filled and copied). Above a floor, with
        the values still kept as pairs and no `out`: only as many columns as a column holds values
        (−inf pads after them)."""
        if self._pairs is not None:  # only the few above the floor: placed in their rows, not a sort of every row
            cols, vals = (np.concatenate(part) for part in zip(*self._pairs, strict=True)) if self._pairs \
                else (np.zeros(0, dtype=np.int64), np.zeros(0))
            order = np.lexsort((-vals, cols))  # by column, largest first
            cols, vals = cols[order], vals[order].astype(np.float64)
            starts = np.flatnonzero(np.r_[True, cols[1:] != cols[:-1]]) if cols.size else np.zeros(0, dtype=np.int64)
            rank = np.arange(cols.size) - np.repeat(starts, np.diff(np.r_[starts, cols.size]))
            keep = rank < self.k
            if out is None:
                out = np.empty((self.width, min(self.k, int(rank.max(initial=-1)) + 1)))
            out[...] = -np.inf
            out[cols[keep], rank[keep]] = vals[keep]
            return out
        top = -np.sort(-self.values[:, : self.count], axis=1)
        if out is None:
            return top
        out[...] = top
        return out


def top_means(ordered: np.ndarray, ks) -> np.ndarray:
    """(len(ks), width): mean of the K largest values per column of `ordered` (width × count, each
    row descending; of all when fewer exist), in float64."""
    ordered = np.asarray(ordered, dtype=np.float64)
    return np.stack([ordered[:, : min(k, ordered.shape[1])].mean(axis=1) for k in ks])


def top_kths(ordered: np.ndarray, ks) -> np.ndarray:
    """(len(ks), width): the K-th largest value per column (the smallest held when fewer exist)."""
    ordered = np.asarray(ordered, dtype=np.float64)
    return np.stack([ordered[:, min(k, ordered.shape[1]) - 1] for k in ks])


def top_distance_means(ordered: np.ndarray, ks) -> np.ndarray:
    """(len(ks), width): mean of √(2 − 2·s) over the K largest s per column (cosine distances)."""
    dist = cosine_distance(ordered)
    return np.stack([dist[:, : min(k, ordered.shape[1])].mean(axis=1) for k in ks])


def cosine_distance(scores: np.ndarray) -> np.ndarray:
    """d = √(2 − 2s) of cosine similarities (of L2-normalised vectors), float64, clipped at 0."""
    dist = np.array(scores, dtype=np.float64)  # a copy, then in place: 2 − 2s as (−2s) + 2, the same rounding
    dist *= -2.0
    dist += 2.0
    np.maximum(dist, 0.0, out=dist)
    return np.sqrt(dist, out=dist)


@dataclass
class BankAccumulator:
    """Statistics of one bank against the gallery, fed tile by tile in gallery-column blocks.

    Column blocks must come left to right (run_probe does): the bank neighbours then need no tie
    merging against earlier columns.
    """

    n_rows: int
    n_gallery: int
    betas: np.ndarray
    kmax: int
    topk_ks: tuple[int, ...] = ()
    keep_sorted: bool = False
    column_moments: bool = False  # also each column's standard deviation
    neighbor_k: int = 0           # also each column's neighbor_k best bank rows
    item_floor: np.ndarray | None = None  # item_top keeps only scores above it (−inf pads); nothing derived
    row_floor: np.ndarray | None = None   # each row's neighbours: only items above it (topk.RunningTopK)
    row_sums: bool = False                # also each row's log Σ_j exp(β·P[row, j]) (row_log_sums)
    log_norm: np.ndarray = field(init=False)
    largest_means: np.ndarray = field(init=False)
    topk_kth: np.ndarray = field(init=False)
    topk_distance: np.ndarray = field(init=False)
    column_mean: np.ndarray = field(init=False)
    column_std: np.ndarray | None = field(init=False)
    column_topk_index: np.ndarray | None = field(init=False)
    neighbors: topk.RunningTopK = field(init=False)
    # what an update of the probe merges (core/probestats.py): each item's K largest bank scores
    # (descending), its score sum, sum of squares, min and max; each row's neighbours keep SPARE more
    item_top: np.ndarray = field(init=False)
    item_score_sum: np.ndarray = field(init=False)
    item_score_sumsq: np.ndarray = field(init=False)
    item_score_min: np.ndarray = field(init=False)
    item_score_max: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.betas = np.asarray(self.betas, dtype=np.float64)
        self.log_norm = np.full((len(self.betas), self.n_gallery), -np.inf)
        self.largest_means = np.zeros((len(self.topk_ks), self.n_gallery))
        self.topk_kth = np.zeros((len(self.topk_ks), self.n_gallery))
        self.topk_distance = np.zeros((len(self.topk_ks), self.n_gallery))
        self.column_mean = np.zeros(self.n_gallery)
        self.column_std = np.zeros(self.n_gallery) if self.column_moments else None
        self.neighbor_k = min(self.neighbor_k, self.n_rows)
        self.column_topk_index = np.zeros((self.n_gallery, self.neighbor_k), dtype=np.int32) \
            if self.neighbor_k else None
        self.neighbors = topk.RunningTopK(self.n_rows, min(self.kmax + SPARE, self.n_gallery), self.row_floor)
        # with a floor, only as many columns as an item has scores above it (a few: an update's new rows)
        width = 0 if self.item_floor is not None else min(max(self.topk_ks, default=0), self.n_rows)
        self.item_top = np.zeros((self.n_gallery, width), dtype=np.float32)
        self.item_score_sum = np.zeros(self.n_gallery)
        self.item_score_sumsq = np.zeros(self.n_gallery)
        self.item_score_min = np.full(self.n_gallery, np.inf, dtype=np.float32)
        self.item_score_max = np.full(self.n_gallery, -np.inf, dtype=np.float32)
        self._row_lse = np.full((len(self.betas), self.n_rows), -np.inf) if self.row_sums else None
        self._row_shift = np.full(len(self.betas), -np.inf)  # the largest β·M a row sum was scaled by
        self._block = None

    @property
    def kept_neighbors(self) -> int:
        """The neighbours per row the normalisers read (kmax, or the whole gallery when smaller)."""
        return min(self.kmax, self.n_gallery)

    # The per-item results (core/probestats.py declares them): what a column block's worker hands back.
    COLUMN_FIELDS = COLUMN_FIELDS
    ITEM_MAJOR = ITEM_MAJOR

    def column_parts(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.COLUMN_FIELDS if getattr(self, name) is not None}

    def place_columns(self, c0: int, c1: int, parts: dict[str, np.ndarray]) -> None:
        """Columns c0:c1 from another accumulator's `column_parts` (of exactly those columns)."""
        for name, part in parts.items():
            if name == "item_top":
                self._place_top(c0, c1, part)
                continue
            held = getattr(self, name)
            if name in self.ITEM_MAJOR:
                held[c0:c1] = part
            else:
                held[..., c0:c1] = part

    def _place_top(self, c0: int, c1: int, top: np.ndarray) -> None:
        """Items c0:c1's largest scores (descending, −inf pads), into item_top; with a floor, item_top
        widens to the widest (its other items padded with −inf)."""
        if top.shape[1] > self.item_top.shape[1]:
            self.item_top = np.pad(self.item_top, ((0, 0), (0, top.shape[1] - self.item_top.shape[1])),
                                   constant_values=-np.inf)
        self.item_top[c0:c1, :top.shape[1]] = top
        self.item_top[c0:c1, top.shape[1]:] = -np.inf

    def start_block(self, c0: int, c1: int) -> None:
        self._block = (c0, c1)
        width = c1 - c0
        self._colmax = np.full(width, -np.inf)
        self._sums = np.zeros((len(self.betas), width))
        self._column_sums = np.zeros(width)
        self._column_sumsq = np.zeros(width)
        self._column_best = topk.RunningTopK(width, self.neighbor_k) if self.neighbor_k else None
        kcol = min(max(self.topk_ks, default=0), self.n_rows)  # a larger K means all of them
        floor = self.item_floor[c0:c1] if self.item_floor is not None else None
        self._top = ColumnTopK(width, kcol, floor) if kcol else None
        self._sorted = np.empty((self.n_rows, width), dtype=np.float32) if self.keep_sorted else None

    def update(self, r0: int, tile: np.ndarray, chunks=serial_chunks) -> None:
        """Fold in P[r0:r0+len(tile), c0:c1] for the current column block.

        `chunks(n_rows, n_items, fn)` runs the exponentials over row chunks and returns a function
        that waits for them (serial here; on all cores from the streaming layer): meanwhile the
        column and row top-k statistics are folded in."""
        c0, _ = self._block
        if tile.shape[0] == 0:
            return
        tile_max = tile.max(axis=0).astype(np.float64)
        c1 = c0 + tile.shape[1]
        np.minimum(self.item_score_min[c0:c1], tile.min(axis=0), out=self.item_score_min[c0:c1])
        np.maximum(self.item_score_max[c0:c1], tile_max.astype(np.float32), out=self.item_score_max[c0:c1])
        finish = self._log_sum_exp(r0, tile, tile_max, chunks)  # may run on other threads meanwhile
        try:
            if self._top is not None:
                self._top.update(tile)
            if self._sorted is not None:
                self._sorted[r0:r0 + tile.shape[0]] = tile
            self.neighbors.update(r0, tile, c0, forward=True)
            if self._column_best is not None:  # bank rows come in order: ties go to the lower row
                self._column_best.update(0, np.ascontiguousarray(tile.T), r0, forward=True)
        finally:
            finish()

    def _log_sum_exp(self, first_row: int, tile: np.ndarray, tile_max: np.ndarray, chunks):
        """Running per-column max m and Σ exp(β·(P − m)) in float64; also the score sums (per column:
        the pass that sums every score anyway gives the column means at no extra cost), and with
        row_sums each row's Σ_j exp(β·(P − M)) over the tile, M = max_j m_j: the same exponentials
        weighted by exp(β·(m_j − M)) ≤ 1, one matrix–vector product (row_log_sums).

        Starts the work on the worker threads and returns the function that folds it in."""
        new_max = np.maximum(self._colmax, tile_max)
        grown = new_max > self._colmax
        if grown.any():
            for b, beta in enumerate(self.betas):
                # rescale what was summed against the old maximum (0 before the first tile)
                self._sums[b, grown] *= np.exp(beta * (self._colmax[grown] - new_max[grown]))
            self._colmax = new_max
        colmax, betas = self._colmax, self.betas
        weights = peak = None
        if self._row_lse is not None:  # only then: this runs for every tile of every probe
            peak = float(colmax.max(initial=-np.inf))
            weights = [np.exp(beta * (colmax - peak)) for beta in betas]

        def chunk(r0: int, r1: int):
            sums = np.zeros((len(betas), tile.shape[1]))
            column_sums = np.zeros(tile.shape[1])
            column_sumsq = np.zeros(tile.shape[1])
            row_sums = np.zeros((len(betas), r1 - r0)) if weights is not None else None
            step = max(1, _SUB_ITEMS // max(tile.shape[1], 1))
            for a in range(r0, r1, step):  # cache-sized pieces through a reused buffer
                part = tile[a:min(a + step, r1)]
                x = _scratch(part.size, 0).reshape(part.shape)
                work = x if len(betas) == 1 else _scratch(part.size, 1).reshape(part.shape)
                x[...] = part
                column_sums += x.sum(axis=0)
                square = _scratch(part.size, 2).reshape(part.shape)
                np.multiply(x, x, out=square)  # not einsum: its sums depend on the buffer's alignment
                column_sumsq += square.sum(axis=0)
                np.subtract(x, colmax, out=x)  # exact: both are float32 values
                for b, beta in enumerate(betas):
                    np.multiply(x, beta, out=work)
                    np.exp(work, out=work)
                    sums[b] += work.sum(axis=0)
                    if weights is not None:
                        np.matmul(work, weights[b], out=row_sums[b, a - r0:a - r0 + part.shape[0]])
            return r0, column_sums, column_sumsq, sums, row_sums

        wait = chunks(tile.shape[0], tile.size, chunk)

        def finish() -> None:
            for r0, column_sums, column_sumsq, sums, row_sums in wait():
                self._column_sums += column_sums
                self._column_sumsq += column_sumsq
                self._sums += sums
                if row_sums is not None:
                    rows = slice(first_row + r0, first_row + r0 + row_sums.shape[1])
                    with np.errstate(divide="ignore"):
                        np.logaddexp(self._row_lse[:, rows], np.log(row_sums) + (betas * peak)[:, None],
                                     out=self._row_lse[:, rows])
            if weights is not None:
                np.maximum(self._row_shift, betas * peak, out=self._row_shift)

        return finish

    def row_log_sums(self) -> np.ndarray | None:
        """(len(betas), n_rows): each bank row's log Σ_j exp(β·P[row, j]) over every column (with
        row_sums), or None when a row's sum was not accurate: one whose terms all lay more than
        ROW_SUM_RANGE below the largest score (in β·P) summed subnormal or flushed exponentials."""
        if self._row_lse is None or not np.isfinite(self._row_lse).all():
            return None
        if (self._row_lse.min(axis=1, initial=np.inf) < self._row_shift - ROW_SUM_RANGE).any():
            return None
        return self._row_lse

    def finish_block(self) -> np.ndarray | None:
        """Store the block's column statistics; returns its sorted scores (columns × rows) if kept."""
        c0, c1 = self._block
        with np.errstate(divide="ignore"):
            for b, beta in enumerate(self.betas):
                self.log_norm[b, c0:c1] = beta * self._colmax + np.log(self._sums[b])
        if self._top is not None:
            if self.item_floor is None:
                self._top.descending(out=self.item_top[c0:c1])
            else:
                self._place_top(c0, c1, self._top.descending())
        self.item_score_sum[c0:c1] = self._column_sums
        self.item_score_sumsq[c0:c1] = self._column_sumsq
        derive_items(self, slice(c0, c1), top=self.item_floor is None)
        if self._column_best is not None:
            self.column_topk_index[c0:c1] = self._column_best.indices
        sorted_block = None
        if self._sorted is not None:
            sorted_block = np.sort(self._sorted.T, axis=1)
        self._block = self._colmax = self._sums = self._column_sums = self._top = self._sorted = None
        self._column_sumsq = self._column_best = None
        return sorted_block

    def score_stats(self) -> ScoreStats:
        """min, max, mean and std of every bank score seen."""
        return ScoreStats.from_sums(self.n_rows * self.n_gallery, float(self.item_score_sum.sum()),
                                    float(self.item_score_sumsq.sum()), float(self.item_score_min.min()),
                                    float(self.item_score_max.max()))


def derive_items(acc, columns, top: bool = True) -> None:
    """Top-K means, K-th values and distances (unless not `top`), column means and spreads of the
    columns `columns` (a slice or item numbers) of `acc` (a BankAccumulator, or an update's merged
    records) from its item_top and sums: the one place a probe and an update compute them."""
    if top and acc.item_top.shape[1] and acc.topk_ks:
        items = np.arange(acc.n_gallery)[columns] if isinstance(columns, slice) else columns
        step = max(1, _SUB_ITEMS // acc.item_top.shape[1])
        for p in range(0, len(items), step):  # cache-sized pieces (each item's values are its own)
            part = items[p:p + step]
            ordered = acc.item_top[part]  # descending already
            acc.largest_means[:, part] = top_means(ordered, acc.topk_ks)
            acc.topk_kth[:, part] = top_kths(ordered, acc.topk_ks)
            acc.topk_distance[:, part] = top_distance_means(ordered, acc.topk_ks)
    acc.column_mean[columns] = acc.item_score_sum[columns] / acc.n_rows
    if acc.column_std is not None:
        variance = acc.item_score_sumsq[columns] / acc.n_rows - acc.column_mean[columns] ** 2
        acc.column_std[columns] = np.sqrt(np.maximum(variance, 0.0))


# --- bank diagnostics: QB-Norm (Bogolin et al., CVPR 2022, Sec. 4) shows that a far-domain or
# adversarial bank, whose queries all retrieve the same few hubs, makes IS worse than no
# normalisation while DIS, which leaves queries outside the activation set alone, is robust.
LOW_COVERAGE = 0.5
CONCENTRATED = 0.1  # coverage below this: the bank piles onto a few items (far-domain or adversarial)
SMALL_BANK = 5  # bank rows × k below this many times the gallery size: too few to cover it under hubness


def bank_diagnostics(neighbors: np.ndarray, k: int, n_gallery: int) -> dict:
    """Coverage of the activation set and the skewness of the bank-side k-occurrence."""
    counts = occurrence(neighbors, k, n_gallery)
    covered = int(np.count_nonzero(counts))
    return {"coverage": covered / n_gallery, "covered_items": covered, "occurrence_skewness": skewness(counts),
            "k": k, "bank_rows": int(neighbors.shape[0])}


def coverage_warning(diag: dict, n_gallery: int, robust: str) -> str | None:
    """A one-line warning and recommendation when the bank covers under half of the gallery;
    `robust` names the setting that is safe with such a bank (DIS)."""
    if diag["coverage"] >= LOW_COVERAGE:
        return None
    small = diag["bank_rows"] * diag["k"] < SMALL_BANK * n_gallery
    size = f"{diag['bank_rows']} queries for {n_gallery} gallery items"
    if small and diag["coverage"] >= CONCENTRATED:
        advice = f"enlarge the bank (it has {size})"
    elif small:
        advice = f"re-sample the bank from in-domain training queries and enlarge it (it has {size})"
    else:
        advice = "re-sample the bank from in-domain training queries"
    return (f"low bank coverage: the top-{diag['k']} items of the {diag['bank_rows']} bank queries cover only "
            f"{100 * diag['coverage']:.1f}% of the gallery ({diag['covered_items']} of {n_gallery} items; "
            f"k-occurrence skewness {diag['occurrence_skewness']:.1f}); a far-domain or adversarial bank can make "
            f"is/csls worse than no normalisation: use {robust} (it leaves queries outside the activation "
            f"set alone), or {advice}")
