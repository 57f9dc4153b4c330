"""The raw similarities, through the same path as every method: the baseline of every comparison."""

from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.methods.base import Method

METHOD = Method(
    "none", "raw similarities (the baseline, through the same path)", "—", (),
    lambda probe, p: Normaliser(identity=True), baseline=True, tuned=False, cost="normalise: plain retrieval")
