"""Retrieval metrics under the collaborative-experts / QB-Norm `metric.py` protocol, pure numpy.

Source: collaborative-experts `model/metric.py` (Liu et al., BMVC 2019), as shipped by QB-Norm
(Bogolin et al., CVPR 2022, ioanacroi/qb-norm `metric.py`): `t2v_metrics`, `v2t_metrics`,
`cols2metrics`. What it computes, restated:

- A query's rank is the mean 0-based position of its ground truth's score among the sorted scores
  of its ranking ("averaging" break_ties; equality is exact float equality): #scores strictly
  greater + (#scores equal − 1)/2. An all-equal row of G items gives (G − 1)/2.
- t2v: rows are the queries (captions), columns the items. metric.py knows one relevant item per
  query, the contiguous layout q ↔ q // (Q // G); qbnorm also takes any (Q,) or (Q, m) ground truth
  (−1 padding) and ranks the best relevant item. Masked queries are dropped (n = #unmasked).
- v2t: each item ranks every caption; its rank is the minimum over its own captions of each
  caption's tie-averaged position, its other captions competing (two identical own captions tied at
  the top both sit at 0.5). A masked caption gets the distance MISSING_VAL = 1e8 (score −1e8) in
  every item's ranking and is never an answer, nor is any caption scoring exactly −1e8; an item
  left without an answer has rank ∞. Every item counts (n = #items).
- R@1 = 100·#(rank == 0)/n (a rank of 0.5 is a miss), R@K = 100·#(rank < K)/n for K = 5, 10, 50
  (and, for a Recall@K curve, every K ≥ 2); MdR = median(rank) + 1; MnR = mean(rank) + 1;
  GeomR = scipy.stats.mstats.gmean(R@1, R@5, R@10) = exp(mean(log)), 0 when a recall is 0.
  metric.py then rounds each figure with round(x, 1): for display only; nothing here rounds.

Both rankings are summarised per query by a `Standing`: how many items score strictly above its
best relevant item (g), how many tie with it (T, itself included) and how many of those are
relevant (r). The minimum over relevant items of the tie-averaged position is g + (T − 1)/2 (the
best level wins; any lower relevant item sits at ≥ g + T).

`ties="expected"` is offered besides (never the default): each figure is its expectation over
every order of the tied items (McSherry & Najork, ECIR 2008, the paper metric.py cites for its
averaging): P(the first relevant of the group is within the top K) = 1 − C(T − m, r)/C(T, r) with
m = K − g, and the rank g + (T − r)/(r + 1). It differs from the official figures only at ties, and
there it does not punish a right answer for being duplicated: two identical own captions at the
top are a certain R@1 hit, where metric.py counts a miss.

From a top-N list (a ranking file) a rank is exact when a relevant item is listed, else only bounded
below (g ≥ #listed): right-censored. Items outside a list are taken to score below all of it (a
top-N list says nothing more). Such ranks give R@K exactly for K ≤ N, MdR only when more than half
of the queries are known within the list, and no MnR; `summarise` returns None for every figure it
cannot know, with bounds, and says which are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RECALL_KS = (1, 5, 10, 50)
METRIC_NAMES = (*(f"R@{k}" for k in RECALL_KS), "MdR", "MnR", "GeomR")
LOWER_IS_BETTER = ("MdR", "MnR")
TIES = ("official", "expected")
DIRECTIONS = ("t2v", "v2t")
MISSING_VAL = 1e8  # metric.py's distance of a masked caption (v2t_metrics)
MISSING_SCORE = -MISSING_VAL
CURVE_KMAX = 100
PROTOCOL = ("collaborative-experts/QB-Norm metric.py (t2v_metrics, v2t_metrics, cols2metrics): rank = "
            "#scores strictly greater than the best relevant item's + (#equal − 1)/2; R@1 counts rank == 0, "
            "R@K rank < K; MdR = median + 1, MnR = mean + 1, GeomR = gmean(R@1, R@5, R@10); unrounded")


def protocol(direction: str = "t2v", ties: str = "official") -> dict:
    """What the figures follow, for reports: the protocol, the direction, the tie rule."""
    rules = {
        "t2v": "rows are the queries; masked queries are dropped (n = unmasked queries)",
        "v2t": "each item ranks every caption: min over its own captions' tie-averaged positions; masked "
               "captions score −1e8 and answer nothing; n = every item",
    }
    tie_rules = {
        "official": "metric.py: ranks average tied positions; R@1 counts rank == 0 (a tie at the top misses)",
        "expected": "expectation over every order of tied items (McSherry & Najork 2008); not metric.py's figures",
    }
    return {"name": "metric.py" if ties == "official" else "metric.py ranking, expected ties",
            "description": PROTOCOL, "direction": direction, "direction_rule": rules[direction],
            "ties": ties, "ties_rule": tie_rules[ties], "rounding": "none (metric.py rounds to 1 decimal for display)"}


@dataclass(frozen=True)
class Standing:
    """Per query: `greater` items score strictly above its best relevant item (∞: no relevant item
    to rank; a lower bound where `censored`), `tied` items score equal to it (itself included) and
    `relevant_tied` of those are relevant (distinct items)."""

    greater: np.ndarray
    tied: np.ndarray
    relevant_tied: np.ndarray
    censored: np.ndarray

    @staticmethod
    def empty(n: int) -> Standing:
        return Standing(np.full(n, np.inf), np.ones(n, dtype=np.int64), np.ones(n, dtype=np.int64),
                        np.zeros(n, dtype=bool))

    def __len__(self) -> int:
        return len(self.greater)

    def put(self, r0: int, other: Standing) -> None:
        """Write `other` into queries r0:r0 + len(other) (the arrays are filled block by block)."""
        r1 = r0 + len(other)
        self.greater[r0:r1], self.tied[r0:r1] = other.greater, other.tied
        self.relevant_tied[r0:r1], self.censored[r0:r1] = other.relevant_tied, other.censored

    def select(self, keep: np.ndarray) -> Standing:
        return Standing(self.greater[keep], self.tied[keep], self.relevant_tied[keep], self.censored[keep])


def _distinct(relevant: np.ndarray) -> np.ndarray:
    """(Q, m) relevant indices with repeats within a row replaced by −1 (each item counts once)."""
    if relevant.shape[1] < 2:
        return relevant
    order = np.argsort(relevant, axis=1, kind="stable")
    ordered = np.take_along_axis(relevant, order, axis=1)
    repeat = np.zeros_like(ordered, dtype=bool)
    repeat[:, 1:] = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    out = relevant.copy()
    np.put_along_axis(out, order, np.where(repeat, -1, ordered), axis=1)
    return out


def _comparable(scores: np.ndarray) -> np.ndarray:
    """Scores in a float type that holds −1e8 (float16 does not); comparisons are unchanged."""
    scores = np.asarray(scores)
    if scores.dtype.kind != "f" or scores.dtype.itemsize < 4:
        return scores.astype(np.float32 if scores.dtype.kind == "f" else np.float64)
    return scores


def row_standing(scores: np.ndarray, relevant: np.ndarray, *, missing_columns: np.ndarray | None = None,
                 skip_missing: bool = False) -> Standing:
    """Standings of dense score rows (rows = queries), `relevant` (Q,) or (Q, m) with −1 padding.

    missing_columns: (G,) bools, columns scored MISSING_SCORE in every row (v2t: masked captions);
    skip_missing: relevant items scoring exactly MISSING_SCORE are not answers (v2t_metrics).
    """
    scores = _comparable(scores)
    q = len(scores)
    relevant = _distinct(np.asarray(relevant, dtype=np.int64).reshape(q, -1))
    if missing_columns is not None and np.any(missing_columns):
        scores = np.where(np.asarray(missing_columns, dtype=bool)[None, :], scores.dtype.type(MISSING_SCORE), scores)
    valid = relevant >= 0
    values = np.take_along_axis(scores, np.where(valid, relevant, 0), axis=1)
    if skip_missing:
        valid &= values != MISSING_SCORE
    answered = valid.any(axis=1)
    best = np.where(valid, values, -np.inf).max(axis=1, initial=-np.inf).astype(scores.dtype)[:, None]
    greater = (scores > best).sum(axis=1).astype(np.float64)
    tied = (scores == best).sum(axis=1)
    relevant_tied = (valid & (values == best)).sum(axis=1)
    return _standing(greater, tied, relevant_tied, answered)


def _standing(greater, tied, relevant_tied, answered, censored=None) -> Standing:
    n = len(greater)
    return Standing(np.where(answered, greater, np.inf), np.where(answered, tied, 1).astype(np.int64),
                    np.where(answered, relevant_tied, 1).astype(np.int64),
                    np.zeros(n, dtype=bool) if censored is None else censored & answered)


# --- one query per column, rows streamed (v2t from a t2v-layout matrix, or t2v from its transpose) ---

def column_targets(block: np.ndarray, relevant: np.ndarray, *, masked_rows: np.ndarray | None = None,
                   skip_missing: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The relevant (column, score) pairs of a block of rows: row i of the block is relevant to the
    columns relevant[i] (−1 padding). Masked rows (v2t: masked captions) score MISSING_SCORE and,
    with skip_missing, are no answers, nor is any score of exactly MISSING_SCORE."""
    block = _comparable(block)
    relevant = _distinct(np.asarray(relevant, dtype=np.int64).reshape(len(block), -1))
    valid = relevant >= 0
    values = np.take_along_axis(block, np.where(valid, relevant, 0), axis=1)
    if masked_rows is not None:
        values = np.where(np.asarray(masked_rows, dtype=bool)[:, None], block.dtype.type(MISSING_SCORE), values)
    if skip_missing:
        valid &= values != MISSING_SCORE
    return relevant[valid], values[valid]


