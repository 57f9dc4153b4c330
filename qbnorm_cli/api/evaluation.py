"""`evaluate` and `hubness`: figures of score or ranking inputs, and the reports the CLI prints."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qbnorm_cli import methods as registry
from qbnorm_cli.api.common import clustered, progress_or_none, warn
from qbnorm_cli.core import hubness as hub
from qbnorm_cli.core import metrics
from qbnorm_cli.errors import DataError, UsageError, param
from qbnorm_cli.io.atomic import OutputFile
from qbnorm_cli.io.groundtruth import ground_truth, query_mask
from qbnorm_cli.io.hdf5 import check_readable, open_h5, read_attrs
from qbnorm_cli.io.probefile import Probe
from qbnorm_cli.io.scorefiles import ScoreFile, open_scores
from qbnorm_cli.io.specs import split_spec
from qbnorm_cli.streaming import cluster as clustering
from qbnorm_cli.streaming import evaluation
from qbnorm_cli.streaming.budget import DEFAULT_MEMORY, Budget, make_budget, spans

DEFAULT_K = 10


def _many(value) -> bool:
    return isinstance(value, (list, tuple))


def display_names(labels: list[tuple[str | None, str | None]], fallback: str = "input") -> list[str]:
    """Names for inputs from (path, dataset or None): the file stem, made unique when needed."""
    names = [Path(path).stem if path else fallback for path, _ in labels]
    for i, name in enumerate(names):
        if names.count(name) > 1 and labels[i][1]:
            names[i] = f"{name}::{labels[i][1]}"
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if names.count(name) > 1:
            seen[name] = seen.get(name, 0) + 1
            names[i] = f"{name}#{seen[name]}"
    return names


# --- evaluate ------------------------------------------------------------------------------------

def _evaluated(sources: list[ScoreFile], gt, queries_per_item, mask_value, budget: Budget, progress, session=None):
    n_queries = sources[0].rows
    for s in sources[1:]:
        if s.rows != n_queries:
            raise DataError(f"{s.label} has {s.rows} queries but {sources[0].label} has {n_queries}")
    relevant, gt_in = ground_truth(gt, queries_per_item, n_queries, [(s.label, s.n_gallery) for s in sources],
                                   sources[0].label)
    mask, mask_in = query_mask(mask_value, n_queries)
    empty = mask & ~(relevant >= 0).any(axis=1)
    if empty.any():
        row = int(np.argmax(empty))
        raise DataError(f"{gt_in.label if gt_in else 'ground truth'}: query {row} has no relevant item "
                        f"(all −1); drop it with {param('query_mask')}")
    n_valid = int(mask.sum())
    results = []
    with progress_or_none(progress)("evaluate", len(sources) * n_queries, unit="queries") as advance:
        for source in sources:
            if session is None:
                rank, censored = evaluation.ranks(source, relevant, budget, advance)
            else:
                rank, censored = clustering.ranks(session, source, relevant, budget, advance)
            summary = metrics.summarise(rank[mask], censored[mask])
            results.append({
                "input": source.label, "kind": "ranking" if source.is_ranking else "similarity",
                "gallery_rows": source.n_gallery, "listed": source.listed, "queries": n_valid,
                "censored_queries": int((censored & mask).sum()), **summary,
                "ranks": np.where(mask, rank, np.nan), "censored": censored & mask,
            })
    return results, mask, [i for i in (gt_in, mask_in) if i is not None]


def evaluate(scores, gt=None, *, queries_per_item: int | None = None, query_mask=None, memory=DEFAULT_MEMORY,
             block_rows: int | None = None, progress=None, cluster=None):
    """Recall@K, median and mean rank and GeomR of dense scores (rows = queries) or a ranking.

    scores: a (Q, G) array, a `Ranking`, or a similarity or ranking file (`PATH[::/dataset]`); or a
    list of them (evaluated against one ground truth). gt: (Q,) relevant gallery indices, or
    (Q, m) with −1 padding (an array or a file); or queries_per_item N: query i ↔ item i // N.
    query_mask: (Q,) booleans, False drops a query. cluster: rank the queries on a dask cluster
    (docs/distributed.md; the same ranks).

    Ranks follow the collaborative-experts / QB-Norm protocol (core/metrics.py, ties averaged).
    From a ranking only the top N is known: figures that need ranks beyond it are None, never
    estimated (`exact` and `bounds` say which). Returns a dict {"metrics": {"R@1": …}, "exact",
    "bounds", "queries", "ranks", …} per input (a list for a list).
    """
    budget = make_budget(memory, block_rows)
    values = list(scores) if _many(scores) else [scores]
    if not values:
        raise UsageError(f"{param('scores')}: give at least one input")
    sources = [open_scores(v, f"scores[{i}]" if _many(scores) else "scores") for i, v in enumerate(values)]
    with clustered(cluster) as session:
        results, _, _ = _evaluated(sources, gt, queries_per_item, query_mask, budget, progress, session)
    for record in results:
        record["protocol"] = metrics.PROTOCOL
    return results if _many(scores) else results[0]


def evaluation_report(scores: Sequence, gt=None, *, queries_per_item: int | None = None, query_mask=None,
                      gates: Sequence[tuple[str, float]] = (), memory=DEFAULT_MEMORY, block_rows: int | None = None,
                      output=None, force: bool = False, progress=None, provenance: str | None = None,
                      described: dict | None = None, cluster=None) -> dict:
    """`evaluate` of several inputs as one document: each input's figures under its display name,
    the difference last − first, the quality gates (metric, threshold) checked, and with `output`
    the per-query ranks written to an evaluation file. `described` holds how the ground truth and
    mask were given (recorded as such). With `cluster`, document["cluster"] reports the run."""
    budget = make_budget(memory, block_rows)
    sources = [open_scores(v, f"scores[{i}]") for i, v in enumerate(scores)]
    names = display_names([(s.scores.path, None if s.is_ranking else s.scores.dataset) for s in sources])
    described = described or {}
    params = {"gt": described.get("gt"), "queries_per_item": queries_per_item,
              "query_mask": described.get("query_mask"), "fail_under": [f"{m}={t:g}" for m, t in gates],
              "memory": budget.memory, "block_rows": block_rows}
    out = None
    if output is not None:
        records = [i for s in sources for i in s.inputs]
        out = OutputFile(str(output), "evaluation", force=force, params=params, inputs=records, provenance=provenance)
    with clustered(cluster) as session:
        results, mask, extra_inputs = _evaluated(sources, gt, queries_per_item, query_mask, budget, progress, session)
    if out is not None:
        out.inputs += [i.describe() for i in extra_inputs]
    n_queries = len(mask)
    all_ranks = np.stack([r.pop("ranks") for r in results])
    all_censored = np.stack([r.pop("censored") for r in results])
    results = [{"name": name, **r} for name, r in zip(names, results, strict=True)]
    difference = metrics.difference(results[0]["metrics"], results[-1]["metrics"]) if len(results) >= 2 else None
    checks, failures = metrics.check_gates(results, gates)
    document = {
        "protocol": metrics.PROTOCOL, "queries": n_queries, "valid_queries": int(mask.sum()),
        "ground_truth": described.get("gt") or f"contiguous, {queries_per_item} queries per item",
        "query_mask": described.get("query_mask"), "inputs": results,
    }
    if difference is not None:
        document["difference"] = {"of": f"{names[-1]} − {names[0]}", "metrics": difference}
    if session is not None:
        document["cluster"] = session.report()
    if gates:
        document["gates"] = checks
        document["passed"] = not failures
        document["failures"] = failures
    if out is not None:
        with out:
            ds = out.create("/ranks", data=all_ranks)
            ds.attrs["rows"] = json.dumps(names)
            ds.attrs["description"] = ("0-based tie-averaged rank per input × query; NaN = masked; where "
                                       "/censored is true only a lower bound is known (ranking inputs)")
            out.create("/censored", data=all_censored)
            out.h5.attrs["protocol"] = metrics.PROTOCOL
            out.h5.attrs["metrics"] = json.dumps(results)
            out.h5.attrs["valid_queries"] = int(mask.sum())
            if difference is not None:
                out.h5.attrs["difference"] = json.dumps(difference)
        document["output"] = str(output)
        document["uuid"] = out.uuid
    return document


# --- hubness -------------------------------------------------------------------------------------

class _ProbeSubject:
    """A probe as a hubness input: its bank queries' top items (the bank-side view)."""

    def __init__(self, probe: Probe, name: str):
        self.probe, self.name = probe, name
        self.neighbors = probe.datasets["/bank_neighbors"] if "/bank_neighbors" in probe.datasets else None
        if self.neighbors is None:
            raise DataError(f"{probe.label}: the probe has no /bank_neighbors")
        self.n_queries, self.n_gallery = self.neighbors.shape[0], probe.n_gallery
        self.label, self.kind = probe.label, "probe"

    def check(self, kmax: int, exclude_self: bool) -> None:
        if exclude_self:
            raise UsageError(f"{param('exclude_self=True')}: {self.label} is a probe (bank × gallery); "
                             "the bank is not the gallery")
        width = self.neighbors.shape[1]
        if kmax > width:
            raise UsageError(f"{param('k')} {kmax}: {self.label} keeps the top {width} items per bank query (kmax); "
                             f"probe again with {param('k')} {kmax}")

    def top(self, kmax: int, exclude_self: bool, budget: Budget, advance, session=None) -> np.ndarray:
        q = self.n_queries
        out = np.empty((q, kmax), dtype=np.int64)
        step = budget.rows(self.neighbors.shape[1] * 16, share=0.5, total=q)
        for r0, r1 in spans(q, step):
            out[r0:r1] = np.asarray(self.neighbors[r0:r1, :kmax])
            advance(r1 - r0)
        if out.min() < 0 or out.max() >= self.n_gallery:
            raise DataError(f"{self.label}: bank neighbour indices outside the gallery of {self.n_gallery}")
        return out


