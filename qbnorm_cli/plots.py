"""Figures of qbnorm's results: hubness (k-occurrence distributions), Recall@K curves, tuning.

Each `*_figure` returns a matplotlib `Figure` built from the same data the command prints with
`--json` (`*_data`), so a figure can be checked against its numbers. matplotlib is the optional
extra `qbnorm[plot]`, imported only here and only when a figure is made; figures are made with
`matplotlib.figure.Figure` directly (no pyplot, no backend switch, no rcParams changed), saved
through the Agg renderer for PNG and matplotlib's own PDF and SVG writers.

Every input keeps one colour, line style and marker in every figure (`style_of`): an input named
after a method (its file's stem: raw, dis, csls, dis_b100 …) takes that method's slot of PALETTE in
registry order, raw the baseline's; other names take the slots left, in order. The palette is
Okabe & Ito's colour-blind-safe set, extended; line styles and markers tell the lines apart in
grey print too. Symbols are matplotlib mathtext ($N_{10}$).
"""

from __future__ import annotations

import re
from pathlib import Path

from qbnorm_cli import methods as registry
from qbnorm_cli.core.metrics import LOWER_IS_BETTER
from qbnorm_cli.errors import RuntimeFailure, UsageError, install_hint, param
from qbnorm_cli.io.atomic import check_target, write_with
from qbnorm_cli.version import VERSION

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
# One colour per method in registry order (the baseline first, black), then spares for other names:
# Okabe & Ito, "Color universal design" (2008), extended with Tol's muted set.
PALETTE = ("#000000", "#56B4E9", "#0072B2", "#E69F00", "#009E73", "#999999", "#CC79A7", "#882255", "#D55E00",
           "#332288", "#44AA99", "#8C510A", "#DDCC77", "#117733", "#AA4499")
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (3, 1, 1, 1)), (0, (1, 1)))
MARKERS = ("o", "s", "^", "D", "v", "x", "P", "*", "<", ">", "h")
BASELINE_NAMES = ("raw", "baseline")  # what people call the unnormalised scores' file
DPI = 150
MAX_SERIES = 6  # lines per tuning panel; beyond, the best over the further parameters


def _symbol(name: str) -> str:
    """How people write a parameter: its registry symbol (anything else goes by its name)."""
    parameter = registry.PARAMETERS.get(name)
    return parameter.shown if parameter is not None else name


def _combinations(settings: list[dict], names: list[str]) -> int:
    return len({tuple(s.get(n) for n in names) for s in settings})


def _figure_class(what: str):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeFailure(f"{what} needs matplotlib: {install_hint('plot')}") from None
    return Figure


def check_plot_target(path, *, force: bool = False, inputs=(), what: str = "a plot") -> str:
    """Refuse early (before any work) a figure path qbnorm cannot write: an unknown suffix, an
    existing file without `force`, a missing directory, or matplotlib not installed. Returns the format."""
    target = Path(path)
    fmt = FORMATS.get(target.suffix.lower())
    if fmt is None:
        raise UsageError(f"{param('plot')} {path}: name the figure .png, .svg or .pdf")
    check_target(target, force, _records(inputs))
    _figure_class(what)
    return fmt


def _records(inputs) -> list:
    """Inputs as check_target takes them; a `PATH[::/dataset]` string stands for its file."""
    return [{"path": str(i).split("::")[0]} if isinstance(i, (str, Path)) else i for i in inputs]


def save_figure(figure, path, *, force: bool = False, inputs=()) -> None:
    """Write `figure` to `path` (.png, .svg or .pdf) atomically: a temporary file beside it, renamed
    into place when complete; never over an existing file without `force`."""
    fmt = check_plot_target(path, force=force, inputs=inputs)
    write_with(path, lambda tmp: figure.savefig(tmp, format=fmt, dpi=DPI, bbox_inches="tight",
                                                metadata=_metadata(fmt)), force=force, inputs=_records(inputs))


def _metadata(fmt: str) -> dict:
    # PNG, SVG and PDF writers all take a creator; dates are left out where the writer allows it,
    # so that the same figure gives the same file.
    meta = {"Software" if fmt == "png" else "Creator": f"qbnorm {VERSION}"}
    if fmt == "svg":
        meta["Date"] = None
    if fmt == "pdf":
        meta["CreationDate"] = None
    return meta


