"""`evaluate` and `hubness`: figures of score or ranking inputs, and the reports the CLI prints."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qbnorm_cli import methods as registry
from qbnorm_cli.api.common import bounded, check_choice, clustered, panel_bytes, progress_or_none, score_source, warn
from qbnorm_cli.core import hubness as hub
from qbnorm_cli.core import metrics
from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.core.statistics import coverage_warning
from qbnorm_cli.errors import DataError, UsageError, param
from qbnorm_cli.io.atomic import OutputFile, jsonable
from qbnorm_cli.io.foreign import HDF5_MAGIC
from qbnorm_cli.io.groundtruth import ground_truth, query_mask
from qbnorm_cli.io.hdf5 import check_readable, open_h5, root_kind
from qbnorm_cli.io.probefile import Probe
from qbnorm_cli.io.scorefiles import ScoreFile, open_scores
from qbnorm_cli.io.specs import split_spec, transposed
from qbnorm_cli.streaming import cluster as clustering
from qbnorm_cli.streaming import evaluation
from qbnorm_cli.streaming.budget import DEFAULT_MEMORY, Budget, make_budget, spans
from qbnorm_cli.streaming.engine import run_normalise
from qbnorm_cli.streaming.sources import SIMILARITIES

DEFAULT_K = 10
# What to do with embeddings given where scores are expected (io.scorefiles.looks_like_embeddings)
EVALUATE_HINT = ("evaluate needs query × gallery scores: normalise writes them ("
                 + param(f"method={registry.BASELINE.name!r}") + " keeps them raw)")
HUBNESS_HINT = f"hubness scores embeddings itself: give them as {param('queries')} and {param('gallery')}"


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

def _layout(source: ScoreFile, transpose: bool) -> tuple[int, int | None]:
    """(captions, items) of an input as read: the t2v layout, rows = captions (queries of t2v)."""
    if not transpose:
        return source.rows, source.n_gallery
    if source.n_gallery is None:
        raise DataError(f"{source.label}: a ranking file without a gallery_rows attribute cannot be read "
                        "transposed (set the root attribute gallery_rows: the number of captions)")
    return source.n_gallery, source.rows


def _map_rows(session, kind: str):
    """How a pass over an input's rows runs: here, or as `kind` tasks on the cluster of `session`."""
    return evaluation.here if session is None else clustering.score_rows(session, kind)


def _standing(source: ScoreFile, direction: str, transpose: bool, relevant: np.ndarray, mask: np.ndarray,
              n_items: int, budget: Budget, advance, map_rows=evaluation.here) -> metrics.Standing:
    """The standings of one input's queries (t2v: the unmasked captions; v2t: every item)."""
    along_rows = (direction == "t2v") != transpose  # are the stored rows the queries?
    if not along_rows and "log" in str(source.scores.attrs.get("score_domain", "")):
        warn(f"{source.label} holds log-domain scores (compare within a row); ranking along its columns "
             f"compares them across its rows. Normalise in the {direction} direction "
             f"({param('transpose=True')}) and evaluate that output")
    columns = evaluation.column_list_standings if source.is_ranking else evaluation.column_standings

    def rows_as_queries(relevant_of_rows, **options):
        return metrics.concatenate(map_rows(evaluation.row_standings, source, advance, relevant=relevant_of_rows,
                                            budget=budget, **options))

    if direction == "t2v":
        if along_rows:
            st = rows_as_queries(relevant)
        else:
            st = columns(source, metrics.inverse_relevant(relevant, n_items), budget, advance, map_rows=map_rows)
        return st.select(mask)
    missing = None if mask.all() else ~mask
    if along_rows:  # stored rows are the items
        return rows_as_queries(metrics.inverse_relevant(relevant, n_items), missing_columns=missing,
                               skip_missing=True)
    return columns(source, relevant, budget, advance, masked_rows=missing, skip_missing=True, map_rows=map_rows)


