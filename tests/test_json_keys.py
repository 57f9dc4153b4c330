"""Every command's --json keys are the ones docs/json.md lists: each command runs twice on small
data, once plainly (exactly the keys marked `always`) and once with every option that adds keys
(exactly every key listed, but those only a --cluster run prints)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from smalldata import small_pipeline

from qbnorm_cli.cli import main
from qbnorm_cli.cli.app import COMMANDS

DOC = Path(__file__).resolve().parent.parent / "docs" / "json.md"
SECTION = re.compile(r"^## (?:`qbnorm (?P<command>[a-z-]+)`|(?P<every>Every command))\s*$")
ROW = re.compile(r"^\| `(?P<key>[a-z_]+)` \| (?P<type>[^|]+) \| (?P<present>[^|]+) \| (?P<meaning>.+) \|$")
CLUSTER = "with `--cluster`"  # keys only a run on a dask cluster prints (tests/test_cluster.py runs those)


def documented() -> dict[str, dict[str, str]]:
    """{command (or "*" for every command): {key: when present}} from docs/json.md."""
    out: dict[str, dict[str, str]] = {}
    current = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if match := SECTION.match(line):
            current = "*" if match["every"] else match["command"]
            out[current] = {}
        elif current is not None and (match := ROW.match(line)):
            assert match["key"] not in out[current], f"{current}: {match['key']} listed twice"
            out[current][match["key"]] = match["present"].strip()
    return out


DOCUMENTED = documented()


def runs(d: Path, data: str) -> dict[str, tuple[list, list]]:
    """Each command: (its plain run, its run with every option that adds keys)."""
    q, g, gt = f"{data}::/queries", f"{data}::/gallery", f"{data}::/gt"
    val = ["--queries", f"{data}::/val_queries", "--gallery", f"{data}::/val_gallery", "--gt", f"{data}::/val_gt",
           "--bank", d / "bank.h5", "--beta", 20, "--methods", "is"]
    probe = ["probe", "--bank", d / "bank.h5", "--gallery", g]
    return {
        "build-bank": (["build-bank", f"{data}::/train_queries", "-o", d / "b.h5", "--size", 10],) * 2,
        "probe": ([*probe, "-o", d / "p1.h5"],  # the full run updates a probe with every key (made in `pipeline`)
                  ["probe", "--update", d / "p2old.h5", "--bank", d / "bank.h5", "--gallery", g, "--gallery-bank",
                   d / "gbank.h5", "--add-bank", d / "bank.h5", "-o", d / "p2.h5"]),
        "normalise": (["normalise", "--queries", q, "--gallery", g, "--probe", d / "probe.h5", "-o", d / "n.h5"],) * 2,
        "evaluate": (["evaluate", d / "n.h5", "--gt", gt],
                     ["evaluate", d / "n.h5", d / "n.h5", "--gt", gt, "--fail-under", "R@1=0", "-o", d / "e.h5",
                      "--plot", d / "e.png"]),
        "hubness": (["hubness", d / "n.h5"], ["hubness", d / "n.h5", "-o", d / "h.h5", "--plot", d / "h.png"]),
        "hubs": (["hubs", d / "probe.h5", d / "n.h5"], ["hubs", d / "probe.h5", d / "n.h5", "-o", d / "hubs.h5"]),
        "convert": (["convert", d / "sims.npy", "-o", d / "c1.h5"],
                    ["convert", d / "sims.npy", "-o", d / "c2.h5", "--kind", "similarity"]),
        "tune": (["tune", *val, "-o", d / "t1.json"], ["tune", *val, "-o", d / "t2.json", "--plot", d / "t.png"]),
        "export": (["export", "--probe", d / "probe.h5", "--gallery", g, "-o", d / "x.h5"],) * 2,
        "search": (["search", "--index", d / "x.h5", "--queries", q, "--top-k", 5, "-o", d / "s1.h5"],
                   ["search", "--index", d / "x.h5", "--queries", q, "--top-k", 5, "-o", d / "s2.h5",
                    "--check-recall", 0.5]),
    }


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    d = tmp_path_factory.mktemp("json")
    data = small_pipeline(d)["data"]
    assert main([str(a) for a in ["probe", "--bank", d / "bank.h5", "--gallery", f"{data}::/gallery", "--sinkhorn",
                                  "--gallery-bank", d / "gbank.h5", "-o", d / "p2old.h5", "-q"]]) == 0
    return runs(d, data)


def test_every_command_is_documented():
    assert set(DOCUMENTED) - {"*"} == set(COMMANDS), "docs/json.md: one section per command"
    assert DOCUMENTED["*"] == {"warnings": "always"}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_json_keys_are_the_documented_ones(cli, pipeline, command):
    """Commands run in the order of COMMANDS: the later ones read what the earlier wrote."""
    assert command in pipeline, f"no --json run of {command} in this test: add one"
    keys = {**DOCUMENTED["*"], **DOCUMENTED[command]}
    always = {k for k, when in keys.items() if when == "always"}
    every = {k for k, when in keys.items() if when != CLUSTER}
    plain, full = pipeline[command]
    assert set(json.loads(cli.ok(*plain, "--json", "--force"))) == always
    if "--plot" in full and importlib.util.find_spec("matplotlib") is None:
        pytest.skip("the plot extra is not installed")
    assert set(json.loads(cli.ok(*full, "--json", "--force"))) == every
