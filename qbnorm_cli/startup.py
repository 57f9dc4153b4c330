"""Ctrl-C or SIGTERM while the `qbnorm` program is still loading its libraries.

Importing numpy, scipy, h5py and typer takes about a second. An interrupt in that time would end
in a traceback from the middle of an import (SIGINT) or a bare kill (SIGTERM); nothing has been
opened or written yet, so this says so in one line and exits 130 at once. `cli.main()` hands the
signals back (`done()`) and installs its own handlers. Nothing happens when qbnorm_cli is imported
as a library: only the `qbnorm` program (or `python -m qbnorm_cli`) is guarded. The package imports
this module before anything else; a signal before that, while Python itself starts, gets Python's
and the system's defaults (docs/errors.md).
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import warnings

PREVIOUS: dict = {}


def interrupted(signum, frame) -> None:
    os.write(2, b"qbnorm: interrupted\n")
    os._exit(130)


def _names_program() -> bool:
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    # `python -m qbnorm_cli` imports the package while sys.argv[0] is still "-m": the command line says it
    original = list(getattr(sys, "orig_argv", ()))
    by_module = any(a == "-m" and b == "qbnorm_cli" for a, b in itertools.pairwise(original))
    return os.path.basename(argv0) == "qbnorm" or argv0.endswith(os.path.join("qbnorm_cli", "__main__.py")) or \
        by_module


def is_spawned() -> bool:
    """Whether this process was spawned by multiprocessing (which hands it its parent's sys.argv)."""
    return "--multiprocessing-fork" in getattr(sys, "orig_argv", ())


def is_program() -> bool:
    """Whether this process is the `qbnorm` program (not one it spawned)."""
    return _names_program() and not is_spawned()


def ignore_interrupts() -> None:
    """A worker of the `qbnorm` program's local dask cluster: Ctrl-C on a terminal (SIGINT), a
    lost terminal (SIGHUP) or a job stopped as a whole (SIGTERM to its process group) reach every
    process of the group, but the program alone ends the run (cancelling the tasks, closing the
    cluster: its workers end with it), so they do not die of it first."""
    try:
        os.setpgid(0, 0)  # out of the terminal's foreground group: its Ctrl-C no longer reaches here
    except (AttributeError, OSError):
        pass
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        try:
            if signum is not None:
                signal.signal(signum, signal.SIG_IGN)
        except (ValueError, OSError):  # not the main thread
            return


def guard() -> None:
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        try:
            if signal.getsignal(signum) in (signal.SIG_IGN, None):
                continue  # ignored (nohup, background jobs) or not set from Python: leave it
            PREVIOUS[signum] = signal.signal(signum, interrupted)
        except (ValueError, OSError):  # not the main thread
            return


def done() -> bool:
    """Give the signals back their previous handlers; True when this is the `qbnorm` program."""
    was_guarding = bool(PREVIOUS)
    while PREVIOUS:
        signum, handler = PREVIOUS.popitem()
        try:
            signal.signal(signum, handler)
        except (ValueError, OSError):
            pass
    return was_guarding


def ignore_late_signals() -> None:
    """The run is over and its output complete: an interrupt now must not turn exit 0 into a kill."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(signum, signal.SIG_IGN)
        except (ValueError, OSError):
            pass


if is_program():
    guard()
    # The registry warns once as it loads about plug-ins it left out; the program reports them with
    # each command's warnings instead (one line, silent with --quiet, in the --json document).
    warnings.filterwarnings("ignore", module=r"qbnorm_cli\.methods$")
    # The program's stderr is its own one line: dask's records (a comm closed while a run ends
    # on a signal logs "Batched Comm Closed" with a traceback, from any thread, even after the
    # session's own filter is gone) are left out before distributed configures its loggers, here
    # and in the local workers, which inherit the environment. A user's setting wins; QBNORM_DEBUG=1
    # shows them.
    if os.environ.get("QBNORM_DEBUG") != "1":
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "critical")
elif _names_program() and is_spawned():
    ignore_interrupts()
