"""Errors that end a command with a one-line message and a documented exit code.

Exit codes (docs/errors.md):
  0  success
  1  runtime or I/O failure (write error, disk full, permission denied, internal error)
  2  usage: bad option values, refused outputs (exists, same as an input, no such directory),
     input paths that name nothing usable
  3  bad input data: not HDF5/npy, corrupt, wrong dataset/kind/shape/version, non-finite values,
     mismatched files (a probe from another gallery)
  4  a quality gate failed (evaluate --fail-under)
  130 interrupted (Ctrl-C, SIGTERM)
"""

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_GATE = 4
EXIT_INTERRUPTED = 130


class QbnormError(Exception):
    """Base class: the message is printed as one line, the process exits with `exit_code`."""

    exit_code = EXIT_RUNTIME


class RuntimeFailure(QbnormError):
    exit_code = EXIT_RUNTIME


class UsageError(QbnormError):
    exit_code = EXIT_USAGE


class DataError(QbnormError):
    exit_code = EXIT_DATA


class GateFailure(QbnormError):
    exit_code = EXIT_GATE
