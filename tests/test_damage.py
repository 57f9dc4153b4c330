"""qbnorm's own files, damaged: every damaged copy run through the command that reads it ends in
exit 1, 2 or 3 with one line (no traceback, no internal error, no output or temporary file left),
or in exit 0 with outputs whose datasets are byte-identical to those of the undamaged file.

The battery makes small valid files of every kind with the CLI, then damages copies of them:

* structured (h5py edits of a copy whose attribute checksums are removed, so that the schema
  alone must catch it, as for files written before checksums): every attribute garbled, missing,
  of the wrong type or rewritten to another plausible value; every dataset replaced by a scalar,
  one row or column short, of the wrong dtype, holding NaN / ±inf or an index out of range;
* bytes (of the file as written, checksums and all): a flipped byte in each chunk's payload,
  truncations, and random byte flips at seeded positions in the header, the metadata and the
  payload;
* params files: wrong types, unknown methods, missing keys, non-finite numbers, truncations.

QBNORM_DAMAGE_SCALE=N multiplies the number of random positions (the suite runs 1), and
QBNORM_DAMAGE_EVERY_CONSUMER=1 runs each byte-damaged copy through every consumer of its kind
(the suite: one, in turn; a structured damage of a dataset goes to those that read it),
QBNORM_DAMAGE_SEED=S draws other random positions, QBNORM_DAMAGE_KEEP=DIR keeps what failed; the
statistics of a run are printed (pytest -s) and written to $QBNORM_DAMAGE_REPORT when set, every
run's outcome and message to $QBNORM_DAMAGE_LOG.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import leftovers, run
from tolerance import assert_close, lse64

from qbnorm_cli.cli import main
from qbnorm_cli.core.probestats import UPDATE_RECORDS
from qbnorm_cli.errors import DataError
from qbnorm_cli.io.hdf5 import ATTRIBUTE_CHECKSUMS
from qbnorm_cli.io.specs import open_array

# Left out of .ci/run's reruns under other BLAS kernels (those are for tolerances): slow, and
# testing damaged inputs refused with one line (a process per case); no arithmetic compared
pytestmark = pytest.mark.slow

SCALE = int(os.environ.get("QBNORM_DAMAGE_SCALE", "1"))
EVERY_CONSUMER = os.environ.get("QBNORM_DAMAGE_EVERY_CONSUMER") == "1"  # byte damage: not one in turn
SEED = int(os.environ.get("QBNORM_DAMAGE_SEED", "0"))  # other random positions (exploration)
G, B, H, Q, D = 30, 40, 20, 12, 8
LEGACY = Path(__file__).parent / "fixtures" / "legacy-v1"


# ---------------------------------------------------------------------------------------------
# The undamaged files and the commands that read them


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Valid files of every kind (made by the CLI) and the outputs each consumer makes of them."""
    root = tmp_path_factory.mktemp("valid")
    rng = np.random.default_rng(15)

    def dyadic(n):
        return (rng.integers(-16, 17, (n, D)) / 16).astype(np.float32)

    queries, gallery, bank, gbank = dyadic(Q), dyadic(G), dyadic(B), dyadic(H)
    np.save(root / "queries.npy", queries)
    np.save(root / "gallery.npy", gallery)
    np.save(root / "bank_source.npy", bank)
    np.save(root / "gallery_bank_source.npy", gbank)
    np.save(root / "bank_sims.npy", bank @ gallery.T)
    np.save(root / "gt.npy", rng.integers(0, G, Q))
    f = {name: root / name for name in ("queries.h5", "gallery.h5", "bank.h5", "gallery_bank.h5", "probe.h5",
                                        "bank_sims.h5", "dense.h5", "ranking.h5", "evaluation.h5", "hubness.h5",
                                        "params.json", "index.h5")}
    steps = [
        ["convert", root / "queries.npy", "-o", f["queries.h5"]],
        ["convert", root / "gallery.npy", "-o", f["gallery.h5"]],
        ["convert", root / "bank_sims.npy", "-o", f["bank_sims.h5"], "--kind", "similarity"],
        ["build-bank", root / "bank_source.npy", "-o", f["bank.h5"], "--size", 35, "--seed", 3],
        ["build-bank", root / "gallery_bank_source.npy", "-o", f["gallery_bank.h5"], "--strategy", "all"],
        ["probe", "--bank", f["bank.h5"], "--gallery", f["gallery.h5"], "--gallery-bank", f["gallery_bank.h5"],
         "--keep-sorted", "--topk-mean", 3, "--beta", 20, "--beta", 50, "-o", f["probe.h5"]],
        ["normalise", "--queries", f["queries.h5"], "--gallery", f["gallery.h5"], "--probe", f["probe.h5"],
         "-o", f["dense.h5"]],
        ["normalise", "--queries", f["queries.h5"], "--gallery", f["gallery.h5"], "--probe", f["probe.h5"],
         "-o", f["ranking.h5"], "--top-k", 5, "--method", "dual-dis"],
        ["export", "--probe", f["probe.h5"], "--gallery", f["gallery.h5"], "--method", "dis", "-o", f["index.h5"]],
        ["evaluate", f["dense.h5"], f["ranking.h5"], "--gt", root / "gt.npy", "-o", f["evaluation.h5"]],
        ["hubness", f["dense.h5"], f["ranking.h5"], f["probe.h5"], "--k", 3, "-o", f["hubness.h5"]],
        ["tune", "--queries", f["queries.h5"], "--gallery", f["gallery.h5"], "--gt", root / "gt.npy",
         "--bank", f["bank.h5"], "--methods", "is,dis,nnn", "--beta", 20, "--beta", 50, "-o", f["params.json"]],
    ]
    for args in steps:
        assert main([str(a) for a in args] + ["-q"]) == 0, args
    # tune picks the raw baseline on these random data; a setting with parameters gives the damage
    # something to hit (tune writes every parameter, None where the method does not use it)
    doc = json.loads(f["params.json"].read_text())
    doc.update(method="dis", beta=20.0, k=1, gallery_beta=None, topk_mean=None, alpha=None)
    f["params.json"].write_text(json.dumps(doc, indent=2))
    g = {"q": f["queries.h5"], "g": f["gallery.h5"], "p": f["probe.h5"], "gt": root / "gt.npy"}
    norm = ["normalise", "--queries", g["q"], "--gallery", g["g"], "--probe", g["p"]]
    consumers = {
        # kind of the damaged file: [(name, command with X for the damaged file, datasets it reads)]
        "queries": [("normalise dis", ["normalise", "--queries", "X", "--gallery", g["g"], "--probe", g["p"]],
                     {"/embeddings"})],
        "gallery": [("probe", ["probe", "--bank", f["bank.h5"], "--gallery", "X", "--topk-mean", 3], {"/embeddings"}),
                    ("normalise dis", ["normalise", "--queries", g["q"], "--gallery", "X", "--probe", g["p"]],
                     {"/embeddings"})],
        "bank": [("probe", ["probe", "--bank", "X", "--gallery", g["g"], "--keep-sorted"], {"/embeddings"})],
        "gallery_bank": [("probe", ["probe", "--bank", f["bank.h5"], "--gallery", g["g"], "--gallery-bank", "X"],
                          {"/embeddings"})],
        "probe": [("normalise dual-dis", [*norm[:-1], "X", "--method", "dual-dis"],
                   {"/log_norm", "/gallery_log_norm", "/bank_neighbors", "/gallery_bank_neighbors"}),
                  ("normalise gc top-k", [*norm[:-1], "X", "--method", "gc", "--top-k", 5], {"/sorted_bank_scores"}),
                  ("normalise nnn", [*norm[:-1], "X", "--method", "nnn", "--topk-mean", 3, "--beta", 50],
                   {"/topk_mean"}),
                  ("hubness", ["hubness", "X", "--k", 3], {"/bank_neighbors"})],
        "bank_sims": [("probe --bank-sims", ["probe", "--bank-sims", "X"], {"/scores"})],
        "dense": [("evaluate", ["evaluate", "X", "--gt", g["gt"]], {"/scores"}),
                  ("hubness", ["hubness", "X", "--k", 3], {"/scores"})],
        "ranking": [("evaluate", ["evaluate", "X", "--gt", g["gt"]], {"/neighbors", "/scores"}),
                    ("hubness", ["hubness", "X", "--k", 3], {"/neighbors"})],
        "index": [("search", ["search", "--index", "X", "--queries", g["q"], "--top-k", 5], {"/vectors", "/gate"})],
        "params": [("normalise --params", ["normalise", "--params", "X", *norm[1:]], set()),
                   ("probe --params", ["probe", "--params", "X", "--bank", f["bank.h5"], "--gallery", g["g"]], set())],
    }
    files = {"queries": f["queries.h5"], "gallery": f["gallery.h5"], "bank": f["bank.h5"],
             "gallery_bank": f["gallery_bank.h5"], "probe": f["probe.h5"], "bank_sims": f["bank_sims.h5"],
             "dense": f["dense.h5"], "ranking": f["ranking.h5"], "params": f["params.json"], "index": f["index.h5"]}
    reference = {}
    for kind, commands in consumers.items():
        for name, command, _ in commands:
            out = root / f"reference-{kind}-{name.replace(' ', '_')}.h5"
            assert main([str(a) for a in _filled(command, files[kind], out)] + ["-q"]) == 0, (kind, name)
            reference[kind, name] = datasets(out)
    return {"root": root, "files": files, "consumers": consumers, "reference": reference,
            "library_only": {"evaluation": f["evaluation.h5"], "hubness": f["hubness.h5"]}}


