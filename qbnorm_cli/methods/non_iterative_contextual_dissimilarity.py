"""The Non-Iterative Contextual Dissimilarity Measure (Jégou et al., CVPR 2007; as in Schnitzer et
al., JMLR 2012) through the query bank: NICDM[q, j] = d / √(μ_q μ_j), d = √(2 − 2·S[q, j]), μ_j the
mean distance of item j to its K nearest bank queries, μ_q the query's mean distance to its K
nearest gallery items. Within a row it ranks as η = −d²/μ_j = (2/μ_j)·S − 2/μ_j (per-item affine)."""

from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.methods.base import Method, Needs, cosine_only
from qbnorm_cli.methods.local_scaling import inverse_scale


def build(probe, p) -> Normaliser:
    cosine_only(probe, METHOD.name)
    scale = inverse_scale(probe.topk_distance(p["topk_mean"]))
    return Normaliser(scale=scale, offset=scale)


METHOD = Method(
    "nicdm", "Non-Iterative Contextual Dissimilarity: d/√(μ_q μ_j), μ the mean distance to the K nearest neighbours "
             "on the other side (Jégou et al. CVPR 2007)",
    "Jégou et al., CVPR 2007; Schnitzer et al., JMLR 2012: NICDM = d/√(μ_q μ_j); ranks within a row as −d²/μ_j",
    ("topk_mean",), build, Needs(topk_mean=True), defaults={"topk_mean": 10}, grid={"topk_mean": (5, 10, 20, 50)},
    log_domain=True,
    cost="probe: one pass over bank × gallery (each item's K best bank scores); normalise: plain retrieval plus "
         "one multiply-add per score")
