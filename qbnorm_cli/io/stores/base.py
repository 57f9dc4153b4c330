"""What an index store is (`Store`): how it writes an export's augmented vectors, opens them again
and searches them, and the opened export (`Export`) it hands to `search`. The steps every
directory store shares (a temporary directory renamed into place, gate.npy, recipe.json and the
manifest written last; reading them back checked) are written once, in `DirectoryStore`.

A store needing an optional extra (faiss, lancedb) imports it only inside its methods, through
io/extras.need, so that the core commands never import it.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from qbnorm_cli.core.augmented import FINGERPRINT_ROWS, fingerprint
from qbnorm_cli.core.sampling import spread
from qbnorm_cli.errors import DataError, RuntimeFailure, one_line, param
from qbnorm_cli.io.atomic import OutputDirectory, jsonable
from qbnorm_cli.io.extras import need
from qbnorm_cli.io.fileschema import check_values
from qbnorm_cli.io.schemas import INDEX_RECIPE_FORMAT, check_recipe
from qbnorm_cli.io.specs import ArrayInput, open_npy
from qbnorm_cli.io.stores.manifest import RECIPE_FILE, write_manifest
from qbnorm_cli.version import FORMAT_VERSION

KIND = "index-vectors"
GATE_FILE = "gate.npy"

Blocks = Iterator[tuple[int, np.ndarray]]  # (first row, float32 (rows, d+1) augmented vectors), in order
SearchFunction = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]  # (x, k) → (values, ids)
ReadRows = Callable[[int, int], np.ndarray]  # (c0, c1) → float32 rows c0:c1


@dataclass(frozen=True)
class IndexOptions:
    """An index to build: exact `flat`, or approximate `hnsw` (M, efConstruction, efSearch)
    or `ivf` (nlist inverted lists, nprobe probed at search time)."""

    index_type: str = "flat"
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    nlist: int | None = None  # None: 4·√G, at most G/39 (faiss wants 39 training points per list)
    nprobe: int = 16

    def lists(self, n_rows: int) -> int:
        if self.nlist is not None:
            return self.nlist
        return max(1, min(round(4 * float(np.sqrt(n_rows))), n_rows // 39))

    def describe(self, n_rows: int) -> dict:
        if self.index_type == "hnsw":
            return {"type": "hnsw", "M": self.hnsw_m, "ef_construction": self.ef_construction,
                    "ef_search": self.ef_search}
        if self.index_type == "ivf":
            return {"type": "ivf", "nlist": self.lists(n_rows), "nprobe": self.nprobe}
        return {"type": "flat"}


@dataclass(frozen=True)
class Writing:
    """What `Store.write` is given besides the vectors: the export's shape, the index to build and
    what the output records (its inputs, parameters, provenance)."""

    n_rows: int
    dim: int  # the augmented vectors' (the embeddings' + 1)
    options: IndexOptions = IndexOptions()
    train: Callable[[], np.ndarray] | None = None  # the rows an IVF index is trained on
    force: bool = False
    inputs: tuple = ()
    params: dict | None = None
    provenance: str | None = None


class Export:
    """An export opened for searching: its recipe, activation flags and store. A store that keeps
    the vectors exactly reads them (`read`); one searched by an engine of its own names it
    (`engine`) and gives its search (`search`)."""

    engine: ClassVar[str | None] = None  # the engine searching the store; None: its vectors, searched exactly

    def __init__(self, path: str, recipe: dict, gate):
        self.path, self.recipe, self.gate = path, recipe, gate

    @property
    def storage(self) -> str:
        return self.recipe["storage"]

    @property
    def label(self) -> str:
        return self.path

    @property
    def n_rows(self) -> int:
        return int(self.recipe["gallery_rows"])

    @property
    def dim(self) -> int:
        """The augmented vectors' dimension (the embeddings' + 1)."""
        return int(self.recipe["dim"]) + 1

    @property
    def exact(self) -> bool:
        """Whether `read` gives the stored vectors exactly (a recall check compares with them)."""
        return True

    def read(self, c0: int, c1: int) -> np.ndarray:
        """Rows c0:c1 of the stored vectors (float32)."""
        raise NotImplementedError

    def search(self, nprobe: int | None, ef_search: int | None) -> SearchFunction:
        """The engine's search (nprobe, ef_search: an approximate index's settings, when given)."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"path": self.path, "dataset": None, "kind": KIND, "uuid": self.recipe.get("uuid"),
                "storage": self.storage}

    def close(self) -> None:
        pass

    def __enter__(self) -> Export:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VectorsExport(Export):
    """An export whose store keeps the augmented vectors as an array (hdf5, npy), searched exactly."""

    def __init__(self, path: str, recipe: dict, gate, vectors: ArrayInput, h5=None):
        super().__init__(path, recipe, gate)
        self.vectors, self.h5 = vectors, h5

    def read(self, c0: int, c1: int) -> np.ndarray:
        """Rows c0:c1 of the stored vectors, refused if any is not finite."""
        block = self.vectors.read(c0, c1)
        check_values(self.vectors.label, "the vectors", block, values="finite", r0=c0, rows="item")
        return block

    def close(self) -> None:
        self.vectors.close()
        if self.h5 is not None:
            self.h5.close()
            self.h5 = None