def _filled(command, damaged, out) -> list:
    return [damaged if a == "X" else a for a in command] + ["-o", out]


def datasets(path) -> dict[str, tuple]:
    """Every dataset of an HDF5 file as (dtype, shape, bytes). (Files are opened as qbnorm opens
    inputs, without locking: HDF5 refuses to open a file twice with different locking flags, and a
    run may leave its inputs open until they are collected.)"""
    out = {}
    with h5py.File(path, "r", locking=False) as h5:
        h5.visititems(lambda name, obj: out.__setitem__(name, (obj.dtype.str, obj.shape, obj[()].tobytes()))
                      if isinstance(obj, h5py.Dataset) else None)
    return out


class Battery:
    """Runs damaged copies through their consumers and tallies the outcomes."""

    def __init__(self, made, capsys, work: Path):
        self.made, self.capsys, self.work = made, capsys, work
        self.outcomes: Counter = Counter()
        self.by_kind: Counter = Counter()
        self.failures: list[str] = []
        self.count = 0

    def check(self, kind: str, damage: str, path: Path, turn: int | None = None, dataset: str | None = None) -> None:
        """Run a damaged copy through every consumer of its kind; with `turn`, through the one
        whose turn it is, or with `dataset` too, through those that read that dataset (the one
        whose turn it is when none does)."""
        commands = self.made["consumers"][kind]
        chosen = commands
        if turn is not None:
            chosen = [c for c in commands if dataset in c[2]] or [commands[turn % len(commands)]]
        for name, command, _ in chosen:
            self.count += 1
            out = self.work / f"out-{self.count}.h5"
            code, stdout, err = run(self.capsys, *_filled(command, path, out), "-q")
            what = f"{kind} [{damage}] via {name}: exit {code}: {err.strip()[:300]}"
            lines = err.strip().splitlines()
            if code == 0:
                if err or datasets(out) != self.made["reference"][kind, name]:
                    self.failures.append(f"{what} (exit 0 with a different result)")
                    self.keep(path, out)
                outcome = "exit 0, identical"
                out.unlink()
            elif code in (1, 2, 3):
                if (len(lines) != 1 or not lines[0].startswith("qbnorm: error: ") or "Traceback" in err + stdout
                        or "internal error" in err or out.exists() or leftovers(self.work)):
                    self.failures.append(what)
                outcome = f"exit {code}"
            else:
                self.failures.append(what)
                outcome = f"exit {code}"
            self.outcomes[outcome] += 1
            self.by_kind[kind, outcome] += 1
            if os.environ.get("QBNORM_DAMAGE_LOG"):
                with open(os.environ["QBNORM_DAMAGE_LOG"], "a", encoding="utf-8") as fh:
                    fh.write(f"{what}\n")

    def keep(self, *paths: Path) -> None:
        """Copies of what failed, with the undamaged files, into $QBNORM_DAMAGE_KEEP (exploration)."""
        keep = os.environ.get("QBNORM_DAMAGE_KEEP")
        if keep:
            target = Path(keep) / f"{self.work.name}-{self.count}"
            target.mkdir(parents=True, exist_ok=True)
            for path in paths:
                shutil.copy(path, target / path.name)
            shutil.copytree(self.made["root"], target / "valid", dirs_exist_ok=True)

    def library(self, kind: str, damage: str, path: Path, reference: dict) -> None:
        """Kinds no command reads (evaluation, hubness): each dataset opened as an input (the
        schema checked) and read whole; a DataError, or values identical to the undamaged file's."""
        self.count += 1
        try:
            found = {}
            for name in reference:
                source = open_array(f"{path}::/{name}", ndim=(1, 2, 3))
                values = source.read_raw()
                source.close()
                found[name] = (values.dtype.str, values.shape, values.tobytes())
            outcome = "read, identical"
            if found != reference:
                self.failures.append(f"{kind} [{damage}]: read, with other values")
                self.keep(path)
        except DataError as exc:
            outcome = "DataError"
            if "\n" in str(exc) or "internal" in str(exc):
                self.failures.append(f"{kind} [{damage}]: {exc}")
        except Exception as exc:  # exactly what must not happen
            outcome = type(exc).__name__
            self.failures.append(f"{kind} [{damage}]: {type(exc).__name__}: {exc}")
        self.outcomes[f"library: {outcome}"] += 1
        self.by_kind[kind, outcome] += 1

    def report(self, title: str) -> str:
        lines = [f"{title}: {self.count} damaged runs"]
        lines += [f"  {outcome}: {n}" for outcome, n in sorted(self.outcomes.items())]
        lines += [f"  {kind:>12} {outcome}: {n}" for (kind, outcome), n in sorted(self.by_kind.items())]
        text = "\n".join(lines)
        print(text)
        if os.environ.get("QBNORM_DAMAGE_REPORT"):
            with open(os.environ["QBNORM_DAMAGE_REPORT"], "a", encoding="utf-8") as fh:
                fh.write(text + "\n")
        return text


