"""Options shared by the subcommands (cli/shared.py adds the common ones to a command), and how
the library's parameters are spelled as flags.

Library errors and warnings name parameters as the library spells them (`beta`, `force=True`,
`similarity='dot'`, errors.param); `flag` spells them as this CLI's options (`--beta`, `--force`,
`--similarity dot`), from the registry's declarations, the one table below and one rule (dashes
for underscores).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated

import typer

from qbnorm_cli import methods
from qbnorm_cli.api import Cluster as ClusterSpec
from qbnorm_cli.errors import UsageError, param

Json = Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")]
Progress = Annotated[str, typer.Option(
    "--progress", metavar="auto|bar|lines|none",
    help="Progress on stderr: auto (a bar on a terminal, nothing otherwise), bar, lines (a plain line at the start, "
         "every 10 s and at the end, for logs and cron; QBNORM_PROGRESS_SECONDS sets the interval) or none.")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing output (nothing else).")]
AcceptMismatch = Annotated[bool, typer.Option(
    "--accept-mismatch",
    help="Use a probe made from another gallery (same size, other data) instead of refusing it (exit 3); "
         "recorded as a warning in the output and --json.")]
Memory = Annotated[str, typer.Option("--memory", metavar="SIZE",
                                     help="Memory budget that sets block sizes, e.g. 512MiB, 2GiB.")]
BlockRows = Annotated[int | None, typer.Option("--block-rows", min=1, metavar="ROWS",
                                               help="Fix the block size in rows (overrides --memory).")]
Similarity = Annotated[str, typer.Option("--similarity", metavar="cosine|dot",
                                         help="How embeddings are compared: cosine (rows L2-normalised) or dot.")]
Output = Annotated[str, typer.Option("--output", "-o", metavar="OUT.h5", help="Output HDF5 file.")]
Transpose = Annotated[bool, typer.Option("--transpose", help="Read the similarity inputs transposed (stored the "
                                         "other way round, e.g. a t2v dump used in the v2t direction).")]
Plot = Annotated[str | None, typer.Option("--plot", metavar="FILE.png|.svg|.pdf",
                                          help="Also draw the figure (needs the plot extra: matplotlib).")]
Cluster = Annotated[str | None, typer.Option(
    "--cluster", metavar="ADDRESS",
    help="Run on a dask.distributed cluster, with the same results: local or local:N (N worker processes here, "
         "TLS with a certificate made for the run), tcp://HOST:PORT, tls://HOST:PORT or a scheduler file; workers read the inputs themselves (shared storage) and --memory is "
         "per worker (needs the dask extra; see docs/distributed.md).")]
ClusterSecurity = Annotated[str | None, typer.Option(
    "--cluster-security", metavar="FILE",
    help="TLS credentials for a tcp:// or tls:// scheduler (or scheduler file): a YAML or JSON file of "
         "distributed.Security's keywords (tls_ca_file, tls_client_cert, tls_client_key; paths relative to it). "
         "Default: dask's distributed.comm.tls configuration. local:N makes its own (see docs/security.md).")]


def on_cluster(address: str | None, security: str | None):
    """--cluster and --cluster-security as the library's `cluster` (None: run here)."""
    if address is None:
        if security is not None:
            raise UsageError("--cluster-security: give --cluster too (the scheduler it secures)")
        return None
    return ClusterSpec(address, security=security)

# The limits a command runs under (io.limits; `budget`), not read by the commands themselves:
AllowExternal = Annotated[bool, typer.Option(
    "--allow-external",
    help="Follow HDF5 external links, external storage and virtual datasets to the files they name (refused by "
         "default: they read files not given on the command line); every file read is recorded in the output's "
         "inputs.")]
MaxOutput = Annotated[str, typer.Option(
    "--max-output", metavar="SIZE",
    help="Refuse to write an output larger than this (its size is known before any work), e.g. 64GiB, 1TiB.")]
DEFAULT_MAX_OUTPUT_TEXT = "64GiB"  # io.limits.DEFAULT_MAX_OUTPUT (tests/test_cli_options.py checks they agree)

DEFAULT_PROGRESS = "auto"
DEFAULT_MEMORY_TEXT = "1GiB"  # the library's default budget (tests/test_cli_options.py checks they agree)

# Library parameters whose option is not simply --name: repeatable options are singular, positional
# arguments are named by their metavar.
FLAGS = {
    **{p.name: p.option for p in methods.PARAMETERS.values() if p.flag},  # --lambda: a Python keyword's
    **{p.many: p.option for p in methods.PARAMETERS.values() if p.many},  # betas: --beta (repeatable)
    "methods": "--method",
    "security": "--cluster-security",  # Cluster(security=…)
    "scores": "SCORES",
    "source": "SOURCE",
}
# Every whole-number option ends in a C int (faiss, HDF5) or an int64 (numpy): click takes any
# integer, so each is bounded here, in one place, before a command runs (app.py).
WHOLE_MAX = methods.WHOLE_MAX
WHOLE_LIMITS = {"seed": 2**63 - 1}  # options that take more: numpy's seeds are int64 here


def check_whole_numbers(values: Mapping[str, object]) -> None:
    """Refuse an integer option (or a repeated one's value) beyond its limit (WHOLE_MAX, or
    WHOLE_LIMITS), naming the option: 10**30 iterations would overflow, never run."""
    for name, value in values.items():
        limit = WHOLE_LIMITS.get(name, WHOLE_MAX)
        for number in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(number, int) and not isinstance(number, bool) and not -limit <= number <= limit:
                shown = str(number) if len(str(number)) <= 24 else f"{str(number)[:12]}…({len(str(number))} digits)"
                raise UsageError(f"{param(name)} {shown}: must be at most {limit}")


_ASSIGNMENT = re.compile(r"(?P<name>[a-z_]+)=(?P<value>.+)")


def flag(spelling: str) -> str:
    """The CLI's spelling of a library parameter: beta → --beta, force=True → --force,
    similarity='dot' → --similarity dot."""
    match = _ASSIGNMENT.fullmatch(spelling)
    name, value = (match["name"], match["value"].strip("'\"")) if match else (spelling, None)
    option = FLAGS.get(name, "--" + name.replace("_", "-"))
    if value is None or value == "True":
        return option
    return f"{option} {value}"


class Flags(Mapping):
    """errors.QbnormError.render's names: every parameter spelled by `flag`."""

    def __getitem__(self, spelling: str) -> str:
        return flag(spelling)

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0

    def get(self, spelling, default=None):
        return flag(spelling)


FLAG_NAMES = Flags()


def provenance(ctx: typer.Context) -> str:
    """The command line of this run (main() hands it to the app), recorded in every output."""
    obj = ctx.find_root().obj
    return (obj or {}).get("provenance", "qbnorm")


def with_params(tuned: Mapping | None, **given) -> dict:
    """A method and its parameters: each option as given, else the params file's setting (tune's;
    explicit options win, and a method ignores the parameters it does not use)."""
    if tuned is None:
        return given
    return {name: tuned[name] if value is None else value for name, value in given.items()}
