"""The library from Python: arrays, memory maps, h5py datasets and PATH::/dataset specs in; the same
streaming kernels as the CLI underneath, with bit-identical results; keyword-only options, errors
that name parameters, warnings as QbnormWarning, nothing printed; docs/api.md's examples run."""

from __future__ import annotations

import doctest
import inspect
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import reference as ref
import tolerance as tol
from conftest import read_h5

import qbnorm_cli
from qbnorm_cli import QbnormWarning, Ranking, UsageError

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data" / "multi30k-sample.h5"
SPEC = f"{SAMPLE}::"


@pytest.fixture(scope="module")
def sample():
    with h5py.File(SAMPLE, "r") as h5:
        return {name: h5[name][()] for name in ("queries", "gallery", "gt", "train_queries", "train_gallery")}


@pytest.fixture(scope="module")
def probe(sample):
    return qbnorm_cli.probe(sample["train_queries"], sample["gallery"], betas=[20.0], k=1,
                            gallery_bank=sample["train_gallery"])


def test_probe_from_arrays_equals_the_cli_probe(cli, tmp_path, sample, probe):
    cli.ok("probe", "--bank", f"{SPEC}/train_queries", "--gallery", f"{SPEC}/gallery", "--gallery-bank",
           f"{SPEC}/train_gallery", "--beta", 20, "-o", tmp_path / "p.h5", "-q")
    written = read_h5(tmp_path / "p.h5")
    for name in ("/log_norm", "/bank_neighbors", "/topk_mean", "/gallery_log_norm", "/activation_count"):
        np.testing.assert_array_equal(probe.datasets[name][()], written[name], err_msg=name)
    assert probe.n_gallery == 200 and probe.n_bank == 2000 and probe.betas() == [20.0]
    assert probe.attrs["gallery_identity"] == written["attrs"]["gallery_identity"]  # the same gallery, as arrays


@pytest.mark.parametrize("method", ["none", "is", "dis", "csls", "nnn", "dual-is", "dual-dis"])
def test_normalise_equals_the_cli_bit_for_bit(cli, tmp_path, sample, probe, method):
    probe.save(tmp_path / "p.h5")
    args = ["normalise", "--queries", f"{SPEC}/queries", "--gallery", f"{SPEC}/gallery", "--probe", tmp_path / "p.h5",
            "--method", method, "-q"]
    cli.ok(*args, "-o", tmp_path / "dense.h5", "--dtype", "float64")
    cli.ok(*args, "-o", tmp_path / "top.h5", "--top-k", 10)
    dense = qbnorm_cli.normalise(sample["queries"], sample["gallery"], probe, method=method)
    top = qbnorm_cli.normalise(sample["queries"], sample["gallery"], probe, method=method, top_k=10)
    np.testing.assert_array_equal(dense, read_h5(tmp_path / "dense.h5")["/scores"])
    written = read_h5(tmp_path / "top.h5")
    assert isinstance(top, Ranking) and top.gallery_rows == 200 and len(top) == 1000
    np.testing.assert_array_equal(top.indices, written["/neighbors"])
    np.testing.assert_array_equal(top.scores.astype(np.float32), written["/scores"])
    np.testing.assert_array_equal(top.normalised, written["/normalised"])


def test_inputs_as_specs_memory_maps_and_datasets_give_the_same_result(tmp_path, sample, probe):
    np.save(tmp_path / "q.npy", sample["queries"])
    want = qbnorm_cli.normalise(sample["queries"], sample["gallery"], probe, top_k=5)
    with h5py.File(SAMPLE, "r") as h5:
        for queries, gallery in ((f"{SPEC}/queries", f"{SPEC}/gallery"),
                                 (np.load(tmp_path / "q.npy", mmap_mode="r"), h5["gallery"]),
                                 (tmp_path / "q.npy", sample["gallery"].tolist())):
            got = qbnorm_cli.normalise(queries, gallery, probe, top_k=5)
            np.testing.assert_array_equal(got.indices, want.indices)
            np.testing.assert_array_equal(got.scores, want.scores)


def test_probe_save_load_round_trip(tmp_path, probe):
    uuid = probe.save(tmp_path / "p.h5")
    with qbnorm_cli.Probe.load(tmp_path / "p.h5") as loaded:
        assert loaded.uuid == uuid and loaded.n_gallery == probe.n_gallery
        np.testing.assert_array_equal(loaded.log_norm(20.0), probe.log_norm(20.0))
        np.testing.assert_array_equal(loaded.activation(1), probe.activation(1))
        assert loaded.params["betas"] == [20.0] and loaded.inputs[1]["identity"] == probe.inputs[1]["identity"]
    with pytest.raises(UsageError, match="exists; pass force=True"):
        probe.save(tmp_path / "p.h5")
    probe.save(tmp_path / "p.h5", force=True)