# ---------------------------------------------------------------------------------------------
# Damage


def _copy(src: Path, dst: Path, strip_checksums: bool = False) -> Path:
    shutil.copy(src, dst)
    if strip_checksums:
        with h5py.File(dst, "a", locking=False) as h5:
            del h5.attrs[ATTRIBUTE_CHECKSUMS]
    return dst


def _objects(path: Path) -> list[tuple[str, list[str], str | None, tuple | None]]:
    """(object name, its attribute names, dtype kind, shape) of the root and every dataset."""
    out = []
    with h5py.File(path, "r", locking=False) as h5:
        out.append(("/", sorted(k for k in h5.attrs if k != ATTRIBUTE_CHECKSUMS), None, None))
        h5.visititems(lambda name, obj: out.append(("/" + name, sorted(obj.attrs), obj.dtype.kind, obj.shape))
                      if isinstance(obj, h5py.Dataset) else None)
    return out


def _rewritten(value):
    """Another plausible value of an attribute: a number moved, a vector changed, JSON of another
    shape, a string changed."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value + "x"
        return "[]" if isinstance(parsed, dict) else "{}" if isinstance(parsed, list) else value + "x"
    array = np.array(value)
    if array.ndim == 0:
        return array + 1
    array = array.copy()
    array.flat[0] += 1
    return array


ATTRIBUTE_DAMAGE = {
    "garbled": lambda value: "}{not json",
    "wrong type": lambda value: 7 if isinstance(value, (str, bytes)) else "12",
    "rewritten": _rewritten,
}


def _replace(h5: h5py.File, name: str, data) -> None:
    attrs = dict(h5[name].attrs)
    del h5[name]
    h5.create_dataset(name, data=data)
    for key, value in attrs.items():
        h5[name].attrs[key] = value


def _dataset_damage(kind: str, shape: tuple, rng) -> dict:
    """name → edit(values) returning the new values (None: leave the dataset alone)."""
    out = {
        "replaced by a scalar": lambda v: v.reshape(-1)[0],
        "one row short": lambda v: v[:-1],
        "strings": lambda v: np.array([b"damaged"] * len(v)),
    }
    if len(shape) >= 2:
        out["one column short"] = lambda v: v[:, :-1]
        out["transposed"] = lambda v: v.T
    if kind == "f":
        out["as integers"] = lambda v: v.astype(np.int32)
        for label, bad in (("NaN", np.nan), ("-inf", -np.inf), ("+inf", np.inf)):
            def put(v, bad=bad):
                v = v.copy()
                v.flat[int(rng.integers(v.size))] = bad
                return v
            out[label] = put
    elif kind in "iu":
        out["as floats"] = lambda v: v.astype(np.float64)
        for label, bad in (("index = gallery size", G), ("index −2", -2), ("index 10⁹", 10**9)):
            def put(v, bad=bad):
                v = v.astype(np.int64)
                v.flat[int(rng.integers(v.size))] = bad
                return v
            out[label] = put
    elif kind == "b":
        out["as floats"] = lambda v: v.astype(np.float64) + 0.5
    return out


def structured_damage(src: Path, work: Path, rng):
    """(description, the dataset damaged or None, damaged copy) for every attribute and dataset
    damage of `src`."""
    number = 0
    for obj, attrs, kind, shape in _objects(src):
        for attr in attrs:
            for label in ("missing", *ATTRIBUTE_DAMAGE):
                number += 1
                dst = _copy(src, work / f"s{number}-{src.name}", strip_checksums=True)
                with h5py.File(dst, "a", locking=False) as h5:
                    target = h5[obj]
                    if label == "missing":
                        del target.attrs[attr]
                    else:
                        target.attrs[attr] = ATTRIBUTE_DAMAGE[label](target.attrs[attr])
                yield f"{obj} attribute {attr} {label}", None, dst
        if obj == "/":
            continue
        for label, edit in _dataset_damage(kind, shape, rng).items():
            number += 1
            dst = _copy(src, work / f"s{number}-{src.name}", strip_checksums=True)
            with h5py.File(dst, "a", locking=False) as h5:
                values = h5[obj][()]
                if label == "strings" and values.ndim == 0:
                    continue
                _replace(h5, obj, edit(values))
            yield f"{obj} {label}", obj, dst


def _payload_ranges(path: Path) -> list[tuple[str, int, int]]:
    """(dataset, first byte, end) of every stored chunk of the file's datasets."""
    out = []
    with h5py.File(path, "r", locking=False) as h5:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.chunks is not None:
                for i in range(obj.id.get_num_chunks()):
                    info = obj.id.get_chunk_info(i)
                    out.append(("/" + name, info.byte_offset, info.byte_offset + info.size))
            elif isinstance(obj, h5py.Dataset) and obj.id.get_offset() is not None:
                out.append(("/" + name, obj.id.get_offset(), obj.id.get_offset() + obj.id.get_storage_size()))
        h5.visititems(visit)
    return out


