"""qbnorm build-bank: sample a querybank (or a gallery bank) from an embedding file."""

from __future__ import annotations

from typing import Annotated

import numpy as np
import typer

from qbnorm_cli.cli import options as common
from qbnorm_cli.core import bank
from qbnorm_cli.errors import DataError, UsageError
from qbnorm_cli.io.files import EMBEDDING_KINDS, OutputFile, as_float32, open_array
from qbnorm_cli.streaming.budget import spans


def command(
    source: Annotated[str, typer.Argument(metavar="SOURCE", help="Embeddings to sample: PATH or PATH::/dataset.")],
    output: common.Output,
    size: Annotated[int | None, typer.Option("--size", help="Bank rows (default 5000).")] = None,
    strategy: Annotated[str, typer.Option("--strategy", metavar="random|first|all",
                                          help="random (seeded, sorted), first rows, or all rows.")] = "random",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random sample.")] = 0,
    memory: common.Memory = common.DEFAULT_MEMORY_TEXT,
    block_rows: common.BlockRows = None,
    force: common.Force = False,
    json_output: common.Json = False,
    quiet: common.Quiet = False,
) -> None:
    """Sample a bank of queries (or gallery-modality items) from SOURCE.

    Example: qbnorm build-bank data.h5::/train_queries -o bank.h5 --size 5000 --seed 0
    """
    report = common.reporter(json_output, quiet)
    common.check_choice(strategy, bank.STRATEGIES, "--strategy")
    budget = common.budget(memory, block_rows)
    src = open_array(source, kinds=EMBEDDING_KINDS)
    n_source, dim = src.shape
    if strategy == "all":
        if size is not None and size != n_source:
            raise UsageError(f"--size {size} with --strategy all: the source has {n_source} rows")
        size = n_source
    else:
        size = 5000 if size is None else size
        if size < 1:
            raise UsageError(f"--size {size}: must be at least 1")
        if size > n_source:
            raise UsageError(
                f"--size {size}: {src.label} has only {n_source} rows (use --strategy all to take every row)"
            )
    index = bank.sample_indices(n_source, size, strategy, seed)
    params = {"size": size, "strategy": strategy, "seed": seed, "source_rows": n_source}
    with OutputFile(output, "bank", force=force, params=params, inputs=[src]) as out:
        ds = out.create("/embeddings", shape=(size, dim), dtype=np.float32)
        step = budget.rows(dim * 8, share=0.5, total=size)
        for i0, i1 in spans(size, step):
            rows = index[i0:i1]
            try:
                raw = np.asarray(src.array[rows])
            except (OSError, ValueError) as exc:
                raise DataError(f"{src.label}: cannot read rows ({exc})") from None
            block = as_float32(raw, src.label, rows)
            out.write_rows(ds, i0, block)
        out.create("/source_index", data=index)
    summary = {"output": output, "kind": "bank", "uuid": out.uuid, "rows": size, "dim": dim,
               "source": src.label, **params}
    report.info(f"wrote {output}: bank of {size} × {dim} from {src.label} ({strategy}, seed {seed})")
    report.result(summary)
