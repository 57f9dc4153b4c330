"""Methods from other packages: the entry point group `qbnorm.methods`. The example plug-in of
examples/qbnorm-softened-is (which `make setup` installs) is a method like the built-in ones in
normalise (dense and top-k), tune, export and search, and the library; qbnorm_cli never names it. A
plug-in that fails to load or is not valid is one warning line naming its package, and the
built-in methods keep working."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import h5py
import numpy as np
import pytest
import tolerance as tol
from conftest import read_h5
from scipy.special import logsumexp

import qbnorm_cli
from qbnorm_cli import methods
from qbnorm_cli.methods.base import Method, Needs

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data" / "multi30k-sample.h5"
PLUGIN = "softened-is"

plugin = pytest.importorskip("qbnorm_softened_is", reason="make setup installs examples/qbnorm-softened-is")


@pytest.fixture(scope="module")
def sample():
    with h5py.File(SAMPLE, "r") as h5:
        return {name: h5[name][()] for name in ("queries", "gallery", "gt", "train_queries", "val_queries",
                                                "val_gallery", "val_gt")}


@pytest.fixture(scope="module")
def probe(sample):
    return qbnorm_cli.probe(sample["train_queries"], sample["gallery"], betas=[20.0], k=1)


def unit64(a):
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def softened(S, P, beta, alpha):
    """The plug-in's formula, dense in float64: β·S − α·LSE_i(β·P[i, j])."""
    return beta * S - alpha * logsumexp(beta * P, axis=0)


def test_the_installed_plugin_joins_the_registry_after_the_built_in_methods():
    assert PLUGIN in methods.METHODS and PLUGIN not in methods.BUILT_IN_NAMES
    assert list(methods.METHODS)[:len(methods.BUILT_IN_NAMES)] == list(methods.BUILT_IN_NAMES)
    assert methods.METHODS[PLUGIN] is plugin.METHOD and not methods.PLUGIN_PROBLEMS
    assert f"{PLUGIN}: " in methods.help_text()


def test_qbnorm_cli_never_names_the_plugin():
    named = [str(p) for p in (ROOT / "qbnorm_cli").rglob("*.py") if "softened" in p.read_text(encoding="utf-8")]
    assert not named, named


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_library_normalise_follows_the_formula(sample, probe, alpha):
    got = qbnorm_cli.normalise(sample["queries"], sample["gallery"], probe, method=PLUGIN, alpha=alpha)
    S = unit64(sample["queries"]) @ unit64(sample["gallery"]).T
    P = unit64(sample["train_queries"]) @ unit64(sample["gallery"]).T
    want = softened(S, P, 20.0, alpha)
    # scores of 20·cosine from float32 products, and a log-sum-exp over the bank in float64
    bound = 20.0 * tol.cosine32(S.shape[1]) * (1 + alpha) + tol.eval64(float(np.abs(want).max()))
    tol.assert_close(got, want, bound)
    if alpha == 1.0:  # α = 1 is the inverted softmax
        np.testing.assert_array_equal(got, qbnorm_cli.normalise(sample["queries"], sample["gallery"], probe,
                                                                method="is"))


def test_normalise_dense_and_top_k_from_the_command_line(cli, tmp_path, sample, probe):
    probe.save(tmp_path / "p.h5")
    args = ["normalise", "--queries", f"{SAMPLE}::/queries", "--gallery", f"{SAMPLE}::/gallery", "--probe",
            tmp_path / "p.h5", "--method", PLUGIN, "--alpha", 0.5, "-q"]
    cli.ok(*args, "-o", tmp_path / "dense.h5", "--dtype", "float64")
    cli.ok(*args, "-o", tmp_path / "top.h5", "--top-k", 10)
    dense = qbnorm_cli.normalise(sample["queries"], sample["gallery"], probe, method=PLUGIN, alpha=0.5)
    np.testing.assert_array_equal(read_h5(tmp_path / "dense.h5")["/scores"], dense)
    top = read_h5(tmp_path / "top.h5")
    assert top["attrs"]["method"] == PLUGIN
    np.testing.assert_array_equal(top["/neighbors"], np.argsort(-dense, axis=1, kind="stable")[:, :10])


def test_tune_tries_the_plugin_when_named(cli, tmp_path):
    doc = json.loads(cli.ok("tune", "--queries", f"{SAMPLE}::/val_queries", "--gallery", f"{SAMPLE}::/val_gallery",
                            "--gt", f"{SAMPLE}::/val_gt", "--bank", f"{SAMPLE}::/train_queries", "--methods",
                            f"{PLUGIN},is", "--beta", 20, "-o", tmp_path / "p.json", "--json"))
    tried = {(r["method"], r.get("alpha")) for r in doc["settings"]}
    assert {(PLUGIN, a) for a in (0.25, 0.5, 0.75)} <= tried and ("is", None) in tried


