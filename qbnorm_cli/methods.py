"""The registry of normalisers: every method is declared here once, and only here.

A `Method` says what it computes (its help line and the formula's source), which parameters it
takes (each a `Parameter`: default, validation, the values `tune` tries), which probe statistics
it needs, and how its `Normaliser` (core/normalisers.py: η = scale·S − offset[j] − r_q with a
gate) is built from a probe. `probe` computes what the chosen methods need, `normalise` builds
from it, `tune` walks the grid of every method's parameters, and the CLI's checks and help come
from the same entries: adding a method is adding one entry (and its tests).

The formulas, in log form (which ranks exactly as the exponential forms), with P[i, j] the bank ×
gallery scores, H[h, j] the gallery-bank × gallery scores, PB[i, h] the bank × gallery-bank scores
and S[q, j] the query × gallery scores, are given with each entry below.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.errors import UsageError, param

# β grids for cosine-scale scores; `core.scale.beta_grid` adds their equivalents on other scales
BETA_GRID = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 100.0)
GALLERY_BETA_GRID = (1.0, 2.0, 5.0, 10.0, 20.0)
SCALED = "scaled"  # a grid that follows the score scale (core.scale.beta_grid)
WHOLE_MAX = 2**31 - 1  # k and K are stored as 32-bit integers (and no gallery is larger)
ONE_PASS = "probe: one pass over bank × gallery; normalise: plain retrieval plus an O(gallery) offset"
SINKHORN_COST = ("probe --sinkhorn: two passes (a float64 exp per {scores}), then two matrix-vector products over "
                 "a float32 kernel per iteration (recomputed where it does not fit half of --memory); normalise: "
                 "plain retrieval plus an O(gallery) offset")


@dataclass(frozen=True)
class Parameter:
    """A method parameter: the library's keyword (the CLI's flag is --name, dashes for underscores)."""

    name: str
    kind: type
    help: str
    default: float | int | None = None  # None: from the probe (its only β), or required
    minimum: float | None = None         # values must be ≥ this (> 0 when exclusive)
    exclusive: bool = False
    maximum: int | None = None           # whole numbers: at most this (what a file can record)

    def check(self, value):
        """The value as `kind`, or UsageError naming the parameter."""
        try:
            number = self.kind(value)
        except (TypeError, ValueError):
            raise UsageError(f"{param(self.name)} {value!r}: expected a number") from None
        if self.kind is int and number != value:
            raise UsageError(f"{param(self.name)} {value}: expected a whole number")
        low = self.minimum is not None and (number <= self.minimum if self.exclusive else number < self.minimum)
        if self.kind is float and (low or not math.isfinite(number)):
            bound = "" if self.minimum is None else f" {'>' if self.exclusive else '≥'} {self.minimum:g}"
            raise UsageError(f"{param(self.name)} {value}: must be a finite number{bound}")
        if low:
            raise UsageError(f"{param(self.name)} {value}: must be at least {self.minimum:g}")
        if self.maximum is not None and number > self.maximum:
            raise UsageError(f"{param(self.name)} {value}: must be at most {self.maximum}")
        return number


PARAMETERS: dict[str, Parameter] = {p.name: p for p in (
    Parameter("beta", float, "inverse temperature β of the inverted softmax (β₁ of the dual methods); "
              "default: the probe's", minimum=0, exclusive=True),
    Parameter("k", int, "activation set: items in the top-k of a bank query", default=1, minimum=1,
              maximum=WHOLE_MAX),
    Parameter("gallery_beta", float, "β₂ of the gallery bank; default: the probe's", minimum=0, exclusive=True),
    Parameter("topk_mean", int, "K of the mean-of-top-K bank scores", minimum=1, maximum=WHOLE_MAX),
    Parameter("alpha", float, "weight α of the gallery offset", default=0.75),
    Parameter("min_count", int, "θ: an item is a hub when it is in the top-k of at least θ bank queries",
              default=1, minimum=1),
    Parameter("lam", float, "weight λ of the mean bank embedding (Distribution Normalisation)", default=0.25,
              minimum=0),
)}


@dataclass(frozen=True)
class Needs:
    """Probe statistics a method reads (io/probefile.py has their layout)."""

    log_norm: bool = False          # LSE_i(β·P[i, j]) for its β
    neighbors: bool = False         # each bank row's top items (activation sets)
    topk_mean: bool = False         # mean of the K largest P[:, j]
    sorted_bank: bool = False       # P[:, j] ascending, per item
    gallery_bank: bool = False      # the same from a gallery bank (H)
    column_mean: bool = False       # mean_i P[i, j]
    sinkhorn: bool = False          # log u of the Sinkhorn scalings of P for its β
    dual_sinkhorn: bool = False     # log u of the Sinkhorn scalings of [P | PB] (the gallery's part)


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    source: str
    parameters: tuple[str, ...]
    build: Callable[[object, Mapping], Normaliser]  # (probe statistics, parameter values) → Normaliser
    needs: Needs = Needs()
    defaults: Mapping[str, float | int] = field(default_factory=dict)  # per-method defaults
    grid: Mapping[str, tuple | str] = field(default_factory=dict)      # values `tune` tries
    within_gallery: tuple[str, ...] = ()  # parameters that count gallery items: at most the gallery size
    log_domain: bool = False  # scores are β·S − log-normaliser: compare them within a row only
    tuned: bool = True        # part of tune's default methods
    baseline: bool = False    # the raw scores through the same path
    cost: str = ONE_PASS      # what probe and normalise pay for it

    def default(self, name: str):
        return self.defaults.get(name, PARAMETERS[name].default)

    @property
    def dual(self) -> bool:
        """Whether it needs a gallery bank (H, or the bank × gallery-bank scores PB)."""
        return self.needs.gallery_bank or self.needs.dual_sinkhorn


def _is(probe, p) -> Normaliser:
    return Normaliser(scale=p["beta"], offset=probe.log_norm(p["beta"]))


def _dis(probe, p) -> Normaliser:
    return Normaliser(scale=p["beta"], offset=probe.log_norm(p["beta"]),
                      gate=probe.activation(p["k"], min_count=p["min_count"]))


def _csls(probe, p) -> Normaliser:  # r_q averages the row's K best: at most the whole gallery
    return Normaliser(scale=2.0, offset=probe.topk_mean(p["topk_mean"]), row_topk=min(p["topk_mean"], probe.n_gallery))


def _nnn(probe, p) -> Normaliser:
    return Normaliser(offset=p["alpha"] * probe.topk_mean(p["topk_mean"]))


def _dual(probe, p) -> tuple[float, object]:
    beta, gallery_beta = p["beta"], p["gallery_beta"]
    return beta + gallery_beta, probe.log_norm(beta) + probe.gallery_log_norm(gallery_beta)


def _dual_is(probe, p) -> Normaliser:
    scale, offset = _dual(probe, p)
    return Normaliser(scale=scale, offset=offset)


def _dual_dis(probe, p) -> Normaliser:
    scale, offset = _dual(probe, p)
    gate = probe.activation(p["k"], min_count=p["min_count"]) | \
        probe.activation(p["k"], gallery=True, min_count=p["min_count"])
    return Normaliser(scale=scale, offset=offset, gate=gate)


def _sn(probe, p) -> Normaliser:  # η = β·S + log u_j
    return Normaliser(scale=p["beta"], offset=-probe.sinkhorn_log_u(p["beta"]))


def _dbsn(probe, p) -> Normaliser:
    return Normaliser(scale=p["beta"], offset=-probe.sinkhorn_log_u(p["beta"], dual=True))


def _dn(probe, p) -> Normaliser:
    return Normaliser(offset=p["lam"] * probe.column_mean())


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("none", "raw similarities (the baseline, through the same path)", "—", (),
           lambda probe, p: Normaliser(identity=True), baseline=True, tuned=False,
           cost="normalise: plain retrieval"),
    Method("is", "Inverted Softmax: β·S − logsumexp over the bank (Smith et al. ICLR 2017; QB-Norm Eq. 3)",
           "Smith et al., ICLR 2017; Bogolin et al., CVPR 2022, Eq. 3: β·S[q, j] − LSE_i(β·P[i, j])",
           ("beta",), _is, Needs(log_norm=True), grid={"beta": SCALED}, log_domain=True),
    Method("dis", "Dynamic Inverted Softmax: IS only when the raw top-1 is a bank hub (Bogolin et al. CVPR 2022)",
           "Bogolin et al., CVPR 2022, Sec. 3.4: IS on the rows whose raw top-1 is in the activation set A "
           "(items in the top-k of some bank query), raw scores elsewhere",
           ("beta", "k", "min_count"), _dis, Needs(log_norm=True, neighbors=True),
           grid={"beta": SCALED, "k": (1, 2, 5), "min_count": (1, 3, 5)}, log_domain=True),
    Method("csls", "Cross-domain Similarity Local Scaling: 2·S − r_q − r_j, mean of top-K (Conneau et al. ICLR 2018)",
           "Conneau et al., ICLR 2018: 2·S[q, j] − r_q − r_j, r = mean of the K largest similarities",
           ("topk_mean",), _csls, Needs(topk_mean=True), defaults={"topk_mean": 10}, grid={"topk_mean": (5, 10, 20)},
           within_gallery=("topk_mean",), cost=ONE_PASS + " and each row's top-K"),
    Method("nnn", "Nearest Neighbor Normalization: S − α·mean top-k bank scores (Chowdhury et al. EMNLP 2024)",
           "Chowdhury et al., EMNLP 2024: S[q, j] − α·b_j, b_j = mean of the k largest P[:, j]",
           ("topk_mean", "alpha"), _nnn, Needs(topk_mean=True), defaults={"topk_mean": 128},
           grid={"topk_mean": (16, 64, 128), "alpha": (0.5, 0.75, 1.0)}),
    Method("gc", "Globally-Corrected: S − rank of S among the item's bank scores (Dinu et al. ICLR-W 2015)",
           "Dinu et al., ICLR workshop 2015: −(Rank(S[q, j], P[:, j]) − S[q, j])", (),
           lambda probe, p: Normaliser(sorted_bank=probe.sorted_bank()), Needs(sorted_bank=True), tuned=False,
           cost="probe --keep-sorted: one pass, and every bank score kept sorted (O(bank × gallery) storage); "
                "normalise: plus a binary search per score"),
    Method("dual-is", "Dual Inverted Softmax with query and gallery banks (DBNorm, Wang et al. EMNLP 2023)",
           "Wang et al., EMNLP 2023 (DBNorm): (β₁+β₂)·S − LSE_i(β₁·P[i, j]) − LSE_h(β₂·H[h, j])",
           ("beta", "gallery_beta"), _dual_is, Needs(log_norm=True, gallery_bank=True),
           grid={"beta": SCALED, "gallery_beta": SCALED}, log_domain=True, cost=ONE_PASS.replace(
               "bank × gallery", "bank × gallery and gallery bank × gallery")),
    Method("dual-dis", "Dual IS only when the raw top-1 is a hub of either bank (DBNorm, Wang et al. EMNLP 2023)",
           "Wang et al., EMNLP 2023 (DBNorm): dual IS on the rows whose raw top-1 is in A_q ∪ A_g",
           ("beta", "gallery_beta", "k", "min_count"), _dual_dis,
           Needs(log_norm=True, neighbors=True, gallery_bank=True),
           grid={"beta": SCALED, "gallery_beta": SCALED, "k": (1, 2, 5)}, log_domain=True, cost=ONE_PASS.replace(
               "bank × gallery", "bank × gallery and gallery bank × gallery")),
    Method("sn", "Sinkhorn Normalisation: β·S + log u, u the Sinkhorn scaling of the bank × gallery coupling "
                 "(Pan et al. ACM MM 2025)",
           "Pan et al., ACM MM 2025 (SN): β·S[q, j] + log u_j, (u, v) the Sinkhorn scalings of exp(β·P[b, j]) "
           "between uniform gallery and bank marginals",
           ("beta",), _sn, Needs(sinkhorn=True), grid={"beta": SCALED}, log_domain=True,
           cost=SINKHORN_COST.format(scores="bank × gallery score")),
    Method("dbsn", "Dual-Bank Sinkhorn: SN whose rows are the gallery and a gallery bank (Pan et al. ACM MM 2025)",
           "Pan et al., ACM MM 2025 (DBSN): β·S[q, j] + log u_j, u the Sinkhorn scaling of exp(β·[P | PB]) over "
           "the gallery and the gallery bank (one uniform marginal) against the bank queries",
           ("beta",), _dbsn, Needs(dual_sinkhorn=True), grid={"beta": SCALED}, log_domain=True,
           cost=SINKHORN_COST.format(scores="bank × (gallery + gallery bank) score")),
    Method("dn", "Distribution Normalisation: S − λ·(mean bank embedding · g_j) (Zhou et al. NeurIPS 2023)",
           "Zhou et al., NeurIPS 2023 (DN), the query bank standing in for the test queries: "
           "S[q, j] − λ·μ_QB·g_j = S[q, j] − λ·mean_i P[i, j]",
           ("lam",), _dn, Needs(column_mean=True), grid={"lam": (0.1, 0.25, 0.5, 0.75, 1.0)}),
)}

DEFAULT = METHODS["dis"]
BASELINE = next(m for m in METHODS.values() if m.baseline)
DEFAULT_BETA = 20.0          # for cosine similarities (QB-Norm's setting)
DEFAULT_GALLERY_BETA = 1.0   # a gentle mean-score correction from the gallery bank
KMAX_MIN = 10                # probe keeps at least this many top items per bank row


def get(name: str) -> Method:
    """The method of this name, or UsageError listing them."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise UsageError(f"{param('method')} {name!r}: choose one of {', '.join(METHODS)}") from None