def byte_damage(src: Path, work: Path, rng, scale: int):
    """(description, damaged copy): a flipped byte in every chunk's payload, truncations, and
    flips at seeded positions in the header (first 512 bytes), the metadata and the payload."""
    raw = src.read_bytes()
    payload = _payload_ranges(src)
    in_payload = np.zeros(len(raw), dtype=bool)
    for _, a, b in payload:
        in_payload[a:b] = True
    metadata = np.flatnonzero(~in_payload)
    metadata = metadata[metadata >= 512]
    positions = [("payload of " + name, int(rng.integers(a, b))) for name, a, b in payload]
    positions += [("header", int(p)) for p in rng.integers(0, 512, 4 * scale)]
    positions += [("metadata", int(p)) for p in rng.choice(metadata, 8 * scale)]
    positions += [("payload", int(p)) for p in rng.choice(np.flatnonzero(in_payload), 4 * scale)]
    for number, (where, pos) in enumerate(positions):
        damaged = bytearray(raw)
        damaged[pos] ^= int(rng.integers(1, 256))
        dst = work / f"b{number}-{src.name}"
        dst.write_bytes(bytes(damaged))
        yield f"byte {pos} flipped ({where})", dst
    for number, cut in enumerate(sorted({1, 8, 96, len(raw) // 2, len(raw) - 1,
                                         *rng.integers(1, len(raw), 2 * scale).tolist()})):
        dst = work / f"t{number}-{src.name}"
        dst.write_bytes(raw[:cut])
        yield f"truncated to {cut} of {len(raw)} bytes", dst


