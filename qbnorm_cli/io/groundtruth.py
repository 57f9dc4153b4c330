"""Ground truth and query masks: which gallery items are relevant to each query, which queries count."""

from __future__ import annotations

import numpy as np

from qbnorm_cli.core import metrics
from qbnorm_cli.errors import DataError, UsageError, param
from qbnorm_cli.io.specs import ArrayInput, as_input
from qbnorm_cli.methods import Parameter

QUERIES_PER_ITEM = Parameter("queries_per_item", int, "captions per item, stored contiguously", minimum=1)
INDEX_MAX = 2**62  # beyond any gallery; below where float64 and uint64 values stop converting to int64 exactly


def _first(bad: np.ndarray, values: np.ndarray) -> tuple[int, float]:
    """(row, value) of the first entry `bad` marks."""
    flat_bad, flat = bad.reshape(len(values), -1), values.reshape(len(values), -1)
    row = int(np.argmax(flat_bad.any(axis=1)))
    return row, float(flat[row][flat_bad[row]][0])


def _integers(values: np.ndarray, label: str) -> np.ndarray:
    """Gallery indices as int64, exactly: booleans (a mask, not indices), fractions, NaN, and
    values no int64 holds are refused naming the first row (before conversion, which would wrap
    a uint64 ≥ 2⁶³ or 1e20 into a negative number)."""
    kind = values.dtype.kind
    if kind == "b":
        raise DataError(f"{label}: booleans are not gallery indices (a relevance mask? give each query's relevant "
                        "item indices, −1 padding)")
    if kind not in "iuf":
        raise DataError(f"{label}: expected integer gallery indices, got {values.dtype} values")
    if kind == "f":
        with np.errstate(invalid="ignore"):
            fraction = ~np.isfinite(values) | (values != np.round(values))
        if fraction.any():
            row, value = _first(fraction, values)
            raise DataError(f"{label}: expected integer gallery indices, got {values.dtype} value {value:g} "
                            f"in row {row}")
    if kind in "uf":
        huge = np.abs(values) > INDEX_MAX
        if huge.any():
            row, value = _first(huge, values)
            raise DataError(f"{label}: gallery index {value:.6g} in row {row} is outside any gallery")
    return values.astype(np.int64)


def read_relevant(gt, n_queries: int, galleries: list[tuple[str, int | None]],
                  queries_label: str) -> tuple[np.ndarray, ArrayInput]:
    """(Q, m) relevant gallery indices with −1 padding, from a (Q,) or (Q, m) integer array (or
    its spec), checked against the query count and every (label, size) gallery it will index."""
    gt_in = as_input(gt, "gt", ndim=(1, 2))
    values = _integers(gt_in.read_raw(), gt_in.label)
    if len(values) != n_queries:
        raise DataError(f"{gt_in.label}: {len(values)} ground-truth rows but {queries_label} has {n_queries} queries")
    relevant = metrics.as_relevant(values)
    if np.any(relevant < -1):
        row = int(np.argmax((relevant < -1).any(axis=1)))
        raise DataError(f"{gt_in.label}: negative gallery index in row {row} (only −1 pads a row)")
    for label, size in galleries:
        if size is not None and np.any(relevant >= size):
            row = int(np.argmax((relevant >= size).any(axis=1)))
            raise DataError(f"{gt_in.label}: gallery index {int(relevant[row].max())} in row {row} is outside "
                            f"the gallery of {size} items of {label}")
    return relevant, gt_in


def ground_truth(gt, queries_per_item: int | None, n_queries: int,
                 galleries: list[tuple[str, int | None]], queries_label: str) -> tuple[np.ndarray, ArrayInput | None]:
    """(Q, m) relevant gallery indices (−1 padding) from exactly one of `gt` and
    `queries_per_item` (the contiguous layout: query i ↔ item i // N), checked against every
    (label, size) gallery."""
    if (gt is None) == (queries_per_item is None):
        raise UsageError(f"give the ground truth with exactly one of {param('gt')} or {param('queries_per_item')}")
    if queries_per_item is None:
        return read_relevant(gt, n_queries, galleries, queries_label)
    queries_per_item = QUERIES_PER_ITEM.check(queries_per_item)
    relevant = metrics.contiguous_relevant(n_queries, queries_per_item)
    needed = -(-n_queries // queries_per_item)
    for label, size in galleries:
        if size is not None and needed > size:
            raise DataError(f"{param('queries_per_item')} {queries_per_item}: {n_queries} queries need {needed} "
                            f"gallery items but {label} has {size}")
    return relevant, None


def query_mask(mask, n_queries: int) -> tuple[np.ndarray, ArrayInput | None]:
    """The (Q,) bool mask of the queries that count (all of them when `mask` is None)."""
    if mask is None:
        return np.ones(n_queries, dtype=bool), None
    mask_in = as_input(mask, "query_mask", ndim=(1,))
    raw = mask_in.read_raw()
    if raw.dtype.kind not in "biuf":
        raise DataError(f"{mask_in.label}: a query mask holds booleans or 0/1 integers, not {raw.dtype}")
    if raw.dtype.kind != "b" and not np.isin(raw, (0, 1)).all():
        entry = int(np.argmax(~np.isin(raw, (0, 1))))
        raise DataError(f"{mask_in.label}: entry {entry} is {raw[entry]!r}; a query mask holds booleans or 0/1 "
                        "(1: the query counts)")
    if len(raw) != n_queries:
        raise DataError(f"{mask_in.label}: {len(raw)} mask entries but there are {n_queries} queries")
    out = raw != 0
    if not out.any():
        raise DataError(f"{mask_in.label}: every query is masked out")
    return out, mask_in
