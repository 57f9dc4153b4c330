"""The base of every method: `Parameter`, `Needs` and `Method`, and the parameters methods share.

A `Method` says what it computes (its help line and the formula's source), which parameters it
takes (each a `Parameter`: kind, default, bounds, help and the symbol people write), which probe
statistics it needs, and how its `Normaliser` (core/normalisers.py: η = scale·S − offset[j] − r_q
with a gate) is built from a probe. Each method is one module of this package (a plug-in, one
module of another package, registered under the entry point group `qbnorm.methods`); the package
(`qbnorm_cli.methods`) collects them into the registry.

Formulas are written with P[i, j] the bank × gallery scores, H[h, j] the gallery-bank × gallery
scores, PB[i, h] the bank × gallery-bank scores and S[q, j] the query × gallery scores, in log form
(which ranks exactly as the exponential forms).
"""

from __future__ import annotations

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


DEFAULT_BETA = 20.0          # for cosine similarities (QB-Norm's setting)
DEFAULT_GALLERY_BETA = 1.0   # a gentle mean-score correction from the gallery bank
MAX_SCALE = 1e12  # β, β₂: far beyond any score scale's (tune's grids reach 20/σ), so β·S stays finite
MAX_WEIGHT = 1e6  # α, λ: weights of offsets on the scores' scale


@dataclass(frozen=True)
class Parameter:
    """A parameter, declared once: the library's keyword (the CLI's flag is --name, dashes for
    underscores, unless `flag` says otherwise), its kind and finite range (checked by `check`,
    shown by `range_text`), its default, its help, the symbol people write, and the values `tune`
    tries. The commands' options (cli/options.py), the library's keyword checks, the params file
    and the figures' labels all come from it."""

    name: str
    kind: type
    help: str
    default: float | int | None = None  # None: from the probe (its only β), or required
    minimum: float | None = None         # values must be ≥ this (> 0 when exclusive)
    exclusive: bool = False
    maximum: float | None = None         # at most this (whole numbers: WHOLE_MAX, what a file can record)
    symbol: str = ""                     # how people write it (tables, figure labels); the name when empty
    choices: tuple[str, ...] = ()        # a word (kind str): one of these
    flag: str = ""                       # the CLI's option when not --name (a Python keyword: lam → --lambda)
    metavar: str = ""                    # how the option's value is shown in help
    grid: tuple = ()                     # what tune tries for a method whose grid names it SCALED
    scaled: bool = False                 # a score scale: the grid follows the scores (core.scale.beta_grid)
    many: str = ""                       # the keyword for several values (probe and tune: betas=[…])
    unset: str = ""                      # what a missing value means when there is no default
    bank: str = ""                       # a scale: whose scores it scales ("": the bank's, "gallery_": …)
    probed: str = ""                     # what probe precomputes for it (probe's option; repeatable with `many`)
    probe_default: float | None = None   # probe's value when none is given (None: the default, or each method's)
    recorded: str = ""                   # the key of probe's values in a probe file's params (the name when empty)
    picks: tuple[str, ...] = ()          # the probe records whose rows its values pick

    @property
    def upper(self) -> float | int | None:
        return WHOLE_MAX if self.maximum is None and self.kind is int else self.maximum

    @property
    def range_text(self) -> str:
        """'> 0 and ≤ 1e+12', '≥ 1 and ≤ 2147483647', '≥ -1e+06 and ≤ 1e+06'; a word's choices: 'gauss|empiric'."""
        if self.choices:
            return "|".join(self.choices)
        parts = [f"{'>' if self.exclusive else '≥'} {self.minimum:g}"] if self.minimum is not None else []
        parts += [f"≤ {self.upper:g}"] if self.upper is not None else []
        return " and ".join(parts)

    @property
    def shown(self) -> str:
        return self.symbol or self.name

    @property
    def shown_value(self) -> str:
        """How the option's value is shown in help: the metavar, or a word's choices."""
        return self.metavar or "|".join(self.choices)

    @property
    def params_key(self) -> str:
        """The key of probe's values for it in a probe file's params."""
        return self.recorded or self.name

    @property
    def option(self) -> str:
        """The CLI's spelling: --name (dashes for underscores), or `flag`."""
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def option_help(self) -> str:
        """The option's help: what it is, its range and its default."""
        default = self.unset if self.default is None else str(self.default) if self.choices else f"{self.default:g}"
        shown = [self.range_text] if self.kind is float else []  # a whole number's bound is what files hold
        shown += [f"default: {default}" if self.default is None else f"default {default}"] if default else []
        first = self.help[0].upper() if self.help[0].isascii() else self.help[0]  # β₂ stays β₂
        return f"{first}{self.help[1:]} ({'; '.join(shown)})."

    @property
    def tried_help(self) -> str:
        """tune's option: the values to try instead of the grid."""
        return f"{self.shown} values to try instead of the grid, which follows the score scale (repeatable; " \
               f"{self.range_text})."

    def probed_help(self, defaults: str) -> str:
        """probe's option: what it precomputes (`defaults`: when none is given)."""
        repeatable = "repeatable; " if self.many else ""
        shown = f"{self.range_text}; " if self.kind is float else ""
        return f"{self.probed[0].upper() if self.probed[0].isascii() else self.probed[0]}{self.probed[1:]} " \
               f"({repeatable}{shown}default {defaults})."

    def check(self, value):
        """The value as `kind`, or UsageError naming the parameter and its range."""
        if self.choices:
            if value not in self.choices:
                raise UsageError(f"{param(self.name)} {value!r}: choose one of {', '.join(self.choices)}")
            return str(value)
        shown = str(value) if len(str(value)) <= 24 else f"{str(value)[:12]}…({len(str(value))} digits)"
        try:
            number = self.kind(value)
        except OverflowError:  # an integer of 400 digits as a float, an infinite float as an int
            number = math.inf
        except (TypeError, ValueError):
            raise UsageError(f"{param(self.name)} {value!r}: expected a number") from None
        finite = not isinstance(number, float) or math.isfinite(number)  # a whole number is never too large for int
        if self.kind is int and finite and number != value:
            raise UsageError(f"{param(self.name)} {shown}: expected a whole number")
        low = self.minimum is not None and (number <= self.minimum if self.exclusive else number < self.minimum)
        high = self.upper is not None and number > self.upper
        if self.kind is float and (low or high or not finite):
            raise UsageError(f"{param(self.name)} {shown}: must be a finite number {self.range_text}")
        if low:
            raise UsageError(f"{param(self.name)} {shown}: must be at least {self.minimum:g}")
        if high or not finite:
            raise UsageError(f"{param(self.name)} {shown}: must be at most {self.upper}")
        return number


