"""The hdf5 store: one qbnorm file of kind `index-vectors`: /vectors (G, d+1) float32, /gate (G,)
bool (gated methods only), the recipe as attributes (`recipe`: JSON, and its main fields). Its
integrity is a qbnorm file's: its schema (io/schemas.py), Fletcher-32 and attribute checksums."""

from __future__ import annotations

import json

import numpy as np

from qbnorm_cli.errors import DataError
from qbnorm_cli.io import schemas
from qbnorm_cli.io.atomic import OutputFile, jsonable
from qbnorm_cli.io.hdf5 import has_checksum, open_qbnorm, reading
from qbnorm_cli.io.specs import dataset_input
from qbnorm_cli.io.stores.base import (
    KIND,
    BaseStore,
    Export,
    VectorsExport,
    Writing,
    check_vectors,
    parse_recipe,
)

ATTR_FIELDS = schemas.RECIPE_ATTRS  # the recipe's fields an HDF5 export also holds as attributes


class Hdf5File(BaseStore):
    name, title = "hdf5", "HDF5"

    def write(self, output, recipe: dict, blocks, gate, digest, how: Writing) -> dict:
        with OutputFile(str(output), KIND, force=how.force, params=how.params or {}, inputs=list(how.inputs),
                        provenance=how.provenance) as out:
            ds = out.create("/vectors", shape=(how.n_rows, how.dim), dtype=np.float32)
            for r0, block in blocks:
                out.write_rows(ds, r0, block)
            if gate is not None:
                out.create("/gate", data=np.asarray(gate, dtype=bool))
            recipe.update(uuid=out.uuid, fingerprint=digest(), files={"vectors": "/vectors", "gate": "/gate"}
                          if gate is not None else {"vectors": "/vectors"})
            out.h5.attrs["recipe"] = json.dumps(jsonable(recipe), sort_keys=True)
            for name in ATTR_FIELDS:
                value = recipe.get(name)
                if value is not None:
                    out.h5.attrs[name] = value
            out.warnings = list(recipe.get("warnings", ()))
        return recipe

    def open(self, path: str, recipe: dict | None, what: str) -> Export:
        h5 = open_qbnorm(path, KIND)
        try:
            layout = schemas.check(h5, KIND, path)  # the recipe's fields, checksums and shapes
            recipe = parse_recipe(layout.root_attrs.get("recipe", ""), path)
            vectors = dataset_input(h5, path, "/vectors", kind=KIND, layout=layout, owner=False)
            gate = None
            if recipe["gated"]:
                if "/gate" not in h5:
                    raise DataError(f"{path}: no dataset /gate; the recipe says the method is gated")
                with reading(f"{path}::/gate", "its values", checksummed=has_checksum(h5["/gate"]),
                             remedy=schemas.INDEX_REMEDY):
                    gate = np.asarray(h5["/gate"][()], dtype=bool)
        except BaseException:
            h5.close()
            raise
        export = VectorsExport(path, recipe, gate, vectors, h5)
        check_vectors(export, vectors.shape, path, lambda picks: vectors.read_rows(np.asarray(picks)))
        return export
