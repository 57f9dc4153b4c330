"""The classic hubness reducers through the query bank (issue 26): ls, nicdm, mp (gauss, empiric),
dsl and nnn's γ, against the dense oracle of tests/reference.py (written from the formulas), in the
bank setting and in the transductive one where the peers' definitions coincide (bank = the test
queries, every gallery item a candidate)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import reference as ref
import tolerance as tol
from helpers import normaliser

import qbnorm_cli
from qbnorm_cli.api.common import score_source
from qbnorm_cli.errors import UsageError
from qbnorm_cli.methods import mutual_proximity
from qbnorm_cli.streaming import pairwise, ranking
from qbnorm_cli.streaming.budget import make_budget

TOP = 5
CASES = [("ls", {}), ("nicdm", {}), ("mp", {"mp": "gauss"}), ("mp", {"mp": "empiric"}), ("dsl", {}),
         ("nnn", {"gamma": 2.0, "alpha": 1.0})]
IDS = ["ls", "nicdm", "mp-gauss", "mp-empiric", "dsl", "nnn-gamma"]


def unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class Problem:
    """Clustered embeddings (a few hubs), their probe with every statistic these methods need."""

    def __init__(self, transductive: bool, seed: int = 3, n_queries: int = 60, n_gallery: int = 90, n_bank: int = 240,
                 dim: int = 12, k: int = 7):
        rng = np.random.default_rng(seed)
        centres = rng.standard_normal((4, dim))
        gallery = centres[rng.integers(0, 4, n_gallery)] * 0.8 + rng.standard_normal((n_gallery, dim))

        def near(n):
            return (gallery[rng.integers(0, n_gallery, n)] + 0.8 * rng.standard_normal((n, dim))).astype(np.float32)

        self.queries, self.gallery = near(n_queries), gallery.astype(np.float32)
        self.bank = self.queries if transductive else near(n_bank)
        self.k = k
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", qbnorm_cli.QbnormWarning)
            self.probe = qbnorm_cli.probe(self.bank, self.gallery, topk_means=[k], keep_sorted=True,
                                          methods=["ls", "nicdm", "mp", "dsl", "nnn"])
        self.S = unit(self.queries) @ unit(self.gallery).T
        self.P = unit(self.bank) @ unit(self.gallery).T

    def ours(self, method: str, params: dict, **options):
        return qbnorm_cli.normalise(self.queries, self.gallery, self.probe, method=method, topk_mean=self.k,
                                    **params, **options)

    def reference(self, method: str, params: dict) -> np.ndarray:
        if method == "dsl":
            return ref.dissim_local(self.queries, self.gallery, self.bank, self.k)[0]
        if method == "mp":
            return ref.mutual_proximity(self.S, self.P, params["mp"])[0]
        if method == "nnn":
            return ref.localized_centering(self.S, self.P, self.k, params["gamma"])[0]
        return ref.normalise(method, self.S, self.P, topk_mean=self.k)[0]


def assert_same_ranking(ours: np.ndarray, oracle: np.ndarray, n: int = TOP, near: float = 1e-6,
                        share: float = 0.05) -> None:
    """Top-n lists equal row by row, except where the oracle's values of the two lists agree to
    `near` (float32 scores against float64 ones: an exact tie may fall either way), in at most
    `share` of the rows."""
    got, want = ref.top_n(ours, n)[1], ref.top_n(oracle, n)[1]
    differing = np.flatnonzero((got != want).any(axis=1))
    for q in differing:
        scale = max(1.0, float(np.abs(oracle[q, want[q]]).max()))
        np.testing.assert_allclose(np.sort(oracle[q, got[q]]), np.sort(oracle[q, want[q]]), rtol=0, atol=near * scale,
                                   err_msg=f"row {q}: {got[q]} against {want[q]}")
    assert differing.size <= share * len(ours)


def top_scores_in(shape, top) -> np.ndarray:
    """A top-k result as a dense matrix: its scores where it has them, −∞ elsewhere."""
    got = np.full(shape, -np.inf)
    np.put_along_axis(got, top.indices, top.scores, axis=1)
    return got


@pytest.fixture(scope="module", params=[False, True], ids=["bank", "transductive"])
def problem(request) -> Problem:
    return Problem(request.param)


@pytest.mark.parametrize(("method", "params"), CASES, ids=IDS)
def test_rankings_match_the_formulas(problem, method, params):
    assert_same_ranking(problem.ours(method, params), problem.reference(method, params))


@pytest.mark.parametrize(("method", "params"), CASES, ids=IDS)
def test_top_k_equals_the_dense_ranking(problem, method, params, monkeypatch):
    # one raw candidate per wanted item: most rows of the pairwise forms must widen their candidates
    monkeypatch.setattr(pairwise, "PAIRWISE_CANDIDATES", 1)
    dense = problem.ours(method, params)
    top = problem.ours(method, params, top_k=TOP, block_rows=16)
    if method != "mp":
        # η = a_j·S − b_j over float32 cosines computed in other shapes (the whole matrix, tiles of 16
        # rows): BLAS kernels may round each product otherwise, within cosine32 of the exact one, so the
        # two sides differ by at most 2·|a_j|·cosine32(d); rankings agree but for pairs that close
        norm = normaliser(problem.probe, method, topk_mean=problem.k, **params)
        scale = np.abs(np.broadcast_to(np.asarray(norm.scale, dtype=np.float64), (dense.shape[1],)))
        bound = 2.0 * scale[top.indices] * tol.cosine32(problem.queries.shape[1])
        chosen = np.take_along_axis(dense, top.indices, axis=1)
        tol.assert_close(top.scores, chosen, bound + tol.eval64(float(np.abs(chosen).max())))
        assert_same_ranking(top_scores_in(dense.shape, top), dense, near=2.0 * float(bound.max()))
        return
    # the rows mp widens are gathered into a product of their own (as ranking's recomputed rows are),
    # whose float32 scores may round otherwise than the whole tile's: the same ranking but for
    # near-ties, the same values to rounding (an empirical share to one step of its count: with the
    # bank = the queries, a query's own score sits in the bank, and a rounding moves it across)
    got = top_scores_in(dense.shape, top)
    # empirical shares are counts over the bank: exact ties are common, and with the bank = the queries
    # a rounding that moves a query's own score across a bank score changes a count by one in many rows
    # (each such row is still checked to agree to one step)
    empiric = params["mp"] == "empiric"
    assert_same_ranking(got, dense, near=2.0 / len(problem.bank) if empiric else 1e-5, share=1.0 if empiric else 0.05)
    step = 2.0 / min(len(problem.bank), len(problem.gallery)) if params["mp"] == "empiric" else 1e-6
    np.testing.assert_allclose(top.scores, np.take_along_axis(dense, top.indices, axis=1), rtol=1e-5, atol=step)


def test_pairwise_top_k_widens_rows_whose_bound_fails(problem, monkeypatch):
    monkeypatch.setattr(pairwise, "PAIRWISE_CANDIDATES", 1)
    trace = ranking.Trace()
    norm = qbnorm_cli.methods.build(qbnorm_cli.methods.get("mp"), problem.probe, {"mp": "empiric"})
    budget = make_budget("64MiB", None)
    scores = score_source(problem.queries, problem.gallery, None, rows_name="queries", cols_name="gallery",
                          sims_name="sims", similarity="cosine", budget=budget, what="normalise")[0]
    out = list(pairwise.run_pairwise_ranking(scores, norm, budget, TOP, lambda rows: None, trace=trace))
    assert trace.recomputed_rows > 0 and out[0][1][0].shape == (len(problem.queries), TOP)


def test_gaussian_row_statistics_are_the_rows_mean_and_std(problem):
    """μ_q = q·ḡ, σ_q² = qᵀMq − μ_q² (M = mean_j g_j g_jᵀ): the population moments of the row."""
    mean, moment = problem.probe.gallery_moments()
    gauss = mutual_proximity.GaussianProximity(np.zeros(1), np.ones(1), mean, moment)
    mu, sigma = gauss.row_statistics(unit(problem.queries.astype(np.float32)).astype(np.float32), None, 0)
    S32 = unit(problem.queries).astype(np.float32).astype(np.float64) @ unit(problem.gallery).T
    np.testing.assert_allclose(mu, S32.mean(axis=1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(sigma, S32.std(axis=1), rtol=1e-4)


def test_item_statistics_follow_their_definitions(problem):
    P, k = problem.P, problem.k
    np.testing.assert_allclose(problem.probe.topk_kth(k), ref.kth_largest(P, k, axis=0), atol=1e-6)
    np.testing.assert_allclose(problem.probe.topk_distance(k), ref.mean_distance_nearest(P, k, axis=0), atol=1e-5)
    np.testing.assert_allclose(problem.probe.column_std(), P.std(axis=0), atol=1e-6)
    unit_g, unit_b = unit(problem.gallery), unit(problem.bank)
    near = np.argsort(-(unit_g @ unit_b.T), axis=1, kind="stable")[:, :k]
    want = ((unit_g - unit_b[near].mean(axis=1)) ** 2).sum(axis=1)
    np.testing.assert_allclose(problem.probe.centroid_distance(k), want, atol=1e-5)


def test_empirical_ties_count_strictly_smaller_scores():
    """A score equal to s is not beaten by it: P(S < s), on both sides, to the bit."""
    S = np.array([[0.5, 0.5, 0.25, 0.75], [0.25, 0.25, 0.25, 0.5]], dtype=np.float32)
    P = np.array([[0.5, 0.25, 0.25, 0.75], [0.5, 0.5, 0.5, 0.5], [0.0, 0.25, 0.75, 0.5]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qbnorm_cli.QbnormWarning)
        probe = qbnorm_cli.probe(bank_sims=P, keep_sorted=True, topk_means=[2])
    ours = qbnorm_cli.normalise(sims=S, probe=probe, method="mp", mp="empiric")
    np.testing.assert_array_equal(ours, ref.mutual_proximity(S, P, "empiric")[0])
    top = qbnorm_cli.normalise(sims=S, probe=probe, method="mp", mp="empiric", top_k=3)
    np.testing.assert_array_equal(top.indices, ref.top_n(ours, 3)[1])


def test_gamma_one_is_nnn_to_the_bit(problem):
    plain = problem.ours("nnn", {})
    np.testing.assert_array_equal(problem.ours("nnn", {"gamma": 1.0}), plain)


def test_bad_kind_and_other_scores_are_refused(problem):
    with pytest.raises(UsageError, match="choose one of gauss, empiric"):
        problem.ours("mp", {"mp": "student"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qbnorm_cli.QbnormWarning)
        dot = qbnorm_cli.probe(problem.bank * 3, problem.gallery, topk_means=[problem.k], similarity="dot")
    with pytest.raises(UsageError, match="cosine similarities"):
        qbnorm_cli.normalise(problem.queries, problem.gallery, dot, method="ls", topk_mean=problem.k)


def test_mp_gauss_needs_query_embeddings(problem):
    with pytest.raises(UsageError, match="query embeddings"):
        qbnorm_cli.normalise(sims=problem.S.astype(np.float32), probe=problem.probe, method="mp")


@pytest.mark.parametrize("method", ["ls", "nicdm", "dsl"])
def test_affine_forms_export_and_search_as_normalise_ranks(problem, method):
    """ls and nicdm scale each item (the vectors carry a_j/ā), dsl offsets it: an inner-product
    search over the export ranks as normalise --top-k does (but for float32 near-ties)."""
    export = qbnorm_cli.export(problem.probe, problem.gallery, method=method, topk_mean=problem.k)
    found = qbnorm_cli.search(export, problem.queries, top_k=TOP, row_term=True)
    want = problem.ours(method, {})
    got = np.full(want.shape, -np.inf)
    np.put_along_axis(got, found.indices, found.scores, axis=1)
    assert_same_ranking(got, want, near=1e-5)
    np.testing.assert_allclose(found.scores, np.take_along_axis(want, found.indices, axis=1), rtol=1e-5, atol=1e-5)


def test_mp_export_is_refused(problem):
    with pytest.raises(UsageError, match="not exportable"):
        qbnorm_cli.export(problem.probe, problem.gallery, method="mp")


def test_cli_probe_method_normalise_and_export(cli, tmp_path):
    data = "sample_data/multi30k-sample.h5"
    probe = tmp_path / "p.h5"
    cli.ok("probe", "--bank", f"{data}::/train_queries", "--gallery", f"{data}::/gallery", "--method", "ls",
           "--method", "mp", "--method", "dsl", "--topk-mean", "10", "--keep-sorted", "-o", probe, "--quiet")
    for args in (["--method", "ls"], ["--method", "nicdm"], ["--method", "dsl"], ["--method", "mp"],
                 ["--method", "mp", "--mp", "empiric"], ["--method", "nnn", "--gamma", "2", "--topk-mean", "10"]):
        cli.ok("normalise", "--queries", f"{data}::/queries", "--gallery", f"{data}::/gallery", "--probe", probe,
               *args, "--top-k", "5", "-o", tmp_path / f"{'-'.join(args)}.h5", "--quiet")
    code, _, err = cli("export", "--gallery", f"{data}::/gallery", "--probe", probe, "--method", "mp",
                         "-o", tmp_path / "mp-index.h5")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not exportable" in err
    code, _, err = cli("normalise", "--queries", f"{data}::/queries", "--gallery", f"{data}::/gallery",
                         "--probe", probe, "--method", "mp", "--mp", "student", "-o", tmp_path / "x.h5")
    assert code == 2 and "gauss, empiric" in err


def test_centroid_distances_for_every_k_from_one_pass(problem):
    """dsl's centroid distances for several K from one probe pass (the K best bank rows per item,
    best first: tune's grid needs them all)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qbnorm_cli.QbnormWarning)
        probe = qbnorm_cli.probe(problem.bank, problem.gallery, topk_means=[3, problem.k], methods=["dsl"])
    unit_g, unit_b = unit(problem.gallery), unit(problem.bank)
    near = np.argsort(-(unit_g @ unit_b.T), axis=1, kind="stable")
    for k in (3, problem.k):
        want = ((unit_g - unit_b[near[:, :k]].mean(axis=1)) ** 2).sum(axis=1)
        np.testing.assert_allclose(probe.centroid_distance(k), want, atol=1e-5)
    with pytest.raises(UsageError, match="probe again"):
        probe.centroid_distance(5)


