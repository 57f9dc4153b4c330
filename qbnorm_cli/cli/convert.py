"""qbnorm convert: turn someone else's dump (.npy, .npz, pickle, HDF5, Parquet, Arrow, .npy shards,
safetensors, PyTorch, URLs) into a qbnorm HDF5 file."""

from __future__ import annotations

from typing import Annotated

import typer

from qbnorm_cli import api
from qbnorm_cli.cli import options, shared
from qbnorm_cli.cli.report import Reporter
from qbnorm_cli.core import scale


@shared.budget
@shared.overwriting
@shared.reporting
def command(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(metavar="INPUT", help="PATH, PATH::KEY (.npz, pickle, .pt, .safetensors), PATH::COLUMN (.parquet, .arrow), PATH::/dataset (HDF5), a folder of .npy shards, or a URL.")],
    output: options.Output,
    kind: Annotated[str, typer.Option("--kind", metavar="embeddings|similarity", help="What the array holds: embeddings (rows = items) or a query × gallery score matrix.")] = "embeddings",
    transpose: Annotated[bool, typer.Option("--transpose", help="Write a score matrix transposed (with --kind similarity; one pass, tile-chunked): the fast path for a dump read --transpose often.")] = False,
    *,
    memory: str,
    block_rows: int | None,
    force: bool,
    report: Reporter,
) -> None:
    """Convert a foreign dump into a qbnorm HDF5 file (float32, streamed in row blocks).

    Reads .npy, .npz (FILE.npz::KEY), pickled numpy arrays as released by QB-Norm (FILE.pkl, or
    FILE.pkl::KEY for a dict of arrays; pickles are read without running any code in them), HDF5
    including ann-benchmarks files (FILE.hdf5::/train), Parquet and Arrow list columns
    (FILE.parquet::COLUMN), folders of .npy shards (DIR or 'DIR/*.npy'), safetensors
    (FILE.safetensors::TENSOR), PyTorch files (FILE.pt or FILE.pt::KEY, read without torch) and
    URLs (https://, s3://, gs://, hf://). Every command reads these directly too; converting once
    gives a self-describing file with provenance that is faster to re-read.

    Example: qbnorm convert test_sims.pkl -o sims.h5 --kind similarity

    Example (a t2v dump as items × captions, for the v2t direction): qbnorm convert test_sims.pkl
    -o v2t.h5 --kind similarity --transpose
    """
    with report.capture():
        written = api.convert(source, output, kind=kind, transpose=transpose, memory=memory, block_rows=block_rows, force=force,
                              progress=report.progress, provenance=options.provenance(ctx))
    p = written.params
    what = "scores" if kind == "similarity" else "embeddings"
    extra = f"; scores {scale.describe(scale.ScoreStats.from_dict(p['scores']))}" if "scores" in p else ""
    report.info(f"wrote {output}: {kind} file, {what} {p['rows']} × {p['cols']} float32 from {p['source']}"
                f"{' transposed' if p['transposed'] else ''} "
                f"({p['source_format']}, {p['source_dtype']}){extra}")
    report.result({"output": output, "kind": kind, "uuid": written.uuid, **p})
