"""Dual Dynamic Inverted Softmax (DBNorm, Wang et al., EMNLP 2023): the dual inverted softmax on
the rows whose raw top-1 is a hub of either bank (A_q ∪ A_g), the raw scores elsewhere."""

from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.methods.base import SCALED, Method, Needs
from qbnorm_cli.methods.dual_inverted_softmax import DUAL_PASS, scale_and_offset


def build(probe, p) -> Normaliser:
    scale, offset = scale_and_offset(probe, p)
    gate = probe.activation(p["k"], min_count=p["min_count"]) | \
        probe.activation(p["k"], gallery=True, min_count=p["min_count"])
    return Normaliser(scale=scale, offset=offset, gate=gate)


METHOD = Method(
    "dual-dis", "Dual IS only when the raw top-1 is a hub of either bank (DBNorm, Wang et al. EMNLP 2023)",
    "Wang et al., EMNLP 2023 (DBNorm): dual IS on the rows whose raw top-1 is in A_q ∪ A_g",
    ("beta", "gallery_beta", "k", "min_count"), build, Needs(log_norm=True, neighbors=True, gallery_bank=True),
    grid={"beta": SCALED, "gallery_beta": SCALED, "k": (1, 2, 5)}, log_domain=True, cost=DUAL_PASS)