def _curve_depth(source: ScoreFile, direction: str, transpose: bool, n_captions: int, n_items: int) -> int:
    """How far a Recall@K curve goes: K ≤ 100, the candidates ranked, and a ranking's N."""
    candidates = source.listed if source.is_ranking else (n_items if direction == "t2v" else n_captions)
    return max(1, min(metrics.CURVE_KMAX, candidates))


def _evaluated(sources: list[ScoreFile], gt, queries_per_item, mask_value, budget: Budget, progress,
               direction: str = "t2v", transpose: bool = False, ties: str = "official", session=None):
    check_choice(direction, metrics.DIRECTIONS, "direction")
    check_choice(ties, metrics.TIES, "ties")
    layouts = [_layout(s, transpose) for s in sources]
    n_captions = layouts[0][0]
    for s, (c, _) in zip(sources[1:], layouts[1:], strict=True):
        if c != n_captions:
            raise DataError(f"{s.label} has {c} captions (queries) but {sources[0].label} has {n_captions}")
    relevant, gt_in = ground_truth(gt, queries_per_item, n_captions, [(s.label, g) for s, (_, g) in
                                                                      zip(sources, layouts, strict=True)],
                                   sources[0].label)
    mask, mask_in = query_mask(mask_value, n_captions)
    if direction == "t2v":
        empty = mask & ~(relevant >= 0).any(axis=1)
        if empty.any():
            row = int(np.argmax(empty))
            raise DataError(f"{gt_in.label if gt_in else 'ground truth'}: query {row} has no relevant item "
                            f"(all −1); drop it with {param('query_mask')}")
    if direction == "v2t":
        for s, (_, g) in zip(sources, layouts, strict=True):
            if g is None:
                raise DataError(f"{s.label}: v2t counts every item, and this ranking file does not say how many "
                                "there are (set its root attribute gallery_rows)")
    n_items_all = [g if g is not None else int(relevant.max()) + 1 for _, g in layouts]
    if direction == "v2t" and len(set(n_items_all)) > 1:
        raise DataError(f"the inputs rank different numbers of items ({', '.join(map(str, n_items_all))}); "
                        f"v2t evaluates every item")
    n_valid = int(mask.sum()) if direction == "t2v" else n_items_all[0]
    results = []
    total = sum(s.rows for s in sources)
    with progress_or_none(progress)("evaluate", total, unit="rows") as advance:
        for source, n_items in zip(sources, n_items_all, strict=True):
            st = _standing(source, direction, transpose, relevant, mask, n_items, budget, advance,
                           _map_rows(session, "evaluate"))
            summary = metrics.summarise(st, ties)
            depth = _curve_depth(source, direction, transpose, n_captions, n_items)
            rank = metrics.rank_values(st, ties)
            if direction == "t2v":
                full_rank = np.full(n_captions, np.nan)
                full_rank[mask] = rank
                full_censored = np.zeros(n_captions, dtype=bool)
                full_censored[mask] = st.censored
            else:
                full_rank, full_censored = rank, st.censored
            results.append({
                "input": source.label, "kind": "ranking" if source.is_ranking else "similarity",
                "gallery_rows": source.n_gallery, "listed": source.listed, "queries": n_valid,
                "censored_queries": int(st.censored.sum()), **summary,
                "recall_curve": {"K": list(range(1, depth + 1)), "R@K": metrics.recall_curve(st, ties, depth)},
                "ranks": full_rank, "censored": full_censored,
            })
    return results, mask, [i for i in (gt_in, mask_in) if i is not None]


