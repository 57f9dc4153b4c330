"""Properties of the whole pipeline, through the CLI on small random problems (hypothesis):
block sizes never change results, permutations act as they should, DIS is IS or raw row by row,
and runs are deterministic."""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import tolerance as tol
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qbnorm_cli.cli import main

SETTINGS = settings(max_examples=5, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def qb(capsys, *args) -> None:
    capsys.readouterr()
    code = main([str(a) for a in args] + ["-q"])
    assert code == 0, capsys.readouterr().err


def datasets(path) -> dict:
    out = {}
    with h5py.File(path, "r") as h5:
        h5.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def dyadic(rng, shape) -> np.ndarray:
    """Multiples of 1/1024 in (−1, 1): float32 dot products of ≤ 6 of them are exact, ties are rare."""
    return (rng.integers(-1023, 1024, shape) / 1024).astype(np.float32)


@st.composite
def problems(draw):
    n_bank = draw(st.integers(2, 14))
    n_gallery = draw(st.integers(2, 16))
    n_queries = draw(st.integers(1, 9))
    dim = draw(st.integers(2, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return SimpleNamespace(bank=dyadic(rng, (n_bank, dim)), gallery=dyadic(rng, (n_gallery, dim)),
                           queries=dyadic(rng, (n_queries, dim)), k=draw(st.integers(1, n_gallery)),
                           top_k=draw(st.integers(1, n_gallery)), block=draw(st.integers(1, 5)))


# The problems' products are exact (dyadic values); runs that tile differently differ only in the
# float64 evaluation: an LSE over ≤ 14 bank rows of spread ≤ 12 (|P| ≤ 6) at β = 3, |η| ≤ 3·6 + 3·6 +
# log 14, each run within EXACT64 of the exact value; written as float32, each is rounded once more.
EXACT64 = tol.method_error("is", 0.0, magnitude=40.0, n_bank=14, spread=12.0, beta=3.0)


def same_scores(a, b) -> None:
    """Two runs' float32 scores: both within EXACT64 of the exact η before rounding to float32."""
    tol.assert_close(a, b, 2 * EXACT64 + tol.stored32(a) + tol.stored32(b))


def write(directory: Path, name: str, **arrays) -> Path:
    path = directory / name
    with h5py.File(path, "w") as h5:
        for key, value in arrays.items():
            h5[key] = value
    return path


def pipeline(capsys, directory: Path, p, name: str, *, bank=None, gallery=None, block=None,
             methods=("none", "is", "dis"), top_k=None) -> dict:
    """probe + normalise (dot similarity) in `directory`; returns {method: datasets, 'probe': datasets}."""
    data = write(directory, f"{name}.h5", bank=p.bank if bank is None else bank,
                 gallery=p.gallery if gallery is None else gallery, queries=p.queries)
    blocks = [] if block is None else ["--block-rows", block]
    probe = directory / f"{name}-probe.h5"
    qb(capsys, "probe", "--bank", f"{data}::/bank", "--gallery", f"{data}::/gallery", "--similarity", "dot",
       "--beta", 3, "--k", p.k, "--topk-mean", 2, "-o", probe, *blocks)
    result = {"probe": datasets(probe)}
    for method in methods:
        out = directory / f"{name}-{method}.h5"
        extra = [] if top_k is None else ["--top-k", top_k]
        extra += ["--topk-mean", 2] if method in ("csls", "nnn") else []
        qb(capsys, "normalise", "--queries", f"{data}::/queries", "--gallery", f"{data}::/gallery", "--probe", probe,
           "--method", method, "--k", p.k, "-o", out, *blocks, *extra)
        result[method] = datasets(out)
    return result


def assert_same_statistics(a: dict, b: dict) -> None:
    np.testing.assert_array_equal(a["bank_neighbors"], b["bank_neighbors"])
    np.testing.assert_array_equal(a["activation_count"], b["activation_count"])
    tol.assert_close(a["log_norm"], b["log_norm"], 2 * EXACT64)
    tol.assert_close(a["topk_mean"], b["topk_mean"], 2 * EXACT64)


@SETTINGS
@given(p=problems())
def test_block_size_changes_nothing(capsys, p):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        whole = pipeline(capsys, tmp, p, "whole", top_k=p.top_k, methods=("dis", "csls"))
        blocked = pipeline(capsys, tmp, p, "blocked", block=p.block, top_k=p.top_k, methods=("dis", "csls"))
        dense = pipeline(capsys, tmp, p, "dense", block=p.block, methods=("dis",))
        dense_whole = pipeline(capsys, tmp, p, "dense-whole", methods=("dis",))
    assert_same_statistics(whole["probe"], blocked["probe"])
    for method in ("dis", "csls"):
        np.testing.assert_array_equal(whole[method]["neighbors"], blocked[method]["neighbors"])  # bit-identical
        np.testing.assert_array_equal(whole[method]["normalised"], blocked[method]["normalised"])
        same_scores(whole[method]["scores"], blocked[method]["scores"])
    np.testing.assert_array_equal(dense["dis"]["normalised"], dense_whole["dis"]["normalised"])
    same_scores(dense["dis"]["scores"], dense_whole["dis"]["scores"])
    np.testing.assert_array_equal(np.argsort(-dense["dis"]["scores"], axis=1, kind="stable"),
                                  np.argsort(-dense_whole["dis"]["scores"], axis=1, kind="stable"))
    # the dense scores rank exactly as the ranking file says
    order = np.argsort(-dense["dis"]["scores"], axis=1, kind="stable")[:, : p.top_k]
    np.testing.assert_array_equal(order, whole["dis"]["neighbors"])


@SETTINGS
@given(p=problems(), data=st.data())
def test_permuting_the_gallery_permutes_the_outputs(capsys, p, data):
    perm = np.array(data.draw(st.permutations(range(len(p.gallery)))))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = pipeline(capsys, tmp, p, "base", methods=("is", "dis", "csls"))
        moved = pipeline(capsys, tmp, p, "moved", gallery=p.gallery[perm], methods=("is", "dis", "csls"))
        ranked = pipeline(capsys, tmp, p, "ranked", top_k=p.top_k, methods=("dis",))
        moved_ranked = pipeline(capsys, tmp, p, "moved-ranked", gallery=p.gallery[perm], top_k=p.top_k,
                                methods=("dis",))
    tol.assert_close(moved["probe"]["log_norm"], base["probe"]["log_norm"][:, perm], 2 * EXACT64)
    np.testing.assert_array_equal(moved["probe"]["activation_count"], base["probe"]["activation_count"][perm])
    np.testing.assert_array_equal(perm[moved["probe"]["bank_neighbors"]], base["probe"]["bank_neighbors"])
    for method in ("is", "dis", "csls"):
        same_scores(moved[method]["scores"], base[method]["scores"][:, perm])
        np.testing.assert_array_equal(moved[method]["normalised"], base[method]["normalised"])
    np.testing.assert_array_equal(perm[moved_ranked["dis"]["neighbors"]], ranked["dis"]["neighbors"])


@SETTINGS
@given(p=problems(), data=st.data())
def test_permuting_the_bank_changes_nothing(capsys, p, data):
    perm = np.array(data.draw(st.permutations(range(len(p.bank)))))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = pipeline(capsys, tmp, p, "base", top_k=p.top_k, methods=("is", "dis", "csls"))
        moved = pipeline(capsys, tmp, p, "moved", bank=p.bank[perm], top_k=p.top_k, methods=("is", "dis", "csls"))
    np.testing.assert_array_equal(moved["probe"]["bank_neighbors"], base["probe"]["bank_neighbors"][perm])
    np.testing.assert_array_equal(moved["probe"]["activation_count"], base["probe"]["activation_count"])
    tol.assert_close(moved["probe"]["log_norm"], base["probe"]["log_norm"], 2 * EXACT64)
    for method in ("is", "dis", "csls"):
        np.testing.assert_array_equal(moved[method]["neighbors"], base[method]["neighbors"])
        np.testing.assert_array_equal(moved[method]["normalised"], base[method]["normalised"])
        same_scores(moved[method]["scores"], base[method]["scores"])


def _check_dis_rows(result) -> np.ndarray:
    """Row by row: DIS equals IS where the raw top-1 is in the activation set, raw scores elsewhere."""
    raw, is_, dis = (result[m]["scores"] for m in ("none", "is", "dis"))
    k = result["k"]
    active = np.zeros(raw.shape[1], dtype=bool)
    active[result["probe"]["bank_neighbors"][:, :k].ravel()] = True
    gated = active[np.argmax(raw, axis=1)]
    np.testing.assert_array_equal(result["dis"]["normalised"], gated)
    np.testing.assert_array_equal(dis[gated], is_[gated])
    np.testing.assert_array_equal(dis[~gated], raw[~gated])
    return gated


@SETTINGS
@given(p=problems())
def test_dis_is_is_or_raw_row_by_row(capsys, p):
    with tempfile.TemporaryDirectory() as tmp:
        result = pipeline(capsys, Path(tmp), p, "x")
    result["k"] = p.k
    _check_dis_rows(result)


def test_dis_equals_is_when_every_top1_is_active(capsys, tmp_path):
    rng = np.random.default_rng(5)
    p = SimpleNamespace(bank=dyadic(rng, (9, 4)), gallery=dyadic(rng, (7, 4)), queries=dyadic(rng, (11, 4)), k=7)
    result = pipeline(capsys, tmp_path, p, "all")  # k = gallery size: every item is active
    result["k"] = p.k
    assert _check_dis_rows(result).all()
    np.testing.assert_array_equal(result["dis"]["scores"], result["is"]["scores"])


def test_dis_equals_raw_when_no_top1_is_active(capsys, tmp_path):
    gallery = np.eye(4, dtype=np.float32)
    bank = np.tile(np.array([[1, 0, 0, 0]], dtype=np.float32), (5, 1))  # every bank row's top-1 is item 0
    queries = np.array([[0, 1, 0, 0], [0, 0, 0.5, 0], [0.25, 0, 0, 1]], dtype=np.float32)
    result = pipeline(capsys, tmp_path, SimpleNamespace(bank=bank, gallery=gallery, queries=queries, k=1), "none")
    result["k"] = 1
    assert not _check_dis_rows(result).any()
    np.testing.assert_array_equal(result["dis"]["scores"], result["none"]["scores"])


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), size=st.integers(1, 20))
def test_same_seed_same_bank(capsys, seed, size):
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = write(tmp, "source.h5", x=dyadic(rng, (20, 3)))
        for name in ("a", "b"):
            qb(capsys, "build-bank", f"{source}::/x", "-o", tmp / f"{name}.h5", "--size", size, "--seed", seed)
        a, b = datasets(tmp / "a.h5"), datasets(tmp / "b.h5")
        with h5py.File(source) as h5:
            x = h5["x"][()]
    np.testing.assert_array_equal(a["embeddings"], b["embeddings"])
    np.testing.assert_array_equal(a["source_index"], b["source_index"])
    assert np.all(np.diff(a["source_index"]) > 0)
    np.testing.assert_array_equal(a["embeddings"], x[a["source_index"]])


@pytest.mark.parametrize("top_k", [None, 3])
def test_runs_are_deterministic(capsys, tmp_path, top_k):
    rng = np.random.default_rng(6)
    p = SimpleNamespace(bank=dyadic(rng, (12, 5)), gallery=dyadic(rng, (10, 5)), queries=dyadic(rng, (6, 5)), k=2)
    methods = ("none", "is", "dis", "csls", "nnn")
    first = pipeline(capsys, tmp_path, p, "first", top_k=top_k, methods=methods)
    second = pipeline(capsys, tmp_path, p, "second", top_k=top_k, methods=methods)
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].keys() == second[key].keys()
        for name in first[key]:
            np.testing.assert_array_equal(first[key][name], second[key][name], err_msg=f"{key}{name}")
