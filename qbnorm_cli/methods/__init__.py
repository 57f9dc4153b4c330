"""The registry of methods: each built-in method is one module of this package, and methods of
other packages plug in through the entry point group `qbnorm.methods` (docs/methods.md).

Every module holds one `METHOD` (methods.base.Method): its formula and source, its parameters
(those only it takes declared there, `Method.declares`, and added to PARAMETERS here), the probe
statistics it reads, how it builds its normaliser, and what it costs. `probe` computes
what the chosen methods need, `normalise` builds from it, `tune` walks the grid of every method's
parameters, and the CLI's checks and help come from the same entries. A method's name is written
in its own module only.

A plug-in's entry point names a `Method` or a module holding `METHOD`. One that fails to load, or
whose method is not valid (a name already taken, an unknown parameter or one of its own, a
default its parameter refuses), is left out: `PLUGIN_PROBLEMS` says why in one line naming its package, the library
warns once when the registry loads, and the CLI reports it with each command's warnings.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import itertools
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import numpy as np

from qbnorm_cli.core import scale
from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.errors import QbnormWarning, UsageError, param
from qbnorm_cli.methods.base import (
    BETA_GRID,
    DEFAULT_BETA,
    DEFAULT_GALLERY_BETA,
    GALLERY_BETA_GRID,
    KMAX_MIN,
    ONE_PASS,
    PARAMETERS,
    SCALED,
    WHOLE_MAX,
    Method,
    Needs,
    Parameter,
)

__all__ = [
    "BASELINE", "BETA_GRID", "BUILT_IN", "BUILT_IN_NAMES", "DEFAULT", "DEFAULT_BETA", "DEFAULT_GALLERY_BETA",
    "GALLERY_BETA_GRID", "KMAX_MIN", "METHODS", "ONE_PASS", "PARAMETERS", "PLUGIN_GROUP", "PLUGIN_PROBLEMS", "SCALED",
    "WHOLE_MAX", "Method", "Needs", "Parameter", "ProbeRequest", "build", "default_topk_means", "get", "grid",
    "help_text", "label", "method_defaults", "names", "plugins", "probed_default", "problem_with", "scale_warnings",
    "scaled_grids", "settings", "takes_parameters", "tried", "tuned_methods", "unused_gate_warning",
]

PLUGIN_GROUP = "qbnorm.methods"

# The built-in methods in the order commands list them (and tune tries them)
BUILT_IN = ("raw", "inverted_softmax", "dynamic_inverted_softmax", "cross_domain_local_scaling",
            "nearest_neighbor_normalization", "globally_corrected", "dual_inverted_softmax",
            "dual_dynamic_inverted_softmax", "sinkhorn_normalisation", "dual_bank_sinkhorn",
            "distribution_normalisation", "local_scaling", "non_iterative_contextual_dissimilarity",
            "mutual_proximity", "dissim_local")


def problem_with(method: object, taken: Mapping[str, Method]) -> str | None:
    """Why `method` cannot join a registry holding `taken`, or None when it can."""
    if not isinstance(method, Method):
        return f"{type(method).__name__} is not a qbnorm_cli.methods.base.Method"
    if not isinstance(method.name, str) or not method.name or method.name in taken:
        return f"method name {method.name!r} is {'taken' if method.name in taken else 'not a name'}"
    if method.declares:  # its options and keywords would meet the commands' own: qbnorm's declare them
        return (f"{method.name}: declares parameter {method.declares[0].name!r}; a plug-in takes the registry's "
                f"(known: {', '.join(PARAMETERS)})")
    unknown = [name for name in method.parameters if name not in PARAMETERS]
    if unknown:
        return f"{method.name}: unknown parameter {unknown[0]!r} (known: {', '.join(PARAMETERS)})"
    for name in method.parameters:
        default = method.default(name)
        if default is not None:
            try:
                PARAMETERS[name].check(default)
            except UsageError as exc:
                return f"{method.name}: default {exc}"
    if not callable(method.build):
        return f"{method.name}: build is not callable"
    return None


def plugins(taken: dict[str, Method]) -> list[str]:
    """Add the installed plug-ins' methods to `taken`; one line per plug-in left out."""
    problems = []
    for point in sorted(entry_points(group=PLUGIN_GROUP), key=lambda p: p.name):
        package = f"{point.dist.name} {point.dist.version}" if point.dist is not None else point.value
        try:
            loaded = point.load()
        except Exception as exc:  # whatever a foreign package raises: it must not stop the built-ins
            problems.append(f"plug-in {point.name!r} ({package}) did not load: {type(exc).__name__}: {exc}")
            continue
        method = getattr(loaded, "METHOD", loaded)
        reason = problem_with(method, taken)
        if reason is not None:
            problems.append(f"plug-in {point.name!r} ({package}) left out: {reason}")
            continue
        taken[method.name] = method
    return [" ".join(p.split()) for p in problems]


