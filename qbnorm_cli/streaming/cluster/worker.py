"""The cluster's worker side: running a task as the client's machine would, and reopening the
inputs a task names (files by their path, or arrays handed over through the scheduler), kept
between tasks of one worker (docs/distributed.md)."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace

import numpy as np

from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.errors import QbnormError, RuntimeFailure, param
from qbnorm_cli.io import limits
from qbnorm_cli.io.hdf5 import open_h5
from qbnorm_cli.io.probefile import CheckedRows
from qbnorm_cli.io.scorefiles import ScoreFile
from qbnorm_cli.io.specs import ArrayInput, open_array, transposed
from qbnorm_cli.streaming import parallel
from qbnorm_cli.streaming.budget import Budget
from qbnorm_cli.streaming.sources import Embeddings, EmbeddingScores, MatrixScores

DOCS = "docs/distributed.md"
CACHE_ENTRIES = 4      # score sources a worker keeps between tasks (the bank, the gallery held)


_READ = [0]             # bytes read from inputs by this process's tasks
_READ_LOCK = threading.Lock()
_CACHE: dict = {}       # key → (score source, lock), most recently used last
_CACHE_LOCK = threading.Lock()


def identity(value):
    """A value handed over through the scheduler (Session.share)."""
    return value


def run_task(kind: str, number: int, before_task, machine: tuple[int, int], fn: Callable, *args):
    """Run one task as the client's machine would run its part: its work cut for the client's
    cores, BLAS on the client's threads (`machine`), whatever this worker's own (they do the work);
    returns the result, the bytes read from the inputs and this worker's BLAS kernels."""
    if before_task is not None:
        before_task(kind, number)
    from threadpoolctl import threadpool_limits

    threads, blas = machine
    start = _READ[0]
    with parallel.planned_for(threads), threadpool_limits(limits=blas, user_api="blas"):
        result = fn(*args)
    return result, _READ[0] - start, worker_kernels()


@functools.cache
def worker_kernels() -> str:
    """This process's BLAS kernels (what its float32 products round like)."""
    return numpy_blas()[1]


def clear_cache() -> None:
    """Forget the score sources kept between tasks (and close their files)."""
    with _CACHE_LOCK:
        entries = list(_CACHE.values())
        _CACHE.clear()
    for source, _ in entries:
        for item in _inputs_of(source):
            item.close()


def _inputs_of(source) -> list[ArrayInput]:
    if isinstance(source, EmbeddingScores):
        return [source.rows.source, source.cols.source]
    if isinstance(source, MatrixScores):
        return [source.source]
    return []


class _Counted:
    """An input array that counts the bytes read from it (task statistics)."""

    def __init__(self, array):
        self.array = array
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.chunks = getattr(array, "chunks", None)

    def __getitem__(self, key):
        block = self.array[key]
        with _READ_LOCK:
            _READ[0] += int(getattr(block, "nbytes", 0))
        return block


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return "a worker"


def _open(ref: dict) -> ArrayInput:
    """An input as the client described it (tasks.py, `_ref`), opened here."""
    if "data" in ref:  # handed over in the client's memory (a transposed read as its view)
        return ArrayInput(ref["name"], None, None, _Counted(np.asarray(ref["data"])), name=ref["name"])
    try:
        with limits.applied(allow_external=ref.get("allow_external", False)):  # as the client allowed
            found = open_array(ref["spec"], ndim=(len(ref["shape"]),))
    except QbnormError as exc:
        raise RuntimeFailure(f"{exc.args[0]} (on the worker at {_worker_address()}: {param('cluster')} needs every "
                             f"input on storage all workers see, at the same path; {DOCS})") from None
    found.path = ref["path"]  # labels name the file as the user gave it
    found.array = _Counted(found.array)
    if ref["transposed"] is not None:  # read transposed as on the client, in panels of its size
        found = transposed(found, ref["transposed"])
    if list(found.shape) != list(ref["shape"]):
        found.close()
        raise RuntimeFailure(f"{ref['label']}: the worker at {_worker_address()} reads shape {list(found.shape)}, the "
                             f"client {list(ref['shape'])}: the workers must see the same files as the client")
    return found


def _source(recipe: dict, budget: Budget):
    """The score source a recipe describes (tasks.py, `_recipe`), kept between tasks of this worker."""
    key = (recipe["key"], budget.memory, budget.block_rows)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE[key] = _CACHE.pop(key)
            return _CACHE[key]
    if recipe["kind"] == "matrix":
        source = MatrixScores(_open(recipe["source"]))
    else:
        similarity = "cosine" if recipe["cosine"] else "dot"
        rows = Embeddings(_open(recipe["rows"]), similarity, budget, eager=False)
        cols = Embeddings(_open(recipe["cols"]), similarity, budget, eager=False)
        source = EmbeddingScores(rows, cols)
    entry = (source, threading.Lock())
    with _CACHE_LOCK:
        _CACHE[key] = entry
        while len(_CACHE) > CACHE_ENTRIES:
            old, _ = _CACHE.pop(next(iter(_CACHE)))
            for item in _inputs_of(old):
                item.close()
    return entry


@contextmanager
def held(recipe: dict, budget: Budget):
    """The recipe's source, for this task alone while it runs (sources keep per-block state)."""
    source, lock = _source(recipe, budget)
    with lock:
        yield source


def score_file(recipe: dict) -> ScoreFile:
    """The stored scores (and neighbours) a recipe describes (tasks.py, `_score_recipe`), opened here."""
    neighbors = _open(recipe["neighbors"]) if recipe["neighbors"] is not None else None
    return ScoreFile(_open(recipe["scores"]), neighbors, recipe["n_gallery"])


def normaliser(shipped: dict) -> Normaliser:
    """The normaliser as the client shipped it (tasks.py, `_ship_normaliser`)."""
    norm = shipped["norm"]
    if shipped["sorted"] is not None:  # the sorted bank scores of a probe file (gc), read and checked here
        path, dataset, layout = shipped["sorted"]
        norm = replace(norm, sorted_bank=CheckedRows(open_h5(path)[dataset], layout))
    return norm


def numpy_blas() -> tuple[int, str]:
    """The threads (what its products run on) and kernels (what they round like) of the BLAS that
    numpy's products call. Other BLAS libraries in the process (scipy's own, loaded by
    scipy.linalg) compute none of qbnorm's products and would make equal machines look different."""
    from threadpoolctl import threadpool_info

    found = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    # site-packages, holding numpy/ and numpy.libs/; threadpoolctl gives resolved paths, so resolve
    # this one too (a virtual environment reached through a link would otherwise match nothing)
    numpy_dir = os.path.dirname(os.path.dirname(os.path.realpath(np.__file__)))
    own = [i for i in found if os.path.basename(os.path.dirname(i["filepath"])).startswith("numpy")
           and os.path.dirname(os.path.dirname(os.path.realpath(i["filepath"]))) == numpy_dir]
    found = own or found  # a numpy linked against a system BLAS: every BLAS loaded (one, as a rule)
    threads = max([i["num_threads"] for i in found] or [1])
    kernels = ", ".join(sorted({f"{i.get('internal_api')} {i.get('version')} {i.get('architecture') or ''}".strip()
                                for i in found})) or "no BLAS found"
    return threads, kernels