def sure_gates(S, P, bound: float) -> np.ndarray:
    """The rows whose DIS gate (k = 1) no rounding within `bound` can change. A top-1 closer than
    twice the bound to the second is a tie some BLAS kernel may break the other way: a bank row
    with such a tie makes both items' activation unsure (unless a sure row activates them), and a
    query with one, or whose top-1 is unsure, has an unsure gate. Those rows are left out."""
    def top2(M):
        order = np.argsort(-M, axis=1, kind="stable")[:, :2]
        values = np.take_along_axis(M, order, axis=1)
        return order, values[:, 0] - values[:, 1] <= 2 * bound
    bank, bank_tied = top2(P)
    sure_items = set(bank[~bank_tied, 0].tolist())
    unsure_items = set(bank[bank_tied].ravel().tolist()) - sure_items
    query, query_tied = top2(S)
    unsure = query_tied | np.isin(query[:, 0], list(unsure_items))
    assert unsure.mean() < 0.05, f"{unsure.mean():.1%} of the gates are ties: choose other data"
    return ~unsure


def test_normalise_against_the_reference(sample, probe):
    """The library's DIS and CSLS equal the dense float64 oracle within the float32 bound."""
    unit = lambda x: x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    q, g, b = unit(sample["queries"]), unit(sample["gallery"]), unit(sample["train_queries"])
    S, P = q @ g.T, b @ g.T
    cosine = tol.cosine32(384) + tol.product64(384)
    for method, params in (("dis", {"beta": 20.0, "k": 1}), ("csls", {"topk_mean": 10})):
        want, want_gated = ref.normalise(method, S, P, **params)
        got = qbnorm_cli.normalise(sample["queries"], sample["gallery"], probe, method=method)
        bound = tol.method_error(method, cosine, float(np.abs(want).max()) + 20, 2000, 2.0, beta=20.0)
        tol.assert_close(got, want, bound)
        gated = qbnorm_cli.normalise(sample["queries"], sample["gallery"], probe, method=method, top_k=1).normalised
        np.testing.assert_array_equal(gated[sure_gates(S, P, cosine)], want_gated[sure_gates(S, P, cosine)])


def test_evaluate_and_hubness_take_arrays_rankings_and_files(cli, tmp_path, sample, probe):
    top = qbnorm_cli.normalise(sample["queries"], sample["gallery"], probe, top_k=10)
    dense = qbnorm_cli.normalise(sample["queries"], sample["gallery"], probe)
    qbnorm_cli.normalise(sample["queries"], sample["gallery"], probe, top_k=10, output=tmp_path / "top.h5")
    from_ranking = qbnorm_cli.evaluate(top, sample["gt"])
    from_file = qbnorm_cli.evaluate(str(tmp_path / "top.h5"), f"{SPEC}/gt")
    from_dense = qbnorm_cli.evaluate(dense, sample["gt"])
    assert from_ranking["metrics"] == from_file["metrics"]
    assert from_ranking["metrics"]["R@1"] == from_dense["metrics"]["R@1"] and from_dense["exact"]["MnR"]
    assert from_ranking["metrics"]["MnR"] is None and from_ranking["bounds"]["MnR"][0] > 1
    doc = json.loads(cli.ok("evaluate", tmp_path / "top.h5", "--gt", f"{SPEC}/gt", "--json"))
    assert doc["inputs"][0]["metrics"] == from_file["metrics"]
    both = qbnorm_cli.evaluate([dense, top], sample["gt"])
    assert [r["metrics"]["R@1"] for r in both] == [from_dense["metrics"]["R@1"]] * 2

    measured = qbnorm_cli.hubness(top, k=[1, 10])
    doc = json.loads(cli.ok("hubness", tmp_path / "top.h5", "--k", 1, "--k", 10, "--json"))
    assert measured["by_k"] == doc["inputs"][0]["by_k"]
    assert set(measured["k_occurrence"]) == {1, 10} and measured["k_occurrence"][10].sum() == 10 * 1000
    bank_side = qbnorm_cli.hubness(probe, k=1)
    assert bank_side["kind"] == "probe" and bank_side["queries"] == 2000


