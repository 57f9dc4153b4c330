"""The probe's statistics, each declared once: name, shape, dtype, validity rule and how two parts merge.

P[i, j] = s(b_i, g_j), bank row i, gallery item j. A probe is a fold of P's tiles; an update of a
probe (api/updating.py) is the same fold over the scores that changed, merged into what was kept:

* per item (shape ends in G): a column statistic. New items get their own columns; removed items
  lose theirs; new bank rows merge into every kept column by the rule `merge`:
  "log-sum-exp" (logaddexp of the two parts: exact up to float64 rounding, lse64's bound),
  "sum", "min", "max", "top-k" (the K largest of the union: exact, values are float32 scores) or
  "derived" (recomputed from other statistics: the top-K means and K-th values from the item's K
  largest scores, the mean and spread from the sums, the activation counts from the neighbours).
* per bank row (shape starts with N or Nh): "top-k" of each row over the gallery (the DIS
  activation lists, W = kmax + SPARE entries with their scores, so that removing up to SPARE of a
  row's items needs no recount), "append" (the rows' fingerprints).
* "gallery" statistics (of the gallery embeddings alone) merge as weighted sums; "iterate" ones
  (the Sinkhorn potentials) have no exact merge and restart from the old values (a warm start).

`shape` names dimensions (G gallery items, N bank rows, Nh gallery-bank rows, kmax, W, K the
largest of the probe's ks, d the embedding dimension, n_betas …); `values` is io/schemas.py's rule;
`key` the attribute that says what each row is (betas, ks, k); `bank` which bank it belongs to.

What an update needs beyond the statistics the normalisers read (UPDATE_RECORDS): per gallery
item 4·K bytes for its K largest bank scores (K the largest of the probe's ks: 512 at the default 128),
24 for its score sum, sum of squares, min and max and 8 for its fingerprint, 4·K + 32 in all (544
by default; a gallery bank's records add 24 per item); per bank row 8·W for its W = kmax + SPARE
best items and their scores and 8 for its fingerprint (152 at the default kmax = 10); with dsl's
statistics, 4 per item and centroid K for its nearest bank rows. A probe without them (made by an
earlier version) cannot be updated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPARE = 8  # extra neighbours kept per bank row: removals of up to this many of a row's items need no recount


@dataclass(frozen=True)
class Statistic:
    name: str                         # the dataset
    shape: tuple[str, ...]
    dtype: str                        # numpy dtype string as stored
    merge: str                        # log-sum-exp | sum | min | max | top-k | derived | append | gallery | iterate
    values: str | None = "finite"     # io/schemas.py's validity rule
    key: str | None = None            # attribute naming each row: betas | ks | k
    bank: str = "bank"                # bank | gallery_bank | "" (of the gallery alone)
    required: bool | str = False      # True, or a dimension that must be > 0
    bound: str | None = None          # the dimension an index or count is bounded by
    rows: str = "row"
    cols: str = "item"
    at_open: bool = True              # checked when the file opens (else as read)
    update: bool = False              # recorded for updates only (no normaliser reads it)
    field: str | None = None          # the BankAccumulator attribute that holds it (per-item statistics)
    doc: str = ""


def _item(name, shape, merge, doc, **kw) -> Statistic:
    return Statistic(name, shape, kw.pop("dtype", "<f8"), merge, doc=doc, **kw)


STATISTICS: tuple[Statistic, ...] = (
    _item("/log_norm", ("n_betas", "G"), "log-sum-exp", "logsumexp_i(β·P[i, j]) (QB-Norm Eq. 3)", key="betas",
          required=True, rows="β", field="log_norm"),
    Statistic("/bank_neighbors", ("N", "kmax"), "<i4", "top-k", values="index", bound="G", required=True,
              at_open=False, rows="bank row", cols="column", doc="each bank row's best items, best first"),
    Statistic("/activation_count", ("G",), "<i4", "derived", values="count", bound="N", key="k", required=True,
              doc="bank-side k-occurrence"),
    _item("/topk_mean", ("n_ks", "G"), "derived", "mean of the K largest P[:, j] (CSLS, NNN)", key="ks",
          required=True, rows="K", field="largest_means"),
    _item("/gallery_log_norm", ("n_gallery_betas", "G"), "log-sum-exp", "the same for the gallery bank", key="betas",
          bank="gallery_bank", required="Nh", rows="β"),
    Statistic("/gallery_bank_neighbors", ("Nh", "kmax"), "<i4", "top-k", values="index", bound="G", required="Nh",
              bank="gallery_bank", at_open=False, rows="gallery-bank row", cols="column"),
    Statistic("/gallery_activation_count", ("G",), "<i4", "derived", values="count", bound="Nh", key="k",
              bank="gallery_bank", required="Nh"),
    Statistic("/sorted_bank_scores", ("G", "N"), "<f4", "top-k", values="ascending", at_open=False, rows="item",
              cols="bank score", doc="every item's bank scores ascending (gc)"),
    _item("/column_mean", ("G",), "derived", "mean_i P[i, j] (DN)", field="column_mean"),
    _item("/topk_kth", ("n_ks", "G"), "derived", "the K-th largest P[:, j] (LS)", key="ks", rows="K",
          field="topk_kth"),
    _item("/topk_distance", ("n_ks", "G"), "derived", "mean √(2 − 2·P) of the K largest (NICDM)", key="ks", rows="K",
          field="topk_distance"),
    _item("/column_std", ("G",), "derived", "std_i P[i, j] (MP)", field="column_std"),
    _item("/centroid_distance", ("n_centroid_ks", "G"), "derived", "‖g_j − c_K(g_j)‖² (DSL)", key="ks", rows="K"),
    Statistic("/gallery_mean", ("d",), "<f8", "gallery", bank="", cols="dimension", doc="mean_j g_j (MP)"),
    Statistic("/gallery_second_moment", ("d", "d"), "<f8", "gallery", bank="", rows="dimension",
              cols="dimension", doc="mean_j g_j g_jᵀ (MP)"),
)

def _update_records(prefix: str, bank: str, dim: str, what: str) -> tuple[Statistic, ...]:
    return (
        Statistic(f"/{bank}_top_items", (dim, f"{prefix}W"), "<i4", "top-k", values="index-or-pad", bound="G",
                  bank=bank, rows=what, cols="column", at_open=False, update=True,
                  doc="each row's best W items, best first (−1 pads once removals used its spares)"),
        Statistic(f"/{bank}_top_scores", (dim, f"{prefix}W"), "<f4", "top-k", values=None, bank=bank, rows=what,
                  cols="column", at_open=False, update=True, doc="their scores (NaN at pads)"),
        Statistic(f"/{prefix}item_top_scores", ("G", f"{prefix}K"), "<f4", "top-k", bank=bank, rows="item",
                  cols="rank", at_open=False, update=True, field="item_top",
                  doc="each item's K largest bank scores, descending (K: the largest of the probe's ks; none without)"),
        *(Statistic(f"/{prefix}item_score_{part}", ("G",), dtype, part.replace("sumsq", "sum"), bank=bank,
                    update=True, field=f"item_score_{part}")
          for part, dtype in (("sum", "<f8"), ("sumsq", "<f8"), ("min", "<f4"), ("max", "<f4"))),
        Statistic(f"/{bank}_row_hash", (dim,), "<i8", "append", values=None, bank=bank, rows=what, cols=what,
                  update=True, doc="a 64-bit digest of each row as read"),
    )


# What an update needs (see the module's docstring), for the bank and the gallery bank.
UPDATE_RECORDS: tuple[Statistic, ...] = (
    *_update_records("", "bank", "N", "bank row"),
    *_update_records("gallery_", "gallery_bank", "Nh", "gallery-bank row"),
    Statistic("/gallery_row_hash", ("G",), "<i8", "append", values=None, bank="", update=True,
              doc="a 64-bit digest of each gallery row as read: an update against another gallery is refused"),
    Statistic("/item_top_rows", ("G", "n_centroid"), "<i4", "top-k", values="index", bound="N", rows="item",
              cols="rank", at_open=False, update=True, field="column_topk_index",
              doc="with dsl's statistics: each item's nearest bank rows, best first (their centroids)"),
)

ALL: tuple[Statistic, ...] = STATISTICS + UPDATE_RECORDS
BY_NAME = {s.name: s for s in ALL}

# The bank's per-item statistics as the accumulator holds them (each (…, G), or (G, …) when item-major),
# and those of them an update merges by their rule (the others are derived from these).
COLUMN_FIELDS = tuple(s.field for s in ALL if s.field and s.bank == "bank")
ITEM_MAJOR = tuple(s.field for s in ALL if s.field and s.bank == "bank" and s.shape[0] == "G" and len(s.shape) == 2)
ITEM_FIELDS = {s.field: s.name for s in UPDATE_RECORDS
               if s.bank == "bank" and s.field and s.field.startswith("item_")}


def item_record(bank: str, field: str) -> str:
    """The dataset of an accumulator's per-item field for a bank ("bank" or "gallery_bank")."""
    return ITEM_FIELDS[field].replace("/", "/" if bank == "bank" else "/gallery_", 1)


