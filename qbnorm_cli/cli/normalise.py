"""qbnorm normalise: re-score queries against the gallery with a probe's statistics."""

from __future__ import annotations

from typing import Annotated

import typer

from qbnorm_cli import api, methods
from qbnorm_cli.cli import options, shared
from qbnorm_cli.cli.report import Reporter
from qbnorm_cli.io.probefile import Probe


@shared.budget
@shared.clustered
@shared.overwriting
@shared.reporting
@shared.method_parameters
def command(
    ctx: typer.Context,
    output: options.Output,
    probe: Annotated[str, typer.Option("--probe", help="Probe file from `qbnorm probe`.")],
    queries: Annotated[str | None, typer.Option("--queries", help="Query embeddings.")] = None,
    gallery: Annotated[str | None, typer.Option("--gallery", help="Gallery embeddings (the probed gallery).")] = None,
    sims: Annotated[str | None, typer.Option("--sims", help="Precomputed query × gallery scores, instead of --queries/--gallery.")] = None,
    method: Annotated[str | None, typer.Option("--method", metavar="|".join(methods.METHODS), help=f"Normaliser (see below; default {methods.DEFAULT.name}).")] = None,
    *,
    params: dict,
    top_k: Annotated[int | None, typer.Option("--top-k", metavar="N", help="Write the N best items per query (a ranking file) instead of all scores.")] = None,
    params_file: Annotated[str | None, typer.Option("--params", metavar="PARAMS.json", help="Settings from `qbnorm tune` (explicit options override).")] = None,
    transpose: options.Transpose = False,
    similarity: Annotated[str | None, typer.Option("--similarity", metavar="cosine|dot", help="Default: as the probe.")] = None,
    dtype: Annotated[str, typer.Option("--dtype", metavar="float32|float64", help="Type of the written scores.")] = "float32",
    memory: str,
    block_rows: int | None,
    cluster: api.Cluster | None,
    force: bool,
    accept_mismatch: options.AcceptMismatch = False,
    report: Reporter,
) -> None:
    """Normalise query × gallery similarities with a probe's querybank statistics.

    Scores of the inverted-softmax methods are log-domain (β·S − log-normaliser): compare them
    within a row, not across rows. Rows that a dynamic method leaves alone keep raw scores.

    --transpose reads --sims transposed: a t2v dump (captions × items) is normalised in the v2t
    direction, the items as queries (output items × captions; evaluate it with --transpose
    --direction v2t).

    Example: qbnorm normalise --queries q.h5 --gallery g.h5 --probe probe.h5 -o dis.h5 --method dis

    Example: qbnorm normalise --queries q.h5 --gallery g.h5 --probe probe.h5 -o sn.h5 --method sn --beta 100 --top-k 100
    """
    tuned = api.load_params(params_file) if params_file else None
    chosen = options.with_params(tuned, method=method, **params)
    chosen["method"] = chosen["method"] or methods.DEFAULT.name
    with report.capture(), Probe.load(probe) as probed:
        written = api.normalise(
            queries, gallery, probed, **chosen, top_k=top_k, sims=sims, transpose=transpose, similarity=similarity, dtype=dtype, memory=memory, block_rows=block_rows,
            output=output, force=force,
            accept_mismatch=accept_mismatch, progress=report.progress, provenance=options.provenance(ctx),
            extra_params={"params_file": params_file}, tuned=tuned, cluster=cluster)
    n_rows, done = len(written.normalised), int(written.normalised.sum())
    report.info(f"wrote {output}: {written.kind} of {n_rows} queries, method {written.params['method']}; "
                f"{done} of {n_rows} rows normalised")
    report.cluster(written.cluster)
    report.result({
        "output": output, "kind": written.kind, "uuid": written.uuid, "method": written.params["method"],
        "queries": n_rows, "gallery_rows": int(probed.n_gallery), "normalised_rows": done,
        "normalised_share": float(written.normalised.mean()), "params": written.params,
        **({"cluster": written.cluster} if written.cluster else {}),
    })


command.__doc__ += "\n\nMethods:\n\n" + methods.help_text()
