"""DisSimLocal (Hara et al., AAAI 2016) through the query bank:
DSL[q, j] = ‖q − g_j‖² − ‖q − c_K(q)‖² − ‖g_j − c_K(g_j)‖², c_K(g_j) the centroid of the K bank
queries nearest g_j, c_K(q) the centroid of the K gallery items nearest q (a row constant). For
L2-normalised vectors ‖q − g‖² = 2 − 2·S, so −DSL ranks within a row as η = 2·S + ‖g_j − c_K(g_j)‖²
(an offset per item, exportable)."""

from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.methods.base import Method, Needs, cosine_only


def build(probe, p) -> Normaliser:
    cosine_only(probe, METHOD.name)
    return Normaliser(scale=2.0, offset=-probe.centroid_distance(p["topk_mean"]))


METHOD = Method(
    "dsl", "DisSimLocal: ‖q − g‖² − ‖q − c_K(q)‖² − ‖g − c_K(g)‖², c_K the centroid of the K nearest neighbours "
           "(Hara et al. AAAI 2016)",
    "Hara et al., AAAI 2016: ‖q − g‖² − ‖q − c_K(q)‖² − ‖g − c_K(g)‖²; ranks within a row as 2·S + ‖g − c_K(g)‖²",
    ("topk_mean",), build, Needs(centroid=True), defaults={"topk_mean": 10}, grid={"topk_mean": (5, 10, 20, 50)},
    log_domain=True,
    cost="probe: one pass over bank × gallery (each item's K nearest bank queries, then their centroid: "
         "O(gallery × K × d)); normalise: plain retrieval plus an O(gallery) offset")
