"""A dense, obviously-correct oracle of every qbnorm method, written from the formulas.

Independent of qbnorm_cli: whole matrices, float64, scipy's logsumexp, stable sorts for every
ordering and brute-force counting for Globally-Corrected ranks.

  P[i, j]  bank × gallery          S[q, j]  query × gallery          H[h, j]  gallery-bank × gallery
  PB[i, h] bank × gallery-bank (dual-bank Sinkhorn only: the bank queries against the gallery bank items)

Every method returns (scores, normalised): the full (Q, G) float64 score matrix and a (Q,) bool
vector saying which rows were normalised (rows left alone keep their raw scores).

The last section restates the official evaluation (collaborative-experts / QB-Norm `metric.py`:
t2v_metrics, v2t_metrics, cols2metrics) as per-query float ranks and the metrics built from them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.stats
from scipy.special import logsumexp

# Every method the package implements (tests/test_reference_sinkhorn.py checks the registry has no other)
METHODS = ("none", "is", "dis", "csls", "nnn", "gc", "dual-is", "dual-dis", "sn", "dbsn", "dn", "ls", "nicdm", "mp",
           "dsl")


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


# -- Sinkhorn normalisation -------------------------------------------------------------------------
#
# Entropic optimal transport between the gallery items (rows j, mass 1/n_g each) and the bank
# queries (columns b, mass 1/n_b each) with kernel K[j, b] = exp(β·P[b, j]), i.e. POT's cost
# M = −P at reg = 1/β (the DBSN code's M = 1 − P only multiplies K by e^{−β}, which v absorbs:
# log u is the same). The coupling is π[j, b] = u_j·K[j, b]·v_b. Everything is in log space, so no
# kernel entry ever underflows, whatever β.


class SinkhornResult(NamedTuple):
    log_u: np.ndarray        # (n_rows,) log row scalings: the gallery items (and the gallery bank for DBSN)
    log_v: np.ndarray        # (n_b,) log column scalings: the bank queries
    iterations: int          # full (v, u) updates done
    change: float            # max |Δ log u|, |Δ log v| of the last iteration (inf when none was done)
    marginal_error: float    # max |π marginal − uniform| over both marginals, at (log_u, log_v)


def sinkhorn_log_v(K_log, log_u) -> np.ndarray:
    """log v_b = −log n_b − LSE_j(K_log[b, j] + log u_j), K_log = β·P (n_b × n_rows)."""
    K_log = _f64(K_log)
    return -np.log(K_log.shape[0]) - logsumexp(K_log + _f64(log_u)[None, :], axis=1)


def sinkhorn_log_u(K_log, log_v) -> np.ndarray:
    """log u_j = −log n_rows − LSE_b(K_log[b, j] + log v_b), K_log = β·P (n_b × n_rows)."""
    K_log = _f64(K_log)
    return -np.log(K_log.shape[1]) - logsumexp(K_log + _f64(log_v)[:, None], axis=0)


def sinkhorn_coupling(K_log, log_u, log_v) -> np.ndarray:
    """π as an (n_b × n_rows) matrix: π[b, j] = exp(K_log[b, j] + log u_j + log v_b)."""
    return np.exp(_f64(K_log) + _f64(log_u)[None, :] + _f64(log_v)[:, None])


def sinkhorn_marginal_error(K_log, log_u, log_v) -> float:
    """max over both marginals of |Σ π − 1/n|: rows (gallery) sum over b, columns (bank) over j."""
    pi = sinkhorn_coupling(K_log, log_u, log_v)
    n_b, n_rows = pi.shape
    return float(max(np.abs(pi.sum(axis=0) - 1 / n_rows).max(), np.abs(pi.sum(axis=1) - 1 / n_b).max()))


def _sinkhorn_scalings(K_log, iters: int | None, tol: float, max_iters: int) -> SinkhornResult:
    """POT sinkhorn_knopp's order in log space: u = v = uniform, then per iteration v, then u.

    iters=N: exactly N iterations, no stopping test (N=0 leaves u uniform: raw scores).
    iters=None: iterate until max(|Δ log u|, |Δ log v|) < tol; RuntimeError after max_iters.
    """
    K_log = _f64(K_log)
    n_b, n_rows = K_log.shape
    log_u = np.full(n_rows, -np.log(n_rows))
    log_v = np.full(n_b, -np.log(n_b))
    change = np.inf
    limit = max_iters if iters is None else iters
    done = 0
    while done < limit:
        new_v = sinkhorn_log_v(K_log, log_u)
        new_u = sinkhorn_log_u(K_log, new_v)
        change = float(max(np.abs(new_v - log_v).max(), np.abs(new_u - log_u).max()))
        log_u, log_v = new_u, new_v
        done += 1
        if iters is None and change < tol:
            break
    else:
        if iters is None:
            raise RuntimeError(f"Sinkhorn did not reach change < {tol} in {max_iters} iterations (last {change})")
    return SinkhornResult(log_u, log_v, done, change, sinkhorn_marginal_error(K_log, log_u, log_v))


def sinkhorn(P, beta: float, iters: int | None = None, tol: float = 1e-10, max_iters: int = 100_000) -> SinkhornResult:
    """Sinkhorn scalings of the gallery items against the bank queries (Pan et al., ACM MM 2025, SN).

    Rows j = gallery items (marginal 1/n_g), columns b = bank queries (1/n_b), kernel exp(β·P[b, j]).
    log_u has one entry per gallery item.
    """
    return _sinkhorn_scalings(beta * _f64(P), iters, tol, max_iters)


def dual_bank_sinkhorn(P, PB, beta: float, iters: int | None = None, tol: float = 1e-10,
                       max_iters: int = 100_000) -> SinkhornResult:
    """Dual-bank Sinkhorn (Pan et al., ACM MM 2025, DBSN): the rows are the test gallery AND the gallery bank.

    P is bank × gallery (n_b × n_g), PB is bank × gallery-bank (n_b × n_gb): the row set is G ∪ GB
    with ONE uniform marginal 1/(n_g + n_gb) over all of it, the columns the bank queries (1/n_b).
    log_u has n_g + n_gb entries, the test gallery's first.
    """
    P, PB = _f64(P), _f64(PB)
    if P.shape[0] != PB.shape[0]:
        raise ValueError(f"P and PB need the same bank rows, got {P.shape[0]} and {PB.shape[0]}")
    return _sinkhorn_scalings(beta * np.concatenate([P, PB], axis=1), iters, tol, max_iters)


def sinkhorn_normalisation(S, P, beta: float, iters: int | None = None, tol: float = 1e-10):
    """SN: η[q, j] = β·S[q, j] + log u_j with u from sinkhorn(P, β)."""
    S = _f64(S)
    log_u = sinkhorn(P, beta, iters, tol).log_u
    return beta * S + log_u[None, :], np.ones(len(S), dtype=bool)


def dual_bank_sinkhorn_normalisation(S, P, PB, beta: float, iters: int | None = None, tol: float = 1e-10):
    """DBSN: η[q, j] = β·S[q, j] + log u_j, u the test gallery's part of dual_bank_sinkhorn(P, PB, β)."""
    S = _f64(S)
    log_u = dual_bank_sinkhorn(P, PB, beta, iters, tol).log_u[:S.shape[1]]
    return beta * S + log_u[None, :], np.ones(len(S), dtype=bool)


