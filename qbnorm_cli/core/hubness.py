"""Hubness measures of a k-occurrence distribution, pure numpy.

N_k(j) = how many queries have gallery item j among their k highest scores (Radovanović et al.,
"Hubs in space", JMLR 2010). The measures follow scikit-hubness (`skhubness.analysis`, Feldbauer
et al., 2018/2020) and the QB-Norm paper's hubness section:

  k-skewness       E[(N_k − μ)³] / σ³, the biased moment estimator (scipy.stats.skew, bias=True)
  Robin Hood       Σ_j |N_k(j) − μ| / (2 Σ_j N_k(j)): half the relative mean absolute deviation
  Gini             Σ_i Σ_j |N_k(i) − N_k(j)| / (2 n² μ), via its sorted O(n log n) form
  Atkinson (ε)     1 − (1/μ)·(mean N_k^{1−ε})^{1/(1−ε)}  (ε = 1: 1 − geometric mean / μ)
  anti-hub rate    100·share of items with N_k = 0
  hub occurrence   100·Σ_{hubs} N_k / (k·Q), hubs = items with N_k ≥ 2k (scikit-hubness hub_size 2)
  groupie ratio    max N_k / (k·Q)
with μ the mean of N_k over the n gallery items and Q the number of queries.
"""

from __future__ import annotations

import numpy as np

HUB_SIZE = 2.0
LOW_COVERAGE_PCT = 50.0  # a bank whose top items cover less of the gallery is worth a warning
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


def hub_occurrence(nk: np.ndarray, k: int, n_queries: int, hub_size: float = HUB_SIZE) -> float:
    """Percentage of the k·Q neighbour slots taken by hubs (items with N_k ≥ hub_size·k)."""
    nk = np.asarray(nk)
    return 100.0 * float(nk[nk >= hub_size * k].sum()) / (k * n_queries)


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
        "robin_hood": robin_hood(nk),
        "gini": gini(nk),
        "atkinson": atkinson(nk),
        "antihub_rate_pct": antihub_rate(nk),
        "hub_occurrence_pct": hub_occurrence(nk, k, n_queries),
        "hub_threshold": HUB_SIZE * k,
        "groupie_ratio": groupie_ratio(nk, k, n_queries),
        "max_nk": int(np.max(nk)),
        "top_items": [{"item": j, "nk": c} for j, c in top_items(nk)],
    }
