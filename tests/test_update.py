"""`probe --update` / `update_probe` (issue 29): an updated probe equals a fresh probe of the final
gallery and bank, for every statistic and method, for each kind of change and sequences of them.

The embeddings hold small integers and are compared by dot product: every score is an integer that
float32 holds exactly, whatever kernel and tile shape compute it, so scores, their sums, the top-k
lists (ties included: both break them by index) and everything derived from them must match to the
bit. Only the log-sum-exps (lse64's bound for the two summation orders) and the Sinkhorn potentials
(each converged to the tolerance, from another start) differ.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerance import assert_close, eval64, lse64

import qbnorm_cli
from qbnorm_cli import methods as registry
from qbnorm_cli.api.updating import merge_lists
from qbnorm_cli.cli import main
from qbnorm_cli.core.probestats import ALL, UPDATE_RECORDS, fingerprints
from qbnorm_cli.errors import DataError, UsageError

D = 6
BETA = 0.05  # integer scores up to ~150: β·score of a few units
SETTINGS = dict(betas=[BETA], k=2, topk_means=[3, 5], similarity="dot")
LOG_NORM = {"/log_norm", "/gallery_log_norm"}
SINKHORN = {"/sinkhorn_log_u", "/dual_sinkhorn_log_u"}
MOMENTS = {"/gallery_mean", "/gallery_second_moment"}
SPARE_TAIL = {"/bank_top_items", "/bank_top_scores", "/gallery_bank_top_items", "/gallery_bank_top_scores"}


def ints(rng, n: int) -> np.ndarray:
    return rng.integers(-4, 5, size=(n, D)).astype(np.float32)


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def final_inputs(gallery, bank, changes):
    """The gallery and bank a sequence of changes leads to (removals first, then additions)."""
    for change in changes:
        keep = np.setdiff1d(np.arange(len(gallery)), change.get("remove_gallery", []))
        none = np.zeros((0, gallery.shape[1]), np.float32)
        gallery = np.concatenate([gallery[keep], change.get("add_gallery", none)])
        bank = np.concatenate([bank, change.get("add_bank", none)])
    return gallery, bank


def assert_same_probe(updated, fresh, updates: int = 1) -> None:
    """Every statistic of `fresh` in `updated`: exact, but the LSEs (within the float64 bound) and the
    spare neighbours (a prefix: removals leave pads where a fresh probe knows more)."""
    assert set(updated.datasets) == set(fresh.datasets)
    n_bank = fresh.n_bank
    for name, stored in fresh.datasets.items():
        want, have = np.asarray(stored.data), np.asarray(updated.datasets[name].data)
        assert have.shape == want.shape, name
        if name in LOG_NORM:
            assert_close(have, want, 2 * lse64(n_bank, BETA, 100.0, np.abs(want).max() + 1))
        elif name in SINKHORN:  # potentials are defined up to a constant; each converged to tol
            tol = fresh.params["sinkhorn_tol"]
            assert_close(have - have.mean(axis=1, keepdims=True), want - want.mean(axis=1, keepdims=True),
                         1e3 * tol)
        elif name in MOMENTS:  # mean·n, plus the rows' sums, over n': a few roundings per update
            assert_close(have, want, eval64(4 * (np.abs(want).max() + 1), operations=4 * updates))
        elif name in SPARE_TAIL:
            known = np.asarray(updated.datasets[name.replace("scores", "items")].data) >= 0
            assert known[:, :updated.kmax()].all(), name
            np.testing.assert_array_equal(have[known], want[known], err_msg=name)
        else:
            np.testing.assert_array_equal(have, want, err_msg=name)
    for key in ("gallery_rows", "bank_rows", "gallery_bank_rows", "gallery_identity", "score_min", "score_max",
                "score_mean"):
        assert updated.attrs[key] == fresh.attrs[key], key


def test_declarations_are_unique_and_complete():
    names = [s.name for s in ALL]
    assert len(names) == len(set(names))
    assert all(s.merge in {"log-sum-exp", "sum", "min", "max", "top-k", "derived", "append", "gallery", "iterate"}
               for s in ALL)
    assert all(s.update for s in UPDATE_RECORDS)


def test_row_hashes_tell_rows_apart():
    rng = np.random.default_rng(9)
    rows = rng.standard_normal((40, 7)).astype(np.float32)
    hashes = fingerprints(rows)
    assert np.unique(hashes).size == rows.shape[0]
    np.testing.assert_array_equal(fingerprints(rows[5:9]), hashes[5:9])  # a row's hash is its own
    for j in range(rows.shape[1]):  # one value changed by one ulp, in every position (the pad's word too)
        changed = rows.copy()
        changed[:, j] = np.nextafter(changed[:, j], np.inf)
        assert (fingerprints(changed) != hashes).all(), j
    assert (fingerprints(rows[:, :6]) != fingerprints(np.pad(rows[:, :6], ((0, 0), (0, 2))))).all()
    # the definition is part of the file format: probes made before must still be updatable
    np.testing.assert_array_equal(fingerprints(np.arange(8, dtype=np.float32).reshape(2, 4)),
                                  [-3862116861669609021, -4223918351256910086])


@pytest.mark.parametrize("change", ["add_gallery", "remove_gallery", "add_bank", "all"])
def test_update_equals_a_fresh_probe(change):
    rng = np.random.default_rng(3)
    gallery, bank = ints(rng, 40), ints(rng, 70)
    parts = {"add_gallery": ints(rng, 6), "remove_gallery": np.array([0, 5, 6, 39]), "add_bank": ints(rng, 15)}
    step = parts if change == "all" else {change: parts[change]}
    kwargs = dict(SETTINGS, keep_sorted=True, methods=["mp"])
    old = qbnorm_cli.probe(bank, gallery, **kwargs)
    updated = qbnorm_cli.update_probe(old, bank=bank, gallery=gallery, **step)
    final_gallery, final_bank = final_inputs(gallery, bank, [step])
    assert_same_probe(updated, qbnorm_cli.probe(final_bank, final_gallery, **kwargs))


def test_sequences_of_updates_and_every_method():
    """Three updates in a row, then the normalised rankings of every method (those of cosine
    scores: test_cosine_methods) equal those of a fresh probe's."""
    rng = np.random.default_rng(5)
    gallery, bank, gbank = ints(rng, 45), ints(rng, 80), ints(rng, 30)
    kwargs = dict(SETTINGS, keep_sorted=True, methods=["mp"], sinkhorn=True, gallery_betas=[BETA])
    probe = qbnorm_cli.probe(bank, gallery, gallery_bank=gbank, **kwargs)
    changes = [{"add_gallery": ints(rng, 5), "add_bank": ints(rng, 10)},
               {"remove_gallery": np.array([1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 13, 40])},
               {"add_bank": ints(rng, 9), "add_gallery": ints(rng, 3), "remove_gallery": np.array([0])}]
    cur_gallery, cur_bank = gallery, bank
    for change in changes:
        probe = qbnorm_cli.update_probe(probe, bank=cur_bank, gallery=cur_gallery, gallery_bank=gbank, **change)
        cur_gallery, cur_bank = final_inputs(cur_gallery, cur_bank, [change])
    fresh = qbnorm_cli.probe(cur_bank, cur_gallery, gallery_bank=gbank, **kwargs)
    assert_same_probe(probe, fresh, updates=len(changes))
    queries = ints(rng, 12)
    for method in registry.names():
        if method in COSINE_ONLY:
            continue
        given = {"beta": BETA, "gallery_beta": BETA, "topk_mean": 3, "k": 2}
        options = {name: value for name, value in given.items() if name in registry.get(method).parameters}
        a = qbnorm_cli.normalise(queries, cur_gallery, probe, method=method, top_k=8, **options)
        b = qbnorm_cli.normalise(queries, cur_gallery, fresh, method=method, top_k=8, **options)
        np.testing.assert_array_equal(a.indices, b.indices, err_msg=method)