@runtime_checkable
class Store(Protocol):
    """A place an export's augmented vectors are written to and searched from."""

    name: str  # `--format` and the recipe's `storage`
    title: str  # how a message names it
    directory: bool  # writes a directory (else one file)
    extra: str | None  # the optional extra (io/extras) it needs
    engine: str | None  # the engine searching it (`--backend`); None: its vectors, searched exactly
    index_types: tuple[str, ...]  # the index types it builds (`--index-type`)

    def index(self, options: IndexOptions, n_rows: int) -> dict | None:
        """The index it builds, as the recipe and the parameters record it (None: no index)."""

    def write(self, output, recipe: dict, blocks: Blocks, gate: np.ndarray | None, digest: Callable[[], str],
              how: Writing) -> dict:
        """Write the export; `digest()` gives the fingerprint once the blocks are consumed.
        Returns the recipe as written (with its uuid, fingerprint and files)."""

    def open(self, path: str, recipe: dict | None, what: str) -> Export:
        """The export at `path` (its checked recipe, for a directory store), refused when it does not
        hold the vectors its recipe describes."""

    def alone(self, path: str, magic: bytes) -> str | None:
        """Why a file is one of this store's own files passed without its export (None: it is not)."""

    def memory_search(self, read: ReadRows, n_rows: int, dim: int, what: str) -> SearchFunction | None:
        """Its engine's exact search of stored vectors, built in memory (None: it builds none)."""


class BaseStore:
    """What most stores are: no extra, no engine of their own, no approximate index, no file of
    their own that could be passed alone."""

    name: ClassVar[str]
    title: ClassVar[str]
    directory: ClassVar[bool] = False
    extra: ClassVar[str | None] = None
    engine: ClassVar[str | None] = None
    index_types: ClassVar[tuple[str, ...]] = ("flat",)

    def index(self, options: IndexOptions, n_rows: int) -> dict | None:
        return None

    def alone(self, path: str, magic: bytes) -> str | None:
        return None

    def memory_search(self, read: ReadRows, n_rows: int, dim: int, what: str) -> SearchFunction | None:
        return None


