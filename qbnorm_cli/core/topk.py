"""Exact, deterministic per-row top-k selection, mergeable across column blocks.

Ties are broken towards the lower column index, so results never depend on how the columns were
split into blocks. Unfilled slots hold value −inf and index −1.

Speed: nothing here sorts or partitions a whole tile. A tile is reduced to a few candidates per row
by one comparison against a per-row lower bound of the k-th best value, and only those candidates
are ranked exactly:
  * a running top-k's own k-th best value (`RunningTopK.bound`) once it holds k items, and
  * for a fresh tile, `kth_lower_bound`: fold the row's columns into s ≥ 4k disjoint groups by
    elementwise maxima (≈ one pass), the k-th largest of those s group maxima is ≤ the row's
    k-th largest value (k distinct entries reach it), and about 1.2·k entries pass it.
Candidates include every value equal to the bound, so ties are decided by index, never dropped.
"""

from __future__ import annotations

import numpy as np

# Below this many columns per wanted item, an exact partition is as cheap as the folding bound.
_FOLD_MIN_RATIO = 16


def empty(rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((rows, k), -np.inf), np.full((rows, k), -1, dtype=np.int64)


def _rank(rows: np.ndarray, idx: np.ndarray, vals: np.ndarray, n_rows: int, k: int):
    """Place flat candidates (row, index, value) into (n_rows, k) arrays, best first."""
    order = np.lexsort((idx, -vals, rows))
    rows, idx, vals = rows[order], idx[order], vals[order]
    starts = np.searchsorted(rows, np.arange(n_rows))
    pos = np.arange(rows.size) - starts[rows]
    keep = pos < k
    out_vals, out_idx = empty(n_rows, k)
    out_vals[rows[keep], pos[keep]] = vals[keep]
    out_idx[rows[keep], pos[keep]] = idx[keep]
    return out_vals, out_idx


def kth_lower_bound(values: np.ndarray, k: int, spread: int = 4) -> np.ndarray:
    """Per row a value θ with at least k entries ≥ θ (−inf where the row has fewer than k entries).

    θ is the exact k-th largest value for narrow rows; for wide rows it is the k-th largest of
    s ≥ spread·k column-group maxima, a lower bound that about (1 + k/(2·spread))·k entries of random
    data reach (the k largest fall into distinct groups unless two share one). `values` may be a
    transposed view: the folds follow its memory layout.
    """
    n_rows, n_cols = values.shape
    if k < 1 or n_cols < k or n_rows == 0:
        return np.full(n_rows, -np.inf)
    if n_cols < _FOLD_MIN_RATIO * spread // 4 * k:
        return np.partition(values, n_cols - k, axis=1)[:, n_cols - k].astype(np.float64)
    group = 1 << int(np.log2(n_cols / (spread * k)))  # columns per group, a power of two ≥ 4
    groups = n_cols // group                          # ≥ spread·k groups: column j → group j mod groups
    width = groups * group
    folded = np.maximum(values[:, : width // 2], values[:, width // 2: width])
    half = width // 2
    while half > groups:
        half //= 2
        np.maximum(folded[:, :half], folded[:, half: 2 * half], out=folded[:, :half])
    small = np.ascontiguousarray(folded[:, :groups])
    return np.partition(small, groups - k, axis=1)[:, groups - k].astype(np.float64)


def kth_lower_bound_columns(values: np.ndarray, k: int) -> np.ndarray:
    """kth_lower_bound of each column (the rows are folded by contiguous halves: no transposed copy)."""
    return kth_lower_bound(values.T, k)


def float_bound(bound: np.ndarray, dtype, strict: bool = False) -> np.ndarray:
    """`bound` (float64) in `dtype` such that, for values v of that dtype, v ≥ result ⟺ v ≥ bound
    (strict: v > result ⟺ v > bound): the smallest float32 ≥ b, or the largest float32 ≤ b."""
    bound = np.asarray(bound, dtype=np.float64)
    thr = bound.astype(dtype)
    if np.dtype(dtype) != np.float64:
        with np.errstate(over="ignore"):
            if strict:
                thr = np.where(thr > bound, np.nextafter(thr, -np.inf), thr)
            else:
                thr = np.where(thr < bound, np.nextafter(thr, np.inf), thr)
    return thr


def candidates(values: np.ndarray, bound: np.ndarray, strict: bool = False,
               mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the entries ≥ bound[row] (> with strict), row-major order.

    `mask`: an optional bool buffer of values.size (or more) entries to compare into.
    """
    if values.size == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    thr = float_bound(bound, values.dtype, strict)[:, None]
    if mask is not None:
        mask = mask[: values.size].reshape(values.shape)
    compare = np.greater if strict else np.greater_equal
    mask = compare(values, thr, out=mask)
    flat = np.flatnonzero(mask)
    return np.divmod(flat, values.shape[1])


def select(values: np.ndarray, k: int, col_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The k largest values of each row of `values` and their column indices (+ col_offset)."""
    n_rows, n_cols = values.shape
    if n_cols > k:
        # Everything at or above a lower bound of each row's k-th largest value: k candidates or a
        # few more, and every tie of the k-th value.
        rows, cols = candidates(values, kth_lower_bound(values, k))
    else:
        rows, cols = np.divmod(np.arange(values.size), n_cols)
    out = empty(n_rows, k)
    _place(out, 0, rows, cols + col_offset, values[rows, cols].astype(np.float64), forward=True)
    return out


_RANK_WIDTH = 4  # rows with more than this many candidates per wanted item are ranked apart


def rank(rows: np.ndarray, idx: np.ndarray, vals: np.ndarray, n_rows: int, k: int):
    """The best k of each row's candidates (row, index, value), best first, ties towards the lower
    index, padded with (−inf, −1): what `_rank`'s lexsort gives, at the cost of a partition.

    Candidates are grouped by row (a radix sort for 16-bit row numbers); each row's k-th largest
    value comes from a partition of the row padded to a common width (rows with many candidates
    are ranked on their own, so that one outlier does not widen every row). A row whose k-th value
    is tied beyond k, or whose k best hold two equal values, is ranked by `_rank`, which orders
    equal values by index.
    """
    out_v, out_i = empty(n_rows, k)
    if rows.size == 0 or k == 0:
        return out_v, out_i
    keys = rows.astype(np.uint16) if n_rows <= 1 << 16 else rows
    order = np.argsort(keys, kind="stable")
    rows, idx, vals = rows[order], idx[order], vals[order]
    counts = np.bincount(rows, minlength=n_rows)
    wide = counts > _RANK_WIDTH * k
    if not wide.any():
        return _rank_grouped(rows, idx, vals, n_rows, k, counts)
    for group in (wide, ~wide):
        targets = np.flatnonzero(group)
        if targets.size:
            sel = group[rows]
            local = np.searchsorted(targets, rows[sel])
            out_v[targets], out_i[targets] = _rank_grouped(local, idx[sel], vals[sel], targets.size, k)
    return out_v, out_i


def _rank_grouped(rows: np.ndarray, idx: np.ndarray, vals: np.ndarray, n_rows: int, k: int,
                  counts: np.ndarray | None = None):
    """rank() for candidates already grouped by row (rows ascending)."""
    if counts is None:
        counts = np.bincount(rows, minlength=n_rows)
    width = int(counts.max())
    retie = np.zeros(n_rows, dtype=bool)
    top_v, top_i = empty(n_rows, k)
    if width > k:
        padded = np.full((n_rows, width), -np.inf)
        padded.reshape(-1)[_slots(rows, counts, width)] = vals
        kth = np.partition(padded, width - k, axis=1)[:, width - k]
        keep = vals >= kth[rows]
        kept = np.bincount(rows[keep], minlength=n_rows)
        retie = kept > k  # the k-th value is tied beyond k: which of them enter depends on the index
        kept[retie] = 0
        keep &= ~retie[rows]
        keep = np.flatnonzero(keep)
        slot = _slots(rows[keep], kept, k)
        top_v.reshape(-1)[slot], top_i.reshape(-1)[slot] = vals[keep], idx[keep]
    else:
        slot = _slots(rows, counts, k)
        top_v.reshape(-1)[slot], top_i.reshape(-1)[slot] = vals, idx
    order = np.argsort(-top_v, axis=1)
    top_v = np.take_along_axis(top_v, order, axis=1)
    top_i = np.take_along_axis(top_i, order, axis=1)
    retie |= ((top_v[:, 1:] == top_v[:, :-1]) & (top_i[:, 1:] >= 0)).any(axis=1)
    if retie.any():
        redo = np.flatnonzero(retie)
        sel = retie[rows]
        top_v[redo], top_i[redo] = _rank(np.searchsorted(redo, rows[sel]), idx[sel], vals[sel], redo.size, k)
    return top_v, top_i


def _slots(rows: np.ndarray, counts: np.ndarray, width: int) -> np.ndarray:
    """Flat positions in a (rows × width) array of entries grouped by row (rows ascending, `counts`
    per row): each row's entries side by side from its first column."""
    return rows * width + (np.arange(rows.size) - (np.cumsum(counts) - counts)[rows])


def _place(held: tuple[np.ndarray, np.ndarray], r0: int, rows: np.ndarray, idx: np.ndarray,
           vals: np.ndarray, forward: bool) -> None:
    """Merge candidates into held (values, indices) arrays (best first, ties by index), in place.

    rows: candidate rows relative to r0, ascending; within a row, indices ascending. forward=True
    promises that the candidates' indices exceed every index held in their rows.
    """
    held_vals, held_idx = held
    k = held_vals.shape[1]
    if rows.size == 0 or k == 0:
        return
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    counts = np.diff(np.r_[starts, rows.size])
    slot = np.repeat(np.arange(starts.size), counts)
    pos = np.arange(rows.size) - starts[slot]
    target = rows[starts] + r0
    width = k + int(counts.max())
    vals_pad = np.full((starts.size, width), -np.inf)
    idx_pad = np.full((starts.size, width), -1, dtype=np.int64)
    vals_pad[:, :k] = held_vals[target]
    idx_pad[:, :k] = held_idx[target]
    vals_pad[slot, k + pos] = vals
    idx_pad[slot, k + pos] = idx
    if not forward:
        # Lay every row out by ascending index (unfilled slots last), so that the stable sort by
        # value below breaks ties towards the lower index.
        key = np.where(idx_pad < 0, np.iinfo(np.int64).max, idx_pad)
        order = np.argsort(key, axis=1, kind="stable")
        vals_pad = np.take_along_axis(vals_pad, order, axis=1)
        idx_pad = np.take_along_axis(idx_pad, order, axis=1)
    # Held items are best first with ties by index and new ones follow with higher indices
    # (forward), or everything is in index order: a stable sort by value is (value ↓, index ↑).
    order = np.argsort(-vals_pad, axis=1, kind="stable")[:, :k]
    held_vals[target] = np.take_along_axis(vals_pad, order, axis=1)
    held_idx[target] = np.take_along_axis(idx_pad, order, axis=1)


class RunningTopK:
    """Per-row top-k over column blocks visited in any order (update with each tile).

    `update` takes exact scores; `offer` takes candidates a caller already filtered against
    `bound` (every entry that can still enter a row's top-k is ≥ its bound).
    """

    def __init__(self, rows: int, k: int, floor: np.ndarray | None = None) -> None:
        self.k = k
        self.values, self.indices = empty(rows, k)
        # per row: only items above it are wanted (an update's bank rows against its new items: the
        # last score of a row's old list; −inf for none); what is at or below it is left out (pads)
        self.floor = floor

    def bound(self, r0: int, r1: int) -> np.ndarray:
        """The current k-th best value of rows r0:r1 (−inf while a row holds fewer than k), or
        their floor where higher."""
        if self.k == 0:
            return np.full(r1 - r0, np.inf)
        held = self.values[r0:r1, -1]
        return held if self.floor is None else np.maximum(held, self.floor[r0:r1])

    def update(self, r0: int, tile: np.ndarray, col_offset: int, forward: bool = False) -> None:
        """Fold in exact scores tile[:, c] for columns col_offset + c of rows r0:r0+len(tile).

        forward=True promises that every column of the tile lies to the right of all columns seen
        before in these rows; a tie with the current k-th best can then never enter.
        """
        if self.k == 0 or tile.size == 0:
            return
        r1 = r0 + tile.shape[0]
        bound = self.bound(r0, r1)
        strict = forward
        if np.isneginf(bound).any():
            bound = np.maximum(bound, kth_lower_bound(tile, self.k))
            strict = False
        rows, cols = candidates(tile, bound, strict)
        self.offer(r0, rows, cols + col_offset, tile[rows, cols].astype(np.float64), forward)

    def offer(self, r0: int, rows: np.ndarray, idx: np.ndarray, vals: np.ndarray, forward: bool = False) -> None:
        """Merge candidates: rows relative to r0 (ascending), gallery indices (ascending within a
        row), float64 values. forward=True: their indices exceed all held in those rows."""
        _place((self.values, self.indices), r0, rows, idx, vals, forward)
