"""`evaluate` against the official metric.py protocol (tests/reference.py): t2v and v2t, ties at the
top, masks in both directions, dense inputs stored either way round, top-N lists, and the optional
expected-ties rule against enumeration of every order of the ties."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import reference as ref

import qbnorm_cli
from qbnorm_cli import DataError, Ranking
from qbnorm_cli.core import metrics

LAYOUTS = [("t2v", False), ("t2v", True), ("v2t", False), ("v2t", True)]


def official(sims, direction, mask=None, gt=None):
    """The oracle's ranks and unrounded figures of a t2v-layout matrix."""
    ranks = (ref.official_ranks_t2v if direction == "t2v" else ref.official_ranks_v2t)(sims, mask, gt)
    return ranks, ref.official_metrics(ranks)


def ours(sims, direction, transpose, **kw):
    stored = np.ascontiguousarray(np.asarray(sims).T) if transpose else np.asarray(sims)
    return qbnorm_cli.evaluate(stored, direction=direction, transpose=transpose, **kw)


def assert_same(result, ranks, figures, direction, mask=None):
    got = result["ranks"] if direction == "v2t" or mask is None else result["ranks"][mask]
    np.testing.assert_array_equal(got, ranks)
    # the same arithmetic as cols2metrics (100·count/n, numpy median/mean, exp(mean(log))): equal, not close
    assert result["metrics"] == figures
    assert all(result["exact"].values())


# ------------------------------------------------------------------------------------ hand-made ties

TIE_AT_TOP = np.array([
    [0.9, 0.9, 0.1],   # c0 → item 0, tied with item 1 at the top: rank 0.5, an R@1 miss
    [0.3, 0.3, 0.3],   # c1 → item 1, all equal: (G − 1)/2 = 1
    [0.5, 0.7, 0.2],   # c2 → item 2, below both others: 2
])


@pytest.mark.parametrize("transpose", [False, True])
def test_t2v_tie_at_the_top_misses_r1(transpose):
    res = ours(TIE_AT_TOP, "t2v", transpose, queries_per_item=1)
    np.testing.assert_array_equal(res["ranks"], [0.5, 1.0, 2.0])
    assert res["metrics"]["R@1"] == 0.0 and res["metrics"]["R@5"] == 100.0
    assert res["metrics"]["GeomR"] == 0.0
    assert res["protocol"]["name"] == "metric.py" and res["protocol"]["ties"] == "official"


DUPLICATES = np.array([
    [0.7, 0.1],   # c0, item 0
    [0.7, 0.2],   # c1, item 0: a duplicate of c0 for item 0
    [0.3, 0.5],   # c2, item 1
    [0.6, 0.9],   # c3, item 1
])


@pytest.mark.parametrize("transpose", [False, True])
def test_v2t_two_identical_own_captions_at_the_top_are_half_a_rank(transpose):
    res = ours(DUPLICATES, "v2t", transpose, queries_per_item=2)
    np.testing.assert_array_equal(res["ranks"], [0.5, 0.0])
    assert res["metrics"]["R@1"] == 50.0          # the official rule: a miss for item 0
    assert res["metrics"]["MdR"] == 1.25
    expected = ours(DUPLICATES, "v2t", transpose, queries_per_item=2, ties="expected")
    assert expected["metrics"]["R@1"] == 100.0    # either caption on top is right
    np.testing.assert_array_equal(expected["ranks"], [0.0, 0.0])
    assert expected["protocol"]["ties"] == "expected"


MASKED = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.4], [0.1, 0.6]])


@pytest.mark.parametrize("transpose", [False, True])
def test_v2t_masked_captions_answer_nothing_and_every_item_counts(transpose):
    mask = np.array([0, 0, 1, 1], dtype=bool)          # item 0 loses both captions: rank ∞
    res = ours(MASKED, "v2t", transpose, queries_per_item=2, query_mask=mask)
    np.testing.assert_array_equal(res["ranks"], [np.inf, 0])
    assert res["queries"] == 2 and res["metrics"]["R@1"] == 50.0 and res["metrics"]["MnR"] == np.inf
    res = ours(MASKED, "t2v", transpose, queries_per_item=2, query_mask=np.array([1, 1, 1, 0], dtype=bool))
    np.testing.assert_array_equal(res["ranks"][:3], [0, 1, 0.5])
    assert np.isnan(res["ranks"][3]) and res["queries"] == 3
    assert res["metrics"]["R@1"] == 100 / 3


def test_v2t_a_caption_scoring_minus_1e8_is_no_answer_as_in_metric_py():
    sims = np.array([[-1e8, 0.5], [0.2, 0.1], [0.3, 0.6], [0.1, 0.2]])
    for transpose in (False, True):
        res = ours(sims, "v2t", transpose, queries_per_item=2)
        np.testing.assert_array_equal(res["ranks"], official(sims, "v2t")[0])


