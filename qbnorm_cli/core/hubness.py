"""Hubness measures of a k-occurrence distribution, pure numpy.

N_k(j) = how many queries have gallery item j among their k highest scores (Radovanović et al.,
"Hubs in space", JMLR 2010). The measures follow scikit-hubness (`skhubness.analysis`, Feldbauer
et al., 2018/2020; kiez.analysis copies them) and the QB-Norm paper's hubness section:

  k-skewness       E[(N_k − μ)³] / σ³, the biased moment estimator (scipy.stats.skew, bias=True)
  truncnorm skew.  E[X³] of a standard normal truncated below at a = −μ/s (s: ddof = 1), the
                   peers' k_skewness_truncnorm (stats.truncnorm(a, ∞).moment(3)) in closed form
                   (a² + 2)·φ(a)/(1 − Φ(a)): a monotone function of s/μ in [0, 4/√(2π))
  Robin Hood       Σ_j |N_k(j) − μ| / (2 Σ_j N_k(j)): half the relative mean absolute deviation
  Gini             Σ_i Σ_j |N_k(i) − N_k(j)| / (2 n² μ), via its sorted O(n log n) form
  Atkinson (ε)     1 − (1/μ)·(mean N_k^{1−ε})^{1/(1−ε)}  (ε = 1: 1 − geometric mean / μ)
  anti-hub rate    100·share of items with N_k = 0 (the peers' antihub_occurrence, in %)
  hub occurrence   100·Σ_{hubs} N_k / (k·Q), hubs = items with N_k ≥ 2μ (the peers' hub_occurrence)
  groupie ratio    max N_k / (k·Q)
with μ = k·Q/n the mean of N_k over the n gallery items and Q the number of queries.

The hub threshold is HUB_SIZE times the mean k-occurrence μ = k·Q/n. The peers write it 2k, which
is the same when queries and items are one set (Q = n, μ = k); for a query set Q of another size
than the gallery, 2k is no longer "twice the average": with 5,000 queries and 1,000 items μ = 50
and nearly every item would be a hub. Anti-hubs (N_k = 0) need no scale.
"""

from __future__ import annotations

import math

import numpy as np

HUB_SIZE = 2.0
ATKINSON_EPS = 0.5
TOP_ITEMS = 10


def k_occurrence(neighbors: np.ndarray, k: int, n_items: int) -> np.ndarray:
    """N_k over `n_items` from each query's neighbours, best first (−1 marks an empty slot)."""
    top = np.asarray(neighbors)[:, :k].ravel()
    return np.bincount(top[top >= 0], minlength=n_items).astype(np.int64)


def distribution(nk: np.ndarray) -> dict:
    """The k-occurrence distribution: each value N_k takes and how many items take it, ascending
    (what hubness papers plot on log axes, Radovanović et al. 2010, Fig. 1)."""
    counts = np.bincount(np.asarray(nk, dtype=np.int64))
    values = np.flatnonzero(counts)
    return {"nk": values.tolist(), "items": counts[values].tolist()}


def skewness(nk: np.ndarray) -> float:
    """k-skewness m₃ / m₂^{3/2} with central moments mᵢ = mean((N_k − μ)ⁱ): the biased estimator of
    scipy.stats.skew(bias=True), written out because importing scipy.stats costs every command
    0.7 s of start-up (tests/test_hubness.py checks the two agree). Constant N_k gives 0."""
    nk = np.asarray(nk, dtype=np.float64)
    if np.all(nk == nk[0]):
        return 0.0
    deviation = nk - nk.mean()
    m2 = np.mean(deviation**2)
    return float(np.mean(deviation**3) / m2**1.5)


def skewness_truncnorm(nk: np.ndarray) -> float:
    """scikit-hubness's and kiez's k_skewness_truncnorm: the third raw moment E[X³] of a standard
    normal truncated to [a, ∞), a = −μ/s, s the sample standard deviation (ddof = 1) of N_k. For a
    one-sided truncation E[X³] = 2·E[X] + a²·λ = (a² + 2)·λ with λ = φ(a)/(1 − Φ(a)) (the inverse Mills
    ratio; Johnson, Kotz & Balakrishnan, Continuous Univariate Distributions 1, 1994, §10.1). It
    grows with s/μ, from 0 (equal N_k, a → −∞) towards 4/√(2π) ≈ 1.596 (a → 0); a ≤ 0, so
    1 − Φ(a) ≥ ½ and nothing cancels."""
    nk = np.asarray(nk, dtype=np.float64)
    if nk.size < 2 or np.all(nk == nk[0]):
        return 0.0
    a = -float(nk.mean()) / float(nk.std(ddof=1))
    density = math.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
    upper_tail = 0.5 * math.erfc(a / math.sqrt(2.0))
    return (a * a + 2.0) * density / upper_tail


def robin_hood(nk: np.ndarray) -> float:
    """Robin Hood (Hoover) index: the share of occurrences to move to make N_k uniform."""
    nk = np.asarray(nk, dtype=np.float64)
    total = nk.sum()
    return float(np.abs(nk - nk.mean()).sum() / (2.0 * total)) if total > 0 else 0.0


