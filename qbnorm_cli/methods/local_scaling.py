"""Local Scaling (Schnitzer et al., JMLR 2012, Eq. 4) through the query bank:
LS[q, j] = 1 − exp(−d²/(σ_q σ_j)), d = √(2 − 2·S[q, j]), σ_j the distance of item j to its K-th
nearest bank query, σ_q the query's distance to its K-th nearest gallery item. Within a row σ_q is
a constant, so LS ranks as η = −d²/σ_j = (2/σ_j)·S − 2/σ_j: a per-item affine form (exportable)."""

from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.core.statistics import cosine_distance
from qbnorm_cli.methods.base import Method, Needs, cosine_only

SIGMA_FLOOR = 1e-6  # an item at distance 0 from K bank queries (a duplicate): its scale stays finite


def inverse_scale(sigma):
    """2/σ, σ floored at SIGMA_FLOOR."""
    return 2.0 / sigma.clip(min=SIGMA_FLOOR)


def build(probe, p) -> Normaliser:
    cosine_only(probe, METHOD.name)
    scale = inverse_scale(cosine_distance(probe.topk_kth(p["topk_mean"])))
    return Normaliser(scale=scale, offset=scale)


METHOD = Method(
    "ls", "Local Scaling: 1 − exp(−d²/(σ_q σ_j)), σ the distance to the K-th nearest neighbour on the other side "
          "(Schnitzer et al. JMLR 2012)",
    "Schnitzer et al., JMLR 2012, Eq. 4: LS = 1 − exp(−d²/(σ_q σ_j)); ranks within a row as −d²/σ_j",
    ("topk_mean",), build, Needs(topk_mean=True), defaults={"topk_mean": 10}, grid={"topk_mean": (5, 10, 20, 50)},
    log_domain=True,
    cost="probe: one pass over bank × gallery (each item's K best bank scores); normalise: plain retrieval plus "
         "one multiply-add per score")