def _slot_of(name: str) -> int | None:
    """The palette slot of a method's name (or a name that starts with one: dis_b100, dis20), else None."""
    methods = list(registry.METHODS)
    word = name.lower()
    if word in BASELINE_NAMES or word == registry.BASELINE.name:
        return methods.index(registry.BASELINE.name)
    matches = [m for m in methods if word == m or re.match(re.escape(m) + r"(?![a-z-])", word)]
    return methods.index(max(matches, key=len)) if matches else None


def slots(names: list[str]) -> dict[str, int]:
    """Each name's palette slot: its method's, else the first slot no name here uses, in order."""
    fixed = {name: _slot_of(name) for name in names}
    taken = {slot for slot in fixed.values() if slot is not None}
    spare = (i for i in range(10**6) if i not in taken and i >= len(registry.METHODS))
    out = {}
    for name in dict.fromkeys(names):
        out[name] = fixed[name] if fixed[name] is not None else next(spare)
    return out


def style_of(slot: int) -> dict:
    """The colour, line style and marker of a palette slot: the same in every figure."""
    return {"color": PALETTE[slot % len(PALETTE)], "linestyle": LINESTYLES[slot % len(LINESTYLES)],
            "marker": MARKERS[slot % len(MARKERS)]}


def _style(i: int) -> dict:
    """Line style and marker of the i-th series of one input (the tuning panels' parameter values)."""
    return {"linestyle": LINESTYLES[i % len(LINESTYLES)], "marker": MARKERS[i % len(MARKERS)]}


def _name(result: dict, i: int) -> str:
    if result.get("name"):
        return str(result["name"])
    label = result.get("input")
    return Path(str(label).split("::")[0]).stem if label else f"input {i + 1}"


def _names(results: list[dict], names) -> list[str]:
    """Each input's name: as given, else its `name` or its file's stem; repeats numbered."""
    given = list(names) if names is not None else [_name(r, i) for i, r in enumerate(results)]
    if len(given) != len(results):
        raise UsageError(f"{param('names')}: {len(given)} names for {len(results)} inputs")
    out = []
    for i, name in enumerate(given):
        out.append(f"{name} #{given[:i].count(name) + 1}" if given.count(name) > 1 else str(name))
    return out


# --- hubness -------------------------------------------------------------------------------------

def _ccdf(nk: list[int], items: list[int], n_items: int) -> list[float]:
    """P(N_k ≥ v) over the items, at each value v of `nk` (ascending, with the items taking it)."""
    out, above = [], sum(items)
    for count in items:
        out.append(above / n_items)
        above -= count
    return out


def hubness_data(results, names=None) -> dict:
    """The k-occurrence distributions of `hubness` results (one dict or a list, or the `inputs` of a
    hubness document): per input and k, each N_k value ≥ 1 with the number of items taking it (a
    log axis has no 0: the items with N_k = 0, the anti-hubs, are counted apart), the share of
    items with N_k at least that value (`share_at_least`, the complementary CDF the figure draws),
    the mean μ = k·Q/G, the hub threshold 2μ and the skewness."""
    results = [results] if isinstance(results, dict) else list(results)
    inputs = []
    for name, res in zip(_names(results, names), results, strict=True):
        for row in res["by_k"]:
            nk, items = row["distribution"]["nk"], row["distribution"]["items"]
            zero = items[0] if nk and nk[0] == 0 else 0
            pairs = [(v, c) for v, c in zip(nk, items, strict=True) if v > 0]
            values, counts = [v for v, _ in pairs], [c for _, c in pairs]
            n_items = sum(counts) + zero
            inputs.append({"name": name, "k": row["k"], "skewness": row["skewness"],
                           "nk": values, "items": counts, "zero_items": zero,
                           "share_at_least": _ccdf(values, counts, n_items),
                           "mean_nk": row["mean_nk"], "hub_threshold": row["hub_threshold"],
                           "antihub_rate_pct": row["antihub_rate_pct"], "gallery_rows": res.get("gallery_rows")})
    return {"x": "N_k (queries that retrieve the item in their top k)", "y": "share of items with N_k ≥ x",
            "scale": "log-log", "series": inputs}


