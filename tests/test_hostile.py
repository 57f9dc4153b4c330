"""Hostile files and hostile values (issue 24): what a file may make qbnorm read, allocate or write.

Each test tries the variants of one class: HDF5 external storage, external links and virtual
datasets (refused unless --allow-external); declared sizes and compressed chunks or members that
expand beyond --memory; outputs beyond --max-output; norms that overflow or underflow float32;
parameters whose results overflow; integers beyond C types; inexact ground truth; `::` in names.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from helpers import leftovers, run

from qbnorm_cli import api
from qbnorm_cli.cli import main
from qbnorm_cli.errors import DataError

G, B, Q, D = 30, 40, 12, 8


def refused(result, code: int, *needles) -> str:
    got, out, err = result
    assert got == code, err
    assert "Traceback" not in err + out and "internal error" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qbnorm: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    d = SimpleNamespace(root=root, emb=root / "emb.h5")
    with h5py.File(d.emb, "w") as h5:
        h5["bank"] = rng.standard_normal((B, D)).astype(np.float32)
        h5["gallery"] = rng.standard_normal((G, D)).astype(np.float32)
        h5["queries"] = rng.standard_normal((Q, D)).astype(np.float32)
    d.g, d.q = f"{d.emb}::/gallery", f"{d.emb}::/queries"
    d.bank, d.probe = root / "bank.h5", root / "probe.h5"
    assert main(["build-bank", f"{d.emb}::/bank", "-o", d.bank, "--strategy", "all", "-q"]) == 0
    assert main(["probe", "--bank", d.bank, "--gallery", d.g, "-o", d.probe, "-q", "--topk-mean", "3"]) == 0
    return d


# ----------------------------------------------------------------------------------------------
# 6. External storage, external links, virtual datasets


def _external_storage(tmp: Path, target: str, rows: int = 4) -> str:
    path = tmp / "external.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("gallery", shape=(rows, D), dtype="<f4", external=[(target, 0, rows * D * 4)])
    return f"{path}::/gallery"


def _virtual(tmp: Path, source: Path) -> str:
    path = tmp / "virtual.h5"
    layout = h5py.VirtualLayout(shape=(G, D), dtype="<f4")
    layout[:] = h5py.VirtualSource(str(source), "/gallery", shape=(G, D))
    with h5py.File(path, "w") as h5:
        h5.create_virtual_dataset("gallery", layout, fillvalue=0)
    return f"{path}::/gallery"


def _external_link(tmp: Path, target: Path, name: str = "gallery") -> str:
    path = tmp / "linked.h5"
    with h5py.File(path, "w") as h5:
        h5[name] = h5py.ExternalLink(str(target), "/gallery")
        h5["inside"] = np.ones((G, D), dtype=np.float32)
    return f"{path}::/{name}"


def _secret(tmp: Path) -> Path:
    secret = tmp / "secret.bin"
    secret.write_bytes(np.arange(64 * D, dtype="<f4").tobytes())
    return secret


HOSTILE = {
    # name: (make(tmp, data) -> spec, what the refusal names)
    "storage-file": (lambda tmp, d: _external_storage(tmp, str(_secret(tmp))), "external file"),
    "storage-passwd": (lambda tmp, d: _external_storage(tmp, "/etc/passwd", 1), "/etc/passwd"),
    "storage-fifo": (lambda tmp, d: (os.mkfifo(tmp / "fifo"), _external_storage(tmp, str(tmp / "fifo")))[1], "fifo"),
    "storage-urandom": (lambda tmp, d: _external_storage(tmp, "/dev/urandom"), "/dev/urandom"),
    "virtual-missing": (lambda tmp, d: _virtual(tmp, tmp / "gone.h5"), "gone.h5"),
    "virtual-present": (lambda tmp, d: _virtual(tmp, d.emb), "virtual dataset reading"),
    "link": (lambda tmp, d: _external_link(tmp, d.emb), "external link to"),
    "link-missing": (lambda tmp, d: _external_link(tmp, tmp / "nowhere.h5"), "nowhere.h5"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("command", ["convert", "normalise", "hubness"])
def test_files_outside_the_one_named_are_refused(capsys, data, tmp_path, case, command):
    make, names = HOSTILE[case]
    spec = make(tmp_path, data)
    out = tmp_path / "out.h5"
    args = {"convert": ["convert", spec, "-o", out],
            "normalise": ["normalise", "--queries", data.q, "--gallery", spec, "--probe", data.probe, "-o", out],
            "hubness": ["hubness", spec, "-o", out]}[command]
    line = refused(run(capsys, *args), 3, names, "--allow-external")
    assert spec.partition("::")[0] in line
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("case", ["storage-file", "virtual-present", "link"])
def test_allow_external_follows_and_records_every_file_read(capsys, data, tmp_path, case):
    spec = HOSTILE[case][0](tmp_path, data)
    out = tmp_path / "out.h5"
    code, _, err = run(capsys, "convert", spec, "-o", out, "--allow-external", "-q")
    assert code == 0, err
    with h5py.File(out, "r") as h5:
        record = json.loads(h5.attrs["inputs"])[0]
    expected = str(tmp_path / "secret.bin") if case == "storage-file" else str(data.emb)
    assert record["external_files"] == [expected]
    # the library: allow_external=True, the same record; refused without it
    with pytest.raises(DataError, match="allow_external=True"):
        api.convert(spec, tmp_path / "lib.h5")
    api.convert(spec, tmp_path / "lib.h5", allow_external=True)
    with h5py.File(tmp_path / "lib.h5", "r") as h5:
        assert json.loads(h5.attrs["inputs"])[0]["external_files"] == [expected]


@pytest.mark.parametrize("case", ["storage-fifo", "storage-urandom", "virtual-missing", "link-missing"])
def test_allow_external_still_refuses_what_cannot_be_read(capsys, data, tmp_path, case):
    """A FIFO would block, a device is no data, a missing source reads as the fill value."""
    spec = HOSTILE[case][0](tmp_path, data)
    out = tmp_path / "out.h5"
    refused(run(capsys, "convert", spec, "-o", out, "--allow-external"), 3, spec.partition("::")[0])
    assert not out.exists()


def test_soft_links_inside_the_file_are_read(capsys, data, tmp_path):
    path = tmp_path / "soft.h5"
    with h5py.File(path, "w") as h5:
        h5["real"] = np.ones((G, D), dtype=np.float32)
        h5["alias"] = h5py.SoftLink("/real")
    code, _, err = run(capsys, "convert", f"{path}::/alias", "-o", tmp_path / "out.h5", "-q")
    assert code == 0, err


@pytest.mark.parametrize("role", ["probe", "bank"])
def test_qbnorm_files_with_links_outside_are_refused(capsys, data, tmp_path, role):
    """qbnorm's own kinds open through the same check (a probe, a bank)."""
    copy = tmp_path / f"{role}.h5"
    copy.write_bytes(Path(getattr(data, role)).read_bytes())
    with h5py.File(copy, "a") as h5:
        h5["extra"] = h5py.ExternalLink(str(data.emb), "/gallery")
    out = tmp_path / "out.h5"
    args = (["normalise", "--queries", data.q, "--gallery", data.g, "--probe", copy, "-o", out] if role == "probe"
            else ["probe", "--bank", copy, "--gallery", data.g, "-o", out])
    refused(run(capsys, *args), 3, str(copy), "/extra is an external link")


