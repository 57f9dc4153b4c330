"""qbnorm hubness: k-occurrence and hubness measures of score, ranking or probe files."""

from __future__ import annotations

from typing import Annotated

import typer

from qbnorm_cli import api, plots
from qbnorm_cli.api.evaluation import DEFAULT_K
from qbnorm_cli.cli import options
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
    ("Robin Hood", "robin_hood", "{:.3f}"),
    ("Gini", "gini", "{:.3f}"),
    ("Atkinson (ε=0.5)", "atkinson", "{:.3f}"),
    ("anti-hub rate", "antihub_rate_pct", "{:.2f} %"),
    ("hub occurrence", "hub_occurrence_pct", "{:.2f} %"),
    ("groupie ratio", "groupie_ratio", "{:.4f}"),
    ("max N_k", "max_nk", "{}"),
    ("coverage", "coverage_pct", "{:.1f} %"),
)


def command(
    ctx: typer.Context,
    scores: Annotated[list[str], typer.Argument(metavar="SCORES", help="Similarity, ranking or probe files: PATH or PATH::/dataset.")],
    k: Annotated[list[int] | None, typer.Option("--k", metavar="K", help="Neighbourhood size(s) (repeatable; default 10).")] = None,
    exclude_self: Annotated[bool, typer.Option("--exclude-self", help="Ignore the diagonal of a square gallery × gallery matrix.")] = False,
    transpose: options.Transpose = False,
    plot: options.Plot = None,
    output: Annotated[str | None, typer.Option("--output", "-o", metavar="OUT.h5", help="Write the k-occurrences and measures (kind hubness).")] = None,
    memory: options.Memory = options.DEFAULT_MEMORY_TEXT,
    block_rows: options.BlockRows = None,
    cluster: options.Cluster = None,
    force: options.Force = False,
    json_output: options.Json = False,
    quiet: options.Quiet = False,
    allow_external: options.AllowExternal = False,
    max_output: options.MaxOutput = options.DEFAULT_MAX_OUTPUT_TEXT,
) -> None:
    """Hubness of retrieval results: k-skewness, Robin Hood, Gini, Atkinson, anti-hubs, hubs.

    N_k(j) counts the queries that have gallery item j among their k best. A probe file gives the
    bank-side view (its bank queries' top items) and the coverage of the DIS activation set.

    --plot draws the distribution of N_k of each input on shared log-log axes (N_k on x, the
    number of items on y; one panel per k), skewness in the legend.

    Example: qbnorm hubness raw.h5 dis.h5 --k 1 --k 10 --plot hubness.png
    """
    report = Reporter(json_output, quiet)
    if plot is not None:
        plots.check_plot_target(plot, force=force, inputs=scores, what="hubness --plot")
    with report.capture():
        document = api.hubness_report(scores, k=k or [DEFAULT_K], exclude_self=exclude_self, transpose=transpose,
                                      memory=memory, block_rows=block_rows, output=output, force=force,
                                      progress=report.progress, provenance=options.provenance(ctx), cluster=cluster)
    occurrences = document.pop("occurrences")
    if plot is not None:
        plots.save_figure(plots.hubness_figure(document["inputs"]), plot, force=force, inputs=scores)
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
