"""`export` and `search`: normalised retrieval served by any inner-product index.

Every method whose normaliser is affine, η = scale·S[q, j] − offset[j] − r_q with or without a
dynamic gate (core/normalisers.py; the registry, qbnorm_cli/methods.py, cites each formula), ranks
a row as the inner product of [q, c] with the augmented gallery vectors [g_j, −(offset[j] − m)/
(scale·c)] does (core/augmented.py says why, and how c is chosen). `export` writes those vectors,
the per-item activation flags of a gated method and the query-side recipe, for faiss, LanceDB or
any other index; `search` runs queries against such an export, the dynamic gate built in, and
writes an ordinary ranking file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qbnorm_cli import methods
from qbnorm_cli.api.common import (
    bounded,
    check_choice,
    check_count,
    embeddings,
    other_gallery,
    progress_or_none,
    warn,
)
from qbnorm_cli.api.normalising import Written, checked_settings
from qbnorm_cli.core import augmented
from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.core.results import Ranking
from qbnorm_cli.errors import DataError, UsageError, param, plain_text
from qbnorm_cli.io import indexfile
from qbnorm_cli.io.probefile import Probe
from qbnorm_cli.io.sinks import Column, Sink
from qbnorm_cli.io.stores.base import KIND
from qbnorm_cli.io.validate import check_written
from qbnorm_cli.streaming.budget import DEFAULT_MEMORY, make_budget, spans
from qbnorm_cli.streaming.indexsearch import EngineSearch, ExactSearch, search_block
from qbnorm_cli.streaming.sources import SIMILARITIES, Embeddings

FORMATS = indexfile.FORMATS
INDEX_TYPES = indexfile.INDEX_TYPES
BACKENDS = ("numpy", *indexfile.ENGINES)  # numpy: an exact search of stored vectors
DTYPES = ("float32", "float64")
EMPTY_SCORE = float(np.finfo(np.float32).min)  # an empty slot's score (its index is −1): finite, as evaluate wants


@dataclass(frozen=True)
class Exported:
    """An export: its recipe (the query-side constants, the method and its settings), and either
    the augmented vectors and activation flags in memory (no `output`) or where they were written."""

    recipe: dict
    vectors: np.ndarray | None = None
    gate: np.ndarray | None = None
    path: str | None = None
    warnings: tuple[str, ...] = ()
    inputs: tuple[dict, ...] = ()

    @property
    def uuid(self) -> str | None:
        return self.recipe.get("uuid")


@dataclass(frozen=True)
class SearchResult(Ranking):
    """A `Ranking` (evaluate and hubness take it as one) with what the search measured: `recall`
    against the exact normalised ranking on a sample of queries, when it was asked for."""

    recall: dict | None = None
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SearchWritten(Written):
    """What `search` wrote (a ranking file), with the recall check's figures when asked for and
    the index searches it took per query."""

    recall: dict | None = None
    searches_per_query: float = 1.0


def _as_probe(value) -> Probe:
    return value if isinstance(value, Probe) else Probe.load(value)


def not_offset_message(method: methods.Method, norm=None) -> str:
    """Why `method` cannot be exported, in one line (`norm`: its normaliser, when built)."""
    if norm is not None and norm.pairwise is not None:
        return f"{param('method')} {method.name}: not exportable: {norm.pairwise.why_not_exportable}"
    return (f"{param('method')} {method.name}: not an offset method (its score depends on the rank of S[q, j] "
            f"among each item's bank scores, which no inner-product index computes); export an affine method "
            f"(e.g. {methods.DEFAULT.name})")


@bounded
@methods.takes_parameters
def export(probe, gallery, *, method: str = methods.DEFAULT.name, similarity: str | None = None,
           constant: float | None = None, format: str = "hdf5",
           index_type: str = "flat", hnsw_m: int = 32,
           ef_construction: int = 200, ef_search: int = 128, nlist: int | None = None, nprobe: int = 16,
           memory=DEFAULT_MEMORY, block_rows: int | None = None, output=None, force: bool = False,
           accept_mismatch: bool = False, progress=None, provenance: str | None = None,
           extra_params: dict | None = None, **parameters) -> Exported:
    """The augmented gallery vectors that serve `method`'s normalised ranking from an
    inner-product index, with the query-side recipe.

    probe: a `Probe` or probe file of this gallery; gallery: its embeddings (as normalise takes
    them; cosine rows are L2-normalised first). The method's parameters: keywords, as normalise
    takes them (methods.PARAMETERS; parameters the method does not take are ignored). Every method whose normaliser
    is affine (η = scale·S − offset[j], gated or not) can be exported; gc cannot. constant: the
    query's c (default: the smallest power of two that keeps the extra column inside the gallery
    coordinates' range; core/augmented.py says why, docs/serving.md when to choose another).

    Without `output`, returns the vectors ((G, d+1) float32), the activation flags of a gated
    method and the recipe in memory. With `output`, writes `format`: hdf5 (a qbnorm file of kind
    index-vectors), npy (a directory: vectors.npy, gate.npy, recipe.json), faiss (a directory
    with index.faiss: `index_type` flat, hnsw (hnsw_m, ef_construction, ef_search) or ivf (nlist,
    nprobe); needs qbnorm[faiss]) or lancedb (a LanceDB database with table `gallery`; needs
    qbnorm[lancedb]).
    """
    spec = methods.get(method)
    check_choice(format, FORMATS, "format")
    check_choice(index_type, INDEX_TYPES, "index_type")
    indexfile.check_storage(format, index_type)
    for name, value in (("hnsw_m", hnsw_m), ("ef_construction", ef_construction), ("ef_search", ef_search),
                        ("nprobe", nprobe)):
        _check_positive(value, name)
    if nlist is not None:
        _check_positive(nlist, "nlist")
    store = indexfile.STORES[format]
    if output is None and store.directory:
        raise UsageError(f"{param('format')} {format}: writes files; give {param('output')}")
    if output is not None and store.directory:
        _check_directory_name(output, format)
    if spec.needs.sorted_bank:
        raise UsageError(not_offset_message(spec))
    if constant is not None:
        constant = CONSTANT.check(constant)
    budget = make_budget(memory, block_rows)
    probe = _as_probe(probe)
    n_gallery = probe.n_gallery
    probed = probe.attrs.get("similarity", "cosine")
    similarity = similarity or (probed if probed in SIMILARITIES else "cosine")
    check_choice(similarity, SIMILARITIES, "similarity")
    source = embeddings(gallery, "gallery")
    if source.rows != n_gallery:
        raise DataError(f"{source.label} has {source.rows} rows but {probe.label} was made from a gallery "
                        f"of {n_gallery}")
    identity = source.identity
    mismatch = other_gallery(probe, identity, source.label, accept_mismatch)
    _, values = checked_settings(spec, parameters, probe)
    if nlist is not None and nlist > n_gallery:
        raise UsageError(f"{param('nlist')} {nlist}: larger than the gallery size ({n_gallery})")
    norm = methods.build(spec, probe, values)
    if not norm.exportable:
        raise UsageError(not_offset_message(spec, norm))
    found = [w for w in (mismatch, *methods.scale_warnings(values, probe)) if w]
    for message in found:
        warn(message)

    offset = None if norm.identity else norm.offset
    common, item_scale = augmented.split_scale(norm.scale)
    shift, center = augmented.shifts(offset, common, n_gallery)
    gate = None if (norm.identity or norm.gate is None) else np.asarray(norm.gate, dtype=bool)
    embedded = Embeddings(source, similarity, budget)
    rows = augmented.ScaledRows(embedded, item_scale)
    dim = source.cols
    step = budget.rows(dim * 4 * 4, share=0.25, total=n_gallery, align=source.chunk_rows)
    rms, widest, _ = augmented.coordinate_stats(rows.block(r0, r1) for r0, r1 in spans(n_gallery, step))
    chosen = augmented.query_constant(shift, widest)
    constant = chosen if constant is None else float(np.float32(constant))
    options = indexfile.IndexOptions(index_type, hnsw_m, ef_construction, ef_search, nlist, nprobe)
    recipe = _recipe(spec, values, norm, common, item_scale is not None, center, constant, similarity, dim, n_gallery,
                     gate, identity, probe)
    recipe["extra_column"] = {"constant_rule": "the smallest power of two c with max |x| ≤ the coordinates' "
                              "largest |value|" if constant == chosen else "given",
                              "automatic_constant": chosen, "coordinate_rms": rms, "coordinate_max": widest,
                              "x_std": float(np.std(shift) / constant), "x_max": float(np.abs(shift).max() / constant)
                              if shift.size else 0.0}
    recipe["warnings"] = [plain_text(w) for w in found]  # recorded with the export, as every output records them

    def blocks():
        with progress_or_none(progress)("export", n_gallery, unit="rows") as advance:
            for r0, r1 in spans(n_gallery, step):
                block = augmented.augment(rows.block(r0, r1), shift[r0:r1], constant)
                check_written(f"{output or 'export'} (the augmented vectors)", block, r0)
                yield r0, block
                advance(r1 - r0)

    def train():  # an IVF index's coarse quantiser: up to 256 points per list
        picks = augmented.sample_rows(n_gallery, min(1.0, 256 * options.lists(n_gallery) / n_gallery))
        return augmented.augment(rows.rows_of(picks), shift[picks], constant)

    if output is None:
        vectors = np.empty((n_gallery, dim + 1), dtype=np.float32)
        for r0, block in blocks():
            vectors[r0:r0 + len(block)] = block
        return Exported(recipe, vectors, gate, None, tuple(found), (source.describe(),))
    index = store.index(options, n_gallery)
    params = {**recipe["params"], "format": format, **({"index": index} if index is not None else {}),
              "memory": budget.memory, "block_rows": block_rows, **(extra_params or {})}
    inputs = [source.describe(), {"path": probe.path, "dataset": None, "kind": "probe", "uuid": probe.uuid}]
    written = indexfile.write_export(output, format, recipe, blocks(), gate, n_rows=n_gallery, dim=dim + 1,
                                     options=options, train=train, force=force, inputs=inputs, params=params,
                                     provenance=provenance)
    return Exported(written, None, gate, str(output), tuple(found), tuple(inputs))


# Names that look like one file: a directory export named so (`-o dis.npy`) misleads whoever reads it.
FILE_SUFFIXES = (".npy", ".npz", ".h5", ".hdf5", ".hdf", ".json", ".pkl", ".pickle", ".faiss", ".parquet", ".csv")


def _check_directory_name(output, format: str) -> None:
    path = Path(str(output))
    if path.suffix.lower() in FILE_SUFFIXES:
        raise UsageError(f"{output}: {param('format')} {format} writes a directory, not a {path.suffix} file; "
                         f"name it without a file suffix, e.g. {path.with_name(path.stem + '_' + format)}")


def _check_positive(value, name: str) -> None:
    """A whole number ≥ 1 that faiss's C ints hold."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not 1 <= value <= methods.WHOLE_MAX:
        raise UsageError(f"{param(name)} {value!r}: must be a whole number ≥ 1 and ≤ {methods.WHOLE_MAX}")


