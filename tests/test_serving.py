"""export and search: an inner-product index over the augmented gallery vectors returns what
normalise --top-k returns, for every exportable method of the registry, through every store.

Rankings are compared exactly on data whose top lists are separated by more than the error bounds
of both computations (tolerance.assert_separated); on the real sample data every disagreement is
counted and checked to be a float32 near-tie: at each position where the lists differ, the two
items' exact scores lie within 2·(search bound + normalise bound) of each other (the p-th largest
of a perturbed vector moves by at most its error), and a differing gate is a raw top-1 near-tie.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import tolerance as tol
from conftest import read_h5

import qbnorm_cli
from qbnorm_cli import DataError, UsageError, methods
from qbnorm_cli.core import augmented
from qbnorm_cli.errors import install_hint
from qbnorm_cli.io.stores.manifest import write_manifest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data" / "multi30k-sample.h5"
# the classic reducers need probe statistics these fixtures do not compute: tests/test_classic.py
CLASSIC = ("ls", "nicdm", "mp", "dsl")
EXPORTABLE = [m.name for m in methods.METHODS.values() if not m.needs.sorted_bank and m.name not in CLASSIC]
RANK_BASED = [m.name for m in methods.METHODS.values() if m.needs.sorted_bank]
TOP = 5
# Rows allowed to differ on real data, besides each being a near-tie: worst-case float32 bounds leave
# many rows "near" (γ_d ≫ the √d·u that sums really drift), but actual disagreements are rare (the issue
# measured 99.99 % identical top-100 lists at 10k × 100k); a wrong constant or centre changes most rows.
SMALL = 0.01


def unit64(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(seed: int = 0, n_gallery: int = 80, n_queries: int = 40, n_bank: int = 200, n_gallery_bank: int = 150,
              dim: int = 16):
    """Gallery items around four centres (so a few are hubs), queries and banks noisy copies of them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4, dim))
    gallery = centres[rng.integers(0, 4, n_gallery)] * 0.8 + rng.standard_normal((n_gallery, dim))

    def near(n):
        return (gallery[rng.integers(0, n_gallery, n)] + 0.8 * rng.standard_normal((n, dim))).astype(np.float32)

    return near(n_queries), gallery.astype(np.float32), near(n_bank), near(n_gallery_bank)


class Problem:
    """Embeddings, their probe, and the exact float64 scores both sides approximate."""

    def __init__(self, queries, gallery, bank, gallery_bank, topk_means):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", qbnorm_cli.QbnormWarning)
            self.probe = qbnorm_cli.probe(bank, gallery, betas=[20.0], k=1, gallery_bank=gallery_bank,
                                          gallery_betas=[1.0], topk_means=topk_means, sinkhorn=True)
        self.queries, self.gallery = queries, gallery
        self.dim = queries.shape[1]
        self.S = unit64(queries) @ unit64(gallery).T  # the exact raw scores (from the same float32 data)
        self.topk_mean = min(topk_means)

    def params(self, method: str) -> dict:
        return {"topk_mean": self.topk_mean} if "topk_mean" in methods.METHODS[method].parameters else {}

    def normaliser(self, method: str):
        spec = methods.METHODS[method]
        return methods.build(spec, self.probe, methods.settings(spec, {"k": 1, **self.params(method)}, self.probe))

    def truth(self, method: str) -> np.ndarray:
        """η with the exact scores and the probe's own offsets (both sides read the same ones)."""
        norm = self.normaliser(method)
        if norm.identity:
            return self.S.copy()
        eta = norm.scale * self.S - (0.0 if norm.offset is None else norm.offset)
        if norm.row_topk:
            eta -= -np.sort(-self.S, axis=1)[:, :norm.row_topk].mean(axis=1, keepdims=True)
        return eta

    def bounds(self, method: str, lance: bool = False) -> tuple[float, float]:
        """(normalised, raw) error bounds of search plus those of normalise, in their own units."""
        norm, d = self.normaliser(method), self.dim
        scale = 1.0 if norm.identity else norm.scale
        offset = np.zeros(1) if norm.identity or norm.offset is None else np.asarray(norm.offset)
        shift = float(np.abs((offset - offset.mean()) / scale).max())
        normalise_raw = tol.cosine32(d)
        search_raw = tol.augmented32(d) + 2 * tol.gamma(d + 3) + (tol.one_minus32(1.0) if lance else 0.0)
        search_norm = tol.augmented32(d, shift) + 2 * tol.gamma(d + 3) + (tol.one_minus32(1.0 + shift) if lance else 0)
        row = (normalise_raw + search_raw) if norm.row_topk else 0.0
        magnitude = float(np.abs(self.truth(method)).max() + np.abs(offset).max())
        eta = scale * (search_norm + normalise_raw) + row + 2 * tol.eval64(magnitude)
        return eta, search_raw + normalise_raw


@pytest.fixture(scope="module")
def synthetic():
    return Problem(*clustered(), topk_means=(5, 10))


