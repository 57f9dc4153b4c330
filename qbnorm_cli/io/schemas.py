"""The declared layout of every qbnorm file kind (`SCHEMAS`), checked when a file is opened
(`check`; how a schema is checked: io/fileschema.py).

Each kind's schema lists its attributes and datasets (io/fileschema's `Attr`, `Data`) and the
relations no single field shows: the parameters recorded in `params` against the shapes, the
gallery recorded in `inputs` against `gallery_rows`.
"""

from __future__ import annotations

from dataclasses import replace

import h5py
import numpy as np

from qbnorm_cli import methods
from qbnorm_cli.core import probestats
from qbnorm_cli.core.scale import SCALE_TEXT
from qbnorm_cli.errors import DataError
from qbnorm_cli.io import fileschema
from qbnorm_cli.io.fileschema import (
    ANY_FLOATS,
    ANY_INTS,
    BOOL,
    INTS,
    Attr,
    Damaged,
    Data,
    FileSchema,
    Layout,
    attr_value,
    element,
    first_index,
)
from qbnorm_cli.io.hdf5 import shown

SIMILARITY_RECORDS = ("cosine", "dot", "precomputed")  # how a probe's bank was scored
SCORE_STATS = tuple(Attr(f"{prefix}score_{part}", "number") for prefix in ("", "gallery_")
                    for part in ("min", "max", "mean", "std"))


def check(h5: h5py.File, kind: str, path: str | None = None) -> Layout:
    """Check an open qbnorm file of `kind` against its schema; returns what was found (Layout)."""
    return fileschema.check(h5, SCHEMAS[kind], path)


# --- relations -----------------------------------------------------------------------------------

def _same_numbers(a, b) -> bool:
    try:
        x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        return False
    return x.shape == y.shape and bool(np.allclose(np.sort(x), np.sort(y), rtol=1e-12, atol=0))


def _params_agree(layout: Layout, key: str, dataset: str, attr: str) -> None:
    """params[key] (a list of numbers) and a dataset attribute hold the same values."""
    recorded = layout.params.get(key)
    have = layout.data_attrs.get(dataset, {}).get(attr)
    if recorded is None or have is None:
        return
    if not isinstance(recorded, list) or not _same_numbers(recorded, have):
        raise Damaged(dataset, f"attribute {attr} {shown(have)} but params {key} is {shown(recorded)}")


def _probe_relations(layout: Layout) -> None:
    for name in ("/log_norm", "/topk_mean", "/topk_kth", "/topk_distance", "/gallery_log_norm"):
        _params_agree(layout, methods.picking(name).params_key, name, probestats.BY_NAME[name].key)
    k = layout.params.get("k")
    for name in ("/activation_count", "/gallery_activation_count"):
        count_k = layout.data_attrs.get(name, {}).get("k")
        if k is not None and count_k is not None and k != count_k:
            raise Damaged(name, f"attribute k {count_k} but params k is {shown(k)}")
    count_k = layout.data_attrs.get("/activation_count", {}).get("k")
    kmax = layout.dims.get("kmax")
    recorded = layout.params.get("kmax")
    if recorded is not None and (not isinstance(recorded, int) or min(recorded, layout.dims["G"]) != kmax):
        raise Damaged("/bank_neighbors", f"{kmax} neighbours per bank row but params kmax is {shown(recorded)} "
                                         f"(for a gallery of {layout.dims['G']})")
    if count_k is not None and kmax is not None and count_k > kmax:
        raise Damaged("/activation_count", f"attribute k {count_k} exceeds the {kmax} neighbours kept per bank row")
    recorded = layout.params.get("similarity")
    if recorded is not None and recorded != layout.attrs.get("similarity"):
        raise Damaged(None, f"attribute similarity {layout.attrs.get('similarity')!r} but params similarity is "
                            f"{shown(recorded)}")
    keep = layout.params.get("keep_sorted")
    if isinstance(keep, bool) and keep != ("/sorted_bank_scores" in layout.data_attrs):
        raise Damaged("/sorted_bank_scores", "missing (params keep_sorted is true)" if keep else
                      "present, but params keep_sorted is false")