# c within float32's normal range, so that [q, c] and the gallery's −shift/c column stay finite
CONSTANT = methods.Parameter("constant", float, "the query's constant c of the extra column", minimum=1e-30,
                             maximum=1e30)


def _recipe(spec: methods.Method, values: dict, norm: Normaliser, common: float, per_item: bool, center: float,
            constant: float, similarity: str, dim: int, n_gallery: int, gate, identity: str, probe: Probe) -> dict:
    steps = ["L2-normalise each query" if similarity == "cosine" else "take each query as it is (dot products)"]
    if per_item:  # η = a_j·S − b_j: the vectors carry a_j/ā, so [q, 0] no longer gives the raw scores
        steps.append(f"search [q, {constant:g}] for the normalised ranking (each vector is the item's embedding "
                     f"times its scale a_j divided by their mean ā = {common:.17g})")
    else:
        steps.append(f"search [q, {constant:g}] for the normalised ranking, [q, 0] for the raw one")
    if gate is not None:
        steps.append("a query takes the normalised ranking only when gate[j] holds for the raw ranking's top-1 j, "
                     "else it keeps the raw one")
    if norm.identity:
        steps = [steps[0], "search [q, 0]: the raw ranking (the baseline method normalises nothing)"]
    steps.append(f"score η = {common:.17g}·⟨query, vector⟩ − {center:.17g}" + (
        f" − r_q (r_q = the mean of the row's {norm.row_topk} best raw scores: a per-query constant that changes "
        "no ranking)" if norm.row_topk else ""))
    return {
        "method": spec.name, "params": {**values, "similarity": similarity, "probe_uuid": probe.uuid},
        "similarity": similarity, "normalise_queries": similarity == "cosine", "dim": dim, "gallery_rows": n_gallery,
        "scale": float(common), "item_scales": per_item, "center": float(center), "constant": float(constant),
        "raw_constant": 0.0,
        "gated": gate is not None, "gate_share": float(gate.mean()) if gate is not None else None,
        "baseline": bool(norm.identity), "row_topk": int(norm.row_topk),
        "score_domain": "log (compare within a row)" if spec.log_domain else "linear",
        "gallery_identity": identity, "probe_uuid": probe.uuid, "query_recipe": "; ".join(steps),
        "metric_warning": "search with the inner-product (dot) metric only: cosine renormalises [q, c] and "
                          "[g, x] (and L2 adds |[g, x]|²), which changes the ranking",
    }


