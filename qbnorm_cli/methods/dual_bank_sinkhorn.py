"""Dual-Bank Sinkhorn Normalisation (Pan et al., ACM MM 2025): η[q, j] = β·S[q, j] + log u_j, u the
Sinkhorn scaling of exp(β·[P | PB]) over the gallery and a gallery bank (one uniform marginal)
against the bank queries."""

from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.methods.base import SCALED, SINKHORN_COST, Method, Needs


def build(probe, p) -> Normaliser:
    return Normaliser(scale=p["beta"], offset=-probe.sinkhorn_log_u(p["beta"], dual=True))


METHOD = Method(
    "dbsn", "Dual-Bank Sinkhorn: SN whose rows are the gallery and a gallery bank (Pan et al. ACM MM 2025)",
    "Pan et al., ACM MM 2025 (DBSN): β·S[q, j] + log u_j, u the Sinkhorn scaling of exp(β·[P | PB]) over "
    "the gallery and the gallery bank (one uniform marginal) against the bank queries",
    ("beta",), build, Needs(dual_sinkhorn=True), grid={"beta": SCALED}, log_domain=True,
    cost=SINKHORN_COST.format(scores="bank × (gallery + gallery bank) score"))
