"""Bad input through the CLI: one stderr line naming file, dataset and problem, a documented exit
code, no traceback, no output and no temporary file left behind (docs/errors.md)."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import tolerance as tol
from helpers import leftovers, run
from scipy.special import logsumexp

from qbnorm_cli.cli import main
from qbnorm_cli.io import hdf5, specs

G, B, Q, D = 30, 40, 12, 8


def assert_refused(result, code: int, *needles, out=None) -> str:
    """Exit `code`, exactly one stderr line `qbnorm: error: …` holding every needle, no output."""
    got, stdout, err = result
    assert got == code, err
    assert "Traceback" not in err + stdout
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("qbnorm: error: "), err
    for needle in needles:
        assert str(needle) in lines[0], (needle, err)
    if out is not None:
        assert not Path(out).exists()
        assert leftovers(Path(out).parent) == []
    return lines[0]


def ok(capsys, *args) -> str:
    code, out, err = run(capsys, *args)
    assert code == 0, err
    return out


def embeddings(rng, n, d=D):
    return rng.standard_normal((n, d)).astype(np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """emb.h5 (foreign embeddings), bank.h5, probe.h5 (β 20, k 1), sims.h5 and other odd files."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    d = SimpleNamespace(root=root, emb=root / "emb.h5")
    with h5py.File(d.emb, "w") as h5:
        h5["bank"] = embeddings(rng, B)
        h5["gallery"] = embeddings(rng, G)
        h5["queries"] = embeddings(rng, Q)
        h5["other_gallery"] = embeddings(rng, G)
        h5["small_gallery"] = embeddings(rng, G - 5)
        h5["wide_gallery"] = embeddings(rng, G, D + 1)
        h5["vector"] = np.zeros(5, dtype=np.float32)
        h5["cube"] = np.zeros((2, 3, 4), dtype=np.float32)
        h5["no_rows"] = np.zeros((0, D), dtype=np.float32)
        h5["no_cols"] = np.zeros((5, 0), dtype=np.float32)
        h5["words"] = np.array([b"a", b"b"], dtype=object)
        h5["complex"] = np.zeros((4, D), dtype=np.complex64)
        h5["sims"] = rng.uniform(-1, 1, (Q, G)).astype(np.float32)
        h5["sims_narrow"] = rng.uniform(-1, 1, (Q, G - 1)).astype(np.float32)
        h5.create_group("group")
    d.g = f"{d.emb}::/gallery"
    d.q = f"{d.emb}::/queries"
    d.bank = root / "bank.h5"
    d.probe = root / "probe.h5"
    d.sims = f"{d.emb}::/sims"
    return d


@pytest.fixture(scope="module")
def made(data, tmp_path_factory):
    """Outputs of the real pipeline on `data` (made once; capsys is function-scoped, so main() directly)."""
    assert main(["build-bank", f"{data.emb}::/bank", "-o", data.bank, "--strategy", "all", "-q"]) == 0
    assert main(["probe", "--bank", data.bank, "--gallery", data.g, "-o", data.probe, "-q",
                 "--topk-mean", "3"]) == 0
    data.scores = data.root / "scores.h5"
    assert main(["normalise", "--queries", data.q, "--gallery", data.g, "--probe", data.probe,
                 "-o", data.scores, "-q", "--method", "none"]) == 0
    return data


def normalise(d, out, *extra, queries=None, gallery=None, probe=None):
    return ["normalise", "--queries", queries or d.q, "--gallery", gallery or d.g,
            "--probe", probe or d.probe, "-o", out, "-q", *extra]


# ----------------------------------------------------------------------------------------------
# Files that cannot be read at all


def _fifo(tmp):
    path = tmp / "pipe.h5"
    os.mkfifo(path)
    return path


def _directory(tmp):
    (tmp / "adir.h5").mkdir()
    return tmp / "adir.h5"


def _file(name, content: bytes):
    def make(tmp):
        (tmp / name).write_bytes(content)
        return tmp / name

    return make


