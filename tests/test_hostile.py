"""Hostile files and hostile values (issue 24): what a file may make qbnorm read, allocate or write.

Each test tries the variants of one class: HDF5 external storage, external links and virtual
datasets (refused unless --allow-external); declared sizes and compressed chunks or members that
expand beyond --memory; outputs beyond --max-output; norms that overflow or underflow float32;
parameters whose results overflow; integers beyond C types; inexact ground truth; `::` in names.
"""

from __future__ import annotations

import json
import os
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
