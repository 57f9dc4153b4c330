"""Adversarial hubs, measured: crafted gallery items that sit near many queries (Zhang et al., arXiv
2412.14113), injected from embeddings alone, against raw retrieval, every method of qbnorm, and
the hub audit (`qbnorm hubs` on the probe: the bank's view).

    python -m benchmarks.adversarial_hubs [--data PATH] [--full | --tiny] [--methods M,…] [--json OUT]

Attacks (m crafted items appended to the gallery; the attacker knows queries of a split the bank
never saw, `val_queries`, never the bank or the test queries):

  centroid   untargeted: each hub the normalised mean of 200 random attacker queries
  targeted   each hub the normalised mean of the 50 attacker queries nearest a random seed query
             (one concept); the concept's test queries are those at least as near the seed
  mimic      a centroid hub mixed with a random real gallery item (½ each, renormalised), so that
             its nearest real neighbour is as near as a natural item's (a nearest-neighbour check)

and two settings where a query bank is expected to fail:

  uncovered  targeted hubs whose concept the bank does not cover (every bank query at least as
             near the seed as the concept's radius removed from the bank)
  poisoned   centroid hubs, the bank holding the attacker's queries: POISON_COPIES copies of every
             real gallery item added to the bank (half of it on Multi30k; an attacker who can write
             into the query log the bank is sampled from), raising every real item's normaliser

Per attack, m and method: attack success (the share of test queries whose top 1 / top 10 holds a
crafted item; targeted: also within the targeted concepts), R@1 (test ground truth, unchanged by
the appended items). Per attack and m: detection recall of the hub audit on the probe (the share
of crafted items among the ⌈b·G⌉ highest hub scores, alert budgets b = 0.2 % and 1 % of the
gallery), the crafted and natural items above the default threshold, and of the raw test
queries' view (N_10) the same.

Default (about a minute on 2 shared cores): the first three attacks, m = 10, methods none, dis,
sn; --full: all five attacks, m ∈ {1, 10, 100} and every method (the dual ones with the 10,000
train_gallery captions as the gallery bank, gc
with the sorted bank scores); --tiny: synthetic embeddings (no data needed), for the smoke test.
Method settings are the README's (Multi30k): is/dis β = 20, k = 1; sn, dbsn, dual-is β = 100
(dual β₂ = 1); csls K = 10; nnn k = 128, α = 0.75; dn λ = 0.25.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

import qbnorm_cli
from qbnorm_cli.core import hubscore

ROOT = Path(__file__).resolve().parent.parent
DATA = next((p for p in (ROOT.parent / "shared", ROOT.parent.parent / "shared") if p.is_dir()),
            ROOT.parent / "shared") / "data" / "multi30k-de2en-e5.h5"
BUDGETS = (0.002, 0.01)
CENTROID_QUERIES, CONCEPT_QUERIES, MIMIC_SHARE = 200, 50, 0.5
SETTINGS = {  # method: normalise's parameters (the README's Multi30k settings)
    "none": {}, "is": {"beta": 20.0, "k": 1}, "dis": {"beta": 20.0, "k": 1}, "sn": {"beta": 100.0},
    "csls": {}, "nnn": {}, "dn": {"lam": 0.25}, "gc": {"beta": 20.0}, "dual-is": {"beta": 100.0, "gallery_beta": 1.0},
    "dual-dis": {"beta": 20.0, "k": 1, "gallery_beta": 1.0}, "dbsn": {"beta": 100.0},
}
DEFAULT_METHODS = ("none", "dis", "sn")
KINDS = ("centroid", "targeted", "mimic", "uncovered", "poisoned")
DEFAULT_KINDS = KINDS[:3]
POISON_COPIES = 10


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def load(path: Path) -> dict[str, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as h5:
        return {name: h5[name][()] for name in ("queries", "gallery", "gt", "train_queries", "val_queries",
                                                 "train_gallery")}


def synthetic(seed: int = 0) -> dict[str, np.ndarray]:
    """Tiny stand-in data: an anisotropic gallery, queries offset by a modality gap."""
    rng = np.random.default_rng(seed)
    n, d = 200, 32
    centres, (gap, common) = unit(rng.standard_normal((6, d))), unit(rng.standard_normal((2, d)))
    gallery = unit(rng.standard_normal((n, d)) / np.sqrt(d) + 0.3 * centres[rng.integers(0, 6, n)] + 2.0 * common)

    def copies(items):
        return unit(gallery[items] + gap + 0.5 * rng.standard_normal((len(items), d)) / np.sqrt(d))

    test = np.repeat(np.arange(n), 2)
    return {"queries": copies(test), "gallery": gallery, "gt": test, "train_queries": copies(rng.integers(0, n, 800)),
            "val_queries": copies(rng.integers(0, n, 400)), "train_gallery": copies(rng.integers(0, n, 400))}


class Attack:
    """m crafted items of one kind, the bank they meet, and the test queries of their concepts."""

    def __init__(self, kind: str, m: int, data: dict, rng: np.random.Generator, scale: float):
        self.kind, self.m = kind, m
        attacker, gallery, bank = data["val_queries"], data["gallery"], data["train_queries"]
        self.concept = np.zeros(len(data["queries"]), dtype=bool)
        self.bank = bank
        if kind in ("targeted", "uncovered"):
            size = max(2, int(CONCEPT_QUERIES * scale))
            hubs, keep = [], np.ones(len(bank), dtype=bool)
            for _ in range(m):
                seed = attacker[rng.integers(len(attacker))]
                near = attacker @ seed
                chosen = np.argsort(-near, kind="stable")[:size]
                radius = near[chosen[-1]]
                hubs.append(attacker[chosen].mean(axis=0))
                self.concept |= data["queries"] @ seed >= radius
                keep &= bank @ seed < radius
            if kind == "uncovered":
                self.bank = bank[keep]
        else:
            size = max(2, int(CENTROID_QUERIES * scale))
            hubs = [attacker[rng.choice(len(attacker), size, replace=False)].mean(axis=0) for _ in range(m)]
            if kind == "mimic":
                real = gallery[rng.choice(len(gallery), m, replace=m > len(gallery))]
                hubs = [MIMIC_SHARE * unit(h) + (1 - MIMIC_SHARE) * r for h, r in zip(hubs, real, strict=True)]
            if kind == "poisoned":
                self.bank = np.vstack([bank, *[gallery] * POISON_COPIES])
        self.hubs = unit(np.array(hubs))
        self.gallery = np.vstack([gallery, self.hubs])
        self.n_real = len(gallery)

    def nearest_real(self, gallery: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each crafted item's, and each real item's, similarity to its nearest other real item."""
        real = gallery @ gallery.T
        np.fill_diagonal(real, -np.inf)
        return (self.hubs @ gallery.T).max(axis=1), real.max(axis=1)