def _declare(method: Method) -> None:
    """Add the parameters a built-in method declares to PARAMETERS (each name once)."""
    for parameter in method.declares:
        if PARAMETERS.get(parameter.name, parameter) is not parameter or parameter.name not in method.parameters:
            raise TypeError(f"{method.name}: parameter {parameter.name!r} is declared twice, or not taken")
        PARAMETERS[parameter.name] = parameter


def _registry() -> tuple[dict[str, Method], tuple[str, ...], tuple[str, ...]]:
    found: dict[str, Method] = {}
    for module in BUILT_IN:
        method = importlib.import_module(f"{__name__}.{module}").METHOD
        _declare(method)
        found[method.name] = method
    built_in = tuple(found)
    return found, built_in, tuple(plugins(found))


METHODS, BUILT_IN_NAMES, PLUGIN_PROBLEMS = _registry()
for _problem in PLUGIN_PROBLEMS:
    warnings.warn(QbnormWarning(_problem), stacklevel=1)

DEFAULT = next(m for m in METHODS.values() if m.default_method)
BASELINE = next(m for m in METHODS.values() if m.baseline)


def get(name: str | Method) -> Method:
    """The method of this name (or a `Method` itself, checked as a plug-in's is: a method not yet
    packaged can be tried from Python), or UsageError listing them."""
    if isinstance(name, Method):
        reason = problem_with(name, {n: m for n, m in METHODS.items() if m is not name})
        if reason is not None:
            raise UsageError(f"{param('method')}: {reason}")
        return name
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise UsageError(f"{param('method')} {name!r}: choose one of {', '.join(METHODS)}") from None


def names(*, include_baseline: bool = True) -> list[str]:
    return [m.name for m in METHODS.values() if include_baseline or not m.baseline]


def help_text() -> str:
    """One paragraph per method: `name: help. Cost: …`."""
    return "\n\n".join(f"{m.name}: {m.help}. Cost: {m.cost}." for m in METHODS.values())


def method_defaults(name: str) -> tuple:
    """Every method's default of parameter `name` (that has one), sorted."""
    return tuple(sorted({m.default(name) for m in METHODS.values()
                         if name in m.parameters and m.default(name) is not None}))


def default_topk_means() -> tuple[int, ...]:
    """The K of every method's default mean-of-top-K statistic (what probe computes by default)."""
    return tuple(int(v) for v in method_defaults("topk_mean"))


def by_keyword(keyword: str) -> Parameter:
    """The parameter a library keyword of probe stands for (its `many`, else its name)."""
    return next(p for p in PARAMETERS.values() if (p.many or p.name) == keyword)


def picking(record: str) -> Parameter:
    """The parameter whose values pick the rows of a probe record (its K, its β)."""
    return next(p for p in PARAMETERS.values() if record in p.picks)


def checked_values(keyword: str, values) -> list:
    """Each of a probe keyword's values, checked by its parameter's declaration."""
    parameter = by_keyword(keyword)
    return [parameter.check(v) for v in np.atleast_1d(values)]


@dataclass(frozen=True)
class MethodNeeds:
    """What `probe(methods=…)` adds for the named methods (their Needs, at their defaults)."""

    methods: tuple
    topk_means: tuple[int, ...]
    keep_sorted: bool
    column_std: bool
    centroid_ks: tuple[int, ...]
    gallery_moments: bool


def method_needs(names, topk_means) -> MethodNeeds | None:
    """The statistics the named methods need, each at its default parameters and at every given K."""
    if names is None:
        return None
    chosen = [get(name) for name in ([names] if isinstance(names, str) else names)]
    given_ks = checked_values("topk_means", topk_means) if topk_means is not None else []
    settings_ = []
    for method in chosen:
        values = {name: method.default(name) for name in method.parameters}
        if "topk_mean" in method.parameters and given_ks:
            settings_ += [(method, {**values, "topk_mean": v}) for v in given_ks]
        else:
            settings_.append((method, values))
    needs = [(m.needs_for(v), v) for m, v in settings_]
    return MethodNeeds(
        tuple(chosen), tuple(sorted({v["topk_mean"] for n, v in needs if v.get("topk_mean") is not None})),
        any(n.sorted_bank for n, _ in needs), any(n.column_std for n, _ in needs),
        tuple(sorted({v["topk_mean"] for n, v in needs if n.centroid})), any(n.gallery_moments for n, _ in needs))


