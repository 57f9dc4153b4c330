"""Hubness measures against their direct definitions, and DEXTER's published values."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tolerance as tol
from helpers import dexter_similarity

import qbnorm_cli
from qbnorm_cli.core import hubness as hub
from qbnorm_cli.core import topk


def samples():
    rng = np.random.default_rng(0)
    yield np.array([0, 0, 1, 5, 12])
    yield np.array([3, 3, 3, 4])
    yield np.array([0, 0, 0, 40])
    for _ in range(20):
        yield rng.poisson(rng.uniform(0.5, 6), int(rng.integers(2, 30)))


def test_k_occurrence_counts_and_ignores_empty_slots():
    neigh = np.array([[0, 2, -1], [2, 1, 0], [2, -1, -1]])
    np.testing.assert_array_equal(hub.k_occurrence(neigh, 2, 4), [1, 1, 3, 0])
    np.testing.assert_array_equal(hub.k_occurrence(neigh, 3, 4), [2, 1, 3, 0])


def skew_bound(x) -> float:
    """float64 error of m₃ / m₂^{3/2} over n integers ≤ M: the mean within γₙ·M, each deviation within
    that plus an ulp, the moments' sums within γ_{2n+8} of 4M³ and γ_{2n+6} of 3M²; the quotient adds a
    few ulps. Two such evaluations (the test's and the package's) differ by twice that."""
    x = np.asarray(x, dtype=np.float64)
    n, big = len(x), float(np.abs(x).max())
    d = x - x.mean()
    m2, m3 = float(np.mean(d**2)), float(np.mean(d**3))
    if m2 == 0:
        return 0.0
    e3, e2 = tol.gamma(2 * n + 8, tol.U64) * 4 * big**3, tol.gamma(2 * n + 6, tol.U64) * 3 * big**2
    return 2 * (e3 / m2**1.5 + 1.5 * abs(m3) * e2 / m2**2.5 + tol.eval64(abs(m3) / m2**1.5))


@pytest.mark.parametrize("x", list(samples()))
def test_skewness_is_the_biased_third_moment(x):
    x = x.astype(float)
    sd = np.sqrt(np.mean((x - x.mean()) ** 2))
    expected = 0.0 if sd == 0 else np.mean((x - x.mean()) ** 3) / sd**3
    assert abs(hub.skewness(x) - expected) <= skew_bound(x)


@pytest.mark.parametrize("x", list(samples()))
def test_skewness_equals_scipy_biased_skew(x):
    from scipy import stats

    expected = 0.0 if np.all(x == x[0]) else stats.skew(x.astype(float), bias=True)
    assert abs(hub.skewness(x) - expected) <= skew_bound(x)


@pytest.mark.parametrize("x", list(samples()))
def test_gini_is_the_pairwise_mean_absolute_difference(x):
    n = len(x)
    if x.sum() == 0:
        return
    pairs = sum(abs(int(a) - int(b)) for a, b in itertools.product(x, x))
    assert hub.gini(x) == tol.approx64(pairs / (2 * n * n * x.mean()), n + 8)  # integer sums, then divisions


@pytest.mark.parametrize("x", list(samples()))
def test_robin_hood_is_half_the_relative_mean_absolute_deviation(x):
    if x.sum() == 0:
        return
    rmd = np.mean(np.abs(x - x.mean())) / x.mean()
    assert hub.robin_hood(x) == tol.approx64(rmd / 2, 4 * len(x) + 8)  # |x − mean| inherits the mean's γₙ


@pytest.mark.parametrize("x", list(samples()))
def test_atkinson_by_definition(x):
    if x.sum() == 0:
        return
    eps = 0.5
    ede = (sum(v ** (1 - eps) for v in x.astype(float)) / len(x)) ** (1 / (1 - eps))
    # 1 − ede/mean, with ede/mean ≤ 1 within γ_{4n+8} on each side: an absolute bound (the difference cancels)
    assert abs(hub.atkinson(x, eps) - (1 - ede / x.mean())) <= 2 * tol.gamma(4 * len(x) + 8, tol.U64)


def test_atkinson_eps_one_uses_the_geometric_mean():
    x = np.array([1.0, 2.0, 4.0])
    assert hub.atkinson(x, 1.0) == tol.approx64(1 - 2.0 / (7 / 3), 12)  # exp(mean(log x)): a few ulps
    assert hub.atkinson(np.array([0, 3]), 1.0) == 1.0


def test_equal_occurrence_has_no_inequality():
    x = np.full(9, 4)
    assert hub.skewness(x) == 0.0
    assert hub.gini(x) == 0.0 and hub.robin_hood(x) == 0.0
    assert hub.atkinson(x) == tol.approx64(0.0) or abs(hub.atkinson(x)) <= tol.gamma(12, tol.U64)


def test_counting_measures():
    # 4 queries, k = 2 → 8 slots over 5 items.
    nk = np.array([5, 0, 2, 1, 0])
    assert hub.antihub_rate(nk) == tol.approx64(40.0) and hub.coverage(nk) == tol.approx64(60.0)
    # hubs: N_k ≥ 2k = 4 → item 0 only: 5 of the k·Q = 8 slots.
    assert hub.hub_occurrence(nk, 2, 4) == 100 * 5 / 8 and hub.groupie_ratio(nk, 2, 4) == 5 / 8  # dyadic: exact
    assert hub.top_items(np.array([1, 3, 0, 3, 2]), 3) == [(1, 3), (3, 3), (4, 2)]


def test_log_bins():
    bins = hub.log_bins(np.array([0, 0, 1, 2, 3, 4, 9]))
    assert bins == [("0", 2), ("1", 1), ("2–3", 2), ("4–7", 1), ("8–15", 1)]
    assert sum(c for _, c in bins) == 7


def test_measures_keys():
    out = hub.measures(np.array([3, 0, 1]), 1, 4)
    assert out["max_nk"] == 3 and out["items"] == 3 and out["queries"] == 4
    assert out["top_items"][0] == {"item": 0, "nk": 3}


@pytest.mark.parametrize("k, skew, antihub", [(5, 4.22, 26.67), (10, 3.98, 17.67)])
def test_dexter_published_values(k, skew, antihub):
    sim = dexter_similarity().astype(np.float64)
    np.fill_diagonal(sim, -np.inf)
    _, neigh = topk.select(sim, k)
    nk = hub.k_occurrence(neigh, k, len(sim))
    assert round(hub.skewness(nk), 2) == skew
    assert round(hub.antihub_rate(nk), 2) == antihub


def test_hub_threshold_is_twice_the_mean_k_occurrence():
    """Queries outnumbering items: 5 queries per item, k = 10, every item retrieved 50 times. The mean
    N_k is k·Q/G = 50, so no item is a hub; the old 2k = 20 threshold made every slot a hub's."""
    nk = np.full(100, 50)
    assert hub.mean_occurrence(10, 500, 100) == 50.0
    assert hub.hub_threshold(10, 500, 100) == 100.0
    assert hub.hub_occurrence(nk, 10, 500) == 0.0 and hub.hub_count(nk, 10, 500) == 0
    out = hub.measures(nk, 10, 500)
    assert out["hub_threshold"] == 100.0 and out["hubs"] == 0 and out["hub_occurrence_pct"] == 0.0
    # Q = G: the threshold is the peers' 2k.
    assert hub.hub_threshold(10, 100, 100) == 20.0