def names(*, include_baseline: bool = True) -> list[str]:
    return [m.name for m in METHODS.values() if include_baseline or not m.baseline]


def help_text() -> str:
    """One paragraph per method: `name: help. Cost: …`."""
    return "\n\n".join(f"{m.name}: {m.help}. Cost: {m.cost}." for m in METHODS.values())


def default_topk_means() -> tuple[int, ...]:
    """The K of every method's default mean-of-top-K statistic (what probe computes by default)."""
    return tuple(sorted({int(m.default("topk_mean")) for m in METHODS.values() if "topk_mean" in m.parameters}))


def settings(method: Method, given: Mapping[str, object], probe) -> dict:
    """Every parameter of `method` with its value: given (checked), the method's default, or the
    probe's (β, β₂: its only one, or 20 among several)."""
    out = {}
    for name in method.parameters:
        value = given.get(name)
        if value is None:
            value = method.default(name)
        if value is None and name == "beta":
            value = probe.default_beta()
        if value is None and name == "gallery_beta":
            value = probe.default_gallery_beta()
        out[name] = PARAMETERS[name].check(value)
    return out


def build(method: Method, probe, values: Mapping) -> Normaliser:
    """The method's normaliser from the probe's statistics and its parameter values (`settings`)."""
    return method.build(probe, values)


