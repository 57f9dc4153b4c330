"""Issue 27: Parquet and Arrow columns, .npy shard folders, safetensors, PyTorch files and fsspec
URLs, read in place (io/formats.py and its readers), by every command, with provenance; and the
errors of each."""

from __future__ import annotations

import functools
import http.server
import json
import os
import pickle
import struct
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import read_h5

from benchmarks.formats import RangeHandler, served, write_pt
from qbnorm_cli import api
from qbnorm_cli.errors import DataError, RuntimeFailure, UsageError
from qbnorm_cli.io import remote
from qbnorm_cli.io.specs import open_array

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
TORCH_FIXTURES = Path(__file__).parent / "fixtures" / "torch"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def emb():
    return np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32)


def list_column(array, fixed=False):
    values = pa.array(array.ravel())
    if fixed:
        return pa.FixedSizeListArray.from_arrays(values, array.shape[1])
    return pa.ListArray.from_arrays(pa.array(np.arange(0, array.size + 1, array.shape[1], dtype=np.int32)), values)


def write_parquet(path, array, fixed=False, row_group_size=16, **extra):
    pq.write_table(pa.table({"id": np.arange(len(array)), "emb": list_column(array, fixed), **extra}), path,
                   row_group_size=row_group_size)
    return path


def check_reads(spec, array):
    src = open_array(str(spec))
    assert src.shape == array.shape
    np.testing.assert_array_equal(src.read(), array)
    np.testing.assert_array_equal(src.read(10, 37), array[10:37])
    picks = np.array([0, 3, 17, 18, len(array) - 1])
    np.testing.assert_array_equal(src.read_rows(picks), array[picks])
    return src


# --- Parquet and Arrow ---------------------------------------------------------------------------

@pytest.mark.parametrize("fixed", [False, True], ids=["list", "fixed_size_list"])
def test_parquet_column_read_by_row_groups(tmp_path, emb, fixed):
    path = write_parquet(tmp_path / "q.parquet", emb, fixed)
    src = check_reads(f"{path}::emb", emb)
    assert src.label == f"{path}::/emb"
    record = src.describe()
    assert record["format"] == "parquet" and record["column"] == "emb" and record["path"] == str(path)
    check_reads(path, emb)  # the only list column needs no name


def test_parquet_decodes_each_row_group_once_per_pass(tmp_path, emb):
    src = open_array(f"{write_parquet(tmp_path / 'q.parquet', emb)}::emb")
    calls = []
    inner = src.array.batches
    src.array.batches = lambda i: calls.append(i) or inner(i)
    for r0 in range(0, 50, 5):  # blocks smaller than a row group
        src.read(r0, r0 + 5)
    assert calls == [0, 1, 2, 3]


def test_parquet_bad_columns(tmp_path, emb):
    ragged = pa.array([[1.0, 2.0], [3.0, 4.0], [5.0]], type=pa.list_(pa.float32()))
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"ragged": ragged, "text": ["a", "b", "c"], "tags": [["x"], ["y"], ["z"]],
                             "nulls": pa.array([[1.0], None, [2.0]]), "holes": pa.array([[1.0], [None], [2.0]])}),
                   path)
    with pytest.raises(DataError, match=r"bad.parquet::ragged: ragged lists: row 2 has 1 values, the column 2"):
        open_array(f"{path}::ragged").read()
    with pytest.raises(DataError, match=r"::text: column of type string; qbnorm reads embeddings from a column "
                                        r"of list<float> or fixed_size_list<float>"):
        open_array(f"{path}::text")
    with pytest.raises(DataError, match=r"::tags: column of type list<element: string>"):
        open_array(f"{path}::tags")
    with pytest.raises(DataError, match=r"::nulls: row 1 is null"):
        open_array(f"{path}::nulls").read()
    with pytest.raises(DataError, match=r"::holes: row 1 holds a null value"):
        open_array(f"{path}::holes").read()
    with pytest.raises(DataError, match=r"no column 'emb'; it has ragged \(list<element: float>\), text \(string\)"):
        open_array(f"{path}::emb")
    with pytest.raises(DataError, match=r"name a column as .*::COLUMN"):
        open_array(str(path))