# ----------------------------------------------------------------------------------------------
# 7. Tiny inputs, unbounded cost: declared sizes, chunks and members beyond --memory, outputs


def _never_written(tmp: Path) -> str:
    path = tmp / "declared.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("queries", shape=(10**9, D), dtype="<f4")  # nothing written: 2 KB on disk
    assert path.stat().st_size < 4096
    return f"{path}::/queries"


def _partly_written(tmp: Path) -> str:
    path = tmp / "partial.h5"
    with h5py.File(path, "w") as h5:
        ds = h5.create_dataset("queries", shape=(4096, D), dtype="<f4", chunks=(512, D), compression="gzip")
        ds[:512] = 1.0  # one chunk of eight
    return f"{path}::/queries"


def _foreign_never_written_chunks(tmp: Path) -> str:
    path = tmp / "unwritten.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("queries", shape=(10**7, D), dtype="<f4", chunks=(4096, D))
    return f"{path}::/queries"


@pytest.mark.parametrize("make", [_never_written, _partly_written, _foreign_never_written_chunks])
@pytest.mark.parametrize("command", ["normalise", "convert"])
def test_declared_but_never_stored_values_are_refused(capsys, data, tmp_path, make, command):
    """HDF5 reads storage that was never written as the fill value: a 2 KB file declaring 10⁹ rows
    started a 41 GB output."""
    spec = make(tmp_path)
    out = tmp_path / "out.h5"
    args = (["normalise", "--queries", spec, "--gallery", data.g, "--probe", data.probe, "--top-k", 5, "-o", out]
            if command == "normalise" else ["convert", spec, "-o", out])
    refused(run(capsys, *args), 3, spec, "would read as the fill value")
    assert not out.exists()


