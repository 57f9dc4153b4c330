"""`qbnorm tune`, `--params` in probe/normalise, and the bank-coverage diagnostics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import read_h5

from qbnorm_cli import methods
from qbnorm_cli.api import tuning as tn
from qbnorm_cli.core import scale
from qbnorm_cli.core.statistics import bank_diagnostics, coverage_warning
from qbnorm_cli.errors import DataError, UsageError
from qbnorm_cli.io.paramsfile import load_params

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "multi30k-sample.h5"
VAL = [f"--queries={SAMPLE}::/val_queries", f"--gallery={SAMPLE}::/val_gallery", f"--gt={SAMPLE}::/val_gt"]
BANK = f"{SAMPLE}::/train_queries"
GALLERY_BANK = f"{SAMPLE}::/train_gallery"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One tune run on the sample's validation split, shared by the tests below."""
    from qbnorm_cli.cli import main

    out = tmp_path_factory.mktemp("tune") / "params.json"
    code = main(["tune", *VAL, "--bank", BANK, "--gallery-bank", GALLERY_BANK, "-o", str(out),
                 "--methods", "is,dis,csls,nnn,dual-is", "--beta", "20", "--beta", "50", "--beta", "100",
                 "--gallery-beta", "1", "--gallery-beta", "5", "--quiet"])
    assert code == 0
    return out, json.loads(out.read_text())


def test_tune_writes_the_winner_and_beats_raw(tuned):
    _, doc = tuned
    assert doc["qbnorm_kind"] == "params" and doc["metric"] == "GeomR"
    assert doc["method"] in ("is", "dis", "csls", "nnn", "dual-is")
    for key in ("beta", "k", "gallery_beta", "topk_mean", "alpha"):
        assert key in doc
    assert doc["metrics"]["GeomR"] > doc["raw_metrics"]["GeomR"]
    assert doc["candidates"][0]["metrics"]["GeomR"] == doc["metrics"]["GeomR"]
    assert doc["score_scale"] == "cosine"
    assert doc["validation"]["queries"]["dataset"] == "/val_queries"
    assert doc["validation"]["queries"]["identity"] and doc["validation"]["bank"]["dataset"] == "/train_queries"
    # 1 raw + 3 is + 27 dis (β × k × θ) + 3 csls + 9 nnn + 6 dual-is
    assert doc["settings_evaluated"] == 49


def test_tune_table_json_and_metric(tmp_path, cli):
    code, out, err = cli("tune", *VAL, "--bank", BANK, "-o", tmp_path / "p.json", "--methods", "dis",
                         "--beta", 50, "--metric", "MdR", "--json")
    assert code == 0
    assert "raw" in err and "dis β=50" in err and "sorted by MdR" in err
    doc = json.loads(out)
    assert doc["metric"] == "MdR" and doc["settings"][-1]["metrics"]["MdR"] >= doc["best"]["metrics"]["MdR"]
    assert {s["method"] for s in doc["settings"]} == {"none", "dis"}
    code, _, err = cli("tune", *VAL, "--bank", BANK, "-o", tmp_path / "p.json", "--methods", "dis")
    assert code == 2 and "--force" in err


def test_tune_usage_errors(tmp_path, cli):
    code, _, err = cli("tune", *VAL, "--bank", BANK, "-o", tmp_path / "p.json", "--methods", "dual-is")
    assert code == 2 and "gallery bank" in err
    code, _, err = cli("tune", *VAL, "--bank", BANK, "-o", tmp_path / "p.json", "--metric", "R@2")
    assert code == 2
    code, _, err = cli("tune", *VAL, "-o", tmp_path / "p.json")
    assert code == 2 and "--bank" in err
    code, _, err = cli("tune", *VAL[:2], f"--gt={SAMPLE}::/gt", "--bank", BANK, "-o", tmp_path / "p.json")
    assert code == 3 and "ground-truth rows" in err