# ---------------------------------------------------------------------------------------------
# The battery


HDF5_KINDS = ("queries", "gallery", "bank", "gallery_bank", "probe", "bank_sims", "dense", "ranking", "index")


@pytest.mark.parametrize("kind", [k for k in HDF5_KINDS if k != "index"])  # index: checksums required
def test_structured_damage(made, capsys, tmp_path, kind):
    battery = Battery(made, capsys, tmp_path)
    rng = np.random.default_rng(HDF5_KINDS.index(kind))
    for number, (damage, dataset, path) in enumerate(structured_damage(made["files"][kind], tmp_path, rng)):
        battery.check(kind, damage, path, turn=number, dataset=dataset)
        path.unlink()
    battery.report(f"structured damage of {kind}")
    assert not battery.failures, "\n".join(battery.failures)


@pytest.mark.parametrize("kind", HDF5_KINDS)
def test_byte_damage(made, capsys, tmp_path, kind):
    battery = Battery(made, capsys, tmp_path)
    rng = np.random.default_rng([100, HDF5_KINDS.index(kind), SEED])
    for number, (damage, path) in enumerate(byte_damage(made["files"][kind], tmp_path, rng, SCALE)):
        battery.check(kind, damage, path, turn=None if EVERY_CONSUMER else number)
        path.unlink()
    battery.report(f"byte damage of {kind}")
    assert not battery.failures, "\n".join(battery.failures)