class _ScoreSubject:
    """Dense or ranking scores as a hubness input."""

    def __init__(self, source: ScoreFile, name: str):
        if source.n_gallery is None:
            raise DataError(f"{source.label}: a ranking file without a gallery_rows attribute; the anti-hub "
                            "measures need the gallery size (set the root attribute gallery_rows)")
        self.source, self.name = source, name
        self.n_queries, self.n_gallery = source.rows, source.n_gallery
        self.label, self.kind = source.label, "ranking" if source.is_ranking else "similarity"

    def check(self, kmax: int, exclude_self: bool) -> None:
        if exclude_self and self.n_queries != self.n_gallery:
            raise UsageError(f"{param('exclude_self=True')} needs a square gallery × gallery matrix; {self.label} is "
                             f"{self.n_queries} × {self.n_gallery}")
        if self.source.is_ranking:
            listed = self.source.listed
            usable = listed - 1 if exclude_self else listed
            if kmax > usable:
                extra = " (one of which may be the query itself)" if exclude_self else ""
                raise UsageError(f"{param('k')} {kmax}: {self.label} lists N = {listed} items per query{extra}; "
                                 f"use {param('k')} ≤ {usable}")
        else:
            limit = self.n_gallery - 1 if exclude_self else self.n_gallery
            if kmax > limit:
                raise UsageError(f"{param('k')} {kmax}: larger than the {limit} candidate items of {self.label}")

    def top(self, kmax: int, exclude_self: bool, budget: Budget, advance, session=None) -> np.ndarray:
        if session is not None:
            return clustering.neighbours(session, self.source, kmax, exclude_self, budget, advance)
        return evaluation.neighbours(self.source, kmax, exclude_self, budget, advance)


