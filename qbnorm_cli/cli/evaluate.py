"""qbnorm evaluate: retrieval metrics of score or ranking files against a ground truth."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from qbnorm_cli.cli import options as common
from qbnorm_cli.core import metrics
from qbnorm_cli.errors import DataError, GateFailure, UsageError
from qbnorm_cli.io.files import ArrayInput, OutputFile, check_finite, open_array
from qbnorm_cli.io.groundtruth import read_relevant
from qbnorm_cli.streaming.budget import Budget, spans

SCORE_KINDS = ("similarity", "ranking")


@dataclass
class ScoreSource:
    """A dense similarity matrix (Q × G) or a ranking (top-N neighbours and their scores)."""

    scores: ArrayInput
    neighbors: ArrayInput | None = None
    n_gallery: int | None = None

    @property
    def label(self) -> str:
        return self.scores.path if self.neighbors is not None else self.scores.label

    @property
    def is_ranking(self) -> bool:
        return self.neighbors is not None

    @property
    def rows(self) -> int:
        return self.scores.rows

    @property
    def listed(self) -> int | None:
        return self.scores.cols if self.is_ranking else None

    @property
    def inputs(self) -> list[ArrayInput]:
        return [self.scores] if self.neighbors is None else [self.neighbors, self.scores]

    def read_scores(self, r0: int, r1: int) -> np.ndarray:
        """Rows r0:r1 in their stored float type (float32 stays float32; no precision lost)."""
        try:
            block = np.asarray(self.scores.array[r0:r1])
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.scores.label}: cannot read rows {r0}:{r1} ({exc})") from None
        if block.dtype.kind != "f":
            block = block.astype(np.float64)
        check_finite(block, self.scores.label, r0)
        return block

    def read_neighbors(self, r0: int, r1: int) -> np.ndarray:
        try:
            block = np.asarray(self.neighbors.array[r0:r1]).astype(np.int64)
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.neighbors.label}: cannot read rows {r0}:{r1} ({exc})") from None
        bad = (block < -1) | ((block >= self.n_gallery) if self.n_gallery is not None else False)
        if bad.any():
            row = int(np.argmax(bad.any(axis=1)))
            value = int(block[bad][0])
            raise DataError(f"{self.neighbors.label}: neighbour index {value} in row {r0 + row} is outside "
                            f"the gallery{f' of {self.n_gallery} items' if self.n_gallery else ''}")
        return block


def open_scores(spec: str) -> ScoreSource:
    """Open a similarity or ranking file (qbnorm or foreign; a foreign HDF5 file holding /neighbors
    and /scores of one shape, named by its /neighbors dataset, is read as a ranking)."""
    first = open_array(spec, kinds=SCORE_KINDS)
    h5 = first._h5
    ranking = first.kind == "ranking" or (
        first.kind is None and h5 is not None and first.dataset == "/neighbors" and "/scores" in h5
    )
    if not ranking:
        if first.dtype.kind not in "fiu":
            raise DataError(f"{first.label}: dtype {first.dtype} is not a score type")
        return ScoreSource(first, None, first.cols)
    neighbors = first if first.dataset == "/neighbors" else open_array(f"{first.path}::/neighbors")
    scores = open_array(f"{first.path}::/scores")
    if neighbors.dtype.kind not in "iu":
        raise DataError(f"{neighbors.label}: neighbour indices must be integers, not {neighbors.dtype}")
    if neighbors.shape != scores.shape:
        raise DataError(f"{first.path}: /neighbors {neighbors.shape} and /scores {scores.shape} differ in shape")
    gallery = first.attrs.get("gallery_rows")
    return ScoreSource(scores, neighbors, int(gallery) if gallery is not None else None)


def display_names(labels: list[tuple[str, str | None]]) -> list[str]:
    """Column names from (path, dataset or None): the file stem, made unique when needed."""
    names = [Path(path).stem for path, _ in labels]
    for i, name in enumerate(names):
        if names.count(name) > 1 and labels[i][1]:
            names[i] = f"{name}::{labels[i][1]}"
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if names.count(name) > 1:
            seen[name] = seen.get(name, 0) + 1
            names[i] = f"{name}#{seen[name]}"
    return names


def parse_gates(items: list[str] | None) -> list[tuple[str, float]]:
    """'R@1=30' → ('R@1', 30.0); metric names are matched case-insensitively."""
    gates = []
    known = {name.lower(): name for name in metrics.METRIC_NAMES}
    for item in items or []:
        name, sep, value = item.partition("=")
        metric = known.get(name.strip().lower())
        if not sep or metric is None:
            raise UsageError(f"--fail-under {item!r}: expected METRIC=VALUE with METRIC one of "
                             f"{', '.join(metrics.METRIC_NAMES)}")
        try:
            threshold = float(value)
        except ValueError:
            raise UsageError(f"--fail-under {item!r}: {value!r} is not a number") from None
        if not math.isfinite(threshold):
            raise UsageError(f"--fail-under {item!r}: the threshold must be finite")
        gates.append((metric, threshold))
    return gates


def load_ground_truth(gt: str | None, per_item: int | None, n_queries: int,
                      sources: list[ScoreSource]) -> tuple[np.ndarray, ArrayInput | None]:
    """(Q, m) relevant gallery indices (−1 padding), checked against every input's gallery."""
    if (gt is None) == (per_item is None):
        raise UsageError("give the ground truth with exactly one of --gt or --queries-per-item")
    if per_item is not None:
        if per_item < 1:
            raise UsageError(f"--queries-per-item {per_item}: must be at least 1")
        relevant = metrics.contiguous_relevant(n_queries, per_item)
        needed = -(-n_queries // per_item)
        for s in sources:
            if s.n_gallery is not None and needed > s.n_gallery:
                raise DataError(f"--queries-per-item {per_item}: {n_queries} queries need {needed} gallery items "
                                f"but {s.label} has {s.n_gallery}")
        return relevant, None
    return read_relevant(gt, n_queries, [(s.label, s.n_gallery) for s in sources], sources[0].label)


def load_mask(spec: str | None, n_queries: int) -> tuple[np.ndarray, ArrayInput | None]:
    if spec is None:
        return np.ones(n_queries, dtype=bool), None
    mask_in = open_array(spec, ndim=(1,))
    raw = mask_in.read_raw()
    if raw.dtype.kind not in "biuf" or (raw.dtype.kind == "f" and not np.all(np.isin(raw, (0, 1)))):
        raise DataError(f"{mask_in.label}: a query mask holds booleans or 0/1 integers, not {raw.dtype}")
    if len(raw) != n_queries:
        raise DataError(f"{mask_in.label}: {len(raw)} mask entries but there are {n_queries} queries")
    mask = raw != 0
    if not mask.any():
        raise DataError(f"{mask_in.label}: every query is masked out")
    return mask, mask_in


def source_ranks(source: ScoreSource, relevant: np.ndarray, budget: Budget,
                 progress=lambda n: None) -> tuple[np.ndarray, np.ndarray]:
    """(rank, censored) of every query of one input, streamed in row blocks."""
    q = source.rows
    rank = np.empty(q, dtype=np.float64)
    censored = np.zeros(q, dtype=bool)
    if source.is_ranking:
        step = budget.rows(source.listed * 48, share=0.5, total=q, align=source.scores.chunk_rows)
        for r0, r1 in spans(q, step):
            rank[r0:r1], censored[r0:r1] = metrics.topn_ranks(
                source.read_neighbors(r0, r1), source.read_scores(r0, r1), relevant[r0:r1])
            progress(r1 - r0)
    else:
        step = budget.rows(source.n_gallery * 24, share=0.5, total=q, align=source.scores.chunk_rows)
        for r0, r1 in spans(q, step):
            rank[r0:r1] = metrics.ranks(source.read_scores(r0, r1), relevant[r0:r1])
            progress(r1 - r0)
    return rank, censored


def _fmt(name: str, value, listed: int | None) -> str:
    if value is None:
        return f"n/a (> {listed})" if name in ("MdR", "MnR") else f"n/a (top {listed})"
    if name == "MdR":
        return f"{value:g}"
    return f"{value:.2f}"


def command(
    scores: Annotated[list[str], typer.Argument(metavar="SCORES", help="Similarity (Q × G) or ranking (top-N) files: PATH or PATH::/dataset.")],
    gt: Annotated[str | None, typer.Option("--gt", metavar="GT", help="Ground truth: (Q,) gallery indices, or (Q, m) with −1 padding for several relevant items.")] = None,
    queries_per_item: Annotated[int | None, typer.Option("--queries-per-item", metavar="N", help="Contiguous ground truth: query i ↔ gallery item i // N.")] = None,
    query_mask: Annotated[str | None, typer.Option("--query-mask", metavar="MASK", help="(Q,) bool/0-1 array; 0 drops a (padded) query.")] = None,
    fail_under: Annotated[list[str] | None, typer.Option("--fail-under", metavar="METRIC=VALUE", help="Exit 4 when a metric of any input is worse (R@K, GeomR below; MdR, MnR above). Repeatable.")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", metavar="EVAL.h5", help="Write the ranks and metrics (kind evaluation).")] = None,
    memory: common.Memory = common.DEFAULT_MEMORY_TEXT,
    block_rows: common.BlockRows = None,
    force: common.Force = False,
    json_output: common.Json = False,
    quiet: common.Quiet = False,
) -> None:
    """Recall@K, median/mean rank and GeomR of one or more score files (rows = queries).

    Ranks follow the collaborative-experts / QB-Norm protocol (ties averaged). From a ranking
    file only the top N is known (items outside a list are taken to rank below it): figures that
    need ranks beyond N are reported as n/a, never estimated.

    Example: qbnorm evaluate raw.h5 dis.h5 --gt data.h5::/gt --fail-under R@1=30
    """
    report = common.reporter(json_output, quiet)
    budget = common.budget(memory, block_rows)
    gates = parse_gates(fail_under)
    sources = [open_scores(spec) for spec in scores]
    n_queries = sources[0].rows
    for s in sources[1:]:
        if s.rows != n_queries:
            raise DataError(f"{s.label} has {s.rows} queries but {sources[0].label} has {n_queries}")
    relevant, gt_in = load_ground_truth(gt, queries_per_item, n_queries, sources)
    mask, mask_in = load_mask(query_mask, n_queries)
    empty = mask & ~(relevant >= 0).any(axis=1)
    if empty.any():
        row = int(np.argmax(empty))
        raise DataError(f"{gt_in.label if gt_in else 'ground truth'}: query {row} has no relevant item "
                        "(all −1); drop it with --query-mask")
    names = display_names([(s.scores.path, None if s.is_ranking else s.scores.dataset) for s in sources])
    params = {"gt": gt, "queries_per_item": queries_per_item, "query_mask": query_mask,
              "fail_under": [f"{m}={t:g}" for m, t in gates], "memory": budget.memory, "block_rows": block_rows}
    records = [i for s in sources for i in s.inputs] + [i for i in (gt_in, mask_in) if i is not None]
    out = OutputFile(output, "evaluation", force=force, params=params, inputs=records) if output else None

    n_valid = int(mask.sum())
    all_ranks = np.full((len(sources), n_queries), np.nan)
    all_censored = np.zeros((len(sources), n_queries), dtype=bool)
    results = []
    with report.progress("evaluate", len(sources) * n_queries, unit="queries") as advance:
        for i, (source, name) in enumerate(zip(sources, names, strict=True)):
            rank, censored = source_ranks(source, relevant, budget, advance)
            all_ranks[i, mask] = rank[mask]
            all_censored[i] = censored & mask
            summary = metrics.summarise(rank[mask], censored[mask])
            results.append({
                "name": name, "input": source.label,
                "kind": "ranking" if source.is_ranking else "similarity",
                "gallery_rows": source.n_gallery, "listed": source.listed, "queries": n_valid,
                "censored_queries": int(all_censored[i].sum()), **summary,
            })

    difference = None
    if len(results) >= 2:
        first, last = results[0]["metrics"], results[-1]["metrics"]
        difference = {m: (None if first[m] is None or last[m] is None else last[m] - first[m])
                      for m in metrics.METRIC_NAMES}
    checks, failures = [], []
    for res in results:
        for metric, threshold in gates:
            value = res["metrics"][metric]
            worse = value is None or (value > threshold if metric in metrics.LOWER_IS_BETTER else value < threshold)
            checks.append({"input": res["name"], "metric": metric, "value": value, "threshold": threshold,
                           "passed": not worse})
            if value is None:
                failures.append(f"{res['name']}: {metric} is unknown (only the top {res['listed']} is listed), "
                                f"threshold {threshold:g}")
            elif worse:
                relation = "above" if metric in metrics.LOWER_IS_BETTER else "below"
                failures.append(f"{res['name']}: {metric} {value:.2f} is {relation} the threshold {threshold:g}")

    document = {
        "protocol": metrics.PROTOCOL, "queries": n_queries, "valid_queries": n_valid,
        "ground_truth": gt if gt else f"contiguous, {queries_per_item} queries per item",
        "query_mask": query_mask, "inputs": results,
    }
    if difference is not None:
        document["difference"] = {"of": f"{names[-1]} − {names[0]}", "metrics": difference}
    if gates:
        document["gates"] = checks
        document["passed"] = not failures

    if out is not None:
        with out:
            ds = out.create("/ranks", data=all_ranks)
            ds.attrs["rows"] = json.dumps(names)
            ds.attrs["description"] = ("0-based tie-averaged rank per input × query; NaN = masked; where "
                                       "/censored is true only a lower bound is known (ranking inputs)")
            out.create("/censored", data=all_censored)
            out.h5.attrs["protocol"] = metrics.PROTOCOL
            out.h5.attrs["metrics"] = json.dumps(results)
            out.h5.attrs["valid_queries"] = n_valid
            if difference is not None:
                out.h5.attrs["difference"] = json.dumps(difference)
        document["output"] = output
        document["uuid"] = out.uuid

    from rich.table import Table  # on first use: see report.py

    table = Table(title=f"Retrieval ({n_valid} valid queries of {n_queries})", caption=_caption(results))
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    if difference is not None:
        table.add_column("Δ last − first", justify="right")
    for metric in metrics.METRIC_NAMES:
        row = [metric] + [_fmt(metric, r["metrics"][metric], r["listed"]) for r in results]
        if difference is not None:
            value = difference[metric]
            row.append("n/a" if value is None else f"{value:+.2f}")
        table.add_row(*row)
    report.table(table)
    if out is not None:
        report.info(f"wrote {output}: evaluation of {len(sources)} input(s)")
    report.result(document)
    if failures:
        raise GateFailure("quality gate failed: " + "; ".join(failures))


def _caption(results: list[dict]) -> str | None:
    listed = [r for r in results if r["listed"] is not None]
    if not listed:
        return None
    return ("ranking input: only each query's top N is known; n/a = cannot be computed from it "
            "(every number shown is exact)")

