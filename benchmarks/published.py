"""Issue 16's figures on the shared Multi30k data, from the CLI and from the library.

    python -m benchmarks.published [--data PATH] [--keep DIR] [--timing] [--repeat N]

Not part of `python -m benchmarks` (it needs ../shared/data; about five minutes on 2 cores, plus
the timing). Bank = all 10,000 `train_queries`, gallery bank = all 10,000 `train_gallery`, test
split (5000 queries × 1000 items); R@1 as `qbnorm evaluate` prints it:

    sn   β=100 converged 35.42 ± 0.05      dbsn β=100 converged 35.56 ± 0.05
    sn   β=100, 10 iterations 35.42        dbsn β=100, 10 iterations 35.58
    dn   λ=0.25 30.68, λ=0.5 31.74         dis  β=20 k=1 θ=5 32.50, θ=1 32.36

(the figures without ± to the printed two decimals), and that iterating to the default tolerance
(1e-6) ranks every query's top 10 as iterating to 1e-10 does. With --timing: the probe time of sn
(and of sn + dbsn) as a ratio to the IS probe of the same run, whole processes, interleaved, each
pair repeated (default 3). Exit code 1 when a figure is off.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py

from benchmarks.__main__ import QBNORM, ROOT, compile_package, interleaved, median_ratio, per_repeat, qbnorm, run

# ../shared from the repository (a worktree one level deeper: ../../shared)
DATA = next((p for p in (ROOT.parent / "shared", ROOT.parent.parent / "shared") if p.is_dir()),
            ROOT.parent / "shared") / "data" / "multi30k-de2en-e5.h5"
# (label, method, parameters, the probe it needs, expected R@1, allowed difference)
EXPECTED = [
    ("sn β=100 converged", "sn", {"beta": 100.0}, "converged", 35.42, 0.05),
    ("dbsn β=100 converged", "dbsn", {"beta": 100.0}, "converged", 35.56, 0.05),
    ("sn β=100, 10 iterations", "sn", {"beta": 100.0}, "iters10", 35.42, 0.005),
    ("dbsn β=100, 10 iterations", "dbsn", {"beta": 100.0}, "iters10", 35.58, 0.005),
    ("dn λ=0.25", "dn", {"lam": 0.25}, "converged", 30.68, 0.005),
    ("dn λ=0.5", "dn", {"lam": 0.5}, "converged", 31.74, 0.005),
    ("dis β=20 k=1 θ=5", "dis", {"beta": 20.0, "k": 1, "min_count": 5}, "converged", 32.50, 0.005),
    ("dis β=20 k=1 θ=1", "dis", {"beta": 20.0, "k": 1, "min_count": 1}, "converged", 32.36, 0.005),
]
FLAGS = {"beta": "--beta", "k": "--k", "min_count": "--min-count", "lam": "--lambda"}
PROBES = {"converged": {}, "iters10": {"sinkhorn_iters": 10}, "tight": {"sinkhorn_tol": 1e-10}}  # probe's options


def say(text: str = "") -> None:
    print(text, flush=True)


def cli_figures(data: str, work: Path) -> tuple[dict, dict]:
    """R@1 of every expected setting through `qbnorm` commands; and the probes' Sinkhorn runs."""
    qbank, gbank = work / "qbank.h5", work / "gbank.h5"
    run(qbnorm("build-bank", f"{data}::/train_queries", "-o", qbank, "--strategy", "all"))
    run(qbnorm("build-bank", f"{data}::/train_gallery", "-o", gbank, "--strategy", "all"))
    runs = {}
    for name, options in PROBES.items():
        extra = [str(x) for key, value in options.items() for x in ("--" + key.replace("_", "-"), value)]
        started = time.perf_counter()
        out = run([*qbnorm("probe", "--bank", qbank, "--gallery", f"{data}::/gallery", "--gallery-bank", gbank,
                           "--beta", 100, "--beta", 20, "--sinkhorn", *extra, "-o", work / f"probe_{name}.h5"),
                   "--json"])
        doc = json.loads(out.stdout)
        runs[name] = {"sn": doc["sinkhorn"], "dbsn": doc["dual_sinkhorn"], "seconds": time.perf_counter() - started}
    outputs = []
    for _, method, params, probe, _, _ in EXPECTED:
        target = work / f"{method}_{len(outputs)}.h5"
        flags = [str(x) for name, value in params.items() for x in (FLAGS[name], value)]
        run(qbnorm("normalise", "--queries", f"{data}::/queries", "--gallery", f"{data}::/gallery", "--probe",
                   work / f"probe_{probe}.h5", "--method", method, *flags, "--top-k", 10, "-o", target))
        outputs.append(target)
    doc = json.loads(run([*QBNORM, "evaluate", *map(str, outputs), "--gt", f"{data}::/gt", "--json"]).stdout)
    return {row[0]: entry["metrics"]["R@1"] for row, entry in zip(EXPECTED, doc["inputs"], strict=True)}, runs


