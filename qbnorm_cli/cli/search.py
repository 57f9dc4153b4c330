"""qbnorm search: run queries against an export, the dynamic gate built in, into a ranking file."""

from __future__ import annotations

from typing import Annotated

import typer

from qbnorm_cli import api
from qbnorm_cli.cli import options, shared
from qbnorm_cli.cli.report import Reporter


@shared.budget
@shared.overwriting
@shared.reporting
def command(
    ctx: typer.Context,
    index: Annotated[str, typer.Option("--index", metavar="EXPORT", help="An export from `qbnorm export` (HDF5 file, or npy/faiss/lancedb directory).")],
    queries: Annotated[str, typer.Option("--queries", help="Query embeddings (as the gallery was embedded).")],
    top_k: Annotated[int, typer.Option("--top-k", metavar="N", help="Items per query.")],
    output: options.Output,
    check_recall: Annotated[float | None, typer.Option("--check-recall", metavar="FRACTION", help="Compare a seeded sample of this share of the queries with the exact normalised ranking: recall@N.")] = None,
    backend: Annotated[str | None, typer.Option("--backend", metavar="numpy|faiss|lancedb", help="HDF5/npy exports: exact numpy (default) or an exact faiss index built in memory.")] = None,
    nprobe: Annotated[int | None, typer.Option("--nprobe", metavar="N", help="IVF: lists probed per query (default: the export's).")] = None,
    ef_search: Annotated[int | None, typer.Option("--ef-search", metavar="N", help="HNSW: candidate list while searching (default: the export's).")] = None,
    row_term: Annotated[bool, typer.Option("--row-term", help="Include the method's per-query row term (CSLS's r_q) in the scores: one more raw search; rankings do not change.")] = False,
    dtype: Annotated[str, typer.Option("--dtype", metavar="float32|float64", help="Type of the written scores.")] = "float32",
    *,
    memory: str,
    block_rows: int | None,
    force: bool,
    report: Reporter,
) -> None:
    """Search an export: each query's N best gallery items under the exported method.

    Queries [q, 0] give the raw ranking (its top-1 decides a dynamic gate), [q, c] the normalised
    one, from the same index: 1 + (gated share) searches per query, 1 for offset methods. The
    output is a ranking file like `normalise --top-k N` writes (scores in η units), so `evaluate`
    and `hubness` read it unchanged.

    Example: qbnorm search --index dis.index --queries q.h5 --top-k 100 -o dis-top100.h5 --check-recall 0.05
    """
    with report.capture():
        written = api.search(index, queries, top_k=top_k, check_recall=check_recall, backend=backend, nprobe=nprobe,
                             ef_search=ef_search, row_term=row_term, dtype=dtype, memory=memory,
                             block_rows=block_rows, output=output, force=force, progress=report.progress,
                             provenance=options.provenance(ctx))
    n_rows, done = len(written.normalised), int(written.normalised.sum())
    recall = written.recall
    measured = "" if recall is None else (f"; recall@{recall['recall_at']} {recall['recall']:.4f} on "
                                          f"{recall['queries']} sampled queries (worst {recall['min']:.2f})")
    report.info(f"wrote {output}: ranking of {n_rows} queries, method {written.params['method']}; {done} of "
                f"{n_rows} rows normalised; {written.searches_per_query:.3g} index searches per query{measured}")
    report.result({"output": output, "kind": written.kind, "uuid": written.uuid, "method": written.params["method"],
                   "queries": n_rows, "normalised_rows": done, "normalised_share": done / n_rows if n_rows else 0.0,
                   "searches_per_query": written.searches_per_query, "recall": recall, "params": written.params})