def distribution_normalisation(S, P, lam: float = 0.25):
    """DN (Zhou et al., NeurIPS 2023), the query bank standing in for the test queries.

    S[q, j] − λ·μ_QB·g_j with μ_QB the mean bank embedding; from P that is the column mean
    mean_b P[b, j] (P[b, j] = qb_b·g_j, so mean_b P[b, j] = μ_QB·g_j).
    """
    S = _f64(S)
    return S - lam * _f64(P).mean(axis=0)[None, :], np.ones(len(S), dtype=bool)


# --- the classic hubness reducers (Schnitzer et al. JMLR 2012; Jégou et al. CVPR 2007; Hara et al.
# AAAI 2015, 2016), the query bank standing in for the test queries on the item side. Each returns a
# similarity (higher is better): the negated distance where the paper defines a distance.

def distance(S) -> np.ndarray:
    """d = √(2 − 2s) of cosine similarities of L2-normalised vectors."""
    return np.sqrt(np.maximum(2.0 - 2.0 * _f64(S), 0.0))


def kth_largest(values, k: int, axis: int) -> np.ndarray:
    """The k-th largest value along `axis` (the smallest when fewer than k exist)."""
    ordered = -np.sort(-_f64(values), axis=axis)
    k = min(k, ordered.shape[axis])
    return np.take(ordered, k - 1, axis=axis)