def test_errors_name_parameters_not_flags(sample, probe):
    with pytest.raises(UsageError) as caught:
        qbnorm_cli.normalise(sample["queries"], sample["gallery"], probe, beta=7.0)
    message = str(caught.value)
    assert message.startswith("beta 7: ") and "probe again with betas 7" in message and "--" not in message
    with pytest.raises(UsageError, match=r"^method 'magic': choose one of none, is, dis"):
        qbnorm_cli.normalise(sample["queries"], sample["gallery"], probe, method="magic")
    with pytest.raises(UsageError, match=r"^top_k 999: larger than the gallery size \(200\)"):
        qbnorm_cli.normalise(sample["queries"], sample["gallery"], probe, top_k=999)
    with pytest.raises(UsageError, match=r"^memory '1k': at least 1MiB"):
        qbnorm_cli.probe(sample["train_queries"], sample["gallery"], memory="1k")
    with pytest.raises(qbnorm_cli.DataError, match=r"^queries: row 0 has zero norm.*use similarity='dot'"):
        qbnorm_cli.normalise(np.zeros((2, 384), dtype=np.float32), sample["gallery"], probe)


def test_warnings_are_warnings_and_nothing_is_printed(capsys, sample):
    bank = np.repeat(sample["gallery"][:1], 50, axis=0)  # every bank query retrieves item 0: low coverage
    with pytest.warns(QbnormWarning, match="low bank coverage.*use method='dis'"):
        result = qbnorm_cli.probe(bank, sample["gallery"])
    assert any("low bank coverage" in w for w in result.warnings)
    qbnorm_cli.normalise(sample["queries"], sample["gallery"], result, top_k=3)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(("function", "positional"), [
    (qbnorm_cli.probe, ["bank", "gallery"]), (qbnorm_cli.normalise, ["queries", "gallery", "probe"]),
    (qbnorm_cli.evaluate, ["scores", "gt"]), (qbnorm_cli.hubness, ["scores"]),
    (qbnorm_cli.tune, ["queries", "gallery", "gt", "bank"]), (qbnorm_cli.build_bank, ["source"]),
    (qbnorm_cli.convert, ["source", "output"]),
])
def test_options_are_keyword_only(function, positional):
    params = inspect.signature(function).parameters.values()
    assert [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD] == positional
    assert all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params)


@pytest.mark.parametrize("name", ["probe", "update_probe", "normalise", "export", "search", "evaluate", "hubness",
                                  "hubs", "tune", "build_bank", "convert"])
def test_every_entry_point_reads_under_the_limits(name):
    """Each entry point that reads files runs under io.limits (api.common.bounded): it takes
    allow_external and max_output, and its own `memory` bounds what a chunk may expand to."""
    parameters = inspect.signature(getattr(qbnorm_cli, name)).parameters
    assert {"allow_external", "max_output"} <= set(parameters)


def test_public_names():
    for name in qbnorm_cli.__all__:
        assert hasattr(qbnorm_cli, name), name
    assert qbnorm_cli.__version__ and set(qbnorm_cli.METHODS) >= {"none", "is", "dis", "csls", "nnn", "gc"}


def test_build_bank_and_tune_from_python(tmp_path, sample):
    bank, index = qbnorm_cli.build_bank(sample["train_queries"], size=100, seed=3)
    assert bank.shape == (100, 384) and (np.diff(index) > 0).all()
    np.testing.assert_array_equal(bank, sample["train_queries"][index])
    with h5py.File(SAMPLE, "r") as h5:
        result = qbnorm_cli.tune(h5["val_queries"], h5["val_gallery"], h5["val_gt"], sample["train_queries"],
                                 methods=["dis"], betas=[10.0, 20.0], output=tmp_path / "params.json")
    best = result["best"]["setting"]
    assert best.method.name == "dis" and best.values["beta"] in (10.0, 20.0)
    assert qbnorm_cli.load_params(tmp_path / "params.json")["beta"] == best.values["beta"]


@pytest.mark.parametrize("document", ["api.md", "methods.md"])
def test_the_documents_run(document):
    """Every Python example in docs/api.md and docs/methods.md, run as a doctest from the repository's root."""
    import os

    here = os.getcwd()
    os.chdir(ROOT)
    try:
        failures, tried = doctest.testfile(str(ROOT / "docs" / document), module_relative=False,
                                           optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    finally:
        os.chdir(here)
    assert tried >= 10 and failures == 0