@pytest.fixture(scope="module")
def sample():
    with h5py.File(SAMPLE, "r") as h5:
        arrays = [h5[n][()] for n in ("queries", "gallery", "train_queries", "train_gallery")]
    return Problem(*arrays, topk_means=(10, 128))


def normalised_top(problem: Problem, method: str, n: int = TOP):
    return qbnorm_cli.normalise(problem.queries, problem.gallery, problem.probe, method=method, top_k=n,
                                **problem.params(method))


def exported(problem: Problem, method: str, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qbnorm_cli.QbnormWarning)
        return qbnorm_cli.export(problem.probe, problem.gallery, method=method, **problem.params(method), **kw)


def assert_separated(problem: Problem, method: str, n: int = TOP, lance: bool = False) -> None:
    eta, raw = problem.bounds(method, lance)
    tol.assert_separated(problem.truth(method), n, eta)
    tol.assert_separated(problem.S, n, raw)


def assert_same(got, want, scores_bound: float | None = None) -> None:
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.normalised, want.normalised)
    assert got.gallery_rows == want.gallery_rows
    if scores_bound is not None:
        tol.assert_close(got.scores, want.scores, scores_bound)


def near_tie_disagreements(problem: Problem, method: str, got, want, lance: bool = False) -> tuple[int, int]:
    """(rows where the rankings differ, rows whose exact top lists hold a near-tie); asserts that every
    difference is a near-tie within the bounds."""
    eta_bound, raw_bound = problem.bounds(method, lance)
    truth, raw = problem.truth(method), problem.S
    n = got.indices.shape[1]
    differing = 0
    for row in np.flatnonzero((got.indices != want.indices).any(axis=1) | (got.normalised != want.normalised)):
        differing += 1
        if got.normalised[row] != want.normalised[row]:  # the gate: two raw top-1 candidates near-tied
            top = np.sort(raw[row])[::-1]
            assert top[0] - top[1] <= 2 * raw_bound, (method, row, "gate")
            continue
        values, bound = (truth, eta_bound) if got.normalised[row] else (raw, raw_bound)
        at = np.flatnonzero(got.indices[row] != want.indices[row])
        gaps = np.abs(values[row, got.indices[row, at]] - values[row, want.indices[row, at]])
        assert (gaps <= 2 * bound).all(), (method, row, gaps.max(), bound)
    near = 0
    for values, bound in ((truth, eta_bound), (raw, raw_bound)):
        top = -np.sort(-values, axis=1)[:, :n + 1]
        near += int(((-np.diff(top, axis=1)) <= 2 * bound).any(axis=1).sum())
    return differing, near


# --- exact equality on separated data, every exportable method ----------------------------------

@pytest.mark.parametrize("method", EXPORTABLE)
def test_exact_search_equals_normalise_top_k(synthetic, method, tmp_path):
    assert_separated(synthetic, method)
    want = normalised_top(synthetic, method)
    eta_bound, raw_bound = synthetic.bounds(method)
    rows_bound = np.where(want.normalised[:, None], eta_bound, raw_bound)
    in_memory = exported(synthetic, method)
    assert in_memory.vectors.shape == (80, 17) and in_memory.vectors.dtype == np.float32
    for index in (in_memory, exported(synthetic, method, output=tmp_path / "x.h5"),
                  exported(synthetic, method, output=tmp_path / "x_npy", format="npy")):
        got = qbnorm_cli.search(index, synthetic.queries, top_k=TOP, row_term=True)
        assert isinstance(got, qbnorm_cli.Ranking)
        assert_same(got, want, rows_bound)
    # blocks of 7 gallery rows exported and 5 query rows × 5 vectors searched: the same vectors and ranking
    # (products of other tile shapes may round otherwise on some BLAS kernels: scores within the bounds)
    blocked = exported(synthetic, method, output=tmp_path / "b.h5", block_rows=7)
    np.testing.assert_array_equal(read_h5(tmp_path / "b.h5")["/vectors"], in_memory.vectors)
    assert_same(qbnorm_cli.search(blocked, synthetic.queries, top_k=TOP, row_term=True, block_rows=5), want,
                rows_bound)


def test_every_affine_method_of_the_registry_is_exportable_and_gc_is_refused(synthetic):
    for name, spec in methods.METHODS.items():
        if name in CLASSIC:
            continue
        if name in RANK_BASED:
            with pytest.raises(UsageError, match="not an offset method"):
                exported(synthetic, name)
            continue
        assert exported(synthetic, name).recipe["method"] == name
        assert spec.build is not None


