"""Sinkhorn scalings of the bank × gallery coupling: log-stabilised iterations over a float32 kernel.

Sinkhorn Normalisation (SN) and Dual-Bank Sinkhorn (DBSN), Pan et al., ACM MM 2025 (code: ppanzx/DBSN,
which calls POT's `sinkhorn_knopp`): entropic optimal transport between the rows j (the gallery items;
for DBSN the test gallery followed by a gallery bank), each of mass 1/n_rows, and the bank queries b,
each of mass 1/n_b, with kernel exp(β·P[b, j]) (POT's cost −P at reg = 1/β; DBSN's cost 1 − P only
scales it by e^{−β}, which v absorbs). Started as POT starts (u, v = 1/n), each iteration updates v,
then u:

    log v_b = −log n_b − LSE_j(β·P[b, j] + log u_j)
    log u_j = −log n_rows − LSE_b(β·P[b, j] + log v_b)

and the normalised score is η[q, j] = β·S[q, j] + log u_j: inverted softmax with the bank queries
weighted by v (with v constant, one u-update is IS up to a constant).

How it is evaluated: the log-stabilised Sinkhorn (Schmitzer, "Stabilized sparse scaling algorithms
for entropy regularized transport problems", SIAM J. Sci. Comput. 2019; POT's `sinkhorn_stabilized`).
The potentials are split as log u = a + log ũ, log v = g + log ṽ, with the absorbed parts (a, g) in
a float32 kernel over the transposed scores T[j, b] = P[b, j]:

    K[j, b] = fl32(exp(β·T[j, b] + g_b − m_j) · exp(m_j + a_j)),   m_j = max_b (β·T[j, b] + g_b)

(entries below float32's smallest normal number are flushed to 0; at an absorption K is the coupling
π, whose entries are at most 1/n_rows). An iteration is then two matrix–vector products over K, each
float32 entry multiplied and summed in float64 (a few MiB of rows widened at a time):

    ṽ_b = 1 / (n_b · Σ_j K[j, b] ũ_j),   ũ_j = 1 / (n_rows · Σ_b K[j, b] ṽ_b)

Pass 0 is the exact first v-update in the log domain (a log-sum-exp over the items for each bank
query against each block's per-query maximum, merged across blocks). A "build" pass does the exact
u-update in the log domain (one float64 exp per score), then absorbs the potentials (a ← log u,
g ← log v, ũ = ṽ = 1) and builds K. This happens at iteration 1 and again whenever
max |log ũ| or max |log ṽ| leaves ±ABSORB: products of a few float32 entries with factors within
e^{±ABSORB} and a flushed entry (< 2^-126) can then never matter. Every other pass is one
"kernel" pass: the u-update of every item from K·ṽ, its share of Kᵀ·ũ (the bank marginal), and after
the pass the v-update.

Convergence: the change of an iteration is that of a plain Sinkhorn step, max(|Δ log u|, |Δ log v|),
as the reference computes it; the run stops after exactly `iters` iterations (the paper's truncated
runs: plain Sinkhorn, nothing accelerated), or once the change is below `tol`, at most `max_iters`
iterations. A converging run is accelerated by Anderson mixing of the bank scalings (Anderson,
"Iterative procedures for nonlinear integral equations", J. ACM 1965; in the form of Walker & Ni,
"Anderson acceleration for fixed-point iterations", SIAM J. Numer. Anal. 2011): an iteration is the
map G(g) of g = log v (the v-update after the u-update from g), and the next g is G's value
extrapolated from the last ANDERSON_DEPTH + 1 points, g ← G(g_k) − Σ_i γ_i ΔG_i with
γ = argmin ‖r_k − Σ_i γ_i Δr_i‖ (least squares), r = G(g) − g the plain step. The items' u-updates
stay plain, so no pass costs more than a plain one. It starts once the plain change is below √tol:
Sinkhorn's fixed point is only defined up to (u·c, v/c), and the c a run ends at depends on its
path; from there the accelerated path's c differs from the plain one's by about the change squared
(≈ tol). Its history starts again whenever an iteration does not reduce the change (a step that
overshoots is followed by one plain step, then extrapolations from the points since).

The marginal error is max over both marginals of |Σ π − 1/n| at the returned scalings (the items'
marginal is exact after a plain u-update, up to rounding). A change below tol bounds the distance to
the fixed point only up to the factor 1/(1 − κ) of Sinkhorn's linear rate κ, which approaches 1 for
large β·(score spread).

The caller walks the blocks: per pass `begin_pass`; per block (or part of a block's rows, on as
many threads as it likes) `first_part` + `fold_first` on a "first" pass, `build` + `fold` on a
"build" pass, `step` (on the held kernel rows, or on `kernel(scores)` recomputed) + `fold` on a
"kernel" pass; then `end_pass`. Parts folded in a fixed order make the result independent of the
threads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_TOL = 1e-6
DEFAULT_MAX_ITERS = 1000
PIECE_BYTES = 256 << 10  # float64 rows worked on at once: they stay in the core's cache
PRODUCT_PIECE_BYTES = 4 << 20  # rows widened for the products: past L2, but fewer GIL hand-overs per row
ABSORB = 10.0            # rebuild K once a |log ũ| or |log ṽ| exceeds this
ANDERSON_DEPTH = 3       # differences of points an extrapolation combines
TINY32 = float(np.finfo(np.float32).tiny)

FIRST, BUILD, KERNEL = "first", "build", "kernel"


@dataclass(frozen=True)
class SinkhornResult:
    """The scalings of one β and how they were reached."""

    beta: float
    log_u: np.ndarray        # (n_rows,): the gallery items (DBSN: the test gallery, then the gallery bank)
    log_v: np.ndarray        # (n_b,): the bank queries
    iterations: int          # (v, u) updates done
    change: float            # max |Δ log u|, |Δ log v| of the last (plain) iteration step
    marginal_error: float    # max over both marginals of |Σ π − 1/n| at (log_u, log_v)
    converged: bool          # change < tol (fixed-iteration runs: whether it happened to be)


def first_v_update(row_log_sums: np.ndarray, n_rows: int) -> np.ndarray:
    """The first v-update from POT's start (log u_j = −log n_rows) given each bank query's
    log Σ_j exp(β·P[b, j]): log v_b = −log n_b − (that − log n_rows). A `Sinkhorn(log_v=…)` from it
    runs as one from POT's start after its pass 0."""
    row_log_sums = np.asarray(row_log_sums, dtype=np.float64)
    return -math.log(row_log_sums.size) + math.log(n_rows) - row_log_sums


