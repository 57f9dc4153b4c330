"""qbnorm convert: turn someone else's dump (.npy, .npz, pickle, HDF5) into a qbnorm HDF5 file."""

from __future__ import annotations

from typing import Annotated

import numpy as np
import typer

from qbnorm_cli.cli import options as common
from qbnorm_cli.core import scale
from qbnorm_cli.io import foreign
from qbnorm_cli.io.files import OutputFile, open_array
from qbnorm_cli.streaming.budget import spans

KINDS = {"embeddings": "/embeddings", "similarity": "/scores"}
WIDE = 4096  # more columns than any common embedding: probably a score matrix


def command(
    source: Annotated[str, typer.Argument(metavar="INPUT", help="PATH, PATH::KEY (.npz, pickle) or PATH::/dataset (HDF5).")],
    output: common.Output,
    kind: Annotated[str, typer.Option("--kind", metavar="embeddings|similarity", help="What the array holds: embeddings (rows = items) or a query × gallery score matrix.")] = "embeddings",
    memory: common.Memory = common.DEFAULT_MEMORY_TEXT,
    block_rows: common.BlockRows = None,
    force: common.Force = False,
    json_output: common.Json = False,
    quiet: common.Quiet = False,
) -> None:
    """Convert a foreign dump into a qbnorm HDF5 file (float32, streamed in row blocks).

    Reads .npy, .npz (FILE.npz::KEY), pickled numpy arrays as released by QB-Norm (FILE.pkl, or
    FILE.pkl::KEY for a dict of arrays; pickles are read without running any code in them) and HDF5
    including ann-benchmarks files (FILE.hdf5::/train). Every command reads these directly too;
    converting once gives a self-describing file with provenance that is faster to re-read.

    Example: qbnorm convert test_sims.pkl -o sims.h5 --kind similarity
    """
    report = common.reporter(json_output, quiet)
    common.check_choice(kind, tuple(KINDS), "--kind")
    budget = common.budget(memory, block_rows)
    src = open_array(source)
    n_rows, n_cols = src.shape
    if kind == "embeddings" and n_cols > WIDE:
        report.warn(f"{src.label} has {n_cols} columns, more than embeddings usually do; "
                    "if it is a score matrix, convert it with --kind similarity")
    source_format = foreign.source_format(src.path)
    params = {"kind": kind, "source": src.label, "source_format": source_format,
              "source_dtype": str(src.dtype), "memory": budget.memory, "block_rows": block_rows}
    stats = None
    with OutputFile(output, kind, force=force, params=params, inputs=[src]) as out:
        ds = out.create(KINDS[kind], shape=(n_rows, n_cols), dtype=np.float32)
        lo, hi, total, total_sq = np.inf, -np.inf, 0.0, 0.0
        with report.progress("convert", n_rows, unit="rows") as advance:
            for r0, r1 in spans(n_rows, budget.rows(n_cols * 12, share=0.5, total=n_rows, align=src.chunk_rows)):
                block = src.read(r0, r1)
                out.write_rows(ds, r0, block)
                lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
                total += float(block.sum(dtype=np.float64))
                total_sq += float(np.square(block, dtype=np.float64).sum())
                advance(r1 - r0)
        attrs = out.h5.attrs
        attrs["source_format"] = source_format
        if kind == "similarity":
            n = n_rows * n_cols
            mean = total / n
            stats = scale.ScoreStats(lo, hi, mean, float(np.sqrt(max(total_sq / n - mean * mean, 0.0))))
            attrs["gallery_rows"] = n_cols
            attrs["score_min"], attrs["score_max"] = stats.min, stats.max
            attrs["score_mean"], attrs["score_std"] = stats.mean, stats.std
            attrs["score_scale"] = scale.classify(stats)

    summary = {"output": output, "kind": kind, "uuid": out.uuid, "rows": n_rows, "cols": n_cols,
               "source": src.label, "source_format": source_format, "source_dtype": str(src.dtype)}
    if stats is not None:
        summary["scores"] = stats.as_dict()
        summary["score_scale"] = scale.classify(stats)
    what = "scores" if kind == "similarity" else "embeddings"
    extra = f"; scores {scale.describe(stats)}" if stats is not None else ""
    report.info(f"wrote {output}: {kind} file, {what} {n_rows} × {n_cols} float32 from {src.label} "
                f"({source_format}, {src.dtype}){extra}")
    report.result(summary)
