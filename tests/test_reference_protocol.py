"""The oracle's "official metric.py protocol" (tests/reference.py), against hand computations and counting.

Conventions of the hand computations: sims are in metric.py's t2v layout (rows = captions/queries,
columns = items); a rank is the mean 0-based position of the ground truth's distance among the
sorted distances of its row, i.e. #strictly greater similarities + (#equal − 1)/2.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
import scipy.stats


def metrics_of(ranks, num_queries=None):
    return ref.official_metrics(np.asarray(ranks, dtype=np.float64), num_queries)


# ------------------------------------------------------------------------------------------- t2v


def test_t2v_tie_at_the_top_is_half_a_rank_and_an_r1_miss():
    sims = np.array([
        [0.9, 0.9, 0.1],   # gt 0, tied with item 1 at the top: positions {0, 1} → 0.5
        [0.3, 0.3, 0.3],   # gt 1, all equal: positions {0, 1, 2} → 1.0 = (G − 1)/2
        [0.5, 0.7, 0.2],   # gt 2, below both others → 2.0
    ])
    ranks = ref.official_ranks_t2v(sims)
    np.testing.assert_array_equal(ranks, [0.5, 1.0, 2.0])
    m = metrics_of(ranks)
    assert m["R@1"] == 0.0           # rank 0.5 is not == 0: a miss
    assert m["R@5"] == 100.0         # 0.5 < 5: a hit
    assert m["MdR"] == 2.0           # median(0.5, 1, 2) + 1
    assert m["MnR"] == pytest.approx(3.5 / 3 + 1)   # (0.5 + 1 + 2)/3 + 1 = 2.1667
    assert m["GeomR"] == 0.0         # R@1 = 0 makes the geometric mean 0


def test_t2v_three_way_tie():
    # gt 2 at 0.8, one score above (0.9), tied with items 1 and 3: positions {1, 2, 3} → 2.0 = 1 + 2/2
    sims = np.array([[0.2, 0.8, 0.8, 0.8, 0.9]] * 5)
    gt = np.array([2, 1, 3, 4, 0])
    # gt 1, 3: the same tie → 2.0; gt 4 (0.9) alone on top → 0; gt 0 (0.2) last of 5 → 4
    np.testing.assert_array_equal(ref.official_ranks_t2v(sims, gt=gt), [2.0, 2.0, 2.0, 0.0, 4.0])


@pytest.mark.parametrize("g", [1, 2, 7, 10])
def test_all_equal_rows_sit_in_the_middle(g):
    sims = np.full((g, g), 0.25)
    np.testing.assert_array_equal(ref.official_ranks_t2v(sims), [(g - 1) / 2] * g)
    np.testing.assert_array_equal(ref.official_ranks_v2t(sims), [(g - 1) / 2] * g)


MASKED = np.array([
    [0.9, 0.1],   # c0, item 0
    [0.2, 0.8],   # c1, item 0
    [0.4, 0.4],   # c2, item 1
    [0.1, 0.6],   # c3, item 1
])


def test_t2v_masks_drop_queries_and_shrink_the_count():
    # q0: 0.9 > 0.1 → 0; q1: 0.8 above its 0.2 → 1; q2: tie 0.4 = 0.4 → 0.5; q3: 0.6 > 0.1 → 0
    np.testing.assert_array_equal(ref.official_ranks_t2v(MASKED), [0, 1, 0.5, 0])
    m = metrics_of([0, 1, 0.5, 0])
    assert m["R@1"] == 50.0                  # 2 of 4
    assert m["MdR"] == 1.25                  # even count: (0 + 0.5)/2 + 1
    assert m["MnR"] == 1.375                 # 1.5/4 + 1
    kept = ref.official_ranks_t2v(MASKED, query_masks=np.array([1, 1, 1, 0]))
    np.testing.assert_array_equal(kept, [0, 1, 0.5])
    m = metrics_of(kept)
    assert m["R@1"] == pytest.approx(100 / 3)   # 1 of 3, not 1 of 4
    assert m["MdR"] == 1.5                      # median(0, 0.5, 1) + 1
    assert m["MnR"] == 1.5                      # 1.5/3 + 1


def test_t2v_contiguous_layout_and_general_gt_agree():
    rng = np.random.default_rng(1)
    sims = rng.integers(0, 4, (12, 3)).astype(np.float64)
    contiguous = ref.official_ranks_t2v(sims)
    np.testing.assert_array_equal(contiguous, ref.official_ranks_t2v(sims, gt=np.arange(12) // 4))
    with pytest.raises(ValueError, match="multiple"):
        ref.official_ranks_t2v(sims[:11])


def test_t2v_several_relevant_items_take_the_best():
    sims = np.array([[0.1, 0.9, 0.5, 0.5]])
    # relevant {0, 2}: item 0 → 3, item 2 → 1 + (2 − 1)/2 = 1.5; best 1.5. Padding −1 is ignored.
    np.testing.assert_array_equal(ref.official_ranks_t2v(sims, gt=np.array([[0, 2, -1]])), [1.5])


def test_t2v_infinite_ground_truth_is_never_found():
    # metric.py finds the gt by sorted − gt == 0; −inf − (−inf) is nan, so it asserts
    with pytest.raises(ValueError, match="not found"):
        ref.official_ranks_t2v(np.array([[np.inf, 0.0]]), gt=np.array([0]))


# ------------------------------------------------------------------------------------------- v2t


def test_v2t_min_over_the_item_captions():
    # item 0 row (c0..c3) = 0.9, 0.2, 0.4, 0.1: c0 → 0, c1 → 2; min 0
    # item 1 row = 0.1, 0.8, 0.4, 0.6: c2 → 2, c3 → 1; min 1
    np.testing.assert_array_equal(ref.official_ranks_v2t(MASKED), [0, 1])


def test_v2t_masked_captions_are_neither_competitors_nor_answers():
    # mask c0: it moves to the end of every row (MISSING_VAL) and is skipped as an answer
    # item 0: 0.4 (c2), 0.2 (c1), 0.1 (c3), [c0] → c1 → 1;  item 1: 0.8, 0.6 (c3), 0.4, [c0] → c3 → 1
    np.testing.assert_array_equal(ref.official_ranks_v2t(MASKED, query_masks=np.array([0, 1, 1, 1])), [1, 1])
    # mask both captions of item 0: it has no answer → inf, and still counts in the denominator
    # item 1: 0.6 (c3), 0.4 (c2), [c0, c1] → c3 → 0
    ranks = ref.official_ranks_v2t(MASKED, query_masks=np.array([0, 0, 1, 1]))
    np.testing.assert_array_equal(ranks, [np.inf, 0])
    m = metrics_of(ranks)
    assert m["R@1"] == 50.0 and m["R@50"] == 50.0
    assert m["MdR"] == math.inf and m["MnR"] == math.inf


def test_v2t_duplicate_own_captions_tied_at_the_top_are_a_miss():
    sims = np.array([
        [0.7, 0.1],   # c0, item 0
        [0.7, 0.2],   # c1, item 0: a duplicate of c0 for item 0
        [0.3, 0.5],   # c2, item 1
        [0.6, 0.9],   # c3, item 1
    ])
    # item 0 row: 0.7 (c0), 0.7 (c1), 0.6, 0.3 → c0 and c1 both at mean(0, 1) = 0.5; min 0.5
    # item 1 row: 0.9 (c3), 0.5 (c2), 0.2, 0.1 → c3 → 0
    ranks = ref.official_ranks_v2t(sims)
    np.testing.assert_array_equal(ranks, [0.5, 0])
    m = metrics_of(ranks)
    assert m["R@1"] == 50.0          # two right answers on top, yet item 0 misses R@1
    assert m["R@5"] == 100.0
    assert m["MdR"] == 1.25          # even count: (0 + 0.5)/2 + 1
    assert m["MnR"] == 1.25


def test_v2t_duplicate_caption_of_another_item_tied_at_the_top():
    sims = np.array([
        [0.8, 0.8],   # c0, item 0; also exactly item 1's best score
        [0.1, 0.3],   # c1, item 0
        [0.2, 0.8],   # c2, item 1: tied with c0 in item 1's row
        [0.4, 0.5],   # c3, item 1
    ])
    # item 0 row: 0.8 (c0), 0.4, 0.2, 0.1 → 0
    # item 1 row: 0.8 (c0), 0.8 (c2), 0.5 (c3), 0.3 → c2 at mean(0, 1) = 0.5, c3 → 2; min 0.5
    np.testing.assert_array_equal(ref.official_ranks_v2t(sims), [0, 0.5])


def test_v2t_trailing_captions_compete_but_belong_to_nobody():
    # 5 captions, 2 items: caps_per_video = 5 // 2 = 2, so c4 answers for no item
    sims = np.array([[0.5, 0.1], [0.2, 0.3], [0.1, 0.4], [0.3, 0.2], [0.9, 0.9]])
    # item 0 row: 0.9 (c4), 0.5 (c0), 0.3, 0.2 (c1), 0.1 → c0 → 1
    # item 1 row: 0.9 (c4), 0.4 (c2), 0.3, 0.2 (c3), 0.1 → c2 → 1
    np.testing.assert_array_equal(ref.official_ranks_v2t(sims), [1, 1])


def test_v2t_contiguous_layout_and_general_gt_agree():
    rng = np.random.default_rng(2)
    sims = rng.integers(0, 3, (15, 5)).astype(np.float64)
    np.testing.assert_array_equal(ref.official_ranks_v2t(sims), ref.official_ranks_v2t(sims, gt=np.arange(15) // 3))


# -------------------------------------------------------------- the oracle against plain counting


def counted_rank(row, target: int) -> float:
    """#entries strictly greater than row[target] + half of the other entries equal to it."""
    greater = sum(1 for v in row if v > row[target])
    equal = sum(1 for j, v in enumerate(row) if v == row[target] and j != target)
    return greater + 0.5 * equal


