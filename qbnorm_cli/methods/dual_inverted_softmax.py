"""Dual Inverted Softmax with a query bank and a gallery bank (DBNorm, Wang et al., EMNLP 2023):
η[q, j] = (β₁ + β₂)·S[q, j] − LSE_i(β₁·P[i, j]) − LSE_h(β₂·H[h, j])."""

from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.methods.base import ONE_PASS, SCALED, Method, Needs

DUAL_PASS = ONE_PASS.replace("bank × gallery", "bank × gallery and gallery bank × gallery")


def scale_and_offset(probe, p) -> tuple[float, object]:
    """β₁ + β₂ and LSE_i(β₁·P[i, j]) + LSE_h(β₂·H[h, j]): the dual methods' affine map."""
    beta, gallery_beta = p["beta"], p["gallery_beta"]
    return beta + gallery_beta, probe.log_norm(beta) + probe.gallery_log_norm(gallery_beta)


def build(probe, p) -> Normaliser:
    scale, offset = scale_and_offset(probe, p)
    return Normaliser(scale=scale, offset=offset)


METHOD = Method(
    "dual-is", "Dual Inverted Softmax with query and gallery banks (DBNorm, Wang et al. EMNLP 2023)",
    "Wang et al., EMNLP 2023 (DBNorm): (β₁+β₂)·S − LSE_i(β₁·P[i, j]) − LSE_h(β₂·H[h, j])",
    ("beta", "gallery_beta"), build, Needs(log_norm=True, gallery_bank=True),
    grid={"beta": SCALED, "gallery_beta": SCALED}, log_domain=True, cost=DUAL_PASS)
