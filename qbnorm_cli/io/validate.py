"""Checks of array values and shapes as they are read: one line naming the input and the first bad row."""

from __future__ import annotations

import numpy as np

from qbnorm_cli.errors import DataError

NUMERIC_KINDS = "biuf"
_F32_MAX = float(np.finfo(np.float32).max)


def check_finite(block: np.ndarray, label: str, row_offset: int = 0) -> None:
    """Refuse NaN or Inf, naming the first row that holds one."""
    if not np.isfinite(block).all():
        bad = ~np.isfinite(block)
        row = int(np.argmax(bad.reshape(bad.shape[0], -1).any(axis=1))) if bad.ndim > 1 else int(np.argmax(bad))
        raise DataError(f"{label}: non-finite value (NaN or Inf) in row {row_offset + row}")


def as_float32(block: np.ndarray, label: str, rows: int | np.ndarray = 0) -> np.ndarray:
    """`block` as float32, deliberately: integers and float16/float64 are converted; NaN/Inf, and
    float64 values beyond float32's range, are refused naming the first offending row.

    `rows` is the row number of block[0], or the row numbers of every row of the block.
    """
    block = np.asarray(block)
    if block.dtype.kind == "f":
        bad = ~np.isfinite(block)
        if block.dtype.itemsize > 4:
            with np.errstate(invalid="ignore"):
                bad |= np.abs(block) > _F32_MAX
        if bad.any():
            local = int(np.argmax(bad.reshape(bad.shape[0], -1).any(axis=1))) if bad.ndim > 1 else int(np.argmax(bad))
            row = int(rows[local]) if np.ndim(rows) else int(rows) + local
            value = block.reshape(block.shape[0], -1)[local] if block.ndim > 1 else block[local:local + 1]
            what = "NaN or Inf" if not np.isfinite(value).all() else "too large for float32"
            raise DataError(f"{label}: non-finite value ({what}) in row {row}")
    return block.astype(np.float32, copy=False)


def check_array(arr, label: str, ndim: tuple[int, ...], numeric: bool = True) -> None:
    """Refuse a non-numeric dtype, the wrong number of dimensions, or an empty array."""
    if numeric and arr.dtype.kind not in NUMERIC_KINDS:
        raise DataError(f"{label}: dtype {arr.dtype} is not numeric")
    if arr.ndim not in ndim:
        want = " or ".join(f"{n}-D" for n in ndim)
        raise DataError(f"{label}: expected a {want} array, got shape {tuple(arr.shape)}")
    if any(n == 0 for n in arr.shape):
        raise DataError(f"{label}: empty array, shape {tuple(arr.shape)}")


def check_written(label: str, block: np.ndarray, row_offset: int = 0) -> None:
    """The last line of defence before a block is written: an output never holds NaN or Inf
    (scores that overflowed their dtype: parameters or inputs far outside their ranges)."""
    if block.dtype.kind == "f" and block.size and not (np.isfinite(block.min()) and np.isfinite(block.max())):
        bad = ~np.isfinite(block)
        row = int(np.argmax(bad.reshape(bad.shape[0], -1).any(axis=1))) if bad.ndim > 1 else int(np.argmax(bad))
        raise DataError(f"{label}: row {row_offset + row} would hold a non-finite value (NaN or Inf: the results "
                        f"overflow {block.dtype}); nothing was written: check the inputs' scale and the parameters")
