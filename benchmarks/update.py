"""Issue 29: `qbnorm probe --update` against a full probe of the same final inputs.

    python -m benchmarks.update [--tiny | --full] [--repeat N] [--check-only | --time-only] [--json OUT]
                                [--data M30K.h5]

check  (the issue's "done when", on the shared Multi30k data when present): a probe of 9,000
       train_queries × the first 900 gallery items (every method's statistics: sinkhorn, a gallery
       bank of train_gallery for the dual methods, the sorted bank for gc, mp's moments, ls/nicdm/dsl),
       then one update adding the remaining 100 items and 1,000 more bank queries and removing 10
       items; every method's normalised top-10 rankings of the 5,000 test queries must equal those
       of a fresh probe of the final inputs exactly.
       Prints the Sinkhorn iterations of the warm start against the fresh probe's cold start.
time   synthetic unit embeddings (benchmarks/data.py): bank N × gallery G × d; the old probe of
       N × G, then, interleaved and repeated, `qbnorm probe --update` adding 1 % items and 1 % bank
       queries and `qbnorm probe` of the final inputs (each a subprocess, its files warm in the page
       cache, qbnorm_cli byte-compiled once first as installing it does). Default 4,000 × 20,000 ×
       128 (under a minute); --full: 20,000 × 100,000 × 512 (the issue's size; target ratio
       ≤ 0.05); --tiny: the smoke size.

Ratios are medians of per-repeat ratios measured in this run (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import h5py
import numpy as np

from benchmarks.__main__ import compile_package
from benchmarks.data import gallery_rows, query_rows

ROOT = Path(__file__).resolve().parent.parent
MULTI30K = Path("data") / "multi30k-de2en-e5.h5"
SHARED = next((p / MULTI30K for p in (ROOT / "shared", ROOT.parent / "shared") if (p / MULTI30K).exists()),
              ROOT.parent / "shared" / MULTI30K)
SIZES = {"tiny": (400, 2000, 32), "default": (4000, 20000, 128), "full": (20000, 100000, 512)}


def check(path: Path = SHARED) -> dict:
    """The done-when check: rankings of every method after an update equal a fresh probe's."""
    import qbnorm_cli
    from qbnorm_cli import methods as registry

    with h5py.File(path, "r") as h5:
        train, gallery, gbank = h5["train_queries"][:], h5["gallery"][:], h5["train_gallery"][:2000]
        queries = h5["queries"][:]
    bank, more_bank = train[:9000], train[9000:10000]
    old_gallery, more_gallery = gallery[:900], gallery[900:]
    removed = np.arange(5, 900, 90)[:10]
    kwargs = dict(betas=[20.0], k=1, gallery_bank=gbank, gallery_betas=[1.0], keep_sorted=True, sinkhorn=True,
                  methods=["ls", "nicdm", "mp", "dsl"], topk_means=registry.default_topk_means())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = qbnorm_cli.probe(bank, old_gallery, **kwargs)
        start = time.perf_counter()
        updated = qbnorm_cli.update_probe(old, bank=bank, gallery=old_gallery, gallery_bank=gbank,
                                          add_gallery=more_gallery, remove_gallery=removed, add_bank=more_bank)
        update_s = time.perf_counter() - start
        keep = np.setdiff1d(np.arange(900), removed)
        final_gallery = np.concatenate([old_gallery[keep], more_gallery])
        start = time.perf_counter()
        fresh = qbnorm_cli.probe(np.concatenate([bank, more_bank]), final_gallery, **kwargs)
        fresh_s = time.perf_counter() - start
        same, differ = [], {}
        for method in registry.names():
            a = qbnorm_cli.normalise(queries, final_gallery, updated, method=method, top_k=10).indices
            b = qbnorm_cli.normalise(queries, final_gallery, fresh, method=method, top_k=10).indices
            (same.append(method) if np.array_equal(a, b) else differ.__setitem__(method, int((a != b).any(1).sum())))

    def runs(probe, dual):
        return [(r["beta"], r["iterations"]) for r in probe.sinkhorn_runs(dual)]

    return {"identical": same, "differ": differ, "update_s": round(update_s, 2), "fresh_probe_s": round(fresh_s, 2),
            "sinkhorn_iterations_warm": runs(updated, False), "sinkhorn_iterations_cold": runs(fresh, False),
            "dual_sinkhorn_iterations_warm": runs(updated, True), "dual_sinkhorn_iterations_cold": runs(fresh, True)}


def _write(path: Path, rows: np.ndarray) -> None:
    with h5py.File(path, "w") as h5:
        h5.create_dataset("embeddings", data=rows)


def _run(args: list) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qbnorm_cli", *map(str, args), "-q", "--force"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise SystemExit(f"qbnorm {' '.join(map(str, args))} failed: {proc.stderr}")
    return time.perf_counter() - start


def _warm(paths) -> None:
    for path in paths:
        with open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass


def time_update(size: str, repeat: int, work: Path) -> dict:
    n_bank, n_gallery, dim = SIZES[size]
    n_new_items, n_new_bank = max(1, n_gallery // 100), max(1, n_bank // 100)
    gallery = gallery_rows(0, n_gallery + n_new_items, dim, seed=1)
    bank = query_rows(0, n_bank + n_new_bank, dim, seed=1, n_gallery=n_gallery, per_item=1, noise_seed=3)
    files = {"g": gallery[:n_gallery], "gn": gallery[n_gallery:], "b": bank[:n_bank], "bn": bank[n_bank:],
             "gf": gallery, "bf": bank}
    for name, rows in files.items():
        _write(work / f"{name}.h5", rows)
    f = {name: work / f"{name}.h5" for name in files}
    compile_package()  # both sides start as an installed qbnorm does, from cached bytecode
    _run(["probe", "--bank", f["b"], "--gallery", f["g"], "-o", work / "old.h5"])
    update = ["probe", "--update", work / "old.h5", "--bank", f["b"], "--gallery", f["g"], "--add-gallery", f["gn"],
              "--add-bank", f["bn"], "-o", work / "new.h5"]
    full = ["probe", "--bank", f["bf"], "--gallery", f["gf"], "-o", work / "fresh.h5"]
    ratios, update_s, full_s = [], [], []
    for i in range(repeat):
        order = (update, full) if i % 2 == 0 else (full, update)  # ABBA
        took = {}
        for args in order:
            _warm([*f.values(), work / "old.h5"])
            took[args is update] = _run(args)
        update_s.append(took[True])
        full_s.append(took[False])
        ratios.append(took[True] / took[False])
    return {"size": {"bank": n_bank, "gallery": n_gallery, "dim": dim, "new_items": n_new_items,
                     "new_bank": n_new_bank}, "update_s": update_s, "full_probe_s": full_s,
            "ratio": statistics.median(ratios), "target": 0.05}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--tiny", action="store_true")
    group.add_argument("--full", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--time-only", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--data", type=Path, default=SHARED, help="the shared Multi30k file (for the check)")
    args = parser.parse_args(argv)
    out = {}
    if not args.time_only:
        if args.data.exists():
            out["check"] = check(args.data)
            print("check:", json.dumps(out["check"]), flush=True)
        else:
            print(f"check: skipped ({args.data} not found)", flush=True)
    if not args.check_only:
        size = "tiny" if args.tiny else "full" if args.full else "default"
        with tempfile.TemporaryDirectory() as tmp:
            out["time"] = time_update(size, args.repeat, Path(tmp))
        print("time:", json.dumps(out["time"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