@bounded
def evaluate(scores, gt=None, *, queries_per_item: int | None = None, query_mask=None, direction: str = "t2v",
             transpose: bool = False, ties: str = "official", memory=DEFAULT_MEMORY, block_rows: int | None = None,
             progress=None, cluster=None):
    """Recall@K, median and mean rank and GeomR as metric.py computes them, unrounded.

    scores: a (C, G) array, a `Ranking`, or a similarity or ranking file (`PATH[::/dataset]`); or a
    list of them (evaluated against one ground truth). They are in metric.py's t2v layout, rows =
    captions (queries), columns = items; with transpose=True they are stored the other way round
    (items × captions, e.g. normalised in the v2t direction; a ranking's rows are then items).
    gt: (C,) relevant items of each caption, or (C, m) with −1 padding (an array or a file); or
    queries_per_item N: caption i ↔ item i // N. query_mask: (C,) booleans, False masks a caption.

    direction: "t2v" (t2v_metrics: each caption ranks the items; masked captions are dropped) or
    "v2t" (v2t_metrics: each item ranks every caption; its rank is the best of its own captions',
    ties averaged per caption; masked captions rank last and answer nothing; every item counts).
    ties: "official" (metric.py) or "expected" (the expectation over every order of tied items;
    core/metrics.py). From a ranking only the top N of each of its rows is known: figures that
    need more are None, never estimated (`exact` and `bounds` say which). Along its rows a ranking
    is exact up to its N; along its columns (v2t from per-caption lists, t2v from per-item lists)
    a rank is exact only where every row's last listed score leaves no room for an unlisted score
    above the best answer, a lower bound elsewhere (core/metrics.py). cluster: rank on a dask
    cluster (docs/distributed.md; the same figures). Returns a dict {"metrics": {"R@1": …},
    "exact", "bounds", "queries", "recall_curve", "ranks", "protocol", …} per input (a list for a
    list).
    """
    budget = make_budget(memory, block_rows)
    values = list(scores) if _many(scores) else [scores]
    if not values:
        raise UsageError(f"{param('scores')}: give at least one input")
    sources = [open_scores(v, f"scores[{i}]" if _many(scores) else "scores", EVALUATE_HINT)
               for i, v in enumerate(values)]
    with clustered(cluster) as session:
        results, _, _ = _evaluated(sources, gt, queries_per_item, query_mask, budget, progress, direction,
                                   transpose, ties, session)
    for record in results:
        record["protocol"] = metrics.protocol(direction, ties)
    return results if _many(scores) else results[0]