# --- search ----------------------------------------------------------------------------------------

class _Opened:
    """An export to search: its recipe, flags, searcher and, for the recall check, an exact one."""

    def __init__(self, index, backend: str | None, nprobe, ef_search, budget, what: str = "search"):
        self.closing = None
        if isinstance(index, Exported):
            if index.vectors is None:
                index = index.path
            else:
                self.label, self.recipe, self.gate = "the export", index.recipe, index.gate
                self.record = {"path": None, "dataset": None, "kind": KIND, "uuid": index.uuid}
                vectors = np.ascontiguousarray(index.vectors, dtype=np.float32)
                for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
                    if value is not None:
                        raise UsageError(f"{param(name)} {value}: the export is searched exactly (no index to tune)")
                self._vectors(lambda c0, c1: vectors[c0:c1], backend, budget)
                return
        opened = indexfile.open_export(index, what=what)
        self.closing = opened
        self.label, self.recipe, self.gate, self.record = opened.label, opened.recipe, opened.gate, opened.describe()
        kind = recipe_index_type(self.recipe)
        for name, value, needs in (("nprobe", nprobe, "ivf"), ("ef_search", ef_search, "hnsw")):
            if value is not None and kind != needs:
                raise UsageError(f"{param(name)} {value}: {self.label} is a {kind} index; {param(name)} tunes "
                                 f"{needs} indexes")
        if opened.engine is None:  # stored vectors
            self._vectors(opened.read, backend, budget)
            return
        if backend not in (None, opened.engine):
            raise UsageError(f"{param('backend')} {backend}: {self.label} is a {opened.storage} export; it is "
                             f"searched with {opened.engine}")
        self.searcher = EngineSearch(opened.search(nprobe, ef_search), opened.n_rows, kind != "flat")
        self.exact = (lambda: ExactSearch(opened.read, opened.n_rows, opened.dim, budget)) if opened.exact else None

    def _vectors(self, read, backend, budget) -> None:
        n, dim = int(self.recipe["gallery_rows"]), int(self.recipe["dim"]) + 1
        engine = indexfile.ENGINES.get(backend)
        if engine is None:
            self.searcher = ExactSearch(read, n, dim, budget)
        else:
            search = engine.memory_search(read, n, dim, param(f"backend={backend}"))
            if search is None:
                raise UsageError(f"{param('backend')} {backend}: search a {engine.title} export (export with "
                                 f"{param(f'format={engine.name}')})")
            self.searcher = EngineSearch(search, n, False)
        self.exact = lambda: ExactSearch(read, n, dim, budget)

    def close(self) -> None:
        if self.closing is not None:
            self.closing.close()


