"""The streaming code (run_probe + BankAccumulator, run_normalise) equals the dense reference.

Every method, dense and ranking outputs, k = 1 and k > 1, for block sizes that divide the data,
that do not, a single block, and blocks chosen by the memory budget; score matrices read tile by
tile (MatrixScores) and scores computed from embeddings (EmbeddingScores).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
import tolerance as tol
from conftest import N_GALLERY, Embeds, Scores, f32_exact

from qbnorm_cli import methods
from qbnorm_cli.core import statistics as stats
from qbnorm_cli.core import topk
from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.io.probefile import SORTED, Probe, Stored, statistics
from qbnorm_cli.io.specs import ArrayInput, as_input
from qbnorm_cli.streaming import ranking
from qbnorm_cli.streaming.budget import Budget
from qbnorm_cli.streaming.engine import run_normalise, run_probe, tile_rows
from qbnorm_cli.streaming.sources import Embeddings, EmbeddingScores, MatrixScores

BETA, GALLERY_BETA, KMAX, TOPK_KS, TOP_N = 20.0, 1.0, 10, (3, 10, 128), 5

BUDGETS = {
    "rows1": Budget(block_rows=1),
    "rows2": Budget(block_rows=2),
    "rows3": Budget(block_rows=3),
    "rows7": Budget(block_rows=7),
    "rows1000": Budget(block_rows=1000),
    "mem400": Budget(memory=400),        # a few columns and rows per block
    "mem4k": Budget(memory=4096),
    "mem1g": Budget(),                   # the default: everything in one block
}

# (method, k): k matters to the dynamic methods only
CASES = [("none", 1), ("is", 1), ("csls", 1), ("nnn", 1), ("gc", 1),
         ("dis", 1), ("dis", 3), ("dual-is", 1), ("dual-dis", 1), ("dual-dis", 3)]
PARAMS = {"csls": {"topk_mean": 10}, "nnn": {"topk_mean": 128, "alpha": 0.75}}


def mem(arr) -> ArrayInput:
    return as_input(np.asarray(arr), "mem")


class StreamedProbe(Probe):
    """The probe statistics from run_probe (the streaming layer's public driver) as a Probe, with
    the column blocks the pass walked."""

    def __init__(self, bank_scores, gallery_bank_scores, n_gallery: int, budget: Budget,
                 betas=(BETA, 7.5), gallery_betas=(GALLERY_BETA,), kmax=KMAX, ks=TOPK_KS):
        self.acc = stats.BankAccumulator(bank_scores.n_rows, n_gallery, np.array(betas), kmax, ks, True)
        self.gacc = stats.BankAccumulator(gallery_bank_scores.n_rows, n_gallery, np.array(gallery_betas), kmax)
        self.sorted = np.full((n_gallery, bank_scores.n_rows), np.nan, dtype=np.float32)
        self.blocks = []

        def on_sorted(number, c0, c1, block):
            assert number == 0
            self.blocks.append((c0, c1))
            self.sorted[c0:c1] = block

        run_probe([(bank_scores, self.acc), (gallery_bank_scores, self.gacc)], n_gallery, budget,
                  on_sorted=on_sorted)
        datasets = statistics(self.acc, self.gacc, 1)
        datasets[SORTED] = Stored(self.sorted)
        super().__init__(datasets, {"gallery_rows": n_gallery}, path="the streamed probe")


def normaliser(probe, method: str, k: int) -> Normaliser:
    spec = methods.get(method)
    given = {"beta": BETA, "k": k, "gallery_beta": GALLERY_BETA, **PARAMS.get(method, {})}
    return methods.build(spec, probe, methods.settings(spec, given, probe))


def stream(query_scores, norm, budget, top_n=None, tiling=ranking.Tiling(), trace=None):
    """Concatenate run_normalise's row blocks: (scores, indices or None, normalised)."""
    parts = list(run_normalise(query_scores, norm, budget, top_n, tiling=tiling, trace=trace))
    starts = [q0 for q0, _ in parts]
    assert starts == sorted(starts) and starts[0] == 0
    values = np.concatenate([v for _, (v, _, _) in parts])
    indices = None if top_n is None else np.concatenate([i for _, (_, i, _) in parts])
    gated = np.concatenate([g for _, (_, _, g) in parts])
    assert len(values) == len(gated) == query_scores.n_rows
    return values, indices, gated


_EXPECTED: dict = {}


def expected(data: Scores, method: str, k: int):
    key = (data.name, method, k)
    if key not in _EXPECTED:
        p = PARAMS.get(method, {})
        _EXPECTED[key] = ref.normalise(method, data.S, data.P, data.H, beta=BETA, gallery_beta=GALLERY_BETA,
                                       k=k, **p)
    return _EXPECTED[key]


# Every score here is exact in float32 (float32-exact matrices; dyadic embeddings, whose float32
# products are exact): the package and the reference differ only in their float64 evaluation, an LSE
# over at most 150 bank rows (the wide case) whose columns span at most 16 (8-d dyadic products
# lie in [−8, 8]), at β ≤ 20 for each of two banks, each side within the bound of the exact value.
N_TERMS, SPREAD = 150, 16.0


def assert_scores(actual, wanted):
    finite = np.asarray(wanted)[np.isfinite(wanted)]
    magnitude = 2 * BETA * SPREAD + (float(np.abs(finite).max()) if finite.size else 0.0)
    bound = tol.method_error("dual-is", 0.0, magnitude, N_TERMS, SPREAD, beta=BETA, gallery_beta=GALLERY_BETA)
    tol.assert_close(actual, wanted, 2 * bound)


def assert_ranking(got_idx, want_scores, exact_only: bool):
    """got_idx is the reference top-N of want_scores: identical, except (when not exact_only) for swaps
    of items whose reference scores agree to rounding yet are not equal (a mathematically exact tie that
    floating point breaks by an ulp, e.g. β·ΔS = ΔL with integer scores). Exactly equal scores must
    always come in gallery order."""
    want_vals, want_idx = ref.top_n(want_scores, got_idx.shape[1])
    if exact_only:
        np.testing.assert_array_equal(got_idx, want_idx)
        return
    got_vals = np.take_along_axis(want_scores, got_idx, axis=1)
    assert_scores(got_vals, want_vals)
    rows, cols = np.nonzero(got_idx != want_idx)
    for r, c in zip(rows, cols, strict=True):
        a, b = got_idx[r, c], want_idx[r, c]
        assert want_scores[r, a] != want_scores[r, b], f"row {r}: exact tie of {a} and {b} out of gallery order"


def check_method(data: Scores, probe, query_scores, method, k, budget, output, top_n=TOP_N,
                 tiling=ranking.Tiling(), trace=None):
    want, want_gated = expected(data, method, k)
    norm = normaliser(probe, method, k)
    exact_only = data.name not in ("ties", "wide")
    if output == "dense":
        got, indices, gated = stream(query_scores, norm, budget)
        assert indices is None
        assert got.dtype == np.float64 and got.shape == want.shape
        np.testing.assert_array_equal(gated, want_gated)
        assert_ranking(ref.top_n(got, TOP_N)[1], want, exact_only)
        assert_scores(got, want)
    else:
        want_vals, _ = ref.top_n(want, top_n)
        got_vals, got_idx, gated = stream(query_scores, norm, budget, top_n, tiling, trace)
        np.testing.assert_array_equal(gated, want_gated)
        assert_ranking(got_idx, want, exact_only)
        assert_scores(got_vals, want_vals)


_PROBES: dict = {}


def matrix_probe(data: Scores, budget_name: str) -> StreamedProbe:
    key = (data.name, budget_name)
    if key not in _PROBES:
        _PROBES[key] = StreamedProbe(MatrixScores(mem(data.P)), MatrixScores(mem(data.H)), N_GALLERY,
                                     BUDGETS[budget_name])
    return _PROBES[key]


OUTPUTS = ("dense", "topk")


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("budget_name", list(BUDGETS))
@pytest.mark.parametrize(("method", "k"), CASES)
def test_matrix_scores_equal_reference(rnd, budget_name, method, k, output):
    probe = matrix_probe(rnd, budget_name)
    check_method(rnd, probe, MatrixScores(mem(rnd.S)), method, k, BUDGETS[budget_name], output)


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("budget_name", list(BUDGETS))
@pytest.mark.parametrize(("method", "k"), CASES)
def test_ties_are_deterministic(ties, budget_name, method, k, output):
    probe = matrix_probe(ties, budget_name)
    check_method(ties, probe, MatrixScores(mem(ties.S)), method, k, BUDGETS[budget_name], output)


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("budget_name", ["rows1", "rows3", "rows7", "rows1000", "mem400", "mem1g"])
@pytest.mark.parametrize(("method", "k"), CASES)
def test_embedding_scores_equal_reference(emb, budget_name, method, k, output):
    budget = BUDGETS[budget_name]

    def scores(rows, cols):
        return EmbeddingScores(Embeddings(mem(rows), "dot", budget), Embeddings(mem(cols), "dot", budget))

    key = ("embeddings", budget_name)
    if key not in _PROBES:
        _PROBES[key] = StreamedProbe(scores(emb.bank, emb.gallery), scores(emb.gallery_bank, emb.gallery),
                                     N_GALLERY, budget)
    check_method(emb.scores(), _PROBES[key], scores(emb.queries, emb.gallery), method, k, budget, output)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cosine_rows_checked_by_their_norms(value, dtype):
    """float32 rows for cosine are checked through their norms, not value by value: a NaN or Inf
    anywhere in a row is still refused naming that row, and the caller's array is left as it was."""
    from qbnorm_cli.errors import DataError

    rng = np.random.default_rng(3)
    good = rng.normal(size=(9, 6)).astype(dtype)
    kept = good.copy()
    loaded = Embeddings(mem(good), "cosine", Budget(block_rows=4), eager=False).block(4, 8)
    want = kept[4:8].astype(np.float32)
    np.testing.assert_array_equal(loaded, want / np.linalg.norm(want, axis=1, keepdims=True))
    np.testing.assert_array_equal(good, kept)
    bad = good.copy()
    bad[6, 5] = value
    with pytest.raises(DataError, match=r"mem: non-finite value \(NaN or Inf\) in row 6"):
        Embeddings(mem(bad), "cosine", Budget(block_rows=4), eager=False).block(4, 8)


@pytest.mark.parametrize("rows", [5, 40, 300, 2000])
def test_column_top_k_above_a_floor(rows):
    """With a floor, a column keeps the K largest of its values above it (−inf pads): those of the K
    largest of all values that are above the floor (an update's new bank rows against an item's
    old K-th largest score)."""
    rng = np.random.default_rng(rows)
    tile = rng.integers(-20, 20, size=(rows, 7)).astype(np.float32)
    floor = rng.integers(-5, 25, size=7).astype(np.float64)  # some columns past the fold into held values
    floor[:3] = 19  # and some where only a few pass
    want = -np.sort(-tile.T.astype(np.float64), axis=1)[:, :4]
    want[want <= floor[:, None]] = -np.inf
    top = stats.ColumnTopK(7, 4, floor)
    for r0 in range(0, rows, 16):
        top.update(tile[r0:r0 + 16])
    got = top.descending()  # as many columns as a column holds values above its floor
    assert got.shape[1] == np.isfinite(want).sum(axis=1).max()
    np.testing.assert_array_equal(got, want[:, :got.shape[1]])
    np.testing.assert_array_equal(top.descending(out=np.zeros((7, 4))), want)


def test_column_top_k_above_a_floor_holds_no_table_until_the_pairs_fold():
    """Above a floor, the few values that pass are kept as pairs: the (width, K) table of held values
    is made only once they are folded into it (an update's new bank rows rarely get there), and a
    block where none pass gives −inf pads only."""
    tile = np.arange(24, dtype=np.float32).reshape(4, 6)
    top = stats.ColumnTopK(6, 3, np.full(6, 100.0))
    top.update(tile)
    assert top.values is None
    assert top.descending().shape == (6, 0)  # nothing above the floors: no columns
    np.testing.assert_array_equal(top.descending(out=np.zeros((6, 3))), np.full((6, 3), -np.inf))
    few = stats.ColumnTopK(6, 3, np.r_[np.full(5, 100.0), 11.0])  # column 5 holds 5, 11, 17, 23
    few.update(tile)
    assert few.values is None
    want = np.full((6, 3), -np.inf)
    want[5, :2] = 23, 17
    np.testing.assert_array_equal(few.descending(), want[:, :2])
    rows = np.zeros((6, 3), dtype=np.float32)  # an accumulator's item_top rows: written where they lie
    assert few.descending(out=rows) is rows
    np.testing.assert_array_equal(rows, want)
    plain = stats.ColumnTopK(6, 3)
    plain.update(tile)
    rows[...] = 0
    plain.descending(out=rows)
    np.testing.assert_array_equal(rows, plain.descending())


def test_an_accumulator_above_item_floors_keeps_only_the_columns_it_needs():
    """An update's new bank rows against the kept items (item floors): item_top is as wide as the
    most values any item holds above its floor (not K: most hold none), −inf pads after them, the
    same values as K columns would hold; placing a cluster task's K-wide columns widens it."""
    rng = np.random.default_rng(5)
    tile = rng.integers(-30, 30, size=(12, 50)).astype(np.float32)
    floor = np.full(50, 27.0)
    acc = stats.BankAccumulator(12, 50, np.array([1.0]), 3, (8,), item_floor=floor)
    for c0, c1 in ((0, 20), (20, 50)):
        acc.start_block(c0, c1)
        acc.update(0, tile[:, c0:c1])
        acc.finish_block()
    want = -np.sort(-tile.T.astype(np.float64), axis=1)[:, :8]
    want[want <= 27] = -np.inf
    width = int(np.isfinite(want).sum(axis=1).max())
    assert 0 < width < 8 and acc.item_top.shape == (50, width)
    np.testing.assert_array_equal(acc.item_top, want[:, :width])
    acc.place_columns(10, 20, {"item_top": np.full((10, 8), 29.0, dtype=np.float32)})
    assert acc.item_top.shape == (50, 8)
    np.testing.assert_array_equal(acc.item_top[10:20], np.full((10, 8), 29.0))
    np.testing.assert_array_equal(acc.item_top[:10], want[:10])


def test_cosine_norms_in_pieces_are_the_whole_matrix_norms():
    """The norms are taken a piece of rows at a time (no matrix-sized temporaries): each row's is its
    own, so the rows equal those normalised at once, bit for bit; a part given the rows held by
    another Embeddings (an update's kept and new items) serves them without reading again."""
    from qbnorm_cli.streaming.sources import NORM_PIECE

    rng = np.random.default_rng(8)
    rows = rng.normal(size=(3 * NORM_PIECE // (4 * 33) + 5, 33)).astype(np.float32)
    loaded = Embeddings(mem(rows), "cosine", Budget())
    whole = loaded.rows_of(slice(0, rows.shape[0]))
    np.testing.assert_array_equal(whole, rows / np.linalg.norm(rows, axis=1, keepdims=True))
    part = Embeddings(mem(rows[10:20]), "cosine", Budget(), held=loaded.rows_of(slice(10, 20)))
    assert np.shares_memory(part.block(0, 10), whole)
    np.testing.assert_array_equal(part.block(0, 10), whole[10:20])
    scratch = rows.copy()  # in place: the same values, where the rows lie; read in blocks, never in place
    Embeddings(mem(scratch), "cosine", Budget(block_rows=7), eager=False, in_place=True).block(0, 7)
    np.testing.assert_array_equal(scratch, rows)
    in_place = Embeddings(mem(scratch), "cosine", Budget(), in_place=True)
    assert np.shares_memory(in_place.rows_of(slice(0, 3)), scratch)
    np.testing.assert_array_equal(scratch, whole)


@pytest.mark.parametrize("budget_name", ["rows3", "mem400", "mem1g"])
def test_cosine_embeddings_match_reference(budget_name):
    """Cosine: rows L2-normalised; float32 products, so a float32-level tolerance."""
    rng = np.random.default_rng(5)
    bank, gallery, queries, gbank = (rng.normal(size=(n, 8)).astype(np.float32) for n in (37, 23, 19, 29))
    budget = BUDGETS[budget_name]

    def scores(rows, cols):
        return EmbeddingScores(Embeddings(mem(rows), "cosine", budget), Embeddings(mem(cols), "cosine", budget))

    def unit(x):
        x = x.astype(np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    data = Scores("cosine", unit(bank) @ unit(gallery).T, unit(queries) @ unit(gallery).T,
                  unit(gbank) @ unit(gallery).T)
    # float32 cosines against float64 ones: the gates and activation sets compared exactly below need
    # raw top-1s and bank top-3s that no rounding within the bound can reorder
    cosine = tol.cosine32(8) + tol.product64(8)
    for M, n in ((data.S, 1), (data.P, 3), (data.H, 3)):
        tol.assert_separated(M, n, cosine)
    probe = StreamedProbe(scores(bank, gallery), scores(gbank, gallery), 23, budget)
    for method, k in CASES:
        if method == "gc":
            continue  # ranks count exact comparisons; checked on exact data above
        want, want_gated = expected(data, method, k)
        got, _, gated = stream(scores(queries, gallery), normaliser(probe, method, k), budget)
        magnitude = float(np.abs(want).max()) + BETA
        p = {"alpha": PARAMS.get(method, {}).get("alpha", 0.75)}
        bound = tol.method_error(method, cosine, magnitude, 37, 2.0, beta=BETA, gallery_beta=GALLERY_BETA, **p)
        tol.assert_close(got, want, bound)
        np.testing.assert_array_equal(gated, want_gated)


@pytest.mark.parametrize("budget_name", list(BUDGETS))
def test_probe_statistics_equal_reference(rnd, ties, budget_name):
    for data in (rnd, ties):
        probe = matrix_probe(data, budget_name)
        for beta in (BETA, 7.5):
            assert_scores(probe.log_norm(beta), ref.log_norm(data.P, beta))
        assert_scores(probe.gallery_log_norm(GALLERY_BETA), ref.log_norm(data.H, GALLERY_BETA))
        for K in TOPK_KS:
            assert_scores(probe.topk_mean(K), ref.column_mean_top(data.P, K))
        width = probe.acc.neighbors.k  # kmax and the spares an update uses (core/probestats.SPARE)
        np.testing.assert_array_equal(probe.acc.neighbors.indices, ref.row_top(data.P, width))
        np.testing.assert_array_equal(probe.acc.neighbors.values,
                                      np.take_along_axis(data.P, ref.row_top(data.P, width), axis=1))
        np.testing.assert_array_equal(probe.gacc.neighbors.indices, ref.row_top(data.H, width))
        for k in (1, 2, 5):
            np.testing.assert_array_equal(probe.activation(k), ref.activation(data.P, k))
            np.testing.assert_array_equal(probe.activation(k, gallery=True), ref.activation(data.H, k))
            np.testing.assert_array_equal(stats.occurrence(probe.acc.neighbors.indices, k, N_GALLERY),
                                          np.bincount(ref.row_top(data.P, k).ravel(), minlength=N_GALLERY))
        np.testing.assert_array_equal(probe.sorted, np.sort(data.P.T, axis=1).astype(np.float32))
        covered = sorted(c for block in probe.blocks for c in range(*block))
        assert covered == list(range(N_GALLERY))
        summary = probe.acc.score_stats().as_dict()
        assert summary["min"] == data.P.min() and summary["max"] == data.P.max()
        # float64 sums of n float32-exact scores, within γₙ of Σ|P| (and of Σ P²): the variance as
        # E[P²] − mean² inherits both, and the std half of that relative to the variance
        n, m2 = data.P.size, float(np.mean(data.P**2))
        mean_bound = 2 * tol.eval64(float(np.abs(data.P).mean()), n + 2)
        var_bound = 2 * tol.eval64(m2, n + 2) + 2 * abs(data.P.mean()) * mean_bound
        tol.assert_close(summary["mean"], data.P.mean(), mean_bound)
        tol.assert_close(summary["std"], data.P.std(), var_bound / (2 * data.P.std()) + tol.eval64(1.0))


def test_memory_budget_splits_blocks(rnd):
    """The memory-budget cases above really walk several column blocks and row tiles."""
    probe = matrix_probe(rnd, "mem400")
    assert len(probe.blocks) > 3
    parts = list(run_normalise(MatrixScores(mem(rnd.S)), Normaliser(identity=True), BUDGETS["mem400"], None))
    assert len(parts) > 1
    assert len(matrix_probe(rnd, "mem1g").blocks) == 1


def test_kmax_smaller_than_k_rows_and_wide_k(rnd):
    """A bank top-k as wide as the gallery keeps every item, in order, for any block size."""
    for name in ("rows7", "mem400"):
        probe = StreamedProbe(MatrixScores(mem(rnd.P)), MatrixScores(mem(rnd.H)), N_GALLERY, BUDGETS[name],
                              kmax=N_GALLERY + 5)
        np.testing.assert_array_equal(probe.acc.neighbors.indices, ref.row_top(rnd.P, N_GALLERY))
        assert probe.activation(N_GALLERY).all()


@pytest.mark.parametrize("k", [1, 2, 4, 23, 30])
@pytest.mark.parametrize("width", [1, 2, 5, 23])
def test_topk_select_merge_matches_stable_sort(ties, k, width):
    """topk.select over column blocks merged in any order = a stable sort of the whole row."""
    M = ties.S
    n = min(k, M.shape[1])
    spans = [(c, min(c + width, M.shape[1])) for c in range(0, M.shape[1], width)]
    for order in (spans, spans[::-1]):
        running = topk.RunningTopK(M.shape[0], k)
        for c0, c1 in order:
            running.update(0, M[:, c0:c1], c0)
        np.testing.assert_array_equal(running.indices[:, :n], ref.row_top(M, n))
        assert (running.indices[:, n:] == -1).all() and np.isneginf(running.values[:, n:]).all()


def test_float32_exact_helper():
    x = np.array([0.1, 1 / 3])
    assert (f32_exact(x) == x.astype(np.float32)).all()


# ----------------------------------------------------------------------------------------------
# Rankings of wide galleries (ranking.py): sampled thresholds, offset-ordered tiles, recomputed rows


@pytest.fixture(scope="module")
def wide() -> Embeds:
    """Dyadic embeddings (exact float32 products) with a gallery wide enough for many product
    tiles per block; some gallery rows repeated far apart, so that exact ties cross tiles. Coarse
    values make mathematically equal normalised scores common (rounding then orders them)."""
    rng = np.random.default_rng(11)

    def draw(n):
        return (rng.integers(-8, 9, (n, 8)) / 8).astype(np.float32)

    gallery = draw(900)
    gallery[[850, 600, 333]] = gallery[[5, 5, 17]]
    gallery[400:420] = gallery[0]  # a run of one item: ties at every threshold for some queries
    return Embeds(draw(150), gallery, draw(45), draw(120))


# (sub-tile columns, query rows per tile, SAFETY, memory): SAFETY 0.02 makes every threshold too
# high, so that rows are recomputed; a small memory cuts the gallery into several column blocks.
GEOMETRIES = {
    "sampled": (64, 7, 2.5, None),
    "recomputed": (64, 7, 0.02, None),
    "blocks": (48, 5, 2.5, 60_000),
    "blocks-recomputed": (48, 5, 0.02, 60_000),
}


@pytest.mark.parametrize("top_n", [3, 40])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize(("method", "k"), CASES)
def test_wide_rankings_equal_reference(wide, geometry, method, k, top_n):
    sub, rows, safety, memory = GEOMETRIES[geometry]
    # sample tiles of 3 rows at a time
    tiling = ranking.Tiling(sub_columns=sub, tile_rows=rows, safety=safety, sample_piece_bytes=3 * 4 * sub)
    trace = ranking.Trace()
    budget = Budget() if memory is None else Budget(memory=memory)

    def scores(a, b):
        return EmbeddingScores(Embeddings(mem(a), "dot", Budget()), Embeddings(mem(b), "dot", Budget(), eager=False))

    key = ("wide",)
    if key not in _PROBES:
        _PROBES[key] = StreamedProbe(scores(wide.bank, wide.gallery), scores(wide.gallery_bank, wide.gallery),
                                     900, Budget())
    data = wide.scores()
    data = Scores("wide", data.P, data.S, data.H)
    query_scores = scores(wide.queries, wide.gallery)
    check_method(data, _PROBES[key], query_scores, method, k, budget, "topk", top_n=top_n, tiling=tiling, trace=trace)
    if safety < 1:
        assert trace.recomputed_rows > 0, "the recomputation path was not exercised"
    if method in ("dis", "dual-dis") and memory is None:  # each row ranked by one list: both kinds occur
        gated = np.concatenate(trace.gates)
        assert gated.any() and not gated.all()
    else:
        assert not trace.gates
    if memory is not None:
        geom = ranking.geometry(query_scores, 45, 900, budget, 1, tiling)
        assert geom.block_columns < 900 and geom.sub_columns < geom.block_columns


def test_wide_rankings_tiles_really_are_sampled_and_ordered(wide):
    """The geometry above walks a sample tile and offset-ordered tiles with one comparison each."""
    trace = ranking.Trace()
    norm = Normaliser(scale=BETA, offset=np.linspace(0, 1, 900))
    scores = EmbeddingScores(Embeddings(mem(wide.queries), "dot", Budget()),
                             Embeddings(mem(wide.gallery), "dot", Budget(), eager=False))
    list(run_normalise(scores, norm, Budget(), 10, tiling=ranking.Tiling(sub_columns=64), trace=trace))
    # every tile but each block's sample is offset-ordered: one comparison per score, no exact tests
    assert trace.ordered_tiles > 3 * trace.sample_tiles > 0 and trace.exact_tiles == 0


def test_rows_still_unsure_after_recomputing_take_every_entry(wide):
    """The last resort of a recomputation (never needed by the bounds' margins) is exact too."""
    tiling = ranking.Tiling(sub_columns=64, safety=0.02, trust_recompute=False)
    data = wide.scores()
    data = Scores("wide", data.P, data.S, data.H)
    probe = StreamedProbe(MatrixScores(mem(data.P)), MatrixScores(mem(data.H)), 900, Budget())
    scores = EmbeddingScores(Embeddings(mem(wide.queries), "dot", Budget()),
                             Embeddings(mem(wide.gallery), "dot", Budget(), eager=False))
    for method, k in (("dis", 1), ("csls", 1), ("none", 1)):
        trace = ranking.Trace()
        check_method(data, probe, scores, method, k, Budget(), "topk", top_n=12, tiling=tiling, trace=trace)
        assert trace.recomputed_rows > 0


@pytest.mark.parametrize(("n_rows", "most", "workers", "rows"),
                         [(10_000, 512, 2, 500), (10_000, 1280, 2, 1250), (45, 7, 2, 6), (10, 512, 2, 5),
                          (7, 512, 1, 7), (3, 512, 4, 1)])
def test_row_tiles_split_evenly_over_the_workers(n_rows, most, workers, rows):
    assert ranking.balanced_rows(n_rows, most, workers) == rows
    for n in range(1, 300):  # the busiest worker's rows (tiles dealt in turn): near an even share
        r = ranking.balanced_rows(n, 7, 3)
        rounds = math.ceil(math.ceil(n / r) / 3)
        assert r <= 7 and rounds * r <= n / 3 + n / 7 / 3 + 1


def test_rows_that_fit_are_one_super_block(wide):
    """Everything fits: one pass over the gallery, even when the rows are not whole tiles (they
    used to be rounded down to whole tiles, and the few left over made a second pass)."""
    tiling = ranking.Tiling(tile_rows=7)
    norm = Normaliser(scale=BETA, offset=np.linspace(0, 1, 900))
    scores = EmbeddingScores(Embeddings(mem(wide.queries), "dot", Budget()),
                             Embeddings(mem(wide.gallery), "dot", Budget(), eager=False))
    assert ranking.geometry(scores, 45, 900, Budget(), 2, tiling).rows == 6
    assert [q0 for q0, _ in ranking.run_ranking(scores, norm, Budget(), 10, tiling=tiling)] == [0]
    assert tile_rows(16, Budget(), total=1000, align=512) == 1000
