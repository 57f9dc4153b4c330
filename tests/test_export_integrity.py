"""Index exports, edited or damaged (issue 24, item 10): `search` refuses every one with exit 3 and
one line naming the file and what is wrong, and writes nothing, or (for what no reader uses) gives
the undamaged export's ranking.

* HDF5: the `recipe` attribute and the scalar attributes edited, with the attribute checksums kept
  (the checksum tells) and removed (the schema tells: the recipe's fields are checked and must
  agree with the attributes);
* directories (npy, faiss, lancedb): recipe.json edited (the manifest tells), and edited with the
  manifest made again (the recipe's schema tells, for values no export has); gate.npy inverted;
  single-bit flips in index.faiss; truncated LanceDB data files; the manifest itself missing,
  garbled, edited, a file added to the table or replaced by a link.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import read_h5
from helpers import leftovers

from qbnorm_cli.io.hdf5 import ATTRIBUTE_CHECKSUMS, attribute_checksums
from qbnorm_cli.io.stores.manifest import write_manifest

G, Q, B, D, TOP = 60, 60, 120, 8, 5
FORMATS = ["npy"] + [f for f in ("faiss", "lancedb") if importlib.util.find_spec(f)]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A probe and a gated (dis) export of each format, with the ranking search gives for it."""
    from qbnorm_cli.cli import main

    root = tmp_path_factory.mktemp("exports")
    rng = np.random.default_rng(24)
    for name, rows in (("queries", Q), ("gallery", G), ("bank", B)):
        np.save(root / f"{name}.npy", rng.standard_normal((rows, D)).astype(np.float32))
    assert main([str(a) for a in ("probe", "--bank", root / "bank.npy", "--gallery", root / "gallery.npy",
                                  "-o", root / "probe.h5", "-q")]) == 0
    exports, rankings = {}, {}
    for fmt in ["hdf5", *FORMATS]:
        out = root / ("index.h5" if fmt == "hdf5" else f"index-{fmt}")
        assert main([str(a) for a in ("export", "--probe", root / "probe.h5", "--gallery", root / "gallery.npy",
                                      "--method", "dis", "--format", fmt, "-o", out, "-q")]) == 0
        exports[fmt] = out
        assert main([str(a) for a in ("search", "--index", out, "--queries", root / "queries.npy", "--top-k", TOP,
                                      "-o", root / f"ranking-{fmt}.h5", "-q")]) == 0
        rankings[fmt] = read_h5(root / f"ranking-{fmt}.h5")["/neighbors"]
    return {"root": root, "exports": exports, "rankings": rankings}


def search(cli, made, index, work: Path) -> tuple[int, str]:
    out = work / "s.h5"
    code, stdout, err = cli("search", "--index", index, "--queries", made["root"] / "queries.npy", "--top-k", TOP,
                            "-o", out, "-q")
    if code == 0:
        found = read_h5(out)["/neighbors"]
        out.unlink()
        return code, "identical" if any(np.array_equal(found, r) for r in made["rankings"].values()) else "DIFFERENT"
    assert err.count("\n") == 1 and err.startswith("qbnorm: error: ") and "internal error" not in err, err
    assert "Traceback" not in err + stdout and not out.exists() and not leftovers(work), err
    return code, err


def refused(cli, made, index, work, *needles) -> str:
    code, err = search(cli, made, index, work)
    assert code == 3, (index, err)
    assert all(n in err for n in needles), (needles, err)
    return err


def copy(made, fmt: str, work: Path) -> Path:
    src = made["exports"][fmt]
    dst = work / src.name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


# --- HDF5 -----------------------------------------------------------------------------------------