def test_params_apply_to_the_test_split(tuned, tmp_path, cli):
    params, doc = tuned
    probe = tmp_path / "probe.h5"
    cli.ok("probe", "--params", params, "--bank", BANK, "--gallery-bank", GALLERY_BANK,
           "--gallery", f"{SAMPLE}::/gallery", "-o", probe)
    out = tmp_path / "tuned.h5"
    code, _, err = cli("normalise", "--params", params, "--probe", probe, "--queries", f"{SAMPLE}::/queries",
                       "--gallery", f"{SAMPLE}::/gallery", "-o", out)
    assert code == 0 and "tuned on" not in err
    written = read_h5(out)
    assert written["attrs"]["method"] == doc["method"]
    for key in ("beta", "gallery_beta", "topk_mean"):
        if doc[key] is not None:
            assert written["attrs"]["params"][key] == doc[key]
    # explicit options override the file
    cli.ok("normalise", "--params", params, "--probe", probe, "--queries", f"{SAMPLE}::/queries",
           "--gallery", f"{SAMPLE}::/gallery", "-o", tmp_path / "raw.h5", "--method", "none")
    assert read_h5(tmp_path / "raw.h5")["attrs"]["method"] == "none"


def test_params_on_the_validation_data_warn(tuned, tmp_path, cli):
    params, _ = tuned
    probe = tmp_path / "probe.h5"
    code, _, err = cli("probe", "--params", params, "--bank", BANK, "--gallery-bank", GALLERY_BANK,
                       "--gallery", f"{SAMPLE}::/val_gallery", "-o", probe)
    assert code == 0 and "validation data" in err
    code, _, err = cli("normalise", "--params", params, "--probe", probe, "--queries", f"{SAMPLE}::/val_queries",
                       "--gallery", f"{SAMPLE}::/val_gallery", "-o", tmp_path / "n.h5")
    assert code == 0 and "tuned on" in err and "/val_queries" in err


def test_probe_params_needs_gallery_bank_for_dual(tmp_path, cli):
    params = tmp_path / "dual.json"
    params.write_text(json.dumps({"qbnorm_kind": "params", "qbnorm_version": 1, "method": "dual-is",
                                  "beta": 50, "gallery_beta": 1}))
    code, _, err = cli("probe", "--params", params, "--bank", BANK, "--gallery", f"{SAMPLE}::/gallery",
                       "-o", tmp_path / "p.h5")
    assert code == 2 and "needs --gallery-bank" in err


