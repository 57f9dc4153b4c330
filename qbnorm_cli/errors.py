"""Errors and warnings of the library; the CLI turns each error into one line and an exit code.

Exit codes (docs/errors.md):
  0  success
  1  runtime or I/O failure (write error, disk full, permission denied, internal error)
  2  usage: bad option values, refused outputs (exists, same as an input, no such directory),
     input paths that name nothing usable
  3  bad input data: not HDF5/npy, corrupt, wrong dataset/kind/shape/version, non-finite values,
     mismatched files (a probe from another gallery)
  4  a quality gate failed (evaluate --fail-under)
  130 interrupted (Ctrl-C, SIGTERM)

Messages name the caller's parameters through `param`: the library shows a parameter as its
keyword (`beta 7: …`), the CLI as its flag (`--beta 7: …`), from one message.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_GATE = 4
EXIT_INTERRUPTED = 130

MARK = "\x1f"  # the ASCII unit separator: never part of a path, a value or another library's message


def param(name: str) -> str:
    """A parameter inside an error message, written as the library spells it (`beta`, `force=True`);
    `QbnormError.render` replaces it by the CLI's spelling (`--beta`, `--force`)."""
    return f"{MARK}{name}{MARK}"


class QbnormError(Exception):
    """Base class: the message is one line; `exit_code` says what kind of failure it is."""

    exit_code = EXIT_RUNTIME

    def render(self, names: Mapping[str, str] | None = None) -> str:
        """The message, each parameter spelled as `names` maps it (as the library spells it when absent)."""
        parts = str(self.args[0] if self.args else "").split(MARK)
        names = {} if names is None else names
        return "".join(part if i % 2 == 0 else names.get(part, part) for i, part in enumerate(parts))

    def __str__(self) -> str:
        return self.render()


class RuntimeFailure(QbnormError):
    exit_code = EXIT_RUNTIME


class UsageError(QbnormError):
    exit_code = EXIT_USAGE


class DataError(QbnormError):
    exit_code = EXIT_DATA


class GateFailure(QbnormError):
    exit_code = EXIT_GATE


class QbnormWarning(UserWarning):
    """About a result (a β on the wrong scale, a bank that covers little of the gallery): the run
    went on. The library issues it with `warnings.warn`; the CLI prints it (not with --quiet) and
    records it in --json."""

    def render(self, names: Mapping[str, str] | None = None) -> str:
        return QbnormError(*self.args).render(names)

    def __str__(self) -> str:
        return self.render()


def plain_text(message: str) -> str:
    """A message with its parameters spelled as the library spells them and no markers (for
    records: a file's `warnings` attribute, a result's warnings)."""
    return QbnormError(message).render()


def one_line(exc: BaseException) -> str:
    """Another library's exception text as one line (messages here are always one line)."""
    return " ".join(str(exc).split())


DISTRIBUTION = "qbnorm"


def install_hint(extra: str) -> str:
    """The command that installs the optional extra `extra` (plot, faiss, lancedb, dask, …) for the
    way qbnorm was installed: from a clone (pip's direct_url.json, PEP 610: an editable install, or
    one from a local directory) the clone's path, else the package index's name."""
    source, editable = _installed_from()
    if source is None:
        return f"pip install '{DISTRIBUTION}[{extra}]'"
    return f"pip install {'-e ' if editable else ''}'{source}[{extra}]'"


def package_hint(package: str) -> str:
    """The command that installs a third-party package qbnorm has no extra for (an fsspec protocol's
    implementation, say)."""
    return f"pip install {package}"


@functools.lru_cache(maxsize=1)
def _installed_from() -> tuple[str | None, bool]:
    """(the local directory qbnorm was installed from, whether editably), or (None, False) for an
    install from an index (or when the metadata says nothing)."""
    from importlib import metadata  # on first use: only a failing run needs it, and it costs every start
    from urllib.parse import unquote, urlparse

    try:
        text = metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
        record = json.loads(text) if text else {}
    except (metadata.PackageNotFoundError, ValueError, OSError):
        return None, False
    url = record.get("url") if isinstance(record, dict) else None
    dir_info = record.get("dir_info") if isinstance(record, dict) else None
    if not (isinstance(url, str) and url.startswith("file:") and isinstance(dir_info, dict)):
        return None, False
    return unquote(urlparse(url).path), bool(dir_info.get("editable"))
