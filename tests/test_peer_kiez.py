"""The classic reducers (issue 26) against an independent implementation, kiez 0.5.0, in the
transductive setting where the definitions coincide: bank = the test queries (kiez's source),
gallery = kiez's target, the same distance d = √(2 − 2s) on L2-normalised vectors.

kiez takes σ (ls), μ (nicdm) and the centroids (dsl) over the n_candidates it retrieves on each
side, so it coincides with qbnorm's K-th / K nearest when n_candidates = K (compared over those K
candidates), and over the whole gallery when n_candidates = N (= the gallery = the bank) with
topk_mean = N. kiez's Gaussian mutual proximity fits the Gaussians to distances, qbnorm's to
similarities; with kiez's cosine distance 1 − s (affine in s) and every candidate they coincide.
kiez's empiric mutual proximity is a joint count, qbnorm's a product of two marginals: not compared
here (docs/methods.md, "The classic reducers and their peers"; tests/test_classic.py checks the
formula).

kiez is driven at its hubness-reduction level (fit, kneighbors) over exact brute-force neighbours
given to it: its scikit-learn wrapper `SklearnNN` fails under current scikit-learn (1.9: no
`__sklearn_tags__`), and so does `check_is_fitted` on its reducers, which `tagged` gives the tags of
a scikit-learn estimator."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tolerance

import qbnorm_cli

pytest.importorskip("kiez")
sklearn_base = pytest.importorskip("sklearn.base")
from kiez.hubness_reduction import DisSimLocal, LocalScaling, MutualProximity  # noqa: E402

N, DIM, K = 48, 12, 7  # N queries = N bank queries = N gallery items, so that n_candidates = N is "all"


def unit(x) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class Neighbours:
    """Exact brute-force neighbours in kiez's NNAlgorithm protocol (source = the queries, target =
    the gallery), nearest first, ties towards the lower index."""

    p = 2

    def __init__(self, queries, gallery, n_candidates: int, metric: str):
        self.queries, self.gallery, self.n_candidates, self.metric = queries, gallery, n_candidates, metric

    def fit(self, source, target=None):
        self.source_ = source

    def kneighbors(self, k=None, query=None, s_to_t=True, return_distance=True):
        sims = self.queries @ self.gallery.T if s_to_t else self.gallery @ self.queries.T
        dist = 1.0 - sims if self.metric == "cosine" else np.sqrt(np.maximum(2.0 - 2.0 * sims, 0.0))
        order = np.argsort(dist, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(dist, order, axis=1), order


def tagged(reducer: type) -> type:
    return type(reducer.__name__, (reducer, sklearn_base.BaseEstimator), {})


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(26)
    centres = rng.standard_normal((4, DIM))
    gallery = unit(centres[rng.integers(0, 4, N)] * 0.8 + rng.standard_normal((N, DIM))).astype(np.float32)
    queries = unit(gallery[rng.integers(0, N, N)] + 0.8 * rng.standard_normal((N, DIM))).astype(np.float32)
    # float32 unit rows, read back exactly in float64 by kiez and the reference
    return queries.astype(np.float64), gallery.astype(np.float64)


def kiez_ranking(data, reducer, n_candidates: int, metric: str = "euclidean", **options) -> np.ndarray:
    queries, gallery = data
    model = tagged(reducer)(nn_algo=Neighbours(queries, gallery, n_candidates, metric), **options)
    model.fit(queries, gallery)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # k = n_candidates: kiez must not clip it
        return model.kneighbors(k=n_candidates)[1]


def qbnorm_scores(data, method: str, k: int, **params) -> np.ndarray:
    """qbnorm's library with the bank = the queries."""
    queries, gallery = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qbnorm_cli.QbnormWarning)
        probe = qbnorm_cli.probe(queries, gallery, topk_means=[k], keep_sorted=True, methods=[method])
    return np.asarray(qbnorm_cli.normalise(queries, gallery, probe, method=method, topk_mean=k, **params), np.float64)


