"""Figures (`--plot`, qbnorm_cli.plots): rendered to PNG, SVG and PDF, drawn from exactly the data
--json prints, written atomically, and one clear line when the `plot` extra is missing."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import leftovers

import qbnorm_cli
from qbnorm_cli import RuntimeFailure, plots
from qbnorm_cli.errors import install_hint

pytest.importorskip("matplotlib", reason="the plot extra (make setup installs it)")

SAMPLE = str(Path(__file__).resolve().parent.parent / "sample_data" / "multi30k-sample.h5")


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    root = tmp_path_factory.mktemp("plots")
    probe = qbnorm_cli.probe(f"{SAMPLE}::/train_queries", f"{SAMPLE}::/gallery", betas=[20])
    for method in ("none", "dis"):
        qbnorm_cli.normalise(f"{SAMPLE}::/queries", f"{SAMPLE}::/gallery", probe, method=method,
                             output=root / f"{'raw' if method == 'none' else method}.h5")
    return root


def line_data(fig) -> list[tuple[list, list]]:
    return [(list(map(float, line.get_xdata())), list(map(float, line.get_ydata())))
            for ax in fig.axes for line in ax.lines]


def png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_hubness_plot_is_the_json_data(cli, scores, tmp_path):
    out = tmp_path / "hub.png"
    doc = json.loads(cli.ok("hubness", scores / "raw.h5", scores / "dis.h5", "--k", 1, "--k", 10,
                            "--plot", out, "--json"))
    series = doc["plot"]["series"]
    assert [(s["name"], s["k"]) for s in series] == [("raw", 1), ("raw", 10), ("dis", 1), ("dis", 10)]
    for s, res in zip(series, [r for r in doc["inputs"] for _ in (0, 1)], strict=True):
        row = next(r for r in res["by_k"] if r["k"] == s["k"])
        assert s["skewness"] == row["skewness"] and s["mean_nk"] == row["mean_nk"]
        assert sum(s["items"]) + s["zero_items"] == res["gallery_rows"]     # every item counted once
        assert s["nk"] == [v for v in row["distribution"]["nk"] if v > 0]
        # the complementary CDF: the share of items with N_k ≥ each value, by counting
        nk = np.repeat(row["distribution"]["nk"], row["distribution"]["items"])
        assert s["share_at_least"] == [int(np.sum(nk >= v)) / nk.size for v in s["nk"]]  # one division each
    fig = plots.hubness_figure(doc["inputs"])
    by_panel = [s for k in (1, 10) for s in series if s["k"] == k]
    steps = [line for ax in fig.axes for line in ax.lines if line.get_linestyle() != ":"]  # not the μ, 2μ marks
    assert [(list(map(float, line.get_xdata())), list(map(float, line.get_ydata()))) for line in steps] == \
        [(list(map(float, s["nk"])), s["share_at_least"]) for s in by_panel]
    assert [ax.get_xscale() for ax in fig.axes] == ["log", "log"] and fig.axes[0].get_yscale() == "log"
    assert fig.axes[1].get_xlabel().startswith("$N_{10}$") and fig.get_suptitle() == ""
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert legend[0].startswith("raw") and f"{series[1]['skewness']:.2f}" in legend[0]
    width, height = png_size(out)
    assert width > 1000 and 400 < height < width            # two panels side by side
    mine = tmp_path / "mine.png"
    plots.save_figure(fig, mine)
    assert mine.read_bytes() == out.read_bytes()               # the file is the figure of the JSON data
    assert not leftovers(tmp_path)


def test_each_input_keeps_its_colour_in_every_figure():
    """raw is the baseline's colour, a method's file its method's, whatever else is drawn beside it
    and in whichever order; other names take slots no method uses."""
    first = plots.slots(["raw", "dis", "csls", "tuned"])
    second = plots.slots(["csls", "mine", "dis_b100", "none"])
    assert first["raw"] == second["none"] and first["dis"] == second["dis_b100"] and first["csls"] == second["csls"]
    assert plots.slots(["dis20"])["dis20"] == first["dis"] != plots.slots(["dual-dis"])["dual-dis"]
    assert len({first[n] for n in first}) == 4 and first["tuned"] >= len(qbnorm_cli.METHODS)
    colours = [plots.style_of(first[n])["color"] for n in first]
    assert len(set(colours)) == 4


def test_recall_plot_and_its_curves(cli, scores, tmp_path):
    out = tmp_path / "recall.svg"
    doc = json.loads(cli.ok("evaluate", scores / "raw.h5", scores / "dis.h5", "--gt", f"{SAMPLE}::/gt",
                            "--plot", out, "--json"))
    for s, res in zip(doc["plot"]["series"], doc["inputs"], strict=True):
        assert s["K"] == list(range(1, 101)) and s["R@K"] == res["recall_curve"]["R@K"]
        for k in (1, 5, 10, 50):
            assert s["R@K"][k - 1] == res["metrics"][f"R@{k}"]
        assert all(a <= b for a, b in zip(s["R@K"], s["R@K"][1:], strict=False))
    fig = plots.recall_figure(doc["inputs"], direction="t2v")
    curves, below = fig.axes
    series = doc["plot"]["series"]
    assert [(list(map(float, line.get_xdata())), list(map(float, line.get_ydata()))) for line in curves.lines] == \
        [(list(map(float, s["K"])), s["R@K"]) for s in series]
    # the lower panel: each input minus the first, in points
    assert [list(map(float, line.get_ydata())) for line in below.lines] == \
        [[a - b for a, b in zip(s["R@K"], series[0]["R@K"], strict=True)] for s in series]
    assert [line.get_color() for line in curves.lines] == [line.get_color() for line in below.lines]
    styles = [line.get_linestyle() for line in fig.axes[0].lines]
    assert len(set(styles)) == len(styles)                     # told apart without colour
    # the axis spans the curves with a margin, not 0–100 (which hid a 6-point spread)
    values = [v for s in doc["plot"]["series"] for v in s["R@K"]]
    lo, hi = fig.axes[0].get_ylim()
    assert lo < min(values) and hi > max(values) and (lo > 0 or min(values) < 5) and hi - lo < 100
    assert plots.recall_limits([{"R@K": [50.0, 56.0]}]) == (49.0, 57.0)      # 6 points: ±1 (8 % is less)
    assert plots.recall_limits([{"R@K": [0.5, 99.9]}]) == (0.0, 100.0)
    assert out.read_text().lstrip().startswith("<?xml")


def test_recall_curve_of_a_ranking_stops_at_its_n(scores):
    probe = qbnorm_cli.probe(f"{SAMPLE}::/train_queries", f"{SAMPLE}::/gallery", betas=[20])
    top = qbnorm_cli.normalise(f"{SAMPLE}::/queries", f"{SAMPLE}::/gallery", probe, top_k=7)
    res = qbnorm_cli.evaluate(top, f"{SAMPLE}::/gt")
    assert res["recall_curve"]["K"] == list(range(1, 8))
    data = plots.recall_data([res])
    assert data["series"][0]["K"] == list(range(1, 8)) and data["series"][0]["listed"] == 7


def test_tune_plot_marks_the_chosen_setting(cli, tmp_path):
    out = tmp_path / "tune.pdf"
    doc = json.loads(cli.ok("tune", "--queries", f"{SAMPLE}::/val_queries", "--gallery", f"{SAMPLE}::/val_gallery",
                            "--gt", f"{SAMPLE}::/val_gt", "--bank", f"{SAMPLE}::/train_queries", "--methods",
                            "dis,csls", "--beta", 10, "--beta", 20, "-o", tmp_path / "p.json", "--plot", out,
                            "--json"))
    data = doc["plot"]
    assert data["metric"] == "GeomR" and data["raw"] == doc["raw"]["GeomR"]
    panels = {p["method"]: p for p in data["panels"]}
    # dis has k (3 values) × θ (3 values) per β: more than 6 series, so one per k, the best over θ
    labels = [s["label"] for s in panels["dis"]["series"]]
    assert panels["dis"]["x"] == "beta" and labels == [f"k={k} (best θ)" for k in (1, 2, 5)]
    for s in panels["dis"]["series"]:
        k = int(s["label"].split()[0][2:])
        for beta, value in zip(s["x"], s["y"], strict=True):
            rows = [r for r in doc["settings"] if r["method"] == "dis" and r["k"] == k and r["beta"] == beta]
            assert len(rows) == 3 and value == max(r["metrics"]["GeomR"] for r in rows)
    assert data["chosen"]["method"] == doc["best"]["method"]
    assert data["chosen"]["value"] == doc["best"]["metrics"]["GeomR"]
    assert out.read_bytes()[:5] == b"%PDF-"
    fig = plots.tuning_figure(doc)
    assert any(line.get_marker() == "*" for ax in fig.axes for line in ax.lines)   # the chosen point


def test_figures_are_written_like_every_output(cli, scores, tmp_path):
    out = tmp_path / "hub.png"
    out.write_bytes(b"keep")
    code, _, err = cli("hubness", scores / "raw.h5", "--plot", out)
    assert code == 2 and "exists; pass --force" in err and out.read_bytes() == b"keep"
    code, _, err = cli("hubness", scores / "raw.h5", "--plot", tmp_path / "hub.jpg")
    assert code == 2 and "--plot" in err and ".png, .svg or .pdf" in err
    cli.ok("hubness", scores / "raw.h5", "--plot", out, "--force", "-q")
    assert png_size(out)[0] > 100 and not leftovers(tmp_path)


def test_the_library_figures_leave_matplotlib_as_they_found_it(scores):
    import matplotlib

    backend, pyplot = matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules
    rc = dict(matplotlib.rcParams)
    fig = plots.hubness_figure(qbnorm_cli.hubness(str(scores / "dis.h5"), k=5))
    assert type(fig).__name__ == "Figure"
    assert matplotlib.get_backend() == backend and ("matplotlib.pyplot" in sys.modules) == pyplot
    assert dict(matplotlib.rcParams) == rc


def test_a_missing_extra_is_one_line_naming_it(cli, scores, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(RuntimeFailure, match=re.escape(f"hubness_figure needs matplotlib: {install_hint('plot')}")):
        plots.hubness_figure(qbnorm_cli.hubness(str(scores / "raw.h5")))
    out = tmp_path / "hub.png"
    code, stdout, err = cli("hubness", scores / "raw.h5", "--plot", out, "--json")
    assert code == 1 and stdout == "" and not out.exists()
    assert err.strip().splitlines() == [f"qbnorm: error: hubness --plot needs matplotlib: {install_hint('plot')}"]
    assert json.loads(cli.ok("hubness", scores / "raw.h5", "--json"))["inputs"]   # the rest needs no matplotlib
    assert np.isfinite(qbnorm_cli.evaluate(str(scores / "raw.h5"), f"{SAMPLE}::/gt")["metrics"]["R@1"])