# --- tune's grid -----------------------------------------------------------------------------------

def grid(methods: list[Method], scaled_grids: Mapping[str, list[float]], fixed: Mapping[str, list] | None = None,
         k_limit: int | None = None) -> list[tuple[Method, dict]]:
    """The baseline, then every combination of each method's grid values, in registry order.

    scaled_grids: the values of the score-scale grids ("beta", "gallery_beta"); fixed: values the
    caller chose instead of a parameter's grid; k_limit: drop settings with k above it."""
    fixed = fixed or {}
    out = [(BASELINE, {})]
    for method in methods:
        axes = []
        for name in method.parameters:
            values = fixed.get(name) or method.grid.get(name) or (method.default(name),)
            if values == SCALED:
                values = fixed.get(name) or scaled_grids[name]
            axes.append([(name, v) for v in values])
        for combination in itertools.product(*axes):
            values = dict(combination)
            if k_limit is not None and values.get("k", 1) > k_limit:
                continue
            out.append((method, values))
    return out


def tuned_methods(requested: list[str] | None, has_gallery_bank: bool,
                  has_bank_gallery_bank: bool | None = None) -> list[Method]:
    """The methods tune tries: those named (checked), or the default ones (the dual ones only with
    a gallery bank: its scores against the gallery (H), and for dbsn the bank's scores against it
    (PB; `has_bank_gallery_bank`, by default as `has_gallery_bank`))."""
    has_cross = has_gallery_bank if has_bank_gallery_bank is None else has_bank_gallery_bank

    def available(m: Method) -> bool:
        return (has_gallery_bank or not m.needs.gallery_bank) and (has_cross or not m.needs.dual_sinkhorn)

    if requested is None:
        return [m for m in METHODS.values() if m.tuned and available(m)]
    if not requested:
        raise UsageError(f"{param('methods')}: name at least one method")
    chosen = []
    for name in requested:
        method = METHODS.get(name)
        if method is None:
            raise UsageError(f"{param('methods')} {name!r}: choose from {', '.join(names(include_baseline=False))}")
        if method.needs.gallery_bank and not has_gallery_bank:
            raise UsageError(f"{param('methods')} {name}: needs a gallery bank "
                             f"({param('gallery_bank')} or {param('gallery_bank_sims')})")
        if method.needs.dual_sinkhorn and not has_cross:
            raise UsageError(f"{param('methods')} {name}: needs the bank's scores against a gallery bank "
                             f"({param('gallery_bank')} with {param('bank')} embeddings, or "
                             f"{param('bank_gallery_bank_sims')})")
        if not method.baseline and method not in chosen:
            chosen.append(method)
    return chosen


