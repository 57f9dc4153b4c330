"""The budget's one ledger (streaming/budget.py): fixed shares (held inputs 0.25 + 0.25, column
block 0.25, super-block 0.5, tiles 0.25) could add up to 1.5 times --memory; what a plan takes
from the ledger never exceeds it, and where the fixed shares did fit the blocks are the same."""

from __future__ import annotations

import numpy as np
import pytest

from qbnorm_cli.core.memory import mapped_empty
from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.core.statistics import BankAccumulator
from qbnorm_cli.io.specs import as_input
from qbnorm_cli.streaming import engine, ranking
from qbnorm_cli.streaming.budget import Budget, Ledger, aligned
from qbnorm_cli.streaming.sources import Embeddings, EmbeddingScores, held_bytes

DIM = 64


def embedding_scores(n_queries: int, n_gallery: int, budget: Budget) -> EmbeddingScores:
    rng = np.random.default_rng(5)
    queries = rng.standard_normal((n_queries, DIM)).astype(np.float32)
    gallery = rng.standard_normal((n_gallery, DIM)).astype(np.float32)
    return EmbeddingScores(Embeddings(as_input(queries, "queries"), "dot", budget),
                           Embeddings(as_input(gallery, "gallery"), "dot", budget, eager=False))


def dense_bytes(scores, plan) -> int:
    """What a dense run holds at once: inputs held whole, a column block, a super-block's rows, a tile."""
    budget_free = Budget()  # tile rows from the plan's room (None: the fixed quarter of `budget`)
    width, rows = plan.width, plan.super_rows
    row_state = scores.n_cols * (8 if plan.whole_rows else 20)
    tile_bytes = max(engine.tile_rows(w, budget_free, rows, scores.row_chunk, plan.tile_room) * w
                     * engine.TILE_BYTES_PER_SCORE for w in (width, scores.n_cols % width or width))
    return held_bytes(scores) + width * scores.col_bytes() + rows * row_state + tile_bytes


