"""Progress bars: on a terminal, probe and normalise show bank or query rows per second on stderr;
on a pipe or log, and with --quiet, nothing (cron mail stays clean)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import h5py
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="pseudo-terminals as on Linux")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("progress")
    rng = np.random.default_rng(5)
    with h5py.File(work / "emb.h5", "w") as h5:
        for name, rows in (("bank", 3000), ("gallery", 2000), ("queries", 3000)):
            h5[name] = rng.standard_normal((rows, 16)).astype(np.float32)
    return work


def qbnorm(work, *args, stderr_tty: bool, quiet: bool = False) -> tuple[int, str, str]:
    """Run qbnorm with stdout on a pipe and stderr on a pseudo-terminal (or a pipe)."""
    cmd = [sys.executable, "-m", "qbnorm_cli", *map(str, args), "--force", *(["--quiet"] if quiet else [])]
    env = dict(os.environ, TERM="xterm", COLUMNS="120")
    env.pop("NO_COLOR", None)
    if not stderr_tty:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
        return proc.returncode, proc.stdout, proc.stderr
    try:
        master, slave = pty.openpty()
    except OSError as exc:  # a sandbox without /dev/pts
        pytest.skip(f"no pseudo-terminal: {exc}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, env=env, cwd=work)
    os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        err += chunk
    out = proc.stdout.read().decode()
    proc.wait()
    os.close(master)
    return proc.returncode, out, err.decode(errors="replace")


def probe_args():
    return ("probe", "--bank", "emb.h5::/bank", "--gallery", "emb.h5::/gallery", "-o", "probe.h5",
            "--block-rows", "100")


def normalise_args():
    return ("normalise", "--queries", "emb.h5::/queries", "--gallery", "emb.h5::/gallery", "--probe", "probe.h5",
            "-o", "out.h5", "--top-k", "5", "--block-rows", "100")


def test_terminal_shows_rows_per_second(work):
    for args, label in ((probe_args(), "probe"), (normalise_args(), "normalise")):
        code, out, err = qbnorm(work, *args, stderr_tty=True)
        assert code == 0, err
        assert label in err and "rows/s" in err, err
        assert out == ""  # data go to files; stdout carries only --json documents


def test_pipe_and_quiet_show_no_progress(work):
    code, _, err = qbnorm(work, *probe_args(), stderr_tty=False)
    assert code == 0, err
    code, _, err = qbnorm(work, *normalise_args(), stderr_tty=False)
    assert code == 0, err
    assert "rows/s" not in err and "\x1b" not in err
    code, out, err = qbnorm(work, *normalise_args(), stderr_tty=True, quiet=True)
    assert code == 0 and out == "" and err == ""
