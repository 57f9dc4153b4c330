"""The cores qbnorm works on: one thread pool shared by the kernels, and BLAS kept out of its way.

numpy releases the GIL inside ufunc loops and BLAS calls, so plain threads run the numpy kernels
on every core. Where each thread does its own matrix products (normalise --top-k), BLAS is limited
to one thread meanwhile: the threads already use every core, and a multi-threaded BLAS call from
each would oversubscribe them.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar

_POOL: ThreadPoolExecutor | None = None


THREADS_VARIABLE = "QBNORM_THREADS"  # at most this many threads (a cluster's workers sharing a machine)
_PLANNED: ContextVar[int | None] = ContextVar("qbnorm_planned_workers", default=None)


def cores() -> int:
    """Cores this process may run on (at most $QBNORM_THREADS when that is set): its threads."""
    try:
        found = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        found = max(1, os.cpu_count() or 1)
    limit = os.environ.get(THREADS_VARIABLE, "")
    return min(found, int(limit)) if limit.isdigit() and int(limit) > 0 else found


def workers() -> int:
    """The cores the work is cut for: this process's, or inside `planned_for(n)` those of the
    machine a cluster's task reproduces. Sums split into row chunks, and whether BLAS runs on one
    thread under run_tasks, depend on it (and results with them); how many threads then do the
    work (`cores`) does not."""
    return _PLANNED.get() or cores()


@contextmanager
def planned_for(count: int):
    """Cut the work in this block (this thread) as a process with `count` cores would."""
    token = _PLANNED.set(count)
    try:
        yield
    finally:
        _PLANNED.reset(token)


def pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=cores(), thread_name_prefix="qbnorm")
    return _POOL


@functools.lru_cache(maxsize=1)
def blas_libraries(modules: int):
    """threadpoolctl's controller of the loaded libraries: a scan of them costs 0.1 ms in a bare
    process and 1.5 ms with faiss, pyarrow and dask loaded, so it is made again only when modules
    (and with them native libraries) have been imported since (`modules`: how many are loaded)."""
    from threadpoolctl import ThreadpoolController  # only when needed

    return ThreadpoolController()


@contextmanager
def single_threaded_blas():
    """BLAS on one thread inside the block (threadpoolctl), as it was afterwards."""
    with blas_libraries(len(sys.modules)).limit(limits=1, user_api="blas"):
        yield


def blas_limiter() -> Callable:
    """A context factory that keeps BLAS on one thread inside its blocks, for kernels that run
    their own small products on every core (start_row_chunks)."""
    if workers() == 1:
        return nullcontext
    controller = blas_libraries(len(sys.modules))
    return lambda: controller.limit(limits=1, user_api="blas")


def threads_for(count: int) -> bool:
    """Whether run_tasks runs `count` items on the pool (BLAS on one thread), or here in turn."""
    return workers() > 1 and count >= 2


def run_tasks(fn: Callable, items: Iterable, threaded: bool | None = None) -> Iterator:
    """fn(item) for every item, on all cores when there are several. Results come in the items'
    order, each as soon as it and those before it are done. `threaded` overrides
    threads_for(len(items)): BLAS runs on one thread under the pool (a product rounds otherwise
    on several), so a cluster's task with some of a run's items decides as the whole run did."""
    items = list(items)
    if not (threads_for(len(items)) if threaded is None else threaded):
        for item in items:
            yield fn(item)
        return
    with single_threaded_blas():
        futures = [pool().submit(fn, item) for item in items]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:  # on an error or interrupt: start nothing more, wait for the rest
                future.cancel()
            for future in futures:
                if not future.cancelled():
                    future.exception()


# Tiles at least this large are exponentiated by all cores (numpy releases the GIL in ufuncs).
PARALLEL_MIN_ITEMS = 1 << 18


def start_row_chunks(n_rows: int, n_items: int, fn):
    """Start fn(r0, r1) over row chunks, on all cores when the work is large; returns a function
    that waits for the results (in order). The caller may work meanwhile. The chunks are cut for
    `workers()` cores: results summed chunk by chunk depend on it."""
    count = workers()
    if count == 1 or n_items < PARALLEL_MIN_ITEMS or n_rows < 2 * count:
        done = [fn(0, n_rows)]
        return lambda: done
    step = -(-n_rows // count)
    futures = [pool().submit(fn, r0, min(r0 + step, n_rows)) for r0 in range(0, n_rows, step)]
    return lambda: [f.result() for f in futures]
