"""Normalised retrieval as a plain inner-product search over augmented vectors, pure numpy.

Every affine method of the registry scores η = scale·S[q, j] − offset[j] − r_q (core/normalisers.py;
each formula's source is cited in qbnorm_cli/methods.py). Dividing by scale > 0 and shifting by a
constant m changes no row's ranking, and

    η/scale + (m + r_q)/scale = S[q, j] − (offset[j] − m)/scale = ⟨[q, c], [g_j, x_j]⟩,
    x_j = −(offset[j] − m)/(scale·c),

so an inner-product index over the augmented gallery vectors [g_j, x_j] returns the normalised
ranking for the query [q, c], and the raw one (S) for [q, 0]: η = scale·⟨·,·⟩ − m − r_q. The row
term r_q (CSLS's mean of the row's K best raw scores) is a per-query constant: it moves a row's
scores, never its ranking.

c is free. It is chosen so that the extra column sits inside the range of the gallery's
coordinates and fills at least half of it (`query_constant`), as one more coordinate would.
Indexes that do not compute the product exactly need that: a scalar quantiser with one range for
all dimensions widens its range for a column outside it (every dimension coarser) and quantises a
much narrower one coarsely against its spread; a PQ sub-quantiser spends its centroids on its
sub-space's coordinates in proportion to their spread, so a narrow column loses the offsets, which
the query's c then multiplies back; and HNSW/IVF build their graph and coarse clusters from
⟨g'_i, g'_j⟩ = ⟨g_i, g_j⟩ + x_i·x_j, which a wide column would dominate (benchmarks/serving_columns.py
measures each; docs/serving.md has the figures). m (the offsets' mean) keeps the column centred: an
offset common to every item carries no ranking information, only magnitude that float32 sums round
against. c is a power of two, so c·x_j is exact and the augmented product carries only the
rounding of x_j.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from qbnorm_cli.core.sampling import spread


def split_scale(scale) -> tuple[float, np.ndarray | None]:
    """(ā, a_j/ā or None) of a scale: one number, or one per item (Local Scaling, NICDM). With
    a_j per item, η = a_j·S − b_j = ā·(⟨q, (a_j/ā)·g_j⟩ − b_j/ā): the vectors carry a_j/ā (near 1, so
    they stay within the range of the coordinates) and the rest is as for one scale."""
    if np.ndim(scale) == 0:
        return float(scale), None
    scale = np.asarray(scale, dtype=np.float64)
    common = float(scale.mean()) if scale.size else 1.0
    return common, scale / common


class ScaledRows:
    """Gallery rows (an Embeddings) times a per-item factor, as float32: what an export stores."""

    def __init__(self, rows, factor: np.ndarray | None):
        self.rows, self.factor = rows, factor

    def _scaled(self, block: np.ndarray, at) -> np.ndarray:
        if self.factor is None:
            return block
        return (block * self.factor[at][:, None]).astype(np.float32)

    def block(self, r0: int, r1: int) -> np.ndarray:
        return self._scaled(self.rows.block(r0, r1), slice(r0, r1))

    def rows_of(self, picks) -> np.ndarray:
        return self._scaled(self.rows.rows_of(picks), picks)


def shifts(offset: np.ndarray | None, scale: float, n_items: int) -> tuple[np.ndarray, float]:
    """((offset[j] − m)/scale per item, m): m the offsets' mean (0 without offsets)."""
    if offset is None:
        return np.zeros(n_items), 0.0
    offset = np.asarray(offset, dtype=np.float64)
    center = float(offset.mean()) if offset.size else 0.0
    return (offset - center) / scale, center


def query_constant(shift: np.ndarray, coordinate_max: float) -> float:
    """The smallest power of two c with x = −shift/c inside the gallery coordinates' range
    (max |x| ≤ coordinate_max; it then fills more than half of it); 1 when the shifts are all 0
    (the extra column is then 0 and c changes nothing) or the coordinates are all 0."""
    shift = np.asarray(shift, dtype=np.float64)
    widest = float(np.abs(shift).max()) if shift.size else 0.0
    if widest == 0.0 or not coordinate_max > 0:
        return 1.0
    return float(2.0 ** math.ceil(math.log2(widest / coordinate_max)))