def test_hub_measures_against_the_dense_oracle():
    import reference as ref

    rng = np.random.default_rng(3)
    for n_queries, n_items, k in ((500, 100, 10), (60, 300, 5), (200, 200, 3)):
        base = rng.standard_normal((n_items, 8))
        S = rng.standard_normal((n_queries, 8)) @ base.T + 3 * base[:, 0]  # item 0-ish columns are hubs
        nk = ref.k_occurrence(S, k)
        result = qbnorm_cli.hubness(S, k=k)
        np.testing.assert_array_equal(result["k_occurrence"][k], nk)
        row = result["by_k"][0]
        # integer sums, then a division and a product by 100: within a few ulps
        assert row["hub_occurrence_pct"] / 100 == tol.approx64(ref.hub_occurrence(nk, k, n_queries), 4)
        assert row["antihub_rate_pct"] / 100 == tol.approx64(ref.antihub_occurrence(nk), 4)
        expected, quad_error = ref.skewness_truncnorm(nk)
        assert abs(row["skewness_truncnorm"] - expected) <= quad_error + 1e3 * tol.U64


@pytest.mark.parametrize("x", [x for x in samples() if not np.all(x == x[0])])
def test_skewness_truncnorm_against_quadrature_and_scipy(x):
    import reference as ref
    from scipy import stats

    expected, quad_error = ref.skewness_truncnorm(x)
    # the closed form: a (mean and std over n values: γ_{2n+8}), exp, erfc and 6 operations (≤ 16 ulps
    # of a value below 1.6), its sensitivity to a (|d/da| < 3) times a's error
    a = abs(x.mean() / x.std(ddof=1))
    closed = 3 * tol.gamma(2 * len(x) + 8, tol.U64) * a + 16 * tol.U64 * 1.6
    assert abs(hub.skewness_truncnorm(x) - expected) <= quad_error + closed
    a = -x.mean() / x.std(ddof=1)
    peers = stats.truncnorm(a, (np.iinfo(np.int64).max - x.mean()) / x.std(ddof=1)).moment(3)
    assert hub.skewness_truncnorm(x) == pytest.approx(peers, rel=1e-8)


def test_skewness_truncnorm_range():
    assert hub.skewness_truncnorm(np.full(5, 3)) == 0.0
    assert 0 < hub.skewness_truncnorm(np.array([9, 10, 11])) < 1e-6  # s/μ small: a far in the left tail
    assert hub.skewness_truncnorm(np.array([0, 0, 0, 1000])) < 4 / np.sqrt(2 * np.pi)
