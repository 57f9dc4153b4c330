"""Hand-checked cases of the oracle's newer methods: DIS with a min-count activation set (θ)."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref

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