def test_the_gate_of_dis_is_normalise_s(synthetic, tmp_path):
    """dis decides each row from its raw top-1 ([q, 0] against the same index): the same rows are
    normalised, the others keep normalise's raw scores, at 1 + (gated share) searches per query."""
    gated_methods = [m for m in EXPORTABLE if synthetic.normaliser(m).gate is not None]
    assert "dis" in gated_methods and "dual-dis" in gated_methods
    for method in gated_methods:
        want = normalised_top(synthetic, method)
        assert 0 < want.normalised.mean() < 1, "the data must gate some rows in and some out"
        export = exported(synthetic, method, output=tmp_path / f"{method}.h5")
        np.testing.assert_array_equal(read_h5(tmp_path / f"{method}.h5")["/gate"], synthetic.normaliser(method).gate)
        got = qbnorm_cli.search(export, synthetic.queries, top_k=TOP)
        np.testing.assert_array_equal(got.normalised, want.normalised)
        raw_rows = ~want.normalised
        tol.assert_close(got.scores[raw_rows], want.scores[raw_rows], synthetic.bounds(method)[1])
        written = qbnorm_cli.search(export, synthetic.queries, top_k=TOP, output=tmp_path / f"{method}-top.h5")
        assert written.searches_per_query == pytest.approx(1 + want.normalised.mean())
        assert read_h5(tmp_path / f"{method}-top.h5")["attrs"]["searches_per_query"] == written.searches_per_query


def test_offset_methods_take_one_search_and_the_row_term_changes_no_ranking(synthetic):
    for method in EXPORTABLE:
        norm = synthetic.normaliser(method)
        export = exported(synthetic, method)
        plain = qbnorm_cli.search(export, synthetic.queries, top_k=TOP)
        with_term = qbnorm_cli.search(export, synthetic.queries, top_k=TOP, row_term=True)
        np.testing.assert_array_equal(plain.indices, with_term.indices)
        if norm.gate is None and not norm.identity:
            assert plain.params["searches_per_query"] == 1.0
        if norm.row_topk:  # scores are η + r_q: the mean of the row's K best raw scores
            r_q = -np.sort(-synthetic.S, axis=1)[:, :norm.row_topk].mean(axis=1, keepdims=True)
            tol.assert_close(plain.scores - with_term.scores, np.broadcast_to(r_q, plain.scores.shape),
                             sum(synthetic.bounds(method)))
            assert plain.params["row_term_text"].startswith("left out")
        else:
            np.testing.assert_array_equal(plain.scores, with_term.scores)


def test_the_extra_column_sits_inside_the_coordinates_range(sample):
    """c is the smallest power of two that keeps the column inside the range of the gallery's
    coordinates (it then fills more than half of it), and the column is centred (core/augmented.py)."""
    widest = float(np.abs(unit64(sample.gallery).astype(np.float32)).max())
    for method in EXPORTABLE:
        export = exported(sample, method)
        recipe, column = export.recipe, export.vectors[:, -1].astype(np.float64)
        c = recipe["constant"]
        assert c > 0 and np.log2(c) == round(np.log2(c))
        norm = sample.normaliser(method)
        if norm.identity or norm.offset is None:
            assert c == 1.0 and not column.any()
            continue
        assert widest / 2 < np.abs(column).max() <= widest * (1 + tol.U32)
        assert abs(column.mean()) <= 1e-6 * np.abs(column).max()
        shift = (norm.offset - norm.offset.mean()) / norm.scale
        tol.assert_close(-c * column, shift, tol.stored32(shift))  # c·x carries only x's float32 rounding


def test_a_given_constant_serves_the_same_ranking(synthetic):
    """Any c > 0 is exact arithmetic-wise (a power of two keeps c·x exact): only the column's scale moves."""
    assert_separated(synthetic, "dis")
    want = normalised_top(synthetic, "dis")
    for c in (1.0, 8.0):
        export = exported(synthetic, "dis", constant=c)
        assert export.recipe["constant"] == c and export.recipe["extra_column"]["constant_rule"] == "given"
        norm = synthetic.normaliser("dis")
        tol.assert_close(-c * export.vectors[:, -1], (norm.offset - norm.offset.mean()) / norm.scale,
                         tol.stored32((norm.offset - norm.offset.mean()) / norm.scale))
        got = qbnorm_cli.search(export, synthetic.queries, top_k=TOP)
        np.testing.assert_array_equal(got.indices, want.indices)
    with pytest.raises(UsageError, match="constant 0: must be a finite number ≥ 1e-30 and ≤ 1e\\+30"):
        exported(synthetic, "dis", constant=0)


def test_a_hand_checked_export(tmp_path):
    """Three 2-d unit items, offsets (1, 2, 4), scale 2 ('is'-like arithmetic by hand): m = 7/3,
    shift = (offset − m)/2 = (−2/3, −1/6, 5/6)."""
    shift, center = augmented.shifts(np.array([1.0, 2.0, 4.0]), 2.0, 3)
    assert center == pytest.approx(7 / 3)
    np.testing.assert_allclose(shift, [-2 / 3, -1 / 6, 5 / 6], rtol=1e-15)
    # max |shift| = 5/6 against coordinates up to 1: c = 1; up to 0.3: 5/6/0.3 = 2.78, c = 4
    assert augmented.query_constant(shift, coordinate_max=1.0) == 1.0
    assert augmented.query_constant(shift, coordinate_max=0.3) == 4.0
    assert augmented.query_constant(np.zeros(3), coordinate_max=0.3) == 1.0
    c = 4.0
    vectors = augmented.augment(np.eye(3, 2, dtype=np.float32), shift, c)
    np.testing.assert_allclose(vectors[:, 2], [1 / 6, 1 / 24, -5 / 24], rtol=1e-7)
    q = augmented.with_constant(np.array([[0.6, 0.8]], dtype=np.float32), c)
    ip = (q.astype(np.float64) @ vectors.astype(np.float64).T)[0]
    # η = 2·S − offset with S = (0.6, 0.8, 0): (0.2, −0.4, −4); η = 2·ip − m
    np.testing.assert_allclose(2 * ip - center, [0.2, -0.4, -4.0], atol=1e-6)


