"""Hub scores: how far each gallery item stands above the gallery's typical item, robustly.

A hub score is a robust z-score, (x_j − median x) / (1.4826 · MAD x) (Iglewicz & Hoaglin 1993;
1.4826 makes the MAD a standard deviation for normal data), of a per-item statistic x whose
typical items the hubs cannot move:

* the bank's view (a probe): x_j = LSE_b(β·P[b, j]), the inverted-softmax log-normaliser the probe
  stores (QB-Norm Eq. 3), a soft count of the bank queries near item j. It is not competitive: an
  item's value depends on the bank and the item alone, so a crafted hub that takes every query's
  top slots leaves the others' values, and so the median and MAD, as they were.
* a query view (score or ranking files): x_j = log(1 + N_k(j)), the k-occurrence on a log scale
  (hubness is multiplicative: a long right tail, Radovanović et al. 2010). N_k is competitive:
  hubs that capture most top-k slots push the typical item's N_k down to 0, and the MAD with it,
  so that an item retrieved twice would stand out. The scale is therefore never taken below
  OCCURRENCE_MIN_SCALE (a factor e^0.5 ≈ 1.65 in N_k per unit): below every natural spread
  measured (1.4826·MAD of 0.74–1.30 on Multi30k's views), so honest scores are unchanged.

When the MAD is 0 otherwise (more than half the items share one value), the mean absolute
deviation, × 1.2533 (√(π/2)), stands in for it (the modified z-score of IBM SPSS).

The default alert threshold is chosen from data (docs/security.md): on the honest Multi30k
galleries the largest natural score is 3.6 (bank view at β = 20, N_k at k = 1 and 10), 4.9 at
β = 100; every injected hub of benchmarks/adversarial_hubs.py scores 7.3 or more in the bank view.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_THRESHOLD = 6.0
MAD_TO_SD = 1.4826        # 1 / Φ⁻¹(3/4): the MAD of normal data in standard deviations
MEAN_AD_TO_SD = 1.2533    # √(π/2): the mean absolute deviation of normal data in standard deviations
OCCURRENCE_MIN_SCALE = 0.5  # log units: see above
SPARSE_MEAN_NK = 1.0      # fewer occurrences per item than this: N_k is mostly counting noise


def robust_z(values: np.ndarray, min_scale: float = 0.0) -> np.ndarray:
    """(x − median) / scale, scale = 1.4826·MAD, or 1.2533·mean |x − median| when the MAD is 0
    (more than half the items share one value), and at least `min_scale`; all zeros when every
    value is the same (and there is no minimum)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return x.copy()
    deviation = x - np.median(x)
    scale = MAD_TO_SD * float(np.median(np.abs(deviation)))
    if scale == 0:
        scale = MEAN_AD_TO_SD * float(np.mean(np.abs(deviation)))
    scale = max(scale, min_scale)
    if scale == 0 or not math.isfinite(scale):
        return np.zeros_like(x)
    return deviation / scale


def occurrence_scores(nk: np.ndarray) -> np.ndarray:
    """The hub score of a query view: the robust z of log(1 + N_k), its scale at least
    OCCURRENCE_MIN_SCALE."""
    return robust_z(np.log1p(np.asarray(nk, dtype=np.float64)), OCCURRENCE_MIN_SCALE)


def bank_scores(log_norm: np.ndarray) -> np.ndarray:
    """The hub score of the bank's view: the robust z of the log-normaliser LSE_b(β·P[b, j])."""
    return robust_z(log_norm)


def order(scores: np.ndarray) -> np.ndarray:
    """Item indices by decreasing score, ties towards the lower index."""
    scores = np.asarray(scores)
    return np.lexsort((np.arange(scores.size), -scores))


def positions(scores: np.ndarray) -> np.ndarray:
    """Each item's place in `order` (1 = the highest score)."""
    out = np.empty(np.asarray(scores).size, dtype=np.int64)
    out[order(scores)] = np.arange(1, out.size + 1)
    return out


def flagged(scores: np.ndarray, threshold: float) -> np.ndarray:
    """The items scoring above `threshold`, highest first."""
    ranked = order(scores)
    return ranked[np.asarray(scores)[ranked] > threshold]


def alerts(scores: np.ndarray, budget: float) -> np.ndarray:
    """The ⌈budget·G⌉ highest-scoring items (an alert budget, a share of the gallery)."""
    n = np.asarray(scores).size
    return order(scores)[:min(n, math.ceil(budget * n - 1e-9))]
