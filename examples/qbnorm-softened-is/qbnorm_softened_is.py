"""Softened Inverted Softmax, an example of a qbnorm method from another package.

η[q, j] = β·S[q, j] − α·LSE_i(β·P[i, j]): α = 1 is QB-Norm's inverted softmax (Bogolin et al.,
CVPR 2022, Eq. 3), α = 0 the raw ranking; in between, a hub's penalty is scaled down. It reads the
probe statistic the inverted softmax reads (the bank's log-sum-exp at β), takes two parameters
qbnorm already declares (β, α), and is an affine map of S per item, so `normalise` (dense and
--top-k), `tune`, `export` and `search` take it as they take the built-in methods.
"""

from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.methods.base import SCALED, Method, Needs


def build(probe, p) -> Normaliser:
    return Normaliser(scale=p["beta"], offset=p["alpha"] * probe.log_norm(p["beta"]))


METHOD = Method(
    "softened-is", "Softened Inverted Softmax: β·S − α·logsumexp over the bank (example plug-in)",
    "qbnorm's example plug-in: β·S[q, j] − α·LSE_i(β·P[i, j]); α = 1 is Bogolin et al., CVPR 2022, Eq. 3",
    ("beta", "alpha"), build, Needs(log_norm=True), defaults={"alpha": 0.5},
    grid={"beta": SCALED, "alpha": (0.25, 0.5, 0.75)}, log_domain=True, tuned=False)  # tuned when named