COSINE_ONLY = ("ls", "nicdm", "dsl")  # dsl: its statistics come from cosine embeddings here


def unit_rows(rng, n: int) -> np.ndarray:
    """Unit rows of four ±½ entries: cosine normalisation and products exact in float32."""
    out = np.zeros((n, 16), dtype=np.float32)
    for row in out:
        row[rng.choice(16, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return out


def test_cosine_methods():
    rng = np.random.default_rng(6)
    gallery, bank = unit_rows(rng, 40), unit_rows(rng, 70)
    kwargs = dict(betas=[BETA], k=2, topk_means=[3, 5], methods=list(COSINE_ONLY))
    updated = qbnorm_cli.probe(bank, gallery, **kwargs)
    final_gallery, final_bank = gallery, bank
    changes = ({"add_gallery": unit_rows(rng, 5), "remove_gallery": np.array([3, 4]), "add_bank": unit_rows(rng, 9)},
               {"add_bank": unit_rows(rng, 30)}, {"add_gallery": unit_rows(rng, 2)})
    for change in changes:
        updated = qbnorm_cli.update_probe(updated, bank=final_bank, gallery=final_gallery, **change)
        final_gallery, final_bank = final_inputs(final_gallery, final_bank, [change])
    fresh = qbnorm_cli.probe(final_bank, final_gallery, **kwargs)
    assert_same_probe(updated, fresh)
    queries = unit_rows(rng, 10)
    for method in COSINE_ONLY:
        a = qbnorm_cli.normalise(queries, final_gallery, updated, method=method, topk_mean=3, top_k=8)
        b = qbnorm_cli.normalise(queries, final_gallery, fresh, method=method, topk_mean=3, top_k=8)
        np.testing.assert_array_equal(a.indices, b.indices, err_msg=method)


def test_add_gallery_bank():
    rng = np.random.default_rng(8)
    gallery, bank, gbank, more = ints(rng, 30), ints(rng, 50), ints(rng, 20), ints(rng, 7)
    kwargs = dict(SETTINGS, gallery_betas=[BETA])
    old = qbnorm_cli.probe(bank, gallery, gallery_bank=gbank, **kwargs)
    updated = qbnorm_cli.update_probe(old, bank=bank, gallery=gallery, gallery_bank=gbank, add_gallery_bank=more,
                                      add_gallery=ints(rng, 4))
    fresh = qbnorm_cli.probe(bank, np.concatenate([gallery, updated_tail(updated, gallery)]),
                             gallery_bank=np.concatenate([gbank, more]), **kwargs)
    assert_same_probe(updated, fresh)


def updated_tail(updated, gallery):
    """The items test_add_gallery_bank added (the rng's draw after `more`)."""
    rng = np.random.default_rng(8)
    ints(rng, 30), ints(rng, 50), ints(rng, 20), ints(rng, 7)
    return ints(rng, 4)


def test_removals_past_the_spares_recount_the_row():
    """A row losing more of its neighbours than it has spares is recounted against the gallery."""
    rng = np.random.default_rng(9)
    gallery, bank = ints(rng, 60), ints(rng, 20)
    old = qbnorm_cli.probe(bank, gallery, **SETTINGS)
    gone = np.asarray(old.datasets["/bank_top_items"].data)[0, :12]
    updated = qbnorm_cli.update_probe(old, bank=bank, gallery=gallery, remove_gallery=gone)
    assert updated.update["recounted_rows"] >= 1
    final_gallery, _ = final_inputs(gallery, bank, [{"remove_gallery": gone}])
    assert_same_probe(updated, qbnorm_cli.probe(bank, final_gallery, **SETTINGS))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), steps=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 8), st.integers(0, 9)),
                                               min_size=1, max_size=3))
