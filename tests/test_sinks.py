"""io/sinks.Sink: a command's rows of results written block by block through the same calls to
memory or to a qbnorm file; the file is atomic (nothing left on a failure) and carries the
attributes, whole-array datasets and warnings given at the end."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from helpers import leftovers

import qbnorm_cli
from qbnorm_cli.io.sinks import Column, Sink

COLUMNS = {"/scores": Column(3, np.float32), "/neighbors": Column(3, np.int64, np.int32)}


def fill(sink: Sink, scores: np.ndarray, neighbors: np.ndarray) -> None:
    for r0 in range(0, len(scores), 4):
        sink.write(r0, "/scores", scores[r0:r0 + 4])
        sink.write(r0, "/neighbors", neighbors[r0:r0 + 4])
    sink.finish({"/normalised": np.arange(len(scores)) % 2 == 0}, {"method": "dis", "recall": None}, ["a warning"])


def test_memory_and_file_hold_the_same_rows(tmp_path):
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((10, 3))
    neighbors = rng.integers(0, 50, (10, 3))
    with Sink(None, "ranking", 10, COLUMNS) as memory:
        fill(memory, scores, neighbors)
    assert memory.uuid is None and memory.inputs == () and memory.attrs == {"method": "dis"}
    assert memory.arrays["/scores"].dtype == np.float32 and memory.arrays["/neighbors"].dtype == np.int64
    out = tmp_path / "r.h5"
    with Sink(out, "ranking", 10, COLUMNS, force=False, params={"top_k": 3}, inputs=[]) as written:
        fill(written, scores, neighbors)
    with h5py.File(out, "r") as h5:
        assert h5["/neighbors"].dtype == np.int32 and h5["/scores"].dtype == np.float32
        for name, values in memory.arrays.items():
            np.testing.assert_array_equal(h5[name][()], values)
        assert h5.attrs["method"] == "dis" and "recall" not in h5.attrs
        assert json.loads(h5.attrs["warnings"]) == ["a warning"] and h5.attrs["uuid"] == written.uuid
    assert leftovers(tmp_path) == []


def test_a_failure_inside_leaves_no_file(tmp_path):
    out = tmp_path / "r.h5"
    with pytest.raises(ValueError, match="midway"):
        with Sink(out, "ranking", 10, COLUMNS, force=False, params={}, inputs=[]) as sink:
            sink.write(0, "/scores", np.zeros((4, 3)))
            raise ValueError("midway")
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("top_k", [None, 5])
def test_normalise_returns_what_it_writes(tmp_path, top_k):
    """normalise writes through one Sink: its in-memory result and its file hold the same arrays."""
    rng = np.random.default_rng(3)
    bank, gallery, queries = (rng.standard_normal((n, 8)) for n in (60, 30, 20))
    probe = qbnorm_cli.probe(bank, gallery, betas=[20.0])
    options = {"method": "dis", "top_k": top_k, "dtype": "float32", "block_rows": 7}
    result = qbnorm_cli.normalise(queries, gallery, probe, **options)
    written = qbnorm_cli.normalise(queries, gallery, probe, output=tmp_path / "out.h5", **options)
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        stored = {name: h5[name][()] for name in h5}
        attrs = dict(h5.attrs)
    np.testing.assert_array_equal(stored["normalised"], written.normalised)
    assert written.normalised.any() and not written.normalised.all()  # the gate chose some rows
    assert attrs["method"] == "dis" and attrs["gallery_rows"] == 30
    if top_k is None:
        assert set(stored) == {"scores", "normalised"} and result.dtype == np.float32
        np.testing.assert_array_equal(stored["scores"], result)
        return
    assert set(stored) == {"scores", "neighbors", "normalised"}
    assert result.indices.dtype == np.int64 and stored["neighbors"].dtype == np.int32
    np.testing.assert_array_equal(stored["neighbors"], result.indices)
    np.testing.assert_array_equal(stored["scores"], result.scores)
    np.testing.assert_array_equal(stored["normalised"], result.normalised)
