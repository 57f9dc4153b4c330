"""Nearest Neighbor Normalization (Chowdhury et al., EMNLP 2024): η[q, j] = S[q, j] − α·b_j, b_j
the mean of the K largest bank scores P[:, j]; with γ, localized centering (Hara et al., AAAI
2015): S[q, j] − α·b_j^γ (γ = 1, α = 1: the two coincide), b_j^γ taken as sign(b_j)·|b_j|^γ so that
negative means stay defined."""

import numpy as np

from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.methods.base import MAX_WEIGHT, Method, Needs, Parameter

GAMMA = Parameter("gamma", float, "exponent γ of nnn's bank offset S − α·b_j^γ, localized centering", default=1.0,
                  minimum=0, maximum=MAX_WEIGHT, symbol="γ", metavar="G")


def build(probe, p) -> Normaliser:
    b = probe.topk_mean(p["topk_mean"])
    if p["gamma"] != 1.0:
        b = np.sign(b) * np.abs(b) ** p["gamma"]
    return Normaliser(offset=p["alpha"] * b)


METHOD = Method(
    "nnn", "Nearest Neighbor Normalization: S − α·mean top-k bank scores (Chowdhury et al. EMNLP 2024)",
    "Chowdhury et al., EMNLP 2024: S[q, j] − α·b_j, b_j = mean of the k largest P[:, j]; "
    "Hara et al., AAAI 2015 (localized centering): S[q, j] − α·b_j^γ",
    ("topk_mean", "alpha", "gamma"), build, Needs(topk_mean=True), defaults={"topk_mean": 128},
    grid={"topk_mean": (16, 64, 128), "alpha": (0.5, 0.75, 1.0)}, declares=(GAMMA,))
