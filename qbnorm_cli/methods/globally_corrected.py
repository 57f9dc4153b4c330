"""Globally-Corrected retrieval (Dinu et al., ICLR workshop 2015): η[q, j] = −(Rank(S[q, j], P[:, j])
− S[q, j]), the rank of the score among the item's bank scores, ties broken by the score itself."""

from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.methods.base import Method, Needs

METHOD = Method(
    "gc", "Globally-Corrected: S − rank of S among the item's bank scores (Dinu et al. ICLR-W 2015)",
    "Dinu et al., ICLR workshop 2015: −(Rank(S[q, j], P[:, j]) − S[q, j])", (),
    lambda probe, p: Normaliser(sorted_bank=probe.sorted_bank()), Needs(sorted_bank=True), tuned=False,
    cost="probe --keep-sorted: one pass, and every bank score kept sorted (O(bank × gallery) storage); "
         "normalise: plus a binary search per score")