def _is_probe_file(spec) -> bool:
    if not isinstance(spec, (str, Path)):
        return False
    path, dataset = split_spec(str(spec))
    if dataset is not None or path.endswith(".npy"):
        return False
    try:
        if check_readable(path)[:6] == b"\x93NUMPY":
            return False
    except (OSError, UsageError):
        return False  # opening it as scores names the problem
    h5 = open_h5(path)
    try:
        return read_attrs(h5).get("qbnorm_kind") == "probe"
    finally:
        h5.close()


def _subject(value, name: str):
    if isinstance(value, Probe):
        return _ProbeSubject(value, name)
    if _is_probe_file(value):
        return _ProbeSubject(Probe.load(value), name)
    return _ScoreSubject(open_scores(value, name), name)


def _ks(k) -> list[int]:
    ks = sorted({int(v) for v in np.atleast_1d(DEFAULT_K if k is None else k)})
    for value in ks:
        if value < 1:
            raise UsageError(f"{param('k')} {value}: must be at least 1")
    return ks


def _measured(subjects, ks: list[int], exclude_self: bool, budget: Budget, progress, session=None) -> list[dict]:
    for subject in subjects:
        subject.check(max(ks), exclude_self)
    results = []
    total = sum(s.n_queries for s in subjects)
    with progress_or_none(progress)("hubness", total, unit="queries") as advance:
        for subject in subjects:
            neigh = subject.top(max(ks), exclude_self, budget, advance, session)
            per_k, counts = [], {}
            for value in ks:
                nk = hub.k_occurrence(neigh, value, subject.n_gallery)
                counts[value] = nk
                row = hub.measures(nk, value, subject.n_queries)
                row["coverage_pct"] = hub.coverage(nk)
                per_k.append(row)
            results.append({"input": subject.label, "kind": subject.kind, "queries": subject.n_queries,
                            "gallery_rows": subject.n_gallery, "by_k": per_k, "k_occurrence": counts})
    return results


