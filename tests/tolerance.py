"""The suite's floating-point tolerances, each derived from an error bound of the computation it checks.

A tolerance that is merely a number which passed on one machine encodes that machine's rounding:
another BLAS kernel (OPENBLAS_CORETYPE=Haswell, Zen, SkylakeX, Prescott …) sums a product in
another order and lands elsewhere inside the bound. The bounds (Higham, *Accuracy and Stability
of Numerical Algorithms*, 2nd ed., SIAM 2002; u the unit roundoff, γₙ = n·u / (1 − n·u)):

* **float32 products.** fl(x·y) of length d, summed in any order, with or without FMA, lies within
  γ_d · Σ|xᵢ·yᵢ| of x·y (Higham §3.1, Eq. 3.5). Two kernels may therefore disagree by twice that.
* **cosine rows.** qbnorm normalises float32 rows in float32 (a sum of d squares, a square root, a
  division): each element is off by at most γ_{d+3} relative, which adds 2·γ_{d+3} to a product of
  unit rows (Σ|x̂ᵢ·ŷᵢ| ≤ 1 by Cauchy–Schwarz).
* **scaled scores.** logsumexp is 1-Lipschitz in the max norm, and so is a mean of the K largest: an
  error ε in every score moves β·LSE(P/…) by at most β·ε and a top-K mean by ε. A normalised score
  scale·S − Σ offsets thus carries (scale + Σ the offsets' β) · ε.
* **float64 evaluation.** A formula of a few operations per value, or an LSE over n terms (each a
  rounded product, an exp accurate to a few ulps, a sum; qbnorm rescales a running sum once per
  tile, at most once per term), is counted operation by operation below.
* **float32 storage.** Writing a value as float32 rounds it by at most u₃₂·|value|.

Exact things are compared exactly (rankings, gates, indices, counts, ranks and metrics); where a
ranking is compared, the test data is checked to hold no two scores closer than twice the bound
(`assert_separated`), so that every kernel must produce the same order.
"""

from __future__ import annotations

import numpy as np

U32 = 2.0**-24  # unit roundoff of float32
U64 = 2.0**-53  # unit roundoff of float64
EXP_ULPS = 4    # libm's exp is within a few ulps (glibc: < 1 ulp; 4 leaves room for other libms)


def gamma(n: int, u: float = U32) -> float:
    """γₙ = n·u / (1 − n·u): the relative error bound of n rounded operations in a chain."""
    return n * u / (1.0 - n * u)


def product32(d: int, magnitude: float = 1.0) -> float:
    """|fl32(x·y) − x·y| for a length-d float32 product with Σ|xᵢ·yᵢ| ≤ magnitude, any kernel."""
    return gamma(d) * magnitude


def cosine32(d: int) -> float:
    """|qbnorm's cosine − the exact cosine| of two float32 rows of dimension d: the float32
    normalisation of both rows (2·γ_{d+3}) and the float32 product of the unit rows (γ_d)."""
    return product32(d) + 2.0 * gamma(d + 3)


def product64(d: int, magnitude: float = 1.0) -> float:
    """The same bound for a float64 product (the reference's)."""
    return gamma(d, U64) * magnitude


def scaled(score_error: float, scale: float, offset_betas=()) -> float:
    """The error of scale·S − Σ offsets when every score (of S and of the banks the offsets come
    from) is off by at most `score_error`; each offset is an LSE over β·scores (or a top-K mean,
    β = its weight): 1-Lipschitz, so it moves by β·score_error."""
    return (abs(scale) + sum(abs(b) for b in offset_betas)) * score_error


def lse64(n: int, beta: float, spread: float, magnitude: float) -> float:
    """float64 evaluation error of L = β·m + log Σᵢ exp(β·(Pᵢ − m)) over n terms, as qbnorm and
    scipy compute it: each exponent is rounded (u·β·spread, spread = max − min of the column), each
    exp is accurate to EXP_ULPS, the sum to γₙ, and a running sum rescaled once per tile (at most n
    times) repeats the exponent's error; the log, β·m and the final sum add u·magnitude each
    (magnitude ≥ |L|, |β·m|)."""
    per_term = beta * spread + EXP_ULPS
    return U64 * ((n + 1) * per_term + 2 * n) + 4 * U64 * magnitude


def sinkhorn64(iterations: int, n_terms: int, magnitude: float, beta: float = 0.0, score_error: float = 0.0) -> float:
    """|log u − exact|, |log v − exact| after `iterations` (v, u) updates of the Sinkhorn iteration
    evaluated in float64 (qbnorm's kernel or the reference's). Each half-update is an LSE over at
    most n_terms terms whose exponents β·P[b, j] + (the other scaling) are at most `magnitude` in
    size: within lse64's bound with twice that magnitude standing in for the spread (the exponent,
    its shift and their difference are each rounded). Each half-update is also 1-Lipschitz in the
    other scaling and β-Lipschitz in the scores (off by score_error), so the errors of the
    2·iterations half-updates add up."""
    per_half = lse64(n_terms, 1.0, 2.0 * magnitude, magnitude) + beta * score_error
    return 2 * iterations * per_half


