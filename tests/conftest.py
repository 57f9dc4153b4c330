"""Shared test data and helpers: float32-exact random score matrices, embeddings, a CLI runner."""

from __future__ import annotations

import json
from dataclasses import dataclass

import h5py
import numpy as np
import pytest
from helpers import run

N_BANK, N_GALLERY, N_QUERIES, N_GALLERY_BANK, DIM = 37, 23, 19, 29, 8


def f32_exact(a) -> np.ndarray:
    """float64 values that float32 represents exactly (the package reads every score as float32)."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


@dataclass(frozen=True)
class Scores:
    """P (bank × gallery), S (queries × gallery), H (gallery bank × gallery), all float32-exact."""

    name: str
    P: np.ndarray
    S: np.ndarray
    H: np.ndarray


def hubs(columns) -> np.ndarray:
    """A per-column bias that makes a few gallery items hubs (so top-k activation sets stay partial)."""
    bias = np.zeros(N_GALLERY)
    bias[list(columns)] = 0.8
    return bias


def random_scores(seed: int = 0) -> Scores:
    rng = np.random.default_rng(seed)
    return Scores(
        "random",
        f32_exact(rng.uniform(-1, 1, (N_BANK, N_GALLERY)) + hubs([1, 6, 11, 15, 22])),
        f32_exact(rng.uniform(-1, 1, (N_QUERIES, N_GALLERY))),
        f32_exact(rng.uniform(-1, 1, (N_GALLERY_BANK, N_GALLERY)) + hubs([0, 6, 13, 19])),
    )


def tied_scores(seed: int = 1) -> Scores:
    """Integer-valued scores, full of ties: duplicated gallery columns, constant rows and columns."""
    rng = np.random.default_rng(seed)
    P = (rng.integers(0, 4, (N_BANK, N_GALLERY)) + (hubs([2, 8, 14]) > 0)).astype(np.float64)
    S = rng.integers(0, 4, (N_QUERIES, N_GALLERY)).astype(np.float64)
    H = (rng.integers(0, 4, (N_GALLERY_BANK, N_GALLERY)) + (hubs([1, 5, 14]) > 0)).astype(np.float64)
    for M in (P, S, H):
        M[:, 17] = M[:, 3]  # identical columns far apart: exact ties in every method
        M[:, 20] = M[:, 2]
        M[:, 9] = 2.0       # a constant column
    P[5] = 3.0              # a constant bank row: its top-k is the lowest indices
    S[4] = 1.0              # a constant query row: raw top-1 is item 0
    S[7, [3, 17]] = 3.0     # a tied raw top-1 across duplicated columns
    S[7, [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 19, 20, 21, 22]] = 0.0
    return Scores("ties", P, S, H)


@dataclass(frozen=True)
class Embeds:
    """Dyadic embeddings whose dot products float32 computes exactly."""

    bank: np.ndarray
    gallery: np.ndarray
    queries: np.ndarray
    gallery_bank: np.ndarray

    def scores(self) -> Scores:
        g = self.gallery.astype(np.float64)
        return Scores("embeddings", self.bank.astype(np.float64) @ g.T, self.queries.astype(np.float64) @ g.T,
                      self.gallery_bank.astype(np.float64) @ g.T)


def dyadic_embeddings(seed: int = 2) -> Embeds:
    rng = np.random.default_rng(seed)

    def draw(n):
        return (rng.integers(-16, 17, (n, DIM)) / 16).astype(np.float32)

    return Embeds(draw(N_BANK), draw(N_GALLERY), draw(N_QUERIES), draw(N_GALLERY_BANK))


@pytest.fixture(scope="session")
def rnd() -> Scores:
    return random_scores()


@pytest.fixture(scope="session")
def ties() -> Scores:
    return tied_scores()


@pytest.fixture(scope="session")
def emb() -> Embeds:
    return dyadic_embeddings()


class Cli:
    """Runs `qbnorm ARGS` in-process; returns (exit code, stdout, stderr)."""

    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, *args) -> tuple[int, str, str]:
        return run(self.capsys, *args)

    def ok(self, *args) -> str:
        code, out, err = self(*args)
        assert code == 0, f"qbnorm {' '.join(map(str, args))} exited {code}: {err}"
        return out


@pytest.fixture
def cli(capsys) -> Cli:
    return Cli(capsys)


def read_h5(path) -> dict:
    """Every dataset of an HDF5 file and its root attributes (JSON attributes decoded)."""
    out = {}
    with h5py.File(path, "r") as h5:
        h5.visititems(lambda name, obj: out.__setitem__("/" + name, obj[()]) if isinstance(obj, h5py.Dataset)
                      else None)
        attrs = {}
        for key, value in h5.attrs.items():
            value = value.decode() if isinstance(value, bytes) else value
            attrs[key] = json.loads(value) if key in ("params", "inputs") else value
        out["attrs"] = attrs
    return out
