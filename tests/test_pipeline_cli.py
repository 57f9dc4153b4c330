"""The pipeline through the CLI and files: build-bank → probe → normalise (qbnorm_cli.cli.main)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest
import reference as ref
import tolerance as tol
from conftest import read_h5
from test_normalisers import DIS_A, DUAL_IS_C, H_C, IS_A, LITERAL, NNN32, P_A, READ32, S_A, nnn_vector

from qbnorm_cli import FORMAT_VERSION
from qbnorm_cli.cli import main
from qbnorm_cli.core import metrics

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "multi30k-sample.h5"
METHODS = ("none", "is", "dis", "csls", "nnn", "gc", "dual-is", "dual-dis")


def save(path, arr) -> str:
    np.save(path, np.asarray(arr))
    return str(path)


def assert_params(actual: dict, expected: dict) -> None:
    """Every expected parameter is recorded with its value (newer versions may record more)."""
    missing = {key: value for key, value in expected.items() if key not in actual or actual[key] != value}
    assert not missing, f"params differ: expected {missing}, got { {k: actual.get(k) for k in missing} }"


def assert_uuid(value) -> str:
    assert str(uuid.UUID(value)) == value
    return value


# --- the hand-checked vectors through files -------------------------------------------------------

def test_hand_checked_dis_via_npy(cli, tmp_path):
    P, S, H = save(tmp_path / "P.npy", P_A), save(tmp_path / "S.npy", S_A), save(tmp_path / "H.npy", H_C)
    probe = tmp_path / "probe.h5"
    cli.ok("probe", "--bank-sims", P, "--gallery-bank-sims", H, "--beta", 20, "--gallery-beta", 20, "--k", 1,
           "-o", probe)
    pr = read_h5(probe)
    assert pr["attrs"]["qbnorm_kind"] == "probe" and pr["attrs"]["params"]["similarity"] == "precomputed"
    np.testing.assert_array_equal(pr["/activation_count"], [2, 1, 0])
    np.testing.assert_array_equal(pr["/bank_neighbors"][:, 0], [0, 0, 1])

    cli.ok("normalise", "--sims", S, "--probe", probe, "--method", "dis", "--dtype", "float64", "-o",
           tmp_path / "dis.h5")
    out = read_h5(tmp_path / "dis.h5")
    tol.assert_close(out["/scores"], DIS_A, LITERAL + READ32)  # .npy read as float32
    np.testing.assert_array_equal(out["/normalised"], [True, False])
    assert out["attrs"]["method"] == "dis" and out["attrs"]["params"]["beta"] == 20.0

    cli.ok("normalise", "--sims", S, "--probe", probe, "--method", "is", "--dtype", "float64", "-o",
           tmp_path / "is.h5")
    tol.assert_close(read_h5(tmp_path / "is.h5")["/scores"], IS_A, LITERAL + READ32)

    cli.ok("normalise", "--sims", S, "--probe", probe, "--method", "dual-is", "--dtype", "float64", "-o",
           tmp_path / "dual.h5")
    out = read_h5(tmp_path / "dual.h5")
    tol.assert_close(out["/scores"], DUAL_IS_C, LITERAL + READ32)
    assert out["attrs"]["params"]["gallery_beta"] == 20.0

    cli.ok("normalise", "--sims", S, "--probe", probe, "--method", "dis", "--top-k", 2, "-o", tmp_path / "r.h5")
    out = read_h5(tmp_path / "r.h5")
    assert out["attrs"]["qbnorm_kind"] == "ranking"
    np.testing.assert_array_equal(out["/neighbors"], [[2, 1], [2, 1]])
    want = np.array([[2.979419, -6.000052], [0.6, 0.2]])
    tol.assert_close(out["/scores"], want, LITERAL + READ32 + tol.stored32(want))  # written as float32


def test_hand_checked_nnn_via_cli(cli, tmp_path):
    gallery, queries, bank = nnn_vector()
    g, q, b = (save(tmp_path / f"{n}.npy", a.astype(np.float32))
               for n, a in (("g", gallery), ("q", queries), ("b", bank)))
    probe = tmp_path / "probe.h5"
    cli.ok("probe", "--bank", b, "--gallery", g, "--similarity", "dot", "--topk-mean", 2, "-o", probe)
    pr = read_h5(probe)
    tol.assert_close(pr["/topk_mean"][0], [0.605, 0.605, 0.605, 0.605, 1.0], NNN32)
    cli.ok("normalise", "--queries", q, "--gallery", g, "--probe", probe, "--method", "nnn", "--topk-mean", 2,
           "--top-k", 1, "-o", tmp_path / "nnn.h5")
    out = read_h5(tmp_path / "nnn.h5")
    assert out["attrs"]["params"]["similarity"] == "dot"  # inherited from the probe
    np.testing.assert_array_equal(out["/neighbors"][:, 0], [0, 1, 2, 3, 4])
    want = np.array([0.14625] * 4 + [0.25])
    tol.assert_close(out["/scores"][:, 0], want, NNN32 + tol.stored32(want))
    cli.ok("normalise", "--queries", q, "--gallery", g, "--probe", probe, "--method", "none", "--top-k", 1,
           "-o", tmp_path / "raw.h5")
    np.testing.assert_array_equal(read_h5(tmp_path / "raw.h5")["/neighbors"][:, 0], [4, 4, 4, 4, 4])


# --- an end-to-end run on small random embeddings -------------------------------------------------

def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """data.h5 → bank.h5, gbank.h5 → probe.h5 (gallery bank, sorted scores, β 20, β₂ 1)."""
    d = tmp_path_factory.mktemp("e2e")
    rng = np.random.default_rng(12)  # a seed whose data holds no near-ties (checked below)
    arrays = {name: rng.normal(size=shape).astype(np.float32) for name, shape in [
        ("train_queries", (60, 8)), ("train_gallery", (50, 8)), ("queries", (19, 8)), ("gallery", (23, 8)),
        ("other_gallery", (23, 8)), ("small_gallery", (20, 8))]}
    with h5py.File(d / "data.h5", "w") as h5:
        for name, arr in arrays.items():
            h5.create_dataset(name, data=arr)
    data = str(d / "data.h5")
    assert main(["build-bank", f"{data}::/train_queries", "-o", str(d / "bank.h5"), "--size", "40", "-q"]) == 0
    assert main(["build-bank", f"{data}::/train_gallery", "-o", str(d / "gbank.h5"), "--size", "30",
                 "--seed", "3", "-q"]) == 0
    assert main(["probe", "--bank", str(d / "bank.h5"), "--gallery", f"{data}::/gallery", "--gallery-bank",
                 str(d / "gbank.h5"), "--keep-sorted", "--beta", "20", "--gallery-beta", "1", "-o",
                 str(d / "probe.h5"), "-q"]) == 0
    bank, gbank = read_h5(d / "bank.h5"), read_h5(d / "gbank.h5")
    g = unit(arrays["gallery"])
    mats = {"P": unit(bank["/embeddings"]) @ g.T, "H": unit(gbank["/embeddings"]) @ g.T,
            "S": unit(arrays["queries"]) @ g.T}
    # qbnorm computes these cosines in float32, the reference in float64: rankings, gates and bank
    # neighbours are compared exactly, which every kernel must then reproduce
    for name, n in (("P", 11), ("H", 11), ("S", 1)):
        tol.assert_separated(mats[name], n, COSINE)
    return {"dir": d, "data": data, "arrays": arrays, "bank": bank, "gbank": gbank,
            "probe": read_h5(d / "probe.h5"), **mats}


COSINE = tol.cosine32(8) + tol.product64(8)  # qbnorm's float32 cosine of 8-d rows against the float64 reference


def method_bound(e2e, method: str, want) -> float:
    """|qbnorm's η − the reference's| for the e2e data (β 20, β₂ 1; cosines within COSINE)."""
    magnitude = float(np.abs(want).max()) + 20.0
    return tol.method_error(method, COSINE, magnitude, n_bank=40, spread=2.0)


def normalise_args(e2e, method, out, *extra):
    return ["normalise", "--queries", f"{e2e['data']}::/queries", "--gallery", f"{e2e['data']}::/gallery",
            "--probe", e2e["dir"] / "probe.h5", "--method", method, "-o", out, *extra]


def test_build_bank_file(e2e):
    bank = e2e["bank"]
    attrs = bank["attrs"]
    assert attrs["qbnorm_kind"] == "bank" and attrs["qbnorm_version"] == FORMAT_VERSION
    assert_uuid(attrs["uuid"])
    assert_params(attrs["params"], {"size": 40, "strategy": "random", "seed": 0, "source_rows": 60})
    (source,) = attrs["inputs"]
    assert source["dataset"] == "/train_queries" and source["path"] == e2e["data"] and source["uuid"] is None
    index = bank["/source_index"]
    assert len(index) == 40 and (np.diff(index) > 0).all()
    np.testing.assert_array_equal(bank["/embeddings"], e2e["arrays"]["train_queries"][index])
    assert e2e["gbank"]["attrs"]["uuid"] != attrs["uuid"]


def test_probe_file(e2e):
    probe = e2e["probe"]
    attrs = probe["attrs"]
    assert attrs["qbnorm_kind"] == "probe" and attrs["qbnorm_version"] == FORMAT_VERSION
    assert_uuid(attrs["uuid"])
    assert_params(attrs["params"], {
        "betas": [20.0], "k": 1, "kmax": 10, "topk_mean": [10, 128], "keep_sorted": True,
        "similarity": "cosine", "gallery_betas": [1.0], "memory": 1 << 30, "block_rows": None,
    })
    bank_in, gallery_in, gbank_in = attrs["inputs"]
    assert bank_in["uuid"] == e2e["bank"]["attrs"]["uuid"] and bank_in["kind"] == "bank"
    assert gallery_in["dataset"] == "/gallery" and gallery_in["uuid"] is None
    assert gbank_in["uuid"] == e2e["gbank"]["attrs"]["uuid"]
    assert attrs["gallery_rows"] == 23 and attrs["bank_rows"] == 40 and attrs["gallery_bank_rows"] == 30
    assert attrs["gallery_identity"] == gallery_in["identity"]
    P, H = e2e["P"], e2e["H"]
    # LSE and means of the K largest are 1-Lipschitz in the scores; sorting too (float32 storage rounds)
    for name, M, beta, n in (("/log_norm", P, 20.0, 40), ("/gallery_log_norm", H, 1.0, 30)):
        want = ref.log_norm(M, beta)
        tol.assert_close(probe[name][0], want, tol.scaled(COSINE, 0, (beta,)) + tol.lse64(n, beta, 2.0, beta + 4))
    tol.assert_close(probe["/topk_mean"], [ref.column_mean_top(P, 10), ref.column_mean_top(P, 128)],
                     COSINE + tol.eval64(1.0, 40))
    sorted_scores = np.sort(P.T, axis=1)
    tol.assert_close(probe["/sorted_bank_scores"], sorted_scores, COSINE + tol.stored32(sorted_scores))
    np.testing.assert_array_equal(probe["/bank_neighbors"], ref.row_top(P, 10))
    np.testing.assert_array_equal(probe["/gallery_bank_neighbors"], ref.row_top(H, 10))
    np.testing.assert_array_equal(probe["/activation_count"],
                                  np.bincount(ref.row_top(P, 1)[:, 0], minlength=23))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_end_to_end(e2e, cli, tmp_path, method):
    dense, ranking = tmp_path / "dense.h5", tmp_path / "ranking.h5"
    cli.ok(*normalise_args(e2e, method, dense, "--dtype", "float64"))
    cli.ok(*normalise_args(e2e, method, ranking, "--top-k", 5))
    out, ranked = read_h5(dense), read_h5(ranking)

    want, want_gated = ref.normalise(method, e2e["S"], e2e["P"], e2e["H"], beta=20.0, gallery_beta=1.0, k=1)
    bound = method_bound(e2e, method, want)
    if method == "gc":  # its ranks count exact comparisons: no query score may lie within 2·COSINE of a bank score
        near = np.abs(e2e["S"][:, None, :] - e2e["P"][None, :, :]) <= 2 * COSINE
        assert not near.any(), "test data with a query score within rounding of a bank score"
        np.testing.assert_array_equal(np.round(out["/scores"] - e2e["S"]), ref.gc_rank(e2e["S"], e2e["P"]) * -1)
    tol.assert_close(out["/scores"], want, bound)
    np.testing.assert_array_equal(out["/normalised"], want_gated)

    tol.assert_separated(want, 5, bound)  # so that both outputs must rank as the reference does
    values, indices = ref.top_n(want, 5)
    np.testing.assert_array_equal(ranked["/neighbors"], indices)
    tol.assert_close(ranked["/scores"], values, bound + tol.stored32(values))
    np.testing.assert_array_equal(ranked["/normalised"], out["/normalised"])
    assert ranked["/neighbors"].shape == (19, 5) and ranked["attrs"]["qbnorm_kind"] == "ranking"

    attrs = out["attrs"]
    assert attrs["qbnorm_kind"] == "similarity" and attrs["qbnorm_version"] == FORMAT_VERSION
    assert attrs["method"] == method and attrs["gallery_rows"] == 23
    probe_uuid = e2e["probe"]["attrs"]["uuid"]
    params = attrs["params"]
    dual, log_domain = method.startswith("dual"), method in ("is", "dis", "dual-is", "dual-dis")
    assert_params(params, {
        "method": method, "beta": 20.0 if log_domain else None, "k": 1, "top_k": None,
        "gallery_beta": 1.0 if dual else None, "topk_mean": {"csls": 10, "nnn": 128}.get(method),
        "alpha": 0.75 if method == "nnn" else None, "similarity": "cosine", "dtype": "float64",
        "probe_uuid": probe_uuid, "memory": 1 << 30, "block_rows": None,
    })
    assert ranked["attrs"]["params"]["top_k"] == 5
    q_in, g_in, p_in = attrs["inputs"]
    assert q_in["dataset"] == "/queries" and g_in["dataset"] == "/gallery"
    assert p_in["kind"] == "probe" and p_in["uuid"] == probe_uuid
    assert_uuid(attrs["uuid"])
    assert attrs["uuid"] not in (probe_uuid, ranked["attrs"]["uuid"])
    assert ("score_domain" in attrs) == log_domain


@pytest.mark.parametrize("method", ["dis", "csls", "gc", "dual-dis"])
def test_block_sizes_do_not_change_outputs(e2e, cli, tmp_path, method):
    base = tmp_path / "base.h5"
    cli.ok(*normalise_args(e2e, method, base, "--top-k", 7))
    for extra in (("--block-rows", 1), ("--block-rows", 4), ("--memory", "1MiB")):
        other = tmp_path / f"b{extra[1]}.h5"
        cli.ok(*normalise_args(e2e, method, other, "--top-k", 7, *extra))
        a, b = read_h5(base), read_h5(other)
        np.testing.assert_array_equal(a["/neighbors"], b["/neighbors"])
        # products of other shapes round otherwise: both runs lie within the bound of the exact scores
        bound = method_bound(e2e, method, a["/scores"])
        tol.assert_close(a["/scores"], b["/scores"], 2 * (bound + tol.stored32(a["/scores"])))


def test_probe_block_sizes_do_not_change_statistics(e2e, cli, tmp_path):
    d = e2e["dir"]
    out = tmp_path / "probe3.h5"
    cli.ok("probe", "--bank", d / "bank.h5", "--gallery", f"{e2e['data']}::/gallery", "--gallery-bank",
           d / "gbank.h5", "--keep-sorted", "--beta", 20, "--gallery-beta", 1, "--block-rows", 3, "-o", out)
    a, b = e2e["probe"], read_h5(out)
    for name, beta in (("/log_norm", 20.0), ("/gallery_log_norm", 1.0), ("/topk_mean", 1.0)):
        tol.assert_close(a[name], b[name], 2 * (tol.scaled(COSINE, 0, (beta,)) + tol.lse64(40, beta, 2.0, beta + 4)))
    tol.assert_close(a["/sorted_bank_scores"], b["/sorted_bank_scores"],
                     2 * (COSINE + tol.stored32(a["/sorted_bank_scores"])))
    for name in ("/bank_neighbors", "/gallery_bank_neighbors", "/activation_count"):
        np.testing.assert_array_equal(a[name], b[name])
    assert b["attrs"]["params"]["block_rows"] == 3


def test_method_none_is_raw_dot_products(e2e, cli, tmp_path):
    cli.ok(*normalise_args(e2e, "none", tmp_path / "dot.h5", "--similarity", "dot"))
    out = read_h5(tmp_path / "dot.h5")
    q, g = e2e["arrays"]["queries"].astype(np.float64), e2e["arrays"]["gallery"].astype(np.float64)
    want = q @ g.T
    tol.assert_close(out["/scores"], want, tol.product32(8, np.abs(q) @ np.abs(g).T) + tol.stored32(want))
    assert not out["/normalised"].any()
    assert out["attrs"]["params"]["similarity"] == "dot"
    cli.ok(*normalise_args(e2e, "none", tmp_path / "cos.h5"))
    tol.assert_close(read_h5(tmp_path / "cos.h5")["/scores"], e2e["S"], COSINE + tol.stored32(e2e["S"]))


def test_probe_from_other_gallery_is_refused(e2e, cli, tmp_path):
    out = tmp_path / "x.h5"
    args = ["normalise", "--queries", f"{e2e['data']}::/queries", "--gallery", f"{e2e['data']}::/other_gallery",
            "--probe", e2e["dir"] / "probe.h5", "--method", "dis", "-o", out]
    code, _, err = cli(*args)
    assert code == 3
    assert "another gallery" in err and err.count("\n") == 1
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary left behind
    assert cli(*args, "--force")[0] == 3  # --force only overwrites
    cli.ok(*args, "--accept-mismatch")
    assert out.exists()
    # a gallery of another size is refused even with --accept-mismatch
    args[4] = f"{e2e['data']}::/small_gallery"
    code, _, err = cli(*args, "--accept-mismatch", "--force")
    assert code == 3 and "20 rows" in err


def test_existing_output_is_not_overwritten(e2e, cli, tmp_path):
    out = tmp_path / "out.h5"
    cli.ok(*normalise_args(e2e, "dis", out))
    before = out.read_bytes()
    first_uuid = read_h5(out)["attrs"]["uuid"]
    code, _, err = cli(*normalise_args(e2e, "is", out))
    assert code == 2 and "--force" in err
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]
    for args in (("build-bank", f"{e2e['data']}::/train_queries", "--size", 5, "-o", out),
                 ("probe", "--bank", e2e["dir"] / "bank.h5", "--gallery", f"{e2e['data']}::/gallery", "-o", out)):
        code, _, _ = cli(*args)
        assert code == 2
        assert out.read_bytes() == before
    cli.ok(*normalise_args(e2e, "is", out, "--force"))
    after = read_h5(out)["attrs"]
    assert after["method"] == "is" and after["uuid"] != first_uuid


def test_json_output_is_one_document(e2e, cli, tmp_path):
    d = e2e["dir"]
    out = cli.ok("build-bank", f"{e2e['data']}::/train_queries", "--size", 10, "-o", tmp_path / "b.h5", "--json")
    doc = json.loads(out)
    assert doc["kind"] == "bank" and doc["uuid"] == read_h5(tmp_path / "b.h5")["attrs"]["uuid"]
    assert doc["rows"] == 10 and doc["seed"] == 0

    out = cli.ok("probe", "--bank", d / "bank.h5", "--gallery", f"{e2e['data']}::/gallery", "-o",
                 tmp_path / "p.h5", "--json")
    doc = json.loads(out)
    assert doc["kind"] == "probe" and doc["uuid"] == read_h5(tmp_path / "p.h5")["attrs"]["uuid"]
    assert doc["bank_rows"] == 40 and doc["gallery_rows"] == 23 and 0 < doc["coverage"] <= 1

    out = cli.ok(*normalise_args(e2e, "dis", tmp_path / "n.h5", "--json"))
    doc = json.loads(out)
    written = read_h5(tmp_path / "n.h5")
    assert doc["kind"] == "similarity" and doc["uuid"] == written["attrs"]["uuid"]
    assert doc["normalised_rows"] == int(written["/normalised"].sum())
    assert doc["params"] == written["attrs"]["params"]


def test_quiet_prints_nothing(e2e, cli, tmp_path):
    code, out, err = cli(*normalise_args(e2e, "dis", tmp_path / "q.h5", "-q"))
    assert code == 0 and out == "" and err == ""


# --- the real sample -----------------------------------------------------------------------------

@pytest.mark.skipif(not SAMPLE.exists(), reason="sample_data/multi30k-sample.h5 is not in this checkout")
def test_dis_beats_raw_on_multi30k_sample(cli, tmp_path):
    sample = str(SAMPLE)
    cli.ok("build-bank", f"{sample}::/train_queries", "-o", tmp_path / "bank.h5", "--strategy", "all", "-q")
    cli.ok("probe", "--bank", tmp_path / "bank.h5", "--gallery", f"{sample}::/gallery", "-o", tmp_path / "probe.h5",
           "--beta", 20, "--k", 1, "-q")
    recall = {}
    with h5py.File(sample, "r") as h5:
        gt = h5["gt"][()]
    for method in ("none", "dis"):
        out = tmp_path / f"{method}.h5"
        cli.ok("normalise", "--queries", f"{sample}::/queries", "--gallery", f"{sample}::/gallery", "--probe",
               tmp_path / "probe.h5", "--method", method, "-o", out, "-q")
        scores = read_h5(out)["/scores"]
        assert scores.shape == (1000, 200) and np.isfinite(scores).all()
        recall[method] = 100 * float(np.mean(metrics.ranks(scores, gt) < 1))
    assert recall["dis"] > recall["none"], recall


def test_start_up_stays_light(tmp_path):
    """Every command pays for its start-up, in cron and in shell loops alike: parsing the options
    must not build pydantic validators (typer 0.29 does, for 0.1 s a command; pyproject keeps
    typer below it), and a command that draws nothing must not import rich (40 ms)."""
    import subprocess
    import sys

    script = ("import sys\nfrom qbnorm_cli.cli import main\n"
              f"try: code = main(['hubness', {str(tmp_path / 'missing.h5')!r}, '--k', '10'])\n"
              "except SystemExit as e: code = e.code\n"
              "print(code, 'pydantic' in sys.modules or 'rich' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    code, heavy = out.split()
    assert code != "0" and heavy == "False", out