def test_engine_results_are_put_in_qbnorm_s_order():
    """Value descending, ties towards the lower index, empty slots (−1) last: as a full lexsort."""
    rng = np.random.default_rng(3)
    for _ in range(100):
        values = rng.integers(0, 4, (7, 6)).astype(np.float32)
        indices = rng.permutation(42).reshape(7, 6)
        indices[rng.random((7, 6)) < 0.15] = -1
        got_values, got_indices = augmented.ordered(values, indices)
        empty = indices < 0
        want = np.where(empty, -np.inf, values.astype(np.float64))
        order = np.lexsort((np.where(empty, np.iinfo(np.int64).max, indices), -want), axis=-1)
        np.testing.assert_array_equal(got_values, np.take_along_axis(want, order, axis=1))
        np.testing.assert_array_equal(got_indices, np.take_along_axis(indices, order, axis=1))


def test_recall_and_the_recall_sample():
    found = np.array([[1, 2, 3], [4, 5, -1], [7, 8, 9]])
    exact = np.array([[3, 2, 1], [4, 6, 5], [-1, -1, -1]])
    np.testing.assert_array_equal(augmented.recall(found, exact), [1.0, 2 / 3, 1.0])
    rows = augmented.sample_rows(1000, 0.05)
    assert rows.size == 50 and (np.diff(rows) > 0).all() and np.array_equal(rows, augmented.sample_rows(1000, 0.05))
    assert augmented.sample_rows(10, 1e-6).size == 1 and augmented.sample_rows(10, 1.0).size == 10


# --- the real sample data: near-ties counted -------------------------------------------------------

@pytest.mark.parametrize("method", EXPORTABLE)
def test_sample_data_rankings_agree_but_for_counted_near_ties(sample, method):
    want = normalised_top(sample, method, 10)
    got = qbnorm_cli.search(exported(sample, method), sample.queries, top_k=10, row_term=True)
    differing, near = near_tie_disagreements(sample, method, got, want)
    assert differing <= min(near, SMALL * len(want))


# --- faiss ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", EXPORTABLE)
def test_faiss_flat_index_equals_normalise_top_k(synthetic, method, tmp_path):
    faiss = pytest.importorskip("faiss")
    assert_separated(synthetic, method)
    want = normalised_top(synthetic, method)
    eta_bound, raw_bound = synthetic.bounds(method)
    bound = np.where(want.normalised[:, None], eta_bound, raw_bound)
    export = exported(synthetic, method, output=tmp_path / "flat", format="faiss")
    index = faiss.read_index(str(tmp_path / "flat" / "index.faiss"))  # a plain faiss file
    assert isinstance(index, faiss.IndexFlatIP) and index.ntotal == 80 and index.d == 17
    assert_same(qbnorm_cli.search(export, synthetic.queries, top_k=TOP, row_term=True), want, bound)
    on_hdf5 = exported(synthetic, method, output=tmp_path / "x.h5")
    assert_same(qbnorm_cli.search(on_hdf5, synthetic.queries, top_k=TOP, backend="faiss", row_term=True), want, bound)


@pytest.mark.parametrize("method", ["dis", "nnn"])
def test_faiss_flat_on_sample_data_agrees_but_for_counted_near_ties(sample, method, tmp_path):
    pytest.importorskip("faiss")
    want = normalised_top(sample, method, 10)
    got = qbnorm_cli.search(exported(sample, method, output=tmp_path / "i", format="faiss"), sample.queries, top_k=10)
    differing, near = near_tie_disagreements(sample, method, got, want)
    assert differing <= min(near, SMALL * len(want))


# index options → the recall@10 stated for them on clustered(seed=1), 4000 items × 32 dimensions, 300
# queries (measured: HNSW 0.986 is / 0.989 dis; IVF with 102 lists 0.975 / 0.982; HNSW's parallel build
# is not deterministic, hence the margin). Gaussian clusters in 32-d are hard for IVF: nprobe 16 reaches 0.89.
APPROXIMATE = {
    "hnsw": ({"index_type": "hnsw", "hnsw_m": 16, "ef_construction": 100, "ef_search": 64}, 0.95),
    "ivf": ({"index_type": "ivf", "nprobe": 32}, 0.95),
}


@pytest.fixture(scope="module")
def larger():
    return Problem(*clustered(1, n_gallery=4000, n_queries=300, n_bank=2000, n_gallery_bank=100, dim=32),
                   topk_means=(10,))