def column_best(n_cols: int, cols: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each column's best relevant score (−inf: none) and how many relevant rows reach it."""
    best = np.full(n_cols, -np.inf, dtype=np.float64)
    np.maximum.at(best, cols, values.astype(np.float64))
    count = np.bincount(cols[values.astype(np.float64) == best[cols]], minlength=n_cols)
    return best, count


def column_counts(block: np.ndarray, best: np.ndarray, *, masked_rows: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per column, the rows of a block scoring strictly above and equal to `best` (masked rows
    scoring MISSING_SCORE)."""
    block = _comparable(block)
    if masked_rows is not None and np.any(masked_rows):
        block = np.where(np.asarray(masked_rows, dtype=bool)[:, None], block.dtype.type(MISSING_SCORE), block)
    target = best.astype(block.dtype)[None, :]  # exact: best is one of the block type's values (or −inf)
    return (block > target).sum(axis=0), (block == target).sum(axis=0)


def column_standing(best: np.ndarray, relevant_tied: np.ndarray, greater: np.ndarray, tied: np.ndarray) -> Standing:
    """Standings of columns from column_best and the summed column_counts."""
    return _standing(greater.astype(np.float64), tied, relevant_tied, best > -np.inf)


# --- top-N lists ------------------------------------------------------------------------------------

def list_standing(neighbors: np.ndarray, scores: np.ndarray, relevant: np.ndarray, *,
                  missing_items: np.ndarray | None = None, skip_missing: bool = False) -> Standing:
    """Standings from top-N lists: `neighbors` (Q, N) indices best first (−1: an empty slot),
    `scores` (Q, N) theirs, `relevant` (Q,) or (Q, m).

    Counted over the list, items outside it being taken to score below all of it: a listed relevant
    item gives an exact standing; a query none of whose relevant items is listed is censored at
    g ≥ #listed items. missing_items: (G,) bools, items moved out of every list (v2t: masked
    captions go to the bottom of every ranking, below the unlisted ones, which stay below the
    list); skip_missing: listed relevant items scoring exactly MISSING_SCORE are no answers.
    """
    neighbors = np.asarray(neighbors, dtype=np.int64)
    scores = _comparable(scores)
    q, n = neighbors.shape
    relevant = _distinct(np.asarray(relevant, dtype=np.int64).reshape(q, -1))
    filled = neighbors >= 0
    if missing_items is not None:
        missing_items = np.asarray(missing_items, dtype=bool)
        filled &= ~missing_items[np.where(filled, neighbors, 0)]
    hit = np.zeros((q, n), dtype=bool)
    for col in range(relevant.shape[1]):
        item = relevant[:, col][:, None]
        hit |= (neighbors == item) & (item >= 0)
    hit &= filled
    if skip_missing:
        hit &= scores != MISSING_SCORE
    found = hit.any(axis=1)
    best = np.where(hit, scores, -np.inf).max(axis=1, initial=-np.inf).astype(scores.dtype)[:, None]
    listed = np.where(filled, scores, -np.inf)
    greater = np.where(found, ((listed > best) & filled).sum(axis=1), filled.sum(axis=1)).astype(np.float64)
    tied = np.where(found, ((listed == best) & filled).sum(axis=1), 1)
    relevant_tied = np.where(found, (hit & (scores == best)).sum(axis=1), 1)
    has_relevant = (relevant >= 0).any(axis=1)
    return _standing(greater, tied, relevant_tied, has_relevant, censored=~found)


# --- top-N lists, one query per column (v2t from per-caption lists, t2v from per-item lists) -------
# A row r's list gives the scores of its listed columns; of every other column j only that
# s[r, j] < last[r], its lowest listed score (the list convention above). Column j's best answer
# b (its best listed relevant score) and its standing are then exact when no row could hide a
# score ≥ b: every row not listing j has last[r] ≤ b (relevant rows included: their unlisted
# score is < last[r] ≤ b). Otherwise only a lower bound is known: the listed scores certainly
# above every answer (> b and ≥ the last score of every row whose relevant score is unlisted).
# Masked rows (v2t: masked captions) take no part (they score −1e8: below every real score).

def _listed(neighbors: np.ndarray, scores: np.ndarray, relevant: np.ndarray, masked_rows, skip_missing: bool):
    neighbors = np.asarray(neighbors, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    q = len(neighbors)
    relevant = _distinct(np.asarray(relevant, dtype=np.int64).reshape(q, -1))
    live = np.ones(q, dtype=bool) if masked_rows is None else ~np.asarray(masked_rows, dtype=bool)
    filled = (neighbors >= 0) & live[:, None]
    is_rel = np.zeros(neighbors.shape, dtype=bool)
    listed_rel = np.zeros(relevant.shape, dtype=bool)
    for col in range(relevant.shape[1]):
        item = relevant[:, col][:, None]
        match = (neighbors == item) & (item >= 0) & filled
        is_rel |= match
        listed_rel[:, col] = match.any(axis=1)
    answer = is_rel & (scores != MISSING_SCORE) if skip_missing else is_rel
    last = np.where(filled.any(axis=1), np.where(filled, scores, np.inf).min(axis=1), np.inf)
    return neighbors, scores, relevant, live, filled, answer, listed_rel, last


def list_column_bounds(neighbors, scores, relevant, n_cols: int, *, masked_rows=None, skip_missing: bool = False):
    """Pass 1 over a block of list rows: per column the best listed answer (−inf: none), the
    highest last score of a row whose relevant score is unlisted (−inf: none), whether any unmasked
    relevant row exists, and each unmasked row's last score (inf for an empty list)."""
    neighbors, scores, relevant, live, _, answer, listed_rel, last = _listed(
        neighbors, scores, relevant, masked_rows, skip_missing)
    best = np.full(n_cols, -np.inf)
    np.maximum.at(best, neighbors[answer], scores[answer])
    unlisted = (relevant >= 0) & ~listed_rel & live[:, None]
    hidden = np.full(n_cols, -np.inf)
    np.maximum.at(hidden, relevant[unlisted], np.broadcast_to(last[:, None], relevant.shape)[unlisted])
    has = np.zeros(n_cols, dtype=bool)
    has[relevant[(relevant >= 0) & live[:, None]]] = True
    return best, hidden, has, last[live]


def list_column_counts(neighbors, scores, relevant, best: np.ndarray, hidden: np.ndarray, *, masked_rows=None,
                       skip_missing: bool = False):
    """Pass 2: per column the listed scores above / equal to its best answer, the relevant ones
    equal to it, the listed scores certainly above every answer, and the listing rows whose last
    score is above the best answer (they hide nothing of that column)."""
    n_cols = len(best)
    neighbors, scores, _, _, filled, answer, _, last = _listed(neighbors, scores, relevant, masked_rows,
                                                              skip_missing)
    cols = neighbors[filled]
    values = scores[filled]
    b = best[cols]
    counts = {
        "greater": np.bincount(cols[values > b], minlength=n_cols),
        "tied": np.bincount(cols[values == b], minlength=n_cols),
        "relevant_tied": np.bincount(neighbors[answer][scores[answer] == best[neighbors[answer]]], minlength=n_cols),
        "certain": np.bincount(cols[(values > b) & (values >= hidden[cols]) & ~answer[filled]], minlength=n_cols),
        "listing_above": np.bincount(cols[np.broadcast_to(last[:, None], filled.shape)[filled] > b],
                                     minlength=n_cols),
    }
    return counts


def list_column_standing(best, hidden, has, lasts: np.ndarray, counts: dict) -> Standing:
    """Standings of the columns from both passes (`lasts`: every unmasked row's last score)."""
    ordered = np.sort(lasts)
    above = ordered.size - np.searchsorted(ordered, best, side="right")   # live rows with last > b
    unknown_above = above - counts["listing_above"]
    exact = np.isfinite(best) & (hidden <= best) & (unknown_above == 0)
    greater = np.where(exact, counts["greater"], counts["certain"]).astype(np.float64)
    tied = np.where(exact, counts["tied"], 1)
    relevant_tied = np.where(exact, np.maximum(counts["relevant_tied"], 1), 1)
    return _standing(greater, tied, relevant_tied, has, censored=~exact)


def concatenate(parts: list[Standing]) -> Standing:
    return Standing(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                      ("greater", "tied", "relevant_tied", "censored")))