def hubness_figure(results, *, names=None, title: str | None = None):
    """The complementary CDF of N_k of each input on log-log axes, one panel per k: the share of
    items retrieved at least x times (Radovanović et al. 2010 plot the distribution itself; its
    CCDF keeps every item and no binning). A heavier, longer tail = more hubness. Dotted: the mean
    μ = k·Q/G and the hub threshold 2μ. The legend names each input with its skewness."""
    Figure = _figure_class("hubness_figure")
    data = hubness_data(results, names)
    ks = sorted({s["k"] for s in data["series"]})
    names = list(dict.fromkeys(s["name"] for s in data["series"]))
    slot = slots(names)
    fig = Figure(figsize=(4.6 * len(ks) + 0.4, 3.8), layout="constrained")
    axes = fig.subplots(1, len(ks), squeeze=False)[0]
    for ax, k in zip(axes, ks, strict=True):
        nk_k = f"N_{{{k}}}"
        panel = [s for name in names for s in data["series"] if s["k"] == k and s["name"] == name]
        for s in panel:
            style = style_of(slot[s["name"]])
            ax.step(s["nk"], s["share_at_least"], where="pre", linewidth=1.5, color=style["color"],
                    linestyle=style["linestyle"], label=f"{s['name']}  ${s['skewness']:.2f}$")
        if panel:
            mean, threshold = panel[0]["mean_nk"], panel[0]["hub_threshold"]
            for x, text in ((mean, r"$\mu$"), (threshold, r"$2\mu$")):
                ax.axvline(x, color="0.55", linestyle=":", linewidth=0.9, zorder=0)
                ax.annotate(text, (x, 1.0), xytext=(2, -2), textcoords="offset points", ha="left", va="top",
                            fontsize="small", color="0.35")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter("{x:g}")
        ax.set_xlabel(f"${nk_k}$: queries with the item in their top {k}")
        ax.set_ylabel(f"share of items with ${nk_k} \\geq x$")
        if len(ks) > 1:
            ax.set_title(f"$k = {k}$", fontsize="medium")
        ax.grid(True, which="major", linestyle=":", linewidth=0.5, color="0.8")
        ax.legend(title=f"skewness of ${nk_k}$", fontsize="small", title_fontsize="small", loc="lower left",
                  frameon=False)
    if title:
        fig.suptitle(title)
    return fig


# --- recall ----------------------------------------------------------------------------------------

RECALL_MARGIN = 0.08  # of the shown spread, at least RECALL_MIN_MARGIN points, above and below the curves
RECALL_MIN_MARGIN = 1.0


def recall_data(results, names=None) -> dict:
    """Recall@K curves of `evaluate` results (one dict or a list, or an evaluation document's
    `inputs`): K and R@K per input, as far as each input knows (None beyond)."""
    results = [results] if isinstance(results, dict) else list(results)
    series = []
    for name, res in zip(_names(results, names), results, strict=True):
        curve = res["recall_curve"]
        known = [(k, v) for k, v in zip(curve["K"], curve["R@K"], strict=True) if v is not None]
        series.append({"name": name, "K": [k for k, _ in known], "R@K": [v for _, v in known],
                       "listed": res.get("listed")})
    direction = (results[0].get("protocol") or {}).get("direction") if results else None
    return {"x": "K", "y": "R@K (%)", "scale": "log-x", "direction": direction, "series": series}


def recall_limits(series: list[dict]) -> tuple[float, float]:
    """The R@K axis: the curves' range with a margin (RECALL_MARGIN of it, at least
    RECALL_MIN_MARGIN points), within 0–100: a 6-point spread fills the axis, not a 0–100 strip."""
    values = [v for s in series for v in s["R@K"]]
    if not values:
        return 0.0, 100.0
    lo, hi = min(values), max(values)
    pad = max(RECALL_MIN_MARGIN, RECALL_MARGIN * (hi - lo))
    return max(0.0, lo - pad), min(100.0, hi + pad)


