"""Options shared by the subcommands, and the checks every command applies the same way."""

from __future__ import annotations

import math
from typing import Annotated

import typer

from qbnorm_cli.cli.report import Reporter
from qbnorm_cli.errors import UsageError
from qbnorm_cli.streaming.budget import DEFAULT_MEMORY, Budget, parse_memory

Json = Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing output; accept mismatches.")]
Memory = Annotated[str, typer.Option("--memory", metavar="SIZE",
                                     help="Memory budget that sets block sizes, e.g. 512MiB, 2GiB.")]
BlockRows = Annotated[int | None, typer.Option("--block-rows", min=1, metavar="ROWS",
                                               help="Fix the block size in rows (overrides --memory).")]
Similarity = Annotated[str, typer.Option("--similarity", metavar="cosine|dot",
                                         help="How embeddings are compared: cosine (rows L2-normalised) or dot.")]
Output = Annotated[str, typer.Option("--output", "-o", metavar="OUT.h5", help="Output HDF5 file.")]

DEFAULT_MEMORY_TEXT = "1GiB"
assert parse_memory(DEFAULT_MEMORY_TEXT) == DEFAULT_MEMORY


def budget(memory: str, block_rows: int | None) -> Budget:
    return Budget(parse_memory(memory), block_rows)


def reporter(json_output: bool, quiet: bool) -> Reporter:
    return Reporter(json_output=json_output, quiet=quiet)


def check_beta(value: float, option: str = "--beta") -> float:
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{option} {value}: must be a finite number > 0")
    return float(value)


def check_choice(value: str, choices, option: str) -> str:
    if value not in choices:
        raise UsageError(f"{option} {value!r}: choose one of {', '.join(choices)}")
    return value


def check_count(value: int, option: str, upper: int, what: str) -> int:
    if value < 1:
        raise UsageError(f"{option} {value}: must be at least 1")
    if value > upper:
        raise UsageError(f"{option} {value}: larger than the {what} ({upper})")
    return value
