"""Byte-identical outputs across a refactoring (issue 25): every method, dense and top-k, at this
checkout against another revision, on sample_data/.

    python -m benchmarks.equivalence [--against REV] [--data FILE.h5] [--only METHOD…] [--keep DIR]

The other revision is checked out into a temporary git worktree; both run the same commands (one
probe with every statistic, then `normalise` for each built-in method, dense and `--top-k 10`) as
`python -m qbnorm_cli` with PYTHONPATH on their own tree, in the same directory one after the
other, so that the paths recorded in the outputs agree. Every dataset's bytes, dtype and shape, and
every attribute except those that record when and by whom a file was made, are compared. Exits 1
and names the outputs that differ. Methods that exist on one side only are listed and skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data" / "multi30k-sample.h5"
# Attributes that record the moment and the maker of a file, not its content.
VOLATILE = {"created_at", "created_by", "attribute_checksums", "uuid"}
# A file's UUID is drawn when it is made; where another file's is recorded (a probe's in the outputs
# made from it), it is masked.
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
PROBE_OPTIONS = ["--beta", "20", "--gallery-beta", "1", "--topk-mean", "10", "--topk-mean", "128", "--keep-sorted",
                 "--sinkhorn",
                 *[arg for m in ("ls", "nicdm", "mp", "dsl", "gc") for arg in ("--method", m)]]


def method_names(tree: Path) -> list[str]:
    code = "from qbnorm_cli import methods; print(' '.join(methods.BUILT_IN_NAMES))"
    done = subprocess.run([sys.executable, "-c", code], env=environment(tree), capture_output=True, text=True,
                          check=True)
    return done.stdout.split()


def environment(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "QBNORM_PROGRESS_SECONDS": "3600"}


def run(tree: Path, cwd: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "qbnorm_cli", *args, "--quiet"], cwd=cwd, env=environment(tree),
                   check=True)


def produce(tree: Path, work: Path, data: Path, names: list[str]) -> dict[str, Path]:
    """The probe and every method's outputs made by the code in `tree`, under work/."""
    work.mkdir(parents=True)
    shutil.copyfile(data, work / "data.h5")
    run(tree, work, "probe", "--bank", "data.h5::/train_queries", "--gallery", "data.h5::/gallery",
        "--gallery-bank", "data.h5::/train_gallery", "-o", "probe.h5", *PROBE_OPTIONS)
    outputs = {"probe": work / "probe.h5"}
    for name in names:
        for label, extra in (("dense", []), ("top10", ["--top-k", "10"])):
            out = f"{name}-{label}.h5"
            run(tree, work, "normalise", "--queries", "data.h5::/queries", "--gallery", "data.h5::/gallery",
                "--probe", "probe.h5", "--method", name, "-o", out, *extra)
            outputs[f"{name} {label}"] = work / out
    return outputs


def fingerprint(path: Path) -> dict[str, str]:
    """One digest per dataset (bytes, dtype, shape, attributes) and one for the root's attributes."""
    prints: dict[str, str] = {}

    def attrs(obj) -> str:
        text = json.dumps({k: np.asarray(v).tolist() if not isinstance(v, (str, bytes)) else str(v)
                           for k, v in sorted(obj.attrs.items()) if k not in VOLATILE}, sort_keys=True)
        return UUID.sub("<uuid>", text)

    with h5py.File(path, "r") as f:
        prints["/"] = hashlib.sha256(attrs(f).encode()).hexdigest()

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                digest = hashlib.sha256(np.ascontiguousarray(data).tobytes() if data.dtype != object
                                        else repr(data.tolist()).encode())
                digest.update(f"{data.dtype.str}{data.shape}{attrs(obj)}".encode())
                prints[name] = digest.hexdigest()
        f.visititems(visit)
    return prints


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="HEAD", help="the revision to compare with (default HEAD)")
    parser.add_argument("--data", type=Path, default=SAMPLE, help="an HDF5 file laid out as sample_data's")
    parser.add_argument("--only", nargs="+", metavar="METHOD", help="just these methods")
    parser.add_argument("--keep", type=Path, help="keep the outputs under this directory")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="qbnorm-equivalence-"))
    base = scratch / "tree"
    try:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(base), args.against],
                       check=True)
        here, there = method_names(ROOT), method_names(base)
        for side, names, other in (("this checkout", here, there), (args.against, there, here)):
            only = sorted(set(names) - set(other))
            if only:
                print(f"only in {side} (skipped): {', '.join(only)}")
        common = [n for n in here if n in there and (not args.only or n in args.only)]
        prints = []
        for side, tree in (("this", ROOT), ("other", base)):
            outputs = produce(tree, scratch / "run", args.data, common)
            prints.append({label: fingerprint(path) for label, path in outputs.items()})
            if args.keep:
                shutil.copytree(scratch / "run", args.keep / side, dirs_exist_ok=True)
            shutil.rmtree(scratch / "run")
        ours, theirs = prints
        different = []
        for label in ours:
            a, b = ours[label], theirs[label]
            if a != b:
                keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
                different.append(f"{label}: {', '.join(keys)}")
        print(f"{len(ours) - len(different)} of {len(ours)} outputs byte-identical to {args.against} "
              f"({len(common)} methods, dense and top-10, and the probe)")
        for line in different:
            print(f"DIFFERENT {line}")
        return 1 if different else 0
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