def api_figures(data: str) -> tuple[dict, int, int]:
    """The same through the library (arrays in); and how many queries' top 10 differ between the
    potentials iterated to 1e-6 and to 1e-10 (sn, dbsn)."""
    import qbnorm_cli

    with h5py.File(data, "r") as h5:
        q, g, gt, bank, gbank = (h5[n][()] for n in ("queries", "gallery", "gt", "train_queries", "train_gallery"))
    probes = {name: qbnorm_cli.probe(bank, g, gallery_bank=gbank, betas=[100.0, 20.0], sinkhorn=True, **options)
              for name, options in PROBES.items()}
    figures = {}
    for label, method, params, probe, _, _ in EXPECTED:
        top = qbnorm_cli.normalise(q, g, probes[probe], method=method, top_k=10, **params)
        figures[label] = qbnorm_cli.evaluate(top, gt)["metrics"]["R@1"]
    differ = []
    for method in ("sn", "dbsn"):
        a = qbnorm_cli.normalise(q, g, probes["converged"], method=method, beta=100.0, top_k=10).indices
        b = qbnorm_cli.normalise(q, g, probes["tight"], method=method, beta=100.0, top_k=10).indices
        differ.append(int((a != b).any(axis=1).sum()))
    return figures, *differ


def timing(data: str, work: Path, repeats: int) -> None:
    qbank, gbank = work / "qbank.h5", work / "gbank.h5"
    base = ["probe", "--bank", qbank, "--gallery", f"{data}::/gallery", "--beta", 100, "-o", work / "timed.h5"]
    cases = (("sn (probe --sinkhorn) / IS probe", base),
             ("sn + dbsn (--gallery-bank, --sinkhorn) / IS + gallery-bank probe", [*base, "--gallery-bank", gbank]))
    for label, args in cases:
        pairs = interleaved(repeats, lambda args=args: run(qbnorm(*args, "--sinkhorn")),
                            lambda args=args: run(qbnorm(*args)))
        t_sn = statistics.median(a.seconds for a, _ in pairs)
        t_is = statistics.median(b.seconds for _, b in pairs)
        peaks = max(a.peak_mib for a, _ in pairs), max(b.peak_mib for _, b in pairs)
        say(f"   {label}: {median_ratio(pairs):.2f} ({t_sn:.2f} s / {t_is:.2f} s, whole processes, median of "
            f"{repeats}; peak {peaks[0]:.0f} MiB vs {peaks[1]:.0f} MiB)")
        say(f"      per repeat: {per_repeat(pairs)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.published", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA), help="the shared Multi30k file")
    parser.add_argument("--keep", metavar="DIR", help="write the files into DIR and keep them")
    parser.add_argument("--timing", action="store_true", help="also time the sn probe against the IS probe")
    parser.add_argument("--repeat", type=int, default=3, help="repeats of each timed pair (default 3)")
    args = parser.parse_args(argv)
    if not Path(args.data).is_file():
        parser.error(f"--data {args.data}: no such file")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qbnorm-published-"))
    work.mkdir(parents=True, exist_ok=True)
    compile_package()
    ok = True
    try:
        say(f"issue 16 figures on {args.data} (files in {work})")
        cli, runs = cli_figures(args.data, work)
        for name, found in runs.items():
            described = "; ".join(f"{kind} β={r['beta']:g}: {r['iterations']} iterations, "
                                  f"{'converged' if r['converged'] else 'not converged'}, marginal error "
                                  f"{r['marginal_error']:.1e}, {'held' if r['held'] else 'recomputed'}"
                                  for kind in ("sn", "dbsn") for r in found[kind])
            say(f"   probe {name} ({found['seconds']:.1f} s): {described}")
        api, sn_differ, dbsn_differ = api_figures(args.data)
        say(f"   {'setting':28s} {'expected':>9s} {'CLI':>7s} {'API':>7s}")
        for label, _, _, _, want, allowed in EXPECTED:
            good = all(abs(found[label] - want) <= allowed + 1e-9 for found in (cli, api))
            ok &= good
            say(f"   {label:28s} {want:9.2f} {cli[label]:7.2f} {api[label]:7.2f}  "
                f"{'ok' if good else 'OFF'}{f' (± {allowed:g})' if allowed > 0.01 else ''}")
        ok &= sn_differ == dbsn_differ == 0
        say(f"   top-10 rankings, tolerance 1e-6 against 1e-10: {sn_differ} (sn) and {dbsn_differ} (dbsn) of 5000 "
            f"queries differ")
        if args.timing:
            timing(args.data, work, args.repeat)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    say("all figures as published" if ok else "SOME FIGURES ARE OFF")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
