"""qbnorm hubness: k-occurrence and hubness measures of score, ranking or probe files, or of
query and gallery embeddings scored here."""

from __future__ import annotations

from typing import Annotated

import typer

from qbnorm_cli import api, plots
from qbnorm_cli.api.evaluation import DEFAULT_K
from qbnorm_cli.cli import options, shared
from qbnorm_cli.cli.report import Reporter
from qbnorm_cli.core import hubness as hub

BAR_WIDTH = 24


def _histogram(name: str, k: int, nk):
    from rich.panel import Panel
    from rich.table import Table

    bins = hub.log_bins(nk)
    most = max(count for _, count in bins) or 1
    grid = Table.grid(padding=(0, 1))
    grid.add_column(justify="right")
    grid.add_column()
    grid.add_column(justify="right")
    for label, count in bins:
        length = 0 if count == 0 else max(1, round(BAR_WIDTH * count / most))
        grid.add_row(label, "█" * length, str(count))
    return Panel(grid, title=f"{name} · N_{k}", subtitle="items per N_k bin", expand=False)


ROWS = (
    ("k-skewness", "skewness", "{:.2f}"),
    ("truncnorm skewness", "skewness_truncnorm", "{:.3f}"),
    ("Robin Hood", "robin_hood", "{:.3f}"),
    ("Gini", "gini", "{:.3f}"),
    ("Atkinson (ε=0.5)", "atkinson", "{:.3f}"),
    ("anti-hub rate", "antihub_rate_pct", "{:.2f} %"),
    ("hubs (N_k ≥ 2μ)", "hubs", "{}"),
    ("hub occurrence", "hub_occurrence_pct", "{:.2f} %"),
    ("groupie ratio", "groupie_ratio", "{:.4f}"),
    ("mean N_k (μ = k·Q/G)", "mean_nk", "{:g}"),
    ("max N_k", "max_nk", "{}"),
    ("coverage", "coverage_pct", "{:.1f} %"),
)


@shared.budget
@shared.clustered
@shared.overwriting
@shared.reporting
def command(
    ctx: typer.Context,
    scores: Annotated[list[str] | None, typer.Argument(metavar="[SCORES]...", help="Similarity, ranking or probe files: PATH or PATH::/dataset.", show_default=False)] = None,
    queries: Annotated[str | None, typer.Option("--queries", metavar="Q", help="Query embeddings to score against --gallery here (no probe needed; streamed under --memory).")] = None,
    gallery: Annotated[str | None, typer.Option("--gallery", metavar="G", help="Gallery embeddings for --queries.")] = None,
    similarity: options.Similarity = "cosine",
    k: Annotated[list[int] | None, typer.Option("--k", metavar="K", help="Neighbourhood size(s) (repeatable; default 10).")] = None,
    exclude_self: Annotated[bool, typer.Option("--exclude-self", help="Ignore the diagonal of a square gallery × gallery matrix (with --queries, each query's own item).")] = False,
    transpose: options.Transpose = False,
    plot: options.Plot = None,
    output: Annotated[str | None, typer.Option("--output", "-o", metavar="OUT.h5", help="Write the k-occurrences and measures (kind hubness).")] = None,
    *,
    memory: str,
    block_rows: int | None,
    cluster: api.Cluster | None,
    force: bool,
    report: Reporter,
) -> None:
    """Hubness of retrieval results: k-skewness, Robin Hood, Gini, Atkinson, anti-hubs, hubs.

    N_k(j) counts the queries that have gallery item j among their k best; μ = k·Q/G is its mean
    (Q queries, G items). Inputs: score or ranking files, a probe file (the bank-side view: its
    bank queries' top items, and the coverage of the DIS activation set), or raw embeddings with
    --queries Q --gallery G (scored here, cosine or dot). A file of embeddings given as SCORES is
    refused (exit 3). The measures (docs/hubness.md gives sources and details):

    \b
      k-skewness          E[(N_k−μ)³]/σ³ (Radovanović et al. 2010); 0 symmetric, > 1 strong hubness
      truncnorm skewness  E[X³] of N(0,1) truncated below at −μ/s (scikit-hubness, kiez): 0 … 1.596
      Robin Hood          share of occurrences to move to make N_k uniform (Feldbauer 2018): 0 … 1−1/G
      Gini                mean |N_k(i)−N_k(j)| / 2μ: 0 (equal) … 1−1/G (one item takes all)
      Atkinson (ε=0.5)    1 − (mean √N_k)²/μ: 0 … 1−1/G
      anti-hub rate       % of items with N_k = 0 (the peers' antihub_occurrence ×100): 0 … 100
      hubs                items with N_k ≥ 2μ (the peers' 2k when Q = G)
      hub occurrence      % of the k·Q neighbour slots taken by hubs: 0 … 100
      groupie ratio       max N_k / (k·Q): 1/(k·Q) … 1/k
      coverage            % of items with N_k > 0 (100 − anti-hub rate)

    --plot draws, per k, the complementary CDF of N_k of each input on log axes (the share of
    items retrieved at least x times; a long, high tail = hubs; μ and 2μ dotted), skewness in the
    legend; each input keeps its colour in every qbnorm figure.

    Example: qbnorm hubness raw.h5 dis.h5 --k 1 --k 10 --plot hubness.png

    Example: qbnorm hubness --queries data.h5::/queries --gallery data.h5::/gallery --memory 512MiB
    """
    inputs = [*(scores or []), *(v for v in (queries, gallery) if v is not None)]
    if plot is not None:
        plots.check_plot_target(plot, force=force, inputs=inputs, what="hubness --plot")
    with report.capture():
        document = api.hubness_report(scores or [], queries=queries, gallery=gallery, similarity=similarity,
                                      k=k or [DEFAULT_K], exclude_self=exclude_self, transpose=transpose,
                                      memory=memory, block_rows=block_rows, output=output, force=force,
                                      progress=report.progress, provenance=options.provenance(ctx), cluster=cluster)
    occurrences = document.pop("occurrences")
    if plot is not None:
        plots.save_figure(plots.hubness_figure(document["inputs"]), plot, force=force, inputs=inputs)
        document["plot"] = {"file": plot, **plots.hubness_data(document["inputs"])}
    results, ks = document["inputs"], document["k"]
    from rich.columns import Columns  # on first use: see report.py
    from rich.table import Table

    for j, value in enumerate(ks):
        table = Table(title=f"Hubness at k = {value}" + (" (self-matches excluded)" if exclude_self else ""))
        table.add_column("measure")
        for res in results:
            table.add_column(res["name"] + (" (bank)" if res["kind"] == "probe" else ""), justify="right")
        for label, key, fmt in ROWS:
            table.add_row(label, *[fmt.format(res["by_k"][j][key]) for res in results])
        table.add_row("most retrieved", *[_top(res["by_k"][j]["top_items"]) for res in results])
        table.add_row("queries × items", *[f"{res['queries']} × {res['gallery_rows']}" for res in results])
        report.table(table)
        report.table(Columns([_histogram(res["name"], value, occurrences[i][value]) for i, res in enumerate(results)]))
    if output is not None:
        report.info(f"wrote {output}: hubness of {len(results)} input(s) at k = {', '.join(map(str, ks))}")
    if plot is not None:
        report.info(f"wrote {plot}: k-occurrence distributions of {len(results)} input(s)")
    report.cluster(document.get("cluster"))
    report.result(document)


def _top(items: list[dict], n: int = 3) -> str:
    return ", ".join(f"{t['item']} ({t['nk']})" for t in items[:n])
