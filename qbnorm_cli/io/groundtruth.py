"""Ground truth and query masks: which gallery items are relevant to each query, which queries count."""

from __future__ import annotations

import numpy as np

from qbnorm_cli.core import metrics
from qbnorm_cli.errors import DataError, UsageError, param
from qbnorm_cli.io.specs import ArrayInput, as_input


def _integers(values: np.ndarray, label: str) -> np.ndarray:
    if values.dtype.kind in "iub":
        return values.astype(np.int64)
    if values.dtype.kind == "f" and np.all(np.isfinite(values)) and np.all(values == np.round(values)):
        return values.astype(np.int64)
    raise DataError(f"{label}: expected integer gallery indices, got {values.dtype} values")


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
    if queries_per_item < 1:
        raise UsageError(f"{param('queries_per_item')} {queries_per_item}: must be at least 1")
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
    if raw.dtype.kind not in "biuf" or (raw.dtype.kind == "f" and not np.all(np.isin(raw, (0, 1)))):
        raise DataError(f"{mask_in.label}: a query mask holds booleans or 0/1 integers, not {raw.dtype}")
    if len(raw) != n_queries:
        raise DataError(f"{mask_in.label}: {len(raw)} mask entries but there are {n_queries} queries")
    out = raw != 0
    if not out.any():
        raise DataError(f"{mask_in.label}: every query is masked out")
    return out, mask_in