# ------------------------------------------------------------------------------ random data with ties

@pytest.mark.parametrize(("direction", "transpose"), LAYOUTS)
@pytest.mark.parametrize("seed", range(6))
def test_random_tied_scores_with_masks_match_metric_py(direction, transpose, seed):
    rng = np.random.default_rng(seed)
    items, per = int(rng.integers(2, 9)), int(rng.integers(1, 6))
    sims = rng.integers(0, 4, (items * per, items)).astype(np.float32)
    sims[rng.integers(0, items * per)] = 2.0                     # a constant row
    sims[:, rng.integers(0, items)] = sims[:, 0]                 # a duplicated column
    mask = rng.random(items * per) > 0.3
    mask[0] = True
    ranks, figures = official(sims, direction, mask)
    res = ours(sims, direction, transpose, queries_per_item=per, query_mask=mask, block_rows=3)
    assert_same(res, ranks, figures, direction, mask)


@pytest.mark.parametrize(("direction", "transpose"), LAYOUTS)
def test_general_ground_truth_several_relevant_items(direction, transpose):
    rng = np.random.default_rng(11)
    sims = rng.integers(0, 3, (30, 7)).astype(np.float64)
    gt = rng.integers(-1, 7, (30, 3))
    gt[:, 0] = rng.integers(0, 7, 30)
    ranks, figures = official(sims, direction, None, gt)
    assert_same(ours(sims, direction, transpose, gt=gt, block_rows=4), ranks, figures, direction)


def test_trailing_captions_of_nobody_compete_in_v2t():
    sims = np.array([[0.5, 0.1], [0.2, 0.3], [0.1, 0.4], [0.3, 0.2], [0.9, 0.9]])
    gt = np.array([0, 0, 1, 1, -1])                 # metric.py's 5 // 2 = 2 captions per item
    ranks, figures = official(sims, "v2t")
    assert_same(ours(sims, "v2t", False, gt=gt), ranks, figures, "v2t")


def test_files_read_either_way_round(tmp_path):
    rng = np.random.default_rng(5)
    sims = rng.integers(0, 5, (40, 8)).astype(np.float32)
    with h5py.File(tmp_path / "t2v.h5", "w") as h5:
        h5.create_dataset("sims", data=sims, chunks=(3, 8))
        h5.create_dataset("v2t", data=sims.T.copy())
    np.save(tmp_path / "v2t.npy", sims.T.copy())
    for direction in ("t2v", "v2t"):
        ranks, figures = official(sims, direction)
        for spec, transpose in ((f"{tmp_path}/t2v.h5::/sims", False), (f"{tmp_path}/t2v.h5::/v2t", True),
                                (str(tmp_path / "v2t.npy"), True)):
            res = qbnorm_cli.evaluate(spec, queries_per_item=5, direction=direction, transpose=transpose,
                                      memory="1MiB")
            assert_same(res, ranks, figures, direction)


# ---------------------------------------------------------------------------------------- top-N lists

def ranking_of(rows: np.ndarray, n: int) -> Ranking:
    order = np.argsort(-rows, axis=1, kind="stable")[:, :n]
    return Ranking(order, np.take_along_axis(rows, order, axis=1), np.zeros(len(rows), bool), rows.shape[1])


@pytest.mark.parametrize("n", [1, 3, 40])
def test_v2t_from_per_item_lists_is_exact_where_listed(n):
    rng = np.random.default_rng(7)
    sims = rng.standard_normal((40, 8)).astype(np.float32)     # distinct scores: the lists are cut cleanly
    mask = rng.random(40) > 0.2
    ranks, _ = official(sims, "v2t", mask)
    res = qbnorm_cli.evaluate(ranking_of(sims.T, n), queries_per_item=5, direction="v2t", transpose=True,
                              query_mask=mask)
    censored = res["censored"]
    np.testing.assert_array_equal(res["ranks"][~censored], ranks[~censored])
    assert np.all(res["ranks"][censored] <= ranks[censored])    # a lower bound where not listed
    dense = qbnorm_cli.evaluate(sims, queries_per_item=5, direction="v2t", query_mask=mask)
    for k in (1, 5, 10, 50):
        value = res["metrics"][f"R@{k}"]
        assert value is None or value == dense["metrics"][f"R@{k}"]
    # R@1 is unknown only where a list's real entries were all masked (nothing known above the bound 0)
    assert (res["metrics"]["R@1"] is None) == bool((censored & (res["ranks"] == 0)).any())
    assert res["recall_curve"]["K"] == list(range(1, min(n, 40) + 1))