def assert_identical_except_ties(kiez_order, ours, data) -> int:
    """Each row of kiez's ranking (its candidates, best first) is qbnorm's order of the same
    candidates, except at ties. qbnorm's scores are float32 ranking forms (−d²/σ_j, −d/μ_j,
    log Φ + log Φ, 2s + ‖g − c_K(g)‖²: docs/methods.md) of cosines off by at most ε = cosine32(DIM)
    (tests/tolerance.py); every form is built of d² = 2 − 2s and statistics of d or s, each of which
    an error ε in s moves by at most 2ε/d²_min relative, a handful of them per score (16 covers the
    products and quotients, and the Φ arguments, whose σ ≥ d²_min/2 here). Adjacent candidates whose
    qbnorm scores differ by less than that width are a tie, and may fall either way (kiez's float64
    values are off by ~1e-13 of the same formula). Rows without ties must be identical; in tied rows
    only the tied pairs may swap. Returns the number of tied rows (rows compared: the rest)."""
    queries, gallery = data
    d2_min = float(np.maximum(2.0 - 2.0 * (queries @ gallery.T), 0.0).min())
    mine = np.take_along_axis(ours, kiez_order, axis=1)
    width = 16.0 * tolerance.cosine32(DIM) / min(d2_min, 1.0) * np.maximum(1.0, np.abs(mine).max(axis=1))
    gaps = -np.diff(mine, axis=1)
    tied = (np.abs(gaps) <= width[:, None]).any(axis=1)
    for q in np.flatnonzero(~tied):
        np.testing.assert_array_equal(np.argsort(-mine[q], kind="stable"), np.arange(mine.shape[1]),
                                      err_msg=f"row {q}: kiez's ranking differs from qbnorm's")
    assert (gaps >= -width[:, None]).all(), "a swap larger than a tie"
    assert (np.abs(gaps) <= width[:, None]).mean() <= 0.05, "too many ties for the comparison to mean much"
    return int(tied.sum())


CASES = [("ls", LocalScaling, {"method": "standard"}, {}), ("nicdm", LocalScaling, {"method": "nicdm"}, {}),
         ("dsl", DisSimLocal, {}, {})]


@pytest.mark.parametrize(("method", "reducer", "options", "params"), CASES, ids=[c[0] for c in CASES])
def test_k_candidates_rank_as_qbnorm(data, method, reducer, options, params):
    """n_candidates = K: kiez's "last candidate" is the K-th neighbour; its K candidates per query
    rank as qbnorm ranks them."""
    ours = qbnorm_scores(data, method, K, **params)
    assert_identical_except_ties(kiez_ranking(data, reducer, K, **options), ours, data)


WHOLE = [*CASES, ("mp", MutualProximity, {"method": "normal"}, {"mp": "gauss"})]


@pytest.mark.parametrize(("method", "reducer", "options", "params"), WHOLE, ids=[c[0] for c in WHOLE])
def test_whole_gallery_ranks_as_qbnorm(data, method, reducer, options, params):
    """n_candidates = N, topk_mean = N: every gallery item a candidate, the whole row ranked alike.
    mp gauss: kiez's Gaussians fitted to the cosine distance 1 − s are qbnorm's on s (population
    moments both)."""
    metric = "cosine" if method == "mp" else "euclidean"
    ours = qbnorm_scores(data, method, N, **params)
    assert_identical_except_ties(kiez_ranking(data, reducer, N, metric, **options), ours, data)


def test_kiez_local_scaling_takes_sigma_at_the_last_candidate(data):
    """The documented difference: with more candidates than K, kiez's σ is at the last of them, so
    its ranking is qbnorm's with topk_mean = n_candidates, and not qbnorm's with topk_mean = K."""
    order = kiez_ranking(data, LocalScaling, 2 * K, method="standard")
    assert_identical_except_ties(order, qbnorm_scores(data, "ls", 2 * K), data)
    at_k = np.take_along_axis(qbnorm_scores(data, "ls", K), order, axis=1)
    assert (np.diff(at_k, axis=1) > 1e-3).any()