def test_parquet_files_as_one_dataset_in_natural_order(tmp_path, emb):
    folder = tmp_path / "parts"
    folder.mkdir()
    for i, (a, b) in enumerate([(0, 10), (10, 20), (20, 50)]):  # part_2 sorts before part_10
        write_parquet(folder / f"part_{[1, 2, 10][i]}.parquet", emb[a:b])
    (folder / "README.txt").write_text("not data")
    src = check_reads(f"{folder}::emb", emb)
    assert [s["path"].rsplit("/", 1)[1] for s in src.describe()["shards"]] == \
        ["part_1.parquet", "part_2.parquet", "part_10.parquet"]
    check_reads(f"{folder}/*.parquet::emb", emb)


def test_arrow_ipc_file(tmp_path, emb):
    import pyarrow.feather as feather

    path = tmp_path / "q.arrow"
    feather.write_feather(pa.table({"emb": list_column(emb, True)}), path, chunksize=16)
    src = check_reads(f"{path}::emb", emb)
    assert src.describe()["format"] == "arrow"


def test_a_row_group_larger_than_the_budget_streams(tmp_path):
    big = np.random.default_rng(2).standard_normal((40000, 16)).astype(np.float32)  # 2.4 MiB in one row group
    path = write_parquet(tmp_path / "big.parquet", big, row_group_size=40000)
    api.convert(f"{path}::emb", tmp_path / "out.h5", memory="1MiB")
    np.testing.assert_array_equal(read_h5(tmp_path / "out.h5")["/embeddings"], big)


def test_an_arrow_record_batch_beyond_the_budget_is_refused_with_the_fix(tmp_path):
    import pyarrow.feather as feather

    big = np.ones((20000, 16), dtype=np.float32)  # one record batch, read whole: 1.2 MiB as float32
    feather.write_feather(pa.table({"emb": list_column(big, True)}), tmp_path / "big.arrow", chunksize=20000)
    with pytest.raises(DataError, match=r"a record batch of 20000 rows .* raise it to at least 3MiB, or rewrite the "
                                        r"file with smaller record batches"):
        api.convert(f"{tmp_path}/big.arrow::emb", tmp_path / "out.h5", memory="1MiB")
    assert not (tmp_path / "out.h5").exists()
    api.convert(f"{tmp_path}/big.arrow::emb", tmp_path / "out.h5", memory="3MiB")


# --- .npy shards ---------------------------------------------------------------------------------

def shard_folder(tmp_path, emb, names=("text_emb_0", "text_emb_1", "text_emb_2", "text_emb_10")):
    """clip-retrieval's layout: embeddings/text_emb/text_emb_N.npy, metadata/metadata_N.parquet."""
    folder = tmp_path / "embeddings" / "text_emb"
    folder.mkdir(parents=True)
    bounds = np.linspace(0, len(emb), len(names) + 1).astype(int)
    for name, a, b in zip(names, bounds[:-1], bounds[1:], strict=True):
        np.save(folder / f"{name}.npy", emb[a:b])
    (tmp_path / "embeddings" / "img_emb").mkdir()
    (tmp_path / "metadata").mkdir()
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "metadata" / "metadata_0.parquet")
    return folder


def test_npy_shard_folder_in_natural_order(tmp_path, emb):
    folder = shard_folder(tmp_path, emb)
    src = check_reads(folder, emb)
    shards = src.describe()["shards"]
    assert [Path(s["path"]).name for s in shards] == ["text_emb_0.npy", "text_emb_1.npy", "text_emb_2.npy",
                                                      "text_emb_10.npy"]
    assert all(s["fingerprint"].startswith("fp:") for s in shards) and sum(s["rows"] for s in shards) == 50
    check_reads(f"{folder}/*.npy", emb)  # a quoted glob
    with pytest.raises(UsageError, match=r"is a directory with no .npy, .parquet or .arrow files directly in it; "
                                         r"name one of its folders: .*embeddings/img_emb, .*embeddings/text_emb"):
        open_array(str(tmp_path / "embeddings"))
    with pytest.raises(UsageError, match=r"no file matches this pattern"):
        open_array(f"{folder}/*.npz")


