"""A dense, obviously-correct oracle of every qbnorm method, written from the formulas.

Independent of qbnorm_cli: whole matrices, float64, scipy's logsumexp, stable sorts for every
ordering and brute-force counting for Globally-Corrected ranks.

  P[i, j]  bank × gallery          S[q, j]  query × gallery          H[h, j]  gallery-bank × gallery

Every method returns (scores, normalised): the full (Q, G) float64 score matrix and a (Q,) bool
vector saying which rows were normalised (rows left alone keep their raw scores).
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

METHODS = ("none", "is", "dis", "csls", "nnn", "gc", "dual-is", "dual-dis")


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def log_norm(P, beta: float) -> np.ndarray:
    """L_j = logsumexp_i(β·P[i, j])."""
    return logsumexp(beta * _f64(P), axis=0)


def row_top(M, k: int) -> np.ndarray:
    """Indices of the k best items of each row, best first, ties towards the lower index."""
    return np.argsort(-_f64(M), axis=1, kind="stable")[:, :k]


def activation_count(P, k: int) -> np.ndarray:
    """How many bank rows have gallery item j among their top-k (ties towards the lower index)."""
    P = _f64(P)
    count = np.zeros(P.shape[1], dtype=np.int64)
    for i in range(P.shape[0]):
        for j in row_top(P[i:i + 1], k)[0]:
            count[j] += 1
    return count


def activation(P, k: int, min_count: int = 1) -> np.ndarray:
    """A: gallery items among the top-k of at least min_count bank rows (min_count=1: at least one).

    min_count=θ > 1 is the min-count activation set: an item must be retrieved by θ bank queries
    before DIS treats it as a hub.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    return activation_count(P, k) >= min_count


def raw_top1(S) -> np.ndarray:
    """argmax_j S[q, j], lowest index on ties."""
    return row_top(S, 1)[:, 0]


def mean_top(values, k: int) -> float:
    """Mean of the k largest values (of all of them when fewer than k exist)."""
    ordered = np.sort(_f64(values))[::-1]
    return float(ordered[:k].mean())


def column_mean_top(P, k: int) -> np.ndarray:
    P = _f64(P)
    return np.array([mean_top(P[:, j], k) for j in range(P.shape[1])])


def none(S):
    S = _f64(S)
    return S.copy(), np.zeros(len(S), dtype=bool)


def inverted_softmax(S, P, beta: float):
    S = _f64(S)
    return beta * S - log_norm(P, beta)[None, :], np.ones(len(S), dtype=bool)


def _gate(S, raw_scores, normed, active):
    gated = active[raw_top1(S)]
    return np.where(gated[:, None], normed, raw_scores), gated


def dynamic_inverted_softmax(S, P, beta: float, k: int = 1, min_count: int = 1):
    """DIS (Bogolin et al., CVPR 2022): IS on the queries whose raw top-1 is in activation(P, k, min_count)."""
    S = _f64(S)
    normed, _ = inverted_softmax(S, P, beta)
    return _gate(S, S, normed, activation(P, k, min_count))


def csls(S, P, K: int = 10):
    S = _f64(S)
    r_g = column_mean_top(P, K)
    r_q = np.array([mean_top(row, K) for row in S])
    return 2 * S - r_q[:, None] - r_g[None, :], np.ones(len(S), dtype=bool)


def nnn(S, P, k: int = 128, alpha: float = 0.75):
    S = _f64(S)
    return S - alpha * column_mean_top(P, k)[None, :], np.ones(len(S), dtype=bool)


def gc_rank(S, P) -> np.ndarray:
    """Rank(S[q, j], P[:, j]): how many bank scores of item j are strictly greater, counted."""
    S, P = _f64(S), _f64(P)
    ranks = np.zeros(S.shape)
    for q in range(S.shape[0]):
        for j in range(S.shape[1]):
            count = 0
            for i in range(P.shape[0]):
                if P[i, j] > S[q, j]:
                    count += 1
            ranks[q, j] = count
    return ranks


def globally_corrected(S, P):
    S = _f64(S)
    return -(gc_rank(S, P) - S), np.ones(len(S), dtype=bool)


def dual_inverted_softmax(S, P, H, beta: float, gallery_beta: float):
    S = _f64(S)
    scores = (beta + gallery_beta) * S - log_norm(P, beta)[None, :] - log_norm(H, gallery_beta)[None, :]
    return scores, np.ones(len(S), dtype=bool)


def dual_dynamic_inverted_softmax(S, P, H, beta: float, gallery_beta: float, k: int = 1, min_count: int = 1):
    """Dual-IS on the queries whose raw top-1 is in activation(P, k, θ) ∪ activation(H, k, θ)."""
    S = _f64(S)
    normed, _ = dual_inverted_softmax(S, P, H, beta, gallery_beta)
    return _gate(S, S, normed, activation(P, k, min_count) | activation(H, k, min_count))


def normalise(method: str, S, P, H=None, *, beta: float = 20.0, gallery_beta: float = 1.0, k: int = 1,
              topk_mean: int | None = None, alpha: float = 0.75, min_count: int = 1):
    """Dispatch by method name with qbnorm's defaults (csls K=10, nnn k=128).

    min_count: θ of dis / dual-dis.
    """
    if method == "none":
        return none(S)
    if method == "is":
        return inverted_softmax(S, P, beta)
    if method == "dis":
        return dynamic_inverted_softmax(S, P, beta, k, min_count)
    if method == "csls":
        return csls(S, P, topk_mean or 10)
    if method == "nnn":
        return nnn(S, P, topk_mean or 128, alpha)
    if method == "gc":
        return globally_corrected(S, P)
    if method == "dual-is":
        return dual_inverted_softmax(S, P, H, beta, gallery_beta)
    if method == "dual-dis":
        return dual_dynamic_inverted_softmax(S, P, H, beta, gallery_beta, k, min_count)
    raise ValueError(method)


def top_n(scores, n: int):
    """(values, indices) of the n best items per row, best first, ties towards the lower index."""
    scores = _f64(scores)
    idx = row_top(scores, n)
    return np.take_along_axis(scores, idx, axis=1), idx
