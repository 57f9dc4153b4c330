"""Figures of qbnorm's results: hubness (k-occurrence distributions), Recall@K curves, tuning.

Each `*_figure` returns a matplotlib `Figure` built from the same data the command prints with
`--json` (`*_data`), so a figure can be checked against its numbers. matplotlib is the optional
extra `qbnorm[plot]`, imported only here and only when a figure is made; figures are made with
`matplotlib.figure.Figure` directly (no pyplot, no backend switch, no rcParams changed), saved
through the Agg renderer for PNG and matplotlib's own PDF and SVG writers. Every series has its own
line style and marker, so the figures read without colour.
"""

from __future__ import annotations

from pathlib import Path

from qbnorm_cli import methods as registry
from qbnorm_cli.core.metrics import LOWER_IS_BETTER
from qbnorm_cli.errors import RuntimeFailure, UsageError, install_hint, param
from qbnorm_cli.io.atomic import check_target, write_with
from qbnorm_cli.version import VERSION

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
MARKERS = ("o", "s", "^", "D", "v", "x", "P", "*")
SYMBOLS = {"beta": "β", "k": "k", "gallery_beta": "β₂", "topk_mean": "K", "alpha": "α", "theta": "θ", "lam": "λ",
           "lambda_": "λ"}  # how people write them; any other registry parameter goes by its name
DPI = 150
MAX_SERIES = 6  # lines per tuning panel; beyond, the best over the further parameters


def _symbol(name: str) -> str:
    return SYMBOLS.get(name, name)


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


def _style(i: int) -> dict:
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


def _title(names: list[str]) -> str:
    return " vs ".join(names) if len(names) <= 4 else f"{', '.join(names[:3])} and {len(names) - 3} more"


# --- hubness -------------------------------------------------------------------------------------

def _log_binned(nk: list[int], items: list[int]) -> tuple[list[float], list[float]]:
    """The mean number of items per N_k value over the bins [1, 2), [2, 4), [4, 8), …, placed at the
    geometric middle of each bin's values: the trend through a noisy histogram on log-log axes."""
    xs, ys = [], []
    lo = 1
    top = max(nk, default=0)
    while lo <= top:
        hi = 2 * lo
        total = sum(c for v, c in zip(nk, items, strict=True) if lo <= v < hi)
        if total:
            xs.append(float((lo * (hi - 1)) ** 0.5))
            ys.append(total / (hi - lo))
        lo = hi
    return xs, ys


def hubness_data(results, names=None) -> dict:
    """The k-occurrence distributions of `hubness` results (one dict or a list, or the `inputs` of a
    hubness document): per input and k, each N_k value ≥ 1 with the number of items taking it
    (a log axis has no 0: the items with N_k = 0, the anti-hubs, are counted apart), the same
    averaged over power-of-2 bins of N_k (`binned`), and the skewness."""
    results = [results] if isinstance(results, dict) else list(results)
    inputs = []
    for name, res in zip(_names(results, names), results, strict=True):
        for row in res["by_k"]:
            nk, items = row["distribution"]["nk"], row["distribution"]["items"]
            zero = items[0] if nk and nk[0] == 0 else 0
            pairs = [(v, c) for v, c in zip(nk, items, strict=True) if v > 0]
            values, counts = [v for v, _ in pairs], [c for _, c in pairs]
            bx, by = _log_binned(values, counts)
            inputs.append({"name": name, "k": row["k"], "skewness": row["skewness"],
                           "nk": values, "items": counts, "zero_items": zero,
                           "binned": {"nk": bx, "items_per_value": by}, "gallery_rows": res.get("gallery_rows")})
    return {"x": "N_k (queries that retrieve the item in their top k)", "y": "number of items",
            "scale": "log-log", "series": inputs}


