"""Retrieval metrics under the collaborative-experts / QB-Norm `metric.py` protocol, pure numpy.

The 0-based rank of a query is the number of gallery scores strictly greater than its ground
truth's, plus half the number of other items tied with it (ties averaged; an all-equal row of G
items gives (G − 1)/2). With several relevant items, a query's rank is the best over them.
R@K = 100·mean(rank < K); MdR = median(rank) + 1; MnR = mean(rank) + 1; GeomR = geometric mean
of R@1, R@5, R@10.

Sources: collaborative-experts `model/metric.py` (Liu et al., BMVC 2019; `t2v_metrics`, which
averages tied positions) as reused by QB-Norm (Bogolin et al., CVPR 2022, `metric.py`).

From a ranking file (each query's top N only) a rank is either exact (ground truth in the list)
or only bounded below (ground truth not in the list: rank ≥ N). Such right-censored ranks give
R@K exactly for K ≤ N, MdR only when more than half of the queries are known within the list, and
no MnR; `summarise` returns None for every figure it cannot know and says which are exact.
"""

from __future__ import annotations

import numpy as np

RECALL_KS = (1, 5, 10, 50)
METRIC_NAMES = (*(f"R@{k}" for k in RECALL_KS), "MdR", "MnR", "GeomR")
LOWER_IS_BETTER = ("MdR", "MnR")
PROTOCOL = ("collaborative-experts/QB-Norm metric.py: rank = #scores strictly greater than the "
            "ground truth's + half the other ties; best rank over multiple relevant items")


