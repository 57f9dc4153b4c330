"""The index stores behind one protocol (io/stores/): every registered store writes an export that
opens to the same recipe, vectors and flags and searches to the same ranking as the export held in
memory; the formats, backends and extras are derived from the one registry; io/indexfile.py and
api/serving.py branch on no store's name; the core path imports no optional extra."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import qbnorm_cli
from qbnorm_cli.api import serving
from qbnorm_cli.io import extras, indexfile, schemas
from qbnorm_cli.io.stores import STORES
from qbnorm_cli.io.stores.base import Export, Store

ROOT = Path(__file__).resolve().parent.parent
TOP = 5


def available(name: str) -> bool:
    extra = STORES[name].extra
    return extra is None or importlib.util.find_spec(extras.EXTRAS[extra][0]) is not None


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(7)
    gallery = rng.standard_normal((60, 8)).astype(np.float32)
    queries = rng.standard_normal((30, 8)).astype(np.float32)
    bank = rng.standard_normal((120, 8)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qbnorm_cli.QbnormWarning)
        probe = qbnorm_cli.probe(bank, gallery, betas=[20.0], k=1)
    return queries, gallery, probe


def test_every_store_follows_the_protocol_and_the_lists_come_from_the_registry():
    assert all(isinstance(store, Store) for store in STORES.values())
    assert [store.name for store in STORES.values()] == list(STORES)
    assert serving.FORMATS == indexfile.FORMATS == tuple(STORES)
    assert schemas.INDEX_STORAGES == tuple(STORES)  # the recipe's `storage` field takes exactly these
    engines = [store.engine for store in STORES.values() if store.engine]
    assert serving.BACKENDS == ("numpy", *engines) and len(set(engines)) == len(engines)
    assert [store.name for store in STORES.values() if not store.directory] == [indexfile.FILE_STORE.name]
    assert all(store.extra is None or store.extra in extras.EXTRAS for store in STORES.values())
    assert {t for store in STORES.values() for t in store.index_types} == set(schemas.INDEX_TYPES)
    assert all("flat" in store.index_types for store in STORES.values())


@pytest.mark.parametrize("name", list(STORES))
@pytest.mark.parametrize("method", ["is", "dis"])
def test_every_store_round_trips_an_export_and_its_search(problem, tmp_path, name, method):
    if not available(name):
        pytest.skip(f"needs the {STORES[name].extra} extra")
    queries, gallery, probe = problem
    store = STORES[name]
    out = tmp_path / ("export.h5" if not store.directory else "export")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qbnorm_cli.QbnormWarning)
        memory = qbnorm_cli.export(probe, gallery, method=method)
        written = qbnorm_cli.export(probe, gallery, method=method, format=name, output=out)
    assert written.recipe["storage"] == name
    assert set(written.recipe["files"]) >= ({"vectors"} if store.engine is None else set())
    with indexfile.open_export(out) as opened:
        assert isinstance(opened, Export) and opened.engine == store.engine
        assert opened.recipe == {**written.recipe}
        assert opened.describe()["storage"] == name and opened.describe()["uuid"] == written.uuid
        assert (opened.n_rows, opened.dim) == memory.vectors.shape
        if memory.gate is None:
            assert opened.gate is None
        else:
            np.testing.assert_array_equal(opened.gate, memory.gate)
        assert opened.exact  # a flat index keeps the vectors exactly
        np.testing.assert_array_equal(opened.read(0, opened.n_rows), memory.vectors)
        np.testing.assert_array_equal(opened.read(7, 19), memory.vectors[7:19])
    want = qbnorm_cli.search(memory, queries, top_k=TOP)
    got = qbnorm_cli.search(out, queries, top_k=TOP)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.normalised, want.normalised)
    np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=1e-5)  # the engines' float32 products


@pytest.mark.parametrize("name", [name for name, store in STORES.items() if store.engine is None])
@pytest.mark.parametrize("backend", serving.BACKENDS)
def test_stored_vectors_search_alike_with_every_backend_or_name_the_store_to_export(problem, tmp_path, name,
                                                                                     backend):
    queries, gallery, probe = problem
    out = tmp_path / ("export.h5" if not STORES[name].directory else "export")
    qbnorm_cli.export(probe, gallery, method="dis", format=name, output=out)
    want = qbnorm_cli.search(out, queries, top_k=TOP)
    engine = indexfile.ENGINES.get(backend)
    if engine is not None and not available(engine.name):
        pytest.skip(f"needs the {engine.extra} extra")
    try:
        got = qbnorm_cli.search(out, queries, top_k=TOP, backend=backend)
    except qbnorm_cli.UsageError as exc:  # an engine that searches only its own store
        assert engine is not None and str(exc) == (f"backend {backend}: search a {engine.title} export (export "
                                                   f"with format={engine.name})")
        return
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=1e-5)


def test_indexfile_and_serving_branch_on_no_store_s_name():
    """What differs between stores is asked of the store (its protocol), never `if storage == "faiss"`."""
    names = set(STORES) | {store.engine for store in STORES.values() if store.engine}
    found = []
    for module in (indexfile, serving):
        path = Path(module.__file__)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                for side in (node.left, *node.comparators):
                    constants = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                    found += [f"{path.name}:{node.lineno}: {c.value!r}" for c in constants
                              if isinstance(c, ast.Constant) and c.value in names]
    assert not found, found


def test_an_hdf5_and_npy_export_and_search_import_no_optional_extra(tmp_path):
    code = """
