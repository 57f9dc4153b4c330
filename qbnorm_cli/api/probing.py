"""`probe`: one pass of a querybank (and optionally a gallery bank) over the gallery."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qbnorm_cli import methods as registry
from qbnorm_cli.api.common import (
    bounded,
    check_count,
    clustered,
    one_of,
    progress_or_none,
    score_source,
    similarities,
    warn,
)
from qbnorm_cli.core import scale
from qbnorm_cli.core.probestats import fingerprints
from qbnorm_cli.core.sinkhorn import DEFAULT_MAX_ITERS, DEFAULT_TOL, Sinkhorn, first_v_update
from qbnorm_cli.core.statistics import BankAccumulator, bank_diagnostics, coverage_warning
from qbnorm_cli.errors import DataError, UsageError, param, plain_text
from qbnorm_cli.io import limits
from qbnorm_cli.io.paramsfile import other_banks, tuned_on_warning
from qbnorm_cli.io.probefile import KEPT_ATTRS, SORTED, Probe, Stored, sinkhorn_statistics, statistics
from qbnorm_cli.io.sinks import Column, Sink
from qbnorm_cli.streaming import cluster as clustering
from qbnorm_cli.streaming.budget import DEFAULT_MEMORY, Budget, make_budget
from qbnorm_cli.streaming.engine import ProbePlan, probe_plan, run_probe
from qbnorm_cli.streaming.sinkhorn import ScoreHandover, memory_to_hold, run_sinkhorn
from qbnorm_cli.streaming.sources import EmbeddingScores, MatrixScores, ScoreSource


@dataclass(frozen=True)
class SinkhornSettings:
    """How the Sinkhorn iterations stop: exactly `iters`, or at a change below `tol` (≤ `max_iters`)."""

    iters: int | None = None
    tol: float | None = DEFAULT_TOL
    max_iters: int | None = DEFAULT_MAX_ITERS

    @classmethod
    def checked(cls, enabled: bool, iters, tol, max_iters) -> SinkhornSettings | None:
        given = [name for name, value in (("sinkhorn_iters", iters), ("sinkhorn_tol", tol),
                                          ("sinkhorn_max_iters", max_iters)) if value is not None]
        if not enabled:
            if given:
                raise UsageError(f"{param(given[0])} needs {param('sinkhorn=True')}")
            return None
        if iters is not None:
            if tol is not None or max_iters is not None:
                other = "sinkhorn_tol" if tol is not None else "sinkhorn_max_iters"
                raise UsageError(f"give either {param('sinkhorn_iters')} (a fixed number of iterations) or "
                                 f"{param(other)} (iterate until converged), not both")
            return cls(_ITERS.check(iters), None, None)
        return cls(None, DEFAULT_TOL if tol is None else _TOL.check(tol),
                   DEFAULT_MAX_ITERS if max_iters is None else _MAX_ITERS.check(max_iters))

    def state(self, beta: float, n_bank: int, n_rows: int, log_u: np.ndarray | None = None,
              log_v: np.ndarray | None = None) -> Sinkhorn:
        """A run's state: from POT's start, from item scalings `log_u`, or (converging runs) from
        its first v-update `log_v`; a fixed count of iterations always starts as POT does."""
        if self.iters is not None:
            return Sinkhorn(beta, n_bank, n_rows, iters=self.iters, log_u=log_u)
        return Sinkhorn(beta, n_bank, n_rows, tol=self.tol, max_iters=self.max_iters, log_u=log_u, log_v=log_v)

    def as_params(self) -> dict:
        return {"sinkhorn_iters": self.iters, "sinkhorn_tol": self.tol, "sinkhorn_max_iters": self.max_iters}


_ITERS = registry.Parameter("sinkhorn_iters", int, "exactly this many Sinkhorn iterations", minimum=1)
_TOL = registry.Parameter("sinkhorn_tol", float, "stop at a change of the log scalings below this", minimum=0,
                         exclusive=True)
_MAX_ITERS = registry.Parameter("sinkhorn_max_iters", int, "at most this many iterations", minimum=1)


def sinkhorn_note(states, settings: SinkhornSettings) -> str:
    """Where the Sinkhorn runs stand after a pass: the iteration and, running to a tolerance, the
    largest change of the log scalings still iterating (what stops a run) against it, with the
    largest marginal error; with a fixed count, the iteration of that count."""
    iteration = max((s.iterations for s in states), default=0)
    if settings.iters is not None:
        return f"iteration {iteration} of {settings.iters}"
    running = [s for s in states if not s.done] or states
    change = max(s.change for s in running)
    if not math.isfinite(change):
        return f"iteration {iteration}: the first pass (tol {settings.tol:g})"
    error = max(s.marginal_error for s in running)
    return (f"iteration {iteration}: change {change:.1e} → tol {settings.tol:g} "
            f"(marginal error {error:.1e}; at most {settings.max_iters} iterations)")


def sinkhorn_potentials(bank_scores: ScoreSource, cross_scores: ScoreSource | None, betas, dual_betas,
                        settings: SinkhornSettings, budget: Budget, progress, starts=None, first_v=None,
                        tiles: ProbePlan | None = None, handed: ScoreHandover | None = None,
                        ) -> tuple[dict[str, Stored], list[str]]:
    """The Sinkhorn potentials of every β (SN: rows = the gallery) and of every dual β (DBSN: rows =
    the gallery, then the gallery bank, whose bank × gallery-bank scores are `cross_scores`), as
    the probe's datasets, and a warning for each run that stopped at max_iters unconverged.
    starts: {(β, dual): log u} to start from (an update's warm start), else POT's start.
    first_v: {β: log v} of an SN run's first v-update from POT's start, made by the probe's pass
    (core.sinkhorn.first_v_update): the run begins with its u-update. tiles, handed: the bank ×
    gallery scores in that pass's tiles, and those it kept (streaming.sinkhorn.ScoreHandover)."""
    n_bank, n_gallery = bank_scores.n_rows, bank_scores.n_cols
    starts, first_v = starts or {}, first_v or {}
    single = [settings.state(b, n_bank, n_gallery, starts.get((b, False)),
                             log_v=None if (b, False) in starts else first_v.get(float(b))) for b in betas]
    dual = [settings.state(b, n_bank, n_gallery + cross_scores.n_cols, starts.get((b, True))) for b in dual_betas] \
        if cross_scores is not None else []
    segments, counts = sinkhorn_segments(bank_scores, cross_scores, betas, dual_betas)
    problems = list(zip(single + dual, counts, strict=True))
    states = single + dual
    # A fixed count of iterations has a known end; a run to tolerance has none (it usually stops long
    # before max_iters): its progress is the stopping measure against the tolerance, not a percentage.
    passes = max((state.limit + 1 for state in states), default=0) if settings.iters is not None else None
    with progress_or_none(progress)("sinkhorn", passes, unit="passes") as advance:
        held = run_sinkhorn(segments, problems, budget, tiles=tiles, handed=handed,
                            progress=lambda n: advance(n, note=sinkhorn_note(states, settings)))
    out: dict[str, Stored] = {}
    found = []
    for states, is_dual, kept in ((single, False, held[:len(single)]), (dual, True, held[len(single):])):
        if not states:
            continue
        out.update(sinkhorn_statistics([s.result() for s in states], n_gallery, iters=settings.iters,
                                       tol=settings.tol, max_iters=settings.max_iters, held=all(kept),
                                       dual=is_dual))
        for state in states:
            if state.hit_limit:
                what = "dual-bank Sinkhorn" if is_dual else "Sinkhorn"
                found.append(f"{what} at β={state.beta:g} did not converge: the log scalings still changed by "
                             f"{state.change:.2g} after {state.iterations} iterations ({param('sinkhorn_max_iters')} "
                             f"{settings.max_iters}), more than {param('sinkhorn_tol')} {settings.tol:g}; its "
                             f"potentials are kept as they are (marginal error {state.marginal_error:.2g}): raise "
                             f"{param('sinkhorn_max_iters')}, or use a smaller β")
    return out, found


def sinkhorn_segments(bank_scores: ScoreSource, cross_scores: ScoreSource | None, betas,
                      dual_betas) -> tuple[list[ScoreSource], list[int]]:
    """The Sinkhorn runs' score segments (bank × gallery, then bank × gallery bank for DBSN) and,
    per run (every β, then every dual β), how many of them form its rows."""
    dual = cross_scores is not None and len(dual_betas) > 0
    return ([bank_scores, cross_scores] if dual else [bank_scores],
            [1] * len(betas) + ([2] * len(dual_betas) if dual else []))


def sinkhorn_memory(result: Probe) -> int:
    """The `memory` at which a probe like `result` holds every Sinkhorn kernel (sn and dbsn, each β)."""
    n_gallery, extra = result.n_gallery, int(result.attrs["gallery_bank_rows"])
    rows = n_gallery * len(result.sinkhorn_runs()) + (n_gallery + extra) * len(result.sinkhorn_runs(dual=True))
    return memory_to_hold(result.n_bank, rows)


def probe_pass(banks: list, n_cols: int, budget: Budget, session, on_sorted, progress, what: str = "probe",
               plan: ProbePlan | None = None, on_tile=None) -> None:
    """One pass of the banks over `n_cols` gallery columns into their accumulators, here or on the
    cluster's `session` (the same values to the bit), with its progress reported as `what`; here,
    in `plan`'s tiles (when given), each of them seen by `on_tile` (engine.run_probe)."""
    with progress_or_none(progress)(what, sum(s.n_rows for s, _ in banks) * n_cols, per=n_cols) as advance:
        if session is None:
            run_probe(banks, n_cols, budget, on_sorted=on_sorted, progress=advance, plan=plan, on_tile=on_tile)
        else:
            clustering.run_probe(session, banks, n_cols, budget, on_sorted=on_sorted, progress=advance)


def probe_statistics(bank_scores: ScoreSource, gallery_bank_scores: ScoreSource | None,
                     cross_scores: ScoreSource | None, *, betas, gallery_betas, kmax: int, k: int, topk_means,
                     keep_sorted: bool, column_moments: bool, centroid_ks, gallery_moments: bool,
                     sinkhorn: tuple | None, budget: Budget, progress, session=None, sink: Sink | None = None,
                     ) -> tuple[BankAccumulator, BankAccumulator | None, dict[str, Stored], list[str]]:
    """One probe pass, as `probe` and `tune` make it: the bank's (and gallery bank's) statistics
    over the gallery, the centroid distances of `centroid_ks`, the gallery's moments, and with
    `sinkhorn` = (settings, betas, dual betas) the potentials. keep_sorted: each item's sorted bank
    scores go to `sink`'s SORTED rows as the pass makes them. Returns the accumulators, the
    datasets and the Sinkhorn runs' warnings."""
    n_gallery = bank_scores.n_cols
    # a converging Sinkhorn run's first v-update is each bank row's log-sum-exp: from this pass's
    # exponentials (a matrix–vector product), not from a pass of its own (not on a cluster: there
    # the run makes its first pass; nor where no sn β is one of the pass's: tune's dbsn-only grids)
    row_sums = sinkhorn is not None and sinkhorn[0].iters is None and session is None \
        and any(beta in betas for beta in sinkhorn[1])
    bank_acc = BankAccumulator(bank_scores.n_rows, n_gallery, np.array(betas), kmax, tuple(topk_means), keep_sorted,
                               column_moments=column_moments, neighbor_k=max(centroid_ks, default=0),
                               row_sums=row_sums)
    banks = [(bank_scores, bank_acc)]
    gallery_bank_acc = None
    if gallery_bank_scores is not None:
        gallery_bank_acc = BankAccumulator(gallery_bank_scores.n_rows, n_gallery, np.array(gallery_betas), kmax)
        banks.append((gallery_bank_scores, gallery_bank_acc))

    def on_sorted(number, c0, c1, block):
        if number == 0 and sink is not None:
            sink.write(c0, SORTED, block)

    # the Sinkhorn runs compute the bank × gallery scores in this pass's tiles (the same bits, here
    # or on a cluster), and here take those of the blocks they hold from it instead of computing them again
    tiles = handed = None
    if sinkhorn is not None:
        tiles = probe_plan(banks, n_gallery, budget)
        if session is None:
            segments, counts = sinkhorn_segments(bank_scores, cross_scores, sinkhorn[1], sinkhorn[2])
            handed = ScoreHandover(segments, counts, budget, tiles)

    def on_tile(number, r0, c0, tile):
        if number == 0:
            handed.take(r0, c0, tile)

    probe_pass(banks, n_gallery, budget, session, on_sorted, progress, plan=tiles,
               on_tile=on_tile if handed is not None and handed.rooms else None)
    datasets = statistics(bank_acc, gallery_bank_acc, k)
    if centroid_ks:
        datasets.update(centroid_statistics(bank_scores, bank_acc.column_topk_index, centroid_ks))
    if gallery_moments:
        mean, moment = gallery_moments_of(bank_scores.cols)
        datasets["/gallery_mean"], datasets["/gallery_second_moment"] = Stored(mean), Stored(moment)
    found: list[str] = []
    if sinkhorn is not None:
        settings, sinkhorn_betas, dual_betas = sinkhorn
        row_lse = bank_acc.row_log_sums() if row_sums else None
        first_v = {} if row_lse is None else {
            float(beta): first_v_update(row_lse[list(bank_acc.betas).index(beta)], n_gallery)
            for beta in sinkhorn_betas if beta in bank_acc.betas}
        potentials, found = sinkhorn_potentials(bank_scores, cross_scores, sinkhorn_betas, dual_betas, settings,
                                                budget, progress, first_v=first_v, tiles=tiles, handed=handed)
        datasets.update(potentials)
    return bank_acc, gallery_bank_acc, datasets, found


@bounded
def probe(bank=None, gallery=None, *, betas=(registry.DEFAULT_BETA,), k: int = 1, gallery_bank=None,
          gallery_betas=(registry.DEFAULT_GALLERY_BETA,), topk_means=None, keep_sorted: bool = False,
          sinkhorn: bool = False, sinkhorn_iters: int | None = None, sinkhorn_tol: float | None = None,
          sinkhorn_max_iters: int | None = None, bank_sims=None, gallery_bank_sims=None,
          bank_gallery_bank_sims=None, transpose: bool = False, similarity: str = "cosine",
          memory=DEFAULT_MEMORY,
          block_rows: int | None = None, output=None, force: bool = False, progress=None,
          provenance: str | None = None, tuned: dict | None = None, cluster=None, methods=None) -> Probe:
    """Probe `gallery` with a querybank: every statistic the normalisers need, in one pass.

    bank, gallery, gallery_bank: embeddings (arrays, memory maps, h5py datasets, `PATH[::/dataset]`
    strings), compared by `similarity` ("cosine": rows L2-normalised, or "dot"); or `bank_sims` /
    `gallery_bank_sims`, precomputed bank × gallery scores. betas: the inverse temperatures whose
    log-normalisers LSE_i(β·P[i, j]) are kept (QB-Norm Eq. 3); k: the top-k of each bank query that
    forms the DIS activation set (at least 10 items per bank query are kept, so that k up to 10
    works later); topk_means: the K of the mean-of-top-K statistics of CSLS and NNN (default: the
    registry's defaults); keep_sorted: keep every item's sorted bank scores (O(bank × gallery),
    needed by gc). The bank's mean score of each item (for dn) is always kept.

    sinkhorn: also compute the Sinkhorn potentials of each β (sn; and dbsn's when the bank's scores
    against a gallery bank are known: from `bank` and `gallery_bank` embeddings, or precomputed as
    `bank_gallery_bank_sims`, bank × gallery-bank), iterating until the log scalings change by less
    than `sinkhorn_tol` (default 1e-6), at most `sinkhorn_max_iters` (default 1000; a warning when
    reached), or for exactly `sinkhorn_iters`. Each iteration is one more pass over the bank ×
    gallery scores (held in memory as float32 when they fit half the budget, else recomputed).

    memory: the byte budget blocks are sized to (or `block_rows` per block). output: also write the
    probe file there, as it is computed (atomically; `force` overwrites). tuned: the settings of a
    params file (`load_params`) these options came from: a warning when the gallery is the
    validation gallery they were tuned on.
    methods: names of methods (or `Method`s) whose statistics to compute as well, with their default
    parameters and the given `topk_means` (ls, nicdm: the K-th best and mean distance of the K
    nearest bank queries; mp: each item's score spread and the gallery's moments, or with
    keep_sorted the sorted bank; dsl: the distance of each item to the centroid of its K nearest
    bank queries, from the bank and gallery embeddings; gc: keep_sorted).
    cluster: run on a dask cluster ("local", "local:N", "tcp://HOST:PORT", a scheduler file, a
    distributed.Client or a Cluster; docs/distributed.md): the same probe to the bit, `memory`
    per worker; `Probe.cluster` then reports the workers, tasks and bytes moved.

    Returns a `Probe` (in memory, or read from `output`). Warnings (a β on the wrong scale, a bank
    that covers little of the gallery, Sinkhorn stopped unconverged) are issued as `QbnormWarning`
    and kept in `Probe.warnings`.
    """
    budget = make_budget(memory, block_rows)
    request = registry.method_needs(methods, topk_means)
    if request is not None:
        topk_means = sorted({*(np.atleast_1d(topk_means) if topk_means is not None else ()), *request.topk_means})
        keep_sorted = keep_sorted or request.keep_sorted
    sinkhorn_settings = SinkhornSettings.checked(bool(sinkhorn), sinkhorn_iters, sinkhorn_tol, sinkhorn_max_iters)
    if bank_gallery_bank_sims is not None and sinkhorn_settings is None:
        raise UsageError(f"{param('bank_gallery_bank_sims')} is for the dual-bank Sinkhorn: add "
                         f"{param('sinkhorn=True')}")
    betas = [registry.PARAMETERS["beta"].check(b) for b in np.atleast_1d(betas)]
    gallery_betas = registry.checked_values("gallery_betas", gallery_betas)
    ks = tuple(sorted(set(registry.checked_values(
        "topk_means", registry.default_topk_means() if topk_means is None else topk_means))))
    if not betas:
        raise UsageError(f"{param('betas')}: give at least one β")
    k = registry.PARAMETERS["k"].check(k)

    query_scores, inputs, gallery_emb = score_source(
        bank, gallery, bank_sims, rows_name="bank", cols_name="gallery", sims_name="bank_sims",
        similarity=similarity, budget=budget, what="probe", transpose=transpose, eager=cluster is None)
    n_gallery = query_scores.n_cols
    gallery_identity = inputs[-1].identity if bank_sims is None else inputs[0].attrs.get("gallery_identity")
    check_count(k, "k", n_gallery, "gallery size")
    kmax = max(k, registry.KMAX_MIN)
    centroid_ks = ()
    if request is not None and (request.centroid_ks or request.gallery_moments):
        if not isinstance(query_scores, EmbeddingScores):
            what = ", ".join(m.name for m in request.methods if m.needs.centroid or m.needs.gallery_moments)
            raise UsageError(f"{param('methods')} {what}: needs the bank and gallery embeddings "
                             f"({param('bank')} and {param('gallery')}), not {param('bank_sims')}")
        centroid_ks = tuple(request.centroid_ks)
    given_banks = {"bank": ("bank_sims" if bank_sims is not None else "bank", inputs[0])}  # role: option, input

    gallery_acc = None
    one_of(gallery_bank, gallery_bank_sims, "gallery_bank", "gallery_bank_sims")
    if gallery_bank_sims is not None:
        hsims = similarities(gallery_bank_sims, "gallery_bank_sims", transpose, budget)
        if hsims.cols != n_gallery:
            raise DataError(f"{hsims.label} has {hsims.cols} columns but the gallery has {n_gallery} items")
        inputs.append(hsims)
        given_banks["gallery_bank"] = ("gallery_bank_sims", hsims)
        gallery_scores = MatrixScores(hsims)
    elif gallery_bank is not None:
        if gallery_emb is None:
            raise UsageError(f"{param('gallery_bank')} needs {param('gallery')}; with {param('bank_sims')} use "
                             f"{param('gallery_bank_sims')}")
        gallery_scores, more, _ = score_source(
            gallery_bank, None, None, rows_name="gallery_bank", cols_name="gallery", sims_name="gallery_bank_sims",
            similarity=similarity, budget=budget, what="probe", cols_embeddings=gallery_emb, eager=cluster is None)
        inputs += more
        given_banks["gallery_bank"] = ("gallery_bank", more[0])
    has_gallery_bank = gallery_bank is not None or gallery_bank_sims is not None
    cross_scores = None
    if sinkhorn_settings is not None:
        cross_scores = cross_bank_scores(query_scores, gallery_scores if has_gallery_bank else None,
                                         bank_gallery_bank_sims, inputs)
        if bank_gallery_bank_sims is not None and cross_scores is not None:
            given_banks["bank_gallery_bank"] = ("bank_gallery_bank_sims", inputs[-1])

    params = {
        "betas": betas, "k": k, "kmax": kmax, registry.by_keyword("topk_means").params_key: list(ks),
        "keep_sorted": keep_sorted,
        "similarity": "precomputed" if bank_sims is not None else similarity, "transpose": transpose,
        "gallery_betas": gallery_betas if has_gallery_bank else None,
        "sinkhorn": sinkhorn_settings is not None, "dual_sinkhorn": cross_scores is not None,
        **(sinkhorn_settings or SinkhornSettings(None, None, None)).as_params(),
        "memory": budget.memory, "block_rows": block_rows,
        **({"methods": sorted({m.name for m in request.methods})} if request is not None else {}),
    }
    if output is not None:  # the statistics (per β and K, per item and bank row), and the sorted scores if kept
        n_bank = query_scores.n_rows
        per_item = 8 * (len(betas) + len(gallery_betas) + len(ks) + 3) + (4 * n_bank if keep_sorted else 0)
        limits.check_output(output, n_gallery * per_item + n_bank * kmax * 8,
                            f"statistics of {n_gallery} items" + (f" and {n_gallery} × {n_bank} sorted bank scores"
                                                                  if keep_sorted else ""))
    sorted_column = {SORTED: Column(query_scores.n_rows, np.float32)} if keep_sorted else {}
    with clustered(cluster) as session, Sink(output, "probe", n_gallery, sorted_column, force=force, params=params,
                                             inputs=inputs, provenance=provenance) as sink:
        query_acc, gallery_acc, datasets, sinkhorn_found = probe_statistics(
            query_scores, gallery_scores if has_gallery_bank else None, cross_scores, betas=betas,
            gallery_betas=gallery_betas, kmax=kmax, k=k, topk_means=ks, keep_sorted=keep_sorted,
            column_moments=request is not None and request.column_std, centroid_ks=centroid_ks,
            gallery_moments=request is not None and request.gallery_moments,
            sinkhorn=(sinkhorn_settings, betas, betas) if sinkhorn_settings is not None else None,
            budget=budget, progress=progress, session=session, sink=sink)
        if bank_sims is None:  # what an update checks its inputs against (core/probestats.py): embeddings' rows
            embedded = {"gallery": inputs[1], **{role: item for role, (option, item) in given_banks.items()
                                                 if not option.endswith("_sims")}}
            for role, item in embedded.items():
                datasets[f"/{role}_row_hash"] = Stored(input_fingerprints(item))
        attrs, diagnostics, found = probe_summary(query_acc, gallery_acc, k, params["similarity"], gallery_identity)
        if tuned is not None and bank_sims is None:  # inputs: bank, gallery, …
            found.append(tuned_on_warning(tuned["path"], tuned, [i.describe() for i in inputs[1:2]]))
        if tuned is not None:
            found += other_banks(tuned, {role: (option, item.describe())
                                         for role, (option, item) in given_banks.items()})
        found = [w for w in found + sinkhorn_found if w]
        sink.finish(datasets, {name: attrs.get(name) for name in KEPT_ATTRS}, found)
    return probe_result(output, sink, datasets, attrs, diagnostics, found, params, inputs, session)


def probe_result(output, sink: Sink, datasets: dict, attrs: dict, diagnostics: dict, found: list, params: dict,
                 inputs: list, session) -> Probe:
    """A probe's (or an update's) result once its sink is closed: the warnings issued, and the Probe
    read back from `output` (or kept in memory) with its warnings, diagnostics and cluster report."""
    for message in found:
        warn(message)
    if output is not None:
        result = Probe.load(output)
    else:
        if SORTED in sink.arrays:
            datasets[SORTED] = Stored(sink.arrays[SORTED])
        result = Probe(datasets, {**attrs, "uuid": None}, params=params, inputs=[i.describe() for i in inputs])
    result.warnings = [plain_text(w) for w in found]
    result.diagnostics = diagnostics
    result.cluster = session.report() if session is not None else None
    return result


def input_fingerprints(item) -> np.ndarray:
    """Each row's fingerprint (core/probestats.fingerprints) of an input read in blocks."""
    return np.concatenate([fingerprints(item.read(r0, min(r0 + GALLERY_BLOCK, item.rows)))
                           for r0 in range(0, item.rows, GALLERY_BLOCK)] or [np.zeros(0, dtype=np.int64)])


def probe_summary(query_acc: BankAccumulator, gallery_acc: BankAccumulator | None, k: int, similarity: str,
                  gallery_identity) -> tuple[dict, dict, list]:
    """A probe's root attributes (sizes, score statistics and scale), the bank's diagnostics, and
    the warnings they call for (a β on the wrong scale, low coverage): a probe's, an update's."""
    n_gallery = query_acc.n_gallery
    score_stats = query_acc.score_stats()
    attrs = {
        "gallery_rows": n_gallery, "bank_rows": query_acc.n_rows,
        "gallery_bank_rows": gallery_acc.n_rows if gallery_acc else 0, "similarity": similarity,
        "gallery_identity": gallery_identity, "score_scale": scale.classify(score_stats),
        **{f"score_{part}": value for part, value in score_stats.as_dict().items()},
    }
    diagnostics = bank_diagnostics(query_acc.neighbors.indices, k, n_gallery)
    found = [scale.beta_warning(b, score_stats) for b in query_acc.betas]
    if gallery_acc is not None:
        gallery_stats = gallery_acc.score_stats()
        attrs.update({f"gallery_score_{part}": value for part, value in gallery_stats.as_dict().items()})
        option = registry.by_keyword("gallery_betas").name
        found += [scale.beta_warning(b, gallery_stats, option, check_low=False) for b in gallery_acc.betas]
    found.append(coverage_warning(diagnostics, n_gallery, param(f"method={registry.DEFAULT.name!r}")))
    return attrs, diagnostics, found


def cross_bank_scores(bank_scores: ScoreSource, gallery_scores: ScoreSource | None, sims, inputs: list,
                      ) -> ScoreSource | None:
    """The bank × gallery-bank scores dbsn needs: precomputed (`sims`, recorded in `inputs`), or the
    product of the bank and gallery-bank embeddings; None when neither is at hand."""
    if sims is not None:
        source = similarities(sims, "bank_gallery_bank_sims")
        if source.rows != bank_scores.n_rows:
            raise DataError(f"{source.label} has {source.rows} rows but the bank has {bank_scores.n_rows} queries")
        if gallery_scores is not None and source.cols != gallery_scores.n_rows:
            raise DataError(f"{source.label} has {source.cols} columns but the gallery bank has "
                            f"{gallery_scores.n_rows} items")
        inputs.append(source)
        return MatrixScores(source)
    if isinstance(bank_scores, EmbeddingScores) and isinstance(gallery_scores, EmbeddingScores):
        return EmbeddingScores(bank_scores.rows, gallery_scores.rows)
    return None


GALLERY_BLOCK = 4096  # gallery rows per step of the centroid distances and moments


def centroid_statistics(scores: EmbeddingScores, neighbors: np.ndarray, ks) -> dict[str, Stored]:
    """The probe's /centroid_distance: ‖g_j − c_K(g_j)‖² for each K of `ks`, c_K(g_j) the mean of the
    bank embeddings at the first K of neighbors[j] (each item's bank rows best first; float64)."""
    n_gallery, width = neighbors.shape
    ks = [min(k, width) for k in ks]
    out = np.empty((len(ks), n_gallery))
    for c0 in range(0, n_gallery, GALLERY_BLOCK):
        c1 = min(c0 + GALLERY_BLOCK, n_gallery)
        gallery = scores.cols.rows_of(slice(c0, c1)).astype(np.float64)
        wanted, where = np.unique(neighbors[c0:c1].ravel(), return_inverse=True)
        bank = scores.rows.rows_of(wanted).astype(np.float64)[where].reshape(c1 - c0, width, -1)
        for row, k in enumerate(ks):
            centroid = bank[:, :k].mean(axis=1)
            out[row, c0:c1] = np.einsum("ij,ij->i", gallery - centroid, gallery - centroid)
    return {"/centroid_distance": Stored(out, {"ks": np.asarray(ks, dtype=np.int64)})}


def gallery_moments_of(gallery) -> tuple[np.ndarray, np.ndarray]:
    """(ḡ, M = mean_j g_j g_jᵀ) of the gallery embeddings as they are scored (float64)."""
    n = gallery.rows
    total = np.zeros(gallery.dim)
    moment = np.zeros((gallery.dim, gallery.dim))
    for c0 in range(0, n, GALLERY_BLOCK):
        block = gallery.rows_of(slice(c0, min(c0 + GALLERY_BLOCK, n))).astype(np.float64)
        total += block.sum(axis=0)
        moment += block.T @ block
    return total / n, moment / n
