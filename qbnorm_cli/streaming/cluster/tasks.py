"""probe, normalise, evaluate and hubness cut into tasks for a dask.distributed cluster, with the
local results to the bit (docs/distributed.md); the session (session.py) runs them, the workers
(worker.py) reopen their inputs.

The tasks run the local kernels on the local path's own partition, cut into groups of whole units:

  probe      whole gallery column blocks (engine.probe_plan's width): engine.probe_block on each,
             for every bank, exactly as the local pass; back come the blocks' per-item statistics
             (core/probestats' fields, placed at their columns) and each bank row's best items
             among the task's columns, which the client merges in column order.
  normalise  dense: whole super-blocks of query rows (engine.dense_plan, engine.dense_rows);
             --top-k: whole row tiles of a super-block (ranking.ranking_plan, ranking.rank_rows);
             back come the output rows.
  evaluate   ranges of stored rows, for each pass of streaming.evaluation (the standings of
  hubness    rows, the two passes of column standings, the neighbours): back come the row
             ranges' standings, the columns' maxima and counts, or the top items (`score_rows`).

Why the bits agree. Float32 products from BLAS round differently with the operands' shapes (gemv
for one row, small-matrix kernels, the split of the columns between BLAS threads), and float64
sums with their order. So a task computes exactly the products and sums the local run would:
the same blocks, tiles and row chunks (planned on the client for its cores: the chunks of the
probe's exponential sums and the top-k tiles are cut for parallel.workers() of the client, and
BLAS gets as many threads as the client's), each top-k row tile recomputing its own unsure rows
(ranking._row_tile), and every merge done in the local order. Top-k lists, ranks, neighbours,
minima and maxima are exact whatever the order. Results then agree with a local run on the
client's machine wherever the workers run the same BLAS kernels (the same CPU kind).

Workers read their inputs themselves: every input file must be on storage all of them see, at
the same path (relative paths are made absolute on the client). Arrays handed over in memory
(the library's) go to the workers through the scheduler.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np

from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.core.statistics import BankAccumulator
from qbnorm_cli.errors import UsageError, param
from qbnorm_cli.io import limits, remote
from qbnorm_cli.io.probefile import CheckedRows
from qbnorm_cli.io.scorefiles import ScoreFile
from qbnorm_cli.io.specs import ArrayInput, Transposed
from qbnorm_cli.streaming import engine, parallel, ranking
from qbnorm_cli.streaming.budget import Budget, spans
from qbnorm_cli.streaming.cluster.session import Session
from qbnorm_cli.streaming.cluster.worker import held, normaliser, score_file
from qbnorm_cli.streaming.sources import EmbeddingScores, MatrixScores

SHARE_BYTES = 1 << 16  # a pass's arrays larger than this go to the workers once, through the scheduler


# --- on the client: describing inputs and sources -------------------------------------------------

def _ref(session: Session, item: ArrayInput, shared_data: dict) -> dict:
    """How a worker opens `item`: the file (absolute path) or the array handed over in memory."""
    shape = list(item.shape)
    if item.path is None:
        if id(item) not in shared_data:
            shared_data[id(item)] = {"name": item.label, "data": session.share(np.asarray(item.array)),
                                   "shape": shape, "key": f"memory:{uuid.uuid4().hex}"}
        return shared_data[id(item)]
    path = item.path if remote.is_url(item.path) else os.path.abspath(item.path)  # a URL is the same everywhere
    spec = f"{path}::{item.dataset}" if item.dataset else path
    try:
        stat = os.stat(path)
        stamp = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    except OSError:
        stamp = None
    panel = item.array.panel_bytes if isinstance(item.array, Transposed) else None
    return {"spec": spec, "path": item.path, "label": item.label, "shape": shape, "transposed": panel,
            "key": (spec, stamp, panel), "allow_external": limits.current().allow_external}


def _recipe(session: Session, scores, shared_data: dict) -> dict:
    if isinstance(scores, MatrixScores):
        source = _ref(session, scores.source, shared_data)
        return {"kind": "matrix", "source": source, "key": ("matrix", _key(source))}
    if isinstance(scores, EmbeddingScores):
        rows, cols = _ref(session, scores.rows.source, shared_data), _ref(session, scores.cols.source, shared_data)
        return {"kind": "embeddings", "rows": rows, "cols": cols, "cosine": scores.rows.cosine,
                "key": ("embeddings", _key(rows), _key(cols), scores.rows.cosine)}
    raise UsageError(f"{param('cluster')}: these scores ({type(scores).__name__}) cannot be computed on a cluster")


def _key(ref: dict):
    return ref["key"]


def _ship_normaliser(session: Session, norm: Normaliser):
    """The normaliser on every worker once (its O(gallery) vectors); a probe file's sorted bank
    scores (gc) are read by the workers themselves."""
    sorted_ref = None
    if isinstance(norm.sorted_bank, CheckedRows):
        dataset = norm.sorted_bank.ds
        sorted_ref = (os.path.abspath(dataset.file.filename), dataset.name, norm.sorted_bank.layout)
        norm = replace(norm, sorted_bank=None)
    return session.share({"norm": norm, "sorted": sorted_ref})


def _groups(bounds: list[tuple[int, int]], count: int) -> list[list[tuple[int, int]]]:
    """Consecutive units split into about `count` groups of similar size (in rows or columns)."""
    total = sum(b - a for a, b in bounds)
    target = max(1, math.ceil(total / max(count, 1)))
    groups, current, size = [], [], 0
    for a, b in bounds:
        current.append((a, b))
        size += b - a
        if size >= target:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return groups


def _joined(group: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent ranges of a group as one range each."""
    out = [list(group[0])]
    for a, b in group[1:]:
        if a == out[-1][1]:
            out[-1][1] = b
        else:
            out.append([a, b])
    return [tuple(r) for r in out]