def mean_distance_nearest(values, k: int, axis: int) -> np.ndarray:
    """Mean distance √(2 − 2s) to the k most similar along `axis`."""
    ordered = -np.sort(-_f64(values), axis=axis)
    k = min(k, ordered.shape[axis])
    return distance(np.take(ordered, np.arange(k), axis=axis)).mean(axis=axis)


def local_scaling(S, P, K: int = 10):
    """exp(−d²/(σ_q σ_j)) = 1 − LS (Schnitzer et al. 2012, Eq. 4): σ_j the distance of item j to its
    K-th nearest bank query, σ_q that of the query to its K-th nearest gallery item."""
    sigma_j = distance(kth_largest(P, K, axis=0))
    sigma_q = distance(kth_largest(S, K, axis=1))
    return np.exp(-distance(S) ** 2 / (sigma_q[:, None] * sigma_j[None, :])), np.ones(len(S), dtype=bool)


def nicdm(S, P, K: int = 10):
    """−d/√(μ_q μ_j) (Jégou et al. 2007): μ the mean distance to the K nearest on the other side."""
    mu_j = mean_distance_nearest(P, K, axis=0)
    mu_q = mean_distance_nearest(S, K, axis=1)
    return -distance(S) / np.sqrt(mu_q[:, None] * mu_j[None, :]), np.ones(len(S), dtype=bool)


def mutual_proximity(S, P, kind: str = "gauss"):
    """Mutual Proximity (Schnitzer et al. 2012) on similarities, the log of the probability that s
    beats a random score of q (over the gallery) and, independently, one of j (over the bank):
    gauss: Φ((s − μ_q)/σ_q)·Φ((s − μ_j)/σ_j) with population means and stds; empiric: the shares of
    strictly smaller scores, counted one by one."""
    S, P = _f64(S), _f64(P)
    if kind == "gauss":
        mu_q, sd_q = S.mean(axis=1), S.std(axis=1)
        mu_j, sd_j = P.mean(axis=0), P.std(axis=0)
        out = scipy.stats.norm.logcdf((S - mu_q[:, None]) / sd_q[:, None]) + \
            scipy.stats.norm.logcdf((S - mu_j[None, :]) / sd_j[None, :])
        return out, np.ones(len(S), dtype=bool)
    out = np.empty(S.shape)
    for q in range(S.shape[0]):
        for j in range(S.shape[1]):
            s = S[q, j]
            out[q, j] = np.mean(S[q] < s) * np.mean(P[:, j] < s)
    return out, np.ones(len(S), dtype=bool)


