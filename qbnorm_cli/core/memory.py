"""Fresh arrays whose memory is mapped up front (large arrays about to be written whole)."""

from __future__ import annotations

import errno
import mmap

import numpy as np

MAPPED_FROM = 4 << 20  # bytes: numpy advises arrays from 4 MiB on as huge pages; smaller ones are plain


def mapped_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A fresh writable array (its contents undefined) whose memory is mapped in one call, for a large array that is
    about to be written whole (an update's final gallery, a probe record read whole, a Sinkhorn run's held
    kernels and scores).

    Why: numpy advises its large arrays as transparent huge pages, and where the kernel compacts on
    such a fault (defrag=madvise) the first touch of 200 MB took 0.33-0.46 s here; faulting 4 KiB
    pages one by one took 0.12 s; MAP_POPULATE maps them all at once in 0.06 s. Without
    MAP_POPULATE (not Linux) it is a plain np.empty."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    populate = getattr(mmap, "MAP_POPULATE", None)
    if populate is None or nbytes == 0:
        return np.empty(shape, dtype=dtype)
    try:
        memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    except OSError as exc:  # as np.empty says it: the commands turn it into their out-of-memory line
        if exc.errno == errno.ENOMEM:
            raise MemoryError(f"cannot map {nbytes} bytes") from None
        raise
    return np.frombuffer(memory, dtype=dtype).reshape(shape)  # the array keeps the mapping alive