# --- probe --------------------------------------------------------------------------------------

class _Columns:
    """Columns c0:c1 of a score source, numbered from 0 (a task's share of the gallery)."""

    def __init__(self, inner, c0: int, c1: int):
        self.inner, self.c0 = inner, c0
        self.n_rows, self.n_cols = inner.n_rows, c1 - c0
        self.sub_columns = inner.sub_columns

    def column_block(self, c0: int, c1: int) -> None:
        self.inner.column_block(self.c0 + c0, self.c0 + c1)

    def tile(self, r0: int, r1: int) -> np.ndarray:
        return self.inner.tile(r0, r1)

    def col_bytes(self) -> int:
        return self.inner.col_bytes()

    @property
    def row_chunk(self):
        return self.inner.row_chunk

    @property
    def col_chunk(self):
        return self.inner.col_chunk


def _probe_task(spec: dict, recipes: list, window: tuple[int, int]) -> dict:
    """Gallery columns window[0]:window[1] (whole blocks of spec['width']) against every bank."""
    c0, c1 = window
    budget = spec["budget"]
    out = {"banks": [], "sorted": []}
    for number, (recipe, shape) in enumerate(zip(recipes, spec["banks"], strict=True)):
        acc = BankAccumulator(shape["n_rows"], c1 - c0, np.asarray(shape["betas"]), shape["kmax"],
                              tuple(shape["topk_ks"]), shape["keep_sorted"], shape["column_moments"],
                              shape["neighbor_k"])

        def on_sorted(_, a, b, block, number=number):
            if number == 0:
                out["sorted"].append((a, b, block))

        with held(recipe, budget) as scores:
            columns = _Columns(scores, c0, c1)
            for a, b in spans(c1 - c0, spec["width"]):
                engine.probe_block([(columns, acc)], a, b, budget, on_sorted=on_sorted, tile_room=spec["tile_room"])
        values, indices = acc.neighbors.values, acc.neighbors.indices
        out["banks"].append({  # float32 scores: exact
            "columns": acc.column_parts(), "values": values.astype(np.float32), "indices": indices.astype(np.int32)})
    return out


