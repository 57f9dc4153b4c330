"""Block sizes under a memory budget.

Every streaming loop in qbnorm walks its operands in row blocks whose size follows from one byte
budget (`memory`), or from `block_rows` when the caller wants to fix it (tests, debugging).

The budget is handed out by one `Ledger`: each taker (inputs held whole, a gallery column block,
the rows of a super-block, product tiles) asks for up to its fixed share of the whole and gets no
more than is left (less the one row the takers after it need), and what it keeps is charged.
Fixed shares alone (held inputs 0.25 + 0.25, column block 0.25, super-block 0.5, tiles 0.25)
could add up to 1.5 times the budget; the ledger's charges never exceed it (but where one row
of every block does). Where the shares did fit, every taker gets what its share gave before:
block sizes, and so outputs, are those of fixed shares.
"""

from __future__ import annotations

from dataclasses import dataclass

from qbnorm_cli.errors import DataError, UsageError, param
from qbnorm_cli.io.limits import parse_size

DEFAULT_MEMORY = 1 << 30  # 1 GiB


def parse_memory(value: str | int) -> int:
    """'1GiB', '512MB', '2g', '1000000' (or a number of bytes) → bytes, at least 1 MiB."""
    return parse_size(value, "memory")


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

    def ledger(self, held: int = 0) -> Ledger:
        """A ledger of this budget with `held` bytes already charged (inputs kept whole)."""
        return Ledger(self, held)

    def rows(self, bytes_per_row: float, share: float = 1.0, total: int | None = None,
             align: int | None = None) -> int:
        """Rows of `bytes_per_row` that fit in `share` of the budget, for a taker alone with it
        (Ledger.rows)."""
        return self.ledger().rows(bytes_per_row, share, total, align)

    def check_unit(self, label: str, unit: str, unit_rows: int, unit_bytes: int, fix: str) -> None:
        """Refuse an input whose smallest readable `unit` (an Arrow record batch: read whole) would
        not fit the budget: reading it would allocate beyond `memory`; `fix` says how to make it smaller."""
        if self.block_rows is None and unit_bytes > self.memory // 2:
            need = -(-2 * unit_bytes // (1 << 20))
            what = f"a {unit} of {unit_rows} rows" if unit_rows > 1 else f"a {unit}"
            raise DataError(f"{label}: {what} ({unit_bytes / (1 << 20):.1f} MiB as float32) is read whole, more than "
                            f"half of {param('memory')} allows: raise it to at least {need}MiB, or {fix}")

    def fits(self, nbytes: float, share: float) -> bool:
        """Whether an array of `nbytes` may be held whole, for a taker alone with the budget (Ledger.holds)."""
        return self.ledger().holds(nbytes, share)


class Ledger:
    """One stage's budget, handed out: a taker asks for up to `share` of the whole and gets no more
    than is left (`room`); what it keeps is charged. The charges never exceed the budget, but for
    the one row that every block has at least (`rows`)."""

    def __init__(self, budget: Budget, held: int = 0) -> None:
        self.budget = budget
        self.charged = held

    def room(self, share: float, keep: float = 0) -> float:
        """Bytes a taker of `share` may use: its share of the whole, no more than is left but the
        `keep` bytes that the takers after it need at least (their one row)."""
        return max(0.0, min(self.budget.memory * share, self.budget.memory - self.charged - keep))

    def charge(self, nbytes: float) -> None:
        self.charged += nbytes

    def rows(self, bytes_per_row: float, share: float = 1.0, total: int | None = None,
             align: int | None = None, most: int | None = None, keep: float = 0) -> int:
        """Rows of `bytes_per_row` within `room(share, keep)` (see rows_within), at most `most` (a
        limit of the caller's own: cache-sized blocks), charged; `block_rows` when blocks are fixed
        by hand."""
        if self.budget.block_rows is not None:
            rows = self.budget.block_rows if total is None else min(self.budget.block_rows, max(total, 1))
        else:
            rows = rows_within(self.room(share, keep), bytes_per_row, total, align)
            rows = rows if most is None else min(rows, most)
        self.charge(rows * bytes_per_row)
        return rows

    def holds(self, nbytes: float, share: float) -> bool:
        """Whether an array of `nbytes` may be held whole within `room(share)` (never when blocks are
        fixed by hand); charged when it may."""
        fits = self.budget.block_rows is None and nbytes <= self.room(share)
        if fits:
            self.charge(nbytes)
        return fits


def rows_within(room: float, bytes_per_row: float, total: int | None = None, align: int | None = None) -> int:
    """Rows of `bytes_per_row` that fit in `room` bytes (at least 1, at most total), rounded down
    to whole multiples of `align` (the rows of an HDF5 chunk) when that leaves at least one: then
    no chunk is read, or decompressed, twice."""
    rows = aligned(max(1, int(room // max(bytes_per_row, 1))), align)
    if total is not None:
        rows = min(rows, max(total, 1))
    return rows


def aligned(step: int, chunk: int | None) -> int:
    """`step` rounded down to a multiple of `chunk`, or below one chunk to a divisor of it: blocks
    then never straddle a chunk boundary (the chunk cache keeps a chunk between its blocks)."""
    if not chunk or chunk <= 1 or step <= 1:
        return step
    if step >= chunk:
        return step // chunk * chunk
    return next(d for d in range(step, 0, -1) if chunk % d == 0)


# The fixed shares a stage's takers ask of the budget (a Ledger grants no more than is left).
COLUMN_BLOCK_SHARE = 0.25  # a block of gallery columns (and their state)
TILE_SHARE = 0.25          # product tiles (on all threads)
ROW_STATE_SHARE = 0.5      # a super-block's query rows: their output and running state


def column_block_width(n_cols: int, col_bytes: int, state_bytes_per_col: int, budget: Budget | Ledger,
                       align: int | None = None) -> int:
    """Gallery columns per block: everything when it fits a quarter of the budget (of what is left
    of it, given a Ledger: charged there); whole HDF5 chunks of the gallery (`align` columns each)
    otherwise."""
    return budget.rows(col_bytes + state_bytes_per_col, share=COLUMN_BLOCK_SHARE, total=n_cols, align=align)


def spans(total: int, step: int):
    """(start, stop) pairs covering range(total) in steps of `step`."""
    for start in range(0, total, step):
        yield start, min(start + step, total)