NOT_MATRICES = ("probe", "index-vectors")  # inputs recorded without a shape: a probe, an index export


def _recorded_shape(layout: Layout, position: int) -> tuple[int, int] | None:
    """The shape of the `position`-th input matrix a file records (probes and index exports left out)."""
    matrices = [i for i in layout.inputs if isinstance(i, dict) and i.get("kind") not in NOT_MATRICES]
    if position >= len(matrices):
        return None
    shape = matrices[position].get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) and not isinstance(n, bool)
                                                                for n in shape)):
        raise Damaged(None, f"attribute inputs: the shape of input {position} is {shown(shape)}, not two whole "
                            "numbers")
    return shape[0], shape[1]


def _scores_relations(layout: Layout) -> None:
    method = layout.params.get("method")
    if method is not None and "method" not in layout.attrs:
        raise Damaged(None, f"attribute method: missing (params method is {shown(method)})")
    if method is not None and method != layout.attrs["method"]:
        raise Damaged(None, f"attribute method {layout.attrs['method']!r} but params method is {shown(method)}")
    ranking = layout.schema.kind == "ranking"
    gallery, listed = layout.dims.get("G"), layout.dims.get("listed")
    if ranking and "top_k" in layout.params and layout.params["top_k"] != listed:
        raise Damaged("/neighbors", f"{listed} items per query but params top_k is {shown(layout.params['top_k'])}")
    if ranking and listed > gallery:
        raise Damaged(None, f"attribute gallery_rows {gallery} is smaller than the {listed} items listed per query")
    # the inputs it was made from: precomputed scores (queries × gallery), or queries and gallery embeddings
    if layout.params.get("similarity") == "precomputed" or "source_format" in layout.params:
        scores = _recorded_shape(layout, 0)
        made_from = None if scores is None else scores
    else:
        queries, items = _recorded_shape(layout, 0), _recorded_shape(layout, 1)
        made_from = None if queries is None or items is None else (queries[0], items[0])
    if made_from is None:
        return
    if "source_format" in layout.params and layout.params.get("transpose") is True:
        # convert --transpose records its source as stored: the source's columns are the rows
        made_from = made_from[::-1]
    if layout.dims.get("Q") != made_from[0]:
        raise Damaged("/scores", f"{layout.dims.get('Q')} rows but the queries it was made from "
                                 f"(attribute inputs) have {made_from[0]}")
    if gallery != made_from[1]:
        raise Damaged(None, f"attribute gallery_rows {gallery} but the gallery it was made from "
                            f"(attribute inputs) has {made_from[1]} items")


def _embeddings_relations(layout: Layout) -> None:
    source = _recorded_shape(layout, 0)
    if source is None:
        return
    rows, dim = layout.dims.get("N"), layout.dims.get("d")
    if source[1] != dim:
        raise Damaged("/embeddings", f"{dim} columns but the source it was made from (attribute inputs) has "
                                     f"{source[1]}")
    expected = layout.dims.get("S", source[0]) if layout.schema.kind == "bank" else rows
    if source[0] != expected:
        raise Damaged(None, f"the source it was made from has {source[0]} rows (attribute inputs) but "
                            f"{'params source_rows is' if layout.schema.kind == 'bank' else '/embeddings has'} "
                            f"{expected}")


def _evaluation_relations(layout: Layout) -> None:
    n = layout.dims.get("inputs")
    for name, value in (("metrics", layout.attrs.get("metrics")),
                        ("rows", layout.data_attrs.get("/ranks", {}).get("rows"))):
        if value is not None and len(value) != n:
            raise Damaged(None if name == "metrics" else "/ranks", f"attribute {name} lists {len(value)} inputs "
                                                                    f"but /ranks has {n}")
    valid = layout.attrs.get("valid_queries")
    ranks = layout.values.get("/ranks")
    if valid is not None and ranks is not None:  # NaN marks a masked query: the others are valid
        counts = (~np.isnan(ranks)).sum(axis=1)
        if (counts != valid).any():
            row = int(np.argmax(counts != valid))
            raise Damaged("/ranks", f"input {row} has {int(counts[row])} ranked queries but attribute valid_queries "
                                    f"is {valid}")
    if ranks is not None and (ranks < 0).any():
        where = element(layout.schema.data("/ranks"), layout, first_index(ranks < 0))
        raise Damaged("/ranks", f"a negative rank at {where}")


