"""qbnorm tune: choose the normaliser and its parameters on a validation split."""

from __future__ import annotations

from typing import Annotated

import typer

from qbnorm_cli import api, methods, plots
from qbnorm_cli.api.tuning import best_per_method
from qbnorm_cli.cli import options, shared
from qbnorm_cli.cli.report import Reporter
from qbnorm_cli.core import scale
from qbnorm_cli.errors import QbnormError
from qbnorm_cli.io.paramsfile import PARAMS_KIND


@shared.budget
@shared.overwriting
@shared.reporting
@shared.tried_parameters
def command(
    ctx: typer.Context,
    output: Annotated[str, typer.Option("--output", "-o", metavar="PARAMS.json", help="Where to write the chosen settings (JSON).")],
    gt: Annotated[str, typer.Option("--gt", help="Validation ground truth: (Q,) gallery indices, or (Q, m) with −1 padding.")],
    queries: Annotated[str | None, typer.Option("--queries", help="Validation query embeddings.")] = None,
    gallery: Annotated[str | None, typer.Option("--gallery", help="Validation gallery embeddings.")] = None,
    sims: Annotated[str | None, typer.Option("--sims", help="Precomputed validation query × gallery scores, instead of --queries/--gallery.")] = None,
    bank: Annotated[str | None, typer.Option("--bank", help="Query bank embeddings (training queries, not the validation ones).")] = None,
    bank_sims: Annotated[str | None, typer.Option("--bank-sims", help="Precomputed bank × validation-gallery scores.")] = None,
    gallery_bank: Annotated[str | None, typer.Option("--gallery-bank", help="Gallery-modality bank embeddings (enables dual-is, dual-dis).")] = None,
    gallery_bank_sims: Annotated[str | None, typer.Option("--gallery-bank-sims", help="Precomputed gallery-bank × validation-gallery scores.")] = None,
    bank_gallery_bank_sims: Annotated[str | None, typer.Option("--bank-gallery-bank-sims", help="Precomputed bank × gallery-bank scores (dbsn without embeddings).")] = None,
    metric: Annotated[str, typer.Option("--metric", metavar="geom|R@1|R@5|R@10|MdR", help="What to maximise (MdR: minimise); geom = geometric mean of R@1, R@5, R@10.")] = "geom",
    methods_text: Annotated[str | None, typer.Option("--methods", metavar="M,M,…", help=f"Methods to try (default {','.join(m.name for m in methods.METHODS.values() if m.tuned and not m.dual)} and, with a gallery bank, {','.join(m.name for m in methods.METHODS.values() if m.tuned and m.dual)}; others on request).")] = None,
    *,
    tried: dict,
    show_all: Annotated[bool, typer.Option("--all", help="Show every setting, not the best of each method.")] = False,
    plot: options.Plot = None,
    similarity: options.Similarity = "cosine",
    memory: str,
    block_rows: int | None,
    force: bool,
    report: Reporter,
) -> None:
    """Evaluate methods × β × k … on validation data and write the best settings as JSON.

    One probe pass computes the statistics of every setting (with sn or dbsn in the grid, then the
    Sinkhorn iterations of each of their β: one more pass over the bank scores per iteration); each
    setting is then one streamed normalise of the validation scores. Apply the result to the test split with
    `probe --params PARAMS.json` and `normalise --params PARAMS.json`.

    --plot draws the validation metric against β (or the method's own parameter) for each method,
    one line per value of its other parameters, the chosen setting starred.

    Example: qbnorm tune --queries D::/val_queries --gallery D::/val_gallery --gt D::/val_gt --bank bank.h5 -o params.json
    """
    if plot is not None:
        plots.check_plot_target(plot, force=force, inputs=[i for i in (queries, gallery, sims, bank, gt) if i],
                                what="tune --plot")
    names = [m.strip() for m in methods_text.split(",") if m.strip()] if methods_text is not None else None
    with report.capture():
        result = api.tune(queries, gallery, gt, bank, sims=sims, bank_sims=bank_sims, gallery_bank=gallery_bank,
                          gallery_bank_sims=gallery_bank_sims, bank_gallery_bank_sims=bank_gallery_bank_sims,
                          metric=metric, methods=names, **tried, similarity=similarity, memory=memory, block_rows=block_rows,
                          output=output, force=force, progress=report.progress, provenance=options.provenance(ctx))
    ranked, best, raw, metric_name = result["ranked"], result["best"], result["raw"], result["metric"]
    shown = ranked if show_all else best_per_method(ranked)
    stats = result["scores"]
    from rich.table import Table  # on first use: see report.py

    table = Table(title=f"tune: {len(result['settings'])} settings on {result['queries']} validation queries × "
                        f"{result['gallery_rows']} items, sorted by {metric_name}",
                  caption=f"bank scores: {scale.describe(stats)}; "
                          + ("every setting" if show_all else "best setting of each method (--all: every one)"))
    table.add_column("setting", no_wrap=True)
    for name in ("R@1", "R@5", "R@10", "MdR", "GeomR"):
        table.add_column(name, justify="right")
    table.add_column("normalised %", justify="right")
    for row in shown:
        m = row["metrics"]
        table.add_row(row["setting"].label(), *(f"{m[n]:.2f}" for n in ("R@1", "R@5", "R@10")),
                      f"{m['MdR']:g}", f"{m['GeomR']:.2f}", f"{m['normalised']:.0f}")
    report.table(table)
    if result["note"] is not None:
        report.info(f"note: {QbnormError(result['note']).render(options.FLAG_NAMES)}")
    gain = best["metrics"][metric_name] - raw[metric_name]
    report.info(f"wrote {output}: {best['setting'].label()} ({metric_name} {best['metrics'][metric_name]:.2f}, "
                f"raw {raw[metric_name]:.2f}, {gain:+.2f}); apply with probe/normalise --params {output}")
    if plot is not None:
        plots.save_figure(plots.tuning_figure(result), plot, force=force)
        report.info(f"wrote {plot}: validation {metric_name} of {len(result['settings'])} settings")
    report.result({
        **({"plot": {"file": plot, **plots.tuning_data(result)}} if plot is not None else {}),
        "output": output, "kind": PARAMS_KIND, "metric": metric_name,
        "best": {**best["setting"].as_dict(), "metrics": best["metrics"]}, "raw": raw,
        "score_scale": result["score_scale"], "scores": stats.as_dict(), "bank": result["bank"],
        "settings": [{**r["setting"].as_dict(), "metrics": r["metrics"]} for r in ranked],
    })