@bounded
def evaluation_report(scores: Sequence, gt=None, *, queries_per_item: int | None = None, query_mask=None,
                      direction: str = "t2v", transpose: bool = False, ties: str = "official",
                      gates: Sequence[tuple[str, float]] = (), memory=DEFAULT_MEMORY, block_rows: int | None = None,
                      output=None, force: bool = False, progress=None, provenance: str | None = None,
                      described: dict | None = None, cluster=None) -> dict:
    """`evaluate` of several inputs as one document: each input's figures under its display name,
    the difference last − first, the quality gates (metric, threshold) checked, and with `output`
    the per-query ranks written to an evaluation file. `described` holds how the ground truth and
    mask were given (recorded as such). With `cluster`, document["cluster"] reports the run."""
    budget = make_budget(memory, block_rows)
    sources = [open_scores(v, f"scores[{i}]", EVALUATE_HINT) for i, v in enumerate(scores)]
    names = display_names([(s.scores.path, None if s.is_ranking else s.scores.dataset) for s in sources])
    described = described or {}
    params = {"gt": described.get("gt"), "queries_per_item": queries_per_item,
              "query_mask": described.get("query_mask"), "direction": direction, "transpose": transpose,
              "ties": ties, "fail_under": [f"{m}={t:g}" for m, t in gates],
              "memory": budget.memory, "block_rows": block_rows}
    out = None
    if output is not None:
        records = [i for s in sources for i in s.inputs]
        out = OutputFile(str(output), "evaluation", force=force, params=params, inputs=records, provenance=provenance)
    with clustered(cluster) as session:
        results, mask, extra_inputs = _evaluated(sources, gt, queries_per_item, query_mask, budget, progress,
                                                 direction, transpose, ties, session)
    if out is not None:
        out.inputs += [i.describe() for i in extra_inputs]
    all_ranks = np.stack([r.pop("ranks") for r in results])
    all_censored = np.stack([r.pop("censored") for r in results])
    results = [{"name": name, **r} for name, r in zip(names, results, strict=True)]
    difference = metrics.difference(results[0]["metrics"], results[-1]["metrics"]) if len(results) >= 2 else None
    checks, failures = metrics.check_gates(results, gates)
    protocol = metrics.protocol(direction, ties)
    document = {
        "protocol": protocol, "direction": direction, "ties": ties, "transpose": transpose,
        "captions": len(mask), "queries": all_ranks.shape[1], "valid_queries": results[0]["queries"],
        "ground_truth": described.get("gt") or f"contiguous, {queries_per_item} queries per item",
        "query_mask": described.get("query_mask"), "masked_captions": int((~mask).sum()), "inputs": results,
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
            ds.attrs["description"] = (f"0-based rank per input × query ({direction}: "
                                       f"{'captions' if direction == 't2v' else 'items'}; ties {ties}); NaN = masked; "
                                       "where /censored is true only a lower bound is known (ranking inputs)")
            out.create("/censored", data=all_censored)
            out.h5.attrs["protocol"] = json.dumps(protocol)
            out.h5.attrs["metrics"] = json.dumps(jsonable(results))
            out.h5.attrs["valid_queries"] = results[0]["queries"]
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
        self.width = probe.kmax()
        self.n_queries, self.n_gallery = probe.n_bank or len(probe.neighbors(k=1)), probe.n_gallery
        self.label, self.kind = probe.label, "probe"

    def check(self, kmax: int, exclude_self: bool) -> None:
        if exclude_self:
            raise UsageError(f"{param('exclude_self=True')}: {self.label} is a probe (bank × gallery); "
                             "the bank is not the gallery")
        width = self.width
        if kmax > width:
            raise UsageError(f"{param('k')} {kmax}: {self.label} keeps the top {width} items per bank query (kmax); "
                             f"probe again with {param('k')} {kmax}")

    def top(self, kmax: int, exclude_self: bool, budget: Budget, advance, session=None) -> np.ndarray:
        q = self.n_queries
        out = np.empty((q, kmax), dtype=np.int64)
        step = budget.rows(self.width * 16, share=0.5, total=q)
        for r0, r1 in spans(q, step):
            out[r0:r1] = self.probe.neighbors(rows=slice(r0, r1), k=kmax)
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
        return np.concatenate(_map_rows(session, "hubness")(evaluation.neighbours, self.source, advance, kmax=kmax,
                                                 exclude_self=exclude_self, budget=budget))


class _EmbeddingSubject:
    """Query and gallery embeddings as a hubness input, scored here (cosine or dot): each query's top
    items come from the streaming top-k of raw scores that normalise --top-k runs (streaming.ranking,
    the identity normaliser), block by block under the budget, never a queries × gallery matrix."""

    def __init__(self, queries, gallery, similarity: str, budget: Budget, eager: bool = True):
        self.scores, self.inputs, _ = score_source(queries, gallery, None, rows_name="queries", cols_name="gallery",
                                                   sims_name="scores", similarity=similarity, budget=budget,
                                                   what="hubness", eager_cols=False, eager=eager)
        self.n_queries, self.n_gallery = self.scores.n_rows, self.scores.n_cols
        self.label = f"{self.inputs[0].label} × {self.inputs[1].label}"
        self.name, self.kind = self.label, "embeddings"

    def check(self, kmax: int, exclude_self: bool) -> None:
        if exclude_self and self.n_queries != self.n_gallery:
            raise UsageError(f"{param('exclude_self=True')} needs the gallery as the queries; {self.label} is "
                             f"{self.n_queries} × {self.n_gallery}")
        limit = self.n_gallery - 1 if exclude_self else self.n_gallery
        if kmax > limit:
            raise UsageError(f"{param('k')} {kmax}: larger than the {limit} candidate items of {self.label}")

    def top(self, kmax: int, exclude_self: bool, budget: Budget, advance, session=None) -> np.ndarray:
        width = kmax + 1 if exclude_self else kmax  # the query itself is among its own best: drop it
        out = np.empty((self.n_queries, kmax), dtype=np.int64)
        scored = 0

        def progress(n_scores: int) -> None:  # the ranking counts scores; hubness counts queries
            nonlocal scored
            before = scored // self.n_gallery
            scored += n_scores
            advance(scored // self.n_gallery - before)

        engine = run_normalise if session is None else functools.partial(clustering.run_normalise, session)
        for q0, (_, indices, _) in engine(self.scores, Normaliser(identity=True), budget, width, progress=progress):
            indices = np.asarray(indices, dtype=np.int64)
            out[q0:q0 + len(indices)] = evaluation.drop_self(indices, q0, kmax) if exclude_self else indices
        return out


def _is_probe_file(spec) -> bool:
    """Whether `spec` names a qbnorm probe: an HDF5 file (qbnorm writes no user block) of that kind;
    every other format (.npy, .npz, pickles, …) is read as scores, as every command reads it."""
    if not isinstance(spec, (str, Path)):
        return False
    path, dataset = split_spec(str(spec))
    if dataset is not None or path.endswith(".npy"):
        return False
    try:
        if check_readable(path) != HDF5_MAGIC:
            return False
    except (OSError, UsageError):
        return False  # opening it as scores names the problem
    h5 = open_h5(path)
    try:
        return root_kind(h5) == "probe"
    finally:
        h5.close()


def _subject(value, name: str, transpose: bool = False, budget: Budget | None = None):
    if isinstance(value, Probe) or _is_probe_file(value):
        if transpose:
            raise UsageError(f"{param('transpose=True')}: {name} is a probe (its bank queries' top items); it "
                             "cannot be read transposed")
        return _ProbeSubject(value if isinstance(value, Probe) else Probe.load(value), name)
    source = open_scores(value, name, HUBNESS_HINT)
    if transpose:
        if source.is_ranking:
            raise UsageError(f"{param('transpose=True')}: {source.label} is a ranking (each row's top N); the "
                             "neighbourhoods of its columns are not in it. Give the similarity file")
        source = ScoreFile(transposed(source.scores, panel_bytes(budget)), None, source.rows)
    return _ScoreSubject(source, name)


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
                row["distribution"] = hub.distribution(nk)
                per_k.append(row)
            results.append({"input": subject.label, "kind": subject.kind, "queries": subject.n_queries,
                            "gallery_rows": subject.n_gallery, "by_k": per_k, "k_occurrence": counts})
    return results


def _subjects(scores, queries, gallery, similarity: str, transpose: bool, budget: Budget, eager: bool = True) -> list:
    """The inputs of hubness: each score, ranking or probe input, then the embeddings to score."""
    values = [] if scores is None else list(scores) if _many(scores) else [scores]
    subjects = [_subject(v, f"scores[{i}]" if _many(scores) else "scores", transpose, budget)
                for i, v in enumerate(values)]
    if queries is not None or gallery is not None:
        if queries is None or gallery is None:
            raise UsageError(f"hubness of embeddings needs {param('queries')} and {param('gallery')}")
        check_choice(similarity, SIMILARITIES, "similarity")
        subjects.append(_EmbeddingSubject(queries, gallery, similarity, budget, eager))
    if not subjects:
        raise UsageError(f"{param('scores')}: give at least one input, or {param('queries')} and {param('gallery')}")
    return subjects


def _low_coverage(results: list[dict], names: list[str]) -> list[str]:
    """The probe's low-coverage warning (core/statistics.coverage_warning) for each probe input, at
    each k measured: the bank-side view then says little about the gallery's hubs."""
    robust = param(f"method={registry.DEFAULT.name!r}")
    found = []
    for name, res in zip(names, results, strict=True):
        for row in res["by_k"] if res["kind"] == "probe" else ():
            covered = round(row["coverage_pct"] * row["items"] / 100)
            diag = {"coverage": covered / row["items"], "covered_items": covered, "k": row["k"],
                    "occurrence_skewness": row["skewness"], "bank_rows": row["queries"]}
            message = coverage_warning(diag, row["items"], robust)
            if message is not None:
                found.append(f"{name}: {message}")
    return found


@bounded
def hubness(scores=None, *, queries=None, gallery=None, similarity: str = "cosine", k=DEFAULT_K,
            exclude_self: bool = False, transpose: bool = False, memory=DEFAULT_MEMORY, block_rows: int | None = None,
            progress=None, cluster=None):
    """Hubness of retrieval results: N_k(j) counts the queries with item j among their k best.

    scores: a (Q, G) array, a `Ranking`, a similarity or ranking file, a `Probe` or probe file (the
    bank-side view: its bank queries' top items); or a list of them. queries, gallery: embeddings
    (arrays, memory maps, h5py datasets, `PATH[::/dataset]` strings) to score here instead, or as
    well (compared by `similarity`, cosine or dot; streamed under `memory`, never Q × G at once).
    k: one K or several. exclude_self: ignore the diagonal of a square gallery × gallery matrix (or
    each query's own item when the gallery is the queries). transpose: read similarity inputs
    transposed (the columns become the queries: v2t from a t2v dump). cluster: find each query's top
    items on a dask cluster (docs/distributed.md; the same items). Returns a dict per input:
    {"by_k": [measures at each k (core/hubness.py; docs/hubness.md defines them)],
    "k_occurrence": {k: N_k}, …}: a list for a list of scores or for several inputs.
    """
    budget = make_budget(memory, block_rows)
    subjects = _subjects(scores, queries, gallery, similarity, transpose, budget, eager=cluster is None)
    with clustered(cluster) as session:
        results = _measured(subjects, _ks(k), exclude_self, budget, progress, session)
    for message in _low_coverage(results, [r["input"] for r in results]):
        warn(message)
    return results if _many(scores) or len(results) > 1 else results[0]


def _short(array) -> str:
    """An embedding input's short name: its dataset's last part, else its file's stem."""
    if array.dataset:
        return array.dataset.rsplit("/", 1)[-1]
    return Path(array.path).stem if array.path else (array.name or "array")


@bounded
def hubness_report(scores: Sequence = (), *, queries=None, gallery=None, similarity: str = "cosine", k=DEFAULT_K,
                   exclude_self: bool = False, transpose: bool = False, memory=DEFAULT_MEMORY,
                   block_rows: int | None = None, output=None, force: bool = False, progress=None,
                   provenance: str | None = None, cluster=None) -> dict:
    """`hubness` of several inputs as one document under their display names, with `output` the
    k-occurrences written to a hubness file (`document["occurrences"]`: each input's N_k by k).
    A probe input whose bank covers under half of the gallery is warned about. With `cluster`,
    document["cluster"] reports the run."""
    budget = make_budget(memory, block_rows)
    ks = _ks(k)
    subjects = _subjects(list(scores), queries, gallery, similarity, transpose, budget, eager=cluster is None)
    scored = [s for s in subjects if s.kind != "embeddings"]
    labels = [(s.probe.path, None) if s.kind == "probe" else
              (s.source.scores.path, None if s.source.is_ranking else s.source.scores.dataset) for s in scored]
    names = display_names(labels) + [f"{_short(s.inputs[0])} × {_short(s.inputs[1])}" for s in subjects[len(scored):]]
    for subject, name in zip(subjects, names, strict=True):
        subject.name = name
    params = {"k": ks, "exclude_self": exclude_self, "transpose": transpose, "memory": budget.memory,
              "block_rows": block_rows}
    if queries is not None:
        params["similarity"] = similarity
    records = []
    for s in subjects:
        if s.kind == "probe":
            records.append({"path": s.probe.path, "dataset": None, "kind": "probe"})
        else:
            records += s.inputs if s.kind == "embeddings" else s.source.inputs
    out = OutputFile(str(output), "hubness", force=force, params=params, inputs=records, provenance=provenance) \
        if output is not None else None
    with clustered(cluster) as session:
        results = _measured(subjects, ks, exclude_self, budget, progress, session)
    occurrences = [r.pop("k_occurrence") for r in results]
    results = [{"name": name, **r} for name, r in zip(names, results, strict=True)]
    found = _low_coverage(results, names)
    for message in found:
        warn(message)
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
            out.warnings = found
        document["output"] = str(output)
        document["uuid"] = out.uuid
    document["occurrences"] = occurrences
    return document
