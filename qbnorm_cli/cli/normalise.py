"""qbnorm normalise: re-score queries against the gallery with a probe's statistics."""

from __future__ import annotations

from typing import Annotated

import typer

from qbnorm_cli import api, methods
from qbnorm_cli.cli import options
from qbnorm_cli.cli.report import Reporter
from qbnorm_cli.io.probefile import Probe


def command(
    ctx: typer.Context,
    output: options.Output,
    probe: Annotated[str, typer.Option("--probe", help="Probe file from `qbnorm probe`.")],
    queries: Annotated[str | None, typer.Option("--queries", help="Query embeddings.")] = None,
    gallery: Annotated[str | None, typer.Option("--gallery", help="Gallery embeddings (the probed gallery).")] = None,
    sims: Annotated[str | None, typer.Option("--sims", help="Precomputed query × gallery scores, instead of --queries/--gallery.")] = None,
    method: Annotated[str | None, typer.Option("--method", metavar="|".join(methods.METHODS), help=f"Normaliser (see below; default {methods.DEFAULT.name}).")] = None,
    beta: Annotated[float | None, typer.Option("--beta", help=f"β (β₁ for dual methods; {methods.PARAMETERS['beta'].range_text}); default: the probe's.")] = None,
    k: Annotated[int | None, typer.Option("--k", help="Activation set: items in the top-k of a bank query (default 1).")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", metavar="N", help="Write the N best items per query (a ranking file) instead of all scores.")] = None,
    gallery_beta: Annotated[float | None, typer.Option("--gallery-beta", help=f"β₂ for the gallery bank (dual methods; {methods.PARAMETERS['gallery_beta'].range_text}).")] = None,
    topk_mean: Annotated[int | None, typer.Option("--topk-mean", metavar="K", help="K of the mean-of-top-K statistics (default: the method's).")] = None,
    alpha: Annotated[float | None, typer.Option("--alpha", help=f"Weight α of the gallery offset ({methods.PARAMETERS['alpha'].range_text}; default {methods.PARAMETERS['alpha'].default:g}).")] = None,
    min_count: options.MinCount = None,
    lam: options.Lam = None,
    gamma: options.Gamma = None,
    mp: options.MpKind = None,
    params_file: Annotated[str | None, typer.Option("--params", metavar="PARAMS.json", help="Settings from `qbnorm tune` (explicit options override).")] = None,
    transpose: options.Transpose = False,
    similarity: Annotated[str | None, typer.Option("--similarity", metavar="cosine|dot", help="Default: as the probe.")] = None,
    dtype: Annotated[str, typer.Option("--dtype", metavar="float32|float64", help="Type of the written scores.")] = "float32",
    memory: options.Memory = options.DEFAULT_MEMORY_TEXT,
    block_rows: options.BlockRows = None,
    cluster: options.Cluster = None,
    cluster_security: options.ClusterSecurity = None,
    force: options.Force = False,
    accept_mismatch: options.AcceptMismatch = False,
    json_output: options.Json = False,
    quiet: options.Quiet = False,
    progress_mode: options.Progress = options.DEFAULT_PROGRESS,
    allow_external: options.AllowExternal = False,
    max_output: options.MaxOutput = options.DEFAULT_MAX_OUTPUT_TEXT,
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
    report = Reporter(json_output, quiet, progress_mode)
    tuned = api.load_params(params_file) if params_file else None
    chosen = options.with_params(tuned, method=method, beta=beta, k=k, gallery_beta=gallery_beta,
                                 topk_mean=topk_mean, alpha=alpha, min_count=min_count, lam=lam,
                                 gamma=gamma, mp=mp)
    chosen["method"] = chosen["method"] or methods.DEFAULT.name
    with report.capture(), Probe.load(probe) as probed:
        written = api.normalise(
            queries, gallery, probed, **chosen, top_k=top_k, sims=sims, transpose=transpose, similarity=similarity, dtype=dtype, memory=memory, block_rows=block_rows,
            output=output, force=force,
            accept_mismatch=accept_mismatch, progress=report.progress, provenance=options.provenance(ctx),
            extra_params={"params_file": params_file}, tuned=tuned, cluster=options.on_cluster(cluster, cluster_security))
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