def _chunked(tmp: Path, rows: int, cols: int, name: str = "gallery") -> str:
    path = tmp / f"chunky_{name}.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset(name, data=np.zeros((rows, cols), dtype=np.float32), chunks=(rows, cols),
                          compression="gzip")
    return f"{path}::/{name}"


def test_a_chunk_beyond_the_budget_is_refused_before_any_read(capsys, data, tmp_path):
    """One compressed chunk is decompressed whole (again for every block that cuts it once it
    outgrows the chunk cache): a chunk may take an eighth of --memory, and 4 MiB under any."""
    spec = _chunked(tmp_path, 1024, 4096)  # one 16 MiB chunk, 16 KB on disk
    out = tmp_path / "out.h5"
    line = refused(run(capsys, "convert", spec, "-o", out, "--memory", "64MiB"), 3, spec,
                   "chunk 1024×4096 (16 MiB) exceeds 8 MiB, an eighth of --memory 64 MiB", "raise --memory", "h5repack")
    assert not out.exists(), line
    refused(run(capsys, "hubness", spec, "-o", out, "--memory", "64MiB"), 3, "chunk 1024×4096")
    code, _, err = run(capsys, "convert", spec, "-o", out, "--memory", "128MiB", "-q")
    assert code == 0, err
    # the library bounds by its memory argument
    with pytest.raises(DataError, match="exceeds 8 MiB, an eighth of memory 64 MiB"):
        api.convert(spec, tmp_path / "lib.h5", memory="64MiB")


def test_the_chunks_qbnorm_and_h5py_write_are_read_under_the_smallest_budget(capsys, data, tmp_path):
    spec = _chunked(tmp_path, 256, 1024)  # one 1 MiB chunk
    for args in (["convert", spec, "-o", tmp_path / "a.h5"],
                 ["normalise", "--queries", data.q, "--gallery", data.g, "--probe", data.probe, "-o",
                  tmp_path / "b.h5"],
                 ["hubness", _chunked(tmp_path, 256, 1024, "sims"), "-o", tmp_path / "c.h5", "--k", 3]):
        code, _, err = run(capsys, *args, "--memory", "1MiB", "-q")
        assert code == 0, (args, err)


def test_a_chunk_of_a_qbnorm_file_beyond_the_budget_is_refused(capsys, data, tmp_path):
    """qbnorm's own files are read whole: every dataset's chunks are checked when it is opened."""
    copy = tmp_path / "probe.h5"
    copy.write_bytes(Path(data.probe).read_bytes())
    with h5py.File(copy, "a") as h5:
        h5.create_dataset("padding", data=np.zeros((1024, 4096), dtype=np.float32), chunks=(1024, 4096),
                          compression="gzip")
    out = tmp_path / "out.h5"
    refused(run(capsys, "normalise", "--queries", data.q, "--gallery", data.g, "--probe", copy, "-o", out,
                "--memory", "64MiB"), 3, f"{copy}::/padding", "chunk")


def test_an_npz_member_beyond_the_budget_is_refused_before_it_is_inflated(capsys, tmp_path):
    """A zip bomb: a 64 MiB member compresses to 64 KB; .npz members are read whole."""
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, gallery=np.zeros((16384, 1024), dtype=np.float32))
    assert path.stat().st_size < 1 << 20
    out = tmp_path / "out.h5"
    for spec in (str(path), f"{path}::gallery"):
        refused(run(capsys, "convert", spec, "-o", out, "--memory", "32MiB"), 3, f"{path}::gallery",
                "a .npz member read whole (64 MiB) exceeds --memory 32 MiB", "raise --memory", ".npy")
        refused(run(capsys, "hubness", spec, "-o", out, "--memory", "32MiB"), 3, "64 MiB")
    code, _, err = run(capsys, "convert", path, "-o", out, "--memory", "256MiB", "-q")
    assert code == 0, err


def _pickle_allocating(shape=(600000, 1024)) -> bytes:
    """`numpy.ndarray(shape)` by REDUCE: 2.4 GB of nothing from 27 bytes."""
    import struct
    return (b"cnumpy\nndarray\n((J" + struct.pack("<i", shape[0]) + b"M" + struct.pack("<H", shape[1])
            + b"ttR.")


def _pickle_reconstructing(shape=(600000, 1024)) -> bytes:
    """numpy's own `_reconstruct(ndarray, shape, dtype)` with a shape whose values are not there."""
    import struct
    return (b"cnumpy._core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(J" + struct.pack("<i", shape[0])
            + b"M" + struct.pack("<H", shape[1]) + b"tC\x01btR.")