def test_statistics_from_embeddings_are_refused_from_score_matrices(problem):
    with pytest.raises(UsageError, match="needs the bank and gallery embeddings"):
        qbnorm_cli.probe(bank_sims=problem.P.astype(np.float32), methods=["dsl"])


def test_a_scale_per_item_takes_the_ordered_tiles(problem):
    """ls ranks with one float32 comparison per score of the offset-ordered tiles, as dis does."""
    from qbnorm_cli.streaming.engine import run_normalise
    norm = qbnorm_cli.methods.build(qbnorm_cli.methods.get("ls"), problem.probe, {"topk_mean": problem.k})
    budget = make_budget("64MiB", None)
    scores = score_source(problem.queries, problem.gallery, None, rows_name="queries", cols_name="gallery",
                          sims_name="sims", similarity="cosine", budget=budget, what="normalise")[0]
    trace = ranking.Trace()
    tiling = ranking.Tiling(sub_columns=16, sample_columns=16)
    ((_, ranked),) = list(run_normalise(scores, norm, budget, TOP, tiling=tiling, trace=trace))
    assert trace.ordered_tiles > 0 and trace.exact_tiles == 0
    want = ref.top_n(problem.ours("ls", {}), TOP)
    np.testing.assert_array_equal(ranked[1], want[1])