def test_random_sequences(seed, steps):
    """Random add/remove sequences: the update always equals the fresh probe."""
    rng = np.random.default_rng(seed)
    gallery, bank = ints(rng, 25), ints(rng, 30)
    probe = qbnorm_cli.probe(bank, gallery, **SETTINGS)
    for n_add, n_remove, n_bank in steps:
        n_remove = min(n_remove, len(gallery) - 1)
        change = {"remove_gallery": rng.choice(len(gallery), n_remove, replace=False), "add_gallery": ints(rng, n_add),
                  "add_bank": ints(rng, n_bank)}
        change = {name: value for name, value in change.items() if len(value)}
        if not change:
            continue
        probe = qbnorm_cli.update_probe(probe, bank=bank, gallery=gallery, **change)
        gallery, bank = final_inputs(gallery, bank, [change])
    assert_same_probe(probe, qbnorm_cli.probe(bank, gallery, **SETTINGS))


def test_merge_lists_knows_what_is_certain():
    """A list that lost items is certain only up to its last known entry."""
    parts = [(np.array([[0, 1, -1]]), np.array([[5.0, 3.0, -np.inf]]), np.array([False])),
             (np.array([[7, 8]]), np.array([[4.0, 1.0]]), np.array([True]))]
    idx, vals, exact = merge_lists(parts, 4)
    assert idx.tolist() == [[0, 7, 1, -1]] and exact.tolist() == [3] and vals[0, :3].tolist() == [5.0, 4.0, 3.0]
    parts[1] = (np.array([[7, 8]]), np.array([[5.0, 1.0]]), np.array([True]))  # a tie: the lower index first
    assert merge_lists(parts, 4)[0].tolist() == [[0, 7, 1, -1]]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), width=st.integers(1, 8))
