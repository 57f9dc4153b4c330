"""Inverted Softmax (Smith et al., ICLR 2017), with a query bank standing in for the test queries
(QB-Norm, Bogolin et al., CVPR 2022, Eq. 3): η[q, j] = β·S[q, j] − LSE_i(β·P[i, j])."""

from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.methods.base import SCALED, Method, Needs


def build(probe, p) -> Normaliser:
    return Normaliser(scale=p["beta"], offset=probe.log_norm(p["beta"]))


METHOD = Method(
    "is", "Inverted Softmax: β·S − logsumexp over the bank (Smith et al. ICLR 2017; QB-Norm Eq. 3)",
    "Smith et al., ICLR 2017; Bogolin et al., CVPR 2022, Eq. 3: β·S[q, j] − LSE_i(β·P[i, j])",
    ("beta",), build, Needs(log_norm=True), grid={"beta": SCALED}, log_domain=True)
