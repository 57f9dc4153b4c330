"""`hubs`: which gallery items are hubs, by how much, and under which input (a hub audit).

Each input is a view of the gallery: a probe (the bank's view, which needs no test queries) or a
score or ranking file (the test queries' view). Per item: N_k under each input (the k-occurrences
`hubness` counts, streamed the same way and on a cluster the same way), a hub score
(core/hubscore.py: the robust z of the bank's log-normaliser for a probe, of log(1 + N_k) for a
query view), the share of queries it captures, its place among the items, and that place under
the raw input beside a normalised one.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from os import PathLike

import numpy as np

from qbnorm_cli import methods as registry
from qbnorm_cli.api.common import bounded, warn
from qbnorm_cli.api.evaluation import DEFAULT_K, hubness_report
from qbnorm_cli.core import hubscore
from qbnorm_cli.errors import DataError, QbnormWarning, UsageError, param
from qbnorm_cli.io.atomic import OutputFile
from qbnorm_cli.io.labels import read_labels
from qbnorm_cli.io.probefile import Probe
from qbnorm_cli.io.scorefiles import open_scores
from qbnorm_cli.streaming.budget import DEFAULT_MEMORY

DEFAULT_ITEMS = 20
ARRAYS = ("hub_score", "n_k", "share", "rank")  # per item, in each input's record


def _check(k: int, items: int, threshold: float) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise UsageError(f"{param('k')} {k}: one neighbourhood size, at least 1")
    if isinstance(items, bool) or not isinstance(items, (int, np.integer)) or items < 1:
        raise UsageError(f"{param('items')} {items}: must be at least 1")
    if not isinstance(threshold, (int, float, np.floating)) or not math.isfinite(threshold):
        raise UsageError(f"{param('threshold')} {threshold}: must be a finite number")


def _view(value, measured: dict, nk: np.ndarray, beta: float | None) -> dict:
    """One input's per-item scores: what the hub score is of, the input's method and records."""
    if measured["kind"] == "probe":
        probe = value if isinstance(value, Probe) else Probe.load(value)
        try:
            chosen = probe.default_beta() if beta is None else float(beta)
            return {"basis": f"log-normaliser LSE_b(β·P[b, j]) at β={chosen:g}", "beta": chosen, "method": None,
                    "hub_score": hubscore.bank_scores(probe.log_norm(chosen)),
                    "records": [{"path": probe.path, "dataset": None, "kind": "probe", "uuid": probe.uuid}]}
        finally:
            if probe is not value:
                probe.close()
    source = open_scores(value, measured["input"])
    try:
        method = source.scores.attrs.get("method")
        records = [i.describe() for i in source.inputs]
    finally:
        if isinstance(value, (str, PathLike)):  # opened here: closed here
            for opened in source.inputs:
                opened.close()
    return {"basis": "log(1 + N_k)", "beta": None, "method": None if method is None else str(method),
            "hub_score": hubscore.occurrence_scores(nk), "records": records}


def _reference(views: list[dict]) -> int | None:
    """The raw view the others are compared with: the first score input recorded as raw (method
    none), else the first score input; None with fewer than two inputs or no score input."""
    if len(views) < 2:
        return None
    scored = [i for i, v in enumerate(views) if v["kind"] != "probe"]
    raw = [i for i in scored if views[i]["method"] == registry.BASELINE.name]
    return (raw or scored or [None])[0]


def _items(view: dict, views: list[dict], reference: int | None, me: int, n: int) -> list[dict]:
    shown = hubscore.order(view["hub_score"])[:max(n, len(view["flagged"]))]
    out = []
    for j in shown.tolist():
        record = {"index": j, "hub_score": float(view["hub_score"][j]), "n_k": int(view["n_k"][j]),
                  "share": float(view["share"][j]), "rank": int(view["rank"][j])}
        if len(views) > 1:
            record["n_k_by_input"] = {v["name"]: int(v["n_k"][j]) for v in views}
        if reference is not None and reference != me:
            before = int(views[reference]["rank"][j])
            record["reference_rank"] = before
            record["rank_change"] = record["rank"] - before
        out.append(record)
    return out


@bounded
def hubs(inputs, *, k: int = DEFAULT_K, items: int = DEFAULT_ITEMS, labels=None,
         threshold: float = hubscore.DEFAULT_THRESHOLD, beta: float | None = None, memory=DEFAULT_MEMORY,
         block_rows: int | None = None, progress=None, cluster=None) -> dict:
    """A hub audit of one gallery from one or more views of it.

    inputs: a `Probe` or probe file (the bank's view: its bank queries' top items and its
    log-normalisers), a (Q, G) score array, a `Ranking`, a similarity or ranking file; or a list
    of them (one gallery). k: the neighbourhood of N_k. items: how many of the highest-scoring
    items each input lists (at least; every flagged item is listed). labels: a
    `PATH::/dataset` of strings (or a text file, one line per item) whose text is shown per item.
    threshold: items scoring above it are flagged (core/hubscore.py: DEFAULT_THRESHOLD).
    beta: the probe's β whose log-normaliser scores the bank's view (default: its only β, or 20).
    The N_k are counted as `hubness` counts them, streamed under `memory`, the score inputs on
    `cluster` when given (a probe's stored neighbours are read here: no scores to compute).

    Returns {"k", "threshold", "reference", "inputs": [{"name", "kind", "basis", "queries",
    "items": [{"index", "hub_score", "n_k", "share", "rank", …}], "flagged": [indices],
    "hub_score", "n_k", "share", "rank": (G,) arrays}, …]} (docs/api.md).
    """
    _check(k, items, threshold)
    values = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if not values:
        raise UsageError(f"{param('inputs')}: give at least one input")
    measured = hubness_report(values, k=[int(k)], memory=memory, block_rows=block_rows, progress=progress,
                              cluster=cluster)
    occurrences = measured.pop("occurrences")
    sizes = {r["gallery_rows"] for r in measured["inputs"]}
    if len(sizes) > 1:
        listing = ", ".join(f"{r['name']}: {r['gallery_rows']}" for r in measured["inputs"])
        raise DataError(f"the inputs are views of different galleries ({listing} items); audit one gallery at a time")
    views = []
    for i, (value, result, counts) in enumerate(zip(values, measured["inputs"], occurrences, strict=True)):
        nk = counts[int(k)]
        named = isinstance(value, (str, PathLike)) or (isinstance(value, Probe) and value.path is not None)
        view = {"name": result["name"] if named else f"inputs[{i}]", "input": result["input"], "kind": result["kind"],
                "queries": result["queries"], "gallery_rows": result["gallery_rows"],
                **_view(value, result, nk, beta)}
        view["n_k"] = nk
        view["share"] = nk / max(result["queries"], 1)
        view["rank"] = hubscore.positions(view["hub_score"])
        view["flagged"] = hubscore.flagged(view["hub_score"], threshold).tolist()
        view["mean_n_k"] = float(nk.mean()) if nk.size else 0.0
        if view["kind"] != "probe" and view["mean_n_k"] < hubscore.SPARSE_MEAN_NK:
            warn(f"{view['name']}: {view['mean_n_k']:.2f} occurrences per item at k={k} (fewer than "
                 f"{hubscore.SPARSE_MEAN_NK:g}): its hub scores are mostly counting noise; use a larger "
                 f"{param('k')} or more queries")
        views.append(view)
    reference = _reference(views)
    for i, view in enumerate(views):
        view["items"] = _items(view, views, reference, i, int(items))
    if labels is not None:
        wanted = sorted({item["index"] for view in views for item in view["items"]})
        text = dict(zip(wanted, read_labels(labels, np.asarray(wanted, dtype=np.int64), views[0]["gallery_rows"]),
                        strict=True))
        for view in views:
            for item in view["items"]:
                item["label"] = text[item["index"]]
    document = {"k": int(k), "threshold": float(threshold), "labels": None if labels is None else str(labels),
                "reference": None if reference is None else views[reference]["name"],
                "gallery_rows": views[0]["gallery_rows"], "inputs": views}
    if "cluster" in measured:
        document["cluster"] = measured["cluster"]
    return document


@bounded
def hubs_report(inputs: Sequence, *, k: int = DEFAULT_K, items: int = DEFAULT_ITEMS, labels=None,
                threshold: float = hubscore.DEFAULT_THRESHOLD, beta: float | None = None, memory=DEFAULT_MEMORY,
                block_rows: int | None = None, output=None, force: bool = False, progress=None,
                provenance: str | None = None, cluster=None) -> dict:
    """`hubs` as the CLI reports it: the per-item arrays left out of the document, and with
    `output` written to a file of kind hubs (/hub_score and /n_k, inputs × gallery)."""
    _check(k, items, threshold)
    params = {"k": int(k), "items": int(items), "labels": None if labels is None else str(labels),
              "threshold": float(threshold), "beta": beta, "memory": memory, "block_rows": block_rows}
    out = OutputFile(str(output), "hubs", force=force, params=params, provenance=provenance) \
        if output is not None else None
    with warnings.catch_warnings(record=True) as caught:  # recorded in the output, then passed on
        warnings.simplefilter("always", QbnormWarning)
        document = hubs(inputs, k=k, items=items, labels=labels, threshold=threshold, beta=beta, memory=memory,
                        block_rows=block_rows, progress=progress, cluster=cluster)
    for item in caught:
        warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
    views = document["inputs"]
    arrays = [{name: view.pop(name) for name in ARRAYS} for view in views]
    records = [r for view in views for r in view.pop("records")]
    if out is not None:
        out.inputs = records
        names = [view["name"] for view in views]
        with out:
            ds = out.create("/hub_score", data=np.stack([a["hub_score"] for a in arrays]))
            ds.attrs["rows"] = json.dumps(names)
            ds.attrs["description"] = "hub score per input × gallery item (core/hubscore.py; basis per input in hubs)"
            counts = np.stack([a["n_k"] for a in arrays])
            ds = out.create("/n_k", data=counts.astype(np.int32 if counts.max(initial=0) < 2**31 else np.int64))
            ds.attrs["description"] = f"N_k at k={int(k)} per input × gallery item"
            out.h5.attrs["hubs"] = json.dumps([{key: value for key, value in view.items()} for view in views])
            out.h5.attrs["threshold"] = float(threshold)
            out.h5.attrs["k"] = int(k)
            out.warnings = [str(item.message) for item in caught if isinstance(item.message, QbnormWarning)]
        document["output"] = str(output)
        document["uuid"] = out.uuid
    return document
