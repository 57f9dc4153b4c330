"""Ctrl-C or SIGTERM while the `qbnorm` program is still loading its libraries.

Importing numpy, scipy, h5py and typer takes about a second. An interrupt in that time would end
in a traceback from the middle of an import (SIGINT) or a bare kill (SIGTERM); nothing has been
opened or written yet, so this says so in one line and exits 130 at once. The handlers of every
phase live in io/staging.py; `cli.main()` ends this one (`staging.end_loading()`). Nothing happens
when qbnorm_cli is imported as a library: only the `qbnorm` program (or `python -m qbnorm_cli`) is
guarded. The package imports
this module before anything else; a signal before that, while Python itself starts, gets Python's
and the system's defaults (docs/errors.md).
"""

from __future__ import annotations

import itertools
import os
import sys
import warnings

from qbnorm_cli.io import staging


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


if is_program():
    staging.guard_loading()
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
    staging.ignore_in_worker()