def test_npy_shards_must_agree(tmp_path, emb):
    folder = tmp_path / "s"
    folder.mkdir()
    np.save(folder / "a_0.npy", emb[:10])
    np.save(folder / "a_1.npy", emb[10:, :4])
    with pytest.raises(DataError, match=r"a_1.npy: shape \(40, 4\) does not match .*a_0.npy's \(10, 6\)"):
        open_array(str(folder))
    np.save(folder / "a_1.npy", emb[10:].astype(np.float16))
    with pytest.raises(DataError, match=r"a_1.npy: dtype float16 differs from .*a_0.npy's float32"):
        open_array(str(folder))


def test_build_bank_of_a_shard_folder(tmp_path, emb, cli):
    folder = shard_folder(tmp_path, emb)
    code, _, err = cli("build-bank", folder, "-o", tmp_path / "b.h5", "--strategy", "all")
    assert code == 0, err
    out = read_h5(tmp_path / "b.h5")
    np.testing.assert_array_equal(out["/embeddings"], emb)
    assert out["attrs"]["inputs"][0]["format"] == "npy" and len(out["attrs"]["inputs"][0]["shards"]) == 4


# --- safetensors ---------------------------------------------------------------------------------

def write_safetensors(path, tensors: dict[str, tuple[str, list[int], bytes]]):
    """A safetensors file by hand (for dtypes numpy lacks, and damaged headers)."""
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_safetensors_tensor(tmp_path, emb):
    save_file = pytest.importorskip("safetensors.numpy").save_file

    path = tmp_path / "f.safetensors"
    save_file({"text": emb, "ids": np.arange(50), "half": emb.astype(np.float16)}, str(path))
    src = check_reads(f"{path}::text", emb)
    assert src.describe()["format"] == "safetensors" and src.describe()["tensor"] == "text"
    np.testing.assert_array_equal(open_array(f"{path}::half").read(), emb.astype(np.float16).astype(np.float32))
    with pytest.raises(DataError, match=r"no tensor 'image'; it has (?=.*text \(50×6 F32\))(?=.*ids \(50 I64\))"):
        open_array(f"{path}::image")


def test_safetensors_bfloat16_and_damage(tmp_path, emb):
    pytest.importorskip("safetensors")
    bf16 = (emb.view(np.uint32) >> 16).astype("<u2")
    path = tmp_path / "bf.safetensors"
    write_safetensors(path, {"text": ("BF16", [50, 6], bf16.tobytes())})
    np.testing.assert_array_equal(open_array(str(path)).read(), (bf16.astype(np.uint32) << 16).view(np.float32))
    assert open_array(str(path)).describe()["stored_dtype"] == "bfloat16"
    write_safetensors(path, {"text": ("F32", [5000, 6], emb.tobytes())})  # declares more than it holds
    with pytest.raises(DataError, match=r"bf.safetensors: not a valid safetensors file"):
        open_array(str(path))


# --- PyTorch -------------------------------------------------------------------------------------

def torch_values():
    return (np.arange(35, dtype=np.float32).reshape(7, 5) - 17) / 8  # as tests/fixtures/make_torch.py


def test_torch_files_saved_by_torch_read_without_it():
    text = torch_values()
    d = TORCH_FIXTURES / "dict.pt"
    np.testing.assert_array_equal(open_array(f"{d}::text").read(), text)
    np.testing.assert_array_equal(open_array(f"{d}::image").read(), text[:4])  # float16
    np.testing.assert_array_equal(open_array(f"{d}::bf").read(), text)  # bfloat16: these values are exact
    np.testing.assert_array_equal(open_array(f"{d}::T").read(), text.T)  # a transposed view
    np.testing.assert_array_equal(open_array(f"{d}::param").read(), text[2:5])  # storage offset, nn.Parameter
    np.testing.assert_array_equal(open_array(f"{d}::ids", ndim=(1,)).read_raw(), np.arange(7))
    assert open_array(f"{d}::bf").describe()["stored_dtype"] == "bfloat16"
    np.testing.assert_array_equal(open_array(str(TORCH_FIXTURES / "tensor.pt")).read(), text)
    np.testing.assert_array_equal(open_array(f"{TORCH_FIXTURES / 'list.pt'}::1").read(), text + 1)
    with pytest.raises(DataError, match=r"name a tensor as .*dict.pt::KEY; it has text \(7×5 float32\), "
                                        r"image \(4×5 float16\), bf \(7×5 bfloat16\)"):
        open_array(str(d))
    assert "torch" not in sys.modules


