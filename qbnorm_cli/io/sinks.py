"""Where a command's rows of results go, block by block: into arrays in memory (the library
without `output`) or into the datasets of a qbnorm file (io/atomic.OutputFile), through the same
calls, so that a command writes its loop once for both.

A column is declared once: its width and its dtype in memory and on file (neighbour indices are
int64 in memory, int32 in a file). The file's own attributes and whole-array datasets (written
once the rows are complete) go through `finish`; in memory they are kept for the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qbnorm_cli.io.atomic import OutputFile
from qbnorm_cli.io.probefile import Stored


@dataclass(frozen=True)
class Column:
    """A dataset of one row per result row: `width` values of `dtype` (`file_dtype` in a file)."""

    width: int
    dtype: object
    file_dtype: object | None = None  # None: as in memory

    @property
    def stored(self):
        return self.dtype if self.file_dtype is None else self.file_dtype


class Sink:
    """Rows of results, written block by block to memory (`path` None) or to a qbnorm file of `kind`
    (`file_options`: OutputFile's force, params, inputs, provenance). Use as a context manager: on
    a file, it is the OutputFile's (atomic, removed on any failure or interrupt)."""

    def __init__(self, path, kind: str, n_rows: int, columns: dict[str, Column], **file_options):
        self.path, self.kind, self.n_rows, self.columns = path, kind, n_rows, columns
        self.file_options = file_options
        self.out: OutputFile | None = None
        self.arrays: dict[str, np.ndarray] = {}
        self.attrs: dict = {}
        self.warnings: list[str] = []

    def __enter__(self) -> Sink:
        if self.path is None:
            self.arrays = {name: np.empty((self.n_rows, c.width), dtype=c.dtype) for name, c in self.columns.items()}
            return self
        self.out = OutputFile(str(self.path), self.kind, **self.file_options).__enter__()
        try:
            self.arrays = {name: self.out.create(name, shape=(self.n_rows, c.width), dtype=c.stored)
                           for name, c in self.columns.items()}
        except BaseException as exc:
            self.out.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def write(self, r0: int, name: str, block: np.ndarray) -> None:
        """Rows r0 : r0 + len(block) of column `name`."""
        if self.out is None:
            self.arrays[name][r0:r0 + len(block)] = block
        else:
            self.out.write_rows(self.arrays[name], r0, block.astype(self.columns[name].stored, copy=False))

    def finish(self, data: dict[str, np.ndarray | Stored], attrs: dict, warnings: list[str]) -> None:
        """The output's whole-array datasets (a Stored with its attributes), root attributes (None
        values left out) and warnings."""
        attrs = {name: value for name, value in attrs.items() if value is not None}
        self.attrs, self.warnings = attrs, list(warnings)
        if self.out is None:
            self.arrays.update(data)
            return
        for name, values in data.items():
            if isinstance(values, Stored):
                self.out.create(name, data=values.data, **values.attrs)
            else:
                self.out.create(name, data=values)
        for name, value in attrs.items():
            self.out.h5.attrs[name] = value
        self.out.warnings = self.warnings

    @property
    def uuid(self) -> str | None:
        return None if self.out is None else self.out.uuid

    @property
    def inputs(self) -> tuple:
        return () if self.out is None else tuple(self.out.inputs)

    def __exit__(self, *exc):
        if self.out is not None:
            return self.out.__exit__(*exc)
        return None