def recipe_index_type(recipe: dict) -> str:
    return (recipe.get("index") or {}).get("type", "flat")


def served_normaliser(recipe: dict, gate) -> Normaliser:
    """The export's η = scale·⟨·,·⟩ − m and gate, as core.normalisers evaluates them."""
    return Normaliser(scale=float(recipe["scale"]), gate=gate, row_topk=int(recipe.get("row_topk") or 0),
                      identity=bool(recipe.get("baseline")))


@bounded
def search(index, queries, *, top_k: int = 10, check_recall: float | None = None, backend: str | None = None,
           nprobe: int | None = None, ef_search: int | None = None, row_term: bool = False, dtype: str = "float64",
           memory=DEFAULT_MEMORY, block_rows: int | None = None, output=None, force: bool = False, progress=None,
           provenance: str | None = None):
    """Each query's top_k gallery items from an export (`export`'s result, or a file or directory
    it wrote), with the method's normalised scores, through the export's own index: faiss (exact
    or approximate: nprobe, ef_search override the export's), LanceDB, or an exact search of the
    stored vectors (backend numpy; backend faiss builds an exact faiss index of them).

    A dynamic gate is built in: [q, 0] gives the raw ranking, whose top-1 decides the gate, and
    [q, c] the normalised one for the rows gated in. Scores are in η units, as normalise writes
    them (up to the float32 rounding of the augmented product); a method's row term r_q (CSLS)
    changes no ranking and is left out unless row_term=True (one more raw search).
    check_recall: the share of queries (seeded sample) whose ranking is compared with the exact one
    (recall@top_k); for approximate indexes.

    Returns a `SearchResult` (a Ranking), or with `output` writes a ranking file (`evaluate` and
    `hubness` read it as normalise's) and returns what it wrote.
    """
    check_choice(dtype, DTYPES, "dtype")
    if backend is not None:
        check_choice(backend, BACKENDS, "backend")
    for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
        if value is not None:
            _check_positive(value, name)
    if check_recall is not None and not (isinstance(check_recall, (int, float)) and 0 < check_recall <= 1):
        raise UsageError(f"{param('check_recall')} {check_recall!r}: a fraction of the queries, in (0, 1]")
    budget = make_budget(memory, block_rows)
    opened = _Opened(index, backend, nprobe, ef_search, budget)
    try:
        return _search(opened, queries, top_k, check_recall, row_term, dtype, budget, output, force, progress,
                       provenance, {"backend": backend, "nprobe": nprobe, "ef_search": ef_search})
    finally:
        opened.close()


