"""`tune`: choose the normaliser and its parameters on validation data; the params file it writes.

Every setting of the grid (each method's parameters, registry.grid) needs only statistics that one
probe pass computes for all β and K at once, so the bank is read once; each setting then costs one
streamed normalise of the validation scores (kept in memory when they fit). The winner is written
as a small JSON file (kind `params`) that `probe` and `normalise` read back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qbnorm_cli import methods as registry
from qbnorm_cli.api.common import bounded, check_choice, progress_or_none, score_source, similarities, warn
from qbnorm_cli.api.probing import SinkhornSettings, cross_bank_scores, probe_statistics
from qbnorm_cli.core import metrics, scale
from qbnorm_cli.core.statistics import bank_diagnostics, coverage_warning
from qbnorm_cli.errors import DataError, UsageError, param, plain_text
from qbnorm_cli.io import remote
from qbnorm_cli.io.atomic import check_target, created_now, write_json
from qbnorm_cli.io.groundtruth import read_relevant
from qbnorm_cli.io.paramsfile import PARAMS_KIND
from qbnorm_cli.io.probefile import SORTED, Probe, Stored
from qbnorm_cli.io.sinks import Column, Sink
from qbnorm_cli.streaming.budget import DEFAULT_MEMORY, make_budget
from qbnorm_cli.streaming.engine import run_normalise
from qbnorm_cli.streaming.sources import CachedScores, EmbeddingScores, MatrixScores, sample_stats
from qbnorm_cli.version import FORMAT_VERSION, VERSION

METRICS = {"geom": "GeomR", "R@1": "R@1", "R@5": "R@5", "R@10": "R@10", "MdR": "MdR"}
TOP_CANDIDATES = 10
SETTING_FIELDS = tuple(registry.PARAMETERS)  # every parameter, None where a method does not use it


@dataclass(frozen=True)
class Setting:
    """One point of the grid: a method and its parameter values."""

    method: registry.Method
    values: dict

    def label(self) -> str:
        return registry.label(self.method, self.values)

    def as_dict(self) -> dict:
        return {"method": self.method.name, **{name: self.values.get(name) for name in SETTING_FIELDS}}


def evaluate_setting(scores, norm, relevant: np.ndarray, budget) -> dict:
    """R@K, MdR, MnR, GeomR of one normaliser on the validation scores, plus the normalised share."""
    rank = np.empty(scores.n_rows)
    gated = np.zeros(scores.n_rows, dtype=bool)
    for q0, (values, _, rows_gated) in run_normalise(scores, norm, budget, None):
        q1 = q0 + len(values)
        rank[q0:q1] = metrics.ranks(values, relevant[q0:q1])
        gated[q0:q1] = rows_gated
    out = metrics.recall_summary(rank)
    out["normalised"] = 100.0 * float(gated.mean())
    return out


def rank_results(rows: list[dict], metric: str) -> list[dict]:
    """Best first: higher recall (lower MdR), then higher R@1, GeomR; grid order breaks ties."""
    sign = 1.0 if metric in metrics.LOWER_IS_BETTER else -1.0
    return sorted(rows, key=lambda row: (sign * row["metrics"][metric], -row["metrics"]["R@1"],
                                         -row["metrics"]["GeomR"]))


def best_per_method(ranked: list[dict]) -> list[dict]:
    seen, out = set(), []
    for row in ranked:
        if row["setting"].method.name not in seen:
            seen.add(row["setting"].method.name)
            out.append(row)
    return out


def edge_note(best: Setting, settings: list[Setting]) -> str | None:
    """A hint when the winning β or β₂ is the largest or smallest value tried for its method."""
    for name, many in ((name, p.many) for name, p in registry.PARAMETERS.items() if p.scaled):
        value = best.values.get(name)
        tried = sorted({s.values[name] for s in settings if s.method is best.method and name in s.values})
        if value is None or len(tried) < 3 or value not in (tried[0], tried[-1]):
            continue
        side, further = ("largest", value * 2) if value == tried[-1] else ("smallest", value / 2)
        return (f"the best {best.method.name} setting uses the {side} {param(name)} tried ({value:g}); the optimum "
                f"may lie beyond: try {param(many)} {value:g} {param(many)} {further:g} …")
    return None


@bounded
def tune(queries=None, gallery=None, gt=None, bank=None, *, sims=None, bank_sims=None, gallery_bank=None,
         gallery_bank_sims=None, bank_gallery_bank_sims=None, metric: str = "geom", methods=None, betas=None,
         gallery_betas=None, similarity: str = "cosine", memory=DEFAULT_MEMORY, block_rows: int | None = None,
         output=None, force: bool = False, progress=None, provenance: str | None = None) -> dict:
    """Evaluate every setting of the chosen methods on validation data and pick the best.

    queries, gallery, gt: the validation split (embeddings, or `sims` precomputed scores, and its
    ground truth); bank: training queries (or `bank_sims`); gallery_bank: gallery-modality items
    (enables the dual methods; dbsn needs the bank's scores against it: both as embeddings, or
    `bank_gallery_bank_sims`). metric: geom | R@1 | R@5 | R@10 | MdR (minimised). methods:
    method names (default: the registry's tuned methods). betas, gallery_betas: values instead of
    the grids (which follow the score scale). output: write the best settings as a params file.

    Cost: one probe pass for every statistic of the grid; with sn or dbsn in it, the Sinkhorn
    iterations of every β of their grid (until converged, probe's defaults), each one more pass over
    the bank × validation-gallery scores (for dbsn: and bank × gallery-bank), held in memory when
    they fit half the budget; then one streamed normalise per setting.

    Returns {"best": setting and metrics, "raw": the baseline's metrics, "ranked": every setting
    best first, "bank": the bank's diagnostics, "document": what the params file holds, …}.
    """
    budget = make_budget(memory, block_rows)
    metric_name = METRICS[check_choice(metric, tuple(METRICS), "metric")]
    tried = registry.tried({"betas": betas, "gallery_betas": gallery_betas})

    val_scores, val_inputs, gallery_emb = score_source(
        queries, gallery, sims, rows_name="queries", cols_name="gallery", sims_name="sims",
        similarity=similarity, budget=budget, what="tune")
    inputs = dict(zip(("sims",) if sims is not None else ("queries", "gallery"), val_inputs, strict=True))
    n_gallery = val_scores.n_cols
    bank_scores = _bank_scores("bank", bank, bank_sims, gallery_emb, n_gallery, similarity, budget, inputs)
    if bank_scores is None:
        raise UsageError(f"tune needs {param('bank')} (or {param('bank_sims')})")
    gallery_scores = _bank_scores("gallery_bank", gallery_bank, gallery_bank_sims, gallery_emb, n_gallery,
                                  similarity, budget, inputs)
    if gt is None:
        raise UsageError(f"tune needs {param('gt')}")
    relevant, inputs["gt"] = read_relevant(gt, val_scores.n_rows, [(inputs.get("sims", inputs.get("gallery")).label,
                                                                    n_gallery)], "the validation set")
    if not (relevant >= 0).any(axis=1).all():
        row = int(np.argmax(~(relevant >= 0).any(axis=1)))
        raise DataError(f"{inputs['gt'].label}: query {row} has no relevant item")
    if output is not None:
        check_target(Path(output), force, list(inputs.values()))
        if "::" in str(output):
            raise UsageError(f"{output}: the settings are written to a plain JSON file, e.g. params.json")
    overlap = _overlap_warning(inputs)

    cross_scores = cross_bank_scores(bank_scores, gallery_scores, bank_gallery_bank_sims, [])
    if cross_scores is not None and bank_gallery_bank_sims is not None:
        inputs["bank_gallery_bank"] = cross_scores.source
    chosen = registry.tuned_methods(methods, gallery_scores is not None, cross_scores is not None)
    stats = sample_stats(bank_scores, max_cols=4096)
    settings = [Setting(m, v) for m, v in registry.grid(chosen, registry.scaled_grids(stats), tried,
                                                       k_limit=n_gallery)]
    embedded = isinstance(val_scores, EmbeddingScores) and isinstance(bank_scores, EmbeddingScores)
    unscorable = sorted({s.method.name for s in settings if not embedded and _needs_embeddings(s)})
    if unscorable and methods is not None:
        raise UsageError(f"{param('methods')} {', '.join(unscorable)}: need(s) the queries, gallery and bank as "
                         "embeddings, not precomputed scores")
    settings = [s for s in settings if embedded or not _needs_embeddings(s)]
    needs = registry.ProbeRequest.of([(s.method, s.values) for s in settings])
    kmax = max(needs.kmax, registry.KMAX_MIN)
    if needs.keep_sorted and not budget.fits(n_gallery * bank_scores.n_rows * 4, 0.5) and budget.block_rows is None:
        keeping = ", ".join(sorted({s.method.name for s in settings if s.method.needs_for(s.values).sorted_bank}))
        raise UsageError(f"{param('methods')} {keeping} keep(s) {n_gallery} × {bank_scores.n_rows} bank scores; "
                         f"raise {param('memory')} or leave them out")
    sinkhorn = (SinkhornSettings(), needs.sinkhorn_betas, needs.dual_sinkhorn_betas) \
        if needs.sinkhorn_betas or needs.dual_sinkhorn_betas else None
    sorted_column = {SORTED: Column(bank_scores.n_rows, np.float32)} if needs.keep_sorted else {}
    with Sink(None, "probe", n_gallery, sorted_column) as sink:
        query_acc, _, store, sinkhorn_found = probe_statistics(
            bank_scores, gallery_scores, cross_scores, betas=needs.betas, gallery_betas=needs.gallery_betas,
            kmax=kmax, k=1, topk_means=needs.topk_means, keep_sorted=needs.keep_sorted,
            column_moments=needs.column_std, centroid_ks=needs.centroid_ks, gallery_moments=needs.gallery_moments,
            sinkhorn=sinkhorn, budget=budget, progress=progress, sink=sink)
    if needs.keep_sorted:
        store[SORTED] = Stored(sink.arrays[SORTED])
    full_stats = query_acc.score_stats()
    scale_name = scale.classify(full_stats)
    probe = Probe(store, {"gallery_rows": n_gallery, "bank_rows": bank_scores.n_rows,
                          "similarity": similarity if embedded else "precomputed", "score_scale": scale_name},
                  path="the tuning probe")
    diag = bank_diagnostics(query_acc.neighbors.indices, 1, n_gallery)
    found = [overlap, coverage_warning(diag, n_gallery, param(f"method={registry.DEFAULT.name!r}")), *sinkhorn_found]

    scores = CachedScores(val_scores, budget)
    rows = []
    with progress_or_none(progress)("tune", len(settings), unit="settings") as advance:
        for setting in settings:
            norm = registry.build(setting.method, probe, setting.values)
            rows.append({"setting": setting, "metrics": evaluate_setting(scores, norm, relevant, budget)})
            advance(1)
    raw = rows[0]["metrics"]
    ranked = rank_results(rows, metric_name)
    best = ranked[0]
    validation = {role: {**item.describe(), "path": None if not item.path else item.path if remote.is_url(item.path)
                         else str(Path(item.path).resolve())} for role, item in inputs.items()}
    found = [w for w in found if w]
    given = {"bank": "bank_sims" if bank_sims is not None else "bank",
             "gallery_bank": "gallery_bank_sims" if gallery_bank_sims is not None else "gallery_bank",
             "bank_gallery_bank": "bank_gallery_bank_sims"}
    banks = {role: {"option": option, **validation[role]} for role, option in given.items() if role in validation}
    document = params_document(best["setting"], best["metrics"], raw, metric_name, validation, full_stats,
                               scale_name, ranked, len(settings), provenance, [plain_text(w) for w in found],
                               banks)
    for message in found:
        warn(message)
    if output is not None:
        write_json(output, document, force=force, inputs=list(inputs.values()))
    return {"best": best, "raw": raw, "ranked": ranked, "settings": settings, "metric": metric_name,
            "bank": diag, "scores": full_stats, "score_scale": scale_name, "document": document,
            "queries": val_scores.n_rows, "gallery_rows": n_gallery, "note": edge_note(best["setting"], settings),
            "warnings": document["warnings"]}


def _needs_embeddings(setting: Setting) -> bool:
    """Whether a setting's statistics come from embeddings (bank centroids, gallery moments)."""
    needs = setting.method.needs_for(setting.values)
    return needs.centroid or needs.gallery_moments


def _bank_scores(role, emb_spec, sims_spec, gallery_emb, n_gallery, similarity, budget, inputs):
    if emb_spec is not None and sims_spec is not None:
        raise UsageError(f"give either {param(role)} or {param(role + '_sims')}, not both")
    if sims_spec is not None:
        src = similarities(sims_spec, role + "_sims")
        if src.cols != n_gallery:
            raise DataError(f"{src.label} has {src.cols} columns but the validation gallery has {n_gallery} items")
        inputs[role] = src
        return MatrixScores(src)
    if emb_spec is None:
        return None
    if gallery_emb is None:
        raise UsageError(f"{param(role)} needs {param('gallery')}; with {param('sims')} use {param(role + '_sims')}")
    scores, more, _ = score_source(emb_spec, None, None, rows_name=role, cols_name="gallery", sims_name=role + "_sims",
                                   similarity=similarity, budget=budget, what="tune", cols_embeddings=gallery_emb)
    inputs[role] = more[0]
    return scores


def _overlap_warning(inputs: dict) -> str | None:
    """Tuning is only honest when the bank is not the validation queries themselves."""
    query_side, bank = inputs.get("queries"), inputs.get("bank")
    if query_side is not None and bank is not None and query_side.identity == bank.identity:
        return (f"the bank {bank.label} holds the validation queries {query_side.label} themselves; "
                "build it from training queries, or the tuned gain will not carry over")
    return None


# --- the params file -------------------------------------------------------------------------------

def _metric_values(result: dict) -> dict:
    return {k: v for k, v in result.items() if k in metrics.METRIC_NAMES or k == "normalised"}


def params_document(setting: Setting, result: dict, raw: dict, metric: str, validation: dict, stats,
                    scale_name: str, ranked: list[dict], evaluated: int, provenance: str | None,
                    warnings: list[str] = (), banks: dict | None = None) -> dict:
    return {
        "qbnorm_kind": PARAMS_KIND, "qbnorm_version": FORMAT_VERSION, "created_by": f"qbnorm {VERSION}",
        "created_at": created_now(), "command": provenance or "qbnorm_cli.tune (Python)",
        **setting.as_dict(),
        "metric": metric, "metrics": _metric_values(result), "raw_metrics": _metric_values(raw),
        "score_scale": scale_name, "scores": stats.as_dict(),
        "validation": validation, "banks": banks or {}, "settings_evaluated": evaluated,
        "candidates": [{**row["setting"].as_dict(), "metrics": _metric_values(row["metrics"])}
                       for row in ranked[:TOP_CANDIDATES]],
        "warnings": list(warnings),
    }