@pytest.mark.parametrize(("direction", "transpose"), [("v2t", False), ("t2v", True)])
@pytest.mark.parametrize("n", [1, 2, 4, 12])
@pytest.mark.parametrize("seed", range(3))
def test_lists_along_their_columns_are_exact_where_determined(direction, transpose, n, seed):
    """v2t from per-caption lists (and t2v from per-item lists): a rank is exact where every
    row's last listed score leaves no room for a hidden score above the best answer, else a
    lower bound; every known figure is metric.py's."""
    rng = np.random.default_rng(seed)
    sims = rng.standard_normal((30, 6)).astype(np.float32)     # distinct: the lists are cut cleanly
    sims[::5] += 1.5                                           # strong first captions: many exact ranks
    mask = rng.random(30) > 0.2 if direction == "v2t" else None
    ranks, _ = official(sims, direction, mask)
    rows = sims.T if transpose else sims
    res = qbnorm_cli.evaluate(ranking_of(rows, min(n, rows.shape[1])), queries_per_item=5, direction=direction,
                              transpose=transpose, query_mask=mask, block_rows=7)
    got = res["ranks"]
    censored = res["censored"]
    np.testing.assert_array_equal(got[~censored], ranks[~censored])
    assert np.all(got[censored] <= ranks[censored])
    dense = qbnorm_cli.evaluate(sims, queries_per_item=5, direction=direction, query_mask=mask)
    for name, value in res["metrics"].items():
        assert value is None or value == dense["metrics"][name], name
    if n >= rows.shape[1]:                                      # complete lists: everything is known
        assert not censored.any() and res["metrics"] == dense["metrics"]


def test_column_bounds_by_hand():
    # 4 captions × 3 items, top-2 lists; item 0's captions are c0, c1 (2 per item)
    neighbors = np.array([[0, 1], [2, 0], [1, 2], [1, 0]])
    scores = np.array([[0.9, 0.5], [0.8, 0.7], [0.9, 0.3], [0.6, 0.2]])
    relevant = np.array([0, 0, 1, 1])                          # caption → item
    best, hidden, has, lasts = metrics.list_column_bounds(neighbors, scores, relevant, 3)
    np.testing.assert_array_equal(best, [0.9, 0.9, -np.inf])   # item 2 has no captions
    counts = metrics.list_column_counts(neighbors, scores, relevant, best, hidden)
    st = metrics.list_column_standing(best, hidden, has, lasts, counts)
    # item 0: c0 lists it at 0.9; c2 (last 0.3) and c3 (lists it) cannot hide a score ≥ 0.9: exact, rank 0
    # item 1: c2 lists it at 0.9, c3 at 0.6; c0 lists it at 0.5, c1 (last 0.7) cannot hide ≥ 0.9: exact, rank 0
    np.testing.assert_array_equal(metrics.rank_values(st), [0, 0, np.inf])
    np.testing.assert_array_equal(st.censored, [False, False, False])
    scores[1, 1] = 0.95                                        # c1's last is now above item 0's best listed...
    scores[1, 0] = 0.99                                        # (lists stay sorted)
    best, hidden, has, lasts = metrics.list_column_bounds(neighbors, scores, relevant, 3)
    st = metrics.list_column_standing(best, hidden, has, lasts,
                                      metrics.list_column_counts(neighbors, scores, relevant, best, hidden))
    # ... and c1 lists item 0 at 0.95 itself: item 0's best answer is 0.95, c0 (0.9) below: still exact
    np.testing.assert_array_equal(metrics.rank_values(st)[:2], [0, 0])


# ------------------------------------------------------------------------------------- expected ties

@pytest.mark.parametrize("seed", range(4))
def test_expected_ties_against_enumeration_of_every_order(seed):
    rng = np.random.default_rng(seed)
    sims = rng.integers(0, 3, (12, 6)).astype(np.float64)
    gt = rng.integers(-1, 6, (12, 2))
    gt[:, 0] = rng.integers(0, 6, 12)
    st = metrics.row_standing(sims, gt)
    for k in (1, 2, 3, 5):
        hit, unknown = metrics.hits(st, k, "expected")
        assert not unknown.any()
        expected = [ref.expected_tie_hits(sims[q], gt[q], k) for q in range(12)]
        np.testing.assert_allclose(hit, expected, rtol=0, atol=1e-12)   # a ratio of small integers
    # the expected rank is the mean first relevant position over the orders
    for q in range(12):
        first = np.mean([sum(1 - ref.expected_tie_hits(sims[q], gt[q], k) for k in range(1, 7))])
        assert metrics.rank_values(st, "expected")[q] == pytest.approx(first, abs=1e-12)