RECIPE_EDITS = {
    "constant ×4": lambda r: r.update(constant=r["constant"] * 4),
    "baseline true": lambda r: r.update(baseline=True, gated=False),
    "scale halved": lambda r: r.update(scale=r["scale"] / 2),
    "center moved": lambda r: r.update(center=r["center"] + 1),
    "method is": lambda r: r.update(method="is"),
    "similarity dot": lambda r: r.update(similarity="dot"),
    "row term": lambda r: r.update(row_topk=3),
}
BAD_VALUES = {
    "scale 'abc'": lambda r: r.update(scale="abc"),
    "scale NaN": lambda r: r.update(scale=float("nan")),
    "scale −1": lambda r: r.update(scale=-1.0),
    "constant 0": lambda r: r.update(constant=0),
    "constant inf": lambda r: r.update(constant=float("inf")),
    "center a list": lambda r: r.update(center=[1]),
    "gated 'yes'": lambda r: r.update(gated="yes"),
    "dim 0": lambda r: r.update(dim=0),
    "gallery_rows 2.5": lambda r: r.update(gallery_rows=2.5),
    "method gc": lambda r: r.update(method="gc"),
    "no scale": lambda r: r.pop("scale"),
    "row_topk −1": lambda r: r.update(row_topk=-1),
    "index type": lambda r: r.update(index={"type": "lsh"}),
    "a list": lambda r: r.clear() or r.update(format="qbnorm-index-vectors", storage=[1]),
}


@pytest.mark.parametrize("checksums", ["kept", "removed", "made again"])
def test_an_edited_hdf5_recipe_is_refused(cli, made, tmp_path, checksums):
    """Kept: the recipe's checksum differs; removed: an index export always has them; made again
    (someone who recomputes them): the recipe's fields are checked, and must equal the attributes."""
    outcomes = {}
    for label, edit in {**RECIPE_EDITS, **BAD_VALUES}.items():
        path = copy(made, "hdf5", tmp_path)
        with h5py.File(path, "a") as h5:
            recipe = json.loads(h5.attrs["recipe"])
            edit(recipe)
            h5.attrs["recipe"] = json.dumps(recipe)
            if checksums == "removed":
                del h5.attrs[ATTRIBUTE_CHECKSUMS]
            elif checksums == "made again":
                h5.attrs[ATTRIBUTE_CHECKSUMS] = json.dumps(attribute_checksums(h5), sort_keys=True)
        outcomes[label] = search(cli, made, path, tmp_path)
        path.unlink()
    assert all(code == 3 and "index.h5" in err for code, err in outcomes.values()), outcomes
    schema = ("the recipe says", "recipe field", "attribute recipe: not valid JSON")  # what the schema finds first
    says = {"kept": ("attribute recipe was changed after qbnorm wrote", *schema),
            "removed": ("attribute_checksums: missing", *schema), "made again": schema}[checksums]
    wrong = {k: v for k, v in outcomes.items() if not any(s in v[1] for s in says)}
    assert not wrong, wrong


def test_hdf5_attributes_edited_with_the_recipe_are_refused_by_their_checksums(cli, made, tmp_path):
    path = copy(made, "hdf5", tmp_path)
    with h5py.File(path, "a") as h5:
        recipe = json.loads(h5.attrs["recipe"])
        recipe["constant"] *= 4
        h5.attrs["recipe"] = json.dumps(recipe)
        h5.attrs["constant"] = recipe["constant"]
    refused(cli, made, path, tmp_path, "index.h5", "was changed after qbnorm wrote")


# --- directories: the manifest ------------------------------------------------------------------------

def edit_recipe(path: Path, edit) -> None:
    file = path / "recipe.json"
    recipe = json.loads(file.read_text())
    edit(recipe)
    file.write_text(json.dumps(recipe, indent=2))


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_edited_recipe_json_is_refused(cli, made, tmp_path, fmt):
    for edit in {**RECIPE_EDITS, **BAD_VALUES}.values():
        path = copy(made, fmt, tmp_path)
        edit_recipe(path, edit)
        refused(cli, made, path, tmp_path, "recipe.json", "damaged or was edited")
        shutil.rmtree(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_recipe_values_no_export_has_are_refused_with_a_new_manifest(cli, made, tmp_path, fmt):
    """Someone who makes the manifest again after editing: the recipe's schema names the field."""
    for label, edit in BAD_VALUES.items():
        path = copy(made, fmt, tmp_path)
        edit_recipe(path, edit)
        write_manifest(path)
        err = refused(cli, made, path, tmp_path, "recipe.json")
        assert "recipe field" in err or "not a qbnorm index recipe" in err, (label, err)
        shutil.rmtree(path)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "lancedb"])