def success(ranking, n_real: int, rows: np.ndarray | None = None) -> tuple[float, float]:
    """The share of queries (of `rows`) whose top 1 / top 10 holds a crafted item (index ≥ n_real)."""
    top = np.asarray(ranking.indices)
    if rows is not None:
        top = top[rows]
    if not len(top):
        return math.nan, math.nan
    crafted = top >= n_real
    return 100 * float(crafted[:, 0].mean()), 100 * float(crafted[:, :10].any(axis=1).mean())


def detection(scores: np.ndarray, n_real: int, threshold: float = hubscore.DEFAULT_THRESHOLD) -> dict:
    """Recall of the crafted items within each alert budget; items above the threshold."""
    m = scores.size - n_real
    out = {f"recall@{100 * b:g}%": 100 * int((hubscore.alerts(scores, b) >= n_real).sum()) / m for b in BUDGETS}
    flagged = hubscore.flagged(scores, threshold)
    out["crafted_flagged"] = int((flagged >= n_real).sum())
    out["natural_flagged"] = int((flagged < n_real).sum())
    out["crafted_min_score"] = float(scores[n_real:].min())
    out["natural_max_score"] = float(scores[:n_real].max())
    return out


def probe_for(bank: np.ndarray, gallery: np.ndarray, data: dict, methods: list[str]):
    needs_dual = any(m in ("dual-is", "dual-dis", "dbsn") for m in methods)
    return qbnorm_cli.probe(bank, gallery, betas=[20.0, 100.0], k=1,
                            gallery_bank=data["train_gallery"] if needs_dual else None, gallery_betas=[1.0],
                            keep_sorted="gc" in methods, sinkhorn=any(m in ("sn", "dbsn") for m in methods))


