"""`update_probe`: the probe of a changed gallery and bank, from the old probe and what changed.

The final gallery is the old gallery's kept rows (removals refer to old rows and happen first), then
the added items; the final bank is the old bank, then the added queries. With B the old bank, Bn the
added queries, Gk the kept items and Gn the added ones, two probe passes cover every score that is
new: (B ∪ Bn) × Gn (the new items' columns, complete) and Bn × Gk (the new rows of the kept
columns). The kept columns' records then merge by their declared rules (core/probestats.py:
log-sum-exp, sum, min, max, top-k) and the normalisers' statistics are derived from the records
as a probe derives them; each bank row's neighbour list merges with its new items, and a row whose
known neighbours fell below kmax through removals is recounted against the final gallery. Cost:
O((N + Nn)·Gn + Nn·Gk) scores, and O(affected rows · G) for the recounts. The Sinkhorn potentials
have no exact merge: they iterate again from the old ones (a warm start) to the same tolerance;
a fixed iteration count (sinkhorn_iters) starts cold, as a fresh probe would.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np

from qbnorm_cli import methods as registry
from qbnorm_cli.api.common import bounded, clustered, embeddings
from qbnorm_cli.api.probing import (
    GALLERY_BLOCK,
    SinkhornSettings,
    centroid_statistics,
    probe_pass,
    probe_result,
    probe_summary,
    sinkhorn_potentials,
)
from qbnorm_cli.core import probestats, topk
from qbnorm_cli.core.memory import mapped_empty
from qbnorm_cli.core.probestats import (
    BY_NAME,
    ITEM_FIELDS,
    ITEM_MAJOR,
    MERGES,
    fingerprints,
    item_record,
    merge_top,
)
from qbnorm_cli.core.statistics import BankAccumulator, derive_items
from qbnorm_cli.errors import DataError, UsageError, param
from qbnorm_cli.io import limits
from qbnorm_cli.io.probefile import KEPT_ATTRS, SORTED, Probe, Stored, statistics
from qbnorm_cli.io.sinks import Column, Sink
from qbnorm_cli.io.specs import as_input
from qbnorm_cli.streaming.budget import DEFAULT_MEMORY, make_budget
from qbnorm_cli.streaming.sources import Embeddings, EmbeddingScores

REPROBE = "re-probe once with this version"


@bounded
def update_probe(probe, *, bank=None, gallery=None, gallery_bank=None, add_gallery=None, remove_gallery=None,
                 add_bank=None, add_gallery_bank=None, memory=DEFAULT_MEMORY, block_rows: int | None = None,
                 output=None, force: bool = False, progress=None, provenance: str | None = None,
                 cluster=None) -> Probe:
    """The probe of the final gallery and bank, equal to a fresh `probe` of them (every statistic
    within the float64 error of its merge; the Sinkhorn potentials converged to the same tolerance).

    probe: a `Probe` or a probe file made by this version. bank, gallery (and gallery_bank for a
    probe with one): the embeddings the probe was made from, checked row by row against the
    fingerprints it recorded (DataError when they differ). remove_gallery: old gallery rows to drop
    (a 1-D integer array or file); add_gallery: items appended after the kept rows; add_bank: bank
    queries appended after the old ones; add_gallery_bank: gallery-bank items appended (dual
    methods). The probe's settings (betas, k, topk_means, sinkhorn …) are kept. memory, block_rows,
    output, force, progress, cluster: as for `probe`. Returns the new `Probe`; `Probe.update` says
    what changed and, with Sinkhorn, the iterations of the warm start.
    """
    budget = make_budget(memory, block_rows)
    opened = nullcontext(probe) if isinstance(probe, Probe) else Probe.load(probe)
    with opened as old:  # a probe opened here is closed here
        label = old.label
        if old.attrs.get("similarity") == "precomputed":
            raise UsageError(f"{label} was probed from precomputed scores: an update needs the embeddings; probe again "
                             f"from {param('bank')} and {param('gallery')}")
        missing = probestats.updatable(old.dataset_names())
        if missing:
            raise DataError(f"{label} lacks what an update needs ({', '.join(missing[:3])}): it was made by an earlier "
                            f"qbnorm; {REPROBE}")
        if all(v is None for v in (add_gallery, remove_gallery, add_bank, add_gallery_bank)):
            raise UsageError(f"nothing to update: give {param('add_gallery')}, {param('remove_gallery')}, "
                             f"{param('add_bank')} or {param('add_gallery_bank')}")
        dual = old.has("/gallery_log_norm")
        if add_gallery_bank is not None and not dual:
            raise UsageError(f"{param('add_gallery_bank')}: {label} has no gallery bank to add to")
        if bank is None or gallery is None or (dual and gallery_bank is None):
            need = [param(name) for name in ("bank", "gallery", "gallery_bank")[:3 if dual else 2]]
            raise UsageError(f"an update reads the embeddings {label} was made from: give its "
                             f"{', '.join(need[:-1])} and {need[-1]}")
        params = old.params
        similarity = old.attrs["similarity"]
        n_gallery = old.n_gallery

        gallery_in = embeddings(gallery, "gallery")
        _check_size(gallery_in, n_gallery, label, "gallery items")
        removed = _removals(remove_gallery, n_gallery)
        kept = np.delete(np.arange(n_gallery), removed)  # removed: ascending and unique
        inputs = [gallery_in]
        added = np.zeros((0, gallery_in.cols), dtype=np.float32)
        if add_gallery is not None:
            add_in = embeddings(add_gallery, "add_gallery")
            added = _rows(add_in, gallery_in.cols, gallery_in.label)
            inputs.append(add_in)
        if kept.size + added.shape[0] == 0:
            raise UsageError(f"{param('remove_gallery')} removes every item of the gallery and nothing is added")
        recorded = {"gallery": old.record("/gallery_row_hash")}  # each input's row hashes, read once
        final_gallery, removed_rows = _checked_rows(gallery_in, recorded["gallery"], kept, added, label)
        n_kept, n_final = kept.size, final_gallery.shape[0]

        sides = [("bank", bank, add_bank, old.n_bank)]
        if dual:
            sides.append(("gallery_bank", gallery_bank, add_gallery_bank, int(old.attrs["gallery_bank_rows"])))
        final_banks = {}
        for role, given, more, n_rows in sides:
            given_in = embeddings(given, role)
            _check_size(given_in, n_rows, label, "bank queries" if role == "bank" else "gallery-bank items",
                        dim=gallery_in.cols, dim_of=gallery_in.label)
            inputs.insert(0 if role == "bank" else len(inputs), given_in)
            new = np.zeros((0, gallery_in.cols), dtype=np.float32)
            if more is not None:
                more_in = embeddings(more, f"add_{role}")
                new = _rows(more_in, gallery_in.cols, given_in.label)
                inputs.append(more_in)
            recorded[role] = old.record(f"/{role}_row_hash")
            rows, _ = _checked_rows(given_in, recorded[role], np.arange(n_rows), new, label)
            final_banks[role] = (rows, n_rows)

        # what is taken of the final rows as read, before they are normalised where they lie
        gallery_identity = as_input(final_gallery, "gallery").identity
        row_hashes = {"gallery": np.concatenate([recorded["gallery"][kept], fingerprints(final_gallery[n_kept:])])}
        for role, (rows, n_old) in final_banks.items():
            row_hashes[role] = np.concatenate([recorded[role], fingerprints(rows[n_old:])])
        eager = cluster is None

        def whole(array, name, in_place=False):
            return Embeddings(as_input(array, name), similarity, budget, eager=eager, in_place=in_place)

        def part(of, array, r0, r1, name):  # rows r0:r1 of `of` (None for none: an input is never empty)
            held = of.rows_of(slice(r0, r1)) if eager and of.held else None
            return Embeddings(as_input(array[r0:r1], name), similarity, budget, eager=eager, held=held) \
                if r1 > r0 else None

        # the whole final gallery: read and normalised once, its kept and new items its parts
        final_emb = whole(final_gallery, "gallery", in_place=True)
        kept_emb = part(final_emb, final_gallery, 0, n_kept, "gallery")
        new_emb = part(final_emb, final_gallery, n_kept, n_final, "add_gallery")
        betas = {"bank": np.asarray(params["betas"], dtype=np.float64),
                 "gallery_bank": np.asarray(params.get("gallery_betas") or [], dtype=np.float64)}
        kmax, k = int(params["kmax"]), int(params["k"])
        ks = tuple(int(v) for v in params[registry.by_keyword("topk_means").params_key])
        keep_sorted = bool(params.get("keep_sorted"))
        moments = old.has("/column_std")
        centroid_ks = [int(v) for v in old.record_attr("/centroid_distance", "ks")] \
            if old.has("/centroid_distance") else []
        centroid_k = max(centroid_ks, default=0)

        out_params = {**params, "memory": budget.memory, "block_rows": block_rows,
                      "update": {"from": old.uuid, "removed_gallery": int(removed.size),
                                 "added_gallery": int(n_final - n_kept),
                                 "added_bank": int(final_banks["bank"][0].shape[0] - old.n_bank),
                                 "added_gallery_bank": int(final_banks["gallery_bank"][0].shape[0] -
                                                           final_banks["gallery_bank"][1]) if dual else 0}}
        n_bank_final = final_banks["bank"][0].shape[0]
        if output is not None:
            per_item = 8 * (len(betas["bank"]) + len(betas["gallery_bank"]) + 3 * len(ks) + 8) + 4 * max(ks, default=0)
            limits.check_output(output, n_final * per_item + n_bank_final * (kmax + probestats.SPARE) * 16
                                + (4 * n_final * n_bank_final if keep_sorted else 0), f"the update of {label}")
        sorted_column = {SORTED: Column(n_bank_final, np.float32)} if keep_sorted else {}
        accs = {}
        sorted_parts: dict[str, dict[int, np.ndarray]] = {"new_items": {}, "new_rows": {}}
        with clustered(cluster) as session, Sink(output, "probe", n_final, sorted_column, force=force,
                                                 params=out_params, inputs=inputs, provenance=provenance) as sink:
            def run(banks, n_cols, parts):
                def on_sorted(number, c0, c1, block):
                    if number == 0:
                        parts[c0] = block

                if banks and n_cols:
                    probe_pass(banks, n_cols, budget, session, on_sorted, progress, what="update")

            passes_new_items, passes_new_rows = [], []
            keep = slice(None) if n_kept == n_gallery else kept
            records = {role: _old_records(old, role, keep, n_final) for role in final_banks}
            for role, (rows, n_old) in final_banks.items():
                is_bank = role == "bank"
                make = lambda n, g, floor=None, rows_floor=None, role=role, is_bank=is_bank: BankAccumulator(
                    n, g, betas[role], kmax, ks if is_bank else (), keep_sorted and is_bank,
                    column_moments=moments and is_bank, neighbor_k=centroid_k if is_bank else 0, item_floor=floor,
                    row_floor=rows_floor)
                all_rows = whole(rows, role, in_place=True)
                new_rows = part(all_rows, rows, n_old, rows.shape[0], f"add_{role}")
                # every row × the new items: of an old row's, only those above the last score of its
                # old list can enter it
                a = make(rows.shape[0], n_final - n_kept, rows_floor=_row_floors(old, role, rows.shape[0]))
                # the new rows × the kept items: of their scores only those above an item's old K-th
                # largest can enter its K largest (unless K grows with the bank, or dsl's nearest rows
                # need the scores of the new rows' best)
                old_top = records[role][0]["item_top"]
                floor = old_top[:, -1] if old_top.shape[1] == min(max(ks, default=0), rows.shape[0]) \
                    and old_top.shape[1] and not centroid_k else None
                c = make(rows.shape[0] - n_old, n_kept, floor)
                if new_emb is not None:
                    passes_new_items.append((EmbeddingScores(all_rows, new_emb), a))
                if new_rows is not None and kept_emb is not None:
                    passes_new_rows.append((EmbeddingScores(new_rows, kept_emb), c))
                accs[role] = (a, c, all_rows, n_old)
            run(passes_new_items, n_final - n_kept, sorted_parts["new_items"])
            run(passes_new_rows, n_kept, sorted_parts["new_rows"])

            merged = {role: _merge(old, role, records[role], a, c, kept, n_old, all_rows, final_emb, betas[role], kmax,
                                   ks if role == "bank" else (), moments and role == "bank",
                                   centroid_k if role == "bank" else 0)
                      for role, (a, c, all_rows, n_old) in accs.items()}
            query_acc, gallery_acc = merged["bank"], merged.get("gallery_bank")
            datasets = statistics(query_acc, gallery_acc, k)
            if centroid_k:  # recomputed from each item's merged nearest bank rows: O(G · K · d)
                datasets.update(centroid_statistics(EmbeddingScores(accs["bank"][2], final_emb),
                                                    query_acc.column_topk_index, centroid_ks))
            datasets.update({f"/{role}_row_hash": Stored(hashes) for role, hashes in row_hashes.items()})
            if old.has("/gallery_mean"):
                mean, moment = _moments(old, whole(removed_rows, "gallery") if removed.size else None, new_emb,
                                        n_final)
                datasets["/gallery_mean"], datasets["/gallery_second_moment"] = Stored(mean), Stored(moment)
            if keep_sorted:
                _sorted_bank(old, kept, sorted_parts, n_kept, sink)
            sinkhorn_found, warm = [], None
            if params.get("sinkhorn"):
                settings = SinkhornSettings(params.get("sinkhorn_iters"), params.get("sinkhorn_tol"),
                                            params.get("sinkhorn_max_iters"))
                bank_scores = EmbeddingScores(accs["bank"][2], final_emb)
                cross = EmbeddingScores(accs["bank"][2], accs["gallery_bank"][2]) \
                    if dual and params.get("dual_sinkhorn") else None
                starts = None if settings.iters is not None else _warm_starts(old, kept, n_final, cross)
                potentials, sinkhorn_found = sinkhorn_potentials(bank_scores, cross, list(betas["bank"]),
                                                                 list(betas["bank"]), settings, budget, progress,
                                                                 starts=starts)
                datasets.update(potentials)
                warm = starts is not None
            attrs, diagnostics, found = probe_summary(query_acc, gallery_acc, k, similarity,
                                                      gallery_identity)
            found = [w for w in found + sinkhorn_found if w]
            sink.finish(datasets, {name: attrs.get(name) for name in KEPT_ATTRS}, found)
        result = probe_result(output, sink, datasets, attrs, diagnostics, found, out_params, inputs, session)
        result.update = {**out_params["update"], "gallery_rows": n_final, "bank_rows": n_bank_final,
                         "recounted_rows": int(query_acc.recounted), "sinkhorn_warm_start": warm}
    return result


def _check_size(item, expected: int, label: str, what: str, dim: int | None = None,
                dim_of: str | None = None) -> None:
    """Refuse an input of other rows or dimension than the probe's."""
    if item.rows != expected:
        raise DataError(f"{item.label} has {item.rows} rows but {label} was made with {expected} {what}")
    if dim is not None and item.cols != dim:
        raise DataError(f"{item.label} has dimension {item.cols} but {dim_of} has {dim}")


