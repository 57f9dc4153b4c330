"""The registry of normalisers: every method is declared here once, and only here.

A `Method` says what it computes (its help line and the formula's source), which parameters it
takes (each a `Parameter`: default, validation, the values `tune` tries), which probe statistics
it needs, and how its `Normaliser` (core/normalisers.py: η = scale·S − offset[j] − r_q with a
gate) is built from a probe. `probe` computes what the chosen methods need, `normalise` builds
from it, `tune` walks the grid of every method's parameters, and the CLI's checks and help come
from the same entries: adding a method is adding one entry (and its tests).

The formulas, in log form (which ranks exactly as the exponential forms), with P[i, j] the bank ×
gallery scores, H[h, j] the gallery-bank × gallery scores and S[q, j] the query × gallery scores,
are given with each entry below.
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
)}


@dataclass(frozen=True)
class Needs:
    """Probe statistics a method reads (io/probefile.py has their layout)."""

    log_norm: bool = False          # LSE_i(β·P[i, j]) for its β
    neighbors: bool = False         # each bank row's top items (activation sets)
    topk_mean: bool = False         # mean of the K largest P[:, j]
    sorted_bank: bool = False       # P[:, j] ascending, per item
    gallery_bank: bool = False      # the same from a gallery bank (H)


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

    def default(self, name: str):
        return self.defaults.get(name, PARAMETERS[name].default)

    @property
    def dual(self) -> bool:
        return self.needs.gallery_bank


def _is(probe, p) -> Normaliser:
    return Normaliser(scale=p["beta"], offset=probe.log_norm(p["beta"]))


def _dis(probe, p) -> Normaliser:
    return Normaliser(scale=p["beta"], offset=probe.log_norm(p["beta"]), gate=probe.activation(p["k"]))


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
    gate = probe.activation(p["k"]) | probe.activation(p["k"], gallery=True)
    return Normaliser(scale=scale, offset=offset, gate=gate)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("none", "raw similarities (the baseline, through the same path)", "—", (),
           lambda probe, p: Normaliser(identity=True), baseline=True, tuned=False),
    Method("is", "Inverted Softmax: β·S − logsumexp over the bank (Smith et al. ICLR 2017; QB-Norm Eq. 3)",
           "Smith et al., ICLR 2017; Bogolin et al., CVPR 2022, Eq. 3: β·S[q, j] − LSE_i(β·P[i, j])",
           ("beta",), _is, Needs(log_norm=True), grid={"beta": SCALED}, log_domain=True),
    Method("dis", "Dynamic Inverted Softmax: IS only when the raw top-1 is a bank hub (Bogolin et al. CVPR 2022)",
           "Bogolin et al., CVPR 2022, Sec. 3.4: IS on the rows whose raw top-1 is in the activation set A "
           "(items in the top-k of some bank query), raw scores elsewhere",
           ("beta", "k"), _dis, Needs(log_norm=True, neighbors=True), grid={"beta": SCALED, "k": (1, 2, 5)},
           log_domain=True),
    Method("csls", "Cross-domain Similarity Local Scaling: 2·S − r_q − r_j, mean of top-K (Conneau et al. ICLR 2018)",
           "Conneau et al., ICLR 2018: 2·S[q, j] − r_q − r_j, r = mean of the K largest similarities",
           ("topk_mean",), _csls, Needs(topk_mean=True), defaults={"topk_mean": 10}, grid={"topk_mean": (5, 10, 20)},
           within_gallery=("topk_mean",)),
    Method("nnn", "Nearest Neighbor Normalization: S − α·mean top-k bank scores (Chowdhury et al. EMNLP 2024)",
           "Chowdhury et al., EMNLP 2024: S[q, j] − α·b_j, b_j = mean of the k largest P[:, j]",
           ("topk_mean", "alpha"), _nnn, Needs(topk_mean=True), defaults={"topk_mean": 128},
           grid={"topk_mean": (16, 64, 128), "alpha": (0.5, 0.75, 1.0)}),
    Method("gc", "Globally-Corrected: S − rank of S among the item's bank scores (Dinu et al. ICLR-W 2015)",
           "Dinu et al., ICLR workshop 2015: −(Rank(S[q, j], P[:, j]) − S[q, j])", (),
           lambda probe, p: Normaliser(sorted_bank=probe.sorted_bank()), Needs(sorted_bank=True), tuned=False),
    Method("dual-is", "Dual Inverted Softmax with query and gallery banks (DBNorm, Wang et al. EMNLP 2023)",
           "Wang et al., EMNLP 2023 (DBNorm): (β₁+β₂)·S − LSE_i(β₁·P[i, j]) − LSE_h(β₂·H[h, j])",
           ("beta", "gallery_beta"), _dual_is, Needs(log_norm=True, gallery_bank=True),
           grid={"beta": SCALED, "gallery_beta": SCALED}, log_domain=True),
    Method("dual-dis", "Dual IS only when the raw top-1 is a hub of either bank (DBNorm, Wang et al. EMNLP 2023)",
           "Wang et al., EMNLP 2023 (DBNorm): dual IS on the rows whose raw top-1 is in A_q ∪ A_g",
           ("beta", "gallery_beta", "k"), _dual_dis, Needs(log_norm=True, neighbors=True, gallery_bank=True),
           grid={"beta": SCALED, "gallery_beta": SCALED, "k": (1, 2, 5)}, log_domain=True),
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
    """One line per method: `name: help`."""
    return "\n\n".join(f"{m.name}: {m.help}" for m in METHODS.values())


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


def tuned_methods(requested: list[str] | None, has_gallery_bank: bool) -> list[Method]:
    """The methods tune tries: those named (checked), or the default ones (the dual ones only with
    a gallery bank)."""
    if requested is None:
        return [m for m in METHODS.values() if m.tuned and (has_gallery_bank or not m.dual)]
    if not requested:
        raise UsageError(f"{param('methods')}: name at least one method")
    chosen = []
    for name in requested:
        method = METHODS.get(name)
        if method is None:
            raise UsageError(f"{param('methods')} {name!r}: choose from {', '.join(names(include_baseline=False))}")
        if method.dual and not has_gallery_bank:
            raise UsageError(f"{param('methods')} {name}: needs a gallery bank "
                             f"({param('gallery_bank')} or {param('gallery_bank_sims')})")
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

    @classmethod
    def of(cls, settings_: list[tuple[Method, dict]]) -> ProbeRequest:
        betas = sorted({v["beta"] for _, v in settings_ if "beta" in v}) or [DEFAULT_BETA]
        gallery = sorted({v["gallery_beta"] for _, v in settings_ if "gallery_beta" in v}) or [DEFAULT_GALLERY_BETA]
        kmax = max([v["k"] for _, v in settings_ if "k" in v] or [1])
        ks = tuple(sorted({v["topk_mean"] for _, v in settings_ if "topk_mean" in v}))
        return cls(betas, gallery, kmax, ks, any(m.needs.sorted_bank for m, _ in settings_),
                   any(m.dual for m, _ in settings_))


def label(method: Method, values: Mapping) -> str:
    """A setting as people read it: `dis β=20 k=1`."""
    symbols = {"beta": "β", "k": "k", "gallery_beta": "β₂", "topk_mean": "K", "alpha": "α"}
    parts = ["raw" if method.baseline else method.name]
    parts += [f"{symbols.get(name, name)}={values[name]:g}" for name in PARAMETERS if name in values]
    return " ".join(parts)
