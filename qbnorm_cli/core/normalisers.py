"""Hubness normalisers as per-gallery offsets with an optional per-row gate, pure numpy.

Every method has the form  η_q(j) = scale · S[q, j] − offset[j] − r_q, applied to the rows whose raw
top-1 item lies in `gate` (every row when gate is None); other rows keep their raw scores. Row
terms r_q (CSLS only) do not change a row's ranking. Globally-Corrected retrieval is the exception:
its score depends on ranks inside each gallery item's bank scores.

Sources (log forms, which rank exactly as the exponential forms):
  is        Inverted Softmax, Smith et al. 2017 / QB-Norm Eq. 3:  β·S − logsumexp_i(β·P[i, j])
  dis       Dynamic Inverted Softmax, Bogolin et al. CVPR 2022 Sec. 3.4: IS only where the raw
            top-1 is in the activation set A (items in the top-k of some bank query)
  csls      Conneau et al. 2018:  2·S − r_q − r_j, r = mean of the K largest similarities
  nnn       Nearest Neighbor Normalization, Chowdhury et al. EMNLP 2024:  S − α·b_j
  gc        Globally-Corrected retrieval, Dinu et al. 2015:  −(Rank(S[q, j], P[:, j]) − S[q, j])
  dual-is   DBNorm, Wang et al. EMNLP 2023:  (β₁+β₂)·S − logsumexp_i(β₁·P) − logsumexp_h(β₂·H)
  dual-dis  dual-is where the raw top-1 is in A_q ∪ A_g
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("none", "is", "dis", "csls", "nnn", "gc", "dual-is", "dual-dis")

METHOD_HELP = {
    "none": "raw similarities (the baseline, through the same path)",
    "is": "Inverted Softmax: β·S − logsumexp over the bank (Smith et al. ICLR 2017; QB-Norm Eq. 3)",
    "dis": "Dynamic Inverted Softmax: IS only when the raw top-1 is a bank hub (Bogolin et al. CVPR 2022)",
    "csls": "Cross-domain Similarity Local Scaling: 2·S − r_q − r_j, mean of top-K (Conneau et al. ICLR 2018)",
    "nnn": "Nearest Neighbor Normalization: S − α·mean top-k bank scores (Chowdhury et al. EMNLP 2024)",
    "gc": "Globally-Corrected: S − rank of S among the item's bank scores (Dinu et al. ICLR-W 2015)",
    "dual-is": "Dual Inverted Softmax with query and gallery banks (DBNorm, Wang et al. EMNLP 2023)",
    "dual-dis": "Dual IS only when the raw top-1 is a hub of either bank (DBNorm, Wang et al. EMNLP 2023)",
}


@dataclass(frozen=True)
class Normaliser:
    """η = scale·S − offset[j] − mean(top-`row_topk` of the raw row), on rows gated in."""

    name: str
    scale: float = 1.0
    offset: np.ndarray | None = None
    gate: np.ndarray | None = None
    row_topk: int = 0
    sorted_bank: object = None  # GC: (G, N) ascending bank scores per gallery item, sliceable
    identity: bool = False

    def transform(self, tile: np.ndarray, c0: int = 0) -> np.ndarray:
        """η for a tile of raw scores covering columns c0:c0+width (row term excluded), float64."""
        tile = tile.astype(np.float64, copy=False)
        if self.sorted_bank is not None:
            return tile - globally_corrected_rank(tile, self.sorted_bank[c0:c0 + tile.shape[1]])
        out = tile if self.scale == 1.0 else self.scale * tile
        if self.offset is not None:
            out = out - self.offset[c0:c0 + tile.shape[1]]
        return out

    def row_term(self, raw_top_values: np.ndarray | None) -> np.ndarray | float:
        if not self.row_topk:
            return 0.0
        return raw_top_values[:, : self.row_topk].mean(axis=1, dtype=np.float64)

    def gated(self, raw_top1: np.ndarray) -> np.ndarray:
        """Which rows are normalised, from each row's raw top-1 gallery index."""
        if self.identity:
            return np.zeros(raw_top1.shape, dtype=bool)
        if self.gate is None:
            return np.ones(raw_top1.shape, dtype=bool)
        return self.gate[raw_top1]


def globally_corrected_rank(tile: np.ndarray, sorted_cols) -> np.ndarray:
    """How many bank scores of each column exceed each score: N − searchsorted(…, side='right')."""
    sorted_cols = np.asarray(sorted_cols)
    n = sorted_cols.shape[1]
    ranks = np.empty(tile.shape)
    for j in range(tile.shape[1]):
        ranks[:, j] = n - np.searchsorted(sorted_cols[j], tile[:, j], side="right")
    return ranks


def none() -> Normaliser:
    return Normaliser("none", identity=True)


def inverted_softmax(log_norm: np.ndarray, beta: float) -> Normaliser:
    return Normaliser("is", scale=beta, offset=log_norm)


def dynamic_inverted_softmax(log_norm: np.ndarray, beta: float, activation: np.ndarray) -> Normaliser:
    return Normaliser("dis", scale=beta, offset=log_norm, gate=activation)


def csls(gallery_topk_mean: np.ndarray, k: int) -> Normaliser:
    return Normaliser("csls", scale=2.0, offset=gallery_topk_mean, row_topk=k)


def nnn(gallery_topk_mean: np.ndarray, alpha: float) -> Normaliser:
    return Normaliser("nnn", offset=alpha * gallery_topk_mean)


def globally_corrected(sorted_bank) -> Normaliser:
    return Normaliser("gc", sorted_bank=sorted_bank)


def dual_inverted_softmax(log_norm: np.ndarray, beta: float, gallery_log_norm: np.ndarray,
                          gallery_beta: float) -> Normaliser:
    return Normaliser("dual-is", scale=beta + gallery_beta, offset=log_norm + gallery_log_norm)


def dual_dynamic_inverted_softmax(log_norm, beta, gallery_log_norm, gallery_beta,
                                  activation: np.ndarray, gallery_activation: np.ndarray) -> Normaliser:
    return Normaliser("dual-dis", scale=beta + gallery_beta, offset=log_norm + gallery_log_norm,
                      gate=activation | gallery_activation)


def apply_dense(raw: np.ndarray, norm: Normaliser) -> tuple[np.ndarray, np.ndarray]:
    """Normalise whole rows of raw scores: (scores float64, which rows were normalised)."""
    gated = norm.gated(np.argmax(raw, axis=1))
    out = raw.astype(np.float64)
    if gated.any():
        rows = np.nonzero(gated)[0]
        top = None
        if norm.row_topk:
            k = min(norm.row_topk, raw.shape[1])
            top = np.partition(raw[rows], raw.shape[1] - k, axis=1)[:, raw.shape[1] - k:]
        term = norm.row_term(top)
        out[rows] = norm.transform(raw[rows]) - (term[:, None] if np.ndim(term) else term)
    return out, gated