# --- from standings to figures ----------------------------------------------------------------------

def rank_values(st: Standing, ties: str = "official") -> np.ndarray:
    """0-based ranks: official g + (T − 1)/2 (metric.py's); expected g + (T − r)/(r + 1) (the expected
    position of the first relevant item of the tie group). ∞ without a relevant item; for a
    censored query, its lower bound g."""
    tied = st.tied.astype(np.float64)
    if ties == "official":
        extra = (tied - 1.0) / 2.0
    else:
        r = st.relevant_tied.astype(np.float64)
        extra = (tied - r) / (r + 1.0)
    with np.errstate(invalid="ignore"):
        return np.where(st.censored | ~np.isfinite(st.greater), st.greater, st.greater + extra)


def expected_hit(st: Standing, k: int) -> np.ndarray:
    """P(the best relevant item is within the top k) over every order of its tie group:
    1 − C(T − m, r)/C(T, r), m = k − g clipped to [0, T]."""
    tied = st.tied.astype(np.float64)
    m = np.clip(k - st.greater, 0.0, tied)
    miss = np.ones(len(st))
    for i in range(int(st.relevant_tied.max(initial=1))):
        factor = np.clip((tied - m - i) / np.maximum(tied - i, 1.0), 0.0, 1.0)
        miss *= np.where(i < st.relevant_tied, factor, 1.0)
    return np.where(np.isfinite(st.greater), 1.0 - miss, 0.0)


