"""qbnorm build-bank: sample a querybank (or a gallery bank) from an embedding file."""

from __future__ import annotations

from typing import Annotated

import typer

from qbnorm_cli import api
from qbnorm_cli.api.files import DEFAULT_BANK_SIZE
from qbnorm_cli.cli import options, shared
from qbnorm_cli.cli.report import Reporter


@shared.budget
@shared.overwriting
@shared.reporting_without_progress
def command(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(metavar="SOURCE", help="Embeddings to sample: PATH or PATH::/dataset.")],
    output: options.Output,
    size: Annotated[int | None, typer.Option("--size", help=f"Bank rows (default {DEFAULT_BANK_SIZE}).")] = None,
    strategy: Annotated[str, typer.Option("--strategy", metavar="random|first|all",
                                          help="random (seeded, sorted), first rows, or all rows.")] = "random",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random sample.")] = 0,
    *,
    memory: str,
    block_rows: int | None,
    force: bool,
    report: Reporter,
) -> None:
    """Sample a bank of queries (or gallery-modality items) from SOURCE.

    Example: qbnorm build-bank data.h5::/train_queries -o bank.h5 --size 5000 --seed 0
    """
    with report.capture():
        written = api.build_bank(source, size=size, strategy=strategy, seed=seed, memory=memory,
                                 block_rows=block_rows, output=output, force=force, provenance=options.provenance(ctx))
    p = written.params
    report.info(f"wrote {output}: bank of {p['size']} × {p['dim']} from {p['source']} ({p['strategy']}, seed {p['seed']})")
    report.result({"output": output, "kind": "bank", "uuid": written.uuid, "rows": p["size"], "dim": p["dim"],
                   "source": p["source"], "size": p["size"], "strategy": p["strategy"], "seed": p["seed"],
                   "source_rows": p["source_rows"]})
