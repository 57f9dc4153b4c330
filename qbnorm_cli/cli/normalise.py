"""qbnorm normalise: re-score queries against the gallery with a probe's statistics."""

from __future__ import annotations

from typing import Annotated

import numpy as np
import typer

from qbnorm_cli import tuning_tmp as tn
from qbnorm_cli.cli import options as common
from qbnorm_cli.core import normalisers as nz
from qbnorm_cli.core import scale
from qbnorm_cli.errors import DataError, UsageError
from qbnorm_cli.io.files import EMBEDDING_KINDS, OutputFile, open_array, open_qbnorm
from qbnorm_cli.io.probefile import DEFAULT_ALPHA, DEFAULT_TOPK, Probe, build_normaliser
from qbnorm_cli.streaming.engine import SIMILARITIES, Embeddings, EmbeddingScores, MatrixScores, run_normalise

METHODS_HELP = "\n\n".join(f"{name}: {text}" for name, text in nz.METHOD_HELP.items())


def command(
    output: common.Output,
    probe: Annotated[str, typer.Option("--probe", help="Probe file from `qbnorm probe`.")],
    queries: Annotated[str | None, typer.Option("--queries", help="Query embeddings.")] = None,
    gallery: Annotated[str | None, typer.Option("--gallery", help="Gallery embeddings (the probed gallery).")] = None,
    sims: Annotated[str | None, typer.Option("--sims", help="Precomputed query × gallery scores, instead of --queries/--gallery.")] = None,
    method: Annotated[str | None, typer.Option("--method", metavar="|".join(nz.METHODS), help="Normaliser (see below; default dis).")] = None,
    beta: Annotated[float | None, typer.Option("--beta", help="β (β₁ for dual methods); default: the probe's.")] = None,
    k: Annotated[int | None, typer.Option("--k", help="Activation set: items in the top-k of a bank query (dis, dual-dis; default 1).")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", metavar="N", help="Write the N best items per query (a ranking file) instead of all scores.")] = None,
    gallery_beta: Annotated[float | None, typer.Option("--gallery-beta", help="β₂ for the gallery bank (dual methods).")] = None,
    topk_mean: Annotated[int | None, typer.Option("--topk-mean", metavar="K", help="K of the mean-of-top-K statistics (csls default 10, nnn default 128).")] = None,
    alpha: Annotated[float | None, typer.Option("--alpha", help=f"NNN weight α (default {DEFAULT_ALPHA:g}).")] = None,
    params_file: Annotated[str | None, typer.Option("--params", metavar="PARAMS.json", help="Settings from `qbnorm tune` (explicit options override).")] = None,
    similarity: Annotated[str | None, typer.Option("--similarity", metavar="cosine|dot", help="Default: as the probe.")] = None,
    dtype: Annotated[str, typer.Option("--dtype", metavar="float32|float64", help="Type of the written scores.")] = "float32",
    memory: common.Memory = common.DEFAULT_MEMORY_TEXT,
    block_rows: common.BlockRows = None,
    force: common.Force = False,
    json_output: common.Json = False,
    quiet: common.Quiet = False,
) -> None:
    """Normalise query × gallery similarities with a probe's querybank statistics.

    Scores of is/dis and the dual methods are log-domain (β·S − log-normaliser): compare them
    within a row, not across rows. Rows that a dynamic method leaves alone keep raw scores.

    Example: qbnorm normalise --queries q.h5 --gallery g.h5 --probe probe.h5 -o dis.h5 --method dis
    """
    report = common.reporter(json_output, quiet)
    budget = common.budget(memory, block_rows)
    tuned = tn.load_params(params_file) if params_file else None
    if tuned is not None:  # explicit options win; a method ignores the parameters it does not use
        method = method or tuned["method"]
        beta = beta if beta is not None else tuned["beta"]
        k = k if k is not None else tuned["k"]
        gallery_beta = gallery_beta if gallery_beta is not None else tuned["gallery_beta"]
        topk_mean = topk_mean if topk_mean is not None else tuned["topk_mean"]
        alpha = alpha if alpha is not None else tuned["alpha"]
    method = method or "dis"
    k = 1 if k is None else k
    alpha = DEFAULT_ALPHA if alpha is None else alpha
    common.check_choice(method, nz.METHODS, "--method")
    common.check_choice(dtype, ("float32", "float64"), "--dtype")
    if not np.isfinite(alpha):
        raise UsageError(f"--alpha {alpha}: must be finite")
    probe_file = Probe(open_qbnorm(probe, "probe"))
    n_gallery = probe_file.n_gallery

    scores, inputs, gallery_identity, similarity = _open_scores(
        probe_file, queries, gallery, sims, similarity, budget, ranked=top_k is not None)
    probed = probe_file.attrs.get("gallery_identity")
    if probed and gallery_identity and probed != gallery_identity and not force:
        raise DataError(f"{probe} was made from another gallery than {inputs[-1].label} "
                        "(identity differs); pass --force to use it anyway")
    if tuned is not None and (warning := tn.tuned_on_warning(params_file, tuned, inputs)) is not None:
        report.warn(warning)

    if top_k is not None:
        common.check_count(top_k, "--top-k", n_gallery, "gallery size")
    common.check_count(k, "--k", n_gallery, "gallery size")
    if beta is None:
        beta = probe_file.default_beta() if method in tn.BETA_METHODS else None
    else:
        common.check_beta(beta)
    if gallery_beta is not None:
        common.check_beta(gallery_beta, "--gallery-beta")
    elif method.startswith("dual"):
        gallery_beta = probe_file.default_gallery_beta()
    if method in ("csls", "nnn"):
        topk_mean = topk_mean or DEFAULT_TOPK[method]
        common.check_count(topk_mean, "--topk-mean", n_gallery if method == "csls" else 10**12, "gallery size")
    score_scale = _scale_warnings(report, probe_file, method, beta, gallery_beta, scores)
    norm = build_normaliser(probe_file, method, beta=beta, k=k, gallery_beta=gallery_beta,
                            topk_k=topk_mean, alpha=alpha)

    params = {
        "method": method, "beta": beta, "k": k, "top_k": top_k, "gallery_beta": gallery_beta if method.startswith("dual") else None, "topk_mean": topk_mean if method in ("csls", "nnn") else None,
        "alpha": alpha if method == "nnn" else None, "similarity": similarity, "dtype": dtype,
        "probe_uuid": probe_file.attrs.get("uuid"), "memory": budget.memory, "block_rows": block_rows,
        "params_file": params_file,
    }
    n_rows = scores.n_rows
    kind = "similarity" if top_k is None else "ranking"
    inputs = [*inputs, {"path": probe, "dataset": None, "kind": "probe", "uuid": probe_file.attrs.get("uuid")}]
    with OutputFile(output, kind, force=force, params=params, inputs=inputs) as out:
        width = n_gallery if top_k is None else top_k
        score_ds = out.create("/scores", shape=(n_rows, width), dtype=dtype)
        neigh_ds = out.create("/neighbors", shape=(n_rows, width), dtype=np.int32) if top_k else None
        normalised = np.zeros(n_rows, dtype=bool)
        with report.progress("normalise", n_rows * n_gallery, per=n_gallery) as advance:
            for q0, (values, indices, gated) in run_normalise(scores, norm, budget, top_k, progress=advance, dtype=np.dtype(dtype)):
                out.write_rows(score_ds, q0, values.astype(dtype, copy=False))
                if neigh_ds is not None:
                    out.write_rows(neigh_ds, q0, indices.astype(np.int32))
                normalised[q0:q0 + len(gated)] = gated
                del values, indices  # freed while the next block is computed
        out.create("/normalised", data=normalised)
        attrs = out.h5.attrs
        attrs["method"] = method
        if score_scale:
            attrs["score_scale"] = score_scale
        attrs["gallery_rows"] = n_gallery
        if gallery_identity:
            attrs["gallery_identity"] = gallery_identity
        if method in ("is", "dis", "dual-is", "dual-dis"):
            attrs["score_domain"] = "log (compare within a row)"

    summary = {
        "output": output, "kind": kind, "uuid": out.uuid, "method": method, "queries": n_rows,
        "gallery_rows": n_gallery, "normalised_rows": int(normalised.sum()),
        "normalised_share": float(normalised.mean()), "params": params,
    }
    report.info(f"wrote {output}: {kind} of {n_rows} queries, method {method}; "
                f"{int(normalised.sum())} of {n_rows} rows normalised")
    report.result(summary)


command.__doc__ += "\n\nMethods:\n\n" + METHODS_HELP


def _open_scores(probe_file: Probe, queries, gallery, sims, similarity, budget, ranked: bool):
    """The query × gallery scores to normalise: (scores, inputs, gallery identity, similarity).
    A ranking reads the gallery block by block in its own order (ranking.py), never whole."""
    n_gallery = probe_file.n_gallery
    if sims is not None:
        if queries or gallery:
            raise UsageError("give either --sims or --queries with --gallery, not both")
        sims_in = open_array(sims, kinds=("similarity",))
        if sims_in.cols != n_gallery:
            raise DataError(f"{sims_in.label} has {sims_in.cols} columns but the probe's gallery has {n_gallery} items")
        return MatrixScores(sims_in), [sims_in], sims_in.attrs.get("gallery_identity"), "precomputed"
    if not (queries and gallery):
        raise UsageError("normalise needs --queries and --gallery (or --sims)")
    probe_similarity = probe_file.attrs.get("similarity", "cosine")
    similarity = similarity or (probe_similarity if probe_similarity in SIMILARITIES else "cosine")
    common.check_choice(similarity, SIMILARITIES, "--similarity")
    q_in = open_array(queries, kinds=EMBEDDING_KINDS)
    g_in = open_array(gallery, kinds=EMBEDDING_KINDS)
    if g_in.rows != n_gallery:
        raise DataError(f"{g_in.label} has {g_in.rows} rows but {probe_file.path} was made from a gallery of {n_gallery}")
    scores = EmbeddingScores(Embeddings(q_in, similarity, budget),
                             Embeddings(g_in, similarity, budget, eager=not ranked))
    return scores, [q_in, g_in], g_in.identity, similarity


def _scale_warnings(report, probe_file: Probe, method: str, beta, gallery_beta, scores) -> str | None:
    """Warn when β looks wrong for the bank scores' scale, or the query scores are on another
    scale than the bank's; returns the detected scale to record."""
    probe_stats = scale.ScoreStats.from_attrs(probe_file.attrs)
    score_scale = scale.classify(probe_stats) if probe_stats else None
    if isinstance(scores, MatrixScores) and probe_stats is not None:
        sims_stats = scale.sample_stats(scores.source)
        if scale.classify(sims_stats) != score_scale:
            report.warn(f"{scores.source.label} holds scores {scale.describe(sims_stats)}, but the probe's bank "
                        f"scores are {scale.describe(probe_stats)}; score queries and bank the same way")
    if method in tn.BETA_METHODS and beta is not None and (warning := scale.beta_warning(beta, probe_stats)):
        report.warn(warning)
    if method.startswith("dual") and gallery_beta is not None:
        warning = scale.beta_warning(gallery_beta, scale.ScoreStats.from_attrs(probe_file.attrs, "gallery_"),
                                     "--gallery-beta", check_low=False)
        if warning is not None:
            report.warn(warning)
    return score_scale