def test_load_params_errors(tmp_path):
    with pytest.raises(UsageError):
        load_params(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not a JSON file"):
        load_params(str(bad))
    bad.write_text(json.dumps({"method": "is"}))
    with pytest.raises(DataError, match="not a qbnorm params file"):
        load_params(str(bad))
    bad.write_text(json.dumps({"qbnorm_kind": "params", "method": "magic"}))
    with pytest.raises(DataError, match="unknown method"):
        load_params(str(bad))


def test_grid_and_methods():
    names = lambda chosen: [m.name for m in chosen]
    classic = ["ls", "nicdm", "mp", "dsl"]
    assert names(methods.tuned_methods(None, False)) == ["is", "dis", "csls", "nnn", "sn", "dn", *classic]
    assert names(methods.tuned_methods(None, True)) == ["is", "dis", "csls", "nnn", "dual-is", "dual-dis", "sn",
                                                        "dbsn", "dn", *classic]
    # a gallery bank given as gallery-bank × gallery scores only: dbsn lacks the bank × gallery-bank scores
    assert "dbsn" not in names(methods.tuned_methods(None, True, False))
    assert names(methods.tuned_methods(None, False, True)) == ["is", "dis", "csls", "nnn", "sn", "dbsn", "dn",
                                                               *classic]
    with pytest.raises(UsageError, match="dbsn: needs the bank's scores against a gallery bank"):
        methods.tuned_methods(["dbsn"], True, False)
    with pytest.raises(UsageError):
        methods.tuned_methods(["is", "magic"], True)
    with pytest.raises(UsageError, match="needs a gallery bank"):
        methods.tuned_methods(["dual-is"], False)
    chosen = [methods.get(m) for m in ("is", "dis", "nnn", "dual-dis")]
    scaled = {"beta": scale.beta_grid(methods.BETA_GRID, None), "gallery_beta": list(methods.GALLERY_BETA_GRID)}
    settings = [tn.Setting(m, v) for m, v in methods.grid(chosen, scaled)]
    assert settings[0].method.baseline
    dis_ks, thetas = methods.get("dis").grid["k"], methods.get("dis").grid["min_count"]
    assert len([s for s in settings if s.method.name == "dis"]) == len(methods.BETA_GRID) * len(dis_ks) * len(thetas)
    assert [s.values for s in settings if s.method.name == "dis"][:2] == [{"beta": 1.0, "k": 1, "min_count": 1},
                                                                          {"beta": 1.0, "k": 1, "min_count": 3}]
    # dual-dis tries θ at its default only (its grid is large already)
    assert {s.values["min_count"] for s in settings if s.method.name == "dual-dis"} == {1}
    needs = methods.ProbeRequest.of([(s.method, s.values) for s in settings])
    assert needs.betas == sorted(methods.BETA_GRID) and needs.kmax == max(dis_ks)
    assert needs.topk_means == methods.get("nnn").grid["topk_mean"] and needs.gallery_bank
    note = tn.edge_note(tn.Setting(methods.get("is"), {"beta": 100.0}), settings)
    assert note is not None and "largest" in note
    assert tn.edge_note(tn.Setting(methods.get("is"), {"beta": 20.0}), settings) is None


def _low_coverage_data(tmp_path, n_gallery=40, n_bank=300, dim=16):
    """A gallery of random directions and a bank whose queries all sit next to gallery item 0 or 1."""
    rng = np.random.default_rng(5)
    gallery = rng.standard_normal((n_gallery, dim)).astype(np.float32)
    near = gallery[rng.integers(0, 2, n_bank)]
    far_domain = (near + 0.05 * rng.standard_normal((n_bank, dim))).astype(np.float32)
    in_domain = (gallery[rng.integers(0, n_gallery, 4 * n_gallery)]
                 + 0.3 * rng.standard_normal((4 * n_gallery, dim))).astype(np.float32)
    np.save(tmp_path / "gallery.npy", gallery)
    np.save(tmp_path / "adversarial.npy", far_domain)
    np.save(tmp_path / "bank.npy", in_domain)


def test_low_coverage_bank_warns(tmp_path, cli):
    _low_coverage_data(tmp_path)
    code, out, err = cli("probe", "--bank", tmp_path / "adversarial.npy", "--gallery", tmp_path / "gallery.npy",
                         "-o", tmp_path / "adv.h5", "--json", "--quiet")
    assert code == 0 and err == ""  # --quiet: silent on success, the warning recorded instead
    doc = json.loads(out)
    [warning] = doc["warnings"]
    assert "low bank coverage" in warning and "--method dis" in warning and "re-sample" in warning
    assert json.loads(read_h5(tmp_path / "adv.h5")["attrs"]["warnings"]) == [warning.replace("--method dis",
                                                                                             "method='dis'")]
    assert doc["coverage"] == 2 / 40 and doc["occurrence_skewness"] > 3
    code, out, err = cli("probe", "--bank", tmp_path / "bank.npy", "--gallery", tmp_path / "gallery.npy",
                         "-o", tmp_path / "ok.h5", "--json")
    assert code == 0 and "low bank coverage" not in err
    assert json.loads(out)["coverage"] >= 0.5


def test_bank_diagnostics_pure():
    neighbors = np.array([[0, 1], [0, 2], [0, 1], [3, 0]])
    diag = bank_diagnostics(neighbors, 1, 10)
    assert diag["coverage"] == 0.2 and diag["covered_items"] == 2
    warning = coverage_warning(diag, 10, "DIS")
    assert warning is not None and "enlarge the bank" in warning and "use DIS" in warning
    assert coverage_warning({**diag, "coverage": 0.6}, 10, "DIS") is None


def test_tune_warns_when_the_bank_is_the_validation_queries(tmp_path, cli):
    code, _, err = cli("tune", *VAL, "--bank", f"{SAMPLE}::/val_queries", "-o", tmp_path / "p.json",
                       "--methods", "is", "--beta", 50, "--quiet")
    assert code == 0 and err == ""
    [warning] = json.loads((tmp_path / "p.json").read_text())["warnings"]
    assert "holds the validation queries" in warning
    code, _, err = cli("tune", *VAL, "--bank", f"{SAMPLE}::/val_queries", "-o", tmp_path / "p.json", "--force",
                       "--methods", "is", "--beta", 50)
    assert code == 0 and "holds the validation queries" in err