def test_an_inverted_gate_is_refused(cli, made, tmp_path, fmt):
    path = copy(made, fmt, tmp_path)
    gate = np.load(path / "gate.npy")
    np.save(path / "gate.npy", ~gate)
    refused(cli, made, path, tmp_path, "gate.npy", "damaged or was edited")


@pytest.mark.skipif("faiss" not in FORMATS, reason="needs faiss")
def test_every_single_bit_flip_in_index_faiss_is_refused(cli, made, tmp_path):
    raw = (made["exports"]["faiss"] / "index.faiss").read_bytes()
    rng = np.random.default_rng(10)
    path = copy(made, "faiss", tmp_path)
    positions = rng.integers(0, len(raw), 60)
    for pos in positions:
        damaged = bytearray(raw)
        damaged[pos] ^= 1 << int(rng.integers(8))
        (path / "index.faiss").write_bytes(bytes(damaged))
        refused(cli, made, path, tmp_path, "index.faiss", "sha256 differs")


@pytest.mark.skipif("lancedb" not in FORMATS, reason="needs lancedb")
def test_truncated_lancedb_data_files_are_bad_input(cli, made, tmp_path):
    data = sorted((made["exports"]["lancedb"] / "gallery.lance" / "data").glob("*"))
    assert data
    for file in data:
        for rebuilt in (False, True):
            path = copy(made, "lancedb", tmp_path)
            target = path / file.relative_to(made["exports"]["lancedb"])
            target.write_bytes(target.read_bytes()[:target.stat().st_size // 2])
            if rebuilt:  # the manifest made again: lance's own error, as bad input
                write_manifest(path)
                refused(cli, made, path, tmp_path, str(path))
            else:
                refused(cli, made, path, tmp_path, target.name, "the manifest says")
            shutil.rmtree(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_damaged_or_missing_manifest_is_refused(cli, made, tmp_path, fmt):
    def missing(path):
        (path / "manifest.json").unlink()

    def garbled(path):
        (path / "manifest.json").write_text("{not json")

    def edited(path):  # a file's checksum changed, the manifest's own left
        manifest = json.loads((path / "manifest.json").read_text())
        record = manifest["files"]["recipe.json"]
        record["sha256"] = "0" * 64
        (path / "manifest.json").write_text(json.dumps(manifest))

    def table_file_added(path):
        table = next((p for p in path.iterdir() if p.is_dir()), None)
        (table or path / "extra").mkdir(exist_ok=True)
        (table or path / "extra").joinpath("added.lance").write_bytes(b"x")

    def linked(path):
        store = path / {"npy": "vectors.npy", "faiss": "index.faiss", "lancedb": "recipe.json"}[fmt]
        shutil.copy(store, path.parent / "elsewhere")
        store.unlink()
        store.symlink_to(path.parent / "elsewhere")

    cases = {missing: "manifest.json: missing", garbled: "manifest.json: unreadable",
             edited: "its checksum does not match", linked: "not a plain file"}
    def table_linked(path):  # the table's directory replaced by a link to a copy
        shutil.move(path / "gallery.lance", path.parent / "table-elsewhere")
        (path / "gallery.lance").symlink_to(path.parent / "table-elsewhere")

    if fmt == "lancedb":  # lance reads every file of its table (other files beside the export are ignored)
        cases[table_file_added] = "not in the export's manifest"
        cases[table_linked] = "gallery.lance: a link"
    for damage, says in cases.items():
        path = copy(made, fmt, tmp_path)
        damage(path)
        refused(cli, made, path, tmp_path, says)
        shutil.rmtree(path)
        for elsewhere in ("elsewhere", "table-elsewhere"):
            target = tmp_path / elsewhere
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_untouched_export_and_a_file_beside_it_search_as_written(cli, made, tmp_path, fmt):
    path = copy(made, fmt, tmp_path)
    (path / "NOTES.txt").write_text("a file no reader reads")
    assert search(cli, made, path, tmp_path) == (0, "identical")
    manifest = json.loads((path / "manifest.json").read_text())
    assert "recipe.json" in manifest["files"] and all(len(r["sha256"]) == 64 for r in manifest["files"].values())
