"""What reading a file may cost and reach, and how large an output may be: bounds against hostile
(or merely odd) files, set once per call.

* `memory`: a compressed HDF5 chunk is decompressed whole, and a .npz member or a pickle is held
  whole: neither may expand beyond its share of the budget (a 15 MB .npz of a 3 GiB member, one
  512 MiB gzip chunk, a 99-byte pickle declaring a 2.4 GB array).
* `allow_external`: HDF5 external storage, external links and virtual datasets read other files
  than the one named (/etc/passwd as data, a FIFO that blocks, a missing source read as its fill
  value): refused unless allowed, and then every file they reach is recorded in `inputs`.
* `max_output`: an output larger than this (default 64 GiB) is refused before anything is written,
  and one larger than the free space of its disk too.

The library's entry points set them from their arguments (`api.common.bounded`), the CLI from
--memory, --allow-external and --max-output; readers ask `current()`. Outside any entry point
(a caller opening an input directly) nothing is followed outside the file and nothing is bounded.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace

from qbnorm_cli.errors import DataError, RuntimeFailure, UsageError, param

DEFAULT_MAX_OUTPUT = 64 << 30  # 64 GiB: far beyond what a run usually writes, far below a runaway
MAX_SIZE = 1 << 60  # 1 EiB: beyond any machine, and within int64 however it is multiplied
CHUNK_SHARE = 8  # an HDF5 chunk may decompress to an eighth of the budget (blocks hold the rest)
MIN_CHUNK = 4 << 20


_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}


def parse_size(value: str | int, name: str) -> int:
    """'1GiB', '512MB', '2g', '1000000' (or a number of bytes) → bytes, from 1 MiB to 1 EiB; `name`:
    the parameter it was given as (memory, max_output)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        size = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise UsageError(f"{param(name)} {value!r}: expected a size such as 512MiB, 1GiB or 2GB")
        size = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not size <= MAX_SIZE:  # NaN too
        raise UsageError(f"{param(name)} {value!r}: at most 1EiB")
    if size < 1 << 20:
        raise UsageError(f"{param(name)} {value!r}: at least 1MiB is needed")
    return int(size)


@dataclass(frozen=True)
class Limits:
    memory: int | None = None  # bytes of the budget (None: unbounded)
    allow_external: bool = False
    max_output: int = DEFAULT_MAX_OUTPUT

    @property
    def chunk_bytes(self) -> int | None:
        """The most an HDF5 chunk may decompress to: an eighth of the budget, and never less than
        MIN_CHUNK (the chunks qbnorm and h5py write, ~1 MiB, are read under any --memory)."""
        return None if self.memory is None else max(self.memory // CHUNK_SHARE, MIN_CHUNK)


_DEFAULT = Limits()
_CURRENT: ContextVar[Limits] = ContextVar("qbnorm_limits", default=_DEFAULT)


def current() -> Limits:
    return _CURRENT.get()


@contextmanager
def applied(*, memory: int | None = None, allow_external: bool | None = None, max_output: int | None = None):
    """Limits for the calls inside; an argument left None keeps the enclosing setting."""
    given = {"memory": memory, "allow_external": allow_external, "max_output": max_output}
    token = _CURRENT.set(replace(current(), **{k: v for k, v in given.items() if v is not None}))
    try:
        yield current()
    finally:
        _CURRENT.reset(token)


def size_text(nbytes: float) -> str:
    """Bytes as people read them: 512 MiB, 41.0 GiB."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            value = nbytes / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{int(nbytes)} B"


def check_expansion(label: str, nbytes: int, what: str, fix: str) -> None:
    """Refuse `what` of `label` expanding to `nbytes` beyond the budget (a chunk: its share)."""
    bounds = current()
    if bounds.memory is None:
        return
    if what.startswith("chunk"):
        limit = bounds.chunk_bytes
        budget = f"{size_text(limit)}, an eighth of {param('memory')} {size_text(bounds.memory)}"
    else:
        limit = bounds.memory
        budget = f"{param('memory')} {size_text(limit)}"
    if nbytes > limit:
        raise DataError(f"{label}: {what} ({size_text(nbytes)}) exceeds {budget}: raise {param('memory')} or {fix}")


def check_output(output, nbytes: int, what: str) -> None:
    """Before writing `output` of about `nbytes` (`what`: its shape in words): refuse a size beyond
    `max_output` (usage: exit 2) and one beyond the free space of its directory (exit 1)."""
    limit = current().max_output
    if nbytes > limit:
        raise UsageError(f"{output}: the output would be {size_text(nbytes)} ({what}), more than "
                         f"{param('max_output')} {size_text(limit)}: check the inputs' shapes, or raise "
                         f"{param('max_output')}")
    directory = os.path.dirname(os.path.abspath(str(output)))
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return  # a directory that does not exist is the output check's to report
    if nbytes > free:
        raise RuntimeFailure(f"no space left on device writing {output}: the output would be {size_text(nbytes)} "
                             f"({what}) but {directory} has {size_text(free)} free: free space or write elsewhere")