@pytest.mark.parametrize("payload", [_pickle_allocating, _pickle_reconstructing])
def test_a_pickle_cannot_allocate_what_it_does_not_hold(capsys, tmp_path, payload):
    path = tmp_path / "sims.pkl"
    path.write_bytes(payload())
    assert path.stat().st_size < 100
    out = tmp_path / "out.h5"
    refused(run(capsys, "convert", path, "-o", out), 3, str(path), "disallowed object")
    assert not out.exists()


def test_a_pickle_beyond_the_budget_is_refused(capsys, tmp_path):
    import pickle
    path = tmp_path / "sims.pkl"
    path.write_bytes(pickle.dumps(np.ones((1024, 1024), dtype=np.float32)))  # 4 MiB, read whole
    refused(run(capsys, "convert", path, "-o", tmp_path / "out.h5", "--memory", "2MiB"), 3,
            "a pickle read whole (4.0 MiB) exceeds --memory 2 MiB")
    code, _, err = run(capsys, "convert", path, "-o", tmp_path / "out.h5", "-q")
    assert code == 0, err


def test_an_output_beyond_max_output_or_free_disk_is_refused_up_front(capsys, data, tmp_path, monkeypatch):
    source = tmp_path / "wide.npy"
    np.save(source, np.ones((600, 1024), dtype=np.float32))  # 2.3 MiB as float32
    out = tmp_path / "out.h5"
    refused(run(capsys, "convert", source, "-o", out, "--max-output", "1MiB"), 2, str(out),
            "would be 2.3 MiB (600 × 1024 float32), more than --max-output 1 MiB", "raise --max-output")
    refused(run(capsys, "convert", source, "-o", out, "--max-output", "lots"), 2, "--max-output 'lots'")
    import shutil
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1 << 20))
    refused(run(capsys, "convert", source, "-o", out), 1, "but", "has 1 MiB free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=100))
    refused(run(capsys, "normalise", "--queries", data.q, "--gallery", data.g, "--probe", data.probe, "-o", out,
                "--top-k", 5), 1, f"{Q} × 5 scores and neighbours", "has 100 B free")
    refused(run(capsys, "build-bank", f"{data.emb}::/bank", "-o", out, "--size", 10), 1, "has 100 B free")
    refused(run(capsys, "probe", "--bank", data.bank, "--gallery", data.g, "-o", out, "--keep-sorted"), 1,
            f"{G} × {B} sorted bank scores", "has 100 B free")
    assert not out.exists() and leftovers(tmp_path) == []
    monkeypatch.undo()
    code, _, err = run(capsys, "convert", source, "-o", out, "-q")
    assert code == 0, err


# ----------------------------------------------------------------------------------------------
# 11. Every command reads every input format


@pytest.fixture()
def formats(tmp_path):
    """The same Q × G similarity matrix as .npy, .npz (one member, and two), a pickle, a pickled
    dict and HDF5; evaluate's ground truth beside it."""
    import pickle
    rng = np.random.default_rng(3)
    sims = rng.uniform(-1, 1, (Q, G)).astype(np.float32)
    np.save(tmp_path / "sims.npy", sims)
    np.savez(tmp_path / "sims.npz", sims=sims)
    np.savez(tmp_path / "two.npz", sims=sims, labels=np.arange(G))
    (tmp_path / "sims.pkl").write_bytes(pickle.dumps(sims))
    (tmp_path / "dict.pkl").write_bytes(pickle.dumps({"sims": sims, "name": "run"}))
    with h5py.File(tmp_path / "sims.h5", "w") as h5:
        h5["sims"] = sims
    np.save(tmp_path / "gt.npy", np.arange(Q))
    return {"npy": tmp_path / "sims.npy", "npz": tmp_path / "sims.npz", "npz-key": f"{tmp_path / 'two.npz'}::sims",
            "pickle": tmp_path / "sims.pkl", "pickled-dict": tmp_path / "dict.pkl", "hdf5": tmp_path / "sims.h5",
            "gt": tmp_path / "gt.npy"}


@pytest.mark.parametrize("fmt", ["npy", "npz", "npz-key", "pickle", "pickled-dict", "hdf5"])
def test_every_command_reads_every_format(capsys, tmp_path, formats, fmt):
    spec = formats[fmt]
    results = {}
    for command, args in {
        "hubness": ["hubness", spec, "--json", "-o", tmp_path / f"hub-{fmt}.h5"],
        "evaluate": ["evaluate", spec, "--gt", formats["gt"], "--json", "-o", tmp_path / f"ev-{fmt}.h5"],
        "convert": ["convert", spec, "--kind", "similarity", "--json", "-o", tmp_path / f"conv-{fmt}.h5"],
    }.items():
        code, out, err = run(capsys, *args)
        assert code == 0, (command, err)
        results[command] = json.loads(out)
    assert results["convert"]["rows"] == Q and results["convert"]["cols"] == G


# ----------------------------------------------------------------------------------------------
# 14. Ground truth and query masks, exactly


GT_CASES = {
    # name: (values, message)
    "bool": (np.ones(Q, dtype=bool), "booleans are not gallery indices"),
    "bool-2d": (np.eye(Q, G, dtype=bool), "booleans are not gallery indices"),
    "float-huge": (np.full(Q, 1e20), "gallery index 1e+20 in row 0 is outside any gallery"),
    "float-huge-negative": (np.r_[np.arange(Q - 1), -1e20], f"gallery index -1e+20 in row {Q - 1}"),
    "uint64-wrap": (np.r_[np.arange(Q - 1, dtype=np.uint64), np.uint64(2**63)], f"row {Q - 1} is outside any gallery"),
    "float-fraction": (np.r_[np.arange(Q - 1), 2.5], f"float64 value 2.5 in row {Q - 1}"),
    "float-nan": (np.r_[np.arange(Q - 1), np.nan], f"value nan in row {Q - 1}"),
    "beyond-gallery": (np.full(Q, G), f"gallery index {G} in row 0 is outside the gallery"),
    "negative": (np.r_[np.arange(Q - 1), -2], "negative gallery index"),
}


@pytest.mark.parametrize("case", sorted(GT_CASES))
def test_ground_truth_is_read_exactly(capsys, tmp_path, formats, case):
    values, message = GT_CASES[case]
    np.save(tmp_path / "bad_gt.npy", values)
    line = refused(run(capsys, "evaluate", formats["hdf5"], "--gt", tmp_path / "bad_gt.npy"), 3, message)
    assert "negative" not in line or case == "negative"


@pytest.mark.parametrize("mask", [[1, 2], [1, -1], [1, 255], [1, 0.5]])
def test_query_masks_are_zero_or_one(capsys, tmp_path, formats, mask):
    values = np.ones(Q, dtype=np.asarray(mask).dtype if np.asarray(mask).dtype.kind == "f" else np.int64)
    values[:2] = mask
    if mask[1] == 255:
        values = values.astype(np.uint8)
    np.save(tmp_path / "mask.npy", values)
    refused(run(capsys, "evaluate", formats["hdf5"], "--gt", formats["gt"], "--query-mask", tmp_path / "mask.npy"), 3,
            "entry 1 is", "booleans or 0/1")


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int64, np.float32])
def test_query_masks_of_booleans_or_zero_and_one_are_read(capsys, tmp_path, formats, dtype):
    values = np.ones(Q, dtype=dtype)
    values[3] = 0
    np.save(tmp_path / "mask.npy", values)
    code, _, err = run(capsys, "evaluate", formats["hdf5"], "--gt", formats["gt"], "--query-mask",
                         tmp_path / "mask.npy", "--json")
    assert code == 0, err


