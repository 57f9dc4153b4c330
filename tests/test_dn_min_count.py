"""Distribution Normalisation (dn) and DIS / dual-DIS with a minimum hub count θ (`min_count`):
hand-checked vectors, the streamed probe and normalise against the dense oracle (tests/reference.py)
for every block path, and the probe pass that gives the column means for free."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import tolerance as tol
from conftest import N_GALLERY
from helpers import exact_probe, normaliser
from test_kernels import (
    BETA,
    BUDGETS,
    GALLERY_BETA,
    TOP_N,
    StreamedProbe,
    assert_ranking,
    assert_scores,
    matrix_probe,
    mem,
    stream,
)
from test_reference_sinkhorn import H_C, P_A, S_THETA

import qbnorm_cli
from qbnorm_cli import QbnormWarning, UsageError, methods
from qbnorm_cli.core import normalisers as nz
from qbnorm_cli.streaming.budget import Budget
from qbnorm_cli.streaming.sources import Embeddings, EmbeddingScores, MatrixScores

# (method, parameters): dn at two λ, dis and dual-dis at θ > 1 with k = 1 and k = 3
CASES = [("dn", {"lam": 0.25}), ("dn", {"lam": 1.5}), ("dis", {"k": 1, "min_count": 2}),
         ("dis", {"k": 3, "min_count": 3}), ("dis", {"k": 2, "min_count": 1}), ("dual-dis", {"k": 1, "min_count": 2}),
         ("dual-dis", {"k": 3, "min_count": 4})]


def case_id(case) -> str:
    method, params = case
    return method + "-" + "-".join(f"{k}{v:g}" for k, v in params.items())


def check(data, probe, query_scores, method, params, budget, output):
    want, want_gated = ref.normalise(method, data.S, data.P, data.H, beta=BETA, gallery_beta=GALLERY_BETA, **params)
    spec = methods.get(method)
    norm = methods.build(spec, probe, methods.settings(spec, {"beta": BETA, "gallery_beta": GALLERY_BETA, **params},
                                                       probe))
    exact_only = data.name != "ties"
    if output == "dense":
        got, _, gated = stream(query_scores, norm, budget)
        np.testing.assert_array_equal(gated, want_gated)
        assert_ranking(ref.top_n(got, TOP_N)[1], want, exact_only)
        assert_scores(got, want)
    else:
        got_vals, got_idx, gated = stream(query_scores, norm, budget, TOP_N)
        np.testing.assert_array_equal(gated, want_gated)
        assert_ranking(got_idx, want, exact_only)
        assert_scores(got_vals, ref.top_n(want, TOP_N)[0])


@pytest.mark.parametrize("output", ["dense", "topk"])
@pytest.mark.parametrize("budget_name", ["rows1", "rows2", "rows7", "mem400", "mem1g"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matrix_scores_equal_reference(rnd, ties, budget_name, case, output):
    for data in (rnd, ties):
        check(data, matrix_probe(data, budget_name), MatrixScores(mem(data.S)), *case, BUDGETS[budget_name], output)


_EMBEDDED: dict = {}


@pytest.mark.parametrize("budget_name", ["rows1", "rows7", "mem400", "mem1g"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_embedding_scores_equal_reference(emb, budget_name, case):
    budget = BUDGETS[budget_name]

    def scores(rows, cols):
        return EmbeddingScores(Embeddings(mem(rows), "dot", budget), Embeddings(mem(cols), "dot", budget))

    if budget_name not in _EMBEDDED:
        _EMBEDDED[budget_name] = StreamedProbe(scores(emb.bank, emb.gallery), scores(emb.gallery_bank, emb.gallery),
                                               N_GALLERY, budget)
    probe = _EMBEDDED[budget_name]
    for output in ("dense", "topk"):
        check(emb.scores(), probe, scores(emb.queries, emb.gallery), *case, budget, output)


@pytest.mark.parametrize("budget_name", list(BUDGETS))
def test_column_means_and_min_count_sets_equal_reference(rnd, ties, budget_name):
    for data in (rnd, ties):
        probe = matrix_probe(data, budget_name)
        # float64 sums of float32-exact scores: within γ_N of Σ|P| / N
        tol.assert_close(probe.column_mean(), data.P.mean(axis=0),
                         tol.gamma(data.P.shape[0] + 2, tol.U64) * np.abs(data.P).mean(axis=0))
        for k in (1, 2, 3):
            for theta in (1, 2, 3, 5):
                np.testing.assert_array_equal(probe.activation(k, min_count=theta), ref.activation(data.P, k, theta))
                np.testing.assert_array_equal(probe.activation(k, gallery=True, min_count=theta),
                                              ref.activation(data.H, k, theta))


# --- hand-checked ----------------------------------------------------------------------------------

def test_dn_hand_checked():
    # column means of P: (0.5, 0.2, 0.0); λ = 0.5 subtracts (0.25, 0.1, 0.0)
    P = np.array([[0.9, 0.1, 0.2], [0.1, 0.3, -0.2]])
    S = np.array([[0.5, 0.4, 0.3]])
    want = [[0.25, 0.3, 0.3]]
    scores, gated = nz.apply_dense(S, normaliser(exact_probe(P), "dn", lam=0.5))
    tol.assert_close(scores, want, tol.eval64(1.0, 8))
    assert gated.all()
    # through the streamed path every score is read as float32 (u₃₂·|s| each), the means likewise
    probe = StreamedProbe(MatrixScores(mem(P)), MatrixScores(mem(P)), 3, Budget(block_rows=1), betas=(1.0,),
                          gallery_betas=(1.0,), kmax=3, ks=(1,))
    got, _, _ = stream(MatrixScores(mem(S)), normaliser(probe, "dn", lam=0.5), Budget(block_rows=1))
    tol.assert_close(got, want, tol.scaled(tol.U32 * 0.9, 1.0, (0.5,)) + tol.eval64(1.0, 8))
    # λ's default is the paper's 0.25
    default, _ = nz.apply_dense(S, normaliser(exact_probe(P), "dn"))
    tol.assert_close(default, [[0.375, 0.35, 0.3]], tol.eval64(1.0, 8))


def test_dn_is_the_mean_bank_embedding_form():
    rng = np.random.default_rng(17)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    bank, queries, gallery = unit(rng.normal(size=(9, 6))), unit(rng.normal(size=(4, 6))), unit(rng.normal(size=(5, 6)))
    with pytest.warns(QbnormWarning, match="low bank coverage"):  # 9 bank queries for 5 items
        probe = qbnorm_cli.probe(bank, gallery, betas=[20.0])
    got = qbnorm_cli.normalise(queries, gallery, probe, method="dn", lam=0.4)
    b64, q64, g64 = (x.astype(np.float64) for x in (bank, queries, gallery))
    want = q64 @ g64.T - 0.4 * (b64.mean(axis=0) @ g64.T)[None, :]   # S − λ·μ_QB·g_j
    # float32 cosines of 6-d rows (rows re-normalised in float32): each within cosine32(6)
    tol.assert_close(got, want, tol.scaled(tol.cosine32(6) + tol.product64(6), 1.0, (0.4,)) + tol.eval64(2.0))


def test_min_count_hand_checked():
    # the DIS example: the bank's top-1 items are 0, 0, 1 (counts 2, 1, 0); raw top-1s of S_THETA: 0, 1, 2
    probe = exact_probe(P_A, H_C)
    for theta, gates in ((1, [True, True, False]), (2, [True, False, False]), (3, [False, False, False])):
        _, gated = nz.apply_dense(S_THETA, normaliser(probe, "dis", beta=20.0, k=1, min_count=theta))
        assert gated.tolist() == gates
    # dual-dis: H's top-1 items are 0 and 1 once each, so θ = 2 leaves P's {0} alone
    for theta, gates in ((1, [True, True, False]), (2, [True, False, False])):
        _, gated = nz.apply_dense(S_THETA, normaliser(probe, "dual-dis", beta=20.0, gallery_beta=1.0, k=1,
                                                      min_count=theta))
        assert gated.tolist() == gates


def test_theta_one_is_the_existing_dis(rnd):
    probe = matrix_probe(rnd, "mem1g")
    for method in ("dis", "dual-dis"):
        default = normaliser(probe, method, beta=BETA, k=2)
        explicit = normaliser(probe, method, beta=BETA, k=2, min_count=1)
        np.testing.assert_array_equal(default.gate, explicit.gate)
        np.testing.assert_array_equal(default.offset, explicit.offset)
    np.testing.assert_array_equal(probe.activation(2), probe.activation(2, min_count=1))


# --- the API --------------------------------------------------------------------------------------

def test_api_parameters_and_their_errors(emb):
    probe = qbnorm_cli.probe(emb.bank, emb.gallery, betas=[2.0], similarity="dot")
    with pytest.raises(UsageError, match=r"^lam -1.0: must be a finite number ≥ 0"):
        qbnorm_cli.normalise(emb.queries, emb.gallery, probe, method="dn", lam=-1.0, similarity="dot")
    with pytest.raises(UsageError, match=r"^min_count 0: must be at least 1"):
        qbnorm_cli.normalise(emb.queries, emb.gallery, probe, method="dis", min_count=0, similarity="dot")
    with pytest.raises(UsageError, match=r"^min_count 1.5: expected a whole number"):
        qbnorm_cli.normalise(emb.queries, emb.gallery, probe, method="dis", min_count=1.5, similarity="dot")
    with pytest.warns(QbnormWarning, match=r"no gallery item is in the top-1 of 1000 or more bank queries: dis leaves "
                                           r"every row raw; lower min_count"):
        scores = qbnorm_cli.normalise(emb.queries, emb.gallery, probe, method="dis", min_count=1000,
                                      similarity="dot", top_k=3)
    assert not scores.normalised.any()
    # parameters a method does not take are ignored (as for every method): dn takes no θ
    a = qbnorm_cli.normalise(emb.queries, emb.gallery, probe, method="dn", similarity="dot", min_count=7)
    b = qbnorm_cli.normalise(emb.queries, emb.gallery, probe, method="dn", similarity="dot")
    np.testing.assert_array_equal(a, b)


def test_an_old_probe_without_column_means_asks_for_a_new_probe(rnd):
    probe = exact_probe(rnd.P)
    del probe.datasets["/column_mean"]
    with pytest.raises(UsageError, match=r"has no column means of the bank scores .*; probe again"):
        normaliser(probe, "dn")