BAD_FILES = {
    # name: (make(tmp) -> path, exit code, problem text)
    "missing": (lambda tmp: tmp / "nope.h5", 2, "no such file"),
    "missing-parent": (lambda tmp: tmp / "nodir" / "nope.h5", 2, "no such file"),
    "directory": (_directory, 2, "is a directory"),
    "fifo": (_fifo, 2, "not a regular file"),
    "text": (_file("notes.h5", b"id,x\n1,2\n"), 3, "not a format qbnorm reads; it reads HDF5"),
    "empty-file": (_file("empty.h5", b""), 3, "empty file"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
@pytest.mark.parametrize("role", ["queries", "gallery", "probe", "source"])
def test_unusable_input_file(capsys, made, tmp_path, case, role):
    make, code, problem = BAD_FILES[case]
    bad = make(tmp_path)
    out = tmp_path / "out.h5"
    if role == "source":
        args = ["build-bank", bad, "-o", out, "--size", 3]
    else:
        args = normalise(made, out, **{role: bad})
    assert_refused(run(capsys, *args), code, bad, problem, out=out)


def test_unreadable_file(capsys, made, tmp_path, monkeypatch):
    bad = tmp_path / "secret.h5"
    shutil.copy(made.emb, bad)
    bad.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make the open itself fail as it would for a user
        real_open = open

        def refusing_open(path, *args, **kwargs):
            if Path(path) == bad:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        for module in (hdf5, specs):  # where inputs are first opened
            monkeypatch.setattr(module, "open", refusing_open, raising=False)
    out = tmp_path / "out.h5"
    for spec in (f"{bad}::/queries", bad.with_suffix(".npy")):
        if str(spec).endswith(".npy"):
            np.save(spec, np.ones((3, D), dtype=np.float32))
            Path(spec).chmod(0)
            bad = Path(spec)
        assert_refused(run(capsys, *normalise(made, out, queries=spec)), 1, bad, "permission denied", out=out)


def test_truncated_hdf5(capsys, made, tmp_path):
    for name, source in (("probe", made.probe), ("emb", made.emb)):
        bad = tmp_path / f"cut-{name}.h5"
        raw = Path(source).read_bytes()
        bad.write_bytes(raw[: len(raw) // 3])
        out = tmp_path / "out.h5"
        args = normalise(made, out, probe=bad) if name == "probe" else normalise(made, out, queries=f"{bad}::/queries")
        assert_refused(run(capsys, *args), 3, bad, "truncated or corrupt", out=out)


def test_corrupt_hdf5_metadata(capsys, made, tmp_path):
    bad = tmp_path / "garbled.h5"
    raw = bytearray(Path(made.emb).read_bytes())
    raw[800:4800] = b"\xff" * 4000  # object headers / symbol table, not the superblock
    bad.write_bytes(bytes(raw))
    out = tmp_path / "out.h5"
    assert_refused(run(capsys, *normalise(made, out, queries=f"{bad}::/queries")), 3, bad, "corrupt", out=out)


# ----------------------------------------------------------------------------------------------
# Datasets


@pytest.mark.parametrize("dataset, problem", [
    ("/missing", "no dataset /missing; it has /bank, /complex, /cube"),
    ("/group", "no dataset /group"),
    ("/vector", "expected a 2-D array, got shape (5,)"),
    ("/cube", "expected a 2-D array, got shape (2, 3, 4)"),
    ("/no_rows", "empty array, shape (0, 8)"),
    ("/no_cols", "empty array, shape (5, 0)"),
    ("/words", "is not numeric"),
    ("/complex", "is not numeric"),
])
def test_bad_dataset(capsys, made, tmp_path, dataset, problem):
    out = tmp_path / "out.h5"
    line = assert_refused(run(capsys, *normalise(made, out, queries=f"{made.emb}::{dataset}")), 3, problem, out=out)
    assert str(made.emb) in line


def test_dataset_must_be_named_when_ambiguous(capsys, made, tmp_path):
    out = tmp_path / "out.h5"
    assert_refused(run(capsys, *normalise(made, out, queries=made.emb)), 3, made.emb, "::/NAME", "/queries", out=out)


def test_dataset_of_an_npy_file(capsys, made, tmp_path):
    npy = tmp_path / "q.npy"
    np.save(npy, np.ones((3, D), dtype=np.float32))
    renamed = tmp_path / "q.bin"
    shutil.copy(npy, renamed)
    out = tmp_path / "out.h5"
    assert_refused(run(capsys, *normalise(made, out, queries=f"{renamed}::/x")), 2, renamed, "one array", out=out)


# ----------------------------------------------------------------------------------------------
# Kinds and versions


def test_wrong_kind(capsys, made, tmp_path):
    out = tmp_path / "out.h5"
    assert_refused(run(capsys, *normalise(made, out, queries=made.probe)), 3, made.probe,
                   "qbnorm probe file; expected embeddings or bank", out=out)
    assert_refused(run(capsys, *normalise(made, out, gallery=made.scores)), 3, made.scores,
                   "qbnorm similarity file", out=out)
    assert_refused(run(capsys, *normalise(made, out, probe=made.bank)), 3, made.bank,
                   "a qbnorm bank file; expected a qbnorm probe file", out=out)
    assert_refused(run(capsys, *normalise(made, out, probe=made.emb)), 3, made.emb,
                   "not a qbnorm file; expected a qbnorm probe file", out=out)
    assert_refused(run(capsys, "probe", "--bank-sims", made.bank, "-o", out), 3, made.bank,
                   "expected similarity", out=out)


@pytest.mark.parametrize("which", ["probe", "bank"])
def test_newer_format_version(capsys, made, tmp_path, which):
    newer = tmp_path / f"{which}-v99.h5"
    shutil.copy(made.probe if which == "probe" else made.bank, newer)
    with h5py.File(newer, "a") as h5:
        h5.attrs["qbnorm_version"] = 99
    out = tmp_path / "out.h5"
    args = normalise(made, out, probe=newer) if which == "probe" else ["build-bank", newer, "-o", out, "--size", 2]
    assert_refused(run(capsys, *args), 3, newer, "qbnorm_version 99 is newer", out=out)


# ----------------------------------------------------------------------------------------------
# Shapes and identities


def test_dimension_mismatch(capsys, made, tmp_path):
    out = tmp_path / "out.h5"
    wide = f"{made.emb}::/wide_gallery"
    assert_refused(run(capsys, "probe", "--bank", made.bank, "--gallery", wide, "-o", out), 3,
                   "dimension 8", "/wide_gallery has 9", out=out)
    assert_refused(run(capsys, "probe", "--bank", made.bank, "--gallery", made.g, "--gallery-bank", wide, "-o", out),
                   3, "/wide_gallery has dimension 9", out=out)
    wide_q = tmp_path / "wide_q.npy"
    np.save(wide_q, np.ones((4, D + 1), dtype=np.float32))
    assert_refused(run(capsys, *normalise(made, out, queries=wide_q)), 3, wide_q, "dimension 9", out=out)


def test_gallery_size_mismatch(capsys, made, tmp_path):
    out = tmp_path / "out.h5"
    assert_refused(run(capsys, *normalise(made, out, gallery=f"{made.emb}::/small_gallery")), 3,
                   "/small_gallery has 25 rows", made.probe, "gallery of 30", out=out)
    args = ["normalise", "--sims", f"{made.emb}::/sims_narrow", "--probe", made.probe, "-o", out]
    assert_refused(run(capsys, *args), 3, "/sims_narrow has 29 columns", "30", out=out)
    args = ["probe", "--bank", made.bank, "--gallery", made.g, "--gallery-bank-sims", f"{made.emb}::/sims_narrow",
            "-o", out]
    assert_refused(run(capsys, *args), 3, "/sims_narrow has 29 columns", out=out)


def test_probe_from_another_gallery(capsys, made, tmp_path):
    out = tmp_path / "out.h5"
    other = f"{made.emb}::/other_gallery"
    assert_refused(run(capsys, *normalise(made, out, gallery=other)), 3, made.probe, "another gallery",
                   "--accept-mismatch", out=out)
    ok(capsys, *normalise(made, out, "--accept-mismatch", gallery=other))
    assert out.exists()


# ----------------------------------------------------------------------------------------------
# Values


def _with_row(tmp, name, base, row, value):
    arr = np.array(base, dtype=np.float32)
    arr[row, 2] = value
    path = tmp / name
    with h5py.File(path, "w") as h5:
        h5["x"] = arr
    return f"{path}::/x"


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_embeddings(capsys, made, tmp_path, value):
    with h5py.File(made.emb, "r") as h5:
        queries, gallery, bank = h5["queries"][()], h5["gallery"][()], h5["bank"][()]
    out = tmp_path / "out.h5"
    bad_q = _with_row(tmp_path, "q.h5", queries, 7, value)
    assert_refused(run(capsys, *normalise(made, out, queries=bad_q)), 3, bad_q, "non-finite", "row 7", out=out)
    bad_g = _with_row(tmp_path, "g.h5", gallery, 11, value)
    assert_refused(run(capsys, "probe", "--bank", made.bank, "--gallery", bad_g, "-o", out), 3, bad_g,
                   "row 11", out=out)
    assert_refused(run(capsys, *normalise(made, out, gallery=bad_g, probe=made.probe)), 3, "row 11", out=out)
    bad_b = _with_row(tmp_path, "b.h5", bank, 33, value)
    assert_refused(run(capsys, "build-bank", bad_b, "-o", out, "--strategy", "all"), 3, bad_b, "row 33", out=out)
    # a small block size: the row number is still absolute
    assert_refused(run(capsys, *normalise(made, out, "--block-rows", 3, queries=bad_q)), 3, "row 7", out=out)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_scores(capsys, made, tmp_path, value):
    with h5py.File(made.emb, "r") as h5:
        sims = h5["sims"][()]
    bad = _with_row(tmp_path, "s.h5", sims, 5, value)
    out = tmp_path / "out.h5"
    assert_refused(run(capsys, "normalise", "--sims", bad, "--probe", made.probe, "-o", out), 3, bad,
                   "non-finite", "row 5", out=out)
    assert_refused(run(capsys, "probe", "--bank-sims", bad, "-o", out), 3, bad, "row 5", out=out)


def test_float64_beyond_float32(capsys, made, tmp_path):
    q = tmp_path / "huge.npy"
    arr = np.ones((4, D))
    arr[2, 0] = 1e300
    np.save(q, arr)
    out = tmp_path / "out.h5"
    assert_refused(run(capsys, *normalise(made, out, queries=q)), 3, q, "too large for float32", "row 2", out=out)


def test_zero_norm_rows_with_cosine(capsys, made, tmp_path):
    with h5py.File(made.emb, "r") as h5:
        queries, gallery = h5["queries"][()], h5["gallery"][()]
    queries[4] = 0
    gallery[9] = 0
    out = tmp_path / "out.h5"
    bad_q, bad_g = tmp_path / "q0.npy", tmp_path / "g0.npy"
    np.save(bad_q, queries)
    np.save(bad_g, gallery)
    assert_refused(run(capsys, *normalise(made, out, queries=bad_q)), 3, bad_q, "row 4 has zero norm", out=out)
    assert_refused(run(capsys, "probe", "--bank", made.bank, "--gallery", bad_g, "-o", out), 3, bad_g,
                   "row 9 has zero norm", "--similarity dot", out=out)
    ok(capsys, "probe", "--bank", made.bank, "--gallery", bad_g, "-o", out, "--similarity", "dot", "-q")


@pytest.mark.parametrize("dtype", ["int8", "int64", "uint16", "float16", "float64"])
def test_other_dtypes_equal_the_float32_path(capsys, tmp_path, dtype):
    rng = np.random.default_rng(3)
    base = {name: rng.integers(0 if dtype.startswith("u") else -8, 9, (n, D)).astype(np.float32)
            for name, n in (("bank", B), ("gallery", G), ("queries", Q))}
    for arr in base.values():
        arr[:, 0] = 9  # no zero rows
    results = {}
    for kind in ("float32", dtype):
        src = tmp_path / f"{kind}.h5"
        with h5py.File(src, "w") as h5:
            for name, arr in base.items():
                h5[name] = arr.astype(kind)
        bank, probe = tmp_path / f"bank-{kind}.h5", tmp_path / f"probe-{kind}.h5"
        ok(capsys, "build-bank", f"{src}::/bank", "-o", bank, "--size", 25, "--seed", 1, "-q")
        ok(capsys, "probe", "--bank", bank, "--gallery", f"{src}::/gallery", "-o", probe, "-q")
        out = tmp_path / f"dis-{kind}.h5"
        ok(capsys, "normalise", "--queries", f"{src}::/queries", "--gallery", f"{src}::/gallery", "--probe", probe,
           "-o", out, "-q")
        with h5py.File(bank) as b, h5py.File(probe) as p, h5py.File(out) as o:
            results[kind] = (b["embeddings"][()], p["log_norm"][()], p["bank_neighbors"][()], o["scores"][()])
        # the probe made from the float32 file accepts the same gallery stored as `dtype` (same identity)
        ok(capsys, "normalise", "--queries", f"{src}::/queries", "--gallery", f"{src}::/gallery",
           "--probe", tmp_path / "probe-float32.h5", "-o", tmp_path / f"cross-{kind}.h5", "-q")
    for a, b in zip(results["float32"], results[dtype], strict=True):
        np.testing.assert_array_equal(a, b)


def test_very_large_scores_stay_finite(capsys, tmp_path):
    """CLIP-like logits (×100) and β up to 1000: log domain, no overflow, no NaN, the exact ranking."""
    rng = np.random.default_rng(4)
    draw = lambda n: (rng.integers(-4, 5, (n, D)) * 2.0).astype(np.float32)  # dots up to ±512, exact
    bank, gallery, queries = draw(B), draw(G), draw(Q)
    src = tmp_path / "logits.h5"
    with h5py.File(src, "w") as h5:
        h5["bank"], h5["gallery"], h5["queries"] = bank, gallery, queries
        h5["bank_sims"] = bank @ gallery.T
        h5["sims"] = queries @ gallery.T
    P, S = bank.astype(np.float64) @ gallery.T.astype(np.float64), queries.astype(np.float64) @ gallery.T
    for beta in (1.0, 100.0, 1000.0):
        probe = tmp_path / f"probe-{beta:g}.h5"
        ok(capsys, "probe", "--bank", f"{src}::/bank", "--gallery", f"{src}::/gallery", "--similarity", "dot",
           "--beta", beta, "-o", probe, "-q", "--force")
        probe_sims = tmp_path / f"probe-sims-{beta:g}.h5"
        ok(capsys, "probe", "--bank-sims", f"{src}::/bank_sims", "--beta", beta, "-o", probe_sims, "-q", "--force")
        ref = beta * S - logsumexp(beta * P, axis=0)
        # the products are exact (integers): only the float64 LSE over B terms of spread ≤ 1024 errs,
        # in qbnorm and in scipy; float32 output rounds once more
        lse = 2 * tol.lse64(B, beta, 1024.0, beta * 512 + 10)
        bound = lse + 2 * tol.eval64(2 * beta * 512 + 10)
        for p, inputs in ((probe, ["--queries", f"{src}::/queries", "--gallery", f"{src}::/gallery"]),
                          (probe_sims, ["--sims", f"{src}::/sims"])):
            with h5py.File(p) as h5:
                log_norm = h5["log_norm"][0]
            assert np.isfinite(log_norm).all()
            tol.assert_close(log_norm, logsumexp(beta * P, axis=0), lse)
            for dtype in ("float32", "float64"):
                out = tmp_path / f"is-{beta:g}-{dtype}.h5"
                ok(capsys, "normalise", *inputs, "--probe", p, "--method", "is", "--dtype", dtype, "-o", out,
                   "-q", "--force")
                with h5py.File(out) as h5:
                    scores = h5["scores"][()]
                assert np.isfinite(scores).all()
                tol.assert_close(scores, ref, bound + (tol.stored32(ref) if dtype == "float32" else 0.0))


# ----------------------------------------------------------------------------------------------
# Untrusted data never runs code


class _Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_npy_never_unpickles(capsys, made, tmp_path):
    marker = tmp_path / "code-ran"
    out = tmp_path / "out.h5"
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([[_Payload(marker), 1.0]], dtype=object), allow_pickle=True)
    assert_refused(run(capsys, *normalise(made, out, queries=objects)), 3, objects, "Python objects", out=out)
    disguised = tmp_path / "pickle.npy"
    disguised.write_bytes(pickle.dumps(_Payload(marker)))
    assert_refused(run(capsys, *normalise(made, out, queries=disguised)), 3, disguised, "not a valid .npy", out=out)
    assert_refused(run(capsys, "build-bank", disguised, "-o", out, "--size", 1), 3, disguised, out=out)
    assert not marker.exists()


def test_npy_inputs(capsys, made, tmp_path):
    """A valid .npy works like the HDF5 dataset it copies; a truncated one is refused."""
    with h5py.File(made.emb) as h5:
        queries = h5["queries"][()]
    npy = tmp_path / "q.npy"
    np.save(npy, queries)
    ok(capsys, *normalise(made, tmp_path / "a.h5", "--method", "none", queries=npy))
    renamed = tmp_path / "q.data"  # .npy recognised by its header whatever the name
    shutil.copy(npy, renamed)
    ok(capsys, *normalise(made, tmp_path / "b.h5", "--method", "none", queries=renamed))
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b, h5py.File(made.scores) as ref:
        np.testing.assert_array_equal(a["scores"][()], ref["scores"][()])
        np.testing.assert_array_equal(b["scores"][()], ref["scores"][()])
    cut = tmp_path / "cut.npy"
    cut.write_bytes(npy.read_bytes()[:200])
    out = tmp_path / "out.h5"
    assert_refused(run(capsys, *normalise(made, out, queries=cut)), 3, cut, "truncated or corrupt", out=out)
    header_only = tmp_path / "header.npy"
    header_only.write_bytes(npy.read_bytes()[:5])
    assert_refused(run(capsys, *normalise(made, out, queries=header_only)), 3, header_only, out=out)


# ----------------------------------------------------------------------------------------------
# Parameters


PARAMS = [
    # (command builder, exit code, expected text)
    (lambda d, o: normalise(d, o, "--beta", 0), 2, "--beta 0.0: must be a finite number > 0"),
    (lambda d, o: normalise(d, o, "--beta", -1), 2, "--beta -1.0"),
    (lambda d, o: normalise(d, o, "--beta", "nan"), 2, "--beta nan"),
    (lambda d, o: normalise(d, o, "--beta", "inf"), 2, "--beta inf"),
    (lambda d, o: ["probe", "--bank", d.bank, "--gallery", d.g, "-o", o, "--beta", 0], 2, "--beta 0.0"),
    (lambda d, o: ["probe", "--bank", d.bank, "--gallery", d.g, "-o", o, "--beta", "-inf"], 2, "--beta -inf"),
    (lambda d, o: ["probe", "--bank", d.bank, "--gallery", d.g, "-o", o, "--gallery-bank", d.bank,
                   "--gallery-beta", "nan"], 2, "--gallery-beta nan"),
    (lambda d, o: normalise(d, o, "--k", 0), 2, "--k 0: must be at least 1"),
    (lambda d, o: normalise(d, o, "--k", G + 1), 2, f"--k {G + 1}: larger than the gallery size ({G})"),
    (lambda d, o: normalise(d, o, "--k", 11), 2, "keeps the top 10 items per bank row"),
    (lambda d, o: ["probe", "--bank", d.bank, "--gallery", d.g, "-o", o, "--k", G + 1], 2, "larger than the gallery"),
    (lambda d, o: ["probe", "--bank", d.bank, "--gallery", d.g, "-o", o, "--k", 0], 2, "--k 0"),
    (lambda d, o: ["probe", "--bank", d.bank, "--gallery", d.g, "-o", o, "--topk-mean", 0], 2, "--topk-mean 0"),
    (lambda d, o: normalise(d, o, "--top-k", G + 1), 2, f"--top-k {G + 1}: larger than the gallery size"),
    (lambda d, o: normalise(d, o, "--top-k", 0), 2, "--top-k 0"),
    (lambda d, o: ["build-bank", f"{d.emb}::/bank", "-o", o, "--size", B + 1], 2, f"has only {B} rows"),
    (lambda d, o: ["build-bank", f"{d.emb}::/bank", "-o", o, "--size", 0], 2, "--size 0"),
    (lambda d, o: ["build-bank", f"{d.emb}::/bank", "-o", o, "--strategy", "best"], 2, "--strategy 'best'"),
    (lambda d, o: normalise(d, o, "--beta", 5), 2, "--beta 5: ", "has betas 20"),
    (lambda d, o: normalise(d, o, "--method", "csls", "--topk-mean", 7), 2, "--topk-mean 7", "has ks 3"),
    (lambda d, o: normalise(d, o, "--method", "gc"), 2, "--keep-sorted"),
    (lambda d, o: normalise(d, o, "--method", "dual-is"), 2, "no gallery bank"),
    (lambda d, o: normalise(d, o, "--method", "magic"), 2, "--method 'magic'"),
    (lambda d, o: normalise(d, o, "--dtype", "int8"), 2, "--dtype 'int8'"),
    (lambda d, o: normalise(d, o, "--similarity", "l2"), 2, "--similarity 'l2'"),
    (lambda d, o: normalise(d, o, "--memory", "lots"), 2, "--memory 'lots'"),
    (lambda d, o: normalise(d, o, "--memory", "10KiB"), 2, "at least 1MiB"),
    (lambda d, o: normalise(d, o, "--memory", "-1GiB"), 2, "--memory '-1GiB'"),
    (lambda d, o: normalise(d, o, "--memory", "1e9"), 2, "--memory '1e9'"),
    (lambda d, o: normalise(d, o, "--block-rows", 0), 2, "--block-rows"),
    (lambda d, o: normalise(d, o, "--k", "one"), 2, "'--k'"),
    (lambda d, o: ["normalise", "--queries", d.q, "--probe", d.probe, "-o", o], 2, "--gallery"),
    (lambda d, o: ["normalise", "--sims", d.sims, "--queries", d.q, "--probe", d.probe, "-o", o], 2, "not both"),
    (lambda d, o: ["probe", "--gallery", d.g, "-o", o], 2, "--bank"),
    (lambda d, o: ["normalise", "--queries", d.q, "--gallery", d.g, "-o", o], 2, "Missing option '--probe'"),
    (lambda d, o: ["frobnicate", o], 2, "No such command 'frobnicate'"),
]


@pytest.mark.parametrize("number", range(len(PARAMS)))
def test_bad_parameters(capsys, made, tmp_path, number):
    build, code, *texts = PARAMS[number]
    out = tmp_path / "out.h5"
    assert_refused(run(capsys, *build(made, out)), code, *texts, out=out)
