"""Dynamic Inverted Softmax (QB-Norm, Bogolin et al., CVPR 2022, Sec. 3.4): the inverted softmax
on the rows whose raw top-1 is in the activation set A (the items in the top-k of at least θ bank
queries), the raw scores elsewhere."""

from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.methods.base import SCALED, Method, Needs, Parameter

MIN_COUNT = Parameter("min_count", int, "activation set: an item is a hub when it is in the top-k of at least θ bank "
                      "queries", default=1, minimum=1, symbol="θ", metavar="θ")


def build(probe, p) -> Normaliser:
    return Normaliser(scale=p["beta"], offset=probe.log_norm(p["beta"]),
                      gate=probe.activation(p["k"], min_count=p["min_count"]))


METHOD = Method(
    "dis", "Dynamic Inverted Softmax: IS only when the raw top-1 is a bank hub (Bogolin et al. CVPR 2022)",
    "Bogolin et al., CVPR 2022, Sec. 3.4: IS on the rows whose raw top-1 is in the activation set A "
    "(items in the top-k of some bank query), raw scores elsewhere",
    ("beta", "k", "min_count"), build, Needs(log_norm=True, neighbors=True),
    grid={"beta": SCALED, "k": (1, 2, 5), "min_count": (1, 3, 5)}, log_domain=True, default_method=True,
    declares=(MIN_COUNT,))
