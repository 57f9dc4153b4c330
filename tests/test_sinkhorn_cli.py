"""The CLI of sn, dbsn, dn and the min-count DIS: probe --sinkhorn and its options, normalise --method
sn|dbsn|dn --lambda --min-count, tune and --params, their files, errors and warnings; and the
library gives the CLI's results bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import reference as ref
import tolerance as tol
from conftest import N_BANK, N_GALLERY, read_h5
from helpers import leftovers
from test_sinkhorn import bound

import qbnorm_cli

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "multi30k-sample.h5"
SPEC = f"{SAMPLE}::"


def save(path, arr) -> str:
    np.save(path, np.asarray(arr, dtype=np.float32))
    return str(path)


@pytest.fixture
def sims(tmp_path, rnd):
    """P (bank × gallery), PB (bank × gallery-bank), H, S as .npy files (float32-exact values)."""
    PB = np.asarray(np.random.default_rng(3).uniform(-1, 1, (N_BANK, 11)), dtype=np.float32).astype(np.float64)
    matrices = {"P": rnd.P, "PB": PB, "H": rnd.H, "S": rnd.S}
    files = {name: save(tmp_path / f"{name}.npy", M) for name, M in matrices.items()}
    return {**files, "pb": PB}


def test_probe_and_normalise_sn_dbsn_from_score_files(cli, tmp_path, rnd, sims):
    probe = tmp_path / "probe.h5"
    out = cli.ok("probe", "--bank-sims", sims["P"], "--bank-gallery-bank-sims", sims["PB"], "--beta", 5, "--beta", 20,
                 "--sinkhorn", "--sinkhorn-iters", 6, "-o", probe, "--json")
    doc = json.loads(out)
    assert [r["iterations"] for r in doc["sinkhorn"]] == [6, 6] and [r["beta"] for r in doc["dual_sinkhorn"]] == [5, 20]
    written = read_h5(probe)
    params = written["attrs"]["params"]
    assert params["sinkhorn"] and params["dual_sinkhorn"] and params["sinkhorn_iters"] == 6
    assert params["sinkhorn_tol"] is None and params["sinkhorn_max_iters"] is None
    assert written["/sinkhorn_log_u"].shape == written["/dual_sinkhorn_log_u"].shape == (2, N_GALLERY)
    with h5py.File(probe, "r") as h5:
        attrs = h5["/sinkhorn_log_u"].attrs
        assert attrs["fixed_iters"] == 6 and list(attrs["iterations"]) == [6, 6] and list(attrs["betas"]) == [5, 20]
        assert h5["/dual_sinkhorn_log_u"].attrs["gallery_bank_rows"] == 11
    tol.assert_close(written["/column_mean"], rnd.P.mean(axis=0), tol.gamma(N_BANK + 2, tol.U64))
    for beta, row in ((5.0, 0), (20.0, 1)):
        want = ref.sinkhorn(rnd.P, beta, iters=6)
        tol.assert_close(written["/sinkhorn_log_u"][row], want.log_u, 2 * bound(rnd.P, beta, want))
        stacked = np.hstack([rnd.P, sims["pb"]])
        want = ref.dual_bank_sinkhorn(rnd.P, sims["pb"], beta, iters=6)
        tol.assert_close(written["/dual_sinkhorn_log_u"][row], want.log_u[:N_GALLERY], 2 * bound(stacked, beta, want))

    for method in ("sn", "dbsn"):
        cli.ok("normalise", "--sims", sims["S"], "--probe", probe, "--method", method, "--beta", 20, "--dtype",
               "float64", "-o", tmp_path / f"{method}.h5", "-q")
        got = read_h5(tmp_path / f"{method}.h5")
        want, _ = ref.normalise(method, rnd.S, rnd.P, PB=sims["pb"], beta=20.0, iters=6)
        stacked = rnd.P if method == "sn" else np.hstack([rnd.P, sims["pb"]])
        b = 2 * bound(stacked, 20.0, ref.sinkhorn(stacked, 20.0, iters=6)) + tol.eval64(float(np.abs(want).max()))
        tol.assert_close(got["/scores"], want, b)
        assert got["attrs"]["params"]["method"] == method and got["attrs"]["score_domain"].startswith("log")
        assert got["/normalised"].all()


def test_probe_reports_convergence_and_warns_at_the_limit(cli, tmp_path, sims):
    code, _, err = cli("probe", "--bank-sims", sims["P"], "--beta", 20, "--sinkhorn", "-o", tmp_path / "p.h5")
    assert code == 0 and "Sinkhorn β=20: converged after" in err and "did not converge" not in err
    assert "; kernel held in memory)" in err and "hint:" not in err
    code, _, err = cli("probe", "--bank-sims", sims["P"], "--beta", 20, "--sinkhorn", "--block-rows", 12, "-o",
                       tmp_path / "r.h5")
    assert code == 0 and "; kernel recomputed on every iteration)" in err
    assert "hint:" not in err  # blocks fixed by hand are never held, whatever --memory
    code, out, err = cli("probe", "--bank-sims", sims["P"], "--beta", 20, "--sinkhorn", "--sinkhorn-max-iters", 3,
                         "-o", tmp_path / "q.h5", "--json")
    assert code == 0
    assert ("qbnorm: warning: Sinkhorn at β=20 did not converge: the log scalings still changed by" in err
            and "after 3 iterations (--sinkhorn-max-iters 3), more than --sinkhorn-tol 1e-06" in err
            and "raise --sinkhorn-max-iters, or use a smaller β" in err)
    run = json.loads(out)["sinkhorn"][0]
    assert run["iterations"] == 3 and run["converged"] is False
    assert any(w.startswith("Sinkhorn at β=20") for w in json.loads(read_h5(tmp_path / "q.h5")["attrs"]["warnings"]))


def test_normalise_dn_and_min_count(cli, tmp_path, rnd, sims):
    probe = tmp_path / "probe.h5"
    cli.ok("probe", "--bank-sims", sims["P"], "--gallery-bank-sims", sims["H"], "--beta", 20, "--gallery-beta", 1,
           "--k", 3, "-o", probe, "-q")
    cases = [("dn", ["--lambda", 0.5], {"lam": 0.5}), ("dn", [], {}),
             ("dis", ["--min-count", 2], {"k": 1, "min_count": 2}),
             ("dis", ["--k", 3, "--min-count", 4], {"k": 3, "min_count": 4}),
             ("dual-dis", ["--min-count", 3], {"k": 1, "min_count": 3})]
    for method, flags, params in cases:
        out = tmp_path / "out.h5"
        cli.ok("normalise", "--sims", sims["S"], "--probe", probe, "--method", method, *flags, "--dtype", "float64",
               "-o", out, "--force", "-q")
        got = read_h5(out)
        want, gated = ref.normalise(method, rnd.S, rnd.P, rnd.H, beta=20.0, gallery_beta=1.0, **params)
        np.testing.assert_array_equal(got["/normalised"], gated)
        tol.assert_close(got["/scores"], want, 2 * tol.method_error(method, 0.0, 80.0, N_BANK, 2.6, beta=20.0,
                                                                    lam=params.get("lam", 0.25)))
        recorded = got["attrs"]["params"]
        assert recorded["method"] == method
        if method == "dn":
            assert recorded["lam"] == params.get("lam", 0.25) and recorded["min_count"] is None
        else:
            assert recorded["min_count"] == params["min_count"] and recorded["lam"] is None


def test_option_errors(cli, tmp_path, sims):
    probe, other = tmp_path / "p.h5", tmp_path / "x.h5"
    cli.ok("probe", "--bank-sims", sims["P"], "--beta", 20, "-o", probe, "-q")
    base = ["probe", "--bank-sims", sims["P"], "-o", other]
    cases = [
        ([*base, "--sinkhorn-iters", 3], 2, "--sinkhorn-iters needs --sinkhorn"),
        ([*base, "--sinkhorn-tol", 1e-3], 2, "--sinkhorn-tol needs --sinkhorn"),
        ([*base, "--sinkhorn", "--sinkhorn-iters", 0], 2, "--sinkhorn-iters 0: must be at least 1"),
        ([*base, "--sinkhorn", "--sinkhorn-max-iters", 0], 2, "--sinkhorn-max-iters 0: must be at least 1"),
        ([*base, "--sinkhorn", "--sinkhorn-tol", 0], 2, "--sinkhorn-tol 0.0: must be a finite number > 0"),
        ([*base, "--sinkhorn", "--sinkhorn-tol", "nan"], 2, "--sinkhorn-tol nan: must be a finite number > 0"),
        ([*base, "--sinkhorn", "--sinkhorn-iters", 3, "--sinkhorn-tol", 1e-3], 2,
         "give either --sinkhorn-iters (a fixed number of iterations) or --sinkhorn-tol (iterate until converged)"),
        ([*base, "--bank-gallery-bank-sims", sims["PB"]], 2,
         "--bank-gallery-bank-sims is for the dual-bank Sinkhorn: add --sinkhorn"),
        ([*base, "--sinkhorn", "--bank-gallery-bank-sims", sims["S"]], 3,
         f"{sims['S']} has 19 rows but the bank has 37 queries"),
        ([*base, "--sinkhorn", "--gallery-bank-sims", sims["H"], "--bank-gallery-bank-sims", sims["PB"]], 3,
         f"{sims['PB']} has 11 columns but the gallery bank has 29 items"),
        (["normalise", "--sims", sims["S"], "--probe", probe, "--method", "sn", "-o", other], 2,
         f"{probe}: the probe has no Sinkhorn potentials; probe again with --sinkhorn"),
        (["normalise", "--sims", sims["S"], "--probe", probe, "--method", "dbsn", "-o", other], 2,
         "no dual-bank Sinkhorn potentials; probe again with --sinkhorn and --gallery-bank"),
        (["normalise", "--sims", sims["S"], "--probe", probe, "--method", "dn", "--lambda", -1, "-o", other], 2,
         "--lambda -1.0: must be a finite number ≥ 0"),
        (["normalise", "--sims", sims["S"], "--probe", probe, "--method", "dis", "--min-count", 0, "-o", other], 2,
         "--min-count 0: must be at least 1"),
    ]
    for args, code, message in cases:
        got, _, err = cli(*args)
        assert got == code and message in err, (args, err)
        assert err.count("\n") == 1 and not other.exists()
    cli.ok("probe", "--bank-sims", sims["P"], "--beta", 5, "--sinkhorn", "--sinkhorn-iters", 2, "-o", other, "-q")
    code, _, err = cli("normalise", "--sims", sims["S"], "--probe", other, "--method", "sn", "--beta", 7, "-o",
                       tmp_path / "y.h5")
    assert code == 2 and "--beta 7: " in err and "Sinkhorn potentials for betas 5; probe again with --beta 7 and " \
        "--sinkhorn" in err


def test_an_empty_activation_set_is_a_warning(cli, tmp_path, sims):
    cli.ok("probe", "--bank-sims", sims["P"], "--beta", 20, "-o", tmp_path / "p.h5", "-q")
    code, _, err = cli("normalise", "--sims", sims["S"], "--probe", tmp_path / "p.h5", "--method", "dis",
                       "--min-count", 1000, "-o", tmp_path / "d.h5")
    assert code == 0 and "warning: no gallery item is in the top-1 of 1000 or more bank queries: dis leaves every " \
        "row raw; lower --min-count" in err
    assert not read_h5(tmp_path / "d.h5")["/normalised"].any()


def test_help_lists_the_methods_their_sources_and_costs(cli):
    _, out, _ = cli("normalise", "--help")
    text = " ".join(out.split())
    for method in ("sn", "dbsn", "dn"):
        assert f"{method}: " in text
    assert "Pan et al. ACM MM 2025" in text and "Zhou et al. NeurIPS 2023" in text
    assert "probe --sinkhorn: two passes" in text and "two matrix-vector products" in text and "--lambda L" in text
    assert "--min-count θ" in text and text.count("Cost: ") == len(qbnorm_cli.METHODS)
    _, out, _ = cli("probe", "--help")
    text = " ".join(out.split())
    for option in ("--sinkhorn ", "--sinkhorn-iters N", "--sinkhorn-tol T", "--sinkhorn-max-iters N",
                   "--bank-gallery-bank-sims"):
        assert option in text


# --- the sample data: CLI and library, tune, --params ----------------------------------------------

@pytest.fixture(scope="module")
def sample_probe(tmp_path_factory):
    from qbnorm_cli.cli import main

    out = tmp_path_factory.mktemp("sn") / "probe.h5"
    code = main(["probe", "--bank", f"{SPEC}/train_queries", "--gallery", f"{SPEC}/gallery", "--gallery-bank",
                 f"{SPEC}/train_gallery", "--beta", 50, "--sinkhorn", "-o", str(out), "--quiet"])
    assert code == 0
    return out


def test_the_library_gives_the_cli_results_bit_for_bit(cli, tmp_path, sample_probe):
    with h5py.File(SAMPLE, "r") as h5:
        q, g, b, gb, gt = (h5[n][()] for n in ("queries", "gallery", "train_queries", "train_gallery", "gt"))
    probe = qbnorm_cli.probe(b, g, gallery_bank=gb, betas=[50.0], sinkhorn=True)
    written = read_h5(sample_probe)
    for name in ("/sinkhorn_log_u", "/dual_sinkhorn_log_u", "/column_mean"):
        np.testing.assert_array_equal(probe.datasets[name][()], written[name], err_msg=name)
    raw = qbnorm_cli.evaluate(qbnorm_cli.normalise(q, g, probe, method="none", top_k=10), gt)["metrics"]["R@1"]
    for method, flags in (("sn", {}), ("dbsn", {}), ("dn", {"lam": 0.5})):
        args = [f"--lambda={flags['lam']}"] if flags else []
        cli.ok("normalise", "--queries", f"{SPEC}/queries", "--gallery", f"{SPEC}/gallery", "--probe", sample_probe,
               "--method", method, *args, "--top-k", 10, "-o", tmp_path / f"{method}.h5", "-q")
        top = qbnorm_cli.normalise(q, g, probe, method=method, top_k=10, **flags)
        got = read_h5(tmp_path / f"{method}.h5")
        np.testing.assert_array_equal(top.indices, got["/neighbors"])
        np.testing.assert_array_equal(top.scores.astype(np.float32), got["/scores"])
        if method != "dn":  # Sinkhorn at β = 50 on the sample: well above the raw retrieval (48.1)
            assert qbnorm_cli.evaluate(top, gt)["metrics"]["R@1"] > raw + 2


def test_tune_searches_sn_dbsn_dn_and_params_apply(cli, tmp_path):
    val = [f"--queries={SPEC}/val_queries", f"--gallery={SPEC}/val_gallery", f"--gt={SPEC}/val_gt"]
    params = tmp_path / "params.json"
    code, out, err = cli("tune", *val, "--bank", f"{SPEC}/train_queries", "--gallery-bank", f"{SPEC}/train_gallery",
                         "--methods", "sn,dbsn,dn,dis", "--beta", 20, "--beta", 50, "-o", params, "--json", "--all")
    assert code == 0, err
    doc = json.loads(out)
    labels = {(s["method"], s["beta"], s["lam"], s["min_count"]) for s in doc["settings"]}
    assert {("sn", 20.0, None, None), ("sn", 50.0, None, None), ("dbsn", 50.0, None, None)} <= labels
    assert {lam for m, _, lam, _ in labels if m == "dn"} == {0.1, 0.25, 0.5, 0.75, 1.0}
    assert {theta for m, _, _, theta in labels if m == "dis"} == {1, 3, 5}
    assert len(doc["settings"]) == 1 + 2 + 2 + 5 + 2 * 3 * 3
    assert "sn β=50" in err and "dn λ=0.5" in err and "dis β=20 k=1 θ=3" in err
    best = json.loads(params.read_text())
    for method in ("sn", "dbsn"):
        one = tmp_path / f"{method}.json"
        cli.ok("tune", *val, "--bank", f"{SPEC}/train_queries", "--gallery-bank", f"{SPEC}/train_gallery", "--methods",
               method, "--beta", 50, "-o", one, "-q")
        probe = tmp_path / f"{method}.h5"
        cli.ok("probe", "--params", one, "--bank", f"{SPEC}/train_queries", "--gallery-bank", f"{SPEC}/train_gallery",
               "--gallery", f"{SPEC}/gallery", "-o", probe, "-q")
        written = read_h5(probe)
        assert written["attrs"]["params"]["sinkhorn"] and "/sinkhorn_log_u" in written
        cli.ok("normalise", "--params", one, "--probe", probe, "--queries", f"{SPEC}/queries", "--gallery",
               f"{SPEC}/gallery", "-o", tmp_path / f"{method}_test.h5", "-q")
        assert read_h5(tmp_path / f"{method}_test.h5")["attrs"]["method"] == method
    assert best["method"] in ("sn", "dbsn", "dn", "dis")
    code, _, err = cli("probe", "--params", tmp_path / "dbsn.json", "--bank", f"{SPEC}/train_queries",
                       "--gallery", f"{SPEC}/gallery", "-o", tmp_path / "nope.h5")
    assert code == 2 and "(dbsn) was tuned with --gallery-bank" in err and "add --gallery-bank " in err


def test_held_kernels_the_system_cannot_map_are_one_out_of_memory_line(cli, tmp_path, sims, monkeypatch):
    """The runs' held kernels and scores are mapped up front (core.memory.mapped_empty): a refusal
    is the out-of-memory line and exit 1, not an internal error, and nothing is written."""
    import errno
    import mmap

    mapping = mmap.mmap

    def refuse(fileno, *args, **kwargs):  # anonymous memory only: the .npy inputs are mapped files
        if fileno == -1:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return mapping(fileno, *args, **kwargs)

    monkeypatch.setattr(mmap, "mmap", refuse)
    probe = tmp_path / "probe.h5"
    code, _, err = cli("probe", "--bank-sims", sims["P"], "--beta", 20, "--sinkhorn", "-o", probe)
    assert (code, err) == (1, "qbnorm: error: out of memory; lower --memory\n")
    assert not probe.exists() and leftovers(tmp_path) == []