def _hubness_relations(layout: Layout) -> None:
    n = layout.dims.get("inputs")
    measures = layout.attrs.get("measures")
    for name, value in (("measures", measures), ("rows", layout.data_attrs.get("/k_occurrence", {}).get("rows"))):
        if value is not None and len(value) != n:
            raise Damaged(None if name == "measures" else "/k_occurrence",
                          f"attribute {name} lists {len(value)} inputs but /k_occurrence has {n}")
    counts, ks = layout.values.get("/k_occurrence"), layout.data_attrs.get("/k_occurrence", {}).get("ks")
    if measures is None or counts is None or ks is None:
        return
    for i, record in enumerate(measures):  # a query has at most k items in its top k (fewer: −1 slots)
        queries = record.get("queries") if isinstance(record, dict) else None
        if not isinstance(queries, int):
            raise Damaged(None, f"attribute measures: input {i} records no number of queries")
        for j, k in enumerate(ks):
            row = counts[i, j]
            total = int(np.where(row > 0, row, 0).sum())
            if row.max(initial=0) > queries or total > int(k) * queries:
                raise Damaged("/k_occurrence", f"input {i} at k={int(k)}: the counts (largest {int(row.max())}, sum "
                                               f"{total}) exceed what {queries} queries can give")


# --- the schemas ---------------------------------------------------------------------------------

def _declared(stat) -> Data:
    """A probe dataset from its declaration (core/probestats.py)."""
    attrs = ()
    if stat.key == "betas":
        attrs = (Attr("betas", "numbers", required=True, dim=stat.shape[0], positive=True),)
    elif stat.key == "ks":
        attrs = (Attr("ks", "ints", required=True, dim=stat.shape[0], low=1),)
    elif stat.key == "k":
        attrs = (Attr("k", "int", required=True, low=1),)
    return Data(stat.name, (stat.dtype,), stat.shape, attrs=attrs, required=stat.required, values=stat.values,
                bound=stat.bound, at_open=stat.at_open, rows=stat.rows, cols=stat.cols)


def _sinkhorn(name: str, dim: str, dual: bool) -> Data:
    """Sinkhorn potentials (io/probefile.py): log u per β, and how each β's iterations ended."""
    per_beta = (Attr("betas", "numbers", required=True, dim=dim, positive=True),
                Attr("iterations", "ints", required=True, dim=dim, low=0),
                Attr("change", "numbers", required=True, dim=dim, low=0),
                Attr("marginal_error", "numbers", required=True, dim=dim, low=0),
                Attr("converged", "ints", required=True, dim=dim, low=0))
    settings = (Attr("fixed_iters", "int", low=0), Attr("tol", "number", low=0), Attr("max_iters", "int", low=0),
                Attr("scores_held", "int", required=True, low=0))
    extra = (Attr("gallery_bank_rows", "int", low=0),) if dual else ()
    return Data(name, ("<f8",), (dim, "G"), attrs=per_beta + settings + extra, required=False, values="finite",
                rows="β", cols="item")


def _probe() -> FileSchema:
    return FileSchema(
        "probe", "probe again",
        attrs=(Attr("gallery_rows", "int", required=True, dim="G", positive=True),
               Attr("bank_rows", "int", required=True, dim="N", positive=True),
               Attr("gallery_bank_rows", "int", dim="Nh", low=0),
               Attr("similarity", "str", required=True, choices=SIMILARITY_RECORDS),
               Attr("gallery_identity", "str"),
               Attr("score_scale", "str", choices=tuple(SCALE_TEXT)),
               *SCORE_STATS),
        datasets=(
            *(_declared(stat) for stat in probestats.ALL),
            _sinkhorn("/sinkhorn_log_u", "n_sinkhorn", dual=False),
            _sinkhorn("/dual_sinkhorn_log_u", "n_dual_sinkhorn", dual=True),
        ),
        relations=(_probe_relations,),
        together=(("/gallery_log_norm", "/gallery_bank_neighbors", "/gallery_activation_count"),),
    )