# ----------------------------------------------------------------------------------------------
# 18. File names holding '::'


@pytest.mark.parametrize("name", ["run::3.h5", "a::b::c.h5", "x::.npy", "sims::v2.npz", "dump::1.pkl"])
def test_file_names_with_double_colons_are_addressed(capsys, tmp_path, name):
    """A name that is an existing file is that file; otherwise the dataset follows the last '::'."""
    import pickle
    path = tmp_path / name
    sims = np.random.default_rng(1).uniform(-1, 1, (Q, G)).astype(np.float32)
    if name.endswith(".h5"):
        with h5py.File(path, "w") as h5:
            h5["sims"] = sims
    elif name.endswith(".npy"):
        np.save(path, sims)
    elif name.endswith(".npz"):
        np.savez(path, sims=sims)
    else:
        path.write_bytes(pickle.dumps({"sims": sims}))
    for spec in (path, f"{path}::sims", f"{path}::/sims") if not name.endswith(".npy") else (path,):
        code, out, err = run(capsys, "convert", spec, "--kind", "similarity", "-o", tmp_path / "out.h5", "--force",
                             "--json")
        assert code == 0, (spec, err)
        assert json.loads(out)["rows"] == Q
    refused(run(capsys, "convert", f"{path}::/nothing", "-o", tmp_path / "out2.h5"), 2 if name.endswith(".npy") else 3,
            str(path), "nothing")