def hubness_figure(results, *, names=None, title: str | None = None):
    """The k-occurrence distribution of each input on shared log-log axes, one panel per k: N_k on
    x, the number of items with that N_k on y (markers; a long right tail = hubs), a line through
    its power-of-2-bin averages, skewness and the anti-hub count in the legend."""
    Figure = _figure_class("hubness_figure")
    data = hubness_data(results, names)
    ks = sorted({s["k"] for s in data["series"]})
    names = list(dict.fromkeys(s["name"] for s in data["series"]))
    fig = Figure(figsize=(5.6 * len(ks), 4.2), layout="constrained")
    axes = fig.subplots(1, len(ks), sharex=True, sharey=True, squeeze=False)[0]
    for ax, k in zip(axes, ks, strict=True):
        handles, labels = [], []
        for i, name in enumerate(names):
            for s in data["series"]:
                if s["k"] != k or s["name"] != name:
                    continue
                style = _style(i)
                line = ax.plot(s["binned"]["nk"], s["binned"]["items_per_value"], linewidth=1.6,
                               linestyle=style["linestyle"], marker="")[0]
                points = ax.plot(s["nk"], s["items"], linestyle="", marker=style["marker"], markersize=4,
                                 markerfacecolor=(1, 1, 1, 0), color=line.get_color(), alpha=0.8)[0]
                handles.append((line, points))
                labels.append(f"{name}: skewness {s['skewness']:.2f}, N_{k} = 0 for {s['zero_items']}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"N_{k} (queries with the item in their top {k})")
        ax.set_title(f"k = {k}: markers each N_{k} value, lines power-of-2 bin means", fontsize="medium")
        ax.grid(True, which="major", linestyle=":", linewidth=0.6)
        ax.legend(handles, labels, fontsize="small")
    axes[0].set_ylabel("number of items")
    fig.suptitle(title or f"k-occurrence distribution: {_title(names)}")
    return fig


# --- recall ----------------------------------------------------------------------------------------

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


def recall_figure(results, *, names=None, title: str | None = None, direction: str | None = None):
    """Recall@K against K (log x) for each input, K = 1 … 100 or as far as the input knows (a
    ranking's top N)."""
    Figure = _figure_class("recall_figure")
    data = recall_data(results, names)
    direction = direction or data["direction"]
    fig = Figure(figsize=(6.0, 4.2), layout="constrained")
    ax = fig.subplots()
    for i, s in enumerate(data["series"]):
        label = s["name"] + (f" (top {s['listed']})" if s["listed"] else "")
        ax.plot(s["K"], s["R@K"], markersize=3, markevery=_marks(len(s["K"])), linewidth=1.3, label=label,
                **_style(i))
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, which="both", linestyle=":", linewidth=0.6)
    ax.legend(fontsize="small", loc="lower right")
    names = [s["name"] for s in data["series"]]
    fig.suptitle(title or f"Recall@K{f' ({direction})' if direction else ''}: {_title(names)}")
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
    line per value of its other parameters (k, β₂, …), the raw baseline dashed, each method's
    best point circled and the chosen setting starred."""
    Figure = _figure_class("tuning_figure")
    data = tuning_data(result)
    panels = data["panels"]
    cols = min(3, max(1, len(panels)))
    rows = -(-len(panels) // cols) if panels else 1
    fig = Figure(figsize=(4.4 * cols, 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, sharey=True, squeeze=False).ravel()
    metric = data["metric"]
    for ax, panel in zip(axes, panels, strict=False):
        for i, s in enumerate(panel["series"]):
            xs = [v if v is not None else 0 for v in s["x"]]
            ax.plot(xs, s["y"], markersize=4, linewidth=1.2, label=s["label"], **_style(i))
        ax.axhline(data["raw"], color="0.4", linestyle="--", linewidth=1.0, label="raw")
        best = panel["best"]
        ax.plot([best["x"] or 0], [best["y"]], marker="o", markersize=11, markerfacecolor=(1, 1, 1, 0),
                markeredgecolor="black", markeredgewidth=1.4, linestyle="", label="best of method")
        if panel["method"] == data["chosen"]["method"]:
            ax.plot([best["x"] or 0], [best["y"]], marker="*", markersize=14, color="black", linestyle="",
                    label="chosen")
        if panel["x"] in ("beta", "gallery_beta") and all((v or 0) > 0 for s in panel["series"] for v in s["x"]):
            ax.set_xscale("log")
        ax.set_xlabel(_symbol(panel["x"]) if panel["x"] else "")
        ax.set_title(panel["method"])
        ax.grid(True, linestyle=":", linewidth=0.6)
        ax.legend(fontsize="x-small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax in axes[::cols]:
        ax.set_ylabel(f"validation {metric}")
    chosen = data["chosen"]
    setting = " ".join([chosen["method"]] + [f"{_symbol(n)}={chosen[n]:g}" for n in registry.PARAMETERS
                                             if chosen.get(n) is not None])
    fig.suptitle(title or f"tune: validation {metric} per setting; chosen {setting} ({chosen['value']:.2f})")
    return fig