def augment(rows: np.ndarray, shift: np.ndarray, constant: float) -> np.ndarray:
    """[g_j, −shift_j/c] as float32 (n, d+1) for gallery rows g_j (float32)."""
    out = np.empty((rows.shape[0], rows.shape[1] + 1), dtype=np.float32)
    out[:, :-1] = rows
    out[:, -1] = -np.asarray(shift, dtype=np.float64) / constant
    return out


def with_constant(queries: np.ndarray, constant: float) -> np.ndarray:
    """[q, constant] as float32 (n, d+1): c for the normalised ranking, 0 for the raw one."""
    out = np.empty((queries.shape[0], queries.shape[1] + 1), dtype=np.float32)
    out[:, :-1] = queries
    out[:, -1] = constant
    return out


def ordered(values: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An index's (values, indices) per row as qbnorm orders rankings: value descending, ties
    towards the lower index, empty slots (index −1) last with value −inf; values float64."""
    indices = np.asarray(indices, dtype=np.int64)
    empty = indices < 0
    values = np.where(empty, -np.inf, np.asarray(values, dtype=np.float64))
    key = np.where(empty, np.iinfo(np.int64).max, indices)
    # an engine returns its rows sorted by value: only rows with ties (or out of order) are sorted again
    later, earlier = values[:, 1:], values[:, :-1]
    unsorted = ((later > earlier) | ((later == earlier) & (key[:, 1:] < key[:, :-1]))).any(axis=1)
    if unsorted.any():
        rows = np.flatnonzero(unsorted)
        order = np.lexsort((key[rows], -values[rows]), axis=-1)
        values[rows] = np.take_along_axis(values[rows], order, axis=1)
        indices = indices.copy()
        indices[rows] = np.take_along_axis(indices[rows], order, axis=1)
    return values, indices


def coordinate_stats(blocks) -> tuple[float, float, int]:
    """(root mean square, largest |value|, rows) of the coordinates of float32 row blocks."""
    squares, widest, rows, count = 0.0, 0.0, 0, 0
    for block in blocks:
        if block.size:
            squares += float(np.square(block, dtype=np.float64).sum())
            widest = max(widest, float(np.abs(block).max()))
            count += block.size
        rows += block.shape[0]
    return (math.sqrt(squares / count) if count else 0.0), widest, rows


def recall(found: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Per row, the share of the exact top-N (indices ≥ 0) that `found` lists."""
    found, exact = np.asarray(found), np.asarray(exact)
    hits = np.zeros(found.shape[0])
    for row in range(found.shape[0]):
        want = exact[row][exact[row] >= 0]
        if want.size:
            hits[row] = np.isin(want, found[row]).sum() / want.size
        else:
            hits[row] = 1.0
    return hits


def sample_rows(total: int, fraction: float, seed: int = 0) -> np.ndarray:
    """A seeded uniform sample of ⌈fraction·total⌉ rows (at least 1), ascending."""
    size = min(total, max(1, math.ceil(fraction * total)))
    return np.sort(np.random.default_rng(seed).choice(total, size=size, replace=False)).astype(np.int64)


FINGERPRINT_ROWS = 16


def fingerprint(read_rows, n_rows: int) -> str:
    """A digest of FINGERPRINT_ROWS rows spread over the vectors (read_rows(list) → float32 rows):
    cheap to recompute from any store that returns them exactly."""
    picks = spread(n_rows, FINGERPRINT_ROWS)
    digest = hashlib.sha1(repr((n_rows, picks)).encode())
    digest.update(np.ascontiguousarray(read_rows(picks), dtype=np.float32).tobytes())
    return "vec:" + digest.hexdigest()[:20]