def test_export_and_search_reproduce_normalise(cli, tmp_path, sample, probe):
    export = qbnorm_cli.export(probe, sample["gallery"], method=PLUGIN, alpha=0.25)
    found = qbnorm_cli.search(export, sample["queries"], top_k=10)
    want = qbnorm_cli.normalise(sample["queries"], sample["gallery"], probe, method=PLUGIN, alpha=0.25, top_k=10)
    agree = (found.indices == want.indices).all(axis=1)
    assert agree.mean() > 0.99  # rows apart only where two scores tie within the index's float32 rounding


# --- plug-ins that are not valid ------------------------------------------------------------------

def fake(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=methods.PLUGIN_GROUP)


BAD = {
    "missing": (fake("missing", "no_such_module_anywhere:METHOD"), "did not load: ModuleNotFoundError"),
    "taken": (Method("dis", "h", "s", ("beta",), lambda p, v: None), "method name 'dis' is taken"),
    "unknown": (Method("odd", "h", "s", ("delta",), lambda p, v: None), "unknown parameter 'delta'"),
    "default": (Method("neg", "h", "s", ("k",), lambda p, v: None, defaults={"k": 0}), "default k 0"),
    "object": ("not a method", "str is not a qbnorm_cli.methods.base.Method"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_plugin_is_one_line_naming_it_and_the_built_ins_stay(monkeypatch, case):
    entry, expected = BAD[case]
    if not isinstance(entry, EntryPoint):
        holder = type(sys)("qbnorm_test_bad_plugin")
        holder.METHOD = entry
        monkeypatch.setitem(sys.modules, "qbnorm_test_bad_plugin", holder)
        entry = fake(case, "qbnorm_test_bad_plugin")
    good = fake("good", "qbnorm_test_good_plugin:METHOD")
    holder = type(sys)("qbnorm_test_good_plugin")
    holder.METHOD = Method("good-one", "h", "s", ("beta",), lambda p, v: None, Needs(log_norm=True))
    monkeypatch.setitem(sys.modules, "qbnorm_test_good_plugin", holder)
    monkeypatch.setattr(methods, "entry_points", lambda group: [entry, good] if group == methods.PLUGIN_GROUP else [])
    registry = {name: methods.METHODS[name] for name in methods.BUILT_IN_NAMES}
    problems = methods.plugins(registry)
    assert len(problems) == 1 and expected in problems[0] and f"plug-in {case!r}" in problems[0], problems
    assert "\n" not in problems[0]
    assert set(registry) == {*methods.BUILT_IN_NAMES, "good-one"}


def test_a_broken_installed_plugin_warns_once_in_the_library_and_each_command(tmp_path):
    """A real installed distribution (a dist-info on the path) whose module does not import."""
    info = tmp_path / "site" / "broken_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[qbnorm.methods]\nbroken = broken_plugin_module:METHOD\n")
    (tmp_path / "site" / "broken_plugin_module.py").write_text("raise RuntimeError('the plug-in is broken')\n")
    env = {**__import__("os").environ, "PYTHONPATH": f"{tmp_path / 'site'}:{ROOT}"}
    library = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import qbnorm_cli
        print(len(caught), caught[0].category.__name__, caught[0].message)
        print("dis" in qbnorm_cli.METHODS)
    """)], capture_output=True, text=True, env=env, timeout=120)
    assert library.returncode == 0, library.stderr
    first, second = library.stdout.splitlines()
    assert first.startswith("1 QbnormWarning plug-in 'broken' (broken-plugin 1.0) did not load: RuntimeError")
    assert second == "True"
    np.save(tmp_path / "x.npy", np.eye(4, dtype=np.float32))
    program = [sys.executable, "-m", "qbnorm_cli", "convert", str(tmp_path / "x.npy"), "-o", str(tmp_path / "x.h5")]
    run = subprocess.run(program, capture_output=True, text=True, env=env, timeout=120)
    line = "plug-in 'broken' (broken-plugin 1.0) did not load: RuntimeError: the plug-in is broken"
    assert run.returncode == 0 and run.stderr.count("warning") == 1 and f"qbnorm: warning: {line}\n" in run.stderr
    quiet = subprocess.run([*program[:-1], str(tmp_path / "y.h5"), "--quiet", "--json"], capture_output=True,
                           text=True, env=env, timeout=120)
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert json.loads(quiet.stdout)["warnings"] == [line]



def test_a_plugin_that_declares_a_parameter_of_its_own_is_left_out():
    """Its option and keyword would meet the commands' own: a plug-in takes the registry's parameters."""
    from qbnorm_cli.methods.base import Parameter
    own = Method("own-parameter", "h", "s", ("beta", "tau"), plugin.METHOD.build, Needs(log_norm=True),
                 declares=(Parameter("tau", float, "a temperature", default=1.0),))
    assert "declares parameter 'tau'" in methods.problem_with(own, methods.METHODS)
    assert "tau" not in methods.PARAMETERS


def test_each_built_in_parameter_is_declared_by_one_module():
    from qbnorm_cli.methods import base
    declared = [p.name for m in methods.METHODS.values() for p in m.declares]
    assert len(declared) == len(set(declared))
    assert set(methods.PARAMETERS) == set(declared) | set(base.SHARED)