def _scores(kind: str) -> FileSchema:
    ranking = kind == "ranking"
    width = "listed" if ranking else "G"
    cols = "position" if ranking else "item"
    datasets = [
        Data("/scores", ANY_FLOATS, ("Q", width), values="finite", at_open=False, rows="query", cols=cols),
        Data("/normalised", BOOL, ("Q",), required=False, cols="query"),
    ]
    if ranking:
        datasets.insert(0, Data("/neighbors", ANY_INTS, ("Q", "listed"), values="index-or-pad", bound="G",
                                at_open=False, rows="query", cols="position"))
    return FileSchema(
        kind, "normalise again" if ranking else "write it again (normalise or convert)",
        attrs=(Attr("gallery_rows", "int", required=True, dim="G", positive=True),
               Attr("method", "str", choices=tuple(methods.METHODS)),
               Attr("gallery_identity", "str"),
               Attr("score_scale", "str", choices=tuple(SCALE_TEXT)),
               Attr("score_domain", "str"),
               Attr("source_format", "str"),
               *SCORE_STATS[:4]),
        datasets=tuple(datasets),
        relations=(_scores_relations,),
    )


def _embeddings(kind: str) -> FileSchema:
    datasets = [Data("/embeddings", ("<f4",), ("N", "d"), values="finite", at_open=False, rows="row")]
    if kind == "bank":
        datasets.append(Data("/source_index", INTS, ("N",), values="index", bound="S", cols="bank row"))
    return FileSchema(
        kind, "build the bank again" if kind == "bank" else "convert again",
        attrs=(Attr("source_format", "str"),),
        datasets=tuple(datasets),
        params={"size": "N", "source_rows": "S"} if kind == "bank" else {},
        relations=(_embeddings_relations,),
    )


# --- index exports (io/indexfile.py): the recipe, and the HDF5 store -----------------------------

INDEX_RECIPE_FORMAT = "qbnorm-index-vectors"
INDEX_STORAGES = ("hdf5", "npy", "faiss", "lancedb")
INDEX_TYPES = ("flat", "hnsw", "ivf")
INDEX_REMEDY = "export again"
# The recipe `search` follows (api/serving.py writes it): every field it reads, with its type and
# range. A field null in the recipe counts as absent.
RECIPE = (
    Attr("format", "str", required=True, choices=(INDEX_RECIPE_FORMAT,)),
    Attr("format_version", "int", required=True, low=1),
    Attr("storage", "str", required=True, choices=INDEX_STORAGES),
    Attr("method", "str", required=True,
         choices=tuple(name for name, m in methods.METHODS.items() if not m.needs.sorted_bank)),
    Attr("similarity", "str", required=True, choices=("cosine", "dot")),
    Attr("normalise_queries", "bool"),
    Attr("dim", "int", required=True, positive=True),
    Attr("gallery_rows", "int", required=True, positive=True),
    Attr("scale", "number", required=True, positive=True),
    Attr("center", "number", required=True),
    Attr("constant", "number", required=True, positive=True),
    Attr("raw_constant", "number"),
    Attr("gated", "bool", required=True),
    Attr("gate_share", "number", low=0),
    Attr("baseline", "bool"),
    Attr("row_topk", "int", low=0),
    Attr("metric", "str", choices=("inner_product",)),
    Attr("uuid", "str", required=True),
    Attr("fingerprint", "str"),
    Attr("gallery_identity", "str"),
    Attr("probe_uuid", "str"),
    Attr("score_domain", "str"),
    Attr("query_recipe", "str"),
    Attr("created_by", "str"),
    Attr("created_at", "str"),
    Attr("params", "object"),
    Attr("files", "object"),
    Attr("index", "object"),
    Attr("extra_column", "object"),
)
INDEX_PARAMETERS = (  # recipe["index"]: the faiss index built
    Attr("type", "str", required=True, choices=INDEX_TYPES),
    Attr("M", "int", positive=True), Attr("ef_construction", "int", positive=True),
    Attr("ef_search", "int", positive=True), Attr("nlist", "int", positive=True), Attr("nprobe", "int", positive=True),
)
# the recipe's fields an HDF5 export also holds as attributes (h5dump shows them): the same values
RECIPE_ATTRS = ("method", "similarity", "scale", "center", "constant", "dim", "gallery_rows", "gated",
                "baseline", "row_topk", "gallery_identity", "query_recipe")