def _rows(item, dim: int, dim_of: str) -> np.ndarray:
    """All rows of an added input as float32 (as read: the Embeddings normalise them as a probe does)."""
    if item.cols != dim:
        raise DataError(f"{item.label} has dimension {item.cols} but {dim_of} has {dim}")
    return item.read(0, item.rows)


def _checked_rows(item, recorded: np.ndarray, kept: np.ndarray, added: np.ndarray,
                  label: str) -> tuple[np.ndarray, np.ndarray]:
    """The kept rows of an input followed by `added`, in one array (the final rows: read once, no
    concatenation), and the rows not kept. Refuses an input whose kept rows are not the rows the
    probe measured (their hashes, core/probestats.fingerprints, differ from those recorded).
    The final rows are mapped up front (core/memory.py: their first touch was 0.3 s of an update)."""
    out = mapped_empty((kept.size + added.shape[0], item.cols), np.float32)
    keep = np.zeros(item.rows, dtype=bool)
    keep[kept] = True
    dropped, differ, at = [], [], 0
    for r0 in range(0, item.rows, GALLERY_BLOCK):
        r1 = min(r0 + GALLERY_BLOCK, item.rows)
        mask = keep[r0:r1]
        if mask.all():  # read where the rows go
            rows = item.read_into(out[at:at + r1 - r0], r0)
        else:
            block = item.read(r0, r1)
            rows = out[at:at + int(mask.sum())]
            rows[...] = block[mask]
            dropped.append(block[~mask])
        numbers = r0 + np.flatnonzero(mask)
        differ.append(numbers[fingerprints(rows) != recorded[numbers]])
        at += rows.shape[0]
    differ = np.concatenate(differ)
    if differ.size:
        raise DataError(f"{item.label}: row {int(differ[0])} is not the row {label} was made with (its fingerprint "
                        f"differs; {differ.size} rows differ): update against the inputs of that probe")
    out[at:] = added
    return out, np.concatenate(dropped) if dropped else np.zeros((0, item.cols), dtype=np.float32)


