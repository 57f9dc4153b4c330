"""Scores to evaluate: a dense similarity matrix (Q × G) or a ranking (each query's top N and their
scores), from a file, an array or a `Ranking`, read in row blocks with their values checked."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qbnorm_cli.core.results import Ranking
from qbnorm_cli.errors import DataError
from qbnorm_cli.io.hdf5 import reading, shown
from qbnorm_cli.io.specs import EMBEDDING_KINDS, ArrayInput, as_input, dataset_input
from qbnorm_cli.io.validate import check_finite

SCORE_KINDS = ("similarity", "ranking")
# How foreign files name embedding matrices (and score matrices): the words of a dataset's name,
# else of a file's stem. A name with a word of each (`query_gallery_sims`) is taken for scores.
EMBEDDING_WORDS = frozenset({"embeddings", "embedding", "embeds", "embs", "emb", "features", "feats", "vectors",
                             "vecs", "queries", "gallery", "bank"})
SCORE_WORDS = frozenset({"sims", "sim", "similarity", "similarities", "scores", "score", "logits", "distances",
                         "dists", "dist", "neighbors", "neighbours", "ranks", "ranking", "knn"})


@dataclass
class ScoreFile:
    """A dense similarity matrix (Q × G) or a ranking (top-N neighbours and their scores)."""

    scores: ArrayInput
    neighbors: ArrayInput | None = None
    n_gallery: int | None = None

    @property
    def label(self) -> str:
        if self.neighbors is not None and self.scores.path is not None:
            return self.scores.path
        return self.scores.label

    @property
    def is_ranking(self) -> bool:
        return self.neighbors is not None

    @property
    def rows(self) -> int:
        return self.scores.rows

    @property
    def listed(self) -> int | None:
        return self.scores.cols if self.is_ranking else None

    @property
    def inputs(self) -> list[ArrayInput]:
        return [self.scores] if self.neighbors is None else [self.neighbors, self.scores]

    def read_scores(self, r0: int, r1: int) -> np.ndarray:
        """Rows r0:r1 in their stored float type (float32 stays float32; no precision lost)."""
        with self.scores.reading(f"rows {r0}:{r1}"):
            block = np.asarray(self.scores.array[r0:r1])
        if block.dtype.kind != "f":
            block = block.astype(np.float64)
        check_finite(block, self.scores.label, r0)
        return block

    def read_neighbors(self, r0: int, r1: int) -> np.ndarray:
        """Rows r0:r1 of the neighbour indices, each in [0, gallery) or −1 (a padded entry)."""
        with self.neighbors.reading(f"rows {r0}:{r1}"):
            block = np.asarray(self.neighbors.array[r0:r1]).astype(np.int64)
        bad = (block < -1) | ((block >= self.n_gallery) if self.n_gallery is not None else False)
        if bad.any():
            row = int(np.argmax(bad.any(axis=1)))
            value = int(block[bad][0])
            message = (f"neighbour index {value} in row {r0 + row} is outside the gallery"
                       f"{f' of {self.n_gallery} items' if self.n_gallery else ''}")
            layout = self.neighbors.layout
            raise layout.error(self.neighbors.dataset, message) if layout is not None else \
                DataError(f"{self.neighbors.label}: {message}")
        return block


def looks_like_embeddings(array: ArrayInput) -> str | None:
    """Why an input given as scores holds embeddings, or None. A qbnorm file says what it holds
    (its `qbnorm_kind`: embeddings or bank); a foreign file says it by name only: its dataset's
    name (else the file's stem) has a word of EMBEDDING_WORDS and none of SCORE_WORDS
    (`data.h5::/train_queries`, `gallery.npy`; not `test_sims.pkl`)."""
    if array.kind in EMBEDDING_KINDS:
        return f"a qbnorm {array.kind} file"
    if array.kind is not None or array.path is None:
        return None
    named = array.dataset.rsplit("/", 1)[-1] if array.dataset else Path(array.path).stem
    words = set(re.split(r"[^a-z0-9]+", named.lower()))
    if words & EMBEDDING_WORDS and not words & SCORE_WORDS:
        return f"{'a dataset' if array.dataset else 'a file'} named {named!r}, {array.rows} × {array.cols}"
    return None


def open_scores(value, name: str = "scores", hint: str = "score them against a gallery first") -> ScoreFile:
    """A similarity or ranking input: a `Ranking`, an array (dense Q × G scores), or a spec of a
    similarity or ranking file (qbnorm's, or a foreign HDF5 file holding /neighbors and /scores of
    one shape, named by its /neighbors dataset). An input that looks like embeddings
    (`looks_like_embeddings`) is refused, saying how to get scores (`hint`)."""
    if isinstance(value, Ranking):
        neighbors = as_input(np.asarray(value.indices), f"{name}.indices")
        scores = as_input(np.asarray(value.scores), f"{name}.scores")
        if neighbors.shape != scores.shape:
            raise DataError(f"{name}: indices {neighbors.shape} and scores {scores.shape} differ in shape")
        return ScoreFile(scores, neighbors, int(value.gallery_rows))
    first = as_input(value, name, kinds=SCORE_KINDS + EMBEDDING_KINDS)
    reason = looks_like_embeddings(first)
    if reason is not None:
        first.close()
        raise DataError(f"{first.label}: the input looks like embeddings ({reason}), not scores; {hint}. Scores "
                        "stored under such a name: qbnorm convert FILE --kind similarity -o SIMS.h5 declares them")
    h5 = first.h5
    with reading(first.label, "its list of datasets"):
        ranking = first.kind == "ranking" or (
            first.kind is None and h5 is not None and first.dataset == "/neighbors" and "/scores" in h5
        )
    if not ranking:
        if first.dtype.kind not in "fiu":
            raise DataError(f"{first.label}: dtype {first.dtype} is not a score type")
        return ScoreFile(first, None, first.cols)
    try:  # the other dataset of the same open file (its schema was checked when `first` was opened)
        other = {name: first if first.dataset == name else
                 dataset_input(h5, first.path, name, kind=first.kind, layout=first.layout, owner=False)
                 for name in ("/neighbors", "/scores")}
    except BaseException:
        first.close()
        raise
    neighbors, scores = other["/neighbors"], other["/scores"]
    if neighbors.dtype.kind not in "iu":
        raise DataError(f"{neighbors.label}: neighbour indices must be integers, not {neighbors.dtype}")
    if neighbors.shape != scores.shape:
        raise DataError(f"{first.path}: /neighbors {neighbors.shape} and /scores {scores.shape} differ in shape")
    gallery = first.attrs.get("gallery_rows")  # a qbnorm file's is checked by its schema; a foreign one's here
    if isinstance(gallery, float) and gallery.is_integer():
        gallery = int(gallery)
    if gallery is not None and (isinstance(gallery, bool) or not isinstance(gallery, int) or gallery < 1):
        raise DataError(f"{first.path}: attribute gallery_rows: expected a positive whole number, got {shown(gallery)}")
    return ScoreFile(scores, neighbors, gallery)