def test_convert_of_a_pt_file(tmp_path, emb, cli):
    """Was: a misleading npz KeyError about queries/data.pkl.npy."""
    path = tmp_path / "queries.pt"
    write_pt(path, {"queries": emb})
    code, _, err = cli("convert", path, "-o", tmp_path / "q.h5")
    assert code == 0, err
    out = read_h5(tmp_path / "q.h5")
    np.testing.assert_array_equal(out["/embeddings"], emb)
    assert out["attrs"]["source_format"] == "torch" and out["attrs"]["inputs"][0]["tensor"] == "queries"


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_torch_pickle_that_runs_code_is_refused(tmp_path, cli):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"x": _RunsCode(marker)}, protocol=2))
        archive.writestr("evil/byteorder", "little")
    code, _, err = cli("convert", path, "-o", tmp_path / "out.h5")
    assert code == 3 and "disallowed object" in err and "system" in err and "never runs code" in err
    assert not marker.exists() and not (tmp_path / "out.h5").exists()


def test_damaged_torch_files(tmp_path, emb):
    path = tmp_path / "c.pt"
    write_pt(path, {"x": emb})
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp_path / "z.pt", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with pytest.raises(DataError, match=r"its storage is compressed"):
        open_array(str(tmp_path / "z.pt"))
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp_path / "short.pt", "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, data[:100] if info.filename.endswith("data/0") else data)
    with pytest.raises(DataError, match=r"less than its tensor declares"):
        open_array(str(tmp_path / "short.pt"))
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))
    with pytest.raises(DataError, match=r"legacy \(pre-1.6\) format"):
        open_array(str(tmp_path / "legacy.pt"))


# --- URLs ----------------------------------------------------------------------------------------

def test_memory_urls(tmp_path, emb):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    write_parquet(tmp_path / "q.parquet", emb)
    fs.pipe("/qb27/q.parquet", (tmp_path / "q.parquet").read_bytes())
    for i, (a, b) in enumerate([(0, 20), (20, 50)]):
        np.save(tmp_path / f"s{i}.npy", emb[a:b])
        fs.pipe(f"/qb27/shards/emb_{i}.npy", (tmp_path / f"s{i}.npy").read_bytes())
    try:
        src = check_reads("memory://qb27/q.parquet::emb", emb)
        assert src.describe()["path"] == "memory://qb27/q.parquet"
        src = check_reads("memory://qb27/shards", emb)
        assert [s["path"] for s in src.describe()["shards"]] == ["memory:///qb27/shards/emb_0.npy",
                                                                 "memory:///qb27/shards/emb_1.npy"]
        with pytest.raises(UsageError, match=r"memory://qb27/nothing.parquet: no such file"):
            open_array("memory://qb27/nothing.parquet")
    finally:
        fs.rm("/qb27", recursive=True)