def test_a_probe_whose_name_holds_double_colons(capsys, data, tmp_path):
    probe = tmp_path / "probe::v1.h5"
    probe.write_bytes(Path(data.probe).read_bytes())
    code, _, err = run(capsys, "normalise", "--queries", data.q, "--gallery", data.g, "--probe", probe,
                       "-o", tmp_path / "out.h5", "-q")
    assert code == 0, err
    refused(run(capsys, "normalise", "--queries", data.q, "--gallery", data.g, "--probe", f"{probe}::/log_norm",
                "-o", tmp_path / "out.h5"), 2, "named without '::'")


# ----------------------------------------------------------------------------------------------
# 8. Huge and subnormal norms


def _scaled_copy(tmp: Path, d, scale: float, rows=None) -> Path:
    path = tmp / f"scaled-{scale:g}.h5"
    with h5py.File(d.emb, "r") as src, h5py.File(path, "w") as h5:
        for name in ("queries", "gallery"):
            values = src[name][()].astype(np.float64)
            if rows is None:
                values *= scale
            else:
                values[rows] *= scale
            h5[name] = values.astype(np.float32)
    return path


@pytest.mark.parametrize("scale", [1e20, 1e30, 1e-22, 1e-30, "mixed"])
@pytest.mark.parametrize("block_rows", [None, 3])
def test_huge_and_subnormal_norms_give_the_cosine_scores_of_the_unscaled_rows(capsys, data, tmp_path, scale,
                                                                                   block_rows):
    """float32 norms overflow beyond 1.8e19 (every score was 0, top-1 item 0, numpy warnings on
    stderr) and lose digits below 1e-19 (scores off by 14 %): taken in float64, held or streamed."""
    rows = [1, 4, 7] if scale == "mixed" else None
    path = _scaled_copy(tmp_path, data, 1e20 if scale == "mixed" else scale, rows)
    if scale == "mixed":  # some rows huge, others subnormal-squared
        with h5py.File(path, "a") as h5:
            for name in ("queries", "gallery"):
                values = h5[name][()].astype(np.float64)
                values[[2, 5]] *= 1e-22
                h5[name][...] = values.astype(np.float32)
    extra = ["--block-rows", block_rows] if block_rows else []
    outs = {}
    for label, source in (("plain", data.emb), ("scaled", path)):
        out = tmp_path / f"{label}.h5"
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # numpy's overflow warnings: an internal error now
            code, _, err = run(capsys, "normalise", "--queries", f"{source}::/queries", "--gallery",
                               f"{source}::/gallery", "--probe", data.probe, "--method", "none", "-o", out, "--force",
                               "--accept-mismatch", "--dtype", "float64", *extra)
        assert code == 0, err
        with h5py.File(out, "r") as h5:
            outs[label] = h5["scores"][()]
    assert np.abs(outs["scaled"] - outs["plain"]).max() < 1e-6
    assert (outs["scaled"].argmax(axis=1) == outs["plain"].argmax(axis=1)).all()


def test_huge_norms_with_dot_similarity_are_refused_naming_the_row(capsys, data, tmp_path):
    path = _scaled_copy(tmp_path, data, 1e20, rows=[4])
    refused(run(capsys, "normalise", "--queries", f"{path}::/queries", "--gallery", f"{path}::/gallery",
                "--probe", data.probe, "--similarity", "dot", "-o", tmp_path / "out.h5"), 3,
            "row 4 has norm", "would overflow float32", "--similarity cosine")


def test_huge_and_subnormal_norms_in_the_library_and_the_probe(data):
    rng = np.random.default_rng(5)
    bank, gallery = rng.standard_normal((B, D)).astype(np.float32), rng.standard_normal((G, D)).astype(np.float32)
    plain = api.probe(bank, gallery)
    for scale in (1e20, 1e-22):
        scaled = api.probe((bank.astype(np.float64) * scale).astype(np.float32),
                           (gallery.astype(np.float64) * scale).astype(np.float32))
        assert np.allclose(scaled.log_norm(20.0), plain.log_norm(20.0), atol=1e-4)


# ----------------------------------------------------------------------------------------------
# 9. Every parameter has a finite range, checked up front; no output holds NaN or Inf