def _pieces(n_rows: int, n_cols: int, piece_bytes: int = PIECE_BYTES):
    step = max(1, piece_bytes // (8 * max(n_cols, 1)))
    for a in range(0, n_rows, step):
        yield a, min(a + step, n_rows)


class Sinkhorn:
    """The state of one β's iterations: the scalings, the reductions of the pass in progress.

    iters: exactly this many plain iterations; otherwise until the change is below tol, at most
    max_iters, Anderson-accelerated (see the module's docstring) unless `accelerate` is False. log_v: a
    start for the bank scalings other than POT's (pass 0, the first v-update, is then skipped: the
    first pass is a u-update from these). log_u: a start for the item scalings other than POT's (the
    first pass is then the v-update from these); not with log_v.
    """

    def __init__(self, beta: float, n_bank: int, n_rows: int, *, iters: int | None = None,
                 tol: float = DEFAULT_TOL, max_iters: int = DEFAULT_MAX_ITERS,
                 log_v: np.ndarray | None = None, log_u: np.ndarray | None = None, accelerate: bool = True):
        if log_u is not None and log_v is not None:
            raise ValueError("a start is log_u or log_v, not both")
        self.beta = float(beta)
        self.accelerate = bool(accelerate)
        self.n_bank, self.n_rows = int(n_bank), int(n_rows)
        self.iters, self.tol, self.max_iters = iters, float(tol), int(max_iters)
        self.log_u = np.full(self.n_rows, -math.log(self.n_rows))
        self.log_v = np.full(self.n_bank, -math.log(self.n_bank))
        self.phase = FIRST if log_v is None else BUILD
        self._dv = 0.0                       # the plain |Δ log v| of the v-update that gave log_v
        if log_v is not None:
            log_v = np.asarray(log_v, dtype=np.float64)
            self._dv = float(np.abs(log_v - self.log_v).max(initial=0.0))
            self.log_v = log_v.copy()
        # absorbed potentials (in K) and the scalings relative to them: log u = a + log ũ, log v = g + log ṽ
        self.absorbed_u = self.log_u.copy()
        self.absorbed_v = self.log_v.copy()
        self.scale_u = np.zeros(self.n_rows)  # log ũ
        self.scale_v = np.zeros(self.n_bank)  # log ṽ
        self.builds = 0                       # kernels built (absorptions)
        self.mixed = 0                        # v-updates extrapolated (Anderson)
        self._anderson: list[tuple[np.ndarray, np.ndarray]] = []  # (log v, its plain step), the latest last
        self._history: list[float] = []       # the changes of the iterations
        self.iterations = 0
        self.change = math.inf
        self.marginal_error = math.inf
        self.done = False
        self._max = self._sum = None
        self._du = self._row_error = 0.0
        self._begun = False                   # a pass has begun
        if log_u is not None:
            self.start_from(log_u)

    def start_from(self, log_u: np.ndarray) -> None:
        """Start from these item scalings instead of POT's: the first pass is the v-update from them.
        Before the first pass only; never for fixed iterations (the paper's runs start as POT starts)."""
        if self.iters is not None or self._begun or self.phase != FIRST:
            raise ValueError("a start is set before the first pass of a converging run")
        log_u = np.array(log_u, dtype=np.float64)
        if log_u.shape != (self.n_rows,) or not np.isfinite(log_u).all():
            raise ValueError(f"log_u must hold {self.n_rows} finite values")
        self.log_u = log_u
        self.absorbed_u = log_u.copy()

    @property
    def first(self) -> bool:
        return self.phase == FIRST

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
        self._begun = True
        self._max = np.full(self.n_bank, -np.inf) if self.first else None
        self._sum = np.zeros(self.n_bank)
        self._du = self._row_error = 0.0
        if self.phase == BUILD:  # absorb log v now; log u is absorbed item by item as it is updated
            self.absorbed_v = self.log_v.copy()
            self.scale_v[:] = 0.0

    # --- pass 0: log v_b = −log n_b − LSE_j(β·T[j, b] + log u_j) ----------------------------------

    def first_part(self, scores_t: np.ndarray, r0: int) -> tuple[np.ndarray, np.ndarray]:
        """(max_j x, Σ_j exp(x − max)) per bank query over items r0:r0+len(scores_t), x = β·T + log u."""
        top = np.full(self.n_bank, -np.inf)
        buf = self._buffer(scores_t.shape[0])
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

    # --- build passes: the exact u-update of items r0:…, and their kernel rows ------------------------

    def build(self, scores_t: np.ndarray, r0: int, out: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Update log u of items r0:r0+len(scores_t) in the log domain from their bank scores (rows
        of T), absorb it, and write their kernel rows into `out` (float32, the shape of scores_t);
        returns `step`'s reductions of the new rows."""
        buf = self._buffer(scores_t.shape[0])
        change = 0.0
        for a, b in _pieces(*scores_t.shape):
            x = self._terms(scores_t[a:b], self.absorbed_v, buf)
            top = x.max(axis=1)
            x -= top[:, None]
            np.exp(x, out=x)
            new = -math.log(self.n_rows) - top - np.log(x.sum(axis=1))
            change = max(change, float(np.abs(new - self.log_u[r0 + a:r0 + b]).max(initial=0.0)))
            self.log_u[r0 + a:r0 + b] = new
            self.absorbed_u[r0 + a:r0 + b] = new
            self.scale_u[r0 + a:r0 + b] = 0.0
            self._kernel_rows(x, top, new, out[a:b])
        mass, _, row_error = self._products(out, r0, update=False)
        return mass, change, row_error

    def kernel(self, scores_t: np.ndarray, r0: int, out: np.ndarray) -> np.ndarray:
        """The kernel rows of items r0:r0+len(scores_t) at the absorbed potentials, into `out`:
        the same arithmetic on the same values as `build` wrote them, so the same bits."""
        buf = self._buffer(scores_t.shape[0])
        for a, b in _pieces(*scores_t.shape):
            x = self._terms(scores_t[a:b], self.absorbed_v, buf)
            top = x.max(axis=1)
            x -= top[:, None]
            np.exp(x, out=x)
            self._kernel_rows(x, top, self.absorbed_u[r0 + a:r0 + b], out[a:b])
        return out

    @staticmethod
    def _kernel_rows(e: np.ndarray, top: np.ndarray, absorbed: np.ndarray, out: np.ndarray) -> None:
        e *= np.exp(top + absorbed)[:, None]
        # no subnormal float32 (they would slow every product, and never matter): an entry below the
        # smallest normal is multiplied by 0, not stored through a mask (4.7 against 1.0 ns a score)
        np.multiply(e, e >= TINY32, out=out, casting="unsafe")

    # --- kernel passes: the u-update of items r0:…, and their share of the next v-update -------------

    def step(self, kernel_t: np.ndarray, r0: int) -> tuple[np.ndarray, float, float]:
        """Update ũ of items r0:r0+len(kernel_t) from their kernel rows: ũ_j = 1/(n_rows·Σ_b K[j, b] ṽ_b);
        returns their share of each bank query's Σ_j K[j, b] ũ_j, the largest |Δ log u| among them,
        and their largest items' marginal error."""
        return self._products(kernel_t, r0, update=True)

    def _products(self, kernel_t: np.ndarray, r0: int, update: bool) -> tuple[np.ndarray, float, float]:
        # per piece only what the next product needs (the rows' new ũ); the change and the marginal
        # error once over all the rows: few calls per piece, so that the threads do not queue on the GIL
        n = kernel_t.shape[0]
        mass = np.zeros(self.n_bank)
        row_sum = np.empty(n)
        old = self.scale_u[r0:r0 + n].copy()
        new = self.scale_u[r0:r0 + n]
        buf = self._buffer(n, PRODUCT_PIECE_BYTES)
        v = np.exp(self.scale_v)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # a vanished row: raised below
            for a, b in _pieces(*kernel_t.shape, PRODUCT_PIECE_BYTES):
                k = buf[:b - a]
                k[...] = kernel_t[a:b]                          # exact: float32 → float64
                np.matmul(k, v, out=row_sum[a:b])
                if update:
                    new[a:b] = -math.log(self.n_rows) - np.log(row_sum[a:b])
                mass += np.exp(new[a:b]) @ k
        change = 0.0
        if update:
            if not (row_sum > 0).all():
                raise FloatingPointError("Sinkhorn: an item's kernel row vanished")
            change = float(np.abs(new - old).max(initial=0.0))
        row_error = float(np.abs(np.exp(new) * row_sum - 1.0 / self.n_rows).max(initial=0.0))
        return mass, change, row_error

    def fold(self, part: tuple[np.ndarray, float, float]) -> None:
        mass, change, row_error = part
        self._sum += mass
        self._du = max(self._du, change)
        self._row_error = max(self._row_error, row_error)

    def _buffer(self, rows: int, piece_bytes: int = PIECE_BYTES) -> np.ndarray:
        return np.empty((min(rows, max(1, piece_bytes // (8 * self.n_bank))), self.n_bank))

    def _terms(self, scores_t: np.ndarray, shift: np.ndarray, buf: np.ndarray) -> np.ndarray:
        """β·T + shift in float64, in the first rows of `buf`."""
        x = np.multiply(scores_t, self.beta, out=buf[:scores_t.shape[0]], dtype=np.float64)
        x += shift
        return x

    def end_pass(self) -> None:
        """Finish the pass: the v-update (pass 0), or the iteration's change, marginal error and the
        next v-update (extrapolated, once accelerating); decide whether to stop and whether to absorb."""
        if self.first:
            new = -math.log(self.n_bank) - (self._max + np.log(self._sum))
            self._dv = float(np.abs(new - self.log_v).max(initial=0.0))
            self.log_v = new
            self.phase = BUILD
            self._max = self._sum = None
            return
        self.iterations += 1
        self.change = max(self._dv, self._du)
        self._history.append(self.change)
        mass = self._sum * np.exp(self.scale_v)     # each bank query's Σ_j π[b, j]
        self.marginal_error = float(max(np.abs(mass - 1.0 / self.n_bank).max(initial=0.0), self._row_error))
        self.log_u = self.absorbed_u + self.scale_u
        self.done = self.iterations >= self.limit or (self.iters is None and self.converged)
        self._sum = None
        if self.done:
            return
        with np.errstate(divide="ignore"):
            plain = -math.log(self.n_bank) - np.log(mass)  # the plain v-update's log(ṽ'/ṽ)
        if not np.isfinite(plain).all():  # only from a log_v start far from the iterates
            raise FloatingPointError("Sinkhorn: a bank query's coupling mass underflowed")
        self._dv = float(np.abs(plain).max(initial=0.0))
        self.scale_v += self._extrapolated(plain)
        self.log_v = self.absorbed_v + self.scale_v
        if max(np.abs(self.scale_u).max(initial=0.0), np.abs(self.scale_v).max(initial=0.0)) > ABSORB:
            self.phase = BUILD
            self.builds += 1
        else:
            self.phase = KERNEL

    def _extrapolated(self, plain: np.ndarray) -> np.ndarray:
        """The step of log v: the plain one, or once the plain change is below √tol (see the module's
        docstring) Anderson's extrapolation from the last ANDERSON_DEPTH + 1 points; the history
        starts again whenever an iteration does not reduce the change."""
        history = self._history
        if self.iters is not None or not self.accelerate or history[-1] >= math.sqrt(self.tol):
            return plain
        if len(history) >= 2 and not history[-1] < history[-2]:
            self._anderson.clear()
        self._anderson = [*self._anderson[-ANDERSON_DEPTH:], (self.absorbed_v + self.scale_v, plain)]
        if len(self._anderson) < 2:
            return plain
        points = np.stack([v for v, _ in self._anderson], axis=1)
        steps = np.stack([r for _, r in self._anderson], axis=1)
        d_steps, d_images = np.diff(steps, axis=1), np.diff(points + steps, axis=1)
        gamma = np.linalg.lstsq(d_steps, plain, rcond=None)[0]
        step = plain - (d_images @ gamma)
        if not np.isfinite(step).all():
            self._anderson.clear()
            return plain
        self.mixed += 1
        return step

    def result(self) -> SinkhornResult:
        return SinkhornResult(self.beta, self.log_u.copy(), self.log_v.copy(), self.iterations, self.change,
                              self.marginal_error, bool(self.converged))