def test_http_by_ranges_cached_where_the_user_says(tmp_path, emb, cli, monkeypatch):
    pytest.importorskip("fsspec")
    pytest.importorskip("aiohttp")
    site = tmp_path / "site"
    site.mkdir()
    write_parquet(site / "q.parquet", emb)
    write_pt(site / "q.pt", {"q": emb})
    monkeypatch.setenv("QBNORM_CACHE_DIR", str(tmp_path / "cache"))
    with served(site) as server:
        check_reads(f"{server.url}/q.parquet::emb", emb)
        check_reads(f"{server.url}/q.pt::q", emb)
        secret = server.url.replace("http://", "http://alice:s3cret@") + "/q.parquet?token=s3cret"
        code, out, err = cli("convert", f"{secret}::emb", "-o", tmp_path / "q.h5", "--json")
        assert code == 0, err
        assert "s3cret" not in out + err and "s3cret" not in str(read_h5(tmp_path / "q.h5")["attrs"])
        code, _, err = cli("convert", f"{server.url}/missing.parquet::emb", "-o", tmp_path / "m.h5")
        assert code == 2 and "missing.parquet: no such file" in err
    assert any((tmp_path / "cache").rglob("*"))  # blocks were cached under QBNORM_CACHE_DIR
    np.testing.assert_array_equal(read_h5(tmp_path / "q.h5")["/embeddings"], emb)