def test_merge_lists_takes_a_row_with_nothing_new_as_it_is(seed, width):
    """merge_lists keeps a row whose other parts are empty and complete as its first part (no
    sort): the same lists and certainties as one sort of every row's entries, whether the first
    part is in merged order or not (ties, pads, incomplete lists)."""
    from qbnorm_cli.api.updating import _merge_rows

    rng = np.random.default_rng(seed)
    rows, sizes = 30, rng.integers(0, 7, size=3)
    parts, start = [], 0
    for size in sizes:
        vals = -np.sort(-rng.integers(0, 5, size=(rows, size)).astype(np.float64), axis=1)  # ties
        idx = np.tile(np.arange(start, start + size), (rows, 1))
        if size:
            shuffled = rng.random(rows) < 0.2  # some rows out of the merged order among ties
            idx[shuffled] = idx[shuffled][:, ::-1]
            known = np.arange(size)[None, :] < rng.integers(0, size + 1, size=(rows, 1))  # some: none
            idx, vals = np.where(known, idx, -1), np.where(known, vals, -np.inf)
        start += size
        parts.append((idx, vals, rng.random(rows) < 0.7))
    got, want = merge_lists(parts, width), _merge_rows(parts, width)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


# --- files and the command -----------------------------------------------------------------------

@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(11)
    arrays = {"g": ints(rng, 40), "b": ints(rng, 60), "gn": ints(rng, 5), "bn": ints(rng, 10),
              "rem": np.array([2, 3, 30])}
    for name, array in arrays.items():
        np.save(tmp_path / f"{name}.npy", array)
    np.save(tmp_path / "other.npy", arrays["g"][::-1].copy())
    return tmp_path, arrays


def fails(cli, code: int, *args) -> str:
    """Run the command, expect exit `code` and one line on stderr; return that line."""
    got, _, err = cli(*args)
    assert got == code, f"exit {got}, not {code}: {err}"
    return err


def probe_cli(cli, d, *more):
    cli.ok("probe", "--bank", d / "b.npy", "--gallery", d / "g.npy", "--similarity", "dot", "--beta", BETA,
           "-o", d / "old.h5", "-q", *more)