@pytest.mark.slow
@pytest.mark.parametrize("kind", APPROXIMATE)
@pytest.mark.parametrize("method", ["is", "dis"])
def test_approximate_indexes_reach_their_stated_recall(larger, kind, method, tmp_path):
    pytest.importorskip("faiss")
    options, stated = APPROXIMATE[kind]
    export = exported(larger, method, output=tmp_path / kind, format="faiss", **options)
    assert export.recipe["index"]["type"] == kind
    want = normalised_top(larger, method, 10)
    got = qbnorm_cli.search(export, larger.queries, top_k=10, check_recall=0.2)
    recall = augmented.recall(got.indices, want.indices)
    assert recall.mean() >= stated
    # the recall check compares a seeded 20 % sample with the exact ranking of the same vectors
    rows = augmented.sample_rows(len(want), 0.2)
    assert got.recall["queries"] == rows.size == 60 and got.recall["approximate"]
    assert got.recall["recall"] == pytest.approx(recall[rows].mean(), abs=0.02)  # exact-vs-normalise near-ties only


def test_approximate_search_parameters_override_the_export_s(larger, tmp_path):
    pytest.importorskip("faiss")
    export = exported(larger, "is", output=tmp_path / "ivf", format="faiss", index_type="ivf", nlist=64, nprobe=1)
    few = qbnorm_cli.search(export, larger.queries, top_k=10, check_recall=0.1)
    many = qbnorm_cli.search(export, larger.queries, top_k=10, check_recall=0.1, nprobe=64)  # every list: exact
    assert few.recall["recall"] < many.recall["recall"] == 1.0


def test_an_ivf_index_that_returns_fewer_items_leaves_empty_slots_evaluate_reads(larger, cli, tmp_path):
    pytest.importorskip("faiss")
    exported(larger, "is", output=tmp_path / "ivf", format="faiss", index_type="ivf", nlist=100, nprobe=1)
    np.save(tmp_path / "q.npy", larger.queries)
    code, _, err = cli("search", "--index", tmp_path / "ivf", "--queries", tmp_path / "q.npy", "--top-k", 80,
                       "-o", tmp_path / "top.h5")
    assert code == 0 and "fewer than 80 items" in err and "--nprobe" in err
    written = read_h5(tmp_path / "top.h5")
    assert (written["/neighbors"] == -1).any() and np.isfinite(written["/scores"]).all()
    np.save(tmp_path / "gt.npy", np.zeros(len(larger.queries), dtype=np.int64))
    cli.ok("evaluate", tmp_path / "top.h5", "--gt", tmp_path / "gt.npy", "-q")
    with pytest.warns(qbnorm_cli.QbnormWarning, match="fewer than 80 items"):
        in_memory = qbnorm_cli.search(tmp_path / "ivf", larger.queries, top_k=80)
    assert np.isfinite(in_memory.scores).all() and qbnorm_cli.evaluate(in_memory, np.zeros(300, dtype=np.int64))


def test_search_records_its_warnings_in_the_output_and_the_result(larger, tmp_path):
    """The short-rows warning is in the ranking file's `warnings` and in SearchWritten.warnings,
    spelled as the library spells parameters (it was overwritten by [] and kept raw markers)."""
    pytest.importorskip("faiss")
    exported(larger, "is", output=tmp_path / "ivf", format="faiss", index_type="ivf", nlist=100, nprobe=1)
    with pytest.warns(qbnorm_cli.QbnormWarning, match="fewer than 80 items"):
        written = qbnorm_cli.search(tmp_path / "ivf", larger.queries, top_k=80, output=tmp_path / "top.h5")
    with h5py.File(tmp_path / "top.h5", "r") as f:
        recorded = json.loads(f.attrs["warnings"])
    assert recorded == list(written.warnings) and len(recorded) == 1
    assert "fewer than 80 items" in recorded[0] and "nprobe" in recorded[0] and "\x1f" not in recorded[0]


# --- LanceDB: a real vector database, in-process ------------------------------------------------------

@pytest.mark.parametrize("method", ["dis", "csls", "dual-is"])
def test_lancedb_round_trip_gives_the_same_top_k(sample, method, tmp_path):
    lancedb = pytest.importorskip("lancedb")
    want = normalised_top(sample, method, 10)
    export = exported(sample, method, output=tmp_path / "db", format="lancedb")
    table = lancedb.connect(str(tmp_path / "db")).open_table("gallery")  # its own client
    assert table.count_rows() == 200 and ("gate" in table.schema.names) == export.recipe["gated"]
    got = qbnorm_cli.search(tmp_path / "db", sample.queries, top_k=10, row_term=True)
    differing, near = near_tie_disagreements(sample, method, got, want, lance=True)
    assert differing <= min(near, SMALL * len(want))
    # by hand, as a user would: LanceDB's dot metric on [q, c]; its _distance is 1 − ⟨x, y⟩
    plain = qbnorm_cli.search(tmp_path / "db", sample.queries[:20], top_k=10)  # η without the row term r_q
    recipe = export.recipe
    q = augmented.with_constant(unit64(sample.queries[:20]).astype(np.float32), recipe["constant"])
    eta_bound, _ = sample.bounds(method, lance=True)
    gaps = -np.diff(-np.sort(-sample.truth(method)[:20], axis=1)[:, :11], axis=1)
    row = int(np.flatnonzero(plain.normalised & (gaps > 2 * eta_bound).all(axis=1))[0])  # a separated, gated row
    found = table.search(q[row]).distance_type("dot").limit(10).select(["id", "_distance"]).to_arrow()
    assert found["id"].to_pylist() == plain.indices[row].tolist()
    eta = recipe["scale"] * (1 - found["_distance"].to_numpy().astype(np.float64)) - recipe["center"]
    # both within the search bound of the exact η (this query was normalised in float64, qbnorm's in float32)
    tol.assert_close(eta, plain.scores[row], 2 * eta_bound)


