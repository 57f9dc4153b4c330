"""Retrieval metrics under the collaborative-experts / QB-Norm `metric.py` protocol, pure numpy.

The 0-based rank of a query is the number of gallery scores strictly greater than its ground
truth's, plus half the number of other items tied with it (ties averaged; an all-equal row of G
items gives (G − 1)/2). With several relevant items, a query's rank is the best over them.
R@K = 100·mean(rank < K); MdR = median(rank) + 1; MnR = mean(rank) + 1; GeomR = geometric mean
of R@1, R@5, R@10.
"""

from __future__ import annotations

import numpy as np

RECALL_KS = (1, 5, 10, 50)
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