PARAMETER_CASES = [
    (["probe", "--beta", "1e300"], "--beta 1e+300: must be a finite number > 0 and ≤ 1e+12"),
    (["probe", "--gallery-beta", "1e20"], "--gallery-beta 1e+20: must be a finite number > 0 and ≤ 1e+12"),
    (["normalise", "--beta", "1e300"], "--beta 1e+300: must be a finite number > 0 and ≤ 1e+12"),
    (["normalise", "--method", "dn", "--lambda", "1e308"], "--lambda 1e+308: must be a finite number ≥ 0 and ≤ 1e+06"),
    (["normalise", "--method", "nnn", "--topk-mean", "3", "--alpha", "1e308"],
     "--alpha 1e+308: must be a finite number ≥ -1e+06"),
    (["normalise", "--method", "nnn", "--topk-mean", "3", "--alpha", "-1e308"],
     "--alpha -1e+308: must be a finite number ≥ -1e+06"),
    (["normalise", "--method", "nnn", "--topk-mean", "3", "--alpha", "inf"], "--alpha inf: must be a finite number"),
    (["export", "--constant", "1e39"], "--constant 1e+39: must be a finite number ≥ 1e-30 and ≤ 1e+30"),
    (["export", "--constant", "1e-45"], "--constant 1e-45: must be a finite number ≥ 1e-30"),
    (["export", "--method", "nnn", "--topk-mean", "3", "--alpha", "1e308"], "--alpha 1e+308"),
    (["tune", "--beta", "1e300"], "--beta 1e+300: must be a finite number > 0 and ≤ 1e+12"),
]


def _command(d, tmp, args):
    command, *rest = args
    out = tmp / ("export" if command == "export" else "out.h5")
    if command == "probe":
        return ["probe", "--bank", d.bank, "--gallery", d.g, "-o", out, *rest]
    if command == "normalise":
        return ["normalise", "--queries", d.q, "--gallery", d.g, "--probe", d.probe, "-o", out, *rest]
    if command == "export":
        return ["export", "--probe", d.probe, "--gallery", d.g, "-o", tmp / "export.h5", *rest]
    gt = tmp / "gt.npy"
    np.save(gt, np.arange(Q) % G)
    return ["tune", "--queries", d.q, "--gallery", d.g, "--gt", gt, "--bank", d.bank, "-o", tmp / "params.json",
            *rest]


@pytest.mark.parametrize("number", range(len(PARAMETER_CASES)))
def test_parameters_beyond_their_range_are_refused_up_front(capsys, data, tmp_path, number):
    args, message = PARAMETER_CASES[number]
    refused(run(capsys, *_command(data, tmp_path, args)), 2, message)
    assert list(tmp_path.iterdir()) in ([], [tmp_path / "gt.npy"])


def test_parameter_ranges_are_in_the_help(capsys):
    from qbnorm_cli import methods
    for name, parameter in methods.PARAMETERS.items():
        assert parameter.range_text, name
        assert "inf" not in parameter.range_text
    _, out, _ = run(capsys, "normalise", "--help")
    assert "≤ 1e+12" in " ".join(out.split()) and "≤ 1e+06" in " ".join(out.split())


def test_an_output_never_holds_nan_or_inf(capsys, tmp_path):
    """Scores within every range may still overflow float32 (dot scores of 1e33, α = −10⁶): the
    write refuses them, the last line of defence, and leaves nothing behind."""
    from qbnorm_cli.io.atomic import OutputFile
    rng = np.random.default_rng(2)
    bank_sims = rng.uniform(0, 1, (B, G)).astype(np.float32) * np.float32(1e33)
    sims = rng.uniform(0, 1, (Q, G)).astype(np.float32) * np.float32(1e33)
    np.save(tmp_path / "bank.npy", bank_sims)
    np.save(tmp_path / "sims.npy", sims)
    code, _, err = run(capsys, "probe", "--bank-sims", tmp_path / "bank.npy", "-o", tmp_path / "probe.h5", "-q")
    assert code == 0, err
    out = tmp_path / "out.h5"
    refused(run(capsys, "normalise", "--sims", tmp_path / "sims.npy", "--probe", tmp_path / "probe.h5", "--method",
                "nnn", "--alpha", "-1e6", "-o", out), 3, f"{out}::/scores", "non-finite", "nothing was written")
    assert not out.exists() and leftovers(tmp_path) == []
    for bad in (np.inf, -np.inf, np.nan):
        with pytest.raises(DataError, match="row 1 would hold a non-finite value"):
            with OutputFile(str(tmp_path / "direct.h5"), "embeddings", force=True, params={}) as written:
                ds = written.create("/embeddings", shape=(2, 2), dtype=np.float32)
                written.write_rows(ds, 0, np.array([[0, 1], [bad, 0]], dtype=np.float32))
        assert not (tmp_path / "direct.h5").exists()