def measure(kind: str, m: int, data: dict, methods: list[str], scale: float, seed: int = 0) -> dict:
    rng = np.random.default_rng([seed, KINDS.index(kind), m])
    attack = Attack(kind, m, data, rng, scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qbnorm_cli.QbnormWarning)  # the attacked bank's coverage
        probe = probe_for(attack.bank, attack.gallery, data, methods)
        rows = {}
        raw = None
        for method in methods:
            ranking = qbnorm_cli.normalise(data["queries"], attack.gallery, probe, method=method, top_k=10,
                                           **SETTINGS[method])
            raw = ranking if method == "none" else raw
            top1, top10 = success(ranking, attack.n_real)
            row = {"top1": top1, "top10": top10,
                   "R@1": qbnorm_cli.evaluate(ranking, data["gt"])["metrics"]["R@1"]}
            if attack.concept.any():
                row["concept_top1"], row["concept_top10"] = success(ranking, attack.n_real, attack.concept)
            rows[method] = row
        audit = qbnorm_cli.hubs([probe, raw] if raw is not None else probe, k=10, beta=20.0)
    crafted_nn, natural_nn = attack.nearest_real(data["gallery"])
    low, high = np.percentile(natural_nn, [1, 99])  # a real item's nearest other real item
    return {"kind": kind, "m": m, "bank_rows": len(attack.bank), "gallery_rows": len(attack.gallery),
            "concept_queries": int(attack.concept.sum()), "methods": rows,
            "bank_view": detection(audit["inputs"][0]["hub_score"], attack.n_real),
            "raw_view": detection(audit["inputs"][1]["hub_score"], attack.n_real) if raw is not None else None,
            "not_an_outlier": 100 * float(np.mean(crafted_nn >= low)),
            "not_a_duplicate": 100 * float(np.mean(crafted_nn <= high))}


