"""Sinkhorn scalings of the bank × gallery coupling, in log space, from block reductions (pure numpy).

Sinkhorn Normalisation (SN) and Dual-Bank Sinkhorn (DBSN), Pan et al., ACM MM 2025 (code: ppanzx/DBSN,
which calls POT's `sinkhorn_knopp`): entropic optimal transport between the rows j (the gallery items;
for DBSN the test gallery followed by a gallery bank), each of mass 1/n_rows, and the bank queries b,
each of mass 1/n_b, with kernel K[j, b] = exp(β·P[b, j]) (POT's cost −P at reg = 1/β; DBSN's cost
1 − P only scales K by e^{−β}, which v absorbs). Started as POT starts (u, v = 1/n), each iteration
updates v, then u:

    log v_b = −log n_b − LSE_j(β·P[b, j] + log u_j)
    log u_j = −log n_rows − LSE_b(β·P[b, j] + log v_b)

and the normalised score is η[q, j] = β·S[q, j] + log u_j: inverted softmax with the bank queries
weighted by v (with v constant, one u-update is IS up to a constant).

How it is evaluated. The caller hands over blocks of the transposed scores, T[j, b] = P[b, j]: each
row holds every bank score of one item. The first pass is the exact first v-update (a log-sum-exp
over the items for each bank query, against each block's per-query maximum, merged across blocks).
Every later pass does, for each item j (a cache-sized piece of rows at a time), with one float64 exp
per score:

    x_b = β·T[j, b] + log v_b,  m = max_b x_b,  E_b = exp(x_b − m) ≤ 1,  s = Σ_b E_b ≥ 1
    log u_j = −log n_rows − m − log s                                  (the exact u-update)
    rowsum_b += E_b / (n_rows·s)  (= π[b, j])                          (the bank marginal)

and after the pass log v_b ← log v_b − log(n_b·rowsum_b) (the next v-update). Nothing overflows
and no item's sum underflows, whatever β. A bank query's sum cannot underflow either: after a
v-update its coupling mass is 1/n_b, and a u-update divides each item by n_rows·(item mass) ≤
n_rows, so rowsum_b ≥ 1/(n_b·n_rows).

Stopping: after exactly `iters` iterations (the paper's truncated runs), or once the change
max(|Δ log u|, |Δ log v|) of an iteration is below `tol`, at most `max_iters` iterations. The marginal
error is max_b |Σ_j π[b, j] − 1/n_b| at the returned scalings (the items' marginal is exact after
the u-update, up to rounding). A change below tol bounds the distance to the fixed point only up to
the factor 1/(1 − κ) of Sinkhorn's linear rate κ, which approaches 1 for large β·(score spread).

The caller walks the blocks: per pass `begin_pass`; per block (or part of a block's rows, on as
many threads as it likes) `first_part` + `fold_first` on pass 0, `sweep` + `fold` later; then
`end_pass`. The parts may be computed concurrently; folding them in a fixed order makes the result
independent of the threads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_TOL = 1e-6
DEFAULT_MAX_ITERS = 1000
PIECE_BYTES = 256 << 10  # float64 rows worked on at once: they stay in the core's cache


@dataclass(frozen=True)
class SinkhornResult:
    """The scalings of one β and how they were reached."""

    beta: float
    log_u: np.ndarray        # (n_rows,): the gallery items (DBSN: the test gallery, then the gallery bank)
    log_v: np.ndarray        # (n_b,): the bank queries
    iterations: int          # (v, u) updates done
    change: float            # max |Δ log u|, |Δ log v| of the last iteration
    marginal_error: float    # max_b |Σ_j π[b, j] − 1/n_b| at (log_u, log_v)
    converged: bool          # change < tol (fixed-iteration runs: whether it happened to be)


def _pieces(n_rows: int, n_cols: int):
    step = max(1, PIECE_BYTES // (8 * max(n_cols, 1)))
    for a in range(0, n_rows, step):
        yield a, min(a + step, n_rows)


class Sinkhorn:
    """The state of one β's iterations: the scalings, the reductions of the pass in progress.

    iters: exactly this many iterations; otherwise until the change is below tol, at most max_iters.
    log_v: a start for the bank scalings other than POT's (pass 0, the first v-update, is then
    skipped: the first pass is a u-update from these).
    """

    def __init__(self, beta: float, n_bank: int, n_rows: int, *, iters: int | None = None,
                 tol: float = DEFAULT_TOL, max_iters: int = DEFAULT_MAX_ITERS, log_v: np.ndarray | None = None):
        self.beta = float(beta)
        self.n_bank, self.n_rows = int(n_bank), int(n_rows)
        self.iters, self.tol, self.max_iters = iters, float(tol), int(max_iters)
        self.log_u = np.full(self.n_rows, -math.log(self.n_rows))
        self.log_v = np.full(self.n_bank, -math.log(self.n_bank))
        self.first = log_v is None           # the next pass is pass 0 (the exact first v-update)
        self._dv = 0.0                       # max |Δ log v| of the v-update that gave log_v
        if log_v is not None:
            log_v = np.asarray(log_v, dtype=np.float64)
            self._dv = float(np.abs(log_v - self.log_v).max(initial=0.0))
            self.log_v = log_v.copy()
        self.iterations = 0
        self.change = math.inf
        self.marginal_error = math.inf
        self.done = False
        self._max = self._sum = None
        self._du = 0.0

    @property
    def limit(self) -> int:
        return self.iters if self.iters is not None else self.max_iters

    @property
    def converged(self) -> bool:
        return self.change < self.tol

    @property
    def hit_limit(self) -> bool:
        """Stopped at max_iters without reaching the tolerance (a converging run only)."""
        return self.done and self.iters is None and not self.converged

    def begin_pass(self) -> None:
        self._max = np.full(self.n_bank, -np.inf) if self.first else None
        self._sum = np.zeros(self.n_bank)
        self._du = 0.0

    # --- pass 0: log v_b = −log n_b − LSE_j(β·T[j, b] + log u_j) ----------------------------------

    def first_part(self, scores_t: np.ndarray, r0: int) -> tuple[np.ndarray, np.ndarray]:
        """(max_j x, Σ_j exp(x − max)) per bank query over items r0:r0+len(scores_t), x = β·T + log u."""
        top = np.full(self.n_bank, -np.inf)
        buf = np.empty((min(scores_t.shape[0], max(1, PIECE_BYTES // (8 * self.n_bank))), self.n_bank))
        for a, b in _pieces(*scores_t.shape):
            x = self._terms(scores_t[a:b], self.log_u[r0 + a:r0 + b, None], buf)
            np.maximum(top, x.max(axis=0), out=top)
        total = np.zeros(self.n_bank)
        for a, b in _pieces(*scores_t.shape):
            x = self._terms(scores_t[a:b], self.log_u[r0 + a:r0 + b, None], buf)
            x -= top
            np.exp(x, out=x)
            total += x.sum(axis=0)
        return top, total

    def fold_first(self, part: tuple[np.ndarray, np.ndarray]) -> None:
        top, total = part
        new = np.maximum(self._max, top)
        with np.errstate(invalid="ignore"):  # −inf − −inf before the first part: nothing summed yet
            self._sum = np.where(np.isfinite(self._max), self._sum * np.exp(self._max - new), 0.0) \
                + total * np.exp(top - new)
        self._max = new

    # --- later passes: the u-update of items r0:…, and their share of the next v-update -------------

    def sweep(self, scores_t: np.ndarray, r0: int) -> tuple[np.ndarray, float]:
        """Update log u of items r0:r0+len(scores_t) from their bank scores (rows of T); returns their
        share of each bank query's coupling mass Σ_j π[b, j] and the largest |Δ log u| among them."""
        mass = np.zeros(self.n_bank)
        change = 0.0
        rows = scores_t.shape[0]
        buf = np.empty((min(rows, max(1, PIECE_BYTES // (8 * self.n_bank))), self.n_bank))
        for a, b in _pieces(*scores_t.shape):
            x = self._terms(scores_t[a:b], self.log_v, buf)
            top = x.max(axis=1)
            x -= top[:, None]
            np.exp(x, out=x)
            total = x.sum(axis=1)
            new = -math.log(self.n_rows) - top - np.log(total)
            old = self.log_u[r0 + a:r0 + b]
            change = max(change, float(np.abs(new - old).max(initial=0.0)))
            self.log_u[r0 + a:r0 + b] = new
            mass += np.einsum("j,jb->b", 1.0 / (self.n_rows * total), x)  # not BLAS: threads
        return mass, change

    def fold(self, part: tuple[np.ndarray, float]) -> None:
        mass, change = part
        self._sum += mass
        self._du = max(self._du, change)

    def _terms(self, scores_t: np.ndarray, shift: np.ndarray, buf: np.ndarray) -> np.ndarray:
        """β·T + shift in float64, in the first rows of `buf`."""
        x = np.multiply(scores_t, self.beta, out=buf[:scores_t.shape[0]], dtype=np.float64)
        x += shift
        return x

    def end_pass(self) -> None:
        """Finish the pass: the v-update (pass 0), or the iteration's change, marginal error and the
        next v-update; decide whether to stop."""
        if self.first:
            new = -math.log(self.n_bank) - (self._max + np.log(self._sum))
            self._dv = float(np.abs(new - self.log_v).max(initial=0.0))
            self.log_v = new
            self.first = False
            self._max = self._sum = None
            return
        self.iterations += 1
        self.change = max(self._dv, self._du)
        mass = self._sum
        self.marginal_error = float(np.abs(mass - 1.0 / self.n_bank).max(initial=0.0))
        self.done = self.iterations >= self.limit or (self.iters is None and self.converged)
        if not self.done:
            with np.errstate(divide="ignore"):
                step = np.log(self.n_bank * mass)
            if not np.isfinite(step).all():  # only from a log_v start far from the iterates
                raise FloatingPointError("Sinkhorn: a bank query's coupling mass underflowed")
            self.log_v = self.log_v - step
            self._dv = float(np.abs(step).max(initial=0.0))
        self._sum = None

    def result(self) -> SinkhornResult:
        return SinkhornResult(self.beta, self.log_u.copy(), self.log_v.copy(), self.iterations, self.change,
                              self.marginal_error, bool(self.converged))