def test_cosine_would_renormalise_the_augmented_vectors(sample, tmp_path):
    """Why the docs insist on the dot metric: cosine divides by |[g, x]|, which differs per item
    (on this data it changes the top-10 of 70 % of the queries; the dot metric only near-ties)."""
    lancedb = pytest.importorskip("lancedb")
    export = exported(sample, "is", output=tmp_path / "db", format="lancedb")
    table = lancedb.connect(str(tmp_path / "db")).open_table("gallery")
    q = augmented.with_constant(unit64(sample.queries).astype(np.float32), export.recipe["constant"])
    found = table.search(list(q)).distance_type("cosine").limit(10).select(["id", "_distance"]).to_arrow()
    order = np.lexsort((found["_distance"].to_numpy(), found["query_index"].to_numpy()))
    cosine = found["id"].to_numpy()[order].reshape(len(q), 10)
    want = normalised_top(sample, "is", 10).indices
    assert (cosine != want).any(axis=1).mean() > 0.25


# --- the CLI: the pipeline, files, bad input ---------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    where = tmp_path_factory.mktemp("serving")
    queries, gallery, bank, gallery_bank = clustered()
    with h5py.File(where / "data.h5", "w") as h5:
        for name, value in (("queries", queries), ("gallery", gallery), ("bank", bank), ("gbank", gallery_bank),
                            ("gt", np.arange(40) % 80), ("wide", np.ones((40, 17), np.float32)),
                            ("other", clustered(5)[1])):
            h5[name] = value
    return where


def spec(files, name):
    return f"{files / 'data.h5'}::/{name}"


def probe_file(cli, files, tmp_path, gallery="gallery"):
    out = tmp_path / f"probe-{gallery}.h5"
    cli.ok("probe", "--bank", spec(files, "bank"), "--gallery", spec(files, gallery), "--gallery-bank",
           spec(files, "gbank"), "-o", out, "--topk-mean", 5, "-q")
    return out


def test_cli_export_search_evaluate_and_hubness_like_normalise(cli, files, tmp_path):
    probe = probe_file(cli, files, tmp_path)
    cli.ok("normalise", "--probe", probe, "--queries", spec(files, "queries"), "--gallery", spec(files, "gallery"),
           "--method", "dis", "--top-k", TOP, "-o", tmp_path / "n.h5", "-q")
    out = json.loads(cli.ok("export", "--probe", probe, "--gallery", spec(files, "gallery"), "--method", "dis",
                            "-o", tmp_path / "dis.h5", "--json"))
    assert out["recipe"]["gated"] and out["recipe"]["constant"] > 0
    result = json.loads(cli.ok("search", "--index", tmp_path / "dis.h5", "--queries", spec(files, "queries"),
                               "--top-k", TOP, "-o", tmp_path / "s.h5", "--json"))
    assert result["searches_per_query"] == pytest.approx(1 + result["normalised_share"])
    n, s = read_h5(tmp_path / "n.h5"), read_h5(tmp_path / "s.h5")
    assert s["attrs"]["qbnorm_kind"] == "ranking" and s["attrs"]["gallery_rows"] == 80
    assert s["attrs"]["gallery_identity"] == n["attrs"]["gallery_identity"]
    for name in ("/neighbors", "/normalised"):
        np.testing.assert_array_equal(s[name], n[name])
    for command in ("evaluate", "hubness"):
        extra = ["--gt", spec(files, "gt")] if command == "evaluate" else ["--k", 5]
        a = json.loads(cli.ok(command, tmp_path / "n.h5", *extra, "--json"))
        b = json.loads(cli.ok(command, tmp_path / "s.h5", *extra, "--json"))
        strip = ("name", "input")
        assert [{k: v for k, v in r.items() if k not in strip} for r in a["inputs"]] == \
            [{k: v for k, v in r.items() if k not in strip} for r in b["inputs"]]


