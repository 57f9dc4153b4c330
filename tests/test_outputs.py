"""Outputs are all or nothing: refused targets, write failures and interrupts (Ctrl-C, SIGTERM)
leave no partial file, no temporary file, and the previous output untouched."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import interruptible, leftovers, run

from qbnorm_cli.cli import main
from qbnorm_cli.io import atomic

# Left out of .ci/run's reruns under other BLAS kernels (those are for tolerances): slow, and
# testing atomic outputs under signals (real jobs killed mid-run); no arithmetic compared
pytestmark = pytest.mark.slow

D = 8


def one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def work(tmp_path, capsys):
    """emb.h5 with /bank, /gallery, /queries; bank.h5 and probe.h5 made from it; prev.h5 an old output."""
    rng = np.random.default_rng(0)
    emb = tmp_path / "emb.h5"
    with h5py.File(emb, "w") as h5:
        h5["bank"] = rng.standard_normal((20, D)).astype(np.float32)
        h5["gallery"] = rng.standard_normal((15, D)).astype(np.float32)
        h5["queries"] = rng.standard_normal((40, D)).astype(np.float32)
    assert main(["build-bank", f"{emb}::/bank", "-o", tmp_path / "bank.h5", "--strategy", "all", "-q"]) == 0
    assert main(["probe", "--bank", tmp_path / "bank.h5", "--gallery", f"{emb}::/gallery",
                 "-o", tmp_path / "probe.h5", "-q"]) == 0
    capsys.readouterr()
    return tmp_path


def norm_args(work, out, *extra):
    return ["normalise", "--queries", f"{work}/emb.h5::/queries", "--gallery", f"{work}/emb.h5::/gallery",
            "--probe", work / "probe.h5", "-o", out, "-q", *extra]


def previous_output(path: Path) -> bytes:
    path.write_bytes(b"previous output, must survive")
    return path.read_bytes()


def test_success_leaves_only_the_output(capsys, work):
    out = work / "dis.h5"
    code, _, err = run(capsys, *norm_args(work, out, "--block-rows", 7))
    assert code == 0, err
    assert leftovers(work) == []
    with h5py.File(out) as h5:
        assert h5.attrs["qbnorm_kind"] == "similarity"
        assert h5["scores"].shape == (40, 15)


def test_output_mode_follows_umask(capsys, work):
    old = os.umask(0o022)
    try:
        out = work / "dis.h5"
        assert run(capsys, *norm_args(work, out))[0] == 0
        assert out.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    finally:
        os.umask(old)


def test_existing_output_needs_force(capsys, work):
    out = work / "dis.h5"
    before = previous_output(out)
    mtime = out.stat().st_mtime_ns
    code, _, err = run(capsys, *norm_args(work, out))
    assert code == 2
    assert str(out) in one_line(err) and "--force" in err
    assert out.read_bytes() == before and out.stat().st_mtime_ns == mtime
    assert leftovers(work) == []
    assert run(capsys, *norm_args(work, out, "--force"))[0] == 0
    assert out.read_bytes() != before


@pytest.mark.parametrize("target, problem", [
    ("nodir/out.h5", "no such directory"),
    ("out.npy", "outputs are HDF5 files"),
    ("probe.h5", "would overwrite an input"),
    ("emb.h5", "would overwrite an input"),
    (".", "is a directory"),
])
def test_refused_targets(capsys, work, target, problem):
    out = work / target
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    code, _, err = run(capsys, *norm_args(work, out, "--force"))
    assert code == 2, err
    assert problem in one_line(err)
    assert {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()} == before
    assert leftovers(work) == []


def test_output_linked_to_an_input_is_refused(capsys, work):
    (work / "sym.h5").symlink_to(work / "probe.h5")
    os.link(work / "emb.h5", work / "hard.h5")
    for name in ("sym.h5", "hard.h5"):
        code, _, err = run(capsys, *norm_args(work, work / name, "--force"))
        assert code == 2 and "would overwrite an input" in one_line(err)
    with h5py.File(work / "probe.h5") as h5:
        assert h5.attrs["qbnorm_kind"] == "probe"


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["rows", "create", "replace"])
def test_disk_full(capsys, work, monkeypatch, where):
    out = work / "dis.h5"
    before = previous_output(out)
    if where == "rows":
        monkeypatch.setattr(h5py.Dataset, "__setitem__", _enospc)
    elif where == "create":
        monkeypatch.setattr(h5py.Group, "create_dataset", _enospc)
    else:
        monkeypatch.setattr(atomic.os, "replace", _enospc)
    code, _, err = run(capsys, *norm_args(work, out, "--force", "--block-rows", 5))
    monkeypatch.undo()
    assert code == 1, err
    line = one_line(err)
    assert str(out) in line and "no space left on device" in line.lower()
    assert out.read_bytes() == before
    assert leftovers(work) == []


def test_disk_full_without_previous_output(capsys, work, monkeypatch):
    out = work / "bank2.h5"
    monkeypatch.setattr(h5py.Dataset, "__setitem__", _enospc)
    code, _, err = run(capsys, "build-bank", f"{work}/emb.h5::/bank", "-o", out, "--size", 10)
    monkeypatch.undo()
    assert code == 1 and "no space left on device" in one_line(err).lower()
    assert not out.exists() and leftovers(work) == []


def test_cannot_create_the_temporary_file(capsys, work, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    out = work / "dis.h5"
    code, _, err = run(capsys, *norm_args(work, out))
    monkeypatch.undo()
    assert code == 1 and "Permission denied" in one_line(err) and str(out) in err
    assert not out.exists() and leftovers(work) == []


@pytest.mark.parametrize("exc, code, text", [
    (KeyboardInterrupt, 130, "qbnorm: interrupted"),
    (RuntimeError("boom\nsecond line"), 1, "internal error: RuntimeError: boom second line"),
    (MemoryError, 1, "out of memory"),
])
def test_failure_in_the_middle_of_a_write(capsys, work, monkeypatch, exc, code, text):
    out = work / "dis.h5"
    before = previous_output(out)
    real = atomic.OutputFile.write_rows
    calls = []

    def failing(self, ds, start, block):
        calls.append(start)
        if len(calls) == 3:
            raise exc
        return real(self, ds, start, block)

    monkeypatch.setattr(atomic.OutputFile, "write_rows", failing)
    got, _, err = run(capsys, *norm_args(work, out, "--force", "--block-rows", 4))
    assert got == code
    assert text in one_line(err)
    assert out.read_bytes() == before and leftovers(work) == []


# ----------------------------------------------------------------------------------------------
# Signals, through a real process

SLOW_WRITER = textwrap.dedent("""
    import sys, time
    from qbnorm_cli.io import atomic
    from qbnorm_cli.cli import main

    real = atomic.OutputFile.write_rows

    def slow(self, ds, start, block):
        if start == 3:  # in the middle of the output: say so, and wait for the test's signal
            print("writing", flush=True)
            for _ in range(6000):
                time.sleep(0.01)
        return real(self, ds, start, block)

    atomic.OutputFile.write_rows = slow
    sys.exit(main(sys.argv[1:]))