def probed_default(parameter: Parameter) -> str:
    """What probe computes for a parameter when given none: its probe default, its default, or every
    method's (each K of the mean-of-top-K statistics)."""
    if parameter.probe_default is not None:
        return f"{parameter.probe_default:g}"
    if parameter.default is not None:
        return f"{parameter.default:g}"
    return " and ".join(f"{v:g}" for v in method_defaults(parameter.name))


def scaled_grids(stats) -> dict[str, list[float]]:
    """The grids that follow the score scale (β, β₂), for bank scores of these statistics."""
    return {name: scale.beta_grid(p.grid, stats) for name, p in PARAMETERS.items() if p.scaled}


def tried(given: Mapping[str, list | None]) -> dict[str, list]:
    """tune's values instead of a parameter's grid, given by its plural keyword (betas=[…]), checked."""
    by_many = {p.many: p for p in PARAMETERS.values() if p.many}
    return {by_many[many].name: [by_many[many].check(v) for v in values] for many, values in given.items() if values}


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


def takes_parameters(func):
    """`func(…, *, method, …, **parameters)` takes every parameter of the registry as a keyword-only
    option (left out or None: the method's default), listed after `method` in its signature (help(),
    editors); a keyword that is neither its own nor a parameter is a TypeError, as Python's own."""
    signature = inspect.signature(func)
    own = {name for name, p in signature.parameters.items() if p.kind is not p.VAR_KEYWORD}

    @functools.wraps(func)
    def call(*args, **kwargs):
        unknown = [name for name in kwargs if name not in own and name not in PARAMETERS]
        if unknown:
            raise TypeError(f"{func.__name__}() got an unexpected keyword argument {unknown[0]!r}")
        return func(*args, **kwargs)

    keywords = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                  annotation=f"{p.kind.__name__} | None") for name, p in PARAMETERS.items()]
    parameters = []
    for parameter in signature.parameters.values():  # the method's parameters after `method`
        if parameter.kind is not parameter.VAR_KEYWORD:
            parameters += [parameter, *keywords] if parameter.name == "method" else [parameter]
    call.__signature__ = signature.replace(parameters=parameters)
    return call


def scale_warnings(values: Mapping, probe) -> list[str]:
    """A warning for each scale (β, β₂) of a setting that looks wrong for its bank's scores
    (core.scale.beta_warning; a small β₂ of a gallery bank is a gentle correction, not a mistake)."""
    found = [scale.beta_warning(values[name], scale.ScoreStats.from_attrs(probe.attrs, p.bank),
                                *((name, False) if p.bank else ()))
             for name, p in PARAMETERS.items() if p.scaled and name in values]
    return [w for w in found if w]


def unused_gate_warning(method: Method, values: Mapping, k: int) -> str:
    """Why a gated method's gate is closed on every item: no hub in the activation set."""
    return (f"no gallery item is in the top-{k} of {values.get('min_count', 1)} or more bank queries: "
            f"{method.name} leaves every row raw; lower {param('min_count')}")


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
    column_std: bool = False                                         # MP gauss's σ_j
    centroid_ks: list[int] = field(default_factory=list)             # DSL's centroid distances (one K per probe)
    gallery_moments: bool = False                                    # MP gauss's ḡ and M

    @classmethod
    def of(cls, settings_: list[tuple[Method, dict]]) -> ProbeRequest:
        def betas_of(need: str) -> list[float]:
            return sorted({v["beta"] for m, v in settings_ if getattr(m.needs_for(v), need) and "beta" in v})

        betas = sorted({v["beta"] for _, v in settings_ if "beta" in v}) or [DEFAULT_BETA]
        gallery = sorted({v["gallery_beta"] for _, v in settings_ if "gallery_beta" in v}) or [DEFAULT_GALLERY_BETA]
        kmax = max([v["k"] for _, v in settings_ if "k" in v] or [1])
        ks = tuple(sorted({v["topk_mean"] for _, v in settings_ if "topk_mean" in v}))
        needs = [m.needs_for(v) for m, v in settings_]
        centroid_ks = sorted({v["topk_mean"] for m, v in settings_ if m.needs_for(v).centroid})
        return cls(betas, gallery, kmax, ks, any(n.sorted_bank for n in needs),
                   any(n.gallery_bank for n in needs), betas_of("sinkhorn"), betas_of("dual_sinkhorn"),
                   any(n.column_std for n in needs), centroid_ks, any(n.gallery_moments for n in needs))


def label(method: Method, values: Mapping) -> str:
    """A setting as people read it: `dis β=20 k=1` (a word parameter as itself: `mp empiric`)."""
    parts = ["raw" if method.baseline else method.name]
    parts += [str(values[name]) if PARAMETERS[name].choices else f"{PARAMETERS[name].shown}={values[name]:g}"
              for name in PARAMETERS if name in values]
    return " ".join(parts)
