"""Sinkhorn Normalisation (sn) and Dual-Bank Sinkhorn (dbsn): the kernel (core.sinkhorn) and its
driver (streaming.sinkhorn) against the dense float64 oracle (tests/reference.py), hand-checked
fractions, the inverted-softmax equivalence, adversarial inputs, held vs recomputed scores, and the
probe/normalise API on top."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import reference as ref
import tolerance as tol
from conftest import N_BANK, N_GALLERY, f32_exact

import qbnorm_cli
from qbnorm_cli import QbnormWarning, UsageError
from qbnorm_cli.core.sinkhorn import Sinkhorn
from qbnorm_cli.io.specs import as_input
from qbnorm_cli.streaming import parallel
from qbnorm_cli.streaming.budget import Budget
from qbnorm_cli.streaming.sinkhorn import memory_to_hold, plan, run_sinkhorn
from qbnorm_cli.streaming.sources import Embeddings, EmbeddingScores, MatrixScores

BUDGETS = {
    "default": Budget(),                 # one block, held
    "rows1": Budget(block_rows=1),       # one item per block, one bank row per tile
    "rows10": Budget(block_rows=10),     # blocks and tiles that do not divide the data
    "mem400": Budget(memory=400),        # the budget's own choice: tiny blocks
}


def matrix(M) -> MatrixScores:
    return MatrixScores(as_input(np.asarray(M, dtype=np.float32), "mem"))


def random_pb(seed: int = 3, n_gallery_bank: int = 13) -> np.ndarray:
    """Bank × gallery-bank scores, float32-exact, for the dual-bank problems."""
    return f32_exact(np.random.default_rng(seed).uniform(-1, 1, (N_BANK, n_gallery_bank)))


def streamed(P, beta, *, PB=None, iters=None, tol_=1e-10, max_iters=100_000, budget=Budget(), hold=None,
             log_v=None, accelerate=False):
    """(sn state, dbsn state or None) after run_sinkhorn over float32 score matrices; plain
    iterations unless `accelerate` (then they stop elsewhere than the reference's)."""
    P = np.asarray(P)
    single = Sinkhorn(beta, P.shape[0], P.shape[1], iters=iters, tol=tol_, max_iters=max_iters, log_v=log_v,
                      accelerate=accelerate)
    segments, problems = [matrix(P)], [(single, 1)]
    dual = None
    if PB is not None:
        dual = Sinkhorn(beta, P.shape[0], P.shape[1] + PB.shape[1], iters=iters, tol=tol_, max_iters=max_iters,
                        accelerate=accelerate)
        segments.append(matrix(PB))
        problems.append((dual, 2))
    run_sinkhorn(segments, problems, budget, hold=hold)
    return single, dual


def core_run(P, beta, **kwargs) -> Sinkhorn:
    """The core kernel alone on float64 scores, the whole matrix as one block (no float32 reading)."""
    P = np.asarray(P, dtype=np.float64)
    state = Sinkhorn(beta, P.shape[0], P.shape[1], **kwargs)
    T = np.ascontiguousarray(P.T)
    K = np.empty(T.shape, dtype=np.float32)
    while not state.done:
        state.begin_pass()
        if state.first:
            state.fold_first(state.first_part(T, 0))
        elif state.phase == "build":
            state.fold(state.build(T, 0, K))
        else:
            state.fold(state.step(K, 0))
        state.end_pass()
    return state


def bound(P, beta, result, iterations=None) -> float:
    """tolerance.sinkhorn32 for the problem of P (exponent magnitudes from the reference's scalings),
    for the package's float32-kernel iterations against the exact values (it bounds the reference's
    float64 evaluation too): two are within twice this of each other."""
    magnitude = beta * float(np.abs(P).max()) + float(np.abs(result.log_u).max()) + float(np.abs(result.log_v).max())
    n_terms = max(np.shape(P))
    return tol.sinkhorn32(result.iterations if iterations is None else iterations, n_terms, magnitude, np.size(P))


def assert_scalings(state, want, P, beta) -> None:
    """The package's state agrees with a reference SinkhornResult of the same number of iterations."""
    assert state.iterations == want.iterations
    b = 2 * bound(P, beta, want)
    tol.assert_close(state.log_u, want.log_u, b)
    tol.assert_close(state.log_v, want.log_v, b)
    # the marginal errors: π entries within e^{2b} relative, sums of 1/n_b … plus the oracle's rounding
    rounding = tol.gamma(4 * max(P.shape), tol.U64)
    tol.assert_close(state.marginal_error, want.marginal_error, 4 * b / P.shape[0] + rounding)


def assert_stops_clearly(P, beta, tol_) -> ref.SinkhornResult:
    """The oracle's converged run, on data whose stopping iteration no rounding within the bound can move."""
    want = ref.sinkhorn(P, beta, tol=tol_)
    before = ref.sinkhorn(P, beta, iters=want.iterations - 1)
    b = 2 * bound(P, beta, want)
    assert want.change < tol_ - 2 * b and before.change > tol_ + 2 * b, "stops near the tolerance: choose other data"
    return want


# --- the oracle, through every block path -----------------------------------------------------------

@pytest.mark.parametrize("budget", BUDGETS.values(), ids=BUDGETS.keys())
@pytest.mark.parametrize("beta", [1.0, 20.0, 100.0])
@pytest.mark.parametrize("iters", [1, 2, 10])
def test_fixed_iterations_equal_the_reference(rnd, budget, beta, iters):
    PB = random_pb()
    sn, dbsn = streamed(rnd.P, beta, PB=PB, iters=iters, budget=budget)
    assert_scalings(sn, ref.sinkhorn(rnd.P, beta, iters=iters), rnd.P, beta)
    assert_scalings(dbsn, ref.dual_bank_sinkhorn(rnd.P, PB, beta, iters=iters), np.hstack([rnd.P, PB]), beta)
    assert sn.done and dbsn.done and dbsn.log_u.shape == (N_GALLERY + PB.shape[1],)


@pytest.mark.parametrize("budget", BUDGETS.values(), ids=BUDGETS.keys())
@pytest.mark.parametrize(("beta", "tol_"), [(1.0, 1e-4), (5.0, 1e-3), (20.0, 1e-3), (20.0, 2e-3)])
def test_converged_runs_stop_where_the_reference_stops(rnd, budget, beta, tol_):
    want = assert_stops_clearly(rnd.P, beta, tol_)
    sn, _ = streamed(rnd.P, beta, tol_=tol_, budget=budget)
    assert_scalings(sn, want, rnd.P, beta)
    assert sn.converged and not sn.hit_limit and sn.change < tol_


def test_dual_bank_converges_with_the_reference(rnd):
    PB = random_pb()
    stacked = np.hstack([rnd.P, PB])
    want = assert_stops_clearly(stacked, 20.0, 1e-3)
    for budget in (Budget(), Budget(block_rows=10)):
        _, dbsn = streamed(rnd.P, 20.0, PB=PB, tol_=1e-3, budget=budget)
        assert_scalings(dbsn, want, stacked, 20.0)
        np.testing.assert_array_equal(want.log_u[:N_GALLERY].shape, dbsn.log_u[:N_GALLERY].shape)


def oscillation(x) -> float:
    return float(np.max(x) - np.min(x))


def fixed_point_distance(X, log_u) -> float:
    """A bound on the Hilbert-metric distance max(log u − log u*) − min(…) from log u to Sinkhorn's
    fixed point for the kernel exp(X), X = β·P (bank × rows): the iteration is a contraction of rate
    κ = tanh(Δ/4)² in that metric, Δ = max over b, l, j, k of X[b, j] − X[l, j] − X[b, k] + X[l, k]
    (Birkhoff; Franklin & Lorenz, "On the scaling of multidimensional matrices", 1989), so the
    distance is at most that of one exact iteration from log u (the oracle's, plus its float64
    rounding) over 1 − κ."""
    X = np.asarray(X, dtype=np.float64)
    diff = X[:, None, :] - X[None, :, :]
    kappa = math.tanh(float((diff.max(axis=2) - diff.min(axis=2)).max()) / 4) ** 2
    moved = ref.sinkhorn_log_u(X, ref.sinkhorn_log_v(X, log_u))
    rounding = 2 * tol.sinkhorn64(1, max(X.shape), float(np.abs(X).max() + 2 * np.abs(moved).max()))
    return (oscillation(moved - log_u) + rounding) / (1 - kappa)


def assert_same_fixed_point(log_u, P, beta) -> None:
    """log u and the oracle's converged log u (tol 1e-13) are Sinkhorn scalings of the same fixed point:
    within the sum of their distances to it, up to the constant a scaling is defined up to."""
    X = beta * np.asarray(P, dtype=np.float64)
    want = ref.sinkhorn(P, beta, tol=1e-13)
    assert oscillation(log_u - want.log_u) <= fixed_point_distance(X, log_u) + fixed_point_distance(X, want.log_u)


@pytest.mark.parametrize("budget", [Budget(), Budget(block_rows=10)], ids=["held", "rows10"])
@pytest.mark.parametrize(("beta", "tol_"), [(1.0, 1e-9), (2.0, 1e-9)])
def test_acceleration_reaches_the_same_fixed_point(rnd, budget, beta, tol_):
    """Where Birkhoff's rate bounds the distance to the fixed point (small β·spread)."""
    PB = random_pb()
    plain, plain_dual = streamed(rnd.P, beta, PB=PB, tol_=tol_, budget=budget)
    fast, fast_dual = streamed(rnd.P, beta, PB=PB, tol_=tol_, budget=budget, accelerate=True)
    for state, before, stacked in ((fast, plain, rnd.P), (fast_dual, plain_dual, np.hstack([rnd.P, PB]))):
        assert state.converged and state.change < tol_ and state.iterations <= before.iterations
        assert_same_fixed_point(state.log_u, stacked, beta)
        # the plain iteration's constant (module docstring): second order in the change at the switch
        assert abs(np.mean(state.log_u - before.log_u)) < 100 * tol_


@pytest.mark.parametrize("beta", [20.0, 50.0])
def test_acceleration_takes_fewer_iterations(rnd, beta):
    PB = random_pb()
    plain, plain_dual = streamed(rnd.P, beta, PB=PB, tol_=1e-8)
    fast, fast_dual = streamed(rnd.P, beta, PB=PB, tol_=1e-8, accelerate=True)
    for state, before in ((fast, plain), (fast_dual, plain_dual)):
        assert state.converged and state.mixed > 0 and state.iterations < before.iterations
        assert state.marginal_error < 1e-6


def test_fixed_iterations_are_never_accelerated(rnd):
    state, _ = streamed(rnd.P, 1.0, iters=40, accelerate=True)
    assert state.mixed == 0 and state.iterations == 40
    assert_scalings(state, ref.sinkhorn(rnd.P, 1.0, iters=40), rnd.P, 1.0)


def test_a_kernel_is_rebuilt_when_the_scalings_leave_its_range():
    """From a log v start far from the iterates, the first kernel's scalings leave ±ABSORB: the
    kernel is built again from the scores, and the iterates stay the reference's."""
    rng = np.random.default_rng(12)
    P = f32_exact(rng.uniform(-1, 1, (9, 11)))
    start = np.linspace(-30.0, 30.0, 9)
    for budget in (Budget(), Budget(block_rows=4)):
        state, _ = streamed(P, 5.0, iters=6, log_v=start, budget=budget)
        assert state.builds >= 1
        X = 5.0 * P.astype(np.float64)
        log_u = ref.sinkhorn_log_u(X, start)
        for _ in range(5):
            log_v = ref.sinkhorn_log_v(X, log_u)
            log_u = ref.sinkhorn_log_u(X, log_v)
        magnitude = 5.0 + float(np.abs(log_u).max() + np.abs(log_v).max() + 30.0)
        b = 2 * tol.sinkhorn32(6, 11, magnitude, P.size)
        tol.assert_close(state.log_u, log_u, b)
        tol.assert_close(state.log_v, log_v, b)


def test_kernel_entries_below_the_smallest_normal_float32_are_zero():
    """A kernel entry is fl32 of its float64 value, or 0 where that value is below float32's
    smallest normal number: no subnormal ever reaches the products."""
    tiny = float(np.finfo(np.float32).tiny)
    beta, n_bank = 60.0, 7
    spread = np.linspace(-1.6, 0.0, n_bank)  # exp(β·spread) spans e^-96 … 1: around tiny once scaled
    scores_t = f32_exact(np.stack([spread + shift for shift in np.linspace(0.0, 0.3, 5)]))
    state = Sinkhorn(beta, n_bank, scores_t.shape[0], log_v=np.zeros(n_bank))
    state.begin_pass()
    out = np.full(scores_t.shape, np.nan, dtype=np.float32)
    state.build(scores_t, 0, out)
    x = beta * scores_t.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    exact = np.exp(x - top) * np.exp(top + state.absorbed_u[:, None])
    assert ((exact < tiny) & (exact > 0)).any() and (exact >= tiny).any()
    expected = np.where(exact < tiny, 0.0, exact).astype(np.float32)
    np.testing.assert_array_equal(out.view(np.int32), expected.view(np.int32))
    assert not ((out > 0) & (out < tiny)).any()


def test_from_embeddings_equals_the_reference(emb):
    """Scores computed block by block from (dyadic, exactly multiplied) embeddings, with a gallery bank."""
    data = emb.scores()
    PB = emb.bank.astype(np.float64) @ emb.gallery_bank.astype(np.float64).T
    for budget, hold in ((Budget(), None), (Budget(block_rows=8), None), (Budget(block_rows=8), True)):
        bank = Embeddings(as_input(emb.bank, "bank"), "dot", budget)
        segments = [EmbeddingScores(bank, Embeddings(as_input(emb.gallery, "gallery"), "dot", budget)),
                    EmbeddingScores(bank, Embeddings(as_input(emb.gallery_bank, "gallery_bank"), "dot", budget))]
        sn = Sinkhorn(2.0, N_BANK, N_GALLERY, iters=12)
        dbsn = Sinkhorn(2.0, N_BANK, N_GALLERY + len(emb.gallery_bank), iters=12)
        run_sinkhorn(segments, [(sn, 1), (dbsn, 2)], budget, hold=hold)
        assert_scalings(sn, ref.sinkhorn(data.P, 2.0, iters=12), data.P, 2.0)
        assert_scalings(dbsn, ref.dual_bank_sinkhorn(data.P, PB, 2.0, iters=12), np.hstack([data.P, PB]), 2.0)


def test_held_and_recomputed_scores_give_the_same_bits(rnd, emb):
    PB = random_pb()
    for budget in (Budget(), Budget(block_rows=10), Budget(memory=400)):
        held = streamed(rnd.P, 20.0, PB=PB, iters=15, budget=budget, hold=True)
        again = streamed(rnd.P, 20.0, PB=PB, iters=15, budget=budget, hold=False)
        for a, b in zip(held, again, strict=True):
            np.testing.assert_array_equal(a.log_u, b.log_u)
            np.testing.assert_array_equal(a.log_v, b.log_v)
            assert a.marginal_error == b.marginal_error and a.change == b.change
    budget = Budget(block_rows=19)  # two blocks (19 + 4 items) of two bank tiles (19 + 18 rows)
    runs = []
    for hold in (True, False):
        bank = Embeddings(as_input(emb.bank, "bank"), "cosine", budget)
        state = Sinkhorn(30.0, N_BANK, N_GALLERY, tol=1e-9)
        run_sinkhorn([EmbeddingScores(bank, Embeddings(as_input(emb.gallery, "gallery"), "cosine", budget))],
                     [(state, 1)], budget, hold=hold)
        runs.append(state)
    np.testing.assert_array_equal(runs[0].log_u, runs[1].log_u)
    assert runs[0].iterations == runs[1].iterations


def test_the_budget_decides_what_is_held():
    scores = matrix(np.zeros((1000, 100)))  # 400 kB of float32 scores, and as much per kernel
    whole = plan([scores], Budget(memory=2 << 20))                 # kernel and scores within half of 2 MiB
    every = set(range(len(whole.blocks)))
    assert whole.kernels == {(0, n) for n in every} and whole.scores == every
    kernel_only = plan([scores], Budget(memory=800_000))            # the kernel first, then no room for scores
    every = set(range(len(kernel_only.blocks)))
    assert kernel_only.kernels == {(0, n) for n in every} and kernel_only.scores == set()
    part = plan([scores], Budget(memory=700_000))                  # not within half: one β's kernel blocks that fit
    assert 0 < len(part.kernels) < len(part.blocks) and part.scores == set()  # (each saves a product and an exp)
    assert sum(4 * 1000 * (part.blocks[n].c1 - part.blocks[n].c0) for _, n in part.kernels) <= 350_000
    two = plan([scores], Budget(memory=1 << 20), counts=(1, 1))     # two β's kernels do not fit: the scores
    assert two.scores == set(range(len(two.blocks)))                  # first, then the kernel blocks that fit
    assert all(len({n for p, n in two.kernels if p == problem}) < len(two.blocks) for problem in (0, 1))
    three = plan([scores], Budget(memory=2 << 20), counts=(1, 1, 1))  # the scores, then one β's kernel
    assert three.scores == set(range(len(three.blocks)))
    kernel_blocks = lambda problem: {n for p, n in three.kernels if p == problem}
    assert kernel_blocks(0) == set(range(len(three.blocks))) and len(kernel_blocks(1)) < len(three.blocks)
    assert kernel_blocks(2) == set()
    assert plan([scores], Budget(block_rows=10)).kernels == set()   # blocks fixed by hand: recomputed
    blocks = plan([scores, matrix(np.zeros((1000, 30)))], Budget(block_rows=40)).blocks
    assert [(b.segment, b.c0, b.c1, b.offset) for b in blocks] == [(0, 0, 40, 0), (0, 40, 80, 40), (0, 80, 100, 80),
                                                                  (1, 0, 30, 100)]
    assert memory_to_hold(20_000, 100_000) == 16 * 10**9  # the hint probe prints: 4 bytes a score, half the budget


def test_a_held_kernel_keeps_its_scores_until_it_is_built(rnd):
    """Kernels held, scores not: the build reads the scores the first pass left in the kernel's room
    (no second product), and gives the bits of a run that recomputes everything."""
    reads = []

    class Counted(MatrixScores):
        def column_block(self, c0, c1):
            reads.append((c0, c1))
            super().column_block(c0, c1)

    budget = Budget(memory=8000)  # half: 4000 bytes, sn's kernel (3404) but not its scores as well
    state = Sinkhorn(20.0, N_BANK, N_GALLERY, iters=5)
    held = run_sinkhorn([Counted(as_input(np.asarray(rnd.P, dtype=np.float32), "mem"))], [(state, 1)], budget)
    assert held == [True] and sum(c1 - c0 for c0, c1 in reads) == N_GALLERY  # every column read once
    again, _ = streamed(rnd.P, 20.0, iters=5, budget=budget, hold=False)
    np.testing.assert_array_equal(state.log_u, again.log_u)
    np.testing.assert_array_equal(state.log_v, again.log_v)


def test_each_problem_says_whether_its_kernel_was_held(rnd):
    """Two sn kernels (37 × 23 float32: 3404 bytes each) and dbsn's (5328) do not fit half of the
    budget (9000 bytes): the scores (5328) are held first, then the first sn kernel only."""
    PB = random_pb()
    sn = Sinkhorn(5.0, N_BANK, N_GALLERY, iters=3)
    other = Sinkhorn(2.0, N_BANK, N_GALLERY, iters=3)
    dbsn = Sinkhorn(5.0, N_BANK, N_GALLERY + PB.shape[1], iters=3)
    held = run_sinkhorn([matrix(rnd.P), matrix(PB)], [(sn, 1), (other, 1), (dbsn, 2)], Budget(memory=18000))
    assert held == [True, False, False]
    assert_scalings(sn, ref.sinkhorn(rnd.P, 5.0, iters=3), rnd.P, 5.0)


def test_on_several_cores_the_result_is_the_same_every_time(rnd, monkeypatch):
    """Work split over threads (forced on this small data) is folded in order: deterministic, and
    within the bound of the one-thread result."""
    serial, _ = streamed(rnd.P, 20.0, iters=8)
    monkeypatch.setattr(parallel, "PARALLEL_MIN_ITEMS", 0)
    monkeypatch.setattr(parallel, "workers", lambda: 3)
    runs = [streamed(rnd.P, 20.0, iters=8)[0] for _ in range(3)]
    for run in runs[1:]:
        np.testing.assert_array_equal(run.log_u, runs[0].log_u)
        np.testing.assert_array_equal(run.log_v, runs[0].log_v)
    want = ref.sinkhorn(rnd.P, 20.0, iters=8)
    tol.assert_close(runs[0].log_u, serial.log_u, 2 * bound(rnd.P, 20.0, want))


# --- hand-checked values ---------------------------------------------------------------------------

K_HAND = [[4, 1, 1], [2, 2, 1]]  # K = exp(β·P) at β = 1, bank × gallery


def test_one_iteration_matches_fractions_worked_by_hand():
    # tests/test_reference_sinkhorn.py works these out: v = (1/4, 3/10), u = (5/24, 20/51, 20/33)
    P = np.log(np.array(K_HAND, dtype=np.float64))
    state = core_run(P, 1.0, iters=1)
    few = tol.sinkhorn32(1, 3, 2.0, 6)
    tol.assert_close(state.log_v, np.log([1 / 4, 3 / 10]), few)
    tol.assert_close(state.log_u, np.log([5 / 24, 20 / 51, 20 / 33]), few)
    # the bank marginal at (u, v): Σ_j K[b, j]·u_j·v_b = (1/4)(20/24 + 20/51 + 20/33), (3/10)(10/24 + 40/51 + 20/33)
    u = [Fraction(5, 24), Fraction(20, 51), Fraction(20, 33)]
    v = [Fraction(1, 4), Fraction(3, 10)]
    mass = [float(v[b] * sum(K_HAND[b][j] * u[j] for j in range(3))) for b in range(2)]
    tol.assert_close(state.marginal_error, max(abs(m - 0.5) for m in mass), 4 * few)
    assert state.iterations == 1 and state.done and not state.converged


def test_a_doubly_stochastic_kernel_is_fixed_after_one_iteration():
    beta = 3.0
    state = core_run(np.eye(2), beta, tol=1e-6)  # above the float32 kernel's rounding
    few = tol.sinkhorn32(2, 2, 2 * beta, 4)
    tol.assert_close(state.log_u, np.log([0.5, 0.5]), few)
    tol.assert_close(state.log_v, -np.log1p(np.exp(beta)) * np.ones(2), few)
    assert state.iterations == 2 and state.change <= few and state.marginal_error <= few


# --- inverted softmax ------------------------------------------------------------------------------

@pytest.mark.parametrize("const", [0.0, -2.5, 7.0])
def test_one_u_update_from_constant_v_is_inverted_softmax(rnd, const):
    """log u_j = −log n_g − LSE_b(β·P[b, j] + c): the IS offset −L_j, shifted by a constant."""
    beta = 20.0
    state, _ = streamed(rnd.P, beta, iters=1, log_v=np.full(N_BANK, const), budget=Budget(block_rows=4))
    want = -ref.log_norm(rnd.P, beta) - const - math.log(N_GALLERY)
    magnitude = beta * 2 + abs(const) + float(np.abs(want).max())
    tol.assert_close(state.log_u, want, 2 * tol.lse64(N_BANK, beta, 2.0, magnitude))
    # and η = β·S + log u ranks every row exactly as IS does (data without near-ties)
    sn_scores = beta * rnd.S + state.log_u
    is_scores, _ = ref.inverted_softmax(rnd.S, rnd.P, beta)
    tol.assert_separated(is_scores, 5, 4 * tol.lse64(N_BANK, beta, 2.0, magnitude))
    np.testing.assert_array_equal(ref.row_top(sn_scores, 5), ref.row_top(is_scores, 5))


# --- adversarial inputs --------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [100.0, 300.0, 1000.0])
def test_large_beta_converges_and_stays_finite(beta):
    # exp(1000·P) overflows float64 beyond P ≈ 0.71; neither the oracle nor the kernel forms it
    P = f32_exact(np.random.default_rng(23).uniform(-1, 1, (5, 7)))  # the oracle's own test data (< 800 iterations)
    want = ref.sinkhorn(P, beta, tol=1e-10)
    for budget in (Budget(), Budget(block_rows=5)):  # held; two blocks (5 + 2 items) recomputed on every pass
        state, _ = streamed(P, beta, tol_=1e-10, budget=budget)
        assert np.isfinite(state.log_u).all() and np.isfinite(state.log_v).all()
        assert state.converged and state.marginal_error < 1e-10
        assert state.iterations == want.iterations
        tol.assert_close(state.log_u, want.log_u, 2 * bound(P, beta, want))


def test_duplicated_bank_rows_change_nothing(rnd):
    """The same transport problem with each bank query's mass split over two copies."""
    twice = np.vstack([rnd.P, rnd.P])
    for iters in (3, None):
        one, _ = streamed(rnd.P, 10.0, iters=iters)
        two, _ = streamed(twice, 10.0, iters=iters)
        assert one.iterations == two.iterations
        b = 2 * bound(twice, 10.0, ref.sinkhorn(twice, 10.0, iters=one.iterations))
        tol.assert_close(two.log_u, one.log_u, b)
        tol.assert_close(two.log_v, np.tile(one.log_v - np.log(2), 2), b)


def test_an_item_no_bank_query_is_near_still_gets_its_mass():
    rng = np.random.default_rng(10)
    P = f32_exact(rng.uniform(-0.2, 0.2, (6, 4)) + 0.5)
    P[:, 3] = f32_exact(-0.9)
    want = ref.sinkhorn(P, 50.0)
    state, _ = streamed(P, 50.0)
    assert np.isfinite(state.log_u).all() and state.marginal_error < 1e-10
    assert np.argmax(state.log_u) == 3 and state.log_u[3] - np.delete(state.log_u, 3).max() > 50.0
    tol.assert_close(state.log_u, want.log_u, 2 * bound(P, 50.0, want))


@pytest.mark.parametrize("beta", [100.0, 1000.0])
def test_float32_embeddings_at_large_beta_stay_finite(beta):
    rng = np.random.default_rng(4)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    bank, gallery = unit(rng.standard_normal((60, 16))), unit(rng.standard_normal((40, 16)))
    budget = Budget(block_rows=30)  # two blocks (30 + 10 items) of two tiles, recomputed on every pass
    for iters in (25, None):  # truncated, and iterating (at most 300 iterations: β = 1000 needs far more)
        state = Sinkhorn(beta, 60, 40, iters=iters, max_iters=300)
        scores = EmbeddingScores(Embeddings(as_input(bank, "b"), "cosine", budget),
                                 Embeddings(as_input(gallery, "g"), "cosine", budget))
        run_sinkhorn([scores], [(state, 1)], budget)
        assert np.isfinite(state.log_u).all() and np.isfinite(state.log_v).all()
        assert 0 <= state.marginal_error <= 1  # a truncated run at β = 1000 is far from the marginals
        if iters is None:
            assert state.converged != state.hit_limit and (state.marginal_error < 1e-6 or state.hit_limit)


def test_a_run_that_stops_at_the_limit_says_so(rnd):
    state, _ = streamed(rnd.P, 100.0, tol_=1e-12, max_iters=3)
    assert state.iterations == 3 and state.hit_limit and not state.converged
    fixed, _ = streamed(rnd.P, 100.0, iters=3)
    assert not fixed.hit_limit  # a fixed number of iterations is what was asked for
    np.testing.assert_array_equal(fixed.log_u, state.log_u)


# --- probe and normalise -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def probed(emb):
    """A probe of dyadic embeddings (dot: exact float32 products) with sn and dbsn potentials."""
    return qbnorm_cli.probe(emb.bank, emb.gallery, gallery_bank=emb.gallery_bank, betas=[2.0, 5.0],
                            similarity="dot", sinkhorn=True, sinkhorn_tol=1e-9, block_rows=19)


def test_probe_records_the_potentials_of_every_beta(emb, probed):
    data = emb.scores()
    PB = emb.bank.astype(np.float64) @ emb.gallery_bank.astype(np.float64).T
    assert probed.sinkhorn_betas() == [2.0, 5.0] and probed.sinkhorn_betas(dual=True) == [2.0, 5.0]
    for beta, run, dual_run in zip((2.0, 5.0), probed.sinkhorn_runs(), probed.sinkhorn_runs(dual=True), strict=True):
        want = ref.sinkhorn(data.P, beta, tol=1e-9)  # plain: accelerated, the probe needs fewer
        assert run == {"beta": beta, "iterations": run["iterations"], "change": run["change"],
                       "marginal_error": run["marginal_error"], "converged": True,
                       "held": False}  # block_rows fixed by hand: recomputed on every pass
        assert run["iterations"] <= want.iterations and run["change"] < 1e-9
        assert_same_fixed_point(probed.sinkhorn_log_u(beta), data.P, beta)
        want = ref.dual_bank_sinkhorn(data.P, PB, beta, tol=1e-9)
        assert dual_run["iterations"] <= want.iterations and dual_run["converged"]
        _, dual = streamed(data.P, beta, PB=PB, tol_=1e-9, budget=Budget(block_rows=19), accelerate=True)
        np.testing.assert_array_equal(probed.sinkhorn_log_u(beta, dual=True), dual.log_u[:N_GALLERY])
    assert probed.params["sinkhorn"] and probed.params["dual_sinkhorn"] and probed.params["sinkhorn_tol"] == 1e-9
    attrs = probed.datasets["/sinkhorn_log_u"].attrs
    assert attrs["tol"] == 1e-9 and attrs["max_iters"] == 1000 and attrs["fixed_iters"] == 0
    assert probed.datasets["/dual_sinkhorn_log_u"].attrs["gallery_bank_rows"] == len(emb.gallery_bank)


@pytest.mark.parametrize("top_k", [None, 5])
def test_sn_and_dbsn_normalise_as_the_reference(emb, probed, top_k):
    data = emb.scores()
    PB = emb.bank.astype(np.float64) @ emb.gallery_bank.astype(np.float64).T
    for method in ("sn", "dbsn"):
        want, _ = ref.normalise(method, data.S, data.P, PB=PB, beta=5.0, tol=1e-9)
        stacked = np.hstack([data.P, PB]) if method == "dbsn" else data.P
        b = 2 * bound(stacked, 5.0, ref.sinkhorn(stacked, 5.0, tol=1e-9)) + tol.eval64(float(np.abs(want).max()))
        got = qbnorm_cli.normalise(emb.queries, emb.gallery, probed, method=method, beta=5.0, similarity="dot",
                                   top_k=top_k)
        if top_k is None:
            tol.assert_close(got, want, b)
        else:
            tol.assert_separated(want, top_k, b)
            np.testing.assert_array_equal(got.indices, ref.row_top(want, top_k))
            assert got.normalised.all()


def test_fixed_iterations_through_the_api(emb):
    data = emb.scores()
    probe = qbnorm_cli.probe(emb.bank, emb.gallery, betas=[5.0], similarity="dot", sinkhorn=True, sinkhorn_iters=3)
    want = ref.sinkhorn(data.P, 5.0, iters=3)
    assert probe.sinkhorn_runs()[0]["iterations"] == 3
    tol.assert_close(probe.sinkhorn_log_u(5.0), want.log_u, 2 * bound(data.P, 5.0, want))
    assert probe.params["sinkhorn_iters"] == 3 and probe.params["sinkhorn_tol"] is None
    assert probe.sinkhorn_betas(dual=True) == []  # no gallery bank: sn only


def test_the_api_warns_when_the_limit_is_hit(emb):
    with pytest.warns(QbnormWarning, match=r"Sinkhorn at β=1 did not converge.*after 4 iterations "
                                           r"\(sinkhorn_max_iters 4\)"):
        probe = qbnorm_cli.probe(emb.bank, emb.gallery, betas=[1.0], similarity="dot", sinkhorn=True,
                                 sinkhorn_max_iters=4, sinkhorn_tol=1e-12)
    assert probe.sinkhorn_runs()[0]["converged"] is False and any("did not converge" in w for w in probe.warnings)


def test_api_errors_name_the_parameters(emb, probed):
    plain = qbnorm_cli.probe(emb.bank, emb.gallery, betas=[2.0], similarity="dot")
    with pytest.raises(UsageError, match=r"the probe has no Sinkhorn potentials; probe again with sinkhorn=True"):
        qbnorm_cli.normalise(emb.queries, emb.gallery, plain, method="sn", similarity="dot")
    with pytest.raises(UsageError, match=r"^beta 7: .* Sinkhorn potentials for betas 2, 5; probe again with betas 7"):
        qbnorm_cli.normalise(emb.queries, emb.gallery, probed, method="sn", beta=7.0, similarity="dot")
    with pytest.raises(UsageError, match=r"no dual-bank Sinkhorn potentials; probe again with sinkhorn=True and "
                                         r"gallery_bank"):
        qbnorm_cli.normalise(emb.queries, emb.gallery, plain, method="dbsn", similarity="dot")
    cases = [({"sinkhorn_iters": 0}, r"^sinkhorn_iters 0: must be at least 1"),
             ({"sinkhorn_iters": 2.5}, r"^sinkhorn_iters 2.5: expected a whole number"),
             ({"sinkhorn_tol": 0.0}, r"^sinkhorn_tol 0.0: must be a finite number > 0"),
             ({"sinkhorn_tol": float("nan")}, r"^sinkhorn_tol nan: must be a finite number > 0"),
             ({"sinkhorn_max_iters": 0}, r"^sinkhorn_max_iters 0: must be at least 1"),
             ({"sinkhorn_iters": 5, "sinkhorn_tol": 1e-3}, r"give either sinkhorn_iters .* or sinkhorn_tol")]
    for kwargs, message in cases:
        with pytest.raises(UsageError, match=message):
            qbnorm_cli.probe(emb.bank, emb.gallery, sinkhorn=True, **kwargs)
    with pytest.raises(UsageError, match=r"^sinkhorn_iters needs sinkhorn=True"):
        qbnorm_cli.probe(emb.bank, emb.gallery, sinkhorn_iters=5)
    with pytest.raises(UsageError, match=r"^bank_gallery_bank_sims is for the dual-bank Sinkhorn: add sinkhorn=True"):
        qbnorm_cli.probe(emb.bank, emb.gallery, bank_gallery_bank_sims=np.zeros((N_BANK, 3)))


def test_precomputed_bank_gallery_bank_scores(emb):
    data = emb.scores()
    PB = emb.bank.astype(np.float64) @ emb.gallery_bank.astype(np.float64).T
    probe = qbnorm_cli.probe(bank_sims=data.P, bank_gallery_bank_sims=PB, betas=[5.0], sinkhorn=True,
                             sinkhorn_iters=6)
    want = ref.dual_bank_sinkhorn(data.P, PB, 5.0, iters=6)
    tol.assert_close(probe.sinkhorn_log_u(5.0, dual=True), want.log_u[:N_GALLERY],
                     2 * bound(np.hstack([data.P, PB]), 5.0, want))
    assert len(probe.inputs) == 2  # the bank × gallery and the bank × gallery-bank scores
    with pytest.raises(qbnorm_cli.DataError, match=r"has 36 rows but the bank has 37 queries"):
        qbnorm_cli.probe(bank_sims=data.P, bank_gallery_bank_sims=PB[1:], sinkhorn=True)
    with pytest.raises(qbnorm_cli.DataError, match=r"has 28 columns but the gallery bank has 29 items"):
        qbnorm_cli.probe(bank_sims=data.P, gallery_bank_sims=data.H, bank_gallery_bank_sims=PB[:, 1:], sinkhorn=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", QbnormWarning)
        # without the bank × gallery-bank scores there is no dbsn (sn only), and no complaint
        probe = qbnorm_cli.probe(bank_sims=data.P, gallery_bank_sims=data.H, betas=[5.0], sinkhorn=True,
                                 sinkhorn_iters=2)
    assert probe.sinkhorn_betas(dual=True) == [] and probe.sinkhorn_betas() == [5.0]


def test_permuting_the_gallery_or_the_bank_permutes_the_scalings(rnd):
    rng = np.random.default_rng(8)
    items, queries = rng.permutation(N_GALLERY), rng.permutation(N_BANK)
    base, _ = streamed(rnd.P, 20.0, iters=30, budget=Budget(block_rows=19))
    b = 2 * bound(rnd.P, 20.0, ref.sinkhorn(rnd.P, 20.0, iters=30))
    moved, _ = streamed(rnd.P[:, items], 20.0, iters=30, budget=Budget(block_rows=19))
    tol.assert_close(moved.log_u, base.log_u[items], b)
    tol.assert_close(moved.log_v, base.log_v, b)
    moved, _ = streamed(rnd.P[queries], 20.0, iters=30, budget=Budget(block_rows=19))
    tol.assert_close(moved.log_u, base.log_u, b)
    tol.assert_close(moved.log_v, base.log_v[queries], b)


def test_a_probe_in_memory_saves_and_loads_its_potentials(tmp_path, probed):
    probed.save(tmp_path / "p.h5")
    with qbnorm_cli.Probe.load(tmp_path / "p.h5") as loaded:
        assert loaded.sinkhorn_runs() == probed.sinkhorn_runs()
        assert loaded.sinkhorn_runs(dual=True) == probed.sinkhorn_runs(dual=True)
        for beta in (2.0, 5.0):
            for dual in (False, True):
                np.testing.assert_array_equal(loaded.sinkhorn_log_u(beta, dual), probed.sinkhorn_log_u(beta, dual))
        np.testing.assert_array_equal(loaded.column_mean(), probed.column_mean())
        assert loaded.params["sinkhorn_tol"] == 1e-9


# --- warm starts: several β of one probe, each from the solutions of the others ---------------------

def several(P, betas, *, warm, budget=Budget(), iters=None, PB=None):
    """The states of sn (and dbsn) runs of every β, run together by run_sinkhorn."""
    kind = {"iters": iters} if iters is not None else {"tol": 1e-9}
    states = [(Sinkhorn(beta, P.shape[0], P.shape[1], **kind), 1) for beta in betas]
    segments = [matrix(P)]
    if PB is not None:
        states += [(Sinkhorn(beta, P.shape[0], P.shape[1] + PB.shape[1], **kind), 2) for beta in betas]
        segments.append(matrix(PB))
    run_sinkhorn(segments, states, budget, warm=warm)
    return [state for state, _ in states]


@pytest.mark.parametrize("betas", [[1.0, 1.5, 2.0], [20.0, 30.0, 40.0, 50.0]])
def test_warm_starts_reach_the_same_fixed_point_in_fewer_iterations(rnd, betas):
    """Each β after the first starts from the others' solutions: fewer iterations to the same
    tolerance, the same scalings up to Sinkhorn's constant (u·c, v/c), the same rankings."""
    PB = random_pb()
    cold = several(rnd.P, betas, warm=False, PB=PB)
    warm = several(rnd.P, betas, warm=True, PB=PB)
    assert sum(s.iterations for s in warm) < sum(s.iterations for s in cold)
    for before, state in zip(cold, warm, strict=True):
        assert state.converged and state.iterations <= before.iterations
        rows = np.hstack([rnd.P, PB]) if state.n_rows > N_GALLERY else rnd.P
        if state.beta <= 2.0:  # where Birkhoff's rate bounds the distance to the fixed point
            assert_same_fixed_point(state.log_u, rows, state.beta)
        # a change below tol bounds the distance only up to 1/(1 − κ): checked against the cold run
        assert oscillation(state.log_u - before.log_u) < 1e-5
        n = N_GALLERY
        np.testing.assert_array_equal(np.argsort(rnd.S + state.log_u[:n] / state.beta, axis=1, kind="stable"),
                                      np.argsort(rnd.S + before.log_u[:n] / state.beta, axis=1, kind="stable"))
    assert warm[0].iterations == cold[0].iterations  # the first β starts cold
    np.testing.assert_array_equal(warm[0].log_u, cold[0].log_u)


def test_warm_starts_only_where_the_scores_are_held(rnd):
    """Run apart, the β would each recompute the scores of their first pass and build: not warm-started.
    Blocks fixed by hand hold nothing; at 12,000 bytes a run apart holds some blocks' scores, not all."""
    partly = Budget(memory=12000)
    layout = plan([matrix(rnd.P)], partly, counts=(1,))
    assert 0 < len(layout.scores) < len(layout.blocks)
    for budget in (Budget(block_rows=19), partly):
        cold = several(rnd.P, [20.0, 30.0], warm=False, budget=budget)
        warm = several(rnd.P, [20.0, 30.0], warm=True, budget=budget)
        for before, state in zip(cold, warm, strict=True):
            np.testing.assert_array_equal(state.log_u, before.log_u)
            assert state.iterations == before.iterations


def test_fixed_iterations_are_never_warm_started(rnd):
    """--sinkhorn-iters N reproduces the paper's truncated runs: POT's start for every β."""
    cold = several(rnd.P, [1.0, 2.0, 5.0], warm=False, iters=10)
    warm = several(rnd.P, [1.0, 2.0, 5.0], warm=True, iters=10)
    for before, state in zip(cold, warm, strict=True):
        np.testing.assert_array_equal(state.log_u, before.log_u)
        assert state.iterations == 10 and state.mixed == 0
        assert_scalings(state, ref.sinkhorn(rnd.P, state.beta, iters=10), rnd.P, state.beta)
    with pytest.raises(ValueError, match="before the first pass of a converging run"):
        Sinkhorn(1.0, N_BANK, N_GALLERY, iters=10, log_u=np.zeros(N_GALLERY))


def test_a_log_u_start_is_a_v_update_from_it(rnd):
    """log_u=: the first pass is the v-update from the given item scalings, as the reference's is."""
    start = np.linspace(-1.0, 1.0, N_GALLERY)
    state = core_run(rnd.P, 3.0, tol=1e-300, max_iters=1, log_u=start)
    want_v = ref.sinkhorn_log_v(3.0 * rnd.P, start)
    want_u = ref.sinkhorn_log_u(3.0 * rnd.P, want_v)
    b = 2 * bound(rnd.P, 3.0, state)
    tol.assert_close(state.log_v, want_v, b)
    tol.assert_close(state.log_u, want_u, b)
    with pytest.raises(ValueError, match="log_u or log_v"):
        Sinkhorn(1.0, N_BANK, N_GALLERY, log_u=start, log_v=np.zeros(N_BANK))
    state = Sinkhorn(1.0, N_BANK, N_GALLERY)
    state.begin_pass()
    with pytest.raises(ValueError, match="before the first pass"):
        state.start_from(start)


def test_a_vanished_kernel_row_is_one_error_and_no_warning():
    """The kernel pass checks its rows once after the products: a row of zeros raises, warning nothing."""
    state = Sinkhorn(1.0, 4, 3)
    state.phase = "kernel"
    state.begin_pass()
    kernel = np.ones((3, 4), dtype=np.float32)
    kernel[1] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(FloatingPointError, match="kernel row vanished"):
            state.step(kernel, 0)


# --- the first v-update from the probe's own pass ----------------------------------------------------

def _accumulated(P, betas, block: int = 5, rows: int = 7):
    """A BankAccumulator with row sums fed P in column blocks and row tiles, as a probe pass feeds it."""
    from qbnorm_cli.core.statistics import BankAccumulator

    P32 = np.asarray(P, dtype=np.float32)
    acc = BankAccumulator(P32.shape[0], P32.shape[1], np.asarray(betas, dtype=np.float64), 2, row_sums=True)
    for c0 in range(0, P32.shape[1], block):
        acc.start_block(c0, min(c0 + block, P32.shape[1]))
        for r0 in range(0, P32.shape[0], rows):
            acc.update(r0, P32[r0:r0 + rows, c0:c0 + block])
        acc.finish_block()
    return acc


@pytest.mark.parametrize("betas", [[20.0], [1.0, 100.0]])
def test_a_probe_pass_sums_each_row_as_the_first_v_update_needs(rnd, betas):
    """BankAccumulator(row_sums=True): each bank row's log Σ_j exp(β·P) from the pass's own
    exponentials, within lse64's bound of the oracle, whatever the blocks and tiles; the first
    v-update from it (core.sinkhorn.first_v_update) is the reference's from POT's start."""
    from qbnorm_cli.core.sinkhorn import first_v_update

    acc = _accumulated(rnd.P, betas)
    sums = acc.row_log_sums()
    assert sums.shape == (len(betas), N_BANK)
    spread = float(rnd.P.max() - rnd.P.min())
    for row, beta in enumerate(betas):
        want = np.array([np.logaddexp.reduce(beta * p) for p in rnd.P])
        magnitude = beta * float(np.abs(rnd.P).max()) + math.log(N_GALLERY)
        tol.assert_close(sums[row], want, tol.lse64(N_GALLERY, beta, spread, magnitude))
        start = np.full(N_GALLERY, -math.log(N_GALLERY))
        tol.assert_close(first_v_update(sums[row], N_GALLERY), ref.sinkhorn_log_v(beta * rnd.P, start),
                         2 * tol.lse64(N_GALLERY, beta, spread, magnitude))
    np.testing.assert_array_equal(_accumulated(rnd.P, betas, block=N_GALLERY, rows=N_BANK).row_log_sums().shape,
                                  sums.shape)


def test_row_sums_that_would_underflow_are_not_used():
    """A row whose every score lies more than 600/β below the best score sums exponentials near
    float64's smallest numbers: row_log_sums gives None, and the run makes its own first pass."""
    P = np.zeros((3, 4))
    P[0] = 0.9
    P[2] = -0.9
    assert _accumulated(P, [100.0]).row_log_sums() is not None  # 180 apart: accurate
    assert _accumulated(P, [1000.0]).row_log_sums() is None     # 1800 apart


def test_a_converging_probe_starts_from_its_pass_and_a_fixed_count_cold(emb, monkeypatch):
    """probe(sinkhorn=True) hands each converging sn run its first v-update from the probe's pass
    (no pass of its own: its first pass is the u-update), reaching the cold run's result; dbsn, a
    fixed count of iterations (the paper's runs) and a probe on a cluster start as POT starts."""
    from qbnorm_cli.api import probing

    seen = []
    real = probing.run_sinkhorn

    def spy(segments, problems, budget, **kwargs):
        seen.append([(state.n_rows, state.first) for state, _ in problems])
        return real(segments, problems, budget, **kwargs)

    monkeypatch.setattr(probing, "run_sinkhorn", spy)
    kwargs = dict(betas=[2.0, 5.0], similarity="dot", sinkhorn=True)
    got = qbnorm_cli.probe(emb.bank, emb.gallery, gallery_bank=emb.gallery_bank, sinkhorn_tol=1e-9, **kwargs)
    dual_rows = N_GALLERY + len(emb.gallery_bank)
    assert seen[-1] == [(N_GALLERY, False), (N_GALLERY, False), (dual_rows, True), (dual_rows, True)]
    qbnorm_cli.probe(emb.bank, emb.gallery, sinkhorn_iters=10, **kwargs)
    assert seen[-1] == [(N_GALLERY, True), (N_GALLERY, True)]
    data = emb.scores()
    for beta in (2.0, 5.0):
        cold, _ = streamed(data.P, beta, tol_=1e-9, accelerate=True)
        run = next(r for r in got.sinkhorn_runs() if r["beta"] == beta)
        assert run["iterations"] == cold.iterations
        tol.assert_close(got.sinkhorn_log_u(beta), cold.log_u, 2 * bound(data.P, beta, cold))


def test_a_transposed_tile_is_the_tile_transposed(emb):
    """The Sinkhorn driver's blocks (items × bank rows) are the score tiles transposed, bit for bit,
    from embeddings and from a score matrix."""
    from qbnorm_cli.streaming.sources import transposed_tile

    rows = Embeddings(as_input(emb.bank, "bank"), "cosine", Budget())
    cols = Embeddings(as_input(emb.gallery, "gallery"), "cosine", Budget())
    for source in (EmbeddingScores(rows, cols), matrix(emb.scores().P)):
        source.column_block(3, 17)
        want = source.tile(5, 30).T.copy()
        out = np.full((14 + 2, N_BANK + 4), np.nan, dtype=np.float32)  # its columns a view, as the driver's
        got = transposed_tile(source, 5, 30, out[:14, 5:30])
        np.testing.assert_array_equal(got, want)
        assert np.isnan(out[:14, :5]).all() and np.isnan(out[:14, 30:]).all()
