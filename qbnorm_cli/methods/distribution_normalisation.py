"""Distribution Normalisation (Zhou et al., NeurIPS 2023), the query bank standing in for the test
queries: η[q, j] = S[q, j] − λ·μ_QB·g_j = S[q, j] − λ·mean_i P[i, j]."""

from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.methods.base import MAX_WEIGHT, Method, Needs, Parameter

LAM = Parameter("lam", float, "weight λ of the mean bank embedding, in Distribution Normalisation", default=0.25,
                minimum=0, maximum=MAX_WEIGHT, symbol="λ", flag="--lambda", metavar="L")  # lambda: a Python keyword


def build(probe, p) -> Normaliser:
    return Normaliser(offset=p["lam"] * probe.column_mean())


METHOD = Method(
    "dn", "Distribution Normalisation: S − λ·(mean bank embedding · g_j) (Zhou et al. NeurIPS 2023)",
    "Zhou et al., NeurIPS 2023 (DN), the query bank standing in for the test queries: "
    "S[q, j] − λ·μ_QB·g_j = S[q, j] − λ·mean_i P[i, j]",
    ("lam",), build, Needs(column_mean=True), grid={"lam": (0.1, 0.25, 0.5, 0.75, 1.0)},
    declares=(LAM,))
