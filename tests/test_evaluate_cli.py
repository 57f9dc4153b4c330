"""`qbnorm evaluate` end to end: hand-made score and ranking files with known ranks."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import tolerance as tol
from helpers import run

from qbnorm_cli import FORMAT_VERSION
from qbnorm_cli.core import metrics

# 4 queries × 5 gallery items; ground truth [0, 1, 2, 3] has ranks 0, 2, 1.5, 4.
SCORES = np.array([
    [0.9, 0.1, 0.2, 0.3, 0.4],
    [0.9, 0.5, 0.1, 0.2, 0.8],
    [0.3, 0.3, 0.3, 0.3, 0.1],   # gt 2 tied with three others: 0 + 3/2
    [0.5, 0.6, 0.7, 0.1, 0.8],
], dtype=np.float32)
GT = np.array([0, 1, 2, 3])
RANKS = np.array([0, 2, 1.5, 4])


@pytest.fixture
def files(tmp_path):
    np.save(tmp_path / "raw.npy", SCORES)
    better = SCORES.copy()
    better[np.arange(4), GT] = 1.0  # every ground truth first
    with h5py.File(tmp_path / "better.h5", "w") as h5:
        h5["sims"] = better
    np.save(tmp_path / "gt.npy", GT)
    return tmp_path


def write_ranking(path, scores: np.ndarray, n: int, gallery_rows: int | None = None, qbnorm: bool = True):
    order = np.argsort(-scores, axis=1, kind="stable")[:, :n]
    with h5py.File(path, "w") as h5:
        if qbnorm:
            h5.attrs["qbnorm_kind"] = "ranking"
            h5.attrs["qbnorm_version"] = FORMAT_VERSION
        if gallery_rows is not None:
            h5.attrs["gallery_rows"] = gallery_rows
        h5["neighbors"] = order.astype(np.int32)
        h5["scores"] = np.take_along_axis(scores, order, axis=1)


def test_json_metrics_of_one_input(files, capsys):
    code, out, err = run(capsys, "evaluate", files / "raw.npy", "--gt", files / "gt.npy", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["protocol"] == metrics.protocol("t2v", "official")
    assert doc["protocol"]["name"] == "metric.py" and doc["direction"] == "t2v"
    assert doc["valid_queries"] == 4
    [res] = doc["inputs"]
    expected = metrics.recall_summary(RANKS)
    for name, value in expected.items():
        assert res["metrics"][name] == tol.approx64(value)
        assert res["exact"][name] is True
    assert res["metrics"]["R@1"] == tol.approx64(25.0)
    assert res["metrics"]["MdR"] == tol.approx64(2.75)


def test_two_inputs_table_and_difference(files, capsys):
    code, out, err = run(capsys, "evaluate", files / "raw.npy", f"{files / 'better.h5'}::/sims",
                         "--gt", files / "gt.npy", "--json")
    assert code == 0, err
    assert "raw" in err and "better" in err and "Δ" in err
    doc = json.loads(out)
    assert [r["name"] for r in doc["inputs"]] == ["raw", "better"]
    assert doc["inputs"][1]["metrics"]["R@1"] == tol.approx64(100.0)
    assert doc["difference"]["metrics"]["R@1"] == tol.approx64(75.0)


def test_multi_positive_ground_truth(files, capsys):
    np.save(files / "gt2.npy", np.array([[0, -1], [4, 1], [2, -1], [3, 4]]))
    code, out, _ = run(capsys, "evaluate", files / "raw.npy", "--gt", files / "gt2.npy", "--json")
    assert code == 0
    # query 1: item 4 is second (rank 1); query 3: item 4 is first (rank 0)
    assert json.loads(out)["inputs"][0]["metrics"]["MnR"] == tol.approx64(np.mean([0, 1, 1.5, 0]) + 1)


def test_query_mask_drops_queries(files, capsys):
    np.save(files / "mask.npy", np.array([1, 1, 0, 0], dtype=np.int8))
    code, out, _ = run(capsys, "evaluate", files / "raw.npy", "--gt", files / "gt.npy",
                       "--query-mask", files / "mask.npy", "--json", "-o", files / "eval.h5")
    assert code == 0
    doc = json.loads(out)
    assert doc["valid_queries"] == 2
    assert doc["inputs"][0]["metrics"]["R@1"] == tol.approx64(50.0)
    with h5py.File(files / "eval.h5") as h5:
        assert h5.attrs["qbnorm_kind"] == "evaluation"
        ranks = h5["ranks"][()]
        assert ranks.shape == (1, 4) and ranks.dtype == np.float64
        np.testing.assert_array_equal(ranks[0, :2], [0, 2])
        assert np.isnan(ranks[0, 2:]).all()
        assert json.loads(h5.attrs["metrics"])[0]["metrics"]["R@1"] == tol.approx64(50.0)


def test_queries_per_item(tmp_path, capsys):
    scores = np.eye(3, dtype=np.float32).repeat(2, axis=0)  # 6 queries, 2 per item, all first
    np.save(tmp_path / "s.npy", scores)
    code, out, _ = run(capsys, "evaluate", tmp_path / "s.npy", "--queries-per-item", 2, "--json", "-q")
    assert code == 0
    assert json.loads(out)["inputs"][0]["metrics"]["R@1"] == tol.approx64(100.0)


def test_block_rows_do_not_change_results(files, capsys):
    base = json.loads(run(capsys, "evaluate", files / "raw.npy", "--gt", files / "gt.npy", "--json")[1])
    small = json.loads(run(capsys, "evaluate", files / "raw.npy", "--gt", files / "gt.npy", "--json",
                           "--block-rows", 1)[1])
    assert base["inputs"][0]["metrics"] == small["inputs"][0]["metrics"]


def test_ranking_file_exact_and_unknown_figures(tmp_path, capsys):
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((30, 80)).astype(np.float32)
    gt = rng.integers(0, 80, 30)
    dense[:20, :] -= 10
    dense[np.arange(20), gt[:20]] += 20  # 20 of 30 queries find their item first
    np.save(tmp_path / "dense.npy", dense)
    np.save(tmp_path / "gt.npy", gt)
    write_ranking(tmp_path / "top3.h5", dense, 3, gallery_rows=80)
    code, out, err = run(capsys, "evaluate", tmp_path / "top3.h5", tmp_path / "dense.npy",
                         "--gt", tmp_path / "gt.npy", "--json")
    assert code == 0, err
    top, full = json.loads(out)["inputs"]
    assert top["kind"] == "ranking" and top["listed"] == 3
    for name in ("R@1",):
        assert top["metrics"][name] == tol.approx64(full["metrics"][name]) and top["exact"][name]
    assert top["metrics"]["R@5"] is None and top["exact"]["R@5"] is False
    assert top["metrics"]["MnR"] is None and top["exact"]["MnR"] is False
    assert top["metrics"]["MdR"] == tol.approx64(full["metrics"]["MdR"]) and top["exact"]["MdR"]
    assert "n/a (top 3)" in err and "n/a (> 3)" in err  # R@5 and MnR


def test_ranking_file_median_unknown(tmp_path, capsys):
    scores = np.tile(np.arange(10, dtype=np.float32)[::-1], (4, 1))  # item j has rank j
    np.save(tmp_path / "gt.npy", np.array([0, 5, 6, 7]))
    write_ranking(tmp_path / "top2.h5", scores, 2, qbnorm=False)  # foreign: named by /neighbors
    code, out, err = run(capsys, "evaluate", f"{tmp_path / 'top2.h5'}::/neighbors", "--gt",
                         tmp_path / "gt.npy", "--json")
    assert code == 0, err
    res = json.loads(out)["inputs"][0]
    assert res["kind"] == "ranking"
    assert res["metrics"]["MdR"] is None and res["exact"]["MdR"] is False
    assert res["metrics"]["R@1"] == tol.approx64(25.0)
    assert "n/a (> 2)" in err


def test_fail_under_exits_4(files, capsys):
    code, out, err = run(capsys, "evaluate", files / "raw.npy", "--gt", files / "gt.npy",
                         "--fail-under", "R@1=30", "--fail-under", "R@5=10", "--json")
    assert code == 4
    assert "raw" in err and "R@1" in err and "25.00" in err and "30" in err
    doc = json.loads(out)
    assert doc["passed"] is False
    assert [g["passed"] for g in doc["gates"]] == [False, True]
    assert run(capsys, "evaluate", files / "raw.npy", "--gt", files / "gt.npy", "--fail-under", "r@1=20")[0] == 0


@pytest.mark.parametrize("gate", ["R@2=10", "R@1", "R@1=abc", "recall=3"])
def test_bad_gate_is_a_usage_error(files, capsys, gate):
    code, _, err = run(capsys, "evaluate", files / "raw.npy", "--gt", files / "gt.npy", "--fail-under", gate)
    assert code == 2 and "--fail-under" in err


def test_ground_truth_errors(files, capsys):
    np.save(files / "short.npy", GT[:3])
    np.save(files / "outside.npy", np.array([0, 1, 9, 3]))
    code, _, err = run(capsys, "evaluate", files / "raw.npy", "--gt", files / "short.npy")
    assert code == 3 and "short.npy" in err
    code, _, err = run(capsys, "evaluate", files / "raw.npy", "--gt", files / "outside.npy")
    assert code == 3 and "outside.npy" in err and "9" in err
    code, _, err = run(capsys, "evaluate", files / "raw.npy")
    assert code == 2
    code, _, err = run(capsys, "evaluate", files / "raw.npy", "--gt", files / "gt.npy", "--queries-per-item", 1)
    assert code == 2
    np.save(files / "mask3.npy", np.ones(3, dtype=bool))
    code, _, err = run(capsys, "evaluate", files / "raw.npy", "--gt", files / "gt.npy", "--query-mask",
                       files / "mask3.npy")
    assert code == 3 and "mask3.npy" in err
