"""What every library entry point shares: score sources from embeddings or precomputed scores,
option checks that name the caller's parameters, warnings, progress and provenance."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

from qbnorm_cli.errors import DataError, QbnormWarning, UsageError, param
from qbnorm_cli.io.specs import EMBEDDING_KINDS, SIMILARITY_KINDS, ArrayInput, as_input
from qbnorm_cli.streaming import cluster as clustering
from qbnorm_cli.streaming.budget import Budget
from qbnorm_cli.streaming.sources import SIMILARITIES, Embeddings, EmbeddingScores, MatrixScores


@contextmanager
def no_progress(description: str, total: int | None, unit: str = "rows", per: int = 1):
    """The progress protocol, doing nothing: a context manager yielding advance(n, note=None) for n
    items (`note`: where work of no known end stands, e.g. an error against its tolerance; total None)."""
    yield lambda n, note=None: None


def progress_or_none(progress):
    return no_progress if progress is None else progress


def warn(message: str | None) -> None:
    """Issue a QbnormWarning (the caller's warning filters decide what is shown)."""
    if message:
        warnings.warn(QbnormWarning(message), stacklevel=3)


def check_choice(value: str, choices, name: str) -> str:
    if value not in choices:
        raise UsageError(f"{param(name)} {value!r}: choose one of {', '.join(choices)}")
    return value


def check_count(value: int, name: str, upper: int, what: str) -> int:
    if value < 1:
        raise UsageError(f"{param(name)} {value}: must be at least 1")
    if value > upper:
        raise UsageError(f"{param(name)} {value}: larger than the {what} ({upper})")
    return value


def other_gallery(probe, identity: str | None, label: str, accept_mismatch: bool) -> str | None:
    """A probe made from another gallery than `identity` (same size, other data) is refused, or with
    `accept_mismatch` used anyway: then the warning to issue and record (None when they agree)."""
    probed = probe.attrs.get("gallery_identity")
    if not (probed and identity and probed != identity):
        return None
    message = f"{probe.label} was made from another gallery than {label} (identity differs)"
    if not accept_mismatch:
        raise DataError(f"{message}; pass {param('accept_mismatch=True')} to use it anyway")
    return f"{message}; used anyway ({param('accept_mismatch=True')})"


def embeddings(value, name: str) -> ArrayInput:
    return as_input(value, name, kinds=EMBEDDING_KINDS)


TRANSPOSE_PANEL_SHARE = 8  # a transposed HDF5 read holds a panel of 1/8 of the budget (io.specs.Transposed)


def panel_bytes(budget: Budget | None) -> int:
    """The panel a transposed read may hold: an eighth of the budget (none when blocks are fixed)."""
    return budget.memory // TRANSPOSE_PANEL_SHARE if budget is not None and budget.block_rows is None else 0


def similarities(value, name: str, transpose: bool = False, budget: Budget | None = None) -> ArrayInput:
    """A precomputed score matrix; with `transpose`, read transposed (rows ↔ columns), in column
    blocks of the stored matrix served from panels of an eighth of the budget."""
    return as_input(value, name, kinds=SIMILARITY_KINDS, transpose=transpose, panel_bytes=panel_bytes(budget))


def no_transpose(transpose: bool, sims_name: str) -> None:
    if transpose:
        raise UsageError(f"{param('transpose=True')} reads precomputed scores transposed; give {param(sims_name)} "
                         "(embeddings are compared as given)")


def one_of(a, b, name_a: str, name_b: str) -> None:
    if a is not None and b is not None:
        raise UsageError(f"give either {param(name_a)} or {param(name_b)}, not both")


def score_source(rows, cols, sims, *, rows_name: str, cols_name: str, sims_name: str, similarity: str,
                 budget: Budget, what: str, eager_cols: bool = True, cols_embeddings: Embeddings | None = None,
                 transpose: bool = False, eager: bool = True):
    """Scores of `rows` × `cols` embeddings (cosine or dot), or the precomputed `sims` (read
    transposed with `transpose`): (source, inputs, the columns' Embeddings or None). eager=False
    reads nothing yet (a cluster's workers read the data)."""
    if sims is not None:
        if rows is not None or cols is not None:
            raise UsageError(f"give either {param(sims_name)} or {param(rows_name)} with {param(cols_name)}, not both")
        sims_in = similarities(sims, sims_name, transpose, budget)
        return MatrixScores(sims_in, budget), [sims_in], None
    no_transpose(transpose, sims_name)
    if rows is None or (cols is None and cols_embeddings is None):
        raise UsageError(f"{what} needs {param(rows_name)} and {param(cols_name)} (or {param(sims_name)})")
    check_choice(similarity, SIMILARITIES, "similarity")
    rows_in = embeddings(rows, rows_name)
    inputs = [rows_in]
    if cols_embeddings is None:
        cols_in = embeddings(cols, cols_name)
        inputs.append(cols_in)
        cols_embeddings = Embeddings(cols_in, similarity, budget, eager=eager_cols and eager)
    scores = EmbeddingScores(Embeddings(rows_in, similarity, budget, eager=eager), cols_embeddings)
    return scores, inputs, cols_embeddings


def check_columns(source_input: ArrayInput, n_gallery: int, what: str) -> None:
    if source_input.cols != n_gallery:
        raise DataError(f"{source_input.label} has {source_input.cols} columns but {what} has {n_gallery} items")


@contextmanager
def clustered(cluster):
    """A session on the dask cluster `cluster` (streaming.cluster), or None: run here."""
    if cluster is None:
        yield None
        return
    with clustering.connect(cluster) as session:
        yield session