def dissim_local(queries, gallery, bank, K: int = 10):
    """−DisSimLocal (Hara et al. 2016): −(‖q − g‖² − ‖q − c_K(q)‖² − ‖g − c_K(g)‖²) for L2-normalised
    embeddings, c_K(g) the centroid of g's K nearest bank queries, c_K(q) of q's K nearest gallery
    items (nearest: the highest cosine, ties towards the lower index)."""
    unit = lambda x: _f64(x) / np.linalg.norm(_f64(x), axis=1, keepdims=True)
    Q, G, B = unit(queries), unit(gallery), unit(bank)
    near_g = np.argsort(-(G @ B.T), axis=1, kind="stable")[:, :K]
    near_q = np.argsort(-(Q @ G.T), axis=1, kind="stable")[:, :K]
    c_g, c_q = B[near_g].mean(axis=1), G[near_q].mean(axis=1)
    d2 = ((Q[:, None, :] - G[None, :, :]) ** 2).sum(axis=2)
    out = -(d2 - ((Q - c_q) ** 2).sum(axis=1)[:, None] - ((G - c_g) ** 2).sum(axis=1)[None, :])
    return out, np.ones(len(Q), dtype=bool)


def localized_centering(S, P, K: int, gamma: float):
    """S − b_j^γ (Hara et al., AAAI 2015), b_j the mean of the K largest bank scores of j (as a
    signed power: sign(b)·|b|^γ)."""
    b = column_mean_top(P, K)
    return _f64(S) - (np.sign(b) * np.abs(b) ** gamma)[None, :], np.ones(len(S), dtype=bool)