def gini(nk: np.ndarray) -> float:
    """Gini index, Σ_i (2i − n − 1)·x_(i) / (n Σ x) over the sorted values (i = 1..n)."""
    x = np.sort(np.asarray(nk, dtype=np.float64))
    n, total = x.size, x.sum()
    if total <= 0:
        return 0.0
    weights = 2.0 * np.arange(1, n + 1) - n - 1
    return float((weights * x).sum() / (n * total))


def atkinson(nk: np.ndarray, eps: float = ATKINSON_EPS) -> float:
    """Atkinson index with inequality aversion ε (0 = equal, towards 1 = concentrated)."""
    x = np.asarray(nk, dtype=np.float64)
    mean = x.mean()
    if mean <= 0:
        return 0.0
    if eps == 1.0:
        if np.any(x == 0):
            return 1.0
        term = float(np.exp(np.mean(np.log(x))))
    else:
        term = float(np.mean(x ** (1.0 - eps)) ** (1.0 / (1.0 - eps)))
    return float(1.0 - term / mean)


def antihub_rate(nk: np.ndarray) -> float:
    """Percentage of items that no query retrieves among its top k."""
    return 100.0 * float(np.mean(np.asarray(nk) == 0))


def mean_occurrence(k: int, n_queries: int, n_items: int) -> float:
    """μ = k·Q/n, the mean of N_k when every query fills its k slots: the unit of the hub threshold."""
    return k * n_queries / n_items


def hub_threshold(k: int, n_queries: int, n_items: int, hub_size: float = HUB_SIZE) -> float:
    """N_k from which an item is a hub: hub_size times the mean k-occurrence k·Q/n (2k when Q = n)."""
    return hub_size * mean_occurrence(k, n_queries, n_items)


def hub_count(nk: np.ndarray, k: int, n_queries: int, hub_size: float = HUB_SIZE) -> int:
    """How many items are hubs (N_k ≥ hub_threshold)."""
    nk = np.asarray(nk)
    return int(np.sum(nk >= hub_threshold(k, n_queries, nk.size, hub_size)))


def hub_occurrence(nk: np.ndarray, k: int, n_queries: int, hub_size: float = HUB_SIZE) -> float:
    """Percentage of the k·Q neighbour slots taken by hubs (items with N_k ≥ hub_size·k·Q/n)."""
    nk = np.asarray(nk)
    return 100.0 * float(nk[nk >= hub_threshold(k, n_queries, nk.size, hub_size)].sum()) / (k * n_queries)


def groupie_ratio(nk: np.ndarray, k: int, n_queries: int) -> float:
    """Share of the k·Q neighbour slots taken by the single most retrieved item."""
    return float(np.max(nk)) / (k * n_queries)


def coverage(nk: np.ndarray) -> float:
    """Percentage of items in the top k of at least one query (100 − anti-hub rate)."""
    return 100.0 * float(np.mean(np.asarray(nk) > 0))


def top_items(nk: np.ndarray, n: int = TOP_ITEMS) -> list[tuple[int, int]]:
    """The n most retrieved items as (index, N_k), most first, ties towards the lower index."""
    nk = np.asarray(nk)
    order = np.lexsort((np.arange(nk.size), -nk))[:n]
    return [(int(j), int(nk[j])) for j in order]


def log_bins(nk: np.ndarray) -> list[tuple[str, int]]:
    """Counts of items per N_k bin: 0, 1, 2–3, 4–7, … (powers of two), as (label, count)."""
    nk = np.asarray(nk, dtype=np.int64)
    top = int(nk.max()) if nk.size else 0
    out = [("0", int(np.sum(nk == 0)))]
    lo = 1
    while lo <= max(top, 1):
        hi = 2 * lo - 1
        label = str(lo) if lo == hi else f"{lo}–{hi}"
        out.append((label, int(np.sum((nk >= lo) & (nk <= hi)))))
        lo *= 2
    return out


def measures(nk: np.ndarray, k: int, n_queries: int) -> dict:
    """All hubness measures of one k-occurrence vector, as plain Python numbers."""
    nk = np.asarray(nk)
    return {
        "k": int(k),
        "queries": int(n_queries),
        "items": int(nk.size),
        "skewness": skewness(nk),
        "skewness_truncnorm": skewness_truncnorm(nk),
        "robin_hood": robin_hood(nk),
        "gini": gini(nk),
        "atkinson": atkinson(nk),
        "antihub_rate_pct": antihub_rate(nk),
        "hub_occurrence_pct": hub_occurrence(nk, k, n_queries),
        "hub_threshold": hub_threshold(k, n_queries, nk.size),
        "hubs": hub_count(nk, k, n_queries),
        "mean_nk": mean_occurrence(k, n_queries, nk.size),
        "groupie_ratio": groupie_ratio(nk, k, n_queries),
        "max_nk": int(np.max(nk)),
        "top_items": [{"item": j, "nk": c} for j, c in top_items(nk)],
    }
