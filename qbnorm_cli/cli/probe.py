"""qbnorm probe: measure the gallery with a querybank once (and optionally a gallery bank)."""

from __future__ import annotations

from typing import Annotated

import typer

from qbnorm_cli import api, methods
from qbnorm_cli.api.probing import sinkhorn_memory
from qbnorm_cli.cli import options, shared
from qbnorm_cli.cli.report import Reporter
from qbnorm_cli.core import scale
from qbnorm_cli.errors import UsageError
from qbnorm_cli.io.paramsfile import missing_bank


@shared.budget
@shared.clustered
@shared.overwriting
@shared.reporting
@shared.probed_parameters
def command(
    ctx: typer.Context,
    output: options.Output,
    bank: Annotated[str | None, typer.Option("--bank", help="Query bank embeddings (from build-bank or any embeddings).")] = None,
    gallery: Annotated[str | None, typer.Option("--gallery", help="Gallery embeddings.")] = None,
    bank_sims: Annotated[str | None, typer.Option("--bank-sims", help="Precomputed bank × gallery scores, instead of --bank/--gallery.")] = None,
    *,
    probed: dict,
    gallery_bank: Annotated[str | None, typer.Option("--gallery-bank", help="Gallery-modality bank embeddings (DBNorm).")] = None,
    gallery_bank_sims: Annotated[str | None, typer.Option("--gallery-bank-sims", help="Precomputed gallery-bank × gallery scores.")] = None,
    params_file: Annotated[str | None, typer.Option("--params", metavar="PARAMS.json", help="Settings from `qbnorm tune`: probe what they need (explicit options override).")] = None,
    method_names: Annotated[list[str] | None, typer.Option("--method", metavar="M", help="Also compute what method M needs at its defaults and each --topk-mean (repeatable): ls, nicdm (the K-th best and mean distance of the K nearest bank queries), mp (score spreads and the gallery's moments; with --keep-sorted, mp --mp empiric too), dsl (bank-centroid distances, from embeddings), gc (--keep-sorted).")] = None,
    keep_sorted: Annotated[bool, typer.Option("--keep-sorted", help="Keep every gallery item's sorted bank scores (O(bank × gallery) storage; needed by gc).")] = False,
    transpose: options.Transpose = False,
    sinkhorn: Annotated[bool, typer.Option("--sinkhorn", help="Also compute the Sinkhorn potentials of each --beta (sn; dbsn's too with --gallery-bank or --bank-gallery-bank-sims): two passes over bank × gallery, then two matrix-vector products over a float32 kernel per iteration, held when it fits half of --memory (4 bytes per bank × gallery score and β: a 20k × 100k bank needs --memory 16GB; recomputed otherwise).")] = False,
    sinkhorn_iters: Annotated[int | None, typer.Option("--sinkhorn-iters", metavar="N", help="Run exactly N Sinkhorn iterations (the paper's truncated runs) instead of iterating to convergence.")] = None,
    sinkhorn_tol: Annotated[float | None, typer.Option("--sinkhorn-tol", metavar="T", help="Stop once the log scalings change by less than T in an iteration (default 1e-6).")] = None,
    sinkhorn_max_iters: Annotated[int | None, typer.Option("--sinkhorn-max-iters", metavar="N", help="At most N iterations to converge (default 1000; a warning when reached).")] = None,
    bank_gallery_bank_sims: Annotated[str | None, typer.Option("--bank-gallery-bank-sims", help="Precomputed bank × gallery-bank scores (rows: bank queries; columns: gallery-bank items), for dbsn without embeddings.")] = None,
    similarity: options.Similarity = "cosine",
    update: Annotated[str | None, typer.Option("--update", metavar="OLD.h5", help="Update this probe instead of probing afresh: --bank and --gallery (and --gallery-bank) are the embeddings it was made from; the result equals a probe of the final gallery and bank.")] = None,
    add_gallery: Annotated[str | None, typer.Option("--add-gallery", metavar="EMB", help="With --update: items appended after the kept gallery rows.")] = None,
    remove_gallery: Annotated[str | None, typer.Option("--remove-gallery", metavar="IDX", help="With --update: a 1-D array of old gallery row numbers to drop (before the additions; the rest keep their order).")] = None,
    add_bank: Annotated[str | None, typer.Option("--add-bank", metavar="EMB", help="With --update: bank queries appended after the old ones.")] = None,
    add_gallery_bank: Annotated[str | None, typer.Option("--add-gallery-bank", metavar="EMB", help="With --update: gallery-bank items appended (the dual methods).")] = None,
    memory: str,
    block_rows: int | None,
    cluster: api.Cluster | None,
    force: bool,
    report: Reporter,
) -> None:
    """Probe the gallery with a querybank: the statistics every normaliser needs, in one pass.

    --transpose reads --bank-sims and --gallery-bank-sims transposed (stored gallery × bank).

    With --sinkhorn, the Sinkhorn potentials of sn (and dbsn) are iterated afterwards: the first
    v-update (from the probe's pass for sn), a pass that builds a float32 kernel (from the pass's
    scores where they are held), then each iteration two matrix-vector products over it,
    accelerated (Anderson) until converged, plain with --sinkhorn-iters. The kernel is held when it
    fits half of --memory (4 bytes per bank × gallery score and β: 10k × 1k needs 80MB, 20k × 100k
    16GB); its blocks that do not fit are recomputed from the scores on every iteration (their
    product again). The iterations run and the final marginal error are recorded.

    Example: qbnorm probe --bank bank.h5 --gallery data.h5::/gallery -o probe.h5 --beta 20 --k 1

    Example (QB-Norm image → caption, bank of gallery-modality items): qbnorm probe --bank-sims
    captions_x_bank.h5 --transpose -o probe_v2t.h5

    Example (the classic reducers): qbnorm probe --bank qb.h5 --gallery G --method ls --method mp --method dsl
    --topk-mean 10 -o p.h5

    Example: qbnorm probe --bank qbank.h5 --gallery-bank gbank.h5 --gallery data.h5::/gallery -o probe.h5 --beta 100 --sinkhorn

    Example (the nightly update): qbnorm probe --update old.h5 --bank qbank.h5 --gallery g.h5 --add-gallery new.h5
    --remove-gallery gone.npy --add-bank logged.h5 -o new_probe.h5
    """
    changes = {"add_gallery": add_gallery, "remove_gallery": remove_gallery, "add_bank": add_bank,
               "add_gallery_bank": add_gallery_bank}
    if update is not None:
        settings = [*(parameter.option for name, parameter in methods.PARAMETERS.items()
                      if parameter.probed and probed[parameter.many or name] not in (None, [])),
                    *(flag for flag, value in (
                        ("--bank-sims", bank_sims), ("--gallery-bank-sims", gallery_bank_sims), ("--params", params_file),
                        ("--method", method_names), ("--keep-sorted", keep_sorted), ("--sinkhorn", sinkhorn),
                        ("--sinkhorn-iters", sinkhorn_iters), ("--sinkhorn-tol", sinkhorn_tol),
                        ("--sinkhorn-max-iters", sinkhorn_max_iters),
                        ("--bank-gallery-bank-sims", bank_gallery_bank_sims), ("--transpose", transpose)) if value)]
        if settings:
            raise UsageError(f"{settings[0]}: an update keeps the settings of the probe it updates (--update {update}); "
                             "probe afresh to change them")
        return _update(ctx, report, update, output, bank, gallery, gallery_bank, changes, memory, block_rows, force,
                       cluster)
    flag = next((f"--{name.replace('_', '-')}" for name, value in changes.items() if value is not None), None)
    if flag is not None:
        raise UsageError(f"{flag} changes an existing probe: add --update OLD.h5")
    tuned = api.load_params(params_file) if params_file else None
    if tuned is not None:  # explicit options win; probe what the tuned setting needs
        method = methods.get(tuned["method"])
        for name, parameter in methods.PARAMETERS.items():
            keyword = parameter.many or name
            if parameter.probed and probed[keyword] in (None, []) and tuned[name] is not None:
                probed[keyword] = [tuned[name]] if parameter.many else tuned[name]
        if method.needs.gallery_bank and not (gallery_bank or gallery_bank_sims):
            raise UsageError(missing_bank(tuned, method.name, ("gallery_bank", "gallery_bank_sims")))
        if method.needs.dual_sinkhorn and not (gallery_bank or bank_gallery_bank_sims):
            raise UsageError(missing_bank(tuned, method.name, ("gallery_bank", "bank_gallery_bank_sims")))
        keep_sorted = keep_sorted or method.needs.sorted_bank
        sinkhorn = sinkhorn or method.needs.sinkhorn or method.needs.dual_sinkhorn
        given = {name: tuned.get(name) for name in method.parameters}
        keep_sorted = keep_sorted or method.needs_for(given).sorted_bank
        method_names = [*(method_names or []), method.name]
    with report.capture():
        result = api.probe(
            bank, gallery, **{name: value for name, value in probed.items() if value not in (None, [])},
            gallery_bank=gallery_bank, keep_sorted=keep_sorted, sinkhorn=sinkhorn, sinkhorn_iters=sinkhorn_iters, sinkhorn_tol=sinkhorn_tol,
            sinkhorn_max_iters=sinkhorn_max_iters, bank_sims=bank_sims, gallery_bank_sims=gallery_bank_sims,
            bank_gallery_bank_sims=bank_gallery_bank_sims, transpose=transpose, similarity=similarity,
            memory=memory, block_rows=block_rows, output=output, force=force, progress=report.progress,
            provenance=options.provenance(ctx), tuned=tuned, cluster=cluster,
            methods=method_names)
    diag = result.diagnostics
    stats = scale.ScoreStats.from_attrs(result.attrs)
    report.info(
        f"wrote {output}: probe of {result.n_gallery} gallery items with {result.n_bank} bank queries; "
        f"activation set (k={diag['k']}) covers {100 * diag['coverage']:.1f}% of the gallery; bank-side k-occurrence "
        f"skewness {diag['occurrence_skewness']:.2f}; bank scores {scale.describe(stats)}"
    )
    runs = {"sinkhorn": result.sinkhorn_runs(), "dual_sinkhorn": result.sinkhorn_runs(dual=True)}
    for name, what in (("sinkhorn", "Sinkhorn"), ("dual_sinkhorn", "dual-bank Sinkhorn")):
        for run in runs[name]:
            state = "converged" if run["converged"] else "stopped"
            where = "kernel held in memory" if run["held"] else "kernel recomputed on every iteration"
            report.info(f"{what} β={run['beta']:g}: {state} after {run['iterations']} iterations (last change "
                        f"{run['change']:.2g}, marginal error {run['marginal_error']:.2g}; {where})")
    if block_rows is None and any(not run["held"] for found in runs.values() for run in found):
        report.info(f"hint: --memory {sinkhorn_memory(result) / 1e9:.3g}GB would hold every Sinkhorn kernel (4 bytes "
                    f"per bank × gallery score and β, in half of --memory)")
    _summary(report, result, output, runs)