def test_t2v_matches_counting_with_ties_and_several_relevant_items():
    rng = np.random.default_rng(3)
    sims = rng.integers(0, 4, (30, 9)).astype(np.float32)
    gt = rng.integers(-1, 9, (30, 3))
    gt[:, 0] = rng.integers(0, 9, 30)   # at least one relevant item per query
    expected = [min(counted_rank(sims[q], j) for j in gt[q] if j >= 0) for q in range(30)]
    np.testing.assert_array_equal(ref.official_ranks_t2v(sims, gt=gt), expected)


def test_v2t_matches_counting_with_ties_and_masks():
    rng = np.random.default_rng(4)
    n_items, per_item = 6, 4
    sims = rng.integers(0, 3, (n_items * per_item, n_items)).astype(np.float64)
    kept = rng.random(n_items * per_item) > 0.25
    kept[::per_item] = True
    expected = []
    for i in range(n_items):
        live = np.flatnonzero(kept)            # masked captions drop out of every row
        row = sims[live, i]
        own = [k for k, c in enumerate(live) if c // per_item == i]
        expected.append(min(counted_rank(row, k) for k in own))
    np.testing.assert_array_equal(ref.official_ranks_v2t(sims, query_masks=kept), expected)


def test_rank_values_agree_with_qbnorm_ranks():
    # qbnorm's dense kernel ranks the same way (#greater + half the other ties, best relevant);
    # the protocols part only at R@1, where metric.py asks rank == 0 and a half rank misses
    from qbnorm_cli.core import metrics

    rng = np.random.default_rng(6)
    sims = rng.integers(0, 4, (24, 6)).astype(np.float32)
    gt = np.arange(24) // 4
    np.testing.assert_array_equal(ref.official_ranks_t2v(sims), metrics.ranks(sims, gt))
    captions = np.arange(24).reshape(6, 4)
    np.testing.assert_array_equal(ref.official_ranks_v2t(sims), metrics.ranks(sims.T, captions))


def test_metrics_match_their_formulas():
    rng = np.random.default_rng(5)
    ranks = rng.integers(0, 120, 400) / 2.0     # many half ranks
    m = metrics_of(ranks)
    assert m["R@1"] == 100 * sum(r == 0 for r in ranks) / 400
    for k in (5, 10, 50):
        assert m[f"R@{k}"] == 100 * sum(r < k for r in ranks) / 400
    ordered = sorted(ranks)
    assert m["MdR"] == (ordered[199] + ordered[200]) / 2 + 1
    assert m["MnR"] == pytest.approx(sum(ranks) / 400 + 1)
    assert m["GeomR"] == pytest.approx(scipy.stats.gmean([m["R@1"], m["R@5"], m["R@10"]]))
    assert metrics_of(ranks, num_queries=800)["R@5"] == m["R@5"] / 2


def test_rounding_follows_python_for_recalls_and_numpy_for_the_rest():
    # metric.py's round(x, 1): Python rounds the binary value of 38.15 (38.149999…) down,
    # numpy's round(np.float64) computes rint(381.5)/10 = 38.2
    rounded = ref.official_rounded({"R@1": 38.15, "MdR": 38.15, "GeomR": 46.45})
    assert rounded == {"R@1": 38.1, "MdR": 38.2, "GeomR": 46.4}
    assert ref.official_rounded({"R@1": 38.15}, numpy_recalls=True) == {"R@1": 38.2}