@pytest.mark.parametrize("kind", ["evaluation", "hubness"])
def test_damage_of_files_only_the_library_opens(made, capsys, tmp_path, kind):
    battery = Battery(made, capsys, tmp_path)
    src = made["library_only"][kind]
    rng = np.random.default_rng([200, len(kind), SEED])
    reference = datasets(src)
    damaged = [(d, p) for d, _, p in structured_damage(src, tmp_path, rng)]
    for damage, path in [*damaged, *byte_damage(src, tmp_path, rng, SCALE)]:
        battery.library(kind, damage, path, reference)
        path.unlink()
    battery.report(f"damage of {kind}")
    assert not battery.failures, "\n".join(battery.failures)


# values each key of a params file may not hold (beyond the wrong types every key is tried with)
INVALID_PARAMS = {
    "qbnorm_kind": ("embeddings",), "qbnorm_version": (0, -3, 0.5, 99), "method": ("magic", "DIS"),
    "beta": (0, -3), "k": (0, -3, 0.5, 10**40), "topk_mean": (0, -3, 0.5, 10**40), "alpha": (),
    "validation": (),
}


def _params_damage(doc: dict, text: str):
    """(description, text of a damaged params file): not JSON, non-finite numbers, every key
    missing, of the wrong type or holding a value it may not hold."""
    yield "not JSON", text[: len(text) // 2]
    yield "empty", ""
    yield "a list", "[]"
    yield "deeply nested", "[" * 100000 + "]" * 100000
    for key in ("beta", "alpha"):
        for constant in ("NaN", "Infinity", "-Infinity"):
            yield f"{key} {constant}", text.replace(f'"{key}": {json.dumps(doc[key])}', f'"{key}": {constant}', 1)
    for key, invalid in INVALID_PARAMS.items():
        yield f"{key} missing", json.dumps({k: v for k, v in doc.items() if k != key})
        for value in ("12", [1], {"a": 1}, True, None, *invalid):
            yield f"{key} {value!r}", json.dumps({**doc, key: value})
    yield "validation record not an object", json.dumps({**doc, "validation": {"queries": 3}})
    yield "validation path a number", json.dumps({**doc, "validation": {"queries": {"path": 3}}})


def test_params_damage(made, capsys, tmp_path):
    battery = Battery(made, capsys, tmp_path)
    text = made["files"]["params"].read_text()
    doc = json.loads(text)
    for number, (damage, content) in enumerate(_params_damage(doc, text)):
        path = tmp_path / f"p{number}.json"
        path.write_text(content)
        battery.check("params", damage, path)
        path.unlink()
    battery.report("damaged params files")
    assert not battery.failures, "\n".join(battery.failures)


# ---------------------------------------------------------------------------------------------
# Specific promises


def test_messages_name_file_dataset_and_problem(made, capsys, tmp_path):
    probe = _copy(made["files"]["probe"], tmp_path / "probe.h5", strip_checksums=True)
    with h5py.File(probe, "a", locking=False) as h5:
        values = h5["log_norm"][()]
        values[0, 17] = np.nan
        _replace(h5, "log_norm", values)
    args = _filled(made["consumers"]["probe"][0][1], probe, tmp_path / "out.h5")
    code, _, err = run(capsys, *args)
    assert code == 3
    assert err.strip() == f"qbnorm: error: {probe}::/log_norm: NaN at β=20, item 17; the file is damaged: probe again"


def test_a_flipped_payload_byte_is_a_checksum_mismatch(made, capsys, tmp_path):
    src = made["files"]["dense"]
    _, start, end = next(r for r in _payload_ranges(src) if r[0] == "/scores")
    raw = bytearray(src.read_bytes())
    raw[start + (end - start) // 3] ^= 0x01
    bad = tmp_path / "dense.h5"
    bad.write_bytes(bytes(raw))
    code, _, err = run(capsys, "evaluate", bad, "--gt", made["root"] / "gt.npy")
    assert code == 3
    assert err.startswith(f"qbnorm: error: {bad}::/scores: checksum mismatch reading rows 0:{Q}; the file is damaged")


def test_gallery_rows_rewritten_is_refused(made, capsys, tmp_path):
    """The attribute checksums catch it; without them (a file written before), the gallery the
    ranking was made from, as its `inputs` record it, does."""
    for strip in (False, True):
        bad = _copy(made["files"]["ranking"], tmp_path / f"ranking-{strip}.h5", strip_checksums=strip)
        with h5py.File(bad, "a", locking=False) as h5:
            h5.attrs["gallery_rows"] = G + 10
        code, _, err = run(capsys, "evaluate", bad, "--gt", made["root"] / "gt.npy")
        assert code == 3 and "gallery_rows" in err and "damaged" in err, err


def _close_log_norms(path, name: str, then: tuple, now: tuple) -> None:
    """A probe's log-normalisers then and now: the same dtype and shape, the values within the
    bound of their float64 evaluation (lse64; the legacy inputs' dot products lie in [−8, 8])."""
    assert then[:2] == now[:2]
    with h5py.File(path, "r", locking=False) as h5:
        betas = h5[name].attrs["betas"]
        n = int(h5.attrs["gallery_bank_rows" if name.startswith("gallery") else "bank_rows"])
    old, new = (np.frombuffer(x[2], dtype=x[0]).reshape(x[1]) for x in (then, now))
    for row, beta in enumerate(betas):
        assert_close(new[row], old[row], lse64(n, beta, spread=16.0, magnitude=8.0 * beta + abs(old[row]).max()))


def test_files_written_before_checksums_still_read(capsys, tmp_path, monkeypatch):
    """Files of format version 1 made by qbnorm before this change (tests/fixtures/make_legacy.py):
    no Fletcher-32, no attribute checksums; they read, and give the results they gave then."""
    work = tmp_path / "legacy"
    shutil.copytree(LEGACY, work)
    monkeypatch.chdir(work)
    for name in ("probe.h5", "dense.h5", "ranking.h5"):
        with h5py.File(name, "r", locking=False) as h5:
            assert ATTRIBUTE_CHECKSUMS not in h5.attrs and not any(h5[n].fletcher32 for n in h5)
    norm = ["normalise", "--queries", "queries.h5", "--gallery", "gallery.h5", "--probe", "probe.h5", "-q"]
    assert run(capsys, *norm, "-o", "dense-now.h5")[0] == 0
    assert run(capsys, *norm, "-o", "ranking-now.h5", "--top-k", 5, "--method", "dual-dis")[0] == 0
    assert run(capsys, "probe", "--bank", "bank.h5", "--gallery", "gallery.h5", "--gallery-bank", "gallery_bank.h5",
               "--keep-sorted", "--topk-mean", 3, "--similarity", "dot", "-o", "probe-now.h5", "-q")[0] == 0
    for then, now in (("dense.h5", "dense-now.h5"), ("ranking.h5", "ranking-now.h5"), ("probe.h5", "probe-now.h5")):
        now_sets = datasets(now)
        if then == "probe.h5":  # a probe now also keeps the bank's column means (for dn), and each item's
            # K-th best bank score and mean distance to its K nearest bank queries (for ls, nicdm)
            assert now_sets.pop("column_mean")[1] == (30,)
            assert now_sets.pop("topk_kth")[1] == now_sets.pop("topk_distance")[1] == (1, 30)
            for record in UPDATE_RECORDS:  # and what an update of it needs (issue 29)
                now_sets.pop(record.name.lstrip("/"), None)
            then_sets = datasets(then)
            for name in ("log_norm", "gallery_log_norm"):  # numpy's exp rounds as the CPU's kernel does
                _close_log_norms(then, name, then_sets.pop(name), now_sets.pop(name))
            assert then_sets == now_sets
            continue
        assert datasets(then) == now_sets
    code, out, err = run(capsys, "evaluate", "dense.h5", "ranking.h5", "--gt", "gt.npy", "--json")
    assert code == 0, err
    with h5py.File("evaluation.h5", "r", locking=False) as h5:
        then = json.loads(h5.attrs["metrics"])
    assert [r["metrics"] for r in json.loads(out)["inputs"]] == [r["metrics"] for r in then]
    assert run(capsys, "hubness", "dense.h5", "ranking.h5", "probe.h5", "--k", 3, "-q")[0] == 0
    assert run(capsys, *norm, "-o", "tuned.h5", "--params", "params.json")[0] == 0
    for name in ("evaluation.h5", "hubness.h5", "bank.h5", "queries.h5"):
        open_array(name, ndim=(1, 2, 3)).close()


def test_a_chunk_the_index_loses_reads_as_values_readers_refuse(tmp_path):
    """HDF5 returns a dataset's fill value for a chunk its index does not find, with no checksum to
    fail: qbnorm's fill values are NaN and the smallest integer, which every reader refuses, and a
    file whose chunks are not all there is refused when it is opened."""
    from qbnorm_cli.io.atomic import OutputFile
    from qbnorm_cli.io.specs import as_input
    from qbnorm_cli.io.validate import as_float32

    path = tmp_path / "partial.h5"
    with OutputFile(str(path), "embeddings", force=False, params={}) as out:
        ds = out.create("/embeddings", shape=(4096, 512), dtype=np.float32)
        ints = out.create("/extra", shape=(4096, 512), dtype=np.int32)
        out.write_rows(ds, 0, np.ones((512, 512), dtype=np.float32))  # the other chunks never written
        out.write_rows(ints, 0, np.ones((512, 512), dtype=np.int32))
    with h5py.File(path, "r", locking=False) as h5:
        assert np.isnan(h5["embeddings"].fillvalue) and h5["extra"].fillvalue == np.iinfo(np.int32).min
        with pytest.raises(DataError, match=r"non-finite value .* in row 512"):
            as_float32(h5["embeddings"][:1024], "gallery")
        with pytest.raises(DataError, match="stores 1 of its 8 chunks"):  # a dataset handed over: refused whole
            as_input(h5["embeddings"], "gallery")
    with pytest.raises(DataError, match="chunk index lists 1 of its 8 chunks; the file is damaged: convert again"):
        open_array(str(path))