def _removals(remove, n_gallery: int) -> np.ndarray:
    """The old gallery rows to drop: ascending, unique, each within the gallery."""
    if remove is None:
        return np.zeros(0, dtype=np.int64)
    item = as_input(remove, "remove_gallery", ndim=(1,))
    raw = item.read_raw()
    if raw.dtype.kind not in "iu" and not (raw.dtype.kind == "f" and np.all(np.isfinite(raw))
                                           and np.all(raw == np.round(raw))):
        raise DataError(f"{item.label}: gallery row numbers are integers, not {raw.dtype}")
    rows = raw.astype(np.int64)
    bad = (rows < 0) | (rows >= n_gallery)
    if bad.any():
        raise DataError(f"{item.label}: entry {int(np.argmax(bad))} is {int(rows[np.argmax(bad)])}, not a row of the "
                        f"gallery of {n_gallery} items")
    return np.unique(rows)


def merge_lists(parts, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge per-row neighbour lists of disjoint item sets: parts of (indices (R, w), values, complete
    (R,)), each row best first with −1 pads at its end, `complete` where a list holds every item of
    its set. Returns (indices, values, exact) of `width` columns: the merged lists best first (ties
    to the lower index, as a probe keeps them) and how many leading entries of each row are certain
    (the rest is padded): an incomplete list's unknown items may come after its last known one.

    A row whose other parts are empty and complete, and whose first part is in merged order
    already, is its first part (most rows of an update: few new items enter a row's list)."""
    first_idx, first_vals = np.asarray(parts[0][0], dtype=np.int64), np.asarray(parts[0][1], dtype=np.float64)
    valid = first_idx >= 0
    same = (valid[:, :-1] >= valid[:, 1:]).all(axis=1)  # pads only at the end
    pair = valid[:, 1:]
    before, after = first_vals[:, :-1], first_vals[:, 1:]
    same &= (~pair | (before > after) | ((before == after) & (first_idx[:, :-1] < first_idx[:, 1:]))).all(axis=1)
    for idx, _, complete in parts[1:]:
        same &= np.asarray(complete, dtype=bool) & (np.asarray(idx) < 0).all(axis=1)
    n_first = first_idx.shape[1]
    idx = np.full((first_idx.shape[0], width), -1, dtype=np.int64)
    vals = np.full((first_idx.shape[0], width), -np.inf)
    idx[:, :min(width, n_first)] = np.where(valid, first_idx, -1)[:, :width]
    vals[:, :min(width, n_first)] = np.where(valid, first_vals, -np.inf)[:, :width]
    exact = np.minimum(valid.sum(axis=1), width)
    rest = np.flatnonzero(~same)
    if rest.size:
        idx[rest], vals[rest], exact[rest] = _merge_rows([tuple(np.asarray(x)[rest] for x in p) for p in parts], width)
    return idx, vals, exact


def _merge_rows(parts, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """merge_lists by one sort of every row's entries (value descending, then index)."""
    idx = np.concatenate([p[0] for p in parts], axis=1).astype(np.int64)
    vals = np.concatenate([p[1] for p in parts], axis=1).astype(np.float64)
    source = np.concatenate([np.full(p[0].shape, n) for n, p in enumerate(parts)], axis=1)
    valid = idx >= 0
    vals = np.where(valid, vals, -np.inf)
    order = np.lexsort((np.where(valid, idx, np.iinfo(np.int64).max), -vals, ~valid), axis=-1)
    idx, vals = np.take_along_axis(idx, order, 1), np.take_along_axis(vals, order, 1)
    valid, source = np.take_along_axis(valid, order, 1), np.take_along_axis(source, order, 1)
    position = np.arange(idx.shape[1])
    exact = valid.sum(axis=1)
    for n, (_, _, complete) in enumerate(parts):
        last = np.where(valid & (source == n), position, -1).max(axis=1, initial=-1) + 1
        exact = np.where(complete, exact, np.minimum(exact, last))
    exact = np.minimum(exact, width)
    idx, vals = idx[:, :width], vals[:, :width]
    if idx.shape[1] < width:
        idx = np.pad(idx, ((0, 0), (0, width - idx.shape[1])), constant_values=-1)
        vals = np.pad(vals, ((0, 0), (0, width - vals.shape[1])), constant_values=-np.inf)
    unknown = np.arange(width)[None, :] >= exact[:, None]
    idx[unknown], vals[unknown] = -1, -np.inf
    return idx, vals, exact


def _old_lists(old: Probe, role: str, kept: np.ndarray, n_gallery: int):
    """The old neighbour lists with removed items dropped and kept ones renumbered (pads at the end)."""
    idx = old.record(f"/{role}_top_items").astype(np.int64)
    vals = old.record(f"/{role}_top_scores").astype(np.float64)
    known = idx >= 0
    pad_first = (np.diff(known.astype(np.int8), axis=1) > 0).any()
    if pad_first or not np.isfinite(vals[known]).all() or (np.diff(np.where(known, vals, -np.inf), axis=1) > 0).any():
        raise DataError(f"{old.label}::/{role}_top_scores: not the descending scores of /{role}_top_items (a score "
                        "missing or out of order, or a pad before an item); the file is damaged: probe again")
    where = np.full(n_gallery + 1, -1, dtype=np.int64)  # index −1 (a pad) maps to the last entry: −1
    where[kept] = np.arange(kept.size)
    idx = where[idx]
    valid = idx >= 0
    order = np.argsort(~valid, axis=1, kind="stable")
    idx, vals = np.take_along_axis(idx, order, 1), np.take_along_axis(vals, order, 1)
    complete = np.take_along_axis(valid, order, 1).sum(axis=1) == kept.size
    return idx, np.where(idx >= 0, vals, -np.inf), complete


def _row_floors(old: Probe, role: str, n_rows: int) -> np.ndarray:
    """Each old bank row's last known neighbour score: every item its old list leaves out scores at
    most that, and ranks after its last item (ties go to the lower index, and the new items'
    indices are higher). −inf (no floor) for a row whose list leaves out nothing or knows nothing,
    and for the rows added now."""
    known = old.record(f"/{role}_top_items") >= 0
    last = np.where(known, old.record(f"/{role}_top_scores"), np.inf).min(axis=1, initial=np.inf)
    count = known.sum(axis=1)
    floor = np.where((count > 0) & (count < old.n_gallery), last, -np.inf)
    return np.concatenate([floor, np.full(n_rows - floor.size, -np.inf)])


def _lists_of(acc: BankAccumulator, rows: slice, offset: int, n_items: int):
    """The neighbour lists of some rows of a pass, as merge_lists takes them: complete where they
    hold every item of the pass, or every one above the row's floor (_row_floors: the others rank
    after each item the row's old list knows)."""
    idx = acc.neighbors.indices[rows].astype(np.int64)
    idx = np.where(idx >= 0, idx + offset, -1)
    complete = (acc.neighbors.indices[rows] >= 0).sum(axis=1) == n_items
    if acc.neighbors.floor is not None:
        complete |= np.isfinite(acc.neighbors.floor[rows])
    return idx, acc.neighbors.values[rows], complete


def _old_records(old: Probe, role: str, kept: np.ndarray | slice,
                 n_final: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The kept items' records of one bank (its log-normalisers and what core/probestats.py's
    ITEM_FIELDS name), read once; `kept` a slice when nothing is removed (no copies). Also the
    final gallery's K largest scores per item with the kept items' in its first rows (the
    records' item_top is a view of them: _merge merges in place), None without them."""
    prefix = "" if role == "bank" else "gallery_"
    n_kept = old.n_gallery if isinstance(kept, slice) else kept.size
    empty = np.zeros((n_kept, 0), dtype=np.float32)
    top_rows = None
    if old.has(name := item_record(role, "item_top")):
        top_rows = old.record(name, spare_rows=max(n_final - old.n_gallery, 0))
        if not isinstance(kept, slice):
            top_rows[:n_kept] = top_rows[kept]
        top_rows = top_rows[:n_final]
    records = {field: old.record(item_record(role, field))[kept] if old.has(item_record(role, field)) else empty
               for field in ITEM_FIELDS if field != "item_top"}
    records["item_top"] = empty if top_rows is None else top_rows[:n_kept]
    if (records["item_top"][:, 1:] > records["item_top"][:, :-1]).any():
        raise DataError(f"{old.label}::{item_record(role, 'item_top')}: an item's largest bank scores are not in "
                        "descending order; the file is damaged: probe again")
    records["log_norm"] = old.record(f"/{prefix}log_norm")[:, kept]
    return records, top_rows


def _merge(old: Probe, role: str, read: tuple[dict[str, np.ndarray], np.ndarray | None], a: BankAccumulator,
           c: BankAccumulator, kept: np.ndarray, n_old: int, all_rows: Embeddings, final_gallery: Embeddings, betas,
           kmax: int, ks, moments: bool, centroid_k: int) -> BankAccumulator:
    """The final accumulator of one bank: the kept items' records (_old_records: `read`) merged
    with the new rows' (pass `c`), the new items' columns from pass `a`, every row's neighbours
    merged (and recounted where removals left fewer than kmax certain)."""
    records, top_rows = read
    n_kept, n_new = kept.size, a.n_gallery
    n_final, n_rows = n_kept + n_new, a.n_rows
    final = BankAccumulator(n_rows, n_final, betas, kmax, ks, column_moments=moments, neighbor_k=centroid_k)
    nearest = _nearest_rows(old, records["item_top"], kept, c, n_old, final.neighbor_k) \
        if final.column_topk_index is not None else None  # read before the K largest merge in place
    in_place = top_rows is not None and top_rows.shape == final.item_top.shape
    if in_place:  # its first rows are the kept items' K largest: they merge where they lie
        final.item_top = top_rows
    prefix = "" if role == "bank" else "gallery_"
    keep = slice(None) if n_kept == old.n_gallery else kept
    # the items whose K largest scores a new bank row enters (all when K grows with the bank): the
    # others keep their top-K statistics; of the new rows' scores only those above an item's old
    # K-th largest enter (a sort of the old K and those few, not of 2·K, per changed item)
    width = final.item_top.shape[1]
    new_top = c.item_top
    if width > records["item_top"].shape[1]:
        changed = np.arange(n_kept)
    elif c.n_rows and width:
        entering = (c.item_top > records["item_top"][:, -1:]).sum(axis=1)
        changed = np.flatnonzero(entering)
        new_top = c.item_top[:, :entering.max(initial=0)]
    else:
        changed = np.zeros(0, dtype=np.int64)
    for field, values in records.items():  # each by its declared merge rule (core/probestats.py)
        rule = BY_NAME[f"/{prefix}log_norm" if field == "log_norm" else item_record(role, field)].merge
        held = getattr(final, field)
        kept_columns = held[:n_kept] if field in ITEM_MAJOR else held[..., :n_kept]
        if rule == "top-k":
            if values.shape[1] == width and not in_place:
                kept_columns[...] = values
            for p in range(0, changed.size, GALLERY_BLOCK):  # cache-sized pieces
                part = changed[p:p + GALLERY_BLOCK]
                kept_columns[part] = merge_top(values[part], new_top[part], width)
        elif c.n_rows:
            kept_columns[...] = MERGES[rule](values, getattr(c, field))
        else:
            kept_columns[...] = values
    if ks:
        for record in (s for s in probestats.STATISTICS if s.key == "ks" and s.field):  # the per-K statistics
            getattr(final, record.field)[:, :n_kept] = old.record(record.name)[:, keep]
    derive_items(final, slice(0, n_kept), top=False)
    derive_items(final, changed)
    if final.column_topk_index is not None:  # each kept item's nearest bank rows: old ones merged with new ones
        final.column_topk_index[:n_kept] = nearest
    if n_new:
        final.place_columns(n_kept, n_final, a.column_parts())
    width = final.neighbors.k
    old_part = _old_lists(old, role, kept, old.n_gallery)
    parts_old = [old_part] + ([_lists_of(a, slice(0, n_old), n_kept, n_new)] if n_new else [])
    parts_new = [_lists_of(c, slice(None), 0, n_kept)] + ([_lists_of(a, slice(n_old, None), n_kept, n_new)]
                                                         if n_new else [])
    idx, vals, exact = merge_lists(parts_old, width)
    if n_rows > n_old:
        more = merge_lists(parts_new, width)
        idx, vals, exact = (np.concatenate([x, y]) for x, y in zip((idx, vals, exact), more, strict=True))
    recount = np.flatnonzero(exact < final.kept_neighbors)
    if recount.size:
        idx[recount], vals[recount] = _recount(all_rows, final_gallery, recount, width)
    final.neighbors.indices[...], final.neighbors.values[...] = idx, vals
    final.recounted = recount.size
    return final


def _nearest_rows(old: Probe, old_top: np.ndarray, kept: np.ndarray, c: BankAccumulator, n_old: int,
                  width: int) -> np.ndarray:
    """The `width` bank rows nearest each kept item: its old ones (their scores: the first of its K
    largest, in the same order) merged with the new rows' (pass `c`)."""
    rows = old.record("/item_top_rows")[kept].astype(np.int64)
    parts = [(rows, old_top[:, :rows.shape[1]], np.full(kept.size, rows.shape[1] == n_old))]
    if c.n_rows:
        new = c.column_topk_index.astype(np.int64)
        parts.append((new + n_old, c.item_top[:, :new.shape[1]], np.full(kept.size, new.shape[1] == c.n_rows)))
    idx, _, exact = merge_lists(parts, width)
    if (exact < width).any():  # each list holds its bank's best `width`: the union's best are among them
        raise AssertionError("an item's nearest bank rows are not all known")
    return idx


def _recount(rows: Embeddings, gallery: Embeddings, which: np.ndarray, width: int):
    """The best `width` items of some bank rows against the whole final gallery."""
    best = topk.RunningTopK(which.size, width)
    queries = rows.rows_of(which)
    for c0 in range(0, gallery.rows, GALLERY_BLOCK):
        c1 = min(c0 + GALLERY_BLOCK, gallery.rows)
        best.update(0, queries @ gallery.rows_of(slice(c0, c1)).T, c0, forward=True)
    return best.indices, best.values


def _moments(old: Probe, removed: Embeddings, added: Embeddings, n_final: int):
    """The gallery's mean and second moment with rows removed and added (weighted sums)."""
    n = old.n_gallery
    total = old.record("/gallery_mean") * n
    moment = old.record("/gallery_second_moment") * n
    for rows, sign in ((removed, -1.0), (added, 1.0)):
        if rows is not None:
            block = rows.rows_of(slice(0, rows.rows)).astype(np.float64)
            total += sign * block.sum(axis=0)
            moment += sign * (block.T @ block)
    return total / n_final, moment / n_final


def _sorted_bank(old: Probe, kept, parts, n_kept: int, sink: Sink) -> None:
    """Every item's bank scores ascending, into `sink`: a kept item's old ones merged with its new
    rows', a new item's from its pass."""
    new_rows = np.concatenate([parts["new_rows"][c0] for c0 in sorted(parts["new_rows"])]) \
        if parts["new_rows"] else np.zeros((n_kept, 0), dtype=np.float32)
    source = old.sorted_bank()
    for c0 in range(0, n_kept, GALLERY_BLOCK):
        c1 = min(c0 + GALLERY_BLOCK, n_kept)
        rows = kept[c0:c1]
        held = np.asarray(source[int(rows[0]):int(rows[-1]) + 1])[rows - rows[0]]
        sink.write(c0, SORTED, np.sort(np.concatenate([held, new_rows[c0:c1]], axis=1), axis=1))
    for c0 in sorted(parts["new_items"]):
        sink.write(n_kept + c0, SORTED, parts["new_items"][c0])


def _warm_starts(old: Probe, kept: np.ndarray, n_final: int, cross) -> dict:
    """log u of the kept items from the old potentials; the new items (and a dual run's gallery-bank
    items, which the probe does not keep) start at the median of the kept ones."""
    starts = {}
    for dual in (False, True):
        if dual and cross is None:
            continue
        for beta in old.sinkhorn_betas(dual):
            known = old.sinkhorn_log_u(beta, dual)[kept]
            rows = n_final + (cross.n_cols if dual else 0)
            start = np.full(rows, float(np.median(known)) if known.size else 0.0)
            start[:kept.size] = known
            starts[(beta, dual)] = start
    return starts
