"""Nearest Neighbor Normalization (Chowdhury et al., EMNLP 2024): η[q, j] = S[q, j] − α·b_j, b_j
the mean of the K largest bank scores P[:, j]."""

from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.methods.base import Method, Needs


def build(probe, p) -> Normaliser:
    return Normaliser(offset=p["alpha"] * probe.topk_mean(p["topk_mean"]))


METHOD = Method(
    "nnn", "Nearest Neighbor Normalization: S − α·mean top-k bank scores (Chowdhury et al. EMNLP 2024)",
    "Chowdhury et al., EMNLP 2024: S[q, j] − α·b_j, b_j = mean of the k largest P[:, j]",
    ("topk_mean", "alpha"), build, Needs(topk_mean=True), defaults={"topk_mean": 128},
    grid={"topk_mean": (16, 64, 128), "alpha": (0.5, 0.75, 1.0)})