def normalise(method: str, S, P, H=None, *, beta: float = 20.0, gallery_beta: float = 1.0, k: int = 1,
              topk_mean: int | None = None, alpha: float = 0.75, min_count: int = 1, lam: float = 0.25,
              PB=None, iters: int | None = None, tol: float = 1e-10):
    """Dispatch by method name with qbnorm's defaults (csls K=10, nnn k=128).

    min_count: θ of dis / dual-dis; lam: λ of dn; PB (bank × gallery-bank), iters, tol: sn / dbsn.
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
    if method == "sn":
        return sinkhorn_normalisation(S, P, beta, iters, tol)
    if method == "dbsn":
        if PB is None:
            raise ValueError("dbsn needs PB, the bank × gallery-bank scores")
        return dual_bank_sinkhorn_normalisation(S, P, PB, beta, iters, tol)
    if method == "dn":
        return distribution_normalisation(S, P, lam)
    if method == "ls":
        return local_scaling(S, P, topk_mean or 10)
    if method == "nicdm":
        return nicdm(S, P, topk_mean or 10)
    if method == "mp":
        return mutual_proximity(S, P)
    raise ValueError(method)


def top_n(scores, n: int):
    """(values, indices) of the n best items per row, best first, ties towards the lower index."""
    scores = _f64(scores)
    idx = row_top(scores, n)
    return np.take_along_axis(scores, idx, axis=1), idx


# --------------------------------------------------------------------------------------------------
# The official metric.py protocol
# --------------------------------------------------------------------------------------------------
# What collaborative-experts' `model/metric.py`, as shipped by QB-Norm (ioanacroi/qb-norm metric.py),
# computes, restated from its definitions. Its input is a similarity matrix `sims` in the "t2v layout":
# rows = queries (captions), columns = items (videos); distances are d = −sims.
#
#   position(v, row)  the mean of the 0-based positions p with sorted(row)[p] − v == 0 ("averaging"
#                     break_ties): #entries of the row strictly below v + (#entries equal to v − 1)/2.
#                     Equality is exact float equality (an infinite v is never found, as inf − inf
#                     is nan).
#   t2v rank of q     position(d[q, gt[q]], d[q, :]), the best over several relevant items; metric.py
#                     itself knows only the contiguous layout gt[q] = q // (Q // G) with Q = G·(Q // G).
#                     Masked queries are dropped from the ranks (and from the count).
#   v2t rank of i     over the transposed rows D = d.T (items × captions): masked captions get the
#                     distance MISSING_VAL in every row, then rank(i) = min over the unmasked captions c
#                     of item i of position(D[i, c], D[i, :]); inf when item i has none. Its own other
#                     captions compete, so two of its captions tied at the top each sit at 0.5.
#                     metric.py's captions of item i are the contiguous c in [i·cpv, (i+1)·cpv) with
#                     cpv = C // G; with a general gt they are the captions q with gt[q] == i.
#                     Every item counts, masked or not.
#   metrics           R@K = 100·#(rank == 0)/n for K = 1 (a rank of 0.5 is a miss), 100·#(rank < K)/n
#                     for K = 5, 10, 50; MdR = median + 1; MnR = mean + 1; GeomR = geometric mean of the
#                     unrounded R@1, R@5, R@10. metric.py then rounds every figure to one decimal.

MISSING_VAL = 1e8


def _tie_averaged_position(value: float, ordered: np.ndarray) -> float:
    """Mean 0-based position of `value` in the sorted row `ordered`, by exact equality; nan if absent."""
    with np.errstate(invalid="ignore"):   # inf − inf
        positions = np.flatnonzero(ordered - value == 0)
    return float(positions.mean()) if positions.size else float("nan")


def _official_relevant(gt, n_queries: int, n_items: int) -> np.ndarray:
    """(Q, m) ground truth, −1 padded; None means metric.py's contiguous layout q // (Q // G)."""
    if gt is None:
        per_item = n_queries // n_items
        if per_item == 0 or per_item * n_items != n_queries:
            raise ValueError(f"contiguous layout needs Q a multiple of G, got {n_queries} × {n_items}")
        return (np.arange(n_queries) // per_item)[:, None]
    gt = np.asarray(gt, dtype=np.int64)
    return gt.reshape(n_queries, -1)


def official_ranks_t2v(sims, query_masks=None, gt=None) -> np.ndarray:
    """t2v_metrics' float 0-based rank of every unmasked query row of `sims` (queries × items)."""
    dists = -_f64(sims)
    n_queries, n_items = dists.shape
    relevant = _official_relevant(gt, n_queries, n_items)
    ranks = np.full(n_queries, np.inf)
    for q in range(n_queries):
        ordered = np.sort(dists[q])
        for j in relevant[q]:
            if j < 0:
                continue
            position = _tie_averaged_position(dists[q, j], ordered)
            if np.isnan(position):
                raise ValueError(f"query {q}: ground-truth distance not found (metric.py asserts here)")
            ranks[q] = min(ranks[q], position)
    if query_masks is not None:
        ranks = ranks[np.asarray(query_masks).reshape(-1).astype(bool)]
    return ranks


def official_ranks_v2t(sims, query_masks=None, gt=None) -> np.ndarray:
    """v2t_metrics' float 0-based rank of every item (column of `sims`, queries × items)."""
    dists = -_f64(sims).T
    n_items, n_caps = dists.shape
    captions_of: list[list[int]] = [[] for _ in range(n_items)]
    if gt is None:
        per_item = n_caps // n_items
        for i in range(n_items):
            captions_of[i] = list(range(i * per_item, (i + 1) * per_item))
    else:
        relevant = np.asarray(gt, dtype=np.int64).reshape(n_caps, -1)
        for c in range(n_caps):
            for i in relevant[c]:
                if i >= 0:
                    captions_of[i].append(c)
    kept = np.ones(n_caps, dtype=bool) if query_masks is None else np.asarray(query_masks).reshape(-1).astype(bool)
    ranks = np.full(n_items, np.inf)
    for i in range(n_items):
        row = dists[i].copy()
        row[~kept] = MISSING_VAL
        ordered = np.sort(row)
        for c in captions_of[i]:
            if row[c] == MISSING_VAL:
                continue
            position = _tie_averaged_position(row[c], ordered)
            if not np.isnan(position):
                ranks[i] = min(ranks[i], position)
    return ranks


def official_metrics(ranks, num_queries: int | None = None) -> dict:
    """cols2metrics before its rounding: R@1 (rank == 0), R@5/10/50 (rank < K), MdR, MnR, GeomR."""
    ranks = _f64(ranks)
    n = ranks.size if num_queries is None else num_queries
    out = {"R@1": 100.0 * np.count_nonzero(ranks == 0) / n}
    for k in (5, 10, 50):
        out[f"R@{k}"] = 100.0 * np.count_nonzero(ranks < k) / n
    out["MdR"] = float(np.median(ranks)) + 1.0
    out["MnR"] = float(np.mean(ranks)) + 1.0
    with np.errstate(divide="ignore"):   # metric.py's own call; a zero recall gives 0
        out["GeomR"] = float(scipy.stats.mstats.gmean([out["R@1"], out["R@5"], out["R@10"]]))
    return out


def official_rounded(metrics: dict, numpy_recalls: bool = False) -> dict:
    """cols2metrics' final round(x, 1). Python's round is exact for Python floats (the recalls) but
    numpy's round(np.float64) is rint(10·x)/10 (MdR, MnR, GeomR; the recalls too when metric.py
    divided by a numpy count, as t2v does with query masks): 38.15 → 38.1 vs 38.2."""
    out = {}
    for name, value in metrics.items():
        numpy_round = name in ("MdR", "MnR", "GeomR") or numpy_recalls
        out[name] = float(np.round(value, 1)) if numpy_round else round(float(value), 1)
    return out


def expected_tie_hits(row, relevant, k: int) -> float:
    """P(a relevant item is among the first k) over every order of `row` that sorts its scores
    descending, ties in any order (McSherry & Najork 2008): by enumeration, for short rows."""
    import itertools

    row = _f64(row)
    relevant = {int(j) for j in np.atleast_1d(relevant) if j >= 0}
    orders = [p for p in itertools.permutations(range(row.size)) if np.all(np.diff(row[list(p)]) <= 0)]
    return float(np.mean([any(j in relevant for j in p[:k]) for p in orders]))


# --------------------------------------------------------------------------------------------------
# Hubness measures (Radovanović et al., JMLR 2010; scikit-hubness / kiez `analysis.estimation`)
# --------------------------------------------------------------------------------------------------
#   N_k(j)            #queries with item j among their k best (stable sort: ties towards the lower index)
#   μ                 k·Q/G, the mean N_k (every query fills k slots)
#   hub               N_k(j) ≥ 2·μ (the peers' hub_size·k with hub_size 2 and Q = G, where μ = k)
#   hub occurrence    Σ_{hubs} N_k / (k·Q): the share of all k·Q neighbour slots taken by hubs
#   anti-hub          N_k(j) = 0; anti-hub occurrence: the share of items that are anti-hubs
#   truncnorm skew.   E[X³] for X a standard normal truncated to [−μ̂/s, ∞), μ̂ and s (ddof 1) of N_k


def k_occurrence(S, k: int) -> np.ndarray:
    """N_k of a dense query × gallery score matrix."""
    S = _f64(S)
    counts = np.zeros(S.shape[1], dtype=np.int64)
    for j in row_top(S, k).ravel():
        counts[j] += 1
    return counts


def hub_occurrence(nk, k: int, n_queries: int, hub_size: float = 2.0) -> float:
    """Σ N_k over items with N_k ≥ hub_size·k·Q/G, over the k·Q slots, by a loop over the items."""
    n_items = len(nk)
    threshold = hub_size * k * n_queries / n_items
    return sum(int(v) for v in nk if v >= threshold) / (k * n_queries)


def antihub_occurrence(nk) -> float:
    return sum(1 for v in nk if v == 0) / len(nk)


def skewness_truncnorm(nk) -> tuple[float, float]:
    """∫_a^∞ x³ φ(x) dx / ∫_a^∞ φ(x) dx by quadrature, a = −mean/std(ddof=1), and the bound on its
    error that follows from quad's error estimates of the two integrals."""
    from scipy import integrate

    x = _f64(nk)
    a = -x.mean() / x.std(ddof=1)
    phi = scipy.stats.norm.pdf
    mass, mass_err = integrate.quad(phi, a, np.inf, epsabs=1e-14, epsrel=1e-12)
    third, third_err = integrate.quad(lambda t: t**3 * phi(t), a, np.inf, epsabs=1e-12, epsrel=1e-12)
    return third / mass, third_err / mass + abs(third) * mass_err / mass**2