def merge_top(a: np.ndarray, b: np.ndarray, width: int) -> np.ndarray:
    """The `width` largest of each row of two descending lists, descending (a multiset: exact)."""
    return -np.sort(-np.concatenate([a, b], axis=1), axis=1)[:, :width]


# How two parts of a per-item statistic merge (rule → function of the two parts).
MERGES = {"log-sum-exp": np.logaddexp, "sum": np.add, "min": np.minimum, "max": np.maximum}


def updatable(names) -> list[str]:
    """What a probe with these datasets lacks for an update (empty: it can be updated)."""
    have = set(names)
    wanted = ["/gallery_row_hash", "/bank_row_hash", "/bank_top_items", "/bank_top_scores",
              *(item_record("bank", f) for f in ITEM_FIELDS)]
    if "/centroid_distance" in have:
        wanted.append("/item_top_rows")
    if "/gallery_log_norm" in have:  # a gallery bank keeps no top-K means: no K largest scores either
        wanted += ["/gallery_bank_row_hash", "/gallery_bank_top_items", "/gallery_bank_top_scores",
                   *(item_record("gallery_bank", f) for f in ITEM_FIELDS if f != "item_top")]
    return [name for name in wanted if name not in have]


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele, Lea and Flood, OOPSLA 2014): a bijection of uint64 (wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def fingerprints(rows: np.ndarray) -> np.ndarray:
    """A 64-bit digest of each row's float32 values, as int64: a multilinear hash (Carter and Wegman,
    1979; Lemire and Kaser, "Strongly universal string hashing is fast", 2014) of the row's 64-bit
    words, Σ kᵢ·wᵢ mod 2⁶⁴ with fixed odd keys, mixed with the row length. One vectorised product for
    a block (a per-row BLAKE2b cost 4 µs a row, most of an update's reading); rows that differ in one
    word (two adjacent values) always differ, and rows of other lengths are told apart."""
    block = np.ascontiguousarray(rows, dtype=np.float32)
    n, d = block.shape
    if d % 2:  # whole 64-bit words: a zero pad (the length is mixed in below)
        block = np.concatenate([block, np.zeros((n, 1), dtype=np.float32)], axis=1)
    words = block.view(np.uint64)
    keys = _mix(np.arange(1, words.shape[1] + 1, dtype=np.uint64) * _GOLDEN) | np.uint64(1)
    return _mix(words @ keys ^ np.uint64(d)).view(np.int64)