def run_probe(session: Session, banks: list[tuple[object, BankAccumulator]], n_gallery: int, budget: Budget,
              on_sorted=None, progress=None) -> None:
    """engine.run_probe on the cluster: the same accumulators filled with the same values."""
    plan = engine.probe_plan(banks, n_gallery, budget)
    width = plan.width
    blocks = list(spans(n_gallery, width))
    shared_data: dict = {}
    recipes = [_recipe(session, scores, shared_data) for scores, _ in banks]
    spec = {"budget": budget, "width": width, "tile_room": plan.tile_room,
            "banks": [{"n_rows": acc.n_rows, "betas": acc.betas.tolist(), "kmax": acc.kmax,
                       "topk_ks": list(acc.topk_ks), "keep_sorted": acc.keep_sorted,
                       "column_moments": acc.column_moments, "neighbor_k": acc.neighbor_k} for _, acc in banks]}
    windows = [(g[0][0], g[-1][1]) for g in _groups(blocks, session.target_tasks(len(blocks)))]
    rows = sum(scores.n_rows for scores, _ in banks)
    work = [rows * (b - a) for a, b in windows]
    for (c0, c1), result in zip(windows, session.run("probe", _probe_task, (spec, recipes), windows, work, progress),
                                strict=True):
        for (_, acc), part in zip(banks, result["banks"], strict=True):
            _fold_probe(acc, c0, c1, part)
        if on_sorted is not None:
            for a, b, block in result["sorted"]:
                on_sorted(0, c0 + a, c0 + b, block)


def _fold_probe(acc: BankAccumulator, c0: int, c1: int, part: dict) -> None:
    """A task's statistics into the client's accumulator, in column order."""
    acc.place_columns(c0, c1, part["columns"])
    indices = part["indices"]
    rows, slots = np.nonzero(indices >= 0)
    columns = indices[rows, slots].astype(np.int64) + c0
    values = part["values"][rows, slots].astype(np.float64)
    order = np.lexsort((columns, rows))  # rows ascending, columns ascending within a row
    # every column of this task lies right of those merged before: ties keep the lower index
    acc.neighbors.offer(0, rows[order], columns[order], values[order], forward=True)


# --- normalise ----------------------------------------------------------------------------------

def _dense_task(spec: dict, recipe: dict, shipped: dict, ranges: list[tuple[int, int]]) -> list:
    norm = normaliser(shipped)
    with held(recipe, spec["budget"]) as scores:
        return [(q0, *engine.dense_rows(scores, norm, spec["budget"], spec["plan"], q0, q1, dtype=spec["dtype"]))
                for q0, q1 in ranges]


def _rank_task(spec: dict, recipe: dict, shipped: dict, ranges: list[tuple[int, int]]) -> list:
    norm = normaliser(shipped)
    out = []
    plan = spec["plan"]
    with held(recipe, spec["budget"]) as scores:
        for q0, q1 in ranges:
            # BLAS on one thread or several, as the whole super-block's tiles decide it
            start = q0 - (q0 % plan.super_rows)
            tiles = math.ceil((min(start + plan.super_rows, scores.n_rows) - start) / plan.geom.rows)
            values, indices, gated = ranking.rank_rows(scores, norm, plan, q0, q1,
                                                       threaded=parallel.threads_for(tiles))
            out.append((q0, values, indices.astype(spec["index_dtype"]), gated))
    return out


