"""Block sizes under a memory budget.

Every streaming loop in qbnorm walks its operands in row blocks whose size follows from one byte
budget (`memory`), or from `block_rows` when the caller wants to fix it (tests, debugging).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qbnorm_cli.errors import DataError, UsageError, param

DEFAULT_MEMORY = 1 << 30  # 1 GiB

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}


def parse_memory(value: str | int) -> int:
    """'1GiB', '512MB', '2g', '1000000' (or a number of bytes) → bytes, at least 1 MiB."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        size = int(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise UsageError(f"{param('memory')} {value!r}: expected a size such as 512MiB, 1GiB or 2GB")
        size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size < 1 << 20:
        raise UsageError(f"{param('memory')} {value!r}: at least 1MiB is needed")
    return size


def make_budget(memory: str | int = DEFAULT_MEMORY, block_rows: int | None = None) -> Budget:
    """A Budget from the callers' `memory` (bytes or a size such as '2GiB') and `block_rows`."""
    if block_rows is not None and (not isinstance(block_rows, int) or block_rows < 1):
        raise UsageError(f"{param('block_rows')} {block_rows!r}: must be a whole number ≥ 1")
    return Budget(parse_memory(memory), block_rows)


@dataclass(frozen=True)
class Budget:
    """How many bytes a command may hold, and an optional fixed block size in rows."""

    memory: int = DEFAULT_MEMORY
    block_rows: int | None = None

    def rows(self, bytes_per_row: float, share: float = 1.0, total: int | None = None,
             align: int | None = None) -> int:
        """Rows of `bytes_per_row` that fit in `share` of the budget (at least 1, at most total),
        rounded down to whole multiples of `align` (the rows of an HDF5 chunk) when that leaves
        at least one: then no chunk is read, or decompressed, twice."""
        if self.block_rows is not None:
            rows = self.block_rows
        else:
            rows = max(1, int(self.memory * share // max(bytes_per_row, 1)))
            rows = aligned(rows, align)
        if total is not None:
            rows = min(rows, max(total, 1))
        return rows

    def check_unit(self, label: str, unit: str, unit_rows: int, unit_bytes: int, fix: str) -> None:
        """Refuse an input whose smallest readable `unit` (an Arrow record batch: read whole) would
        not fit the budget: reading it would allocate beyond `memory`; `fix` says how to make it smaller."""
        if self.block_rows is None and unit_bytes > self.memory // 2:
            need = -(-2 * unit_bytes // (1 << 20))
            what = f"a {unit} of {unit_rows} rows" if unit_rows > 1 else f"a {unit}"
            raise DataError(f"{label}: {what} ({unit_bytes / (1 << 20):.1f} MiB as float32) is read whole, more than "
                            f"half of {param('memory')} allows: raise it to at least {need}MiB, or {fix}")

    def fits(self, nbytes: float, share: float) -> bool:
        """Whether an array of `nbytes` may be held whole (never when blocks are fixed by hand)."""
        return self.block_rows is None and nbytes <= self.memory * share


def aligned(step: int, chunk: int | None) -> int:
    """`step` rounded down to a multiple of `chunk`, or below one chunk to a divisor of it: blocks
    then never straddle a chunk boundary (the chunk cache keeps a chunk between its blocks)."""
    if not chunk or chunk <= 1 or step <= 1:
        return step
    if step >= chunk:
        return step // chunk * chunk
    return next(d for d in range(step, 0, -1) if chunk % d == 0)


def column_block_width(n_cols: int, col_bytes: int, state_bytes_per_col: int, budget: Budget,
                       align: int | None = None) -> int:
    """Gallery columns per block: everything when it fits a quarter of the budget; whole HDF5
    chunks of the gallery (`align` columns each) otherwise."""
    return budget.rows(col_bytes + state_bytes_per_col, share=0.25, total=n_cols, align=align)


def spans(total: int, step: int):
    """(start, stop) pairs covering range(total) in steps of `step`."""
    for start in range(0, total, step):
        yield start, min(start + step, total)