def test_the_local_server_serves_ranges(tmp_path):
    (tmp_path / "f").write_bytes(bytes(range(100)))
    handler = functools.partial(RangeHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        import urllib.request

        request = urllib.request.Request(f"http://127.0.0.1:{server.server_address[1]}/f",
                                         headers={"Range": "bytes=10-19"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 206 and response.read() == bytes(range(10, 20))
    finally:
        server.shutdown()
        server.server_close()


def test_redact():
    assert remote.redact("https://u:p@host:8080/a/b.parquet?X-Amz-Signature=abc#x") == "https://host:8080/a/b.parquet"
    assert remote.redact("s3://bucket/key.npy") == "s3://bucket/key.npy"
    assert remote.redact("local/path.npy") == "local/path.npy"
    assert remote.redact("https://u:p@h/q.parquet?sig=1::emb") == "https://h/q.parquet::emb"
    line = "qbnorm convert https://u:p@h/q.pt?sig=1::x -o q.h5"
    assert remote.redact_text(line) == "qbnorm convert https://h/q.pt::x -o q.h5"


# --- errors, extras, imports ---------------------------------------------------------------------

def test_an_unreadable_format_names_what_qbnorm_reads(tmp_path, cli):
    path = tmp_path / "queries.csv"
    path.write_text("id,x\n1,2\n")
    code, _, err = cli("convert", path, "-o", tmp_path / "q.h5")
    assert code == 3
    assert err.count("\n") == 1 and "not a format qbnorm reads" in err
    assert all(word in err for word in ("HDF5", ".npy", "Parquet", "Arrow", "safetensors", "PyTorch"))


def test_a_missing_extra_is_named(tmp_path, emb, monkeypatch):
    path = write_parquet(tmp_path / "q.parquet", emb)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    with pytest.raises(RuntimeFailure, match=r"q.parquet needs pyarrow: pip install 'qbnorm\[arrow\]'"):
        open_array(f"{path}::emb")
    monkeypatch.setitem(sys.modules, "fsspec", None)
    with pytest.raises(RuntimeFailure, match=r"needs fsspec: pip install 'qbnorm\[remote\]'"):
        open_array("s3://bucket/q.parquet::emb")


def test_core_inputs_import_no_extra(tmp_path, emb):
    np.save(tmp_path / "q.npy", emb)
    code = ("import sys; from qbnorm_cli.io.specs import open_array; open_array(sys.argv[1]).read(); "
            "print(sorted(m for m in ('pyarrow', 'fsspec', 'safetensors', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "q.npy")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout
    assert out.strip() == "[]"


def test_normalise_reads_every_format(tmp_path, emb, cli):
    """A pipeline with queries, gallery and bank in three formats gives the .npy pipeline's scores."""
    save_file = pytest.importorskip("safetensors.numpy").save_file

    queries, gallery = emb[:20], emb[20:]
    bank = np.random.default_rng(1).standard_normal((30, 6)).astype(np.float32)
    np.save(tmp_path / "q.npy", queries)
    np.save(tmp_path / "g.npy", gallery)
    np.save(tmp_path / "bank.npy", bank)
    write_parquet(tmp_path / "q.parquet", queries, fixed=True, row_group_size=7)
    save_file({"gallery": gallery}, str(tmp_path / "g.safetensors"))
    write_pt(tmp_path / "bank.pt", {"bank": bank})
    for tag, q, g, b in (("npy", tmp_path / "q.npy", tmp_path / "g.npy", tmp_path / "bank.npy"),
                         ("mixed", f"{tmp_path}/q.parquet::emb", f"{tmp_path}/g.safetensors::gallery",
                          f"{tmp_path}/bank.pt::bank")):
        assert cli("build-bank", b, "-o", tmp_path / f"{tag}-bank.h5", "--strategy", "all")[0] == 0
        assert cli("probe", "--bank", tmp_path / f"{tag}-bank.h5", "--gallery", g, "-o", tmp_path / f"{tag}-p.h5",
                   "--beta", "20", "--k", "1")[0] == 0
        code, _, err = cli("normalise", "--queries", q, "--gallery", g, "--probe", tmp_path / f"{tag}-p.h5",
                           "-o", tmp_path / f"{tag}.h5", "--method", "dis", "--memory", "1MiB", "--block-rows", "4")
        assert code == 0, err
    np.testing.assert_array_equal(read_h5(tmp_path / "npy.h5")["/scores"], read_h5(tmp_path / "mixed.h5")["/scores"])
    formats = [i.get("format") for i in read_h5(tmp_path / "mixed.h5")["attrs"]["inputs"]]
    assert "parquet" in formats and "safetensors" in formats


@pytest.mark.parametrize("fmt", ["parquet", "shards", "safetensors", "pt"])
def test_the_issue_commands_now_read_their_input(tmp_path, emb, cli, fmt):
    """Were: "not an HDF5 or .npy file" (parquet, safetensors), "is a directory" (shards), an npz
    KeyError about queries/data.pkl.npy (pt)."""
    if fmt == "parquet":
        spec = str(write_parquet(tmp_path / "queries.parquet", emb))
    elif fmt == "shards":
        spec = str(shard_folder(tmp_path, emb))
    elif fmt == "safetensors":
        save_file = pytest.importorskip("safetensors.numpy").save_file
        save_file({"queries": emb}, str(tmp_path / "queries.safetensors"))
        spec = str(tmp_path / "queries.safetensors")
    else:
        write_pt(tmp_path / "queries.pt", {"queries": emb})
        spec = str(tmp_path / "queries.pt")
    code, _, err = cli("convert", spec, "-o", tmp_path / "q.h5")
    assert code == 0, err
    np.testing.assert_array_equal(read_h5(tmp_path / "q.h5")["/embeddings"], emb)
    code, _, err = cli("build-bank", spec, "-o", tmp_path / "b.h5", "--strategy", "all")
    assert code == 0, err


def ints(*values: int) -> bytes:
    """The pickle opcodes that push these integers."""
    return b"".join(pickle.dumps(v, protocol=2)[2:-1] for v in values)


def test_declared_sizes_never_allocate_beyond_the_budget(tmp_path):
    wide = np.ones((2, 300_000), dtype=np.float32)  # one row: 1.1 MiB as float32
    path = write_parquet(tmp_path / "wide.parquet", wide, fixed=True)
    with pytest.raises(DataError, match=r"wide.parquet::/emb: a row \(1.1 MiB as float32\) is read whole, .* "
                                        r"check that the column holds one vector per row"):
        api.convert(f"{path}::emb", tmp_path / "out.h5", memory="1MiB")
    pt = tmp_path / "expanded.pt"
    write_pt(pt, {"x": np.ones((4, 3), dtype=np.float32)})
    with zipfile.ZipFile(pt) as src, zipfile.ZipFile(tmp_path / "e.pt", "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):  # size (4, 3) → (4000000, 3) with stride (0, 1): an expand
                data = data.replace(ints(4, 3) + b"t(", ints(4_000_000, 3) + b"t(").replace(ints(3, 1), ints(0, 1))
            dst.writestr(info.filename, data)
    with pytest.raises(DataError, match=r"more elements than its storage"):
        open_array(str(tmp_path / "e.pt"))