def test_cli_update_matches_a_fresh_probe(cli, files):
    d, arrays = files
    probe_cli(cli, d)
    cli.ok("probe", "--update", d / "old.h5", "--bank", d / "b.npy", "--gallery", d / "g.npy", "--add-gallery",
           d / "gn.npy", "--remove-gallery", d / "rem.npy", "--add-bank", d / "bn.npy", "-o", d / "new.h5", "-q")
    keep = np.setdiff1d(np.arange(40), arrays["rem"])
    np.save(d / "final_g.npy", np.concatenate([arrays["g"][keep], arrays["gn"]]))
    np.save(d / "final_b.npy", np.concatenate([arrays["b"], arrays["bn"]]))
    cli.ok("probe", "--bank", d / "final_b.npy", "--gallery", d / "final_g.npy", "--similarity", "dot", "--beta",
           BETA, "-o", d / "fresh.h5", "-q")
    with qbnorm_cli.Probe.load(d / "new.h5") as new, qbnorm_cli.Probe.load(d / "fresh.h5") as fresh:
        assert new.attrs["gallery_identity"] == fresh.attrs["gallery_identity"]
        for name in ("/log_norm", "/topk_mean", "/column_mean", "/bank_neighbors", "/activation_count"):
            np.testing.assert_allclose(new.record(name), fresh.record(name), rtol=1e-12, err_msg=name)
    # the normalise of the final gallery accepts the updated probe (its gallery identity is the final one)
    cli.ok("normalise", "--queries", d / "gn.npy", "--gallery", d / "final_g.npy", "--probe", d / "new.h5",
           "--similarity", "dot", "-o", d / "n.h5", "-q")


def test_cli_wrong_gallery_is_exit_3(cli, files):
    d, _ = files
    probe_cli(cli, d)
    err = fails(cli, 3, "probe", "--update", d / "old.h5", "--bank", d / "b.npy", "--gallery", d / "other.npy",
                    "--add-bank", d / "bn.npy", "-o", d / "new.h5")
    assert "other.npy" in err and "fingerprint" in err and not (d / "new.h5").exists()
    # --force overwrites; it never lets the wrong gallery through
    (d / "new.h5").write_bytes(b"")
    fails(cli, 3, "probe", "--update", d / "old.h5", "--bank", d / "b.npy", "--gallery", d / "other.npy",
              "--add-bank", d / "bn.npy", "-o", d / "new.h5", "--force")
    assert (d / "new.h5").read_bytes() == b""


def test_an_older_probe_is_refused(cli, files):
    d, _ = files
    probe_cli(cli, d)
    with h5py.File(d / "old.h5", "a") as h5:  # what a probe of the version before had
        for stat in UPDATE_RECORDS:
            if stat.name in h5:
                del h5[stat.name]
    err = fails(cli, 3, "probe", "--update", d / "old.h5", "--bank", d / "b.npy", "--gallery", d / "g.npy",
                    "--add-bank", d / "bn.npy", "-o", d / "new.h5")
    assert "re-probe once with this version" in err and err.count("\n") == 1


def test_a_damaged_record_is_refused(cli, files):
    d, _ = files
    probe_cli(cli, d)
    with h5py.File(d / "old.h5", "a") as h5:
        h5["/bank_top_items"][0, 0] = 10**6
    err = fails(cli, 3, "probe", "--update", d / "old.h5", "--bank", d / "b.npy", "--gallery", d / "g.npy",
                    "--add-gallery", d / "gn.npy", "-o", d / "new.h5")
    assert "bank_top_items" in err and not (d / "new.h5").exists()


def test_damaged_neighbour_scores_are_refused(cli, files):
    d, _ = files
    probe_cli(cli, d)
    with h5py.File(d / "old.h5", "a") as h5:  # out of order: a hand-edited file would merge wrongly
        h5["/bank_top_scores"][0, 0] = -1000.0
    err = fails(cli, 3, "probe", "--update", d / "old.h5", "--bank", d / "b.npy", "--gallery", d / "g.npy",
                "--add-gallery", d / "gn.npy", "-o", d / "new.h5")
    assert "bank_top_scores" in err and "damaged" in err and not (d / "new.h5").exists()