@pytest.mark.parametrize(("method", "option"), [("dis", ("--min-count", 2)), ("dn", ("--lambda", 0.5))])
def test_export_takes_theta_and_lambda_as_normalise_does(cli, files, tmp_path, method, option):
    probe = probe_file(cli, files, tmp_path)
    runs = {}
    for name, extra in (("default", ()), ("given", option)):
        cli.ok("normalise", "--probe", probe, "--queries", spec(files, "queries"), "--gallery", spec(files, "gallery"),
               "--method", method, *extra, "--top-k", TOP, "-o", tmp_path / f"n-{name}.h5", "-q")
        cli.ok("export", "--probe", probe, "--gallery", spec(files, "gallery"), "--method", method, *extra,
               "-o", tmp_path / f"e-{name}.h5", "-q")
        cli.ok("search", "--index", tmp_path / f"e-{name}.h5", "--queries", spec(files, "queries"), "--top-k", TOP,
               "-o", tmp_path / f"s-{name}.h5", "-q")
        runs[name] = read_h5(tmp_path / f"n-{name}.h5"), read_h5(tmp_path / f"s-{name}.h5")
    for n, s in runs.values():
        for name in ("/neighbors", "/normalised"):
            np.testing.assert_array_equal(s[name], n[name])
    changed = "/normalised" if method == "dis" else "/neighbors"  # θ shrinks the gate, λ moves rankings
    assert not np.array_equal(runs["default"][0][changed], runs["given"][0][changed])


def test_export_of_gc_is_refused_clearly(cli, files, tmp_path):
    probe = tmp_path / "sorted.h5"
    cli.ok("probe", "--bank", spec(files, "bank"), "--gallery", spec(files, "gallery"), "--keep-sorted", "-o", probe,
           "-q")
    for method in RANK_BASED:
        code, _, err = cli("export", "--probe", probe, "--gallery", spec(files, "gallery"), "--method", method,
                           "-o", tmp_path / "gc.h5")
        assert code == 2 and err.count("\n") == 1 and "not an offset method" in err and "rank of S" in err, err
        assert not (tmp_path / "gc.h5").exists()


def test_a_query_file_of_the_wrong_width_is_refused(cli, files, tmp_path):
    probe = probe_file(cli, files, tmp_path)
    cli.ok("export", "--probe", probe, "--gallery", spec(files, "gallery"), "--method", "is", "-o", tmp_path / "e.h5",
           "-q")
    code, _, err = cli("search", "--index", tmp_path / "e.h5", "--queries", spec(files, "wide"), "--top-k", 3,
                       "-o", tmp_path / "s.h5")
    assert code == 3 and "has dimension 17" in err and "16-dimensional" in err and "appends the constant" in err
    assert err.count("\n") == 1 and not (tmp_path / "s.h5").exists()


def test_an_index_from_another_gallery_is_refused(cli, files, tmp_path):
    """Stores copied between exports of different galleries (same shape) are caught by the recipe's
    fingerprint (npy, faiss) or uuid (LanceDB); a probe of another gallery by its identity."""
    probe = probe_file(cli, files, tmp_path)
    other_probe = probe_file(cli, files, tmp_path, "other")
    code, _, err = cli("export", "--probe", other_probe, "--gallery", spec(files, "gallery"), "-o", tmp_path / "x.h5")
    assert code == 3 and "another gallery" in err and "--accept-mismatch" in err
    formats = ["npy"] + [f for f, module in (("faiss", "faiss"), ("lancedb", "lancedb"))
                         if __import__("importlib").util.find_spec(module)]
    stores = {"npy": "vectors.npy", "faiss": "index.faiss", "lancedb": "gallery.lance"}
    import shutil

    for fmt in formats:
        mine, theirs = tmp_path / f"mine-{fmt}", tmp_path / f"theirs-{fmt}"
        cli.ok("export", "--probe", probe, "--gallery", spec(files, "gallery"), "--format", fmt, "-o", mine, "-q")
        cli.ok("export", "--probe", other_probe, "--gallery", spec(files, "other"), "--format", fmt, "-o", theirs, "-q")
        target = mine / stores[fmt]
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        (shutil.copytree if (theirs / stores[fmt]).is_dir() else shutil.copy)(theirs / stores[fmt], target)
        code, _, err = cli("search", "--index", mine, "--queries", spec(files, "queries"), "--top-k", 3,
                           "-o", tmp_path / f"s-{fmt}.h5")
        assert code == 3 and ("sha256 differs" in err or "not in the export's manifest" in err
                              or "the manifest says" in err), (fmt, err)
        write_manifest(mine)  # a manifest made again for the copy: the recipe still tells
        code, _, err = cli("search", "--index", mine, "--queries", spec(files, "queries"), "--top-k", 3,
                           "-o", tmp_path / f"s-{fmt}.h5")
        assert code == 3 and ("other vectors" in err or "another export" in err), (fmt, err)
        assert err.count("\n") == 1 and not (tmp_path / f"s-{fmt}.h5").exists()


@pytest.mark.parametrize("extra", ["faiss", "lancedb"])
def test_a_missing_extra_is_one_line_naming_it(cli, files, tmp_path, monkeypatch, extra):
    probe = probe_file(cli, files, tmp_path)
    monkeypatch.setitem(sys.modules, extra, None)  # `import faiss` now raises ImportError
    code, _, err = cli("export", "--probe", probe, "--gallery", spec(files, "gallery"), "--format", extra,
                       "-o", tmp_path / "x")
    assert code == 1 and err == f"qbnorm: error: --format {extra} needs {extra}: {install_hint(extra)}\n"
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))