def clean(data: dict, methods: list[str]) -> dict:
    """The methods on the gallery as it is (no crafted item): R@1 and the audit's natural scores."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qbnorm_cli.QbnormWarning)
        probe = probe_for(data["train_queries"], data["gallery"], data, methods)
        out = {}
        raw = None
        for method in methods:
            ranking = qbnorm_cli.normalise(data["queries"], data["gallery"], probe, method=method, top_k=10,
                                           **SETTINGS[method])
            raw = ranking if method == "none" else raw
            out[method] = qbnorm_cli.evaluate(ranking, data["gt"])["metrics"]["R@1"]
        audit = qbnorm_cli.hubs([probe, raw], k=10, beta=20.0)
    views = dict(zip(("bank view", "raw test view"), audit["inputs"], strict=True))
    return {"R@1": out, "natural_max_score": {name: round(float(v["hub_score"].max()), 2) for name, v in views.items()},
            "flagged": {name: len(v["flagged"]) for name, v in views.items()}}


def fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def _grid(title: str, results: list[dict], methods: list[str], cell, first: str | None = None) -> list[str]:
    lines = ["", title, "", "| attack | m | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    if first is not None:
        lines.append(first)
    lines += [f"| {r['kind']} | {r['m']} | " + " | ".join(cell(r, m) for m in methods) + " |" for r in results]
    return lines


def tables(results: list[dict], baseline: dict, methods: list[str]) -> str:
    lines = _grid("Attack success, top 1: % of the test queries whose best item is a crafted one", results, methods,
                  lambda r, m: fmt(r["methods"][m]["top1"]))
    lines += _grid("Attack success, top 10: % of the test queries with a crafted item among their 10 best", results,
                   methods, lambda r, m: fmt(r["methods"][m]["top10"]))
    lines += _grid("R@1 (the clean gallery first)", results, methods, lambda r, m: fmt(r["methods"][m]["R@1"]),
                   "| none (clean gallery) | 0 | " + " | ".join(fmt(baseline["R@1"][m]) for m in methods) + " |")
    concept = [r for r in results if r["concept_queries"]]
    if concept:
        lines += _grid("Within the targeted concepts: % of the concepts' test queries with a crafted item in "
                       "their top 1 / top 10", concept, methods,
                       lambda r, m: f"{fmt(r['methods'][m]['concept_top1'])} / {fmt(r['methods'][m]['concept_top10'])}")
    lines += ["", "Detection by the hub audit (`qbnorm hubs`, k = 10): recall of the crafted items within an alert "
              "budget of 0.2 % / 1 % of the gallery; crafted and natural items above the default threshold "
              f"{hubscore.DEFAULT_THRESHOLD:g}; crafted items whose nearest real item is as near as a real item's "
              "nearest other (≥ its 1st percentile: no outlier) and no nearer (≤ its 99th: no near-duplicate):", "",
              "| attack | m | bank view (probe): recall 0.2 % / 1 % | flagged crafted / natural | lowest crafted, "
              "highest natural score | raw test view: recall 0.2 % / 1 % | flagged crafted / natural | "
              "no outlier / no duplicate |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        b, q = r["bank_view"], r["raw_view"] or {}
        lines.append(f"| {r['kind']} | {r['m']} | {fmt(b['recall@0.2%'])} / {fmt(b['recall@1%'])} | "
                     f"{b['crafted_flagged']} / {b['natural_flagged']} | {b['crafted_min_score']:.1f}, "
                     f"{b['natural_max_score']:.1f} | {fmt(q.get('recall@0.2%'))} / {fmt(q.get('recall@1%'))} | "
                     f"{q.get('crafted_flagged', '–')} / {q.get('natural_flagged', '–')} | "
                     f"{fmt(r['not_an_outlier'])} % / {fmt(r['not_a_duplicate'])} % |")
    return "\n".join(lines[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DATA), help="the shared Multi30k file (not read with --tiny)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="m ∈ {1, 10, 100} and every method")
    size.add_argument("--tiny", action="store_true", help="synthetic embeddings, a few seconds (smoke test)")
    parser.add_argument("--methods", help="comma-separated methods instead (none, the baseline, is always run)")
    parser.add_argument("--json", metavar="OUT", help="write the figures as JSON")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.tiny:
        data, scale, counts = synthetic(), 0.2, (3,)
    else:
        if not Path(args.data).is_file():
            print(f"adversarial_hubs: {args.data}: no such file (give --data, or --tiny)", file=sys.stderr)
            return 2
        data, scale, counts = load(Path(args.data)), 1.0, ((1, 10, 100) if args.full else (10,))
    methods = list(SETTINGS) if args.full else list(DEFAULT_METHODS)
    if args.methods:
        unknown = set(args.methods.split(",")) - set(SETTINGS)
        if unknown:
            print(f"adversarial_hubs: --methods: unknown {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        methods = ["none", *[m for m in args.methods.split(",") if m != "none"]]
    baseline = clean(data, methods)
    kinds = KINDS if args.full or args.tiny else DEFAULT_KINDS
    results = [measure(kind, m, data, methods, scale) for kind in kinds for m in counts]
    print(tables(results, baseline, methods))
    print(f"\nclean gallery: highest natural hub score {baseline['natural_max_score']}, flagged {baseline['flagged']}")
    print(f"(m = {', '.join(map(str, counts))}; {len(data['queries'])} test queries × {len(data['gallery'])} items, "
          f"bank {len(data['train_queries'])}; "
          f"{time.perf_counter() - started:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"clean": baseline, "attacks": results, "methods": methods}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