def test_usage_errors(cli, files):
    d, _ = files
    probe_cli(cli, d)
    assert "--update" in fails(cli, 2, "probe", "--bank", d / "b.npy", "--gallery", d / "g.npy", "--add-bank",
                                   d / "bn.npy", "-o", d / "x.h5")
    assert "keeps the settings" in fails(cli, 2, "probe", "--update", d / "old.h5", "--bank", d / "b.npy",
                                             "--gallery", d / "g.npy", "--beta", 5, "--add-bank", d / "bn.npy",
                                             "-o", d / "x.h5")
    assert "nothing to update" in fails(cli, 2, "probe", "--update", d / "old.h5", "--bank", d / "b.npy",
                                            "--gallery", d / "g.npy", "-o", d / "x.h5")
    np.save(d / "bad.npy", np.array([0, 400]))
    assert "400" in fails(cli, 3, "probe", "--update", d / "old.h5", "--bank", d / "b.npy", "--gallery",
                              d / "g.npy", "--remove-gallery", d / "bad.npy", "-o", d / "x.h5")


def test_library_errors():
    rng = np.random.default_rng(2)
    gallery, bank = ints(rng, 20), ints(rng, 30)
    old = qbnorm_cli.probe(bank, gallery, **SETTINGS)
    with pytest.raises(UsageError, match="bank"):
        qbnorm_cli.update_probe(old, gallery=gallery, add_bank=ints(rng, 3))
    with pytest.raises(DataError, match="fingerprint"):
        qbnorm_cli.update_probe(old, bank=bank[::-1].copy(), gallery=gallery, add_bank=ints(rng, 3))
    sims = qbnorm_cli.probe(bank_sims=bank @ gallery.T, betas=[BETA])
    with pytest.raises(UsageError, match="precomputed"):
        qbnorm_cli.update_probe(sims, bank=bank, gallery=gallery, add_bank=ints(rng, 3))


@pytest.mark.slow
def test_cluster_update_is_the_same(tmp_path):
    rng = np.random.default_rng(4)
    gallery, bank = ints(rng, 40), ints(rng, 60)
    old = qbnorm_cli.probe(bank, gallery, **SETTINGS)
    change = {"add_gallery": ints(rng, 6), "remove_gallery": np.array([1, 2]), "add_bank": ints(rng, 9)}
    here = qbnorm_cli.update_probe(old, bank=bank, gallery=gallery, **change)
    there = qbnorm_cli.update_probe(old, bank=bank, gallery=gallery, cluster="local:2", **change)
    for name, stored in here.datasets.items():
        np.testing.assert_array_equal(np.asarray(there.datasets[name].data), np.asarray(stored.data), err_msg=name)


# --- the cron example ----------------------------------------------------------------------------

NIGHTLY = Path(__file__).resolve().parent.parent / "examples" / "nightly" / "nightly.sh"
SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "multi30k-sample.h5"


def nightly_state(root: Path) -> Path:
    """Yesterday's state on the sample data: 180 items probed with 500 bank queries; today 20 items
    arrive, 2 leave and 100 queries were logged; the labelled queries of the kept items."""
    with h5py.File(SAMPLE, "r") as h5:
        gallery, train = h5["gallery"][:], h5["train_queries"][:600]
        queries, gt = h5["queries"][:], h5["gt"][:]
    state = root / "state"
    (state / "today").mkdir(parents=True)
    (state / "eval").mkdir()
    np.save(state / "gallery.npy", gallery[:180])
    np.save(state / "bank.npy", train[:500])
    np.save(state / "today" / "new_items.npy", gallery[180:])
    gone = np.array([3, 17])
    np.save(state / "today" / "gone.npy", gone)
    np.save(state / "today" / "logged_queries.npy", train[500:])
    where = np.full(len(gallery), -1)
    where[np.setdiff1d(np.arange(len(gallery)), gone)] = np.arange(len(gallery) - len(gone))
    labelled = where[gt] >= 0
    np.save(state / "eval" / "queries.npy", queries[labelled])
    np.save(state / "eval" / "gt.npy", where[gt][labelled])
    assert main(["probe", "--bank", str(state / "bank.npy"), "--gallery", str(state / "gallery.npy"), "-o",
                 str(state / "probe.h5"), "-q"]) == 0
    return state