def recall_figure(results, *, names=None, title: str | None = None, direction: str | None = None):
    """Recall@K against K (log x) for each input, K = 1 … 100 or as far as the input knows (a
    ranking's top N), the R@K axis scaled to the curves (`recall_limits`); R@1 in the legend. With
    several inputs a lower panel shows each one's R@K minus the first's (in points), where a few
    points' difference is visible."""
    Figure = _figure_class("recall_figure")
    data = recall_data(results, names)
    direction = direction or data["direction"]
    series = data["series"]
    slot = slots([s["name"] for s in series])
    base = series[0] if len(series) > 1 and series[0]["R@K"] else None
    fig = Figure(figsize=(5.0, 5.0 if base else 3.8), layout="constrained")
    if base:
        ax, delta = fig.subplots(2, 1, sharex=True, height_ratios=(2.2, 1))
    else:
        ax, delta = fig.subplots(), None
    for s in series:
        label = s["name"] + (f" (top {s['listed']})" if s["listed"] else "")
        if s["R@K"]:
            label += f"  R@1 {s['R@K'][0]:.1f}"
        style = style_of(slot[s["name"]])
        ax.plot(s["K"], s["R@K"], markersize=3.5, markevery=_marks(len(s["K"])), linewidth=1.4, label=label, **style)
        if delta is not None:
            n = min(len(s["K"]), len(base["K"]))
            delta.plot(s["K"][:n], [a - b for a, b in zip(s["R@K"][:n], base["R@K"][:n], strict=True)],
                       markersize=3.5, markevery=_marks(n), linewidth=1.4, **style)
    ax.set_xscale("log")
    ax.set_ylabel("Recall@$K$ (%)" + (f", {direction}" if direction else ""))
    ax.set_ylim(*recall_limits(series))
    ax.legend(fontsize="small", loc="lower right", frameon=False)
    for axis in (ax, delta) if delta is not None else (ax,):
        axis.grid(True, which="major", linestyle=":", linewidth=0.5, color="0.8")
        axis.set_xticks([k for k in (1, 2, 5, 10, 20, 50, 100) if k <= max(len(s["K"]) for s in series)])
        axis.xaxis.set_major_formatter("{x:g}")
        axis.xaxis.set_minor_formatter("")
    (delta if delta is not None else ax).set_xlabel("$K$")
    if delta is not None:
        delta.set_ylabel(f"R@$K$ − {base['name']} (points)")
    if title:
        fig.suptitle(title)
    return fig


def _marks(n: int):
    """Markers at K = 1, 2, 5, 10, 20, 50, 100 (indices of a curve starting at K = 1)."""
    return [k - 1 for k in (1, 2, 5, 10, 20, 50, 100) if k <= n]


# --- tuning -----------------------------------------------------------------------------------------

def _setting_dict(row: dict) -> dict:
    setting = row["setting"]
    if not isinstance(setting, dict):  # the library's tune(): a Setting
        setting = setting.as_dict()
    return setting


def tuning_data(result: dict) -> dict:
    """The validation metric of every setting of a `tune` result (the library's dict, or the CLI's
    --json document) per method: x = β where the method has it (else its first tuned
    parameter), one series per value of its other tuned parameters; the chosen setting."""
    metric = result["metric"]
    if "ranked" in result:
        rows = [{**_setting_dict(r), "metrics": r["metrics"]} for r in result["ranked"]]
        best = {**_setting_dict(result["best"]), "metrics": result["best"]["metrics"]}
    else:
        rows, best = result["settings"], result["best"]
    raw = result["raw"][metric]
    methods: dict[str, list[dict]] = {}
    for row in rows:
        if not registry.get(row["method"]).baseline:
            methods.setdefault(row["method"], []).append(row)
    panels = []
    for method, settings in methods.items():
        names = [n for n in registry.PARAMETERS if any(s.get(n) is not None for s in settings)]
        varying = [n for n in names if len({s.get(n) for s in settings}) > 1]
        x = "beta" if "beta" in varying else (varying[0] if varying else (names[0] if names else None))
        others = [n for n in varying if n != x]
        if len(others) > 1 and _combinations(settings, others) > MAX_SERIES:
            best_over, others = others[1:], others[:1]  # one line per value of the first; the best of the rest
        else:
            best_over = []
        sign = -1 if metric in LOWER_IS_BETTER else 1
        groups: dict[tuple, dict] = {}
        for s in settings:
            line = groups.setdefault(tuple(s.get(n) for n in others), {})
            value = s["metrics"][metric]
            if s.get(x) not in line or sign * value > sign * line[s.get(x)]:
                line[s.get(x)] = value
        series = []
        for key, line in sorted(groups.items(), key=lambda item: [(v is None, v or 0) for v in item[0]]):
            xs = sorted(line, key=lambda v: (v is None, v or 0))
            label = " ".join(f"{_symbol(n)}={v:g}" for n, v in zip(others, key, strict=True)) or method
            if best_over:
                label += " (best " + ", ".join(_symbol(n) for n in best_over) + ")"
            series.append({"label": label, "x": xs, "y": [line[v] for v in xs]})
        top = max(settings, key=lambda s: sign * s["metrics"][metric])
        panels.append({"method": method, "x": x, "series": series,
                       "best": {"x": top.get(x), "y": top["metrics"][metric]}})
    chosen = {"method": best["method"], **{n: best.get(n) for n in registry.PARAMETERS},
              "value": best["metrics"][metric]}
    return {"metric": metric, "raw": raw, "panels": panels, "chosen": chosen}