@dataclass
class ProbeRequest:
    """What one probe pass must compute for a set of settings."""

    betas: list[float]
    gallery_betas: list[float]
    kmax: int
    topk_means: tuple[int, ...]
    keep_sorted: bool
    gallery_bank: bool
    sinkhorn_betas: list[float] = field(default_factory=list)       # SN's potentials for these β
    dual_sinkhorn_betas: list[float] = field(default_factory=list)  # DBSN's

    @classmethod
    def of(cls, settings_: list[tuple[Method, dict]]) -> ProbeRequest:
        def betas_of(need: str) -> list[float]:
            return sorted({v["beta"] for m, v in settings_ if getattr(m.needs, need) and "beta" in v})

        betas = sorted({v["beta"] for _, v in settings_ if "beta" in v}) or [DEFAULT_BETA]
        gallery = sorted({v["gallery_beta"] for _, v in settings_ if "gallery_beta" in v}) or [DEFAULT_GALLERY_BETA]
        kmax = max([v["k"] for _, v in settings_ if "k" in v] or [1])
        ks = tuple(sorted({v["topk_mean"] for _, v in settings_ if "topk_mean" in v}))
        return cls(betas, gallery, kmax, ks, any(m.needs.sorted_bank for m, _ in settings_),
                   any(m.needs.gallery_bank for m, _ in settings_), betas_of("sinkhorn"), betas_of("dual_sinkhorn"))


def label(method: Method, values: Mapping) -> str:
    """A setting as people read it: `dis β=20 k=1`."""
    symbols = {"beta": "β", "k": "k", "gallery_beta": "β₂", "topk_mean": "K", "alpha": "α", "min_count": "θ",
               "lam": "λ"}
    parts = ["raw" if method.baseline else method.name]
    parts += [f"{symbols.get(name, name)}={values[name]:g}" for name in PARAMETERS if name in values]
    return " ".join(parts)
