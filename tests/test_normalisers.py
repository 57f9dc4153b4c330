"""Hand-checked vectors for every method: the reference oracle and the package agree with them."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import tolerance as tol
from helpers import exact_probe, normaliser
from test_kernels import StreamedProbe, mem, stream

from qbnorm_cli.core import normalisers as nz
from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.streaming.budget import Budget
from qbnorm_cli.streaming.sources import Embeddings, EmbeddingScores, MatrixScores

# (a) the DIS worked example
P_A = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1], [0.1, 0.7, 0.3]])
S_A = np.array([[0.5, 0.4, 0.45], [0.1, 0.2, 0.6]])
DIS_A = np.array([[-8.126928, -6.000052, 2.979419], [0.1, 0.2, 0.6]])
IS_A = np.array([[-8.126928, -6.000052, 2.979419], [-16.126928, -10.000052, 5.979419]])
# (c) dual-IS with a gallery bank
H_C = np.array([[0.95, 0.2, 0.1], [0.3, 0.9, 0.2]])
DUAL_IS_C = np.array([[-17.126930, -16.000052, 7.852491], [-33.126930, -24.000052, 13.852491]])

# Error bounds (tests/tolerance.py). The literals above are rounded to 6 decimals; evaluating the
# formulas in float64 adds a few ulps of β·S and the LSE; scores read as float32 (the streamed path)
# are first rounded by u₃₂·|value|, which β₁ + β₂ and the offsets' β magnify.
LITERAL = 0.5e-6
EXACT64 = tol.method_error("dual-is", 0.0, magnitude=80.0, n_bank=3, spread=1.0, beta=20.0, gallery_beta=20.0)
READ32 = tol.method_error("dual-is", tol.U32 * 1.0, magnitude=80.0, n_bank=3, spread=1.0, beta=20.0,
                          gallery_beta=20.0)


def package_dense(S, norm):
    """The package's dense application on float64 scores."""
    return nz.apply_dense(np.asarray(S, dtype=np.float64), norm)


def test_dis_hand_checked_reference():
    np.testing.assert_array_equal(ref.activation(P_A, 1), [True, True, False])
    scores, normalised = ref.dynamic_inverted_softmax(S_A, P_A, 20.0, 1)
    tol.assert_close(scores, DIS_A, LITERAL + EXACT64)
    np.testing.assert_array_equal(normalised, [True, False])
    scores, normalised = ref.inverted_softmax(S_A, P_A, 20.0)
    tol.assert_close(scores, IS_A, LITERAL + EXACT64)
    assert normalised.all()


def test_dis_hand_checked_package():
    probe = exact_probe(P_A)
    np.testing.assert_array_equal(probe.activation(1), [True, True, False])
    scores, gated = package_dense(S_A, normaliser(probe, "dis", beta=20.0, k=1))
    tol.assert_close(scores, DIS_A, LITERAL + EXACT64)
    np.testing.assert_array_equal(gated, [True, False])
    assert scores[1].tolist() == S_A[1].tolist()  # the row left alone keeps its raw scores exactly
    scores, gated = package_dense(S_A, normaliser(probe, "is", beta=20.0))
    tol.assert_close(scores, IS_A, LITERAL + EXACT64)
    assert gated.all()


@pytest.mark.parametrize("block_rows", [1, 2, None])
def test_dis_hand_checked_streamed(block_rows):
    """Through run_probe / run_normalise (scores read as float32, so a float32 tolerance)."""
    budget = Budget(block_rows=block_rows)
    probe = StreamedProbe(MatrixScores(mem(P_A)), MatrixScores(mem(H_C)), 3, budget, betas=(20.0,),
                          gallery_betas=(20.0,), kmax=3, ks=(1,))
    norm = normaliser(probe, "dis", beta=20.0, k=1)
    scores, _, gated = stream(MatrixScores(mem(S_A)), norm, budget)
    tol.assert_close(scores, DIS_A, LITERAL + READ32)
    np.testing.assert_array_equal(gated, [True, False])
    values, indices, gated = stream(MatrixScores(mem(S_A)), norm, budget, 2)
    np.testing.assert_array_equal(indices, [[2, 1], [2, 1]])
    tol.assert_close(values, [[2.979419, -6.000052], [0.6, 0.2]], LITERAL + READ32)
    norm = normaliser(probe, "dual-is", beta=20.0, gallery_beta=20.0)
    scores, _, _ = stream(MatrixScores(mem(S_A)), norm, budget)
    tol.assert_close(scores, DUAL_IS_C, LITERAL + READ32)


def test_dual_is_hand_checked():
    scores, normalised = ref.dual_inverted_softmax(S_A, P_A, H_C, 20.0, 20.0)
    tol.assert_close(scores, DUAL_IS_C, LITERAL + EXACT64)
    assert normalised.all()
    norm = normaliser(exact_probe(P_A, H_C, gallery_betas=(20.0,)), "dual-is", beta=20.0, gallery_beta=20.0)
    scores, gated = package_dense(S_A, norm)
    tol.assert_close(scores, DUAL_IS_C, LITERAL + EXACT64)
    assert gated.all()


