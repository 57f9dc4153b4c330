"""The cores qbnorm works on: one thread pool shared by the kernels, and BLAS kept out of its way.

numpy releases the GIL inside ufunc loops and BLAS calls, so plain threads run the numpy kernels
on every core. Where each thread does its own matrix products (normalise --top-k), BLAS is limited
to one thread meanwhile: the threads already use every core, and a multi-threaded BLAS call from
each would oversubscribe them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

_POOL: ThreadPoolExecutor | None = None


THREADS_VARIABLE = "QBNORM_THREADS"  # at most this many threads (a cluster's workers sharing a machine)


def workers() -> int:
    """Cores this process may run on (at most $QBNORM_THREADS when that is set)."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        cores = max(1, os.cpu_count() or 1)
    limit = os.environ.get(THREADS_VARIABLE, "")
    return min(cores, int(limit)) if limit.isdigit() and int(limit) > 0 else cores


def pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="qbnorm")
    return _POOL


@contextmanager
def single_threaded_blas():
    """BLAS on one thread inside the block (threadpoolctl), as it was afterwards."""
    from threadpoolctl import threadpool_limits  # scans the loaded libraries: only when needed

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def run_tasks(fn: Callable, items: Iterable) -> Iterator:
    """fn(item) for every item, on all cores when there are several. Results come in the items'
    order, each as soon as it and those before it are done."""
    items = list(items)
    if workers() == 1 or len(items) < 2:
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


def start_row_chunks(n_rows: int, n_items: int, fn, count: int | None = None):
    """Start fn(r0, r1) over row chunks, on all cores when the work is large; returns a function
    that waits for the results (in order). The caller may work meanwhile.

    The chunks are cut for `count` cores (default: this process's): results summed chunk by
    chunk depend on it, so a cluster's task cuts them for the client's cores, whatever its own."""
    count = workers() if count is None else count
    if count == 1 or n_items < PARALLEL_MIN_ITEMS or n_rows < 2 * count:
        done = [fn(0, n_rows)]
        return lambda: done
    step = -(-n_rows // count)
    futures = [pool().submit(fn, r0, min(r0 + step, n_rows)) for r0 in range(0, n_rows, step)]
    return lambda: [f.result() for f in futures]
