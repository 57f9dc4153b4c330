"""The fast top-k paths (lower bounds, candidate filters, running merges) equal a brute-force stable
argsort on random data with many ties, for every way of cutting the columns into blocks."""

from __future__ import annotations

import numpy as np
import pytest

from qbnorm_cli.core import topk


def brute(M: np.ndarray, k: int):
    """Best k of each row, ties towards the lower index, padded with (−inf, −1)."""
    M = np.asarray(M, dtype=np.float64)
    order = np.argsort(-M, axis=1, kind="stable")[:, :k]
    vals = np.take_along_axis(M, order, axis=1)
    out_v, out_i = topk.empty(M.shape[0], k)
    out_v[:, : order.shape[1]], out_i[:, : order.shape[1]] = vals, order
    return out_v, out_i


def data(kind: str, rows: int, cols: int, seed: int, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "ties":  # a handful of distinct values: ties everywhere, at every threshold
        M = rng.integers(0, 5, (rows, cols)).astype(dtype)
        M[0] = 1  # a constant row
        return M
    if kind == "coarse":  # many values, still plenty of exact ties
        return (rng.integers(-200, 200, (rows, cols)) / 8).astype(dtype)
    return rng.standard_normal((rows, cols)).astype(dtype)


KINDS = ["ties", "coarse", "normal"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("cols", "k"), [(7, 3), (50, 1), (50, 60), (300, 5), (2000, 10), (5000, 100)])
def test_select_equals_stable_argsort(kind, cols, k):
    M = data(kind, 23, cols, seed=cols + k)
    want_v, want_i = brute(M, k)
    got_v, got_i = topk.select(M, k)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_v, want_v)
    got_v, got_i = topk.select(M, k, col_offset=1000)
    np.testing.assert_array_equal(got_i, np.where(want_i >= 0, want_i + 1000, -1))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("cols", "k"), [(100, 1), (3000, 10), (4096, 128), (70, 70)])
def test_kth_lower_bound_is_a_lower_bound(kind, cols, k):
    M = data(kind, 31, cols, seed=k)
    bound = topk.kth_lower_bound(M, k)
    kth = -np.sort(-M.astype(np.float64), axis=1)[:, k - 1]
    assert (bound <= kth).all()
    assert ((M >= bound[:, None]).sum(axis=1) >= k).all()
    if kind == "normal" and cols >= 16 * k:
        # tight: few candidates beyond the k needed
        assert (M >= bound[:, None]).sum(axis=1).mean() < 3 * k


def test_kth_lower_bound_narrow_rows():
    M = data("normal", 5, 4, seed=0)
    assert np.isneginf(topk.kth_lower_bound(M, 5)).all()
    np.testing.assert_array_equal(topk.kth_lower_bound(M, 4), M.min(axis=1))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 4, 100])
@pytest.mark.parametrize("width", [1, 3, 17, 256, 1000])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_running_topk_any_block_size_and_order(kind, k, width, dtype):
    M = data(kind, 13, 400, seed=width * k, dtype=dtype)  # width 1000: one block wider than the data
    want_v, want_i = brute(M, k)
    spans = [(c, min(c + width, M.shape[1])) for c in range(0, M.shape[1], width)]
    rng = np.random.default_rng(width)
    shuffled = [spans[i] for i in rng.permutation(len(spans))]
    for order, forward in ((spans, True), (spans, False), (spans[::-1], False), (shuffled, False)):
        running = topk.RunningTopK(M.shape[0], k)
        for c0, c1 in order:
            for r0, r1 in ((0, 5), (5, 13)):  # row tiles too
                running.update(r0, M[r0:r1, c0:c1], c0, forward=forward)
        np.testing.assert_array_equal(running.indices, want_i)
        np.testing.assert_array_equal(running.values, want_v)


@pytest.mark.parametrize("kind", KINDS)
def test_offer_of_prefiltered_candidates(kind):
    """A caller filtering against bound() (ties included) and offering the survivors gets the exact top-k."""
    M = data(kind, 9, 600, seed=3).astype(np.float64)
    k = 20
    want_v, want_i = brute(M, k)
    running = topk.RunningTopK(M.shape[0], k)
    for c0 in range(0, 600, 64):
        tile = M[:, c0:c0 + 64]
        bound = np.maximum(running.bound(0, 9), topk.kth_lower_bound(tile, k))
        rows, cols = topk.candidates(tile, bound)
        running.offer(0, rows, cols + c0, tile[rows, cols], forward=True)
    np.testing.assert_array_equal(running.indices, want_i)
    np.testing.assert_array_equal(running.values, want_v)


def test_candidates_float32_bound_rounding():
    """A float64 bound between two float32 values selects exactly the float32 entries ≥ (or >) it."""
    tile = np.array([[1.0, np.nextafter(np.float32(1), np.float32(2)), 0.5]], dtype=np.float32)
    bound = np.array([1.0 + 1e-9])
    _, cols = topk.candidates(tile, bound)
    assert cols.tolist() == [1]
    _, cols = topk.candidates(tile, bound, strict=True)
    assert cols.tolist() == [1]
    _, cols = topk.candidates(tile, np.array([1.0]), strict=True)
    assert cols.tolist() == [1]
    _, cols = topk.candidates(tile, np.array([1.0 - 1e-9]), strict=True)
    assert cols.tolist() == [0, 1]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 5, 40])
def test_rank_equals_stable_argsort_of_the_candidates(kind, k):
    """rank() of candidates given in any order: the stable sort of each row's candidates, padded."""
    rows, cols = 57, 300
    M = data(kind, rows, cols, seed=k).astype(np.float64)
    rng = np.random.default_rng(k)
    keep = rng.random((rows, cols)) < rng.choice([0.02, 0.3, 1.0], size=(rows, 1))  # few, some, all
    keep[3] = False  # a row without candidates
    keep[4, :] = True  # and one with many more than the others: ranked on its own
    M[5, :] = 2.0  # all tied: the lowest indices win
    keep[5, :] = True
    r, c = np.nonzero(keep)
    order = rng.permutation(r.size)
    got_v, got_i = topk.rank(r[order], c[order] + 1000, M[r, c][order], rows, k)
    masked = np.where(keep, M, -np.inf)
    want_v, want_i = brute(masked, k)
    want_i = np.where(np.isneginf(want_v), -1, want_i + 1000)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_v, want_v)


def test_rank_of_nothing():
    v, i = topk.rank(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0), 4, 3)
    assert np.isneginf(v).all() and (i == -1).all()


@pytest.mark.parametrize("spread", [4, 16])
def test_kth_lower_bound_spread_and_transposed_views(spread):
    M = data("normal", 700, 64, seed=spread)  # 700 × 64, read as 64 rows of a transposed view
    view = M.T
    for k in (1, 5, 11):
        bound = topk.kth_lower_bound(view, k, spread=spread)
        kth = -np.sort(-view.astype(np.float64), axis=1)[:, k - 1]
        assert (bound <= kth).all()
        np.testing.assert_array_equal(bound, topk.kth_lower_bound(np.ascontiguousarray(view), k, spread=spread))