def _search(opened: _Opened, queries, top_k, check_recall, row_term, dtype, budget, output, force, progress,
            provenance, options):
    recipe = opened.recipe
    n_gallery, dim = int(recipe["gallery_rows"]), int(recipe["dim"])
    source = embeddings(queries, "queries")
    if source.cols != dim:
        hint = " (pass the embeddings themselves: search appends the constant)" if source.cols == dim + 1 else ""
        raise DataError(f"{source.label} has dimension {source.cols} but {opened.label} was exported from "
                        f"{dim}-dimensional embeddings{hint}")
    check_count(top_k, "top_k", n_gallery, "gallery size")
    norm = served_normaliser(recipe, opened.gate)
    center, constant = float(recipe["center"]), float(recipe["constant"])
    rows = Embeddings(source, recipe["similarity"], budget)
    n_rows = source.rows
    step = budget.rows((dim + 1) * 4 * 4 + top_k * 16 * 4, share=0.25, total=n_rows, align=source.chunk_rows)
    sample = augmented.sample_rows(n_rows, check_recall) if check_recall is not None else None
    kept = np.empty((0 if sample is None else sample.size, top_k), dtype=np.int64)
    normalised = np.zeros(n_rows, dtype=bool)
    empty = [0]
    params = {"method": recipe["method"], "top_k": top_k, "index_uuid": recipe.get("uuid"), "row_term": row_term,
              "dtype": dtype, "memory": budget.memory, "block_rows": budget.block_rows, **options,
              "check_recall": check_recall}

    def blocks():
        with progress_or_none(progress)("search", n_rows, unit="queries") as advance:
            for q0, q1 in spans(n_rows, step):
                scores, indices, gated = search_block(opened.searcher, rows.block(q0, q1), norm, center, constant,
                                                      top_k, row_term)
                normalised[q0:q1] = gated
                if sample is not None:
                    inside = sample[(sample >= q0) & (sample < q1)]
                    kept[np.searchsorted(sample, inside)] = indices[inside - q0]
                empty[0] += int((indices < 0).any(axis=1).sum())
                advance(q1 - q0)
                yield q0, scores, indices

    columns = {"/scores": Column(top_k, dtype), "/neighbors": Column(top_k, np.int64, np.int32)}
    with Sink(output, "ranking", n_rows, columns, force=force, params=params,
              inputs=[source.describe(), opened.record], provenance=provenance) as sink:
        for q0, scores, indices in blocks():
            sink.write(q0, "/scores", np.where(indices < 0, EMPTY_SCORE, scores))
            sink.write(q0, "/neighbors", indices)
        recall_report = _recall(opened, rows, sample, kept, norm, center, constant, top_k, row_term)
        found = _empty_warning(empty[0], top_k)
        searches = _searches(norm, normalised, row_term)
        sink.finish({"/normalised": normalised}, _ranking_attrs(recipe, row_term, searches, recall_report), found)
    for message in found:
        warn(message)
    if output is not None:
        return SearchWritten(str(output), "ranking", sink.uuid, normalised, params,
                             tuple(plain_text(w) for w in found), sink.inputs, recall=recall_report,
                             searches_per_query=searches)
    return SearchResult(sink.arrays["/neighbors"], sink.arrays["/scores"], normalised, n_gallery, recall_report,
                        {**params, "row_term_text": _row_term_text(recipe, row_term), "searches_per_query": searches})