def run_nightly(state: Path, **env) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(["bash", str(NIGHTLY), str(state)], capture_output=True, text=True,
                          env={**os.environ, "PATH": path, **env})


@pytest.mark.slow
def test_the_nightly_example_runs(tmp_path):
    state = nightly_state(tmp_path)
    before = (state / "probe.h5").read_bytes()
    failed = run_nightly(state, MIN_R1="101")  # a gate that cannot pass: exit 4, nothing promoted
    assert failed.returncode == 4, failed.stderr
    assert (state / "probe.h5").read_bytes() == before and (state / "today" / "gone.npy").exists()
    done = run_nightly(state)
    assert done.returncode == 0, done.stderr
    with qbnorm_cli.Probe.load(state / "probe.h5") as probe:
        assert (probe.n_gallery, probe.n_bank) == (198, 600)
    assert (state / "index" / "vectors.npy").exists() and not any((state / "today").iterdir())


def test_a_large_record_is_read_whole_into_mapped_memory(tmp_path):
    """A record of 4 MiB or more (an update reads each item's K largest scores whole) is read into
    memory mapped at once (core/memory.py): the same values, dtype and shape as h5py reads."""
    from qbnorm_cli.core.memory import MAPPED_FROM
    from qbnorm_cli.io.probefile import Probe

    rng = np.random.default_rng(3)
    bank, gallery = rng.normal(size=(130, 8)).astype(np.float32), rng.normal(size=(8200, 8)).astype(np.float32)
    path = tmp_path / "p.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qbnorm_cli.probe(bank, gallery, output=path)
    name = "/item_top_scores"
    with h5py.File(path, "r") as h5:
        want = h5[name][()]
    assert want.nbytes >= MAPPED_FROM
    probe = Probe.load(path)
    try:
        got = probe.record(name)
    finally:
        probe.close()
    assert got.dtype == want.dtype and got.shape == want.shape and not got.flags.owndata
    np.testing.assert_array_equal(got, want)
    # with spare rows after its own (an update's final records): its rows first, read in place
    for source in (path, probe_in_memory := qbnorm_cli.probe(bank, gallery)):
        opened = Probe.load(source) if source is path else source
        try:
            more = opened.record(name, spare_rows=7)
        finally:
            opened.close()
        assert more.shape == (want.shape[0] + 7, want.shape[1]) and more.dtype == want.dtype
        np.testing.assert_array_equal(more[:want.shape[0]], want)
    assert probe_in_memory.record(name).shape == want.shape


def test_rows_read_where_they_go_are_the_rows_read(tmp_path):
    """An update reads the gallery's kept rows straight into the final array (read_into): the values
    `read` gives, from HDF5 and from any other format; a non-finite value is refused naming its row."""
    from qbnorm_cli.io.specs import as_input

    rng = np.random.default_rng(4)
    rows = rng.normal(size=(50, 6)).astype(np.float32)
    with h5py.File(tmp_path / "g.h5", "w") as h5:
        h5["embeddings"] = rows
        bad = rows.copy()
        bad[33, 2] = np.nan
        h5["bad"] = bad
        h5["wide"] = rows.astype(np.float64)
    np.save(tmp_path / "g.npy", rows)
    for spec in (f"{tmp_path / 'g.h5'}::/embeddings", f"{tmp_path / 'g.h5'}::/wide", tmp_path / "g.npy"):
        item = as_input(str(spec), "gallery")
        out = np.zeros((20, 6), dtype=np.float32)
        assert item.read_into(out, 10) is out
        np.testing.assert_array_equal(out, item.read(10, 30))
    with pytest.raises(DataError, match="row 33"):
        as_input(f"{tmp_path / 'g.h5'}::/bad", "gallery").read_into(np.zeros((30, 6), dtype=np.float32), 20)
