"""qbnorm probe: measure the gallery with a querybank once (and optionally a gallery bank)."""

from __future__ import annotations

from typing import Annotated

import numpy as np
import typer

from qbnorm_cli import tuning_tmp as tn
from qbnorm_cli.cli import options as common
from qbnorm_cli.core import scale
from qbnorm_cli.core import statistics as stats
from qbnorm_cli.errors import DataError, UsageError
from qbnorm_cli.io import probefile
from qbnorm_cli.io.files import EMBEDDING_KINDS, OutputFile, open_array
from qbnorm_cli.io.probefile import DEFAULT_BETA
from qbnorm_cli.streaming.engine import SIMILARITIES, Embeddings, EmbeddingScores, MatrixScores, run_probe

KMAX_MIN = 10


def command(
    output: common.Output,
    bank: Annotated[str | None, typer.Option("--bank", help="Query bank embeddings (from build-bank or any embeddings).")] = None,
    gallery: Annotated[str | None, typer.Option("--gallery", help="Gallery embeddings.")] = None,
    bank_sims: Annotated[str | None, typer.Option("--bank-sims", help="Precomputed bank × gallery scores, instead of --bank/--gallery.")] = None,
    beta: Annotated[list[float] | None, typer.Option("--beta", help="Inverted-softmax temperature(s) to precompute (repeatable; default 20, for cosine scores).")] = None,
    k: Annotated[int | None, typer.Option("--k", help="Top-k of each bank query that forms the DIS activation set (default 1).")] = None,
    gallery_bank: Annotated[str | None, typer.Option("--gallery-bank", help="Gallery-modality bank embeddings (DBNorm).")] = None,
    gallery_bank_sims: Annotated[str | None, typer.Option("--gallery-bank-sims", help="Precomputed gallery-bank × gallery scores.")] = None,
    gallery_beta: Annotated[list[float] | None, typer.Option("--gallery-beta", help="β₂ value(s) for the gallery bank (repeatable; default 1).")] = None,
    topk_mean: Annotated[list[int] | None, typer.Option("--topk-mean", help="K for mean-of-top-K statistics (csls, nnn; repeatable; default 10 and 128).")] = None,
    params_file: Annotated[str | None, typer.Option("--params", metavar="PARAMS.json", help="Settings from `qbnorm tune`: probe what they need (explicit options override).")] = None,
    keep_sorted: Annotated[bool, typer.Option("--keep-sorted", help="Keep every gallery item's sorted bank scores (O(bank × gallery) storage; needed by gc).")] = False,
    similarity: common.Similarity = "cosine",
    memory: common.Memory = common.DEFAULT_MEMORY_TEXT,
    block_rows: common.BlockRows = None,
    force: common.Force = False,
    json_output: common.Json = False,
    quiet: common.Quiet = False,
) -> None:
    """Probe the gallery with a querybank: the statistics every normaliser needs, in one pass.

    Example: qbnorm probe --bank bank.h5 --gallery data.h5::/gallery -o probe.h5 --beta 20 --k 1
    """
    report = common.reporter(json_output, quiet)
    budget = common.budget(memory, block_rows)
    common.check_choice(similarity, SIMILARITIES, "--similarity")
    tuned = tn.load_params(params_file) if params_file else None
    if tuned is not None:
        beta = beta or ([tuned["beta"]] if tuned["beta"] is not None else None)
        gallery_beta = gallery_beta or ([tuned["gallery_beta"]] if tuned["gallery_beta"] is not None else None)
        topk_mean = topk_mean or ([tuned["topk_mean"]] if tuned["topk_mean"] is not None else None)
        k = k if k is not None else tuned["k"]
        if tuned["method"].startswith("dual") and not (gallery_bank or gallery_bank_sims):
            raise UsageError(f"--params {params_file}: {tuned['method']} needs --gallery-bank (or --gallery-bank-sims)")
        keep_sorted = keep_sorted or tuned["method"] == "gc"
    k = 1 if k is None else k
    betas = np.array([common.check_beta(b) for b in (beta or [DEFAULT_BETA])])
    gallery_betas = np.array([common.check_beta(b, "--gallery-beta") for b in (gallery_beta or [1.0])])
    ks = tuple(sorted(set(topk_mean or [10, 128])))
    for value in ks:
        if value < 1:
            raise UsageError(f"--topk-mean {value}: must be at least 1")

    inputs, banks = [], []
    if bank_sims is not None:
        if bank or gallery:
            raise UsageError("give either --bank-sims or --bank with --gallery, not both")
        sims = open_array(bank_sims, kinds=("similarity",))
        inputs.append(sims)
        query_scores = MatrixScores(sims)
        n_gallery = sims.cols
        gallery_identity = sims.attrs.get("gallery_identity")
        gallery_emb = None
    else:
        if not (bank and gallery):
            raise UsageError("probe needs --bank and --gallery (or --bank-sims)")
        bank_in = open_array(bank, kinds=EMBEDDING_KINDS)
        gallery_in = open_array(gallery, kinds=EMBEDDING_KINDS)
        inputs += [bank_in, gallery_in]
        gallery_emb = Embeddings(gallery_in, similarity, budget)
        query_scores = EmbeddingScores(Embeddings(bank_in, similarity, budget), gallery_emb)
        n_gallery = gallery_in.rows
        gallery_identity = gallery_in.identity
    common.check_count(k, "--k", n_gallery, "gallery size")
    kmax = max(k, KMAX_MIN)
    query_acc = stats.BankAccumulator(query_scores.n_rows, n_gallery, betas, kmax, ks, keep_sorted)
    banks.append((query_scores, query_acc))

    gallery_acc = None
    if gallery_bank_sims is not None or gallery_bank is not None:
        if gallery_bank_sims is not None and gallery_bank is not None:
            raise UsageError("give either --gallery-bank or --gallery-bank-sims, not both")
        if gallery_bank_sims is not None:
            hsims = open_array(gallery_bank_sims, kinds=("similarity",))
            inputs.append(hsims)
            if hsims.cols != n_gallery:
                raise DataError(f"{hsims.label} has {hsims.cols} columns but the gallery has {n_gallery} items")
            gallery_scores = MatrixScores(hsims)
        else:
            if gallery_emb is None:
                raise UsageError("--gallery-bank needs --gallery; with --bank-sims use --gallery-bank-sims")
            gb_in = open_array(gallery_bank, kinds=EMBEDDING_KINDS)
            inputs.append(gb_in)
            gallery_scores = EmbeddingScores(Embeddings(gb_in, similarity, budget), gallery_emb)
        gallery_acc = stats.BankAccumulator(gallery_scores.n_rows, n_gallery, gallery_betas, kmax)
        banks.append((gallery_scores, gallery_acc))

    params = {
        "betas": betas.tolist(), "k": k, "kmax": kmax, "topk_mean": list(ks), "keep_sorted": keep_sorted,
        "similarity": "precomputed" if bank_sims else similarity,
        "gallery_betas": gallery_betas.tolist() if gallery_acc else None,
        "memory": budget.memory, "block_rows": block_rows,
    }
    total = sum(scores.n_rows for scores, _ in banks) * n_gallery
    with OutputFile(output, "probe", force=force, params=params, inputs=inputs) as out:
        sorted_ds = None
        if keep_sorted:
            sorted_ds = out.create("/sorted_bank_scores", shape=(n_gallery, query_scores.n_rows), dtype=np.float32)

        def on_sorted(number, c0, c1, block):
            if number == 0:
                out.write_rows(sorted_ds, c0, block)

        with report.progress("probe", total, per=n_gallery) as advance:
            run_probe(banks, n_gallery, budget, on_sorted=on_sorted, progress=advance)
        for name, stored in probefile.datasets(query_acc, gallery_acc, k).items():
            out.create(name, data=stored.data, **stored.attrs)
        summary_scores = query_acc.score_summary()
        attrs = out.h5.attrs
        attrs["gallery_rows"] = n_gallery
        attrs["bank_rows"] = query_scores.n_rows
        attrs["gallery_bank_rows"] = gallery_acc.n_rows if gallery_acc else 0
        attrs["similarity"] = params["similarity"]
        if gallery_identity:
            attrs["gallery_identity"] = gallery_identity
        attrs["score_min"], attrs["score_max"] = summary_scores["min"], summary_scores["max"]
        attrs["score_mean"], attrs["score_std"] = summary_scores["mean"], summary_scores["std"]
        score_stats = scale.ScoreStats.from_dict(summary_scores)
        attrs["score_scale"] = scale.classify(score_stats)
        gallery_stats = None
        if gallery_acc is not None:
            gallery_stats = scale.ScoreStats.from_dict(gallery_acc.score_summary())
            for part, value in gallery_stats.as_dict().items():
                attrs[f"gallery_score_{part}"] = value

    diag = tn.bank_diagnostics(query_acc.neighbors.indices, k, n_gallery)
    coverage = diag["coverage"]
    summary = {
        "output": output, "kind": "probe", "uuid": out.uuid, "bank_rows": query_scores.n_rows,
        "gallery_rows": n_gallery, "betas": betas.tolist(), "k": k, "topk_mean": list(ks),
        "coverage": coverage, "occurrence_skewness": diag["occurrence_skewness"], "scores": summary_scores,
        "score_scale": scale.classify(score_stats),
        "gallery_bank_rows": gallery_acc.n_rows if gallery_acc else 0,
    }
    report.info(
        f"wrote {output}: probe of {n_gallery} gallery items with {query_scores.n_rows} bank queries; "
        f"activation set (k={k}) covers {100 * coverage:.1f}% of the gallery; bank-side k-occurrence "
        f"skewness {diag['occurrence_skewness']:.2f}; bank scores {scale.describe(score_stats)}"
    )
    warnings = [scale.beta_warning(b, score_stats) for b in betas]
    if gallery_stats is not None:
        warnings += [scale.beta_warning(b, gallery_stats, "--gallery-beta", check_low=False) for b in gallery_betas]
    warnings.append(tn.coverage_warning(diag, n_gallery))
    if tuned is not None and gallery_emb is not None:
        warnings.append(tn.tuned_on_warning(params_file, tuned, [gallery_in]))
    for warning in filter(None, warnings):
        report.warn(warning)
    report.result(summary)
