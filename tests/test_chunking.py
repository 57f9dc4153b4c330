"""Blocks follow the inputs' HDF5 chunking: every row block read from a chunked (here compressed)
dataset starts on a chunk boundary and spans whole chunks, so no chunk is decompressed twice;
and the results are those of the same data stored contiguously."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from helpers import run

from qbnorm_cli.core.sampling import spread
from qbnorm_cli.io import specs
from qbnorm_cli.streaming.budget import Budget, aligned

CHUNK = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    work = tmp_path_factory.mktemp("chunks")
    rng = np.random.default_rng(3)

    def dyadic(n):  # float32 products of these are exact, whatever the BLAS blocking
        return rng.integers(-8, 9, (n, 16)) / 8

    arrays = {"bank": dyadic(700), "gallery": dyadic(3000), "queries": dyadic(900)}
    with h5py.File(work / "chunked.h5", "w") as h5, h5py.File(work / "plain.h5", "w") as plain:
        for name, arr in arrays.items():
            h5.create_dataset(name, data=arr.astype(np.float32), chunks=(CHUNK, 16), compression="gzip")
            plain[name] = arr.astype(np.float32)
        sims = (arrays["queries"] @ arrays["gallery"].T / 16).astype(np.float32)
        h5.create_dataset("sims", data=sims, chunks=(CHUNK, 500), compression="gzip")
        plain["sims"] = sims
    return work


@pytest.fixture
def reads(monkeypatch):
    """(label, r0, r1) of every row block read through ArrayInput.read."""
    seen = []
    real = specs.ArrayInput.read

    def read(self, r0=0, r1=None, *args, **kwargs):
        seen.append((self.label, r0, self.rows if r1 is None else r1, self.rows))
        return real(self, r0, r1, *args, **kwargs)

    monkeypatch.setattr(specs.ArrayInput, "read", read)
    return seen


def test_spread_picks_distinct_evenly_spaced_rows():
    for total in (0, 1, 2, 7, 16, 17, 100, 12345):
        for count in (1, 2, 16, 256):
            picks = spread(total, count)
            assert picks == np.unique(np.linspace(0, total - 1, num=min(total, count)).astype(np.int64)).tolist()
            assert all(isinstance(p, int) for p in picks)
    assert spread(100, 16)[0] == 0 and spread(100, 16)[-1] == 99 and len(spread(100, 16)) == 16


def test_aligned():
    assert aligned(1000, 64) == 960 and aligned(64, 64) == 64 and aligned(50, 64) == 32 and aligned(6, 87) == 3
    assert aligned(1000, None) == 1000 and Budget(memory=1 << 20).rows(1000, align=64) == 1024


def test_row_blocks_span_whole_chunks(capsys, data, reads, tmp_path):
    src = f"{data}/chunked.h5"
    memory = "2MiB"  # small enough that every input is read in several blocks
    code, _, err = run(capsys, "probe", "--bank", f"{src}::/bank", "--gallery", f"{src}::/gallery",
                       "-o", tmp_path / "probe.h5", "--memory", memory, "-q")
    assert code == 0, err
    for extra in ([], ["--top-k", "7"]):
        code, _, err = run(capsys, "normalise", "--queries", f"{src}::/queries", "--gallery", f"{src}::/gallery",
                           "--probe", tmp_path / "probe.h5", "-o", tmp_path / "out.h5", "--force",
                           "--memory", memory, "-q", *extra)
        assert code == 0, err
    code, _, err = run(capsys, "normalise", "--sims", f"{src}::/sims", "--probe", tmp_path / "probe.h5",
                       "-o", tmp_path / "out.h5", "--force", "--memory", memory, "--top-k", "7", "-q")
    assert code == 0, err
    # single rows are the scale check's sample of evenly spaced rows (the chunk cache holds their chunks)
    blocks = [(label, r0, r1, rows) for label, r0, r1, rows in reads if 1 < r1 - r0 < rows]
    assert len(blocks) > 10, "the budget did not split the inputs into blocks"
    # a block is whole chunks, or lies inside one chunk (tiles smaller than a chunk: cached between them)
    bad = [(label, r0, r1) for label, r0, r1, rows in blocks
           if r0 // CHUNK != (r1 - 1) // CHUNK and (r0 % CHUNK or (r1 % CHUNK and r1 != rows))]
    assert not bad, bad[:5]


@pytest.mark.parametrize("extra", [[], ["--top-k", "7"]])
def test_chunked_and_contiguous_inputs_give_the_same_results(capsys, data, tmp_path, extra):
    outs = []
    for name in ("chunked", "plain"):
        src = f"{data}/{name}.h5"
        probe = tmp_path / f"probe-{name}.h5"
        out = tmp_path / f"out-{name}.h5"
        assert run(capsys, "probe", "--bank", f"{src}::/bank", "--gallery", f"{src}::/gallery", "-o", probe,
                   "--memory", "2MiB", "--similarity", "dot", "-q")[0] == 0
        assert run(capsys, "normalise", "--queries", f"{src}::/queries", "--gallery", f"{src}::/gallery",
                   "--probe", probe, "-o", out, "--memory", "2MiB", "--force", "-q", *extra)[0] == 0
        with h5py.File(out) as h5:
            outs.append({k: h5[k][()] for k in h5})
    for key in outs[0]:
        np.testing.assert_array_equal(outs[0][key], outs[1][key])


def test_rows_held_whole_are_tiled_without_chunk_alignment(data):
    """Queries held in memory cost no reads: their tiles split evenly over the cores instead of
    following the file's chunks. Rows read tile by tile keep to whole chunks."""
    from qbnorm_cli.streaming.sources import Embeddings, EmbeddingScores

    def scores(memory):
        budget = Budget(memory=memory)
        src = f"{data}/chunked.h5"
        return EmbeddingScores(Embeddings(specs.open_array(f"{src}::/queries"), "dot", budget),
                               Embeddings(specs.open_array(f"{src}::/gallery"), "dot", budget, eager=False))

    assert scores(1 << 30).row_chunk is None
    assert scores(100_000).row_chunk == CHUNK  # 900 × 16 float32 queries do not fit a quarter of it
