"""Ground truth files: which gallery items are relevant to each query."""

from __future__ import annotations

import numpy as np

from qbnorm_cli.core import metrics
from qbnorm_cli.errors import DataError
from qbnorm_cli.io.files import ArrayInput, open_array


def _integers(values: np.ndarray, label: str) -> np.ndarray:
    if values.dtype.kind in "iub":
        return values.astype(np.int64)
    if values.dtype.kind == "f" and np.all(np.isfinite(values)) and np.all(values == np.round(values)):
        return values.astype(np.int64)
    raise DataError(f"{label}: expected integer gallery indices, got {values.dtype} values")


def read_relevant(spec: str, n_queries: int, galleries: list[tuple[str, int | None]],
                  queries_label: str) -> tuple[np.ndarray, ArrayInput]:
    """(Q, m) relevant gallery indices with −1 padding, from a (Q,) or (Q, m) integer array,
    checked against the query count and every (label, size) gallery it will index."""
    gt_in = open_array(spec, ndim=(1, 2))
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