def hubness(scores, *, k=DEFAULT_K, exclude_self: bool = False, memory=DEFAULT_MEMORY, block_rows: int | None = None,
            progress=None, cluster=None):
    """Hubness of retrieval results: N_k(j) counts the queries with item j among their k best.

    scores: a (Q, G) array, a `Ranking`, a similarity or ranking file, a `Probe` or probe file (the
    bank-side view: its bank queries' top items); or a list of them. k: one K or several.
    exclude_self: ignore the diagonal of a square gallery × gallery matrix. cluster: find each
    query's top items on a dask cluster (docs/distributed.md; the same items). Returns a dict per
    input: {"by_k": [measures at each k (core/hubness.py: skewness, Robin Hood, Gini, …)],
    "k_occurrence": {k: N_k}, …} (a list for a list).
    """
    budget = make_budget(memory, block_rows)
    values = list(scores) if _many(scores) else [scores]
    subjects = [_subject(v, f"scores[{i}]" if _many(scores) else "scores") for i, v in enumerate(values)]
    with clustered(cluster) as session:
        results = _measured(subjects, _ks(k), exclude_self, budget, progress, session)
    return results if _many(scores) else results[0]


def hubness_report(scores: Sequence, *, k=DEFAULT_K, exclude_self: bool = False, memory=DEFAULT_MEMORY,
                   block_rows: int | None = None, output=None, force: bool = False, progress=None,
                   provenance: str | None = None, cluster=None) -> dict:
    """`hubness` of several inputs as one document under their display names, with `output` the
    k-occurrences written to a hubness file (`document["occurrences"]`: each input's N_k by k).
    A probe input whose bank covers under half of the gallery is warned about. With `cluster`,
    document["cluster"] reports the run."""
    budget = make_budget(memory, block_rows)
    ks = _ks(k)
    subjects = [_subject(v, f"scores[{i}]") for i, v in enumerate(scores)]
    labels = [(s.probe.path, None) if s.kind == "probe" else
              (s.source.scores.path, None if s.source.is_ranking else s.source.scores.dataset) for s in subjects]
    names = display_names(labels)
    for subject, name in zip(subjects, names, strict=True):
        subject.name = name
    params = {"k": ks, "exclude_self": exclude_self, "memory": budget.memory, "block_rows": block_rows}
    records = []
    for s in subjects:
        records += s.source.inputs if s.kind != "probe" else [{"path": s.probe.path, "dataset": None, "kind": "probe"}]
    out = OutputFile(str(output), "hubness", force=force, params=params, inputs=records, provenance=provenance) \
        if output is not None else None
    with clustered(cluster) as session:
        results = _measured(subjects, ks, exclude_self, budget, progress, session)
    occurrences = [r.pop("k_occurrence") for r in results]
    results = [{"name": name, **r} for name, r in zip(names, results, strict=True)]
    robust = param(f"method={registry.DEFAULT.name!r}")
    for res in results:
        for row in res["by_k"] if res["kind"] == "probe" else ():
            if row["coverage_pct"] < hub.LOW_COVERAGE_PCT:
                warn(f"{res['name']}: the top {row['k']} of the bank's queries cover only {row['coverage_pct']:.1f}% "
                     f"of the gallery (< {hub.LOW_COVERAGE_PCT:g}%); use {robust}, enlarge or re-sample the bank")
    document = {"k": ks, "exclude_self": exclude_self, "inputs": results}
    if session is not None:
        document["cluster"] = session.report()
    if out is not None:
        width = max(s.n_gallery for s in subjects)
        data = np.full((len(subjects), len(ks), width), -1, dtype=np.int64)
        for i, counts in enumerate(occurrences):
            for j, value in enumerate(ks):
                data[i, j, :counts[value].size] = counts[value]
        with out:
            ds = out.create("/k_occurrence", data=data.astype(np.int32 if data.max() < 2**31 else np.int64))
            ds.attrs["ks"] = np.asarray(ks, dtype=np.int64)
            ds.attrs["rows"] = json.dumps(names)
            ds.attrs["description"] = "N_k per input × k × gallery item; −1 pads a smaller gallery"
            out.h5.attrs["measures"] = json.dumps(results)
        document["output"] = str(output)
        document["uuid"] = out.uuid
    document["occurrences"] = occurrences
    return document
