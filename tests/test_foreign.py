"""Foreign dumps: .npz, pickles (restricted unpickler), ann-benchmarks HDF5, and `qbnorm convert`."""

from __future__ import annotations

import os
import pickle

import h5py
import numpy as np
import pytest
from conftest import read_h5

from qbnorm_cli.errors import DataError, UsageError
from qbnorm_cli.io.foreign import safe_load, source_format
from qbnorm_cli.io.specs import open_array


class _RunsCode:
    """What a malicious pickle looks like: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evaluates:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.fixture
def arr():
    return np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickled_ndarray_every_protocol(tmp_path, arr, protocol):
    path = tmp_path / "sims.pkl"
    path.write_bytes(pickle.dumps(arr, protocol=protocol))
    src = open_array(str(path))
    assert src.shape == (7, 5) and src.dataset is None
    np.testing.assert_array_equal(src.read(), arr)


def test_pickled_dict_needs_a_key(tmp_path, arr):
    path = tmp_path / "feats.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"text": arr, "video": arr[:3] * 2, "ids": np.arange(7), "note": "x", "n": np.float64(2)}, fh)
    np.testing.assert_array_equal(open_array(f"{path}::video").read(), arr[:3] * 2)
    assert open_array(f"{path}::text").label == f"{path}::/text"
    with pytest.raises(DataError, match=r"name an array as .*::KEY; this pickle has text \(7×5 float32\), "
                                        r"video \(3×5 float32\), ids \(7 int64\)"):
        open_array(str(path))
    with pytest.raises(DataError, match="no array 'audio'"):
        open_array(f"{path}::audio")
    # the only 1-D array is picked when a 1-D input is asked for
    np.testing.assert_array_equal(open_array(str(path), ndim=(1,)).read_raw(), np.arange(7))


def test_pickled_list_and_nested_keys(tmp_path, arr):
    path = tmp_path / "nested.pickle"
    with open(path, "wb") as fh:
        pickle.dump({"splits": [arr, arr + 1]}, fh)
    np.testing.assert_array_equal(open_array(f"{path}::splits/1").read(), arr + 1)


def test_malicious_pickle_is_refused_and_not_run(tmp_path, arr, cli):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"sims": arr, "payload": _RunsCode(marker)}))
    with pytest.raises(DataError, match=r"disallowed object \((posix|nt)\.system\)"):
        open_array(f"{path}::sims")
    assert not marker.exists()
    code, _, err = cli("convert", path, "-o", tmp_path / "out.h5")
    assert code == 3 and "disallowed object" in err and "system" in err
    assert not marker.exists() and not (tmp_path / "out.h5").exists()

    path.write_bytes(pickle.dumps(_Evaluates(), protocol=4))
    with pytest.raises(DataError, match=r"disallowed object \(builtins\.eval\)"):
        open_array(str(path))


def test_disallowed_codec_and_garbage(tmp_path):
    import io

    # protocol ≤ 2 bytes go through _codecs.encode: only latin-1 is honoured
    evil = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(DataError, match="cannot read pickle"):
        safe_load(io.BytesIO(evil), "x.pkl")
    bad = tmp_path / "broken.pkl"
    bad.write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(DataError, match="cannot read pickle"):
        open_array(str(bad))


def test_npz(tmp_path, arr):
    many = tmp_path / "dump.npz"
    np.savez(many, queries=arr, gallery=arr[:4], gt=np.arange(7))
    np.testing.assert_array_equal(open_array(f"{many}::gallery").read(), arr[:4])
    np.testing.assert_array_equal(open_array(f"{many}::/queries").read(), arr)
    with pytest.raises(DataError, match=r"name an array as .*::KEY; it has queries \(7×5 float32\), gallery"):
        open_array(str(many))
    with pytest.raises(DataError, match="no array 'nope'; it has queries, gallery, gt"):
        open_array(f"{many}::nope")
    assert open_array(str(many), ndim=(1,)).dataset == "/gt"
    one = tmp_path / "one.npz"
    np.savez_compressed(one, sims=arr)
    np.testing.assert_array_equal(open_array(str(one)).read(), arr)
    assert source_format(str(one)) == "npz"


def test_ann_benchmarks_layout(tmp_path, arr):
    path = tmp_path / "glove-25-angular.hdf5"
    with h5py.File(path, "w") as h5:
        h5["train"] = arr
        h5["test"] = arr[:2]
        h5["neighbors"] = np.zeros((2, 3), dtype=np.int32)
        h5["distances"] = np.zeros((2, 3), dtype=np.float32)
        h5.attrs["distance"] = "angular"
    with pytest.raises(DataError) as info:
        open_array(str(path))
    message = str(info.value)
    assert "ann-benchmarks" in message and "distance is angular" in message
    for name in ("train", "test", "neighbors", "distances"):
        assert f"{path}::/{name}" in message
    np.testing.assert_array_equal(open_array(f"{path}::/train").read(), arr)


def test_convert_pickle_to_embeddings_and_evaluate(tmp_path, arr, cli):
    src = tmp_path / "emb.pkl"
    src.write_bytes(pickle.dumps({"text": arr.astype(np.float64)}))
    out = tmp_path / "emb.h5"
    cli.ok("convert", f"{src}::text", "-o", out, "--block-rows", 3)
    data = read_h5(out)
    assert data["attrs"]["qbnorm_kind"] == "embeddings" and data["/embeddings"].dtype == np.float32
    np.testing.assert_array_equal(data["/embeddings"], arr)
    assert data["attrs"]["inputs"][0]["path"] == str(src) and data["attrs"]["inputs"][0]["dataset"] == "/text"
    assert data["attrs"]["params"]["source_format"] == "pickle"
    code, _, err = cli("convert", f"{src}::text", "-o", out)
    assert code == 2 and "--force" in err
    # the converted file is an ordinary embeddings input
    assert open_array(str(out)).shape == (7, 5)


def test_convert_similarity_records_scale(tmp_path, cli):
    sims = (np.random.default_rng(1).uniform(-0.2, 0.4, (6, 9)) * 100).astype(np.float32)
    src = tmp_path / "sim_matrix.npy"
    np.save(src, sims)
    out = tmp_path / "sims.h5"
    cli.ok("convert", src, "-o", out, "--kind", "similarity")
    data = read_h5(out)
    assert data["attrs"]["qbnorm_kind"] == "similarity" and data["attrs"]["score_scale"] == "logits"
    assert data["attrs"]["gallery_rows"] == 9
    np.testing.assert_array_equal(data["/scores"], sims)
    code, _, _ = cli("convert", src, "-o", tmp_path / "x.h5", "--kind", "bogus")
    assert code == 2


def test_pickle_and_npy_evaluate_directly(tmp_path, cli):
    rng = np.random.default_rng(2)
    sims = rng.standard_normal((10, 4)).astype(np.float32)
    gt = np.arange(10) % 4
    sims[np.arange(10), gt] += 10  # every query finds its item
    (tmp_path / "test_sims.pkl").write_bytes(pickle.dumps(sims))
    np.save(tmp_path / "gt.npy", gt)
    np.save(tmp_path / "sim_matrix.npy", 100 * sims)
    for spec in ("test_sims.pkl", "sim_matrix.npy"):
        out = cli.ok("evaluate", tmp_path / spec, "--gt", tmp_path / "gt.npy", "--json")
        assert '"R@1": 100.0' in out


def test_usage_errors_stay_usage_errors(tmp_path):
    with pytest.raises(UsageError):
        open_array(str(tmp_path / "missing.pkl"))


@pytest.mark.parametrize("suffix", [".h5", ".npy"])
def test_content_fingerprint_is_stable(tmp_path, suffix):
    """A foreign gallery's identity (recorded in probe files) is the SHA-1 of its shape and of 16
    evenly spaced rows as float32: probes made by earlier versions keep matching their gallery."""
    import hashlib

    data = np.random.default_rng(1).standard_normal((40, 3))
    path = tmp_path / f"gallery{suffix}"
    if suffix == ".h5":
        with h5py.File(path, "w") as f:
            f["emb"] = data
        spec = f"{path}::/emb"
    else:
        np.save(path, data)
        spec = str(path)
    digest = hashlib.sha1(repr((40, 3)).encode())
    for row in np.unique(np.linspace(0, 39, num=16).astype(np.int64)):
        digest.update(data[row].astype(np.float32).tobytes())
    source = open_array(spec)
    assert source.identity == "fp:" + digest.hexdigest()[:20]
    assert source.describe()["identity"] == source.identity
