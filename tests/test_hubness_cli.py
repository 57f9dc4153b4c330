"""`qbnorm hubness` end to end: DEXTER's published values, rankings, probes, errors."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import tolerance as tol
from helpers import dexter_similarity, run

from qbnorm_cli import FORMAT_VERSION
from qbnorm_cli.core import hubness as hub
from qbnorm_cli.core.statistics import occurrence
from qbnorm_cli.io.probefile import Probe, Stored


def by_k(doc, i=0) -> dict:
    return {row["k"]: row for row in doc["inputs"][i]["by_k"]}


@pytest.fixture(scope="module")
def dexter(tmp_path_factory):
    path = tmp_path_factory.mktemp("dexter") / "dexter.npy"
    np.save(path, dexter_similarity())
    return path


def test_dexter_published_values_through_the_cli(dexter, capsys):
    code, out, err = run(capsys, "hubness", dexter, "--k", 5, "--k", 10, "--exclude-self", "--json")
    assert code == 0, err
    rows = by_k(json.loads(out))
    assert round(rows[5]["skewness"], 2) == 4.22 and round(rows[10]["skewness"], 2) == 3.98
    assert round(rows[5]["antihub_rate_pct"], 2) == 26.67 and round(rows[10]["antihub_rate_pct"], 2) == 17.67
    assert rows[10]["queries"] == 300 and rows[10]["items"] == 300
    assert "k-skewness" in err and "█" in err


def test_block_rows_do_not_change_results(dexter, capsys):
    whole = json.loads(run(capsys, "hubness", dexter, "--exclude-self", "--json")[1])
    blocks = json.loads(run(capsys, "hubness", dexter, "--exclude-self", "--json", "--block-rows", 7)[1])
    assert whole["inputs"][0]["by_k"] == blocks["inputs"][0]["by_k"]


def write_ranking(path, scores: np.ndarray, n: int):
    order = np.argsort(-scores, axis=1, kind="stable")[:, :n]
    with h5py.File(path, "w") as h5:
        h5.attrs["qbnorm_kind"] = "ranking"
        h5.attrs["qbnorm_version"] = FORMAT_VERSION
        h5.attrs["gallery_rows"] = scores.shape[1]
        h5["neighbors"] = order.astype(np.int32)
        h5["scores"] = np.take_along_axis(scores, order, axis=1).astype(np.float32)


def test_ranking_file_matches_dense_and_side_by_side(tmp_path, capsys):
    rng = np.random.default_rng(1)
    dense = rng.standard_normal((40, 25)).astype(np.float32)
    np.save(tmp_path / "dense.npy", dense)
    write_ranking(tmp_path / "top6.h5", dense, 6)
    code, out, err = run(capsys, "hubness", tmp_path / "dense.npy", tmp_path / "top6.h5", "--k", 1, "--k", 5,
                         "--json", "-o", tmp_path / "hub.h5")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["inputs"][0]["by_k"] == doc["inputs"][1]["by_k"]
    assert "dense" in err and "top6" in err
    order = np.argsort(-dense, axis=1, kind="stable")
    expected = hub.measures(hub.k_occurrence(order, 5, 25), 5, 40)
    assert by_k(doc)[5]["gini"] == expected["gini"]  # the same counts through the same formula
    with h5py.File(tmp_path / "hub.h5") as h5:
        assert h5.attrs["qbnorm_kind"] == "hubness"
        occ = h5["k_occurrence"][()]
        assert occ.shape == (2, 2, 25)
        assert occ[0, 1].sum() == 5 * 40
        np.testing.assert_array_equal(occ[0, 1], hub.k_occurrence(order, 5, 25))
        assert len(json.loads(h5.attrs["measures"])) == 2


def test_ranking_exclude_self_drops_the_query(tmp_path, capsys):
    sim = dexter_similarity()[:60, :60].astype(np.float64)
    np.save(tmp_path / "sq.npy", sim)
    write_ranking(tmp_path / "sq_top6.h5", sim, 6)
    dense = json.loads(run(capsys, "hubness", tmp_path / "sq.npy", "--exclude-self", "--k", 5, "--json")[1])
    ranked = json.loads(run(capsys, "hubness", tmp_path / "sq_top6.h5", "--exclude-self", "--k", 5, "--json")[1])
    assert dense["inputs"][0]["by_k"] == ranked["inputs"][0]["by_k"]


def test_usage_errors(tmp_path, capsys):
    np.save(tmp_path / "rect.npy", np.zeros((4, 6), dtype=np.float32))
    code, _, err = run(capsys, "hubness", tmp_path / "rect.npy", "--exclude-self")
    assert code == 2 and "square" in err
    write_ranking(tmp_path / "top3.h5", np.random.default_rng(0).random((5, 8)), 3)
    code, _, err = run(capsys, "hubness", tmp_path / "top3.h5", "--k", 4)
    assert code == 2 and "N = 3" in err
    code, _, err = run(capsys, "hubness", tmp_path / "rect.npy", "--k", 0)
    assert code == 2


def write_probe(path, neighbors: np.ndarray, gallery_rows: int):
    """A probe file with these bank neighbours (its other statistics are placeholders)."""
    zeros = np.zeros((1, gallery_rows))
    datasets = {
        "/log_norm": Stored(zeros, {"betas": np.array([20.0])}),
        "/bank_neighbors": Stored(neighbors.astype(np.int32)),
        "/activation_count": Stored(occurrence(neighbors, 1, gallery_rows), {"k": 1}),
        "/topk_mean": Stored(zeros, {"ks": np.array([1])}),
    }
    Probe(datasets, {"gallery_rows": gallery_rows, "bank_rows": len(neighbors), "similarity": "cosine"}).save(path)


def test_probe_bank_side_hubness_and_coverage_warning(tmp_path, capsys):
    neigh = np.array([[0, 1], [0, 2], [1, 0], [0, 3]])  # top-1 covers items 0 and 1 of 10
    write_probe(tmp_path / "probe.h5", neigh, 10)
    code, out, err = run(capsys, "hubness", tmp_path / "probe.h5", "--k", 1, "--k", 2, "--json", "--quiet")
    assert code == 0, err
    rows = by_k(json.loads(out))
    assert rows[1]["coverage_pct"] == tol.approx64(20.0) and rows[2]["coverage_pct"] == tol.approx64(40.0)
    assert rows[1]["max_nk"] == 3 and rows[1]["queries"] == 4
    assert err == ""  # --quiet: the warning is in the JSON document only
    first, second = json.loads(out)["warnings"]  # top 1 and top 2 cover 20 % and 40 % of the gallery
    assert "--method dis" in first and "20.0%" in first and "40.0%" in second
    code, _, err = run(capsys, "hubness", tmp_path / "probe.h5", "--k", 1)
    assert code == 0 and "qbnorm: warning:" in err and "20.0%" in err
    code, _, err = run(capsys, "hubness", tmp_path / "probe.h5", "--k", 3)
    assert code == 2 and "kmax" in err
    code, _, err = run(capsys, "hubness", tmp_path / "probe.h5", "--k", 1, "--exclude-self")
    assert code == 2


def test_the_library_warns_about_low_coverage_as_the_cli_does(tmp_path):
    """hubness() gives the same low-coverage warning as `qbnorm hubness` (it gave none)."""
    import pytest

    import qbnorm_cli

    write_probe(tmp_path / "probe.h5", np.array([[0, 1], [0, 2], [1, 0], [0, 3]]), 10)
    with pytest.warns(qbnorm_cli.QbnormWarning, match=r"cover only 20\.0% of the gallery.*method='dis'"):
        result = qbnorm_cli.hubness(str(tmp_path / "probe.h5"), k=1)
    assert result["by_k"][0]["coverage_pct"] == tol.approx64(20.0)


def test_one_low_coverage_warning_for_probe_and_hubness():
    """probe() and hubness() of its probe give the same low-coverage line (one rule, one text)."""
    import warnings
    from pathlib import Path

    import qbnorm_cli

    sample = Path(__file__).resolve().parent.parent / "sample_data" / "multi30k-sample.h5"
    with h5py.File(sample, "r") as f:
        bank, gallery = f["val_queries"][:20], f["gallery"][()]
    with warnings.catch_warnings(record=True) as probed:
        warnings.simplefilter("always")
        probe = qbnorm_cli.probe(bank, gallery, betas=[20], k=1)
    with warnings.catch_warnings(record=True) as measured:
        warnings.simplefilter("always")
        qbnorm_cli.hubness(probe, k=1)
    probe_lines = [str(w.message) for w in probed if "low bank coverage" in str(w.message)]
    hubness_lines = [str(w.message) for w in measured if "low bank coverage" in str(w.message)]
    assert len(probe_lines) == 1 and len(hubness_lines) == 1
    assert hubness_lines[0].endswith(probe_lines[0])