def _recipe_fields(recipe: dict, decls: tuple[Attr, ...], prefix: str) -> dict:
    out = {}
    for attr in decls:
        value = recipe.get(attr.name)
        if value is None:
            if attr.required:
                raise Damaged(None, f"{prefix}{attr.name}: missing")
            continue
        try:
            out[attr.name] = attr_value(attr, value, None)
        except Damaged as exc:
            raise Damaged(None, f"{prefix}{exc.problem.removeprefix('attribute ')}") from None
    return out


def recipe_problems(recipe) -> None:
    """An index export's recipe checked against `RECIPE` (types, finite ranges, choices): raises
    Damaged naming the field."""
    if not isinstance(recipe, dict):
        raise Damaged(None, f"the recipe is {shown(recipe)}, not a JSON object")
    fields = _recipe_fields(recipe, RECIPE, "recipe field ")
    index = fields.get("index")
    if index is not None:
        _recipe_fields(index, INDEX_PARAMETERS, "recipe field index.")
    if fields["storage"] != "faiss" and index is not None:
        raise Damaged(None, f"recipe field index: a {fields['storage']} export has no faiss index")
    if fields.get("baseline") and fields["gated"]:
        raise Damaged(None, "recipe fields baseline and gated are both true (the baseline normalises nothing)")


def check_recipe(recipe, label: str) -> dict:
    """`recipe_problems` as a DataError naming `label` (recipe.json, or the HDF5 export)."""
    try:
        recipe_problems(recipe)
    except Damaged as exc:
        raise DataError(f"{label}: {exc.problem}; the export is damaged: {INDEX_REMEDY}") from None
    return recipe


def _index_relations(layout: Layout) -> None:
    recipe = layout.attrs["recipe"]
    recipe_problems(recipe)
    if recipe["storage"] != "hdf5":
        raise Damaged(None, f"recipe field storage: {recipe['storage']!r} in an HDF5 export")
    for name in RECIPE_ATTRS:
        if name in layout.attrs and layout.attrs[name] != recipe.get(name):
            raise Damaged(None, f"attribute {name} {shown(layout.attrs[name])} but the recipe says "
                                f"{shown(recipe.get(name))}")
    if "uuid" in layout.attrs and recipe["uuid"] != layout.attrs["uuid"]:
        raise Damaged(None, f"attribute uuid {shown(layout.attrs['uuid'])} but the recipe says {shown(recipe['uuid'])}")
    if layout.dims["G"] != recipe["gallery_rows"]:
        raise Damaged("/vectors", f"{layout.dims['G']} rows but the recipe says gallery_rows {recipe['gallery_rows']}")
    if layout.dims["width"] != recipe["dim"] + 1:
        raise Damaged("/vectors", f"{layout.dims['width']} columns but the recipe says dim {recipe['dim']} (+1)")
    if recipe["gated"] != ("/gate" in layout.data_attrs):
        raise Damaged("/gate", "missing (the recipe says the method is gated)" if recipe["gated"] else
                      "present, but the recipe says the method is not gated")


def _index_vectors() -> FileSchema:
    recipe_attrs = tuple(replace(a, required=False, dim="G" if a.name == "gallery_rows" else None)
                         for a in RECIPE if a.name in RECIPE_ATTRS)
    return FileSchema(
        "index-vectors", INDEX_REMEDY,
        attrs=(Attr("recipe", "json-object", required=True), *recipe_attrs),
        datasets=(Data("/vectors", ("<f4",), ("G", "width"), values="finite", at_open=False, rows="item"),
                  Data("/gate", BOOL, ("G",), required=False, cols="item")),
        relations=(_index_relations,),
        checksummed=True,  # index exports were written with attribute checksums from their first release
    )


