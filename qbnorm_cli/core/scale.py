"""Which similarity scale scores are on, and whether a softmax temperature β suits it (pure).

The inverted softmax exp(β·s) only sees β through β × (spread of the scores): multiplying every
score by 100 (CLIP's logit scale) is the same as multiplying β by 100. On the shared Multi30k
e5 data (cosine, std 0.029) IS peaks at β = 100, i.e. β·std ≈ 3; QB-Norm's β = 20 on CE cosines and
its β ≈ 0.5 on CLIP2Video logits land in the same 1–5 band. Far outside it IS degenerates: for
β·std → 0 it subtracts each item's mean bank score, for β·std → ∞ its max bank score, and on that
data both lose most of the gain (30.7 and 31.1 R@1 against 34.4 at the peak, raw 28.4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qbnorm_cli.errors import param

COSINE_LIMIT = 1.01            # |s| ≤ this: cosine similarities (a little slack for float error)
LOGIT_RANGE = (5.0, 150.0)     # largest |s| of CLIP-style logits (logit_scale ≈ 100 × cosine)
TYPICAL_COSINE_STD = 0.03      # std of bank × gallery cosines of typical retrieval models
LOGIT_SCALE = 100.0            # CLIP's learned (and clamped) logit scale
SPREAD_BAND = (0.1, 20.0)      # β·std outside this: β is almost surely on the wrong scale
SPREAD_BEST = (1.0, 5.0)       # β·std where the inverted softmax usually works best

SCALE_TEXT = {
    "cosine": "cosine similarities (|s| ≤ 1)",
    "logits": "CLIP-style logits (≈ 100 × cosine) or unnormalised dot products",
    "other": "neither cosine nor logit-like",
}


@dataclass(frozen=True)
class ScoreStats:
    min: float
    max: float
    mean: float
    std: float

    @classmethod
    def from_dict(cls, stats: dict) -> ScoreStats:
        return cls(float(stats["min"]), float(stats["max"]), float(stats["mean"]), float(stats["std"]))

    @classmethod
    def from_attrs(cls, attrs: dict, prefix: str = "") -> ScoreStats | None:
        """From a probe file's root attributes (score_min, …; gallery_score_min, … with a prefix)."""
        names = [f"{prefix}score_{part}" for part in ("min", "max", "mean", "std")]
        if not all(name in attrs for name in names):
            return None
        return cls(*(float(attrs[name]) for name in names))

    @classmethod
    def of(cls, scores: np.ndarray) -> ScoreStats:
        scores = np.asarray(scores, dtype=np.float64)
        return cls(float(scores.min()), float(scores.max()), float(scores.mean()), float(scores.std()))

    @classmethod
    def from_sums(cls, n: int, total: float, squares: float, low: float, high: float) -> ScoreStats:
        """From running sums of n scores (Σs, Σs²) and their extremes, as streamed passes collect them."""
        mean = total / n
        return cls(float(low), float(high), mean, float(np.sqrt(max(squares / n - mean * mean, 0.0))))

    def as_dict(self) -> dict:
        return {"min": self.min, "max": self.max, "mean": self.mean, "std": self.std}


def classify(stats: ScoreStats) -> str:
    """'cosine', 'logits' or 'other' from the range of the scores."""
    largest = max(abs(stats.min), abs(stats.max))
    if largest <= COSINE_LIMIT:
        return "cosine"
    if LOGIT_RANGE[0] <= largest <= LOGIT_RANGE[1]:
        return "logits"
    return "other"


def describe(stats: ScoreStats) -> str:
    return f"{stats.min:.3g} to {stats.max:.3g}, std {stats.std:.3g}: {SCALE_TEXT[classify(stats)]}"


def equivalent_beta(beta: float, stats: ScoreStats, reference_std: float = TYPICAL_COSINE_STD) -> float:
    """The β giving these scores the β·spread that `beta` gives scores of std `reference_std`."""
    return beta * reference_std / stats.std if stats.std > 0 else beta


def best_betas(stats: ScoreStats) -> tuple[float, float]:
    """The β range putting β·std in SPREAD_BEST."""
    if stats.std <= 0:
        return (0.0, float("inf"))
    return (SPREAD_BEST[0] / stats.std, SPREAD_BEST[1] / stats.std)


def beta_warning(beta: float, stats: ScoreStats | None, parameter: str = "beta",
                 check_low: bool = True) -> str | None:
    """A one-line warning when β·std is far outside SPREAD_BAND, else None.

    The high side suggests the equivalent of a β chosen for cosine scores; the low side that of a
    β chosen for ×100 logits. `check_low` is off for the gallery-bank β₂ of the dual methods, where
    a small β₂ (a gentle mean-score correction) is a good setting.
    """
    if stats is None or not np.isfinite(stats.std) or stats.std <= 0:
        return None
    spread = beta * stats.std
    low, high = best_betas(stats)
    if spread > SPREAD_BAND[1]:
        side = f"far above {SPREAD_BAND[1]:g}: the softmax just subtracts each item's top bank score"
        guess = (f"if β={beta:g} was meant for cosine scores, the equivalent here is "
                 f"β ≈ {equivalent_beta(beta, stats):.3g} (β × {TYPICAL_COSINE_STD:g}/{stats.std:.3g})")
    elif check_low and spread < SPREAD_BAND[0]:
        side = f"far below {SPREAD_BAND[0]:g}: the softmax just subtracts each item's mean bank score"
        guess = (f"if β={beta:g} was meant for ×{LOGIT_SCALE:g} logits, the equivalent here is "
                 f"β ≈ {equivalent_beta(beta, stats, LOGIT_SCALE * TYPICAL_COSINE_STD):.3g}")
    else:
        return None
    return (f"{param(parameter)} {beta:g} looks wrong for the bank scores ({describe(stats)}): β·std = {spread:.3g} is "
            f"{side}; {guess}; β·std ≈ {SPREAD_BEST[0]:g}–{SPREAD_BEST[1]:g} (here β ≈ {low:.3g}–{high:.3g}) "
            "usually works best, or let tune choose")


def beta_grid(base, stats: ScoreStats | None) -> list[float]:
    """`base` (a grid for cosine-scale scores), widened by its equivalents when the scores are on
    another scale, so that a tuning grid always brackets the useful band."""
    grid = {float(b) for b in base}
    if stats is not None and stats.std > 0:
        factor = TYPICAL_COSINE_STD / stats.std
        if factor < 0.2 or factor > 5:
            grid |= {float(f"{b * factor:.3g}") for b in base}
    return sorted(grid)