def test_dual_dis_gate_is_union_of_activation_sets():
    # A_q = {0, 1}, A_g = {0, 1} from H_C; a gallery bank that makes item 2 a hub opens row 1 too
    H = np.array([[0.1, 0.2, 0.9], [0.3, 0.9, 0.2]])
    assert ref.activation(H, 1).tolist() == [False, True, True]
    scores, normalised = ref.dual_dynamic_inverted_softmax(S_A, P_A, H, 20.0, 1.0, 1)
    assert normalised.tolist() == [True, True]
    scores, normalised = ref.dual_dynamic_inverted_softmax(S_A, P_A, H_C, 20.0, 1.0, 1)
    assert normalised.tolist() == [True, False]
    np.testing.assert_array_equal(scores[1], S_A[1])
    norm = normaliser(exact_probe(P_A, H, gallery_betas=(1.0,)), "dual-dis", beta=20.0, gallery_beta=1.0, k=1)
    got, gated = package_dense(S_A, norm)
    want, want_gated = ref.dual_dynamic_inverted_softmax(S_A, P_A, H, 20.0, 1.0, 1)
    tol.assert_close(got, want, 2 * EXACT64)  # both in float64: each within EXACT64 of the exact value
    np.testing.assert_array_equal(gated, want_gated)


# the NNN case: float64 products of 4-d rows of norm ≤ 1.02 (magnitude ≤ 1.05), means of ≤ 20 of them
NNN64 = tol.product64(4, 1.05) + tol.eval64(1.05, 24)
# the same through float32 embeddings: the rows are rounded to float32 (u₃₂ relative each), then the
# float32 product adds γ₄: together within γ₆ of the exact products; S − 0.75·b_j scales that by 1.75
NNN32 = tol.scaled(tol.product32(6, 1.05), 1.0, (0.75,)) + NNN64


def nnn_vector():
    e = np.eye(4)
    gallery = np.stack([e[1], e[0], -e[1], -e[0], e[2]])
    queries = np.array([[0, .6, .8, 0], [.6, 0, .8, 0], [0, -.6, .8, 0], [-.6, 0, .8, 0], [0, 0, 1, 0]])
    bank = np.stack([q + sign * 0.01 * e[axis] for q in queries for axis in (0, 1) for sign in (1, -1)])
    assert bank.shape == (20, 4)
    return gallery, queries, bank


def test_nnn_hand_checked_reference():
    gallery, queries, bank = nnn_vector()
    P, S = bank @ gallery.T, queries @ gallery.T
    tol.assert_close(ref.column_mean_top(P, 2), [0.605, 0.605, 0.605, 0.605, 1.0], NNN64)
    np.testing.assert_array_equal(ref.raw_top1(S), [4, 4, 4, 4, 4])
    scores, _ = ref.nnn(S, P, 2, 0.75)
    values, idx = ref.top_n(scores, 1)
    np.testing.assert_array_equal(idx[:, 0], [0, 1, 2, 3, 4])
    tol.assert_close(values[:, 0], [0.14625] * 4 + [0.25], 2 * NNN64)


@pytest.mark.parametrize("block_rows", [1, 3, None])
def test_nnn_hand_checked_streamed(block_rows):
    gallery, queries, bank = nnn_vector()
    budget = Budget(block_rows=block_rows)

    def scores(rows):
        return EmbeddingScores(Embeddings(mem(rows.astype(np.float32)), "dot", budget),
                               Embeddings(mem(gallery.astype(np.float32)), "dot", budget))

    probe = StreamedProbe(scores(bank), scores(bank), 5, budget, ks=(2, 128))
    tol.assert_close(probe.topk_mean(2), [0.605, 0.605, 0.605, 0.605, 1.0], NNN32)
    tol.assert_close(probe.topk_mean(128), bank.mean(axis=0)[[1, 0, 1, 0, 2]] * [1, 1, -1, -1, 1], NNN32)
    norm = normaliser(probe, "nnn", topk_mean=2, alpha=0.75)
    values, indices, gated = stream(scores(queries), norm, budget, 1)
    np.testing.assert_array_equal(indices[:, 0], [0, 1, 2, 3, 4])
    tol.assert_close(values[:, 0], [0.14625] * 4 + [0.25], NNN32)
    assert gated.all()
    _, indices, _ = stream(scores(queries), normaliser(probe, "none"), budget, 1)
    np.testing.assert_array_equal(indices[:, 0], [4, 4, 4, 4, 4])


def test_csls_hand_checked():
    P = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    S = np.array([[0.2, 0.8]])
    scores, _ = ref.csls(S, P, 2)
    tol.assert_close(scores, [[-0.85, 0.35]], tol.eval64(2.0, 6))  # 2·S − two means of 2, in float64
    got, gated = package_dense(S, normaliser(exact_probe(P, ks=(2,)), "csls", topk_mean=2))
    tol.assert_close(got, [[-0.85, 0.35]], tol.eval64(2.0, 6))
    assert gated.all()


