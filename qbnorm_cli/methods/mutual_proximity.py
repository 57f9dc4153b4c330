"""Mutual Proximity (Schnitzer et al., JMLR 2012) through the query bank: the probability that
S[q, j] beats a random score of q and, independently, a random score of j. On similarities
(the cosine distance 1 − s ranks the same way):
- gauss: MP = Φ((s − μ_q)/σ_q) · Φ((s − μ_j)/σ_j), computed as log Φ + log Φ
  (scipy.special.log_ndtr); μ_j, σ_j the mean and std of item j's bank scores, μ_q, σ_q those of
  the query's scores over the whole gallery, exact from the gallery's mean ḡ and second moment
  M = mean_j g_j g_jᵀ: μ_q = q·ḡ, σ_q² = qᵀMq − μ_q² (population moments). Two log Φ per score.
- empiric: MP = P(S_q < s) · P(S_j < s) with the empirical distribution functions, q's over the
  gallery (n − #{j': S[q, j'] ≥ s})/n and j's over the bank #{i: P[i, j] < s}/N (a binary search
  of the item's sorted bank scores, as gc). Ties: a score equal to s does not count as beaten.
Both are pairwise (no inner-product index ranks as they do) and increasing in s per item, so a
row's raw top-C bounds them: an item outside it scores at most the row factor at the C-th value.
"""

from __future__ import annotations

import itertools

import numpy as np

from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.methods.base import Method, Needs, Parameter

KIND = Parameter("mp", str, "how Mutual Proximity models a score's distribution: gauss (Gaussian fits) or empiric "
                 "(empirical distribution functions)", default="gauss", choices=("gauss", "empiric"))
SPREAD_FLOOR = 1e-12  # a constant row or column: its standardised scores stay finite
NOT_EXPORTABLE = ("mp scores each pair from both sides' score distributions: no inner-product index ranks as it "
                  "does (export ls, nicdm or dsl, or rank with normalise --top-k)")
SORTED_ROWS = 1024  # sorted bank rows read at a time for scattered candidates


def log_ndtr(x):
    """scipy.special.log_ndtr, imported on first use: scipy.special takes longer to import than
    most commands take to run, and every command imports the method registry."""
    from scipy.special import log_ndtr as function

    return function(x)


class GaussianProximity:
    """MP with Gaussian fits: η = log Φ((s − μ_q)/σ_q) + log Φ((s − μ_j)/σ_j)."""

    needs_embeddings = True
    why_not_exportable = NOT_EXPORTABLE

    def __init__(self, column_mean, column_std, gallery_mean, second_moment):
        self.mu, self.sigma = column_mean, np.maximum(column_std, SPREAD_FLOOR)
        self.gallery_mean, self.second_moment = gallery_mean, second_moment

    def row_statistics(self, queries, top_values, n_gallery):
        q = np.asarray(queries, dtype=np.float64)
        mu = q @ self.gallery_mean
        var = np.einsum("ij,ij->i", q @ self.second_moment, q) - mu * mu
        return mu, np.sqrt(np.maximum(var, 0.0)).clip(min=SPREAD_FLOOR)

    def eta(self, scores, rows, columns):
        mu_q, sigma_q = rows
        s = np.asarray(scores, dtype=np.float64)
        return log_ndtr((s - mu_q[:, None]) / sigma_q[:, None]) + log_ndtr((s - self.mu[columns]) / self.sigma[columns])

    def bound(self, rows, below):
        mu_q, sigma_q = rows
        return log_ndtr((below - mu_q) / sigma_q)


class EmpiricalProximity:
    """MP with empirical distribution functions: η = P(S_q < s) · P(S_j < s)."""

    needs_embeddings = False
    why_not_exportable = NOT_EXPORTABLE

    def __init__(self, sorted_bank, n_bank: int):
        self.sorted_bank, self.n_bank = sorted_bank, n_bank

    def row_statistics(self, queries, top_values, n_gallery):
        return -np.asarray(top_values, dtype=np.float64), n_gallery  # ascending negated values

    def row_share(self, rows, scores):
        """(n − #{row values ≥ s})/n per score, from each row's values held best first."""
        negated, n = rows
        s = np.asarray(scores, dtype=np.float64)
        out = np.empty(s.shape)
        for r in range(s.shape[0]):
            out[r] = n - np.searchsorted(negated[r], -s[r], side="right")
        return out / n

    def column_share(self, scores, columns):
        """#{i: P[i, j] < s}/N per score, columns broadcast against scores."""
        s = np.asarray(scores, dtype=np.float64)
        cols = np.broadcast_to(columns, s.shape)
        out = np.empty(s.shape)
        if cols.ndim == 2 and cols.shape[0] > 0 and (cols == cols[:1]).all():  # a tile: one item per column
            first = cols[0]
            if first.size and np.array_equal(first, np.arange(first[0], first[0] + first.size)):
                block = np.asarray(self.sorted_bank[first[0]:first[0] + first.size])
                for c in range(first.size):
                    out[:, c] = np.searchsorted(block[c], s[:, c], side="left")
                return out / self.n_bank
        flat_cols, flat_s = cols.ravel(), s.ravel()
        flat = np.empty(flat_s.shape)
        order = np.argsort(flat_cols, kind="stable")
        ordered = flat_cols[order]
        edges = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1], True])
        held = (-1, None)  # sorted bank rows a:a+SORTED_ROWS, read in item order
        for start, stop in itertools.pairwise(edges):
            j = int(ordered[start])
            if held[0] < 0 or not held[0] <= j < held[0] + SORTED_ROWS:
                held = (j, np.asarray(self.sorted_bank[j:j + SORTED_ROWS]))
            at = order[start:stop]
            flat[at] = np.searchsorted(held[1][j - held[0]], flat_s[at], side="left")
        return flat.reshape(s.shape) / self.n_bank

    def eta(self, scores, rows, columns):
        return self.row_share(rows, scores) * self.column_share(scores, columns)

    def bound(self, rows, below):
        return self.row_share(rows, np.asarray(below, dtype=np.float64)[:, None])[:, 0]


def build(probe, p) -> Normaliser:
    if p["mp"] == "empiric":
        return Normaliser(pairwise=EmpiricalProximity(probe.sorted_bank(), probe.n_bank))
    mean, moment = probe.gallery_moments()
    return Normaliser(pairwise=GaussianProximity(probe.column_mean(), probe.column_std(), mean, moment))


def needs(values) -> Needs:
    if values.get("mp") == "empiric":
        return Needs(sorted_bank=True)
    return Needs(column_mean=True, column_std=True, gallery_moments=True)


METHOD = Method(
    "mp", "Mutual Proximity: P(s beats a random score of q) · P(s beats a random score of j), Gaussian or empirical "
          "(Schnitzer et al. JMLR 2012)",
    "Schnitzer et al., JMLR 2012: MP = Φ((s − μ_q)/σ_q)·Φ((s − μ_j)/σ_j) (gauss) or F_q(s)·F_j(s) (empiric)",
    ("mp",), build, needs({}), grid={"mp": ("gauss", "empiric")}, needs_of=needs, log_domain=True, declares=(KIND,),
    cost="probe: one pass over bank × gallery, plus the gallery's d × d second moment (gauss) or every bank score "
         "kept sorted (empiric, O(bank × gallery) storage); normalise: two log Φ per score (gauss) or a binary "
         "search per score (empiric), on each row's raw top candidates only with --top-k")
