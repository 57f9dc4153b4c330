"""Issue 26's figures on the shared Multi30k data, from the CLI and from the library.

    python -m benchmarks.classic_figures [--data PATH] [--keep DIR]

Bank = all 10,000 `train_queries`, K = 10, test split (5000 queries × 1000 items), each method
normalised to its top 10 and evaluated by R@1 (the CLI through `qbnorm evaluate --json`, the
library through `qbnorm_cli.evaluate`): ls 33.36, nicdm 33.20, mp gauss 32.50, mp empiric 33.00,
dsl 32.26, each ± 0.05 (raw 29.58). Not part of `python -m benchmarks` (it needs ../shared/data;
about two minutes on 2 cores). Exit code 1 when a figure is off.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import qbnorm_cli
from benchmarks.published import DATA

K = 10
# (label, method, options), expected R@1
EXPECTED = [
    (("none", "none", {}), 29.58),
    (("ls", "ls", {"topk_mean": K}), 33.36),
    (("nicdm", "nicdm", {"topk_mean": K}), 33.20),
    (("mp gauss", "mp", {"mp": "gauss"}), 32.50),
    (("mp empiric", "mp", {"mp": "empiric"}), 33.00),
    (("dsl", "dsl", {"topk_mean": K}), 32.26),
]
TOLERANCE = 0.05


def qbnorm(*args) -> str:
    done = subprocess.run([sys.executable, "-m", "qbnorm_cli", *map(str, args)], check=True, capture_output=True,
                          text=True)
    return done.stdout


def cli_figures(data: str, work: Path) -> dict[str, float]:
    probe = work / "probe.h5"
    qbnorm("probe", "--bank", f"{data}::/train_queries", "--gallery", f"{data}::/gallery", "--method", "ls",
           "--method", "nicdm", "--method", "mp", "--method", "dsl", "--topk-mean", K, "--keep-sorted", "-o", probe,
           "--quiet", "--force")
    out = {}
    for (label, method, options), _ in EXPECTED:
        target = work / f"{label.replace(' ', '-')}.h5"
        flags = [a for name, value in options.items() for a in (f"--{name.replace('_', '-')}", value)]
        qbnorm("normalise", "--queries", f"{data}::/queries", "--gallery", f"{data}::/gallery", "--probe", probe,
               "--method", method, *flags, "--top-k", 10, "-o", target, "--quiet", "--force")
        report = json.loads(qbnorm("evaluate", target, "--gt", f"{data}::/gt", "--json"))
        out[label] = report["inputs"][0]["metrics"]["R@1"]
    return out


def library_figures(data: str) -> dict[str, float]:
    probe = qbnorm_cli.probe(f"{data}::/train_queries", f"{data}::/gallery", topk_means=[K], keep_sorted=True,
                             methods=["ls", "nicdm", "mp", "dsl"])
    out = {}
    for (label, method, options), _ in EXPECTED:
        ranking = qbnorm_cli.normalise(f"{data}::/queries", f"{data}::/gallery", probe, method=method, top_k=10,
                                       **options)
        out[label] = qbnorm_cli.evaluate(ranking, gt=f"{data}::/gt")["metrics"]["R@1"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--keep", help="keep the files here (default: a temporary directory)")
    args = parser.parse_args(argv)
    work = Path(args.keep or tempfile.mkdtemp(prefix="qbnorm-classic-figures-"))
    work.mkdir(parents=True, exist_ok=True)
    found = {"cli": cli_figures(args.data, work), "library": library_figures(args.data)}
    bad = 0
    for (label, _, _), want in EXPECTED:
        for side in ("cli", "library"):
            got = found[side][label]
            ok = abs(got - want) <= TOLERANCE
            bad += not ok
            print(f"{side:8} {label:11} R@1 {got:6.2f} (expected {want:.2f} ± {TOLERANCE}) {'ok' if ok else 'OFF'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
