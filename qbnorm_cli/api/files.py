"""`build_bank` and `convert`: qbnorm files made from embeddings and from other people's dumps."""

from __future__ import annotations

import numpy as np

from qbnorm_cli.api.common import check_choice, embeddings, progress_or_none, warn
from qbnorm_cli.api.normalising import Written
from qbnorm_cli.core import scale
from qbnorm_cli.core.sampling import STRATEGIES, sample_indices
from qbnorm_cli.errors import UsageError, param, plain_text
from qbnorm_cli.io import foreign
from qbnorm_cli.io.atomic import OutputFile
from qbnorm_cli.io.specs import as_input, transpose_into
from qbnorm_cli.io.validate import as_float32
from qbnorm_cli.streaming.budget import DEFAULT_MEMORY, make_budget, spans
from qbnorm_cli.streaming.sources import check_unit

DEFAULT_BANK_SIZE = 5000
CONVERTED = {"embeddings": "/embeddings", "similarity": "/scores"}
WIDE = 4096  # more columns than any common embedding: probably a score matrix
TILE, TILE_ROWS = 256, 1024  # chunks of a transposed copy: 1 MiB of float32, strips of TILE source rows


def build_bank(source, *, size: int | None = None, strategy: str = "random", seed: int = 0,
               memory=DEFAULT_MEMORY, block_rows: int | None = None, output=None, force: bool = False,
               provenance: str | None = None):
    """Sample a bank of queries (or of gallery-modality items) from `source` embeddings: a seeded
    uniform sample without replacement (QB-Norm Sec. 3.2), the first rows, or all of them.

    Returns (embeddings float32, source row of each), or with `output` writes a bank file
    (/embeddings, /source_index) and returns what it wrote.
    """
    check_choice(strategy, STRATEGIES, "strategy")
    budget = make_budget(memory, block_rows)
    src = embeddings(source, "source")
    check_unit(src, budget)
    n_source, dim = src.shape
    take_all = param("strategy='all'")
    if strategy == "all":
        if size is not None and size != n_source:
            raise UsageError(f"{param('size')} {size} with {take_all}: the source has {n_source} rows")
        size = n_source
    else:
        size = DEFAULT_BANK_SIZE if size is None else size
        if size < 1:
            raise UsageError(f"{param('size')} {size}: must be at least 1")
        if size > n_source:
            raise UsageError(f"{param('size')} {size}: {src.label} has only {n_source} rows "
                             f"(use {take_all} to take every row)")
    index = sample_indices(n_source, size, strategy, seed)
    step = budget.rows(dim * 8, share=0.5, total=size)
    if output is None:
        return np.concatenate([as_float32(src.read_rows(index[a:b]), src.label, index[a:b])
                               for a, b in spans(size, step)]), index
    params = {"size": size, "strategy": strategy, "seed": seed, "source_rows": n_source}
    with OutputFile(str(output), "bank", force=force, params=params, inputs=[src], provenance=provenance) as out:
        ds = out.create("/embeddings", shape=(size, dim), dtype=np.float32)
        for a, b in spans(size, step):
            out.write_rows(ds, a, as_float32(src.read_rows(index[a:b]), src.label, index[a:b]))
        out.create("/source_index", data=index)
    return Written(str(output), "bank", out.uuid, np.zeros(0, dtype=bool), {**params, "dim": dim, "source": src.label})


def convert(source, output, *, kind: str = "embeddings", transpose: bool = False, memory=DEFAULT_MEMORY,
            block_rows: int | None = None, force: bool = False, progress=None,
            provenance: str | None = None) -> Written:
    """Write a foreign dump (.npy, .npz::KEY, a pickled numpy array or dict of them, HDF5 including
    ann-benchmarks files, a Parquet or Arrow list column, a folder of .npy shards, a safetensors or
    PyTorch tensor, any of these by URL: io/formats.py) as a qbnorm file of `kind` embeddings or
    similarity (float32, streamed in row blocks); a similarity file records its score statistics.

    transpose: write a similarity matrix transposed (e.g. a t2v dump as items × captions for the
    v2t direction), in one sequential pass over the source: its row blocks become column strips of
    the output, chunked in tiles of TILE × TILE scores so that every strip writes whole chunks and
    the output reads back by rows (or transposed) chunk by chunk, once. The fast path when a
    matrix is read transposed many times: a `transpose=True` read of a contiguous or row-chunked
    file costs one pass over the file per budget panel (docs/performance.md)."""
    check_choice(kind, tuple(CONVERTED), "kind")
    budget = make_budget(memory, block_rows)
    src = as_input(source, "source")
    check_unit(src, budget)
    if transpose and kind != "similarity":
        as_scores = param("kind='similarity'")
        raise UsageError(f"{param('transpose=True')} writes score matrices transposed; pass {as_scores}")
    n_rows, n_cols = src.shape
    found = []
    if kind == "embeddings" and n_cols > WIDE:
        as_scores = param("kind='similarity'")
        found.append(f"{src.label} has {n_cols} columns, more than embeddings usually do; "
                     f"if it is a score matrix, convert it with {as_scores}")
    for message in found:
        warn(message)
    source_format = src.origin.fmt if src.origin else foreign.source_format(src.path) if src.path else "array"
    params = {"kind": kind, "source": src.label, "source_format": source_format, "transpose": transpose,
              "source_dtype": str(src.dtype), "memory": budget.memory, "block_rows": block_rows}
    stats = None
    with OutputFile(str(output), kind, force=force, params=params, inputs=[src], provenance=provenance) as out:
        shape = (n_cols, n_rows) if transpose else (n_rows, n_cols)
        ds = out.create(CONVERTED[kind], shape=shape, dtype=np.float32,
                        chunks=(TILE_ROWS, TILE) if transpose else None)
        low, high, total, squares = np.inf, -np.inf, 0.0, 0.0
        step = budget.rows(n_cols * 12, share=0.5, total=n_rows, align=src.chunk_rows)
        if transpose and step >= TILE and budget.block_rows is None:
            step = step // TILE * TILE  # whole tiles of the output per strip
        with progress_or_none(progress)("convert", n_rows, unit="rows") as advance:
            for r0, r1 in spans(n_rows, step):
                block = src.read(r0, r1)
                if transpose:
                    strip = np.empty((n_cols, r1 - r0), dtype=np.float32)
                    transpose_into(strip, block)
                    out.write_columns(ds, r0, strip)
                else:
                    out.write_rows(ds, r0, block)
                low, high = min(low, float(block.min())), max(high, float(block.max()))
                total += float(block.sum(dtype=np.float64))
                squares += float(np.square(block, dtype=np.float64).sum())
                advance(r1 - r0)
        attrs = out.h5.attrs
        attrs["source_format"] = source_format
        out.warnings = found
        if kind == "similarity":
            stats = scale.ScoreStats.from_sums(n_rows * n_cols, total, squares, low, high)
            attrs["gallery_rows"] = shape[1]
            attrs["score_min"], attrs["score_max"] = stats.min, stats.max
            attrs["score_mean"], attrs["score_std"] = stats.mean, stats.std
            attrs["score_scale"] = scale.classify(stats)
    summary = {"rows": shape[0], "cols": shape[1], "transposed": transpose, "source": src.label,
               "source_format": source_format, "source_dtype": str(src.dtype)}
    if stats is not None:
        summary["scores"] = stats.as_dict()
        summary["score_scale"] = scale.classify(stats)
    return Written(str(output), kind, out.uuid, np.zeros(0, dtype=bool), summary,
                   tuple(plain_text(w) for w in found))