def test_search_of_a_faiss_export_without_faiss_names_the_extra(cli, files, tmp_path, monkeypatch):
    pytest.importorskip("faiss")
    probe = probe_file(cli, files, tmp_path)
    cli.ok("export", "--probe", probe, "--gallery", spec(files, "gallery"), "--format", "faiss", "-o", tmp_path / "f",
           "-q")
    monkeypatch.setitem(sys.modules, "faiss", None)
    code, _, err = cli("search", "--index", tmp_path / "f", "--queries", spec(files, "queries"), "--top-k", 3,
                       "-o", tmp_path / "s.h5")
    assert code == 1 and f"needs faiss: {install_hint('faiss')}" in err and err.count("\n") == 1


def test_directory_outputs_are_atomic_and_never_replace_foreign_directories(cli, files, tmp_path):
    probe = probe_file(cli, files, tmp_path)
    args = ["export", "--probe", probe, "--gallery", spec(files, "gallery"), "--format", "npy"]
    cli.ok(*args, "-o", tmp_path / "e", "-q")
    code, _, err = cli(*args, "-o", tmp_path / "e")
    assert code == 2 and "exists" in err
    first = json.loads((tmp_path / "e" / "recipe.json").read_text())["uuid"]
    cli.ok(*args, "-o", tmp_path / "e", "--force", "-q")
    assert json.loads((tmp_path / "e" / "recipe.json").read_text())["uuid"] != first
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, _, err = cli(*args, "-o", tmp_path / "mine", "--force")
    assert code == 2 and "did not write" in err and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".*qbnorm-tmp")) and not list(tmp_path.glob(".*qbnorm-old"))


def test_bad_search_options_are_refused(cli, files, tmp_path):
    probe = probe_file(cli, files, tmp_path)
    cli.ok("export", "--probe", probe, "--gallery", spec(files, "gallery"), "-o", tmp_path / "e.h5", "-q")
    base = ["search", "--index", tmp_path / "e.h5", "--queries", spec(files, "queries"), "-o", tmp_path / "s.h5"]
    for extra, message in ((["--top-k", 81], "larger than the gallery size (80)"),
                           (["--top-k", 3, "--check-recall", 0], "--check-recall 0.0: a fraction"),
                           (["--top-k", 3, "--backend", "lancedb"], "--backend lancedb"),
                           (["--top-k", 3, "--nprobe", 0], "--nprobe 0"),
                           (["--top-k", 3, "--nprobe", 4], f"--nprobe 4: {tmp_path / 'e.h5'} is a flat index"),
                           (["--top-k", 3, "--ef-search", 4], "--ef-search tunes hnsw indexes")):
        code, _, err = cli(*base, *extra)
        assert code == 2 and message in err, err
    code, _, err = cli("search", "--index", probe, "--queries", spec(files, "queries"), "--top-k", 3,
                       "-o", tmp_path / "s.h5")
    assert code == 3 and "expected a qbnorm index-vectors file" in err
    code, _, err = cli("export", "--probe", probe, "--gallery", spec(files, "gallery"), "--index-type", "hnsw",
                       "-o", tmp_path / "h.h5")
    assert code == 2 and "--format faiss" in err


def test_library_errors_name_parameters(synthetic):
    with pytest.raises(UsageError, match=r"^format npy: writes files; give output"):
        exported(synthetic, "is", format="npy")
    with pytest.raises(DataError, match="has dimension 8 but the export was exported from 16"):
        qbnorm_cli.search(exported(synthetic, "is"), synthetic.queries[:, :8], top_k=3)


def test_a_small_batch_takes_faiss_matrix_product_and_the_same_top_items():
    """Between SMALL_BATCH and the BLAS threshold faiss would scan once per query (~15× slower per
    query, the dis gate's second search): the batch is padded into a product; same items, scores
    within the float32 product's bound (two summation orders)."""
    faiss = pytest.importorskip("faiss")
    from qbnorm_cli.io.stores import faissindex

    rng = np.random.default_rng(1)
    dim = 64
    gallery = rng.standard_normal((400, dim)).astype(np.float32)
    queries = rng.standard_normal((40, dim)).astype(np.float32)
    index = faiss.IndexFlatIP(dim)
    index.add(gallery)
    blas_rows = faissindex.faiss_blas_rows(faiss, index)
    assert faissindex.SMALL_BATCH <= len(queries) < blas_rows
    exact = queries.astype(np.float64) @ gallery.T.astype(np.float64)
    bound = tol.product32(dim, float((np.abs(queries).astype(np.float64) @ np.abs(gallery).T).max()))
    tol.assert_separated(exact, 10, bound)
    padded = faissindex.faiss_search(index, None, queries, 10, blas_rows)
    scanned = faissindex.faiss_search(index, None, queries, 10)
    assert padded[0].shape == (40, 10) and (padded[1] == scanned[1]).all()
    tol.assert_close(padded[0], np.take_along_axis(exact, padded[1], axis=1), bound)
    hnsw = faiss.IndexHNSWFlat(dim, 8, faiss.METRIC_INNER_PRODUCT)
    assert faissindex.faiss_blas_rows(faiss, hnsw) == 0  # approximate indexes search as they do
