"""streaming.parallel: BLAS kept on one thread inside the pool's blocks, and as it was afterwards."""

from __future__ import annotations

import sys

from threadpoolctl import threadpool_info

from qbnorm_cli.streaming import parallel


def blas_threads() -> list[int]:
    return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]


def test_blas_is_single_threaded_inside_the_block_and_restored_after():
    before = blas_threads()
    with parallel.single_threaded_blas():
        assert blas_threads() and set(blas_threads()) == {1}
    assert blas_threads() == before
    limit = parallel.blas_limiter()
    with limit():
        assert parallel.workers() == 1 or set(blas_threads()) == {1}
    assert blas_threads() == before


def test_the_libraries_are_looked_up_again_once_modules_were_imported(monkeypatch):
    """The controller is kept while no module was imported since (a scan of the libraries costs up
    to 1.5 ms per block), and made again after an import, which may have loaded a library."""
    first = parallel.blas_libraries(len(sys.modules))
    assert parallel.blas_libraries(len(sys.modules)) is first
    monkeypatch.setitem(sys.modules, "qbnorm_test_imported_since", object())
    assert parallel.blas_libraries(len(sys.modules)) is not first
