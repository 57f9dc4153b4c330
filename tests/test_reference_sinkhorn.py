"""Hand-checked cases of the oracle's newer methods: Sinkhorn (sn), dual-bank Sinkhorn (dbsn),
Distribution Normalisation (dn) and DIS with a min-count activation set (θ).

Tolerances: everything is float64 (ε = 2.2e-16). One log-sum-exp over n ≤ 12 terms of size ≤ 50
is exact to about n·ε·50 ≈ 1e-13, and N ≤ 40 iterations compound that to well under 1e-11; so
1e-11 bounds any disagreement between two exact-arithmetic-equal computations below, and 1e-14
one made of a handful of operations on O(1) numbers. Convergence bounds are derived where used.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import reference as ref

from qbnorm_cli import methods

ROUNDING = 1e-11   # N ≤ 40 iterations of log-sum-exp over ≤ 12 terms of size ≤ 50 (see above)
FEW_OPS = 1e-14    # a handful of float64 operations on O(1) values


def exp_domain_sinkhorn(P, beta, iters, row_mass=None):
    """An independent brute force: POT's sinkhorn_knopp recursion with plain products and ratios.

    Gallery rows j get mass a_j, bank queries b get 1/n_b; u = v = uniform, then v = b/(Kᵀu), u = a/(Kv).
    Only fit for tiny, mild kernels (it under/overflows where the log-domain oracle does not).
    """
    K = np.exp(beta * np.asarray(P, dtype=np.float64)).T          # (n_rows, n_b)
    n_rows, n_b = K.shape
    a = np.full(n_rows, 1 / n_rows) if row_mass is None else row_mass
    b = np.full(n_b, 1 / n_b)
    u, v = np.full(n_rows, 1 / n_rows), np.full(n_b, 1 / n_b)
    for _ in range(iters):
        v = b / (K.T @ u)
        u = a / (K @ v)
    return np.log(u), np.log(v)


def random_P(seed, n_b, n_g, scale=1.0):
    return np.random.default_rng(seed).uniform(-scale, scale, (n_b, n_g))


# -- Sinkhorn: hand-checked values ---------------------------------------------------------------

# K = exp(β·P) at β = 1, bank × gallery: rational entries, so one iteration is exact fractions.
K_HAND = [[4, 1, 1], [2, 2, 1]]
P_HAND = np.log(np.array(K_HAND, dtype=np.float64))


def test_one_iteration_matches_fractions_worked_by_hand():
    # u = (1/3, 1/3, 1/3); v_b = (1/2) / Σ_j K[b, j]/3: v = (1/2)/(6/3), (1/2)/(5/3) = (1/4, 3/10);
    # u_j = (1/3) / Σ_b K[b, j]·v_b: (1/3)/(1 + 3/5), (1/3)/(1/4 + 3/5), (1/3)/(1/4 + 3/10)
    #     = (5/24, 20/51, 20/33).
    v = [Fraction(1, 2) / (Fraction(sum(row), 3)) for row in K_HAND]
    u = [Fraction(1, 3) / sum(K_HAND[b][j] * v[b] for b in range(2)) for j in range(3)]
    assert v == [Fraction(1, 4), Fraction(3, 10)]
    assert u == [Fraction(5, 24), Fraction(20, 51), Fraction(20, 33)]
    res = ref.sinkhorn(P_HAND, 1.0, iters=1)
    np.testing.assert_allclose(res.log_v, np.log([float(x) for x in v]), rtol=0, atol=FEW_OPS)
    np.testing.assert_allclose(res.log_u, np.log([float(x) for x in u]), rtol=0, atol=FEW_OPS)
    assert res.iterations == 1


def test_symmetric_kernel_is_fixed_after_one_iteration():
    # K = [[e^β, 1], [1, e^β]] is already doubly stochastic up to scale: log v = −log(1 + e^β), u stays 1/2,
    # and π = K / (2·(1 + e^β)).
    beta = 3.0
    P = np.array([[1.0, 0.0], [0.0, 1.0]])
    res = ref.sinkhorn(P, beta)
    np.testing.assert_allclose(res.log_u, np.log([0.5, 0.5]), rtol=0, atol=FEW_OPS)
    np.testing.assert_allclose(res.log_v, -np.log1p(np.exp(beta)) * np.ones(2), rtol=0, atol=FEW_OPS)
    np.testing.assert_allclose(ref.sinkhorn_coupling(beta * P, res.log_u, res.log_v),
                               np.exp(beta * P) / (2 * (1 + np.exp(beta))), rtol=0, atol=FEW_OPS)
    assert res.iterations == 2 and res.change == 0.0   # the 2nd iteration changes nothing


@pytest.mark.parametrize("iters", [1, 2, 7, 40])
def test_log_domain_equals_exp_domain_brute_force(iters):
    P = random_P(0, 6, 4)
    want_u, want_v = exp_domain_sinkhorn(P, 3.0, iters)
    res = ref.sinkhorn(P, 3.0, iters=iters)
    np.testing.assert_allclose(res.log_u, want_u, rtol=0, atol=ROUNDING)
    np.testing.assert_allclose(res.log_v, want_v, rtol=0, atol=ROUNDING)


def test_zero_iterations_leave_the_raw_ranking():
    P, S = random_P(1, 5, 4), random_P(2, 3, 4)
    res = ref.sinkhorn(P, 10.0, iters=0)
    np.testing.assert_array_equal(res.log_u, np.full(4, -np.log(4)))
    scores, normalised = ref.sinkhorn_normalisation(S, P, 10.0, iters=0)
    np.testing.assert_array_equal(ref.row_top(scores, 4), ref.row_top(S, 4))
    assert normalised.all()


# -- Sinkhorn: properties ---------------------------------------------------------------------------

@pytest.mark.parametrize("const", [0.0, -2.5, 7.0])
def test_one_u_update_from_constant_v_is_inverted_softmax(const):
    # log u_j = −log n_g − LSE_b(β·P[b, j] + c) = −LSE_b(β·P[b, j]) − c − log n_g: IS plus a constant.
    beta = 20.0
    P, S = random_P(3, 6, 4), random_P(4, 3, 4)
    log_u = ref.sinkhorn_log_u(beta * P, np.full(6, const))
    sn_like = beta * S + log_u[None, :]
    is_scores, _ = ref.inverted_softmax(S, P, beta)
    diff = sn_like - is_scores
    np.testing.assert_allclose(diff, np.full_like(diff, -const - np.log(4)), rtol=0, atol=ROUNDING)


def test_converged_coupling_has_uniform_marginals():
    # Stopping at change < tol: the next v-update would move log v_b by −log(n_b·colsum_b), which is at
    # most the last change (Sinkhorn contracts), so |colsum_b − 1/n_b| ≤ (e^tol − 1)/n_b ≈ tol/n_b;
    # the rows were just rescaled, so they are exact to rounding.
    beta, tol = 5.0, 1e-10
    P = random_P(5, 7, 5)
    res = ref.sinkhorn(P, beta, tol=tol)
    assert res.change < tol
    pi = ref.sinkhorn_coupling(beta * P, res.log_u, res.log_v)
    np.testing.assert_allclose(pi.sum(axis=0), np.full(5, 1 / 5), rtol=0, atol=FEW_OPS)
    np.testing.assert_allclose(pi.sum(axis=1), np.full(7, 1 / 7), rtol=0, atol=tol / 7 + FEW_OPS)
    assert res.marginal_error <= tol / 7 + FEW_OPS
    assert res.marginal_error == ref.sinkhorn_marginal_error(beta * P, res.log_u, res.log_v)


def test_fixed_iterations_stop_even_unconverged_and_a_stalled_run_raises():
    P = random_P(6, 6, 4)
    res = ref.sinkhorn(P, 50.0, iters=3)
    assert res.iterations == 3 and res.change > 1e-10
    with pytest.raises(RuntimeError, match="did not reach"):
        ref.sinkhorn(P, 50.0, tol=1e-10, max_iters=3)


def test_a_constant_added_to_a_bank_row_changes_nothing():
    # K[b, ·] · e^{β·c_b} is absorbed by v_b (v_b · e^{−β·c_b}); every u iterate is the same.
    beta = 8.0
    P, S = random_P(7, 6, 5), random_P(8, 4, 5)
    shifted = P + np.array([0.0, 0.3, -1.0, 2.0, 0.0, -0.25])[:, None]
    a, b = ref.sinkhorn(P, beta, tol=1e-12), ref.sinkhorn(shifted, beta, tol=1e-12)
    np.testing.assert_allclose(a.log_u, b.log_u, rtol=0, atol=ROUNDING)
    np.testing.assert_allclose(a.log_v - b.log_v, beta * np.array([0.0, 0.3, -1.0, 2.0, 0.0, -0.25]),
                               rtol=0, atol=ROUNDING)
    for iters in (1, 10):   # also for truncated runs
        np.testing.assert_allclose(ref.sinkhorn(P, beta, iters=iters).log_u,
                                   ref.sinkhorn(shifted, beta, iters=iters).log_u, rtol=0, atol=ROUNDING)
    sa, _ = ref.sinkhorn_normalisation(S, P, beta)
    sb, _ = ref.sinkhorn_normalisation(S, shifted, beta)
    np.testing.assert_array_equal(ref.row_top(sa, 5), ref.row_top(sb, 5))


def test_identical_bank_rows_reduce_sn_to_inverted_softmax():
    # Every bank row the same, K[b, j] = c_j: π[j, b] = u_j·c_j·v_b = 1/(n_g·n_b) at u_j ∝ 1/c_j.
    # Then log u_j = −log c_j + const = −LSE_b(β·P[b, j]) + const: sn ranks exactly as IS.
    beta = 1.0
    P = np.log(np.array([[2.0, 1.0, 1.0], [2.0, 1.0, 1.0]]))
    res = ref.sinkhorn(P, beta)
    np.testing.assert_allclose(res.log_u - res.log_u[0], [0.0, np.log(2.0), np.log(2.0)], rtol=0, atol=FEW_OPS)
    S = np.array([[0.0, 0.0, 0.5], [0.9, 0.0, 0.1]])
    sn, _ = ref.sinkhorn_normalisation(S, P, beta)
    is_scores, _ = ref.inverted_softmax(S, P, beta)
    np.testing.assert_allclose(sn - sn[:, :1], is_scores - is_scores[:, :1], rtol=0, atol=FEW_OPS)


def test_duplicating_every_bank_row_changes_nothing():
    # The same transport problem with each bank query's mass split over two copies: log u is unchanged.
    beta = 6.0
    P = random_P(9, 5, 4)
    for iters in (1, 5, None):
        a = ref.sinkhorn(P, beta, iters=iters)
        b = ref.sinkhorn(np.vstack([P, P]), beta, iters=iters)
        np.testing.assert_allclose(a.log_u, b.log_u, rtol=0, atol=ROUNDING)
        np.testing.assert_allclose(b.log_v, np.tile(a.log_v - np.log(2), 2), rtol=0, atol=ROUNDING)


def test_an_item_no_bank_query_is_near_still_gets_its_mass():
    # Item 3 is far below every bank query's other scores: Sinkhorn must still send it 1/n_g, so its
    # log u is by far the largest and a query that cannot tell the items apart retrieves it.
    beta = 50.0
    P = random_P(10, 6, 4, scale=0.2) + 0.5
    P[:, 3] = -0.9
    res = ref.sinkhorn(P, beta)
    assert np.isfinite(res.log_u).all() and np.isfinite(res.log_v).all()
    assert np.argmax(res.log_u) == 3 and res.log_u[3] - np.delete(res.log_u, 3).max() > beta * 1.0
    assert res.marginal_error < 1e-10
    scores, _ = ref.sinkhorn_normalisation(np.zeros((1, 4)), P, beta)
    assert ref.raw_top1(scores)[0] == 3


@pytest.mark.parametrize("beta", [100.0, 300.0, 1000.0])
def test_large_beta_stays_finite(beta):
    # exp(1000·P) overflows float64 beyond P ≈ 0.71; the log-domain recursion never forms it.
    # Sinkhorn's linear rate degrades like 1 − e^{−β·gap}: some small P take > 10⁵ iterations at β ≥ 100.
    # This one converges in < 800 (β = 1000), < 0.3 s.
    P = random_P(23, 5, 7)
    res = ref.sinkhorn(P, beta, tol=1e-10)
    assert np.isfinite(res.log_u).all() and np.isfinite(res.log_v).all()
    assert res.marginal_error < 1e-10
    truncated = ref.sinkhorn(random_P(12, 8, 8), beta, iters=25)   # square: slow to converge, still finite
    assert np.isfinite(truncated.log_u).all() and np.isfinite(truncated.log_v).all()
    if beta == 1000.0:
        with np.errstate(over="ignore"):
            assert not np.isfinite(np.exp(beta * P)).all()


# -- dual-bank Sinkhorn ---------------------------------------------------------------------------

def test_dual_bank_is_sinkhorn_over_gallery_and_gallery_bank_rows():
    beta = 4.0
    P, PB = random_P(13, 6, 3), random_P(14, 6, 5)
    for iters in (1, 10):
        res = ref.dual_bank_sinkhorn(P, PB, beta, iters=iters)
        assert res.log_u.shape == (8,)
        # one uniform row marginal 1/(n_g + n_gb) over all eight rows, checked by the brute force
        want_u, want_v = exp_domain_sinkhorn(np.hstack([P, PB]), beta, iters, row_mass=np.full(8, 1 / 8))
        np.testing.assert_allclose(res.log_u, want_u, rtol=0, atol=ROUNDING)
        np.testing.assert_allclose(res.log_v, want_v, rtol=0, atol=ROUNDING)
    res = ref.dual_bank_sinkhorn(P, PB, beta)
    pi = ref.sinkhorn_coupling(beta * np.hstack([P, PB]), res.log_u, res.log_v)
    np.testing.assert_allclose(pi.sum(axis=0), np.full(8, 1 / 8), rtol=0, atol=FEW_OPS)
    np.testing.assert_allclose(pi.sum(axis=1), np.full(6, 1 / 6), rtol=0, atol=1e-10)
    S = random_P(15, 2, 3)
    scores, normalised = ref.dual_bank_sinkhorn_normalisation(S, P, PB, beta)
    np.testing.assert_allclose(scores, beta * S + res.log_u[None, :3], rtol=0, atol=FEW_OPS)
    assert normalised.all()


def test_dual_bank_with_an_empty_gallery_bank_is_sn():
    P = random_P(16, 5, 4)
    a, b = ref.sinkhorn(P, 7.0), ref.dual_bank_sinkhorn(P, np.zeros((5, 0)), 7.0)
    np.testing.assert_array_equal(a.log_u, b.log_u)
    with pytest.raises(ValueError, match="same bank rows"):
        ref.dual_bank_sinkhorn(P, np.zeros((4, 2)), 7.0)


# -- Distribution Normalisation ----------------------------------------------------------------------

def test_dn_hand_checked():
    # column means of P: (0.5, 0.2, 0.0); λ = 0.5 subtracts (0.25, 0.1, 0.0)
    P = np.array([[0.9, 0.1, 0.2], [0.1, 0.3, -0.2]])
    S = np.array([[0.5, 0.4, 0.3]])
    scores, normalised = ref.distribution_normalisation(S, P, lam=0.5)
    np.testing.assert_allclose(scores, [[0.25, 0.3, 0.3]], rtol=0, atol=FEW_OPS)
    assert normalised.all()


@pytest.mark.parametrize("lam", [0.25, 0.5, 1.0])
def test_dn_from_P_equals_the_embedding_form(lam):
    rng = np.random.default_rng(17)
    unit = lambda X: X / np.linalg.norm(X, axis=1, keepdims=True)
    QB, Q, G = unit(rng.normal(size=(9, 6))), unit(rng.normal(size=(4, 6))), unit(rng.normal(size=(5, 6)))
    S, P = Q @ G.T, QB @ G.T
    embedding_form = S - lam * (QB.mean(axis=0) @ G.T)[None, :]   # S − λ·μ_QB·g_j
    np.testing.assert_allclose(ref.distribution_normalisation(S, P, lam)[0], embedding_form, rtol=0, atol=FEW_OPS)


# -- DIS with a min-count activation set ------------------------------------------------------------------

# The DIS worked example of test_normalisers: top-1 of the bank rows is item 0, 0, 1
P_A = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1], [0.1, 0.7, 0.3]])
S_THETA = np.array([[0.5, 0.4, 0.45], [0.1, 0.6, 0.2], [0.1, 0.2, 0.6]])   # raw top-1: items 0, 1, 2
H_C = np.array([[0.95, 0.2, 0.1], [0.3, 0.9, 0.2]])                        # top-1: items 0, 1


def test_activation_counts_and_min_count_by_hand():
    np.testing.assert_array_equal(ref.activation_count(P_A, 1), [2, 1, 0])
    np.testing.assert_array_equal(ref.activation(P_A, 1, 1), [True, True, False])
    np.testing.assert_array_equal(ref.activation(P_A, 1, 2), [True, False, False])
    np.testing.assert_array_equal(ref.activation(P_A, 1, 3), [False, False, False])
    # top-2: rows give {0, 1}, {0, 1}, {1, 2}
    np.testing.assert_array_equal(ref.activation_count(P_A, 2), [2, 3, 1])
    np.testing.assert_array_equal(ref.activation(P_A, 2, 3), [False, True, False])
    with pytest.raises(ValueError):
        ref.activation(P_A, 1, 0)


def test_theta_one_is_the_existing_dis():
    for min_count in (None, 1):
        kw = {} if min_count is None else {"min_count": min_count}
        np.testing.assert_array_equal(ref.activation(P_A, 1, **kw), ref.activation(P_A, 1))
        got = ref.normalise("dis", S_THETA, P_A, beta=20.0, k=1, **kw)
        want = ref.dynamic_inverted_softmax(S_THETA, P_A, 20.0, 1)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_larger_theta_gates_fewer_queries():
    is_scores, _ = ref.inverted_softmax(S_THETA, P_A, 20.0)
    gated = {}
    for theta in (1, 2, 3):
        scores, gated[theta] = ref.normalise("dis", S_THETA, P_A, beta=20.0, k=1, min_count=theta)
        np.testing.assert_array_equal(scores, np.where(gated[theta][:, None], is_scores, S_THETA))
    assert gated[1].tolist() == [True, True, False]
    assert gated[2].tolist() == [True, False, False]
    assert gated[3].tolist() == [False, False, False]


def test_dual_dis_min_count_is_the_union_of_both_min_count_sets():
    # H counts (1, 1, 0): θ = 2 keeps nothing of H, so the union is P's {0} alone
    for theta, want in ((1, [True, True, False]), (2, [True, False, False])):
        _, gated = ref.normalise("dual-dis", S_THETA, P_A, H_C, beta=20.0, gallery_beta=20.0, k=1, min_count=theta)
        assert gated.tolist() == want
    default = ref.dual_dynamic_inverted_softmax(S_THETA, P_A, H_C, 20.0, 20.0, 1)
    explicit = ref.dual_dynamic_inverted_softmax(S_THETA, P_A, H_C, 20.0, 20.0, 1, min_count=1)
    np.testing.assert_array_equal(default[0], explicit[0])


# -- dispatch ------------------------------------------------------------------------------------------

def test_normalise_dispatches_the_new_methods():
    P, PB, S = random_P(18, 6, 4), random_P(19, 6, 3), random_P(20, 2, 4)
    np.testing.assert_array_equal(ref.normalise("sn", S, P, beta=9.0, iters=4)[0],
                                  ref.sinkhorn_normalisation(S, P, 9.0, iters=4)[0])
    np.testing.assert_array_equal(ref.normalise("dbsn", S, P, PB=PB, beta=9.0)[0],
                                  ref.dual_bank_sinkhorn_normalisation(S, P, PB, 9.0)[0])
    np.testing.assert_array_equal(ref.normalise("dn", S, P, lam=0.4)[0], ref.distribution_normalisation(S, P, 0.4)[0])
    np.testing.assert_array_equal(ref.normalise("dn", S, P)[0], ref.distribution_normalisation(S, P, 0.25)[0])
    with pytest.raises(ValueError, match="PB"):
        ref.normalise("dbsn", S, P, beta=9.0)


def test_the_oracle_covers_every_method_of_the_registry():
    assert set(ref.METHODS) == set(methods.BUILT_IN_NAMES)  # (plug-ins: tests/test_plugins.py)
