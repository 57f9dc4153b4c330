"""Rank kernel and metric summaries (collaborative-experts / QB-Norm protocol), pure numpy."""

from __future__ import annotations

import numpy as np
import tolerance as tol

from qbnorm_cli.core import metrics


def brute_rank(row: np.ndarray, target: int) -> float:
    """Tie-averaged 0-based rank by counting, one item at a time."""
    greater = sum(1 for v in row if v > row[target])
    ties = sum(1 for j, v in enumerate(row) if v == row[target] and j != target)
    return greater + ties / 2


def test_ranks_hand_made():
    scores = np.array([
        [0.9, 0.1, 0.5, 0.3],   # gt 0: best → 0
        [0.9, 0.1, 0.5, 0.3],   # gt 3: 0.9, 0.5 above → 2
        [0.2, 0.7, 0.7, 0.7],   # gt 2: tied with 2 others, none greater → 1
        [0.5, 0.5, 0.5, 0.5],   # all equal: (G − 1)/2 = 1.5
    ])
    rank = metrics.ranks(scores, np.array([0, 3, 2, 1]))
    np.testing.assert_array_equal(rank, [0, 2, 1, 1.5])


def test_all_equal_row_is_middle_rank():
    g = 11
    rank = metrics.ranks(np.zeros((3, g)), np.array([0, 5, 10]))
    np.testing.assert_array_equal(rank, [(g - 1) / 2] * 3)


def test_ranks_match_brute_force_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, (40, 17)).astype(np.float32)
    gt = rng.integers(0, 17, 40)
    expected = [brute_rank(scores[i], gt[i]) for i in range(40)]
    np.testing.assert_array_equal(metrics.ranks(scores, gt), expected)


def test_multi_positive_takes_best_rank():
    scores = np.array([[0.1, 0.9, 0.5, 0.3], [0.1, 0.9, 0.5, 0.3]])
    relevant = np.array([[0, 2, -1], [3, -1, -1]])
    np.testing.assert_array_equal(metrics.ranks(scores, relevant), [1, 2])


def test_recall_summary_values():
    rank = np.array([0, 0, 3, 7, 60.5])
    out = metrics.recall_summary(rank)
    assert out["R@1"] == tol.approx64(40.0)
    assert out["R@5"] == tol.approx64(60.0)
    assert out["R@10"] == tol.approx64(80.0)
    assert out["R@50"] == tol.approx64(80.0)
    assert out["MdR"] == 4.0
    assert out["MnR"] == tol.approx64(np.mean(rank) + 1)
    assert out["GeomR"] == tol.approx64((40 * 60 * 80) ** (1 / 3))


def standing(rank, censored=None) -> metrics.Standing:
    """Standings of untied queries: `rank` items above each (a lower bound where censored)."""
    rank = np.asarray(rank, dtype=np.float64)
    ones = np.ones(rank.size, dtype=np.int64)
    return metrics.Standing(rank, ones, ones.copy(), np.zeros(rank.size, bool) if censored is None else censored)


def test_summarise_dense_is_exact_and_matches_recall_summary():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 6, (60, 9)).astype(np.float32)   # many ties, some at the top
    st = metrics.row_standing(scores, rng.integers(0, 9, 60))
    out = metrics.summarise(st)
    assert all(out["exact"].values())
    assert out["bounds"] == {}
    for name, value in metrics.recall_summary(metrics.rank_values(st)).items():
        assert out["metrics"][name] == value


def list_ranks(neighbors, scores, relevant):
    st = metrics.list_standing(neighbors, scores, relevant)
    return metrics.rank_values(st), st.censored


def test_topn_ranks_in_list_out_of_list_and_ties():
    neighbors = np.array([[4, 2, 7], [4, 2, 7], [1, 3, 0], [5, 6, 8], [5, 6, 8]])
    scores = np.array([[0.9, 0.5, 0.4], [0.9, 0.5, 0.4], [0.6, 0.6, 0.6], [0.9, 0.8, 0.8], [0.9, 0.8, 0.8]])
    relevant = np.array([2, 9, 0, 8, 5])
    rank, censored = list_ranks(neighbors, scores, relevant)
    # found at position 1; missing (≥ N = 3); tied with the 2 others of the list → 1; tied pair at 1–2 → 1.5; best
    np.testing.assert_array_equal(rank, [1, 3, 1, 1.5, 0])
    np.testing.assert_array_equal(censored, [False, True, False, False, False])


def test_topn_ranks_multi_positive_and_empty_slots():
    neighbors = np.array([[3, 1, -1], [3, 1, -1]])
    scores = np.array([[0.9, 0.5, -np.inf], [0.9, 0.5, -np.inf]])
    rank, censored = list_ranks(neighbors, scores, np.array([[7, 1], [7, 8]]))
    np.testing.assert_array_equal(rank, [1, 2])   # 2 items listed: an unlisted one is ≥ 2
    np.testing.assert_array_equal(censored, [False, True])


def test_topn_ranks_agree_with_dense_ranks():
    rng = np.random.default_rng(3)
    dense = rng.standard_normal((200, 60))
    gt = rng.integers(0, 60, 200)
    n = 8
    order = np.argsort(-dense, axis=1, kind="stable")[:, :n]
    rank, censored = list_ranks(order, np.take_along_axis(dense, order, axis=1), gt)
    exact = metrics.ranks(dense, gt)
    np.testing.assert_array_equal(rank[~censored], exact[~censored])
    np.testing.assert_array_equal(censored, exact >= n)
    assert np.all(exact[censored] >= rank[censored])


def test_summarise_censored_figures():
    # 5 queries, top N = 10: three exact ranks, two known only as ≥ 10.
    out = metrics.summarise(standing([0.0, 4.0, 6.0, 10.0, 10.0], np.array([False, False, False, True, True])))
    m, exact = out["metrics"], out["exact"]
    assert m["R@1"] == 20.0 and m["R@5"] == 40.0 and m["R@10"] == 60.0
    assert m["R@50"] is None and not exact["R@50"]
    assert m["MdR"] == 7.0 and exact["MdR"]          # 3 of 5 within the list: the median is known
    assert m["MnR"] is None and not exact["MnR"]
    assert m["GeomR"] == tol.approx64((20 * 40 * 60) ** (1 / 3))
    assert out["bounds"]["R@50"] == [60.0, 100.0]


def test_summarise_median_unknown_when_half_or_fewer_within():
    out = metrics.summarise(standing([0.0, 1.0, 10.0, 10.0], np.array([False, False, True, True])))
    assert out["metrics"]["MdR"] is None and not out["exact"]["MdR"]
    assert out["metrics"]["R@10"] == 50.0


def test_censored_median_agrees_with_any_completion():
    rng = np.random.default_rng(5)
    for _ in range(200):
        n = int(rng.integers(1, 12))
        rank = rng.integers(0, 8, n).astype(float)
        censored = rng.random(n) < 0.4
        rank[censored] = 8.0
        median = metrics.censored_median(rank, censored)
        if median is None:
            continue
        for _ in range(5):
            completed = rank.copy()
            completed[censored] += rng.integers(0, 100, censored.sum())
            assert median == np.median(completed)


def test_contiguous_relevant():
    np.testing.assert_array_equal(metrics.contiguous_relevant(7, 3)[:, 0], [0, 0, 0, 1, 1, 1, 2])