def run_normalise(session: Session, scores, norm: Normaliser, budget: Budget, top_k: int | None = None,
                  progress=None, dtype=np.float64) -> Iterator[tuple[int, tuple]]:
    """engine.run_normalise on the cluster: the same blocks in the same order, bit for bit."""
    if norm.pairwise is not None:
        raise UsageError(f"{param('cluster')}: a pairwise score (its row statistics come before its blocks) runs "
                         "here only: leave out the cluster")
    shared_data: dict = {}
    recipe = _recipe(session, scores, shared_data)
    n_rows, n_cols = scores.n_rows, scores.n_cols
    if top_k is None:
        plan = engine.dense_plan(scores, budget)
        units = list(spans(n_rows, plan.super_rows))  # whole super-blocks
        fn, spec = _dense_task, {"budget": budget, "plan": plan, "dtype": np.dtype(dtype)}
    else:
        plan = ranking.ranking_plan(scores, norm, budget, top_k, workers=session.client_threads)
        units = [(q0 + a, q0 + b) for q0, q1 in spans(n_rows, plan.super_rows)  # whole row tiles
                 for a, b in spans(q1 - q0, plan.geom.rows)]
        index_dtype = np.int32 if n_cols < 2**31 else np.int64
        fn, spec = _rank_task, {"budget": budget, "plan": plan, "index_dtype": index_dtype}
    count = session.target_tasks(len(units))
    if top_k is not None and plan.geom.block_columns < n_cols:
        # the gallery is read block by block for every task: as few tasks as keep every worker busy
        count = min(count, max(session.threads, len(list(spans(n_rows, plan.super_rows)))))
    tasks = [_joined(g) for g in _groups(units, count)]
    if top_k is not None:  # a range may not cross a super-block: its tiles would shift
        starts = {q0 for q0, _ in spans(n_rows, plan.super_rows)}
        tasks = [_split_at(ranges, starts) for ranges in tasks]
    shipped = _ship_normaliser(session, norm)
    work = [sum(b - a for a, b in ranges) * n_cols for ranges in tasks]
    for result in session.run("normalise", fn, (spec, recipe, shipped), tasks, work, progress):
        for q0, *block in result:
            if top_k is None:
                values, indices, gated = block
            else:
                values, indices, gated = block[0], block[1].astype(np.int64), block[2]
            yield q0, (values, indices, gated)


def _split_at(ranges: list[tuple[int, int]], starts: set[int]) -> list[tuple[int, int]]:
    out = []
    for a, b in ranges:
        cuts = sorted(s for s in starts if a < s < b)
        for x, y in zip([a, *cuts], [*cuts, b], strict=True):
            out.append((x, y))
    return out


# --- evaluate and hubness -------------------------------------------------------------------------

def _score_recipe(session: Session, source: ScoreFile, shared_data: dict) -> dict:
    return {"scores": _ref(session, source.scores, shared_data),
            "neighbors": None if source.neighbors is None else _ref(session, source.neighbors, shared_data),
            "n_gallery": source.n_gallery}


def _row_tasks(session: Session, source: ScoreFile) -> list[tuple[int, int]]:
    q = source.rows
    chunk = source.scores.chunk_rows or 1
    count = session.target_tasks(max(1, q // chunk))
    step = max(chunk, math.ceil(q / count / chunk) * chunk)
    return list(spans(q, step))


def _rows_task(fn: Callable, recipe: dict, names: tuple[str, ...], *values_and_rows):
    """A pass of streaming.evaluation over a range of rows of a stored input (`score_rows`)."""
    *values, rows = values_and_rows
    return fn(score_file(recipe), rows=rows, **dict(zip(names, values, strict=True)))


def score_rows(session: Session, kind: str) -> Callable:
    """streaming.evaluation.here on the cluster: map_rows(fn, source, progress, **kwargs) runs the
    pass fn(source, rows=…, **kwargs) as tasks over ranges of the stored rows (whole HDF5 chunks)
    and returns their results in row order; progress(n) as a task of n rows completes."""
    def map_rows(fn: Callable, source: ScoreFile, progress=None, **kwargs) -> list:
        tasks = _row_tasks(session, source)
        names = tuple(kwargs)
        values = [session.share(v) if isinstance(v, np.ndarray) and v.nbytes > SHARE_BYTES else v
                  for v in kwargs.values()]
        shared = (fn, _score_recipe(session, source, {}), names, *values)
        return list(session.run(kind, _rows_task, shared, tasks, [b - a for a, b in tasks], progress))
    return map_rows
