"""Sinkhorn Normalisation (Pan et al., ACM MM 2025): η[q, j] = β·S[q, j] + log u_j, (u, v) the
Sinkhorn scalings of exp(β·P[b, j]) between uniform gallery and bank marginals."""

from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.methods.base import SCALED, SINKHORN_COST, Method, Needs


def build(probe, p) -> Normaliser:
    return Normaliser(scale=p["beta"], offset=-probe.sinkhorn_log_u(p["beta"]))


METHOD = Method(
    "sn", "Sinkhorn Normalisation: β·S + log u, u the Sinkhorn scaling of the bank × gallery coupling "
          "(Pan et al. ACM MM 2025)",
    "Pan et al., ACM MM 2025 (SN): β·S[q, j] + log u_j, (u, v) the Sinkhorn scalings of exp(β·P[b, j]) "
    "between uniform gallery and bank marginals",
    ("beta",), build, Needs(sinkhorn=True), grid={"beta": SCALED}, log_domain=True,
    cost=SINKHORN_COST.format(scores="bank × gallery score"))
