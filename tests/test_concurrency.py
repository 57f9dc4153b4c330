"""Concurrent runs: several qbnorm processes on the same inputs, and inputs held open elsewhere."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import leftovers

from qbnorm_cli.cli import main

D = 8


@pytest.fixture
def work(tmp_path):
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "emb.h5", "w") as h5:
        h5["bank"] = rng.standard_normal((300, D)).astype(np.float32)
        h5["gallery"] = rng.standard_normal((200, D)).astype(np.float32)
        h5["queries"] = rng.standard_normal((400, D)).astype(np.float32)
    assert main(["probe", "--bank", f"{tmp_path}/emb.h5::/bank", "--gallery", f"{tmp_path}/emb.h5::/gallery",
                 "-o", tmp_path / "probe.h5", "-q"]) == 0
    return tmp_path


def qbnorm(*args) -> list[str]:
    return [str(Path(sys.executable).with_name("qbnorm")), *map(str, args)]


def norm(work, out, *extra):
    return qbnorm("normalise", "--queries", f"{work}/emb.h5::/queries", "--gallery", f"{work}/emb.h5::/gallery",
                  "--probe", work / "probe.h5", "-o", out, "-q", "--block-rows", 16, *extra)


def scores(path):
    with h5py.File(path, "r") as h5:
        return h5["scores"][()], h5["normalised"][()]


def test_two_runs_on_the_same_inputs(work):
    procs = [subprocess.Popen(norm(work, work / f"out{i}.h5"), stderr=subprocess.PIPE, text=True) for i in range(2)]
    procs.append(subprocess.Popen(qbnorm("build-bank", f"{work}/emb.h5::/bank", "-o", work / "bank.h5", "--size", 50),
                                  stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    a, b = scores(work / "out0.h5"), scores(work / "out1.h5")
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert leftovers(work) == []


def test_two_runs_racing_for_one_output(work):
    """Both succeed (--force); the file left is one of the two complete outputs, never a mix."""
    out = work / "out.h5"
    procs = [subprocess.Popen(norm(work, out, "--force", "--method", method), stderr=subprocess.PIPE, text=True)
             for method in ("dis", "none")]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    with h5py.File(out, "r") as h5:
        assert h5.attrs["method"] in ("dis", "none")
        assert h5["scores"].shape == (400, 200)
    assert leftovers(work) == []


def test_two_runs_racing_for_one_output_without_force(work):
    """Without --force one succeeds and the other exits 2, whether it finds the first's output at
    its start or at its commit; the file left is the winner's, complete."""
    out = work / "out.h5"
    procs = [subprocess.Popen(norm(work, out, "--method", method), stderr=subprocess.PIPE, text=True)
             for method in ("dis", "none")]
    results = [(proc.wait(timeout=60), proc.stderr.read()) for proc in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "exists" in loser or "created by another process" in loser
    winner = ("dis", "none")[[code for code, _ in results].index(0)]
    with h5py.File(out, "r") as h5:
        assert h5.attrs["method"] == winner and h5["scores"].shape == (400, 200)
    assert leftovers(work) == []


HOLDER = textwrap.dedent("""
    import sys, time, h5py
    h5 = h5py.File(sys.argv[1], sys.argv[2])  # default file locking, as other tools open files
    h5["gallery"][0]
    print("ready", flush=True)
    sys.stdin.read()  # hold the file open until the test closes our stdin
""")


@pytest.mark.parametrize("mode", ["r", "r+"])
def test_input_held_open_by_another_process(work, capsys, mode):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(work / "emb.h5"), mode],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready", holder.stderr.read()
        code = main(["normalise", "--queries", f"{work}/emb.h5::/queries", "--gallery", f"{work}/emb.h5::/gallery",
                     "--probe", work / "probe.h5", "-o", work / "out.h5", "-q"])
        err = capsys.readouterr().err
        assert code == 0, err
        code = main(["build-bank", f"{work}/emb.h5::/bank", "-o", work / "bank.h5", "--size", 10, "-q"])
        assert code == 0, capsys.readouterr().err
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert holder.returncode == 0
