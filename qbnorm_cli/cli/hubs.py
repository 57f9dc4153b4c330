"""qbnorm hubs: which gallery items are hubs, and an alert for a cron job (--fail-over)."""

from __future__ import annotations

import math
from typing import Annotated

import typer

from qbnorm_cli import api
from qbnorm_cli.api.evaluation import DEFAULT_K
from qbnorm_cli.api.hubs import DEFAULT_ITEMS
from qbnorm_cli.cli import options, shared
from qbnorm_cli.cli.report import Reporter
from qbnorm_cli.core.hubscore import DEFAULT_THRESHOLD
from qbnorm_cli.errors import GateFailure, UsageError

LABEL_WIDTH = 60
NAMED = 10  # items named per input in the --fail-over message


@shared.budget
@shared.clustered
@shared.overwriting
@shared.reporting
def command(
    ctx: typer.Context,
    inputs: Annotated[list[str], typer.Argument(metavar="INPUT", help="A probe file (the bank's view) and/or similarity or ranking files (the test queries' view) of one gallery.")],
    k: Annotated[int, typer.Option("--k", metavar="K", help=f"Neighbourhood of N_k (default {DEFAULT_K}).")] = DEFAULT_K,
    items: Annotated[int, typer.Option("--items", metavar="N", help=f"List the N highest-scoring items per input (default {DEFAULT_ITEMS}).")] = DEFAULT_ITEMS,
    labels: Annotated[str | None, typer.Option("--labels", metavar="DATASET", help="Text of each gallery item: PATH::/dataset of strings (e.g. data.h5::/text/gallery) or a text file, one line per item.")] = None,
    fail_over: Annotated[float | None, typer.Option("--fail-over", metavar="Z", help=f"Exit 4 when any item's hub score is above Z, naming the items (also the flag threshold; default threshold {DEFAULT_THRESHOLD:g}).")] = None,
    beta: Annotated[float | None, typer.Option("--beta", metavar="B", help="The probe's β whose log-normaliser scores the bank's view (default: its only β, or 20).")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", metavar="OUT.h5", help="Write every item's hub score and N_k (kind hubs).")] = None,
    *,
    memory: str,
    block_rows: int | None,
    cluster: api.Cluster | None,
    force: bool,
    report: Reporter,
) -> None:
    """A hub audit: the gallery items that sit near too many queries, per input.

    A probe gives the bank's view (no test queries needed): its hub score is the robust z-score of
    each item's log-normaliser LSE_b(β·P[b, j]), a soft count of the bank queries near it that other
    hubs cannot push down. A similarity or ranking file gives the test queries' view: the robust
    z-score of log(1 + N_k). Listed per item: the hub score, N_k, the share of queries whose top k
    hold it, and, beside a raw input, its place there. Items scoring above the threshold are
    flagged; with --fail-over Z the run exits 4 when any item scores above Z.

    Example: qbnorm hubs probe.h5 raw.h5 dis.h5 --labels data.h5::/text/gallery

    Example (cron): qbnorm hubs probe.h5 --fail-over 6 --quiet || mail -s "hub alert" me
    """
    if fail_over is not None and not math.isfinite(fail_over):
        raise UsageError(f"--fail-over {fail_over}: must be a finite number")
    threshold = DEFAULT_THRESHOLD if fail_over is None else fail_over
    with report.capture():
        document = api.hubs_report(inputs, k=k, items=items, labels=labels, threshold=threshold, beta=beta,
                                   memory=memory, block_rows=block_rows, output=output, force=force,
                                   progress=report.progress, provenance=options.provenance(ctx),
                                   cluster=cluster)
    from rich.table import Table  # on first use: see report.py
    from rich.text import Text

    for view in document["inputs"]:
        title = (f"Hubs of {view['name']} ({'bank' if view['kind'] == 'probe' else 'queries'}: {view['queries']} × "
                 f"{view['gallery_rows']} items; score of {view['basis']}; {len(view['flagged'])} above "
                 f"{document['threshold']:g})")
        table = Table(title=Text(title))
        for name in ("#", "item", "hub score", f"N_{document['k']}", "share"):
            table.add_column(name, justify="right")
        compared = any("rank_change" in item for item in view["items"])
        if compared:
            table.add_column(f"# in {document['reference']}", justify="right")
        if document["labels"] is not None:
            table.add_column("label", max_width=LABEL_WIDTH, overflow="ellipsis", no_wrap=True)
        for item in view["items"][:max(items, len(view["flagged"]))]:
            row = [str(item["rank"]), str(item["index"]), f"{item['hub_score']:.2f}", str(item["n_k"]),
                   f"{100 * item['share']:.1f} %"]
            if compared:
                row.append(str(item["reference_rank"]))
            if document["labels"] is not None:
                row.append(Text(item["label"]))  # as written: a label's [brackets] are not markup
            style = "bold" if item["hub_score"] > document["threshold"] else None
            table.add_row(*row, style=style)
        report.table(table)
    if output is not None:
        report.info(f"wrote {output}: hub scores of {len(document['inputs'])} input(s)")
    report.cluster(document.get("cluster"))
    report.result(document)
    if fail_over is not None:
        alarms = [_alarm(view, fail_over) for view in document["inputs"] if view["flagged"]]
        if alarms:
            raise GateFailure("hub alert: " + "; ".join(alarms))


def _alarm(view: dict, limit: float) -> str:
    """'probe: 3 items score above 6 (hub score): 1003 (41.2), 1001 (38.0), 1007 (12.9)'."""
    scores = {item["index"]: item["hub_score"] for item in view["items"]}
    named = ", ".join(f"{j} ({scores[j]:.1f})" for j in view["flagged"][:NAMED])
    more = f" and {len(view['flagged']) - NAMED} more" if len(view["flagged"]) > NAMED else ""
    return f"{view['name']}: {len(view['flagged'])} item(s) score above {limit:g}: {named}{more}"