""")


def _interrupt(work, argv, signum, out, *, says_when: bool = False):
    """Signal the run in `argv` while it writes `out`: once it printed "writing" (`says_when`: it
    then waits for the signal, however loaded the machine), else once its temporary file exists."""
    before = previous_output(out)
    with interruptible():
        proc = subprocess.Popen(argv, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if says_when:
            assert proc.stdout.readline().strip() == "writing", proc.communicate()
        else:
            deadline = time.monotonic() + 30
            while not leftovers(work):
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the run never started writing"
                time.sleep(0.005)
            time.sleep(0.05)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert one_line(stderr).startswith("qbnorm: interrupted")
    assert "Exception ignored" not in stderr
    assert leftovers(work) == []
    assert out.read_bytes() == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_a_long_write(work, signum):
    out = work / "dis.h5"
    argv = [sys.executable, "-c", SLOW_WRITER, *map(str, norm_args(work, out, "--force", "--block-rows", 1))]
    _interrupt(work, argv, signum, out, says_when=True)


@pytest.mark.parametrize("ranking", [False, True])
def test_sigterm_during_a_real_job(work, ranking):
    """The installed `qbnorm` on a job big enough to take a while (no test hooks); a ranking
    (--top-k) is interrupted while its row tiles run on the worker threads."""
    rng = np.random.default_rng(1)
    with h5py.File(work / "big.h5", "w") as h5:
        h5["queries"] = rng.standard_normal((6000, D)).astype(np.float32)
    out = work / "big-out.h5"
    qbnorm = Path(sys.executable).with_name("qbnorm")
    argv = [str(qbnorm), "normalise", "--queries", f"{work}/big.h5::/queries", "--gallery",
            f"{work}/emb.h5::/gallery", "--probe", str(work / "probe.h5"), "-o", str(out), "--force",
            "--block-rows", "1", "-q", *(["--top-k", "3"] if ranking else [])]
    _interrupt(work, argv, signal.SIGTERM, out)


BACKGROUND_PARENT = textwrap.dedent("""
    import json, signal, subprocess, sys
    from helpers import interruptible

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a shell gives a background job
    child = [sys.executable, "-c", "import signal, sys; "
             "print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN, flush=True); sys.stdin.read()"]
    found = {}
    for name in ("plain", "interruptible"):
        if name == "plain":
            proc = subprocess.Popen(child, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        else:
            with interruptible():
                proc = subprocess.Popen(child, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ignores = proc.stdout.readline().strip()
        proc.send_signal(signal.SIGINT)
        proc.stdin.close()  # the child's read ends here if the signal did not end it
        found[name] = [ignores, proc.wait(timeout=60)]
    with interruptible():
        try:
            signal.raise_signal(signal.SIGINT)
            found["here"] = "not raised"
        except KeyboardInterrupt:
            found["here"] = "KeyboardInterrupt"
    found["after"] = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    print(json.dumps(found))
""")


def test_a_child_is_interrupted_when_the_test_run_ignores_sigint():
    """pytest started as a background job inherits SIGINT ignored, and so would the qbnorm runs it
    signals (exec keeps an ignored signal, and qbnorm leaves it so): helpers.interruptible starts
    them with Ctrl-C at its default, makes it raise KeyboardInterrupt in the test's own process,
    and gives the ignored disposition back afterwards."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(Path(__file__).parent),
                                                                   os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", BACKGROUND_PARENT], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"plain": ["True", 0], "interruptible": ["False", -signal.SIGINT],
                                       "here": "KeyboardInterrupt", "after": True}
