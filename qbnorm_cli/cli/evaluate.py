"""qbnorm evaluate: retrieval metrics of score or ranking files against a ground truth."""

from __future__ import annotations

import math
from typing import Annotated

import typer

from qbnorm_cli import api, plots
from qbnorm_cli.cli import options, shared
from qbnorm_cli.cli.report import Reporter
from qbnorm_cli.core import metrics
from qbnorm_cli.errors import GateFailure, UsageError


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


def _fmt(name: str, value, listed: int | None) -> str:
    if value is None:
        return f"n/a (> {listed})" if name in ("MdR", "MnR") else f"n/a (top {listed})"
    if name == "MdR":
        return f"{value:g}"
    return f"{value:.2f}"


@shared.budget
@shared.clustered
@shared.overwriting
@shared.reporting
def command(
    ctx: typer.Context,
    scores: Annotated[list[str], typer.Argument(metavar="SCORES", help="Similarity (Q × G) or ranking (top-N) files: PATH or PATH::/dataset.")],
    gt: Annotated[str | None, typer.Option("--gt", metavar="GT", help="Ground truth: (Q,) gallery indices, or (Q, m) with −1 padding for several relevant items.")] = None,
    queries_per_item: Annotated[int | None, typer.Option("--queries-per-item", metavar="N", help="Contiguous ground truth: query i ↔ gallery item i // N.")] = None,
    query_mask: Annotated[str | None, typer.Option("--query-mask", metavar="MASK", help="(Q,) bool/0-1 array over the captions (queries); 0 masks a (padded) caption.")] = None,
    direction: Annotated[str, typer.Option("--direction", metavar="t2v|v2t", help="t2v: each caption (row) ranks the items; v2t: each item (column) ranks every caption, as metric.py's v2t_metrics.")] = "t2v",
    transpose: Annotated[bool, typer.Option("--transpose", help="The inputs are stored items × captions (e.g. normalised in the v2t direction); a ranking's rows are then items.")] = False,
    ties: Annotated[str, typer.Option("--ties", metavar="official|expected", help="official: metric.py (tied positions averaged, R@1 = rank 0); expected: the expectation over every order of tied items.")] = "official",
    plot: options.Plot = None,
    fail_under: Annotated[list[str] | None, typer.Option("--fail-under", metavar="METRIC=VALUE", help="Exit 4 when a metric of any input is worse (R@K, GeomR below; MdR, MnR above). Repeatable.")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", metavar="EVAL.h5", help="Write the ranks and metrics (kind evaluation).")] = None,
    *,
    memory: str,
    block_rows: int | None,
    cluster: api.Cluster | None,
    force: bool,
    report: Reporter,
) -> None:
    """Recall@K, median/mean rank and GeomR of one or more score files (rows = queries).

    Figures are metric.py's (collaborative-experts / QB-Norm t2v_metrics and v2t_metrics)
    exactly, unrounded: ranks average tied positions, R@1 counts rank 0. Inputs are in its t2v
    layout (rows = captions, columns = items; --transpose for items × captions); --gt and
    --queries-per-item say which items each caption is relevant to, in both directions. From a
    ranking file only the top N of each row is known (items outside a list are taken to rank
    below it): figures that need ranks beyond N are reported as n/a, never estimated; along the
    lists' columns (v2t from per-caption lists) a rank is known only where every list's last
    score pins it down.

    Example: qbnorm evaluate raw.h5 dis.h5 --gt data.h5::/gt --fail-under R@1=30

    Example (image → caption from a t2v dump): qbnorm evaluate sims.h5 --direction v2t --queries-per-item 5
    """
    gates = parse_gates(fail_under)
    if plot is not None:
        plots.check_plot_target(plot, force=force, inputs=scores, what="evaluate --plot")
    with report.capture():
        document = api.evaluation_report(
            scores, gt, queries_per_item=queries_per_item, query_mask=query_mask, direction=direction,
            transpose=transpose, ties=ties, gates=gates, memory=memory,
            block_rows=block_rows, output=output, force=force, progress=report.progress,
            provenance=options.provenance(ctx), described={"gt": gt, "query_mask": query_mask},
            cluster=cluster)
    if plot is not None:
        plots.save_figure(plots.recall_figure(document["inputs"], direction=document["direction"]), plot, force=force, inputs=scores)
        document["plot"] = {"file": plot, **plots.recall_data(document["inputs"])}
    failures = document.pop("failures", [])
    results = document["inputs"]
    from rich.table import Table  # on first use: see report.py

    if document["direction"] == "t2v":
        title = f"Retrieval t2v ({document['valid_queries']} valid queries of {document['queries']})"
    else:
        masked = document["masked_captions"]
        title = (f"Retrieval v2t ({document['queries']} items ranking {document['captions']} captions"
                 + (f", {masked} masked" if masked else "") + ")")
    if document["ties"] != "official":
        title += f", ties {document['ties']}"
    table = Table(title=title, caption=_caption(results))
    table.add_column("metric")
    for res in results:
        table.add_column(res["name"], justify="right")
    difference = document.get("difference", {}).get("metrics")
    if difference is not None:
        table.add_column("Δ last − first", justify="right")
    for metric in metrics.METRIC_NAMES:
        row = [metric] + [_fmt(metric, r["metrics"][metric], r["listed"]) for r in results]
        if difference is not None:
            value = difference[metric]
            row.append("n/a" if value is None else f"{value:+.2f}")
        table.add_row(*row)
    report.table(table)
    if output is not None:
        report.info(f"wrote {output}: evaluation of {len(results)} input(s)")
    if plot is not None:
        report.info(f"wrote {plot}: Recall@K of {len(results)} input(s)")
    report.cluster(document.get("cluster"))
    report.result(document)
    if failures:
        raise GateFailure("quality gate failed: " + "; ".join(failures))


def _caption(results: list[dict]) -> str | None:
    if not any(r["listed"] is not None for r in results):
        return None
    return ("ranking input: only each query's top N is known; n/a = cannot be computed from it "
            "(every number shown is exact)")