def hits(st: Standing, k: int, ties: str = "official") -> tuple[np.ndarray, np.ndarray]:
    """(hit, unknown) per query at R@k: official 1/0 (R@1: rank == 0; R@k: rank < k), expected the
    probability; unknown where a censored query's bound leaves it open (g < k)."""
    unknown = st.censored & (st.greater < k)
    if ties == "official":
        rank = rank_values(st, ties)
        hit = (rank == 0) if k == 1 else (rank < k)
        hit = hit.astype(np.float64)
    else:
        hit = expected_hit(st, k)
    return np.where(st.censored, 0.0, hit), unknown


def _recall(st: Standing, k: int, ties: str, n: int) -> tuple[float | None, list | None]:
    hit, unknown = hits(st, k, ties)
    known = float(hit.sum()) if ties != "official" else float(np.count_nonzero(hit))
    if unknown.any():
        return None, [100 * known / n, 100 * (known + int(unknown.sum())) / n]
    return 100 * known / n, None  # cols2metrics' arithmetic: 100 * float(count) / n


def geometric_recall(summary: dict) -> float:
    """scipy.stats.mstats.gmean of R@1, R@5, R@10 as metric.py calls it: exp(mean(log)), 0 if one is 0."""
    values = np.array([summary["R@1"], summary["R@5"], summary["R@10"]], dtype=np.float64)
    with np.errstate(divide="ignore"):
        return float(np.exp(np.mean(np.log(values))))


