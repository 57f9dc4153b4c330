"""The Sinkhorn runs take the bank × gallery scores a probe's pass computed (streaming.sinkhorn.ScoreHandover)
and compute every other score in that pass's tiles: the same bits either way, for every budget."""

from __future__ import annotations

import numpy as np
import pytest

import qbnorm_cli
from qbnorm_cli.api import probing
from qbnorm_cli.core.sinkhorn import Sinkhorn
from qbnorm_cli.core.statistics import BankAccumulator
from qbnorm_cli.io.specs import as_input
from qbnorm_cli.streaming.budget import Budget
from qbnorm_cli.streaming.engine import probe_plan, run_probe
from qbnorm_cli.streaming.sinkhorn import ScoreHandover, run_sinkhorn
from qbnorm_cli.streaming.sources import Embeddings, EmbeddingScores

N_BANK, N_GALLERY, N_GALLERY_BANK, DIM = 60, 300, 40, 24


class CountedScores(EmbeddingScores):
    """Counts the products it computes."""

    products = 0

    def tile(self, r0, r1):
        self.products += 1
        return super().tile(r0, r1)


@pytest.fixture(scope="module")
def data():
    # float32 products of random embeddings: their rounding depends on the shape of each product
    rng = np.random.default_rng(11)
    return [rng.standard_normal((n, DIM)).astype(np.float32) for n in (N_BANK, N_GALLERY, N_GALLERY_BANK)]


def sources(data, budget):
    bank, gallery, gallery_bank = (Embeddings(as_input(x, name), "cosine", budget)
                                   for x, name in zip(data, ("bank", "gallery", "gallery_bank"), strict=True))
    return CountedScores(bank, gallery), CountedScores(bank, gallery_bank)


def problems(betas=(8.0, 12.0), dual_beta=10.0):
    return ([(Sinkhorn(b, N_BANK, N_GALLERY, tol=1e-9), 1) for b in betas]
            + [(Sinkhorn(dual_beta, N_BANK, N_GALLERY + N_GALLERY_BANK, tol=1e-9), 2)])


def run(data, budget, handing_over: bool):
    """A probe's pass over the gallery, then the sn and dbsn runs in its tiles (handed its scores or not)."""
    scores, cross = sources(data, budget)
    banks = [(scores, BankAccumulator(N_BANK, N_GALLERY, np.array([8.0]), 1))]
    tiles = probe_plan(banks, N_GALLERY, budget)
    handed = ScoreHandover([scores, cross], [1, 1, 2], budget, tiles) if handing_over else None
    run_probe(banks, N_GALLERY, budget, plan=tiles,
              on_tile=(lambda number, r0, c0, tile: handed.take(r0, c0, tile)) if handed else None)
    in_pass = scores.products
    runs = problems()
    run_sinkhorn([scores, cross], runs, budget, tiles=tiles, handed=handed)
    return [state for state, _ in runs], scores.products - in_pass, handed


# from every kernel and score held (one block of the pass, tiles of 13 bank rows) to three blocks
# of 133 columns, two kernels held
BUDGETS = [Budget(memory=m) for m in (800_000, 600_000, 500_000, 400_000, 100_000, 60_000)]


@pytest.mark.parametrize("budget", BUDGETS, ids=lambda budget: str(budget.memory))
def test_handed_over_scores_are_the_runs_own_to_the_bit(data, budget):
    handed_runs, handed_products, handed = run(data, budget, True)
    own_runs, own_products, _ = run(data, budget, False)
    for a, b in zip(handed_runs, own_runs, strict=True):
        assert a.converged and a.iterations == b.iterations
        np.testing.assert_array_equal(a.log_u, b.log_u)
        np.testing.assert_array_equal(a.log_v, b.log_v)
    # a held block's scores come from the pass, not from a product of the runs
    assert handed_products < own_products if handed.rooms else handed_products == own_products


def test_the_budgets_hand_over_into_held_scores_and_kernel_rooms(data):
    """What the cases above cover: rooms that are a block's held scores, rooms of kernels whose
    scores are not held, blocks handed over beside blocks that are not."""
    kinds = set()
    for budget in BUDGETS:
        scores, cross = sources(data, budget)
        tiles = probe_plan([(scores, BankAccumulator(N_BANK, N_GALLERY, np.array([8.0]), 1))], N_GALLERY, budget)
        handed = ScoreHandover([scores, cross], [1, 1, 2], budget, tiles)
        first = [number for number, block in enumerate(handed.layout.blocks) if block.segment == 0]
        kinds |= {"scores" if number in handed.layout.scores else "kernel" for number in handed.rooms}
        kinds |= {"partly"} if handed.rooms and len(handed.rooms) < len(first) else set()
        kinds |= {"rows"} if len({handed.layout.blocks[number].rows for number in first}) > 1 else set()
    assert kinds == {"scores", "kernel", "partly", "rows"}


def test_a_handover_for_other_runs_is_refused(data):
    budget = BUDGETS[0]
    scores, cross = sources(data, budget)
    tiles = probe_plan([(scores, BankAccumulator(N_BANK, N_GALLERY, np.array([8.0]), 1))], N_GALLERY, budget)
    handed = ScoreHandover([scores, cross], [1, 1, 2], budget, tiles)
    with pytest.raises(ValueError, match="laid out"):
        run_sinkhorn([scores], [(Sinkhorn(8.0, N_BANK, N_GALLERY), 1)], budget, tiles=tiles, handed=handed)
    with pytest.raises(ValueError, match="handed"):
        run_sinkhorn([scores, cross], problems(), budget, tiles=tiles, handed=handed, warm=True)


@pytest.mark.filterwarnings("ignore::qbnorm_cli.QbnormWarning")  # the bank's coverage of the gallery
def test_a_probe_hands_its_scores_over(data, monkeypatch):
    """probe(sinkhorn=True): the potentials of the runs that take the pass's scores are those of runs
    computing them again, to the bit; the pass hands over only where the runs hold them."""
    bank, gallery, gallery_bank = data
    taken = []
    monkeypatch.setattr(ScoreHandover, "take", lambda self, r0, c0, tile, take=ScoreHandover.take:
                        (taken.append(c0), take(self, r0, c0, tile)))

    def potentials(memory):
        result = qbnorm_cli.probe(bank, gallery, gallery_bank=gallery_bank, betas=[8.0, 12.0], sinkhorn=True,
                                  memory=memory)
        return [result.sinkhorn_log_u(8.0), result.sinkhorn_log_u(12.0),
                result.sinkhorn_log_u(8.0, dual=True), result.sinkhorn_log_u(12.0, dual=True)]

    handed = potentials("64MiB")
    assert taken
    monkeypatch.setattr(probing, "ScoreHandover", type("NotHanded", (ScoreHandover,), {
        "__init__": lambda self, *args: (ScoreHandover.__init__(self, *args), self.rooms.clear())[0]}))
    taken.clear()
    own = potentials("64MiB")
    assert not taken
    for a, b in zip(handed, own, strict=True):
        np.testing.assert_array_equal(a, b)