# The parameters several methods (and plug-ins) take; a method module declares its own parameters
# (Method.declares), and the registry (qbnorm_cli.methods) adds them here as it collects the methods.
PARAMETERS: dict[str, Parameter] = {p.name: p for p in (
    Parameter("beta", float, "inverse temperature β of the inverted softmax, β₁ of the dual methods",
              minimum=0, exclusive=True, maximum=MAX_SCALE, symbol="β", unset="the probe's", grid=BETA_GRID,
              scaled=True, many="betas", probed="inverted-softmax temperature(s) to precompute, the default for "
              "cosine scores", probe_default=DEFAULT_BETA, recorded="betas", picks=("/log_norm",)),
    Parameter("k", int, "activation set: items in the top-k of a bank query", default=1, minimum=1,
              probed="top-k of each bank query that forms the DIS activation set"),
    Parameter("gallery_beta", float, "β₂ of the gallery bank, for the dual methods", minimum=0, exclusive=True,
              maximum=MAX_SCALE, symbol="β₂", unset="the probe's", grid=GALLERY_BETA_GRID, scaled=True,
              many="gallery_betas", bank="gallery_", probed="β₂ value(s) for the gallery bank",
              probe_default=DEFAULT_GALLERY_BETA, recorded="gallery_betas", picks=("/gallery_log_norm",)),
    Parameter("topk_mean", int, "K of the mean-of-top-K bank scores", minimum=1, symbol="K", metavar="K",
              unset="the method's", many="topk_means", probed="K for mean-of-top-K statistics",
              picks=("/topk_mean", "/topk_kth", "/topk_distance", "/centroid_distance")),
    Parameter("alpha", float, "weight α of the gallery offset", default=0.75, minimum=-MAX_WEIGHT,
              maximum=MAX_WEIGHT, symbol="α"),
)}
SHARED = tuple(PARAMETERS)  # the names of those several methods take


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
    column_std: bool = False        # std_i P[i, j]
    centroid: bool = False          # ‖g_j − centroid of its K nearest bank queries‖² (bank and gallery embeddings)
    gallery_moments: bool = False   # the gallery's mean vector and second-moment matrix (gallery embeddings)


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
    default_method: bool = False  # what normalise, export and tune use when no method is named
    cost: str = ONE_PASS      # what probe and normalise pay for it
    needs_of: Callable[[Mapping], Needs] | None = None  # needs that depend on parameter values
    declares: tuple[Parameter, ...] = ()  # the parameters it introduces (named in `parameters` too)

    def needs_for(self, values: Mapping) -> Needs:
        """What the probe must hold for these parameter values."""
        return self.needs if self.needs_of is None else self.needs_of(values)

    def default(self, name: str):
        return self.defaults.get(name, PARAMETERS[name].default)

    @property
    def dual(self) -> bool:
        """Whether it needs a gallery bank (H, or the bank × gallery-bank scores PB)."""
        return self.needs.gallery_bank or self.needs.dual_sinkhorn

KMAX_MIN = 10                # probe keeps at least this many top items per bank row


def cosine_only(probe, name: str) -> None:
    """Distances d = √(2 − 2s) need cosine similarities: refuse other scores in one line."""
    if probe.attrs.get("similarity") == "cosine" or (probe.attrs.get("score_scale") == "cosine" and \
            probe.attrs.get("similarity") == "precomputed"):
        return
    raise UsageError(f"{param('method')} {name}: its distances d = √(2 − 2s) need cosine similarities of "
                     f"L2-normalised vectors, but {probe.label} holds {probe.attrs.get('similarity')} scores "
                     f"({probe.attrs.get('score_scale', 'of unknown scale')}); probe with {param('similarity')} cosine")