def test_csls_dense_row_term_keeps_float64_precision():
    """apply_dense on float32 raw rows (what engine._DenseRows holds) must not round the CSLS row term
    r_q to float32: the ranking path computes it in float64 and so does the formula."""
    rng = np.random.default_rng(3)
    raw = rng.uniform(-1, 1, (4, 23)).astype(np.float32)
    norm = Normaliser(scale=2.0, offset=np.zeros(23), row_topk=10)  # CSLS with r_j = 0
    got32, _ = nz.apply_dense(raw, norm)
    want, _ = ref.csls(raw, np.zeros((1, 23)), 10)
    tol.assert_close(got32, want, 2 * tol.eval64(3.0, 14))  # 2·S − r_q (a mean of 10), float64 on both sides


def test_gc_ranks_brute_force():
    rng = np.random.default_rng(4)
    for P, S in [
        (rng.integers(0, 5, (30, 11)).astype(np.float64), rng.integers(-1, 6, (9, 11)).astype(np.float64)),
        (rng.uniform(-1, 1, (30, 11)), rng.uniform(-1, 1, (9, 11))),
    ]:
        sorted_cols = np.sort(P.T, axis=1)
        ranks = nz.globally_corrected_rank(S, sorted_cols)
        np.testing.assert_array_equal(ranks, ref.gc_rank(S, P))
        gc = Normaliser(sorted_bank=sorted_cols)
        if (P == P.astype(np.float32)).all():  # the probe keeps float32 scores: the registry's gc is this one
            np.testing.assert_array_equal(normaliser(exact_probe(P, keep_sorted=True), "gc").sorted_bank, sorted_cols)
        scores, gated = package_dense(S, gc)
        np.testing.assert_array_equal(scores, ref.globally_corrected(S, P)[0])
        assert gated.all()
        for c0, c1 in [(0, 4), (4, 5), (5, 11)]:  # column tiles see their own slice of the sorted bank
            np.testing.assert_array_equal(gc.transform(S[:, c0:c1], c0),
                                          ref.globally_corrected(S, P)[0][:, c0:c1])


def test_gc_hand_checked():
    P = np.array([[0.9, 0.1], [0.5, 0.3], [0.5, 0.2]])
    S = np.array([[0.5, 0.25], [1.0, 0.0]])
    # item 0 bank scores {0.9, 0.5, 0.5}: 1 strictly above 0.5, 0 above 1.0; item 1 {0.1, 0.3, 0.2}
    np.testing.assert_array_equal(ref.gc_rank(S, P), [[1, 1], [0, 3]])
    np.testing.assert_array_equal(nz.globally_corrected_rank(S, np.sort(P.T, axis=1)), [[1, 1], [0, 3]])
    np.testing.assert_array_equal(ref.globally_corrected(S, P)[0], [[-0.5, -0.75], [1.0, -3.0]])  # exact


def test_none_is_identity():
    scores, gated = package_dense(S_A, normaliser(exact_probe(P_A), "none"))
    np.testing.assert_array_equal(scores, S_A)
    assert not gated.any()
    np.testing.assert_array_equal(ref.none(S_A)[0], S_A)


@pytest.mark.parametrize("beta", [1.0, 100.0, 1000.0])
@pytest.mark.parametrize("block_rows", [3, None])
def test_clip_logits_large_beta_stay_finite(beta, block_rows):
    """CLIP-like logits (100·cosine) with β up to 1000: β·S ≈ 1e5, far beyond exp's range."""
    rng = np.random.default_rng(6)

    def logits(n):
        x = rng.normal(size=(n, 16))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    bank, gbank, queries, gallery = logits(40), logits(25), logits(12), logits(17)
    P, H, S = (np.asarray(100 * (a @ gallery.T), dtype=np.float32).astype(np.float64) for a in (bank, gbank, queries))
    budget = Budget(block_rows=block_rows)
    probe = StreamedProbe(MatrixScores(mem(P)), MatrixScores(mem(H)), 17, budget, betas=(beta,),
                          gallery_betas=(beta,), ks=(10,))
    assert np.isfinite(probe.log_norm(beta)).all()
    # the scores are float32-exact: only the float64 evaluation errs (LSE over 40 terms of spread ≤ 200)
    bound = 2 * tol.method_error("dual-is", 0.0, magnitude=4 * beta * 100, n_bank=40, spread=200.0, beta=beta,
                                 gallery_beta=beta)
    for method, norm in [(m, normaliser(probe, m, beta=beta, gallery_beta=beta, k=1))
                         for m in ("is", "dis", "dual-is", "dual-dis")]:
        want, want_gated = ref.normalise(method, S, P, H, beta=beta, gallery_beta=beta, k=1)
        assert np.isfinite(want).all()
        got, _, gated = stream(MatrixScores(mem(S)), norm, budget)
        assert np.isfinite(got).all(), method
        tol.assert_close(got, want, bound)
        np.testing.assert_array_equal(gated, want_gated)
        values, indices, _ = stream(MatrixScores(mem(S)), norm, budget, 5)
        assert np.isfinite(values).all()
        tol.assert_separated(want, 5, bound)
        np.testing.assert_array_equal(indices, ref.top_n(want, 5)[1])