def _summary(report: Reporter, result, output: str, runs: dict, extra: dict | None = None) -> None:
    diag = result.diagnostics
    stats = scale.ScoreStats.from_attrs(result.attrs)
    ks_key = methods.by_keyword("topk_means").params_key  # the probe's K, recorded as the probe file does
    report.cluster(result.cluster)
    report.result({
        **(extra or {}),
        "output": output, "kind": "probe", "uuid": result.uuid, "bank_rows": result.n_bank,
        "gallery_rows": result.n_gallery, "betas": result.betas(), "k": result.params["k"],
        ks_key: result.params[ks_key], "coverage": diag["coverage"],
        "occurrence_skewness": diag["occurrence_skewness"], "scores": stats.as_dict(),
        "score_scale": result.attrs["score_scale"], "gallery_bank_rows": int(result.attrs["gallery_bank_rows"]),
        **({name: value for name, value in runs.items() if value} if result.params.get("sinkhorn") else {}),
        **({"cluster": result.cluster} if result.cluster else {}),
    })
    result.close()


def _update(ctx, report: Reporter, old: str, output: str, bank, gallery, gallery_bank, changes: dict, memory,
            block_rows, force: bool, cluster) -> None:
    with report.capture():
        result = api.update_probe(old, bank=bank, gallery=gallery, gallery_bank=gallery_bank, **changes,
                                  memory=memory, block_rows=block_rows, output=output, force=force,
                                  progress=report.progress, provenance=options.provenance(ctx), cluster=cluster)
    done = result.update
    report.info(f"wrote {output}: {old} updated: {done['removed_gallery']} items removed, {done['added_gallery']} "
                f"added, {done['added_bank']} bank queries added ({done['gallery_rows']} items, {done['bank_rows']} "
                f"bank queries; {done['recounted_rows']} bank rows recounted)")
    runs = {"sinkhorn": result.sinkhorn_runs(), "dual_sinkhorn": result.sinkhorn_runs(dual=True)}
    for name, what in (("sinkhorn", "Sinkhorn"), ("dual_sinkhorn", "dual-bank Sinkhorn")):
        for run in runs[name]:
            state = "converged" if run["converged"] else "stopped"
            start = "from the old potentials" if done["sinkhorn_warm_start"] else "cold (a fixed count)"
            report.info(f"{what} β={run['beta']:g}: {state} after {run['iterations']} iterations, started {start}")
    _summary(report, result, output, runs, extra={"update": {"from": old, **done}})
