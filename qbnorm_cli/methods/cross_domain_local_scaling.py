"""Cross-domain Similarity Local Scaling (Conneau et al., ICLR 2018):
η[q, j] = 2·S[q, j] − r_q − r_j, r the mean of the K largest similarities (r_j over the bank)."""

from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.methods.base import ONE_PASS, Method, Needs


def build(probe, p) -> Normaliser:  # r_q averages the row's K best: at most the whole gallery
    return Normaliser(scale=2.0, offset=probe.topk_mean(p["topk_mean"]), row_topk=min(p["topk_mean"], probe.n_gallery))


METHOD = Method(
    "csls", "Cross-domain Similarity Local Scaling: 2·S − r_q − r_j, mean of top-K (Conneau et al. ICLR 2018)",
    "Conneau et al., ICLR 2018: 2·S[q, j] − r_q − r_j, r = mean of the K largest similarities",
    ("topk_mean",), build, Needs(topk_mean=True), defaults={"topk_mean": 10}, grid={"topk_mean": (5, 10, 20)},
    within_gallery=("topk_mean",), cost=ONE_PASS + " and each row's top-K")