# ----------------------------------------------------------------------------------------------
# 12. Integers beyond C types: exit 2 for options, 3 for a params file


INTEGER_CASES = [
    ["probe", "--sinkhorn", "--sinkhorn-max-iters", 10**30],
    ["probe", "--sinkhorn", "--sinkhorn-iters", 2**31],
    ["probe", "--k", 10**30],
    ["probe", "--topk-mean", 10**20],
    ["normalise", "--k", -(10**30)],
    ["normalise", "--top-k", 2**63],
    ["normalise", "--min-count", 10**30],
    ["normalise", "--block-rows", 10**30],
    ["export", "--format", "faiss", "--index-type", "hnsw", "--hnsw-m", 10**30],
    ["export", "--format", "faiss", "--index-type", "ivf", "--nprobe", 10**30],
    ["export", "--format", "faiss", "--index-type", "hnsw", "--ef-search", 2**40],
]


@pytest.mark.parametrize("number", range(len(INTEGER_CASES)))
def test_integer_options_beyond_c_types_are_usage_errors(capsys, data, tmp_path, number):
    args = INTEGER_CASES[number]
    flag = next(a for a in args if isinstance(a, str) and a.startswith("--") and a != "--sinkhorn" and a != "--format"
                and a != "--index-type")
    refused(run(capsys, *_command(data, tmp_path, [str(a) for a in args])), 2, flag, "must be at most")


def test_queries_per_item_beyond_c_types(capsys, tmp_path, formats):
    refused(run(capsys, "evaluate", formats["hdf5"], "--queries-per-item", 10**30), 2, "--queries-per-item",
            "must be at most 2147483647")
    with pytest.raises(Exception, match=r"queries_per_item .*must be at most 2147483647"):
        api.evaluate(str(formats["hdf5"]), queries_per_item=10**30)


@pytest.mark.parametrize(("key", "value"), [(key, value) for key in ("beta", "k", "alpha")
                                            for value in ("1" * 400, "-" + "9" * 400, "1e999", "1e300")]
                         + [("k", "2147483648"), ("k", str(2**63))])
def test_a_params_file_with_numbers_beyond_range_is_exit_3(capsys, data, tmp_path, key, value):
    gt = tmp_path / "gt.npy"
    np.save(gt, np.arange(Q) % G)
    params = tmp_path / "params.json"
    code, _, err = run(capsys, "tune", "--queries", data.q, "--gallery", data.g, "--gt", gt, "--bank", data.bank,
                       "-o", params, "--methods", "nnn,dis", "-q")
    assert code == 0, err
    document = json.loads(params.read_text())
    document.update(method="nnn" if key == "alpha" else "dis", beta=20.0, k=1, min_count=1, alpha=0.75, topk_mean=3)
    document[key] = "NUMBER"
    params.write_text(json.dumps(document).replace('"NUMBER"', value))
    line = refused(run(capsys, "normalise", "--queries", data.q, "--gallery", data.g, "--probe", data.probe,
                       "-o", tmp_path / "out.h5", "--params", params), 3, f"{params}", key)
    assert len(line) < 400


@pytest.mark.slow
def test_a_cluster_follows_external_storage_only_as_the_client_allowed(tmp_path):
    """Workers open the inputs themselves: under the client's allow_external, not their own default."""
    distributed = pytest.importorskip("distributed")
    from qbnorm_cli.streaming.cluster import local_cluster

    sims = tmp_path / "sims.h5"
    with h5py.File(sims, "w") as h5:
        h5["sims"] = np.random.default_rng(4).uniform(-1, 1, (G, G)).astype(np.float32)
    layout = h5py.VirtualLayout(shape=(G, G), dtype="<f4")
    layout[:] = h5py.VirtualSource(str(sims), "/sims", shape=(G, G))
    virtual = tmp_path / "virtual-sims.h5"
    with h5py.File(virtual, "w") as h5:
        h5.create_virtual_dataset("sims", layout, fillvalue=0)
    cluster = local_cluster(1)
    try:
        with distributed.Client(cluster, set_as_default=False) as client:
            with pytest.raises(DataError, match="allow_external=True"):
                api.hubness(f"{virtual}::/sims", k=3, cluster=client)
            there = api.hubness(f"{virtual}::/sims", k=3, cluster=client, allow_external=True)
            here = api.hubness(f"{sims}::/sims", k=3)
    finally:
        cluster.close()
    assert np.array_equal(there["k_occurrence"][3], here["k_occurrence"][3])
