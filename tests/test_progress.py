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

# Left out of .ci/run's reruns under other BLAS kernels (those are for tolerances): slow, and
# testing progress display on terminals and pipes (processes under pseudo-terminals); no arithmetic
# compared
pytestmark = [pytest.mark.skipif(sys.platform != "linux", reason="pseudo-terminals as on Linux"), pytest.mark.slow]


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


def probe_args(block_rows: int | None = 100):
    """A probe of 3,000 bank rows: 20 column blocks of 30 tiles at --block-rows 100 (many progress
    updates); block_rows=None lets the budget hold the scores (a pass without products)."""
    return ("probe", "--bank", "emb.h5::/bank", "--gallery", "emb.h5::/gallery", "-o", "probe.h5",
            *(("--block-rows", str(block_rows)) if block_rows else ()))


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


def lines_env(seconds: str):
    return {**os.environ, "QBNORM_PROGRESS_SECONDS": seconds}


def run_piped(work, *args, env=None) -> tuple[int, str, str]:
    cmd = [sys.executable, "-m", "qbnorm_cli", *map(str, args), "--force"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env or dict(os.environ), cwd=work)
    return proc.returncode, proc.stdout, proc.stderr


def progress_lines(err: str, what: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"qbnorm: {what}: ")]


def test_lines_show_signs_of_life_off_a_terminal(work):
    """Before, a probe or a tune in a cron log printed nothing until it finished."""
    code, out, err = run_piped(work, *probe_args(), "--progress", "lines", env=lines_env("0"))
    assert code == 0 and out == "", err
    lines = progress_lines(err, "probe")
    assert lines[0] == "qbnorm: probe: started, 3,000 rows" and lines[-1].startswith("qbnorm: probe: done, 3,000 of")
    assert len(lines) > 3 and all("rows/s" in line for line in lines[1:]), lines
    assert "\x1b" not in err


def test_lines_come_at_most_every_interval(work):
    code, _, err = run_piped(work, *probe_args(), "--progress", "lines", env=lines_env("3600"))
    assert code == 0, err
    assert [line.split(",")[0] for line in progress_lines(err, "probe")] == ["qbnorm: probe: started",
                                                                              "qbnorm: probe: done"]


def test_quiet_silences_lines_and_bad_modes_are_usage_errors(work):
    code, out, err = run_piped(work, *probe_args(), "--progress", "lines", "--quiet", env=lines_env("0"))
    assert code == 0 and out == "" and err == ""
    code, _, err = run_piped(work, *probe_args(), "--progress", "often")
    assert code == 2 and "--progress 'often'" in err and "auto, bar, lines, none" in err
    code, _, err = run_piped(work, *probe_args(), "--progress", "lines", env=lines_env("soon"))
    assert code == 2 and "QBNORM_PROGRESS_SECONDS" in err


def test_none_is_silent(work):
    code, _, err = run_piped(work, *probe_args(), "--progress", "none")
    assert code == 0 and "probe:" not in err


def test_sinkhorn_shows_its_error_against_the_tolerance_not_a_share(work):
    """Before, the bar was scaled to the 1,000-iteration cap: 5 % and an ETA of 40 s at convergence.
    (Its progress is one line per pass, held or recomputed: held, the 19 passes take 1 s, not 10.)"""
    code, _, err = run_piped(work, *probe_args(None), "--sinkhorn", "--progress", "lines", env=lines_env("0"))
    assert code == 0, err
    lines = progress_lines(err, "sinkhorn")
    assert lines[0] == "qbnorm: sinkhorn: started"
    assert any("iteration 3: change" in line and "→ tol 1e-06" in line and "marginal error" in line
               for line in lines), lines
    assert not any("%" in line or "passes" in line for line in lines), lines
    code, _, err = run_piped(work, *probe_args(None), "--sinkhorn", "--sinkhorn-iters", 3, "--progress", "lines",
                             env=lines_env("0"))
    assert code == 0 and "qbnorm: sinkhorn: done, iteration 3 of 3" in err, err


def test_the_bar_of_a_run_with_no_known_end_has_no_percentage():
    import io

    from rich.console import Console

    from qbnorm_cli.cli.report import Reporter

    for total, shown, hidden in ((None, "→ tol 1e-06", "%"), (10, "%", "→ tol")):
        report = Reporter(progress="bar")
        report._console = Console(file=io.StringIO(), force_terminal=True, width=120)
        with report.progress("sinkhorn", total, unit="passes") as advance:
            advance(1, note="iteration 1: change 3.2e-05 → tol 1e-06" if total is None else None)
        text = report._console.file.getvalue()
        assert shown in text and hidden not in text, text


@pytest.mark.parametrize("command", ["probe", "normalise", "evaluate", "hubness", "tune", "export", "search",
                                     "convert"])
def test_every_command_that_reports_progress_takes_the_option(command):
    proc = subprocess.run([sys.executable, "-m", "qbnorm_cli", command, "-h"], capture_output=True, text=True)
    assert "--progress auto|bar|lines|none" in proc.stdout, proc.stdout