import sys, warnings
import numpy as np
import qbnorm_cli
rng = np.random.default_rng(0)
gallery, bank = rng.standard_normal((40, 4)), rng.standard_normal((80, 4))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    probe = qbnorm_cli.probe(bank, gallery, betas=[10.0], k=1)
for name, out in (("hdf5", sys.argv[1] + "/e.h5"), ("npy", sys.argv[1] + "/e")):
    qbnorm_cli.export(probe, gallery, method="dis", format=name, output=out)
    qbnorm_cli.search(out, gallery[:5], top_k=3)
print(sorted(m for m in ("faiss", "lancedb", "pyarrow") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout
    assert out.strip() == "[]"


def test_a_store_s_own_file_passed_alone_is_refused_naming_the_directory(problem, tmp_path):
    if not available("faiss"):
        pytest.skip("needs the faiss extra")
    _, gallery, probe = problem
    qbnorm_cli.export(probe, gallery, method="is", format="faiss", output=tmp_path / "f")
    alone = tmp_path / "f" / "index.faiss"
    with pytest.raises(qbnorm_cli.DataError) as caught:
        indexfile.open_export(alone)
    assert str(caught.value) == f"{alone}: a bare faiss index; pass the export's directory (with its recipe.json)"


def test_a_directory_whose_recipe_names_the_file_store_is_refused(problem, tmp_path):
    import json

    from qbnorm_cli.io.stores.manifest import write_manifest

    _, gallery, probe = problem
    out = tmp_path / "e"
    qbnorm_cli.export(probe, gallery, method="is", format="npy", output=out)
    recipe = json.loads((out / "recipe.json").read_text())
    (out / "recipe.json").write_text(json.dumps({**recipe, "storage": indexfile.FILE_STORE.name}))
    (out / "manifest.json").unlink()
    write_manifest(out)  # as someone who recomputes it would
    with pytest.raises(qbnorm_cli.DataError) as caught:
        indexfile.open_export(out)
    assert str(caught.value) == f"{out / 'recipe.json'}: unknown storage {indexfile.FILE_STORE.name!r}"


@pytest.mark.parametrize("name", [name for name, store in STORES.items() if store.engine is not None])
def test_an_engine_s_store_is_searched_with_its_engine_only(problem, tmp_path, name):
    if not available(name):
        pytest.skip(f"needs the {STORES[name].extra} extra")
    queries, gallery, probe = problem
    out = tmp_path / "e"
    qbnorm_cli.export(probe, gallery, method="is", format=name, output=out)
    engine = STORES[name].engine
    for backend in serving.BACKENDS:
        if backend == engine:
            qbnorm_cli.search(out, queries, top_k=TOP, backend=backend)
            continue
        with pytest.raises(qbnorm_cli.UsageError) as caught:
            qbnorm_cli.search(out, queries, top_k=TOP, backend=backend)
        assert str(caught.value) == f"backend {backend}: {out} is a {name} export; it is searched with {engine}"


@pytest.mark.parametrize("index_type", [t for t in schemas.INDEX_TYPES if t != "flat"])
def test_an_approximate_index_names_the_stores_that_build_it(problem, tmp_path, index_type):
    _, gallery, probe = problem
    builders = [name for name, store in STORES.items() if index_type in store.index_types]
    assert builders == ["faiss"]
    for name in STORES:
        if name in builders:
            continue
        out = tmp_path / ("x" if STORES[name].directory else "x.h5")
        with pytest.raises(qbnorm_cli.UsageError) as caught:
            qbnorm_cli.export(probe, gallery, format=name, index_type=index_type, output=out)
        assert str(caught.value) == f"index_type {index_type}: approximate indexes are built with format=faiss"
