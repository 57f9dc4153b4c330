"""`probe`: one pass of a querybank (and optionally a gallery bank) over the gallery."""

from __future__ import annotations

import json
from contextlib import nullcontext

import numpy as np

from qbnorm_cli import methods
from qbnorm_cli.api.common import check_count, clustered, one_of, progress_or_none, score_source, similarities, warn
from qbnorm_cli.core import scale
from qbnorm_cli.core.statistics import BankAccumulator, bank_diagnostics, coverage_warning
from qbnorm_cli.errors import DataError, UsageError, param
from qbnorm_cli.io.atomic import OutputFile
from qbnorm_cli.io.probefile import SORTED, Probe, Stored, statistics, write_attrs
from qbnorm_cli.streaming import cluster as clustering
from qbnorm_cli.streaming.budget import DEFAULT_MEMORY, make_budget
from qbnorm_cli.streaming.engine import run_probe
from qbnorm_cli.streaming.sources import MatrixScores


def probe(bank=None, gallery=None, *, betas=(methods.DEFAULT_BETA,), k: int = 1, gallery_bank=None,
          gallery_betas=(methods.DEFAULT_GALLERY_BETA,), topk_means=None, keep_sorted: bool = False,
          bank_sims=None, gallery_bank_sims=None, similarity: str = "cosine", memory=DEFAULT_MEMORY,
          block_rows: int | None = None, output=None, force: bool = False, progress=None,
          provenance: str | None = None, cluster=None) -> Probe:
    """Probe `gallery` with a querybank: every statistic the normalisers need, in one pass.

    bank, gallery, gallery_bank: embeddings (arrays, memory maps, h5py datasets, `PATH[::/dataset]`
    strings), compared by `similarity` ("cosine": rows L2-normalised, or "dot"); or `bank_sims` /
    `gallery_bank_sims`, precomputed bank × gallery scores. betas: the inverse temperatures whose
    log-normalisers LSE_i(β·P[i, j]) are kept (QB-Norm Eq. 3); k: the top-k of each bank query that
    forms the DIS activation set (at least 10 items per bank query are kept, so that k up to 10
    works later); topk_means: the K of the mean-of-top-K statistics of CSLS and NNN (default: the
    registry's defaults); keep_sorted: keep every item's sorted bank scores (O(bank × gallery),
    needed by gc). memory: the byte budget blocks are sized to (or `block_rows` per block).
    output: also write the probe file there, as it is computed (atomically; `force` overwrites).
    cluster: run on a dask cluster ("local", "local:N", "tcp://HOST:PORT", a scheduler file, a
    distributed.Client or a Cluster; docs/distributed.md): the same probe to the bit, `memory`
    per worker; `Probe.cluster` then reports the workers, tasks and bytes moved.

    Returns a `Probe` (in memory, or read from `output`). Warnings (a β on the wrong scale, a bank
    that covers little of the gallery) are issued as `QbnormWarning` and kept in `Probe.warnings`.
    """
    budget = make_budget(memory, block_rows)
    betas = [methods.PARAMETERS["beta"].check(b) for b in np.atleast_1d(betas)]
    gallery_betas = [methods.PARAMETERS["gallery_beta"].check(b) for b in np.atleast_1d(gallery_betas)]
    ks = tuple(sorted({methods.PARAMETERS["topk_mean"].check(v)
                       for v in (methods.default_topk_means() if topk_means is None else np.atleast_1d(topk_means))}))
    if not betas:
        raise UsageError(f"{param('betas')}: give at least one β")
    k = methods.PARAMETERS["k"].check(k)

    query_scores, inputs, gallery_emb = score_source(
        bank, gallery, bank_sims, rows_name="bank", cols_name="gallery", sims_name="bank_sims",
        similarity=similarity, budget=budget, what="probe", eager=cluster is None)
    n_gallery = query_scores.n_cols
    gallery_identity = inputs[-1].identity if bank_sims is None else inputs[0].attrs.get("gallery_identity")
    check_count(k, "k", n_gallery, "gallery size")
    kmax = max(k, methods.KMAX_MIN)
    query_acc = BankAccumulator(query_scores.n_rows, n_gallery, np.array(betas), kmax, ks, keep_sorted)
    banks = [(query_scores, query_acc)]

    gallery_acc = None
    one_of(gallery_bank, gallery_bank_sims, "gallery_bank", "gallery_bank_sims")
    if gallery_bank_sims is not None:
        hsims = similarities(gallery_bank_sims, "gallery_bank_sims")
        if hsims.cols != n_gallery:
            raise DataError(f"{hsims.label} has {hsims.cols} columns but the gallery has {n_gallery} items")
        inputs.append(hsims)
        gallery_scores = MatrixScores(hsims)
    elif gallery_bank is not None:
        if gallery_emb is None:
            raise UsageError(f"{param('gallery_bank')} needs {param('gallery')}; with {param('bank_sims')} use "
                             f"{param('gallery_bank_sims')}")
        gallery_scores, more, _ = score_source(
            gallery_bank, None, None, rows_name="gallery_bank", cols_name="gallery", sims_name="gallery_bank_sims",
            similarity=similarity, budget=budget, what="probe", cols_embeddings=gallery_emb, eager=cluster is None)
        inputs += more
    if gallery_bank is not None or gallery_bank_sims is not None:
        gallery_acc = BankAccumulator(gallery_scores.n_rows, n_gallery, np.array(gallery_betas), kmax)
        banks.append((gallery_scores, gallery_acc))

    params = {
        "betas": betas, "k": k, "kmax": kmax, "topk_mean": list(ks), "keep_sorted": keep_sorted,
        "similarity": "precomputed" if bank_sims is not None else similarity,
        "gallery_betas": gallery_betas if gallery_acc else None,
        "memory": budget.memory, "block_rows": block_rows,
    }
    out = OutputFile(str(output), "probe", force=force, params=params, inputs=inputs, provenance=provenance) \
        if output is not None else None
    total = sum(scores.n_rows for scores, _ in banks) * n_gallery
    with clustered(cluster) as session, out if out is not None else nullcontext():
        sorted_store = None
        if keep_sorted:
            if out is not None:
                sorted_store = out.create(SORTED, shape=(n_gallery, query_scores.n_rows), dtype=np.float32)
            else:
                sorted_store = np.empty((n_gallery, query_scores.n_rows), dtype=np.float32)

        def on_sorted(number, c0, c1, block):
            if number != 0:
                return
            if out is not None:
                out.write_rows(sorted_store, c0, block)
            else:
                sorted_store[c0:c1] = block

        with progress_or_none(progress)("probe", total, per=n_gallery) as advance:
            if session is None:
                run_probe(banks, n_gallery, budget, on_sorted=on_sorted, progress=advance)
            else:
                clustering.run_probe(session, banks, n_gallery, budget, on_sorted=on_sorted, progress=advance)
        datasets = statistics(query_acc, gallery_acc, k)
        if keep_sorted and out is None:
            datasets[SORTED] = Stored(sorted_store)
        score_stats = query_acc.score_stats()
        attrs = {
            "gallery_rows": n_gallery, "bank_rows": query_scores.n_rows,
            "gallery_bank_rows": gallery_acc.n_rows if gallery_acc else 0, "similarity": params["similarity"],
            "gallery_identity": gallery_identity, "score_scale": scale.classify(score_stats),
            **{f"score_{part}": value for part, value in score_stats.as_dict().items()},
        }
        gallery_stats = None
        if gallery_acc is not None:
            gallery_stats = gallery_acc.score_stats()
            attrs.update({f"gallery_score_{part}": value for part, value in gallery_stats.as_dict().items()})
        diagnostics = bank_diagnostics(query_acc.neighbors.indices, k, n_gallery)
        found = [scale.beta_warning(b, score_stats) for b in betas]
        if gallery_stats is not None:
            found += [scale.beta_warning(b, gallery_stats, "gallery_beta", check_low=False) for b in gallery_betas]
        found.append(coverage_warning(diagnostics, n_gallery, param(f"method={methods.DEFAULT.name!r}")))
        found = [w for w in found if w]
        attrs["warnings"] = json.dumps(found)
        if out is not None:
            for name, stored in datasets.items():
                out.create(name, data=stored.data, **stored.attrs)
            write_attrs(out, attrs)
    for message in found:
        warn(message)
    if out is not None:
        result = Probe.load(output)
    else:
        result = Probe(datasets, {**attrs, "uuid": None}, params=params, inputs=[i.describe() for i in inputs])
    result.warnings = found
    result.diagnostics = diagnostics
    result.cluster = session.report() if session is not None else None
    return result