def censored_median(rank: np.ndarray, censored: np.ndarray) -> float | None:
    """median(rank) when it is determined although some ranks are only lower bounds, else None.

    Exact ranks no larger than every censored bound are certainly the smallest values, in order;
    the median (numpy's: mean of the two middle values for an even count) is known when those
    cover its order statistics, i.e. when more than half of the ranks are such exact values.
    """
    rank = np.asarray(rank, dtype=np.float64)
    censored = np.asarray(censored, dtype=bool)
    if not censored.any():
        return float(np.median(rank))
    floor = rank[censored].min()
    sure = np.sort(rank[~censored & (rank <= floor)])
    n = rank.size
    if sure.size < n // 2 + 1:
        return None
    if n % 2:
        return float(sure[n // 2])
    return float((sure[n // 2 - 1] + sure[n // 2]) / 2)


def summarise(st: Standing, ties: str = "official", ks=RECALL_KS) -> dict:
    """Every metric, its exactness, and bounds where only bounds are known.

    Returns {"metrics": {name: value or None}, "exact": {name: bool}, "bounds": {name: [low, high]}
    for the unknown figures}. Nothing is rounded.
    """
    n = len(st)
    values: dict[str, float | None] = {}
    bounds: dict[str, list] = {}
    for k in ks:
        value, bound = _recall(st, k, ties, n)
        values[f"R@{k}"] = value
        if bound is not None:
            bounds[f"R@{k}"] = bound
    rank = rank_values(st, ties)
    median = censored_median(rank, st.censored)
    values["MdR"] = None if median is None else median + 1.0
    if median is None:
        bounds["MdR"] = [float(np.median(rank)) + 1.0, None]
    if st.censored.any():
        values["MnR"] = None
        bounds["MnR"] = [float(np.mean(rank)) + 1.0, None]
    else:
        values["MnR"] = float(np.mean(rank)) + 1.0
    if all(values.get(f"R@{k}") is not None for k in (1, 5, 10)):
        values["GeomR"] = geometric_recall(values)
    else:
        values["GeomR"] = None
    exact = {name: value is not None for name, value in values.items()}
    return {"metrics": values, "exact": exact, "bounds": bounds}


def recall_curve(st: Standing, ties: str = "official", kmax: int = CURVE_KMAX) -> list[float | None]:
    """R@K for K = 1 … kmax (None where a censored rank leaves it open)."""
    n = len(st)
    return [_recall(st, k, ties, n)[0] for k in range(1, kmax + 1)]


# --- ranks alone (tune, tests) -----------------------------------------------------------------------

def ranks(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """metric.py's 0-based tie-averaged ranks of dense score rows (t2v); `relevant` (Q,) or (Q, m)."""
    return rank_values(row_standing(scores, relevant))


def recall_summary(rank: np.ndarray, ks=RECALL_KS) -> dict:
    """R@K (R@1: rank == 0), MdR, MnR and GeomR from exact official 0-based ranks."""
    rank = np.asarray(rank, dtype=np.float64)
    n = rank.size
    out = {f"R@{k}": 100 * float(np.count_nonzero(rank == 0 if k == 1 else rank < k)) / n for k in ks}
    out["MdR"] = float(np.median(rank)) + 1.0
    out["MnR"] = float(np.mean(rank)) + 1.0
    out["GeomR"] = geometric_recall(out)
    return out


# --- ground truth -----------------------------------------------------------------------------------

def contiguous_relevant(n_queries: int, per_item: int) -> np.ndarray:
    """Ground truth of the contiguous layout: query i ↔ item i // per_item (MSR-VTT: 20 captions)."""
    return (np.arange(n_queries, dtype=np.int64) // per_item)[:, None]


def as_relevant(gt: np.ndarray) -> np.ndarray:
    """(Q,) or (Q, m) ground truth as a (Q, m) int64 array (−1 pads multi-positive rows)."""
    gt = np.asarray(gt)
    if gt.ndim == 1:
        gt = gt[:, None]
    return gt.astype(np.int64, copy=False)


def inverse_relevant(relevant: np.ndarray, n_items: int) -> np.ndarray:
    """(n_items, m') the queries relevant to each item (−1 padding): caption → items becomes
    item → its captions, in caption order."""
    relevant = np.asarray(relevant, dtype=np.int64)
    rows, cols = np.nonzero(relevant >= 0)
    items = relevant[rows, cols]
    order = np.lexsort((rows, items))
    items, rows = items[order], rows[order]
    counts = np.bincount(items, minlength=n_items)
    width = max(int(counts.max(initial=0)), 1)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    slot = np.arange(items.size) - starts[items]
    out = np.full((n_items, width), -1, dtype=np.int64)
    out[items, slot] = rows
    return out


def difference(first: dict, last: dict) -> dict:
    """last − first for every metric both know (None where either is unknown)."""
    return {m: (None if first[m] is None or last[m] is None else last[m] - first[m]) for m in METRIC_NAMES}


def check_gates(results: list[dict], gates) -> tuple[list[dict], list[str]]:
    """Each (metric, threshold) gate against each named result: (checks, failure messages). A
    metric is worse below its threshold (above for the rank metrics); an unknown one fails."""
    checks, failures = [], []
    for res in results:
        for metric, threshold in gates:
            value = res["metrics"][metric]
            worse = value is None or (value > threshold if metric in LOWER_IS_BETTER else value < threshold)
            checks.append({"input": res["name"], "metric": metric, "value": value, "threshold": threshold,
                           "passed": not worse})
            if value is None:
                failures.append(f"{res['name']}: {metric} is unknown (only the top {res['listed']} is listed), "
                                f"threshold {threshold:g}")
            elif worse:
                relation = "above" if metric in LOWER_IS_BETTER else "below"
                failures.append(f"{res['name']}: {metric} {value:.2f} is {relation} the threshold {threshold:g}")
    return checks, failures