def ranks(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """0-based tie-averaged ranks for dense score rows; `relevant` is (Q,) or (Q, m) with −1 padding."""
    scores = np.asarray(scores)
    relevant = np.asarray(relevant).reshape(len(scores), -1)
    best = np.full(len(scores), np.inf)
    for col in range(relevant.shape[1]):
        item = relevant[:, col]
        valid = item >= 0
        if not valid.any():
            continue
        rows = np.nonzero(valid)[0]
        target = scores[rows, item[valid]][:, None]
        greater = (scores[rows] > target).sum(axis=1)
        ties = (scores[rows] == target).sum(axis=1) - 1
        best[rows] = np.minimum(best[rows], greater + 0.5 * ties)
    return best


def topn_ranks(neighbors: np.ndarray, scores: np.ndarray, relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranks from top-N lists: (rank, censored), censored meaning "true rank ≥ rank, unknown".

    `neighbors` (Q, N) holds gallery indices best first (−1 for an empty slot), `scores` (Q, N)
    their scores. A relevant item at list position p has the same tie-averaged rank as in `ranks`,
    computed over the list: #listed scores strictly greater + half the other listed ties. Items
    outside a list are taken to score below all of it (a top-N list says nothing more), so a
    relevant item missing from the list has rank ≥ N: censored at N. With several relevant items
    the best rank wins; a query is censored only when none of its relevant items is listed.
    """
    neighbors = np.asarray(neighbors)
    scores = np.asarray(scores, dtype=np.float64)
    q, n = neighbors.shape
    relevant = np.asarray(relevant).reshape(q, -1)
    filled = neighbors >= 0
    listed_scores = np.where(filled, scores, -np.inf)
    best = np.full(q, np.inf)
    censored = np.zeros(q, dtype=bool)
    for col in range(relevant.shape[1]):
        item = relevant[:, col]
        hit = (neighbors == item[:, None]) & filled & (item[:, None] >= 0)
        found = hit.any(axis=1)
        target = scores[np.arange(q), np.argmax(hit, axis=1)][:, None]
        greater = (listed_scores > target).sum(axis=1)
        ties = ((listed_scores == target) & filled).sum(axis=1) - 1
        rank = np.where(found, greater + 0.5 * ties, np.where(item >= 0, float(n), np.inf))
        # Found ranks are < N, so an exact rank always beats the bound N of an unlisted item.
        better = rank < best
        best = np.where(better, rank, best)
        censored = np.where(better, ~found, censored)
    return best, censored


def recall_summary(rank: np.ndarray, ks=RECALL_KS) -> dict:
    """R@K, MdR, MnR and GeomR from exact 0-based ranks."""
    rank = np.asarray(rank, dtype=np.float64)
    out = {f"R@{k}": 100.0 * float(np.mean(rank < k)) for k in ks}
    out["MdR"] = float(np.median(rank)) + 1.0
    out["MnR"] = float(np.mean(rank)) + 1.0
    out["GeomR"] = geometric_recall(out)
    return out


def geometric_recall(summary: dict) -> float:
    values = [summary["R@1"], summary["R@5"], summary["R@10"]]
    return float(np.prod(values) ** (1.0 / 3.0))


def censored_median(rank: np.ndarray, censored: np.ndarray) -> float | None:
    """median(rank) when it is determined although some ranks are only lower bounds, else None.

    Exact ranks no larger than every censored bound are certainly the smallest values, in order;
    the median (numpy's: mean of the two middle values for an even count) is known when those
    cover its order statistics, i.e. when more than half of the ranks are such exact values.
    """
    rank = np.asarray(rank, dtype=np.float64)
    censored = np.asarray(censored, dtype=bool)
    if not censored.any():
        return float(np.median(rank))
    floor = rank[censored].min()
    sure = np.sort(rank[~censored & (rank <= floor)])
    n = rank.size
    if sure.size < n // 2 + 1:
        return None
    if n % 2:
        return float(sure[n // 2])
    return float((sure[n // 2 - 1] + sure[n // 2]) / 2)


def summarise(rank: np.ndarray, censored: np.ndarray | None = None, ks=RECALL_KS) -> dict:
    """Every metric, its exactness, and lower bounds where only a bound is known.

    Returns {"metrics": {name: value or None}, "exact": {name: bool},
    "bounds": {name: [low, high]} for the unknown figures}. With no censored rank this is
    `recall_summary` with every figure exact.
    """
    rank = np.asarray(rank, dtype=np.float64)
    censored = np.zeros(rank.shape, dtype=bool) if censored is None else np.asarray(censored, dtype=bool)
    n = rank.size
    values: dict[str, float | None] = {}
    bounds: dict[str, list] = {}
    for k in ks:
        hits = int(np.sum(~censored & (rank < k)))
        unsure = int(np.sum(censored & (rank < k)))
        name = f"R@{k}"
        if unsure:
            values[name] = None
            bounds[name] = [100.0 * hits / n, 100.0 * (hits + unsure) / n]
        else:
            values[name] = 100.0 * hits / n
    median = censored_median(rank, censored)
    values["MdR"] = None if median is None else median + 1.0
    if median is None:
        bounds["MdR"] = [float(np.median(rank)) + 1.0, None]
    if censored.any():
        values["MnR"] = None
        bounds["MnR"] = [float(np.mean(rank)) + 1.0, None]
    else:
        values["MnR"] = float(np.mean(rank)) + 1.0
    geo = [values.get(f"R@{k}") for k in (1, 5, 10)]
    values["GeomR"] = None if any(v is None for v in geo) else geometric_recall(values)
    exact = {name: value is not None for name, value in values.items()}
    return {"metrics": values, "exact": exact, "bounds": bounds}


def contiguous_relevant(n_queries: int, per_item: int) -> np.ndarray:
    """Ground truth of the contiguous layout: query i ↔ item i // per_item (MSR-VTT: 20 captions)."""
    return (np.arange(n_queries, dtype=np.int64) // per_item)[:, None]


def as_relevant(gt: np.ndarray) -> np.ndarray:
    """(Q,) or (Q, m) ground truth as a (Q, m) int64 array (−1 pads multi-positive rows)."""
    gt = np.asarray(gt)
    if gt.ndim == 1:
        gt = gt[:, None]
    return gt.astype(np.int64, copy=False)


def difference(first: dict, last: dict) -> dict:
    """last − first for every metric both know (None where either is unknown)."""
    return {m: (None if first[m] is None or last[m] is None else last[m] - first[m]) for m in METRIC_NAMES}


def check_gates(results: list[dict], gates) -> tuple[list[dict], list[str]]:
    """Each (metric, threshold) gate against each named result: (checks, failure messages). A
    metric is worse below its threshold (above for the rank metrics); an unknown one fails."""
    checks, failures = [], []
    for res in results:
        for metric, threshold in gates:
            value = res["metrics"][metric]
            worse = value is None or (value > threshold if metric in LOWER_IS_BETTER else value < threshold)
            checks.append({"input": res["name"], "metric": metric, "value": value, "threshold": threshold,
                           "passed": not worse})
            if value is None:
                failures.append(f"{res['name']}: {metric} is unknown (only the top {res['listed']} is listed), "
                                f"threshold {threshold:g}")
            elif worse:
                relation = "above" if metric in LOWER_IS_BETTER else "below"
                failures.append(f"{res['name']}: {metric} {value:.2f} is {relation} the threshold {threshold:g}")
    return checks, failures