def _ranking_attrs(recipe: dict, row_term: bool, searches: float, recall_report: dict | None) -> dict:
    """The ranking file's attributes (None: left out), as normalise's rankings carry them."""
    log_domain = recipe.get("score_domain", "").startswith("log")
    return {"method": recipe["method"], "gallery_rows": int(recipe["gallery_rows"]),
            "gallery_identity": recipe.get("gallery_identity") or None,
            "score_domain": recipe["score_domain"] if log_domain else None,
            "row_term": _row_term_text(recipe, row_term), "searches_per_query": searches,
            "recall": json.dumps(recall_report) if recall_report is not None else None}


def _searches(norm: Normaliser, normalised: np.ndarray, row_term: bool) -> float:
    """Index searches per query: the raw one (when a gate, the baseline or a row term needs it)
    plus the normalised one for the rows that take it."""
    raw = norm.identity or norm.gate is not None or (row_term and norm.row_topk > 0)
    return float(raw) + float(normalised.mean() if normalised.size else 0.0)


def _row_term_text(recipe: dict, row_term: bool) -> str:
    if not recipe.get("row_topk"):
        return "none (the method has no row term)"
    if row_term:
        return f"included (r_q = the mean of the row's {recipe['row_topk']} best raw scores)"
    return (f"left out: r_q (the mean of the row's {recipe['row_topk']} best raw scores) is a per-query constant that "
            "changes no ranking; scores are η + r_q")


def _empty_warning(rows: int, top_k: int) -> list[str]:
    if not rows:
        return []
    return [f"{rows} queries got fewer than {top_k} items from the approximate index (empty slots hold index −1); "
            f"raise {param('nprobe')} or {param('ef_search')}"]


def _recall(opened: _Opened, rows: Embeddings, sample, kept, norm, center, constant, top_k, row_term):
    """recall@top_k of the sampled rows against the exact normalised ranking of the same vectors."""
    if sample is None:
        return None
    if opened.exact is None:
        raise UsageError(f"{param('check_recall')}: {opened.label} keeps no exact vectors to compare with")
    exact = opened.exact()
    step = max(1, min(sample.size, 4096))
    hits = []
    for a, b in spans(sample.size, step):
        _, indices, _ = search_block(exact, rows.rows_of(sample[a:b]), norm, center, constant, top_k, row_term)
        hits.append(augmented.recall(kept[a:b], indices))
    per_row = np.concatenate(hits)
    return {"recall_at": top_k, "recall": float(per_row.mean()), "min": float(per_row.min()),
            "queries": int(sample.size), "share": float(sample.size / max(rows.rows, 1)),
            "approximate": bool(opened.searcher.approximate)}