def sinkhorn32(iterations: int, n_terms: int, magnitude: float, n_cells: int, absorb: float = 10.0) -> float:
    """The same for qbnorm's iterations over a float32 kernel (core/sinkhorn.py): the first v-update
    and the builds are sinkhorn64's log-domain half-updates; every other half-update sums the kernel
    entries times float64 scalings in float64. An entry is off by its rounding to float32 (u₃₂
    relative) on top of its float64 evaluation (one more lse64 term), or flushed to 0 below
    float32's smallest normal number (< 2⁻¹²⁶ each: with the scalings within e^±absorb and one
    half-update's factor within n_cells, together at most n_cells · 2⁻¹²⁶ · e^{2·absorb} · n_cells²
    relative to the sum). A relative error ρ of the sum is a log error of at most ρ/(1 − ρ), and the
    half-updates are 1-Lipschitz, so the 2·iterations of them add up (with iterations as counted
    by sinkhorn64, bounding the log-domain ones too)."""
    flushed = n_cells ** 3 * 2.0**-126 * np.exp(2.0 * absorb)
    rho = U32 + flushed
    per_half = rho / (1.0 - rho) + lse64(n_terms, 1.0, 2.0 * magnitude, magnitude)
    return sinkhorn64(iterations, n_terms, magnitude) + 2 * iterations * per_half


def eval64(magnitude: float, operations: int = 4) -> float:
    """float64 rounding of a formula of a few operations on values of this magnitude."""
    return gamma(operations, U64) * magnitude


def stored32(values) -> np.ndarray:
    """The rounding of `values` when written as float32 (elementwise)."""
    return U32 * np.abs(np.asarray(values, dtype=np.float64))


def assert_close(actual, desired, tolerance) -> None:
    """|actual − desired| ≤ tolerance elementwise (an absolute bound; equal infinities agree)."""
    actual = np.asarray(actual, dtype=np.float64)
    desired = np.asarray(desired, dtype=np.float64)
    assert actual.shape == desired.shape, f"shapes differ: {actual.shape} and {desired.shape}"
    tolerance = np.broadcast_to(np.asarray(tolerance, dtype=np.float64), desired.shape)
    with np.errstate(invalid="ignore"):
        within = (actual == desired) | (np.abs(actual - desired) <= tolerance)
    if not within.all():
        at = np.unravel_index(int(np.argmin(within.ravel())), within.shape)
        raise AssertionError(f"{int((~within).sum())} of {within.size} values outside the error bound; first at "
                             f"{tuple(int(i) for i in at)}: {actual[at]!r} vs {desired[at]!r}, "
                             f"{abs(actual[at] - desired[at]):.3g} apart, bound {tolerance[at]:.3g}")


def assert_separated(scores, n: int, tolerance: float) -> None:
    """The best n + 1 scores of every row differ pairwise by more than 2·tolerance (distinct
    values only: exact ties are ordered by index, exactly, on every machine). Any two computations
    within `tolerance` of these scores then rank each row's top n identically."""
    scores = np.asarray(scores, dtype=np.float64)
    top = -np.sort(-scores, axis=1)[:, : n + 1]
    gaps = np.diff(top, axis=1)
    near = (gaps != 0) & (-gaps <= 2 * tolerance)
    assert not near.any(), (f"test data holds near-ties closer than the error bound {tolerance:.3g} "
                            f"(rows {np.flatnonzero(near.any(axis=1)).tolist()}): choose other data")


def method_scales(method: str, *, beta: float = 20.0, gallery_beta: float = 1.0, alpha: float = 0.75,
                  lam: float = 0.25):
    """(scale, offset weights) of a method's η = scale·S − offsets, for `scaled`: how much an error
    in the scores it reads can move its normalised scores (tests/reference.py has the formulas).
    gc adds an integer rank, exact while no score lies within the error of a bank score."""
    return {
        "none": (1.0, ()),
        "is": (beta, (beta,)),
        "dis": (beta, (beta,)),
        "csls": (2.0, (1.0, 1.0)),  # 2·S − r_q − r_j, both means of the K largest
        "nnn": (1.0, (alpha,)),
        "gc": (1.0, ()),
        "dual-is": (beta + gallery_beta, (beta, gallery_beta)),
        "dual-dis": (beta + gallery_beta, (beta, gallery_beta)),
        "dn": (1.0, (lam,)),  # S − λ·mean_i P[i, j]: a mean moves by the scores' error
    }[method]


def method_error(method: str, score_error: float, magnitude: float, n_bank: int, spread: float, **params) -> float:
    """|η − the exact η| when every score is off by at most `score_error`: the scores' error
    scaled by the method, plus the float64 evaluation (LSE over n_bank terms of this spread,
    values of this magnitude)."""
    scale, offsets = method_scales(method, **params)
    evaluation = sum(lse64(n_bank, beta, spread, magnitude) for beta in offsets) + eval64(magnitude)
    return scaled(score_error, scale, offsets) + evaluation


def approx64(value, operations: int = 8):
    """`value` as a float64 formula of a few operations on exact inputs (counts, ranks) computes it:
    within γ_operations relative (exactly 0 stays exactly 0)."""
    import pytest

    return pytest.approx(value, rel=gamma(operations, U64), abs=0)


def augmented32(d: int, shift: float = 0.0, magnitude: float = 1.0) -> float:
    """|fl32(⟨[q, c], [g, x]⟩) − (q·g − shift)| for qbnorm export's augmented vectors: x = fl32(−shift/c)
    with c a power of two (c·x is then exact), a float32 product of length d + 1 whose terms sum in
    magnitude to at most magnitude + |shift| (any kernel, any order), plus x's rounding u·|shift|."""
    return gamma(d + 1) * (magnitude + abs(shift)) + U32 * abs(shift)


def one_minus32(magnitude: float) -> float:
    """The rounding of a distance reported as fl32(1 − ⟨x, y⟩) (LanceDB's dot metric), read back as
    ⟨x, y⟩ = 1 − distance: u·(1 + |⟨x, y⟩|)."""
    return U32 * (1.0 + abs(magnitude))
