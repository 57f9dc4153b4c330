"""qbnorm tune: choose the normaliser and its parameters on a validation split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from qbnorm_cli import tuning_tmp as tn
from qbnorm_cli.cli import options as common
from qbnorm_cli.core import scale
from qbnorm_cli.core.statistics import BankAccumulator
from qbnorm_cli.errors import DataError, UsageError
from qbnorm_cli.io import probefile
from qbnorm_cli.io.files import EMBEDDING_KINDS, ArrayInput, open_array
from qbnorm_cli.io.groundtruth import read_relevant
from qbnorm_cli.streaming.engine import SIMILARITIES, Embeddings, EmbeddingScores, MatrixScores, run_probe


def command(
    output: Annotated[str, typer.Option("--output", "-o", metavar="PARAMS.json", help="Where to write the chosen settings (JSON).")],
    gt: Annotated[str, typer.Option("--gt", help="Validation ground truth: (Q,) gallery indices, or (Q, m) with −1 padding.")],
    queries: Annotated[str | None, typer.Option("--queries", help="Validation query embeddings.")] = None,
    gallery: Annotated[str | None, typer.Option("--gallery", help="Validation gallery embeddings.")] = None,
    sims: Annotated[str | None, typer.Option("--sims", help="Precomputed validation query × gallery scores, instead of --queries/--gallery.")] = None,
    bank: Annotated[str | None, typer.Option("--bank", help="Query bank embeddings (training queries, not the validation ones).")] = None,
    bank_sims: Annotated[str | None, typer.Option("--bank-sims", help="Precomputed bank × validation-gallery scores.")] = None,
    gallery_bank: Annotated[str | None, typer.Option("--gallery-bank", help="Gallery-modality bank embeddings (enables dual-is, dual-dis).")] = None,
    gallery_bank_sims: Annotated[str | None, typer.Option("--gallery-bank-sims", help="Precomputed gallery-bank × validation-gallery scores.")] = None,
    metric: Annotated[str, typer.Option("--metric", metavar="geom|R@1|R@5|R@10|MdR", help="What to maximise (MdR: minimise); geom = geometric mean of R@1, R@5, R@10.")] = "geom",
    methods: Annotated[str | None, typer.Option("--methods", metavar="M,M,…", help="Methods to try (default is,dis,csls,nnn and, with a gallery bank, dual-is,dual-dis; gc on request).")] = None,
    beta: Annotated[list[float] | None, typer.Option("--beta", help="β values to try instead of the default grid (repeatable).")] = None,
    gallery_beta: Annotated[list[float] | None, typer.Option("--gallery-beta", help="β₂ values to try for the dual methods (repeatable).")] = None,
    show_all: Annotated[bool, typer.Option("--all", help="Show every setting, not the best of each method.")] = False,
    similarity: common.Similarity = "cosine",
    memory: common.Memory = common.DEFAULT_MEMORY_TEXT,
    block_rows: common.BlockRows = None,
    force: common.Force = False,
    json_output: common.Json = False,
    quiet: common.Quiet = False,
) -> None:
    """Evaluate methods × β × k … on validation data and write the best settings as JSON.

    One probe pass computes the statistics of every setting; each setting is then one streamed
    normalise of the validation scores. Apply the result to the test split with
    `probe --params PARAMS.json` and `normalise --params PARAMS.json`.

    Example: qbnorm tune --queries D::/val_queries --gallery D::/val_gallery --gt D::/val_gt --bank bank.h5 -o params.json
    """
    report = common.reporter(json_output, quiet)
    budget = common.budget(memory, block_rows)
    common.check_choice(metric, tn.METRICS, "--metric")
    common.check_choice(similarity, SIMILARITIES, "--similarity")
    metric_name = tn.METRICS[metric]
    beta = [common.check_beta(b) for b in beta] if beta else None
    gallery_beta = [common.check_beta(b, "--gallery-beta") for b in gallery_beta] if gallery_beta else None

    # Validation scores (queries × gallery), the bank × gallery and gallery-bank × gallery scores.
    inputs: dict[str, ArrayInput] = {}
    gallery_emb = None
    if sims is not None:
        if queries or gallery:
            raise UsageError("give either --sims or --queries with --gallery, not both")
        inputs["sims"] = open_array(sims, kinds=("similarity",))
        val_scores = MatrixScores(inputs["sims"])
    else:
        if not (queries and gallery):
            raise UsageError("tune needs --queries and --gallery (or --sims)")
        inputs["queries"] = open_array(queries, kinds=EMBEDDING_KINDS)
        inputs["gallery"] = open_array(gallery, kinds=EMBEDDING_KINDS)
        gallery_emb = Embeddings(inputs["gallery"], similarity, budget)
        val_scores = EmbeddingScores(Embeddings(inputs["queries"], similarity, budget), gallery_emb)
    n_gallery = val_scores.n_cols
    bank_scores = _bank_scores("bank", bank, bank_sims, gallery_emb, n_gallery, similarity, budget, inputs)
    if bank_scores is None:
        raise UsageError("tune needs --bank (or --bank-sims)")
    gallery_scores = _bank_scores("gallery_bank", gallery_bank, gallery_bank_sims, gallery_emb, n_gallery,
                                  similarity, budget, inputs)
    relevant, inputs["gt"] = _ground_truth(gt, val_scores.n_rows, n_gallery, (sims or gallery))
    target = tn.check_params_target(output, force, list(inputs.values()))
    _warn_overlaps(report, inputs)

    chosen = tn.parse_methods(methods, gallery_scores is not None)
    stats = tn.sample_stats(bank_scores)
    settings = [s for s in tn.grid(chosen, stats, beta, gallery_beta) if (s.k or 1) <= n_gallery]
    needs = tn.Needs.of(settings)
    kmax = max(needs.kmax, 10)
    query_acc = BankAccumulator(bank_scores.n_rows, n_gallery, np.array(needs.betas), kmax, needs.topk_ks,
                                needs.keep_sorted)
    banks = [(bank_scores, query_acc)]
    gallery_acc = None
    if gallery_scores is not None:
        gallery_acc = BankAccumulator(gallery_scores.n_rows, n_gallery, np.array(needs.gallery_betas), kmax)
        banks.append((gallery_scores, gallery_acc))
    sorted_bank = None
    if needs.keep_sorted:
        if not budget.fits(n_gallery * bank_scores.n_rows * 4, 0.5) and budget.block_rows is None:
            raise UsageError(f"--methods gc keeps {n_gallery} × {bank_scores.n_rows} bank scores; raise --memory "
                             "or leave gc out")
        sorted_bank = np.empty((n_gallery, bank_scores.n_rows), dtype=np.float32)

    def on_sorted(number, c0, c1, block):
        if number == 0:
            sorted_bank[c0:c1] = block

    total = sum(s.n_rows for s, _ in banks) * n_gallery
    with report.progress("probe", total, per=n_gallery) as advance:
        run_probe(banks, n_gallery, budget, on_sorted=on_sorted, progress=advance)
    store = probefile.datasets(query_acc, gallery_acc, 1)
    if sorted_bank is not None:
        store["/sorted_bank_scores"] = probefile.Stored(sorted_bank, {})
    probe = probefile.Probe(store, path="the tuning probe", attrs={"gallery_rows": n_gallery})
    full_stats = scale.ScoreStats.from_dict(query_acc.score_summary())
    scale_name = scale.classify(full_stats)
    diag = tn.bank_diagnostics(query_acc.neighbors.indices, 1, n_gallery)
    if (warning := tn.coverage_warning(diag, n_gallery)) is not None:
        report.warn(warning)

    scores = tn.CachedScores(val_scores, budget)
    rows = []
    with report.progress("tune", len(settings), unit="settings") as advance:
        for setting in settings:
            rows.append({"setting": setting, "metrics": tn.evaluate(scores, tn.normaliser(probe, setting),
                                                                    relevant, budget)})
            advance(1)
    raw = rows[0]["metrics"]
    ranked = tn.rank_results(rows, metric_name)
    best = ranked[0]

    validation = {role: {**item.describe(), "path": str(Path(item.path).resolve())} for role, item in inputs.items()}
    document = tn.params_document(best["setting"], best["metrics"], raw, metric_name, validation, full_stats,
                                  scale_name, ranked, len(settings))
    tn.write_params(target, document)

    shown = ranked if show_all else tn.best_per_method(ranked)
    from rich.table import Table  # on first use: see report.py

    table = Table(title=f"tune: {len(settings)} settings on {val_scores.n_rows} validation queries × "
                        f"{n_gallery} items, sorted by {metric_name}",
                  caption=f"bank scores: {scale.describe(full_stats)}; "
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
    if (note := tn.edge_note(best["setting"], settings)) is not None:
        report.info(f"note: {note}")
    gain = best["metrics"][metric_name] - raw[metric_name]
    report.info(f"wrote {output}: {best['setting'].label()} ({metric_name} {best['metrics'][metric_name]:.2f}, "
                f"raw {raw[metric_name]:.2f}, {gain:+.2f}); apply with probe/normalise --params {output}")
    report.result({
        "output": output, "kind": tn.PARAMS_KIND, "metric": metric_name,
        "best": {**best["setting"].as_dict(), "metrics": best["metrics"]}, "raw": raw,
        "score_scale": scale_name, "scores": full_stats.as_dict(), "bank": diag,
        "settings": [{**r["setting"].as_dict(), "metrics": r["metrics"]} for r in ranked],
    })


def _bank_scores(role, emb_spec, sims_spec, gallery_emb, n_gallery, similarity, budget, inputs):
    option = "--" + role.replace("_", "-")
    if emb_spec is not None and sims_spec is not None:
        raise UsageError(f"give either {option} or {option}-sims, not both")
    if sims_spec is not None:
        src = open_array(sims_spec, kinds=("similarity",))
        if src.cols != n_gallery:
            raise DataError(f"{src.label} has {src.cols} columns but the validation gallery has {n_gallery} items")
        inputs[role] = src
        return MatrixScores(src)
    if emb_spec is None:
        return None
    if gallery_emb is None:
        raise UsageError(f"{option} needs --gallery; with --sims use {option}-sims")
    src = open_array(emb_spec, kinds=EMBEDDING_KINDS)
    inputs[role] = src
    return EmbeddingScores(Embeddings(src, similarity, budget), gallery_emb)


def _ground_truth(spec: str, n_queries: int, n_gallery: int, gallery_label: str) -> tuple[np.ndarray, ArrayInput]:
    relevant, gt_in = read_relevant(spec, n_queries, [(gallery_label, n_gallery)], "the validation set")
    if not (relevant >= 0).any(axis=1).all():
        row = int(np.argmax(~(relevant >= 0).any(axis=1)))
        raise DataError(f"{gt_in.label}: query {row} has no relevant item")
    return relevant, gt_in


def _warn_overlaps(report, inputs: dict[str, ArrayInput]) -> None:
    """Tuning is only honest when the bank is not the validation queries themselves."""
    query_side = inputs.get("queries")
    bank = inputs.get("bank")
    if query_side is not None and bank is not None and query_side.identity == bank.identity:
        report.warn(f"the bank {bank.label} holds the validation queries {query_side.label} themselves; "
                    "build it from training queries, or the tuned gain will not carry over")