def fixed_share_dense_plan(scores, budget: Budget) -> tuple[int, int, dict, int]:
    """(width, super rows, tile rows by block width, bytes held at once) as fixed shares gave them
    before the ledger."""
    m = budget.memory
    width = min(aligned(max(1, int(m * 0.25 // scores.col_bytes())), scores.col_chunk), scores.n_cols)
    row_state = scores.n_cols * (8 if width >= scores.n_cols else 20)
    rows = min(aligned(max(1, int(m * 0.5 // row_state)), scores.row_chunk), scores.n_rows)
    if width >= scores.n_cols:
        rows = min(rows, aligned(max(1, engine.DENSE_BLOCK_BYTES // (8 * scores.n_cols)), scores.row_chunk))
    tiles = {}
    for w in (width, scores.n_cols % width or width):
        tile = min(aligned(max(1, int(m * 0.25 // (w * engine.TILE_BYTES_PER_SCORE))), scores.row_chunk), rows)
        tiles[w] = min(tile, aligned(max(1, engine.TILE_TARGET_BYTES // (4 * w)), scores.row_chunk))
    most = max(rows * w * engine.TILE_BYTES_PER_SCORE for w, rows in tiles.items())
    return width, rows, tiles, held_bytes(scores) + width * scores.col_bytes() + rows * row_state + most


def test_the_fixed_shares_over_committed_and_the_plan_does_not():
    """Queries and gallery each held within their quarter, then a column block, a super-block and
    tiles at their fixed shares: 1.3 × the budget. The plan from the ledger stays within it."""
    budget = Budget(memory=600_000)
    scores = embedding_scores(300, 500, budget)
    assert held_bytes(scores) == (300 + 500) * DIM * 4  # both held: 0.34 of the budget
    assert fixed_share_dense_plan(scores, budget)[3] > 1.25 * budget.memory  # what the old plan took
    plan = engine.dense_plan(scores, budget)
    assert dense_bytes(scores, plan) <= budget.memory


@pytest.mark.parametrize("memory", [1 << 16, 200_000, 400_000, 600_000, 1 << 20, 5 << 20, 1 << 30])
@pytest.mark.parametrize("n_queries, n_gallery", [(300, 500), (50, 3000), (2000, 40), (700, 3000)])
def test_dense_plans_fit_and_keep_the_blocks_that_fitted(memory, n_queries, n_gallery):
    budget = Budget(memory=memory)
    scores = embedding_scores(n_queries, n_gallery, budget)
    plan = engine.dense_plan(scores, budget)
    width, rows, tiles, fixed = fixed_share_dense_plan(scores, budget)
    if fixed <= memory:  # the fixed shares fitted: the same blocks, the same tiles of every block
        assert (plan.width, plan.super_rows) == (width, rows)
        for w, tile in tiles.items():
            assert engine.tile_rows(w, budget, plan.super_rows, None, plan.tile_room) == tile
    row_state = scores.n_cols * (8 if width >= scores.n_cols else 20)
    one_row_each = held_bytes(scores) + scores.col_bytes() + row_state + width * 48
    if one_row_each <= memory // 2:  # not a budget too small for one row of every block
        assert dense_bytes(scores, plan) <= memory


def probe_banks(budget: Budget, n_bank: int, n_gallery_bank: int, n_gallery: int):
    """A probe's banks: the bank and a gallery bank against one gallery, each input held when it
    fits its quarter (three quarters in all)."""
    rng = np.random.default_rng(7)
    gallery = Embeddings(as_input(rng.standard_normal((n_gallery, DIM)).astype(np.float32), "gallery"), "dot", budget)
    banks = []
    for n, name in ((n_bank, "bank"), (n_gallery_bank, "gallery_bank")):
        rows = Embeddings(as_input(rng.standard_normal((n, DIM)).astype(np.float32), name), "dot", budget)
        banks.append((EmbeddingScores(rows, gallery), BankAccumulator(n, n_gallery, np.array([20.0]), 10, (10,))))
    return banks


def probe_bytes(banks, plan, budget) -> int:
    """What a probe pass holds at once: the inputs held whole, a column block and its state, a tile."""
    held = sum(held_bytes(scores) for scores, _ in banks) - banks[0][0].cols.held_bytes()  # the gallery once
    col_bytes = max(scores.col_bytes() for scores, _ in banks)
    state = 16 * (1 + 2 * 10)
    tile = max(engine.tile_rows(plan.width, Budget(), scores.n_rows, scores.row_chunk, plan.tile_room)
               for scores, _ in banks) * plan.width * engine.TILE_BYTES_PER_SCORE
    return held + plan.width * (col_bytes + state) + tile


def test_a_probe_pass_with_three_held_inputs_fits():
    """Bank, gallery bank and gallery each held in their quarter (0.72 of the budget), then a
    column block and tiles at their quarters: 1.2 × the budget before the ledger; within it now."""
    budget = Budget(memory=2_000_000)
    banks = probe_banks(budget, 1900, 1900, 1900)
    assert all(held_bytes(scores) for scores, _ in banks)
    plan = engine.probe_plan(banks, 1900, budget)
    assert probe_bytes(banks, plan, budget) <= budget.memory


@pytest.mark.parametrize("memory", [1 << 20, 5 << 20, 1 << 30])
def test_probe_tiles_keep_their_quarter_where_it_fits(memory):
    """Where the shares fit, the tiles are those of the fixed quarter: the statistics' bits too."""
    budget = Budget(memory=memory)
    banks = probe_banks(budget, 300, 200, 500)
    plan = engine.probe_plan(banks, 500, budget)
    for scores, _ in banks:
        assert engine.tile_rows(plan.width, budget, scores.n_rows, scores.row_chunk, plan.tile_room) == \
            engine.tile_rows(plan.width, budget, scores.n_rows, scores.row_chunk)


def ranking_bytes(scores, plan, workers: int) -> int:
    geom = plan.geom
    row_bytes = 16 * (plan.raw_k + plan.norm_k) * (2 + ranking.Tiling().safety) + 32
    return (held_bytes(scores) + geom.block_columns * scores.col_bytes()
            + workers * geom.rows * geom.sub_columns * ranking.TILE_BYTES_PER_SCORE + plan.super_rows * row_bytes)


@pytest.mark.parametrize("memory", [1 << 18, 600_000, 1 << 20, 1 << 30])
@pytest.mark.parametrize("workers", [1, 4])
def test_ranking_plans_fit(memory, workers):
    budget = Budget(memory=memory)
    scores = embedding_scores(300, 500, budget)
    norm = Normaliser(scale=1.0, offset=np.zeros(500))
    plan = ranking.ranking_plan(scores, norm, budget, 10, workers=workers)
    assert ranking_bytes(scores, plan, workers) <= memory


def test_the_ranking_blocks_that_fitted_are_kept():
    budget = Budget(memory=1 << 30)
    scores = embedding_scores(300, 500, budget)
    norm = Normaliser(scale=1.0, offset=np.zeros(500))
    plan = ranking.ranking_plan(scores, norm, budget, 10, workers=4)
    assert plan.super_rows == 300 and plan.geom.block_columns == 500


@pytest.mark.parametrize("seed", range(20))
def test_a_ledger_never_hands_out_more_than_the_budget(seed):
    rng = np.random.default_rng(seed)
    memory = int(rng.integers(1 << 10, 1 << 30))
    ledger = Budget(memory=memory).ledger(held=int(memory * rng.uniform(0, 0.6)))
    held = ledger.charged
    for _ in range(8):
        share = float(rng.choice([0.25, 0.5, 1.0]))
        if rng.random() < 0.3:
            ledger.holds(float(rng.uniform(0, memory)), share)
        else:
            room = ledger.room(share)
            per_row = float(rng.uniform(1, memory / 8))
            if per_row <= room:  # one row fits what is left: no minimum to exceed
                ledger.rows(per_row, share, total=int(rng.integers(1, 10_000)), align=int(rng.integers(1, 64)))
        assert ledger.charged <= memory
    assert ledger.charged >= held


def test_a_lone_taker_gets_its_share_as_before():
    budget = Budget(memory=1000)
    assert budget.rows(10, share=0.25) == 25 and budget.rows(10, share=0.25, total=7) == 7
    assert budget.rows(10, share=0.5, align=16) == 48
    assert budget.fits(250, 0.25) and not budget.fits(251, 0.25)
    assert Budget(block_rows=3).rows(10, share=0.25, total=100) == 3 and not Budget(block_rows=3).fits(1, 1.0)
    ledger = Ledger(budget, held=900)
    assert ledger.room(0.25) == 100 and ledger.rows(10, share=0.25) == 10 and ledger.room(0.25) == 0
    assert ledger.rows(10, share=0.25) == 1  # a block has one row at least


@pytest.mark.parametrize("shape", [(3000, 700), (0, 5), (1,)])
def test_mapped_empty_is_a_fresh_writable_array_of_zeros(shape):
    """The update's final rows are mapped up front (one call instead of a fault per page); the
    array is an ordinary writable one of that shape and dtype, and it keeps its memory alive."""
    out = mapped_empty(shape, np.float32)
    assert out.shape == shape and out.dtype == np.float32 and out.flags.writeable and out.flags.c_contiguous
    assert not out.any()
    out[...] = 1.5
    view = out[:1]
    del out
    assert (view == 1.5).all()


def test_a_mapping_the_system_refuses_is_out_of_memory_as_np_empty_says_it(monkeypatch):
    """mmap says ENOMEM as an OSError; the commands turn a MemoryError into their one out-of-memory
    line, so that is what mapped_empty raises. Other mapping errors stay what they are."""
    import errno
    import mmap

    def refuse(code):
        def mapping(*args, **kwargs):
            raise OSError(code, "refused")
        return mapping

    monkeypatch.setattr(mmap, "mmap", refuse(errno.ENOMEM))
    with pytest.raises(MemoryError):
        mapped_empty((1000, 10), np.float32)
    monkeypatch.setattr(mmap, "mmap", refuse(errno.EPERM))
    with pytest.raises(PermissionError):
        mapped_empty((1000, 10), np.float32)