def tuning_figure(result: dict, *, title: str | None = None):
    """The validation metric against β (or the method's own parameter: K, α) for each method, one
    panel per method in its colour (`style_of`), one line per value of its other parameters (k,
    β₂, …; a panel legend when there are several), the raw baseline dashed, each method's best
    point circled and the chosen setting starred (one legend for the three, below the panels)."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    Figure = _figure_class("tuning_figure")
    data = tuning_data(result)
    panels = data["panels"]
    cols = min(3, max(1, len(panels)))
    rows = -(-len(panels) // cols) if panels else 1
    fig = Figure(figsize=(3.6 * cols, 2.7 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, sharey=True, squeeze=False).ravel()
    metric = data["metric"]
    slot = slots([registry.BASELINE.name] + [panel["method"] for panel in panels])
    raw_style = {"color": style_of(slot[registry.BASELINE.name])["color"], "linestyle": "--", "linewidth": 1.0}
    best_style = {"marker": "o", "markersize": 10, "markerfacecolor": (1, 1, 1, 0), "markeredgecolor": "black",
                  "markeredgewidth": 1.3, "linestyle": ""}
    chosen_style = {"marker": "*", "markersize": 13, "color": "black", "linestyle": ""}
    for ax, panel in zip(axes, panels, strict=False):
        colour = style_of(slot[panel["method"]])["color"]  # the method's colour; its settings by line style
        for i, s in enumerate(panel["series"]):
            xs = [v if v is not None else 0 for v in s["x"]]
            ax.plot(xs, s["y"], markersize=3.5, linewidth=1.2, label=s["label"], color=colour, **_style(i))
        ax.axhline(data["raw"], **raw_style)
        best = panel["best"]
        ax.plot([best["x"] or 0], [best["y"]], **best_style)
        if panel["method"] == data["chosen"]["method"]:
            ax.plot([best["x"] or 0], [best["y"]], **chosen_style)
        scaled = panel["x"] in registry.PARAMETERS and registry.PARAMETERS[panel["x"]].scaled  # β, β₂: log axis
        if scaled and all((v or 0) > 0 for s in panel["series"] for v in s["x"]):
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter("{x:g}")
        elif all(isinstance(v, int) for s in panel["series"] for v in s["x"]):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # K, k: no tick at 7.5
        symbol = _symbol(panel["x"]) if panel["x"] else ""
        ax.set_xlabel(f"${symbol}$" if len(symbol) == 1 else symbol)  # mathtext italics for one letter
        ax.set_title(panel["method"], color=colour, fontweight="bold", fontsize="medium")
        ax.grid(True, linestyle=":", linewidth=0.5, color="0.8")
        if len(panel["series"]) > 1:
            ax.legend(fontsize="x-small", frameon=False)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax in axes[::cols]:
        ax.set_ylabel(f"validation {metric}")
    chosen = data["chosen"]
    setting = " ".join([chosen["method"]] + [f"{_symbol(n)}={chosen[n]:g}" for n in registry.PARAMETERS
                                             if chosen.get(n) is not None])
    keys = [Line2D([], [], **raw_style), Line2D([], [], **best_style), Line2D([], [], **chosen_style)]
    fig.legend(keys, [f"raw ({data['raw']:.2f})", "best of the method", f"chosen: {setting} ({chosen['value']:.2f})"],
               loc="outside lower center", ncols=3, fontsize="small", frameon=False)
    if title:
        fig.suptitle(title)
    return fig
