"""Index exports: the augmented gallery vectors an inner-product index serves normalised retrieval
from (core/augmented.py), the dynamic methods' per-item activation flags, and the query-side
recipe, written to and opened from one of the stores of io/stores/ (`STORES`: hdf5, one qbnorm
file; npy, faiss and lancedb, directories; each module says what its store holds).

The recipe records the fingerprint of rows spread over the vectors (or, for LanceDB, the uuid),
so that a store from another export (another gallery, method or setting) is refused. Its fields
are declared once, in io/schemas.py (`RECIPE`: types, finite ranges), and checked when an export is
opened. Integrity: an HDF5 export is a qbnorm file (its schema, Fletcher-32 checksums and
attribute checksums); a directory export ends with manifest.json, written last: the size and
sha256 of every file (the recipe's included) and a sha256 of the manifest itself, all compared
before anything is read (io/stores/manifest.py). faiss and lancedb are optional extras, imported
only by their stores and only when one needs them.
"""

from __future__ import annotations

import os
from pathlib import Path

from qbnorm_cli.errors import DataError, UsageError, one_line, param
from qbnorm_cli.io import schemas
from qbnorm_cli.io.atomic import check_interrupt, created_now
from qbnorm_cli.io.hdf5 import check_readable
from qbnorm_cli.io.stores import STORES
from qbnorm_cli.io.stores.base import Export, IndexOptions, Picked, Writing, parse_recipe
from qbnorm_cli.io.stores.manifest import RECIPE_FILE, verify_manifest
from qbnorm_cli.version import FORMAT_VERSION, VERSION

RECIPE_FORMAT = schemas.INDEX_RECIPE_FORMAT
INDEX_TYPES = schemas.INDEX_TYPES
FORMATS = tuple(STORES)  # `--format`, in the order offered
(FILE_STORE,) = (store for store in STORES.values() if not store.directory)  # an export that is one file
ENGINES = {store.engine: store for store in STORES.values() if store.engine}  # `--backend`, besides numpy


def write_export(output, storage: str, recipe: dict, blocks, gate, *, n_rows: int, dim: int,
                 options: IndexOptions = IndexOptions(), train=None, force: bool = False, inputs=(),
                 params: dict | None = None, provenance: str | None = None) -> dict:
    """Write the export: `blocks` yields (first row, float32 (rows, dim) augmented vectors) in order;
    `train()` gives the rows an IVF index is trained on. Returns the recipe as written (with its
    uuid, fingerprint, files and the index's parameters)."""
    recipe = dict(recipe, format=RECIPE_FORMAT, format_version=FORMAT_VERSION, storage=storage,
                  created_by=f"qbnorm {VERSION}", created_at=created_now(), metric="inner_product")
    picked = Picked(n_rows, dim)

    def seen():
        for r0, block in blocks:
            check_interrupt()
            picked.see(r0, block)
            yield r0, block

    how = Writing(n_rows, dim, options, train, force, tuple(inputs), params, provenance)
    return STORES[storage].write(output, recipe, seen(), gate, picked.digest, how)


def open_export(path, *, what: str = "search") -> Export:
    """An export written by `write_export`: an HDF5 file of kind index-vectors, or a directory
    with recipe.json. Refuses a store that does not hold the vectors its recipe describes."""
    path = str(path)
    if os.path.isdir(path):
        return _open_directory(path, what)
    magic = check_readable(path)
    for kind in STORES.values():
        alone = kind.alone(path, magic)
        if alone:
            raise DataError(f"{path}: {alone}; pass the export's directory (with its {RECIPE_FILE})")
    return FILE_STORE.open(path, None, what)


def _open_directory(path: str, what: str) -> Export:
    recipe_path = os.path.join(path, RECIPE_FILE)
    if not os.path.isfile(recipe_path):
        raise DataError(f"{path}: not a qbnorm index export (no {RECIPE_FILE})")
    verify_manifest(path)
    try:
        text = Path(recipe_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{recipe_path}: cannot read ({one_line(exc)})") from None
    recipe = parse_recipe(text, recipe_path)
    kind = STORES.get(recipe["storage"])
    if kind is None or not kind.directory:
        raise DataError(f"{recipe_path}: unknown storage {recipe['storage']!r}")
    return kind.open(path, recipe, what)


def check_storage(storage: str, index_type: str) -> None:
    if storage not in STORES:
        raise UsageError(f"{param('format')} {storage!r}: choose one of {', '.join(STORES)}")
    if index_type not in INDEX_TYPES:
        raise UsageError(f"{param('index_type')} {index_type!r}: choose one of {', '.join(INDEX_TYPES)}")
    if index_type not in STORES[storage].index_types:
        builders = " or ".join(param(f"format={name}") for name, kind in STORES.items()
                               if index_type in kind.index_types)
        raise UsageError(f"{param('index_type')} {index_type}: approximate indexes are built with {builders}")
