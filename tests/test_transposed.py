"""Similarity inputs read transposed (`--transpose`, transpose=True): the same numbers as reading a
transposed copy, for every storage layout and under budgets small enough to split every read."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

import qbnorm_cli
from qbnorm_cli import UsageError
from qbnorm_cli.io.specs import Transposed, as_input

# HDF5 chunk shapes of the stored (transposed) matrices, clipped to their shapes
LAYOUTS = {"contiguous": None, "row-chunks": (2, 1 << 20), "tile-chunks": (5, 4), "column-chunks": (1 << 20, 1)}


def chunked(h5, name, data, chunks):
    shape = None if chunks is None else tuple(min(c, n) for c, n in zip(chunks, data.shape, strict=True))
    h5.create_dataset(name, data=data, chunks=shape)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """P (bank × gallery) and S (queries × gallery) with ties, stored transposed in every layout."""
    rng = np.random.default_rng(3)
    P = rng.integers(0, 7, (37, 23)).astype(np.float32) / 4
    S = rng.integers(0, 7, (19, 23)).astype(np.float32) / 4
    P[:, 9] = P[:, 2]
    root = tmp_path_factory.mktemp("transposed")
    paths = {}
    for name, chunks in LAYOUTS.items():
        path = root / f"{name}.h5"
        with h5py.File(path, "w") as h5:
            chunked(h5, "P", P.T.copy(), chunks)
            chunked(h5, "S", S.T.copy(), chunks)
        paths[name] = path
    np.save(root / "P_T.npy", P.T.copy())
    np.save(root / "S_T.npy", S.T.copy())
    paths["npy"] = root
    return P, S, paths


def specs(paths, name):
    if name == "npy":
        return str(paths["npy"] / "P_T.npy"), str(paths["npy"] / "S_T.npy")
    return f"{paths[name]}::/P", f"{paths[name]}::/S"


@pytest.mark.parametrize("panel", [0, 64, 1 << 20])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_the_view_reads_what_the_transpose_holds(stored, name, panel):
    P, _, paths = stored
    with h5py.File(paths[name], "r") as h5:
        view = Transposed(h5["P"], panel_bytes=panel)
        assert view.shape == P.shape and view.dtype == P.dtype
        np.testing.assert_array_equal(view[()], P)
        for r0, r1, c0, c1 in ((0, 5, 0, 23), (3, 4, 2, 9), (30, 37, 20, 23), (0, 37, 0, 1), (6, 5, 0, 3)):
            np.testing.assert_array_equal(view[r0:r1, c0:c1], P[r0:r1, c0:c1])
        np.testing.assert_array_equal(view[10:20], P[10:20])
        np.testing.assert_array_equal(view[[0, 4, 36]], P[[0, 4, 36]])


def test_transposed_inputs_are_labelled_and_keep_no_orientation_bound_attributes(tmp_path):
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as h5:
        h5.attrs["gallery_rows"] = 3
        h5.attrs["gallery_identity"] = "fp:x"
        h5["scores"] = np.zeros((2, 3), np.float32)
    inp = as_input(f"{path}::/scores", "sims", transpose=True)
    assert inp.shape == (3, 2) and inp.label.endswith("(transposed)")
    assert "gallery_rows" not in inp.attrs and inp.describe()["transposed"] is True
    assert inp.identity != as_input(f"{path}::/scores", "sims").identity


@pytest.mark.parametrize("budget", [{"block_rows": 2}, {"memory": "1MiB"}, {}])
@pytest.mark.parametrize("name", [*LAYOUTS, "npy"])
def test_probe_normalise_hubness_equal_the_plain_read(stored, name, budget):
    P, S, paths = stored
    p_spec, s_spec = specs(paths, name)
    plain = qbnorm_cli.probe(bank_sims=P, betas=[4.0], k=2, topk_means=[3], **budget)  # the same tiles
    flipped = qbnorm_cli.probe(bank_sims=p_spec, transpose=True, betas=[4.0], k=2, topk_means=[3], **budget)
    np.testing.assert_array_equal(flipped.log_norm(4.0), plain.log_norm(4.0))
    np.testing.assert_array_equal(flipped.activation(2), plain.activation(2))
    np.testing.assert_array_equal(flipped.topk_mean(3), plain.topk_mean(3))
    for method in ("dis", "csls"):
        extra = {"topk_mean": 3} if method == "csls" else {}
        dense = qbnorm_cli.normalise(probe=plain, sims=S, method=method, **extra, **budget)
        np.testing.assert_array_equal(qbnorm_cli.normalise(probe=flipped, sims=s_spec, transpose=True,
                                                           method=method, **extra, **budget), dense)
        top = qbnorm_cli.normalise(probe=plain, sims=S, method=method, top_k=5, **extra, **budget)
        got = qbnorm_cli.normalise(probe=flipped, sims=s_spec, transpose=True, method=method, top_k=5, **extra,
                                   **budget)
        np.testing.assert_array_equal(got.indices, top.indices)
        np.testing.assert_array_equal(got.scores, top.scores)
    a = qbnorm_cli.hubness(S, k=[1, 3], **budget)
    b = qbnorm_cli.hubness(s_spec, k=[1, 3], transpose=True, **budget)
    for k in (1, 3):
        np.testing.assert_array_equal(a["k_occurrence"][k], b["k_occurrence"][k])


def test_transpose_needs_precomputed_scores_and_refuses_lists(stored):
    P, S, _ = stored
    with pytest.raises(UsageError, match="transpose=True reads precomputed scores"):
        qbnorm_cli.probe(P, S, transpose=True)
    top = qbnorm_cli.normalise(probe=qbnorm_cli.probe(bank_sims=P), sims=S, top_k=3)
    with pytest.raises(UsageError, match="is a ranking"):
        qbnorm_cli.hubness(top, transpose=True)


def test_cli_qbnorm_in_the_v2t_direction_from_t2v_dumps(cli, tmp_path):
    """probe --bank-sims (captions × bank) --transpose, normalise --sims (captions × items) --transpose,
    evaluate --transpose --direction v2t: the same as the library on the transposed arrays."""
    rng = np.random.default_rng(4)
    bank_t2v = rng.standard_normal((20, 30)).astype(np.float32)   # 20 captions × 30 bank items
    sims = rng.standard_normal((20, 4)).astype(np.float32)        # 20 captions × 4 items
    sims[3] = sims[2]                                             # a duplicate caption: ties in v2t
    np.save(tmp_path / "bank.npy", bank_t2v)
    np.save(tmp_path / "sims.npy", sims)
    cli.ok("probe", "--bank-sims", tmp_path / "bank.npy", "--transpose", "--beta", 5, "-o", tmp_path / "p.h5")
    cli.ok("normalise", "--sims", tmp_path / "sims.npy", "--transpose", "--probe", tmp_path / "p.h5",
           "--method", "is", "-o", tmp_path / "v2t.h5")
    doc = json.loads(cli.ok("evaluate", tmp_path / "v2t.h5", "--transpose", "--direction", "v2t",
                            "--queries-per-item", 5, "--json"))
    probe = qbnorm_cli.probe(bank_sims=bank_t2v.T, betas=[5])
    expected = qbnorm_cli.evaluate(qbnorm_cli.normalise(probe=probe, sims=sims.T, method="is", dtype="float32"),
                                   queries_per_item=5, direction="v2t", transpose=True)
    assert doc["inputs"][0]["metrics"] == expected["metrics"]
    code, _, err = cli("probe", "--bank", tmp_path / "bank.npy", "--gallery", tmp_path / "sims.npy",
                       "--transpose", "-o", tmp_path / "q.h5")
    assert code == 2 and "--transpose reads precomputed scores transposed; give --bank-sims" in err


def test_convert_writes_a_transposed_copy_in_tiles(cli, tmp_path):
    sims = np.random.default_rng(6).standard_normal((700, 300)).astype(np.float32)
    np.save(tmp_path / "t2v.npy", sims)
    doc = json.loads(cli.ok("convert", tmp_path / "t2v.npy", "-o", tmp_path / "v2t.h5", "--kind", "similarity",
                            "--transpose", "--memory", "1MiB", "--json"))
    assert (doc["rows"], doc["cols"], doc["transposed"]) == (300, 700, True)
    with h5py.File(tmp_path / "v2t.h5", "r") as h5:
        np.testing.assert_array_equal(h5["scores"][()], sims.T)
        assert h5["scores"].chunks == (300, 256) and h5.attrs["gallery_rows"] == 700
    a = qbnorm_cli.evaluate(str(tmp_path / "t2v.npy"), queries_per_item=7, direction="v2t")
    b = qbnorm_cli.evaluate(str(tmp_path / "v2t.h5"), queries_per_item=7, direction="v2t", transpose=True)
    assert a["metrics"] == b["metrics"]
    code, _, err = cli("convert", tmp_path / "t2v.npy", "-o", tmp_path / "e.h5", "--transpose")
    assert code == 2 and "--transpose writes score matrices transposed; pass --kind similarity" in err


def test_cli_hubness_transposed_is_the_hubness_of_the_copy(cli, stored):
    _, S, paths = stored
    a = json.loads(cli.ok("hubness", f"{paths['row-chunks']}::/S", "--transpose", "--k", 2, "--json",
                          "--memory", "1MiB"))
    b = qbnorm_cli.hubness(S, k=2)
    assert a["inputs"][0]["by_k"][0]["skewness"] == b["by_k"][0]["skewness"]
    assert a["inputs"][0]["queries"] == 19 and a["inputs"][0]["gallery_rows"] == 23
