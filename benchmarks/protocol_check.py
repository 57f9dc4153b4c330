"""The official protocol in both directions (issue 17), rerunnable: on the shared Multi30k data,
text→image (t2v) and image→caption (v2t, QB-Norm with all 10,000 train_gallery captions as the
bank probing the test queries, β = 20, k = 1), from the t2v-layout dumps through the CLI
(--transpose, --direction v2t, --queries-per-item 5) and through the library, against metric.py's
figures (tests/reference.py's oracle, and the numbers the issue quotes) to its printed precision.

    python -m benchmarks.protocol_check [--keep DIR]     (from the repository's root)

Exit 0 when everything matches; prints the two tables.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import reference as ref  # noqa: E402

import qbnorm_cli  # noqa: E402

DATA = str(ROOT.parent / "shared" / "data" / "multi30k-de2en-e5.h5")
QBNORM = str(ROOT / ".venv" / "bin" / "qbnorm")
NAMES = ("R@1", "R@5", "R@10", "R@50", "MdR", "MnR", "GeomR")
# metric.py's printed figures, as the issue (and tests/reference.py's author) give them
ISSUE = {
    ("t2v", "raw"): {"R@1": 29.58},
    ("t2v", "dis"): {"R@1": 32.36},
    ("v2t", "raw"): {"R@1": 38.1, "R@5": 67.1, "R@10": 77.1, "R@50": 93.0, "MdR": 2.0, "MnR": 19.2, "GeomR": 58.2},
    ("v2t", "dis"): {"R@1": 46.4, "R@5": 71.7, "R@10": 80.4, "R@50": 93.5, "MdR": 2.0, "MnR": 17.1, "GeomR": 64.4},
}
failures: list[str] = []


def cli(*args) -> dict:
    proc = subprocess.run([QBNORM, *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"qbnorm {' '.join(map(str, args))} failed ({proc.returncode}): {proc.stderr}")
    return json.loads(proc.stdout) if "--json" in args else {}


def check(label: str, got: dict, official: dict, issue: dict) -> None:
    rounded = ref.official_rounded(got)
    printed = ref.official_rounded(official)
    for name in NAMES:
        if rounded[name] != printed[name]:
            failures.append(f"{label} {name}: qbnorm {got[name]!r} → {rounded[name]} but metric.py prints "
                            f"{printed[name]}")
        if name in issue and round(got[name], 2 if name == "R@1" and label.startswith("t2v") else 1) != issue[name]:
            failures.append(f"{label} {name}: {got[name]!r} is not the issue's {issue[name]}")
        if abs(got[name] - official[name]) > 1e-9 * max(1.0, abs(official[name])):
            failures.append(f"{label} {name}: {got[name]!r} differs from the oracle's unrounded {official[name]!r}")


def main() -> int:
    keep = sys.argv[sys.argv.index("--keep") + 1] if "--keep" in sys.argv else None
    work = Path(keep or tempfile.mkdtemp(prefix="qbnorm-i17-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with h5py.File(DATA, "r") as f:
        Q, G, TQ, TG, gt = (f[n][()] for n in ("queries", "gallery", "train_queries", "train_gallery", "gt"))
    assert np.array_equal(gt, np.arange(5000) // 5)
    # the dumps, in the official pickles' t2v layout (rows = captions)
    S = Q @ G.T                  # 5000 test captions × 1000 test images
    P_t2v = TQ @ G.T             # t2v bank: 10000 train captions × 1000 test images
    P_caps = Q @ TG.T            # v2t bank, t2v layout: 5000 test captions × 10000 train (gallery-modality) items
    np.save(work / "sims.npy", S)
    np.save(work / "bank_t2v.npy", P_t2v)
    np.save(work / "bank_v2t_captions_x_bank.npy", P_caps)
    with h5py.File(work / "sims.h5", "w") as h5:           # the same dump as HDF5, chunked by rows
        h5.create_dataset("sims", data=S, chunks=(256, 1000))

    # the oracle: metric.py restated (tests/reference.py), on the dense official DIS matrices
    S_dis, _ = ref.dynamic_inverted_softmax(S, P_t2v, 20.0, 1)
    V_dis, _ = ref.dynamic_inverted_softmax(S.T, P_caps.T, 20.0, 1)     # items × captions
    official = {
        ("t2v", "raw"): ref.official_metrics(ref.official_ranks_t2v(S)),
        ("t2v", "dis"): ref.official_metrics(ref.official_ranks_t2v(S_dis)),
        ("v2t", "raw"): ref.official_metrics(ref.official_ranks_v2t(S)),
        ("v2t", "dis"): ref.official_metrics(ref.official_ranks_v2t(V_dis.T)),
    }

    # --- the CLI, on the dumps as they are -------------------------------------------------------
    w = work
    t2v_raw = cli("evaluate", w / "sims.npy", "--queries-per-item", 5, "--json")
    cli("probe", "--bank-sims", w / "bank_t2v.npy", "-o", w / "probe_t2v.h5", "--beta", 20, "--k", 1, "-q",
        "--force")
    cli("normalise", "--sims", w / "sims.npy", "--probe", w / "probe_t2v.h5", "--method", "dis",
        "-o", w / "dis_t2v.h5", "--dtype", "float64", "-q", "--force")
    t2v_dis = cli("evaluate", w / "sims.npy", w / "dis_t2v.h5", "--queries-per-item", 5, "--json")
    v2t_raw = cli("evaluate", w / "sims.h5::/sims", "--direction", "v2t", "--queries-per-item", 5, "--json")
    cli("probe", "--bank-sims", w / "bank_v2t_captions_x_bank.npy", "--transpose", "-o", w / "probe_v2t.h5",
        "--beta", 20, "--k", 1, "-q", "--force")
    for method, name in (("none", "raw_v2t"), ("dis", "dis_v2t")):
        cli("normalise", "--sims", w / "sims.h5::/sims", "--transpose", "--probe", w / "probe_v2t.h5",
            "--method", method, "-o", w / f"{name}.h5", "--dtype", "float64", "-q", "--force")
    v2t = cli("evaluate", w / "raw_v2t.h5", w / "dis_v2t.h5", "--transpose", "--direction", "v2t",
              "--queries-per-item", 5, "--json", "--plot", w / "recall_v2t.png", "--force")
    cli("hubness", w / "raw_v2t.h5", w / "dis_v2t.h5", "--k", 10, "--json", "--plot", w / "hubness_v2t.png",
        "--force")
    cli_results = {
        ("t2v", "raw"): t2v_raw["inputs"][0]["metrics"], ("t2v", "dis"): t2v_dis["inputs"][1]["metrics"],
        ("v2t", "raw"): v2t_raw["inputs"][0]["metrics"], ("v2t", "dis"): v2t["inputs"][1]["metrics"],
    }
    if v2t["inputs"][0]["metrics"] != v2t_raw["inputs"][0]["metrics"]:
        failures.append("v2t raw through normalise --transpose --method none differs from the dump evaluated "
                        "with --direction v2t")
    for doc in (t2v_raw, v2t_raw, v2t):
        if doc["protocol"]["name"] != "metric.py":
            failures.append(f"protocol {doc['protocol']}")

    # --- the library, on the same arrays ---------------------------------------------------------
    probe_t2v = qbnorm_cli.probe(bank_sims=P_t2v, betas=[20], k=1)
    probe_v2t = qbnorm_cli.probe(bank_sims=P_caps, transpose=True, betas=[20], k=1)
    dis_v2t = qbnorm_cli.normalise(probe=probe_v2t, sims=S, transpose=True, method="dis")
    api_results = {
        ("t2v", "raw"): qbnorm_cli.evaluate(S, queries_per_item=5)["metrics"],
        ("t2v", "dis"): qbnorm_cli.evaluate(qbnorm_cli.normalise(probe=probe_t2v, sims=S, method="dis"),
                                            queries_per_item=5)["metrics"],
        ("v2t", "raw"): qbnorm_cli.evaluate(S, queries_per_item=5, direction="v2t")["metrics"],
        ("v2t", "dis"): qbnorm_cli.evaluate(dis_v2t, queries_per_item=5, direction="v2t", transpose=True)["metrics"],
    }
    # v2t QB-Norm from embeddings, no dump at all: the bank probes the captions, items are the queries
    probe_emb = qbnorm_cli.probe(TG, Q, betas=[20], k=1)
    emb_dis = qbnorm_cli.normalise(G, Q, probe_emb, method="dis")
    emb = qbnorm_cli.evaluate(emb_dis, queries_per_item=5, direction="v2t", transpose=True)["metrics"]

    for key in official:
        check(f"{key[0]} {key[1]} (CLI)", cli_results[key], official[key], ISSUE[key])
        check(f"{key[0]} {key[1]} (API)", api_results[key], official[key], ISSUE[key])
    check("v2t dis (API, from embeddings)", emb, official[("v2t", "dis")], ISSUE[("v2t", "dis")])

    for direction in ("t2v", "v2t"):
        what = "5000 German captions → 1000 images" if direction == "t2v" else "1000 images → 5000 German captions"
        bank = "10000 train_queries" if direction == "t2v" else "10000 train_gallery"
        print(f"\n{direction}: {what} (QB-Norm DIS β=20 k=1, bank: {bank})")
        print(f"| {'':34s} | " + " | ".join(f"{n:>8s}" for n in NAMES) + " |")
        print("|" + "---|" * (len(NAMES) + 1))
        for method in ("raw", "dis"):
            key = (direction, method)
            figures = " | ".join(f"{cli_results[key][n]:8.4f}" for n in NAMES)
            print(f"| {method + ' qbnorm (unrounded)':34s} | {figures} |")
            print(f"| {method + ' qbnorm, metric.py rounding':34s} | "
                  + " | ".join(f"{v:8.1f}" for v in ref.official_rounded(cli_results[key]).values()) + " |")
            print(f"| {method + ' metric.py (oracle) printed':34s} | "
                  + " | ".join(f"{v:8.1f}" for v in ref.official_rounded(official[key]).values()) + " |")
    print(f"\nCLI and API agree: {cli_results == api_results}; files in {work}; {time.time() - t0:.0f} s")
    if cli_results != api_results:
        failures.append("the CLI and the API differ")
    for line in failures:
        print("FAIL:", line)
    print("OK" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