# --- hubs: the hub audit (api/hubs.py) -----------------------------------------------------------

def _hubs_relations(layout: Layout) -> None:
    """One record per input; each input's N_k within what its queries can give; the flagged items
    those whose score is above the recorded threshold."""
    n = layout.dims.get("inputs")
    records, names = layout.attrs.get("hubs"), layout.data_attrs.get("/hub_score", {}).get("rows")
    for name, value in (("hubs", records), ("rows", names)):
        if value is not None and len(value) != n:
            raise Damaged(None if name == "hubs" else "/hub_score", f"attribute {name} lists {len(value)} inputs "
                                                                     f"but /hub_score has {n}")
    scores, counts = layout.values.get("/hub_score"), layout.values.get("/n_k")
    k, threshold = layout.attrs.get("k"), layout.attrs.get("threshold")
    if records is None or scores is None or counts is None:
        return
    for i, record in enumerate(records):
        queries = record.get("queries") if isinstance(record, dict) else None
        flagged = record.get("flagged") if isinstance(record, dict) else None
        if not isinstance(queries, int) or not isinstance(flagged, list):
            raise Damaged(None, f"attribute hubs: input {i} records no number of queries or flagged items")
        row = counts[i]
        if row.max(initial=0) > queries or (k is not None and int(row.sum()) > k * queries):
            raise Damaged("/n_k", f"input {i}: the counts (largest {int(row.max(initial=0))}, sum {int(row.sum())}) "
                                  f"exceed what {queries} queries can give")
        if threshold is not None:
            above = np.flatnonzero(scores[i] > threshold)
            if sorted(v for v in flagged if isinstance(v, int)) != above.tolist() or len(flagged) != above.size:
                raise Damaged("/hub_score", f"input {i}: attribute hubs flags {len(flagged)} items but {above.size} "
                                            f"score above the threshold {threshold:g}")


HUBS = FileSchema(
    "hubs", "audit the hubs again",
    attrs=(Attr("hubs", "json-list"), Attr("threshold", "number"), Attr("k", "int", low=1)),
    datasets=(Data("/hub_score", ("<f8",), ("inputs", "G"),
                   attrs=(Attr("rows", "json-strings"), Attr("description", "str")),
                   values="finite", rows="input", cols="item"),
              Data("/n_k", INTS, ("inputs", "G"), attrs=(Attr("description", "str"),),
                   values="count", rows="input", cols="item")),
    relations=(_hubs_relations,),
)


SCHEMAS: dict[str, FileSchema] = {
    "probe": _probe(),
    "similarity": _scores("similarity"),
    "ranking": _scores("ranking"),
    "embeddings": _embeddings("embeddings"),
    "bank": _embeddings("bank"),
    "evaluation": FileSchema(
        "evaluation", "evaluate again",
        attrs=(Attr("protocol", "str"), Attr("metrics", "json-list"), Attr("valid_queries", "int", low=0),
               Attr("difference", "json-object")),
        datasets=(Data("/ranks", ("<f8",), ("inputs", "Q"),
                       attrs=(Attr("rows", "json-strings"), Attr("description", "str")),
                       values="ranks", rows="input", cols="query"),
                  Data("/censored", BOOL, ("inputs", "Q"))),
        relations=(_evaluation_relations,),
    ),
    "hubness": FileSchema(
        "hubness", "measure hubness again",
        attrs=(Attr("measures", "json-list"),),
        datasets=(Data("/k_occurrence", INTS, ("inputs", "n_ks", "width"),
                       attrs=(Attr("ks", "ints", required=True, dim="n_ks", low=1), Attr("rows", "json-strings"),
                              Attr("description", "str")),
                       values="occurrences", rows="input", cols="k"),),
        relations=(_hubness_relations,),
    ),
    "index-vectors": _index_vectors(),
    "hubs": HUBS,
}
KINDS = tuple(SCHEMAS)