def test_expected_ties_equal_official_without_ties():
    sims = np.random.default_rng(9).standard_normal((30, 6))
    for direction in ("t2v", "v2t"):
        a = qbnorm_cli.evaluate(sims, queries_per_item=5, direction=direction)
        b = qbnorm_cli.evaluate(sims, queries_per_item=5, direction=direction, ties="expected")
        assert a["metrics"] == pytest.approx(b["metrics"], rel=1e-15)


# ----------------------------------------------------------------------------------------------- CLI

def test_cli_v2t_from_a_t2v_dump_and_its_transposed_copy(cli, tmp_path):
    rng = np.random.default_rng(10)
    sims = rng.integers(0, 4, (20, 4)).astype(np.float32)
    np.save(tmp_path / "t2v.npy", sims)
    np.save(tmp_path / "v2t.npy", sims.T.copy())
    np.save(tmp_path / "mask.npy", rng.random(20) > 0.2)
    _, figures = official(sims, "v2t", np.load(tmp_path / "mask.npy"))
    docs = [json.loads(cli.ok("evaluate", tmp_path / f, "--direction", "v2t", "--queries-per-item", 5,
                              "--query-mask", tmp_path / "mask.npy", "--json", *extra))
            for f, extra in (("t2v.npy", ()), ("v2t.npy", ("--transpose",)))]
    for doc in docs:
        assert doc["direction"] == "v2t" and doc["protocol"]["direction"] == "v2t"
        assert doc["queries"] == 4 and doc["valid_queries"] == 4
        assert doc["inputs"][0]["metrics"] == pytest.approx(figures, rel=0, abs=0)
    code, _, err = cli("evaluate", tmp_path / "t2v.npy", "--direction", "x2y", "--queries-per-item", 5)
    assert code == 2 and "--direction 'x2y'" in err


def test_cli_v2t_evaluation_file_gates_and_table(cli, tmp_path):
    sims = np.random.default_rng(12).integers(0, 4, (12, 3)).astype(np.float32)
    np.save(tmp_path / "s.npy", sims)
    ranks, figures = official(sims, "v2t")
    code, out, err = cli("evaluate", tmp_path / "s.npy", "--direction", "v2t", "--queries-per-item", 4,
                         "-o", tmp_path / "e.h5", "--fail-under", f"R@5={figures['R@5'] + 1}", "--json")
    assert code == 4 and "Retrieval v2t (3 items ranking 12 captions)" in err
    doc = json.loads(out)
    assert doc["passed"] is False and doc["inputs"][0]["metrics"] == figures
    with h5py.File(tmp_path / "e.h5", "r") as h5:
        np.testing.assert_array_equal(h5["ranks"][0], ranks)
        assert json.loads(h5.attrs["protocol"])["direction"] == "v2t"
        assert json.loads(h5.attrs["params"])["direction"] == "v2t"


def test_ranking_files_read_transposed_need_their_gallery_size(tmp_path):
    sims = np.random.default_rng(13).standard_normal((10, 2)).astype(np.float32)
    top = ranking_of(sims.T, 4)
    with h5py.File(tmp_path / "r.h5", "w") as h5:
        h5["neighbors"] = top.indices
        h5["scores"] = top.scores
    with pytest.raises(DataError, match="gallery_rows"):
        qbnorm_cli.evaluate(f"{tmp_path}/r.h5::/neighbors", queries_per_item=5, direction="v2t", transpose=True)
    with h5py.File(tmp_path / "r.h5", "a") as h5:
        h5.attrs["gallery_rows"] = 10
    res = qbnorm_cli.evaluate(f"{tmp_path}/r.h5::/neighbors", queries_per_item=5, direction="v2t", transpose=True)
    dense = qbnorm_cli.evaluate(sims, queries_per_item=5, direction="v2t")
    assert res["censored_queries"] == 0 and res["metrics"] == dense["metrics"]   # both items' best caption listed


def test_ranking_a_log_domain_file_across_its_rows_is_warned_about(tmp_path):
    sample = "sample_data/multi30k-sample.h5"
    from pathlib import Path

    spec = str(Path(__file__).resolve().parent.parent / sample)
    probe = qbnorm_cli.probe(f"{spec}::/train_queries", f"{spec}::/gallery", betas=[20])
    qbnorm_cli.normalise(f"{spec}::/queries", f"{spec}::/gallery", probe, method="dis", output=tmp_path / "dis.h5")
    with pytest.warns(qbnorm_cli.QbnormWarning, match="log-domain scores"):
        qbnorm_cli.evaluate(str(tmp_path / "dis.h5"), queries_per_item=5, direction="v2t")