class DirectoryStore(BaseStore):
    """A store that writes a directory: its own files (`write_files`), then gate.npy unless it
    keeps the flags itself, recipe.json and the manifest; opened after the manifest and recipe
    were checked (io/indexfile.open_export), the flags read, through `open_files`."""

    directory = True
    keeps_gate: ClassVar[bool] = False  # the flags are stored with the vectors, not in gate.npy

    def write(self, output, recipe: dict, blocks: Blocks, gate, digest, how: Writing) -> dict:
        module = need(self.extra, param(f"format={self.name!r}")) if self.extra else None
        recipe["uuid"] = str(uuid.uuid4())
        with OutputDirectory(output, force=how.force, inputs=list(how.inputs), owned=owned_export,
                             what="the export") as tmp:
            files = self.write_files(module, output, tmp, recipe, blocks, gate, how)
            if gate is not None and not self.keeps_gate:
                np.save(tmp / GATE_FILE, np.asarray(gate, dtype=bool))
                files["gate"] = GATE_FILE
            recipe.update(fingerprint=digest(), files=files)
            try:
                (tmp / RECIPE_FILE).write_text(json.dumps(jsonable(recipe), indent=2) + "\n", encoding="utf-8")
                write_manifest(tmp)
            except OSError as exc:
                raise RuntimeFailure(f"{output}: write failed: {exc.strerror or one_line(exc)}") from None
        return recipe

    def write_files(self, module, output, tmp: Path, recipe: dict, blocks: Blocks, gate, how: Writing) -> dict:
        """Write the store's own files into `tmp`; returns them by role (as the recipe's `files`)."""
        raise NotImplementedError

    def open(self, path: str, recipe: dict | None, what: str) -> Export:
        gate = read_gate(path, recipe) if recipe["gated"] and not self.keeps_gate else None
        return self.open_files(path, recipe, gate, what)

    def open_files(self, path: str, recipe: dict, gate, what: str) -> Export:
        """The export of the store's own files (the flags already read, unless it keeps them)."""
        raise NotImplementedError


def owned_export(path: Path) -> bool:
    """Whether a directory is an export qbnorm wrote (it may be replaced with force)."""
    try:
        return json.loads((path / RECIPE_FILE).read_text(encoding="utf-8")).get("format") == INDEX_RECIPE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def parse_recipe(text: str, where: str) -> dict:
    """An export's recipe from its JSON text, checked (io/schemas.RECIPE)."""
    try:
        recipe = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{where}: not a JSON recipe ({one_line(exc)})") from None
    if not isinstance(recipe, dict) or recipe.get("format") != INDEX_RECIPE_FORMAT:
        raise DataError(f"{where}: not a qbnorm index recipe")
    try:
        version = int(recipe.get("format_version", 0))
    except (TypeError, ValueError):
        raise DataError(f"{where}: unreadable format_version") from None
    if version > FORMAT_VERSION:
        raise DataError(f"{where}: format_version {version} is newer than this qbnorm supports ({FORMAT_VERSION}); "
                        f"upgrade qbnorm")
    return check_recipe(recipe, where)


def read_gate(path: str, recipe: dict) -> np.ndarray:
    """A directory export's gate.npy: (G,) bool flags."""
    gate_path = os.path.join(path, GATE_FILE)
    if not os.path.isfile(gate_path):
        raise DataError(f"{path}: no {GATE_FILE}; the recipe says the method is gated")
    gate = np.asarray(open_npy(gate_path))
    if gate.shape != (int(recipe["gallery_rows"]),) or gate.dtype != bool:
        raise DataError(f"{gate_path}: expected ({recipe['gallery_rows']},) bool flags, got {gate.shape} "
                        f"{gate.dtype}")
    return gate


class Picked:
    """The fingerprint's rows, collected as the vectors stream past."""

    def __init__(self, n_rows: int, dim: int):
        self.picks = spread(n_rows, FINGERPRINT_ROWS)
        self.rows = np.zeros((len(self.picks), dim), dtype=np.float32)
        self.n_rows = n_rows

    def see(self, r0: int, block: np.ndarray) -> None:
        for slot, row in enumerate(self.picks):
            if r0 <= row < r0 + len(block):
                self.rows[slot] = block[row - r0]

    def digest(self) -> str:
        return fingerprint(lambda picks: self.rows, self.n_rows)


def check_shape(export: Export, shape, where: str) -> None:
    want = (export.n_rows, export.dim)
    if tuple(shape) != want:
        raise DataError(f"{where} holds {shape[0]} vectors of dimension {shape[1]}, but its recipe describes "
                        f"{want[0]} of {want[1]} (the index of another gallery?)")


def check_vectors(export: Export, shape, where: str, read_rows) -> None:
    """The store holds as many vectors as the recipe says, and (read_rows: list → rows, None when it
    does not keep them exactly) the ones its fingerprint was taken of."""
    check_shape(export, shape, where)
    want = export.recipe.get("fingerprint")
    if want is None or read_rows is None:
        return
    if fingerprint(read_rows, export.n_rows) != want:
        raise DataError(f"{where} holds other vectors than its recipe describes (the index of another gallery "
                        f"or setting?); export again")
