"""Seeded synthetic inputs, written in row chunks so that generating never holds a whole file.

Embeddings: unit rows around a few shared directions (so that some gallery items are hubs, as in
real retrieval); queries are noisy copies of gallery items. Similarity matrices: the float32
products of such embeddings in a low dimension, written as HDF5 files with one 2-D dataset (the
form `qbnorm --sims/--bank-sims` and the official code take).
"""

from __future__ import annotations

import h5py
import numpy as np

CHUNK_ROWS = 8192


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _centres(dim: int, seed: int, n: int = 8) -> np.ndarray:
    return _unit(np.random.default_rng([seed, 999]).standard_normal((n, dim)))


def gallery_rows(r0: int, r1: int, dim: int, seed: int) -> np.ndarray:
    """Rows r0:r1 of a gallery: each row is the same whatever the chunking (seeded per chunk)."""
    out = np.empty((r1 - r0, dim), dtype=np.float32)
    centres = _centres(dim, seed)
    for c0 in range(r0 - r0 % CHUNK_ROWS, r1, CHUNK_ROWS):
        rng = np.random.default_rng([seed, c0])
        z = rng.standard_normal((CHUNK_ROWS, dim)).astype(np.float32)
        z += 1.5 * centres[rng.integers(0, len(centres), CHUNK_ROWS)] * np.sqrt(dim / 64)
        a, b = max(r0, c0), min(r1, c0 + CHUNK_ROWS)
        out[a - r0:b - r0] = z[a - c0:b - c0]
    return _unit(out)


def query_rows(r0: int, r1: int, dim: int, seed: int, n_gallery: int, per_item: int,
               noise_seed: int = 7) -> np.ndarray:
    """Query i is a noisy copy of item (i // per_item) mod n_gallery of the gallery of `seed`."""
    targets = (np.arange(r0, r1) // per_item) % n_gallery
    rng = np.random.default_rng([seed, r0, noise_seed])
    base = np.empty((r1 - r0, dim), dtype=np.float32)
    for t0 in range(0, len(targets), CHUNK_ROWS):
        part = targets[t0:t0 + CHUNK_ROWS]
        lo, hi = int(part.min()), int(part.max()) + 1
        if hi - lo <= 4 * CHUNK_ROWS:
            base[t0:t0 + len(part)] = gallery_rows(lo, hi, dim, seed)[part - lo]
        else:  # wrapped around the gallery: fetch row by row range
            for j, tgt in enumerate(part):
                base[t0 + j] = gallery_rows(int(tgt), int(tgt) + 1, dim, seed)[0]
    noise = rng.standard_normal(base.shape).astype(np.float32) * 1.5 / np.sqrt(dim)
    return _unit(base + noise)


def write_embeddings(path: str, n: int, dim: int, seed: int, *, queries_of: int | None = None,
                     per_item: int = 1, noise_seed: int = 7) -> None:
    """n × dim unit rows in /embeddings: a gallery, or (queries_of=n_gallery) queries of one."""
    with h5py.File(path, "w") as h5:
        ds = h5.create_dataset("embeddings", shape=(n, dim), dtype=np.float32,
                               chunks=(min(n, max(1, (1 << 20) // (4 * dim))), dim))
        for r0 in range(0, n, CHUNK_ROWS):
            r1 = min(n, r0 + CHUNK_ROWS)
            if queries_of is None:
                ds[r0:r1] = gallery_rows(r0, r1, dim, seed)
            else:
                ds[r0:r1] = query_rows(r0, r1, dim, seed, queries_of, per_item, noise_seed)


def write_similarities(path: str, n_rows: int, n_gallery: int, seed: int, *, per_item: int,
                       noise_seed: int, dim: int = 64) -> None:
    """n_rows × n_gallery float32 cosine similarities of low-dimensional embeddings (/scores,
    contiguous, as a script saving a numpy matrix would write it)."""
    gallery = gallery_rows(0, n_gallery, dim, seed)
    with h5py.File(path, "w") as h5:
        ds = h5.create_dataset("scores", shape=(n_rows, n_gallery), dtype=np.float32)
        for r0 in range(0, n_rows, CHUNK_ROWS):
            r1 = min(n_rows, r0 + CHUNK_ROWS)
            ds[r0:r1] = query_rows(r0, r1, dim, seed, n_gallery, per_item, noise_seed) @ gallery.T


def write_layout(source: str, path: str, layout: str) -> None:
    """A copy of `source`'s /scores chunked by whole rows of about 1 MiB (`rows`, as qbnorm writes
    its outputs) or in 256 × 256 tiles (`tiles`)."""
    with h5py.File(source, "r") as src, h5py.File(path, "w") as dst:
        scores = src["scores"]
        n, m = scores.shape
        chunks = (max(1, min(n, (1 << 20) // (4 * m))), m) if layout == "rows" else (min(n, 256), min(m, 256))
        ds = dst.create_dataset("scores", shape=(n, m), dtype=np.float32, chunks=chunks)
        for r0 in range(0, n, CHUNK_ROWS):
            ds[r0:r0 + CHUNK_ROWS] = scores[r0:r0 + CHUNK_ROWS]


def write_transposed(source: str, path: str, layout: str = "rows") -> None:
    """source's /scores transposed (m × n), chunked by whole rows: read in column strips."""
    with h5py.File(source, "r") as src, h5py.File(path, "w") as dst:
        scores = src["scores"]
        n, m = scores.shape
        ds = dst.create_dataset("scores", shape=(m, n), dtype=np.float32,
                                chunks=(max(1, min(m, (1 << 20) // (4 * n))), n))
        step = max(1, (64 << 20) // (4 * n))
        for c0 in range(0, m, step):
            ds[c0:c0 + step] = scores[:, c0:c0 + step].T
